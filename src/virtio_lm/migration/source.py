"""The sending side of a migration, sans-I/O (see :mod:`virtio_lm.migration.session`).
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from virtio_lm.errors import (
    ConfigMismatchError,
    DestinationError,
    LeaseLostError,
    MigrationCancelledError,
    MigrationError,
    MigrationStateError,
    NotConvergingError,
    PeerGoneError,
    StreamError,
    UnexpectedSectionError,
)
from virtio_lm.migration.endpoint import SourceEndpoint
from virtio_lm.migration.events import (
    Clock,
    Event,
    MigrationEvent,
    PassEvent,
    ThrottleEvent,
    VmStateEvent,
)
from virtio_lm.migration.lease import Lease
from virtio_lm.migration.history import RECALIBRATE, ROUND_TRIPS, SwitchoverHistory
from virtio_lm.migration.policy import (
    Decision,
    MigrationParams,
    Policy,
    RoundReport,
    TokenBucket,
)
from virtio_lm.migration.tables import (
    SOURCE_FAILURES,
    SOURCE_STATUS,
    SOURCE_TABLE,
    SOURCE_TERMINAL,
    SourceAction,
    SourceInput,
    SourcePhase,
    as_migration_error,
)
from virtio_lm.wire.stream import (
    MAX_RAM_PAGES,
    MAX_ZERO_RUNS,
    OVERHEAD,
    Abort,
    Ack,
    Commit,
    CpuState,
    Device,
    Direction,
    Error,
    ErrorCode,
    Hello,
    RamPages,
    Ready,
    RoundRecord,
    Running,
    Section,
    SectionFlags,
    StreamConfig,
    StreamDecoder,
    StreamEncoder,
    ZeroRuns,
    zero_runs,
)

DOWNTIME_PHASES = ("pause", "guest-state", "quiesce", "final-dirty", "freeze-save", "send", "restore", "commit", "run")



# ====================================================================== source
class SourceSession:
    """The sending side of one migration (create a new one for each attempt).

    ``to_file``: the stream goes to a file (``migrate file:PATH``): no
    destination messages; when the last byte is written the status is
    ``completed`` and the VM stays stopped (``postmigrate``), as QEMU does.
    """

    WINDOW_PAGES = 16384  # pages checked for zero at once

    def __init__(
        self,
        endpoint: SourceEndpoint,
        params: MigrationParams | None = None,
        *,
        clock: Clock,
        to_file: bool = False,
        batch_pages: int = 256,
        history: SwitchoverHistory | None = None,
        lease: Lease | None = None,
    ) -> None:
        if not 1 <= batch_pages <= MAX_RAM_PAGES:
            raise ValueError(f"batch_pages must be 1..{MAX_RAM_PAGES}")
        self.ep = endpoint
        self.params = params or MigrationParams()
        self.params.check()
        self.clock = clock
        self.to_file = to_file
        self.batch_pages = batch_pages
        self.history = history  # learned switch-over costs (None: pages-only estimate)
        self.lease = lease  # the VM's lease (None: an unknown outcome needs the operator's word)
        self.commit_sent = False  # COMMIT went out (the point of no return by ourselves)
        self.resolution: str | None = None  # where an unknown outcome was settled: source / destination
        self.fixed_cost_estimate: float | None = None
        self.phase = SourcePhase.IDLE
        self.vm_state = "running"
        self.error: MigrationError | None = None
        self.rollback_error: BaseException | None = None
        self.release_error: BaseException | None = None
        self.config: StreamConfig | None = None
        self._events: list[Event] = []
        self._enc = StreamEncoder()
        self._dec = StreamDecoder(Direction.TO_SOURCE)
        self._out: deque[list[bytes | memoryview]] = deque()
        self._peer_dead = False
        self.policy: Policy | None = None
        self.bucket = TokenBucket(self.params.max_bandwidth, self.params.burst_s, clock())
        # round production
        self._round = 0
        self._round_pages = np.zeros(0, dtype=np.uint64)
        self._cursor = 0
        self._nz = np.zeros(0, dtype=np.uint64)
        self._nz_pos = 0
        self._final = False
        self._pending = np.zeros(0, dtype=np.uint64)
        self._round_start = 0.0
        self._round_stats = [0, 0, 0]  # normal, zero, bytes
        self._scan_s = 0.0  # time the round spent checking pages for zero
        self._images: list[tuple[int, bytes]] = []
        self._cpu = b""
        self._complete_at: int | None = None  # stream offset after COMPLETE
        self._await_ack: int | None = None  # sequence number of the ROUND record whose ACK ends the round
        self._acked = False  # that ACK came: decide at the next produce()
        self._ack: Ack | None = None  # the latest ACK
        self._acked_bytes = 0  # the destination's stream offset in its latest ACK
        # statistics
        self.t_start: float | None = None
        self.t_setup_done: float | None = None
        self.t_end: float | None = None
        self.produced = 0
        self.sent = 0
        self.normal_pages = 0
        self.zero_pages = 0
        self.dirty_sync_count = 0
        self.last_report: RoundReport | None = None
        self.rounds: list[RoundRecord] = []
        self.throttle = 0
        self.dest_bytes_received = 0
        self._pps = 0.0
        self.prepare_s = 0.0  # prepare_switchover's time (before the pause: not downtime)
        self.collect_s = 0.0  # how long the latest dirty collection took (the final one costs about as much)
        self.rtt_s: float | None = None  # shortest ROUND record -> ACK seen (an upper bound of the round trip)
        self._ack_wait_from: float | None = None  # when the awaited ROUND record left
        self._await_offset = 0  # stream offset just past that record
        self._calibrated_s: float | None = None  # the latest calibration (at start-up, then at our start)
        self.calibration_s = 0.0  # how long our own calibration took (part of setup)
        self._calibrated_restore_s = 0.0  # of the calibration: the destination's restore (reported only)
        # none | calibrated | calibrated+learned | learned | calibrated-over-limit-ignored
        self.fixed_cost_source = "none"
        self._t: dict[str, float] = {}
        self.downtime_phases: dict[str, float] = {}
        self.dest_restore_us: int | None = None
        self.dest_start_us: int | None = None
        self.downtime: float | None = None
        self.downtime_overrun = 0.0  # seconds over downtime-limit (0: within)
        self.downtime_overrun_phase: str | None = None

    # ------------------------------------------------------------------ properties
    @property
    def status(self) -> str:
        return SOURCE_STATUS[self.phase]

    @property
    def finished(self) -> bool:
        return self.phase in SOURCE_TERMINAL

    @property
    def committed(self) -> bool:
        """COMMIT was sent (or the file completed): the source never resumes by itself."""
        return self.vm_state == "postmigrate"

    @property
    def wants_to_send(self) -> bool:
        if self._out:
            return True
        if self._peer_dead:
            return False
        return self._producing

    @property
    def _producing(self) -> bool:
        """The current round has sections left to produce (not waiting for its ACK)."""
        if self.phase is SourcePhase.PRECOPY:
            return self._await_ack is None
        return self.phase is SourcePhase.SWITCHOVER and self._complete_at is None

    @property
    def mid_switchover(self) -> bool:
        """Between the switch-over's two stages (CPU_STATE handed out, the VFs not yet frozen):
        a transport sends and comes straight back; events can wait until after the next
        :meth:`produce`."""
        return self._stage_vfs

    @property
    def has_queued(self) -> bool:
        """Sections are queued (control messages such as COMMIT or ABORT): send them
        even when max-bandwidth holds page data back."""
        return bool(self._out)

    @property
    def waiting_for(self) -> str | None:
        """What the session waits for from the destination (None: nothing)."""
        if self.to_file:
            return None
        if self.phase is SourcePhase.PRECOPY and self._await_ack is not None:
            return "round-ack"
        return {
            SourcePhase.SETUP: "config-ack",
            SourcePhase.WAIT_READY: "ready",
            SourcePhase.COMMITTED: "running",
            SourcePhase.SWITCHOVER: "ready" if self._complete_at is not None else None,
        }.get(self.phase)

    def poll_events(self) -> list[Event]:
        ev, self._events = self._events, []
        return ev

    def send_budget(self) -> int:
        """Bytes max-bandwidth allows to hand out now."""
        return self.bucket.available(self.clock())

    def budget_wait(self) -> float:
        """Seconds until max-bandwidth allows the next section (0: now)."""
        return self.bucket.wait(self.clock(), self.batch_pages * self._page_cost())

    # ------------------------------------------------------------------ calls in
    def start(self) -> None:
        """Begin: HELLO (and, for a file, round 0 right away)."""
        self._input(SourceInput.START, local=True)
        if self.to_file and self.phase is SourcePhase.SETUP:
            self._input(SourceInput.CONFIG_ACK)

    def cancel(self) -> bool:
        """migrate_cancel.  True if it took effect (False after COMMIT or the end)."""
        before = self.phase
        self._input(SourceInput.CANCEL, MigrationCancelledError("migration cancelled"), local=True)
        return self.phase is SourcePhase.CANCELLED and before is not SourcePhase.CANCELLED

    def resolve(self, run: str | None = None) -> str:
        """Settle an unknown outcome (status ``commit-unknown``: COMMIT went out, then the
        destination was lost).  With a lease it decides: reclaimed -> the VM resumes here
        (status ``failed``, rolled back); taken by the destination -> this side hands over
        (status ``completed``, VFs released).  Without one, ``run`` (``source`` /
        ``destination``) is the operator's word.  Returns where the VM runs."""
        if self.phase is not SourcePhase.UNRESOLVED:
            raise MigrationStateError(f"nothing to resolve in status {self.status}")
        if self.lease is not None:
            if run is not None:
                raise MigrationStateError("the VM has a lease: the lease decides where it runs, not the caller")
            run = "source" if self.lease.reclaim() else "destination"  # an OSError: unresolved still
        elif run not in ("source", "destination"):
            raise MigrationStateError("the VM has no lease: say where it runs (source or destination)")
        self.resolution = run
        self._input(SourceInput.RESOLVE_SOURCE if run == "source" else SourceInput.RESOLVE_DEST, local=True)
        return run

    def on_sent(self, nbytes: int) -> None:
        """The transport wrote ``nbytes`` more of what :meth:`produce` handed out."""
        self.sent += nbytes
        if self.policy is not None:
            self.policy.record_sent(nbytes)
        if self._await_ack is not None and self._ack_wait_from is None and self.sent >= self._await_offset:
            self._ack_wait_from = self.clock()
        if (
            self._complete_at is not None
            and self.sent >= self._complete_at
            and self.phase is SourcePhase.SWITCHOVER
        ):
            self._t["sent"] = self.clock()
            self._input(SourceInput.FILE_DONE if self.to_file else SourceInput.FINAL_SENT)

    def receive(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the destination."""
        try:
            sections = self._dec.feed(data)
        except StreamError as exc:
            self._input(SourceInput.BAD_STREAM, exc)
            return
        for sec in sections:
            self._on_section(sec)

    def on_peer_closed(self, exc: BaseException | None = None) -> None:
        """The destination's direction ended (EOF), or the link failed with ``exc``."""
        self._peer_dead = True
        if isinstance(exc, PeerGoneError):
            err: MigrationError = exc
        else:
            err = PeerGoneError(f"destination gone: {exc}" if exc else "destination closed the connection")
            if exc is not None:
                err.__cause__ = exc
        if self.phase is SourcePhase.COMPLETED:
            return
        self._out.clear()
        self._input(SourceInput.PEER_GONE, err)

    # ------------------------------------------------------------------ bytes out
    def produce(self, max_bytes: int = 1 << 20) -> list[bytes | memoryview]:
        """Hand out whole sections: about ``max_bytes`` within max-bandwidth (a section
        may overshoot by one page); control sections are never held back."""
        now = self.clock()
        limit = min(max_bytes, self.bucket.available(now))
        out: list[bytes | memoryview] = []
        n = 0
        while True:
            if self._out:
                parts = self._out.popleft()
                out.extend(parts)
                n += sum(len(p) for p in parts)
                continue
            if self._flush_now:  # these bytes go to the peer before the next step
                self._flush_now = False
                break
            if n >= limit or self.finished or self._peer_dead:
                break
            if self._producing:
                try:
                    self._step(limit - n)
                except Exception as exc:  # the endpoint failed: roll back
                    self._input(SourceInput.LOCAL_ERROR, as_migration_error(exc, "source endpoint"))
                continue
            break
        self.produced += n
        self.bucket.spend(n, now)
        return out

    def _page_cost(self) -> int:
        ps = self.config.page_size if self.config else 4096
        return ps + 8 + -(-OVERHEAD // self.batch_pages)

    def _emit(self, body, flags: SectionFlags = SectionFlags.NONE) -> int:
        parts = self._enc.encode_parts(body, flags)
        self._out.append(parts)
        return sum(len(p) for p in parts)

    def _step(self, room: int) -> None:
        """One piece of the current round: a window's zero check, or one RAM section."""
        if self._acked:
            self._acked = False
            self._decide()
            return
        if self._stage_vfs:
            self._switch_vfs()
            return
        flags = SectionFlags.FINAL if self._final else SectionFlags.NONE
        if self._nz_pos < len(self._nz):
            k = min(self.batch_pages, len(self._nz) - self._nz_pos, max(1, room // self._page_cost()))
            pages = self._nz[self._nz_pos : self._nz_pos + k]
            self._nz_pos += k
            data = self.ep.read_pages(pages)
            self._round_stats[2] += self._emit(RamPages(pages, data), flags)
            self._round_stats[0] += k
            self.normal_pages += k
            return
        if self._cursor < len(self._round_pages):
            window = self._round_pages[self._cursor : self._cursor + self.WINDOW_PAGES]
            self._cursor += len(window)
            t0 = self.clock()
            zm = np.asarray(self.ep.zero_mask(window), dtype=bool)
            self._scan_s += self.clock() - t0
            zeros = window[zm]
            if len(zeros):
                runs = zero_runs(zeros)
                for i in range(0, len(runs), MAX_ZERO_RUNS):
                    self._round_stats[2] += self._emit(ZeroRuns(runs[i : i + MAX_ZERO_RUNS]), flags)
                self._round_stats[1] += len(zeros)
                self.zero_pages += len(zeros)
            self._nz = window[~zm]
            self._nz_pos = 0
            return
        if self._final:
            self._end_final()
        else:
            self._end_round()

    def _begin_round(self, pages: np.ndarray) -> None:
        self._round_pages = pages.astype(np.uint64, copy=False)
        self._cursor = 0
        self._nz = np.zeros(0, dtype=np.uint64)
        self._nz_pos = 0
        self._round_stats = [0, 0, 0]
        self._round_start = self.clock()
        self._scan_s = 0.0

    def _round_record(self, flags: SectionFlags) -> None:
        elapsed = self.clock() - self._round_start
        rec = RoundRecord(
            self._round, self.throttle, len(self._round_pages), self._round_stats[0], self._round_stats[1],
            self._round_stats[2], max(0, int(elapsed * 1e6)),
        )
        self.rounds.append(rec)
        if elapsed > 0:
            self._pps = len(self._round_pages) / elapsed
        self._emit(rec, flags)

    def _end_round(self) -> None:
        """The round's pages are out: its ROUND record follows.  Over a socket the round
        ends when the destination ACKs that record (:meth:`_round_acked`); a file has
        no ACKs, so its bytes count as delivered when written."""
        assert self.policy is not None
        self._round_record(SectionFlags.NONE)
        if not self.to_file:
            self._await_ack = self._enc.seq - 1
            self._await_offset = self._enc.offset
            self._ack_wait_from = None
            return
        self._record_delivered(self._round_stats[2])
        self._decide()

    def _record_delivered(self, nbytes: int) -> None:
        """The round's ``nbytes`` arrived: a bandwidth sample over the round's time, the zero
        check left out (it is not the link's: a final send is pages with data)."""
        assert self.policy is not None
        now = self.clock()
        seconds = max(now - self._round_start - self._scan_s, 1e-6)
        self.policy.record_delivered(now, nbytes, seconds, provisional=self._round == 0)

    def _refresh_fixed_cost(self) -> None:
        """The fixed-cost estimate from what is known now (see :class:`SwitchoverHistory`)."""
        assert self.policy is not None and self.config is not None
        hist = self.history
        if self._calibrated_s is not None:
            # calibrated without the network and the final collection: add them as measured now
            ratio = hist.ratio(self.config) if hist is not None else None
            self.fixed_cost_source = "calibrated" if ratio is None else "calibrated+learned"
            self.fixed_cost_estimate = (
                self._calibrated_s * (ratio or 1.0) + self.collect_s + ROUND_TRIPS * (self.rtt_s or 0.0)
            )
        elif hist is not None and hist.get(self.config) is not None:
            self.fixed_cost_source = "learned"
            self.fixed_cost_estimate = hist.get(self.config)
        if self.fixed_cost_estimate is None:
            return
        if self.fixed_cost_source == "calibrated" and self.fixed_cost_estimate > self.params.downtime_limit_ms / 1000.0:
            # a scratch switch-over alone, never checked against a real one here, says the limit
            # cannot be met: too little to refuse the migration on (a busy host inflates it);
            # go on as QEMU does, on the pages alone, and say so (query-migrate)
            self.fixed_cost_source = "calibrated-over-limit-ignored"
            self.policy.fixed_cost_s = 0.0
            return
        self.policy.fixed_cost_s = self.fixed_cost_estimate

    def _round_acked(self) -> None:
        ack = self._ack
        assert ack is not None and self.policy is not None
        if self._await_ack is None or ack.acked_seq < self._await_ack:
            return  # an older record's ACK (not sent by this destination, but harmless)
        now = self.clock()
        if self._ack_wait_from is not None:
            rtt = now - self._ack_wait_from
            self.rtt_s = rtt if self.rtt_s is None else min(self.rtt_s, rtt)
        self._record_delivered(max(0, ack.bytes_received - self._acked_bytes))
        self._acked_bytes = ack.bytes_received
        self._await_ack = None
        self._acked = True  # produce() decides next (not from inside this table step)

    def _decide(self) -> None:
        """Collect the dirty pages, ask the policy, and switch over, give up or go on."""
        assert self.policy is not None
        t0 = self.clock()
        dirty = np.asarray(self.ep.collect_dirty(), dtype=bool)
        self.collect_s = self.clock() - t0
        self._refresh_fixed_cost()
        self.dirty_sync_count += 1
        pages = np.flatnonzero(dirty).astype(np.uint64)
        now = self.clock()
        report = self.policy.end_round(now, len(pages))
        self.last_report = report
        self._events.append(PassEvent(self.dirty_sync_count, report, now))
        self._round += 1
        if report.decision is Decision.SWITCH:
            t0 = self.clock()
            self.ep.prepare_switchover()
            self.prepare_s = self.clock() - t0
            if self.prepare_s > 0.001:  # pages dirtied meanwhile go too
                pages = np.union1d(pages, np.flatnonzero(np.asarray(self.ep.collect_dirty(), dtype=bool)))
                pages = pages.astype(np.uint64)
            self._pending = pages
            self._input(SourceInput.CONVERGED)
            return
        if report.decision is Decision.GIVE_UP and self.policy.limit_unreachable:
            self._input(
                SourceInput.GIVE_UP,
                NotConvergingError(
                    f"the switch-over's fixed cost, {self.policy.fixed_cost_s * 1000:.1f} ms ({self.fixed_cost_source}), "
                    f"exceeds downtime-limit {self.params.downtime_limit_ms} ms"
                ),
            )
            return
        if report.decision is Decision.GIVE_UP:
            self._input(
                SourceInput.GIVE_UP,
                NotConvergingError(
                    f"not converging after {self.policy.rounds} rounds: {len(pages)} pages pending, "
                    f"expected downtime {report.expected_downtime_s * 1000:.0f} ms > "
                    f"{self.params.downtime_limit_ms} ms at throttle {self.throttle} %"
                ),
            )
            return
        if report.decision is Decision.THROTTLE:
            self.ep.set_throttle(report.throttle)
            self.throttle = report.throttle
            self._events.append(ThrottleEvent(report.throttle, now))
        self._begin_round(pages)

    def _end_final(self) -> None:
        assert self.config is not None
        self._round_record(SectionFlags.FINAL)
        t = self._t
        fixed_us = int((t["send"] - t["pause"]) * 1e6) if "send" in t and "pause" in t and not self.to_file else 0
        self._emit(self._enc.complete(fixed_us))
        self._complete_at = self._enc.offset

    # ------------------------------------------------------------------ bytes in
    def _on_section(self, sec: Section) -> None:
        body = sec.body
        if isinstance(body, Ack):
            if body.acked_seq >= self._enc.seq:
                self._input(
                    SourceInput.BAD_STREAM,
                    UnexpectedSectionError(f"ACK of section {body.acked_seq} never sent", section="ACK", offset=sec.offset),
                )
                return
            self.dest_bytes_received = max(self.dest_bytes_received, body.bytes_received)
            self._ack = body
            if body.acked_seq == 0:
                self._acked_bytes = body.bytes_received
                self._input(SourceInput.CONFIG_ACK)
            else:
                self._input(SourceInput.ROUND_ACK)
        elif isinstance(body, Ready):
            self.dest_restore_us = body.restore_us
            self._input(SourceInput.READY)
        elif isinstance(body, Running):
            self.dest_start_us = body.start_us
            self._input(SourceInput.RUNNING)
        elif isinstance(body, Error):
            err: MigrationError = (
                ConfigMismatchError(body.text) if body.code is ErrorCode.CONFIG_MISMATCH
                else DestinationError(body.code, body.text)
            )
            self._input(SourceInput.DEST_ERROR, err)
        else:  # pragma: no cover - the decoder only yields destination->source types
            raise AssertionError(sec.type)

    # ------------------------------------------------------------------ the table
    def _input(self, inp: SourceInput, exc: MigrationError | None = None, *, local: bool = False) -> None:
        step = SOURCE_TABLE[self.phase, inp]
        if step is None:
            if local or inp is SourceInput.BAD_STREAM:
                raise MigrationStateError(f"{inp.value} is not allowed in status {self.status} ({self.phase.value})")
            self._input(
                SourceInput.BAD_STREAM,
                UnexpectedSectionError(f"{inp.value} not expected in phase {self.phase.value}"),
            )
            return
        if step.action is SourceAction.IGNORE:
            return
        if (
            step.action in (SourceAction.ROLLBACK, SourceAction.CANCEL) and self.lease is not None
            and self.phase in (SourcePhase.SWITCHOVER, SourcePhase.WAIT_READY)
        ):
            # the destination may hold READY: resume only with the lease reclaimed (lease.py)
            try:
                kept = self.lease.reclaim()
            except OSError as e:
                if self.error is None:
                    self.error = as_migration_error(e, "the VM's lease cannot be read")
                self._input(SourceInput.LEASE_UNREADABLE, local=True)
                return
            if not kept:
                self.resolution = "destination"
                self._input(SourceInput.LEASE_LOST, local=True)
                return
        if exc is not None and self.error is None and step.next in (
            SourcePhase.FAILED, SourcePhase.CANCELLED, SourcePhase.UNRESOLVED
        ):
            self.error = exc
        try:
            self._perform(step.action)
        except Exception as e:
            if inp in SOURCE_FAILURES or inp in (SourceInput.CANCEL, SourceInput.GIVE_UP):
                raise  # pragma: no cover - failure actions catch their own errors
            self._input(SourceInput.LOCAL_ERROR, as_migration_error(e, f"{step.action.value}"))
            return
        self._set_phase(step.next)

    def _set_phase(self, phase: SourcePhase) -> None:
        old_status = self.status
        self.phase = phase
        now = self.clock()
        if phase in SOURCE_TERMINAL and self.t_end is None:
            self.t_end = now
        if self.status != old_status:
            data = {}
            if self.status == "completed" and self.downtime_overrun:
                data = {"downtime-overrun": round(self.downtime_overrun * 1000, 3),
                        "downtime-overrun-phase": self.downtime_overrun_phase}
            self._events.append(MigrationEvent(self.status, now, data))

    def _set_vm(self, state: str) -> None:
        if state != self.vm_state:
            self.vm_state = state
            self._events.append(VmStateEvent(state, self.clock()))

    def _perform(self, action: SourceAction) -> None:
        ep = self.ep
        if action is SourceAction.NONE:
            return
        if action is SourceAction.BEGIN:
            self.t_start = self.clock()
            cfg = ep.config()
            if cfg.num_pages != ep.num_pages:
                raise MigrationError(f"config says {cfg.num_pages} pages, endpoint {ep.num_pages}")
            self.config = cfg
            self.policy = Policy(self.params, cfg.page_size, self._page_cost())
            if self.history is not None and self.history.calibrated(cfg) is not None:
                self._calibrated_s, self._calibrated_restore_s = self.history.calibrated(cfg)  # type: ignore[misc]
            self._refresh_fixed_cost()
            self._emit(Hello(cfg))
            ep.start_tracking()
            return
        if action is SourceAction.PRECOPY:
            assert self.config is not None and self.policy is not None
            limit = self.params.downtime_limit_ms / 1000.0
            if not self.to_file and (self._calibrated_s is None or self._calibrated_s >= RECALIBRATE * limit):
                # no calibration, or one that leaves the pages little room: measure again now
                # (a start-up calibration may have met a passing load); the smaller one counts
                # (now, the VM's own threads compete with the scratch switch-over; they are
                # paused during the real one)
                t0 = self.clock()
                live = ep.calibrate_switchover()
                self.calibration_s = self.clock() - t0
                if live is not None and math.isfinite(live[0]) and live[0] > 0:
                    if self._calibrated_s is None or live[0] < self._calibrated_s:
                        self._calibrated_s, self._calibrated_restore_s = live
                    if self.history is not None:
                        self.history.calibrate(self.config, self._calibrated_s, self._calibrated_restore_s)
                self._refresh_fixed_cost()
            now = self.clock()
            self.t_setup_done = now
            self.policy.begin(now)
            self._begin_round(np.arange(self.config.num_pages, dtype=np.uint64))
            return
        if action is SourceAction.ROUND_ACKED:
            self._round_acked()
            return
        if action is SourceAction.SWITCH_OVER:
            self._switch_over()
            return
        if action is SourceAction.COMMIT:
            self._t["ready"] = self.clock()
            self._emit(Commit())
            self.commit_sent = True
            self._set_vm("postmigrate")
            return
        if action is SourceAction.FINISH:
            self._t["running"] = self.clock()
            self._downtime()
            if self.history is not None and self.config is not None and self.downtime is not None:
                d = self.downtime_phases
                self.history.record(self.config, self.downtime - d.get("send", 0.0))
                if self._calibrated_s is not None:
                    core = (self.downtime - d.get("send", 0.0) - d.get("final-dirty", 0.0)
                            - ROUND_TRIPS * (self.rtt_s or 0.0))
                    self.history.record_ratio(self.config, core / self._calibrated_s)
            try:
                ep.release()
            except Exception as e:  # the destination runs: completed regardless, but say so
                self.release_error = e
            return
        if action is SourceAction.FILE_FINISH:
            self._set_vm("postmigrate")
            self._downtime()
            return
        if action in (SourceAction.ROLLBACK, SourceAction.CANCEL):
            self._rollback(cancelled=action is SourceAction.CANCEL)
            return
        if action is SourceAction.STRAND:  # paused, VFs frozen, memory intact: until resolve()
            self._out.clear()
            self._peer_dead = True  # nothing more goes to this destination
            return
        if action is SourceAction.HAND_OVER:  # the destination holds the lease: it runs the VM
            self._out.clear()
            self._peer_dead = True
            self._set_vm("postmigrate")
            try:
                self.ep.stop_tracking()
                ep.release()
            except Exception as e:
                self.release_error = e
            if self.error is None:
                self.error = LeaseLostError("the destination holds the VM's lease: the VM runs there")
            return
        raise AssertionError(action)  # pragma: no cover

    def _switch_over(self) -> None:
        """The switch-over's first stage: pause the vCPUs, take the guest state and send it
        at once -- the destination rebuilds the guest's software while this side
        quiesces, collects and freezes the VFs (:meth:`_switch_vfs`, the next step,
        after :meth:`produce` handed the CPU_STATE section to the transport)."""
        ep = self.ep
        t = self._t
        t["pause"] = self.clock()
        ep.pause_vcpus()
        self._set_vm("finish-migrate")
        t["guest-state"] = self.clock()
        self._cpu = bytes(ep.cpu_state())
        self._emit(CpuState(self._cpu))
        self._stage_vfs = True
        self._flush_now = True

    def _switch_vfs(self) -> None:
        """The second stage: quiesce, the final dirty pages, freeze + save; the VF images
        go out before the final pages (the destination restores them meanwhile)."""
        ep = self.ep
        t = self._t
        self._stage_vfs = False
        t["quiesce"] = self.clock()
        ep.quiesce_vfs()
        t["final-dirty"] = self.clock()
        final = np.asarray(ep.collect_dirty(), dtype=bool)
        self.dirty_sync_count += 1
        t["freeze-save"] = self.clock()
        self._images = [(int(i), bytes(img)) for i, img in ep.freeze_and_save_vfs()]
        ep.stop_tracking()
        t["send"] = self.clock()
        assert self.config is not None
        types = {vf.index: vf.device_id for vf in self.config.vfs}
        for idx, image in self._images:
            if idx not in types:
                raise MigrationError(f"freeze_and_save_vfs returned an image for VF {idx}, not in the configuration")
            self._emit(Device(idx, types[idx], image))
        pages = np.union1d(self._pending, np.flatnonzero(final).astype(np.uint64)).astype(np.uint64)
        self._final = True
        self._begin_round(pages)

    _stage_vfs = False  # the switch-over's second stage is next (see _switch_over)
    _flush_now = False  # produce() returns what it has before stepping on

    def _rollback(self, *, cancelled: bool) -> None:
        if self.phase is SourcePhase.IDLE:
            self._out.clear()  # BEGIN failed: not even HELLO goes out
        elif not self._peer_dead and not self.to_file:
            code = ErrorCode.CANCELLED if cancelled else (
                ErrorCode.NOT_CONVERGING if isinstance(self.error, NotConvergingError) else ErrorCode.INTERNAL
            )
            if not isinstance(self.error, DestinationError | ConfigMismatchError):
                self._emit(Abort(code, str(self.error) if self.error else "source gave up"))
        try:
            if self.throttle:
                self.ep.set_throttle(0)
                self.throttle = 0
            self.ep.rollback()
        except Exception as e:
            self.rollback_error = e
        self._final = False
        self._stage_vfs = self._flush_now = False
        self._await_ack = None
        self._acked = False
        self._set_vm("running")

    def _downtime(self) -> None:
        t = self._t
        if "pause" not in t:
            return
        end = t.get("running", t.get("sent", self.clock()))
        d = {
            "pause": t["guest-state"] - t["pause"],
            "guest-state": t["quiesce"] - t["guest-state"],
            "quiesce": t["final-dirty"] - t["quiesce"],
            "final-dirty": t["freeze-save"] - t["final-dirty"],
            "freeze-save": t["send"] - t["freeze-save"],
            "send": t.get("sent", end) - t["send"],
        }
        if "running" in t:
            run = (self.dest_start_us or 0) / 1e6
            d["restore"] = t["ready"] - t["sent"]
            d["commit"] = max(0.0, t["running"] - t["ready"] - run)
            d["run"] = t["running"] - t["ready"] - d["commit"]
        self.downtime_phases = d
        self.downtime = end - t["pause"]
        self._overrun()

    def _overrun(self) -> None:
        """By how much the downtime exceeded downtime-limit, and the phase to blame: the
        final send when it took longer over its estimate (pending bytes / bandwidth) than
        the rest took over the fixed-cost estimate, else the longest of the other phases."""
        assert self.downtime is not None
        limit = self.params.downtime_limit_ms / 1000.0
        self.downtime_overrun = max(0.0, self.downtime - limit)
        if not self.downtime_overrun:
            self.downtime_overrun_phase = None
            return
        d = self.downtime_phases
        fixed_expected = self.policy.fixed_cost_s if self.policy else 0.0
        send_expected = 0.0
        if self.last_report is not None and math.isfinite(self.last_report.bandwidth) and self.last_report.bandwidth:
            send_expected = self.last_report.pending_bytes / self.last_report.bandwidth
        send_excess = d.get("send", 0.0) - send_expected
        fixed_excess = (self.downtime - d.get("send", 0.0)) - fixed_expected
        others = {k: v for k, v in d.items() if k != "send"}
        if send_excess >= fixed_excess or not others:
            self.downtime_overrun_phase = "send"
        else:
            self.downtime_overrun_phase = max(others, key=others.__getitem__)

    # ------------------------------------------------------------------ query-migrate
    def info(self) -> dict:
        """query-migrate: QEMU's field names (times in ms, mbps in Mbit/s) plus ours."""
        now = self.clock()
        out: dict = {"status": self.status, "vm-status": self.vm_state}
        if self.t_start is None:
            return out
        end = self.t_end if self.t_end is not None else now
        page = self.config.page_size if self.config else 4096
        remaining_pages = 0
        if self.phase in (SourcePhase.PRECOPY, SourcePhase.SWITCHOVER):
            remaining_pages = (len(self._round_pages) - self._cursor) + (len(self._nz) - self._nz_pos)
        bw = self.policy.bandwidth if self.policy else math.inf
        out.update(
            {
                "total-time": int((end - self.t_start) * 1000),
                "setup-time": int(((self.t_setup_done or end) - self.t_start) * 1000),
                "expected-downtime": int(self.last_report.expected_downtime_s * 1000)
                if self.last_report and math.isfinite(self.last_report.expected_downtime_s) else 0,
                "ram": {
                    "transferred": self.sent,
                    "remaining": remaining_pages * page,
                    "total": self.config.memory_size if self.config else 0,
                    "duplicate": self.zero_pages,
                    "normal": self.normal_pages,
                    "normal-bytes": self.normal_pages * page,
                    "dirty-sync-count": self.dirty_sync_count,
                    "mbps": round(bw * 8 / 1e6, 3) if math.isfinite(bw) else 0.0,
                    "pages-per-second": int(self._pps),
                    "dirty-pages-rate": int(self.policy.dirty_rate) if self.policy else 0,
                    "page-size": page,
                },
                "cpu-throttle-percentage": self.throttle,
                "rounds": len(self.rounds),
            }
        )
        if self.fixed_cost_estimate is not None:
            out["x-switchover-cost-estimate"] = round(self.fixed_cost_estimate * 1000, 3)
            out["x-switchover-cost-source"] = self.fixed_cost_source
        if self._calibrated_s is not None:
            out["x-switchover-calibration"] = {
                "ms": round(self._calibrated_s * 1000, 3), "restore-ms": round(self._calibrated_restore_s * 1000, 3),
                "measured-at-start-ms": round(self.calibration_s * 1000, 3),
            }
        if self.downtime is not None:
            out["downtime"] = int(self.downtime * 1000)
            out["downtime-phases"] = {k: round(v * 1000, 3) for k, v in self.downtime_phases.items()}
            out["downtime-limit"] = self.params.downtime_limit_ms
            out["downtime-overrun"] = round(self.downtime_overrun * 1000, 3)
            if self.downtime_overrun_phase is not None:
                out["downtime-overrun-phase"] = self.downtime_overrun_phase
        if self.error is not None:
            out["error-desc"] = str(self.error)
        out["x-commit-sent"] = self.commit_sent
        out["x-lease"] = self.lease is not None
        if self.resolution is not None:
            out["x-resolution"] = self.resolution
        return out
