"""A guest thread: the loop every piece of guest software (vCPU, workloads) runs in.

``start()`` runs (or resumes) it, ``pause()`` parks it at a step boundary and
waits until it is parked -- how a VM stops for the switch-over -- and
``close()`` ends it.  A subclass says what one step is (:meth:`GuestThread._tick`)
and how to wait between steps (:meth:`GuestThread._pace`); any wait should be
on :attr:`GuestThread._pausing`, which ``pause()`` and ``close()`` set, so a
pause is never held up by a rate limit.  An exception in a step ends the
thread and is kept in :attr:`GuestThread.crash` for the VM's verification.
"""

from __future__ import annotations

import threading
import time

from virtio_lm.errors import VirtioLmError


class GuestThread:
    name = "guest"

    def __init__(self) -> None:
        self._run = threading.Event()
        self._pausing = threading.Event()
        self._parked = threading.Event()
        self._parked.set()
        self._stop = False
        self._thread: threading.Thread | None = None
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
        """Create the thread, parked (a VM about to resume on a destination: its resume is
        then a matter of setting an event, not of starting threads inside the downtime)."""
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()

    def start(self) -> None:
        """Start, or resume after :meth:`pause`."""
        self.prepare()
        self._parked.clear()
        self._pausing.clear()
        self._run.set()

    def pause(self, timeout: float = 10.0) -> None:
        """Stop at the next step boundary and wait until parked."""
        self._run.clear()
        self._pausing.set()
        self._wake()
        if self._thread is not None and not self._parked.wait(timeout):
            raise VirtioLmError(f"{self.name} did not park in time")

    def close(self) -> None:
        self._stop = True
        self._pausing.set()
        self._wake()
        self._run.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

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
