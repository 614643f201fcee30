"""The device state image that SAVE_STATE reads out and RESTORE_STATE writes in.

The proposal leaves the format to the device; virtio-lm's is versioned,
typed records behind a checksummed header, little-endian::

    header (32 bytes)
      +0  le32 magic          "VLMS" (0x534d4c56)
      +4  le16 version        1
      +6  le16 device_id      virtio device type (1 net, 2 blk, ...)
      +8  le32 total_len      header + all records, bytes
      +12 le32 crc32          zlib CRC-32 of bytes [32, total_len)
      +16 le32 num_records
      +20 le32 reserved[3]    0
    record, num_records times, back to back
      +0  le16 type           RecordType
      +2  le16 reserved       0
      +4  le32 length         payload bytes
      +8  u8   payload[length]

Common record types describe the virtio function (features, status,
queues, device config, requests in flight); types >= 0x100 belong to the
device type and are decoded by it.  The image is untrusted: :func:`decode_image`
checks magic, version, lengths, checksum, record framing and each common
record's fixed layout, and refuses anything else with a :class:`WireError`.
Meaning-level checks (a queue address inside guest memory, features that
were offered) belong to the restoring device.
"""

from __future__ import annotations

import enum
import zlib
from dataclasses import dataclass, field
from typing import Iterable

from virtio_lm.errors import FieldValueError, ShortBufferError, TrailingDataError
from virtio_lm.wire.codec import layout, reserved

MAGIC = 0x534D4C56  # b"VLMS" little-endian
VERSION = 1
DEVICE_RECORD_BASE = 0x100
MAX_IMAGE_SIZE = 64 << 20  # refuse absurd totals before allocating


class RecordType(enum.IntEnum):
    FUNCTION = 1  # FunctionRecord
    QUEUE = 2  # QueueRecord, one per queue
    CONFIG = 3  # raw device-specific config space bytes
    INFLIGHT = 4  # InflightHeader + device-specific payload, one per request in flight


@layout("<IHHIII12x")
@dataclass(frozen=True, slots=True)
class ImageHeader:
    magic: int
    version: int
    device_id: int
    total_len: int
    crc32: int
    num_records: int


@layout("<HHI")
@dataclass(frozen=True, slots=True)
class RecordHeader:
    type: int
    reserved: int = reserved()
    length: int = 0


@layout("<QQBBHHHI")
@dataclass(frozen=True, slots=True)
class FunctionRecord:
    """The virtio function: negotiated features and status (28 bytes)."""

    device_features: int
    driver_features: int
    status: int
    config_generation: int
    config_msix_vector: int
    num_queues: int
    queue_select: int
    reserved: int = reserved()


@layout("<HHBBHQQQHHHH")
@dataclass(frozen=True, slots=True)
class QueueRecord:
    """One virtqueue: configuration and device shadow indices (40 bytes).

    ``flags`` bit 0: the device's last notification decision is valid
    (``signalled_used`` meaningful for EVENT_IDX); bit 1: queue broken.
    """

    index: int
    size: int
    enabled: int
    flags: int
    msix_vector: int
    desc_addr: int
    avail_addr: int
    used_addr: int
    last_avail_idx: int
    used_idx: int
    signalled_used: int
    reserved: int = reserved()


QUEUE_FLAG_SIGNALLED_VALID = 1
QUEUE_FLAG_BROKEN = 2


@layout("<HHHBxI")
@dataclass(frozen=True, slots=True)
class InflightHeader:
    """An INFLIGHT record (12 bytes, then ``data_len`` bytes of data).

    A chain the device took from the avail ring (at ``avail_idx``) and has
    not returned on the used ring.  ``done`` 0: not executed (re-executed
    from the descriptors in guest memory after restore); 1: executed, its
    completion held in the device: ``data`` is what will be written into the
    chain's writable part, then the chain is returned with ``used_len =
    data_len``.
    """

    queue: int
    head: int
    avail_idx: int
    done: int
    data_len: int


@dataclass(frozen=True)
class Record:
    type: int
    payload: bytes


@dataclass
class StateImage:
    """A decoded image: device type and its records, in order."""

    device_id: int
    records: list[Record] = field(default_factory=list)

    def of_type(self, rtype: int) -> list[Record]:
        return [r for r in self.records if r.type == rtype]

    def add(self, rtype: int, payload: bytes) -> None:
        self.records.append(Record(int(rtype), bytes(payload)))


def encode_image(image: StateImage) -> bytes:
    body = b"".join(RecordHeader(r.type, 0, len(r.payload)).encode() + r.payload for r in image.records)
    total = ImageHeader.SIZE + len(body)
    hdr = ImageHeader(MAGIC, VERSION, image.device_id, total, zlib.crc32(body), len(image.records))
    return hdr.encode() + body


def peek_total_len(buf: bytes | bytearray | memoryview) -> int:
    """The ``total_len`` a (possibly partial) image claims; needs the header."""
    hdr = ImageHeader.unpack_from(buf, 0)
    _check_header(hdr)
    return hdr.total_len


def _check_header(hdr: ImageHeader) -> None:
    if hdr.magic != MAGIC:
        raise FieldValueError("ImageHeader", "magic", hdr.magic, f"must be {MAGIC:#x}")
    if hdr.version != VERSION:
        raise FieldValueError("ImageHeader", "version", hdr.version, f"only version {VERSION} is known")
    if not ImageHeader.SIZE <= hdr.total_len <= MAX_IMAGE_SIZE:
        raise FieldValueError(
            "ImageHeader", "total_len", hdr.total_len, f"between {ImageHeader.SIZE} and {MAX_IMAGE_SIZE}"
        )


_COMMON_LAYOUTS = {
    RecordType.FUNCTION: FunctionRecord,
    RecordType.QUEUE: QueueRecord,
}


def decode_image(buf: bytes | bytearray | memoryview) -> StateImage:
    """Validate and decode a whole image (exactly ``total_len`` bytes)."""
    hdr = ImageHeader.unpack_from(buf, 0)
    _check_header(hdr)
    if len(buf) < hdr.total_len:
        raise ShortBufferError("StateImage", None, hdr.total_len, len(buf))
    if len(buf) > hdr.total_len:
        raise TrailingDataError("StateImage", hdr.total_len, len(buf))
    body = bytes(buf[ImageHeader.SIZE :])
    crc = zlib.crc32(body)
    if crc != hdr.crc32:
        raise FieldValueError("ImageHeader", "crc32", hdr.crc32, f"checksum of the records is {crc:#010x}")
    image = StateImage(hdr.device_id)
    off = 0
    for i in range(hdr.num_records):
        where = f"record[{i}]"
        if len(body) - off < RecordHeader.SIZE:
            raise ShortBufferError("StateImage", where, RecordHeader.SIZE, len(body) - off)
        rh = RecordHeader.unpack_from(body, off)
        off += RecordHeader.SIZE
        if rh.length > len(body) - off:
            raise ShortBufferError("StateImage", f"{where}.payload", rh.length, len(body) - off)
        payload = body[off : off + rh.length]
        off += rh.length
        if rh.type < DEVICE_RECORD_BASE:
            try:
                rtype = RecordType(rh.type)
            except ValueError:
                raise FieldValueError("StateImage", f"{where}.type", rh.type, "a known record type") from None
            fixed = _COMMON_LAYOUTS.get(rtype)
            if fixed is not None:
                fixed.decode(payload)  # exact size and reserved fields
            elif rtype is RecordType.INFLIGHT:
                ih = InflightHeader.unpack_from(payload, 0)
                if ih.done not in (0, 1):
                    raise FieldValueError("InflightHeader", f"{where}.done", ih.done, "0 or 1")
                if ih.data_len != len(payload) - InflightHeader.SIZE:
                    raise FieldValueError(
                        "InflightHeader", f"{where}.data_len", ih.data_len,
                        f"equals the {len(payload) - InflightHeader.SIZE} data bytes that follow",
                    )
        image.records.append(Record(rh.type, payload))
    if off != len(body):
        raise TrailingDataError("StateImage.records", off, len(body))
    return image


def build_image(device_id: int, records: Iterable[tuple[int, bytes]]) -> bytes:
    img = StateImage(device_id)
    for rtype, payload in records:
        img.add(rtype, payload)
    return encode_image(img)
