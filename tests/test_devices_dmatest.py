"""DmaTestDevice through a real driver: FILL / ECHO, error statuses, many in flight, dirty tracking."""

from __future__ import annotations

import pytest

from helpers import GatedDmaTestDevice, Rig, check_result, make_rig, wait_until
from virtio_lm.devices.dmatest import DEFAULT_MAX_LEN, DmaTestDevice, expected_completion, fill_pattern
from virtio_lm.memory.dirty import PAGE_SHIFT
from virtio_lm.wire.dmatest import DMATEST_DEVICE_ID, MAX_DELAY_US, DmaTestOp, DmaTestReqHeader, DmaTestStatus
from virtio_lm.wire.features import Feature, bit
from virtio_lm.wire.ring import used_ring_size


@pytest.fixture
def rig():
    r = make_rig()
    yield r
    r.close()


@pytest.fixture
def gated():
    r = make_rig(GatedDmaTestDevice(gated=True))
    yield r
    r.close()


def run(rig: Rig) -> list:
    rig.kick()
    rig.wait_idle()
    return rig.reap()


# ---------------------------------------------------------------- identity
def test_identity_features_and_config(rig):
    assert rig.dev.device_id == DMATEST_DEVICE_ID == 63
    want = bit(Feature.VERSION_1) | bit(Feature.EVENT_IDX) | bit(Feature.INDIRECT_DESC)
    assert rig.tr.device_features == want
    assert rig.tr.features == want
    assert rig.tr.config_read(0, 4) == DEFAULT_MAX_LEN


def test_fill_pattern_is_deterministic_seed_dependent_and_prefix_stable():
    a = fill_pattern(7, 1000)
    assert len(a) == 1000 and a == fill_pattern(7, 1000)
    assert fill_pattern(7, 13) == a[:13]
    assert fill_pattern(8, 1000) != a  # negative control: the seed matters
    assert fill_pattern(7, 0) == b""
    assert len(set(a)) > 200  # not a constant or short cycle


# ---------------------------------------------------------------- results
@pytest.mark.parametrize("length", [0, 1, 7, 8, 4095, 4096, 10000])
@pytest.mark.parametrize("indirect", [False, True])
def test_fill_writes_the_pattern(rig, length, indirect):
    req = rig.fill(seed=length * 31 + 5, length=length, indirect=indirect)
    ((token, used_len),) = run(rig)
    assert token is req
    check_result(rig.mem, req, used_len)
    assert rig.dev.status_counts[DmaTestStatus.OK] == 1


def test_fill_shorter_than_the_data_area_pads_with_zeros(rig):
    req = rig.fill(seed=3, length=10, wlen=64)
    ((_, used_len),) = run(rig)
    got = rig.mem.read(req.buf_addr, 64)
    assert used_len == 64
    assert got[:10] == fill_pattern(3, 10) and got[10:63] == bytes(53) and got[63] == DmaTestStatus.OK


@pytest.mark.parametrize("indirect", [False, True])
def test_echo_copies_the_payload(rig, indirect):
    payload = bytes(range(256)) * 9 + b"tail"
    req = rig.echo(seed=1, payload=payload, indirect=indirect)
    ((token, used_len),) = run(rig)
    assert token is req
    check_result(rig.mem, req, used_len)
    assert rig.mem.read(req.buf_addr, len(payload)) == payload


def test_check_result_catches_wrong_data(rig):
    """Negative control for check_result: a corrupted byte is noticed."""
    req = rig.fill(seed=11, length=100)
    ((_, used_len),) = run(rig)
    check_result(rig.mem, req, used_len)
    rig.mem.cpu.write(req.buf_addr + 50, bytes([rig.mem.read(req.buf_addr + 50, 1)[0] ^ 1]))
    with pytest.raises(AssertionError):
        check_result(rig.mem, req, used_len)


def test_requests_are_independent(rig):
    reqs = [rig.fill(seed=s, length=100 + s) for s in range(10)] + [rig.echo(seed=99, payload=b"x" * 33)]
    done = run(rig)
    assert sorted(id(t) for t, _ in done) == sorted(id(r) for r in reqs)
    for token, used_len in done:
        check_result(rig.mem, token, used_len)


# ---------------------------------------------------------------- error statuses (one test each)
def expect_status(rig: Rig, req, status: DmaTestStatus) -> None:
    ((token, used_len),) = run(rig)
    assert token is req
    assert used_len == req.wlen
    assert rig.mem.read(req.buf_addr, req.wlen) == expected_completion(req.wlen, status)
    assert not rig.fn.needs_reset
    # the device keeps serving
    ok = rig.fill(seed=1234, length=64)
    ((token, used_len),) = run(rig)
    assert token is ok
    check_result(rig.mem, ok, used_len)


def test_short_header_is_ioerr(rig):
    req = rig.raw(DmaTestReqHeader(DmaTestOp.FILL, 4, 1).encode()[:20], wlen=16)
    expect_status(rig, req, DmaTestStatus.IOERR)


def test_no_readable_part_is_ioerr(rig):
    req = rig.raw(b"", wlen=16)
    expect_status(rig, req, DmaTestStatus.IOERR)


def test_reserved_field_not_zero_is_ioerr(rig):
    raw = bytearray(DmaTestReqHeader(DmaTestOp.FILL, 4, 1).encode())
    raw[20] = 1
    req = rig.raw(bytes(raw), wlen=16)
    expect_status(rig, req, DmaTestStatus.IOERR)


@pytest.mark.parametrize("op", [0, 3, 0xFFFF_FFFF])
def test_unknown_op_is_unsupp(rig, op):
    req = rig.raw(DmaTestReqHeader(op, 4, 1).encode(), wlen=16)
    expect_status(rig, req, DmaTestStatus.UNSUPP)


def test_fill_longer_than_the_data_area_is_ioerr(rig):
    req = rig.raw(DmaTestReqHeader(DmaTestOp.FILL, 16, 1).encode(), wlen=16)  # 15 data bytes + status
    expect_status(rig, req, DmaTestStatus.IOERR)


def test_fill_with_a_payload_is_ioerr(rig):
    req = rig.raw(DmaTestReqHeader(DmaTestOp.FILL, 4, 1).encode(), wlen=16, payload=b"abcd")
    expect_status(rig, req, DmaTestStatus.IOERR)


def test_echo_length_not_the_payloads_is_ioerr(rig):
    req = rig.raw(DmaTestReqHeader(DmaTestOp.ECHO, 5, 1).encode(), wlen=16, payload=b"abcd")
    expect_status(rig, req, DmaTestStatus.IOERR)


def test_echo_payload_longer_than_the_data_area_is_ioerr(rig):
    req = rig.raw(DmaTestReqHeader(DmaTestOp.ECHO, 20, 1).encode(), wlen=16, payload=b"z" * 20)
    expect_status(rig, req, DmaTestStatus.IOERR)


def test_delay_above_limit_is_ioerr(rig):
    req = rig.raw(DmaTestReqHeader(DmaTestOp.FILL, 4, 1, MAX_DELAY_US + 1).encode(), wlen=16)
    expect_status(rig, req, DmaTestStatus.IOERR)


def test_backend_failure_completes_with_ioerr(rig):
    class Failing(DmaTestDevice):
        def handle(self, fn, queue, chain):
            work = super().handle(fn, queue, chain)
            seed = DmaTestReqHeader.decode(chain.read_range(fn.port, 0, DmaTestReqHeader.SIZE)).seed

            def boom():
                raise OSError("back-end gone")

            return boom if callable(work) and seed == 1 else work

    r = make_rig(Failing())
    try:
        req = r.fill(seed=1, length=8)
        expect_status(r, req, DmaTestStatus.IOERR)
    finally:
        r.close()


def test_chain_without_writable_byte_needs_reset(rig):
    hdr = DmaTestReqHeader(DmaTestOp.FILL, 0, 1).encode()
    rig.mem.cpu.write(0x300000, hdr)
    from virtio_lm.virtqueue.device import Segment

    rig.dq.add([Segment(0x300000, len(hdr))], [], token="nowrite")
    rig.kick()
    assert rig.fn.needs_reset
    assert rig.dev.in_flight == 0
    assert rig.dq.get_used() is None  # nothing returned, nothing written
    assert rig.device_bytes_written() < 64  # only the avail_event of the pop


def test_chain_beyond_max_len_needs_reset():
    r = make_rig(DmaTestDevice(max_len=100))
    try:
        assert r.tr.config_read(0, 4) == 100
        r.fill(seed=1, length=100)  # data area exactly max_len: fine
        ((_, used_len),) = run(r)
        assert used_len == 101 and not r.fn.needs_reset
        r.fill(seed=2, length=100, wlen=102)  # one byte more than max_len + status
        r.kick()
        assert r.fn.needs_reset
        assert r.reap() == []
    finally:
        r.close()


# ---------------------------------------------------------------- many in flight
def test_many_requests_in_flight_complete_out_of_order(gated):
    rig = gated
    reqs = [rig.fill(seed=s, length=512 + s, indirect=bool(s % 2)) for s in range(48)]
    rig.kick()
    assert rig.dev.in_flight == 48  # all taken from the ring
    assert rig.reap() == []  # none finished: their work waits on gates
    assert rig.dev.wait_idle(0) is False
    rig.dev.open(2)  # the third request finishes first
    wait_until(lambda: rig.dev.completed == 1, "request 2")
    done = rig.reap()
    assert [t.seed for t, _ in done] == [2]
    rig.dev.open_all()
    rig.wait_idle()
    done += rig.reap()
    assert sorted(t.seed for t, _ in done) == list(range(48))
    for token, used_len in done:
        check_result(rig.mem, token, used_len)
    assert rig.dq.in_flight() == 0 and rig.dev.in_flight == 0
    assert reqs[0] in [t for t, _ in done]


def test_interrupts_are_raised_for_completions(rig):
    rig.fill(seed=1, length=10)
    run(rig)
    assert rig.interrupts and set(rig.interrupts) == {0}


# ---------------------------------------------------------------- dirty tracking
def pages(addr: int, length: int) -> set[int]:
    return set(range(addr >> PAGE_SHIFT, ((addr + length - 1) >> PAGE_SHIFT) + 1))


def test_device_dma_marks_pages_cpu_writes_do_not(rig):
    rig.mem.cpu.writer.log.start()
    rig.tracker.collect()
    # a buffer spanning three pages, its header on a page of its own
    req = rig.fill(seed=5, length=3 * 4096 - 1 - 100, buf_align=4096)
    assert pages(req.hdr_addr, 24).isdisjoint(pages(req.buf_addr, req.wlen))
    cpu = set(rig.mem.cpu.writer.log.collect().nonzero()[0])
    assert pages(req.hdr_addr, 24) <= cpu and pages(req.buf_addr, req.wlen) <= cpu  # driver's own writes
    assert not rig.tracker.peek().any()  # ...are not device writes
    ((_, used_len),) = run(rig)
    check_result(rig.mem, req, used_len)
    dirty = set(rig.tracker.collect().nonzero()[0])
    used_pages = pages(rig.dq.used_addr, used_ring_size(rig.dq.size, True))
    assert dirty == pages(req.buf_addr, req.wlen) | used_pages
    assert pages(req.hdr_addr, 24).isdisjoint(dirty)
    # the device's writes are not in the CPU log
    assert not set(rig.mem.cpu.writer.log.collect().nonzero()[0]) & pages(req.buf_addr, req.wlen)


def test_without_tracker_device_writes_go_unrecorded(rig):
    """Negative control: the tracker is what records device DMA (not something else)."""
    rig.fn.port.writer.tracker = None
    req = rig.fill(seed=5, length=5000)
    ((_, used_len),) = run(rig)
    check_result(rig.mem, req, used_len)
    assert not rig.tracker.peek().any()
