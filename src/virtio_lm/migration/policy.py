"""The pre-copy policy: estimators and decisions, a small pure object.

No clock, no I/O: every input carries its time.  The session tells the policy
what happened (bytes the transport sent, a round's end with the dirty pages
found) and asks it what to do next.

Rules (QEMU's where QEMU has one):

* **bandwidth** -- bytes the *destination* confirmed it received and applied
  (its ACK of each round's ROUND record carries its stream offset), divided by
  the time from the round's first section to that ACK
  (:class:`BandwidthEstimator`).  Bytes still in socket buffers count for
  nothing: a round ends only when its ACK arrives, so at every decision the
  backlog is empty and the final send starts on an idle link.  Rounds too
  small to time (an empty round is one ROUND record and one round trip) are
  pooled until they reach ``min_sample_bytes``; the estimate is the pooled
  rate of the samples in the last ``window_s`` seconds, so it follows a link
  that slows down (contention) within a few rounds.  Round 0 is *provisional*:
  it writes every page into the destination's fresh memory for the first time
  (page faults a later round never pays: 64 MiB cost ~30 ms here) and it is
  most of the bytes, so it would pull the estimate down for the final send,
  which writes pages already there; it counts only until a later round gave a
  sample.  Before any sample:
  unknown, treated as infinite.  A file stream has no ACKs: its bytes count
  when written.
* **dirty rate** -- pages found dirty at a round's end / the round's duration.
* **expected downtime** -- ``fixed_cost_s`` + pending bytes / bandwidth.  (The
  destination restores the VFs and the guest state while the final pages
  arrive, but that hides nothing: it stops reading meanwhile, so the pages
  wait in socket buffers and the send takes that much longer.)  The
  fixed cost is what a switch-over costs whatever the pages: pausing the
  vCPUs, QUIESCE / final reports / FREEZE / SAVE_STATE on the source, the
  images, RESTORE_STATE and the guest state on the destination, the READY and
  COMMIT round trips, RUN.  The session learns it from earlier migrations of
  the same kind of VM (:class:`~virtio_lm.migration.session.SwitchoverHistory`);
  unknown, it is 0 (QEMU's estimate, pages only).
* **switch-over** -- when the expected downtime fits ``downtime_limit``; when
  the fixed cost alone exceeds it, the migration gives up at the end of
  round 0 instead of throttling towards a limit it cannot meet (the session
  hands the policy a fixed cost that exceeds the limit only when real
  switch-overs back it, not on a scratch calibration alone).  Not on round
  0's bandwidth alone, though, when the final send would be more than
  ``PROVISIONAL_SHARE`` of the limit: one more round measures the link as the
  final send will use it.
* **auto-converge** -- a round *without progress* is one whose dirtied bytes
  exceed ``throttle_trigger_threshold`` % of the bytes it transferred (QEMU:
  50 %).  After ``throttle_trigger_rounds`` such rounds (QEMU: 2) the vCPUs are
  throttled: first ``cpu_throttle_initial`` % (20), then ``+cpu_throttle_increment``
  (10) per step, capped at ``max_cpu_throttle`` (99).
* **never endless** -- after ``max_rounds`` rounds or ``max_time_s`` seconds
  without converging the migration gives up (the source rolls back).
* **max-bandwidth** -- a token bucket: ``max_bandwidth`` bytes/s, bursts up to
  ``burst_s`` seconds' worth; the session spends from it as it hands bytes out.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass

__all__ = ["BandwidthEstimator", "Decision", "MigrationParams", "Policy", "RoundReport", "TokenBucket"]


@dataclass
class MigrationParams:
    """migrate-set-parameters, QEMU's names with ``-`` as ``_``; times in the units noted."""

    downtime_limit_ms: int = 300  # QEMU default
    max_bandwidth: int = 0  # bytes/s; 0 = unlimited (QEMU's default is 128 MiB/s)
    auto_converge: bool = True  # QEMU: a capability, off by default
    cpu_throttle_initial: int = 20
    cpu_throttle_increment: int = 10
    max_cpu_throttle: int = 99
    throttle_trigger_threshold: int = 50  # %
    throttle_trigger_rounds: int = 2
    max_rounds: int = 100
    max_time_s: float | None = None
    burst_s: float = 0.05
    min_sample_bytes: int = 256 * 1024  # bandwidth samples smaller than this are pooled
    window_s: float = 0.3  # bandwidth: samples of the last window_s seconds

    def check(self) -> None:
        if self.downtime_limit_ms < 0 or self.max_bandwidth < 0:
            raise ValueError("downtime-limit and max-bandwidth must not be negative")
        if not 1 <= self.cpu_throttle_initial <= 99 or not 1 <= self.max_cpu_throttle <= 99:
            raise ValueError("throttle percentages are 1..99")
        if not 1 <= self.cpu_throttle_increment <= 99:
            raise ValueError("cpu-throttle-increment is 1..99")
        if self.max_rounds < 1 or self.throttle_trigger_rounds < 1:
            raise ValueError("max-rounds and throttle-trigger-rounds are at least 1")


class Decision(enum.Enum):
    CONTINUE = "continue"  # another round
    THROTTLE = "throttle"  # another round, vCPUs throttled harder (Policy.throttle)
    SWITCH = "switch"  # stop and copy
    GIVE_UP = "give-up"  # not converging within the bounds


@dataclass(frozen=True)
class RoundReport:
    """What the policy saw at a round's end."""

    round: int
    pending_pages: int
    pending_bytes: int
    bandwidth: float  # bytes/s (inf when unknown)
    dirty_rate: float  # pages/s
    expected_downtime_s: float
    decision: Decision
    throttle: int
    provisional: bool = False  # the bandwidth rested on round 0 alone (and so the round went on)


class TokenBucket:
    """``rate`` bytes/s (0 = unlimited), holding at most ``burst`` bytes; may go into debt."""

    UNLIMITED = 1 << 62

    def __init__(self, rate: int, burst_s: float, now: float) -> None:
        self.rate = rate
        self.burst = max(rate * burst_s, 65536.0)
        self.tokens = self.burst if rate else 0.0
        self.last = now

    def _refill(self, now: float) -> None:
        if now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = max(self.last, now)

    def available(self, now: float) -> int:
        if not self.rate:
            return self.UNLIMITED
        self._refill(now)
        return max(0, int(self.tokens))

    def spend(self, nbytes: int, now: float) -> None:
        if self.rate:
            self._refill(now)
            self.tokens -= nbytes

    def wait(self, now: float, want: int = 1) -> float:
        """Seconds until ``want`` bytes (at most a burst) are available."""
        if not self.rate:
            return 0.0
        self._refill(now)
        need = min(float(want), self.burst) - self.tokens
        return 0.0 if need < 1.0 else need / self.rate


class BandwidthEstimator:
    """Delivered bytes over time -> bytes/s (see the module docstring)."""

    def __init__(self, min_sample_bytes: int = 256 * 1024, window_s: float = 0.3) -> None:
        self.min_sample_bytes = min_sample_bytes
        self.window_s = window_s
        self.samples: deque[tuple[float, int, float]] = deque()  # (end time, bytes, seconds)
        self._pool = [0, 0.0]
        self._provisional: tuple[float, int, float] | None = None

    def add(self, now: float, nbytes: int, seconds: float, *, provisional: bool = False) -> None:
        """``nbytes`` were delivered in ``seconds`` ending at ``now``; a *provisional*
        sample stands only until the first ordinary one."""
        if nbytes < 0 or not seconds >= 0:
            raise ValueError(f"a bandwidth sample needs nbytes >= 0 and seconds >= 0, got {nbytes}, {seconds}")
        if provisional:
            if nbytes > 0 and seconds > 0:
                self._provisional = (now, nbytes, seconds)
            return
        self._pool[0] += nbytes
        self._pool[1] += seconds
        if self._pool[0] >= self.min_sample_bytes and self._pool[1] > 0:
            self.samples.append((now, self._pool[0], self._pool[1]))
            self._pool = [0, 0.0]
            while len(self.samples) > 1 and self.samples[0][0] < now - self.window_s:
                self.samples.popleft()

    @property
    def provisional_only(self) -> bool:
        """The estimate rests on round 0 alone."""
        return not self.samples and self._provisional is not None

    @property
    def value(self) -> float:
        """bytes/s; before the first whole sample, the pool's rate; ``inf`` before any byte."""
        if not self.samples:
            if self._provisional is not None:
                return self._provisional[1] / self._provisional[2]
            b, sec = self._pool
            return b / sec if b > 0 and sec > 0 else math.inf
        return sum(b for _, b, _ in self.samples) / sum(s for _, _, s in self.samples)


PROVISIONAL_SHARE = 0.1


class Policy:
    """Estimators and the switch-over / throttle / give-up decision."""

    def __init__(self, params: MigrationParams, page_size: int, page_cost: int) -> None:
        params.check()
        self.params = params
        self.page_size = page_size
        self.page_cost = page_cost  # wire bytes per pending page (data + its share of framing)
        self.bandwidth = math.inf
        self.dirty_rate = 0.0
        self.throttle = 0
        self.rounds = 0
        self.high_rounds = 0
        self._round_start: float | None = None
        self._round_sent = 0
        self.estimator = BandwidthEstimator(params.min_sample_bytes, params.window_s)
        self.started: float | None = None
        self.fixed_cost_s = 0.0  # switch-over cost independent of the pages (see the module docstring)

    # ------------------------------------------------------------ estimators
    def begin(self, now: float) -> None:
        self.started = now
        self._round_start = now
        self._round_sent = 0

    def record_sent(self, nbytes: int) -> None:
        """Bytes handed to the transport (auto-converge compares the dirtied bytes with them)."""
        self._round_sent += nbytes

    def record_delivered(self, now: float, nbytes: int, seconds: float, *, provisional: bool = False) -> None:
        """The destination confirmed ``nbytes`` more, delivered in ``seconds`` ending at ``now``
        (``provisional``: round 0, see :class:`BandwidthEstimator`)."""
        self.estimator.add(now, nbytes, seconds, provisional=provisional)
        self.bandwidth = self.estimator.value

    def expected_downtime(self, pending_pages: int) -> float:
        pending = pending_pages * self.page_cost
        if pending == 0:
            return self.fixed_cost_s
        if self.bandwidth in (0.0, math.inf):
            return self.fixed_cost_s if self.bandwidth == math.inf else math.inf
        return self.fixed_cost_s + pending / self.bandwidth

    def fits(self, pending_pages: int) -> bool:
        room = self.params.downtime_limit_ms / 1000.0 - self.fixed_cost_s
        return room >= 0 and pending_pages * self.page_cost <= self.bandwidth * room

    @property
    def limit_unreachable(self) -> bool:
        """The fixed switch-over cost alone exceeds downtime-limit."""
        return self.fixed_cost_s > self.params.downtime_limit_ms / 1000.0

    # ------------------------------------------------------------ decision
    def end_round(self, now: float, dirty_pages: int) -> RoundReport:
        """A round ended at ``now`` and ``dirty_pages`` pages were found dirty (to send next)."""
        assert self._round_start is not None and self.started is not None, "begin() first"
        elapsed = now - self._round_start
        sent = self._round_sent
        if elapsed > 0:
            self.dirty_rate = dirty_pages / elapsed
        self.rounds += 1
        pending_bytes = dirty_pages * self.page_cost
        decision = Decision.CONTINUE
        provisional = self.estimator.provisional_only and (
            pending_bytes / self.bandwidth > PROVISIONAL_SHARE * self.params.downtime_limit_ms / 1000.0
        )
        if self.fits(dirty_pages) and not provisional:
            decision = Decision.SWITCH
        elif self.limit_unreachable or self.rounds >= self.params.max_rounds or (
            self.params.max_time_s is not None and now - self.started >= self.params.max_time_s
        ):
            decision = Decision.GIVE_UP
        elif self.params.auto_converge:
            dirtied = dirty_pages * self.page_size
            if dirtied * 100 > self.params.throttle_trigger_threshold * sent:
                self.high_rounds += 1
            if self.high_rounds >= self.params.throttle_trigger_rounds:
                self.high_rounds = 0
                new = (
                    self.params.cpu_throttle_initial
                    if self.throttle == 0
                    else min(self.throttle + self.params.cpu_throttle_increment, self.params.max_cpu_throttle)
                )
                if new != self.throttle:
                    self.throttle = new
                    decision = Decision.THROTTLE
        self._round_start = now
        self._round_sent = 0
        return RoundReport(
            self.rounds - 1,
            dirty_pages,
            pending_bytes,
            self.bandwidth,
            self.dirty_rate,
            self.expected_downtime(dirty_pages),
            decision,
            self.throttle,
            provisional,
        )
