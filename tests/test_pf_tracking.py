"""Dirty trackers: exactly the pages marked are reported, under races too, and overflow is fail-safe."""

from __future__ import annotations

import contextlib
import os
import random
import sys
import threading
from array import array

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio_lm.errors import DirtyReportError, MapTableError, TrackingError
from virtio_lm.memory import Memory, MemoryPort
from virtio_lm.memory.dirty import RING_DRAIN_AT, RING_MAX_RUN, take_ring
from virtio_lm.memory.region import DeviceWriter
from virtio_lm.pf.tracking import (
    PullTracker,
    PushTracker,
    bitmap_range,
    make_tracker,
    max_log_pages,
    report_to_pages,
)
from virtio_lm.vhost.memmap import GuestMemoryMap
from virtio_lm.wire.ctrl import TrackMode
from virtio_lm.wire.vhost_user import MemRegion

PUSH_MODES = [TrackMode.PUSH_BITMAP, TrackMode.PUSH_BYTEMAP]
PULL_MODES = [TrackMode.PULL_BITMAP, TrackMode.PULL_BYTEMAP]
HOST_SIZE = 8 * 4096


# --------------------------------------------------------------------------- rigs
class Rig:
    """``mark`` as a VF's DMA write makes it: with ``buffered`` through a DeviceWriter whose
    tracker is the rig's (one-page writes go to the tracker's dirty ring), else ``tracker.mark``."""

    buffered = False

    def mark(self, first: int, last: int) -> None:
        if self.buffered:
            self.writer.written(first, last, (last - first + 1) * 4096)
        else:
            self.tracker.mark(first, last)

    def _wire(self, buffered: bool) -> None:
        self.buffered = buffered
        self.writer = DeviceWriter("vf")
        self.writer.tracker = self.tracker


class PushRig(Rig):
    """A push tracker over a host memory, collected like a driver: test-and-clear per segment."""

    def __init__(self, mode, segments, tracker_cls=PushTracker, buffered=False):
        self.host = Memory(HOST_SIZE, name="pf-host")
        self.pf_port = self.host.device_port("pf")
        self.segments = segments
        self.tracker = tracker_cls(mode, self.pf_port, segments, buffered=buffered)
        self.bitmap = mode.is_bitmap
        self._wire(buffered)

    def collect(self) -> np.ndarray:
        raw = np.concatenate([self.host.cpu.atomic_fetch_and_clear(a, n) for a, n in self.segments])
        return report_to_pages(raw, self.tracker.capacity_pages, bitmap=self.bitmap)

    def stray_writes(self) -> int:
        """Non-zero host bytes outside the map segments (must stay 0)."""
        mask = np.ones(HOST_SIZE, dtype=bool)
        for a, n in self.segments:
            mask[a : a + n] = False
        return int(np.count_nonzero(self.host.array[mask]))

    def close(self):
        self.host.close()


class PullRig(Rig):
    def __init__(self, mode, log_max_pages, tracker_cls=PullTracker, buffered=False):
        self.tracker = tracker_cls(mode, log_max_pages, buffered=buffered)
        self.bitmap = mode.is_bitmap
        self.reports: list[bytes] = []
        self._wire(buffered)

    def collect(self) -> np.ndarray:
        rep = self.tracker.snapshot()
        self.reports.append(rep)
        return report_to_pages(rep, self.tracker.capacity_pages, bitmap=self.bitmap)

    def stray_writes(self) -> int:
        return 0

    def close(self):
        pass


def assert_exact(marked: np.ndarray, reported: np.ndarray) -> None:
    """The checker: reported pages == marked pages, none missing, none extra."""
    missing = np.flatnonzero(marked & ~reported)
    extra = np.flatnonzero(reported & ~marked)
    assert len(missing) == 0 and len(extra) == 0, f"missing {missing[:10]}, extra {extra[:10]}"


def run_rounds(rig, rounds) -> None:
    """Mark each round's ranges, collect, check exactness; also the pull trim rule."""
    cap = rig.tracker.capacity_pages
    for ranges in rounds:
        marked = np.zeros(cap, dtype=bool)
        for first, last in ranges:
            rig.mark(first, last)
            marked[first : last + 1] = True
        assert rig.stray_writes() == 0
        assert_exact(marked, rig.collect())
        if isinstance(rig, PullRig):
            nz = np.flatnonzero(marked)
            want_len = 0 if len(nz) == 0 else rig.tracker.mode.map_bytes(int(nz[-1]) + 1)
            assert len(rig.reports[-1]) == want_len


# --------------------------------------------------------------------------- strategies
@st.composite
def segment_layouts(draw):
    """1..5 segments of odd lengths (first one often 3 bytes), placed in host memory in random order."""
    n = draw(st.integers(1, 5))
    lens = draw(st.lists(st.integers(1, 40), min_size=n, max_size=n))
    if draw(st.booleans()):
        lens[0] = 3
    order = draw(st.permutations(range(n)))
    addr = draw(st.integers(0, 64))
    placed: dict[int, int] = {}
    for i in order:
        placed[i] = addr
        addr += lens[i] + draw(st.integers(0, 300))
    return [(placed[i], lens[i]) for i in range(n)]


def ranges_within(cap: int):
    edge = st.sampled_from(sorted({0, 1, 7, 8, 9, 15, 16, cap // 2, cap - 9, cap - 8, cap - 2, cap - 1} & set(range(cap)) or {0}))
    page = st.one_of(st.integers(0, cap - 1), edge)
    return st.tuples(page, page).map(lambda t: (min(t), max(t)))


@st.composite
def push_case(draw):
    segs = draw(segment_layouts())
    mode = draw(st.sampled_from(PUSH_MODES))
    cap = sum(n for _, n in segs) * (8 if mode.is_bitmap else 1)
    rounds = draw(st.lists(st.lists(ranges_within(cap), max_size=12), min_size=1, max_size=4))
    return mode, segs, rounds


@st.composite
def pull_case(draw):
    mode = draw(st.sampled_from(PULL_MODES))
    log = draw(st.integers(0, 13))
    cap = 1 << log
    rounds = draw(st.lists(st.lists(ranges_within(cap), max_size=12), min_size=1, max_size=4))
    return mode, log, rounds


# --------------------------------------------------------------------------- exactness
@pytest.mark.slow  # over 0.4 s: out of the one-minute fast subset (CI runs it)
@settings(max_examples=150, deadline=None)
@given(push_case(), st.booleans())
def test_push_reports_exactly_the_marked_pages(case, buffered):
    mode, segs, rounds = case
    rig = PushRig(mode, segs, buffered=buffered)
    try:
        run_rounds(rig, rounds)
        assert rig.tracker.overflow_events == 0
        assert rig.tracker.marks == sum(l - f + 1 for r in rounds for f, l in r)
    finally:
        rig.close()


@pytest.mark.slow  # over 0.4 s: out of the one-minute fast subset (CI runs it)
@settings(max_examples=150, deadline=None)
@given(pull_case(), st.booleans())
def test_pull_reports_exactly_the_marked_pages(case, buffered):
    mode, log, rounds = case
    rig = PullRig(mode, log, buffered=buffered)
    run_rounds(rig, rounds)
    assert rig.tracker.overflow_events == 0
    assert rig.tracker.marks == sum(l - f + 1 for r in rounds for f, l in r)


@pytest.mark.parametrize("mode", PUSH_MODES)
def test_push_map_layout_across_segments(mode):
    """A 3-byte first segment: page 24 (bitmap) / page 3 (bytemap) is the second segment's first byte."""
    segs = [(4096 + 100, 3), (10, 5)]
    rig = PushRig(mode, segs)
    try:
        first = 3 * 8 if mode.is_bitmap else 3
        rig.tracker.mark(first - 1, first + 1)
        if mode.is_bitmap:
            assert rig.host.read(4096 + 100 + 2, 1) == b"\x80"  # page 23: bit 7 of byte 2
            assert rig.host.read(10, 1) == b"\x03"  # pages 24, 25: bits 0, 1 of byte 3
        else:
            assert rig.host.read(4096 + 100 + 2, 1) == b"\x01"
            assert rig.host.read(10, 2) == b"\x01\x01"
        assert rig.stray_writes() == 0
    finally:
        rig.close()


def test_bitmap_range_kvm_layout():
    b0, data = bitmap_range(3, 17)
    assert b0 == 0 and data.tobytes() == bytes([0xF8, 0xFF, 0x03])
    b0, data = bitmap_range(9, 9)
    assert b0 == 1 and data.tobytes() == b"\x02"


def test_pull_snapshot_trimmed_and_fresh():
    t = PullTracker(TrackMode.PULL_BITMAP, 12)
    assert t.snapshot() == b""
    t.mark(9, 9)
    assert t.snapshot() == b"\x00\x02"
    assert t.snapshot() == b""
    t = PullTracker(TrackMode.PULL_BYTEMAP, 12)
    t.mark(2, 3)
    assert t.snapshot() == b"\x00\x00\x01\x01"


def test_pull_storage_grows_to_capacity():
    t = PullTracker(TrackMode.PULL_BYTEMAP, 20)
    t.mark((1 << 20) - 1, (1 << 20) - 1)
    rep = t.snapshot()
    assert len(rep) == 1 << 20 and rep[-1] == 1 and rep.count(1) == 1


# --------------------------------------------------------------------------- negative control
class LossyPush(PushTracker):
    """Ignores every 10th mark."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._n = 0

    def mark(self, first_page, last_page):
        self._n += 1
        if self._n % 10:
            super().mark(first_page, last_page)


class LossyPull(PullTracker):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._n = 0

    def mark(self, first_page, last_page):
        self._n += 1
        if self._n % 10:
            super().mark(first_page, last_page)


@pytest.mark.parametrize("mode", PUSH_MODES + PULL_MODES)
def test_checker_catches_a_lossy_tracker(mode):
    # distinct single pages so the 10th mark is not covered by another one
    rounds = [[(p, p) for p in range(0, 40, 2)]]
    rig = PushRig(mode, [(3, 3), (100, 20)], LossyPush) if mode.is_push else PullRig(mode, 10, LossyPull)
    try:
        with pytest.raises(AssertionError, match="missing"):
            run_rounds(rig, rounds)
    finally:
        rig.close()


# --------------------------------------------------------------------------- concurrency
def _race(rig, seed: int, n_marks: int = 3000) -> None:
    cap = rig.tracker.capacity_pages
    rng = random.Random(seed)
    marked = np.zeros(cap, dtype=bool)
    union = np.zeros(cap, dtype=bool)
    done = threading.Event()

    def marker():
        for _ in range(n_marks):
            f = rng.randrange(cap)
            l = min(cap - 1, f + rng.randrange(4))  # short ranges over a big map: most pages marked once
            rig.mark(f, l)
            marked[f : l + 1] = True
        done.set()

    collections = 0
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        th = threading.Thread(target=marker)
        th.start()
        while True:  # collect at least once while the marker may still run
            union |= rig.collect()
            collections += 1
            if done.is_set():
                break
        th.join()
    finally:
        sys.setswitchinterval(old)
    union |= rig.collect()
    assert_exact(marked, union)


@pytest.mark.parametrize("buffered", [False, True], ids=["mark", "ring"])
@pytest.mark.parametrize("mode", PUSH_MODES)
def test_push_concurrent_marks_and_collections_lose_nothing(mode, buffered):
    rig = PushRig(mode, [(20000 + 7, 3), (11, 9000), (9100, 9000)], buffered=buffered)
    try:
        _race(rig, seed=int(mode))
        assert rig.stray_writes() == 0
    finally:
        rig.close()


@pytest.mark.parametrize("buffered", [False, True], ids=["mark", "ring"])
@pytest.mark.parametrize("mode", PULL_MODES)
def test_pull_concurrent_marks_and_snapshots_lose_nothing(mode, buffered):
    _race(PullRig(mode, 14, buffered=buffered), seed=int(mode))


# --------------------------------------------------------------------------- the dirty ring
@contextlib.contextmanager
def ring_rig(mode, segments, log_max_pages):
    """A buffered rig: push over ``segments``, pull with ``log_max_pages``; closed after."""
    rig = PushRig(mode, segments, buffered=True) if mode.is_push else PullRig(mode, log_max_pages, buffered=True)
    try:
        yield rig
    finally:
        rig.close()


@pytest.mark.parametrize("mode", PUSH_MODES + PULL_MODES)
def test_ring_takes_short_writes_and_mark_takes_long_ones(mode):
    with ring_rig(mode, [(5, 400)], 10) as rig:
        rig.mark(7, 7)
        rig.mark(20, 22)
        rig.mark(100, 100 + RING_MAX_RUN)  # RING_MAX_RUN + 1 pages: through mark()
        rig.mark(9, 9 + RING_MAX_RUN - 1)
        assert list(rig.tracker.ring) == [7, ~20, 22, ~9, 9 + RING_MAX_RUN - 1]
        assert rig.tracker.marks == 1 + 3 + (RING_MAX_RUN + 1) + RING_MAX_RUN  # drains first
        assert len(rig.tracker.ring) == 0
        want = sorted({7, 20, 21, 22, *range(100, 101 + RING_MAX_RUN), *range(9, 9 + RING_MAX_RUN)})
        assert np.flatnonzero(rig.collect()).tolist() == want


def test_take_ring_leaves_a_run_without_its_last_page():
    ring = array("q", [3, ~10, 12, 5, ~40])
    pages, ends = take_ring(ring)
    assert sorted(pages.tolist()) == [3, 5, 10, 11, 12] and sorted(ends.tolist()) == [3, 5, 12]
    assert list(ring) == [~40]
    ring.append(41)
    pages, ends = take_ring(ring)
    assert pages.tolist() == [40, 41] and ends.tolist() == [41] and len(ring) == 0


@pytest.mark.parametrize("mode", PUSH_MODES + PULL_MODES)
def test_writers_on_several_threads_share_one_ring_and_lose_nothing(mode):
    """The blk VF writes from a pool of threads through one port: runs from two threads must not
    interleave inside the ring (the check reports pages no thread wrote, or misses some)."""
    rig = PushRig(mode, [(11, 9000)], buffered=True) if mode.is_push else PullRig(mode, 14, buffered=True)
    cap = rig.tracker.capacity_pages
    marked = np.zeros(cap, dtype=bool)
    union = np.zeros(cap, dtype=bool)
    lock = threading.Lock()
    threads_left = [2]

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        mine = np.zeros(cap, dtype=bool)
        for _ in range(4000):
            f = rng.randrange(cap - 8)
            l = f + rng.randrange(8)
            rig.mark(f, l)
            mine[f : l + 1] = True
        with lock:
            marked[:] |= mine
            threads_left[0] -= 1

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        ths = [threading.Thread(target=writer, args=(s,)) for s in (1, 2)]
        for t in ths:
            t.start()
        while threads_left[0]:
            union |= rig.collect()
        for t in ths:
            t.join()
    finally:
        sys.setswitchinterval(old)
    union |= rig.collect()
    try:
        assert_exact(marked, union)
    finally:
        rig.close()


@pytest.mark.parametrize("mode", PUSH_MODES)
def test_push_ring_is_invisible_without_the_read_barrier(mode):
    """Negative control: the driver sees the ring's marks only because reading the PF's
    memory drains the ring; without that barrier the collection misses them."""
    rig = PushRig(mode, [(3, 3), (100, 20)], buffered=True)
    try:
        rig.host.remove_read_barrier(rig.tracker.drain)
        with pytest.raises(AssertionError, match="missing"):
            run_rounds(rig, [[(p, p) for p in range(0, 40, 2)]])
    finally:
        rig.close()


@pytest.mark.parametrize("mode", PUSH_MODES + PULL_MODES)
def test_a_full_ring_drains_on_the_writers_thread(mode):
    with ring_rig(mode, [(0, 8192)], 16) as rig:
        for p in range(RING_DRAIN_AT - 1):
            rig.mark(p, p)
        assert len(rig.tracker.ring) == RING_DRAIN_AT - 1
        rig.mark(RING_DRAIN_AT - 1, RING_DRAIN_AT - 1)
        assert len(rig.tracker.ring) == 0  # drained by the write that filled it
        assert np.flatnonzero(rig.collect()).tolist() == list(range(RING_DRAIN_AT))


@pytest.mark.parametrize("mode", PUSH_MODES + PULL_MODES)
def test_ring_overflow_is_the_fail_safe_too(mode):
    with ring_rig(mode, [(5, 3)], 3) as rig:
        cap = rig.tracker.capacity_pages
        rig.mark(1, 1)
        rig.mark(cap + 5, cap + 5)  # one page past the map, through the ring
        assert rig.tracker.overflow_events == 1
        assert rig.collect().all()
        assert not rig.collect().any()
        assert rig.tracker.marks == 2


@pytest.mark.parametrize("mode", PUSH_MODES)
def test_push_ring_closed_goes_into_the_map_and_stops_draining(mode):
    with ring_rig(mode, [(5, 3)], None) as rig:
        rig.mark(2, 2)
        rig.tracker.close()
        assert rig.collect().tolist()[:3] == [False, False, True]
        rig.mark(4, 4)  # after close: nobody drains it on a read any more
        assert not rig.collect().any()


@pytest.mark.parametrize("mode", PUSH_MODES + PULL_MODES)
def test_ring_discarded_never_reaches_the_map(mode):
    with ring_rig(mode, [(5, 3)], 3) as rig:
        rig.mark(2, 2)
        rig.tracker.discard_ring()
        assert not rig.collect().any()


# --------------------------------------------------------------------------- fail-safe
@pytest.mark.parametrize("mode", PUSH_MODES)
def test_push_overflow_sets_whole_map(mode):
    rig = PushRig(mode, [(5, 3), (200, 4)])
    try:
        cap = rig.tracker.capacity_pages
        rig.tracker.mark(2, 2)
        rig.tracker.mark(cap - 1, cap + 3)  # partly beyond the map
        assert rig.tracker.overflow_events == 1
        assert rig.collect().all()
        assert not rig.collect().any()  # one report, then back to exact tracking
        rig.tracker.mark(cap + 100, cap + 100)
        assert rig.tracker.overflow_events == 2
        assert rig.collect().all()
        assert rig.tracker.marks == 1 + 5 + 1
        assert rig.stray_writes() == 0
    finally:
        rig.close()


@pytest.mark.parametrize("mode", PULL_MODES)
@pytest.mark.parametrize("log", [0, 2, 3, 10])
def test_pull_overflow_next_snapshot_all_dirty(mode, log):
    t = PullTracker(mode, log)
    cap = 1 << log
    t.mark(0, 0)
    t.mark(cap, cap)
    assert t.overflow_events == 1
    rep = t.snapshot()
    assert len(rep) == mode.map_bytes(cap)
    assert report_to_pages(rep, cap, bitmap=mode.is_bitmap).all()
    assert t.snapshot() == b""


@pytest.mark.parametrize("mode", PUSH_MODES)
def test_push_map_write_refused_then_whole_map_set(mode):
    rig = PushRig(mode, [(5, 3), (200, 4)])
    try:
        rig.pf_port.bus_master = False
        rig.tracker.mark(1, 1)  # cannot reach the map: not dropped silently
        assert rig.tracker.write_errors == 1
        assert not rig.collect().any()
        rig.pf_port.bus_master = True
        rig.tracker.mark(2, 2)
        assert rig.collect().all()
        rig.tracker.mark(3, 3)
        assert np.flatnonzero(rig.collect()).tolist() == [3]
    finally:
        rig.close()


# --------------------------------------------------------------------------- map table errors
@pytest.fixture
def host_port():
    host = Memory(HOST_SIZE, name="pf-host")
    yield host.device_port("pf")
    host.close()


def test_map_table_empty(host_port):
    with pytest.raises(MapTableError, match="no segment"):
        PushTracker(TrackMode.PUSH_BITMAP, host_port, [])


def test_map_table_zero_length_segment(host_port):
    with pytest.raises(MapTableError, match="length 0"):
        PushTracker(TrackMode.PUSH_BITMAP, host_port, [(0, 8), (64, 0)])


def test_map_table_segment_past_memory_end(host_port):
    with pytest.raises(MapTableError, match="outside"):
        PushTracker(TrackMode.PUSH_BYTEMAP, host_port, [(HOST_SIZE - 4, 5)])


def test_map_table_segment_address_beyond_memory(host_port):
    with pytest.raises(MapTableError, match="outside"):
        PushTracker(TrackMode.PUSH_BYTEMAP, host_port, [(0, 4), (1 << 63, 16)])


def test_map_table_overlapping_segments(host_port):
    with pytest.raises(MapTableError, match="overlap"):
        PushTracker(TrackMode.PUSH_BITMAP, host_port, [(100, 10), (0, 4), (105, 2)])


def test_map_table_error_is_tracking_error_and_writes_nothing(host_port):
    with pytest.raises(TrackingError):
        PushTracker(TrackMode.PUSH_BITMAP, host_port, [(0, 8), (HOST_SIZE, 1)])
    assert not host_port.memory.array.any()


def test_capacity_pages(host_port):
    assert PushTracker(TrackMode.PUSH_BITMAP, host_port, [(0, 3), (10, 5)]).capacity_pages == 64
    assert PushTracker(TrackMode.PUSH_BYTEMAP, host_port, [(0, 3), (10, 5)]).capacity_pages == 8
    assert PullTracker(TrackMode.PULL_BITMAP, 7).capacity_pages == 128


# --------------------------------------------------------------------------- factory / arguments
def test_make_tracker(host_port):
    assert isinstance(make_tracker(TrackMode.PUSH_BYTEMAP, pf_port=host_port, segments=[(0, 4)]), PushTracker)
    t = make_tracker(TrackMode.PULL_BITMAP, log_max_pages=5)
    assert isinstance(t, PullTracker) and t.mode is TrackMode.PULL_BITMAP
    with pytest.raises(ValueError):
        make_tracker(TrackMode.PUSH_BITMAP, log_max_pages=5)
    with pytest.raises(ValueError):
        make_tracker(TrackMode.PULL_BYTEMAP, pf_port=host_port, segments=[(0, 4)])


def test_wrong_kind_of_mode(host_port):
    with pytest.raises(ValueError):
        PushTracker(TrackMode.PULL_BITMAP, host_port, [(0, 4)])
    with pytest.raises(ValueError):
        PullTracker(TrackMode.PUSH_BITMAP, 4)


@pytest.mark.parametrize("mode", PULL_MODES)
def test_pull_log_max_pages_bounds(mode):
    PullTracker(mode, max_log_pages(mode))  # allocates lazily: cheap
    with pytest.raises(ValueError):
        PullTracker(mode, max_log_pages(mode) + 1)
    with pytest.raises(ValueError):
        PullTracker(mode, -1)
    assert mode.map_bytes(1 << max_log_pages(mode)) <= (1 << 32) - 1 < mode.map_bytes(1 << (max_log_pages(mode) + 1))


def test_mark_bad_range():
    t = PullTracker(TrackMode.PULL_BYTEMAP, 4)
    with pytest.raises(ValueError):
        t.mark(5, 4)
    with pytest.raises(ValueError):
        t.mark(-1, 0)
    assert t.marks == 0


# --------------------------------------------------------------------------- report_to_pages
def test_report_shorter_than_memory_rest_clean():
    assert np.flatnonzero(report_to_pages(b"\x81", 20, bitmap=True)).tolist() == [0, 7]
    assert np.flatnonzero(report_to_pages(b"\x00\x01", 20, bitmap=False)).tolist() == [1]
    assert not report_to_pages(b"", 20, bitmap=True).any()


def test_report_longer_with_zero_tail_ok():
    assert np.flatnonzero(report_to_pages(b"\x01\x00\x00", 3, bitmap=True)).tolist() == [0]
    assert np.flatnonzero(report_to_pages(b"\x00\x00\x01\x00\x00", 3, bitmap=False)).tolist() == [2]


def test_report_bitmap_byte_past_memory_dirty():
    with pytest.raises(DirtyReportError):
        report_to_pages(b"\x01\x00\x04", 16, bitmap=True)


def test_report_bitmap_padding_bit_past_memory_dirty():
    with pytest.raises(DirtyReportError):
        report_to_pages(b"\x00\x08", 11, bitmap=True)  # page 11 in a 11-page memory
    assert report_to_pages(b"\x00\x04", 11, bitmap=True)[10]


def test_report_bytemap_byte_past_memory_dirty():
    with pytest.raises(DirtyReportError):
        report_to_pages(b"\x00\x00\x00\x01", 3, bitmap=False)


def test_report_not_strict_means_all_dirty():
    assert report_to_pages(b"\x00\x00\x00\x01", 3, bitmap=False, strict=False).all()
    assert report_to_pages(b"\x00\x08", 11, bitmap=True, strict=False).all()


def test_report_bytemap_any_nonzero_is_dirty():
    assert np.flatnonzero(report_to_pages(b"\x00\x02\xff", 3, bitmap=False)).tolist() == [1, 2]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.booleans(), max_size=100), st.integers(0, 8))
def test_report_roundtrip(pages, extra):
    arr = np.array(pages, dtype=bool)
    n = len(arr) + extra
    want = np.zeros(n, dtype=bool)
    want[: len(arr)] = arr
    bm = np.packbits(arr, bitorder="little").tobytes()
    assert (report_to_pages(bm, n, bitmap=True) == want).all()
    assert (report_to_pages(arr.astype(np.uint8).tobytes(), n, bitmap=False) == want).all()


@pytest.mark.parametrize("mode", PUSH_MODES)
def test_a_push_map_another_process_can_read_gets_no_ring(mode):
    """A memfd (or a vfio-user client's DMA region) is read by another process, past any read
    barrier: the push tracker writes such a map at each mark, and the map is exact at once."""
    with Memory(HOST_SIZE, name="pf-host", backing="memfd") as host:
        t = PushTracker(mode, host.device_port("pf"), [(5, 40)], buffered=True)
        assert t.ring is None
        w = DeviceWriter("vf")
        w.tracker = t
        w.written(3, 3, 1)
        raw = bytes(host.array[5:45])  # read as another process would: no drain involved
        assert np.flatnonzero(report_to_pages(raw, t.capacity_pages, bitmap=mode.is_bitmap)).tolist() == [3]
        with pytest.raises(ValueError, match="another process"):
            host.add_read_barrier(t.drain)


def test_a_push_map_in_a_guest_memory_map_gets_no_ring():
    with Memory(1 << 20, name="client", backing="memfd") as client:
        gm = GuestMemoryMap("pf.guest")
        gm.set_table([MemRegion(0, 1 << 20, 0x7000_0000, 0)], [os.dup(client.fd)])
        try:
            t = PushTracker(TrackMode.PUSH_BITMAP, MemoryPort(gm, DeviceWriter("pf")), [(64, 8)], buffered=True)
            assert t.ring is None
            t.mark(9, 9)
            assert client.read(64 + 1, 1) == b"\x02"
        finally:
            gm.close()
