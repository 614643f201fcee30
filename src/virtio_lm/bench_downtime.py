"""``virtio-lm bench downtime``: is downtime-limit kept?  A matrix of first migrations.

Per cell (downtime limit x tracking mode x vCPU dirty rate) ``runs`` migrations,
each on a **fresh pair of host processes** (``virtio-lm host``, the demo's VM:
blk + net VFs under load, the vCPU sweeping ``sweep_mib`` at the cell's rate),
so every run is its hosts' first migration: the estimate has only the hosts'
start-up calibration, nothing learned.  Per cell it prints the fraction of runs
within the limit (a clean give-up -- the limit below the fixed cost -- is
counted apart), p50 / p95 / max downtime, the expected-downtime error at p50 and
p95 of ``|expected - measured| / measured`` (signed at p50), and the median total
time; it writes every run and the table as JSON and a PNG (measured vs limit,
one marker per run, the y = x line).

Downtime is the source's: from the pause to the destination's RUNNING
(``downtime`` of query-migrate, from the phases).  ``--vs-qemu`` adds QEMU 7.2
(TCG) on the same work in the same run (:mod:`virtio_lm.qemu_baseline`).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

MODES = ("push-bitmap", "push-bytemap", "pull-bitmap", "pull-bytemap")


@dataclass
class Matrix:
    limits: tuple[int, ...] = (30, 100, 300)
    modes: tuple[str, ...] = MODES
    rates: tuple[float, ...] = (32.0, 128.0)
    runs: int = 10
    memory_mib: int = 256
    sweep_mib: int = 64
    fill_mib: int = 0
    warmup_s: float = 1.0
    label: str = ""
    profile: str = "seed"  # both hosts' PF profile (virtio-lm host --profile)

    @classmethod
    def quick(cls) -> "Matrix":
        return cls(limits=(100,), modes=("push-bitmap", "pull-bitmap"), rates=(32.0,), runs=2, memory_mib=128)


@dataclass
class Cell:
    limit: int
    mode: str
    rate: float
    runs: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        done = [r for r in self.runs if r["status"] == "completed"]
        gave_up = [r for r in self.runs if r["status"] == "failed" and "fixed cost" in r.get("error", "")]
        failed = len(self.runs) - len(done) - len(gave_up)
        d = np.array([r["downtime"] for r in done]) if done else np.zeros(0)
        err = np.array([(r["expected"] - r["downtime"]) / r["downtime"] for r in done if r["downtime"] > 0])
        within = sum(1 for r in done if r["downtime"] <= self.limit)
        out: dict[str, Any] = {
            "limit": self.limit, "mode": self.mode, "rate": self.rate, "runs": len(self.runs),
            "within": within, "gave-up": len(gave_up), "failed": failed,
            "within-fraction": within / len(self.runs) if self.runs else 0.0,
        }
        if len(d):
            out.update({
                "p50": float(np.percentile(d, 50)), "p95": float(np.percentile(d, 95)), "max": float(d.max()),
                "err-p50": float(np.percentile(err, 50)) if len(err) else math.nan,
                "abs-err-p95": float(np.percentile(np.abs(err), 95)) if len(err) else math.nan,
                "total-p50": float(np.median([r["total"] for r in done])),
                "overrun-phases": sorted({r["overrun-phase"] for r in done if r.get("overrun-phase")}),
            })
        return out


def one_run(work: Path, limit: int, mode: str, rate: float, m: Matrix, seed: int,
            params: dict[str, Any] | None = None, *, host_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """A fresh source and destination host (separate processes), one migration.

    ``params`` are more migrate-set-parameters for the source (e.g.
    ``x-device-tracking``), ``host_args`` more arguments of both ``virtio-lm host`` (e.g.
    ``--profile``); the run's record has what the destination guest's verification found
    (``verified``, ``verify-problems``, by check) and both sides' ``x-vf-migration``."""
    from virtio_lm.demo import cli_command, start_network, vm_spec_text
    from virtio_lm.orchestrate import ChildProcess, Monitor, run_migration, shut_down

    procs: list[ChildProcess] = []
    monitors: list[Monitor] = []
    try:
        net = start_network(work, procs)
        vm = vm_spec_text(m.memory_mib, net.image, rate, seed, fill_mib=m.fill_mib, sweep_mib=m.sweep_mib)
        mons = []
        for name, incoming in (("src", False), ("dst", True)):
            argv = ["host", "--name", name, "--qmp", f"unix:{work}/{name}.qmp", "--vm", vm, "--switch", net.switch]
            p = ChildProcess(name, cli_command(*argv, *(["--incoming"] if incoming else []), *host_args), work)
            procs.append(p)
            mons.append(Monitor(p.first_line().split()[-1]))
        monitors.extend(mons)
        src, dst = mons
        time.sleep(m.warmup_s)
        info = run_migration(src, dst, params={"downtime-limit": limit, "x-tracking-mode": mode, **(params or {})},
                             timeout=300)
        phases = info.get("downtime-phases") or {}
        out = {
            "limit": limit, "mode": mode, "rate": rate, "status": info.get("status"),
            "downtime": sum(phases.values()) if phases else float(info.get("downtime", 0)),
            "expected": float(info.get("expected-downtime", 0)),
            "total": float(info.get("total-time", 0)),
            "rounds": info.get("ram", {}).get("dirty-sync-count"),
            "mbps": info.get("ram", {}).get("mbps"),
            "transferred": info.get("ram", {}).get("transferred"),
            "normal": info.get("ram", {}).get("normal"),
            "fixed-estimate": info.get("x-switchover-cost-estimate"),
            "fixed-source": info.get("x-switchover-cost-source"),
            "overrun": info.get("downtime-overrun"), "overrun-phase": info.get("downtime-overrun-phase"),
            "phases": phases, "error": str(info.get("error-desc", "")),
            "vf-source": info.get("x-vf-migration"),
            "vf-destination": (info.get("destination") or {}).get("x-vf-migration"),
            "switchover-steps": info.get("x-switchover-steps"),
        }
        if out["status"] == "completed":
            ver = dst.cmd("x-vm-verify")
            out["verified"] = bool(ver.get("passed"))
            out["verify-problems"] = {name: list(c.get("problems", []))
                                      for name, c in (ver.get("checks") or {}).items() if not c.get("passed")}
        return out
    finally:
        shut_down(monitors, procs)


def run_matrix(m: Matrix, *, progress: bool = True, on_run: Callable[[], None] | None = None) -> list[Cell]:
    """Every run of ``m`` (run-major); ``on_run`` is called after each one (e.g. another progress bar)."""
    from rich.progress import Progress

    cells = [Cell(limit, mode, rate) for limit in m.limits for rate in m.rates for mode in m.modes]
    total = len(cells) * m.runs
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"downtime matrix{' ' + m.label if m.label else ''}", total=total)
        for i in range(m.runs):  # run-major: noise spreads over the cells
            for cell in cells:
                work = Path(tempfile.mkdtemp(prefix="virtio-lm-dt-"))
                try:
                    cell.runs.append(one_run(work, cell.limit, cell.mode, cell.rate, m, seed=i + 1,
                                             host_args=("--profile", m.profile)))
                except Exception as exc:  # noqa: BLE001 - a run that could not run is a failed run
                    cell.runs.append({"limit": cell.limit, "mode": cell.mode, "rate": cell.rate, "status": "error",
                                      "error": f"{type(exc).__name__}: {exc}"})
                finally:
                    shutil.rmtree(work, ignore_errors=True)
                bar.advance(task)
                if on_run is not None:
                    on_run()
    return cells


def print_table(cells: list[Cell], title: str) -> None:
    print(f"\n== {title}")
    hdr = (f"  {'limit':>5} {'mode':<13} {'MB/s':>5} {'within':>8} {'gave-up':>7} {'p50':>7} {'p95':>7} {'max':>7}"
           f" {'err p50':>8} {'|err| p95':>9} {'total':>7}  overrun phases")
    print(hdr)
    for c in cells:
        s = c.summary()
        if "p50" not in s:
            print(f"  {s['limit']:>5} {s['mode']:<13} {s['rate']:>5.0f} {s['within']:>3}/{s['runs']:<4} "
                  f"{s['gave-up']:>7}  (no completed run: {c.runs[-1].get('error', '')[:80]})")
            continue
        print(f"  {s['limit']:>5} {s['mode']:<13} {s['rate']:>5.0f} {s['within']:>3}/{s['runs']:<4} {s['gave-up']:>7}"
              f" {s['p50']:>7.1f} {s['p95']:>7.1f} {s['max']:>7.1f} {s['err-p50']:>+8.0%} {s['abs-err-p95']:>9.0%}"
              f" {s['total-p50']:>7.0f}  {','.join(s['overrun-phases'])}")


def plot(cells: list[Cell], path: Path, title: str, *, dpi: int = 110) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    markers = dict(zip(MODES, "o^sD"))
    colors = {32.0: "tab:blue", 128.0: "tab:red"}
    rng = np.random.default_rng(0)
    for c in cells:
        done = [r for r in c.runs if r["status"] == "completed"]
        if not done:
            continue
        x = c.limit * (1 + 0.06 * rng.standard_normal(len(done)))
        ax.scatter(x, [r["downtime"] for r in done], marker=markers.get(c.mode, "o"),
                   color=colors.get(c.rate, "tab:gray"), alpha=0.6, s=18,
                   label=f"{c.mode}, {c.rate:.0f} MB/s")
    lo, hi = min(cl.limit for cl in cells) / 2, max(cl.limit for cl in cells) * 1.5
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x (the limit)")
    ax.set_xlim(lo, hi)
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_xticks(sorted({cl.limit for cl in cells}))
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("downtime-limit (ms)")
    ax.set_ylabel("measured downtime (ms)")
    ax.set_title(title)
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    # beside the axes, not over them: the worst runs sit top left (a small limit, a long downtime)
    ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def replot(json_path: Path, png_path: Path, title: str) -> None:
    """Draw a matrix's plot again from its JSON (what :func:`run` wrote)."""
    doc = json.loads(Path(json_path).read_text())
    cells: dict[tuple[int, str, float], Cell] = {}
    for r in doc["runs"]:
        key = (int(r["limit"]), str(r["mode"]), float(r["rate"]))
        cells.setdefault(key, Cell(*key)).runs.append(r)
    plot(list(cells.values()), png_path, title)


def run(m: Matrix, out_dir: Path, *, title: str = "virtio-lm downtime vs limit (first migrations)") -> list[Cell]:
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    cells = run_matrix(m)
    print_table(cells, f"{title}{' — ' + m.label if m.label else ''} ({m.memory_mib} MiB VM, sweep {m.sweep_mib} MiB, "
                       f"{m.runs} runs/cell, {time.monotonic() - t0:.0f} s)")
    stem = "downtime" + (f"-{m.label}" if m.label else "")
    (out_dir / f"{stem}.json").write_text(json.dumps(
        {"matrix": m.__dict__, "cells": [c.summary() for c in cells], "runs": [r for c in cells for r in c.runs]},
        indent=1, default=str))
    plot(cells, out_dir / f"{stem}.png", title + (f" — {m.label}" if m.label else ""))
    print(f"  wrote {out_dir / (stem + '.json')} and {out_dir / (stem + '.png')}")
    return cells


# ---------------------------------------------------------------------- against QEMU 7.2, same work
SCENARIOS = (  # name, guest random fill MiB, vCPU rate MB/s, limit ms
    ("idle", 0, 0.0, 300),
    ("random fill", 160, 0.0, 300),  # 160 MiB: what QEMU's 256 MiB guest can still allocate
    ("32 MB/s", 0, 32.0, 100),
    ("128 MB/s", 0, 128.0, 100),
)


def _median(rs: list[dict[str, Any]], key: str) -> float:
    vals = [r[key] for r in rs if r.get(key) is not None]
    return float(np.median(vals)) if vals else math.nan


def run_vs_qemu(m: Matrix, out_dir: Path, *, runs: int | None = None) -> int:
    """Each scenario ``runs`` times on QEMU and on virtio-lm (fresh hosts each run); ratios of medians.

    The same non-zero pages: QEMU's Linux guest carries its kernel and page cache (~80 MiB
    that every QEMU migration sends as normal pages), so virtio-lm's VM gets a random fill
    that makes its normal pages match QEMU's median of the same scenario (as far as its
    memory map allows: 256 MiB less 16 MiB of fixed areas and the sweep region).  Throughput
    is bytes transferred / total-time on both sides."""
    from virtio_lm.qemu_baseline import QemuBaseline, QemuBaselineError, QemuUnavailable
    from virtio_lm.vm.machine import SWEEP_START

    n = runs or max(1, min(m.runs, 3))
    rows: list[dict[str, Any]] = []
    try:
        prepared = QemuBaseline().__enter__()  # QEMU, the kernel, busybox and gcc are looked for here
    except QemuUnavailable as exc:
        print(f"\n== vs QEMU: skipped ({exc})")
        return 1
    max_fill = m.memory_mib - SWEEP_START // (1 << 20) - m.sweep_mib
    with contextlib.closing(prepared) as qb:
        for name, fill, rate, limit in SCENARIOS:
            theirs: list[dict[str, Any]] = []
            for _ in range(n):
                try:
                    r = qb.run(memory_mib=m.memory_mib, fill_mib=fill, sweep_mib=m.sweep_mib,
                               dirty_rate_mbps=rate, downtime_limit_ms=limit, max_bandwidth=1 << 30)
                except QemuBaselineError as exc:
                    r = {"status": "error", "error": str(exc)[:500]}
                theirs.append(r)
            ok_q = [r for r in theirs if r.get("status") == "completed"]
            q_normal_mib = _median(ok_q, "normal_pages") * 4096 / (1 << 20) if ok_q else fill
            # our VM's own non-zero pages besides the fill and the sweep: a few MiB of fixed areas
            ours_fill = int(min(max_fill, max(0.0, q_normal_mib - (m.sweep_mib if rate else 0) - 4)))
            mm = Matrix(memory_mib=m.memory_mib, sweep_mib=m.sweep_mib, fill_mib=ours_fill, warmup_s=m.warmup_s)
            ours: list[dict[str, Any]] = []
            for i in range(n):
                work = Path(tempfile.mkdtemp(prefix="virtio-lm-vq-"))
                try:
                    ours.append(one_run(work, limit, "push-bitmap", rate, mm, seed=i + 1))
                except Exception as exc:  # noqa: BLE001 - a run that could not run
                    ours.append({"status": "error", "error": f"{type(exc).__name__}: {exc}"})
                finally:
                    shutil.rmtree(work, ignore_errors=True)
            ok_o = [r for r in ours if r["status"] == "completed"]
            for r in ok_o:
                r["MiBps"] = r["transferred"] / (1 << 20) / (r["total"] / 1000) if r["total"] else math.nan
            row = {
                "scenario": name, "limit": limit, "runs": n, "ours-fill-mib": ours_fill, "qemu-fill-mib": fill,
                "ours": {"downtime": _median(ok_o, "downtime"), "total": _median(ok_o, "total"),
                         "MiBps": _median(ok_o, "MiBps"), "normal": _median(ok_o, "normal"),
                         "completed": len(ok_o)},
                "qemu": {"downtime": _median(ok_q, "downtime_ms"), "total": _median(ok_q, "total_time_ms"),
                         "MiBps": _median(ok_q, "throughput_MiBps"), "normal": _median(ok_q, "normal_pages"),
                         "completed": len(ok_q)},
                "verified": all(r.get("verified") for r in ok_o) and all(r.get("guest_verify") == "ok" for r in ok_q),
                "ours-runs": ours, "qemu-runs": theirs,
            }
            rows.append(row)
    print(f"\n== virtio-lm vs QEMU 7.2 (TCG), same work: {m.memory_mib} MiB, sweep {m.sweep_mib} MiB, "
          f"max-bandwidth 1 GiB/s, median of {n}; downtime = pause -> running on the destination")
    print(f"  {'scenario':<12} {'limit':>5} {'normal pages':>15} {'downtime ms':>15} {'ratio':>6} {'total ms':>13}"
          f" {'ratio':>6} {'MiB/s':>11} {'ratio':>6}  verified")
    for r in rows:
        o, q = r["ours"], r["qemu"]
        print(f"  {r['scenario']:<12} {r['limit']:>5} {o['normal']:>7.0f}/{q['normal']:<7.0f} "
              f"{o['downtime']:>7.1f}/{q['downtime']:<7.1f} {o['downtime'] / q['downtime']:>6.2f} "
              f"{o['total']:>6.0f}/{q['total']:<6.0f} {o['total'] / q['total']:>6.2f} "
              f"{o['MiBps']:>5.0f}/{q['MiBps']:<5.0f} {o['MiBps'] / q['MiBps']:>6.2f}  {r['verified']}"
              + (f"  (completed {o['completed']}/{n} vs {q['completed']}/{n})" if o["completed"] < n or q["completed"] < n else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "downtime-vs-qemu.json").write_text(json.dumps(rows, indent=1, default=str))
    print(f"  wrote {out_dir / 'downtime-vs-qemu.json'}")
    return 0
