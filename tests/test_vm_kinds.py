"""VF kinds through the registry (vm/kinds.py): a third kind -- the DMA test device --
goes through the same host, VM, guest-state and migration path as blk and net, with
nothing outside its own module naming it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from virtio_lm.host.host import Host, HostConfig
from virtio_lm.vm.kinds import KINDS, kinds_of
from virtio_lm.vm.machine import VmSpec

MAC = "52:54:00:12:34:56"


def _spec(tmp_path: Path, **kw) -> VmSpec:
    image = tmp_path / "disk.img"
    if not image.exists():
        with open(image, "wb") as f:
            f.truncate(4 << 20)
    base = dict(name="vm0", memory_mib=32, blk_image=str(image), blk_blocks=64, net_mac=MAC, dirty_rate_mbps=8.0,
                blk_rate=300.0, net_rate=100.0, dmatest=4)
    base.update(kw)
    return VmSpec(**base)


def _wait(pred, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_the_registry_lists_kinds_in_stream_order(tmp_path):
    assert list(KINDS)[:3] == ["blk", "net", "dmatest"]
    assert kinds_of(_spec(tmp_path)) == ["blk", "net", "dmatest"]
    assert kinds_of(_spec(tmp_path, dmatest=0, net_mac=None)) == ["blk"]


@pytest.mark.slow  # over 0.4 s: out of the one-minute fast subset (CI runs it)
def test_a_vm_with_a_dma_test_vf_migrates_and_verifies(tmp_path):
    spec = _spec(tmp_path)
    src = Host(HostConfig(name="src", qmp=f"unix:{tmp_path}/src.qmp", vms=[spec], calibrate=False))
    dst = Host(HostConfig(name="dst", qmp=f"unix:{tmp_path}/dst.qmp", vms=[spec], incoming=True, calibrate=False))
    try:
        vm = src.slots["vm0"].vm
        _wait(lambda: vm.info()["dmatest"]["fills"] > 20, "the DMA test workload runs")
        dst.table.call("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        port = dst.table.call("query-migrate")["socket-address"][0]["port"]
        src.table.call("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        _wait(lambda: src.table.call("query-migrate")["status"] in ("completed", "failed", "cancelled"), "migration")
        info = src.table.call("query-migrate")
        assert info["status"] == "completed", info.get("error-desc")
        assert "dmatest" in info["x-in-flight"]["guest"]
        dvm = dst.slots["vm0"].vm
        before = dvm.info()["dmatest"]["fills"]
        _wait(lambda: dvm.info()["dmatest"]["fills"] > before + 20, "the DMA test workload goes on over there")
        check = dst.table.call("x-vm-verify")
        assert check["passed"], check
        assert check["checks"]["dmatest"]["fills"] > 0
    finally:
        src.close()
        dst.close()


def test_negative_control_a_buffer_the_device_did_not_write_is_caught(tmp_path):
    """The workload checks every byte of a FILL: a completed buffer changed behind the
    device's back (what a lost DMA write looks like after a migration) is reported."""
    spec = _spec(tmp_path, blk_image=None, net_mac=None, dmatest=2, dirty_rate_mbps=1.0)
    host = Host(HostConfig(name="h", qmp=f"unix:{tmp_path}/h.qmp", vms=[spec], calibrate=False))
    try:
        vm = host.slots["vm0"].vm
        part = vm.parts["dmatest"]
        _wait(lambda: part.workload.fills > 5, "fills")
        part.workload.rate = 0.0  # as fast as the device goes: qd FILLs in flight after every step
        n = part.workload.fills
        _wait(lambda: part.workload.fills > n + 5, "more fills")
        vm.pause()
        st = part.driver.save()
        assert st.requests  # FILLs in flight at the pause
        _wait(lambda: part.driver.queue.used_idx() != part.driver.queue.last_used_idx, "a FILL done by the device")
        for r in st.requests:  # the device wrote them (or will): overwrite what it wrote
            vm.memory.cpu.write(r.data_addr, b"\xee" * 64)
        check = vm.verify(disk=False)
        assert not check["checks"]["dmatest"]["passed"]
        assert "does not hold the device's pattern" in " ".join(check["checks"]["dmatest"]["problems"])
    finally:
        host.close()


def test_a_paused_flat_out_blk_workload_parks_with_io_in_flight(tmp_path):
    """Flat out (blk-rate 0), the workload never parks with nothing submitted: a step that reaps
    every completion with a pause pending submits one request before it returns (a stress trial
    once paused it right after it had reaped all 16 of its requests; the e2e test counts on I/O
    in flight at the switch-over)."""
    spec = _spec(tmp_path, net_mac=None, dmatest=0, blk_rate=0.0)
    host = Host(HostConfig(name="h", qmp=f"unix:{tmp_path}/h.qmp", vms=[spec], calibrate=False))
    try:
        vm = host.slots["vm0"].vm
        work = vm.parts["blk"].workload
        _wait(lambda: work.stats["writes"] + work.stats["reads"] > 50, "the blk workload runs")
        work.qd = 2  # fewer than a reap batch: one reap takes every completion, whatever the pause
        n = work.stats["writes"] + work.stats["reads"]
        _wait(lambda: work.stats["writes"] + work.stats["reads"] > n + 20, "steps at the new depth")
        vm.pause()
        _wait(lambda: vm.vfs["blk"].device.in_flight == 0, "the device to finish what it was given")
        work.request_pause()  # (already parked: the step below is the one a pause would meet)
        work.step()  # reaps every completion; the pause is pending
        assert vm.requests_in_flight()["blk"] >= 1
    finally:
        host.close()
