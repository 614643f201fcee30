"""Dirty page logs.

A :class:`DirtyLog` is one byte per page internally (cheap to mark a range,
cheap to scan with numpy) and reports either as a boolean page array or as a
packed bitmap in the KVM layout: page ``p`` is bit ``p & 7`` of byte
``p >> 3`` (LSB first), which is what ``KVM_GET_DIRTY_LOG`` and QEMU's
vhost-user log use.

Anything that wants to hear about writes implements :class:`DirtySink`:
``mark(first_page, last_page)`` with both ends inclusive.  The memory layer
calls it after the bytes are in memory, so a page whose mark has been
collected and cleared is always re-read with the new content.

A sink may also take marks through a *dirty ring* (as KVM's dirty ring does):
a :class:`RingSink` has a ``ring`` (an ``array('q')``) to which a device's
writes of up to :data:`RING_MAX_RUN` pages append their pages, and a
``drain()`` that applies what the ring holds to its map in one numpy pass.
An append is one C call under the GIL, so marking costs a small fraction of
the write; the sink drains before anyone reads its map, and the writer drains
it when it holds :data:`RING_DRAIN_AT` entries.  Longer writes call ``mark``.
"""

from __future__ import annotations

import threading
from array import array
from typing import Protocol, runtime_checkable

import numpy as np

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT


class DirtySink(Protocol):
    """Something that records which pages were written."""

    def mark(self, first_page: int, last_page: int) -> None:
        """Record pages ``first_page..last_page`` (inclusive) as written."""
        ...


#: A writer drains a ring sink once its ring holds this many entries (bounds the ring's memory,
#: 8 bytes an entry, and the work of one drain).
RING_DRAIN_AT = 4096
#: Writes of up to this many pages go through the ring; longer ones call ``mark``.
RING_MAX_RUN = 64


@runtime_checkable
class RingSink(Protocol):
    """A :class:`DirtySink` that also takes short marks through its ``ring``.

    Ring entries: a page ``p >= 0`` alone marks page ``p``; a run of pages
    ``first..last`` is the two entries ``~first`` (negative) then ``last``.
    A run's two entries go in with one ``extend`` (one C call under the GIL), so
    writers on several threads never interleave inside a run.  ``ring`` only
    ever grows at its end and shrinks at its front (``drain``, under the
    sink's own lock, through :func:`take_ring`), so no mark is lost to a drain
    running beside a writer: what is appended after the drain measured the
    ring is drained next time.
    """

    ring: array

    def mark(self, first_page: int, last_page: int) -> None: ...

    def drain(self) -> None:
        """Apply every mark the ring holds to the map and remove them from the ring."""
        ...


def take_ring(ring: array) -> tuple[np.ndarray, np.ndarray]:
    """Remove the complete marks ``ring`` holds now from its front: ``(pages, ends)``, the
    int64 pages they mark (runs expanded) and each mark's last page.  Call it under the owner's
    lock; entries appended meanwhile stay in the ring."""
    n = len(ring)
    if n and ring[n - 1] < 0:  # a run whose last page is not appended yet
        n -= 1
    chunk = ring[:n]
    del ring[:n]
    raw = np.frombuffer(chunk, dtype=np.int64)
    starts = np.flatnonzero(raw < 0)
    if len(starts) == 0:
        return raw, raw
    single = np.ones(len(raw), dtype=bool)
    single[starts] = False
    single[starts + 1] = False
    firsts, lasts = ~raw[starts], raw[starts + 1]
    lengths = lasts - firsts + 1
    total = int(lengths.sum())
    offsets = np.cumsum(lengths) - lengths
    runs = np.arange(total, dtype=np.int64) + np.repeat(firsts - offsets, lengths)
    singles = raw[single]
    return np.concatenate((singles, runs)), np.concatenate((singles, lasts))


def pages_spanned(addr: int, length: int) -> tuple[int, int] | None:
    """Inclusive page range touched by ``length`` bytes at ``addr`` (None if empty)."""
    if length <= 0:
        return None
    return addr >> PAGE_SHIFT, (addr + length - 1) >> PAGE_SHIFT


def pack_bitmap(pages: np.ndarray) -> np.ndarray:
    """Boolean per-page array -> packed KVM-layout bitmap (uint8)."""
    return np.packbits(pages.astype(bool, copy=False), bitorder="little")


def unpack_bitmap(bitmap: np.ndarray | bytes, num_pages: int) -> np.ndarray:
    """Packed KVM-layout bitmap -> boolean per-page array of ``num_pages``."""
    raw = np.frombuffer(bitmap, dtype=np.uint8) if isinstance(bitmap, (bytes, bytearray)) else bitmap
    return np.unpackbits(raw, count=num_pages, bitorder="little").astype(bool)


class DirtyLog:
    """A thread-safe dirty log over ``num_pages`` pages.

    ``enabled`` gates marking (a hypervisor's dirty logging is off until a
    migration turns it on).  :meth:`collect` is an atomic test-and-clear: a
    mark racing with it lands either in this collection or in the next one,
    never nowhere.
    """

    def __init__(self, num_pages: int, *, enabled: bool = False) -> None:
        self.num_pages = num_pages
        self._pages = np.zeros(num_pages, dtype=np.uint8)
        self._lock = threading.Lock()
        self.enabled = enabled

    def mark(self, first_page: int, last_page: int) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._pages[first_page : last_page + 1] = 1

    def mark_all(self) -> None:
        with self._lock:
            self._pages[:] = 1

    def start(self, *, all_dirty: bool = False) -> None:
        """Enable logging; with ``all_dirty`` every page starts dirty."""
        with self._lock:
            self._pages[:] = 1 if all_dirty else 0
            self.enabled = True

    def stop(self) -> None:
        with self._lock:
            self.enabled = False
            self._pages[:] = 0

    def collect(self) -> np.ndarray:
        """Atomically return the dirty pages (bool array) and clear them."""
        with self._lock:
            out = self._pages.astype(bool)
            self._pages[:] = 0
        return out

    def peek(self) -> np.ndarray:
        """The dirty pages (bool array) without clearing."""
        with self._lock:
            return self._pages.astype(bool)

    def count(self) -> int:
        with self._lock:
            return int(np.count_nonzero(self._pages))
