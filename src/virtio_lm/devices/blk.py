"""The virtio-blk VF device model, backed by a raw image file.

:class:`BlkDevice` is a :class:`~virtio_lm.devices.base.QueueDevice`: each
request chain is parsed (and its readable part read from guest memory) on
the queue-processing path, and the back-end I/O -- ``os.pread`` /
``os.pwrite`` / ``os.fdatasync`` on the image's file descriptor -- runs on
the base's thread pool, so many requests are in flight at once.  With
:attr:`~virtio_lm.devices.base.QueueDevice.direct_dma` on (vhost-user-blk),
reads and writes larger than ``inline_max`` move between the image and guest
memory without a copy -- ``preadv`` into, ``pwritev`` from, the chain's buffers
(:class:`~virtio_lm.devices.base.DirectWork`: under a DMA permit, through the
port, so every byte read in is dirty-tracked); without a permit a read runs
buffered and a write waits for resume ("not executed").  The same
image path on the source and the destination of a migration stands for
shared storage.

Requests (virtio 1.x 5.2.6; sectors are 512 bytes whatever ``blk_size`` is)::

    no writable byte                 -> returned with used_len 0 (nowhere to put
                                        a status); the device keeps serving
    readable part < 16 bytes         -> IOERR
    type unknown, GET_LIFETIME,      -> UNSUPP (bit 15 is the proposal's CTRL_VQ,
      SECURE_ERASE                      not LIFETIME; CTRL_VQ is never offered on a VF)
    IN / OUT                         -> IOERR when: the data length is not a
                                        multiple of blk_size, the sector is not
                                        aligned to blk_size, the range runs past
                                        capacity, more data descriptors than
                                        seg_max or one larger than size_max (when
                                        negotiated), more than MAX_TRANSFER
                                        bytes, OUT on a read-only image
    FLUSH                            -> fdatasync, OK
    GET_ID                           -> the 20-byte serial (IOERR if the
                                        writable part has no room for it)
    DISCARD / WRITE_ZEROES           -> UNSUPP when not negotiated, an unknown
                                        segment flag, UNMAP on a DISCARD, more
                                        segments than max_*_seg; IOERR when the
                                        payload is not whole segments, a segment
                                        has more than max_*_sectors sectors, is
                                        not aligned to blk_size, runs past
                                        capacity, or the image is read-only

Every completion writes the chain's whole writable part -- data (or zeros),
then the status byte as the *last* writable byte -- and returns the chain
with ``used_len`` = writable length.  A failed back-end call completes IOERR.

DISCARD and WRITE_ZEROES with UNMAP deallocate with
``fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`` (through libc;
Python's os module has no punch-hole); where that is not available the range
is written with zeros, which is also a valid discard.  Either way the range
reads back as zeros.

With the virtio-1.4 profile (:meth:`BlkDevice.mig_stop`) there is no held
request at all: every request taken completes on the source before the
device reports STOPPED, and the image is then ``fdatasync``-ed.  The
device has no device-type part: its configuration is read-only and the
same on both ends; the common parts carry the rest.

Durability across the switch-over: :meth:`BlkDevice.mig_freeze` settles the
back-end (base: work not started is cancelled and stays "not executed") and
then ``fdatasync``\\ s the image, so every write the guest saw completed --
and every write whose completion is held in the device -- is on stable
storage before the destination reads the image.  Nothing issued on the
source runs after FREEZED: cancelled writes are re-executed by the
destination from the descriptors in migrated guest memory; held completions
are written by the destination without re-executing.

The device's state image holds, beyond the base's records, one CONFIG record
(the 72-byte ``virtio_blk_config``); the destination refuses an image whose
config differs from its own (other image size, block size, queue count or
limits).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import threading
from dataclasses import fields
from typing import Sequence

from virtio_lm.devices import blkfast
from virtio_lm.devices.base import (
    FAST_EMPTY,
    FAST_MORE,
    FAST_SLOW,
    MAX_HELD_DATA,
    DirectWork,
    NotExecuted,
    QueueDevice,
    Work,
)
from virtio_lm.errors import StateImageError, WireError
from virtio_lm.memory.region import MemoryPort
from virtio_lm.pci.function import VirtioPciFunction
from virtio_lm.pci.snapshot import FunctionSnapshot
from virtio_lm.virtqueue.device import DescriptorChain, Segment, piece_lengths
from virtio_lm.wire.blk import (
    BLK_REQUIREMENTS,
    OUTHDR_SIZE,
    SECTOR_SHIFT,
    SECTOR_SIZE,
    SEGMENT_SIZE,
    VIRTIO_BLK_ID_BYTES,
    BlkConfig,
    BlkFeature,
    BlkOutHdr,
    BlkReqType,
    BlkStatus,
    SegmentFlags,
    decode_segments,
    encode_blk_id,
)
from virtio_lm.wire.features import REQUIREMENTS, DeviceId, Feature, bit, unmet_requirements
from virtio_lm.wire.state import DEVICE_RECORD_BASE, RecordType, StateImage

__all__ = ["BlkDevice", "MAX_TRANSFER", "blk_features"]

#: largest data part of one IN/OUT request (a held completion must fit an image record)
MAX_TRANSFER = MAX_HELD_DATA - 1
_ZERO_CHUNK = 1 << 20
_ZEROS = bytes(_ZERO_CHUNK)

# ---------------------------------------------------------------------------- punch hole
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc_fallocate = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    _libc_fallocate = _libc.fallocate
    _libc_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _libc_fallocate.restype = ctypes.c_int
except (OSError, AttributeError):  # no libc fallocate: zeros are written instead
    _libc_fallocate = None


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate ``[offset, offset+length)`` keeping the size; False if the file system cannot."""
    if _libc_fallocate is None:
        return False
    if _libc_fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


# ---------------------------------------------------------------------------- features
def blk_features(*, read_only: bool) -> int:
    """The features a :class:`BlkDevice` offers (never bit 15 on a VF)."""
    f = (
        bit(Feature.VERSION_1)
        | bit(Feature.EVENT_IDX)
        | bit(Feature.INDIRECT_DESC)
        | bit(BlkFeature.SEG_MAX)
        | bit(BlkFeature.SIZE_MAX)
        | bit(BlkFeature.BLK_SIZE)
        | bit(BlkFeature.FLUSH)
        | bit(BlkFeature.MQ)
        | bit(BlkFeature.DISCARD)
        | bit(BlkFeature.WRITE_ZEROES)
    )
    if read_only:
        f |= bit(BlkFeature.RO)
    return f


_SEG_MAX_BIT = bit(BlkFeature.SEG_MAX)
_SIZE_MAX_BIT = bit(BlkFeature.SIZE_MAX)
_FLUSH_BIT = bit(BlkFeature.FLUSH)
assert (blkfast.STOP_EMPTY, blkfast.STOP_SLOW, blkfast.STOP_MORE) == (FAST_EMPTY, FAST_SLOW, FAST_MORE)
assert OUTHDR_SIZE == 16 and SECTOR_SHIFT == 9  # what blkfast.c knows


def _completion(wlen: int, status: BlkStatus, data: bytes = b"") -> bytes:
    """The whole writable part: data, zeros, then the status as the last byte."""
    if len(data) == wlen - 1:
        return data + bytes((int(status),))
    out = bytearray(wlen)
    out[: len(data)] = data
    out[-1] = int(status)
    return bytes(out)


class BlkDevice(QueueDevice):
    """A virtio-blk device over a raw image file (see the module docstring)."""

    device_id = DeviceId.BLOCK

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        read_only: bool = False,
        num_queues: int = 1,
        queue_max_size: int = 256,
        blk_size: int = SECTOR_SIZE,
        seg_max: int = 126,
        size_max: int = 128 << 10,
        serial: str | bytes = "virtio-lm-blk",
        max_discard_sectors: int = 1 << 16,
        max_discard_seg: int = 16,
        max_write_zeroes_sectors: int = 1 << 16,
        max_write_zeroes_seg: int = 16,
        backend_threads: int = 8,
    ) -> None:
        super().__init__()
        if not 1 <= num_queues <= 0xFFFF:
            raise ValueError(f"num_queues {num_queues} out of 1..65535")
        if blk_size < SECTOR_SIZE or blk_size & (blk_size - 1) or blk_size > 1 << 16:
            raise ValueError(f"blk_size {blk_size} is not a power of two in 512..65536")
        if seg_max < 1 or size_max < blk_size or seg_max * size_max > MAX_TRANSFER:
            raise ValueError(f"seg_max {seg_max} x size_max {size_max} must be >= blk_size and <= {MAX_TRANSFER}")
        for name, v in (
            ("max_discard_sectors", max_discard_sectors),
            ("max_discard_seg", max_discard_seg),
            ("max_write_zeroes_sectors", max_write_zeroes_sectors),
            ("max_write_zeroes_seg", max_write_zeroes_seg),
        ):
            if not 1 <= v <= 0xFFFF_FFFF:
                raise ValueError(f"{name} {v} out of 1..2**32-1")
        self.path = os.fspath(path)
        self.read_only = read_only
        self.num_queues = num_queues
        self.queue_max_size = queue_max_size
        self.backend_threads = backend_threads
        self.blk_size = blk_size
        self.seg_max = seg_max
        self.size_max = size_max
        self.serial = encode_blk_id(serial)
        self.fd = os.open(self.path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        size = os.fstat(self.fd).st_size
        self.capacity = (size // blk_size) * (blk_size >> SECTOR_SHIFT)  # in 512-byte sectors
        self._sector_align = blk_size >> SECTOR_SHIFT
        self.can_unmap = _libc_fallocate is not None
        self.config = BlkConfig(
            capacity=self.capacity,
            size_max=size_max,
            seg_max=seg_max,
            blk_size=blk_size,
            num_queues=num_queues,
            max_discard_sectors=max_discard_sectors,
            max_discard_seg=max_discard_seg,
            discard_sector_alignment=self._sector_align,
            max_write_zeroes_sectors=max_write_zeroes_sectors,
            max_write_zeroes_seg=max_write_zeroes_seg,
            write_zeroes_may_unmap=int(self.can_unmap),
        )
        self._config = self.config.encode()  # type: ignore[attr-defined]
        # statistics / durability bookkeeping (under _stats)
        self._stats = threading.Lock()
        self.status_counts: dict[BlkStatus, int] = {s: 0 for s in BlkStatus}
        self.no_status = 0  # chains returned with used_len 0 (no writable byte)
        self.reads = 0
        self.writes = 0  # pwrite / zeroing / punch calls completed
        self.bytes_read = 0
        self.bytes_written = 0
        self.syncs = 0
        self._synced_upto = 0  # self.writes when the last completed fdatasync began
        #: serve reads and writes in C where it can (:meth:`fast_batch`); off: every chain
        #: takes the Python path (the bench's baseline, the fast path's differential tests)
        self.fast_path = True
        #: a fast-path batch moving at least this many bytes shares its I/O with a pool of 3
        #: threads; smaller ones run on the notification's thread.  4 MiB: measured on
        #: 2026-12-04 (rotated A/B runs), threads from 256 KiB up made a guest's 1 MiB
        #: sequential dd 6-14 % slower than none (docs/decisions.md)
        self.fast_threads_min = 4 << 20

    # ================================================================== features / config
    def offered_features(self) -> int:
        return blk_features(read_only=self.read_only)

    def validate_features(self, features: int) -> str | None:
        problems = unmet_requirements(features, REQUIREMENTS, BLK_REQUIREMENTS)
        return "; ".join(problems) or None

    @property
    def config_size(self) -> int:
        return len(self._config)

    def config_read(self, offset: int, length: int) -> bytes:
        return self._config[offset : offset + length]

    def _negotiated(self, feature: int) -> bool:
        return bool(self.fn.negotiated & bit(feature))

    # ================================================================== durability
    @property
    def unsynced_writes(self) -> int:
        """Writes completed on the image since the start of the last completed fdatasync."""
        with self._stats:
            return self.writes - self._synced_upto

    def sync(self) -> None:
        """fdatasync the image (every write completed before the call is then stable)."""
        with self._stats:
            upto = self.writes
        os.fdatasync(self.fd)
        with self._stats:
            self.syncs += 1
            self._synced_upto = max(self._synced_upto, upto)

    def mig_freeze(self, timeout: float = 10.0) -> None:
        """Settle the back-end (base), then make every completed write stable."""
        super().mig_freeze(timeout)
        self.sync()

    def mig_stop(self, timeout: float = 10.0) -> None:
        """virtio 1.4 STOPPED: every request taken completes (base), then every
        completed write is made stable -- the destination reads the same image."""
        super().mig_stop(timeout)
        self.sync()

    def close(self) -> None:
        """Stop the back-end pool and close the image."""
        super().close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # ================================================================== the C fast path
    def fast_batch(self, queue: int) -> int | None:
        """Serve reads and writes in C (:mod:`virtio_lm.devices.blkfast`, see its source's
        header): on while :attr:`fast_path` and :attr:`direct_dma` are on, no fault injection
        runs and the memory offers its regions (vhost-user's does).  It takes only chains the
        Python path would serve with the same result, leaving every other one to it."""
        fn = self.function
        if not (self.fast_path and self.direct_dma) or self.hold_after is not None or self.fd < 0 or fn is None:
            return None
        neg = fn.negotiated
        dev = (self.fd, self.capacity, self.blk_size, self.seg_max if neg & _SEG_MAX_BIT else 0,
               self.size_max if neg & _SIZE_MAX_BIT else 0, MAX_TRANSFER, self.read_only,
               bool(neg & _FLUSH_BIT), self.fast_threads_min)  # fmt: skip

        def run(regions: tuple, qs: tuple, journal: tuple | None) -> tuple[tuple, int]:
            r = blkfast.run(regions, qs, dev, journal)
            return r, r[5]

        r = self.serve_in_c(queue, run)
        if r is None:
            return None
        stop, taken, *_, reads, bread, writes, bwritten, ok, ioerr = r[:12]
        if taken:
            with self._stats:
                self.reads += reads
                self.bytes_read += bread
                self.writes += writes
                self.bytes_written += bwritten
                self.status_counts[BlkStatus.OK] += ok
                self.status_counts[BlkStatus.IOERR] += ioerr
        return stop

    # ================================================================== requests
    def _done(self, wlen: int, status: BlkStatus, data: bytes = b"") -> bytes:
        with self._stats:
            self.status_counts[status] += 1
        return _completion(wlen, status, data)

    def _range_ok(self, sector: int, nbytes: int) -> bool:
        """Aligned to blk_size, a whole number of blocks, inside capacity."""
        if nbytes % self.blk_size or sector % self._sector_align:
            return False
        return sector + (nbytes >> SECTOR_SHIFT) <= self.capacity

    def _segments_ok(self, segs: Sequence[Segment], start: int, length: int) -> bool:
        if length > MAX_TRANSFER:
            return False
        pieces = piece_lengths(segs, start, length)
        negotiated = self.fn.negotiated
        if negotiated & _SEG_MAX_BIT and len(pieces) > self.seg_max:
            return False
        if negotiated & _SIZE_MAX_BIT and max(pieces, default=0) > self.size_max:
            return False
        return True

    def handle(self, fn: VirtioPciFunction, queue: int, chain: DescriptorChain) -> bytes | Work:
        wlen = chain.writable_len
        if wlen < 1:
            with self._stats:
                self.no_status += 1
            return b""  # nowhere to put a status: returned with used_len 0
        if chain.readable_len < OUTHDR_SIZE:
            return self._done(wlen, BlkStatus.IOERR)
        try:
            hdr = BlkOutHdr.decode(chain.read_range(fn.port, 0, OUTHDR_SIZE))  # type: ignore[attr-defined]
        except WireError:  # a type outside BlkReqType
            return self._done(wlen, BlkStatus.UNSUPP)
        t = hdr.type
        if t is BlkReqType.IN:
            return self._in(chain, hdr.sector)
        if t is BlkReqType.OUT:
            return self._out(fn, chain, hdr.sector)
        if t is BlkReqType.FLUSH:
            return self._flush(wlen)
        if t is BlkReqType.GET_ID:
            if wlen - 1 < VIRTIO_BLK_ID_BYTES:
                return self._done(wlen, BlkStatus.IOERR)
            return self._done(wlen, BlkStatus.OK, self.serial)
        if t in (BlkReqType.DISCARD, BlkReqType.WRITE_ZEROES):
            return self._ranges(fn, chain, t)
        return self._done(wlen, BlkStatus.UNSUPP)  # GET_LIFETIME, SECURE_ERASE

    def _read_stats(self, n: int) -> None:
        with self._stats:
            self.reads += 1
            self.bytes_read += n

    def _in(self, chain: DescriptorChain, sector: int) -> bytes | DirectWork:
        wlen = chain.writable_len
        n = wlen - 1
        if not self._range_ok(sector, n) or not self._segments_ok(chain.writable, 0, n):
            return self._done(wlen, BlkStatus.IOERR)
        if n == 0:
            return self._done(wlen, BlkStatus.OK)
        offset = sector << SECTOR_SHIFT
        fd = self.fd

        def direct(port: MemoryPort) -> tuple[int, bytes]:
            got = chain.pread_into(port, fd, offset, n)  # the image's bytes straight into the buffers
            if got < n:
                raise OSError(errno.EIO, f"{self.path}: image ends before sector {sector} + {n} bytes")
            self._read_stats(n)
            return n, self._done(1, BlkStatus.OK)

        def work() -> bytes:
            data = os.pread(fd, n, offset)
            while len(data) < n:  # short read: keep going; EOF means the image shrank
                more = os.pread(fd, n - len(data), offset + len(data))
                if not more:
                    raise OSError(errno.EIO, f"{self.path}: image ends before sector {sector} + {n} bytes")
                data += more
            self._read_stats(n)
            return self._done(wlen, BlkStatus.OK, data)

        return DirectWork(direct, work)

    def _write_all(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            k = os.pwrite(self.fd, view, offset)
            if k <= 0:
                raise OSError(errno.EIO, f"{self.path}: pwrite wrote {k} bytes")
            view = view[k:]
            offset += k

    def _wrote(self, n: int) -> None:
        with self._stats:
            self.writes += 1
            self.bytes_written += n
        if not self._negotiated(BlkFeature.FLUSH):
            self.sync()  # no FLUSH negotiated: the device must be write-through

    def _out(self, fn: VirtioPciFunction, chain: DescriptorChain, sector: int) -> bytes | Work | DirectWork:
        wlen = chain.writable_len
        n = chain.readable_len - OUTHDR_SIZE
        if self.read_only:
            return self._done(wlen, BlkStatus.IOERR)
        if not self._range_ok(sector, n) or not self._segments_ok(chain.readable, OUTHDR_SIZE, n):
            return self._done(wlen, BlkStatus.IOERR)
        if n == 0:
            return self._done(wlen, BlkStatus.OK)
        offset = sector << SECTOR_SHIFT
        if self.direct_dma and n > self.inline_max:  # straight from guest memory to the image
            fd = self.fd

            def direct(port: MemoryPort) -> tuple[int, bytes]:
                chain.pwrite_from(port, fd, offset, OUTHDR_SIZE, n)
                self._wrote(n)
                return 0, self._done(wlen, BlkStatus.OK)

            def not_now() -> bytes:  # no permit: the data cannot be read now -- run at resume
                raise NotExecuted()

            return DirectWork(direct, not_now)
        data = chain.read_range(fn.port, OUTHDR_SIZE, n)  # DMA read now, while mastering

        def work() -> bytes:
            self._write_all(data, offset)
            self._wrote(n)
            return self._done(wlen, BlkStatus.OK)

        return work

    def _flush(self, wlen: int) -> Work:
        def work() -> bytes:
            self.sync()
            return self._done(wlen, BlkStatus.OK)

        return work

    def _ranges(self, fn: VirtioPciFunction, chain: DescriptorChain, t: BlkReqType) -> bytes | Work:
        wlen = chain.writable_len
        discard = t is BlkReqType.DISCARD
        feature = BlkFeature.DISCARD if discard else BlkFeature.WRITE_ZEROES
        if not self._negotiated(feature):
            return self._done(wlen, BlkStatus.UNSUPP)
        n = chain.readable_len - OUTHDR_SIZE
        if n == 0 or n % SEGMENT_SIZE:
            return self._done(wlen, BlkStatus.IOERR)
        max_seg = self.config.max_discard_seg if discard else self.config.max_write_zeroes_seg
        max_sectors = self.config.max_discard_sectors if discard else self.config.max_write_zeroes_sectors
        if n // SEGMENT_SIZE > max_seg:
            return self._done(wlen, BlkStatus.UNSUPP)
        try:
            segments = decode_segments(chain.read_range(fn.port, OUTHDR_SIZE, n))
        except WireError:  # an unknown flag bit
            return self._done(wlen, BlkStatus.UNSUPP)
        if discard and any(s.flags & SegmentFlags.UNMAP for s in segments):
            return self._done(wlen, BlkStatus.UNSUPP)
        if self.read_only:
            return self._done(wlen, BlkStatus.IOERR)
        for s in segments:
            if s.num_sectors > max_sectors or not self._range_ok(s.sector, s.num_sectors << SECTOR_SHIFT):
                return self._done(wlen, BlkStatus.IOERR)
        plan = [
            (s.sector << SECTOR_SHIFT, s.num_sectors << SECTOR_SHIFT, discard or bool(s.flags & SegmentFlags.UNMAP))
            for s in segments
        ]

        def work() -> bytes:
            for offset, length, unmap in plan:
                if length == 0:
                    continue
                if not (unmap and _punch_hole(self.fd, offset, length)):
                    for off in range(offset, offset + length, _ZERO_CHUNK):
                        self._write_all(memoryview(_ZEROS)[: min(_ZERO_CHUNK, offset + length - off)], off)
                self._wrote(length)
            return self._done(wlen, BlkStatus.OK)

        return work

    def backend_failed(self, queue: int, chain: DescriptorChain, exc: Exception) -> bytes:
        return self._done(chain.writable_len, BlkStatus.IOERR)

    # ================================================================== device records
    def save_device_records(self) -> list[tuple[int, bytes]]:
        return [(RecordType.CONFIG, self._config)]

    def validate_device_records(self, image: StateImage, snap: FunctionSnapshot) -> object:
        extra = [r.type for r in image.records if r.type >= DEVICE_RECORD_BASE]
        if extra:
            raise StateImageError("device", f"unexpected device records {extra}")
        recs = image.of_type(RecordType.CONFIG)
        if len(recs) != 1:
            raise StateImageError("config", f"exactly one CONFIG record expected, got {len(recs)}")
        try:
            cfg = BlkConfig.decode(recs[0].payload)  # type: ignore[attr-defined]
        except WireError as exc:
            raise StateImageError("config", str(exc)) from exc
        for f in fields(BlkConfig):
            mine, theirs = getattr(self.config, f.name), getattr(cfg, f.name)
            if mine != theirs:
                raise StateImageError(
                    f"config.{f.name}", f"{theirs} in the image != {mine} here (a different image or options)"
                )
        return None
