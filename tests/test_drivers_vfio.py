"""The host's VFIO migration v2 state machine (drivers/vfio.py): the table over every
(state, requested) pair, and the machine over a recording back-end."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from virtio_lm.drivers.vfio import ARCS, NEXT_STEP, SAVING, MigState, VfMigration, bfs_path, path
from virtio_lm.errors import DriverError, MigrationArcError

S = MigState
PAIRS = list(itertools.product(MigState, MigState))

# Linux's vfio_mig_get_next_state documents these multi-step transitions (P2P + PRE_COPY supported)
DOCUMENTED = [
    "PRE_COPY PRE_COPY_P2P STOP_COPY",
    "PRE_COPY RUNNING RUNNING_P2P",
    "PRE_COPY RUNNING RUNNING_P2P STOP",
    "PRE_COPY RUNNING RUNNING_P2P STOP RESUMING",
    "PRE_COPY_P2P RUNNING_P2P RUNNING",
    "PRE_COPY_P2P RUNNING_P2P STOP",
    "PRE_COPY_P2P RUNNING_P2P STOP RESUMING",
    "RESUMING STOP RUNNING_P2P",
    "RESUMING STOP RUNNING_P2P PRE_COPY_P2P",
    "RESUMING STOP RUNNING_P2P RUNNING",
    "RESUMING STOP RUNNING_P2P RUNNING PRE_COPY",
    "RESUMING STOP STOP_COPY",
    "RUNNING RUNNING_P2P PRE_COPY_P2P",
    "RUNNING RUNNING_P2P STOP",
    "RUNNING RUNNING_P2P STOP RESUMING",
    "RUNNING RUNNING_P2P STOP STOP_COPY",
    "RUNNING_P2P RUNNING PRE_COPY",
    "RUNNING_P2P STOP RESUMING",
    "RUNNING_P2P STOP STOP_COPY",
    "STOP RUNNING_P2P PRE_COPY_P2P",
    "STOP RUNNING_P2P RUNNING",
    "STOP RUNNING_P2P RUNNING PRE_COPY",
    "STOP_COPY STOP RESUMING",
    "STOP_COPY STOP RUNNING_P2P",
    "STOP_COPY STOP RUNNING_P2P RUNNING",
]
BLOCKED = {(S.STOP_COPY, S.PRE_COPY), (S.STOP_COPY, S.PRE_COPY_P2P)}


def test_the_table_has_every_pair():
    assert set(NEXT_STEP) == set(PAIRS)


def test_state_numbers_are_linuxs():
    assert [(s.name, int(s)) for s in MigState] == [
        ("ERROR", 0), ("STOP", 1), ("RUNNING", 2), ("STOP_COPY", 3), ("RESUMING", 4),
        ("RUNNING_P2P", 5), ("PRE_COPY", 6), ("PRE_COPY_P2P", 7)]  # fmt: skip


@pytest.mark.parametrize("cur,new", PAIRS, ids=[f"{a.name}->{b.name}" for a, b in PAIRS])
def test_every_pair_follows_the_shortest_path_that_never_passes_through_a_saving_state(cur, new):
    ref = bfs_path(cur, new)
    if ref is None:
        with pytest.raises(MigrationArcError):
            path(cur, new)
        assert NEXT_STEP[(cur, new)] is S.ERROR or new is S.ERROR
        return
    arcs = path(cur, new)
    states = [cur] + [b for _, b in arcs]
    assert states[-1] is new
    assert all(a in ARCS for a in arcs), arcs
    assert len(states) == len(ref), (states, ref)
    for interior in states[1:-1]:
        assert interior not in SAVING and interior is not S.RESUMING or (
            interior is S.PRE_COPY_P2P and cur is S.PRE_COPY and new is S.STOP_COPY), states


def test_the_documented_multi_step_transitions():
    for line in DOCUMENTED:
        names = [S[n] for n in line.split()]
        got = [names[0]] + [b for _, b in path(names[0], names[-1])]
        assert got == names, line
    multi = {(a, b) for a, b in PAIRS if a is not b and b is not S.ERROR and (a, b) not in BLOCKED
             and a is not S.ERROR and (a, b) not in ARCS}
    assert multi == {(S[l.split()[0]], S[l.split()[-1]]) for l in DOCUMENTED}


def test_blocked_transitions_and_error():
    for cur, new in BLOCKED:
        with pytest.raises(MigrationArcError, match="no such transition"):
            path(cur, new)
    for s in MigState:
        with pytest.raises(MigrationArcError, match="never requested"):
            path(s, S.ERROR)
        if s is not S.ERROR:
            with pytest.raises(MigrationArcError, match="only a reset"):
                path(S.ERROR, s)


# ============================================================================ the machine
class Recorder:
    """A back-end that records arcs; fails on the arc it is told to."""

    profile = "test"

    def __init__(self) -> None:
        self.calls: list[tuple[list[int], list[tuple[MigState, MigState]]]] = []
        self.fail_on: tuple[MigState, MigState] | None = None
        self.where: dict[int, MigState] = {}
        self.n = 0

    def tracking_name(self, mode):
        return "test"

    def commands(self):
        return self.n

    def run(self, vfs, arcs, images):
        self.calls.append((list(vfs), list(arcs)))
        out = None
        for arc in arcs:
            if arc == self.fail_on:
                raise DriverError("refused")
            self.n += len(vfs)
            for vf in vfs:
                self.where[vf] = arc[1]
            if arc[1] is S.STOP_COPY:
                out = [b"img%d" % vf for vf in vfs]
            if arc == (S.RESUMING, S.STOP):
                assert images is not None
        return out

    def probe(self, vf, candidates):
        return self.where.get(vf, S.RUNNING)

    def fresh(self, vf):
        return None

    def reset(self, vf):
        self.where.pop(vf, None)

    def start_dirty(self, vfs, mode):
        pass

    def collect_dirty(self, vf):
        return np.zeros(4, dtype=bool)

    def stop_dirty(self, vfs):
        pass

    def dirty_stats(self):
        return {}


def test_a_source_switch_over_is_three_batches_and_returns_the_images():
    b = Recorder()
    m = VfMigration(b)
    assert m.set_states([1, 2], S.PRE_COPY) is None
    assert m.set_states([1, 2], S.PRE_COPY_P2P) is None
    assert m.set_states([1, 2], S.STOP_COPY) == [b"img1", b"img2"]
    assert [arcs for _, arcs in b.calls] == [[(S.RUNNING, S.PRE_COPY)], [(S.PRE_COPY, S.PRE_COPY_P2P)],
                                             [(S.PRE_COPY_P2P, S.STOP_COPY)]]
    assert m.state(1) is m.state(2) is S.STOP_COPY
    st = m.stats()
    assert st["arcs"]["PRE_COPY_P2P -> STOP_COPY"]["commands"] == 2


def test_leaving_resuming_needs_one_image_per_vf():
    m = VfMigration(Recorder())
    m.set_states([1, 2], S.RESUMING)
    with pytest.raises(MigrationArcError, match="one image per VF"):
        m.set_states([1, 2], S.RUNNING_P2P)
    with pytest.raises(MigrationArcError, match="one image per VF"):
        m.set_states([1, 2], S.RUNNING_P2P, images=[b"x"])
    m.set_states([1, 2], S.RUNNING_P2P, images=[b"x", b"y"])
    assert m.state(1) is S.RUNNING_P2P


def test_vfs_in_different_states_are_refused_and_recover_groups_them():
    b = Recorder()
    m = VfMigration(b)
    m.set_states([1], S.RUNNING_P2P)
    with pytest.raises(MigrationArcError, match="different states"):
        m.set_states([1, 2], S.STOP)
    m.recover([1, 2])
    assert m.state(1) is m.state(2) is S.RUNNING


def test_a_failed_arc_leaves_each_vf_where_the_back_end_says():
    b = Recorder()
    b.fail_on = (S.STOP, S.STOP_COPY)
    m = VfMigration(b)
    with pytest.raises(MigrationArcError, match="refused") as ei:
        m.set_states([3], S.STOP_COPY)
    assert isinstance(ei.value.__cause__, DriverError)
    assert m.state(3) is S.STOP  # RUNNING -> RUNNING_P2P -> STOP done, STOP_COPY not
    b.fail_on = None
    m.recover([3])
    assert m.state(3) is S.RUNNING


def test_error_is_left_only_by_reset():
    b = Recorder()
    b.fail_on = (S.RUNNING, S.RUNNING_P2P)
    b.probe = lambda vf, candidates: S.ERROR  # type: ignore[method-assign]
    m = VfMigration(b)
    with pytest.raises(MigrationArcError):
        m.set_states([1], S.STOP)
    assert m.state(1) is S.ERROR
    with pytest.raises(MigrationArcError, match="only a reset"):
        m.recover([1])
    m.reset(1)
    assert m.state(1) is S.RUNNING and m.fresh(1) is None
