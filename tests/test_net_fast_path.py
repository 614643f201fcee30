"""The C transmit fast path of the virtio-net device (``virtio_lm.devices.netfast``) against the
Python path.

Two net VFs, each with its own guest memory and a back-end that records what it is asked to send:
one serves its transmit queue with the fast path on, the other with it off.  The same chains --
frames of many shapes, chains the device drops (short, long, an offload asked for), chains with
a writable buffer, hostile chains -- are planted in both with the same driver calls, one kick
each, and everything the driver or the network can see must come out the same: guest memory, the
used ring and the queue's indices, the frames on the wire and their order, the device's counters,
NEEDS_RESET.  The fast path takes only chains the Python path would send the same way and
leaves the rest to it, so equality is the whole contract.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtio_lm.devices import netfast
from virtio_lm.devices.net import NetDevice
from virtio_lm.memory import DirtyLog, Memory
from virtio_lm.net.testbed import BUF_AREA, RING_AREA
from virtio_lm.drivers.net_driver import NetDriver
from virtio_lm.pci import VirtioPciFunction
from virtio_lm.virtqueue import Allocator, Segment
from virtio_lm.wire.net import NetHdrV1
from virtio_lm.wire.ring import DescFlags, VirtqDesc

GUEST = 8 << 20
PEER = bytes.fromhex("02aabbccdd01")
TXQ = 1


class Port:
    """A back-end recording the frames it is asked to send, in order (and in how many calls)."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.calls = 0
        self.paused = False

    def attach(self, deliver) -> None:  # type: ignore[no-untyped-def]
        self.deliver = deliver

    def wait_tx_ready(self, abort: threading.Event) -> bool:
        return not abort.is_set()

    def try_tx_ready(self, abort: threading.Event) -> bool:
        return not abort.is_set() and not self.paused

    def tx_unmetered(self, abort: threading.Event) -> bool:
        return not abort.is_set() and not self.paused

    def send(self, frame: bytes) -> None:
        self.calls += 1
        self.sent.append(bytes(frame))

    def send_many(self, frames: list[bytes]) -> None:
        self.calls += 1
        self.sent.extend(bytes(f) for f in frames)

    def wake_tx(self) -> None:
        pass

    def close(self) -> None:
        pass


class Vf:
    def __init__(self, *, fast: bool) -> None:
        self.port = Port()
        self.dev = NetDevice(self.port, queue_max_size=256)
        self.dev.fast_path = fast
        self.dev.inline_max = 2048
        self.mem = Memory(GUEST, name="guest")
        self.fn = VirtioPciFunction(self.dev, self.mem.device_port("vf"), name="vf")
        self.log = DirtyLog(self.mem.num_pages, enabled=True)
        self.fn.port.writer.tracker = self.log
        self.drv = NetDriver(self.fn, self.mem.cpu, ring_alloc=Allocator(*RING_AREA), buf_alloc=Allocator(*BUF_AREA))
        self.drv.bring_up(queue_size=64)
        self.dq = self.drv.tr.queues[TXQ]
        self.log.collect()

    def state(self) -> dict:
        d = self.dev
        assert d.wait_idle(10)  # a frame over inline_max goes on the back-end thread
        return {
            "memory": self.mem.read(0, GUEST),
            "sent": list(self.port.sent),
            "stats": {k: v for k, v in d.stats.items() if v},
            "queue": (self.fn.queues[TXQ].used_idx, self.fn.queues[TXQ].broken),
            "needs_reset": self.fn.needs_reset,
            "in_flight": d.in_flight,
            "dirty": self.log.collect().tobytes(),
        }

    def close(self) -> None:
        self.dev.close()
        self.mem.close()


@dataclass
class Tx:
    size: int = 64  # frame bytes
    splits: int = 1  # readable descriptors
    indirect: bool = False
    flags: int = 0  # header flags / gso_type
    gso: int = 0
    writable: int = 0  # bytes of a writable buffer after the readable ones
    raw_len: int | None = None  # the readable part's length, whatever the frame (short / long)


def plant(vf: Vf, txs: list[Tx], seed: int) -> list[int]:
    """The same allocations and ring writes on every VF for the same ``txs``; the buffers' addresses."""
    rng = np.random.default_rng(seed)
    bufs = []
    for i, t in enumerate(txs):
        frame = PEER + vf.drv.mac + rng.integers(0, 256, max(t.size - 12, 0), dtype=np.uint8).tobytes()
        raw = bytes((t.flags, t.gso)) + NetHdrV1().encode()[2:] + frame[: t.size]
        if t.raw_len is not None:
            raw = (raw + bytes(t.raw_len))[: t.raw_len]
        buf = vf.drv.buf_alloc.alloc(max(len(raw), 1) + 16, 16)
        bufs.append(buf)
        vf.mem.cpu.write(buf, raw)
        cuts = sorted(set(int(x) for x in rng.integers(1, max(len(raw), 2), t.splits - 1))) if len(raw) > 1 else []
        bounds = [0, *cuts, len(raw)]
        readable = [Segment(buf + a, b - a) for a, b in zip(bounds, bounds[1:]) if b > a]
        writable = [Segment(vf.drv.buf_alloc.alloc(t.writable, 16), t.writable)] if t.writable else []
        vf.dq.add(readable, writable, indirect=t.indirect, token=i)
    return bufs


def run_both(txs: list[Tx], seed: int = 0) -> tuple[dict, dict, Vf, Vf]:
    fast, slow = Vf(fast=True), Vf(fast=False)
    try:
        for vf in (fast, slow):
            plant(vf, txs, seed)
            vf.drv.tr.kick(TXQ)
        return fast.state(), slow.state(), fast, slow
    finally:
        fast.close()
        slow.close()


def differences(a: dict, b: dict) -> list[str]:
    out = []
    for k in a:
        if a[k] != b[k]:
            if k == "memory":
                x, y = np.frombuffer(a[k], np.uint8), np.frombuffer(b[k], np.uint8)
                idx = np.flatnonzero(x != y)
                out.append(f"memory differs at {len(idx)} bytes, first {int(idx[0]):#x}")
            else:
                out.append(f"{k}: {a[k]!r:.200} != {b[k]!r:.200}")
    return out


tx_st = st.builds(
    Tx,
    size=st.sampled_from([14, 15, 60, 64, 1514, 2048, 2049]),
    splits=st.integers(1, 4),
    indirect=st.booleans(),
    flags=st.sampled_from([0, 0, 0, 1]),
    gso=st.sampled_from([0, 0, 0, 1]),
    writable=st.sampled_from([0, 0, 0, 8]),
    raw_len=st.sampled_from([None, None, None, 11, 25]),
)


@given(st.lists(tx_st, min_size=1, max_size=20), st.integers(0, 1000))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_both_paths_leave_everything_the_same(txs, seed) -> None:
    a, b, _, _ = run_both(txs, seed)
    assert differences(a, b) == []


def test_plain_frames_are_all_served_in_c_and_sent_in_one_burst() -> None:
    txs = [Tx(size=64), Tx(size=1514, splits=3), Tx(size=100, indirect=True), Tx(size=14)] * 8
    a, b, fast, slow = run_both(txs)
    assert differences(a, b) == []
    assert fast.dev.fast_served == 32 and slow.dev.fast_served == 0
    assert fast.port.calls == 1 and slow.port.calls == 32
    assert len(a["sent"]) == 32 and a["stats"]["tx_inline"] == 32


@pytest.mark.parametrize("bad", [Tx(raw_len=25), Tx(flags=1), Tx(gso=1), Tx(writable=8), Tx(size=2049)],
                         ids=["short", "offload-flags", "gso", "writable-part", "over-inline-max"])
def test_a_chain_it_does_not_serve_is_left_to_the_python_path_and_the_rest_still_go(bad) -> None:
    txs = [Tx(), Tx(), bad, Tx(), Tx()]
    a, b, fast, _ = run_both(txs)
    assert differences(a, b) == []
    assert fast.dev.fast_served == 4  # two before, two after the one the Python path took


def test_the_comparison_sees_one_wrong_frame() -> None:
    """Negative control: the same plan with one frame's byte changed on one side is seen."""
    fast, slow = Vf(fast=True), Vf(fast=False)
    try:
        for vf in (fast, slow):
            bufs = plant(vf, [Tx(), Tx()], 3)
        b = slow.mem.read(bufs[1] + 20, 1)[0]  # a byte of the second frame
        slow.mem.cpu.write(bufs[1] + 20, bytes([b ^ 1]))
        for vf in (fast, slow):
            vf.drv.tr.kick(TXQ)
        assert any(d.startswith("sent") for d in differences(fast.state(), slow.state()))
    finally:
        fast.close()
        slow.close()


@pytest.mark.parametrize("mutation", ["loop", "next_oob", "zero_len", "outside", "head_oob", "nested_indirect"])
def test_a_hostile_chain_breaks_the_queue_the_same_way(mutation) -> None:
    states = []
    for fast in (True, False):
        vf = Vf(fast=fast)
        try:
            plant(vf, [Tx(), Tx(splits=2)], 1)
            dq = vf.dq
            heads = [c.head for c in dq.chains()]
            ch = next(c for c in dq.chains() if c.head == heads[1])
            d0 = VirtqDesc.unpack_from(vf.mem.read(dq.desc_addr + 16 * ch.descs[0], 16))
            if mutation == "loop":
                dq.write_desc(ch.descs[1], VirtqDesc(d0.addr, 4, DescFlags.NEXT, ch.descs[0]))
            elif mutation == "next_oob":
                dq.write_desc(ch.descs[0], VirtqDesc(d0.addr, d0.len, DescFlags.NEXT, 999))
            elif mutation == "zero_len":
                dq.write_desc(ch.descs[0], VirtqDesc(d0.addr, 0, DescFlags.NEXT, d0.next))
            elif mutation == "outside":
                dq.write_desc(ch.descs[0], VirtqDesc(GUEST - 4, 64, DescFlags.NEXT, d0.next))
            elif mutation == "nested_indirect":
                dq.write_desc(ch.descs[0], VirtqDesc(d0.addr, 32, DescFlags.INDIRECT, 0))
            dq.publish()
            if mutation == "head_oob":
                vf.mem.cpu.write(dq.avail_addr + 4 + 2 * 1, (500).to_bytes(2, "little"))
            vf.fn.notify(TXQ)
            states.append(vf.state())
            if fast:
                assert vf.dev.fast_served == 1  # the first frame, then the Python path names the fault
        finally:
            vf.close()
    assert differences(*states) == []


def test_a_paused_back_end_keeps_the_python_path() -> None:
    vf = Vf(fast=True)
    try:
        vf.port.paused = True
        plant(vf, [Tx()], 1)
        vf.drv.tr.kick(TXQ)
        assert vf.dev.fast_served == 0
    finally:
        vf.close()


def test_tx_refuses_bad_arguments() -> None:
    mem = Memory(1 << 20)
    try:
        with mem.pinned() as regions:
            assert regions is not None
        good = (64, 0x1000, 0x2000, 0x3000, 0, -1, 0, False, True, False)
        for q, mf, mc in (((63, *good[1:]), 64, 1), ((64, 0x1008, *good[2:]), 64, 1), (good, 13, 1), (good, 64, 0),
                          (good, 64, netfast.MAX_CHAINS + 1)):
            with pytest.raises(ValueError):
                netfast.tx(regions, q, mf, mc)
        with pytest.raises((TypeError, BufferError)):
            netfast.tx(((0, b"read-only"),), good, 64, 1)
        with pytest.raises(TypeError):
            netfast.tx(([0, bytearray(16)],), good, 64, 1)
        r = netfast.tx(regions, good, 64, 1)  # an empty ring: nothing taken, nothing written
        assert r[:2] == (netfast.STOP_EMPTY, 0) and r[5] == [] and r[6] == 0
    finally:
        mem.close()


# ====================================================================== FixedFrames, the bench's driver
@pytest.mark.parametrize("fast", [True, False], ids=["c-fast-path", "python"])
def test_fixed_frames_go_out_numbered_in_order(fast) -> None:
    from virtio_lm.drivers.net_driver import FixedFrames
    from virtio_lm.net.peer import parse_seq

    vf = Vf(fast=fast)
    try:
        ff = FixedFrames(vf.drv, 16, 64, PEER, stream=5)
        for _ in range(5):
            ff.send()
            assert vf.dev.wait_idle(10)
            assert ff.reap() == 16
        got = [parse_seq(f) for f in vf.port.sent]
        assert [g[3] for g in got] == list(range(80))  # type: ignore[index]
        assert all(g[:3] == (PEER, vf.drv.mac, 5) for g in got)  # type: ignore[index]
        assert all(len(f) == 64 for f in vf.port.sent)
        assert (vf.dev.fast_served == 80) is fast
        ff.close()
    finally:
        vf.close()


def test_a_lent_transmit_queue_is_left_alone_until_closed() -> None:
    from virtio_lm.drivers.net_driver import FixedFrames
    from virtio_lm.errors import DriverError

    vf = Vf(fast=True)
    try:
        drv = vf.drv
        ff = FixedFrames(drv, 4, 64, PEER)
        with pytest.raises(DriverError):
            FixedFrames(drv, 4, 64, PEER)
        with pytest.raises(DriverError):
            drv.send(bytes(64))
        ff.send(2, kick=False)
        with pytest.raises(DriverError):
            drv.save()
        with pytest.raises(DriverError):
            ff.close()  # two in flight
        drv.tr.kick(TXQ)
        assert drv.reap_tx() == 0  # the lent queue's completions are ff's
        assert ff.reap() == 2 and ff.in_flight() == 0
        ff.close()
        drv.save()
        drv.send(PEER + drv.mac + bytes(52))  # the queue is the driver's again
        assert vf.port.sent[-1][:6] == PEER
    finally:
        vf.close()


@pytest.mark.parametrize("count, size, dst", [(0, 64, PEER), (4, 20, PEER), (4, 65472, PEER), (4, 64, b"\x01")])
def test_fixed_frames_refuse_bad_shapes_and_lend_nothing(count, size, dst) -> None:
    from virtio_lm.drivers.net_driver import FixedFrames
    from virtio_lm.errors import DriverError

    vf = Vf(fast=True)
    try:
        with pytest.raises(DriverError):
            FixedFrames(vf.drv, count, size, dst)
        FixedFrames(vf.drv, 4, 64, PEER).close()
    finally:
        vf.close()
