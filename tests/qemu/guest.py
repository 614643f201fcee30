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

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from virtio_lm.qemu_guest import (
    GUEST_DIR,
    QEMU,
    QemuProcess,
    QemuUnavailable,
    cpio_entry,
    fetch_kernel,
    static_busybox,
)

HERE = Path(__file__).resolve().parent
MODULES = [
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci", "virtio_blk",
    "failover", "net_failover", "virtio_net",
]  # fmt: skip
#: static guest tools built from tests/qemu/NAME.c (optional: tests needing one skip without it)
TOOLS = ["rio", "udpx", "chan", "wver", "ublast", "usink"]

#: how much slower than a quiet 2-core machine this one may be: every host-side deadline of the
#: real-QEMU tests is multiplied by it (VLM_QEMU_SLOW, default 1)
SCALE = float(os.environ.get("VLM_QEMU_SLOW", "1"))

GuestUnavailable = QemuUnavailable  # the name these tests use: QEMU, the kernel or busybox cannot be had here


# ---------------------------------------------------------------------------- assets
def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, **kw)  # type: ignore[call-overload]


def build_initramfs(mods: Path, out: Path) -> None:
    busybox = static_busybox()
    entries = []
    ino = 1
    for d in ("bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules", "vlm"):
        entries.append(cpio_entry(d, 0o040755, ino=ino))
        ino += 1
    entries.append(cpio_entry("bin/busybox", 0o100755, busybox, ino=ino))
    ino += 1
    entries.append(cpio_entry("init", 0o100755, (HERE / "init.sh").read_bytes(), ino=ino))
    ino += 1
    for script in sorted(HERE.glob("*.sh")):
        if script.name != "init.sh":
            entries.append(cpio_entry(f"vlm/{script.name}", 0o100755, script.read_bytes(), ino=ino))
            ino += 1
    for tool in TOOLS:
        src = HERE / f"{tool}.c"
        exe = GUEST_DIR / f"{tool}-{hashlib.sha256(src.read_bytes()).hexdigest()[:12]}"
        if shutil.which("gcc") and not exe.exists():
            try:  # rio: the figures' 4 KiB random I/O; udpx / chan: the vhost-user-net tests
                _run(["gcc", "-O2", "-static", "-pthread", "-o", str(exe) + ".tmp", str(src)])
                os.replace(str(exe) + ".tmp", exe)
            except (subprocess.CalledProcessError, OSError):
                pass
        if exe.exists():
            entries.append(cpio_entry(f"bin/{tool}", 0o100755, exe.read_bytes(), ino=ino))
            ino += 1
    for m in MODULES:
        hits = list(mods.rglob(f"{m}.ko"))
        if not hits:
            raise GuestUnavailable(f"module {m}.ko not found under {mods}")
        entries.append(cpio_entry(f"lib/modules/{m}.ko", 0o100644, hits[0].read_bytes(), ino=ino))
        ino += 1
    entries.append(cpio_entry("TRAILER!!!", 0, ino=0))
    out.write_bytes(b"".join(entries))


def guest_assets() -> tuple[Path, Path]:
    """``(kernel, initramfs)`` or GuestUnavailable."""
    for tool in (QEMU, "busybox"):
        if shutil.which(tool) is None:
            raise GuestUnavailable(f"{tool} is not installed (.ci/run installs qemu-system-x86 and busybox-static)")
    kernel, mods = fetch_kernel()
    # named by what goes in: worktrees with other scripts (other branches) never share one
    h = hashlib.sha256(repr(MODULES).encode() + str(mods).encode())
    for p in sorted([*HERE.glob("*.sh"), *HERE.glob("*.c")]):
        h.update(p.name.encode() + p.read_bytes())
    h.update(bytes(shutil.which("gcc") is not None))
    initrd = GUEST_DIR / f"initramfs-{h.hexdigest()[:16]}.cpio"
    if not initrd.exists():
        build_initramfs(mods, Path(str(initrd) + f".{os.getpid()}"))
        os.replace(str(initrd) + f".{os.getpid()}", initrd)
    return kernel, initrd


# ---------------------------------------------------------------------------- back-ends
class _BackendProcess:
    """What both back-end processes offer: their log, the counters they write at exit, a stop
    (SIGTERM, then SIGKILL after :attr:`STOP_GRACE` seconds)."""

    STOP_GRACE = 10.0
    log_path: str
    stats_path: str
    proc: subprocess.Popen
    log: Any

    def stats(self) -> dict:
        import json

        try:
            return json.loads(Path(self.stats_path).read_text())
        except (OSError, ValueError):
            return {}

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return Path(self.log_path).read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(self.STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.log.closed:
            self.log.close()


class Backend(_BackendProcess):
    """A vhost-user-blk back-end process on ``socket_path`` serving ``image``."""

    def __init__(self, kind: str, socket_path: str, image: str, *, no_dirty_log: bool = False, log_path: str | None = None,
                 queues: int = 1, hold_after: int | None = None, timeout: float = 30.0, src: str | None = None) -> None:
        """``src``: run ours from that source tree (another checkout's ``src``, for a baseline
        of the code in the same run) instead of the installed package."""
        self.kind = kind
        self.socket_path = socket_path
        self.log_path = log_path or socket_path + ".log"
        self.stats_path = socket_path + ".stats.json"
        if kind in ("ours", "ours-buffered"):
            cmd = [sys.executable, "-m", "virtio_lm.cli", "-v", "vhost-user-blk", "--socket", socket_path, "--image", image,
                   "--queues", str(queues), "--stats", self.stats_path]
            if kind == "ours-buffered":  # the image read into a buffer, then copied to the guest
                cmd.append("--buffered-io")
            if no_dirty_log:
                cmd.append("--unsafe-no-dirty-log")
            if hold_after is not None:
                cmd += ["--unsafe-hold-after", str(hold_after)]
        elif kind == "qsd":
            cmd = [
                "qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=file0,filename={image},cache.direct=off,locking=off",
                "--blockdev", "driver=raw,node-name=disk0,file=file0",
                "--export", f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={socket_path},writable=on",
            ]
        else:
            raise ValueError(kind)
        env = None
        if src is not None:
            if kind == "qsd":
                raise ValueError("src is for our back-end")
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (src, os.environ.get("PYTHONPATH"))))}
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout * SCALE
        # ours says when it listens (a socket file left by a killed predecessor is no sign)
        while not os.path.exists(socket_path) or (kind != "qsd" and "serving" not in self.output()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"back-end {kind} did not start: {Path(self.log_path).read_text()[-2000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL (no clean-up of any kind: the socket file stays)."""
        self.proc.kill()
        self.proc.wait()
        self.log.close()


# ---------------------------------------------------------------------------- VMs
class Vm:
    """One QEMU process (see the module docstring): a :class:`~virtio_lm.qemu_guest.QemuProcess`
    with memfd RAM and a vhost-user-blk device, waits given as timeouts in seconds.

    ``net_socket``: a virtio-net device on a vhost-user-net back-end; ``user_net``: the same
    device on QEMU's own ``-netdev user`` instead (``user_udp_fwd=(HP, GP)``: datagrams sent to the
    host's 127.0.0.1:HP reach the guest's UDP port GP); ``tap``: on the host's TAP interface of that
    name (``-netdev tap``, QEMU's own user-space back-end, no vhost-net) -- at most one of the three."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        kernel: Path,
        initrd: Path,
        vhost_socket: str | None,
        *,
        incoming_port: int | None = None,
        memory_mib: int = 256,
        queues: int = 1,
        net_socket: str | None = None,
        net_queues: int = 1,
        mac: str = "52:54:00:12:34:56",
        blk_reconnect: int | None = None,
        smp: int = 1,
        user_net: bool = False,
        user_udp_fwd: tuple[int, int] | None = None,
        tap: str | None = None,
    ) -> None:
        self.name = name
        # RAM 8 KiB short of memory_mib: not a multiple of 64 pages.  QEMU 7.2 under TCG loses
        # dirty pages on its word-at-a-time dirty-bitmap sync, taken when RAM is a multiple of 64
        # pages (fixed upstream in 9.0, commit 03bfc2188f06); the per-page path is correct.  With
        # 256M a migrated guest's kernel could oops on the destination (a CI run under stress-ng
        # did: kmem_cache_alloc), which no back-end of ours can cause or prevent.
        ram_k = memory_mib * 1024 - 8
        args = [
            "-accel", "tcg", "-nodefaults", "-display", "none", "-no-reboot",
            "-machine", "q35,memory-backend=mem",
            "-object", f"memory-backend-memfd,id=mem,size={ram_k}k,share=on",
            "-m", f"{ram_k}k", "-smp", str(smp),
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 quiet loglevel=3 init_on_alloc=0" + ("" if vhost_socket else " vlm_nodisk"),
        ]  # fmt: skip
        if vhost_socket is not None:
            rc = f",reconnect={blk_reconnect}" if blk_reconnect else ""
            args += ["-chardev", f"socket,id=vu0,path={vhost_socket}{rc}",
                     "-device", f"vhost-user-blk-pci,chardev=vu0,num-queues={queues}"]  # fmt: skip
        if net_socket is not None:
            # vectors=0 (INTx): with MSI-X, QEMU 7.2 crashes in vhost_net_start (unmasking the
            # config interrupt calls vhost-user's missing set_config_call)
            mq = ",mq=on" if net_queues > 1 else ""
            mq += ",vectors=0"
            args += ["-chardev", f"socket,id=vn0,path={net_socket}",
                     "-netdev", f"vhost-user,id=net0,chardev=vn0,queues={net_queues}",
                     "-device", f"virtio-net-pci,netdev=net0,mac={mac}{mq}"]  # fmt: skip
        if user_net:
            # QEMU's own user-mode network (slirp) on the same device (vectors=0 as above, so
            # that the two set-ups differ only in the back-end): the guest is 10.0.2.15/24 by
            # convention, and datagrams it sends to 10.0.2.2:PORT arrive at the host's 127.0.0.1:PORT
            if net_socket is not None:
                raise ValueError("one NIC: net_socket or user_net, not both")
            fwd = ""
            if user_udp_fwd is not None:  # host 127.0.0.1:HP -> guest :GP (the receive direction)
                fwd = f",hostfwd=udp:127.0.0.1:{user_udp_fwd[0]}-:{user_udp_fwd[1]}"
            args += ["-netdev", f"user,id=net0{fwd}",
                     "-device", f"virtio-net-pci,netdev=net0,mac={mac},vectors=0"]  # fmt: skip
        if tap is not None:
            if net_socket is not None or user_net:
                raise ValueError("one NIC: net_socket, user_net or tap")
            args += ["-netdev", f"tap,id=net0,ifname={tap},script=no,downscript=no,vhost=off",
                     "-device", f"virtio-net-pci,netdev=net0,mac={mac},vectors=0"]  # fmt: skip
        if incoming_port is not None:
            args += ["-incoming", f"tcp:127.0.0.1:{incoming_port}"]
        self.q = QemuProcess(name, workdir, args, str(workdir / f"{name}.qmp"), error=RuntimeError)
        self.proc = self.q.proc

    def text(self) -> str:
        return self.q.text()

    def wait_for(self, pattern: str, timeout: float, start: int = 0):  # -> re.Match[str]
        try:
            return self.q.wait_for(pattern, time.monotonic() + timeout, start)
        except RuntimeError as exc:
            if self.q.proc.poll() is None:
                raise TimeoutError(str(exc)) from None
            raise

    def diag(self) -> str:
        return self.q.tail()

    def send(self, line: str) -> None:
        self.q.send(line)

    def sh(self, command: str, timeout: float = 60.0) -> tuple[int, str]:
        """Run ``command`` in the guest shell; ``(status, output)``."""
        try:
            return self.q.sh(command, time.monotonic() + timeout)
        except RuntimeError as exc:
            if self.q.proc.poll() is None:
                raise TimeoutError(str(exc)) from None
            raise

    def boot(self, timeout: float = 90.0) -> int:
        """Wait for init's VLM_READY; returns /dev/vda's size in sectors."""
        m = self.wait_for(r"^VLM_READY ?(\d*)", timeout)
        self.sh("true")  # the shell's banner goes to this first command
        if m.group(1):
            return int(m.group(1))
        # no number on the marker line: a guest without a disk -- or a marker that came through
        # without it (seen once in a CI trial: smp=4, 4 queues, a busy host; the cause is not
        # known): ask the shell, which answers from sysfs now that init is done
        rc, out = self.sh("cat /sys/block/vda/size 2>/dev/null")
        return int(out) if rc == 0 and out.strip().isdigit() else 0

    def qmp(self, command: str, **arguments: object) -> dict:
        return self.q.qmp(command, time.monotonic() + 60, **arguments)

    def stop(self) -> None:
        self.q.quit()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NetBackendProc(_BackendProcess):
    """Our vhost-user-net back-end process (``virtio-lm vhost-user-net``) on a switch port.

    ``switch_port`` is the UDP address its switch port bound (from its start-up line);
    :meth:`stats` the counters it writes at exit (after :meth:`stop`)."""

    STOP_GRACE = 20.0

    def __init__(self, socket_path: str, switch: tuple[str, int], *, queues: int = 1, no_dirty_log: bool = False,
                 timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.log_path = socket_path + ".log"
        self.stats_path = socket_path + ".stats.json"
        cmd = [sys.executable, "-m", "virtio_lm.cli", "-v", "vhost-user-net", "--socket", socket_path,
               "--switch", f"{switch[0]}:{switch[1]}", "--queues", str(queues), "--stats", self.stats_path]
        if no_dirty_log:
            cmd.append("--unsafe-no-dirty-log")
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        import re

        while True:
            m = re.search(r"switch port ([\d.]+):(\d+),", self.output())
            if m and os.path.exists(socket_path):
                self.switch_port = (m.group(1), int(m.group(2)))
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vhost-user-net back-end did not start: {self.output()[-2000:]}")
            time.sleep(0.05)


# ---------------------------------------------------------------------------- wver's blocks
WVER_MAGIC = 0x574D4C56
BS = 4096


def wver_block(block: int, rnd: int) -> bytes:
    """The 4 KiB tests/qemu/wver.c writes to ``block`` in round ``rnd``."""
    head = WVER_MAGIC.to_bytes(4, "little") + block.to_bytes(4, "little") + rnd.to_bytes(4, "little")
    import numpy as np

    return head + ((np.arange(12, BS) + block * 31 + rnd * 7) & 0xFF).astype(np.uint8).tobytes()


def check_wver_image(path: str | Path, first: int, n: int, rounds: int) -> list[str]:
    """What is wrong with blocks ``first..first+n-1`` of the image after wver's ``rounds``
    rounds: each must hold the last round (an older round: a write lost, or one executed
    again after a newer one)."""
    bad = []
    with open(path, "rb") as f:
        for b in range(first, first + n):
            f.seek(b * BS)
            got = f.read(BS)
            if got != wver_block(b, rounds):
                rnd = int.from_bytes(got[8:12], "little") if got[:4] == WVER_MAGIC.to_bytes(4, "little") else None
                bad.append(f"block {b}: round {rnd}")
    return bad
