"""The host's PF driver: VF migration commands over the PF's control queue.

:class:`PfDriver` is what a hypervisor's migration code talks to.  It

* brings the PF up through its registers only (a
  :class:`~virtio_lm.pci.transport.PciDriverTransport` over the SriovPF's
  ``common_read`` / ``common_write`` / ``notify``), with the control queue's
  rings and every command buffer allocated in **host** memory (the PF
  driver's own :class:`~virtio_lm.memory.MemoryPort` and an
  :class:`~virtio_lm.virtqueue.driver.Allocator` over part of it);
* negotiates VERSION_1, EVENT_IDX, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_CTRL_VQ,
  VIRTIO_F_SR_IOV, VIRTIO_F_GENERIC_CTRL_VQ_VER_1 and VIRTIO_F_VF_MIGRATION,
  and refuses (:class:`~virtio_lm.errors.FeatureMissingError`, status FAILED)
  to go on with a device that does not offer what migration needs;
* finds the control queue at index ``num_queues`` of the blk configuration;
* sends each command as ONE chain -- a device-readable buffer
  ``class, command, data`` and a device-writable buffer ``result space + ack``
  -- kicks, waits for the used entry (an event set by the PF's interrupt,
  polling the used ring as a fallback), and decodes ``used_len`` bytes;
* turns acks and misbehaviour into typed errors:
  ``VIRTIO_CTRL_ERR`` -> :class:`~virtio_lm.errors.ControlCommandError`
  (naming the command, the VF and the VF's state read back with
  GET_STATE_ATTRS), no used entry in time ->
  :class:`~virtio_lm.errors.CommandTimeoutError`, a used length larger than
  the writable space -> :class:`~virtio_lm.errors.UsedRingError`, a bad ack
  or a result of the wrong size -> :class:`~virtio_lm.errors.WireError`;
* hides the four dirty tracking modes behind :meth:`PfDriver.collect_dirty`.

One lock serialises the control queue: the driver may be used from several
threads.  Dirty collection in push modes does not use the queue at all (the
map is test-and-cleared in host memory), so it does not wait for commands.

Two things a real PF driver does with PCI configuration writes are
stand-ins here, calling the SriovPF model: enabling VFs
(:meth:`PfDriver.enable_vfs`, in PCIe "NumVFs + VF Enable" in the SR-IOV
capability) and VF FLR (:meth:`PfDriver.flr_vf`, "Initiate FLR" in the VF's
Device Control register).  Interrupt delivery is likewise modelled by the
function's ``on_interrupt`` callback (MSI-X in a real system).
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from virtio_lm.errors import (
    AllocationError,
    CommandTimeoutError,
    ControlCommandError,
    DeviceNeedsResetError,
    DirtyReportError,
    DriverError,
    FeatureMissingError,
    TrackingError,
    TrailingDataError,
    UsedRingError,
    VirtioLmError,
)
from virtio_lm.memory import PAGE_SHIFT, MemoryPort
from virtio_lm.pci.function import CONFIG_INTERRUPT, VirtioPciFunction
from virtio_lm.pci.sriov import SriovPF, VfFactory
from virtio_lm.pci.transport import PciDriverTransport
from virtio_lm.pf.tracking import report_to_pages
from virtio_lm.virtqueue.device import Segment
from virtio_lm.virtqueue.driver import Allocator, DriverQueue
from virtio_lm.wire.blk import BlkConfig, BlkFeature, ctrl_queue_index
from virtio_lm.wire.ctrl import (
    ACK_SIZE,
    CLASS_VF_MIGRATION,
    Ack,
    DirtyReportSizeResult,
    FuncId,
    FuncOffset,
    IdentifyResult,
    MigrationCommand,
    SetState,
    StartDirtyTrack,
    StateAttrsResult,
    TrackMode,
    VfState,
    decode_response,
    encode_map_table,
    encode_request,
)
from virtio_lm.wire.features import DeviceStatus, Feature, ProposalFeature, bit, feature_names
from virtio_lm.wire.pci import COMMON_CFG_BY_NAME

__all__ = [
    "DEFAULT_FEATURES",
    "MIGRATION_FEATURES",
    "CommandStats",
    "PfDriver",
    "Tracking",
]

#: what migration needs negotiated (the proposal's rules plus the blk control queue)
MIGRATION_FEATURES = (
    bit(Feature.VERSION_1)
    | bit(Feature.SR_IOV)
    | bit(BlkFeature.MQ)
    | bit(BlkFeature.CTRL_VQ)
    | bit(ProposalFeature.GENERIC_CTRL_VQ_VER_1)
    | bit(ProposalFeature.VF_MIGRATION)
)
#: what :meth:`PfDriver.bring_up` asks for by default
DEFAULT_FEATURES = MIGRATION_FEATURES | bit(Feature.EVENT_IDX)

_NUM_QUEUES_OFFSET = BlkConfig.OFFSETS["num_queues"]  # type: ignore[attr-defined]


@dataclass
class Tracking:
    """The driver's record of one VF's dirty tracking."""

    mode: TrackMode
    num_pages: int
    segments: list[tuple[int, int]] = field(default_factory=list)  # push map, in table order
    collections: int = 0
    failsafe_events: int = 0  # reports that could not be mapped page by page: all pages taken as dirty


@dataclass
class CommandStats:
    """Counters for monitoring and the benchmark."""

    commands: int = 0
    errors: int = 0
    timeouts: int = 0
    interrupts: int = 0
    polls: int = 0
    collect_bytes: int = 0  # dirty-map / report bytes moved into the driver
    collect_commands: int = 0  # control commands spent on dirty collection


class PfDriver:
    """Host-side driver of an SR-IOV virtio PF with the proposal's control queue.

    ``pf`` is the PF's register interface (and, for the two stand-ins, the
    SriovPF model); ``port`` the PF driver's port onto host memory (the
    host's CPU port); ``alloc`` an allocator over the part of host memory this
    driver may use for its rings, command buffers and push-mode maps.

    ``timeout`` bounds each command; ``report_portion`` and ``state_portion``
    are the bytes asked for per REPORT_DIRTY_PAGES / SAVE_STATE /
    RESTORE_STATE command; ``poll_interval`` is how often the used ring is
    polled when no interrupt comes.
    """

    def __init__(
        self,
        pf: SriovPF,
        port: MemoryPort,
        alloc: Allocator,
        *,
        timeout: float = 5.0,
        queue_size: int = 64,
        report_portion: int = 64 << 10,
        state_portion: int = 16 << 10,
        poll_interval: float = 0.05,
    ) -> None:
        for name, value in (("report_portion", report_portion), ("state_portion", state_portion)):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.pf = pf
        self.port = port
        self.alloc = alloc
        self.timeout = timeout
        self.queue_size = queue_size
        self.report_portion = report_portion
        self.state_portion = state_portion
        self.poll_interval = poll_interval
        self.transport = PciDriverTransport(pf, port, alloc)
        self.features = 0
        self.ctrl_index: int | None = None
        self.ctrlq: DriverQueue | None = None
        self.caps: IdentifyResult | None = None
        self.stats = CommandStats()
        self._lock = threading.RLock()  # the control queue (held for a whole command / sequence)
        self._track_lock = threading.Lock()  # the tracking table and push maps; taken after _lock, never before
        self._irq = threading.Event()
        self._tokens = itertools.count(1)
        self._abandoned: dict[int, tuple[int, int]] = {}  # token -> buffers of timed-out commands
        self._tracking: dict[int, Tracking] = {}

    # ================================================================== bring-up
    def bring_up(self, wanted: int = DEFAULT_FEATURES, *, require_migration: bool = True) -> int:
        """Negotiate ``wanted`` (as far as offered), set up the control queue, DRIVER_OK.

        With ``require_migration`` (the default) a device that does not offer
        every bit of :data:`MIGRATION_FEATURES` is refused: the driver sets
        FAILED and raises :class:`FeatureMissingError`.  Without it, the PF is
        brought up with whatever ``wanted & offered`` is (tests of a PF whose
        migration features were not negotiated).  FEATURES_OK refused by the
        device raises :class:`FeaturesNotAcceptedError`.  Returns the
        negotiated features.
        """
        with self._lock:
            t = self.transport
            t.reset()
            self._forget_all()
            self._write_status(int(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER))
            offered = t.read_device_features()
            if require_migration:
                missing = (MIGRATION_FEATURES | bit(Feature.VERSION_1)) & ~offered
                if missing:
                    self._write_status(t.status | int(DeviceStatus.FAILED))
                    raise FeatureMissingError(
                        f"{self._name}: the device does not offer {', '.join(feature_names(missing, BlkFeature))}; "
                        "VF migration is not possible"
                    )
                wanted |= MIGRATION_FEATURES
            features = t.negotiate(wanted)
            if not features & bit(BlkFeature.MQ) or not features & bit(BlkFeature.CTRL_VQ):
                self._write_status(t.status | int(DeviceStatus.FAILED))
                raise FeatureMissingError(
                    f"{self._name}: VIRTIO_BLK_F_MQ and VIRTIO_BLK_F_CTRL_VQ are needed for a control queue"
                )
            num_queues = t.config_read(_NUM_QUEUES_OFFSET, 2)
            index = ctrl_queue_index(num_queues)
            if index >= t.num_queues():
                self._write_status(t.status | int(DeviceStatus.FAILED))
                raise DriverError(
                    f"{self._name}: blk num_queues {num_queues} puts the control queue at {index}, "
                    f"but the function has {t.num_queues()} queues"
                )
            self.pf.on_interrupt = self._on_interrupt
            self.ctrlq = t.setup_queue(index, self.queue_size)
            self.ctrl_index = index
            t.driver_ok()
            self.features = features
            return features

    @property
    def _name(self) -> str:
        return getattr(self.pf, "name", "pf")

    def _write_status(self, value: int) -> None:
        reg = COMMON_CFG_BY_NAME["device_status"]
        self.pf.common_write(reg.offset, reg.width, value)

    def _on_interrupt(self, source: int) -> None:
        if source == self.ctrl_index or source == CONFIG_INTERRUPT:
            self.stats.interrupts += 1
            self._irq.set()

    def close(self) -> None:
        """Reset the PF (status 0): its control queue and every VF's tracking stop."""
        with self._lock:
            self.transport.reset()
            self._forget_all()

    def _forget_all(self) -> None:
        """The device was (or is about to be) reset: nothing it held is in use any more."""
        self._drop_tracking()
        if self.ctrlq is not None:
            for rd, wr in self._abandoned.values():
                self.alloc.free(rd)
                self.alloc.free(wr)
            self._abandoned.clear()
            for addr in (self.ctrlq.desc_addr, self.ctrlq.avail_addr, self.ctrlq.used_addr):
                self.alloc.free(addr)
        self.ctrlq = None
        self.ctrl_index = None
        self.caps = None
        self.features = 0

    # ================================================================== SR-IOV stand-ins
    def enable_vfs(self, n: int, factory: VfFactory) -> list[VirtioPciFunction]:
        """Enable VFs 1..n.

        Stand-in: in a real system this is a write of NumVFs and VF Enable to
        the PF's SR-IOV capability in PCI configuration space; here it calls
        :meth:`SriovPF.enable_vfs` of the model, whose factory builds each VF's
        device and its port onto the VM's memory.
        """
        with self._lock:
            return self.pf.enable_vfs(n, factory)

    def disable_vfs(self) -> None:
        """Clear VF Enable (stand-in for the SR-IOV capability write); tracking of every VF ends."""
        with self._lock:
            self.pf.disable_vfs()
            self._drop_tracking()

    def _drop_tracking(self) -> None:
        with self._track_lock:
            for tr in self._tracking.values():
                self._free_segments(tr)
            self._tracking.clear()

    def flr_vf(self, vf: int) -> None:
        """Function level reset of VF ``vf``.

        Stand-in: a real PF driver sets "Initiate Function Level Reset" in the
        VF's PCIe Device Control register; here it calls
        :meth:`SriovPF.flr_vf`.  Dirty tracking goes on (it is the PF's).
        """
        self.pf.flr_vf(vf)

    # ================================================================== one command
    def raw_command(
        self,
        cls: int,
        command: int,
        data: bytes = b"",
        result_space: int = 0,
        *,
        func_id: int | None = None,
        check: bool = False,
    ) -> tuple[bytes, Ack]:
        """Send one generic v1 buffer and return ``(result, ack)``.

        ``result_space`` is the writable room for the result (one more byte
        is added for the ack).  With ``check``, an ERR ack raises
        :class:`ControlCommandError` (``func_id`` names the VF in it).
        """
        result, ack = self._submit(encode_request(cls, command, data), result_space)
        if ack is Ack.ERR and check:
            raise self._error(_command_name(cls, command), func_id)
        return result, ack

    def _submit(self, readable: bytes, result_space: int) -> tuple[bytes, Ack]:
        return self._submit_many([(readable, result_space)])[0]

    def _submit_many(self, requests: list[tuple[bytes, int]]) -> list[tuple[bytes, Ack]]:
        """Send several generic v1 buffers with one kick; their ``(result, ack)`` in order.

        The device takes the control queue's chains in order (a command's
        effect is in place before the next one runs), so a dependent sequence
        -- FREEZED, RESTORE_STATE, QUIESCED -- can go in one kick: what one
        kick costs (two thread hand-offs here, a doorbell and an interrupt on
        real hardware) is paid once per batch, not per command.  Each command
        still gets its own ack: when one fails, the later ones ran anyway and
        met the state it left (the caller reads every ack).
        """
        for _, space in requests:
            if space < 0:
                raise ValueError(f"result_space {space} < 0")
        out: list[tuple[bytes, Ack]] = []
        with self._lock:
            per_kick = max(1, self.queue_size // 2)  # two descriptors a chain
            for i in range(0, len(requests), per_kick):
                out += self._submit_chunk(requests[i : i + per_kick])
        return out

    def _submit_chunk(self, requests: list[tuple[bytes, int]]) -> list[tuple[bytes, Ack]]:
        dq = self.ctrlq
        if dq is None or self.ctrl_index is None:
            raise DriverError(f"{self._name}: the PF driver is not up (bring_up first)")
        if 2 * len(requests) > dq.num_free():
            raise DriverError(
                f"{self._name}: {len(requests)} commands need {2 * len(requests)} descriptors, "
                f"{dq.num_free()} free (commands abandoned by timeouts hold the rest)"
            )
        bufs: list[tuple[int, int, int]] = []  # (read buffer, write buffer, writable length)
        try:
            for readable, space in requests:
                wlen = space + ACK_SIZE
                try:
                    rd = self.alloc.alloc(len(readable), 8)
                except AllocationError as exc:
                    raise DriverError(f"{self._name}: no host memory for a {len(readable)}-byte command") from exc
                try:
                    wr = self.alloc.alloc(wlen, 8)
                except AllocationError as exc:
                    self.alloc.free(rd)
                    raise DriverError(f"{self._name}: no host memory for a {wlen}-byte result") from exc
                bufs.append((rd, wr, wlen))
                self.port.write(rd, readable)
        except BaseException:
            for rd, wr, _ in bufs:
                self.alloc.free(rd)
                self.alloc.free(wr)
            raise
        tokens: list[int] = []
        for (readable, _), (rd, wr, wlen) in zip(requests, bufs):
            token = next(self._tokens)
            dq.add([Segment(rd, len(readable))], [Segment(wr, wlen)], token=token)  # room checked above
            tokens.append(token)
        self._irq.clear()
        self.stats.commands += len(tokens)
        self.transport.kick(self.ctrl_index)
        used = self._wait_all(dq, dict(zip(tokens, bufs)))
        results: list[tuple[bytes, Ack]] = []
        problem: VirtioLmError | None = None
        for token, (rd, wr, wlen) in zip(tokens, bufs):
            used_len = used[token]
            try:
                if used_len > wlen:
                    raise UsedRingError(
                        f"{self._name}: control command used_len {used_len} exceeds its writable {wlen} bytes"
                    )
                result, ack = decode_response(self.port.read(wr, used_len))
                if ack is Ack.ERR:
                    self.stats.errors += 1
                    if result:
                        raise TrailingDataError("virtio_generic_v1_ctrl", 0, len(result))
                results.append((result, ack))
            except VirtioLmError as exc:
                problem = problem or exc
            finally:
                self.alloc.free(rd)
                self.alloc.free(wr)
        if problem is not None:
            raise problem
        return results

    def _wait_all(self, dq: DriverQueue, pending: dict[int, tuple[int, int, int]]) -> dict[int, int]:
        """The used length of each chain in ``pending``; raises on timeout / NEEDS_RESET.

        On either, the chains not yet returned are abandoned: their buffers are
        freed when (if) the device returns them."""
        deadline = time.monotonic() + self.timeout
        waiting = dict(pending)
        used: dict[int, int] = {}

        def abandon() -> None:
            for token, (rd, wr, _) in waiting.items():
                self._abandoned[token] = (rd, wr)

        while True:
            self._irq.clear()
            while (item := dq.get_used()) is not None:
                got, used_len = item
                if got in waiting:
                    del waiting[got]  # type: ignore[arg-type]
                    used[got] = used_len  # type: ignore[index]
                else:
                    self._reap(got)
            if not waiting:
                return used
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                abandon()
                self.stats.timeouts += 1
                raise CommandTimeoutError(
                    f"{self._name}: control command not completed within {self.timeout}s"
                )
            if self._irq.wait(min(remaining, self.poll_interval)):
                self._irq.clear()
            else:
                self.stats.polls += 1
            if self.transport.status & (int(DeviceStatus.DEVICE_NEEDS_RESET) | int(DeviceStatus.FAILED)):
                abandon()
                raise DeviceNeedsResetError(f"{self._name}: the PF needs a reset; control command abandoned")

    def _reap(self, token: object) -> None:
        bufs = self._abandoned.pop(token, None)  # type: ignore[call-overload]
        if bufs is None:
            raise UsedRingError(f"{self._name}: used entry for unknown control command {token!r}")
        for addr in bufs:
            self.alloc.free(addr)

    def _error(self, command: str, func_id: int | None, detail: str = "") -> ControlCommandError:
        """The error for an ERR ack, with the VF's state read back (best effort)."""
        state: VfState | None = None
        if func_id is not None and 0 <= func_id <= 0xFFFF:
            try:
                result, ack = self._submit(
                    encode_request(CLASS_VF_MIGRATION, MigrationCommand.GET_STATE_ATTRS, FuncId(func_id).encode()),
                    StateAttrsResult.SIZE,  # type: ignore[attr-defined]
                )
                if ack is Ack.OK:
                    state = StateAttrsResult.decode(result).state  # type: ignore[attr-defined]
            except VirtioLmError:
                state = None
        return ControlCommandError(command, func_id, state, detail)

    def _migration(
        self, command: MigrationCommand, data: bytes, result_space: int, func_id: int | None, detail: str = ""
    ) -> bytes:
        result, ack = self._submit(encode_request(CLASS_VF_MIGRATION, command, data), result_space)
        if ack is Ack.ERR:
            raise self._error(command.name, func_id, detail)
        return result

    def _migration_many(self, commands: list[tuple[MigrationCommand, bytes, int, int, str]]) -> list[bytes]:
        """Several class-128 commands ``(command, data, result space, VF, detail)`` with one kick.

        Every command runs (see :meth:`_submit_many`); the first ERR ack, in
        order, raises its :class:`ControlCommandError` (the VF's state in it
        is read after the whole batch)."""
        replies = self._submit_many(
            [(encode_request(CLASS_VF_MIGRATION, cmd, data), space) for cmd, data, space, _, _ in commands]
        )
        for (cmd, _, _, vf, detail), (_, ack) in zip(commands, replies):
            if ack is Ack.ERR:
                raise self._error(cmd.name, vf, detail)
        return [result for result, _ in replies]

    # ================================================================== the nine commands
    def identify(self) -> IdentifyResult:
        """IDENTIFY: version, supported tracking modes, pull-mode capacities (cached in :attr:`caps`)."""
        result = self._migration(MigrationCommand.IDENTIFY, b"", IdentifyResult.SIZE, None)  # type: ignore[attr-defined]
        caps = IdentifyResult.decode(result)  # type: ignore[attr-defined]
        self.caps = caps
        return caps

    def start_dirty_page_track(self, vf: int, mode: TrackMode, segments: list[tuple[int, int]] | None = None) -> None:
        """START_DIRTY_PAGE_TRACK as such (no allocation, no checks; see :meth:`start_tracking`)."""
        mode = TrackMode(mode)
        data = StartDirtyTrack(vf, mode).encode() + (encode_map_table(segments) if segments else b"")
        self._expect_empty(self._migration(MigrationCommand.START_DIRTY_PAGE_TRACK, data, 0, vf, f"mode {mode.name}"))

    def stop_dirty_page_track(self, vf: int) -> None:
        """STOP_DIRTY_PAGE_TRACK as such (see :meth:`stop_tracking`)."""
        self._expect_empty(self._migration(MigrationCommand.STOP_DIRTY_PAGE_TRACK, FuncId(vf).encode(), 0, vf))

    def get_dirty_report_size(self, vf: int) -> int:
        """GET_DIRTY_REPORT_SIZE: take the pull snapshot; its length in bytes."""
        result = self._migration(
            MigrationCommand.GET_DIRTY_REPORT_SIZE, FuncId(vf).encode(), DirtyReportSizeResult.SIZE, vf  # type: ignore[attr-defined]
        )
        return DirtyReportSizeResult.decode(result).len  # type: ignore[attr-defined]

    def report_dirty_pages(self, vf: int, offset: int, max_len: int) -> bytes:
        """REPORT_DIRTY_PAGES: up to ``max_len`` bytes of the snapshot from ``offset``."""
        return self._migration(MigrationCommand.REPORT_DIRTY_PAGES, FuncOffset(vf, offset=offset).encode(), max_len, vf)

    def set_state(self, vf: int, state: VfState) -> None:
        """SET_STATE (one VF of :meth:`set_states`)."""
        self.set_states([vf], state)

    def get_state_attrs(self, vf: int) -> tuple[int, VfState]:
        """GET_STATE_ATTRS: ``(image length, state)``; the length is the exact image size in FREEZED."""
        result = self._migration(
            MigrationCommand.GET_STATE_ATTRS, FuncId(vf).encode(), StateAttrsResult.SIZE, vf  # type: ignore[attr-defined]
        )
        attrs = StateAttrsResult.decode(result)  # type: ignore[attr-defined]
        return attrs.len, attrs.state

    def get_state(self, vf: int) -> VfState:
        return self.get_state_attrs(vf)[1]

    def save_state(self, vf: int, offset: int, max_len: int) -> bytes:
        """SAVE_STATE: up to ``max_len`` bytes of the image from ``offset``."""
        return self._migration(MigrationCommand.SAVE_STATE, FuncOffset(vf, offset=offset).encode(), max_len, vf)

    def restore_state(self, vf: int, offset: int, data: bytes) -> None:
        """RESTORE_STATE: one portion of an image at ``offset``."""
        payload = FuncOffset(vf, offset=offset).encode() + bytes(data)
        self._expect_empty(self._migration(MigrationCommand.RESTORE_STATE, payload, 0, vf))

    # ================================================================== a switch-over, batched
    # The sequence of a VF switch-over (quiesce -> final dirty -> freeze -> save on the
    # source; restore -> unfreeze -> run on the destination), every step for all of a VM's
    # VFs in one kick.  The host's endpoints, the calibrator, the net testbed and the
    # benches all switch over through these.
    def set_states(self, vfs: list[int], state: VfState) -> None:
        """SET_STATE ``state`` for each VF of ``vfs``, one kick."""
        state = VfState(state)
        for result in self._migration_many(
            [(MigrationCommand.SET_STATE, SetState(vf, state).encode(), 0, vf, f"to {state.name}") for vf in vfs]
        ):
            self._expect_empty(result)

    def freeze_and_save(self, vfs: list[int], portion: int | None = None) -> list[bytes]:
        """FREEZE each VF and return its whole state image, in ``vfs`` order.

        One kick carries, per VF, SET_STATE FREEZED, GET_STATE_ATTRS and the
        first SAVE_STATE portion; images longer than a portion take one more
        kick per further portion (all VFs together)."""
        portion = portion or self.state_portion
        freeze = [(MigrationCommand.SET_STATE, SetState(vf, VfState.FREEZED).encode(), 0, vf, "to FREEZED") for vf in vfs]
        attrs = [(MigrationCommand.GET_STATE_ATTRS, FuncId(vf).encode(), StateAttrsResult.SIZE, vf, "") for vf in vfs]  # type: ignore[attr-defined]
        first = [(MigrationCommand.SAVE_STATE, FuncOffset(vf, offset=0).encode(), portion, vf, "") for vf in vfs]
        with self._lock:
            replies = self._migration_many(freeze + attrs + first)
            n = len(vfs)
            for result in replies[:n]:
                self._expect_empty(result)
            lengths: list[int] = []
            for vf, raw in zip(vfs, replies[n : 2 * n]):
                a = StateAttrsResult.decode(raw)  # type: ignore[attr-defined]
                if a.state is not VfState.FREEZED:
                    raise DriverError(f"VF {vf} in {a.state.name} after SET_STATE FREEZED succeeded")
                lengths.append(a.len)
            images = [bytearray(chunk) for chunk in replies[2 * n :]]
            for vf, img, length in zip(vfs, images, lengths):
                if len(img) > length:
                    raise UsedRingError(f"VF {vf}: SAVE_STATE returned {len(img)} bytes of a {length}-byte image")
            while True:
                todo = [(i, vf) for i, vf in enumerate(vfs) if len(images[i]) < lengths[i]]
                if not todo:
                    return [bytes(img) for img in images]
                chunks = self._migration_many([
                    (MigrationCommand.SAVE_STATE, FuncOffset(vf, offset=len(images[i])).encode(),
                     min(portion, lengths[i] - len(images[i])), vf, "")
                    for i, vf in todo
                ])
                for (i, vf), chunk in zip(todo, chunks):
                    if not chunk:
                        raise UsedRingError(
                            f"VF {vf}: SAVE_STATE returned nothing at {len(images[i])} of {lengths[i]} bytes"
                        )
                    images[i] += chunk

    def restore_and_quiesce(self, images: list[tuple[int, bytes]], portion: int | None = None) -> None:
        """Per VF: SET_STATE FREEZED, RESTORE_STATE in portions, SET_STATE QUIESCED (which
        validates and applies the image) -- all VFs in one kick (more when the chains
        exceed the queue).  The first refusal raises; the VFs are left for the caller to
        reset (FLR), as after any failed restore."""
        portion = portion or self.state_portion
        cmds: list[tuple[MigrationCommand, bytes, int, int, str]] = []
        for vf, blob in images:
            cmds.append((MigrationCommand.SET_STATE, SetState(vf, VfState.FREEZED).encode(), 0, vf, "to FREEZED"))
            for off in range(0, len(blob), portion):
                cmds.append((MigrationCommand.RESTORE_STATE,
                             FuncOffset(vf, offset=off).encode() + bytes(blob[off : off + portion]), 0, vf, ""))
            cmds.append((MigrationCommand.SET_STATE, SetState(vf, VfState.QUIESCED).encode(), 0, vf, "to QUIESCED"))
        for result in self._migration_many(cmds):
            self._expect_empty(result)

    def stop_tracking_all(self, vfs: list[int]) -> None:
        """STOP_DIRTY_PAGE_TRACK for each VF of ``vfs`` (one kick), then free the push maps
        of those the device stopped; the first refusal raises after that."""
        with self._lock:
            replies = self._submit_many(
                [(encode_request(CLASS_VF_MIGRATION, MigrationCommand.STOP_DIRTY_PAGE_TRACK, FuncId(vf).encode()), 0)
                 for vf in vfs]
            )
            with self._track_lock:
                for vf, (_, ack) in zip(vfs, replies):
                    if ack is Ack.OK:
                        tr = self._tracking.pop(vf, None)
                        if tr is not None:
                            self._free_segments(tr)
            for vf, (result, ack) in zip(vfs, replies):
                if ack is Ack.ERR:
                    raise self._error(MigrationCommand.STOP_DIRTY_PAGE_TRACK.name, vf)
                self._expect_empty(result)

    def _expect_empty(self, result: bytes) -> None:
        if result:
            raise TrailingDataError("virtio_generic_v1_ctrl.result", 0, len(result))

    # ================================================================== dirty tracking
    def start_tracking(
        self, vf: int, mode: TrackMode, *, num_pages: int | None = None, map_segments: int = 1
    ) -> Tracking:
        """Start tracking VF ``vf``'s DMA writes in ``mode``.

        ``num_pages`` is the size of the VM's memory in pages; by default the
        size of the memory the VF's port reaches (the hypervisor knows its VM's
        memory size; the model's port stands in for that knowledge).  Push
        modes: the driver allocates the map in host memory, as
        ``map_segments`` segments (each page-aligned, so they are not
        contiguous) listed in START's map table.  Refused with
        :class:`TrackingError` (nothing sent) if the mode is not supported,
        the VF is already tracked, or the VM has more pages than the device
        can track (IDENTIFY's log_max in pull modes; the map host memory can
        hold in push modes).
        """
        mode = TrackMode(mode)
        with self._lock:
            if self.tracking(vf) is not None:
                raise TrackingError(f"VF {vf} is already tracked in {self._tracking[vf].mode.name}")
            if num_pages is None:
                num_pages = self._guest_pages(vf)
            if num_pages <= 0:
                raise TrackingError(f"VF {vf}: num_pages {num_pages} must be > 0")
            caps = self.caps or self.identify()
            if not caps.dirty_page_track_modes & mode.cap:
                raise TrackingError(
                    f"{mode.name} is not supported by the device (IDENTIFY: {caps.dirty_page_track_modes!r})"
                )
            tr = Tracking(mode, num_pages)
            if mode.is_push:
                if not 1 <= map_segments <= self.queue_size:
                    raise TrackingError(f"map_segments {map_segments} out of 1..{self.queue_size}")
                self._alloc_map(tr, mode.map_bytes(num_pages), map_segments)
            else:
                log_max = (
                    caps.log_max_pages_track_pull_bitmap_mode
                    if mode.is_bitmap
                    else caps.log_max_pages_track_pull_bytemap_mode
                )
                if num_pages > 1 << log_max:
                    raise TrackingError(
                        f"VF {vf}: {num_pages} pages, but the device tracks at most 2**{log_max} = "
                        f"{1 << log_max} pages per VF in {mode.name}"
                    )
            try:
                self.start_dirty_page_track(vf, mode, tr.segments or None)
            except BaseException:
                self._free_segments(tr)
                raise
            with self._track_lock:
                self._tracking[vf] = tr
            return tr

    def _guest_pages(self, vf: int) -> int:
        return self.pf.vf(vf).port.size >> PAGE_SHIFT

    def _alloc_map(self, tr: Tracking, total: int, pieces: int) -> None:
        pieces = min(pieces, total)
        base, extra = divmod(total, pieces)
        try:
            for i in range(pieces):
                length = base + (1 if i < extra else 0)
                addr = self.alloc.alloc(length, 1 << PAGE_SHIFT)
                tr.segments.append((addr, length))
                self.port.fill(addr, length, 0)
        except AllocationError as exc:
            self._free_segments(tr)
            raise TrackingError(
                f"a {total}-byte {tr.mode.name} map for {tr.num_pages} pages does not fit the PF driver's host memory"
            ) from exc

    def _free_segments(self, tr: Tracking) -> None:
        for addr, _ in tr.segments:
            self.alloc.free(addr)
        tr.segments.clear()

    def stop_tracking(self, vf: int) -> None:
        """STOP_DIRTY_PAGE_TRACK, then free the push map (the device no longer writes it)."""
        self.stop_tracking_all([vf])

    def tracking(self, vf: int) -> Tracking | None:
        """The driver's record of VF ``vf``'s tracking, or None."""
        with self._track_lock:
            return self._tracking.get(vf)

    def collect_dirty(self, vf: int) -> np.ndarray:
        """Pages of VF ``vf``'s VM dirtied by the device since the last call (bool array of num_pages).

        Push modes: test-and-clear of the map in host memory, segment by
        segment (atomic against the device's marks).  Pull modes:
        GET_DIRTY_REPORT_SIZE, then REPORT_DIRTY_PAGES in portions of
        :attr:`report_portion` bytes.  A report the driver cannot map page by
        page (the device's fail-safe: marks beyond the VM's pages) makes every
        page dirty and is counted in ``Tracking.failsafe_events``.
        """
        tr = self.tracking(vf)
        if tr is None:
            raise TrackingError(f"VF {vf} is not being tracked")
        if tr.mode.is_push:
            with self._track_lock:  # not the queue's lock: push collection sends no command
                if self._tracking.get(vf) is not tr:
                    raise TrackingError(f"VF {vf}: tracking stopped during the collection")
                parts = [self.port.atomic_fetch_and_clear(addr, length) for addr, length in tr.segments]
                raw = np.concatenate(parts) if len(parts) > 1 else parts[0]
                self.stats.collect_bytes += len(raw)
                return self._to_pages(tr, raw)
        with self._lock:  # GET_DIRTY_REPORT_SIZE .. the last REPORT_DIRTY_PAGES as one sequence
            raw = np.frombuffer(self._read_report(vf), dtype=np.uint8)
            with self._track_lock:
                return self._to_pages(tr, raw)

    @staticmethod
    def _to_pages(tr: Tracking, raw: np.ndarray) -> np.ndarray:
        tr.collections += 1
        try:
            return report_to_pages(raw, tr.num_pages, bitmap=tr.mode.is_bitmap)
        except DirtyReportError:
            tr.failsafe_events += 1
            return np.ones(tr.num_pages, dtype=bool)

    def _read_report(self, vf: int) -> bytes:
        size = self.get_dirty_report_size(vf)
        self.stats.collect_commands += 1
        buf = bytearray()
        while len(buf) < size:
            chunk = self.report_dirty_pages(vf, len(buf), min(self.report_portion, size - len(buf)))
            self.stats.collect_commands += 1
            if not chunk:
                raise TrackingError(f"VF {vf}: the dirty report ended at {len(buf)} of {size} bytes")
            buf += chunk
        self.stats.collect_bytes += len(buf)
        return bytes(buf)

    # ================================================================== state images
    def save_image(self, vf: int, portion: int | None = None) -> bytes:
        """The FREEZED VF's whole state image: GET_STATE_ATTRS for its size, SAVE_STATE in portions."""
        portion = portion or self.state_portion
        with self._lock:
            length, state = self.get_state_attrs(vf)
            if state is not VfState.FREEZED:
                self.save_state(vf, 0, portion)  # the device refuses it: ControlCommandError
                raise DriverError(f"VF {vf} in {state.name}: SAVE_STATE succeeded outside FREEZED")
            out = bytearray()
            while len(out) < length:
                chunk = self.save_state(vf, len(out), min(portion, length - len(out)))
                if not chunk:
                    raise UsedRingError(f"VF {vf}: SAVE_STATE returned nothing at {len(out)} of {length} bytes")
                out += chunk
            return bytes(out)

    def restore_image(self, vf: int, blob: bytes, portion: int | None = None) -> None:
        """RESTORE_STATE ``blob`` in portions (in order); applied when the VF leaves FREEZED."""
        portion = portion or self.state_portion
        with self._lock:
            for off in range(0, len(blob), portion):
                self.restore_state(vf, off, blob[off : off + portion])


def _command_name(cls: int, command: int) -> str:
    if cls == CLASS_VF_MIGRATION:
        try:
            return MigrationCommand(command).name
        except ValueError:
            pass
    return f"class {cls} command {command}"
