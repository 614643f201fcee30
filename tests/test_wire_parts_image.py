"""The virtio-1.4 profile's device record in a migration stream: a parts image (wire/parts.py)."""

from __future__ import annotations

import zlib

import pytest

from virtio_lm.errors import FieldValueError, ShortBufferError, StreamError
from virtio_lm.wire.parts import (
    PARTS_IMAGE_MAGIC,
    DevPart,
    PartsImageHeader,
    PartType,
    decode_parts_image,
    encode_parts,
    encode_parts_image,
    is_parts_image,
)
from virtio_lm.wire.state import build_image

PARTS = [DevPart.make(PartType.DEV_FEATURES, bytes(16), optional=True), DevPart.make(PartType.DEVICE_STATUS, b"\x0f")]


def _image(body: bytes, **over) -> bytes:
    fields = dict(magic=PARTS_IMAGE_MAGIC, version=1, device_id=2, parts_len=len(body), crc32=zlib.crc32(body))
    fields.update(over)
    return PartsImageHeader(**fields).encode() + body


def test_round_trip():
    img = encode_parts_image(2, PARTS)
    assert is_parts_image(img)
    assert decode_parts_image(img) == (2, PARTS)
    assert not is_parts_image(build_image(2, []))  # a seed state image is told apart by its magic


def test_header_cut_short_is_refused():
    with pytest.raises(ShortBufferError):
        decode_parts_image(encode_parts_image(2, PARTS)[:10])


def test_bad_magic_is_refused():
    with pytest.raises(FieldValueError, match="magic"):
        decode_parts_image(_image(encode_parts(PARTS), magic=0x12345678))


def test_unknown_version_is_refused():
    with pytest.raises(FieldValueError, match="version"):
        decode_parts_image(_image(encode_parts(PARTS), version=2))


def test_length_other_than_the_bytes_that_follow_is_refused():
    body = encode_parts(PARTS)
    with pytest.raises(FieldValueError, match="parts_len"):
        decode_parts_image(_image(body, parts_len=len(body) + 1))
    with pytest.raises(FieldValueError, match="parts_len"):
        decode_parts_image(_image(body) + b"\0")


def test_absurd_length_is_refused_before_anything_else():
    with pytest.raises(FieldValueError, match="at most"):
        decode_parts_image(_image(b"", parts_len=1 << 30))


def test_checksum_mismatch_is_refused():
    body = bytearray(encode_parts(PARTS))
    img = bytearray(_image(bytes(body)))
    img[-1] ^= 0xFF
    with pytest.raises(FieldValueError, match="crc32"):
        decode_parts_image(bytes(img))


def test_parts_that_do_not_frame_are_refused():
    body = encode_parts(PARTS)[:-1]  # the last value cut short; the checksum matches the cut body
    with pytest.raises(ShortBufferError):
        decode_parts_image(_image(body))


def test_the_stream_takes_a_parts_image_and_refuses_a_broken_one():
    from virtio_lm.wire.stream import Device, Hello, StreamConfig, StreamDecoder, StreamEncoder, VfConfig

    cfg = StreamConfig(memory_size=1 << 20, page_size=4096, vfs=(VfConfig(0, 2, 1, 1),), workload="w")
    good = encode_parts_image(2, PARTS)
    enc = StreamEncoder()
    dec = StreamDecoder()
    out = dec.feed(enc.encode(Hello(cfg)) + enc.encode(Device(0, 2, good)))
    assert out[-1].body == Device(0, 2, good)
    bad = good[:-1] + bytes([good[-1] ^ 1])
    enc2, dec2 = StreamEncoder(), StreamDecoder()
    with pytest.raises(StreamError, match="crc32"):
        dec2.feed(enc2.encode(Hello(cfg)) + enc2.encode(Device(0, 2, bad)))
