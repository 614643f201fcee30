"""The QEMU side of the downtime comparison: a QEMU 7.2 TCG Linux guest migrated on loopback.

:class:`QemuBaseline` boots a source and a destination ``qemu-system-x86_64 -accel tcg``
(``-machine q35``, the Debian 6.1 kernel with ``-kernel``/``-initrd``, serial console on
stdio, QMP on a UNIX socket; the destination with ``-incoming tcp:127.0.0.1:PORT``), runs the
guest program ``dirtier`` (``virtio_lm/data/dirtier.c``, compiled ``gcc -O2 -static``) in the
source guest, migrates while it dirties memory and returns QEMU's ``query-migrate`` figures
plus the downtime seen from outside: the source's ``STOP`` QMP event to the destination's
``RESUME`` event (both processes run on this host, so the event timestamps compare).  The
destination guest then stops the dirtier, which verifies its memory byte for byte.

The dirtier does the work of virtio-lm's vCPU (:mod:`virtio_lm.vm.vcpu`): a random fill of
``fill_mib`` MiB (pseudo-random non-zero pages from a xorshift64 seeded by the page index),
then a sweep over ``sweep_mib`` MiB that increments the first byte of every page at
``dirty_rate_mbps`` MB/s of dirtied pages, paced in bursts of at most 256 pages (0 = no
dirtying; a negative rate = as fast as it can).

Guest RAM is ``-m {memory_mib * 1024 - 8}k`` (262136k for 256 MiB), deliberately not a
multiple of 64 pages: QEMU 7.2 under TCG loses dirty pages on its fast, word-at-a-time
dirty-bitmap sync path (fixed upstream in QEMU 9.0, commit 03bfc2188f06); a RAM size that
is not a multiple of 64 pages makes it take the per-page path, which is correct.  Without
this the dirtier's verification fails now and then on the destination.

The kernel is Debian's ``linux-image-6.1.*-amd64`` extracted under ``$VLM_GUEST_DIR``
(default ``/tmp/virtio-lm-guest``, shared with tests/qemu/guest.py; fetched with
``apt-get download`` when missing); the initramfs (busybox-static, the dirtier, an init
script that starts a shell on the console) is cached there too, keyed by a hash of its
inputs.

Usage::

    with QemuBaseline() as qb:
        figures = qb.run(memory_mib=256, sweep_mib=64, dirty_rate_mbps=32, downtime_limit_ms=100)
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

from virtio_lm.qemu_guest import (
    GUEST_DIR,
    QEMU,
    QemuProcess,
    QemuUnavailable,
    cpio_entry,
    event_time,
    fetch_kernel,
    static_busybox,
)

__all__ = ["QemuBaseline", "QemuBaselineError", "QemuGuestDiverged", "QemuUnavailable", "build_dirtier",
           "check_same_process", "guest_assets"]
LINE = r"[^\r\n]*"  # the rest of a console line (its end is matched too: complete lines only)

INIT_SCRIPT = b"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
stty -echo 2>/dev/null
echo "BASELINE_READY $(grep MemAvailable /proc/meminfo)"
export PS1=''
exec sh
"""


class QemuBaselineError(Exception):
    """A baseline run failed (boot, guest program, QMP, migration); the message has the consoles' tails."""


class QemuGuestDiverged(QemuBaselineError):
    """QEMU's migration completed but the destination guest is not the source's: the process the
    source ran as the dirtier is, on the destination, another process or none (QEMU 7.2 under TCG
    on a loaded host; see docs/decisions.md, "QEMU 7.2 loses its guest's state").  A failure of
    the peer being measured, told apart from a failure of this harness."""


def check_same_process(q: QemuProcess, pid: int, deadline: float, *, side: str, error: type[Exception]) -> None:
    """Raise ``error`` unless the guest's PID ``pid`` is the dirtier (its ``/proc/PID/comm``)."""
    status, out = q.sh(f"cat /proc/{pid}/comm", deadline)
    # the console may interleave kernel messages with the command's output: a line of its own
    if status != 0 or "dirtier" not in (line.strip() for line in out.splitlines()):
        seen = f"process {out.strip()!r}" if status == 0 else f"no process ({out.strip()!r}, status {status})"
        raise error(f"{side}: PID {pid} is {seen}, not the dirtier the source started")


# ---------------------------------------------------------------------------- assets
def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, timeout=600, **kw)


def dirtier_source() -> bytes:
    """The guest program's C source (package data)."""
    return (resources.files("virtio_lm") / "data" / "dirtier.c").read_bytes()


def build_dirtier(out: Path) -> None:
    """Compile the dirtier ``gcc -O2 -static`` into ``out`` (QemuUnavailable without gcc)."""
    if shutil.which("gcc") is None:
        raise QemuUnavailable("gcc is not installed (it compiles the guest program)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as td:
        src = Path(td) / "dirtier.c"
        src.write_bytes(dirtier_source())
        try:
            _run(["gcc", "-O2", "-static", "-o", str(Path(td) / "dirtier"), str(src)])
        except subprocess.CalledProcessError as exc:
            raise QemuUnavailable(f"gcc -static failed on dirtier.c: {exc.stderr.decode(errors='replace')[-500:]}")
        os.replace(Path(td) / "dirtier", out)


def guest_assets() -> tuple[Path, Path]:
    """``(kernel, initramfs)``, the initramfs built once and cached; QemuUnavailable with the reason."""
    if shutil.which(QEMU) is None:
        raise QemuUnavailable(f"{QEMU} is not installed")
    bb = static_busybox()
    kernel, _ = fetch_kernel()
    key = hashlib.sha256(dirtier_source() + INIT_SCRIPT + hashlib.sha256(bb).digest()).hexdigest()[:16]
    cache = GUEST_DIR / "baseline"
    initrd = cache / f"initramfs-{key}.cpio"
    if initrd.exists():
        return kernel, initrd
    dirtier = cache / f"dirtier-{hashlib.sha256(dirtier_source()).hexdigest()[:16]}"
    if not dirtier.exists():
        build_dirtier(dirtier)
    recs = [cpio_entry(d, 0o040755, ino=i + 1) for i, d in enumerate(("bin", "dev", "proc", "sys", "tmp"))]
    recs.append(cpio_entry("bin/busybox", 0o100755, bb, ino=10))
    recs.append(cpio_entry("bin/dirtier", 0o100755, dirtier.read_bytes(), ino=11))
    recs.append(cpio_entry("init", 0o100755, INIT_SCRIPT, ino=12))
    recs.append(cpio_entry("TRAILER!!!", 0, ino=0))
    tmp = initrd.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(b"".join(recs))
    os.replace(tmp, initrd)
    return kernel, initrd


# ---------------------------------------------------------------------------- QEMU + QMP
def _qemu(name: str, workdir: Path, sock_dir: Path, kernel: Path, initrd: Path, memory_mib: int,
          incoming_port: int | None = None) -> QemuProcess:
    """One guest: RAM not a multiple of 64 pages (see the module docstring), no devices but the console."""
    args = [
        "-accel", "tcg", "-nodefaults", "-display", "none", "-no-reboot",
        "-machine", "q35", "-m", f"{memory_mib * 1024 - 8}k", "-smp", "1",
        "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", "console=ttyS0 panic=-1 quiet loglevel=3 init_on_alloc=0",
    ]  # fmt: skip
    if incoming_port is not None:
        args += ["-incoming", f"tcp:127.0.0.1:{incoming_port}"]
    return QemuProcess(name, workdir, args, str(sock_dir / f"{name}.qmp"), error=QemuBaselineError)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- the baseline
class QemuBaseline:
    """Context manager: prepares kernel + an initramfs with the dirtier once (cached under
    /tmp/virtio-lm-guest), cleans its temp dir."""

    def __init__(self, workdir: str | None = None) -> None:
        self._workdir_parent = workdir
        self._tmp: Path | None = None
        self._assets: tuple[Path, Path] | None = None
        self.last_guest: dict[str, Any] = {}  # the dirtier's own lines of the last run

    def __enter__(self) -> "QemuBaseline":
        self._prepare()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _prepare(self) -> tuple[Path, Path]:
        if self._assets is None:
            self._assets = guest_assets()
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="vlm-qemu-", dir=self._workdir_parent))
        return self._assets

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def run(self, *, memory_mib: int = 256, fill_mib: int = 0, sweep_mib: int = 64,
            dirty_rate_mbps: float = 0.0, downtime_limit_ms: int = 300,
            max_bandwidth: int = 1 << 30, timeout_s: float = 120.0) -> dict:
        """One migration of a fresh guest; the figures (see the module docstring and the brief's keys).

        ``timeout_s`` bounds the whole run (boot, fill, migration, verification).
        """
        kernel, initrd = self._prepare()
        assert self._tmp is not None
        run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=self._tmp))
        # a UNIX socket path has at most 107 bytes: the QMP sockets go to a short directory if need be
        sock_dir = run_dir if len(str(run_dir)) < 80 else Path(tempfile.mkdtemp(prefix="vlmq-"))
        deadline = time.monotonic() + timeout_s
        procs: list[QemuProcess] = []
        try:
            src = _qemu("source", run_dir, sock_dir, kernel, initrd, memory_mib)
            procs.append(src)
            src.connect(deadline)
            dst, port = self._start_destination(procs, run_dir, sock_dir, kernel, initrd, memory_mib, deadline)
            return self._migrate(src, dst, port, fill_mib=fill_mib, sweep_mib=sweep_mib,
                                 rate=dirty_rate_mbps, downtime_limit_ms=downtime_limit_ms,
                                 max_bandwidth=max_bandwidth, deadline=deadline)
        except (QemuBaselineError, OSError) as exc:  # OSError: a QMP socket or the console pipe broke
            tails = "\n".join(q.tail() for q in procs)
            raise QemuBaselineError(f"{exc}\n{tails}") from exc
        finally:
            for q in procs:
                q.kill()
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.rmtree(sock_dir, ignore_errors=True)

    @staticmethod
    def _start_destination(procs: list[QemuProcess], run_dir: Path, sock_dir: Path, kernel: Path, initrd: Path,
                           memory_mib: int, deadline: float) -> tuple[QemuProcess, int]:
        """The destination on a free port, QMP connected (another try when the port was taken in between).

        QEMU answers QMP only from its main loop, which starts after the -incoming socket is
        bound; a failed bind makes it exit instead.  So a query-status reply means it listens.
        """
        for attempt in range(3):
            port = _free_port()
            q = _qemu(f"destination{attempt or ''}", run_dir, sock_dir, kernel, initrd, memory_mib,
                      incoming_port=port)
            procs.append(q)
            try:
                q.connect(deadline)
                st = q.qmp("query-status", deadline)
                if st.get("status") != "inmigrate":
                    raise QemuBaselineError(f"destination: status {st} instead of inmigrate")
                return q, port
            except QemuBaselineError:
                q.kill()
                if "Address already in use" not in q.stderr_path.read_text(errors="replace"):
                    raise
        raise QemuBaselineError("no free port for the destination's -incoming")

    @staticmethod
    def _diagnose(q: QemuProcess, pid: int) -> str:
        """What the guest says of a process that did not answer its signal: its state, where it
        sleeps, the signals it has pending and blocked, and whether the guest's clock moves."""
        cmd = (f"grep -E '^(State|SigPnd|ShdPnd|SigBlk|SigCgt)' /proc/{pid}/status; cat /proc/{pid}/wchan; echo; "
               f"cat /proc/{pid}/stack; cat /proc/uptime; "
               "cat /sys/devices/system/clocksource/clocksource0/current_clocksource; sleep 1; cat /proc/uptime; "
               "dmesg | tail -n 15")
        try:
            return q.sh(cmd, time.monotonic() + 30)[1]
        except (QemuBaselineError, OSError) as exc:
            return f"(the guest shell did not answer either: {exc.__class__.__name__})"

    def _migrate(self, src: QemuProcess, dst: QemuProcess, port: int, *, fill_mib: int, sweep_mib: int, rate: float,
                 downtime_limit_ms: int, max_bandwidth: int, deadline: float) -> dict:
        # boot, start the dirtier, wait for its steady rate.  A subshell reports the dirtier's
        # PID and, whenever it ends (verdict, OOM kill, crash), its exit status.
        src.wait_for(r"^BASELINE_READY", deadline)
        src.sh("true", deadline)  # the shell's banner goes to this first command
        args = f"{int(fill_mib)} {int(sweep_mib)} {rate:g}"
        # The subshell then sleeps on: busybox's ash as PID 1 exits when a background job ends while
        # it reads the console, and the guest kernel panics ("Attempted to kill init").
        src.sh(f'(/bin/dirtier {args} & echo "DIRTIER_PID $!"; wait $!; echo "DIRTIER_EXIT $?"; sleep 100000) &',
               deadline)
        pid = int(src.wait_for(r"^DIRTIER_PID (\d+)", deadline).group(1))
        ready = src.wait_for(rf"^(DIRTIER_(?:READY|BAD|EXIT){LINE})\r?\n", deadline)
        steady = ready
        if ready.group(1).startswith("DIRTIER_READY"):
            steady = src.wait_for(rf"^(DIRTIER_(?:STEADY|BAD|EXIT){LINE})\r?\n", deadline, ready.end())
        if not steady.group(1).startswith("DIRTIER_STEADY"):
            avail = re.search(r"MemAvailable: *(\d+ kB)", src.text())
            killed = " (SIGKILL: the guest's OOM killer, most likely)" if steady.group(1) == "DIRTIER_EXIT 137" else ""
            raise QemuBaselineError(f"source: the dirtier failed: {steady.group(1)}{killed}; the guest had "
                                    f"{avail.group(1) if avail else '?'} available after boot")
        self.last_guest = {"ready": ready.group(1), "steady": steady.group(1)}
        check_same_process(src, pid, deadline, side="source", error=QemuBaselineError)

        # migrate
        src.qmp("migrate-set-parameters", deadline, **{"downtime-limit": int(downtime_limit_ms),
                                                       "max-bandwidth": int(max_bandwidth)})
        src.qmp("migrate", deadline, uri=f"tcp:127.0.0.1:{port}")
        expected = 0
        while True:
            info = src.qmp("query-migrate", deadline)
            st = info.get("status")
            if info.get("expected-downtime"):
                expected = int(info["expected-downtime"])
            if st in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:
                try:
                    src.qmp("migrate_cancel", time.monotonic() + 5)
                except QemuBaselineError:
                    pass
                raise QemuBaselineError(f"migration did not complete in time (status {st}, {info.get('ram')})")
            time.sleep(0.05)
        if st != "completed":
            raise QemuBaselineError(f"migration {st}: {info.get('error-desc', info)}")
        stop = src.wait_event("STOP", deadline)
        resume = dst.wait_event("RESUME", deadline)

        # the destination's guest stops the dirtier, which verifies its memory -- if the guest that
        # resumed there is the source's at all: the same process under the dirtier's PID
        try:
            check_same_process(dst, pid, deadline, side="destination", error=QemuGuestDiverged)
        except QemuGuestDiverged as exc:
            raise QemuGuestDiverged(f"QEMU's migration lost guest state: {exc}\n--- destination: that PID\n"
                                    f"{self._diagnose(dst, pid)}") from exc
        start = len(dst.text())
        status, out = dst.sh(f"kill -USR1 {pid}", deadline)
        if status != 0:
            raise QemuBaselineError(f"destination: kill -USR1 {pid} failed ({status}): {out}")
        try:
            exit_status = int(dst.wait_for(r"^DIRTIER_EXIT (\d+)", deadline, start).group(1))
        except QemuBaselineError as exc:
            raise QemuBaselineError(f"{exc}\n--- destination: the dirtier after SIGUSR1\n"
                                    f"{self._diagnose(dst, pid)}") from exc
        found = re.search(rf"^(DIRTIER_(?:OK|BAD){LINE})\r?\n", dst.text(), re.M)
        verdict = found.group(1) if found else f"DIRTIER_EXIT {exit_status} without a verdict"
        if verdict.startswith("DIRTIER_OK") and exit_status != 0:
            verdict = f"{verdict} but exit status {exit_status}"
        self.last_guest["verdict"] = verdict
        # and the guest lives on after its program ended (the shell still answers, no panic)
        try:
            dst.sh("true", deadline)  # a panic reboots, and -no-reboot ends QEMU at once
        except QemuBaselineError as exc:
            raise QemuBaselineError(f"destination: the guest died after the dirtier's verdict ({verdict}): {exc}") from exc

        ram = info.get("ram", {})
        total = int(info.get("total-time", 0))
        transferred = int(ram.get("transferred", 0))
        return {
            "downtime_ms": (event_time(resume) - event_time(stop)) * 1000.0,
            "qemu_downtime_ms": int(info.get("downtime", 0)),
            "expected_downtime_ms": expected,
            "total_time_ms": total,
            "setup_time_ms": int(info.get("setup-time", 0)),
            "transferred": transferred,
            "mbps": float(ram.get("mbps", 0.0)),
            "throughput_MiBps": transferred / (1 << 20) / (total / 1000.0) if total else 0.0,
            "normal_pages": int(ram.get("normal", 0)),
            "duplicate_pages": int(ram.get("duplicate", 0)),
            "dirty_sync_count": int(ram.get("dirty-sync-count", 0)),
            "status": st,
            "guest_verify": "ok" if verdict.startswith("DIRTIER_OK") and exit_status == 0 else verdict,
        }
