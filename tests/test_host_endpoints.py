"""The destination endpoint's page writes: ZERO runs skip what a fresh memfd never backed, and only that."""

from __future__ import annotations

import numpy as np

from virtio_lm.host.endpoints import VmDestination
from virtio_lm.memory import PAGE_SIZE, Memory
from virtio_lm.vm.machine import MIB, VirtualMachine, VmSpec


def _dest() -> tuple[VmDestination, Memory]:
    spec = VmSpec(name="d", memory_mib=32)  # no VFs: only guest memory matters here
    mem = Memory(32 * MIB, name="d", backing="memfd")
    return VmDestination(VirtualMachine(spec, mem), pf=None), mem  # type: ignore[arg-type]


def _page(mem: Memory, n: int) -> np.ndarray:
    return mem.array[n * PAGE_SIZE : (n + 1) * PAGE_SIZE]


def test_zero_runs_over_a_fresh_memfd_touch_nothing():
    dst, mem = _dest()
    dst.zero_pages(np.arange(0, mem.num_pages, dtype=np.uint64))
    assert not mem.populated_pages().any()  # not one page was written (or even faulted in)


def test_a_page_sent_with_data_then_as_zero_is_zeroed():
    dst, mem = _dest()
    data = np.full(2 * PAGE_SIZE, 0xAB, dtype=np.uint8)
    dst.write_pages(np.array([3, 9], dtype=np.uint64), data.tobytes())
    assert _page(mem, 3).all() and _page(mem, 9).all()
    dst.zero_pages(np.array([3, 4, 9], dtype=np.uint64))  # a later round found them zero
    assert not _page(mem, 3).any() and not _page(mem, 9).any()


def test_data_already_in_the_shell_memory_is_zeroed_too():
    """Negative control for the skip: memory the shell held before the stream began (not a fresh
    memfd) must not be taken for zero."""
    spec = VmSpec(name="d", memory_mib=32)
    mem = Memory(32 * MIB, name="d", backing="memfd")
    mem.cpu.write(7 * PAGE_SIZE, b"\x55" * PAGE_SIZE)
    dst = VmDestination(VirtualMachine(spec, mem), pf=None)  # type: ignore[arg-type]
    dst.zero_pages(np.array([7], dtype=np.uint64))
    assert not _page(mem, 7).any()


def test_a_vm_without_vfs_switches_over_without_a_pf() -> None:
    """The switch-over steps of a VM with no VFs never reach for a PF (there is none): the
    benches' stream VM migrates this way."""
    from virtio_lm.host.endpoints import VmSource
    from virtio_lm.host.switchover import timed_switchover

    vms = [VirtualMachine(VmSpec(name=n, memory_mib=32, dirty_rate_mbps=1.0), Memory(32 * MIB, name=n, backing="memfd"))
           for n in ("a", "b")]
    try:
        vms[0].boot()
        src, dst = VmSource(vms[0], None), VmDestination(vms[1], None)  # type: ignore[arg-type]
        src.start_tracking()
        src.stop_tracking()
        steps = timed_switchover(src, dst, lambda: vms[1].memory.cpu.write(0, vms[0].memory.read(0, 32 * MIB)))
        assert set(steps) >= {"quiesce", "freeze-save", "restore", "run"}
        assert vms[1].running
    finally:
        for vm in vms:
            vm.close()
