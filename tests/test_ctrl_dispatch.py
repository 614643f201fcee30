"""The generic v1 dispatcher, sans-I/O: bytes in, result + ack out, ERR with no side effect."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio_lm.errors import CommandRefusedError
from virtio_lm.ctrl.dispatch import REQUIRED_FOR_MIGRATION, ControlDispatcher
from virtio_lm.wire.ctrl import (
    CLASS_VF_MIGRATION,
    Ack,
    FuncId,
    FuncOffset,
    IdentifyResult,
    MigrationCommand,
    SetState,
    StartDirtyTrack,
    StateAttrsResult,
    TrackMode,
    TrackModeCaps,
    VfState,
    decode_response,
    encode_map_table,
    encode_request,
)

MC = MigrationCommand


class Recorder:
    """A MigrationHandler that records calls and can be told to refuse."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.refuse = False
        self.blob = bytes(range(256)) * 4

    def _call(self, *args):
        if self.refuse:
            raise CommandRefusedError(str(args[0]), None, None, "told to")
        self.calls.append(args)

    def identify(self):
        self._call("identify")
        return IdentifyResult(1, 0, 0, TrackModeCaps(15), 20, 20)

    def start_dirty_page_track(self, func_id, mode, segments):
        self._call("start", func_id, mode, segments)

    def stop_dirty_page_track(self, func_id):
        self._call("stop", func_id)

    def get_dirty_report_size(self, func_id):
        self._call("size", func_id)
        return 77

    def report_dirty_pages(self, func_id, offset, space):
        self._call("report", func_id, offset, space)
        return self.blob[offset : offset + space]

    def set_state(self, func_id, state):
        self._call("set_state", func_id, state)

    def get_state_attrs(self, func_id):
        self._call("attrs", func_id)
        return 1234, VfState.FREEZED

    def save_state(self, func_id, offset, space):
        self._call("save", func_id, offset, space)
        return self.blob[offset : offset + space]

    def restore_state(self, func_id, offset, data):
        self._call("restore", func_id, offset, data)


@pytest.fixture
def rec():
    return Recorder()


def make(rec, features=REQUIRED_FOR_MIGRATION):
    return ControlDispatcher(negotiated=lambda: features, migration=rec)


def mig(cmd, data=b""):
    return encode_request(CLASS_VF_MIGRATION, cmd, data)


def test_identify_ok(rec):
    out = make(rec).handle(mig(MC.IDENTIFY), 17)
    result, ack = decode_response(out.written)
    assert ack is Ack.OK and IdentifyResult.decode(result).dirty_page_track_modes == 15
    assert len(out.written) == 17  # 16 result bytes + ack


def test_ack_follows_valid_result_bytes_not_the_space(rec):
    out = make(rec).handle(mig(MC.IDENTIFY), 100)
    assert len(out.written) == 17 and out.written[-1] == Ack.OK


def test_variable_result_fills_the_space(rec):
    out = make(rec).handle(mig(MC.SAVE_STATE, FuncOffset(1, 0, 10).encode()), 9)
    result, ack = decode_response(out.written)
    assert ack is Ack.OK and result == rec.blob[10:18]
    assert rec.calls[-1] == ("save", 1, 10, 8)


def test_variable_result_with_zero_space_is_ok_and_empty(rec):
    out = make(rec).handle(mig(MC.REPORT_DIRTY_PAGES, FuncOffset(1, 0, 0).encode()), 1)
    assert out.written == b"\x00"


@pytest.mark.parametrize(
    "cmd,data,call",
    [
        (MC.START_DIRTY_PAGE_TRACK, StartDirtyTrack(2, TrackMode.PULL_BITMAP).encode(), ("start", 2, TrackMode.PULL_BITMAP, [])),
        (
            MC.START_DIRTY_PAGE_TRACK,
            StartDirtyTrack(2, TrackMode.PUSH_BYTEMAP).encode() + encode_map_table([(4096, 64), (0, 16)]),
            ("start", 2, TrackMode.PUSH_BYTEMAP, [(4096, 64), (0, 16)]),
        ),
        (MC.STOP_DIRTY_PAGE_TRACK, FuncId(3).encode(), ("stop", 3)),
        (MC.SET_STATE, SetState(1, VfState.QUIESCED).encode(), ("set_state", 1, VfState.QUIESCED)),
        (MC.RESTORE_STATE, FuncOffset(1, 0, 5).encode() + b"abc", ("restore", 1, 5, b"abc")),
    ],
)
def test_no_result_commands_ack_ok(rec, cmd, data, call):
    out = make(rec).handle(mig(cmd, data), 1)
    assert out.written == b"\x00" and rec.calls == [call]


def test_fixed_results(rec):
    d = make(rec)
    r, a = decode_response(d.handle(mig(MC.GET_DIRTY_REPORT_SIZE, FuncId(1).encode()), 5).written)
    assert a is Ack.OK and int.from_bytes(r, "little") == 77
    r, a = decode_response(d.handle(mig(MC.GET_STATE_ATTRS, FuncId(1).encode()), 7).written)
    assert a is Ack.OK and StateAttrsResult.decode(r) == StateAttrsResult(1234, VfState.FREEZED)


# ------------------------------------------------------------------ ERR, nothing called
ERR = b"\x01"


@pytest.mark.parametrize(
    "name,readable,space",
    [
        ("empty readable part", b"", 10),
        ("class without command", b"\x80", 10),
        ("unknown common class", encode_request(200, 0), 10),
        ("device class with no handler", encode_request(5, 0), 10),
        ("unknown command", mig(9), 10),
        ("command 255", mig(255), 10),
        ("short data", mig(MC.SET_STATE, b"\x01\x00\x01"), 10),
        ("trailing data", mig(MC.SET_STATE, SetState(1, VfState.RUNNING).encode() + b"\x00"), 10),
        ("reserved set", mig(MC.SAVE_STATE, bytes([1, 0, 1, 0, 0, 0, 0, 0])), 10),
        ("state out of range", mig(MC.SET_STATE, bytes([1, 0, 7, 0])), 10),
        ("mode out of range", mig(MC.START_DIRTY_PAGE_TRACK, bytes([1, 0, 9, 0, 0])), 10),
        ("push without map", mig(MC.START_DIRTY_PAGE_TRACK, StartDirtyTrack(1, TrackMode.PUSH_BITMAP).encode()), 10),
        (
            "push map partial entry",
            mig(MC.START_DIRTY_PAGE_TRACK, StartDirtyTrack(1, TrackMode.PUSH_BITMAP).encode() + b"\x00" * 15),
            10,
        ),
        (
            "pull with map",
            mig(MC.START_DIRTY_PAGE_TRACK, StartDirtyTrack(1, TrackMode.PULL_BITMAP).encode() + encode_map_table([(0, 8)])),
            10,
        ),
        ("identify result space too small", mig(MC.IDENTIFY), 16),
        ("attrs result space too small", mig(MC.GET_STATE_ATTRS, FuncId(1).encode()), 6),
        ("size result space too small", mig(MC.GET_DIRTY_REPORT_SIZE, FuncId(1).encode()), 4),
        ("identify with data", mig(MC.IDENTIFY, b"\x00"), 17),
    ],
)
def test_malformed_buffer_is_err_with_no_side_effect(rec, name, readable, space):
    d = make(rec)
    out = d.handle(readable, space)
    assert out.written == ERR and out.ack is Ack.ERR and out.reason
    assert rec.calls == []
    assert d.counts["err"] == 1 and d.last_error == out.reason


def test_no_room_for_ack_writes_nothing(rec):
    out = make(rec).handle(mig(MC.IDENTIFY), 0)
    assert out.written == b"" and out.ack is None and rec.calls == []


@pytest.mark.parametrize("features", [0, REQUIRED_FOR_MIGRATION & (REQUIRED_FOR_MIGRATION - 1), REQUIRED_FOR_MIGRATION & -REQUIRED_FOR_MIGRATION])
def test_migration_commands_before_negotiation_are_err(rec, features):
    out = make(rec, features).handle(mig(MC.IDENTIFY), 17)
    assert out.written == ERR and rec.calls == []


def test_handler_refusal_is_err(rec):
    rec.refuse = True
    out = make(rec).handle(mig(MC.SET_STATE, SetState(1, VfState.RUNNING).encode()), 1)
    assert out.written == ERR and "told to" in out.reason


def test_oversized_handler_result_is_err_not_overflow():
    class Greedy(Recorder):
        def save_state(self, func_id, offset, space):
            return b"x" * (space + 5)

    out = make(Greedy()).handle(mig(MC.SAVE_STATE, FuncOffset(1).encode()), 4)
    assert out.written == ERR


def test_device_specific_class_routed():
    seen = []

    def handler(cmd, data, space):
        seen.append((cmd, data, space))
        return b"ok"

    d = ControlDispatcher(negotiated=lambda: 0, migration=None, device_classes={4: handler})
    out = d.handle(encode_request(4, 0, b"\x02\x00"), 3)
    assert out.written == b"ok\x00" and seen == [(0, b"\x02\x00", 2)]
    with pytest.raises(ValueError):
        d.register_class(128, handler)


# ------------------------------------------------------------------ any bytes: never raises, always acks
@settings(max_examples=300)
@given(st.binary(max_size=48), st.integers(0, 64))
def test_arbitrary_buffers_never_raise(readable, space):
    rec = Recorder()
    out = make(rec).handle(readable, space)
    if space == 0:
        assert out.written == b""
    else:
        assert 1 <= len(out.written) <= space and out.written[-1] in (0, 1)
        if out.written[-1] == 1:
            assert len(out.written) == 1 and rec.calls == []


@settings(max_examples=200)
@given(st.sampled_from(list(MC)), st.binary(max_size=40))
def test_every_prefix_of_a_valid_buffer_is_err_or_ok(cmd, tail):
    """Truncations of a buffer never raise and never call a handler with a short struct."""
    full = mig(cmd, tail)
    for n in range(len(full) + 1):
        rec = Recorder()
        out = make(rec).handle(full[:n], 64)
        assert out.ack in (Ack.OK, Ack.ERR)
