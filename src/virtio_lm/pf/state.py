"""The VF migration state machine (SET_STATE, FLR, DRIVER_OK) as a table.

States are :class:`~virtio_lm.wire.ctrl.VfState`; inputs are :class:`Event`:
``SET_STATE(x)`` for each of the four states, an FLR of the VF, and the VF's
own driver setting DRIVER_OK.  :data:`TRANSITIONS` holds one entry for EVERY
``(state, event)`` pair: a :class:`Transition` (the new state and the
:class:`Action` the device performs to get there) or ``None`` = ERR (the PF
acks ``VIRTIO_CTRL_ERR`` and nothing changes).  The table is the proposal's
diagram and nothing else (docs: seed-notes.md "VF states")::

    from \\ SET_STATE   RUNNING     QUIESCED            FREEZED     INIT
    INIT                RUN         QUIESCE             FREEZE      ERR
    RUNNING             NOOP        QUIESCE             ERR         ERR
    QUIESCED            RUN         NOOP                FREEZE      ERR
    FREEZED             ERR         UNFREEZE            NOOP        ERR

    FLR        any state -> INIT, action FLR (also INIT -> INIT: the reset happens again)
    DRIVER_OK  INIT -> RUNNING (action RUN); elsewhere no change (NOOP)

SET_STATE(INIT) is ERR from every state, INIT included: INIT is reached only by
FLR.  A request for the current state (other than INIT) is NOOP and acks OK.

Two-phase use (a device action may fail -- e.g. leaving FREEZED with an invalid
restored image -- and then the state must stay)::

    plan = sm.plan(VfState.QUIESCED)   # StateTransitionError on ERR, nothing changed
    device.perform(plan.action)        # may raise: then simply do not apply
    sm.apply(plan)                     # StalePlanError if an FLR / other transition came between

:meth:`VfStateMachine.request` is plan + apply in one step for callers whose
action cannot fail.  The machine is thread safe (SET_STATE arrives on the PF's
control queue, FLR and DRIVER_OK on the VF's transport).
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass

from virtio_lm.errors import StalePlanError, StateTransitionError
from virtio_lm.wire.ctrl import VfState

__all__ = [
    "Action",
    "Event",
    "Plan",
    "Transition",
    "TRANSITIONS",
    "VfStateMachine",
    "lookup",
]


class Action(enum.Enum):
    """What the device does to make a transition happen."""

    NOOP = "noop"  # nothing: already there / event ignored in this state
    RUN = "run"  # master transactions again; process whatever is available on the queues
    QUIESCE = "quiesce"  # stop mastering transactions (no DMA, no interrupts)
    FREEZE = "freeze"  # quiesce (if needed) and wait for back-end I/O to settle; state fixed
    UNFREEZE = "unfreeze"  # validate + apply any restored image, internal state may change again
    FLR = "flr"  # function level reset: back to the initial state


class Event(enum.Enum):
    """Inputs of the state machine."""

    SET_INIT = "set_state(INIT)"
    SET_RUNNING = "set_state(RUNNING)"
    SET_QUIESCED = "set_state(QUIESCED)"
    SET_FREEZED = "set_state(FREEZED)"
    FLR = "flr"
    DRIVER_OK = "driver_ok"

    @classmethod
    def set_state(cls, target: VfState) -> "Event":
        """The SET_STATE event for ``target``."""
        return _SET_EVENTS[VfState(target)]

    @property
    def target(self) -> VfState | None:
        """The state a SET_STATE event asks for (None for FLR / DRIVER_OK)."""
        return _SET_TARGETS.get(self)


_SET_EVENTS = {
    VfState.INIT: Event.SET_INIT,
    VfState.RUNNING: Event.SET_RUNNING,
    VfState.QUIESCED: Event.SET_QUIESCED,
    VfState.FREEZED: Event.SET_FREEZED,
}
_SET_TARGETS = {e: s for s, e in _SET_EVENTS.items()}


@dataclass(frozen=True, slots=True)
class Transition:
    """One table entry: the state after the event and the device's action."""

    new_state: VfState
    action: Action


_I, _R, _Q, _F = VfState.INIT, VfState.RUNNING, VfState.QUIESCED, VfState.FREEZED
_E = Event
_T = Transition
ERR = None

TRANSITIONS: dict[tuple[VfState, Event], Transition | None] = {
    # ---- INIT
    (_I, _E.SET_INIT): ERR,
    (_I, _E.SET_RUNNING): _T(_R, Action.RUN),
    (_I, _E.SET_QUIESCED): _T(_Q, Action.QUIESCE),
    (_I, _E.SET_FREEZED): _T(_F, Action.FREEZE),
    (_I, _E.FLR): _T(_I, Action.FLR),
    (_I, _E.DRIVER_OK): _T(_R, Action.RUN),
    # ---- RUNNING
    (_R, _E.SET_INIT): ERR,
    (_R, _E.SET_RUNNING): _T(_R, Action.NOOP),
    (_R, _E.SET_QUIESCED): _T(_Q, Action.QUIESCE),
    (_R, _E.SET_FREEZED): ERR,
    (_R, _E.FLR): _T(_I, Action.FLR),
    (_R, _E.DRIVER_OK): _T(_R, Action.NOOP),
    # ---- QUIESCED
    (_Q, _E.SET_INIT): ERR,
    (_Q, _E.SET_RUNNING): _T(_R, Action.RUN),
    (_Q, _E.SET_QUIESCED): _T(_Q, Action.NOOP),
    (_Q, _E.SET_FREEZED): _T(_F, Action.FREEZE),
    (_Q, _E.FLR): _T(_I, Action.FLR),
    (_Q, _E.DRIVER_OK): _T(_Q, Action.NOOP),
    # ---- FREEZED
    (_F, _E.SET_INIT): ERR,
    (_F, _E.SET_RUNNING): ERR,
    (_F, _E.SET_QUIESCED): _T(_Q, Action.UNFREEZE),
    (_F, _E.SET_FREEZED): _T(_F, Action.NOOP),
    (_F, _E.FLR): _T(_I, Action.FLR),
    (_F, _E.DRIVER_OK): _T(_F, Action.NOOP),
}

del _I, _R, _Q, _F, _E, _T


def lookup(state: VfState, event: Event) -> Transition | None:
    """The table entry for ``(state, event)``; ``None`` means ERR."""
    return TRANSITIONS[(VfState(state), Event(event))]


@dataclass(frozen=True, slots=True)
class Plan:
    """A transition decided but not yet applied (see :meth:`VfStateMachine.plan`).

    ``generation`` is the machine's generation when planned; applying a plan
    after any state-changing event since then raises :class:`StalePlanError`.
    """

    from_state: VfState
    event: Event
    transition: Transition
    generation: int

    @property
    def action(self) -> Action:
        return self.transition.action

    @property
    def new_state(self) -> VfState:
        return self.transition.new_state


class VfStateMachine:
    """One VF's migration state, driven by :data:`TRANSITIONS`.

    ``generation`` counts the applied transitions whose action is not NOOP;
    it is what makes a stale :class:`Plan` detectable.
    """

    def __init__(self, state: VfState = VfState.INIT) -> None:
        self._state = VfState(state)
        self._generation = 0
        self._lock = threading.Lock()

    @property
    def state(self) -> VfState:
        return self._state

    @property
    def generation(self) -> int:
        return self._generation

    # ------------------------------------------------------------------ SET_STATE
    def plan(self, target: VfState) -> Plan:
        """Decide SET_STATE(``target``) without changing anything.

        Raises :class:`StateTransitionError` (fields ``state``, ``requested``)
        when the table says ERR.  ``target`` must be a valid
        :class:`VfState` value (the wire layer already rejects others).
        """
        target = VfState(target)
        event = Event.set_state(target)
        with self._lock:
            tr = TRANSITIONS[(self._state, event)]
            if tr is None:
                raise StateTransitionError(self._state, target)
            return Plan(self._state, event, tr, self._generation)

    def apply(self, plan: Plan) -> VfState:
        """Move to ``plan``'s new state (after the device performed its action).

        Raises :class:`StalePlanError` -- and changes nothing -- when the state
        or generation changed since :meth:`plan`.  Returns the new state.
        """
        with self._lock:
            if plan.from_state is not self._state or plan.generation != self._generation:
                raise StalePlanError(
                    self._state,
                    plan.event.target,
                    f"plan {plan.from_state.name} -> {plan.new_state.name} is stale: "
                    f"VF is now {self._state.name} (generation {self._generation}, planned at {plan.generation})",
                )
            self._move(plan.transition)
            return self._state

    def request(self, target: VfState) -> Action:
        """SET_STATE(``target``) in one step: plan and apply; returns the action.

        For callers whose device action cannot fail.  ERR raises
        :class:`StateTransitionError` and leaves the state unchanged.
        """
        plan = self.plan(target)
        self.apply(plan)
        return plan.action

    # ------------------------------------------------------------------ implicit events
    def flr(self) -> Transition:
        """An FLR of the VF: from any state to INIT (action FLR).  Never fails."""
        return self._fire(Event.FLR)

    def driver_ok(self) -> Transition:
        """The VF's own driver set DRIVER_OK: INIT -> RUNNING, elsewhere NOOP."""
        return self._fire(Event.DRIVER_OK)

    def _fire(self, event: Event) -> Transition:
        with self._lock:
            tr = TRANSITIONS[(self._state, event)]
            assert tr is not None, f"{event} never fails"
            self._move(tr)
            return tr

    def _move(self, tr: Transition) -> None:
        if tr.action is not Action.NOOP:
            self._generation += 1
        self._state = tr.new_state

    def __repr__(self) -> str:
        return f"VfStateMachine(state={self._state.name}, generation={self._generation})"
