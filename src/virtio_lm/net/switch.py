"""A small learning L2 switch over UDP on loopback: the default net back-end.

Needs nothing from the system but a UDP socket.  The switch listens on
``127.0.0.1:PORT``; every attached *port* is a UDP endpoint (the VF back-ends
of both hosts, an outside peer).  One datagram carries one message
(:mod:`virtio_lm.wire.switch`)::

    u8 kind   0 FRAME:  an Ethernet frame follows (14..MAX_FRAME bytes)
              1 HELLO:  attach the sending endpoint as a port (optional u8 of
                        capabilities: bit 0, the port takes FRAMES)
              2 BYE:    detach it (its learned MACs are forgotten)
              3 FRAMES: several frames, each a le16 length and the frame

A FRAME or FRAMES from an endpoint that never said HELLO attaches it
implicitly (without capabilities).  The frames of a FRAMES datagram are
forwarded one by one, in order, by the rules below; what goes to one port is
sent as FRAMES datagrams if the port takes them, else as one FRAME each.  A
FRAMES datagram that does not decode is dropped whole.
Forwarding is the classic learning bridge: the source MAC of every frame
(unicast only) is learned at the sender's port (a MAC seen at a new port is
a *move*: how the switch learns a migrated VM's new place); a frame to a
learned unicast MAC goes to that port only (and is dropped if that is the
port it came from); broadcast, multicast and unknown destinations are
flooded to every other port.

Bounds: at most ``max_ports`` ports and ``max_macs`` learned addresses (the
least recently refreshed is evicted); the switch stops by itself after
``idle_timeout`` seconds without a datagram or ``lifetime`` seconds in all,
and its thread polls with a short timeout so :meth:`L2Switch.stop` returns
promptly.  Run it as a process with ``python -m virtio_lm.net.switch``.
"""

from __future__ import annotations

import argparse
import collections
import socket
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

from virtio_lm.errors import WireError
from virtio_lm.wire.net import ETH_HLEN, format_mac, is_multicast
from virtio_lm.wire.switch import (
    CAP_BATCHES,
    KIND_BYE,
    KIND_FRAME,
    KIND_FRAMES,
    KIND_HELLO,
    MAX_FRAME,
    decode_frames,
    frame_message,
    hello_caps,
    pack_frames,
)

__all__ = ["KIND_BYE", "KIND_FRAME", "KIND_FRAMES", "KIND_HELLO", "MAX_FRAME", "Addr", "L2Switch", "big_buffers",
           "frame_message", "read_moves"]

SOCK_BUF = 4 << 20
POLL = 0.05

Addr = tuple[str, int]


def big_buffers(sock: socket.socket) -> None:
    """Ask for SOCK_BUF-sized socket buffers (past net.core.[rw]mem_max where permitted)."""
    for force, plain in ((getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF),
                         (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF)):
        try:
            if force is None:
                raise PermissionError
            sock.setsockopt(socket.SOL_SOCKET, force, SOCK_BUF)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, SOCK_BUF)


class L2Switch:
    """The learning switch; see the module docstring."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_ports: int = 64,
        max_macs: int = 4096,
        idle_timeout: float = 30.0,
        lifetime: float = 3600.0,
        moves_path: str | None = None,
    ) -> None:
        self.max_ports = max_ports
        self.max_macs = max_macs
        self.idle_timeout = idle_timeout
        self.lifetime = lifetime
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        big_buffers(self.sock)
        self.sock.bind((host, port))
        self.sock.settimeout(POLL)
        self.address: Addr = self.sock.getsockname()
        self._ports: dict[Addr, int] = {}  # port -> its HELLO's capabilities
        self._macs: OrderedDict[bytes, Addr] = OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats: collections.Counter[str] = collections.Counter()
        self.stopped_because: str | None = None
        #: every move (a MAC learned at a new port) as a line ``TIME MAC HOST:PORT`` (wall clock),
        #: appended and flushed as it happens: when the network learned where a migrated VM is
        self._moves = open(moves_path, "a", encoding="ascii") if moves_path else None  # noqa: SIM115

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "L2Switch":
        self._thread = threading.Thread(target=self.serve, name=f"l2switch:{self.address[1]}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.sock.close()
        if self._moves is not None:
            self._moves.close()

    def __enter__(self) -> "L2Switch":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def serve(self) -> None:
        """Forward until stopped, idle for ``idle_timeout`` or past ``lifetime``."""
        start = last = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now - last > self.idle_timeout:
                self.stopped_because = "idle"
                break
            if now - start > self.lifetime:
                self.stopped_because = "lifetime"
                break
            try:
                data, src = self.sock.recvfrom(65536)
            except socket.timeout:
                continue
            except OSError:
                self.stopped_because = "socket closed"
                break
            last = time.monotonic()
            self.handle(data, src)
        else:
            self.stopped_because = "stopped"

    # ------------------------------------------------------------------ forwarding
    def _attach(self, src: Addr, caps: int | None = None) -> bool:
        """Attach ``src`` (a HELLO sets its capabilities, ``caps``; a frame leaves them)."""
        if src in self._ports:
            if caps is not None:
                self._ports[src] = caps
            return True
        if len(self._ports) >= self.max_ports:
            self.stats["dropped_port_limit"] += 1
            return False
        self._ports[src] = caps or 0
        self.stats["ports_attached"] += 1
        return True

    def handle(self, data: bytes, src: Addr) -> None:
        """One datagram from ``src`` (public for sans-socket tests of the rules)."""
        if not data:
            self.stats["dropped_empty"] += 1
            return
        kind = data[0]
        if kind == KIND_FRAMES:
            self._handle_frames(data, src)
            return
        with self._lock:
            if kind == KIND_HELLO:
                self._attach(src, hello_caps(data))
                return
            if kind == KIND_BYE:
                if self._ports.pop(src, None) is not None:
                    self.stats["ports_detached"] += 1
                for mac in [m for m, a in self._macs.items() if a == src]:
                    del self._macs[mac]
                return
            if kind != KIND_FRAME:
                self.stats["dropped_bad_kind"] += 1
                return
            targets = self._route(data[1:], src)
        for t in targets:
            try:
                self.sock.sendto(data, t)
            except OSError:
                self.stats["send_errors"] += 1

    def _handle_frames(self, data: bytes, src: Addr) -> None:
        """A FRAMES datagram: each frame routed in order; one send per port (per datagram that fits)."""
        try:
            frames = decode_frames(memoryview(data)[1:])
        except WireError:
            self.stats["dropped_bad_batch"] += 1
            return
        out: dict[Addr, list[bytes]] = {}
        with self._lock:
            self.stats["batches"] += 1
            for frame in frames:
                for t in self._route(frame, src):
                    out.setdefault(t, []).append(frame)
            batches = {t: self._ports.get(t, 0) & CAP_BATCHES for t in out}
        for t, fs in out.items():
            msgs = pack_frames(fs) if batches[t] else [frame_message(f) for f in fs]
            for m in msgs:
                try:
                    self.sock.sendto(m, t)
                except OSError:
                    self.stats["send_errors"] += 1

    def _route(self, frame: bytes, src: Addr) -> list[Addr]:
        """Where one frame from ``src`` goes (learning its source MAC on the way); the lock held."""
        if len(frame) < ETH_HLEN or len(frame) > MAX_FRAME:
            self.stats["dropped_bad_length"] += 1
            return []
        if not self._attach(src):
            return []
        self.stats["frames"] += 1
        dst, smac = frame[0:6], frame[6:12]
        if not is_multicast(smac):
            old = self._macs.get(smac)
            if old is not None and old != src:
                self.stats["moves"] += 1
                if self._moves is not None:
                    self._moves.write(f"{time.time():.6f} {format_mac(smac)} {src[0]}:{src[1]}\n")
                    self._moves.flush()
            self._macs[smac] = src
            self._macs.move_to_end(smac)
            while len(self._macs) > self.max_macs:
                self._macs.popitem(last=False)
                self.stats["evicted"] += 1
        out = None if is_multicast(dst) else self._macs.get(dst)
        if out is None:
            self.stats["flooded"] += 1
            return [p for p in self._ports if p != src]
        if out == src:
            self.stats["dropped_hairpin"] += 1
            return []
        self.stats["forwarded"] += 1
        return [out]

    # ------------------------------------------------------------------ inspection
    def lookup(self, mac: bytes) -> Addr | None:
        with self._lock:
            return self._macs.get(bytes(mac))

    @property
    def ports(self) -> list[Addr]:
        with self._lock:
            return list(self._ports)

    def wait_learned(self, mac: bytes, where: Addr, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.lookup(mac) == where:
                return True
            time.sleep(0.005)
        return self.lookup(mac) == where


def read_moves(path: str | Path, mac: str) -> list[float]:
    """When the switch (``--moves PATH``) learned ``mac`` (``aa:bb:...``) at a new port: wall-clock
    times, in order; a missing file is no move.  Lines that do not parse are skipped."""
    try:
        text = Path(path).read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        return []
    out: list[float] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1].lower() == mac.lower():
            try:
                out.append(float(parts[0]))
            except ValueError:
                continue
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m virtio_lm.net.switch", description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--idle-timeout", type=float, default=30.0)
    ap.add_argument("--lifetime", type=float, default=3600.0)
    ap.add_argument("--moves", help="append every MAC move here as it happens (TIME MAC HOST:PORT)")
    args = ap.parse_args(argv)
    sw = L2Switch(args.host, args.port, idle_timeout=args.idle_timeout, lifetime=args.lifetime, moves_path=args.moves)
    print(f"listening on {sw.address[0]}:{sw.address[1]}", flush=True)
    try:
        sw.serve()
    except KeyboardInterrupt:
        sw.stopped_because = "interrupted"
    sw.stop()
    print(f"stopped ({sw.stopped_because}); {dict(sw.stats)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
