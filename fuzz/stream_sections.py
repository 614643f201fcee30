"""Migration stream sections into a destination session (``migrate-incoming``).

A :class:`DestSession` over the in-memory VM shell (:class:`MemoryVmShell`,
256 KiB, the default blk and net VFs) receives the bytes in chunks, then the
source's end of stream.  Real streams from a :class:`SourceSession` are the
seeds; the harness can repair each section's CRC-32 and sequence number so
that mutated payloads reach the section decoders and the session's phases
rather than dying at the checksum.

Input: ``flags u8 (bit 0: repair CRCs, bit 1: repair sequence numbers, bit 2:
a file stream), chunk u16 (0: all at once), stream bytes``.

Invariants:
* ``receive`` / ``on_peer_closed`` never raise; after the end of the stream the
  session is final: ``completed``, or ``failed`` with a :class:`MigrationError` --
  or, over a socket after READY went out, ``commit-unknown`` (the source may have
  committed): restored, not running, not aborted, until ``resolve()``; resolving it
  to the source aborts it like a failure.
* The VM runs here only when the session completed; a failed session leaves the
  shell untouched or rolled back (``abort`` called: memory zeroed, no images).
* Completed: every VF announced by HELLO was restored and the CPU state set.
* Over a socket, whatever the destination sends back is a well-formed
  destination-to-source stream.
"""

from __future__ import annotations

import zlib

from fuzzlib import Reader, main

from virtio_lm.errors import MigrationError, WireError
from fakes import MemoryVmShell
from virtio_lm.migration.session import DestSession
from virtio_lm.wire.stream import CRC_SIZE, HEADER_SIZE, Direction, SectionHeader, StreamDecoder

MEM = 256 << 10


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 0.001
        return self.t


def repair(stream: bytes, crc: bool, seq: bool) -> bytes:
    """Each section's CRC-32 (and sequence number) made right; framing and payload kept."""
    out = bytearray()
    off, n = 0, 0
    while len(stream) - off >= HEADER_SIZE:
        try:
            h = SectionHeader.unpack_from(stream, off)
        except WireError:
            break
        end = off + HEADER_SIZE + h.length
        if end + CRC_SIZE > len(stream):
            break
        if seq:
            h = SectionHeader(h.type, h.flags, n, h.length)
        body = h.encode() + stream[off + HEADER_SIZE : end]
        tail = zlib.crc32(body).to_bytes(CRC_SIZE, "little") if crc else stream[end : end + CRC_SIZE]
        out += body + tail
        off, n = end + CRC_SIZE, n + 1
    return bytes(out + stream[off:])


def TestOneInput(data: bytes) -> None:
    r = Reader(data)
    flags, chunk = r.u8(), r.u16()
    stream = r.rest()
    if flags & 3:
        stream = repair(stream, crc=bool(flags & 1), seq=bool(flags & 2))
    from_file = bool(flags & 4)
    shell = MemoryVmShell(MEM)
    s = DestSession(shell, clock=Clock(), from_file=from_file)
    back = bytearray()
    step = chunk or max(1, len(stream))
    for i in range(0, len(stream), step):
        s.receive(stream[i : i + step])
        back += b"".join(bytes(b) for b in s.produce())
    s.on_peer_closed(None)
    back += b"".join(bytes(b) for b in s.produce())

    assert s.finished, s.status
    assert s.status in ("completed", "failed", "commit-unknown"), s.status
    if s.status == "commit-unknown":
        assert not from_file, "a stream file has nobody to be in doubt about"
        assert isinstance(s.error, MigrationError), repr(s.error)
        assert not shell.running and not shell.aborted
        assert set(shell.images) == {v.index for v in s.config.vfs} and shell.cpu is not None  # restored
        assert s.resolve(run="source") == "source" and s.status == "failed"
    if s.status == "completed":
        assert shell.running and not shell.aborted
        assert s.config is not None
        assert set(shell.images) == {v.index for v in s.config.vfs}
        assert shell.cpu is not None
    else:
        assert isinstance(s.error, MigrationError), repr(s.error)
        assert not shell.running
        assert not shell.touched or shell.aborted, "a failed migration left the shell half-written"
        if shell.aborted:
            assert not shell.mem.any() and not shell.images and shell.cpu is None
    if from_file:
        assert not back, "a file stream has no return direction"
    else:
        StreamDecoder(Direction.TO_SOURCE).feed(bytes(back))  # raises if malformed


if __name__ == "__main__":
    main(TestOneInput)
