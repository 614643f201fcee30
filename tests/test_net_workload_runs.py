"""The net workload keeps what it received from the peer as run-length coded
``[first, count]`` runs (part of every switch-over's guest state: a VM that ran
for hours must not carry millions of numbers), and the network check judges
loss and duplicates from those runs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio_lm.demo import RELEARN_MAX, WINDOW_SLACK, check_network
from virtio_lm.errors import GuestStateError
from virtio_lm.vm import guest_state as gs
from virtio_lm.vm.workloads import NetWorkload, NetWorkloadState

MAC, PEER = bytes.fromhex("525400123456"), bytes.fromhex("5254000000fe")


def workload(seqs: list[int]) -> NetWorkload:
    w = NetWorkload(None, mac=MAC, peer_mac=PEER)  # type: ignore[arg-type]  # never stepped
    for q in seqs:
        w._got(q)
    return w


def expand(runs) -> list[int]:
    return [q for f, n in runs for q in range(f, f + n)]


def naive_stats(rx: list[int]) -> dict[str, int]:
    return {"rx-received": len(rx), "rx-duplicates": len(rx) - len(set(rx)),
            "rx-reordered": sum(1 for a, b in zip(rx, rx[1:]) if b < a), "rx-highest": max(rx) if rx else -1}


@pytest.mark.slow  # 0.3 s or more: out of the one-minute fast subset (CI runs it)
@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 60), max_size=80))
def test_runs_keep_the_arrival_order_exactly_and_the_stats_match_the_plain_list(seqs):
    w = workload(seqs)
    assert expand(w.received_runs()) == seqs
    got = w.stats()
    assert {k: got[k] for k in naive_stats(seqs)} == naive_stats(seqs)


def test_an_in_order_stream_is_one_run():
    w = workload(list(range(100_000)))
    assert w.received_runs() == [[0, 100_000]]
    assert len(gs.encode_guest_state({"w": gs.net_work_to_json(w.save())})) < 100


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=60))
def test_saved_runs_round_trip_exactly_through_the_document(seqs):
    w = workload(seqs)
    st_ = gs.net_work_from_json(gs.decode_guest_state(gs.encode_guest_state({"w": gs.net_work_to_json(w.save())}))["w"])
    w2 = NetWorkload.from_state(st_, driver=None, mac=MAC, peer_mac=PEER)  # type: ignore[arg-type]
    assert w2.save() == w.save()


def test_a_run_with_a_negative_first_number_is_refused():
    with pytest.raises(GuestStateError, match=r"received\[1\]"):
        NetWorkload.from_state(NetWorkloadState(5, ((0, 3), (-1, 2)), 0, 200.0), driver=None, mac=MAC, peer_mac=PEER)  # type: ignore[arg-type]


def test_a_run_of_zero_frames_is_refused():
    with pytest.raises(GuestStateError, match=r"received\[0\]"):
        NetWorkload.from_state(NetWorkloadState(5, ((4, 0),), 0, 200.0), driver=None, mac=MAC, peer_mac=PEER)  # type: ignore[arg-type]


def test_a_run_that_is_not_a_pair_is_refused_by_the_document():
    with pytest.raises(GuestStateError, match=r"received\[0\]"):
        gs.net_work_from_json({"next_seq": 1, "received": [[1, 2, 3]], "other": 0, "rate": 1.0})


# ---------------------------------------------------------------------------- the network check
T0 = 1_000.0  # the peer's clock: frame q sent at T0 + q / 100


def peer_report(n: int) -> dict:
    return {"sent": [(q, T0 + q / 100) for q in range(n)], "received": list(range(n)),
            "received-times": [T0 + q / 100 for q in range(n)]}


def check(runs, window=(T0 + 2.0, T0 + 2.05), n=1000):
    return check_network(peer_report(n), {"received": runs, "tx-sent": n}, window, until=T0 + n / 100)


def test_loss_inside_the_window_passes():
    # frames 190..214 (1.90 .. 2.14 s) lost: inside the window and its slack
    assert WINDOW_SLACK >= 0.1
    r = check([[0, 190], [215, 785]])
    assert r["passed"], r
    assert r["peer-to-vm"]["lost"] == 25


def test_negative_control_loss_before_the_window_is_caught_and_placed():
    r = check([[0, 100], [120, 880]])  # 1.00 .. 1.19 s: more than the slack before the window
    assert not r["passed"]
    assert "20 frames from the peer lost outside the switch-over window (20 sent" in r["problems"][0]
    assert "before it opened" in r["problems"][0]


def test_negative_control_loss_after_the_window_is_caught_and_placed():
    r = check([[0, 500], [510, 490]])
    assert not r["passed"] and "after it closed" in r["problems"][0]


def test_negative_control_a_duplicate_is_caught():
    r = check([[0, 500], [499, 501]])
    assert not r["passed"] and r["peer-to-vm"]["duplicates"] == 1
    assert "arrived twice" in r["problems"][0]


def test_a_hostile_giant_run_is_judged_without_expanding_it():
    r = check([[0, 1 << 60], [5, 1 << 59]])  # (expanded, this would never finish)
    assert r["peer-to-vm"]["duplicates"] == 1 << 59 and not r["passed"]


def test_loss_until_the_switch_learns_the_new_port_passes_and_is_reported():
    """The switch moved the VM's MAC to the destination's port 1.2 s after RESUME (2.05 s): the
    peer's frames went to the source's port until then.  Loss up to that move (+ slack) is the
    switch-over's; the move is reported."""
    r = check_network(peer_report(1000), {"received": [[0, 190], [360, 640]], "tx-sent": 1000},
                      (T0 + 2.0, T0 + 2.05), until=T0 + 10, moved_at=[T0 + 3.25])
    assert r["passed"], r
    assert r["relearn-s"] == pytest.approx(1.2) and r["peer-to-vm"]["lost"] == 170


def test_negative_control_the_same_loss_without_the_move_is_caught():
    """The VM's own frames reached the peer all along (as when the source's, sent before STOP,
    arrive late): without the switch's word the window still ends at RESUME."""
    r = check_network(peer_report(1000), {"received": [[0, 190], [360, 640]], "tx-sent": 1000},
                      (T0 + 2.0, T0 + 2.05), until=T0 + 10)
    assert not r["passed"] and "after it closed" in r["problems"][0] and r["relearn-s"] is None, r


def test_negative_control_loss_after_the_move_is_caught():
    r = check_network(peer_report(1000), {"received": [[0, 190], [360, 440], [810, 190]], "tx-sent": 1000},
                      (T0 + 2.0, T0 + 2.05), until=T0 + 10, moved_at=[T0 + 3.25])
    assert not r["passed"] and "after it closed" in r["problems"][0], r


def test_negative_control_moves_outside_the_migration_do_not_widen_the_window():
    """A move before STOP (another VM, an earlier migration) or later than RESUME + RELEARN_MAX."""
    for t in (T0 + 1.0, T0 + 2.05 + RELEARN_MAX + 0.5):
        r = check_network(peer_report(1000), {"received": [[0, 190], [360, 640]], "tx-sent": 1000},
                          (T0 + 2.0, T0 + 2.05), until=T0 + 10, moved_at=[t])
        assert not r["passed"] and r["relearn-s"] is None, (t, r)
