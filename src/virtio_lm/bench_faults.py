"""``virtio-lm bench faults --trials N``: a fault campaign against real host processes.

Every trial is a fresh network (switch, peer, disk image), a fresh source host
running the demo's VM (blk + net VFs under load, the vCPU sweeping) and a fresh
destination, with a :class:`FaultProxy` between them.  The trial's fault kind
goes round-robin over :data:`KINDS`:

* ``sigkill`` -- the destination process is SIGKILLed,
* ``sigkill-src`` -- the source process is SIGKILLed (what it had not sent yet is lost),
* ``cut`` -- the connection is reset (RST both ways),
* ``flip`` -- one byte of the source's stream is flipped,
* ``cancel`` -- ``migrate_cancel`` on the source,

at a point drawn uniformly over the stream (an offset in ``[0, L)``, ``L`` the
length of a clean reference migration's stream, measured first), or -- with
probability :data:`COMMIT_WEIGHT`, because a uniform offset almost never lands
there -- in the commit window: just before the COMMIT reaches the destination
or just after (its RUNNING not yet back at the source).

When either side ends in ``commit-unknown`` (the fault came after the source's
COMMIT, or after the destination's READY) the campaign settles it as an
orchestrator does, :func:`virtio_lm.orchestrate.resolve` (the VM's lease decides,
docs/decisions.md "After COMMIT").  Then it records: whether the source sent COMMIT,
whether the destination had sent READY, where the source is (running /
postmigrate / gone) and whether it is intact (it runs and its own verification
passes), whether the destination is untouched (``inmigrate``, VFs in INIT) or
committed (it runs and verifies) or gone, who holds the lease, how many of the two
run, and whether a retry to a fresh destination succeeds and verifies (when the
source runs).  A trial is correct when never two run; the side that runs holds the
lease (the source never resumes once the destination may run); a source that runs
is intact and its retry succeeds; and exactly one runs -- none only when the side
with the VM's only runnable copy was killed: the source before the destination had
the VM whole (READY), or the destination after it had started (it took the lease).
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from virtio_lm.wire.stream import Direction, Ready, StreamDecoder

KINDS = ("sigkill", "sigkill-src", "cut", "flip", "cancel")
COMMIT_WEIGHT = 0.3
#: the commit-window variants of each kind (the proxy's ``window`` argument)
WINDOWS = {
    "sigkill": ("before-commit", "after-commit"),
    "sigkill-src": ("before-commit", "after-commit"),
    "cut": ("drop-commit", "after-commit"),
    "flip": ("flip-commit",),
    "cancel": ("before-commit", "after-commit"),
}
FINAL = ("completed", "failed", "cancelled")
UNKNOWN = "commit-unknown"


class FaultProxy:
    """A TCP proxy between a migration source and its destination with one fault.

    ``at``: a byte offset of the source-to-destination stream.  ``cut`` resets both
    connections there, ``flip`` flips that byte (XOR 0x5A), ``hold`` stops forwarding
    there until :attr:`release` is set (the campaign kills the destination or cancels
    meanwhile).  ``window`` instead places the fault in the commit window (the source
    answers the destination's READY with COMMIT at once, so what it sends after READY
    is the COMMIT): ``drop-commit`` (cut instead of passing it on), ``flip-commit``
    (flip its first byte), ``before-commit`` (hold it), ``after-commit`` (pass it on,
    then cut -- kind ``cut`` -- or hold the destination's answer).  :attr:`reached` is
    set when the fault point was reached.  ``sigkill-src`` holds, and what was held is
    dropped on release (it never left the killed source)."""

    def __init__(self, target: tuple[str, int], *, kind: str, at: int | None = None, window: str | None = None) -> None:
        if (at is None) == (window is None):
            raise ValueError("give a stream offset or a commit-window variant")
        self.target = target
        self.action = {"cut": "cut", "flip": "flip"}.get(kind, "hold")
        self.drop_held = kind == "sigkill-src"
        self.at = at
        self.window = window
        self.reached = threading.Event()
        self.release = threading.Event()
        self.ready_seen = threading.Event()
        self.commit_sent = threading.Event()
        self.commit_seen = threading.Event()  # the source sent something after READY: its COMMIT
        self.forwarded = 0
        self.lst = socket.create_server(("127.0.0.1", 0))
        self.uri = "tcp:127.0.0.1:%d" % self.lst.getsockname()[1]
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="fault-proxy", daemon=True).start()

    def _accept(self) -> None:
        try:
            a, _ = self.lst.accept()
            b = socket.create_connection(self.target)
        except OSError:
            return
        for s in (a, b):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._socks = [a, b]
        threading.Thread(target=self._to_dest, args=(a, b), daemon=True).start()
        threading.Thread(target=self._to_source, args=(b, a), daemon=True).start()

    def _hold(self) -> bool:
        """Hold until released; True when what was held must be dropped (the link is cut)."""
        self.reached.set()
        self.release.wait(300)  # a guard against a hung campaign, not a timing
        if self.drop_held:
            self.cut()
        return self.drop_held

    def _to_dest(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                if self.ready_seen.is_set():
                    self.commit_seen.set()
                if self.window is not None and self.ready_seen.is_set() and not self.reached.is_set() \
                        and not self.commit_sent.is_set():
                    if self.window == "drop-commit":
                        self.reached.set()
                        self.cut()
                        return
                    if self.window == "flip-commit":
                        data = bytes([data[0] ^ 0x5A]) + data[1:]
                        self.reached.set()
                    elif self.window == "before-commit":
                        if self._hold():
                            return
                    elif self.window == "after-commit":
                        self.commit_sent.set()
                elif self.at is not None and not self.reached.is_set() and self.forwarded + len(data) > self.at:
                    k = self.at - self.forwarded
                    if self.action == "flip":
                        data = data[:k] + bytes([data[k] ^ 0x5A]) + data[k + 1 :]
                        self.reached.set()
                    else:
                        dst.sendall(data[:k])
                        self.forwarded += k
                        data = data[k:]
                        if self.action == "cut":
                            self.reached.set()
                            self.cut()
                            return
                        if self._hold():
                            return
                dst.sendall(data)
                self.forwarded += len(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            return

    def _to_source(self, src: socket.socket, dst: socket.socket) -> None:
        dec = StreamDecoder(Direction.TO_SOURCE)
        try:
            while data := src.recv(1 << 16):
                if self.window == "after-commit" and self.commit_sent.is_set() and not self.reached.is_set():
                    if self.action == "cut":
                        self.reached.set()
                        self.cut()
                        return
                    if self._hold():
                        return
                # READY noted before it is passed on: the COMMIT answering it follows at once
                if not self.ready_seen.is_set() and any(isinstance(s.body, Ready) for s in dec.feed(data)):
                    self.ready_seen.set()
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            return

    def cut(self) -> None:
        """Reset both connections (SO_LINGER 0: an RST, as a failed link looks)."""
        with self._lock:
            for s in self._socks:
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, (1).to_bytes(4, "little") + bytes(4))
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self.release.set()
        try:
            self.lst.close()
        except OSError:
            pass
        self.cut()


@dataclass
class Trial:
    kind: str
    point: str
    reached: bool = False
    status: str = ""  # the source's migration status after the fault (and the resolution)
    committed: bool = False  # the source sent COMMIT
    dest_prepared: bool = False  # the destination had sent READY (it held the whole VM)
    resolved: str = ""  # the sides that were in commit-unknown and were resolved
    src: str = ""  # running / postmigrate / gone / ...
    source_intact: bool | None = None  # None: the source does not run
    dest: str = ""  # untouched / committed / gone / WRONG: ...
    lease: str = ""  # the host holding the VM's lease at the end (src / dst / ...)
    running: int = 0
    retry: bool | None = None  # None: not applicable (the source does not run)
    error: str = ""

    @property
    def none_justified(self) -> bool:
        """Nobody runs, and rightly: the side with the VM's only runnable copy was killed."""
        if self.src == "gone":  # before the destination had the VM whole
            return not self.dest_prepared and self.dest == "untouched"
        if self.dest == "gone":  # after the destination started: it took the lease
            return self.lease == "dst" and self.src == "postmigrate"
        return False

    @property
    def correct(self) -> bool:
        if self.error or self.running > 1 or self.dest.startswith("WRONG"):
            return False
        if self.src == "running" and not (self.source_intact and self.retry and self.lease == "src"):
            return False  # resumed without the lease, or not intact
        if self.dest == "committed" and self.lease != "dst":
            return False
        return self.running == 1 or self.none_justified


@dataclass
class Campaign:
    trials: int = 20
    memory_mib: int = 64
    sweep_mib: int = 16
    dirty_rate: float = 32.0
    warmup_s: float = 0.5
    seed: int = 1
    reference_bytes: int = 0
    results: list[Trial] = field(default_factory=list)


class _Run:
    """The processes of one trial."""

    def __init__(self, work: Path, c: Campaign, seed: int) -> None:
        from virtio_lm.demo import start_network, vm_spec_text
        from virtio_lm.orchestrate import ChildProcess, Monitor

        self.work = work
        self.procs: list[ChildProcess] = []
        self.monitors: list[Monitor] = []
        net = start_network(work, self.procs)
        self.vm = vm_spec_text(c.memory_mib, net.image, c.dirty_rate, seed, sweep_mib=c.sweep_mib)
        self.image = net.image
        self.switch = net.switch
        self.src_proc, self.src = self.host("src", incoming=False)
        self.dst_proc, self.dst = self.host("dst", incoming=True)

    def host(self, name: str, *, incoming: bool) -> tuple[Any, Any]:
        from virtio_lm.demo import cli_command
        from virtio_lm.orchestrate import ChildProcess, Monitor

        argv = ["host", "--name", name, "--qmp", f"unix:{self.work}/{name}.qmp", "--vm", self.vm, "--switch", self.switch]
        p = ChildProcess(name, cli_command(*argv, *(["--incoming"] if incoming else [])), self.work)
        self.procs.append(p)
        m = Monitor(p.first_line().split()[-1])
        self.monitors.append(m)
        return p, m

    def close(self) -> None:
        from virtio_lm.orchestrate import shut_down

        shut_down(self.monitors, self.procs)


def _listen(dst: Any) -> tuple[str, int]:
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    deadline = time.monotonic() + 30
    while not (addr := dst.cmd("query-migrate").get("socket-address")):
        if time.monotonic() > deadline:
            raise TimeoutError("the destination did not report its listening port")
        time.sleep(0.01)
    return addr[0]["host"], int(addr[0]["port"])


def _wait_final(mon: Any, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (info := mon.cmd("query-migrate")).get("status") not in FINAL + (UNKNOWN,):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no final status in {timeout} s: {info.get('status')}")
        time.sleep(0.02)
    return info


def _status(mon: Any) -> str:
    return str(mon.cmd("query-status")["status"])


def reference(c: Campaign) -> int:
    """The stream length of a clean migration of the campaign's VM (bytes to the destination)."""
    from virtio_lm.orchestrate import run_migration

    work = Path(tempfile.mkdtemp(prefix="virtio-lm-faults-"))
    run = _Run(work, c, c.seed)
    try:
        time.sleep(c.warmup_s)
        info = run_migration(run.src, run.dst, timeout=300)
        if info.get("status") != "completed":
            raise RuntimeError(f"the reference migration did not complete: {info.get('error-desc')}")
        return int(info["ram"]["transferred"])
    finally:
        run.close()
        shutil.rmtree(work, ignore_errors=True)


def _holder(image: Path) -> str:
    """The host name in the VM's lease file ("" when there is none)."""
    try:
        return (image.parent / (image.name + ".lease")).read_text().strip().split("/", 1)[0]
    except OSError:
        return ""


def one_trial(c: Campaign, kind: str, rng: random.Random, seed: int) -> Trial:
    from virtio_lm.orchestrate import resolve, run_migration

    if rng.random() < COMMIT_WEIGHT:
        window: str | None = rng.choice(WINDOWS[kind])
        at = None
        point = f"commit window: {window}"
    else:
        window, at = None, rng.randrange(max(1, c.reference_bytes))
        point = f"offset {at}"
    t = Trial(kind, point)
    work = Path(tempfile.mkdtemp(prefix="virtio-lm-faults-"))
    run = None
    proxy = None
    try:
        run = _Run(work, c, seed)
        time.sleep(c.warmup_s)
        proxy = FaultProxy(_listen(run.dst), kind=kind, at=at, window=window)
        run.src.cmd("migrate", uri=proxy.uri)
        deadline = time.monotonic() + 300
        info: dict[str, Any] = {}
        while True:
            if proxy.reached.is_set() and not proxy.release.is_set():
                if kind == "sigkill":
                    run.dst_proc.kill()
                elif kind == "sigkill-src":
                    run.src_proc.kill()
                elif kind == "cancel":
                    run.src.cmd("migrate_cancel")
                proxy.release.set()
            if not run.src_proc.alive:
                break
            if (info := run.src.cmd("query-migrate")).get("status") in FINAL + (UNKNOWN,):
                break
            if time.monotonic() > deadline:
                raise TimeoutError("the migration did not end")
            time.sleep(0.01)
        proxy.release.set()
        src_alive, dst_alive = run.src_proc.alive, run.dst_proc.alive
        t.reached = proxy.reached.is_set()
        t.dest_prepared = proxy.ready_seen.is_set()
        t.committed = bool(info.get("x-commit-sent")) if src_alive else proxy.commit_seen.is_set()
        # settle an unknown outcome as an orchestrator does (the destination first; the lease decides)
        before = {}
        if src_alive:
            before["source"] = info.get("status")
        if dst_alive:
            before["destination"] = _wait_final(run.dst).get("status")
        if UNKNOWN in before.values():
            resolve(run.src if src_alive else None, run.dst if dst_alive else None)
            t.resolved = "+".join(k for k, v in before.items() if v == UNKNOWN)
        t.lease = _holder(Path(run.image))
        src_running = False
        if not src_alive:
            t.src = "gone"
        else:
            t.status = str(run.src.cmd("query-migrate").get("status"))
            t.src = _status(run.src)
            src_running = t.src == "running"
        dst_running = False
        if not dst_alive:
            t.dest = "gone"
        else:
            dinfo = _wait_final(run.dst)
            dst_state = _status(run.dst)
            vfs = run.dst.cmd("query-vfs")
            if dst_state == "running" and dinfo["status"] == "completed":
                dst_running = True
                ver = run.dst.cmd("x-vm-verify")
                t.dest = "committed" if ver["passed"] else "WRONG: runs but fails its verification"
            elif dst_state == "inmigrate" and all(v["state"] == "INIT" for v in vfs):
                t.dest = "untouched"
            else:
                t.dest = f"WRONG: {dst_state} ({dinfo['status']}), VFs {[v['state'] for v in vfs]}"
        t.running = int(src_running) + int(dst_running)
        if src_running:
            t.source_intact = bool(run.src.cmd("x-vm-verify")["passed"])
            _, fresh = run.host("retry", incoming=True)
            r = run_migration(run.src, fresh, timeout=300)
            t.retry = r.get("status") == "completed" and bool(fresh.cmd("x-vm-verify")["passed"])
    except Exception as exc:  # noqa: BLE001 - a trial that could not run is an incorrect trial
        t.error = f"{type(exc).__name__}: {exc}"
    finally:
        if proxy is not None:
            proxy.close()
        if run is not None:
            run.close()
        shutil.rmtree(work, ignore_errors=True)
    return t


def run_campaign(c: Campaign, *, progress: bool = True) -> Campaign:
    from rich.progress import Progress

    rng = random.Random(c.seed)
    c.reference_bytes = reference(c)
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("fault campaign", total=c.trials)
        for i in range(c.trials):
            c.results.append(one_trial(c, KINDS[i % len(KINDS)], rng, seed=c.seed + i + 1))
            bar.advance(task)
    return c


def summary(c: Campaign) -> list[dict[str, Any]]:
    rows = []
    for kind in KINDS:
        ts = [t for t in c.results if t.kind == kind]
        if not ts:
            continue
        rows.append({
            "kind": kind, "trials": len(ts), "reached": sum(t.reached for t in ts),
            "in-commit-window": sum(t.point.startswith("commit") for t in ts),
            "after-commit": sum(t.committed for t in ts),
            "resolved": sum(bool(t.resolved) for t in ts),
            "source-runs": sum(t.src == "running" for t in ts),
            "source-intact": sum(bool(t.source_intact) for t in ts),
            "dest-runs": sum(t.dest == "committed" for t in ts),
            "exactly-one-running": sum(t.running == 1 for t in ts),
            "none-running": sum(t.running == 0 for t in ts),
            "none-justified": sum(t.running == 0 and t.none_justified for t in ts),
            "two-running": sum(t.running > 1 for t in ts),
            "retry-ok": sum(bool(t.retry) for t in ts), "correct": sum(t.correct for t in ts),
        })
    return rows


def print_table(c: Campaign) -> None:
    print(f"\n== fault campaign: {len(c.results)} trials, reference stream {c.reference_bytes:,} bytes, "
          f"commit-window weight {COMMIT_WEIGHT}")
    print(f"  {'kind':<11} {'trials':>6} {'reached':>7} {'window':>6} {'after':>5} {'resolved':>8} "
          f"{'src runs':>8} {'intact':>6} {'dst runs':>8} {'one':>3} {'none':>4} {'two':>3} {'retry ok':>8} "
          f"{'correct':>7}")
    for r in summary(c):
        print(f"  {r['kind']:<11} {r['trials']:>6} {r['reached']:>7} {r['in-commit-window']:>6} {r['after-commit']:>5} "
              f"{r['resolved']:>8} {r['source-runs']:>8} {r['source-intact']:>6} {r['dest-runs']:>8} "
              f"{r['exactly-one-running']:>3} {r['none-running']:>4} {r['two-running']:>3} "
              f"{r['retry-ok']:>8} {r['correct']:>3}/{r['trials']:<3}")
    print("  after: the source sent COMMIT; resolved: a side was in commit-unknown and x-migrate-resolve settled it\n"
          "  (the lease decides); one / none / two: VMs running at the end -- none only where the side with the\n"
          "  only runnable copy was killed (the source before READY, the destination after it took the lease)")
    for t in c.results:
        if not t.correct:
            print(f"  INCORRECT: {t.kind} at {t.point}: {asdict(t)}")


def run(c: Campaign, out_dir: Path) -> int:
    """Run, print the table, write OUT/faults.json; 0 when every trial is correct."""
    run_campaign(c)
    print_table(c)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "faults.json"
    path.write_text(json.dumps({
        "trials": c.trials, "seed": c.seed, "memory-mib": c.memory_mib, "sweep-mib": c.sweep_mib,
        "reference-bytes": c.reference_bytes, "commit-weight": COMMIT_WEIGHT, "summary": summary(c),
        "results": [asdict(t) | {"correct": t.correct} for t in c.results],
    }, indent=1))
    print(f"  every trial: {path}")
    return 0 if all(t.correct for t in c.results) else 1
