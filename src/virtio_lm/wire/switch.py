"""The embedded switch's datagrams (:mod:`virtio_lm.net.switch`): one message per UDP datagram.

::

    u8 kind   0 FRAME   an Ethernet frame follows (ETH_HLEN..MAX_FRAME bytes)
              1 HELLO   attach the sending endpoint as a port; an optional u8 of
                        capabilities follows (bit 0, BATCHES: send it FRAMES too)
              2 BYE     detach it
              3 FRAMES  several frames, in order: records of
                          le16 length (ETH_HLEN..MAX_FRAME), the frame
                        at least one record, nothing after the last

A FRAMES datagram is how a port sends a burst in one system call; the switch
forwards each of its frames by the same rules as a FRAME, and sends FRAMES only
to a port whose HELLO said BATCHES (to any other, one FRAME per frame).
:func:`pack_frames` cuts a burst into as few datagrams as fit
:data:`MAX_DATAGRAM`; :func:`decode_frames` refuses a FRAMES body that is empty,
truncated, carries a frame shorter than an Ethernet header or has bytes after
its last record (:class:`~virtio_lm.errors.WireError`), so a receiver takes all
of a datagram's frames or none.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from virtio_lm.errors import FieldValueError, ShortBufferError
from virtio_lm.wire.codec import read_u16, u16
from virtio_lm.wire.net import ETH_HLEN

__all__ = [
    "CAP_BATCHES",
    "KIND_BYE",
    "KIND_FRAME",
    "KIND_FRAMES",
    "KIND_HELLO",
    "MAX_DATAGRAM",
    "MAX_FRAME",
    "decode_frames",
    "frames_array",
    "frame_message",
    "hello_message",
    "pack_frames",
]

KIND_FRAME = 0
KIND_HELLO = 1
KIND_BYE = 2
KIND_FRAMES = 3
CAP_BATCHES = 0x01
MAX_DATAGRAM = 65507  # the largest UDP payload over IPv4
MAX_FRAME = 65535 - 64  # one UDP datagram on loopback, with room for the kind byte
RECORD_HDR = 2
_KIND_FRAMES = bytes((KIND_FRAMES,))


def frame_message(frame: bytes | bytearray | memoryview) -> bytes:
    """A FRAME datagram."""
    return bytes((KIND_FRAME,)) + bytes(frame)


def hello_message(caps: int = 0) -> bytes:
    """A HELLO datagram (with the capabilities byte when ``caps`` is not 0)."""
    if not 0 <= caps <= 0xFF:
        raise FieldValueError("switch.hello", "caps", caps, "a u8")
    return bytes((KIND_HELLO, caps)) if caps else bytes((KIND_HELLO,))


def hello_caps(data: bytes | bytearray | memoryview) -> int:
    """The capabilities of a HELLO datagram (0 when it has no capabilities byte; bits beyond the
    known ones are ignored, for ports newer than this switch)."""
    return data[1] & CAP_BATCHES if len(data) > 1 else 0


def pack_frames(frames: Sequence[bytes | bytearray | memoryview], limit: int = MAX_DATAGRAM) -> list[bytes]:
    """``frames`` (in order) as datagrams of at most ``limit`` bytes: a FRAMES datagram per run of
    frames that fits, a FRAME datagram where a run is one frame.  A frame outside
    ETH_HLEN..MAX_FRAME, or one that fits no datagram of ``limit``, is refused (FieldValueError)
    before anything is packed."""
    for i, f in enumerate(frames):
        n = len(f)
        if not ETH_HLEN <= n <= MAX_FRAME or 1 + RECORD_HDR + n > limit and 1 + n > limit:
            raise FieldValueError("switch.frames", f"frame[{i}]", n, f"{ETH_HLEN}..{MAX_FRAME} bytes, in {limit}")
    out: list[bytes] = []
    run: list[bytes | bytearray | memoryview] = []
    size = 1

    def flush() -> None:
        if len(run) == 1:
            out.append(frame_message(run[0]))
        elif run:
            out.append(_KIND_FRAMES + b"".join(_records(run)))

    for f in frames:
        need = RECORD_HDR + len(f)
        if run and size + need > limit:
            flush()
            run, size = [], 1
        run.append(f)
        size += need
    flush()
    return out


def _records(frames: Iterable[bytes | bytearray | memoryview]) -> Iterable[bytes]:
    for f in frames:
        yield u16(len(f))
        yield bytes(f)


def decode_frames(body: bytes | bytearray | memoryview) -> list[bytes]:
    """The frames of a FRAMES datagram's body (the bytes after the kind byte)."""
    mv = memoryview(body)
    n = len(mv)
    if n == 0:
        raise FieldValueError("switch.frames", None, 0, "at least one record")
    out: list[bytes] = []
    pos = 0
    while pos < n:
        if n - pos < RECORD_HDR:
            raise ShortBufferError("switch.frames", f"record[{len(out)}].length", RECORD_HDR, n - pos)
        length = read_u16(mv, pos)
        pos += RECORD_HDR
        if length < ETH_HLEN:
            raise FieldValueError("switch.frames", f"record[{len(out)}].length", length, f"at least {ETH_HLEN}")
        if n - pos < length:
            raise ShortBufferError("switch.frames", f"record[{len(out)}].frame", length, n - pos)
        out.append(bytes(mv[pos : pos + length]))
        pos += length
    return out


def frames_array(body: bytes | bytearray | memoryview, size: int) -> np.ndarray | None:
    """A FRAMES body whose records all carry ``size``-byte frames, as an ``(n, size)`` uint8 array
    (a view of ``body``: a burst decoded in one step); ``None`` when it is not one (other lengths,
    or not whole records -- :func:`decode_frames` then decodes or refuses it)."""
    stride = RECORD_HDR + size
    n = len(body)
    if size < ETH_HLEN or n == 0 or n % stride:
        return None
    rec = np.frombuffer(body, dtype=np.uint8).reshape(-1, stride)
    lengths = rec[:, :RECORD_HDR].copy().view("<u2").ravel()
    if not (lengths == size).all():
        return None
    return rec[:, RECORD_HDR:]
