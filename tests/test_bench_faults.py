"""``virtio-lm bench faults``: the fault proxy on a plain TCP pair (fast), the verdict of a
trial (fast, with the wrong outcomes it must flag), and a small campaign against real host
processes (slow)."""

from __future__ import annotations

import json
from dataclasses import asdict
import socket
import threading
import time

import pytest

from virtio_lm.bench_faults import KINDS, Campaign, FaultProxy, Trial, one_trial, run

WAIT = 30.0


class Sink:
    """A TCP listener that keeps everything one connection sends."""

    def __init__(self) -> None:
        self.lst = socket.create_server(("127.0.0.1", 0))
        self.address = self.lst.getsockname()[:2]
        self.got = bytearray()
        self.closed = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        conn, _ = self.lst.accept()
        try:
            while data := conn.recv(65536):
                self.got += data
        except OSError:
            pass
        finally:
            conn.close()
            self.closed.set()


def send_through(proxy: FaultProxy, data: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", int(proxy.uri.rsplit(":", 1)[1])))
    try:
        s.sendall(data)
    except OSError:
        pass
    return s


def wait_len(sink: Sink, n: int) -> None:
    deadline = time.monotonic() + WAIT
    while len(sink.got) < n:
        assert time.monotonic() < deadline, (len(sink.got), n)
        time.sleep(0.005)


DATA = bytes(range(256)) * 512  # 128 KiB


def test_flip_changes_exactly_the_byte_at_the_offset() -> None:
    sink = Sink()
    px = FaultProxy(sink.address, kind="flip", at=70_000)
    s = send_through(px, DATA)
    s.shutdown(socket.SHUT_WR)
    assert sink.closed.wait(WAIT)
    assert px.reached.is_set() and len(sink.got) == len(DATA)
    diff = [i for i in range(len(DATA)) if sink.got[i] != DATA[i]]
    assert diff == [70_000] and sink.got[70_000] == DATA[70_000] ^ 0x5A
    s.close()
    px.close()


def test_negative_control_an_offset_beyond_the_stream_changes_nothing() -> None:
    sink = Sink()
    px = FaultProxy(sink.address, kind="flip", at=len(DATA) + 5)
    s = send_through(px, DATA)
    s.shutdown(socket.SHUT_WR)
    assert sink.closed.wait(WAIT)
    assert not px.reached.is_set() and bytes(sink.got) == DATA
    s.close()
    px.close()


def test_cut_passes_exactly_the_bytes_before_the_offset() -> None:
    sink = Sink()
    px = FaultProxy(sink.address, kind="cut", at=50_000)
    s = send_through(px, DATA)
    assert sink.closed.wait(WAIT)
    assert px.reached.is_set() and bytes(sink.got) == DATA[:50_000]
    s.close()
    px.close()


@pytest.mark.parametrize("kind", ["sigkill", "cancel"])
def test_hold_stops_at_the_offset_until_released(kind: str) -> None:
    sink = Sink()
    px = FaultProxy(sink.address, kind=kind, at=40_000)
    s = send_through(px, DATA)
    assert px.reached.wait(WAIT)
    wait_len(sink, 40_000)
    assert bytes(sink.got) == DATA[:40_000]  # held: nothing past the offset while the campaign acts
    px.release.set()
    s.shutdown(socket.SHUT_WR)
    assert sink.closed.wait(WAIT)
    assert bytes(sink.got) == DATA
    s.close()
    px.close()


def test_proxy_needs_exactly_one_fault_point() -> None:
    with pytest.raises(ValueError):
        FaultProxy(("127.0.0.1", 9), kind="cut")
    with pytest.raises(ValueError):
        FaultProxy(("127.0.0.1", 9), kind="cut", at=1, window="drop-commit")


# ----------------------------------------------------------------- the verdict of one trial
SRC_RUNS = dict(src="running", source_intact=True, dest="untouched", lease="src", running=1, retry=True)
DST_RUNS = dict(committed=True, src="postmigrate", dest="committed", lease="dst", running=1)


@pytest.mark.parametrize("fields", [
    SRC_RUNS, dict(SRC_RUNS, dest="gone"), DST_RUNS,
    dict(SRC_RUNS, committed=True, resolved="source"),  # COMMIT lost, the source reclaimed the lease
    dict(DST_RUNS, resolved="source+destination", src="gone"),  # source killed after COMMIT: dest runs
    # none runs, rightly: the source died before the destination had the VM whole ...
    dict(src="gone", dest="untouched", lease="src", running=0),
    # ... or the destination died after it had started (it took the lease)
    dict(committed=True, src="postmigrate", dest="gone", lease="dst", running=0),
])
def test_correct_outcomes(fields: dict) -> None:
    assert Trial("cut", "offset 1", **fields).correct


@pytest.mark.parametrize("fields", [
    dict(SRC_RUNS, source_intact=False),  # the source did not come back whole
    dict(SRC_RUNS, dest="committed", running=2),  # both run
    dict(SRC_RUNS, retry=False),
    dict(SRC_RUNS, lease="dst"),  # the source resumed although the destination holds the lease
    dict(SRC_RUNS, dest="WRONG: running, VFs ['RUNNING']"),
    dict(DST_RUNS, lease="src"),  # the destination runs without the lease
    dict(DST_RUNS, dest="untouched", running=0),  # the COMMIT was lost and nobody runs
    dict(DST_RUNS, dest="gone", lease="src", running=0),  # the destination died before it started: the source must run
    dict(src="gone", dest="untouched", dest_prepared=True, lease="src", running=0),  # prepared destination left idle
    dict(DST_RUNS, running=2),
    dict(DST_RUNS, dest="WRONG: runs but fails its verification"),
    dict(SRC_RUNS, error="TimeoutError: the migration did not end"),
])
def test_wrong_outcomes_are_flagged(fields: dict) -> None:
    assert not Trial("cut", "offset 1", **fields).correct


def test_sigkill_src_drops_what_it_held() -> None:
    sink = Sink()
    px = FaultProxy(sink.address, kind="sigkill-src", at=40_000)
    s = send_through(px, DATA)
    assert px.reached.wait(WAIT)
    wait_len(sink, 40_000)
    px.release.set()  # the source is dead: nothing past the offset ever arrives
    assert sink.closed.wait(WAIT)
    assert bytes(sink.got) == DATA[:40_000]
    s.close()
    px.close()


# ----------------------------------------------------------------- a small campaign
@pytest.mark.slow
def test_small_campaign_every_kind_correct(tmp_path, capsys) -> None:
    rc = run(Campaign(trials=len(KINDS), seed=3), tmp_path)
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "faults.json").read_text())
    assert [r["kind"] for r in report["results"]] == list(KINDS)
    assert report["reference-bytes"] > 0
    assert rc == 0, out
    assert all(r["correct"] for r in report["results"]), out
    for kind in KINDS:
        assert kind in out


class _Window:
    """A random source that always picks the commit window, and in it the given variant."""

    def __init__(self, window: str) -> None:
        self.window = window

    def random(self) -> float:
        return 0.0

    def choice(self, options):
        assert self.window in options
        return self.window


@pytest.mark.slow
@pytest.mark.parametrize("kind,window", [
    ("flip", "flip-commit"), ("sigkill", "before-commit"), ("sigkill-src", "before-commit"),
])  # (the COMMIT dropped: tests/test_e2e_faults.py, step by step)
def test_commit_window_fault_ends_with_exactly_one_running(kind: str, window: str) -> None:
    """The faults that leave the outcome unknown (the COMMIT dropped or corrupted, the destination
    killed holding READY, the source killed with its COMMIT unsent): after resolving, exactly
    one runs, it holds the lease, and it verifies (a source that runs: its retry too)."""
    t = one_trial(Campaign(trials=1, seed=5), kind, _Window(window), seed=7)
    assert t.reached and t.committed and t.resolved, asdict(t)
    assert t.correct and t.running == 1, asdict(t)
