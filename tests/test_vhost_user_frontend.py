"""The vhost-user front-end (drivers/vhost_user_frontend.py) and the guest-free blk bench
(benches/vhost_blk.py): against real back-end processes, and against back-ends that misbehave.

The data check of the bench must fail when the data is wrong: two negative controls."""

from __future__ import annotations

import random
import shutil
import socket
import threading
from pathlib import Path

import pytest

from virtio_lm.benches import vhost_blk as vb
from virtio_lm.drivers.vhost_user_frontend import VhostUserFrontend
from virtio_lm.errors import BlkDataError, BlkIOError, CommandTimeoutError, DriverError
from virtio_lm.memory import Memory
from virtio_lm.virtqueue.driver import Allocator, DriverQueue
from virtio_lm.wire.blk import BlkReqType
from virtio_lm.wire.features import Feature
from virtio_lm.wire.vhost_user import Header, Request

MIB = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.raw"
    p.write_bytes(random.Random(3).randbytes(vb.IMAGE_MIB * MIB))
    return p


@pytest.fixture
def ours(tmp_path: Path, image: Path):
    be = vb.BackendProcess(vb.BackendSpec("ours", "ours"), str(tmp_path / "ours.sock"), str(image),
                           str(tmp_path / "ours.log"))
    yield be
    be.stop()


@pytest.mark.slow  # over 0.4 s: out of the one-minute fast subset (CI runs it)
def test_blk_frontend_against_our_backend_process(ours, image) -> None:
    bf = vb.BlkFrontend(ours_sock(ours))
    try:
        assert bf.fe.features & (1 << Feature.VERSION_1)
        assert bf.capacity == vb.IMAGE_MIB * MIB // 512  # read through GET_CONFIG
        vb.check_data(bf, str(image), random.Random(1))
        offs = [random.Random(2).randrange(1000) * 4096 for _ in range(64)]
        assert bf.run(BlkReqType.IN, offs, 4096, 8, None) > 0
        assert bf.dq.in_flight() == 0 and len(bf.free) == vb.MAX_QD
        assert bf.fe.stop_ring(0) == bf.dq.avail_idx  # the back-end took every request
    finally:
        bf.close()


def ours_sock(be: vb.BackendProcess) -> str:
    return be.proc.args[be.proc.args.index("--socket") + 1]


@pytest.mark.slow  # over 0.4 s: out of the one-minute fast subset (CI runs it)
def test_a_request_the_backend_fails_is_a_blk_io_error(ours) -> None:
    """A read past the capacity: the back-end says IOERR, the front-end names type and sector."""
    import time

    bf = vb.BlkFrontend(ours_sock(ours))
    try:
        bf.submit(BlkReqType.IN, bf.capacity, 4096)
        bf.flush()
        with pytest.raises(BlkIOError, match=f"IN at sector {bf.capacity} completed with status IOERR"):
            bf.reap(time.monotonic() + 30)
        assert len(bf.free) == vb.MAX_QD  # the slot came back all the same
    finally:
        bf.close()


@pytest.mark.slow  # over 0.4 s: out of the one-minute fast subset (CI runs it)
def test_data_check_fails_when_the_image_is_not_the_one_written(ours, image, tmp_path) -> None:
    """Negative control: the image file the check reads is another copy, not what the back-end writes."""
    other = tmp_path / "other.raw"
    shutil.copyfile(image, other)
    bf = vb.BlkFrontend(ours_sock(ours))
    try:
        with pytest.raises(BlkDataError, match="image bytes"):
            vb.check_data(bf, str(other), random.Random(1))
    finally:
        bf.close()


@pytest.mark.slow  # over 0.4 s: out of the one-minute fast subset (CI runs it)
def test_data_check_fails_when_the_data_read_back_differs(ours, image, monkeypatch) -> None:
    """Negative control: one byte of what the back-end returns is flipped on the way."""
    bf = vb.BlkFrontend(ours_sock(ours))
    real = bf.data

    def flipped(slot: int, n: int) -> bytes:
        b = bytearray(real(slot, n))
        b[n // 2] ^= 1
        return bytes(b)

    monkeypatch.setattr(bf, "data", flipped)
    try:
        with pytest.raises(BlkDataError, match="read back"):
            vb.check_data(bf, str(image), random.Random(1))
    finally:
        bf.close()


@pytest.mark.qemu
def test_blk_frontend_against_qemu_storage_daemon(tmp_path, image) -> None:
    if shutil.which("qemu-storage-daemon") is None:
        pytest.skip("qemu-storage-daemon is not installed")
    be = vb.BackendProcess(vb.BackendSpec("qsd", "qsd"), str(tmp_path / "qsd.sock"), str(image), str(tmp_path / "qsd.log"))
    try:
        bf = vb.BlkFrontend(str(tmp_path / "qsd.sock"))
        try:
            vb.check_data(bf, str(image), random.Random(1))
            assert bf.capacity == vb.IMAGE_MIB * MIB // 512
        finally:
            bf.close()
    finally:
        be.stop()


# ---------------------------------------------------------------------------- misbehaving back-ends
class FakeBackend:
    """A UNIX socket server that answers the first message with ``answer(header bytes)``."""

    def __init__(self, path: str, answer) -> None:  # type: ignore[no-untyped-def]
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(1)
        self.answer = answer
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.srv.accept()
        self.conns.append(conn)
        hdr = conn.recv(12)
        out = self.answer(hdr)
        if out is None:
            conn.close()
        elif out:
            conn.sendall(out)

    def close(self) -> None:
        self.thread.join(10)
        for c in self.conns:
            c.close()
        self.srv.close()


@pytest.fixture
def memfd():
    m = Memory(MIB, name="fe-test", backing="memfd")
    yield m
    m.close()


_NO_VERSION_1 = Header(int(Request.GET_FEATURES), 5, 8).encode() + bytes(8)  # features 0
_OTHER_REPLY = Header(int(Request.GET_PROTOCOL_FEATURES), 5, 8).encode() + bytes(8)


@pytest.mark.parametrize(
    "answer,timeout,error,match",
    [
        (lambda hdr: None, 10, DriverError, "closed the connection"),  # closes the socket
        (lambda hdr: b"", 0.5, CommandTimeoutError, "no reply"),  # says nothing
        (lambda hdr: _OTHER_REPLY, 10, DriverError, "unexpected reply"),  # answers another request
        (lambda hdr: _NO_VERSION_1, 10, DriverError, "VERSION_1"),  # offers no VERSION_1
    ],
    ids=["closes-connection", "never-answers", "reply-to-another-request", "no-version-1"],
)
@pytest.mark.slow  # over 0.4 s: out of the one-minute fast subset (CI runs it)
def test_misbehaving_backend_at_get_features(tmp_path, memfd, answer, timeout, error, match) -> None:
    fake = FakeBackend(str(tmp_path / "s"), answer)
    try:
        with VhostUserFrontend(str(tmp_path / "s"), memfd, timeout=timeout) as fe, pytest.raises(error, match=match):
            fe.negotiate(1 << Feature.VERSION_1)
    finally:
        fake.close()


@pytest.mark.slow  # 0.3 s or more: out of the one-minute fast subset (CI runs it)
def test_nobody_listening_times_out(tmp_path, memfd) -> None:
    with pytest.raises(CommandTimeoutError, match="not listening"):
        VhostUserFrontend(str(tmp_path / "nobody"), memfd, timeout=0.3)


def test_memory_the_backend_cannot_map_is_refused(tmp_path) -> None:
    m = Memory(MIB, name="anon")
    try:
        with pytest.raises(DriverError, match="memfd"):
            VhostUserFrontend(str(tmp_path / "s"), m, timeout=0.3)
    finally:
        m.close()


@pytest.mark.slow  # over 0.4 s: out of the one-minute fast subset (CI runs it)
def test_refused_ring_is_a_driver_error_and_the_backend_keeps_serving(ours, memfd) -> None:
    """A ring larger than the back-end's maximum: the REPLY_ACK says no, at that message."""
    with VhostUserFrontend(ours_sock(ours), memfd, timeout=30) as fe:
        fe.negotiate((1 << Feature.VERSION_1) | (1 << Feature.EVENT_IDX))
        dq = DriverQueue.allocate(memfd.cpu, Allocator(0x1000, 2 * 4096 * 16), 4096)
        with pytest.raises(DriverError, match="SET_VRING_NUM.*refused|closed the connection"):
            fe.start_ring(0, dq)
    assert ours.proc.poll() is None  # the back-end process is still up
    bf = vb.BlkFrontend(ours_sock(ours))  # and serves the next front-end
    bf.close()


@pytest.mark.slow  # over 0.4 s: out of the one-minute fast subset (CI runs it)
def test_call_that_never_comes_times_out(ours, memfd) -> None:
    import time

    with VhostUserFrontend(ours_sock(ours), memfd, timeout=30) as fe:
        fe.negotiate(1 << Feature.VERSION_1)
        dq = DriverQueue.allocate(memfd.cpu, Allocator(0x1000, 64 * 1024), 16)
        fe.start_ring(0, dq)
        with pytest.raises(CommandTimeoutError, match="no call"):
            fe.wait_call(0, time.monotonic() + 0.2)  # nothing was submitted


@pytest.mark.slow  # over 0.4 s: out of the one-minute fast subset (CI runs it)
def test_bench_main_prints_every_metric_for_ours(capsys, monkeypatch) -> None:
    monkeypatch.setattr(vb, "RAND_COUNT", {1: 20, 16: 40})
    monkeypatch.setattr(vb, "SEQ_COUNT", 4)
    assert vb.main(["--samples", "1", "--no-qsd", "--variant", "inline0=--inline-max 0"]) == 0
    out = capsys.readouterr().out
    for m in vb.METRICS:
        assert len([ln for ln in out.splitlines() if ln.strip().startswith(m)]) == 3, out  # rate, two CPU rows
    assert "inline0/ours" in out


def test_variant_labels_must_be_new() -> None:
    import argparse

    for bad in ("ours=--x", "qsd=", "noequals", "=--x"):
        with pytest.raises(argparse.ArgumentTypeError):
            vb.parse_variant(bad)
    assert vb.parse_variant("a=--inline-max 0").args == ("--inline-max", "0")



# ---------------------------------------------------------------------------- call counts
def test_counter_counts_python_and_c_calls() -> None:
    import sys as _sys

    from virtio_lm.benches.callcount import Counter

    def f() -> int:
        return len("abc")

    c = Counter()
    _sys.setprofile(c.hook)
    try:
        for _ in range(50):
            f()
    finally:
        _sys.setprofile(None)
    assert 50 <= c.py <= 55 and 50 <= c.c <= 60  # f, len (and setprofile itself)


@pytest.mark.slow  # over 0.4 s: out of the one-minute fast subset (CI runs it)
def test_bench_counts_calls_per_request_of_a_counted_backend(capsys, monkeypatch) -> None:
    monkeypatch.setattr(vb, "RAND_COUNT", {1: 20, 16: 40})
    monkeypatch.setattr(vb, "SEQ_COUNT", 4)
    assert vb.main(["--samples", "1", "--no-qsd", "--calls"]) == 0
    out = capsys.readouterr().out
    assert "back-end Python calls per request:" in out and "back-end C calls per request:" in out
    rows = [ln.split() for ln in out.split("back-end Python calls per request:")[1].splitlines()[1:7]]
    assert [r[0] for r in rows] == list(vb.METRICS)
    for r in rows:  # the hook ran in the back-end's threads: a request's share of its batch's calls
        assert 0 < float(r[1]) < 5000, r


def test_a_counted_backend_that_dies_is_a_driver_error(tmp_path) -> None:
    be = vb.BackendProcess(vb.BackendSpec("ours", "ours"), str(tmp_path / "s"), str(tmp_path / "no-such-image"),
                           str(tmp_path / "log"), counted=str(tmp_path / "calls"))
    try:
        be.proc.wait(60)  # click refuses the missing image and the process exits
        be.calls(timeout=30)  # its first count (written before the command ran) is still there
        with pytest.raises(DriverError, match="gave no count"):
            be.calls(timeout=30)
    finally:
        be.stop()
