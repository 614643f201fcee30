"""Split virtqueue layout (virtio 1.x, 2.7 "Split Virtqueues").

::

    descriptor table   align 16   16 * N bytes
      +0  le64 addr
      +8  le32 len
      +12 le16 flags      NEXT=1 WRITE=2 INDIRECT=4
      +14 le16 next

    available ring     align 2    6 + 2 * N bytes
      +0  le16 flags      NO_INTERRUPT=1
      +2  le16 idx
      +4  le16 ring[N]
      +4+2N le16 used_event   (only with VIRTIO_F_EVENT_IDX)

    used ring          align 4    6 + 8 * N bytes
      +0  le16 flags      NO_NOTIFY=1
      +2  le16 idx
      +4  struct { le32 id; le32 len; } ring[N]
      +4+8N le16 avail_event  (only with VIRTIO_F_EVENT_IDX)

N is a power of two, 1..32768.  Ring indices are free-running u16 counters.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from virtio_lm.errors import FieldValueError
from virtio_lm.wire.codec import flags_field, layout

MAX_QUEUE_SIZE = 32768

DESC_SIZE = 16
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4
USED_ELEM_SIZE = 8


class DescFlags(enum.IntFlag):
    NEXT = 1
    WRITE = 2
    INDIRECT = 4


class AvailFlags(enum.IntFlag):
    NO_INTERRUPT = 1


class UsedFlags(enum.IntFlag):
    NO_NOTIFY = 1


@layout("<QIHH")
@dataclass(frozen=True, slots=True)
class VirtqDesc:
    """``struct virtq_desc``: one buffer of a chain (16 bytes)."""

    addr: int
    len: int
    flags: DescFlags = flags_field(DescFlags, DescFlags(0), allow_unknown=True)
    next: int = 0


_DESC = struct.Struct(VirtqDesc.FORMAT)  # type: ignore[attr-defined]


def read_desc(buf: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int, int, int]:
    """The fields of the ``struct virtq_desc`` at ``offset`` as ``(addr, len, flags, next)``, unchecked:
    the virtqueue's hot path (one C call, no object); :class:`VirtqDesc` is the checked form."""
    return _DESC.unpack_from(buf, offset)


@lru_cache(maxsize=256)
def _desc_table_struct(entries: int) -> struct.Struct:
    return struct.Struct("<" + VirtqDesc.FORMAT.lstrip("<") * entries)  # type: ignore[attr-defined]


def read_desc_table(buf: bytes | bytearray | memoryview) -> tuple[int, ...]:
    """Every ``struct virtq_desc`` of a table (``len(buf)`` a non-zero multiple of 16) in one C
    call, unchecked, flat: ``(addr0, len0, flags0, next0, addr1, ...)`` -- so ``t[0::4]`` are the
    addresses, ``t[1::4]`` the lengths, ``t[2::4]`` the flags, ``t[3::4]`` the next indices."""
    return _desc_table_struct(len(buf) // DESC_SIZE).unpack(buf)


@layout("<II")
@dataclass(frozen=True, slots=True)
class VirtqUsedElem:
    """``struct virtq_used_elem``: head id of a chain and bytes written (8 bytes)."""

    id: int
    len: int


#: ``struct virtq_used_elem`` as a numpy record (a run of the used ring read at once)
USED_ELEM_DTYPE = np.dtype([("id", "<u4"), ("len", "<u4")])
#: an avail ring entry (a run of heads written at once)
AVAIL_ENTRY_DTYPE = np.dtype("<u2")


@layout("<HH")
@dataclass(frozen=True, slots=True)
class RingHeader:
    """The ``flags, idx`` pair that opens both the avail and the used ring."""

    flags: int
    idx: int


def check_queue_size(size: int) -> int:
    """Return ``size`` if it is a legal split-queue size, else raise."""
    if not (1 <= size <= MAX_QUEUE_SIZE) or size & (size - 1):
        raise FieldValueError("virtqueue", "size", size, f"a power of two in 1..{MAX_QUEUE_SIZE}")
    return size


def desc_table_size(size: int) -> int:
    return DESC_SIZE * check_queue_size(size)


def avail_ring_size(size: int, event_idx: bool = True) -> int:
    """Bytes of the available ring, with the trailing ``used_event`` if ``event_idx``."""
    return 4 + 2 * check_queue_size(size) + (2 if event_idx else 0)


def used_ring_size(size: int, event_idx: bool = True) -> int:
    """Bytes of the used ring, with the trailing ``avail_event`` if ``event_idx``."""
    return 4 + USED_ELEM_SIZE * check_queue_size(size) + (2 if event_idx else 0)


def avail_entry_offset(slot: int) -> int:
    return 4 + 2 * slot


def used_event_offset(size: int) -> int:
    return 4 + 2 * size


def used_elem_offset(slot: int) -> int:
    return 4 + USED_ELEM_SIZE * slot


def avail_event_offset(size: int) -> int:
    return 4 + USED_ELEM_SIZE * size


def align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


@dataclass(frozen=True, slots=True)
class SplitRingLayout:
    """Where the three parts of a queue of ``size`` go when packed from ``base``.

    The modern transport lets each part live anywhere (with its alignment);
    this is the contiguous packing a driver uses when it allocates all three
    at once.  ``legacy_align`` reproduces the legacy ``vring_size()`` layout
    (used ring at the next ``legacy_align`` boundary).
    """

    size: int
    desc: int
    avail: int
    used: int
    total: int

    @classmethod
    def packed_at(cls, base: int, size: int, *, legacy_align: int | None = None) -> "SplitRingLayout":
        check_queue_size(size)
        if base % DESC_ALIGN:
            raise FieldValueError("SplitRingLayout", "base", base, f"aligned to {DESC_ALIGN}")
        desc = base
        avail = desc + desc_table_size(size)
        used_align = legacy_align or USED_ALIGN
        used = align_up(avail + avail_ring_size(size), used_align)
        end = used + used_ring_size(size)
        return cls(size=size, desc=desc, avail=avail, used=used, total=end - base)


def legacy_vring_size(size: int, align: int) -> int:
    """What Linux's ``vring_size(num, align)`` returns (for the C cross-check)."""
    return SplitRingLayout.packed_at(0, size, legacy_align=align).total


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """``vring_need_event``: did ``[old_idx, new_idx)`` step over ``event_idx``?"""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)
