"""A host: one PF with VFs, its PF driver, the VMs placed on it, and a QMP monitor.

A host process owns host memory for its PF driver, one SR-IOV PF
(:func:`~virtio_lm.pf.device.build_pf`, of the configured profile) brought up by a
:class:`~virtio_lm.drivers.pf_driver.PfDriver` (seed) or an
:class:`~virtio_lm.drivers.admin_driver.AdminDriver` (virtio-1.4), the VF
migration state machine over it (:class:`~virtio_lm.drivers.vfio.VfMigration`), and the VMs of its
configuration.  Like QEMU, both ends of a migration are started with the
same VM configuration; the destination's VMs start as shells (``incoming``):
memory allocated, VFs created in INIT, no guest running, until
``migrate-incoming`` receives them.  VFs of every VM live on the one PF:
migrating one VM touches only that VM's VFs.

QMP commands (QEMU's names and units where QEMU has the command; ``vm``
selects a VM where a host has several, default the first)::

    query-status            {status, running}  (running, paused, inmigrate,
                            finish-migrate, postmigrate, shutdown)
    stop / cont             pause / resume the VM's vCPUs and workloads
    migrate                 {uri: "tcp:H:P" | "file:PATH", vm?}
    migrate-incoming        {uri, vm?}   (tcp port 0: query-migrate shows the port)
    query-migrate           {vm?}        QEMU's fields + downtime-phases, socket-address,
                            source: x-in-flight (I/O in flight at the switch-over),
                            x-tracking-mode, x-device-dirty-pages (pages each VF reported),
                            x-device-profile; both sides: x-vf-migration (per VF step,
                            control commands and ms; device state bytes)
    migrate-set-parameters  downtime-limit, max-bandwidth, cpu-throttle-initial,
                            cpu-throttle-increment, max-cpu-throttle,
                            x-tracking-mode, x-report-portion, x-state-portion,
                            x-device-tracking, x-dma-footprint-mib (without device
                            tracking: every page of the VFs' DMA window, at least
                            this many MiB, is taken as dirty at the switch-over),
                            x-auto-converge, x-max-rounds, x-restore-delay-ms
                            (destination test knob: wait before RESTORE_STATE,
                            holding the source in status 'device'), x-device-profile
                            (the PF's profile, "seed" or "virtio-1.4": chosen at
                            start-up with --profile; another value is refused)
    query-migrate-parameters
    migrate_cancel
    x-migrate-resolve       {vm?, run?}: settle a migration whose status is 'commit-unknown'
                            (the link failed after COMMIT): the VM's lease decides on each
                            side (run: the operator's word, only for a VM without a lease);
                            answers {run: source|destination, status}
    query-vfs               every VF of the PF: VM, kind, profile, mig-state (the host's
                            VFIO-style state), state (the device's), tracking, counters
    query-vms               every VM: run state, vCPU, workload counters
    x-vm-verify             {vm?, disk?}: the guest checks memory, disk, network
    quit
Events: MIGRATION {status}, MIGRATION_PASS {pass}, STOP, RESUME.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from virtio_lm.addr import MIGRATION_SCHEMES, parse_address
from virtio_lm.drivers.admin_driver import AdminDriver
from virtio_lm.drivers.pf_driver import PfDriver
from virtio_lm.drivers.vfio import VfMigration
from virtio_lm.drivers.vfio_backends import backend_for
from virtio_lm.errors import MigrationStateError, QmpError, VirtioLmError
from virtio_lm.host.calibrate import Calibrator
from virtio_lm.host.endpoints import VmDestination, VmSource
from virtio_lm.host.qmp import CommandTable, QmpServer
from virtio_lm.memory import Memory
from virtio_lm.migration.lease import MAX_HOLDER, FileLease, lease_path
from virtio_lm.migration.policy import MigrationParams
from virtio_lm.migration.session import (
    SWITCHOVER_HISTORY,
    DestSession,
    MigrationEvent,
    PassEvent,
    SourceSession,
    VmStateEvent,
)
from virtio_lm.migration.transport import start_incoming, start_outgoing
from virtio_lm.pf.device import Profile, build_pf, vf_monitor_status as vf_status
from virtio_lm.virtqueue.driver import Allocator
from virtio_lm.vm.kinds import KINDS, DeviceContext
from virtio_lm.vm.machine import MIB, VirtualMachine, VmSpec
from virtio_lm.vm.worker import THREADS
from virtio_lm.wire.ctrl import TrackMode

log = logging.getLogger(__name__)

HOST_MEMORY = 64 * MIB
GUEST_THREADS_PER_VM = 3  # vCPU, blk workload, net workload
PF_DRIVER_AREA = (0x10_0000, HOST_MEMORY - 0x10_0000)
TERMINAL = ("completed", "failed", "cancelled")
# once a session is final its runner only passes the last events on and closes its
# channel (file, socket, listener): how long a command waits for that before answering
SETTLE_TIMEOUT = 10.0


@dataclass
class HostConfig:
    name: str = "host"
    qmp: str = "tcp:127.0.0.1:0"
    vms: list[VmSpec] = field(default_factory=list)
    switch: tuple[str, int] | None = None
    incoming: bool = False
    total_vfs: int = 16
    calibrate: bool = True  # time a scratch switch-over on spare VFs at start-up (host/calibrate.py)
    profile: str = "seed"  # the PF's migration control plane: "seed" (the proposal) or "virtio-1.4"


@dataclass
class Params:
    """migrate-set-parameters state (QEMU names; x- for ours)."""

    downtime_limit: int = 300
    max_bandwidth: int = 0
    cpu_throttle_initial: int = 20
    cpu_throttle_increment: int = 10
    max_cpu_throttle: int = 99
    x_tracking_mode: str = "pull-bitmap"
    x_report_portion: int = 64 << 10
    x_state_portion: int = 16 << 10
    x_device_tracking: bool = True
    x_dma_footprint_mib: int = 0
    x_auto_converge: bool = True
    x_max_rounds: int = 100
    x_restore_delay_ms: int = 0
    x_device_profile: str = "seed"  # the PF's (read-only: a PF's profile is chosen when the host starts)

    def to_qmp(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in vars(self).items()}

    def migration_params(self) -> MigrationParams:
        p = MigrationParams(
            downtime_limit_ms=self.downtime_limit,
            max_bandwidth=self.max_bandwidth,
            auto_converge=self.x_auto_converge,
            cpu_throttle_initial=self.cpu_throttle_initial,
            cpu_throttle_increment=self.cpu_throttle_increment,
            max_cpu_throttle=self.max_cpu_throttle,
            max_rounds=self.x_max_rounds,
        )
        p.check()
        return p


PARAM_SCHEMA = {
    "*downtime-limit": "uint64",
    "*max-bandwidth": "uint64",
    "*cpu-throttle-initial": "int",
    "*cpu-throttle-increment": "int",
    "*max-cpu-throttle": "int",
    "*x-tracking-mode": ("push-bitmap", "push-bytemap", "pull-bitmap", "pull-bytemap"),
    "*x-report-portion": "uint64",
    "*x-state-portion": "uint64",
    "*x-device-tracking": "bool",
    "*x-dma-footprint-mib": "uint64",
    "*x-auto-converge": "bool",
    "*x-max-rounds": "int",
    "*x-restore-delay-ms": "uint64",
    "*x-device-profile": ("seed", "virtio-1.4"),
}


class Slot:
    """One VM on this host and its migration, if any."""

    def __init__(self, vm: VirtualMachine, lease: FileLease | None = None) -> None:
        self.vm = vm
        self.lease = lease  # beside the disk image (migration/lease.py); None: the VM has no disk
        self.status = "paused"
        self.runner: Any = None
        self.session: SourceSession | DestSession | None = None
        self.endpoint: VmSource | VmDestination | None = None
        self.direction: str | None = None
        self.listen_address: tuple | None = None


class Host:
    """See the module docstring."""

    def __init__(self, config: HostConfig) -> None:
        if not config.vms:
            raise ValueError("a host needs at least one VM")
        self.config = config
        self.params = Params(x_device_profile=Profile(config.profile).value)
        self._lock = threading.RLock()
        # the guest threads' OS threads, parked before any VM boots or arrives (vm/worker.py):
        # three per VM (vCPU, blk and net workloads), for the VMs and the calibration's scratch VMs
        THREADS.warm(GUEST_THREADS_PER_VM * 3 * len(config.vms))
        self.host_memory = Memory(HOST_MEMORY, name=f"{config.name}.host")
        self.profile = Profile(config.profile)
        self.pf = build_pf(self.host_memory.device_port(f"{config.name}.pf"), total_vfs=config.total_vfs,
                           profile=self.profile)
        driver_class = AdminDriver if self.profile is Profile.VIRTIO_1_4 else PfDriver
        self.pf_driver: PfDriver | AdminDriver = driver_class(self.pf, self.host_memory.cpu, Allocator(*PF_DRIVER_AREA))
        self.pf_driver.bring_up()
        #: every VF's migration goes through this VFIO-style state machine, whatever the profile
        self.migration = VfMigration(backend_for(self.pf_driver))
        self.slots: dict[str, Slot] = {}
        plan: list[tuple[VirtualMachine, str]] = []
        for spec in config.vms:
            if spec.name in self.slots:
                raise ValueError(f"two VMs named {spec.name}")
            mem = Memory(spec.memory_mib * MIB, name=spec.name, backing="memfd")
            vm = VirtualMachine(spec, mem)
            holder = config.name.replace("/", "_").replace("\n", "_").encode()[:MAX_HOLDER].decode(errors="ignore").strip() or "host"
            lease = FileLease(lease_path(spec.blk_image), holder) if spec.blk_image else None
            self.slots[spec.name] = Slot(vm, lease)
            plan += [(vm, kind) for kind in spec.vf_kinds]
        if len(plan) > config.total_vfs:
            raise ValueError(f"{len(plan)} VFs needed, the PF has {config.total_vfs}")
        # spare VFs, when the PF has room: two scratch VMs per kind of VM, to calibrate the
        # switch-over's fixed cost before the first migration (host/calibrate.py)
        self.calibrators: dict[tuple[str, ...], Calibrator] = {}
        scratch_vfs: set[int] = set()
        if config.calibrate:
            for spec in config.vms:
                kinds = tuple(spec.vf_kinds)
                if not kinds or kinds in self.calibrators or len(plan) + 2 * len(kinds) > config.total_vfs:
                    continue
                cal = self.calibrators[kinds] = Calibrator(spec)
                for vm in cal.vms:
                    for kind in kinds:
                        plan.append((vm, kind))
                        scratch_vfs.add(len(plan))

        # a switch on another machine needs back-end ports reachable from it
        bind = "127.0.0.1" if config.switch and (config.switch[0].startswith("127.") or config.switch[0] == "localhost") \
            else "0.0.0.0"

        def factory(number: int) -> tuple[Any, Any]:
            vm, kind = plan[number - 1]
            port = vm.memory.device_port(f"{vm.spec.name}.vf{number}")
            ctx = DeviceContext(switch=config.switch, bind=bind, scratch=number in scratch_vfs)
            return KINDS[kind].device(vm.spec, ctx), port

        # (NumVFs 0 is not an enable: a host whose VMs have no VF -- memory and vCPUs only,
        # the QEMU-comparable VM -- leaves SR-IOV off)
        fns = self.pf_driver.enable_vfs(len(plan), factory) if plan else []
        for number, ((vm, kind), fn) in enumerate(zip(plan, fns), start=1):
            vm.attach(kind, number, fn)
        for calibrator in self.calibrators.values():
            best = calibrator.best_of(self.migration, 3)
            if best is not None:
                SWITCHOVER_HISTORY.calibrate(best.config, best.seconds, best.phases.get("restore", 0.0))
                log.info("switch-over calibrated: %.2f ms %s", best.seconds * 1000,
                         {k: round(v * 1000, 3) for k, v in best.phases.items()})
        self.table = CommandTable()
        self._register()
        self.server = QmpServer(self.table, config.qmp)
        self.closed = threading.Event()
        for slot in self.slots.values():
            if config.incoming:
                slot.status = "inmigrate"
            else:
                if slot.lease is not None:
                    slot.lease.acquire()  # this host runs the VM: the lease is its own
                slot.vm.boot()
                slot.status = "running"

    # ================================================================== lifecycle
    def start(self) -> "Host":
        self.server.start()
        return self

    @property
    def qmp_address(self) -> str:
        return str(self.server.address)

    def close(self) -> None:
        for slot in self.slots.values():
            if slot.runner is not None:
                slot.runner.cancel()
                slot.runner.join(10)
            slot.vm.close()
        for calibrator in self.calibrators.values():
            calibrator.close()
        for fn in self.pf.vfs:  # the VFs' back-ends: I/O pools, net back-end sockets
            fn.device.close()
        self.pf_driver.close()  # the PF reset: its control-queue thread stops
        self.server.close()
        self.closed.set()

    def _slot(self, args: dict[str, Any]) -> Slot:
        name = args.get("vm")
        if name is None:
            return next(iter(self.slots.values()))
        slot = self.slots.get(name)
        if slot is None:
            raise QmpError(f"VM '{name}' not found", "DeviceNotFound")
        return slot

    # ================================================================== commands
    def _register(self) -> None:
        t = self.table
        vm_arg = {"*vm": "str"}
        t.register("query-status", self.cmd_query_status, args_schema=vm_arg)
        t.register("stop", self.cmd_stop, args_schema=vm_arg)
        t.register("cont", self.cmd_cont, args_schema=vm_arg)
        t.register("migrate", self.cmd_migrate, args_schema={"uri": "str", **vm_arg})
        t.register("migrate-incoming", self.cmd_migrate_incoming, args_schema={"uri": "str", **vm_arg})
        t.register("query-migrate", self.cmd_query_migrate, args_schema=vm_arg)
        t.register("migrate-set-parameters", self.cmd_set_parameters, args_schema=PARAM_SCHEMA)
        t.register("query-migrate-parameters", lambda a: self.params.to_qmp())
        t.register("migrate_cancel", self.cmd_cancel, args_schema=vm_arg)
        t.register("x-migrate-resolve", self.cmd_resolve, args_schema={"*run": ("source", "destination"), **vm_arg})
        t.register("query-vfs", self.cmd_query_vfs)
        t.register("query-vms", lambda a: [s.vm.info() | {"status": s.status} for s in self.slots.values()])
        t.register("x-vm-verify", self.cmd_verify, args_schema={"*vm": "str", "*disk": "bool"})
        t.register("quit", self.cmd_quit)

    def cmd_query_status(self, args: dict[str, Any]) -> dict[str, Any]:
        slot = self._slot(args)
        status = slot.status
        if slot.direction == "out" and self._busy(slot) and isinstance(slot.session, SourceSession):
            # the session pauses the VM inside its switch-over step; its event reaches
            # the slot only when the runner passes events on: answer from the session
            # so query-status never says running while query-migrate says device
            with slot.runner.lock:
                vm_state = slot.session.vm_state
            if vm_state in ("finish-migrate", "postmigrate"):
                status = vm_state
        return {"status": status, "running": status == "running", "singlestep": False}

    def cmd_stop(self, args: dict[str, Any]) -> dict[str, Any]:
        slot = self._slot(args)
        if slot.status == "running":
            slot.vm.pause()
            slot.status = "paused"
            self.server.emit_event("STOP")
        return {}

    def cmd_cont(self, args: dict[str, Any]) -> dict[str, Any]:
        slot = self._slot(args)
        if slot.status == "inmigrate":
            raise QmpError("Migration is not finished yet")
        if slot.session is not None and slot.session.status == "commit-unknown":
            raise QmpError("the migration's outcome is unknown (the link failed after COMMIT): "
                           "x-migrate-resolve decides where the VM runs, not cont")
        if slot.status in ("postmigrate", "shutdown"):
            raise QmpError(f"the VM is in '{slot.status}': its VFs were handed over or reset")
        if self._busy(slot):
            raise QmpError("a migration is in progress")
        if slot.status == "paused":
            slot.vm.resume()
            slot.status = "running"
            self.server.emit_event("RESUME")
        return {}

    def _busy(self, slot: Slot) -> bool:
        """A migration runs on this slot.  A session already final (what query-migrate
        reports) is not busy: its runner is given SETTLE_TIMEOUT to finish closing."""
        runner = slot.runner
        if runner is None or runner.done.is_set():
            return False
        s = slot.session
        with runner.lock:
            # final, and nothing left to deliver -- or nobody to deliver it to (an incoming
            # migration cancelled or failed before any source connected)
            final = s is not None and s.finished and (
                not s.wants_to_send or (slot.direction == "in" and runner.peer is None))
        if final:
            runner.join(SETTLE_TIMEOUT)
        return not runner.done.is_set()

    def _on_event(self, slot: Slot, ev: Any) -> None:
        if isinstance(ev, MigrationEvent):
            self.server.emit_event("MIGRATION", {"status": ev.status, **ev.data})
        elif isinstance(ev, PassEvent):
            self.server.emit_event("MIGRATION_PASS", {"pass": ev.pass_})
        elif isinstance(ev, VmStateEvent):
            # stamped when the VM stopped or resumed (the session's monotonic clock), not
            # when the runner passed the event on (mid switch-over that is after the VFs)
            at_ns = time.time_ns() - max(0, int((time.monotonic() - ev.time) * 1e9))
            if ev.state == "running":
                slot.status = "running"
                self.server.emit_event("RESUME", now_ns=at_ns)
            elif ev.state in ("finish-migrate", "postmigrate", "paused"):
                if slot.status == "running":
                    self.server.emit_event("STOP", now_ns=at_ns)
                slot.status = ev.state

    def cmd_migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        slot = self._slot(args)
        with self._lock:
            if self._busy(slot):
                raise QmpError("There's a migration process in progress")
            if slot.status not in ("running", "paused"):
                raise QmpError(f"cannot migrate a VM in state '{slot.status}'")
            try:
                mode = TrackMode.from_cli(self.params.x_tracking_mode)
                params = self.params.migration_params()
                uri = parse_address(args["uri"], MIGRATION_SCHEMES)
            except (ValueError, KeyError, VirtioLmError) as exc:
                raise QmpError(f"invalid migration request: {exc}") from exc
            lease = slot.lease if uri.kind != "file" else None
            if lease is not None and not lease.held:
                raise QmpError(f"this host does not hold the VM's lease ({lease.path}): another host runs it")
            if isinstance(self.pf_driver, PfDriver):
                self.pf_driver.report_portion = self.params.x_report_portion
                self.pf_driver.state_portion = self.params.x_state_portion
            was_paused = slot.status == "paused"

            def released() -> None:
                slot.status = "postmigrate"

            calibrator = self.calibrators.get(tuple(slot.vm.spec.vf_kinds))
            endpoint = VmSource(
                slot.vm, self.migration, mode=mode, device_tracking=self.params.x_device_tracking,
                on_release=released, dma_footprint_mib=self.params.x_dma_footprint_mib,
                calibrator=(lambda c=calibrator: c.measure(self.migration)) if calibrator is not None else None,
            )
            session = SourceSession(
                endpoint, params, clock=time.monotonic, to_file=uri.kind == "file", history=SWITCHOVER_HISTORY,
                lease=lease,
            )
            try:
                runner = start_outgoing(session, args["uri"], on_event=lambda e: self._on_event(slot, e))
            except OSError as exc:
                raise QmpError(f"Failed to connect to '{args['uri']}': {exc}") from exc
            slot.runner, slot.session, slot.direction, slot.endpoint = runner, session, "out", endpoint
            if was_paused:
                log.info("migrating a paused VM")
        return {}

    def cmd_migrate_incoming(self, args: dict[str, Any]) -> dict[str, Any]:
        slot = self._slot(args)
        with self._lock:
            if slot.status != "inmigrate":
                raise QmpError("The incoming migration has already been started or the VM is running here")
            if self._busy(slot):
                raise QmpError("an incoming migration is already listening")
            if isinstance(slot.session, DestSession) and slot.session.in_doubt:
                raise QmpError("the last incoming migration's outcome is unknown: x-migrate-resolve it first")
            uri = parse_address(args["uri"], MIGRATION_SCHEMES)

            def started() -> None:
                if uri.kind == "file" and slot.lease is not None:
                    slot.lease.acquire()  # a stream file is its own commit: the VM is this host's now
                slot.status = "running"

            endpoint = VmDestination(
                slot.vm, self.migration, on_start=started, restore_delay=self.params.x_restore_delay_ms / 1000
            )
            session = DestSession(
                endpoint, clock=time.monotonic, from_file=uri.kind == "file", history=SWITCHOVER_HISTORY,
                lease=slot.lease if uri.kind != "file" else None,
            )
            try:
                runner = start_incoming(session, args["uri"], on_event=lambda e: self._on_event(slot, e))
            except OSError as exc:
                raise QmpError(f"Failed to listen on '{args['uri']}': {exc}") from exc
            slot.runner, slot.session, slot.direction, slot.endpoint = runner, session, "in", endpoint
            slot.listen_address = runner.address
        return {}

    def cmd_query_migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        slot = self._slot(args)
        if slot.runner is None:
            return {}
        info = dict(slot.runner.info())
        if info.get("status") in TERMINAL and not slot.runner.done.is_set():
            # final: the runner is closing its channel.  Report the final status only once
            # it has, so that a client retrying on 'failed' finds the slot free (issue 12)
            self._busy(slot)
        if slot.direction == "in" and slot.listen_address:
            host, port = slot.listen_address[:2]
            info["socket-address"] = [{"type": "inet", "host": host, "port": str(port)}]
        if slot.direction == "out" and isinstance(slot.endpoint, VmSource) and slot.endpoint.in_flight:
            info["x-in-flight"] = {k: dict(v) for k, v in slot.endpoint.in_flight.items()}
        if slot.direction == "out" and isinstance(slot.endpoint, VmSource):
            info["x-tracking-mode"] = slot.endpoint.tracking_name
            info["x-device-profile"] = self.profile.value
            info["x-vf-migration"] = dict(slot.endpoint.vf_calls.report(), dirty=self.migration.stats()["dirty"])
            info["x-device-dirty-pages"] = dict(slot.endpoint.device_dirty)
            if slot.endpoint.footprint_pages:
                info["x-dma-footprint-pages"] = slot.endpoint.footprint_pages
        if slot.direction == "in" and isinstance(slot.endpoint, VmDestination):
            info["x-vf-migration"] = slot.endpoint.vf_calls.report()
        steps = getattr(slot.endpoint, "steps", None)
        if steps is not None and steps.ms:
            info["x-switchover-steps"] = dict(steps.ms)
        if slot.runner.crash is not None:
            info["status"] = "failed"
            info["error-desc"] = f"internal error: {slot.runner.crash!r}"
        # restart the incoming shell after a failed / cancelled incoming migration
        if slot.direction == "in" and slot.runner.done.is_set() and info.get("status") in ("failed", "cancelled"):
            slot.status = "inmigrate"
        return info

    def cmd_set_parameters(self, args: dict[str, Any]) -> dict[str, Any]:
        new = Params(**{**vars(self.params), **{k.replace("-", "_"): v for k, v in args.items()}})
        if new.x_device_profile != self.profile.value:
            raise QmpError(
                f"this host's PF speaks the {self.profile.value} profile; one PF speaks one profile, chosen "
                f"when the host starts (virtio-lm host --profile {new.x_device_profile})"
            )
        try:
            new.migration_params()
        except ValueError as exc:
            raise QmpError(str(exc)) from exc
        if new.x_report_portion <= 0 or new.x_state_portion <= 0:
            raise QmpError("portions must be at least one byte")
        self.params = new
        return {}

    def cmd_cancel(self, args: dict[str, Any]) -> dict[str, Any]:
        slot = self._slot(args)
        if self._busy(slot):
            slot.runner.cancel()
        return {}

    def cmd_resolve(self, args: dict[str, Any]) -> dict[str, Any]:
        """x-migrate-resolve: settle a migration whose outcome is unknown (docs/decisions.md)."""
        slot = self._slot(args)
        runner = slot.runner
        if runner is None:
            raise QmpError("no migration to resolve")
        try:
            where = runner.resolve(args.get("run"))
        except MigrationStateError as exc:
            raise QmpError(str(exc)) from exc
        except OSError as exc:
            raise QmpError(f"the VM's lease cannot be read or written: {exc}") from exc
        return {"run": where, "status": runner.info()["status"]}

    def cmd_query_vfs(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        for slot in self.slots.values():
            vm = slot.vm
            for kind in vm.spec.vf_kinds:
                n = vm.vf_numbers[kind]
                st = vf_status(self.pf, n)
                fn = vm.vfs[kind]
                dev = fn.device
                out.append(
                    {
                        "vf": n,
                        "vm": vm.spec.name,
                        "kind": kind,
                        "profile": self.profile.value,
                        "mig-state": self.migration.state(n).name,  # the host's VFIO-style state
                        "state": st.state,  # the device's: seed VfState / 1.4 member mode
                        "tracking": st.tracking,
                        "tracked-marks": st.tracked_marks,
                        "overflow-events": st.overflow_events,
                        "device-status": fn.status,
                        "in-flight": getattr(dev, "in_flight", 0),
                        "completed": getattr(dev, "completed", 0),
                        "dma-bytes-written": fn.port.writer.bytes_written,
                        # requests served by the C fast path (a blk VF with blk-dma=direct)
                        "x-fast-served": getattr(dev, "fast_served", 0),
                        # the device's own counters where it keeps them (net: frames, drops by reason)
                        "x-stats": dict(getattr(dev, "stats", None) or {}),
                    }
                )
        return out

    def cmd_verify(self, args: dict[str, Any]) -> dict[str, Any]:
        slot = self._slot(args)
        if slot.status != "running" and slot.status != "paused":
            raise QmpError(f"the VM is '{slot.status}' here: nothing to verify", "DeviceNotActive")
        return slot.vm.verify(disk=args.get("disk", True))

    def cmd_quit(self, args: dict[str, Any]) -> dict[str, Any]:
        threading.Thread(target=self._quit_soon, daemon=True).start()
        return {}

    def _quit_soon(self) -> None:
        time.sleep(0.05)
        for slot in self.slots.values():
            slot.status = "shutdown"
        self.close()
