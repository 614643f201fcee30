"""Descriptor chains planted through the driver side, popped by the device side.

The guest driver's queue (:class:`DriverQueue`, 8 entries) writes whatever the
input says straight into guest memory through the driver's port: raw 16-byte
descriptors (any address, length, flags, next -- indirect tables included), a raw
scratch area descriptors can point at (an indirect table, a buffer), avail ring
entries and the avail index.  The device side (:class:`Virtqueue`) then pops.

Input: ``event_idx u8, ndesc u8 (mod 9), ndesc * 16 raw descriptor bytes,
scratch_len u8, scratch bytes (written at SCRATCH), navail u8 (mod 17), navail *
u16 heads, avail_idx u16 (used when its flag byte is odd)``.

Invariants:
* ``pop`` never raises; a hostile chain is reported once to ``on_error`` as a
  :class:`VirtqueueError`, the queue is then broken and every later pop returns
  None without reporting again.
* ``pop`` writes nothing to guest memory but, with EVENT_IDX, the used ring's
  ``avail_event`` (the device's notification threshold).
* A chain it returns lies inside guest memory, its readable / writable lengths
  are the sums of its segments, and ``last_avail_idx`` advances by one per chain.
"""

from __future__ import annotations

from fuzzlib import Reader, main

from virtio_lm.errors import VirtqueueError
from virtio_lm.memory import Memory
from virtio_lm.virtqueue import Allocator, DriverQueue, Virtqueue
from virtio_lm.wire.ring import DESC_SIZE, avail_event_offset

MEM = 64 << 10
SIZE = 8
SCRATCH = 0x8000
MAX_POPS = 32


def TestOneInput(data: bytes) -> None:
    r = Reader(data)
    event_idx = bool(r.u8() & 1)
    mem = Memory(MEM, name="fuzz-vq")
    try:
        dq = DriverQueue.allocate(mem.cpu, Allocator(0, SCRATCH), SIZE, event_idx=event_idx)
        port = mem.device_port("fuzz-vq-dev")
        vq = Virtqueue(0, SIZE, name="fuzz")
        vq.desc_addr, vq.avail_addr, vq.used_addr = dq.desc_addr, dq.avail_addr, dq.used_addr
        vq.event_idx = event_idx
        vq.indirect_desc = True
        vq.check_config(port)
        vq.enabled = True
        errors: list[VirtqueueError] = []
        vq.on_error = errors.append

        for i in range(r.u8() % (SIZE + 1)):
            dq.port.write(dq.desc_addr + DESC_SIZE * i, r.bytes(DESC_SIZE).ljust(DESC_SIZE, b"\0"))
        scratch = r.bytes(r.u8())
        if scratch:
            dq.port.write(SCRATCH, scratch)
        for _ in range(r.u8() % (2 * SIZE + 1)):
            dq.put_avail(r.u16())
        if r.u8() & 1:
            dq.set_avail_idx(r.u16())

        event_at = dq.used_addr + avail_event_offset(SIZE)
        before = bytearray(mem.read(0, MEM))
        popped = 0
        for _ in range(MAX_POPS):
            last = vq.last_avail_idx
            chain = vq.pop(port)  # must not raise
            if chain is None:
                break
            popped += 1
            assert vq.last_avail_idx == (last + 1) & 0xFFFF
            assert chain.readable_len == sum(s.len for s in chain.readable)
            assert chain.writable_len == sum(s.len for s in chain.writable)
            for s in chain.readable + chain.writable:
                assert 0 <= s.addr and s.addr + s.len <= MEM, s
        after = bytearray(mem.read(0, MEM))
        if event_idx:  # the one field the device may write while popping
            after[event_at : event_at + 2] = before[event_at : event_at + 2]
        assert after == before, "pop wrote to guest memory"
        assert len(errors) <= 1, errors
        if errors:
            assert vq.broken
            assert vq.pop(port) is None and len(errors) == 1
        else:
            assert not vq.broken
    finally:
        mem.close()


if __name__ == "__main__":
    main(TestOneInput)
