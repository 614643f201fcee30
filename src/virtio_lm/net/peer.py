"""An outside peer on the embedded switch: sends and counts sequence-numbered frames.

The peer is what the VM talks to from outside: it attaches to the switch as
a port, sends frames carrying a :class:`~virtio_lm.wire.netstate.SeqPayload`
(stream id + 64-bit sequence number) and records every sequence-numbered
frame it receives, per source MAC, so that a test can tell lost frames from
duplicated ones.  RARP announce frames are recorded separately.  With
``echo=True`` it answers every sequence frame with the same sequence number
(a ping responder).  With ``ip`` it is also an IPv4 host: it answers ARP for that address,
records every UDP datagram sent to it (:attr:`udp_received`) and echoes those whose
destination port is in ``udp_echo_ports`` back to their sender.
"""

from __future__ import annotations

import collections
import threading
import time

from virtio_lm.errors import WireError
from virtio_lm.net.backends import UdpSwitchPort
from virtio_lm.net.switch import Addr
from virtio_lm.wire.inet import arp_reply, arp_request_for, ipv4_addr, parse_udp4, udp4_frame
from virtio_lm.wire.net import ETH_HLEN, ETHERTYPE_ARP, eth_header, parse_announce
from virtio_lm.wire.netstate import ETHERTYPE_SEQ, SEQ_MAGIC, SeqPayload


def seq_frame(dst: bytes, src: bytes, stream: int, seq: int, size: int = 64) -> bytes:
    """A sequence-numbered Ethernet frame of ``size`` bytes (at least header + payload)."""
    body = SeqPayload(SEQ_MAGIC, stream, seq).encode()
    frame = eth_header(dst, src, ETHERTYPE_SEQ) + body
    return frame.ljust(size, b"\0")


def parse_seq(frame: bytes) -> tuple[bytes, bytes, int, int] | None:
    """``(dst, src, stream, seq)`` of a sequence frame, else None."""
    if len(frame) < ETH_HLEN + SeqPayload.SIZE or int.from_bytes(frame[12:14], "big") != ETHERTYPE_SEQ:  # type: ignore[attr-defined]
        return None
    try:
        p = SeqPayload.unpack_from(frame, ETH_HLEN)
    except WireError:
        return None
    return frame[0:6], frame[6:12], p.stream, p.seq


class NetPeer:
    """A switch port that sends and counts sequence-numbered frames."""

    def __init__(
        self, switch: Addr, mac: bytes, *, stream: int = 1, echo: bool = False, name: str = "peer",
        ip: str | None = None, udp_echo_ports: tuple[int, ...] = (),
    ) -> None:
        self.mac = bytes(mac)
        self.ip = ipv4_addr(ip) if ip is not None else None
        self.udp_echo_ports = frozenset(udp_echo_ports)
        #: (source IP, destination port, payload) of every UDP datagram sent to :attr:`ip`
        self.udp_received: list[tuple[bytes, int, bytes]] = []
        self.arp_replies = 0
        self.stream = stream
        self.echo = echo
        self.port = UdpSwitchPort(switch, name=name)
        self.next_seq = 0
        self.sent = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self.received: dict[bytes, list[int]] = collections.defaultdict(list)  # src MAC -> seqs in order
        self.arrivals: dict[bytes, list[float]] = collections.defaultdict(list)  # src MAC -> time.time() of each
        self.announces: list[bytes] = []
        self.other = 0
        self.port.attach(self._on_frame)

    @property
    def address(self) -> Addr:
        return self.port.local_addr

    def close(self) -> None:
        self.port.close()

    def __enter__(self) -> "NetPeer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ send
    def send_seq(self, dst: bytes, count: int = 1, *, size: int = 64) -> list[int]:
        """Send ``count`` frames to ``dst`` with the next sequence numbers; returns them."""
        out = []
        for _ in range(count):
            seq = self.next_seq
            self.next_seq += 1
            self.port.send(seq_frame(dst, self.mac, self.stream, seq, size))
            self.sent += 1
            out.append(seq)
        return out

    def send_raw(self, frame: bytes) -> None:
        self.port.send(frame)

    # ------------------------------------------------------------------ receive
    def _on_frame(self, frame: bytes) -> None:
        with self._cond:
            ann = parse_announce(frame)
            if ann is not None:
                self.announces.append(ann)
            else:
                parsed = parse_seq(frame)
                if parsed is None:
                    if not self._on_ip(frame):
                        self.other += 1
                else:
                    dst, src, stream, seq = parsed
                    self.received[src].append(seq)
                    self.arrivals[src].append(time.time())
                    if self.echo and dst == self.mac:
                        self.port.send(seq_frame(src, self.mac, self.stream, seq, len(frame)))
            self._cond.notify_all()

    def _on_ip(self, frame: bytes) -> bool:
        """ARP for our address and UDP to it (with :attr:`ip` set); whether the frame was one."""
        if self.ip is None:
            return False
        if len(frame) >= ETH_HLEN and int.from_bytes(frame[12:14], "big") == ETHERTYPE_ARP:
            request = arp_request_for(frame)
            if request is not None and request[2] == self.ip:
                sender_mac, sender_ip, _ = request
                self.port.send(arp_reply(self.mac, self.ip, sender_mac, sender_ip))
                self.arp_replies += 1
            return True
        udp = parse_udp4(frame)
        if udp is None or udp.dst_ip != self.ip:
            return False
        self.udp_received.append((udp.src_ip, udp.dport, udp.payload))
        if udp.dport in self.udp_echo_ports:
            self.port.send(udp4_frame(udp.src_mac, self.mac, self.ip, udp.src_ip, udp.dport, udp.sport,
                                      udp.payload, ident=len(self.udp_received)))
        return True

    def seqs_from(self, mac: bytes) -> list[int]:
        with self._lock:
            return list(self.received.get(bytes(mac), []))

    def times_from(self, mac: bytes) -> list[float]:
        """Arrival times (``time.time()``) of the frames :meth:`seqs_from` lists, in the same order."""
        with self._lock:
            return list(self.arrivals.get(bytes(mac), []))

    def count_from(self, mac: bytes) -> int:
        with self._lock:
            return len(self.received.get(bytes(mac), []))

    def wait_count(self, mac: bytes, n: int, timeout: float = 5.0) -> bool:
        """Wait until at least ``n`` sequence frames from ``mac`` arrived."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.received.get(bytes(mac), [])) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def wait_announce(self, mac: bytes, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while bytes(mac) not in self.announces:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True
