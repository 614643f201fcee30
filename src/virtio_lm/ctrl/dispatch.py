"""The generic v1 control-queue dispatcher (sans-I/O).

One buffer in -- the device-readable bytes and the size of the
device-writable area -- and the bytes to write back out: the valid result
followed by the ack.  Nothing here touches a queue, memory or a thread; the
PF device feeds it chains and writes what it returns.

Order of checks, each failing with ``VIRTIO_CTRL_ERR`` and no side effect::

    writable area empty            -> nothing can be written: used_len 0
    readable part < 2 bytes        -> ERR (no class / command)
    class 0..127                   -> the device-specific handler for it, or ERR
    class 128..255 other than 128  -> ERR (unknown common class)
    class 128 before VIRTIO_F_GENERIC_CTRL_VQ_VER_1 and
              VIRTIO_F_VF_MIGRATION are negotiated        -> ERR
    unknown command                -> ERR
    data short / trailing / bad field (wire decode)       -> ERR
    result space < fixed result size                      -> ERR
    handler refuses (CommandRefusedError: bad func_id,
              wrong mode, wrong state, ...)               -> ERR
    otherwise                      -> OK with the result

Every consumed buffer is acked: the caller returns it on the used ring with
``used_len = len(written)``.  The last refusal reason is kept (and counted)
for diagnostics; it never reaches the wire, whose only error signal is the
ack.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Callable, Protocol

from virtio_lm.errors import CommandRefusedError, WireError
from virtio_lm.wire.ctrl import (
    CLASS_VF_MIGRATION,
    COMMANDS,
    DEVICE_SPECIFIC_CLASS_LAST,
    HEADER_SIZE,
    Ack,
    CtrlHeader,
    DirtyReportSizeResult,
    IdentifyResult,
    MigrationCommand,
    StartDirtyTrack,
    StateAttrsResult,
    decode_map_table,
    encode_response,
)
from virtio_lm.wire.features import ProposalFeature, bit

REQUIRED_FOR_MIGRATION = bit(ProposalFeature.GENERIC_CTRL_VQ_VER_1) | bit(ProposalFeature.VF_MIGRATION)


class MigrationHandler(Protocol):
    """What the dispatcher calls for class 128 (see :class:`pf.controller.VfMigrationController`).

    Each method raises :class:`CommandRefusedError` to make the command ERR.
    ``space`` is the room for variable-length results.
    """

    def identify(self) -> IdentifyResult: ...
    def start_dirty_page_track(self, func_id: int, mode: int, segments: list[tuple[int, int]]) -> None: ...
    def stop_dirty_page_track(self, func_id: int) -> None: ...
    def get_dirty_report_size(self, func_id: int) -> int: ...
    def report_dirty_pages(self, func_id: int, offset: int, space: int) -> bytes: ...
    def set_state(self, func_id: int, state: int) -> None: ...
    def get_state_attrs(self, func_id: int) -> tuple[int, int]: ...
    def save_state(self, func_id: int, offset: int, space: int) -> bytes: ...
    def restore_state(self, func_id: int, offset: int, data: bytes) -> None: ...


#: a device-specific class handler: (command, data, result space) -> result bytes;
#: raises CommandRefusedError (or WireError) for ERR.
ClassHandler = Callable[[int, bytes, int], bytes]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What to write into the writable area (``written``) and why."""

    written: bytes
    ack: Ack | None  # None: no room even for the ack
    reason: str | None = None  # why ERR


class ControlDispatcher:
    """Decodes generic v1 buffers and routes them; see the module docstring."""

    def __init__(
        self,
        *,
        negotiated: Callable[[], int],
        migration: MigrationHandler | None,
        device_classes: dict[int, ClassHandler] | None = None,
    ) -> None:
        self._negotiated = negotiated
        self._migration = migration
        self._device_classes = dict(device_classes or {})
        self.last_error: str | None = None
        self.counts: collections.Counter[str] = collections.Counter()

    def register_class(self, cls: int, handler: ClassHandler) -> None:
        if not 0 <= cls <= DEVICE_SPECIFIC_CLASS_LAST:
            raise ValueError(f"device-specific classes are 0..{DEVICE_SPECIFIC_CLASS_LAST}, not {cls}")
        self._device_classes[cls] = handler

    # ------------------------------------------------------------------ entry point
    def handle(self, readable: bytes, writable_len: int) -> Outcome:
        """Process one buffer: ``readable`` bytes in, ``writable_len`` bytes of room."""
        if writable_len < 1:
            self._refuse("no room for the ack byte")
            return Outcome(b"", None, self.last_error)
        space = writable_len - 1
        try:
            result = self._route(readable, space)
        except (CommandRefusedError, WireError) as exc:
            reason = self._refuse(str(exc))
            return Outcome(encode_response(b"", Ack.ERR), Ack.ERR, reason)
        if len(result) > space:  # a handler bug, never written past the buffer
            reason = self._refuse(f"result of {len(result)} bytes exceeds space {space}")
            return Outcome(encode_response(b"", Ack.ERR), Ack.ERR, reason)
        self.counts["ok"] += 1
        return Outcome(encode_response(result, Ack.OK), Ack.OK)

    def _refuse(self, reason: str) -> str:
        self.last_error = reason
        self.counts["err"] += 1
        return reason

    def _route(self, readable: bytes, space: int) -> bytes:
        hdr = CtrlHeader.unpack_from(readable, 0)
        data = bytes(readable[HEADER_SIZE:])
        if hdr.cls <= DEVICE_SPECIFIC_CLASS_LAST:
            handler = self._device_classes.get(hdr.cls)
            if handler is None:
                raise CommandRefusedError(f"class {hdr.cls}", None, None, "no such device-specific class")
            return handler(hdr.command, data, space)
        if hdr.cls != CLASS_VF_MIGRATION or self._migration is None:
            raise CommandRefusedError(f"class {hdr.cls}", None, None, "unknown common class")
        if self._negotiated() & REQUIRED_FOR_MIGRATION != REQUIRED_FOR_MIGRATION:
            raise CommandRefusedError(
                f"class {hdr.cls}", None, None,
                "VIRTIO_F_GENERIC_CTRL_VQ_VER_1 and VIRTIO_F_VF_MIGRATION not negotiated",
            )
        try:
            cmd = MigrationCommand(hdr.command)
        except ValueError:
            raise CommandRefusedError(f"class 128 command {hdr.command}", None, None, "unknown command") from None
        spec = COMMANDS[cmd]
        fixed, tail = spec.decode_data(data)
        if space < spec.result_size:
            raise CommandRefusedError(
                cmd.name, getattr(fixed, "func_id", None), None,
                f"result space {space} < {spec.result_size} bytes",
            )
        return self._execute(cmd, fixed, tail, space)

    def _execute(self, cmd: MigrationCommand, fixed: object, tail: bytes, space: int) -> bytes:
        m = self._migration
        assert m is not None
        f = fixed  # decoded fixed part; its type is given by COMMANDS[cmd]
        if cmd is MigrationCommand.IDENTIFY:
            return m.identify().encode()
        if cmd is MigrationCommand.START_DIRTY_PAGE_TRACK:
            assert isinstance(f, StartDirtyTrack)
            segments = decode_map_table(tail) if f.mode.is_push else []
            if not f.mode.is_push and tail:
                raise CommandRefusedError(cmd.name, f.func_id, None, "pull mode takes no map table")
            m.start_dirty_page_track(f.func_id, f.mode, segments)
            return b""
        if cmd is MigrationCommand.STOP_DIRTY_PAGE_TRACK:
            m.stop_dirty_page_track(f.func_id)  # type: ignore[attr-defined]
            return b""
        if cmd is MigrationCommand.GET_DIRTY_REPORT_SIZE:
            return DirtyReportSizeResult(m.get_dirty_report_size(f.func_id)).encode()  # type: ignore[attr-defined]
        if cmd is MigrationCommand.REPORT_DIRTY_PAGES:
            return m.report_dirty_pages(f.func_id, f.offset, space)  # type: ignore[attr-defined]
        if cmd is MigrationCommand.SET_STATE:
            m.set_state(f.func_id, f.state)  # type: ignore[attr-defined]
            return b""
        if cmd is MigrationCommand.GET_STATE_ATTRS:
            length, state = m.get_state_attrs(f.func_id)  # type: ignore[attr-defined]
            return StateAttrsResult(length, state).encode()
        if cmd is MigrationCommand.SAVE_STATE:
            return m.save_state(f.func_id, f.offset, space)  # type: ignore[attr-defined]
        if cmd is MigrationCommand.RESTORE_STATE:
            m.restore_state(f.func_id, f.offset, tail)  # type: ignore[attr-defined]
            return b""
        raise AssertionError(cmd)  # every MigrationCommand is handled above
