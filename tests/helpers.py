"""Shared test helpers: a VF with a DmaTestDevice over a Memory, brought up by a real driver.

* :func:`make_rig` -- a :class:`Rig`: guest :class:`Memory`, a
  :class:`VirtioPciFunction` hosting a device (default :class:`GatedDmaTestDevice`),
  brought up through registers by :class:`PciDriverTransport`; a DirtyLog
  installed as the VF port's ``writer.tracker`` and every interrupt recorded.
* :func:`make_destination` -- the same, NOT brought up (an INIT VF on another
  memory), for migration tests; :func:`copy_memory` copies guest memory
  source -> destination like a migration's last round; :func:`clone_driver_queue`
  moves the guest driver's queue state to the destination memory.
* :meth:`Rig.fill` / :meth:`Rig.echo` / :meth:`Rig.raw` place requests;
  :func:`check_result` verifies a completed request's bytes in a memory.
* :class:`GatedDmaTestDevice` -- back-end work waits on a per-request gate, so
  tests decide deterministically which requests are running, finished or not
  started (no sleeps, no timing).
"""

from __future__ import annotations

import copy
import threading
import time
from typing import Callable
from dataclasses import dataclass, field

from virtio_lm.devices.dmatest import HEADER_SIZE, DmaTestDevice, expected_completion, fill_pattern
from virtio_lm.memory import Memory
from virtio_lm.memory.dirty import DirtyLog
from virtio_lm.pci import PciDriverTransport, VirtioPciFunction
from virtio_lm.virtqueue.device import Segment
from virtio_lm.virtqueue.driver import Allocator, DriverQueue
from virtio_lm.wire.dmatest import DmaTestOp, DmaTestReqHeader, DmaTestStatus
from virtio_lm.wire.features import Feature, bit

MEM_SIZE = 4 << 20
RING_AREA = (0x1000, 0xFF000)  # driver rings and indirect tables
DATA_AREA = (0x100000, MEM_SIZE - 0x100000)  # request headers and buffers
ALL_FEATURES = bit(Feature.VERSION_1) | bit(Feature.EVENT_IDX) | bit(Feature.INDIRECT_DESC)
WAIT = 20.0  # seconds: a guard against hangs only, never an assertion about speed


class GatedDmaTestDevice(DmaTestDevice):
    """A DmaTestDevice whose back-end work for a request with seed ``s`` waits until
    gate ``s`` is opened (:meth:`open`, :meth:`open_all`).  ``started`` holds the
    seeds whose work began running on the pool."""

    def __init__(self, *, gated: bool = True, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.gated = gated
        self._gates: dict[int, threading.Event] = {}
        self._glock = threading.Lock()
        self.started: set[int] = set()
        self.all_open = threading.Event()
        if not gated:
            self.all_open.set()

    def _gate(self, seed: int) -> threading.Event:
        with self._glock:
            return self._gates.setdefault(seed, threading.Event())

    def open(self, *seeds: int) -> None:
        for s in seeds:
            self._gate(s).set()

    def open_all(self) -> None:
        self.all_open.set()
        with self._glock:
            for ev in self._gates.values():
                ev.set()

    def handle(self, fn, queue, chain):  # type: ignore[override]
        work = super().handle(fn, queue, chain)
        if not callable(work):
            return work
        seed = DmaTestReqHeader.decode(chain.read_range(fn.port, 0, HEADER_SIZE)).seed
        gate = self._gate(seed)
        if self.all_open.is_set():
            gate.set()

        def gated() -> bytes:
            with self._glock:
                self.started.add(seed)
            gate.wait()
            return work()

        return gated


@dataclass
class Req:
    """What the test driver submitted (the chain's token)."""

    op: int
    seed: int
    length: int
    hdr_addr: int
    buf_addr: int
    wlen: int
    payload: bytes = b""

    def expected(self) -> bytes:
        data = fill_pattern(self.seed, self.length) if self.op == DmaTestOp.FILL else self.payload
        return expected_completion(self.wlen, DmaTestStatus.OK, data)


@dataclass
class Rig:
    mem: Memory
    fn: VirtioPciFunction
    dev: DmaTestDevice
    tr: PciDriverTransport | None = None
    dq: DriverQueue | None = None
    data: Allocator = field(default_factory=lambda: Allocator(*DATA_AREA))
    tracker: DirtyLog | None = None
    interrupts: list[int] = field(default_factory=list)

    # ------------------------------------------------------------------ requests
    def _place(self, op: int, seed: int, length: int, payload: bytes, wlen: int, *, delay_us: int = 0,
               indirect: bool = False, header: bytes | None = None, buf_align: int = 16) -> Req:
        assert self.dq is not None
        raw = header if header is not None else DmaTestReqHeader(op, length, seed, delay_us).encode()
        hdr_addr = self.data.alloc(len(raw) + len(payload) or 1, 16)
        self.mem.cpu.write(hdr_addr, raw + payload)
        buf_addr = self.data.alloc(wlen, buf_align)
        self.mem.cpu.fill(buf_addr, wlen, 0xEE)  # poison: every byte must be written by the device
        req = Req(op, seed, length, hdr_addr, buf_addr, wlen, payload)
        readable = [Segment(hdr_addr, len(raw) + len(payload))] if raw or payload else []
        self.dq.add(readable, [Segment(buf_addr, wlen)], indirect=indirect, token=req)
        return req

    def fill(self, seed: int, length: int, *, delay_us: int = 0, indirect: bool = False, wlen: int | None = None,
             buf_align: int = 16) -> Req:
        """A FILL request (data area ``length`` bytes unless ``wlen`` says otherwise), not yet published."""
        return self._place(DmaTestOp.FILL, seed, length, b"", length + 1 if wlen is None else wlen,
                           delay_us=delay_us, indirect=indirect, buf_align=buf_align)

    def echo(self, seed: int, payload: bytes, *, indirect: bool = False) -> Req:
        """An ECHO request of ``payload``, not yet published."""
        return self._place(DmaTestOp.ECHO, seed, len(payload), payload, len(payload) + 1, indirect=indirect)

    def raw(self, header: bytes, wlen: int, payload: bytes = b"") -> Req:
        """A request with an arbitrary (possibly malformed) header."""
        return self._place(0, -1, 0, payload, wlen, header=header)

    def kick(self) -> bool:
        assert self.tr is not None
        return self.tr.kick(0)

    def reap(self) -> list[tuple[Req, int]]:
        assert self.dq is not None
        return self.dq.get_all_used()  # type: ignore[return-value]

    def wait_idle(self) -> None:
        assert self.dev.wait_idle(WAIT), f"device still has {self.dev.in_flight} requests in flight"

    def device_bytes_written(self) -> int:
        return self.fn.port.writer.bytes_written

    def close(self) -> None:
        """Stop the device's back-end pool and unmap the memory."""
        if isinstance(self.dev, GatedDmaTestDevice):
            self.dev.open_all()
        self.dev.close()
        self.mem.close()


def _function(mem: Memory, dev: DmaTestDevice, name: str) -> Rig:
    fn = VirtioPciFunction(dev, mem.device_port(name), name=name)
    rig = Rig(mem, fn, dev)
    fn.on_interrupt = rig.interrupts.append
    rig.tracker = DirtyLog(mem.num_pages, enabled=True)
    fn.port.writer.tracker = rig.tracker
    return rig


def make_rig(dev: DmaTestDevice | None = None, *, features: int = ALL_FEATURES, queue_size: int = 128,
             name: str = "vf1") -> Rig:
    """A VF with ``dev`` (default: an ungated :class:`GatedDmaTestDevice`) brought up by a driver."""
    mem = Memory(MEM_SIZE, name=f"{name}-guest")
    rig = _function(mem, dev if dev is not None else GatedDmaTestDevice(gated=False), name)
    rig.tr = PciDriverTransport(rig.fn, mem.cpu, Allocator(*RING_AREA))
    (rig.dq,) = rig.tr.bring_up(features, 1, size=queue_size)
    return rig


def make_destination(dev: DmaTestDevice | None = None, *, name: str = "dst-vf1") -> Rig:
    """An INIT VF (not brought up) on a fresh memory of the same size."""
    mem = Memory(MEM_SIZE, name=f"{name}-guest")
    return _function(mem, dev if dev is not None else GatedDmaTestDevice(gated=False), name)


def wait_until(pred: Callable[[], bool], what: str = "condition") -> None:
    """Poll ``pred`` until true; fail after WAIT seconds (a hang guard, not a speed check)."""
    deadline = time.monotonic() + WAIT
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def copy_memory(src: Memory, dst: Memory) -> None:
    """All of ``src`` into ``dst`` (the CPU writes it: a migration's incoming pages)."""
    dst.cpu.write(0, src.read(0, src.size))


def clone_driver_queue(dq: DriverQueue, port) -> DriverQueue:
    """The guest driver's queue state, now reaching its rings through ``port``
    (the destination memory).  The rings themselves travel with the memory."""
    new = copy.copy(dq)
    new.port = port
    new._free = list(dq._free)
    new._inflight = dict(dq._inflight)
    new.alloc = copy.deepcopy(dq.alloc)
    return new


def check_result(mem: Memory, req: Req, used_len: int) -> None:
    """The request completed OK with the right bytes in ``mem``."""
    got = mem.read(req.buf_addr, req.wlen)
    assert used_len == req.wlen, (req, used_len)
    assert got == req.expected(), f"wrong data for seed {req.seed}"


