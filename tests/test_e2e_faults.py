"""Faults during a migration between real host processes.

Every fault before the source commits must leave the source VM running with
nothing lost -- it runs on, its VFs are RUNNING with dirty tracking off, its
counters move, and its own verification (``x-vm-verify``: memory sweep, page
cache, every disk block) passes -- and a retry to a fresh destination must then
succeed and verify there (guest and network).  The destination that saw the
failure must not run the VM (its VFs back in INIT).  After the source commits,
a dropped link leaves the source in ``postmigrate`` with status ``commit-unknown``:
it does not resume by itself; ``x-migrate-resolve`` (the VM's lease decides,
``orchestrate.resolve`` asks the destination first) ends with exactly one running.

Faults: the destination SIGKILLed while the stream is active (slowed with
max-bandwidth), the connection cut by a proxy (RST), one byte of the stream
flipped by a proxy, a destination configured differently (other memory size,
no net VF: refused at the configuration check), ``migrate_cancel`` in each
status the source goes through (``setup``: a destination that never answers;
``active``: a slow stream; ``device``: the destination's ``x-restore-delay-ms``
holds the source there), a second ``migrate`` while one runs, and the link
dropped after COMMIT (both sides ``commit-unknown``, resolved: the destination runs).  In
the commit window (issue 12): the link cut after the COMMIT reached the destination (the
source resolves through the lease and hands over: exactly one runs), and
``migrate_cancel`` while the source waits for RUNNING (too late: it must not
resume); ``migrate_cancel`` on the destination's monitor mid-stream.  The
destination unable to write part of the disk image (RLIMIT_FSIZE: EFBIG, standing
in for ENOSPC) and, where root may mount a small tmpfs, a real ENOSPC: the guest sees
I/O errors, no block is torn.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

import pytest

pytestmark = pytest.mark.slow  # real host processes: seconds per test

pytest.importorskip("qemu.qmp")

from e2e_helpers import (  # noqa: E402
    Cluster,
    HostProc,
    Peer,
    assert_source_intact,
    finish_and_verify,
    listen_address,
    migrate,
    torn_blocks,
    vm_arg,
    vm_status,
    wait_final,
    wait_for,
)

from virtio_lm.orchestrate import Monitor, MonitorCommandError, resolve  # noqa: E402

SLOW = 8_000_000  # bytes/s: round 0 of a 64 MiB VM takes seconds
WARMUP = 0.8


class Setup:
    """A switch, a peer and a running source VM; fresh destinations on demand."""

    def __init__(self, c: Cluster) -> None:
        self.c = c
        self.image = c.image()
        self.sw = c.switch()
        self.peer: Peer = c.peer(self.sw)
        self.vm = vm_arg(self.image)
        self.src_h: HostProc = c.host([self.vm], switch=self.sw)
        self.src = self.src_h.monitor()
        time.sleep(WARMUP)

    def destination(self, vm: str | None = None) -> tuple[HostProc, Monitor]:
        h = self.c.host([vm or self.vm], switch=self.sw, incoming=True)
        return h, h.monitor()

    def retry_and_verify(self, *, union_window_from_first_stop: bool = False) -> dict[str, Any]:
        """A fresh destination, a normal migration, the guest's verification and the network check."""
        first_stop = self._first_stop() if union_window_from_first_stop else None
        self.src.pull_events()
        self.src.events.clear()
        _, dst = self.destination()
        info = migrate(self.src, dst, {"max-bandwidth": 0})
        assert info["status"] == "completed", (info.get("error-desc"), info)
        assert vm_status(self.src) == "postmigrate"
        res = finish_and_verify(self.src, dst, self.peer, after=0.3, first_stop=first_stop)
        assert res["guest"]["passed"], json.dumps(res["guest"]["checks"], default=str)[:3000]
        assert res["network"]["passed"], json.dumps(res["network"], default=str)[:3000]
        return res

    def _first_stop(self) -> dict[str, int]:
        self.src.pull_events()
        return next(e["timestamp"] for e in self.src.events if e["event"] == "STOP")


@pytest.fixture
def setup(tmp_path):
    c = Cluster(tmp_path)
    try:
        yield Setup(c)
    finally:
        c.close()


def assert_destination_untouched(dst: Monitor) -> None:
    """The destination of a failed migration runs nothing: shell state, VFs in INIT."""
    info = wait_final(dst)
    assert info["status"] in ("failed", "cancelled"), info
    assert vm_status(dst) == "inmigrate"
    vfs = dst.cmd("query-vfs")
    assert all(v["state"] == "INIT" for v in vfs), vfs
    with pytest.raises(MonitorCommandError):
        dst.cmd("cont")


def start_slow(s: Setup, uri: str) -> None:
    s.src.cmd("migrate-set-parameters", **{"max-bandwidth": SLOW})
    s.src.cmd("migrate", uri=uri)
    wait_for(s.src, lambda i: i.get("status") == "active" and i["ram"]["transferred"] > (1 << 20), timeout=30)


# ------------------------------------------------------------------------------ link and peer failures
def test_destination_killed_mid_stream(setup: Setup) -> None:
    dst_h, dst = setup.destination()
    host, port = listen_address(dst)
    start_slow(setup, f"tcp:{host}:{port}")
    dst_h.proc.kill()
    info = wait_final(setup.src)
    assert info["status"] == "failed", info
    assert "destination" in info["error-desc"], info
    assert_source_intact(setup.src)
    setup.retry_and_verify()


def test_connection_cut_mid_stream(setup: Setup) -> None:
    _, dst = setup.destination()
    px = setup.c.proxy(listen_address(dst))
    start_slow(setup, px.uri)
    px.cut()
    info = wait_final(setup.src)
    assert info["status"] == "failed", info
    assert_destination_untouched(dst)
    assert_source_intact(setup.src)
    setup.retry_and_verify()


def test_corrupted_stream_byte(setup: Setup) -> None:
    _, dst = setup.destination()
    px = setup.c.proxy(listen_address(dst), corrupt_at=3 << 20)
    start_slow(setup, px.uri)
    assert px.corrupted.wait(30)
    info = wait_final(setup.src)
    assert info["status"] == "failed", info
    dinfo = wait_final(dst)
    assert "checksum" in dinfo.get("error-desc", "").lower() or "crc" in dinfo.get("error-desc", "").lower(), dinfo
    assert_destination_untouched(dst)
    assert_source_intact(setup.src)
    setup.retry_and_verify()


# ------------------------------------------------------------------------------ configuration mismatch
@pytest.mark.parametrize("mismatch", ["memory-size", "no-net-vf"])
def test_mismatched_destination_refused_before_anything_changes(setup: Setup, mismatch: str) -> None:
    other = (
        vm_arg(setup.image, memory=128) if mismatch == "memory-size" else vm_arg(setup.image, mac=None)
    )
    _, dst = setup.destination(other)
    vfs_before = dst.cmd("query-vfs")
    host, port = listen_address(dst)
    setup.src.cmd("migrate", uri=f"tcp:{host}:{port}")
    info = wait_final(setup.src)
    assert info["status"] == "failed", info
    want = "memory" if mismatch == "memory-size" else "VFs"
    assert want in info["error-desc"], info
    # refused at the configuration check: not one page went out
    assert info["ram"]["normal"] == 0 and info["ram"]["duplicate"] == 0, info["ram"]
    dinfo = wait_final(dst)
    assert dinfo["status"] == "failed" and want in dinfo["error-desc"], dinfo
    assert_destination_untouched(dst)
    assert [v["state"] for v in dst.cmd("query-vfs")] == [v["state"] for v in vfs_before]
    assert_source_intact(setup.src)
    setup.retry_and_verify()


# ------------------------------------------------------------------------------ cancel at every status
class BlackHole:
    """A TCP listener that accepts and reads but never answers: the source stays in setup."""

    def __init__(self) -> None:
        self.lst = socket.create_server(("127.0.0.1", 0))
        self.uri = "tcp:127.0.0.1:%d" % self.lst.getsockname()[1]
        self.got = bytearray()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        conn, _ = self.lst.accept()
        with conn:
            while data := conn.recv(65536):
                self.got += data
        self.lst.close()


@pytest.mark.parametrize("status", ["setup", "active", "device"])
def test_cancel_at_each_status(setup: Setup, status: str) -> None:
    dst = None
    if status == "setup":
        hole = BlackHole()
        setup.src.cmd("migrate", uri=hole.uri)
        wait_for(setup.src, lambda i: i.get("status") == "setup")
        time.sleep(0.2)  # it stays there: nobody answers
        assert setup.src.cmd("query-migrate")["status"] == "setup"
    elif status == "active":
        _, dst = setup.destination()
        start_slow(setup, "tcp:%s:%d" % listen_address(dst))
    else:
        _, dst = setup.destination()
        dst.cmd("migrate-set-parameters", **{"x-restore-delay-ms": 1500})
        setup.src.cmd("migrate", uri="tcp:%s:%d" % listen_address(dst))
        wait_for(setup.src, lambda i: i.get("status") == "device")
        assert vm_status(setup.src) == "finish-migrate"  # paused for the switch-over, as query-migrate says
        assert setup.src.cmd("query-migrate")["status"] == "device"  # still held there by the destination
    setup.src.cmd("migrate_cancel")
    info = wait_final(setup.src)
    assert info["status"] == "cancelled", info
    if dst is not None:
        assert_destination_untouched(dst)
    assert_source_intact(setup.src)
    # the device-status attempt paused the VM (its VFs quiesced) before the cancel:
    # frames in that pause are lost too, so the network is judged from that pause on
    setup.retry_and_verify(union_window_from_first_stop=status == "device")


# ------------------------------------------------------------------------------ the monitor asked twice
def test_second_migrate_refused_while_one_runs(setup: Setup) -> None:
    _, dst = setup.destination()
    _, other = setup.destination()
    uri = "tcp:%s:%d" % listen_address(dst)
    other_uri = "tcp:%s:%d" % listen_address(other)
    dst.cmd("migrate-set-parameters", **{"x-restore-delay-ms": 800})  # the first one surely still runs
    setup.src.cmd("migrate", uri=uri)
    with pytest.raises(MonitorCommandError, match="in progress"):
        setup.src.cmd("migrate", uri=other_uri)
    with setup.src_h.monitor() as second:  # a second monitor connection: refused as well
        with pytest.raises(MonitorCommandError, match="in progress"):
            second.cmd("migrate", uri=other_uri)
    assert setup.src.cmd("query-migrate")["status"] in ("setup", "active", "device")  # refused while it ran
    # the first one goes on to completion, untouched by the refusals
    info = wait_final(setup.src)
    assert info["status"] == "completed", info
    assert vm_status(other) == "inmigrate"
    res = finish_and_verify(setup.src, dst, setup.peer, after=0.3)
    assert res["guest"]["passed"], json.dumps(res["guest"]["checks"], default=str)[:3000]
    assert res["network"]["passed"], json.dumps(res["network"], default=str)[:3000]


# ------------------------------------------------------------------------------ after the commit
def wait_unknown(mon: Monitor) -> dict[str, Any]:
    return wait_for(mon, lambda i: i.get("status") in ("commit-unknown", "completed", "failed", "cancelled"),
                    timeout=120, poll=0.02)


def lease_holder(image) -> str:
    return (image.parent / (image.name + ".lease")).read_text().split("/", 1)[0]


def test_link_drop_after_commit_both_in_doubt_resolved_the_destination_runs(setup: Setup) -> None:
    """The COMMIT is dropped and the link cut: the source (committed) and the destination
    (READY sent) both say commit-unknown, neither runs, cont is refused; resolving -- the
    destination first, as orchestrate.resolve does -- starts the destination (it takes the
    lease over) and completes the source (it finds the lease gone): exactly one runs."""
    _, dst = setup.destination()
    with pytest.raises(MonitorCommandError, match="no migration to resolve"):
        setup.src.cmd("x-migrate-resolve")
    px = setup.c.proxy(listen_address(dst), cut_after_ready=True)
    setup.src.cmd("migrate", uri=px.uri)
    info = wait_unknown(setup.src)
    assert px.ready_seen.is_set() and px.dropped_after_ready > 0, "the proxy did not drop the COMMIT"
    assert info["status"] == "commit-unknown" and info["vm-status"] == "postmigrate", info
    assert info["x-commit-sent"] and info["x-lease"]
    assert wait_unknown(dst)["status"] == "commit-unknown"
    assert vm_status(dst) == "inmigrate"  # restored, paused: it does not run on its own
    with pytest.raises(MonitorCommandError):
        dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")  # not before it is resolved
    assert_stays_committed(setup.src)  # the source does not resume on its own either
    assert lease_holder(setup.image).startswith("source")
    with pytest.raises(MonitorCommandError):  # not one of source / destination
        setup.src.cmd("x-migrate-resolve", run="elsewhere")
    with pytest.raises(MonitorCommandError, match="lease decides"):  # a VM with a lease: no word taken
        setup.src.cmd("x-migrate-resolve", run="source")
    assert resolve(setup.src, dst) == {"source": "completed", "destination": "completed"}
    with pytest.raises(MonitorCommandError, match="nothing to resolve"):
        dst.cmd("x-migrate-resolve")
    assert vm_status(dst) == "running" and vm_status(setup.src) == "postmigrate"
    assert lease_holder(setup.image).startswith("destination")
    res = finish_and_verify(setup.src, dst, None, after=0.3)
    assert res["guest"]["passed"], json.dumps(res["guest"]["checks"], default=str)[:3000]


def assert_stays_committed(src: Monitor, seconds: float = 0.5) -> None:
    """The source stays in postmigrate (paused, VFs handed over) for a while and refuses cont."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert vm_status(src) == "postmigrate"
    with pytest.raises(MonitorCommandError):
        src.cmd("cont")


def test_link_cut_after_commit_reached_the_destination_exactly_one_runs(setup: Setup) -> None:
    """The COMMIT reaches the destination, its RUNNING never reaches the source (the link
    fails in the commit window): the destination runs and verifies, the source stays paused
    in postmigrate and never resumes -- exactly one runs."""
    _, dst = setup.destination()
    px = setup.c.proxy(listen_address(dst), cut_after_commit=True)
    setup.src.cmd("migrate", uri=px.uri)
    info = wait_unknown(setup.src)
    assert px.commit_forwarded.is_set() and px.dropped_after_commit > 0, "the proxy did not drop RUNNING"
    assert info["status"] == "commit-unknown" and info["vm-status"] == "postmigrate", info
    assert wait_final(dst)["status"] == "completed"
    assert vm_status(dst) == "running"
    assert_stays_committed(setup.src)
    assert vm_status(dst) == "running"
    # the source asks the lease: the destination holds it -- hand over, never resume
    assert setup.src.cmd("x-migrate-resolve") == {"run": "destination", "status": "completed"}
    assert vm_status(setup.src) == "postmigrate"
    vfs = setup.src.cmd("query-vfs")
    assert all(v["state"] != "RUNNING" for v in vfs), vfs  # the source's VFs never run again
    res = finish_and_verify(setup.src, dst, None, after=0.3)
    assert res["guest"]["passed"], json.dumps(res["guest"]["checks"], default=str)[:3000]


def test_cancel_in_the_commit_window_does_not_resume_the_source(setup: Setup) -> None:
    """migrate_cancel after the source sent COMMIT (its RUNNING held back): too late to roll
    back -- the cancel must not resume the source; the migration completes, the destination
    runs, the source stays in postmigrate."""
    _, dst = setup.destination()
    px = setup.c.proxy(listen_address(dst), hold_after_commit=True)
    setup.src.cmd("migrate", uri=px.uri)
    deadline = time.monotonic() + 120
    while not px.commit_forwarded.is_set():
        assert time.monotonic() < deadline, "the COMMIT never went through the proxy"
        px.commit_forwarded.wait(0.05)
    setup.src.cmd("migrate_cancel")
    assert vm_status(setup.src) == "postmigrate"
    px.release.set()
    info = wait_final(setup.src)
    assert info["status"] == "completed", info
    assert wait_final(dst)["status"] == "completed" and vm_status(dst) == "running"
    assert_stays_committed(setup.src)
    res = finish_and_verify(setup.src, dst, setup.peer, after=0.3)
    assert res["guest"]["passed"], json.dumps(res["guest"]["checks"], default=str)[:3000]


def test_cancel_on_the_destination_while_active_rolls_the_source_back(setup: Setup) -> None:
    """migrate_cancel on the destination's monitor in the middle of the stream: the destination
    gives up (ERROR to the source), the source rolls back and runs on, a retry succeeds."""
    _, dst = setup.destination()
    start_slow(setup, "tcp:%s:%d" % listen_address(dst))
    dst.cmd("migrate_cancel")
    assert wait_final(dst)["status"] == "cancelled"
    info = wait_final(setup.src)
    assert info["status"] == "failed", info
    assert_destination_untouched(dst)
    assert_source_intact(setup.src)
    setup.retry_and_verify()


# ------------------------------------------------------------------------------ the destination's disk fills up
def test_destination_image_write_limit_guest_sees_io_errors_and_no_block_is_torn(setup: Setup) -> None:
    """The destination cannot write the upper half of the disk image (a file-size limit,
    RLIMIT_FSIZE, set on the running destination process: pwrite fails with EFBIG there, as
    it would with ENOSPC on a full disk -- without root a real full filesystem is not
    available).  Writes re-executed at resume and written after it fail: the guest sees
    each as an I/O error (IOERR), the memory check still passes, and every block of the image
    is whole -- all zero or a complete block of some generation -- so nothing is lost
    silently: each block holds what the guest last saw acknowledged or a write it saw fail."""
    import re
    import resource

    from e2e_helpers import BLOCKS

    from virtio_lm.wire.guest import BLOCK_SIZE

    limit_block = BLOCKS // 2
    dst_h, dst = setup.destination()
    # after start-up: the destination's guest memory (a memfd) is already sized
    resource.prlimit(dst_h.proc.p.pid, resource.RLIMIT_FSIZE, (limit_block * BLOCK_SIZE,) * 2)
    info = migrate(setup.src, dst, {"max-bandwidth": 0})
    assert info["status"] == "completed", (info.get("error-desc"), info)
    deadline = time.monotonic() + 60
    while (blk := next(iter(dst.cmd("query-vms")))["blk"])["errors"] < 3:
        assert time.monotonic() < deadline, f"no write failed on the destination: {blk}"
        time.sleep(0.05)
    dst.cmd("stop")
    report = dst.cmd("x-vm-verify")
    assert report["checks"]["memory"]["passed"], report["checks"]["memory"]
    blk = report["checks"]["blk"]
    assert not blk["passed"] and blk["stats"]["errors"] >= 3, blk
    for problem in blk["problems"]:  # only the failed writes, each above the limit
        m = re.fullmatch(r"write of block (\d+) failed with status 1", problem)
        assert m and int(m.group(1)) >= limit_block, problem
    assert torn_blocks(setup.image.read_bytes(), BLOCKS) == []


@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs of 8 MiB mounted for the test (root only: skipped with the reason otherwise)."""
    import subprocess

    mnt = tmp_path / "smallfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "virtio-lm-enospc", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for a real ENOSPC (needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill_up(fs) -> int:
    """Take every free block of the filesystem ``fs`` (a filler file); returns the bytes taken."""
    import errno
    import os

    n = 0
    with open(fs / "filler", "wb", buffering=0) as f:
        for size in (1 << 20, 4096):
            while True:
                try:
                    f.write(b"\xff" * size)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
                n += size
    return n


def test_destination_disk_full_enospc_guest_sees_io_errors_nothing_lost_silently(tmp_path, small_fs) -> None:
    """ENOSPC for real: the shared image lives on an 8 MiB tmpfs; while the switch-over is held
    (the destination's x-restore-delay-ms, the source's blk VF already FREEZED) a filler file
    takes every free block.  Blocks the guest never wrote have no storage behind them: the
    writes that reach them at resume (re-executed in-flight ones) and after fail with ENOSPC.
    The guest sees each as an I/O error; its memory check passes; every other block reads back
    as written; no block of the image is torn -- nothing is lost silently."""
    import os
    import re

    from e2e_helpers import Cluster

    from virtio_lm.wire.guest import BLOCK_SIZE

    blocks = 1024
    image = small_fs / "disk.img"
    with open(image, "wb") as f:
        f.truncate(blocks * BLOCK_SIZE)
    (tmp_path / "work").mkdir()
    c = Cluster(tmp_path / "work")
    try:
        sw = c.switch()
        vm = vm_arg(image, blk_rate=60.0, mac=None).replace(",blocks=256,", f",blocks={blocks},")
        src = c.host([vm], switch=sw).monitor()
        time.sleep(WARMUP)
        dst_h = c.host([vm], switch=sw, incoming=True)
        dst = dst_h.monitor()
        dst.cmd("migrate-set-parameters", **{"x-restore-delay-ms": 1500})
        src.cmd("migrate", uri="tcp:%s:%d" % listen_address(dst))
        deadline = time.monotonic() + 120
        while not any(v["kind"] == "blk" and v["state"] == "FREEZED" for v in src.cmd("query-vfs")):
            assert src.cmd("query-migrate")["status"] not in ("completed", "failed"), "the hold did not hold"
            assert time.monotonic() < deadline, "the source's blk VF never froze"
            time.sleep(0.01)
        assert fill_up(small_fs) > 0
        assert os.statvfs(small_fs).f_bavail == 0  # full: a write to a block never written fails, ENOSPC
        info = wait_final(src)
        assert info["status"] == "completed", (info.get("error-desc"), info)
        deadline = time.monotonic() + 60
        while (blk := next(iter(dst.cmd("query-vms")))["blk"])["errors"] < 3:
            assert time.monotonic() < deadline, f"no write failed on the destination: {blk}"
            time.sleep(0.05)
        dst.cmd("stop")
        report = dst.cmd("x-vm-verify")
        assert report["checks"]["memory"]["passed"], report["checks"]["memory"]
        blk = report["checks"]["blk"]
        assert not blk["passed"] and blk["stats"]["errors"] >= 3, blk
        for problem in blk["problems"]:  # only the failed writes: reported, never silent
            assert re.fullmatch(r"write of block \d+ failed with status 1", problem), problem
        assert torn_blocks(image.read_bytes(), blocks) == []
    finally:
        c.close()


def test_negative_control_a_torn_block_is_found() -> None:
    from virtio_lm.vm.workloads import block_content
    from virtio_lm.wire.guest import BLOCK_SIZE

    image = bytearray(block_content(0, 3) + bytes(BLOCK_SIZE) + block_content(2, 7))
    assert torn_blocks(bytes(image), 3) == []
    image[2 * BLOCK_SIZE + 100] ^= 1  # block 2: half an old write, half a new one
    image[BLOCK_SIZE] = 9  # block 1: garbage
    assert torn_blocks(bytes(image), 3) == [1, 2]


# ------------------------------------------------------------------------------ over the limit
def test_an_overrun_is_reported_in_query_migrate_and_the_migration_event(setup: Setup) -> None:
    """downtime-limit 1 ms: no switch-over meets it.  The migration still completes (the host's
    scratch calibration alone does not refuse it) and says by how much and where it overran."""
    for _attempt in range(3):
        _, dst = setup.destination()
        setup.src.pull_events()
        setup.src.events.clear()
        info = migrate(setup.src, dst, {"downtime-limit": 1})
        if info["status"] == "completed" or "not converging after" not in str(info.get("error-desc")):
            break
        # The policy gave up instead (max-rounds): the blk VF runs flat out, and its DMA -- which no
        # vCPU throttle slows -- left 20-26 pages pending in every one of 100 rounds, more than
        # the bandwidth measured on such small rounds sends in what 1 ms leaves after the fixed
        # cost.  It did so in 2 to 3 runs of 10 on a quiet machine (at 81a5e34 too).  A give-up
        # leaves the source running; the overrun report is this test's subject, so try again.
        assert info["vm-status"] == "running", info
    assert info["status"] == "completed", (info.get("error-desc"), info)
    downtime = sum(info["downtime-phases"].values())
    assert info["downtime-limit"] == 1
    assert info["downtime-overrun"] == pytest.approx(downtime - 1, abs=0.01) and info["downtime-overrun"] > 0
    assert info["downtime-overrun-phase"] in info["downtime-phases"]
    setup.src.pull_events()
    done = [e for e in setup.src.events if e["event"] == "MIGRATION" and e["data"]["status"] == "completed"]
    assert len(done) == 1, setup.src.events
    assert done[0]["data"]["downtime-overrun"] == info["downtime-overrun"]
    assert done[0]["data"]["downtime-overrun-phase"] == info["downtime-overrun-phase"]
    res = finish_and_verify(setup.src, dst, setup.peer, after=0.3)
    assert res["guest"]["passed"], json.dumps(res["guest"]["checks"], default=str)[:3000]
