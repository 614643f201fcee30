"""How a serving command ends on SIGTERM / SIGINT (``virtio_lm.cli._stop_on_signals``)."""

from __future__ import annotations

import signal

import pytest

from virtio_lm import cli


@pytest.fixture
def handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def test_a_signal_while_the_main_thread_holds_the_events_lock_does_not_hang(handlers) -> None:
    """A handler runs on the main thread between two bytecodes -- also inside ``done.wait``,
    while the wait holds the event's lock.  Ours sets the event from a new thread, so it
    returns at once and the event is set as soon as the lock is free."""
    called = []
    done = cli._stop_on_signals(lambda: called.append(1))
    handler = signal.getsignal(signal.SIGTERM)
    with done._cond:  # where the main thread is, inside Event.wait, when the signal comes
        assert not done._cond.acquire(timeout=0.05)  # negative control: a handler calling
        # done.set() here would wait for this lock -- held by its own thread -- forever
        handler(signal.SIGTERM, None)  # returns: nothing here waits for the lock
    assert done.wait(5) and called == [1]
