"""vhost-user framing, sans-I/O: bytes and fds in, :class:`Message` objects out.

:class:`MessageReader` is fed whatever the socket gave (``feed(data, fds)``)
and yields complete messages.  File descriptors received with a chunk belong
to the message whose bytes that chunk starts (QEMU sends a message's fds with
its first byte).  The reader checks what can be checked before the payload is
in: the version, unknown flag bits, the REPLY bit (a front-end never sends
one) and ``size <= MAX_PAYLOAD`` -- so a header claiming a huge payload is
refused at once, not waited for.  :meth:`MessageReader.eof` refuses a stream
that ends inside a header or a payload.

Payload shapes per request are in :data:`PAYLOAD_RULES` (data, tested over
every request): the exact size (or a size rule) and how many fds may come
with it.  :func:`check_shape` applies them.  Every refusal is a
:class:`~virtio_lm.errors.VhostMessageError`; fds of a refused message are
closed by whoever holds them (:meth:`Message.close_fds`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

from virtio_lm.errors import VhostMessageError, WireError
from virtio_lm.wire.vhost_user import (
    HEADER_FLAG_MASK,
    MAX_PAYLOAD,
    MEM_TABLE_MAX_REGIONS,
    VERSION,
    Header,
    HeaderFlags,
    Inflight,
    LogBase,
    Request,
    SingleRegion,
    VringAddr,
    VringState,
    decode_config,
    decode_mem_table,
)

__all__ = ["PAYLOAD_RULES", "Message", "MessageReader", "PayloadRule", "check_shape", "encode_reply"]

HEADER_SIZE = Header.SIZE  # type: ignore[attr-defined]


class CarriesFds:
    """What a protocol message that came with SCM_RIGHTS fds does with them: it owns
    ``self.fds`` until they are taken, and closes those it still owns.  (The vhost-user and
    vfio-user messages both.)"""

    fds: list[int]

    def take_fds(self) -> list[int]:
        """Hand the fds over (the message no longer closes them)."""
        fds, self.fds = self.fds, []
        return fds

    def close_fds(self) -> None:
        for fd in self.take_fds():
            try:
                os.close(fd)
            except OSError:
                pass


@dataclass
class Message(CarriesFds):
    """One front-end message: header, payload bytes, the fds that came with it."""

    header: Header
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def request(self) -> int:
        return self.header.request

    @property
    def name(self) -> str:
        try:
            return Request(self.header.request).name
        except ValueError:
            return f"request {self.header.request}"

def check_header(h: Header) -> None:
    if h.version != VERSION:
        raise VhostMessageError(f"request {h.request}: version {h.version}, only {VERSION} is spoken")
    if h.flags & ~HEADER_FLAG_MASK:
        raise VhostMessageError(f"request {h.request}: unknown flag bits {h.flags & ~HEADER_FLAG_MASK:#x}")
    if h.flags & HeaderFlags.REPLY:
        raise VhostMessageError(f"request {h.request}: the REPLY flag on a front-end message")
    if h.size > MAX_PAYLOAD:
        raise VhostMessageError(f"request {h.request}: payload size {h.size} > {MAX_PAYLOAD}")


class MessageReader:
    """Incremental decoder (see the module docstring)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._header: Header | None = None
        self._fds: list[int] = []

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)

    def want(self) -> int:
        """How many more bytes complete the header or the current message (for exact reads)."""
        if self._header is None:
            return HEADER_SIZE - len(self._buf)
        return self._header.size - len(self._buf)

    def feed(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> list[Message]:
        """Add bytes (and the fds that came with them); return every message completed."""
        self._fds.extend(fds)
        self._buf += data
        out: list[Message] = []
        while True:
            if self._header is None:
                if len(self._buf) < HEADER_SIZE:
                    break
                h = Header.decode(bytes(self._buf[:HEADER_SIZE]))  # type: ignore[attr-defined]
                del self._buf[:HEADER_SIZE]
                try:
                    check_header(h)
                except VhostMessageError:
                    for m in out:  # completed in this call, but the caller never gets them
                        m.close_fds()
                    self.close()
                    raise
                self._header = h
            h = self._header
            if len(self._buf) < h.size:
                break
            payload = bytes(self._buf[: h.size])
            del self._buf[: h.size]
            out.append(Message(h, payload, self._fds))
            self._fds = []
            self._header = None
        return out

    def eof(self) -> None:
        """The peer closed: refuse a message cut short."""
        if self._header is None and self._buf:
            n = len(self._buf)
            self.close()
            raise VhostMessageError(f"connection closed inside a header ({n} of {HEADER_SIZE} bytes)")
        if self._header is not None:
            h, n = self._header, len(self._buf)
            self.close()
            raise VhostMessageError(
                f"connection closed inside the payload of request {h.request} ({n} of {h.size} bytes)"
            )
        self.close()

    def close(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []
        self._buf.clear()
        self._header = None


# ---------------------------------------------------------------------------- payload rules
@dataclass(frozen=True)
class PayloadRule:
    """``size``: an exact payload size, or a callable refusing a wrong payload
    (raises WireError / VhostMessageError); ``fds``: allowed fd counts."""

    size: int | Callable[[bytes], None]
    fds: tuple[int, ...] = (0,)


def _mem_table_shape(p: bytes) -> None:
    decode_mem_table(p)


def _config_shape(p: bytes) -> None:
    decode_config(p)


U64 = 8
#: request -> payload rule.  Requests not listed are refused as unknown.
PAYLOAD_RULES: dict[Request, PayloadRule] = {
    Request.GET_FEATURES: PayloadRule(0),
    Request.SET_FEATURES: PayloadRule(U64),
    Request.SET_OWNER: PayloadRule(0),
    Request.RESET_OWNER: PayloadRule(0),
    Request.SET_MEM_TABLE: PayloadRule(_mem_table_shape, tuple(range(1, MEM_TABLE_MAX_REGIONS + 1))),
    Request.SET_LOG_BASE: PayloadRule(LogBase.SIZE, (1,)),  # type: ignore[attr-defined]
    Request.SET_VRING_NUM: PayloadRule(VringState.SIZE),  # type: ignore[attr-defined]
    Request.SET_VRING_ADDR: PayloadRule(VringAddr.SIZE),  # type: ignore[attr-defined]
    Request.SET_VRING_BASE: PayloadRule(VringState.SIZE),  # type: ignore[attr-defined]
    Request.GET_VRING_BASE: PayloadRule(VringState.SIZE),  # type: ignore[attr-defined]
    Request.SET_VRING_KICK: PayloadRule(U64, (0, 1)),
    Request.SET_VRING_CALL: PayloadRule(U64, (0, 1)),
    Request.SET_VRING_ERR: PayloadRule(U64, (0, 1)),
    Request.GET_PROTOCOL_FEATURES: PayloadRule(0),
    Request.SET_PROTOCOL_FEATURES: PayloadRule(U64),
    Request.GET_QUEUE_NUM: PayloadRule(0),
    Request.SET_VRING_ENABLE: PayloadRule(VringState.SIZE),  # type: ignore[attr-defined]
    Request.SEND_RARP: PayloadRule(U64),
    Request.GET_INFLIGHT_FD: PayloadRule(Inflight.SIZE),  # type: ignore[attr-defined]
    Request.SET_INFLIGHT_FD: PayloadRule(Inflight.SIZE, (1,)),  # type: ignore[attr-defined]
    Request.GET_CONFIG: PayloadRule(_config_shape),
    Request.SET_CONFIG: PayloadRule(_config_shape),
    Request.RESET_DEVICE: PayloadRule(0),
    Request.GET_MAX_MEM_SLOTS: PayloadRule(0),
    Request.ADD_MEM_REG: PayloadRule(SingleRegion.SIZE, (1,)),
    Request.REM_MEM_REG: PayloadRule(SingleRegion.SIZE, (0, 1)),
}


def check_shape(msg: Message) -> Request:
    """The message's request, if known and its payload and fd count fit the rule."""
    try:
        req = Request(msg.request)
    except ValueError:
        raise VhostMessageError(f"unknown request code {msg.request}") from None
    rule = PAYLOAD_RULES.get(req)
    if rule is None:
        raise VhostMessageError(f"{req.name} is not supported by this back-end")
    if isinstance(rule.size, int):
        if len(msg.payload) != rule.size:
            raise VhostMessageError(f"{req.name}: payload of {len(msg.payload)} bytes, expected {rule.size}")
    else:
        try:
            rule.size(msg.payload)
        except WireError as exc:
            raise VhostMessageError(f"{req.name}: {exc}") from exc
    if len(msg.fds) not in rule.fds:
        raise VhostMessageError(f"{req.name}: {len(msg.fds)} fds, expected {' or '.join(map(str, rule.fds))}")
    return req


def encode_reply(request: int, payload: bytes) -> bytes:
    """A back-end reply: header with version 1 and REPLY, then the payload."""
    return Header(request, VERSION | HeaderFlags.REPLY, len(payload)).encode() + payload  # type: ignore[attr-defined]

