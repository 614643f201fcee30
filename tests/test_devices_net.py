"""virtio-net VF: control commands (both formats), TX/RX, filters, MQ, hostile input, TAP.

Frames are injected with ``NetDevice.receive`` (the back-end's delivery
entry point) where the test is about the device's rules, and go through the
embedded switch to a peer where the test is about the path.
"""

from __future__ import annotations

import socket
import time

import pytest

from virtio_lm.devices.net import MAC_TABLE_ENTRIES, NET_FEATURES, NetDevice
from virtio_lm.drivers.net_driver import DEFAULT_WANTED, GENERIC_CTRL, NetDriver
from virtio_lm.errors import (
    BackendError,
    BackendUnavailableError,
    ControlCommandError,
    FeaturesNotAcceptedError,
)
from virtio_lm.net.backends import TapBackend, UdpSwitchPort
from virtio_lm.net.peer import NetPeer, parse_seq, seq_frame
from virtio_lm.net.switch import L2Switch
from virtio_lm.net.testbed import NetVm, make_vm
from virtio_lm.pci.function import CONFIG_INTERRUPT
from virtio_lm.virtqueue.device import Segment
from virtio_lm.virtqueue.driver import Allocator
from virtio_lm.wire.codec import u16
from virtio_lm.wire.ctrl import Ack, VfState
from virtio_lm.wire.features import Feature, ProposalFeature, bit
from virtio_lm.wire.net import (
    BROADCAST_MAC,
    ETHERTYPE_VLAN,
    AnnounceCmd,
    CtrlClass,
    MacCmd,
    MacTables,
    MqCmd,
    NetFeature,
    NetHdrV1,
    NetStatus,
    RxCmd,
    VlanCmd,

)
from virtio_lm.wire.netstate import ETHERTYPE_SEQ, RxModeFlags

PEER_MAC = bytes.fromhex("02aabbccdd01")
OTHER_MAC = bytes.fromhex("02aabbccdd02")
MCAST_A = bytes.fromhex("01005e000001")
MCAST_B = bytes.fromhex("01005e000002")
WAIT = 10.0


def wait_until(pred, what="condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + WAIT
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


@pytest.fixture(params=["plain", "generic"])
def fmt(request):  # type: ignore[no-untyped-def]
    return request.param


def wanted_for(fmt: str, base: int = DEFAULT_WANTED) -> int:
    return base | (GENERIC_CTRL if fmt == "generic" else 0)


@pytest.fixture
def vm(fmt):  # type: ignore[no-untyped-def]
    v = make_vm(None, max_pairs=4, with_pf=False)
    v.bring_up(wanted_for(fmt), queue_size=16)
    yield v
    v.close()


def frame_to(dst: bytes, seq: int = 0, src: bytes = PEER_MAC) -> bytes:
    return seq_frame(dst, src, 1, seq)


def received_seqs(drv: NetDriver) -> list[int]:
    out = []
    for _, f in drv.receive():
        p = parse_seq(f)
        assert p is not None
        out.append(p[3])
    return out


# ====================================================================== negotiation / config
def test_generic_ctrl_negotiated_only_when_asked(vm: NetVm, fmt: str) -> None:
    assert vm.drv is not None
    assert vm.drv.generic_ctrl == (fmt == "generic")
    assert vm.fn.negotiated & bit(ProposalFeature.GENERIC_CTRL_VQ_VER_1) == (GENERIC_CTRL if fmt == "generic" else 0)


def test_config_mac_status_pairs(vm: NetVm) -> None:
    drv = vm.drv
    assert drv is not None
    assert drv.mac == vm.dev.default_mac
    assert drv.max_pairs == 4
    assert drv.config_status() == NetStatus.LINK_UP
    vm.dev.set_link(False)
    assert drv.interrupts.get(CONFIG_INTERRUPT) == 1
    assert drv.config_status() == NetStatus(0)


def test_generic_ctrl_without_ctrl_vq_is_refused() -> None:
    v = make_vm(None, with_pf=False)
    try:
        drv = NetDriver(v.fn, v.mem.cpu, ring_alloc=Allocator(0x1000, 0x10000),
                        buf_alloc=Allocator(0x200000, 0x100000))
        with pytest.raises(FeaturesNotAcceptedError):
            drv.bring_up(bit(Feature.VERSION_1) | bit(NetFeature.MAC) | GENERIC_CTRL)
        assert "GENERIC_CTRL_VQ_VER_1 requires CTRL_VQ" in (v.fn.features_refusal or "")
    finally:
        v.close()


def test_without_mq_control_queue_is_queue_2() -> None:
    v = make_vm(None, max_pairs=4, with_pf=False)
    try:
        drv = v.bring_up(DEFAULT_WANTED & ~bit(NetFeature.MQ), queue_size=16)
        assert drv.ctrl_queue == 2 and v.dev.ctrl_queue() == 2
        drv.set_promisc(False)
        assert not v.dev.rx_mode & RxModeFlags.PROMISC
    finally:
        v.close()


# ====================================================================== control commands
def test_rx_promisc_and_allmulti_ok(vm: NetVm) -> None:
    drv = vm.drv
    assert drv is not None
    assert vm.dev.rx_mode == RxModeFlags.PROMISC  # the reset default
    drv.set_promisc(False)
    drv.set_allmulti(True)
    assert vm.dev.rx_mode == RxModeFlags.ALLMULTI
    drv.set_allmulti(False)
    assert vm.dev.rx_mode == RxModeFlags(0)


@pytest.mark.parametrize(
    "readable",
    [
        pytest.param(bytes((CtrlClass.RX, RxCmd.PROMISC, 2)), id="onoff-2"),
        pytest.param(bytes((CtrlClass.RX, RxCmd.PROMISC)), id="onoff-missing"),
        pytest.param(bytes((CtrlClass.RX, RxCmd.PROMISC, 0, 0)), id="onoff-trailing"),
        pytest.param(bytes((CtrlClass.RX, RxCmd.ALLUNI, 1)), id="rx-extra-not-negotiated"),
        pytest.param(bytes((CtrlClass.RX, 9, 1)), id="rx-unknown-command"),
        pytest.param(bytes((CtrlClass.MAC, MacCmd.ADDR_SET)) + MCAST_A, id="addr-group"),
        pytest.param(bytes((CtrlClass.MAC, MacCmd.ADDR_SET)) + PEER_MAC[:5], id="addr-short"),
        pytest.param(bytes((CtrlClass.MAC, MacCmd.TABLE_SET)) + u16(1), id="table-truncated-count"),
        pytest.param(bytes((CtrlClass.MAC, MacCmd.TABLE_SET)) + (5).to_bytes(4, "little") + PEER_MAC, id="table-count-too-big"),
        pytest.param(bytes((CtrlClass.MAC, MacCmd.TABLE_SET)) + MacTables((), ()).encode() + b"x", id="table-trailing"),
        pytest.param(
            bytes((CtrlClass.MAC, MacCmd.TABLE_SET))
            + MacTables(tuple(bytes((2, 0, 0, 0, 0, i)) for i in range(MAC_TABLE_ENTRIES + 1)), ()).encode(),
            id="table-65-entries",
        ),
        pytest.param(bytes((CtrlClass.VLAN, VlanCmd.ADD)) + u16(4096), id="vlan-4096"),
        pytest.param(bytes((CtrlClass.VLAN, VlanCmd.ADD)) + b"\x01", id="vlan-short"),
        pytest.param(bytes((CtrlClass.ANNOUNCE, AnnounceCmd.ACK)), id="announce-ack-not-pending"),
        pytest.param(bytes((CtrlClass.ANNOUNCE, AnnounceCmd.ACK, 0)), id="announce-ack-with-data"),
        pytest.param(bytes((CtrlClass.MQ, MqCmd.VQ_PAIRS_SET)) + u16(5), id="mq-above-max"),
        pytest.param(bytes((CtrlClass.MQ, MqCmd.VQ_PAIRS_SET)) + u16(0), id="mq-zero"),
        pytest.param(bytes((CtrlClass.MQ, MqCmd.RSS_CONFIG)), id="mq-rss-not-implemented"),
        pytest.param(bytes((CtrlClass.GUEST_OFFLOADS, 0)) + bytes(8), id="guest-offloads"),
        pytest.param(bytes((42, 0)), id="unknown-class"),
        pytest.param(bytes((128, 0)), id="class-128-on-a-vf"),
        pytest.param(bytes((CtrlClass.RX,)), id="one-byte"),
        pytest.param(b"", id="no-readable"),
    ],
)
def test_malformed_control_buffer_err_and_device_goes_on(vm: NetVm, readable: bytes) -> None:
    drv = vm.drv
    assert drv is not None
    before = (vm.dev.mac, vm.dev.rx_mode, vm.dev.unicast, vm.dev.multicast, set(vm.dev.vlans), vm.dev.curr_pairs)
    assert drv.ctrl_raw(readable, 1) is Ack.ERR
    assert vm.dev.last_ctrl_error
    after = (vm.dev.mac, vm.dev.rx_mode, vm.dev.unicast, vm.dev.multicast, set(vm.dev.vlans), vm.dev.curr_pairs)
    assert after == before
    assert not vm.fn.needs_reset
    drv.set_promisc(False)  # the next command works
    assert not vm.dev.rx_mode & RxModeFlags.PROMISC


def test_control_buffer_without_room_for_ack_gets_used_len_0(vm: NetVm) -> None:
    drv = vm.drv
    assert drv is not None
    assert drv.ctrl(CtrlClass.RX, RxCmd.PROMISC, b"\x00", writable=0) is None
    assert vm.dev.rx_mode & RxModeFlags.PROMISC  # not executed
    drv.set_promisc(False)
    assert not vm.fn.needs_reset


def test_oversized_control_buffer_err(vm: NetVm) -> None:
    drv = vm.drv
    assert drv is not None
    assert drv.ctrl_raw(bytes((CtrlClass.MAC, MacCmd.TABLE_SET)) + bytes(5000), 1) is Ack.ERR
    assert "larger than any valid" in (vm.dev.last_ctrl_error or "")


def test_ack_after_result_with_larger_writable_area(vm: NetVm) -> None:
    drv = vm.drv
    assert drv is not None
    assert drv.ctrl(CtrlClass.RX, RxCmd.PROMISC, b"\x00", writable=8) is Ack.OK  # used_len 1 either way


def test_mac_table_set(vm: NetVm) -> None:
    drv = vm.drv
    assert drv is not None
    drv.set_mac_table([OTHER_MAC], [MCAST_A])
    assert vm.dev.unicast == (OTHER_MAC,) and vm.dev.multicast == (MCAST_A,)
    drv.set_mac_table([], [])
    assert vm.dev.unicast == () and vm.dev.multicast == ()


def test_mac_addr_set_updates_config(vm: NetVm) -> None:
    drv = vm.drv
    assert drv is not None
    new = bytes.fromhex("525400abcdef")
    drv.set_mac(new)
    assert drv.read_mac() == new and vm.dev.mac == new


def test_vlan_add_del(vm: NetVm) -> None:
    drv = vm.drv
    assert drv is not None
    drv.vlan_add(100)
    drv.vlan_add(4095)
    drv.vlan_del(100)
    drv.vlan_del(7)  # absent: nothing to do, OK
    assert vm.dev.vlans == {4095}


def test_announce_ack_clears_pending(vm: NetVm) -> None:
    drv = vm.drv
    assert drv is not None
    vm.dev.announce()
    assert drv.config_status() & NetStatus.ANNOUNCE
    assert drv.poll()  # sends the gratuitous RARP and acks
    assert not drv.config_status() & NetStatus.ANNOUNCE
    assert vm.dev.stats["announce_acked"] == 1
    with pytest.raises(ControlCommandError):
        drv.announce_ack()  # nothing pending any more


def test_mq_pairs_set(vm: NetVm) -> None:
    drv = vm.drv
    assert drv is not None
    drv.set_pairs(4)
    assert vm.dev.curr_pairs == 4
    drv.set_pairs(1)
    assert vm.dev.curr_pairs == 1


@pytest.mark.parametrize(
    "missing, call",
    [
        (NetFeature.CTRL_RX, lambda d: d.set_promisc(False)),
        (NetFeature.CTRL_RX, lambda d: d.set_mac_table([], [])),
        (NetFeature.CTRL_MAC_ADDR, lambda d: d.set_mac(bytes.fromhex("525400000001"))),
        (NetFeature.CTRL_VLAN, lambda d: d.vlan_add(1)),
        (NetFeature.MQ, lambda d: d.set_pairs(1)),
    ],
    ids=["rx", "mac-table", "mac-addr", "vlan", "mq"],
)
def test_command_of_feature_not_negotiated_err(fmt: str, missing: int, call) -> None:  # type: ignore[no-untyped-def]
    v = make_vm(None, max_pairs=2, with_pf=False)
    try:
        drv = v.bring_up(wanted_for(fmt, DEFAULT_WANTED & ~bit(missing)), queue_size=16)
        with pytest.raises(ControlCommandError):
            call(drv)
        assert "not negotiated" in (v.dev.last_ctrl_error or "")
    finally:
        v.close()


# ====================================================================== receive filters
def test_filters_unicast_multicast_broadcast(vm: NetVm) -> None:
    drv, dev = vm.drv, vm.dev
    assert drv is not None
    me = dev.mac
    drv.set_promisc(False)
    drv.set_mac_table([OTHER_MAC], [MCAST_A])
    cases = [(me, True), (OTHER_MAC, True), (PEER_MAC, False), (BROADCAST_MAC, True), (MCAST_A, True), (MCAST_B, False)]
    for seq, (dst, ok) in enumerate(cases):
        assert dev.receive(frame_to(dst, seq)) is ok, dst.hex()
    assert received_seqs(drv) == [i for i, (_, ok) in enumerate(cases) if ok]
    assert dev.stats["rx_filtered"] == 2
    drv.set_allmulti(True)
    assert dev.receive(frame_to(MCAST_B, 10))
    drv.set_promisc(True)
    assert dev.receive(frame_to(PEER_MAC, 11))
    assert received_seqs(drv) == [10, 11]


def vlan_frame(dst: bytes, vid: int, seq: int) -> bytes:
    inner = seq_frame(dst, PEER_MAC, 1, seq)
    return inner[:12] + ETHERTYPE_VLAN.to_bytes(2, "big") + vid.to_bytes(2, "big") + inner[12:]


def test_vlan_filter(vm: NetVm) -> None:
    drv, dev = vm.drv, vm.dev
    assert drv is not None
    drv.set_promisc(False)
    assert not dev.receive(vlan_frame(dev.mac, 100, 0))
    drv.vlan_add(100)
    assert dev.receive(vlan_frame(dev.mac, 100, 1))
    assert not dev.receive(vlan_frame(dev.mac, 101, 2))
    assert dev.receive(frame_to(dev.mac, 3))  # untagged always passes
    frames = [f for _, f in drv.receive()]
    assert len(frames) == 2 and frames[0][12:16] == bytes((0x81, 0, 0, 100))


def test_vlan_tags_pass_without_ctrl_vlan() -> None:
    v = make_vm(None, with_pf=False)
    try:
        drv = v.bring_up(DEFAULT_WANTED & ~bit(NetFeature.CTRL_VLAN), queue_size=16)
        drv.set_promisc(False)
        assert v.dev.receive(vlan_frame(v.dev.mac, 5, 0))
    finally:
        v.close()


# ====================================================================== RX buffers
def test_rx_no_buffer_dropped_and_counted() -> None:
    v = make_vm(None, with_pf=False)
    try:
        drv = v.bring_up(queue_size=4)
        got = [v.dev.receive(frame_to(v.dev.mac, i)) for i in range(6)]
        assert got == [True] * 4 + [False] * 2
        assert v.dev.stats["rx_no_buffer"] == 2
        assert received_seqs(drv) == [0, 1, 2, 3]
        assert v.dev.receive(frame_to(v.dev.mac, 9))  # buffers were given back
    finally:
        v.close()


def test_rx_buffer_too_small_returned_empty() -> None:
    v = make_vm(None, with_pf=False)
    try:
        drv = NetDriver(v.fn, v.mem.cpu, ring_alloc=Allocator(0x1000, 0x100000),
                        buf_alloc=Allocator(0x200000, 0x400000), rx_buf_size=40)
        v.fn.on_interrupt = drv.on_interrupt
        drv.bring_up(queue_size=8)
        assert not v.dev.receive(frame_to(v.dev.mac, 0))  # 12 + 64 > 40
        assert v.dev.stats["rx_buffer_too_small"] == 1
        assert drv.receive() == []
        assert drv.counters["rx_length_errors"] == 1
        assert not v.fn.needs_reset
    finally:
        v.close()


def test_rx_header_num_buffers_1(vm: NetVm) -> None:
    drv, dev = vm.drv, vm.dev
    assert drv is not None
    dq = drv.tr.queues[0]
    assert dev.receive(frame_to(dev.mac, 0))
    token, used_len = dq.get_used()  # type: ignore[misc]
    raw = vm.mem.read(token[1], used_len)  # type: ignore[index]
    assert NetHdrV1.decode(raw[:12]) == NetHdrV1(num_buffers=1)
    assert used_len == 12 + 64


# ====================================================================== hostile TX
@pytest.mark.parametrize(
    "payload, counter",
    [
        pytest.param(bytes(12 + 10), "tx_malformed", id="shorter-than-eth-header"),
        pytest.param(bytes((0, 2)) + bytes(10) + frame_to(PEER_MAC), "tx_bad_header", id="gso-type-2"),
        pytest.param(bytes((1, 0)) + bytes(10) + frame_to(PEER_MAC), "tx_bad_header", id="needs-csum-not-offered"),
        pytest.param(bytes((0, 1)) + bytes(10) + frame_to(PEER_MAC), "tx_bad_header", id="gso-tcpv4-not-offered"),
    ],
)
def test_bad_tx_chain_dropped_completed_counted(vm: NetVm, payload: bytes, counter: str) -> None:
    drv, dev = vm.drv, vm.dev
    assert drv is not None
    buf = drv.buf_alloc.alloc(len(payload))
    vm.mem.cpu.write(buf, payload)
    dq = drv.tr.queues[1]
    dq.add([Segment(buf, len(payload))], [], token=("tx", buf))
    drv.tr.kick(1)
    wait_until(lambda: dq.in_flight() == 0 or bool(dq.get_all_used()), "completion")
    assert dev.stats[counter] == 1
    assert dev.stats["tx_frames"] == 0
    assert not vm.fn.needs_reset


def test_tx_without_backend_completes(vm: NetVm) -> None:
    drv = vm.drv
    assert drv is not None
    drv.send(frame_to(PEER_MAC))
    wait_until(lambda: drv.reap_tx() == 1 or drv.tx_in_flight() == 0)
    assert vm.dev.stats["tx_no_backend"] == 1


# ====================================================================== through the switch
@pytest.fixture
def net():  # type: ignore[no-untyped-def]
    sw = L2Switch(idle_timeout=60).start()
    peer = NetPeer(sw.address, PEER_MAC)
    yield sw, peer
    peer.close()
    sw.stop()


def test_tx_rx_through_switch(net) -> None:  # type: ignore[no-untyped-def]
    sw, peer = net
    v = make_vm(UdpSwitchPort(sw.address, name="vm"))
    try:
        drv = v.bring_up(queue_size=64)
        frames = [seq_frame(PEER_MAC, drv.mac, 7, i, size=60 + i) for i in range(50)]
        drv.send_many(frames)
        assert peer.wait_count(drv.mac, 50, WAIT)
        assert peer.seqs_from(drv.mac) == list(range(50))
        wait_until(lambda: (drv.reap_tx(), drv.tx_in_flight() == 0)[1], "tx completions")
        assert v.dev.stats["tx_frames"] == 50
        peer.send_seq(drv.mac, 40)
        got: list[int] = []
        wait_until(lambda: (got.extend(received_seqs(drv)), len(got) >= 40)[1], "rx")
        assert got == list(range(40))
        assert sw.lookup(drv.mac) == v.dev.backend.local_addr  # type: ignore[union-attr]
    finally:
        v.close()


@pytest.mark.parametrize("inline_max", [0, 2048], ids=["pool", "inline"])
def test_tx_inline_when_small_and_the_backend_ready(net, inline_max) -> None:  # type: ignore[no-untyped-def]
    """inline_max: a frame no larger goes out during the kick, on the notification thread; the
    rest (larger, or the back-end paused) through the pool, in order all the same."""
    sw, peer = net
    port = UdpSwitchPort(sw.address, name="vm")
    v = make_vm(port)
    v.dev.inline_max = inline_max
    try:
        drv = v.bring_up(queue_size=64)
        drv.send_many([seq_frame(PEER_MAC, drv.mac, 7, i, size=60) for i in range(10)])
        drv.send(seq_frame(PEER_MAC, drv.mac, 7, 10, size=inline_max + 100 if inline_max else 1000))
        assert peer.wait_count(drv.mac, 11, WAIT)
        assert peer.seqs_from(drv.mac) == list(range(11))
        # a pool thread counts its frame after the send: the peer may have it first
        wait_until(lambda: v.dev.stats["tx_frames"] == 11, "the last frame counted")
        assert v.dev.stats["tx_inline"] == (10 if inline_max else 0)
        port.pause_tx()  # not ready: the pool's work waits for credit, nothing goes inline
        drv.send(seq_frame(PEER_MAC, drv.mac, 7, 11, size=60))
        wait_until(lambda: v.dev.in_flight == 1, "the paused frame taken")
        assert v.dev.stats["tx_inline"] == (10 if inline_max else 0) and v.dev.stats["tx_frames"] == 11
        port.resume_tx()
        assert peer.wait_count(drv.mac, 12, WAIT)
        wait_until(lambda: (drv.reap_tx(), drv.tx_in_flight() == 0)[1], "tx completions")
    finally:
        v.close()


@pytest.mark.parametrize("fast", [True, False], ids=["c-fast-path", "python"])
def test_tx_inline_send_error_is_counted_and_the_chain_completes(net, monkeypatch, fast) -> None:  # type: ignore[no-untyped-def]
    sw, peer = net
    port = UdpSwitchPort(sw.address, name="vm")
    v = make_vm(port)
    v.dev.inline_max = 2048
    v.dev.fast_path = fast

    def broken(frame: bytes) -> None:
        raise BackendError("vm: send to switch failed: [Errno 105] No buffer space available")

    try:
        drv = v.bring_up(queue_size=64)
        monkeypatch.setattr(port, "send", broken)
        monkeypatch.setattr(port, "send_many", broken)
        drv.send(seq_frame(PEER_MAC, drv.mac, 7, 0, size=60))
        wait_until(lambda: (drv.reap_tx(), drv.tx_in_flight() == 0)[1], "the chain completed")
        assert v.dev.stats["tx_errors"] == 1 and v.dev.stats["tx_frames"] == 0 and v.dev.in_flight == 0
        assert v.dev.fast_served == (1 if fast else 0)
    finally:
        v.close()


def test_mq_steering_follows_tx_pair(net) -> None:  # type: ignore[no-untyped-def]
    sw, peer = net
    v = make_vm(UdpSwitchPort(sw.address, name="vm"), max_pairs=4)
    try:
        drv = v.bring_up(queue_size=32, pairs=3)
        drv.send(seq_frame(PEER_MAC, drv.mac, 7, 0), pair=2)
        assert peer.wait_count(drv.mac, 1, WAIT)
        peer.send_seq(drv.mac, 5)
        got: list[tuple[int, bytes]] = []
        wait_until(lambda: (got.extend(drv.receive()), len(got) >= 5)[1], "rx")
        assert {p for p, _ in got} == {2}
        # a MAC never transmitted to is hashed over the pairs in use
        for i in range(30):
            assert v.dev.receive(seq_frame(drv.mac, bytes((2, 0, 0, 0, 1, i)), 1, i))
        pairs = {p for p, _ in drv.receive()}
        assert pairs <= {0, 1, 2} and len(pairs) > 1
    finally:
        v.close()


# ====================================================================== quiesce semantics (unit)
def test_quiesced_rx_dropped_counted_no_dma() -> None:
    v = make_vm(None)
    try:
        drv = v.bring_up(queue_size=16)
        ctl = v.controller
        ctl.set_state(1, VfState.QUIESCED)
        before = v.fn.port.writer.bytes_written  # type: ignore[attr-defined]
        ints = dict(v.fn.interrupt_counts)
        assert not v.dev.receive(frame_to(v.dev.mac, 0))
        drv.send(frame_to(PEER_MAC, 1))  # the kick is remembered, nothing DMAs
        assert v.dev.stats["rx_dropped_quiesced"] == 1
        assert v.fn.port.writer.bytes_written == before  # type: ignore[attr-defined]
        assert v.fn.interrupt_counts == ints
        ctl.set_state(1, VfState.RUNNING)
        wait_until(lambda: drv.reap_tx() == 1 or v.dev.stats["tx_no_backend"] == 1)
        assert v.dev.receive(frame_to(v.dev.mac, 2))
        assert received_seqs(drv) == [2]
    finally:
        v.close()


# ====================================================================== TAP
def _tap_or_skip() -> TapBackend:
    try:
        return TapBackend("vlmt%d")
    except BackendUnavailableError as exc:
        pytest.skip(f"TAP back-end unavailable here: {exc.reason}")


def test_tap_tx_and_rx() -> None:
    tap = _tap_or_skip()
    try:
        sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE_SEQ))
    except (PermissionError, AttributeError, OSError) as exc:
        tap.close()
        pytest.skip(f"no AF_PACKET socket to watch the TAP interface: {exc}")
    v = make_vm(tap, with_pf=False)
    try:
        sniff.bind((tap.ifname, 0))
        sniff.settimeout(WAIT)
        drv = v.bring_up(queue_size=16)
        out = seq_frame(PEER_MAC, drv.mac, 3, 77)
        drv.send(out)
        while True:
            got = sniff.recv(65536)
            if parse_seq(got) is not None:
                break
        assert got[: len(out)] == out
        sniff.send(seq_frame(drv.mac, PEER_MAC, 3, 78))
        frames: list[int] = []
        def seqs() -> list[int]:  # the host stack may send its own frames (IPv6 RS, MLD): skip them
            return [p[3] for _, f in drv.receive() if (p := parse_seq(f)) is not None]

        wait_until(lambda: (frames.extend(seqs()), 78 in frames)[1], "frame from the host stack")
    finally:
        sniff.close()
        v.close()


def test_tap_unavailable_reason_is_typed(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import virtio_lm.net.backends as b

    def no_tun(path, flags):  # type: ignore[no-untyped-def]
        raise FileNotFoundError(path)

    monkeypatch.setattr(b.os, "open", no_tun)
    with pytest.raises(BackendUnavailableError) as ei:
        TapBackend()
    assert "does not exist" in ei.value.reason


def test_offered_features_are_the_documented_set() -> None:
    dev = NetDevice(None)
    assert dev.offered_features() == NET_FEATURES
    assert NetDevice(None, without=bit(NetFeature.GUEST_ANNOUNCE)).offered_features() == NET_FEATURES & ~bit(NetFeature.GUEST_ANNOUNCE)
    with pytest.raises(ValueError):
        NetDevice(None, mac=MCAST_A)
