"""Sans-I/O pre-copy migration sessions: calls and bytes in, bytes and events out.

No sockets, no threads, no clock of their own: a session is given a
``clock`` callable (the transport passes ``time.monotonic``, tests a fake
clock) and reads it only to stamp what it is told.  The transport moves the
bytes (:mod:`virtio_lm.migration.transport`).

Source, as a transport drives it::

    s = SourceSession(endpoint, params, clock=time.monotonic)
    s.start()                                # HELLO; dirty tracking on; status setup
    while not s.finished or s.wants_to_send:
        if s.wants_to_send and s.budget_wait() == 0:
            chunks = s.produce(1 << 20)      # whole sections, within max-bandwidth
            send(chunks); s.on_sent(nbytes)
        else:
            wait for input (at most s.budget_wait() when only the budget holds it back)
        s.receive(bytes_from_destination)    # or s.on_peer_closed(exc) / s.cancel()

Statuses (QEMU's ``MigrationStatus`` names): ``none`` -> ``setup`` (HELLO sent,
waiting for the destination's ACK of the configuration) -> ``active``
(pre-copy rounds) -> ``device`` (vCPUs paused: final pages, VF images, CPU
state, then waiting for READY, COMMIT, waiting for RUNNING) -> ``completed``;
or ``failed`` / ``cancelled``.  QEMU's ``pre-switchover`` (a pause for the
management layer) and ``cancelling`` (rollback here is synchronous) are not
used.  The VM's run state (QEMU ``RunState``) is separate: ``running``,
``finish-migrate`` (paused for the switch-over), ``postmigrate`` (after
COMMIT: the source never resumes by itself).

The phases behind the statuses move by :data:`SOURCE_TABLE` / :data:`DEST_TABLE`,
one entry for every (phase, input) pair: a :class:`Step` (next phase, action)
or ``None`` (the input is not allowed there: a peer's is a protocol error
handled as BAD_STREAM, a local call raises :class:`MigrationStateError`).  An
action that raises is input LOCAL_ERROR in the phase it started from, so a
phase is entered only when its action succeeded.

Never both running: the destination starts only on COMMIT, and the source
sends COMMIT only after READY.  Before COMMIT every failure rolls the source
back (the VM runs on where it was); after COMMIT a failure leaves the source
in ``postmigrate`` with status ``failed`` (its memory and frozen VFs intact for
an operator to decide).
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from virtio_lm.errors import (
    ConfigMismatchError,
    DestinationError,
    MigrationCancelledError,
    MigrationError,
    MigrationStateError,
    NotConvergingError,
    PeerGoneError,
    StreamError,
    StreamTruncatedError,
    UnexpectedSectionError,
)
from virtio_lm.migration.endpoint import DestEndpoint, SourceEndpoint
from virtio_lm.migration.policy import Decision, MigrationParams, Policy, RoundReport, TokenBucket
from virtio_lm.wire.stream import (
    MAX_RAM_PAGES,
    MAX_ZERO_RUNS,
    OVERHEAD,
    Abort,
    Ack,
    CompleteRecord,
    CpuState,
    Commit,
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
    SectionType,
    StreamConfig,
    StreamDecoder,
    StreamEncoder,
    ZeroRuns,
    zero_runs,
)

__all__ = [
    "DEST_TABLE",
    "DestAction",
    "DestInput",
    "DestPhase",
    "DestSession",
    "MigrationEvent",
    "PassEvent",
    "SOURCE_TABLE",
    "SourceAction",
    "SourceInput",
    "SourcePhase",
    "SourceSession",
    "Step",
    "SWITCHOVER_HISTORY",
    "SwitchoverHistory",
    "ThrottleEvent",
    "VmStateEvent",
]

Clock = Callable[[], float]


# ====================================================================== events
@dataclass(frozen=True)
class MigrationEvent:
    """QMP MIGRATION: the status changed.  ``completed`` with a downtime over the limit
    carries ``downtime-overrun`` (ms) and ``downtime-overrun-phase`` in ``data``."""

    status: str
    time: float
    data: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PassEvent:
    """QMP MIGRATION_PASS: a pre-copy round ended (``pass_`` = dirty-sync-count)."""

    pass_: int
    report: RoundReport
    time: float


@dataclass(frozen=True)
class VmStateEvent:
    """The VM's run state changed (QMP STOP on ``finish-migrate``, RESUME on ``running``)."""

    state: str
    time: float


@dataclass(frozen=True)
class ThrottleEvent:
    """Auto-converge set the vCPU throttle."""

    percent: int
    time: float


Event = MigrationEvent | PassEvent | VmStateEvent | ThrottleEvent


@dataclass(frozen=True)
class Step:
    next: enum.Enum
    action: enum.Enum


# ====================================================================== learned switch-over cost
class SwitchoverHistory:
    """What a host process knows of a switch-over's fixed cost (everything but the final
    pages), per kind of VM (workload and VF device types):

    * **calibrated** -- the latest timed scratch switch-over on the host's spare VFs
      (:mod:`virtio_lm.host.calibrate`: at start-up, and again at a migration's start
      when it leaves the pages little room), which leaves out the network and the
      final dirty collection; with the part of it the destination's restore took;
    * **ratio** -- how completed migrations compared with the calibration they used:
      (their fixed cost less the final collection and ``ROUND_TRIPS`` round trips) /
      calibration, averaged; 1 until a migration completed;
    * **learned** -- the whole fixed cost completed migrations measured, averaged.  A
      source learns it from its downtime phases; a destination from what it saw (the
      source's part as COMPLETE reports it, its own restore after COMPLETE, the
      COMMIT round trip and its start), so a host that received a VM knows it too.

    A source estimates ``calibrated x ratio + final collection + ROUND_TRIPS round trips``
    (the last two measured live), or ``learned`` when it has no calibration; the
    policy adds that to the expected downtime (:mod:`~virtio_lm.migration.policy`).
    """

    def __init__(self, weight: float = 0.5) -> None:
        self.weight = weight  # of a new measurement against what was known
        self._costs: dict[tuple, float] = {}
        self._calibrated: dict[tuple, tuple[float, float]] = {}
        self._ratios: dict[tuple, float] = {}

    @staticmethod
    def key(cfg: StreamConfig) -> tuple:
        return (cfg.workload, tuple(sorted((vf.index, vf.device_id) for vf in cfg.vfs)))

    def _blend(self, table: dict[tuple, float], cfg: StreamConfig, value: float) -> None:
        if not (math.isfinite(value) and value >= 0):
            return
        k = self.key(cfg)
        old = table.get(k)
        table[k] = value if old is None else (1 - self.weight) * old + self.weight * value

    def get(self, cfg: StreamConfig) -> float | None:
        """The learned whole fixed cost, if a migration of this kind completed here."""
        return self._costs.get(self.key(cfg))

    def record(self, cfg: StreamConfig, seconds: float) -> None:
        self._blend(self._costs, cfg, seconds)

    def calibrated(self, cfg: StreamConfig) -> tuple[float, float] | None:
        """(seconds, of which the destination's restore) of the latest calibration."""
        return self._calibrated.get(self.key(cfg))

    def calibrate(self, cfg: StreamConfig, seconds: float, restore: float = 0.0) -> None:
        if math.isfinite(seconds) and seconds > 0 and math.isfinite(restore) and 0 <= restore <= seconds:
            self._calibrated[self.key(cfg)] = (seconds, restore)

    def ratio(self, cfg: StreamConfig) -> float | None:
        return self._ratios.get(self.key(cfg))

    def record_ratio(self, cfg: StreamConfig, ratio: float) -> None:
        if math.isfinite(ratio) and 0.05 <= ratio <= 20:  # outside: a broken sample, not a trend
            self._blend(self._ratios, cfg, ratio)


SWITCHOVER_HISTORY = SwitchoverHistory()  # a host process's memory of its migrations


# ====================================================================== source table
class SourcePhase(enum.Enum):
    IDLE = "idle"
    SETUP = "setup"  # HELLO sent, waiting for the configuration ACK
    PRECOPY = "precopy"
    SWITCHOVER = "switchover"  # VM stopped, final data going out
    WAIT_READY = "wait-ready"  # everything sent, waiting for the destination's READY
    COMMITTED = "committed"  # COMMIT sent, waiting for RUNNING
    COMPLETED = "completed"
    FAILED = "failed"  # rolled back: the VM runs on
    CANCELLED = "cancelled"  # rolled back: the VM runs on
    LOST = "lost"  # failed after COMMIT: postmigrate, not resumed


class SourceInput(enum.Enum):
    START = "start"
    CONFIG_ACK = "config-ack"
    ROUND_ACK = "round-ack"
    CONVERGED = "converged"
    FINAL_SENT = "final-sent"
    FILE_DONE = "file-done"
    READY = "ready"
    RUNNING = "running"
    DEST_ERROR = "dest-error"
    PEER_GONE = "peer-gone"
    BAD_STREAM = "bad-stream"
    CANCEL = "cancel"
    GIVE_UP = "give-up"
    LOCAL_ERROR = "local-error"


class SourceAction(enum.Enum):
    NONE = "none"
    IGNORE = "ignore"  # a late input after the end
    BEGIN = "begin"  # HELLO, start_tracking
    PRECOPY = "precopy"  # round 0 begins
    ROUND_ACKED = "round-acked"  # the destination confirmed a round: collect dirty pages, decide
    SWITCH_OVER = "switch-over"  # pause, quiesce, final dirty, freeze+save, stop tracking, cpu state
    COMMIT = "commit"  # send COMMIT: the point of no return
    FINISH = "finish"  # release()
    FILE_FINISH = "file-finish"  # the stream file is complete; the VM stays stopped
    ROLLBACK = "rollback"  # ABORT to the destination (if reachable), throttle off, rollback()
    CANCEL = "cancel"  # the same, status cancelled
    STRAND = "strand"  # failure after COMMIT: stay postmigrate


_S, _SI, _SA = SourcePhase, SourceInput, SourceAction
_SOURCE_TERMINAL = (_S.COMPLETED, _S.FAILED, _S.CANCELLED, _S.LOST)
_SOURCE_FAILURES = (_SI.DEST_ERROR, _SI.PEER_GONE, _SI.BAD_STREAM, _SI.LOCAL_ERROR)


def _build_source_table() -> dict[tuple[SourcePhase, SourceInput], Step | None]:
    t: dict[tuple[SourcePhase, SourceInput], Step | None] = {(p, i): None for p in _S for i in _SI}
    t[_S.IDLE, _SI.START] = Step(_S.SETUP, _SA.BEGIN)
    t[_S.IDLE, _SI.CANCEL] = Step(_S.CANCELLED, _SA.NONE)
    t[_S.IDLE, _SI.LOCAL_ERROR] = Step(_S.FAILED, _SA.ROLLBACK)  # BEGIN failed half way
    for i in (_SI.DEST_ERROR, _SI.PEER_GONE, _SI.BAD_STREAM):
        t[_S.IDLE, i] = Step(_S.FAILED, _SA.NONE)  # nothing started yet
    for p in (_S.SETUP, _S.PRECOPY, _S.SWITCHOVER, _S.WAIT_READY):
        for i in _SOURCE_FAILURES:
            t[p, i] = Step(_S.FAILED, _SA.ROLLBACK)
        t[p, _SI.CANCEL] = Step(_S.CANCELLED, _SA.CANCEL)
    t[_S.SETUP, _SI.CONFIG_ACK] = Step(_S.PRECOPY, _SA.PRECOPY)
    t[_S.PRECOPY, _SI.ROUND_ACK] = Step(_S.PRECOPY, _SA.ROUND_ACKED)
    for p in (_S.SWITCHOVER, _S.WAIT_READY, _S.COMMITTED):
        t[p, _SI.ROUND_ACK] = Step(p, _SA.NONE)
    t[_S.PRECOPY, _SI.CONVERGED] = Step(_S.SWITCHOVER, _SA.SWITCH_OVER)
    t[_S.PRECOPY, _SI.GIVE_UP] = Step(_S.FAILED, _SA.ROLLBACK)
    t[_S.SWITCHOVER, _SI.FINAL_SENT] = Step(_S.WAIT_READY, _SA.NONE)
    t[_S.SWITCHOVER, _SI.FILE_DONE] = Step(_S.COMPLETED, _SA.FILE_FINISH)
    t[_S.WAIT_READY, _SI.READY] = Step(_S.COMMITTED, _SA.COMMIT)
    t[_S.COMMITTED, _SI.RUNNING] = Step(_S.COMPLETED, _SA.FINISH)
    for i in _SOURCE_FAILURES:
        t[_S.COMMITTED, i] = Step(_S.LOST, _SA.STRAND)
    t[_S.COMMITTED, _SI.CANCEL] = Step(_S.COMMITTED, _SA.IGNORE)  # too late: QEMU ignores it too
    for p in _SOURCE_TERMINAL:
        for i in _SI:
            t[p, i] = None if i is _SI.START else Step(p, _SA.IGNORE)
    return t


SOURCE_TABLE = _build_source_table()

SOURCE_STATUS = {
    _S.IDLE: "none",
    _S.SETUP: "setup",
    _S.PRECOPY: "active",
    _S.SWITCHOVER: "device",
    _S.WAIT_READY: "device",
    _S.COMMITTED: "device",
    _S.COMPLETED: "completed",
    _S.FAILED: "failed",
    _S.CANCELLED: "cancelled",
    _S.LOST: "failed",
}

RECALIBRATE = 0.5  # a calibration at or above this share of downtime-limit is measured again at the start
# what a calibration cannot see: READY -> COMMIT -> RUNNING is two round trips, the final data's
# last bytes half of one
ROUND_TRIPS = 2.5

DOWNTIME_PHASES = ("pause", "guest-state", "quiesce", "final-dirty", "freeze-save", "send", "restore", "commit", "run")


def _as_migration_error(exc: BaseException, what: str) -> MigrationError:
    if isinstance(exc, MigrationError):
        return exc
    err = MigrationError(f"{what}: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


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
        return self.phase in _SOURCE_TERMINAL

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
                    self._input(SourceInput.LOCAL_ERROR, _as_migration_error(exc, "source endpoint"))
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
        if exc is not None and self.error is None and step.next in (
            SourcePhase.FAILED, SourcePhase.CANCELLED, SourcePhase.LOST
        ):
            self.error = exc
        try:
            self._perform(step.action)
        except Exception as e:
            if inp in _SOURCE_FAILURES or inp in (SourceInput.CANCEL, SourceInput.GIVE_UP):
                raise  # pragma: no cover - failure actions catch their own errors
            self._input(SourceInput.LOCAL_ERROR, _as_migration_error(e, f"{step.action.value}"))
            return
        self._set_phase(step.next)

    def _set_phase(self, phase: SourcePhase) -> None:
        old_status = self.status
        self.phase = phase
        now = self.clock()
        if phase in _SOURCE_TERMINAL and self.t_end is None:
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
        if action is SourceAction.STRAND:
            self._out.clear()
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
        return out


# ====================================================================== destination table
class DestPhase(enum.Enum):
    WAIT_HELLO = "wait-hello"
    RECEIVING = "receiving"
    WAIT_COMMIT = "wait-commit"  # restored, READY sent (file: waiting for the end of the file)
    COMPLETED = "completed"  # started
    FAILED = "failed"  # aborted (or refused)
    CANCELLED = "cancelled"


class DestInput(enum.Enum):
    HELLO_OK = "hello-ok"
    HELLO_BAD = "hello-bad"
    DATA = "data"  # RAM, ZERO, ROUND, DEVICE, CPU_STATE
    COMPLETE = "complete"
    COMMIT = "commit"
    FILE_END = "file-end"  # a file stream ended right after COMPLETE: it is its own commit
    SOURCE_ABORT = "source-abort"
    PEER_GONE = "peer-gone"
    BAD_STREAM = "bad-stream"
    CANCEL = "cancel"
    LOCAL_ERROR = "local-error"


class DestAction(enum.Enum):
    NONE = "none"
    IGNORE = "ignore"
    ACCEPT = "accept"  # ACK of HELLO
    REFUSE = "refuse"  # ERROR(CONFIG_MISMATCH); nothing touched
    APPLY = "apply"  # write pages / keep images and CPU state / ACK a ROUND
    RESTORE = "restore"  # check completeness, restore_vfs, set_cpu_state, READY
    START = "start"  # start(), RUNNING
    ABORT = "abort"  # abort(), no message (the source is gone or gave up)
    ABORT_ERROR = "abort-error"  # abort(), ERROR to the source


_D, _DI, _DA = DestPhase, DestInput, DestAction
_DEST_TERMINAL = (_D.COMPLETED, _D.FAILED, _D.CANCELLED)


def _build_dest_table() -> dict[tuple[DestPhase, DestInput], Step | None]:
    t: dict[tuple[DestPhase, DestInput], Step | None] = {(p, i): None for p in _D for i in _DI}
    for p in (_D.WAIT_HELLO, _D.RECEIVING, _D.WAIT_COMMIT):
        t[p, _DI.SOURCE_ABORT] = Step(_D.FAILED, _DA.ABORT)
        t[p, _DI.PEER_GONE] = Step(_D.FAILED, _DA.ABORT)
        t[p, _DI.BAD_STREAM] = Step(_D.FAILED, _DA.ABORT_ERROR)
        t[p, _DI.LOCAL_ERROR] = Step(_D.FAILED, _DA.ABORT_ERROR)
        t[p, _DI.CANCEL] = Step(_D.CANCELLED, _DA.ABORT_ERROR)
    t[_D.WAIT_HELLO, _DI.HELLO_OK] = Step(_D.RECEIVING, _DA.ACCEPT)
    t[_D.WAIT_HELLO, _DI.HELLO_BAD] = Step(_D.FAILED, _DA.REFUSE)
    t[_D.RECEIVING, _DI.DATA] = Step(_D.RECEIVING, _DA.APPLY)
    t[_D.RECEIVING, _DI.COMPLETE] = Step(_D.WAIT_COMMIT, _DA.RESTORE)
    t[_D.WAIT_COMMIT, _DI.COMMIT] = Step(_D.COMPLETED, _DA.START)
    t[_D.WAIT_COMMIT, _DI.FILE_END] = Step(_D.COMPLETED, _DA.START)
    for p in _DEST_TERMINAL:
        for i in _DI:
            t[p, i] = Step(p, _DA.IGNORE)
    return t


DEST_TABLE = _build_dest_table()

DEST_STATUS = {
    _D.WAIT_HELLO: "setup",
    _D.RECEIVING: "active",
    _D.WAIT_COMMIT: "device",
    _D.COMPLETED: "completed",
    _D.FAILED: "failed",
    _D.CANCELLED: "cancelled",
}


# ====================================================================== destination
@dataclass
class _Received:
    covered: np.ndarray
    images: dict[int, bytes] = field(default_factory=dict)
    cpu: bytes | None = None
    rounds: list[RoundRecord] = field(default_factory=list)
    normal: int = 0
    zero: int = 0


class DestSession:
    """The receiving side of one migration (``migrate-incoming``).

    ``from_file``: the stream is read from a file: no messages back, and the
    end of the file right after COMPLETE takes the place of COMMIT.
    """

    def __init__(
        self, endpoint: DestEndpoint, *, clock: Clock, from_file: bool = False,
        history: SwitchoverHistory | None = None,
    ) -> None:
        self.ep = endpoint
        self.history = history
        self._t_precopy: float | None = None  # arrival of the last pre-copy section
        self._t_final: float | None = None  # arrival of the first FINAL section
        self._source_fixed_s: float | None = None  # the source's switch-over time before its final send (COMPLETE)
        self._t_ready: float | None = None
        self._t_complete: float | None = None  # arrival of COMPLETE
        self.switchover_cost: float | None = None  # as seen from here (see SwitchoverHistory)
        self.clock = clock
        self.from_file = from_file
        self.phase = DestPhase.WAIT_HELLO
        self.error: MigrationError | None = None
        self.abort_error: BaseException | None = None
        self.config: StreamConfig | None = None
        # sections are applied as they complete: one assembly buffer serves them all
        self._dec = StreamDecoder(Direction.TO_DEST, reuse_buffers=True)
        self._enc = StreamEncoder()
        self._out: deque[bytes] = deque()
        self._events: list[Event] = []
        self._rx: _Received | None = None
        self._sec: Section | None = None
        self._peer_dead = False
        self.t_start = clock()
        self.t_end: float | None = None
        self.restore_us = 0
        self.start_us = 0

    @property
    def status(self) -> str:
        return DEST_STATUS[self.phase]

    @property
    def finished(self) -> bool:
        return self.phase in _DEST_TERMINAL

    @property
    def wants_to_send(self) -> bool:
        return bool(self._out)

    def poll_events(self) -> list[Event]:
        ev, self._events = self._events, []
        return ev

    def produce(self) -> list[bytes]:
        out = list(self._out)
        self._out.clear()
        return out

    # ------------------------------------------------------------------ calls in
    def receive(self, data: bytes | bytearray | memoryview) -> None:
        if not self.finished:
            self._deliver(lambda: self._dec.feed(data))

    def _deliver(self, decode: Callable[[], list[Section]]) -> None:
        """Decode (``feed`` or ``received``) and act on each complete section, in order."""
        try:
            sections = decode()
        except StreamError as exc:
            self._input(DestInput.BAD_STREAM, exc)
            return
        for sec in sections:
            if self.finished:
                break
            self._on_section(sec)

    def recv_buffer(self) -> memoryview:
        """Where the transport may receive the next bytes straight into (zero copy):
        write at most ``len()`` bytes there, then call :meth:`received`.  (After the
        end or a refused stream: a scratch buffer whose bytes are ignored.)"""
        if not self.finished:
            try:
                return self._dec.recv_buffer()
            except StreamError:
                pass
        return memoryview(bytearray(65536))

    def received(self, n: int) -> None:
        """``n`` bytes were written at the start of the last :meth:`recv_buffer`."""
        if not self.finished:
            self._deliver(lambda: self._dec.received(n))

    def on_peer_closed(self, exc: BaseException | None = None) -> None:
        """The source's direction ended (EOF / end of file), or the link failed with ``exc``."""
        self._peer_dead = True
        if self.finished:
            return
        if self.from_file and exc is None:
            if self.phase is DestPhase.WAIT_COMMIT and self._dec.pending == 0:
                self._input(DestInput.FILE_END)
            else:
                self._input(
                    DestInput.BAD_STREAM,
                    StreamTruncatedError(
                        f"file ended before the stream was complete ({self._dec.pending} bytes of a partial section)",
                        offset=self._dec.offset,
                    ),
                )
            return
        if isinstance(exc, PeerGoneError):
            err: MigrationError = exc
        else:
            what = "source closed the connection" if exc is None else f"source gone: {exc}"
            if self._dec.pending:
                what += f" ({self._dec.pending} bytes into a section at offset {self._dec.offset})"
            err = PeerGoneError(what)
            if exc is not None:
                err.__cause__ = exc
        self._input(DestInput.PEER_GONE, err)

    def cancel(self) -> bool:
        before = self.phase
        self._input(DestInput.CANCEL, MigrationCancelledError("incoming migration cancelled"))
        return self.phase is DestPhase.CANCELLED and before is not DestPhase.CANCELLED

    # ------------------------------------------------------------------ sections
    def _on_section(self, sec: Section) -> None:
        self._sec = sec
        body = sec.body
        if isinstance(body, Hello):
            reason = None
            try:
                reason = self.ep.check_config(body.config)
            except Exception as e:
                self._input(DestInput.LOCAL_ERROR, _as_migration_error(e, "check_config"))
                return
            self.config = body.config
            if reason is None:
                self._input(DestInput.HELLO_OK)
            else:
                self._input(DestInput.HELLO_BAD, ConfigMismatchError(reason))
        elif isinstance(body, CompleteRecord):
            self._t_complete = self.clock()
            self._source_fixed_s = body.source_fixed_us / 1e6 if body.source_fixed_us else None
            self._input(DestInput.COMPLETE)
        elif isinstance(body, Commit):
            self._input(DestInput.COMMIT)
        elif isinstance(body, Abort):
            err = (
                MigrationCancelledError(f"source cancelled: {body.text}") if body.code is ErrorCode.CANCELLED
                else MigrationError(f"source aborted ({body.code.name}): {body.text}")
            )
            self._input(DestInput.SOURCE_ABORT, err)
        else:
            if sec.final:
                if self._t_final is None:
                    self._t_final = self.clock()
            elif sec.type in (SectionType.RAM, SectionType.ZERO, SectionType.ROUND):
                self._t_precopy = self.clock()
            self._input(DestInput.DATA)

    def _input(self, inp: DestInput, exc: MigrationError | None = None) -> None:
        step = DEST_TABLE[self.phase, inp]
        if step is None:
            sec = self._sec
            self._input(
                DestInput.BAD_STREAM,
                UnexpectedSectionError(
                    f"{inp.value} not expected in phase {self.phase.value}",
                    section=sec.type.name if sec else None, offset=sec.offset if sec else None,
                ),
            )
            return
        if step.action is DestAction.IGNORE:
            return
        if exc is not None and self.error is None:
            self.error = exc
        try:
            self._perform(step.action)
        except Exception as e:
            if step.next in (DestPhase.FAILED, DestPhase.CANCELLED):
                raise  # pragma: no cover - failure actions catch their own errors
            err = e if isinstance(e, MigrationError) else _as_migration_error(e, f"destination {step.action.value}")
            self._input(DestInput.LOCAL_ERROR, err)
            return
        old = self.status
        self.phase = step.next
        if self.finished:
            self.t_end = self.clock()
        if self.status != old:
            self._events.append(MigrationEvent(self.status, self.clock()))

    def _send(self, body) -> None:
        if not self.from_file and not self._peer_dead:
            self._out.append(self._enc.encode(body))

    def _perform(self, action: DestAction) -> None:
        ep = self.ep
        sec = self._sec
        if action is DestAction.NONE:
            return
        if action is DestAction.ACCEPT:
            assert self.config is not None and sec is not None
            self._rx = _Received(np.zeros(self.config.num_pages, dtype=bool))
            self._send(Ack(sec.seq, self._dec.offset))
            return
        if action is DestAction.REFUSE:
            self._send(Error(ErrorCode.CONFIG_MISMATCH, str(getattr(self.error, "reason", self.error))))
            return
        if action is DestAction.APPLY:
            assert sec is not None
            self._apply(sec)
            return
        if action is DestAction.RESTORE:
            self._restore()
            return
        if action is DestAction.START:
            t0 = self.clock()
            ep.start()
            self.start_us = int((self.clock() - t0) * 1e6)
            if None not in (self._t_precopy, self._t_final, self._t_ready) and not self.from_file:
                # the source's part: as it reported it in COMPLETE, else the silence seen here
                src_part = self._source_fixed_s
                if src_part is None:
                    src_part = self._t_final - self._t_precopy  # type: ignore[operator]
                self.switchover_cost = (
                    src_part + (self._t_ready - self._t_complete)  # type: ignore[operator]
                    + (t0 - self._t_ready) + self.start_us / 1e6  # type: ignore[operator]
                )
                if self.history is not None and self.config is not None:
                    self.history.record(self.config, self.switchover_cost)
            self._send(Running(self.start_us))
            self._events.append(VmStateEvent("running", self.clock()))
            return
        if action in (DestAction.ABORT, DestAction.ABORT_ERROR):
            try:
                ep.abort()
            except Exception as e:
                self.abort_error = e
            if action is DestAction.ABORT_ERROR:
                err = self.error
                code = (
                    ErrorCode.CANCELLED if isinstance(err, MigrationCancelledError)
                    else ErrorCode.BAD_STREAM if isinstance(err, StreamError)
                    else ErrorCode.RESTORE_FAILED if self._restoring
                    else ErrorCode.INTERNAL
                )
                self._send(Error(code, str(err) if err else "destination gave up"))
            return
        raise AssertionError(action)  # pragma: no cover

    _restoring = False

    def _apply(self, sec: Section) -> None:
        rx = self._rx
        assert rx is not None
        body = sec.body
        if isinstance(body, RamPages):
            self.ep.write_pages(body.pages, body.data)
            rx.covered[body.pages.astype(np.intp)] = True
            rx.normal += len(body.pages)
        elif isinstance(body, ZeroRuns):
            pages = body.page_numbers()
            self.ep.zero_pages(pages)
            rx.covered[pages.astype(np.intp)] = True
            rx.zero += len(pages)
        elif isinstance(body, RoundRecord):
            rx.rounds.append(body)
            if not sec.final:
                self._send(Ack(sec.seq, self._dec.offset))
        elif isinstance(body, Device):
            if body.vf_index in rx.images:
                raise UnexpectedSectionError(
                    f"a second state image for VF {body.vf_index}", section="DEVICE", offset=sec.offset
                )
            rx.images[body.vf_index] = body.image
            if set(rx.images) == {vf.index for vf in self.config.vfs}:  # type: ignore[union-attr]
                self._restore_vfs()  # while the final pages still arrive
        elif isinstance(body, CpuState):
            if rx.cpu is not None:
                raise UnexpectedSectionError("a second CPU_STATE", section="CPU_STATE", offset=sec.offset)
            rx.cpu = body.data
            self._restore_guest()  # while the source quiesces and freezes its VFs
        else:  # pragma: no cover - _on_section routes only data here
            raise AssertionError(body)

    def _restore(self) -> None:
        rx, cfg, sec = self._rx, self.config, self._sec
        assert rx is not None and cfg is not None and sec is not None
        t0 = self.clock()
        missing = int((~rx.covered).sum())
        if missing:
            raise StreamTruncatedError(
                f"COMPLETE with {missing} pages of memory never sent", section="COMPLETE", offset=sec.offset
            )
        want = {vf.index for vf in cfg.vfs}
        if set(rx.images) != want:
            raise UnexpectedSectionError(
                f"COMPLETE with state images for VFs {sorted(rx.images)}, HELLO announced {sorted(want)}",
                section="COMPLETE", offset=sec.offset,
            )
        if rx.cpu is None:
            raise UnexpectedSectionError("COMPLETE without CPU_STATE", section="COMPLETE", offset=sec.offset)
        self.restore_us += int((self.clock() - t0) * 1e6)
        self._send(Ready(self.restore_us))
        self._t_ready = self.clock()

    def _restore_guest(self) -> None:
        """CPU_STATE arrived: rebuild the guest's software now (the VM stays paused)."""
        rx = self._rx
        assert rx is not None and rx.cpu is not None
        t0 = self.clock()
        self._restoring = True
        self.ep.set_cpu_state(rx.cpu)
        self._restoring = False
        self.restore_us += int((self.clock() - t0) * 1e6)

    def _restore_vfs(self) -> None:
        """Every VF's image arrived: restore them now (FREEZED .. QUIESCED)."""
        rx = self._rx
        assert rx is not None
        t0 = self.clock()
        self._restoring = True
        self.ep.restore_vfs([(i, rx.images[i]) for i in sorted(rx.images)])
        self._restoring = False
        self.restore_us += int((self.clock() - t0) * 1e6)

    def info(self) -> dict:
        now = self.clock()
        end = self.t_end if self.t_end is not None else now
        rx = self._rx
        out: dict = {"status": self.status, "total-time": int((end - self.t_start) * 1000)}
        if rx is not None and self.config is not None:
            out["ram"] = {
                "transferred": self._dec.offset,
                "total": self.config.memory_size,
                "duplicate": rx.zero,
                "normal": rx.normal,
                "normal-bytes": rx.normal * self.config.page_size,
                "dirty-sync-count": len(rx.rounds),
            }
            out["restore-us"] = self.restore_us
            out["start-us"] = self.start_us
            if self.switchover_cost is not None:
                out["x-switchover-cost"] = round(self.switchover_cost * 1000, 3)
        if self.error is not None:
            out["error-desc"] = str(self.error)
        return out
