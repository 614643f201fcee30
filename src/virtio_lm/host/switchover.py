"""The switch-over sequence of one VM, in one process, timed step by step.

A migration runs these steps in two processes: the source's session pauses the
vCPUs and sends the guest state at once, then quiesces, freezes and saves the
VFs while the destination rebuilds the guest; the destination restores the VFs
when their images arrive and runs them on COMMIT (``migration/session.py``).
The host's start-up calibration (``host/calibrate.py``) and the switch-over
bench (``virtio-lm bench``) run the same endpoint steps here, in the same
order, between two VMs of one host (or two in-process hosts), with the guest
pages copied outside the clock.  :func:`switchover_seconds` turns the steps
into the length of a migration's switch-over: the destination's guest restore
overlaps the source's QUIESCE .. SAVE_STATE (two processes, two cores); the
rest is in series.
"""

from __future__ import annotations

import time
from typing import Callable

from virtio_lm.host.endpoints import VmDestination, VmSource

__all__ = ["STEPS", "switchover_seconds", "timed_switchover"]

STEPS = ("pause", "guest-state", "quiesce", "freeze-save", "guest-restore", "restore", "run")


def switchover_seconds(steps: dict[str, float]) -> float:
    """A switch-over's length from its steps (see the module docstring)."""
    return (steps["pause"] + steps["guest-state"]
            + max(steps["guest-restore"], steps["quiesce"] + steps["freeze-save"])
            + steps["restore"] + steps["run"])


def timed_switchover(src: VmSource, dst: VmDestination, copy_pages: Callable[[], None]) -> dict[str, float]:
    """Switch the source's running VM over to the destination's shell; the seconds of each
    of :data:`STEPS`.  Like a migration, it writes the disk images back and puts the
    destination's VFs in RESUMING before the pause (outside the clock); ``copy_pages`` moves
    the guest memory (outside the clock too).  The destination's VM is left running, the
    source's paused with its VFs in STOP_COPY."""
    c = time.perf_counter
    t: dict[str, float] = {}

    def step(name: str, f: Callable[[], object]) -> object:
        t0 = c()
        out = f()
        t[name] = c() - t0
        return out

    src.prepare_switchover()  # the disk images written back first, outside the clock, as a session does
    src.start_pre_copy()  # PRE_COPY, as when dirty tracking starts (outside the clock)
    dst.prepare_vfs()  # RESUMING, as when the stream's configuration is accepted (outside the clock)
    step("pause", src.pause_vcpus)
    cpu = step("guest-state", src.cpu_state)
    step("quiesce", src.quiesce_vfs)
    images = step("freeze-save", src.freeze_and_save_vfs)
    copy_pages()
    step("guest-restore", lambda: dst.set_cpu_state(cpu))  # type: ignore[arg-type]
    step("restore", lambda: dst.restore_vfs(images))  # type: ignore[arg-type]
    step("run", dst.start)
    return t
