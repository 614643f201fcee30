"""End to end, in separate processes: a switch, a network peer, a source and a
destination ``virtio-lm host`` process, driven over QMP with the ``qemu.qmp``
client (:class:`virtio_lm.orchestrate.Monitor`).

Each run: the VM (blk VF + net VF, blk workload flat out so it always has
requests submitted) runs on the source, migrates with VF I/O in flight at the
switch-over (asserted from the source's ``query-migrate`` ``x-in-flight``), runs
on the destination, and then the guest verifies itself there (``x-vm-verify``:
memory sweep, page cache and every disk block) and the network check runs
(:func:`virtio_lm.demo.check_network`: loss only inside the switch-over window,
no duplicates).  Every tracking mode at 64 MiB, one 1 GiB VM, and the negative
control: ``x-device-tracking: false`` must make verification fail.

The runs of one module go in parallel (a module fixture starts them all on
threads; each test judges its own run), since most of a run is waiting.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow  # real host processes: seconds per test

pytest.importorskip("qemu.qmp")

from e2e_helpers import (  # noqa: E402
    PEER1_MAC,
    VM1_MAC,
    Cluster,
    finish_and_verify,
    migrate,
    vm_arg,
    vm_status,
    wait_final,
)

from virtio_lm.demo import check_network  # noqa: E402

MODES = ["push-bitmap", "push-bytemap", "pull-bitmap", "pull-bytemap"]


def run_e2e(
    work: Path, *, mode: str, memory: int = 64, device_tracking: bool = True, warmup: float = 1.0,
    sweep: int | None = None, profile: str | None = None,
) -> dict[str, Any]:
    """One whole run; returns everything the tests judge (never raises for a failed check)."""
    c = Cluster(work)
    out: dict[str, Any] = {}
    try:
        image = c.image()
        sw = c.switch()
        peer = c.peer(sw)
        vm = vm_arg(image, memory=memory, sweep=sweep)
        src_h = c.host([vm], switch=sw, profile=profile)
        dst_h = c.host([vm], switch=sw, incoming=True, profile=profile)
        src, dst = src_h.monitor(), dst_h.monitor()
        time.sleep(warmup)
        # the guest at work before the migration starts: its blk requests flowing and its net
        # frames out (on a busy host a large VM's workloads take a while to get going; the
        # wait is bounded host-side, not by a fixed guest-side time)
        deadline = time.monotonic() + 120
        while True:
            before = src.cmd("query-vms")[0]
            if before["blk"]["writes"] > 0 and before["net"]["tx-sent"] > 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        out["before"] = before
        info = migrate(src, dst, {"x-tracking-mode": mode, "x-device-tracking": device_tracking})
        out["info"] = info
        out["source-status"] = src.cmd("query-status")["status"]
        out["source-vfs"] = src.cmd("query-vfs")
        out["destination-vfs"] = dst.cmd("query-vfs")
        if info["status"] == "completed":
            out.update(finish_and_verify(src, dst, peer, after=0.5))
            out["destination-vms"] = dst.cmd("query-vms")[0]
    except Exception as exc:  # reported by the test that judges this run
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["logs"] = {p.name: p.log_tail(1500) for p in c.procs}
    finally:
        c.close()
    return out


RUNS: dict[str, dict[str, Any]] = {
    **{f"64-{m}": {"mode": m} for m in MODES},
    # the vCPU sweeps 64 MiB of the 1 GiB, so most of the guest stays zero however long the run takes
    "1024-pull-bytemap": {"mode": "pull-bytemap", "memory": 1024, "sweep": 64},
    "no-device-tracking": {"mode": "pull-bitmap", "device_tracking": False},
    # virtio 1.4: the admin queue, device parts and the platform's IOMMU dirty tracking
    "virtio-1.4": {"mode": "pull-bitmap", "profile": "virtio-1.4"},
    "virtio-1.4-no-platform-tracking": {"mode": "pull-bitmap", "profile": "virtio-1.4", "device_tracking": False},
}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """All runs of the module at once (3 at a time: two cores, mostly waiting)."""
    out: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()
    tmp_path_factory.getbasetemp()  # made once here: the first call from three threads at once races

    def one(key: str) -> None:
        r = run_e2e(tmp_path_factory.mktemp(key), **RUNS[key])
        with lock:
            out[key] = r

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(one, ["1024-pull-bytemap", *[k for k in RUNS if k != "1024-pull-bytemap"]]))
    return out


def _ok_run(r: dict[str, Any]) -> None:
    assert "error" not in r, f"{r['error']}\n{json.dumps(r.get('logs'), indent=1)[:4000]}"
    info = r["info"]
    assert info["status"] == "completed", (info.get("error-desc"), info)
    assert info["destination"]["status"] == "completed", info["destination"]


def _check_migrated(r: dict[str, Any], mode: str, memory: int) -> None:
    _ok_run(r)
    info = r["info"]
    assert info["ram"]["total"] == memory << 20
    # VF I/O in flight at the switch-over: the guest had blk requests submitted
    # and not yet completed when its vCPUs paused (they crossed in guest memory,
    # the device's image and the guest state)
    inflight = info["x-in-flight"]
    assert inflight["guest"]["blk"] > 0, inflight
    assert set(inflight["vfs"]) == {"blk", "net"}
    # device dirty tracking ran in the chosen mode and reported pages
    assert info["x-tracking-mode"] == mode
    assert info["x-device-dirty-pages"]["blk"] > 0, info["x-device-dirty-pages"]
    # the source committed and released; the destination runs the VFs
    assert r["source-status"] == "postmigrate"
    assert all(v["state"] == "INIT" for v in r["source-vfs"]), r["source-vfs"]
    assert all(v["state"] == "RUNNING" and v["tracking"] is None for v in r["destination-vfs"]), r["destination-vfs"]
    # the guest on the destination: memory, page cache, every disk block
    guest = r["guest"]
    assert guest["passed"], json.dumps(guest["checks"], default=str)[:3000]
    assert set(guest["checks"]) == {"memory", "blk", "net"}
    # it went on working after the move
    before, after = r["before"], r["destination-vms"]
    assert after["blk"]["writes"] > before["blk"]["writes"]
    assert after["net"]["tx-sent"] > before["net"]["tx-sent"]
    assert after["vcpu"]["sweeps"] >= before["vcpu"]["sweeps"]
    net = r["network"]
    # on failure: the devices' own counters say whether the frames died in the source's
    # RX path (no buffer: the guest did not keep up), the switch-over or after it
    counters = {side: {v["kind"]: v.get("x-stats") for v in r[side]} for side in ("source-vfs", "destination-vfs")}
    assert net["passed"], json.dumps({"network": net, "devices": counters}, default=str)[:3000]
    assert net["peer-to-vm"]["received"] > 0 and net["vm-to-peer"]["received"] > 0


@pytest.mark.parametrize("mode", MODES)
def test_e2e_64mib_each_tracking_mode(results: dict[str, dict[str, Any]], mode: str) -> None:
    _check_migrated(results[f"64-{mode}"], mode, 64)


def test_e2e_1gib_vm(results: dict[str, dict[str, Any]]) -> None:
    r = results["1024-pull-bytemap"]
    _check_migrated(r, "pull-bytemap", 1024)
    # most of a fresh 1 GiB guest is zero: those pages cost a header, not 4 KiB
    assert r["info"]["ram"]["duplicate"] > r["info"]["ram"]["normal"]


def test_e2e_negative_control_no_device_tracking_fails_verification(results: dict[str, dict[str, Any]]) -> None:
    r = results["no-device-tracking"]
    _ok_run(r)  # the migration itself completes ...
    info = r["info"]
    assert info["x-tracking-mode"] is None and info["x-device-dirty-pages"] == {}
    assert info["x-in-flight"]["guest"]["blk"] > 0
    guest = r["guest"]
    # ... but device DMA during pre-copy went unreported: the guest finds stale pages
    assert not guest["passed"], "verification passed although VF DMA was not tracked"
    assert not guest["checks"]["blk"]["passed"]
    # pages only the device wrote (page-cache slots, read data) arrived stale
    stale = [p for p in guest["checks"]["blk"]["problems"] if "page cache slot" in p or p.startswith("read of block")]
    assert stale, guest["checks"]["blk"]
    # what the vCPU wrote was tracked: the memory sweep itself is intact
    assert guest["checks"]["memory"]["passed"], guest["checks"]["memory"]


def test_e2e_virtio_1_4_profile_migrates_and_verifies(results: dict[str, dict[str, Any]]) -> None:
    r = results["virtio-1.4"]
    _ok_run(r)
    info = r["info"]
    assert info["x-device-profile"] == "virtio-1.4" and info["x-tracking-mode"] == "iommu"
    assert info["x-device-dirty-pages"]["blk"] > 0, info["x-device-dirty-pages"]  # from the IOMMU's bitmaps
    assert info["x-in-flight"]["guest"]["blk"] > 0
    # the standard has no in-flight part: the source completed every chain before STOPPED
    assert info["x-in-flight"]["vfs"]["blk"] == 0, info["x-in-flight"]
    assert r["source-status"] == "postmigrate"
    assert all(v["profile"] == "virtio-1.4" and v["mig-state"] == "RUNNING" for v in r["source-vfs"] + r["destination-vfs"])
    assert all(v["state"] == "RUNNING" for v in r["destination-vfs"]), r["destination-vfs"]  # member mode
    guest = r["guest"]
    assert guest["passed"], json.dumps(guest["checks"], default=str)[:3000]
    assert r["destination-vms"]["blk"]["writes"] > r["before"]["blk"]["writes"]
    assert r["network"]["passed"], json.dumps(r["network"], default=str)[:3000]


def test_e2e_virtio_1_4_negative_control_no_platform_tracking_fails_verification(
    results: dict[str, dict[str, Any]],
) -> None:
    r = results["virtio-1.4-no-platform-tracking"]
    _ok_run(r)
    info = r["info"]
    assert info["x-device-profile"] == "virtio-1.4" and info["x-tracking-mode"] is None
    guest = r["guest"]
    assert not guest["passed"], "verification passed although the IOMMU tracked nothing"
    assert not guest["checks"]["blk"]["passed"]
    assert guest["checks"]["memory"]["passed"], guest["checks"]["memory"]


# ------------------------------------------------------------------------------ one PF, two VMs
def _counters(vm: dict[str, Any]) -> tuple[int, ...]:
    return (
        vm["vcpu"]["sweeps"] * (1 << 32) + vm["vcpu"]["position"],
        vm["blk"]["writes"] + vm["blk"]["reads"],
        vm["net"]["tx-sent"],
        vm["net"]["rx-received"],
    )


def test_one_pf_two_vms_migrating_one_never_disturbs_the_other(tmp_path: Path) -> None:
    """A host with vm0 and vm1, their four VFs on its one PF; vm0 migrates (slowed by
    max-bandwidth and the destination's x-restore-delay-ms so it lasts), vm1 stays.  While vm0 migrates, vm1's workloads keep
    running (every counter moves between samples), its VFs stay RUNNING and untracked;
    afterwards vm1 verifies itself and lost no frame at all."""
    c = Cluster(tmp_path)
    try:
        img0, img1 = c.image("disk0"), c.image("disk1")
        sw = c.switch()
        peer0 = c.peer(sw)
        peer1 = c.peer(sw, vm_mac=VM1_MAC, mac=PEER1_MAC)
        vm0 = vm_arg(img0, dirty_rate=8.0)
        vm1 = vm_arg(img1, name="vm1", mac=VM1_MAC, peer=PEER1_MAC, seed=2)
        src_h = c.host([vm0, vm1], switch=sw)
        dst_h = c.host([vm0], switch=sw, incoming=True)
        src, dst = src_h.monitor(), dst_h.monitor()
        time.sleep(0.8)
        vfs = src.cmd("query-vfs")
        assert sorted(v["vm"] for v in vfs) == ["vm0", "vm0", "vm1", "vm1"]
        assert len({v["vf"] for v in vfs}) == 4  # four VFs of the one PF
        samples: list[tuple[dict, list[dict], str]] = []
        done = threading.Event()

        def sample() -> None:
            with src_h.monitor() as m:  # a monitor of its own: the migration's is busy polling
                while not done.is_set():
                    st = m.cmd("query-migrate", vm="vm0").get("status", "none")
                    vm1_info = next(v for v in m.cmd("query-vms") if v["name"] == "vm1")
                    vm1_vfs = [v for v in m.cmd("query-vfs") if v["vm"] == "vm1"]
                    samples.append((vm1_info, vm1_vfs, st))
                    time.sleep(0.1)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        time.sleep(0.3)
        dst.cmd("migrate-set-parameters", **{"x-restore-delay-ms": 800})  # vm0's migration surely lasts
        info = migrate(src, dst, {"max-bandwidth": 16_000_000}, vm="vm0")
        time.sleep(0.3)
        done.set()
        th.join(10)
        assert info["status"] == "completed", (info.get("error-desc"), info)
        during = [s for s in samples if s[2] in ("setup", "active", "device")]
        assert len(during) >= 3, f"only {len(during)} samples while vm0 migrated: {[s[2] for s in samples]}"
        for vm1_info, vm1_vfs, st in samples:
            assert vm1_info["status"] == "running" and vm1_info["running"], (st, vm1_info)
            assert len(vm1_vfs) == 2 and all(v["state"] == "RUNNING" and v["tracking"] is None for v in vm1_vfs), (st, vm1_vfs)
            assert all(v["tracked-marks"] == 0 for v in vm1_vfs)
        seq = [_counters(s[0]) for s in samples]
        first_during = samples.index(during[0])
        last_during = samples.index(during[-1])
        for k, name in enumerate(("vcpu", "blk requests", "net tx", "net rx")):
            assert seq[last_during][k] > seq[first_during][k], f"vm1 {name} stood still during vm0's migration: {seq}"
        assert src.cmd("query-migrate", vm="vm1") == {}
        # vm0 moved and verifies on the destination; its VFs on the source are reset
        res = finish_and_verify(src, dst, peer0, after=0.3)
        assert res["guest"]["passed"], json.dumps(res["guest"]["checks"], default=str)[:3000]
        assert res["network"]["passed"], json.dumps(res["network"], default=str)[:3000]
        assert vm_status(src, "vm0") == "postmigrate"
        assert all(v["state"] == "INIT" for v in src.cmd("query-vfs") if v["vm"] == "vm0")
        # vm1 never noticed: it verifies, and not one frame was lost either way
        assert vm_status(src, "vm1") == "running"
        src.cmd("stop", vm="vm1")
        t_stop = time.time()
        time.sleep(0.3)
        guest1 = src.cmd("x-vm-verify", vm="vm1")
        assert guest1["passed"], json.dumps(guest1["checks"], default=str)[:3000]
        net1 = guest1["checks"]["net"]
        check = check_network(
            peer1.finish(), dict(net1["stats"], received=net1["received"]), (0.0, 0.0), until=t_stop
        )
        assert check["passed"], json.dumps(check, default=str)[:3000]
        assert check["peer-to-vm"]["sent-judged"] > 0 and check["peer-to-vm"]["lost"] == 0, check
        assert check["vm-to-peer"]["received"] > 0 and check["vm-to-peer"]["lost"] == 0, check
    finally:
        c.close()


# ------------------------------------------------------------------------------ file: save, analyze, restore
def test_migrate_to_file_analyze_and_restore(tmp_path: Path) -> None:
    """``migrate file:PATH`` saves the running VM (the source stays stopped,
    postmigrate); ``virtio-lm analyze-stream`` decodes the file and agrees with
    the source's figures; ``migrate-incoming file:PATH`` on a fresh destination
    restores it, and it verifies there.  A truncated copy is not a valid stream."""
    c = Cluster(tmp_path)
    try:
        image = c.image()
        sw = c.switch()
        peer = c.peer(sw)
        vm = vm_arg(image)
        src = c.host([vm], switch=sw).monitor()
        time.sleep(0.8)
        path = tmp_path / "vm0.stream"
        src.cmd("migrate", uri=f"file:{path}")
        info = wait_final(src)
        assert info["status"] == "completed", (info.get("error-desc"), info)
        assert vm_status(src) == "postmigrate"
        assert info["x-in-flight"]["guest"]["blk"] > 0
        size = path.stat().st_size
        assert size == info["ram"]["transferred"]

        out = subprocess.run(
            [sys.executable, "-m", "virtio_lm.cli", "analyze-stream", "--json", str(path)],
            capture_output=True, text=True, timeout=120,
        )
        assert out.returncode == 0, out.stderr
        summary = json.loads(out.stdout)
        assert summary["valid"] and summary["complete"], summary.get("error")
        assert summary["bytes"] == size
        assert summary["config"]["memory-size"] == 64 << 20
        assert len(summary["config"]["vfs"]) == 2
        assert summary["pages"]["normal"] == info["ram"]["normal"]
        assert summary["pages"]["zero"] == info["ram"]["duplicate"]
        assert [d["vf-index"] for d in summary["devices"]] == [0, 1]
        assert summary["cpu-state-bytes"] > 0
        text = subprocess.run(
            [sys.executable, "-m", "virtio_lm.cli", "analyze-stream", str(path)], capture_output=True, text=True, timeout=120
        )
        assert text.returncode == 0 and text.stdout.strip()

        cut = tmp_path / "truncated.stream"
        cut.write_bytes(path.read_bytes()[: size - 100])
        bad = subprocess.run(
            [sys.executable, "-m", "virtio_lm.cli", "analyze-stream", "--json", str(cut)],
            capture_output=True, text=True, timeout=120,
        )
        assert bad.returncode == 1 and not json.loads(bad.stdout)["valid"]

        dst = c.host([vm], switch=sw, incoming=True).monitor()
        dst.cmd("migrate-incoming", uri=f"file:{path}")
        dinfo = wait_final(dst)
        assert dinfo["status"] == "completed", dinfo
        assert vm_status(dst) == "running"
        res = finish_and_verify(src, dst, peer, after=0.5)
        assert res["guest"]["passed"], json.dumps(res["guest"]["checks"], default=str)[:3000]
        assert res["network"]["passed"], json.dumps(res["network"], default=str)[:3000]
    finally:
        c.close()
