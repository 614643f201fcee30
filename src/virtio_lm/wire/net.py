"""virtio-net wire formats (virtio 1.x, 5.1 "Network Device") and Ethernet helpers.

Every packet on a receive or transmit queue starts with a 12-byte
``virtio_net_hdr_v1`` (:class:`NetHdrV1`; VERSION_1 devices always use the
header with ``num_buffers``), followed by the Ethernet frame.

The control queue (with VIRTIO_NET_F_CTRL_VQ) carries ``u8 class; u8 command;
data[]`` and the device answers with a one-byte ack (:class:`NetAck`).  The
commands a virtio-lm net device implements have decoders/encoders here, one
per command (:data:`CTRL_DECODERS`); every decoder takes exactly the command's
data and refuses short, trailing and out-of-range input with a typed error
naming the field.

Ethernet is big-endian ("network order") unlike everything else in virtio;
the frame helpers at the end of the module do their own byte order.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable

from virtio_lm.errors import EnumValueError, FieldValueError, ShortBufferError, TrailingDataError
from virtio_lm.wire.codec import flags_field, layout, read_u16, read_u32, u16, u32

ETH_ALEN = 6


# ------------------------------------------------------------------ feature bits
class NetFeature(enum.IntEnum):
    """virtio-net feature bits (device specific ranges 0..23 and 50..)."""

    CSUM = 0
    GUEST_CSUM = 1
    CTRL_GUEST_OFFLOADS = 2
    MTU = 3
    MAC = 5
    GUEST_TSO4 = 7
    GUEST_TSO6 = 8
    GUEST_ECN = 9
    GUEST_UFO = 10
    HOST_TSO4 = 11
    HOST_TSO6 = 12
    HOST_ECN = 13
    HOST_UFO = 14
    MRG_RXBUF = 15
    STATUS = 16
    CTRL_VQ = 17
    CTRL_RX = 18
    CTRL_VLAN = 19
    CTRL_RX_EXTRA = 20
    GUEST_ANNOUNCE = 21
    MQ = 22
    CTRL_MAC_ADDR = 23
    NOTF_COAL = 53
    HASH_REPORT = 57
    RSS = 60
    RSC_EXT = 61
    STANDBY = 62
    SPEED_DUPLEX = 63


_F = NetFeature
#: Feature dependencies of virtio 1.x 5.1.3.1 (each group: any one of its bits).
NET_REQUIREMENTS: dict[int, tuple[tuple[int, ...], ...]] = {
    _F.GUEST_TSO4: ((_F.GUEST_CSUM,),),
    _F.GUEST_TSO6: ((_F.GUEST_CSUM,),),
    _F.GUEST_ECN: ((_F.GUEST_TSO4, _F.GUEST_TSO6),),
    _F.GUEST_UFO: ((_F.GUEST_CSUM,),),
    _F.HOST_TSO4: ((_F.CSUM,),),
    _F.HOST_TSO6: ((_F.CSUM,),),
    _F.HOST_ECN: ((_F.HOST_TSO4, _F.HOST_TSO6),),
    _F.HOST_UFO: ((_F.CSUM,),),
    _F.CTRL_RX: ((_F.CTRL_VQ,),),
    _F.CTRL_VLAN: ((_F.CTRL_VQ,),),
    _F.GUEST_ANNOUNCE: ((_F.CTRL_VQ,),),
    _F.MQ: ((_F.CTRL_VQ,),),
    _F.CTRL_MAC_ADDR: ((_F.CTRL_VQ,),),
    _F.CTRL_RX_EXTRA: ((_F.CTRL_RX,),),
    _F.RSS: ((_F.CTRL_VQ,),),
}
del _F


# ------------------------------------------------------------------ packet header
class NetHdrFlags(enum.IntFlag):
    NEEDS_CSUM = 1
    DATA_VALID = 2
    RSC_INFO = 4


class GsoType(enum.IntEnum):
    """``gso_type`` without the ECN bit."""

    NONE = 0
    TCPV4 = 1
    UDP = 3
    TCPV6 = 4
    UDP_L4 = 5


GSO_ECN = 0x80


@layout("<BBHHHHH")
@dataclass(frozen=True, slots=True)
class NetHdrV1:
    """``struct virtio_net_hdr_v1`` (12 bytes).

    ``gso_type`` is a :class:`GsoType` value, optionally with the ECN bit
    (0x80); anything else is refused with EnumValueError naming ``gso_type``.
    ``csum_start``/``csum_offset`` are the RSC ``segments``/``dup_acks`` when
    RSC_INFO is set (same bytes).
    """

    flags: NetHdrFlags = flags_field(NetHdrFlags, NetHdrFlags(0))
    gso_type: int = 0
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    def __post_init__(self) -> None:
        raw = int(self.gso_type)
        if not 0 <= raw <= 0xFF or (raw & ~GSO_ECN) not in GsoType._value2member_map_:
            raise EnumValueError(
                "virtio_net_hdr_v1", "gso_type", raw, [int(m) for m in GsoType] + ["|0x80"]
            )

    @property
    def gso(self) -> GsoType:
        return GsoType(self.gso_type & ~GSO_ECN)

    @property
    def ecn(self) -> bool:
        return bool(self.gso_type & GSO_ECN)


NET_HDR_SIZE = NetHdrV1.SIZE  # type: ignore[attr-defined]


# ------------------------------------------------------------------ config space
class NetStatus(enum.IntFlag):
    LINK_UP = 1
    ANNOUNCE = 2


class Duplex(enum.IntEnum):
    HALF = 0
    FULL = 1
    UNKNOWN = 0xFF


SPEED_UNKNOWN = 0xFFFF_FFFF


@layout("<6sHHHIBBHI")
@dataclass(frozen=True, slots=True)
class NetConfig:
    """``struct virtio_net_config`` (24 bytes, as Linux's ``linux/virtio_net.h``).

    ``max_virtqueue_pairs`` is 1..0x8000 (0 is accepted too: the field is
    only meaningful with MQ, and a device without MQ may leave it 0).
    ``speed`` in Mb/s (0..INT_MAX, anything else means unknown).
    """

    mac: bytes = bytes(ETH_ALEN)
    status: NetStatus = flags_field(NetStatus, NetStatus(0))
    max_virtqueue_pairs: int = 1
    mtu: int = 1500
    speed: int = SPEED_UNKNOWN
    duplex: int = Duplex.UNKNOWN
    rss_max_key_size: int = 0
    rss_max_indirection_table_length: int = 0
    supported_hash_types: int = 0

    def __post_init__(self) -> None:
        if self.max_virtqueue_pairs > MQ_VQ_PAIRS_MAX:
            raise FieldValueError(
                "virtio_net_config", "max_virtqueue_pairs", self.max_virtqueue_pairs, "at most 0x8000"
            )


NET_CONFIG_SIZE = NetConfig.SIZE  # type: ignore[attr-defined]


# ------------------------------------------------------------------ control queue
class NetAck(enum.IntEnum):
    OK = 0
    ERR = 1


class CtrlClass(enum.IntEnum):
    RX = 0
    MAC = 1
    VLAN = 2
    ANNOUNCE = 3
    MQ = 4
    GUEST_OFFLOADS = 5
    NOTF_COAL = 6


class RxCmd(enum.IntEnum):
    PROMISC = 0
    ALLMULTI = 1
    ALLUNI = 2
    NOMULTI = 3
    NOUNI = 4
    NOBCAST = 5


class MacCmd(enum.IntEnum):
    TABLE_SET = 0
    ADDR_SET = 1


class VlanCmd(enum.IntEnum):
    ADD = 0
    DEL = 1


class AnnounceCmd(enum.IntEnum):
    ACK = 0


class MqCmd(enum.IntEnum):
    VQ_PAIRS_SET = 0
    RSS_CONFIG = 1  # listed, not implemented by virtio-lm
    HASH_CONFIG = 2  # listed, not implemented by virtio-lm


class GuestOffloadsCmd(enum.IntEnum):
    SET = 0  # listed, not implemented by virtio-lm


MQ_VQ_PAIRS_MIN = 1
MQ_VQ_PAIRS_MAX = 0x8000
VLAN_ID_LIMIT = 4096  # vids are 0..4095

#: Commands of every class, for the control queue dispatcher.
CTRL_COMMANDS: dict[CtrlClass, type[enum.IntEnum]] = {
    CtrlClass.RX: RxCmd,
    CtrlClass.MAC: MacCmd,
    CtrlClass.VLAN: VlanCmd,
    CtrlClass.ANNOUNCE: AnnounceCmd,
    CtrlClass.MQ: MqCmd,
    CtrlClass.GUEST_OFFLOADS: GuestOffloadsCmd,
}


def _exact(layout_name: str, field: str, data: bytes | bytearray | memoryview, size: int) -> bytes:
    if len(data) < size:
        raise ShortBufferError(layout_name, field, size, len(data))
    if len(data) > size:
        raise TrailingDataError(layout_name, size, len(data))
    return bytes(data)


# RX class: one byte, 0 (off) or 1 (on)
def decode_rx_onoff(data: bytes | bytearray | memoryview) -> bool:
    raw = _exact("virtio_net_ctrl_rx", "on", data, 1)[0]
    if raw not in (0, 1):
        raise FieldValueError("virtio_net_ctrl_rx", "on", raw, "0 or 1")
    return bool(raw)


def encode_rx_onoff(on: bool) -> bytes:
    return b"\x01" if on else b"\x00"


# MAC class
def decode_mac_addr(data: bytes | bytearray | memoryview) -> bytes:
    """MAC ADDR_SET: exactly 6 bytes."""
    return _exact("virtio_net_ctrl_mac_addr", "mac", data, ETH_ALEN)


def encode_mac_addr(mac: bytes) -> bytes:
    return _exact("virtio_net_ctrl_mac_addr", "mac", mac, ETH_ALEN)


@dataclass(frozen=True, slots=True)
class MacTables:
    """MAC TABLE_SET: the unicast then the multicast filter table."""

    unicast: tuple[bytes, ...]
    multicast: tuple[bytes, ...]

    def encode(self) -> bytes:
        out = bytearray()
        for name, table in (("unicast", self.unicast), ("multicast", self.multicast)):
            out += u32(len(table))
            for mac in table:
                if len(mac) != ETH_ALEN:
                    raise FieldValueError("virtio_net_ctrl_mac", f"{name}.macs", mac, "6-byte addresses")
                out += mac
        return bytes(out)


_MAC_LAYOUT = "virtio_net_ctrl_mac"


class MacTableParser:
    """Incremental decoder of the TABLE_SET data ``le32 n; u8 macs[n][6]`` x 2.

    ``total`` is the length of the whole command data (the readable bytes of
    the chain minus the 2-byte header), known before the first byte arrives,
    so that an ``entries`` count larger than the bytes left is refused as soon
    as it is read (FieldValueError naming ``<table>.entries``), bytes beyond
    the second table are refused as soon as they arrive (TrailingDataError)
    and :meth:`finish` refuses data that stops early (ShortBufferError).
    A refused parser stays refused.
    """

    _TABLES = ("unicast", "multicast")

    def __init__(self, total: int) -> None:
        if total < 0:
            raise FieldValueError(_MAC_LAYOUT, None, total, "total length not negative")
        self.total = total
        self._consumed = 0
        self._table = 0  # 0 unicast, 1 multicast, 2 done
        self._pending = bytearray()  # bytes of the current count or address
        self._left = -1  # addresses still to read in this table; -1: reading the count
        self._tables: list[list[bytes]] = [[], []]
        self._error: Exception | None = None

    @property
    def done(self) -> bool:
        return self._table == 2

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        try:
            self._feed(bytes(chunk))
        except Exception as exc:
            self._error = exc
            raise

    def _feed(self, chunk: bytes) -> None:
        if self._consumed + len(chunk) > self.total:
            raise FieldValueError(
                _MAC_LAYOUT, None, self._consumed + len(chunk), f"fed more than the announced {self.total} bytes"
            )
        pos = 0
        while pos < len(chunk):
            if self._table == 2:
                raise TrailingDataError(_MAC_LAYOUT, self._consumed + pos, self.total)
            need = (4 if self._left < 0 else ETH_ALEN) - len(self._pending)
            take = chunk[pos : pos + need]
            self._pending += take
            pos += len(take)
            if len(take) < need:
                break
            name = self._TABLES[self._table]
            if self._left < 0:
                entries = read_u32(self._pending)
                room = self.total - (self._consumed + pos)  # bytes after this count
                if entries * ETH_ALEN > room:
                    raise FieldValueError(
                        _MAC_LAYOUT, f"{name}.entries", entries, f"entries * 6 fit in the {room} bytes left"
                    )
                self._left = entries
            else:
                self._tables[self._table].append(bytes(self._pending))
                self._left -= 1
            self._pending.clear()
            if self._left == 0:
                self._table += 1
                self._left = -1
        self._consumed += len(chunk)

    def finish(self) -> MacTables:
        if self._error is not None:
            raise self._error
        if not self.done:
            name = self._TABLES[self._table]
            field = f"{name}.entries" if self._left < 0 else f"{name}.macs"
            need = (4 if self._left < 0 else ETH_ALEN * self._left) - len(self._pending)
            self._error = ShortBufferError(_MAC_LAYOUT, field, self._consumed + need, self._consumed)
            raise self._error
        return MacTables(tuple(self._tables[0]), tuple(self._tables[1]))


def decode_mac_tables(data: bytes | bytearray | memoryview) -> MacTables:
    """MAC TABLE_SET data, all at once (same rules as :class:`MacTableParser`)."""
    parser = MacTableParser(len(data))
    parser.feed(data)
    return parser.finish()


# VLAN class: le16 vid < 4096
def decode_vlan_id(data: bytes | bytearray | memoryview) -> int:
    vid = read_u16(_exact("virtio_net_ctrl_vlan", "vid", data, 2))
    if vid >= VLAN_ID_LIMIT:
        raise FieldValueError("virtio_net_ctrl_vlan", "vid", vid, "below 4096")
    return vid


def encode_vlan_id(vid: int) -> bytes:
    if not 0 <= vid < VLAN_ID_LIMIT:
        raise FieldValueError("virtio_net_ctrl_vlan", "vid", vid, "below 4096")
    return u16(vid)


# ANNOUNCE class: ACK carries no data
def decode_announce_ack(data: bytes | bytearray | memoryview) -> None:
    _exact("virtio_net_ctrl_announce", None, data, 0)  # type: ignore[arg-type]


# MQ class: le16 virtqueue_pairs in 1..0x8000
def decode_mq_pairs(data: bytes | bytearray | memoryview) -> int:
    pairs = read_u16(_exact("virtio_net_ctrl_mq", "virtqueue_pairs", data, 2))
    if not MQ_VQ_PAIRS_MIN <= pairs <= MQ_VQ_PAIRS_MAX:
        raise FieldValueError("virtio_net_ctrl_mq", "virtqueue_pairs", pairs, "1..0x8000")
    return pairs


def encode_mq_pairs(pairs: int) -> bytes:
    if not MQ_VQ_PAIRS_MIN <= pairs <= MQ_VQ_PAIRS_MAX:
        raise FieldValueError("virtio_net_ctrl_mq", "virtqueue_pairs", pairs, "1..0x8000")
    return u16(pairs)


#: ``(class, command) -> decoder(data)`` for every command virtio-lm implements.
CTRL_DECODERS: dict[tuple[int, int], Callable[[bytes], Any]] = {
    **{(CtrlClass.RX, cmd): decode_rx_onoff for cmd in RxCmd},
    (CtrlClass.MAC, MacCmd.TABLE_SET): decode_mac_tables,
    (CtrlClass.MAC, MacCmd.ADDR_SET): decode_mac_addr,
    (CtrlClass.VLAN, VlanCmd.ADD): decode_vlan_id,
    (CtrlClass.VLAN, VlanCmd.DEL): decode_vlan_id,
    (CtrlClass.ANNOUNCE, AnnounceCmd.ACK): decode_announce_ack,
    (CtrlClass.MQ, MqCmd.VQ_PAIRS_SET): decode_mq_pairs,
}


def encode_ctrl(cls: int, cmd: int, data: bytes = b"") -> bytes:
    """The device-readable part of a net control command: class, command, data."""
    for name, v in (("class", cls), ("command", cmd)):
        if not 0 <= v <= 0xFF:
            raise FieldValueError("virtio_net_ctrl_hdr", name, v, "fits in u8")
    return bytes((cls, cmd)) + bytes(data)


# ------------------------------------------------------------------ Ethernet
ETH_HLEN = 14
ETH_ZLEN = 60  # minimum frame length without the FCS
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
ETHERTYPE_RARP = 0x8035
ETHERTYPE_VLAN = 0x8100
BROADCAST_MAC = b"\xff" * ETH_ALEN


def parse_mac(text: str) -> bytes:
    """``"52:54:00:12:34:56"`` -> 6 bytes."""
    parts = text.split(":")
    try:
        if len(parts) != ETH_ALEN or not all(len(p) == 2 for p in parts):
            raise ValueError(text)
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise FieldValueError("mac", None, text, "six colon-separated hex bytes") from None


def format_mac(mac: bytes) -> str:
    if len(mac) != ETH_ALEN:
        raise FieldValueError("mac", None, mac, "6 bytes")
    return ":".join(f"{b:02x}" for b in mac)


def is_multicast(mac: bytes) -> bool:
    """Group address (broadcast included): the I/G bit of the first octet."""
    return bool(mac[0] & 1)


@dataclass(frozen=True, slots=True)
class EthFrame:
    dst: bytes
    src: bytes
    ethertype: int
    payload: bytes

    def encode(self) -> bytes:
        return eth_header(self.dst, self.src, self.ethertype) + self.payload


def eth_header(dst: bytes, src: bytes, ethertype: int) -> bytes:
    for name, mac in (("dst", dst), ("src", src)):
        if len(mac) != ETH_ALEN:
            raise FieldValueError("ethhdr", name, mac, "6 bytes")
    if not 0 <= ethertype <= 0xFFFF:
        raise FieldValueError("ethhdr", "ethertype", ethertype, "fits in u16")
    return bytes(dst) + bytes(src) + ethertype.to_bytes(2, "big")


def parse_eth(frame: bytes | bytearray | memoryview) -> EthFrame:
    if len(frame) < ETH_HLEN:
        raise ShortBufferError("ethhdr", None, ETH_HLEN, len(frame))
    raw = bytes(frame)
    return EthFrame(raw[0:6], raw[6:12], int.from_bytes(raw[12:14], "big"), raw[ETH_HLEN:])


# RARP (RFC 903) as the self-announce packet of a migrated NIC
ARPHRD_ETHER = 1
RARP_OP_REQUEST_REVERSE = 3
RARP_PAYLOAD_LEN = 28


def announce_frame(mac: bytes) -> bytes:
    """The gratuitous RARP a hypervisor sends for a NIC after migration.

    Broadcast, source ``mac``, ethertype 0x8035; hardware type Ethernet,
    protocol IPv4, opcode 3 (reverse request), sender and target hardware
    address ``mac``, both protocol addresses 0.0.0.0; zero-padded to the
    60-byte minimum frame (the FCS is not included).
    """
    if len(mac) != ETH_ALEN:
        raise FieldValueError("rarp", "mac", mac, "6 bytes")
    payload = (
        ARPHRD_ETHER.to_bytes(2, "big")
        + ETHERTYPE_IPV4.to_bytes(2, "big")
        + bytes((ETH_ALEN, 4))
        + RARP_OP_REQUEST_REVERSE.to_bytes(2, "big")
        + bytes(mac)
        + bytes(4)
        + bytes(mac)
        + bytes(4)
    )
    frame = eth_header(BROADCAST_MAC, mac, ETHERTYPE_RARP) + payload
    return frame.ljust(ETH_ZLEN, b"\0")


def parse_announce(frame: bytes | bytearray | memoryview) -> bytes | None:
    """The announced MAC if ``frame`` is such a RARP announce, else ``None``."""
    try:
        eth = parse_eth(frame)
    except ShortBufferError:
        return None
    p = eth.payload
    if eth.ethertype != ETHERTYPE_RARP or len(p) < RARP_PAYLOAD_LEN:
        return None
    if (
        int.from_bytes(p[0:2], "big") != ARPHRD_ETHER
        or int.from_bytes(p[2:4], "big") != ETHERTYPE_IPV4
        or p[4] != ETH_ALEN
        or p[5] != 4
        or int.from_bytes(p[6:8], "big") != RARP_OP_REQUEST_REVERSE
        or p[8:14] != eth.src
    ):
        return None
    return eth.src
