"""Make the golden migration stream the format-stability test restores.

    python tests/golden/make_golden.py

A 32 MiB VM with a blk VF (its disk: ``disk.img``) and a net VF (no switch) runs
its verifying workloads for a moment on an in-process host, then is saved with
``migrate file:`` to ``vm.stream``; both are written gzipped next to this file,
with ``golden.json`` (the VM's spec and what the source reported).  The stream
holds every section type a migration sends to a destination -- HELLO, ZERO, RAM,
ROUND, DEVICE (the blk and net VFs' state images), CPU_STATE (the vCPU and the
guest drivers' state document), COMPLETE -- so a change to any of their formats,
or to what a restore accepts, breaks ``tests/test_golden_stream.py``.  Made before
the issue-10 refactor, remade for stream version 2 (in-flight chains as rows, the net
workload's received numbers as runs); regenerate only for a deliberate format change
(and say so in the commit).
"""

from __future__ import annotations

import gzip
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from virtio_lm.host.host import Host, HostConfig
from virtio_lm.vm.machine import VmSpec

HERE = Path(__file__).resolve().parent
SPEC = dict(name="vm0", memory_mib=32, blk_blocks=64, net_mac="52:54:00:12:34:56", dirty_rate_mbps=4.0,
            blk_rate=0.0, blk_qd=16, net_rate=200.0, sweep_mib=1, seed=7)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="virtio-lm-golden-"))
    try:
        image = work / "disk.img"
        with open(image, "wb") as f:
            f.truncate(1 << 20)
        spec = VmSpec(**SPEC, blk_image=str(image))  # type: ignore[arg-type]
        host = Host(HostConfig(name="golden", qmp=f"unix:{work}/qmp", vms=[spec], calibrate=False))
        try:
            time.sleep(0.5)
            host.table.call("migrate", {"uri": f"file:{work}/vm.stream"})
            deadline = time.monotonic() + 60
            while (info := host.table.call("query-migrate"))["status"] not in ("completed", "failed", "cancelled"):
                if time.monotonic() > deadline:
                    raise SystemExit(f"the file migration did not end: {info}")
                time.sleep(0.02)
            if info["status"] != "completed":
                raise SystemExit(f"the file migration {info['status']}: {info.get('error-desc')}")
        finally:
            host.close()
        for name in ("vm.stream", "disk.img"):
            with open(work / name, "rb") as src, open(HERE / f"{name}.gz", "wb") as raw, \
                    gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as dst:
                shutil.copyfileobj(src, dst)
        meta = {"spec": SPEC, "in-flight": info.get("x-in-flight"), "ram": info["ram"]}
        (HERE / "golden.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        print(f"golden stream: {(work / 'vm.stream').stat().st_size} bytes; in flight {info.get('x-in-flight')}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
