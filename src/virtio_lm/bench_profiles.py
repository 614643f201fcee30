"""``virtio-lm bench profiles``: the 2021 proposal (seed) beside virtio 1.4, same VM, same work.

Per run, for each profile in turn (run-major, so machine noise spreads over
both), a **fresh pair of host processes** started with ``--profile`` and the
demo's VM (blk + net VFs under load, the vCPU sweeping ``sweep_mib`` at
``rate`` MB/s), one migration, then the destination guest verifies itself.
From each run's query-migrate (source and destination):

* downtime (pause -> RUNNING on the destination) and its phases, total time;
* bytes of device state: the images the source saved at STOP_COPY, and what
  the 1.4 back-end read during PRE_COPY;
* control commands issued and their wall time, per VF step (``x-vf-migration``
  of both sides), split into those inside the downtime (source: quiesce, save;
  destination: restore, run) and those outside it (pre-copy, tracking, dirty
  collection, the destination's RESUMING set-up);
* dirty collection's cost per GiB of guest memory covered: the time the VF
  step ``collect-dirty`` took over the pages its bitmaps / reports covered
  (seed: the device's report or push map through the control queue; 1.4: the
  IOMMU's read-and-clear bitmap, no device command).

It prints medians and spread per profile and the ratio virtio-1.4 / seed of
the medians, and writes OUT/profiles.json (every run) and OUT/profiles.png.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PROFILES = ("seed", "virtio-1.4")
IN_DOWNTIME = {"source": ("quiesce", "save"), "destination": ("restore", "run")}
GIB = 1 << 30


@dataclass
class Plan:
    runs: int = 5
    memory_mib: int = 256
    sweep_mib: int = 64
    rate: float = 32.0
    limit: int = 300
    mode: str = "pull-bitmap"  # the seed's device tracking mode (1.4 has the platform's)
    warmup_s: float = 1.0

    @classmethod
    def quick(cls) -> "Plan":
        return cls(runs=2, memory_mib=128)


def _calls(vf: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    return dict((vf or {}).get("calls") or {})


def run_record(r: dict[str, Any]) -> dict[str, Any]:
    """The figures of one run (from bench_downtime.one_run's record)."""
    src, dst = _calls(r.get("vf-source")), _calls(r.get("vf-destination"))
    sides = {"source": src, "destination": dst}
    inside = {k: sum(sides[s].get(n, {}).get(k, 0) for s, names in IN_DOWNTIME.items() for n in names)
              for k in ("commands", "ms")}
    everything = {k: sum(v.get(k, 0) for side in sides.values() for v in side.values()) for k in ("commands", "ms")}
    dirty = (r.get("vf-source") or {}).get("dirty") or {}
    covered = dirty.get("pages-scanned", 0) * 4096 / GIB
    collect = src.get("collect-dirty", {})
    return {
        "downtime": r.get("downtime"), "total": r.get("total"), "phases": r.get("phases") or {},
        "image-bytes": (r.get("vf-source") or {}).get("image-bytes", 0),
        "pre-copy-bytes": (r.get("vf-source") or {}).get("pre-copy-bytes", 0),
        "commands-in-downtime": inside["commands"], "commands-in-downtime-ms": inside["ms"],
        "commands": everything["commands"], "commands-ms": everything["ms"],
        "calls": {"source": src, "destination": dst},
        "dirty-collections": dirty.get("collections", 0), "dirty-commands": collect.get("commands", 0),
        "dirty-ms-per-gib": collect.get("ms", 0.0) / covered if covered else math.nan,
        "verified": r.get("verified"),
    }


def _stat(xs: list[float]) -> dict[str, float]:
    a = np.array([x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))], dtype=float)
    if not len(a):
        return {"n": 0}
    return {"n": int(len(a)), "median": float(np.median(a)), "min": float(a.min()), "max": float(a.max()),
            "p25": float(np.percentile(a, 25)), "p75": float(np.percentile(a, 75))}


METRICS = (  # key, label, unit
    ("downtime", "downtime", "ms"),
    ("total", "total time", "ms"),
    ("image-bytes", "device state saved (STOP_COPY)", "B"),
    ("pre-copy-bytes", "device data read in PRE_COPY", "B"),
    ("commands-in-downtime", "control commands in the downtime", ""),
    ("commands-in-downtime-ms", "  their wall time", "ms"),
    ("commands", "control commands, whole migration", ""),
    ("commands-ms", "  their wall time", "ms"),
    ("dirty-commands", "dirty collection: control commands", ""),
    ("dirty-ms-per-gib", "dirty collection: ms per GiB covered", "ms"),
)


def summarize(records: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for prof, rs in records.items():
        ok = [r for r in rs if r.get("status") == "completed"]
        figs = [run_record(r) for r in ok]
        s: dict[str, Any] = {"runs": len(rs), "completed": len(ok), "verified": sum(1 for f in figs if f["verified"])}
        for key, _, _ in METRICS:
            s[key] = _stat([f[key] for f in figs])
        phases = sorted({p for f in figs for p in f["phases"]})
        s["phases"] = {p: _stat([f["phases"].get(p, 0.0) for f in figs]) for p in phases}
        steps = sorted({(side, n) for f in figs for side in ("source", "destination") for n in f["calls"][side]})
        s["steps"] = {f"{side}:{n}": {"commands": _stat([f["calls"][side].get(n, {}).get("commands", 0) for f in figs]),
                                      "ms": _stat([f["calls"][side].get(n, {}).get("ms", 0.0) for f in figs])}
                      for side, n in steps}
        out[prof] = s
    return out


def _fmt(st: dict[str, float], unit: str) -> str:
    if not st.get("n"):
        return "-"
    if unit == "B":
        return f"{st['median']:.0f} ({st['min']:.0f}..{st['max']:.0f})"
    return f"{st['median']:.2f} ({st['min']:.2f}..{st['max']:.2f})" if unit else \
        f"{st['median']:.0f} ({st['min']:.0f}..{st['max']:.0f})"


def print_table(summary: dict[str, Any], plan: Plan, seconds: float) -> list[str]:
    lines = [f"\n== profiles: the proposal (seed) vs virtio 1.4, same VM and work ({plan.memory_mib} MiB, sweep "
             f"{plan.sweep_mib} MiB at {plan.rate:.0f} MB/s, blk + net VFs, downtime-limit {plan.limit} ms, seed "
             f"tracking {plan.mode}; {plan.runs} runs each on fresh host pairs, {seconds:.0f} s)",
             "   median (min..max)"]
    a, b = summary["seed"], summary["virtio-1.4"]
    lines.append(f"  {'':<40} {'seed':>26} {'virtio-1.4':>26} {'1.4/seed':>9}")
    lines.append(f"  {'completed / verified':<40} {a['completed']:>3}/{a['runs']} {a['verified']:>3}{'':>15}"
                 f" {b['completed']:>3}/{b['runs']} {b['verified']:>3}")
    rows = [(k, lbl, u, a[k], b[k]) for k, lbl, u in METRICS]
    rows += [(f"phase:{p}", f"  downtime phase {p}", "ms", a["phases"].get(p, {"n": 0}), b["phases"].get(p, {"n": 0}))
             for p in sorted(set(a["phases"]) | set(b["phases"]))]
    for _, lbl, unit, x, y in rows:
        ratio = y["median"] / x["median"] if x.get("n") and y.get("n") and x["median"] else math.nan
        lines.append(f"  {lbl + (' (' + unit + ')' if unit and unit != 'B' else ' (bytes)' if unit else ''):<40}"
                     f" {_fmt(x, unit):>26} {_fmt(y, unit):>26} {ratio:>9.2f}")
    lines.append("  VF steps (commands, ms; median):")
    for key in sorted(set(a["steps"]) | set(b["steps"])):
        cells = []
        for s in (a, b):
            st = s["steps"].get(key)
            cells.append(f"{st['commands']['median']:.0f} cmds, {st['ms']['median']:.2f} ms" if st and
                         st["commands"].get("n") else "-")
        lines.append(f"    {key:<38} {cells[0]:>26} {cells[1]:>26}")
    for line in lines:
        print(line)
    return lines


def plot(summary: dict[str, Any], records: dict[str, list[dict[str, Any]]], path: Path, *, dpi: int = 110) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4.8))
    phases = sorted({p for s in summary.values() for p in s["phases"]})
    cmap = plt.get_cmap("tab20")
    for i, prof in enumerate(PROFILES):
        bottom = 0.0
        for j, p in enumerate(phases):
            v = summary[prof]["phases"].get(p, {}).get("median", 0.0) if summary[prof]["phases"].get(p, {}).get("n") else 0.0
            ax1.bar(i, v, bottom=bottom, color=cmap(j), label=p if i == 0 else None)
            bottom += v
        ds = [r["downtime"] for r in records[prof] if r.get("status") == "completed"]
        ax1.scatter([i + 0.3] * len(ds), ds, color="k", s=10, zorder=3, label="each run" if i == 0 else None)
    ax1.set_xticks(range(len(PROFILES)), PROFILES)
    ax1.set_ylabel("ms")
    ax1.set_title("downtime: median phases, and each run")
    ax1.legend(fontsize=6, loc="upper left")
    steps = sorted({k for s in summary.values() for k in s["steps"]})
    x = np.arange(len(steps))
    for i, prof in enumerate(PROFILES):
        st = summary[prof]["steps"]
        ax2.barh(x + (i - 0.5) * 0.4, [st.get(k, {}).get("commands", {}).get("median", 0) or 0 for k in steps],
                 height=0.4, label=prof)
        ax3.barh(x + (i - 0.5) * 0.4, [st.get(k, {}).get("ms", {}).get("median", 0) or 0 for k in steps],
                 height=0.4, label=prof)
    for ax, t in ((ax2, "control commands per VF step (median)"), (ax3, "wall ms per VF step (median)")):
        ax.set_yticks(x, steps, fontsize=7)
        ax.set_title(t)
        ax.legend(fontsize=7)
    ax3.set_xscale("symlog", linthresh=1.0)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def run(plan: Plan, out_dir: Path, *, progress: bool = True) -> dict[str, Any]:
    from rich.progress import Progress

    from virtio_lm.bench_downtime import Matrix, one_run

    out_dir.mkdir(parents=True, exist_ok=True)
    m = Matrix(limits=(plan.limit,), modes=(plan.mode,), rates=(plan.rate,), runs=plan.runs,
               memory_mib=plan.memory_mib, sweep_mib=plan.sweep_mib, warmup_s=plan.warmup_s)
    records: dict[str, list[dict[str, Any]]] = {p: [] for p in PROFILES}
    t0 = time.monotonic()
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("profiles", total=plan.runs * len(PROFILES))
        for i in range(plan.runs):  # run-major: noise spreads over both profiles
            for prof in PROFILES:
                work = Path(tempfile.mkdtemp(prefix="virtio-lm-prof-"))
                try:
                    r = one_run(work, plan.limit, plan.mode, plan.rate, m, seed=i + 1,
                                params={"x-device-profile": prof}, host_args=("--profile", prof))
                except Exception as exc:  # noqa: BLE001 - a run that could not run is a failed run
                    r = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
                finally:
                    shutil.rmtree(work, ignore_errors=True)
                r["profile"] = prof
                records[prof].append(r)
                bar.advance(task)
    summary = summarize(records)
    lines = print_table(summary, plan, time.monotonic() - t0)
    (out_dir / "profiles.json").write_text(json.dumps(
        {"plan": plan.__dict__, "summary": summary, "table": lines,
         "runs": {p: [dict(r, figures=run_record(r)) if r.get("status") == "completed" else r for r in rs]
                  for p, rs in records.items()}}, indent=1, default=str))
    plot(summary, records, out_dir / "profiles.png")
    print(f"  wrote {out_dir / 'profiles.json'} and {out_dir / 'profiles.png'}")
    return summary
