"""A guest virtio-net driver written from the spec (virtio 1.x, 5.1), over registers only.

:class:`NetDriver` runs on a :class:`~virtio_lm.pci.transport.PciDriverTransport`
and :class:`~virtio_lm.virtqueue.driver.DriverQueue` in the VM's guest memory
(the CPU port, so the VM's dirty log sees every driver write):

* bring-up: negotiate, read ``max_virtqueue_pairs`` (MQ), set up receiveq /
  transmitq pairs and the control queue (index 2N with MQ, else 2), fill
  every receive queue with buffers, DRIVER_OK, read the MAC;
* :meth:`send` -- header (all zero: no offloads) + frame, one readable
  buffer; :meth:`reap_tx` frees completed ones;
* :meth:`receive` -- completed receive buffers -> frames; each buffer is
  put back at once;
* control commands in the virtio-net format (``class, command, data`` /
  ``ack``) or, with VIRTIO_F_GENERIC_CTRL_VQ_VER_1 negotiated, the generic
  v1 format (ack after the valid result, ``used_len = result + 1``);
  :meth:`ctrl` returns the ack, the named helpers raise
  :class:`~virtio_lm.errors.ControlCommandError` on ERR;
* interrupts: wire :meth:`on_interrupt` to the function; :meth:`poll`
  handles a configuration change: with the ANNOUNCE status bit set (and
  GUEST_ANNOUNCE negotiated) it sends a gratuitous RARP for its MAC on
  transmitq1 and acks with ANNOUNCE_ACK.

Migration handover: the driver's bookkeeping (queue free lists and chains
in flight, allocators, negotiated features, MAC, pairs) moves with the VM.
:meth:`NetDriver.save` returns it as a frozen :class:`NetDriverState` detached
from any memory; :meth:`NetDriver.from_state` re-attaches it to the
destination function and memory (whose content is the migrated guest RAM).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from virtio_lm.errors import (
    CommandTimeoutError,
    ControlCommandError,
    DriverError,
    GuestStateError,
    QueueFullError,
    UsedRingError,
)
from virtio_lm.memory import MemoryPort
from virtio_lm.pci.function import CONFIG_INTERRUPT
from virtio_lm.pci.transport import PciDriverTransport, RegisterInterface
from virtio_lm.virtqueue.device import Segment
from virtio_lm.virtqueue.driver import Allocator, DriverQueue
from virtio_lm.wire.ctrl import Ack, decode_response
from virtio_lm.wire.features import Feature, ProposalFeature, bit
from virtio_lm.wire.net import (
    ETH_ALEN,
    ETH_HLEN,
    NET_HDR_SIZE,
    AnnounceCmd,
    CtrlClass,
    MacCmd,
    MacTables,
    MqCmd,
    NetConfig,
    NetFeature,
    NetHdrV1,
    NetStatus,
    RxCmd,
    VlanCmd,
    announce_frame,
    encode_ctrl,
    encode_mac_addr,
    encode_mq_pairs,
    encode_rx_onoff,
    encode_vlan_id,
    eth_header,
)
from virtio_lm.wire.netstate import ETHERTYPE_SEQ, SEQ_MAGIC, SEQ_PAYLOAD_DTYPE, SeqPayload

_F = NetFeature
DEFAULT_WANTED = (
    bit(Feature.VERSION_1)
    | bit(Feature.EVENT_IDX)
    | bit(Feature.INDIRECT_DESC)
    | bit(_F.MAC)
    | bit(_F.STATUS)
    | bit(_F.CTRL_VQ)
    | bit(_F.CTRL_RX)
    | bit(_F.CTRL_VLAN)
    | bit(_F.GUEST_ANNOUNCE)
    | bit(_F.MQ)
    | bit(_F.CTRL_MAC_ADDR)
)
GENERIC_CTRL = bit(ProposalFeature.GENERIC_CTRL_VQ_VER_1)
RX_BUF_SIZE = NET_HDR_SIZE + 1518 + 6  # header + the largest VLAN-tagged frame, rounded
CTRL_TIMEOUT = 5.0
_OFF = NetConfig.OFFSETS  # type: ignore[attr-defined]


@dataclass(frozen=True)
class NetDriverState:
    """The guest driver's bookkeeping, detached from any memory (see :meth:`NetDriver.save`)."""

    features: int
    device_features: int
    mac: bytes
    max_pairs: int
    curr_pairs: int
    rx_buf_size: int
    queues: dict[int, DriverQueue]
    ring_alloc: Allocator
    buf_alloc: Allocator
    counters: dict[str, int] = field(default_factory=dict)


class NetDriver:
    """The guest's virtio-net driver; see the module docstring."""

    def __init__(
        self,
        fn: RegisterInterface,
        port: MemoryPort,
        *,
        ring_alloc: Allocator,
        buf_alloc: Allocator,
        rx_buf_size: int = RX_BUF_SIZE,
    ) -> None:
        self.fn = fn
        self.port = port
        self.ring_alloc = ring_alloc
        self.buf_alloc = buf_alloc
        self.rx_buf_size = rx_buf_size
        self.tr = PciDriverTransport(fn, port, ring_alloc)
        self.features = 0
        self.mac = bytes(ETH_ALEN)
        self.max_pairs = 1
        self.curr_pairs = 1
        self.counters: dict[str, int] = {}
        self._config_changed = threading.Event()
        self.interrupts: dict[int, int] = {}
        self._lent: set[int] = set()  # transmit queues a FixedFrames owns for now

    # ================================================================== helpers
    def has(self, feature: int) -> bool:
        return bool(self.features & bit(feature))

    @property
    def generic_ctrl(self) -> bool:
        return bool(self.features & GENERIC_CTRL)

    def _count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    def rx_queue(self, pair: int) -> int:
        return 2 * pair

    def tx_queue(self, pair: int) -> int:
        return 2 * pair + 1

    @property
    def ctrl_queue(self) -> int:
        return 2 * self.max_pairs if self.has(_F.MQ) else 2

    def config_status(self) -> NetStatus:
        return NetStatus(self.tr.config_read(_OFF["status"], 2))

    def read_mac(self) -> bytes:
        return bytes(self.tr.config_read(_OFF["mac"] + i, 1) for i in range(ETH_ALEN))

    # ================================================================== bring-up
    def bring_up(self, wanted: int = DEFAULT_WANTED, *, queue_size: int | None = None, pairs: int | None = None) -> int:
        """Initialise the device; returns the negotiated features."""
        tr = self.tr
        self.features = tr.negotiate(wanted)
        self.max_pairs = tr.config_read(_OFF["max_virtqueue_pairs"], 2) if self.has(_F.MQ) else 1
        if self.max_pairs < 1:
            raise DriverError(f"device reports max_virtqueue_pairs {self.max_pairs}")
        for p in range(self.max_pairs):
            tr.setup_queue(self.rx_queue(p), queue_size)
            tr.setup_queue(self.tx_queue(p), queue_size)
        if self.has(_F.CTRL_VQ):
            tr.setup_queue(self.ctrl_queue, queue_size)
        for p in range(self.max_pairs):
            self._fill_rx(p)
        tr.driver_ok()
        for p in range(self.max_pairs):
            tr.kick(self.rx_queue(p))
        self.mac = self.read_mac() if self.has(_F.MAC) else bytes.fromhex("020000000001")
        if pairs is not None and pairs != 1:
            self.set_pairs(pairs)
        return self.features

    def _fill_rx(self, pair: int) -> int:
        dq = self.tr.queues[self.rx_queue(pair)]
        n = 0
        while dq.num_free() > 0:
            buf = self.buf_alloc.alloc(self.rx_buf_size, 16)
            dq.add([], [Segment(buf, self.rx_buf_size)], token=("rx", buf))
            n += 1
        return n

    # ================================================================== interrupts
    def on_interrupt(self, source: int) -> None:
        """Wire to the function's ``on_interrupt``."""
        self.interrupts[source] = self.interrupts.get(source, 0) + 1
        if source == CONFIG_INTERRUPT:
            self._config_changed.set()

    def poll(self) -> bool:
        """Handle a pending configuration change; True if an announce was made."""
        if not self._config_changed.is_set():
            return False
        self._config_changed.clear()
        self.tr.check()
        if self.has(_F.GUEST_ANNOUNCE) and self.config_status() & NetStatus.ANNOUNCE:
            self.send(announce_frame(self.mac))
            self.announce_ack()
            self._count("announces")
            return True
        return False

    # ================================================================== transmit
    def lend_tx(self, pair: int) -> DriverQueue:
        """Hand transmitq ``pair`` to another owner (:class:`FixedFrames`) until :meth:`return_tx`:
        meanwhile :meth:`send` refuses it, :meth:`reap_tx` leaves it alone and :meth:`save` is
        refused.  Refused (DriverError) for a pair not set up, lent already, or with frames of the
        driver's own in flight."""
        q = self.tx_queue(pair)
        if not 0 <= pair < self.max_pairs or q not in self.tr.queues or q in self._lent:
            raise DriverError(f"transmitq{pair + 1} is not set up or is already lent")
        dq = self.tr.queues[q]
        if dq.in_flight():
            raise DriverError(f"transmitq{pair + 1} has {dq.in_flight()} frames of the driver's own in flight")
        self._lent.add(q)
        return dq

    def return_tx(self, pair: int) -> None:
        """End :meth:`lend_tx` (the borrower has nothing in flight on it)."""
        self._lent.discard(self.tx_queue(pair))

    def _own_tx(self, pair: int) -> int:
        q = self.tx_queue(pair)
        if q in self._lent:
            raise DriverError(f"transmitq{pair + 1} is lent to fixed frames")
        return q

    def send(self, frame: bytes, *, pair: int = 0, hdr: NetHdrV1 | None = None) -> int:
        """Queue one frame on transmitq ``pair`` and kick; returns the chain head."""
        q = self._own_tx(pair)
        dq = self.tr.queues[q]
        if dq.num_free() == 0:
            self.reap_tx()
            if dq.num_free() == 0:
                raise QueueFullError(f"transmitq{pair + 1} is full ({dq.in_flight()} frames in flight)")
        raw = (hdr or NetHdrV1()).encode() + bytes(frame)
        buf = self.buf_alloc.alloc(len(raw), 16)
        self.port.write(buf, raw)
        head = dq.add([Segment(buf, len(raw))], [], token=("tx", buf))
        self.tr.kick(q)
        self._count("tx_submitted")
        return head

    def send_many(self, frames: list[bytes], *, pair: int = 0) -> None:
        """Queue several frames with one publish + kick."""
        q = self._own_tx(pair)
        dq = self.tr.queues[q]
        for frame in frames:
            if dq.num_free() == 0:
                self.tr.kick(q)
                self.reap_tx()
                if dq.num_free() == 0:
                    raise QueueFullError(f"transmitq{pair + 1} is full")
            raw = NetHdrV1().encode() + bytes(frame)
            buf = self.buf_alloc.alloc(len(raw), 16)
            self.port.write(buf, raw)
            dq.add([Segment(buf, len(raw))], [], token=("tx", buf))
            self._count("tx_submitted")
        self.tr.kick(q)

    def reap_tx(self) -> int:
        n = 0
        for p in range(self.max_pairs):
            if self.tx_queue(p) in self._lent:
                continue  # its FixedFrames reaps it
            for token, _ in self.tr.queues[self.tx_queue(p)].get_all_used():
                kind, buf = token  # type: ignore[misc]
                if kind != "tx":
                    raise UsedRingError(f"transmitq{p + 1} returned a {kind} buffer")
                self.buf_alloc.free(buf)
                n += 1
        self._count("tx_completed", n)
        return n

    def tx_in_flight(self) -> int:
        return sum(self.tr.queues[self.tx_queue(p)].in_flight() for p in range(self.max_pairs))

    # ================================================================== receive
    def receive(self) -> list[tuple[int, bytes]]:
        """``(pair, frame)`` of every completed receive buffer; the buffers go back at once."""
        out: list[tuple[int, bytes]] = []
        for p in range(self.max_pairs):
            q = self.rx_queue(p)
            dq = self.tr.queues[q]
            got = dq.get_all_used()
            for token, used_len in got:
                kind, buf = token  # type: ignore[misc]
                if used_len < NET_HDR_SIZE or used_len > self.rx_buf_size:
                    self._count("rx_length_errors")
                else:
                    raw = self.port.read(buf, used_len)
                    NetHdrV1.decode(raw[:NET_HDR_SIZE])
                    out.append((p, raw[NET_HDR_SIZE:]))
                dq.add([], [Segment(buf, self.rx_buf_size)], token=("rx", buf))
            if got:
                self.tr.kick(q)
        self._count("rx_frames", len(out))
        return out

    # ================================================================== control queue
    def ctrl(self, cls: int, cmd: int, data: bytes = b"", *, writable: int = 1, timeout: float = CTRL_TIMEOUT) -> Ack | None:
        """One control command; the device's ack (None: the device wrote no ack)."""
        return self.ctrl_raw(encode_ctrl(cls, cmd, data), writable, timeout=timeout)

    def ctrl_raw(self, readable: bytes, writable: int = 1, *, timeout: float = CTRL_TIMEOUT) -> Ack | None:
        """A control buffer of any ``readable`` bytes and ``writable`` bytes of room (hostile tests too)."""
        if not self.has(_F.CTRL_VQ):
            raise DriverError("VIRTIO_NET_F_CTRL_VQ was not negotiated")
        if not readable and not writable:
            raise DriverError("a control buffer needs at least one byte")
        q = self.ctrl_queue
        dq = self.tr.queues[q]
        rbuf = self.buf_alloc.alloc(max(len(readable), 1), 16)
        wbuf = self.buf_alloc.alloc(max(writable, 1), 16)
        self.port.write(rbuf, readable)
        self.port.fill(wbuf, max(writable, 1), 0xEE)
        token = ("ctrl", rbuf, wbuf)
        segs_r = [Segment(rbuf, len(readable))] if readable else []
        segs_w = [Segment(wbuf, writable)] if writable else []
        dq.add(segs_r, segs_w, token=token)
        self.tr.kick(q)
        deadline = time.monotonic() + timeout
        while (used := dq.get_used()) is None:
            if time.monotonic() > deadline:
                raise CommandTimeoutError(f"control command {readable[:2].hex()} not completed in {timeout}s")
            time.sleep(0.0005)
        got_token, used_len = used
        if got_token != token:
            raise UsedRingError(f"control queue returned {got_token!r}, expected {token!r}")
        if used_len > writable:
            raise UsedRingError(f"control used_len {used_len} > writable {writable}")
        written = self.port.read(wbuf, used_len) if used_len else b""
        self.buf_alloc.free(rbuf)
        self.buf_alloc.free(wbuf)
        if not written:
            return None
        if self.generic_ctrl:
            _, ack = decode_response(written)
            return ack
        if used_len != 1 or written[0] not in (Ack.OK, Ack.ERR):
            raise UsedRingError(f"virtio-net ack of {used_len} bytes: {written.hex()}")
        return Ack(written[0])

    def _must(self, what: str, cls: int, cmd: int, data: bytes = b"") -> None:
        ack = self.ctrl(cls, cmd, data)
        if ack is not Ack.OK:
            raise ControlCommandError(what, None, None, f"ack {ack!r}")

    def set_promisc(self, on: bool) -> None:
        self._must("RX_PROMISC", CtrlClass.RX, RxCmd.PROMISC, encode_rx_onoff(on))

    def set_allmulti(self, on: bool) -> None:
        self._must("RX_ALLMULTI", CtrlClass.RX, RxCmd.ALLMULTI, encode_rx_onoff(on))

    def set_mac_table(self, unicast: list[bytes] | tuple[bytes, ...], multicast: list[bytes] | tuple[bytes, ...]) -> None:
        self._must("MAC_TABLE_SET", CtrlClass.MAC, MacCmd.TABLE_SET, MacTables(tuple(unicast), tuple(multicast)).encode())

    def set_mac(self, mac: bytes) -> None:
        self._must("MAC_ADDR_SET", CtrlClass.MAC, MacCmd.ADDR_SET, encode_mac_addr(mac))
        self.mac = bytes(mac)

    def vlan_add(self, vid: int) -> None:
        self._must("VLAN_ADD", CtrlClass.VLAN, VlanCmd.ADD, encode_vlan_id(vid))

    def vlan_del(self, vid: int) -> None:
        self._must("VLAN_DEL", CtrlClass.VLAN, VlanCmd.DEL, encode_vlan_id(vid))

    def set_pairs(self, pairs: int) -> None:
        self._must("MQ_VQ_PAIRS_SET", CtrlClass.MQ, MqCmd.VQ_PAIRS_SET, encode_mq_pairs(pairs))
        self.curr_pairs = pairs

    def announce_ack(self) -> None:
        self._must("ANNOUNCE_ACK", CtrlClass.ANNOUNCE, AnnounceCmd.ACK)

    # ================================================================== migration handover
    def save(self) -> NetDriverState:
        """The driver's bookkeeping, detached from memory (it moves with the VM).  Refused
        (DriverError) while a transmit queue is lent to :class:`FixedFrames`: close them first."""
        if self._lent:
            raise DriverError("transmit queues are lent to fixed frames: close them before saving")
        ring_alloc = self.ring_alloc.clone()
        return NetDriverState(
            features=self.features,
            device_features=self.tr.device_features,
            mac=self.mac,
            max_pairs=self.max_pairs,
            curr_pairs=self.curr_pairs,
            rx_buf_size=self.rx_buf_size,
            queues={i: dq.clone(None, ring_alloc) for i, dq in self.tr.queues.items()},
            ring_alloc=ring_alloc,
            buf_alloc=self.buf_alloc.clone(),
            counters=dict(self.counters),
        )

    @staticmethod
    def check_state(state: NetDriverState, path: str = "net") -> None:
        """Raise :class:`GuestStateError` (``path`` prefixes the field) unless ``state`` is one
        this driver could have reached: negotiated features the device offered; pairs
        within what the features allow; the buffer and ring allocators apart; exactly the
        receive / transmit (/ control) queues of those features and pairs, EVENT_IDX as
        negotiated; each chain's token ``[kind, addr...]`` of its queue's kind, naming
        live buffers of the buffer allocator, each in flight once, receive buffers of at
        least ``rx_buf_size``."""
        fail = GuestStateError
        features = state.features
        if features & ~state.device_features:
            raise fail(f"{path}.features", f"negotiated bits {features & ~state.device_features:#x} the device does not offer")
        mq = bool(features & bit(NetFeature.MQ))
        if not 1 <= state.max_pairs <= (0x8000 if mq else 1):
            raise fail(f"{path}.max_pairs", f"{state.max_pairs} is outside 1..{0x8000 if mq else 1}")
        if not 1 <= state.curr_pairs <= state.max_pairs:
            raise fail(f"{path}.curr_pairs", f"{state.curr_pairs} is outside 1..{state.max_pairs}")
        ring, buf = state.ring_alloc, state.buf_alloc
        if ring.base < buf.base + buf.size and buf.base < ring.base + ring.size:
            raise fail(f"{path}.buf_alloc", "range overlaps the ring allocator's")
        ctrl = (2 * state.max_pairs if mq else 2) if features & bit(NetFeature.CTRL_VQ) else None
        kinds = {2 * p: "rx" for p in range(state.max_pairs)} | {2 * p + 1: "tx" for p in range(state.max_pairs)}
        if ctrl is not None:
            kinds[ctrl] = "ctrl"
        for n in state.queues:
            if n not in kinds:
                raise fail(f"{path}.queues.{n}", "no such queue for these features and pairs")
        for n in kinds:
            if n not in state.queues:
                raise fail(f"{path}.queues", f"queue {n} ({kinds[n]}) is missing")
        want_event = bool(features & bit(Feature.EVENT_IDX))
        bufs: dict[int, tuple[int, int]] = {}  # buffer -> (queue, chain) holding it
        rx_min = state.rx_buf_size
        for n, dq in sorted(state.queues.items()):
            if dq.event_idx != want_event:
                raise fail(f"{path}.queues.{n}.event_idx", "differs from the negotiated VIRTIO_F_EVENT_IDX")
            kind = kinds[n]
            width = 3 if kind == "ctrl" else 2
            for i, rec in enumerate(dq.chains()):
                t = rec.token
                if (
                    type(t) is not tuple
                    or len(t) != width
                    or t[0] != kind
                    or type(t[0]) is not str
                    or any(type(x) is not int for x in t[1:])
                ):
                    raise fail(f"{path}.queues.{n}.in_flight[{i}].token",
                               f"a {kind} queue's token is [{kind!r}{', addr' * (width - 1)}], got {t!r}")
                for addr in t[1:]:
                    have = buf.length_of(addr)
                    if have is None or addr in bufs or (kind == "rx" and have < rx_min):
                        p = f"{path}.queues.{n}.in_flight[{i}].token"
                        if have is None:
                            raise fail(p, f"buffer {addr:#x} is not a live allocation of the buffer allocator")
                        if addr in bufs:
                            bn, bi = bufs[addr]
                            raise fail(p, f"buffer {addr:#x} also in flight at {path}.queues.{bn}.in_flight[{bi}].token")
                        raise fail(p, f"receive buffer of {have} bytes, rx_buf_size is {rx_min}")
                    bufs[addr] = (n, i)

    @classmethod
    def from_state(cls, state: NetDriverState, *, fn: RegisterInterface, port: MemoryPort) -> "NetDriver":
        """A driver continuing from ``state`` on function ``fn`` over memory ``port`` (the state
        checked first: :meth:`check_state`)."""
        cls.check_state(state)
        drv = cls(fn, port, ring_alloc=state.ring_alloc, buf_alloc=state.buf_alloc, rx_buf_size=state.rx_buf_size)
        drv.features = state.features
        drv.tr.features = state.features
        drv.tr.device_features = state.device_features
        drv.tr.queues = {i: dq.clone(port, state.ring_alloc) for i, dq in state.queues.items()}
        drv.mac = state.mac
        drv.max_pairs = state.max_pairs
        drv.curr_pairs = state.curr_pairs
        drv.counters = dict(state.counters)
        return drv


class FixedFrames:
    """``count`` sequence-numbered frames of ``size`` bytes from this driver's MAC to ``dst`` on
    transmitq ``pair``, placed once and reused (a traffic generator's fixed buffers): the device
    bench's driver, which must cost the device's own figures little.

    At construction each slot gets a buffer -- the ``virtio_net_hdr_v1`` (all zero) and the frame,
    an Ethernet header (ethertype ETHERTYPE_SEQ) and a :class:`~virtio_lm.wire.netstate.SeqPayload`
    (``stream``), zero-padded -- all slots side by side in one allocation, and a standing chain
    (:meth:`DriverQueue.add_standing`).  The queue is lent to this object until :meth:`close`.
    :meth:`send` writes the next sequence numbers into idle slots' frames in one array store and
    posts their chains; :meth:`reap` takes the completed ones back.  Every write goes through the
    driver's CPU port, as :meth:`NetDriver.send`'s do.
    """

    def __init__(self, drv: NetDriver, count: int, size: int, dst: bytes, *, stream: int = 9, pair: int = 0) -> None:
        if count < 1 or not ETH_HLEN + SeqPayload.SIZE <= size <= 65535 - 64:  # type: ignore[attr-defined]
            raise DriverError(f"{count} frames of {size} bytes: need at least one, of {ETH_HLEN + 16}..65471 bytes")
        if len(dst) != ETH_ALEN:
            raise DriverError("dst must be a 6-byte MAC")
        self.drv, self.count, self.size, self.pair = drv, count, size, pair
        self._dq = dq = drv.lend_tx(pair)
        self._stride = (NET_HDR_SIZE + size + 15) & ~15
        self._bufs = -1
        heads: list[int] = []
        try:
            self._bufs = drv.buf_alloc.alloc(count * self._stride, 4096)
            frame = (NetHdrV1().encode() + eth_header(bytes(dst), drv.mac, ETHERTYPE_SEQ)
                     + SeqPayload(SEQ_MAGIC, stream, 0).encode()).ljust(self._stride, b"\0")
            drv.port.write(self._bufs, frame * count)
            for i in range(count):
                heads.append(dq.add_standing([Segment(self._bufs + i * self._stride, NET_HDR_SIZE + size)], [], token=i))
        except BaseException:
            for h in heads:
                dq.release_standing(h)
            if self._bufs >= 0:
                drv.buf_alloc.free(self._bufs)
            drv.return_tx(pair)
            raise
        self._heads = np.asarray(heads, dtype=np.int64)
        self._idle: list[int] = list(range(count))
        self.next_seq = 0
        self.sent = 0
        self.completed = 0
        self._closed = False
        # the records a send writes: each slot's SeqPayload, at the same offset in every stride
        self._seq_dtype = np.dtype({"names": ["seq"], "formats": [SEQ_PAYLOAD_DTYPE["seq"]],
                                    "offsets": [NET_HDR_SIZE + ETH_HLEN + SEQ_PAYLOAD_DTYPE.fields["seq"][1]],
                                    "itemsize": self._stride})

    def idle(self) -> int:
        return len(self._idle)

    def in_flight(self) -> int:
        return self.count - len(self._idle)

    def send(self, n: int | None = None, *, kick: bool = True) -> int:
        """Send the next sequence numbers in up to ``n`` idle slots (all idle ones by default);
        how many went."""
        if self._closed:
            raise DriverError("fixed frames are closed")
        k = len(self._idle) if n is None else min(n, len(self._idle))
        if not k:
            return 0
        slots = self._idle[:k]
        del self._idle[:k]
        try:
            with self.drv.port.modify(self._bufs, self.count * self._stride) as raw:
                raw.view(self._seq_dtype)["seq"][slots] = np.arange(self.next_seq, self.next_seq + k, dtype=np.uint64)
            self._dq.post(self._heads[slots].tolist())
        except BaseException:
            self._idle[:0] = slots
            raise
        self.next_seq += k
        self.sent += k
        if kick:
            self.drv.tr.kick(self.drv.tx_queue(self.pair))
        return k

    def reap(self) -> int:
        """Take every completed frame's slot back; how many."""
        done = self._dq.take_used()
        self._idle.extend(t for t, _ in done)  # type: ignore[misc]
        self.completed += len(done)
        return len(done)

    def close(self) -> None:
        """Give the queue back and free the slots; refused (DriverError) while frames are in flight."""
        if self._closed:
            return
        if self.in_flight():
            raise DriverError(f"{self.in_flight()} fixed frames are in flight")
        for h in self._heads.tolist():
            self._dq.release_standing(h)
        self.drv.buf_alloc.free(self._bufs)
        self.drv.return_tx(self.pair)
        self._closed = True
