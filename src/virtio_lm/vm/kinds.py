"""The kinds of VF a VM can carry: one registry, one entry per kind.

A :class:`VfKind` says everything that is particular to one kind of VF --
whether a VM's spec asks for it, the device model its host builds, the guest
driver and verifying workload the VM runs on it, how those save and restore
their state inside CPU_STATE (their part of the guest document), what the
guest checks after a migration, and what it counts as in flight.  The VM, the
host and the migration endpoints go through :data:`KINDS` and never name a
kind; the order of :data:`KINDS` is the VFs' index order in the stream.

Adding a kind is a module with its driver, workload and codec, plus one
:func:`register` call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from virtio_lm.drivers.blk_driver import BlkDriver
from virtio_lm.drivers.net_driver import NetDriver
from virtio_lm.errors import GuestStateError, VirtioLmError
from virtio_lm.pci.function import VirtioPciFunction
from virtio_lm.vm import guest_state as gs
from virtio_lm.vm.workloads import BlkWorkload, NetWorkload
from virtio_lm.wire.net import format_mac, parse_mac

if TYPE_CHECKING:  # the VM module imports this one
    from virtio_lm.vm.machine import VirtualMachine, VmSpec

__all__ = ["DeviceContext", "GuestPart", "KINDS", "VfKind", "kinds_of", "register"]

Json = Any


@dataclass(frozen=True)
class DeviceContext:
    """What a host knows when it builds a VF's device model: the L2 switch the net back-ends
    join (None: none) and the address to bind them to, and whether the VF is a scratch one
    of the calibration (no network)."""

    switch: tuple[str, int] | None = None
    bind: str = "127.0.0.1"
    scratch: bool = False


@dataclass
class GuestPart:
    """The guest software on one VF: its driver and the workload that uses it."""

    driver: Any
    workload: Any


@dataclass(frozen=True)
class VfKind:
    name: str
    in_spec: Callable[["VmSpec"], bool]
    device: Callable[["VmSpec", DeviceContext], Any]
    boot: Callable[["VirtualMachine", VirtioPciFunction], GuestPart]
    save: Callable[[GuestPart], dict[str, Json]]
    restore: Callable[["VirtualMachine", VirtioPciFunction, Json, Json], GuestPart]
    verify: Callable[[GuestPart, bool, list[str]], dict[str, Any]]
    in_flight: Callable[[GuestPart], dict[str, int]]
    info: Callable[["VirtualMachine", GuestPart], dict[str, Any]]
    disk_image: Callable[["VmSpec"], str | None] = lambda spec: None
    #: called for every part once all of a restored guest state was accepted (hook interrupts)
    attach: Callable[[GuestPart, VirtioPciFunction], None] = lambda part, fn: None


#: every kind, in stream index order
KINDS: dict[str, VfKind] = {}


def register(kind: VfKind) -> VfKind:
    if kind.name in KINDS:
        raise ValueError(f"VF kind {kind.name!r} registered twice")
    KINDS[kind.name] = kind
    return kind


def kinds_of(spec: "VmSpec") -> list[str]:
    """The VF kinds ``spec`` asks for, in stream index order."""
    return [k.name for k in KINDS.values() if k.in_spec(spec)]


# ============================================================================ blk
def _blk_device(spec: "VmSpec", ctx: DeviceContext) -> Any:
    from virtio_lm.devices.blk import BlkDevice

    assert spec.blk_image is not None
    dev = BlkDevice(spec.blk_image, num_queues=2)
    dev.direct_dma = spec.blk_dma == "direct"
    return dev


def _blk_workload(vm: "VirtualMachine", drv: BlkDriver) -> BlkWorkload:
    from virtio_lm.vm.machine import CACHE_ADDR, META_ADDR

    s = vm.spec
    return BlkWorkload(drv, vm.memory, meta_addr=META_ADDR, cache_addr=CACHE_ADDR, nblocks=s.blk_blocks,
                       qd=s.blk_qd, seed=s.seed, rate=s.blk_rate)


def _blk_boot(vm: "VirtualMachine", fn: VirtioPciFunction) -> GuestPart:
    from virtio_lm.vm.machine import BLK_AREA
    from virtio_lm.virtqueue.driver import Allocator

    drv = BlkDriver(fn, vm.memory.cpu, Allocator(*BLK_AREA))
    return GuestPart(drv, _blk_workload(vm, drv))


def _blk_save(part: GuestPart) -> dict[str, Json]:
    return {"driver": gs.blk_state_to_json(part.driver.save(), validate=False),
            "work": gs.blk_work_to_json(part.workload.save())}


def _blk_restore(vm: "VirtualMachine", fn: VirtioPciFunction, driver_doc: Json, work_doc: Json) -> GuestPart:
    from virtio_lm.vm.machine import CACHE_ADDR, META_ADDR

    drv = BlkDriver.from_state(gs.blk_state_from_json(driver_doc), fn=fn, port=vm.memory.cpu)
    wst = gs.blk_work_from_json(work_doc)
    if (wst.nblocks, wst.meta_addr, wst.cache_addr) != (vm.spec.blk_blocks, META_ADDR, CACHE_ADDR):
        raise GuestStateError("blk.work", "layout differs from this VM's")
    return GuestPart(drv, BlkWorkload.from_state(wst, driver=drv, memory=vm.memory))


def _blk_verify(part: GuestPart, disk: bool, arrival: list[str]) -> dict[str, Any]:
    w = part.workload
    problems = list(arrival) + [f"on arrival: {p}" for p in w.arrival_check()[:20]]
    if w.crash is not None:
        problems.append(f"workload crashed: {w.crash!r}")
    try:
        w.drain()
    except VirtioLmError as exc:
        problems.append(str(exc))
    problems += w.errors
    problems += w.verify_cache()
    if disk and not problems:
        problems += w.verify_disk()
    return {"passed": not problems, "problems": problems[:20], "stats": dict(w.stats)}


BLK = register(VfKind(
    name="blk",
    in_spec=lambda spec: bool(spec.blk_image),
    device=_blk_device,
    boot=_blk_boot,
    save=_blk_save,
    restore=_blk_restore,
    verify=_blk_verify,
    in_flight=lambda part: {"blk": len(part.workload.inflight)},
    info=lambda vm, part: dict(part.workload.stats, inflight=len(part.workload.inflight)),
    disk_image=lambda spec: spec.blk_image,
))


# ============================================================================ net
def _net_device(spec: "VmSpec", ctx: DeviceContext) -> Any:
    from virtio_lm.devices.net import NetDevice
    from virtio_lm.net.backends import UdpSwitchPort

    assert spec.net_mac is not None
    backend = None
    if ctx.switch and not ctx.scratch:
        backend = UdpSwitchPort(ctx.switch, name=f"{spec.name}.net", host=ctx.bind)
    dev = NetDevice(backend, mac=parse_mac(spec.net_mac))
    dev.inline_max = 2048 if spec.net_tx == "inline" else 0
    return dev


def _net_boot(vm: "VirtualMachine", fn: VirtioPciFunction) -> GuestPart:
    from virtio_lm.vm.machine import NET_BUF_AREA, NET_RING_AREA
    from virtio_lm.virtqueue.driver import Allocator

    drv = NetDriver(fn, vm.memory.cpu, ring_alloc=Allocator(*NET_RING_AREA), buf_alloc=Allocator(*NET_BUF_AREA))
    fn.on_interrupt = drv.on_interrupt
    drv.bring_up()
    s = vm.spec
    assert s.net_mac is not None
    return GuestPart(drv, NetWorkload(drv, mac=parse_mac(s.net_mac), peer_mac=parse_mac(s.peer_mac), rate=s.net_rate))


def _net_save(part: GuestPart) -> dict[str, Json]:
    return {"driver": gs.net_state_to_json(part.driver.save(), validate=False),
            "work": gs.net_work_to_json(part.workload.save())}


def _net_restore(vm: "VirtualMachine", fn: VirtioPciFunction, driver_doc: Json, work_doc: Json) -> GuestPart:
    s = vm.spec
    assert s.net_mac is not None
    drv = NetDriver.from_state(gs.net_state_from_json(driver_doc), fn=fn, port=vm.memory.cpu)
    work = NetWorkload.from_state(gs.net_work_from_json(work_doc), driver=drv,
                                  mac=parse_mac(s.net_mac), peer_mac=parse_mac(s.peer_mac))
    return GuestPart(drv, work)


def _net_verify(part: GuestPart, disk: bool, arrival: list[str]) -> dict[str, Any]:
    n = part.workload
    st = n.stats()
    problems = list(arrival) + ([f"workload crashed: {n.crash!r}"] if n.crash is not None else [])
    if st["rx-duplicates"]:
        problems.append(f"{st['rx-duplicates']} duplicate frames received from the peer")
    return {"passed": not problems, "problems": problems, "stats": st, "received": n.received_runs()}


def _net_info(vm: "VirtualMachine", part: GuestPart) -> dict[str, Any]:
    out = part.workload.stats()
    if vm.spec.net_mac:
        out["mac"] = format_mac(parse_mac(vm.spec.net_mac))
    return out


NET = register(VfKind(
    name="net",
    in_spec=lambda spec: bool(spec.net_mac),
    device=_net_device,
    boot=_net_boot,
    save=_net_save,
    restore=_net_restore,
    verify=_net_verify,
    in_flight=lambda part: {"net-tx": part.driver.tx_in_flight()},
    info=_net_info,
    attach=lambda part, fn: setattr(fn, "on_interrupt", part.driver.on_interrupt),
))


# ============================================================================ more kinds: one module each
from virtio_lm.vm import dmatest_kind  # noqa: E402,F401 - registers "dmatest"
