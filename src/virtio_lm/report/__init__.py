"""``virtio-lm report``: every review question and design choice answered with a measurement and a plot.

:func:`run_report` runs a bounded campaign (the full one in at most 10
minutes, ``quick`` in at most 90 s) with a progress bar per section, and
writes into ``out``: ``index.html`` (the PNGs beside it), ``report.md``,
``report.json`` (every sample, the tables, when and where it ran) and the
plots.  Sections (:data:`SECTIONS`; ``sections`` picks some):

1. ``tracking`` -- the same VM migrated with device dirty tracking, without
   it (the negative control), and with the VFs' DMA window taken as dirty at
   the switch-over, for several window sizes;
2. ``modes`` -- push/pull x bitmap/bytemap: collection latency, host CPU per
   GiB, commands and bytes per round, map memory, by guest size and density;
3. ``portions`` -- SAVE_STATE / RESTORE_STATE and REPORT_DIRTY_PAGES time
   against portion size;
4. ``slow-commands`` -- GET_STATE_ATTRS behind a FREEZE waiting for back-end
   I/O, on one PF and on two;
5. ``downtime`` -- a reduced downtime matrix (bench_downtime's) and the
   downtime phases as stacked bars;
6. ``profiles`` -- seed vs virtio 1.4: one line pointing at ``virtio-lm bench profiles`` (not re-measured here).

The measurements are :mod:`virtio_lm.report.sections`; the plots and the
documents :mod:`virtio_lm.report.render`.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from virtio_lm.report import render
from virtio_lm.report.sections import MEASURE, PLANS, Section, samples_planned

SECTIONS = tuple(MEASURE)
BUDGET_S = {"quick": 90, "full": 600}  # the campaign's bound, on a machine not shared with other work


def section_command(section: str, quick: bool) -> str:
    return f"virtio-lm report --section {section}{' --quick' if quick else ''} --out DIR"


def _commit() -> str | None:
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


def run_report(out: Path, *, quick: bool = False, sections: tuple[str, ...] | list[str] = (),
               progress_out: TextIO | None = None, argv: list[str] | None = None) -> dict[str, Any]:
    """Measure the ``sections`` (default: all), write the report into ``out``; returns report.json's meta."""
    from virtio_lm import __version__
    from virtio_lm.progress import task_progress

    chosen = [s for s in SECTIONS if s in sections] if sections else list(SECTIONS)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown section(s) {', '.join(unknown)} (have {', '.join(SECTIONS)})")
    out.mkdir(parents=True, exist_ok=True)
    kind = "quick" if quick else "full"
    started = time.time()
    load_start = os.getloadavg()
    done: list[Section] = []
    with task_progress(progress_out) as bar:
        tasks = {s: bar.add_task(f"{s:<14}", total=samples_planned(s, PLANS[s][kind])) for s in chosen}
        for s in chosen:
            t0 = time.monotonic()
            sec = MEASURE[s](PLANS[s][kind], lambda s=s: bar.advance(tasks[s]))
            sec.seconds = time.monotonic() - t0
            sec.command = section_command(s, quick)
            plot = render.PLOTS.get(s)
            if plot is not None:
                plot(sec, out)
            done.append(sec)
    meta = {
        "command": " ".join(argv) if argv else f"virtio-lm report{' --quick' if quick else ''} --out {out}",
        "quick": quick,
        "sections": chosen,
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "seconds": time.time() - started,
        "budget-s": BUDGET_S[kind],
        "hostname": socket.gethostname(),
        "nproc": os.cpu_count(),
        "loadavg": {"start": list(load_start), "end": list(os.getloadavg())},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "version": __version__,
        "commit": _commit(),
    }
    meta["busy"] = render.busy(meta)
    render.write_json(meta, done, out / "report.json")
    render.write_markdown(meta, done, out / "report.md")
    render.write_html(meta, done, out / "index.html")
    return meta
