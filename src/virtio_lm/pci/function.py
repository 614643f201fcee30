"""One virtio-PCI function, driven through its registers.

:class:`VirtioPciFunction` models what a driver sees of a virtio PCI device:

* the ``virtio_pci_common_cfg`` registers at their spec offsets
  (:meth:`common_read` / :meth:`common_write`, 1/2/4-byte accesses at each
  register's natural width; a 64-bit queue address may be accessed as one
  8-byte access or as its 32-bit low and high halves);
* one doorbell per queue (:meth:`notify`; ``queue_notify_off`` reads the
  queue index);
* the ISR status byte (:meth:`isr_read`, read-to-clear: bit 0 queue
  interrupt, bit 1 configuration change);
* the device-specific configuration (:meth:`device_config_read` /
  :meth:`device_config_write`, naturally aligned 1/2/4/8-byte accesses,
  delegated to the :class:`~virtio_lm.pci.device.VirtioDevice`);
* interrupts, delivered to :attr:`on_interrupt` with the *source*: the queue
  index, or :data:`CONFIG_INTERRUPT` (-1) for a configuration change.  The
  MSI-X vector the driver programmed for that source is kept in
  :attr:`config_msix_vector` / :attr:`queue_msix_vectors` (see
  :meth:`msix_vector`).  The ISR is updated whether or not a vector is set
  (MSI-X enable is in the configuration space, :attr:`msix_enabled`; QEMU's vfio-user
  client emulates the MSI-X table and masking itself).
* the PCI configuration space (:meth:`config_read` / :meth:`config_write`,
  :mod:`virtio_lm.pci.config`): header, capability list, MSI-X, PCI Express with
  Function Level Reset by the Device Control register;
* BAR 0 (:meth:`bar_read` / :meth:`bar_write`): the structures above at the offsets of
  :data:`virtio_lm.wire.pcicfg.BAR0`, where the virtio capabilities point.

Every access the function refuses raises a :class:`TransportError` subclass
and changes nothing.  The one exception to "refuse loudly" is FEATURES_OK:
as the spec prescribes, a feature set the device does not accept is
signalled by FEATURES_OK not sticking in ``device_status``.

Device status
-------------
``STATUS_TRANSITIONS`` is the table of every legal device_status write
(keyed by the current driver-visible status and the value written, with
DEVICE_NEEDS_RESET masked out on both sides: that bit belongs to the device
and only a reset clears it).  Bits are added in the spec's order
ACKNOWLEDGE -> DRIVER -> FEATURES_OK -> DRIVER_OK; ACKNOWLEDGE|DRIVER may be
written at once, FEATURES_OK and DRIVER_OK each need their own write (the
driver must read FEATURES_OK back in between).  FAILED may be added in any
state; after FAILED only a reset is accepted.  Writing 0 resets from any
state; rewriting the current value is a no-op.  Every other write raises
:class:`StatusTransitionError` and leaves the status as it was.

Locks (the one statement of their order)
----------------------------------------
A function and the device bound to it share these locks, always taken in this order
and never the other way round:

0. the function's configuration-space lock -- ``ConfigSpace.locked()`` (re-entrant; a
   configuration write whose register acts -- FLR, VF Enable -- holds it while it acts);
1. the function's register lock -- :meth:`VirtioPciFunction.locked` (re-entrant; every
   register access, a state image's save / apply: ``pci.snapshot``,
   ``devices.base.QueueDevice.mig_save`` / ``mig_restore``);
2. the device's lock -- :meth:`virtio_lm.devices.base.QueueDevice.locked` (its queues and
   in-flight requests);
3. a leaf lock, under which nothing else is taken: the function's interrupt lock (ISR and
   the device-owned status bit; private to this class), or, for the vhost-user transport,
   its fd lock (:meth:`virtio_lm.vhost.backend.VhostFunction.fds_locked`), which also
   offers ``locked()`` in the place of 1.

Each lock is held only by its owner's methods and by a caller through ``locked()``;
no module names another class's lock attribute (``tests/test_architecture.py``).
"""

from __future__ import annotations

import enum
import threading
from contextlib import AbstractContextManager
from typing import Callable

from virtio_lm.errors import (
    QueueSetupError,
    RegisterAccessError,
    StatusTransitionError,
    TransportError,
    VirtioLmError,
    VirtqueueError,
)
from virtio_lm.memory import MemoryPort
from virtio_lm.pci.config import CapLayout, ConfigSpace, build_function_config
from virtio_lm.pci.device import VirtioDevice
from virtio_lm.virtqueue.device import Virtqueue
from virtio_lm.wire.codec import int_le, le_int
from virtio_lm.wire.features import DeviceStatus, Feature, bit
from virtio_lm.wire import pcicfg as C
from virtio_lm.wire.pci import COMMON_CFG, COMMON_CFG_BY_NAME, Access, IsrBits, VIRTIO_MSI_NO_VECTOR, VirtioPciCap, lookup

__all__ = [
    "CONFIG_INTERRUPT",
    "STATUS_LADDER",
    "STATUS_TRANSITIONS",
    "StatusAction",
    "VirtioPciFunction",
]

#: the source passed to ``on_interrupt`` for a configuration-change interrupt
CONFIG_INTERRUPT = -1

_U32 = 0xFFFF_FFFF
FEATURE_INDIRECT_DESC = bit(Feature.INDIRECT_DESC)
FEATURE_EVENT_IDX = bit(Feature.EVENT_IDX)
FEATURE_VERSION_1 = bit(Feature.VERSION_1)
FEATURE_SR_IOV = bit(Feature.SR_IOV)
FEATURE_ADMIN_VQ = bit(Feature.ADMIN_VQ)

ACK = int(DeviceStatus.ACKNOWLEDGE)
DRV = int(DeviceStatus.DRIVER)
FOK = int(DeviceStatus.FEATURES_OK)
DOK = int(DeviceStatus.DRIVER_OK)
NEEDS_RESET = int(DeviceStatus.DEVICE_NEEDS_RESET)
FAILED = int(DeviceStatus.FAILED)
DRIVER_BITS = ACK | DRV | FOK | DOK | FAILED


class StatusAction(enum.Enum):
    """What a legal device_status write does."""

    RESET = "reset"              # 0 written: device reset
    NOOP = "noop"                # the current value rewritten
    SET = "set"                  # ACKNOWLEDGE / DRIVER added
    FEATURES_OK = "features_ok"  # FEATURES_OK added: negotiate (may not stick)
    DRIVER_OK = "driver_ok"      # DRIVER_OK added: activate the device
    FAIL = "fail"                # FAILED added: the driver gave up


#: the driver-visible status values the machine passes through, in order
STATUS_LADDER: tuple[int, ...] = (0, ACK, ACK | DRV, ACK | DRV | FOK, ACK | DRV | FOK | DOK)

_FORWARD: dict[tuple[int, int], StatusAction] = {
    (0, ACK): StatusAction.SET,
    (0, ACK | DRV): StatusAction.SET,
    (ACK, ACK | DRV): StatusAction.SET,
    (ACK | DRV, ACK | DRV | FOK): StatusAction.FEATURES_OK,
    (ACK | DRV | FOK, ACK | DRV | FOK | DOK): StatusAction.DRIVER_OK,
}


def _build_status_table() -> dict[tuple[int, int], StatusAction]:
    table: dict[tuple[int, int], StatusAction] = dict(_FORWARD)
    for s in STATUS_LADDER:
        table[(s, s)] = StatusAction.NOOP
        table[(s, s | FAILED)] = StatusAction.FAIL
        table[(s | FAILED, s | FAILED)] = StatusAction.NOOP
    for s in STATUS_LADDER:
        table[(s, 0)] = StatusAction.RESET
        table[(s | FAILED, 0)] = StatusAction.RESET
    return table


#: (current driver-visible status, value written with NEEDS_RESET masked) -> action.
#: Pairs not in the table are refused with StatusTransitionError.
STATUS_TRANSITIONS: dict[tuple[int, int], StatusAction] = _build_status_table()


class _Reg(enum.Enum):
    DEVICE_FEATURE_SELECT = "device_feature_select"
    DEVICE_FEATURE = "device_feature"
    DRIVER_FEATURE_SELECT = "driver_feature_select"
    DRIVER_FEATURE = "driver_feature"
    CONFIG_MSIX_VECTOR = "config_msix_vector"
    NUM_QUEUES = "num_queues"
    DEVICE_STATUS = "device_status"
    CONFIG_GENERATION = "config_generation"
    QUEUE_SELECT = "queue_select"
    QUEUE_SIZE = "queue_size"
    QUEUE_MSIX_VECTOR = "queue_msix_vector"
    QUEUE_ENABLE = "queue_enable"
    QUEUE_NOTIFY_OFF = "queue_notify_off"
    QUEUE_DESC = "queue_desc"
    QUEUE_DRIVER = "queue_driver"
    QUEUE_DEVICE = "queue_device"
    QUEUE_NOTIF_CONFIG_DATA = "queue_notif_config_data"
    QUEUE_RESET = "queue_reset"
    ADMIN_QUEUE_INDEX = "admin_queue_index"
    ADMIN_QUEUE_NUM = "admin_queue_num"


_REG_BY_NAME = {r.value: r for r in _Reg}
assert set(_REG_BY_NAME) == set(COMMON_CFG_BY_NAME), "wire.pci.COMMON_CFG and _Reg disagree"
_READ_ONLY = frozenset(_REG_BY_NAME[f.name] for f in COMMON_CFG if f.access is Access.RO)
_WIDE = {f.offset: _REG_BY_NAME[f.name] for f in COMMON_CFG if f.width == 8}
ISR_QUEUE = int(IsrBits.QUEUE)
ISR_CONFIG = int(IsrBits.CONFIG)
_QUEUE_ADDR = {
    _Reg.QUEUE_DESC: "desc_addr",
    _Reg.QUEUE_DRIVER: "avail_addr",
    _Reg.QUEUE_DEVICE: "used_addr",
}


class VirtioPciFunction:
    """One PCI function exposing a :class:`VirtioDevice` through virtio_pci_common_cfg."""

    #: feature bits the transport adds to / removes from the device's offer
    _transport_offer: int = 0
    _transport_mask: int = FEATURE_SR_IOV  # only an SR-IOV PF offers VIRTIO_F_SR_IOV

    def __init__(
        self, device: VirtioDevice, port: MemoryPort, *, name: str, withheld_features: int = 0, vf: bool = False
    ) -> None:
        if not isinstance(device, VirtioDevice):
            raise TypeError(f"device must be a VirtioDevice, got {type(device).__name__}")
        self.name = name
        self.device = device
        self.port = port
        #: feature bits this function never offers whatever its device offers (a PF of
        #: the virtio-1.4 profile withholds the proposal's bits from its VFs)
        self.withheld_features = withheld_features
        #: admin queues follow the device's ``num_queues`` queues (VIRTIO_F_ADMIN_VQ)
        self.admin_queue_index = device.num_queues
        self.admin_queue_num = device.admin_queues
        self.queues: list[Virtqueue] = [
            Virtqueue(i, device.queue_max_size, name=f"{name}.q{i}")
            for i in range(device.num_queues + device.admin_queues)
        ]
        self.on_interrupt: Callable[[int], None] = _no_interrupt
        # register state
        self.status = 0
        self.config_generation = 0
        self._isr = 0
        self._clear_registers()
        # diagnostics
        self.notifies_ignored = 0
        self.interrupt_counts: dict[int, int] = {}
        self.reset_count = 0
        self.flr_count = 0
        self._driver_ok_listeners: list[Callable[[VirtioPciFunction], None]] = []
        self._lock = threading.RLock()      # register accesses
        self._irq_lock = threading.Lock()   # ISR and the device-owned status bit
        for q in self.queues:
            self._wire_queue(q)
        #: True for a VF of an SR-IOV PF (its header reads as SR-IOV has it)
        self.is_vf = vf
        self._flr_callbacks: list[Callable[[], None]] = []
        self.msix_vectors = len(self.queues) + 1
        self._msix_table = bytearray()
        self._reset_msix_table()
        self.config: ConfigSpace
        self.caps: CapLayout
        self.config, self.caps = build_function_config(
            device_type=int(device.device_id), queues=len(self.queues), device_config_size=device.config_size,
            msix_vectors=self.msix_vectors, vf=vf,
        )
        self.config.hook(self.caps.exp + C.PCI_EXP_DEVCTL, 2, self._devctl_written)
        self.config.window(self.caps.pci_cfg + C.VIRTIO_PCI_CFG_CAP_DATA, 4, self._cfg_window_read,
                           self._cfg_window_write)
        self.config.seal()
        device.bind(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, status={self.status:#04x})"

    def locked(self) -> AbstractContextManager[bool]:
        """``with fn.locked():`` holds the register lock (re-entrant): no register access
        runs meanwhile.  Lock order: the module docstring."""
        return self._lock

    # ================================================================== features
    def offered_features(self) -> int:
        """The 64 feature bits this function offers (device_feature)."""
        return (
            (self.device.offered_features() & ~self._transport_mask | self._transport_offer)
            & ~self.withheld_features
            & ((1 << 64) - 1)
        )

    def add_driver_ok_listener(self, cb: Callable[["VirtioPciFunction"], None]) -> None:
        """Call ``cb(fn)`` each time the driver sets DRIVER_OK (after the device's activate)."""
        self._driver_ok_listeners.append(cb)

    def exclusive(self) -> AbstractContextManager[bool]:
        """The register lock: hold it (``with fn.exclusive():``) to change the
        function's state as one step no register access can see half done."""
        return self._lock

    def has_feature(self, bit_mask: int) -> bool:
        """Whether every bit of ``bit_mask`` was negotiated."""
        return self.negotiated & bit_mask == bit_mask

    # ================================================================== common cfg
    def _lookup(self, offset: int, width: int) -> tuple[_Reg, str | None]:
        """(register, part): part None for a whole register, "lo"/"hi" for a
        32-bit half of a 64-bit queue address.  An 8-byte access at the start
        of a 64-bit register is taken as both halves at once."""
        if isinstance(offset, bool) or not isinstance(offset, int) or isinstance(width, bool) or not isinstance(width, int):
            raise RegisterAccessError(f"{self.name}: offset and width must be ints")
        if width == 8 and offset in _WIDE:
            return _WIDE[offset], None
        acc = lookup(offset, width, COMMON_CFG)
        reg = _REG_BY_NAME[acc.field.name]
        if acc.field.width == 8:
            return reg, "hi" if acc.shift else "lo"
        return reg, None

    def common_read(self, offset: int, width: int) -> int:
        """Read the common_cfg register at ``offset`` with a ``width``-byte access."""
        reg, part = self._lookup(offset, width)
        with self._lock:
            value = self._read_reg(reg)
        if part == "lo":
            return value & _U32
        if part == "hi":
            return value >> 32
        return value

    def common_write(self, offset: int, width: int, value: int) -> None:
        """Write ``value`` to the common_cfg register at ``offset`` with a ``width``-byte access."""
        reg, part = self._lookup(offset, width)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < (1 << (8 * width)):
            raise RegisterAccessError(
                f"{self.name}: value {value!r} does not fit a {width}-byte write to {reg.value}"
            )
        if reg in _READ_ONLY:
            raise RegisterAccessError(f"{self.name}: {reg.value} is read-only")
        with self._lock:
            self._write_reg(reg, part, value)

    # ------------------------------------------------------------------ reads
    def _selected(self) -> Virtqueue | None:
        qs = self.queue_select
        return self.queues[qs] if qs < len(self.queues) else None

    def _read_reg(self, reg: _Reg) -> int:
        if reg is _Reg.DEVICE_FEATURE_SELECT:
            return self.device_feature_select
        if reg is _Reg.DEVICE_FEATURE:
            return _window(self.offered_features(), self.device_feature_select)
        if reg is _Reg.DRIVER_FEATURE_SELECT:
            return self.driver_feature_select
        if reg is _Reg.DRIVER_FEATURE:
            return _window(self.driver_features, self.driver_feature_select)
        if reg is _Reg.CONFIG_MSIX_VECTOR:
            return self.config_msix_vector
        if reg is _Reg.NUM_QUEUES:
            return len(self.queues) - self.admin_queue_num  # admin queues are not counted
        if reg is _Reg.ADMIN_QUEUE_INDEX:
            return self.admin_queue_index if self.negotiated & FEATURE_ADMIN_VQ else 0
        if reg is _Reg.ADMIN_QUEUE_NUM:
            return self.admin_queue_num if self.negotiated & FEATURE_ADMIN_VQ else 0
        if reg is _Reg.DEVICE_STATUS:
            return self.status
        if reg is _Reg.CONFIG_GENERATION:
            return self.config_generation
        if reg is _Reg.QUEUE_SELECT:
            return self.queue_select
        if reg in (_Reg.QUEUE_NOTIF_CONFIG_DATA, _Reg.QUEUE_RESET):
            return 0  # NOTIF_CONFIG_DATA and RING_RESET are never offered
        q = self._selected()
        if q is None:
            return 0  # a non-existent queue: size 0 tells the driver it is not there
        if reg is _Reg.QUEUE_SIZE:
            return q.size
        if reg is _Reg.QUEUE_MSIX_VECTOR:
            return self.queue_msix_vectors[q.index]
        if reg is _Reg.QUEUE_ENABLE:
            return 1 if q.enabled else 0
        if reg is _Reg.QUEUE_NOTIFY_OFF:
            return q.index
        return int(getattr(q, _QUEUE_ADDR[reg]))

    # ------------------------------------------------------------------ writes
    def _write_reg(self, reg: _Reg, part: str | None, value: int) -> None:
        if reg is _Reg.DEVICE_FEATURE_SELECT:
            self.device_feature_select = value
        elif reg is _Reg.DRIVER_FEATURE_SELECT:
            self.driver_feature_select = value
        elif reg is _Reg.DRIVER_FEATURE:
            self._write_driver_feature(value)
        elif reg is _Reg.CONFIG_MSIX_VECTOR:
            self.config_msix_vector = value
        elif reg is _Reg.DEVICE_STATUS:
            self._write_status(value)
        elif reg is _Reg.QUEUE_SELECT:
            self.queue_select = value
        elif reg is _Reg.QUEUE_RESET:
            raise RegisterAccessError(f"{self.name}: queue_reset needs VIRTIO_F_RING_RESET, never offered")
        else:
            self._write_queue_reg(reg, part, value)

    def _write_driver_feature(self, value: int) -> None:
        sel = self.driver_feature_select
        if self.status & FOK:
            raise RegisterAccessError(f"{self.name}: driver_feature written after FEATURES_OK")
        if sel > 1:
            if value:
                raise RegisterAccessError(
                    f"{self.name}: driver_feature_select {sel} has no feature bits; wrote {value:#x}"
                )
            return
        shift = 32 * sel
        self.driver_features = (self.driver_features & ~(_U32 << shift)) | (value << shift)

    def _write_queue_reg(self, reg: _Reg, part: str | None, value: int) -> None:
        q = self._selected()
        if q is None:
            raise QueueSetupError(
                f"{self.name}: {reg.value} written with queue_select {self.queue_select}, "
                f"but the function has {len(self.queues)} queues"
            )
        if reg is _Reg.QUEUE_MSIX_VECTOR:
            self.queue_msix_vectors[q.index] = value
            return
        if reg is _Reg.QUEUE_ENABLE:
            self._enable_queue(q, value)
            return
        if q.enabled:
            raise QueueSetupError(f"{self.name}: queue {q.index} is enabled; {reg.value} is frozen")
        if reg is _Reg.QUEUE_SIZE:
            if value == 0 or value & (value - 1) or value > q.max_size:
                raise QueueSetupError(
                    f"{self.name}: queue {q.index} size {value} is not a power of two <= {q.max_size}"
                )
            q.size = value
            return
        attr = _QUEUE_ADDR[reg]
        cur = int(getattr(q, attr))
        if part == "lo":
            value = (cur & ~_U32) | value
        elif part == "hi":
            value = (cur & _U32) | (value << 32)
        setattr(q, attr, value)

    def _enable_queue(self, q: Virtqueue, value: int) -> None:
        if value != 1:
            raise QueueSetupError(
                f"{self.name}: queue_enable {value} refused (only 1 may be written; "
                "a queue is disabled by a device reset)"
            )
        if q.enabled:
            return
        if not self.status & FOK or self.status & FAILED:
            raise QueueSetupError(f"{self.name}: queue {q.index} enabled before FEATURES_OK")
        try:
            q.check_config(self.port)
        except VirtioLmError as exc:
            raise QueueSetupError(f"{self.name}: queue {q.index} has an invalid ring: {exc}") from exc
        q.enabled = True

    # ------------------------------------------------------------------ status
    def _write_status(self, value: int) -> None:
        cur = self.status & DRIVER_BITS
        new = value & ~NEEDS_RESET
        action = STATUS_TRANSITIONS.get((cur, new))
        if action is None:
            raise StatusTransitionError(
                f"{self.name}: device_status {cur:#04x} -> {new:#04x} is not a legal transition"
            )
        if action is StatusAction.RESET:
            self._reset()
        elif action is StatusAction.NOOP:
            pass
        elif action is StatusAction.FEATURES_OK:
            reason = self._check_features(self.driver_features)
            self.features_refusal = reason
            if reason is None:
                self.negotiated = self.driver_features
                for q in self.queues:
                    q.event_idx = bool(self.negotiated & FEATURE_EVENT_IDX)
                    q.indirect_desc = bool(self.negotiated & FEATURE_INDIRECT_DESC)
                self._set_driver_bits(new)
        elif action is StatusAction.DRIVER_OK:
            self._set_driver_bits(new)
            self.device.activate(self)
            for cb in self._driver_ok_listeners:
                cb(self)
        else:  # SET, FAIL
            self._set_driver_bits(new)

    def _set_driver_bits(self, bits: int) -> None:
        with self._irq_lock:
            self.status = bits | (self.status & NEEDS_RESET)

    def _check_features(self, features: int) -> str | None:
        unoffered = features & ~self.offered_features()
        if unoffered:
            return f"driver accepted features the device does not offer: {_bits(unoffered)}"
        if not features & FEATURE_VERSION_1:
            return "driver did not accept VIRTIO_F_VERSION_1"
        return self.device.validate_features(features)

    # ================================================================== reset / FLR
    def _reset(self) -> None:
        self.device.reset()
        for q in self.queues:
            q.reset()
            q.event_idx = False
            q.indirect_desc = False
            self._wire_queue(q)
        with self._irq_lock:
            self.status = 0
            self._isr = 0
        self._clear_registers()
        self.reset_count += 1

    def _clear_registers(self) -> None:
        """The registers and diagnostics a reset clears (status and ISR aside)."""
        self.driver_features = 0
        self.negotiated = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.queue_select = 0
        self.config_msix_vector = VIRTIO_MSI_NO_VECTOR
        self.queue_msix_vectors = [VIRTIO_MSI_NO_VECTOR] * len(self.queues)
        self.features_refusal: str | None = None  # why the last FEATURES_OK did not stick
        self.needs_reset_reason: str | None = None

    def reset(self) -> None:
        """Device reset, as a write of 0 to device_status."""
        with self._lock:
            self._reset()

    def flr(self) -> None:
        """Function level reset: everything a device reset clears, from any state, and the
        configuration space back to its power-on values.  A driver starts one by setting
        "Initiate Function Level Reset" in the PCI Express Device Control register
        (:meth:`config_write`); this method is what that write does."""
        with self.config.locked(), self._lock:
            self._reset()
            self.config_generation = 0
            self.flr_count += 1
            self.config.reset()
            self._reset_msix_table()

    def add_flr_callback(self, cb: Callable[[], None]) -> None:
        """``cb()`` after each Function Level Reset started through the Device Control register."""
        self._flr_callbacks.append(cb)

    # ================================================================== configuration space
    def config_read(self, offset: int, width: int) -> int:
        """A configuration-space read (1/2/4 bytes, naturally aligned; see :mod:`virtio_lm.pci.config`)."""
        return self.config.read(offset, width)

    def config_write(self, offset: int, width: int, value: int) -> None:
        """A configuration-space write: read-only bits ignore it, registers with side effects act."""
        self.config.write(offset, width, value)

    def _devctl_written(self, old: int, new: int) -> int:
        if not new & C.PCI_EXP_DEVCTL_BCR_FLR:
            return new
        self.flr()
        for cb in list(self._flr_callbacks):
            cb()
        return C.cfg_int(self.config.peek(self.caps.exp + C.PCI_EXP_DEVCTL, 2))

    @property
    def msix_enabled(self) -> bool:
        flags = C.cfg_int(self.config.peek(self.caps.msix + C.PCI_MSIX_FLAGS, 2))
        return bool(flags & C.PCI_MSIX_FLAGS_ENABLE)

    def _cfg_window(self) -> tuple[int, int, int]:
        at = self.caps.pci_cfg
        bar = self.config.peek(at + VirtioPciCap.OFFSETS["bar"], 1)[0]
        off = C.cfg_int(self.config.peek(at + VirtioPciCap.OFFSETS["offset"], 4))
        length = C.cfg_int(self.config.peek(at + VirtioPciCap.OFFSETS["length"], 4))
        return bar, off, length

    def _cfg_window_read(self, rel: int, width: int) -> int:
        bar, off, length = self._cfg_window()
        if rel != 0 or width != length:  # the spec: access pci_cfg_data with the width set in length
            return 0
        return self.bar_read(bar, off, width)

    def _cfg_window_write(self, rel: int, width: int, value: int) -> None:
        bar, off, length = self._cfg_window()
        if rel == 0 and width == length:
            self.bar_write(bar, off, width, value)

    # ================================================================== BAR 0
    def _reset_msix_table(self) -> None:
        self._msix_table = bytearray(C.MsixEntry().encode() * self.msix_vectors)

    def bar_read(self, bar: int, offset: int, width: int) -> int:
        """A driver's read of BAR ``bar`` (see :data:`virtio_lm.wire.pcicfg.BAR0` for the layout)."""
        region, rel = self._bar_region(bar, offset, width)
        if region == "common":
            return self.common_read(rel, width)
        if region == "isr":
            return self.isr_read() if width == 1 else self._bar_refuse(bar, offset, width, "the ISR is one byte")
        if region == "device":
            return self.device_config_read(rel, width)
        if region == "notify":
            return 0
        if region == "msix_table":
            return C.cfg_int(self._msix_table[rel : rel + width])
        return 0  # the PBA: no pending bits (QEMU keeps its own)

    def bar_write(self, bar: int, offset: int, width: int, value: int) -> None:
        """A driver's write to BAR ``bar``."""
        region, rel = self._bar_region(bar, offset, width)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << (8 * width):
            raise RegisterAccessError(f"{self.name}: value {value!r} does not fit a {width}-byte BAR write")
        if region == "common":
            self.common_write(rel, width, value)
        elif region == "device":
            self.device_config_write(rel, width, value)
        elif region == "notify":
            if width not in (2, 4) or rel % C.BAR0.notify_off_multiplier:
                self._bar_refuse(bar, offset, width, "a notification is a 2- or 4-byte write at a queue's address")
            self.notify(rel // C.BAR0.notify_off_multiplier)
        elif region == "msix_table":
            self._msix_table[rel : rel + width] = C.cfg_bytes(value, width)
        else:
            self._bar_refuse(bar, offset, width, f"the {region} is read-only")

    def _bar_refuse(self, bar: int, offset: int, width: int, why: str) -> int:
        raise RegisterAccessError(f"{self.name}: BAR {bar} [{offset:#x}/{width}]: {why}")

    def _bar_region(self, bar: int, offset: int, width: int) -> tuple[str, int]:
        for v in (bar, offset, width):
            if isinstance(v, bool) or not isinstance(v, int):
                raise RegisterAccessError(f"{self.name}: BAR access {bar!r}/{offset!r}/{width!r}: ints wanted")
        if bar != 0:
            self._bar_refuse(bar, offset, width, "a virtio-lm function has BAR 0 only")
        if width not in (1, 2, 4, 8) or offset < 0 or offset % width:
            self._bar_refuse(bar, offset, width, "not a naturally aligned 1/2/4/8-byte access")
        b = C.BAR0
        regions = (
            ("common", b.common, b.common_length),
            ("isr", b.isr, 1),
            ("device", b.device, self.device.config_size),
            ("notify", b.notify, b.notify_length(len(self.queues))),
            ("msix_table", b.msix_table, self.msix_vectors * C.PCI_MSIX_ENTRY_SIZE),
            ("msix_pba", b.msix_pba, 8 * ((self.msix_vectors + 63) // 64)),
        )
        for name, start, length in regions:
            if start <= offset and offset + width <= start + length:
                return name, offset - start
        return self._bar_refuse(bar, offset, width, "no register there")  # type: ignore[return-value]

    # ================================================================== notify / interrupts
    def notify(self, queue: int) -> None:
        """The driver's doorbell for ``queue``.

        Delivered to the device only after DRIVER_OK, on an enabled queue, and
        not after FAILED; otherwise counted in :attr:`notifies_ignored`.
        """
        if not isinstance(queue, int) or not 0 <= queue < len(self.queues):
            raise RegisterAccessError(f"{self.name}: notify for non-existent queue {queue!r}")
        st = self.status
        if not st & DOK or st & FAILED or not self.queues[queue].enabled:
            self.notifies_ignored += 1
            return
        self.device.queue_notify(self, queue)

    def isr_read(self) -> int:
        """Read the ISR status byte; reading clears it."""
        with self._irq_lock:
            value, self._isr = self._isr, 0
        return value

    def msix_vector(self, source: int) -> int:
        """The MSI-X vector programmed for an interrupt source (queue index or CONFIG_INTERRUPT)."""
        if source == CONFIG_INTERRUPT:
            return self.config_msix_vector
        return self.queue_msix_vectors[source]

    def queue_interrupt(self, queue: int) -> None:
        """Raise the used-buffer interrupt of ``queue``."""
        with self._irq_lock:
            self._isr |= ISR_QUEUE
            self.interrupt_counts[queue] = self.interrupt_counts.get(queue, 0) + 1
        self.on_interrupt(queue)

    def _config_interrupt(self) -> None:
        # the spec: no configuration notification before DRIVER_OK
        if not self.status & DOK:
            return
        with self._irq_lock:
            self._isr |= ISR_CONFIG
            self.interrupt_counts[CONFIG_INTERRUPT] = self.interrupt_counts.get(CONFIG_INTERRUPT, 0) + 1
        self.on_interrupt(CONFIG_INTERRUPT)

    def config_changed(self) -> None:
        """The device changed its configuration: bump config_generation, notify."""
        with self._irq_lock:
            self.config_generation = (self.config_generation + 1) & 0xFF
        self._config_interrupt()

    def set_needs_reset(self, reason: object = None) -> None:
        """The device hit an error it cannot recover from: DEVICE_NEEDS_RESET + config interrupt."""
        with self._irq_lock:
            already = bool(self.status & NEEDS_RESET)
            self.status |= NEEDS_RESET
            if not already:
                self.needs_reset_reason = None if reason is None else str(reason)
        if not already:
            self._config_interrupt()

    @property
    def needs_reset(self) -> bool:
        return bool(self.status & NEEDS_RESET)

    def _wire_queue(self, q: Virtqueue) -> None:
        index = q.index

        def on_error(exc: VirtqueueError) -> None:
            self.set_needs_reset(exc)

        def interrupt() -> None:
            self.queue_interrupt(index)

        q.on_error = on_error
        q.interrupt = interrupt

    # ================================================================== device config
    def _check_config_access(self, offset: int, width: int) -> None:
        if not isinstance(offset, int) or not isinstance(width, int) or width not in (1, 2, 4, 8):
            raise RegisterAccessError(f"{self.name}: device config access width {width!r} is not 1, 2, 4 or 8")
        size = self.device.config_size
        if offset < 0 or offset + width > size:
            raise RegisterAccessError(
                f"{self.name}: device config access [{offset:#x}, +{width}) outside {size} bytes"
            )
        if offset % width:
            raise RegisterAccessError(
                f"{self.name}: device config access at {offset:#x} is not aligned to its width {width}"
            )

    def device_config_read(self, offset: int, width: int) -> int:
        """Read ``width`` bytes of device-specific configuration at ``offset``."""
        self._check_config_access(offset, width)
        data = self.device.config_read(offset, width)
        if len(data) != width:
            raise TransportError(f"{self.name}: device returned {len(data)} config bytes, wanted {width}")
        return le_int(data)

    def device_config_write(self, offset: int, width: int, value: int) -> None:
        """Write ``width`` bytes of device-specific configuration at ``offset``."""
        self._check_config_access(offset, width)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < (1 << (8 * width)):
            raise RegisterAccessError(f"{self.name}: value {value!r} does not fit a {width}-byte config write")
        with self._lock:
            self.device.config_write(offset, int_le(value, width))


def _window(features: int, select: int) -> int:
    return (features >> (32 * select)) & _U32 if select < 2 else 0


def _bits(mask: int) -> str:
    return ", ".join(str(b) for b in range(mask.bit_length()) if mask >> b & 1)


def _no_interrupt(source: int) -> None:
    return None
