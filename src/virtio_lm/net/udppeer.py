"""An IPv4 host on the embedded switch that exchanges numbered UDP datagrams with a real guest.

:class:`UdpPeer` is a switch port with a MAC and an IPv4 address.  It answers
ARP requests for its address, records every :class:`~virtio_lm.wire.inet.UdpSeq`
datagram it receives (sequence number and arrival time, per flow), records
RARP announces (with their arrival time: a migrated guest's back-end announcing
it), and -- between :meth:`UdpPeer.start_sending` and :meth:`UdpPeer.stop_sending`
-- sends numbered datagrams to the guest at a fixed rate on its own thread,
keeping each one's send time.  The guest side is ``tests/qemu/udpx.c``.

:func:`judge` checks one direction of such an exchange: no sequence number
twice, and every one lost inside the switch-over window.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from virtio_lm.errors import BackendError, WireError
from virtio_lm.net.backends import UdpSwitchPort
from virtio_lm.net.switch import Addr
from virtio_lm.wire.inet import UDPSEQ_MAGIC, UdpSeq, arp_reply, arp_request_for, parse_udp4, udp4_frame
from virtio_lm.wire.net import parse_announce

__all__ = ["Judgement", "UdpPeer", "judge", "runs"]


class UdpPeer:
    """See the module docstring."""

    def __init__(self, switch: Addr, mac: bytes, ip: bytes, *, name: str = "udp-peer") -> None:
        self.mac, self.ip = bytes(mac), bytes(ip)
        self.port = UdpSwitchPort(switch, name=name)
        self._lock = threading.Lock()
        self.received: list[tuple[int, float]] = []  # (seq, time.time()) in arrival order
        self.flows: dict[int, int] = {}  # flow -> datagrams received on it
        self.announces: list[tuple[bytes, float]] = []
        self.arp_answered = 0
        self.sent: list[tuple[int, float]] = []  # (seq, time.time()) of every datagram sent
        self.send_errors = 0
        self._stop = threading.Event()
        self._sender: threading.Thread | None = None
        self.port.attach(self._on_frame)

    @property
    def address(self) -> Addr:
        return self.port.local_addr

    def _on_frame(self, frame: bytes) -> None:
        now = time.time()
        req = arp_request_for(frame)
        if req is not None:
            smac, sip, tip = req
            if tip == self.ip:
                self.port.send(arp_reply(self.mac, self.ip, smac, sip))
                with self._lock:
                    self.arp_answered += 1
            return
        ann = parse_announce(frame)
        if ann is not None:
            with self._lock:
                self.announces.append((ann, now))
            return
        d = parse_udp4(frame)
        if d is None or d.dst_ip != self.ip or len(d.payload) < UdpSeq.SIZE:  # type: ignore[attr-defined]
            return
        try:
            p = UdpSeq.unpack_from(d.payload, 0)  # type: ignore[attr-defined]
        except WireError:
            return
        if p.magic != UDPSEQ_MAGIC:
            return
        with self._lock:
            self.received.append((p.seq, now))
            self.flows[p.flow] = self.flows.get(p.flow, 0) + 1

    # ------------------------------------------------------------------ sending
    def start_sending(self, to_mac: bytes, to_ip: bytes, port: int, rate: float) -> None:
        """Send numbered datagrams to ``to_ip:port`` (at ``to_mac``) at ``rate`` a second."""
        self._stop.clear()
        self._sender = threading.Thread(target=self._send_loop, args=(bytes(to_mac), bytes(to_ip), port, rate),
                                        name="udp-peer-tx", daemon=True)
        self._sender.start()

    def _send_loop(self, to_mac: bytes, to_ip: bytes, port: int, rate: float) -> None:
        period = 1.0 / rate
        nxt = time.monotonic()
        seq = len(self.sent)
        while not self._stop.is_set():
            payload = UdpSeq(UDPSEQ_MAGIC, 0, seq).encode()  # type: ignore[attr-defined]
            frame = udp4_frame(to_mac, self.mac, self.ip, to_ip, 5001, port, payload, ident=seq)
            try:
                self.port.send(frame)
            except BackendError:  # the switch socket refused it: counted, not sent
                self.send_errors += 1
            else:
                with self._lock:
                    self.sent.append((seq, time.time()))
                seq += 1
            nxt += period
            self._stop.wait(max(0.0, nxt - time.monotonic()))

    def stop_sending(self) -> None:
        self._stop.set()
        if self._sender is not None:
            self._sender.join(5)

    def snapshot(self) -> tuple[list[tuple[int, float]], list[tuple[int, float]], list[tuple[bytes, float]]]:
        """Copies of (received, sent, announces)."""
        with self._lock:
            return list(self.received), list(self.sent), list(self.announces)

    def close(self) -> None:
        self.stop_sending()
        self.port.close()


def runs(seqs: list[int]) -> list[tuple[int, int]]:
    """Sorted distinct ``seqs`` as inclusive runs."""
    out: list[tuple[int, int]] = []
    for s in sorted(set(seqs)):
        if out and s == out[-1][1] + 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out


@dataclass
class Judgement:
    """One direction of the exchange, judged."""

    sent: int
    received: int
    duplicates: int
    lost: list[int] = field(default_factory=list)
    lost_outside_window: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.duplicates == 0 and not self.lost_outside_window


def judge(
    expected: Iterable[int], received_counts: dict[int, int], window: tuple[float, float],
    sent_at: dict[int, float] | None = None, arrived_at: dict[int, float] | None = None,
) -> Judgement:
    """The sequence numbers ``expected`` were sent; ``received_counts`` says how often each arrived.

    A number received more than once is a duplicate.  A lost number must lie inside
    ``window`` (host ``time.time()`` seconds): by its send time when ``sent_at`` has it;
    otherwise (the guest's sends, whose times the host does not know) by its neighbours
    -- the last number received before it must have arrived no later than the window's
    end and the first after it no earlier than its start."""
    want = sorted(set(expected))
    wanted = set(want)
    dup = sum(c - 1 for c in received_counts.values() if c > 1)
    lost = [s for s in want if not received_counts.get(s)]
    outside: list[int] = []
    lo, hi = window
    got = sorted(s for s in received_counts if s in wanted)
    for s in lost:
        if sent_at is not None and s in sent_at:
            if not lo <= sent_at[s] <= hi:
                outside.append(s)
            continue
        if arrived_at is None:
            raise ValueError("neither send times nor arrival times to judge by")
        i = bisect.bisect_left(got, s)
        before = arrived_at.get(got[i - 1]) if i > 0 else None
        after = arrived_at.get(got[i]) if i < len(got) else None
        if (before is not None and before > hi) or (after is not None and after < lo) or after is None:
            outside.append(s)
    return Judgement(len(want), sum(received_counts.values()), dup, lost, outside)
