"""What the migration sessions drive: the VM and its VFs on each side.

The host layer implements these over a real VM (guest :class:`~virtio_lm.memory.Memory`,
vCPU workload) and its PF driver; tests implement them with in-memory fakes.
The sessions call them from one thread, in the order documented here, and
never touch a VM or a device any other way.

Source side, in the order a migration calls it::

    config()                  once, for HELLO
    start_tracking()          CPU dirty log on; START_DIRTY_PAGE_TRACK for each VF
    calibrate_switchover()    time a scratch switch-over on spare VFs, under the load of the moment
    zero_mask / read_pages    pre-copy rounds (round 0: all pages)
    collect_dirty()           at the end of each round
    set_throttle(pct)         auto-converge (0 = off)
    prepare_switchover()      the policy decided to switch over; the VM still runs: flush what can
                              be flushed now (the disk image) so the downtime has less to do
    pause_vcpus()             switch-over begins: the downtime starts here
    quiesce_vfs()             SET_STATE QUIESCED for each VF: no more device DMA
    collect_dirty()           the final dirty reports
    freeze_and_save_vfs()     FREEZE, GET_STATE_ATTRS, SAVE_STATE portions
    stop_tracking()           STOP_DIRTY_PAGE_TRACK, CPU log off
    cpu_state()               the vCPU workload's state
    release()                 after the destination runs: let the VFs go (FLR)
    rollback()                any failure before COMMIT: the VM goes on where it was

Destination side::

    check_config(cfg)         None to accept, else the reason to refuse; nothing changes
    write_pages / zero_pages  as the stream delivers them
    restore_vfs(images)       FREEZE -> RESTORE_STATE portions -> QUIESCE for each VF
    set_cpu_state(data)
    start()                   after COMMIT only: RUN each VF, resume vCPUs, announce
    abort()                   any failure: discard everything, the VM shell stays stopped
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from virtio_lm.wire.stream import StreamConfig

__all__ = ["DestEndpoint", "SourceEndpoint", "VfImage"]

VfImage = tuple[int, bytes]  # (vf_index, state image bytes as wire.state encodes them)


@runtime_checkable
class SourceEndpoint(Protocol):
    """The VM being migrated away, with its VFs and the PF driver that masters them."""

    @property
    def num_pages(self) -> int:
        """Guest memory size in pages (``config().num_pages``)."""
        ...

    def config(self) -> StreamConfig:
        """Memory size, page size, the VFs (index, type, features) and the workload kind."""
        ...

    def start_tracking(self) -> None:
        """Turn on the CPU dirty log and each VF's dirty page tracking."""
        ...

    def calibrate_switchover(self) -> tuple[float, float] | None:
        """``(seconds, restore)``: how long a switch-over of this kind of VM takes now, pages,
        network and final dirty collection left out, and how much of it is the destination
        restoring; None: no way to tell.  Must not pause the VM."""
        ...

    def collect_dirty(self) -> np.ndarray:
        """Bool array of ``num_pages``: pages written since the last call (or since
        :meth:`start_tracking`) by the CPU or by any VF's DMA, cleared as collected."""
        ...

    def zero_mask(self, page_numbers: np.ndarray) -> np.ndarray:
        """Bool array, one per page number: is that page all zero right now."""
        ...

    def read_pages(self, page_numbers: np.ndarray) -> bytes | memoryview:
        """The content of the pages, ``page_size`` bytes each, in the order given."""
        ...

    def set_throttle(self, percent: int) -> None:
        """Throttle the vCPU workload to run ``100 - percent`` % of the time (0 = off)."""
        ...

    def prepare_switchover(self) -> None:
        """Right before :meth:`pause_vcpus`, the VM still running: work that shortens the
        switch-over (e.g. write back the disk image, so FREEZE's flush has little left)."""
        ...

    def pause_vcpus(self) -> None:
        ...

    def quiesce_vfs(self) -> None:
        """SET_STATE QUIESCED for every VF of the VM: no more DMA, no interrupts."""
        ...

    def freeze_and_save_vfs(self) -> list[VfImage]:
        """FREEZE every VF and read its state image out (SAVE_STATE in portions)."""
        ...

    def stop_tracking(self) -> None:
        ...

    def cpu_state(self) -> bytes:
        """The vCPU workload's state, opaque to the migration."""
        ...

    def rollback(self) -> None:
        """Undo whatever of the migration was done: throttle off, tracking stopped,
        VFs unfrozen / back to RUNNING, vCPUs resumed.  Safe to call at any point
        after :meth:`start_tracking` was attempted, and more than once."""
        ...

    def release(self) -> None:
        """The destination runs the VM: let the source's VFs go (FLR); the VM stays stopped."""
        ...


@runtime_checkable
class DestEndpoint(Protocol):
    """The VM shell that receives: empty guest memory and VFs in INIT."""

    def check_config(self, config: StreamConfig) -> str | None:
        """``None`` if this VM shell can take the VM, else why not.  Changes nothing."""
        ...

    def write_pages(self, page_numbers: np.ndarray, data: bytes | memoryview) -> None:
        ...

    def zero_pages(self, page_numbers: np.ndarray) -> None:
        ...

    def restore_vfs(self, images: Sequence[VfImage]) -> None:
        """FREEZE -> RESTORE_STATE -> QUIESCE for each VF; raises if a device refuses its image."""
        ...

    def set_cpu_state(self, data: bytes) -> None:
        ...

    def start(self) -> None:
        """RUN every VF, resume the vCPUs, announce (the net VF's RARP / GUEST_ANNOUNCE)."""
        ...

    def abort(self) -> None:
        """Discard everything received; leave the VM shell stopped.  Safe to call more than once."""
        ...
