"""Guest driver of the DMA test device (:mod:`virtio_lm.devices.dmatest`).

One request queue; :meth:`DmaTestDriver.submit_fill` asks the device to FILL
a buffer in guest memory with the pattern of a seed (every byte of it a
device DMA write), :meth:`DmaTestDriver.reap` hands back what completed with
the bytes the device wrote.  The driver's bookkeeping -- the queue, its
allocator, the requests in flight -- is a frozen :class:`DmaTestDriverState`
(:meth:`save`), which :meth:`DmaTestDriver.from_state` checks
(:meth:`check_state`) and resumes on another function and memory without
touching the device: the third kind of VF a VM can carry, next to blk and net
(``vm/dmatest_kind.py``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from virtio_lm.errors import DriverError, GuestStateError
from virtio_lm.memory import MemoryPort
from virtio_lm.pci.transport import PciDriverTransport, RegisterInterface
from virtio_lm.virtqueue.device import Segment
from virtio_lm.virtqueue.driver import Allocator, DriverQueue
from virtio_lm.wire.dmatest import STATUS_SIZE, DmaTestConfig, DmaTestOp, DmaTestReqHeader, DmaTestStatus
from virtio_lm.wire.features import Feature, bit

__all__ = ["DmaTestCompletion", "DmaTestDriver", "DmaTestDriverState", "DmaTestRequest"]

DEFAULT_FEATURES = bit(Feature.VERSION_1) | bit(Feature.EVENT_IDX)
HEADER_SIZE = DmaTestReqHeader.SIZE  # type: ignore[attr-defined]
I63 = (1 << 63) - 1


@dataclass(frozen=True)
class DmaTestRequest:
    """One FILL in flight: its header block and its data area (length + the status byte)."""

    token: int
    seed: int
    length: int
    hdr_addr: int
    data_addr: int


@dataclass(frozen=True)
class DmaTestCompletion:
    token: int
    seed: int
    status: int | None  # None: the device returned the chain without a status byte
    data: bytes


@dataclass(frozen=True)
class DmaTestDriverState:
    features: int
    max_len: int
    queue: DriverQueue  # detached (no port, no allocator)
    alloc: Allocator
    requests: tuple[DmaTestRequest, ...]  # by token
    next_token: int


class DmaTestDriver:
    """Guest driver of one DMA test function; see the module docstring."""

    def __init__(
        self, fn: RegisterInterface, port: MemoryPort, alloc: Allocator, *, queue_size: int = 64,
        attach_interrupts: bool = True, bring_up: bool = True,
    ) -> None:
        self.fn = fn
        self.port = port
        self.alloc = alloc
        self.transport = PciDriverTransport(fn, port, alloc)
        self.features = 0
        self.max_len = 0
        self.queue: DriverQueue | None = None
        self._requests: dict[int, DmaTestRequest] = {}
        self._next_token = 1
        self._irq = threading.Event()
        self._lock = threading.Lock()
        if attach_interrupts and hasattr(fn, "on_interrupt"):
            fn.on_interrupt = self.interrupt  # type: ignore[attr-defined]
        if bring_up:
            t = self.transport
            self.features = t.negotiate(DEFAULT_FEATURES)
            self.max_len = DmaTestConfig.decode(t.config_read(0, 4).to_bytes(4, "little")).max_len  # type: ignore[attr-defined]
            (self.queue,) = [t.setup_queue(0, queue_size)]
            t.driver_ok()

    # ------------------------------------------------------------------ interrupts
    def interrupt(self, source: int) -> None:
        self._irq.set()

    def wait_interrupt(self, timeout: float) -> bool:
        got = self._irq.wait(timeout)
        self._irq.clear()
        return got

    def wake(self) -> None:
        self._irq.set()

    # ------------------------------------------------------------------ requests
    def submit_fill(self, seed: int, length: int) -> int:
        """Ask for ``length`` bytes of the pattern of ``seed``; the request's token."""
        if not 0 < length <= self.max_len:
            raise DriverError(f"a FILL of {length} bytes (the device serves 1..{self.max_len})")
        q = self.queue
        if q is None:
            raise DriverError("the DMA test driver is not up")
        with self._lock:
            hdr = self.alloc.alloc(HEADER_SIZE, 8)
            try:
                data = self.alloc.alloc(length + STATUS_SIZE, 8)
            except BaseException:
                self.alloc.free(hdr)
                raise
            token = self._next_token
            self._next_token += 1
            self.port.write(hdr, DmaTestReqHeader(int(DmaTestOp.FILL), length, seed).encode())
            q.add([Segment(hdr, HEADER_SIZE)], [Segment(data, length + STATUS_SIZE)], token=token)
            self._requests[token] = DmaTestRequest(token, seed, length, hdr, data)
            self.transport.kick(0)
        return token

    def reap(self) -> list[DmaTestCompletion]:
        """Every request the device returned since the last call, with the bytes it wrote."""
        q = self.queue
        out: list[DmaTestCompletion] = []
        if q is None:
            return out
        with self._lock:
            for token, used_len in q.get_all_used():
                r = self._requests.pop(token)  # type: ignore[call-overload]
                raw = self.port.read(r.data_addr, r.length + STATUS_SIZE)
                status = raw[-1] if used_len == r.length + STATUS_SIZE else None
                out.append(DmaTestCompletion(r.token, r.seed, status, bytes(raw[: r.length])))
                self.alloc.free(r.hdr_addr)
                self.alloc.free(r.data_addr)
        return out

    def outstanding(self) -> set[int]:
        with self._lock:
            return set(self._requests)

    # ------------------------------------------------------------------ saved state
    def save(self) -> DmaTestDriverState:
        assert self.queue is not None
        with self._lock:
            return DmaTestDriverState(
                self.features, self.max_len, self.queue.clone(None, None), self.alloc.clone(),
                tuple(self._requests[t] for t in sorted(self._requests)), self._next_token,
            )

    @staticmethod
    def check_state(st: DmaTestDriverState, path: str = "dmatest") -> None:
        """Every chain in flight is a request and every request a chain; tokens below
        ``next_token``; header and data area live allocations of the right sizes."""
        chains = {c.token: c for c in st.queue.chains()}
        for i, r in enumerate(st.requests):
            p = f"{path}.requests[{i}]"
            if not 1 <= r.token < st.next_token:
                raise GuestStateError(f"{p}.token", f"{r.token} is outside 1..{st.next_token - 1}")
            if r.token not in chains:
                raise GuestStateError(f"{p}.token", f"request {r.token} is not a chain in flight")
            if not 0 < r.length <= st.max_len:
                raise GuestStateError(f"{p}.length", f"{r.length} is outside 1..{st.max_len}")
            for key, addr, size in (("hdr_addr", r.hdr_addr, HEADER_SIZE), ("data_addr", r.data_addr, r.length + STATUS_SIZE)):
                have = st.alloc.length_of(addr)
                if have is None or have < size:
                    raise GuestStateError(f"{p}.{key}", f"{addr:#x} is not a live allocation of {size} bytes")
        tokens = {r.token for r in st.requests}
        if len(tokens) != len(st.requests):
            raise GuestStateError(f"{path}.requests", "a token twice")
        extra = sorted(set(chains) - tokens)
        if extra:
            raise GuestStateError(f"{path}.queue.in_flight", f"chain token {extra[0]} has no request record")

    @classmethod
    def from_state(cls, st: DmaTestDriverState, *, fn: RegisterInterface, port: MemoryPort) -> "DmaTestDriver":
        cls.check_state(st)
        alloc = st.alloc.clone()
        drv = cls(fn, port, alloc, bring_up=False)
        drv.features = st.features
        drv.transport.features = st.features
        drv.max_len = st.max_len
        drv.queue = st.queue.clone(port, alloc)
        drv.transport.queues[0] = drv.queue
        drv._requests = {r.token: r for r in st.requests}
        drv._next_token = st.next_token
        return drv


#: the status of a request the device carried out
OK = int(DmaTestStatus.OK)
