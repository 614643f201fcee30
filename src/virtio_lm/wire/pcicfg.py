"""PCI configuration space: header, capability ids, register offsets and bits (PCI 3.0,
PCIe 4.0, SR-IOV 1.1), and the BAR 0 layout of a virtio-lm function.

Offsets of capability registers are relative to the capability's own offset; the numbers are
those of Linux's ``include/uapi/linux/pci_regs.h`` and are compared with it by
``tests/test_wire_c_headers.py``.  :data:`BAR0` places the virtio structures (common
configuration, ISR, device configuration, notifications) and the MSI-X table and PBA in the
one memory BAR every virtio-lm function has.
"""

from __future__ import annotations

from dataclasses import dataclass

from virtio_lm.wire.codec import int_le, le_int, layout
from virtio_lm.wire.pci import COMMON_CFG_SIZE

# ------------------------------------------------------------------ sizes
PCI_CFG_SPACE_SIZE = 0x100
PCI_CFG_SPACE_EXP_SIZE = 0x1000
PCI_STD_HEADER_SIZEOF = 0x40
PCI_FIND_CAP_TTL = 48  # the bound Linux's capability walk puts on a standard list

# ------------------------------------------------------------------ type 0 header
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09
PCI_CLASS_DEVICE = 0x0A
PCI_CACHE_LINE_SIZE = 0x0C
PCI_LATENCY_TIMER = 0x0D
PCI_HEADER_TYPE = 0x0E
PCI_BIST = 0x0F
PCI_BASE_ADDRESS_0 = 0x10
PCI_BASE_ADDRESS_5 = 0x24
PCI_CARDBUS_CIS = 0x28
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_ROM_ADDRESS = 0x30
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D
PCI_MIN_GNT = 0x3E
PCI_MAX_LAT = 0x3F

PCI_COMMAND_IO = 0x1
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_COMMAND_PARITY = 0x40
PCI_COMMAND_SERR = 0x100
PCI_COMMAND_INTX_DISABLE = 0x400
PCI_STATUS_CAP_LIST = 0x10
#: the error bits of the status register, write-1-to-clear
PCI_STATUS_W1C = 0xF900
PCI_HEADER_TYPE_NORMAL = 0

PCI_BASE_ADDRESS_SPACE_IO = 0x01
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x04
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x08
PCI_BASE_ADDRESS_MEM_MASK = 0xFFFF_FFF0

PCI_CLASS_STORAGE_SCSI = 0x0100
PCI_CLASS_NETWORK_ETHERNET = 0x0200
PCI_CLASS_OTHERS = 0xFF00

# ------------------------------------------------------------------ capability lists
PCI_CAP_LIST_ID = 0
PCI_CAP_LIST_NEXT = 1
PCI_CAP_ID_VNDR = 0x09
PCI_CAP_ID_EXP = 0x10
PCI_CAP_ID_MSIX = 0x11

# MSI-X capability (12 bytes)
PCI_MSIX_FLAGS = 2
PCI_MSIX_FLAGS_QSIZE = 0x07FF
PCI_MSIX_FLAGS_MASKALL = 0x4000
PCI_MSIX_FLAGS_ENABLE = 0x8000
PCI_MSIX_TABLE = 4
PCI_MSIX_PBA = 8
PCI_MSIX_FLAGS_BIRMASK = 0x7
PCI_CAP_MSIX_SIZEOF = 12
PCI_MSIX_ENTRY_SIZE = 16

# PCI Express capability (an endpoint with a link, version 2: 0x32 bytes)
PCI_EXP_FLAGS = 2
PCI_EXP_FLAGS_VERS = 0x000F
PCI_EXP_FLAGS_TYPE = 0x00F0
PCI_EXP_TYPE_ENDPOINT = 0x0
PCI_EXP_DEVCAP = 4
PCI_EXP_DEVCAP_FLR = 0x1000_0000
PCI_EXP_DEVCTL = 8
PCI_EXP_DEVCTL_BCR_FLR = 0x8000
PCI_EXP_DEVSTA = 0x0A
PCI_EXP_DEVSTA_W1C = 0x000F  # CED, NFED, FED, URD
PCI_EXP_LNKCAP = 0x0C
PCI_EXP_DEVCAP2 = 0x24
PCI_EXP_DEVCTL2 = 0x28
PCI_CAP_EXP_ENDPOINT_SIZEOF_V2 = 0x32

# extended capabilities (in the PCIe space from 0x100)
PCI_EXT_CAP_ID_SRIOV = 0x10


def pci_ext_cap(cap_id: int, version: int, next_offset: int) -> int:
    """An extended capability header dword: id (16 bits), version (4), next (12)."""
    return (cap_id & 0xFFFF) | (version & 0xF) << 16 | (next_offset & 0xFFC) << 20


def pci_ext_cap_id(header: int) -> int:
    return header & 0xFFFF


def pci_ext_cap_ver(header: int) -> int:
    return header >> 16 & 0xF


def pci_ext_cap_next(header: int) -> int:
    return header >> 20 & 0xFFC


# SR-IOV extended capability (0x40 bytes)
PCI_SRIOV_CAP = 0x04
PCI_SRIOV_CTRL = 0x08
PCI_SRIOV_CTRL_VFE = 0x01
PCI_SRIOV_CTRL_VFM = 0x02
PCI_SRIOV_CTRL_INTR = 0x04
PCI_SRIOV_CTRL_MSE = 0x08
PCI_SRIOV_CTRL_ARI = 0x10
PCI_SRIOV_STATUS = 0x0A
PCI_SRIOV_INITIAL_VF = 0x0C
PCI_SRIOV_TOTAL_VF = 0x0E
PCI_SRIOV_NUM_VF = 0x10
PCI_SRIOV_FUNC_LINK = 0x12
PCI_SRIOV_VF_OFFSET = 0x14
PCI_SRIOV_VF_STRIDE = 0x16
PCI_SRIOV_VF_DID = 0x1A
PCI_SRIOV_SUP_PGSIZE = 0x1C
PCI_SRIOV_SYS_PGSIZE = 0x20
PCI_SRIOV_BAR = 0x24
PCI_SRIOV_VFM = 0x3C
PCI_EXT_CAP_SRIOV_SIZEOF = 0x40

# ------------------------------------------------------------------ virtio's PCI config access cap
#: ``struct virtio_pci_cfg_cap``: a virtio_pci_cap whose bar/offset/length the driver writes,
#: then accesses ``pci_cfg_data`` (4 bytes at +16) to reach that BAR location
VIRTIO_PCI_CFG_CAP_DATA = 16
VIRTIO_PCI_CFG_CAP_SIZEOF = 20


# ------------------------------------------------------------------ BAR 0 of a virtio-lm function
@dataclass(frozen=True, slots=True)
class Bar0Layout:
    """Where each structure lives in BAR 0 (all offsets 4 KiB aligned)."""

    size: int = 0x8000
    common: int = 0x0000
    isr: int = 0x1000
    device: int = 0x2000
    notify: int = 0x3000
    notify_off_multiplier: int = 4
    msix_table: int = 0x4000
    msix_pba: int = 0x6000

    @property
    def common_length(self) -> int:
        return COMMON_CFG_SIZE

    def notify_length(self, queues: int) -> int:
        return max(1, queues) * self.notify_off_multiplier


BAR0 = Bar0Layout()
#: more vectors than this would not fit between the MSI-X table and the PBA
MAX_MSIX_VECTORS = (BAR0.msix_pba - BAR0.msix_table) // PCI_MSIX_ENTRY_SIZE


@layout("<IIII")
@dataclass(frozen=True, slots=True)
class MsixEntry:
    """One MSI-X table entry (16 bytes): address, data, vector control (bit 0: masked)."""

    addr_lo: int = 0
    addr_hi: int = 0
    data: int = 0
    vector_ctrl: int = 1


MSIX_ENTRY_CTRL_MASKBIT = 1


def dword(value: int) -> bytes:
    """A config-space dword (little-endian)."""
    return int_le(value & 0xFFFF_FFFF, 4)


def cfg_bytes(value: int, width: int) -> bytes:
    """``value`` as ``width`` little-endian config-space bytes."""
    return int_le(value, width)


def cfg_int(data: bytes | bytearray | memoryview) -> int:
    """Little-endian config-space bytes as an int."""
    return le_int(data)
