"""FRAMES, the switch's burst datagram (virtio_lm.wire.switch): its codec, the switch's rules over
a burst (the same as over the frames one by one), and a port sending and receiving bursts."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtio_lm.errors import FieldValueError, ShortBufferError, WireError
from virtio_lm.net.backends import UdpSwitchPort
from virtio_lm.net.peer import NetPeer, seq_frame
from virtio_lm.net.switch import L2Switch
from virtio_lm.wire.codec import u16
from virtio_lm.wire.net import ETH_HLEN
from virtio_lm.wire.switch import (
    CAP_BATCHES,
    KIND_FRAME,
    KIND_FRAMES,
    MAX_FRAME,
    decode_frames,
    frame_message,
    hello_message,
    pack_frames,
)

A = bytes.fromhex("020000000001")
B = bytes.fromhex("020000000002")
C = bytes.fromhex("020000000003")
WAIT = 10.0

frames_st = st.lists(st.binary(min_size=ETH_HLEN, max_size=300), min_size=1, max_size=40)


# ====================================================================== codec
def unpack(msgs: list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for m in msgs:
        if m[0] == KIND_FRAME:
            out.append(m[1:])
        else:
            assert m[0] == KIND_FRAMES
            out += decode_frames(m[1:])
    return out


@given(frames_st, st.integers(min_value=400, max_value=4000))
def test_pack_then_decode_gives_the_frames_back_in_order(frames, limit):
    msgs = pack_frames(frames, limit)
    assert all(len(m) <= limit for m in msgs)
    assert unpack(msgs) == frames


def test_one_frame_is_a_frame_datagram_and_a_burst_is_one_frames_datagram():
    f = seq_frame(B, A, 1, 0)
    assert pack_frames([f]) == [frame_message(f)]
    (m,) = pack_frames([f, f, f])
    assert m == bytes((KIND_FRAMES,)) + (u16(len(f)) + f) * 3


def test_a_burst_larger_than_a_datagram_is_cut():
    f = bytes(1500)
    msgs = pack_frames([f] * 100)
    assert len(msgs) == 3 and all(len(m) <= 65507 for m in msgs) and len(unpack(msgs)) == 100


@pytest.mark.parametrize("n", [ETH_HLEN - 1, MAX_FRAME + 1])
def test_pack_refuses_a_frame_out_of_range_and_packs_nothing(n):
    with pytest.raises(FieldValueError):
        pack_frames([bytes(64), bytes(n)])


@pytest.mark.parametrize(
    "body, error",
    [
        (b"", FieldValueError),  # no record
        (b"\x40", ShortBufferError),  # half a length
        (u16(64) + bytes(63), ShortBufferError),  # the frame cut short
        (u16(13) + bytes(13), FieldValueError),  # shorter than an Ethernet header
        (u16(14) + bytes(14) + b"\x00", ShortBufferError),  # a byte after the last record
        (u16(14) + bytes(14) + u16(20) + bytes(14), ShortBufferError),  # the second record cut short
    ],
    ids=["empty", "half-length", "short-frame-bytes", "runt", "trailing-byte", "second-cut"],
)
def test_decode_refuses_a_malformed_body(body, error):
    with pytest.raises(error):
        decode_frames(body)


@given(frames_st, st.data())
def test_any_cut_of_a_good_body_is_refused_or_is_a_prefix_of_whole_records(frames, data):
    (body,) = [m[1:] for m in pack_frames(frames, 65507)] if len(frames) > 1 else [u16(len(frames[0])) + frames[0]]
    cut = data.draw(st.integers(min_value=0, max_value=len(body) - 1))
    try:
        got = decode_frames(body[:cut])
    except WireError:
        return
    assert got == frames[: len(got)] and len(got) < len(frames)  # a cut exactly between records


def test_hello_carries_the_capabilities():
    assert hello_message() == b"\x01" and hello_message(CAP_BATCHES) == b"\x01\x01"


# ====================================================================== the switch's rules over a burst
class Recorder(L2Switch):
    """A switch whose sends are recorded instead of sent (sans-socket)."""

    def __init__(self) -> None:
        super().__init__(idle_timeout=60)
        self.sent: list[tuple[tuple[str, int], bytes]] = []
        real = self.sock
        outer = self

        class Sock:
            def sendto(self, data: bytes, addr) -> int:  # type: ignore[no-untyped-def]
                outer.sent.append((addr, bytes(data)))
                return len(data)

            def close(self) -> None:
                real.close()

        self.sock = Sock()  # type: ignore[assignment]

    def delivered(self) -> dict[tuple[str, int], list[bytes]]:
        out: dict[tuple[str, int], list[bytes]] = {}
        for addr, m in self.sent:
            out.setdefault(addr, []).extend(unpack([m]))
        return out


PA, PB, PC = ("127.0.0.1", 1001), ("127.0.0.1", 1002), ("127.0.0.1", 1003)


def setup(sw: Recorder, batches_at_b: bool) -> None:
    sw.handle(hello_message(), PA)
    sw.handle(hello_message(CAP_BATCHES if batches_at_b else 0), PB)
    sw.handle(hello_message(), PC)
    sw.handle(frame_message(seq_frame(A, B, 1, 0)), PB)  # B learned at b
    sw.sent.clear()


burst_st = st.lists(st.tuples(st.sampled_from([B, C, b"\xff" * 6, A]), st.sampled_from([A, C]),
                              st.integers(0, 1000)), min_size=1, max_size=30)


@given(burst_st, st.booleans())
def test_a_burst_is_routed_exactly_as_its_frames_one_by_one(burst, batches_at_b):
    frames = [seq_frame(dst, src, 1, seq) for dst, src, seq in burst]
    one, many = Recorder(), Recorder()
    try:
        setup(one, batches_at_b)
        setup(many, batches_at_b)
        for f in frames:
            one.handle(frame_message(f), PA)
        (m,) = pack_frames(frames) if len(frames) > 1 else [frame_message(frames[0])]
        many.handle(m, PA)
        assert many.delivered() == one.delivered()
        assert {k: v for k, v in many.stats.items() if k != "batches"} == dict(one.stats)
        assert [many.lookup(x) for x in (A, B, C)] == [one.lookup(x) for x in (A, B, C)]
        for addr, m in many.sent:  # bursts only to the port that takes them
            assert m[0] == KIND_FRAME or (addr == PB and batches_at_b)
    finally:
        one.stop()
        many.stop()


def test_the_comparison_sees_one_frame_routed_elsewhere():
    """Negative control for the test above: a burst whose last frame differs is seen."""
    one, many = Recorder(), Recorder()
    try:
        setup(one, True)
        setup(many, True)
        frames = [seq_frame(B, A, 1, i) for i in range(4)]
        for f in frames:
            one.handle(frame_message(f), PA)
        (m,) = pack_frames(frames[:3] + [seq_frame(C, A, 1, 3)])
        many.handle(m, PA)
        assert many.delivered() != one.delivered()
    finally:
        one.stop()
        many.stop()


def test_a_malformed_burst_is_dropped_whole_and_nothing_is_learned():
    sw = Recorder()
    try:
        setup(sw, True)
        good = u16(64) + seq_frame(B, C, 1, 0)
        sw.handle(bytes((KIND_FRAMES,)) + good + u16(64) + bytes(10), PA)
        assert sw.sent == [] and sw.stats["dropped_bad_batch"] == 1 and sw.lookup(C) is None
    finally:
        sw.stop()


# ====================================================================== ports over real sockets
def test_a_port_sends_a_burst_and_the_peer_gets_every_frame_in_order():
    sw = L2Switch(idle_timeout=60).start()
    peer = NetPeer(sw.address, B)
    port = UdpSwitchPort(sw.address, name="burst")
    try:
        peer.send_raw(seq_frame(b"\xff" * 6, B, 1, 0))  # B learned at the peer's port
        assert sw.wait_learned(B, peer.address, WAIT)
        port.send_many([seq_frame(B, A, 1, i) for i in range(200)])
        assert peer.wait_count(A, 200, WAIT)
        assert peer.seqs_from(A) == list(range(200))
        assert sw.stats["batches"] >= 1 and port.stats["tx_frames"] == 200
    finally:
        port.close()
        peer.close()
        sw.stop()


def test_a_port_without_the_capability_gets_one_frame_a_datagram():
    sw = L2Switch(idle_timeout=60).start()
    plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    port = UdpSwitchPort(sw.address, name="burst")
    try:
        plain.bind(("127.0.0.1", 0))
        plain.settimeout(WAIT)
        plain.sendto(hello_message(), sw.address)
        plain.sendto(frame_message(seq_frame(b"\xff" * 6, B, 1, 0)), sw.address)
        assert sw.wait_learned(B, plain.getsockname(), WAIT)
        got: list[bytes] = []
        port.send_many([seq_frame(B, A, 1, i) for i in range(5)])
        for _ in range(5):
            got.append(plain.recv(65536))
        assert [m[0] for m in got] == [KIND_FRAME] * 5
    finally:
        port.close()
        plain.close()
        sw.stop()


def test_a_burst_reaches_a_port_as_frames_delivered_one_by_one():
    sw = L2Switch(idle_timeout=60).start()
    got: list[bytes] = []
    lock = threading.Lock()
    rx, tx = UdpSwitchPort(sw.address, name="rx"), UdpSwitchPort(sw.address, name="tx")

    def deliver(f: bytes) -> None:
        with lock:
            got.append(f)

    rx.attach(deliver)
    try:
        rx.send(seq_frame(b"\xff" * 6, B, 1, 0))
        assert sw.wait_learned(B, rx.local_addr, WAIT)
        frames = [seq_frame(B, A, 1, i) for i in range(50)]
        tx.send_many(frames)
        deadline = time.monotonic() + WAIT
        while len(got) < 50 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert got == frames and rx.stats["rx_frames"] == 50
    finally:
        rx.close()
        tx.close()
        sw.stop()
