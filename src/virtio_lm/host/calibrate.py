"""Know a switch-over's fixed cost before the first migration: calibrate it on spare VFs.

At start-up a host that has room on its PF makes, for each kind of VM it runs
(its VF kinds, in order), two small scratch VMs on spare VFs: a *source* that
boots and runs the same drivers and workloads with the same queue depths
against a scratch disk image (its net VF has no back-end: nothing reaches the
network), and an incoming *shell*.  It then times the switch-over sequence
of a real migration, with the same control-queue commands of the PF driver:
pause, QUIESCE, FREEZE + SAVE_STATE (blk: the flush), the guest state, FREEZE +
RESTORE_STATE + QUIESCE, the guest state restored, RUN, resume -- everything
but the pages, the network and the final dirty collection, which the
migration measures live (:class:`~virtio_lm.migration.session.SourceSession`
adds them).  No VM of the host is paused for it; the scratch VMs are closed and
their VFs reset (FLR) afterwards.

The result seeds :data:`~virtio_lm.migration.session.SWITCHOVER_HISTORY`, which
every completed migration then refines with what it measured.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, replace

from virtio_lm.drivers.pf_driver import PfDriver
from virtio_lm.host.endpoints import VmDestination, VmSource, vm_stream_config
from virtio_lm.memory import Memory
from virtio_lm.vm.machine import MIB, MIN_MEMORY_MIB, VirtualMachine, VmSpec
from virtio_lm.wire.stream import StreamConfig

log = logging.getLogger(__name__)

__all__ = ["Calibration", "ScratchPair", "scratch_specs"]


def scratch_specs(spec: VmSpec, image: str) -> tuple[VmSpec, VmSpec]:
    """The scratch source and shell for VMs like ``spec`` (same VF kinds and queues)."""
    base = replace(
        spec, memory_mib=MIN_MEMORY_MIB, blk_image=image if spec.blk_image else None, dirty_rate_mbps=1.0,
        sweep_mib=None, fill_mib=0, extra={},
    )
    return replace(base, name=f"calib-{spec.name}-src"), replace(base, name=f"calib-{spec.name}-dst")


@dataclass
class Calibration:
    config: StreamConfig  # the kind of VM (what SWITCHOVER_HISTORY keys on)
    seconds: float  # the timed switch-over
    phases: dict[str, float]
    in_flight: dict[str, int]


class ScratchPair:
    """A scratch source VM and shell on spare VFs (the host's factory creates their devices)."""

    def __init__(self, spec: VmSpec) -> None:
        fd, self.image = tempfile.mkstemp(prefix="virtio-lm-calib-", suffix=".img")
        os.ftruncate(fd, spec.blk_blocks * 4096)
        os.close(fd)
        src_spec, dst_spec = scratch_specs(spec, self.image)
        self.src = VirtualMachine(src_spec, Memory(src_spec.memory_mib * MIB, name=src_spec.name, backing="memfd"))
        self.dst = VirtualMachine(dst_spec, Memory(dst_spec.memory_mib * MIB, name=dst_spec.name, backing="memfd"))

    def run(self, pf: PfDriver, *, settle_s: float = 0.15) -> Calibration:
        """Boot the source, let its I/O get going (bounded by ``settle_s``), time the switch-over."""
        src_vm, dst_vm = self.src, self.dst
        try:
            src_vm.boot()
            deadline = time.monotonic() + settle_s
            want = src_vm.spec.blk_qd if src_vm.blk_work is not None else 0
            while time.monotonic() < deadline and sum(src_vm.requests_in_flight().values()) < want:
                time.sleep(0.002)
            src, dst = VmSource(src_vm, pf), VmDestination(dst_vm, pf)
            c = time.perf_counter
            t = {"start": c()}
            src.pause_vcpus()
            t["pause"] = c()
            src.quiesce_vfs()
            t["quiesce"] = c()
            images = src.freeze_and_save_vfs()
            cpu = src.cpu_state()
            t["freeze-save"] = c()
            # the pages travel with the stream: outside the clock
            dst_vm.memory.cpu.write(0, src_vm.memory.read(0, src_vm.memory.size))
            t1 = c()
            dst.restore_vfs(images)
            dst.set_cpu_state(cpu)
            t["restore"] = c()
            dst.start()
            t["run"] = c()
            phases = {}
            prev = t["start"]
            for k in ("pause", "quiesce", "freeze-save", "restore", "run"):
                if k == "restore":
                    prev = t1
                phases[k] = t[k] - prev
                prev = t[k]
            return Calibration(vm_stream_config(src_vm), sum(phases.values()), phases, dict(src.in_flight.get("vfs", {})))
        finally:
            self.close(pf)

    def close(self, pf: PfDriver) -> None:
        for vm in (self.src, self.dst):
            vm.close()
            for number in vm.vf_numbers.values():
                try:
                    pf.flr_vf(number)
                except Exception:  # noqa: BLE001 - a scratch VF left dirty is logged, not fatal
                    log.exception("calibration: FLR of scratch VF %d failed", number)
        try:
            os.unlink(self.image)
        except OSError:
            pass
