"""The virtio-PCI function model: common_cfg registers, status machine, SR-IOV.

* :class:`VirtioDevice` -- base class of device models (blk, net, the PF's device).
* :class:`VirtioPciFunction` -- one PCI function driven through its registers.
* :class:`SriovPF` -- a PF with VFs (numbered 1..NumVFs), VF FLR.
* :class:`PciDriverTransport` -- driver-side bring-up through registers only.
"""

from virtio_lm.pci.device import VirtioDevice
from virtio_lm.pci.function import (
    CONFIG_INTERRUPT,
    STATUS_LADDER,
    STATUS_TRANSITIONS,
    StatusAction,
    VirtioPciFunction,
)
from virtio_lm.pci.sriov import SriovPF, VfFactory
from virtio_lm.pci.transport import PciDriverTransport, RegisterInterface

__all__ = [
    "CONFIG_INTERRUPT",
    "STATUS_LADDER",
    "STATUS_TRANSITIONS",
    "PciDriverTransport",
    "RegisterInterface",
    "SriovPF",
    "StatusAction",
    "VfFactory",
    "VirtioDevice",
    "VirtioPciFunction",
]
