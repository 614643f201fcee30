"""vfio-user message layouts (QEMU docs/interop/vfio-user.rst) and the VFIO constants they reuse
(Linux ``include/uapi/linux/vfio.h``; compared with it by ``tests/test_wire_c_headers.py``).

Every message is a 16-byte header and a payload; file descriptors travel beside it as
SCM_RIGHTS ancillary data::

    +------+---------+------+-------+-------+---------------------------+
    |  id  | command | size | flags | error | payload (size - 16 bytes) |
    +------+---------+------+-------+-------+---------------------------+
     le16    le16      le32   le32    le32

``size`` counts the header.  ``flags``: bits 0-3 the type (0 command, 1 reply), bit 4
NO_REPLY, bit 5 ERROR (``error`` is then an errno).  The spec says "host endianness"; this
project is little-endian only.

Payloads (packed)::

    Version          4+    le16 major, le16 minor, then optional NUL-terminated JSON
    DmaMap          32     le32 argsz, flags, le64 offset, address, size (+ 1 fd: mappable)
    DmaUnmap        24     le32 argsz, flags, le64 address, size
    DeviceInfo      16     le32 argsz, flags, num_regions, num_irqs
    RegionInfo      32     le32 argsz, flags, index, cap_offset, le64 size, offset
    IrqInfo         16     le32 argsz, flags, index, count
    IrqSet         20+     le32 argsz, flags, index, start, count; bools or fds follow
    RegionAccess   16+     le64 offset, le32 region, count; data follows (read reply, write)
    DeviceFeature   8+     le32 argsz, flags (bits 0-15 feature, 16 GET, 17 SET, 18 PROBE)

The decoders check shape only (sizes, counts); what the values mean is the protocol core's
business (:mod:`virtio_lm.vfio_user.protocol`).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

from virtio_lm.errors import FieldValueError, ShortBufferError
from virtio_lm.wire.codec import layout

HEADER_SIZE = 16
#: the largest message a virtio-lm server accepts (a 1 MiB data transfer and its headers)
MAX_DATA_XFER = 1 << 20
MAX_MESSAGE = MAX_DATA_XFER + 64
#: file descriptors one message may carry (a SET_IRQS of more vectors comes in pieces)
MAX_MSG_FDS = 16  # QEMU refuses a peer that claims more (VFIO_USER_MAX_MAX_FDS)
VERSION_MAJOR = 0
VERSION_MINOR = 0  # what QEMU 11.1 proposes; a higher proposal is answered with this


class Command(enum.IntEnum):
    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


class MsgFlags(enum.IntFlag):
    REPLY = 0x1
    NO_REPLY = 0x10
    ERROR = 0x20


MSG_TYPE_MASK = 0xF
MSG_TYPE_COMMAND = 0x0
MSG_TYPE_REPLY = 0x1
MSG_FLAGS_KNOWN = int(MSG_TYPE_MASK | MsgFlags.NO_REPLY | MsgFlags.ERROR)

# ------------------------------------------------------------------ linux/vfio.h
VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1
VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3
VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_IRQ_INFO_MASKABLE = 1 << 1
VFIO_IRQ_INFO_AUTOMASKED = 1 << 2
VFIO_IRQ_INFO_NORESIZE = 1 << 3
VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5
VFIO_IRQ_SET_DATA_TYPE_MASK = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_DATA_EVENTFD
VFIO_IRQ_SET_ACTION_TYPE_MASK = VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_ACTION_UNMASK | VFIO_IRQ_SET_ACTION_TRIGGER
VFIO_DEVICE_FEATURE_MASK = 0xFFFF
VFIO_DEVICE_FEATURE_GET = 1 << 16
VFIO_DEVICE_FEATURE_SET = 1 << 17
VFIO_DEVICE_FEATURE_PROBE = 1 << 18
VFIO_DEVICE_FEATURE_MIGRATION = 1
VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE = 2
VFIO_DEVICE_FEATURE_DMA_LOGGING_START = 6
VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP = 7
VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT = 8
VFIO_USER_DMA_MAP_FLAG_READ = 1 << 0
VFIO_USER_DMA_MAP_FLAG_WRITE = 1 << 1


class PciRegion(enum.IntEnum):
    """VFIO_PCI_*_REGION_INDEX."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


VFIO_PCI_NUM_REGIONS = 9


class PciIrq(enum.IntEnum):
    """VFIO_PCI_*_IRQ_INDEX."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


VFIO_PCI_NUM_IRQS = 5


# ------------------------------------------------------------------ layouts
@layout("<HHIII")
@dataclass(frozen=True, slots=True)
class Header:
    id: int = 0
    command: int = 0
    size: int = HEADER_SIZE
    flags: int = 0
    error: int = 0


@layout("<HH")
@dataclass(frozen=True, slots=True)
class VersionHead:
    major: int = VERSION_MAJOR
    minor: int = VERSION_MINOR


@layout("<IIQQQ")
@dataclass(frozen=True, slots=True)
class DmaMap:
    argsz: int = 32
    flags: int = 0
    offset: int = 0
    address: int = 0
    size: int = 0


@layout("<IIQQ")
@dataclass(frozen=True, slots=True)
class DmaUnmap:
    argsz: int = 24
    flags: int = 0
    address: int = 0
    size: int = 0


@layout("<IIII")
@dataclass(frozen=True, slots=True)
class DeviceInfo:
    argsz: int = 16
    flags: int = 0
    num_regions: int = 0
    num_irqs: int = 0


@layout("<IIIIQQ")
@dataclass(frozen=True, slots=True)
class RegionInfo:
    argsz: int = 32
    flags: int = 0
    index: int = 0
    cap_offset: int = 0
    size: int = 0
    offset: int = 0


@layout("<IIII")
@dataclass(frozen=True, slots=True)
class IrqInfo:
    argsz: int = 16
    flags: int = 0
    index: int = 0
    count: int = 0


@layout("<IIIII")
@dataclass(frozen=True, slots=True)
class IrqSet:
    argsz: int = 20
    flags: int = 0
    index: int = 0
    start: int = 0
    count: int = 0


@layout("<QII")
@dataclass(frozen=True, slots=True)
class RegionAccess:
    offset: int = 0
    region: int = 0
    count: int = 0


@layout("<II")
@dataclass(frozen=True, slots=True)
class DeviceFeature:
    argsz: int = 8
    flags: int = 0


def encode_message(header: Header, payload: bytes = b"") -> bytes:
    return header.encode() + payload


def decode_version(payload: bytes) -> tuple[VersionHead, dict]:
    """The version numbers and the capabilities object of a VERSION payload (JSON optional)."""
    if len(payload) < VersionHead.SIZE:
        raise ShortBufferError("vfio_user_version", None, VersionHead.SIZE, len(payload))
    head = VersionHead.decode(payload[: VersionHead.SIZE])
    text = payload[VersionHead.SIZE :]
    if not text:
        return head, {}
    if text[-1:] != b"\0":
        raise FieldValueError("vfio_user_version", "data", text[-8:], "a NUL-terminated JSON text")
    try:
        doc = json.loads(text[:-1].decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise FieldValueError("vfio_user_version", "data", text[:32], f"JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise FieldValueError("vfio_user_version", "data", type(doc).__name__, "a JSON object")
    caps = doc.get("capabilities", {})
    if not isinstance(caps, dict):
        raise FieldValueError("vfio_user_version", "capabilities", type(caps).__name__, "a JSON object")
    return head, caps


def encode_version(head: VersionHead, capabilities: dict, *, limit: int) -> bytes:
    """A VERSION payload of at most ``limit`` bytes: the capabilities that fit, dropped from the
    end until the text does (QEMU's client takes no reply longer than its own request)."""
    items = list(capabilities.items())
    while True:
        body = head.encode()
        if items:
            body += json.dumps({"capabilities": dict(items)}, separators=(",", ":")).encode() + b"\0"
        if len(body) <= limit or not items:
            return body[:limit] if len(body) > limit else body
        items.pop()
