"""The monitor's server: the asyncio loop on its own thread, one :class:`QmpConnection`
per client, commands run off the loop (see :mod:`virtio_lm.host.qmp`)."""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from virtio_lm import addr as addresses
from virtio_lm.errors import (
    MonitorAddressError,
    MonitorError,
    QmpLimitError,
)

from virtio_lm.host.qmp.commands import (
    DEFAULT_MAX_CLIENTS,
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_MESSAGE,
    DEFAULT_MAX_OUTPUT,
    DEFAULT_READ_HIGH_WATER,
    CommandTable,
)
from virtio_lm.host.qmp.framing import QmpConnection, Request, make_event

log = logging.getLogger(__name__)


# =========================================================================== addresses
@dataclass(frozen=True)
class MonitorAddress:
    """Where a monitor listens: ``kind`` "unix" (``path``) or "tcp" (``host``, ``port``)."""

    kind: str
    path: str | None = None
    host: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else (self.host or "")
        return f"tcp:{host}:{self.port}"

    @property
    def sockaddr(self) -> str | tuple[str, int]:
        """What ``qemu.qmp.QMPClient.connect`` (and socket.connect) take."""
        if self.kind == "unix":
            return self.path  # type: ignore[return-value]
        return (self.host or "127.0.0.1", self.port)  # type: ignore[return-value]


# =========================================================================== server
class _Client(asyncio.Protocol):
    """One accepted socket, on the event loop thread."""

    def __init__(self, server: QmpServer) -> None:
        self.server = server
        self.conn = QmpConnection(server.table, max_message=server.max_message, max_depth=server.max_depth)
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.closed = False
        self.paused = False

    # -- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        refused = self.server.admit(self)
        if refused is not None:
            log.warning("QMP: refusing a client (%s)", refused)
            self.closed = True
            transport.abort()
            return
        self.write(self.conn.start())

    def data_received(self, data: bytes) -> None:
        if self.gone():
            return
        self.conn.receive_data(data)
        self.pump()

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.forget(self)

    # -- work
    def gone(self) -> bool:
        """Closed by us, or the transport is closing (a write failed, the peer left):
        nothing more is parsed, run or written for this client."""
        if not self.closed and self.transport is not None and self.transport.is_closing():
            self.closed = True
        return self.closed

    def pump(self) -> None:
        """Answer what can be answered; hand the next command to the dispatcher."""
        while not self.gone() and not self.busy:
            req = self.conn.next_request()
            if req is None:
                if self.paused:
                    self.paused = False
                    self.transport.resume_reading()  # type: ignore[union-attr]
                return
            if req.needs_dispatch:
                self.busy = True
                self.server.submit(self, req)
            else:
                self.deliver(req.run(), req.final)
        if self.busy and not self.paused and not self.gone() \
                and self.conn.buffered_bytes >= self.server.read_high_water:
            self.paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def deliver(self, out: bytes, final: bool) -> None:
        if self.gone():
            return
        self.write(out)
        if final and not self.gone():
            log.warning("QMP: disconnecting a client: %s", self.conn.close_reason)
            self.closed = True
            self.transport.close()  # type: ignore[union-attr]

    def done(self, out: bytes, final: bool) -> None:
        self.busy = False
        self.deliver(out, final)
        self.pump()

    def write(self, data: bytes) -> None:
        if self.gone() or not data:
            return
        t = self.transport
        t.write(data)  # type: ignore[union-attr]
        pending = t.get_write_buffer_size()  # type: ignore[union-attr]
        if pending > self.server.max_output:
            self.conn.close_reason = QmpLimitError("unsent output", pending, self.server.max_output)
            log.warning("QMP: disconnecting a client that does not read: %s", self.conn.close_reason)
            self.closed = True
            t.abort()  # type: ignore[union-attr]


class QmpServer:
    """A QMP monitor listening on ``address`` (``unix:PATH`` / ``tcp:HOST:PORT``, port 0 =
    any free port) for many clients.  ``start()`` binds (raises MonitorAddressError);
    ``address`` is then the bound address.  Also a context manager."""

    def __init__(
        self,
        table: CommandTable,
        address: str | os.PathLike | tuple[str, int] | MonitorAddress,
        *,
        max_message: int = DEFAULT_MAX_MESSAGE,
        max_depth: int = DEFAULT_MAX_DEPTH,
        max_output: int = DEFAULT_MAX_OUTPUT,
        read_high_water: int = DEFAULT_READ_HIGH_WATER,
        max_clients: int = DEFAULT_MAX_CLIENTS,
    ) -> None:
        self.table = table
        self._requested = addresses.parse_address(address, addresses.MONITOR_SCHEMES)
        self.max_message = max_message
        self.max_depth = max_depth
        self.max_output = max_output
        self.read_high_water = read_high_water
        self.max_clients = max_clients
        self._bound: MonitorAddress | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._clients: set[_Client] = set()
        self._queue: queue.Queue = queue.Queue()
        self._io_thread: threading.Thread | None = None
        self._dispatch_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closing = False
        self._close_after_current = False
        self._stopped = threading.Event()
        self._unix_inode: tuple[int, int] | None = None

    # ---------------------------------------------------------------- life cycle
    def start(self) -> QmpServer:
        with self._lock:
            if self._loop is not None:
                raise MonitorError("QmpServer.start() called twice")
            self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._io_thread = threading.Thread(target=self._run_loop, args=(ready,), name="qmp-io", daemon=True)
        self._io_thread.start()
        ready.wait()
        try:
            asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result()
        except BaseException as exc:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._io_thread.join()
            self._closing = True
            self._stopped.set()
            if isinstance(exc, MonitorAddressError):
                raise
            raise MonitorAddressError(f"cannot listen on {self._requested}: {exc}") from exc
        self._dispatch_thread = threading.Thread(target=self._dispatch_loop, name="qmp-dispatch", daemon=True)
        self._dispatch_thread.start()
        return self

    def __enter__(self) -> QmpServer:
        if self._loop is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def address(self) -> MonitorAddress:
        """The bound address (port filled in when 0 was asked)."""
        if self._bound is None:
            raise MonitorError("the server is not listening")
        return self._bound


    @property
    def client_count(self) -> int:
        """Clients connected now."""
        return len(self._clients)

    def emit_event(self, name: str, data: Mapping[str, Any] | None = None, *, now_ns: int | None = None) -> None:
        """Send an event to every negotiated client.  Thread-safe; dropped once closed.
        ``now_ns``: the wall-clock time the event happened (default: now)."""
        encoded = make_event(name, data, now_ns=now_ns)
        with self._lock:
            if self._closing or self._loop is None:
                return
            try:
                self._loop.call_soon_threadsafe(self._broadcast, encoded)
            except RuntimeError:  # loop already closed
                return

    def close(self, timeout: float = 5.0) -> None:
        """Stop listening, close every client (flushing what was answered), stop the threads.

        Safe from any thread.  From a command handler (e.g. ``quit``) that handler's
        answer is delivered first and close returns without waiting."""
        with self._lock:
            if self._closing or self._loop is None:
                return
            self._closing = True
        me = threading.current_thread()
        if me is self._dispatch_thread:
            self._close_after_current = True  # the dispatcher shuts down after posting the answer
            return
        self._begin_shutdown()
        if me is self._io_thread:
            return
        self._stopped.wait(timeout)
        if self._dispatch_thread is not None:
            self._dispatch_thread.join(timeout)
        if self._io_thread is not None:
            self._io_thread.join(timeout)

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait until the server has shut down (e.g. after a handler called close())."""
        return self._stopped.wait(timeout)

    # ---------------------------------------------------------------- internals
    def _begin_shutdown(self) -> None:
        self._queue.put(None)
        try:
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._shutdown()))  # type: ignore[union-attr]
        except RuntimeError:
            self._stopped.set()

    def _run_loop(self, ready: threading.Event) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)  # type: ignore[union-attr]
        try:
            loop.run_forever()  # type: ignore[union-attr]
        finally:
            loop.close()  # type: ignore[union-attr]
            self._unlink_socket()
            self._stopped.set()

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        addr = self._requested
        if addr.kind == "unix":
            path = addr.path
            try:
                st = os.lstat(path)  # type: ignore[arg-type]
            except FileNotFoundError:
                pass
            else:
                if not stat.S_ISSOCK(st.st_mode):
                    raise MonitorAddressError(f"{path} exists and is not a socket")
                os.unlink(path)  # type: ignore[arg-type]
            self._server = await loop.create_unix_server(lambda: _Client(self), path)
            st = os.stat(path)  # type: ignore[arg-type]
            self._unix_inode = (st.st_dev, st.st_ino)
            self._bound = MonitorAddress("unix", path=path)
        else:
            host = addr.host or None
            self._server = await loop.create_server(lambda: _Client(self), host, addr.port, reuse_address=True)
            sockname = self._server.sockets[0].getsockname()
            self._bound = MonitorAddress("tcp", host=addr.host or sockname[0], port=sockname[1])

    def _unlink_socket(self) -> None:
        if self._bound is None or self._bound.kind != "unix" or self._unix_inode is None:
            return
        try:  # only the socket we made: never a file someone put there since
            st = os.stat(self._bound.path)  # type: ignore[arg-type]
            if (st.st_dev, st.st_ino) == self._unix_inode:
                os.unlink(self._bound.path)  # type: ignore[arg-type]
        except OSError:
            pass

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for c in list(self._clients):
            c.closed = True
            if c.transport is not None:
                c.transport.close()  # flushes what is buffered, then closes
        deadline = time.monotonic() + 2.0
        while self._clients and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for c in list(self._clients):  # did not take its last bytes in time
            if c.transport is not None:
                c.transport.abort()
        await asyncio.sleep(0)
        asyncio.get_running_loop().stop()

    def _broadcast(self, encoded: bytes) -> None:
        for c in list(self._clients):
            if not c.gone() and c.conn.accepts_events:
                c.write(encoded)

    def admit(self, client: _Client) -> str | None:
        """Take a new client on; why not (closing, too many clients), or None."""
        if self._closing:
            return "closing"
        if len(self._clients) >= self.max_clients:
            return "too many clients"
        self._clients.add(client)
        return None

    def forget(self, client: _Client) -> None:
        """A client's connection is gone."""
        self._clients.discard(client)

    def submit(self, client: _Client, req: Request) -> None:
        self._queue.put((client, req))

    def _dispatch_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            client, req = item
            if client.closed:
                continue  # the client left before its command started: drop it, as QEMU does
            out = req.run()
            try:
                self._loop.call_soon_threadsafe(client.done, out, req.final)  # type: ignore[union-attr]
            except RuntimeError:
                return  # loop closed
            if self._close_after_current:
                self._begin_shutdown()
                return
