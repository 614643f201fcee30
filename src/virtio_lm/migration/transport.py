"""The thin socket / file layer around the sans-I/O sessions.

A :class:`SourceRunner` drives a :class:`~virtio_lm.migration.session.SourceSession`
over a connected TCP socket (``migrate tcp:HOST:PORT``) or a writable binary
file (``migrate file:PATH``); a :class:`DestRunner` drives a
:class:`~virtio_lm.migration.session.DestSession` over an accepted socket (or
one it accepts itself from a listener) or a readable file.  Each runner works
on a thread of its own (``start()`` / ``join()``) or in the caller's thread
(``run()``).  All session calls happen under ``runner.lock``, so another thread
(a monitor answering ``query-migrate``) may call :meth:`info` at any time.

Mapping of the outside world onto the session:

* bytes in -> ``receive``; EOF -> ``on_peer_closed()``; ``ECONNRESET``, ``EPIPE``,
  any ``OSError`` -> ``on_peer_closed(exc)``;
* silence: while the session waits for the peer (``waiting_for``, or a
  destination not finished) and nothing arrives for ``timeout`` seconds ->
  ``on_peer_closed(PeerGoneError)``; a send blocked for ``timeout`` seconds
  likewise;
* ``max-bandwidth``: the runner sends only what ``produce`` hands out and
  waits ``budget_wait()`` when the session's token bucket is empty;
* :meth:`SourceRunner.cancel` / :meth:`DestRunner.cancel` -> ``session.cancel()``
  on the runner's thread, even while it waits.

:func:`raw_loopback_throughput` measures plain TCP over loopback for the
same number of bytes (the bench's baseline).
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from typing import BinaryIO, Callable

from virtio_lm.addr import MIGRATION_SCHEMES, parse_address
from virtio_lm.errors import PeerGoneError
from virtio_lm.migration.session import DestSession, Event, SourceSession

__all__ = [
    "DestRunner",
    "SourceRunner",
    "listen",
    "raw_loopback_throughput",
    "start_incoming",
    "start_outgoing",
]

DEFAULT_TIMEOUT = 30.0
POLL = 0.05  # seconds between checks for cancel / silence while blocked
_EOF = object()
_CANCEL = object()


def _send_all(sock: socket.socket, bufs: list) -> int:
    """Send every buffer (vectored, no joining); returns the bytes sent."""
    views = [memoryview(b).cast("B") for b in bufs if len(b)]
    total = 0
    while views:
        n = sock.sendmsg(views[:256])
        total += n
        while n:
            if n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0
    return total


class _Runner:
    def __init__(self, on_event: Callable[[Event], None] | None) -> None:
        self.lock = threading.RLock()
        self.events: list[Event] = []
        self.on_event = on_event
        self.done = threading.Event()
        self.crash: BaseException | None = None  # a bug in the runner itself, not a migration error
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    def _pump_events(self, session) -> None:
        ev = session.poll_events()
        self.events.extend(ev)
        if self.on_event is not None:
            for e in ev:
                self.on_event(e)

    def start(self) -> "_Runner":
        self._thread = threading.Thread(target=self._main, name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    def _main(self) -> None:
        try:
            self.run()
        except BaseException as exc:  # pragma: no cover - reported, never swallowed
            self.crash = exc
        finally:
            self.done.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the end; True if it ended."""
        return self.done.wait(timeout)

    def resolve(self, run: str | None = None) -> str:
        """Settle a session whose outcome is unknown (``commit-unknown``, after its thread
        ended): see ``SourceSession.resolve`` / ``DestSession.resolve``.  The events it
        causes go out as any other."""
        with self.lock:
            try:
                return self.session.resolve(run)  # type: ignore[attr-defined]
            finally:
                self._pump_events(self.session)  # type: ignore[attr-defined]

    def run(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class SourceRunner(_Runner):
    """Runs a SourceSession over a connected socket or a writable binary file."""

    def __init__(
        self,
        session: SourceSession,
        channel: socket.socket | BinaryIO,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        chunk: int = 1 << 20,
        on_event: Callable[[Event], None] | None = None,
        close: bool = True,
    ) -> None:
        super().__init__(on_event)
        self.session = session
        self.channel = channel
        self.timeout = timeout
        self.chunk = chunk
        self.close_channel = close
        self.is_socket = isinstance(channel, socket.socket)
        if self.is_socket == session.to_file:
            raise ValueError("a file stream needs SourceSession(to_file=True), a socket one to_file=False")
        self._q: queue.Queue = queue.Queue()

    def cancel(self) -> None:
        """migrate_cancel: handled on the runner's thread (rollback before commit)."""
        self._cancel.set()
        self._q.put(_CANCEL)

    def info(self) -> dict:
        with self.lock:
            return self.session.info()

    # ------------------------------------------------------------------
    def run(self) -> None:
        s = self.session
        with self.lock:
            s.start()
            self._pump_events(s)
        try:
            if self.is_socket:
                self._run_socket()
            else:
                self._run_file()
        finally:
            if self.close_channel:
                try:
                    self.channel.close()
                except OSError:
                    pass

    def _run_file(self) -> None:
        s, f = self.session, self.channel
        while True:
            with self.lock:
                if self._cancel.is_set():
                    s.cancel()
                    self._cancel.clear()
                if s.finished and not s.wants_to_send:
                    self._pump_events(s)
                    break
                wait = s.budget_wait()
                chunks = s.produce(self.chunk) if wait == 0 else []
            if not chunks:
                self._cancel.wait(wait if wait else POLL)
                continue
            try:
                n = 0
                for c in chunks:
                    f.write(c)
                    n += len(c)
                if s.status == "device":  # the final data: on disk before the session calls it written
                    f.flush()
                    os.fsync(f.fileno())
                with self.lock:
                    s.on_sent(n)
                    self._pump_events(s)
            except OSError as exc:
                with self.lock:
                    s.on_peer_closed(exc)
                    self._pump_events(s)

    def _reader(self, sock: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                data = sock.recv(65536)
            except socket.timeout:
                continue
            except OSError as exc:
                if not stop.is_set():
                    self._q.put(exc)
                return
            if not data:
                self._q.put(_EOF)
                return
            self._q.put(data)

    def _handle(self, item) -> None:
        s = self.session
        if item is _CANCEL:
            s.cancel()
        elif item is _EOF:
            s.on_peer_closed(None)
        elif isinstance(item, BaseException):
            s.on_peer_closed(item)
        else:
            s.receive(item)

    def _run_socket(self) -> None:
        s = self.session
        sock: socket.socket = self.channel  # type: ignore[assignment]
        sock.settimeout(min(self.timeout, 1.0))
        stop = threading.Event()
        reader = threading.Thread(target=self._reader, args=(sock, stop), name="migration-source-reader", daemon=True)
        reader.start()
        last_heard = time.monotonic()
        try:
            while True:
                # everything that arrived, in order
                while True:
                    try:
                        item = self._q.get_nowait()
                    except queue.Empty:
                        break
                    if not (item is _CANCEL):
                        last_heard = time.monotonic()
                    with self.lock:
                        self._handle(item)
                        self._pump_events(s)
                with self.lock:
                    wants = s.wants_to_send
                    wait = s.budget_wait() if wants else 0.0
                    urgent = s.has_queued
                    chunks = s.produce(self.chunk) if wants and (wait == 0 or urgent) else []
                    finished = s.finished
                    waiting = s.waiting_for
                    if not s.mid_switchover:  # (mid switch-over the VFs come first: events after)
                        self._pump_events(s)  # produce() may have paused the VM: say so before the send
                if chunks:
                    try:
                        sock.settimeout(self.timeout)
                        n = _send_all(sock, chunks)
                    except OSError as exc:  # reset, broken pipe, timeout
                        err = PeerGoneError(f"sending to the destination: {exc}") if isinstance(exc, socket.timeout) else exc
                        with self.lock:
                            s.on_peer_closed(err)
                            self._pump_events(s)
                        continue
                    finally:
                        sock.settimeout(min(self.timeout, 1.0))
                    with self.lock:
                        s.on_sent(n)
                        if not s.mid_switchover:
                            self._pump_events(s)
                    continue
                if finished and not wants:
                    break
                block = wait if wants and wait > 0 else POLL
                try:
                    item = self._q.get(timeout=block)
                except queue.Empty:
                    if waiting is not None and time.monotonic() - last_heard > self.timeout:
                        with self.lock:
                            s.on_peer_closed(
                                PeerGoneError(f"no word from the destination for {self.timeout} s (waiting for {waiting})")
                            )
                            self._pump_events(s)
                    continue
                if item is not _CANCEL:
                    last_heard = time.monotonic()
                with self.lock:
                    self._handle(item)
                    self._pump_events(s)
        finally:
            stop.set()
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class DestRunner(_Runner):
    """Runs a DestSession over a socket (or accepts one from ``listener``) or a readable file."""

    def __init__(
        self,
        session: DestSession,
        channel: socket.socket | BinaryIO | None = None,
        *,
        listener: socket.socket | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        on_event: Callable[[Event], None] | None = None,
        close: bool = True,
        recv_size: int = 4 << 20,
    ) -> None:
        super().__init__(on_event)
        if (channel is None) == (listener is None):
            raise ValueError("give a channel (socket or file) or a listener, not both")
        self.session = session
        self.channel = channel
        self.listener = listener
        self.timeout = timeout
        self.close_channel = close
        self.recv_size = recv_size
        self.peer: object = None
        is_file = channel is not None and not isinstance(channel, socket.socket)
        if is_file != session.from_file:
            raise ValueError("a file stream needs DestSession(from_file=True), a socket one from_file=False")

    @property
    def address(self) -> tuple | None:
        """The listener's bound address (for a port chosen by the system)."""
        return self.listener.getsockname() if self.listener is not None else None

    def cancel(self) -> None:
        self._cancel.set()

    def info(self) -> dict:
        with self.lock:
            return self.session.info()

    def run(self) -> None:
        s = self.session
        try:
            if self.listener is not None:
                self.channel = self._accept()
                if self.channel is None:
                    return
            if isinstance(self.channel, socket.socket):
                self._run_socket(self.channel)
            else:
                self._run_file(self.channel)  # type: ignore[arg-type]
        finally:
            with self.lock:
                self._pump_events(s)
            if self.close_channel:
                for c in (self.channel, self.listener):
                    if c is not None:
                        try:
                            c.close()
                        except OSError:
                            pass

    def _accept(self) -> socket.socket | None:
        s = self.session
        lst = self.listener
        assert lst is not None
        lst.settimeout(POLL)
        deadline = None  # migrate-incoming waits for its source without limit, until cancelled
        while True:
            if self._cancel.is_set():
                with self.lock:
                    s.cancel()
                return None
            try:
                conn, self.peer = lst.accept()
            except socket.timeout:
                if deadline is not None and time.monotonic() > deadline:  # pragma: no cover
                    return None
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return conn

    def _flush(self, sock: socket.socket) -> None:
        s = self.session
        with self.lock:
            out = s.produce()
        if out:
            try:
                sock.settimeout(self.timeout)
                _send_all(sock, out)
            except OSError as exc:
                with self.lock:
                    s.on_peer_closed(exc)
            finally:
                sock.settimeout(POLL)

    def _run_socket(self, sock: socket.socket) -> None:
        s = self.session
        sock.settimeout(POLL)
        last_heard = time.monotonic()
        try:
            while True:
                if self._cancel.is_set():
                    self._cancel.clear()
                    with self.lock:
                        s.cancel()
                self._flush(sock)
                with self.lock:
                    self._pump_events(s)
                    if s.finished and not s.wants_to_send:
                        break
                with self.lock:
                    view = s.recv_buffer()  # straight into the section being assembled
                try:
                    n = sock.recv_into(view)
                except socket.timeout:
                    if time.monotonic() - last_heard > self.timeout:
                        with self.lock:
                            s.on_peer_closed(PeerGoneError(f"no word from the source for {self.timeout} s"))
                    continue
                except OSError as exc:
                    with self.lock:
                        s.on_peer_closed(exc)
                    continue
                last_heard = time.monotonic()
                with self.lock:
                    if n == 0:
                        s.on_peer_closed(None)
                    else:
                        s.received(n)
        finally:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _run_file(self, f: BinaryIO) -> None:
        s = self.session
        while True:
            if self._cancel.is_set():
                with self.lock:
                    s.cancel()
                    self._pump_events(s)
                return
            try:
                data = f.read(self.recv_size)
            except OSError as exc:
                with self.lock:
                    s.on_peer_closed(exc)
                return
            with self.lock:
                if not data:
                    s.on_peer_closed(None)
                    return
                s.receive(data)
                self._pump_events(s)
                if s.finished:
                    return


# ---------------------------------------------------------------------- helpers
def listen(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening TCP socket for ``migrate-incoming tcp:HOST:PORT`` (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    lst = socket.socket(family, socket.SOCK_STREAM)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind((host, port))
    lst.listen(1)
    return lst


def start_outgoing(
    session: SourceSession, uri: str, *, timeout: float = DEFAULT_TIMEOUT,
    on_event: Callable[[Event], None] | None = None,
) -> SourceRunner:
    """``migrate URI``: connect (or create the file) and start the runner's thread.

    Connection failures raise ``OSError`` here, before the session starts
    (nothing to roll back)."""
    u = parse_address(uri, MIGRATION_SCHEMES)
    if u.kind == "file":
        f = open(u.path, "wb")
        return SourceRunner(session, f, timeout=timeout, on_event=on_event).start()  # type: ignore[return-value]
    sock = socket.create_connection((u.host_or_loopback, u.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return SourceRunner(session, sock, timeout=timeout, on_event=on_event).start()  # type: ignore[return-value]


def start_incoming(
    session: DestSession, uri: str, *, timeout: float = DEFAULT_TIMEOUT,
    on_event: Callable[[Event], None] | None = None,
) -> DestRunner:
    """``migrate-incoming URI``: listen (accepting on the runner's thread) or read the file."""
    u = parse_address(uri, MIGRATION_SCHEMES)
    if u.kind == "file":
        f = open(u.path, "rb")
        return DestRunner(session, f, timeout=timeout, on_event=on_event).start()  # type: ignore[return-value]
    return DestRunner(session, listener=listen(u.host_or_any, u.port), timeout=timeout, on_event=on_event).start()  # type: ignore[return-value]


def _raw_receiver(nbytes: int, into_memory: bool, port_q, out_q) -> None:
    """The receiving end of :func:`raw_loopback_throughput` (thread or process)."""
    lst = listen("127.0.0.1", 0)
    port_q.put(lst.getsockname()[1])
    lst.settimeout(60)
    got, t_end = 0, 0.0
    try:
        conn, _ = lst.accept()
    except OSError:
        out_q.put((0, 0.0))
        return
    if into_memory:  # every byte lands in its own place of an nbytes buffer (mapped first)
        buf = bytearray(nbytes)
        memoryview(buf)[:: 4096] = b"\1" * len(range(0, nbytes, 4096))
    else:  # one 4 MiB buffer, received into again and again (stays in the cache)
        buf = bytearray(4 << 20)
    view = memoryview(buf)
    with conn:
        conn.settimeout(60)
        while got < nbytes:
            try:
                if into_memory:
                    n = conn.recv_into(view[got : got + (4 << 20)])
                else:
                    n = conn.recv_into(view)
            except OSError:
                break
            if not n:
                break
            got += n
        t_end = time.monotonic()
    lst.close()
    out_q.put((got, t_end))


def raw_loopback_throughput(
    nbytes: int, *, chunk: int = 1 << 20, processes: bool = False, from_memory: bool = False
) -> dict:
    """Send ``nbytes`` over a fresh loopback TCP connection, nothing else; time it.

    ``processes``: the receiver is another process (as a migration's destination
    is), else a thread of this one.  ``from_memory``: the bytes are ``nbytes``
    of random data read from one buffer and received into another buffer of
    ``nbytes`` (each byte crosses memory as a migrated page does), else a
    ``chunk`` of random data is sent again and again and received into one
    4 MiB buffer (cache-hot: only the sockets' own cost).

    Returns ``{"bytes", "seconds", "bytes-per-second", "mbps"}``; the clock runs
    from the first send to the receiver having read the last byte.
    """
    if processes:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        port_q, out_q = ctx.Queue(), ctx.Queue()
        worker = ctx.Process(target=_raw_receiver, args=(nbytes, from_memory, port_q, out_q), daemon=True)
    else:
        port_q, out_q = queue.Queue(), queue.Queue()
        worker = threading.Thread(target=_raw_receiver, args=(nbytes, from_memory, port_q, out_q), daemon=True)
    worker.start()

    def wait_for(q, what: str, limit: float):
        deadline = time.monotonic() + limit
        while True:
            try:
                return q.get(timeout=0.2)
            except queue.Empty:
                if not worker.is_alive() or time.monotonic() > deadline:
                    raise PeerGoneError(f"loopback receiver gave no {what}") from None

    try:
        port = wait_for(port_q, "port", 120)
        if from_memory:
            import numpy as np

            block = np.frombuffer(os.urandom(min(nbytes, 16 << 20) or 1), dtype=np.uint8)
            data = np.resize(block, nbytes) if nbytes else block[:0]
            payload = memoryview(data).cast("B")
        else:
            payload = memoryview(os.urandom(min(chunk, max(nbytes, 1))))
        with socket.create_connection(("127.0.0.1", port)) as sock:
            t0 = time.monotonic()
            off = 0
            while off < nbytes:
                k = min(chunk, nbytes - off)
                sock.sendall(payload[off : off + k] if from_memory else payload[:k])
                off += k
            got, t_end = wait_for(out_q, "result", 600)
    finally:
        worker.join(10)
    seconds = max(t_end - t0, 1e-9)
    if got != nbytes:
        raise PeerGoneError(f"loopback receiver read {got} of {nbytes} bytes")
    return {"bytes": nbytes, "seconds": seconds, "bytes-per-second": nbytes / seconds,
            "mbps": nbytes * 8 / seconds / 1e6}
