"""The net figures' tools, without QEMU: tests/qemu/net_figures.py's host-side receiver for
QEMU's -netdev user counts the guest sender's datagrams (ublast's "VLMU" magic first) and nothing
else; the receive direction's host sender (tests/qemu/hostblast.py) sends what the guest's
counter (tests/qemu/usink.c, built here for the host) counts, paced at its rate."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from qemu.net_figures import HostSink

from virtio_lm.wire.inet import UDPSEQ_MAGIC


def _wait_count(sink: HostSink, n: int) -> None:
    deadline = time.monotonic() + 10
    while sink.count < n and time.monotonic() < deadline:
        time.sleep(0.01)


def test_host_sink_counts_ublast_datagrams_only() -> None:
    sink = HostSink()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            good = UDPSEQ_MAGIC.to_bytes(4, "little") + bytes(60)
            for payload in (good, b"XXXX" + bytes(60), good[:15], good, good[:16]):
                s.sendto(payload, ("127.0.0.1", sink.port))
            _wait_count(sink, 3)
            time.sleep(0.1)  # a wrongly counted datagram would have arrived by now (loopback, in order)
            assert sink.count == 3
    finally:
        sink.close()


# ---------------------------------------------------------------- the receive direction
HERE = Path(__file__).resolve().parent / "qemu"


def _blast(*args: str) -> tuple[int, int, float]:
    r = subprocess.run([sys.executable, str(HERE / "hostblast.py"), *args], capture_output=True, text=True, timeout=60)
    m = re.fullmatch(r"HOSTBLAST sent (\d+) errors (\d+) s ([0-9.]+)\n", r.stdout)
    assert r.returncode == 0 and m, (r.returncode, r.stdout, r.stderr)
    return int(m.group(1)), int(m.group(2)), float(m.group(3))


@pytest.mark.slow  # over 0.4 s: out of the one-minute fast subset (CI runs it)
def test_hostblast_sends_what_the_sink_counts_at_about_its_rate() -> None:
    sink = HostSink()
    try:
        sent, errors, dt = _blast("udp", "127.0.0.1", str(sink.port), "64", "2000", "0.5")
        _wait_count(sink, sent)
        assert errors == 0 and sink.count == sent
        assert 0.5 <= dt < 5 and 0.5 * 2000 * 0.5 <= sent <= 2000 * dt + 8  # paced: never above its rate
    finally:
        sink.close()


def test_hostblast_switch_mode_sends_a_udp_frame_to_the_guest_mac() -> None:
    from virtio_lm.net.switch import KIND_FRAME, KIND_HELLO
    from virtio_lm.wire.inet import parse_udp4

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sw:  # stands for the switch
        sw.bind(("127.0.0.1", 0))
        sw.settimeout(10)
        host, port = sw.getsockname()
        sent, _, _ = _blast("switch", f"{host}:{port}", "52:54:00:12:34:56", "52:54:00:00:00:fd", "10.0.0.3",
                            "10.0.0.2", "5002", "100", "1000", "0.05")
        assert sw.recv(65536) == bytes((KIND_HELLO,))
        msg = sw.recv(65536)
        assert msg[0] == KIND_FRAME and msg[1:7] == bytes.fromhex("525400123456") and msg[7:13] == bytes.fromhex("5254000000fd")
        d = parse_udp4(msg[1:])
        assert d is not None and d.dport == 5002 and d.dst_ip == bytes([10, 0, 0, 2]) and len(d.payload) == 100
        assert d.payload[:4] == UDPSEQ_MAGIC.to_bytes(4, "little")
        assert sent >= 1


def test_hostblast_refuses_a_size_out_of_range() -> None:
    r = subprocess.run([sys.executable, str(HERE / "hostblast.py"), "udp", "127.0.0.1", "9", "8", "10", "0.1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "size 16..1472" in r.stderr


@pytest.fixture(scope="module")
def usink(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The guest's usink, built for this host (it is plain Linux C)."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed (the guest tools need it too)")
    exe = tmp_path_factory.mktemp("usink") / "usink"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(HERE / "usink.c")], check=True, capture_output=True)
    return exe


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # 0.3 s or more: out of the one-minute fast subset (CI runs it)
def test_usink_counts_hostblast_datagrams_and_nothing_else(usink: Path, tmp_path: Path) -> None:
    port, out = _free_udp_port(), tmp_path / "s.out"
    p = subprocess.Popen([str(usink), str(port), str(out)])
    try:
        deadline = time.monotonic() + 10
        while not Path(f"{out}.ready").exists():
            assert time.monotonic() < deadline and p.poll() is None, "usink did not start"
            time.sleep(0.01)
        sent, _, _ = _blast("udp", "127.0.0.1", str(port), "200", "2000", "0.3")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # the negative control: not counted as rx
            for payload in (b"XXXX" + bytes(60), b"VLM"):
                s.sendto(payload, ("127.0.0.1", port))
        # loopback queues a datagram on the receiving socket within sendto: usink drains them at SIGTERM
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    m = re.fullmatch(r"USINK rx (\d+) other (\d+) bytes (\d+)\nUSINK end\n", out.read_text())
    assert m, out.read_text()
    assert int(m.group(1)) == sent and int(m.group(3)) == 200 * sent
    assert int(m.group(2)) == 2  # the two controls
