"""The ``virtio-lm`` command line.

::

    virtio-lm demo              the main job: migrate a running VM between two host processes
    virtio-lm host              run one host (PF, VFs, VMs, QMP monitor)
    virtio-lm migrate           drive a migration between two hosts' monitors, with progress
    virtio-lm peer              the network peer outside the VM (sequence-numbered frames)
    virtio-lm switch            the embedded learning L2 switch (UDP on loopback)
    virtio-lm analyze-stream    decode a stream saved with ``migrate file:PATH``
    virtio-lm bench             benchmarks (figures and ratios)
    virtio-lm report            the evidence report: every review question answered with a measurement and a plot
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time

from typing import TYPE_CHECKING, Callable

import click

from virtio_lm import __version__
from virtio_lm.addr import parse_hostport
from virtio_lm.errors import AddressError

if TYPE_CHECKING:
    from virtio_lm.vm.machine import VmSpec


@click.group()
@click.version_option(__version__, prog_name="virtio-lm")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """virtio-lm: live migration of virtio devices (VF migration proposal, 2021)."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(process)d %(name)s %(levelname)s: %(message)s")


# ---------------------------------------------------------------------------- host
def parse_rate(text: str | float) -> float:
    """A dirty rate in MB/s: a number (0 = no dirtying) or ``max`` (as fast as the vCPU can)."""
    if isinstance(text, str) and text.strip().lower() == "max":
        return float("inf")
    rate = float(text)
    if not rate >= 0 or rate == float("inf"):
        raise ValueError(f"a dirty rate is a number >= 0 or 'max', got {text!r}")
    return rate


def _rate_option(value: str) -> float:
    try:
        return parse_rate(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def format_rate(rate: float) -> str:
    return "max" if rate == float("inf") else repr(float(rate))


def parse_vm_spec(text: str) -> "VmSpec":
    """``name=vm0,memory=256,blk=PATH,blocks=512,mac=52:54:00:12:34:56,peer=...,dirty-rate=32,...``"""
    from virtio_lm.vm.machine import VmSpec

    keys = {
        "name": ("name", str),
        "memory": ("memory_mib", int),
        "blk": ("blk_image", str),
        "blocks": ("blk_blocks", int),
        "qd": ("blk_qd", int),
        "blk-rate": ("blk_rate", float),
        "blk-dma": ("blk_dma", str),
        "net-tx": ("net_tx", str),
        "mac": ("net_mac", str),
        "peer": ("peer_mac", str),
        "net-rate": ("net_rate", float),
        "dirty-rate": ("dirty_rate_mbps", parse_rate),
        "seed": ("seed", int),
        "sweep": ("sweep_mib", int),
        "fill": ("fill_mib", int),
        "dmatest": ("dmatest", int),
    }
    kw: dict = {}
    for part in filter(None, text.split(",")):
        k, sep, v = part.partition("=")
        if not sep or k not in keys:
            raise click.BadParameter(f"{part!r}: expected one of {', '.join(keys)} as key=value")
        attr, conv = keys[k]
        try:
            kw[attr] = conv(v)
        except ValueError as exc:
            raise click.BadParameter(f"{part!r}: {exc}") from exc
    try:
        return VmSpec(**kw)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def switch_address(text: str) -> tuple[str, int]:
    """``--listen`` / ``--switch HOST:PORT`` (:func:`virtio_lm.addr.parse_hostport`).  The
    switch binds a concrete address and its ports send to that same address, so an
    empty host is this machine's loopback for both."""
    try:
        a = parse_hostport(text)
    except AddressError as exc:
        raise click.BadParameter(str(exc)) from exc
    if ":" in a.host:
        raise click.BadParameter(f"{text!r}: the switch and its ports are IPv4 (UDP over AF_INET)")
    return a.host_or_loopback, a.port


@main.command()
@click.option("--name", default="host", help="Host name (logs, memory names).")
@click.option("--qmp", "qmp", default="tcp:127.0.0.1:4444", show_default=True, help="Monitor: unix:PATH or tcp:HOST:PORT.")
@click.option("--vm", "vms", multiple=True, required=True, help="A VM: name=,memory=MiB,blk=IMAGE,blocks=,qd=,blk-rate=,blk-dma=buffered|direct,mac=,peer=,net-rate=,net-tx=pool|inline,dirty-rate=MB/s|0|max,seed=,sweep=MiB,fill=MiB,dmatest=N (a DMA test VF with N FILLs in flight)")
@click.option("--switch", default=None, help="The embedded switch, HOST:PORT (for net VFs).")
@click.option("--incoming", is_flag=True, help="Start the VMs as shells waiting for migrate-incoming.")
@click.option("--total-vfs", default=16, show_default=True, help="TotalVFs of the PF.")
@click.option("--profile", default="seed", show_default=True, type=click.Choice(["seed", "virtio-1.4"]),
              help="The PF's migration control plane: the 2021 proposal's control queue, or virtio 1.4's admin "
                   "queue with platform (IOMMU) dirty tracking.")
def host(name: str, qmp: str, vms: tuple[str, ...], switch: str | None, incoming: bool, total_vfs: int,
         profile: str) -> None:
    """Run one host: a PF with SR-IOV VFs, its VMs and a QMP monitor, until `quit`."""
    from virtio_lm.host.host import Host, HostConfig
    from virtio_lm.host.interpreter import settle_heap, tune_threads

    tune_threads()  # (host/interpreter.py says why, with the benches that do the same)

    cfg = HostConfig(
        name=name,
        qmp=qmp,
        vms=[parse_vm_spec(v) for v in vms],
        switch=switch_address(switch) if switch else None,
        incoming=incoming,
        total_vfs=total_vfs,
        profile=profile,
    )
    h = Host(cfg).start()
    settle_heap()
    print(f"qmp {h.qmp_address}", flush=True)

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=h.close, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    h.closed.wait()


# ---------------------------------------------------------------------------- switch and peer
@main.command()
@click.option("--listen", "listen_", default="127.0.0.1:0", show_default=True, help="HOST:PORT to listen on.")
@click.option("--lifetime", default=3600.0, show_default=True, help="Stop after this many seconds.")
@click.option("--idle-timeout", default=60.0, show_default=True, help="Stop after this long without traffic.")
@click.option("--moves", "moves_path", default=None, type=click.Path(dir_okay=False),
              help="Append every MAC move (a MAC learned at a new port: a migrated VM found) here, one "
                   "'TIME MAC HOST:PORT' line each, as it happens.")
def switch(listen_: str, lifetime: float, idle_timeout: float, moves_path: str | None) -> None:
    """Run the embedded learning L2 switch (frames as UDP datagrams on loopback)."""
    from virtio_lm.net.switch import main as switch_main

    host_, port = switch_address(listen_)
    argv = ["--host", host_, "--port", str(port), "--lifetime", str(lifetime), "--idle-timeout", str(idle_timeout)]
    sys.exit(switch_main(argv + (["--moves", moves_path] if moves_path else [])))


@main.command()
@click.option("--switch", "switch_", required=True, help="The switch, HOST:PORT.")
@click.option("--mac", default="52:54:00:00:00:fe", show_default=True, help="The peer's MAC.")
@click.option("--vm-mac", required=True, help="The VM's MAC (where to send).")
@click.option("--rate", default=200.0, show_default=True, help="Frames per second to the VM.")
@click.option("--report", "report_path", required=True, type=click.Path(dir_okay=False), help="JSON report written on exit.")
@click.option("--lifetime", default=600.0, show_default=True, help="Stop after this many seconds.")
def peer(switch_: str, mac: str, vm_mac: str, rate: float, report_path: str, lifetime: float) -> None:
    """The peer outside the VM: sends sequence-numbered frames and records what comes back.

    Runs until SIGTERM/SIGINT (or --lifetime), then writes the report: every
    sequence number it sent with its send time, and every one it received
    from the VM with its arrival time."""
    from virtio_lm.net.peer import NetPeer
    from virtio_lm.wire.net import parse_mac

    stop = _stop_on_signals()
    p = NetPeer(switch_address(switch_), parse_mac(mac), name="peer")
    dst = parse_mac(vm_mac)
    sent: list[tuple[int, float]] = []
    print("ready", flush=True)
    t_end = time.monotonic() + lifetime
    period = 1.0 / rate if rate > 0 else None
    nxt = time.monotonic()
    while not stop.is_set() and time.monotonic() < t_end:
        if period is not None:
            seq = p.send_seq(dst)[0]
            sent.append((seq, time.time()))
            nxt += period
            stop.wait(max(0.0, nxt - time.monotonic()))
        else:
            stop.wait(0.1)
    received = p.seqs_from(dst)
    report = {"sent": sent, "received": received, "received-times": p.times_from(dst), "announces": len(p.announces)}
    p.close()
    with open(report_path, "w") as f:
        json.dump(report, f)


# ---------------------------------------------------------------------------- migrate / demo
@main.command()
@click.option("--source", required=True, help="Source monitor: unix:PATH or tcp:HOST:PORT.")
@click.option("--dest", required=True, help="Destination monitor.")
@click.option("--uri", default=None, help="Migration URI the destination listens on (default: tcp:127.0.0.1:0 chosen by it).")
@click.option("--vm", default=None, help="The VM to migrate (default: the first).")
@click.option("--downtime-limit-ms", default=300, show_default=True)
@click.option("--max-bandwidth", default=0, show_default=True, help="Bytes/s, 0 = unlimited.")
@click.option("--mode", default="pull-bitmap", type=click.Choice(["push-bitmap", "push-bytemap", "pull-bitmap", "pull-bytemap"]), show_default=True)
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Write query-migrate's final answer here.")
def migrate(source: str, dest: str, uri: str | None, vm: str | None, downtime_limit_ms: int, max_bandwidth: int, mode: str, json_path: str | None) -> None:
    """Migrate a VM from the host at SOURCE to the host at DEST, with a progress bar."""
    from virtio_lm.orchestrate import Monitor, run_migration

    with Monitor(source) as src, Monitor(dest) as dst:
        params = {"downtime-limit": downtime_limit_ms, "max-bandwidth": max_bandwidth, "x-tracking-mode": mode}
        info = run_migration(src, dst, vm=vm, uri=uri, params=params, progress=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(info, f, indent=2)
    click.echo(f"status {info.get('status')}, total {info.get('total-time')} ms, downtime {info.get('downtime')} ms")
    sys.exit(0 if info.get("status") == "completed" else 1)


@main.command()
@click.option("--memory-mib", default=256, show_default=True, help="Guest memory of the VM.")
@click.option("--mode", default="pull-bitmap", type=click.Choice(["push-bitmap", "push-bytemap", "pull-bitmap", "pull-bytemap"]), show_default=True, help="Dirty page tracking mode of the VFs.")
@click.option("--dirty-rate-mbps", default="32", show_default=True, callback=lambda c, p, v: _rate_option(v),
              help="MB/s of pages the vCPU dirties: 0 = none, 'max' = as fast as it can.")
@click.option("--fill-mib", default=0, show_default=True, help="MiB of random non-zero pages the guest writes at boot.")
@click.option("--sweep-mib", default=None, type=int, help="MiB the vCPU sweeps (default: the rest of memory).")
@click.option("--downtime-limit-ms", default=300, show_default=True)
@click.option("--max-bandwidth", default=0, show_default=True, help="Bytes/s for the migration, 0 = unlimited.")
@click.option("--seed", default=1, show_default=True)
@click.option("--warmup", default=2.0, show_default=True, help="Seconds the VM runs before the migration.")
@click.option("--after", default=2.0, show_default=True, help="Seconds the VM runs on the destination before verifying.")
@click.option("--profile", default="seed", show_default=True, type=click.Choice(["seed", "virtio-1.4"]),
              help="Both hosts' PF profile: the proposal's commands, or virtio 1.4's admin queue + IOMMU tracking.")
@click.option("--no-device-tracking", is_flag=True, help="Negative control: do not track VF DMA (seed: the device's "
              "tracking, virtio-1.4: the platform's); verification must fail.")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Write the report (query-migrate names) here.")
@click.option("--keep", is_flag=True, help="Keep the temporary directory (logs, disk image).")
def demo(**opts: object) -> None:
    """Migrate a running VM with a virtio-blk and a virtio-net VF between two host processes, and verify.

    Creates a disk image, starts the switch, the peer, a source and a
    destination host as separate processes on loopback, lets the workloads
    run, migrates, lets them run on the destination, verifies memory, disk
    and network, prints the report, and cleans up.  Exit status 0 only when
    the migration completed and every check passed."""
    from virtio_lm.demo import DemoOptions, run_demo

    sys.exit(run_demo(DemoOptions(**opts)))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- analyze / bench
@main.command("analyze-stream")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="JSON instead of text.")
def analyze_stream(path: str, as_json: bool) -> None:
    """Decode a migration stream saved with `migrate file:PATH`."""
    from virtio_lm.errors import VirtioLmError
    from virtio_lm.migration.analyze import analyze_file, format_summary

    try:
        summary = analyze_file(path)
    except VirtioLmError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(format_summary(summary, as_json=as_json))
    if summary.get("error"):
        sys.exit(1)


@main.command()
@click.argument("which", nargs=-1, type=click.Choice(["migration", "downtime", "faults", "profiles", "foundation", "pf", "devices",
                                                          "vhost-blk", "all"]))
@click.option("--quick", is_flag=True, help="Smaller sizes (a smoke run).")
@click.option("--runs", default=None, type=click.IntRange(1, 1000),
              help="downtime: runs per cell (default 10, quick 2); profiles: runs per profile (default 5, quick 2).")
@click.option("--limits", default=None, help="downtime: limits in ms, comma separated (default 30,100,300).")
@click.option("--modes", default=None, help="downtime: tracking modes, comma separated (default all four).")
@click.option("--rates", default=None, help="downtime: vCPU dirty rates in MB/s, comma separated (default 32,128).")
@click.option("--label", default="", help="downtime: a label for the table and the file names (e.g. 'stress').")
@click.option("--out", "out_dir", default="bench-out", show_default=True, type=click.Path(file_okay=False),
              help="downtime: where the JSON and PNG go.")
@click.option("--vs-qemu", is_flag=True, help="downtime: QEMU 7.2 (TCG) on the same work in the same run.")
@click.option("--no-matrix", is_flag=True, help="downtime: with --vs-qemu, only the comparison.")
@click.option("--trials", default=20, show_default=True, type=click.IntRange(1, 10000),
              help="faults: trials (fault kinds round-robin).")
@click.option("--seed", default=1, show_default=True, type=int, help="faults: seed of the fault points.")
@click.option("--profile", "device_profile", default="seed", show_default=True, type=click.Choice(["seed", "virtio-1.4"]),
              help="migration, downtime: the hosts' PF profile (profiles runs both).")
def bench(which: tuple[str, ...], quick: bool, runs: int | None, limits: str | None, modes: str | None,
          rates: str | None, label: str, out_dir: str, vs_qemu: bool, no_matrix: bool, trials: int, seed: int,
          device_profile: str) -> None:
    """Benchmarks: print figures and ratios against baselines measured in the same run.

    `downtime` runs the downtime matrix (limits x tracking modes x dirty rates, every
    run on a fresh pair of host processes) and writes OUT/downtime[-LABEL].json/.png.
    `faults` runs a fault campaign (SIGKILL, connection cut, byte flip, cancel at uniform
    points of the stream and in the commit window, fresh hosts per trial), prints per
    fault kind what held and writes OUT/faults.json; exit status 1 if any trial was wrong.
    `profiles` migrates the same VM and work under the seed profile and virtio 1.4 (fresh hosts
    per run), prints downtime and phases, total time, device state bytes, control commands and
    their time, dirty collection's cost per GiB, and writes OUT/profiles.json/.png."""
    from pathlib import Path

    from virtio_lm.bench import run_benches

    rc = 0
    if "faults" in which:
        from virtio_lm import bench_faults as bf

        rc |= bf.run(bf.Campaign(trials=trials, seed=seed), Path(out_dir))
    if "profiles" in which:
        from virtio_lm import bench_profiles as bp

        plan = bp.Plan.quick() if quick else bp.Plan()
        if runs:
            plan.runs = runs
        summary = bp.run(plan, Path(out_dir))
        rc |= 0 if all(s["verified"] == s["runs"] for s in summary.values()) else 1
    rest = tuple(w for w in which if w not in ("downtime", "faults", "profiles"))
    if "downtime" in which:
        from virtio_lm import bench_downtime as bd

        m = bd.Matrix.quick() if quick else bd.Matrix()
        if runs:
            m.runs = runs
        if limits:
            m.limits = tuple(int(x) for x in limits.split(","))
        if modes:
            m.modes = tuple(x.strip() for x in modes.split(","))
            for x in m.modes:
                if x not in bd.MODES:
                    raise click.BadParameter(f"{x!r} is not one of {', '.join(bd.MODES)}")
        if rates:
            m.rates = tuple(parse_rate(x) for x in rates.split(","))
        m.label = label
        m.profile = device_profile
        if not (no_matrix and vs_qemu):
            bd.run(m, Path(out_dir))
        if vs_qemu:
            rc |= bd.run_vs_qemu(m, Path(out_dir), runs=runs)
    if rest or not which:
        rc |= run_benches(rest or ("migration",), quick=quick, device_profile=device_profile)
    sys.exit(rc)


@main.command()
@click.option("--quick", is_flag=True, help="A smaller campaign (at most 90 s instead of 10 minutes).")
@click.option("--out", "out_dir", default="report-out", show_default=True, type=click.Path(file_okay=False),
              help="Where index.html, report.md, report.json and the PNGs go.")
@click.option("--section", "sections", multiple=True,
              type=click.Choice(["tracking", "modes", "portions", "slow-commands", "downtime", "profiles"]),
              help="Only this section (repeatable); default: all.")
def report(quick: bool, out_dir: str, sections: tuple[str, ...]) -> None:
    """Measure and write the evidence report: each review question and design choice, its answer,
    the measurement, a plot and the command that reproduces that section alone."""
    from pathlib import Path

    from virtio_lm.report import run_report

    argv = ["virtio-lm", "report", *(["--quick"] if quick else []), *(a for s in sections for a in ("--section", s)),
            "--out", out_dir]
    meta = run_report(Path(out_dir), quick=quick, sections=sections, argv=argv)
    click.echo(f"report written to {out_dir}/index.html, report.md, report.json ({meta['seconds']:.0f} s)")


@main.command("vhost-user-blk")
@click.option("--socket", "socket_path", required=True, help="UNIX socket path to listen on (QEMU connects).")
@click.option("--image", required=True, type=click.Path(exists=True, dir_okay=False), help="Raw disk image.")
@click.option("--read-only", is_flag=True, help="Offer VIRTIO_BLK_F_RO; refuse writes.")
@click.option("--queues", default=1, show_default=True, type=click.IntRange(1, 64), help="Request queues.")
@click.option("--stats", "stats_path", default=None, type=click.Path(dir_okay=False),
              help="Write the back-end's counters (JSON: chains taken per queue, requests executed again) here at exit.")
@click.option("--unsafe-no-dirty-log", is_flag=True, hidden=True,
              help="Negative control for tests: offer LOG_ALL but never write the dirty log.")
@click.option("--inline-max", default=16 << 10, show_default=True, type=click.IntRange(0),
              help="Requests moving at most this many bytes run on the notification thread (0: all on the I/O pool).")
@click.option("--buffered-io", is_flag=True,
              help="Read the image into a buffer and copy it to the guest, instead of straight into guest memory.")
@click.option("--no-fast-path", is_flag=True,
              help="Serve reads and writes in Python too, not in the C fast path (a baseline for benches).")
@click.option("--unsafe-hold-after", type=int, default=None, hidden=True,
              help="Fault injection for tests: after N requests, take every further one and never execute it.")
def vhost_user_blk(socket_path: str, image: str, read_only: bool, queues: int, stats_path: str | None,
                   inline_max: int, buffered_io: bool, no_fast_path: bool, unsafe_no_dirty_log: bool,
                   unsafe_hold_after: int | None) -> None:
    """Serve the virtio-blk device model to a vhost-user front-end (QEMU), with dirty logging."""
    from virtio_lm.devices.blk import BlkDevice
    from virtio_lm.vhost.server import VhostUserServer

    device = BlkDevice(image, read_only=read_only, num_queues=queues, queue_max_size=1024)
    device.hold_after = unsafe_hold_after
    device.inline_max = inline_max
    device.direct_dma = not buffered_io
    device.fast_path = not no_fast_path
    server = VhostUserServer(socket_path, device, log_writes=not unsafe_no_dirty_log)
    server.listen()
    done = _stop_on_signals(server.stop)
    click.echo(f"vhost-user-blk: serving {image} on {socket_path}", err=True)
    server.start()
    _wait_for(done)
    stats = {"taken": [q.taken for q in server.backend.fn.queues], "resubmitted": server.backend.resubmitted,
             "held": device.held, "direct": device.direct_runs, "buffered": device.buffered_runs,
             "fast": device.fast_served, "connections": server.connections, "refusals": server.refusals}
    server.close()
    device.close()
    if stats_path:
        with open(stats_path, "w") as f:
            json.dump(stats, f)


def _stop_on_signals(then: Callable[[], None] | None = None) -> threading.Event:
    """SIGTERM / SIGINT set the returned event (and call ``then``): how a serving command ends.
    The handler does it on a new thread: a handler runs on the main thread between two bytecodes,
    and one that set the event itself while the main thread was inside ``done.wait`` -- holding
    the event's lock -- would wait for that lock forever (a peer hung so once in CI)."""
    done = threading.Event()

    def finish() -> None:
        done.set()
        if then is not None:
            then()

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=finish, name="signal", daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return done


def _wait_for(done: threading.Event) -> None:
    while not done.wait(0.5):  # (a short wait: the main thread runs the signal handlers)
        pass


@main.command("vhost-user-net")
@click.option("--socket", "socket_path", required=True, help="UNIX socket path to listen on (QEMU connects).")
@click.option("--switch", "switch_", default=None, help="The embedded switch, HOST:PORT.")
@click.option("--tap", default=None, help="A Linux TAP interface to create (needs CAP_NET_ADMIN).")
@click.option("--queues", default=1, show_default=True, type=click.IntRange(1, 64), help="Queue pairs.")
@click.option("--inline-max", default=2048, show_default=True, type=click.IntRange(0),
              help="Frames of at most this many bytes are sent on the notification thread when the back-end is "
                   "ready (0: all through the I/O pool).")
@click.option("--guest-announce", is_flag=True,
              help="Offer VIRTIO_NET_F_GUEST_ANNOUNCE (the guest announces itself; QEMU then sends no SEND_RARP).")
@click.option("--stats", "stats_path", default=None, type=click.Path(dir_okay=False),
              help="Write the device's counters (JSON) here at exit.")
@click.option("--no-fast-path", is_flag=True,
              help="Send every frame through the Python path, not the C transmit fast path (a baseline for benches).")
@click.option("--unsafe-no-dirty-log", is_flag=True, hidden=True,
              help="Negative control for tests: offer LOG_ALL but never write the dirty log.")
def vhost_user_net(socket_path: str, switch_: str | None, tap: str | None, queues: int, inline_max: int,
                   guest_announce: bool, stats_path: str | None, no_fast_path: bool, unsafe_no_dirty_log: bool) -> None:
    """Serve the virtio-net device model to a vhost-user front-end (QEMU), with dirty logging."""
    from virtio_lm.devices.net import NetDevice
    from virtio_lm.net.backends import NetBackend, TapBackend, UdpSwitchPort
    from virtio_lm.vhost.net import VhostUserNetBackend
    from virtio_lm.vhost.server import VhostUserServer
    from virtio_lm.wire.net import NetFeature
    from virtio_lm.wire.features import bit

    if (switch_ is None) == (tap is None):
        raise click.UsageError("give exactly one of --switch HOST:PORT and --tap NAME")
    port: NetBackend
    if switch_ is not None:
        port = UdpSwitchPort(switch_address(switch_), name="vhost-net")
        where = f"switch port {port.local_addr[0]}:{port.local_addr[1]}"
    else:
        port = TapBackend(tap)  # BackendUnavailableError says why it cannot
        where = f"tap {port.ifname}"
    without = 0 if guest_announce else bit(NetFeature.GUEST_ANNOUNCE)
    device = NetDevice(port, max_pairs=queues, queue_max_size=1024, without=without)
    device.inline_max = inline_max
    device.fast_path = not no_fast_path
    backend = VhostUserNetBackend(device, log_writes=not unsafe_no_dirty_log)
    server = VhostUserServer(socket_path, device, backend=backend)
    server.listen()
    done = _stop_on_signals(server.stop)
    click.echo(f"vhost-user-net: {where}, {queues} queue pairs, on {socket_path}", err=True)
    server.start()
    _wait_for(done)
    server.close()
    stats = {"device": dict(device.stats), "fast": device.fast_served, "rarps": backend.rarps,
             "connections": server.connections,
             "refusals": server.refusals}
    device.close()
    if stats_path:
        with open(stats_path, "w") as f:
            json.dump(stats, f)


@main.command("vfio-user")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False),
              help="Directory for the sockets: pf.sock, vf1.sock, vf2.sock, ...")
@click.option("--profile", type=click.Choice(["seed", "virtio-1.4"]), default="seed", show_default=True,
              help="The PF's migration control plane.")
@click.option("--blk", "blk_image", type=click.Path(exists=True, dir_okay=False),
              help="A virtio-blk VF over this raw image (VF 1).")
@click.option("--mac", "net_mac", help="A virtio-net VF with this MAC (after the blk VF).")
@click.option("--switch", "switch", help="HOST:PORT of the L2 switch the net VF joins (virtio-lm switch).")
@click.option("--total-vfs", default=8, show_default=True, type=click.IntRange(1, 64), help="TotalVFs of the PF.")
@click.option("--serve", "serve", default="", help="Comma-separated functions to serve (pf,vf1,...); default all.")
@click.option("--lists-before-vf-enable", is_flag=True,
              help="virtio-1.4 PF: answer the SR-IOV group's LIST_QUERY / LIST_USE while VF Enable is clear, "
                   "as Linux 6.12's virtio_pci expects at probe (the spec says INVALID_GROUP; docs/decisions.md).")
def vfio_user(directory: str, profile: str, blk_image: str | None, net_mac: str | None, switch: str | None,
              total_vfs: int, serve: str, lists_before_vf_enable: bool) -> None:
    """Serve a host's PF and each VF to QEMU's vfio-user-pci, each on a socket of its own."""
    import os

    from virtio_lm.vfio_user.host import VfioUserHost
    from virtio_lm.vm.kinds import KINDS, DeviceContext
    from virtio_lm.vm.machine import VmSpec

    os.makedirs(directory, exist_ok=True)
    sw = parse_hostport(switch) if switch else None
    spec = VmSpec(name="vfio", blk_image=blk_image, net_mac=net_mac)
    ctx = DeviceContext(switch=(sw.host_or_loopback, sw.port) if sw else None)
    devices = [lambda k=k: KINDS[k].device(spec, ctx) for k in ("blk", "net") if KINDS[k].in_spec(spec)]
    host = VfioUserHost(directory, devices, profile=profile, total_vfs=total_vfs,
                        serve={s for s in serve.split(",") if s} or None,
                        lists_before_vf_enable=lists_before_vf_enable).start()
    done = _stop_on_signals()
    for key, server in host.servers.items():
        click.echo(f"vfio-user: {host.function(key).name} ({key}) on {server.path}", err=True)
    _wait_for(done)
    host.close()


if __name__ == "__main__":
    main()
