"""``wait_for_last_frame``: the end of a run's network check (demo and e2e tests) waits, bounded
by a host-side deadline, until the VM has the peer's last frame before it stops the VM."""

from __future__ import annotations

import time

from virtio_lm.demo import wait_for_last_frame


class FakeMonitor:
    """``query-vms`` answers whose ``rx-highest`` climbs by one per call from ``start``."""

    def __init__(self, start: int, *, name: str = "vm0", others: tuple[str, ...] = ()) -> None:
        self.rx = start
        self.name = name
        self.others = others
        self.calls = 0

    def cmd(self, command: str, **kw: object) -> list[dict]:
        assert command == "query-vms" and not kw
        self.calls += 1
        self.rx += 1
        return [{"name": n, "net": {"rx-highest": 10**6}} for n in self.others] + [
            {"name": self.name, "net": {"rx-highest": self.rx}}
        ]


def test_returns_once_the_last_frame_is_in():
    m = FakeMonitor(0)
    assert wait_for_last_frame(m, 5, 30.0, poll=0.001)
    assert m.rx == 5 and m.calls == 5  # polled until it arrived, not a call more


def test_already_in_returns_at_once():
    m = FakeMonitor(41)
    assert wait_for_last_frame(m, 7, 30.0, poll=0.001) and m.calls == 1


def test_a_frame_that_never_comes_ends_at_the_deadline():
    class Stalled(FakeMonitor):
        def cmd(self, command: str, **kw: object) -> list[dict]:
            self.calls += 1
            return [{"name": "vm0", "net": {"rx-highest": 3}}]

    m = Stalled(3)
    t = time.monotonic()
    assert not wait_for_last_frame(m, 4, 0.2, poll=0.01)
    assert time.monotonic() - t >= 0.2 and m.calls >= 2


def test_a_vm_without_net_stats_never_counts_as_drained():
    class NoNet(FakeMonitor):
        def cmd(self, command: str, **kw: object) -> list[dict]:
            return [{"name": "vm0"}]

    assert not wait_for_last_frame(NoNet(0), 0, 0.05, poll=0.01)


def test_the_named_vm_is_the_one_judged():
    """Negative control for the name filter: another VM far ahead does not end the wait."""
    m = FakeMonitor(0, name="b", others=("a",))
    assert wait_for_last_frame(m, 3, 30.0, vm="b", poll=0.001) and m.calls == 3
    m = FakeMonitor(0, name="b", others=("a",))
    assert wait_for_last_frame(m, 3, 30.0, vm="a", poll=0.001) and m.calls == 1


def test_nothing_sent_needs_no_wait():
    m = FakeMonitor(-2)
    assert wait_for_last_frame(m, -1, 30.0, poll=0.001) and m.calls == 1
