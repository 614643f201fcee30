"""Platform (IOMMU-style) dirty tracking for the virtio-1.4 profile: exactness.

The same exactness the seed's four device-tracking modes are held to
(tests/test_pf_driver.py): exact over rounds against an independent oracle,
device DMA through a real queue, writes racing with read-and-clear; plus
negative controls (CPU writes, another device, tracking off) and one test
per refused request.
"""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest

from helpers import MEM_SIZE, check_result, make_rig
from virtio_lm.errors import PlatformTrackingError
from virtio_lm.memory import PAGE_SIZE, Memory
from virtio_lm.memory.iommu import IommuDirtyDomain
from virtio_lm.memory.dirty import DirtyLog

GUEST = MEM_SIZE + 3 * PAGE_SIZE  # 1027 pages: the last bitmap word is partial
PAGES = GUEST // PAGE_SIZE


def random_writes(rng: random.Random, size: int, count: int) -> list[tuple[int, int]]:
    out = [(0, 1), (size - 1, 1), (size - PAGE_SIZE - 10, 20)]
    for _ in range(count):
        length = rng.choice([1, 8, 100, PAGE_SIZE - 1, PAGE_SIZE, PAGE_SIZE + 1, 3 * PAGE_SIZE + 5])
        out.append((rng.randrange(0, size - length + 1), length))
    rng.shuffle(out)
    return out[: max(1, count)]


def oracle(writes: list[tuple[int, int]], num_pages: int) -> np.ndarray:
    want = np.zeros(num_pages, dtype=bool)
    for addr, length in writes:
        for p in range(addr // PAGE_SIZE, (addr + length - 1) // PAGE_SIZE + 1):
            want[p] = True
    return want


def bitmap_pages(bitmap: bytes, count: int) -> np.ndarray:
    """Decode independently of the tracker: bit p of le64 word p // 64."""
    out = np.zeros(count, dtype=bool)
    for p in range(count):
        word = int.from_bytes(bitmap[8 * (p // 64) : 8 * (p // 64) + 8], "little")
        out[p] = bool(word >> (p % 64) & 1)
    return out


def collect(dom: IommuDirtyDomain) -> np.ndarray:
    return bitmap_pages(dom.get_dirty_bitmap(0, dom.num_pages * PAGE_SIZE), dom.num_pages)


@pytest.fixture
def mem():
    m = Memory(GUEST, name="vm")
    yield m
    m.close()


def test_platform_tracking_is_exact_over_rounds(mem):
    vf, other = mem.device_port("vf1"), mem.device_port("vf2")
    dom = IommuDirtyDomain(vf)
    dom.set_dirty_tracking(True)
    assert dom.num_pages == PAGES
    rng = random.Random(4242)
    assert not collect(dom).any()  # negative control: nothing written yet
    for rnd in range(6):
        writes = random_writes(rng, GUEST, rng.randrange(1, 60)) if rnd != 3 else []
        for addr, length in writes:
            vf.write(addr, bytes([rnd + 1]) * length)
        for addr, length in random_writes(rng, GUEST, 20):  # the VM's CPU: not the device's pages
            mem.cpu.write(addr, b"\xcc" * length)
        for addr, length in random_writes(rng, GUEST, 10):  # another device: its own domain, not this one
            other.write(addr, b"\xdd" * length)
        got, want = collect(dom), oracle(writes, PAGES)
        assert not (want & ~got).any(), f"missing pages {np.flatnonzero(want & ~got)}"
        assert not (got & ~want).any(), f"extra pages {np.flatnonzero(got & ~want)}"


def test_platform_tracking_sees_device_dma_through_a_real_queue():
    """A VF's device writes through a real virtqueue: data buffers and used ring are dirty."""
    rig = make_rig()
    try:
        dom = IommuDirtyDomain(rig.fn.port)
        dom.set_dirty_tracking(True)
        rng = random.Random(9)
        dq = rig.dq
        for _ in range(3):
            reqs = [rig.fill(rng.randrange(1 << 30), rng.randrange(1, 3 * PAGE_SIZE)) for _ in range(rng.randrange(1, 8))]
            rig.kick()
            rig.wait_idle()
            done = rig.reap()
            assert len(done) == len(reqs)
            for req, used_len in done:
                check_result(rig.mem, req, used_len)
            want = oracle([(r.buf_addr, r.wlen) for r in reqs] + [(dq.used_addr, 4)], dom.num_pages)
            assert np.array_equal(collect(dom), want)
    finally:
        rig.close()


def test_platform_tracking_races_with_read_and_clear(mem):
    port = mem.device_port("vf1")
    dom = IommuDirtyDomain(port)
    dom.set_dirty_tracking(True)
    writes = random_writes(random.Random(77), GUEST, 400)
    done = threading.Event()

    def dma() -> None:
        try:
            for addr, length in writes:
                port.write(addr, b"\x5a" * length)
        finally:
            done.set()

    t = threading.Thread(target=dma)
    want = oracle(writes, PAGES)
    union = np.zeros(PAGES, dtype=bool)
    t.start()
    while not done.is_set():
        got = collect(dom)
        assert not (got & ~want).any(), "a page never written was reported"
        union |= got
    t.join(20)
    union |= collect(dom)
    assert np.array_equal(union, want), f"missing {np.flatnonzero(want & ~union)}"
    assert not collect(dom).any()


def test_no_clear_leaves_the_bits_and_a_sub_range_clears_only_itself(mem):
    port = mem.device_port("vf1")
    dom = IommuDirtyDomain(port)
    dom.set_dirty_tracking(True)
    port.write(5 * PAGE_SIZE, b"x")
    port.write(700 * PAGE_SIZE, b"y")
    assert list(np.flatnonzero(bitmap_pages(dom.get_dirty_bitmap(0, PAGES * PAGE_SIZE, no_clear=True), PAGES))) == [5, 700]
    sub = dom.get_dirty_bitmap(512 * PAGE_SIZE, 512 * PAGE_SIZE)
    assert len(sub) == 64 and list(np.flatnonzero(bitmap_pages(sub, 512))) == [700 - 512]
    assert list(np.flatnonzero(collect(dom))) == [5]


def test_tracking_off_records_nothing_and_restarts_clean(mem):
    port = mem.device_port("vf1")
    dom = IommuDirtyDomain(port)
    port.write(0, b"before")  # not tracking yet
    dom.set_dirty_tracking(True)
    assert not collect(dom).any()
    port.write(3 * PAGE_SIZE, b"x")
    dom.set_dirty_tracking(False)
    port.write(4 * PAGE_SIZE, b"x")
    dom.set_dirty_tracking(True)
    assert not collect(dom).any()  # the bits of the earlier session were dropped


def test_the_device_tracker_slot_stays_the_devices(mem):
    """The platform tracker sits beside the device's own tracker; both see the write."""
    port = mem.device_port("vf1")
    own = DirtyLog(PAGES, enabled=True)
    port.writer.tracker = own
    dom = IommuDirtyDomain(port)
    dom.set_dirty_tracking(True)
    port.write(9 * PAGE_SIZE, b"z")
    assert list(np.flatnonzero(own.collect())) == [9]
    assert list(np.flatnonzero(collect(dom))) == [9]
    dom.detach()
    port.write(10 * PAGE_SIZE, b"z")
    assert port.writer.platform is None and list(np.flatnonzero(own.collect())) == [10]


def test_bitmap_refused_while_tracking_is_off(mem):
    dom = IommuDirtyDomain(mem.device_port("vf1"))
    with pytest.raises(PlatformTrackingError, match="off"):
        dom.get_dirty_bitmap(0, PAGE_SIZE)


@pytest.mark.parametrize(
    "iova,length",
    [(1, PAGE_SIZE), (0, PAGE_SIZE + 1), (0, 0), (-PAGE_SIZE, PAGE_SIZE)],
    ids=["iova_unaligned", "length_unaligned", "empty", "negative"],
)
def test_bitmap_refused_for_a_range_not_page_aligned(mem, iova, length):
    dom = IommuDirtyDomain(mem.device_port("vf1"))
    dom.set_dirty_tracking(True)
    with pytest.raises(PlatformTrackingError, match="page-aligned"):
        dom.get_dirty_bitmap(iova, length)


def test_bitmap_refused_for_a_range_past_the_domain(mem):
    dom = IommuDirtyDomain(mem.device_port("vf1"))
    dom.set_dirty_tracking(True)
    with pytest.raises(PlatformTrackingError, match="past"):
        dom.get_dirty_bitmap(PAGE_SIZE, PAGES * PAGE_SIZE)


def test_a_cpu_port_has_no_iommu(mem):
    with pytest.raises(PlatformTrackingError, match="device"):
        IommuDirtyDomain(mem.cpu)


def test_a_port_takes_one_platform_tracker(mem):
    port = mem.device_port("vf1")
    IommuDirtyDomain(port)
    with pytest.raises(PlatformTrackingError, match="already attached"):
        IommuDirtyDomain(port)


def test_a_ring_tracker_beside_the_platform_tracker_takes_marks_directly(mem):
    """With a platform tracker attached the writer calls every sink's mark: the device tracker's
    dirty ring is bypassed (both see each write at once), and it is used again after detach."""
    from virtio_lm.pf.tracking import PullTracker
    from virtio_lm.wire.ctrl import TrackMode

    port = mem.device_port("vf1")
    own = PullTracker(TrackMode.PULL_BYTEMAP, 12, buffered=True)
    port.writer.tracker = own
    port.write(2 * PAGE_SIZE, b"a")
    assert list(own.ring) == [2]
    dom = IommuDirtyDomain(port)
    dom.set_dirty_tracking(True)
    port.write(9 * PAGE_SIZE, b"z")
    assert list(own.ring) == [2]  # 9 went through mark()
    assert list(np.flatnonzero(collect(dom))) == [9]
    dom.detach()
    port.write(11 * PAGE_SIZE, b"z")
    assert list(own.ring) == [2, 11]
    assert own.snapshot() == bytes([0, 0, 1] + [0] * 6 + [1, 0, 1])
