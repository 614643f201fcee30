"""virtio-net device records of the state image, and the test-traffic payload.

A net VF's image (see :mod:`virtio_lm.wire.state`) carries, besides the
common FUNCTION / QUEUE / INFLIGHT records, three device records::

    0x100 NET_STATE     NetStateRecord (16 bytes, fixed)
    0x101 NET_MACS      MAC TABLE_SET data: le32 n; u8 mac[n][6]; le32 m; u8 mac[m][6]
                        (the same bytes as the control command, :class:`MacTables`)
    0x102 NET_VLANS     le16 vid[k], ascending, each < 4096, no repeats

Exactly one of each is present.  This module decodes their layout; the
device checks their meaning (negotiated features, table limits, queue pairs
within its maximum).

:class:`SeqPayload` is the body of the sequence-numbered frames the outside
peer (:mod:`virtio_lm.net.peer`) and the tests exchange: a magic, the
sender's stream id and a 64-bit sequence number.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from virtio_lm.errors import FieldValueError, ShortBufferError
from virtio_lm.wire.codec import layout, read_u16, reserved, u16
from virtio_lm.wire.net import VLAN_ID_LIMIT


class NetRecordType(enum.IntEnum):
    NET_STATE = 0x100
    NET_MACS = 0x101
    NET_VLANS = 0x102


class RxModeFlags(enum.IntFlag):
    """The RX-mode switches of the CTRL_RX class, one bit each."""

    PROMISC = 1 << 0
    ALLMULTI = 1 << 1
    ALLUNI = 1 << 2
    NOMULTI = 1 << 3
    NOUNI = 1 << 4
    NOBCAST = 1 << 5


class NetStateFlags(enum.IntFlag):
    ANNOUNCE_PENDING = 1 << 0  # the ANNOUNCE status bit is set, not yet acked
    SELF_ANNOUNCE_DUE = 1 << 1  # reserved for a device announce not yet sent


@layout("<6sHHHHH")
@dataclass(frozen=True, slots=True)
class NetStateRecord:
    """NET_STATE: MAC, config status, RX mode, queue pairs in use (16 bytes)."""

    mac: bytes
    status: int
    rx_mode: int
    curr_pairs: int
    flags: int
    reserved: int = reserved()

    def __post_init__(self) -> None:
        if int(self.rx_mode) & ~int(_RX_MASK):
            raise FieldValueError("NetStateRecord", "rx_mode", self.rx_mode, f"only bits {int(_RX_MASK):#x}")
        if int(self.flags) & ~int(_FLAGS_MASK):
            raise FieldValueError("NetStateRecord", "flags", self.flags, f"only bits {int(_FLAGS_MASK):#x}")


_RX_MASK = RxModeFlags(0)
for _m in RxModeFlags:
    _RX_MASK |= _m
_FLAGS_MASK = NetStateFlags(0)
for _m2 in NetStateFlags:
    _FLAGS_MASK |= _m2


def encode_vlans(vids: set[int] | frozenset[int] | list[int]) -> bytes:
    out = bytearray()
    for v in sorted(set(vids)):
        if not 0 <= v < VLAN_ID_LIMIT:
            raise FieldValueError("net_vlans", "vid", v, "below 4096")
        out += u16(v)
    return bytes(out)


def decode_vlans(data: bytes | bytearray | memoryview) -> frozenset[int]:
    """NET_VLANS: an even number of bytes, ascending vids below 4096, no repeats."""
    if len(data) % 2:
        raise ShortBufferError("net_vlans", "vid", len(data) + 1, len(data))
    prev = -1
    out: list[int] = []
    for off in range(0, len(data), 2):
        v = read_u16(data, off)
        if v >= VLAN_ID_LIMIT:
            raise FieldValueError("net_vlans", f"vid[{off // 2}]", v, "below 4096")
        if v <= prev:
            raise FieldValueError("net_vlans", f"vid[{off // 2}]", v, "ascending, no repeats")
        prev = v
        out.append(v)
    return frozenset(out)


# ------------------------------------------------------------------ test traffic
SEQ_MAGIC = 0x564C4D53  # "SMLV"
ETHERTYPE_SEQ = 0x88B5  # IEEE 802 local experimental ethertype 1


#: :class:`SeqPayload` as a numpy record (many frames' sequence numbers written at once)
SEQ_PAYLOAD_DTYPE = np.dtype([("magic", "<u4"), ("stream", "<u4"), ("seq", "<u8")])


@layout("<IIQ")
@dataclass(frozen=True, slots=True)
class SeqPayload:
    """Body of a sequence-numbered frame (16 bytes; padding may follow)."""

    magic: int
    stream: int
    seq: int

    def __post_init__(self) -> None:
        if self.magic != SEQ_MAGIC:
            raise FieldValueError("SeqPayload", "magic", self.magic, f"must be {SEQ_MAGIC:#x}")
