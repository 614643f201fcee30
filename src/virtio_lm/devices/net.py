"""The virtio-net VF device model (virtio 1.x, 5.1), with the migration interface.

Queues (``max_pairs`` = N)::

    0, 2, .. 2N-2   receiveq1..N     buffers wait here for frames from the back-end
    1, 3, .. 2N-1   transmitq1..N    frames for the back-end (QueueDevice requests)
    2N              controlq         (with VIRTIO_NET_F_MQ; without MQ the control
                                     queue is queue 2, as the spec numbers it)

Every buffer starts with the 12-byte ``virtio_net_hdr_v1``.  No checksum or
segmentation offload is offered, so a TX header must say "nothing to do"
(flags 0, gso NONE); RX headers are all zero but ``num_buffers = 1``.

Features offered: VERSION_1, EVENT_IDX, INDIRECT_DESC, MAC, STATUS, CTRL_VQ,
CTRL_RX, CTRL_VLAN, GUEST_ANNOUNCE, MQ, CTRL_MAC_ADDR and the proposal's
VIRTIO_F_GENERIC_CTRL_VQ_VER_1 (39); ``without=`` removes bits (a device
without GUEST_ANNOUNCE announces itself).

Transmit
    A TX chain is a :class:`QueueDevice` request: the frame is read from
    guest memory when the chain is taken, the send runs on a one-thread
    back-end pool (frames leave in order) and the chain completes with
    used_len 0.  A send waiting for link credit (back-end ``pause_tx``) when
    FREEZE comes is abandoned and becomes "not executed": it is sent after
    resume (on the destination after a migration).  A frame already on the
    wire only has its completion held: it is never sent twice.

Receive
    A frame from the back-end is filtered, steered to a receive queue, and
    written into the next available buffer of that queue at once (buffers
    are taken lazily, so the device never holds RX chains).  Frames are
    dropped and counted in :attr:`NetDevice.stats`, by reason:
    ``rx_dropped_not_ready`` (no DRIVER_OK, queue off, NEEDS_RESET),
    ``rx_dropped_quiesced`` (QUIESCED / FREEZED: the switch-over window),
    ``rx_filtered``, ``rx_no_buffer``, ``rx_buffer_too_small``.

Filtering (CTRL_RX, CTRL_VLAN)
    promiscuous -> accept; a VLAN-tagged frame whose VID was not added ->
    drop (with CTRL_VLAN; untagged frames always pass); broadcast -> accept;
    multicast -> all-multicast or in the multicast table; unicast -> our MAC
    or in the unicast table.  At reset promiscuous is on (so a driver that
    never negotiates CTRL_RX receives everything), all-multicast off, tables
    and VLAN filter empty.

Multiqueue steering
    Automatic receive steering: a frame from MAC ``s`` goes to the receive
    queue of the pair the driver last transmitted a frame *to* ``s`` on;
    a MAC never transmitted to is hashed (CRC-32) over the pairs in use.

Control queue
    Without GENERIC_CTRL_VQ_VER_1: virtio-net buffers ``class, command,
    data`` / ``ack``.  With it: generic v1 buffers through a
    :class:`~virtio_lm.ctrl.dispatch.ControlDispatcher` with classes 0..4
    registered (ack after the valid result; net commands have no result, so
    the ack is the first writable byte either way, but classes >= 128 and
    buffers without room for an ack are handled by the dispatcher's rules).
    Every malformed buffer gets ERR (or used_len 0 when there is no room for
    an ack) and the device goes on.  Limits: 64 entries per MAC table;
    ADDR_SET refuses a group address; ANNOUNCE_ACK with no announce pending
    is ERR; VQ_PAIRS_SET above max_virtqueue_pairs is ERR; the RX_EXTRA
    commands (not offered) are ERR.

Migration
    QUIESCED/FREEZED: no DMA, no interrupt; RX frames dropped and counted;
    TX completions held.  The image adds NET_STATE, NET_MACS and NET_VLANS
    (:mod:`virtio_lm.wire.netstate`).  A device that was restored makes
    itself known when it runs: with GUEST_ANNOUNCE negotiated it sets the
    ANNOUNCE status bit and raises a configuration interrupt (the driver
    sends gratuitous frames and ANNOUNCE_ACKs); without, the device sends a
    RARP announce (:func:`virtio_lm.wire.net.announce_frame`) itself.
"""

from __future__ import annotations

import collections
import threading
import zlib
from dataclasses import dataclass
from typing import Callable, Protocol

from virtio_lm.ctrl.dispatch import ControlDispatcher
from virtio_lm.devices import netfast
from virtio_lm.devices.base import NotExecuted, QueueDevice, Request, Work
from virtio_lm.errors import BackendError, CommandRefusedError, DevicePartsError, StateImageError, VirtioLmError, WireError
from virtio_lm.pci.function import VirtioPciFunction
from virtio_lm.pci.snapshot import FunctionSnapshot
from virtio_lm.virtqueue.device import DescriptorChain
from virtio_lm.wire.ctrl import Ack
from virtio_lm.wire.features import (
    DeviceId,
    DeviceStatus,
    Feature,
    ProposalFeature,
    bit,
    unmet_requirements,
)
from virtio_lm.wire.net import (
    BROADCAST_MAC,
    CTRL_DECODERS,
    ETH_ALEN,
    ETH_HLEN,
    ETHERTYPE_VLAN,
    NET_CONFIG_SIZE,
    NET_HDR_SIZE,
    NET_REQUIREMENTS,
    AnnounceCmd,
    CtrlClass,
    GsoType,
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
    decode_mac_addr,
    decode_mac_tables,
    decode_mq_pairs,
    decode_rx_onoff,
    encode_mac_addr,
    encode_mq_pairs,
    encode_rx_onoff,
    is_multicast,
)
from virtio_lm.wire.parts import PART_HDR_SIZE, DevPart, NetCvqSelector, PartType
from virtio_lm.wire.netstate import (
    NetRecordType,
    NetStateFlags,
    NetStateRecord,
    RxModeFlags,
    decode_vlans,
    encode_vlans,
)
from virtio_lm.wire.state import DEVICE_RECORD_BASE, RecordType, StateImage

MAC_TABLE_ENTRIES = 64  # per table
MAX_CTRL_READABLE = 2 + 2 * (4 + MAC_TABLE_ENTRIES * ETH_ALEN)  # the largest valid command
MAX_TX_FRAME = 65535 - 64
FAST_TX_BATCH = 256  # chains a netfast.tx call takes at most (a burst's frames)
FLOW_TABLE_SIZE = 1024
DEFAULT_MAC = bytes.fromhex("525400123456")

_F = NetFeature
NET_FEATURES = (
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
    | bit(ProposalFeature.GENERIC_CTRL_VQ_VER_1)
)
#: the proposal's generic control format needs a control queue to speak it on
NET_GENERIC_REQUIREMENTS = {ProposalFeature.GENERIC_CTRL_VQ_VER_1: ((_F.CTRL_VQ,),)}

_RX_CMD_FLAG = {
    RxCmd.PROMISC: RxModeFlags.PROMISC,
    RxCmd.ALLMULTI: RxModeFlags.ALLMULTI,
    RxCmd.ALLUNI: RxModeFlags.ALLUNI,
    RxCmd.NOMULTI: RxModeFlags.NOMULTI,
    RxCmd.NOUNI: RxModeFlags.NOUNI,
    RxCmd.NOBCAST: RxModeFlags.NOBCAST,
}
_RX_EXTRA = RxModeFlags.ALLUNI | RxModeFlags.NOMULTI | RxModeFlags.NOUNI | RxModeFlags.NOBCAST
#: the feature each control class needs
_CLASS_FEATURE = {
    CtrlClass.RX: _F.CTRL_RX,
    CtrlClass.VLAN: _F.CTRL_VLAN,
    CtrlClass.ANNOUNCE: _F.GUEST_ANNOUNCE,
    CtrlClass.MQ: _F.MQ,
}
_DOK = int(DeviceStatus.DRIVER_OK)
_FOK = int(DeviceStatus.FEATURES_OK)
_STATUS_BITS = int(NetStatus.LINK_UP | NetStatus.ANNOUNCE)

#: VIRTIO_NET_DEV_PART_CVQ_CFG_PART selectors this device exchanges, in the order it
#: sends them, and the feature each needs
_CVQ_PARTS: tuple[tuple[int, int, int], ...] = (
    (CtrlClass.RX, RxCmd.PROMISC, _F.CTRL_RX),
    (CtrlClass.RX, RxCmd.ALLMULTI, _F.CTRL_RX),
    (CtrlClass.MAC, MacCmd.TABLE_SET, _F.CTRL_RX),
    (CtrlClass.MAC, MacCmd.ADDR_SET, _F.CTRL_MAC_ADDR),
    (CtrlClass.VLAN, VlanCmd.ADD, _F.CTRL_VLAN),
    (CtrlClass.MQ, MqCmd.VQ_PAIRS_SET, _F.MQ),
)
_CVQ_NEED = {(c, m): f for c, m, f in _CVQ_PARTS}


class _TxNotSent(NotExecuted):
    """A transmit abandoned before the frame reached the wire (FREEZE): not executed."""


@dataclass(frozen=True)
class NetState:
    """The net device's own state (what NET_* records carry), validated."""

    mac: bytes
    link_up: bool
    rx_mode: RxModeFlags
    curr_pairs: int
    announce_pending: bool
    unicast: tuple[bytes, ...]
    multicast: tuple[bytes, ...]
    vlans: frozenset[int]


class FramePort(Protocol):
    """Where a :class:`NetDevice`'s frames go and come from: what the device needs of a
    back-end (``virtio_lm.net.backends`` implements it above this layer and is injected,
    so the device model imports nothing of the network around it)."""

    def attach(self, deliver: Callable[[bytes], None]) -> None:
        """Start delivering received frames to ``deliver``."""

    def wait_tx_ready(self, abort: threading.Event) -> bool:
        """Block until a frame may be sent (True) or ``abort`` is set (False)."""

    def try_tx_ready(self, abort: threading.Event) -> bool:
        """:meth:`wait_tx_ready` without the wait: True if a frame may be sent now."""

    def send(self, frame: bytes) -> None:
        """Send one frame."""

    def tx_unmetered(self, abort: threading.Event) -> bool:
        """Whether any number of frames may be sent now (no pause, no credit limit, ``abort`` clear)."""

    def send_many(self, frames: list[bytes]) -> None:
        """Send frames in order (a burst: as few system calls as the back-end can)."""

    def wake_tx(self) -> None:
        """Wake a sender blocked in :meth:`wait_tx_ready` (it re-checks ``abort``)."""

    def close(self) -> None:
        """Stop; no delivery after it returns."""


class NetDevice(QueueDevice):
    """A virtio-net VF; see the module docstring."""

    device_id = DeviceId.NET
    backend_threads = 1  # frames leave in the order the driver queued them

    def __init__(
        self,
        backend: FramePort | None = None,
        *,
        mac: bytes = DEFAULT_MAC,
        max_pairs: int = 1,
        queue_max_size: int = 256,
        mtu: int = 1500,
        without: int = 0,
    ) -> None:
        if len(mac) != ETH_ALEN or is_multicast(mac):
            raise ValueError(f"the device MAC must be a 6-byte unicast address, not {bytes(mac).hex()}")
        if not 1 <= max_pairs <= 0x8000:
            raise ValueError(f"max_pairs {max_pairs} is not in 1..0x8000")
        self.max_pairs = max_pairs
        self.num_queues = 2 * max_pairs + 1
        self.queue_max_size = queue_max_size
        super().__init__()
        self.default_mac = bytes(mac)
        self.mtu = mtu
        self._offer = NET_FEATURES & ~without
        self.backend = backend
        self.stats: collections.Counter[str] = collections.Counter()
        self.last_ctrl_error: str | None = None
        self._tx_abort = threading.Event()
        #: serve transmits in C (:meth:`fast_batch`; ``fast_served`` counts the chains it took)
        self.fast_path = True
        self._announce_due = False
        self._flows: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self._reset_net_state()
        self.dispatcher = ControlDispatcher(negotiated=self._negotiated, migration=None)
        for cls in (CtrlClass.RX, CtrlClass.MAC, CtrlClass.VLAN, CtrlClass.ANNOUNCE, CtrlClass.MQ):
            self.dispatcher.register_class(cls, self._class_handler(cls))
        if backend is not None:
            backend.attach(self.receive)

    def _reset_net_state(self) -> None:
        self.mac = self.default_mac
        self.link_up = True
        self.rx_mode = RxModeFlags.PROMISC
        self.unicast: tuple[bytes, ...] = ()
        self.multicast: tuple[bytes, ...] = ()
        self.vlans: set[int] = set()
        self.curr_pairs = 1
        self.announce_pending = False
        self._announce_due = False
        self._flows.clear()

    def _negotiated(self) -> int:
        return self.function.negotiated if self.function is not None else 0

    def has(self, feature: int) -> bool:
        return bool(self._negotiated() & bit(feature))

    # ================================================================== features / config
    def offered_features(self) -> int:
        return self._offer

    def validate_features(self, features: int) -> str | None:
        problems = unmet_requirements(features, NET_REQUIREMENTS, NET_GENERIC_REQUIREMENTS, device_bits=NetFeature)
        return "; ".join(problems) or None

    @property
    def config_size(self) -> int:
        return NET_CONFIG_SIZE

    def status_bits(self) -> NetStatus:
        st = NetStatus.LINK_UP if self.link_up else NetStatus(0)
        if self.announce_pending:
            st |= NetStatus.ANNOUNCE
        return st

    def config_read(self, offset: int, length: int) -> bytes:
        with self._lock:
            cfg = NetConfig(self.mac, self.status_bits(), self.max_pairs, self.mtu).encode()
        return cfg[offset : offset + length]

    def set_link(self, up: bool) -> None:
        """Carrier change (a configuration change: the driver is interrupted)."""
        with self._lock:
            if self.link_up != up:
                self.link_up = up
                if self.mastering:
                    self.config_changed()

    # ================================================================== queues
    def ctrl_queue(self) -> int:
        """The control queue's index under the negotiated features."""
        return 2 * self.max_pairs if self.has(_F.MQ) else 2

    def queue_kind(self, queue: int) -> str | None:
        """'rx', 'tx', 'ctrl' or None (a queue not used under the negotiated features)."""
        if self.has(_F.CTRL_VQ) and queue == self.ctrl_queue():
            return "ctrl"
        if queue < (2 * self.max_pairs if self.has(_F.MQ) else 2):
            return "rx" if queue % 2 == 0 else "tx"
        return None

    def _process_queue(self, queue: int) -> None:
        kind = self.queue_kind(queue)
        if kind == "tx":
            super()._process_queue(queue)
        elif kind == "ctrl":
            self._process_ctrl(queue)
        # rx: buffers wait for frames; nothing to do on a kick

    # ================================================================== transmit
    def handle(self, fn: VirtioPciFunction, queue: int, chain: DescriptorChain) -> bytes | Work:
        n = chain.readable_len
        if n < NET_HDR_SIZE + ETH_HLEN or n > NET_HDR_SIZE + MAX_TX_FRAME:
            self.stats["tx_malformed"] += 1
            return b""  # dropped; the chain completes (used_len 0)
        data = chain.read(fn.port)
        try:
            hdr = NetHdrV1.decode(data[:NET_HDR_SIZE])
        except WireError:
            self.stats["tx_bad_header"] += 1
            return b""
        if hdr.gso is not GsoType.NONE or int(hdr.flags):
            self.stats["tx_bad_header"] += 1  # offloads are not offered
            return b""
        frame = data[NET_HDR_SIZE:]
        self.stats[f"tx_q{queue}"] += 1
        self._learn_flow(frame[0:6], queue // 2)
        backend = self.backend
        if backend is None:
            self.stats["tx_no_backend"] += 1
            return b""
        abort = self._tx_abort
        if len(frame) <= self.inline_max and backend.try_tx_ready(abort):
            # small and the back-end ready now: sent here, on the notification thread (two
            # thread hand-offs less a frame; the send does not block: a full socket or TAP
            # queue is an error, counted, and the frame lost as on the pool)
            try:
                backend.send(frame)
            except BackendError:
                self.stats["tx_errors"] += 1
                return b""
            self.stats["tx_frames"] += 1
            self.stats["tx_bytes"] += len(frame)
            self.stats["tx_inline"] += 1
            return b""

        def transmit() -> bytes:
            if not backend.wait_tx_ready(abort):
                raise _TxNotSent()
            backend.send(frame)
            self.stats["tx_frames"] += 1
            self.stats["tx_bytes"] += len(frame)
            return b""

        return transmit

    # ================================================================== the C transmit fast path
    def fast_batch(self, queue: int) -> int | None:
        """Serve a transmit queue's chains in C (:mod:`virtio_lm.devices.netfast`, see its
        source's header), then send their frames as one burst: on while :attr:`fast_path` is on,
        no fault injection runs, the back-end takes frames with no pause or credit limit (and no
        FREEZE is abandoning sends), frames up to :attr:`inline_max` bytes are sent on the
        notification's path and the memory offers its regions.  It takes only chains the Python
        path would send the same way (as :meth:`handle` does inline), leaving every other one to it."""
        backend = self.backend
        max_frame = min(self.inline_max, MAX_TX_FRAME)
        if (not self.fast_path or self.hold_after is not None or self.function is None or backend is None
                or max_frame < ETH_HLEN or self.queue_kind(queue) != "tx"
                or not backend.tx_unmetered(self._tx_abort)):  # fmt: skip
            return None

        def run(regions: tuple, qs: tuple, journal: tuple | None) -> tuple[tuple | None, int]:
            if journal is not None:  # a vhost-user inflight region: the Python path records it
                return None, journal[2]
            return netfast.tx(regions, qs, max_frame, FAST_TX_BATCH), 0

        r = self.serve_in_c(queue, run)
        if r is None:
            return None
        stop, taken, _, _, _, frames = r[:6]
        if taken:
            self._sent_burst(queue, frames, taken)
        return stop

    def _sent_burst(self, queue: int, frames: list[bytes] | None, taken: int) -> None:
        """The frames of ``taken`` chains the fast path completed: learn their flows (as one by
        one), put them on the wire, count them as :meth:`handle` counts an inline send."""
        st = self.stats
        if frames is None:  # lost for memory after the chains completed: as a failed send
            st["tx_errors"] += taken
            return
        st[f"tx_q{queue}"] += taken
        last: dict[bytes, None] = {}
        for f in frames:  # the flow table ends as if each frame were learned in turn
            d = f[0:6]
            last.pop(d, None)
            last[d] = None
        for d in last:
            self._learn_flow(d, queue // 2)
        backend = self.backend
        assert backend is not None
        try:
            backend.send_many(frames)
        except BackendError:
            st["tx_errors"] += taken
            return
        st["tx_frames"] += taken
        st["tx_bytes"] += sum(len(f) for f in frames)
        st["tx_inline"] += taken

    def runs_inline(self, req: Request) -> bool:
        """Never: a transmit's work may wait for the back-end (a small frame whose back-end is
        ready is sent by :meth:`handle` itself instead)."""
        return False

    def backend_failed(self, queue: int, chain: DescriptorChain, exc: Exception) -> bytes:
        self.stats["tx_errors"] += 1  # the frame is lost, the chain completes
        return b""

    def _learn_flow(self, dst: bytes, pair: int) -> None:
        if is_multicast(dst):
            return
        with self._lock:
            self._flows[bytes(dst)] = pair
            self._flows.move_to_end(bytes(dst))
            while len(self._flows) > FLOW_TABLE_SIZE:
                self._flows.popitem(last=False)

    # ================================================================== receive
    def receive(self, frame: bytes) -> bool:
        """A frame from the back-end; True if it was written into a receive buffer."""
        with self._lock:
            fn = self.function
            if fn is None or not fn.status & _DOK or fn.needs_reset:
                return self._rx_drop("rx_dropped_not_ready")
            if not self.mastering or self.frozen:
                return self._rx_drop("rx_dropped_quiesced")
            if len(frame) < ETH_HLEN:
                return self._rx_drop("rx_runt")
            if not self.accepts(frame):
                return self._rx_drop("rx_filtered")
            q = 2 * self.steer(frame)
            vq = fn.queues[q]
            if not vq.enabled or self.queue_kind(q) != "rx":
                return self._rx_drop("rx_dropped_not_ready")
            chain = vq.pop(fn.port)
            if chain is None:
                return self._rx_drop("rx_no_buffer")
            data = NetHdrV1(num_buffers=1).encode() + bytes(frame)
            if chain.writable_len < len(data):
                vq.push(fn.port, chain.head, 0)  # the driver sees an empty buffer
                vq.notify_driver(fn.port)
                return self._rx_drop("rx_buffer_too_small")
            try:
                written = chain.write(fn.port, data)
            except VirtioLmError as exc:
                vq.broken = True
                fn.set_needs_reset(exc)
                return self._rx_drop("rx_dropped_not_ready")
            vq.push(fn.port, chain.head, written)
            vq.notify_driver(fn.port)
            self.stats[f"rx_q{q}"] += 1
            self.stats["rx_frames"] += 1
            self.stats["rx_bytes"] += len(frame)
            return True

    def _rx_drop(self, reason: str) -> bool:
        self.stats[reason] += 1
        return False

    def accepts(self, frame: bytes) -> bool:
        """The receive filter (see the module docstring)."""
        mode = self.rx_mode
        if mode & RxModeFlags.PROMISC:
            return True
        if self.has(_F.CTRL_VLAN) and len(frame) >= ETH_HLEN + 4 and int.from_bytes(frame[12:14], "big") == ETHERTYPE_VLAN:
            if int.from_bytes(frame[14:16], "big") & 0xFFF not in self.vlans:
                return False
        dst = bytes(frame[0:6])
        if dst == BROADCAST_MAC:
            return not mode & RxModeFlags.NOBCAST
        if is_multicast(dst):
            if mode & RxModeFlags.NOMULTI:
                return False
            return bool(mode & RxModeFlags.ALLMULTI) or dst in self.multicast
        if mode & RxModeFlags.NOUNI:
            return False
        return bool(mode & RxModeFlags.ALLUNI) or dst == self.mac or dst in self.unicast

    def steer(self, frame: bytes) -> int:
        """The queue pair a received frame goes to."""
        if self.curr_pairs == 1:
            return 0
        src = bytes(frame[6:12])
        pair = self._flows.get(src)
        if pair is None or pair >= self.curr_pairs:
            pair = zlib.crc32(src) % self.curr_pairs
        return pair

    # ================================================================== control queue
    def _process_ctrl(self, queue: int) -> None:
        fn = self.fn
        vq = fn.queues[queue]
        generic = self.has(ProposalFeature.GENERIC_CTRL_VQ_VER_1)
        while self.mastering and (chain := vq.pop(fn.port)) is not None:
            oversized = chain.readable_len > MAX_CTRL_READABLE
            readable = b"" if oversized else chain.read(fn.port)  # b"": ERR, no class / command
            if generic:
                outcome = self.dispatcher.handle(readable, chain.writable_len)
                out = outcome.written
                if outcome.reason is not None:
                    self.last_ctrl_error = outcome.reason
            elif chain.writable_len < 1:
                out = b""
                self.last_ctrl_error = "no room for the ack"
            else:
                out = bytes((self._plain_command(readable),))
            if oversized:
                self.last_ctrl_error = f"command of {chain.readable_len} bytes is larger than any valid one"
            ack = out[-1] if out else None
            self.stats["ctrl_ok" if ack == Ack.OK else "ctrl_err"] += 1
            written = chain.write(fn.port, out) if out else 0
            vq.push(fn.port, chain.head, written)
        if self.mastering:
            vq.notify_driver(fn.port)

    def _plain_command(self, readable: bytes) -> int:
        if len(readable) < 2:
            self.last_ctrl_error = f"command of {len(readable)} bytes has no class and command"
            return Ack.ERR
        try:
            self.command(readable[0], readable[1], readable[2:])
        except (CommandRefusedError, WireError) as exc:
            self.last_ctrl_error = str(exc)
            return Ack.ERR
        return Ack.OK

    def _class_handler(self, cls: int) -> Callable[[int, bytes, int], bytes]:
        def handler(cmd: int, data: bytes, space: int) -> bytes:
            self.command(cls, cmd, data)
            return b""

        return handler

    def command(self, cls: int, cmd: int, data: bytes) -> None:
        """Execute one control command; raise CommandRefusedError / WireError (ERR)."""
        name = f"net ctrl class {cls} command {cmd}"
        decoder = CTRL_DECODERS.get((cls, cmd))
        if decoder is None:
            raise CommandRefusedError(name, None, None, "no such command")
        need = _CLASS_FEATURE.get(CtrlClass(cls))
        if cls == CtrlClass.MAC:
            need = _F.CTRL_RX if cmd == MacCmd.TABLE_SET else _F.CTRL_MAC_ADDR
        if need is not None and not self.has(need):
            raise CommandRefusedError(name, None, None, f"{NetFeature(need).name} not negotiated")
        value = decoder(data)
        with self._lock:
            self._apply(name, CtrlClass(cls), cmd, value)

    def _apply(self, name: str, cls: CtrlClass, cmd: int, value: object) -> None:
        if cls is CtrlClass.RX:
            flag = _RX_CMD_FLAG[RxCmd(cmd)]
            if flag & _RX_EXTRA and not self.has(_F.CTRL_RX_EXTRA):
                raise CommandRefusedError(name, None, None, "VIRTIO_NET_F_CTRL_RX_EXTRA not negotiated")
            self.rx_mode = self.rx_mode | flag if value else self.rx_mode & ~flag
        elif cls is CtrlClass.MAC and cmd == MacCmd.TABLE_SET:
            assert isinstance(value, MacTables)
            for tname, table in (("unicast", value.unicast), ("multicast", value.multicast)):
                if len(table) > MAC_TABLE_ENTRIES:
                    raise CommandRefusedError(name, None, None, f"{len(table)} {tname} entries > {MAC_TABLE_ENTRIES}")
            self.unicast, self.multicast = value.unicast, value.multicast
        elif cls is CtrlClass.MAC:
            assert isinstance(value, bytes)
            if is_multicast(value):
                raise CommandRefusedError(name, None, None, f"{value.hex()} is a group address")
            self.mac = value
        elif cls is CtrlClass.VLAN:
            assert isinstance(value, int)
            if cmd == VlanCmd.ADD:
                self.vlans.add(value)
            else:
                self.vlans.discard(value)
        elif cls is CtrlClass.ANNOUNCE:
            assert cmd == AnnounceCmd.ACK
            if not self.announce_pending:
                raise CommandRefusedError(name, None, None, "no announce is pending")
            self.announce_pending = False
            self.stats["announce_acked"] += 1
        elif cls is CtrlClass.MQ:
            assert cmd == MqCmd.VQ_PAIRS_SET and isinstance(value, int)
            if value > self.max_pairs:
                raise CommandRefusedError(name, None, None, f"{value} pairs > max_virtqueue_pairs {self.max_pairs}")
            self.curr_pairs = value

    # ================================================================== lifecycle
    def reset(self) -> None:
        self._tx_abort.set()  # a send waiting for link credit gives up
        super().reset()
        with self._lock:
            self._tx_abort.clear()
            self._reset_net_state()

    def close(self) -> None:
        self._tx_abort.set()
        if self.backend is not None:
            self.backend.close()
        super().close()

    # ================================================================== migration
    def mig_freeze(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._tx_abort.set()  # sends still waiting for the link are not executed
            if self.backend is not None:
                self.backend.wake_tx()
            super().mig_freeze(timeout)

    def mig_resume(self) -> None:
        with self._lock:
            self._tx_abort.clear()
            super().mig_resume()
            fn = self.fn
            if self._announce_due and fn.status & _DOK and not fn.needs_reset:
                self._announce_due = False
                self.announce()

    def set_active_pairs(self, pairs: int) -> None:
        """The queue pairs in use, set by a transport that sees the driver's VQ_PAIRS_SET only
        as queues turned on and off (vhost-user: the front-end keeps the control queue)."""
        if not 1 <= pairs <= self.max_pairs:
            raise ValueError(f"{pairs} pairs not in 1..{self.max_pairs}")
        with self._lock:
            self.curr_pairs = pairs

    def send_rarp(self, mac: bytes) -> None:
        """Put the RARP announce of ``mac`` on the back-end (vhost-user's SEND_RARP: the
        front-end names the guest's MAC, which it owns)."""
        if self.backend is None:
            self.stats["announce_no_backend"] += 1
            return
        try:
            self.backend.send(announce_frame(mac))
        except VirtioLmError:  # the announce is lost, like any frame the back-end fails to send
            self.stats["announce_errors"] += 1
            return
        self.stats["self_announce"] += 1

    def announce(self) -> None:
        """Make this VF's MAC known at its (new) place on the network."""
        with self._lock:
            if self.has(_F.GUEST_ANNOUNCE):
                self.announce_pending = True
                self.stats["announce_requested"] += 1
                self.config_changed()
            elif self.backend is not None:
                self.backend.send(announce_frame(self.mac))
                self.stats["self_announce"] += 1

    def save_device_records(self) -> list[tuple[int, bytes]]:
        flags = NetStateFlags.ANNOUNCE_PENDING if self.announce_pending else NetStateFlags(0)
        rec = NetStateRecord(self.mac, int(self.status_bits()), int(self.rx_mode), self.curr_pairs, int(flags))
        return [
            (NetRecordType.NET_STATE, rec.encode()),
            (NetRecordType.NET_MACS, MacTables(self.unicast, self.multicast).encode()),
            (NetRecordType.NET_VLANS, encode_vlans(self.vlans)),
        ]

    def validate_device_records(self, image: StateImage, snap: FunctionSnapshot) -> NetState:
        f = snap.function
        negotiated = f.driver_features if f.status & _FOK else 0

        def has(feat: int) -> bool:
            return bool(negotiated & bit(feat))

        known = {int(t) for t in NetRecordType}
        for r in image.records:
            if r.type == RecordType.CONFIG or (r.type >= DEVICE_RECORD_BASE and r.type not in known):
                raise StateImageError(f"record type {r.type:#x}", "not a virtio-net record")
        payload: dict[NetRecordType, bytes] = {}
        for t in NetRecordType:
            recs = image.of_type(t)
            if len(recs) != 1:
                raise StateImageError(t.name, f"exactly one record expected, got {len(recs)}")
            payload[t] = recs[0].payload
        try:
            st = NetStateRecord.decode(payload[NetRecordType.NET_STATE])
        except WireError as exc:
            raise StateImageError("NET_STATE", str(exc)) from exc
        if is_multicast(st.mac):
            raise StateImageError("NET_STATE.mac", f"{st.mac.hex()} is a group address")
        if st.status & ~_STATUS_BITS:
            raise StateImageError("NET_STATE.status", f"unknown bits {st.status:#x}")
        if st.flags & NetStateFlags.SELF_ANNOUNCE_DUE:
            # reserved: this device keeps no such state across a save (a restored device
            # announces itself at its first RUN anyway), so it could not save it back
            raise StateImageError("NET_STATE.flags", "SELF_ANNOUNCE_DUE is reserved and must be 0")
        pending = bool(st.flags & NetStateFlags.ANNOUNCE_PENDING)
        if pending != bool(st.status & NetStatus.ANNOUNCE):
            raise StateImageError("NET_STATE.flags", "announce pending disagrees with the ANNOUNCE status bit")
        if pending and not has(_F.GUEST_ANNOUNCE):
            raise StateImageError("NET_STATE.flags", "announce pending without VIRTIO_NET_F_GUEST_ANNOUNCE")
        mode = RxModeFlags(st.rx_mode)
        if mode & _RX_EXTRA and not has(_F.CTRL_RX_EXTRA):
            raise StateImageError("NET_STATE.rx_mode", "RX_EXTRA modes without VIRTIO_NET_F_CTRL_RX_EXTRA")
        if not 1 <= st.curr_pairs <= self.max_pairs:
            raise StateImageError("NET_STATE.curr_pairs", f"{st.curr_pairs} not in 1..{self.max_pairs}")
        if st.curr_pairs > 1 and not has(_F.MQ):
            raise StateImageError("NET_STATE.curr_pairs", f"{st.curr_pairs} pairs without VIRTIO_NET_F_MQ")
        try:
            tables = decode_mac_tables(payload[NetRecordType.NET_MACS])
        except WireError as exc:
            raise StateImageError("NET_MACS", str(exc)) from exc
        for tname, table in (("unicast", tables.unicast), ("multicast", tables.multicast)):
            if len(table) > MAC_TABLE_ENTRIES:
                raise StateImageError(f"NET_MACS.{tname}", f"{len(table)} entries > {MAC_TABLE_ENTRIES}")
            if table and not has(_F.CTRL_RX):
                raise StateImageError(f"NET_MACS.{tname}", "MAC filter entries without VIRTIO_NET_F_CTRL_RX")
        try:
            vlans = decode_vlans(payload[NetRecordType.NET_VLANS])
        except WireError as exc:
            raise StateImageError("NET_VLANS", str(exc)) from exc
        if vlans and not has(_F.CTRL_VLAN):
            raise StateImageError("NET_VLANS", "VLAN filter entries without VIRTIO_NET_F_CTRL_VLAN")
        return NetState(
            mac=st.mac,
            link_up=bool(st.status & NetStatus.LINK_UP),
            rx_mode=mode,
            curr_pairs=st.curr_pairs,
            announce_pending=pending,
            unicast=tables.unicast,
            multicast=tables.multicast,
            vlans=vlans,
        )

    # ================================================================== virtio 1.4 device parts
    device_part_types = frozenset({int(PartType.NET_CVQ_CFG)})

    def save_device_parts(self) -> list[DevPart]:
        """One CVQ_CFG part per control-queue configuration the negotiated features allow."""
        out: list[DevPart] = []
        with self._lock:
            for cls, cmd, need in _CVQ_PARTS:
                if not self.has(need):
                    continue
                if cls == CtrlClass.RX:
                    flag = _RX_CMD_FLAG[RxCmd(cmd)]
                    value = encode_rx_onoff(bool(self.rx_mode & flag))
                elif (cls, cmd) == (CtrlClass.MAC, MacCmd.TABLE_SET):
                    value = MacTables(self.unicast, self.multicast).encode()
                elif cls == CtrlClass.MAC:
                    value = encode_mac_addr(self.mac)
                elif cls == CtrlClass.VLAN:
                    value = encode_vlans(self.vlans)  # the whole VLAN table, ascending le16 ids
                else:
                    value = encode_mq_pairs(self.curr_pairs)
                out.append(DevPart.make(PartType.NET_CVQ_CFG, value, selector=NetCvqSelector(cls, cmd).encode()))
        return out

    def max_device_parts_size(self) -> int:
        tables = 2 * (4 + MAC_TABLE_ENTRIES * ETH_ALEN)
        values = 1 + 1 + tables + ETH_ALEN + 2 * 4096 + 2  # PROMISC, ALLMULTI, TABLE_SET, ADDR_SET, VLANs, pairs
        return len(_CVQ_PARTS) * PART_HDR_SIZE + values

    def validate_device_parts(self, parts: list[DevPart], negotiated: int) -> NetState:
        """Check CVQ_CFG parts; the result is the device's state with them applied."""
        with self._lock:
            mac, mode, pairs = self.mac, self.rx_mode, self.curr_pairs
            unicast, multicast, vlans = self.unicast, self.multicast, frozenset(self.vlans)
        for p in parts:
            try:
                sel = NetCvqSelector.decode(p.hdr.selector)
            except WireError as exc:
                raise DevicePartsError("NET_CVQ_CFG", str(exc)) from exc
            name = f"NET_CVQ_CFG/{sel.cls}:{sel.command}"
            need = _CVQ_NEED.get((sel.cls, sel.command))
            if need is None:
                if p.hdr.optional:
                    continue
                raise DevicePartsError(name, "not a control command this device restores")
            if not negotiated & bit(need):
                raise DevicePartsError(name, f"{NetFeature(need).name} is not negotiated")
            try:
                if sel.cls == CtrlClass.RX:
                    flag = _RX_CMD_FLAG[RxCmd(sel.command)]
                    mode = mode | flag if decode_rx_onoff(p.value) else mode & ~flag
                elif (sel.cls, sel.command) == (CtrlClass.MAC, MacCmd.TABLE_SET):
                    tables = decode_mac_tables(p.value)
                    for tname, table in (("unicast", tables.unicast), ("multicast", tables.multicast)):
                        if len(table) > MAC_TABLE_ENTRIES:
                            raise DevicePartsError(name, f"{len(table)} {tname} entries > {MAC_TABLE_ENTRIES}")
                    unicast, multicast = tables.unicast, tables.multicast
                elif sel.cls == CtrlClass.MAC:
                    mac = decode_mac_addr(p.value)
                    if is_multicast(mac):
                        raise DevicePartsError(name, f"{mac.hex()} is a group address")
                elif sel.cls == CtrlClass.VLAN:
                    vlans = decode_vlans(p.value)
                else:
                    pairs = decode_mq_pairs(p.value)
                    if pairs > self.max_pairs:
                        raise DevicePartsError(name, f"{pairs} pairs > max_virtqueue_pairs {self.max_pairs}")
            except WireError as exc:
                raise DevicePartsError(name, str(exc)) from exc
        return NetState(
            mac=mac, link_up=self.link_up, rx_mode=mode, curr_pairs=pairs, announce_pending=False,
            unicast=unicast, multicast=multicast, vlans=vlans,
        )

    def restore_device_parts(self, parsed: object) -> None:
        assert isinstance(parsed, NetState)
        with self._lock:
            self.restore_device_records(parsed)

    def restore_device_records(self, parsed: object) -> None:
        assert isinstance(parsed, NetState)
        self.mac = parsed.mac
        self.link_up = parsed.link_up
        self.rx_mode = parsed.rx_mode
        self.curr_pairs = parsed.curr_pairs
        self.announce_pending = parsed.announce_pending
        self.unicast, self.multicast = parsed.unicast, parsed.multicast
        self.vlans = set(parsed.vlans)
        self._flows.clear()
        self._announce_due = True  # restored: announce at the next RUN
