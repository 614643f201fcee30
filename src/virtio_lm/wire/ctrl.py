"""Generic version_1 control buffers and the VF migration commands (class 128).

A generic v1 control buffer is one descriptor chain on a control queue::

    device-readable part            device-writable part
    +-------+---------+--------+    +-----------------------+-----+
    | class | command | data[] |    | result[] (valid part) | ack |
    |  u8   |   u8    |        |    |                       | u8  |
    +-------+---------+--------+    +-----------------------+-----+

Lengths are implicit in the descriptors' WRITE flags: ``len(data)`` is the
readable length minus 2; the writable area holds the result space plus one
byte for the ack.  The device writes the ack immediately after the valid
result bytes and returns ``used_len = valid result bytes + 1``; a driver reads
``used_len - 1`` result bytes, then the ack.  Multi-byte fields are
little-endian (``__virtio16`` = le16, ``__virtio32`` = le32).

Class values 0..127 are device specific, 128..255 device independent; class
128 is VF migration with the nine commands of :class:`MigrationCommand`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Sequence

from virtio_lm.errors import FieldValueError, ShortBufferError, TrailingDataError
from virtio_lm.wire.codec import enum_field, flags_field, layout, reserved
from virtio_lm.wire.ring import DESC_SIZE, DescFlags, VirtqDesc

# ------------------------------------------------------------------ classes, acks
DEVICE_SPECIFIC_CLASS_FIRST = 0
DEVICE_SPECIFIC_CLASS_LAST = 127
COMMON_CLASS_FIRST = 128
COMMON_CLASS_LAST = 255

CLASS_VF_MIGRATION = 128

HEADER_SIZE = 2  # class, command
ACK_SIZE = 1


class Ack(enum.IntEnum):
    OK = 0
    ERR = 1


class MigrationCommand(enum.IntEnum):
    IDENTIFY = 0
    START_DIRTY_PAGE_TRACK = 1
    STOP_DIRTY_PAGE_TRACK = 2
    GET_DIRTY_REPORT_SIZE = 3
    REPORT_DIRTY_PAGES = 4
    SET_STATE = 5
    GET_STATE_ATTRS = 6
    SAVE_STATE = 7
    RESTORE_STATE = 8


class TrackModeCaps(enum.IntFlag):
    """``enum virtio_dirty_page_track_mode_caps`` (IDENTIFY's bitmap)."""

    PUSH_BITMAP = 1 << 0
    PUSH_BYTEMAP = 1 << 1
    PULL_BITMAP = 1 << 2
    PULL_BYTEMAP = 1 << 3


class TrackMode(enum.IntEnum):
    """``enum virtio_dirty_track_mode`` (START_DIRTY_PAGE_TRACK's mode)."""

    PUSH_BITMAP = 1
    PUSH_BYTEMAP = 2
    PULL_BITMAP = 3
    PULL_BYTEMAP = 4

    @property
    def is_push(self) -> bool:
        return self in (TrackMode.PUSH_BITMAP, TrackMode.PUSH_BYTEMAP)

    @property
    def is_bitmap(self) -> bool:
        return self in (TrackMode.PUSH_BITMAP, TrackMode.PULL_BITMAP)

    @property
    def cap(self) -> TrackModeCaps:
        return TrackModeCaps(1 << (self.value - 1))

    @property
    def cli_name(self) -> str:
        return self.name.lower().replace("_", "-")

    @classmethod
    def from_cli(cls, name: str) -> "TrackMode":
        return cls[name.upper().replace("-", "_")]

    def map_bytes(self, num_pages: int) -> int:
        """Bytes of a map covering ``num_pages`` pages in this mode."""
        return (num_pages + 7) // 8 if self.is_bitmap else num_pages


class VfState(enum.IntEnum):
    """``enum virtio_internal_state``."""

    INIT = 0
    RUNNING = 1
    QUIESCED = 2
    FREEZED = 3


# ------------------------------------------------------------------ header
@layout("<BB")
@dataclass(frozen=True, slots=True)
class CtrlHeader:
    """``u8 class; u8 command`` opening every generic v1 buffer."""

    cls: int
    command: int


def encode_request(cls: int, command: int, data: bytes = b"") -> bytes:
    """The device-readable part of a generic v1 buffer."""
    return CtrlHeader(cls, command).encode() + bytes(data)


def decode_request(readable: bytes | bytearray | memoryview) -> tuple[int, int, bytes]:
    """Split a readable part into ``(class, command, data)``."""
    hdr = CtrlHeader.unpack_from(readable, 0)
    return hdr.cls, hdr.command, bytes(readable[HEADER_SIZE:])


def encode_response(result: bytes, ack: Ack) -> bytes:
    """What the device writes: valid result bytes, then the ack byte."""
    return bytes(result) + bytes([int(ack)])


def decode_response(written: bytes | bytearray | memoryview) -> tuple[bytes, Ack]:
    """Split what the device wrote (``used_len`` bytes) into ``(result, ack)``."""
    if len(written) < ACK_SIZE:
        raise ShortBufferError("virtio_generic_v1_ctrl", "ack", ACK_SIZE, len(written))
    raw = written[len(written) - 1]
    try:
        ack = Ack(raw)
    except ValueError:
        raise FieldValueError("virtio_generic_v1_ctrl", "ack", raw, "VIRTIO_CTRL_OK (0) or VIRTIO_CTRL_ERR (1)") from None
    return bytes(written[: len(written) - 1]), ack


# ------------------------------------------------------------------ command data / results
@layout("<HHHHHHI")
@dataclass(frozen=True, slots=True)
class IdentifyResult:
    """``struct virtio_ctrl_vf_mig_get_identify_result`` (16 bytes)."""

    mjr_ver: int
    mnr_ver: int
    ter_ver: int
    dirty_page_track_modes: TrackModeCaps = flags_field(TrackModeCaps)
    log_max_pages_track_pull_bitmap_mode: int = 0
    log_max_pages_track_pull_bytemap_mode: int = 0
    reserved: int = reserved()


@layout("<HHB")
@dataclass(frozen=True, slots=True)
class StartDirtyTrack:
    """``struct virtio_ctrl_vf_mig_start_dirty_page_track`` without ``data[]`` (5 bytes)."""

    func_id: int
    mode: TrackMode = enum_field(TrackMode)
    reserved: int = reserved()


@layout("<H")
@dataclass(frozen=True, slots=True)
class FuncId:
    """``{ __virtio16 func_id; }``: STOP_DIRTY_PAGE_TRACK, GET_DIRTY_REPORT_SIZE, GET_STATE_ATTRS."""

    func_id: int


@layout("<I")
@dataclass(frozen=True, slots=True)
class DirtyReportSizeResult:
    """``struct virtio_ctrl_vf_mig_get_dirty_report_size_result``."""

    len: int


@layout("<HHI")
@dataclass(frozen=True, slots=True)
class FuncOffset:
    """``{ func_id; reserved; offset; }``: REPORT_DIRTY_PAGES, SAVE_STATE, RESTORE_STATE."""

    func_id: int
    reserved: int = reserved()
    offset: int = 0


@layout("<HH")
@dataclass(frozen=True, slots=True)
class SetState:
    """``struct virtio_ctrl_vf_mig_set_state``."""

    func_id: int
    state: VfState = enum_field(VfState)


@layout("<IH")
@dataclass(frozen=True, slots=True)
class StateAttrsResult:
    """``struct virtio_ctrl_vf_mig_get_state_attr_result`` (6 bytes)."""

    len: int
    state: VfState = enum_field(VfState)


# ------------------------------------------------------------------ push-mode map table
MAP_ENTRY_FLAGS_ALLOWED = DescFlags.WRITE


def encode_map_table(entries: Sequence[tuple[int, int]]) -> bytes:
    """Push mode's ``data[]``: ``(addr, len)`` segments as 16-byte ``virtq_desc`` entries."""
    return b"".join(VirtqDesc(addr, length, DescFlags.WRITE, 0).encode() for addr, length in entries)


def decode_map_table(data: bytes | bytearray | memoryview) -> list[tuple[int, int]]:
    """Parse push mode's map table; each entry must be device-writable, ``next`` 0, ``len`` > 0."""
    if len(data) == 0:
        raise ShortBufferError("virtio_ctrl_vf_mig_start_dirty_page_track", "data", DESC_SIZE, 0)
    if len(data) % DESC_SIZE:
        raise FieldValueError(
            "virtio_ctrl_vf_mig_start_dirty_page_track", "data", len(data), f"a multiple of {DESC_SIZE} bytes"
        )
    out: list[tuple[int, int]] = []
    for i in range(0, len(data), DESC_SIZE):
        d = VirtqDesc.unpack_from(data, i)
        where = f"data[{i // DESC_SIZE}]"
        if int(d.flags) & ~int(MAP_ENTRY_FLAGS_ALLOWED):
            raise FieldValueError("virtq_desc", f"{where}.flags", int(d.flags), "only VIRTQ_DESC_F_WRITE may be set")
        if d.next != 0:
            raise FieldValueError("virtq_desc", f"{where}.next", d.next, "must be 0 in a map table")
        if d.len == 0:
            raise FieldValueError("virtq_desc", f"{where}.len", d.len, "must be > 0")
        if d.addr + d.len > 1 << 64:
            raise FieldValueError("virtq_desc", f"{where}.addr", d.addr, "addr + len must not overflow u64")
        out.append((d.addr, d.len))
    return out


# ------------------------------------------------------------------ per-command specs
@dataclass(frozen=True)
class CommandSpec:
    """How one command's data and result look on the wire.

    ``data`` is the fixed-size layout of the command data (None: no data);
    ``data_tail`` whether variable bytes may follow it.  ``result`` is the
    fixed-size result layout (None: no fixed result); ``result_variable``
    whether the result is a variable number of bytes (filled to the space).
    """

    command: MigrationCommand
    data: type | None
    data_tail: bool
    result: type | None
    result_variable: bool

    @property
    def data_size(self) -> int:
        return self.data.SIZE if self.data is not None else 0  # type: ignore[attr-defined]

    @property
    def result_size(self) -> int:
        return self.result.SIZE if self.result is not None else 0  # type: ignore[attr-defined]

    def decode_data(self, data: bytes | bytearray | memoryview) -> tuple[object | None, bytes]:
        """``(fixed part or None, tail bytes)``; short data, or trailing bytes where no tail is allowed, raise."""
        name = f"VIRTIO_CTRL_VF_MIGRATION_{self.command.name}"
        if len(data) < self.data_size:
            raise ShortBufferError(name, "data", self.data_size, len(data))
        if not self.data_tail and len(data) > self.data_size:
            raise TrailingDataError(name, self.data_size, len(data))
        fixed = self.data.unpack_from(data, 0) if self.data is not None else None  # type: ignore[attr-defined]
        return fixed, bytes(data[self.data_size :])


COMMANDS: dict[MigrationCommand, CommandSpec] = {
    spec.command: spec
    for spec in (
        CommandSpec(MigrationCommand.IDENTIFY, None, False, IdentifyResult, False),
        CommandSpec(MigrationCommand.START_DIRTY_PAGE_TRACK, StartDirtyTrack, True, None, False),
        CommandSpec(MigrationCommand.STOP_DIRTY_PAGE_TRACK, FuncId, False, None, False),
        CommandSpec(MigrationCommand.GET_DIRTY_REPORT_SIZE, FuncId, False, DirtyReportSizeResult, False),
        CommandSpec(MigrationCommand.REPORT_DIRTY_PAGES, FuncOffset, False, None, True),
        CommandSpec(MigrationCommand.SET_STATE, SetState, False, None, False),
        CommandSpec(MigrationCommand.GET_STATE_ATTRS, FuncId, False, StateAttrsResult, False),
        CommandSpec(MigrationCommand.SAVE_STATE, FuncOffset, False, None, True),
        CommandSpec(MigrationCommand.RESTORE_STATE, FuncOffset, True, None, False),
    )
}
