"""``virtio-lm bench``: figures, their targets, and ratios to baselines measured in the same run.

``run_benches(which, quick)`` runs the named groups and prints one table each:

* ``migration`` (the default) -- the figures issue 5 names:

  1. *stream throughput*: a 1 GiB VM full of random data, idle (vCPU stopped,
     no VFs), migrated by a :class:`~virtio_lm.migration.session.SourceSession`
     in one process to a :class:`~virtio_lm.migration.session.DestSession` in
     another over loopback TCP, through the real endpoints
     (:mod:`virtio_lm.host.endpoints` over guest :class:`~virtio_lm.memory.Memory`);
     the destination's memory is compared with the source's afterwards.  The
     baselines move the same number of bytes process to process over loopback
     TCP (:func:`~virtio_lm.migration.transport.raw_loopback_throughput`):
     *memory-to-memory* (read from one buffer the size of the stream, received
     into another -- each byte crosses memory once on each side, as a migrated
     page must) and *cache-hot* (one 1 MiB buffer sent again and again into one
     4 MiB buffer -- the sockets' cost alone).  Baselines run before and after
     the migration; their mean is used.  The target (>= 0.8) is judged against
     the memory-to-memory baseline; the cache-hot ratio is printed too.
     Per-process CPU seconds and, in a separate profiled run (full mode), the
     functions that take the time on each side.
  2. *idle all-zero 1 GiB VM*: bytes on the wire (target <= 1 MiB).
  3. *downtime vs limit*: real hosts as separate processes (``virtio-lm
     host``, switch, peer: the demo's set-up), a VM with blk + net VFs under
     load and a vCPU dirtying memory, migrated with downtime-limit 30, 100 and
     300 ms: measured downtime <= limit and expected-downtime within +-25 % of it.
  4. *VF switch-over fixed cost*: two in-process hosts (two PFs, two guest
     memories), a blk VF with 32 requests in flight and a net VF; QUIESCE,
     FREEZE, SAVE_STATE on the source, FREEZE + RESTORE_STATE, QUIESCE, RUN on
     the destination (each step one batch of control-queue commands), the guest
     state taken and restored -- :func:`virtio_lm.host.switchover.timed_switchover`;
     guest pages are copied outside the clock.  Target <= 10 ms.

* ``foundation``, ``pf``, ``devices`` -- the modules of :mod:`virtio_lm.benches`,
  run in this process (``--quick`` gives them shorter measurement times);
* ``vhost-blk`` -- :mod:`virtio_lm.benches.vhost_blk`: our vhost-user-blk back-end process
  against qemu-storage-daemon through one front-end, no guest (3 samples; ``--quick`` 1);
  ``all`` -- every group.

No figure is asserted anywhere: a missed target is printed as ``MISSED``.
Returns 0 when every group ran, 1 when one failed to run.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import socket
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

MIB = 1 << 20
GIB = 1 << 30
PAGE = 4096
GROUPS = ("migration", "foundation", "pf", "devices", "vhost-blk")


@dataclass
class Figure:
    name: str
    value: str
    target: str = ""
    met: bool | None = None  # None: no target (a baseline or a detail)
    note: str = ""


def _print_table(title: str, figures: list[Figure], out=None) -> None:
    out = out or sys.stdout
    print(f"\n== {title}", file=out)
    w0 = max([len(f.name) for f in figures] + [6])
    w1 = max([len(f.value) for f in figures] + [5])
    w2 = max([len(f.target) for f in figures] + [6])
    print(f"  {'figure':<{w0}}  {'value':>{w1}}  {'target':<{w2}}  {'':<6}  note", file=out)
    for f in figures:
        verdict = "" if f.met is None else ("met" if f.met else "MISSED")
        print(f"  {f.name:<{w0}}  {f.value:>{w1}}  {f.target:<{w2}}  {verdict:<6}  {f.note}".rstrip(), file=out)
    out.flush()


# ---------------------------------------------------------------------- endpoints without VFs
def _vm_without_vfs(memory_mib: int, name: str):
    from virtio_lm.memory import Memory
    from virtio_lm.vm.machine import VirtualMachine, VmSpec

    spec = VmSpec(name=name, memory_mib=memory_mib, dirty_rate_mbps=1e-9)
    return VirtualMachine(spec, Memory(memory_mib * MIB, name=name, backing="memfd"))


def _fill(mem, fill: str, seed: int) -> None:
    """Random: a 16 MiB random block repeated, every page stamped with its number (pages differ)."""
    if fill == "zero":
        return
    block = np.random.default_rng(seed).integers(0, 256, 16 * MIB, dtype=np.uint8)
    writer = mem.cpu.writer
    with mem.modify(0, mem.size, writer) as view:
        for off in range(0, mem.size, len(block)):
            k = min(len(block), mem.size - off)
            view[off : off + k] = block[:k]
        pages = view.reshape(-1, PAGE)
        pages[:, 0:8] = np.arange(1, mem.num_pages + 1, dtype="<u8").view(np.uint8).reshape(-1, 8)


def _digest(mem) -> int:
    crc = 0
    arr = mem.array
    for off in range(0, mem.size, 64 * MIB):
        crc = zlib.crc32(arr[off : off + 64 * MIB], crc)
    return crc


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _idle_destination_class():
    from virtio_lm.host.endpoints import VmDestination

    class IdleDestination(VmDestination):
        """Starts without resuming the vCPU, so memory can be compared bit for bit after."""

        def start(self) -> None:
            pass

    return IdleDestination


def _profiler(on: bool):
    if not on:
        return None
    import cProfile

    prof = cProfile.Profile()
    prof.enable()
    return prof


def _profile_lines(prof, top: int = 7) -> list[str]:
    """The functions with the most time of their own (wall clock: a blocked call counts its wait)."""
    if prof is None:
        return []
    import pstats

    prof.disable()
    st = pstats.Stats(prof)
    rows = sorted(
        (kv for kv in st.stats.items() if kv[0][2] != "<method '_accept' of '_socket.socket' objects>"),  # type: ignore[attr-defined]
        key=lambda kv: kv[1][2], reverse=True,
    )[:top]  # the destination's wait for the source to connect is left out
    total = sum(v[2] for v in st.stats.values()) or 1.0  # type: ignore[attr-defined]
    out = []
    for (fname, line, func), (_cc, nc, tt, _ct, _callers) in rows:
        where = func if fname == "~" else f"{Path(fname).name}:{line}({func})"
        out.append(f"{tt:7.3f} s {tt / total:5.1%}  {nc:>7} calls  {where}")
    return out


def _stream_dest(memory_mib: int, port_q, out_q, profile: bool) -> None:
    from virtio_lm.migration.session import DestSession
    from virtio_lm.migration.transport import DestRunner, listen

    _IdleDestination = _idle_destination_class()
    vm = _vm_without_vfs(memory_mib, "dst")
    vm.memory.array.reshape(-1, PAGE)[:, 0].sum()  # map the pages (a host would have them)
    lst = listen("127.0.0.1", 0)
    port_q.put(lst.getsockname()[1])
    sess = DestSession(_IdleDestination(vm, None), clock=time.monotonic)  # type: ignore[arg-type]
    runner = DestRunner(sess, listener=lst, timeout=60)
    c0 = _cpu()
    prof = _profiler(profile)
    runner.run()
    cpu = _cpu() - c0
    profile_lines = _profile_lines(prof)
    out_q.put({"side": "dest", "status": sess.status, "cpu": cpu, "digest": _digest(vm.memory),
               "error": str(sess.error) if sess.error else None, "profile": profile_lines})


def _stream_source(memory_mib: int, fill: str, port: int, out_q, profile: bool) -> None:
    from virtio_lm.host.endpoints import VmSource
    from virtio_lm.migration.session import SourceSession
    from virtio_lm.migration.transport import SourceRunner

    vm = _vm_without_vfs(memory_mib, "src")
    _fill(vm.memory, fill, 7)
    digest = _digest(vm.memory)
    sess = SourceSession(VmSource(vm, None), clock=time.monotonic)  # type: ignore[arg-type]
    sock = socket.create_connection(("127.0.0.1", port))
    runner = SourceRunner(sess, sock, timeout=60)
    c0 = _cpu()
    prof = _profiler(profile)
    t0 = time.perf_counter()
    runner.run()
    t1 = time.perf_counter()
    cpu = _cpu() - c0
    profile_lines = _profile_lines(prof)
    out_q.put({"side": "source", "status": sess.status, "cpu": cpu, "seconds": t1 - t0,
               "bytes": sess.sent, "digest": digest, "info": sess.info(),
               "error": str(sess.error) if sess.error else None, "profile": profile_lines})


def stream_migration(memory_mib: int, fill: str, *, profile: bool = False) -> dict[str, Any]:
    """Migrate a VM without VFs, ``fill`` "random" or "zero", source and destination in two processes."""
    ctx = mp.get_context("spawn")
    port_q, out_q = ctx.Queue(), ctx.Queue()
    d = ctx.Process(target=_stream_dest, args=(memory_mib, port_q, out_q, profile), daemon=True)
    d.start()
    s = None
    try:
        port = _get(port_q, d, 120)
        s = ctx.Process(target=_stream_source, args=(memory_mib, fill, port, out_q, profile), daemon=True)
        s.start()
        res = {}
        for _ in range(2):
            r = _get(out_q, None, 600)
            res[r["side"]] = r
    finally:
        for p in (s, d):
            if p is not None:
                p.join(30)
                if p.is_alive():
                    p.kill()
    src, dst = res["source"], res["dest"]
    if src["status"] != "completed" or dst["status"] != "completed":
        raise RuntimeError(f"migration {src['status']} / {dst['status']}: {src['error'] or dst['error']}")
    if src["digest"] != dst["digest"]:
        raise RuntimeError("destination memory differs from the source's after the migration")
    return res


def _get(q, proc, timeout: float):
    import queue as _queue

    deadline = time.monotonic() + timeout
    while True:
        try:
            return q.get(timeout=0.5)
        except _queue.Empty:
            if (proc is not None and not proc.is_alive()) or time.monotonic() > deadline:
                raise RuntimeError("a bench process died or hung") from None


# ---------------------------------------------------------------------- figure 1 and 2
def _mib_s(bps: float) -> str:
    return f"{bps / MIB:,.0f} MiB/s"


def bench_stream(quick: bool) -> list[Figure]:
    from virtio_lm.migration.transport import raw_loopback_throughput

    mib = 256 if quick else 1024
    label = f"{mib} MiB" if mib != 1024 else "1 GiB"
    figs: list[Figure] = []
    raw_loopback_throughput(64 * MIB, processes=True)  # warm-up: the first spawn pays the imports
    res = stream_migration(mib, "random")
    src, dst = res["source"], res["dest"]
    nbytes = src["bytes"]
    hot, mem = [], []
    for _ in range(2):  # before and after (the migration ran in between)
        mem.append(raw_loopback_throughput(nbytes, processes=True, from_memory=True)["bytes-per-second"])
        hot.append(raw_loopback_throughput(nbytes, processes=True)["bytes-per-second"])
    res2 = stream_migration(mib, "random")
    rates = [r["source"]["bytes"] / r["source"]["seconds"] for r in (res, res2)]
    rate = sum(rates) / len(rates)
    mem_bps, hot_bps = sum(mem) / len(mem), sum(hot) / len(hot)
    ratio = rate / mem_bps
    figs.append(Figure(f"stream throughput, {label} random, idle", _mib_s(rate), "",
                       None, f"{nbytes:,} B on the wire; runs {', '.join(_mib_s(r) for r in rates)}; memory verified"))
    figs.append(Figure("raw loopback TCP, same bytes, memory-to-memory", _mib_s(mem_bps), "", None,
                       f"process to process; runs {', '.join(_mib_s(r) for r in mem)}"))
    figs.append(Figure("raw loopback TCP, same bytes, cache-hot buffers", _mib_s(hot_bps), "", None,
                       f"process to process; runs {', '.join(_mib_s(r) for r in hot)}"))
    figs.append(Figure("ratio stream / raw memory-to-memory", f"{ratio:.2f}", ">= 0.8", ratio >= 0.8))
    figs.append(Figure("ratio stream / raw cache-hot", f"{rate / hot_bps:.2f}", "", None,
                       "the sockets alone, no guest memory read or written"))
    gib = nbytes / GIB
    figs.append(Figure("CPU per GiB: source / destination process",
                       f"{src['cpu'] / gib:.2f} / {dst['cpu'] / gib:.2f} s", "", None,
                       f"user+sys; wall {src['seconds'] / gib:.2f} s per GiB"))
    return figs


def bench_zero(quick: bool) -> list[Figure]:
    mib = 256 if quick else 1024
    res = stream_migration(mib, "zero")
    n = res["source"]["bytes"]
    scaled = n * 1024 // mib
    label = "1 GiB" if mib == 1024 else f"{mib} MiB"
    note = "" if mib == 1024 else f"(x{1024 // mib} = {scaled:,} B for 1 GiB)"
    return [Figure(f"idle all-zero {label} VM: bytes on the wire", f"{n:,} B", "<= 1 MiB", scaled <= MIB,
                   f"{res['source']['seconds'] * 1000:.0f} ms; memory verified {note}".strip())]


def stream_profile(quick: bool) -> list[str]:
    mib = 256 if quick else 1024
    res = stream_migration(mib, "random", profile=True)
    lines = [f"  where the time goes (cProfile, a separate {mib} MiB run; own time, wall clock):"]
    for side in ("source", "dest"):
        lines.append(f"    {'source' if side == 'source' else 'destination'}:")
        lines += [f"      {ln}" for ln in res[side]["profile"]]
    return lines


# ---------------------------------------------------------------------- figure 3: downtime vs limit
def bench_downtime(quick: bool) -> tuple[list[Figure], list[str]]:
    """A VM (blk + net VFs, vCPU dirtying memory) hops host to host, one migration per limit."""
    from virtio_lm.demo import BLOCKS, PEER_MAC, VM_MAC, cli_command, start_network
    from virtio_lm.orchestrate import ChildProcess as _Proc
    from virtio_lm.orchestrate import Monitor, run_migration, shut_down

    limits = (30, 100, 300)
    memory_mib = 128 if quick else 512
    dirty_mbps = 256.0
    figs: list[Figure] = []
    details: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="virtio-lm-bench-"))
    procs: list[_Proc] = []
    monitors: list[Monitor] = []
    try:
        net = start_network(work, procs)
        image, switch = net.image, net.switch
        vm = (f"name=vm0,memory={memory_mib},blk={image},blocks={BLOCKS},qd=32,mac={VM_MAC},peer={PEER_MAC},"
              f"dirty-rate={dirty_mbps},seed=3")

        def host(i: int, incoming: bool) -> Monitor:
            argv = ["host", "--name", f"h{i}", "--qmp", f"unix:{work}/h{i}.qmp", "--vm", vm, "--switch", switch]
            p = _Proc(f"h{i}", cli_command(*argv, *(["--incoming"] if incoming else [])), work)
            procs.append(p)
            m = Monitor(p.first_line().split()[-1])
            monitors.append(m)
            return m

        src = host(0, False)
        time.sleep(1.0)  # the workloads get going
        # hop 1 (limit 300 ms) is the first migration of this VM kind: no learned switch-over
        # cost yet (pages-only estimate); the hosts it touches learn it (SwitchoverHistory)
        for i, limit in enumerate((300, *limits), start=1):
            warm = i == 1
            dst = host(i, True)
            info = run_migration(src, dst, params={"downtime-limit": limit}, timeout=300)
            if info.get("status") != "completed":  # e.g. the limit is below the fixed cost: the VM stays
                desc = str(info.get("error-desc", ""))
                gave_up = "fixed cost" in desc  # a clean give-up: honest, not a miss (the VM runs on)
                figs.append(Figure(f"downtime, limit {limit} ms", "gave up" if gave_up else info.get("status", "?"),
                                   f"<= {limit} ms", None if gave_up else False, desc[:150]))
                dst.cmd("quit")
                continue
            phases = info.get("downtime-phases") or {}
            measured = sum(phases.values()) if phases else float(info.get("downtime", 0))
            expected = float(info.get("expected-downtime", 0))
            ok_limit = measured <= limit
            err = (expected - measured) / measured if measured else math.inf
            tag = f"limit {limit} ms" + (", first hop, nothing learned" if warm else "")
            learned = info.get("x-switchover-cost-estimate")
            figs.append(Figure(f"downtime, {tag}", f"{measured:.1f} ms", "" if warm else f"<= {limit} ms",
                               None if warm else ok_limit,
                               f"{info['ram']['dirty-sync-count']} rounds, throttle {info.get('cpu-throttle-percentage', 0)} %"))
            figs.append(Figure(f"expected-downtime, {tag}", f"{expected:.0f} ms", "" if warm else "+-25 % of measured",
                               None if warm else abs(err) <= 0.25,
                               f"{err:+.0%} of measured; learned fixed cost "
                               + (f"{learned:.1f} ms" if learned is not None else "none")))
            details.append(f"  {tag}, phases (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
            if i <= len(limits):
                time.sleep(0.5)  # runs on its new host a moment before hopping on
            src = dst
        ver = src.cmd("x-vm-verify")
        details.append(f"  after the hops the guest verifies: {'passed' if ver.get('passed') else 'FAILED'}"
                       + ("" if ver.get("passed") else f" {ver}"))
    finally:
        shut_down(monitors, procs)
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    details.insert(0, f"  VM: {memory_mib} MiB, vCPU dirtying {dirty_mbps:.0f} MB/s, blk VF (QD 32) + net VF; "
                      f"hosts are separate processes; each limit one hop to a new host")
    return figs, details


# ---------------------------------------------------------------------- figure 4: VF switch-over fixed cost
BUSY_QD = 32
BUSY_SPEC = dict(name="vm0", memory_mib=64, blk_blocks=256, blk_qd=BUSY_QD, blk_rate=0.0,
                 net_mac="52:54:00:12:34:56", dirty_rate_mbps=8.0, net_rate=500.0)


@contextlib.contextmanager
def busy_host_pair(image: Path, profile: str = "seed"):
    """Two in-process hosts (two PFs, two guest memories, no start-up calibration) with
    :data:`BUSY_SPEC`'s VM: ``a``'s running (blk VF at QD 32 on a fresh 16 MiB disk ``image``,
    net VF), ``b``'s an incoming shell."""
    from virtio_lm.host.host import Host, HostConfig
    from virtio_lm.vm.machine import VmSpec

    with open(image, "wb") as f:
        f.truncate(16 << 20)
    spec = dict(BUSY_SPEC, blk_image=str(image))
    hosts = []
    try:
        hosts.append(Host(HostConfig(name="a", vms=[VmSpec(**spec)], calibrate=False, profile=profile)))  # type: ignore[arg-type]
        hosts.append(Host(HostConfig(name="b", vms=[VmSpec(**spec)], incoming=True, calibrate=False,  # type: ignore[arg-type]
                                     profile=profile)))
        yield hosts[0], hosts[1]
    finally:
        for h in hosts:
            with contextlib.suppress(Exception):
                h.close()


def wait_blk_in_flight(vm, n: int, timeout: float = 5.0) -> int:
    """Wait (up to ``timeout``) until the guest has ``n`` blk requests in flight; how many it has."""
    deadline = time.monotonic() + timeout
    while vm.requests_in_flight().get("blk", 0) < n and time.monotonic() < deadline:
        time.sleep(0.0005)
    return int(vm.requests_in_flight().get("blk", 0))


def bench_vf_switchover(quick: bool, profile: str = "seed") -> tuple[list[Figure], list[str]]:
    """Two in-process hosts (two PFs of ``profile``, two guest memories); blk (32 in flight) + net VFs."""
    from virtio_lm.host.endpoints import VmDestination, VmSource
    from virtio_lm.host.interpreter import release_heap, settle_heap, tune_threads
    from virtio_lm.host.switchover import STEPS, switchover_seconds, timed_switchover

    interval = tune_threads()  # the interpreter as a host process sets it up (host/interpreter.py)
    runs = 3 if quick else 20
    work = Path(tempfile.mkdtemp(prefix="virtio-lm-bench-vf-"))
    totals: list[float] = []
    serial: list[float] = []
    per_phase: dict[str, list[float]] = {}
    inflight_seen: list[int] = []
    problems: list[str] = []
    try:
        for run in range(runs):
            with busy_host_pair(work / f"disk{run}.img", profile) as (a, b):  # each run's guest starts with a fresh disk
                svm, dvm = a.slots["vm0"].vm, b.slots["vm0"].vm
                src, dst = VmSource(svm, a.migration), VmDestination(dvm, b.migration)
                thresholds = settle_heap()
                inflight_seen.append(wait_blk_in_flight(svm, BUSY_QD))
                # the switch-over of a migration, step by step (host/switchover.py); the guest
                # pages move with the stream, outside the clock
                t = timed_switchover(src, dst, lambda: dvm.memory.cpu.write(0, svm.memory.read(0, svm.memory.size)))
                totals.append(switchover_seconds(t))
                serial.append(sum(t.values()))
                for k in STEPS:
                    per_phase.setdefault(k, []).append(t[k])
                # the guest goes on over there: its requests complete, memory and disk verify
                time.sleep(0.3)
                ver = dvm.verify(disk=True)
                if not ver["passed"]:
                    problems.append(str({k: v.get("problems") for k, v in ver["checks"].items()})[:300])
                for vf in src.vf_numbers:
                    a.migration.reset(vf)
            release_heap(thresholds)
    finally:
        import shutil

        sys.setswitchinterval(interval)
        shutil.rmtree(work, ignore_errors=True)
    med = float(np.median(totals)) * 1000
    worst = max(totals) * 1000
    figs = [Figure(f"switch-over fixed cost, blk + net VFs, 32 in flight{'' if profile == 'seed' else ', ' + profile}",
                   f"{med:.2f} ms", "<= 10 ms", med <= 10.0,
                   f"median of {runs}; worst {worst:.2f} ms (<= 15 ms: {'yes' if worst <= 15.0 else 'NO'}); "
                   f"all steps in series {np.median(serial) * 1000:.2f} ms; "
                   f"in flight at pause {min(inflight_seen)}..{max(inflight_seen)}; "
                   + ("guest verified after every run" if not problems else f"VERIFY FAILED: {problems[0]}"))]
    details = ["  switch-over steps, median ms (source: pause, guest state, quiesce, freeze + save incl. the "
               "blk flush; destination: guest restore, VF restore (FREEZED, RESTORE_STATE, QUIESCED), run; "
               "the guest restore overlaps quiesce .. save as in a migration; the network and the final pages "
               "are not in it): "
               + ", ".join(f"{k} {np.median(v) * 1000:.3f}" for k, v in per_phase.items())]
    return figs, details


# ---------------------------------------------------------------------- the other groups: virtio_lm.benches
def run_foundation(quick: bool) -> None:
    from virtio_lm.benches import foundation

    foundation.main(["--seconds", "0.1" if quick else "0.5", *(["--scan-repeats", "1"] if quick else [])])


def run_pf(quick: bool) -> None:
    from virtio_lm.benches import pf

    pf.main(["--seconds", "0.1" if quick else "0.5", "--guest-gib", "0.25" if quick else "1"])


def run_devices(quick: bool) -> None:
    from virtio_lm.benches import devices

    devices.main(["--seconds", "0.2"] if quick else [])


def run_vhost_blk(quick: bool) -> None:
    from virtio_lm.benches import vhost_blk

    if vhost_blk.main(["--samples", "1" if quick else "3"]):
        raise RuntimeError("the vhost-user-blk bench failed")


# ---------------------------------------------------------------------- entry point
def run_migration(quick: bool, *, profile: bool | None = None, out=None, device_profile: str = "seed") -> list[Figure]:
    """The migration figures (printed as they come); returns them."""
    out = out or sys.stdout
    figs: list[Figure] = []
    t0 = time.monotonic()
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("stream throughput", lambda: bench_stream(quick)),
        ("idle all-zero VM", lambda: bench_zero(quick)),
        ("downtime vs limit", lambda: bench_downtime(quick)),
        ("VF switch-over fixed cost", lambda: bench_vf_switchover(quick, device_profile)),
    ]
    details: list[str] = []
    for name, fn in steps:
        r = fn()
        if isinstance(r, tuple):
            figs += r[0]
            details += r[1]
        else:
            figs += r
    _print_table(f"migration{' (quick: smaller sizes)' if quick else ''}", figs, out)
    for line in details:
        print(line, file=out)
    if profile if profile is not None else not quick:
        for line in stream_profile(quick):
            print(line, file=out)
    print(f"  (migration group: {time.monotonic() - t0:.1f} s)", file=out)
    out.flush()
    return figs


def run_benches(which: tuple[str, ...] | list[str] = ("migration",), *, quick: bool = False,
                device_profile: str = "seed") -> int:
    """Run the groups named in ``which`` (see the module docstring); 0 if all ran, 1 if one failed."""
    names: list[str] = []
    for w in which or ("migration",):
        for n in (GROUPS if w == "all" else (w,)):
            if n not in GROUPS:
                raise ValueError(f"unknown bench group {n!r} (have {', '.join(GROUPS)}, all)")
            if n not in names:
                names.append(n)
    runners: dict[str, Callable[[], Any]] = {
        "migration": lambda: run_migration(quick, device_profile=device_profile),
        "foundation": lambda: run_foundation(quick),
        "pf": lambda: run_pf(quick),
        "devices": lambda: run_devices(quick),
        "vhost-blk": lambda: run_vhost_blk(quick),
    }
    failed = []
    for n in names:
        if n != "migration":
            print(f"\n== {n} (virtio_lm/benches/{n.replace('-', '_')}.py)", flush=True)
        try:
            runners[n]()
        except Exception:
            failed.append(n)
            print(f"\n!! bench group {n} failed to run:\n{traceback.format_exc()}", flush=True)
    return 1 if failed else 0
