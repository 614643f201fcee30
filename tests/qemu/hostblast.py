"""Host-side UDP sender for the net figures' guest-receive direction (tests/qemu/net_figures.py).

    python tests/qemu/hostblast.py udp IP PORT SIZE RATE SECONDS
    python tests/qemu/hostblast.py switch HOST:PORT DST_MAC SRC_MAC SRC_IP DST_IP PORT SIZE RATE SECONDS

Sends SIZE-byte UDP payloads ({le32 magic "VLMU", le32 flow 0, le64 seq 0}, the rest zero: what
the guest's ``usink`` counts) at RATE a second for SECONDS, paced per millisecond (a tick it
falls behind on is not made up), then prints ``HOSTBLAST sent N errors E s T`` (T: its own
sending time, host clock).  ``udp``: a plain UDP socket to IP:PORT (QEMU's ``-netdev user``
host forward, or the guest's address on a TAP interface).  ``switch``: a port of the embedded
switch at HOST:PORT, sending whole Ethernet frames (DST_MAC <- SRC_MAC, SRC_IP -> DST_IP:PORT).

It is a process of its own so that it shares no interpreter (and no GIL) with the switch,
which for our back-end runs in the figures' process.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "src"))

from virtio_lm.net.switch import KIND_HELLO, big_buffers, frame_message  # noqa: E402
from virtio_lm.wire.inet import UDPSEQ_MAGIC, UdpSeq, ipv4_addr, udp4_frame  # noqa: E402
from virtio_lm.wire.net import parse_mac  # noqa: E402

TICK = 0.001


def payload(size: int) -> bytes:
    if not 16 <= size <= 1472:
        raise SystemExit("size 16..1472")
    head = UdpSeq(UDPSEQ_MAGIC, 0, 0).encode()  # type: ignore[attr-defined]
    return head + bytes(size - len(head))


def blast(sock: socket.socket, message: bytes, to: tuple[str, int], rate: float, seconds: float) -> tuple[int, int, float]:
    """(sent, errors, elapsed s): ``message`` to ``to`` at ``rate`` a second for ``seconds``."""
    sent = errors = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    owed = 0.0
    last = t0
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        owed = min(owed + (now - last) * rate, rate * TICK * 4)  # at most 4 ticks' worth at once
        last = now
        for _ in range(int(owed)):
            try:
                sock.sendto(message, to)
                sent += 1
            except OSError:  # ENOBUFS and kin: counted, not retried
                errors += 1
        owed -= int(owed)
        nap = TICK - (time.perf_counter() - now)
        if nap > 0:
            time.sleep(nap)
    return sent, errors, time.perf_counter() - t0


def main(argv: list[str]) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    big_buffers(sock)
    if argv[:1] == ["udp"] and len(argv) == 6:
        ip, port, size, rate, seconds = argv[1], int(argv[2]), int(argv[3]), float(argv[4]), float(argv[5])
        message, to = payload(size), (ip, port)
    elif argv[:1] == ["switch"] and len(argv) == 10:
        host, _, sport = argv[1].rpartition(":")
        to = (host, int(sport))
        dst_mac, src_mac = parse_mac(argv[2]), parse_mac(argv[3])
        src_ip, dst_ip, port = ipv4_addr(argv[4]), ipv4_addr(argv[5]), int(argv[6])
        size, rate, seconds = int(argv[7]), float(argv[8]), float(argv[9])
        message = frame_message(udp4_frame(dst_mac, src_mac, src_ip, dst_ip, 5001, port, payload(size)))
        sock.bind(("127.0.0.1", 0))
        sock.sendto(bytes((KIND_HELLO,)), to)  # the switch learns this port, then SRC_MAC on it
    else:
        print(__doc__, file=sys.stderr)
        return 2
    if rate <= 0 or seconds <= 0:
        raise SystemExit("rate > 0, seconds > 0")
    sent, errors, dt = blast(sock, message, to, rate, seconds)
    print(f"HOSTBLAST sent {sent} errors {errors} s {dt:.6f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
