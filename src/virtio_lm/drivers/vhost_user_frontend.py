"""A vhost-user front-end: what QEMU does for a vhost-user device before and while a guest
driver runs, without a guest.

A bench or a test drives a back-end *process* -- ours (``virtio-lm vhost-user-blk``) or another
one, such as ``qemu-storage-daemon`` -- over its UNIX socket exactly as QEMU would, with guest
memory a memfd :class:`~virtio_lm.memory.Memory` both sides map.  The same front-end against two
back-ends measures the back-ends alone: no emulated CPU in between.

The conversation (QEMU's order; ``*`` marks messages sent with NEED_REPLY when REPLY_ACK is
negotiated, so a refusal is seen at the message that caused it)::

    front-end                                   back-end
    GET_FEATURES               ------------->
                               <-------------   offered features
    GET_PROTOCOL_FEATURES      ------------->   (when VHOST_USER_F_PROTOCOL_FEATURES is offered)
                               <-------------   offered protocol features
    SET_PROTOCOL_FEATURES *    ------------->
    SET_OWNER *                ------------->
    GET_CONFIG                 ------------->   (when CONFIG is negotiated)
                               <-------------   config space bytes
    SET_FEATURES *             ------------->   wanted & offered
    SET_MEM_TABLE * + memfd    ------------->   one region: guest physical 0 at USER_BASE
    for each ring:
      SET_VRING_NUM *, SET_VRING_BASE *, SET_VRING_ADDR *,
      SET_VRING_KICK * + eventfd, SET_VRING_CALL * + eventfd, SET_VRING_ENABLE *
    ... kicks (eventfd writes) and calls (eventfd reads) ...
    GET_VRING_BASE             ------------->   per ring, at close: the back-end stops it
                               <-------------   its next avail index

Errors: a back-end that closes the socket, answers with a header the request does not expect,
or refuses a message (a non-zero REPLY_ACK) raises :class:`~virtio_lm.errors.DriverError`; a
reply or a call that does not come within the timeout raises
:class:`~virtio_lm.errors.CommandTimeoutError`.  Both keep the cause.
"""

from __future__ import annotations

import os
import select
import socket
import time
from dataclasses import dataclass

from virtio_lm.errors import CommandTimeoutError, DriverError, WireError
from virtio_lm.memory import Memory
from virtio_lm.virtqueue.driver import DriverQueue
from virtio_lm.wire.codec import u64
from virtio_lm.wire.features import Feature
from virtio_lm.wire.vhost_user import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    Header,
    HeaderFlags,
    MemRegion,
    ProtocolFeature,
    Request,
    VringAddr,
    VringState,
    decode_config,
    decode_u64,
    encode_config,
    encode_mem_table,
)

__all__ = ["USER_BASE", "Ring", "VhostUserFrontend"]

#: where the front-end says guest physical address 0 sits in its address space (any value the
#: back-end can translate; it never dereferences it)
USER_BASE = 0x7E00_0000_0000
#: the protocol features this front-end uses when offered
WANTED_PROTOCOL = (1 << ProtocolFeature.REPLY_ACK) | (1 << ProtocolFeature.CONFIG)


@dataclass
class Ring:
    """One started ring: the driver queue in guest memory and its two eventfds."""

    index: int
    queue: DriverQueue
    kick_fd: int
    call_fd: int


class VhostUserFrontend:
    """One connection to a vhost-user back-end; ``memory`` (memfd-backed) is the guest RAM."""

    def __init__(self, path: str, memory: Memory, *, timeout: float = 10.0) -> None:
        if memory.fd is None:
            raise DriverError("a vhost-user front-end needs memory a back-end can map (backing='memfd')")
        self.path = path
        self.memory = memory
        self.timeout = timeout
        self.features = 0
        self.protocol_features = 0
        self.rings: dict[int, Ring] = {}
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + timeout
        while True:  # the back-end may still be setting up its socket
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if time.monotonic() > deadline:
                    self.sock.close()
                    raise CommandTimeoutError(f"vhost-user back-end on {path}: not listening after {timeout} s") from exc
                time.sleep(0.02)
        self.sock.settimeout(timeout)

    # ------------------------------------------------------------------ messages
    def _recv_exact(self, n: int, what: str) -> bytes:
        out = bytearray()
        while len(out) < n:
            try:
                chunk = self.sock.recv(n - len(out))
            except TimeoutError as exc:
                raise CommandTimeoutError(f"vhost-user {what}: no reply within {self.timeout} s") from exc
            except OSError as exc:
                raise DriverError(f"vhost-user {what}: {exc}") from exc
            if not chunk:
                raise DriverError(f"vhost-user {what}: the back-end closed the connection")
            out += chunk
        return bytes(out)

    def call(self, req: Request, payload: bytes = b"", fds: tuple[int, ...] = (), *, reply: bool = False) -> bytes | None:
        """Send one message; return the reply's payload when the request has one (``reply``).
        With REPLY_ACK negotiated every other message asks for an ack, and a non-zero ack
        raises :class:`DriverError`."""
        ack = not reply and bool(self.protocol_features & (1 << ProtocolFeature.REPLY_ACK))
        flags = int(HeaderFlags.VERSION_1) | (int(HeaderFlags.NEED_REPLY) if ack else 0)
        data = Header(int(req), flags, len(payload)).encode() + payload  # type: ignore[attr-defined]
        try:
            if fds:
                socket.send_fds(self.sock, [data], list(fds))
            else:
                self.sock.sendall(data)
        except TimeoutError as exc:
            raise CommandTimeoutError(f"vhost-user {req.name}: not sent within {self.timeout} s") from exc
        except OSError as exc:
            raise DriverError(f"vhost-user {req.name}: {exc}") from exc
        if not (reply or ack):
            return None
        raw = self._recv_exact(12, req.name)
        try:
            hdr = Header.decode(raw)  # type: ignore[attr-defined]
        except WireError as exc:
            raise DriverError(f"vhost-user {req.name}: bad reply header {raw.hex()}") from exc
        if hdr.request != int(req) or not hdr.flags & HeaderFlags.REPLY or hdr.size > 4096:
            raise DriverError(f"vhost-user {req.name}: unexpected reply {hdr}")
        body = self._recv_exact(hdr.size, req.name)
        if ack:
            try:
                status = decode_u64(body, f"{req.name} ack")
            except WireError as exc:
                raise DriverError(f"vhost-user {req.name}: bad ack {body.hex()}") from exc
            if status:
                raise DriverError(f"vhost-user {req.name}: refused by the back-end (ack {status})")
            return None
        return body

    def _u64(self, req: Request) -> int:
        body = self.call(req, reply=True)
        assert body is not None
        try:
            return decode_u64(body, req.name)
        except WireError as exc:
            raise DriverError(f"vhost-user {req.name}: bad reply payload {body.hex()}") from exc

    # ------------------------------------------------------------------ set-up
    def negotiate(self, wanted: int) -> int:
        """The feature handshake; returns the features set (``wanted`` & offered; VERSION_1 is
        required).  Then SET_OWNER and the guest memory table."""
        offered = self._u64(Request.GET_FEATURES)
        if not offered & (1 << Feature.VERSION_1):
            raise DriverError(f"vhost-user back-end does not offer VERSION_1 (features {offered:#x})")
        if offered & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            proto = self._u64(Request.GET_PROTOCOL_FEATURES) & WANTED_PROTOCOL
            self.call(Request.SET_PROTOCOL_FEATURES, u64(proto))
            self.protocol_features = proto  # acks from here on, if REPLY_ACK is in
            wanted |= 1 << VHOST_USER_F_PROTOCOL_FEATURES
        self.call(Request.SET_OWNER)
        self.features = offered & wanted
        self.call(Request.SET_FEATURES, u64(self.features))
        mem = self.memory
        region = MemRegion(0, mem.size, USER_BASE, 0)  # type: ignore[call-arg]
        self.call(Request.SET_MEM_TABLE, encode_mem_table([region]), (mem.fd,))
        return self.features

    def config(self, size: int) -> bytes:
        """The device's config space, ``size`` bytes from offset 0 (GET_CONFIG)."""
        if not self.protocol_features & (1 << ProtocolFeature.CONFIG):
            raise DriverError("vhost-user back-end does not offer the CONFIG protocol feature")
        body = self.call(Request.GET_CONFIG, encode_config(0, bytes(size)), reply=True)
        assert body is not None
        try:
            hdr, data = decode_config(body)
        except WireError as exc:
            raise DriverError(f"vhost-user GET_CONFIG: bad reply {body[:32].hex()}") from exc
        if hdr.size != size or len(data) != size:
            raise DriverError(f"vhost-user GET_CONFIG: asked for {size} bytes, got {len(data)}")
        return data

    def start_ring(self, index: int, queue: DriverQueue) -> Ring:
        """Hand the back-end ring ``index`` (``queue``'s rings, in this memory) and start it."""
        if getattr(queue.port, "memory", None) is not self.memory:
            raise DriverError("the driver queue must live in the front-end's memory")
        self.call(Request.SET_VRING_NUM, VringState(index, queue.size).encode())  # type: ignore[attr-defined]
        self.call(Request.SET_VRING_BASE, VringState(index, queue.avail_idx).encode())  # type: ignore[attr-defined]
        addr = VringAddr(index, 0, USER_BASE + queue.desc_addr, USER_BASE + queue.used_addr,  # type: ignore[call-arg]
                         USER_BASE + queue.avail_addr, 0)
        self.call(Request.SET_VRING_ADDR, addr.encode())  # type: ignore[attr-defined]
        kick = os.eventfd(0, os.EFD_CLOEXEC)
        callfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        ring = Ring(index, queue, kick, callfd)
        self.rings[index] = ring
        self.call(Request.SET_VRING_KICK, u64(index), (kick,))
        self.call(Request.SET_VRING_CALL, u64(index), (callfd,))
        if self.features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            self.call(Request.SET_VRING_ENABLE, VringState(index, 1).encode())  # type: ignore[attr-defined]
        return ring

    # ------------------------------------------------------------------ data path
    def kick(self, index: int) -> None:
        os.eventfd_write(self.rings[index].kick_fd, 1)

    def wait_call(self, index: int, deadline: float) -> None:
        """Wait for the back-end's call on ring ``index`` (consumed) until the host-side
        ``deadline`` (``time.monotonic()``); :class:`CommandTimeoutError` past it."""
        fd = self.rings[index].call_fd
        while True:
            try:
                os.eventfd_read(fd)
                return
            except BlockingIOError:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                raise CommandTimeoutError(f"vhost-user ring {index}: no call from the back-end before the deadline")
            select.select([fd], [], [], left)

    def stop_ring(self, index: int) -> int:
        """GET_VRING_BASE: the back-end stops the ring; returns its next avail index."""
        body = self.call(Request.GET_VRING_BASE, VringState(index, 0).encode(), reply=True)  # type: ignore[attr-defined]
        assert body is not None
        try:
            st = VringState.decode(body)  # type: ignore[attr-defined]
        except WireError as exc:
            raise DriverError(f"vhost-user GET_VRING_BASE: bad reply {body.hex()}") from exc
        return st.num

    def close(self) -> None:
        """Close the connection and the ring eventfds (the back-end sees the front-end leave)."""
        self.sock.close()
        for ring in self.rings.values():
            os.close(ring.kick_fd)
            os.close(ring.call_fd)
        self.rings.clear()

    def __enter__(self) -> VhostUserFrontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
