"""The DMA test device as a third kind of VF: one module and one registry line.

A VM whose spec has ``dmatest`` > 0 carries a DMA test VF
(:class:`~virtio_lm.devices.dmatest.DmaTestDevice`) next to its blk and net
VFs.  Its guest runs :class:`DmaTestWorkload`: ``dmatest`` FILL requests kept
in flight, each asking the device to write the pattern of a fresh seed into a
buffer in guest memory, every completion checked byte for byte against
:func:`~virtio_lm.devices.dmatest.fill_pattern` -- so a device write that a
migration lost shows up as a wrong buffer.  The driver and the workload save
and restore their state through the registry like blk and net
(:mod:`virtio_lm.vm.kinds`); nothing in the VM, the host or the migration
names this kind.

Memory: the driver's rings, headers and buffers live in
``0x0002_0000 .. 0x000F_0000`` (the first MiB is otherwise unused).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from virtio_lm.devices.dmatest import DmaTestDevice, fill_pattern
from virtio_lm.drivers.dmatest_driver import OK, DmaTestDriver, DmaTestDriverState, DmaTestRequest
from virtio_lm.errors import GuestStateError
from virtio_lm.pci.function import VirtioPciFunction
from virtio_lm.virtqueue.driver import Allocator
from virtio_lm.vm import guest_state as gs
from virtio_lm.vm.kinds import DeviceContext, GuestPart, VfKind, register
from virtio_lm.vm.worker import GuestThread
from virtio_lm.vm.workloads import Lcg

if TYPE_CHECKING:
    from virtio_lm.vm.machine import VirtualMachine, VmSpec

__all__ = ["DMATEST", "DmaTestWorkload", "DmaTestWorkloadState"]

AREA = (0x0002_0000, 0x000D_0000)
LENGTH = 4096  # bytes per FILL
MAX_ERRORS = 50
U64 = (1 << 64) - 1
I63 = (1 << 63) - 1


@dataclass(frozen=True)
class DmaTestWorkloadState:
    qd: int
    rate: float
    rng: int
    inflight: tuple[tuple[int, int], ...]  # (token, seed), by token
    fills: int
    errors: tuple[str, ...]


class DmaTestWorkload(GuestThread):
    """FILLs in flight, each completion checked against the pattern of its seed."""

    name = "guest-dmatest"

    def __init__(self, driver: DmaTestDriver, *, qd: int, seed: int = 1, rate: float = 200.0) -> None:
        super().__init__()
        self.driver = driver
        self.qd = qd
        self.rate = rate
        self.rng = Lcg(seed)
        self.inflight: dict[int, int] = {}
        self.fills = 0
        self.errors: list[str] = []
        self._next_at = 0.0

    def _tick(self) -> bool:
        did = self._reap()
        now = time.monotonic()
        while len(self.inflight) < self.qd and (self.rate <= 0 or now >= self._next_at):
            if self.rate > 0:
                self._next_at = max(self._next_at, now) + 1.0 / self.rate
            seed = self.rng.next()
            self.inflight[self.driver.submit_fill(seed, LENGTH)] = seed
            did = True
        return did

    def _pace(self, did: bool, busy: float) -> None:
        if not did:
            self.driver.wait_interrupt(0.002)

    def _wake(self) -> None:
        self.driver.wake()

    def _reap(self) -> bool:
        done = self.driver.reap()
        for c in done:
            seed = self.inflight.pop(c.token, None)
            if seed is None or seed != c.seed:
                self._fail(f"completion of token {c.token} the workload did not submit (or with another seed)")
            elif c.status != OK:
                self._fail(f"FILL {c.token} ended with status {c.status}")
            elif c.data != fill_pattern(seed, LENGTH):
                self._fail(f"FILL {c.token} (seed {seed:#x}): the buffer does not hold the device's pattern")
            else:
                self.fills += 1
        return bool(done)

    def _fail(self, msg: str) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(msg)

    def drain(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.inflight and time.monotonic() < deadline:
            self._reap()
            self.driver.wait_interrupt(0.002)
        if self.inflight:
            self._fail(f"{len(self.inflight)} FILLs still in flight after {timeout} s")

    def save(self) -> DmaTestWorkloadState:
        return DmaTestWorkloadState(self.qd, self.rate, self.rng.state, tuple(sorted(self.inflight.items())),
                                    self.fills, tuple(self.errors))

    @classmethod
    def from_state(cls, st: DmaTestWorkloadState, *, driver: DmaTestDriver, path: str = "dmatest.work") -> "DmaTestWorkload":
        if not 1 <= st.qd <= 1024:
            raise GuestStateError(f"{path}.qd", f"{st.qd} is outside 1..1024")
        if not (math.isfinite(st.rate) and st.rate >= 0):
            raise GuestStateError(f"{path}.rate", f"{st.rate} is not a rate (finite, >= 0)")
        if len(st.errors) > MAX_ERRORS:
            raise GuestStateError(f"{path}.errors", f"{len(st.errors)} errors kept (at most {MAX_ERRORS})")
        inflight = dict(st.inflight)
        if len(inflight) != len(st.inflight) or set(inflight) != driver.outstanding():
            raise GuestStateError(f"{path}.inflight", "the FILLs in flight are not the driver's")
        w = cls(driver, qd=st.qd, rate=st.rate)
        w.rng = Lcg(st.rng)
        w.inflight, w.fills, w.errors = inflight, st.fills, list(st.errors)
        return w


# ============================================================================ the document part
_DRV_KEYS = ("features", "max_len", "queue", "alloc", "requests", "next_token")
_REQ_KEYS = ("token", "seed", "length", "hdr_addr", "data_addr")
_WORK_KEYS = ("qd", "rate", "rng", "inflight", "fills", "errors")


def _save(part: GuestPart) -> dict[str, Any]:
    st: DmaTestDriverState = part.driver.save()
    w: DmaTestWorkloadState = part.workload.save()
    return {
        "driver": {
            "features": st.features, "max_len": st.max_len,
            "queue": gs.queue_to_json(st.queue, "dmatest.driver.queue", validate=False),
            "alloc": gs.allocator_to_json(st.alloc, validate=False),
            "requests": [{"token": r.token, "seed": r.seed, "length": r.length, "hdr_addr": r.hdr_addr,
                          "data_addr": r.data_addr} for r in st.requests],
            "next_token": st.next_token,
        },
        "work": {"qd": w.qd, "rate": w.rate, "rng": w.rng, "inflight": [list(x) for x in w.inflight],
                 "fills": w.fills, "errors": list(w.errors)},
    }


def _driver_state(v: Any, path: str = "dmatest.driver") -> DmaTestDriverState:
    d = gs.expect_object(v, path, _DRV_KEYS)
    alloc = gs.allocator_from_json(d["alloc"], f"{path}.alloc")
    requests = []
    for i, item in enumerate(gs.expect_list(d["requests"], f"{path}.requests")):
        p = f"{path}.requests[{i}]"
        r = gs.expect_object(item, p, _REQ_KEYS)
        requests.append(DmaTestRequest(*(gs.expect_int(r[k], f"{p}.{k}", 0, U64) for k in _REQ_KEYS)))
    return DmaTestDriverState(
        features=gs.expect_int(d["features"], f"{path}.features", 0, U64),
        max_len=gs.expect_int(d["max_len"], f"{path}.max_len", 1, 0xFFFF_FFFF),
        queue=gs.queue_from_json(d["queue"], f"{path}.queue", alloc=alloc),
        alloc=alloc,
        requests=tuple(requests),
        next_token=gs.expect_int(d["next_token"], f"{path}.next_token", 1, I63),
    )


def _work_state(v: Any, path: str = "dmatest.work") -> DmaTestWorkloadState:
    d = gs.expect_object(v, path, _WORK_KEYS)
    inflight = []
    for i, item in enumerate(gs.expect_list(d["inflight"], f"{path}.inflight")):
        pair = gs.expect_list(item, f"{path}.inflight[{i}]")
        if len(pair) != 2:
            raise GuestStateError(f"{path}.inflight[{i}]", f"expected [token, seed], got {len(pair)} items")
        inflight.append((gs.expect_int(pair[0], f"{path}.inflight[{i}][0]", 1, I63),
                         gs.expect_int(pair[1], f"{path}.inflight[{i}][1]", 0, U64)))
    errors = []
    for i, e in enumerate(gs.expect_list(d["errors"], f"{path}.errors")):
        if type(e) is not str or len(e) > 4096:
            raise GuestStateError(f"{path}.errors[{i}]", "expected a string of at most 4096 characters")
        errors.append(e)
    return DmaTestWorkloadState(
        qd=gs.expect_int(d["qd"], f"{path}.qd", 1, 1024),
        rate=gs.expect_number(d["rate"], f"{path}.rate"),
        rng=gs.expect_int(d["rng"], f"{path}.rng", 0, U64),
        inflight=tuple(inflight),
        fills=gs.expect_int(d["fills"], f"{path}.fills", 0, I63),
        errors=tuple(errors),
    )


# ============================================================================ the kind
def _boot(vm: "VirtualMachine", fn: VirtioPciFunction) -> GuestPart:
    drv = DmaTestDriver(fn, vm.memory.cpu, Allocator(*AREA))
    return GuestPart(drv, DmaTestWorkload(drv, qd=vm.spec.dmatest, seed=vm.spec.seed))


def _restore(vm: "VirtualMachine", fn: VirtioPciFunction, driver_doc: Any, work_doc: Any) -> GuestPart:
    drv = DmaTestDriver.from_state(_driver_state(driver_doc), fn=fn, port=vm.memory.cpu)
    return GuestPart(drv, DmaTestWorkload.from_state(_work_state(work_doc), driver=drv))


def _verify(part: GuestPart, disk: bool, arrival: list[str]) -> dict[str, Any]:
    w: DmaTestWorkload = part.workload
    problems = list(arrival)
    if w.crash is not None:
        problems.append(f"workload crashed: {w.crash!r}")
    w.drain()
    problems += w.errors
    return {"passed": not problems, "problems": problems[:20], "fills": w.fills}


def _device(spec: "VmSpec", ctx: DeviceContext) -> DmaTestDevice:
    return DmaTestDevice(max_len=LENGTH)


DMATEST = register(VfKind(
    name="dmatest",
    in_spec=lambda spec: spec.dmatest > 0,
    device=_device,
    boot=_boot,
    save=_save,
    restore=_restore,
    verify=_verify,
    in_flight=lambda part: {"dmatest": len(part.workload.inflight)},
    info=lambda vm, part: {"fills": part.workload.fills, "inflight": len(part.workload.inflight)},
))
