"""Real-QEMU harness for the vfio-user tests: QEMU 11.1 (extracted, see
``virtio_lm.qemu_guest.qemu11``), Linux 6.1 with the virtio blk and net modules, our functions
as ``vfio-user-pci`` devices.

* :func:`vfio_assets` -> ``(qemu command, kernel, initramfs)`` or GuestUnavailable (the reason);
* :class:`VfioServer` runs ``virtio-lm vfio-user`` as a process;
* :class:`VfioVm` boots the guest with memfd RAM (share=on: DMA_MAP carries its fd) and one
  ``vfio-user-pci`` device per socket; :meth:`VfioVm.sh` runs a shell command in the guest.
Every wait is bounded by a host-side deadline.
"""

from __future__ import annotations

import glob
import json
import lzma
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from virtio_lm.qemu_guest import GUEST_DIR, QemuProcess, QemuUnavailable, cpio_entry, fetch_kernel, qemu11, static_busybox

HERE = Path(__file__).resolve().parent
MODULES = ["virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci", "virtio_blk",
           "failover", "net_failover", "virtio_net"]


def _udp_tool() -> bytes:
    out = GUEST_DIR / "udp"
    src = HERE / "udp.c"
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        if shutil.which("gcc") is None:
            raise QemuUnavailable("gcc is not installed: cannot build the guest's UDP tool (tests/qemu/udp.c)")
        try:
            subprocess.run(["gcc", "-O2", "-static", "-o", str(out), str(src)], check=True, capture_output=True)
        except (subprocess.CalledProcessError, OSError) as exc:
            raise QemuUnavailable(f"cannot build tests/qemu/udp.c statically: {exc}") from exc
    return out.read_bytes()


FETCH_LINUX612 = HERE.parent.parent / "scripts" / "fetch-linux612"
LINUX612_DIR = Path(os.environ.get("VLM_LINUX612_DIR", str(GUEST_DIR / "linux612")))


def fetch_linux612() -> tuple[Path, Path]:
    """``(vmlinuz, module tree)`` of Debian trixie's 6.12 kernel (fetched by scripts/fetch-linux612)."""
    def found() -> tuple[Path, Path] | None:
        k = sorted(glob.glob(str(LINUX612_DIR / "x/boot/vmlinuz-6.12.*-amd64")))
        if not k:
            return None
        mods = LINUX612_DIR / "x/usr/lib/modules" / Path(k[-1]).name[len("vmlinuz-"):] / "kernel"
        return (Path(k[-1]), mods) if mods.is_dir() else None
    if found() is None:
        try:
            subprocess.run(["bash", str(FETCH_LINUX612)], check=True, capture_output=True, timeout=600)
        except (subprocess.SubprocessError, OSError) as exc:
            raise QemuUnavailable(f"could not fetch trixie's linux-image-6.12: {exc}") from exc
    got = found()
    if got is None:
        raise QemuUnavailable(f"no vmlinuz-6.12 with its modules under {LINUX612_DIR}")
    return got


def _module(mods: Path, name: str) -> bytes | None:
    """A module's bytes, decompressed (6.12's are .ko.xz); None when the kernel has it built in."""
    for pattern, unpack in ((f"{name}.ko", lambda b: b), (f"{name}.ko.xz", lzma.decompress)):
        hits = list(mods.rglob(pattern))
        if hits:
            return unpack(hits[0].read_bytes())
    return None


def build_initramfs(mods: Path, out: Path) -> None:
    entries = []
    ino = 1
    for d in ("bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"):
        entries.append(cpio_entry(d, 0o040755, ino=ino))
        ino += 1
    for name, mode, data in (("bin/busybox", 0o100755, static_busybox()), ("init", 0o100755, (HERE / "vfio-init.sh").read_bytes()),
                             ("bin/udp", 0o100755, _udp_tool())):
        entries.append(cpio_entry(name, mode, data, ino=ino))
        ino += 1
    for m in MODULES:
        data = _module(mods, m)
        if data is None:
            continue  # built in (6.12: everything but virtio_blk and virtio_net's helpers)
        entries.append(cpio_entry(f"lib/modules/{m}.ko", 0o100644, data, ino=ino))
        ino += 1
    if _module(mods, "virtio_blk") is None:
        raise QemuUnavailable(f"virtio_blk not found under {mods}")
    entries.append(cpio_entry("TRAILER!!!", 0, ino=0))
    out.write_bytes(b"".join(entries))


def vfio_assets(kernel_version: str = "6.1") -> tuple[list[str], Path, Path]:
    if shutil.which("busybox") is None:
        raise QemuUnavailable("busybox (busybox-static) is not installed")
    qemu = qemu11()
    kernel, mods = fetch_kernel() if kernel_version == "6.1" else fetch_linux612()
    initrd = GUEST_DIR / f"initramfs-vfio-{kernel_version}.cpio"
    newest = max(p.stat().st_mtime for p in (HERE / "vfio-init.sh", HERE / "udp.c", Path(__file__)))
    if not initrd.exists() or initrd.stat().st_mtime < newest:
        build_initramfs(mods, initrd)
    return qemu, kernel, initrd


class VfioServer:
    """``virtio-lm vfio-user`` as a process: sockets in ``directory``, log beside them."""

    def __init__(self, directory: Path, args: list[str], *, serve: str) -> None:
        self.directory = directory
        self.log_path = directory / f"vfio-user-{serve.replace(',', '-')}.log"
        self.log = open(self.log_path, "wb")
        cmd = [sys.executable, "-m", "virtio_lm.cli", "-v", "vfio-user", "--dir", str(directory), "--serve", serve, *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.sockets = {key: str(directory / f"{key}.sock") for key in serve.split(",")}
        deadline = time.monotonic() + 60
        while not all(os.path.exists(p) for p in self.sockets.values()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vfio-user server did not start:\n{self.output()[-3000:]}")
            time.sleep(0.05)

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class VfioVm:
    def __init__(self, workdir: Path, name: str, sockets: list[str], *, memory_mib: int = 256,
                 extra_append: str = "", kernel_version: str = "6.1") -> None:
        qemu, kernel, initrd = vfio_assets(kernel_version)
        args = [
            "-accel", "tcg", "-nodefaults", "-display", "none", "-no-reboot",
            "-machine", "q35,memory-backend=mem",
            "-object", f"memory-backend-memfd,id=mem,size={memory_mib}M,share=on",
            "-m", f"{memory_mib}M", "-smp", "1",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", f"console=ttyS0 panic=-1 quiet loglevel=4 init_on_alloc=0 {extra_append}".strip(),
        ]  # fmt: skip
        for path in sockets:
            args += ["-device", json.dumps({"driver": "vfio-user-pci", "socket": {"type": "unix", "path": path}})]
        self.q = QemuProcess(name, workdir, args, str(workdir / f"{name}.qmp"), error=RuntimeError, binary=qemu)

    def boot(self, timeout: float = 120.0) -> None:
        self.q.wait_for(r"^VLM_READY", time.monotonic() + timeout)
        self.sh("true")

    def sh(self, command: str, timeout: float = 60.0) -> tuple[int, str]:
        return self.q.sh(command, time.monotonic() + timeout)

    def wait_sh(self, command: str, timeout: float = 60.0) -> str:
        """Run ``command`` until it succeeds, bounded by ``timeout`` (host-side deadline)."""
        deadline = time.monotonic() + timeout
        while True:
            status, out = self.q.sh(command, deadline)
            if status == 0:
                return out
            if time.monotonic() > deadline:
                raise TimeoutError(f"guest: {command!r} did not succeed in {timeout} s: {out}\n{self.q.tail()}")
            time.sleep(0.2)

    def text(self) -> str:
        return self.q.text()

    def diag(self) -> str:
        return self.q.tail()

    def stop(self) -> None:
        self.q.quit()
