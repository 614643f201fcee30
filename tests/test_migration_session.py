"""Sans-I/O migration sessions over a simulated link with in-memory fake VMs.

Time is a fake clock advanced by the link (bytes / link rate) and by
max-bandwidth waits; the fake VM runs for exactly that time.  No sockets, no
threads, no sleeps.
"""

from __future__ import annotations

import math
import random
from typing import Callable

import numpy as np
import pytest

from virtio_lm.errors import (
    ConfigMismatchError,
    DestinationError,
    MigrationCancelledError,
    MigrationError,
    MigrationStateError,
    NotConvergingError,
    PeerGoneError,
    StateImageError,
    StreamError,
)
from fakes import MemoryVm, MemoryVmShell, default_vfs
from virtio_lm.migration.lease import FileLease
from virtio_lm.migration.policy import Decision, MigrationParams, Policy, TokenBucket
from virtio_lm.migration.session import (
    DEST_TABLE,
    DOWNTIME_PHASES,
    SOURCE_TABLE,
    DestAction,
    DestInput,
    DestPhase,
    DestSession,
    MigrationEvent,
    PassEvent,
    SourceAction,
    SourceInput,
    SourcePhase,
    SourceSession,
    ThrottleEvent,
    VmStateEvent,
)
from virtio_lm.wire.stream import (
    Abort,
    Ack,
    Commit,
    Direction,
    Error,
    ErrorCode,
    Ready,
    Running,
    SectionType,
    StreamDecoder,
    StreamEncoder,
    VfConfig,
    decode_all,
)

MiB = 1 << 20
MEM = 4 * MiB  # 1024 pages
LINK = 100e6  # bytes/s of the simulated link


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Link:
    """Both sessions and the VM on one fake clock; records what crossed the wire."""

    def __init__(self, vm: MemoryVm, shell: MemoryVmShell, *, params: MigrationParams | None = None,
                 rate: float = LINK, chunk: int = 256 * 1024, to_file: bool = False, lease_dir=None) -> None:
        self.clock = FakeClock()
        self.vm = vm
        self.shell = shell
        self.rate = rate
        self.chunk = chunk
        self.src_lease = self.dst_lease = None
        if lease_dir is not None:  # the VM's lease, one file both sides reach (migration/lease.py)
            path = str(lease_dir / "disk.img.lease")
            self.src_lease, self.dst_lease = FileLease(path, "src"), FileLease(path, "dst")
            self.src_lease.acquire()
        self.src = SourceSession(vm, params, clock=self.clock, to_file=to_file, lease=self.src_lease)
        self.dst = DestSession(shell, clock=self.clock, from_file=to_file, lease=self.dst_lease)
        self.to_dst = bytearray()  # every byte the source sent
        self.to_src = bytearray()
        self.sent_log: list[tuple[float, int]] = []  # (time, cumulative bytes handed out)
        self.cut = False
        self.src_events: list = []

    def advance(self, dt: float) -> None:
        self.clock.t += dt
        self.vm.run(dt)

    def run(
        self,
        *,
        hook: Callable[["Link"], bool | None] | None = None,
        tamper_dst: Callable[[bytes, int], bytes | None] | None = None,
        tamper_src: Callable[[bytes, int], bytes | None] | None = None,
        start: bool = True,
        max_steps: int = 200000,
    ) -> "Link":
        """Pump until both sides are done.  ``hook`` runs every step (return True to stop);
        a tamper function returns the bytes to deliver, or None to cut the link there."""
        src = self.src
        if start:
            src.start()
        for _ in range(max_steps):
            if hook is not None and hook(self):
                return self
            if self._step(hook, tamper_dst, tamper_src):
                return self
        raise AssertionError("the migration did not end")

    def _step(self, hook, tamper_dst, tamper_src) -> bool:
        """One exchange; True when the run should end (done, or the hook said stop)."""
        src, dst = self.src, self.dst
        if True:
            moved = False
            if src.wants_to_send and not self.cut:
                wait = src.budget_wait()
                if wait > 0 and not src._out:
                    self.advance(wait)
                    return False
                data = b"".join(bytes(c) for c in src.produce(self.chunk))
                if data:
                    moved = True
                    self.advance(len(data) / self.rate)
                    off = len(self.to_dst)
                    self.to_dst += data
                    self.sent_log.append((self.clock.t, len(self.to_dst)))
                    src.on_sent(len(data))
                    if hook is not None and hook(self):
                        return True
                    deliver = tamper_dst(data, off) if tamper_dst else data
                    if deliver is None:
                        self._cut()
                    else:
                        dst.receive(deliver)
                    if hook is not None and hook(self):
                        return True
            back = b"".join(dst.produce())
            if back and not self.cut:
                moved = True
                off = len(self.to_src)
                self.to_src += back
                deliver = tamper_src(back, off) if tamper_src else back
                if deliver is None:
                    self._cut()
                else:
                    src.receive(deliver)
            self.src_events += src.poll_events()
            if src.finished and not src.wants_to_send and not dst.wants_to_send:
                if not dst.finished and not self.cut:
                    # the source closes its end after the stream (a file: the end of the file)
                    dst.on_peer_closed()
                    return False
                return True
            if not moved:
                if self.cut or (src.waiting_for is None and not src.wants_to_send):
                    return True
                self.advance(0.001)
            return False

    def _cut(self) -> None:
        self.cut = True
        self.src.on_peer_closed(ConnectionResetError("link cut"))
        self.dst.on_peer_closed(ConnectionResetError("link cut"))


def same_memory(vm: MemoryVm, shell: MemoryVmShell) -> bool:
    return bool(np.array_equal(vm.mem, shell.mem))


def migrate(vm: MemoryVm, shell: MemoryVmShell | None = None, **kw) -> Link:
    shell = shell or MemoryVmShell(vm.memory_size)
    return Link(vm, shell, **kw).run()


def assert_completed(link: Link) -> None:
    src, dst, vm, shell = link.src, link.dst, link.vm, link.shell
    assert src.status == "completed", src.error
    assert dst.status == "completed", dst.error
    assert src.vm_state == "postmigrate" and vm.paused and vm.released
    assert shell.running and not shell.aborted
    assert same_memory(vm, shell)
    assert vm.sweep_consistent(shell.mem)
    assert shell.cpu == vm.cpu_state()
    assert shell.vf_requests == {vf.config.index: vf.requests for vf in vm.vfs}


def assert_rolled_back(link: Link, error_type: type[BaseException]) -> None:
    src, vm, shell = link.src, link.vm, link.shell
    assert src.status in ("failed", "cancelled")
    assert isinstance(src.error, error_type), repr(src.error)
    assert src.vm_state == "running"
    assert vm.resumed_cleanly and vm.rollbacks == 1
    assert "release" not in vm.calls
    assert not shell.running
    assert "start" not in shell.calls


def second_migration_succeeds(vm: MemoryVm) -> None:
    vm.run(0.05)  # the VM goes on after the rollback
    assert vm.sweep_consistent()
    link = migrate(vm)
    assert_completed(link)


# ====================================================================== happy paths
def test_idle_vm_migrates_and_dest_memory_matches():
    vm = MemoryVm(MEM, fill="half", seed=1)
    link = migrate(vm)
    order = [c for c in vm.calls if c not in ("read_pages", "collect_dirty", "config")]
    assert_completed(link)
    src = link.src
    # the guest state goes first (the destination rebuilds it while the VFs freeze here)
    assert order == ["start_tracking", "calibrate_switchover", "prepare_switchover", "pause_vcpus", "cpu_state",
                     "quiesce_vfs", "freeze_and_save_vfs", "stop_tracking", "release"]
    assert link.shell.calls == ["check_config", "set_cpu_state", "restore_vfs", "start"]
    info = src.info()
    ram = info["ram"]
    assert ram["total"] == MEM and ram["normal"] == 512 and ram["duplicate"] == 512
    assert ram["transferred"] == len(link.to_dst)
    assert ram["dirty-sync-count"] == 2  # end of round 0 + the final collection
    assert info["status"] == "completed" and info["downtime"] >= 0
    assert set(info["downtime-phases"]) == set(DOWNTIME_PHASES)
    d = src.downtime_phases
    assert math.isclose(sum(d.values()), src.downtime, rel_tol=1e-9, abs_tol=1e-12)
    statuses = [e.status for e in link.src_events if isinstance(e, MigrationEvent)]
    assert statuses == ["setup", "active", "device", "completed"]
    assert [e.state for e in link.src_events if isinstance(e, VmStateEvent)] == ["finish-migrate", "postmigrate"]


def test_guest_state_reaches_the_destination_before_the_vfs_quiesce():
    """The switch-over in two stages: produce() hands out CPU_STATE and returns, so the
    destination rebuilds the guest while the source quiesces and freezes its VFs."""
    vm = MemoryVm(MEM, fill="half", seed=3)
    seen: list[tuple[list[str], list[str]]] = []

    mid: list[bool] = []

    def hook(link: Link) -> None:
        mid.append(link.src.mid_switchover)
        if "set_cpu_state" in link.shell.calls and not seen:
            seen.append((list(link.vm.calls), list(link.shell.calls)))

    link = Link(vm, MemoryVmShell(vm.memory_size)).run(hook=hook)
    assert_completed(link)
    src_calls, dst_calls = seen[0]
    assert "cpu_state" in src_calls and "quiesce_vfs" not in src_calls and "freeze_and_save_vfs" not in src_calls
    assert dst_calls[-1] == "set_cpu_state" and "restore_vfs" not in dst_calls
    assert any(mid) and not mid[-1]  # between the stages for a while, not at the end


def test_dirtying_vm_converges_with_devices_writing():
    vm = MemoryVm(MEM, fill="half", dirty_rate=2000, device_rate=300, seed=2)  # pages/s
    link = migrate(vm, params=MigrationParams(downtime_limit_ms=1))
    assert_completed(link)
    assert len(link.src.rounds) >= 3  # round 0, some dirty rounds, the final one
    passes = [e for e in link.src_events if isinstance(e, PassEvent)]
    assert passes and passes[-1].report.decision is Decision.SWITCH
    assert vm.sweeps >= 0 and vm.cursor > 0


def test_negative_control_unreported_device_dma_is_caught():
    vm = MemoryVm(MEM, fill="half", dirty_rate=2000, device_rate=3000, report_device_dirty=False, seed=3)
    link = migrate(vm)
    assert link.src.status == "completed"
    assert not same_memory(vm, link.shell)  # device writes during pre-copy were never resent


def test_switch_over_rule_pending_fits_bandwidth_times_limit():
    params = MigrationParams(downtime_limit_ms=2)
    vm = MemoryVm(MEM, fill="half", dirty_rate=3000, seed=4)
    link = migrate(vm, params=params)
    assert_completed(link)
    passes = [e.report for e in link.src_events if isinstance(e, PassEvent)]
    for r in passes[:-1]:  # did not fit, or fit on round 0's bandwidth alone with a send > 10 % of the limit
        assert r.pending_bytes > r.bandwidth * 0.002 or (r.provisional and r.pending_bytes > r.bandwidth * 0.0002)
    last = passes[-1]
    assert len(passes) >= 2 and last.decision is Decision.SWITCH
    assert last.pending_bytes <= last.bandwidth * 0.002
    assert link.src.info()["expected-downtime"] <= 2


def test_max_bandwidth_is_honoured():
    rate = 5_000_000
    params = MigrationParams(max_bandwidth=rate)
    vm = MemoryVm(MEM, fill="random", seed=5)
    link = migrate(vm, params=params)
    assert_completed(link)
    burst = link.src.bucket.burst
    biggest = 256 * (4096 + 8) + 64
    for t, total in link.sent_log:
        assert total <= rate * t + burst + biggest
    assert link.clock.t >= (len(link.to_dst) - burst - biggest) / rate
    assert link.src.info()["ram"]["mbps"] <= rate * 8 / 1e6 * 1.05


def test_unlimited_bandwidth_runs_at_link_speed():
    vm = MemoryVm(MEM, fill="random", seed=5)
    link = migrate(vm)
    assert link.clock.t < (len(link.to_dst) / LINK) * 1.01 + 0.01


def test_auto_converge_throttles_a_hot_vm_and_the_migration_ends():
    vm = MemoryVm(MEM, fill="half", dirty_rate=60000, seed=6)  # dirties memory far faster than the link drains it
    link = migrate(vm, params=MigrationParams(downtime_limit_ms=1))
    assert_completed(link)
    steps = [e.percent for e in link.src_events if isinstance(e, ThrottleEvent)]
    assert steps[:2] == [20, 30]
    assert all(b - a == 10 or b == 99 for a, b in zip(steps, steps[1:]))
    assert vm.throttle == steps[-1] and link.src.info()["cpu-throttle-percentage"] == steps[-1]


def test_without_auto_converge_a_hot_vm_gives_up_cleanly_then_retry_succeeds():
    vm = MemoryVm(MEM, fill="half", dirty_rate=60000, seed=7)
    link = migrate(vm, params=MigrationParams(downtime_limit_ms=1, auto_converge=False, max_rounds=6))
    assert_rolled_back(link, NotConvergingError)
    assert link.src.status == "failed" and len(link.src.rounds) == 6
    assert link.shell.aborted  # the destination got ABORT
    vm.dirty_rate = 500
    second_migration_succeeds(vm)


def test_max_time_bound_gives_up():
    vm = MemoryVm(MEM, fill="half", dirty_rate=60000, seed=8)
    link = migrate(vm, params=MigrationParams(downtime_limit_ms=1, auto_converge=False, max_rounds=10**6, max_time_s=0.5))
    assert_rolled_back(link, NotConvergingError)
    assert link.src.t_end is not None and link.src.t_end >= 0.5


# ====================================================================== failures before commit
def test_destination_refuses_config_before_touching_anything():
    vm = MemoryVm(MEM, fill="half")
    shell = MemoryVmShell(2 * MEM)
    link = Link(vm, shell).run()
    assert_rolled_back(link, ConfigMismatchError)
    assert shell.calls == ["check_config"] and not shell.touched
    assert link.dst.status == "failed"
    assert "memory size" in str(link.src.error)
    second_migration_succeeds(vm)


@pytest.mark.parametrize(
    "shell_kw, word",
    [
        ({"workload": "idle"}, "workload"),
        ({"vfs": default_vfs()[:1]}, "VFs"),
        ({"vfs": (VfConfig(1, 1, 1 << 32, 0), default_vfs()[1])}, "device type"),
        ({"vfs": (VfConfig(1, 2, 1 << 32, 0), default_vfs()[1])}, "not offered"),
    ],
)
def test_destination_refuses_each_mismatch(shell_kw, word):
    vm = MemoryVm(MEM)
    link = Link(vm, MemoryVmShell(MEM, **shell_kw)).run()
    assert_rolled_back(link, ConfigMismatchError)
    assert word in str(link.src.error)


def test_destination_refuses_a_state_image_and_source_rolls_back():
    vm = MemoryVm(MEM, fill="half")
    shell = MemoryVmShell(MEM)
    shell.fail["restore_vfs"] = StateImageError("queue[0]", "desc_addr outside memory")
    link = Link(vm, shell).run()
    assert_rolled_back(link, DestinationError)
    assert link.src.error.code is ErrorCode.RESTORE_FAILED
    assert shell.aborted and not shell.running
    second_migration_succeeds(vm)


@pytest.mark.parametrize("method", ["start_tracking", "calibrate_switchover", "read_pages", "prepare_switchover", "pause_vcpus", "quiesce_vfs",
                                    "collect_dirty", "freeze_and_save_vfs", "stop_tracking", "cpu_state"])
def test_a_source_endpoint_failure_rolls_back(method):
    vm = MemoryVm(MEM, fill="half", dirty_rate=500)
    vm.fail[method] = RuntimeError(f"{method} broke")
    link = Link(vm, MemoryVmShell(MEM)).run()
    assert_rolled_back(link, MigrationError)
    assert method in str(link.src.error)
    assert link.shell.aborted
    second_migration_succeeds(vm)


def _commit_offset(link: Link) -> int:
    return next(s.offset for s in decode_all(bytes(link.to_dst)) if s.type is SectionType.COMMIT)


def _reference_stream() -> bytes:
    return bytes(migrate(MemoryVm(MEM, fill="half", seed=9)).to_dst)


@pytest.mark.parametrize("seed", range(12))
def test_corrupted_byte_before_commit_is_detected_and_rolled_back(seed):
    ref = _reference_stream()
    commit = next(s.offset for s in decode_all(ref) if s.type is SectionType.COMMIT)
    rng = random.Random(seed)
    target = rng.randrange(commit)

    def flip(data: bytes, off: int) -> bytes:
        if off <= target < off + len(data):
            b = bytearray(data)
            b[target - off] ^= 1 << rng.randrange(8)
            return bytes(b)
        return data

    vm = MemoryVm(MEM, fill="half", seed=9)
    link = Link(vm, MemoryVmShell(MEM)).run(tamper_dst=flip)
    assert link.dst.status == "failed" and isinstance(link.dst.error, StreamError)
    assert_rolled_back(link, (DestinationError, ConfigMismatchError))
    second_migration_succeeds(vm)


def _find(link: Link, kind: SectionType, data: bytes, off: int):
    """The first section of ``kind`` inside the chunk ``data`` at dest->source offset ``off``."""
    secs = StreamDecoder(Direction.TO_SOURCE).feed(bytes(link.to_src))
    return next((s for s in secs if s.type is kind and off <= s.offset < off + len(data)), None)


@pytest.mark.parametrize("kind", [SectionType.ACK, SectionType.READY])
def test_corrupted_destination_message_rolls_back(kind):
    vm = MemoryVm(MEM, fill="half")
    seen = {"n": 0}
    link = Link(vm, MemoryVmShell(MEM))

    def flip(data: bytes, off: int) -> bytes:
        sec = _find(link, kind, data, off)
        if sec is not None and seen["n"] == 0:
            seen["n"] = 1
            b = bytearray(data)
            b[sec.offset - off + sec.size - 1] ^= 0xFF  # its CRC
            return bytes(b)
        return data

    link.run(tamper_src=flip)
    assert_rolled_back(link, StreamError)
    assert link.shell.aborted and not link.shell.running  # the source's ABORT reached it
    second_migration_succeeds(vm)


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.3, 0.7, 0.99])
def test_link_cut_mid_stream_rolls_back(fraction):
    ref = _reference_stream()
    commit = next(s.offset for s in decode_all(ref) if s.type is SectionType.COMMIT)
    cut_at = int(commit * fraction)
    vm = MemoryVm(MEM, fill="half", seed=9)
    link = Link(vm, MemoryVmShell(MEM)).run(
        tamper_dst=lambda d, off: None if off + len(d) > cut_at else d
    )
    assert_rolled_back(link, PeerGoneError)
    assert link.dst.status == "failed" and isinstance(link.dst.error, PeerGoneError)
    assert link.shell.aborted or link.shell.calls == []
    second_migration_succeeds(vm)


def test_truncated_file_stream_is_refused_by_the_destination():
    vm = MemoryVm(MEM, fill="half")
    link = migrate(vm, to_file=True)
    data = bytes(link.to_dst)
    for cut in (5, len(data) // 2, len(data) - 1):
        shell = MemoryVmShell(MEM)
        dst = DestSession(shell, clock=FakeClock(), from_file=True)
        dst.receive(data[:cut])
        dst.on_peer_closed()
        assert dst.status == "failed" and isinstance(dst.error, StreamError)
        assert not shell.running


def test_destination_gone_after_ready_before_commit_rolls_back():
    vm = MemoryVm(MEM, fill="half")

    link = Link(vm, MemoryVmShell(MEM))

    def drop_ready(data: bytes, off: int) -> bytes | None:
        return None if _find(link, SectionType.READY, data, off) else data

    link.run(tamper_src=drop_ready)
    assert_rolled_back(link, PeerGoneError)
    # the destination sent READY and lost the source: it cannot know the source rolled back
    assert link.dst.status == "commit-unknown" and not link.shell.running and not link.shell.aborted
    assert link.dst.resolve(run="source") == "source"  # (no lease: the operator's word)
    assert link.dst.status == "failed" and link.shell.aborted and not link.shell.running


# ====================================================================== cancel at every status
@pytest.mark.parametrize("phase", [SourcePhase.SETUP, SourcePhase.PRECOPY, SourcePhase.SWITCHOVER,
                                   SourcePhase.WAIT_READY])
def test_cancel_at_every_status_before_commit_rolls_back(phase):
    vm = MemoryVm(MEM, fill="half", dirty_rate=2000, seed=10)
    done = {"cancelled": False}

    def hook(link: Link) -> None:
        if link.src.phase is phase and not done["cancelled"]:
            done["cancelled"] = link.src.cancel()

    link = Link(vm, MemoryVmShell(MEM), chunk=64 * 1024).run(hook=hook)
    assert done["cancelled"]
    assert_rolled_back(link, MigrationCancelledError)
    assert link.src.status == "cancelled"
    assert link.dst.status == "failed" and isinstance(link.dst.error, MigrationCancelledError)
    assert link.shell.aborted or link.shell.calls == []
    second_migration_succeeds(vm)


def test_cancel_before_start_and_after_the_end():
    vm = MemoryVm(MEM)
    src = SourceSession(vm, clock=FakeClock())
    assert src.cancel() and src.status == "cancelled" and vm.calls == []
    with pytest.raises(MigrationStateError):
        src.start()
    link = migrate(MemoryVm(MEM))
    assert not link.src.cancel() and link.src.status == "completed"


def test_cancel_after_commit_is_too_late():
    vm = MemoryVm(MEM, fill="half")
    tried = {}

    def hook(link: Link) -> None:
        if link.src.phase is SourcePhase.COMMITTED and "r" not in tried:
            tried["r"] = link.src.cancel()

    link = Link(vm, MemoryVmShell(MEM)).run(hook=hook)
    assert tried["r"] is False
    assert_completed(link)


def test_start_twice_is_refused():
    src = SourceSession(MemoryVm(MEM), clock=FakeClock())
    src.start()
    with pytest.raises(MigrationStateError):
        src.start()


# ====================================================================== after commit
def test_link_drop_after_commit_leaves_source_postmigrate_not_resumed():
    vm = MemoryVm(MEM, fill="half")
    link = Link(vm, MemoryVmShell(MEM))

    def cut_after_commit(data: bytes, off: int) -> bytes | None:
        return None if SectionType.COMMIT in [s.type for s in _sections_in(link, off, data)] else data

    link.run(tamper_dst=cut_after_commit)
    src = link.src
    assert src.phase is SourcePhase.UNRESOLVED and src.status == "commit-unknown"
    assert src.vm_state == "postmigrate" and src.committed and src.commit_sent
    assert vm.paused and vm.rollbacks == 0 and "release" not in vm.calls
    assert isinstance(src.error, PeerGoneError)
    # the destination never got COMMIT: restored, paused, in doubt -- neither runs yet
    assert link.dst.status == "commit-unknown" and not link.shell.running and not link.shell.aborted
    with pytest.raises(MigrationStateError):  # no lease: resolving needs the operator's word
        src.resolve()
    assert link.dst.resolve(run="destination") == "destination" and link.shell.running
    assert src.resolve(run="destination") == "destination"
    assert src.status == "completed" and vm.released and vm.rollbacks == 0 and same_memory(vm, link.shell)


def test_destination_start_failure_after_commit_source_stays_postmigrate():
    vm = MemoryVm(MEM, fill="half")
    shell = MemoryVmShell(MEM)
    shell.fail["start"] = RuntimeError("RUN refused")
    link = Link(vm, shell).run()
    assert link.src.phase is SourcePhase.UNRESOLVED and link.src.vm_state == "postmigrate"
    assert isinstance(link.src.error, DestinationError)
    assert vm.rollbacks == 0 and not shell.running and link.dst.status == "failed"
    assert link.src.resolve(run="source") == "source"
    assert link.src.status == "failed" and link.src.vm_state == "running" and vm.resumed_cleanly


# ---------------------------------------------------------------- after commit, with the VM's lease
# Each fault point of the commit window, then resolve() on the sides still alive (dest first, as
# orchestrate.resolve does, and the other order): exactly one of the two runs, or none only when
# the side that held the only runnable copy died.

def _cut_on(link: Link, kind: SectionType):
    def tamper(data: bytes, off: int) -> bytes | None:
        return None if kind in [s.type for s in _sections_in(link, off, data)] else data
    return tamper


def _flip_commit(link: Link):
    def tamper(data: bytes, off: int) -> bytes:
        for sec in _sections_in(link, off, data):
            if sec.type is SectionType.COMMIT:
                k = sec.offset - off + 13  # inside the 16-byte section: its checksum no longer matches
                return data[:k] + bytes([data[k] ^ 0x5A]) + data[k + 1 :]
        return data
    return tamper


def runs(link: Link) -> int:
    return int(link.src.vm_state == "running") + int(link.shell.running)


@pytest.mark.parametrize("dest_first", [True, False])
@pytest.mark.parametrize("fault", ["drop-commit", "flip-commit"])
def test_commit_lost_the_lease_settles_exactly_one(tmp_path, fault, dest_first):
    vm = MemoryVm(MEM, fill="half")
    link = Link(vm, MemoryVmShell(MEM), lease_dir=tmp_path)
    if fault == "drop-commit":
        link.run(tamper_dst=_cut_on(link, SectionType.COMMIT))
    else:
        link.run(tamper_dst=_flip_commit(link), hook=lambda lk: lk.dst.phase is DestPhase.IN_DOUBT)
        assert link.dst.status == "commit-unknown" and isinstance(link.dst.error, StreamError)
        link.src.on_peer_closed()  # the destination's runner closes the connection
    src, dst = link.src, link.dst
    assert src.status == dst.status == "commit-unknown" and runs(link) == 0
    assert src.vm_state == "postmigrate" and vm.rollbacks == 0
    if dest_first:  # the destination takes the lease over: it runs, the source hands over
        assert dst.resolve() == "destination" and src.resolve() == "destination"
        assert dst.status == src.status == "completed" and vm.released and same_memory(vm, link.shell)
    else:  # the source reclaims it first: it resumes, the destination can no longer take it
        assert src.resolve() == "source" and dst.resolve() == "source"
        assert src.status == "failed" and vm.resumed_cleanly and dst.status == "failed" and link.shell.aborted
    assert runs(link) == 1


def test_running_lost_the_source_hands_over(tmp_path):
    vm = MemoryVm(MEM, fill="half")
    link = Link(vm, MemoryVmShell(MEM), lease_dir=tmp_path)
    link.run(tamper_src=_drop_running(link))
    assert link.dst.status == "completed" and link.shell.running
    assert link.src.status == "commit-unknown" and link.src.vm_state == "postmigrate"
    assert link.src.resolve() == "destination"
    assert link.src.status == "completed" and vm.released and runs(link) == 1
    assert link.dst_lease.held and not link.src_lease.held


def _drop_running(link: Link):
    def tamper(data: bytes, off: int) -> bytes | None:
        return None if _find(link, SectionType.RUNNING, data, off) else data
    return tamper


def test_destination_dies_before_commit_the_source_resumes(tmp_path):
    """The destination process dies holding READY (COMMIT sent, never read): it never took the
    lease, so the source reclaims it and resumes -- exactly one runs."""
    vm = MemoryVm(MEM, fill="half")
    link = Link(vm, MemoryVmShell(MEM), lease_dir=tmp_path)
    link.run(tamper_dst=_cut_on(link, SectionType.COMMIT))  # ... and the destination is gone
    assert link.src.resolve() == "source"
    assert link.src.status == "failed" and vm.resumed_cleanly and "release" not in vm.calls
    assert runs(link) == 1 and link.src_lease.held


def test_destination_dies_after_it_started_the_source_never_resumes(tmp_path):
    """The destination started (it holds the lease) and its process died before RUNNING left:
    the VM died with its new host -- the source must not resume a copy that ran on elsewhere."""
    vm = MemoryVm(MEM, fill="half")
    link = Link(vm, MemoryVmShell(MEM), lease_dir=tmp_path)
    link.run(tamper_src=_drop_running(link))
    link.shell.running = False  # SIGKILL
    assert link.src.resolve() == "destination"
    assert link.src.vm_state == "postmigrate" and vm.rollbacks == 0 and runs(link) == 0


def test_source_dies_after_commit_sent_the_destination_runs(tmp_path):
    """The source sent COMMIT and died before it arrived: the destination, in doubt, takes the
    lease over from the (dead) source and runs."""
    vm = MemoryVm(MEM, fill="half")
    link = Link(vm, MemoryVmShell(MEM), lease_dir=tmp_path)
    link.run(tamper_dst=_cut_on(link, SectionType.COMMIT))
    assert link.dst.resolve() == "destination" and link.shell.running and link.dst_lease.held
    assert same_memory(vm, link.shell) and link.shell.cpu == vm.cpu_state()


def test_source_dies_before_ready_the_destination_stays_untouched(tmp_path):
    vm = MemoryVm(MEM, fill="half")
    link = Link(vm, MemoryVmShell(MEM), lease_dir=tmp_path)
    link.run(hook=lambda lk: lk.src.phase is SourcePhase.PRECOPY and lk.src.sent > MEM // 4)
    link.dst.on_peer_closed()  # SIGKILL of the source
    assert link.dst.status == "failed" and link.shell.aborted and not link.shell.running
    with pytest.raises(MigrationStateError):
        link.dst.resolve()  # nothing in doubt: never prepared
    assert link.src_lease.held  # (the dead source's: nobody else may run this VM)


def test_rollback_after_the_destination_took_the_lease_hands_over(tmp_path):
    """READY lost on the way back (the source rolls back), but the destination was resolved to run
    first: the source's rollback finds the lease gone and must not resume -- it hands over."""
    vm = MemoryVm(MEM, fill="half")
    link = Link(vm, MemoryVmShell(MEM), lease_dir=tmp_path)
    link.run(hook=lambda lk: lk.dst.phase is DestPhase.WAIT_COMMIT)
    link.dst.on_peer_closed(ConnectionResetError("partition"))
    assert link.dst.resolve() == "destination" and link.shell.running
    link.src.on_peer_closed(ConnectionResetError("partition"))  # the source notices later
    assert link.src.status == "completed" and link.src.vm_state == "postmigrate"
    assert vm.released and vm.rollbacks == 0 and runs(link) == 1 and link.src.resolution == "destination"


def test_rollback_with_the_lease_unreadable_stays_unresolved(tmp_path):
    vm = MemoryVm(MEM, fill="half")
    link = Link(vm, MemoryVmShell(MEM), lease_dir=tmp_path)
    link.run(hook=lambda lk: lk.src.phase is SourcePhase.WAIT_READY)
    link.src_lease.path = str(tmp_path / "gone" / "disk.img.lease")  # the storage went away
    link.src.on_peer_closed()
    assert link.src.status == "commit-unknown" and link.src.vm_state == "finish-migrate" and vm.rollbacks == 0
    with pytest.raises(OSError):
        link.src.resolve()
    assert link.src.status == "commit-unknown"


def test_resolve_is_refused_outside_commit_unknown_and_with_a_lease_and_a_word(tmp_path):
    vm = MemoryVm(MEM, fill="half")
    link = Link(vm, MemoryVmShell(MEM), lease_dir=tmp_path)
    with pytest.raises(MigrationStateError):
        link.src.resolve()
    link.run(tamper_dst=_cut_on(link, SectionType.COMMIT))
    with pytest.raises(MigrationStateError):  # the lease decides, not the caller
        link.src.resolve(run="source")
    with pytest.raises(MigrationStateError):
        link.dst.resolve(run="destination")
    assert link.src.status == link.dst.status == "commit-unknown"


def test_lease_one_holder_at_a_time(tmp_path):
    path = str(tmp_path / "x.lease")
    a, b, c = FileLease(path, "a"), FileLease(path, "b"), FileLease(path, "c")
    token = a.acquire()
    assert a.held and b.owner() == token
    assert b.take(token) and b.held and not a.held
    assert not a.reclaim() and not c.take(token)  # negative control: a stale token takes nothing
    assert b.reclaim() and b.held and b.owner() != token
    with pytest.raises(ValueError):
        FileLease(path, "a/b")


def test_lease_changes_overwrite_one_fixed_record_in_place(tmp_path):
    """After its first write the lease file never changes size or blocks: every take /
    reclaim is an in-place overwrite (an fdatasync, not a journal commit, on COMMIT)."""
    import os

    from virtio_lm.migration.lease import MAX_HOLDER, RECORD_SIZE

    path = str(tmp_path / "x.lease")
    a, b = FileLease(path, "a" * MAX_HOLDER), FileLease(path, "b")
    token = a.acquire()
    st = os.stat(path)
    assert st.st_size == RECORD_SIZE and a.owner() == token
    for _ in range(3):
        assert b.take(a.mine) if a.held else a.take(b.mine)
        now = os.stat(path)
        assert (now.st_size, now.st_ino, now.st_blocks) == (st.st_size, st.st_ino, st.st_blocks)
    with open(path, "rb") as f:
        raw = f.read()
    assert len(raw) == RECORD_SIZE and raw.endswith(b"\n") and raw.count(b"\n") == 1
    with pytest.raises(ValueError):
        FileLease(path, "x" * (MAX_HOLDER + 1))  # a token that would not fit the record


def test_lease_file_of_the_old_one_line_format_is_read_and_taken(tmp_path):
    path = tmp_path / "x.lease"
    path.write_bytes(b"src/0123456789abcdef\n")  # written before the fixed-size record
    b = FileLease(str(path), "dst")
    assert b.owner() == "src/0123456789abcdef"
    assert not b.take("src/ffffffffffffffff")  # negative control: another token takes nothing
    assert b.take("src/0123456789abcdef") and b.held and path.stat().st_size == 128


def _sections_in(link: Link, off: int, data: bytes):
    dec = StreamDecoder()
    return [s for s in dec.feed(bytes(link.to_dst)) if s.offset >= off]


# ====================================================================== idle zero VM
@pytest.mark.slow
def test_idle_all_zero_1gib_vm_costs_at_most_1mib_on_the_wire():
    gib = 1 << 30
    vm = MemoryVm(gib, vfs=default_vfs())
    shell = MemoryVmShell(gib)
    link = Link(vm, shell, chunk=1 << 20).run()
    assert link.src.status == "completed" and shell.running
    assert len(link.to_dst) <= 1 << 20, len(link.to_dst)
    assert link.src.info()["ram"]["duplicate"] == gib // 4096
    assert link.src.info()["ram"]["normal"] == 0


# ====================================================================== file streams
def test_file_stream_restores_later_without_messages():
    vm = MemoryVm(MEM, fill="half", dirty_rate=1000, seed=11)
    link = migrate(vm, to_file=True)
    assert link.src.status == "completed" and link.src.vm_state == "postmigrate"
    assert "release" not in vm.calls  # a file is not a running destination
    assert link.to_src == b""
    shell = MemoryVmShell(MEM)
    dst = DestSession(shell, clock=FakeClock(), from_file=True)
    data = bytes(link.to_dst)
    for i in range(0, len(data), 7777):
        dst.receive(data[i : i + 7777])
    assert dst.status == "device" and not shell.running  # complete, waiting for the end of the file
    dst.on_peer_closed()
    assert dst.status == "completed" and shell.running
    assert np.array_equal(vm.mem, shell.mem) and shell.cpu == vm.cpu_state()


def test_file_stream_with_trailing_bytes_is_refused():
    link = migrate(MemoryVm(MEM, fill="half"), to_file=True)
    shell = MemoryVmShell(MEM)
    dst = DestSession(shell, clock=FakeClock(), from_file=True)
    dst.receive(bytes(link.to_dst) + b"\x01")
    dst.on_peer_closed()
    assert dst.status == "failed" and isinstance(dst.error, StreamError) and not shell.running


# ====================================================================== transition tables
def test_tables_cover_every_pair():
    assert set(SOURCE_TABLE) == {(p, i) for p in SourcePhase for i in SourceInput}
    assert set(DEST_TABLE) == {(p, i) for p in DestPhase for i in DestInput}
    # every non-terminal phase handles every failure input and cancel
    for p in (SourcePhase.SETUP, SourcePhase.PRECOPY, SourcePhase.SWITCHOVER, SourcePhase.WAIT_READY):
        for i in (SourceInput.DEST_ERROR, SourceInput.PEER_GONE, SourceInput.BAD_STREAM, SourceInput.LOCAL_ERROR):
            assert SOURCE_TABLE[p, i].action is SourceAction.ROLLBACK
        assert SOURCE_TABLE[p, SourceInput.CANCEL].action is SourceAction.CANCEL
    # after commit nothing rolls back by itself: only resolve() (the lease's answer) does
    rollbacks = {(p, i) for (p, i), s in SOURCE_TABLE.items()
                 if s and s.action in (SourceAction.ROLLBACK, SourceAction.CANCEL)
                 and p in (SourcePhase.COMMITTED, SourcePhase.UNRESOLVED)}
    assert rollbacks == {(SourcePhase.UNRESOLVED, SourceInput.RESOLVE_SOURCE)}
    # the destination starts only on COMMIT, the end of a complete file, or resolve() (the lease)
    starts = {(p, i) for (p, i), s in DEST_TABLE.items() if s and s.action is DestAction.START}
    assert starts == {(DestPhase.WAIT_COMMIT, DestInput.COMMIT), (DestPhase.WAIT_COMMIT, DestInput.FILE_END),
                      (DestPhase.IN_DOUBT, DestInput.RESOLVE_DEST)}
    # READY out, the source lost: hold, never abort (the source may have committed)
    for i in (DestInput.PEER_GONE, DestInput.BAD_STREAM):
        assert DEST_TABLE[DestPhase.WAIT_COMMIT, i].action is DestAction.HOLD
    commits = {(p, i) for (p, i), s in SOURCE_TABLE.items() if s and s.action is SourceAction.COMMIT}
    assert commits == {(SourcePhase.WAIT_READY, SourceInput.READY)}


def _reach(phase: SourcePhase, **kw) -> Link:
    vm = MemoryVm(MEM, fill="half", dirty_rate=2000, seed=12)
    link = Link(vm, MemoryVmShell(MEM), chunk=32 * 1024, **kw)
    # in PRECOPY, wait until some data went out (so a ROUND ACK can name a section)
    link.run(hook=lambda lk: lk.src.phase is phase and (phase is not SourcePhase.PRECOPY or lk.src._enc.seq > 2))
    assert link.src.phase is phase
    return link


_SOURCE_PEER_INPUTS = {
    SourceInput.CONFIG_ACK: lambda link: _to_src(link, Ack(0, 1)),
    SourceInput.ROUND_ACK: lambda link: _to_src(link, Ack(link.src._enc.seq - 1, 1)),
    SourceInput.READY: lambda link: _to_src(link, Ready(5)),
    SourceInput.RUNNING: lambda link: _to_src(link, Running(5)),
    SourceInput.DEST_ERROR: lambda link: _to_src(link, Error(ErrorCode.INTERNAL, "boom")),
    SourceInput.PEER_GONE: lambda link: link.src.on_peer_closed(),
    SourceInput.BAD_STREAM: lambda link: link.src.receive(b"\xff" * 16),
    SourceInput.CANCEL: lambda link: link.src.cancel(),
}


def _to_src(link: Link, body) -> None:
    enc = StreamEncoder()
    enc.seq = link.src._dec.seq
    link.src.receive(enc.encode(body))


# In SETUP only HELLO was sent: an ACK there is the config ACK (or names an unsent section), so
# (SETUP, ROUND_ACK) cannot be produced from outside and is left out of the product.
_REACHABLE_PAIRS = [
    (phase, inp)
    for phase in (SourcePhase.SETUP, SourcePhase.PRECOPY, SourcePhase.SWITCHOVER, SourcePhase.WAIT_READY,
                  SourcePhase.COMMITTED)
    for inp in _SOURCE_PEER_INPUTS
    if not (phase is SourcePhase.SETUP and inp is SourceInput.ROUND_ACK)
]


@pytest.mark.slow  # 0.3 s or more: out of the one-minute fast subset (CI runs it)
@pytest.mark.parametrize("phase,inp", _REACHABLE_PAIRS)
def test_source_follows_its_table_for_every_external_input(phase, inp):
    link = _reach(phase)
    _SOURCE_PEER_INPUTS[inp](link)
    step = SOURCE_TABLE[phase, inp] or SOURCE_TABLE[phase, SourceInput.BAD_STREAM]
    want = step.next
    if step.action is SourceAction.COMMIT:  # READY in WAIT_READY: committed
        assert link.src.phase is SourcePhase.COMMITTED
    else:
        assert link.src.phase is want, (phase, inp, link.src.phase)
    if want in (SourcePhase.FAILED, SourcePhase.CANCELLED):
        assert link.vm.resumed_cleanly
    if want is SourcePhase.UNRESOLVED:
        assert link.vm.paused and link.vm.rollbacks == 0


@pytest.mark.parametrize("terminal", ["completed", "failed", "cancelled"])
def test_source_ignores_everything_once_finished(terminal):
    vm = MemoryVm(MEM, fill="half")
    if terminal == "completed":
        link = migrate(vm)
    elif terminal == "failed":
        link = Link(vm, MemoryVmShell(2 * MEM)).run()
    else:
        link = Link(vm, MemoryVmShell(MEM)).run(hook=lambda lk: bool(lk.src.cancel()) if lk.src.phase is SourcePhase.PRECOPY else None)
        link.run(start=False)
    before = (link.src.phase, list(vm.calls))
    for inp, fire in _SOURCE_PEER_INPUTS.items():
        fire(link)
    assert (link.src.phase, vm.calls) == before


def _to_dst(link: Link, body) -> None:
    enc = StreamEncoder()
    enc.seq = link.dst._dec.seq
    link.dst.receive(enc.encode(body))


_DEST_INPUTS = {
    DestInput.COMMIT: lambda link: _to_dst(link, Commit()),
    DestInput.SOURCE_ABORT: lambda link: _to_dst(link, Abort(ErrorCode.INTERNAL, "gone")),
    DestInput.PEER_GONE: lambda link: link.dst.on_peer_closed(),
    DestInput.BAD_STREAM: lambda link: link.dst.receive(b"\xff" * 16),
    DestInput.CANCEL: lambda link: link.dst.cancel(),
}


@pytest.mark.parametrize("phase", [DestPhase.WAIT_HELLO, DestPhase.RECEIVING, DestPhase.WAIT_COMMIT,
                                   DestPhase.COMPLETED])
@pytest.mark.parametrize("inp", list(_DEST_INPUTS))
def test_destination_follows_its_table_for_every_external_input(phase, inp):
    vm = MemoryVm(MEM, fill="half")
    link = Link(vm, MemoryVmShell(MEM), chunk=32 * 1024)
    if phase is not DestPhase.WAIT_HELLO:
        link.run(hook=lambda lk: lk.dst.phase is phase)
    assert link.dst.phase is phase
    if phase is DestPhase.WAIT_HELLO and inp is DestInput.COMMIT:
        return  # a COMMIT as first section is BAD_STREAM at the decoder: covered below
    _DEST_INPUTS[inp](link)
    step = DEST_TABLE[phase, inp] or DEST_TABLE[phase, DestInput.BAD_STREAM]
    assert link.dst.phase is step.next
    if step.next in (DestPhase.FAILED, DestPhase.CANCELLED):
        assert not link.shell.running
    if step.action is DestAction.START:
        assert link.shell.running


def test_destination_data_after_complete_is_a_protocol_error():
    vm = MemoryVm(MEM, fill="half")
    link = Link(vm, MemoryVmShell(MEM))
    link.run(hook=lambda lk: lk.dst.phase is DestPhase.WAIT_COMMIT)
    enc = StreamEncoder()
    enc.seq = link.dst._dec.seq
    from virtio_lm.wire.stream import CpuState

    link.dst.receive(enc.encode(CpuState(b"late")))
    # READY is out: a source that talks nonsense may still have sent COMMIT -- hold, in doubt
    assert link.dst.phase is DestPhase.IN_DOUBT and not link.shell.aborted and not link.shell.running
    assert isinstance(link.dst.error, StreamError) and link.dst.produce() == []


# ====================================================================== policy on its own
def test_policy_switches_when_pending_fits():
    p = Policy(MigrationParams(downtime_limit_ms=100), 4096, 4104)
    p.begin(0.0)
    p.record_sent(10_000_000)
    p.record_delivered(1.0, 10_000_000, 1.0)
    r = p.end_round(1.0, 2000)  # 10 MB/s: 100 ms = 1 MB = ~243 pages
    assert r.decision is Decision.CONTINUE and r.bandwidth == 10_000_000
    assert math.isclose(r.expected_downtime_s, 2000 * 4104 / 1e7)
    p.record_sent(10_000_000)
    p.record_delivered(2.0, 10_000_000, 1.0)
    r = p.end_round(2.0, 243)
    assert r.decision is Decision.SWITCH


def test_policy_auto_converge_steps_like_qemu():
    p = Policy(MigrationParams(downtime_limit_ms=1), 4096, 4104)
    p.begin(0.0)
    seen = []
    for i in range(1, 30):
        p.record_sent(1_000_000)
        p.record_delivered(float(i), 1_000_000, 1.0)
        r = p.end_round(float(i), 1000)  # dirtied 4 MB > 50 % of 1 MB sent
        if r.decision is Decision.THROTTLE:
            seen.append(r.throttle)
    assert seen == [20, 30, 40, 50, 60, 70, 80, 90, 99]


def test_policy_gives_up_at_max_rounds():
    p = Policy(MigrationParams(downtime_limit_ms=1, max_rounds=3, auto_converge=False), 4096, 4104)
    p.begin(0.0)
    decisions = []
    for i in range(1, 4):
        p.record_sent(1_000_000)
        p.record_delivered(float(i), 1_000_000, 1.0)
        decisions.append(p.end_round(float(i), 1000).decision)
    assert decisions == [Decision.CONTINUE, Decision.CONTINUE, Decision.GIVE_UP]


def test_policy_low_dirty_rate_does_not_throttle():
    p = Policy(MigrationParams(downtime_limit_ms=1), 4096, 4104)
    p.begin(0.0)
    for i in range(1, 10):
        p.record_sent(10_000_000)
        p.record_delivered(float(i), 10_000_000, 1.0)
        assert p.end_round(float(i), 100).decision is Decision.CONTINUE  # 0.4 MB dirtied < 5 MB
    assert p.throttle == 0


def test_policy_rejects_bad_params():
    for bad in (dict(downtime_limit_ms=-1), dict(cpu_throttle_initial=0), dict(max_cpu_throttle=100),
                dict(max_rounds=0), dict(cpu_throttle_increment=0)):
        with pytest.raises(ValueError):
            MigrationParams(**bad).check()


def test_token_bucket():
    b = TokenBucket(1000, 0.05, now=0.0)
    assert b.burst == 65536 and b.available(0.0) == 65536
    b.spend(65536 + 1000, 0.0)
    assert b.available(0.0) == 0 and math.isclose(b.wait(0.0, 1), 1.001)
    assert b.available(2.0) == 1000
    unlimited = TokenBucket(0, 0.05, now=0.0)
    assert unlimited.available(0.0) == TokenBucket.UNLIMITED and unlimited.wait(0.0) == 0.0


def test_ack_of_a_section_never_sent_is_a_protocol_error():
    link = _reach(SourcePhase.SETUP)
    _to_src(link, Ack(5, 0))
    assert link.src.phase is SourcePhase.FAILED and isinstance(link.src.error, StreamError)
    assert link.vm.resumed_cleanly


# ====================================================================== cancel at a random moment
_CANCEL_PHASES = [SourcePhase.SETUP, SourcePhase.PRECOPY, SourcePhase.SWITCHOVER, SourcePhase.WAIT_READY,
                  SourcePhase.COMMITTED]


@pytest.mark.slow  # 0.3 s or more: out of the one-minute fast subset (CI runs it)
@pytest.mark.parametrize("side", ["source", "destination"])
@pytest.mark.parametrize("seed", range(10))
def test_cancel_at_a_random_moment_of_each_phase(seed, side):
    """migrate_cancel (on the source's monitor, or the destination's) at a random step of each
    phase the source goes through, with a random link chunk.  Before COMMIT: the source rolls
    back (VM resumed cleanly, nothing lost), the destination discards everything, and a second
    migration of the same VM completes.  After COMMIT a source cancel is too late and ignored:
    the migration completes.  Exactly one runs either way."""
    rng = random.Random(seed * 7919 + (side == "destination"))
    phase = _CANCEL_PHASES[seed % len(_CANCEL_PHASES)]
    skip = rng.randrange(0, 25) if phase is SourcePhase.PRECOPY else rng.randrange(0, 2)
    vm = MemoryVm(MEM, fill="half", dirty_rate=1000, seed=seed)
    link = Link(vm, MemoryVmShell(MEM), chunk=rng.choice([4096, 32 * 1024, 256 * 1024]))
    seen: dict = {"n": 0, "took": None}

    def hook(lk: Link) -> None:
        if lk.src.phase is phase and seen["took"] is None:
            if seen["n"] >= skip:
                seen["took"] = lk.src.cancel() if side == "source" else lk.dst.cancel()
            seen["n"] += 1

    link.run(hook=hook)
    assert seen["took"] is not None, f"phase {phase} left before step {skip}"
    if phase is SourcePhase.COMMITTED:
        if side == "source":  # too late: ignored
            assert seen["took"] is False
            assert_completed(link)
        elif link.dst.status == "cancelled":  # before COMMIT arrived: it aborted, told the source
            assert link.src.status == "commit-unknown" and not link.shell.running
            assert link.src.resolve(run="source") == "source"  # (no lease: what orchestrate.resolve says)
            assert link.src.vm_state == "running" and vm.resumed_cleanly
        else:  # COMMIT was in: too late, ignored
            assert seen["took"] is False
            assert_completed(link)
        assert int(link.src.vm_state == "running") + int(link.shell.running) == 1
        return
    assert seen["took"] is True
    want = MigrationCancelledError if side == "source" else DestinationError
    assert_rolled_back(link, want)
    assert link.dst.status in ("failed", "cancelled") and not link.shell.running
    assert int(link.src.vm_state == "running") + int(link.shell.running) == 1
    second_migration_succeeds(vm)


@pytest.mark.parametrize("inp", list(_DEST_INPUTS))
def test_destination_in_doubt_holds_against_every_external_input(inp):
    """IN_DOUBT ends only by resolve(): a late COMMIT, an ABORT, EOF, garbage or migrate_cancel
    change nothing -- restored, paused, not aborted."""
    link = Link(MemoryVm(MEM, fill="half"), MemoryVmShell(MEM), chunk=32 * 1024)
    link.run(hook=lambda lk: lk.dst.phase is DestPhase.WAIT_COMMIT)
    link.dst.on_peer_closed(ConnectionResetError("cut"))
    assert link.dst.phase is DestPhase.IN_DOUBT
    _DEST_INPUTS[inp](link)
    assert link.dst.phase is DestPhase.IN_DOUBT and DEST_TABLE[DestPhase.IN_DOUBT, inp].action is DestAction.IGNORE
    assert not link.shell.running and not link.shell.aborted


@pytest.mark.parametrize("inp", list(_SOURCE_PEER_INPUTS))
def test_source_unresolved_holds_against_every_external_input(inp):
    """UNRESOLVED ends only by resolve(): a late RUNNING, an ERROR, garbage or migrate_cancel
    neither resume nor release the VM."""
    vm = MemoryVm(MEM, fill="half")
    link = Link(vm, MemoryVmShell(MEM))
    link.run(tamper_dst=_cut_on(link, SectionType.COMMIT))
    assert link.src.phase is SourcePhase.UNRESOLVED
    calls = list(vm.calls)
    _SOURCE_PEER_INPUTS[inp](link)
    assert link.src.phase is SourcePhase.UNRESOLVED and link.src.vm_state == "postmigrate"
    assert vm.calls == calls and vm.rollbacks == 0
