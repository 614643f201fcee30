"""Figures: our vhost-user-blk back-end vs qemu-storage-daemon, same image, same guest, one run.

    python tests/qemu/figures.py [--samples N] [--queues Q] [--migration] [--buffered]
                                 [--baseline-src DIR] [--json PATH]

Both back-ends serve a copy of the same raw image to their own guest (same kernel, initramfs,
QEMU command line); the two guests are up at the same time and the measurements alternate
between them (round 1: ours, qsd; round 2: qsd, ours; ... -- the order rotates each round), so
load on the machine, and the place in a round, fall on both alike.  Per sample, in the guest: sequential write and read (1 MiB O_DIRECT dd, 64 MiB),
4 KiB random write and read (tests/qemu/rio.c, O_DIRECT) at queue depth 1 and 16, over 64 MiB.
Printed per metric: the median and the spread (min-max) of the samples for each back-end, and
the ratio of the medians.  ``--migration``: also a live migration of a guest running the
verifying loop per back-end (QEMU's total-time and downtime; one sample each).  ``--buffered``:
also ours with ``--buffered-io`` (the image copied through a buffer instead of read straight
into guest memory) as a third guest in the same alternation.  ``--baseline-src DIR``: also ours
run from another source tree (e.g. ``git worktree add /tmp/base main``, then ``/tmp/base/src``)
as one more guest in the alternation: a change to the data path against the code before it,
in the same run.  Guest under TCG:
absolute numbers are the emulator's; the ratio is the figure.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qemu.guest import Backend, Vm, free_port, guest_assets  # noqa: E402

SEQ_MIB = 64
RIO_COUNT = {1: 2000, 16: 4000}
BW = 1 << 30
KINDS = ("ours", "qsd")


def timed(vm: Vm, cmd: str) -> float:
    t = time.perf_counter()
    rc, out = vm.sh(cmd, 300)
    dt = time.perf_counter() - t
    if rc:
        raise RuntimeError(f"{cmd}: {rc} {out}")
    return dt


def sample(vm: Vm, base: float) -> dict[str, float]:
    r: dict[str, float] = {}
    dt = timed(vm, f"dd if=/dev/zero of=/dev/vda bs=1M count={SEQ_MIB} oflag=direct 2>/dev/null") - base
    r["seq_write_MiBps"] = SEQ_MIB / dt
    dt = timed(vm, f"dd if=/dev/vda of=/dev/null bs=1M count={SEQ_MIB} iflag=direct 2>/dev/null") - base
    r["seq_read_MiBps"] = SEQ_MIB / dt
    for qd, count in RIO_COUNT.items():
        for op, name in (("w", f"rand4k_write_qd{qd}_iops"), ("r", f"rand4k_read_qd{qd}_iops")):
            rc, out = vm.sh(f"rio {op} /dev/vda {SEQ_MIB} {count} 7 {qd}", 300)
            m = re.search(r"RIO (\d+) (\d+)", out)
            if rc or not m:
                raise RuntimeError(out)
            r[name] = int(m.group(1)) / (int(m.group(2)) / 1e9)
    return r


def throughput(kernel: Path, initrd: Path, images: dict[str, Path], work: Path, samples: int, queues: int,
               kinds: tuple[str, ...] = KINDS, baseline_src: str | None = None) -> dict:
    bes: dict[str, Backend] = {}
    vms: dict[str, Vm] = {}
    try:
        for kind in kinds:
            baseline = kind == "ours-baseline"  # ours, run from the baseline's source tree
            bes[kind] = Backend("ours" if baseline else kind, str(work / f"{kind}-io.sock"), str(images[kind]),
                                queues=queues, src=baseline_src if baseline else None)
            vms[kind] = Vm(work, f"{kind}-io", kernel, initrd, bes[kind].socket_path, queues=queues, smp=1)
        for vm in vms.values():
            vm.boot(180)
        rc, _ = vms["ours"].sh("[ -x /bin/rio ]")
        if rc:
            raise RuntimeError("the guest has no rio (gcc missing?)")
        base = {k: min(timed(vm, "true") for _ in range(5)) for k, vm in vms.items()}  # console round trip
        out: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
        for i in range(samples):
            # the order rotates round by round: each back-end takes each place in a round equally
            # often (with samples a multiple of the back-ends); a fixed order favoured the one in
            # the last place by up to 15 % on sequential reads here (an A/A run: the same code in
            # two places, 2026-12-04)
            k = i % len(kinds)
            for kind in (*kinds[k:], *kinds[:k]):
                out[kind].append(sample(vms[kind], base[kind]))
                print(f"sample {i + 1}/{samples} {kind}: " + ", ".join(f"{k}={v:.0f}" for k, v in out[kind][-1].items()),
                      flush=True)
        return out
    finally:
        for t in (*vms.values(), *bes.values()):
            t.stop()


def migration(kind: str, kernel: Path, initrd: Path, image: Path, work: Path) -> dict:
    port = free_port()
    a = Backend(kind, str(work / f"{kind}-a.sock"), str(image))
    b = Backend(kind, str(work / f"{kind}-b.sock"), str(image))
    src = Vm(work, f"{kind}-src", kernel, initrd, a.socket_path)
    dst = Vm(work, f"{kind}-dst", kernel, initrd, b.socket_path, incoming_port=port)
    try:
        src.boot()
        src.sh("exec 9</dev/vda")
        src.send("sh /vlm/loop.sh &")
        deadline = time.monotonic() + 60
        while int(src.sh("cat /tmp/iter 2>/dev/null || echo 0")[1].split()[-1]) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError("the verifying loop did not start")
            time.sleep(0.2)
        dst.qmp("query-status")
        src.qmp("migrate-set-parameters", **{"max-bandwidth": BW})
        src.qmp("migrate", uri=f"tcp:127.0.0.1:{port}")
        deadline = time.monotonic() + 300
        while (info := src.qmp("query-migrate")).get("status") not in ("completed", "failed", "cancelled"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"migration still {info.get('status')}")
            time.sleep(0.05)
        rc, out = dst.sh("sh /vlm/verify.sh", 60)
        return {
            "status": info["status"],
            "total_time_ms": info.get("total-time"),
            "downtime_ms": info.get("downtime"),
            "setup_time_ms": info.get("setup-time"),
            "guest_verify": out.strip(),
        }
    finally:
        for t in (src, dst, a, b):
            t.stop()


def summary(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def against(io: dict, kind: str, title: str, short: str) -> None:
    """Print another variant of ours (``kind``) per metric: its median and spread, ours / it,
    and it / qsd."""
    print(f"\n{'metric':26} {title:>24} {'ours/' + short:>14} {short + '/qsd':>13}")
    for k in io["ours"][0]:
        o = statistics.median(s[k] for s in io["ours"])
        b = summary([s[k] for s in io[kind]])
        q = statistics.median(s[k] for s in io["qsd"])
        print(f"{k:26} {b[0]:9.1f} [{b[1]:6.0f}-{b[2]:6.0f}] {o / b[0]:14.2f} {b[0] / q:13.2f}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=3, help="samples per metric and back-end (>= 3 for a spread)")
    ap.add_argument("--queues", type=int, default=1, help="num-queues of both back-ends")
    ap.add_argument("--migration", action="store_true", help="also one live migration per back-end")
    ap.add_argument("--json", help="also write every sample here")
    ap.add_argument("--buffered", action="store_true",
                    help="also ours with --buffered-io (the image copied through a buffer) in the same alternation")
    ap.add_argument("--baseline-src", metavar="DIR",
                    help="also ours run from this source tree (another checkout's src) in the same alternation")
    args = ap.parse_args()
    kinds = (*KINDS, "ours-buffered") if args.buffered else KINDS
    if args.baseline_src:
        if not (Path(args.baseline_src) / "virtio_lm" / "cli.py").is_file():
            ap.error(f"--baseline-src {args.baseline_src}: no virtio_lm package there")
        kinds = (*kinds, "ours-baseline")
    kernel, initrd = guest_assets()
    work = Path(tempfile.mkdtemp(prefix="vlm-fig-"))
    images = {}
    for kind in kinds:
        images[kind] = work / f"{kind}.img"
        with open(images[kind], "wb") as f:
            f.truncate(128 << 20)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    res: dict = {"started": started, "samples": args.samples, "queues": args.queues,
                 "io": throughput(kernel, initrd, images, work, args.samples, args.queues, kinds, args.baseline_src)}
    if args.baseline_src:
        res["baseline_src"] = str(Path(args.baseline_src).resolve())
    print(f"\n{args.samples} samples each, alternating; median [min-max]; started {started}")
    print(f"{'metric':26} {'ours':>24} {'qemu-storage-daemon':>24} {'ours/qsd':>9}")
    for k in res["io"]["ours"][0]:
        o = summary([s[k] for s in res["io"]["ours"]])
        q = summary([s[k] for s in res["io"]["qsd"]])
        print(f"{k:26} {o[0]:9.1f} [{o[1]:6.0f}-{o[2]:6.0f}] {q[0]:9.1f} [{q[1]:6.0f}-{q[2]:6.0f}] {o[0] / q[0]:9.2f}")
    if args.buffered:
        against(res["io"], "ours-buffered", "ours --buffered-io", "buffered")
    if args.baseline_src:
        against(res["io"], "ours-baseline", "ours from " + Path(args.baseline_src).name, "baseline")
    if args.migration:
        for kind in KINDS:
            res[f"migration_{kind}"] = migration(kind, kernel, initrd, images[kind], work)
        for k in ("total_time_ms", "downtime_ms"):
            o, q = res["migration_ours"][k], res["migration_qsd"][k]
            print(f"migration {k:16} {o:>24} {q:>24} {o / q if q else float('nan'):9.2f}")
        print("verify after migration:", res["migration_ours"]["guest_verify"], "/", res["migration_qsd"]["guest_verify"])
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
