"""A vhost-user back-end for a :class:`~virtio_lm.devices.base.QueueDevice` (sans socket I/O).

:class:`VhostFunction` is the vhost-user transport of a device, the
counterpart of :class:`~virtio_lm.pci.function.VirtioPciFunction`: it owns
the :class:`~virtio_lm.virtqueue.device.Virtqueue` objects, the device's
:class:`~virtio_lm.memory.MemoryPort` (over a
:class:`~virtio_lm.vhost.memmap.GuestMemoryMap`) and the negotiated features,
and the device is bound to it exactly as to a PCI function -- the same
:class:`~virtio_lm.devices.blk.BlkDevice` code serves both.  Interrupts go to
the ring's call eventfd; a broken ring signals its err eventfd.

:class:`VhostUserBackend` handles one connection's messages
(:meth:`VhostUserBackend.handle` returns the reply bytes, or ``None``).  Any
refused message raises a :class:`~virtio_lm.errors.VhostUserError`; the
server then closes the connection and calls :meth:`VhostUserBackend.disconnect`,
which drops every request, unmaps everything and closes every fd, so the next
connection starts from scratch.

Ring life cycle: :data:`RING_TRANSITIONS` is the table of (ring state, message)
-> action; pairs not in it are refused.  A ring is *started* by SET_VRING_KICK
and *stopped* by GET_VRING_BASE, which stops taking chains, waits for every
request of the ring to complete (each completion written to the used ring,
through the tracker while logging) and returns ``last_avail_idx``.  A started
ring is processed only while *enabled* (SET_VRING_ENABLE; rings start enabled
unless VHOST_USER_F_PROTOCOL_FEATURES was negotiated).  At start the device's
``used_idx`` is read from the used ring in guest memory (after a migration it
is what the source wrote), and the ring is processed at once (chains made
available while no back-end ran).

Dirty logging: while SET_FEATURES has VHOST_F_LOG_ALL (bit 26) and a log is
mapped (SET_LOG_BASE), the port's ``writer.tracker`` is a
:class:`~virtio_lm.pf.tracking.PushTracker` in PUSH_BITMAP mode whose map is
the log -- the same tracker code as the proposal's push-bitmap mode: every
write the device makes (data buffers, used elements, used idx, avail_event)
sets its pages' bits with ``atomic_or``.  The front-end only ever clears bits
(atomic exchange with 0), so a read-modify-write of a byte racing with it can
only re-set bits already collected (a page sent twice), never lose one.
Writes made while LOG_ALL is set but before the log is mapped are kept
(:class:`PendingMarks`) and replayed into the log when it arrives.
``log_writes=False`` builds the *negative control*: it offers LOG_ALL and
LOG_SHMFD and accepts the log, but never writes it.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass

from virtio_lm.devices.base import QueueDevice
from virtio_lm.errors import (
    MemoryAccessError,
    VhostInflightError,
    RegisterAccessError,
    VhostMessageError,
    VhostRingError,
    VirtioLmError,
    VirtqueueError,
    WireError,
)
from virtio_lm.memory import MemoryPort
from virtio_lm.memory.region import DeviceWriter
from virtio_lm.pf.tracking import PushTracker
from virtio_lm.vhost.inflight import InflightQueue, InflightRegion
from virtio_lm.vhost.memmap import GuestMemoryMap, LogMap
from virtio_lm.vhost.protocol import Message, check_shape, encode_reply
from virtio_lm.virtqueue.device import Virtqueue
from virtio_lm.wire.codec import u64
from virtio_lm.wire.ctrl import TrackMode
from virtio_lm.wire.features import DeviceStatus, Feature, bit
from virtio_lm.wire.ring import avail_ring_size, desc_table_size, used_ring_size
from virtio_lm.wire.vhost_user import (
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VRING_F_LOG,
    VRING_FILE_INDEX_MASK,
    VRING_FILE_NOFD,
    LogBase,
    Inflight,
    ProtocolFeature,
    Request,
    SingleRegion,
    VringAddr,
    VringState,
    decode_config,
    decode_mem_table,
    decode_rarp_mac,
    decode_u64,
    encode_config,
)

__all__ = [
    "BACKEND_PROTOCOL_FEATURES",
    "RING_TRANSITIONS",
    "PendingMarks",
    "RingAction",
    "RingInput",
    "RingState",
    "VhostFunction",
    "VhostUserBackend",
]

log = logging.getLogger(__name__)

LOG_ALL = 1 << VHOST_F_LOG_ALL
PROTOCOL_FEATURES = 1 << VHOST_USER_F_PROTOCOL_FEATURES
VHOST_BITS = LOG_ALL | PROTOCOL_FEATURES
BACKEND_PROTOCOL_FEATURES = (
    bit(ProtocolFeature.MQ)
    | bit(ProtocolFeature.LOG_SHMFD)
    | bit(ProtocolFeature.REPLY_ACK)
    | bit(ProtocolFeature.CONFIG)
    | bit(ProtocolFeature.INFLIGHT_SHMFD)
    | bit(ProtocolFeature.CONFIGURE_MEM_SLOTS)
)
MAX_MEM_SLOTS = 32
#: how long GET_VRING_BASE waits for a ring's requests before giving up on the connection
STOP_TIMEOUT = 30.0


# ---------------------------------------------------------------------------- ring table
class RingState(enum.Enum):
    STOPPED = "stopped"  # no kick fd since the last GET_VRING_BASE (or ever)
    STARTED = "started"  # SET_VRING_KICK received: processed while enabled


class RingInput(enum.Enum):
    NUM = "SET_VRING_NUM"
    ADDR = "SET_VRING_ADDR"
    BASE = "SET_VRING_BASE"
    KICK = "SET_VRING_KICK"
    CALL = "SET_VRING_CALL"
    ERR = "SET_VRING_ERR"
    ENABLE = "SET_VRING_ENABLE"
    GET_BASE = "GET_VRING_BASE"


class RingAction(enum.Enum):
    CONFIGURE = "configure"  # set the field
    LOG_FLAG = "log_flag"  # ADDR on a running ring: only the log flag/address may change
    START = "start"  # KICK on a stopped ring
    REPLACE_FD = "replace_fd"  # KICK/CALL/ERR: swap the fd
    ENABLE = "enable"
    STOP = "stop"  # GET_VRING_BASE on a started ring
    REPORT = "report"  # GET_VRING_BASE on a stopped ring: just the index


S, I, A = RingState, RingInput, RingAction
#: (ring state, input) -> action; anything else is refused with VhostRingError.
RING_TRANSITIONS: dict[tuple[RingState, RingInput], RingAction] = {
    (S.STOPPED, I.NUM): A.CONFIGURE,
    (S.STOPPED, I.ADDR): A.CONFIGURE,
    (S.STOPPED, I.BASE): A.CONFIGURE,
    (S.STOPPED, I.KICK): A.START,
    (S.STOPPED, I.CALL): A.REPLACE_FD,
    (S.STOPPED, I.ERR): A.REPLACE_FD,
    (S.STOPPED, I.ENABLE): A.ENABLE,
    (S.STOPPED, I.GET_BASE): A.REPORT,
    (S.STARTED, I.ADDR): A.LOG_FLAG,
    (S.STARTED, I.KICK): A.REPLACE_FD,
    (S.STARTED, I.CALL): A.REPLACE_FD,
    (S.STARTED, I.ERR): A.REPLACE_FD,
    (S.STARTED, I.ENABLE): A.ENABLE,
    (S.STARTED, I.GET_BASE): A.STOP,
}
del S, I, A


class PendingMarks:
    """A DirtySink holding marks made while LOG_ALL is on but no log is mapped yet."""

    LIMIT = 4096

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []
        self.overflow = False
        self._lock = threading.Lock()

    def mark(self, first_page: int, last_page: int) -> None:
        with self._lock:
            if len(self.ranges) >= self.LIMIT:
                self.overflow = True
            else:
                self.ranges.append((first_page, last_page))

    def replay(self, tracker: PushTracker) -> None:
        with self._lock:
            ranges, overflow = self.ranges, self.overflow
            self.ranges, self.overflow = [], False
        if overflow:
            tracker.mark(0, tracker.capacity_pages)  # past capacity: the tracker sets the whole map
            return
        for a, b in ranges:
            tracker.mark(a, b)


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


@dataclass
class Ring:
    """vhost-user state of one ring beside its Virtqueue."""

    index: int
    state: RingState = RingState.STOPPED
    enabled: bool = False
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    base: int = 0
    addr: VringAddr | None = None
    log_used: bool = False
    kick_gen: int = 0  # bumped each time kick_fd changes (an fd number may be reused)
    resubmit: tuple[tuple[int, int], ...] = ()  # (head, avail idx) found in the inflight region, run at enable

    def close_fds(self) -> None:
        for name in ("kick_fd", "call_fd", "err_fd"):
            _close(getattr(self, name))
            setattr(self, name, None)


# ---------------------------------------------------------------------------- transport
class TrackedVirtqueue(Virtqueue):
    """A :class:`Virtqueue` that records taken and returned heads in an inflight region
    (:mod:`virtio_lm.vhost.inflight`) while one is attached (``inflight``)."""

    def __init__(self, index: int, max_size: int, *, name: str = "") -> None:
        super().__init__(index, max_size, name=name)
        self.inflight: InflightQueue | None = None
        self.taken = 0  # chains taken from the avail ring (statistics)

    def pop(self, port: MemoryPort):  # type: ignore[no-untyped-def]
        chain = super().pop(port)
        if chain is not None:
            self.taken += 1
            t = self.inflight
            if t is not None:
                t.take(chain.head)
        return chain

    def served(self, taken: int, last_avail_idx: int, avail_cache: int, used_idx: int, used_event: int = -1) -> None:
        super().served(taken, last_avail_idx, avail_cache, used_idx, used_event)
        self.taken += taken

    def with_journal(self, run):  # type: ignore[no-untyped-def]
        t = self.inflight
        return super().with_journal(run) if t is None else t.served(run)

    def push_many(self, port: MemoryPort, items) -> None:  # type: ignore[no-untyped-def]
        t = self.inflight
        if t is None:
            super().push_many(port, items)
            return
        items = list(items)
        heads = [h for h, _ in items]
        t.returning(heads)
        before = self.used_idx
        super().push_many(port, items)
        if self.used_idx != before:
            t.returned(heads, self.used_idx)


class VhostFunction:
    """The vhost-user transport a QueueDevice is bound to (what QueueDevice and
    BlkDevice use of a function: ``port``, ``queues``, ``negotiated``, ``name``,
    ``status``, ``set_needs_reset``, ``needs_reset``, ``locked()``).  Lock order:
    :mod:`virtio_lm.pci.function`'s docstring (``locked()`` first, ``fds_locked()`` last)."""

    def __init__(self, device: QueueDevice, *, name: str = "vhost-blk", rings: int | None = None) -> None:
        self.name = name
        self.device = device
        self.memory = GuestMemoryMap(f"{name}.guest", max_regions=MAX_MEM_SLOTS)
        self.port = MemoryPort(self.memory, DeviceWriter(f"{name}.dma"))  # type: ignore[arg-type]
        # the device's queues the front-end hands over (virtio-net's control queue stays in QEMU)
        n = device.num_queues if rings is None else rings
        if not 1 <= n <= device.num_queues:
            raise ValueError(f"{name}: {n} rings for a device with {device.num_queues} queues")
        self.queues = [TrackedVirtqueue(i, device.queue_max_size, name=f"{name}.q{i}") for i in range(n)]
        self.rings = [Ring(i) for i in range(n)]
        self.negotiated = 0
        # the device sees a running function; vhost-user has no status register
        self.status = int(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK | DeviceStatus.DRIVER_OK)
        self.needs_reset_reason: str | None = None
        self.interrupts = 0
        self.config_changes = 0
        self._lock = threading.RLock()
        self._fd_lock = threading.Lock()
        for q in self.queues:
            self._wire(q)
        device.bind(self)  # type: ignore[arg-type]

    def locked(self) -> AbstractContextManager[bool]:
        """The transport's register-lock equivalent (re-entrant): what a state image's save
        and apply hold, as with :meth:`VirtioPciFunction.locked`."""
        return self._lock

    def fds_locked(self) -> AbstractContextManager[bool]:
        """Hold the fd lock (a leaf): the rings' kick / call / err fds do not change meanwhile."""
        return self._fd_lock

    def _wire(self, q: Virtqueue) -> None:
        index = q.index

        def interrupt() -> None:
            self.signal_call(index)

        def on_error(exc: VirtqueueError) -> None:
            log.warning("%s: ring %d broken: %s", self.name, index, exc)
            self.needs_reset_reason = str(exc)
            with self._fd_lock:
                fd = self.rings[index].err_fd
                if fd is not None:
                    try:
                        os.eventfd_write(fd, 1)
                    except OSError:
                        pass

        q.interrupt = interrupt
        q.on_error = on_error

    def signal_call(self, index: int) -> None:
        with self._fd_lock:
            fd = self.rings[index].call_fd
            self.interrupts += 1
            if fd is not None:
                try:
                    os.eventfd_write(fd, 1)
                except OSError as exc:
                    log.warning("%s: call fd of ring %d: %s", self.name, index, exc)

    def config_changed(self) -> None:
        """A device configuration change.  Over vhost-user the front-end owns the configuration
        space and its interrupt (a back-end would need the back-end request channel, not
        negotiated here): the change is logged and counted, the driver is not told."""
        self.config_changes += 1
        log.info("%s: configuration change not signalled (no back-end request channel)", self.name)

    def set_needs_reset(self, reason: object = None) -> None:
        self.needs_reset_reason = None if reason is None else str(reason)
        log.warning("%s: device error: %s", self.name, reason)

    @property
    def needs_reset(self) -> bool:
        return False


# ---------------------------------------------------------------------------- back-end
class VhostUserBackend:
    """One connection's protocol state over a :class:`VhostFunction` (see the module docstring).

    Device-type hooks (a subclass per device type overrides them): :attr:`protocol_offer`,
    :meth:`queue_num` (GET_QUEUE_NUM), :meth:`send_rarp` (SEND_RARP), :meth:`rings_changed`
    (after a ring started, stopped, was enabled or disabled) and ``rings`` (how many of the
    device's queues the front-end hands over)."""

    #: VHOST_USER_PROTOCOL_F_* bits offered
    protocol_offer: int = BACKEND_PROTOCOL_FEATURES

    def __init__(
        self, device: QueueDevice, *, name: str = "vhost-blk", log_writes: bool = True, rings: int | None = None
    ) -> None:
        self.device = device
        self.fn = VhostFunction(device, name=name, rings=rings)
        self.name = name
        self.log_writes = log_writes
        self.features = 0
        self.protocol_features = 0
        self.owner = False
        self.log: LogMap | None = None
        self.tracker: PushTracker | None = None
        self.pending = PendingMarks()
        self.messages = 0
        self.inflight: InflightRegion | None = None
        self.resubmitted = 0
        self._reply_fds: list[int] = []

    # ------------------------------------------------------------------ helpers
    @property
    def offered_features(self) -> int:
        return self.device.offered_features() | LOG_ALL | PROTOCOL_FEATURES

    @property
    def logging(self) -> bool:
        return bool(self.features & LOG_ALL)

    def _ring(self, index: int, what: str) -> Ring:
        if not 0 <= index < len(self.fn.rings):
            raise VhostRingError(f"{what}: ring {index} does not exist (the device has {len(self.fn.rings)})")
        return self.fn.rings[index]

    def _action(self, ring: Ring, inp: RingInput) -> RingAction:
        action = RING_TRANSITIONS.get((ring.state, inp))
        if action is None:
            raise VhostRingError(f"{inp.value} on ring {ring.index} while it is {ring.state.value}")
        return action

    def take_reply_fds(self) -> list[int]:
        """fds to send with the last reply (SCM_RIGHTS); they stay owned by the back-end."""
        fds, self._reply_fds = self._reply_fds, []
        return fds

    # ------------------------------------------------------------------ device-type hooks
    def queue_num(self) -> int:
        """GET_QUEUE_NUM's answer: the rings (virtio-blk counts queues)."""
        return len(self.fn.rings)

    def send_rarp(self, mac: bytes) -> None:
        """SEND_RARP: only a net back-end offers VHOST_USER_PROTOCOL_F_RARP."""
        raise VhostMessageError(f"SEND_RARP: {self.name} is not a net back-end")

    def rings_changed(self) -> None:
        """A ring started, stopped, or was enabled / disabled."""

    def _update_tracker(self) -> None:
        """Install the sink matching LOG_ALL and the log (see the module docstring)."""
        writer = self.fn.port.writer
        if not self.logging or not self.log_writes:
            writer.tracker = None  # type: ignore[attr-defined]
            return
        if self.log is None:
            writer.tracker = self.pending  # type: ignore[attr-defined]
            return
        if self.tracker is None:
            log_port = MemoryPort(self.log, DeviceWriter(f"{self.name}.log"))  # type: ignore[arg-type]
            self.tracker = PushTracker(TrackMode.PUSH_BITMAP, log_port, [(0, self.log.log_bytes)])
        self.pending.replay(self.tracker)
        writer.tracker = self.tracker  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ entry point
    def handle(self, msg: Message) -> bytes | None:
        """Handle one message; the reply bytes (or None).  Refusals raise VhostUserError
        (the message's fds are closed then)."""
        try:
            req = check_shape(msg)
            self.messages += 1
            reply = self._dispatch(req, msg)
        finally:
            msg.close_fds()  # fds not taken by a handler
        if reply is None and msg.header.need_reply:
            return encode_reply(req, u64(0))
        return reply

    def _dispatch(self, req: Request, msg: Message) -> bytes | None:
        p = msg.payload
        if req is Request.GET_FEATURES:
            return encode_reply(req, u64(self.offered_features))
        if req is Request.SET_FEATURES:
            return self._set_features(decode_u64(p))
        if req is Request.GET_PROTOCOL_FEATURES:
            return encode_reply(req, u64(self.protocol_offer))
        if req is Request.SET_PROTOCOL_FEATURES:
            value = decode_u64(p)
            if value & ~self.protocol_offer:
                raise VhostMessageError(f"SET_PROTOCOL_FEATURES: bits {value & ~self.protocol_offer:#x} not offered")
            self.protocol_features = value
            return None
        if req is Request.SET_OWNER:
            self.owner = True
            return None
        if req in (Request.RESET_OWNER, Request.RESET_DEVICE):
            self.reset()
            return None
        if req is Request.GET_QUEUE_NUM:
            return encode_reply(req, u64(self.queue_num()))
        if req in (Request.GET_INFLIGHT_FD, Request.SET_INFLIGHT_FD):
            return self._inflight_message(req, msg)
        if req is Request.SEND_RARP:
            if not self.protocol_features & bit(ProtocolFeature.RARP):
                raise VhostMessageError("SEND_RARP: VHOST_USER_PROTOCOL_F_RARP was not negotiated")
            self.send_rarp(decode_rarp_mac(p))
            return None
        if req is Request.GET_MAX_MEM_SLOTS:
            return encode_reply(req, u64(MAX_MEM_SLOTS))
        if req is Request.SET_MEM_TABLE:
            regions = decode_mem_table(p)
            self.fn.memory.set_table(regions, msg.take_fds())
            return None
        if req is Request.ADD_MEM_REG:
            self.fn.memory.add_region(SingleRegion.decode(p).region, msg.take_fds()[0])
            return None
        if req is Request.REM_MEM_REG:
            self.fn.memory.remove_region(SingleRegion.decode(p).region)
            return None
        if req is Request.SET_LOG_BASE:
            lb = LogBase.decode(p)  # type: ignore[attr-defined]
            new = LogMap(msg.take_fds()[0], lb.mmap_size, lb.mmap_offset)
            old, self.log, self.tracker = self.log, new, None
            self._update_tracker()
            if old is not None:
                old.close()
            return encode_reply(req, u64(0))
        if req is Request.GET_CONFIG:
            hdr, _ = decode_config(p)
            data = self.device.config_read(hdr.offset, hdr.size)
            data = data + bytes(hdr.size - len(data))  # past the device's config: zeros
            return encode_reply(req, encode_config(hdr.offset, data, hdr.flags))
        if req is Request.SET_CONFIG:
            hdr, body = decode_config(p)
            try:
                self.device.config_write(hdr.offset, body)
            except RegisterAccessError as exc:
                log.info("%s: SET_CONFIG refused: %s", self.name, exc)
                if msg.header.need_reply:
                    return encode_reply(req, u64(1))
            return None
        return self._ring_message(req, msg)

    def _inflight_message(self, req: Request, msg: Message) -> bytes | None:
        if not self.protocol_features & bit(ProtocolFeature.INFLIGHT_SHMFD):
            raise VhostMessageError(f"{req.name}: VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD was not negotiated")
        if any(r.state is RingState.STARTED for r in self.fn.rings):
            raise VhostInflightError(f"{req.name} while rings run")
        try:
            info = Inflight.decode(msg.payload)  # type: ignore[attr-defined]
        except WireError as exc:  # e.g. non-zero padding: a malformed message, not a refused region
            raise VhostMessageError(f"{req.name}: {exc}") from exc
        max_q = len(self.fn.rings)
        max_size = self.device.queue_max_size
        if req is Request.GET_INFLIGHT_FD:
            qs = info.queue_size
            if not 1 <= info.num_queues <= max_q:
                raise VhostInflightError(f"GET_INFLIGHT_FD: {info.num_queues} queues, the device has {max_q}")
            if qs == 0 or qs & (qs - 1) or qs > max_size:
                raise VhostInflightError(f"GET_INFLIGHT_FD: queue size {qs} is not a power of two <= {max_size}")
            region = InflightRegion.create(info.num_queues, qs)
        else:
            fd = msg.take_fds()[0]
            cur = self.inflight
            if cur is not None and cur.info == info and cur.same_file(fd):
                # QEMU sends SET_INFLIGHT_FD after every GET_INFLIGHT_FD, with the region it just got:
                # it stays this process's own (fresh) region
                _close(fd)
                return None
            region = InflightRegion.attach(fd, info, max_queues=max_q, max_size=max_size)
        old, self.inflight = self.inflight, region
        if old is not None:
            old.close()
        if req is Request.GET_INFLIGHT_FD:
            self._reply_fds = [region.fd]
            return encode_reply(req, region.info.encode())  # type: ignore[attr-defined]
        return None

    def _set_features(self, value: int) -> None:
        unoffered = value & ~self.offered_features
        if unoffered:
            raise VhostMessageError(f"SET_FEATURES: bits {unoffered:#x} were not offered")
        virtio = value & ~VHOST_BITS
        self.features = value
        self.fn.negotiated = virtio
        for q in self.fn.queues:
            q.event_idx = bool(virtio & bit(Feature.EVENT_IDX))
            q.indirect_desc = bool(virtio & bit(Feature.INDIRECT_DESC))
        self._update_tracker()
        return None

    # ------------------------------------------------------------------ rings
    def _ring_message(self, req: Request, msg: Message) -> bytes | None:
        p = msg.payload
        if req in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
            value = decode_u64(p)
            if value & ~(VRING_FILE_INDEX_MASK | VRING_FILE_NOFD):
                raise VhostMessageError(f"{req.name}: unknown bits {value:#x}")
            nofd = bool(value & VRING_FILE_NOFD)
            if nofd == bool(msg.fds):
                raise VhostMessageError(f"{req.name}: the no-fd flag is {int(nofd)} but {len(msg.fds)} fds came")
            ring = self._ring(value & VRING_FILE_INDEX_MASK, req.name)
            inp = {Request.SET_VRING_KICK: RingInput.KICK, Request.SET_VRING_CALL: RingInput.CALL}.get(req, RingInput.ERR)
            action = self._action(ring, inp)
            fd = None if nofd else msg.take_fds()[0]
            attr = {RingInput.KICK: "kick_fd", RingInput.CALL: "call_fd", RingInput.ERR: "err_fd"}[inp]
            with self.fn.fds_locked():
                old = getattr(ring, attr)
                setattr(ring, attr, fd)
                if inp is RingInput.KICK:
                    ring.kick_gen += 1
            _close(old)
            if action is RingAction.START:
                self._start(ring)
            return None
        if req is Request.SET_VRING_ADDR:
            a = VringAddr.decode(p)  # type: ignore[attr-defined]
            ring = self._ring(a.index, req.name)
            action = self._action(ring, RingInput.ADDR)
            if a.flags & ~(1 << VRING_F_LOG):
                raise VhostRingError(f"SET_VRING_ADDR ring {a.index}: unknown flags {a.flags:#x}")
            if action is RingAction.LOG_FLAG:
                assert ring.addr is not None
                same = (a.desc_user_addr, a.used_user_addr, a.avail_user_addr) == (
                    ring.addr.desc_user_addr,
                    ring.addr.used_user_addr,
                    ring.addr.avail_user_addr,
                )
                if not same:
                    raise VhostRingError(f"SET_VRING_ADDR ring {a.index}: addresses changed while the ring runs")
            self._check_log_addr(ring, a)
            ring.addr = a
            ring.log_used = bool(a.flags & (1 << VRING_F_LOG))
            return None
        state = VringState.decode(p)  # type: ignore[attr-defined]
        ring = self._ring(state.index, req.name)
        if req is Request.SET_VRING_NUM:
            self._action(ring, RingInput.NUM)
            q = self.fn.queues[ring.index]
            n = state.num
            if n == 0 or n & (n - 1) or n > q.max_size:
                raise VhostRingError(f"SET_VRING_NUM ring {ring.index}: {n} is not a power of two <= {q.max_size}")
            q.size = n
            return None
        if req is Request.SET_VRING_BASE:
            self._action(ring, RingInput.BASE)
            if state.num > 0xFFFF:
                raise VhostRingError(f"SET_VRING_BASE ring {ring.index}: {state.num} is not a u16")
            ring.base = state.num
            return None
        if req is Request.SET_VRING_ENABLE:
            self._action(ring, RingInput.ENABLE)
            if state.num not in (0, 1):
                raise VhostRingError(f"SET_VRING_ENABLE ring {ring.index}: {state.num} is not 0 or 1")
            ring.enabled = bool(state.num)
            self._apply_enable(ring)
            return None
        if req is Request.GET_VRING_BASE:
            action = self._action(ring, RingInput.GET_BASE)
            if action is RingAction.STOP:
                self._stop(ring)
            return encode_reply(req, VringState(ring.index, ring.base).encode())  # type: ignore[attr-defined]
        raise VhostMessageError(f"{req.name} is not a ring message")  # pragma: no cover - table covers all

    def _check_log_addr(self, ring: Ring, a: VringAddr) -> None:
        if not a.flags & (1 << VRING_F_LOG):
            return
        try:
            used_gpa = self.fn.memory.user_to_gpa(a.used_user_addr, 4)
        except MemoryAccessError:
            return  # refused with a clear error when the ring starts (memory may come later)
        if used_gpa != a.log_guest_addr:
            raise VhostRingError(
                f"SET_VRING_ADDR ring {a.index}: log_guest_addr {a.log_guest_addr:#x} is not the used ring's "
                f"guest address {used_gpa:#x}"
            )

    def _translate(self, ring: Ring) -> tuple[int, int, int]:
        """Guest-physical desc/avail/used addresses of the ring (each part inside one region)."""
        q = self.fn.queues[ring.index]
        a = ring.addr
        if a is None:
            raise VhostRingError(f"ring {ring.index} started before SET_VRING_ADDR")
        parts = (
            ("descriptor table", a.desc_user_addr, desc_table_size(q.size)),
            ("avail ring", a.avail_user_addr, avail_ring_size(q.size, q.event_idx)),
            ("used ring", a.used_user_addr, used_ring_size(q.size, q.event_idx)),
        )
        out = []
        for what, uaddr, length in parts:
            try:
                out.append(self.fn.memory.user_to_gpa(uaddr, length))
            except MemoryAccessError as exc:
                raise VhostRingError(
                    f"ring {ring.index}: {what} at user address {uaddr:#x} (+{length:#x}) is outside every memory region"
                ) from exc
        if ring.log_used and out[2] != a.log_guest_addr:
            raise VhostRingError(
                f"ring {ring.index}: log_guest_addr {a.log_guest_addr:#x} is not the used ring's guest address {out[2]:#x}"
            )
        return out[0], out[1], out[2]

    def _start(self, ring: Ring) -> None:
        q = self.fn.queues[ring.index]
        desc, avail, used = self._translate(ring)
        with self.device.locked():
            size, event_idx, indirect = q.size, q.event_idx, q.indirect_desc
            q.reset()
            q.size, q.event_idx, q.indirect_desc = size, event_idx, indirect
            q.desc_addr, q.avail_addr, q.used_addr = desc, avail, used
            try:
                q.check_config(self.fn.port)
                q.used_idx = int.from_bytes(self.fn.port.read(used + 2, 2), "little")
            except VirtioLmError as exc:
                raise VhostRingError(f"ring {ring.index}: {exc}") from exc
            q.last_avail_idx = ring.base
            q.inflight = None
            ring.resubmit = ()
            if self.inflight is not None and ring.index < len(self.inflight.queues):
                iq = self.inflight.queues[ring.index]
                if iq.size != q.size:
                    raise VhostInflightError(f"ring {ring.index}: inflight region for {iq.size} entries, ring of {q.size}")
                heads = iq.recover(q.used_idx)
                # every chain taken is returned or still marked: the ring goes on after them
                q.last_avail_idx = (q.used_idx + len(heads)) & 0xFFFF
                ring.resubmit = tuple((h, (q.used_idx + k) & 0xFFFF) for k, h in enumerate(heads))
                q.inflight = iq
            ring.state = RingState.STARTED
            if not self.protocol_negotiated:
                ring.enabled = True
        self._apply_enable(ring)

    @property
    def protocol_negotiated(self) -> bool:
        return bool(self.features & PROTOCOL_FEATURES)

    def _apply_enable(self, ring: Ring) -> None:
        q = self.fn.queues[ring.index]
        run = ring.state is RingState.STARTED and ring.enabled
        with self.device.locked():
            was = q.enabled
            q.enabled = run
        if run != was:
            self.rings_changed()
        if run and not was:
            if q.used_idx != 0:
                # completions the driver may not have been told of: the interrupt of the last ones
                # before a migration or a back-end restart can be lost with the old back-end (a
                # virtio-net transmit queue then waits for it forever); a spurious one is harmless
                self.fn.signal_call(ring.index)
            if ring.resubmit:
                todo, ring.resubmit = ring.resubmit, ()
                self.resubmitted += len(todo)
                log.info("%s: ring %d: executing %d requests again (inflight region)", self.name, ring.index, len(todo))
                self.device.resubmit(ring.index, list(todo))
            self.kick(ring.index)

    def _stop(self, ring: Ring) -> None:
        q = self.fn.queues[ring.index]
        with self.device.locked():
            q.enabled = False  # no more chains are taken
        self.rings_changed()
        deadline = time.monotonic() + STOP_TIMEOUT
        while any(r.queue == ring.index for r in self.device.requests()):
            if time.monotonic() > deadline:
                raise VhostRingError(f"GET_VRING_BASE ring {ring.index}: requests did not finish in {STOP_TIMEOUT}s")
            self.device.wait_idle(0.002)
        with self.device.locked():
            ring.base = q.last_avail_idx
            pending = q.pending_notify
            q.pending_notify = False
        if pending:
            self.fn.signal_call(ring.index)
        ring.state = RingState.STOPPED
        with self.fn.fds_locked():
            kick, ring.kick_fd = ring.kick_fd, None
        _close(kick)

    # ------------------------------------------------------------------ kicks
    def kick(self, index: int) -> None:
        """The ring's kick eventfd fired (or the ring just started)."""
        q = self.fn.queues[index]
        if not q.enabled:
            return
        self.device.queue_notify(self.fn, index)  # type: ignore[arg-type]

    def kick_fds(self) -> dict[int, tuple[int, int]]:
        """kick fd -> (ring index, kick generation) for every started ring."""
        return {
            r.kick_fd: (r.index, r.kick_gen)
            for r in self.fn.rings
            if r.kick_fd is not None and r.state is RingState.STARTED
        }

    # ------------------------------------------------------------------ teardown
    def reset(self) -> None:
        """Drop every request and ring state (RESET_OWNER / RESET_DEVICE)."""
        self.device.reset()
        with self.device.locked():
            for q, r in zip(self.fn.queues, self.fn.rings):
                q.reset()
                r.close_fds()
                self.fn.rings[r.index] = Ring(r.index)
        self.features = 0
        self.fn.negotiated = 0
        self._update_tracker()

    def disconnect(self) -> None:
        """The connection is gone: drop everything, unmap, close every fd."""
        self.reset()
        self.protocol_features = 0
        self.owner = False
        self.fn.memory.clear()
        for q in self.fn.queues:
            q.inflight = None
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None
        if self.log is not None:
            self.log.close()
        self.log, self.tracker = None, None
        self.pending = PendingMarks()

