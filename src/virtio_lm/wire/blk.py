"""virtio-blk wire formats (virtio 1.x, 5.2 "Block Device").

A request is one descriptor chain::

    device-readable                         device-writable
    +------------------------+----------+   +----------+--------+
    | virtio_blk_outhdr (16) | data ... |   | data ... | status |
    +------------------------+----------+   +----------+--------+
      le32 type                (OUT, DISCARD,  (IN,       u8
      le32 ioprio              WRITE_ZEROES,    GET_ID)
      le64 sector              SECURE_ERASE)

DISCARD / WRITE_ZEROES / SECURE_ERASE carry an array of 16-byte
:class:`DiscardSegment` as their data.  Sectors are 512 bytes whatever
``blk_size`` says.

``virtio_blk_config`` (:class:`BlkConfig`) is the device configuration
space, 72 bytes, field for field and offset for offset as Linux's
``linux/virtio_blk.h`` up to the secure-erase fields (the later zoned fields
are not modelled: VIRTIO_BLK_F_ZONED is never offered).

Feature collision: the proposal's ``VIRTIO_BLK_F_CTRL_VQ`` is bit 15, which the
virtio spec (1.2) gave to ``VIRTIO_BLK_F_LIFETIME``.  virtio-lm implements the
proposal's meaning; :class:`BlkFeature` defines ``CTRL_VQ`` first so bit 15
renders as CTRL_VQ, and ``LIFETIME`` is an alias of the same value, listed only
so the number checks against the spec.  A virtio-lm blk device never supports
``GET_LIFETIME`` (it answers UNSUPP).  With CTRL_VQ, the control queue is queue
index ``num_queues`` (after the request queues), and CTRL_VQ requires MQ.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from virtio_lm.errors import FieldValueError, ShortBufferError
from virtio_lm.wire.codec import enum_field, flags_field, layout, reserved

SECTOR_SIZE = 512
SECTOR_SHIFT = 9
VIRTIO_BLK_ID_BYTES = 20
STATUS_SIZE = 1


class BlkFeature(enum.IntEnum):
    """virtio-blk feature bits (device specific range)."""

    SIZE_MAX = 1
    SEG_MAX = 2
    GEOMETRY = 4
    RO = 5
    BLK_SIZE = 6
    FLUSH = 9
    TOPOLOGY = 10
    CONFIG_WCE = 11
    MQ = 12
    DISCARD = 13
    WRITE_ZEROES = 14
    CTRL_VQ = 15  # the proposal's meaning of bit 15 (what virtio-lm implements)
    LIFETIME = 15  # alias: the virtio spec's meaning of bit 15, never offered by virtio-lm
    SECURE_ERASE = 16


#: ``{feature: requirement groups}`` (see :data:`virtio_lm.wire.features.Requirements`).
BLK_REQUIREMENTS: dict[int, tuple[tuple[int, ...], ...]] = {
    BlkFeature.CTRL_VQ: ((BlkFeature.MQ,),),
}


def ctrl_queue_index(num_queues: int) -> int:
    """Index of the control queue of a blk device with ``num_queues`` request queues."""
    return num_queues


class BlkReqType(enum.IntEnum):
    """``VIRTIO_BLK_T_*`` request types."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


#: Request types whose readable data is an array of :class:`DiscardSegment`.
SEGMENT_TYPES = frozenset({BlkReqType.DISCARD, BlkReqType.WRITE_ZEROES, BlkReqType.SECURE_ERASE})


class BlkStatus(enum.IntEnum):
    """The status byte the device writes last."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


@layout("<IIQ")
@dataclass(frozen=True, slots=True)
class BlkOutHdr:
    """``struct virtio_blk_outhdr`` (16 bytes).

    ``type`` outside :class:`BlkReqType` is refused with EnumValueError naming
    ``type`` (a device answers such a request UNSUPP).  ``ioprio`` is the
    spec's "reserved" word; Linux puts the request's I/O priority there, so it
    is accepted as any value and ignored by virtio-lm devices.
    """

    type: BlkReqType = enum_field(BlkReqType)
    ioprio: int = 0
    sector: int = 0


OUTHDR_SIZE = BlkOutHdr.SIZE  # type: ignore[attr-defined]

#: A request block as a numpy record: the ``virtio_blk_outhdr`` (the device reads it), then the
#: status byte (the device writes it), padded to 32 bytes -- the layout a driver placing many
#: requests side by side writes and reads them in one array operation.
REQ_BLOCK_DTYPE = np.dtype({"names": ["type", "ioprio", "sector", "status"],
                            "formats": ["<u4", "<u4", "<u8", "u1"],
                            "offsets": [0, 4, 8, OUTHDR_SIZE], "itemsize": 32})


class SegmentFlags(enum.IntFlag):
    UNMAP = 1


@layout("<QII")
@dataclass(frozen=True, slots=True)
class DiscardSegment:
    """``struct virtio_blk_discard_write_zeroes`` (16 bytes): one range.

    Only the UNMAP flag (bit 0) is defined; the other 31 bits are reserved and
    refused (FieldValueError naming ``flags``).
    """

    sector: int
    num_sectors: int
    flags: SegmentFlags = flags_field(SegmentFlags, SegmentFlags(0))


SEGMENT_SIZE = DiscardSegment.SIZE  # type: ignore[attr-defined]


def decode_segments(data: bytes | bytearray | memoryview) -> tuple[DiscardSegment, ...]:
    """The segment array of a DISCARD/WRITE_ZEROES/SECURE_ERASE request.

    At least one segment; the length must be a whole number of segments.
    """
    n = len(data)
    if n == 0:
        raise ShortBufferError("virtio_blk_discard_write_zeroes", None, SEGMENT_SIZE, 0)
    if n % SEGMENT_SIZE:
        raise FieldValueError(
            "virtio_blk_discard_write_zeroes", None, n, f"a multiple of {SEGMENT_SIZE} bytes"
        )
    return tuple(
        DiscardSegment.unpack_from(data, off)  # type: ignore[attr-defined]
        for off in range(0, n, SEGMENT_SIZE)
    )


def encode_segments(segments: tuple[DiscardSegment, ...] | list[DiscardSegment]) -> bytes:
    if not segments:
        raise FieldValueError("virtio_blk_discard_write_zeroes", None, 0, "at least one segment")
    return b"".join(s.encode() for s in segments)  # type: ignore[attr-defined]


def encode_blk_id(ident: str | bytes) -> bytes:
    """The 20-byte GET_ID answer: the id zero-padded (not necessarily terminated)."""
    raw = ident.encode("ascii") if isinstance(ident, str) else bytes(ident)
    if len(raw) > VIRTIO_BLK_ID_BYTES:
        raise FieldValueError("virtio_blk_id", "id", ident, f"at most {VIRTIO_BLK_ID_BYTES} bytes")
    return raw.ljust(VIRTIO_BLK_ID_BYTES, b"\0")


def decode_blk_id(raw: bytes | bytearray | memoryview) -> bytes:
    """The id bytes of a GET_ID answer, up to the first NUL."""
    if len(raw) != VIRTIO_BLK_ID_BYTES:
        raise FieldValueError("virtio_blk_id", "id", len(raw), f"exactly {VIRTIO_BLK_ID_BYTES} bytes")
    return bytes(raw).split(b"\0", 1)[0]


@layout("<QIIHBBIBBHIBBHIIIIIB3sIII")
@dataclass(frozen=True, slots=True)
class BlkConfig:
    """``struct virtio_blk_config`` (72 bytes, spec field names).

    Linux calls ``writeback`` ``wce`` and ``unused0`` ``unused``; the geometry
    and topology sub-structs are flattened.  ``writeback`` is 0 (write
    through) or 1 (writeback).
    """

    capacity: int = 0
    size_max: int = 0
    seg_max: int = 0
    geometry_cylinders: int = 0
    geometry_heads: int = 0
    geometry_sectors: int = 0
    blk_size: int = SECTOR_SIZE
    physical_block_exp: int = 0
    alignment_offset: int = 0
    min_io_size: int = 0
    opt_io_size: int = 0
    writeback: int = 0
    unused0: int = reserved()
    num_queues: int = 1
    max_discard_sectors: int = 0
    max_discard_seg: int = 0
    discard_sector_alignment: int = 0
    max_write_zeroes_sectors: int = 0
    max_write_zeroes_seg: int = 0
    write_zeroes_may_unmap: int = 0
    unused1: int = reserved()
    max_secure_erase_sectors: int = 0
    max_secure_erase_seg: int = 0
    secure_erase_sector_alignment: int = 0

    def __post_init__(self) -> None:
        if self.writeback not in (0, 1):
            raise FieldValueError("virtio_blk_config", "writeback", self.writeback, "0 or 1")


BLK_CONFIG_SIZE = BlkConfig.SIZE  # type: ignore[attr-defined]
