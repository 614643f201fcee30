"""Figures: our vhost-user-blk back-end vs qemu-storage-daemon, same image, same run.

    python tests/qemu/figures.py [--json PATH]

Per back-end: guest sequential read/write (1 MiB O_DIRECT dd, 64 MiB) and 4 KiB random
read/write (tests/qemu/rio.c, O_DIRECT, queue depth 1, over 64 MiB) throughput, then a live
migration (the guest running the verifying loop) at max-bandwidth 1 GiB/s: QEMU's
query-migrate total-time and downtime.  Guest under TCG: absolute numbers are the emulator's;
the ratio is the figure.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qemu.guest import Backend, Vm, free_port, guest_assets  # noqa: E402

SEQ_MIB = 64
RIO_COUNT = 2000
BW = 1 << 30


def timed(vm: Vm, cmd: str) -> float:
    t = time.perf_counter()
    rc, out = vm.sh(cmd, 300)
    dt = time.perf_counter() - t
    if rc:
        raise RuntimeError(f"{cmd}: {rc} {out}")
    return dt


def throughput(kind: str, kernel: Path, initrd: Path, image: Path, work: Path) -> dict:
    be = Backend(kind, str(work / f"{kind}-io.sock"), str(image))
    vm = Vm(work, f"{kind}-io", kernel, initrd, be.socket_path)
    try:
        vm.boot()
        base = min(timed(vm, "true") for _ in range(5))  # console round trip
        r: dict = {}
        dt = timed(vm, f"dd if=/dev/zero of=/dev/vda bs=1M count={SEQ_MIB} oflag=direct 2>/dev/null") - base
        r["seq_write_MiBps"] = SEQ_MIB / dt
        dt = timed(vm, f"dd if=/dev/vda of=/dev/null bs=1M count={SEQ_MIB} iflag=direct 2>/dev/null") - base
        r["seq_read_MiBps"] = SEQ_MIB / dt
        rc, _ = vm.sh("[ -x /bin/rio ]")
        if rc == 0:
            for op, name in (("w", "rand4k_write_iops"), ("r", "rand4k_read_iops")):
                rc, out = vm.sh(f"rio {op} /dev/vda {SEQ_MIB} {RIO_COUNT} 7", 300)
                m = re.search(r"RIO (\d+) (\d+)", out)
                if rc or not m:
                    raise RuntimeError(out)
                r[name] = int(m.group(1)) / (int(m.group(2)) / 1e9)
        return r
    finally:
        vm.stop()
        be.stop()


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
        time.sleep(2)
        dst.qmp("query-status")
        src.qmp("migrate-set-parameters", **{"max-bandwidth": BW})
        src.qmp("migrate", uri=f"tcp:127.0.0.1:{port}")
        while True:
            info = src.qmp("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    kernel, initrd = guest_assets()
    work = Path(tempfile.mkdtemp(prefix="vlm-fig-"))
    image = work / "disk.img"
    with open(image, "wb") as f:
        f.truncate(128 << 20)
    res: dict = {}
    for kind in ("ours", "qsd"):
        res[kind] = {"io": throughput(kind, kernel, initrd, image, work)}
    for kind in ("ours", "qsd"):
        res[kind]["migration"] = migration(kind, kernel, initrd, image, work)
    print(f"{'metric':24} {'ours':>10} {'qsd':>10} {'ours/qsd':>9}")
    for k in res["ours"]["io"]:
        o, q = res["ours"]["io"][k], res["qsd"]["io"][k]
        print(f"{k:24} {o:10.1f} {q:10.1f} {o / q:9.2f}")
    for k in ("total_time_ms", "downtime_ms"):
        o, q = res["ours"]["migration"][k], res["qsd"]["migration"][k]
        print(f"migration {k:14} {o:10} {q:10} {o / q if q else float('nan'):9.2f}")
    print("verify after migration:", res["ours"]["migration"]["guest_verify"], "/", res["qsd"]["migration"]["guest_verify"])
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
