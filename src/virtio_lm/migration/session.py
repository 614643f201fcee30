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
back (the VM runs on where it was).  After COMMIT a failure leaves the source
in ``postmigrate`` with status ``commit-unknown`` (phase UNRESOLVED: memory and
frozen VFs intact), and a destination that sent READY and then lost the source
holds, restored and paused, with the same status (phase IN_DOUBT): neither knows
whether the other runs.  ``resolve()`` settles it on each side through the VM's
lease (:mod:`~virtio_lm.migration.lease`, on storage both reach): the
destination starts only if it takes the lease over from the source, the source
resumes only if it reclaims it -- one of them gets it, never both
(docs/decisions.md, "After COMMIT").  Without a lease ``resolve(run=...)`` takes
the operator's word.

The parts, one module each (the way h11 lays out a protocol):

* :mod:`~virtio_lm.migration.events` -- what a session reports (QMP-style events);
* :mod:`~virtio_lm.migration.tables` -- phases, inputs, actions and both transition tables;
* :mod:`~virtio_lm.migration.lease` -- the VM's lease, the arbiter of an unknown outcome;
* :mod:`~virtio_lm.migration.history` -- the switch-over cost a host has measured
  (calibration, completed migrations) and the estimate's constants;
* :mod:`~virtio_lm.migration.source` -- :class:`SourceSession` (rounds, the
  switch-over, downtime accounting, ``query-migrate``'s fields);
* :mod:`~virtio_lm.migration.destination` -- :class:`DestSession`;
* :mod:`~virtio_lm.migration.policy` -- when to switch over, throttle or give up.

This module gathers their public names.
"""

from virtio_lm.migration.destination import DestSession
from virtio_lm.migration.events import (
    Clock,
    Event,
    MigrationEvent,
    PassEvent,
    ThrottleEvent,
    VmStateEvent,
)
from virtio_lm.migration.history import (
    RECALIBRATE,
    ROUND_TRIPS,
    SWITCHOVER_HISTORY,
    SwitchoverHistory,
)
from virtio_lm.migration.source import DOWNTIME_PHASES, SourceSession
from virtio_lm.migration.tables import (
    DEST_STATUS,
    DEST_TABLE,
    SOURCE_STATUS,
    SOURCE_TABLE,
    DestAction,
    DestInput,
    DestPhase,
    SourceAction,
    SourceInput,
    SourcePhase,
    Step,
)

__all__ = [
    "Clock",
    "DEST_STATUS",
    "DEST_TABLE",
    "DOWNTIME_PHASES",
    "DestAction",
    "DestInput",
    "DestPhase",
    "DestSession",
    "Event",
    "MigrationEvent",
    "PassEvent",
    "RECALIBRATE",
    "ROUND_TRIPS",
    "SOURCE_STATUS",
    "SOURCE_TABLE",
    "SWITCHOVER_HISTORY",
    "SourceAction",
    "SourceInput",
    "SourcePhase",
    "SourceSession",
    "Step",
    "SwitchoverHistory",
    "ThrottleEvent",
    "VmStateEvent",
]
