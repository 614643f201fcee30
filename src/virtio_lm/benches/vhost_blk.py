"""vhost-user-blk back-ends without a guest: ours against qemu-storage-daemon, one front-end.

Run: ``python -m virtio_lm.benches.vhost_blk [--samples N] [--variant LABEL=ARGS ...]
[--baseline-src DIR] [--json PATH]`` (also ``virtio-lm bench vhost-blk``, with 3 samples).

``tests/qemu/figures.py`` measures the back-ends under a TCG guest, where the emulated CPU
takes most of each request's time and a back-end's own cost shows only as a blur.  Here one
Python front-end (:class:`~virtio_lm.drivers.vhost_user_frontend.VhostUserFrontend`: the
vhost-user conversation QEMU has, guest memory a memfd) drives each back-end *process* the way
Linux's virtio_blk driver would -- features VERSION_1, INDIRECT_DESC and EVENT_IDX when offered,
every request an indirect table (header, data segments, status) -- with the same workloads as
figures.py: 1 MiB sequential write and read at queue depth 1 (64 MiB), and 4 KiB random write
and read at QD 1 and QD 16 (2,000 and 4,000 requests over 64 MiB).  Each back-end serves its own
copy of one random image; back-ends are started once and their samples alternate (ours, qsd,
variants, ours, qsd, ...), so load on the machine falls on all alike.

Printed per metric and back-end: the median and spread (min-max) of the rate over the samples,
and per request the back-end process's CPU time (``/proc/PID/stat``, user + system) and this
front-end's; then ratios of medians to qsd.  The front-end is the same for every back-end, so
the ratio of rates understates the gap between back-ends; the CPU per request does not.

Before the samples every back-end passes a check of its data: blocks written through it are
read back through it and found in its image file (:func:`check_data` raises
:class:`~virtio_lm.errors.BlkDataError` when either differs).  Every request's status must be OK.

``--calls``: then each of our back-ends once more under :mod:`virtio_lm.benches.callcount`, every
workload once: Python and C function calls per request, a measure of the interpreter's work that
load on the machine does not move (ratios to ``baseline`` when there is one).

``--variant LABEL=ARGS``: one more back-end, ours with extra command-line ARGS (e.g.
``inline0=--inline-max 0``), in the same alternation.  ``--baseline-src DIR``: ours run from
another source tree (a ``git worktree`` of an older commit), a change against the code before it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from virtio_lm.benches import callcount
from virtio_lm.drivers.vhost_user_frontend import VhostUserFrontend
from virtio_lm.errors import BlkDataError, BlkIOError, DriverError
from virtio_lm.memory import Memory
from virtio_lm.virtqueue.device import Segment
from virtio_lm.virtqueue.driver import Allocator, DriverQueue
from virtio_lm.wire.blk import (
    BLK_CONFIG_SIZE,
    BlkConfig,
    BlkFeature,
    BlkOutHdr,
    BlkReqType,
    BlkStatus,
)
from virtio_lm.wire.features import Feature

MIB = 1 << 20
IMAGE_MIB = 64
QUEUE_SIZE = 128
MAX_QD = 16
SEG = 32 << 10  # a 1 MiB request is 32 data segments of 32 KiB
SEQ_COUNT = IMAGE_MIB
RAND_COUNT = {1: 2000, 16: 4000}
#: the part of virtio_blk_config every device has (up to write_zeroes_may_unmap and its padding);
#: older back-ends refuse a GET_CONFIG larger than their struct
CONFIG_BYTES = 60
WANTED = (
    (1 << Feature.VERSION_1) | (1 << Feature.INDIRECT_DESC) | (1 << Feature.EVENT_IDX)
    | (1 << BlkFeature.SEG_MAX) | (1 << BlkFeature.SIZE_MAX) | (1 << BlkFeature.BLK_SIZE) | (1 << BlkFeature.FLUSH)
)
METRICS = ("seq_write_MiBps", "seq_read_MiBps", "rand4k_write_qd1_iops", "rand4k_read_qd1_iops",
           "rand4k_write_qd16_iops", "rand4k_read_qd16_iops")
START_TIMEOUT = 30.0
REQUEST_TIMEOUT = 30.0


# ---------------------------------------------------------------------------- back-end processes
def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class BackendSpec:
    label: str
    kind: str  # "ours" or "qsd"
    args: tuple[str, ...] = ()
    src: str | None = None  # ours from this source tree


class BackendProcess:
    """A back-end process serving ``image`` on ``sock``; its output goes to ``log``."""

    def __init__(self, spec: BackendSpec, sock: str, image: str, log: str, *, counted: str | None = None) -> None:
        """``counted``: run ours under :mod:`virtio_lm.benches.callcount`, its counts in that file."""
        self.spec = spec
        self.counted = counted
        self._seq = 0
        if spec.kind == "ours":
            if counted:  # this tree's counter, whichever tree the back-end runs from (spec.src)
                head = ["-c", "import runpy, sys; runpy.run_path(sys.argv.pop(1), run_name='__main__')",
                        callcount.__file__, counted]
            else:
                head = ["-m", "virtio_lm.cli"]
            cmd = [sys.executable, *head, "vhost-user-blk", "--socket", sock, "--image", image, *spec.args]
        elif spec.kind == "qsd":
            cmd = ["qemu-storage-daemon",
                   "--blockdev", f"driver=file,node-name=file0,filename={image},cache.direct=off,locking=off",
                   "--blockdev", "driver=raw,node-name=disk0,file=file0",
                   "--export", f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={sock},writable=on"]
        else:
            raise ValueError(spec.kind)
        env = dict(os.environ)
        if spec.src:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, (spec.src, env.get("PYTHONPATH"))))
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def cpu(self) -> float:
        return _cpu_seconds(self.proc.pid)

    def calls(self, timeout: float = 30.0) -> tuple[int, int]:
        """(Python calls, C calls) the counted process made so far (SIGUSR1, then its file)."""
        assert self.counted is not None
        deadline = time.monotonic() + timeout
        if self._seq:
            self.proc.send_signal(signal.SIGUSR1)
        while True:
            try:
                seq, py, c = (int(x) for x in Path(self.counted).read_text().split())
            except (OSError, ValueError):
                seq = 0
            if seq > self._seq:
                self._seq = seq
                return py, c
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise DriverError(f"counted back-end gave no count (exit {self.proc.poll()}): {self.output()}")
            time.sleep(0.01)

    def output(self) -> str:
        self._log.flush()
        return Path(self.log_path).read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# ---------------------------------------------------------------------------- the driver side
class BlkFrontend:
    """A virtio-blk driver on one ring of a :class:`VhostUserFrontend`: ``MAX_QD`` request slots,
    each a header, a 1 MiB data buffer and a status byte in guest memory."""

    def __init__(self, sock: str, *, timeout: float = START_TIMEOUT) -> None:
        slot = MIB + 4096
        self.mem = Memory(4 * MIB + MAX_QD * slot, name="vhost-blk-bench", backing="memfd")
        try:
            self.fe = VhostUserFrontend(sock, self.mem, timeout=timeout)
            feats = self.fe.negotiate(WANTED)
            self.config = BlkConfig.decode(self.fe.config(CONFIG_BYTES) + bytes(BLK_CONFIG_SIZE - CONFIG_BYTES))  # type: ignore[attr-defined]
            self.indirect = bool(feats & (1 << Feature.INDIRECT_DESC))
            alloc = Allocator(0x1000, 4 * MIB - 0x1000)
            self.dq = DriverQueue.allocate(self.mem.cpu, alloc, QUEUE_SIZE, event_idx=bool(feats & (1 << Feature.EVENT_IDX)))
            seg_max = self.config.seg_max if feats & (1 << BlkFeature.SEG_MAX) else None
            # size_max 0 states no limit (qemu-storage-daemon offers SIZE_MAX with 0)
            size_max = self.config.size_max if feats & (1 << BlkFeature.SIZE_MAX) and self.config.size_max else None
            if (seg_max is not None and seg_max < MIB // SEG) or (size_max is not None and size_max < SEG):
                raise DriverError(f"the back-end takes at most {seg_max} segments of {size_max} bytes: "
                                  f"a 1 MiB request here is {MIB // SEG} of {SEG}")
            self.capacity = self.config.capacity
            self.fe.start_ring(0, self.dq)
        except BaseException:
            self.close()
            raise
        self.slots = [4 * MIB + i * slot for i in range(MAX_QD)]  # header at +0, status at +16, data at +4096
        self.free = list(range(MAX_QD))
        self.pending: dict[int, tuple[BlkReqType, int]] = {}  # slot -> (type, sector) in flight

    def close(self) -> None:
        fe = getattr(self, "fe", None)
        if fe is not None:
            fe.close()
        self.mem.close()

    def submit(self, op: BlkReqType, sector: int, nbytes: int, data: bytes | None = None) -> int:
        """One request on a free slot (not yet published); returns the slot."""
        i = self.free.pop()
        self.pending[i] = (op, sector)
        base = self.slots[i]
        port = self.mem.cpu
        port.write(base, BlkOutHdr(op, 0, sector).encode())  # type: ignore[attr-defined]
        port.write(base + 16, b"\xff")
        if data is not None:
            port.write(base + 4096, data)
        segs = [Segment(base + 4096 + off, min(SEG, nbytes - off)) for off in range(0, nbytes, SEG)]
        hdr, status = [Segment(base, 16)], [Segment(base + 16, 1)]
        if op == BlkReqType.OUT:
            self.dq.add(hdr + segs, status, indirect=self.indirect, token=i)
        else:
            self.dq.add(hdr, segs + status, indirect=self.indirect, token=i)
        return i

    def flush(self) -> None:
        """Publish what was submitted; kick when the back-end asks for it."""
        self.dq.publish()
        if self.dq.kick_needed():
            self.fe.kick(0)

    def reap(self, deadline: float) -> list[int]:
        """Wait for at least one completion (host-side ``deadline``); returns their slots, each
        checked OK and freed."""
        while True:
            done = self.dq.get_all_used()
            if done:
                break
            self.fe.wait_call(0, deadline)
        slots = []
        for token, _written in done:
            i = int(token)  # type: ignore[call-overload]
            st = self.mem.cpu.read(self.slots[i] + 16, 1)[0]
            op, sector = self.pending.pop(i)
            self.free.append(i)
            if st != BlkStatus.OK:
                known = st in BlkStatus._value2member_map_
                raise BlkIOError(BlkStatus(st) if known else st, op, sector, f"slot {i}")
            slots.append(i)
        return slots

    def data(self, slot: int, nbytes: int) -> bytes:
        return self.mem.cpu.read(self.slots[slot] + 4096, nbytes)

    def run(self, op: BlkReqType, offsets: list[int], nbytes: int, qd: int, payload: bytes | None) -> float:
        """Keep ``qd`` requests of ``nbytes`` at the byte ``offsets`` in flight; seconds taken."""
        t0 = time.perf_counter()
        deadline = time.monotonic() + REQUEST_TIMEOUT + len(offsets) * 0.05
        todo = iter(offsets)
        inflight = 0
        more = True
        while more or inflight:
            while more and inflight < qd:
                off = next(todo, None)
                if off is None:
                    more = False
                    break
                self.submit(op, off >> 9, nbytes, payload)
                inflight += 1
            self.flush()
            if inflight:
                inflight -= len(self.reap(deadline))
        return time.perf_counter() - t0


def check_data(bf: BlkFrontend, image: str, rng: random.Random) -> None:
    """Write four 4 KiB blocks and one 1 MiB block through the back-end, read them back through
    it and from its image file: :class:`BlkDataError` unless all three agree."""
    nblocks = IMAGE_MIB * MIB // 4096
    plan = [(rng.randrange(nblocks) * 4096, 4096) for _ in range(4)] + [(rng.randrange(IMAGE_MIB) * MIB, MIB)]
    deadline = time.monotonic() + REQUEST_TIMEOUT
    for off, n in plan:
        want = rng.randbytes(n)
        bf.submit(BlkReqType.OUT, off >> 9, n, want)
        bf.flush()
        bf.reap(deadline)
        bf.submit(BlkReqType.FLUSH, 0, 0)
        bf.flush()
        bf.reap(deadline)
        slot = bf.submit(BlkReqType.IN, off >> 9, n)
        bf.flush()
        bf.reap(deadline)
        got = bf.data(slot, n)
        if got != want:
            raise BlkDataError(f"read back {n} bytes at {off:#x} through the back-end: not what was written")
        with open(image, "rb") as f:
            f.seek(off)
            if f.read(n) != want:
                raise BlkDataError(f"image bytes at {off:#x} are not what was written through the back-end")


# ---------------------------------------------------------------------------- one sample
def workloads(rng: random.Random) -> list[tuple[str, BlkReqType, list[int], int, int, bytes | None]]:
    """(metric, request type, byte offsets, bytes per request, queue depth, payload) of each workload."""
    payload1m = rng.randbytes(MIB)
    payload4k = payload1m[:4096]
    nblocks = IMAGE_MIB * MIB // 4096
    work = [
        ("seq_write_MiBps", BlkReqType.OUT, [i * MIB for i in range(SEQ_COUNT)], MIB, 1, payload1m),
        ("seq_read_MiBps", BlkReqType.IN, [i * MIB for i in range(SEQ_COUNT)], MIB, 1, None),
    ]
    for qd, count in RAND_COUNT.items():
        offs = [rng.randrange(nblocks) * 4096 for _ in range(count)]
        work.append((f"rand4k_write_qd{qd}_iops", BlkReqType.OUT, offs, 4096, qd, payload4k))
        work.append((f"rand4k_read_qd{qd}_iops", BlkReqType.IN, offs, 4096, qd, None))
    return work


def sample(bf: BlkFrontend, be: BackendProcess, rng: random.Random) -> dict[str, float]:
    """Every workload once: {metric: rate, metric + '_cpu_us': back-end CPU us per request,
    metric + '_fe_us': front-end CPU us per request}."""
    out: dict[str, float] = {}
    for name, op, offs, n, qd, data in workloads(rng):
        c0, f0 = be.cpu(), time.thread_time()
        dt = bf.run(op, offs, n, qd, data)
        c1, f1 = be.cpu(), time.thread_time()
        out[name] = (len(offs) * n / MIB if n == MIB else len(offs)) / dt
        out[name + "_cpu_us"] = (c1 - c0) / len(offs) * 1e6
        out[name + "_fe_us"] = (f1 - f0) / len(offs) * 1e6
    return out


def count_calls(bf: BlkFrontend, be: BackendProcess, rng: random.Random) -> dict[str, float]:
    """Every workload once on a counted back-end: {metric + '_py_calls': Python calls per request,
    metric + '_c_calls': C calls per request}."""
    out: dict[str, float] = {}
    for name, op, offs, n, qd, data in workloads(rng):
        p0, c0 = be.calls()
        bf.run(op, offs, n, qd, data)
        p1, c1 = be.calls()
        out[name + "_py_calls"] = (p1 - p0) / len(offs)
        out[name + "_c_calls"] = (c1 - c0) / len(offs)
    return out


# ---------------------------------------------------------------------------- the run
@dataclass
class Result:
    specs: list[BackendSpec]
    samples: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    started: str = ""
    calls: dict[str, dict[str, float]] = field(default_factory=dict)  # label -> count_calls()


def measure(specs: list[BackendSpec], samples: int, work: Path, *, seed: int = 7, calls: bool = False,
            log=print) -> Result:
    """The samples (see the module docstring); with ``calls``, then each of our back-ends once
    more, counted (:func:`count_calls`), on a fresh process and a fresh copy of the image."""
    rng = random.Random(seed)
    base = work / "image.raw"
    with open(base, "wb") as f:
        f.write(rng.randbytes(IMAGE_MIB * MIB))
    res = Result(specs, {s.label: [] for s in specs}, time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    procs: dict[str, BackendProcess] = {}
    fronts: dict[str, BlkFrontend] = {}
    try:
        for s in specs:
            image = work / f"{s.label}.raw"
            shutil.copyfile(base, image)
            sock = str(work / f"{s.label}.sock")
            procs[s.label] = BackendProcess(s, sock, str(image), str(work / f"{s.label}.log"))
            try:
                fronts[s.label] = BlkFrontend(sock)
                check_data(fronts[s.label], str(image), rng)
            except (DriverError, OSError) as exc:
                raise DriverError(f"back-end {s.label}: {exc}; its output: {procs[s.label].output()}") from exc
        for i in range(samples):
            for s in specs:
                r = sample(fronts[s.label], procs[s.label], random.Random(seed * 1000 + i))
                res.samples[s.label].append(r)
                log(f"  sample {i + 1}/{samples} {s.label:>10}: " + "  ".join(f"{m.split('_')[0]}{m.split('_')[1][-4:]}"
                    f" {r[m]:,.0f}" for m in METRICS))
    finally:
        for s in specs:
            if s.label in fronts:
                fronts[s.label].close()
            if s.label in procs:
                procs[s.label].stop()
    for s in specs if calls else ():
        if s.kind != "ours":
            continue
        image = work / f"{s.label}-counted.raw"
        shutil.copyfile(base, image)
        sock = str(work / f"{s.label}-counted.sock")
        be = BackendProcess(s, sock, str(image), str(work / f"{s.label}-counted.log"),
                            counted=str(work / f"{s.label}.calls"))
        bf = None
        try:
            be.calls()  # up and counting
            bf = BlkFrontend(sock)
            res.calls[s.label] = count_calls(bf, be, random.Random(seed * 1000))
            log(f"  counted {s.label:>10}: " + "  ".join(f"{m.split('_')[0]}{m.split('_')[1][-4:]}"
                f" {res.calls[s.label][m + '_py_calls']:,.1f}" for m in METRICS))
        finally:
            if bf is not None:
                bf.close()
            be.stop()
    return res


def _med(vals: list[float]) -> str:
    return f"{statistics.median(vals):9.1f} [{min(vals):7.1f}-{max(vals):7.1f}]"


def report(res: Result) -> list[str]:
    n = len(next(iter(res.samples.values())))
    labels = [s.label for s in res.specs]
    ref = "qsd" if "qsd" in labels else labels[0]
    lines = [(f"vhost-user-blk back-ends, one Python front-end, no guest: {n} samples each, alternating; "
              f"median [min-max]; started {res.started}")]
    for what, suffix in (("rate", ""), ("back-end CPU per request, us", "_cpu_us"),
                         ("front-end CPU per request, us", "_fe_us")):
        lines.append(f"{what + ':':38}" + "".join(f"{lab:>28}" for lab in labels)
                     + "".join(f"{lab + '/' + ref:>14}" for lab in labels if lab != ref))
        for m in METRICS:
            meds = {lab: statistics.median(r[m + suffix] for r in res.samples[lab]) for lab in labels}
            row = f"  {m:36}" + "".join(f"{_med([r[m + suffix] for r in res.samples[lab]]):>28}" for lab in labels)
            row += "".join(f"{(meds[lab] / meds[ref] if meds[ref] else float('nan')):>14.2f}" for lab in labels if lab != ref)
            lines.append(row)
    if res.calls:
        counted = [lab for lab in labels if lab in res.calls]
        cref = "baseline" if "baseline" in counted else counted[0]
        for what, suffix in (("back-end Python calls per request:", "_py_calls"),
                             ("back-end C calls per request:", "_c_calls")):
            lines.append(f"{what:38}" + "".join(f"{lab:>28}" for lab in counted)
                         + "".join(f"{lab + '/' + cref:>14}" for lab in counted if lab != cref))
            for m in METRICS:
                vals = {lab: res.calls[lab][m + suffix] for lab in counted}
                lines.append(f"  {m:36}" + "".join(f"{vals[lab]:28.1f}" for lab in counted)
                             + "".join(f"{vals[lab] / vals[cref]:14.2f}" for lab in counted if lab != cref))
    return lines


def parse_variant(text: str) -> BackendSpec:
    label, sep, args = text.partition("=")
    if not sep or not label or label in ("ours", "qsd", "baseline"):
        raise argparse.ArgumentTypeError(f"--variant wants LABEL=ARGS with a new label, got {text!r}")
    return BackendSpec(label, "ours", tuple(shlex.split(args)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m virtio_lm.benches.vhost_blk", description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--variant", action="append", type=parse_variant, default=[], help="LABEL=ARGS: ours with ARGS")
    p.add_argument("--baseline-src", default=None, help="also ours from this source tree ('baseline')")
    p.add_argument("--no-qsd", action="store_true", help="leave qemu-storage-daemon out")
    p.add_argument("--calls", action="store_true",
                   help="then count each of our back-ends' Python and C calls per request (a figure load does not move)")
    p.add_argument("--json", default=None, help="write every sample here")
    a = p.parse_args(argv)
    specs = [BackendSpec("ours", "ours")]
    if not a.no_qsd:
        if shutil.which("qemu-storage-daemon") is None:
            print("qemu-storage-daemon is not installed: ours only (apt-get install qemu-system-x86 / qemu-utils)")
        else:
            specs.append(BackendSpec("qsd", "qsd"))
    if a.baseline_src:
        specs.append(BackendSpec("baseline", "ours", (), a.baseline_src))
    specs += a.variant
    with tempfile.TemporaryDirectory(prefix="vhost-blk-bench-") as tmp:
        res = measure(specs, a.samples, Path(tmp), calls=a.calls)
    for line in report(res):
        print(line)
    if a.json:
        Path(a.json).write_text(json.dumps({"started": res.started, "specs": [s.__dict__ for s in specs],
                                            "samples": res.samples, "calls": res.calls}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
