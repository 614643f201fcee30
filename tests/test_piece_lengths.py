"""``virtqueue.device.piece_lengths`` (what blk checks SEG_MAX and SIZE_MAX on) against the plain
per-segment loop it replaced and against the scatter plan, on any segments and any range."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from virtio_lm.virtqueue import Segment
from virtio_lm.virtqueue.device import _scatter_plan, piece_lengths


def reference(segs, start, length):
    out = []
    pos = 0
    end = start + length
    for s in segs:
        lo = max(pos, start)
        hi = min(pos + s.len, end)
        if hi > lo:
            out.append(hi - lo)
        pos += s.len
        if pos >= end:
            break
    return out


segments = st.lists(st.builds(Segment, st.integers(0, 1 << 20), st.one_of(st.just(0), st.integers(0, 600))),
                    max_size=12).map(tuple)


@given(segments, st.integers(0, 8000), st.integers(-2, 8000))
def test_same_pieces_as_the_loop(segs, start, length):
    assert piece_lengths(segs, start, length) == reference(segs, start, length)
    if length >= 0:
        assert piece_lengths(segs, start, length) == [n for _, _, n in _scatter_plan(segs, start, length)]


def test_a_read_request_data_before_its_status_byte():
    segs = tuple(Segment(4096 * i, 4096) for i in range(126)) + (Segment(1 << 20, 1),)
    assert piece_lengths(segs, 0, 126 * 4096) == [4096] * 126
    assert piece_lengths(segs, 100, 4096) == [3996, 100]


def test_negative_control_the_reference_sees_a_dropped_piece():
    segs = (Segment(0, 10), Segment(100, 0), Segment(200, 10))
    assert reference(segs, 5, 10) == [5, 5] != [5]
    assert piece_lengths(segs, 5, 10) == [5, 5]
