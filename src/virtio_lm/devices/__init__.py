"""Device models hosted by virtio-PCI functions.

:mod:`.base` -- the migration interface (:class:`Migratable`) and
:class:`QueueDevice`, which implements it for request/completion devices;
:mod:`.dmatest` -- :class:`DmaTestDevice`, a minimal device that DMAs into
guest memory on request (tests of the PF control path and of migration).
"""

from virtio_lm.devices.base import Migratable, QueueDevice, ReqState, Request, ValidatedImage
from virtio_lm.devices.dmatest import DmaTestDevice, expected_completion, fill_pattern

__all__ = [
    "DmaTestDevice",
    "Migratable",
    "QueueDevice",
    "ReqState",
    "Request",
    "ValidatedImage",
    "expected_completion",
    "fill_pattern",
]
