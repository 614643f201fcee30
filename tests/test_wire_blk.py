"""virtio-blk wire formats (wire/blk.py)."""

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
from virtio_lm.wire import blk
from virtio_lm.wire.blk import (
    BLK_REQUIREMENTS,
    BlkConfig,
    BlkFeature,
    BlkOutHdr,
    BlkReqType,
    BlkStatus,
    DiscardSegment,
    SegmentFlags,
    decode_blk_id,
    decode_segments,
    encode_blk_id,
    encode_segments,
)
from virtio_lm.wire.features import feature_names, mask, unmet_requirements

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)

outhdrs = st.builds(BlkOutHdr, type=st.sampled_from(list(BlkReqType)), ioprio=u32, sector=u64)
segments = st.builds(
    DiscardSegment, sector=u64, num_sectors=u32, flags=st.sampled_from([SegmentFlags(0), SegmentFlags.UNMAP])
)
configs = st.builds(
    BlkConfig,
    capacity=u64,
    size_max=u32,
    seg_max=u32,
    geometry_cylinders=u16,
    geometry_heads=u8,
    geometry_sectors=u8,
    blk_size=u32,
    physical_block_exp=u8,
    alignment_offset=u8,
    min_io_size=u16,
    opt_io_size=u32,
    writeback=st.sampled_from([0, 1]),
    num_queues=u16,
    max_discard_sectors=u32,
    max_discard_seg=u32,
    discard_sector_alignment=u32,
    max_write_zeroes_sectors=u32,
    max_write_zeroes_seg=u32,
    write_zeroes_may_unmap=u8,
    max_secure_erase_sectors=u32,
    max_secure_erase_seg=u32,
    secure_erase_sector_alignment=u32,
)


# ------------------------------------------------------------------ constants
def test_sector_size() -> None:
    assert blk.SECTOR_SIZE == 512 == 1 << blk.SECTOR_SHIFT


def test_request_type_values() -> None:
    assert {t.name: int(t) for t in BlkReqType} == {
        "IN": 0, "OUT": 1, "FLUSH": 4, "GET_ID": 8, "GET_LIFETIME": 10,
        "DISCARD": 11, "WRITE_ZEROES": 13, "SECURE_ERASE": 14,
    }  # fmt: skip


def test_status_values() -> None:
    assert [int(BlkStatus.OK), int(BlkStatus.IOERR), int(BlkStatus.UNSUPP)] == [0, 1, 2]


def test_ctrl_vq_is_bit_15_and_aliases_lifetime() -> None:
    assert BlkFeature.CTRL_VQ == 15
    assert BlkFeature.LIFETIME is BlkFeature.CTRL_VQ
    assert BlkFeature(15).name == "CTRL_VQ"
    assert feature_names(mask(15, 12), BlkFeature) == ["MQ", "CTRL_VQ"]


def test_ctrl_vq_requires_mq() -> None:
    assert unmet_requirements(mask(BlkFeature.CTRL_VQ), BLK_REQUIREMENTS, device_bits=BlkFeature) == [
        "CTRL_VQ requires MQ"
    ]
    assert unmet_requirements(mask(BlkFeature.CTRL_VQ, BlkFeature.MQ), BLK_REQUIREMENTS) == []
    assert unmet_requirements(mask(BlkFeature.MQ), BLK_REQUIREMENTS) == []


def test_ctrl_queue_index_follows_request_queues() -> None:
    assert blk.ctrl_queue_index(1) == 1 and blk.ctrl_queue_index(4) == 4


# ------------------------------------------------------------------ round trips
@settings(max_examples=150, deadline=None)
@given(outhdrs)
def test_outhdr_round_trip(h: BlkOutHdr) -> None:
    raw = h.encode()
    assert len(raw) == blk.OUTHDR_SIZE == 16
    assert BlkOutHdr.decode(raw) == h
    assert raw[:4] == int(h.type).to_bytes(4, "little") and raw[8:] == h.sector.to_bytes(8, "little")


@settings(max_examples=150, deadline=None)
@given(t=st.sampled_from(list(BlkReqType)), rest=st.binary(min_size=12, max_size=12))
def test_outhdr_bytes_round_trip(t: BlkReqType, rest: bytes) -> None:
    raw = int(t).to_bytes(4, "little") + rest
    assert BlkOutHdr.decode(raw).encode() == raw


@settings(max_examples=150, deadline=None)
@given(segments)
def test_segment_round_trip(s: DiscardSegment) -> None:
    assert DiscardSegment.decode(s.encode()) == s


@settings(max_examples=100, deadline=None)
@given(st.lists(segments, min_size=1, max_size=8))
def test_segment_array_round_trip(segs: list[DiscardSegment]) -> None:
    raw = encode_segments(segs)
    assert len(raw) == 16 * len(segs)
    assert decode_segments(raw) == tuple(segs)
    assert encode_segments(list(decode_segments(raw))) == raw


@settings(max_examples=150, deadline=None)
@given(configs)
def test_config_round_trip(c: BlkConfig) -> None:
    raw = c.encode()
    assert len(raw) == 72
    assert BlkConfig.decode(raw) == c
    assert raw[:8] == c.capacity.to_bytes(8, "little")
    assert raw[34:36] == c.num_queues.to_bytes(2, "little")
    assert raw[32] == c.writeback


@settings(max_examples=100, deadline=None)
@given(c=configs)
def test_config_bytes_round_trip(c: BlkConfig) -> None:
    raw = c.encode()
    assert BlkConfig.decode(raw).encode() == raw


def test_config_field_table_covers_every_byte() -> None:
    covered = sorted((off, size) for _, off, size in BlkConfig.FIELDS)
    pos = 0
    for off, size in covered:
        assert off == pos
        pos += size
    assert pos == BlkConfig.SIZE == 72


@settings(max_examples=100, deadline=None)
@given(ident=st.binary(max_size=20).filter(lambda b: b"\0" not in b))
def test_id_round_trip(ident: bytes) -> None:
    raw = encode_blk_id(ident)
    assert len(raw) == blk.VIRTIO_BLK_ID_BYTES
    assert decode_blk_id(raw) == ident


# ------------------------------------------------------------------ malformed input, one class per test
def test_outhdr_short_buffer() -> None:
    with pytest.raises(ShortBufferError) as ei:
        BlkOutHdr.decode(bytes(15))
    assert ei.value.layout == "BlkOutHdr" and ei.value.needed == 16


def test_outhdr_trailing_bytes() -> None:
    with pytest.raises(TrailingDataError) as ei:
        BlkOutHdr.decode(bytes(17))
    assert ei.value.layout == "BlkOutHdr" and ei.value.got == 17


@pytest.mark.parametrize("bad_type", [2, 3, 5, 9, 12, 15, 0x80000000, 0xFFFFFFFF])
def test_outhdr_unknown_type(bad_type: int) -> None:
    raw = bad_type.to_bytes(4, "little") + bytes(12)
    with pytest.raises(EnumValueError) as ei:
        BlkOutHdr.decode(raw)
    assert ei.value.field == "type" and ei.value.value == bad_type


def test_outhdr_ioprio_is_not_reserved() -> None:
    # Linux puts the I/O priority in the spec's "reserved" word: accepted
    raw = (1).to_bytes(4, "little") + (0x4003).to_bytes(4, "little") + (7).to_bytes(8, "little")
    assert BlkOutHdr.decode(raw) == BlkOutHdr(BlkReqType.OUT, 0x4003, 7)


def test_segment_reserved_flag_bits() -> None:
    raw = DiscardSegment(1, 2).encode()[:12] + (2).to_bytes(4, "little")
    with pytest.raises(FieldValueError) as ei:
        DiscardSegment.decode(raw)
    assert ei.value.field == "flags"


def test_segment_reserved_flag_bits_refused_on_encode() -> None:
    with pytest.raises(FieldValueError) as ei:
        DiscardSegment(1, 2, 0x80000001).encode()  # type: ignore[arg-type]
    assert ei.value.field == "flags"


def test_segment_array_empty() -> None:
    with pytest.raises(ShortBufferError):
        decode_segments(b"")


def test_segment_array_partial_segment() -> None:
    with pytest.raises(FieldValueError) as ei:
        decode_segments(bytes(16 + 5))
    assert ei.value.layout == "virtio_blk_discard_write_zeroes"


def test_segment_array_bad_flags_in_second_segment() -> None:
    raw = DiscardSegment(0, 8).encode() + DiscardSegment(8, 8).encode()[:12] + (4).to_bytes(4, "little")
    with pytest.raises(FieldValueError) as ei:
        decode_segments(raw)
    assert ei.value.field == "flags"


def test_config_short_buffer() -> None:
    with pytest.raises(ShortBufferError) as ei:
        BlkConfig.decode(bytes(71))
    assert ei.value.layout == "BlkConfig"


def test_config_trailing_bytes() -> None:
    with pytest.raises(TrailingDataError):
        BlkConfig.decode(BlkConfig().encode() + b"\0")


@pytest.mark.parametrize("field,offset,width", [("unused0", 33, 1), ("unused1", 57, 3)])
def test_config_reserved_nonzero(field: str, offset: int, width: int) -> None:
    raw = bytearray(BlkConfig().encode())
    raw[offset + width - 1] = 1
    with pytest.raises(ReservedFieldError) as ei:
        BlkConfig.decode(bytes(raw))
    assert ei.value.field == field


def test_config_reserved_nonzero_refused_on_encode() -> None:
    with pytest.raises(ReservedFieldError) as ei:
        BlkConfig(unused1=1).encode()
    assert ei.value.field == "unused1"


def test_config_writeback_out_of_range() -> None:
    raw = bytearray(BlkConfig().encode())
    raw[32] = 2
    with pytest.raises(FieldValueError) as ei:
        BlkConfig.decode(bytes(raw))
    assert ei.value.field == "writeback"


def test_config_value_too_wide_on_encode() -> None:
    with pytest.raises(FieldValueError) as ei:
        BlkConfig(num_queues=0x10000).encode()
    assert ei.value.field == "num_queues"


def test_id_too_long() -> None:
    with pytest.raises(FieldValueError) as ei:
        encode_blk_id(b"x" * 21)
    assert ei.value.field == "id"


def test_id_wrong_size() -> None:
    with pytest.raises(FieldValueError):
        decode_blk_id(bytes(19))


def test_id_full_length_has_no_terminator() -> None:
    assert decode_blk_id(b"A" * 20) == b"A" * 20
    assert decode_blk_id(encode_blk_id("vlm-disk-0")) == b"vlm-disk-0"
