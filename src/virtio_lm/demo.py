"""``virtio-lm demo``: the whole product on one machine, as separate processes.

1. a disk image (a sparse file) in a temporary directory;
2. the embedded L2 switch, the network peer, a source host and a destination
   host, each a process of its own, talking over loopback (QMP on unix
   sockets, migration over TCP, frames over UDP);
3. the VM starts on the source (vCPU page sweeps, a blk workload and a net
   workload on its two VFs) and runs for ``--warmup`` seconds;
4. ``migrate-incoming`` on the destination, ``migrate`` on the source, progress
   until the status is final;
5. the VM runs ``--after`` seconds on the destination, then the guest verifies:
   every page of the sweep region matches the migrated vCPU state, every valid
   page-cache slot and every disk block holds its expected generation, and the
   network lost frames only inside the switch-over window, with no duplicates;
6. the report (QEMU query-migrate names, plus ``devices`` and ``verification``),
   and every process and file cleaned up.

Exit status 0 only when the migration completed and every check passed.
"""

from __future__ import annotations

import bisect
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from virtio_lm.net.switch import read_moves
from virtio_lm.orchestrate import ChildProcess, Monitor, run_migration

VM_MAC = "52:54:00:12:34:56"
PEER_MAC = "52:54:00:00:00:fe"
IMAGE_MIB = 16
BLOCKS = 256
WINDOW_SLACK = 0.5  # seconds of loss tolerated around the switch-over window (announce, queues)
#: the longest the network may take, after the destination's RESUME, to learn the VM's new port
RELEARN_MAX = 5.0


@dataclass
class DemoOptions:
    memory_mib: int = 256
    mode: str = "pull-bitmap"
    dirty_rate_mbps: float = 32.0  # 0 = none, inf = as fast as it can
    fill_mib: int = 0
    sweep_mib: int | None = None
    downtime_limit_ms: int = 300
    max_bandwidth: int = 0
    seed: int = 1
    warmup: float = 2.0
    after: float = 2.0
    no_device_tracking: bool = False
    profile: str = "seed"  # both hosts' PF profile: "seed" or "virtio-1.4"
    json_path: str | None = None
    keep: bool = False
    quiet: bool = False


def vm_spec_text(memory_mib: int, image: Path | str, dirty_rate_mbps: float, seed: int, *, fill_mib: int = 0,
                 sweep_mib: int | None = None, extra: str = "") -> str:
    """The ``--vm`` argument of the demo's VM (blk + net VFs, the demo's MACs)."""
    from virtio_lm.cli import format_rate

    text = (f"name=vm0,memory={memory_mib},blk={image},blocks={BLOCKS},mac={VM_MAC},peer={PEER_MAC},"
            f"dirty-rate={format_rate(dirty_rate_mbps)},seed={seed},fill={fill_mib}")
    if sweep_mib is not None:
        text += f",sweep={sweep_mib}"
    return text + (f",{extra}" if extra else "")


def cli_command(*args: str) -> list[str]:
    """The argv that runs ``virtio-lm ARGS`` with this interpreter (the demo's, the benches' and
    the tests' child processes)."""
    return [sys.executable, "-m", "virtio_lm.cli", *args]


@dataclass
class Network:
    """The disk image, the switch and the peer a demo (or a bench) runs its hosts against."""

    image: Path
    switch: str  # HOST:PORT
    peer: ChildProcess
    peer_report: Path
    moves: Path  # the switch's MAC moves (virtio_lm.net.switch.read_moves)


def start_network(work: Path, procs: list[ChildProcess]) -> Network:
    """Create the disk image in ``work``, start the switch and the peer (appended to ``procs``)."""
    image = work / "disk.img"
    with open(image, "wb") as f:  # sparse: a fully allocated one measured no better here (issue 9 note)
        f.truncate(IMAGE_MIB << 20)
    moves = work / "switch-moves.txt"
    sw = ChildProcess("switch", cli_command("switch", "--listen", "127.0.0.1:0", "--lifetime", "900", "--moves", str(moves)), work)
    procs.append(sw)
    switch_addr = sw.first_line().split()[-1]
    peer_report = work / "peer.json"
    pr = ChildProcess(
        "peer",
        cli_command("peer", "--switch", switch_addr, "--mac", PEER_MAC, "--vm-mac", VM_MAC, "--rate", "200", "--report", str(peer_report)),
        work,
    )
    procs.append(pr)
    pr.first_line()
    return Network(image, switch_addr, pr, peer_report, moves)


def _union(runs: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """The union of ``[first, first + count)`` runs as sorted, disjoint ``[start, end)`` ranges."""
    starts: list[int] = []
    ends: list[int] = []
    for f, n in sorted(runs):
        if starts and f <= ends[-1]:
            ends[-1] = max(ends[-1], f + n)
        else:
            starts.append(f)
            ends.append(f + n)
    return starts, ends


def _covered(starts: list[int], ends: list[int], seq: int) -> bool:
    i = bisect.bisect_right(starts, seq) - 1
    return i >= 0 and seq < ends[i]


def check_network(
    peer: dict[str, Any], vm_net: dict[str, Any], window: tuple[float, float], *, until: float,
    moved_at: Sequence[float] = (),
) -> dict[str, Any]:
    """Loss only inside the switch-over window, and no duplicates, in both directions.

    ``peer`` is the peer's report; ``vm_net`` the guest's own counters (``received``:
    the peer's sequence numbers in arrival order as ``[first, count]`` runs; ``tx-sent``); ``window`` the switch-over in
    wall-clock time (source STOP .. destination RESUME); ``until`` when the
    VM was stopped for verification (frames sent after it are not judged).
    Frames from the peer before the first one the VM received (the VM was
    still booting) are not judged either.

    The window, as the network sees it, closes when the switch has learned the VM's new
    port: until a frame from the VM (its announce, or any frame) has come in through the
    destination's port, frames for the VM still go to the source's.  ``moved_at``: when the
    switch learned the VM's MAC at a new port (:func:`virtio_lm.net.switch.read_moves`); the
    last such move from STOP to ``RESUME + RELEARN_MAX`` closes the window if it is after
    RESUME (reported as ``relearn-s``, from RESUME).  Without one the window ends at RESUME."""
    moves = [t for t in moved_at if window[0] <= t <= window[1] + RELEARN_MAX]
    relearn = max(moves) if moves else None
    lo, hi = window[0] - WINDOW_SLACK, max(window[1], relearn or 0.0) + WINDOW_SLACK
    problems: list[str] = []
    # peer -> VM: what the VM received, as [first, count] runs in arrival order
    runs = [(int(f), int(n)) for f, n in vm_net["received"]]
    first = min((f for f, _ in runs), default=0)
    sent = {seq: t for seq, t in peer["sent"] if seq >= first and t < until - WINDOW_SLACK}
    starts, ends = _union(runs)
    total = sum(n for _, n in runs)
    dup_in = total - sum(e - s for s, e in zip(starts, ends))
    lost_in = [s for s in sent if not _covered(starts, ends, s)]
    outside = [s for s in lost_in if not lo <= sent[s] <= hi]
    if dup_in:
        problems.append(f"{dup_in} frames from the peer arrived twice")
    if outside:
        # where they lie: seconds before the window opened, seconds after it closed
        early = sorted(window[0] - sent[s] for s in outside if sent[s] < lo)
        late = sorted(sent[s] - window[1] for s in outside if sent[s] > hi)
        where = [f"{len(early)} sent {early[0]:.3f}-{early[-1]:.3f} s before it opened"] if early else []
        where += [f"{len(late)} sent {late[0]:.3f}-{late[-1]:.3f} s after it closed"] if late else []
        problems.append(
            f"{len(outside)} frames from the peer lost outside the switch-over window "
            f"({'; '.join(where)}; seq {outside[:5]})"
        )
    # VM -> peer
    rx = peer["received"]
    times = peer["received-times"]
    dup_out = len(rx) - len(set(rx))
    have = set(rx)
    lost_out = [s for s in range(max(rx) + 1 if rx else 0) if s not in have]
    by_seq = dict(zip(rx, times))
    out_bad = []
    for s in lost_out:  # a frame the VM sent: judge it by its neighbours' arrival times
        before = max((q for q in have if q < s), default=None)
        after = min((q for q in have if q > s), default=None)
        t0 = by_seq.get(before, lo) if before is not None else lo
        t1 = by_seq.get(after, hi) if after is not None else hi
        if not (t1 >= lo and t0 <= hi):
            out_bad.append(s)
    if dup_out:
        problems.append(f"{dup_out} frames from the VM arrived twice at the peer (a TX sent again)")
    if out_bad:
        problems.append(f"{len(out_bad)} frames from the VM lost outside the switch-over window (seq {out_bad[:5]})")
    if not total:
        problems.append("the VM received no frame from the peer")
    if not rx:
        problems.append("the peer received no frame from the VM")
    return {
        "passed": not problems,
        "problems": problems,
        "peer-to-vm": {"sent-judged": len(sent), "received": total, "lost": len(lost_in), "duplicates": dup_in},
        "vm-to-peer": {"sent": vm_net.get("tx-sent"), "received": len(rx), "lost": len(lost_out), "duplicates": dup_out},
        "window-s": [round(window[0], 3), round(window[1], 3)],
        "relearn-s": None if relearn is None else round(relearn - window[1], 3),
    }


#: host-side bound on the wait for the peer's last frame to reach the VM (``wait_for_last_frame``)
DRAIN_S = 30.0


def wait_for_last_frame(monitor: Monitor, last_seq: int, timeout: float = DRAIN_S, *, vm: str | None = None,
                        poll: float = 0.05) -> bool:
    """Let the VM run until it has received the peer's frame ``last_seq`` (its ``query-vms``
    net ``rx-highest``), at most ``timeout`` seconds; whether it did.  Call it once the peer has
    stopped: its last frames may still be on their way (the switch, the port, the RX ring) on a
    busy host, and the path is FIFO, so once the last is in every earlier frame has come or is
    lost -- the network check then judges every frame sent, with no grace period to guess.  A
    stalled RX path is not hidden: the frame never comes and the check reports the loss."""
    deadline = time.monotonic() + timeout
    while True:
        vms = monitor.cmd("query-vms")
        v = next((x for x in vms if vm is None or x.get("name") == vm), None)
        if v is not None and v.get("net", {}).get("rx-highest", -1) >= last_seq:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)


def run_demo(opts: DemoOptions) -> int:
    from rich.console import Console

    from virtio_lm.progress import is_terminal

    # in a pipe or a log, a line is never wrapped into pieces at rich's default 80 columns
    console = Console(stderr=False, quiet=opts.quiet, soft_wrap=not is_terminal())
    work = Path(tempfile.mkdtemp(prefix="virtio-lm-demo-"))
    procs: list[ChildProcess] = []
    report: dict[str, Any] = {"status": "failed"}
    ok = False
    try:
        net = start_network(work, procs)
        image, switch_addr, pr, peer_report, moves = net.image, net.switch, net.peer, net.peer_report, net.moves
        vm = vm_spec_text(opts.memory_mib, image, opts.dirty_rate_mbps, opts.seed, fill_mib=opts.fill_mib,
                          sweep_mib=opts.sweep_mib)
        src = ChildProcess("source", cli_command("host", "--name", "source", "--qmp", f"unix:{work}/source.qmp", "--vm", vm, "--switch", switch_addr, "--profile", opts.profile), work)
        procs.append(src)
        dst = ChildProcess(
            "destination",
            cli_command("host", "--name", "destination", "--qmp", f"unix:{work}/destination.qmp", "--vm", vm, "--switch", switch_addr, "--incoming",
                        "--profile", opts.profile),
            work,
        )
        procs.append(dst)
        src_qmp = src.first_line().split()[-1]
        dst_qmp = dst.first_line().split()[-1]
        console.print(f"[bold]virtio-lm demo[/] in {work}: switch {switch_addr}, source {src_qmp}, destination {dst_qmp}")
        with Monitor(src_qmp) as s, Monitor(dst_qmp) as d:
            console.print(f"VM running on the source ({opts.memory_mib} MiB, blk + net VFs, PF profile {opts.profile}); "
                          f"warming up {opts.warmup} s")
            time.sleep(opts.warmup)
            before = s.cmd("query-vms")[0]
            params = {
                "downtime-limit": opts.downtime_limit_ms,
                "max-bandwidth": opts.max_bandwidth,
                "x-tracking-mode": opts.mode,
                "x-device-tracking": not opts.no_device_tracking,
                "x-device-profile": opts.profile,
            }
            info = run_migration(s, d, params=params, progress=not opts.quiet)
            s.pull_events()
            d.pull_events()
            report.update({k: v for k, v in info.items() if k != "destination"})
            report["destination"] = info.get("destination", {})
            report["devices"] = {"source": s.cmd("query-vfs"), "destination": d.cmd("query-vfs")}
            status = info.get("status")
            console.print(
                f"migration {status}: total {info.get('total-time')} ms, downtime {info.get('downtime')} ms "
                f"(expected {info.get('expected-downtime')} ms), {info.get('ram', {}).get('dirty-sync-count')} rounds"
            )
            verification: dict[str, Any] = {"passed": False}
            if status == "completed":
                time.sleep(opts.after)
                pr.stop()  # the peer stops sending first, then the VM runs until its last frame is in
                peer = json.loads(peer_report.read_text())
                wait_for_last_frame(d, max((seq for seq, _ in peer.get("sent", [])), default=-1))
                d.cmd("stop")  # what the peer sent has arrived or is lost
                t_stop = time.time()
                time.sleep(0.3)
                guest = d.cmd("x-vm-verify")
                after_vm = d.cmd("query-vms")[0]
                verification = {"guest": guest, "source-before": before, "destination-after": after_vm}
                d.pull_events()
                stop_t = next((e["timestamp"] for e in s.events if e["event"] == "STOP"), None)
                resume_t = next((e["timestamp"] for e in d.events if e["event"] == "RESUME"), None)
                net_check = guest.get("checks", {}).get("net", {})
                vm_net = dict(net_check.get("stats", {}), received=net_check.get("received", []))
                window = (
                    stop_t["seconds"] + stop_t["microseconds"] / 1e6 if stop_t else time.time(),
                    resume_t["seconds"] + resume_t["microseconds"] / 1e6 if resume_t else time.time(),
                )
                net = check_network(peer, vm_net, window, until=t_stop, moved_at=read_moves(moves, VM_MAC))
                verification["network"] = net
                verification["passed"] = bool(guest.get("passed")) and net["passed"]
            report["verification"] = verification
            ok = status == "completed" and verification["passed"]
            _print_report(console, report)
            for m in (s, d):
                try:
                    m.cmd("quit")
                except Exception:
                    pass
        report["status"] = report.get("status", "failed")
    except Exception as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
        console.print(f"[red]demo failed:[/] {report['error']} (logs in {work})")
        opts.keep = True
    finally:
        for p in reversed(procs):
            p.stop()
        if opts.json_path:
            with open(opts.json_path, "w") as f:
                json.dump(report, f, indent=2, default=str)
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)
    console.print("[bold green]PASS[/]" if ok else "[bold red]FAIL[/]")
    return 0 if ok else 1


def _print_report(console: Any, report: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title="migration", show_header=False)
    ram = report.get("ram", {})
    rows = [
        ("status", report.get("status")),
        ("total-time", f"{report.get('total-time')} ms"),
        ("setup-time", f"{report.get('setup-time')} ms"),
        ("downtime", f"{report.get('downtime')} ms"),
        ("expected-downtime", f"{report.get('expected-downtime')} ms"),
        ("ram transferred", ram.get("transferred")),
        ("ram total / duplicate / normal", f"{ram.get('total')} / {ram.get('duplicate')} / {ram.get('normal')}"),
        ("rounds (dirty-sync-count)", ram.get("dirty-sync-count")),
        ("mbps", ram.get("mbps")),
        ("cpu-throttle-percentage", report.get("cpu-throttle-percentage")),
    ]
    for k, v in rows:
        t.add_row(k, str(v))
    for k, v in (report.get("downtime-phases") or {}).items():
        t.add_row(f"  downtime: {k}", f"{v} ms")
    console.print(t)
    ver = report.get("verification", {})
    v = Table(title="verification", show_header=False)
    for name, c in (ver.get("guest", {}).get("checks") or {}).items():
        v.add_row(name, "ok" if c.get("passed") else "FAILED", "; ".join(c.get("problems", [])[:3]))
    net = ver.get("network")
    if net:
        v.add_row(
            "network", "ok" if net["passed"] else "FAILED",
            f"peer->vm {net['peer-to-vm']}; vm->peer {net['vm-to-peer']}"
            + (f"; network relearned {net['relearn-s'] * 1000:.0f} ms after resume" if net.get("relearn-s") is not None else "")
            + ("; " + "; ".join(net["problems"]) if net["problems"] else ""),
        )
    console.print(v)
