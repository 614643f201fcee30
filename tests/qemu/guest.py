"""Real-QEMU harness for the vhost-user tests: kernel, initramfs, VMs, back-ends.

* :func:`guest_assets` finds (or, where apt-get exists, fetches and extracts
  with ``dpkg-deb -x``) Debian's ``linux-image-6.1.*-amd64`` into
  ``$VLM_GUEST_DIR`` (default ``/tmp/virtio-lm-guest``) and builds a
  busybox-static initramfs (newc cpio written here) with the virtio modules
  and ``init.sh``.  Returns ``(kernel, initramfs)`` or raises
  :class:`GuestUnavailable` with the reason.
* :class:`Backend` runs one vhost-user-blk back-end process: ours
  (``python -m virtio_lm.cli vhost-user-blk``) or ``qemu-storage-daemon``.
* :class:`Vm` runs ``qemu-system-x86_64 -accel tcg`` with memfd RAM
  (share=on), a vhost-user-blk device on the back-end's socket, the serial
  console on stdin/stdout and QMP on a UNIX socket; :meth:`Vm.sh` runs a
  shell command in the guest and returns its output and status.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GUEST_DIR = Path(os.environ.get("VLM_GUEST_DIR", "/tmp/virtio-lm-guest"))
MODULES = ["virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci", "virtio_blk"]
QEMU = "qemu-system-x86_64"


class GuestUnavailable(Exception):
    """QEMU, the kernel or busybox cannot be had here (the reason is the message)."""


# ---------------------------------------------------------------------------- assets
def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, **kw)  # type: ignore[call-overload]


def _extracted_kernel() -> tuple[Path, Path] | None:
    kernels = sorted(glob.glob(str(GUEST_DIR / "x/boot/vmlinuz-6.1.*-amd64")))
    if not kernels:
        return None
    kernel = Path(kernels[-1])
    version = kernel.name[len("vmlinuz-") :]
    mods = GUEST_DIR / "x/lib/modules" / version / "kernel"
    return (kernel, mods) if mods.is_dir() else None


def fetch_kernel() -> tuple[Path, Path]:
    """The extracted kernel and its module tree; fetched with apt-get download if missing."""
    found = _extracted_kernel()
    if found:
        return found
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise GuestUnavailable("no extracted linux-image-6.1 kernel and no apt-get/dpkg-deb to fetch one")
    GUEST_DIR.mkdir(parents=True, exist_ok=True)
    try:
        out = _run(["apt-cache", "depends", "linux-image-amd64"]).stdout.decode()
        m = re.search(r"Depends: (linux-image-6\.1\.\S+-amd64)", out)
        if not m:
            raise GuestUnavailable(f"apt-cache does not name a linux-image-6.1 package: {out.strip()[:200]}")
        _run(["apt-get", "download", m.group(1)], cwd=GUEST_DIR)
        debs = sorted(GUEST_DIR.glob("linux-image-6.1.*.deb"))
        _run(["dpkg-deb", "-x", str(debs[-1]), str(GUEST_DIR / "x")])
    except (subprocess.CalledProcessError, OSError) as exc:
        raise GuestUnavailable(f"could not fetch the kernel package: {exc}") from exc
    found = _extracted_kernel()
    if not found:
        raise GuestUnavailable("kernel package extracted but no vmlinuz-6.1.*-amd64 inside")
    return found


def _cpio_entry(name: str, mode: int, data: bytes = b"", ino: int = 1) -> bytes:
    """One newc cpio record (ASCII hex header, name and data padded to 4 bytes)."""
    nb = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0]
    hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
    out = hdr + nb
    out += b"\0" * (-len(out) % 4)
    out += data + b"\0" * (-len(data) % 4)
    return out


def build_initramfs(mods: Path, out: Path) -> None:
    busybox = shutil.which("busybox")
    if busybox is None:
        raise GuestUnavailable("busybox (busybox-static) is not installed")
    if b"/lib64/ld-linux" in Path(busybox).read_bytes()[:4096]:
        raise GuestUnavailable(f"{busybox} is dynamically linked (install busybox-static)")
    entries = []
    ino = 1
    for d in ("bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules", "vlm"):
        entries.append(_cpio_entry(d, 0o040755, ino=ino))
        ino += 1
    entries.append(_cpio_entry("bin/busybox", 0o100755, Path(busybox).read_bytes(), ino=ino))
    ino += 1
    entries.append(_cpio_entry("init", 0o100755, (HERE / "init.sh").read_bytes(), ino=ino))
    ino += 1
    for script in sorted(HERE.glob("*.sh")):
        if script.name != "init.sh":
            entries.append(_cpio_entry(f"vlm/{script.name}", 0o100755, script.read_bytes(), ino=ino))
            ino += 1
    rio = GUEST_DIR / "rio"
    if shutil.which("gcc") and (not rio.exists() or rio.stat().st_mtime < (HERE / "rio.c").stat().st_mtime):
        try:  # the 4 KiB random I/O tool of the figures (optional: figures skip random I/O without it)
            _run(["gcc", "-O2", "-static", "-o", str(rio), str(HERE / "rio.c")])
        except (subprocess.CalledProcessError, OSError):
            pass
    if rio.exists():
        entries.append(_cpio_entry("bin/rio", 0o100755, rio.read_bytes(), ino=ino))
        ino += 1
    for m in MODULES:
        hits = list(mods.rglob(f"{m}.ko"))
        if not hits:
            raise GuestUnavailable(f"module {m}.ko not found under {mods}")
        entries.append(_cpio_entry(f"lib/modules/{m}.ko", 0o100644, hits[0].read_bytes(), ino=ino))
        ino += 1
    entries.append(_cpio_entry("TRAILER!!!", 0, ino=0))
    out.write_bytes(b"".join(entries))


def guest_assets() -> tuple[Path, Path]:
    """``(kernel, initramfs)`` or GuestUnavailable."""
    for tool in (QEMU, "busybox"):
        if shutil.which(tool) is None:
            raise GuestUnavailable(f"{tool} is not installed (.ci/run installs qemu-system-x86 and busybox-static)")
    kernel, mods = fetch_kernel()
    initrd = GUEST_DIR / "initramfs.cpio"
    newest = max(p.stat().st_mtime for p in [*HERE.glob("*.sh"), HERE / "rio.c", HERE / "guest.py"])
    if not initrd.exists() or initrd.stat().st_mtime < newest:
        build_initramfs(mods, initrd)
    return kernel, initrd


# ---------------------------------------------------------------------------- back-ends
class Backend:
    """A vhost-user-blk back-end process on ``socket_path`` serving ``image``."""

    def __init__(self, kind: str, socket_path: str, image: str, *, no_dirty_log: bool = False, log_path: str | None = None) -> None:
        self.kind = kind
        self.socket_path = socket_path
        self.log_path = log_path or socket_path + ".log"
        if kind == "ours":
            cmd = [sys.executable, "-m", "virtio_lm.cli", "-v", "vhost-user-blk", "--socket", socket_path, "--image", image]
            if no_dirty_log:
                cmd.append("--unsafe-no-dirty-log")
        elif kind == "qsd":
            cmd = [
                "qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=file0,filename={image},cache.direct=off,locking=off",
                "--blockdev", "driver=raw,node-name=disk0,file=file0",
                "--export", f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={socket_path},writable=on",
            ]
        else:
            raise ValueError(kind)
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not os.path.exists(socket_path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"back-end {kind} did not start: {Path(self.log_path).read_text()[-2000:]}")
            time.sleep(0.05)

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return Path(self.log_path).read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# ---------------------------------------------------------------------------- VMs
class Vm:
    """One QEMU process (see the module docstring)."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        kernel: Path,
        initrd: Path,
        vhost_socket: str,
        *,
        incoming_port: int | None = None,
        memory_mib: int = 256,
        queues: int = 1,
    ) -> None:
        self.name = name
        self.qmp_path = str(workdir / f"{name}.qmp")
        self.console = bytearray()
        self._cv = threading.Condition()
        self._seq = 0
        cmd = [
            QEMU, "-accel", "tcg", "-nodefaults", "-display", "none", "-no-reboot",
            "-machine", "q35,memory-backend=mem",
            "-object", f"memory-backend-memfd,id=mem,size={memory_mib}M,share=on",
            "-m", f"{memory_mib}M", "-smp", "1",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 quiet loglevel=3 init_on_alloc=0",
            "-chardev", f"socket,id=vu0,path={vhost_socket}",
            "-device", f"vhost-user-blk-pci,chardev=vu0,num-queues={queues}",
            "-serial", "stdio",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]
        if incoming_port is not None:
            cmd += ["-incoming", f"tcp:127.0.0.1:{incoming_port}"]
        self.stderr_path = workdir / f"{name}.stderr"
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()
        self._qmp: socket.socket | None = None
        self._qbuf = b""

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        while True:
            chunk = self.proc.stdout.read1(65536)  # type: ignore[attr-defined]
            if not chunk:
                break
            with self._cv:
                self.console += chunk
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def text(self) -> str:
        with self._cv:
            return self.console.decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> re.Match[str]:
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                m = rx.search(self.console.decode(errors="replace"), start)
                if m:
                    return m
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name}: QEMU exited ({self.proc.returncode}): {self.diag()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.name}: no {pattern!r} in {timeout}s; console tail:\n{self.diag()}")
                self._cv.wait(min(left, 0.5))

    def diag(self) -> str:
        err = self.stderr_path.read_text(errors="replace")[-1500:] if self.stderr_path.exists() else ""
        return f"console: ...{self.text()[-2500:]}\nstderr: {err}"

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def sh(self, command: str, timeout: float = 60.0) -> tuple[int, str]:
        """Run ``command`` in the guest shell; ``(status, output)``."""
        self._seq += 1
        n = self._seq
        with self._cv:
            start = len(self.console.decode(errors="replace"))
        self.send(f'{command}; echo "@@""END {n} $?"')
        m = self.wait_for(rf"^@@END {n} (\d+)", timeout, start)
        return int(m.group(1)), self.text()[start : m.start()].strip()

    def boot(self, timeout: float = 90.0) -> int:
        """Wait for init's VLM_READY; returns /dev/vda's size in sectors."""
        m = self.wait_for(r"^VLM_READY ?(\d*)", timeout)
        self.sh("true")  # the shell's banner goes to this first command
        return int(m.group(1) or 0)

    # -------------------------------------------------------------- QMP
    def qmp(self, command: str, **arguments: object) -> dict:
        if self._qmp is None:
            deadline = time.monotonic() + 30
            while True:
                try:
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.connect(self.qmp_path)
                    break
                except OSError:
                    s.close()
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            s.settimeout(60)
            self._qmp = s
            self._qmp_read()  # greeting
            self._qmp_cmd("qmp_capabilities", {})
        return self._qmp_cmd(command, arguments)

    def _qmp_read(self) -> dict:
        assert self._qmp is not None
        while True:
            while b"\n" not in self._qbuf:
                chunk = self._qmp.recv(65536)
                if not chunk:
                    raise RuntimeError(f"{self.name}: QMP closed")
                self._qbuf += chunk
            line, self._qbuf = self._qbuf.split(b"\n", 1)
            if line.strip():
                return json.loads(line)

    def _qmp_cmd(self, command: str, arguments: dict) -> dict:
        assert self._qmp is not None
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments  # type: ignore[assignment]
        self._qmp.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._qmp_read()
            if "event" in r:
                continue
            if "error" in r:
                raise RuntimeError(f"{self.name}: QMP {command}: {r['error']}")
            return r["return"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.qmp("quit")
            except (OSError, RuntimeError):  # a socket timeout is an OSError: then it is killed
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._qmp is not None:
            self._qmp.close()
        self._stderr.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
