"""The migration interface every VF device implements, and a base that implements it.

The PF's control path drives a VF's device through these calls, named for
the proposal's states (see :mod:`virtio_lm.pf.controller`)::

    mig_quiesce()          RUNNING/INIT -> QUIESCED: master no transaction: no DMA,
                           no interrupt; doorbells are remembered, back-end
                           completions are held inside the device
    mig_freeze(timeout)    -> FREEZED: back-end I/O settles (work not started yet is
                           cancelled and stays "not executed"); from here the
                           internal state does not change and mig_save() is stable
    mig_save() -> bytes    the state image (wire.state): transport records,
                           device records, one INFLIGHT record per held chain
    mig_validate(blob)     parse + check an (untrusted) image against this device;
                           raises StateImageError (decode errors are wrapped);
                           changes nothing
    mig_restore(v)         apply what mig_validate returned; cannot fail on a
                           frozen device (the chains are walked at resume)
    mig_unfreeze()         FREEZED -> QUIESCED
    mig_resume()           -> RUNNING: write held completions, re-execute chains
                           not executed, then process every queue as if notified

:class:`QueueDevice` implements all of it for devices whose queues carry
independent requests: a subclass only says how to turn a chain into work
(:meth:`QueueDevice.handle`) and what a failed back-end call completes with
(:meth:`QueueDevice.backend_failed`).  Work runs on a back-end thread pool,
off the queue-processing path, so many requests are in flight at once.

Rules the base keeps:

* Guest memory is touched only while the function's port has bus mastering
  on (:attr:`QueueDevice.mastering` *is* ``fn.port.bus_master``): on the
  queue-processing path, under the device lock (the readable part is read in
  :meth:`QueueDevice.handle`, completions are written by the base), or by
  back-end work holding a *DMA permit*.  Plain work (a callable) computes
  bytes and never DMAs, so a request finishing while QUIESCED is simply held
  (state DONE).  A :class:`DirectWork` moves its data between a file and
  guest memory itself (zero-copy) -- but only with a permit, granted while
  the device masters and the request is still its own; otherwise its
  buffered form runs.  :meth:`QueueDevice.mig_quiesce` and
  :meth:`QueueDevice.mig_freeze` stop granting permits and wait for those
  held to end (the request completed on its used ring) before mastering
  stops: a QUIESCED device has no DMA left running.  If mastering stops
  some other way (the PF or the driver clears bus-master enable) while a
  permit is held, a request whose data is already in guest memory cannot
  be completed, and goes back to "not executed" (re-executed at resume: a
  read into the same buffers, or the same write, again).
* A held chain is counted once: it is either on the used ring or in the
  device's in-flight table, never both, never neither (while its queue is
  not broken) -- which is what :meth:`QueueDevice.mig_validate` checks
  against the QUEUE records' ``last_avail_idx - used_idx``.
* A device reset (driver writes 0 or FLR) drops every request but does not
  change the migration state: bus mastering belongs to the PF (its
  controller turns it back on at a VF FLR).
* ``avail_idx`` of an INFLIGHT record is informational: completions are out
  of order, so a held chain may have been taken arbitrarily long before the
  others; nothing but "it exists" can be checked about it.
"""

from __future__ import annotations

import enum
import logging
import threading
from contextlib import AbstractContextManager
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Protocol

from virtio_lm.errors import (
    DeviceBusyError,
    DmaDisabledError,
    DevicePartsError,
    StateImageError,
    VirtioLmError,
    VirtqueueError,
    WireError,
)
from virtio_lm.memory.region import MemoryPort
from virtio_lm.pci.device import VirtioDevice
from virtio_lm.pci.function import VirtioPciFunction
from virtio_lm.pci.parts import (
    FunctionParts,
    apply_function_parts,
    check_list,
    function_parts,
    validate_function_parts,
)
from virtio_lm.pci.snapshot import FunctionSnapshot, apply_function, save_function, validate_function
from virtio_lm.virtqueue.device import DescriptorChain
from virtio_lm.wire.features import DeviceStatus
from virtio_lm.wire.parts import DEVICE_FIRST, DevPart
from virtio_lm.wire.state import (
    DEVICE_RECORD_BASE,
    QUEUE_FLAG_BROKEN,
    InflightHeader,
    QueueRecord,
    RecordType,
    StateImage,
    decode_image,
    encode_image,
)

_log = logging.getLogger(__name__)

MAX_HELD_DATA = 16 << 20  # one held completion may not claim more than this

Work = Callable[[], bytes]

#: how long QUIESCE / FREEZE wait for the DMA permits held before mastering stops anyway
DMA_SETTLE_TIMEOUT = 10.0


@dataclass(frozen=True)
class DirectWork:
    """Back-end work that may DMA itself (zero-copy file I/O, see the module docstring).

    ``direct(port)`` runs while the device holds a DMA permit for the request: it moves the
    data through ``port`` and returns ``(offset, rest)``, the bytes still to write at
    ``offset`` of the chain's writable part (e.g. the status byte after the data it read
    in).  ``buffered()`` is the same request as plain :data:`Work` (the completion's every
    byte), run when no permit is to be had.  Called as a function, it is its buffered form.
    """

    direct: Callable[[MemoryPort], tuple[int, bytes]]
    buffered: Work

    def __call__(self) -> bytes:
        return self.buffered()


class Migratable(Protocol):
    """What the PF control path needs of a VF's device."""

    def mig_quiesce(self) -> None: ...
    def mig_freeze(self, timeout: float) -> None: ...
    def mig_unfreeze(self) -> None: ...
    def mig_resume(self) -> None: ...
    def mig_save(self) -> bytes: ...
    def mig_validate(self, blob: bytes) -> object: ...
    def mig_restore(self, validated: object) -> None: ...


class PartsMigratable(Protocol):
    """What the virtio-1.4 profile's admin commands need of a member's device.

    ::

        mig_stop(timeout)      -> STOPPED: take no new chain, let every request
                               taken finish and return it on its used ring (the
                               standard has no in-flight part), then master no
                               transaction; on DeviceBusyError nothing changed
        mig_parts()            the device parts (common + device type), in order
        mig_max_parts_size()   the most bytes mig_parts() can ever take, headers included
        mig_validate_parts(p)  check untrusted parts; raises DevicePartsError;
                               changes nothing
        mig_set_parts(v)       apply what mig_validate_parts returned (STOPPED only)
        mig_start()            STOPPED -> running: queues configured from parts
                               take their indices from the used rings, then every
                               queue is processed as if notified
    """

    def mig_stop(self, timeout: float) -> None: ...
    def mig_start(self) -> None: ...
    def mig_parts(self) -> list[DevPart]: ...
    def mig_max_parts_size(self) -> int: ...
    def mig_validate_parts(self, parts: list[DevPart]) -> object: ...
    def mig_set_parts(self, validated: object) -> None: ...


class NotExecuted(Exception):
    """Raised by back-end work that gave up before doing anything (e.g. a transmit still
    waiting for the link when the device freezes): the request goes back to "not
    executed" and is re-executed at resume, on this device or a restored one."""


class ReqState(enum.Enum):
    PENDING = 0  # taken from the avail ring, not (or no longer) executing
    RUNNING = 1  # on the back-end pool
    DONE = 2  # executed; completion held until it can be written


@dataclass(eq=False)
class Request:
    """A chain the device took and has not returned.

    ``chain`` is None for a request restored from an image until the device
    walks ``head`` again in guest memory at resume (it may not DMA before).
    """

    queue: int
    head: int
    avail_idx: int
    chain: DescriptorChain | None
    state: ReqState = ReqState.PENDING
    data: bytes = b""
    data_at: int = 0  # where ``data`` goes in the writable part (after what a DirectWork moved)
    future: Future[None] | None = field(default=None, repr=False)

    @classmethod
    def taken(cls, queue: int, chain: DescriptorChain) -> "Request":
        return cls(queue, chain.head, chain.avail_idx, chain)


@dataclass(frozen=True)
class ValidatedParts:
    """What :meth:`QueueDevice.mig_validate_parts` hands to :meth:`QueueDevice.mig_set_parts`."""

    function: FunctionParts
    device: object  # the subclass's parsed device-type parts


@dataclass(frozen=True)
class ValidatedImage:
    """What :meth:`QueueDevice.mig_validate` hands to :meth:`QueueDevice.mig_restore`."""

    function: FunctionSnapshot
    inflight: tuple[InflightHeader, ...]
    data: tuple[bytes, ...]
    device: object  # the subclass's parsed device records


def _record_key(rec) -> tuple[int, ...]:
    """Where :meth:`QueueDevice.mig_save` puts a record: FUNCTION, QUEUE records by
    index, CONFIG, device records by type, INFLIGHT by (queue, avail_idx)."""
    if rec.type == RecordType.FUNCTION:
        return (0,)
    if rec.type == RecordType.QUEUE:
        return (1, QueueRecord.decode(rec.payload).index)
    if rec.type == RecordType.CONFIG:
        return (2,)
    if rec.type == RecordType.INFLIGHT:
        h = InflightHeader.unpack_from(rec.payload, 0)
        return (4, h.queue, h.avail_idx)
    return (3, rec.type)


def _check_record_order(image: StateImage) -> None:
    """Records in the order the device saves them, so that an accepted image saves back
    byte-identical (issue 12).  Two INFLIGHT records may share an avail index (a chain held
    across 65536 others wraps onto a newer one's); the save keeps their image order."""
    keys = [_record_key(r) for r in image.records]
    for i in range(1, len(keys)):
        if keys[i] < keys[i - 1]:
            raise StateImageError(
                f"record[{i}]", f"type {image.records[i].type:#x} out of order (records go FUNCTION, QUEUE by "
                "index, CONFIG, device records by type, INFLIGHT by queue and avail index)"
            )


#: what :meth:`QueueDevice.fast_batch` returns
FAST_EMPTY, FAST_SLOW, FAST_MORE = 0, 1, 2


class QueueDevice(VirtioDevice):
    """A device whose queues carry independent requests, with the migration interface."""

    #: back-end pool size; requests beyond it wait in the pool's queue
    backend_threads: int = 4
    #: back-end work of a request moving at most this many bytes runs at once on the
    #: queue-processing path instead of the pool (two thread hand-offs less per request;
    #: for an image in the page cache they cost more than the I/O).  0: always the pool.
    #: The completions of one notification's batch then share one driver notification.
    inline_max: int = 0
    #: run DirectWork direct (zero-copy DMA under a permit); off, its buffered form always runs:
    #: QUIESCE then never waits for back-end I/O (on for vhost-user, whose ring stop waits for
    #: every request anyway)
    direct_dma: bool = False
    #: queues the base class processes on notify (None: all)
    request_queues: tuple[int, ...] | None = None

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.RLock()
        #: notified whenever a request finishes its back-end work or leaves the device, while
        #: someone waits on it (:meth:`_wait_settled` counts them in ``_settle_waiters``)
        self._settled = threading.Condition(self._lock)
        self._settle_waiters = 0
        self._inflight: dict[tuple[int, int], Request] = {}
        self._pool: ThreadPoolExecutor | None = None
        self.frozen = False  # mig_freeze succeeded; cleared by mig_unfreeze / mig_resume
        self.stopping = False  # mig_stop is draining: no new chain is taken
        self.kicks_while_quiesced = 0
        self.deferred = 0  # work that raised NotExecuted
        self.completed = 0
        self.fast_served = 0  # chains a C fast path served (serve_in_c)
        self._permits = 0  # DMA permits held by DirectWork (see the module docstring)
        self._no_permits = False  # QUIESCE / FREEZE is waiting for the permits held to end
        self.direct_runs = 0  # DirectWork run with a permit
        self.buffered_runs = 0  # DirectWork run buffered: no permit to be had
        #: fault injection for restart tests: after this many more requests with back-end work,
        #: every further one waits (taken, never executed) until close() -- requests guaranteed
        #: in flight when the test kills the process.  None: off.
        self.hold_after: int | None = None
        self.held = 0
        self._release = threading.Event()

    # ================================================================== subclass hooks
    def handle(self, fn: VirtioPciFunction, queue: int, chain: DescriptorChain) -> bytes | Work | DirectWork:
        """Turn a chain into its completion: the bytes to write into the chain's
        writable part now, or a callable the back-end pool runs to produce
        them (it must not touch guest memory), or a :class:`DirectWork`
        (which does, with a permit: see the module docstring).  Reads of the readable part
        happen here (the device is mastering).  Raise :class:`VirtqueueError`
        for a chain the device cannot use at all (the queue then needs a reset).
        Called again for the same chain when a request that was not executed
        is re-executed (after a cancelling freeze, or on a restore's destination)."""
        raise NotImplementedError

    def backend_failed(self, queue: int, chain: DescriptorChain, exc: Exception) -> bytes:
        """The completion of a request whose back-end work raised ``exc``."""
        raise NotImplementedError

    def save_device_records(self) -> list[tuple[int, bytes]]:
        """Device-specific records (CONFIG, types >= 0x100).  Default: none."""
        return []

    def validate_device_records(self, image: StateImage, snap: FunctionSnapshot) -> object:
        """Parse and check the device's records; raise StateImageError.  Default: none allowed."""
        extra = [r.type for r in image.records if r.type >= DEVICE_RECORD_BASE or r.type == RecordType.CONFIG]
        if extra:
            raise StateImageError("device", f"unexpected device records {extra}")
        return None

    def restore_device_records(self, parsed: object) -> None:
        """Apply what :meth:`validate_device_records` returned."""

    #: device-type part types this device exchanges (virtio 1.4; 0x200..0x5FF)
    device_part_types: frozenset[int] = frozenset()

    def save_device_parts(self) -> list[DevPart]:
        """Device-type parts (virtio 1.4), in the mandatory order.  Default: none."""
        return []

    def max_device_parts_size(self) -> int:
        """The most bytes :meth:`save_device_parts` can take, headers included."""
        return 0

    def validate_device_parts(self, parts: list[DevPart], negotiated: int) -> object:
        """Check device-type parts against ``negotiated`` features; raise
        DevicePartsError.  Default: there are none to take."""
        if parts:
            raise DevicePartsError(f"{parts[0].hdr.part_type:#x}", "not a part of this device type")
        return None

    def restore_device_parts(self, parsed: object) -> None:
        """Apply what :meth:`validate_device_parts` returned."""

    # ================================================================== data path
    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.backend_threads, thread_name_prefix=f"{type(self).__name__}-io")
        return self._pool

    @property
    def fn(self) -> VirtioPciFunction:
        if self.function is None:
            raise VirtioLmError(f"{type(self).__name__} is not bound to a function")
        return self.function

    @property
    def mastering(self) -> bool:
        """Whether the device may DMA and interrupt: its port's bus-master enable."""
        return self.fn.port.bus_master

    @property
    def dma_permits(self) -> int:
        """DMA permits held now by DirectWork (see the module docstring)."""
        with self._lock:
            return self._permits

    @property
    def granting_permits(self) -> bool:
        """False while QUIESCE / FREEZE waits for the permits held to end."""
        with self._lock:
            return not self._no_permits

    @property
    def in_flight(self) -> int:
        """Chains taken from the avail rings and not yet returned."""
        with self._lock:
            return len(self._inflight)

    def locked(self) -> AbstractContextManager[bool]:
        """``with device.locked():`` holds the device lock (re-entrant): no chain is taken,
        completed or restored meanwhile (a transport changing queue state, e.g. vhost-user's
        ring start / stop).  Taken after the function's register lock, before its leaf locks:
        :mod:`virtio_lm.pci.function` states the order."""
        return self._lock

    def requests(self) -> list[Request]:
        """A copy of the in-flight table (diagnostics and tests)."""
        with self._lock:
            return list(self._inflight.values())

    def _wait_settled(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        """``_settled.wait_for``, counted (the lock held), so that a request finishing while
        nobody waits costs no notification."""
        self._settle_waiters += 1
        try:
            return self._settled.wait_for(predicate, timeout)
        finally:
            self._settle_waiters -= 1

    def _notify_settled(self) -> None:
        """Wake whoever waits in :meth:`_wait_settled` (the lock held)."""
        if self._settle_waiters:
            self._settled.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no request is in flight; False if ``timeout`` ran out first."""
        with self._lock:
            return self._wait_settled(lambda: not self._inflight, timeout)

    def queue_notify(self, fn: VirtioPciFunction, queue: int) -> None:
        with self._lock:
            if not self.mastering:
                self.kicks_while_quiesced += 1  # every queue is processed at resume
                return
            self._process_queue(queue)

    def resubmit(self, queue: int, chains: list[tuple[int, int]]) -> int:
        """Execute again chains a previous incarnation of the device took and never returned
        (``(head, avail idx)``, oldest first), walked again in guest memory: vhost-user's
        inflight region after a back-end restart.  Stops at a chain that breaks the queue.
        Returns how many were started."""
        n = 0
        with self._lock:
            fn = self.fn
            vq = fn.queues[queue]
            for head, avail_idx in chains:
                if (queue, head) in self._inflight:
                    continue  # already held (never expected: the region marks a head once)
                chain = vq.rewalk(fn.port, head, avail_idx)
                if chain is None:
                    break
                self._start(Request.taken(queue, chain))
                n += 1
        return n

    def _process_queue(self, queue: int) -> None:
        if self.request_queues is not None and queue not in self.request_queues:
            return
        fn = self.fn
        vq = fn.queues[queue]
        port = fn.port  # its bus_master is what `mastering` reads
        start = self._start
        fast: Callable[[int], int | None] | None = self.fast_batch
        while port.bus_master and not self.stopping:
            if fast is not None:
                stop = fast(queue)
                if stop is None:
                    fast = None  # none now: not asked again for this notification's chains
                elif stop == FAST_EMPTY:
                    break
                elif stop == FAST_MORE:
                    continue
            chain = vq.pop(port)  # no fast path, or the next chain is not one it serves
            if chain is None:
                break
            start(Request.taken(queue, chain))
        if port.bus_master:
            vq.notify_driver(port)

    def fast_batch(self, queue: int) -> int | None:
        """Serve the queue's chains some faster way than one :class:`Request` each (the device
        lock held, the device mastering): :data:`FAST_EMPTY` when the ring is empty,
        :data:`FAST_SLOW` when the next chain is one it does not serve (the base then takes it),
        :data:`FAST_MORE` after a batch with more to come; ``None``: no fast path now.  Every
        chain served must end exactly as :meth:`_start` would end it."""
        return None

    def serve_in_c(self, queue: int, call: Callable[[tuple, tuple, tuple | None], tuple[tuple | None, int]]
                   ) -> tuple | None:
        """What every C fast path of a :meth:`fast_batch` shares: ``call(regions, queue_state,
        journal)`` runs the C over the queue's state (:meth:`Virtqueue.fast_state`) and guest
        memory's regions (:meth:`MemoryPort.pinned`, held for the call) and returns ``(result, next
        journal counter)``, ``result`` laid out ``(stop, taken, last_avail, avail_cache, used_idx,
        ..., written_bytes, written, used_event)`` -- or ``(None, counter)``: not run.  Every
        guest-memory write it reports is told to the port's writer (the dirty trackers), the
        queue takes its indices back, and :attr:`fast_served` and :attr:`completed` count the
        chains taken.  ``None``: not run (the queue takes no chain, the memory offers no regions,
        or ``call`` declined)."""
        fn = self.fn
        vq = fn.queues[queue]
        qs = vq.fast_state()
        if qs is None:
            return None
        port = fn.port
        with port.pinned() as regions:
            if regions is None:
                return None
            r = vq.with_journal(lambda journal: call(regions, qs, journal))
            if r is None:
                return None
            nbytes, written, used_event = r[-3:]
            if nbytes:
                port.tell_written(written, nbytes)
        _, taken, last_avail, cache, used = r[:5]
        vq.served(taken, last_avail, cache, used, used_event)
        self.fast_served += taken
        self.completed += taken
        return r

    def _start(self, req: Request) -> None:
        key = (req.queue, req.head)
        self._inflight[key] = req
        req.state = ReqState.PENDING
        req.data = b""
        assert req.chain is not None
        fn = self.fn
        try:
            work = self.handle(fn, req.queue, req.chain)
        except VirtqueueError as exc:
            self._drop(req)
            fn.queues[req.queue].broken = True
            fn.set_needs_reset(exc)
            return
        if callable(work):  # Work or DirectWork
            if self.inline_max and self.hold_after is None and self.runs_inline(req):
                self._run_inline(req, work)
                return
            if self.hold_after is not None:
                if self.hold_after <= 0:
                    work = self._held(work)
                else:
                    self.hold_after -= 1
            req.state = ReqState.RUNNING
            req.future = self._executor().submit(self._run, req, work)
        else:
            self._finish(req, work)

    def runs_inline(self, req: Request) -> bool:
        """Whether ``req``'s back-end work runs on the queue path (with :attr:`inline_max` set):
        it moves at most ``inline_max`` bytes.  A device whose work can block says no."""
        return self.request_bytes(req) <= self.inline_max

    def request_bytes(self, req: Request) -> int:
        """How many bytes a request moves (what :attr:`inline_max` is compared with)."""
        c = req.chain
        return 0 if c is None else c.readable_len + c.writable_len

    def _run_inline(self, req: Request, work: Work) -> None:
        """:meth:`_run` on the queue path (the device lock is held): the completion is written
        now and the driver notified once at the end of the batch (:meth:`_process_queue`).
        A :class:`DirectWork` runs direct: the lock held and the device mastering are its permit."""
        req.state = ReqState.RUNNING
        at = 0
        port = self.fn.port
        try:
            if isinstance(work, DirectWork) and self.direct_dma and port.bus_master:
                self.direct_runs += 1
                at, data = work.direct(port)
            else:
                data = work()
        except NotExecuted:
            req.state = ReqState.PENDING
            self.deferred += 1
            return
        except Exception as exc:
            assert req.chain is not None
            try:
                data = self.backend_failed(req.queue, req.chain, exc)
            except Exception:
                data = b""
            at = 0
        self._finish(req, data, notify=False, at=at)
        self._notify_settled()

    def _held(self, work: Work | DirectWork) -> Work:
        self.held += 1
        _log.info("%s: fault injection: holding request %d (never executed)", type(self).__name__, self.held)

        def held() -> bytes:
            self._release.wait()
            raise NotExecuted()

        return held

    def _permit(self, req: Request) -> bool:
        """A DMA permit for ``req``'s DirectWork: granted while the device masters, QUIESCE /
        FREEZE is not waiting for permits to end, and the request is still the device's."""
        with self._lock:
            if (self.direct_dma and self.mastering and not self._no_permits
                    and self._inflight.get((req.queue, req.head)) is req):  # fmt: skip
                self._permits += 1
                self.direct_runs += 1
                return True
            self.buffered_runs += 1
            return False

    def _run(self, req: Request, work: Work) -> None:
        permit = isinstance(work, DirectWork) and self._permit(req)
        try:
            self._run_work(req, work, permit)
        finally:
            if permit:
                with self._lock:
                    self._permits -= 1
                    self._notify_settled()

    def _run_work(self, req: Request, work: Work, permit: bool) -> None:
        at = 0
        try:
            if permit:
                assert isinstance(work, DirectWork)
                at, data = work.direct(self.fn.port)
            else:
                data = work()
        except (NotExecuted, DmaDisabledError):
            # the work gave up before it did anything, or its DMA found mastering off (cleared
            # under its permit by the PF or the driver): "not executed" again
            with self._lock:
                req.future = None
                if self._inflight.get((req.queue, req.head)) is req:
                    req.state = ReqState.PENDING
                    self.deferred += 1
                else:  # dropped by a reset meanwhile
                    req.state = ReqState.DONE
                self._notify_settled()
            return
        except Exception as exc:  # the back-end's failure becomes the request's status
            assert req.chain is not None
            try:
                data = self.backend_failed(req.queue, req.chain, exc)
            except Exception:  # a broken hook must not leave the request RUNNING forever
                data = b""
            at = 0
        with self._lock:
            req.future = None
            if self._inflight.get((req.queue, req.head)) is req:
                self._finish(req, data, at=at)
            else:  # dropped by a reset meanwhile: the result goes nowhere
                req.state = ReqState.DONE
            self._notify_settled()

    def _finish(self, req: Request, data: bytes, *, notify: bool = True, at: int = 0) -> None:
        fn = self.fn
        if at and not fn.port.bus_master:  # not mastering
            # a DirectWork's data is in guest memory, but mastering stopped under its permit (not
            # by QUIESCE / FREEZE, which wait for permits): its completion cannot be written now,
            # nor held as bytes -- "not executed" again, re-executed at resume
            req.state = ReqState.PENDING
            req.data, req.data_at = b"", 0
            self.deferred += 1
            return
        req.state = ReqState.DONE
        req.data = data if type(data) is bytes else bytes(data)
        req.data_at = at
        if fn.port.bus_master:  # mastering
            self._complete(req)
            if notify:
                fn.queues[req.queue].notify_driver(fn.port)

    def _drop(self, req: Request) -> None:
        if self._inflight.get((req.queue, req.head)) is req:
            del self._inflight[(req.queue, req.head)]
        self._notify_settled()

    def _complete(self, req: Request) -> None:
        """Write the held data and return the chain on the used ring (mastering only)."""
        fn = self.fn
        vq = fn.queues[req.queue]
        written = req.data_at
        if req.data:
            assert req.chain is not None
            try:
                written += req.chain.write(fn.port, req.data, req.data_at)
            except VirtqueueError as exc:  # data longer than the chain's writable part
                self._drop(req)
                vq.broken = True
                fn.set_needs_reset(exc)
                return
        self._drop(req)
        vq.push(fn.port, req.head, written)
        self.completed += 1

    # ================================================================== lifecycle
    def _cancel_not_started(self) -> int:
        """Cancel back-end work that has not started: those requests become PENDING."""
        n = 0
        for req in self._inflight.values():
            if req.state is ReqState.RUNNING and req.future is not None and req.future.cancel():
                req.future = None
                req.state = ReqState.PENDING
                n += 1
        return n

    def reset(self) -> None:
        """Drop every request (work not started is cancelled, running work is waited
        for and its result discarded).  The migration state is left alone."""
        with self._lock:
            self._cancel_not_started()
            dropped = list(self._inflight.values())
            self._inflight.clear()  # running work finishing now finds itself dropped
            self._notify_settled()
            self._wait_no_running(dropped, None)

    def _wait_no_running(self, reqs: list[Request], timeout: float | None) -> None:
        def settled() -> bool:
            return not any(r.state is ReqState.RUNNING for r in reqs)

        if not self._wait_settled(settled, timeout):
            running = sum(r.state is ReqState.RUNNING for r in reqs)
            raise DeviceBusyError(f"{self.fn.name}: {running} back-end requests still running after {timeout}s")

    def close(self) -> None:
        """Stop the back-end pool (the device is not used afterwards)."""
        self._release.set()
        with self._lock:
            self._cancel_not_started()
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    # ================================================================== migration interface
    def _end_permits(self) -> None:
        """Grant no more DMA permits, wait (at most DMA_SETTLE_TIMEOUT) for those held to end --
        each ends with its request completed on its used ring -- then stop mastering.  Called
        with the lock held."""
        self._no_permits = True
        try:
            if not self._wait_settled(lambda: self._permits == 0, DMA_SETTLE_TIMEOUT):
                _log.warning("%s: %d DMA permits still held after %ss: mastering stops anyway (their requests "
                             "are executed again at resume)", self.fn.name, self._permits, DMA_SETTLE_TIMEOUT)
        finally:
            self._no_permits = False
        self.fn.port.bus_master = False

    def mig_quiesce(self) -> None:
        with self._lock:
            self._end_permits()

    def mig_freeze(self, timeout: float = 10.0) -> None:
        """Quiesce, cancel work not started, wait ``timeout`` s for running work.

        On :class:`DeviceBusyError` the device stays quiesced (not frozen);
        the cancelled requests are PENDING and run again at resume."""
        with self._lock:
            self._end_permits()
            self._cancel_not_started()
            self._wait_no_running(list(self._inflight.values()), timeout)
            self.frozen = True

    def mig_unfreeze(self) -> None:
        with self._lock:
            self.frozen = False

    def mig_resume(self) -> None:
        with self._lock:
            fn = self.fn
            self.frozen = False
            fn.port.bus_master = True
            if not fn.status & DeviceStatus.DRIVER_OK or fn.needs_reset:
                return
            touched: set[int] = set()
            for req in sorted(self._inflight.values(), key=lambda r: (r.queue, r.avail_idx)):
                touched.add(req.queue)
                if req.chain is None:  # restored: walk the chain again in guest memory
                    req.chain = fn.queues[req.queue].rewalk(fn.port, req.head, req.avail_idx)
                    if req.chain is None:  # the queue broke (NEEDS_RESET is set)
                        self._drop(req)
                        continue
                if req.state is ReqState.DONE:
                    self._complete(req)
                elif req.state is ReqState.PENDING:
                    self._start(req)
            for q in range(len(fn.queues)):
                if fn.queues[q].enabled:
                    self._process_queue(q)
                    touched.discard(q)
            for q in touched:
                fn.queues[q].notify_driver(fn.port)

    # ================================================================== virtio 1.4 profile
    def mig_stop(self, timeout: float = 10.0) -> None:
        """STOPPED the way virtio 1.4 defines it: every chain taken is completed
        and returned on its used ring before the device stops mastering.

        New chains are not taken meanwhile (doorbells are remembered: every queue
        is processed at :meth:`mig_start`).  If the requests do not finish within
        ``timeout`` s, :class:`DeviceBusyError` and the device runs on as before."""
        with self._lock:
            if not self.mastering:
                return  # already stopped
            self.stopping = True
            try:
                for req in list(self._inflight.values()):
                    if req.state is ReqState.PENDING and req.chain is not None:
                        self._start(req)
                    elif req.state is ReqState.DONE:
                        self._complete(req)
                        self.fn.queues[req.queue].notify_driver(self.fn.port)
                if not self._wait_settled(lambda: not self._inflight, timeout):
                    raise DeviceBusyError(
                        f"{self.fn.name}: {len(self._inflight)} requests still in flight after {timeout}s"
                    )
            except BaseException:
                self.stopping = False
                for q in range(len(self.fn.queues)):
                    if self.fn.queues[q].enabled:
                        self._process_queue(q)  # doorbells rung meanwhile
                raise
            self.fn.port.bus_master = False
            self.stopping = False

    def mig_start(self) -> None:
        """STOPPED -> running (see :class:`PartsMigratable`)."""
        with self._lock:
            fn = self.fn
            fn.port.bus_master = True
            for vq in fn.queues:
                if vq.resync_pending:
                    vq.resync_from_ring(fn.port)
            self.mig_resume()

    def mig_parts(self) -> list[DevPart]:
        with self._lock:
            return function_parts(self.fn) + self.save_device_parts()

    def mig_max_parts_size(self) -> int:
        with self._lock:
            common = sum(p.size for p in function_parts(self.fn))  # fixed by the function's shape
        return common + self.max_device_parts_size()

    def mig_validate_parts(self, parts: list[DevPart]) -> ValidatedParts:
        """Check untrusted parts against this device; changes nothing."""
        used = check_list(parts, self.device_part_types)
        common = [p for p in used if p.hdr.part_type < DEVICE_FIRST]
        device = [p for p in used if p.hdr.part_type >= DEVICE_FIRST]
        fp = validate_function_parts(self.fn, common)
        parsed = self.validate_device_parts(device, fp.negotiated(self.fn.negotiated))
        return ValidatedParts(fp, parsed)

    def mig_set_parts(self, validated: object) -> None:
        """Apply what :meth:`mig_validate_parts` returned (the device is STOPPED)."""
        if not isinstance(validated, ValidatedParts):
            raise TypeError(f"mig_set_parts takes what mig_validate_parts returned, not {type(validated).__name__}")
        with self._lock:
            if self.mastering:
                raise DeviceBusyError(f"{self.fn.name}: parts set while the device runs (stop it first)")
            self._inflight.clear()
            apply_function_parts(self.fn, validated.function)
            self.restore_device_parts(validated.device)

    def mig_save(self) -> bytes:
        """The state image; refused (:class:`DeviceBusyError`) while back-end work runs."""
        fn = self.fn
        with fn.locked(), self._lock:  # lock order: virtio_lm.pci.function's docstring
            img = StateImage(self.device_id)
            for rtype, payload in save_function(fn):
                img.add(rtype, payload)
            for rtype, payload in self.save_device_records():
                img.add(rtype, payload)
            for req in sorted(self._inflight.values(), key=lambda r: (r.queue, r.avail_idx)):
                if req.state is ReqState.RUNNING:
                    raise DeviceBusyError(f"{fn.name}: save while request {req.head} is running")
                done = req.state is ReqState.DONE
                data = req.data if done else b""
                hdr = InflightHeader(req.queue, req.head, req.avail_idx, int(done), len(data))
                img.add(RecordType.INFLIGHT, hdr.encode() + data)
            return encode_image(img)

    def mig_validate(self, blob: bytes) -> ValidatedImage:
        """Parse and check ``blob`` against this device; changes nothing.

        Beyond :func:`validate_function`: every INFLIGHT record names an
        enabled queue, a head below its size, no (queue, head) twice, data
        only when done and at most MAX_HELD_DATA bytes; and each queue has
        exactly ``last_avail_idx - used_idx`` records (at most that many on
        a queue saved broken, whose device may have dropped chains); and the
        records in the order :meth:`mig_save` writes them, so that an accepted
        image saves back byte-identical."""
        try:
            image = decode_image(blob)
        except WireError as exc:
            raise StateImageError("image", str(exc)) from exc
        fn = self.fn
        snap = validate_function(fn, image)
        headers: list[InflightHeader] = []
        datas: list[bytes] = []
        seen: set[tuple[int, int]] = set()
        per_queue = [0] * len(fn.queues)
        for i, rec in enumerate(image.of_type(RecordType.INFLIGHT)):
            h = InflightHeader.unpack_from(rec.payload, 0)
            where = f"inflight[{i}]"
            if h.queue >= len(fn.queues):
                raise StateImageError(where, f"queue {h.queue} does not exist")
            q = snap.queues[h.queue]
            if not q.enabled:
                raise StateImageError(where, f"queue {h.queue} is not enabled")
            if h.head >= q.size:
                raise StateImageError(where, f"head {h.head} >= queue size {q.size}")
            if (h.queue, h.head) in seen:
                raise StateImageError(where, f"chain {h.head} of queue {h.queue} recorded twice")
            if not h.done and h.data_len:
                raise StateImageError(where, f"a request not executed carries {h.data_len} bytes of data")
            if h.data_len > MAX_HELD_DATA:
                raise StateImageError(where, f"held data of {h.data_len} bytes is too large")
            seen.add((h.queue, h.head))
            per_queue[h.queue] += 1
            headers.append(h)
            datas.append(rec.payload[InflightHeader.SIZE :])
        for qi, n in enumerate(per_queue):
            held = snap.in_flight(qi)
            broken = bool(snap.queues[qi].flags & QUEUE_FLAG_BROKEN)
            if n > held or (n != held and not broken):
                raise StateImageError(
                    f"queue[{qi}]", f"{held} chains taken but not returned, yet {n} INFLIGHT records"
                )
        device = self.validate_device_records(image, snap)
        _check_record_order(image)
        return ValidatedImage(snap, tuple(headers), tuple(datas), device)

    def mig_restore(self, validated: object) -> None:
        """Apply what :meth:`mig_validate` returned.  Only while frozen (no back-end
        work running); the restored chains are walked again at :meth:`mig_resume`."""
        if not isinstance(validated, ValidatedImage):
            raise TypeError(f"mig_restore takes what mig_validate returned, not {type(validated).__name__}")
        fn = self.fn
        with fn.locked(), self._lock:
            if any(r.state is ReqState.RUNNING for r in self._inflight.values()):
                raise DeviceBusyError(f"{fn.name}: restore while back-end work runs (freeze first)")
            apply_function(fn, validated.function)
            self.restore_device_records(validated.device)
            self._inflight.clear()
            for h, data in zip(validated.inflight, validated.data):
                state = ReqState.DONE if h.done else ReqState.PENDING
                self._inflight[(h.queue, h.head)] = Request(h.queue, h.head, h.avail_idx, None, state, data)
