"""Platform dirty tracking: an IOMMU-style tracker outside the device.

virtio 1.4 standardizes no device dirty tracking; a host migrating a VF
relies on the platform's IOMMU, which sees every DMA write the device makes
through its translation and sets a dirty bit in its page table (Linux
exposes it through IOMMUFD: ``IOMMU_HWPT_SET_DIRTY_TRACKING`` and
``IOMMU_HWPT_GET_DIRTY_BITMAP``, read-and-clear unless
``IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR``).

:class:`IommuDirtyDomain` is that for one device: the domain the device's
:class:`~virtio_lm.memory.MemoryPort` translates through, attached to the
port's writer as its platform sink, so it is told of every write the device
makes -- whatever the device is, and without the device's cooperation.  It
tracks the whole span of the port (IOVA = the address in the VM's memory),
a page per bit.

* :meth:`set_dirty_tracking` turns tracking on (every page starts clean) or
  off (the bits are dropped);
* :meth:`get_dirty_bitmap` returns the dirty bits of a page-aligned IOVA
  range as a bitmap of ``le64`` words (bit ``p`` of the range is bit
  ``p % 64`` of word ``p // 64``: page ``p`` of the range is bit ``p & 7``
  of byte ``p >> 3``, the KVM / IOMMUFD layout) and clears them, atomically
  with respect to concurrent DMA: a write racing with a read lands in this
  bitmap or in the next one, never nowhere.

Imports nothing of ours but :mod:`virtio_lm.errors` and this package.
"""

from __future__ import annotations

import threading

import numpy as np

from virtio_lm.errors import PlatformTrackingError
from virtio_lm.memory.dirty import PAGE_SHIFT, PAGE_SIZE
from virtio_lm.memory.region import DeviceWriter, MemoryPort

__all__ = ["IommuDirtyDomain"]


class IommuDirtyDomain:
    """One device's IOMMU domain with dirty tracking; see the module docstring."""

    def __init__(self, port: MemoryPort, *, name: str | None = None) -> None:
        writer = port.writer
        if not isinstance(writer, DeviceWriter):
            raise PlatformTrackingError(f"{port!r}: only a device's DMA port translates through an IOMMU")
        self.name = name or f"iommu:{writer.name}"
        self.port = port
        self.num_pages = (port.size + PAGE_SIZE - 1) >> PAGE_SHIFT
        self._pages = np.zeros(self.num_pages, dtype=np.uint8)
        self._lock = threading.Lock()
        self._tracking = False
        self._writer = writer
        self.bitmap_reads = 0
        self.bitmap_bytes = 0
        writer.attach_platform(self)

    def __repr__(self) -> str:
        return f"IommuDirtyDomain({self.name!r}, pages={self.num_pages}, tracking={self._tracking})"

    @property
    def tracking(self) -> bool:
        return self._tracking

    # ------------------------------------------------------------------ the DMA side
    def mark(self, first_page: int, last_page: int) -> None:
        """Called by the memory after each device write (a :class:`DirtySink`)."""
        if not self._tracking:
            return
        with self._lock:
            if self._tracking:
                self._pages[first_page : last_page + 1] = 1

    # ------------------------------------------------------------------ the host side
    def set_dirty_tracking(self, enabled: bool) -> None:
        """Start (every page clean) or stop (bits dropped) dirty tracking."""
        with self._lock:
            self._pages[:] = 0
            self._tracking = bool(enabled)

    def _range(self, iova: int, length: int) -> tuple[int, int]:
        if iova < 0 or length <= 0 or iova % PAGE_SIZE or length % PAGE_SIZE:
            raise PlatformTrackingError(
                f"{self.name}: IOVA range [{iova:#x}, +{length:#x}) is not a non-empty page-aligned range"
            )
        first = iova >> PAGE_SHIFT
        count = length >> PAGE_SHIFT
        if first + count > self.num_pages:
            raise PlatformTrackingError(
                f"{self.name}: IOVA range [{iova:#x}, +{length:#x}) runs past the domain's {self.num_pages} pages"
            )
        return first, count

    def get_dirty_bitmap(self, iova: int, length: int, *, no_clear: bool = False) -> bytes:
        """The dirty bits of ``[iova, iova + length)``, cleared unless ``no_clear``."""
        first, count = self._range(iova, length)
        with self._lock:
            if not self._tracking:
                raise PlatformTrackingError(f"{self.name}: dirty tracking is off")
            chunk = self._pages[first : first + count].astype(bool)
            if not no_clear:
                self._pages[first : first + count] = 0
        packed = np.packbits(chunk, bitorder="little").tobytes()
        out = packed + bytes(-len(packed) % 8)  # whole le64 words
        self.bitmap_reads += 1
        self.bitmap_bytes += len(out)
        return out

    def detach(self) -> None:
        """Stop tracking and leave the device's port."""
        self.set_dirty_tracking(False)
        self._writer.detach_platform(self)
