"""VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD without QEMU: a back-end "killed" with requests in flight
and a new one on the kept region; every hostile region and message refused; the image checker
of the real-QEMU restart test and its negative control."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from test_vhost_user_protocol import (  # noqa: F401 (fixtures)
    AVAIL,
    DESC,
    MIB,
    PROTO,
    QSIZE,
    USED,
    closed,
    encode_mem_table,
    g2u,
    guest,
    image,
    make,
    msg,
    regions,
    u64b,
)

from virtio_lm.errors import VhostInflightError, VhostMessageError
from virtio_lm.vhost.inflight import InflightRegion
from virtio_lm.virtqueue.device import Segment
from virtio_lm.virtqueue.driver import DriverQueue
from virtio_lm.wire.blk import BlkOutHdr, BlkReqType, BlkStatus
from virtio_lm.wire.features import Feature, bit
from virtio_lm.wire.vhost_user import Inflight, ProtocolFeature, Request, VringAddr, VringState, inflight_queue_stride

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qemu.guest import check_wver_image, wver_block  # noqa: E402

INFL = bit(ProtocolFeature.INFLIGHT_SHMFD)


def negotiate(be, guest_mem) -> None:
    be.handle(msg(Request.SET_FEATURES, u64b(bit(Feature.VERSION_1) | PROTO)))
    be.handle(msg(Request.SET_PROTOCOL_FEATURES, u64b(INFL | bit(ProtocolFeature.REPLY_ACK))))


def get_region(be, nq: int = 1, qs: int = QSIZE) -> int:
    """GET_INFLIGHT_FD; returns a dup of the region's fd (what QEMU keeps)."""
    reply = be.handle(msg(Request.GET_INFLIGHT_FD, Inflight(0, 0, nq, qs).encode()))
    info = Inflight.decode(reply[12:])
    assert info == Inflight(nq * inflight_queue_stride(qs), 0, nq, qs)
    fds = be.take_reply_fds()
    assert len(fds) == 1
    return os.dup(fds[0])


def start_ring(be, guest_mem, base: int = 0) -> None:
    be.handle(msg(Request.SET_MEM_TABLE, encode_mem_table(regions()), [os.dup(guest_mem.fd), os.dup(guest_mem.fd)]))
    be.handle(msg(Request.SET_VRING_NUM, VringState(0, QSIZE).encode()))
    be.handle(msg(Request.SET_VRING_BASE, VringState(0, base).encode()))
    be.handle(msg(Request.SET_VRING_ADDR, VringAddr(0, 0, g2u(DESC), g2u(USED), g2u(AVAIL), 0).encode()))
    be.handle(msg(Request.SET_VRING_CALL, u64b(0), [os.eventfd(0, os.EFD_NONBLOCK)]))
    be.handle(msg(Request.SET_VRING_KICK, u64b(0), [os.eventfd(0)]))


def reads(dq: DriverQueue, n: int) -> None:
    for i in range(n):
        dq.port.write(0x8000 + 16 * i, BlkOutHdr(BlkReqType.IN, 0, i * 8).encode())
        dq.add([Segment(0x8000 + 16 * i, 16)], [Segment(MIB + 0x10000 + i * 0x1000, 4096), Segment(0xA000 + i, 1)],
               token=i)
    dq.publish()


def test_killed_backend_requests_are_executed_by_the_next_once(image, guest) -> None:
    """Three requests: the first completes, two are held when the back-end "dies" (abandoned,
    nothing cleaned up).  The next back-end, handed the region, executes exactly those two."""
    be1 = make(image)
    be2 = None
    try:
        negotiate(be1, guest)
        kept = get_region(be1)
        start_ring(be1, guest)
        be1.device.hold_after = 1
        dq = DriverQueue(guest.cpu, QSIZE, DESC, AVAIL, USED)
        reads(dq, 3)
        be1.handle(msg(Request.SET_VRING_ENABLE, VringState(0, 1).encode()))
        assert wait(lambda: be1.device.completed == 1 and be1.device.held == 2)
        used1 = dq.get_all_used()
        assert len(used1) == 1
        # the "SIGKILL": be1 is left as it is; QEMU restores the avail index to the used idx
        be2 = make(image)
        negotiate(be2, guest)
        be2.handle(msg(Request.SET_INFLIGHT_FD, Inflight(inflight_queue_stride(QSIZE), 0, 1, QSIZE).encode(), [kept]))
        start_ring(be2, guest, base=1)
        be2.handle(msg(Request.SET_VRING_ENABLE, VringState(0, 1).encode()))
        assert be2.device.wait_idle(5)
        used2 = dq.get_all_used()
        assert be2.resubmitted == 2 and len(used2) == 2
        # each once: none lost, none repeated (the driver refuses a head returned twice)
        assert sorted(tok for tok, _ in used1 + used2) == [0, 1, 2]
        for i in range(3):
            assert guest.read(0xA000 + i, 1)[0] == BlkStatus.OK
            assert guest.read(MIB + 0x10000 + i * 0x1000, 4096) == image.read_bytes()[i * 4096 : (i + 1) * 4096]
        # the ring goes on after the resubmitted chains: a new request is taken at avail index 3
        reads(dq, 1)
        be2.kick(0)
        assert be2.device.wait_idle(5) and len(dq.get_all_used()) == 1
    finally:
        be1.device.close()
        if be2 is not None:
            be2.disconnect()
            be2.device.close()


def wait(cond, timeout: float = 5.0) -> bool:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


# ============================================================================ recovery rules
def region(qs: int = 8) -> InflightRegion:
    return InflightRegion.create(1, qs)


def test_recover_clears_a_last_batch_written_to_the_used_ring_but_not_cleared() -> None:
    r = region()
    q = r.queues[0]
    q.recover(0)  # first start
    for h in (3, 5):
        q.take(h)
    q.returning([5])  # the process died after writing the used ring (idx 1), before clearing
    assert q.recover(1) == [3]
    r.close()


def test_recover_orders_by_counter_and_stale_batch_past_a_queue_refused() -> None:
    r = region()
    q = r.queues[0]
    q.recover(0)
    for h in (6, 2, 4):
        q.take(h)
    assert q.recover(0) == [6, 2, 4]
    with pytest.raises(VhostInflightError, match="more than a queue"):
        q.recover(100)
    r.close()


def test_a_fresh_region_takes_the_used_index_of_its_first_start() -> None:
    r = region()
    assert r.queues[0].recover(1234) == []  # after a migration the first start is not at 0
    assert int(r.queues[0].hdr["used_idx"][0]) == 1234
    r.close()


# ============================================================================ hostile messages and regions
def test_inflight_messages_without_the_protocol_feature_refused(image) -> None:
    be = make(image)
    try:
        with pytest.raises(VhostMessageError, match="INFLIGHT_SHMFD was not negotiated"):
            be.handle(msg(Request.GET_INFLIGHT_FD, Inflight(0, 0, 1, 16).encode()))
        fd = os.memfd_create("x")
        with pytest.raises(VhostMessageError, match="INFLIGHT_SHMFD was not negotiated"):
            be.handle(msg(Request.SET_INFLIGHT_FD, Inflight(0, 0, 1, 16).encode(), [fd]))
        assert closed(fd)
    finally:
        be.device.close()


@pytest.mark.parametrize("req", [Request.GET_INFLIGHT_FD, Request.SET_INFLIGHT_FD])
def test_inflight_message_with_non_zero_padding_is_a_malformed_message(image, guest, req) -> None:
    """Found by the vhost_user fuzz harness: the payload's padding is checked as it decodes, and
    the error is the protocol's (VhostMessageError), not a bare WireError out of handle()."""
    be = make(image)
    try:
        negotiate(be, guest)
        payload = bytearray(Inflight(0, 0, 1, 16).encode())
        payload[-1] = 1  # the last padding byte
        fds = [os.memfd_create("x")] if req is Request.SET_INFLIGHT_FD else []
        with pytest.raises(VhostMessageError, match="pad"):
            be.handle(msg(req, bytes(payload), fds))
        assert be.inflight is None and be.take_reply_fds() == []
        assert all(closed(fd) for fd in fds)
    finally:
        be.device.close()


@pytest.mark.parametrize("nq,qs,match", [(0, 16, "0 queues"), (2, 16, "2 queues"), (1, 0, "queue size 0"),
                                         (1, 24, "queue size 24"), (1, 512, "queue size 512")])
def test_get_inflight_fd_with_shapes_the_device_cannot_have(image, guest, nq, qs, match) -> None:
    be = make(image)  # one queue of at most 256
    try:
        negotiate(be, guest)
        with pytest.raises(VhostInflightError, match=match):
            be.handle(msg(Request.GET_INFLIGHT_FD, Inflight(0, 0, nq, qs).encode()))
        assert be.inflight is None and be.take_reply_fds() == []
    finally:
        be.device.close()


def _bad_region(how: str) -> tuple[int, Inflight]:
    qs = 16
    r = InflightRegion.create(1, qs)
    q = r.queues[0]
    info = r.info
    if how == "version":
        q.hdr["version"][0] = 2
    elif how == "desc_num":
        q.hdr["desc_num"][0] = 8
    elif how == "last_batch_head":
        q.hdr["last_batch_head"][0] = qs
    elif how == "inflight-byte":
        q.inflight[3] = 2
    elif how == "next":
        q.next[5] = qs + 1
    elif how == "mmap_size":
        info = Inflight(info.mmap_size + 64, 0, 1, qs)
    elif how == "offset":
        info = Inflight(info.mmap_size, 100, 1, qs)
    elif how == "past-the-fd":
        info = Inflight(info.mmap_size, 4096, 1, qs)
    fd = os.dup(r.fd)
    r.close()
    return fd, info


@pytest.mark.parametrize("how,match", [
    ("version", "version 2"), ("desc_num", "desc_num 8"), ("last_batch_head", "last_batch_head 16"),
    ("inflight-byte", "inflight is 2"), ("next", "next 17"), ("mmap_size", "mmap_size"),
    ("offset", "not page aligned"), ("past-the-fd", "past the fd"),
])
def test_set_inflight_fd_hostile_region_refused_previous_kept(image, guest, how, match) -> None:
    be = make(image)
    try:
        negotiate(be, guest)
        kept = get_region(be, qs=16)
        before = be.inflight
        fd, info = _bad_region(how)
        with pytest.raises(VhostInflightError, match=match):
            be.handle(msg(Request.SET_INFLIGHT_FD, info.encode(), [fd]))
        assert closed(fd) and be.inflight is before
        os.close(kept)
    finally:
        be.disconnect()
        be.device.close()


def test_inflight_messages_while_a_ring_runs_refused(image, guest) -> None:
    be = make(image)
    try:
        negotiate(be, guest)
        kept = get_region(be)
        start_ring(be, guest)
        with pytest.raises(VhostInflightError, match="while rings run"):
            be.handle(msg(Request.GET_INFLIGHT_FD, Inflight(0, 0, 1, QSIZE).encode()))
        with pytest.raises(VhostInflightError, match="while rings run"):
            be.handle(msg(Request.SET_INFLIGHT_FD, Inflight(inflight_queue_stride(QSIZE), 0, 1, QSIZE).encode(), [kept]))
        assert closed(kept)
    finally:
        be.disconnect()
        be.device.close()


def test_ring_of_another_size_than_the_region_refused_at_start(image, guest) -> None:
    be = make(image)
    try:
        negotiate(be, guest)
        os.close(get_region(be, qs=32))
        with pytest.raises(VhostInflightError, match="inflight region for 32 entries, ring of 16"):
            start_ring(be, guest)
    finally:
        be.disconnect()
        be.device.close()


def test_get_inflight_reply_carries_a_region_laid_out_for_the_shape(image, guest) -> None:
    be = make(image)
    try:
        negotiate(be, guest)
        fd = get_region(be, qs=64)
        import mmap

        mm = mmap.mmap(fd, inflight_queue_stride(64))
        hdr = np.frombuffer(mm, dtype=np.uint16, count=8)
        assert (int(hdr[4]), int(hdr[5])) == (1, 64)  # version, desc_num
        del hdr
        mm.close()
        os.close(fd)
    finally:
        be.disconnect()
        be.device.close()


# ============================================================================ the restart test's image check
def test_wver_image_check_and_its_negative_controls(tmp_path) -> None:
    img = tmp_path / "img"
    with open(img, "wb") as f:
        for b in range(8):
            f.write(wver_block(b, 3))
    assert check_wver_image(img, 0, 8, 3) == []
    with open(img, "r+b") as f:  # block 5 holds round 2: a lost write, or an old one executed again
        f.seek(5 * 4096)
        f.write(wver_block(5, 2))
        f.seek(6 * 4096)
        f.write(bytes(4096))  # block 6 never written
    assert check_wver_image(img, 0, 8, 3) == ["block 5: round 2", "block 6: round None"]


def test_set_after_get_of_the_same_region_keeps_it_fresh(image, guest) -> None:
    """QEMU sends SET_INFLIGHT_FD right after GET_INFLIGHT_FD with the region it got; a first start
    after a migration (used idx far from 0) must then not be taken for a restart."""
    be = make(image)
    try:
        negotiate(be, guest)
        kept = get_region(be)
        region = be.inflight
        be.handle(msg(Request.SET_INFLIGHT_FD, Inflight(inflight_queue_stride(QSIZE), 0, 1, QSIZE).encode(), [kept]))
        assert be.inflight is region and closed(kept)
        guest.cpu.write(USED + 2, (5000).to_bytes(2, "little"))  # the used idx a migrated guest left
        start_ring(be, guest, base=5000)
        assert be.fn.queues[0].last_avail_idx == 5000 and be.fn.rings[0].resubmit == ()
    finally:
        be.disconnect()
        be.device.close()


def test_a_ring_enabled_with_completions_behind_it_interrupts_the_driver(image, guest) -> None:
    """After a migration (or a restart) the last completions' interrupt may have gone with the old
    back-end: when a ring with a non-zero used idx starts running, the driver is interrupted once
    (with protocol features the ring runs at SET_VRING_ENABLE, not at SET_VRING_KICK)."""
    be = make(image)
    try:
        negotiate(be, guest)
        guest.cpu.write(USED + 2, (7).to_bytes(2, "little"))
        start_ring(be, guest, base=7)
        before = be.fn.interrupts
        be.handle(msg(Request.SET_VRING_ENABLE, VringState(0, 1).encode()))
        assert be.fn.interrupts == before + 1
    finally:
        be.disconnect()
        be.device.close()
