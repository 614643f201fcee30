"""Pool runs of tests/qemu/figures.py: the median of every run's samples together, per back-end
and metric, their ratio, and each run's own ratio of medians.

    python tests/qemu/pool_figures.py RUN.json [RUN.json ...] [--against qsd]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--against", default="qsd", help="the back-end in the denominator (qsd, ours-baseline)")
    args = ap.parse_args()
    runs = [json.loads(p.read_text())["io"] for p in args.runs]
    metrics = list(runs[0]["ours"][0])

    def col(r: dict, who: str, m: str) -> list[float]:
        return [s[m] for s in r[who]]

    print(f"{'metric':<26}{'n':>4}{'ours':>10}{args.against:>14}{'ratio':>7}   per run ({', '.join(p.stem for p in args.runs)})")
    for m in metrics:
        o = [x for r in runs for x in col(r, "ours", m)]
        q = [x for r in runs for x in col(r, args.against, m)]
        per = [statistics.median(col(r, "ours", m)) / statistics.median(col(r, args.against, m)) for r in runs]
        print(f"{m:<26}{len(o):>4}{statistics.median(o):>10.1f}{statistics.median(q):>14.1f}"
              f"{statistics.median(o) / statistics.median(q):>7.2f}   " + " ".join(f"{x:.2f}" for x in per))


if __name__ == "__main__":
    main()
