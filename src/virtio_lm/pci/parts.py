"""The common device parts of a virtio-PCI function (virtio 1.4, device-parts.tex).

What the virtio-1.4 profile saves and restores of the transport, in the
spec's format and order:

========================  ==============================================  ==========
part                      value                                           on SET
========================  ==============================================  ==========
DEV_FEATURES (optional)   the offered bits, two le64 words                checked
DRV_FEATURES              the driver_feature register, two le64 words     applied
PCI_COMMON_CFG @0x10      config_msix_vector (le16)                       applied
PCI_COMMON_CFG @0x12      num_queues (le16)                               checked
DEVICE_STATUS             device_status (u8)                              applied
VQ_CFG [i]                size, vector, enable, the three ring addresses  applied
VQ_NOTIFY_CFG [i]         queue_notify_off, queue_notif_config_data       checked
========================  ==============================================  ==========

No part carries ring indices: a STOPPED device has returned every chain it
took, so the used ring's idx in guest memory is both the next avail index
to take and the used index; a function configured from parts takes them
from there when its device next runs (``Virtqueue.resync_from_ring``).

:func:`check_list` enforces what the spec says of any list of parts: the
mandatory order (common parts in table order, then device parts by type),
at most one DEV_FEATURES / DRV_FEATURES / DEVICE_STATUS, one part per
common-config offset, per queue, per device selector, and each common part
preceded by the parts its table row names -- except DEV_FEATURES, which the
spec makes optional on restore.  :func:`validate_function_parts` checks the
common parts against the function that will take them and returns a
:class:`FunctionParts`; :func:`apply_function_parts` writes one into the
function and cannot fail.  Parts are untrusted input: nothing is applied
unless every part of the command passed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from virtio_lm.errors import DevicePartsError, WireError
from virtio_lm.pci.function import VirtioPciFunction
from virtio_lm.wire.codec import read_u16, u16
from virtio_lm.wire.features import DeviceStatus, Feature, bit
from virtio_lm.wire.parts import (
    COMMON_FIRST,
    DEVICE_FIRST,
    DEVICE_LAST,
    NO_SELECTOR,
    PRECEDING,
    CommonCfgSelector,
    DevPart,
    PartType,
    VqCfgValue,
    VqIndexSelector,
    VqNotifyValue,
    decode_features,
    encode_features,
    order_key,
)
from virtio_lm.wire.pci import COMMON_CFG_BY_NAME
from virtio_lm.wire.ring import (
    AVAIL_ALIGN,
    DESC_ALIGN,
    USED_ALIGN,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)

__all__ = [
    "FEATURE_WORDS",
    "FunctionParts",
    "apply_function_parts",
    "check_list",
    "function_parts",
    "part_name",
    "validate_function_parts",
]

FEATURE_WORDS = 2  # 128 feature bits
_MSIX = COMMON_CFG_BY_NAME["config_msix_vector"]
_NUMQ = COMMON_CFG_BY_NAME["num_queues"]
#: the common-config fields this profile exchanges: offset -> (width, read-only)
COMMON_CFG_PARTS: dict[int, tuple[int, bool]] = {_MSIX.offset: (_MSIX.width, False), _NUMQ.offset: (_NUMQ.width, True)}

_A, _D, _FO, _OK = (
    int(DeviceStatus.ACKNOWLEDGE),
    int(DeviceStatus.DRIVER),
    int(DeviceStatus.FEATURES_OK),
    int(DeviceStatus.DRIVER_OK),
)
_REACHABLE = frozenset({0, _A, _A | _D, _A | _D | _FO, _A | _D | _FO | _OK})
_FAILED = int(DeviceStatus.FAILED)
_NEEDS_RESET = int(DeviceStatus.DEVICE_NEEDS_RESET)
_ONCE = frozenset({PartType.DEV_FEATURES, PartType.DRV_FEATURES, PartType.DEVICE_STATUS})


def part_name(part: DevPart) -> str:
    """A readable name: ``VQ_CFG[1]``, ``PCI_COMMON_CFG@0x10``, ``0x200/01:05``."""
    t, sel = part.hdr.part_type, part.hdr.selector
    try:
        name = PartType(t).name
    except ValueError:
        name = f"{t:#x}"
    if t in (PartType.VQ_CFG, PartType.VQ_NOTIFY_CFG):
        return f"{name}[{read_u16(sel, 0)}]"
    if t == PartType.PCI_COMMON_CFG:
        return f"{name}@{int.from_bytes(sel[:4], 'little'):#x}"
    if t >= DEVICE_FIRST:
        return f"{name}/{sel.hex()}"
    return name


# ------------------------------------------------------------------ GET
def function_parts(fn: VirtioPciFunction) -> list[DevPart]:
    """The common parts of ``fn`` now, in the mandatory order."""
    with fn.exclusive():
        out = [
            DevPart.make(PartType.DEV_FEATURES, encode_features(fn.offered_features(), FEATURE_WORDS), optional=True),
            DevPart.make(PartType.DRV_FEATURES, encode_features(fn.driver_features, FEATURE_WORDS)),
            DevPart.make(
                PartType.PCI_COMMON_CFG, u16(fn.config_msix_vector), selector=CommonCfgSelector(_MSIX.offset).encode()
            ),
            DevPart.make(
                PartType.PCI_COMMON_CFG, u16(len(fn.queues)), selector=CommonCfgSelector(_NUMQ.offset).encode()
            ),
            DevPart.make(PartType.DEVICE_STATUS, bytes([fn.status])),
        ]
        for q in fn.queues:
            value = VqCfgValue(
                q.size, fn.queue_msix_vectors[q.index], int(q.enabled), 0, q.desc_addr, q.avail_addr, q.used_addr
            )
            out.append(DevPart.make(PartType.VQ_CFG, value.encode(), selector=VqIndexSelector(q.index).encode()))
        for q in fn.queues:
            notify = VqNotifyValue(q.index, 0)  # queue_notify_off reads the index; NOTIF_CONFIG_DATA never offered
            out.append(DevPart.make(PartType.VQ_NOTIFY_CFG, notify.encode(), selector=VqIndexSelector(q.index).encode()))
    return out


# ------------------------------------------------------------------ list rules
def check_list(parts: list[DevPart], known_device_types: frozenset[int]) -> list[DevPart]:
    """Check the rules every list of parts follows; return the parts to use
    (unknown *optional* parts dropped).  Raises :class:`DevicePartsError`."""
    used: list[DevPart] = []
    seen_keys: set[tuple[int, bytes]] = set()
    present: set[int] = set()
    last_key = -1
    for i, p in enumerate(parts):
        t = p.hdr.part_type
        name = f"#{i} {part_name(p)}"
        known = t in {int(x) for x in PartType if x < DEVICE_FIRST} or t in known_device_types
        if not known:
            if COMMON_FIRST <= t <= DEVICE_LAST and p.hdr.optional:
                continue  # the spec lets a device ignore an optional part it does not take
            raise DevicePartsError(name, "unknown part type (not optional)")
        key = order_key(t)
        if key < last_key:
            raise DevicePartsError(name, "out of the mandatory order")
        last_key = key
        if t in _ONCE and t in present:
            raise DevicePartsError(name, "present more than once")
        if t in (PartType.DEV_FEATURES, PartType.DRV_FEATURES, PartType.DEVICE_STATUS) and p.hdr.selector != NO_SELECTOR:
            raise DevicePartsError(name, "selector must be zero")
        if (t, p.hdr.selector) in seen_keys:
            raise DevicePartsError(name, "a part with this selector is present twice")
        if t < DEVICE_FIRST:
            for need in PRECEDING[PartType(t)]:
                if need is PartType.DEV_FEATURES:
                    continue  # optional on restore: may be left out
                if need not in present:
                    raise DevicePartsError(name, f"{need.name} must precede it")
        seen_keys.add((t, p.hdr.selector))
        present.add(t)
        used.append(p)
    return used


# ------------------------------------------------------------------ SET
@dataclass(frozen=True)
class FunctionParts:
    """Common parts checked against a function, ready for :func:`apply_function_parts`."""

    driver_features: int | None
    status: int | None
    config_msix_vector: int | None
    queues: dict[int, VqCfgValue] = field(default_factory=dict)

    def negotiated(self, current: int) -> int:
        """The features the device runs with once these parts are applied
        (``current``: what it runs with now, for parts that leave them alone)."""
        if self.status is None or self.driver_features is None:
            return current
        return self.driver_features if self.status & _FO else 0


def _value(p: DevPart, name: str, size: int) -> bytes:
    if len(p.value) != size:
        raise DevicePartsError(name, f"length {len(p.value)} != {size} bytes this device has")
    return p.value


def validate_function_parts(fn: VirtioPciFunction, parts: list[DevPart]) -> FunctionParts:
    """Check the common parts of a list already passed by :func:`check_list`."""
    offered = fn.offered_features()
    drv: int | None = None
    status: int | None = None
    msix: int | None = None
    queues: dict[int, VqCfgValue] = {}
    nq = len(fn.queues)
    try:
        for p in parts:
            t = p.hdr.part_type
            name = part_name(p)
            if t == PartType.DEV_FEATURES:
                if len(p.value) != 8 * FEATURE_WORDS:
                    raise DevicePartsError(name, f"length {len(p.value)} != {8 * FEATURE_WORDS}")
                if decode_features(p.value) != offered:
                    raise DevicePartsError(name, f"{decode_features(p.value):#x} != features offered here {offered:#x}")
            elif t == PartType.DRV_FEATURES:
                drv = decode_features(_value(p, name, 8 * FEATURE_WORDS))
                if drv & ~offered:
                    raise DevicePartsError(name, f"{drv & ~offered:#x} accepted but never offered")
            elif t == PartType.PCI_COMMON_CFG:
                sel = CommonCfgSelector.decode(p.hdr.selector)
                spec = COMMON_CFG_PARTS.get(sel.offset)
                if spec is None:
                    raise DevicePartsError(name, "no common-config field exchanged at this offset")
                width, read_only = spec
                v = int.from_bytes(_value(p, name, width), "little")
                if sel.offset == _NUMQ.offset:
                    if v != nq:
                        raise DevicePartsError(name, f"num_queues {v} != {nq} here (read-only: checked, not applied)")
                elif not read_only:
                    msix = v
            elif t == PartType.DEVICE_STATUS:
                status = _value(p, name, 1)[0]
                driver_status = status & ~(_FAILED | _NEEDS_RESET)
                if driver_status not in _REACHABLE:
                    raise DevicePartsError(name, f"{status:#04x} is not a status the device can reach")
                if status & _FO:
                    assert drv is not None  # check_list: DRV_FEATURES precedes
                    if not drv & bit(Feature.VERSION_1):
                        raise DevicePartsError(name, "FEATURES_OK without VIRTIO_F_VERSION_1")
                    reason = fn.device.validate_features(drv)
                    if reason is not None:
                        raise DevicePartsError(name, reason)
            elif t == PartType.VQ_CFG:
                idx = VqIndexSelector.decode(p.hdr.selector).index
                if idx >= nq:
                    raise DevicePartsError(name, f"no such queue (the function has {nq})")
                q = VqCfgValue.decode(_value(p, name, VqCfgValue.SIZE))
                assert status is not None and drv is not None  # check_list: preceding parts
                _check_queue(fn, name, idx, q, status, drv)
                queues[idx] = q
            elif t == PartType.VQ_NOTIFY_CFG:
                idx = VqIndexSelector.decode(p.hdr.selector).index
                if idx >= nq:
                    raise DevicePartsError(name, f"no such queue (the function has {nq})")
                n = VqNotifyValue.decode(_value(p, name, VqNotifyValue.SIZE))
                if n.queue_notify_off != idx or n.queue_notif_config_data != 0:
                    raise DevicePartsError(
                        name, f"({n.queue_notify_off}, {n.queue_notif_config_data}) != ({idx}, 0) here "
                        "(read-only: checked, not applied)",
                    )
    except WireError as exc:
        raise DevicePartsError("parts", str(exc)) from exc
    return FunctionParts(drv, status, msix, queues)


def _check_queue(fn: VirtioPciFunction, name: str, idx: int, q: VqCfgValue, status: int, drv: int) -> None:
    vq = fn.queues[idx]
    if not 1 <= q.queue_size <= vq.max_size or q.queue_size & (q.queue_size - 1):
        raise DevicePartsError(name, f"size {q.queue_size} is not a power of two in 1..{vq.max_size}")
    if q.enabled not in (0, 1):
        raise DevicePartsError(name, f"enabled {q.enabled} is not 0 or 1")
    if q.enabled and not status & _FO:
        raise DevicePartsError(name, "queue enabled before FEATURES_OK")
    if q.enabled:
        event_idx = bool(drv & bit(Feature.EVENT_IDX))
        for what, addr, align, length in (
            ("queue_desc", q.queue_desc, DESC_ALIGN, desc_table_size(q.queue_size)),
            ("queue_driver", q.queue_driver, AVAIL_ALIGN, avail_ring_size(q.queue_size, event_idx)),
            ("queue_device", q.queue_device, USED_ALIGN, used_ring_size(q.queue_size, event_idx)),
        ):
            if addr % align:
                raise DevicePartsError(name, f"{what} {addr:#x} not aligned to {align}")
            if not fn.port.contains(addr, length):
                raise DevicePartsError(name, f"{what} [{addr:#x}, +{length:#x}) outside the member's memory")


def apply_function_parts(fn: VirtioPciFunction, fp: FunctionParts) -> None:
    """Write validated common parts into ``fn``; the queues configured here take
    their ring indices from memory when the device next runs."""
    with fn.exclusive():
        if fp.driver_features is not None:
            fn.driver_features = fp.driver_features
        if fp.status is not None:
            fn.status = fp.status
            fn.negotiated = fn.driver_features if fp.status & _FO else 0
            fn.needs_reset_reason = "set with DEVICE_NEEDS_RESET" if fp.status & _NEEDS_RESET else None
        if fp.config_msix_vector is not None:
            fn.config_msix_vector = fp.config_msix_vector
        event_idx = bool(fn.negotiated & bit(Feature.EVENT_IDX))
        indirect = bool(fn.negotiated & bit(Feature.INDIRECT_DESC))
        for idx, q in fp.queues.items():
            vq = fn.queues[idx]
            vq.reset()
            vq.size = q.queue_size
            vq.desc_addr, vq.avail_addr, vq.used_addr = q.queue_desc, q.queue_driver, q.queue_device
            vq.event_idx = event_idx
            vq.indirect_desc = indirect
            vq.enabled = bool(q.enabled)
            vq.resync_pending = bool(q.enabled)
            fn.queue_msix_vectors[idx] = q.vector
