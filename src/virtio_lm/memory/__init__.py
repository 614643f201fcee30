"""Guest and host memory: the single DMA path, with dirty logging.

Imports nothing of ours but :mod:`virtio_lm.errors`.
"""

from virtio_lm.memory.dirty import (
    PAGE_SHIFT,
    PAGE_SIZE,
    DirtyLog,
    DirtySink,
    pack_bitmap,
    pages_spanned,
    unpack_bitmap,
)
from virtio_lm.memory.region import CpuWriter, DeviceWriter, Memory, MemoryPort, Writer

__all__ = [
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "CpuWriter",
    "DeviceWriter",
    "DirtyLog",
    "DirtySink",
    "Memory",
    "MemoryPort",
    "Writer",
    "pack_bitmap",
    "pages_spanned",
    "unpack_bitmap",
]
