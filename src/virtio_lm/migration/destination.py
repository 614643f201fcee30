"""The receiving side of a migration, sans-I/O (see :mod:`virtio_lm.migration.session`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from virtio_lm.errors import (
    ConfigMismatchError,
    LeaseLostError,
    MigrationCancelledError,
    MigrationStateError,
    MigrationError,
    PeerGoneError,
    StreamError,
    StreamTruncatedError,
    UnexpectedSectionError,
)
from virtio_lm.migration.endpoint import DestEndpoint
from virtio_lm.migration.events import Clock, Event, MigrationEvent, VmStateEvent
from virtio_lm.migration.history import SwitchoverHistory
from virtio_lm.migration.lease import Lease
from virtio_lm.migration.tables import (
    DEST_DETACHED,
    DEST_STATUS,
    DEST_TABLE,
    DestAction,
    DestInput,
    DestPhase,
    as_migration_error,
)
from virtio_lm.wire.stream import (
    Abort,
    Ack,
    Commit,
    CompleteRecord,
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
    SectionType,
    StreamConfig,
    StreamDecoder,
    StreamEncoder,
    ZeroRuns,
)


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
        history: SwitchoverHistory | None = None, lease: Lease | None = None,
    ) -> None:
        self.ep = endpoint
        self.lease = lease  # the VM's lease: taken over before the VM starts here (lease.py)
        self._lease_owner = ""  # the source's token, read when its HELLO arrived
        self.resolution: str | None = None  # how an unknown outcome was settled: source / destination
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
        """Nothing more comes from the stream (a final status, or in doubt waiting for :meth:`resolve`)."""
        return self.phase in DEST_DETACHED

    @property
    def in_doubt(self) -> bool:
        """READY went out, then the source was lost: restored and paused until :meth:`resolve`."""
        return self.phase is DestPhase.IN_DOUBT

    def resolve(self, run: str | None = None) -> str:
        """Settle an unknown outcome (status ``commit-unknown``).  With a lease it decides:
        taken over from the source -> the VM starts here (``completed``); the source kept it
        -> discard everything (``failed``).  Without one, ``run`` (``source`` /
        ``destination``) is the operator's word.  Returns where the VM runs."""
        if self.phase is not DestPhase.IN_DOUBT:
            raise MigrationStateError(f"nothing to resolve in status {self.status}")
        if self.lease is not None:
            if run is not None:
                raise MigrationStateError("the VM has a lease: the lease decides where it runs, not the caller")
            run = "destination" if self.lease.take(self._lease_owner) else "source"
        elif run not in ("source", "destination"):
            raise MigrationStateError("the VM has no lease: say where it runs (source or destination)")
        self.resolution = run
        self._input(DestInput.RESOLVE_DEST if run == "destination" else DestInput.RESOLVE_SOURCE)
        return run

    @property
    def _bad(self) -> DestInput:
        """The input for bytes that do not make a stream: a file has no source to be in doubt about."""
        return DestInput.BAD_FILE if self.from_file else DestInput.BAD_STREAM

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
            self._input(self._bad, exc)
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
                    DestInput.BAD_FILE,
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
                self._input(DestInput.LOCAL_ERROR, as_migration_error(e, "check_config"))
                return
            self.config = body.config
            if reason is None and self.lease is not None:
                try:
                    self._lease_owner = self.lease.owner()  # the source's token: take it over on COMMIT
                except OSError as e:
                    self._input(DestInput.LOCAL_ERROR, as_migration_error(e, "the VM's lease cannot be read"))
                    return
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
                self._bad,
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
            err = e if isinstance(e, MigrationError) else as_migration_error(e, f"destination {step.action.value}")
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
        if action is DestAction.HOLD:  # restored and paused: the lease decides (resolve())
            self._out.clear()
            return
        if action is DestAction.START:
            if self.lease is not None and not self.from_file and not self.lease.take(self._lease_owner):
                raise LeaseLostError("the source kept the VM's lease (it resumed there): not starting here")
            t0 = self.clock()
            ep.start()
            self.start_us = int((self.clock() - t0) * 1e6)
            if None not in (self._t_precopy, self._t_final, self._t_ready) and not self.from_file \
                    and self.resolution is None:
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
        out["x-lease"] = self.lease is not None
        if self.resolution is not None:
            out["x-resolution"] = self.resolution
        return out
