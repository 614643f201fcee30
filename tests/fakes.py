"""In-memory endpoints for the migration tests (and the stream fuzz harness): a VM model with numpy memory.

:class:`MemoryVm` is a :class:`~virtio_lm.migration.endpoint.SourceEndpoint`:
guest memory as a ``(num_pages, page_size)`` uint8 array, a vCPU workload in
the style of QEMU's migration test (sweep after sweep, increment a byte in
each page) that dirties ``dirty_rate`` pages per second of the time it is
given (:meth:`MemoryVm.run`), scaled by the throttle; VFs that DMA into guest
memory while running (reported dirty only while tracking is on -- unless
``report_device_dirty=False``, the negative control) and whose state image
carries a request counter.  Every endpoint call is recorded in ``calls``;
``fail`` maps a method name to an exception it raises once.

:class:`MemoryVmShell` is a :class:`~virtio_lm.migration.endpoint.DestEndpoint`
with the same model.  The simulated time is the caller's: nothing here reads
a clock or sleeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from virtio_lm.errors import StateImageError, WireError
from virtio_lm.wire.state import RecordType, build_image, decode_image
from virtio_lm.wire.stream import StreamConfig, VfConfig

__all__ = ["FakeVf", "MemoryVm", "MemoryVmShell", "default_vfs"]


def default_vfs() -> tuple[VfConfig, ...]:
    """A blk VF (index 1) and a net VF (index 2)."""
    return (
        VfConfig(1, 2, (1 << 32) | (1 << 29) | (1 << 9), (1 << 32) | (1 << 9)),
        VfConfig(2, 1, (1 << 32) | (1 << 29) | (1 << 5), (1 << 32) | (1 << 5)),
    )


@dataclass
class FakeVf:
    config: VfConfig
    state: str = "running"  # running | quiesced | frozen | released
    requests: int = 0  # device state: advances while running; lives in the image

    def image(self) -> bytes:
        return build_image(self.config.device_id, [(RecordType.CONFIG, self.requests.to_bytes(8, "little"))])


class _Calls:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail: dict[str, BaseException] = {}

    def _call(self, name: str) -> None:
        self.calls.append(name)
        exc = self.fail.pop(name, None)
        if exc is not None:
            raise exc


class MemoryVm(_Calls):
    """The source VM (see the module docstring)."""

    def __init__(
        self,
        memory_size: int,
        *,
        page_size: int = 4096,
        vfs: Sequence[VfConfig] | None = None,
        workload: str = "sweep",
        dirty_rate: float = 0.0,
        device_rate: float = 0.0,
        report_device_dirty: bool = True,
        fill: str = "zero",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.page_size = page_size
        self._num_pages = memory_size // page_size
        self.memory_size = memory_size
        self.mem = np.zeros((self._num_pages, page_size), dtype=np.uint8)
        rng = np.random.default_rng(seed)
        if fill == "random":
            self.mem[:] = rng.integers(0, 256, size=self.mem.shape, dtype=np.uint8)
        elif fill == "half":
            self.mem[: self._num_pages // 2] = rng.integers(0, 256, size=(self._num_pages // 2, page_size), dtype=np.uint8)
        self.mem[:, :16] = 0  # the sweep's bytes start at sweep 0
        self.rng = rng
        self.vfs = [FakeVf(c) for c in (default_vfs() if vfs is None else vfs)]
        self.workload = workload
        self.dirty_rate = dirty_rate
        self.device_rate = device_rate
        self.report_device_dirty = report_device_dirty
        self.paused = False
        self.released = False
        self.throttle = 0
        self.tracking = False
        self._cpu_log = np.zeros(self._num_pages, dtype=bool)
        self._dev_log = np.zeros(self._num_pages, dtype=bool)
        self.cursor = 0  # next page of the sweep
        self.sweeps = 0
        self._carry = 0.0
        self._dev_carry = 0.0
        self.rollbacks = 0

    # ------------------------------------------------------------ the running VM
    def run(self, seconds: float) -> None:
        """Let the workload and the VFs run for ``seconds`` of simulated time."""
        if self.paused or seconds <= 0:
            return
        self._carry += self.dirty_rate * seconds * (100 - self.throttle) / 100.0
        n = int(self._carry)
        self._carry -= n
        self.cpu_write(n)
        running = [vf for vf in self.vfs if vf.state == "running"]
        if running and self.device_rate:
            self._dev_carry += self.device_rate * seconds
            k = int(self._dev_carry)
            self._dev_carry -= k
            for _ in range(k):
                vf = running[int(self.rng.integers(len(running)))]
                page = int(self.rng.integers(self._num_pages))
                vf.requests += 1
                self.mem[page, 16:24] = np.frombuffer(vf.requests.to_bytes(8, "little"), dtype=np.uint8)
                self.mem[page, 24] = vf.config.index
                if self.tracking and self.report_device_dirty:
                    self._dev_log[page] = True

    def cpu_write(self, npages: int) -> None:
        """The sweep: increment byte 0 (and keep the sweep number in bytes 8..15) of the next pages."""
        assert not self.paused, "a paused vCPU does not write"
        while npages > 0:
            k = min(npages, self._num_pages - self.cursor)
            sl = slice(self.cursor, self.cursor + k)
            self.mem[sl, 0] += 1
            self.mem[sl, 8:16] = np.frombuffer((self.sweeps + 1).to_bytes(8, "little"), dtype=np.uint8)
            if self.tracking:
                self._cpu_log[sl] = True
            self.cursor += k
            npages -= k
            if self.cursor == self._num_pages:
                self.cursor = 0
                self.sweeps += 1

    def sweep_consistent(self, mem: np.ndarray | None = None) -> bool:
        """Do bytes 8..15 of every page form one sweep (pages before the cursor one sweep ahead)?"""
        m = self.mem if mem is None else mem
        sweep = m[:, 8:16].copy().view("<u8")[:, 0]
        want = np.full(self._num_pages, self.sweeps, dtype=np.uint64)
        want[: self.cursor] = self.sweeps + 1
        return bool(np.array_equal(sweep, want))

    # ------------------------------------------------------------ SourceEndpoint
    @property
    def num_pages(self) -> int:
        return self._num_pages

    def config(self) -> StreamConfig:
        self._call("config")
        return StreamConfig(self.memory_size, self.page_size, tuple(vf.config for vf in self.vfs), self.workload)

    def start_tracking(self) -> None:
        self._call("start_tracking")
        self._cpu_log[:] = False
        self._dev_log[:] = False
        self.tracking = True

    def collect_dirty(self) -> np.ndarray:
        self._call("collect_dirty")
        out = self._cpu_log | self._dev_log
        self._cpu_log[:] = False
        self._dev_log[:] = False
        return out

    def _pages(self, page_numbers: np.ndarray) -> np.ndarray:
        first = int(page_numbers[0]) if len(page_numbers) else 0
        if (
            len(page_numbers)
            and int(page_numbers[-1]) - first == len(page_numbers) - 1
            and bool((np.diff(page_numbers.astype(np.int64)) == 1).all())
        ):
            return self.mem[first : first + len(page_numbers)]  # a run: a view, no gather
        return self.mem[page_numbers.astype(np.intp)]

    def zero_mask(self, page_numbers: np.ndarray) -> np.ndarray:
        return ~self._pages(page_numbers).view(np.uint64).any(axis=1)

    def read_pages(self, page_numbers: np.ndarray) -> memoryview:
        self._call("read_pages")
        return np.array(self._pages(page_numbers), copy=True).reshape(-1).data

    def set_throttle(self, percent: int) -> None:
        self._call("set_throttle")
        self.throttle = percent

    calibration: tuple[float, float] | None = None  # what calibrate_switchover answers

    def calibrate_switchover(self) -> tuple[float, float] | None:
        self._call("calibrate_switchover")
        return self.calibration

    def prepare_switchover(self) -> None:
        self._call("prepare_switchover")

    def pause_vcpus(self) -> None:
        self._call("pause_vcpus")
        self.paused = True

    def quiesce_vfs(self) -> None:
        self._call("quiesce_vfs")
        for vf in self.vfs:
            vf.state = "quiesced"

    def freeze_and_save_vfs(self) -> list[tuple[int, bytes]]:
        self._call("freeze_and_save_vfs")
        for vf in self.vfs:
            if vf.state != "quiesced":
                raise RuntimeError(f"VF {vf.config.index} FREEZE from {vf.state}")
            vf.state = "frozen"
        return [(vf.config.index, vf.image()) for vf in self.vfs]

    def stop_tracking(self) -> None:
        self._call("stop_tracking")
        self.tracking = False

    def cpu_state(self) -> bytes:
        self._call("cpu_state")
        return self.cursor.to_bytes(8, "little") + self.sweeps.to_bytes(8, "little")

    def rollback(self) -> None:
        self._call("rollback")
        self.rollbacks += 1
        self.throttle = 0
        self.tracking = False
        self._cpu_log[:] = False
        self._dev_log[:] = False
        for vf in self.vfs:
            vf.state = "running"
        self.paused = False

    def release(self) -> None:
        self._call("release")
        for vf in self.vfs:
            vf.state = "released"
        self.released = True

    @property
    def resumed_cleanly(self) -> bool:
        """Running as before a migration: vCPUs on, VFs running, no tracking, no throttle."""
        return (
            not self.paused and not self.tracking and self.throttle == 0 and not self.released
            and all(vf.state == "running" for vf in self.vfs)
        )


class MemoryVmShell(_Calls):
    """The destination VM shell (see the module docstring)."""

    def __init__(
        self,
        memory_size: int,
        *,
        page_size: int = 4096,
        vfs: Sequence[VfConfig] | None = None,
        workload: str = "sweep",
    ) -> None:
        super().__init__()
        self.memory_size = memory_size
        self.page_size = page_size
        self.vfs = {v.index: v for v in (default_vfs() if vfs is None else vfs)}
        self.workload = workload
        self.mem = np.zeros((memory_size // page_size, page_size), dtype=np.uint8)
        self.images: dict[int, bytes] = {}
        self.vf_state = {i: "init" for i in self.vfs}
        self.vf_requests: dict[int, int] = {}
        self.cpu: bytes | None = None
        self.running = False
        self.aborted = False
        self.touched = False

    def check_config(self, config: StreamConfig) -> str | None:
        self._call("check_config")
        if config.memory_size != self.memory_size:
            return f"memory size {config.memory_size} bytes, this VM has {self.memory_size}"
        if config.page_size != self.page_size:
            return f"page size {config.page_size}, this VM uses {self.page_size}"
        if config.workload != self.workload:
            return f"workload {config.workload!r}, this VM runs {self.workload!r}"
        if {v.index for v in config.vfs} != set(self.vfs):
            return f"VFs {sorted(v.index for v in config.vfs)}, this VM has {sorted(self.vfs)}"
        for v in config.vfs:
            mine = self.vfs[v.index]
            if v.device_id != mine.device_id:
                return f"VF {v.index} is device type {v.device_id}, here {mine.device_id}"
            if v.negotiated_features & ~mine.offered_features:
                return f"VF {v.index} negotiated features {v.negotiated_features:#x} not offered here"
        return None

    def write_pages(self, page_numbers: np.ndarray, data: bytes | memoryview) -> None:
        self.touched = True
        self.mem[page_numbers.astype(np.intp)] = np.frombuffer(data, dtype=np.uint8).reshape(-1, self.page_size)

    def zero_pages(self, page_numbers: np.ndarray) -> None:
        self.touched = True
        self.mem[page_numbers.astype(np.intp)] = 0

    def restore_vfs(self, images: Sequence[tuple[int, bytes]]) -> None:
        self._call("restore_vfs")
        for idx, image in images:
            self.vf_state[idx] = "frozen"
            try:
                img = decode_image(image)
            except WireError as exc:
                raise StateImageError(f"VF {idx}", str(exc)) from exc
            if img.device_id != self.vfs[idx].device_id:
                raise StateImageError(f"VF {idx}", f"device type {img.device_id}")
            cfg = img.of_type(RecordType.CONFIG)
            self.vf_requests[idx] = int.from_bytes(cfg[0].payload, "little") if cfg else 0
            self.images[idx] = bytes(image)
            self.vf_state[idx] = "quiesced"

    def set_cpu_state(self, data: bytes) -> None:
        self._call("set_cpu_state")
        self.cpu = bytes(data)

    def start(self) -> None:
        self._call("start")
        for i in self.vf_state:
            self.vf_state[i] = "running"
        self.running = True

    def abort(self) -> None:
        self._call("abort")
        self.mem[:] = 0
        self.images.clear()
        self.vf_requests.clear()
        self.cpu = None
        self.vf_state = {i: "init" for i in self.vfs}
        self.running = False
        self.aborted = True
