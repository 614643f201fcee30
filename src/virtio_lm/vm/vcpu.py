"""The VM's vCPU workload: QEMU migration-test style page sweeps.

The vCPU increments the first byte of every page of its region, page after
page, sweep after sweep.  Its whole state is ``(sweeps, position)``: with a
region that started all zero, page ``i`` of the region holds
``sweeps + 1`` (mod 256) if ``i < position`` and ``sweeps`` otherwise.  That
makes verification exact: after a migration the destination's memory must
match the migrated vCPU state byte for byte -- a page whose last increment
was not migrated shows the value of an earlier sweep.

Stores go through the CPU's memory port (``Memory.cpu``), so the
hypervisor-style dirty log sees every page the vCPU writes.  The rate is set
in dirtied bytes per second; ``throttle`` (auto-converge) takes a percentage
of the vCPU's time away, as QEMU's cpu-throttle does.
"""

from __future__ import annotations

import threading

import numpy as np

from virtio_lm.errors import VirtioLmError
from virtio_lm.memory import PAGE_SHIFT, PAGE_SIZE, Memory
from virtio_lm.vm.worker import GuestThread
from virtio_lm.wire.vcpu import KIND_PAGE_SWEEP, VCPU_MAGIC, VCPU_VERSION, VcpuState

CHUNK_PAGES = 256  # pages per store burst (1 MiB of address space)


class SweepMismatchError(VirtioLmError):
    """Guest memory does not match the vCPU's state: a page lost its latest store."""

    def __init__(self, bad_pages: np.ndarray, expected: np.ndarray, found: np.ndarray, region_start: int) -> None:
        self.bad_pages = bad_pages
        n = len(bad_pages)
        first = ", ".join(
            f"page {int(p) + (region_start >> PAGE_SHIFT)}: expected {int(e)} found {int(f)}"
            for p, e, f in zip(bad_pages[:5], expected[:5], found[:5])
        )
        super().__init__(f"{n} page(s) do not match the vCPU state ({first}{', ...' if n > 5 else ''})")


class SweepVcpu(GuestThread):
    """One vCPU sweeping ``[region_start, region_start + region_pages * 4096)``."""

    def __init__(
        self,
        memory: Memory,
        region_start: int,
        region_pages: int,
        *,
        dirty_rate: float = 0.0,
        state: VcpuState | None = None,
    ) -> None:
        if region_start % PAGE_SIZE or region_pages <= 0:
            raise ValueError("the sweep region must be page aligned and non-empty")
        memory.check(region_start, region_pages * PAGE_SIZE)
        super().__init__()
        self.name = "vcpu0"
        self.memory = memory
        self.region_start = region_start
        self.region_pages = region_pages
        self.dirty_rate = dirty_rate  # bytes of pages dirtied per second; 0 = none, inf = as fast as it can
        self.sweeps = 0
        self.position = 0
        self.throttle = 0
        if state is not None:
            self._load(state)
        self._lock = threading.Lock()
        self.pages_written = 0
        self._last_n = 0

    # ------------------------------------------------------------------ state
    def save(self) -> VcpuState:
        with self._lock:
            return VcpuState(
                VCPU_MAGIC, VCPU_VERSION, KIND_PAGE_SWEEP, self.region_start, self.region_pages,
                self.sweeps, self.position, self.throttle,
            )

    def _load(self, st: VcpuState) -> None:
        if (st.region_start, st.region_pages) != (self.region_start, self.region_pages):
            raise ValueError(
                f"vCPU state for region {st.region_start:#x}+{st.region_pages} pages does not fit "
                f"region {self.region_start:#x}+{self.region_pages}"
            )
        self.sweeps, self.position, self.throttle = st.sweeps, st.position, st.throttle

    @classmethod
    def from_state(cls, st: VcpuState, *, memory: Memory, dirty_rate: float = 0.0) -> "SweepVcpu":
        """The vCPU continuing ``st`` on ``memory``.  The state's own layout keeps its position
        inside its region (:class:`VcpuState` refuses one outside); the region must be page
        aligned and inside the memory (ValueError otherwise)."""
        return cls(memory, st.region_start, st.region_pages, dirty_rate=dirty_rate, state=st)

    def expected(self) -> np.ndarray:
        """The first byte every region page must hold now (uint8 array)."""
        with self._lock:
            exp = np.full(self.region_pages, self.sweeps & 0xFF, dtype=np.uint8)
            exp[: self.position] = (self.sweeps + 1) & 0xFF
        return exp

    def verify(self) -> None:
        """Raise :class:`SweepMismatchError` unless memory matches the vCPU state exactly."""
        found = self.memory.array[self.region_start : self.region_start + self.region_pages * PAGE_SIZE : PAGE_SIZE].copy()
        exp = self.expected()
        bad = np.flatnonzero(found != exp)
        if len(bad):
            raise SweepMismatchError(bad, exp[bad], found[bad], self.region_start)

    # ------------------------------------------------------------------ running
    def step(self, max_pages: int = CHUNK_PAGES) -> int:
        """Increment the next ``max_pages`` pages (stopping at the sweep's end); returns pages written."""
        with self._lock:
            n = min(max_pages, self.region_pages - self.position)
            addr = self.region_start + self.position * PAGE_SIZE
            with self.memory.cpu.modify(addr, n * PAGE_SIZE) as view:
                firsts = view[::PAGE_SIZE]
                firsts += np.uint8(1)
            self.position += n
            if self.position == self.region_pages:
                self.sweeps += 1
                self.position = 0
            self.pages_written += n
            return n

    def set_throttle(self, percent: int) -> None:
        if not 0 <= percent <= 99:
            raise ValueError("throttle is 0..99 percent")
        with self._lock:
            self.throttle = percent

    def _tick(self) -> bool:
        if self.dirty_rate == 0:  # an idle guest: no stores at all
            return False
        self._last_n = self.step()
        return True

    def _pace(self, did: bool, busy: float) -> None:
        if not did:
            self._pausing.wait(0.01)
            return
        # rate limit: n pages should take n*4096/rate seconds; throttle takes a share of the time
        target = (self._last_n * PAGE_SIZE / self.dirty_rate) if self.dirty_rate > 0 else 0.0
        thr = self.throttle
        if thr:
            target = max(target, busy) / (1 - thr / 100.0)
        delay = target - busy
        if delay > 0:
            self._pausing.wait(delay)  # returns at once when pause() or close() is called
