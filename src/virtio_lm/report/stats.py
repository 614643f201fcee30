"""Medians and spread, and how the report writes them."""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np


def spread(values: Iterable[float]) -> dict[str, Any]:
    """Median, min, max and count of ``values`` (NaN-free); ``{"n": 0}`` when empty."""
    v = np.asarray([float(x) for x in values if x is not None and not math.isnan(float(x))], dtype=float)
    if len(v) == 0:
        return {"n": 0}
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()), "n": int(len(v))}


def fmt(s: dict[str, Any], digits: int = 1, unit: str = "") -> str:
    """``12.3 (10.1-14.2, n=3)``; a single sample without its range; ``-`` when empty."""
    if not s.get("n"):
        return "-"
    u = f" {unit}" if unit else ""
    if s["n"] == 1:
        return f"{s['median']:.{digits}f}{u} (n=1)"
    return f"{s['median']:.{digits}f}{u} ({s['min']:.{digits}f}-{s['max']:.{digits}f}, n={s['n']})"


def size(n: float) -> str:
    """Bytes as B / KiB / MiB / GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}".replace(".0 ", " ")
        n /= 1024
    return str(n)
