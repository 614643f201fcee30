"""Figures: guest UDP throughput through our vhost-user-net back-end vs QEMU's own -netdev user
and -netdev tap.

    python tests/qemu/net_figures.py [--samples N] [--sizes 64,1400] [--window S] [--directions tx,rx]
                                     [--rx-rate PPS] [--no-tap] [--json PATH]

Two guests of the same kernel, initramfs and QEMU command line, the same virtio-net-pci device
(one queue pair, INTx as in the vhost-user-net tests), up at the same time:

* ``ours``: ``-netdev vhost-user`` on our back-end process (tests/qemu/guest.py
  :class:`NetBackendProc`) on an embedded :class:`~virtio_lm.net.switch.L2Switch`, with a
  :class:`~virtio_lm.net.udppeer.UdpPeer` on the switch as the receiver (guest 10.0.0.2, peer
  10.0.0.1 as a permanent neighbour entry, as in tests/test_vhost_user_net_qemu.py);
* ``user``: ``-netdev user`` (slirp); the guest (10.0.2.15) sends to 10.0.2.2:PORT, which QEMU
  delivers to a UDP socket bound here on 127.0.0.1:PORT.
* ``tap``: ``-netdev tap`` (QEMU's user-space TAP back-end, vhost=off) on a TAP interface made
  here (``ip tuntap``: root and /dev/net/tun; without them, or with ``--no-tap``, the set-up is
  left out and the table says why); the host side is 10.0.3.1/24, the guest 10.0.3.2, and the
  receiver a UDP socket bound to 10.0.3.1:PORT.

The transmit direction (guest -> host).  Per sample and payload size, in the guest ``ublast``
(tests/qemu/ublast.c) sends datagrams as fast as it can; once they arrive, the host counts what
its receiver gets over a window timed here (``--window`` seconds): datagrams a second (``pps``)
and payload bytes a second (``MBps``, 10^6).  ``guest_sent_pps``: what ublast handed to the
guest's socket a second (guest clock; a datagram the guest's queue dropped counts as sent);
``switch_fps`` (ours only): the frames the switch forwarded a second over the same window.

The receive direction (host -> guest).  The guest's ``usink`` (tests/qemu/usink.c) counts the
datagrams reaching its UDP port RX_PORT while tests/qemu/hostblast.py, a process of its own
(it shares no interpreter with the switch), offers ``--rx-rate`` datagrams a second for
``--window`` seconds (host clock): for ``ours`` as Ethernet frames from a port of its own on the
switch, for ``user`` through a host forward (``hostfwd=udp:127.0.0.1:HP-:RX_PORT``), for ``tap``
to the guest's address on the TAP interface.  ``rx_pps``: datagrams the guest counted over the
sender's time; ``rx_offered_pps``: what the sender sent a second; ``rx_delivered``: the fraction
of those the guest counted.  usink is stopped once the sender is done and counts what is
queued on its socket then; what is still on its way (in a ring, a back-end) is not counted,
alike for every set-up.

Samples alternate between the guests (sample 1 ours, sample 1 user, sample 1 tap, sample 2
ours, ...), so load on the machine falls on all alike.  Printed per metric: the median and the
spread (min-max) of the samples for each set-up and the ratio of the medians.  Guest under TCG:
absolute numbers are the emulator's; the ratio is the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qemu.guest import NetBackendProc, Vm, free_port, guest_assets  # noqa: E402

from virtio_lm.net.switch import L2Switch, big_buffers  # noqa: E402
from virtio_lm.net.udppeer import UdpPeer  # noqa: E402
from virtio_lm.wire.inet import UDPSEQ_MAGIC, ipv4_addr  # noqa: E402
from virtio_lm.wire.net import format_mac, parse_mac  # noqa: E402

KINDS = ("ours", "user", "tap")
TAP_HOST_IP, TAP_GUEST_IP = "10.0.3.1", "10.0.3.2"
GUEST_MAC, PEER_MAC = parse_mac("52:54:00:12:34:56"), parse_mac("52:54:00:00:00:fe")
GUEST_IP, PEER_IP = "10.0.0.2", "10.0.0.1"
SLIRP_GUEST_IP, SLIRP_HOST_IP = "10.0.2.15", "10.0.2.2"
PEER_PORT = 5001
RX_PORT = 5002  # the guest's usink
BLAST_MAC, BLAST_IP = parse_mac("52:54:00:00:00:fd"), "10.0.0.3"  # the receive direction's sender on the switch
HOSTBLAST = Path(__file__).resolve().parent / "hostblast.py"
FIRST_TIMEOUT = 60.0  # s for the first datagram of a run to reach the host
WARM = 0.5  # s between the first arrival and the window's start
QUIET = 0.3  # s without an arrival: the previous run has drained


class HostSink:
    """A UDP socket on ``ip`` counting the ublast datagrams it receives, on its own thread."""

    def __init__(self, ip: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        big_buffers(self.sock)
        self.sock.bind((ip, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="net-figures-sink", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buf = bytearray(65536)
        magic = UDPSEQ_MAGIC.to_bytes(4, "little")
        while not self._stop.is_set():
            try:
                n = self.sock.recv_into(buf)
            except socket.timeout:
                continue
            except OSError:
                break
            if n >= 16 and buf[:4] == magic:
                self.count += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


class Setup:
    """One guest with its network and the host-side receiver: ``counter()`` is how many
    datagrams the receiver has had so far, ``target`` where the guest sends."""

    def __init__(self, kind: str, kernel: Path, initrd: Path, work: Path) -> None:
        self.kind = kind
        self.sw: L2Switch | None = None
        self.peer: UdpPeer | None = None
        self.be: NetBackendProc | None = None
        self.sink: HostSink | None = None
        self.vm: Vm | None = None
        self.tap: str | None = None
        try:
            self._start(kind, kernel, initrd, work)
        except BaseException:
            self.stop()  # what did start (the switch's thread, the back-end process) goes with it
            raise

    def _start(self, kind: str, kernel: Path, initrd: Path, work: Path) -> None:
        if kind == "ours":
            self.sw = L2Switch(idle_timeout=3600).start()
            self.peer = UdpPeer(self.sw.address, PEER_MAC, ipv4_addr(PEER_IP))
            self.be = NetBackendProc(str(work / "ours-net.sock"), self.sw.address)
            self.vm = Vm(work, "ours-net", kernel, initrd, None, net_socket=self.be.socket_path, mac=format_mac(GUEST_MAC))
            peer, sw = self.peer, self.sw
            self.counter: Callable[[], int] = lambda: len(peer.received)
            # the frames the switch forwarded (the guest's, and little else): whether the
            # peer (this process, Python) keeps up with what reaches it
            self.extra: Callable[[], int] | None = lambda: sw.stats["frames"]
            self.target = (PEER_IP, PEER_PORT)
            host, port = sw.address
            self.rx_sender = ["switch", f"{host}:{port}", format_mac(GUEST_MAC), format_mac(BLAST_MAC),
                              BLAST_IP, GUEST_IP, str(RX_PORT)]  # fmt: skip
            self.config = (f"ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up"
                           f" && arp -s {PEER_IP} {format_mac(PEER_MAC)}")
        elif kind == "user":
            self.sink = HostSink()
            fwd = free_port()
            self.vm = Vm(work, "user-net", kernel, initrd, None, user_net=True, user_udp_fwd=(fwd, RX_PORT),
                         mac=format_mac(GUEST_MAC))
            self.rx_sender = ["udp", "127.0.0.1", str(fwd)]
            sink = self.sink
            self.counter = lambda: sink.count
            self.extra = None
            self.target = (SLIRP_HOST_IP, sink.port)
            self.config = f"ip addr add {SLIRP_GUEST_IP}/24 dev eth0 && ip link set eth0 up"
        elif kind == "tap":
            self.tap = make_tap()
            self.sink = HostSink(TAP_HOST_IP)
            self.vm = Vm(work, "tap-net", kernel, initrd, None, tap=self.tap, mac=format_mac(GUEST_MAC))
            sink = self.sink
            self.counter = lambda: sink.count
            self.extra = None
            self.target = (TAP_HOST_IP, sink.port)
            self.rx_sender = ["udp", TAP_GUEST_IP, str(RX_PORT)]
            self.config = f"ip addr add {TAP_GUEST_IP}/24 dev eth0 && ip link set eth0 up"
        else:
            raise ValueError(kind)

    def up(self) -> None:
        assert self.vm is not None
        rc, out = self.vm.sh(self.config)
        if rc:
            raise RuntimeError(f"{self.kind}: {self.config}: {rc} {out}")
        rc, _ = self.vm.sh("[ -x /bin/ublast ] && [ -x /bin/usink ]")
        if rc:
            raise RuntimeError("the guest has no ublast or usink (gcc missing?)")

    def quiesce(self) -> None:
        """Wait (bounded) until nothing has arrived for QUIET seconds."""
        deadline = time.monotonic() + 10
        last, since = self.counter(), time.monotonic()
        while time.monotonic() - since < QUIET and time.monotonic() < deadline:
            time.sleep(0.05)
            n = self.counter()
            if n != last:
                last, since = n, time.monotonic()

    def measure_tx(self, size: int, window: float) -> dict[str, float]:
        vm = self.vm
        assert vm is not None
        self.quiesce()
        c = self.counter()
        ip, port = self.target
        rc, out = vm.sh(f"ublast {ip} {port} {size} /tmp/b.out & echo $! > /tmp/b.pid")
        if rc:
            raise RuntimeError(f"{self.kind}: ublast did not start: {out}")
        try:
            deadline = time.monotonic() + FIRST_TIMEOUT
            while self.counter() == c:
                if time.monotonic() > deadline:
                    _, diag = vm.sh("cat /proc/net/snmp | grep Udp; cat /sys/class/net/eth0/statistics/tx_packets; ip neigh")
                    raise RuntimeError(f"{self.kind}: no datagram reached the host in {FIRST_TIMEOUT:.0f} s; guest: {diag}")
                time.sleep(0.01)
            time.sleep(WARM)
            e0 = self.extra() if self.extra else 0
            c0, t0 = self.counter(), time.monotonic()
            time.sleep(window)
            c1, t1 = self.counter(), time.monotonic()
            e1 = self.extra() if self.extra else 0
        finally:
            rc, out = vm.sh("kill $(cat /tmp/b.pid); while ! grep -q 'UBLAST end' /tmp/b.out 2>/dev/null; do sleep 0.1; done;"
                            " cat /tmp/b.out; rm /tmp/b.out", 120)
        m = re.search(r"UBLAST sent (\d+) errors (\d+) ns (\d+)", out)
        if rc or not m:
            raise RuntimeError(f"{self.kind}: ublast: {rc} {out}")
        pps = (c1 - c0) / (t1 - t0)
        r = {f"pps_{size}": pps, f"MBps_{size}": pps * size / 1e6,
             f"guest_sent_pps_{size}": int(m.group(1)) / (int(m.group(3)) / 1e9)}
        if self.extra:
            r[f"switch_fps_{size}"] = (e1 - e0) / (t1 - t0)
        return r

    def measure_rx(self, size: int, window: float, rate: float) -> dict[str, float]:
        """The receive direction: hostblast offers ``rate`` datagrams a second for ``window``
        seconds, the guest's usink counts them."""
        vm = self.vm
        assert vm is not None
        rc, out = vm.sh(f"rm -f /tmp/s.out /tmp/s.out.ready; usink {RX_PORT} /tmp/s.out & echo $! > /tmp/s.pid;"
                        " while [ ! -e /tmp/s.out.ready ]; do sleep 0.05; done")
        if rc:
            raise RuntimeError(f"{self.kind}: usink did not start: {out}")
        try:
            cmd = [sys.executable, str(HOSTBLAST), *self.rx_sender, str(size), str(rate), str(window)]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=window + 60)
        finally:
            rc, out = vm.sh("kill $(cat /tmp/s.pid); while ! grep -q 'USINK end' /tmp/s.out 2>/dev/null; do sleep 0.1; done;"
                            " cat /tmp/s.out", 120)
        b = re.search(r"HOSTBLAST sent (\d+) errors (\d+) s ([0-9.]+)", r.stdout)
        if r.returncode or not b:
            raise RuntimeError(f"{self.kind}: hostblast: {r.returncode} {r.stdout} {r.stderr}")
        m = re.search(r"USINK rx (\d+) other (\d+) bytes (\d+)", out)
        if rc or not m:
            raise RuntimeError(f"{self.kind}: usink: {rc} {out}")
        sent, dt, got = int(b.group(1)), float(b.group(3)), int(m.group(1))
        return {f"rx_pps_{size}": got / dt, f"rx_MBps_{size}": got * size / dt / 1e6,
                f"rx_offered_pps_{size}": sent / dt, f"rx_delivered_{size}": got / sent if sent else 0.0}

    def stop(self) -> dict:
        """Stop everything; the back-end's and switch's counters (ours)."""
        extra: dict = {}
        for t in (self.vm, self.be):
            if t is not None:
                t.stop()
        if self.be is not None:
            extra["backend_stats"] = self.be.stats()
        if self.peer is not None:
            self.peer.close()
        if self.sw is not None:
            extra["switch_stats"] = dict(self.sw.stats)
            self.sw.stop()
        if self.sink is not None:
            self.sink.close()
        if self.tap is not None:
            subprocess.run(["ip", "link", "del", self.tap], capture_output=True)
        return extra


def tap_unavailable() -> str | None:
    """Why a TAP interface cannot be made here (None: it can)."""
    if os.geteuid() != 0:
        return "not root"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    if shutil.which("ip") is None:
        return "no ip (iproute2)"
    return None


def make_tap() -> str:
    """A TAP interface up with 10.0.3.1/24 (removed by :meth:`Setup.stop`)."""
    name = f"vlmtap{os.getpid() % 10000}"
    for cmd in (["ip", "tuntap", "add", "dev", name, "mode", "tap"],
                ["ip", "addr", "add", f"{TAP_HOST_IP}/24", "dev", name],
                ["ip", "link", "set", name, "up"]):  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            subprocess.run(["ip", "link", "del", name], capture_output=True)
            raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return name


def summary(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def num(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=3, help="samples per metric and set-up (>= 3 for a spread)")
    ap.add_argument("--sizes", default="64,1400", help="UDP payload sizes in bytes, comma-separated (16..1472)")
    ap.add_argument("--window", type=float, default=3.0, help="host-timed counting window per sample, seconds")
    ap.add_argument("--json", help="also write every sample here")
    ap.add_argument("--no-tap", action="store_true", help="leave the -netdev tap set-up out")
    ap.add_argument("--directions", default="tx,rx", help="tx (guest -> host), rx (host -> guest), or both")
    ap.add_argument("--rx-rate", type=float, default=100_000, help="datagrams a second the host offers the guest (rx)")
    args = ap.parse_args()
    no_tap = "--no-tap" if args.no_tap else tap_unavailable()
    kinds = tuple(k for k in KINDS if k != "tap" or not no_tap)
    sizes = [int(s) for s in args.sizes.split(",")]
    directions = args.directions.split(",")
    if any(not 16 <= s <= 1472 for s in sizes) or args.samples < 1 or args.window <= 0 or args.rx_rate <= 0:
        ap.error("sizes 16..1472, samples >= 1, window > 0, rx-rate > 0")
    if not directions or any(d not in ("tx", "rx") for d in directions):
        ap.error("directions: tx, rx or tx,rx")
    kernel, initrd = guest_assets()
    work = Path(tempfile.mkdtemp(prefix="vlm-netfig-"))
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    res: dict = {"started": started, "samples": args.samples, "sizes": sizes, "window_s": args.window,
                 "directions": directions, "rx_rate": args.rx_rate,
                 "net": {k: [] for k in kinds}, "tap_left_out": no_tap}
    setups: dict[str, Setup] = {}
    try:
        for kind in kinds:
            setups[kind] = Setup(kind, kernel, initrd, work)
        for s in setups.values():
            assert s.vm is not None
            s.vm.boot(180)
        for s in setups.values():
            s.up()
        for i in range(args.samples):
            for kind in kinds:
                r: dict[str, float] = {}
                for size in sizes:
                    if "tx" in directions:
                        r.update(setups[kind].measure_tx(size, args.window))
                    if "rx" in directions:
                        r.update(setups[kind].measure_rx(size, args.window, args.rx_rate))
                res["net"][kind].append(r)
                print(f"sample {i + 1}/{args.samples} {kind}: " + ", ".join(f"{k}={num(v)}" for k, v in r.items()), flush=True)
    finally:
        for kind, s in setups.items():
            res[f"stop_{kind}"] = s.stop()
    print(f"\n{args.samples} samples each, alternating, {args.window:g} s host-timed window;"
          f" median [min-max]; started {started}")
    others = [k for k in kinds if k != "ours"]
    head = {"user": "QEMU -netdev user", "tap": "QEMU -netdev tap"}
    print(f"{'metric':22} {'ours (vhost-user-net)':>28}" + "".join(f" {head[k]:>28} {'ours/' + k:>9}" for k in others))
    for k in res["net"]["ours"][0]:
        o = summary([s[k] for s in res["net"]["ours"]])
        line = f"{k:22} {num(o[0]):>10} [{num(o[1]):>7}-{num(o[2]):>7}]"
        for other in others:
            if k in res["net"][other][0]:
                u = summary([s[k] for s in res["net"][other]])
                ratio = o[0] / u[0] if u[0] else float("nan")
                line += f" {num(u[0]):>10} [{num(u[1]):>7}-{num(u[2]):>7}] {ratio:9.3f}"
            else:  # ours only: no counterpart in QEMU's set-ups
                line += f" {'-':>28} {'-':>9}"
        print(line)
    if no_tap:
        print(f"-netdev tap left out: {no_tap}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
