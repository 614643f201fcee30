"""The sessions' transition tables, as data: one entry for every (phase, input) pair
(see :mod:`virtio_lm.migration.session` for what they mean), the statuses the phases
show, and the error every failed action becomes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from virtio_lm.errors import (
    MigrationError,
)


@dataclass(frozen=True)
class Step:
    next: enum.Enum
    action: enum.Enum



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
    UNRESOLVED = "unresolved"  # failed after COMMIT: postmigrate, outcome unknown until resolve()


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
    LEASE_LOST = "lease-lost"  # about to resume, the lease is gone: the destination took the VM
    LEASE_UNREADABLE = "lease-unreadable"  # about to resume, the lease file cannot be read or written
    RESOLVE_SOURCE = "resolve-source"  # resolve(): the lease is still ours (or the operator says so)
    RESOLVE_DEST = "resolve-dest"  # resolve(): the destination holds the lease (or the operator says so)


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
    STRAND = "strand"  # failure after COMMIT: stay postmigrate, the outcome unknown
    HAND_OVER = "hand-over"  # the destination holds the lease: release() without having seen RUNNING


_S, _SI, _SA = SourcePhase, SourceInput, SourceAction
# the runner is done with the connection in these (UNRESOLVED waits for resolve(), not for bytes)
SOURCE_TERMINAL = (_S.COMPLETED, _S.FAILED, _S.CANCELLED, _S.UNRESOLVED)
SOURCE_FAILURES = (_SI.DEST_ERROR, _SI.PEER_GONE, _SI.BAD_STREAM, _SI.LOCAL_ERROR)


def _build_source_table() -> dict[tuple[SourcePhase, SourceInput], Step | None]:
    t: dict[tuple[SourcePhase, SourceInput], Step | None] = {(p, i): None for p in _S for i in _SI}
    t[_S.IDLE, _SI.START] = Step(_S.SETUP, _SA.BEGIN)
    t[_S.IDLE, _SI.CANCEL] = Step(_S.CANCELLED, _SA.NONE)
    t[_S.IDLE, _SI.LOCAL_ERROR] = Step(_S.FAILED, _SA.ROLLBACK)  # BEGIN failed half way
    for i in (_SI.DEST_ERROR, _SI.PEER_GONE, _SI.BAD_STREAM):
        t[_S.IDLE, i] = Step(_S.FAILED, _SA.NONE)  # nothing started yet
    for p in (_S.SETUP, _S.PRECOPY, _S.SWITCHOVER, _S.WAIT_READY):
        for i in SOURCE_FAILURES:
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
    for i in SOURCE_FAILURES:
        t[_S.COMMITTED, i] = Step(_S.UNRESOLVED, _SA.STRAND)
    t[_S.COMMITTED, _SI.CANCEL] = Step(_S.COMMITTED, _SA.IGNORE)  # too late: QEMU ignores it too
    for p in SOURCE_TERMINAL:
        for i in _SI:
            t[p, i] = None if i in (_SI.START, _SI.RESOLVE_SOURCE, _SI.RESOLVE_DEST) else Step(p, _SA.IGNORE)
    # once the final data goes out the destination may come to hold READY (and be resolved to
    # run): a rollback there first reclaims the lease.  Gone -> the destination runs: hand over;
    # unreadable -> nobody can tell: stay paused, unresolved
    for p in (_S.SWITCHOVER, _S.WAIT_READY):
        t[p, _SI.LEASE_LOST] = Step(_S.COMPLETED, _SA.HAND_OVER)
        t[p, _SI.LEASE_UNREADABLE] = Step(_S.UNRESOLVED, _SA.STRAND)
    # after COMMIT the outcome is unknown until resolved: by the lease, or the operator's word
    t[_S.UNRESOLVED, _SI.RESOLVE_SOURCE] = Step(_S.FAILED, _SA.ROLLBACK)
    t[_S.UNRESOLVED, _SI.RESOLVE_DEST] = Step(_S.COMPLETED, _SA.HAND_OVER)
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
    _S.UNRESOLVED: "commit-unknown",
}


# ====================================================================== destination table
class DestPhase(enum.Enum):
    WAIT_HELLO = "wait-hello"
    RECEIVING = "receiving"
    WAIT_COMMIT = "wait-commit"  # restored, READY sent (file: waiting for the end of the file)
    IN_DOUBT = "in-doubt"  # restored, READY sent, the source lost: COMMIT may have been sent; resolve()
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
    BAD_FILE = "bad-file"  # a stream file that does not decode or ends early (no source to be in doubt about)
    CANCEL = "cancel"
    LOCAL_ERROR = "local-error"
    RESOLVE_DEST = "resolve-dest"  # resolve(): the lease was ours to take (or the operator says run here)
    RESOLVE_SOURCE = "resolve-source"  # resolve(): the source holds the lease (or the operator says so)


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
    HOLD = "hold"  # stay restored and paused, send nothing: the outcome is the lease's (resolve())


_D, _DI, _DA = DestPhase, DestInput, DestAction
DEST_TERMINAL = (_D.COMPLETED, _D.FAILED, _D.CANCELLED)
DEST_DETACHED = DEST_TERMINAL + (_D.IN_DOUBT,)  # nothing more from the stream


def _build_dest_table() -> dict[tuple[DestPhase, DestInput], Step | None]:
    t: dict[tuple[DestPhase, DestInput], Step | None] = {(p, i): None for p in _D for i in _DI}
    for p in (_D.WAIT_HELLO, _D.RECEIVING, _D.WAIT_COMMIT):
        t[p, _DI.SOURCE_ABORT] = Step(_D.FAILED, _DA.ABORT)
        t[p, _DI.PEER_GONE] = Step(_D.FAILED, _DA.ABORT)
        t[p, _DI.BAD_STREAM] = Step(_D.FAILED, _DA.ABORT_ERROR)
        t[p, _DI.BAD_FILE] = Step(_D.FAILED, _DA.ABORT)
        t[p, _DI.LOCAL_ERROR] = Step(_D.FAILED, _DA.ABORT_ERROR)
        t[p, _DI.CANCEL] = Step(_D.CANCELLED, _DA.ABORT_ERROR)
    # READY is out: the source may have sent COMMIT.  Losing it (silence, EOF, reset, bytes that
    # do not decode -- perhaps the COMMIT itself) leaves the outcome to the lease: hold
    t[_D.WAIT_COMMIT, _DI.PEER_GONE] = Step(_D.IN_DOUBT, _DA.HOLD)
    t[_D.WAIT_COMMIT, _DI.BAD_STREAM] = Step(_D.IN_DOUBT, _DA.HOLD)
    t[_D.WAIT_HELLO, _DI.HELLO_OK] = Step(_D.RECEIVING, _DA.ACCEPT)
    t[_D.WAIT_HELLO, _DI.HELLO_BAD] = Step(_D.FAILED, _DA.REFUSE)
    t[_D.RECEIVING, _DI.DATA] = Step(_D.RECEIVING, _DA.APPLY)
    t[_D.RECEIVING, _DI.COMPLETE] = Step(_D.WAIT_COMMIT, _DA.RESTORE)
    t[_D.WAIT_COMMIT, _DI.COMMIT] = Step(_D.COMPLETED, _DA.START)
    t[_D.WAIT_COMMIT, _DI.FILE_END] = Step(_D.COMPLETED, _DA.START)
    for p in DEST_DETACHED:
        for i in _DI:
            t[p, i] = None if i in (_DI.RESOLVE_DEST, _DI.RESOLVE_SOURCE) else Step(p, _DA.IGNORE)
    t[_D.IN_DOUBT, _DI.RESOLVE_DEST] = Step(_D.COMPLETED, _DA.START)
    t[_D.IN_DOUBT, _DI.RESOLVE_SOURCE] = Step(_D.FAILED, _DA.ABORT)
    t[_D.IN_DOUBT, _DI.LOCAL_ERROR] = Step(_D.FAILED, _DA.ABORT)  # START failed (the lease was gone)
    return t


DEST_TABLE = _build_dest_table()

DEST_STATUS = {
    _D.WAIT_HELLO: "setup",
    _D.RECEIVING: "active",
    _D.WAIT_COMMIT: "device",
    _D.IN_DOUBT: "commit-unknown",
    _D.COMPLETED: "completed",
    _D.FAILED: "failed",
    _D.CANCELLED: "cancelled",
}



def as_migration_error(exc: BaseException, what: str) -> MigrationError:
    if isinstance(exc, MigrationError):
        return exc
    err = MigrationError(f"{what}: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err
