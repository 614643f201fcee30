"""The vhost-user UNIX socket server: one front-end connection at a time.

One thread runs a selector over the listening socket (only while no front-end
is connected), the connection, and every started ring's kick eventfd.
Messages are read with ``recvmsg`` -- the header with room for SCM_RIGHTS fds
(up to 8 + 1), then exactly the payload -- fed to the sans-I/O
:class:`~virtio_lm.vhost.protocol.MessageReader` and handled by
:class:`~virtio_lm.vhost.backend.VhostUserBackend`.  A refused message
(:class:`~virtio_lm.errors.VhostUserError`) is logged, the connection closed
and the back-end reset; the server then listens for the next connection.
One front-end per socket: while one is connected (even a silent one) the next
waits in the listen backlog until it leaves.
Back-end I/O runs on the device's thread pool; completions write the used
ring and signal the call eventfd from there.
"""

from __future__ import annotations

import array
import logging
import os
import selectors
import socket
import threading
from typing import Callable

from virtio_lm.devices.base import QueueDevice
from virtio_lm.errors import VhostUserError, VirtioLmError
from virtio_lm.vhost.backend import VhostUserBackend
from virtio_lm.vhost.protocol import MessageReader

__all__ = ["VhostUserServer", "recv_with_fds"]

log = logging.getLogger(__name__)

_MAX_FDS = 16
_FD_SIZE = array.array("i").itemsize


def recv_with_fds(
    sock: socket.socket, n: int, *, max_fds: int = _MAX_FDS, error: type[Exception] = VhostUserError
) -> tuple[bytes, list[int]]:
    """Up to ``n`` bytes and the fds that came with them (SCM_RIGHTS), not inheritable; room
    for ``max_fds``.  When the kernel cut fds off, the ones that came are closed and ``error``
    is raised.  (The vfio-user server receives its messages with this too.)"""
    data, anc, flags, _ = sock.recvmsg(n, socket.CMSG_SPACE(max_fds * _FD_SIZE))
    fds: list[int] = []
    for level, ctype, cdata in anc:
        if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(cdata[: len(cdata) - len(cdata) % _FD_SIZE])
            fds.extend(arr)
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise error("ancillary data truncated (too many fds in one message)")
    for fd in fds:
        os.set_inheritable(fd, False)
    return data, fds


class VhostUserServer:
    """Serve ``device`` on the UNIX socket ``path`` (see the module docstring)."""

    def __init__(
        self,
        path: str,
        device: QueueDevice,
        *,
        name: str = "vhost-blk",
        log_writes: bool = True,
        on_event: Callable[[str], None] | None = None,
        backend: VhostUserBackend | None = None,
    ) -> None:
        self.path = path
        self.backend = backend if backend is not None else VhostUserBackend(device, name=name, log_writes=log_writes)
        self.on_event = on_event or (lambda text: None)
        self.connections = 0
        self.refusals: list[str] = []
        self._stop_r, self._stop_w = os.pipe()
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._reader = MessageReader()
        self._sel = selectors.DefaultSelector()
        self._kicks: dict[int, tuple[int, int]] = {}
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def listen(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(self.path)
        s.listen(4)
        self._listener = s
        self._sel.register(s, selectors.EVENT_READ, "listen")
        self._sel.register(self._stop_r, selectors.EVENT_READ, "stop")

    def start(self) -> None:
        """Listen and serve on a thread."""
        if self._listener is None:
            self.listen()
        self._thread = threading.Thread(target=self.serve_forever, name="vhost-user", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        os.write(self._stop_w, b"x")
        if self._thread is not None:
            self._thread.join(30)

    def close(self) -> None:
        self._drop_connection("server closing")
        if self._listener is not None:
            self._sel.unregister(self._listener)
            self._listener.close()
            self._listener = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self._sel.close()
        os.close(self._stop_r)
        os.close(self._stop_w)

    # ------------------------------------------------------------------ loop
    def serve_forever(self) -> None:
        if self._listener is None:
            self.listen()
        while True:
            for key, _ in self._sel.select():
                tag = key.data
                if tag == "stop":
                    return
                try:
                    if tag == "listen":
                        self._accept()
                    elif tag == "conn":
                        self._on_readable()
                    else:
                        self._on_kick(key.fd, tag[0])
                except Exception as exc:  # a bug must not end the server: drop the front-end, keep listening
                    log.exception("%s: internal error; closing the connection", self.path)
                    self.refusals.append(f"internal error: {exc!r}")
                    self._drop_connection(f"internal error: {exc!r}")

    def _accept(self) -> None:
        assert self._listener is not None
        conn, _ = self._listener.accept()
        if self._conn is not None:  # one front-end at a time
            conn.close()
            return
        self._conn = conn
        self.connections += 1
        self._sel.register(conn, selectors.EVENT_READ, "conn")
        self._sel.unregister(self._listener)
        self.on_event("connected")
        log.info("%s: front-end connected", self.path)

    def _drop_connection(self, why: str) -> None:
        if self._conn is None:
            return
        for fd in list(self._kicks):
            self._sel.unregister(fd)
        self._kicks.clear()
        self._sel.unregister(self._conn)
        self._conn.close()
        self._conn = None
        self._reader.close()
        try:
            self.backend.disconnect()
        except VirtioLmError as exc:
            log.warning("%s: reset after disconnect: %s", self.path, exc)
        if self._listener is not None:
            self._sel.register(self._listener, selectors.EVENT_READ, "listen")
        self.on_event(f"disconnected: {why}")
        log.info("%s: front-end gone (%s); listening again", self.path, why)

    def _on_readable(self) -> None:
        assert self._conn is not None
        try:
            data, fds = recv_with_fds(self._conn, max(1, self._reader.want()))
        except (ConnectionError, OSError, VhostUserError) as exc:
            self._drop_connection(f"receive failed: {exc}")
            return
        try:
            if not data:
                for fd in fds:
                    os.close(fd)
                self._reader.eof()
                self._drop_connection("closed by the front-end")
                return
            for msg in self._reader.feed(data, fds):
                log.debug("%s: %s %s", self.path, msg.name, msg.payload[:16].hex())
                reply = self.backend.handle(msg)
                fds = self.backend.take_reply_fds()
                if reply is not None and fds:
                    sent = socket.send_fds(self._conn, [reply], fds)
                    if sent < len(reply):
                        self._conn.sendall(reply[sent:])
                elif reply is not None:
                    self._conn.sendall(reply)
        except VhostUserError as exc:
            self.refusals.append(str(exc))
            log.error("%s: refused: %s; closing the connection", self.path, exc)
            self._drop_connection(f"refused: {exc}")
            return
        except OSError as exc:
            self._drop_connection(f"send failed: {exc}")
            return
        self._sync_kicks()

    def _sync_kicks(self) -> None:
        want = self.backend.kick_fds()
        for fd in list(self._kicks):
            if want.get(fd) != self._kicks[fd]:
                self._sel.unregister(fd)
                del self._kicks[fd]
        for fd, index in want.items():
            if fd not in self._kicks:
                self._sel.register(fd, selectors.EVENT_READ, index)
                self._kicks[fd] = index

    def _on_kick(self, fd: int, index: int) -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("%s: kick fd of ring %d: %s", self.path, index, exc)
            return
        self.backend.kick(index)
