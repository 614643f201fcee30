"""The VF state machine: every (state, input) pair against an oracle written from seed-notes.md."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from virtio_lm.errors import StalePlanError, StateTransitionError, VirtioLmError
from virtio_lm.pf.state import TRANSITIONS, Action, Event, Plan, Transition, VfStateMachine, lookup
from virtio_lm.wire.ctrl import VfState

# --------------------------------------------------------------------------- the oracle
# Written out literally from docs/seed-notes.md "VF states (SET_STATE)":
#
# | from \ to | RUNNING | QUIESCED | FREEZED |
# | INIT      | RUN     | QUIESCE  | FREEZE  |
# | RUNNING   | —       | QUIESCE  | ERR     |
# | QUIESCED  | RUN     | —        | FREEZE  |
# | FREEZED   | ERR     | QUIESCE ("unfreeze") | — |
#
# — (same state) = no-op, acks OK.  SET_STATE(INIT) = ERR.  FLR: any -> INIT.
# DRIVER_OK: INIT -> RUNNING only.
# Keys: (from, input) with input a string; value (to, action) or "ERR".
ORACLE: dict[tuple[str, str], tuple[str, str] | str] = {
    ("INIT", "SET RUNNING"): ("RUNNING", "RUN"),
    ("INIT", "SET QUIESCED"): ("QUIESCED", "QUIESCE"),
    ("INIT", "SET FREEZED"): ("FREEZED", "FREEZE"),
    ("INIT", "SET INIT"): "ERR",
    ("INIT", "FLR"): ("INIT", "FLR"),
    ("INIT", "DRIVER_OK"): ("RUNNING", "RUN"),
    ("RUNNING", "SET RUNNING"): ("RUNNING", "NOOP"),
    ("RUNNING", "SET QUIESCED"): ("QUIESCED", "QUIESCE"),
    ("RUNNING", "SET FREEZED"): "ERR",
    ("RUNNING", "SET INIT"): "ERR",
    ("RUNNING", "FLR"): ("INIT", "FLR"),
    ("RUNNING", "DRIVER_OK"): ("RUNNING", "NOOP"),
    ("QUIESCED", "SET RUNNING"): ("RUNNING", "RUN"),
    ("QUIESCED", "SET QUIESCED"): ("QUIESCED", "NOOP"),
    ("QUIESCED", "SET FREEZED"): ("FREEZED", "FREEZE"),
    ("QUIESCED", "SET INIT"): "ERR",
    ("QUIESCED", "FLR"): ("INIT", "FLR"),
    ("QUIESCED", "DRIVER_OK"): ("QUIESCED", "NOOP"),
    ("FREEZED", "SET RUNNING"): "ERR",
    ("FREEZED", "SET QUIESCED"): ("QUIESCED", "UNFREEZE"),
    ("FREEZED", "SET FREEZED"): ("FREEZED", "NOOP"),
    ("FREEZED", "SET INIT"): "ERR",
    ("FREEZED", "FLR"): ("INIT", "FLR"),
    ("FREEZED", "DRIVER_OK"): ("FREEZED", "NOOP"),
}

INPUT_NAMES = {
    Event.SET_INIT: "SET INIT",
    Event.SET_RUNNING: "SET RUNNING",
    Event.SET_QUIESCED: "SET QUIESCED",
    Event.SET_FREEZED: "SET FREEZED",
    Event.FLR: "FLR",
    Event.DRIVER_OK: "DRIVER_OK",
}

ALL_PAIRS = list(itertools.product(VfState, Event))


def oracle(state: VfState, event: Event) -> tuple[VfState, Action] | None:
    v = ORACLE[(state.name, INPUT_NAMES[event])]
    if v == "ERR":
        return None
    to, act = v
    return VfState[to], Action[act]


def drive(sm: VfStateMachine, event: Event) -> Action:
    """Feed one event to a machine through its public API (ERR raises)."""
    if event is Event.FLR:
        return sm.flr().action
    if event is Event.DRIVER_OK:
        return sm.driver_ok().action
    return sm.request(event.target)


def test_oracle_and_table_cover_every_pair():
    assert len(ORACLE) == len(VfState) * len(Event) == 24
    assert set(TRANSITIONS) == set(ALL_PAIRS)


@pytest.mark.parametrize("state,event", ALL_PAIRS, ids=[f"{s.name}-{e.name}" for s, e in ALL_PAIRS])
def test_table_entry_matches_oracle(state, event):
    want = oracle(state, event)
    got = lookup(state, event)
    assert got is TRANSITIONS[(state, event)]
    if want is None:
        assert got is None
    else:
        assert got == Transition(*want)


@pytest.mark.parametrize("state,event", ALL_PAIRS, ids=[f"{s.name}-{e.name}" for s, e in ALL_PAIRS])
def test_machine_follows_oracle(state, event):
    sm = VfStateMachine(state)
    want = oracle(state, event)
    if want is None:
        with pytest.raises(StateTransitionError) as ei:
            drive(sm, event)
        assert ei.value.state is state
        assert ei.value.requested is event.target
        assert sm.state is state  # ERR leaves the state unchanged
        assert sm.generation == 0
    else:
        assert drive(sm, event) is want[1]
        assert sm.state is want[0]
        assert sm.generation == (0 if want[1] is Action.NOOP else 1)


SET_PAIRS = [(s, e) for s, e in ALL_PAIRS if e.target is not None]  # FLR / DRIVER_OK are single-phase


@pytest.mark.parametrize("state,event", SET_PAIRS, ids=[f"{s.name}-{e.name}" for s, e in SET_PAIRS])
def test_plan_alone_changes_nothing(state, event):
    sm = VfStateMachine(state)
    want = oracle(state, event)
    if want is None:
        with pytest.raises(StateTransitionError):
            sm.plan(event.target)
    else:
        plan = sm.plan(event.target)
        assert (plan.new_state, plan.action) == want
        assert plan.from_state is state and plan.event is event
    assert sm.state is state and sm.generation == 0


def test_state_transition_error_is_typed_and_named():
    sm = VfStateMachine(VfState.RUNNING)
    with pytest.raises(StateTransitionError, match="RUNNING -> FREEZED") as ei:
        sm.plan(VfState.FREEZED)
    assert isinstance(ei.value, VirtioLmError)
    assert ei.value.state is VfState.RUNNING and ei.value.requested is VfState.FREEZED


def test_set_state_init_is_err_even_in_init():
    sm = VfStateMachine()
    with pytest.raises(StateTransitionError):
        sm.request(VfState.INIT)
    assert sm.state is VfState.INIT


def test_failed_device_action_leaves_state():
    """Leaving FREEZED with an invalid image: the caller never applies, the VF stays FREEZED."""
    sm = VfStateMachine(VfState.FREEZED)
    plan = sm.plan(VfState.QUIESCED)
    assert plan.action is Action.UNFREEZE

    def device_unfreeze() -> None:
        raise ValueError("image invalid")

    with pytest.raises(ValueError):
        device_unfreeze()
    assert sm.state is VfState.FREEZED
    # a later, successful attempt works
    plan2 = sm.plan(VfState.QUIESCED)
    assert sm.apply(plan2) is VfState.QUIESCED


def test_plan_is_stale_after_flr():
    sm = VfStateMachine(VfState.QUIESCED)
    plan = sm.plan(VfState.FREEZED)
    sm.flr()  # the VF's driver reset it while FREEZE was waiting for in-flight I/O
    with pytest.raises(StalePlanError) as ei:
        sm.apply(plan)
    assert sm.state is VfState.INIT
    assert isinstance(ei.value, StateTransitionError)


def test_plan_is_stale_after_flr_back_to_same_state():
    """FLR + DRIVER_OK bring RUNNING back to RUNNING; the old plan must still be refused."""
    sm = VfStateMachine(VfState.RUNNING)
    plan = sm.plan(VfState.QUIESCED)
    sm.flr()
    sm.driver_ok()
    assert sm.state is VfState.RUNNING
    with pytest.raises(StalePlanError):
        sm.apply(plan)
    assert sm.state is VfState.RUNNING


def test_plan_applied_twice_is_stale():
    sm = VfStateMachine(VfState.RUNNING)
    plan = sm.plan(VfState.QUIESCED)
    sm.apply(plan)
    with pytest.raises(StalePlanError):
        sm.apply(plan)
    assert sm.state is VfState.QUIESCED


def test_noop_plan_stays_valid_across_noops():
    sm = VfStateMachine(VfState.QUIESCED)
    plan = sm.plan(VfState.FREEZED)
    sm.driver_ok()  # NOOP in QUIESCED
    sm.request(VfState.QUIESCED)  # NOOP
    assert sm.apply(plan) is VfState.FREEZED


def test_migration_paths():
    src = VfStateMachine()
    assert src.driver_ok().action is Action.RUN
    assert [src.request(s) for s in (VfState.QUIESCED, VfState.FREEZED)] == [Action.QUIESCE, Action.FREEZE]
    dst = VfStateMachine()
    acts = [dst.request(s) for s in (VfState.FREEZED, VfState.QUIESCED, VfState.RUNNING)]
    assert acts == [Action.FREEZE, Action.UNFREEZE, Action.RUN]
    assert dst.state is VfState.RUNNING


def test_event_set_state_roundtrip():
    for s in VfState:
        assert Event.set_state(s).target is s
    assert Event.FLR.target is None and Event.DRIVER_OK.target is None


def test_plan_is_immutable():
    plan = VfStateMachine(VfState.RUNNING).plan(VfState.QUIESCED)
    assert isinstance(plan, Plan)
    with pytest.raises(AttributeError):
        plan.generation = 5  # type: ignore[misc]


# --------------------------------------------------------------------------- stateful
class VfStateModel(RuleBasedStateMachine):
    """Random sequences of SET_STATE / FLR / DRIVER_OK, checked against the oracle."""

    def __init__(self) -> None:
        super().__init__()
        self.sm = VfStateMachine()
        self.model = VfState.INIT
        self.gen = 0
        self.pending: Plan | None = None
        self.pending_gen = 0

    def _expect(self, event: Event) -> tuple[VfState, Action] | None:
        return oracle(self.model, event)

    @rule(to=st.sampled_from(list(VfState)))
    def set_state(self, to):
        event = Event.set_state(to)
        want = self._expect(event)
        if want is None:
            with pytest.raises(StateTransitionError):
                self.sm.request(to)
        else:
            assert self.sm.request(to) is want[1]
            self.model = want[0]
            self.gen += want[1] is not Action.NOOP

    @rule()
    def flr(self):
        assert self.sm.flr() == Transition(*self._expect(Event.FLR))
        self.model = VfState.INIT
        self.gen += 1

    @rule()
    def driver_ok(self):
        want = self._expect(Event.DRIVER_OK)
        assert self.sm.driver_ok() == Transition(*want)
        self.model = want[0]
        self.gen += want[1] is not Action.NOOP

    @rule(to=st.sampled_from(list(VfState)))
    def plan(self, to):
        want = self._expect(Event.set_state(to))
        if want is None:
            with pytest.raises(StateTransitionError):
                self.sm.plan(to)
        else:
            self.pending = self.sm.plan(to)
            self.pending_gen = self.gen
            assert (self.pending.new_state, self.pending.action) == want

    @precondition(lambda self: self.pending is not None)
    @rule()
    def apply(self):
        plan, self.pending = self.pending, None
        fresh = self.pending_gen == self.gen and plan.from_state is self.model
        if fresh:
            assert self.sm.apply(plan) is plan.new_state
            self.model = plan.new_state
            self.gen += plan.action is not Action.NOOP
        else:
            with pytest.raises(StalePlanError):
                self.sm.apply(plan)

    @invariant()
    def matches(self):
        assert self.sm.state is self.model
        assert self.sm.generation == self.gen


TestVfStateModel = VfStateModel.TestCase
TestVfStateModel.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
TestVfStateModel.pytestmark = [pytest.mark.slow]  # over 1 s: out of the one-minute fast subset (CI runs it)
