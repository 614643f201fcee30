"""A Linux guest under QEMU (TCG) driven from Python: what the QEMU baseline and the real-QEMU tests share.

* :func:`fetch_kernel` finds (or, where apt-get exists, fetches with ``apt-get download`` and
  extracts with ``dpkg-deb -x``) Debian's ``linux-image-6.1.*-amd64`` under ``$VLM_GUEST_DIR``
  (default ``/tmp/virtio-lm-guest``): the kernel and its module tree, not installed.
* :func:`static_busybox` is the host's busybox, refused unless statically linked.
* :func:`cpio_entry` writes one record of a newc cpio archive (an initramfs).
* :class:`QemuProcess` is one ``qemu-system-x86_64`` process: its serial console on
  stdin/stdout (:meth:`~QemuProcess.sh` runs a shell command in the guest and returns its
  status and output) and QMP on a UNIX socket (replies and events, events kept with their
  timestamps).  Every wait is bounded by a host-side deadline (``time.monotonic()``).

Nothing is QEMU's code; the facts used are QEMU's command line and QMP's wire format.
"""

from __future__ import annotations

import glob
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

__all__ = [
    "GUEST_DIR",
    "QEMU",
    "QemuProcess",
    "QemuProcessError",
    "QemuUnavailable",
    "qemu11",
    "cpio_entry",
    "fetch_kernel",
    "static_busybox",
]

QEMU = "qemu-system-x86_64"
GUEST_DIR = Path(os.environ.get("VLM_GUEST_DIR", "/tmp/virtio-lm-guest"))


class QemuUnavailable(Exception):
    """QEMU, the kernel, busybox-static or gcc cannot be had here (the reason is the message)."""


class QemuProcessError(RuntimeError):
    """A QEMU process exited, did not answer in time, or answered QMP with an error."""


# ---------------------------------------------------------------------------- assets
def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, timeout=600, **kw)


def _extracted_kernel() -> tuple[Path, Path] | None:
    kernels = sorted(glob.glob(str(GUEST_DIR / "x/boot/vmlinuz-6.1.*-amd64")))
    if not kernels:
        return None
    kernel = Path(kernels[-1])
    mods = GUEST_DIR / "x/lib/modules" / kernel.name[len("vmlinuz-") :] / "kernel"
    return (kernel, mods) if mods.is_dir() else None


def fetch_kernel() -> tuple[Path, Path]:
    """``(vmlinuz, module tree)`` of the extracted kernel; fetched first if missing."""
    found = _extracted_kernel()
    if found:
        return found
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise QemuUnavailable("no extracted linux-image-6.1 kernel and no apt-get/dpkg-deb to fetch one")
    GUEST_DIR.mkdir(parents=True, exist_ok=True)
    try:
        out = _run(["apt-cache", "depends", "linux-image-amd64"]).stdout.decode()
        m = re.search(r"Depends: (linux-image-6\.1\.\S+-amd64)", out)
        if not m:
            raise QemuUnavailable(f"apt-cache names no linux-image-6.1 package: {out.strip()[:200]}")
        _run(["apt-get", "download", m.group(1)], cwd=GUEST_DIR)
        debs = sorted(GUEST_DIR.glob("linux-image-6.1.*.deb"))
        _run(["dpkg-deb", "-x", str(debs[-1]), str(GUEST_DIR / "x")])
    except (subprocess.SubprocessError, OSError, IndexError) as exc:
        raise QemuUnavailable(f"could not fetch the kernel package: {exc}") from exc
    found = _extracted_kernel()
    if not found:
        raise QemuUnavailable("kernel package extracted but no vmlinuz-6.1.*-amd64 (with its modules) inside")
    return found


def static_busybox() -> bytes:
    """The host's busybox binary; QemuUnavailable unless it is there and statically linked."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise QemuUnavailable("busybox (busybox-static) is not installed")
    data = Path(busybox).read_bytes()
    if b"/lib64/ld-linux" in data[:4096]:
        raise QemuUnavailable(f"{busybox} is dynamically linked (install busybox-static)")
    return data


def cpio_entry(name: str, mode: int, data: bytes = b"", ino: int = 1) -> bytes:
    """One newc cpio record: the ASCII-hex header, the name and the data, each padded to 4 bytes."""
    nb = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0]
    rec = b"070701" + b"".join(b"%08X" % f for f in fields) + nb
    rec += b"\0" * (-len(rec) % 4)
    return rec + data + b"\0" * (-len(data) % 4)


QEMU11_DIR = Path(os.environ.get("VLM_QEMU11_DIR", str(GUEST_DIR / "qemu11")))
FETCH_QEMU11 = Path(__file__).resolve().parents[2] / "scripts" / "fetch-qemu11"


def qemu11(fetch: bool = True) -> list[str]:
    """The command that starts the extracted QEMU 11.1 (Debian trixie-backports; it has the
    vfio-user-pci client), through its own dynamic loader and libraries, with its firmware.
    Fetched by ``scripts/fetch-qemu11`` first when missing and ``fetch``; QemuUnavailable when
    it cannot be had."""
    root = QEMU11_DIR / "root"
    binary = root / "usr/bin/qemu-system-x86_64"
    if not binary.exists() and fetch and FETCH_QEMU11.exists():
        try:
            _run(["bash", str(FETCH_QEMU11)])
        except (subprocess.SubprocessError, OSError) as exc:
            err = getattr(exc, "stderr", b"") or b""
            raise QemuUnavailable(f"could not fetch QEMU 11.1 from trixie-backports: {exc} {err.decode()[-300:]}") from exc
    if not binary.exists():
        raise QemuUnavailable(f"QEMU 11.1 is not extracted under {QEMU11_DIR} (scripts/fetch-qemu11 fetches it)")
    libs = f"{root}/usr/lib/x86_64-linux-gnu"
    return [f"{libs}/ld-linux-x86-64.so.2", "--library-path", libs, str(binary),
            "-L", str(root / "usr/share/qemu"), "-L", str(root / "usr/share/seabios")]


# ---------------------------------------------------------------------------- a QEMU process
class QemuProcess:
    """``qemu-system-x86_64 ARGS -serial stdio -qmp unix:QMP_PATH`` (see the module docstring).

    ``error`` is the exception class raised on a failure (a subclass of Exception taking a
    message), so each user keeps its own error type; ``binary`` the command that starts QEMU
    (default ``qemu-system-x86_64``; :func:`qemu11` for the extracted QEMU 11.1)."""

    def __init__(
        self, name: str, workdir: Path, args: list[str], qmp_path: str, *,
        error: type[Exception] = QemuProcessError, binary: list[str] | None = None,
    ) -> None:
        self.name = name
        self.qmp_path = qmp_path
        self.stderr_path = Path(workdir) / f"{name}.stderr"
        self.error = error
        self.console = bytearray()
        self.events: list[dict[str, Any]] = []
        self._cv = threading.Condition()
        self._replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._sock: socket.socket | None = None
        self._seq = 0
        cmd = [*(binary or [QEMU]), *args, "-serial", "stdio", "-qmp", f"unix:{qmp_path},server=on,wait=off"]
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        threading.Thread(target=self._pump_console, name=f"{name}-console", daemon=True).start()

    # -------------------------------------------------------------- console
    def _pump_console(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(65536):  # type: ignore[attr-defined]
            with self._cv:
                self.console += chunk
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def text(self) -> str:
        with self._cv:
            return self.console.decode(errors="replace")

    def wait_for(self, pattern: str, deadline: float, start: int = 0) -> re.Match[str]:
        """The first match of ``pattern`` (multi-line) in the console's complete lines from ``start``.

        Only text up to the console's last newline is searched (all of it once QEMU has exited):
        the serial console arrives a few bytes at a time, and ``^DIRTIER_PID ([0-9]+)`` run over
        "DIRTIER_PID 8" of a line that will read "DIRTIER_PID 86" matches the wrong number."""
        rx = re.compile(pattern, re.M)
        with self._cv:
            while True:
                text = self.console.decode(errors="replace")
                exited = self.proc.poll() is not None
                end = len(text) if exited else text.rfind("\n") + 1
                m = rx.search(text, start, end) if end > start else None
                if m:
                    return m
                if exited:
                    raise self.error(f"{self.name}: QEMU exited ({self.proc.returncode}) waiting for {pattern!r}\n"
                                     f"{self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self.error(f"{self.name}: no {pattern!r} on the console in time\n{self.tail()}")
                self._cv.wait(min(left, 0.5))

    def send(self, line: str) -> None:
        """A line to the guest's console."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def sh(self, command: str, deadline: float) -> tuple[int, str]:
        """Run ``command`` in the guest shell on the console; ``(status, output)``."""
        self._seq += 1
        n = self._seq
        start = len(self.text())
        self.send(f'{command}\necho "@@""END {n} $?"')  # on its own line: a command may end in &
        m = self.wait_for(rf"^@@END {n} (\d+)", deadline, start)
        return int(m.group(1)), self.text()[start : m.start()].strip()

    def tail(self) -> str:
        err = self.stderr_path.read_text(errors="replace")[-1500:] if self.stderr_path.exists() else ""
        return f"--- {self.name} console tail:\n{self.text()[-2500:]}\n--- {self.name} stderr tail:\n{err}"

    # -------------------------------------------------------------- QMP
    def connect(self, deadline: float) -> None:
        """Connect to QMP (waiting for the socket), read the greeting, negotiate capabilities."""
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.qmp_path)
                break
            except (FileNotFoundError, ConnectionRefusedError):  # not up yet
                s.close()
                if self.proc.poll() is not None:
                    raise self.error(f"{self.name}: QEMU exited ({self.proc.returncode}) before QMP\n{self.tail()}")
                if time.monotonic() > deadline:
                    raise self.error(f"{self.name}: QMP socket did not come up in time")
                time.sleep(0.05)
        self._sock = s
        threading.Thread(target=self._pump_qmp, args=(s,), name=f"{self.name}-qmp", daemon=True).start()
        try:
            greeting = self._replies.get(timeout=max(1.0, deadline - time.monotonic()))
        except queue.Empty:
            raise self.error(f"{self.name}: no QMP greeting in time") from None
        if not greeting or "QMP" not in greeting:
            raise self.error(f"{self.name}: no QMP greeting ({greeting})")
        self.qmp("qmp_capabilities", deadline)

    def _pump_qmp(self, s: socket.socket) -> None:
        buf = b""
        try:
            while chunk := s.recv(65536):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if not line.strip():
                        continue
                    msg = json.loads(line)
                    if "event" in msg:
                        with self._cv:
                            self.events.append(msg)
                            self._cv.notify_all()
                    else:
                        self._replies.put(msg)
        except (OSError, ValueError):
            pass
        self._replies.put(None)

    def qmp(self, command: str, deadline: float, **arguments: Any) -> Any:
        """Execute ``command``; its ``return`` value (connects first if need be)."""
        if self._sock is None:
            self.connect(deadline)
        assert self._sock is not None
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        try:
            r = self._replies.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise self.error(f"{self.name}: no QMP reply to {command} in time") from None
        if r is None:
            raise self.error(f"{self.name}: QMP connection closed during {command}")
        if "error" in r:
            raise self.error(f"{self.name}: QMP {command}: {r['error']}")
        return r["return"]

    def wait_event(self, name: str, deadline: float) -> dict[str, Any]:
        """The last ``name`` event received, waiting for one until ``deadline``."""
        with self._cv:
            while True:
                hits = [e for e in self.events if e["event"] == name]
                if hits:
                    return hits[-1]
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise self.error(f"{self.name}: no {name} QMP event")
                self._cv.wait(min(left, 0.5))

    # -------------------------------------------------------------- the end
    def quit(self, timeout: float = 10.0) -> None:
        """QMP ``quit`` and wait for the exit; killed if that fails or takes too long."""
        if self.proc.poll() is None:
            try:
                self.qmp("quit", time.monotonic() + timeout)
            except Exception:  # noqa: BLE001 - a process that does not quit is killed below
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        if self._sock is not None:
            self._sock.close()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass


def event_time(ev: dict[str, Any]) -> float:
    """A QMP event's timestamp in seconds."""
    ts = ev["timestamp"]
    return ts["seconds"] + ts["microseconds"] / 1e6
