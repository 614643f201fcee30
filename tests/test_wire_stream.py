"""The migration stream: round trips, incremental decoding, and one named test per malformed input."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio_lm.errors import (
    SectionTooLargeError,
    StreamChecksumError,
    StreamError,
    StreamTruncatedError,
    StreamVersionError,
    UnexpectedSectionError,
)
from virtio_lm.wire.codec import u32
from virtio_lm.wire.state import RecordType, build_image
from virtio_lm.wire.stream import (
    CRC_SIZE,
    HEADER_SIZE,
    MAGIC,
    VERSION,
    MAX_PAYLOAD,
    OVERHEAD,
    Abort,
    Ack,
    AckRecord,
    CompleteRecord,
    CountHeader,
    Commit,
    CpuState,
    Device,
    DeviceHeader,
    Direction,
    Error,
    ErrorCode,
    ErrorHeader,
    Hello,
    HelloHeader,
    RamPages,
    Ready,
    RoundRecord,
    Running,
    SectionFlags,
    SectionHeader,
    SectionType,
    StreamConfig,
    StreamDecoder,
    StreamEncoder,
    VfConfig,
    VfRecord,
    ZeroRuns,
    decode_all,
    section_size,
    zero_runs,
)

PAGE = 4096
CFG = StreamConfig(1 << 20, PAGE, (VfConfig(1, 2, (1 << 32) | 1, 1 << 32), VfConfig(3, 1, 1 << 100 | 7, 3)), "sweep")
IMG = build_image(2, [(RecordType.CONFIG, b"\x01\x02")])


def sample_bodies():
    return [
        (Hello(CFG), SectionFlags.NONE),
        (RamPages(np.array([0, 7, 255], dtype=np.uint64), bytes(range(256)) * 48), SectionFlags.NONE),
        (ZeroRuns(np.array([[1, 6], [8, 10]], dtype=np.uint64)), SectionFlags.NONE),
        (RoundRecord(0, 20, 256, 3, 16, 12345, 999), SectionFlags.NONE),
        (RamPages(np.array([9], dtype=np.uint64), b"\xaa" * PAGE), SectionFlags.FINAL),
        (RoundRecord(1, 0, 1, 1, 0, 4200, 5), SectionFlags.FINAL),
        (Device(1, 2, IMG), SectionFlags.NONE),
        (CpuState(b"vcpu"), SectionFlags.NONE),
    ]


def sample_stream() -> tuple[bytes, StreamEncoder]:
    enc = StreamEncoder()
    out = b"".join(enc.encode(b, f) for b, f in sample_bodies())
    out += enc.encode(enc.complete())
    out += enc.encode(Commit())
    return out, enc


def frame(stype: int, payload: bytes, seq: int = 0, flags: int = 0, *, crc: int | None = None) -> bytes:
    head = SectionHeader(stype, flags, seq, len(payload)).encode()
    c = zlib.crc32(head + payload) if crc is None else crc
    return head + payload + u32(c)


def hello_bytes() -> bytes:
    return StreamEncoder().encode(Hello(CFG))


# ====================================================================== layouts and round trips
def test_layout_sizes():
    assert HEADER_SIZE == 12 and CRC_SIZE == 4 and OVERHEAD == 16
    assert HelloHeader.SIZE == 24 and VfRecord.SIZE == 40
    assert CountHeader.SIZE == 8 and RoundRecord.SIZE == 48 and DeviceHeader.SIZE == 8
    assert CompleteRecord.SIZE == 16 and AckRecord.SIZE == 16 and ErrorHeader.SIZE == 4


def test_header_bytes_are_little_endian():
    data = hello_bytes()
    assert data[:2] == b"\x01\x00" and data[4:8] == b"\x00\x00\x00\x00"
    assert int.from_bytes(data[8:12], "little") == len(data) - OVERHEAD
    assert int.from_bytes(data[12:16], "little") == MAGIC and data[12:16] == b"VLMM"
    assert int.from_bytes(data[-4:], "little") == zlib.crc32(data[:-4])


def test_round_trip_every_type_and_offsets():
    data, enc = sample_stream()
    secs = decode_all(data)
    assert [s.type for s in secs] == [
        SectionType.HELLO, SectionType.RAM, SectionType.ZERO, SectionType.ROUND, SectionType.RAM,
        SectionType.ROUND, SectionType.DEVICE, SectionType.CPU_STATE, SectionType.COMPLETE, SectionType.COMMIT,
    ]
    assert [s.seq for s in secs] == list(range(10))
    assert secs[0].body.config == CFG
    assert secs[1].body.pages.tolist() == [0, 7, 255] and bytes(secs[1].body.data) == bytes(range(256)) * 48
    assert secs[2].body.page_numbers().tolist() == [1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]
    assert secs[4].final and not secs[1].final
    assert secs[3].body == RoundRecord(0, 20, 256, 3, 16, 12345, 999)
    assert secs[6].body == Device(1, 2, IMG)
    assert secs[7].body == CpuState(b"vcpu")
    off = 0
    for s, (body, _) in zip(secs, sample_bodies()):
        assert s.offset == off and s.size == section_size(body)
        off += s.size
    assert secs[8].body == CompleteRecord(8, 0, secs[8].offset)
    assert sum(s.size for s in secs) == len(data) == enc.offset


def test_destination_messages_round_trip():
    enc = StreamEncoder()
    bodies = [Ack(0, 85), Ack(3, 9000), Ready(1234), Running(56), Error(ErrorCode.CONFIG_MISMATCH, "mémoire")]
    data = b"".join(enc.encode(b) for b in bodies)
    assert [s.body for s in decode_all(data, Direction.TO_SOURCE)] == bodies


def test_abort_round_trip_and_long_text_is_cut_on_a_character():
    secs = decode_all(hello_bytes() + _at(1, Abort(ErrorCode.CANCELLED, "é" * 2000)))
    body = secs[1].body
    assert body.code is ErrorCode.CANCELLED and len(body.text.encode()) <= 1024 and set(body.text) == {"é"}


def _at(seq: int, body, flags=SectionFlags.NONE) -> bytes:
    enc = StreamEncoder()
    enc.seq = seq
    return enc.encode(body, flags)


@pytest.mark.parametrize("step", [1, 3, 12, 13, 100, 4096, 1 << 20])
def test_incremental_decoding_any_chunking(step):
    data, _ = sample_stream()
    whole = [(s.type, s.seq, s.offset) for s in decode_all(data)]
    dec = StreamDecoder()
    got = []
    for i in range(0, len(data), step):
        got += [(s.type, s.seq, s.offset) for s in dec.feed(data[i : i + step])]
    dec.finish()
    assert got == whole and dec.pending == 0 and dec.bytes_fed == len(data)


def test_trailing_partial_section_stays_pending_until_finish():
    data, _ = sample_stream()
    dec = StreamDecoder()
    n = len(dec.feed(data + data[:5]))  # the start of an eleventh section
    assert n == 10 and dec.pending == 5
    with pytest.raises(StreamTruncatedError):
        dec.finish()


def test_body_views_survive_later_feeds():
    data, _ = sample_stream()
    dec = StreamDecoder()
    secs = []
    for i in range(0, len(data), 1000):
        secs += dec.feed(data[i : i + 1000])
    assert bytes(secs[1].body.data) == bytes(range(256)) * 48


@settings(max_examples=60, deadline=None)
@given(
    pages=st.lists(st.integers(0, 255), min_size=1, max_size=20, unique=True),
    zeros=st.lists(st.integers(0, 255), min_size=1, max_size=60, unique=True),
    cpu=st.binary(max_size=300),
    cuts=st.lists(st.integers(1, 5000), max_size=10),
)
def test_property_round_trip(pages, zeros, cpu, cuts):
    rng = np.random.default_rng(len(pages))
    data_pages = rng.integers(0, 256, size=len(pages) * PAGE, dtype=np.uint8).tobytes()
    runs = zero_runs(np.array(sorted(zeros), dtype=np.uint64))
    enc = StreamEncoder()
    stream = enc.encode(Hello(CFG)) + enc.encode(RamPages(np.array(pages, dtype=np.uint64), data_pages))
    stream += enc.encode(ZeroRuns(runs)) + enc.encode(CpuState(cpu)) + enc.encode(enc.complete())
    dec = StreamDecoder()
    secs, pos = [], 0
    for c in sorted(set(cuts)) + [len(stream)]:
        secs += dec.feed(stream[pos:c])
        pos = max(pos, c)
    dec.finish()
    assert secs[1].body.pages.tolist() == pages and bytes(secs[1].body.data) == data_pages
    assert secs[2].body.page_numbers().tolist() == sorted(zeros)
    assert secs[3].body.data == cpu


@settings(max_examples=100, deadline=None)
@given(pos=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_property_every_single_bit_flip_is_refused(pos, bit):
    data, _ = sample_stream()
    pos %= len(data)
    bad = bytearray(data)
    bad[pos] ^= 1 << bit
    with pytest.raises(StreamError):
        decode_all(bytes(bad))


@settings(max_examples=100, deadline=None)
@given(junk=st.binary(max_size=200))
def test_property_arbitrary_bytes_never_raise_anything_but_stream_errors(junk):
    for direction in Direction:
        dec = StreamDecoder(direction)
        try:
            dec.feed(junk)
            dec.finish()
        except StreamError:
            pass


def test_zero_runs():
    assert zero_runs(np.array([], dtype=np.uint64)).shape == (0, 2)
    assert zero_runs(np.array([3, 4, 5, 9, 11, 12], dtype=np.uint64)).tolist() == [[3, 3], [9, 1], [11, 2]]


def test_idle_gib_of_zero_pages_is_a_handful_of_bytes():
    pages = np.arange(1 << 18, dtype=np.uint64)
    assert section_size(ZeroRuns(zero_runs(pages))) == OVERHEAD + 8 + 16


# ====================================================================== encoder refusals
@pytest.mark.parametrize(
    "body, flags",
    [
        (RamPages(np.zeros(0, dtype=np.uint64), b""), SectionFlags.NONE),
        (RamPages(np.arange(1025, dtype=np.uint64), bytes(1025 * PAGE)), SectionFlags.NONE),
        (ZeroRuns(np.zeros((0, 2), dtype=np.uint64)), SectionFlags.NONE),
        (CpuState(b"x"), SectionFlags.FINAL),
        (Hello(StreamConfig(1 << 20, PAGE, (), "x" * 256)), SectionFlags.NONE),
        (Hello(StreamConfig(1 << 20, PAGE, (VfConfig(1, 1, 1 << 128, 0),))), SectionFlags.NONE),
    ],
)
def test_encoder_refuses_what_cannot_be_sent(body, flags):
    with pytest.raises(ValueError):
        StreamEncoder().encode(body, flags)


# ====================================================================== malformed input, one test each
def _decode(data: bytes, direction: Direction = Direction.TO_DEST):
    return decode_all(data, direction)


def test_refuses_unknown_section_type():
    with pytest.raises(UnexpectedSectionError, match="unknown section type") as ei:
        _decode(frame(0x55, b""))
    assert ei.value.offset == 0


def test_refuses_section_of_the_other_direction():
    with pytest.raises(UnexpectedSectionError, match="does not travel"):
        _decode(frame(SectionType.READY, bytes(8)))
    with pytest.raises(UnexpectedSectionError, match="does not travel"):
        _decode(frame(SectionType.RAM, b""), Direction.TO_SOURCE)


def test_refuses_stream_not_starting_with_hello():
    with pytest.raises(UnexpectedSectionError, match="begin with HELLO"):
        _decode(frame(SectionType.CPU_STATE, b"x"))


def test_refuses_second_hello():
    with pytest.raises(UnexpectedSectionError, match="second HELLO"):
        _decode(hello_bytes() + _at(1, Hello(CFG)))


def test_refuses_bad_crc():
    data = bytearray(hello_bytes())
    data[-1] ^= 0x80
    with pytest.raises(StreamChecksumError) as ei:
        _decode(bytes(data))
    assert ei.value.section == "HELLO" and ei.value.offset == 0


def test_refuses_corrupt_payload_byte():
    data = bytearray(hello_bytes() + _at(1, CpuState(b"abcdef")))
    data[-6] ^= 1
    with pytest.raises(StreamChecksumError) as ei:
        _decode(bytes(data))
    assert ei.value.section == "CPU_STATE" and ei.value.offset == len(hello_bytes())


def test_refuses_oversized_section_before_buffering_it():
    dec = StreamDecoder()
    dec.feed(hello_bytes())
    head = SectionHeader(SectionType.ROUND, 0, 1, RoundRecord.SIZE + 1).encode()
    with pytest.raises(SectionTooLargeError, match="above the maximum") as ei:
        dec.feed(head)  # the header alone is enough
    assert ei.value.section == "ROUND"
    with pytest.raises(SectionTooLargeError):
        dec.feed(b"more")  # the decoder stays dead


def test_refuses_oversized_ram_section():
    head = SectionHeader(SectionType.RAM, 0, 1, MAX_PAYLOAD[SectionType.RAM] + 1).encode()
    with pytest.raises(SectionTooLargeError):
        _decode(hello_bytes() + head)


def test_refuses_flags_not_allowed_on_the_type():
    with pytest.raises(UnexpectedSectionError, match="flags"):
        _decode(hello_bytes() + frame(SectionType.CPU_STATE, b"x", seq=1, flags=1))
    with pytest.raises(UnexpectedSectionError, match="flags"):
        _decode(hello_bytes() + frame(SectionType.ZERO, bytes(8), seq=1, flags=2))


def test_refuses_sequence_gap():
    with pytest.raises(UnexpectedSectionError, match="sequence number 2, expected 1"):
        _decode(hello_bytes() + _at(2, CpuState(b"x")))


def test_refuses_repeated_section():
    one = _at(1, CpuState(b"x"))
    with pytest.raises(UnexpectedSectionError, match="sequence"):
        _decode(hello_bytes() + one + one)


def test_refuses_truncated_header():
    with pytest.raises(StreamTruncatedError) as ei:
        _decode(hello_bytes()[:7])
    assert ei.value.offset == 0


def test_refuses_truncated_payload():
    data = hello_bytes() + _at(1, CpuState(b"abcdef"))
    with pytest.raises(StreamTruncatedError) as ei:
        _decode(data[:-3])
    assert ei.value.section == "CPU_STATE" and ei.value.offset == len(hello_bytes())


def test_refuses_bad_magic():
    payload = bytearray(hello_bytes()[HEADER_SIZE:-CRC_SIZE])
    payload[0] ^= 0xFF
    with pytest.raises(StreamVersionError, match="magic"):
        _decode(frame(SectionType.HELLO, bytes(payload)))


@pytest.mark.parametrize("version", [VERSION - 1, VERSION + 1])  # an older stream, a newer one
def test_refuses_unknown_version(version):
    payload = bytearray(hello_bytes()[HEADER_SIZE:-CRC_SIZE])
    payload[4] = version
    with pytest.raises(StreamVersionError, match=f"stream version {version}, this side knows {VERSION}"):
        _decode(frame(SectionType.HELLO, bytes(payload)))


def test_refuses_short_hello():
    with pytest.raises(StreamError, match="bad payload"):
        _decode(frame(SectionType.HELLO, u32(MAGIC) + bytes([VERSION, 0])))


def test_refuses_hello_page_size_not_power_of_two():
    p = HelloHeader(MAGIC, VERSION, 0, 1 << 20, 3000, 0).encode()
    with pytest.raises(StreamError, match="page size"):
        _decode(frame(SectionType.HELLO, p))


def test_refuses_hello_memory_not_multiple_of_page():
    p = HelloHeader(MAGIC, VERSION, 0, 4097, PAGE, 0).encode()
    with pytest.raises(StreamError, match="memory size"):
        _decode(frame(SectionType.HELLO, p))


def test_refuses_hello_length_mismatch():
    p = HelloHeader(MAGIC, VERSION, 1, 1 << 20, PAGE, 0).encode()  # one VF announced, none follows
    with pytest.raises(StreamError, match="needs"):
        _decode(frame(SectionType.HELLO, p))


def test_refuses_hello_workload_not_utf8():
    p = HelloHeader(MAGIC, VERSION, 0, 1 << 20, PAGE, 2).encode() + b"\xff\xfe"
    with pytest.raises(StreamError, match="UTF-8"):
        _decode(frame(SectionType.HELLO, p))


def test_refuses_hello_duplicate_vf():
    vf = VfRecord(1, 2).encode()
    p = HelloHeader(MAGIC, VERSION, 2, 1 << 20, PAGE, 0).encode() + vf + vf
    with pytest.raises(StreamError, match="twice"):
        _decode(frame(SectionType.HELLO, p))


def test_refuses_hello_reserved_field():
    p = bytearray(HelloHeader(MAGIC, VERSION, 0, 1 << 20, PAGE, 0).encode())
    p[22] = 1
    with pytest.raises(StreamError, match="reserved"):
        _decode(frame(SectionType.HELLO, bytes(p)))


def test_refuses_ram_count_zero():
    with pytest.raises(StreamError, match="0 pages"):
        _decode(hello_bytes() + frame(SectionType.RAM, CountHeader(0).encode(), seq=1))


def test_refuses_ram_length_not_matching_count():
    p = CountHeader(2).encode() + bytes(16) + bytes(PAGE)  # two pages announced, one page of data
    with pytest.raises(StreamError, match="need"):
        _decode(hello_bytes() + frame(SectionType.RAM, p, seq=1))


def test_refuses_ram_page_outside_memory():
    p = CountHeader(1).encode() + (256).to_bytes(8, "little") + bytes(PAGE)
    with pytest.raises(StreamError, match="outside"):
        _decode(hello_bytes() + frame(SectionType.RAM, p, seq=1))


def test_refuses_ram_reserved_field():
    p = CountHeader(1).encode()[:4] + b"\x01\x00\x00\x00" + bytes(8) + bytes(PAGE)
    with pytest.raises(StreamError, match="reserved"):
        _decode(hello_bytes() + frame(SectionType.RAM, p, seq=1))


def test_refuses_zero_run_of_no_pages():
    p = CountHeader(1).encode() + (5).to_bytes(8, "little") + (0).to_bytes(8, "little")
    with pytest.raises(StreamError, match="0 pages"):
        _decode(hello_bytes() + frame(SectionType.ZERO, p, seq=1))


def test_refuses_zero_run_past_memory():
    p = CountHeader(1).encode() + (250).to_bytes(8, "little") + (7).to_bytes(8, "little")
    with pytest.raises(StreamError, match="past"):
        _decode(hello_bytes() + frame(SectionType.ZERO, p, seq=1))


def test_refuses_zero_run_overflowing_u64():
    p = CountHeader(1).encode() + (5).to_bytes(8, "little") + (2**64 - 1).to_bytes(8, "little")
    with pytest.raises(StreamError, match="past"):
        _decode(hello_bytes() + frame(SectionType.ZERO, p, seq=1))


def test_refuses_zero_length_not_matching_count():
    p = CountHeader(2).encode() + bytes(16)
    with pytest.raises(StreamError, match="need"):
        _decode(hello_bytes() + frame(SectionType.ZERO, p, seq=1))


def test_refuses_round_throttle_above_100():
    p = RoundRecord(0, 101, 0, 0, 0, 0, 0).encode()
    with pytest.raises(StreamError, match="throttle"):
        _decode(hello_bytes() + frame(SectionType.ROUND, p, seq=1))


def test_refuses_round_wrong_size():
    with pytest.raises(StreamError, match="bad payload"):
        _decode(hello_bytes() + frame(SectionType.ROUND, bytes(40), seq=1))


def test_refuses_device_for_unknown_vf():
    with pytest.raises(StreamError, match="VF 2 is not one"):
        _decode(hello_bytes() + _at(1, Device(2, 2, IMG)))


def test_refuses_device_type_not_announced():
    with pytest.raises(StreamError, match="HELLO said"):
        _decode(hello_bytes() + _at(1, Device(3, 2, IMG)))


def test_refuses_device_image_len_mismatch():
    p = DeviceHeader(1, 2, len(IMG) + 1).encode() + IMG
    with pytest.raises(StreamError, match="image_len"):
        _decode(hello_bytes() + frame(SectionType.DEVICE, p, seq=1))


def test_refuses_device_image_corrupt():
    img = bytearray(IMG)
    img[-1] ^= 1  # its own checksum no longer matches
    p = DeviceHeader(1, 2, len(img)).encode() + bytes(img)
    with pytest.raises(StreamError, match="state image") as ei:
        _decode(hello_bytes() + frame(SectionType.DEVICE, p, seq=1))
    assert ei.value.__cause__ is not None


def test_refuses_device_image_of_another_type():
    img = build_image(1, [])
    p = DeviceHeader(1, 2, len(img)).encode() + img
    with pytest.raises(StreamError, match="image says device type 1"):
        _decode(hello_bytes() + frame(SectionType.DEVICE, p, seq=1))


def test_refuses_complete_with_wrong_counts():
    p = CompleteRecord(5, 0, 999).encode()
    with pytest.raises(StreamError, match="COMPLETE counts"):
        _decode(hello_bytes() + frame(SectionType.COMPLETE, p, seq=1))


def test_refuses_commit_with_payload():
    with pytest.raises(SectionTooLargeError):
        _decode(hello_bytes() + frame(SectionType.COMMIT, b"x", seq=1))


def test_refuses_unknown_error_code():
    with pytest.raises(StreamError, match="unknown error code"):
        _decode(frame(SectionType.ERROR, ErrorHeader(99, 0).encode()), Direction.TO_SOURCE)


def test_refuses_error_text_len_mismatch():
    with pytest.raises(StreamError, match="text_len"):
        _decode(frame(SectionType.ERROR, ErrorHeader(1, 5).encode() + b"abc"), Direction.TO_SOURCE)


def test_refuses_error_text_not_utf8():
    with pytest.raises(StreamError, match="UTF-8"):
        _decode(frame(SectionType.ERROR, ErrorHeader(1, 2).encode() + b"\xc3\x28"), Direction.TO_SOURCE)


def test_refuses_ack_reserved_field():
    p = bytearray(AckRecord(0, 0, 5).encode())
    p[4] = 1
    with pytest.raises(StreamError, match="reserved"):
        _decode(frame(SectionType.ACK, bytes(p)), Direction.TO_SOURCE)


def test_refuses_ready_wrong_size():
    with pytest.raises(StreamError, match="bad payload"):
        _decode(frame(SectionType.READY, bytes(4)), Direction.TO_SOURCE)


def test_decoder_is_dead_after_an_error():
    dec = StreamDecoder()
    with pytest.raises(UnexpectedSectionError):
        dec.feed(frame(0x55, b""))
    with pytest.raises(UnexpectedSectionError):
        dec.feed(hello_bytes())
    with pytest.raises(UnexpectedSectionError):
        dec.finish()
