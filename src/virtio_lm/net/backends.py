"""Where a net VF's frames go: a port of the embedded UDP switch, or a Linux TAP.

A :class:`NetBackend` moves whole Ethernet frames (no virtio-net header):
:meth:`~NetBackend.send` puts one on the wire, and frames from the wire are
handed to the ``deliver`` callable given to :meth:`~NetBackend.attach`, on
the back-end's own receive thread.  The receive thread polls with a short
timeout and ends at :meth:`~NetBackend.close`.

Link-level flow control: :meth:`~NetBackend.pause_tx` holds the transmit
side (XOFF) -- a frame the device wants to send waits in
:meth:`~NetBackend.wait_tx_ready` (like a NIC whose link partner sent
PAUSE) until :meth:`~NetBackend.resume_tx`, or until credits arrive
(:meth:`~NetBackend.grant_tx`: credit-based flow control, exactly ``n``
more frames may go).  The device can abandon the wait (a FREEZE: the frame
was never put on the wire and is sent after migration instead).
"""

from __future__ import annotations

import collections
import errno
import fcntl
import os
import select
import socket
import threading
from typing import Callable

from virtio_lm.errors import BackendError, BackendUnavailableError
from virtio_lm.errors import WireError
from virtio_lm.net.switch import POLL, Addr, big_buffers
from virtio_lm.wire.switch import (
    CAP_BATCHES,
    KIND_BYE,
    KIND_FRAME,
    KIND_FRAMES,
    MAX_FRAME,
    decode_frames,
    frame_message,
    hello_message,
    pack_frames,
)

Deliver = Callable[[bytes], None]


class NetBackend:
    """Base of the back-ends: flow control, counters, the receive thread."""

    kind = "backend"

    def __init__(self, name: str) -> None:
        self.name = name
        self.stats: collections.Counter[str] = collections.Counter()
        self._tx_cond = threading.Condition()
        self._credits: int | None = None  # None: transmit freely; n: n more frames may go
        self._closed = threading.Event()
        self._deliver: Deliver | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ flow control
    def pause_tx(self) -> None:
        with self._tx_cond:
            self._credits = 0

    def resume_tx(self) -> None:
        with self._tx_cond:
            self._credits = None
            self._tx_cond.notify_all()

    def grant_tx(self, n: int) -> None:
        """Let ``n`` more frames through a paused transmit side."""
        with self._tx_cond:
            if self._credits is not None:
                self._credits += n
                self._tx_cond.notify_all()

    def wake_tx(self) -> None:
        """Make a transmit waiting for credit look at its abort flag now."""
        with self._tx_cond:
            self._tx_cond.notify_all()

    @property
    def tx_paused(self) -> bool:
        return self._credits == 0

    def try_tx_ready(self, abort: threading.Event) -> bool:
        """:meth:`wait_tx_ready` without the wait: take a credit if one is there now."""
        with self._tx_cond:
            if self._credits == 0 or abort.is_set() or self._closed.is_set():
                return False
            if self._credits is not None:
                self._credits -= 1
            return True

    def tx_unmetered(self, abort: threading.Event) -> bool:
        """Whether any number of frames may go now: no pause or credit limit, ``abort`` clear, open."""
        return self._credits is None and not abort.is_set() and not self._closed.is_set()

    def wait_tx_ready(self, abort: threading.Event) -> bool:
        """Wait until one frame may go (taking a credit); False if ``abort`` is set first (or closed)."""
        with self._tx_cond:
            while self._credits == 0:
                if abort.is_set() or self._closed.is_set():
                    return False
                self._tx_cond.wait(POLL)
            if abort.is_set():
                return False
            if self._credits is not None:
                self._credits -= 1
            return True

    # ------------------------------------------------------------------ receive
    def attach(self, deliver: Deliver) -> None:
        """Start handing received frames to ``deliver`` (once)."""
        if self._thread is not None:
            raise BackendError(f"{self.name}: already attached")
        self._deliver = deliver
        self._thread = threading.Thread(target=self._rx_loop, name=f"{self.name}-rx", daemon=True)
        self._thread.start()

    def _rx_loop(self) -> None:
        while not self._closed.is_set():
            try:
                frame = self._recv()
            except OSError:
                if self._closed.is_set():
                    return
                self.stats["rx_errors"] += 1
                continue
            if frame is None:
                continue
            assert self._deliver is not None
            if isinstance(frame, list):  # a burst, in order
                self.stats["rx_frames"] += len(frame)
                for f in frame:
                    self._deliver(f)
                continue
            self.stats["rx_frames"] += 1
            self._deliver(frame)

    def _recv(self) -> bytes | list[bytes] | None:  # a frame or a burst, or None after a poll timeout
        raise NotImplementedError

    def send(self, frame: bytes) -> None:
        raise NotImplementedError

    def send_many(self, frames: list[bytes]) -> None:
        """Send ``frames`` in order (as few system calls as the back-end can); raises BackendError
        at the first that cannot go (those before it went)."""
        for f in frames:
            self.send(f)

    def close(self) -> None:
        self._closed.set()
        with self._tx_cond:
            self._tx_cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)


class UdpSwitchPort(NetBackend):
    """One port of an :class:`~virtio_lm.net.switch.L2Switch` (a UDP endpoint on loopback)."""

    kind = "udp-switch"

    def __init__(self, switch: Addr, *, name: str = "switch-port", host: str = "127.0.0.1") -> None:
        super().__init__(name)
        self.switch = (switch[0], int(switch[1]))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        big_buffers(self.sock)
        self.sock.bind((host, 0))
        self.sock.settimeout(POLL)
        self.local_addr: Addr = self.sock.getsockname()
        self.sock.sendto(hello_message(CAP_BATCHES), self.switch)  # bursts welcome

    def _recv(self) -> bytes | list[bytes] | None:
        try:
            data, src = self.sock.recvfrom(65536)
        except socket.timeout:
            return None
        if src != self.switch or not data or data[0] not in (KIND_FRAME, KIND_FRAMES):
            self.stats["rx_foreign"] += 1
            return None
        if data[0] == KIND_FRAMES:
            try:
                return decode_frames(memoryview(data)[1:])
            except WireError:
                self.stats["rx_bad_batch"] += 1
                return None
        return data[1:]

    def send(self, frame: bytes) -> None:
        if len(frame) > MAX_FRAME:
            raise BackendError(f"{self.name}: frame of {len(frame)} bytes is larger than {MAX_FRAME}")
        try:
            self.sock.sendto(frame_message(frame), self.switch)
        except OSError as exc:
            raise BackendError(f"{self.name}: send to switch {self.switch} failed: {exc}") from exc
        self.stats["tx_frames"] += 1
        self.stats["tx_bytes"] += len(frame)

    def send_many(self, frames: list[bytes]) -> None:
        """A burst: FRAMES datagrams of as many frames as fit (:func:`~virtio_lm.wire.switch.pack_frames`)."""
        try:
            msgs = pack_frames(frames)
        except WireError as exc:
            raise BackendError(f"{self.name}: {exc}") from exc
        for m in msgs:
            try:
                self.sock.sendto(m, self.switch)
            except OSError as exc:
                raise BackendError(f"{self.name}: send to switch {self.switch} failed: {exc}") from exc
        self.stats["tx_frames"] += len(frames)
        self.stats["tx_bytes"] += sum(len(f) for f in frames)

    def close(self) -> None:
        if not self._closed.is_set():
            try:
                self.sock.sendto(bytes((KIND_BYE,)), self.switch)
            except OSError:
                pass
        super().close()
        self.sock.close()


# ------------------------------------------------------------------ TAP
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFNAMSIZ = 16
IFREQ_SIZE = 40


def _ifreq(name: str, flags: int = 0) -> bytes:
    raw = name.encode()
    if not 0 < len(raw) < IFNAMSIZ:
        raise BackendError(f"interface name {name!r} must be 1..{IFNAMSIZ - 1} bytes")
    return raw.ljust(IFNAMSIZ, b"\0") + (flags & 0xFFFF).to_bytes(2, "little") + bytes(IFREQ_SIZE - IFNAMSIZ - 2)


class TapBackend(NetBackend):
    """A Linux TAP interface (IFF_TAP | IFF_NO_PI): frames in and out of the host's stack.

    Raises :class:`BackendUnavailableError` when ``/dev/net/tun`` is missing
    or the process may not create the interface (no CAP_NET_ADMIN).  The
    interface is brought up (IFF_UP) so that frames written to it reach the
    host side; it disappears when closed.
    """

    kind = "tap"

    def __init__(self, ifname: str = "vlmtap%d", *, bring_up: bool = True) -> None:
        super().__init__(f"tap:{ifname}")
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        except FileNotFoundError as exc:
            raise BackendUnavailableError("tap", "/dev/net/tun does not exist") from exc
        except PermissionError as exc:
            raise BackendUnavailableError("tap", f"/dev/net/tun cannot be opened: {exc}") from exc
        except OSError as exc:
            raise BackendUnavailableError("tap", f"/dev/net/tun: {exc}") from exc
        try:
            res = fcntl.ioctl(self.fd, TUNSETIFF, _ifreq(ifname, IFF_TAP | IFF_NO_PI))
        except OSError as exc:
            os.close(self.fd)
            why = "no CAP_NET_ADMIN" if exc.errno in (errno.EPERM, errno.EACCES) else str(exc)
            raise BackendUnavailableError("tap", f"TUNSETIFF refused: {why}") from exc
        self.ifname = res[:IFNAMSIZ].rstrip(b"\0").decode()
        self.name = f"tap:{self.ifname}"
        if bring_up:
            try:
                self.set_up(True)
            except OSError as exc:
                os.close(self.fd)
                raise BackendUnavailableError("tap", f"cannot bring {self.ifname} up: {exc}") from exc

    def set_up(self, up: bool) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            cur = fcntl.ioctl(s, SIOCGIFFLAGS, _ifreq(self.ifname))
            flags = int.from_bytes(cur[IFNAMSIZ : IFNAMSIZ + 2], "little")
            flags = flags | IFF_UP if up else flags & ~IFF_UP
            fcntl.ioctl(s, SIOCSIFFLAGS, _ifreq(self.ifname, flags))

    def _recv(self) -> bytes | None:
        r, _, _ = select.select([self.fd], [], [], POLL)
        if not r:
            return None
        try:
            return os.read(self.fd, 65536)
        except BlockingIOError:
            return None

    def send(self, frame: bytes) -> None:
        try:
            os.write(self.fd, frame)
        except OSError as exc:
            raise BackendError(f"{self.name}: write failed: {exc}") from exc
        self.stats["tx_frames"] += 1
        self.stats["tx_bytes"] += len(frame)

    def close(self) -> None:
        first = not self._closed.is_set()
        super().close()
        if first:
            os.close(self.fd)
