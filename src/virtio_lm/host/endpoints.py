"""The migration sessions' endpoints over a real VM and the host's VF migration state machine.

:class:`VmSource` and :class:`VmDestination` implement
:class:`~virtio_lm.migration.endpoint.SourceEndpoint` and
:class:`~virtio_lm.migration.endpoint.DestEndpoint`: every VF operation is a
state change of the host's VFIO-style state machine
(:class:`~virtio_lm.drivers.vfio.VfMigration`) or its dirty tracking, whatever
profile the PF speaks underneath (the proposal's control queue or virtio
1.4's admin queue and the platform's IOMMU).  The source goes RUNNING ->
PRE_COPY when tracking starts, PRE_COPY_P2P at the switch-over, STOP_COPY
for the images; the destination goes RESUMING when the stream's
configuration is accepted, RUNNING_P2P with the images, RUNNING on COMMIT.  The stream names
a VF by its index in the VM (0 = blk, 1 = net, as :attr:`VmSpec.vf_kinds`
orders them), never by its VF number, which differs between hosts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Callable, Iterator

import numpy as np

from virtio_lm.drivers.vfio import MigState, VfMigration
from virtio_lm.errors import VirtioLmError
from virtio_lm.memory import PAGE_SHIFT, PAGE_SIZE, Writer
from virtio_lm.migration.endpoint import VfImage
from virtio_lm.vm.machine import VirtualMachine
from virtio_lm.wire.ctrl import TrackMode
from virtio_lm.wire.stream import StreamConfig, VfConfig

log = logging.getLogger(__name__)

WORKLOAD_KIND = "virtio-lm page-sweep v1"


def vm_stream_config(vm: VirtualMachine) -> StreamConfig:
    vfs = []
    for index, kind in enumerate(vm.spec.vf_kinds):
        fn = vm.vfs[kind]
        vfs.append(VfConfig(index, fn.device.device_id, fn.offered_features(), fn.negotiated))
    return StreamConfig(memory_size=vm.memory.size, page_size=PAGE_SIZE, vfs=tuple(vfs), workload=WORKLOAD_KIND)


_PROBE = np.array([0, 1, 67, 200, 333, 450, 511])  # uint64 words of a page probed before a full check


def _one_run(idx: np.ndarray) -> bool:
    """Whether sorted page numbers ``idx`` are one contiguous run (one slice serves them)."""
    return bool(len(idx)) and idx[-1] - idx[0] == len(idx) - 1


class _Steps:
    """Wall time of each switch-over step, in ms (query-migrate ``x-switchover-steps``)."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] = round(self.ms.get(name, 0.0) + (time.perf_counter() - t0) * 1000, 3)


class _VfCalls:
    """Per endpoint step that talks to the VFs: control commands issued and wall ms
    (query-migrate ``x-vf-migration``; the profiles bench compares them)."""

    def __init__(self, mig: VfMigration | None) -> None:
        self.mig = mig
        self.calls: dict[str, dict[str, float]] = {}
        self.image_bytes = 0  # device state the source saved / the destination loaded
        self.pre_copy_bytes = 0  # device data read during pre-copy (virtio-1.4: the parts)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        c0 = self.mig.commands() if self.mig is not None else 0
        t0 = time.perf_counter()
        try:
            yield
        finally:
            rec = self.calls.setdefault(name, {"commands": 0, "ms": 0.0})
            rec["commands"] += (self.mig.commands() - c0) if self.mig is not None else 0
            rec["ms"] = round(rec["ms"] + (time.perf_counter() - t0) * 1000, 3)

    def report(self) -> dict[str, object]:
        return {
            "profile": self.mig.profile if self.mig is not None else None,
            "calls": {k: dict(v) for k, v in self.calls.items()},
            "commands": sum(int(v["commands"]) for v in self.calls.values()),
            "image-bytes": self.image_bytes,
            "pre-copy-bytes": self.pre_copy_bytes,
        }


def _pages_view(vm: VirtualMachine) -> np.ndarray:
    return vm.memory.array.reshape(vm.memory.num_pages, PAGE_SIZE)


class VmSource:
    """The VM being migrated away."""

    def __init__(
        self,
        vm: VirtualMachine,
        pf: VfMigration,
        *,
        mode: TrackMode = TrackMode.PULL_BITMAP,
        device_tracking: bool = True,
        dma_footprint_mib: int = 0,
        on_release: Callable[[], None] | None = None,
        calibrator: Callable[[], object] | None = None,
    ) -> None:
        self.vm = vm
        self.pf = pf
        self.calibrator = calibrator  # -> a host.calibrate.Calibration or None
        self.mode = TrackMode(mode)
        self.device_tracking = device_tracking
        #: the alternative to device tracking: no VF DMA is tracked, and at the switch-over
        #: (after the VFs are QUIESCED) every page of the VFs' DMA window -- at least
        #: ``dma_footprint_mib`` MiB, see VirtualMachine.dma_window_pages -- is taken as dirty
        self.dma_window = vm.dma_window_pages(dma_footprint_mib) if dma_footprint_mib and not device_tracking else None
        #: pages the DMA window added to the final dirty set (query-migrate ``x-dma-footprint-pages``)
        self.footprint_pages = 0
        self._quiesced = False
        self.on_release = on_release
        self._tracking: list[int] = []
        self.vf_numbers = [vm.vf_numbers[k] for k in vm.spec.vf_kinds]
        #: I/O in flight at the switch-over (query-migrate ``x-in-flight``):
        #: ``guest`` -- requests the guest had submitted and not yet seen complete
        #: when its vCPUs paused; ``vfs`` -- chains each VF held (taken, not
        #: returned) once QUIESCED, by kind.
        self.in_flight: dict[str, dict[str, int]] = {}
        #: pages each VF reported dirty, summed over every collection, by kind
        #: (query-migrate ``x-device-dirty-pages``)
        self.device_dirty: dict[str, int] = {}
        self._kind_of = {vm.vf_numbers[k]: k for k in vm.spec.vf_kinds}
        self.steps = _Steps()
        self.vf_calls = _VfCalls(pf if self.vf_numbers else None)

    @property
    def num_pages(self) -> int:
        return self.vm.memory.num_pages

    def config(self) -> StreamConfig:
        return vm_stream_config(self.vm)

    def start_tracking(self) -> None:
        self.vm.memory.cpu.writer.log.start()
        if self.device_tracking and self.vf_numbers:
            with self.vf_calls("start-tracking"):
                self.pf.start_dirty_tracking(self.vf_numbers, self.mode)
            for vf in self.vf_numbers:
                self._tracking.append(vf)
                self.device_dirty[self._kind_of[vf]] = 0
        self.start_pre_copy()

    def start_pre_copy(self) -> None:
        """VFIO's PRE_COPY (the 1.4 back-end reads the device parts now; the seed's has no
        pre-copy data)."""
        if self.vf_numbers and self.pf.state(self.vf_numbers[0]) is MigState.RUNNING:
            with self.vf_calls("pre-copy"):
                data = self.pf.set_states(list(self.vf_numbers), MigState.PRE_COPY)
            self.vf_calls.pre_copy_bytes += sum(len(d) for d in data or [])

    @property
    def tracking_name(self) -> str | None:
        """The dirty tracking VF DMA goes through (None: none -- the negative control)."""
        return self.pf.tracking_name(self.mode) if self.device_tracking and self.pf is not None else None

    def collect_dirty(self) -> np.ndarray:
        dirty = self.vm.memory.cpu.writer.log.collect()
        for vf in self._tracking:
            with self.vf_calls("collect-dirty"):
                reported = self.pf.collect_dirty(vf)
            kind = self._kind_of[vf]
            self.device_dirty[kind] = self.device_dirty.get(kind, 0) + int(np.count_nonzero(reported))
            dirty |= reported
        if self._quiesced and self.dma_window is not None:
            first, end = self.dma_window
            dirty[first:end] = True
            self.footprint_pages = end - first
        return dirty

    def zero_mask(self, page_numbers: np.ndarray) -> np.ndarray:
        words = _pages_view(self.vm).view(np.uint64)
        idx = np.asarray(page_numbers, dtype=np.int64)
        # a few words of each page first: a page with data shows it there almost always,
        # so only the pages that look zero are read whole
        zero = ~words[idx[:, None], _PROBE].any(axis=1)
        cand = idx[zero]
        if len(cand):
            if _one_run(cand):  # checked in place
                zero[zero] = ~words[cand[0] : cand[-1] + 1].any(axis=1)
            else:
                zero[zero] = ~words[cand].any(axis=1)
        return zero

    def read_pages(self, page_numbers: np.ndarray) -> bytes | memoryview:
        idx = np.asarray(page_numbers, dtype=np.int64)
        mem = self.vm.memory
        if _one_run(idx):
            return mem.read(int(idx[0]) << PAGE_SHIFT, len(idx) << PAGE_SHIFT)
        return _pages_view(self.vm)[idx].tobytes()

    def set_throttle(self, percent: int) -> None:
        self.vm.set_throttle(percent)

    def calibrate_switchover(self) -> tuple[float, float] | None:
        """Time a scratch switch-over on the host's spare VFs now (host/calibrate.py):
        (seconds, of which the destination's restore)."""
        if self.calibrator is None:
            return None
        with self.steps("calibration"):
            cal = self.calibrator()
        return None if cal is None else (cal.seconds, cal.phases.get("restore", 0.0))

    def prepare_switchover(self) -> None:
        """Write the disk images back while the guest still runs (the host's own fd on the
        shared storage; the device's FREEZE flush then has only the last writes left)."""
        with self.steps("prepare-flush"):
            for path in self.vm.disk_images():
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)

    def pause_vcpus(self) -> None:
        with self.steps("pause"):
            self.vm.pause()
        self.in_flight = {"guest": self.vm.requests_in_flight()}

    def quiesce_vfs(self) -> None:
        with self.steps("quiesce-vfs"):
            if self.vf_numbers:  # (a VM without VFs has no PF to talk to)
                with self.vf_calls("quiesce"):
                    self.pf.set_states(list(self.vf_numbers), MigState.PRE_COPY_P2P)
        self._quiesced = True
        self.in_flight["vfs"] = {
            kind: int(getattr(self.vm.vfs[kind].device, "in_flight", 0)) for kind in self.vm.spec.vf_kinds
        }

    def freeze_and_save_vfs(self) -> list[VfImage]:
        with self.steps("freeze-save-vfs"):
            with self.vf_calls("save"):
                images = self.pf.set_states(list(self.vf_numbers), MigState.STOP_COPY) if self.vf_numbers else []
        self.vf_calls.image_bytes += sum(len(i) for i in images or [])
        return list(enumerate(images or []))

    def stop_tracking(self) -> None:
        with self.steps("stop-tracking"):
            vfs, self._tracking = list(self._tracking), []
            if vfs:
                with self.vf_calls("stop-tracking"):
                    self.pf.stop_dirty_tracking(vfs)
            self.vm.memory.cpu.writer.log.stop()

    def cpu_state(self) -> bytes:
        with self.steps("guest-state"):
            return self.vm.guest_state()

    def rollback(self) -> None:
        """Whatever step failed, put every VF back to RUNNING and the VM back to running."""
        if self.vf_numbers:
            try:
                self.pf.recover(list(self.vf_numbers), MigState.RUNNING)
            except VirtioLmError:
                log.exception("rollback of VFs %s failed", self.vf_numbers)
                raise
        for vf in list(self._tracking):
            try:
                self.pf.stop_dirty_tracking([vf])
            except VirtioLmError:
                log.warning("VF %d: stopping dirty tracking refused during rollback", vf)
            self._tracking.remove(vf)
        self.vm.memory.cpu.writer.log.stop()
        self._quiesced = False
        self.vm.resume()

    def release(self) -> None:
        """The destination runs the VM: stop the guest here for good and reset its VFs."""
        self.vm.close()
        for vf in self.vf_numbers:
            self.pf.reset(vf)
        if self.on_release is not None:
            self.on_release()


class VmDestination:
    """The VM shell receiving a migration: memory, its VFs in INIT, no guest running."""

    def __init__(
        self,
        vm: VirtualMachine,
        pf: VfMigration,
        *,
        on_start: Callable[[], None] | None = None,
        restore_delay: float = 0.0,
    ) -> None:
        self.vm = vm
        self.pf = pf
        self.on_start = on_start
        self.restore_delay = restore_delay  # test knob (x-restore-delay-ms): hold the source in 'device'
        self.vf_numbers = [vm.vf_numbers[k] for k in vm.spec.vf_kinds]
        self.steps = _Steps()
        self.vf_calls = _VfCalls(pf if self.vf_numbers else None)
        self._writer = Writer(f"{vm.spec.name}.incoming")  # the hypervisor's writes: nobody tracks them
        # pages that may hold data (None: not looked yet).  A fresh memfd is all holes,
        # so ZERO runs write nothing there: touching fresh memory costs more than the
        # network (QEMU skips zero pages on a fresh destination too).
        self._maybe_data: np.ndarray | None = None

    def _may_hold_data(self) -> np.ndarray:
        if self._maybe_data is None:
            self._maybe_data = self.vm.memory.populated_pages()
        return self._maybe_data

    def check_config(self, cfg: StreamConfig) -> str | None:
        mine = vm_stream_config(self.vm)
        if cfg.page_size != mine.page_size:
            return f"page size {cfg.page_size} != {mine.page_size}"
        if cfg.memory_size != mine.memory_size:
            return f"guest memory {cfg.memory_size} bytes != {mine.memory_size} bytes here"
        if cfg.workload != mine.workload:
            return f"workload {cfg.workload!r} != {mine.workload!r}"
        if len(cfg.vfs) != len(mine.vfs):
            return f"{len(cfg.vfs)} VFs in the stream, {len(mine.vfs)} here"
        for theirs, ours in zip(cfg.vfs, mine.vfs):
            if theirs.device_id != ours.device_id:
                return f"VF {theirs.index}: device type {theirs.device_id} != {ours.device_id} here"
            if theirs.offered_features != ours.offered_features:
                return (
                    f"VF {theirs.index}: offered features {theirs.offered_features:#x} != "
                    f"{ours.offered_features:#x} here"
                )
            if theirs.negotiated_features & ~ours.offered_features:
                return f"VF {theirs.index}: negotiated features not offered here"
        for vf in self.vf_numbers:
            why = self.pf.fresh(vf)
            if why is not None:
                return why
        try:
            self.prepare_vfs()
        except VirtioLmError as exc:  # refused like any configuration this host cannot take
            return f"the VFs here could not enter RESUMING: {exc}"
        return None

    def prepare_vfs(self) -> None:
        """VFIO's RESUMING before any data arrives (QEMU enters it when the incoming
        migration is set up): the 1.4 back-end creates its SET objects here, the seed's
        VFs go FREEZED -- outside the switch-over."""
        if self.vf_numbers and self.pf.state(self.vf_numbers[0]) is not MigState.RESUMING:
            with self.vf_calls("prepare"):
                self.pf.set_states(list(self.vf_numbers), MigState.RESUMING)

    def write_pages(self, page_numbers: np.ndarray, data: bytes | memoryview) -> None:
        idx = np.asarray(page_numbers, dtype=np.int64)
        mem = self.vm.memory
        self._may_hold_data()[idx] = True
        if _one_run(idx):
            mem.write(int(idx[0]) << PAGE_SHIFT, data, self._writer)
            return
        src = np.frombuffer(data, dtype=np.uint8).reshape(len(idx), PAGE_SIZE)
        with mem.modify(0, mem.size, self._writer) as view:
            view.reshape(mem.num_pages, PAGE_SIZE)[idx] = src

    def zero_pages(self, page_numbers: np.ndarray) -> None:
        idx = np.asarray(page_numbers, dtype=np.int64)
        maybe = self._may_hold_data()
        idx = idx[maybe[idx]]  # the others read as zero already
        if not len(idx):
            return
        mem = self.vm.memory
        if _one_run(idx):
            mem.fill(int(idx[0]) << PAGE_SHIFT, len(idx) << PAGE_SHIFT, 0, self._writer)
        else:
            with mem.modify(0, mem.size, self._writer) as view:
                view.reshape(mem.num_pages, PAGE_SIZE)[idx] = 0
        maybe[idx] = False

    def restore_vfs(self, images: list[VfImage]) -> None:
        if sorted(i for i, _ in images) != list(range(len(self.vf_numbers))):
            raise VirtioLmError(f"images for VFs {sorted(i for i, _ in images)}, expected 0..{len(self.vf_numbers) - 1}")
        if self.restore_delay > 0:
            time.sleep(self.restore_delay)
        with self.steps("restore-vfs"):  # leaving RESUMING loads each image; RUNNING_P2P: not yet running
            if images:
                self.prepare_vfs()
                order = sorted(images)
                self.vf_calls.image_bytes += sum(len(img) for _, img in order)
                with self.vf_calls("restore"):
                    self.pf.set_states([self.vf_numbers[i] for i, _ in order], MigState.RUNNING_P2P,
                                       images=[img for _, img in order])

    def set_cpu_state(self, data: bytes) -> None:
        with self.steps("guest-state"):
            self.vm.restore_guest_state(data)

    def start(self) -> None:
        with self.steps("run-vfs"):
            if self.vf_numbers:
                with self.vf_calls("run"):
                    self.pf.set_states(list(self.vf_numbers), MigState.RUNNING)
        with self.steps("resume"):
            self.vm.resume()
        if self.on_start is not None:
            self.on_start()

    def abort(self) -> None:
        """Forget everything received: VFs back to INIT, guest memory zero, nothing runs."""
        self.vm.pause()
        for vf in self.vf_numbers:
            self.pf.reset(vf)
        mem = self.vm.memory
        mem.fill(0, mem.size, 0, self._writer)
        self._maybe_data = np.zeros(mem.num_pages, dtype=bool)
