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

Both own their saved state (a guest driver's bookkeeping moves with a
migration): :meth:`Allocator.save` / :meth:`Allocator.from_state` and
:meth:`DriverQueue.save` / :meth:`DriverQueue.from_state` turn them into frozen
:class:`AllocatorState` / :class:`DriverQueueState` and back, and
``from_state`` checks every invariant the class keeps (saved state is
untrusted: it crossed the network), raising
:class:`~virtio_lm.errors.GuestStateError` with the field's path relative to
the state (``"free[3]"``).
"""

from __future__ import annotations

import bisect
import copy
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from virtio_lm.errors import (
    AllocationError,
    DriverError,
    GuestStateError,
    MemoryAccessError,
    QueueFullError,
    UsedRingError,
)
from virtio_lm.memory.region import MemoryPort
from virtio_lm.virtqueue.device import Segment
from virtio_lm.wire.codec import read_u16, u16
from virtio_lm.wire.ring import (
    AVAIL_ALIGN,
    AVAIL_ENTRY_DTYPE,
    DESC_ALIGN,
    DESC_SIZE,
    MAX_QUEUE_SIZE,
    USED_ALIGN,
    USED_ELEM_DTYPE,
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
U64 = (1 << 64) - 1


def _at(path: str, sub: str) -> str:
    return f"{path}.{sub}" if path else sub


@dataclass(frozen=True)
class AllocatorState:
    """An :class:`Allocator`'s bookkeeping: its range, the free ranges ``(start, end)`` and the
    live allocations ``(addr, length)``, both sorted by address."""

    base: int
    size: int
    free: tuple[tuple[int, int], ...]
    live: tuple[tuple[int, int], ...]


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

    def length_of(self, addr: int) -> int | None:
        """The length of the live allocation at ``addr`` (None: not one)."""
        return self._live.get(addr)

    def save(self) -> AllocatorState:
        return AllocatorState(self.base, self.size, tuple(zip(self._starts, self._ends)), tuple(sorted(self._live.items())))

    @classmethod
    def from_state(cls, st: AllocatorState, path: str = "") -> "Allocator":
        """An allocator continuing ``st``: its free ranges are non-empty, sorted and merged,
        its live allocations sorted, and together they tile ``[base, base + size)``."""
        base, size = st.base, st.size
        if base < 0 or size < 1:
            raise GuestStateError(_at(path, "size"), f"range [{base:#x}, +{size:#x}) is empty or negative")
        end = base + size
        if end > U64 + 1:
            raise GuestStateError(_at(path, "size"), f"range [{base:#x}, +{size:#x}) passes 2**64")
        pieces: list[tuple[int, int, str]] = []

        def ranges(key: str, items: tuple[tuple[int, int], ...], second_is_end: bool) -> None:
            prev_end = -1
            for i, (s, x) in enumerate(items):
                p = _at(path, f"{key}[{i}]")
                if not base <= s <= end:
                    raise GuestStateError(f"{p}[0]", f"{s} is outside {base}..{end}")
                if not 1 <= x <= U64:
                    raise GuestStateError(f"{p}[1]", f"{x} is outside 1..{U64}")
                e = x if second_is_end else s + x
                if e <= s:
                    raise GuestStateError(p, f"empty range [{s:#x}, {e:#x})")
                if e > end:
                    raise GuestStateError(p, f"range [{s:#x}, {e:#x}) leaves the allocator's [{base:#x}, {end:#x})")
                if s < prev_end or (second_is_end and s == prev_end):
                    raise GuestStateError(p, "ranges not sorted, overlapping" + (" or not merged" if second_is_end else ""))
                prev_end = e
                pieces.append((s, e, p))

        ranges("free", st.free, True)
        ranges("live", st.live, False)
        pieces.sort()
        pos = base
        for s, e, p in pieces:
            if s < pos:
                raise GuestStateError(p, f"range [{s:#x}, {e:#x}) overlaps another free or live range")
            if s > pos:
                raise GuestStateError(p, f"bytes [{pos:#x}, {s:#x}) are neither free nor allocated")
            pos = e
        if pos != end:
            raise GuestStateError(path or "alloc", f"bytes [{pos:#x}, {end:#x}) are neither free nor allocated")
        a = cls.__new__(cls)
        a.base, a.size = base, size
        a._starts = [s for s, _ in st.free]
        a._ends = [e for _, e in st.free]
        a._live = dict(st.live)
        return a

    def clone(self) -> "Allocator":
        """An independent copy (a guest driver's bookkeeping handed over in a migration)."""
        new = Allocator.__new__(Allocator)
        new.base, new.size = self.base, self.size
        new._starts, new._ends, new._live = list(self._starts), list(self._ends), dict(self._live)
        return new

    def allocated(self) -> int:
        return len(self._live)


class ChainState(NamedTuple):
    """One chain in flight: its head, its descriptors in chain order (the head first), its
    indirect table (a live allocation of the queue's allocator) or None, and the token the
    driver added it with.  The queue keeps these records as they are (immutable)."""

    head: int
    descs: tuple[int, ...]
    table: int | None
    token: object


@dataclass(frozen=True)
class DriverQueueState:
    """A :class:`DriverQueue`'s bookkeeping (the rings themselves are guest memory)."""

    size: int
    desc_addr: int
    avail_addr: int
    used_addr: int
    event_idx: bool
    free: tuple[int, ...]  # the free-descriptor stack, bottom first
    in_flight: tuple[ChainState, ...]  # in the order they were added
    avail_idx: int
    pending: int  # added, not yet published
    kick_old: int
    last_used_idx: int
    interrupts: bool


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
        self._inflight: dict[int, ChainState] = {}
        self.avail_idx = 0  # published avail idx
        self._pending = 0  # added, not yet published
        self._kick_old = 0  # avail idx at the last kick_needed()
        self.last_used_idx = 0
        self.interrupts = True
        self._standing: dict[int, ChainState] = {}  # standing chains not posted, by head
        self._standing_heads: set[int] = set()  # every standing chain's head, posted or not

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

    def chains(self) -> Iterator[ChainState]:
        """The chains in flight, in the order they were added."""
        return iter(self._inflight.values())

    def save(self) -> DriverQueueState:
        """The bookkeeping; refused (DriverError) while standing chains exist (:meth:`add_standing`:
        they are a bench driver's, and the state has no place for them -- release them first)."""
        if self._standing_heads:
            raise DriverError(f"{len(self._standing_heads)} standing chains: release them before saving the queue")
        return DriverQueueState(
            self.size, self.desc_addr, self.avail_addr, self.used_addr, self.event_idx, tuple(self._free),
            tuple(self._inflight.values()), self.avail_idx, self._pending, self._kick_old, self.last_used_idx,
            self.interrupts,
        )

    @classmethod
    def from_state(
        cls, st: DriverQueueState, *, port: MemoryPort | None, alloc: Allocator | None, path: str = ""
    ) -> "DriverQueue":
        """A queue continuing ``st`` on ``port`` (None: detached) with ``alloc`` for its indirect
        tables.  Checks: the size is a power of two in 1..32768; the ring parts are aligned,
        in the address space and disjoint; the free list and the chains in flight partition
        the descriptors ``0..size-1``; each chain's head is its first descriptor; an
        indirect chain has one descriptor and its own aligned table, a live allocation of
        ``alloc`` (when given); the indices are u16 and the chains in flight number
        ``avail_idx + pending - last_used_idx`` (mod 2**16).  Nothing is written to memory."""
        size = st.size
        if not 1 <= size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise GuestStateError(_at(path, "size"), f"queue size {size} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        parts = []
        for key, addr, align, length in (
            ("desc_addr", st.desc_addr, DESC_ALIGN, desc_table_size(size)),
            ("avail_addr", st.avail_addr, AVAIL_ALIGN, avail_ring_size(size, st.event_idx)),
            ("used_addr", st.used_addr, USED_ALIGN, used_ring_size(size, st.event_idx)),
        ):
            if not 0 <= addr <= U64 + 1 - length:
                raise GuestStateError(_at(path, key), f"{addr} is outside 0..{U64 + 1 - length}")
            if addr % align:
                raise GuestStateError(_at(path, key), f"address {addr:#x} not aligned to {align}")
            parts.append((addr, addr + length, key))
        parts.sort()
        for (_, e1, k1), (s2, _, k2) in zip(parts, parts[1:]):
            if s2 < e1:
                raise GuestStateError(_at(path, k2), f"ring part overlaps {k1}")
        free = list(st.free)
        seen: set[int] = set(free)
        if len(seen) != len(free) or (free and not (0 <= min(free) and max(free) < size)):
            owner: dict[int, str] = {}
            for i, x in enumerate(free):
                p = _at(path, f"free[{i}]")
                if not 0 <= x < size:
                    raise GuestStateError(p, f"{x} is outside 0..{size - 1}")
                if x in owner:
                    raise GuestStateError(p, f"descriptor {x} already in {owner[x]}")
                owner[x] = p
        inflight: dict[int, ChainState] = {}
        tables: set[int] = set()
        n_descs = len(free)
        for i, c in enumerate(st.in_flight):
            descs = c.descs
            if descs and descs[0] == c.head and c.table is None and c.head not in inflight:
                # the common chain: direct, head first; its descriptors' range and ownership below
                n_descs += len(descs)
                seen.update(descs)
                inflight[c.head] = c if type(descs) is tuple else c._replace(descs=tuple(descs))
                continue
            p = _at(path, f"in_flight[{i}]")
            if not 0 <= c.head < size:
                raise GuestStateError(f"{p}.head", f"{c.head} is outside 0..{size - 1}")
            if not descs:
                raise GuestStateError(f"{p}.descs", "a chain has at least one descriptor")
            if descs[0] != c.head:
                raise GuestStateError(f"{p}.head", f"head {c.head} is not the chain's first descriptor {descs[0]}")
            if c.head in inflight:
                raise GuestStateError(f"{p}.head", f"head {c.head} is in flight twice")
            if c.table is not None:
                if len(descs) != 1:
                    raise GuestStateError(f"{p}.descs", "an indirect chain uses exactly one descriptor")
                if c.table % DESC_ALIGN:
                    raise GuestStateError(f"{p}.table", f"indirect table {c.table:#x} not aligned to {DESC_ALIGN}")
                if c.table in tables:
                    raise GuestStateError(f"{p}.table", f"indirect table {c.table:#x} used by two chains")
                if alloc is not None and alloc.length_of(c.table) is None:
                    raise GuestStateError(f"{p}.table", f"indirect table {c.table:#x} is not a live allocation")
                tables.add(c.table)
            n_descs += len(descs)
            seen.update(descs)
            inflight[c.head] = c._replace(descs=tuple(descs))
        if n_descs != len(seen) or len(seen) != size or min(seen, default=0) < 0 or max(seen, default=0) >= size:
            cls._culprit(st, size, path)  # raises, naming the descriptor and where it is
        for key, v in (("avail_idx", st.avail_idx), ("kick_old", st.kick_old), ("last_used_idx", st.last_used_idx)):
            if not 0 <= v <= U16:
                raise GuestStateError(_at(path, key), f"{v} is outside 0..{U16}")
        if not 0 <= st.pending <= size:
            raise GuestStateError(_at(path, "pending"), f"{st.pending} is outside 0..{size}")
        outstanding = (st.avail_idx + st.pending - st.last_used_idx) & U16
        if outstanding != len(inflight):
            raise GuestStateError(
                _at(path, "in_flight"),
                f"{len(inflight)} chains in flight, but avail_idx {st.avail_idx} + pending {st.pending} - "
                f"last_used_idx {st.last_used_idx} = {outstanding}",
            )
        dq = cls.__new__(cls)
        dq.port = port  # type: ignore[assignment]
        dq.size = size
        dq.desc_addr, dq.avail_addr, dq.used_addr = st.desc_addr, st.avail_addr, st.used_addr
        dq.event_idx = st.event_idx
        dq.alloc = alloc
        dq._free = free
        dq._inflight = inflight
        dq.avail_idx = st.avail_idx
        dq._pending = st.pending
        dq._kick_old = st.kick_old
        dq.last_used_idx = st.last_used_idx
        dq.interrupts = st.interrupts
        dq._standing = {}
        dq._standing_heads = set()
        return dq

    @staticmethod
    def _culprit(st: DriverQueueState, size: int, path: str) -> None:
        """The descriptor that breaks the partition of ``0..size-1``: out of range, in two
        places, or in none."""
        owner: dict[int, str] = {}
        for i, x in enumerate(st.free):
            owner[x] = _at(path, f"free[{i}]")
        for i, c in enumerate(st.in_flight):
            for j, x in enumerate(c.descs):
                p = _at(path, f"in_flight[{i}]")
                if not 0 <= x < size:
                    raise GuestStateError(f"{p}.descs[{j}]", f"{x} is outside 0..{size - 1}")
                if x in owner:
                    raise GuestStateError(f"{p}.descs[{j}]", f"descriptor {x} already in {owner[x]}")
                owner[x] = p
        lost = min(set(range(size)) - set(owner))
        raise GuestStateError(_at(path, "free"), f"descriptor {lost} is neither free nor in flight")

    def clone(self, port: MemoryPort | None, alloc: Allocator | None) -> "DriverQueue":
        """An independent copy of the queue's bookkeeping on ``port`` / ``alloc`` (None: detached,
        as it travels in a migration).  The chains in flight are shared records, never
        changed after :meth:`add` made them."""
        new = copy.copy(self)
        new.port = port  # type: ignore[assignment]
        new.alloc = alloc
        new._free = list(self._free)
        new._inflight = dict(self._inflight)
        new._standing = dict(self._standing)
        new._standing_heads = set(self._standing_heads)
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
        standing: bool = False,
    ) -> int:
        """Place a chain (readable segments first) on the avail ring, unpublished; return its head
        (``standing``: see :meth:`add_standing`)."""
        n = len(readable) + len(writable)
        if n == 0:
            raise DriverError("a chain needs at least one segment")
        if self._pending >= self.size and not standing:
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
        chain = ChainState(head, tuple(descs), table, token)
        if standing:
            self._standing[head] = chain
            self._standing_heads.add(head)
            return head
        self._inflight[head] = chain
        slot = (self.avail_idx + self._pending) % self.size
        port.write(self.avail_addr + avail_entry_offset(slot), u16(head))
        self._pending += 1
        return head

    # ------------------------------------------------------------------ standing chains
    def add_standing(self, readable: Sequence[Segment], writable: Sequence[Segment], *, indirect: bool = False,
                     token: object = None) -> int:
        """Write a chain's descriptors once and keep them: the chain is not placed on the avail
        ring, and after each use it stands again instead of its descriptors being freed.  Post it
        (again) with :meth:`post`; :meth:`release_standing` frees it.  A load generator reusing
        its requests' buffers (fio's fixed buffers) places each request this way: a new request
        is a new header in the same buffers and one avail entry."""
        return self.add(readable, writable, indirect=indirect, token=token, standing=True)

    def post(self, heads: Sequence[int]) -> None:
        """Place standing chains on the avail ring, unpublished, in one write per contiguous run
        of ring slots (:meth:`publish` makes them visible).  Every head must be standing and not
        posted (DriverError), and fit in the ring (QueueFullError); nothing is placed otherwise."""
        n = len(heads)
        if self._pending + n > self.size:
            raise QueueFullError(f"{self._pending} chains added, {n} more to post (queue size {self.size})")
        standing = self._standing
        for h in heads:
            if h not in standing:
                posted = h in self._standing_heads
                raise DriverError(f"head {h} is {'already posted' if posted else 'not a standing chain'}")
        if len(set(heads)) != n:
            raise DriverError("the same head twice in one post")
        for h in heads:
            self._inflight[h] = standing.pop(h)
        entries = np.asarray(heads, dtype=AVAIL_ENTRY_DTYPE)
        start = (self.avail_idx + self._pending) % self.size
        first = min(n, self.size - start)
        port = self.port
        if first:
            port.write(self.avail_addr + avail_entry_offset(start), entries[:first].tobytes())
        if n > first:
            port.write(self.avail_addr + avail_entry_offset(0), entries[first:].tobytes())
        self._pending += n

    def release_standing(self, head: int) -> None:
        """Free a standing chain that is not posted: its descriptors (and indirect table) go back."""
        chain = self._standing.pop(head, None)
        if chain is None:
            raise DriverError(f"head {head} is not a standing chain waiting to be posted")
        self._standing_heads.discard(head)
        self._free_chain(chain)

    def take_used(self) -> list[tuple[object, int]]:
        """``(token, written length)`` of every used entry there now, in ring order: the run of
        the used ring read at once (two reads where it wraps).  A standing chain stands again;
        another's descriptors are freed as :meth:`get_used` frees them.  The checks are
        :meth:`get_used`'s; an entry that fails them raises after the entries before it are taken."""
        used = self.used_idx()
        last = self.last_used_idx
        ahead = (used - last) & U16
        if not ahead:
            return []
        if ahead > self.size:
            raise UsedRingError(f"used idx {used} is {ahead} ahead of {last} (queue size {self.size})")
        start = last % self.size
        first = min(ahead, self.size - start)
        raw = self.port.read(self.used_addr + used_elem_offset(start), first * USED_ELEM_DTYPE.itemsize)
        if ahead > first:
            raw += self.port.read(self.used_addr + used_elem_offset(0), (ahead - first) * USED_ELEM_DTYPE.itemsize)
        elems = np.frombuffer(raw, dtype=USED_ELEM_DTYPE)
        out: list[tuple[object, int]] = []
        inflight = self._inflight
        try:
            for head, length in zip(elems["id"].tolist(), elems["len"].tolist()):
                entry = inflight.pop(head, None)
                if entry is None:
                    raise UsedRingError(f"used entry {(last + len(out)) & U16} names head {head}, which is not in flight")
                self._returned(entry)
                out.append((entry.token, length))
        finally:
            if out:
                self._reaped_to((last + len(out)) & U16)
        return out

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
        self._returned(entry)
        self._reaped_to((last + 1) & U16)
        return entry.token, elem.len

    def _returned(self, chain: ChainState) -> None:
        """A chain the device returned: a standing one stands again, another is freed."""
        if chain.head in self._standing_heads:
            self._standing[chain.head] = chain
        else:
            self._free_chain(chain)

    def _free_chain(self, chain: ChainState) -> None:
        """Its descriptors back on the free list, its indirect table (if any) back to the allocator."""
        self._free.extend(reversed(chain.descs))
        if chain.table is not None and self.alloc is not None:
            self.alloc.free(chain.table)

    def _reaped_to(self, last_used_idx: int) -> None:
        """Entries up to ``last_used_idx`` are reaped; with EVENT_IDX and interrupts wanted, the
        driver's used_event follows."""
        self.last_used_idx = last_used_idx
        if self.event_idx and self.interrupts:
            self.port.write(self.avail_addr + used_event_offset(self.size), u16(last_used_idx))

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
