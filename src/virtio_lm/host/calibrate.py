"""Know a switch-over's fixed cost before the first migration: calibrate it on spare VFs.

A host that has room on its PF makes, for each kind of VM it runs (its VF
kinds, in order), a :class:`Calibrator`: two small scratch VMs on spare VFs
with the same drivers, workloads and queue depths, against a scratch disk
image (the net VF has no back-end: nothing reaches the network).  One of
them runs; :meth:`Calibrator.measure` lets it run briefly (its requests get
in flight), then times the switch-over sequence of a real migration to the
other one, with the same control-queue commands of the PF driver: pause,
the guest state, QUIESCE, FREEZE + SAVE_STATE (blk: the flush), the guest
state restored, FREEZE + RESTORE_STATE + QUIESCE, RUN, resume
(:func:`~virtio_lm.host.switchover.timed_switchover`); the total counts the
destination's guest restore as overlapping the source's QUIESCE .. SAVE_STATE,
as it does in a migration.  The pages,
the network and the final dirty collection are left out: the migration
measures those live.  The source's VFs are then reset (FLR), the one now
running is paused until the next measurement, and the next one goes the
other way (ping-pong).  No VM of the host is paused for any of it.

The host measures at start-up (the best of three, before its VMs boot); a
migration measures again at its start when that calibration leaves the
pages less than half of downtime-limit (it may have met a passing load) and
keeps the smaller
(:meth:`~virtio_lm.host.endpoints.VmSource.calibrate_switchover`);
:class:`~virtio_lm.migration.session.SwitchoverHistory` scales it by what
completed migrations measured against their calibration.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, replace

from virtio_lm.drivers.vfio import VfMigration
from virtio_lm.host.endpoints import VmDestination, VmSource, vm_stream_config
from virtio_lm.host.switchover import switchover_seconds, timed_switchover
from virtio_lm.memory import Memory
from virtio_lm.vm.machine import MIB, MIN_MEMORY_MIB, SWEEP_START, VirtualMachine, VmSpec
from virtio_lm.wire.stream import StreamConfig

log = logging.getLogger(__name__)

__all__ = ["Calibration", "Calibrator", "scratch_specs"]

def scratch_specs(spec: VmSpec, image: str) -> tuple[VmSpec, VmSpec]:
    """Two scratch VMs like ``spec`` (same VF kinds and queues), small and nearly idle."""
    base = replace(
        spec, memory_mib=MIN_MEMORY_MIB, blk_image=image if spec.blk_image else None, dirty_rate_mbps=1.0,
        sweep_mib=None, fill_mib=0, extra={},
    )
    return replace(base, name=f"calib-{spec.name}-a"), replace(base, name=f"calib-{spec.name}-b")


@dataclass(frozen=True)
class Calibration:
    config: StreamConfig  # the kind of VM (what SWITCHOVER_HISTORY keys on)
    seconds: float  # the timed switch-over
    phases: dict[str, float]


class Calibrator:
    """Two scratch VMs on spare VFs, switched over back and forth (see the module docstring)."""

    def __init__(self, spec: VmSpec, settle_s: float = 0.03) -> None:
        fd, self.image = tempfile.mkstemp(prefix="virtio-lm-calib-", suffix=".img")
        os.ftruncate(fd, spec.blk_blocks * 4096)
        os.close(fd)
        a_spec, b_spec = scratch_specs(spec, self.image)
        self.vms = [
            VirtualMachine(s, Memory(s.memory_mib * MIB, name=s.name, backing="memfd")) for s in (a_spec, b_spec)
        ]
        self.settle_s = settle_s
        self._running: VirtualMachine | None = None
        self._lock = threading.Lock()
        self.broken: BaseException | None = None
        self.closed = False

    def measure(self, pf: VfMigration) -> Calibration | None:
        """One timed switch-over; None once the calibrator broke (logged) or was closed."""
        with self._lock:
            if self.broken is not None or self.closed:
                return None
            try:
                return self._measure(pf)
            except Exception as exc:  # noqa: BLE001 - the migration goes on without a calibration
                log.exception("switch-over calibration failed; no more calibrations on these spare VFs")
                self.broken = exc
                return None

    def _measure(self, pf: VfMigration) -> Calibration:
        if self._running is None:
            self.vms[0].boot()
            self._running = self.vms[0]
        else:
            self._running.resume()
        src_vm = self._running
        dst_vm = self.vms[1] if src_vm is self.vms[0] else self.vms[0]
        deadline = time.monotonic() + self.settle_s
        want = src_vm.spec.blk_qd if src_vm.workload("blk") is not None else 0
        while time.monotonic() < deadline and sum(src_vm.requests_in_flight().values()) < want:
            time.sleep(0.001)
        src, dst = VmSource(src_vm, pf), VmDestination(dst_vm, pf)
        # the pages the drivers and workloads use (not the vCPU's sweep region): outside the clock
        t = timed_switchover(src, dst, lambda: dst_vm.memory.cpu.write(0, src_vm.memory.read(0, SWEEP_START)))
        dst_vm.pause()  # idle until the next measurement
        for number in src_vm.vf_numbers.values():
            pf.reset(number)  # the old source becomes the next shell
        self._running = dst_vm
        return Calibration(vm_stream_config(src_vm), switchover_seconds(t), t)

    def best_of(self, pf: VfMigration, n: int) -> Calibration | None:
        runs = [c for c in (self.measure(pf) for _ in range(n)) if c is not None]
        return min(runs, key=lambda c: c.seconds) if runs else None

    def close(self, pf: VfMigration | None = None) -> None:
        with self._lock:
            self.closed = True
            for vm in self.vms:
                vm.close()
                if pf is not None:
                    for number in vm.vf_numbers.values():
                        try:
                            pf.reset(number)
                        except Exception:  # noqa: BLE001 - closing: logged, not fatal
                            log.exception("calibration: FLR of scratch VF %d failed", number)
            try:
                os.unlink(self.image)
            except OSError:
                pass
