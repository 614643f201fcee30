"""Device parts of virtio 1.4 (device-parts.tex), as byte layouts.

A device part is a 16-byte header ``virtio_dev_part_hdr`` (le16 part_type,
u8 flags, u8 reserved, an 8-byte selector, le32 length) followed by
``length`` bytes of value.  A list of parts is the parts laid end to end
(DEV_PARTS_GET's result, DEV_PARTS_SET's data); a list of headers alone is
METADATA_GET LIST's result and DEV_PARTS_GET SELECTED's request.

The selector's meaning depends on the part type: the common-config field
offset for PCI_COMMON_CFG, the queue index for VQ_CFG / VQ_NOTIFY_CFG, the
device type's own layout for device-specific parts (virtio-net: the control
command's class and command), zero otherwise.

:data:`COMMON_ORDER` is the spec's mandatory order of the common parts and
:data:`PRECEDING` the parts each one needs before it ("Device parts order"
table in admin-cmds-device-parts.tex).
"""

from __future__ import annotations

import enum
import zlib
from dataclasses import dataclass

from virtio_lm.errors import FieldValueError, ShortBufferError
from virtio_lm.wire.codec import flags_field, layout, read_u32, read_u64, reserved, u64

# ------------------------------------------------------------------ numbers


class PartType(enum.IntEnum):
    """Part types virtio-lm knows (common 0x100-0x105; virtio-net 0x200)."""

    DEV_FEATURES = 0x100
    DRV_FEATURES = 0x101
    PCI_COMMON_CFG = 0x102
    DEVICE_STATUS = 0x103
    VQ_CFG = 0x104
    VQ_NOTIFY_CFG = 0x105
    NET_CVQ_CFG = 0x200


COMMON_FIRST, COMMON_LAST = 0x0000, 0x01FF
DEVICE_FIRST, DEVICE_LAST = 0x0200, 0x05FF


class PartFlags(enum.IntFlag):
    """``virtio_dev_part_hdr.flags``; the spec numbers the bit (0)."""

    OPTIONAL = 1 << 0


#: the common parts in the order the spec mandates (GET answers in it, SET must use it)
COMMON_ORDER: tuple[PartType, ...] = (
    PartType.DEV_FEATURES,
    PartType.DRV_FEATURES,
    PartType.PCI_COMMON_CFG,
    PartType.DEVICE_STATUS,
    PartType.VQ_CFG,
    PartType.VQ_NOTIFY_CFG,
)

#: the parts that must precede each common part (the spec's table)
PRECEDING: dict[PartType, tuple[PartType, ...]] = {
    PartType.DEV_FEATURES: (),
    PartType.DRV_FEATURES: (),
    PartType.PCI_COMMON_CFG: (PartType.DEV_FEATURES, PartType.DRV_FEATURES),
    PartType.DEVICE_STATUS: (PartType.DEV_FEATURES, PartType.DRV_FEATURES, PartType.PCI_COMMON_CFG),
    PartType.VQ_CFG: (
        PartType.DEV_FEATURES, PartType.DRV_FEATURES, PartType.PCI_COMMON_CFG, PartType.DEVICE_STATUS,
    ),
    PartType.VQ_NOTIFY_CFG: (
        PartType.DEV_FEATURES, PartType.DRV_FEATURES, PartType.PCI_COMMON_CFG, PartType.DEVICE_STATUS,
        PartType.VQ_CFG,
    ),
}

#: parts the spec marks optional ("O"): the device checks them, it need not apply them
OPTIONAL_PARTS = frozenset({PartType.DEV_FEATURES})


def order_key(part_type: int) -> int:
    """Sort key of a part type in the mandatory order: the common parts in
    :data:`COMMON_ORDER`, then device-specific parts by type."""
    try:
        return COMMON_ORDER.index(PartType(part_type))
    except ValueError:
        return len(COMMON_ORDER) + part_type


# ------------------------------------------------------------------ header and selectors


@layout("<HBB8sI")
@dataclass(frozen=True, slots=True)
class DevPartHdr:
    """``struct virtio_dev_part_hdr`` (16 bytes); ``selector`` is the raw union."""

    part_type: int
    flags: PartFlags = flags_field(PartFlags, PartFlags(0))
    reserved: int = reserved()
    selector: bytes = bytes(8)
    length: int = 0

    @property
    def optional(self) -> bool:
        return bool(self.flags & PartFlags.OPTIONAL)

    def key(self) -> tuple[int, bytes]:
        """What identifies the part (type and selector), flags and length aside."""
        return self.part_type, self.selector


PART_HDR_SIZE = DevPartHdr.SIZE  # 16


@layout("<I4s")
@dataclass(frozen=True, slots=True)
class CommonCfgSelector:
    """``selector.pci_common_cfg``: the field's offset in virtio_pci_common_cfg."""

    offset: int
    reserved: int = reserved()


@layout("<H6s")
@dataclass(frozen=True, slots=True)
class VqIndexSelector:
    """``selector.vq_index``."""

    index: int
    reserved: int = reserved()


@layout("<BB6s")
@dataclass(frozen=True, slots=True)
class NetCvqSelector:
    """``virtio_net_dev_part_cvq_selector``: a control command's class and command."""

    cls: int
    command: int
    reserved: int = reserved()


NO_SELECTOR = bytes(8)

# ------------------------------------------------------------------ values


@layout("<HHHHQQQ")
@dataclass(frozen=True, slots=True)
class VqCfgValue:
    """``struct virtio_dev_part_vq_cfg`` (32 bytes)."""

    queue_size: int
    vector: int
    enabled: int
    reserved: int = reserved()
    queue_desc: int = 0
    queue_driver: int = 0
    queue_device: int = 0


@layout("<HH4s")
@dataclass(frozen=True, slots=True)
class VqNotifyValue:
    """``struct virtio_dev_part_vq_notify_data`` (8 bytes)."""

    queue_notify_off: int
    queue_notif_config_data: int
    reserved: int = reserved()


def encode_features(features: int, words: int = 2) -> bytes:
    """``struct virtio_dev_part_features``: ``words`` le64 words of feature bits."""
    if features < 0 or features >> (64 * words):
        raise FieldValueError("virtio_dev_part_features", "feature_bits", features, f"fits {words} le64 words")
    return b"".join(u64((features >> (64 * w)) & ((1 << 64) - 1)) for w in range(words))


def decode_features(data: bytes | bytearray | memoryview) -> int:
    """Feature bits from a ``le64[]`` value; its length must be a non-zero multiple of 8."""
    if not data or len(data) % 8:
        raise FieldValueError("virtio_dev_part_features", "length", len(data), "a non-zero multiple of 8")
    value = 0
    for w in range(len(data) // 8):
        value |= read_u64(data, 8 * w) << (64 * w)
    return value


# ------------------------------------------------------------------ parts and lists


@dataclass(frozen=True, slots=True)
class DevPart:
    """One part: its header and value (``hdr.length == len(value)``)."""

    hdr: DevPartHdr
    value: bytes

    def __post_init__(self) -> None:
        if self.hdr.length != len(self.value):
            raise FieldValueError("virtio_dev_part", "length", self.hdr.length, f"the value's {len(self.value)} bytes")

    @classmethod
    def make(cls, part_type: int, value: bytes, *, selector: bytes = NO_SELECTOR, optional: bool = False) -> "DevPart":
        flags = PartFlags.OPTIONAL if optional else PartFlags(0)
        return cls(DevPartHdr(part_type, flags, 0, selector, len(value)), bytes(value))

    @property
    def size(self) -> int:
        return PART_HDR_SIZE + len(self.value)

    def encode(self) -> bytes:
        return self.hdr.encode() + self.value


def encode_parts(parts: list[DevPart] | tuple[DevPart, ...]) -> bytes:
    return b"".join(p.encode() for p in parts)


def decode_parts(buf: bytes | bytearray | memoryview, *, max_value: int = 1 << 20) -> list[DevPart]:
    """Parts laid end to end.  Refused: a header cut short, a length running
    past the buffer, a value larger than ``max_value``, bad flags or reserved."""
    out: list[DevPart] = []
    pos = 0
    n = len(buf)
    while pos < n:
        if n - pos < PART_HDR_SIZE:
            raise ShortBufferError(f"virtio_dev_part[{len(out)}]", "hdr", PART_HDR_SIZE, n - pos)
        hdr = DevPartHdr.unpack_from(buf, pos)
        if hdr.length > max_value:
            raise FieldValueError(f"virtio_dev_part[{len(out)}]", "length", hdr.length, f"at most {max_value}")
        start = pos + PART_HDR_SIZE
        if start + hdr.length > n:
            raise ShortBufferError(f"virtio_dev_part[{len(out)}]", "value", hdr.length, n - start)
        out.append(DevPart(hdr, bytes(buf[start : start + hdr.length])))
        pos = start + hdr.length
    return out


def encode_hdrs(hdrs: list[DevPartHdr] | tuple[DevPartHdr, ...]) -> bytes:
    return b"".join(h.encode() for h in hdrs)


def decode_hdrs(buf: bytes | bytearray | memoryview) -> list[DevPartHdr]:
    """Headers laid end to end; the length must be a multiple of 16."""
    if len(buf) % PART_HDR_SIZE:
        raise ShortBufferError("virtio_dev_part_hdr[]", None, (len(buf) // PART_HDR_SIZE + 1) * PART_HDR_SIZE, len(buf))
    return [DevPartHdr.unpack_from(buf, off) for off in range(0, len(buf), PART_HDR_SIZE)]


# ------------------------------------------------------------------ the parts image (a migration stream's device record)
#: "VLMP" little-endian: a device-parts image, beside wire.state's "VLMS" state image
PARTS_IMAGE_MAGIC = 0x504D4C56
PARTS_IMAGE_VERSION = 1
MAX_PARTS_IMAGE = 16 << 20


@layout("<IHHII")
@dataclass(frozen=True, slots=True)
class PartsImageHeader:
    """What virtio-lm puts before a VF's device parts in a migration stream (16 bytes):
    magic "VLMP", version 1, the virtio device type, the parts' total length, their
    CRC-32 (zlib).  Linux's virtio-vfio-pci frames each DEV_PARTS_GET result with a
    record header of its own; this is virtio-lm's."""

    magic: int
    version: int
    device_id: int
    parts_len: int
    crc32: int


def encode_parts_image(device_id: int, parts: list[DevPart] | tuple[DevPart, ...]) -> bytes:
    body = encode_parts(parts)
    return PartsImageHeader(PARTS_IMAGE_MAGIC, PARTS_IMAGE_VERSION, device_id, len(body), zlib.crc32(body)).encode() + body


def is_parts_image(buf: bytes | bytearray | memoryview) -> bool:
    """Whether ``buf`` starts with the parts image's magic (else: try wire.state)."""
    return len(buf) >= 4 and read_u32(buf, 0) == PARTS_IMAGE_MAGIC


def decode_parts_image(buf: bytes | bytearray | memoryview) -> tuple[int, list[DevPart]]:
    """Validate a parts image: ``(device_id, parts)``.  Refused: a header cut short, a bad
    magic / version, a length other than the bytes that follow (or above 16 MiB), a
    checksum mismatch, parts that do not frame (:func:`decode_parts`).  Whether the member
    takes the parts is its business (DEV_PARTS_SET)."""
    hdr = PartsImageHeader.unpack_from(buf, 0)
    if hdr.magic != PARTS_IMAGE_MAGIC:
        raise FieldValueError("PartsImageHeader", "magic", hdr.magic, f"must be {PARTS_IMAGE_MAGIC:#x}")
    if hdr.version != PARTS_IMAGE_VERSION:
        raise FieldValueError("PartsImageHeader", "version", hdr.version, f"only version {PARTS_IMAGE_VERSION}")
    if hdr.parts_len > MAX_PARTS_IMAGE:
        raise FieldValueError("PartsImageHeader", "parts_len", hdr.parts_len, f"at most {MAX_PARTS_IMAGE}")
    body = bytes(buf[PartsImageHeader.SIZE :])
    if len(body) != hdr.parts_len:
        raise FieldValueError("PartsImageHeader", "parts_len", hdr.parts_len, f"equals the {len(body)} bytes that follow")
    crc = zlib.crc32(body)
    if crc != hdr.crc32:
        raise FieldValueError("PartsImageHeader", "crc32", hdr.crc32, f"checksum of the parts is {crc:#010x}")
    return hdr.device_id, decode_parts(body)
