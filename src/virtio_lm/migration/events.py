"""What a migration session reports: QMP-style events (status changes, rounds, run
state, throttle), polled with ``poll_events()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from virtio_lm.migration.policy import RoundReport

Clock = Callable[[], float]



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
