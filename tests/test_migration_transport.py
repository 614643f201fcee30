"""The socket / file layer over real loopback TCP with the in-memory fake VMs; analyze-stream.

Waits here are guards against hangs only (WAIT), never assertions about speed.
"""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from virtio_lm.errors import (
    ConfigMismatchError,
    MigrationCancelledError,
    PeerGoneError,
    StreamError,
)
from virtio_lm.migration.analyze import analyze_bytes, analyze_file, format_summary
from fakes import MemoryVm, MemoryVmShell
from virtio_lm.migration.policy import MigrationParams
from virtio_lm.migration.session import DestSession, MigrationEvent, PassEvent, SourceSession
from virtio_lm.wire.stream import Ack, StreamEncoder
from virtio_lm.migration.transport import (
    DestRunner,
    SourceRunner,
    listen,
    raw_loopback_throughput,
    start_incoming,
    start_outgoing,
)

MiB = 1 << 20
MEM = 8 * MiB
WAIT = 30.0


class Ticking:
    """A VM that runs its workload on a thread of its own while the migration goes on."""

    def __init__(self, vm: MemoryVm) -> None:
        self.vm = vm
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.th = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                self.vm.run(0.002)
            time.sleep(0.002)

    def __enter__(self) -> "Ticking":
        self.th.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.th.join()


class LockedVm(MemoryVm):
    """MemoryVm whose endpoint calls take the workload's lock (the fake's memory is not thread safe)."""

    ticking: Ticking | None = None

    def __getattribute__(self, name):
        attr = object.__getattribute__(self, name)
        t = object.__getattribute__(self, "__dict__").get("_tick")
        if t is not None and callable(attr) and name in _ENDPOINT_METHODS:
            def locked(*a, **k):
                with t.lock:
                    return attr(*a, **k)
            return locked
        return attr


_ENDPOINT_METHODS = {
    "config", "start_tracking", "collect_dirty", "zero_mask", "read_pages", "set_throttle", "pause_vcpus",
    "quiesce_vfs", "freeze_and_save_vfs", "stop_tracking", "cpu_state", "rollback", "release",
}


def pair(vm: MemoryVm, shell: MemoryVmShell, params: MigrationParams | None = None, *, timeout: float = 10.0):
    dst = DestSession(shell, clock=time.monotonic)
    dr = start_incoming(dst, "tcp:127.0.0.1:0", timeout=timeout)
    src = SourceSession(vm, params, clock=time.monotonic)
    sr = start_outgoing(src, "tcp:127.0.0.1:%d" % dr.address[1], timeout=timeout)
    return src, dst, sr, dr


def finish(sr, dr) -> None:
    assert sr.join(WAIT) and dr.join(WAIT), "runner hung"
    assert sr.crash is None and dr.crash is None


def test_migration_over_loopback_tcp_with_a_running_vm():
    vm = LockedVm(MEM, fill="half", dirty_rate=20000, device_rate=500, seed=1)
    tick = Ticking(vm)
    vm._tick = tick
    shell = MemoryVmShell(MEM)
    with tick:
        src, dst, sr, dr = pair(vm, shell, MigrationParams(downtime_limit_ms=50))
        finish(sr, dr)
    assert src.status == "completed", src.error
    assert dst.status == "completed", dst.error
    assert np.array_equal(vm.mem, shell.mem) and vm.sweep_consistent(shell.mem)
    assert shell.running and vm.paused and vm.released
    statuses = [e.status for e in sr.events if isinstance(e, MigrationEvent)]
    assert statuses[0] == "setup" and statuses[-1] == "completed"
    assert any(isinstance(e, PassEvent) for e in sr.events)
    info = sr.info()
    assert info["ram"]["transferred"] > MEM // 2 and "downtime" in info


@pytest.mark.slow  # over 0.4 s: out of the one-minute fast subset (CI runs it)
def test_max_bandwidth_over_tcp():
    rate = 20 * MiB
    vm = MemoryVm(MEM, fill="random", seed=2)
    shell = MemoryVmShell(MEM)
    t0 = time.monotonic()
    src, dst, sr, dr = pair(vm, shell, MigrationParams(max_bandwidth=rate))
    finish(sr, dr)
    elapsed = time.monotonic() - t0
    assert src.status == "completed" and np.array_equal(vm.mem, shell.mem)
    # the bucket allowed at most rate * elapsed + one burst + one section: a bound, not a timing
    assert src.sent <= rate * elapsed + src.bucket.burst + 2 * MiB


def test_destination_refuses_config_over_tcp_and_retry_succeeds():
    vm = MemoryVm(MEM, fill="half")
    src, dst, sr, dr = pair(vm, MemoryVmShell(2 * MEM))
    finish(sr, dr)
    assert src.status == "failed" and isinstance(src.error, ConfigMismatchError)
    assert vm.resumed_cleanly
    shell = MemoryVmShell(MEM)
    src, dst, sr, dr = pair(vm, shell)
    finish(sr, dr)
    assert src.status == "completed" and np.array_equal(vm.mem, shell.mem)


def test_cancel_over_tcp_rolls_back():
    vm = MemoryVm(MEM, fill="random", seed=3)
    shell = MemoryVmShell(MEM)
    started = threading.Event()

    def on_event(e):
        if isinstance(e, MigrationEvent) and e.status == "active":
            started.set()

    dst = DestSession(shell, clock=time.monotonic)
    dr = start_incoming(dst, "tcp:127.0.0.1:0", timeout=10)
    src = SourceSession(vm, MigrationParams(max_bandwidth=2 * MiB), clock=time.monotonic)
    sr = start_outgoing(src, "tcp:127.0.0.1:%d" % dr.address[1], on_event=on_event)
    assert started.wait(WAIT)
    sr.cancel()
    finish(sr, dr)
    assert src.status == "cancelled" and isinstance(src.error, MigrationCancelledError)
    assert vm.resumed_cleanly and not shell.running
    assert dst.status == "failed" and isinstance(dst.error, MigrationCancelledError)


def test_destination_vanishing_mid_stream_rolls_back():
    vm = MemoryVm(MEM, fill="random", seed=4)
    lst = listen()
    got = threading.Event()

    def fake_destination():
        conn, _ = lst.accept()
        conn.sendall(StreamEncoder().encode(Ack(0, 0)))  # accept HELLO, then take pages until the reset
        data = b""
        while len(data) < 200_000:
            chunk = conn.recv(65536)
            if not chunk:  # the source gave up first: the test's asserts say how
                break
            data += chunk
        # reset the connection (RST), as a killed process would
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()
        got.set()

    th = threading.Thread(target=fake_destination, daemon=True)
    th.start()
    src = SourceSession(vm, MigrationParams(max_bandwidth=4 * MiB), clock=time.monotonic)
    sr = SourceRunner(src, socket.create_connection(lst.getsockname()), timeout=5).start()
    assert sr.join(WAIT) and sr.crash is None
    th.join(WAIT)  # the fake destination sets `got` after its reset: the source may see it first
    assert got.is_set()
    assert src.status == "failed" and isinstance(src.error, PeerGoneError)
    assert isinstance(src.error.__cause__, OSError) or "closed" in str(src.error)
    assert vm.resumed_cleanly
    lst.close()


@pytest.mark.slow  # 0.3 s or more: out of the one-minute fast subset (CI runs it)
def test_silent_destination_times_out_to_peer_gone():
    vm = MemoryVm(MEM)
    lst = listen()
    conns = []
    th = threading.Thread(target=lambda: conns.append(lst.accept()[0]), daemon=True)
    th.start()
    src = SourceSession(vm, clock=time.monotonic)
    sr = SourceRunner(src, socket.create_connection(lst.getsockname()), timeout=0.3).start()
    assert sr.join(WAIT)
    assert src.status == "failed" and isinstance(src.error, PeerGoneError)
    assert "config-ack" in str(src.error) and vm.resumed_cleanly
    lst.close()
    for c in conns:
        c.close()


def test_source_vanishing_makes_destination_abort():
    shell = MemoryVmShell(MEM)
    dst = DestSession(shell, clock=time.monotonic)
    dr = start_incoming(dst, "tcp:127.0.0.1:0", timeout=5)
    vm = MemoryVm(MEM, fill="random")
    src = SourceSession(vm, clock=time.monotonic)
    src.start()
    sock = socket.create_connection(dr.address)
    sock.sendall(b"".join(bytes(c) for c in src.produce(300_000)))
    time.sleep(0.05)
    sock.close()
    assert dr.join(WAIT) and dr.crash is None
    assert dst.status == "failed" and isinstance(dst.error, PeerGoneError)
    assert shell.aborted and not shell.running


def test_link_drop_after_commit_over_tcp_source_stays_postmigrate():
    vm = MemoryVm(MEM, fill="half")
    shell = MemoryVmShell(MEM)

    dst = DestSession(shell, clock=time.monotonic)
    lst = listen()
    src = SourceSession(vm, clock=time.monotonic)

    def destination():
        conn, _ = lst.accept()
        with conn:
            while not dst.finished:
                data = conn.recv(1 << 20)
                if not data:
                    break
                dst.receive(data)
                out = dst.produce()
                if dst.phase.value == "wait-commit":
                    conn.sendall(b"".join(out))  # READY goes out ...
                    conn.recv(1 << 16)  # ... COMMIT comes in, and the link dies before RUNNING
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    return
                conn.sendall(b"".join(out))

    th = threading.Thread(target=destination, daemon=True)
    th.start()
    sr = SourceRunner(src, socket.create_connection(lst.getsockname()), timeout=5).start()
    assert sr.join(WAIT)
    assert src.phase.value == "unresolved" and src.status == "commit-unknown" and src.vm_state == "postmigrate"
    assert vm.paused and vm.rollbacks == 0 and "release" not in vm.calls
    # the operator's word (no lease): the destination runs -- the source hands over
    assert sr.resolve("destination") == "destination"
    assert src.status == "completed" and vm.released and vm.rollbacks == 0
    assert any(getattr(e, "status", None) == "completed" for e in sr.events)
    lst.close()


def test_source_gone_after_ready_leaves_the_destination_runner_in_doubt():
    """The source's connection ends after READY without COMMIT: the destination's runner ends
    with the session in doubt (restored, paused, not aborted) until it is resolved."""
    vm = MemoryVm(MEM, fill="half")
    shell = MemoryVmShell(MEM)
    src = SourceSession(vm, clock=time.monotonic)
    lst = listen()
    dr = DestRunner(DestSession(shell, clock=time.monotonic), listener=lst, timeout=5).start()
    sock = socket.create_connection(lst.getsockname())
    src.start()
    while src.phase.value not in ("wait-ready", "committed"):  # (COMMIT, if queued, never leaves)
        for c in src.produce(1 << 20):
            sock.sendall(c)
            src.on_sent(len(c))
        sock.settimeout(0.05)
        try:
            src.receive(sock.recv(1 << 16))
        except socket.timeout:
            pass
    sock.close()  # READY may be on its way: the source is gone before it could COMMIT
    assert dr.join(WAIT)
    assert dr.info()["status"] == "commit-unknown" and not shell.running and not shell.aborted
    assert dr.resolve("source") == "source"
    assert dr.info()["status"] == "failed" and shell.aborted and not shell.running


def test_file_stream_round_trip_and_analyze(tmp_path):
    path = tmp_path / "vm.stream"
    vm = MemoryVm(MEM, fill="half", dirty_rate=3000, seed=5)
    src = SourceSession(vm, clock=time.monotonic, to_file=True)
    sr = start_outgoing(src, f"file:{path}")
    assert sr.join(WAIT) and sr.crash is None
    assert src.status == "completed" and src.vm_state == "postmigrate"

    shell = MemoryVmShell(MEM)
    dst = DestSession(shell, clock=time.monotonic, from_file=True)
    dr = start_incoming(dst, f"file:{path}")
    assert dr.join(WAIT) and dr.crash is None
    assert dst.status == "completed" and shell.running
    assert np.array_equal(vm.mem, shell.mem)

    s = analyze_file(path)
    assert s["valid"] and s["complete"] and s["bytes"] == path.stat().st_size
    assert s["config"]["memory-size"] == MEM and len(s["config"]["vfs"]) == 2
    assert s["pages"]["normal"] == src.normal_pages and s["pages"]["zero"] == src.zero_pages
    assert [r["round"] for r in s["rounds"]] == list(range(len(src.rounds)))
    assert all(r["consistent"] for r in s["rounds"]) and s["rounds"][-1]["final"]
    assert [d["vf-index"] for d in s["devices"]] == [1, 2]
    assert s["devices"][0]["records"] == [{"type": "CONFIG", "length": 8}]
    assert s["cpu-state-bytes"] == 16
    text = format_summary(s)
    assert "valid, complete" in text and "VF 1 state image" in text and "final, VM stopped" in text
    assert '"valid": true' in format_summary(s, as_json=True)


def test_analyze_reports_a_corrupt_and_a_truncated_stream(tmp_path):
    path = tmp_path / "vm.stream"
    src = SourceSession(MemoryVm(MEM, fill="half"), clock=time.monotonic, to_file=True)
    assert start_outgoing(src, f"file:{path}").join(WAIT)
    data = path.read_bytes()
    bad = bytearray(data)
    bad[len(data) // 2] ^= 0x10
    s = analyze_bytes(bytes(bad))
    assert not s["valid"] and s["error"]["type"] == "StreamChecksumError" and s["error"]["offset"] is not None
    s = analyze_bytes(data[: len(data) - 10])
    assert not s["valid"] and not s["complete"] and s["error"]["type"] == "StreamTruncatedError"
    assert "INVALID" in format_summary(s)


def test_file_restore_of_a_truncated_file_fails_cleanly(tmp_path):
    path = tmp_path / "vm.stream"
    src = SourceSession(MemoryVm(MEM, fill="half"), clock=time.monotonic, to_file=True)
    assert start_outgoing(src, f"file:{path}").join(WAIT)
    path.write_bytes(path.read_bytes()[:-100])
    shell = MemoryVmShell(MEM)
    dst = DestSession(shell, clock=time.monotonic, from_file=True)
    dr = start_incoming(dst, f"file:{path}")
    assert dr.join(WAIT)
    assert dst.status == "failed" and isinstance(dst.error, StreamError) and not shell.running


def test_incoming_cancel_while_waiting_for_a_connection():
    dst = DestSession(MemoryVmShell(MEM), clock=time.monotonic)
    dr = start_incoming(dst, "tcp:127.0.0.1:0")
    dr.cancel()
    assert dr.join(WAIT) and dst.status == "cancelled"


def test_runner_refuses_mismatched_modes(tmp_path):
    vm = MemoryVm(MEM)
    with open(tmp_path / "f", "wb") as f:
        with pytest.raises(ValueError):
            SourceRunner(SourceSession(vm, clock=time.monotonic), f)
    with pytest.raises(ValueError):
        DestRunner(DestSession(MemoryVmShell(MEM), clock=time.monotonic, from_file=True), listener=listen())




def test_raw_loopback_throughput_moves_every_byte():
    r = raw_loopback_throughput(3 * MiB + 5)
    assert r["bytes"] == 3 * MiB + 5 and r["seconds"] > 0 and r["bytes-per-second"] > 0
