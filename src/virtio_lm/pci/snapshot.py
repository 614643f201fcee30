"""Save and restore the transport part of a virtio-PCI function.

What every VF's state image carries regardless of device type: one
FUNCTION record (features, status, vectors) and one QUEUE record per queue
(configuration and the device's shadow ring indices).  Device types add
their own records (see :mod:`virtio_lm.devices.base`).

Restoring is two steps, so an invalid image changes nothing:
:func:`validate_function` checks the records against the function that will
take them and returns a :class:`FunctionSnapshot`; :func:`apply_function`
writes a validated snapshot into the function and cannot fail.

``driver_features`` in the FUNCTION record is the driver_feature register
(what the driver wrote); the negotiated set is that value once FEATURES_OK
is set, and nothing before (a driver may migrate between writing its
features and setting FEATURES_OK, and must find them there).

Checks: the image's device type is this function's; exactly one FUNCTION
record and one QUEUE record per queue index; ``device_features`` equal to
what this function offers (same device model and options on both sides);
with FEATURES_OK, ``driver_features`` a subset of them, with VERSION_1 and
accepted by the device's dependency rules (before FEATURES_OK it is a
register value the function checks when FEATURES_OK is written); ``status``
one the status machine can reach; as many queues as this function has;
queue sizes powers of two no larger than the queue's maximum; an enabled
queue's three parts aligned and inside the function's DMA space, and only
after FEATURES_OK; ``last_avail_idx - used_idx`` (the chains the device
holds) no larger than the queue size, and 0 on a disabled queue.  Whether the ring *content*
in guest memory agrees is checked when the device next reads it: a driver
ring that disagrees is hostile driver input and takes the queue to
NEEDS_RESET like any other.
"""

from __future__ import annotations

from dataclasses import dataclass

from virtio_lm.errors import StateImageError
from virtio_lm.pci.function import VirtioPciFunction
from virtio_lm.wire.features import DeviceStatus, Feature, bit
from virtio_lm.wire.ring import (
    AVAIL_ALIGN,
    DESC_ALIGN,
    USED_ALIGN,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)
from virtio_lm.wire.state import (
    QUEUE_FLAG_BROKEN,
    QUEUE_FLAG_SIGNALLED_VALID,
    FunctionRecord,
    QueueRecord,
    RecordType,
    StateImage,
)

_U16 = 0xFFFF
_A, _D, _FO, _OK = (
    int(DeviceStatus.ACKNOWLEDGE),
    int(DeviceStatus.DRIVER),
    int(DeviceStatus.FEATURES_OK),
    int(DeviceStatus.DRIVER_OK),
)
#: driver-set status values the status machine can reach (FAILED may be added to any)
REACHABLE_STATUS = frozenset({0, _A, _A | _D, _A | _D | _FO, _A | _D | _FO | _OK})
_FAILED = int(DeviceStatus.FAILED)
_NEEDS_RESET = int(DeviceStatus.DEVICE_NEEDS_RESET)


@dataclass(frozen=True)
class FunctionSnapshot:
    """A validated transport state, ready for :func:`apply_function`."""

    function: FunctionRecord
    queues: tuple[QueueRecord, ...]

    def in_flight(self, queue: int) -> int:
        """How many chains the device held on ``queue`` when saved."""
        q = self.queues[queue]
        return (q.last_avail_idx - q.used_idx) & _U16


def save_function(fn: VirtioPciFunction) -> list[tuple[int, bytes]]:
    """FUNCTION and QUEUE records describing ``fn`` now."""
    rec = FunctionRecord(
        device_features=fn.offered_features(),
        driver_features=fn.driver_features,
        status=fn.status,
        config_generation=fn.config_generation,
        config_msix_vector=fn.config_msix_vector,
        num_queues=len(fn.queues),
        queue_select=fn.queue_select,
    )
    out: list[tuple[int, bytes]] = [(RecordType.FUNCTION, rec.encode())]
    for q, vector in zip(fn.queues, fn.queue_msix_vectors):
        flags = (QUEUE_FLAG_SIGNALLED_VALID if q.signalled_used is not None else 0) | (
            QUEUE_FLAG_BROKEN if q.broken else 0
        )
        out.append(
            (
                RecordType.QUEUE,
                QueueRecord(
                    index=q.index,
                    size=q.size,
                    enabled=int(q.enabled),
                    flags=flags,
                    msix_vector=vector,
                    desc_addr=q.desc_addr,
                    avail_addr=q.avail_addr,
                    used_addr=q.used_addr,
                    last_avail_idx=q.last_avail_idx,
                    used_idx=q.used_idx,
                    signalled_used=q.signalled_used or 0,
                ).encode(),
            )
        )
    return out


def validate_function(fn: VirtioPciFunction, image: StateImage) -> FunctionSnapshot:
    """Check the transport records of ``image`` against ``fn``; raise :class:`StateImageError`."""
    if image.device_id != fn.device.device_id:
        raise StateImageError("header", f"device type {image.device_id} != this function's {fn.device.device_id}")
    recs = image.of_type(RecordType.FUNCTION)
    if len(recs) != 1:
        raise StateImageError("function", f"exactly one FUNCTION record expected, got {len(recs)}")
    f = FunctionRecord.decode(recs[0].payload)
    offered = fn.offered_features()
    if f.device_features != offered:
        raise StateImageError(
            "function.device_features",
            f"{f.device_features:#x} != features offered here {offered:#x} (different device or options)",
        )
    driver_status = f.status & ~(_FAILED | _NEEDS_RESET)
    if driver_status not in REACHABLE_STATUS or f.status & ~(driver_status | _FAILED | _NEEDS_RESET):
        raise StateImageError("function.status", f"{f.status:#04x} is not a status the device can reach")
    if f.status & _FO:
        if f.driver_features & ~offered:
            raise StateImageError(
                "function.driver_features", f"{f.driver_features & ~offered:#x} negotiated but never offered"
            )
        if not f.driver_features & bit(Feature.VERSION_1):
            raise StateImageError("function.driver_features", "FEATURES_OK without VIRTIO_F_VERSION_1")
        reason = fn.device.validate_features(f.driver_features)
        if reason is not None:
            raise StateImageError("function.driver_features", reason)
    if f.num_queues != len(fn.queues):
        raise StateImageError("function.num_queues", f"{f.num_queues} != {len(fn.queues)} queues here")
    if f.queue_select > _U16:
        raise StateImageError("function.queue_select", "out of range")

    qrecs = [QueueRecord.decode(r.payload) for r in image.of_type(RecordType.QUEUE)]
    by_index: dict[int, QueueRecord] = {}
    for q in qrecs:
        if q.index >= len(fn.queues):
            raise StateImageError(f"queue[{q.index}]", f"no such queue (function has {len(fn.queues)})")
        if q.index in by_index:
            raise StateImageError(f"queue[{q.index}]", "duplicate QUEUE record")
        by_index[q.index] = q
    if len(by_index) != len(fn.queues):
        missing = sorted(set(range(len(fn.queues))) - set(by_index))
        raise StateImageError("queues", f"QUEUE records missing for {missing}")
    event_idx = bool(f.driver_features & bit(Feature.EVENT_IDX))
    for i in range(len(fn.queues)):
        _check_queue(fn, by_index[i], event_idx, f.status)
    return FunctionSnapshot(f, tuple(by_index[i] for i in range(len(fn.queues))))


def _check_queue(fn: VirtioPciFunction, q: QueueRecord, event_idx: bool, status: int) -> None:
    where = f"queue[{q.index}]"
    vq = fn.queues[q.index]
    if not 1 <= q.size <= vq.max_size or q.size & (q.size - 1):
        raise StateImageError(f"{where}.size", f"{q.size} is not a power of two in 1..{vq.max_size}")
    if q.enabled not in (0, 1):
        raise StateImageError(f"{where}.enabled", f"{q.enabled} is not 0 or 1")
    if q.flags & ~(QUEUE_FLAG_SIGNALLED_VALID | QUEUE_FLAG_BROKEN):
        raise StateImageError(f"{where}.flags", f"unknown bits {q.flags:#x}")
    if not q.flags & QUEUE_FLAG_SIGNALLED_VALID and q.signalled_used:
        # the device would drop it and save 0: an accepted image must save back identical
        raise StateImageError(f"{where}.signalled_used", f"signalled_used {q.signalled_used} without its valid flag")
    if q.enabled and not status & _FO:
        raise StateImageError(f"{where}.enabled", "queue enabled before FEATURES_OK")
    if q.enabled:
        for name, addr, align, length in (
            ("desc_addr", q.desc_addr, DESC_ALIGN, desc_table_size(q.size)),
            ("avail_addr", q.avail_addr, AVAIL_ALIGN, avail_ring_size(q.size, event_idx)),
            ("used_addr", q.used_addr, USED_ALIGN, used_ring_size(q.size, event_idx)),
        ):
            if addr % align:
                raise StateImageError(f"{where}.{name}", f"{addr:#x} not aligned to {align}")
            if not fn.port.contains(addr, length):
                raise StateImageError(f"{where}.{name}", f"[{addr:#x}, +{length:#x}) outside the VF's memory")
    held = (q.last_avail_idx - q.used_idx) & _U16
    if held and not q.enabled:
        raise StateImageError(f"{where}.last_avail_idx", f"a disabled queue holds {held} chains")
    if held > q.size:
        raise StateImageError(
            f"{where}.last_avail_idx",
            f"{held} chains held (last_avail_idx {q.last_avail_idx}, used_idx {q.used_idx}) > size {q.size}",
        )


def apply_function(fn: VirtioPciFunction, snap: FunctionSnapshot) -> None:
    """Write a validated snapshot into ``fn`` (registers and queue shadow state)."""
    with fn.locked():  # no register access sees half a restore
        _apply(fn, snap)


def _apply(fn: VirtioPciFunction, snap: FunctionSnapshot) -> None:
    f = snap.function
    fn.status = f.status
    fn.driver_features = f.driver_features
    fn.negotiated = f.driver_features if f.status & _FO else 0
    fn.config_generation = f.config_generation
    fn.config_msix_vector = f.config_msix_vector
    fn.queue_select = f.queue_select
    fn.needs_reset_reason = "restored with DEVICE_NEEDS_RESET" if f.status & _NEEDS_RESET else None
    event_idx = bool(fn.negotiated & bit(Feature.EVENT_IDX))
    indirect = bool(fn.negotiated & bit(Feature.INDIRECT_DESC))
    for vq, q in zip(fn.queues, snap.queues):
        vq.reset()
        vq.size = q.size
        vq.desc_addr, vq.avail_addr, vq.used_addr = q.desc_addr, q.avail_addr, q.used_addr
        vq.event_idx = event_idx
        vq.indirect_desc = indirect
        vq.last_avail_idx = q.last_avail_idx
        vq.used_idx = q.used_idx
        vq.signalled_used = q.signalled_used if q.flags & QUEUE_FLAG_SIGNALLED_VALID else None
        vq.broken = bool(q.flags & QUEUE_FLAG_BROKEN)
        vq.enabled = bool(q.enabled)
        # an interrupt raised on the source just before it stopped may not have reached the
        # guest: the first notify decision after restore interrupts (spurious ones are harmless)
        vq.pending_notify = bool(q.enabled)
    fn.queue_msix_vectors = [q.msix_vector for q in snap.queues]
