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
"""

from __future__ import annotations

import threading
from typing import Protocol

import numpy as np

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT


class DirtySink(Protocol):
    """Something that records which pages were written."""

    def mark(self, first_page: int, last_page: int) -> None:
        """Record pages ``first_page..last_page`` (inclusive) as written."""
        ...


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
