"""Device benchmarks: virtio-blk (``bench_blk``) and virtio-net (``bench_net``, when present).

Run: ``python -m virtio_lm.benches.devices [--seconds S] [--samples N] [blk|net ...]`` (default: every
section defined).

blk: 4 KiB random read / write IOPS and 128 KiB sequential throughput through
the VF, 32 requests kept in flight over its two queues, against the same I/O
done directly on the image file with os.pread/os.pwrite in one thread (ratio =
VF / direct).  Each workload runs four ways: the VF with direct DMA (the C fast
path serves reads and writes on the notification) or buffered (the VF default:
the back-end pool, through bounce buffers), each driven by
:class:`~virtio_lm.drivers.blk_driver.FixedRequests` (requests placed once and
reposted: the driver costs little, so the figure is the device's) or by the
general :class:`~virtio_lm.drivers.blk_driver.BlkDriver` (every request
allocated and placed anew, all in Python).  Then the migration calls of the
(buffered) device -- quiesce, freeze, save, validate+restore on a second
device, resume -- with 0 and with 64 requests submitted just before the
quiesce.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time

import numpy as np

from virtio_lm.devices.base import ReqState
from virtio_lm.devices.blk import BlkDevice
from virtio_lm.drivers.blk_driver import BlkDriver, FixedRequests
from virtio_lm.memory import Memory
from virtio_lm.pci import VirtioPciFunction
from virtio_lm.virtqueue.driver import Allocator
from virtio_lm.wire.blk import BlkReqType

BLK_IMAGE = 64 << 20
BLK_GUEST = 64 << 20
QD = 32
SECONDS = 1.0
SAMPLES = 1


def _blk_rig(path: str, name: str, *, direct: bool = True):
    """A blk VF on its own guest memory.  ``direct``: DMA straight between the image and guest
    memory (:attr:`~virtio_lm.devices.base.QueueDevice.direct_dma`, as vhost-user runs it), which
    lets reads and writes take the C fast path; off, the VF's default: every request's I/O is
    buffered on the back-end pool and QUIESCE never waits for it."""
    dev = BlkDevice(path, num_queues=2, backend_threads=8)
    dev.direct_dma = direct
    mem = Memory(BLK_GUEST, name=f"{name}-guest")
    fn = VirtioPciFunction(dev, mem.device_port(name), name=name)
    return dev, mem, fn


def _vf_run(drv: BlkDriver, op: str, size: int, sequential: bool, seconds: float) -> tuple[int, float]:
    """(completed requests, elapsed s) keeping QD requests in flight."""
    nblocks = BLK_IMAGE // size
    rng = random.Random(1)
    payload = os.urandom(size)
    pos = 0
    done = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while True:
        now = time.perf_counter()
        while drv.in_flight() < QD and now < end:
            if sequential:
                blk = pos % nblocks
                pos += 1
            else:
                blk = rng.randrange(nblocks)
            sector = blk * size >> 9
            if op == "r":
                drv.submit_read(sector, size >> 9, kick=False)
            else:
                drv.submit_write(sector, payload, kick=False)
        drv.kick()
        for c in drv.reap():
            if not c.ok:
                raise RuntimeError(f"request failed: {c}")
            done += 1
        if now >= end and drv.in_flight() == 0:
            break
        if drv.in_flight() >= QD or now >= end:
            drv.wait_interrupt(0.001)
    return done, time.perf_counter() - t0


def _vf_fixed_run(drv: BlkDriver, op: str, size: int, sequential: bool, seconds: float) -> tuple[int, float]:
    """As :func:`_vf_run`, through :class:`FixedRequests`: QD requests split over the queues, each
    placed once and reposted with a new sector (fio's fixed buffers) -- the driver's cost
    per request is a header store and an avail entry, so the figure is the device's."""
    nblocks = BLK_IMAGE // size
    rng = np.random.default_rng(1)
    kind = BlkReqType.IN if op == "r" else BlkReqType.OUT
    queues = sorted(drv.queues)
    per = QD // len(queues)
    fill = os.urandom(size) if op == "w" else None
    frs = [FixedRequests(drv, q, per, size, kind, fill=fill) for q in queues]
    pos = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    try:
        while True:
            now = time.perf_counter()
            for fr in frs:
                n = fr.idle()
                if n and now < end:
                    if sequential:
                        blks = np.arange(pos, pos + n) % nblocks
                        pos += n
                    else:
                        blks = rng.integers(0, nblocks, n)
                    fr.submit((blks * (size >> 9)).tolist())
            got = 0
            for fr in frs:
                got += len(fr.reap())
            inflight = sum(fr.in_flight() for fr in frs)
            if now >= end and not inflight:
                break
            if not got and inflight:
                drv.wait_interrupt(0.001)
        done = sum(fr.completed for fr in frs)
        if any(fr.failed for fr in frs):
            raise RuntimeError(f"{sum(fr.failed for fr in frs)} fixed requests failed")
        return done, time.perf_counter() - t0
    finally:
        for fr in frs:
            fr.close()


def _direct_run(fd: int, op: str, size: int, sequential: bool, seconds: float) -> tuple[int, float]:
    nblocks = BLK_IMAGE // size
    rng = random.Random(1)
    payload = os.urandom(size)
    pos = 0
    done = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end:
        for _ in range(64):
            blk = (pos % nblocks) if sequential else rng.randrange(nblocks)
            pos += 1
            if op == "r":
                os.pread(fd, size, blk * size)
            else:
                os.pwrite(fd, payload, blk * size)
            done += 1
    return done, time.perf_counter() - t0


def _mig_times(path: str, inflight: int) -> dict[str, float | int]:
    src, smem, sfn = _blk_rig(path, "src", direct=False)  # the VF default: requests stay in flight on the pool
    dst, dmem, dfn = _blk_rig(path, "dst", direct=False)
    try:
        drv = BlkDriver(sfn, smem.cpu, Allocator(0x1000, BLK_GUEST - 0x1000), queue_size=128)
        rng = random.Random(2)
        for i in range(inflight):
            blk = rng.randrange(BLK_IMAGE // 4096)
            if i % 2:
                drv.submit_write(blk * 8, os.urandom(4096), kick=False)
            else:
                drv.submit_read(blk * 8, 8, kick=False)
        out: dict[str, float | int] = {}
        drv.kick()  # the device takes all of them now; the quiesce follows at once
        t = time.perf_counter()
        src.mig_quiesce()
        out["quiesce_ms"] = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        src.mig_freeze(10.0)
        out["freeze_ms"] = (time.perf_counter() - t) * 1e3
        reqs = src.requests()
        out["held"] = sum(r.state is ReqState.DONE for r in reqs)
        out["not_started"] = sum(r.state is ReqState.PENDING for r in reqs)
        t = time.perf_counter()
        blob = src.mig_save()
        out["save_ms"] = (time.perf_counter() - t) * 1e3
        out["image_bytes"] = len(blob)
        dmem.cpu.write(0, smem.read(0, BLK_GUEST))
        dst.mig_freeze(10.0)
        t = time.perf_counter()
        dst.mig_restore(dst.mig_validate(blob))
        out["restore_ms"] = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        dst.mig_resume()
        out["resume_ms"] = (time.perf_counter() - t) * 1e3
        ddrv = BlkDriver.from_state(drv.save(), fn=dfn, port=dmem.cpu)
        bad = [c for c in ddrv.wait_all() if not c.ok]
        if bad or ddrv.in_flight():
            raise RuntimeError(f"migration lost or failed requests: {bad[:3]}")
        return out
    finally:
        for d, m in ((src, smem), (dst, dmem)):
            d.close()
            m.close()


def bench_blk() -> list[str]:
    lines = ["virtio-blk VF (QD 32 over 2 queues, 8 back-end threads) vs direct pread/pwrite (1 thread)",
             "  drivers: 'fixed' = FixedRequests (each request placed once, reposted with a new sector:",
             "  fio's fixed buffers); 'general' = BlkDriver.submit (every request allocated and placed anew)",
             "  VF modes: 'direct' = direct_dma on (the C fast path serves reads and writes); 'buffered' = the",
             "  VF default (I/O on the back-end pool through a bounce buffer)"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.raw")
        with open(path, "wb") as f:
            for _ in range(BLK_IMAGE // (1 << 20)):
                f.write(os.urandom(1 << 20))
        fd = os.open(path, os.O_RDWR)
        rigs = {mode: _blk_rig(path, f"vf-{mode}", direct=mode == "direct") for mode in ("direct", "buffered")}
        drvs = {mode: BlkDriver(fn, mem.cpu, Allocator(0x1000, BLK_GUEST - 0x1000), queue_size=128)
                for mode, (_, mem, fn) in rigs.items()}
        try:
            lines.append(f"  {SAMPLES} samples of {SECONDS:g} s each, interleaved: median [min-max]; ratio = median / "
                         f"median of the direct pread/pwrite run in the same rounds")
            lines.append(f"  {'workload':<26}{'VF mode':<10}{'driver':<9}{'VF':>28}{'direct':>16}{'ratio':>8}")
            for label, op, size, seq in (
                ("4 KiB random read", "r", 4096, False),
                ("4 KiB random write", "w", 4096, False),
                ("128 KiB sequential read", "r", 128 << 10, True),
                ("128 KiB sequential write", "w", 128 << 10, True),
            ):
                cases = (("direct", _vf_fixed_run, "fixed"), ("direct", _vf_run, "general"),
                         ("buffered", _vf_fixed_run, "fixed"), ("buffered", _vf_run, "general"))
                got: dict[int, list[float]] = {i: [] for i in range(len(cases))}
                base: list[float] = []
                for _ in range(SAMPLES):
                    dn, ddt = _direct_run(fd, op, size, seq, SECONDS)
                    base.append(dn / ddt)
                    for i, (mode, run, _) in enumerate(cases):
                        n, dt = run(drvs[mode], op, size, seq, SECONDS)
                        got[i].append(n / dt)
                direct = float(np.median(base))

                def fmt(v: float) -> str:
                    return f"{v:,.0f}" if size == 4096 else f"{v * size / 2**20:,.0f}"

                unit = "IOPS" if size == 4096 else "MiB/s"
                for i, (mode, _, drv_name) in enumerate(cases):
                    vals = got[i]
                    med = float(np.median(vals))
                    spread = f"{fmt(med)} [{fmt(min(vals))}-{fmt(max(vals))}] {unit}"
                    lines.append(f"  {label:<26}{mode:<10}{drv_name:<9}{spread:>28}{fmt(direct) + ' ' + unit:>16}"
                                 f"{med / direct:>8.3f}")
            served = {mode: rigs[mode][0].fast_served for mode in rigs}
            lines.append(f"  requests served by the C fast path: direct {served['direct']:,}, buffered "
                         f"{served['buffered']:,}")
        finally:
            os.close(fd)
            for dev, mem, _ in rigs.values():
                dev.close()
                mem.close()
        lines.append("  migration calls (device level; 'in flight' = kicked just before quiesce)")
        for inflight in (0, 64):
            t = _mig_times(path, inflight)
            lines.append(
                f"    {inflight:>2} in flight: quiesce {t['quiesce_ms']:.3f} ms, freeze {t['freeze_ms']:.3f} ms "
                f"(incl. fdatasync), save {t['save_ms']:.3f} ms ({t['image_bytes']} B; held {t['held']}, "
                f"not started {t['not_started']}), restore {t['restore_ms']:.3f} ms, resume {t['resume_ms']:.3f} ms"
            )
    return lines



# ====================================================================== virtio-net
NET_SECONDS = 1.0


def _raw_udp_pps(size: int, seconds: float) -> tuple[int, float]:
    """Baseline: one UDP socket blasting ``size``-byte datagrams at another on loopback."""
    import socket
    import threading

    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(0.2)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    got = [0]
    stop = threading.Event()

    def count() -> None:
        while not stop.is_set():
            try:
                rx.recv(65536)
                got[0] += 1
            except socket.timeout:
                pass

    t = threading.Thread(target=count)
    t.start()
    payload = bytes(size + 1)  # the same kind byte + frame as a switch message
    addr = rx.getsockname()
    t0 = time.perf_counter()
    end = t0 + seconds
    sent = 0
    while time.perf_counter() < end:
        for _ in range(64):
            tx.sendto(payload, addr)
        sent += 64
    dt = time.perf_counter() - t0
    time.sleep(0.2)
    stop.set()
    t.join()
    tx.close()
    rx.close()
    return got[0], dt


def _switch_process() -> tuple[subprocess.Popen[str], tuple[str, int]]:
    """The embedded switch as its own process (as ``virtio-lm demo`` runs it) and its address."""
    p = subprocess.Popen([sys.executable, "-m", "virtio_lm.net.switch", "--idle-timeout", "30"],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    line = p.stdout.readline().split()
    if line[:2] != ["listening", "on"]:
        p.kill()
        raise RuntimeError(f"the switch did not start: {line}")
    host, _, port = line[2].rpartition(":")
    return p, (host, int(port))


def _vf_to_peer(size: int, seconds: float, inline_max: int = 0, driver: str = "general") -> tuple[int, int, float]:
    """(frames sent by the guest, frames the peer counted, elapsed s): VF -> switch -> peer, the
    switch and the peer (:mod:`virtio_lm.net.seqsink`) each its own process.  ``inline_max``: the
    device's (0, the VF default: every send on its back-end thread; else sent on the kick's path,
    by the C fast path when it can).  ``driver``: "general" (NetDriver.send_many, every frame
    placed anew) or "fixed" (FixedFrames: frames placed once, reposted with new numbers).  A
    duplicated or reordered frame fails the run."""
    from virtio_lm.drivers.net_driver import FixedFrames
    from virtio_lm.net.backends import UdpSwitchPort
    from virtio_lm.net.peer import seq_frame
    from virtio_lm.net.testbed import make_vm
    from virtio_lm.wire.net import format_mac

    peer_mac = bytes.fromhex("02aabbccdd01")
    sw, addr = _switch_process()
    vm = make_vm(UdpSwitchPort(addr, name="vf"), with_pf=False)
    vm.dev.inline_max = inline_max
    sink: subprocess.Popen[str] | None = None
    try:
        drv = vm.bring_up(queue_size=256)
        sink = subprocess.Popen([sys.executable, "-m", "virtio_lm.net.seqsink", "--switch", f"{addr[0]}:{addr[1]}",
                                 "--src", format_mac(drv.mac), "--mac", format_mac(peer_mac), "--quiet", "30"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert sink.stdout is not None
        if sink.stdout.readline().strip() != "ready":
            raise RuntimeError("the peer did not start")
        seq = 0
        t0 = time.perf_counter()
        end = t0 + seconds
        if driver == "fixed":
            ff = FixedFrames(drv, 256, size, peer_mac)
            while time.perf_counter() < end:
                ff.reap()
                if ff.idle() >= 32:
                    ff.send()
                else:
                    time.sleep(0.0001)  # (the device runs on the kick: nothing to wait for but the pool, if any)
            while ff.in_flight():
                ff.reap()
                time.sleep(0.0001)
            seq = ff.sent
            ff.close()
        else:
            while time.perf_counter() < end:
                drv.reap_tx()
                room = drv.tr.queues[1].num_free()
                if room >= 32:
                    drv.send_many([seq_frame(peer_mac, drv.mac, 9, seq + i, size) for i in range(32)])
                    seq += 32
                else:
                    time.sleep(0.0002)  # a guest would wait for the used-buffer interrupt; let the device run
            while drv.tx_in_flight():
                drv.reap_tx()
                time.sleep(0.0002)
        dt = time.perf_counter() - t0
        out, _ = sink.communicate(timeout=60)  # stdin closes: it counts what is still coming, then reports
        report = json.loads(out.strip().splitlines()[-1])
        if report["duplicates"] or report["reordered"]:
            raise RuntimeError(f"the peer saw frames twice or out of order: {report}")
        return seq, int(report["frames"]), dt
    finally:
        if sink is not None and sink.poll() is None:
            sink.kill()
        vm.close()
        sw.terminate()
        sw.wait(10)


def _net_hop_costs(n: int = 20000) -> dict[str, float]:
    """CPU per 64 B frame of each hop of the VF -> switch -> peer path, in microseconds, each measured
    alone in this process: the loopback ``sendto`` and ``recv`` of one datagram, the switch's
    forwarding of a learned unicast frame (its rules and its ``sendto``), and the VF's driver and
    device per frame (32 frames a kick) with a plain socket as the switch."""
    import socket

    from virtio_lm.net.backends import UdpSwitchPort
    from virtio_lm.net.peer import seq_frame
    from virtio_lm.net.switch import L2Switch, frame_message
    from virtio_lm.net.testbed import make_vm

    out: dict[str, float] = {}
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sw = L2Switch()  # not started: handle() is called here, its sendto is real
    try:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        b.setblocking(False)
        dst = b.getsockname()
        vf_mac, peer_mac = bytes.fromhex("525400123456"), bytes.fromhex("02aabbccdd01")
        msg = frame_message(seq_frame(peer_mac, vf_mac, 9, 0, 64))

        def drain() -> int:
            k = 0
            while True:
                try:
                    b.recv(2048)
                except BlockingIOError:
                    return k
                k += 1

        t = time.perf_counter()
        for _ in range(n):
            a.sendto(msg, dst)
        out["sendto"] = (time.perf_counter() - t) / n * 1e6
        t = time.perf_counter()
        got = drain()
        out["recv"] = (time.perf_counter() - t) / max(got, 1) * 1e6
        sw.handle(frame_message(seq_frame(b"\xff" * 6, peer_mac, 9, 0, 64)), dst)  # the peer's MAC is at b
        src = a.getsockname()
        t = time.perf_counter()
        for _ in range(n):
            sw.handle(msg, src)
        out["switch"] = (time.perf_counter() - t) / n * 1e6
        drain()
        vm = make_vm(UdpSwitchPort(dst, name="hop"), with_pf=False)
        vm.dev.inline_max = 2048  # sent on the kick's path, as vhost-user-net does
        try:
            drv = vm.bring_up(queue_size=256)
            frames = [seq_frame(peer_mac, drv.mac, 9, i, 64) for i in range(32)]
            rounds = max(1, n // 320)
            t = time.perf_counter()
            for _ in range(rounds):
                drv.send_many(frames)
                while drv.tx_in_flight():
                    drv.reap_tx()
                    drain()
            out["vf"] = (time.perf_counter() - t) / (rounds * 32) * 1e6
        finally:
            vm.close()
    finally:
        sw.stop()
        a.close()
        b.close()
    return out


def _net_mig_times(inflight: int) -> dict[str, float | int]:
    from virtio_lm.net.backends import UdpSwitchPort
    from virtio_lm.net.peer import NetPeer, seq_frame
    from virtio_lm.net.switch import L2Switch
    from virtio_lm.net.testbed import make_vm, migrate
    from virtio_lm.wire.state import InflightHeader, RecordType, decode_image

    peer_mac = bytes.fromhex("02aabbccdd01")
    sw = L2Switch(idle_timeout=30).start()
    peer = NetPeer(sw.address, peer_mac)
    src = make_vm(UdpSwitchPort(sw.address, name="src"), name="src")
    dst = make_vm(UdpSwitchPort(sw.address, name="dst"), name="dst")
    out: dict[str, float | int] = {}
    try:
        drv = src.bring_up(queue_size=128)
        assert src.dev.backend is not None
        src.dev.backend.pause_tx()
        if inflight:
            drv.send_many([seq_frame(peer_mac, drv.mac, 9, i) for i in range(inflight)])
        deadline = time.monotonic() + 10
        while src.dev.in_flight < inflight and time.monotonic() < deadline:
            time.sleep(0.001)

        def half_on_the_wire() -> None:  # half are sent while quiesced (held), half not started
            assert src.dev.backend is not None
            src.dev.backend.grant_tx(inflight // 2)
            while src.dev.stats["tx_frames"] < inflight // 2 and time.monotonic() < deadline:
                time.sleep(0.0005)

        def count(blob: bytes) -> bytes:
            hs = [InflightHeader.unpack_from(r.payload, 0) for r in decode_image(blob).of_type(RecordType.INFLIGHT)]
            out["held"] = sum(h.done for h in hs)
            out["not_started"] = sum(1 - h.done for h in hs)
            out["image_bytes"] = len(blob)
            return blob

        new = migrate(src, dst, between_quiesce_and_freeze=half_on_the_wire, tamper=count)
        for k, v in src.timings.items():
            out[f"src_{k}_ms"] = v * 1e3
        for k, v in dst.timings.items():
            out[f"dst_{k}_ms"] = v * 1e3
        while new.tx_in_flight() and time.monotonic() < deadline:
            new.reap_tx()
        if not peer.wait_count(new.mac, inflight, 5.0) or sorted(peer.seqs_from(new.mac)) != list(range(inflight)):
            raise RuntimeError("TX frames lost or duplicated across the migration")
        return out
    finally:
        src.close()
        dst.close()
        peer.close()
        sw.stop()


def bench_net() -> list[str]:
    lines = ["virtio-net VF -> embedded UDP switch -> peer (1 TX queue of 256; the switch and the peer each its own",
             "  process; TX 'pool': each send on the device's back-end thread, the VF default; 'inline': sent on the",
             "  kick's path, as vhost-user-net runs it -- by the C fast path, as one burst a kick; driver 'general':",
             "  NetDriver.send_many, every frame placed anew; 'fixed': FixedFrames, placed once, reposted)"]
    lines.append(f"  {SAMPLES} sample(s) of {NET_SECONDS:g} s each, interleaved: median [min-max] of the peer's pps; the "
                 f"other columns are medians")
    lines.append(f"  {'frame':<8}{'TX':<8}{'driver':<9}{'VF sent pps':>13}{'peer pps':>30}{'Mbit/s':>9}{'delivered':>11}"
                 f"{'raw UDP pps':>13}{'ratio':>7}")
    cases = (("pool", 0, "general"), ("inline", 2048, "general"), ("inline", 2048, "fixed"))
    for size in (64, 1514):
        raws: list[float] = []
        runs: dict[int, list[tuple[float, float, float]]] = {i: [] for i in range(len(cases))}
        for _ in range(SAMPLES):
            raw, rdt = _raw_udp_pps(size, NET_SECONDS)
            raws.append(raw / rdt)
            for i, (_, inline, driver) in enumerate(cases):
                sent, got, dt = _vf_to_peer(size, NET_SECONDS, inline, driver)
                runs[i].append((sent / dt, got / dt, got / max(sent, 1)))
        raw_pps = float(np.median(raws))
        for i, (tx, _, driver) in enumerate(cases):
            sent_pps = float(np.median([r[0] for r in runs[i]]))
            peer = [r[1] for r in runs[i]]
            pps = float(np.median(peer))
            spread = f"{pps:,.0f} [{min(peer):,.0f}-{max(peer):,.0f}]"
            delivered = float(np.median([r[2] for r in runs[i]]))
            lines.append(
                f"  {size:>4} B  {tx:<8}{driver:<9}{sent_pps:>13,.0f}{spread:>30}{pps * size * 8 / 1e6:>9.1f}"
                f"{delivered:>10.1%}{raw_pps:>13,.0f}{pps / raw_pps:>7.3f}"
            )
    h = _net_hop_costs()
    floor = 2 * h["sendto"] + 2 * h["recv"]
    cores = os.cpu_count() or 1
    lines.append("  one frame a datagram (what the Python path sends):")
    lines.append(f"  CPU per 64 B frame, us: loopback sendto {h['sendto']:.1f}, recv {h['recv']:.1f}; switch forward "
                 f"{h['switch']:.1f} (rules + its sendto); VF driver + device {h['vf']:.1f} (inline TX, incl. its sendto)")
    lines.append(f"  the path's kernel work alone (2 sendto + 2 recv) is {floor:.1f} us a frame: at most "
                 f"{cores / floor * 1e6:,.0f} pps on this machine's {cores} cores with no user-space work; with it "
                 f"(VF + switch + peer recv), {cores / (h['vf'] + h['switch'] + h['recv']) * 1e6:,.0f} pps")
    lines.append("  migration through the PF control path (controller calls, two PFs, two guest memories)")
    for inflight in (0, 64):
        t = _net_mig_times(inflight)
        lines.append(
            f"    {inflight:>2} TX in flight: quiesce {t['src_quiesce_ms']:.3f} ms, freeze + save "
            f"{t['src_freeze-save_ms']:.3f} ms ({t['image_bytes']} B; held {t.get('held', 0)}, not started "
            f"{t.get('not_started', 0)}), restore {t['dst_restore_ms']:.3f} ms, resume {t['dst_resume_ms']:.3f} ms"
        )
    return lines

def main(argv: list[str] | None = None) -> None:
    """``[--seconds S] [--samples N] [SECTION...]``: the sections (blk, net), each measurement S
    seconds long (default 1), the throughput tables from N interleaved samples (default 1)."""
    global SECONDS, NET_SECONDS, SAMPLES
    argv = list(sys.argv[1:] if argv is None else argv)
    while argv[:1] in (["--seconds"], ["--samples"]):
        if len(argv) < 2:
            raise SystemExit(f"{argv[0]} needs a value")
        if argv[0] == "--seconds":
            SECONDS = NET_SECONDS = float(argv[1])
        else:
            SAMPLES = int(argv[1])
            if SAMPLES < 1:
                raise SystemExit("--samples must be at least 1")
        argv = argv[2:]
    sections = {name[len("bench_"):]: fn for name, fn in globals().items() if name.startswith("bench_") and callable(fn)}
    for name in argv or sorted(sections):
        if name not in sections:
            raise SystemExit(f"unknown section {name!r} (have {sorted(sections)})")
        for line in sections[name]():
            print(line, flush=True)


if __name__ == "__main__":
    main()
