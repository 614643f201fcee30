"""One host-side migration state machine over both profiles: VFIO migration v2's states and arcs.

Linux's VFIO user API (``include/uapi/linux/vfio.h``, migration v2) gives a
host one state machine for every migratable device, whatever speaks to the
device underneath: RUNNING, RUNNING_P2P, STOP, STOP_COPY, RESUMING, PRE_COPY,
PRE_COPY_P2P and ERROR (the numbers are ``enum vfio_device_mig_state``'s).
A device driver implements a small set of *arcs* (one step each); a request
for any other state walks the shortest path of arcs, and a path never passes
*through* a saving state (PRE_COPY, PRE_COPY_P2P, STOP_COPY) or RESUMING --
except that a pre-copy state may go on to STOP_COPY through PRE_COPY_P2P --
and STOP_COPY never goes back to a pre-copy state (Linux's
``vfio_mig_get_next_state``).  ERROR is never requested: a device is there
when an arc failed and left it in no state of the path; only a reset (FLR)
leaves it.

Here that is data: :data:`ARCS` (the arcs, P2P and PRE_COPY supported) and
:data:`NEXT_STEP`, the first step for every ``(state, requested)`` pair (ERROR
where the request is refused).  :func:`path` follows it.

:class:`VfMigration` keeps each VF's state and drives a *back-end* through
the arcs: :class:`~virtio_lm.drivers.vfio_backends.SeedBackend` maps them to
the 2021 proposal's SET_STATE / SAVE_STATE / RESTORE_STATE and its dirty
page tracking (through :class:`~virtio_lm.drivers.pf_driver.PfDriver`'s
batched operations), :class:`~virtio_lm.drivers.vfio_backends.AdminBackend`
to virtio 1.4's DEV_MODE_SET, device parts objects and DEV_PARTS_* the way
Linux's virtio-vfio-pci sequences them, with the platform's IOMMU dirty
tracking (:mod:`virtio_lm.memory.iommu`).  A back-end gets a whole path at
once, for a batch of VFs, so it can put several arcs' commands in one kick.

The data of a saving arc comes back from :meth:`VfMigration.set_states` (one
image per VF); the data a device loads is given to the call that leaves
RESUMING (VFIO writes it to the data fd while RESUMING, the driver loads it
then).  Dirty tracking is beside the states, as in VFIO (DMA logging /
IOMMUFD dirty tracking): :meth:`VfMigration.start_dirty_tracking`,
:meth:`~VfMigration.collect_dirty`, :meth:`~VfMigration.stop_dirty_tracking`.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from virtio_lm.errors import MigrationArcError, VirtioLmError

__all__ = [
    "ARCS",
    "NEXT_STEP",
    "SAVING",
    "ArcStats",
    "MigState",
    "MigrationBackend",
    "VfMigration",
    "path",
]


class MigState(enum.IntEnum):
    """``enum vfio_device_mig_state`` (linux/vfio.h)."""

    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


S = MigState
Arc = tuple[MigState, MigState]

#: the states whose arcs produce migration data
SAVING = frozenset({S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY})

#: every arc a back-end implements (VFIO_MIGRATION_STOP_COPY | P2P | PRE_COPY)
ARCS: frozenset[Arc] = frozenset({
    (S.RUNNING, S.RUNNING_P2P), (S.RUNNING, S.PRE_COPY),
    (S.RUNNING_P2P, S.RUNNING), (S.RUNNING_P2P, S.STOP), (S.RUNNING_P2P, S.PRE_COPY_P2P),
    (S.STOP, S.RUNNING_P2P), (S.STOP, S.STOP_COPY), (S.STOP, S.RESUMING),
    (S.STOP_COPY, S.STOP),
    (S.RESUMING, S.STOP),
    (S.PRE_COPY, S.RUNNING), (S.PRE_COPY, S.PRE_COPY_P2P),
    (S.PRE_COPY_P2P, S.PRE_COPY), (S.PRE_COPY_P2P, S.RUNNING_P2P), (S.PRE_COPY_P2P, S.STOP_COPY),
})  # fmt: skip

_R, _P2P, _ST, _SC, _RES, _PC, _PCP, _E = (
    S.RUNNING, S.RUNNING_P2P, S.STOP, S.STOP_COPY, S.RESUMING, S.PRE_COPY, S.PRE_COPY_P2P, S.ERROR,
)
_COLS = (_R, _P2P, _ST, _SC, _RES, _PC, _PCP, _E)
#: the first step from a state (row) towards a requested state (column); ERROR = refused
_ROWS: dict[MigState, tuple[MigState, ...]] = {
    #              RUNNING RUN_P2P STOP  STOP_COPY RESUMING PRE_COPY PRE_COPY_P2P ERROR
    _R:           (_R,     _P2P,   _P2P, _P2P,     _P2P,    _PC,     _P2P,        _E),
    _P2P:         (_R,     _P2P,   _ST,  _ST,      _ST,     _R,      _PCP,        _E),
    _ST:          (_P2P,   _P2P,   _ST,  _SC,      _RES,    _P2P,    _P2P,        _E),
    _SC:          (_ST,    _ST,    _ST,  _SC,      _ST,     _E,      _E,          _E),
    _RES:         (_ST,    _ST,    _ST,  _ST,      _RES,    _ST,     _ST,         _E),
    _PC:          (_R,     _R,     _R,   _PCP,     _R,      _PC,     _PCP,        _E),
    _PCP:         (_P2P,   _P2P,   _P2P, _SC,      _P2P,    _PC,     _PCP,        _E),
    _E:           (_E,     _E,     _E,   _E,       _E,      _E,      _E,          _E),
}  # fmt: skip
NEXT_STEP: dict[tuple[MigState, MigState], MigState] = {
    (cur, new): step for cur, row in _ROWS.items() for new, step in zip(_COLS, row)
}


def path(cur: MigState, new: MigState) -> list[Arc]:
    """The arcs from ``cur`` to ``new`` (empty when equal); :class:`MigrationArcError` when refused."""
    cur, new = MigState(cur), MigState(new)
    if new is S.ERROR:
        raise MigrationArcError([], cur.name, new.name, "ERROR is entered by a failure, never requested")
    arcs: list[Arc] = []
    at = cur
    while at is not new:
        step = NEXT_STEP[(at, new)]
        if step is S.ERROR:
            why = "the device is in ERROR: only a reset leaves it" if at is S.ERROR else "no such transition"
            raise MigrationArcError([], cur.name, new.name, why)
        arcs.append((at, step))
        at = step
        if len(arcs) > len(MigState):  # a table bug, not an input: the table test covers every pair
            raise AssertionError(f"NEXT_STEP loops from {cur.name} to {new.name}")
    return arcs


def bfs_path(cur: MigState, new: MigState) -> list[MigState] | None:
    """The reference rule the table is tested against: a shortest path over :data:`ARCS` whose
    interior states are neither saving nor RESUMING -- except PRE_COPY_P2P on the way from
    PRE_COPY to STOP_COPY -- and never from STOP_COPY into pre-copy.  None: refused."""
    if new is S.ERROR or cur is S.ERROR:
        return None if cur is not new or cur is S.ERROR else []
    if cur is S.STOP_COPY and new in (S.PRE_COPY, S.PRE_COPY_P2P):
        return None

    def interior_ok(state: MigState) -> bool:
        if state not in SAVING and state is not S.RESUMING:
            return True
        return state is S.PRE_COPY_P2P and cur in (S.PRE_COPY, S.PRE_COPY_P2P) and new is S.STOP_COPY

    prev: dict[MigState, MigState | None] = {cur: None}
    queue = deque([cur])
    while queue:
        at = queue.popleft()
        if at is new:
            out = [at]
            while (p := prev[out[-1]]) is not None:
                out.append(p)
            return out[::-1]
        if at is not cur and not interior_ok(at):
            continue
        for a, b in sorted(ARCS):
            if a is at and b not in prev:
                prev[b] = at
                queue.append(b)
    return None


# ============================================================================ back-ends
class MigrationBackend(Protocol):
    """What a profile's back-end does for :class:`VfMigration`."""

    profile: str
    #: name of the dirty tracking it uses (query-migrate ``x-tracking-mode``), given the seed's mode
    def tracking_name(self, mode: object) -> str: ...

    def run(self, vfs: list[int], arcs: list[Arc], images: list[bytes] | None) -> list[bytes] | None:
        """Carry ``vfs`` (all in ``arcs[0][0]``) along ``arcs``; the images when an arc saves."""

    def probe(self, vf: int, candidates: list[MigState]) -> MigState:
        """After a failed :meth:`run`: which of ``candidates`` (the path's states) ``vf`` is in,
        ERROR when none."""

    def fresh(self, vf: int) -> str | None:
        """None if ``vf`` is freshly reset (can receive a migration), else why not."""

    def reset(self, vf: int) -> None:
        """FLR: the function and its migration resources back to their initial state."""

    def commands(self) -> int:
        """Control commands issued so far (all kinds)."""

    def start_dirty(self, vfs: list[int], mode: object) -> None: ...

    def collect_dirty(self, vf: int) -> np.ndarray: ...

    def stop_dirty(self, vfs: list[int]) -> None: ...

    def dirty_stats(self) -> dict[str, int]: ...


@dataclass
class ArcStats:
    """Per arc: how many VF batches took it, the commands they issued and their time."""

    runs: int = 0
    commands: int = 0
    seconds: float = 0.0


@dataclass
class _Counters:
    arcs: dict[str, ArcStats] = field(default_factory=dict)
    dirty_seconds: float = 0.0
    dirty_commands: int = 0
    dirty_collections: int = 0
    dirty_pages_scanned: int = 0


class VfMigration:
    """The host's VFIO-style migration state of each VF, over one back-end (see the module docstring)."""

    def __init__(self, backend: MigrationBackend) -> None:
        self.backend = backend
        self._state: dict[int, MigState] = {}
        self._lock = threading.RLock()
        self.counters = _Counters()

    @property
    def profile(self) -> str:
        return self.backend.profile

    def commands(self) -> int:
        """Control commands the back-end's driver issued so far (dirty collection's included)."""
        return self.backend.commands()

    def state(self, vf: int) -> MigState:
        """A VF the machine has not moved is RUNNING (VFIO's state after open / reset)."""
        return self._state.get(vf, S.RUNNING)

    def set_states(self, vfs: list[int], new: MigState, images: list[bytes] | None = None) -> list[bytes] | None:
        """Move every VF of ``vfs`` (all in one state) to ``new``, one batch per back-end step.

        Returns the VFs' images (``vfs`` order) when the path ends in a saving arc that
        produced them; ``images`` is the data loaded when the path leaves RESUMING.  On a
        failure each VF's state is probed (a state of the path, else ERROR) and the error
        re-raised as :class:`MigrationArcError`."""
        new = MigState(new)
        with self._lock:
            if not vfs:
                return [] if images is None else None
            now = {self.state(vf) for vf in vfs}
            if len(now) != 1:
                raise MigrationArcError(vfs, "/".join(sorted(s.name for s in now)), new.name, "VFs in different states")
            cur = now.pop()
            try:
                arcs = path(cur, new)
            except MigrationArcError as exc:
                raise MigrationArcError(vfs, cur.name, new.name, exc.reason) from None
            if not arcs:
                return None
            if (S.RESUMING, S.STOP) in arcs and (images is None or len(images) != len(vfs)):
                raise MigrationArcError(vfs, cur.name, new.name, "leaving RESUMING needs one image per VF")
            c0, t0 = self.backend.commands(), time.perf_counter()
            try:
                out = self.backend.run(list(vfs), arcs, images)
            except VirtioLmError as exc:
                candidates = [cur] + [b for _, b in arcs]
                for vf in vfs:
                    try:
                        self._state[vf] = self.backend.probe(vf, candidates)
                    except VirtioLmError:
                        self._state[vf] = S.ERROR
                states = ", ".join(f"{vf}: {self.state(vf).name}" for vf in vfs)
                raise MigrationArcError(vfs, cur.name, new.name, f"{exc} (now {states})") from exc
            finally:
                key = " -> ".join([cur.name] + [b.name for _, b in arcs])
                st = self.counters.arcs.setdefault(key, ArcStats())
                st.runs += 1
                st.commands += self.backend.commands() - c0
                st.seconds += time.perf_counter() - t0
            for vf in vfs:
                self._state[vf] = new
            return out

    def recover(self, vfs: list[int], new: MigState = S.RUNNING) -> None:
        """Bring ``vfs`` back to ``new`` from wherever each is (a rollback): VFs grouped by
        state; a VF in ERROR raises (only :meth:`reset` leaves it)."""
        with self._lock:
            groups: dict[MigState, list[int]] = {}
            for vf in vfs:
                groups.setdefault(self.state(vf), []).append(vf)
            for _, members in sorted(groups.items()):
                self.set_states(members, new)

    def reset(self, vf: int) -> None:
        """FLR of ``vf``: RUNNING again, its migration resources and tracking gone."""
        with self._lock:
            self.backend.reset(vf)
            self._state[vf] = S.RUNNING

    def fresh(self, vf: int) -> str | None:
        """None if ``vf`` can receive a migration (RUNNING, just reset), else why not."""
        if self.state(vf) is not S.RUNNING:
            return f"VF {vf} is in {self.state(vf).name}, not a fresh RUNNING"
        return self.backend.fresh(vf)

    # ------------------------------------------------------------------ dirty tracking
    def start_dirty_tracking(self, vfs: list[int], mode: object) -> None:
        self.backend.start_dirty(list(vfs), mode)

    def collect_dirty(self, vf: int) -> np.ndarray:
        c0, t0 = self.backend.commands(), time.perf_counter()
        try:
            pages = self.backend.collect_dirty(vf)
        finally:
            c = self.counters
            c.dirty_seconds += time.perf_counter() - t0
            c.dirty_commands += self.backend.commands() - c0
            c.dirty_collections += 1
        c.dirty_pages_scanned += len(pages)
        return pages

    def stop_dirty_tracking(self, vfs: list[int]) -> None:
        self.backend.stop_dirty(list(vfs))

    def tracking_name(self, mode: object) -> str:
        return self.backend.tracking_name(mode)

    def stats(self) -> dict[str, object]:
        """Counters for query-migrate / the profiles bench: per path taken, batches, commands
        and seconds; dirty collection's time, commands and pages scanned."""
        c = self.counters
        return {
            "profile": self.profile,
            "commands": self.backend.commands(),
            "arcs": {k: {"runs": v.runs, "commands": v.commands, "ms": round(v.seconds * 1000, 3)}
                     for k, v in c.arcs.items()},
            "dirty": {"collections": c.dirty_collections, "commands": c.dirty_commands,
                      "ms": round(c.dirty_seconds * 1000, 3), "pages-scanned": c.dirty_pages_scanned,
                      **self.backend.dirty_stats()},
        }
