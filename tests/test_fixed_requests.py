"""Standing chains (``DriverQueue.add_standing`` / ``post`` / ``take_used``), the bench driver built
on them (``FixedRequests``), and the blk VF served by the C fast path on a plain ``Memory``."""

from __future__ import annotations

import numpy as np
import pytest
from test_devices_blk_migration import make_host

from virtio_lm.devices.blk import BlkDevice
from virtio_lm.drivers.blk_driver import BlkDriver, FixedRequests
from virtio_lm.errors import DriverError, QueueFullError, UsedRingError
from virtio_lm.memory import DirtyLog, Memory
from virtio_lm.pci import VirtioPciFunction
from virtio_lm.virtqueue import Allocator, DriverQueue, Segment
from virtio_lm.wire.blk import BlkReqType
from virtio_lm.wire.ctrl import TrackMode
from virtio_lm.wire.codec import read_u16, u16
from virtio_lm.wire.ring import VirtqUsedElem

MEM = 1 << 20


def make(size: int = 8) -> tuple[Memory, Allocator, DriverQueue]:
    mem = Memory(MEM)
    a = Allocator(0, MEM)
    return mem, a, DriverQueue.allocate(mem.cpu, a, size)


def avail_entries(mem: Memory, dq: DriverQueue) -> list[int]:
    return [read_u16(mem.read(dq.avail_addr + 4 + 2 * i, 2)) for i in range(dq.size)]


def use(mem: Memory, dq: DriverQueue, entries: list[tuple[int, int]]) -> None:
    """Play the device: append ``(head, len)`` entries to the used ring and publish them."""
    idx = read_u16(mem.read(dq.used_addr + 2, 2))
    for head, n in entries:
        mem.cpu.write(dq.used_addr + 4 + 8 * (idx % dq.size), VirtqUsedElem(head, n).encode())
        idx = (idx + 1) & 0xFFFF
    mem.cpu.write(dq.used_addr + 2, u16(idx))


# ====================================================================== standing chains
def test_a_standing_chain_is_written_once_and_not_placed_until_posted():
    mem, a, dq = make()
    h = dq.add_standing([Segment(0x10000, 16)], [Segment(0x10010, 1)], token="s")
    assert dq.num_free() == 6 and dq.in_flight() == 0
    dq.publish()
    assert read_u16(mem.read(dq.avail_addr + 2, 2)) == 0  # nothing was placed
    dq.post([h])
    dq.publish()
    assert read_u16(mem.read(dq.avail_addr + 2, 2)) == 1 and avail_entries(mem, dq)[0] == h
    assert dq.in_flight() == 1


def test_post_writes_a_run_of_heads_and_wraps_the_ring():
    mem, a, dq = make(4)
    dq.set_start_index(3)  # the run starts in the last slot
    heads = [dq.add_standing([Segment(0x10000, 1)], [], token=i) for i in range(3)]
    dq.post(heads)
    dq.publish()
    ring = avail_entries(mem, dq)
    assert [ring[3], ring[0], ring[1]] == heads
    assert read_u16(mem.read(dq.avail_addr + 2, 2)) == 6


@pytest.mark.parametrize("case", ["not standing", "already posted", "twice in one post"])
def test_post_refuses_a_head_it_cannot_post_and_places_nothing(case):
    mem, a, dq = make()
    h1 = dq.add_standing([Segment(0x10000, 1)], [], token=1)
    h2 = dq.add_standing([Segment(0x10000, 1)], [], token=2)
    other = dq.add([Segment(0x10000, 1)], [], token=3)  # an ordinary chain, placed
    if case == "already posted":
        dq.post([h1])
    before = (avail_entries(mem, dq), dq.in_flight())
    bad = {"not standing": [h2, other], "already posted": [h2, h1], "twice in one post": [h2, h2]}[case]
    with pytest.raises(DriverError):
        dq.post(bad)
    assert (avail_entries(mem, dq), dq.in_flight()) == before
    dq.post([h2])  # h2 is still standing: nothing of the refused post stuck


def test_post_refuses_more_than_the_ring_holds():
    mem, a, dq = make(4)
    heads = [dq.add_standing([Segment(0x10000, 1)], [], token=i) for i in range(4)]
    dq.post(heads[:2])
    with pytest.raises(QueueFullError):
        dq.post(heads[1:])  # 2 pending + 3 > 4 (checked before the heads)
    dq.post(heads[2:])
    assert dq.in_flight() == 4


def test_take_used_stands_standing_chains_again_and_frees_the_others():
    mem, a, dq = make()
    s = dq.add_standing([Segment(0x10000, 16)], [Segment(0x10010, 1)], token="s")
    o = dq.add([Segment(0x10000, 1)], [], token="o")
    dq.post([s])
    dq.publish()
    use(mem, dq, [(o, 0), (s, 1)])
    assert dq.take_used() == [("o", 0), ("s", 1)]
    assert dq.num_free() == 6  # o's descriptor back; s's two still held
    assert dq.take_used() == []
    dq.post([s])  # s stands again: it can be posted again, with its descriptors as written
    dq.publish()
    use(mem, dq, [(s, 1)])
    assert dq.get_used() == ("s", 1)  # get_used stands it again too
    dq.post([s])


def test_take_used_reads_a_run_that_wraps_the_used_ring_and_the_u16_index():
    mem, a, dq = make(4)
    dq.set_start_index(0xFFFE)
    heads = [dq.add_standing([Segment(0x10000, 1)], [], token=i) for i in range(4)]
    dq.post(heads)
    dq.publish()
    use(mem, dq, [(h, 10 + h) for h in reversed(heads)])  # slots 2, 3, 0, 1; idx 0xFFFE -> 2
    assert dq.take_used() == [(h, 10 + h) for h in reversed(heads)]
    assert dq.last_used_idx == 2


def test_take_used_refuses_a_head_not_in_flight_after_taking_the_entries_before_it():
    mem, a, dq = make()
    s = dq.add_standing([Segment(0x10000, 1)], [], token="s")
    dq.post([s])
    dq.publish()
    use(mem, dq, [(s, 0), (7, 0)])
    with pytest.raises(UsedRingError):
        dq.take_used()
    assert dq.last_used_idx == 1  # the good entry was taken
    dq.post([s])  # and s stands again


def test_take_used_refuses_a_used_idx_too_far_ahead():
    mem, a, dq = make()
    mem.cpu.write(dq.used_addr + 2, u16(9))
    with pytest.raises(UsedRingError):
        dq.take_used()
    assert dq.last_used_idx == 0


def test_release_standing_frees_and_save_waits_for_it():
    mem, a, dq = make()
    s = dq.add_standing([Segment(0x10000, 1)] * 3, [], indirect=True, token="s")
    with pytest.raises(DriverError):
        dq.save()
    dq.post([s])
    with pytest.raises(DriverError):
        dq.release_standing(s)  # posted: not releasable
    dq.publish()
    use(mem, dq, [(s, 0)])
    dq.take_used()
    before = a.free_bytes()
    dq.release_standing(s)
    assert dq.num_free() == 8 and a.free_bytes() == before + 3 * 16
    assert dq.save().free  # saved once nothing stands


# ====================================================================== FixedRequests on a blk VF
IMAGE = 4 << 20
GUEST = 16 << 20


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.raw"
    path.write_bytes(np.random.default_rng(3).integers(0, 256, IMAGE, dtype=np.uint8).tobytes())
    return path


class Vf:
    def __init__(self, path, *, direct: bool, fast: bool = True, barrier: bool = False) -> None:
        self.dev = BlkDevice(path, num_queues=2)
        self.dev.direct_dma = direct
        self.dev.fast_path = fast
        self.mem = Memory(GUEST, name="guest")
        if barrier:
            self.drains = 0

            def drain() -> None:
                self.drains += 1

            self.mem.add_read_barrier(drain)
        self.fn = VirtioPciFunction(self.dev, self.mem.device_port("vf"), name="vf")
        self.tracker = DirtyLog(self.mem.num_pages, enabled=True)
        self.fn.port.writer.tracker = self.tracker
        self.drv = BlkDriver(self.fn, self.mem.cpu, Allocator(0x1000, GUEST - 0x1000), queue_size=64)

    def close(self) -> None:
        self.dev.close()
        self.mem.close()


@pytest.fixture
def vfs():
    made: list[Vf] = []

    def mk(path, **kw) -> Vf:
        made.append(Vf(path, **kw))
        return made[-1]

    yield mk
    for v in made:
        v.close()


def run_all(fr: FixedRequests, sectors: list[int]) -> list[tuple[int, int]]:
    """Submit every sector (as slots free up) and wait; ``(slot, sector)`` of each, in order."""
    out: list[tuple[int, int]] = []
    todo = list(sectors)
    busy: dict[int, int] = {}
    while todo or fr.in_flight():
        if todo and fr.idle():
            slots = fr.submit(todo[: fr.idle()])
            for s, sec in zip(slots, todo):
                busy[s] = sec
            del todo[: len(slots)]
        for s in fr.reap():
            out.append((s, busy.pop(s)))
        if fr.in_flight() and not todo:
            fr.drv.wait_interrupt(0.01)
    return out


def mismatches(vf: Vf, fr: FixedRequests, slot: int, sector: int, image) -> int:
    """Bytes of slot ``slot``'s buffer that differ from the image at ``sector``."""
    want = np.frombuffer(image.read_bytes()[sector * 512 : sector * 512 + fr.size], dtype=np.uint8)
    got = np.frombuffer(vf.mem.read(fr.buffer(slot), fr.size), dtype=np.uint8)
    return int(np.count_nonzero(want != got))


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_fixed_reads_bring_the_images_bytes(vfs, image, direct):
    vf = vfs(image, direct=direct)
    fr = FixedRequests(vf.drv, 0, 8, 4096, BlkReqType.IN)
    sectors = (np.random.default_rng(5).integers(0, IMAGE // 4096, 8) * 8).tolist()
    for slot, sector in run_all(fr, sectors):
        assert mismatches(vf, fr, slot, sector, image) == 0
    assert fr.completed == 8 and fr.failed == 0
    assert (vf.dev.fast_served > 0) is direct  # the C path serves a VF only with direct DMA


def test_the_data_check_sees_one_wrong_byte(vfs, image):
    """Negative control for the comparison above."""
    vf = vfs(image, direct=True)
    fr = FixedRequests(vf.drv, 0, 1, 4096, BlkReqType.IN)
    ((slot, sector),) = run_all(fr, [64])
    assert mismatches(vf, fr, slot, sector, image) == 0
    b = vf.mem.read(fr.buffer(slot) + 100, 1)[0]
    vf.mem.cpu.write(fr.buffer(slot) + 100, bytes([b ^ 1]))
    assert mismatches(vf, fr, slot, sector, image) == 1


def test_fixed_writes_land_in_the_image(vfs, image):
    vf = vfs(image, direct=True)
    fill = bytes(range(256)) * 16
    fr = FixedRequests(vf.drv, 1, 4, 4096, BlkReqType.OUT, fill=fill)
    run_all(fr, [0, 80, 800, 8000])
    assert fr.completed == 4 and fr.failed == 0
    data = image.read_bytes()
    for sector in (0, 80, 800, 8000):
        assert data[sector * 512 : sector * 512 + 4096] == fill


def test_a_request_the_device_refuses_counts_as_failed(vfs, image):
    vf = vfs(image, direct=True)
    fr = FixedRequests(vf.drv, 0, 2, 4096, BlkReqType.IN)
    run_all(fr, [0, IMAGE // 512])  # the second starts at the end of the disk: IOERR
    assert (fr.completed, fr.failed) == (1, 1)


def test_a_lent_queue_is_left_alone_until_closed(vfs, image):
    vf = vfs(image, direct=True)
    drv = vf.drv
    fr = FixedRequests(drv, 0, 2, 4096, BlkReqType.IN)
    with pytest.raises(DriverError):
        FixedRequests(drv, 0, 2, 4096, BlkReqType.IN)
    with pytest.raises(DriverError):
        drv.submit_read(0, 8, queue=0)
    t = drv.submit_read(0, 8)  # round robin skips queue 0
    assert drv.wait(t).queue == 1
    fr.submit([0, 8], kick=False)
    with pytest.raises(DriverError):
        drv.save()
    with pytest.raises(DriverError):
        fr.close()  # two in flight
    drv.kick(0)
    assert drv.reap() == []  # the lent queue's completions are fr's
    while fr.in_flight():
        fr.reap()
        drv.wait_interrupt(0.01)
    assert fr.completed == 2
    fr.close()
    drv.save()
    assert drv.read(8, 8) == image.read_bytes()[4096:8192]


def test_fixed_requests_refuse_bad_shapes(vfs, image):
    vf = vfs(image, direct=True)
    for args in ((0, 0, 4096, BlkReqType.IN), (0, 2, 100, BlkReqType.IN), (0, 2, 4096, BlkReqType.FLUSH),
                 (5, 2, 4096, BlkReqType.IN)):
        with pytest.raises(DriverError):
            FixedRequests(vf.drv, *args)
    with pytest.raises(DriverError):
        FixedRequests(vf.drv, 0, 2, 4096, BlkReqType.OUT, fill=b"short")
    FixedRequests(vf.drv, 0, 2, 4096, BlkReqType.IN).close()  # nothing was lent by the refusals


# ====================================================================== the VF's fast path and the dirty log
def dirty_after_reads(vf: Vf) -> np.ndarray:
    fr = FixedRequests(vf.drv, 0, 16, 8192, BlkReqType.IN)
    vf.tracker.collect()  # only the reads' pages from here on
    run_all(fr, (np.arange(16) * 64).tolist())
    return vf.tracker.collect()


def test_the_fast_path_marks_the_pages_the_python_path_marks(vfs, image):
    fast, slow = vfs(image, direct=True), vfs(image, direct=True, fast=False)
    a, b = dirty_after_reads(fast), dirty_after_reads(slow)
    assert fast.dev.fast_served == 16 and slow.dev.fast_served == 0
    assert a.any() and np.array_equal(a, b)


def test_negative_control_a_fast_path_that_tells_no_writes_is_caught(vfs, image, monkeypatch):
    monkeypatch.setattr(Memory, "tell_written", lambda self, writer, written, nbytes: None)
    fast, slow = vfs(image, direct=True), vfs(image, direct=True, fast=False)
    assert not np.array_equal(dirty_after_reads(fast), dirty_after_reads(slow))


def test_a_memory_with_a_read_barrier_keeps_the_python_path(vfs, image):
    vf = vfs(image, direct=True, barrier=True)
    with vf.mem.device_port("x").pinned() as regions:
        assert regions is None
    fr = FixedRequests(vf.drv, 0, 4, 4096, BlkReqType.IN)
    for slot, sector in run_all(fr, [0, 8, 16, 24]):
        assert mismatches(vf, fr, slot, sector, image) == 0
    assert vf.dev.fast_served == 0 and vf.drains > 0


def test_tell_written_without_a_list_marks_every_page():
    mem = Memory(1 << 20)
    port = mem.device_port("d")
    log = DirtyLog(mem.num_pages, enabled=True)
    port.writer.tracker = log
    with port.pinned() as regions:
        assert regions is not None and regions[0][0] == 0 and len(regions[0][1]) == mem.size
    port.tell_written(None, 10)
    assert log.collect().all() and port.writer.bytes_written == 10


# ====================================================================== the proposal's tracking sees the fast path
class DirectBlkDevice(BlkDevice):
    """A blk VF with direct DMA: reads and writes served by the C fast path."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.direct_dma = True


def tracked_read_pages(tmp_path, image, mode: TrackMode) -> tuple[np.ndarray, np.ndarray, int]:
    """(dirty pages the PF reported, pages of the read buffers, chains served in C) after 16
    reads of 8 KiB by a VF of a real PF, with ``mode`` tracking on."""
    host = make_host("h", image, DirectBlkDevice)
    try:
        drv = BlkDriver(host.vf, host.guest.cpu, Allocator(0x1000, (16 << 20) - 0x1000))
        fr = FixedRequests(drv, 0, 16, 8192, BlkReqType.IN)
        host.pfd.start_tracking(1, mode)
        host.pfd.collect_dirty(1)  # from here on: the reads only
        run_all(fr, (np.arange(16) * 16).tolist())
        dirty = host.pfd.collect_dirty(1)
        bufs = np.zeros_like(dirty)
        bufs[fr.buffer(0) >> 12 : (fr.buffer(15) + 8192) >> 12] = True
        served = host.dev.fast_served
        host.pfd.stop_tracking(1)
        fr.close()
        return dirty, bufs, served
    finally:
        host.close()


@pytest.mark.parametrize("mode", list(TrackMode), ids=lambda m: m.name)
def test_the_pfs_dirty_tracking_sees_every_page_the_fast_path_writes(tmp_path, image, mode):
    dirty, bufs, served = tracked_read_pages(tmp_path, image, mode)
    assert served == 16
    assert dirty[bufs].all()


def test_negative_control_tracking_misses_the_pages_when_the_fast_path_tells_nothing(tmp_path, image, monkeypatch):
    monkeypatch.setattr(Memory, "tell_written", lambda self, writer, written, nbytes: None)
    dirty, bufs, served = tracked_read_pages(tmp_path, image, TrackMode.PULL_BITMAP)
    assert served == 16 and not dirty[bufs].any()
