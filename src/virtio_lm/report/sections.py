"""The report's measurements, one function per section.

Each ``measure_*`` takes the section's plan (:data:`PLANS`, quick or full)
and ``tick`` (called once per sample, for the progress bar) and returns a
:class:`Section`: the question, the answer written from the numbers just
measured, the tables, the raw data the plots are drawn from.  Nothing here
is a constant result: every figure comes from the run.

Measurements reuse the benches' functions: migrations are
:func:`virtio_lm.bench_downtime.one_run` (a fresh pair of host processes per
run) and :func:`~virtio_lm.bench_downtime.run_matrix`; the PF figures are
:mod:`virtio_lm.bench_pf`'s set-up and collection; the busy VF pair is
:func:`virtio_lm.bench.busy_host_pair`.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from virtio_lm.report.stats import fmt, size, spread

MIB = 1 << 20
GIB = 1 << 30

Tick = Callable[[], None]


@dataclass
class Section:
    id: str
    title: str
    question: str
    question_source: str
    answer: str = ""
    tables: list[dict[str, Any]] = field(default_factory=list)  # {"caption", "columns", "rows"}
    plots: list[str] = field(default_factory=list)  # PNG file names, drawn by render.py
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    command: str = ""

    def table(self, caption: str, columns: list[str], rows: list[list[Any]]) -> None:
        self.tables.append({"caption": caption, "columns": columns, "rows": [[str(c) for c in r] for r in rows]})


# the seed's review questions (shared/seed/virtio-live-migration-proposal.txt), quoted
Q_PROBLEM = ("All in all, I'm not quite sure where this is supposed to be going. What are the concrete problems "
             "that this dirty page tracking interface is supposed to solve?")
Q_LENGTHS = ("Do we need a way to specify the length of the data and result areas (i.e. a built-in variable "
             "length specification vs a per-command one?)")
Q_SLOW = ("How do different commands on a queue interact with each other? Say one buffer contains some kind of "
          "migration command, the next one a device-specific command that triggers a long-running action, and the "
          "next one another migration command. Is it acceptable for that long-running command to hold up the "
          "migration?")
REVIEW = "the review of the proposal on virtio-comment (seed, {lines})"

PLANS: dict[str, dict[str, dict[str, Any]]] = {
    "tracking": {
        "quick": dict(memory_mib=64, sweep_mib=16, rate=32.0, limit=300, mode="pull-bitmap", samples=3,
                      footprints=(64,), warmup_s=0.5),
        "full": dict(memory_mib=256, sweep_mib=64, rate=32.0, limit=300, mode="pull-bitmap", samples=3,
                     footprints=(16, 64, 256), warmup_s=1.0),
    },
    "modes": {
        "quick": dict(sizes=(64 * MIB, 256 * MIB), densities=(0.01, 1.0), samples=3),
        "full": dict(sizes=(256 * MIB, GIB, 4 * GIB), densities=(0.001, 0.01, 0.1, 1.0), samples=3),
    },
    "portions": {
        "quick": dict(state_portions=(256, 4096, 65536), report_portions=(4096, 65536), guest=256 * MIB, samples=3),
        "full": dict(state_portions=(256, 1024, 4096, 16384, 65536), report_portions=(4096, 16384, 65536, 262144),
                     guest=GIB, samples=5),
    },
    "slow-commands": {
        "quick": dict(delays_ms=(10, 50), samples=3),
        "full": dict(delays_ms=(10, 50, 200), samples=3),
    },
    "downtime": {
        "quick": dict(limits=(100,), modes=("pull-bitmap",), rates=(32.0,), runs=3, memory_mib=64, sweep_mib=16,
                      warmup_s=0.5),
        "full": dict(limits=(30, 100, 300), modes=("push-bitmap", "pull-bitmap"), rates=(32.0,), runs=3,
                     memory_mib=256, sweep_mib=64, warmup_s=1.0),
    },
    "profiles": {"quick": {}, "full": {}},
}


def samples_planned(section: str, plan: dict[str, Any]) -> int:
    """How many ticks a section will make (the progress bar's total)."""
    if section == "tracking":
        return plan["samples"] * (2 + len(plan["footprints"]))
    if section == "modes":
        return len(plan["sizes"]) * len(plan["densities"]) * 4 * plan["samples"]
    if section == "portions":
        return plan["samples"] * 2 * (len(plan["state_portions"]) + len(plan["report_portions"]))
    if section == "slow-commands":
        return plan["samples"] * (1 + 2 * len(plan["delays_ms"]))
    if section == "downtime":
        return len(plan["limits"]) * len(plan["modes"]) * len(plan["rates"]) * plan["runs"]
    return 1


# ====================================================================== 1. tracking
def measure_tracking(plan: dict[str, Any], tick: Tick) -> Section:
    from virtio_lm import bench_downtime as bd
    from virtio_lm.vm.machine import VF_DMA_AREA, dma_window

    sec = Section("tracking", "What device dirty tracking buys", Q_PROBLEM, REVIEW.format(lines="lines 547-549"))
    # the rest of memory holds random data written at boot (verified after): a window's pages are real
    # pages to send, as in a guest that has been running a while, not zero pages sent as a header only
    fill = plan["memory_mib"] - 16 - plan["sweep_mib"]
    m = bd.Matrix(memory_mib=plan["memory_mib"], sweep_mib=plan["sweep_mib"], fill_mib=fill, warmup_s=plan["warmup_s"])
    mem = plan["memory_mib"] * MIB
    variants: list[tuple[str, str, dict[str, Any], float | None]] = [
        ("tracked", "device dirty tracking", {}, None),
        ("untracked", "no device tracking (negative control)", {"x-device-tracking": False}, None),
    ]
    for fp in plan["footprints"]:
        lo, hi = dma_window(mem, fp)
        variants.append((f"window-{fp}", f"DMA window {(hi - lo) / MIB:.0f} MiB taken as dirty at switch-over",
                         {"x-device-tracking": False, "x-dma-footprint-mib": fp}, (hi - lo) / MIB))
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key, *_ in variants}
    for i in range(plan["samples"]):  # run-major: the machine's noise spreads over the variants
        for key, _, params, _w in variants:
            work = Path(tempfile.mkdtemp(prefix="virtio-lm-report-"))
            try:
                r = bd.one_run(work, plan["limit"], plan["mode"], plan["rate"], m, seed=i + 1, params=params)
            except Exception as exc:  # noqa: BLE001 - a run that could not run is recorded as such
                r = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
            finally:
                shutil.rmtree(work, ignore_errors=True)
            runs[key].append(r)
            tick()
    rows, summary = [], {}
    for key, label, _params, window in variants:
        rs = runs[key]
        done = [r for r in rs if r.get("status") == "completed"]
        verified = sum(1 for r in done if r.get("verified"))
        dt = spread(r["downtime"] for r in done)
        checks = sorted({c for r in done for c in (r.get("verify-problems") or {})})
        per_check = {c: {"listed": spread(len((r.get("verify-problems") or {}).get(c, [])) for r in done),
                         "failed-runs": sum(1 for r in done if c in (r.get("verify-problems") or {})),
                         "example": next((r["verify-problems"][c][0] for r in done
                                          if (r.get("verify-problems") or {}).get(c)), "")} for c in checks}
        summary[key] = {"label": label, "window-mib": window, "runs": len(rs), "completed": len(done),
                        "verified": verified, "downtime": dt, "total": spread(r["total"] for r in done),
                        "transferred": spread(r["transferred"] / MIB for r in done if r.get("transferred")),
                        "failed-checks": checks, "problems": per_check}
        found = "; ".join(f"{c} failed in {p['failed-runs']}/{len(done)} runs, {fmt(p['listed'], 0)} problems listed, "
                          f"e.g. \"{p['example']}\"" for c, p in per_check.items())
        rows.append([label, f"{len(done)}/{len(rs)}", f"{verified}/{len(done)}", fmt(dt), fmt(summary[key]["total"], 0),
                     fmt(summary[key]["transferred"], 1),
                     "nothing lost" if done and verified == len(done) else (found or "-")])
    sec.table(f"The demo's VM ({plan['memory_mib']} MiB, blk + net VFs under verifying load, the vCPU sweeping "
              f"{plan['sweep_mib']} MiB at {plan['rate']:.0f} MB/s, {fill} MiB of random data written at boot), "
              f"{plan['mode']}, downtime-limit {plan['limit']} ms; "
              "every run a first migration on a fresh pair of host processes; the destination guest verifies",
              ["variant", "completed", "guest verified", "downtime ms", "total ms", "MiB sent",
               "what verification found (the guest lists at most 20 problems per check)"], rows)
    sec.data = {"plan": _jsonable(plan), "summary": summary, "runs": runs}
    t, u = summary["tracked"], summary["untracked"]
    windows = [(s["window-mib"], s["downtime"]) for k, s in summary.items() if k.startswith("window-") and s["downtime"].get("n")]
    parts = [
        f"With device tracking the guest verified after {t['verified']}/{t['completed']} migrations "
        f"(downtime median {_m(t['downtime'])} ms).",
        f"Without it (the negative control) the guest found device writes lost after {u['completed'] - u['verified']}"
        f"/{u['completed']} migrations ({', '.join(u['failed-checks']) or 'no check failed'}): pre-copy re-sends "
        "only what the CPU dirtied, so a page a VF wrote by DMA after it was sent arrives stale.",
    ]
    if windows:
        w_ok = sum(summary[k]["verified"] for k in summary if k.startswith("window-"))
        w_n = sum(summary[k]["completed"] for k in summary if k.startswith("window-"))
        each = ", ".join(f"{_m(d)} ms for a {w:.0f} MiB window" for w, d in windows)
        parts.append(
            f"Treating every page the VFs may write as dirty at the switch-over also loses nothing ({w_ok}/{w_n} "
            f"verified), but the switch-over then sends the whole DMA window while the VM is stopped: downtime "
            f"median {each} (the VFs' own buffers and rings take {VF_DMA_AREA[1] / MIB:.1f} MiB; a window of all of "
            f"memory is a VF that may write anywhere in the guest), against {_m(t['downtime'])} ms with device tracking, which sends only the pages the "
            "VFs actually wrote, during pre-copy.")
    parts.append("Platform (IOMMU-style) dirty tracking belongs to the virtio-1.4 profile, which exists on the "
                 "device side only (memory/iommu.py, docs/profile-1.4.md): no host can migrate with it yet, so it is "
                 "not measured here.")
    sec.answer = " ".join(parts)
    sec.plots = ["tracking.png"]
    return sec


# ====================================================================== 2. modes
def measure_modes(plan: dict[str, Any], tick: Tick) -> Section:
    from virtio_lm.bench_pf import collection_cost, dirty_pattern, setup, teardown
    from virtio_lm.memory import Memory
    from virtio_lm.wire.ctrl import TrackMode

    sec = Section("modes", "Push vs pull, bitmap vs bytemap",
                  "Which dirty-page tracking mode should a device offer and a driver choose: push or pull, bitmap "
                  "or bytemap?", "a choice the proposal leaves to the device and the driver (no review question)")
    points: list[dict[str, Any]] = []
    for gsize in plan["sizes"]:
        with Memory(gsize, name="report-guest") as guest:
            host, drv = setup(guest)
            try:
                num_pages = gsize // 4096
                for density in plan["densities"]:
                    pages = dirty_pattern(num_pages, density, seed=7)
                    for mode in TrackMode:
                        got = collection_cost(drv, 1, mode, pages, plan["samples"], on_sample=tick)
                        expect = num_pages if pages is None else len(pages)
                        points.append({
                            "size": gsize, "density": density, "mode": mode.cli_name, "pages": num_pages,
                            "dirty": expect, "found-ok": all(g["found"] == expect for g in got),
                            "ms": spread(g["ms"] for g in got),
                            "cpu-ms-per-gib": spread(g["cpu-ms"] / (gsize / GIB) for g in got),
                            "commands": spread(g["commands"] for g in got),
                            "bytes": spread(g["bytes"] for g in got),
                            "map-bytes": spread(g["map-bytes"] for g in got),
                            "samples": got,
                        })
            finally:
                teardown(host, drv)
    rows = [[size(p["size"]), f"{p['density']:.1%}", p["mode"], fmt(p["ms"], 2), fmt(p["cpu-ms-per-gib"], 2),
             f"{p['commands']['median']:.0f}", size(p["bytes"]["median"]), size(p["map-bytes"]["median"]),
             "yes" if p["found-ok"] else "NO"] for p in points]
    sec.table("One collection per sample of a VF's dirty pages, through the PF's control queue (pull) or the map in "
              "host memory (push); pages marked dirty at random at the given density",
              ["guest", "dirty", "mode", "collection ms", "host CPU ms / GiB", "commands / round",
               "bytes to driver / round", "map memory", "all found"], rows)
    sec.data = {"plan": _jsonable(plan), "points": points}
    big = max(plan["sizes"])
    dense = [p for p in points if p["size"] == big and p["density"] == max(plan["densities"])]
    sparse = [p for p in points if p["size"] == big and p["density"] == min(plan["densities"])]

    def by(ps: list[dict[str, Any]], key: str) -> str:
        return ", ".join(f"{p['mode']} {p[key]['median']:.2f}" for p in ps)

    def by_bytes(ps: list[dict[str, Any]]) -> str:
        return ", ".join(f"{p['mode']} {size(p['bytes']['median'])}" for p in ps)

    pull_cmds = ", ".join(f"{p['mode']} {p['commands']['median']:.0f}" for p in dense if p["mode"].startswith("pull"))
    sec.answer = (
        f"At {size(big)} with {max(plan['densities']):.0%} of pages dirty, collection takes (median ms) {by(dense, 'ms')}; "
        f"host CPU per GiB tracked (ms) {by(dense, 'cpu-ms-per-gib')}. "
        f"At {min(plan['densities']):.1%} dirty: {by(sparse, 'ms')} ms. "
        "Push modes spend no control command: the driver reads and clears the whole map the PF writes into host "
        "memory, so their work is set by the map's size, not by the density. Pull modes spend "
        f"{pull_cmds} commands per round here (GET_DIRTY_REPORT_SIZE + REPORT_DIRTY_PAGES portions); the report is trimmed to the "
        "last dirty page, and the map's memory moves from the host to the device. A bitmap moves an eighth of a "
        f"bytemap's bytes per round ({by_bytes(dense)})."
    )
    sec.notes.append("Pages are marked dirty through the VF's tracker, as a DMA write marks them after its bytes "
                     "land, without writing the bytes (a 4 GiB guest is never touched). Host CPU is the collecting "
                     "thread's CPU time: in pull modes the device's work runs on the PF's own thread and is not "
                     "counted as host CPU. Pull map memory is what the model's device holds (a byte per page up "
                     "to the highest page marked, in both pull modes).")
    sec.plots = ["modes.png"]
    return sec


# ====================================================================== 3. portions
HELD_REQUESTS, HELD_LEN = 64, 4096


def measure_portions(plan: dict[str, Any], tick: Tick) -> Section:
    from virtio_lm.bench import BUSY_QD, busy_host_pair, wait_blk_in_flight
    from virtio_lm.bench_pf import collection_cost, setup, teardown
    from virtio_lm.memory import Memory
    from virtio_lm.wire.ctrl import TrackMode, VfState

    sec = Section("portions", "Portions: SAVE_STATE / RESTORE_STATE and REPORT_DIRTY_PAGES against portion size",
                  Q_LENGTHS, REVIEW.format(lines="lines 167-168"))
    state: list[dict[str, Any]] = []
    applied: list[str] = []
    # a VF whose image is large: completions of 64 requests of 4 KiB held while QUIESCED
    with _held_completions_pair() as (src, src_vf, dst, dst_vf, held):
        state += _portion_samples(f"DMA-test VF, {held} completions of {size(HELD_LEN)} held", src, src_vf, dst,
                                  dst_vf, plan, tick)
        applied.append(_apply(dst, dst_vf))
    # the busy virtio-blk VF of the switch-over bench: its image is small (completions go to the guest at once)
    work = Path(tempfile.mkdtemp(prefix="virtio-lm-report-"))
    try:
        with busy_host_pair(work / "disk.img") as (a, b):
            svm, dvm = a.slots["vm0"].vm, b.slots["vm0"].vm
            in_flight = wait_blk_in_flight(svm, BUSY_QD)
            svm.pause()  # the vCPU and the guest drivers stop; the devices still hold their requests
            vf, dvf = svm.vf_numbers["blk"], dvm.vf_numbers["blk"]
            a.pf_driver.set_state(vf, VfState.QUIESCED)
            a.pf_driver.set_state(vf, VfState.FREEZED)
            b.pf_driver.set_state(dvf, VfState.FREEZED)
            state += _portion_samples(f"virtio-blk VF, {in_flight} requests in flight at the pause", a.pf_driver, vf,
                                      b.pf_driver, dvf, plan, tick)
            applied.append(_apply(b.pf_driver, dvf))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report: list[dict[str, Any]] = []
    with Memory(plan["guest"], name="report-guest") as guest:
        host, drv = setup(guest)
        try:
            for mode in (TrackMode.PULL_BITMAP, TrackMode.PULL_BYTEMAP):
                for portion in plan["report_portions"]:
                    drv.report_portion = portion
                    got = collection_cost(drv, 1, mode, None, plan["samples"], on_sample=tick)
                    report.append({"mode": mode.cli_name, "portion": portion, "ms": spread(g["ms"] for g in got),
                                   "commands": spread(g["commands"] for g in got),
                                   "report-bytes": got[-1]["bytes"]})
        finally:
            teardown(host, drv)
    sec.table("SAVE_STATE (after GET_STATE_ATTRS) on the source PF and RESTORE_STATE on another PF, the whole "
              "image in portions of the given size",
              ["VF image", "portion", "SAVE commands", "save ms", "RESTORE commands", "restore ms"],
              [[f"{s['image']} ({size(s['image-bytes'])})", size(s["portion"]), f"{s['save-commands']['median']:.0f}",
                fmt(s["save-ms"], 2), s["restore-commands"], fmt(s["restore-ms"], 2)] for s in state])
    sec.table(f"GET_DIRTY_REPORT_SIZE + REPORT_DIRTY_PAGES of a {size(plan['guest'])} guest with every page dirty, "
              "by portion", ["mode", "report", "portion", "commands", "collection ms"],
              [[r["mode"], size(r["report-bytes"]), size(r["portion"]), f"{r['commands']['median']:.0f}",
                fmt(r["ms"], 2)] for r in report])
    sec.data = {"plan": _jsonable(plan), "state": state, "report": report, "applied": applied}
    big = [s for s in state if s is state[0] or s["image"] == state[0]["image"]]
    small = [s for s in state if s["image"] != state[0]["image"]]
    s0, s1 = big[0], big[-1]
    bm = [r for r in report if r["mode"] == "pull-bytemap"]
    sec.answer = (
        "Lengths are implicit in the descriptors (decisions.md): a portion is as long as the driver's buffer, and "
        f"the cost is per command. A {size(s0['image-bytes'])} image takes {s0['save-commands']['median']:.0f} "
        f"commands and {_m(s0['save-ms'], 1)} ms to save in {size(s0['portion'])} portions, "
        f"{s1['save-commands']['median']:.0f} commands and {_m(s1['save-ms'], 2)} ms in {size(s1['portion'])} "
        f"portions; restoring it {_m(s0['restore-ms'], 1)} ms vs {_m(s1['restore-ms'], 2)} ms. "
        + (f"A busy virtio-blk VF's image is {size(small[0]['image-bytes'])}: "
           f"{small[0]['save-commands']['median']:.0f} commands ({_m(small[0]['save-ms'], 2)} ms) to save in "
           f"{size(small[0]['portion'])} portions, {small[-1]['save-commands']['median']:.0f} "
           f"({_m(small[-1]['save-ms'], 2)} ms) in {size(small[-1]['portion'])} portions. " if small else "")
        + (f"A {size(bm[0]['report-bytes'])} bytemap dirty report takes {_m(bm[0]['ms'], 2)} ms in "
           f"{size(bm[0]['portion'])} portions and {_m(bm[-1]['ms'], 2)} ms in {size(bm[-1]['portion'])} portions. "
           if bm else "")
        + f"A command costs about {s0['save-ms']['median'] / max(s0['save-commands']['median'], 1):.2f} ms here "
        f"(the {size(s0['portion'])} save: {_m(s0['save-ms'], 1)} ms / {s0['save-commands']['median']:.0f} "
        "commands), so the time follows the number of portions. "
        + _sentence("; ".join(sorted(set(applied)))) + "."
    )
    sec.plots = ["portions.png"]
    return sec


def _portion_samples(label: str, src: Any, vf: int, dst: Any, dvf: int, plan: dict[str, Any],
                     tick: Tick) -> list[dict[str, Any]]:
    """Save VF ``vf``'s image (FREEZED on ``src``) and restore it into ``dvf`` (FREEZED on ``dst``)
    in each portion size, ``plan['samples']`` times."""
    out = []
    for portion in plan["state_portions"]:
        save, restore, cmds = [], [], []
        image = b""
        for _ in range(plan["samples"]):
            c0 = src.stats.commands
            t0 = time.perf_counter()
            image = src.save_image(vf, portion)
            save.append((time.perf_counter() - t0) * 1e3)
            cmds.append(src.stats.commands - c0)
            t0 = time.perf_counter()
            dst.restore_image(dvf, image, portion)
            restore.append((time.perf_counter() - t0) * 1e3)
            tick()
        out.append({"image": label, "portion": portion, "image-bytes": len(image), "save-ms": spread(save),
                    "restore-ms": spread(restore), "save-commands": spread(cmds),
                    "restore-commands": -(-len(image) // portion)})
    return out


def _apply(drv: Any, vf: int) -> str:
    """Leave FREEZED on the destination: the device validates and applies the image restored."""
    from virtio_lm.wire.ctrl import VfState

    try:
        drv.set_state(vf, VfState.QUIESCED)
        return "the destination VFs validated and applied the images restored"
    except Exception as exc:  # noqa: BLE001 - recorded in the report
        return f"a destination VF REFUSED its image: {exc}"


@contextlib.contextmanager
def _held_completions_pair() -> Iterator[tuple[Any, int, Any, int, int]]:
    """A DMA-test VF on a PF, FREEZED with :data:`HELD_REQUESTS` completions of :data:`HELD_LEN`
    bytes held (its driver's requests ran while it was QUIESCED); an INIT VF on another PF,
    FREEZED.  Yields (source driver, VF, destination driver, VF, chains the image holds)."""
    from virtio_lm.bench_pf import setup, teardown
    from virtio_lm.devices.dmatest import HEADER_SIZE, DmaTestDevice
    from virtio_lm.memory import Memory
    from virtio_lm.pci import PciDriverTransport
    from virtio_lm.virtqueue.device import Segment
    from virtio_lm.virtqueue.driver import Allocator
    from virtio_lm.wire.ctrl import VfState
    from virtio_lm.wire.dmatest import DmaTestOp, DmaTestReqHeader
    from virtio_lm.wire.features import Feature, bit

    mems = [Memory(8 * MIB, name="portions-src"), Memory(8 * MIB, name="portions-dst")]
    rigs = []
    try:
        rigs.append(setup(mems[0], device=lambda: DmaTestDevice(backend_threads=16)))
        rigs.append(setup(mems[1], device=DmaTestDevice))
        src, dst = rigs[0][1], rigs[1][1]
        fn = src.pf.vf(1)
        tr = PciDriverTransport(fn, mems[0].cpu, Allocator(0x1000, 0xFF000))
        (dq,) = tr.bring_up(bit(Feature.VERSION_1), 1, size=2 * HELD_REQUESTS)  # 2 descriptors a chain
        data = Allocator(0x100000, 7 * MIB)
        for seed in range(1, HELD_REQUESTS + 1):
            hdr, buf = data.alloc(HEADER_SIZE, 16), data.alloc(HELD_LEN + 1, 16)
            mems[0].cpu.write(hdr, DmaTestReqHeader(DmaTestOp.FILL, HELD_LEN, seed, 20_000).encode())
            dq.add([Segment(hdr, HEADER_SIZE)], [Segment(buf, HELD_LEN + 1)], token=seed)
        tr.kick(0)
        src.set_state(1, VfState.QUIESCED)  # the requests run on; their completions are held
        time.sleep(0.02 * (HELD_REQUESTS // 16 + 1) + 0.05)
        src.set_state(1, VfState.FREEZED)  # waits for what still runs
        held = int(fn.device.in_flight)
        dst.set_state(1, VfState.FREEZED)
        yield src, 1, dst, 1, held
    finally:
        for host, drv in rigs:
            teardown(host, drv)
        for m in mems:
            m.close()


# ====================================================================== 4. slow commands
def measure_slow_commands(plan: dict[str, Any], tick: Tick) -> Section:
    sec = Section("slow-commands", "Slow commands: GET_STATE_ATTRS behind a FREEZE that waits for back-end I/O",
                  Q_SLOW, REVIEW.format(lines="lines 236-241"))
    idle = _slow_rig(False, [0] * plan["samples"], tick, baseline=True)
    out: dict[str, Any] = {"baseline": spread(idle["get"])}
    rows = [["none (nothing queued)", "-", "-", fmt(out["baseline"], 3)]]
    for two in (False, True):
        key = "two-pfs" if two else "one-pf"
        res = []
        for d in plan["delays_ms"]:
            got = _slow_rig(two, [d] * plan["samples"], tick)
            res.append({"delay-ms": d, "get-ms": spread(got["get"]), "freeze-ms": spread(got["freeze"])})
            rows.append([f"{d} ms", "one PF (same control queue)" if not two else "two PFs",
                         fmt(res[-1]["freeze-ms"], 1), fmt(res[-1]["get-ms"], 3)])
        out[key] = res
    sec.table("A FREEZE of VF 1 while its back-end runs a request for the given time; GET_STATE_ATTRS of another VF "
              "issued 2 ms after the FREEZE, on the same PF or on a second PF",
              ["back-end I/O", "GET_STATE_ATTRS sent to", "FREEZE ms", "GET_STATE_ATTRS latency ms"], rows)
    sec.data = {"plan": _jsonable(plan), **out}
    last = plan["delays_ms"][-1]
    one = next(r for r in out["one-pf"] if r["delay-ms"] == last)
    two = next(r for r in out["two-pfs"] if r["delay-ms"] == last)
    sec.answer = (
        "Commands on one control queue run strictly in order, so a slow command holds up the ones behind it: with "
        f"{last} ms of back-end I/O in flight, FREEZE takes {_m(one['freeze-ms'])} ms and a GET_STATE_ATTRS for "
        f"another VF queued behind it waits {_m(one['get-ms'])} ms (alone: {_m(out['baseline'], 3)} ms). On a second "
        f"PF it takes {_m(two['get-ms'], 3)} ms. The data path is never held (the PF processes its control queue on a "
        "thread of its own); a driver that needs a fast command behind a slow one uses a second PF -- or, as the "
        "reviewer proposed and the standard later did, a separate queue."
    )
    sec.notes.append("The PF driver sends one command at a time (its lock), so the second command waits in the "
                     "driver rather than on the ring; the device would take it after the FREEZE either way.")
    sec.plots = ["slow-commands.png"]
    return sec


def _slow_rig(two_pfs: bool, delays_ms: list[int], tick: Tick, *, baseline: bool = False) -> dict[str, list[float]]:
    """Per delay: FREEZE VF 1 of PF A while its back-end runs a request of that delay; time a
    GET_STATE_ATTRS of VF 2 of PF A (or of VF 1 of PF B) sent 2 ms later."""
    from virtio_lm.bench_pf import setup, teardown
    from virtio_lm.devices.dmatest import HEADER_SIZE, DmaTestDevice
    from virtio_lm.memory import Memory
    from virtio_lm.pci import PciDriverTransport
    from virtio_lm.virtqueue.device import Segment
    from virtio_lm.virtqueue.driver import Allocator
    from virtio_lm.wire.ctrl import VfState
    from virtio_lm.wire.dmatest import DmaTestOp, DmaTestReqHeader
    from virtio_lm.wire.features import Feature, bit

    out: dict[str, list[float]] = {"get": [], "freeze": []}
    guest_a, guest_b = Memory(8 * MIB, name="slow-a"), Memory(4 * MIB, name="slow-b")
    rigs = []
    try:
        host_a, drv_a = setup(guest_a, num_vfs=1 if two_pfs else 2, device=DmaTestDevice)
        rigs.append((host_a, drv_a))
        if two_pfs:
            host_b, drv_b = setup(guest_b, num_vfs=1)
            rigs.append((host_b, drv_b))
            other, other_vf = drv_b, 1
        else:
            other, other_vf = drv_a, 2
        fn = drv_a.pf.vf(1)
        tr = PciDriverTransport(fn, guest_a.cpu, Allocator(0x1000, 0xFF000))
        (dq,) = tr.bring_up(bit(Feature.VERSION_1), 1, size=64)
        data = Allocator(0x100000, 7 * MIB)
        dev = fn.device
        other.get_state_attrs(other_vf)  # warm: the first command after bring-up is not the one measured
        for seed, delay in enumerate(delays_ms, start=1):
            if baseline:
                t0 = time.perf_counter()
                other.get_state_attrs(other_vf)
                out["get"].append((time.perf_counter() - t0) * 1e3)
                tick()
                continue
            hdr, buf = data.alloc(HEADER_SIZE, 16), data.alloc(4097, 16)
            guest_a.cpu.write(hdr, DmaTestReqHeader(DmaTestOp.FILL, 4096, seed, delay * 1000).encode())
            dq.add([Segment(hdr, HEADER_SIZE)], [Segment(buf, 4097)], token=seed)
            tr.kick(0)
            deadline = time.monotonic() + 5
            while dev.in_flight < 1 and time.monotonic() < deadline:
                time.sleep(0.0002)
            time.sleep(0.001)  # the back-end has taken the request
            drv_a.set_state(1, VfState.QUIESCED)
            freeze: list[float] = []

            def do_freeze() -> None:
                t = time.perf_counter()
                drv_a.set_state(1, VfState.FREEZED)
                freeze.append((time.perf_counter() - t) * 1e3)

            th = threading.Thread(target=do_freeze)
            th.start()
            time.sleep(0.002)  # the FREEZE is on its way first
            t0 = time.perf_counter()
            other.get_state_attrs(other_vf)
            out["get"].append((time.perf_counter() - t0) * 1e3)
            th.join()
            out["freeze"].extend(freeze)
            drv_a.set_state(1, VfState.QUIESCED)
            drv_a.set_state(1, VfState.RUNNING)  # the held completion is written now
            deadline = time.monotonic() + 5
            while not dq.get_all_used() and time.monotonic() < deadline:
                time.sleep(0.0005)
            data.free(hdr)
            data.free(buf)
            tick()
    finally:
        for host, drv in rigs:
            teardown(host, drv)
        guest_a.close()
        guest_b.close()
    return out


# ====================================================================== 5. downtime
def measure_downtime(plan: dict[str, Any], tick: Tick) -> Section:
    from virtio_lm import bench_downtime as bd

    sec = Section("downtime", "Downtime: measured vs limit, and where it goes",
                  "Is downtime-limit kept, and which switch-over phases does the downtime consist of?",
                  "the switch-over issue's matrix (virtio-lm bench downtime), reduced to fit the report's time")
    m = bd.Matrix(limits=tuple(plan["limits"]), modes=tuple(plan["modes"]), rates=tuple(plan["rates"]),
                  runs=plan["runs"], memory_mib=plan["memory_mib"], sweep_mib=plan["sweep_mib"],
                  warmup_s=plan["warmup_s"])
    cells = bd.run_matrix(m, progress=False, on_run=tick)
    summaries = [c.summary() for c in cells]
    rows = []
    for s in summaries:
        if "p50" not in s:
            rows.append([s["limit"], s["mode"], f"{s['rate']:.0f}", f"{s['within']}/{s['runs']}", s["gave-up"],
                         "-", "-", "-", "-"])
            continue
        rows.append([s["limit"], s["mode"], f"{s['rate']:.0f}", f"{s['within']}/{s['runs']}", s["gave-up"],
                     f"{s['p50']:.1f}", f"{s['max']:.1f}", f"{s['err-p50']:+.0%}", f"{s['total-p50']:.0f}"])
    sec.table(f"First migrations on fresh host processes: the demo's VM ({m.memory_mib} MiB, blk + net VFs, the vCPU "
              f"sweeping {m.sweep_mib} MiB), {m.runs} runs per cell",
              ["limit ms", "mode", "MB/s", "within", "gave up", "p50 ms", "max ms", "expected err p50",
               "total p50 ms"], rows)
    phases: dict[str, dict[str, float]] = {}
    for c in cells:
        done = [r for r in c.runs if r.get("status") == "completed" and r.get("phases")]
        if done:
            names = list(done[0]["phases"])
            phases[f"{c.limit} ms {c.mode} {c.rate:.0f}"] = {k: float(np.median([r["phases"].get(k, 0.0) for r in done]))
                                                             for k in names}
    sec.data = {"plan": _jsonable(plan), "summaries": summaries, "phases": phases,
                "runs": [r for c in cells for r in c.runs], "cells": [(c.limit, c.mode, c.rate) for c in cells]}
    by_limit = []
    for limit in plan["limits"]:
        ss = [s for s in summaries if s["limit"] == limit]
        within = sum(s["within"] for s in ss)
        n = sum(s["runs"] for s in ss)
        p50 = spread(s.get("p50") for s in ss if "p50" in s)
        by_limit.append(f"{within}/{n} within {limit} ms (cell p50s median {_m(p50)} ms)")
    biggest = {}
    for name, ph in phases.items():
        k = max(ph, key=ph.get)  # type: ignore[arg-type]
        biggest[k] = biggest.get(k, 0) + 1
    top = max(biggest, key=biggest.get) if biggest else "-"  # type: ignore[arg-type]
    sec.answer = (f"{'; '.join(by_limit)}. The largest phase (median per cell) is '{top}' in "
                  f"{biggest.get(top, 0)}/{len(phases)} cells. These runs share the machine with whatever else "
                  "runs on it (the load is in the header); docs/evidence/README.md has the full matrix (10 runs "
                  "per cell) measured on the quiet machine, its repeat, and the same under stress-ng.")
    sec.plots = ["downtime.png", "downtime-phases.png"]
    sec.data["_cells"] = cells  # for the plot; dropped before JSON
    return sec


# ====================================================================== 6. seed vs 1.4
def measure_profiles(plan: dict[str, Any], tick: Tick) -> Section:
    sec = Section("profiles", "Seed vs virtio 1.4", "How does the seed's interface compare with the virtio-1.4 "
                  "profile (admin virtqueue, device parts, platform dirty tracking)?", "the issue")
    sec.answer = ("Both profiles migrate the same VM through one host-side VFIO-style state machine "
                  "(drivers/vfio.py; `virtio-lm demo --profile virtio-1.4`).  The side-by-side measurement is "
                  "`virtio-lm bench profiles` (fresh host pairs per run, JSON + PNG); docs/decisions.md (\"The "
                  "proposal vs virtio 1.4\") has its table point by point.  This report does not re-run it: "
                  "not measured here.")
    tick()
    return sec


MEASURE: dict[str, Callable[[dict[str, Any], Tick], Section]] = {
    "tracking": measure_tracking,
    "modes": measure_modes,
    "portions": measure_portions,
    "slow-commands": measure_slow_commands,
    "downtime": measure_downtime,
    "profiles": measure_profiles,
}


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _m(s: dict[str, Any], digits: int = 1) -> str:
    return f"{s['median']:.{digits}f}" if s.get("n") else "-"


def _jsonable(plan: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in plan.items()}
