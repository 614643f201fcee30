"""The vCPU page-sweep workload: exact verification, migration of its state, throttling."""

from __future__ import annotations

import time

import numpy as np
import pytest

from virtio_lm.errors import FieldValueError, ShortBufferError
from virtio_lm.memory import PAGE_SIZE, Memory
from virtio_lm.vm.vcpu import SweepMismatchError, SweepVcpu
from virtio_lm.wire.vcpu import VcpuState

PAGES = 64


@pytest.fixture
def mem():
    m = Memory(128 * PAGE_SIZE)
    yield m
    m.close()


def test_steps_follow_the_state(mem):
    cpu = SweepVcpu(mem, 64 * PAGE_SIZE, PAGES)
    cpu.step(10)
    cpu.verify()
    assert (cpu.sweeps, cpu.position) == (0, 10)
    done = 10 + sum(cpu.step(25) for _ in range(7))
    cpu.verify()
    assert cpu.sweeps * PAGES + cpu.position == done == cpu.pages_written


def test_wraps_past_255_sweeps(mem):
    cpu = SweepVcpu(mem, 64 * PAGE_SIZE, 4)
    for _ in range(300):
        cpu.step()
    cpu.verify()
    assert cpu.sweeps == 300 and mem.read(64 * PAGE_SIZE, 1) == bytes([300 & 0xFF])


def test_cpu_dirty_log_sees_every_store(mem):
    mem.cpu.writer.log.start()
    cpu = SweepVcpu(mem, 64 * PAGE_SIZE, PAGES)
    cpu.step(5)
    assert set(np.flatnonzero(mem.cpu.writer.log.collect())) == set(range(64, 69))


def test_verify_catches_a_stale_page(mem):
    """Negative control: a page that missed its latest store is reported by number."""
    cpu = SweepVcpu(mem, 64 * PAGE_SIZE, PAGES)
    cpu.step(30)
    mem.cpu.write(64 * PAGE_SIZE + 7 * PAGE_SIZE, b"\x00")  # page 71 loses its increment
    with pytest.raises(SweepMismatchError) as e:
        cpu.verify()
    assert list(e.value.bad_pages) == [7] and "page 71" in str(e.value)


def test_state_migrates_to_another_memory(mem):
    src = SweepVcpu(mem, 64 * PAGE_SIZE, PAGES)
    for _ in range(5):
        src.step(17)
    blob = src.save().encode()
    with Memory(128 * PAGE_SIZE) as dst_mem:
        dst_mem.cpu.write(0, mem.read(0, mem.size))
        dst = SweepVcpu.from_state(VcpuState.decode(blob), memory=dst_mem)
        dst.verify()
        dst.step(40)
        dst.verify()
        # and a destination that missed the memory copy is caught
        with Memory(128 * PAGE_SIZE) as empty:
            with pytest.raises(SweepMismatchError):
                SweepVcpu.from_state(VcpuState.decode(blob), memory=empty).verify()


def test_thread_runs_pauses_and_resumes(mem):
    cpu = SweepVcpu(mem, 64 * PAGE_SIZE, PAGES, dirty_rate=50e6)
    cpu.start()
    time.sleep(0.05)
    cpu.pause()
    cpu.verify()
    written = cpu.pages_written
    time.sleep(0.02)
    assert cpu.pages_written == written  # parked: no store while paused
    cpu.start()
    deadline = time.time() + 5
    while cpu.pages_written == written and time.time() < deadline:
        time.sleep(0.005)
    cpu.pause()
    cpu.close()
    assert cpu.pages_written > written
    cpu.verify()


def test_throttle_bounds():
    with Memory(8 * PAGE_SIZE) as m:
        cpu = SweepVcpu(m, 0, 8)
        cpu.set_throttle(99)
        assert cpu.save().throttle == 99
        with pytest.raises(ValueError):
            cpu.set_throttle(100)


def test_state_decoding_is_strict():
    good = VcpuState(0x55504356, 1, 1, 4096, 10, 3, 4, 0).encode()
    assert VcpuState.decode(good).position == 4
    with pytest.raises(ShortBufferError):
        VcpuState.decode(good[:-1])
    bad = bytearray(good)
    bad[0] = 0
    with pytest.raises(FieldValueError):
        VcpuState.decode(bytes(bad))
    with pytest.raises(FieldValueError):
        VcpuState(0x55504356, 1, 1, 4096, 10, 3, 11, 0)  # position past the region


def test_state_for_another_region_refused(mem):
    blob = SweepVcpu(mem, 64 * PAGE_SIZE, PAGES).save().encode()
    with pytest.raises(ValueError):
        SweepVcpu(mem, 0, PAGES, state=VcpuState.decode(blob))


@pytest.mark.slow  # over 0.4 s: out of the one-minute fast subset (CI runs it)
def test_guest_threads_reuse_the_pools_parked_os_threads():
    """prepare/close cycles take OS threads from the pool and give them back: no thread
    is created inside them once the pool is warm, and a crashed loop returns its thread."""
    from virtio_lm.vm.worker import THREADS, GuestThread

    class Ticker(GuestThread):
        name = "ticker"

        def __init__(self, fail: bool = False) -> None:
            super().__init__()
            self.ticks = 0
            self.fail = fail
            self.seen_name = ""

        def _tick(self) -> bool:
            import threading as _t

            self.seen_name = _t.current_thread().name
            self.ticks += 1
            if self.fail:
                raise RuntimeError("boom")
            return True

    THREADS.warm(4)
    created = THREADS.created
    for _ in range(20):
        ws = [Ticker(), Ticker(), Ticker(fail=True)]
        for w in ws:
            w.prepare()
        for w in ws:
            w.start()
        deadline = time.monotonic() + 30
        while any(w.ticks == 0 for w in ws) and time.monotonic() < deadline:
            time.sleep(0.001)
        for w in ws[:2]:
            w.pause()
        assert all(w.ticks > 0 for w in ws) and ws[0].seen_name == "ticker"
        for w in ws:
            w.close()
        assert isinstance(ws[2].crash, RuntimeError)
    assert THREADS.created == created  # every cycle ran on threads parked before it



def test_closing_a_parked_guest_thread_without_waiting_runs_no_further_step():
    """close(wait=False) on a paused loop returns at once; the loop ends at its wake-up
    without another step.  A loop that is not parked is waited for all the same."""
    import threading

    from virtio_lm.vm.worker import GuestThread

    class Gate(GuestThread):
        name = "gate"

        def __init__(self) -> None:
            super().__init__()
            self.ticks = 0
            self.release = threading.Event()

        def _tick(self) -> bool:
            self.ticks += 1
            self.release.wait(30)  # a long step the test controls
            return True

    w = Gate()
    w.start()
    w.release.set()
    w.pause()
    ticks = w.ticks
    w.close(wait=False)
    assert w.wait_ended(30)  # it ended on its own ...
    assert w.ticks == ticks  # ... without another step

    busy = Gate()
    busy.start()
    deadline = time.monotonic() + 30
    while busy.ticks == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    threading.Timer(0.05, busy.release.set).start()
    busy.close(wait=False)  # mid-step: waited for
    assert busy.wait_ended(0)
