"""tests/qemu/net_figures.py's host-side receiver for QEMU's -netdev user: it counts the guest
sender's datagrams (ublast's "VLMU" magic first) and nothing else."""

from __future__ import annotations

import socket
import time

from qemu.net_figures import HostSink

from virtio_lm.wire.inet import UDPSEQ_MAGIC


def _wait_count(sink: HostSink, n: int) -> None:
    deadline = time.monotonic() + 10
    while sink.count < n and time.monotonic() < deadline:
        time.sleep(0.01)


def test_host_sink_counts_ublast_datagrams_only() -> None:
    sink = HostSink()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            good = UDPSEQ_MAGIC.to_bytes(4, "little") + bytes(60)
            for payload in (good, b"XXXX" + bytes(60), good[:15], good, good[:16]):
                s.sendto(payload, ("127.0.0.1", sink.port))
            _wait_count(sink, 3)
            time.sleep(0.1)  # a wrongly counted datagram would have arrived by now (loopback, in order)
            assert sink.count == 3
    finally:
        sink.close()
