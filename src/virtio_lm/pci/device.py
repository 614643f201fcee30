"""The base class of every device model a virtio-PCI function hosts.

A :class:`VirtioDevice` is the device-type logic (blk, net, the PF's own
device, test devices) without any register handling: the
:class:`~virtio_lm.pci.function.VirtioPciFunction` owns the common
configuration, the status machine, the queues and the interrupts, and calls
into the device at the points the virtio spec defines:

* ``offered_features()`` -- the 64 feature bits the device offers;
* ``validate_features(f)`` -- a reason to refuse FEATURES_OK, or ``None``
  (dependency rules between bits; the function itself already refuses
  unoffered bits and a missing VERSION_1);
* ``config_read/config_write`` -- the device-specific configuration space;
* ``activate(fn)`` -- the driver set DRIVER_OK;
* ``queue_notify(fn, q)`` -- the driver kicked queue ``q`` (only delivered
  after DRIVER_OK on an enabled queue);
* ``reset()`` -- device_status was written 0, or the function was FLRed.

A device that changes its configuration calls ``self.config_changed()``,
which bumps config_generation and raises the configuration interrupt through
the function it is bound to.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from virtio_lm.errors import RegisterAccessError

if TYPE_CHECKING:
    from virtio_lm.pci.function import VirtioPciFunction


class VirtioDevice:
    """A virtio device model.  Subclasses set the class attributes and override
    the hooks they need; the defaults describe a device with no
    device-specific configuration and nothing to do on notify."""

    #: virtio device type (1 net, 2 blk, ...)
    device_id: int = 0
    #: number of virtqueues the function exposes (``num_queues`` register)
    num_queues: int = 1
    #: administration virtqueues after them (VIRTIO_F_ADMIN_VQ; 0 = none)
    admin_queues: int = 0
    #: maximum queue size of every queue (a power of two <= 32768)
    queue_max_size: int = 256

    def __init__(self) -> None:
        self.function: VirtioPciFunction | None = None

    # ------------------------------------------------------------------ binding
    def bind(self, fn: VirtioPciFunction) -> None:
        """Called once by the function that hosts this device."""
        if self.function is not None and self.function is not fn:
            raise RegisterAccessError(f"{type(self).__name__} is already bound to {self.function.name}")
        self.function = fn

    # ------------------------------------------------------------------ features
    def offered_features(self) -> int:
        """The feature bits this device offers (VERSION_1 must be among them)."""
        return 0

    def validate_features(self, features: int) -> str | None:
        """A reason to refuse FEATURES_OK for the driver's ``features``, or ``None``."""
        return None

    # ------------------------------------------------------------------ config space
    @property
    def config_size(self) -> int:
        """Size in bytes of the device-specific configuration space."""
        return 0

    def config_read(self, offset: int, length: int) -> bytes:
        """``length`` bytes of configuration space from ``offset`` (range-checked by the function)."""
        return b""

    def config_write(self, offset: int, data: bytes) -> None:
        """A driver write to configuration space.  Default: every field is read-only."""
        raise RegisterAccessError(
            f"{type(self).__name__}: device config at {offset:#x} is read-only"
        )

    def config_changed(self) -> None:
        """Tell the driver the configuration changed (generation bump + config interrupt)."""
        if self.function is not None:
            self.function.config_changed()

    # ------------------------------------------------------------------ lifecycle
    def activate(self, fn: VirtioPciFunction) -> None:
        """The driver set DRIVER_OK; queues are configured and may be used."""

    def queue_notify(self, fn: VirtioPciFunction, queue: int) -> None:
        """The driver kicked ``queue``."""

    def reset(self) -> None:
        """Back to the state after power-on (device_status 0 or FLR)."""
