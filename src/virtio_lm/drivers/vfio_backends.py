"""The two back-ends of the host's VFIO-style migration state machine (drivers/vfio.py).

:class:`SeedBackend` -- the 2021 proposal, through
:class:`~virtio_lm.drivers.pf_driver.PfDriver`'s batched operations (every
VF of a batch in one kick).  VFIO's states map to the proposal's as::

    RUNNING, PRE_COPY             RUNNING (or INIT, a fresh VF)
    RUNNING_P2P, PRE_COPY_P2P     QUIESCED   (no DMA, no interrupt; completions held)
    STOP, STOP_COPY, RESUMING     FREEZED    (back-end I/O settled; SAVE / RESTORE_STATE)

    RUNNING -> RUNNING_P2P, PRE_COPY -> PRE_COPY_P2P, STOP -> RUNNING_P2P
                                  SET_STATE QUIESCED (from FREEZED: the restored image is
                                  validated and applied)
    RUNNING_P2P -> RUNNING, PRE_COPY_P2P -> PRE_COPY
                                  SET_STATE RUNNING
    RUNNING_P2P -> STOP           SET_STATE FREEZED
    STOP -> STOP_COPY, PRE_COPY_P2P -> STOP_COPY
                                  FREEZED + GET_STATE_ATTRS + SAVE_STATE in portions
                                  (``freeze_and_save``: FREEZED is a no-op where it is already)
    RESUMING -> STOP              RESTORE_STATE in portions (the data written while RESUMING)
    RESUMING -> STOP -> RUNNING_P2P  one kick: FREEZED, RESTORE_STATE..., QUIESCED
                                  (``restore_and_quiesce``)
    RUNNING_P2P -> STOP -> STOP_COPY  one kick (``freeze_and_save``)
    the rest (RUNNING <-> PRE_COPY, STOP -> RESUMING, STOP_COPY -> STOP, ...)
                                  no command: the proposal has no pre-copy device data

Its dirty tracking is the device's: START_DIRTY_PAGE_TRACK in the mode asked
for, collection by report or push map, STOP_DIRTY_PAGE_TRACK.

:class:`AdminBackend` -- virtio 1.4, through
:class:`~virtio_lm.drivers.admin_driver.AdminDriver`, arc by arc as Linux's
virtio-vfio-pci (``drivers/vfio/pci/virtio/migrate.c``) does::

    RUNNING -> RUNNING_P2P, PRE_COPY -> PRE_COPY_P2P     DEV_MODE_SET STOPPED
    RUNNING_P2P -> RUNNING, PRE_COPY_P2P -> PRE_COPY     DEV_MODE_SET 0
    RUNNING_P2P <-> STOP                                 nothing (STOPPED already)
    RUNNING -> PRE_COPY, RUNNING_P2P -> PRE_COPY_P2P     RESOURCE_OBJ_CREATE (GET),
                                                         METADATA_GET SIZE, DEV_PARTS_GET ALL
                                                         (the pre-copy read; the object stays)
    PRE_COPY_P2P -> STOP_COPY                            METADATA_GET SIZE, DEV_PARTS_GET ALL
                                                         again on that object, the device stopped
    STOP -> STOP_COPY                                    CREATE (GET), SIZE, GET ALL
    STOP_COPY -> STOP, PRE_COPY -> RUNNING, PRE_COPY_P2P -> RUNNING_P2P
                                                         RESOURCE_OBJ_DESTROY
    STOP -> RESUMING                                     RESOURCE_OBJ_CREATE (SET)
    RESUMING -> STOP                                     DEV_PARTS_SET (the data written while
                                                         RESUMING), RESOURCE_OBJ_DESTROY

one VF after the other (the admin driver sends one command per kick, as
Linux's does).  The image of a VF is its parts behind a small header
(:func:`~virtio_lm.wire.parts.encode_parts_image`).  Dirty pages come from
the platform: an :class:`~virtio_lm.memory.iommu.IommuDirtyDomain` on each
VF's DMA port, read and cleared like IOMMUFD's dirty bitmap -- no device
command at all.
"""

from __future__ import annotations

import numpy as np

from virtio_lm.drivers.admin_driver import AdminDriver
from virtio_lm.drivers.pf_driver import PfDriver
from virtio_lm.drivers.vfio import Arc, MigState
from virtio_lm.errors import DriverError, MigrationArcError, PlatformTrackingError, WireError
from virtio_lm.memory import PAGE_SIZE
from virtio_lm.memory.iommu import IommuDirtyDomain
from virtio_lm.wire.admin import DevPartsObjType
from virtio_lm.wire.ctrl import TrackMode, VfState
from virtio_lm.wire.parts import decode_parts_image, encode_parts_image

__all__ = ["AdminBackend", "SeedBackend", "backend_for"]

S = MigState

# ============================================================================ seed
#: what one arc is, alone, in the proposal's commands (None: no command)
SEED_ARCS: dict[Arc, str | None] = {
    (S.RUNNING, S.RUNNING_P2P): "quiesce",
    (S.PRE_COPY, S.PRE_COPY_P2P): "quiesce",
    (S.STOP, S.RUNNING_P2P): "quiesce",
    (S.RUNNING_P2P, S.RUNNING): "run",
    (S.PRE_COPY_P2P, S.PRE_COPY): "run",
    (S.RUNNING_P2P, S.STOP): "freeze",
    (S.STOP, S.STOP_COPY): "save",
    (S.PRE_COPY_P2P, S.STOP_COPY): "save",
    (S.RESUMING, S.STOP): "restore",
    (S.RUNNING, S.PRE_COPY): None,
    (S.PRE_COPY, S.RUNNING): None,
    (S.RUNNING_P2P, S.PRE_COPY_P2P): None,
    (S.PRE_COPY_P2P, S.RUNNING_P2P): None,
    (S.STOP, S.RESUMING): None,
    (S.STOP_COPY, S.STOP): None,
}
#: the VF state the proposal's device is in, for each VFIO state (INIT counts as RUNNING)
SEED_LEVEL: dict[MigState, VfState] = {
    S.RUNNING: VfState.RUNNING, S.PRE_COPY: VfState.RUNNING,
    S.RUNNING_P2P: VfState.QUIESCED, S.PRE_COPY_P2P: VfState.QUIESCED,
    S.STOP: VfState.FREEZED, S.STOP_COPY: VfState.FREEZED, S.RESUMING: VfState.FREEZED,
}  # fmt: skip
_SET = {"quiesce": VfState.QUIESCED, "run": VfState.RUNNING, "freeze": VfState.FREEZED}


class SeedBackend:
    """The proposal's control queue (see the module docstring)."""

    profile = "seed"

    def __init__(self, pf: PfDriver) -> None:
        self.pf = pf

    def tracking_name(self, mode: object) -> str:
        return TrackMode(mode).cli_name  # type: ignore[arg-type]

    def commands(self) -> int:
        return self.pf.stats.commands

    def run(self, vfs: list[int], arcs: list[Arc], images: list[bytes] | None) -> list[bytes] | None:
        out: list[bytes] | None = None
        i = 0
        while i < len(arcs):
            arc = arcs[i]
            nxt = arcs[i + 1] if i + 1 < len(arcs) else None
            what = SEED_ARCS[arc]
            if what == "freeze" and nxt == (S.STOP, S.STOP_COPY):
                out = self.pf.freeze_and_save(vfs)  # FREEZED + attrs + SAVE_STATE, one kick
                i += 2
                continue
            if what == "restore":
                assert images is not None  # VfMigration checked
                pairs = list(zip(vfs, images))
                if nxt == (S.STOP, S.RUNNING_P2P):
                    self.pf.restore_and_quiesce(pairs)  # FREEZED, RESTORE_STATE..., QUIESCED: one kick
                    i += 2
                    continue
                for vf, blob in pairs:
                    self.pf.restore_image(vf, blob)
            elif what == "save":
                out = self.pf.freeze_and_save(vfs)
            elif what is not None:
                self.pf.set_states(vfs, _SET[what])
            i += 1
        return out

    def probe(self, vf: int, candidates: list[MigState]) -> MigState:
        level = self.pf.get_state(vf)
        if level is VfState.INIT:
            level = VfState.RUNNING
        for state in reversed(candidates):  # the furthest state of the path the device is in
            if SEED_LEVEL.get(state) is level:
                return state
        return S.ERROR

    def fresh(self, vf: int) -> str | None:
        state = self.pf.get_state(vf)
        return None if state is VfState.INIT else f"VF {vf} here is {state.name}, not INIT"

    def reset(self, vf: int) -> None:
        self.pf.flr_vf(vf)

    def start_dirty(self, vfs: list[int], mode: object) -> None:
        for vf in vfs:
            self.pf.start_tracking(vf, TrackMode(mode))  # type: ignore[arg-type]

    def collect_dirty(self, vf: int) -> np.ndarray:
        return self.pf.collect_dirty(vf)

    def stop_dirty(self, vfs: list[int]) -> None:
        if vfs:
            self.pf.stop_tracking_all(vfs)

    def dirty_stats(self) -> dict[str, int]:
        return {"bytes": self.pf.stats.collect_bytes}


# ============================================================================ virtio 1.4
class AdminBackend:
    """virtio 1.4's admin commands and the platform's dirty tracking (see the module docstring)."""

    profile = "virtio-1.4"

    def __init__(self, admin: AdminDriver) -> None:
        self.admin = admin
        self._get_obj: dict[int, int] = {}  # VF -> its GET object (PRE_COPY .. STOP_COPY)
        self._set_obj: dict[int, int] = {}  # VF -> its SET object (RESUMING)
        self._at: dict[int, MigState] = {}  # VF -> the last state an arc reached (probe)
        self._moved: set[int] = set()  # VFs an arc moved since their last reset (1.4 has no state query)
        self._domains: dict[int, IommuDirtyDomain] = {}
        self._bitmap_bytes = 0
        #: bytes of device parts read, by kind: "pre-copy" and "stop-copy"
        self.parts_bytes: dict[str, int] = {"pre-copy": 0, "stop-copy": 0}

    def tracking_name(self, mode: object) -> str:
        return "iommu"

    def commands(self) -> int:
        return self.admin.commands

    def _read_parts(self, vf: int, obj: int, kind: str) -> bytes:
        parts = self.admin.parts_get(vf, obj)  # METADATA_GET SIZE for the room, then GET ALL
        fn = self.admin.pf.vf(vf)
        image = encode_parts_image(fn.device.device_id, parts)
        self.parts_bytes[kind] += len(image)
        return image

    def _drop(self, table: dict[int, int], vf: int) -> None:
        obj = table.pop(vf, None)
        if obj is not None:
            self.admin.obj_destroy(vf, obj)

    def _arc(self, vf: int, arc: Arc, image: bytes | None) -> bytes | None:
        a = self.admin
        if arc in ((S.RUNNING, S.RUNNING_P2P), (S.PRE_COPY, S.PRE_COPY_P2P)):
            a.mode_set(vf, stopped=True)
        elif arc in ((S.RUNNING_P2P, S.RUNNING), (S.PRE_COPY_P2P, S.PRE_COPY)):
            a.mode_set(vf, stopped=False)
        elif arc in ((S.RUNNING_P2P, S.STOP), (S.STOP, S.RUNNING_P2P)):
            pass  # the member is STOPPED in both
        elif arc in ((S.RUNNING, S.PRE_COPY), (S.RUNNING_P2P, S.PRE_COPY_P2P)):
            self._get_obj[vf] = a.obj_create(vf, DevPartsObjType.GET)
            return self._read_parts(vf, self._get_obj[vf], "pre-copy")  # the pre-copy data, as Linux reads it
        elif arc == (S.PRE_COPY_P2P, S.STOP_COPY):
            return self._read_parts(vf, self._get_obj[vf], "stop-copy")  # re-read, the member stopped
        elif arc == (S.STOP, S.STOP_COPY):
            self._get_obj[vf] = a.obj_create(vf, DevPartsObjType.GET)
            return self._read_parts(vf, self._get_obj[vf], "stop-copy")
        elif arc in ((S.STOP_COPY, S.STOP), (S.PRE_COPY, S.RUNNING), (S.PRE_COPY_P2P, S.RUNNING_P2P)):
            self._drop(self._get_obj, vf)
        elif arc == (S.STOP, S.RESUMING):
            self._set_obj[vf] = a.obj_create(vf, DevPartsObjType.SET)
        elif arc == (S.RESUMING, S.STOP):
            assert image is not None
            try:
                device_id, parts = decode_parts_image(image)
            except WireError as exc:
                raise MigrationArcError([vf], "RESUMING", "STOP", f"not a device parts image: {exc}") from exc
            fn = a.pf.vf(vf)
            if device_id != fn.device.device_id:
                raise MigrationArcError([vf], "RESUMING", "STOP",
                                        f"parts of device type {device_id}, VF {vf} is type {fn.device.device_id}")
            a.parts_set(vf, self._set_obj[vf], parts)
            self._drop(self._set_obj, vf)
        else:  # pragma: no cover - path() yields only ARCS, and every arc is above
            raise MigrationArcError([vf], arc[0].name, arc[1].name, "no such arc")
        return None

    def run(self, vfs: list[int], arcs: list[Arc], images: list[bytes] | None) -> list[bytes] | None:
        out: list[bytes] | None = None
        for vf in vfs:
            self._at[vf] = arcs[0][0]
            self._moved.add(vf)
        for arc in arcs:  # arc by arc, every VF (as the host would issue one VFIO ioctl per device)
            for i, vf in enumerate(vfs):
                got = self._arc(vf, arc, images[i] if images is not None else None)
                if got is not None:
                    out = out if out is not None else [b""] * len(vfs)
                    out[i] = got
                self._at[vf] = arc[1]
        return out

    def probe(self, vf: int, candidates: list[MigState]) -> MigState:
        at = self._at.get(vf, S.RUNNING)
        return at if at in candidates else S.ERROR

    def fresh(self, vf: int) -> str | None:
        if vf in self._moved:
            return f"VF {vf} here went through migration states since its last reset"
        return None

    def reset(self, vf: int) -> None:
        self.admin.pf.flr_vf(vf)  # the member's objects are destroyed by the device
        self._get_obj.pop(vf, None)
        self._set_obj.pop(vf, None)
        self._at.pop(vf, None)
        self._moved.discard(vf)

    # ------------------------------------------------------------------ platform dirty tracking
    def start_dirty(self, vfs: list[int], mode: object) -> None:
        for vf in vfs:
            dom = self._domains.get(vf)
            if dom is None:
                dom = self._domains[vf] = IommuDirtyDomain(self.admin.pf.vf(vf).port)
            dom.set_dirty_tracking(True)

    def collect_dirty(self, vf: int) -> np.ndarray:
        dom = self._domains.get(vf)
        if dom is None or not dom.tracking:
            raise PlatformTrackingError(f"VF {vf}: no IOMMU dirty tracking runs")
        raw = dom.get_dirty_bitmap(0, dom.num_pages * PAGE_SIZE)
        self._bitmap_bytes += len(raw)
        return np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")[: dom.num_pages].astype(bool)

    def stop_dirty(self, vfs: list[int]) -> None:
        for vf in vfs:
            dom = self._domains.pop(vf, None)
            if dom is not None:
                dom.detach()

    def dirty_stats(self) -> dict[str, int]:
        return {"bytes": self._bitmap_bytes}


def backend_for(driver: PfDriver | AdminDriver) -> SeedBackend | AdminBackend:
    """The back-end of the driver a host brought its PF up with."""
    if isinstance(driver, PfDriver):
        return SeedBackend(driver)
    if isinstance(driver, AdminDriver):
        return AdminBackend(driver)
    raise DriverError(f"no migration back-end for {type(driver).__name__}")

