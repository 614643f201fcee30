"""Device dirty page trackers: push/pull x bitmap/bytemap (sans-I/O).

One tracker per VF while tracking runs; the PF installs it as the VF's
``vf_port.writer.tracker``, so every DMA write of the VF reaches
:meth:`DirtyTracker.mark` (a :class:`~virtio_lm.memory.DirtySink`: pages
``first..last`` inclusive, called after the bytes are in guest memory).

Map layouts (page = guest-physical address >> 12):

* bitmap: page ``p`` is bit ``p & 7`` (LSB first) of byte ``p >> 3`` -- KVM's layout;
* bytemap: page ``p`` is byte ``p``; 1 = dirty, 0 = clean.

**Push** (:class:`PushTracker`): the map lives in the PF driver's host memory,
given as ``(addr, len)`` segments (the decoded START map table) that are
concatenated in order.  The tracker writes it only through the PF's own
:class:`~virtio_lm.memory.MemoryPort` with ``atomic_or`` -- atomic against the
driver's ``atomic_fetch_and_clear``, so a mark racing with a collection lands
in this collection or the next, never nowhere.  ``capacity_pages`` is the
map's total bytes x 8 (bitmap) or x 1 (bytemap).

**Pull** (:class:`PullTracker`): the map lives in the device; capacity is
``2**log_max_pages`` (what IDENTIFY reports).  :meth:`PullTracker.snapshot`
(GET_DIRTY_REPORT_SIZE) atomically takes the map and starts a fresh one, and
returns it trimmed to the bytes covering the last dirty page (empty when
nothing is dirty; bytes past it are clean).  Storage grows with the highest
page marked, so a large capacity costs nothing until used.

**Fail-safe**: a write to a page ``>= capacity_pages`` cannot be recorded.  It is
never dropped silently: push sets every bit/byte of the map at once, pull
makes the next snapshot all ones over the whole capacity; ``overflow_events``
counts such ``mark`` calls.  ``marks`` counts every page passed to ``mark``.
A push tracker whose map write is refused (the PF's bus mastering is off)
counts it in ``write_errors`` and sets the whole map on the next write that
gets through.

**Dirty ring** (``buffered=True``; the PF's trackers, not vhost-user's log): the
tracker is a :class:`~virtio_lm.memory.dirty.RingSink`.  A VF's DMA write of
up to ``RING_MAX_RUN`` pages appends its pages to :attr:`DirtyTracker.ring` instead of
calling :meth:`DirtyTracker.mark`; :meth:`DirtyTracker.drain` applies the ring to the
map in one numpy pass.  It drains before every read of the map: a pull
snapshot drains first; a push tracker is a read barrier of the PF's memory
(every read of that memory, the driver's ``atomic_fetch_and_clear`` among
them, drains it first) -- so a push tracker has a ring only when that memory
is private to this process (``Memory.private``); a map another process reads
(a memfd, a vfio-user client's DMA region) is written at each mark.  The PF also drains it when the VF leaves RUNNING and
when tracking stops, so the map holds every mark before a migration's last
collection, whoever reads it.  ``marks`` and ``overflow_events`` drain before
they answer.

Reports to page arrays: :func:`report_to_pages` (any length; bytes past the
report are clean; marks past ``num_pages`` raise :class:`DirtyReportError`,
or with ``strict=False`` make every page dirty).
"""

from __future__ import annotations

import bisect
import threading
from array import array
from typing import Callable, Sequence

import numpy as np

from virtio_lm.errors import DirtyReportError, DmaDisabledError, MapTableError
from virtio_lm.memory import Memory, MemoryPort, pack_bitmap, unpack_bitmap
from virtio_lm.memory.dirty import take_ring
from virtio_lm.wire.ctrl import TrackMode

__all__ = [
    "MAX_REPORT_BYTES",
    "DirtyTracker",
    "PullTracker",
    "PushTracker",
    "bitmap_range",
    "make_tracker",
    "max_log_pages",
    "report_to_pages",
]

#: A pull snapshot's length travels in GET_DIRTY_REPORT_SIZE's ``le32 len``.
MAX_REPORT_BYTES = (1 << 32) - 1
_INITIAL_PULL_PAGES = 1 << 12


def max_log_pages(mode: TrackMode) -> int:
    """Largest ``log_max_pages`` whose full map still fits a ``le32`` report length (34 / 31)."""
    mode = TrackMode(mode)
    log = 0
    while mode.map_bytes(1 << (log + 1)) <= MAX_REPORT_BYTES:
        log += 1
    return log


def bitmap_range(first_page: int, last_page: int) -> tuple[int, np.ndarray]:
    """``(first byte, bytes)`` of a KVM-layout bitmap with exactly pages first..last set."""
    b0, b1 = first_page >> 3, last_page >> 3
    out = np.full(b1 - b0 + 1, 0xFF, dtype=np.uint8)
    out[0] &= (0xFF << (first_page & 7)) & 0xFF
    out[-1] &= 0xFF >> (7 - (last_page & 7))
    return b0, out


class DirtyTracker:
    """Common part: mode, capacity, statistics, argument checks, the dirty ring."""

    def __init__(self, mode: TrackMode, capacity_pages: int, *, buffered: bool = False) -> None:
        self.mode = TrackMode(mode)
        self.capacity_pages = capacity_pages
        self._marks = 0
        self._overflow_events = 0
        self._lock = threading.Lock()
        #: marks not yet in the map, as RingSink entries (None: every mark goes through :meth:`mark`)
        self.ring: array | None = array("q") if buffered else None

    def mark(self, first_page: int, last_page: int) -> None:
        """Record pages ``first_page..last_page`` (inclusive) as written."""
        if first_page < 0 or last_page < first_page:
            raise ValueError(f"bad page range {first_page}..{last_page}")
        with self._lock:
            self._marks += last_page - first_page + 1
            overflow = last_page >= self.capacity_pages
            if overflow:
                self._overflow_events += 1
            self._record(first_page, last_page, overflow)

    def drain(self) -> None:
        """Apply every page in :attr:`ring` to the map (see the module doc)."""
        ring = self.ring
        if not ring:
            return
        with self._lock:
            pages, ends = take_ring(ring)
            if len(pages) == 0:
                return
            self._marks += len(pages)
            over = int(np.count_nonzero(ends >= self.capacity_pages))  # marks, as mark() counts them
            self._overflow_events += over
            self._record_pages(pages, over > 0)

    def discard_ring(self) -> None:
        """Drop the marks in :attr:`ring` unapplied (the PF was reset: the device writes no map)."""
        if self.ring is not None:
            with self._lock:
                take_ring(self.ring)

    @property
    def marks(self) -> int:
        """Pages marked so far (a range of n pages counts n)."""
        self.drain()
        return self._marks

    @property
    def overflow_events(self) -> int:
        """Marks of a page at or past ``capacity_pages``."""
        self.drain()
        return self._overflow_events

    def close(self) -> None:
        """Tracking stops (a push tracker puts its ring into the map; a pull map is the device's own)."""

    def _record(self, first_page: int, last_page: int, overflow: bool) -> None:  # called under _lock
        raise NotImplementedError

    def _record_pages(self, pages: np.ndarray, overflow: bool) -> None:  # called under _lock
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.mode.cli_name}, capacity={self.capacity_pages} pages, "
            f"marks={self._marks}, overflow_events={self._overflow_events})"
        )


class PushTracker(DirtyTracker):
    """Push bitmap / bytemap: the map is in the PF driver's host memory.

    ``pf_port`` is the PF's MemoryPort onto that memory; ``segments`` the map's
    ``(addr, len)`` pieces in order.  Raises :class:`MapTableError` for no
    segment, a zero-length segment, one outside the memory, or overlapping
    segments (two pages would share a map position).
    """

    def __init__(self, mode: TrackMode, pf_port: MemoryPort, segments: Sequence[tuple[int, int]], *,
                 buffered: bool = False) -> None:
        mode = TrackMode(mode)
        if not mode.is_push:
            raise ValueError(f"{mode.name} is not a push mode")
        segs = [(int(a), int(n)) for a, n in segments]
        if not segs:
            raise MapTableError("push map table has no segment")
        for i, (addr, length) in enumerate(segs):
            if length <= 0:
                raise MapTableError(f"map segment {i} has length {length}")
            if not pf_port.contains(addr, length):
                raise MapTableError(
                    f"map segment {i} [{addr:#x}, +{length:#x}) is outside PF memory of size {pf_port.size:#x}"
                )
        by_addr = sorted(range(len(segs)), key=lambda i: segs[i][0])
        for i, j in zip(by_addr, by_addr[1:]):
            if segs[i][0] + segs[i][1] > segs[j][0]:
                raise MapTableError(f"map segments {i} and {j} overlap")
        self.pf_port = pf_port
        self.segments = segs
        self._starts: list[int] = []
        total = 0
        for _, length in segs:
            self._starts.append(total)
            total += length
        self.map_bytes = total
        self.write_errors = 0
        self._pending_all = False
        # segment starts in the map and in PF memory, as arrays: a drain's vectorised lookup
        self._starts_np = np.asarray(self._starts, dtype=np.int64)
        self._bases_np = np.asarray([addr for addr, _ in segs], dtype=np.int64)
        # A ring needs every reader of the map to pass a read barrier: only a private Memory
        # has them (a memfd, or a vfio-user client's DMA region, is read by another process).
        memory = pf_port.memory
        buffered = buffered and isinstance(memory, Memory) and memory.private
        super().__init__(mode, total * 8 if mode.is_bitmap else total, buffered=buffered)
        if buffered:
            memory.add_read_barrier(self.drain)

    def close(self) -> None:
        """Tracking stops: the ring goes into the map, and reads of the PF's memory stop draining it."""
        if self.ring is not None:
            self.pf_port.memory.remove_read_barrier(self.drain)
            self.drain()

    def discard_ring(self) -> None:
        if self.ring is not None:
            self.pf_port.memory.remove_read_barrier(self.drain)
        super().discard_ring()

    def _or_map(self, offset: int, data: np.ndarray) -> None:
        """OR ``data`` into the concatenated map at byte ``offset`` (one atomic op per segment)."""
        end = offset + len(data)
        k = bisect.bisect_right(self._starts, offset) - 1
        while k < len(self.segments) and self._starts[k] < end:
            s_addr, s_len = self.segments[k]
            s0 = self._starts[k]
            lo, hi = max(offset, s0), min(end, s0 + s_len)
            self.pf_port.atomic_or(s_addr + (lo - s0), data[lo - offset : hi - offset].tobytes())
            k += 1

    def _fill_all(self) -> None:
        value = 0xFF if self.mode.is_bitmap else 0x01
        for addr, length in self.segments:
            self.pf_port.atomic_or(addr, bytes([value]) * length)

    def _write_map(self, overflow: bool, write: Callable[[], None]) -> None:
        """``write()`` the marks into the map -- or the whole map, after an overflow or a refused
        write; a write refused now (the PF's bus mastering is off) is counted and remembered."""
        try:
            if self._pending_all or overflow:
                self._pending_all = True
                self._fill_all()
                self._pending_all = False
                return
            write()
        except DmaDisabledError:
            self.write_errors += 1
            self._pending_all = True

    def _record(self, first_page: int, last_page: int, overflow: bool) -> None:
        self._write_map(overflow, lambda: self._mark_range(first_page, last_page))

    def _mark_range(self, first_page: int, last_page: int) -> None:
        if first_page == last_page:  # the common case: one byte of the map
            if self.mode.is_bitmap:
                off, value = first_page >> 3, 1 << (first_page & 7)
            else:
                off, value = first_page, 1
            k = bisect.bisect_right(self._starts, off) - 1
            self.pf_port.atomic_or_byte(self.segments[k][0] + off - self._starts[k], value)
            return
        if self.mode.is_bitmap:
            b0, data = bitmap_range(first_page, last_page)
        else:
            b0, data = first_page, np.ones(last_page - first_page + 1, dtype=np.uint8)
        self._or_map(b0, data)

    def _record_pages(self, pages: np.ndarray, overflow: bool) -> None:
        self._write_map(overflow, lambda: self._mark_pages(pages))

    def _mark_pages(self, pages: np.ndarray) -> None:
        if self.mode.is_bitmap:
            first = int(pages.min()) & ~7
            span = np.zeros(int(pages.max()) - first + 1, dtype=bool)
            span[pages - first] = True
            self._or_map(first >> 3, pack_bitmap(span))
            return
        first = int(pages.min())
        width = int(pages.max()) - first + 1
        if len(pages) * 16 < width:  # sparse: a byte each, not the whole span
            k = np.searchsorted(self._starts_np, pages, side="right") - 1
            self.pf_port.atomic_or_at(self._bases_np[k] + pages - self._starts_np[k], 1)
        else:
            span8 = np.zeros(width, dtype=np.uint8)
            span8[pages - first] = 1
            self._or_map(first, span8)


class PullTracker(DirtyTracker):
    """Pull bitmap / bytemap: the map is inside the device, ``2**log_max_pages`` pages."""

    def __init__(self, mode: TrackMode, log_max_pages: int, *, buffered: bool = False) -> None:
        mode = TrackMode(mode)
        if mode.is_push:
            raise ValueError(f"{mode.name} is not a pull mode")
        if not 0 <= log_max_pages <= max_log_pages(mode):
            raise ValueError(
                f"log_max_pages {log_max_pages} out of 0..{max_log_pages(mode)} (report length is le32)"
            )
        super().__init__(mode, 1 << log_max_pages, buffered=buffered)
        self.log_max_pages = log_max_pages
        self._map = np.zeros(min(self.capacity_pages, _INITIAL_PULL_PAGES), dtype=np.uint8)
        self._overflow = False

    def _record(self, first_page: int, last_page: int, overflow: bool) -> None:
        if overflow:
            self._overflow = True
            return
        self._grow(last_page)
        self._map[first_page : last_page + 1] = 1

    def _record_pages(self, pages: np.ndarray, overflow: bool) -> None:
        if overflow:
            self._overflow = True
            return
        self._grow(int(pages.max()))
        self._map[pages] = 1

    def _grow(self, top: int) -> None:
        """Make the map hold page ``top`` (< capacity): at least double it, at most the capacity."""
        if top >= len(self._map):
            grown = np.zeros(min(self.capacity_pages, max(top + 1, 2 * len(self._map))), dtype=np.uint8)
            grown[: len(self._map)] = self._map
            self._map = grown

    @property
    def map_bytes(self) -> int:
        """Bytes the device holds for the map now (the model keeps a byte per page up to the
        highest page marked, in both pull modes)."""
        self.drain()
        return int(self._map.nbytes)

    def snapshot(self) -> bytes:
        """Take the current map, start a fresh one, return it trimmed (see module doc)."""
        self.drain()
        with self._lock:
            taken, overflow = self._map, self._overflow
            self._map = np.zeros(len(taken), dtype=np.uint8)
            self._overflow = False
        if overflow:
            pages = np.ones(self.capacity_pages, dtype=bool)
        else:
            nz = np.flatnonzero(taken)
            if len(nz) == 0:
                return b""
            pages = taken[: int(nz[-1]) + 1].astype(bool)
        if self.mode.is_bitmap:
            return pack_bitmap(pages).tobytes()
        return pages.astype(np.uint8).tobytes()


def make_tracker(
    mode: TrackMode,
    *,
    pf_port: MemoryPort | None = None,
    segments: Sequence[tuple[int, int]] | None = None,
    log_max_pages: int | None = None,
    buffered: bool = False,
) -> PushTracker | PullTracker:
    """The tracker for ``mode``: push modes need ``pf_port`` and ``segments``, pull modes ``log_max_pages``;
    ``buffered``: with a dirty ring (module doc)."""
    mode = TrackMode(mode)
    if mode.is_push:
        if pf_port is None or segments is None:
            raise ValueError(f"{mode.name} needs pf_port and segments")
        return PushTracker(mode, pf_port, segments, buffered=buffered)
    if log_max_pages is None:
        raise ValueError(f"{mode.name} needs log_max_pages")
    return PullTracker(mode, log_max_pages, buffered=buffered)


def report_to_pages(
    report: bytes | bytearray | memoryview | np.ndarray,
    num_pages: int,
    *,
    bitmap: bool,
    strict: bool = True,
) -> np.ndarray:
    """A bitmap / bytemap report of any length -> bool array of ``num_pages`` pages.

    Pages past the end of the report are clean.  Bytemap: any non-zero byte is
    dirty.  A report marking a page ``>= num_pages`` (a set bit past
    ``num_pages``, or a non-zero byte past it) cannot be mapped: with
    ``strict`` it raises :class:`DirtyReportError`; without, every page is
    reported dirty (the report is inconsistent, so assume the worst).  Extra
    bytes that are all zero are accepted.
    """
    if num_pages < 0:
        raise ValueError(f"num_pages {num_pages} < 0")
    raw = np.frombuffer(report, dtype=np.uint8) if not isinstance(report, np.ndarray) else report.astype(np.uint8, copy=False)
    pages = np.zeros(num_pages, dtype=bool)
    if bitmap:
        need = (num_pages + 7) // 8
        head = raw[:need]
        got = unpack_bitmap(head, min(num_pages, len(head) * 8))
        pages[: len(got)] = got
        beyond = raw[need:].any() or (len(head) == need and num_pages & 7 and head[-1] >> (num_pages & 7))
    else:
        head = raw[:num_pages]
        pages[: len(head)] = head != 0
        beyond = raw[num_pages:].any()
    if beyond:
        if strict:
            raise DirtyReportError(
                f"{'bitmap' if bitmap else 'bytemap'} report of {len(raw)} bytes marks a page past the {num_pages} pages it describes"
            )
        pages[:] = True
    return pages
