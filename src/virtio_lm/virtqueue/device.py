"""Device side of a split virtqueue (virtio 1.x, 2.7).

A :class:`Virtqueue` holds what the transport configured (size, the three
ring addresses, negotiated ring features) and the device's shadow state
(``last_avail_idx``, ``used_idx``, the used index last signalled).  Every
ring access goes through the :class:`~virtio_lm.memory.MemoryPort` passed
in, so reads are bounds-checked and the device's writes (used elements, used
idx, avail_event, data written into buffers) reach its dirty tracker.

Ring content is written by the driver and is untrusted.  :meth:`Virtqueue.pop`
walks a chain with every step checked; anything malformed raises one of the
:class:`~virtio_lm.errors.VirtqueueError` subclasses internally, which marks
the queue ``broken``, is handed to ``on_error`` (the transport sets
NEEDS_RESET) and makes ``pop`` return ``None`` from then on.  Nothing of it
escapes to the device's processing loop, and a walk always ends: a direct
chain visits each of ``size`` descriptors at most once, an indirect table
each of its entries at most once.
"""

from __future__ import annotations

from dataclasses import dataclass
from bisect import bisect_left, bisect_right
from itertools import accumulate, repeat
from operator import add, itemgetter
from typing import Callable, Iterable, NamedTuple, Sequence, TypeVar

from virtio_lm.errors import (
    AvailIndexError,
    ChainLengthError,
    ChainSpaceError,
    DescriptorAddressError,
    DescriptorIndexError,
    DescriptorLoopError,
    DescriptorOrderError,
    FieldValueError,
    IndirectDescriptorError,
    MemoryAccessError,
    RingAddressError,
    VirtqueueError,
)
from virtio_lm.memory.region import MemoryPort
from virtio_lm.wire.codec import read_u16, u16, u32
from virtio_lm.wire.ring import (
    AVAIL_ALIGN,
    DESC_ALIGN,
    DESC_SIZE,
    MAX_QUEUE_SIZE,
    USED_ALIGN,
    AvailFlags,
    DescFlags,
    UsedFlags,
    avail_entry_offset,
    avail_event_offset,
    avail_ring_size,
    check_queue_size,
    desc_table_size,
    need_event,
    read_desc,
    read_desc_table,
    used_elem_offset,
    used_event_offset,
    used_ring_size,
)

U16 = 0xFFFF
R = TypeVar("R")
U32_MAX = 0xFFFF_FFFF
U64_LIMIT = 1 << 64

#: Largest indirect table accepted, in entries.  The spec bounds a chain by
#: the queue size for direct chains only; Linux builds indirect tables longer
#: than the queue, so the bound is the largest queue size (a 512 KiB table),
#: which keeps every walk finite and small.
MAX_INDIRECT_ENTRIES = MAX_QUEUE_SIZE

#: Indirect tables of at least this many entries are first checked in one pass over the whole
#: table (:func:`_linear_table`, C-level operations on its unpacked fields), which takes the
#: chain drivers build -- entries 0, 1, ..., n-1 in order, readable before writable; any other
#: table, and shorter ones, take the entry-by-entry walk, which names the fault.
FAST_WALK_MIN = 8

_NEXT = int(DescFlags.NEXT)
_WRITE = int(DescFlags.WRITE)
_INDIRECT = int(DescFlags.INDIRECT)
_SEQ = tuple(range(1, MAX_INDIRECT_ENTRIES))  # entry i's next in a table in order: i + 1
_R = _NEXT  # an entry before the last, readable
_RW = _NEXT | _WRITE  # an entry before the last, writable
_len_of = itemgetter(1)  # a Segment's len
_new_segment = tuple.__new__  # Segment from an (addr, len) pair at C speed, through map()


class Segment(NamedTuple):
    """One guest-memory buffer of a chain: an ``(addr, len)`` pair (a tuple: cheap to make on
    the hot path, and already the ``(addr, length)`` piece the memory's vector calls take)."""

    addr: int
    len: int


def _pieces(segments: tuple[Segment, ...], offset: int, length: int) -> Sequence[tuple[int, int]]:
    """The ``(addr, n)`` pieces of ``length`` bytes from ``offset`` of ``segments``.  The common
    cases -- everything, or everything but the last few segments from 0 (a read's data before
    its status byte) -- are a slice of ``segments`` itself: the shortest prefix that holds
    exactly ``length`` bytes, found on the running totals (C-level, no per-segment Python)."""
    if offset == 0:
        if length == 0:
            return segments[:0]
        if segments and segments[0][1] == length:  # a request's header, alone in its buffer
            return segments[:1]
        ends = list(accumulate(map(_len_of, segments)))
        k = bisect_left(ends, length)
        if k < len(ends) and ends[k] == length:
            return segments[: k + 1]
    return [(addr, n) for addr, _, n in _scatter_plan(segments, offset, length)]


def _scatter_plan(segments: tuple[Segment, ...], offset: int, length: int) -> Iterable[tuple[int, int, int]]:
    """Yield ``(addr, data_offset, n)`` pieces covering ``length`` bytes from ``offset``."""
    pos = 0
    done = 0
    for seg in segments:
        if done >= length:
            break
        seg_end = pos + seg.len
        if seg_end > offset:
            start = max(offset, pos) - pos
            n = min(seg.len - start, length - done)
            if n > 0:
                yield seg.addr + start, done, n
                done += n
        pos = seg_end


def piece_lengths(segs: Sequence[Segment], start: int, length: int) -> list[int]:
    """Lengths of the parts of ``segs`` (in order) that overlap bytes ``[start, start+length)``,
    empty parts left out (the ``n`` of each piece :func:`_scatter_plan` yields; a device checks
    SEG_MAX / SIZE_MAX on them).  Found on the running totals: the first and last segments touched by
    bisection, the ones between them whole (C-level; a request has up to ``seg_max`` segments)."""
    if length <= 0:
        return []
    lens = list(map(_len_of, segs))
    ends = list(accumulate(lens))
    end = start + length
    i0 = bisect_right(ends, start)  # the first segment ending after start
    if i0 == len(ends):
        return []
    i1 = min(bisect_left(ends, end), len(ends) - 1)  # the segment holding byte end - 1, or the last
    first_lo = max(ends[i0] - lens[i0], start)
    if i0 == i1:
        n = min(ends[i0], end) - first_lo
        return [n] if n > 0 else []
    out = [ends[i0] - first_lo]
    out += filter(None, lens[i0 + 1 : i1])
    n = min(ends[i1], end) - ends[i1 - 1]
    if n > 0:
        out.append(n)
    return out


@dataclass(frozen=True)
class DescriptorChain:
    """A chain taken from the avail ring, split into its readable and writable parts."""

    head: int
    readable: tuple[Segment, ...]
    writable: tuple[Segment, ...]
    avail_idx: int
    readable_len: int
    writable_len: int
    queue: str = ""
    indirect: bool = False

    def read(self, port: MemoryPort) -> bytes:
        """All readable bytes, concatenated."""
        if len(self.readable) == 1:
            s = self.readable[0]
            return port.read(s.addr, s.len)
        return b"".join(port.read(s.addr, s.len) for s in self.readable)

    def read_range(self, port: MemoryPort, offset: int, length: int) -> bytes:
        """``length`` bytes of the readable part from ``offset``."""
        if offset < 0 or length < 0 or offset + length > self.readable_len:
            raise ChainSpaceError(
                self.queue,
                f"read of [{offset}, +{length}) beyond the readable part ({self.readable_len} bytes)",
            )
        return port.readv(_pieces(self.readable, offset, length))

    def write(self, port: MemoryPort, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Scatter ``data`` into the writable part from ``offset``; returns bytes written."""
        length = len(data)
        if offset < 0 or offset + length > self.writable_len:
            raise ChainSpaceError(
                self.queue,
                f"write of [{offset}, +{length}) beyond the writable part ({self.writable_len} bytes)",
            )
        view = memoryview(data).cast("B")
        port.writev([(addr, view[at : at + n]) for addr, at, n in _scatter_plan(self.writable, offset, length)])
        return length

    def pread_into(self, port: MemoryPort, fd: int, file_offset: int, length: int, offset: int = 0) -> int:
        """DMA from a file: read ``length`` bytes of ``fd`` from ``file_offset`` straight into the
        writable part from ``offset`` (zero-copy, :meth:`MemoryPort.preadv`); the bytes read
        (fewer only where the file ends)."""
        if offset < 0 or length < 0 or offset + length > self.writable_len:
            raise ChainSpaceError(
                self.queue,
                f"read into [{offset}, +{length}) beyond the writable part ({self.writable_len} bytes)",
            )
        return port.preadv(fd, file_offset, _pieces(self.writable, offset, length))

    def pwrite_from(self, port: MemoryPort, fd: int, file_offset: int, offset: int, length: int) -> int:
        """DMA to a file: write ``length`` bytes of the readable part from ``offset`` to ``fd`` at
        ``file_offset`` (zero-copy, :meth:`MemoryPort.pwritev`); the bytes written."""
        if offset < 0 or length < 0 or offset + length > self.readable_len:
            raise ChainSpaceError(
                self.queue,
                f"write of [{offset}, +{length}) beyond the readable part ({self.readable_len} bytes)",
            )
        return port.pwritev(fd, file_offset, _pieces(self.readable, offset, length))


def _segments(addrs: tuple[int, ...], lens: tuple[int, ...]) -> tuple[Segment, ...]:
    return tuple(map(_new_segment, repeat(Segment), zip(addrs, lens)))


def _linear_table(table: bytes, mem_size: int) -> tuple[tuple[Segment, ...], tuple[Segment, ...], int, int] | None:
    """The chain an indirect table holds, in one pass over it, if it is the chain drivers build
    and every check of :meth:`Virtqueue._walk` passes: entry ``i``'s next is ``i + 1`` and every
    entry but the last has NEXT; no other flag than NEXT and WRITE; readable entries before
    writable ones; every buffer inside memory; at most ``2**32 - 1`` bytes.  Returns ``(readable,
    writable, readable_len, writable_len)``, or ``None`` for any other table, valid or not: the
    entry-by-entry walk then decides, so both walks accept and refuse exactly the same tables."""
    t = read_desc_table(table)
    flags = t[2::4]
    n = len(flags)
    last = flags[-1]
    if last != 0 and last != _WRITE:
        return None
    if t[3::4][:-1] != _SEQ[: n - 1]:
        return None
    body = flags[:-1]
    nr = body.count(_R)
    if body != (_R,) * nr + (_RW,) * (n - 1 - nr):
        return None
    if last == 0:
        if nr < n - 1:
            return None  # a readable last entry after writable ones
        nr = n
    addrs = t[0::4]
    lens = t[1::4]
    if max(map(add, addrs, lens)) > mem_size:  # Python ints: no u64 wrap to hide an overflow
        return None
    total = sum(lens)
    if total > U32_MAX:
        return None
    rlen = sum(lens[:nr])
    return _segments(addrs[:nr], lens[:nr]), _segments(addrs[nr:], lens[nr:]), rlen, total - rlen


def _noop_error(exc: VirtqueueError) -> None:
    return None


def _noop() -> None:
    return None


class Virtqueue:
    """Device side of one split virtqueue.  Functions take the memory port as a parameter."""

    #: indirect tables of at least this many entries try the one-pass walk first (None: never)
    fast_walk_min: int | None = FAST_WALK_MIN

    def __init__(self, index: int, max_size: int, *, name: str = "") -> None:
        check_queue_size(max_size)
        self.index = index
        self.max_size = max_size
        self.name = name or f"queue{index}"
        self.on_error: Callable[[VirtqueueError], None] = _noop_error
        self.interrupt: Callable[[], None] = _noop
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Back to unconfigured: size = max_size, addresses 0, indices 0, not broken."""
        self.size = self.max_size
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        self.enabled = False
        self.event_idx = False
        self.indirect_desc = True
        self._last_avail_idx = 0
        self._avail_cache: int | None = None
        self.used_idx = 0
        #: used idx at the last interrupt (EVENT_IDX), or None when unknown
        #: (after reset/restore: the next notify_driver() interrupts).
        self.signalled_used: int | None = None
        #: chains were pushed since the last notify_driver() decision
        self.pending_notify = False
        self.notifications = True
        self.broken = False
        self.error: VirtqueueError | None = None
        #: chains taken by the one-pass walk of their indirect table
        self.fast_walks = 0
        #: used_event as read right after the last used idx was written, when that was done
        #: elsewhere (:meth:`served`); None: notify_driver reads it
        self._used_event_read: int | None = None
        #: the ring indices are to be taken from the used ring in memory when the
        #: device next runs (configured from virtio 1.4 device parts, which carry none)
        self.resync_pending = False

    @property
    def last_avail_idx(self) -> int:
        """Next avail index the device will take (u16 free-running)."""
        return self._last_avail_idx

    @last_avail_idx.setter
    def last_avail_idx(self, value: int) -> None:
        self._last_avail_idx = value & U16
        self._avail_cache = None  # re-read the driver's idx on the next pop

    def check_config(self, port: MemoryPort) -> None:
        """Refuse a configuration the device cannot run: bad size, misaligned or outside memory."""
        size = self.size
        if not (1 <= size <= self.max_size) or size & (size - 1):
            raise FieldValueError(self.name, "size", size, f"a power of two in 1..{self.max_size}")
        parts = (
            ("desc_addr", self.desc_addr, DESC_ALIGN, desc_table_size(size)),
            ("avail_addr", self.avail_addr, AVAIL_ALIGN, avail_ring_size(size, self.event_idx)),
            ("used_addr", self.used_addr, USED_ALIGN, used_ring_size(size, self.event_idx)),
        )
        for field, addr, align, length in parts:
            if addr % align:
                raise FieldValueError(self.name, field, addr, f"aligned to {align}")
            port.check(addr, length)

    # ------------------------------------------------------------------ errors
    def _fail(self, exc: VirtqueueError) -> None:
        self.broken = True
        self.error = exc
        self.on_error(exc)

    # ------------------------------------------------------------------ avail side
    def _read_avail_idx(self, port: MemoryPort) -> int:
        try:
            return read_u16(port.read(self.avail_addr + 2, 2))
        except MemoryAccessError as exc:
            raise RingAddressError(self.name, f"avail ring at {self.avail_addr:#x} outside memory") from exc

    def avail_idx(self, port: MemoryPort) -> int:
        """The driver's ``avail->idx``."""
        return read_u16(port.read(self.avail_addr + 2, 2))

    def has_available(self, port: MemoryPort) -> bool:
        """Whether the driver has made a chain available that the device has not taken."""
        if self.broken or not self.enabled:
            return False
        try:
            return self._read_avail_idx(port) != self._last_avail_idx
        except VirtqueueError as exc:
            self._fail(exc)
            return False

    def _fresh_avail(self, port: MemoryPort) -> int:
        idx = self._read_avail_idx(port)
        ahead = (idx - self._last_avail_idx) & U16
        if ahead > self.size:
            raise AvailIndexError(
                self.name,
                f"avail idx {idx} is {ahead} entries ahead of last_avail_idx {self._last_avail_idx} "
                f"(queue size {self.size})",
            )
        self._avail_cache = idx
        return idx

    def pop(self, port: MemoryPort) -> DescriptorChain | None:
        """Take the next available chain, or ``None``.  Never raises on driver input."""
        if self.broken or not self.enabled:
            return None
        try:
            last = self._last_avail_idx
            if self._avail_cache is None or self._avail_cache == last:
                if self._fresh_avail(port) == last:
                    return None
            try:
                head = read_u16(port.read(self.avail_addr + avail_entry_offset(last % self.size), 2))
            except MemoryAccessError as exc:
                raise RingAddressError(self.name, "avail ring outside memory") from exc
            if head >= self.size:
                raise DescriptorIndexError(
                    self.name, f"avail ring entry {last} names head {head} >= queue size {self.size}"
                )
            chain = self._walk(port, head, last)
            self._last_avail_idx = (last + 1) & U16
            if self.event_idx and self.notifications:
                self._write_avail_event(port, self._last_avail_idx)
            return chain
        except VirtqueueError as exc:
            self._fail(exc)
            return None

    def rewalk(self, port: MemoryPort, head: int, avail_idx: int) -> DescriptorChain | None:
        """Walk the chain at ``head`` again (taken earlier at ``avail_idx``).

        For a device restored from a saved state: the chains it held are named
        by head only and walked again in the (migrated) guest memory.  Hostile
        content breaks the queue like :meth:`pop`; returns ``None`` then.
        """
        if self.broken or not self.enabled:
            return None
        try:
            if head >= self.size:
                raise DescriptorIndexError(self.name, f"head {head} >= queue size {self.size}")
            return self._walk(port, head, avail_idx & U16)
        except VirtqueueError as exc:
            self._fail(exc)
            return None

    def pop_all(self, port: MemoryPort) -> list[DescriptorChain]:
        """Every chain available now (stops at the first malformed one)."""
        out = []
        while (chain := self.pop(port)) is not None:
            out.append(chain)
        return out

    def _walk(self, port: MemoryPort, head: int, avail_idx: int) -> DescriptorChain:
        name = self.name
        mem_size = port.size
        readable: list[Segment] = []
        writable: list[Segment] = []
        rlen = 0
        wlen = 0
        table: bytes | None = None  # the indirect table, once entered
        table_len = self.size
        desc_base = self.desc_addr
        seen: set[int] = set()
        idx = head
        where = "descriptor table"
        while True:
            if idx >= table_len:
                raise DescriptorIndexError(name, f"next index {idx} >= {where} size {table_len}")
            if idx in seen:
                raise DescriptorLoopError(name, f"chain from head {head} revisits {where} entry {idx}")
            seen.add(idx)
            # struct virtq_desc (wire.ring.VirtqDesc), read field by field: this is the hot path
            if table is None:
                try:
                    raw = port.read(desc_base + DESC_SIZE * idx, DESC_SIZE)
                except MemoryAccessError as exc:
                    raise RingAddressError(name, "descriptor table outside memory") from exc
                off = 0
            else:
                raw = table
                off = DESC_SIZE * idx
            addr, length, flags, nxt = read_desc(raw, off)
            if flags & _INDIRECT:
                if table is not None:
                    raise IndirectDescriptorError(name, f"indirect descriptor {idx} inside an indirect table")
                if not self.indirect_desc:
                    raise IndirectDescriptorError(
                        name, f"descriptor {idx} is INDIRECT but VIRTIO_F_INDIRECT_DESC is not negotiated"
                    )
                if flags & _NEXT:
                    raise IndirectDescriptorError(name, f"descriptor {idx} has both INDIRECT and NEXT")
                if length == 0 or length % DESC_SIZE:
                    raise IndirectDescriptorError(
                        name, f"indirect table length {length} is not a non-zero multiple of {DESC_SIZE}"
                    )
                if length // DESC_SIZE > MAX_INDIRECT_ENTRIES:
                    raise IndirectDescriptorError(
                        name, f"indirect table of {length // DESC_SIZE} entries > {MAX_INDIRECT_ENTRIES}"
                    )
                if addr + length >= U64_LIMIT or addr + length > mem_size:
                    raise DescriptorAddressError(
                        name, f"indirect table [{addr:#x}, +{length:#x}) outside memory"
                    )
                table = port.read(addr, length)
                table_len = length // DESC_SIZE
                fast_min = self.fast_walk_min
                if fast_min is not None and table_len >= fast_min and not readable and not writable:
                    linear = _linear_table(table, mem_size)
                    if linear is not None:
                        self.fast_walks += 1
                        r, w, rl, wl = linear
                        return DescriptorChain(head=head, readable=r, writable=w, avail_idx=avail_idx,
                                               readable_len=rl, writable_len=wl, queue=name, indirect=True)
                seen = set()
                idx = 0
                where = "indirect table"
                continue
            end = addr + length
            if end >= U64_LIMIT:
                raise DescriptorAddressError(name, f"descriptor {idx}: {addr:#x} + {length:#x} overflows u64")
            if end > mem_size:
                raise DescriptorAddressError(
                    name, f"descriptor {idx}: buffer [{addr:#x}, +{length:#x}) outside memory"
                )
            if flags & _WRITE:
                writable.append(Segment(addr, length))
                wlen += length
            else:
                if writable:
                    raise DescriptorOrderError(
                        name, f"readable {where} entry {idx} after a writable one in chain {head}"
                    )
                readable.append(Segment(addr, length))
                rlen += length
            if rlen + wlen > U32_MAX:
                raise ChainLengthError(name, f"chain from head {head} is longer than 2**32 - 1 bytes")
            if not flags & _NEXT:
                break
            idx = nxt
        return DescriptorChain(
            head=head,
            readable=tuple(readable),
            writable=tuple(writable),
            avail_idx=avail_idx,
            readable_len=rlen,
            writable_len=wlen,
            queue=name,
            indirect=table is not None,
        )

    # ------------------------------------------------------------------ used side
    def push(self, port: MemoryPort, head: int, written: int) -> None:
        """Return chain ``head`` with ``written`` bytes: used element first, then used idx."""
        self.push_many(port, ((head, written),))

    def push_many(self, port: MemoryPort, items: Iterable[tuple[int, int]]) -> None:
        """Return several chains: all used elements, then one used idx update."""
        if not 0 <= self.used_idx <= U16:
            raise FieldValueError(self.name, "used_idx", self.used_idx, "a u16")
        idx = self.used_idx
        start = idx
        size = self.size
        base = self.used_addr
        try:
            for head, written in items:
                if not 0 <= head < size:
                    raise FieldValueError(self.name, "head", head, f"< queue size {size}")
                if not 0 <= written <= U32_MAX:
                    raise FieldValueError(self.name, "written", written, "a u32")
                # struct virtq_used_elem (wire.ring.VirtqUsedElem): le32 id, le32 len
                port.write(base + used_elem_offset(idx % size), u32(head) + u32(written))
                idx = (idx + 1) & U16
            if idx == start:
                return
            port.write(base + 2, u16(idx))
        except MemoryAccessError as exc:
            err = RingAddressError(self.name, f"used ring at {base:#x} outside memory")
            err.__cause__ = exc
            self._fail(err)
            return
        self._pushed(start, idx)

    def _pushed(self, start: int, idx: int) -> None:
        """The used idx went from ``start`` to ``idx`` (chains returned)."""
        self._used_event_read = None
        self.used_idx = idx
        self.pending_notify = True
        # If the used idx ran so far past the last signalled value that u16
        # arithmetic can no longer tell, forget it (the next notify interrupts).
        if self.signalled_used is not None:
            pushed = (idx - start) & U16
            since = (idx - self.signalled_used) & U16
            if since < pushed or since >= 0x8000:
                self.signalled_used = None

    # ------------------------------------------------------------------ served elsewhere
    def fast_state(self) -> tuple[int, int, int, int, int, int, int, bool, bool, bool] | None:
        """The queue as code that serves chains itself takes it (the C fast path of
        :mod:`virtio_lm.devices.blk`): ``(size, desc_addr, avail_addr, used_addr, last_avail_idx,
        cached avail idx or -1, used_idx, event_idx, notifications, indirect_desc)``; ``None``
        while the queue takes no chain (disabled, broken, a resync pending).  That code must take
        only chains :meth:`pop` would, and report back through :meth:`served`."""
        if self.broken or not self.enabled or self.resync_pending:
            return None
        cache = self._avail_cache
        return (self.size, self.desc_addr, self.avail_addr, self.used_addr, self._last_avail_idx,
                -1 if cache is None else cache, self.used_idx, self.event_idx, self.notifications,
                self.indirect_desc)  # fmt: skip

    def served(self, taken: int, last_avail_idx: int, avail_cache: int, used_idx: int,
               used_event: int = -1) -> None:
        """``taken`` chains were taken and returned elsewhere (see :meth:`fast_state`): the
        indices it left, ``avail_cache`` -1 for unknown; ``used_event``, the driver's, read after
        the last used idx written (-1: not read), serves the next :meth:`notify_driver` unless
        another chain is returned first."""
        if not (0 <= last_avail_idx <= U16 and -1 <= avail_cache <= U16 and 0 <= used_idx <= U16
                and -1 <= used_event <= U16):  # fmt: skip
            raise FieldValueError(self.name, "served indices", (last_avail_idx, avail_cache, used_idx, used_event),
                                  "u16s")
        self._last_avail_idx = last_avail_idx
        self._avail_cache = None if avail_cache < 0 else avail_cache
        if taken:
            self._pushed(self.used_idx, used_idx)
            if used_event >= 0:
                self._used_event_read = used_event

    def with_journal(self, run: Callable[[tuple | None], tuple[R, int]]) -> R:
        """``run(journal)``'s result, for code serving chains itself: ``journal`` is ``None``
        here; a queue that records taken and returned heads elsewhere (vhost-user's inflight
        region) passes its record, and ``run`` returns ``(result, next counter)``."""
        return run(None)[0]

    def resync_from_ring(self, port: MemoryPort) -> None:
        """Take the ring indices from the used ring in memory: ``used_idx`` and
        ``last_avail_idx`` both become the used ring's idx (a device that returned
        every chain it took -- a virtio 1.4 STOPPED device -- left them equal)."""
        self.resync_pending = False
        try:
            idx = read_u16(port.read(self.used_addr + 2, 2))
        except MemoryAccessError as exc:
            err = RingAddressError(self.name, f"used ring at {self.used_addr:#x} outside memory")
            err.__cause__ = exc
            self._fail(err)
            return
        self.used_idx = idx
        self.last_avail_idx = idx
        self.signalled_used = None
        self.pending_notify = self.enabled  # an interrupt the source raised may not have arrived

    def used_event(self, port: MemoryPort) -> int:
        """The driver's ``used_event`` (meaningful with EVENT_IDX)."""
        return read_u16(port.read(self.avail_addr + used_event_offset(self.size), 2))

    def notify_driver(self, port: MemoryPort) -> bool:
        """Raise the queue's interrupt if the driver wants one for what was pushed since the last one."""
        if not self.enabled:
            return False
        if not self.pending_notify:
            return False  # nothing returned since the last interrupt decision
        self.pending_notify = False
        new = self.used_idx
        old = self.signalled_used
        seen, self._used_event_read = self._used_event_read, None
        try:
            if self.event_idx:
                self.signalled_used = new
                event = self.used_event(port) if seen is None else seen
                if old is not None and not need_event(event, new, old):
                    return False
            else:
                self.signalled_used = new
                flags = read_u16(port.read(self.avail_addr, 2))
                if flags & AvailFlags.NO_INTERRUPT:
                    return False
        except MemoryAccessError as exc:
            err = RingAddressError(self.name, f"avail ring at {self.avail_addr:#x} outside memory")
            err.__cause__ = exc
            self._fail(err)
            return False
        self.interrupt()
        return True

    # ------------------------------------------------------------------ driver notifications
    def _write_avail_event(self, port: MemoryPort, value: int) -> None:
        try:
            port.write(self.used_addr + avail_event_offset(self.size), u16(value & U16))
        except MemoryAccessError as exc:
            raise RingAddressError(self.name, f"used ring at {self.used_addr:#x} outside memory") from exc

    def set_notification(self, port: MemoryPort, enabled: bool) -> None:
        """Ask the driver to notify (or not).

        Without EVENT_IDX this is the used ring's NO_NOTIFY flag.  With it,
        ``avail_event``: enabled -> the driver's current avail idx (notify on
        the next chain added); disabled -> ``last_avail_idx - 1``, an index
        the driver cannot step over before the device takes more, so no
        notification comes.  After enabling, the device must look at the
        avail ring again: chains added before the write are not notified.
        """
        self.notifications = enabled
        try:
            if self.event_idx:
                if enabled:
                    self._write_avail_event(port, self._read_avail_idx(port))
                else:
                    self._write_avail_event(port, self._last_avail_idx - 1)
            else:
                try:
                    flags = read_u16(port.read(self.used_addr, 2))
                    if enabled:
                        flags &= ~int(UsedFlags.NO_NOTIFY)
                    else:
                        flags |= int(UsedFlags.NO_NOTIFY)
                    port.write(self.used_addr, u16(flags & U16))
                except MemoryAccessError as exc:
                    raise RingAddressError(self.name, f"used ring at {self.used_addr:#x} outside memory") from exc
        except VirtqueueError as exc:
            self._fail(exc)

    def __repr__(self) -> str:
        return (
            f"Virtqueue({self.name!r}, size={self.size}, enabled={self.enabled}, "
            f"last_avail={self._last_avail_idx}, used={self.used_idx}, broken={self.broken})"
        )
