"""Driver side of the virtio-PCI transport, through registers only.

:class:`PciDriverTransport` brings a :class:`~virtio_lm.pci.function.VirtioPciFunction`
up the way a driver written from the virtio spec would (3.1.1 "Driver
Requirements: Device Initialization"), using nothing but

* ``common_read`` / ``common_write`` at the ``virtio_pci_common_cfg`` offsets,
* ``notify`` (the doorbell), ``isr_read`` and ``device_config_read``,
* the driver's memory (a :class:`~virtio_lm.memory.MemoryPort`, for a guest
  driver the VM's CPU port) and an :class:`~virtio_lm.virtqueue.driver.Allocator`
  over it for the rings.

It never touches the function's Python attributes, so what works here works
for any driver that only has the register interface.
"""

from __future__ import annotations

from typing import Protocol

from virtio_lm.errors import DeviceNeedsResetError, DriverError, FeaturesNotAcceptedError
from virtio_lm.memory import MemoryPort
from virtio_lm.virtqueue.driver import Allocator, DriverQueue
from virtio_lm.wire.features import DeviceStatus, Feature, bit
from virtio_lm.wire.pci import COMMON_CFG_BY_NAME

__all__ = ["PciDriverTransport", "RegisterInterface"]

_ACK = int(DeviceStatus.ACKNOWLEDGE)
_DRIVER = int(DeviceStatus.DRIVER)
_FEATURES_OK = int(DeviceStatus.FEATURES_OK)
_DRIVER_OK = int(DeviceStatus.DRIVER_OK)
_NEEDS_RESET = int(DeviceStatus.DEVICE_NEEDS_RESET)
_FAILED = int(DeviceStatus.FAILED)


class RegisterInterface(Protocol):
    """What a driver can reach of a virtio PCI function."""

    def common_read(self, offset: int, width: int) -> int: ...
    def common_write(self, offset: int, width: int, value: int) -> None: ...
    def notify(self, queue: int) -> None: ...
    def isr_read(self) -> int: ...
    def device_config_read(self, offset: int, width: int) -> int: ...


class PciDriverTransport:
    """Bring-up and queue setup of one virtio PCI function, by registers."""

    def __init__(self, fn: RegisterInterface, port: MemoryPort, alloc: Allocator) -> None:
        self.fn = fn
        self.port = port
        self.alloc = alloc
        self.device_features = 0
        self.features = 0  # negotiated
        self.queues: dict[int, DriverQueue] = {}

    # ------------------------------------------------------------------ registers
    def _r(self, name: str) -> int:
        reg = COMMON_CFG_BY_NAME[name]
        return self.fn.common_read(reg.offset, reg.width)

    def _w(self, name: str, value: int) -> None:
        reg = COMMON_CFG_BY_NAME[name]
        self.fn.common_write(reg.offset, reg.width, value)

    def _w64(self, name: str, value: int) -> None:
        reg = COMMON_CFG_BY_NAME[name]  # written as two 32-bit halves, low first
        self.fn.common_write(reg.offset, 4, value & 0xFFFF_FFFF)
        self.fn.common_write(reg.offset + 4, 4, value >> 32)

    @property
    def status(self) -> int:
        return self._r("device_status")

    def check(self) -> None:
        """Raise :class:`DeviceNeedsResetError` if the device shows NEEDS_RESET or FAILED."""
        st = self.status
        if st & (_NEEDS_RESET | _FAILED):
            raise DeviceNeedsResetError(f"device status {st:#04x}: device needs a reset")

    def _add_status(self, bits: int) -> int:
        self._w("device_status", self.status | bits)
        return self.status

    # ------------------------------------------------------------------ bring-up
    def reset(self) -> None:
        """Write 0 to device_status and wait (re-read) until it reads 0."""
        self._w("device_status", 0)
        if self.status != 0:
            raise DriverError(f"device_status reads {self.status:#04x} after reset")
        self.queues.clear()
        self.features = 0

    def read_device_features(self) -> int:
        """All 64 offered feature bits, through device_feature_select 0 and 1."""
        value = 0
        for sel in (0, 1):
            self._w("device_feature_select", sel)
            value |= self._r("device_feature") << (32 * sel)
        self.device_features = value
        return value

    def negotiate(self, wanted: int) -> int:
        """Reset, ACKNOWLEDGE|DRIVER, accept ``wanted & offered``, FEATURES_OK.

        Raises :class:`FeaturesNotAcceptedError` if FEATURES_OK does not stick
        (or VERSION_1 is not offered: this driver speaks only virtio 1.x).
        """
        self.reset()
        self._add_status(_ACK)
        self._add_status(_DRIVER)
        offered = self.read_device_features()
        version_1 = bit(Feature.VERSION_1)
        if not offered & version_1:
            self._add_status(_FAILED)
            raise FeaturesNotAcceptedError(f"device does not offer VIRTIO_F_VERSION_1 (offers {offered:#x})")
        accept = (wanted | version_1) & offered
        for sel in (0, 1):
            self._w("driver_feature_select", sel)
            self._w("driver_feature", (accept >> (32 * sel)) & 0xFFFF_FFFF)
        st = self._add_status(_FEATURES_OK)
        if not st & _FEATURES_OK:
            self._add_status(_FAILED)
            raise FeaturesNotAcceptedError(f"device did not accept features {accept:#x}")
        self.features = accept
        return accept

    def num_queues(self) -> int:
        return self._r("num_queues")

    def setup_queue(self, index: int, size: int | None = None) -> DriverQueue:
        """Select queue ``index``, set its size (default: the device's maximum),
        allocate and zero its rings, write their addresses and enable it."""
        self._w("queue_select", index)
        max_size = self._r("queue_size")
        if max_size == 0:
            raise DriverError(f"queue {index} does not exist (queue_size reads 0)")
        if size is None:
            size = max_size
        if size > max_size:
            raise DriverError(f"queue {index}: size {size} above the device's {max_size}")
        self._w("queue_size", size)
        event_idx = bool(self.features & bit(Feature.EVENT_IDX))
        dq = DriverQueue.allocate(self.port, self.alloc, size, event_idx=event_idx)
        self._w64("queue_desc", dq.desc_addr)
        self._w64("queue_driver", dq.avail_addr)
        self._w64("queue_device", dq.used_addr)
        self._w("queue_enable", 1)
        if self._r("queue_enable") != 1:
            raise DriverError(f"queue {index} did not enable")
        self.queues[index] = dq
        return dq

    def driver_ok(self) -> None:
        st = self._add_status(_DRIVER_OK)
        if not st & _DRIVER_OK:
            raise DriverError(f"DRIVER_OK did not stick (status {st:#04x})")
        self.check()

    def bring_up(self, wanted: int, queues: int | list[int] | None = None, *, size: int | None = None) -> list[DriverQueue]:
        """negotiate + set up ``queues`` (a count, a list of indices, or all) + DRIVER_OK."""
        self.negotiate(wanted)
        if queues is None:
            indices = list(range(self.num_queues()))
        elif isinstance(queues, int):
            indices = list(range(queues))
        else:
            indices = list(queues)
        out = [self.setup_queue(i, size) for i in indices]
        self.driver_ok()
        return out

    # ------------------------------------------------------------------ data path
    def kick(self, index: int) -> bool:
        """Publish queue ``index`` and notify the device if it wants it; returns whether it did."""
        dq = self.queues[index]
        dq.publish()
        if dq.kick_needed():
            self.fn.notify(index)
            return True
        return False

    def config_read(self, offset: int, width: int) -> int:
        """One field of device-specific configuration, re-read until config_generation is stable."""
        while True:
            before = self._r("config_generation")
            value = self.fn.device_config_read(offset, width)
            if self._r("config_generation") == before:
                return value
