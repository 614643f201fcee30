"""virtio-blk VF device model against the guest driver written from the spec.

Every request type, success and error paths; limits (seg_max, size_max,
blk_size, discard / write-zeroes), read-only images, malformed chains (the
device keeps serving), multiqueue, many requests in flight, and device DMA
seen by the VF port's dirty tracker.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np
import pytest

from virtio_lm.devices.blk import BlkDevice, blk_features
from virtio_lm.drivers.blk_driver import DEFAULT_FEATURES, BlkDriver
from virtio_lm.errors import BlkIOError
from virtio_lm.memory import PAGE_SHIFT, Memory
from virtio_lm.memory.dirty import DirtyLog
from virtio_lm.pci import VirtioPciFunction
from virtio_lm.virtqueue.driver import Allocator
from virtio_lm.wire.blk import (
    BlkFeature,
    BlkOutHdr,
    BlkReqType,
    BlkStatus,
    SegmentFlags,
)
from virtio_lm.wire.features import bit

IMAGE_SIZE = 4 << 20
SECTORS = IMAGE_SIZE >> 9
MEM_SIZE = 16 << 20


def pattern(seed: int, n: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.raw"
    path.write_bytes(pattern(1, IMAGE_SIZE))
    return path


def file_bytes(path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


@dataclass
class Rig:
    mem: Memory
    fn: VirtioPciFunction
    dev: BlkDevice
    drv: BlkDriver
    tracker: DirtyLog


class GatedBlkDevice(BlkDevice):
    """Back-end work waits for ``gate`` (deterministic 'in flight' without timing)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.gate = threading.Event()

    def handle(self, fn, queue, chain):
        work = super().handle(fn, queue, chain)
        if not callable(work):
            return work

        def gated():
            self.gate.wait(30)
            return work()

        return gated


@pytest.fixture
def make(image):
    rigs: list[Rig] = []

    def _make(dev_cls=BlkDevice, *, path=None, features=DEFAULT_FEATURES, drv_queues=None, queue_size=None, **kw):
        dev = dev_cls(path or image, **kw)
        mem = Memory(MEM_SIZE, name="guest")
        fn = VirtioPciFunction(dev, mem.device_port("vf1"), name="vf1")
        tracker = DirtyLog(mem.num_pages, enabled=True)
        fn.port.writer.tracker = tracker
        drv = BlkDriver(fn, mem.cpu, Allocator(0x1000, MEM_SIZE - 0x1000), features=features,
                        num_queues=drv_queues, queue_size=queue_size)
        rig = Rig(mem, fn, dev, drv, tracker)
        rigs.append(rig)
        return rig

    yield _make
    for r in rigs:
        if isinstance(r.dev, GatedBlkDevice):
            r.dev.gate.set()
        r.dev.close()
        r.mem.close()


def status_of(exc_info) -> BlkStatus:
    return exc_info.value.status


# ============================================================================ features / config
def test_features_offered_never_bit_15(make):
    r = make()
    offered = r.fn.offered_features()
    assert not offered & bit(BlkFeature.CTRL_VQ)
    assert not offered & bit(BlkFeature.RO)
    for f in (BlkFeature.SEG_MAX, BlkFeature.SIZE_MAX, BlkFeature.BLK_SIZE, BlkFeature.FLUSH,
              BlkFeature.MQ, BlkFeature.DISCARD, BlkFeature.WRITE_ZEROES):
        assert offered & bit(f), f.name
    assert blk_features(read_only=True) & bit(BlkFeature.RO)


def test_config_space_as_the_driver_reads_it(make):
    r = make(seg_max=8, size_max=8192)
    cfg = r.drv.read_config()
    assert cfg.capacity == SECTORS
    assert (cfg.seg_max, cfg.size_max, cfg.blk_size, cfg.num_queues) == (8, 8192, 512, 1)
    assert cfg == r.dev.config
    assert r.drv.max_transfer == 8 * 8192


def test_config_is_read_only(make):
    r = make()
    from virtio_lm.errors import RegisterAccessError

    with pytest.raises(RegisterAccessError):
        r.fn.device_config_write(0, 4, 1)


# ============================================================================ IN / OUT
def test_read_returns_image_bytes(make, image):
    r = make()
    assert r.drv.read(100, 16) == file_bytes(image, 100 * 512, 16 * 512)


def test_write_lands_in_image_and_reads_back(make, image):
    r = make()
    data = pattern(7, 3 * 4096)
    r.drv.write(64, data)
    assert file_bytes(image, 64 * 512, len(data)) == data
    assert r.drv.read(64, len(data) >> 9) == data


def test_large_io_split_by_size_max(make, image):
    r = make(seg_max=16, size_max=16384)
    data = pattern(8, 128 << 10)  # 8 segments of 16 KiB
    r.drv.write(0, data)
    assert r.drv.read(0, 256) == data == file_bytes(image, 0, len(data))


def test_read_beyond_capacity_ioerr_and_device_keeps_serving(make):
    r = make()
    with pytest.raises(BlkIOError) as ei:
        r.drv.read(SECTORS - 4, 8)  # straddles the end
    assert status_of(ei) == BlkStatus.IOERR
    with pytest.raises(BlkIOError):
        r.drv.read(SECTORS, 1)
    assert len(r.drv.read(SECTORS - 1, 1)) == 512
    assert not r.fn.needs_reset


def test_write_beyond_capacity_ioerr_file_unchanged(make, image):
    r = make()
    before = file_bytes(image, IMAGE_SIZE - 4096, 4096)
    with pytest.raises(BlkIOError) as ei:
        r.drv.write(SECTORS - 4, pattern(2, 4096))
    assert status_of(ei) == BlkStatus.IOERR
    assert os.path.getsize(image) == IMAGE_SIZE
    assert file_bytes(image, IMAGE_SIZE - 4096, 4096) == before


def test_huge_sector_number_ioerr(make):
    r = make()
    with pytest.raises(BlkIOError):
        r.drv.read(2**64 - 1, 1)


def test_data_not_whole_sectors_ioerr(make):
    r = make()
    t = r.drv.submit(BlkReqType.IN, 0, read_len=100)
    assert r.drv.wait(t).status == BlkStatus.IOERR
    t = r.drv.submit(BlkReqType.OUT, 0, data=b"x" * 700)
    assert r.drv.wait(t).status == BlkStatus.IOERR


def test_blk_size_4096_alignment(make, tmp_path):
    r = make(blk_size=4096)
    assert r.drv.block_size == 4096
    data = pattern(3, 8192)
    r.drv.write(8, data)
    assert r.drv.read(8, 16) == data
    for sector, n in ((4, 8), (8, 4)):  # misaligned start / not a whole block
        t = r.drv.submit_read(sector, n)
        assert r.drv.wait(t).status == BlkStatus.IOERR


def test_zero_length_read_and_write_ok(make):
    r = make()
    t = r.drv.submit(BlkReqType.IN, 0)
    assert r.drv.wait(t).status == BlkStatus.OK


# ============================================================================ segments
def test_too_many_segments_ioerr_seg_max_ok(make):
    r = make(seg_max=4, size_max=4096)
    data = pattern(4, 5 * 512)
    t = r.drv.submit_write(0, data, segments=[512] * 5)
    assert r.drv.wait(t).status == BlkStatus.IOERR
    t = r.drv.submit_read(0, 5, segments=[512] * 5)
    assert r.drv.wait(t).status == BlkStatus.IOERR
    t = r.drv.submit_write(0, data[:2048], segments=[512] * 4)
    assert r.drv.wait(t).status == BlkStatus.OK
    t = r.drv.submit_read(0, 4, segments=[512] * 4)
    c = r.drv.wait(t)
    assert c.status == BlkStatus.OK and c.data == data[:2048]


def test_oversized_segment_ioerr_size_max_ok(make):
    r = make(seg_max=4, size_max=4096)
    t = r.drv.submit_read(0, 16, segments=[8192])
    assert r.drv.wait(t).status == BlkStatus.IOERR
    t = r.drv.submit_write(0, pattern(5, 8192), segments=[8192])
    assert r.drv.wait(t).status == BlkStatus.IOERR
    t = r.drv.submit_read(0, 8, segments=[4096])
    assert r.drv.wait(t).status == BlkStatus.OK


def test_limits_not_enforced_when_not_negotiated(make):
    r = make(features=DEFAULT_FEATURES & ~bit(BlkFeature.SEG_MAX) & ~bit(BlkFeature.SIZE_MAX),
             seg_max=2, size_max=4096)
    t = r.drv.submit_read(0, 32, segments=[8192, 512, 512, 7168])
    assert r.drv.wait(t).status == BlkStatus.OK


def test_header_and_data_in_one_descriptor(make, image):
    """Framing is free (VERSION_1): header + data in one readable descriptor."""
    r = make()
    data = pattern(6, 1024)
    hdr = BlkOutHdr(BlkReqType.OUT, 0, 10).encode()
    t = r.drv.submit_raw([hdr + data], [1])
    c = r.drv.wait(t)
    assert c.status == BlkStatus.OK and c.used_len == 1
    assert file_bytes(image, 10 * 512, 1024) == data


def test_indirect_chain(make):
    r = make(seg_max=16, size_max=4096)
    data = pattern(9, 16384)
    r.drv.write(0, data, indirect=True)
    assert r.drv.read(0, 32, indirect=True) == data


# ============================================================================ malformed chains
def test_malformed_header_too_short_ioerr(make):
    r = make()
    t = r.drv.submit_raw([b"\0" * 10], [1])
    c = r.drv.wait(t)
    assert c.status == BlkStatus.IOERR and c.used_len == 1
    assert r.drv.read(0, 1)  # keeps serving
    assert not r.fn.needs_reset


def test_no_readable_part_ioerr(make):
    r = make()
    c = r.drv.wait(r.drv.submit_raw([], [513]))
    assert c.status == BlkStatus.IOERR and c.used_len == 513


def test_no_status_byte_used_len_zero_device_keeps_serving(make):
    r = make()
    hdr = BlkOutHdr(BlkReqType.IN, 0, 0).encode()
    c = r.drv.wait(r.drv.submit_raw([hdr], []))
    assert c.used_len == 0 and c.status is None
    assert r.dev.no_status == 1
    assert r.drv.read(0, 1)
    assert not r.fn.needs_reset


def test_unknown_type_unsupp(make):
    r = make()
    for t in (3, 99, 0xFFFF_FFFF):
        hdr = t.to_bytes(4, "little") + bytes(12)
        c = r.drv.wait(r.drv.submit(0, header=hdr))
        assert c.status == BlkStatus.UNSUPP, t


@pytest.mark.parametrize("t", [BlkReqType.GET_LIFETIME, BlkReqType.SECURE_ERASE])
def test_lifetime_and_secure_erase_unsupp(make, t):
    r = make()
    c = r.drv.wait(r.drv.submit(t, 0, read_len=8 if t is BlkReqType.GET_LIFETIME else 0))
    assert c.status == BlkStatus.UNSUPP


def test_status_is_last_writable_byte(make):
    r = make()
    hdr = BlkOutHdr(BlkReqType.IN, 0, 0).encode()
    c = r.drv.wait(r.drv.submit_raw([hdr], [300, 213]))  # 512 data bytes + status, split oddly
    assert c.status == BlkStatus.OK and c.used_len == 513
    c = r.drv.wait(r.drv.submit_raw([hdr], [100]))  # 99 bytes: not a whole sector
    assert c.status == BlkStatus.IOERR and c.data[:99] == bytes(99)


def test_sync_api_raises_typed_error(make):
    r = make()
    with pytest.raises(BlkIOError) as ei:
        r.drv.read(SECTORS, 1)
    assert ei.value.status is BlkStatus.IOERR and ei.value.type is BlkReqType.IN and ei.value.sector == SECTORS


# ============================================================================ FLUSH / GET_ID
def test_flush_syncs(make):
    r = make()
    r.drv.write(0, pattern(10, 4096))
    assert r.dev.unsynced_writes == 1
    syncs = r.dev.syncs
    r.drv.flush()
    assert r.dev.syncs == syncs + 1 and r.dev.unsynced_writes == 0


def test_write_through_without_flush_feature(make):
    r = make(features=DEFAULT_FEATURES & ~bit(BlkFeature.FLUSH))
    for i in range(3):
        r.drv.write(i * 8, pattern(i, 4096))
    assert r.dev.unsynced_writes == 0 and r.dev.syncs >= 3


def test_get_id(make):
    r = make(serial="disk-0042")
    assert r.drv.get_id() == b"disk-0042"
    r2 = make(serial="x" * 20)
    assert r2.drv.get_id() == b"x" * 20


def test_get_id_buffer_too_small_ioerr(make):
    r = make()
    c = r.drv.wait(r.drv.submit(BlkReqType.GET_ID, 0, read_len=10))
    assert c.status == BlkStatus.IOERR


# ============================================================================ read-only
def test_read_only_image(make, image):
    os.chmod(image, 0o444)
    r = make(read_only=True)
    assert r.drv.read_only
    before = file_bytes(image, 0, 8192)
    for call in (lambda: r.drv.write(0, pattern(11, 4096)),
                 lambda: r.drv.discard([(0, 8)]),
                 lambda: r.drv.write_zeroes([(0, 8)])):
        with pytest.raises(BlkIOError) as ei:
            call()
        assert status_of(ei) == BlkStatus.IOERR
    assert file_bytes(image, 0, 8192) == before
    assert r.drv.read(0, 16) == before
    r.drv.flush()


# ============================================================================ DISCARD / WRITE_ZEROES
def test_discard_reads_back_zero(make, image):
    r = make()
    r.drv.discard([(16, 8), (64, 16)])
    assert r.drv.read(16, 8) == bytes(4096) and r.drv.read(64, 16) == bytes(8192)
    assert r.drv.read(24, 8) == file_bytes(image, 24 * 512, 4096) != bytes(4096)
    assert os.path.getsize(image) == IMAGE_SIZE


def test_discard_with_unmap_flag_unsupp(make, image):
    r = make()
    before = file_bytes(image, 0, 4096)
    with pytest.raises(BlkIOError) as ei:
        r.drv.discard([(0, 8, SegmentFlags.UNMAP)])
    assert status_of(ei) == BlkStatus.UNSUPP
    assert file_bytes(image, 0, 4096) == before


@pytest.mark.parametrize("unmap", [0, 1])
def test_write_zeroes(make, image, unmap):
    r = make()
    r.drv.write_zeroes([(8, 8, unmap)])
    assert r.drv.read(8, 8) == bytes(4096) == file_bytes(image, 4096, 4096)
    assert r.drv.read(0, 8) == file_bytes(image, 0, 4096) != bytes(4096)


@pytest.mark.parametrize("t", [BlkReqType.DISCARD, BlkReqType.WRITE_ZEROES])
def test_range_limits(make, image, t):
    r = make(max_discard_sectors=64, max_discard_seg=2, max_write_zeroes_sectors=64, max_write_zeroes_seg=2)
    before = file_bytes(image, 0, 1 << 16)

    def status(ranges) -> int | None:
        return r.drv.wait(r.drv.submit_ranges(t, ranges)).status

    assert status([(0, 8), (8, 8), (16, 8)]) == BlkStatus.UNSUPP  # > max_*_seg
    assert status([(0, 65)]) == BlkStatus.IOERR  # > max_*_sectors
    assert status([(SECTORS - 4, 8)]) == BlkStatus.IOERR  # beyond capacity
    assert file_bytes(image, 0, 1 << 16) == before
    assert status([(0, 64), (64, 64)]) == BlkStatus.OK
    assert file_bytes(image, 0, 1 << 16) == bytes(1 << 16)


@pytest.mark.parametrize("t", [BlkReqType.DISCARD, BlkReqType.WRITE_ZEROES])
def test_range_unknown_flag_unsupp(make, t):
    r = make()
    seg = (0).to_bytes(8, "little") + (8).to_bytes(4, "little") + (4).to_bytes(4, "little")
    assert r.drv.wait(r.drv.submit(t, 0, payload=seg)).status == BlkStatus.UNSUPP


@pytest.mark.parametrize("t", [BlkReqType.DISCARD, BlkReqType.WRITE_ZEROES])
def test_range_payload_not_whole_segments_ioerr(make, t):
    r = make()
    assert r.drv.wait(r.drv.submit(t, 0, payload=b"\0" * 20)).status == BlkStatus.IOERR
    assert r.drv.wait(r.drv.submit(t, 0)).status == BlkStatus.IOERR  # no segment at all


@pytest.mark.parametrize("feature,t", [(BlkFeature.DISCARD, BlkReqType.DISCARD),
                                       (BlkFeature.WRITE_ZEROES, BlkReqType.WRITE_ZEROES)])
def test_range_not_negotiated_unsupp(make, feature, t):
    r = make(features=DEFAULT_FEATURES & ~bit(feature))
    c = r.drv.wait(r.drv.submit_ranges(t, [(0, 8)]))
    assert c.status == BlkStatus.UNSUPP


def test_discard_misaligned_to_blk_size_ioerr(make):
    r = make(blk_size=4096)
    assert r.drv.wait(r.drv.submit_ranges(BlkReqType.DISCARD, [(4, 8)])).status == BlkStatus.IOERR
    assert r.drv.wait(r.drv.submit_ranges(BlkReqType.DISCARD, [(8, 8)])).status == BlkStatus.OK


# ============================================================================ back-end failure
def test_backend_failure_is_ioerr(make, image):
    r = make()
    os.truncate(image, 1 << 20)  # the image shrank under the device
    with pytest.raises(BlkIOError) as ei:
        r.drv.read(SECTORS - 8, 8)
    assert status_of(ei) == BlkStatus.IOERR
    assert r.drv.read(0, 8)


# ============================================================================ multiqueue / in flight
def test_multiqueue_every_queue_serves(make, image):
    r = make(num_queues=4)
    assert len(r.drv.queues) == 4 and r.drv.config.num_queues == 4
    toks = {q: r.drv.submit_read(q * 8, 8, queue=q) for q in range(4)}
    for q, t in toks.items():
        c = r.drv.wait(t)
        assert c.ok and c.queue == q and c.data == file_bytes(image, q * 4096, 4096)
        assert r.fn.interrupt_counts.get(q, 0) >= 1


def test_without_mq_one_queue(make):
    r = make(num_queues=4, features=DEFAULT_FEATURES & ~bit(BlkFeature.MQ))
    assert list(r.drv.queues) == [0]


def test_many_in_flight_at_once(make, image):
    r = make(GatedBlkDevice, num_queues=2, backend_threads=4)
    expect: dict[int, bytes | None] = {}
    for i in range(96):
        if i % 2:
            data = pattern(100 + i, 4096)
            expect[r.drv.submit_write(i * 8, data)] = None
            expect_data = data
            with open(image, "rb") as f:  # nothing written yet: the work is gated
                f.seek(i * 4096)
                assert f.read(4096) != expect_data
        else:
            expect[r.drv.submit_read(i * 8, 8)] = file_bytes(image, i * 4096, 4096)
    assert r.dev.in_flight == 96
    r.dev.gate.set()
    done = r.drv.wait_many(list(expect))
    assert all(c.ok for c in done)
    for c in done:
        if expect[c.token] is not None:
            assert c.data == expect[c.token]
    for i in range(1, 96, 2):
        assert file_bytes(image, i * 4096, 4096) == pattern(100 + i, 4096)
    assert r.dev.in_flight == 0 and r.drv.in_flight() == 0


# ============================================================================ dirty tracking
def test_read_dma_marks_buffer_pages_write_does_not(make):
    r = make()
    rbuf = r.drv.alloc.alloc(3 * 4096, 4096)
    wbuf = r.drv.alloc.alloc(2 * 4096, 4096)
    r.mem.cpu.write(wbuf, pattern(12, 8192))
    r.tracker.collect()
    r.drv.wait(r.drv.submit_write(0, pattern(12, 8192), buf=wbuf))
    dirty = r.tracker.collect()
    assert not dirty[wbuf >> PAGE_SHIFT : (wbuf >> PAGE_SHIFT) + 2].any()  # the device only read it
    r.drv.wait(r.drv.submit_read(0, 24, buf=rbuf))
    dirty = r.tracker.collect()
    assert dirty[rbuf >> PAGE_SHIFT : (rbuf >> PAGE_SHIFT) + 3].all()
    # everything the device wrote is in guest memory where the tracker says
    assert r.mem.read(rbuf, 8192) == pattern(12, 8192)


def test_no_dma_while_quiesced_completion_held(make, image):
    r = make(GatedBlkDevice)
    t = r.drv.submit_read(0, 8)
    r.dev.mig_quiesce()
    r.tracker.collect()
    r.dev.gate.set()
    assert r.dev.wait_idle(0.2) is False  # held in the device, not returned
    assert not r.tracker.collect().any()
    r.dev.mig_resume()
    c = r.drv.wait(t)
    assert c.ok and c.data == file_bytes(image, 0, 4096)
