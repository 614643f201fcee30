"""IPv4, UDP and ARP over Ethernet: what the test peer needs to talk to a real guest's IP stack.

Network byte order (big-endian) as the protocols define it; only the fields a
peer on one L2 segment uses are read or written::

    IPv4 header (RFC 791), 20 bytes, no options written
        u8 version/IHL (0x45), u8 TOS, be16 total length, be16 id,
        be16 flags/fragment offset, u8 TTL, u8 protocol (17 = UDP),
        be16 header checksum, 4 bytes source, 4 bytes destination
    UDP header (RFC 768), 8 bytes
        be16 source port, be16 destination port, be16 length, be16 checksum
        (0: none, allowed over IPv4)
    ARP (RFC 826) for Ethernet/IPv4, 28 bytes
        be16 htype 1, be16 ptype 0x0800, u8 hlen 6, u8 plen 4, be16 op
        (1 request, 2 reply), sender MAC, sender IP, target MAC, target IP

:class:`UdpSeq` is the test traffic's datagram payload (little-endian, as
virtio-lm's own formats): magic, flow, sequence number; the guest's
``tests/qemu/udpx.c`` writes and reads the same 16 bytes.

Parsers return ``None`` for a frame that is not what they look for (another
protocol, a fragment, a bad checksum or length): a peer ignores such frames.
"""

from __future__ import annotations

from dataclasses import dataclass

from virtio_lm.errors import FieldValueError
from virtio_lm.wire.codec import layout
from virtio_lm.wire.net import ETH_ALEN, ETH_HLEN, ETH_ZLEN, ETHERTYPE_ARP, ETHERTYPE_IPV4, eth_header

__all__ = [
    "ARP_LEN",
    "IPPROTO_UDP",
    "IPV4_HLEN",
    "UDP_HLEN",
    "UDPSEQ_MAGIC",
    "Udp4",
    "UdpSeq",
    "arp_reply",
    "arp_request_for",
    "inet_checksum",
    "ipv4_addr",
    "parse_udp4",
    "udp4_frame",
]

IPV4_HLEN = 20
UDP_HLEN = 8
ARP_LEN = 28
IPPROTO_UDP = 17
ARP_REQUEST, ARP_REPLY = 1, 2
UDPSEQ_MAGIC = 0x554D4C56  # "VLMU" little-endian


@layout("<IIQ")
@dataclass(frozen=True)
class UdpSeq:
    """The 16-byte payload of a test datagram (padding may follow)."""

    magic: int
    flow: int
    seq: int


@dataclass(frozen=True)
class Udp4:
    """A parsed UDP/IPv4 frame."""

    dst_mac: bytes
    src_mac: bytes
    src_ip: bytes
    dst_ip: bytes
    sport: int
    dport: int
    payload: bytes


def ipv4_addr(text: str) -> bytes:
    """``"10.0.0.1"`` -> 4 bytes."""
    parts = text.split(".")
    if len(parts) != 4 or not all(p.isdigit() and int(p) <= 255 for p in parts):
        raise FieldValueError("ipv4", "address", text, "a dotted quad")
    return bytes(int(p) for p in parts)


def inet_checksum(data: bytes | bytearray | memoryview) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    b = bytes(data)
    if len(b) % 2:
        b += b"\0"
    s = sum(int.from_bytes(b[i : i + 2], "big") for i in range(0, len(b), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _check_ip(name: str, ip: bytes) -> None:
    if len(ip) != 4:
        raise FieldValueError("ipv4", name, ip, "4 bytes")


def udp4_frame(
    dst_mac: bytes, src_mac: bytes, src_ip: bytes, dst_ip: bytes, sport: int, dport: int, payload: bytes, *, ident: int = 0
) -> bytes:
    """An Ethernet frame carrying one UDP/IPv4 datagram (UDP checksum 0, padded to 60 bytes)."""
    _check_ip("src", src_ip)
    _check_ip("dst", dst_ip)
    for name, port in (("sport", sport), ("dport", dport)):
        if not 0 <= port <= 0xFFFF:
            raise FieldValueError("udp", name, port, "fits in u16")
    total = IPV4_HLEN + UDP_HLEN + len(payload)
    if total > 0xFFFF:
        raise FieldValueError("ipv4", "total_length", total, "<= 65535")
    hdr = bytearray(
        bytes((0x45, 0))
        + total.to_bytes(2, "big")
        + (ident & 0xFFFF).to_bytes(2, "big")
        + (0x4000).to_bytes(2, "big")  # don't fragment
        + bytes((64, IPPROTO_UDP))
        + bytes(2)
        + bytes(src_ip)
        + bytes(dst_ip)
    )
    hdr[10:12] = inet_checksum(hdr).to_bytes(2, "big")
    udp = sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + (UDP_HLEN + len(payload)).to_bytes(2, "big") + bytes(2)
    frame = eth_header(dst_mac, src_mac, ETHERTYPE_IPV4) + bytes(hdr) + udp + bytes(payload)
    return frame.ljust(ETH_ZLEN, b"\0")


def parse_udp4(frame: bytes | bytearray | memoryview) -> Udp4 | None:
    """The datagram of a UDP/IPv4 frame, or None (not UDP/IPv4, fragment, bad checksum or lengths)."""
    f = bytes(frame)
    if len(f) < ETH_HLEN + IPV4_HLEN + UDP_HLEN or int.from_bytes(f[12:14], "big") != ETHERTYPE_IPV4:
        return None
    ip = f[ETH_HLEN:]
    if ip[0] >> 4 != 4:
        return None
    ihl = (ip[0] & 0xF) * 4
    total = int.from_bytes(ip[2:4], "big")
    if ihl < IPV4_HLEN or total < ihl + UDP_HLEN or total > len(ip) or ip[9] != IPPROTO_UDP:
        return None
    if int.from_bytes(ip[6:8], "big") & 0x3FFF:  # more fragments or an offset: a fragment
        return None
    if inet_checksum(ip[:ihl]) != 0:
        return None
    udp = ip[ihl:total]
    ulen = int.from_bytes(udp[4:6], "big")
    if ulen < UDP_HLEN or ulen > len(udp):
        return None
    return Udp4(
        f[0:6], f[6:12], ip[12:16], ip[16:20], int.from_bytes(udp[0:2], "big"), int.from_bytes(udp[2:4], "big"),
        udp[UDP_HLEN:ulen],
    )


def _arp(op: int, smac: bytes, sip: bytes, tmac: bytes, tip: bytes) -> bytes:
    return (
        (1).to_bytes(2, "big") + ETHERTYPE_IPV4.to_bytes(2, "big") + bytes((ETH_ALEN, 4)) + op.to_bytes(2, "big")
        + bytes(smac) + bytes(sip) + bytes(tmac) + bytes(tip)
    )


def arp_request_for(frame: bytes | bytearray | memoryview) -> tuple[bytes, bytes, bytes] | None:
    """``(sender MAC, sender IP, target IP)`` of an Ethernet/IPv4 ARP request, else None."""
    f = bytes(frame)
    if len(f) < ETH_HLEN + ARP_LEN or int.from_bytes(f[12:14], "big") != ETHERTYPE_ARP:
        return None
    a = f[ETH_HLEN : ETH_HLEN + ARP_LEN]
    if a[0:2] != b"\0\1" or int.from_bytes(a[2:4], "big") != ETHERTYPE_IPV4 or a[4] != ETH_ALEN or a[5] != 4:
        return None
    if int.from_bytes(a[6:8], "big") != ARP_REQUEST:
        return None
    return a[8:14], a[14:18], a[24:28]


def arp_reply(my_mac: bytes, my_ip: bytes, to_mac: bytes, to_ip: bytes) -> bytes:
    """The ARP reply "``my_ip`` is at ``my_mac``" to ``to_mac`` / ``to_ip``."""
    _check_ip("my_ip", my_ip)
    _check_ip("to_ip", to_ip)
    return (eth_header(to_mac, my_mac, ETHERTYPE_ARP) + _arp(ARP_REPLY, my_mac, my_ip, to_mac, to_ip)).ljust(ETH_ZLEN, b"\0")
