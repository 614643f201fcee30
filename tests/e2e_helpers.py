"""End-to-end test scaffolding: real processes (switch, peers, hosts), QMP through
:class:`virtio_lm.orchestrate.Monitor` (the ``qemu.qmp`` client library), and a TCP
proxy that can cut or corrupt a migration stream.

A :class:`Cluster` owns every process and file of one test and stops them all in
:meth:`Cluster.close` (the ``cluster`` fixture of each test module calls it).
Processes may run inside a network namespace (``netns=``): they are started with
``ip netns exec NS``; their QMP monitors are unix sockets on the shared file
system, so the test process talks to them from the root namespace.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from virtio_lm.demo import DRAIN_S, check_network, cli_command, wait_for_last_frame
from virtio_lm.net.switch import read_moves
from virtio_lm.orchestrate import FINAL, ChildProcess, Monitor, run_migration
from virtio_lm.wire.stream import Direction, Ready, StreamDecoder

VM_MAC = "52:54:00:12:34:56"
PEER_MAC = "52:54:00:00:00:fe"
VM1_MAC = "52:54:00:12:34:57"
PEER1_MAC = "52:54:00:00:00:fd"
IMAGE_MIB = 16
BLOCKS = 256


def vm_arg(
    image: Path | str,
    *,
    name: str = "vm0",
    memory: int = 64,
    mac: str | None = VM_MAC,
    peer: str = PEER_MAC,
    blk_rate: float = 0.0,
    qd: int = 16,
    dirty_rate: float = 32.0,
    seed: int = 1,
    sweep: int | None = None,
) -> str:
    """A ``--vm`` argument.  ``blk_rate=0`` runs the blk workload flat out, so it
    always has ``qd`` requests submitted when its thread parks: I/O in flight at
    the switch-over by construction."""
    parts = [
        f"name={name}", f"memory={memory}", f"blk={image}", f"blocks={BLOCKS}", f"qd={qd}",
        f"blk-rate={blk_rate}", f"dirty-rate={dirty_rate}", f"seed={seed}",
    ]
    if sweep is not None:
        parts.append(f"sweep={sweep}")
    if mac:
        parts += [f"mac={mac}", f"peer={peer}"]
    return ",".join(parts)


# the demo's child-process helper serves the tests too
Proc = ChildProcess


@dataclass
class Peer:
    proc: Proc
    report_path: Path
    vm_mac: str = VM_MAC
    moves_path: Path | None = None  # its switch's MAC moves (virtio_lm.net.switch.read_moves)

    def finish(self) -> dict[str, Any]:
        """Stop the peer (it writes its report on SIGTERM) and read the report."""
        self.proc.stop()
        try:
            return json.loads(self.report_path.read_text())
        except FileNotFoundError:  # say how the peer ended (seen once in CI: no report, an empty log)
            raise AssertionError(f"the peer wrote no report: exit status {self.proc.p.returncode} (-9: killed after "
                                 f"not stopping within 15 s of SIGTERM); log: {self.proc.log_tail()!r}") from None


@dataclass
class HostProc:
    proc: Proc
    qmp: str
    monitors: list[Monitor] = field(default_factory=list)

    def monitor(self) -> Monitor:
        m = Monitor(self.qmp, timeout=60.0)
        self.monitors.append(m)
        return m


class Cluster:
    """The processes of one end-to-end test, all stopped by :meth:`close`."""

    def __init__(self, workdir: Path) -> None:
        self.work = Path(workdir)
        self.procs: list[Proc] = []
        self.hosts: list[HostProc] = []
        self.proxies: list[Proxy] = []
        self.switch_moves: dict[str, Path] = {}  # switch address -> its MAC-move log
        self._n = 0

    def _name(self, base: str) -> str:
        self._n += 1
        return f"{base}-{self._n}"

    def image(self, name: str = "disk") -> Path:
        path = self.work / f"{name}.img"
        with open(path, "wb") as f:
            f.truncate(IMAGE_MIB << 20)
        return path

    def switch(self, listen: str = "127.0.0.1:0", *, netns: str | None = None) -> str:
        name = self._name("switch")
        moves = self.work / f"{name}-moves.txt"
        p = Proc(name, cli_command("switch", "--listen", listen, "--lifetime", "600", "--moves", str(moves)), self.work,
                 netns=netns)
        self.procs.append(p)
        address = p.first_line().split()[-1]
        self.switch_moves[address] = moves
        return address

    def peer(
        self, switch: str, *, vm_mac: str = VM_MAC, mac: str = PEER_MAC, rate: float = 200.0, netns: str | None = None
    ) -> Peer:
        name = self._name("peer")
        report = self.work / f"{name}.json"
        p = Proc(
            name,
            cli_command("peer", "--switch", switch, "--mac", mac, "--vm-mac", vm_mac, "--rate", str(rate), "--report", str(report)),
            self.work,
            netns=netns,
        )
        self.procs.append(p)
        p.first_line()
        return Peer(p, report, vm_mac, self.switch_moves.get(switch))

    def host(
        self, vms: list[str], *, switch: str | None = None, incoming: bool = False, name: str | None = None,
        netns: str | None = None, profile: str | None = None,
    ) -> HostProc:
        name = self._name(name or ("destination" if incoming else "source"))
        argv = ["host", "--name", name, "--qmp", f"unix:{self.work}/{name}.qmp"]
        for v in vms:
            argv += ["--vm", v]
        if switch:
            argv += ["--switch", switch]
        if incoming:
            argv.append("--incoming")
        if profile:
            argv += ["--profile", profile]
        p = Proc(name, cli_command(*argv), self.work, netns=netns)
        self.procs.append(p)
        h = HostProc(p, p.first_line().split()[-1])
        self.hosts.append(h)
        return h

    def proxy(self, target: tuple[str, int], **kw: Any) -> "Proxy":
        px = Proxy(target, **kw)
        self.proxies.append(px)
        return px

    def close(self) -> None:
        for px in self.proxies:
            px.close()
        for h in self.hosts:
            for m in h.monitors:
                try:
                    m.close()
                except Exception:
                    pass
        for p in reversed(self.procs):
            p.stop()


# ------------------------------------------------------------------------------ QMP helpers
def wait_for(mon: Monitor, pred: Any, *, vm: str | None = None, timeout: float = 60.0, poll: float = 0.01) -> dict:
    """Poll query-migrate until ``pred(info)``; returns that answer."""
    vmarg = {"vm": vm} if vm else {}
    deadline = time.monotonic() + timeout
    while True:
        info = mon.cmd("query-migrate", **vmarg)
        if pred(info):
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"query-migrate never matched in {timeout} s; last answer {info}")
        time.sleep(poll)


def wait_final(mon: Monitor, *, vm: str | None = None, timeout: float = 120.0) -> dict:
    return wait_for(mon, lambda i: i.get("status") in FINAL, vm=vm, timeout=timeout, poll=0.02)


def listen_address(dst: Monitor, uri: str = "tcp:127.0.0.1:0", *, vm: str | None = None) -> tuple[str, int]:
    """``migrate-incoming`` on ``dst``; returns where it listens."""
    vmarg = {"vm": vm} if vm else {}
    dst.cmd("migrate-incoming", uri=uri, **vmarg)
    info = wait_for(dst, lambda i: bool(i.get("socket-address")), vm=vm, timeout=10)
    a = info["socket-address"][0]
    return a["host"], int(a["port"])


def vm_status(mon: Monitor, vm: str | None = None) -> str:
    return mon.cmd("query-status", **({"vm": vm} if vm else {}))["status"]


def assert_source_intact(src: Monitor, *, vm: str | None = None) -> dict:
    """The source VM runs again and passes its own verification (disk included)."""
    vmarg = {"vm": vm} if vm else {}
    assert vm_status(src, vm) == "running"
    vfs = [v for v in src.cmd("query-vfs") if vm is None or v["vm"] == vm]
    assert vfs and all(v["state"] == "RUNNING" for v in vfs), vfs
    assert all(v["tracking"] is None for v in vfs), f"dirty tracking left on after the failure: {vfs}"
    before = src.cmd("query-vms")
    time.sleep(0.3)  # it keeps running: its counters move
    after = src.cmd("query-vms")
    b = next(v for v in before if vm is None or v["name"] == vm)
    a = next(v for v in after if vm is None or v["name"] == vm)
    assert a["vcpu"]["position"] != b["vcpu"]["position"] or a["vcpu"]["sweeps"] > b["vcpu"]["sweeps"]
    assert a["blk"]["writes"] + a["blk"]["reads"] > b["blk"]["writes"] + b["blk"]["reads"]
    result = src.cmd("x-vm-verify", **vmarg)
    assert result["passed"], json.dumps(result["checks"], default=str)[:3000]
    return result


def finish_and_verify(
    src: Monitor, dst: Monitor, peer: Peer | None, *, after: float = 0.5, vm: str | None = None,
    first_stop: dict[str, int] | None = None,
) -> dict[str, Any]:
    """After a completed migration: let the VM run ``after`` seconds on the
    destination, stop the peer, let its last frame reach the VM (at most DRAIN_S; a
    frame still on its way is not a loss), stop the VM, run the guest's verification there and
    the network check (loss only inside the switch-over window, no duplicates).
    ``first_stop``: judge the network from this (earlier) STOP timestamp on
    instead of the last migration's STOP.  Returns ``{"guest", "network", "peer"}``
    (the last: the peer's own report)."""
    vmarg = {"vm": vm} if vm else {}
    time.sleep(after)
    report: dict[str, Any] | None = None
    if peer is not None:
        # the peer stops sending first; its last frames may still be on their way (the switch,
        # the destination's port, the RX ring) on a busy host, so the VM runs on until it has
        # the last one (in order: all before it have come or are lost) or DRAIN_S pass
        report = peer.finish()
        wait_for_last_frame(dst, max((seq for seq, _ in report["sent"]), default=-1), DRAIN_S, vm=vm)
    dst.cmd("stop", **vmarg)
    t_stop = time.time()
    time.sleep(0.3)
    guest = dst.cmd("x-vm-verify", **vmarg)
    out: dict[str, Any] = {"guest": guest}
    if peer is not None:
        assert report is not None
        src.pull_events()
        dst.pull_events()
        stop_t = first_stop or next((e["timestamp"] for e in src.events if e["event"] == "STOP"), None)
        resume_t = next((e["timestamp"] for e in dst.events if e["event"] == "RESUME"), None)
        assert stop_t is not None and resume_t is not None, "STOP on the source / RESUME on the destination missing"
        window = (stop_t["seconds"] + stop_t["microseconds"] / 1e6, resume_t["seconds"] + resume_t["microseconds"] / 1e6)
        net = guest["checks"].get("net", {})
        vm_net = dict(net.get("stats", {}), received=net.get("received", []))
        moved_at = read_moves(peer.moves_path, peer.vm_mac) if peer.moves_path else []
        out["network"] = check_network(report, vm_net, window, until=t_stop, moved_at=moved_at)
        out["peer"] = report
    return out


def migrate(src: Monitor, dst: Monitor, params: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    return run_migration(src, dst, params=params or {}, progress=False, poll=0.02, timeout=300, **kw)


# ------------------------------------------------------------------------------ a TCP proxy
class Proxy:
    """A TCP proxy between a migration source and its destination, in a thread.

    ``corrupt_at``: flip one byte at that offset of the source->destination
    stream.  ``cut_after_ready``: once the destination's READY has gone to the
    source, drop whatever the source sends next (its COMMIT) and cut the
    connection -- the link fails after the source committed.  ``cut_after_commit``:
    pass the COMMIT on, then drop the destination's answer (RUNNING) and cut -- the
    destination runs, the source never hears it.  ``hold_after_commit``: pass the
    COMMIT on and hold the destination's answer until :attr:`release` is set (the
    source waits in its commit window meanwhile).  :meth:`cut` cuts the connection
    now (RST both ways)."""

    def __init__(
        self, target: tuple[str, int], *, corrupt_at: int | None = None, cut_after_ready: bool = False,
        cut_after_commit: bool = False, hold_after_commit: bool = False,
    ) -> None:
        self.target = target
        self.corrupt_at = corrupt_at
        self.cut_after_ready = cut_after_ready
        self.cut_after_commit = cut_after_commit
        self.hold_after_commit = hold_after_commit
        self.commit_forwarded = threading.Event()  # the data the source sent after READY is going on
        self.release = threading.Event()
        self.dropped_after_commit = 0
        self.lst = socket.create_server(("127.0.0.1", 0))
        self.address = self.lst.getsockname()[:2]
        self.uri = f"tcp:{self.address[0]}:{self.address[1]}"
        self.forwarded = {"to-dest": 0, "to-source": 0}
        self.connected = threading.Event()
        self.corrupted = threading.Event()
        self.ready_seen = threading.Event()
        self.dropped_after_ready = 0
        self.cut_done = threading.Event()
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name="proxy", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        try:
            a, _ = self.lst.accept()
        except OSError:
            return
        b = socket.create_connection(self.target)
        for s in (a, b):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._socks = [a, b]
        self.connected.set()
        threading.Thread(target=self._pump, args=(a, b, "to-dest"), daemon=True).start()
        threading.Thread(target=self._pump, args=(b, a, "to-source"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        dec = StreamDecoder(Direction.TO_SOURCE) if direction == "to-source" else None
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                if direction == "to-dest":
                    if self.cut_after_ready and self.ready_seen.is_set():
                        self.dropped_after_ready += len(data)
                        self.cut()
                        return
                    if (self.cut_after_commit or self.hold_after_commit) and self.ready_seen.is_set():
                        # noted before it goes on: the destination answers the COMMIT with RUNNING
                        # at once, and the other pump must already know by then (set after the
                        # send, a preempted pump let RUNNING through under stress-ng)
                        self.commit_forwarded.set()
                        dst.sendall(data)  # the COMMIT (the source's answer to READY)
                        self.forwarded[direction] += len(data)
                        continue
                    off = self.forwarded["to-dest"]
                    if self.corrupt_at is not None and off <= self.corrupt_at < off + len(data):
                        buf = bytearray(data)
                        buf[self.corrupt_at - off] ^= 0x5A
                        data = bytes(buf)
                        self.corrupted.set()
                if direction == "to-source" and self.commit_forwarded.is_set():
                    if self.cut_after_commit:
                        self.dropped_after_commit += len(data)
                        self.cut()
                        return
                    if self.hold_after_commit:
                        self.release.wait(120)  # a guard against a hung test, not a timing
                # READY is noted before it is passed on: the source answers it with COMMIT at
                # once, and the other pump must already know by then
                if dec is not None and not self.ready_seen.is_set():
                    if any(isinstance(sec.body, Ready) for sec in dec.feed(data)):
                        self.ready_seen.set()
                dst.sendall(data)
                self.forwarded[direction] += len(data)
        except OSError:
            return

    def cut(self) -> None:
        """Reset both connections (SO_LINGER 0: an RST, as a failed link looks)."""
        with self._lock:
            for s in self._socks:
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                except OSError:
                    pass
                try:
                    s.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked in recv on it
                except OSError:
                    pass
                s.close()
            self.cut_done.set()

    def close(self) -> None:
        try:
            self.lst.close()
        except OSError:
            pass
        self.cut()


def torn_blocks(image: bytes, nblocks: int) -> list[int]:
    """The blocks of a disk image that are neither all zero nor one whole block of some
    generation as the blk workload writes them (a torn or garbage block)."""
    from virtio_lm.errors import VirtioLmError
    from virtio_lm.vm.workloads import block_content
    from virtio_lm.wire.guest import BLOCK_SIZE, BlockStamp

    torn = []
    for lba in range(nblocks):
        data = image[lba * BLOCK_SIZE : (lba + 1) * BLOCK_SIZE]
        if data == bytes(BLOCK_SIZE):
            continue
        try:
            gen = BlockStamp.unpack_from(data, 0).generation
        except VirtioLmError:
            torn.append(lba)
            continue
        if data != block_content(lba, gen):
            torn.append(lba)
    return torn
