"""Generic v1 control buffers and the nine VF migration commands, byte for byte."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio_lm.errors import (
    EnumValueError,
    FieldValueError,
    ReservedFieldError,
    ShortBufferError,
    TrailingDataError,
)
from virtio_lm.wire.ctrl import (
    CLASS_VF_MIGRATION,
    COMMANDS,
    Ack,
    CtrlHeader,
    DirtyReportSizeResult,
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
    decode_map_table,
    decode_request,
    decode_response,
    encode_map_table,
    encode_request,
    encode_response,
)

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)


# ---------------------------------------------------------------- exact bytes from the proposal
def test_constants_match_the_proposal():
    assert CLASS_VF_MIGRATION == 128
    assert [c.value for c in MigrationCommand] == list(range(9))
    assert [m.value for m in TrackMode] == [1, 2, 3, 4]
    assert [int(c) for c in TrackModeCaps] == [1, 2, 4, 8]
    assert [s.value for s in VfState] == [0, 1, 2, 3]
    assert (Ack.OK, Ack.ERR) == (0, 1)


def test_sizes_match_the_proposal():
    assert IdentifyResult.SIZE == 16  # 6 x le16 + le32 reserved
    assert StartDirtyTrack.SIZE == 5  # le16 func_id, le16 mode, u8 reserved
    assert FuncId.SIZE == 2
    assert DirtyReportSizeResult.SIZE == 4
    assert FuncOffset.SIZE == 8  # le16 func_id, le16 reserved, le32 offset
    assert SetState.SIZE == 4
    assert StateAttrsResult.SIZE == 6  # le32 len, le16 state


def test_identify_result_is_little_endian_bytes():
    r = IdentifyResult(1, 2, 3, TrackModeCaps.PUSH_BITMAP | TrackModeCaps.PULL_BYTEMAP, 0x1234, 0x20)
    assert r.encode() == bytes.fromhex("0100 0200 0300 0900 3412 2000 00000000")


def test_set_state_bytes():
    assert SetState(3, VfState.FREEZED).encode() == bytes.fromhex("0300 0300")


def test_func_offset_bytes():
    assert FuncOffset(2, 0, 0x01020304).encode() == bytes.fromhex("0200 0000 04030201")


def test_request_and_response_framing():
    req = encode_request(CLASS_VF_MIGRATION, MigrationCommand.SET_STATE, SetState(1, VfState.RUNNING).encode())
    assert req == bytes([128, 5, 1, 0, 1, 0])
    assert decode_request(req) == (128, 5, bytes([1, 0, 1, 0]))
    resp = encode_response(b"\xaa\xbb", Ack.OK)
    assert resp == b"\xaa\xbb\x00"
    assert decode_response(resp) == (b"\xaa\xbb", Ack.OK)
    assert decode_response(b"\x01") == (b"", Ack.ERR)


# ---------------------------------------------------------------- round trips
@settings(max_examples=100)
@given(u16, u16, u16, st.integers(0, 15), u16, u16)
def test_identify_round_trip(a, b, c, modes, lb, ly):
    r = IdentifyResult(a, b, c, TrackModeCaps(modes), lb, ly)
    assert IdentifyResult.decode(r.encode()) == r


@settings(max_examples=100)
@given(u16, st.sampled_from(list(TrackMode)))
def test_start_round_trip(func, mode):
    s = StartDirtyTrack(func, mode)
    assert StartDirtyTrack.decode(s.encode()) == s


@settings(max_examples=100)
@given(u16, u32)
def test_func_offset_round_trip(func, off):
    s = FuncOffset(func, 0, off)
    assert FuncOffset.decode(s.encode()) == s


@settings(max_examples=100)
@given(u16, st.sampled_from(list(VfState)))
def test_set_state_round_trip(func, state):
    s = SetState(func, state)
    assert SetState.decode(s.encode()) == s


@settings(max_examples=100)
@given(u32, st.sampled_from(list(VfState)))
def test_state_attrs_round_trip(length, state):
    s = StateAttrsResult(length, state)
    assert StateAttrsResult.decode(s.encode()) == s


@settings(max_examples=100)
@given(u16, u32)
def test_small_structs_round_trip(func, length):
    assert FuncId.decode(FuncId(func).encode()) == FuncId(func)
    assert DirtyReportSizeResult.decode(DirtyReportSizeResult(length).encode()).len == length


@settings(max_examples=100)
@given(u8, u8, st.binary(max_size=64))
def test_request_round_trip(cls, cmd, data):
    assert decode_request(encode_request(cls, cmd, data)) == (cls, cmd, data)


@settings(max_examples=100)
@given(st.binary(max_size=64), st.sampled_from(list(Ack)))
def test_response_round_trip(result, ack):
    assert decode_response(encode_response(result, ack)) == (result, ack)


@settings(max_examples=100)
@given(st.lists(st.tuples(st.integers(0, 1 << 40), st.integers(1, 1 << 20)), min_size=1, max_size=8))
def test_map_table_round_trip(entries):
    assert decode_map_table(encode_map_table(entries)) == entries


# ---------------------------------------------------------------- malformed input, one test each
def test_short_buffer_names_the_layout():
    with pytest.raises(ShortBufferError) as e:
        SetState.decode(b"\x01\x00\x01")
    assert e.value.layout == "SetState" and e.value.needed == 4 and e.value.got == 3


def test_trailing_bytes_refused():
    with pytest.raises(TrailingDataError) as e:
        FuncId.decode(b"\x01\x00\x00")
    assert e.value.expected == 2 and e.value.got == 3


def test_reserved_nonzero_in_start_refused():
    with pytest.raises(ReservedFieldError) as e:
        StartDirtyTrack.decode(bytes([1, 0, 1, 0, 7]))
    assert e.value.field == "reserved" and e.value.value == 7


def test_reserved_nonzero_in_func_offset_refused():
    with pytest.raises(ReservedFieldError) as e:
        FuncOffset.decode(bytes([1, 0, 0, 1, 0, 0, 0, 0]))
    assert e.value.field == "reserved"


def test_reserved_nonzero_in_identify_refused():
    with pytest.raises(ReservedFieldError) as e:
        IdentifyResult.decode(bytes(12) + b"\x01\x00\x00\x00")
    assert e.value.field == "reserved"


@pytest.mark.parametrize("mode", [0, 5, 0xFFFF])
def test_mode_out_of_range_refused(mode):
    with pytest.raises(EnumValueError) as e:
        StartDirtyTrack.decode(bytes([1, 0]) + mode.to_bytes(2, "little") + b"\x00")
    assert e.value.field == "mode" and e.value.value == mode


@pytest.mark.parametrize("state", [4, 0x100])
def test_state_out_of_range_refused(state):
    with pytest.raises(EnumValueError) as e:
        SetState.decode(b"\x01\x00" + state.to_bytes(2, "little"))
    assert e.value.field == "state"


def test_unknown_capability_bits_refused():
    with pytest.raises(FieldValueError) as e:
        IdentifyResult.decode(bytes(6) + b"\x10\x00" + bytes(8))
    assert e.value.field == "dirty_page_track_modes"


def test_request_without_command_byte_refused():
    with pytest.raises(ShortBufferError):
        decode_request(b"\x80")


def test_empty_response_refused():
    with pytest.raises(ShortBufferError):
        decode_response(b"")


def test_bad_ack_value_refused():
    with pytest.raises(FieldValueError) as e:
        decode_response(b"\x00\x02")
    assert e.value.field == "ack"


def test_map_table_empty_refused():
    with pytest.raises(ShortBufferError):
        decode_map_table(b"")


def test_map_table_partial_entry_refused():
    with pytest.raises(FieldValueError):
        decode_map_table(encode_map_table([(0, 4096)]) + b"\x00" * 5)


def test_map_table_zero_length_entry_refused():
    with pytest.raises(FieldValueError) as e:
        decode_map_table(encode_map_table([(0, 4096)])[:8] + bytes(8))
    assert "len" in e.value.field


def test_map_table_next_set_refused():
    entry = bytearray(encode_map_table([(0, 4096)]))
    entry[14] = 1
    with pytest.raises(FieldValueError) as e:
        decode_map_table(bytes(entry))
    assert "next" in e.value.field


def test_map_table_indirect_flag_refused():
    entry = bytearray(encode_map_table([(0, 4096)]))
    entry[12] = 4
    with pytest.raises(FieldValueError) as e:
        decode_map_table(bytes(entry))
    assert "flags" in e.value.field


def test_map_table_overflowing_entry_refused():
    with pytest.raises(FieldValueError):
        decode_map_table(encode_map_table([((1 << 64) - 16, 4096)]))


# ---------------------------------------------------------------- command specs
def test_every_command_has_a_spec():
    assert set(COMMANDS) == set(MigrationCommand)


@pytest.mark.parametrize("cmd", list(MigrationCommand))
def test_spec_refuses_short_data(cmd):
    spec = COMMANDS[cmd]
    if spec.data_size == 0:
        assert spec.decode_data(b"") == (None, b"")
        return
    with pytest.raises(ShortBufferError):
        spec.decode_data(b"\x01")


@pytest.mark.parametrize("cmd", [c for c in MigrationCommand if not COMMANDS[c].data_tail])
def test_spec_refuses_trailing_data_where_fixed(cmd):
    spec = COMMANDS[cmd]
    good = {
        None: b"",
        FuncId: FuncId(1).encode(),
        FuncOffset: FuncOffset(1).encode(),
        SetState: SetState(1, VfState.RUNNING).encode(),
    }[spec.data]
    spec.decode_data(good)
    with pytest.raises(TrailingDataError):
        spec.decode_data(good + b"\x00")


def test_spec_keeps_tail_for_restore_state():
    fixed, tail = COMMANDS[MigrationCommand.RESTORE_STATE].decode_data(FuncOffset(2, 0, 16).encode() + b"image")
    assert fixed == FuncOffset(2, 0, 16) and tail == b"image"


def test_header_layout():
    assert CtrlHeader(128, 8).encode() == b"\x80\x08"


def test_track_mode_helpers():
    assert TrackMode.PUSH_BITMAP.is_push and not TrackMode.PULL_BYTEMAP.is_push
    assert TrackMode.PULL_BITMAP.is_bitmap and not TrackMode.PUSH_BYTEMAP.is_bitmap
    assert [m.cap for m in TrackMode] == list(TrackModeCaps)
    assert TrackMode.from_cli("push-bytemap") is TrackMode.PUSH_BYTEMAP
    assert TrackMode.PULL_BITMAP.map_bytes(9) == 2 and TrackMode.PULL_BYTEMAP.map_bytes(9) == 9
