"""vhost-user message layouts (QEMU docs/interop/vhost-user.rst, "Message specification").

Every message on the UNIX socket is a 12-byte header followed by ``size``
bytes of payload; file descriptors travel beside it as SCM_RIGHTS ancillary
data::

    +---------+-------+------+---------------------+
    | request | flags | size | payload (size bytes) |
    +---------+-------+------+---------------------+
      le32      le32    le32

``flags``: bits 0-1 the version (always 1), bit 2 REPLY (set on the
back-end's answers), bit 3 NEED_REPLY (the front-end wants an ack with
REPLY_ACK negotiated).  Every other flag bit is refused.

Payloads used here (all little-endian, packed):

    u64                  features, protocol features, queue num, ack, mem slots
    VringState     8     le32 index, le32 num
    VringAddr     40     le32 index, le32 flags, le64 desc/used/avail user addr,
                         le64 log_guest_addr
    VringFile      8     le64: bits 0-7 the ring index, bit 8 "no fd" (polling)
    MemRegion     32     le64 guest_phys_addr, memory_size, userspace_addr, mmap_offset
    MemTable  8+32*n     le32 nregions, le32 padding, n MemRegion (n <= 8)
    SingleRegion  40     le64 padding, MemRegion (ADD_MEM_REG / REM_MEM_REG)
    LogBase       16     le64 mmap_size, le64 mmap_offset
    ConfigHeader  12     le32 offset, le32 size, le32 flags; then ``size`` bytes
    RarpMac        8     the guest's MAC in the first 6 bytes (SEND_RARP), 2 bytes unused
    Inflight      24     le64 mmap_size, le64 mmap_offset, le16 num_queues, le16 queue_size,
                         4 bytes of padding (QEMU's struct is not packed)

The inflight region (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) is shared memory the back-end
lays out and the front-end keeps across back-end restarts without reading it; per queue,
at a 64-byte aligned stride (:func:`inflight_queue_stride`), the split-ring layout of the
vhost-user document::

    QueueRegionSplit  16     le64 features (0), le16 version (1), le16 desc_num,
                             le16 last_batch_head, le16 used_idx
    DescStateSplit    16     u8 inflight (0/1), 5 bytes padding, le16 next, le64 counter
                             -- desc_num of them, indexed by head

The decoders here only check shape (sizes, reserved bits, counts); what the
values mean (regions overlapping, addresses outside memory) is checked by
:mod:`virtio_lm.vhost`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from virtio_lm.errors import FieldValueError, ShortBufferError, TrailingDataError
import numpy as np

from virtio_lm.wire.codec import layout, read_u64, u64

__all__ = [
    "CONFIG_MAX",
    "HEADER_FLAG_MASK",
    "MAX_PAYLOAD",
    "MEM_TABLE_MAX_REGIONS",
    "VERSION",
    "VHOST_F_LOG_ALL",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "VRING_F_LOG",
    "VRING_FILE_INDEX_MASK",
    "VRING_FILE_NOFD",
    "ConfigHeader",
    "Header",
    "HeaderFlags",
    "LogBase",
    "MemRegion",
    "ProtocolFeature",
    "Request",
    "SingleRegion",
    "VringAddr",
    "VringState",
    "decode_config",
    "decode_mem_table",
    "INFLIGHT_DESC_DTYPE",
    "INFLIGHT_HEADER_DTYPE",
    "INFLIGHT_VERSION",
    "Inflight",
    "decode_rarp_mac",
    "inflight_queue_stride",
    "decode_u64",
    "encode_config",
    "encode_mem_table",
]

VERSION = 0x1
VHOST_F_LOG_ALL = 26
VHOST_USER_F_PROTOCOL_FEATURES = 30
VRING_F_LOG = 0  # VringAddr.flags bit: log_guest_addr is valid, log the used ring
VRING_FILE_INDEX_MASK = 0xFF
VRING_FILE_NOFD = 1 << 8
MEM_TABLE_MAX_REGIONS = 8
CONFIG_MAX = 256  # VHOST_USER_MAX_CONFIG_SIZE
#: the largest payload any message of ours may carry (a full MEM_TABLE is 264, CONFIG 12 + 256)
MAX_PAYLOAD = 4096


class Request(enum.IntEnum):
    """Front-end -> back-end request codes."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolFeature(enum.IntEnum):
    """VHOST_USER_PROTOCOL_F_* bit numbers."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


class HeaderFlags(enum.IntFlag):
    VERSION_1 = 0x1
    VERSION_2 = 0x2  # the second version bit: with VERSION_1 forms the 2-bit version field
    REPLY = 0x4
    NEED_REPLY = 0x8


HEADER_FLAG_MASK = int(HeaderFlags.VERSION_1 | HeaderFlags.VERSION_2 | HeaderFlags.REPLY | HeaderFlags.NEED_REPLY)


@layout("<III")
@dataclass(frozen=True)
class Header:
    """The 12-byte message header.  ``request`` stays an int: an unknown code is
    the protocol layer's error (named in its message), not a decode error."""

    request: int
    flags: int
    size: int

    @property
    def version(self) -> int:
        return self.flags & 0x3

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.NEED_REPLY)


@layout("<II")
@dataclass(frozen=True)
class VringState:
    index: int
    num: int


@layout("<IIQQQQ")
@dataclass(frozen=True)
class VringAddr:
    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int


@layout("<QQQQ")
@dataclass(frozen=True)
class MemRegion:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


@dataclass(frozen=True)
class SingleRegion:
    """ADD_MEM_REG / REM_MEM_REG payload: 8 bytes of padding, then one region."""

    region: MemRegion
    SIZE = 8 + 32

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview) -> "SingleRegion":
        if len(buf) < cls.SIZE:
            raise ShortBufferError("SingleRegion", None, cls.SIZE, len(buf))
        if len(buf) > cls.SIZE:
            raise TrailingDataError("SingleRegion", cls.SIZE, len(buf))
        # QEMU leaves the padding uninitialised in some versions: it is not checked
        return cls(MemRegion.decode(bytes(buf[8:])))  # type: ignore[attr-defined]

    def encode(self) -> bytes:
        return u64(0) + self.region.encode()  # type: ignore[attr-defined]


@layout("<QQ")
@dataclass(frozen=True)
class LogBase:
    mmap_size: int
    mmap_offset: int


@layout("<III")
@dataclass(frozen=True)
class ConfigHeader:
    offset: int
    size: int
    flags: int


def decode_u64(buf: bytes | bytearray | memoryview, what: str = "u64") -> int:
    """An exactly-8-byte payload."""
    if len(buf) < 8:
        raise ShortBufferError(what, None, 8, len(buf))
    if len(buf) > 8:
        raise TrailingDataError(what, 8, len(buf))
    return read_u64(buf)


def decode_mem_table(buf: bytes | bytearray | memoryview) -> list[MemRegion]:
    """SET_MEM_TABLE payload -> regions.  ``nregions`` must be 1..8 and the
    payload must hold exactly that many regions (QEMU sends exactly ``8 + 32 n``)."""
    if len(buf) < 8:
        raise ShortBufferError("MemTable", "nregions", 8, len(buf))
    n = int.from_bytes(bytes(buf[0:4]), "little")
    if not 1 <= n <= MEM_TABLE_MAX_REGIONS:
        raise FieldValueError("MemTable", "nregions", n, f"1..{MEM_TABLE_MAX_REGIONS}")
    need = 8 + n * MemRegion.SIZE  # type: ignore[attr-defined]
    if len(buf) < need:
        raise ShortBufferError("MemTable", "regions", need, len(buf))
    if len(buf) > need and len(buf) != 8 + MEM_TABLE_MAX_REGIONS * MemRegion.SIZE:  # type: ignore[attr-defined]
        raise TrailingDataError("MemTable", need, len(buf))
    return [MemRegion.unpack_from(buf, 8 + i * MemRegion.SIZE) for i in range(n)]  # type: ignore[attr-defined]


def encode_mem_table(regions: list[MemRegion]) -> bytes:
    return (
        len(regions).to_bytes(4, "little")
        + bytes(4)
        + b"".join(r.encode() for r in regions)  # type: ignore[attr-defined]
    )


def decode_config(buf: bytes | bytearray | memoryview) -> tuple[ConfigHeader, bytes]:
    """GET_CONFIG / SET_CONFIG payload: the header and exactly ``size`` bytes (<= 256)."""
    hdr, n = ConfigHeader.decode_from(buf)  # type: ignore[attr-defined]
    if hdr.size > CONFIG_MAX:
        raise FieldValueError("ConfigHeader", "size", hdr.size, f"<= {CONFIG_MAX}")
    body = bytes(buf[n:])
    if len(body) < hdr.size:
        raise ShortBufferError("ConfigHeader", "region", hdr.size, len(body))
    if len(body) > hdr.size:
        raise TrailingDataError("ConfigHeader", n + hdr.size, len(buf))
    return hdr, body


def encode_config(offset: int, data: bytes, flags: int = 0) -> bytes:
    return ConfigHeader(offset, len(data), flags).encode() + bytes(data)  # type: ignore[attr-defined]


def decode_rarp_mac(buf: bytes | bytearray | memoryview) -> bytes:
    """SEND_RARP payload: exactly 8 bytes, the MAC in the first 6 (QEMU zeroes the other two;
    they are not checked).  The MAC must be a unicast address."""
    if len(buf) < 8:
        raise ShortBufferError("RarpMac", None, 8, len(buf))
    if len(buf) > 8:
        raise TrailingDataError("RarpMac", 8, len(buf))
    mac = bytes(buf[0:6])
    if mac[0] & 1:
        raise FieldValueError("RarpMac", "mac", mac.hex(":"), "a unicast address")
    return mac


@layout("<QQHH4x")
@dataclass(frozen=True)
class Inflight:
    """GET_INFLIGHT_FD / SET_INFLIGHT_FD payload."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


INFLIGHT_VERSION = 1
INFLIGHT_ALIGN = 64
#: QueueRegionSplit's header, little-endian, as a numpy record (the region is shared memory
#: the back-end updates in place, one field at a time)
INFLIGHT_HEADER_DTYPE = np.dtype(
    [("features", "<u8"), ("version", "<u2"), ("desc_num", "<u2"), ("last_batch_head", "<u2"), ("used_idx", "<u2")]
)
#: DescStateSplit
INFLIGHT_DESC_DTYPE = np.dtype([("inflight", "u1"), ("padding", "u1", (5,)), ("next", "<u2"), ("counter", "<u8")])
assert INFLIGHT_HEADER_DTYPE.itemsize == 16 and INFLIGHT_DESC_DTYPE.itemsize == 16


def inflight_queue_stride(queue_size: int) -> int:
    """Bytes one queue's part of the inflight region takes (header + descriptors, 64-aligned)."""
    n = INFLIGHT_HEADER_DTYPE.itemsize + INFLIGHT_DESC_DTYPE.itemsize * queue_size
    return (n + INFLIGHT_ALIGN - 1) // INFLIGHT_ALIGN * INFLIGHT_ALIGN
