"""The simulated VM: guest memory, a vCPU workload, and guest drivers on its VFs.

Guest-physical memory map (``memory_mib`` >= 32)::

    0x0000_0000  128 KiB   unused (page 0 stays zero)
    0x0002_0000  832 KiB   DMA test driver (a VM with ``dmatest``): rings, headers, buffers
    0x0010_0000  64 KiB    blk workload metadata: expected generation (le32) and
                           page-cache "valid" byte of every block
    0x0011_0000  4 MiB     blk workload page cache: one 4 KiB slot per block
    0x0060_0000  4 MiB     blk driver: rings, request headers
    0x00A0_0000  2 MiB     net driver: rings
    0x00C0_0000  4 MiB     net driver: frame buffers
    0x0100_0000  ...       vCPU sweep region (``sweep_mib``; by default to the end of memory
                           less the fill), then the random fill (``fill_mib``): pages of
                           seeded random non-zero bytes the guest writes at boot and
                           checks in :meth:`VirtualMachine.verify`

A VM's VFs are functions of a PF on its host (the host creates them and
gives their ports onto this memory); the VM only drives them through their
registers, as a guest would.  Everything the guest "knows" that is not in its
memory -- the vCPU's registers, the drivers' and workloads' bookkeeping --
is :meth:`VirtualMachine.guest_state`, which migrates as CPU_STATE.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from virtio_lm.errors import GuestStateError, VirtioLmError, WireError
from virtio_lm.memory import PAGE_SIZE, Memory
from virtio_lm.pci.function import VirtioPciFunction
from virtio_lm.vm import guest_state as gs
from virtio_lm.vm.dmatest_kind import AREA as DMATEST_AREA
from virtio_lm.vm.kinds import KINDS, GuestPart, kinds_of
from virtio_lm.vm.vcpu import SweepVcpu
from virtio_lm.wire.guest import join_cpu_state, split_cpu_state
from virtio_lm.wire.vcpu import VcpuState

MIB = 1 << 20
META_ADDR = 0x0010_0000
CACHE_ADDR = 0x0011_0000
MAX_BLOCKS = (4 * MIB) // 4096
BLK_AREA = (0x0060_0000, 4 * MIB)
NET_RING_AREA = (0x00A0_0000, 2 * MIB)
NET_BUF_AREA = (0x00C0_0000, 4 * MIB)
SWEEP_START = 0x0100_0000
#: every byte a VF may write: the DMA test driver's area, the blk page cache and driver area,
#: the net rings and buffers (everything below the sweep region but the first 128 KiB and the
#: blk workload's metadata, which only the vCPU writes)
VF_DMA_AREA = (DMATEST_AREA[0], SWEEP_START - DMATEST_AREA[0])
MIN_MEMORY_MIB = 32


def dma_window(memory_size: int, mib: int) -> tuple[int, int]:
    """Bytes ``[start, end)`` of a VM's VF DMA window of at least ``mib`` MiB (see
    :meth:`VirtualMachine.dma_window_pages`)."""
    start, length = VF_DMA_AREA
    return start, min(memory_size, start + max(length, mib * MIB))


@dataclass
class VmSpec:
    """What a VM is made of (the same on both hosts, like QEMU's command line)."""

    name: str = "vm0"
    memory_mib: int = 256
    blk_image: str | None = None
    blk_blocks: int = 512
    blk_qd: int = 16
    blk_rate: float = 400.0
    #: how the blk VF moves data: "buffered" (its I/O on the back-end pool through a bounce
    #: buffer; QUIESCE never waits for it) or "direct" (zero-copy DMA: reads and writes served by
    #: the C fast path on the notification, QUIESCE waits for the batch running)
    blk_dma: str = "buffered"
    #: how the net VF sends: "pool" (every frame on its back-end thread) or "inline" (frames up to
    #: 2048 bytes on the kick's path when the back-end is ready: the C transmit fast path, a
    #: kick's frames as one burst to the switch)
    net_tx: str = "pool"
    net_mac: str | None = None
    peer_mac: str = "52:54:00:00:00:fe"
    net_rate: float = 200.0
    dirty_rate_mbps: float = 32.0  # MB/s of pages the vCPU dirties (0 = none, inf = as fast as it can)
    seed: int = 1
    sweep_mib: int | None = None  # the vCPU's sweep region (None: the rest of memory after the fill)
    fill_mib: int = 0  # MiB of random non-zero pages written at boot, after the sweep region
    dmatest: int = 0  # FILL requests a DMA test VF keeps in flight (0: no such VF; vm/dmatest_kind.py)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.memory_mib < MIN_MEMORY_MIB:
            raise ValueError(f"a VM needs at least {MIN_MEMORY_MIB} MiB of memory")
        if not 1 <= self.blk_blocks <= MAX_BLOCKS:
            raise ValueError(f"blk_blocks must be in 1..{MAX_BLOCKS}")
        if self.net_tx not in ("pool", "inline"):
            raise ValueError(f"net_tx must be 'pool' or 'inline', not {self.net_tx!r}")
        if self.blk_dma not in ("buffered", "direct"):
            raise ValueError(f"blk_dma must be 'buffered' or 'direct', not {self.blk_dma!r}")
        if not self.dirty_rate_mbps >= 0:
            raise ValueError("dirty_rate_mbps must be >= 0 (inf: as fast as it can)")
        free = self.memory_mib - SWEEP_START // MIB
        if self.fill_mib < 0 or (self.sweep_mib is not None and self.sweep_mib < 1):
            raise ValueError("fill_mib must be >= 0 and sweep_mib >= 1")
        if (self.sweep_mib or 1) + self.fill_mib > free:
            raise ValueError(f"sweep ({self.sweep_mib or 1} MiB) + fill ({self.fill_mib} MiB) exceed the {free} MiB "
                             f"after the guest's fixed areas")

    @property
    def sweep_bytes(self) -> int:
        if self.sweep_mib is not None:
            return self.sweep_mib * MIB
        return (self.memory_mib - self.fill_mib) * MIB - SWEEP_START

    @property
    def fill_start(self) -> int:
        return SWEEP_START + self.sweep_bytes

    @property
    def vf_kinds(self) -> list[str]:
        """The VM's VFs, in stream index order (:data:`virtio_lm.vm.kinds.KINDS`)."""
        return kinds_of(self)


class VirtualMachine:
    """One VM on a host; see the module docstring."""

    def __init__(self, spec: VmSpec, memory: Memory) -> None:
        if memory.size != spec.memory_mib * MIB:
            raise ValueError("memory size does not match the spec")
        self.spec = spec
        self.memory = memory
        self.vfs: dict[str, VirtioPciFunction] = {}  # kind -> function (set by the host)
        self.vf_numbers: dict[str, int] = {}  # kind -> VF number on the host's PF
        self.parts: dict[str, GuestPart] = {}  # kind -> the guest driver and workload on that VF
        sweep_pages = spec.sweep_bytes // PAGE_SIZE
        self.vcpu = SweepVcpu(memory, SWEEP_START, sweep_pages, dirty_rate=spec.dirty_rate_mbps * 1e6)
        self.running = False
        self.booted = False
        #: set by restore_guest_state: the guest checks what it received before it runs on
        self._check_on_resume = False
        #: what that check found (kept: later stores and reads would erase the evidence)
        self.arrival_problems: dict[str, list[str]] = {}

    # ------------------------------------------------------------------ bring-up
    def attach(self, kind: str, number: int, fn: VirtioPciFunction) -> None:
        self.vfs[kind] = fn
        self.vf_numbers[kind] = number

    def boot(self) -> None:
        """Bring the VFs up through their registers and start the workloads."""
        for kind in self.spec.vf_kinds:
            if kind in self.vfs:
                self.parts[kind] = KINDS[kind].boot(self, self.vfs[kind])
        self._write_fill()
        self.booted = True
        self.resume()

    def workload(self, kind: str) -> Any:
        """The workload on the VF of ``kind`` (None: the VM has none running)."""
        part = self.parts.get(kind)
        return None if part is None else part.workload

    def _fill_block(self, index: int) -> np.ndarray:
        """Fill MiB ``index``: seeded random bytes 1..255 (a fill page is never zero)."""
        rng = np.random.default_rng([self.spec.seed, index])
        return rng.integers(1, 256, MIB, dtype=np.uint8)

    def _write_fill(self) -> None:
        for i in range(self.spec.fill_mib):
            self.memory.cpu.write(self.spec.fill_start + i * MIB, self._fill_block(i))

    def _check_fill(self) -> list[str]:
        bad = []
        for i in range(self.spec.fill_mib):
            addr = self.spec.fill_start + i * MIB
            found = self.memory.array[addr : addr + MIB]
            diff = np.flatnonzero(found != self._fill_block(i))
            if len(diff):
                bad.append(f"fill MiB {i}: {len(diff)} bytes differ, first at {addr + int(diff[0]):#x}")
        return bad

    # ------------------------------------------------------------------ run control
    def _workers(self) -> list[Any]:
        return [self.vcpu] + [p.workload for p in self.parts.values()]

    def pause(self) -> None:
        workers = self._workers()
        for w in workers:  # all asked first, then waited for: their parking overlaps
            w.request_pause()
        for w in workers:
            w.wait_parked()
        self.running = False

    def resume(self) -> None:
        if self._check_on_resume:
            self._check_on_resume = False
            for part in self.parts.values():
                check = getattr(part.workload, "check_cache_first", None)
                if check is not None:  # the workload checks what it received in its first step
                    check()
        for w in self._workers():
            w.start()
        self.running = True

    def disk_images(self) -> list[str]:
        """Paths of the disk images the VM's block VFs serve (shared storage)."""
        return [img for k in self.vfs if (img := KINDS[k].disk_image(self.spec))]

    def dma_window_pages(self, mib: int) -> tuple[int, int]:
        """Pages ``[first, end)`` of a DMA window of at least ``mib`` MiB for this VM's VFs:
        it starts at :data:`VF_DMA_AREA` and always covers it (every page a VF of this VM may
        write), extends over the memory after it for a larger ``mib`` (a VF mapped onto more of
        the guest), and ends at the end of memory."""
        start, end = dma_window(self.memory.size, mib)
        return start // PAGE_SIZE, -(-end // PAGE_SIZE)

    def set_throttle(self, percent: int) -> None:
        self.vcpu.set_throttle(min(max(percent, 0), 99))

    def close(self) -> None:
        for w in self._workers():
            w.close()
        self.running = False

    # ------------------------------------------------------------------ guest state (CPU_STATE)
    def guest_state(self) -> bytes:
        """The vCPU state and the guest software's bookkeeping (the VM must be paused).

        Taken inside the downtime, so the drivers' states are not decoded back for
        validation here (half the cost); the destination decodes them strictly."""
        soft: dict[str, Any] = {"spec": {"name": self.spec.name, "memory_mib": self.spec.memory_mib}}
        for kind, part in self.parts.items():
            soft[kind] = KINDS[kind].save(part)
        return join_cpu_state(self.vcpu.save().encode(), gs.encode_guest_state(soft, check_depth=False))

    def restore_guest_state(self, data: bytes) -> None:
        """Rebuild the guest software on this (destination) VM from :meth:`guest_state` bytes.

        Validates everything first; raises :class:`GuestStateError` (or a
        WireError) and changes nothing when the state is refused.  The VM
        stays paused; :meth:`resume` starts it.
        """
        vcpu_raw, soft_raw = split_cpu_state(data)
        try:
            vcpu = SweepVcpu.from_state(VcpuState.decode(vcpu_raw), memory=self.memory,
                                        dirty_rate=self.spec.dirty_rate_mbps * 1e6)
        except (ValueError, WireError) as exc:
            raise GuestStateError("vcpu", str(exc)) from exc
        soft = gs.decode_guest_state(soft_raw)
        kinds = sorted(k for k in soft if k != "spec")
        if kinds != sorted(self.vfs):
            raise GuestStateError("guest", f"state for VFs {kinds}, this VM has {sorted(self.vfs)}")
        parts = {}
        for kind in self.spec.vf_kinds:
            if kind in soft:
                driver_doc, work_doc = gs.vf_part(soft, kind)
                parts[kind] = KINDS[kind].restore(self, self.vfs[kind], driver_doc, work_doc)
        for kind, part in parts.items():  # everything accepted: hook the new drivers up
            KINDS[kind].attach(part, self.vfs[kind])
        for old in self._workers():
            old.close(wait=False)  # (paused: parked, they end without another step)
        self.vcpu = vcpu
        self.parts = parts
        for w in self._workers():
            w.prepare()
        self.booted = True
        self._check_on_resume = True

    # ------------------------------------------------------------------ verification
    def verify(self, *, disk: bool = True) -> dict[str, Any]:
        """Check everything the guest can check; the VM is paused for it and resumed after.

        Returns ``{"passed": bool, "checks": {...}}`` with the problems found.
        """
        was_running = self.running
        self.pause()
        checks: dict[str, Any] = {}
        try:
            mem_problems = list(self.arrival_problems.get("memory", []))
            try:
                self.vcpu.verify()
            except VirtioLmError as exc:
                mem_problems.append(str(exc))
            mem_problems += self._check_fill()
            checks["memory"] = {
                "passed": not mem_problems, "problems": mem_problems,
                "pages": self.vcpu.region_pages, "sweeps": self.vcpu.sweeps,
            }
            for kind, part in self.parts.items():
                checks[kind] = KINDS[kind].verify(part, disk, list(self.arrival_problems.get(kind, [])))
        finally:
            if was_running:
                self.resume()
        return {"passed": all(c["passed"] for c in checks.values()), "checks": checks}

    def requests_in_flight(self) -> dict[str, int]:
        """What the guest has submitted to its VFs and not yet seen complete."""
        out: dict[str, int] = {}
        for kind, part in self.parts.items():
            out.update(KINDS[kind].in_flight(part))
        return out

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.spec.name,
            "memory-mib": self.spec.memory_mib,
            "running": self.running,
            "vcpu": {"sweeps": self.vcpu.sweeps, "position": self.vcpu.position, "throttle": self.vcpu.throttle},
            "vfs": {k: self.vf_numbers[k] for k in self.vfs},
        }
        for kind, part in self.parts.items():
            out[kind] = KINDS[kind].info(self, part)
        return out
