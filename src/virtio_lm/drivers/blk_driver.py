"""A guest virtio-blk driver, written from the virtio spec (5.2), over the PCI registers.

:class:`BlkDriver` brings a virtio-blk function up through
:class:`~virtio_lm.pci.transport.PciDriverTransport` (registers only), reads
``virtio_blk_config``, sets up one :class:`~virtio_lm.virtqueue.driver.DriverQueue`
per request queue (``num_queues`` with VIRTIO_BLK_F_MQ, else one) and
places every request in the guest's memory through the CPU port it is given
(the VM's own stores, seen by the hypervisor's dirty log)::

    header block (32 bytes, from the allocator)    data buffer (allocator or caller's)
    +0  virtio_blk_outhdr (16)  device-readable    split into descriptors of at most
    +16 status (1)              device-writable    size_max bytes, at most seg_max

Async API: :meth:`BlkDriver.submit` (or ``submit_read`` / ``submit_write`` /
...) returns a token; :meth:`BlkDriver.kick` publishes; :meth:`BlkDriver.reap`
takes every used entry of every queue and returns :class:`BlkCompletion`\\ s
(data of IN / GET_ID copied out of guest memory, status read from its byte);
:meth:`BlkDriver.wait` waits for one token.  Interrupts: install
:meth:`BlkDriver.interrupt` as the function's ``on_interrupt`` (done by
default); waits also poll, so a lost interrupt costs latency, not
correctness.  The sync helpers (:meth:`read`, :meth:`write`, :meth:`flush`,
:meth:`get_id`, :meth:`discard`, :meth:`write_zeroes`) raise
:class:`~virtio_lm.errors.BlkIOError` for a status other than OK.

The driver's state is guest memory (rings, headers, buffers -- migrated with
the VM) plus its own bookkeeping: :meth:`BlkDriver.save` returns that
bookkeeping as a frozen :class:`BlkDriverState` (its queues and allocator
saved by their owners) and :meth:`BlkDriver.from_state` resumes it on another
function and memory (the migration's destination) without touching the
device.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from virtio_lm.errors import BlkIOError, CommandTimeoutError, DriverError, GuestStateError
from virtio_lm.memory import MemoryPort
from virtio_lm.pci.transport import PciDriverTransport, RegisterInterface
from virtio_lm.virtqueue.device import Segment
from virtio_lm.virtqueue.driver import Allocator, DriverQueue
from virtio_lm.wire.blk import (
    BLK_CONFIG_SIZE,
    OUTHDR_SIZE,
    SECTOR_SHIFT,
    SECTOR_SIZE,
    VIRTIO_BLK_ID_BYTES,
    BlkConfig,
    BlkFeature,
    BlkOutHdr,
    BlkReqType,
    REQ_BLOCK_DTYPE,
    BlkStatus,
    DiscardSegment,
    SegmentFlags,
    decode_blk_id,
    encode_segments,
)
from virtio_lm.wire.features import Feature, bit

__all__ = ["BlkCompletion", "BlkDriver", "BlkDriverState", "BlkRequest", "DEFAULT_FEATURES", "FixedRequests"]

DEFAULT_FEATURES = (
    bit(Feature.VERSION_1)
    | bit(Feature.EVENT_IDX)
    | bit(Feature.INDIRECT_DESC)
    | bit(BlkFeature.SEG_MAX)
    | bit(BlkFeature.SIZE_MAX)
    | bit(BlkFeature.BLK_SIZE)
    | bit(BlkFeature.RO)
    | bit(BlkFeature.FLUSH)
    | bit(BlkFeature.MQ)
    | bit(BlkFeature.DISCARD)
    | bit(BlkFeature.WRITE_ZEROES)
)
HDR_BLOCK = 32  # outhdr (16) + status (1), padded
STATUS_OFFSET = OUTHDR_SIZE
_POISON = 0xFF  # status byte before the device writes it (not a valid status)


@dataclass
class BlkRequest:
    """The driver's record of one submitted request."""

    token: int
    type: int
    sector: int
    queue: int
    hdr_addr: int  # header block; status at hdr_addr + 16 (unless raw)
    buf_addr: int | None  # data buffer
    buf_len: int
    owns_buf: bool
    device_writes_buf: bool  # IN / GET_ID: copy the buffer out at completion
    status_addr: int = -1
    raw: list[tuple[int, int, bool]] = field(default_factory=list)  # raw chains: (addr, len, writable), all owned

    def copy(self) -> "BlkRequest":
        return replace(self, raw=list(self.raw))


@dataclass(frozen=True)
class BlkCompletion:
    """One reaped request."""

    token: int
    type: int
    sector: int
    queue: int
    status: int | None  # the status byte (None: the device wrote none, used_len 0)
    used_len: int
    data: bytes | None  # IN / GET_ID data; a raw chain's whole writable part

    @property
    def ok(self) -> bool:
        return self.status == BlkStatus.OK


@dataclass(frozen=True)
class BlkDriverState:
    """Everything of a :class:`BlkDriver` that is not in guest memory (:meth:`BlkDriver.save`)."""

    features: int
    config: BlkConfig
    queues: dict[int, DriverQueue]  # detached (no port, no allocator)
    alloc: Allocator
    requests: dict[int, BlkRequest]
    parked: list[BlkCompletion]
    next_token: int
    rr: int


class BlkDriver:
    """Guest driver of one virtio-blk function; see the module docstring.

    ``fn`` is the function's register interface, ``port`` the guest's CPU
    port onto the VM's memory, ``alloc`` an allocator over the part of guest
    memory the driver owns (rings, headers, buffers).  ``num_queues`` limits
    the request queues used (default: all the device has, with MQ).
    """

    def __init__(
        self,
        fn: RegisterInterface,
        port: MemoryPort,
        alloc: Allocator,
        *,
        features: int = DEFAULT_FEATURES,
        num_queues: int | None = None,
        queue_size: int | None = None,
        attach_interrupts: bool = True,
        timeout: float = 20.0,
        bring_up: bool = True,
    ) -> None:
        self.fn = fn
        self.port = port
        self.alloc = alloc
        self.timeout = timeout
        self.transport = PciDriverTransport(fn, port, alloc)
        self.features = 0
        self.config = BlkConfig()
        self.queues: dict[int, DriverQueue] = {}
        self._requests: dict[int, BlkRequest] = {}
        self._parked: list[BlkCompletion] = []
        self._next_token = 1
        self._rr = 0
        self._lent: set[int] = set()  # queues a FixedRequests owns for now
        self._irq = threading.Event()
        self.interrupts = 0
        if attach_interrupts and hasattr(fn, "on_interrupt"):
            fn.on_interrupt = self.interrupt  # type: ignore[attr-defined]
        if bring_up:
            self._bring_up(features, num_queues, queue_size)

    # ================================================================== bring-up
    def _bring_up(self, wanted: int, num_queues: int | None, queue_size: int | None) -> None:
        t = self.transport
        self.features = t.negotiate(wanted)
        self.config = self.read_config()
        n = self.config.num_queues if self.has(BlkFeature.MQ) else 1
        if n < 1 or n > t.num_queues():
            raise DriverError(f"blk num_queues {n} but the function has {t.num_queues()} queues")
        if num_queues is not None:
            n = min(n, num_queues)
        for i in range(n):
            self.queues[i] = t.setup_queue(i, queue_size)
        t.driver_ok()

    def has(self, feature: int) -> bool:
        return bool(self.features & bit(feature))

    def read_config(self) -> BlkConfig:
        """The whole ``virtio_blk_config``, read as aligned 32-bit words."""
        raw = b"".join(
            self.transport.config_read(off, 4).to_bytes(4, "little") for off in range(0, BLK_CONFIG_SIZE, 4)
        )
        return BlkConfig.decode(raw)  # type: ignore[attr-defined, no-any-return]

    @property
    def capacity(self) -> int:
        """Sectors (512 bytes) of the disk."""
        return self.config.capacity

    @property
    def block_size(self) -> int:
        return self.config.blk_size if self.has(BlkFeature.BLK_SIZE) else SECTOR_SIZE

    @property
    def read_only(self) -> bool:
        return self.has(BlkFeature.RO)

    @property
    def max_transfer(self) -> int:
        """Bytes one IN/OUT may carry within seg_max x size_max (when negotiated)."""
        seg = self.config.seg_max if self.has(BlkFeature.SEG_MAX) else 1
        size = self.config.size_max if self.has(BlkFeature.SIZE_MAX) else 1 << 20
        return seg * size

    def in_flight(self) -> int:
        return len(self._requests)

    def wait_interrupt(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for an interrupt (or :meth:`wake`); whether one came.
        The interrupt is consumed."""
        got = self._irq.wait(timeout)
        self._irq.clear()
        return got

    def wake(self) -> None:
        """End a :meth:`wait_interrupt` now (another thread wants the waiter to look again)."""
        self._irq.set()

    def outstanding(self) -> set[int]:
        """Tokens submitted and not yet handed back by :meth:`reap` (in flight, or completed
        and parked for the next reap)."""
        return set(self._requests) | {c.token for c in self._parked}

    # ================================================================== interrupts
    def interrupt(self, source: int) -> None:
        """The function's interrupt (install as ``on_interrupt``)."""
        self.interrupts += 1
        self._irq.set()

    # ================================================================== placing requests
    def _pick_queue(self, queue: int | None) -> int:
        if queue is None:
            if self._lent:
                free = [q for q in self.queues if q not in self._lent]
                if not free:
                    raise DriverError("every queue is lent to fixed requests")
                queue = free[self._rr % len(free)]
            else:
                queue = self._rr % len(self.queues)
            self._rr += 1
        if queue not in self.queues:
            raise DriverError(f"queue {queue} is not set up (queues {sorted(self.queues)})")
        if queue in self._lent:
            raise DriverError(f"queue {queue} is lent to fixed requests")
        return queue

    def _split(self, length: int, pieces: Sequence[int] | None) -> list[int]:
        if pieces is not None:
            if sum(pieces) != length or any(p <= 0 for p in pieces):
                raise DriverError(f"segment lengths {list(pieces)} do not add up to {length}")
            return list(pieces)
        if length == 0:
            return []
        size = self.config.size_max if self.has(BlkFeature.SIZE_MAX) else length
        out = [min(size, length - off) for off in range(0, length, size)]
        if self.has(BlkFeature.SEG_MAX) and len(out) > self.config.seg_max:
            raise DriverError(f"{length} bytes need {len(out)} segments, seg_max is {self.config.seg_max}")
        return out

    def submit(
        self,
        type: int,
        sector: int = 0,
        *,
        data: bytes | None = None,
        payload: bytes = b"",
        read_len: int = 0,
        buf: int | None = None,
        queue: int | None = None,
        segments: Sequence[int] | None = None,
        indirect: bool | None = None,
        kick: bool = True,
        header: bytes | None = None,
    ) -> int:
        """Place one request; returns its token.

        ``data``: bytes the device reads after the header (OUT); ``payload``
        likewise but not counted as a data buffer split by size_max (the
        segment array of DISCARD / WRITE_ZEROES); ``read_len``: bytes the
        device writes before the status (IN, GET_ID).  ``buf`` places the data
        buffer at a caller-owned guest address instead of allocating one (for
        OUT, ``data`` is then already there if ``data`` is None).
        ``segments`` overrides the split into descriptors (lengths).
        ``header`` replaces the 16-byte header with raw bytes (any length).
        """
        q = self._pick_queue(queue)
        dq = self.queues[q]
        out_len = len(data) if data is not None else 0
        if data is None and buf is not None and read_len == 0 and type == BlkReqType.OUT:
            raise DriverError("an OUT into a caller buffer needs data= (its length)")
        buf_len = out_len or read_len
        hdr_raw = header if header is not None else BlkOutHdr(BlkReqType(type), 0, sector).encode()  # type: ignore[attr-defined]
        hdr_len = len(hdr_raw) + len(payload)
        hdr_addr = self.alloc.alloc(max(HDR_BLOCK, (hdr_len + 1 + 15) & ~15), 16)
        status_addr = hdr_addr + hdr_len
        buf_addr: int | None = None
        owns = False
        try:
            self.port.write(hdr_addr, hdr_raw + payload + bytes((_POISON,)))
            if buf_len:
                if buf is None:
                    buf_addr = self.alloc.alloc(buf_len, 4096 if buf_len >= 4096 else 64)
                    owns = True
                else:
                    buf_addr = buf
                if data is not None:
                    self.port.write(buf_addr, data)
            pieces = self._split(buf_len, segments)
            segs: list[Segment] = []
            pos = 0
            for p in pieces:
                assert buf_addr is not None
                segs.append(Segment(buf_addr + pos, p))
                pos += p
            readable = [Segment(hdr_addr, hdr_len)] if hdr_len else []
            writable: list[Segment] = []
            if data is not None:
                readable += segs
            else:
                writable += segs
            writable.append(Segment(status_addr, 1))
            n_desc = len(readable) + len(writable)
            use_indirect = (
                indirect if indirect is not None else (self.has(Feature.INDIRECT_DESC) and n_desc > 2)
            )
            token = self._next_token
            dq.add(readable, writable, indirect=use_indirect, token=token)
        except BaseException:
            self.alloc.free(hdr_addr)
            if owns and buf_addr is not None:
                self.alloc.free(buf_addr)
            raise
        self._next_token += 1
        self._requests[token] = BlkRequest(
            token, int(type), sector, q, hdr_addr, buf_addr, buf_len, owns, data is None and read_len > 0, status_addr
        )
        if kick:
            self.transport.kick(q)
        return token

    def submit_raw(
        self,
        readable: Sequence[bytes],
        writable: Sequence[int],
        *,
        queue: int | None = None,
        kick: bool = True,
        type: int = -1,
        sector: int = 0,
    ) -> int:
        """A chain of arbitrary shape (malformed requests): each readable piece its own
        descriptor with those bytes, each writable piece its own descriptor of that
        length (poisoned 0xEE).  The completion's ``data`` is the whole writable
        part; ``status`` its last byte if the device returned any bytes."""
        q = self._pick_queue(queue)
        pieces: list[tuple[int, int, bool]] = []
        try:
            for raw in readable:
                addr = self.alloc.alloc(max(len(raw), 1), 16)
                pieces.append((addr, len(raw), False))
                self.port.write(addr, raw)
            for n in writable:
                addr = self.alloc.alloc(max(n, 1), 16)
                pieces.append((addr, n, True))
                self.port.fill(addr, n, 0xEE)
            token = self._next_token
            self.queues[q].add(
                [Segment(a, n) for a, n, w in pieces if not w],
                [Segment(a, n) for a, n, w in pieces if w],
                token=token,
            )
        except BaseException:
            for a, _, _ in pieces:
                self.alloc.free(a)
            raise
        self._next_token += 1
        req = BlkRequest(token, type, sector, q, -1, None, 0, False, False, -1, pieces)
        self._requests[token] = req
        if kick:
            self.transport.kick(q)
        return token

    def kick(self, queue: int | None = None) -> None:
        """Publish (and notify, if the device wants it) one queue or all."""
        for q in [queue] if queue is not None else list(self.queues):
            self.transport.kick(q)

    def lend_queue(self, queue: int) -> DriverQueue:
        """Hand queue ``queue`` to another owner (:class:`FixedRequests`) until
        :meth:`return_queue`: meanwhile the driver places nothing on it, :meth:`reap` leaves it
        alone and :meth:`save` is refused.  Refused (DriverError) for a queue not set up, lent
        already, or with requests of the driver's own in flight."""
        if queue not in self.queues or queue in self._lent:
            raise DriverError(f"queue {queue} is not set up or is already lent")
        dq = self.queues[queue]
        if dq.in_flight():
            raise DriverError(f"queue {queue} has {dq.in_flight()} chains of the driver's own in flight")
        self._lent.add(queue)
        return dq

    def return_queue(self, queue: int) -> None:
        """End :meth:`lend_queue` (the borrower has nothing in flight on it)."""
        self._lent.discard(queue)

    # typed conveniences ----------------------------------------------------------
    def submit_read(self, sector: int, nsectors: int, **kw: Any) -> int:
        return self.submit(BlkReqType.IN, sector, read_len=nsectors << SECTOR_SHIFT, **kw)

    def submit_write(self, sector: int, data: bytes, **kw: Any) -> int:
        return self.submit(BlkReqType.OUT, sector, data=data, **kw)

    def submit_flush(self, **kw: Any) -> int:
        return self.submit(BlkReqType.FLUSH, 0, **kw)

    def submit_get_id(self, **kw: Any) -> int:
        return self.submit(BlkReqType.GET_ID, 0, read_len=VIRTIO_BLK_ID_BYTES, **kw)

    def submit_ranges(
        self, type: int, ranges: Sequence[tuple[int, int] | tuple[int, int, int]], **kw: Any
    ) -> int:
        """DISCARD / WRITE_ZEROES over ``(sector, num_sectors[, flags])`` ranges."""
        segs = [DiscardSegment(r[0], r[1], SegmentFlags(r[2] if len(r) > 2 else 0)) for r in ranges]  # type: ignore[misc]
        return self.submit(type, 0, payload=encode_segments(segs), **kw)

    # ================================================================== completions
    def _complete(self, token: int, used_len: int) -> BlkCompletion:
        req = self._requests.pop(token, None)
        if req is None:
            raise DriverError(f"used entry for token {token}, which this driver did not submit")
        port = self.port
        status: int | None
        if req.hdr_addr < 0:  # raw chain
            wr = [(a, n) for a, n, w in req.raw if w]
            data = b"".join(port.read(a, n) for a, n in wr)
            status = data[-1] if used_len > 0 and data else None
            for a, _, _ in req.raw:
                self.alloc.free(a)
            return BlkCompletion(token, req.type, req.sector, req.queue, status, used_len, data)
        status = port.read(req.status_addr, 1)[0] if used_len > 0 else None
        data = None
        if req.device_writes_buf and req.buf_addr is not None:
            data = port.read(req.buf_addr, req.buf_len)
        self.alloc.free(req.hdr_addr)
        if req.owns_buf and req.buf_addr is not None:
            self.alloc.free(req.buf_addr)
        return BlkCompletion(token, req.type, req.sector, req.queue, status, used_len, data)

    def reap(self, limit: int | None = None) -> list[BlkCompletion]:
        """Every completion available now (parked ones first), or at most ``limit`` of them
        (the rest stay on the used rings for the next call)."""
        if limit is None:
            out, self._parked = self._parked, []
        else:
            out, self._parked = self._parked[:limit], self._parked[limit:]
        for q, dq in self.queues.items():
            if q in self._lent:
                continue  # its FixedRequests reaps it
            while (limit is None or len(out) < limit) and (item := dq.get_used()) is not None:
                token, used_len = item
                out.append(self._complete(token, used_len))  # type: ignore[arg-type]
        return out

    def wait(self, token: int, timeout: float | None = None) -> BlkCompletion:
        """Wait for ``token``'s completion (others reaped meanwhile are parked)."""
        found = self.wait_many([token], timeout)
        return found[0]

    def wait_many(self, tokens: Sequence[int], timeout: float | None = None) -> list[BlkCompletion]:
        """Wait for all ``tokens``; returns their completions in the order asked."""
        want = set(tokens)
        got: dict[int, BlkCompletion] = {}
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            self._irq.clear()
            keep: list[BlkCompletion] = []
            for c in self.reap():
                if c.token in want:
                    got[c.token] = c
                else:
                    keep.append(c)
            self._parked.extend(keep)
            if len(got) == len(want):
                return [got[t] for t in tokens]
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(want - set(got))
                raise CommandTimeoutError(f"virtio-blk requests {missing[:8]} not completed in time")
            self._irq.wait(min(left, 0.005))

    def wait_all(self, timeout: float | None = None) -> list[BlkCompletion]:
        """Wait until nothing this driver submitted is outstanding; returns every completion."""
        pending = [t for t in self._requests]
        done = self.wait_many(pending, timeout) if pending else []
        rest, self._parked = self._parked, []
        return rest + done

    # ================================================================== sync helpers
    def _check(self, c: BlkCompletion) -> BlkCompletion:
        if c.status != BlkStatus.OK:
            status: object = c.status
            if c.status is not None and c.status in BlkStatus._value2member_map_:
                status = BlkStatus(c.status)
            try:
                kind: object = BlkReqType(c.type)
            except ValueError:
                kind = c.type
            raise BlkIOError(status, kind, c.sector)
        return c

    def read(self, sector: int, nsectors: int, *, timeout: float | None = None, **kw: Any) -> bytes:
        c = self._check(self.wait(self.submit_read(sector, nsectors, **kw), timeout))
        assert c.data is not None
        return c.data

    def write(self, sector: int, data: bytes, *, timeout: float | None = None, **kw: Any) -> None:
        self._check(self.wait(self.submit_write(sector, data, **kw), timeout))

    def flush(self, **kw: Any) -> None:
        self._check(self.wait(self.submit_flush(**kw)))

    def get_id(self, **kw: Any) -> bytes:
        c = self._check(self.wait(self.submit_get_id(**kw)))
        assert c.data is not None
        return decode_blk_id(c.data[:VIRTIO_BLK_ID_BYTES])

    def discard(self, ranges: Sequence[tuple[int, int] | tuple[int, int, int]], **kw: Any) -> None:
        self._check(self.wait(self.submit_ranges(BlkReqType.DISCARD, ranges, **kw)))

    def write_zeroes(self, ranges: Sequence[tuple[int, int] | tuple[int, int, int]], **kw: Any) -> None:
        self._check(self.wait(self.submit_ranges(BlkReqType.WRITE_ZEROES, ranges, **kw)))

    # ================================================================== migration of the guest
    def save(self) -> BlkDriverState:
        """The driver's bookkeeping (the rest of its state is guest memory), detached from it.
        Refused (DriverError) while a queue is lent to :class:`FixedRequests`: close them first."""
        if self._lent:
            raise DriverError(f"queues {sorted(self._lent)} are lent to fixed requests: close them before saving")
        return BlkDriverState(
            features=self.features,
            config=self.config,
            queues={i: dq.clone(None, None) for i, dq in self.queues.items()},
            alloc=self.alloc.clone(),
            requests={t: r.copy() for t, r in self._requests.items()},
            parked=list(self._parked),
            next_token=self._next_token,
            rr=self._rr,
        )

    @staticmethod
    def check_state(state: BlkDriverState, path: str = "blk") -> None:
        """Raise :class:`GuestStateError` (``path`` prefixes the field) unless ``state`` is one
        this driver could have reached: queues numbered from 0 (one without
        VIRTIO_BLK_F_MQ), EVENT_IDX as negotiated; every chain in flight a request of its
        queue with an int token below ``next_token``, every request such a chain; every
        allocation a request holds (header block, owned buffer, raw pieces, indirect
        table) live and held once; a raw request (``hdr_addr`` -1) only raw pieces; parked
        completions not in flight, not twice, on a queue that is set up."""
        queues, alloc, next_token = state.queues, state.alloc, state.next_token
        fail = GuestStateError
        if not queues:
            raise fail(f"{path}.queues", "a blk driver has at least one queue")
        for n in queues:
            if n >= len(queues):
                raise fail(f"{path}.queues.{n}", f"queues must be numbered 0..{len(queues) - 1}")
        want_event = bool(state.features & bit(Feature.EVENT_IDX))
        for n, dq in queues.items():
            if dq.event_idx != want_event:
                raise fail(f"{path}.queues.{n}.event_idx", "differs from the negotiated VIRTIO_F_EVENT_IDX")
        if not state.features & bit(BlkFeature.MQ) and len(queues) != 1:
            raise fail(f"{path}.queues", "more than one queue without VIRTIO_BLK_F_MQ")
        live = alloc.length_of
        chains: dict[int, tuple[int, str]] = {}  # token -> (queue, in-flight path)
        owned: dict[int, str] = {}  # live allocation -> who holds it (each is freed once)

        def own(addr: int, p: str) -> int:
            n = live(addr)
            if n is None:
                raise fail(p, f"{addr:#x} is not a live allocation")
            if addr in owned:
                raise fail(p, f"{addr:#x} is also owned by {owned[addr]}")
            owned[addr] = p
            return n

        for n, dq in queues.items():
            for i, rec in enumerate(dq.chains()):
                p = f"{path}.queues.{n}.in_flight[{i}]"
                t = rec.token
                if type(t) is not int or not 1 <= t < next_token:
                    raise fail(f"{p}.token", f"a blk chain token is an int in 1..next_token-1, got {t!r}")
                if t in chains:
                    raise fail(f"{p}.token", f"token {t} also in flight at {chains[t][1]}")
                chains[t] = (n, p)
                if rec.table is not None:
                    own(rec.table, f"{p}.table")
        for i, (key, r) in enumerate(state.requests.items()):
            p = f"{path}.requests[{i}]"
            if key != r.token:
                raise fail(f"{p}.token", f"request {r.token} kept under key {key!r}")
            if not 1 <= r.token < next_token:
                raise fail(f"{p}.token", f"{r.token} is outside 1..{next_token - 1}")
            if r.queue not in queues:
                raise fail(f"{p}.queue", f"queue {r.queue} is not set up")
            where = chains.get(r.token)
            if where is None or where[0] != r.queue:
                raise fail(f"{p}.token", f"request {r.token} is not a chain in flight on queue {r.queue}")
            for j, (a, length, _) in enumerate(r.raw):
                pj = f"{p}.raw[{j}]"
                have = own(a, f"{pj}[0]")
                if length > have:
                    raise fail(f"{pj}[1]", f"{length} bytes in an allocation of {have}")
            if r.hdr_addr < 0:  # a raw chain: everything is in ``raw``
                if not r.raw:
                    raise fail(f"{p}.raw", "a raw request (hdr_addr -1) has at least one piece")
                for key2, val, want in (("buf_addr", r.buf_addr, None), ("buf_len", r.buf_len, 0),
                                        ("owns_buf", r.owns_buf, False), ("device_writes_buf", r.device_writes_buf, False),
                                        ("status_addr", r.status_addr, -1)):
                    if val != want or type(val) is not type(want):
                        raise fail(f"{p}.{key2}", f"must be {want!r} for a raw request")
                continue
            if r.raw:
                raise fail(f"{p}.raw", "only a raw request (hdr_addr -1) has raw pieces")
            hdr_len = own(r.hdr_addr, f"{p}.hdr_addr")
            if r.status_addr < r.hdr_addr or r.status_addr >= r.hdr_addr + hdr_len:
                raise fail(f"{p}.status_addr", "status byte outside the request's header block")
            if (r.buf_addr is None) != (r.buf_len == 0):
                raise fail(f"{p}.buf_addr", "a data buffer has an address and a length, or neither")
            if r.owns_buf:
                if r.buf_addr is None:
                    raise fail(f"{p}.owns_buf", "owns a buffer it does not have")
                have = own(r.buf_addr, f"{p}.buf_addr")
                if r.buf_len > have:
                    raise fail(f"{p}.buf_len", f"{r.buf_len} bytes in an allocation of {have}")
            if r.device_writes_buf and r.buf_addr is None:
                raise fail(f"{p}.device_writes_buf", "the device writes a buffer the request does not have")
        for t, (_, p) in chains.items():
            if t not in state.requests:
                raise fail(f"{p}.token", f"chain token {t} has no request record")
        seen: set[int] = set()
        for i, c in enumerate(state.parked):
            p = f"{path}.parked[{i}]"
            if not 1 <= c.token < next_token:
                raise fail(f"{p}.token", f"{c.token} is outside 1..{next_token - 1}")
            if c.token in state.requests or c.token in seen:
                raise fail(f"{p}.token", f"token {c.token} is still in flight or parked twice")
            seen.add(c.token)
            if c.queue not in queues:
                raise fail(f"{p}.queue", f"queue {c.queue} is not set up")

    @classmethod
    def from_state(
        cls,
        state: BlkDriverState,
        *,
        fn: RegisterInterface,
        port: MemoryPort,
        attach_interrupts: bool = True,
        timeout: float = 20.0,
    ) -> "BlkDriver":
        """Resume a driver on ``fn`` over ``port`` (the destination) from ``state``.

        Nothing is written to the device or to memory: the device's state came
        with the migration, the rings and buffers with the guest memory.  The state is
        checked first (:meth:`check_state`)."""
        cls.check_state(state)
        alloc = state.alloc.clone()
        drv = cls(fn, port, alloc, attach_interrupts=attach_interrupts, timeout=timeout, bring_up=False)
        drv.features = state.features
        drv.transport.features = state.features
        drv.config = state.config
        for i, st in state.queues.items():
            dq = st.clone(port, alloc)
            drv.queues[i] = dq
            drv.transport.queues[i] = dq
        drv._requests = {t: r.copy() for t, r in state.requests.items()}
        drv._parked = list(state.parked)
        drv._next_token = state.next_token
        drv._rr = state.rr
        return drv


class FixedRequests:
    """``count`` requests of one kind (IN or OUT of ``size`` bytes) on one queue of ``drv``,
    placed once and reused, as a load generator with fixed buffers places them (fio's
    ``fixedbufs``): the device-level bench's driver, which must cost the device's own
    figures little.

    At construction each slot gets a request block (the 16-byte header and the status byte,
    32 bytes; all slots' blocks side by side in one allocation, :data:`REQ_BLOCK_DTYPE`), a
    data buffer of ``size`` bytes and a standing chain (:meth:`DriverQueue.add_standing`):
    header, data (device-readable for OUT, device-writable for IN), status.  The queue is lent
    to this object until :meth:`close`: the driver's own requests and :meth:`BlkDriver.reap`
    leave it alone.

    :meth:`submit` writes new sectors (and poisoned status bytes) into idle slots' headers in
    one array store and posts their chains; :meth:`reap` takes every used entry and checks
    each status byte and used length in one array read.  All guest-memory writes go through
    the driver's CPU port, as :meth:`BlkDriver.submit`'s do.
    """

    def __init__(self, drv: BlkDriver, queue: int, count: int, size: int, op: BlkReqType,
                 *, fill: bytes | None = None) -> None:
        op = BlkReqType(op)
        if op not in (BlkReqType.IN, BlkReqType.OUT):
            raise DriverError(f"fixed requests are IN or OUT, not {op.name}")
        if count < 1 or size < SECTOR_SIZE or size % SECTOR_SIZE:
            raise DriverError(f"{count} requests of {size} bytes: need at least one, of whole sectors")
        if fill is not None and len(fill) != size:
            raise DriverError(f"fill of {len(fill)} bytes for buffers of {size}")
        self.drv, self.queue, self.count, self.size, self.op = drv, queue, count, size, op
        self._dq = dq = drv.lend_queue(queue)
        port = drv.port
        self._blocks = -1
        self._bufs: int | None = None
        heads: list[int] = []
        try:
            self._blocks = drv.alloc.alloc(count * REQ_BLOCK_DTYPE.itemsize, 4096)
            self._bufs = drv.alloc.alloc(count * size, 4096)
            with port.modify(self._blocks, count * REQ_BLOCK_DTYPE.itemsize) as raw:
                blocks = raw.view(REQ_BLOCK_DTYPE)
                blocks["type"] = int(op)
                blocks["ioprio"] = 0
                blocks["sector"] = 0
                blocks["status"] = _POISON
            if fill is not None:
                port.write(self._bufs, fill * count)
            indirect = drv.has(Feature.INDIRECT_DESC)
            for i in range(count):
                blk, buf = self._blocks + i * REQ_BLOCK_DTYPE.itemsize, self._bufs + i * size
                data = [Segment(buf, size)]
                status = [Segment(blk + STATUS_OFFSET, 1)]
                readable = [Segment(blk, OUTHDR_SIZE)] + (data if op is BlkReqType.OUT else [])
                writable = (data if op is BlkReqType.IN else []) + status
                heads.append(dq.add_standing(readable, writable, indirect=indirect, token=i))
        except BaseException:
            for h in heads:
                dq.release_standing(h)
            if self._blocks >= 0:
                drv.alloc.free(self._blocks)
            if self._bufs is not None:
                drv.alloc.free(self._bufs)
            drv.return_queue(queue)
            raise
        self._heads = np.asarray(heads, dtype=np.int64)
        self._idle: list[int] = list(range(count))
        self.completed = 0
        self.failed = 0
        self._closed = False

    def idle(self) -> int:
        """Slots with no request in flight."""
        return len(self._idle)

    def buffer(self, slot: int) -> int:
        """The guest address of slot ``slot``'s data buffer."""
        if not 0 <= slot < self.count:
            raise DriverError(f"slot {slot} outside 0..{self.count - 1}")
        assert self._bufs is not None
        return self._bufs + slot * self.size

    def submit(self, sectors: Sequence[int], *, kick: bool = True) -> list[int]:
        """Start requests at ``sectors`` in idle slots (as many as are idle, in order); returns
        the slots used, in the order of ``sectors``."""
        if self._closed:
            raise DriverError("fixed requests are closed")
        n = min(len(sectors), len(self._idle))
        if not n:
            return []
        slots = self._idle[:n]
        del self._idle[:n]
        try:
            with self.drv.port.modify(self._blocks, self.count * REQ_BLOCK_DTYPE.itemsize) as raw:
                blocks = raw.view(REQ_BLOCK_DTYPE)
                blocks["sector"][slots] = sectors[:n]
                blocks["status"][slots] = _POISON
            self._dq.post(self._heads[slots].tolist())
        except BaseException:
            self._idle[:0] = slots
            raise
        if kick:
            self.drv.transport.kick(self.queue)
        return slots

    def reap(self) -> list[int]:
        """Take every completed request: the slots that completed, now idle, in the order the device
        returned them.  A status byte other than OK, or a used length other than the bytes the device
        writes (IN: the data and the status; OUT: the status), counts in :attr:`failed`."""
        done = self._dq.take_used()
        if not done:
            return []
        slots = [t for t, _ in done]  # type: ignore[misc]
        lens = np.fromiter((n for _, n in done), dtype=np.int64, count=len(done))
        raw = self.drv.port.read(self._blocks, self.count * REQ_BLOCK_DTYPE.itemsize)
        status = np.frombuffer(raw, dtype=REQ_BLOCK_DTYPE)["status"][slots]
        want = self.size + 1 if self.op is BlkReqType.IN else 1
        bad = int(np.count_nonzero((status != BlkStatus.OK) | (lens != want)))
        self.failed += bad
        self.completed += len(slots) - bad
        self._idle.extend(slots)  # type: ignore[arg-type]
        return slots  # type: ignore[return-value]

    def in_flight(self) -> int:
        return self.count - len(self._idle)

    def close(self) -> None:
        """Give the queue back and free the slots; refused (DriverError) while requests are in flight."""
        if self._closed:
            return
        if self.in_flight():
            raise DriverError(f"{self.in_flight()} fixed requests are in flight")
        for h in self._heads.tolist():
            self._dq.release_standing(h)
        self.drv.alloc.free(self._blocks)
        assert self._bufs is not None
        self.drv.alloc.free(self._bufs)
        self.drv.return_queue(self.queue)
        self._closed = True
