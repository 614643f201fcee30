"""The virtio-blk C fast path (``virtio_lm.devices.blkfast.run``) over guest memory the input fills.

Two regions of guest memory (16 KiB at gpa 0 and 16 KiB at gpa 0x10000), their every byte from
the input: descriptor table at 0, avail ring at 0x1000, used ring at 0x2000, and whatever
descriptors, indirect tables, request headers and buffers the bytes make.  A 64 KiB image file,
an inflight journal, the queue's size, indices and features and the device's limits from the
input too.

Input: ``flags u8, size_log2 u8 (mod 7: sizes 1..64), last_avail u16, used_idx u16,
avail_cache u16 (used when flags bit 7), seg_max u8, size_max u16, region bytes...``.

Invariants:
* ``run`` returns (no crash, no exception) and its stop code is 0, 1 or 2;
* it takes at most a queue's worth of chains; ``last_avail`` and ``used_idx`` advance by the
  chains taken, and every chain taken is completed (ok + ioerr = taken);
* every guest-memory write it reports lies inside a region, their total is the reported byte
  count, and **no byte of guest memory changes outside the reported writes** (a write the
  dirty trackers would not hear of);
* the journal is written only at the heads' entries and the header's two fields.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
from fuzzlib import Reader, check_reported_writes, main

from virtio_lm.devices import blkfast
from virtio_lm.vhost.inflight import JOURNAL_LAYOUT

REGION = 16 << 10
GPA_B = 0x10000
IMAGE = 64 << 10
_image_fd: int | None = None
# reused by every input (a fresh 16 KiB numpy array per input grows atheris's RSS without bound)
A, B, A0, B0 = (np.zeros(REGION, np.uint8) for _ in range(4))


def image_fd() -> int:
    global _image_fd
    if _image_fd is None:
        fd, path = tempfile.mkstemp(prefix="fuzz-blkfast-")
        os.unlink(path)
        os.ftruncate(fd, IMAGE)
        _image_fd = fd
    return _image_fd


def TestOneInput(data: bytes) -> None:
    r = Reader(data)
    flags = r.u8()
    size = 1 << (r.u8() % 7)
    last_avail, used_idx, cache = r.u16(), r.u16(), r.u16()
    seg_max, size_max = r.u8(), r.u16()
    a, b, a0, b0 = A, B, A0, B0
    a[:] = np.frombuffer(r.bytes(REGION).ljust(REGION, b"\0"), np.uint8)
    b[:] = np.frombuffer(r.bytes(REGION).ljust(REGION, b"\0"), np.uint8)
    a0[:] = a
    b0[:] = b
    hdr = np.zeros(16, np.uint8)
    desc = np.zeros(16 * size, np.uint8)
    h0, d0 = hdr.copy(), desc.copy()
    queue = (size, 0x0, 0x1000, 0x2000, last_avail, cache if flags & 0x80 else -1, used_idx,
             bool(flags & 1), bool(flags & 2), bool(flags & 4))
    dev = (image_fd(), IMAGE // 512, 512, seg_max if flags & 8 else 0, size_max if flags & 16 else 0,
           (1 << 20) - 1, bool(flags & 32), bool(flags & 64), 256 << 10)
    journal = (hdr, desc, 1, *JOURNAL_LAYOUT) if flags & 0x80 else None

    out = blkfast.run(((0, a), (GPA_B, b)), queue, dev, journal)
    stop, taken, new_last, _, new_used, _, _, _, _, _, ok, ioerr, nbytes, written, used_event = out
    assert -1 <= used_event <= 0xFFFF and (used_event == -1 or (taken and flags & 1)), out
    assert stop in (blkfast.STOP_EMPTY, blkfast.STOP_SLOW, blkfast.STOP_MORE), out
    assert taken <= size and ok + ioerr == taken, out
    assert new_last == (last_avail + taken) & 0xFFFF and new_used == (used_idx + taken) & 0xFFFF, out
    assert written is not None
    check_reported_writes(((0, a, a0), (GPA_B, b, b0)), written, nbytes)
    if journal is None:
        assert np.array_equal(hdr, h0) and np.array_equal(desc, d0)
    else:
        assert np.array_equal(hdr[:12], h0[:12])  # features, version, desc_num: never written


if __name__ == "__main__":
    main(TestOneInput)
