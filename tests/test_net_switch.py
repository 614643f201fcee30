"""The embedded learning L2 switch, its UDP port back-end and the peer (loopback only)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from virtio_lm.net.backends import UdpSwitchPort
from virtio_lm.net.peer import NetPeer, parse_seq, seq_frame
from virtio_lm.net.switch import KIND_BYE, KIND_FRAME, KIND_HELLO, L2Switch, frame_message, read_moves
from virtio_lm.wire.net import BROADCAST_MAC, announce_frame

A = bytes.fromhex("020000000001")
B = bytes.fromhex("020000000002")
C = bytes.fromhex("020000000003")
WAIT = 10.0


class Port:
    """A switch port collecting what it receives."""

    def __init__(self, sw: L2Switch, name: str) -> None:
        self.port = UdpSwitchPort(sw.address, name=name)
        self.frames: list[bytes] = []
        self._lock = threading.Lock()
        self.port.attach(self._got)

    def _got(self, frame: bytes) -> None:
        with self._lock:
            self.frames.append(frame)

    def seqs(self) -> list[int]:
        with self._lock:
            return [p[3] for f in self.frames if (p := parse_seq(f)) is not None]

    def send(self, dst: bytes, src: bytes, seq: int) -> None:
        self.port.send(seq_frame(dst, src, 1, seq))


def wait_until(pred, what="condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + WAIT
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


@pytest.fixture
def sw():  # type: ignore[no-untyped-def]
    s = L2Switch(idle_timeout=60).start()
    yield s
    s.stop()


@pytest.fixture
def ports(sw):  # type: ignore[no-untyped-def]
    ps = [Port(sw, f"p{i}") for i in range(3)]
    wait_until(lambda: len(sw.ports) == 3, "three HELLOs")
    yield ps
    for p in ps:
        p.port.close()


def test_unknown_unicast_flooded_then_learned_forwarded(sw, ports) -> None:  # type: ignore[no-untyped-def]
    pa, pb, pc = ports
    pa.send(B, A, 0)  # B unknown: flooded to b and c
    wait_until(lambda: pb.seqs() == [0] and pc.seqs() == [0], "flood")
    pb.send(A, B, 1)  # A learned at port a: only a gets it
    wait_until(lambda: pa.seqs() == [1], "forward")
    pa.send(B, A, 2)  # B learned now
    wait_until(lambda: pb.seqs() == [0, 2], "forward 2")
    time.sleep(0.05)  # let a wrongly flooded copy arrive, if there were one
    assert pc.seqs() == [0]
    assert sw.stats["forwarded"] == 2 and sw.stats["flooded"] == 1
    assert sw.lookup(A) == pa.port.local_addr and sw.lookup(B) == pb.port.local_addr


def test_broadcast_flooded_to_all_others(sw, ports) -> None:  # type: ignore[no-untyped-def]
    pa, pb, pc = ports
    pa.port.send(announce_frame(A))
    wait_until(lambda: len(pb.frames) == 1 and len(pc.frames) == 1, "broadcast")
    assert pa.frames == []
    assert pb.frames[0][:6] == BROADCAST_MAC


def test_moves_are_logged_with_the_time_and_read_back_per_mac(tmp_path) -> None:
    """``moves_path``: a MAC learned at a new port is a line TIME MAC HOST:PORT, flushed at once;
    the first learning is no move; read_moves gives one MAC's times (a missing file: none)."""
    log = tmp_path / "moves.txt"
    with L2Switch(idle_timeout=60, moves_path=str(log)) as s:
        a = UdpSwitchPort(s.address, name="a")
        c = UdpSwitchPort(s.address, name="c")
        try:
            mac = bytes.fromhex("020000000001")
            a.send(announce_frame(mac))
            wait_until(lambda: s.lookup(mac) == a.local_addr, "learned at a")
            assert read_moves(log, "02:00:00:00:00:01") == []
            t0 = time.time()
            c.send(announce_frame(mac))
            wait_until(lambda: s.lookup(mac) == c.local_addr, "moved to c")
            times = read_moves(log, "02:00:00:00:00:01")  # flushed: readable while the switch runs
            assert len(times) == 1 and t0 - 1 <= times[0] <= time.time()
            assert log.read_text().split()[1:] == ["02:00:00:00:00:01", f"{c.local_addr[0]}:{c.local_addr[1]}"]
            assert read_moves(log, "02:00:00:00:00:02") == []
        finally:
            a.close()
            c.close()
    assert read_moves(tmp_path / "none.txt", "02:00:00:00:00:01") == []
    log.write_text("garbage\nnot-a-time 02:00:00:00:00:01 x:1\n" + log.read_text())
    assert len(read_moves(log, "02:00:00:00:00:01")) == 1


def test_mac_move_is_learned(sw, ports) -> None:  # type: ignore[no-untyped-def]
    pa, pb, pc = ports
    pa.send(B, A, 0)
    wait_until(lambda: sw.lookup(A) == pa.port.local_addr, "learn A at a")
    pc.port.send(announce_frame(A))  # A moved to port c
    wait_until(lambda: sw.lookup(A) == pc.port.local_addr, "move")
    assert sw.stats["moves"] == 1
    pb.send(A, B, 1)
    wait_until(lambda: pc.seqs() == [0, 1], "forward to the new place")
    assert pa.seqs() == []


def test_hairpin_dropped(sw, ports) -> None:  # type: ignore[no-untyped-def]
    pa, _, _ = ports
    pa.send(B, A, 0)
    pa.send(C, B, 1)  # learns B at a
    wait_until(lambda: sw.lookup(B) == pa.port.local_addr, "learn")
    pa.send(B, A, 2)
    wait_until(lambda: sw.stats["dropped_hairpin"] == 1, "hairpin drop")


@pytest.mark.parametrize(
    "data, counter",
    [
        pytest.param(b"", "dropped_empty", id="empty"),
        pytest.param(bytes((KIND_FRAME,)) + bytes(13), "dropped_bad_length", id="runt"),
        pytest.param(bytes((7,)) + bytes(60), "dropped_bad_kind", id="bad-kind"),
    ],
)
def test_malformed_datagrams_counted_and_dropped(sw, data: bytes, counter: str) -> None:  # type: ignore[no-untyped-def]
    sw.handle(data, ("127.0.0.1", 9))
    assert sw.stats[counter] == 1
    assert sw.stats["frames"] == 0 and sw.ports == []


def test_port_and_mac_limits() -> None:
    s = L2Switch(max_ports=2, max_macs=3, idle_timeout=60)  # rules only, not started
    try:
        for i in range(3):
            s.handle(bytes((KIND_HELLO,)), ("127.0.0.1", 1000 + i))
        assert len(s.ports) == 2 and s.stats["dropped_port_limit"] == 1
        for i in range(5):
            s.handle(frame_message(seq_frame(BROADCAST_MAC, bytes((2, 0, 0, 0, 0, i)), 1, i)), ("127.0.0.1", 1000))
        assert s.lookup(bytes((2, 0, 0, 0, 0, 0))) is None  # evicted
        assert s.lookup(bytes((2, 0, 0, 0, 0, 4))) == ("127.0.0.1", 1000)
        assert s.stats["evicted"] == 2
        s.handle(bytes((KIND_BYE,)), ("127.0.0.1", 1000))
        assert s.lookup(bytes((2, 0, 0, 0, 0, 4))) is None and len(s.ports) == 1
    finally:
        s.stop()


def test_switch_stops_by_itself_when_idle() -> None:
    s = L2Switch(idle_timeout=0.2).start()
    assert s._thread is not None
    s._thread.join(WAIT)
    assert not s.running and s.stopped_because == "idle"
    s.stop()


@pytest.mark.slow  # over 0.4 s: out of the one-minute fast subset (CI runs it)
def test_switch_as_a_process_stops_by_itself() -> None:
    env = dict(os.environ)
    proc = subprocess.Popen(
        [sys.executable, "-m", "virtio_lm.net.switch", "--idle-timeout", "1.0"],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:")
        port = int(line.rsplit(":", 1)[1])
        with NetPeer(("127.0.0.1", port), A) as pa, NetPeer(("127.0.0.1", port), B) as pb:
            pa.send_seq(B, 3)
            assert pb.wait_count(A, 3, WAIT)
        out, _ = proc.communicate(timeout=WAIT)
        assert "stopped (idle)" in out and proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_peer_echo_and_announce_recorded(sw) -> None:  # type: ignore[no-untyped-def]
    with NetPeer(sw.address, A, echo=True) as echo, NetPeer(sw.address, B) as p:
        p.send_seq(A, 5)
        assert echo.wait_count(B, 5, WAIT) and p.wait_count(A, 5, WAIT)
        assert p.seqs_from(A) == [0, 1, 2, 3, 4]
        echo.send_raw(announce_frame(A))
        assert p.wait_announce(A, WAIT)


def test_flow_control_credits_and_abort(sw) -> None:  # type: ignore[no-untyped-def]
    port = UdpSwitchPort(sw.address)
    try:
        abort = threading.Event()
        port.pause_tx()
        assert port.tx_paused
        port.grant_tx(2)
        assert port.wait_tx_ready(abort) and port.wait_tx_ready(abort)
        result: list[bool] = []
        t = threading.Thread(target=lambda: result.append(port.wait_tx_ready(abort)))
        t.start()
        time.sleep(0.02)
        assert t.is_alive()  # no credit left: it waits
        abort.set()
        port.wake_tx()
        t.join(WAIT)
        assert result == [False]
        abort.clear()
        port.resume_tx()
        assert port.wait_tx_ready(abort)
    finally:
        port.close()
