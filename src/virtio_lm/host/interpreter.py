"""How a host process sets up the Python interpreter it runs in.

A host's threads (vCPUs, workloads, the PF device, the migration runner) share
one interpreter lock.  Two settings shorten the switch-over, and every process
that runs hosts -- ``virtio-lm host`` and the benches that time a switch-over
in-process -- applies the same ones, so that a bench measures what a host does:

* the lock is handed over every :data:`SWITCH_INTERVAL_S` instead of CPython's
  5 ms: a switch-over step that waits on another thread (pausing a vCPU, a
  control-queue command the PF thread answers) otherwise waits out whole 5 ms
  slices (measured: VM resume 3-7 ms -> ~1.5 ms);
* once a host is up, what it allocated is frozen out of the cyclic collector and
  the collector runs less often (:data:`GC_THRESHOLDS`): a switch-over decodes a
  guest state of thousands of objects, and each collection pass there is
  downtime (measured: fixed switch-over cost 18-21 ms -> 15-18 ms).
"""

from __future__ import annotations

import gc
import sys

__all__ = ["GC_THRESHOLDS", "SWITCH_INTERVAL_S", "release_heap", "settle_heap", "tune_threads"]

SWITCH_INTERVAL_S = 0.0005
GC_THRESHOLDS = (20000, 20, 20)


def tune_threads() -> float:
    """Hand the interpreter lock over every :data:`SWITCH_INTERVAL_S` (before the host
    starts); returns the interval it replaced."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    return old


def settle_heap() -> tuple[int, ...]:
    """After a host started: freeze what it allocated out of the collector, collect less
    often; returns the thresholds it replaced."""
    old = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    return old


def release_heap(thresholds: tuple[int, ...]) -> None:
    """Undo :func:`settle_heap` (a bench closing its in-process hosts between runs)."""
    gc.unfreeze()
    gc.set_threshold(*thresholds)
    gc.collect()
