"""vhost-user back-end without QEMU: framing, hostile messages, memory map, ring table, dirty log.

A memfd stands for QEMU's guest RAM (two regions, not contiguous in the
front-end's address space); our DriverQueue plays the Linux driver.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from virtio_lm.devices.blk import BlkDevice
from virtio_lm.errors import (
    MemoryAccessError,
    VhostLogError,
    VhostMemoryError,
    VhostMessageError,
    VhostRingError,
    VhostUserError,
)
from virtio_lm.memory import Memory
from virtio_lm.memory.dirty import unpack_bitmap
from virtio_lm.vhost.backend import RING_TRANSITIONS, RingAction, RingInput, RingState, VhostUserBackend
from virtio_lm.vhost.memmap import GuestMemoryMap
from virtio_lm.vhost.protocol import PAYLOAD_RULES, Message, MessageReader, check_shape
from virtio_lm.vhost.server import VhostUserServer
from virtio_lm.virtqueue.device import Segment
from virtio_lm.virtqueue.driver import DriverQueue
from virtio_lm.wire.blk import BlkOutHdr, BlkReqType, BlkStatus
from virtio_lm.wire.features import Feature, bit
from virtio_lm.wire.vhost_user import (
    MAX_PAYLOAD,
    VRING_FILE_NOFD,
    Header,
    LogBase,
    MemRegion,
    Request,
    SingleRegion,
    VringAddr,
    VringState,
    decode_u64,
    encode_config,
    encode_mem_table,
)

MIB = 1 << 20
UADDR = 0x7F00_0000_0000  # front-end virtual address of region 0 (gpa 0)
UADDR2 = 0x7F80_0000_0000  # region 1 (gpa 1 MiB) is elsewhere in the front-end's space
LOG_ALL = 1 << 26
PROTO = 1 << 30
QSIZE = 16
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000  # gpa of the rings (region 0)


def u64b(v: int) -> bytes:
    return v.to_bytes(8, "little")


def msg(req: int, payload: bytes = b"", fds: list[int] | None = None, flags: int = 1) -> Message:
    return Message(Header(int(req), flags, len(payload)), payload, list(fds or []))


def closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


@pytest.fixture
def guest():
    mem = Memory(2 * MIB, name="guest", backing="memfd")
    yield mem
    mem.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    img.write_bytes(np.random.default_rng(1).integers(0, 256, MIB, dtype=np.uint8).tobytes())
    return img


def regions() -> list[MemRegion]:
    return [MemRegion(0, MIB, UADDR, 0), MemRegion(MIB, MIB, UADDR2, MIB)]


def g2u(gpa: int) -> int:
    return UADDR + gpa if gpa < MIB else UADDR2 + gpa - MIB


def make(image: Path, *, log_writes: bool = True, direct: bool = False, fast: bool = False) -> VhostUserBackend:
    dev = BlkDevice(image, queue_max_size=256)
    dev.direct_dma = direct  # reads (and writes) straight between the image and guest memory
    dev.fast_path = fast  # the C fast path (tests/test_blk_fast_path.py compares it with the Python one)
    return VhostUserBackend(dev, log_writes=log_writes)


def setup_ring(be: VhostUserBackend, guest: Memory, *, log: bool = True) -> tuple[DriverQueue, Memory | None, int]:
    """Negotiate, map the guest, start ring 0 with the log on; returns (driver queue, log memory, call fd)."""
    assert decode_u64(be.handle(msg(Request.GET_FEATURES))[12:]) & LOG_ALL
    feats = bit(Feature.VERSION_1) | PROTO | (LOG_ALL if log else 0)
    be.handle(msg(Request.SET_FEATURES, u64b(feats)))
    be.handle(msg(Request.SET_PROTOCOL_FEATURES, u64b(0b1000001000001011)))
    assert be.handle(msg(Request.SET_MEM_TABLE, encode_mem_table(regions()), [os.dup(guest.fd), os.dup(guest.fd)])) is None
    logmem = None
    if log:
        logmem = Memory(4096, name="log", backing="memfd")
        reply = be.handle(msg(Request.SET_LOG_BASE, LogBase(4096, 0).encode(), [os.dup(logmem.fd)]))
        assert reply is not None and Header.decode(reply[:12]).request == Request.SET_LOG_BASE
    dq = DriverQueue(guest.cpu, QSIZE, DESC, AVAIL, USED)
    be.handle(msg(Request.SET_VRING_NUM, VringState(0, QSIZE).encode()))
    be.handle(msg(Request.SET_VRING_BASE, VringState(0, 0).encode()))
    addr = VringAddr(0, 1 if log else 0, g2u(DESC), g2u(USED), g2u(AVAIL), USED)
    be.handle(msg(Request.SET_VRING_ADDR, addr.encode()))
    call = os.eventfd(0, os.EFD_NONBLOCK)
    be.handle(msg(Request.SET_VRING_CALL, u64b(0), [os.dup(call)]))
    be.handle(msg(Request.SET_VRING_KICK, u64b(0), [os.eventfd(0)]))
    be.handle(msg(Request.SET_VRING_ENABLE, VringState(0, 1).encode()))
    return dq, logmem, call


def read_request(dq: DriverQueue, sector: int, data_gpa: int, status_gpa: int, n: int = 4096) -> None:
    hdr_gpa = 0x8000
    dq.port.write(hdr_gpa, BlkOutHdr(BlkReqType.IN, 0, sector).encode())
    dq.add([Segment(hdr_gpa, 16)], [Segment(data_gpa, n), Segment(status_gpa, 1)])
    dq.publish()


# ============================================================================ data path + dirty log
@pytest.mark.parametrize("path", ["buffered", "direct", "fast"])
@pytest.mark.parametrize("log_writes", [True, False], ids=["logging", "negative-control-no-log"])
def test_read_request_through_two_regions_sets_log_bits(image, guest, log_writes, path) -> None:
    be = make(image, log_writes=log_writes, direct=path != "buffered", fast=path == "fast")
    try:
        dq, logmem, call = setup_ring(be, guest)
        data_gpa = MIB + 0x3000  # region 1: front-end address far from region 0
        read_request(dq, 8, data_gpa, 0x9000)
        be.kick(0)
        assert be.device.wait_idle(5)
        assert dq.get_used() is not None
        assert guest.read(data_gpa, 4096) == image.read_bytes()[8 * 512 : 8 * 512 + 4096]
        assert guest.read(0x9000, 1)[0] == BlkStatus.OK
        runs = (be.device.direct_runs, be.device.buffered_runs, be.device.fast_served)
        assert runs == {"buffered": (0, 1, 0), "direct": (1, 0, 0), "fast": (0, 0, 1)}[path]
        assert os.eventfd_read(call) >= 1  # the interrupt went to the call fd
        pages = unpack_bitmap(logmem.array.copy(), 4096 * 8)
        written = {data_gpa >> 12, 0x9000 >> 12, USED >> 12}
        if log_writes:
            assert all(pages[p] for p in written)
            assert not pages[0x150] and not pages[DESC >> 12]  # read-only and untouched pages stay clean
        else:
            assert not pages.any()
        # GET_VRING_BASE stops the ring and returns the next avail index
        reply = be.handle(msg(Request.GET_VRING_BASE, VringState(0, 0).encode()))
        assert VringState.decode(reply[12:]).num == 1
        assert be.fn.rings[0].state is RingState.STOPPED
        logmem.close()
    finally:
        be.disconnect()
        be.device.close()


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_get_vring_base_finishes_in_flight_requests(image, guest, direct) -> None:
    be = make(image, direct=direct)
    try:
        dq, logmem, _ = setup_ring(be, guest)
        for i in range(5):
            dq.port.write(0x8000 + 16 * i, BlkOutHdr(BlkReqType.IN, 0, i * 8).encode())
            dq.add([Segment(0x8000 + 16 * i, 16)], [Segment(MIB + 0x10000 + i * 0x1000, 4096), Segment(0xA000 + i, 1)])
        dq.publish()
        be.kick(0)
        reply = be.handle(msg(Request.GET_VRING_BASE, VringState(0, 0).encode()))
        assert VringState.decode(reply[12:]).num == 5
        assert be.device.in_flight == 0
        assert len(dq.get_all_used()) == 5  # every taken chain is on the used ring
        pages = unpack_bitmap(logmem.array.copy(), 4096 * 8)
        assert all(pages[(MIB + 0x10000 + i * 0x1000) >> 12] for i in range(5))
        logmem.close()
    finally:
        be.disconnect()
        be.device.close()


def test_marks_before_the_log_arrives_are_replayed(image, guest) -> None:
    be = make(image)
    try:
        be.handle(msg(Request.SET_FEATURES, u64b(bit(Feature.VERSION_1) | LOG_ALL)))
        be.handle(msg(Request.SET_MEM_TABLE, encode_mem_table(regions()), [os.dup(guest.fd), os.dup(guest.fd)]))
        be.fn.port.write(MIB + 0x5000, b"x")  # a device write while LOG_ALL is on, before SET_LOG_BASE
        logmem = Memory(4096, name="log", backing="memfd")
        be.handle(msg(Request.SET_LOG_BASE, LogBase(4096, 0).encode(), [os.dup(logmem.fd)]))
        pages = unpack_bitmap(logmem.array.copy(), 4096 * 8)
        assert pages[(MIB + 0x5000) >> 12] and pages.sum() == 1
        logmem.close()
    finally:
        be.disconnect()
        be.device.close()


def test_get_config_returns_the_blk_config(image) -> None:
    be = make(image)
    try:
        reply = be.handle(msg(Request.GET_CONFIG, encode_config(0, bytes(60))))
        body = reply[12 + 12 :]
        assert len(body) == 60 and int.from_bytes(body[:8], "little") == MIB // 512
    finally:
        be.device.close()


def test_need_reply_is_acked(image) -> None:
    be = make(image)
    try:
        reply = be.handle(msg(Request.SET_OWNER, flags=1 | 8))
        assert Header.decode(reply[:12]).request == Request.SET_OWNER and decode_u64(reply[12:]) == 0
    finally:
        be.device.close()


# ============================================================================ framing
def test_reader_truncated_header_at_eof() -> None:
    r = MessageReader()
    assert r.feed(Header(1, 1, 0).encode()[:5]) == []
    with pytest.raises(VhostMessageError, match="inside a header"):
        r.eof()


def test_reader_truncated_payload_at_eof() -> None:
    r = MessageReader()
    fd = os.eventfd(0)
    assert r.feed(Header(int(Request.SET_FEATURES), 1, 8).encode() + b"\1\2\3", [fd]) == []
    with pytest.raises(VhostMessageError, match="inside the payload"):
        r.eof()
    assert closed(fd)


def test_reader_size_beyond_max_payload_refused_at_once() -> None:
    with pytest.raises(VhostMessageError, match="payload size"):
        MessageReader().feed(Header(int(Request.SET_MEM_TABLE), 1, MAX_PAYLOAD + 1).encode())


@pytest.mark.parametrize("flags,what", [(0, "version"), (2, "version"), (1 | 4, "REPLY"), (1 | 0x10, "unknown flag")])
def test_reader_bad_flags(flags, what) -> None:
    with pytest.raises(VhostMessageError, match=what):
        MessageReader().feed(Header(1, flags, 0).encode())


def test_reader_refusal_closes_the_fds_of_messages_completed_in_the_same_chunk() -> None:
    """Found by fuzz/vhost_user.py: a chunk holding a whole message with its fd and then a
    refused header.  feed() raises, so the caller never sees the first message: the reader
    must close its fd (before the fix it leaked)."""
    fd = os.eventfd(0)
    chunk = Header(int(Request.SET_VRING_KICK), 1, 8).encode() + u64b(0) + Header(1, 1 | 0x10, 0).encode()
    r = MessageReader()
    with pytest.raises(VhostMessageError, match="unknown flag"):
        r.feed(chunk, [fd])
    assert closed(fd)


def test_reader_any_chunking() -> None:
    stream = b"".join(Header(int(Request.SET_FEATURES), 1, 8).encode() + u64b(i) for i in range(5))
    for step in (1, 5, 13, len(stream)):
        r = MessageReader()
        got = []
        for i in range(0, len(stream), step):
            got += r.feed(stream[i : i + step])
        assert [decode_u64(m.payload) for m in got] == list(range(5))


@pytest.mark.parametrize("req", [r for r, rule in PAYLOAD_RULES.items() if isinstance(rule.size, int)], ids=lambda r: r.name)
@pytest.mark.parametrize("delta", [-1, 1])
def test_payload_size_wrong_for_request(req, delta) -> None:
    rule = PAYLOAD_RULES[req]
    size = rule.size + delta  # type: ignore[operator]
    if size < 0:
        size = 1
    fds = [os.eventfd(0) for _ in range(max(rule.fds))]
    m = msg(req, bytes(size), fds)
    with pytest.raises(VhostMessageError, match="payload"):
        check_shape(m)


def test_unknown_request_code() -> None:
    with pytest.raises(VhostMessageError, match="unknown request code 999"):
        check_shape(msg(999))


def test_known_but_unsupported_request() -> None:
    with pytest.raises(VhostMessageError, match="POSTCOPY_ADVISE is not supported"):
        check_shape(msg(Request.POSTCOPY_ADVISE))


@pytest.mark.parametrize(
    "req,payload,nfds",
    [
        (Request.SET_OWNER, b"", 1),
        (Request.SET_LOG_BASE, LogBase(4096, 0).encode(), 0),
        (Request.SET_VRING_KICK, u64b(0), 2),
        (Request.ADD_MEM_REG, SingleRegion(MemRegion(0, 4096, 0, 0)).encode(), 0),
        (Request.SET_INFLIGHT_FD, bytes(24), 0),
        (Request.GET_INFLIGHT_FD, bytes(24), 1),
        (Request.SEND_RARP, bytes(8), 1),
    ],
    ids=["owner-with-fd", "log-without-fd", "kick-two-fds", "add-region-without-fd", "set-inflight-without-fd",
         "get-inflight-with-fd", "rarp-with-fd"],
)
def test_wrong_fd_count_refused_and_fds_closed(image, req, payload, nfds) -> None:
    be = make(image)
    fds = [os.eventfd(0) for _ in range(nfds)]
    try:
        with pytest.raises(VhostMessageError, match="fds"):
            be.handle(msg(req, payload, fds))
        assert all(closed(fd) for fd in fds)
    finally:
        be.device.close()


def test_kick_nofd_flag_disagrees_with_fds(image) -> None:
    be = make(image)
    try:
        with pytest.raises(VhostMessageError, match="no-fd flag"):
            be.handle(msg(Request.SET_VRING_KICK, u64b(VRING_FILE_NOFD), [os.eventfd(0)]))
        with pytest.raises(VhostMessageError, match="no-fd flag"):
            be.handle(msg(Request.SET_VRING_CALL, u64b(0)))
    finally:
        be.device.close()


def test_set_features_with_bits_not_offered(image) -> None:
    be = make(image)
    try:
        with pytest.raises(VhostMessageError, match="not offered"):
            be.handle(msg(Request.SET_FEATURES, u64b(1 << 63)))
        with pytest.raises(VhostMessageError, match="not offered"):
            be.handle(msg(Request.SET_PROTOCOL_FEATURES, u64b(1 << 8)))  # PAGEFAULT (postcopy)
    finally:
        be.device.close()


# ============================================================================ memory table
def _table(be: VhostUserBackend, regs: list[MemRegion], fds: list[int]) -> None:
    be.handle(msg(Request.SET_MEM_TABLE, encode_mem_table(regs), fds))


@pytest.mark.parametrize(
    "regs,match",
    [
        ([MemRegion(0, MIB, UADDR, 0), MemRegion(MIB // 2, MIB, UADDR2, 0)], "overlap in guest-physical"),
        ([MemRegion(0, MIB, UADDR, 0), MemRegion(MIB, MIB, UADDR + MIB // 2, 0)], "overlap in user"),
        ([MemRegion(0, MIB, UADDR, 2 * MIB)], "past the fd's size"),
        ([MemRegion(0, 3 * MIB, UADDR, 0)], "past the fd's size"),
        ([MemRegion((1 << 64) - 4096, 8192, UADDR, 0)], "wraps"),
        ([MemRegion(0, 0, UADDR, 0)], "memory_size 0"),
    ],
    ids=["overlap-gpa", "overlap-user", "offset-past-fd", "size-past-fd", "gpa-wraps", "empty"],
)
def test_hostile_mem_table_refused_previous_kept(image, guest, regs, match) -> None:
    be = make(image)
    try:
        _table(be, regions(), [os.dup(guest.fd), os.dup(guest.fd)])
        fds = [os.dup(guest.fd) for _ in regs]
        with pytest.raises(VhostMemoryError, match=match):
            _table(be, regs, fds)
        assert all(closed(fd) for fd in fds)
        assert [(m.gpa, m.size) for m in be.fn.memory.regions] == [(0, MIB), (MIB, MIB)]
        assert be.fn.memory.read(MIB, 4) == guest.read(MIB, 4)
    finally:
        be.disconnect()
        be.device.close()


@pytest.mark.parametrize(
    "payload,match",
    [
        ((0).to_bytes(4, "little") + bytes(4), "nregions"),
        ((9).to_bytes(4, "little") + bytes(4) + bytes(9 * 32), "nregions"),
        ((2).to_bytes(4, "little") + bytes(4) + bytes(32), "needs 72 bytes"),
        (bytes(6), "needs 8 bytes"),
    ],
    ids=["zero-regions", "nine-regions", "fewer-regions-than-claimed", "short-header"],
)
def test_malformed_mem_table_payload(image, payload, match) -> None:
    be = make(image)
    fd = os.eventfd(0)
    try:
        with pytest.raises(VhostMessageError, match=match):
            be.handle(msg(Request.SET_MEM_TABLE, payload, [fd]))
        assert closed(fd)
    finally:
        be.device.close()


def test_mem_table_fd_count_differs_from_regions(image, guest) -> None:
    be = make(image)
    try:
        with pytest.raises(VhostMemoryError, match="2 regions but 1 fds"):
            _table(be, regions(), [os.dup(guest.fd)])
    finally:
        be.device.close()


def test_add_mem_reg_overlapping_existing_and_rem_unknown(image, guest) -> None:
    be = make(image)
    try:
        be.handle(msg(Request.ADD_MEM_REG, SingleRegion(MemRegion(0, MIB, UADDR, 0)).encode(), [os.dup(guest.fd)]))
        fd = os.dup(guest.fd)
        with pytest.raises(VhostMemoryError, match="overlap"):
            be.handle(msg(Request.ADD_MEM_REG, SingleRegion(MemRegion(4096, MIB, UADDR2, 0)).encode(), [fd]))
        assert closed(fd)
        with pytest.raises(VhostMemoryError, match="no region"):
            be.handle(msg(Request.REM_MEM_REG, SingleRegion(MemRegion(MIB, MIB, UADDR2, 0)).encode()))
        be.handle(msg(Request.REM_MEM_REG, SingleRegion(MemRegion(0, MIB, UADDR, 0)).encode()))
        assert be.fn.memory.regions == ()
    finally:
        be.disconnect()
        be.device.close()


def test_memory_map_access_rules(guest) -> None:
    gm = GuestMemoryMap("t")
    gm.set_table([MemRegion(0, MIB, UADDR, 0), MemRegion(MIB, MIB, UADDR2, MIB)], [os.dup(guest.fd), os.dup(guest.fd)])
    gm2 = GuestMemoryMap("gap")
    gm2.set_table([MemRegion(0, 4096, UADDR, 0), MemRegion(8192, 4096, UADDR2, 8192)], [os.dup(guest.fd), os.dup(guest.fd)])
    try:
        guest.cpu.write(MIB - 2, b"abcd")
        assert gm.read(MIB - 2, 4) == b"abcd"  # crosses into the adjacent region
        with pytest.raises(MemoryAccessError):
            gm.read(2 * MIB - 1, 2)
        with pytest.raises(MemoryAccessError):
            gm2.read(4094, 4)  # runs into the gap
        assert gm.user_to_gpa(UADDR2 + 16, 4) == MIB + 16
        with pytest.raises(MemoryAccessError):
            gm.user_to_gpa(UADDR + MIB - 2, 4)  # not inside one region in user space
    finally:
        gm.close()
        gm2.close()


# ============================================================================ log base
@pytest.mark.parametrize(
    "size,offset,match", [(8192, 0, "past the fd's size"), (4096, 4096, "past the fd's size"), (0, 0, "mmap_size 0")]
)
def test_hostile_log_base_refused(image, size, offset, match) -> None:
    be = make(image)
    logmem = Memory(4096, name="log", backing="memfd")
    fd = os.dup(logmem.fd)
    try:
        with pytest.raises(VhostLogError, match=match):
            be.handle(msg(Request.SET_LOG_BASE, LogBase(size, offset).encode(), [fd]))
        assert closed(fd) and be.log is None
    finally:
        logmem.close()
        be.device.close()


# ============================================================================ rings
def test_vring_address_outside_all_regions_refused_at_start(image, guest) -> None:
    be = make(image)
    try:
        _table(be, regions(), [os.dup(guest.fd), os.dup(guest.fd)])
        be.handle(msg(Request.SET_VRING_NUM, VringState(0, QSIZE).encode()))
        be.handle(msg(Request.SET_VRING_ADDR, VringAddr(0, 0, g2u(DESC), UADDR + 4 * MIB, g2u(AVAIL), 0).encode()))
        with pytest.raises(VhostRingError, match="used ring at user address .* outside every memory region"):
            be.handle(msg(Request.SET_VRING_KICK, u64b(0), [os.eventfd(0)]))
        assert be.fn.rings[0].state is RingState.STOPPED and not be.fn.queues[0].enabled
    finally:
        be.disconnect()
        be.device.close()


def test_vring_descriptor_table_straddling_region_end_refused(image, guest) -> None:
    be = make(image)
    try:
        _table(be, regions(), [os.dup(guest.fd), os.dup(guest.fd)])
        be.handle(msg(Request.SET_VRING_NUM, VringState(0, QSIZE).encode()))
        be.handle(msg(Request.SET_VRING_ADDR, VringAddr(0, 0, UADDR + MIB - 64, g2u(USED), g2u(AVAIL), 0).encode()))
        with pytest.raises(VhostRingError, match="descriptor table"):
            be.handle(msg(Request.SET_VRING_KICK, u64b(0), [os.eventfd(0)]))
    finally:
        be.disconnect()
        be.device.close()


def test_log_guest_addr_not_the_used_ring(image, guest) -> None:
    be = make(image)
    try:
        _table(be, regions(), [os.dup(guest.fd), os.dup(guest.fd)])
        with pytest.raises(VhostRingError, match="log_guest_addr"):
            be.handle(msg(Request.SET_VRING_ADDR, VringAddr(0, 1, g2u(DESC), g2u(USED), g2u(AVAIL), USED + 4096).encode()))
    finally:
        be.disconnect()
        be.device.close()


@pytest.mark.parametrize(
    "req,payload,match",
    [
        (Request.SET_VRING_NUM, VringState(5, 16).encode(), "ring 5 does not exist"),
        (Request.SET_VRING_NUM, VringState(0, 24).encode(), "power of two"),
        (Request.SET_VRING_NUM, VringState(0, 2048).encode(), "power of two"),
        (Request.SET_VRING_BASE, VringState(0, 1 << 16).encode(), "u16"),
        (Request.SET_VRING_ENABLE, VringState(0, 2).encode(), "0 or 1"),
        (Request.SET_VRING_ADDR, VringAddr(0, 2, 0, 0, 0, 0).encode(), "unknown flags"),
        (Request.GET_VRING_BASE, VringState(1, 0).encode(), "ring 1 does not exist"),
    ],
    ids=["index", "size-24", "size-2048", "base-u17", "enable-2", "addr-flags", "get-base-index"],
)
def test_hostile_vring_values(image, req, payload, match) -> None:
    be = make(image)
    try:
        with pytest.raises(VhostRingError, match=match):
            be.handle(msg(req, payload))
    finally:
        be.device.close()


def test_vring_addresses_changed_while_running_refused(image, guest) -> None:
    be = make(image)
    try:
        setup_ring(be, guest, log=False)
        with pytest.raises(VhostRingError, match="changed while the ring runs"):
            be.handle(msg(Request.SET_VRING_ADDR, VringAddr(0, 0, g2u(DESC + 4096), g2u(USED), g2u(AVAIL), 0).encode()))
        # the log flag alone may change on a running ring (what QEMU does when migration starts)
        be.handle(msg(Request.SET_VRING_ADDR, VringAddr(0, 1, g2u(DESC), g2u(USED), g2u(AVAIL), USED).encode()))
        assert be.fn.rings[0].log_used
    finally:
        be.disconnect()
        be.device.close()


def test_ring_starts_enabled_without_protocol_features(image, guest) -> None:
    be = make(image)
    try:
        be.handle(msg(Request.SET_FEATURES, u64b(bit(Feature.VERSION_1))))
        _table(be, regions(), [os.dup(guest.fd), os.dup(guest.fd)])
        be.handle(msg(*_INPUT_MSG[RingInput.ADDR][:2]))
        be.handle(msg(Request.SET_VRING_KICK, u64b(0), [os.eventfd(0)]))
        assert be.fn.queues[0].enabled
    finally:
        be.disconnect()
        be.device.close()


_INPUT_MSG = {
    RingInput.NUM: (Request.SET_VRING_NUM, VringState(0, QSIZE).encode(), 0),
    RingInput.ADDR: (Request.SET_VRING_ADDR, VringAddr(0, 0, g2u(DESC), g2u(USED), g2u(AVAIL), 0).encode(), 0),
    RingInput.BASE: (Request.SET_VRING_BASE, VringState(0, 0).encode(), 0),
    RingInput.KICK: (Request.SET_VRING_KICK, u64b(0), 1),
    RingInput.CALL: (Request.SET_VRING_CALL, u64b(0), 1),
    RingInput.ERR: (Request.SET_VRING_ERR, u64b(0), 1),
    RingInput.ENABLE: (Request.SET_VRING_ENABLE, VringState(0, 1).encode(), 0),
    RingInput.GET_BASE: (Request.GET_VRING_BASE, VringState(0, 0).encode(), 0),
}


@pytest.mark.parametrize("state", list(RingState), ids=lambda s: s.value)
@pytest.mark.parametrize("inp", list(RingInput), ids=lambda i: i.value)
def test_ring_transition_table_every_pair(image, guest, state, inp) -> None:
    be = make(image)
    try:
        if state is RingState.STARTED:
            setup_ring(be, guest, log=False)
        else:
            be.handle(msg(Request.SET_FEATURES, u64b(bit(Feature.VERSION_1) | PROTO)))
            _table(be, regions(), [os.dup(guest.fd), os.dup(guest.fd)])
            be.handle(msg(*_INPUT_MSG[RingInput.ADDR][:2]))
        req, payload, nfds = _INPUT_MSG[inp]
        m = msg(req, payload, [os.eventfd(0) for _ in range(nfds)])
        action = RING_TRANSITIONS.get((state, inp))
        if action is None:
            with pytest.raises(VhostRingError, match=f"while it is {state.value}"):
                be.handle(m)
            assert be.fn.rings[0].state is state
            return
        be.handle(m)
        after = be.fn.rings[0].state
        if action is RingAction.START:
            assert after is RingState.STARTED and be.fn.queues[0].enabled is False  # enabled only by ENABLE
        elif action is RingAction.STOP:
            assert after is RingState.STOPPED and not be.fn.queues[0].enabled
        else:
            assert after is state
    finally:
        be.disconnect()
        be.device.close()


# ============================================================================ server over a socket
def _send(sock: socket.socket, data: bytes, fds: list[int] = ()) -> None:  # type: ignore[assignment]
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, np.array(fds, dtype=np.int32).tobytes())])
    else:
        sock.sendall(data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            return out
        out += chunk
    return out


def test_server_closes_on_hostile_message_and_serves_reconnect(image, tmp_path) -> None:
    dev = BlkDevice(image)
    srv = VhostUserServer(str(tmp_path / "vu.sock"), dev)
    srv.start()
    try:
        hostile = [
            Header(int(Request.SET_MEM_TABLE), 1, MAX_PAYLOAD + 1).encode(),  # size beyond any payload
            Header(int(Request.SET_VRING_NUM), 1, 12).encode() + bytes(12),  # wrong size for the request
            Header(777, 1, 0).encode(),  # unknown request
            Header(int(Request.GET_FEATURES), 1, 0).encode()[:7],  # truncated header, then close
        ]
        for data in hostile:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(srv.path)
                _send(s, data)
                if len(data) == 7:
                    s.shutdown(socket.SHUT_WR)
                s.settimeout(10)
                assert _recv_exact(s, 1) == b""  # the back-end closed the connection, no reply
        # the process still serves: a well-formed conversation on a new connection
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            deadline = time.monotonic() + 10
            while True:
                try:
                    s.connect(srv.path)
                    break
                except OSError:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
            s.settimeout(10)
            _send(s, Header(int(Request.GET_FEATURES), 1, 0).encode())
            reply = _recv_exact(s, 20)
            assert Header.decode(reply[:12]) == Header(int(Request.GET_FEATURES), 5, 8)
            assert decode_u64(reply[12:]) & LOG_ALL
            logmem = Memory(4096, name="log", backing="memfd")
            _send(s, Header(int(Request.SET_LOG_BASE), 1, 16).encode() + LogBase(4096, 0).encode(), [logmem.fd])
            assert Header.decode(_recv_exact(s, 20)[:12]).request == Request.SET_LOG_BASE
            logmem.close()
        assert len(srv.refusals) == 4 and srv.connections == 5
    finally:
        srv.stop()
        srv.close()
        dev.close()


def _get_features(s: socket.socket) -> int:
    _send(s, Header(int(Request.GET_FEATURES), 1, 0).encode())
    reply = _recv_exact(s, 20)
    assert Header.decode(reply[:12]) == Header(int(Request.GET_FEATURES), 5, 8), reply
    return decode_u64(reply[12:])


@pytest.mark.slow  # 0.3 s or more: out of the one-minute fast subset (CI runs it)
def test_silent_front_end_holds_only_its_own_socket(image, tmp_path) -> None:
    """Issue 12: a front-end that connects and says nothing.  Another back-end (its own
    socket, its own device) serves its front-end as usual; on the silent one's socket a
    second front-end waits in the backlog, unanswered -- one front-end per socket
    (docs/architecture.md) -- and is served as soon as the silent one leaves."""
    image2 = tmp_path / "disk2.img"
    image2.write_bytes(bytes(MIB))
    dev_a, dev_b = BlkDevice(image), BlkDevice(image2)
    a = VhostUserServer(str(tmp_path / "a.sock"), dev_a)
    b = VhostUserServer(str(tmp_path / "b.sock"), dev_b)
    a.start()
    b.start()
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        silent.connect(a.path)
        deadline = time.monotonic() + 10
        while a.connections < 1:  # the silent front-end is A's connection now
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:  # B is not affected
            other.connect(b.path)
            other.settimeout(10)
            assert _get_features(other) & LOG_ALL
        waiting.connect(a.path)  # accepted by the kernel (backlog), not by the server
        waiting.settimeout(10)
        _send(waiting, Header(int(Request.GET_FEATURES), 1, 0).encode())
        waiting.settimeout(0.3)
        with pytest.raises(socket.timeout):  # an observation window: no answer while the silent one holds A
            waiting.recv(1)
        assert a.connections == 1
        silent.close()  # the silent front-end leaves: the waiting one is served, its request answered
        waiting.settimeout(10)
        reply = _recv_exact(waiting, 20)
        assert Header.decode(reply[:12]) == Header(int(Request.GET_FEATURES), 5, 8)
        assert a.connections == 2 and a.refusals == [] and b.refusals == []
    finally:
        silent.close()
        waiting.close()
        for srv, dev in ((a, dev_a), (b, dev_b)):
            srv.stop()
            srv.close()
            dev.close()


def test_vhost_errors_are_one_subtree() -> None:
    for e in (VhostMessageError, VhostMemoryError, VhostRingError, VhostLogError):
        assert issubclass(e, VhostUserError)


def test_guest_memory_map_offers_every_memory_port_operation() -> None:
    """GuestMemoryMap stands in for Memory behind a MemoryPort: every memory call the port makes must exist."""
    import inspect
    import re

    from virtio_lm.memory.region import MemoryPort

    used = set(re.findall(r"self\.memory\.(\w+)", inspect.getsource(MemoryPort)))
    gm = GuestMemoryMap("probe")
    assert used and not [n for n in used if not hasattr(gm, n)]


def test_guest_memory_map_atomic_or_byte(guest) -> None:
    gm = GuestMemoryMap("t")
    gm.set_table([MemRegion(0, MIB, UADDR, 0)], [os.dup(guest.fd)])
    try:
        port_writer = type("W", (), {"written": lambda self, a, b, n: None})()
        gm.atomic_or_byte(5, 0x10, port_writer)
        gm.atomic_or_byte(5, 0x01, port_writer)
        assert guest.read(5, 1) == b"\x11"
        with pytest.raises(MemoryAccessError):
            gm.atomic_or_byte(MIB, 1, port_writer)
    finally:
        gm.close()


def test_atomic_or_at_scatters_into_both_kinds_of_memory(guest) -> None:
    """Memory and GuestMemoryMap: OR a value into scattered bytes, refuse an address outside
    without touching anything, tell the writer of the span."""
    gm = GuestMemoryMap("t")
    gm.set_table([MemRegion(0, MIB, UADDR, 0)], [os.dup(guest.fd)])
    try:
        for mem, read in ((gm, guest.read), (guest, guest.read)):
            told: list[tuple[int, int]] = []
            w = type("W", (), {"written": lambda self, a, b, n: told.append((a, b))})()
            mem.atomic_or_at(np.array([7, 3 * 4096 + 1], dtype=np.int64), 0x40, w)
            mem.atomic_or_at(np.array([7], dtype=np.int64), 0x02, w)
            assert read(7, 1) == b"\x42" and read(3 * 4096 + 1, 1) == b"\x40"
            assert told == [(0, 3), (0, 0)]
            with pytest.raises(MemoryAccessError):
                mem.atomic_or_at(np.array([9, MIB if mem is gm else guest.size], dtype=np.int64), 1, w)
            assert read(9, 1) == b"\x00"
            guest.cpu.fill(0, 4 * 4096, 0)
    finally:
        gm.close()


def test_writev_writes_every_piece_or_none_in_both_kinds_of_memory(guest) -> None:
    """A chain's scatter in one call: each piece lands and marks its pages; one piece outside the
    memory refuses the whole call before any byte is written."""
    gm = GuestMemoryMap("t")
    gm.set_table([MemRegion(0, MIB, UADDR, 0)], [os.dup(guest.fd)])
    try:
        for mem in (gm, guest):
            told: list[tuple[int, int]] = []
            w = type("W", (), {"written": lambda self, a, b, n: told.append((a, b))})()
            mem.writev([(10, b"ab"), (2 * 4096 - 1, b"cd"), (50, b"")], w)
            assert guest.read(10, 2) == b"ab" and guest.read(2 * 4096 - 1, 2) == b"cd"
            assert told[:2] == [(0, 0), (1, 2)]
            with pytest.raises(MemoryAccessError):
                mem.writev([(100, b"zz"), (MIB if mem is gm else guest.size, b"!")], w)
            assert guest.read(100, 2) == b"\0\0"
            guest.cpu.fill(0, 4 * 4096, 0)
    finally:
        gm.close()


def test_readv_gathers_pieces_in_order_in_both_kinds_of_memory(guest) -> None:
    gm = GuestMemoryMap("t")
    gm.set_table([MemRegion(0, MIB, UADDR, 0)], [os.dup(guest.fd)])
    try:
        guest.cpu.write(4096 - 2, b"wxyz")
        guest.cpu.write(20, b"ab")
        for mem in (gm, guest):
            assert mem.readv([(4096 - 2, 4), (20, 2), (7, 0)]) == b"wxyzab"
            assert mem.readv([]) == b""
            with pytest.raises(MemoryAccessError):
                mem.readv([(20, 2), (MIB if mem is gm else guest.size, 1)])
    finally:
        gm.close()


def test_inline_requests_complete_during_the_kick_with_one_notification(image, guest) -> None:
    """inline_max: small requests run on the notification thread (no I/O pool at all) and a
    batch of completions is announced to the driver once."""
    be = make(image)
    try:
        be.device.inline_max = 1 << 20
        dq, logmem, call = setup_ring(be, guest)
        for i in range(4):
            dq.port.write(0x8000 + 16 * i, BlkOutHdr(BlkReqType.IN, 0, i * 8).encode())
            dq.add([Segment(0x8000 + 16 * i, 16)], [Segment(MIB + 0x10000 + i * 0x1000, 4096), Segment(0xA000 + i, 1)])
        dq.publish()
        before = be.fn.interrupts
        be.kick(0)
        assert len(dq.get_all_used()) == 4  # done when kick returns
        assert be.device.completed == 4 and be.fn.interrupts - before == 1
        for i in range(4):
            assert guest.read(MIB + 0x10000 + i * 0x1000, 4096) == image.read_bytes()[i * 4096 : (i + 1) * 4096]
        pages = unpack_bitmap(logmem.array.copy(), 4096 * 8)
        assert all(pages[(MIB + 0x10000 + i * 0x1000) >> 12] for i in range(4))  # still through the tracker
        logmem.close()
    finally:
        be.disconnect()
        be.device.close()


def test_a_region_at_an_unaligned_fd_offset_is_addressed_from_that_offset(guest) -> None:
    """mmap_offset 100 (not a page boundary): the map starts at the page below, and every access
    -- the mmap-slicing ones and the numpy-view ones alike -- lands at fd offset 100 + gpa."""
    off = 100
    guest.cpu.write(0, bytes(range(256)) * 64)
    gm = GuestMemoryMap("t")
    gm.set_table([MemRegion(0, MIB - 4096, UADDR, off)], [os.dup(guest.fd)])
    w = type("W", (), {"written": lambda self, a, b, n: None})()
    try:
        assert gm.read(0, 8) == guest.read(off, 8)
        assert gm.readv([(0, 4), (10, 4)]) == guest.read(off, 4) + guest.read(off + 10, 4)
        buf = bytearray(8)
        gm.readinto(0, buf)
        assert bytes(buf) == guest.read(off, 8)
        gm.write(0, b"\xaa\xbb", w)
        assert guest.read(off, 2) == b"\xaa\xbb"
        gm.writev([(4, b"\xcc"), (4096 + 3, b"\xdd")], w)
        assert guest.read(off + 4, 1) == b"\xcc" and guest.read(off + 4096 + 3, 1) == b"\xdd"
        gm.fill(8, 2, 0xEE, w)
        assert guest.read(off + 8, 2) == b"\xee\xee"
        gm.atomic_or_byte(12, 0x01, w)
        assert guest.read(off + 12, 1) == bytes([(off + 12) % 256 | 1])
        assert guest.read(0, 2) == b"\x00\x01"  # the bytes below the offset are not the region's
    finally:
        gm.close()


def test_direct_write_across_two_regions_reaches_the_image(image, guest) -> None:
    """An OUT of 3 pages whose buffers sit in both regions, pwritev'd straight from guest memory."""
    be = make(image, direct=True)
    try:
        dq, logmem, _ = setup_ring(be, guest)
        payload = bytes((7 * i) % 251 for i in range(3 * 4096))
        guest.cpu.write(0x20000, payload[:4096])
        guest.cpu.write(MIB + 0x4000, payload[4096:])
        dq.port.write(0x8000, BlkOutHdr(BlkReqType.OUT, 0, 16).encode())
        dq.add([Segment(0x8000, 16), Segment(0x20000, 4096), Segment(MIB + 0x4000, 2 * 4096)], [Segment(0x9000, 1)])
        dq.publish()
        be.kick(0)
        assert be.device.wait_idle(5)
        assert dq.get_used() is not None and guest.read(0x9000, 1)[0] == BlkStatus.OK
        assert image.read_bytes()[16 * 512 : 16 * 512 + 3 * 4096] == payload
        assert be.device.direct_runs == 1
        logmem.close()
    finally:
        be.disconnect()
        be.device.close()
