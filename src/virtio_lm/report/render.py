"""The report's plots (matplotlib, Agg) and its three renderings: report.json, report.md, index.html.

index.html and report.md reference the PNGs beside them (the directory is the
report: open index.html from it, or read report.md on a forge).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from virtio_lm.report.sections import Section
from virtio_lm.report.stats import size

DPI = 80
MODE_STYLE = {"push-bitmap": ("tab:blue", "o"), "push-bytemap": ("tab:cyan", "s"),
              "pull-bitmap": ("tab:red", "^"), "pull-bytemap": ("tab:orange", "D")}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _plt().close(fig)


def _errbar(ax: Any, xs: list[float], ss: list[dict[str, Any]], **kw: Any) -> None:
    ok = [(x, s) for x, s in zip(xs, ss) if s.get("n")]
    if not ok:
        return
    x = np.array([o[0] for o in ok], dtype=float)
    med = np.array([o[1]["median"] for o in ok])
    lo = med - np.array([o[1]["min"] for o in ok])
    hi = np.array([o[1]["max"] for o in ok]) - med
    ax.errorbar(x, med, yerr=[lo, hi], capsize=3, **kw)


def _ticks(ax: Any, xs: list[float] | None = None, *, bytes_x: bool = False) -> None:
    """Log axes readable: no minor labels; x ticks at ``xs`` (as sizes when ``bytes_x``)."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_minor_formatter(NullFormatter())
    fmt = ScalarFormatter()
    fmt.set_scientific(False)
    ax.yaxis.set_major_formatter(fmt)
    if xs:
        xs = sorted(set(xs))
        ax.set_xticks(xs)
        ax.set_xticklabels([size(x) if bytes_x else f"{x:g}" for x in xs], fontsize=7)


# ---------------------------------------------------------------------- per section
def plot_tracking(sec: Section, out: Path) -> None:
    plt = _plt()
    summary = sec.data["summary"]
    runs = sec.data["runs"]
    fig, ax = plt.subplots(figsize=(7, 4))
    wins = [(k, s) for k, s in summary.items() if k.startswith("window-")]
    xs = [s["window-mib"] for _, s in wins]
    for k, s in wins:
        d = [r["downtime"] for r in runs[k] if r.get("status") == "completed"]
        ax.scatter([s["window-mib"]] * len(d), d, color="tab:orange", alpha=0.5, s=16)
    _errbar(ax, xs, [s["downtime"] for _, s in wins], color="tab:orange", marker="s",
            label="no tracking, DMA window dirty at switch-over (verified)")
    t = summary["tracked"]["downtime"]
    if t.get("n"):
        ax.axhline(t["median"], color="tab:blue", lw=2, label=f"device tracking (median, {summary['tracked']['verified']}"
                   f"/{summary['tracked']['completed']} verified)")
        ax.axhspan(t["min"], t["max"], color="tab:blue", alpha=0.15)
    u = summary["untracked"]
    if u["downtime"].get("n"):
        ax.axhline(u["downtime"]["median"], color="tab:red", ls="--",
                   label=f"no tracking: negative control ({u['completed'] - u['verified']}/{u['completed']} lost data)")
    ax.set_xlabel("VF DMA window taken as dirty at switch-over (MiB)")
    ax.set_ylabel("downtime (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title("What device dirty tracking buys")
    ax.legend(fontsize=7, loc="upper left")
    _save(fig, out / "tracking.png")


def plot_modes(sec: Section, out: Path) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator

    plt = _plt()
    points = sec.data["points"]
    sizes = sorted({p["size"] for p in points})
    dens = sorted({p["density"] for p in points})
    big, dense, sparse = max(sizes), max(dens), min(dens)
    pct = [d * 100 for d in dens]
    fig, axs = plt.subplots(2, 3, figsize=(12, 6.5))
    for mode, (color, marker) in MODE_STYLE.items():
        at = {(p["size"], p["density"]): p for p in points if p["mode"] == mode}
        kw = dict(color=color, marker=marker, label=mode)
        _errbar(axs[0, 0], sizes, [at[(s, dense)]["ms"] for s in sizes], **kw)
        axs[0, 0].plot(sizes, [at[(s, sparse)]["ms"].get("median", np.nan) for s in sizes], color=color, ls=":", lw=1)
        _errbar(axs[0, 1], pct, [at[(big, d)]["ms"] for d in dens], **kw)
        _errbar(axs[0, 2], pct, [at[(big, d)]["cpu-ms-per-gib"] for d in dens], **kw)
        axs[1, 0].plot(sizes, [at[(s, dense)]["bytes"]["median"] for s in sizes], **kw)
        axs[1, 1].plot(sizes, [at[(s, dense)]["commands"]["median"] for s in sizes], **kw)
        axs[1, 2].plot(sizes, [at[(s, dense)]["map-bytes"]["median"] for s in sizes], **kw)
    axs[0, 0].set(title=f"collection latency: solid {dense:.0%} dirty, dotted {sparse:.1%}", ylabel="ms")
    axs[0, 1].set(title=f"collection latency, {size(big)} guest", ylabel="ms")
    axs[0, 2].set(title=f"host CPU per GiB tracked, {size(big)} guest", ylabel="ms per GiB")
    axs[1, 0].set(title=f"bytes to the driver per round, {dense:.0%} dirty", ylabel="bytes")
    axs[1, 1].set(title=f"control commands per round, {dense:.0%} dirty", ylabel="commands")
    axs[1, 2].set(title="map memory (push: host, pull: device)", ylabel="bytes")
    by_size = (axs[0, 0], axs[1, 0], axs[1, 1], axs[1, 2])
    for ax in axs.flat:
        ax.set_xscale("log")
        ax.set_yscale("symlog" if ax is axs[1, 1] else "log")
        _ticks(ax, sizes if ax in by_size else pct, bytes_x=ax in by_size)
        ax.set_xlabel("guest memory" if ax in by_size else "dirty pages (%)")
        ax.grid(alpha=0.3)
    for ax in (axs[1, 0], axs[1, 2]):
        ax.yaxis.set_major_locator(LogLocator(base=4))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: size(v)))
    for ax in axs.flat:
        ax.title.set_fontsize(9)
    axs[0, 0].legend(fontsize=7)
    _save(fig, out / "modes.png")


def plot_portions(sec: Section, out: Path) -> None:
    plt = _plt()
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(9, 3.8))
    st = sec.data["state"]
    for i, label in enumerate(dict.fromkeys(s["image"] for s in st)):
        ss = [s for s in st if s["image"] == label]
        xs = [s["portion"] for s in ss]
        tag = f"{size(ss[0]['image-bytes'])} image"
        _errbar(a0, xs, [s["save-ms"] for s in ss], color="tab:blue", marker="os"[i % 2], ls="-:"[i % 2],
                label=f"SAVE_STATE, {tag}")
        _errbar(a0, xs, [s["restore-ms"] for s in ss], color="tab:green", marker="os"[i % 2], ls="-:"[i % 2],
                label=f"RESTORE_STATE, {tag}")
    a0.set(xscale="log", yscale="log", xlabel="SAVE_STATE / RESTORE_STATE portion", ylabel="ms for the whole image",
           title="VF state images")
    a0.legend(fontsize=7)
    for mode in ("pull-bitmap", "pull-bytemap"):
        rs = [r for r in sec.data["report"] if r["mode"] == mode]
        color, marker = MODE_STYLE[mode]
        if rs:
            _errbar(a1, [r["portion"] for r in rs], [r["ms"] for r in rs], color=color, marker=marker,
                    label=f"{mode} ({size(rs[0]['report-bytes'])} report)")
    a1.set(xscale="log", yscale="log", xlabel="REPORT_DIRTY_PAGES portion", ylabel="collection ms",
           title="dirty report, every page dirty")
    _ticks(a0, [s["portion"] for s in st], bytes_x=True)
    _ticks(a1, [r["portion"] for r in sec.data["report"]], bytes_x=True)
    a1.legend(fontsize=7)
    for ax in (a0, a1):
        ax.grid(alpha=0.3)
    _save(fig, out / "portions.png")


def plot_slow(sec: Section, out: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label, color, marker in (("one-pf", "behind the FREEZE, same PF", "tab:red", "o"),
                                      ("two-pfs", "on a second PF", "tab:blue", "s")):
        rs = sec.data[key]
        _errbar(ax, [r["delay-ms"] for r in rs], [r["get-ms"] for r in rs], color=color, marker=marker, label=label)
    rs = sec.data["one-pf"]
    _errbar(ax, [r["delay-ms"] for r in rs], [r["freeze-ms"] for r in rs], color="gray", marker="x", ls=":",
            label="the FREEZE itself")
    b = sec.data["baseline"]
    if b.get("n"):
        ax.axhline(b["median"], color="k", lw=1, ls="--", label="GET_STATE_ATTRS alone")
    ax.set(xscale="log", yscale="log", xlabel="back-end I/O in flight at FREEZE (ms)", ylabel="latency (ms)",
           title="GET_STATE_ATTRS latency")
    _ticks(ax, [r["delay-ms"] for r in rs])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, out / "slow-commands.png")


def plot_downtime(sec: Section, out: Path) -> None:
    from virtio_lm import bench_downtime as bd

    cells = sec.data.get("_cells")
    if cells:
        bd.plot(cells, out / "downtime.png", "measured downtime vs limit (first migrations)", dpi=DPI)
    plt = _plt()
    phases = sec.data["phases"]
    names: list[str] = []
    for ph in phases.values():
        names += [k for k in ph if k not in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(phases) + 3), 4))
    bottom = np.zeros(len(phases))
    cmap = _plt().get_cmap("tab10")
    labels = list(phases)
    for i, name in enumerate(names):
        vals = np.array([phases[c].get(name, 0.0) for c in labels])
        ax.bar(range(len(labels)), vals, bottom=bottom, color=cmap(i % 10), label=name)
        bottom += vals
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("downtime phases, median (ms)")
    ax.set_title("where the downtime goes")
    ax.legend(fontsize=7, ncol=2)
    _save(fig, out / "downtime-phases.png")


PLOTS = {"tracking": plot_tracking, "modes": plot_modes, "portions": plot_portions, "slow-commands": plot_slow,
         "downtime": plot_downtime}


# ---------------------------------------------------------------------- documents
def section_json(sec: Section) -> dict[str, Any]:
    return {"id": sec.id, "title": sec.title, "question": sec.question, "question-source": sec.question_source,
            "answer": sec.answer, "tables": sec.tables, "plots": sec.plots, "notes": sec.notes,
            "command": sec.command, "seconds": round(sec.seconds, 1),
            "data": {k: v for k, v in sec.data.items() if not k.startswith("_")}}


def write_json(meta: dict[str, Any], sections: list[Section], path: Path) -> None:
    doc = {"meta": meta, "sections": [section_json(s) for s in sections]}
    path.write_text(json.dumps(doc, indent=1, default=_default))


def _default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def busy(meta: dict[str, Any]) -> bool:
    """Whether other work loaded the machine: a load average (1 min) at the start or the end of
    the campaign above half its CPUs."""
    load = meta["loadavg"]
    return max(load["start"][0], load["end"][0]) > 0.5 * meta["nproc"]


def _header_lines(meta: dict[str, Any]) -> list[str]:
    load = meta["loadavg"]
    busy = meta.get("busy", False)
    return [
        f"Generated {meta['finished']} on {meta['hostname']} ({meta['nproc']} CPUs) by `{meta['command']}` in "
        f"{meta['seconds']:.0f} s{' (quick)' if meta['quick'] else ''}; virtio-lm {meta['version']}"
        + (f", commit {meta['commit'][:12]}" if meta.get("commit") else "") + ".",
        f"Load average {load['start'][0]:.2f} at the start, {load['end'][0]:.2f} at the end, on "
        f"{meta['nproc']} CPUs" + (" (the machine was busy with other work)" if busy else "") + ". "
        "Timings are medians with their range (min-max) over n samples; under load the ranges are wide."
        + (f" The campaign took longer than its {meta['budget-s']} s budget"
           + (" because of that load." if busy else ".") if meta["seconds"] > meta["budget-s"] else ""),
    ]


def write_markdown(meta: dict[str, Any], sections: list[Section], path: Path) -> None:
    out = ["# virtio-lm evidence report", ""]
    out += [ln + "\n" for ln in _header_lines(meta)]
    out += ["Sections: " + ", ".join(f"[{s.title}](#{s.id})" for s in sections), ""]
    for s in sections:
        out += [f'<a id="{s.id}"></a>', f"## {s.title}", "", f"> {s.question}", ">", f"> — {s.question_source}", "",
                f"**Answer.** {s.answer}", ""]
        for t in s.tables:
            out += [f"*{t['caption']}*", "", "| " + " | ".join(t["columns"]) + " |",
                    "|" + "---|" * len(t["columns"])]
            out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in t["rows"]]
            out.append("")
        for p in s.plots:
            out += [f"![{s.title}]({p})", ""]
        for n in s.notes:
            out += [f"Note: {n}", ""]
        out += [f"Reproduce this section alone ({s.seconds:.0f} s here): `{s.command}`", ""]
    path.write_text("\n".join(out))


CSS = """body{font-family:sans-serif;max-width:70em;margin:1em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #bbb;padding:.2em .5em}
th{background:#eee}blockquote{color:#555;border-left:3px solid #ccc;margin-left:0;padding-left:1em}
code{background:#f4f4f4;padding:.1em .3em}img{max-width:100%}section{border-top:1px solid #ddd;margin-top:2em}
.meta{color:#555;font-size:.9em}"""


def write_html(meta: dict[str, Any], sections: list[Section], path: Path) -> None:
    e = html.escape
    out = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
           "<title>virtio-lm evidence report</title>", f"<style>{CSS}</style></head><body>",
           "<h1>virtio-lm evidence report</h1>"]
    out += [f'<p class="meta">{e(ln)}</p>' for ln in _header_lines(meta)]
    out.append("<ul>" + "".join(f'<li><a href="#{s.id}">{e(s.title)}</a></li>' for s in sections) + "</ul>")
    for s in sections:
        out += [f'<section id="{s.id}" data-section="{s.id}">', f"<h2>{e(s.title)}</h2>",
                f"<blockquote>{e(s.question)}<br>— {e(s.question_source)}</blockquote>",
                f"<p><b>Answer.</b> {e(s.answer)}</p>"]
        for t in s.tables:
            out.append(f"<table><caption>{e(t['caption'])}</caption><tr>"
                       + "".join(f"<th>{e(c)}</th>" for c in t["columns"]) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in t["rows"])
                       + "</table>")
        for p in s.plots:
            out.append(f'<p><img src="{e(p)}" alt="{e(s.title)}"></p>')
        for n in s.notes:
            out.append(f"<p><i>Note:</i> {e(n)}</p>")
        out.append(f"<p>Reproduce this section alone ({s.seconds:.0f} s here): <code>{e(s.command)}</code></p>")
        out.append("</section>")
    out.append("</body></html>")
    path.write_text("\n".join(out))
