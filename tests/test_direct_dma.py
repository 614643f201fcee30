"""Zero-copy DMA: back-end work that moves its data through the port itself (DirectWork), under
a DMA permit, and the memory operations it uses (preadv / pwritev on both kinds of memory).

The device tests use a DmaTestDevice whose FILL work is a DirectWork: with a permit it writes
the pattern through the port and leaves the status to the base; its buffered form returns the
whole completion.  Gates decide when each request's work runs (no sleeps, no timing)."""

from __future__ import annotations

import errno
import logging
import os
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

import virtio_lm.devices.base as base
import virtio_lm.memory.region as region
from virtio_lm.devices.base import DirectWork
from virtio_lm.devices.dmatest import HEADER_SIZE, fill_pattern
from virtio_lm.errors import ChainSpaceError, DmaDisabledError, MemoryAccessError
from virtio_lm.memory import Memory
from virtio_lm.memory.region import preadv_all, pwritev_all
from virtio_lm.vhost.memmap import GuestMemoryMap
from virtio_lm.virtqueue.device import DescriptorChain, Segment, _pieces, _scatter_plan
from virtio_lm.wire.dmatest import DmaTestOp, DmaTestReqHeader, DmaTestStatus
from virtio_lm.wire.vhost_user import MemRegion

from helpers import WAIT, GatedDmaTestDevice, check_result, make_rig, wait_until

MIB = 1 << 20


# ============================================================================ the device base
class DirectFillDevice(GatedDmaTestDevice):
    """FILL as a DirectWork: the data through the port under the permit, the status by the base.
    ``seen_mastering`` records the bus-master enable at each direct DMA; ``after_dma`` (a gate
    per seed) holds the work after its DMA, before it returns."""

    direct_dma = True

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)
        self.seen_mastering: list[bool] = []
        self.after_dma: dict[int, threading.Event] = {}

    def handle(self, fn, queue, chain):  # type: ignore[override]
        hdr = DmaTestReqHeader.decode(chain.read_range(fn.port, 0, HEADER_SIZE))
        work = super().handle(fn, queue, chain)
        if not callable(work) or hdr.op != DmaTestOp.FILL:
            return work
        gate = self._gate(hdr.seed)
        wlen = chain.writable_len

        def direct(port):
            with self._glock:
                self.started.add(hdr.seed)
            gate.wait()
            self.seen_mastering.append(port.bus_master)
            data = fill_pattern(hdr.seed, hdr.length)
            chain.write(port, data)
            after = self.after_dma.get(hdr.seed)
            if after is not None:
                after.wait()
            return len(data), self._done(wlen - len(data), DmaTestStatus.OK)

        return DirectWork(direct, work)  # work: the gated buffered form


def _rig(**kw):
    dev = DirectFillDevice(**kw)
    return make_rig(dev), dev


def _submit(rig, seed: int, length: int):
    """A FILL of ``length`` bytes, published and kicked."""
    req = rig.fill(seed, length)
    rig.dq.publish()
    rig.kick()
    return req


def _submit_holding_a_permit(rig, dev, seed: int, length: int):
    """:func:`_submit`, then wait until its (gated) direct work holds the DMA permit."""
    req = _submit(rig, seed, length)
    wait_until(lambda: dev.dma_permits == 1, f"the permit of request {seed}")
    return req


def _quiesce_in_thread(dev) -> threading.Thread:
    t = threading.Thread(target=dev.mig_quiesce, daemon=True)
    t.start()
    return t


def test_direct_work_dmas_under_a_permit_and_the_base_writes_the_rest() -> None:
    rig, dev = _rig(gated=False)
    try:
        req = _submit(rig, 1, 5000)
        rig.wait_idle()
        ((got, used),) = rig.reap()
        check_result(rig.mem, got, used)
        assert (dev.direct_runs, dev.buffered_runs, dev.dma_permits) == (1, 0, 0)
        assert dev.seen_mastering == [True]
        assert rig.tracker.peek()[req.buf_addr >> 12]  # the direct DMA went through the tracked port
    finally:
        rig.close()


def test_off_the_buffered_form_always_runs() -> None:
    rig, dev = _rig(gated=False)
    dev.direct_dma = False
    try:
        _submit(rig, 2, 300)
        rig.wait_idle()
        ((got, used),) = rig.reap()
        check_result(rig.mem, got, used)
        assert (dev.direct_runs, dev.buffered_runs) == (0, 1) and dev.seen_mastering == []
    finally:
        rig.close()


def test_quiesce_waits_for_the_permit_held_and_nothing_is_left_held() -> None:
    """QUIESCE stops granting, waits for the running DMA, whose request completes on its used
    ring before mastering stops: the DMA ran with mastering on and QUIESCED holds nothing."""
    rig, dev = _rig()
    try:
        req = _submit(rig, 3, 4096)
        wait_until(lambda: 3 in dev.started and dev.dma_permits == 1, "the direct work to start")
        t = _quiesce_in_thread(dev)
        wait_until(lambda: not dev.granting_permits, "QUIESCE to wait for the permit")
        assert rig.fn.port.bus_master  # still mastering while the permit is held
        dev.open(3)
        t.join(WAIT)
        assert not t.is_alive()
        assert dev.seen_mastering == [True] and not rig.fn.port.bus_master
        assert dev.in_flight == 0 and dev.dma_permits == 0 and dev.granting_permits
        ((got, used),) = rig.reap()
        assert got is req
        check_result(rig.mem, got, used)
    finally:
        rig.close()


def test_work_started_while_quiesce_waits_runs_buffered_and_is_held() -> None:
    rig, dev = _rig()
    try:
        _submit_holding_a_permit(rig, dev, 4, 4096)
        t = _quiesce_in_thread(dev)
        wait_until(lambda: not dev.granting_permits, "QUIESCE to wait")
        req2 = _submit(rig, 5, 4096)  # taken now (still mastering), but no permit: its buffered form
        wait_until(lambda: dev.buffered_runs == 1, "the second request's work to start")
        dev.open(4)
        t.join(WAIT)
        assert not t.is_alive() and not rig.fn.port.bus_master
        dev.open(5)  # finishes while QUIESCED: held
        wait_until(lambda: all(r.state is base.ReqState.DONE for r in dev.requests()), "the held completion")
        assert dev.in_flight == 1 and [g.seed for g, _ in rig.reap()] == [4]  # the second is held
        dev.mig_resume()
        ((got, used),) = rig.reap()
        assert got is req2
        check_result(rig.mem, got, used)
        assert (dev.direct_runs, dev.buffered_runs) == (1, 1)
    finally:
        rig.close()


def test_mastering_cleared_under_a_permit_before_the_dma_sends_the_request_back() -> None:
    """The PF clears bus-master enable (not QUIESCE): the DMA is refused at the port, the
    request is "not executed" again and runs at resume."""
    rig, dev = _rig()
    try:
        _submit_holding_a_permit(rig, dev, 6, 2000)
        rig.fn.port.bus_master = False
        dev.open(6)
        wait_until(lambda: dev.deferred == 1 and dev.dma_permits == 0, "the request to go back")
        assert rig.reap() == [] and dev.in_flight == 1
        dev.mig_resume()
        rig.wait_idle()
        ((got, used),) = rig.reap()
        check_result(rig.mem, got, used)
    finally:
        rig.close()


def test_mastering_cleared_after_the_dma_sends_the_request_back() -> None:
    """The data is in guest memory but the completion cannot be written (nor held as bytes):
    the request runs again at resume, into the same buffer."""
    rig, dev = _rig()
    dev.after_dma[7] = threading.Event()
    try:
        req = _submit(rig, 7, 3000)
        dev.open(7)
        wait_until(lambda: dev.seen_mastering == [True], "the DMA")
        assert rig.mem.read(req.buf_addr, 3000) == fill_pattern(7, 3000)
        rig.fn.port.bus_master = False
        dev.after_dma[7].set()
        wait_until(lambda: dev.deferred == 1 and dev.dma_permits == 0, "the request to go back")
        assert rig.reap() == [] and dev.in_flight == 1
        del dev.after_dma[7]
        dev.mig_resume()
        rig.wait_idle()
        ((got, used),) = rig.reap()
        check_result(rig.mem, got, used)
        assert dev.seen_mastering == [True, True]
    finally:
        rig.close()


def test_quiesce_stops_mastering_when_a_permit_outlives_the_settle_timeout(monkeypatch, caplog) -> None:
    monkeypatch.setattr(base, "DMA_SETTLE_TIMEOUT", 0.05)
    rig, dev = _rig()
    try:
        _submit_holding_a_permit(rig, dev, 8, 1000)
        with caplog.at_level(logging.WARNING, logger="virtio_lm.devices.base"):
            dev.mig_quiesce()
        assert not rig.fn.port.bus_master and "1 DMA permits still held" in caplog.text
        dev.open(8)  # its DMA now finds mastering off: not executed, run again at resume
        wait_until(lambda: dev.deferred == 1 and dev.dma_permits == 0, "the request to go back")
        dev.mig_resume()
        rig.wait_idle()
        ((got, used),) = rig.reap()
        check_result(rig.mem, got, used)
    finally:
        rig.close()


def test_freeze_waits_for_the_permits_too() -> None:
    rig, dev = _rig()
    try:
        _submit_holding_a_permit(rig, dev, 9, 4096)
        t = threading.Thread(target=dev.mig_freeze, args=(WAIT,), daemon=True)
        t.start()
        wait_until(lambda: not dev.granting_permits, "FREEZE to wait")
        dev.open(9)
        t.join(WAIT)
        assert not t.is_alive() and dev.frozen and dev.in_flight == 0
        assert dev.seen_mastering == [True]
        ((got, used),) = rig.reap()
        check_result(rig.mem, got, used)
    finally:
        rig.close()


# ============================================================================ memory
@pytest.fixture
def guest():
    mem = Memory(2 * MIB, name="guest", backing="memfd")
    yield mem
    mem.close()


@pytest.fixture
def both(guest):
    """The guest memory itself and a vhost-user map of it (one region at its fd's offset 0)."""
    gm = GuestMemoryMap("t")
    gm.set_table([MemRegion(0, MIB, 0x7F00_0000_0000, 0)], [os.dup(guest.fd)])
    yield guest, gm
    gm.close()


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(bytes(range(256)) * 64)  # 16 KiB
    fd = os.open(path, os.O_RDWR)
    yield fd
    os.close(fd)


class _Told:
    def __init__(self) -> None:
        self.told: list[tuple[int, int]] = []

    def written(self, a: int, b: int, n: int) -> None:
        self.told.append((a, b))


def test_preadv_reads_the_file_into_the_pieces_in_order_and_marks_them(both, image) -> None:
    guest, gm = both
    for mem in (guest, gm):
        w = _Told()
        got = mem.preadv(image, 100, [(4096 - 2, 4), (9000, 3), (50, 0), (20, 2)], w)
        assert got == 9
        assert guest.read(4096 - 2, 4) == bytes([100, 101, 102, 103])
        assert guest.read(9000, 3) == bytes([104, 105, 106]) and guest.read(20, 2) == bytes([107, 108])
        assert w.told == [(0, 1), (2, 2), (0, 0)]
        guest.cpu.fill(0, 4 * 4096, 0)


def test_preadv_at_the_files_end_returns_less_and_marks_only_what_arrived(both, image) -> None:
    guest, gm = both
    for mem in (guest, gm):
        w = _Told()
        assert mem.preadv(image, 16 * 1024 - 3, [(0, 2), (8192, 4), (3 * 4096, 4)], w) == 3
        assert guest.read(0, 2) == bytes([253, 254]) and guest.read(8192, 4) == bytes([255, 0, 0, 0])
        assert w.told == [(0, 0), (2, 2)]
        guest.cpu.fill(0, 4 * 4096, 0)


def test_preadv_refuses_a_piece_outside_before_reading_anything(both, image) -> None:
    guest, gm = both
    for mem, end in ((guest, guest.size), (gm, MIB)):
        w = _Told()
        with pytest.raises(MemoryAccessError):
            mem.preadv(image, 0, [(100, 8), (end - 4, 8)], w)
        assert guest.read(100, 8) == bytes(8) and w.told == []


def test_preadv_that_fails_marks_every_piece(both) -> None:
    """A read error part-way: what landed is not known, so every piece's pages are marked."""
    guest, gm = both
    r, wr = os.pipe()  # preadv on a pipe: ESPIPE
    try:
        for mem in (guest, gm):
            w = _Told()
            with pytest.raises(OSError) as info:
                mem.preadv(r, 0, [(0, 8), (3 * 4096, 8)], w)
            assert info.value.errno == errno.ESPIPE and w.told == [(0, 0), (3, 3)]
    finally:
        os.close(r)
        os.close(wr)


def test_pwritev_writes_the_pieces_in_order_and_refuses_one_outside(both, image) -> None:
    guest, gm = both
    guest.cpu.write(4096 - 2, b"wxyz")
    guest.cpu.write(20, b"ab")
    for mem, end in ((guest, guest.size), (gm, MIB)):
        assert mem.pwritev(image, 10, [(4096 - 2, 4), (7, 0), (20, 2)]) == 6
        assert os.pread(image, 8, 9) == bytes([9]) + b"wxyzab" + bytes([16])
        os.pwrite(image, bytes(range(10, 16)), 10)
        with pytest.raises(MemoryAccessError):
            mem.pwritev(image, 10, [(20, 2), (end - 1, 2)])
        assert os.pread(image, 2, 10) == bytes([10, 11])


def test_the_port_refuses_both_while_not_mastering(guest, image) -> None:
    port = guest.device_port("d")
    port.bus_master = False
    with pytest.raises(DmaDisabledError):
        port.preadv(image, 0, [(0, 16)])
    with pytest.raises(DmaDisabledError):
        port.pwritev(image, 0, [(0, 16)])
    assert guest.read(0, 16) == bytes(16) and port.writer.bytes_written == 0
    port.bus_master = True
    assert port.preadv(image, 0, [(0, 16)]) == 16 and port.writer.bytes_written == 16


def test_more_pieces_than_one_preadv_takes(both, image) -> None:
    guest, gm = both
    n = region.IOV_MAX + 5
    pieces = [(64 * i, 2) for i in range(n)]
    for mem in (guest, gm):
        assert mem.preadv(image, 0, pieces, _Told()) == 2 * n
        assert mem.pwritev(image, 0, pieces) == 2 * n
        assert os.pread(image, 2 * n, 0) == (bytes(range(256)) * 64)[: 2 * n]


@pytest.mark.parametrize("direction", ["read", "write"])
def test_short_transfers_are_continued_where_they_stopped(monkeypatch, direction) -> None:
    """preadv / pwritev may move fewer bytes than asked: the rest is asked for from there, the
    partly filled buffer from its first unfilled byte."""
    src = bytes(range(200, 240))
    calls: list[tuple[list[int], int]] = []

    def fake(fd, bufs, offset):
        calls.append(([len(b) for b in bufs], offset))
        b = bufs[0]
        k = min(3, len(b))
        if direction == "read":
            b[:k] = src[offset : offset + k]
        else:
            sink[offset : offset + k] = bytes(b[:k])
        return k

    monkeypatch.setattr(os, "preadv" if direction == "read" else "pwritev", fake)
    sink = bytearray(40)
    store = [bytearray(5), bytearray(2), bytearray(4)]
    views = [memoryview(b) for b in store]
    if direction == "read":
        assert preadv_all(0, 0, views) == 11
        assert b"".join(store) == src[:11]
    else:
        for b, v in zip(store, (b"abcde", b"fg", b"hijk")):
            b[:] = v
        assert pwritev_all(0, 0, views) == 11
        assert bytes(sink[:11]) == b"abcdefghijk"
    assert calls[:3] == [([5, 2, 4], 0), ([2, 2, 4], 3), ([2, 4], 5)]


def test_a_write_that_moves_nothing_is_eio(monkeypatch) -> None:
    monkeypatch.setattr(os, "pwritev", lambda fd, bufs, offset: 0)
    with pytest.raises(OSError) as info:
        pwritev_all(0, 0, [memoryview(b"ab")])
    assert info.value.errno == errno.EIO


# ============================================================================ the chain
segments = st.lists(st.builds(Segment, st.integers(0, 1 << 20), st.integers(0, 5000)), max_size=8).map(tuple)


@given(segments, st.data())
def test_pieces_are_the_scatter_plan(segs, data) -> None:
    total = sum(s.len for s in segs)
    offset = data.draw(st.integers(0, total))
    length = data.draw(st.integers(0, total - offset))
    want = [(a, n) for a, _, n in _scatter_plan(segs, offset, length)]
    got = [(a, n) for a, n in _pieces(segs, offset, length) if n]  # a slice may keep empty segments
    assert got == want


def test_chain_file_io_refuses_a_range_beyond_its_part(guest, image) -> None:
    chain = DescriptorChain(head=0, readable=(Segment(0, 16),), writable=(Segment(4096, 8),), avail_idx=0,
                            readable_len=16, writable_len=8, queue="q")
    port = guest.device_port("d")
    with pytest.raises(ChainSpaceError):
        chain.pread_into(port, image, 0, 9)
    with pytest.raises(ChainSpaceError):
        chain.pread_into(port, image, 0, 4, offset=5)
    with pytest.raises(ChainSpaceError):
        chain.pwrite_from(port, image, 0, 10, 7)
    assert chain.pread_into(port, image, 0, 7) == 7 and guest.read(4096, 8) == bytes(range(7)) + b"\0"
    assert port.writer.bytes_written == 7
