"""The vfio-user UNIX socket server: one function, one socket, one client at a time.

One thread runs a selector over the listening socket (only while no client is connected), the
connection, and a stop pipe.  Bytes are read with ``recvmsg`` -- exactly what the
:class:`~virtio_lm.vfio_user.protocol.MessageReader` wants next, with room for SCM_RIGHTS fds
-- and each whole message goes to :meth:`VfioUserDevice.handle`; its reply is sent back.  A
refused message (:class:`~virtio_lm.errors.VfioUserError`) is logged, the connection closed,
:meth:`VfioUserDevice.disconnect` called (windows unmapped, eventfds closed, function reset),
and the server listens for the next client.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import threading
from typing import Callable

from virtio_lm.errors import VfioUserError, VfioUserMessageError
from virtio_lm.vfio_user.protocol import MessageReader, VfioUserDevice
from virtio_lm.vhost.server import recv_with_fds as _recv_with_fds
from virtio_lm.wire.vfio_user import MAX_MSG_FDS

__all__ = ["VfioUserServer"]

log = logging.getLogger(__name__)

def recv_with_fds(sock: socket.socket, n: int) -> tuple[bytes, list[int]]:
    """Up to ``n`` bytes and the fds that came with them (refused when fds were cut off): the
    vhost-user server's receive, with vfio-user's fd limit and error."""
    return _recv_with_fds(sock, n, max_fds=MAX_MSG_FDS, error=VfioUserMessageError)


class VfioUserServer:
    """Serve ``device`` on the UNIX socket ``path`` (see the module docstring)."""

    def __init__(self, path: str, device: VfioUserDevice, *, on_event: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.device = device
        self.on_event = on_event or (lambda text: None)
        self.connections = 0
        self.refusals: list[str] = []
        self._stop_r, self._stop_w = os.pipe()
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._reader = MessageReader()
        self._sel = selectors.DefaultSelector()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # handle() and disconnect() of the device, one at a time
        self._closed = False

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

    def start(self) -> "VfioUserServer":
        if self._listener is None:
            self.listen()
        self._thread = threading.Thread(target=self.serve_forever, name=f"vfio-user {self.device.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            os.write(self._stop_w, b"x")
            self._thread.join(30)
            self._thread = None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.stop()
        self._drop_connection("server closing")
        if self._listener is not None:
            self._sel.unregister(self._listener)
            self._listener.close()
            self._listener = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        try:
            self._sel.unregister(self._stop_r)
        except (KeyError, ValueError):
            pass
        self._sel.close()
        os.close(self._stop_r)
        os.close(self._stop_w)

    @property
    def connected(self) -> bool:
        return self._conn is not None

    # ------------------------------------------------------------------ loop
    def serve_forever(self) -> None:
        while True:
            for key, _ in self._sel.select():
                tag = key.data
                if tag == "stop":
                    return
                try:
                    if tag == "listen":
                        self._accept()
                    else:
                        self._on_readable()
                except Exception as exc:  # a bug must not end the server: drop the client, keep listening
                    log.exception("%s: internal error; closing the connection", self.path)
                    self.refusals.append(f"internal error: {exc!r}")
                    self._drop_connection(f"internal error: {exc!r}")

    def _accept(self) -> None:
        assert self._listener is not None
        conn, _ = self._listener.accept()
        if self._conn is not None:
            conn.close()
            return
        self._conn = conn
        self.connections += 1
        self._sel.register(conn, selectors.EVENT_READ, "conn")
        self._sel.unregister(self._listener)
        self.on_event("connected")
        log.info("%s: client connected", self.path)

    def _drop_connection(self, why: str) -> None:
        if self._conn is None:
            return
        self._sel.unregister(self._conn)
        self._conn.close()
        self._conn = None
        self._reader.close()
        with self._lock:
            self.device.disconnect()
        if self._listener is not None:
            self._sel.register(self._listener, selectors.EVENT_READ, "listen")
        self.on_event(f"disconnected: {why}")
        log.info("%s: client gone (%s); listening again", self.path, why)

    def _on_readable(self) -> None:
        assert self._conn is not None
        try:
            data, fds = recv_with_fds(self._conn, max(1, self._reader.want()))
        except (OSError, VfioUserError) as exc:
            self._drop_connection(f"receive failed: {exc}")
            return
        try:
            if not data:
                for fd in fds:
                    os.close(fd)
                self._reader.eof()
                self._drop_connection("closed by the client")
                return
            for msg in self._reader.feed(data, fds):
                with self._lock:
                    reply = self.device.handle(msg)
                if reply is not None:
                    self._conn.sendall(reply)
        except VfioUserError as exc:
            self.refusals.append(str(exc))
            log.error("%s: refused: %s; closing the connection", self.path, exc)
            self._drop_connection(f"refused: {exc}")
        except OSError as exc:
            self._drop_connection(f"send failed: {exc}")
