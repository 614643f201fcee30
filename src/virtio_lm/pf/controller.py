"""The PF's VF migration commands (class 128), over its SR-IOV VFs.

:class:`VfMigrationController` is what the control-queue dispatcher calls
(see :class:`virtio_lm.ctrl.dispatch.MigrationHandler`).  It keeps one
:class:`VfContext` per enabled VF: the VF's state machine
(:mod:`virtio_lm.pf.state`), its dirty tracker (:mod:`virtio_lm.pf.tracking`),
the image saved at FREEZE and the portions of an image being restored.

Every refusal raises :class:`CommandRefusedError` *before* anything
changes, so an ERR ack always means "nothing happened".  The one action that
is checked only while it runs -- leaving FREEZED with a restored image -- is
two-phase: the image is validated first and applied only if valid; an
invalid image leaves the VF FREEZED with its state as it was.

Semantics (docs/decisions.md has the reasons):

* func_id is the VF number 1..NumVFs;
* SET_STATE follows :data:`virtio_lm.pf.state.TRANSITIONS`; the device's
  :class:`~virtio_lm.devices.base.Migratable` calls do the work: QUIESCE ->
  ``mig_quiesce``, FREEZE -> ``mig_freeze`` then the image is taken with
  ``mig_save`` (GET_STATE_ATTRS reports its exact size), UNFREEZE ->
  validate + restore any restored image then ``mig_unfreeze``, RUN ->
  ``mig_resume``;
* a VF FLR moves the VF to INIT, drops saved and partly restored images and
  turns its bus mastering back on; dirty tracking is the PF's resource and
  goes on;
* START in a mode IDENTIFY does not report, START while tracking, STOP while
  not tracking, pull commands in push mode and the reverse: ERR;
* GET_DIRTY_REPORT_SIZE takes the pull snapshot REPORT_DIRTY_PAGES reads;
  reading before a snapshot or past its end is ERR (at the end: 0 bytes, OK);
* SAVE_STATE / RESTORE_STATE only in FREEZED; SAVE past the image's end is
  ERR; RESTORE portions may come in any order and overlap (the later wins)
  and must stay within MAX_IMAGE_SIZE.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from virtio_lm.devices.base import Migratable
from virtio_lm.errors import (
    CommandRefusedError,
    MapTableError,
    StalePlanError,
    StateImageError,
    StateTransitionError,
    VirtioLmError,
    WireError,
)
from virtio_lm.pci.function import VirtioPciFunction
from virtio_lm.pci.sriov import SriovPF
from virtio_lm.pf.state import Action, VfStateMachine
from virtio_lm.pf.tracking import DirtyTracker, PullTracker, make_tracker, max_log_pages
from virtio_lm.wire.ctrl import IdentifyResult, MigrationCommand, TrackMode, TrackModeCaps, VfState
from virtio_lm.wire.state import ImageHeader, MAX_IMAGE_SIZE, peek_total_len

VERSION = (1, 0, 0)
ALL_MODES = TrackModeCaps.PUSH_BITMAP | TrackModeCaps.PUSH_BYTEMAP | TrackModeCaps.PULL_BITMAP | TrackModeCaps.PULL_BYTEMAP


class _Portions:
    """An image arriving in portions: bytes by offset plus the ranges covered."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.ranges: list[tuple[int, int]] = []  # merged, sorted, half-open

    def put(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        if end > len(self.buf):
            self.buf.extend(bytes(end - len(self.buf)))
        self.buf[offset:end] = data
        if data:
            merged: list[tuple[int, int]] = []
            lo, hi = offset, end
            for a, b in self.ranges:
                if b < lo or a > hi:
                    merged.append((a, b))
                else:
                    lo, hi = min(lo, a), max(hi, b)
            merged.append((lo, hi))
            self.ranges = sorted(merged)

    def assemble(self) -> bytes:
        """The whole image, if every byte of ``[0, total_len)`` arrived and none beyond."""
        if not self.ranges or self.ranges[0][0] != 0 or self.ranges[0][1] < ImageHeader.SIZE:
            raise StateImageError("image", "the header has not been restored")
        total = peek_total_len(self.buf)
        if len(self.ranges) != 1 or self.ranges[0][1] < total:
            covered = sum(b - a for a, b in self.ranges)
            raise StateImageError("image", f"incomplete: {covered} of {total} bytes restored")
        if self.ranges[0][1] > total:
            raise StateImageError("image", f"{self.ranges[0][1] - total} bytes restored past total_len {total}")
        return bytes(self.buf[:total])


@dataclass
class VfContext:
    """The PF's migration state for one VF."""

    number: int
    fn: VirtioPciFunction
    sm: VfStateMachine = field(default_factory=VfStateMachine)
    tracker: DirtyTracker | None = None
    mode: TrackMode | None = None
    report: bytes | None = None
    image: bytes | None = None
    restoring: _Portions | None = None

    @property
    def device(self) -> Migratable:
        return self.fn.device  # type: ignore[return-value]


@dataclass(frozen=True)
class VfStatus:
    """What a monitor shows of one VF's migration state (:meth:`VfMigrationController.status`)."""

    number: int
    state: VfState
    mode: TrackMode | None  # None: not tracking
    tracked_marks: int  # pages passed to the tracker's mark (0 when not tracking)
    overflow_events: int  # marks past the tracker's capacity


class VfMigrationController:
    """Implements the nine commands of class 128 for the VFs of ``pf``."""

    def __init__(
        self,
        pf: SriovPF,
        *,
        modes: TrackModeCaps = ALL_MODES,
        log_max_pull_bitmap: int = 24,
        log_max_pull_bytemap: int = 24,
        freeze_timeout: float = 10.0,
    ) -> None:
        for m, log in ((TrackMode.PULL_BITMAP, log_max_pull_bitmap), (TrackMode.PULL_BYTEMAP, log_max_pull_bytemap)):
            if not 0 <= log <= max_log_pages(m):
                raise ValueError(f"log_max_pages for {m.name} must be in 0..{max_log_pages(m)}")
        self.pf = pf
        self.modes = TrackModeCaps(modes)
        self.log_max = {TrackMode.PULL_BITMAP: log_max_pull_bitmap, TrackMode.PULL_BYTEMAP: log_max_pull_bytemap}
        self.freeze_timeout = freeze_timeout
        self._lock = threading.RLock()
        self._vfs: dict[int, VfContext] = {}
        pf.add_flr_listener(self._on_vf_flr)
        pf.add_sriov_listener(self._on_sriov_change)
        self._on_sriov_change(pf.num_vfs)

    # ================================================================== VF bookkeeping
    def _on_sriov_change(self, num_vfs: int) -> None:
        with self._lock:
            for ctx in self._vfs.values():
                self._drop_tracking(ctx)
            self._vfs = {}
            for n in range(1, num_vfs + 1):
                fn = self.pf.vf(n)
                ctx = VfContext(n, fn)
                self._vfs[n] = ctx
                fn.add_driver_ok_listener(lambda _fn, ctx=ctx: self._on_driver_ok(ctx))

    def _on_vf_flr(self, number: int) -> None:
        with self._lock:
            ctx = self._vfs.get(number)
            if ctx is None:
                return
            ctx.sm.flr()
            ctx.image = None
            ctx.restoring = None
            ctx.fn.port.bus_master = True

    def _on_driver_ok(self, ctx: VfContext) -> None:
        with self._lock:
            ctx.sm.driver_ok()

    def reset(self) -> None:
        """The PF was reset: every VF's tracking stops (marks still in a dirty ring are dropped:
        a reset device writes no map)."""
        with self._lock:
            for ctx in self._vfs.values():
                self._drop_tracking(ctx, flush=False)

    def _drop_tracking(self, ctx: VfContext, *, flush: bool = True) -> None:
        tr = ctx.tracker
        if tr is not None:
            if ctx.fn.port.writer.tracker is tr:  # type: ignore[attr-defined]
                ctx.fn.port.writer.tracker = None  # type: ignore[attr-defined]
            if flush:
                tr.close()  # the ring's marks go into the map before STOP completes
            else:
                tr.discard_ring()
        ctx.tracker = None
        ctx.mode = None
        ctx.report = None

    def context(self, func_id: int) -> VfContext:
        """The context of VF ``func_id`` (for monitors and tests)."""
        return self._ctx(MigrationCommand.GET_STATE_ATTRS, func_id)

    def status(self, func_id: int) -> VfStatus:
        """A consistent snapshot of VF ``func_id``'s state and tracking (for monitors)."""
        with self._lock:
            ctx = self._ctx(MigrationCommand.GET_STATE_ATTRS, func_id)
            tr = ctx.tracker
            return VfStatus(
                ctx.number,
                ctx.sm.state,
                ctx.mode,
                tr.marks if tr is not None else 0,
                tr.overflow_events if tr is not None else 0,
            )

    def _ctx(self, cmd: MigrationCommand, func_id: int) -> VfContext:
        ctx = self._vfs.get(func_id)
        if ctx is None:
            raise CommandRefusedError(cmd.name, func_id, None, f"func_id must be a VF number in 1..{len(self._vfs)}")
        return ctx

    @staticmethod
    def _refuse(cmd: MigrationCommand, ctx: VfContext, reason: str) -> CommandRefusedError:
        return CommandRefusedError(cmd.name, ctx.number, ctx.sm.state, reason)

    # ================================================================== IDENTIFY
    def identify(self) -> IdentifyResult:
        return IdentifyResult(
            *VERSION,
            dirty_page_track_modes=self.modes,
            log_max_pages_track_pull_bitmap_mode=self.log_max[TrackMode.PULL_BITMAP],
            log_max_pages_track_pull_bytemap_mode=self.log_max[TrackMode.PULL_BYTEMAP],
        )

    # ================================================================== dirty tracking
    def start_dirty_page_track(self, func_id: int, mode: int, segments: list[tuple[int, int]]) -> None:
        cmd = MigrationCommand.START_DIRTY_PAGE_TRACK
        with self._lock:
            ctx = self._ctx(cmd, func_id)
            m = TrackMode(mode)
            if not self.modes & m.cap:
                raise self._refuse(cmd, ctx, f"mode {m.name} is not supported (IDENTIFY reports {self.modes!r})")
            if ctx.tracker is not None:
                raise self._refuse(cmd, ctx, f"already tracking in {ctx.mode.name if ctx.mode else '?'}; STOP first")
            try:
                if m.is_push:
                    tracker = make_tracker(m, pf_port=self.pf.port, segments=segments, buffered=True)
                else:
                    tracker = make_tracker(m, log_max_pages=self.log_max[m], buffered=True)
            except MapTableError as exc:
                raise self._refuse(cmd, ctx, str(exc)) from exc
            ctx.tracker, ctx.mode, ctx.report = tracker, m, None
            ctx.fn.port.writer.tracker = tracker  # type: ignore[attr-defined]

    def stop_dirty_page_track(self, func_id: int) -> None:
        cmd = MigrationCommand.STOP_DIRTY_PAGE_TRACK
        with self._lock:
            ctx = self._ctx(cmd, func_id)
            if ctx.tracker is None:
                raise self._refuse(cmd, ctx, "dirty page tracking is not running")
            self._drop_tracking(ctx)

    def _pull(self, cmd: MigrationCommand, ctx: VfContext) -> PullTracker:
        if ctx.tracker is None:
            raise self._refuse(cmd, ctx, "dirty page tracking is not running")
        if not isinstance(ctx.tracker, PullTracker):
            raise self._refuse(cmd, ctx, f"valid in pull modes only (tracking in {ctx.mode.name if ctx.mode else '?'})")
        return ctx.tracker

    def get_dirty_report_size(self, func_id: int) -> int:
        cmd = MigrationCommand.GET_DIRTY_REPORT_SIZE
        with self._lock:
            ctx = self._ctx(cmd, func_id)
            ctx.report = self._pull(cmd, ctx).snapshot()
            return len(ctx.report)

    def report_dirty_pages(self, func_id: int, offset: int, space: int) -> bytes:
        cmd = MigrationCommand.REPORT_DIRTY_PAGES
        with self._lock:
            ctx = self._ctx(cmd, func_id)
            self._pull(cmd, ctx)
            if ctx.report is None:
                raise self._refuse(cmd, ctx, "no report: GET_DIRTY_REPORT_SIZE first")
            if offset > len(ctx.report):
                raise self._refuse(cmd, ctx, f"offset {offset} is past the report's {len(ctx.report)} bytes")
            return ctx.report[offset : offset + space]

    # ================================================================== state
    def set_state(self, func_id: int, state: int) -> None:
        cmd = MigrationCommand.SET_STATE
        with self._lock:
            ctx = self._ctx(cmd, func_id)
            try:
                plan = ctx.sm.plan(VfState(state))
            except StateTransitionError as exc:
                raise self._refuse(cmd, ctx, str(exc)) from exc
            dev = ctx.device
            action = plan.action
            try:
                if action is Action.QUIESCE:
                    dev.mig_quiesce()
                    if ctx.tracker is not None:
                        ctx.tracker.drain()  # a QUIESCED VF dirties no page: every mark is in its map now
                elif action is Action.FREEZE:
                    dev.mig_freeze(self.freeze_timeout)
                    if ctx.tracker is not None:
                        ctx.tracker.drain()  # its back-end I/O has settled: the last marks are in
                    ctx.image = dev.mig_save()
                    ctx.restoring = None
                elif action is Action.UNFREEZE:
                    if ctx.restoring is not None:
                        validated = dev.mig_validate(ctx.restoring.assemble())
                        dev.mig_restore(validated)
                    dev.mig_unfreeze()
                    ctx.image = None
                    ctx.restoring = None
                elif action is Action.RUN:
                    dev.mig_resume()
            except (StateImageError, WireError) as exc:
                raise self._refuse(cmd, ctx, f"restored image refused: {exc}") from exc
            except VirtioLmError as exc:
                raise self._refuse(cmd, ctx, f"{action.name} failed: {exc}") from exc
            try:
                ctx.sm.apply(plan)
            except StalePlanError as exc:  # an FLR came in between; the VF is in INIT
                raise self._refuse(cmd, ctx, str(exc)) from exc

    def get_state_attrs(self, func_id: int) -> tuple[int, VfState]:
        with self._lock:
            ctx = self._ctx(MigrationCommand.GET_STATE_ATTRS, func_id)
            state = ctx.sm.state
            length = len(ctx.image) if state is VfState.FREEZED and ctx.image is not None else 0
            return length, state

    def save_state(self, func_id: int, offset: int, space: int) -> bytes:
        cmd = MigrationCommand.SAVE_STATE
        with self._lock:
            ctx = self._ctx(cmd, func_id)
            if ctx.sm.state is not VfState.FREEZED or ctx.image is None:
                raise self._refuse(cmd, ctx, "SAVE_STATE is legal only in FREEZED")
            if offset > len(ctx.image):
                raise self._refuse(cmd, ctx, f"offset {offset} is past the image's {len(ctx.image)} bytes")
            return ctx.image[offset : offset + space]

    def restore_state(self, func_id: int, offset: int, data: bytes) -> None:
        cmd = MigrationCommand.RESTORE_STATE
        with self._lock:
            ctx = self._ctx(cmd, func_id)
            if ctx.sm.state is not VfState.FREEZED:
                raise self._refuse(cmd, ctx, "RESTORE_STATE is legal only in FREEZED")
            if offset + len(data) > MAX_IMAGE_SIZE:
                raise self._refuse(cmd, ctx, f"portion ends past the {MAX_IMAGE_SIZE}-byte image limit")
            if ctx.restoring is None:
                ctx.restoring = _Portions()
            ctx.restoring.put(offset, data)
