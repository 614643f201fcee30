"""The virtio-net transmit C fast path (``virtio_lm.devices.netfast.tx``) over guest memory the
input fills.

Two regions of guest memory (16 KiB at gpa 0 and 16 KiB at gpa 0x10000), their every byte from
the input: descriptor table at 0, avail ring at 0x1000, used ring at 0x2000, and whatever
descriptors, indirect tables, headers and frames the bytes make.  The queue's size, indices and
features, the longest frame served and the chains a call may take from the input too.

Input: ``flags u8, size_log2 u8 (mod 7: sizes 1..64), last_avail u16, used_idx u16,
avail_cache u16 (used when flags bit 7), max_frame u16, max_chains u8, region bytes...``.

Invariants:
* ``tx`` returns (no crash, no exception) and its stop code is 0, 1 or 2;
* it takes at most a queue's worth and ``max_chains`` chains; ``last_avail`` and ``used_idx``
  advance by the chains taken, and it returns one frame per chain taken, each of ETH_HLEN to
  max_frame bytes;
* every guest-memory write it reports lies inside a region, their total is the reported byte
  count, and **no byte of guest memory changes outside the reported writes** (a write the dirty
  trackers would not hear of).
"""

from __future__ import annotations

import numpy as np
from fuzzlib import Reader, check_reported_writes, main

from virtio_lm.devices import netfast

REGION = 16 << 10
GPA_B = 0x10000
# reused by every input (a fresh 16 KiB numpy array per input grows atheris's RSS without bound)
A, B, A0, B0 = (np.zeros(REGION, np.uint8) for _ in range(4))


def TestOneInput(data: bytes) -> None:
    r = Reader(data)
    flags = r.u8()
    size = 1 << (r.u8() % 7)
    last_avail, used_idx, cache = r.u16(), r.u16(), r.u16()
    max_frame = max(14, r.u16())
    max_chains = 1 + r.u8() % netfast.MAX_CHAINS
    a, b, a0, b0 = A, B, A0, B0
    a[:] = np.frombuffer(r.bytes(REGION).ljust(REGION, b"\0"), np.uint8)
    b[:] = np.frombuffer(r.bytes(REGION).ljust(REGION, b"\0"), np.uint8)
    a0[:] = a
    b0[:] = b
    queue = (size, 0x0, 0x1000, 0x2000, last_avail, cache if flags & 0x80 else -1, used_idx,
             bool(flags & 1), bool(flags & 2), bool(flags & 4))

    out = netfast.tx(((0, a), (GPA_B, b)), queue, max_frame, max_chains)
    stop, taken, new_last, _, new_used, frames, nbytes, written, used_event = out
    assert -1 <= used_event <= 0xFFFF and (used_event == -1 or (taken and flags & 1)), out[:5]
    assert stop in (netfast.STOP_EMPTY, netfast.STOP_SLOW, netfast.STOP_MORE), out[:5]
    assert taken <= min(size, max_chains), out[:5]
    assert new_last == (last_avail + taken) & 0xFFFF and new_used == (used_idx + taken) & 0xFFFF, out[:5]
    assert frames is not None and len(frames) == taken and all(14 <= len(f) <= max_frame for f in frames)
    assert written is not None
    check_reported_writes(((0, a, a0), (GPA_B, b, b0)), written, nbytes)


if __name__ == "__main__":
    main(TestOneInput)
