"""The device state image: framing, checksum, and refusal of every malformed image."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio_lm.errors import FieldValueError, ReservedFieldError, ShortBufferError, TrailingDataError, WireError
from virtio_lm.wire.state import (
    MAGIC,
    FunctionRecord,
    ImageHeader,
    InflightHeader,
    QueueRecord,
    RecordType,
    StateImage,
    build_image,
    decode_image,
    encode_image,
    peek_total_len,
)


def sample() -> bytes:
    return build_image(
        2,
        [
            (RecordType.FUNCTION, FunctionRecord(1 << 32 | 1 << 37, 1 << 32, 0x0F, 1, 0xFFFF, 2, 0).encode()),
            (RecordType.QUEUE, QueueRecord(0, 256, 1, 1, 0xFFFF, 0x1000, 0x2000, 0x3000, 10, 9, 9).encode()),
            (RecordType.CONFIG, b"\x00" * 60),
            (RecordType.INFLIGHT, InflightHeader(0, 5, 9, 1, 3).encode() + b"req"),
            (0x101, b"device-specific"),
        ],
    )


def test_layout_sizes():
    assert ImageHeader.SIZE == 32
    assert FunctionRecord.SIZE == 28
    assert QueueRecord.SIZE == 40
    assert InflightHeader.SIZE == 12


def test_header_bytes():
    img = sample()
    assert img[:4] == b"VLMS"
    assert int.from_bytes(img[4:6], "little") == 1
    assert int.from_bytes(img[6:8], "little") == 2
    assert int.from_bytes(img[8:12], "little") == len(img)
    assert int.from_bytes(img[12:16], "little") == zlib.crc32(img[32:])
    assert int.from_bytes(img[16:20], "little") == 5
    assert img[20:32] == bytes(12)
    assert peek_total_len(img) == len(img)


def test_round_trip():
    img = decode_image(sample())
    assert img.device_id == 2
    assert [r.type for r in img.records] == [1, 2, 3, 4, 0x101]
    assert encode_image(img) == sample()
    assert QueueRecord.decode(img.of_type(RecordType.QUEUE)[0].payload).last_avail_idx == 10


@settings(max_examples=100)
@given(
    st.integers(0, 0xFFFF),
    st.lists(st.tuples(st.integers(0x100, 0xFFFF), st.binary(max_size=40)), max_size=10),
)
def test_round_trip_property(dev, recs):
    blob = build_image(dev, recs)
    img = decode_image(blob)
    assert [(r.type, r.payload) for r in img.records] == recs
    assert encode_image(img) == blob


def test_every_truncation_is_refused():
    blob = sample()
    for n in range(len(blob)):
        with pytest.raises(WireError):
            decode_image(blob[:n])


def test_trailing_bytes_refused():
    with pytest.raises(TrailingDataError):
        decode_image(sample() + b"\x00")


def test_every_single_byte_corruption_is_refused():
    blob = sample()
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x5A
        if i in range(6, 8):  # device_id is not checked by the container; the device checks it
            continue
        with pytest.raises(WireError):
            decode_image(bytes(bad))


def test_bad_magic():
    bad = bytearray(sample())
    bad[0:4] = b"XXXX"
    with pytest.raises(FieldValueError) as e:
        decode_image(bytes(bad))
    assert e.value.field == "magic"


def test_bad_version():
    bad = bytearray(sample())
    bad[4] = 2
    with pytest.raises(FieldValueError) as e:
        decode_image(bytes(bad))
    assert e.value.field == "version"


def test_bad_crc():
    bad = bytearray(sample())
    bad[-1] ^= 1
    with pytest.raises(FieldValueError) as e:
        decode_image(bytes(bad))
    assert e.value.field == "crc32"


def _rebuild(body: bytes, num: int) -> bytes:
    total = 32 + len(body)
    return ImageHeader(MAGIC, 1, 2, total, zlib.crc32(body), num).encode() + body


def test_record_length_past_end_refused_even_with_good_crc():
    body = (1).to_bytes(2, "little") + b"\x00\x00" + (100).to_bytes(4, "little") + b"x" * 10
    with pytest.raises(ShortBufferError):
        decode_image(_rebuild(body, 1))


def test_unknown_common_record_type_refused():
    body = (0x50).to_bytes(2, "little") + b"\x00\x00" + (0).to_bytes(4, "little")
    with pytest.raises(FieldValueError) as e:
        decode_image(_rebuild(body, 1))
    assert "type" in e.value.field


def test_record_reserved_nonzero_refused():
    body = (0x100).to_bytes(2, "little") + b"\x01\x00" + (0).to_bytes(4, "little")
    with pytest.raises(ReservedFieldError):
        decode_image(_rebuild(body, 1))


def test_wrong_size_function_record_refused():
    payload = FunctionRecord(0, 0, 0, 0, 0, 0, 0).encode() + b"\x00"
    body = (1).to_bytes(2, "little") + b"\x00\x00" + len(payload).to_bytes(4, "little") + payload
    with pytest.raises(TrailingDataError):
        decode_image(_rebuild(body, 1))


def test_more_records_than_bytes_refused():
    with pytest.raises(ShortBufferError):
        decode_image(_rebuild(b"", 3))


def test_bytes_after_last_record_refused():
    body = (0x100).to_bytes(2, "little") + b"\x00\x00" + (0).to_bytes(4, "little") + b"junk"
    with pytest.raises(TrailingDataError):
        decode_image(_rebuild(body, 1))


def test_absurd_total_len_refused_before_reading():
    hdr = ImageHeader(MAGIC, 1, 2, 1 << 31, 0, 0).encode()
    with pytest.raises(FieldValueError) as e:
        peek_total_len(hdr)
    assert e.value.field == "total_len"


def test_short_inflight_record_refused():
    body = (4).to_bytes(2, "little") + b"\x00\x00" + (3).to_bytes(4, "little") + b"abc"
    with pytest.raises(ShortBufferError):
        decode_image(_rebuild(body, 1))


def test_state_image_helpers():
    img = StateImage(1)
    img.add(RecordType.CONFIG, b"c")
    assert img.of_type(RecordType.CONFIG)[0].payload == b"c"


def _inflight(payload: bytes) -> bytes:
    body = (4).to_bytes(2, "little") + b"\x00\x00" + len(payload).to_bytes(4, "little") + payload
    return _rebuild(body, 1)


def test_inflight_data_len_mismatch_refused():
    with pytest.raises(FieldValueError) as e:
        decode_image(_inflight(InflightHeader(0, 1, 1, 1, 5).encode() + b"abc"))
    assert "data_len" in e.value.field


def test_inflight_done_flag_out_of_range_refused():
    with pytest.raises(FieldValueError) as e:
        decode_image(_inflight(InflightHeader(0, 1, 1, 2, 0).encode()))
    assert "done" in e.value.field


def test_inflight_pad_nonzero_refused():
    raw = bytearray(InflightHeader(0, 1, 1, 0, 0).encode())
    raw[7] = 1
    with pytest.raises(FieldValueError):
        decode_image(_inflight(bytes(raw)))
