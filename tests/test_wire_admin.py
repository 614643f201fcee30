"""wire/admin.py and wire/parts.py: the virtio 1.4 layouts at the spec's sizes and offsets,
round trips, and one test per malformed input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio_lm.errors import (
    DevicePartsError,
    EnumValueError,
    FieldValueError,
    ReservedFieldError,
    ShortBufferError,
    TrailingDataError,
)
from virtio_lm.pci.parts import check_list
from virtio_lm.wire import admin as A
from virtio_lm.wire import parts as P


# ------------------------------------------------------------------ spec facts
def test_sizes_and_offsets_are_the_specs():
    assert A.AdminCmdHdr.SIZE == 24 and A.AdminCmdHdr.OFFSETS == {"opcode": 0, "group_type": 2, "reserved1": 4, "group_member_id": 16}
    assert A.AdminCmdStatus.SIZE == 8 and A.AdminCmdStatus.OFFSETS["status_qualifier"] == 2
    assert A.CapGetData.SIZE == 8 and A.DevPartsCap.SIZE == 2
    assert A.ResourceObjCmdHdr.SIZE == 8 and A.ResourceObjCmdHdr.OFFSETS["id"] == 4
    assert A.ResourceObjCreateHead.SIZE == 16 and A.ResourceObjCreateHead.OFFSETS["flags"] == 8
    assert A.ResourceObjDevParts.SIZE == 8
    assert A.PartsCmdHead.SIZE == 16 and A.PartsCmdHead.OFFSETS["type"] == 8
    assert A.MetadataResultHead.SIZE == 8 and A.DevModeSetData.SIZE == 1
    assert P.DevPartHdr.SIZE == 16 and P.DevPartHdr.OFFSETS == {"part_type": 0, "flags": 2, "reserved": 3, "selector": 4, "length": 12}
    assert P.VqCfgValue.SIZE == 32 and P.VqCfgValue.OFFSETS["queue_desc"] == 8
    assert P.VqNotifyValue.SIZE == 8


def test_numbers_are_the_specs():
    assert [int(o) for o in A.AdminOpcode] == list(range(0x12))
    assert {s.name: int(s) for s in A.AdminStatus} == {
        "OK": 0, "ENXIO": 6, "EAGAIN": 11, "ENOMEM": 12, "EBUSY": 16, "EEXIST": 17, "EINVAL": 22, "ENOSPC": 28,
    }  # fmt: skip
    assert [int(q) for q in A.AdminQualifier] == list(range(8))
    assert int(A.GroupType.SRIOV) == 1 and int(A.DevModeFlags.STOPPED) == 1
    assert [int(t) for t in P.COMMON_ORDER] == list(range(0x100, 0x106))
    assert int(P.PartType.NET_CVQ_CFG) == 0x200 and int(P.PartFlags.OPTIONAL) == 1


def test_preceding_parts_follow_the_table():
    for i, t in enumerate(P.COMMON_ORDER):
        assert all(P.COMMON_ORDER.index(n) < i for n in P.PRECEDING[t])
    assert P.order_key(0x100) < P.order_key(0x105) < P.order_key(0x200) < P.order_key(0x201)


# ------------------------------------------------------------------ round trips
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, (1 << 64) - 1))
def test_command_head_round_trip(op, group, member):
    raw = A.encode_command(op, group, member, b"xyz")
    assert A.AdminCmdHdr.decode(raw[:24]) == A.AdminCmdHdr(op, group, 0, member) and raw[24:] == b"xyz"


@given(st.frozensets(st.integers(0, 300), max_size=40))
def test_bitmap_round_trip_and_length(numbers):
    raw = A.encode_bitmap(numbers)
    assert A.decode_bitmap(raw) == numbers
    assert len(raw) == 8 * (max(numbers, default=0) // 64 + 1)


@given(st.lists(st.tuples(st.integers(0x100, 0x5FF), st.booleans(), st.binary(min_size=8, max_size=8), st.binary(max_size=40)), max_size=8))
def test_parts_round_trip(items):
    parts = [P.DevPart.make(t, v, selector=sel, optional=o) for t, o, sel, v in items]
    assert P.decode_parts(P.encode_parts(parts)) == parts
    hdrs = [p.hdr for p in parts]
    assert P.decode_hdrs(P.encode_hdrs(hdrs)) == hdrs


@given(st.integers(0, (1 << 128) - 1))
def test_features_round_trip(f):
    assert P.decode_features(P.encode_features(f)) == f


def test_length_rule_helpers():
    assert A.pad_read(b"\1\2", 4) == b"\1\2\0\0" and A.pad_read(b"\1\2\3\4\5", 4) == b"\1\2\3\4"
    assert A.truncate_written(b"abcdef", 3) == b"abc" and A.truncate_written(b"ab", -1) == b""


# ------------------------------------------------------------------ malformed input, one each
def test_command_head_reserved1_not_zero_is_refused():
    raw = bytearray(A.encode_command(0, 0, 0))
    raw[10] = 1
    with pytest.raises(ReservedFieldError):
        A.AdminCmdHdr.decode(bytes(raw))


def test_status_ok_with_a_qualifier_is_refused():
    with pytest.raises(FieldValueError):
        A.AdminCmdStatus(A.AdminStatus.OK, A.AdminQualifier.INVALID_FIELD)


def test_status_error_with_qualifier_ok_is_refused():
    with pytest.raises(FieldValueError):
        A.AdminCmdStatus(A.AdminStatus.EINVAL, A.AdminQualifier.OK)


def test_unknown_status_value_is_refused():
    with pytest.raises(EnumValueError):
        A.AdminCmdStatus.decode(b"\x05\x00\x01\x00" + bytes(4))


def test_status_reserved2_not_zero_is_refused():
    with pytest.raises(ReservedFieldError):
        A.AdminCmdStatus.decode(b"\x16\x00\x01\x00\x00\x01\x00\x00")


def test_dev_mode_unknown_flag_is_refused():
    with pytest.raises(FieldValueError):
        A.DevModeSetData.decode(b"\x02")


def test_object_header_reserved_not_zero_is_refused():
    with pytest.raises(ReservedFieldError):
        A.ResourceObjCmdHdr.decode(b"\0\0\0\1" + bytes(4))


def test_dev_parts_object_reserved_not_zero_is_refused():
    with pytest.raises(ReservedFieldError):
        A.ResourceObjDevParts.decode(b"\0" + b"\1" + bytes(6))


def test_cap_get_reserved_not_zero_is_refused():
    with pytest.raises(ReservedFieldError):
        A.CapGetData.decode(b"\0\0\0\0\0\0\0\1")


def test_bitmap_not_whole_words_is_refused():
    with pytest.raises(ShortBufferError):
        A.decode_bitmap(bytes(12))


def test_bitmap_of_a_negative_number_is_refused():
    with pytest.raises(FieldValueError):
        A.encode_bitmap({-1})


def test_part_header_reserved_not_zero_is_refused():
    raw = bytearray(P.DevPart.make(0x100, bytes(16)).encode())
    raw[3] = 1
    with pytest.raises(ReservedFieldError):
        P.decode_parts(bytes(raw))


def test_part_header_unknown_flag_is_refused():
    raw = bytearray(P.DevPart.make(0x100, bytes(16)).encode())
    raw[2] = 2
    with pytest.raises(FieldValueError):
        P.decode_parts(bytes(raw))


def test_part_header_cut_short_is_refused():
    with pytest.raises(ShortBufferError):
        P.decode_parts(P.DevPart.make(0x100, b"").encode() + bytes(5))


def test_part_value_running_past_the_buffer_is_refused():
    raw = P.DevPart.make(0x100, bytes(16)).encode()
    with pytest.raises(ShortBufferError):
        P.decode_parts(raw[:-1])


def test_part_value_over_the_limit_is_refused():
    with pytest.raises(FieldValueError):
        P.decode_parts(P.DevPart.make(0x200, bytes(64)).encode(), max_value=63)


def test_header_list_not_whole_headers_is_refused():
    with pytest.raises(ShortBufferError):
        P.decode_hdrs(bytes(20))


def test_part_whose_length_disagrees_with_its_value_is_refused():
    with pytest.raises(FieldValueError):
        P.DevPart(P.DevPartHdr(0x100, P.PartFlags(0), 0, bytes(8), 3), b"ab")


def test_features_value_empty_or_not_whole_words_is_refused():
    for bad in (b"", bytes(12)):
        with pytest.raises(FieldValueError):
            P.decode_features(bad)


def test_features_too_wide_for_the_words_is_refused():
    with pytest.raises(FieldValueError):
        P.encode_features(1 << 128)


def test_vq_cfg_reserved_not_zero_is_refused():
    raw = bytearray(P.VqCfgValue(64, 0, 1).encode())
    raw[6] = 1
    with pytest.raises(ReservedFieldError):
        P.VqCfgValue.decode(bytes(raw))


def test_selector_reserved_not_zero_is_refused():
    for cls, raw in ((P.CommonCfgSelector, bytes(4) + b"\1\0\0\0"), (P.VqIndexSelector, b"\0\0\1" + bytes(5)),
                     (P.NetCvqSelector, b"\0\0\1" + bytes(5))):
        with pytest.raises(ReservedFieldError):
            cls.decode(raw)


def test_trailing_bytes_after_a_fixed_layout_are_refused():
    with pytest.raises(TrailingDataError):
        A.DevPartsCap.decode(b"\1\1\0")


# ------------------------------------------------------------------ the list rules, as a property
def _full_list() -> list[P.DevPart]:
    vq = P.VqIndexSelector
    return [
        P.DevPart.make(P.PartType.DEV_FEATURES, bytes(16), optional=True),
        P.DevPart.make(P.PartType.DRV_FEATURES, bytes(16)),
        P.DevPart.make(P.PartType.PCI_COMMON_CFG, bytes(2), selector=P.CommonCfgSelector(0x10).encode()),
        P.DevPart.make(P.PartType.DEVICE_STATUS, b"\0"),
        P.DevPart.make(P.PartType.VQ_CFG, bytes(32), selector=vq(0).encode()),
        P.DevPart.make(P.PartType.VQ_CFG, bytes(32), selector=vq(1).encode()),
        P.DevPart.make(P.PartType.VQ_NOTIFY_CFG, bytes(8), selector=vq(0).encode()),
        P.DevPart.make(P.PartType.NET_CVQ_CFG, b"\1", selector=P.NetCvqSelector(0, 0).encode()),
    ]


@settings(max_examples=200)
@given(st.permutations(range(8)))
def test_a_part_list_is_taken_exactly_when_it_keeps_the_mandatory_order(perm):
    full = _full_list()
    parts = [full[i] for i in perm]
    keys = [P.order_key(p.hdr.part_type) for p in parts]
    try:
        check_list(parts, frozenset({0x200}))
        taken = True
    except DevicePartsError:
        taken = False
    assert taken == (keys == sorted(keys))


@settings(max_examples=200)
@given(st.sets(st.integers(0, 7)))
def test_a_part_list_missing_a_preceding_part_is_refused(drop):
    full = _full_list()
    parts = [p for i, p in enumerate(full) if i not in drop]
    present = {p.hdr.part_type for p in parts}
    ok = all(
        need in present
        for p in parts
        if p.hdr.part_type < 0x200
        for need in P.PRECEDING[P.PartType(p.hdr.part_type)]
        if need is not P.PartType.DEV_FEATURES
    )
    try:
        check_list(parts, frozenset({0x200}))
        taken = True
    except DevicePartsError:
        taken = False
    assert taken == ok
