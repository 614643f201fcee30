"""Split-ring layout (wire/ring.py): sizes, offsets, need_event, descriptors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio_lm.errors import FieldValueError, ShortBufferError, TrailingDataError
from virtio_lm.wire import ring
from virtio_lm.wire.ring import (
    DescFlags,
    RingHeader,
    SplitRingLayout,
    VirtqDesc,
    VirtqUsedElem,
    check_queue_size,
    need_event,
    read_desc,
)

SIZES = [1 << s for s in range(16)]  # 1..32768
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)


# ------------------------------------------------------------------ queue size rule
@pytest.mark.parametrize("size", SIZES)
def test_power_of_two_sizes_are_legal(size: int) -> None:
    assert check_queue_size(size) == size


@pytest.mark.parametrize("size", [0, 3, 6, 100, 32767, 32769, 65536, -1, -2])
def test_illegal_queue_size_refused(size: int) -> None:
    with pytest.raises(FieldValueError) as ei:
        check_queue_size(size)
    assert ei.value.field == "size"


def test_every_size_up_to_max_classified() -> None:
    legal = [n for n in range(0, ring.MAX_QUEUE_SIZE + 2) if _legal(n)]
    assert legal == SIZES


def _legal(n: int) -> bool:
    try:
        check_queue_size(n)
    except FieldValueError:
        return False
    return True


# ------------------------------------------------------------------ sizes and offsets
@pytest.mark.parametrize("size", SIZES)
def test_part_sizes(size: int) -> None:
    assert ring.desc_table_size(size) == 16 * size
    assert ring.avail_ring_size(size) == 6 + 2 * size
    assert ring.avail_ring_size(size, event_idx=False) == 4 + 2 * size
    assert ring.used_ring_size(size) == 6 + 8 * size
    assert ring.used_ring_size(size, event_idx=False) == 4 + 8 * size
    # the event fields are the last two bytes of each part
    assert ring.used_event_offset(size) == ring.avail_ring_size(size) - 2
    assert ring.avail_event_offset(size) == ring.used_ring_size(size) - 2
    assert ring.avail_entry_offset(size - 1) == ring.used_event_offset(size) - 2
    assert ring.used_elem_offset(size - 1) == ring.avail_event_offset(size) - 8


@pytest.mark.parametrize("size", SIZES)
def test_packed_layout(size: int) -> None:
    lay = SplitRingLayout.packed_at(0x1000, size)
    assert lay.desc == 0x1000
    assert lay.avail == lay.desc + 16 * size
    assert lay.used % 4 == 0 and lay.avail % 2 == 0 and lay.desc % 16 == 0
    assert lay.avail + 6 + 2 * size <= lay.used < lay.avail + 6 + 2 * size + 4
    assert lay.total == lay.used + 6 + 8 * size - 0x1000


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("align", [4, 64, 4096])
def test_legacy_vring_size_formula(size: int, align: int) -> None:
    # the vring_size() formula written out independently
    first = 16 * size + 2 * (3 + size)
    expect = ((first + align - 1) // align) * align + 2 * 3 + 8 * size
    assert ring.legacy_vring_size(size, align) == expect


def test_packed_layout_refuses_misaligned_base() -> None:
    with pytest.raises(FieldValueError) as ei:
        SplitRingLayout.packed_at(8, 4)
    assert ei.value.field == "base"


def test_packed_layout_refuses_bad_size() -> None:
    with pytest.raises(FieldValueError) as ei:
        SplitRingLayout.packed_at(0, 12)
    assert ei.value.field == "size"


def test_align_up() -> None:
    assert [ring.align_up(v, 4) for v in (0, 1, 3, 4, 5)] == [0, 4, 4, 4, 8]


# ------------------------------------------------------------------ need_event
NEED_EVENT_TABLE = [
    # (event, new, old, expected): the device/driver asked to be told when idx passes `event`
    (0, 1, 0, True),  # stepped from 0 to 1 over event 0
    (0, 0, 0, False),  # nothing published
    (1, 1, 0, False),  # event 1 not yet reached (need new > event)
    (1, 2, 0, True),
    (5, 10, 6, False),  # event behind old: already notified
    (5, 10, 5, True),
    (9, 10, 5, True),  # event just before new
    (10, 10, 5, False),  # event == new: not yet passed
    (0xFFFF, 0, 0xFFFE, True),  # wrap: stepped over 0xffff to 0
    (0xFFFF, 1, 0xFFFF, True),
    (0xFFFE, 1, 0xFFFF, False),  # event before old across the wrap
    (0, 1, 0xFFFF, True),
    (0x8000, 0x8001, 0, True),  # half-range step
    (3, 3, 3, False),
]


@pytest.mark.parametrize("event,new,old,expected", NEED_EVENT_TABLE)
def test_need_event_table(event: int, new: int, old: int, expected: bool) -> None:
    assert need_event(event, new, old) is expected


@pytest.mark.slow  # 0.3 s or more: out of the one-minute fast subset (CI runs it)
@settings(max_examples=200, deadline=None)
@given(old=u16, step=st.integers(0, 0x7FFF), event=u16)
def test_need_event_is_crossing(old: int, step: int, event: int) -> None:
    """need_event says whether ``event`` is one of the indices old..new-1 (mod 2**16)."""
    new = (old + step) & 0xFFFF
    crossed = {(old + i) & 0xFFFF for i in range(step)}
    assert need_event(event, new, old) == (event in crossed)


# ------------------------------------------------------------------ descriptors
@settings(max_examples=200, deadline=None)
@given(addr=u64, length=u32, flags=u16, nxt=u16)
def test_desc_round_trip(addr: int, length: int, flags: int, nxt: int) -> None:
    d = VirtqDesc(addr, length, flags, nxt)
    raw = d.encode()
    assert len(raw) == 16
    assert VirtqDesc.decode(raw) == d
    assert VirtqDesc.decode(raw).encode() == raw
    assert raw == addr.to_bytes(8, "little") + length.to_bytes(4, "little") + flags.to_bytes(
        2, "little"
    ) + nxt.to_bytes(2, "little")


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(min_size=16, max_size=16))
def test_desc_bytes_round_trip(raw: bytes) -> None:
    assert VirtqDesc.decode(raw).encode() == raw


def test_desc_known_flags_decode_as_enum() -> None:
    d = VirtqDesc.decode(VirtqDesc(0x1000, 512, DescFlags.NEXT | DescFlags.WRITE, 3).encode())
    assert d.flags == DescFlags.NEXT | DescFlags.WRITE and isinstance(d.flags, DescFlags)


@settings(max_examples=100, deadline=None)
@given(ident=u32, length=u32)
def test_used_elem_round_trip(ident: int, length: int) -> None:
    e = VirtqUsedElem(ident, length)
    assert VirtqUsedElem.decode(e.encode()) == e
    assert e.encode() == ident.to_bytes(4, "little") + length.to_bytes(4, "little")


@settings(max_examples=100, deadline=None)
@given(flags=u16, idx=u16)
def test_ring_header_round_trip(flags: int, idx: int) -> None:
    h = RingHeader(flags, idx)
    assert RingHeader.decode(h.encode()) == h


def test_desc_short_buffer() -> None:
    with pytest.raises(ShortBufferError) as ei:
        VirtqDesc.decode(bytes(15))
    assert ei.value.layout == "VirtqDesc" and ei.value.needed == 16 and ei.value.got == 15


def test_desc_trailing_bytes() -> None:
    with pytest.raises(TrailingDataError) as ei:
        VirtqDesc.decode(bytes(17))
    assert ei.value.layout == "VirtqDesc" and ei.value.field is None


def test_desc_unpack_from_offset() -> None:
    d = VirtqDesc(7, 8, 1, 2)
    buf = bytes(16) + d.encode()
    assert VirtqDesc.unpack_from(buf, 16) == d
    with pytest.raises(ShortBufferError):
        VirtqDesc.unpack_from(buf, 17)


def test_desc_negative_offset_refused() -> None:
    with pytest.raises(FieldValueError):
        VirtqDesc.unpack_from(bytes(32), -16)


@pytest.mark.parametrize("field,value", [("addr", 1 << 64), ("len", 1 << 32), ("next", 1 << 16), ("addr", -1)])
def test_desc_out_of_range_refused_on_encode(field: str, value: int) -> None:
    kw = {"addr": 0, "len": 0, "flags": 0, "next": 0, field: value}
    with pytest.raises(FieldValueError) as ei:
        VirtqDesc(**kw).encode()
    assert ei.value.field == field


@settings(max_examples=300)
@given(st.binary(min_size=16, max_size=64), st.integers(0, 48))
def test_read_desc_is_the_layout_of_virtq_desc(raw, offset):
    """The virtqueue's unchecked reader agrees with the checked VirtqDesc at any offset (and a
    buffer too short raises; the walk never hands it one)."""
    if offset + 16 > len(raw):
        with pytest.raises(Exception):  # noqa: B017 - struct's own error; callers never get here
            read_desc(raw, offset)
        return
    d = VirtqDesc.unpack_from(raw, offset)
    assert read_desc(raw, offset) == (d.addr, d.len, int(d.flags), d.next)
