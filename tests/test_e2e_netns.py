"""End to end with the two hosts in two network namespaces joined by a veth pair.

Layout (addresses from 10.199.0.0/24; names carry the test process's pid)::

    namespace vlm-src-PID                      namespace vlm-dst-PID
    +----------------------------------+       +---------------------------+
    | switch  10.199.0.1:S (UDP)       |       |                           |
    | peer    -> 10.199.0.1:S          |       |                           |
    | source host  (QMP unix socket)   |       | destination host          |
    |   net VF -> 10.199.0.1:S         |       |   net VF -> 10.199.0.1:S  | (frames cross the veth)
    |   migrate tcp:10.199.0.2:P  -----+-veth--+-> migrate-incoming        |
    |                                  |       |      tcp:10.199.0.2:0     |
    |  vlmaPID 10.199.0.1/24           |       |  vlmbPID 10.199.0.2/24    |
    +----------------------------------+       +---------------------------+

Every process runs inside its namespace via ``ip netns exec``; the test talks to
the hosts over their QMP unix sockets (the file system is shared).  The
migration stream and the destination's network traffic cross the veth pair:
the veth's byte counters on the destination side must have carried at least
the whole stream.  Skipped, with the reason, where network namespaces cannot be
made here (not root, no iproute2, no CAP_SYS_ADMIN).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

pytestmark = pytest.mark.slow  # real host processes: seconds per test

pytest.importorskip("qemu.qmp")

from e2e_helpers import Cluster, finish_and_verify, migrate, vm_arg, vm_status  # noqa: E402

SRC_IP, DST_IP = "10.199.0.1", "10.199.0.2"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _why_no_netns() -> str | None:
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"vlm-probe-{os.getpid()}"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"'ip netns add' does not work here: {r.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@pytest.fixture
def namespaces():
    why = _why_no_netns()
    if why:
        pytest.skip(why)
    pid = os.getpid() % 100000
    a, b = f"vlm-src-{pid}", f"vlm-dst-{pid}"
    va, vb = f"vlma{pid}", f"vlmb{pid}"
    try:
        _ip("netns", "add", a)
        _ip("netns", "add", b)
        _ip("link", "add", va, "netns", a, "type", "veth", "peer", "name", vb, "netns", b)
        for ns, dev, addr in ((a, va, SRC_IP), (b, vb, DST_IP)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield a, b, vb
    finally:
        _ip("netns", "del", a, check=False)  # takes the veth pair with it
        _ip("netns", "del", b, check=False)


def _rx_bytes(ns: str, dev: str) -> int:
    out = json.loads(_ip("-n", ns, "-j", "-s", "link", "show", dev).stdout)
    return int(out[0]["stats64"]["rx"]["bytes"])


def test_e2e_across_network_namespaces_over_veth(namespaces, tmp_path) -> None:
    ns_src, ns_dst, veth_dst = namespaces
    c = Cluster(tmp_path)
    try:
        image = c.image()
        sw = c.switch(f"{SRC_IP}:0", netns=ns_src)
        assert sw.startswith(SRC_IP)
        peer = c.peer(sw, netns=ns_src)
        vm = vm_arg(image)
        src = c.host([vm], switch=sw, netns=ns_src).monitor()
        dst = c.host([vm], switch=sw, incoming=True, netns=ns_dst).monitor()
        # the destination really is elsewhere: the source's namespace reaches it over the veth only
        assert _ip("-n", ns_src, "route", "get", DST_IP).stdout.split()[2] == f"vlma{os.getpid() % 100000}"
        time.sleep(0.8)
        rx_before = _rx_bytes(ns_dst, veth_dst)
        info = migrate(src, dst, {"x-tracking-mode": "push-bytemap"}, uri=f"tcp:{DST_IP}:0")
        assert info["status"] == "completed", info
        assert info["destination"]["status"] == "completed"
        crossed = _rx_bytes(ns_dst, veth_dst) - rx_before
        assert crossed >= info["ram"]["transferred"], (crossed, info["ram"]["transferred"])
        assert info["x-in-flight"]["guest"]["blk"] > 0
        assert vm_status(src) == "postmigrate" and vm_status(dst) == "running"
        sent_before_dst = dst.cmd("query-vms")[0]["net"]["tx-sent"]
        res = finish_and_verify(src, dst, peer, after=0.5)
        assert res["guest"]["passed"], json.dumps(res["guest"]["checks"], default=str)[:3000]
        # the destination's net VF reached the switch across the veth: the peer heard it after the move
        assert res["network"]["passed"], res["network"]
        assert max(res["peer"]["received"]) >= sent_before_dst, "no frame sent on the destination reached the peer"
    finally:
        c.close()
