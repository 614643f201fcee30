"""The migration stream: what the source sends the destination, and back.

Version 1, little-endian, documented byte by byte in ``docs/stream.md``.
Both directions are a sequence of *sections*, each framed and checksummed::

    +0  le16 type       SectionType
    +2  le16 flags      SectionFlags (FINAL: sent after the source stopped the VM)
    +4  le32 seq        0, 1, 2, ... per direction (a lost or repeated section shows)
    +8  le32 length     payload bytes (each type has a maximum)
    +12 u8   payload[length]
    +12+length  le32 crc32   zlib CRC-32 of header and payload

The conversation (socket; a file holds the left column only, up to COMPLETE)::

    source                                             destination
      HELLO  (magic, version, memory, page size, VFs, workload) ──►  check_config
                                              ◄── ACK(seq 0)  or  ERROR(CONFIG_MISMATCH)
      ZERO (runs) / RAM (pages + data) ...  round 0: all memory
      ROUND  (stats of round 0)          ──►
                                              ◄── ACK(seq of ROUND)
      ZERO / RAM ... ROUND                     rounds 1..n: dirty pages
      --- switch-over, stage 1: vCPUs paused ---
      CPU_STATE (opaque)                 ──►  set_cpu_state (meanwhile, at the source:)
      --- stage 2: VFs quiesced, final dirty pages, VFs frozen and saved ---
      DEVICE (vf index, state image) per VF ──►  restore_vfs once all have arrived
      ZERO / RAM [FINAL] ... ROUND [FINAL]
      COMPLETE                           ──►
                                              ◄── READY (restore time)
      COMMIT   (point of no return)      ──►  start: RUN VFs, resume vCPUs, announce
                                              ◄── RUNNING (start time)
      ABORT (code, text): the source gives up before COMMIT (cancel, failure)
                                              ◄── ERROR (code, text): the destination gives up

Decoding is sans-I/O: :class:`StreamDecoder` is fed chunks of any size and
returns the complete :class:`Section` s they finish.  Everything is checked
before use: the header (known type for this direction, flags, a length within
the type's maximum -- refused before any payload is buffered), the CRC, the
sequence number, the payload layout, page numbers within the memory announced
by HELLO, device images for a VF HELLO announced (a seed profile's state image,
``wire.state.decode_image``, or a virtio-1.4 profile's parts image,
``wire.parts.decode_parts_image``).
Errors are :class:`~virtio_lm.errors.StreamError` subclasses naming the section
and its stream offset.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Union

import numpy as np

from virtio_lm.errors import (
    SectionTooLargeError,
    StreamChecksumError,
    StreamError,
    StreamTruncatedError,
    StreamVersionError,
    UnexpectedSectionError,
    WireError,
)
from virtio_lm.wire.codec import layout, read_u32, reserved, u32
from virtio_lm.wire.parts import decode_parts_image, is_parts_image
from virtio_lm.wire.state import decode_image

try:  # the same CRC-32 as zlib's, computed with carry-less multiplies (~20x faster)
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pragma: no cover - zlib-ng is a dependency; zlib gives identical values
    from zlib import crc32

MAGIC = 0x4D4D4C56  # b"VLMM" little-endian
#: 1: the first stream; 2: CPU_STATE's guest state document keeps in-flight chains as
#: rows [head, descs, table, token] and the net workload's received numbers as runs
#: (a destination refuses another version at HELLO, before anything is applied)
VERSION = 2
CRC_SIZE = 4
MAX_RAM_PAGES = 1024  # pages per RAM section
MAX_ZERO_RUNS = 65536  # runs per ZERO section
MAX_VFS = 256
MAX_WORKLOAD_LEN = 255
MAX_TEXT_LEN = 1024
MAX_CPU_STATE = 16 << 20
MAX_DEVICE_IMAGE = 64 << 20  # wire.state.MAX_IMAGE_SIZE


class SectionType(enum.IntEnum):
    # source -> destination
    HELLO = 1
    RAM = 2
    ZERO = 3
    ROUND = 4
    DEVICE = 5
    CPU_STATE = 6
    COMPLETE = 7
    COMMIT = 8
    ABORT = 9
    # destination -> source
    ACK = 0x81
    READY = 0x82
    RUNNING = 0x83
    ERROR = 0x84


TO_DEST = frozenset(t for t in SectionType if t < 0x80)
TO_SOURCE = frozenset(t for t in SectionType if t >= 0x80)


class Direction(enum.Enum):
    TO_DEST = "source->destination"
    TO_SOURCE = "destination->source"


class SectionFlags(enum.IntFlag):
    NONE = 0
    FINAL = 1  # sent during switch-over (the VM is stopped): RAM, ZERO, ROUND


class ErrorCode(enum.IntEnum):
    """Why a side gives up (ERROR from the destination, ABORT from the source)."""

    CONFIG_MISMATCH = 1
    BAD_STREAM = 2
    RESTORE_FAILED = 3
    CANCELLED = 4
    INTERNAL = 5
    NOT_CONVERGING = 6
    PEER_GONE = 7
    VERSION = 8
    START_FAILED = 9


# ------------------------------------------------------------------ fixed layouts
@layout("<HHII")
@dataclass(frozen=True, slots=True)
class SectionHeader:
    type: int
    flags: int = 0  # checked per type against ALLOWED_FLAGS
    seq: int = 0
    length: int = 0


@layout("<IHHQIHH")
@dataclass(frozen=True, slots=True)
class HelloHeader:
    """HELLO payload head (24 bytes); then the workload name, then ``num_vfs`` VfRecords."""

    magic: int
    version: int
    num_vfs: int
    memory_size: int
    page_size: int
    workload_len: int
    reserved: int = reserved()


@layout("<HHIQQQQ")
@dataclass(frozen=True, slots=True)
class VfRecord:
    """One VF of the VM (40 bytes): features as 128-bit values split lo/hi."""

    index: int
    device_id: int
    reserved: int = reserved()
    offered_lo: int = 0
    offered_hi: int = 0
    negotiated_lo: int = 0
    negotiated_hi: int = 0


@layout("<II")
@dataclass(frozen=True, slots=True)
class CountHeader:
    """RAM / ZERO payload head: number of pages / runs that follow."""

    count: int
    reserved: int = reserved()


@layout("<IBxxxQQQQQ")
@dataclass(frozen=True, slots=True)
class RoundRecord:
    """ROUND payload (48 bytes): what the round just ended sent."""

    round: int
    throttle: int  # cpu throttle percentage while the round ran
    pages: int  # pages the round covered (all memory in round 0, the dirty ones later)
    normal: int  # pages sent with data
    zero: int  # pages sent as zero runs
    nbytes: int  # stream bytes of the round's RAM/ZERO sections
    elapsed_us: int


@layout("<HHI")
@dataclass(frozen=True, slots=True)
class DeviceHeader:
    """DEVICE payload head (8 bytes); then ``image_len`` bytes of state image."""

    vf_index: int
    device_id: int
    image_len: int


@layout("<IIQ")
@dataclass(frozen=True, slots=True)
class CompleteRecord:
    """COMPLETE payload (16 bytes): the sections and bytes before it (a consistency check),
    and how long the source's part of the switch-over took before the final send
    (pause, quiesce, final dirty reports, freeze and save, in microseconds; 0 for a file
    stream), so the destination learns the whole fixed cost of a switch-over."""

    sections: int
    source_fixed_us: int = 0
    stream_bytes: int = 0


@layout("<IIQ")
@dataclass(frozen=True, slots=True)
class AckRecord:
    acked_seq: int
    reserved: int = reserved()
    bytes_received: int = 0


@layout("<Q")
@dataclass(frozen=True, slots=True)
class DurationRecord:
    """READY / RUNNING payload: how long the destination took (restore / start), microseconds."""

    micros: int


@layout("<HH")
@dataclass(frozen=True, slots=True)
class ErrorHeader:
    """ERROR / ABORT payload head; then ``text_len`` bytes of UTF-8."""

    code: int
    text_len: int


HEADER_SIZE = SectionHeader.SIZE
OVERHEAD = HEADER_SIZE + CRC_SIZE


# ------------------------------------------------------------------ typed bodies
@dataclass(frozen=True)
class VfConfig:
    index: int
    device_id: int
    offered_features: int
    negotiated_features: int


@dataclass(frozen=True)
class StreamConfig:
    """What the destination must match before anything changes."""

    memory_size: int
    page_size: int = 4096
    vfs: tuple[VfConfig, ...] = ()
    workload: str = ""

    @property
    def num_pages(self) -> int:
        return self.memory_size // self.page_size


@dataclass(frozen=True)
class Hello:
    config: StreamConfig
    version: int = VERSION


@dataclass(frozen=True)
class RamPages:
    pages: np.ndarray  # uint64 page numbers
    data: bytes | memoryview  # len(pages) * page_size bytes, in the same order


@dataclass(frozen=True)
class ZeroRuns:
    runs: np.ndarray  # uint64, shape (n, 2): first page, count

    @property
    def num_pages(self) -> int:
        return int(self.runs[:, 1].sum()) if len(self.runs) else 0

    def page_numbers(self) -> np.ndarray:
        if not len(self.runs):
            return np.zeros(0, dtype=np.uint64)
        return np.concatenate([np.arange(int(f), int(f) + int(c), dtype=np.uint64) for f, c in self.runs])


@dataclass(frozen=True)
class Device:
    vf_index: int
    device_id: int
    image: bytes


@dataclass(frozen=True)
class CpuState:
    data: bytes


@dataclass(frozen=True)
class Commit:
    pass


@dataclass(frozen=True)
class Abort:
    code: ErrorCode
    text: str


@dataclass(frozen=True)
class Ack:
    acked_seq: int
    bytes_received: int


@dataclass(frozen=True)
class Ready:
    restore_us: int


@dataclass(frozen=True)
class Running:
    start_us: int


@dataclass(frozen=True)
class Error:
    code: ErrorCode
    text: str


Body = Union[
    Hello, RamPages, ZeroRuns, RoundRecord, Device, CpuState, CompleteRecord, Commit, Abort,
    Ack, Ready, Running, Error,
]

_TYPE_OF: dict[type, SectionType] = {
    Hello: SectionType.HELLO,
    RamPages: SectionType.RAM,
    ZeroRuns: SectionType.ZERO,
    RoundRecord: SectionType.ROUND,
    Device: SectionType.DEVICE,
    CpuState: SectionType.CPU_STATE,
    CompleteRecord: SectionType.COMPLETE,
    Commit: SectionType.COMMIT,
    Abort: SectionType.ABORT,
    Ack: SectionType.ACK,
    Ready: SectionType.READY,
    Running: SectionType.RUNNING,
    Error: SectionType.ERROR,
}

# Largest payload each type may announce (checked on the header, before buffering).
MAX_PAGE_SIZE = 65536
MAX_PAYLOAD: dict[SectionType, int] = {
    SectionType.HELLO: HelloHeader.SIZE + MAX_WORKLOAD_LEN + MAX_VFS * VfRecord.SIZE,
    SectionType.RAM: CountHeader.SIZE + MAX_RAM_PAGES * (8 + MAX_PAGE_SIZE),
    SectionType.ZERO: CountHeader.SIZE + MAX_ZERO_RUNS * 16,
    SectionType.ROUND: RoundRecord.SIZE,
    SectionType.DEVICE: DeviceHeader.SIZE + MAX_DEVICE_IMAGE,
    SectionType.CPU_STATE: MAX_CPU_STATE,
    SectionType.COMPLETE: CompleteRecord.SIZE,
    SectionType.COMMIT: 0,
    SectionType.ABORT: ErrorHeader.SIZE + MAX_TEXT_LEN,
    SectionType.ACK: AckRecord.SIZE,
    SectionType.READY: DurationRecord.SIZE,
    SectionType.RUNNING: DurationRecord.SIZE,
    SectionType.ERROR: ErrorHeader.SIZE + MAX_TEXT_LEN,
}

# Flags each type may carry.
ALLOWED_FLAGS: dict[SectionType, int] = {t: 0 for t in SectionType}
for _t in (SectionType.RAM, SectionType.ZERO, SectionType.ROUND):
    ALLOWED_FLAGS[_t] = int(SectionFlags.FINAL)


@dataclass(frozen=True)
class Section:
    """One decoded section: its type, flags, sequence number, stream offset and size, body."""

    type: SectionType
    flags: SectionFlags
    seq: int
    offset: int
    size: int  # bytes on the wire, header and CRC included
    body: Body = field(repr=False)

    @property
    def final(self) -> bool:
        return bool(self.flags & SectionFlags.FINAL)


# ------------------------------------------------------------------ encoding
def _split128(v: int) -> tuple[int, int]:
    if not 0 <= v < 1 << 128:
        raise ValueError(f"feature mask {v:#x} does not fit in 128 bits")
    return v & ((1 << 64) - 1), v >> 64


def _text(code: ErrorCode, text: str) -> bytes:
    raw = text.encode("utf-8")[:MAX_TEXT_LEN]
    raw = raw.decode("utf-8", "ignore").encode("utf-8")  # never cut a character in two
    return ErrorHeader(int(code), len(raw)).encode() + raw


def _payload_parts(body: Body) -> list[bytes | memoryview]:
    if isinstance(body, Hello):
        cfg = body.config
        name = cfg.workload.encode("utf-8")
        if len(name) > MAX_WORKLOAD_LEN:
            raise ValueError(f"workload name longer than {MAX_WORKLOAD_LEN} bytes")
        if len(cfg.vfs) > MAX_VFS:
            raise ValueError(f"more than {MAX_VFS} VFs")
        head = HelloHeader(MAGIC, body.version, len(cfg.vfs), cfg.memory_size, cfg.page_size, len(name))
        parts: list[bytes | memoryview] = [head.encode(), name]
        for vf in cfg.vfs:
            olo, ohi = _split128(vf.offered_features)
            nlo, nhi = _split128(vf.negotiated_features)
            parts.append(VfRecord(vf.index, vf.device_id, 0, olo, ohi, nlo, nhi).encode())
        return parts
    if isinstance(body, RamPages):
        pages = np.ascontiguousarray(body.pages, dtype="<u8")
        if not 0 < len(pages) <= MAX_RAM_PAGES:
            raise ValueError(f"a RAM section carries 1..{MAX_RAM_PAGES} pages, not {len(pages)}")
        return [CountHeader(len(pages)).encode(), pages.tobytes(), body.data]
    if isinstance(body, ZeroRuns):
        runs = np.ascontiguousarray(body.runs, dtype="<u8").reshape(-1, 2)
        if not 0 < len(runs) <= MAX_ZERO_RUNS:
            raise ValueError(f"a ZERO section carries 1..{MAX_ZERO_RUNS} runs, not {len(runs)}")
        return [CountHeader(len(runs)).encode(), runs.tobytes()]
    if isinstance(body, (RoundRecord, CompleteRecord)):
        return [body.encode()]
    if isinstance(body, Device):
        return [DeviceHeader(body.vf_index, body.device_id, len(body.image)).encode(), body.image]
    if isinstance(body, CpuState):
        return [body.data]
    if isinstance(body, Commit):
        return []
    if isinstance(body, (Abort, Error)):
        return [_text(body.code, body.text)]
    if isinstance(body, Ack):
        return [AckRecord(body.acked_seq, 0, body.bytes_received).encode()]
    if isinstance(body, Ready):
        return [DurationRecord(body.restore_us).encode()]
    if isinstance(body, Running):
        return [DurationRecord(body.start_us).encode()]
    raise TypeError(f"not a stream section body: {body!r}")


class StreamEncoder:
    """Frames bodies into sections, numbering them; counts the bytes it produced.

    :meth:`encode_parts` returns the section as a list of buffers (header,
    payload parts, CRC) so big page data is never copied into one string;
    :meth:`encode` joins them.
    """

    def __init__(self) -> None:
        self.seq = 0
        self.offset = 0

    def encode_parts(self, body: Body, flags: SectionFlags = SectionFlags.NONE) -> list[bytes | memoryview]:
        stype = _TYPE_OF[type(body)]
        if int(flags) & ~ALLOWED_FLAGS[stype]:
            raise ValueError(f"{stype.name} may not carry flags {flags!r}")
        parts = _payload_parts(body)
        length = sum(len(p) for p in parts)
        if length > MAX_PAYLOAD[stype]:
            raise ValueError(f"{stype.name} payload of {length} bytes exceeds {MAX_PAYLOAD[stype]}")
        head = SectionHeader(int(stype), int(flags), self.seq, length).encode()
        crc = crc32(head)
        for p in parts:
            crc = crc32(p, crc)
        out = [head, *parts, u32(crc)]
        self.seq += 1
        self.offset += OVERHEAD + length
        return out

    def encode(self, body: Body, flags: SectionFlags = SectionFlags.NONE) -> bytes:
        return b"".join(self.encode_parts(body, flags))

    def complete(self, source_fixed_us: int = 0) -> CompleteRecord:
        """The COMPLETE body for the sections produced so far."""
        return CompleteRecord(self.seq, min(max(int(source_fixed_us), 0), 0xFFFFFFFF), self.offset)


def section_size(body: Body) -> int:
    """Bytes a body takes on the wire (header and CRC included)."""
    return OVERHEAD + sum(len(p) for p in _payload_parts(body))


# ------------------------------------------------------------------ decoding
class StreamDecoder:
    """Incremental, sans-I/O decoder for one direction of the stream.

    ``feed(chunk)`` returns the sections the chunk completes (possibly none);
    bytes of a section not yet complete stay buffered.  ``finish()`` says the
    stream ended: bytes of a partial section then raise
    :class:`StreamTruncatedError`.  After an error the decoder is dead (every
    further call raises the same error): a stream is not resynchronised.

    For the source->destination direction the first section must be HELLO
    (its page size and memory size then bound RAM and ZERO sections).
    """

    def __init__(
        self,
        direction: Direction = Direction.TO_DEST,
        *,
        config: StreamConfig | None = None,
        reuse_buffers: bool = False,
    ) -> None:
        self.direction = direction
        self.allowed = TO_DEST if direction is Direction.TO_DEST else TO_SOURCE
        self.config = config
        self.reuse_buffers = reuse_buffers
        self.offset = 0  # stream offset of the first byte of the section being assembled
        self.seq = 0  # sequence number expected next
        self._hb = bytearray(HEADER_SIZE)  # the header while fewer than HEADER_SIZE bytes are known
        self._hfill = 0
        self._sec: memoryview | None = None  # the section being assembled (header known)
        self._fill = 0
        self._spare: bytearray | None = None  # reuse_buffers: the buffer sections are assembled in
        self._hdr: SectionHeader | None = None
        self._error: StreamError | None = None

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole section."""
        return self._fill if self._sec is not None else self._hfill

    @property
    def bytes_fed(self) -> int:
        return self.offset + self.pending

    def feed(self, data: bytes | bytearray | memoryview) -> list[Section]:
        """Take ``data``; return the sections it completes.  Each section is assembled
        in a buffer of its own, so a body's memoryviews stay valid (with
        ``reuse_buffers``, until a later call assembles the next section)."""
        if self._error is not None:
            raise self._error
        mv = memoryview(data).cast("B")
        out: list[Section] = []
        i, n = 0, len(mv)
        while i < n:
            buf = self.recv_buffer()
            k = min(len(buf), n - i)
            buf[:k] = mv[i : i + k]
            i += k
            done = self.received(k)
            if done:
                out += done
                self._spare = None  # the sections of one call keep buffers of their own
        return out

    def recv_buffer(self) -> memoryview:
        """Where the next bytes of the stream go, for a zero-copy receive
        (``sock.recv_into(dec.recv_buffer())``): the rest of the header being read,
        else the rest of the section being assembled.  Write up to ``len()`` bytes
        into it, then call :meth:`received` with the number written."""
        if self._error is not None:
            raise self._error
        if self._sec is None:
            return memoryview(self._hb)[self._hfill :]
        return self._sec[self._fill :]

    def received(self, n: int) -> list[Section]:
        """``n`` bytes were written at the start of the last :meth:`recv_buffer`;
        returns the section they complete (at most one).  With ``reuse_buffers``
        its body's memoryviews are valid until the next :meth:`recv_buffer`
        (the next section is assembled in the same buffer)."""
        if self._error is not None:
            raise self._error
        if n <= 0:
            return []
        try:
            if self._sec is None:
                if n > HEADER_SIZE - self._hfill:
                    raise ValueError("received() more bytes than recv_buffer() had room for")
                self._hfill += n
                if self._hfill < HEADER_SIZE:
                    return []
                hdr = self._check_header(self.offset)
                self._hdr = hdr
                self._sec = self._section_buffer(OVERHEAD + hdr.length)
                self._sec[:HEADER_SIZE] = self._hb
                self._fill = HEADER_SIZE
                self._hfill = 0
                return []
            if n > len(self._sec) - self._fill:
                raise ValueError("received() more bytes than recv_buffer() had room for")
            self._fill += n
            if self._fill == len(self._sec):
                return [self._finish_section()]
            return []
        except StreamError as exc:
            self._error = exc
            raise

    def _section_buffer(self, size: int) -> memoryview:
        if not self.reuse_buffers:
            return memoryview(bytearray(size))
        if self._spare is None or len(self._spare) < size:
            # a new buffer (views of the old one may still be alive: never resize it)
            self._spare = bytearray(max(size, 64 << 10))
        return memoryview(self._spare)[:size]

    def finish(self) -> None:
        """The stream ended here; refuse a partial section."""
        if self._error is not None:
            raise self._error
        if self.pending:
            name = None
            if self._hdr is not None and self._sec is not None:
                name = SectionType(self._hdr.type).name
            self._error = StreamTruncatedError(
                f"stream ended {self.pending} bytes into a section", section=name, offset=self.offset
            )
            raise self._error

    def _finish_section(self) -> Section:
        sec, hdr = self._sec, self._hdr
        assert sec is not None and hdr is not None
        off = self.offset
        stype = SectionType(hdr.type)
        end = HEADER_SIZE + hdr.length
        mv = memoryview(sec)
        crc_stored = read_u32(mv, end)
        crc = crc32(mv[:end])
        if crc != crc_stored:
            raise StreamChecksumError(
                f"CRC-32 {crc_stored:#010x} stored, {crc:#010x} computed", section=stype.name, offset=off
            )
        body = self._decode_body(stype, mv[HEADER_SIZE:end], off)
        self._sec = None
        self._hdr = None
        self._fill = 0
        self.offset += len(sec)
        self.seq += 1
        return Section(stype, SectionFlags(hdr.flags), hdr.seq, off, len(sec), body)

    def _check_header(self, off: int) -> SectionHeader:
        hdr = SectionHeader.unpack_from(self._hb, 0)
        try:
            stype = SectionType(hdr.type)
        except ValueError:
            raise UnexpectedSectionError(f"unknown section type {hdr.type:#06x}", offset=off) from None
        if stype not in self.allowed:
            raise UnexpectedSectionError(
                f"{stype.name} does not travel {self.direction.value}", section=stype.name, offset=off
            )
        if self.direction is Direction.TO_DEST and self.config is None and stype is not SectionType.HELLO:
            raise UnexpectedSectionError("the stream must begin with HELLO", section=stype.name, offset=off)
        if stype is SectionType.HELLO and self.config is not None:
            raise UnexpectedSectionError("a second HELLO", section=stype.name, offset=off)
        if hdr.flags & ~ALLOWED_FLAGS[stype]:
            raise UnexpectedSectionError(
                f"flags {hdr.flags:#x} not allowed on {stype.name}", section=stype.name, offset=off
            )
        if hdr.length > MAX_PAYLOAD[stype]:
            raise SectionTooLargeError(
                f"length {hdr.length} above the maximum {MAX_PAYLOAD[stype]} of {stype.name}",
                section=stype.name, offset=off,
            )
        if hdr.seq != self.seq:
            raise UnexpectedSectionError(
                f"sequence number {hdr.seq}, expected {self.seq}", section=stype.name, offset=off
            )
        return hdr

    # -------------------------------------------------------------- bodies
    def _decode_body(self, stype: SectionType, p: memoryview, off: int) -> Body:
        name = stype.name
        try:
            if stype is SectionType.HELLO:
                hello = _decode_hello(p, off)
                self.config = hello.config
                return hello
            if stype is SectionType.RAM:
                return self._decode_ram(p, off)
            if stype is SectionType.ZERO:
                return self._decode_zero(p, off)
            if stype is SectionType.ROUND:
                rec = RoundRecord.decode(p)
                if rec.throttle > 100:
                    raise StreamError(f"throttle {rec.throttle} % above 100", section=name, offset=off)
                return rec
            if stype is SectionType.DEVICE:
                return self._decode_device(p, off)
            if stype is SectionType.CPU_STATE:
                return CpuState(bytes(p))
            if stype is SectionType.COMPLETE:
                rec = CompleteRecord.decode(p)
                if rec.sections != self.seq or rec.stream_bytes != off:
                    raise StreamError(
                        f"COMPLETE counts {rec.sections} sections / {rec.stream_bytes} bytes before it, "
                        f"the stream had {self.seq} / {off}",
                        section=name, offset=off,
                    )
                return rec
            if stype is SectionType.COMMIT:
                return Commit()
            if stype in (SectionType.ABORT, SectionType.ERROR):
                code, text = _decode_text(p, name, off)
                return Abort(code, text) if stype is SectionType.ABORT else Error(code, text)
            if stype is SectionType.ACK:
                rec = AckRecord.decode(p)
                return Ack(rec.acked_seq, rec.bytes_received)
            if stype is SectionType.READY:
                return Ready(DurationRecord.decode(p).micros)
            if stype is SectionType.RUNNING:
                return Running(DurationRecord.decode(p).micros)
        except WireError as exc:
            raise StreamError(f"bad payload: {exc}", section=name, offset=off) from exc
        raise AssertionError(stype)  # pragma: no cover - every type handled above

    def _decode_ram(self, p: bytes, off: int) -> RamPages:
        cfg = self.config
        assert cfg is not None
        head = CountHeader.unpack_from(p, 0)
        n = head.count
        if not 0 < n <= MAX_RAM_PAGES:
            raise StreamError(f"{n} pages, must be 1..{MAX_RAM_PAGES}", section="RAM", offset=off)
        want = CountHeader.SIZE + n * (8 + cfg.page_size)
        if len(p) != want:
            raise StreamError(
                f"{n} pages of {cfg.page_size} bytes need {want} payload bytes, got {len(p)}",
                section="RAM", offset=off,
            )
        pages = np.frombuffer(p, dtype="<u8", count=n, offset=CountHeader.SIZE).astype(np.uint64)
        if int(pages.max()) >= cfg.num_pages:
            raise StreamError(
                f"page {int(pages.max())} outside the {cfg.num_pages} pages of memory", section="RAM", offset=off
            )
        data = p[CountHeader.SIZE + 8 * n :]  # a view into this section's own buffer
        return RamPages(pages, data)

    def _decode_zero(self, p: bytes, off: int) -> ZeroRuns:
        cfg = self.config
        assert cfg is not None
        head = CountHeader.unpack_from(p, 0)
        n = head.count
        if not 0 < n <= MAX_ZERO_RUNS:
            raise StreamError(f"{n} runs, must be 1..{MAX_ZERO_RUNS}", section="ZERO", offset=off)
        if len(p) != CountHeader.SIZE + 16 * n:
            raise StreamError(
                f"{n} runs need {CountHeader.SIZE + 16 * n} payload bytes, got {len(p)}", section="ZERO", offset=off
            )
        runs = np.frombuffer(p, dtype="<u8", count=2 * n, offset=CountHeader.SIZE).astype(np.uint64).reshape(n, 2)
        first, count = runs[:, 0], runs[:, 1]
        if not count.all():
            raise StreamError("a zero run of 0 pages", section="ZERO", offset=off)
        # first + count <= num_pages, written so it cannot overflow
        if (first >= cfg.num_pages).any() or (count > cfg.num_pages - first).any():
            raise StreamError(
                f"a zero run reaches past the {cfg.num_pages} pages of memory", section="ZERO", offset=off
            )
        return ZeroRuns(runs)

    def _decode_device(self, p: bytes, off: int) -> Device:
        cfg = self.config
        assert cfg is not None
        head = DeviceHeader.unpack_from(p, 0)
        if head.image_len != len(p) - DeviceHeader.SIZE:
            raise StreamError(
                f"image_len {head.image_len}, but {len(p) - DeviceHeader.SIZE} bytes follow",
                section="DEVICE", offset=off,
            )
        vf = {v.index: v for v in cfg.vfs}.get(head.vf_index)
        if vf is None:
            raise StreamError(f"VF {head.vf_index} is not one HELLO announced", section="DEVICE", offset=off)
        if head.device_id != vf.device_id:
            raise StreamError(
                f"VF {head.vf_index} image of device type {head.device_id}, HELLO said {vf.device_id}",
                section="DEVICE", offset=off,
            )
        image = bytes(p[DeviceHeader.SIZE :])
        try:  # the seed profile's state image, or the virtio-1.4 profile's device parts
            img_device_id = decode_parts_image(image)[0] if is_parts_image(image) else decode_image(image).device_id
        except WireError as exc:
            raise StreamError(f"VF {head.vf_index} state image: {exc}", section="DEVICE", offset=off) from exc
        if img_device_id != head.device_id:
            raise StreamError(
                f"VF {head.vf_index} image says device type {img_device_id}, header {head.device_id}",
                section="DEVICE", offset=off,
            )
        return Device(head.vf_index, head.device_id, image)


def _decode_hello(p: memoryview, off: int) -> Hello:
    if len(p) >= 6:
        magic = read_u32(p, 0)
        if magic != MAGIC:
            raise StreamVersionError(f"magic {magic:#010x}, not a virtio-lm stream", section="HELLO", offset=off)
        version = p[4] | p[5] << 8
        if version != VERSION:
            raise StreamVersionError(
                f"stream version {version}, this side knows {VERSION}", section="HELLO", offset=off
            )
    head = HelloHeader.unpack_from(p, 0)
    if head.page_size < 512 or head.page_size > MAX_PAGE_SIZE or head.page_size & (head.page_size - 1):
        raise StreamError(f"page size {head.page_size} is not a power of two in 512..65536", section="HELLO", offset=off)
    if head.memory_size == 0 or head.memory_size % head.page_size:
        raise StreamError(
            f"memory size {head.memory_size} is not a positive multiple of the page size", section="HELLO", offset=off
        )
    if head.workload_len > MAX_WORKLOAD_LEN or head.num_vfs > MAX_VFS:
        raise StreamError("workload name or VF count above the maximum", section="HELLO", offset=off)
    want = HelloHeader.SIZE + head.workload_len + head.num_vfs * VfRecord.SIZE
    if len(p) != want:
        raise StreamError(f"HELLO needs {want} payload bytes, got {len(p)}", section="HELLO", offset=off)
    pos = HelloHeader.SIZE
    try:
        workload = bytes(p[pos : pos + head.workload_len]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StreamError("workload name is not UTF-8", section="HELLO", offset=off) from exc
    pos += head.workload_len
    vfs = []
    seen = set()
    for _ in range(head.num_vfs):
        r = VfRecord.unpack_from(p, pos)
        pos += VfRecord.SIZE
        if r.index in seen:
            raise StreamError(f"VF {r.index} announced twice", section="HELLO", offset=off)
        seen.add(r.index)
        vfs.append(VfConfig(r.index, r.device_id, r.offered_lo | r.offered_hi << 64, r.negotiated_lo | r.negotiated_hi << 64))
    return Hello(StreamConfig(head.memory_size, head.page_size, tuple(vfs), workload), head.version)


def _decode_text(p: memoryview, name: str, off: int) -> tuple[ErrorCode, str]:
    head = ErrorHeader.unpack_from(p, 0)
    try:
        code = ErrorCode(head.code)
    except ValueError:
        raise StreamError(f"unknown error code {head.code}", section=name, offset=off) from None
    if head.text_len != len(p) - ErrorHeader.SIZE:
        raise StreamError(
            f"text_len {head.text_len}, but {len(p) - ErrorHeader.SIZE} bytes follow", section=name, offset=off
        )
    try:
        text = bytes(p[ErrorHeader.SIZE :]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StreamError("text is not UTF-8", section=name, offset=off) from exc
    return code, text


def decode_all(data: bytes | bytearray | memoryview, direction: Direction = Direction.TO_DEST) -> list[Section]:
    """Decode a whole stream held in memory (truncation raises)."""
    dec = StreamDecoder(direction)
    out = dec.feed(data)
    dec.finish()
    return out


def zero_runs(pages: np.ndarray) -> np.ndarray:
    """Sorted page numbers -> runs of consecutive pages, shape (n, 2): first, count."""
    pages = np.asarray(pages, dtype=np.uint64)
    if not len(pages):
        return np.zeros((0, 2), dtype=np.uint64)
    breaks = np.flatnonzero(np.diff(pages.astype(np.int64)) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(pages)]))
    return np.stack([pages[starts], (ends - starts).astype(np.uint64)], axis=1)
