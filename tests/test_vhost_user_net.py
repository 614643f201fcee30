"""vhost-user-net without QEMU: SEND_RARP (hostile and good), pairs from ring enables, GET_QUEUE_NUM,
a region added once per vhost device; the IPv4/UDP/ARP layouts and the traffic judge."""

from __future__ import annotations

import os
import threading

import pytest

from test_vhost_user_protocol import MIB, UADDR, closed, guest, image, make, msg, u64b  # noqa: F401 (fixtures)

from virtio_lm.devices.net import NetDevice
from virtio_lm.errors import (
    FieldValueError,
    ShortBufferError,
    TrailingDataError,
    VhostMemoryError,
    VhostMessageError,
    VhostRingError,
)
from virtio_lm.memory import Memory
from virtio_lm.net.udppeer import judge, runs
from virtio_lm.vhost.memmap import GuestMemoryMap
from virtio_lm.vhost.net import NET_PROTOCOL_FEATURES, VhostUserNetBackend
from virtio_lm.wire.features import Feature, bit
from virtio_lm.wire.inet import (
    UdpSeq,
    arp_reply,
    arp_request_for,
    inet_checksum,
    ipv4_addr,
    parse_udp4,
    udp4_frame,
)
from virtio_lm.wire.net import BROADCAST_MAC, parse_announce
from virtio_lm.wire.vhost_user import MemRegion, ProtocolFeature, Request, SingleRegion, VringState, decode_rarp_mac, decode_u64

MAC = bytes.fromhex("525400abcdef")
RARP = bit(ProtocolFeature.RARP)


class Port:
    """A FramePort that records what the device sends."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def attach(self, deliver) -> None:
        self.deliver = deliver

    def wait_tx_ready(self, abort: threading.Event) -> bool:
        return not abort.is_set()

    def try_tx_ready(self, abort: threading.Event) -> bool:
        return not abort.is_set()

    def send(self, frame: bytes) -> None:
        self.sent.append(frame)

    def tx_unmetered(self, abort: threading.Event) -> bool:
        return not abort.is_set()

    def send_many(self, frames: list[bytes]) -> None:
        self.sent.extend(frames)

    def wake_tx(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture
def net():
    port = Port()
    dev = NetDevice(port, max_pairs=2)
    be = VhostUserNetBackend(dev)
    yield be, port
    dev.close()


# ============================================================================ SEND_RARP
def test_send_rarp_puts_the_announce_on_the_backend(net) -> None:
    be, port = net
    be.handle(msg(Request.SET_PROTOCOL_FEATURES, u64b(RARP)))
    assert be.handle(msg(Request.SEND_RARP, MAC + b"\0\0")) is None
    assert len(port.sent) == 1 and parse_announce(port.sent[0]) == MAC and port.sent[0][:6] == BROADCAST_MAC
    assert be.rarps == 1 and be.net.stats["self_announce"] == 1


def test_send_rarp_without_the_protocol_feature_refused(net) -> None:
    be, port = net
    with pytest.raises(VhostMessageError, match="RARP was not negotiated"):
        be.handle(msg(Request.SEND_RARP, MAC + b"\0\0"))
    assert port.sent == []


def test_send_rarp_with_a_group_address_refused(net) -> None:
    be, port = net
    be.handle(msg(Request.SET_PROTOCOL_FEATURES, u64b(RARP)))
    with pytest.raises(FieldValueError, match="unicast"):
        be.handle(msg(Request.SEND_RARP, bytes.fromhex("01005e000001") + b"\0\0"))
    assert port.sent == []


@pytest.mark.parametrize("n", [0, 6, 7, 9, 16])
def test_send_rarp_payload_not_8_bytes_refused(net, n) -> None:
    be, port = net
    be.handle(msg(Request.SET_PROTOCOL_FEATURES, u64b(RARP)))
    with pytest.raises(VhostMessageError, match="SEND_RARP: payload"):
        be.handle(msg(Request.SEND_RARP, bytes(n)))
    assert port.sent == []


def test_send_rarp_to_a_blk_backend_refused(image) -> None:
    be = make(image)
    try:
        with pytest.raises(VhostMessageError, match="not offered"):
            be.handle(msg(Request.SET_PROTOCOL_FEATURES, u64b(RARP)))
        with pytest.raises(VhostMessageError, match="RARP was not negotiated"):
            be.handle(msg(Request.SEND_RARP, MAC + b"\0\0"))
    finally:
        be.device.close()


def test_decode_rarp_mac_sizes() -> None:
    assert decode_rarp_mac(MAC + b"\xff\xff") == MAC  # the 2 unused bytes are not checked
    with pytest.raises(ShortBufferError):
        decode_rarp_mac(MAC)
    with pytest.raises(TrailingDataError):
        decode_rarp_mac(MAC + bytes(3))


# ============================================================================ queues
def test_net_protocol_features_and_queue_num(net) -> None:
    be, _ = net
    assert decode_u64(be.handle(msg(Request.GET_PROTOCOL_FEATURES))[12:]) == NET_PROTOCOL_FEATURES
    assert not NET_PROTOCOL_FEATURES & bit(ProtocolFeature.CONFIG) and NET_PROTOCOL_FEATURES & RARP
    assert decode_u64(be.handle(msg(Request.GET_QUEUE_NUM))[12:]) == 2  # pairs, not rings
    assert len(be.fn.rings) == 4  # the control queue stays with the front-end


def test_ring_beyond_the_data_queues_refused(net) -> None:
    be, _ = net
    with pytest.raises(VhostRingError, match="ring 4 does not exist"):
        be.handle(msg(Request.SET_VRING_NUM, VringState(4, 256).encode()))


def test_pairs_in_use_follow_the_ring_enables(net, guest) -> None:
    """The second pair counts once both of its rings run and are enabled (QEMU's answer to the
    guest's VQ_PAIRS_SET); receive steering then spreads over two pairs."""
    from test_vhost_user_protocol import AVAIL, DESC, PROTO, USED, encode_mem_table, g2u, regions
    from virtio_lm.wire.vhost_user import VringAddr

    be, _ = net
    be.handle(msg(Request.SET_FEATURES, u64b(bit(Feature.VERSION_1) | PROTO | bit(21))))  # + VIRTIO_NET_F_MQ
    be.handle(msg(Request.SET_MEM_TABLE, encode_mem_table(regions()), [os.dup(guest.fd), os.dup(guest.fd)]))
    for r in range(4):
        off = 0x10000 * r
        be.handle(msg(Request.SET_VRING_NUM, VringState(r, 16).encode()))
        be.handle(msg(Request.SET_VRING_ADDR, VringAddr(r, 0, g2u(DESC + off), g2u(USED + off), g2u(AVAIL + off), 0).encode()))
        be.handle(msg(Request.SET_VRING_KICK, u64b(r), [os.eventfd(0)]))
    assert be.net.curr_pairs == 1  # started but not enabled (protocol features negotiated)
    for r in range(4):
        be.handle(msg(Request.SET_VRING_ENABLE, VringState(r, 1).encode()))
    assert be.net.curr_pairs == 2
    be.handle(msg(Request.SET_VRING_ENABLE, VringState(3, 0).encode()))
    assert be.net.curr_pairs == 1
    with pytest.raises(ValueError):
        be.net.set_active_pairs(3)


# ============================================================================ regions added per vhost device
def test_the_same_region_added_twice_is_one_mapping_with_two_references(guest) -> None:
    gm = GuestMemoryMap("g")
    r = MemRegion(0, MIB, UADDR, 0)
    gm.add_region(r, os.dup(guest.fd))
    second = os.dup(guest.fd)
    gm.add_region(r, second)
    assert closed(second) and gm.size == MIB
    gm.remove_region(r)
    assert gm.read(0, 4) == bytes(guest.read(0, 4))  # still mapped
    gm.remove_region(r)
    assert gm.size == 0
    with pytest.raises(VhostMemoryError, match="no region"):
        gm.remove_region(r)


def test_a_region_at_the_same_place_from_another_file_is_an_overlap(guest) -> None:
    gm = GuestMemoryMap("g")
    other = Memory(MIB, name="other", backing="memfd")
    try:
        gm.add_region(MemRegion(0, MIB, UADDR, 0), os.dup(guest.fd))
        fd = os.dup(other.fd)
        with pytest.raises(VhostMemoryError, match="overlap"):
            gm.add_region(MemRegion(0, MIB, UADDR, 0), fd)
        assert closed(fd)
    finally:
        gm.clear()
        other.close()


def test_add_mem_reg_twice_through_the_backend(net, guest) -> None:
    be, _ = net
    reg = SingleRegion(MemRegion(0, MIB, UADDR, 0)).encode()
    be.handle(msg(Request.ADD_MEM_REG, reg, [os.dup(guest.fd)]))
    be.handle(msg(Request.ADD_MEM_REG, reg, [os.dup(guest.fd)]))
    be.handle(msg(Request.REM_MEM_REG, reg))
    assert be.fn.memory.size == MIB


# ============================================================================ IPv4 / UDP / ARP
A, B = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")


def test_udp4_round_trip_and_checksum() -> None:
    payload = UdpSeq(0x554D4C56, 3, 77).encode()
    f = udp4_frame(A, B, ipv4_addr("10.0.0.1"), ipv4_addr("10.0.0.2"), 5001, 40000, payload, ident=9)
    d = parse_udp4(f)
    assert d is not None and (d.sport, d.dport, d.payload) == (5001, 40000, payload)
    assert inet_checksum(f[14:34]) == 0


@pytest.mark.parametrize("how", ["checksum", "fragment", "not-udp", "short-length", "version"])
def test_parse_udp4_ignores_bad_frames(how) -> None:
    f = bytearray(udp4_frame(A, B, ipv4_addr("10.0.0.1"), ipv4_addr("10.0.0.2"), 1, 2, b"x" * 16))
    if how == "checksum":
        f[14 + 8] ^= 1  # TTL changed, checksum not
    elif how == "fragment":
        f[14 + 6] = 0x20  # more fragments
    elif how == "not-udp":
        f[14 + 9] = 6
    elif how == "short-length":
        f[14 + 2 : 14 + 4] = (20 + 4).to_bytes(2, "big")
    else:
        f[14] = 0x65
    if how in ("fragment", "not-udp", "short-length", "version"):  # keep the header checksum right
        f[24:26] = b"\0\0"
        f[24:26] = inet_checksum(f[14 : 14 + (f[14] & 0xF) * 4]).to_bytes(2, "big")
    assert parse_udp4(bytes(f)) is None


def test_arp_request_and_reply() -> None:
    ip_a, ip_b = ipv4_addr("10.0.0.1"), ipv4_addr("10.0.0.2")
    reply = arp_reply(A, ip_a, B, ip_b)
    assert arp_request_for(reply) is None  # a reply is not a request
    req = bytearray(reply)
    req[20:22] = (1).to_bytes(2, "big")
    assert arp_request_for(bytes(req)) == (A, ip_a, ip_b)
    with pytest.raises(FieldValueError):
        ipv4_addr("10.0.0.256")


# ============================================================================ the judge (and its negative controls)
W = (100.0, 101.0)


def test_judge_accepts_loss_inside_the_window_only() -> None:
    sent_at = {0: 99.0, 1: 100.5, 2: 100.6, 3: 102.0}
    ok = judge(range(4), {0: 1, 3: 1}, W, sent_at=sent_at)
    assert ok.ok and ok.lost == [1, 2]
    bad = judge(range(4), {0: 1, 1: 1, 2: 1}, W, sent_at=sent_at)  # 3 lost after the window
    assert not bad.ok and bad.lost_outside_window == [3]


def test_judge_catches_a_duplicate() -> None:
    j = judge(range(3), {0: 1, 1: 2, 2: 1}, W, sent_at={0: 99.0, 1: 99.1, 2: 99.2})
    assert not j.ok and j.duplicates == 1


def test_judge_by_neighbours_when_send_times_are_unknown() -> None:
    arrived = {0: 99.0, 1: 99.5, 4: 100.8, 5: 101.5}
    assert judge(range(6), {0: 1, 1: 1, 4: 1, 5: 1}, W, arrived_at=arrived).ok  # gap 2..3 straddles the window
    arrived_early = {0: 90.0, 1: 90.1, 4: 90.5, 5: 101.5}  # gap 2..3 closed long before the window
    assert judge(range(6), {0: 1, 1: 1, 4: 1, 5: 1}, W, arrived_at=arrived_early).lost_outside_window == [2, 3]
    assert judge(range(3), {0: 1, 1: 1}, W, arrived_at={0: 99.0, 1: 99.1}).lost_outside_window == [2]  # the tail
    with pytest.raises(ValueError):
        judge(range(2), {0: 1}, W)


def test_runs() -> None:
    assert runs([5, 1, 2, 3, 9, 2]) == [(1, 3), (5, 5), (9, 9)]
