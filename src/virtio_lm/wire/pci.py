"""Virtio over PCI: register layout, capabilities, ids (virtio 1.x, 4.1).

``virtio_pci_common_cfg`` is described as data (:data:`COMMON_CFG`): one
:class:`CommonCfgField` per register with its offset, width, access and the
spec version that added it.  :func:`lookup` maps a driver's (offset, width)
access to the register it touches, refusing misaligned, unknown and
width-mismatched accesses with :class:`~virtio_lm.errors.RegisterAccessError`
(attributes ``offset``, ``width``, ``field``, ``reason``).

The spec's access rule (4.1.3.1): 8-bit fields by 8-bit accesses, 16-bit by
aligned 16-bit, 32-bit by aligned 32-bit, and the 64-bit queue addresses by
two aligned 32-bit accesses (low and high half, in any order).  An 8-byte
access is therefore refused here; a transport that wants to accept one splits
it into the two halves itself.

Two registers exist only since virtio 1.2 and belong to standard features
whose bits the VF migration proposal reuses (see :mod:`.features`):
``queue_notif_config_data`` (1.2 named it ``queue_notify_data``;
VIRTIO_F_NOTIF_CONFIG_DATA, bit 39) and ``queue_reset`` (VIRTIO_F_RING_RESET,
bit 40).  virtio-lm never negotiates those features, so a virtio-lm function
may expose :data:`COMMON_CFG_V1_0` only; :data:`COMMON_CFG` lists them so the
offsets are checked.  The admin-queue registers ``admin_queue_index`` (0x3C)
and ``admin_queue_num`` (0x3E) belong to VIRTIO_F_ADMIN_VQ (bit 41, virtio
1.3): a PF of the virtio-1.4 profile offers it and reports its admin queue
there; on any other function they read 0.

Device status bits and device ids are in :mod:`.features`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from virtio_lm.errors import FieldValueError, RegisterAccessError
from virtio_lm.wire.codec import enum_field, layout, reserved
from virtio_lm.wire.features import Feature

# ------------------------------------------------------------------ ids
VIRTIO_PCI_VENDOR_ID = 0x1AF4
VIRTIO_PCI_MODERN_DEVICE_ID_BASE = 0x1040
VIRTIO_PCI_MODERN_DEVICE_ID_LAST = 0x107F
PCI_CAP_ID_VNDR = 0x09
VIRTIO_MSI_NO_VECTOR = 0xFFFF


def modern_device_id(device_type: int) -> int:
    """PCI device id of a modern (non-transitional) virtio device of ``device_type``."""
    pci_id = VIRTIO_PCI_MODERN_DEVICE_ID_BASE + device_type
    if not 1 <= device_type or pci_id > VIRTIO_PCI_MODERN_DEVICE_ID_LAST:
        raise FieldValueError("pci_id", "device_type", device_type, "1..63")
    return pci_id


def device_type_of(pci_device_id: int) -> int:
    """Virtio device type of a modern PCI device id (0x1041..0x107f)."""
    if not VIRTIO_PCI_MODERN_DEVICE_ID_BASE < pci_device_id <= VIRTIO_PCI_MODERN_DEVICE_ID_LAST:
        raise FieldValueError("pci_id", "device_id", pci_device_id, "0x1041..0x107f")
    return pci_device_id - VIRTIO_PCI_MODERN_DEVICE_ID_BASE


# ------------------------------------------------------------------ ISR, capabilities
class IsrBits(enum.IntFlag):
    QUEUE = 1
    CONFIG = 2


class CapType(enum.IntEnum):
    """``cfg_type`` of a virtio vendor capability."""

    COMMON = 1
    NOTIFY = 2
    ISR = 3
    DEVICE = 4
    PCI = 5
    SHARED_MEMORY = 8
    VENDOR = 9


MAX_BAR = 5


def _check_cap(name: str, cap_vndr: int, cap_len: int, cfg_type: int, bar: int, min_len: int) -> None:
    if cap_vndr != PCI_CAP_ID_VNDR:
        raise FieldValueError(name, "cap_vndr", cap_vndr, f"PCI_CAP_ID_VNDR ({PCI_CAP_ID_VNDR:#x})")
    if cap_len < min_len:
        raise FieldValueError(name, "cap_len", cap_len, f"at least {min_len}")
    if cfg_type == CapType.VENDOR:
        raise FieldValueError(name, "cfg_type", cfg_type, "VENDOR capabilities have their own layout")
    if bar > MAX_BAR:
        raise FieldValueError(name, "bar", bar, f"a BAR number 0..{MAX_BAR}")


@layout("<BBBBBBHII")
@dataclass(frozen=True, slots=True)
class VirtioPciCap:
    """``struct virtio_pci_cap`` (16 bytes)."""

    cap_vndr: int = PCI_CAP_ID_VNDR
    cap_next: int = 0
    cap_len: int = 16
    cfg_type: CapType = enum_field(CapType, CapType.COMMON)
    bar: int = 0
    id: int = 0
    padding: int = reserved()
    offset: int = 0
    length: int = 0

    def __post_init__(self) -> None:
        _check_cap("virtio_pci_cap", self.cap_vndr, self.cap_len, self.cfg_type, self.bar, 16)


@layout("<BBBBBBHIIII")
@dataclass(frozen=True, slots=True)
class VirtioPciCap64:
    """``struct virtio_pci_cap64`` (24 bytes): a capability with 64-bit offset/length."""

    cap_vndr: int = PCI_CAP_ID_VNDR
    cap_next: int = 0
    cap_len: int = 24
    cfg_type: CapType = enum_field(CapType, CapType.SHARED_MEMORY)
    bar: int = 0
    id: int = 0
    padding: int = reserved()
    offset: int = 0
    length: int = 0
    offset_hi: int = 0
    length_hi: int = 0

    def __post_init__(self) -> None:
        _check_cap("virtio_pci_cap64", self.cap_vndr, self.cap_len, self.cfg_type, self.bar, 24)

    @property
    def offset64(self) -> int:
        return self.offset | self.offset_hi << 32

    @property
    def length64(self) -> int:
        return self.length | self.length_hi << 32


@layout("<BBBBBBHIII")
@dataclass(frozen=True, slots=True)
class VirtioPciNotifyCap:
    """``struct virtio_pci_notify_cap`` (20 bytes).

    ``cfg_type`` is NOTIFY; ``notify_off_multiplier`` is 0 (every queue
    notifies at the same address) or an even power of two.
    """

    cap_vndr: int = PCI_CAP_ID_VNDR
    cap_next: int = 0
    cap_len: int = 20
    cfg_type: CapType = enum_field(CapType, CapType.NOTIFY)
    bar: int = 0
    id: int = 0
    padding: int = reserved()
    offset: int = 0
    length: int = 0
    notify_off_multiplier: int = 0

    def __post_init__(self) -> None:
        _check_cap("virtio_pci_notify_cap", self.cap_vndr, self.cap_len, self.cfg_type, self.bar, 20)
        if self.cfg_type != CapType.NOTIFY:
            raise FieldValueError("virtio_pci_notify_cap", "cfg_type", self.cfg_type, "NOTIFY (2)")
        m = self.notify_off_multiplier
        if m and (m < 2 or m & (m - 1)):
            raise FieldValueError(
                "virtio_pci_notify_cap", "notify_off_multiplier", m, "0 or an even power of two"
            )


def notify_address_offset(cap: VirtioPciNotifyCap, queue_notify_off: int) -> int:
    """Offset in the cap's BAR where the driver notifies a queue."""
    return cap.offset + queue_notify_off * cap.notify_off_multiplier


# ------------------------------------------------------------------ common configuration
class Access(enum.Enum):
    RO = "ro"  # read-only for the driver
    RW = "rw"


@dataclass(frozen=True, slots=True)
class CommonCfgField:
    name: str
    offset: int
    width: int  # bytes: 1, 2, 4 or 8
    access: Access
    since: str  # virtio spec version that added the register
    per_queue: bool  # applies to the queue chosen by queue_select
    feature: int | None = None  # standard feature the register belongs to, if any


_RO, _RW = Access.RO, Access.RW

COMMON_CFG: tuple[CommonCfgField, ...] = (
    CommonCfgField("device_feature_select", 0x00, 4, _RW, "1.0", False),
    CommonCfgField("device_feature", 0x04, 4, _RO, "1.0", False),
    CommonCfgField("driver_feature_select", 0x08, 4, _RW, "1.0", False),
    CommonCfgField("driver_feature", 0x0C, 4, _RW, "1.0", False),
    CommonCfgField("config_msix_vector", 0x10, 2, _RW, "1.0", False),
    CommonCfgField("num_queues", 0x12, 2, _RO, "1.0", False),
    CommonCfgField("device_status", 0x14, 1, _RW, "1.0", False),
    CommonCfgField("config_generation", 0x15, 1, _RO, "1.0", False),
    CommonCfgField("queue_select", 0x16, 2, _RW, "1.0", False),
    CommonCfgField("queue_size", 0x18, 2, _RW, "1.0", True),
    CommonCfgField("queue_msix_vector", 0x1A, 2, _RW, "1.0", True),
    CommonCfgField("queue_enable", 0x1C, 2, _RW, "1.0", True),
    CommonCfgField("queue_notify_off", 0x1E, 2, _RO, "1.0", True),
    CommonCfgField("queue_desc", 0x20, 8, _RW, "1.0", True),
    CommonCfgField("queue_driver", 0x28, 8, _RW, "1.0", True),
    CommonCfgField("queue_device", 0x30, 8, _RW, "1.0", True),
    CommonCfgField("queue_notif_config_data", 0x38, 2, _RO, "1.2", True, Feature.NOTIF_CONFIG_DATA),
    CommonCfgField("queue_reset", 0x3A, 2, _RW, "1.2", True, Feature.RING_RESET),
    CommonCfgField("admin_queue_index", 0x3C, 2, _RO, "1.3", False, Feature.ADMIN_VQ),
    CommonCfgField("admin_queue_num", 0x3E, 2, _RO, "1.3", False, Feature.ADMIN_VQ),
)

COMMON_CFG_V1_0: tuple[CommonCfgField, ...] = tuple(f for f in COMMON_CFG if f.since == "1.0")
COMMON_CFG_BY_NAME: dict[str, CommonCfgField] = {f.name: f for f in COMMON_CFG}


def common_cfg_size(fields: tuple[CommonCfgField, ...] = COMMON_CFG) -> int:
    last = max(fields, key=lambda f: f.offset)
    return last.offset + last.width


COMMON_CFG_SIZE = common_cfg_size(COMMON_CFG)  # 0x40
COMMON_CFG_V1_0_SIZE = common_cfg_size(COMMON_CFG_V1_0)  # 0x38


@dataclass(frozen=True, slots=True)
class RegisterAccess:
    """One legal access: the register and the bit position of the accessed part.

    ``shift`` is 0 except for the high half of a 64-bit register (32); the
    accessed value is ``(register_value >> shift) & mask``.
    """

    field: CommonCfgField
    width: int
    shift: int

    @property
    def mask(self) -> int:
        return (1 << (8 * self.width)) - 1


def _refuse(offset: int, width: int, field: str | None, reason: str, message: str) -> RegisterAccessError:
    err = RegisterAccessError(f"virtio_pci_common_cfg[{offset:#x}/{width}]: {message}")
    err.offset = offset  # type: ignore[attr-defined]
    err.width = width  # type: ignore[attr-defined]
    err.field = field  # type: ignore[attr-defined]
    err.reason = reason  # type: ignore[attr-defined]
    return err


def lookup(
    offset: int, width: int, fields: tuple[CommonCfgField, ...] = COMMON_CFG
) -> RegisterAccess:
    """The register a common-config access of ``width`` bytes at ``offset`` touches.

    Raises :class:`RegisterAccessError` with ``reason`` one of ``"width"``
    (not 1/2/4, or not the register's width), ``"misaligned"`` (offset not a
    multiple of the width, or inside a register) or ``"unknown"`` (no register
    there), and ``field`` the register's name when there is one.
    """
    if width not in (1, 2, 4):
        raise _refuse(offset, width, None, "width", "access width must be 1, 2 or 4")
    if offset < 0 or offset % width:
        raise _refuse(offset, width, None, "misaligned", f"offset not aligned to {width}")
    for f in fields:
        if f.offset <= offset < f.offset + f.width:
            break
    else:
        raise _refuse(offset, width, None, "unknown", "no register at this offset")
    if f.width == 8:
        if width != 4:
            raise _refuse(offset, width, f.name, "width", "64-bit registers take two 32-bit accesses")
        return RegisterAccess(f, 4, 8 * (offset - f.offset))
    if offset != f.offset:
        raise _refuse(offset, width, f.name, "misaligned", f"inside {f.name}")
    if width != f.width:
        raise _refuse(offset, width, f.name, "width", f"{f.name} is {f.width} bytes wide")
    return RegisterAccess(f, width, 0)
