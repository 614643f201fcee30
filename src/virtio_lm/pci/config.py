"""PCI configuration space of a virtio-lm function: bytes, write masks, and the registers whose
writes do something.

:class:`ConfigSpace` is 4096 bytes (PCI Express) with, per byte, a write mask (bits a driver may
change; every other bit ignores writes, as read-only bits of real hardware do) and a
write-1-to-clear mask.  Registers with side effects register a *hook*: ``hook(old, new)`` is
called with the register's value before and after the masked write and returns the value to
store; a hook that refuses raises a :class:`~virtio_lm.errors.TransportError` and nothing
changes.  A read hook computes a register's value at read time (the PCI config access window).

An access is 1, 2 or 4 bytes, naturally aligned, inside the space; anything else is refused with
:class:`~virtio_lm.errors.RegisterAccessError` (attribute ``reason``: ``"width"``,
``"misaligned"`` or ``"range"``).  An access may cover several registers or part of one (PCI's
byte enables): a hook always sees its register's whole value, the bytes written merged into the
bytes it had.  Only a window is accessed from inside or not at all (``reason`` ``"partial"``).

:func:`build_function_config` lays out a virtio-lm function's space: the type 0 header (vendor
0x1af4, modern device id 0x1040 + type, subsystem, class, one 64-bit memory BAR 0 -- for a VF
the header reads as SR-IOV has it: vendor and device id 0xffff, no BAR, memory enable read-only),
then the standard capability list from 0x40 -- PCI Express (endpoint, Function Level Reset
capable), MSI-X, and the virtio vendor capabilities common, notify, ISR, device and PCI config
access -- and, for a PF, the SR-IOV extended capability at 0x100.  :class:`CapLayout` says where
each capability ended up.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

from virtio_lm.errors import RegisterAccessError
from virtio_lm.wire import pcicfg as C
from virtio_lm.wire.codec import int_le, le_int
from virtio_lm.wire.pci import (
    VIRTIO_PCI_VENDOR_ID,
    CapType,
    VirtioPciCap,
    VirtioPciNotifyCap,
    modern_device_id,
)

__all__ = ["CapLayout", "ConfigSpace", "Hook", "ReadHook", "build_function_config", "class_code_of"]

#: hook(old, new) -> value to store
Hook = Callable[[int, int], int]
#: read_hook() -> the register's value now
ReadHook = Callable[[], int]


def _refuse(offset: int, width: int, reason: str, message: str) -> RegisterAccessError:
    err = RegisterAccessError(f"config[{offset:#x}/{width}]: {message}")
    err.reason = reason  # type: ignore[attr-defined]
    return err


@dataclass
class _Register:
    offset: int
    width: int
    hook: Hook | None = None
    read_hook: ReadHook | None = None
    window_read: Callable[[int, int], int] | None = None
    window_write: Callable[[int, int, int], None] | None = None


class ConfigSpace:
    """Bytes, masks and hooks (see the module docstring)."""

    def __init__(self, size: int = C.PCI_CFG_SPACE_EXP_SIZE) -> None:
        self.size = size
        self._data = bytearray(size)
        self._wmask = bytearray(size)
        self._w1c = bytearray(size)
        self._power_on = bytes(size)
        self._regs: dict[int, _Register] = {}  # offset of every byte of a hooked register -> it
        self._lock = threading.RLock()

    # -------------------------------------------------------------- building
    def init(self, offset: int, width: int, value: int, *, wmask: int = 0, w1c: int = 0) -> None:
        """Set a register's power-on value and masks (building only; no check of the driver's rules)."""
        self._data[offset : offset + width] = int_le(value, width)
        self._wmask[offset : offset + width] = int_le(wmask, width)
        self._w1c[offset : offset + width] = int_le(w1c, width)

    def init_bytes(self, offset: int, data: bytes) -> None:
        self._data[offset : offset + len(data)] = data

    def set_writable(self, offset: int, width: int, wmask: int) -> None:
        self._wmask[offset : offset + width] = int_le(wmask, width)

    def hook(self, offset: int, width: int, hook: Hook | None = None, read_hook: ReadHook | None = None) -> None:
        reg = _Register(offset, width, hook, read_hook)
        for b in range(offset, offset + width):
            if b in self._regs:
                raise ValueError(f"config register at {offset:#x} overlaps one at {self._regs[b].offset:#x}")
            self._regs[b] = reg

    def window(self, offset: int, size: int, read: Callable[[int, int], int],
               write: Callable[[int, int, int], None]) -> None:
        """A window: any access inside ``[offset, offset+size)`` goes to ``read(rel, width)`` /
        ``write(rel, width, value)`` (the PCI config access capability's data)."""
        reg = _Register(offset, size, window_read=read, window_write=write)
        for b in range(offset, offset + size):
            if b in self._regs:
                raise ValueError(f"config window at {offset:#x} overlaps a register at {self._regs[b].offset:#x}")
            self._regs[b] = reg

    def seal(self) -> None:
        """The current bytes become the power-on values (what :meth:`reset` restores)."""
        self._power_on = bytes(self._data)

    def reset(self) -> None:
        """Back to the power-on values (a Function Level Reset)."""
        with self._lock:
            self._data[:] = self._power_on

    def locked(self) -> threading.RLock:
        return self._lock

    # -------------------------------------------------------------- checks
    def _check(self, offset: int, width: int) -> list[_Register]:
        """The hooked registers and windows the access overlaps, in offset order."""
        for v in (offset, width):
            if isinstance(v, bool) or not isinstance(v, int):
                raise _refuse(0, 0, "width", f"offset and width must be ints, got {offset!r}, {width!r}")
        if width not in (1, 2, 4):
            raise _refuse(offset, width, "width", "a configuration access is 1, 2 or 4 bytes")
        if offset < 0 or offset + width > self.size:
            raise _refuse(offset, width, "range", f"outside the {self.size}-byte configuration space")
        if offset % width:
            raise _refuse(offset, width, "misaligned", f"not aligned to its width {width}")
        regs: dict[int, _Register] = {}
        for b in range(offset, offset + width):
            r = self._regs.get(b)
            if r is not None:
                regs[r.offset] = r
        out = [regs[k] for k in sorted(regs)]
        for r in out:
            if r.window_read is not None and (len(out) > 1 or offset + width > r.offset + r.width):
                raise _refuse(offset, width, "partial", f"an access straddles the window at {r.offset:#x}")
        return out

    # -------------------------------------------------------------- access
    def read(self, offset: int, width: int) -> int:
        """A driver's read (checked; a window or read hook answers for its register)."""
        regs = self._check(offset, width)
        with self._lock:
            if regs and regs[0].window_read is not None:
                return regs[0].window_read(offset - regs[0].offset, width) & ((1 << (8 * width)) - 1)
            data = bytearray(self._data[offset : offset + width])
            for r in regs:
                if r.read_hook is not None:
                    value = int_le(r.read_hook() & ((1 << (8 * r.width)) - 1), r.width)
                    for b in range(max(offset, r.offset), min(offset + width, r.offset + r.width)):
                        data[b - offset] = value[b - r.offset]
            return le_int(data)

    def peek(self, offset: int, length: int) -> bytes:
        """Raw bytes as stored, no hooks, no width rule (the server's bulk read, tests)."""
        if isinstance(offset, bool) or not isinstance(offset, int) or not isinstance(length, int) \
                or offset < 0 or length < 0 or offset + length > self.size:
            raise _refuse(offset if isinstance(offset, int) else 0, 0, "range",
                          f"[{offset!r}, +{length!r}) outside the {self.size}-byte configuration space")
        with self._lock:
            return bytes(self._data[offset : offset + length])

    def write(self, offset: int, width: int, value: int) -> None:
        """A driver's write: writable bits change, write-1-to-clear bits clear, and each register
        with a hook that the write touches (wholly or some of its bytes, as byte enables allow)
        gets ``hook(old, new)`` with its whole value before and after; nothing changes when a
        hook refuses."""
        regs = self._check(offset, width)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << (8 * width):
            raise _refuse(offset, width, "value", f"value {value!r} does not fit {width} bytes")
        with self._lock:
            if regs and regs[0].window_write is not None:
                regs[0].window_write(offset - regs[0].offset, width, value)
                return
            old = le_int(self._data[offset : offset + width])
            wmask = le_int(self._wmask[offset : offset + width])
            w1c = le_int(self._w1c[offset : offset + width])
            new = (old & ~wmask) | (value & wmask)
            new &= ~(value & w1c)
            new_bytes = int_le(new, width)
            results: list[tuple[_Register, int]] = []
            for r in regs:
                if r.hook is None:
                    continue
                r_bytes = bytearray(self._data[r.offset : r.offset + r.width])
                for i in range(max(offset, r.offset), min(offset + width, r.offset + r.width)):
                    r_bytes[i - r.offset] = new_bytes[i - offset]
                r_old = le_int(self._data[r.offset : r.offset + r.width])
                results.append((r, r.hook(r_old, le_int(r_bytes)) & ((1 << (8 * r.width)) - 1)))
            hooked = {i for r, _ in results for i in range(r.offset, r.offset + r.width)}
            for i in range(offset, offset + width):
                if i not in hooked:
                    self._data[i] = new_bytes[i - offset]
            for r, stored in results:  # after the hook: it may have reset the space (FLR)
                self._data[r.offset : r.offset + r.width] = int_le(stored, r.width)

    def store(self, offset: int, width: int, value: int) -> None:
        """The device itself sets a register (no masks, no hooks)."""
        with self._lock:
            self._data[offset : offset + width] = int_le(value, width)


# ---------------------------------------------------------------------------- the layout
@dataclass
class CapLayout:
    """Where each capability sits in a function's configuration space."""

    caps: dict[str, int] = field(default_factory=dict)      # standard list: name -> offset
    ext_caps: dict[str, int] = field(default_factory=dict)  # extended list: name -> offset

    @property
    def exp(self) -> int:
        return self.caps["exp"]

    @property
    def msix(self) -> int:
        return self.caps["msix"]

    @property
    def pci_cfg(self) -> int:
        return self.caps["virtio_pci_cfg"]

    @property
    def sriov(self) -> int:
        return self.ext_caps["sriov"]


def class_code_of(device_type: int) -> int:
    """The PCI class (base and sub class, 16 bits) of a virtio device type."""
    return {1: C.PCI_CLASS_NETWORK_ETHERNET, 2: C.PCI_CLASS_STORAGE_SCSI}.get(device_type, C.PCI_CLASS_OTHERS)


def _device_id(device_type: int) -> int:
    """The modern device id; a test device type outside 1..63 has none and reads 0x1040 (type 0)."""
    return modern_device_id(device_type) if 1 <= device_type <= 63 else modern_device_id(1) - 1


def _bar_wmask(size: int) -> int:
    return ~(size - 1) & C.PCI_BASE_ADDRESS_MEM_MASK


def build_function_config(
    *,
    device_type: int,
    queues: int,
    device_config_size: int,
    msix_vectors: int,
    vf: bool,
) -> tuple[ConfigSpace, CapLayout]:
    """A virtio-lm function's configuration space (see the module docstring); the SR-IOV
    capability of a PF is added by :class:`~virtio_lm.pci.sriov.SriovPF` with
    :func:`add_sriov_cap`."""
    if not 1 <= msix_vectors <= C.MAX_MSIX_VECTORS:
        raise ValueError(f"{msix_vectors} MSI-X vectors do not fit BAR 0 (at most {C.MAX_MSIX_VECTORS})")
    cs = ConfigSpace()
    lay = CapLayout()
    bar = C.BAR0
    # ------------------------------------------------------------ header
    if vf:  # SR-IOV: a VF's ids read 0xffff (the PF's SR-IOV capability names them), no BARs of its own
        cs.init(C.PCI_VENDOR_ID, 2, 0xFFFF)
        cs.init(C.PCI_DEVICE_ID, 2, 0xFFFF)
        cs.init(C.PCI_COMMAND, 2, 0, wmask=C.PCI_COMMAND_MASTER)
    else:
        cs.init(C.PCI_VENDOR_ID, 2, VIRTIO_PCI_VENDOR_ID)
        cs.init(C.PCI_DEVICE_ID, 2, _device_id(device_type))
        cs.init(C.PCI_COMMAND, 2, 0, wmask=C.PCI_COMMAND_MEMORY | C.PCI_COMMAND_MASTER | C.PCI_COMMAND_PARITY
                | C.PCI_COMMAND_SERR | C.PCI_COMMAND_INTX_DISABLE)
        cs.init(C.PCI_BASE_ADDRESS_0, 4, C.PCI_BASE_ADDRESS_MEM_TYPE_64, wmask=_bar_wmask(bar.size))
        cs.init(C.PCI_BASE_ADDRESS_0 + 4, 4, 0, wmask=0xFFFF_FFFF)
    cs.init(C.PCI_STATUS, 2, C.PCI_STATUS_CAP_LIST, w1c=C.PCI_STATUS_W1C)
    cs.init(C.PCI_REVISION_ID, 1, 1)  # non-transitional: revision 1 or higher
    cs.init(C.PCI_CLASS_DEVICE, 2, class_code_of(device_type))
    cs.init(C.PCI_CACHE_LINE_SIZE, 1, 0, wmask=0xFF)
    cs.init(C.PCI_HEADER_TYPE, 1, C.PCI_HEADER_TYPE_NORMAL)
    cs.init(C.PCI_SUBSYSTEM_VENDOR_ID, 2, VIRTIO_PCI_VENDOR_ID)
    cs.init(C.PCI_SUBSYSTEM_ID, 2, 0x40)  # non-transitional: subsystem id 0x40 or higher
    cs.init(C.PCI_INTERRUPT_LINE, 1, 0, wmask=0xFF)
    cs.init(C.PCI_INTERRUPT_PIN, 1, 0)  # no INTx: MSI-X only
    # ------------------------------------------------------------ standard capabilities
    chain: list[tuple[str, int, bytes]] = []  # (name, id, body after the 2-byte id/next header)
    pos = C.PCI_STD_HEADER_SIZEOF

    def place(name: str, size: int) -> int:
        nonlocal pos
        at = pos
        lay.caps[name] = at
        pos += (size + 3) & ~3
        return at

    exp = place("exp", C.PCI_CAP_EXP_ENDPOINT_SIZEOF_V2)
    msix = place("msix", C.PCI_CAP_MSIX_SIZEOF)
    vcaps: list[tuple[str, bytes]] = [
        ("virtio_common", VirtioPciCap(cfg_type=CapType.COMMON, bar=0, offset=bar.common,
                                       length=bar.common_length).encode()),
        ("virtio_notify", VirtioPciNotifyCap(bar=0, offset=bar.notify, length=bar.notify_length(queues),
                                             notify_off_multiplier=bar.notify_off_multiplier).encode()),
        ("virtio_isr", VirtioPciCap(cfg_type=CapType.ISR, bar=0, offset=bar.isr, length=1).encode()),
    ]
    if device_config_size:
        vcaps.append(("virtio_device", VirtioPciCap(cfg_type=CapType.DEVICE, bar=0, offset=bar.device,
                                                    length=device_config_size).encode()))
    cfgcap = VirtioPciCap(cap_len=C.VIRTIO_PCI_CFG_CAP_SIZEOF, cfg_type=CapType.PCI, bar=0).encode() + bytes(4)
    vcaps.append(("virtio_pci_cfg", cfgcap))
    for name, body in vcaps:
        at = place(name, len(body))
        cs.init_bytes(at, body)
    if pos > C.PCI_CFG_SPACE_SIZE:
        raise ValueError(f"capabilities end at {pos:#x}, past the standard space")
    order = list(lay.caps.items())
    cs.init(C.PCI_CAPABILITY_LIST, 1, order[0][1])
    for (name, at), nxt in zip(order, [o for _, o in order[1:]] + [0]):
        if name == "exp":
            cs.init(at, 1, C.PCI_CAP_ID_EXP)
        elif name == "msix":
            cs.init(at, 1, C.PCI_CAP_ID_MSIX)
        cs.init(at + C.PCI_CAP_LIST_NEXT, 1, nxt)
    # PCI Express: an endpoint, version 2, Function Level Reset capable
    cs.init(exp + C.PCI_EXP_FLAGS, 2, 2 | C.PCI_EXP_TYPE_ENDPOINT << 4)
    cs.init(exp + C.PCI_EXP_DEVCAP, 4, C.PCI_EXP_DEVCAP_FLR)
    cs.init(exp + C.PCI_EXP_DEVCTL, 2, 0x2810 if not vf else 0, wmask=0x7FFF | C.PCI_EXP_DEVCTL_BCR_FLR)
    cs.init(exp + C.PCI_EXP_DEVSTA, 2, 0, w1c=C.PCI_EXP_DEVSTA_W1C)
    # MSI-X: table and PBA in BAR 0
    cs.init(msix + C.PCI_MSIX_FLAGS, 2, msix_vectors - 1,
            wmask=C.PCI_MSIX_FLAGS_ENABLE | C.PCI_MSIX_FLAGS_MASKALL)
    cs.init(msix + C.PCI_MSIX_TABLE, 4, bar.msix_table | 0)
    cs.init(msix + C.PCI_MSIX_PBA, 4, bar.msix_pba | 0)
    # the PCI config access capability: bar, offset, length and the data window are the driver's
    at = lay.caps["virtio_pci_cfg"]
    cs.set_writable(at + VirtioPciCap.OFFSETS["bar"], 1, 0xFF)
    cs.set_writable(at + VirtioPciCap.OFFSETS["offset"], 4, 0xFFFF_FFFF)
    cs.set_writable(at + VirtioPciCap.OFFSETS["length"], 4, 0xFFFF_FFFF)
    # ------------------------------------------------------------ extended capabilities: none yet
    cs.init(C.PCI_CFG_SPACE_SIZE, 4, 0)
    return cs, lay


def add_sriov_cap(
    cs: ConfigSpace, lay: CapLayout, *, total_vfs: int, vf_device_id: int, vf_bar_size: int
) -> int:
    """Put the SR-IOV extended capability at 0x100 (the PF's only extended capability)."""
    at = C.PCI_CFG_SPACE_SIZE
    lay.ext_caps["sriov"] = at
    cs.init(at, 4, C.pci_ext_cap(C.PCI_EXT_CAP_ID_SRIOV, 1, 0))
    cs.init(at + C.PCI_SRIOV_CAP, 4, 0)
    cs.init(at + C.PCI_SRIOV_CTRL, 2, 0, wmask=C.PCI_SRIOV_CTRL_VFE | C.PCI_SRIOV_CTRL_MSE)
    cs.init(at + C.PCI_SRIOV_INITIAL_VF, 2, total_vfs)
    cs.init(at + C.PCI_SRIOV_TOTAL_VF, 2, total_vfs)
    cs.init(at + C.PCI_SRIOV_NUM_VF, 2, 0, wmask=0xFFFF)
    cs.init(at + C.PCI_SRIOV_VF_OFFSET, 2, 1)
    cs.init(at + C.PCI_SRIOV_VF_STRIDE, 2, 1)
    cs.init(at + C.PCI_SRIOV_VF_DID, 2, vf_device_id)
    cs.init(at + C.PCI_SRIOV_SUP_PGSIZE, 4, 1)  # 4 KiB pages
    cs.init(at + C.PCI_SRIOV_SYS_PGSIZE, 4, 1, wmask=1)
    cs.init(at + C.PCI_SRIOV_BAR, 4, C.PCI_BASE_ADDRESS_MEM_TYPE_64, wmask=_bar_wmask(vf_bar_size))
    cs.init(at + C.PCI_SRIOV_BAR + 4, 4, 0, wmask=0xFFFF_FFFF)
    return at
