"""Driver side of a split virtqueue: what our guest drivers, the PF driver and tests use.

A :class:`DriverQueue` owns three ring parts in memory it reaches through a
:class:`~virtio_lm.memory.MemoryPort` (for a guest driver, the CPU port, so
the VM's dirty log sees every ring write).  It keeps a free list of
descriptors, places chains (direct, or through an indirect table taken from
an :class:`Allocator`), publishes the avail idx, says whether the device
wants a notification, and reaps used entries, handing back the token each
chain was added with.

The device is trusted less than our own code but more than nothing: a used
entry naming a head that is not in flight, or a used idx running more than
the queue size ahead, raises :class:`~virtio_lm.errors.UsedRingError`.
"""

from __future__ import annotations

import copy

import bisect
from typing import Sequence

from virtio_lm.errors import AllocationError, DriverError, MemoryAccessError, QueueFullError, UsedRingError
from virtio_lm.memory.region import MemoryPort
from virtio_lm.virtqueue.device import Segment
from virtio_lm.wire.codec import read_u16, u16
from virtio_lm.wire.ring import (
    AVAIL_ALIGN,
    DESC_ALIGN,
    DESC_SIZE,
    USED_ALIGN,
    AvailFlags,
    DescFlags,
    UsedFlags,
    VirtqDesc,
    VirtqUsedElem,
    avail_entry_offset,
    avail_event_offset,
    avail_ring_size,
    check_queue_size,
    desc_table_size,
    need_event,
    used_elem_offset,
    used_event_offset,
    used_ring_size,
)

U16 = 0xFFFF


class Allocator:
    """First-fit allocator over ``[base, base + size)`` of a memory.

    Keeps the free ranges sorted and merged; ``free`` takes the address
    ``alloc`` returned.  Exhaustion and bad frees raise
    :class:`~virtio_lm.errors.AllocationError`.
    """

    def __init__(self, base: int, size: int) -> None:
        if base < 0 or size <= 0:
            raise AllocationError(f"allocator range [{base:#x}, +{size:#x}) is empty or negative")
        self.base = base
        self.size = size
        self._starts: list[int] = [base]  # free ranges, sorted by start
        self._ends: list[int] = [base + size]
        self._live: dict[int, int] = {}  # addr -> length

    def alloc(self, size: int, align: int = 16) -> int:
        if size <= 0:
            raise AllocationError(f"allocation of {size} bytes")
        if align <= 0 or align & (align - 1):
            raise AllocationError(f"alignment {align} is not a power of two")
        for i, (start, end) in enumerate(zip(self._starts, self._ends)):
            addr = (start + align - 1) & ~(align - 1)
            if addr + size <= end:
                del self._starts[i], self._ends[i]
                if addr + size < end:
                    self._starts.insert(i, addr + size)
                    self._ends.insert(i, end)
                if start < addr:
                    self._starts.insert(i, start)
                    self._ends.insert(i, addr)
                self._live[addr] = size
                return addr
        raise AllocationError(f"no free range of {size} bytes aligned to {align} ({self.free_bytes()} bytes free)")

    def free(self, addr: int) -> None:
        size = self._live.pop(addr, None)
        if size is None:
            raise AllocationError(f"free of {addr:#x}, which is not allocated")
        start, end = addr, addr + size
        i = bisect.bisect_left(self._starts, start)
        # merge with the following range
        if i < len(self._starts) and self._starts[i] == end:
            end = self._ends[i]
            del self._starts[i], self._ends[i]
        # merge with the preceding range
        if i > 0 and self._ends[i - 1] == start:
            self._ends[i - 1] = end
        else:
            self._starts.insert(i, start)
            self._ends.insert(i, end)

    def free_bytes(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends))

    def clone(self) -> "Allocator":
        """An independent copy (a guest driver's bookkeeping handed over in a migration)."""
        new = Allocator.__new__(Allocator)
        new.base, new.size = self.base, self.size
        new._starts, new._ends, new._live = list(self._starts), list(self._ends), dict(self._live)
        return new

    def allocated(self) -> int:
        return len(self._live)


class _InFlight:
    __slots__ = ("token", "descs", "table")

    def __init__(self, token: object, descs: list[int], table: int | None) -> None:
        self.token = token
        self.descs = descs
        self.table = table


class DriverQueue:
    """Driver side of a split virtqueue in memory."""

    def __init__(
        self,
        port: MemoryPort,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        *,
        event_idx: bool = False,
        alloc: Allocator | None = None,
    ) -> None:
        check_queue_size(size)
        for what, addr, align in (("desc", desc_addr, DESC_ALIGN), ("avail", avail_addr, AVAIL_ALIGN), ("used", used_addr, USED_ALIGN)):
            if addr % align:
                raise DriverError(f"{what} ring address {addr:#x} not aligned to {align}")
        self.port = port
        self.size = size
        self.desc_addr = desc_addr
        self.avail_addr = avail_addr
        self.used_addr = used_addr
        self.event_idx = event_idx
        self.alloc = alloc
        # The driver owns the rings' initial content: all zero.
        port.fill(desc_addr, desc_table_size(size), 0)
        port.fill(avail_addr, avail_ring_size(size, event_idx), 0)
        port.fill(used_addr, used_ring_size(size, event_idx), 0)
        self._free: list[int] = list(range(size - 1, -1, -1))  # a stack; pops 0 first
        self._inflight: dict[int, _InFlight] = {}
        self.avail_idx = 0  # published avail idx
        self._pending = 0  # added, not yet published
        self._kick_old = 0  # avail idx at the last kick_needed()
        self.last_used_idx = 0
        self.interrupts = True

    @classmethod
    def allocate(cls, port: MemoryPort, alloc: Allocator, size: int, *, event_idx: bool = False) -> "DriverQueue":
        """Allocate the three parts (each with its alignment) from ``alloc``."""
        check_queue_size(size)
        desc = alloc.alloc(desc_table_size(size), DESC_ALIGN)
        avail = alloc.alloc(avail_ring_size(size), AVAIL_ALIGN)
        used = alloc.alloc(used_ring_size(size), USED_ALIGN)
        return cls(port, size, desc, avail, used, event_idx=event_idx, alloc=alloc)

    # ------------------------------------------------------------------ indices
    def set_start_index(self, idx: int) -> None:
        """Start both rings at ``idx`` (a fresh queue only): tests of u16 wraparound, restored rings."""
        if self._inflight or self._pending:
            raise DriverError("set_start_index on a queue with chains in flight")
        idx &= U16
        self.avail_idx = idx
        self._kick_old = idx
        self.last_used_idx = idx
        self.port.write(self.avail_addr + 2, u16(idx))
        self.port.write(self.used_addr + 2, u16(idx))
        if self.event_idx:
            self.port.write(self.avail_addr + used_event_offset(self.size), u16(idx))

    def num_free(self) -> int:
        return len(self._free)

    def clone(self, port: MemoryPort | None, alloc: Allocator | None) -> "DriverQueue":
        """An independent copy of the queue's bookkeeping on ``port`` / ``alloc`` (None: detached,
        as it travels in a migration).  The chains in flight are shared records, never
        changed after :meth:`add` made them."""
        new = copy.copy(self)
        new.port = port  # type: ignore[assignment]
        new.alloc = alloc
        new._free = list(self._free)
        new._inflight = dict(self._inflight)
        return new

    def in_flight(self) -> int:
        return len(self._inflight)

    # ------------------------------------------------------------------ add
    def add(
        self,
        readable: Sequence[Segment],
        writable: Sequence[Segment],
        *,
        indirect: bool = False,
        token: object = None,
    ) -> int:
        """Place a chain (readable segments first) on the avail ring, unpublished; return its head."""
        n = len(readable) + len(writable)
        if n == 0:
            raise DriverError("a chain needs at least one segment")
        if self._pending >= self.size:
            raise QueueFullError(f"{self._pending} chains added and not published (queue size {self.size})")
        segs = [(s, 0) for s in readable] + [(s, int(DescFlags.WRITE)) for s in writable]
        port = self.port
        table: int | None = None
        if indirect:
            if self.alloc is None:
                raise DriverError("indirect chains need an allocator")
            if not self._free:
                raise QueueFullError("no free descriptor for an indirect chain")
            table = self.alloc.alloc(n * DESC_SIZE, DESC_ALIGN)
            raw = bytearray()
            for i, (s, w) in enumerate(segs):
                nxt = i + 1 if i + 1 < n else 0
                flags = w | (int(DescFlags.NEXT) if i + 1 < n else 0)
                raw += VirtqDesc(s.addr, s.len, DescFlags(flags), nxt).encode()
            try:
                port.write(table, raw)
            except MemoryAccessError:
                self.alloc.free(table)
                raise
            head = self._free.pop()
            descs = [head]
            port.write(self.desc_addr + DESC_SIZE * head, VirtqDesc(table, n * DESC_SIZE, DescFlags.INDIRECT, 0).encode())
        else:
            if n > len(self._free):
                raise QueueFullError(f"chain of {n} descriptors, {len(self._free)} free")
            descs = [self._free.pop() for _ in range(n)]
            for i, (s, w) in enumerate(segs):
                last = i + 1 == n
                flags = w | (0 if last else int(DescFlags.NEXT))
                port.write(
                    self.desc_addr + DESC_SIZE * descs[i],
                    VirtqDesc(s.addr, s.len, DescFlags(flags), 0 if last else descs[i + 1]).encode(),
                )
            head = descs[0]
        self._inflight[head] = _InFlight(token, descs, table)
        slot = (self.avail_idx + self._pending) % self.size
        port.write(self.avail_addr + avail_entry_offset(slot), u16(head))
        self._pending += 1
        return head

    def publish(self) -> None:
        """Make the added chains visible: write the avail idx (after the ring entries)."""
        if not self._pending:
            return
        self.avail_idx = (self.avail_idx + self._pending) & U16
        self._pending = 0
        self.port.write(self.avail_addr + 2, u16(self.avail_idx))

    def kick_needed(self) -> bool:
        """Whether the device wants a notification for what was published since the last call."""
        new = self.avail_idx
        old = self._kick_old
        self._kick_old = new
        if new == old:
            return False
        if self.event_idx:
            event = read_u16(self.port.read(self.used_addr + avail_event_offset(self.size), 2))
            return need_event(event, new, old)
        flags = read_u16(self.port.read(self.used_addr, 2))
        return not flags & UsedFlags.NO_NOTIFY

    # ------------------------------------------------------------------ used
    def used_idx(self) -> int:
        """The device's ``used->idx``."""
        return read_u16(self.port.read(self.used_addr + 2, 2))

    def get_used(self) -> tuple[object, int] | None:
        """``(token, written length)`` of the next used entry, freeing its descriptors; or ``None``."""
        used = self.used_idx()
        last = self.last_used_idx
        if used == last:
            return None
        ahead = (used - last) & U16
        if ahead > self.size:
            raise UsedRingError(f"used idx {used} is {ahead} ahead of {last} (queue size {self.size})")
        elem = VirtqUsedElem.unpack_from(self.port.read(self.used_addr + used_elem_offset(last % self.size), 8))
        entry = self._inflight.pop(elem.id, None)
        if entry is None:
            raise UsedRingError(f"used entry {last} names head {elem.id}, which is not in flight")
        self._free.extend(reversed(entry.descs))
        if entry.table is not None and self.alloc is not None:
            self.alloc.free(entry.table)
        self.last_used_idx = (last + 1) & U16
        if self.event_idx and self.interrupts:
            self.port.write(self.avail_addr + used_event_offset(self.size), u16(self.last_used_idx))
        return entry.token, elem.len

    def get_all_used(self) -> list[tuple[object, int]]:
        out = []
        while (item := self.get_used()) is not None:
            out.append(item)
        return out

    def set_interrupts(self, enabled: bool) -> None:
        """Ask the device for used-buffer interrupts (or not).

        Without EVENT_IDX: the avail ring's NO_INTERRUPT flag.  With it:
        ``used_event`` = the next used index to be reaped (enabled), or that
        index + 0x8000 (disabled: the device's u16 window never reaches it
        while fewer than 0x8000 entries are outstanding).
        """
        self.interrupts = enabled
        if self.event_idx:
            value = self.last_used_idx if enabled else (self.last_used_idx + 0x8000) & U16
            self.port.write(self.avail_addr + used_event_offset(self.size), u16(value))
        else:
            flags = read_u16(self.port.read(self.avail_addr, 2))
            flags = flags & ~int(AvailFlags.NO_INTERRUPT) if enabled else flags | int(AvailFlags.NO_INTERRUPT)
            self.port.write(self.avail_addr, u16(flags & U16))

    def set_used_event(self, value: int) -> None:
        """Write ``used_event`` directly (tests of the device's EVENT_IDX logic)."""
        self.port.write(self.avail_addr + used_event_offset(self.size), u16(value & U16))

    # ------------------------------------------------------------------ hostile planting (tests)
    def write_desc(self, index: int, desc: VirtqDesc) -> None:
        """Write a raw descriptor into table entry ``index``."""
        if not 0 <= index < self.size:
            raise DriverError(f"descriptor index {index} outside the table of {self.size}")
        self.port.write(self.desc_addr + DESC_SIZE * index, desc.encode())

    def put_avail(self, head: int) -> None:
        """Raw: ``ring[avail_idx % size] = head``; ``avail_idx += 1``, published."""
        self.port.write(self.avail_addr + avail_entry_offset(self.avail_idx % self.size), u16(head & U16))
        self.set_avail_idx(self.avail_idx + 1)

    def set_avail_idx(self, idx: int) -> None:
        self.avail_idx = idx & U16
        self.port.write(self.avail_addr + 2, u16(self.avail_idx))

    def __repr__(self) -> str:
        return (
            f"DriverQueue(size={self.size}, avail={self.avail_idx}, last_used={self.last_used_idx}, "
            f"free={len(self._free)}, in_flight={len(self._inflight)})"
        )
