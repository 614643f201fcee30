"""Driving hosts through their QMP monitors: what ``virtio-lm migrate`` and the demo use.

:class:`Monitor` is a small synchronous wrapper around the ``qemu.qmp``
client library (its ``legacy.QEMUMonitorProtocol``), so the same code drives
a virtio-lm host or anything else that speaks QMP.  :func:`run_migration`
does what an operator does with QEMU: ``migrate-incoming`` on the
destination, ``migrate-set-parameters`` and ``migrate`` on the source, then
``query-migrate`` until the status is final, showing progress: a rich bar on a
terminal, whole plain lines in a pipe or a log (:func:`migration_progress`).
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError
from qemu.qmp.legacy import QEMUMonitorProtocol

from virtio_lm.addr import MIGRATION_SCHEMES, MONITOR_SCHEMES, Address, parse_address
from virtio_lm.errors import MigrationError, VirtioLmError

FINAL = ("completed", "failed", "cancelled")
UNKNOWN = "commit-unknown"  # the link failed after COMMIT: settle with resolve()


class ChildProcess:
    """A child process (a host, the switch, the peer): stderr to ``WORKDIR/NAME.log``,
    its first stdout line is its handshake (``qmp ADDRESS``, ``listening on H:P``, ``ready``).
    ``netns`` runs it inside a network namespace (``ip netns exec``)."""

    def __init__(self, name: str, argv: list[str], workdir: Path, *, netns: str | None = None) -> None:
        self.name = name
        self.log_path = Path(workdir) / f"{name}.log"
        self._log = open(self.log_path, "w")
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        self.p = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=self._log, text=True, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def first_line(self, timeout: float = 60.0) -> str:
        sel = selectors.DefaultSelector()
        assert self.p.stdout is not None
        sel.register(self.p.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise RuntimeError(f"{self.name} did not start in {timeout} s: {self.log_tail()}")
        line = self.p.stdout.readline().strip()
        if not line:
            raise RuntimeError(f"{self.name} exited with {self.p.wait()}: {self.log_tail()}")
        return line

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text()[-n:]
        except OSError:
            return ""

    @property
    def alive(self) -> bool:
        return self.p.poll() is None

    def kill(self) -> None:
        """SIGKILL this process (only this one: its own pid)."""
        if self.alive:
            self.p.send_signal(signal.SIGKILL)
            self.p.wait(10)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; close its pipes and log."""
        if self.alive:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        if self.p.stdout is not None:
            self.p.stdout.close()
        self._log.close()


class MonitorCommandError(VirtioLmError):
    """A QMP command answered with an error (class and description kept)."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        self.command = command
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"{command}: {error_class}: {desc}")




class Monitor:
    """A connected QMP client (capabilities negotiated)."""

    def __init__(self, address: str, *, timeout: float = 60.0, connect_timeout: float = 30.0) -> None:
        self.address = address
        self._qmp = QEMUMonitorProtocol(parse_address(address, MONITOR_SCHEMES).sockaddr)
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self._qmp.connect(negotiate=True)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._qmp.settimeout(timeout)
        self.events: list[dict[str, Any]] = []

    def cmd(self, name: str, **args: Any) -> Any:
        try:
            return self._qmp.cmd(name, **args)
        except ExecuteError as exc:
            err = exc.error.error
            raise MonitorCommandError(name, err.class_, err.desc) from exc

    def pull_events(self) -> list[dict[str, Any]]:
        new = self._qmp.get_events(wait=False)
        self._qmp.clear_events()
        self.events += new
        return new

    def close(self) -> None:
        self._qmp.close()

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def shut_down(monitors: list["Monitor"], procs: list[ChildProcess]) -> None:
    """Ask every monitor's host to quit (errors ignored: it may be gone), close the monitors,
    then stop the processes, last started first."""
    for mon in monitors:
        try:
            mon.cmd("quit")
        except Exception:  # noqa: BLE001 - a host that is gone cannot quit
            pass
        try:
            mon.close()
        except Exception:  # noqa: BLE001
            pass
    for p in reversed(procs):
        p.stop()


def run_migration(
    src: Monitor,
    dst: Monitor,
    *,
    vm: str | None = None,
    uri: str | None = None,
    params: dict[str, Any] | None = None,
    progress: bool = False,
    poll: float = 0.05,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Migrate; returns the source's final query-migrate (with the destination's under ``destination``)."""
    vmarg = {"vm": vm} if vm else {}
    incoming = uri or "tcp:127.0.0.1:0"
    dst.cmd("migrate-incoming", uri=incoming, **vmarg)
    target = incoming
    asked = parse_address(incoming, MIGRATION_SCHEMES)
    if asked.kind == "tcp" and asked.port == 0:
        for _ in range(200):
            addr = dst.cmd("query-migrate", **vmarg).get("socket-address")
            if addr:
                target = str(Address("tcp", host=addr[0]["host"], port=int(addr[0]["port"])))
                break
            time.sleep(0.01)
        else:
            raise MigrationError("the destination did not report its listening port")
    if params:
        src.cmd("migrate-set-parameters", **params)
    src.cmd("migrate", uri=target, **vmarg)
    deadline = time.monotonic() + timeout
    bar = migration_progress() if progress else None
    try:
        while True:
            info = src.cmd("query-migrate", **vmarg)
            if bar is not None:
                bar.update(info)
            if info.get("status") in FINAL:
                break
            if info.get("status") == UNKNOWN:  # the link failed after COMMIT: settle it
                resolve(src, dst, vm=vm)
                info = src.cmd("query-migrate", **vmarg)
                if info.get("status") in FINAL:
                    break
            if time.monotonic() > deadline:
                src.cmd("migrate_cancel", **vmarg)
                raise MigrationError(f"migration did not finish in {timeout} s")
            time.sleep(poll)
    finally:
        if bar is not None:
            bar.close()
    # the destination finishes a moment after the source sees RUNNING
    for _ in range(400):
        dinfo = dst.cmd("query-migrate", **vmarg)
        if dinfo.get("status") in FINAL:
            break
        if dinfo.get("status") == UNKNOWN:
            resolve(src, dst, vm=vm)
        time.sleep(0.01)
    info["destination"] = dinfo
    return info


def _query(mon: Monitor | None, vmarg: dict[str, Any]) -> dict[str, Any] | None:
    """query-migrate, or None when the host is gone (its monitor does not answer)."""
    if mon is None:
        return None
    try:
        return mon.cmd("query-migrate", **vmarg)
    except MonitorCommandError:
        raise
    except Exception:  # noqa: BLE001 - EOF, reset, timeout: the host is gone
        return None


def resolve(
    src: Monitor | None, dst: Monitor | None, *, vm: str | None = None, settle: float = 40.0
) -> dict[str, str | None]:
    """Settle a migration whose outcome is unknown (status ``commit-unknown`` on either side,
    docs/decisions.md "After COMMIT"); ``None`` (or a monitor that no longer answers) for a
    host that is gone.  The destination is asked first -- the source did decide to commit --
    then the source.  With the VM's lease each side's ``x-migrate-resolve`` asks the lease (so
    the answer is right whatever this function believes); without one this function gives
    the word: the destination runs if it started, or if it is in doubt while the source
    committed or is gone; the source runs if it rolled back or the destination gave up; a
    source whose destination is gone stays unresolved (nobody can tell whether it started).
    Returns each side's status afterwards (None: gone)."""
    vmarg = {"vm": vm} if vm else {}
    s, d = _query(src, vmarg), _query(dst, vmarg)
    # a destination still waiting for COMMIT has not noticed the loss yet (a reset: at once; a
    # silent link: its timeout): let it settle, so that one that got COMMIT is known to run
    deadline = time.monotonic() + settle
    while d is not None and d.get("status") not in FINAL + (UNKNOWN,) and time.monotonic() < deadline:
        time.sleep(0.05)
        d = _query(dst, vmarg)
    if d is not None and d.get("status") == UNKNOWN:
        word = None
        if not d.get("x-lease"):
            src_rolled_back = s is not None and s.get("status") != UNKNOWN and not s.get("x-commit-sent")
            word = "source" if src_rolled_back or (s is not None and s.get("status") == "failed") else "destination"
        dst.cmd("x-migrate-resolve", **vmarg, **({"run": word} if word else {}))  # type: ignore[union-attr]
        d = _query(dst, vmarg)
    if s is not None and s.get("status") == UNKNOWN:
        word = None
        if not s.get("x-lease"):
            if d is None:
                return {"source": UNKNOWN, "destination": None}
            word = "destination" if d.get("status") == "completed" else "source"
        src.cmd("x-migrate-resolve", **vmarg, **({"run": word} if word else {}))  # type: ignore[union-attr]
        s = _query(src, vmarg)
    return {"source": s.get("status") if s else None, "destination": d.get("status") if d else None}


def migration_progress(out: Any = None) -> "_Progress | PlainMigrationProgress":
    """A rich bar on a terminal; plain whole lines in a pipe or a log (see virtio_lm.progress)."""
    from virtio_lm.progress import is_terminal

    return _Progress() if is_terminal(out) else PlainMigrationProgress(out)


def _fields(info: dict[str, Any]) -> dict[str, Any]:
    ram = info.get("ram", {})
    total = max(ram.get("total", 1), 1)
    remaining = ram.get("remaining", 0)
    done = 1.0 if info.get("status") == "completed" else min(1.0, 1 - remaining / total) if remaining else 0.0
    return {
        "done": done,
        "status": info.get("status", "?"),
        "round": ram.get("dirty-sync-count", 0),
        "sent": _size(ram.get("transferred", 0)),
        "remaining": _size(remaining),
        "mbps": float(ram.get("mbps", 0.0)),
        "expd": info.get("expected-downtime", 0),
    }


class PlainMigrationProgress:
    """The bar's fields as one whole line: on every new status or round, else at most once a second."""

    def __init__(self, out: Any = None, interval: float | None = None) -> None:
        from virtio_lm.progress import INTERVAL_S, Lines

        self._lines = Lines(out, INTERVAL_S if interval is None else interval)
        self._t0 = time.monotonic()

    def update(self, info: dict[str, Any]) -> None:
        f = _fields(info)
        self._lines.emit(
            (f["status"], f["round"]),
            f"migrate: {f['status']}, round {f['round']}, {f['sent']} sent, {f['remaining']} left, "
            f"{f['mbps']:.0f} Mbit/s, expected downtime {f['expd']} ms, {time.monotonic() - self._t0:.1f} s",
        )

    def close(self) -> None:
        pass


class _Progress:
    """A rich progress bar: round, transferred, remaining, rate, expected downtime."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._p = Progress(
            TextColumn("[bold]{task.fields[status]:>9}"),
            BarColumn(),
            TextColumn("round {task.fields[round]:>3}"),
            TextColumn("{task.fields[sent]:>9} sent"),
            TextColumn("{task.fields[remaining]:>9} left"),
            TextColumn("{task.fields[mbps]:>8.0f} Mbit/s"),
            TextColumn("exp. downtime {task.fields[expd]:>4} ms"),
            TimeElapsedColumn(),
        )
        self._p.start()
        self._task = self._p.add_task("migrate", total=1.0, status="setup", round=0, sent="0", remaining="?", mbps=0.0, expd=0)

    def update(self, info: dict[str, Any]) -> None:
        f = _fields(info)
        self._p.update(self._task, completed=f.pop("done"), **f)

    def close(self) -> None:
        self._p.stop()


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)
