"""A guest thread: the loop every piece of guest software (vCPU, workloads) runs in.

``start()`` runs (or resumes) it, ``pause()`` parks it at a step boundary and
waits until it is parked -- how a VM stops for the switch-over -- and
``close()`` ends it.  A subclass says what one step is (:meth:`GuestThread._tick`)
and how to wait between steps (:meth:`GuestThread._pace`); any wait should be
on :attr:`GuestThread._pausing`, which ``pause()`` and ``close()`` set, so a
pause is never held up by a rate limit.  An exception in a step ends the
thread and is kept in :attr:`GuestThread.crash` for the VM's verification.

A guest thread runs on an OS thread taken from :data:`THREADS`, a pool of
parked threads: starting a Python thread waits until the new thread has run
(two hand-offs of the interpreter lock; milliseconds on a busy host), which a
destination would otherwise pay for every guest thread inside the downtime.
A host warms the pool (:meth:`ThreadPool.warm`) before a migration arrives;
a guest thread that ends gives its OS thread back.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable

from virtio_lm.errors import VirtioLmError


_Job = tuple[Callable[[], None], str, Callable[[], None]]


class ThreadPool:
    """Parked OS threads that run one function each, then park again (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[queue.SimpleQueue[_Job | None]] = []
        self.created = 0

    def warm(self, n: int) -> None:
        """Have at least ``n`` threads parked (creating them now, outside any downtime)."""
        with self._lock:
            missing = n - len(self._idle)
        for _ in range(missing):
            inbox: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
            t = threading.Thread(target=self._serve, args=(inbox,), name="guest-pool", daemon=True)
            t.start()
            with self._lock:
                self._idle.append(inbox)
                self.created += 1

    def idle(self) -> int:
        with self._lock:
            return len(self._idle)

    def run(self, fn: Callable[[], None], name: str, done: Callable[[], None]) -> None:
        """Run ``fn`` on a parked thread (without waiting for it), or on a new one; ``done``
        is called after ``fn`` returned and the thread is parked again."""
        with self._lock:
            inbox = self._idle.pop() if self._idle else None
        if inbox is None:
            self.warm(1)
            with self._lock:
                inbox = self._idle.pop()
        inbox.put((fn, name, done))

    def _serve(self, inbox: "queue.SimpleQueue[_Job | None]") -> None:
        me = threading.current_thread()
        while True:
            job = inbox.get()
            if job is None:
                return
            fn, me.name, done = job
            try:
                fn()
            finally:
                me.name = "guest-pool"
                with self._lock:
                    self._idle.append(inbox)
                done()


#: the process's pool of guest OS threads
THREADS = ThreadPool()


class GuestThread:
    name = "guest"

    def __init__(self) -> None:
        self._run = threading.Event()
        self._pausing = threading.Event()
        self._parked = threading.Event()
        self._parked.set()
        self._stop = False
        self._started = False  # an OS thread runs (or is about to run) _loop
        self._done = threading.Event()  # _loop returned
        self.crash: BaseException | None = None

    # ------------------------------------------------------------------ subclass hooks
    def _tick(self) -> bool:
        """One step; whether it did anything."""
        raise NotImplementedError

    def _pace(self, did: bool, busy: float) -> None:
        """Wait before the next step (``busy``: seconds the step took)."""
        if not did:
            self._pausing.wait(0.001)

    def _wake(self) -> None:
        """Cut short a wait that is not on :attr:`_pausing` (called by pause and close)."""

    # ------------------------------------------------------------------ control
    @property
    def running(self) -> bool:
        return self._run.is_set()

    def prepare(self) -> None:
        """Put the loop on an OS thread of the pool, parked (a VM about to resume on a
        destination: its resume is then a matter of setting an event)."""
        if not self._started:
            self._stop = False
            self._done.clear()
            self._started = True
            THREADS.run(self._loop, self.name, self._done.set)

    def start(self) -> None:
        """Start, or resume after :meth:`pause`."""
        self.prepare()
        self._parked.clear()
        self._pausing.clear()
        self._run.set()

    def pause(self, timeout: float = 10.0) -> None:
        """Stop at the next step boundary and wait until parked."""
        self.request_pause()
        self.wait_parked(timeout)

    def request_pause(self) -> None:
        """Ask the loop to stop at its next step boundary (without waiting: several guest
        threads are asked first and then waited for, so their parking overlaps)."""
        self._run.clear()
        self._pausing.set()
        self._wake()

    def wait_parked(self, timeout: float = 10.0) -> None:
        """Wait until the loop asked to pause is parked."""
        if self._started and not self._parked.wait(timeout):
            raise VirtioLmError(f"{self.name} did not park in time")

    def wait_ended(self, timeout: float | None = None) -> bool:
        """Whether the loop has returned (waiting up to ``timeout``)."""
        return self._done.wait(timeout)

    def close(self, *, wait: bool = True) -> None:
        """End the loop.  ``wait=False``: a parked loop is not waited for -- it returns
        at its wake-up without another step (a destination replacing its shell's guest
        threads inside the downtime need not wait for each old thread to be scheduled);
        a loop that is not parked is always waited for."""
        parked = self._parked.is_set() and not self._run.is_set()
        self._stop = True
        self._pausing.set()
        self._wake()
        self._run.set()
        if self._started:
            if (wait or not parked) and not self._done.wait(timeout=10):
                raise VirtioLmError(f"{self.name} did not end in time")
            self._started = False

    def _loop(self) -> None:
        try:
            while True:
                if not self._run.is_set():
                    self._parked.set()
                    self._run.wait()
                    if self._stop:
                        return
                    self._parked.clear()
                if self._stop:
                    return
                t0 = time.perf_counter()
                did = self._tick()
                self._pace(did, time.perf_counter() - t0)
        except BaseException as exc:  # kept for the VM's verification report
            self.crash = exc
            self._parked.set()
