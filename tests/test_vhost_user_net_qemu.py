"""vhost-user-net under a real QEMU 7.2 and Linux's own virtio_net driver, on the embedded switch.

One guest (booted once): UDP both ways with a peer on the switch, on one queue pair and then --
after the guest turns on the second pair itself (``chan eth0 2``: ETHTOOL_SCHANNELS, what
``ethtool -L`` does) and steers its transmits there (XPS) -- on the second; then, with the
traffic running, a live migration to a second QEMU + back-end: no datagram twice, loss only
inside the switch-over window, and QEMU's announce (SEND_RARP) reaches the switch, which moves
the guest's MAC to the destination back-end's port.

Skipped (with the reason) only where QEMU, busybox-static, gcc or the Debian kernel cannot be
had.  Guest side: tests/qemu/ (udpx.c, chan.c).
"""

from __future__ import annotations

import re
import time

import pytest

pytestmark = [
    pytest.mark.qemu, pytest.mark.slow,  # a Linux guest under QEMU (TCG)
    # It ran on request only for a while: in whole-suite runs on a loaded machine the migrated
    # guest went silent.  The likely cause is QEMU 7.2's TCG dirty-bitmap sync losing pages of a
    # 256M guest -- a blk migration test's destination kernel oopsed that way in a CI run -- and
    # tests/qemu/guest.py now gives every guest RAM that is not a multiple of 64 pages.
]

from qemu.guest import SCALE, GuestUnavailable, NetBackendProc, Vm, free_port, guest_assets

from virtio_lm.net.switch import L2Switch
from virtio_lm.net.udppeer import UdpPeer, judge
from virtio_lm.wire.inet import ipv4_addr
from virtio_lm.wire.net import format_mac, parse_mac

GUEST_MAC, PEER_MAC = parse_mac("52:54:00:12:34:56"), parse_mac("52:54:00:00:00:fe")
GUEST_IP, PEER_IP = "10.0.0.2", "10.0.0.1"
PORT = 5001
RATE = 100  # datagrams a second, each way
MARGIN = 0.1  # s around the switch-over window: socket buffers and thread wake-ups


@pytest.fixture(scope="module")
def assets():
    try:
        kernel, initrd = guest_assets()
    except GuestUnavailable as exc:
        pytest.skip(f"real-QEMU tests need QEMU, busybox-static and the Debian 6.1 kernel: {exc}")
    return kernel, initrd


def _udpx_report(vm: Vm) -> tuple[int, dict[int, int], int]:
    """Stop the guest's udpx; (datagrams it sent, seq -> times received, duplicates)."""
    rc, out = vm.sh("kill $(cat /tmp/u.pid); while [ ! -e /tmp/u.out ] || ! grep -q 'UDPX end' /tmp/u.out; do sleep 0.1; done;"
                    " cat /tmp/u.out; rm /tmp/u.out", 30 * SCALE)
    assert rc == 0, out
    sent = int(re.search(r"UDPX sent (\d+)", out).group(1))
    m = re.search(r"UDPX rx (\d+) dup (\d+) runs (\S*)", out)
    assert m, out
    counts: dict[int, int] = {}
    for run in filter(None, m.group(3).split(",")):
        a, b = (int(x) for x in run.split("-"))
        for s in range(a, b + 1):
            counts[s] = 1
    return sent, counts, int(m.group(2))


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout * SCALE
    while not cond():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.05)


def test_udp_both_ways_multiqueue_and_live_migration_with_traffic(assets, tmp_path) -> None:
    kernel, initrd = assets
    sw = L2Switch(idle_timeout=600).start()
    peer = UdpPeer(sw.address, PEER_MAC, ipv4_addr(PEER_IP))
    a = b = src = dst = None
    try:
        a = NetBackendProc(str(tmp_path / "a.sock"), sw.address, queues=2)
        src = Vm(tmp_path, "src", kernel, initrd, None, net_socket=a.socket_path, net_queues=2, mac=format_mac(GUEST_MAC))
        src.boot(120 * SCALE)
        rc, out = src.sh(f"ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up && chan eth0")
        assert rc == 0 and "CHAN max 2 combined 1" in out, out

        # ---- one pair: UDP both ways
        peer.start_sending(GUEST_MAC, ipv4_addr(GUEST_IP), PORT, RATE)
        rc, _ = src.sh(f"udpx {PEER_IP} {PORT} {RATE} 4 /tmp/u.out & echo $! > /tmp/u.pid")
        assert rc == 0
        _wait(lambda: len(peer.snapshot()[0]) >= 100, 60, "100 datagrams from the guest")
        sent, got, dup = _udpx_report(src)
        peer.stop_sending()
        assert dup == 0 and len(got) >= 50, (sent, len(got))
        received, _, _ = peer.snapshot()
        assert {s for s, _ in received} <= set(range(sent)) and len(received) >= 100
        assert len({s for s, _ in received}) == len(received), "a datagram from the guest arrived twice"
        assert peer.arp_answered >= 1  # the guest's own ARP found the peer

        # ---- the guest turns the second pair on and sends through it
        rc, out = src.sh("chan eth0 2 && echo 1 > /sys/class/net/eth0/queues/tx-1/xps_cpus"
                         " && echo 0 > /sys/class/net/eth0/queues/tx-0/xps_cpus")
        assert rc == 0 and "CHAN max 2 combined 2" in out, out
        # from here the peer's address is a permanent neighbour entry: the guest's ARP
        # re-probing (every ~30 s of guest time) is not part of what the migration is judged on
        rc, out = src.sh(f"arp -s {PEER_IP} {format_mac(PEER_MAC)}")
        assert rc == 0, out

        # ---- traffic on, migrate, traffic on at the destination
        base_rx = len(peer.snapshot()[0])
        rc, _ = src.sh(f"udpx {PEER_IP} {PORT} {RATE} 4 /tmp/u.out & echo $! > /tmp/u.pid")
        assert rc == 0
        # the peer starts once the guest's receiving socket is bound (its first datagram is out)
        _wait(lambda: len(peer.snapshot()[0]) > base_rx, 30, "the guest's udpx")
        base_sent = len(peer.snapshot()[1])
        peer.start_sending(GUEST_MAC, ipv4_addr(GUEST_IP), PORT, RATE)
        _wait(lambda: len(peer.snapshot()[0]) >= base_rx + 100, 60, "traffic on the second pair")
        b = NetBackendProc(str(tmp_path / "b.sock"), sw.address, queues=2)
        port = free_port()
        dst = Vm(tmp_path, "dst", kernel, initrd, None, net_socket=b.socket_path, net_queues=2,
                 mac=format_mac(GUEST_MAC), incoming_port=port)
        dst.qmp("query-status")
        src.qmp("migrate-set-parameters", **{"max-bandwidth": 1 << 30})
        src.qmp("migrate", uri=f"tcp:127.0.0.1:{port}")
        deadline = time.monotonic() + 180 * SCALE
        while (info := src.qmp("query-migrate")).get("status") not in ("completed", "failed", "cancelled"):
            assert time.monotonic() < deadline, info
            time.sleep(0.1)
        assert info["status"] == "completed", info
        stop_t = src.q.wait_event("STOP", time.monotonic() + 10).get("timestamp")
        resume_t = dst.q.wait_event("RESUME", time.monotonic() + 30 * SCALE).get("timestamp")
        t_stop = stop_t["seconds"] + stop_t["microseconds"] / 1e6
        t_resume = resume_t["seconds"] + resume_t["microseconds"] / 1e6
        # the announce: SEND_RARP to the destination back-end, its RARP through the switch
        _wait(lambda: any(m == GUEST_MAC and t >= t_stop for m, t in peer.snapshot()[2]), 30, "the RARP announce")
        assert sw.lookup(GUEST_MAC) == b.switch_port, (sw.lookup(GUEST_MAC), b.switch_port, a.switch_port)
        assert sw.stats["moves"] >= 1
        t_announce = min(t for m, t in peer.snapshot()[2] if m == GUEST_MAC and t >= t_stop)
        # traffic goes on at the destination, both ways
        n0 = len(peer.snapshot()[0])
        try:
            _wait(lambda: len(peer.snapshot()[0]) >= n0 + 100, 60, "datagrams from the migrated guest")
        except AssertionError:
            _, diag = dst.sh("ip neigh; cat /proc/net/snmp | grep Udp; ps | grep udpx; cat /proc/interrupts | grep -i virt;"
                             " cat /sys/class/net/eth0/statistics/tx_packets /sys/class/net/eth0/statistics/rx_packets"
                             " /sys/class/net/eth0/queues/tx-*/tx_timeout 2>&1", 30)
            b.stop()
            raise AssertionError(f"no datagrams from the migrated guest: peer has {len(peer.snapshot()[0])} (was {n0}); "
                                 f"guest: {diag}; destination back-end: {b.stats()}; log: {b.output()[-1500:]}") from None
        peer.stop_sending()  # first: every datagram the peer sent meets a running udpx
        sent, got, dup = _udpx_report(dst)
        _wait(lambda: max((s for s, _ in peer.snapshot()[0]), default=-1) >= sent - 1, 10, "the guest's last datagrams")
        time.sleep(0.2)  # stragglers after the last one (there should be none: checked below)
        received, peer_sent, _ = peer.snapshot()
    finally:
        for t in (src, dst, a, b):
            if t is not None:
                t.stop()
        peer.close()
        sw.stop()
    window = (t_stop - MARGIN, max(t_resume, t_announce) + MARGIN)
    # guest -> peer: this run's numbers are 0..sent-1
    run_rx = received[base_rx:]
    counts: dict[int, int] = {}
    arrived: dict[int, float] = {}
    for s, t in run_rx:
        counts[s] = counts.get(s, 0) + 1
        arrived.setdefault(s, t)
    j_out = judge(range(sent), counts, window, arrived_at=arrived)
    # peer -> guest: the peer's numbers of this run, with their send times
    run_sent = peer_sent[base_sent:]
    j_in = judge([s for s, _ in run_sent], got, window, sent_at=dict(run_sent))
    detail = (f"window {window[0]:.3f}..{window[1]:.3f} (stop {t_stop:.3f} resume {t_resume:.3f} announce "
              f"{t_announce:.3f}); out sent {sent} lost {j_out.lost[:20]} outside {j_out.lost_outside_window[:20]}; "
              f"in sent {j_in.sent} lost {len(j_in.lost)} outside {j_in.lost_outside_window[:20]}")
    print(detail)
    assert dup == 0 and j_out.duplicates == 0, detail
    assert not j_out.lost_outside_window, detail
    assert not j_in.lost_outside_window, detail
    sa, sb = a.stats(), b.stats()
    # both pairs carried frames each way on the source; the destination ran on the second pair
    for q in ("tx_q1", "tx_q3", "rx_q0", "rx_q2"):
        assert sa.get("device", {}).get(q, 0) > 0, (q, sa)
    assert sb.get("rarps", 0) >= 1 and sb["device"].get("self_announce", 0) >= 1, sb
    assert sb["device"].get("tx_q3", 0) > 0 and sb["device"].get("rx_q2", 0) > 0, sb
    assert not sa.get("refusals") and not sb.get("refusals"), (sa, sb)
    # the guest's frames were sent by the C transmit fast path (inline, as --inline-max allows)
    assert sa.get("fast", 0) > 0 and sb.get("fast", 0) > 0, (sa, sb)
