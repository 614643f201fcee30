"""Group administration commands of virtio 1.4 (admin.tex), as byte layouts.

An admin command is one buffer on an administration virtqueue: a
device-readable part ``virtio_admin_cmd`` head (24 bytes: le16 opcode, le16
group_type, 12 reserved bytes, le64 group_member_id) followed by the
command-specific data, and a device-writable part that starts with the
8-byte status block (le16 status, le16 status_qualifier, 4 reserved bytes)
followed by the command-specific result.

The spec's length rule (admin.tex, "Administration Virtqueues"): a part
shorter than the structure reads as if the missing bytes were zero, bytes
past the structure are ignored.  :func:`pad_read` gives the device exactly
that view of a readable part; :func:`truncate_written` cuts a result to the
room the driver gave.  Reserved bytes that *are* present must be zero
(``reserved()`` fields, checked by the codec): virtio-lm refuses a
command whose reserved bytes are set rather than guess what a later
revision meant by them (docs/profile-1.4.md).

Everything here is little-endian, like every virtio 1.x structure.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from virtio_lm.errors import FieldValueError, ShortBufferError
from virtio_lm.wire.codec import enum_field, flags_field, layout, read_u64, reserved, u64

# ------------------------------------------------------------------ numbers


class AdminOpcode(enum.IntEnum):
    """Admin command opcodes (admin.tex; Linux include/uapi/linux/virtio_pci.h)."""

    LIST_QUERY = 0x0
    LIST_USE = 0x1
    LEGACY_COMMON_CFG_WRITE = 0x2
    LEGACY_COMMON_CFG_READ = 0x3
    LEGACY_DEV_CFG_WRITE = 0x4
    LEGACY_DEV_CFG_READ = 0x5
    LEGACY_NOTIFY_INFO = 0x6
    CAP_ID_LIST_QUERY = 0x7
    DEVICE_CAP_GET = 0x8
    DRIVER_CAP_SET = 0x9
    RESOURCE_OBJ_CREATE = 0xA
    RESOURCE_OBJ_MODIFY = 0xB
    RESOURCE_OBJ_QUERY = 0xC
    RESOURCE_OBJ_DESTROY = 0xD
    DEV_PARTS_METADATA_GET = 0xE
    DEV_PARTS_GET = 0xF
    DEV_PARTS_SET = 0x10
    DEV_MODE_SET = 0x11


#: opcodes 0x8000.. are reserved for commands with another structure
OPCODE_STRUCT_LAST = 0x7FFF


class GroupType(enum.IntEnum):
    SELF = 0x0
    SRIOV = 0x1


class AdminStatus(enum.IntEnum):
    """``status``: Linux errno numbers (admin.tex's table, plus EEXIST that the
    resource-object rules name without listing)."""

    OK = 0
    ENXIO = 6
    EAGAIN = 11
    ENOMEM = 12
    EBUSY = 16
    EEXIST = 17
    EINVAL = 22
    ENOSPC = 28


class AdminQualifier(enum.IntEnum):
    """``status_qualifier``."""

    OK = 0x00
    INVALID_COMMAND = 0x01
    INVALID_OPCODE = 0x02
    INVALID_FIELD = 0x03
    INVALID_GROUP = 0x04
    INVALID_MEMBER = 0x05
    NORESOURCE = 0x06
    TRYAGAIN = 0x07


class CapId(enum.IntEnum):
    """Capability ids (admin-cmds-capabilities.tex)."""

    DEV_PARTS = 0x0000


class ResourceObjType(enum.IntEnum):
    """Resource object types (admin-cmds-resource-objects.tex)."""

    DEV_PARTS = 0x000


class DevPartsObjType(enum.IntEnum):
    """``virtio_resource_obj_dev_parts.type``: what the object is for."""

    GET = 0
    SET = 1


class MetadataType(enum.IntEnum):
    SIZE = 0
    COUNT = 1
    LIST = 2


class PartsGetType(enum.IntEnum):
    SELECTED = 0
    ALL = 1


class DevModeFlags(enum.IntFlag):
    """``virtio_admin_cmd_dev_mode_set_data.flags``; the spec numbers the bit (0)."""

    STOPPED = 1 << 0


# ------------------------------------------------------------------ command head and status


@layout("<HH12sQ")
@dataclass(frozen=True, slots=True)
class AdminCmdHdr:
    """The device-readable head of ``struct virtio_admin_cmd`` (24 bytes).

    ``opcode`` and ``group_type`` are plain integers here: an unknown value
    is a command error with its own qualifier, not a decoding error."""

    opcode: int
    group_type: int
    reserved1: int = reserved()
    group_member_id: int = 0


@layout("<HH4s")
@dataclass(frozen=True, slots=True)
class AdminCmdStatus:
    """The device-writable head of ``struct virtio_admin_cmd`` (8 bytes)."""

    status: AdminStatus = enum_field(AdminStatus, AdminStatus.OK)
    status_qualifier: AdminQualifier = enum_field(AdminQualifier, AdminQualifier.OK)
    reserved2: int = reserved()

    def __post_init__(self) -> None:
        if (self.status == AdminStatus.OK) != (self.status_qualifier == AdminQualifier.OK):
            raise FieldValueError(
                "virtio_admin_cmd", "status_qualifier", self.status_qualifier,
                "OK exactly when status is OK",
            )


CMD_HDR_SIZE = AdminCmdHdr.SIZE  # 24
STATUS_SIZE = AdminCmdStatus.SIZE  # 8


# ------------------------------------------------------------------ capabilities


@layout("<H6s")
@dataclass(frozen=True, slots=True)
class CapGetData:
    """``struct virtio_admin_cmd_cap_get_data`` (also the head of cap_set_data)."""

    id: int
    reserved: int = reserved()


@layout("<BB")
@dataclass(frozen=True, slots=True)
class DevPartsCap:
    """``struct virtio_dev_parts_cap``: resource object limits for GET and SET objects."""

    get_parts_resource_objects_limit: int
    set_parts_resource_objects_limit: int


# ------------------------------------------------------------------ resource objects


@layout("<H2sI")
@dataclass(frozen=True, slots=True)
class ResourceObjCmdHdr:
    """``struct virtio_admin_cmd_resource_obj_cmd_hdr`` (8 bytes); also DESTROY's data."""

    type: int
    reserved: int = reserved()
    id: int = 0


@layout("<H2sIQ")
@dataclass(frozen=True, slots=True)
class ResourceObjCreateHead:
    """``struct virtio_admin_cmd_resource_obj_create_data`` without its specific data
    (also the head of MODIFY and QUERY data): the object header and ``le64 flags``."""

    type: int
    reserved: int = reserved()
    id: int = 0
    flags: int = 0


@layout("<B7s")
@dataclass(frozen=True, slots=True)
class ResourceObjDevParts:
    """``struct virtio_resource_obj_dev_parts``; ``type`` is a plain int (an unknown
    type is an INVALID_FIELD refusal)."""

    type: int
    reserved: int = reserved()


# ------------------------------------------------------------------ device parts commands


@layout("<H2sIB7s")
@dataclass(frozen=True, slots=True)
class PartsCmdHead:
    """The object header plus ``u8 type; u8 reserved[7]``: the whole of
    ``virtio_admin_cmd_dev_parts_metadata_data`` and the head of
    ``virtio_admin_cmd_dev_parts_get_data`` (whose ``hdr_list`` follows)."""

    obj_type: int
    reserved0: int = reserved()
    obj_id: int = 0
    type: int = 0
    reserved1: int = reserved()


@layout("<II")
@dataclass(frozen=True, slots=True)
class MetadataResultHead:
    """The 8 bytes every ``virtio_admin_cmd_dev_parts_metadata_result`` starts with:
    ``size`` (SIZE) or ``count`` (COUNT, LIST), then a reserved le32."""

    value: int
    reserved: int = reserved()


@layout("<B")
@dataclass(frozen=True, slots=True)
class DevModeSetData:
    """``struct virtio_admin_cmd_dev_mode_set_data``; unknown flag bits are refused."""

    flags: DevModeFlags = flags_field(DevModeFlags)


# ------------------------------------------------------------------ command lists and bitmaps


def encode_bitmap(numbers: set[int] | frozenset[int]) -> bytes:
    """A ``le64[]`` bitmap with bit ``n`` set for each number (LIST_* and
    CAP_ID_LIST_QUERY): DIV_ROUND_UP(max + 1, 64) words, at least one."""
    if any(n < 0 for n in numbers):
        raise FieldValueError("bitmap", None, min(numbers), "not negative")
    words = (max(numbers, default=0) // 64) + 1
    out = bytearray()
    for w in range(words):
        word = 0
        for n in numbers:
            if n // 64 == w:
                word |= 1 << (n % 64)
        out += u64(word)
    return bytes(out)


def decode_bitmap(buf: bytes | bytearray | memoryview) -> frozenset[int]:
    """The numbers set in a ``le64[]`` bitmap; its length must be a multiple of 8."""
    if len(buf) % 8:
        raise ShortBufferError("bitmap", None, (len(buf) // 8 + 1) * 8, len(buf))
    out: set[int] = set()
    for w in range(len(buf) // 8):
        word = read_u64(buf, 8 * w)
        for b in range(64):
            if word >> b & 1:
                out.add(64 * w + b)
    return frozenset(out)


# ------------------------------------------------------------------ the spec's length rule


def pad_read(data: bytes | bytearray | memoryview, size: int) -> bytes:
    """The first ``size`` bytes of ``data`` as the device must see them: missing
    bytes read as zero, bytes past ``size`` are not looked at."""
    head = bytes(data[:size])
    return head + bytes(size - len(head))


def truncate_written(result: bytes, room: int) -> bytes:
    """What the device writes of ``result`` into a writable part of ``room`` bytes."""
    return result[: max(0, room)]


def encode_status(status: AdminStatus, qualifier: AdminQualifier) -> bytes:
    return AdminCmdStatus(status, qualifier).encode()


def encode_command(opcode: int, group_type: int, member: int, data: bytes = b"") -> bytes:
    """The device-readable part of one admin command."""
    return AdminCmdHdr(opcode, group_type, 0, member).encode() + bytes(data)
