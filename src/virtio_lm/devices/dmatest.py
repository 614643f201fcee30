"""A minimal virtio device that DMAs into guest memory on request.

:class:`DmaTestDevice` (device id 63, unassigned by the virtio spec; wire
format in :mod:`virtio_lm.wire.dmatest`) has one request queue.  Each
request asks the device to FILL the chain's writable part with the
deterministic pattern of a seed, or to ECHO the payload that follows the
header.  The work runs on the :class:`~virtio_lm.devices.base.QueueDevice`
back-end pool and can be slowed down by the request's ``delay_us``, so a
test can keep many requests in flight, and every byte of the result is a
device DMA write -- what the PF's dirty tracking has to see.

Per chain:

* no writable byte (no room for the status), or a part larger than the
  device's ``max_len`` (+ header / + status; advertised in the config
  space): the chain is unusable, the queue goes to NEEDS_RESET (the driver
  broke the device's published limits, as a virtio-blk driver exceeding
  ``seg_max`` would);
* a malformed request -- header shorter than 24 bytes, reserved field not
  zero, FILL with a payload or a length beyond the data area, ECHO whose
  length is not the payload's, ``delay_us`` above 1 s -- completes at once
  with status IOERR; an unknown op with UNSUPP.  The device keeps serving.

Every completion writes the whole writable part (data, zeros, status byte)
and returns the chain with ``used_len`` = its length.
"""

from __future__ import annotations

import time

import numpy as np

from virtio_lm.devices.base import QueueDevice, Work
from virtio_lm.errors import ChainSpaceError, WireError
from virtio_lm.pci.function import VirtioPciFunction
from virtio_lm.virtqueue.device import DescriptorChain
from virtio_lm.wire.dmatest import (
    DMATEST_DEVICE_ID,
    MAX_DELAY_US,
    STATUS_SIZE,
    DmaTestConfig,
    DmaTestOp,
    DmaTestReqHeader,
    DmaTestStatus,
)
from virtio_lm.wire.features import Feature, bit

__all__ = ["DEFAULT_MAX_LEN", "DmaTestDevice", "fill_pattern", "expected_completion"]

DEFAULT_MAX_LEN = 1 << 20
HEADER_SIZE = DmaTestReqHeader.SIZE

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def fill_pattern(seed: int, length: int) -> bytes:
    """``length`` bytes of the FILL pattern of ``seed``: the little-endian
    splitmix64 outputs of ``seed + k * golden`` for k = 1, 2, ..."""
    if length <= 0:
        return b""
    words = (length + 7) // 8
    with np.errstate(over="ignore"):
        z = np.uint64(seed & (2**64 - 1)) + np.arange(1, words + 1, dtype=np.uint64) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z = z ^ (z >> np.uint64(31))
    return z.astype("<u8").tobytes()[:length]


def expected_completion(writable_len: int, status: DmaTestStatus, data: bytes = b"") -> bytes:
    """What the device writes into a writable part of ``writable_len`` bytes."""
    out = bytearray(writable_len)
    out[: len(data)] = data
    out[-1] = int(status)
    return bytes(out)


class DmaTestDevice(QueueDevice):
    """One request queue; FILL / ECHO requests executed on the back-end pool."""

    device_id = DMATEST_DEVICE_ID
    num_queues = 1

    def __init__(self, *, max_len: int = DEFAULT_MAX_LEN, queue_max_size: int = 256, backend_threads: int = 4) -> None:
        super().__init__()
        if not 0 < max_len <= 0xFFFF_FFFF - HEADER_SIZE:
            raise ValueError(f"max_len {max_len} out of range")
        self.max_len = max_len
        self.queue_max_size = queue_max_size
        self.backend_threads = backend_threads
        self.status_counts: dict[DmaTestStatus, int] = {s: 0 for s in DmaTestStatus}
        self._config = DmaTestConfig(max_len).encode()

    # ------------------------------------------------------------------ features / config
    def offered_features(self) -> int:
        return bit(Feature.VERSION_1) | bit(Feature.EVENT_IDX) | bit(Feature.INDIRECT_DESC)

    @property
    def config_size(self) -> int:
        return len(self._config)

    def config_read(self, offset: int, length: int) -> bytes:
        return self._config[offset : offset + length]

    # ------------------------------------------------------------------ requests
    def _done(self, wlen: int, status: DmaTestStatus, data: bytes = b"") -> bytes:
        self.status_counts[status] += 1
        return expected_completion(wlen, status, data)

    def handle(self, fn: VirtioPciFunction, queue: int, chain: DescriptorChain) -> bytes | Work:
        wlen = chain.writable_len
        if wlen < STATUS_SIZE:
            raise ChainSpaceError(chain.queue, f"chain {chain.head} has no writable byte for the status")
        if wlen - STATUS_SIZE > self.max_len or chain.readable_len > HEADER_SIZE + self.max_len:
            raise ChainSpaceError(
                chain.queue,
                f"chain {chain.head} ({chain.readable_len} readable, {wlen} writable bytes) "
                f"exceeds the device's max_len {self.max_len}",
            )
        area = wlen - STATUS_SIZE
        if chain.readable_len < HEADER_SIZE:
            return self._done(wlen, DmaTestStatus.IOERR)
        try:
            hdr = DmaTestReqHeader.decode(chain.read_range(fn.port, 0, HEADER_SIZE))
        except WireError:  # reserved field not zero
            return self._done(wlen, DmaTestStatus.IOERR)
        payload_len = chain.readable_len - HEADER_SIZE
        if hdr.op == DmaTestOp.FILL:
            if payload_len or hdr.length > area:
                return self._done(wlen, DmaTestStatus.IOERR)
            payload = None
        elif hdr.op == DmaTestOp.ECHO:
            if hdr.length != payload_len or hdr.length > area:
                return self._done(wlen, DmaTestStatus.IOERR)
            payload = chain.read_range(fn.port, HEADER_SIZE, payload_len)
        else:
            return self._done(wlen, DmaTestStatus.UNSUPP)
        if hdr.delay_us > MAX_DELAY_US:
            return self._done(wlen, DmaTestStatus.IOERR)

        def work() -> bytes:
            if hdr.delay_us:
                time.sleep(hdr.delay_us / 1e6)
            data = fill_pattern(hdr.seed, hdr.length) if payload is None else payload
            return self._done(wlen, DmaTestStatus.OK, data)

        return work

    def backend_failed(self, queue: int, chain: DescriptorChain, exc: Exception) -> bytes:
        return self._done(chain.writable_len, DmaTestStatus.IOERR)
