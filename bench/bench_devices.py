"""Device benchmarks: virtio-blk (``bench_blk``) and virtio-net (``bench_net``, when present).

Run: ``python bench/bench_devices.py [blk|net ...]`` (default: every section defined).

blk: 4 KiB random read / write IOPS and 128 KiB sequential throughput through
the VF -- the guest driver (:class:`~virtio_lm.drivers.blk_driver.BlkDriver`)
keeping 32 requests in flight, the device model doing pread/pwrite on its
pool -- against the same I/O done directly on the image file with
os.pread/os.pwrite in one thread (ratio = VF / direct); then the migration
calls of the device (quiesce, freeze, save, validate+restore on a second
device, resume) with 0 and with 64 requests submitted just before the
quiesce.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time

from virtio_lm.devices.base import ReqState
from virtio_lm.devices.blk import BlkDevice
from virtio_lm.drivers.blk_driver import BlkDriver
from virtio_lm.memory import Memory
from virtio_lm.pci import VirtioPciFunction
from virtio_lm.virtqueue.driver import Allocator

BLK_IMAGE = 64 << 20
BLK_GUEST = 64 << 20
QD = 32
SECONDS = 1.0


def _blk_rig(path: str, name: str):
    dev = BlkDevice(path, num_queues=2, backend_threads=8)
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
            drv._irq.wait(0.001)
            drv._irq.clear()
    return done, time.perf_counter() - t0


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
    src, smem, sfn = _blk_rig(path, "src")
    dst, dmem, dfn = _blk_rig(path, "dst")
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
        ddrv = BlkDriver.from_state(dfn, dmem.cpu, drv.export_state())
        bad = [c for c in ddrv.wait_all() if not c.ok]
        if bad or ddrv.in_flight():
            raise RuntimeError(f"migration lost or failed requests: {bad[:3]}")
        return out
    finally:
        for d, m in ((src, smem), (dst, dmem)):
            d.close()
            m.close()


def bench_blk() -> list[str]:
    lines = ["virtio-blk VF (QD 32, 2 queues, 8 back-end threads) vs direct pread/pwrite (1 thread)"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.raw")
        with open(path, "wb") as f:
            for _ in range(BLK_IMAGE // (1 << 20)):
                f.write(os.urandom(1 << 20))
        dev, mem, fn = _blk_rig(path, "vf")
        drv = BlkDriver(fn, mem.cpu, Allocator(0x1000, BLK_GUEST - 0x1000), queue_size=128)
        fd = os.open(path, os.O_RDWR)
        try:
            lines.append(f"  {'workload':<28}{'VF':>14}{'direct':>14}{'ratio':>8}")
            for label, op, size, seq in (
                ("4 KiB random read", "r", 4096, False),
                ("4 KiB random write", "w", 4096, False),
                ("128 KiB sequential read", "r", 128 << 10, True),
                ("128 KiB sequential write", "w", 128 << 10, True),
            ):
                n, dt = _vf_run(drv, op, size, seq, SECONDS)
                dn, ddt = _direct_run(fd, op, size, seq, SECONDS)
                vf, direct = n / dt, dn / ddt
                if size == 4096:
                    a, b = f"{vf:,.0f} IOPS", f"{direct:,.0f} IOPS"
                else:
                    a, b = f"{vf * size / 2**20:,.0f} MiB/s", f"{direct * size / 2**20:,.0f} MiB/s"
                lines.append(f"  {label:<28}{a:>14}{b:>14}{vf / direct:>8.3f}")
        finally:
            os.close(fd)
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


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    sections = {name[len("bench_"):]: fn for name, fn in globals().items() if name.startswith("bench_") and callable(fn)}
    for name in argv or sorted(sections):
        if name not in sections:
            raise SystemExit(f"unknown section {name!r} (have {sorted(sections)})")
        for line in sections[name]():
            print(line, flush=True)


if __name__ == "__main__":
    main()
