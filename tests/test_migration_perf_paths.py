"""The fast paths of the migration: zero-copy receive into reused section buffers,
the learned switch-over cost in the policy, and SwitchoverHistory.

A small fake-clock link drives both sessions; the destination takes its bytes
through ``recv_buffer()`` / ``received(n)`` in chunks of random sizes.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from virtio_lm.errors import NotConvergingError, StreamChecksumError
from fakes import MemoryVm, MemoryVmShell
from virtio_lm.migration.policy import Decision, MigrationParams, Policy
from virtio_lm.migration.session import DestSession, SourceSession, SwitchoverHistory
from virtio_lm.wire.stream import (
    Direction,
    Hello,
    RamPages,
    StreamConfig,
    StreamDecoder,
    StreamEncoder,
    decode_all,
)

MEM = 4 << 20
RATE = 200e6  # bytes per second of the fake link


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def pump(vm, shell, *, params=None, history=None, seed=0, flip_at: int | None = None, clock=None):
    """Run a migration; the destination receives zero-copy in random-sized pieces."""
    clock = clock or Clock()
    src = SourceSession(vm, params, clock=clock, history=history)
    dst = DestSession(shell, clock=clock, history=history)
    rng = random.Random(seed)
    sent = 0
    src.start()
    for _ in range(100000):
        moved = False
        if src.wants_to_send:
            data = bytearray(b"".join(bytes(c) for c in src.produce(256 << 10)))
            if data:
                moved = True
                if flip_at is not None and sent <= flip_at < sent + len(data):
                    data[flip_at - sent] ^= 0x40
                sent += len(data)
                dt = len(data) / RATE
                clock.t += dt
                vm.run(dt)
                src.on_sent(len(data))
                view, i = memoryview(data), 0
                while i < len(view) and not dst.finished:
                    buf = dst.recv_buffer()
                    k = min(len(buf), len(view) - i, rng.choice((1, 7, 12, 100, 4096, 1 << 20)))
                    buf[:k] = view[i : i + k]
                    dst.received(k)
                    i += k
        back = b"".join(dst.produce())
        if back:
            moved = True
            clock.t += 0.0002
            src.receive(back)
        if src.finished and not src.wants_to_send and not dst.wants_to_send:
            return src, dst
        if not moved:
            clock.t += 0.001
            vm.run(0.001)
    raise AssertionError("the migration did not end")


def test_zero_copy_receive_moves_a_dirtying_vm_exactly():
    vm = MemoryVm(MEM, fill="random", dirty_rate=20000, device_rate=500, seed=3)
    shell = MemoryVmShell(MEM)
    src, dst = pump(vm, shell, params=MigrationParams(downtime_limit_ms=50))
    assert src.status == "completed" and dst.status == "completed", (src.error, dst.error)
    assert np.array_equal(vm.mem, shell.mem) and vm.sweep_consistent(shell.mem)
    assert shell.vf_requests == {vf.config.index: vf.requests for vf in vm.vfs}


def test_zero_copy_receive_refuses_a_flipped_bit_and_the_source_rolls_back():
    vm = MemoryVm(MEM, fill="random", seed=4)
    shell = MemoryVmShell(MEM)
    src, dst = pump(vm, shell, flip_at=300_000)
    assert dst.status == "failed" and isinstance(dst.error, StreamChecksumError)
    assert src.status == "failed" and src.vm_state == "running" and vm.resumed_cleanly
    assert shell.aborted and not shell.running


def test_negative_control_without_the_flip_the_same_migration_completes():
    vm = MemoryVm(MEM, fill="random", seed=4)
    src, dst = pump(vm, MemoryVmShell(MEM))
    assert src.status == dst.status == "completed"


def test_received_more_than_the_buffer_had_room_for_is_refused():
    dec = StreamDecoder()
    buf = dec.recv_buffer()
    assert len(buf) == 12  # a header first
    with pytest.raises(ValueError):
        dec.received(13)


def test_reused_buffer_decodes_like_fresh_buffers_in_any_pieces():
    cfg = StreamConfig(16 * 4096)
    enc = StreamEncoder()
    rng = np.random.default_rng(1)
    stream = enc.encode(Hello(cfg))
    pages = [np.array([i, i + 1], dtype=np.uint64) for i in range(0, 14, 2)]
    datas = [rng.integers(0, 256, 2 * 4096, dtype=np.uint8).tobytes() for _ in pages]
    for p, d in zip(pages, datas):
        stream += enc.encode(RamPages(p, d))
    want = decode_all(stream)
    dec = StreamDecoder(Direction.TO_DEST, reuse_buffers=True)
    got, i = [], 0
    r = random.Random(2)
    while i < len(stream):
        buf = dec.recv_buffer()
        k = min(len(buf), len(stream) - i, r.randint(1, 9000))
        buf[:k] = stream[i : i + k]
        i += k
        for sec in dec.received(k):  # apply at once, as the destination does
            got.append((sec.type, sec.seq, bytes(sec.body.data) if isinstance(sec.body, RamPages) else None))
    assert got == [(s.type, s.seq, bytes(s.body.data) if isinstance(s.body, RamPages) else None) for s in want]


# ---------------------------------------------------------------------- policy with a fixed cost
def _policy(limit_ms: int, fixed: float) -> Policy:
    p = Policy(MigrationParams(downtime_limit_ms=limit_ms), 4096, 4104)
    p.fixed_cost_s = fixed
    p.begin(0.0)
    p.record_sent(10_000_000)
    p.record_delivered(1.0, 10_000_000, 1.0)
    return p


def test_expected_downtime_adds_the_fixed_cost():
    r = _policy(100, 0.04).end_round(1.0, 1000)
    assert math.isclose(r.expected_downtime_s, 0.04 + 1000 * 4104 / 1e7)


def test_fixed_cost_narrows_what_fits():
    # 100 ms at 10 MB/s = ~243 pages; with 40 ms fixed only ~146 fit
    assert _policy(100, 0.0).end_round(1.0, 200).decision is Decision.SWITCH
    assert _policy(100, 0.04).end_round(1.0, 200).decision is not Decision.SWITCH
    assert _policy(100, 0.04).end_round(1.0, 140).decision is Decision.SWITCH


def test_fixed_cost_above_the_limit_gives_up_at_once():
    assert _policy(30, 0.05).end_round(1.0, 0).decision is Decision.GIVE_UP
    assert _policy(60, 0.05).end_round(1.0, 0).decision is Decision.SWITCH  # negative control


# ---------------------------------------------------------------------- history
def test_history_is_per_kind_of_vm_and_averages():
    h = SwitchoverHistory(weight=0.5)
    a = StreamConfig(MEM, workload="w")
    b = StreamConfig(MEM, workload="other")
    assert h.get(a) is None
    h.record(a, 0.02)
    h.record(a, 0.04)
    assert math.isclose(h.get(a), 0.03) and h.get(b) is None
    h.record(a, float("nan"))
    h.record(a, -1.0)
    assert math.isclose(h.get(a), 0.03)


def test_sessions_learn_the_cost_and_the_next_migration_uses_it():
    h = SwitchoverHistory()
    vm = MemoryVm(MEM, fill="half", seed=5)
    src, dst = pump(vm, MemoryVmShell(MEM), history=h)
    assert src.status == "completed" and src.fixed_cost_estimate is None
    learned = h.get(vm.config())
    assert learned is not None and learned >= 0 and dst.switchover_cost is not None
    vm2 = MemoryVm(MEM, fill="half", seed=6)
    src2, _ = pump(vm2, MemoryVmShell(MEM), history=h)
    assert src2.status == "completed" and src2.fixed_cost_estimate == learned
    assert src2.policy is not None and src2.policy.fixed_cost_s == learned
    assert "x-switchover-cost-estimate" in src2.info()


def test_destination_learns_the_source_part_from_complete():
    """COMPLETE carries the source's pause..save time; the destination adds it to what it saw."""
    clock = Clock()

    class SlowFreeze(MemoryVm):
        def freeze_and_save_vfs(self):
            clock.t += 0.025  # 25 ms of FREEZE + SAVE_STATE on the source
            return super().freeze_and_save_vfs()

    h = SwitchoverHistory()
    vm = SlowFreeze(MEM, fill="half", seed=8)
    src, dst = pump(vm, MemoryVmShell(MEM), history=h, clock=clock)
    assert src.status == "completed"
    source_part = src._t["send"] - src._t["pause"]
    assert source_part >= 0.025 - 1e-9
    assert dst._source_fixed_s is not None and abs(dst._source_fixed_s - source_part) < 1e-5
    assert dst.switchover_cost is not None and dst.switchover_cost >= source_part
    assert h.get(vm.config()) >= 0.025 - 1e-6


def test_learned_cost_above_the_limit_fails_cleanly_and_the_vm_runs_on():
    h = SwitchoverHistory()
    vm = MemoryVm(MEM, fill="half", seed=7)
    h.record(vm.config(), 0.5)
    shell = MemoryVmShell(MEM)
    src, dst = pump(vm, shell, history=h, params=MigrationParams(downtime_limit_ms=300))
    assert src.status == "failed" and isinstance(src.error, NotConvergingError)
    assert "fixed cost" in str(src.error) and src.vm_state == "running" and vm.resumed_cleanly
    assert not shell.running
