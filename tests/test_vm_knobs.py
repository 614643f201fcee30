"""The VM's comparison knobs: dirty rate 0 / max, the sweep region, the random fill and its check."""

from __future__ import annotations

import math
import time

import click
import pytest

from virtio_lm.cli import format_rate, parse_rate, parse_vm_spec
from virtio_lm.memory import Memory
from virtio_lm.vm.machine import MIB, SWEEP_START, VirtualMachine, VmSpec


def _vm(**kw) -> VirtualMachine:
    spec = VmSpec(name="k", memory_mib=64, **kw)
    return VirtualMachine(spec, Memory(spec.memory_mib * MIB, name="k", backing="memfd"))


def test_rate_parsing():
    assert parse_rate("0") == 0.0 and parse_rate("max") == math.inf and parse_rate("32.5") == 32.5
    assert format_rate(math.inf) == "max" and parse_rate(format_rate(12.0)) == 12.0
    for bad in ("-1", "inf", "nan", "fast"):
        with pytest.raises(ValueError):
            parse_rate(bad)
    spec = parse_vm_spec("name=a,memory=64,dirty-rate=max,sweep=8,fill=16")
    assert (spec.dirty_rate_mbps, spec.sweep_mib, spec.fill_mib) == (math.inf, 8, 16)
    with pytest.raises(click.BadParameter):
        parse_vm_spec("name=a,memory=64,sweep=40,fill=16")  # 56 MiB > the 48 after the fixed areas


def test_blk_dma_knob():
    assert parse_vm_spec("name=a").blk_dma == "buffered"
    assert parse_vm_spec("name=a,blk-dma=direct").blk_dma == "direct"
    with pytest.raises(click.BadParameter):
        parse_vm_spec("name=a,blk-dma=fast")
    assert parse_vm_spec("name=a").net_tx == "pool" and parse_vm_spec("name=a,net-tx=inline").net_tx == "inline"
    with pytest.raises(click.BadParameter):
        parse_vm_spec("name=a,net-tx=fast")


def test_sweep_and_fill_regions():
    vm = _vm(sweep_mib=8, fill_mib=4)
    assert vm.vcpu.region_start == SWEEP_START and vm.vcpu.region_pages == 8 * MIB // 4096
    assert vm.spec.fill_start == SWEEP_START + 8 * MIB
    vm2 = _vm(fill_mib=4)  # the sweep takes the rest
    assert vm2.vcpu.region_pages == (64 - 4) * MIB // 4096 - SWEEP_START // 4096


@pytest.mark.slow  # 0.3 s or more: out of the one-minute fast subset (CI runs it)
def test_rate_zero_writes_nothing():
    vm = _vm(dirty_rate_mbps=0.0, sweep_mib=4)
    vm.boot()
    try:
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            time.sleep(0.01)
        assert vm.vcpu.pages_written == 0
    finally:
        vm.close()


def test_fill_is_written_non_zero_and_verified_and_a_flipped_byte_is_caught():
    vm = _vm(dirty_rate_mbps=1.0, sweep_mib=4, fill_mib=2)
    vm.boot()
    try:
        start = vm.spec.fill_start
        pages = vm.memory.zero_pages(start // 4096, 2 * MIB // 4096)
        assert not pages.any()  # every fill page holds data
        assert vm.verify(disk=False)["checks"]["memory"]["passed"]
        vm.memory.cpu.write(start + MIB + 5, bytes([vm.memory.array[start + MIB + 5] ^ 0xFF]))  # negative control
        res = vm.verify(disk=False)["checks"]["memory"]
        assert not res["passed"] and any("fill MiB 1" in p for p in res["problems"])
    finally:
        vm.close()
