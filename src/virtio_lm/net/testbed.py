"""Assemblies of a net VF for tests, the bench and demos.

A :class:`NetVm` is a VM's guest memory, a virtio-net VF on it (hosted by an
SR-IOV PF built with :func:`virtio_lm.pf.device.build_pf`, or a standalone
function) and the guest's :class:`~virtio_lm.drivers.net_driver.NetDriver`.
:func:`migrate` moves a running VM from one such VF to another through the
PF control path (QUIESCE, FREEZE, SAVE portions / RESTORE portions, guest
memory copy, UNFREEZE, RUN) -- the host PF driver's batched switch-over
(:meth:`~virtio_lm.drivers.pf_driver.PfDriver.freeze_and_save` and its
siblings), through the PF's real control queue -- and hands the guest
driver's bookkeeping over.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from virtio_lm.devices.net import DEFAULT_MAC, NetDevice
from virtio_lm.drivers.net_driver import DEFAULT_WANTED, NetDriver
from virtio_lm.drivers.pf_driver import PfDriver
from virtio_lm.memory import Memory
from virtio_lm.net.backends import NetBackend
from virtio_lm.pci.function import VirtioPciFunction
from virtio_lm.pci.sriov import SriovPF
from virtio_lm.pf.controller import VfMigrationController
from virtio_lm.pf.device import build_pf, vf_commands
from virtio_lm.virtqueue.driver import Allocator
from virtio_lm.wire.ctrl import VfState

GUEST_MEM = 8 << 20
RING_AREA = (0x1000, 0x1FF000)
BUF_AREA = (0x200000, GUEST_MEM - 0x200000)
HOST_MEM = 1 << 20
PF_DRIVER_AREA = (0x1000, HOST_MEM - 0x1000)
SAVE_CHUNK = 4096


@dataclass
class NetVm:
    """One VM's side: guest memory, the VF hosting its NIC, the PF over it, its driver."""

    mem: Memory
    fn: VirtioPciFunction
    dev: NetDevice
    pf: SriovPF | None = None
    host_mem: Memory | None = None
    drv: NetDriver | None = None
    timings: dict[str, float] = field(default_factory=dict)
    pf_driver: PfDriver | None = None  # the host's PF driver, up when the VM has a PF

    @property
    def controller(self) -> VfMigrationController:
        assert self.pf is not None
        return vf_commands(self.pf)

    @property
    def host(self) -> PfDriver:
        assert self.pf_driver is not None, "a VM without a PF has no PF driver"
        return self.pf_driver

    def bring_up(self, wanted: int = DEFAULT_WANTED, *, queue_size: int | None = 128, pairs: int | None = None) -> NetDriver:
        drv = NetDriver(self.fn, self.mem.cpu, ring_alloc=Allocator(*RING_AREA), buf_alloc=Allocator(*BUF_AREA))
        self.fn.on_interrupt = drv.on_interrupt
        self.drv = drv
        drv.bring_up(wanted, queue_size=queue_size, pairs=pairs)
        return drv

    def close(self) -> None:
        self.dev.close()
        if self.pf is not None:
            self.pf.device.close()  # type: ignore[attr-defined]
        self.mem.close()
        if self.host_mem is not None:
            self.host_mem.close()


def make_vm(
    backend: NetBackend | None,
    *,
    mac: bytes = DEFAULT_MAC,
    max_pairs: int = 1,
    without: int = 0,
    name: str = "host",
    with_pf: bool = True,
    queue_max_size: int = 256,
) -> NetVm:
    """A VM with a net VF (VF 1 of a fresh PF when ``with_pf``), not brought up."""
    mem = Memory(GUEST_MEM, name=f"{name}-guest")
    dev = NetDevice(backend, mac=mac, max_pairs=max_pairs, without=without, queue_max_size=queue_max_size)
    if with_pf:
        host_mem = Memory(HOST_MEM, name=f"{name}-pf")
        pf = build_pf(host_mem.device_port(f"{name}-pf"), total_vfs=1, name=f"{name}-pf", threaded=False)
        pfd = PfDriver(pf, host_mem.cpu, Allocator(*PF_DRIVER_AREA), state_portion=SAVE_CHUNK)
        pfd.bring_up()
        (vf,) = pfd.enable_vfs(1, lambda n: (dev, mem.device_port(f"{name}-vf{n}")))
        return NetVm(mem, vf, dev, pf, host_mem, pf_driver=pfd)
    fn = VirtioPciFunction(dev, mem.device_port(f"{name}-vf"), name=f"{name}-vf")
    return NetVm(mem, fn, dev)


def save_image(vm: NetVm, func_id: int = 1) -> bytes:
    """SAVE_STATE portions of a FREEZED VF, through the PF driver."""
    return vm.host.save_image(func_id)


def restore_image(vm: NetVm, image: bytes, func_id: int = 1) -> None:
    """RESTORE_STATE portions into a FREEZED VF, through the PF driver."""
    vm.host.restore_image(func_id, image)


def migrate(
    src: NetVm,
    dst: NetVm,
    *,
    between_quiesce_and_freeze: Callable[[], None] | None = None,
    tamper: Callable[[bytes], bytes] | None = None,
) -> NetDriver:
    """Move the running VM from ``src`` to ``dst``; returns the destination's driver.

    ``tamper`` may rewrite the saved image on its way (negative controls).
    Timings of each step land in ``src.timings`` / ``dst.timings``.
    """
    assert src.drv is not None
    sp, dp = src.host, dst.host

    def timed(vm: NetVm, what: str, f: Callable[[], object]) -> None:
        t = time.perf_counter()
        f()
        vm.timings[what] = time.perf_counter() - t

    timed(src, "quiesce", lambda: sp.set_states([1], VfState.QUIESCED))
    if between_quiesce_and_freeze is not None:
        between_quiesce_and_freeze()
    image = b""

    def freeze_save() -> None:
        nonlocal image
        (image,) = sp.freeze_and_save([1])

    timed(src, "freeze-save", freeze_save)
    if tamper is not None:
        image = tamper(image)
    state = src.drv.save()
    dst.mem.cpu.write(0, src.mem.read(0, src.mem.size))  # the last round of guest memory
    timed(dst, "restore", lambda: dp.restore_and_quiesce([(1, image)]))
    drv = NetDriver.from_state(state, fn=dst.fn, port=dst.mem.cpu)
    dst.fn.on_interrupt = drv.on_interrupt
    dst.drv = drv
    timed(dst, "resume", lambda: dp.set_states([1], VfState.RUNNING))
    return drv
