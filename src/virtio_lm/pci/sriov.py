"""An SR-IOV physical function and its virtual functions.

:class:`SriovPF` is a :class:`~virtio_lm.pci.function.VirtioPciFunction` (the
PF's own virtio device: the PF issue gives it a control queue) that also
models the SR-IOV capability: ``total_vfs`` VFs at most, ``num_vfs`` enabled.

The SR-IOV extended capability is in the PF's configuration space (0x100): TotalVFs,
NumVFs, VF Enable, First VF Offset 1, VF Stride 1, VF Device ID, the VF BAR 0.  A driver
writes NumVFs and then VF Enable; clearing VF Enable removes the VFs; setting "Initiate
Function Level Reset" in a VF's PCI Express Device Control resets that VF.  The methods
below are thin wrappers that do exactly those register writes.  What is *behind* each VF
(its device model and the memory it DMAs into) is the PF's provisioning
(:meth:`provision`), as a hardware vendor's firmware would decide it.

* :meth:`enable_vfs` provisions and writes NumVFs and VF Enable: VFs numbered 1..n
  (PCIe VF numbering, the proposal's ``func_id``).  Each VF is its own
  :class:`~virtio_lm.pci.function.VirtioPciFunction` with its own common
  configuration, queues and MemoryPort: VFs DMA into the memory of the VM
  they are assigned to, which is not the PF's memory, so the factory returns
  both the device model and the port.
* :meth:`disable_vfs` removes them all (each is reset first).  As in PCIe,
  NumVFs cannot change while VFs are enabled: disable first.
* :meth:`flr_vf` resets one VF only and then tells the FLR listeners
  (the PF control path moves that VF's migration state machine to INIT).
* :meth:`flr` resets the PF itself; like a PCIe PF FLR it clears VF Enable,
  so every VF disappears first.

Only the PF offers VIRTIO_F_SR_IOV (bit 37); a VF never does.
"""

from __future__ import annotations

from typing import Callable

from virtio_lm.errors import FunctionNumberError
from virtio_lm.memory import MemoryPort
from virtio_lm.pci.config import add_sriov_cap
from virtio_lm.pci.device import VirtioDevice
from virtio_lm.pci.function import FEATURE_SR_IOV, VirtioPciFunction
from virtio_lm.wire import pcicfg as C
from virtio_lm.wire.features import DeviceId
from virtio_lm.wire.pci import modern_device_id

__all__ = ["SriovPF", "VfFactory"]

#: factory(vf_number) -> (the VF's device model, the VF's DMA port)
VfFactory = Callable[[int], tuple[VirtioDevice, MemoryPort]]


class SriovPF(VirtioPciFunction):
    """A PF with the SR-IOV capability."""

    _transport_offer = FEATURE_SR_IOV
    _transport_mask = 0

    def __init__(
        self, device: VirtioDevice, port: MemoryPort, *, name: str, total_vfs: int, vf_withheld_features: int = 0,
        vf_device_id: int = modern_device_id(DeviceId.BLOCK),
    ) -> None:
        if isinstance(total_vfs, bool) or not isinstance(total_vfs, int) or not 1 <= total_vfs <= 0xFFFF:
            raise FunctionNumberError(f"{name}: total_vfs {total_vfs!r} is not in 1..65535")
        self._vfs: list[VirtioPciFunction] = []
        self._flr_listeners: list[Callable[[int], None]] = []
        self._sriov_listeners: list[Callable[[int], None]] = []
        self._provisioning: VfFactory | None = None
        super().__init__(device, port, name=name)
        self.total_vfs = total_vfs
        #: feature bits no VF of this PF offers (see VirtioPciFunction.withheld_features)
        self.vf_withheld_features = vf_withheld_features
        sriov = add_sriov_cap(self.config, self.caps, total_vfs=total_vfs, vf_device_id=vf_device_id,
                              vf_bar_size=C.BAR0.size)
        self.config.hook(sriov + C.PCI_SRIOV_CTRL, 2, self._sriov_ctrl_written)
        self.config.hook(sriov + C.PCI_SRIOV_NUM_VF, 2, self._num_vfs_written)
        self.config.seal()

    # ------------------------------------------------------------------ the SR-IOV capability
    def provision(self, factory: VfFactory) -> None:
        """What VF Enable creates: ``factory(vf_number) -> (device, port)`` for each VF."""
        self._provisioning = factory

    def _sriov_reg(self, reg: int) -> int:
        return C.cfg_int(self.config.peek(self.caps.sriov + reg, 2))

    def _num_vfs_written(self, old: int, new: int) -> int:
        if self._sriov_reg(C.PCI_SRIOV_CTRL) & C.PCI_SRIOV_CTRL_VFE:
            return old  # NumVFs is read-only while VF Enable is set
        if new > self.total_vfs:
            raise FunctionNumberError(f"{self.name}: NumVFs {new} above TotalVFs {self.total_vfs}")
        return new

    def _sriov_ctrl_written(self, old: int, new: int) -> int:
        was, now = old & C.PCI_SRIOV_CTRL_VFE, new & C.PCI_SRIOV_CTRL_VFE
        if now and not was:
            self._create_vfs(self._sriov_reg(C.PCI_SRIOV_NUM_VF))
        elif was and not now:
            self._remove_vfs()
        return new

    # ------------------------------------------------------------------ VFs
    @property
    def num_vfs(self) -> int:
        return len(self._vfs)

    @property
    def vfs(self) -> tuple[VirtioPciFunction, ...]:
        """The enabled VFs; ``vfs[n - 1]`` is VF ``n``."""
        return tuple(self._vfs)

    def enable_vfs(self, n: int, factory: VfFactory) -> list[VirtioPciFunction]:
        """Provision ``factory`` and enable VFs 1..n by register (NumVFs, then VF Enable); returns them."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.total_vfs:
            raise FunctionNumberError(f"{self.name}: cannot enable {n!r} VFs (TotalVFs {self.total_vfs})")
        if self._vfs:
            raise FunctionNumberError(
                f"{self.name}: {len(self._vfs)} VFs are enabled; disable them before changing NumVFs"
            )
        at = self.caps.sriov
        with self.config.locked():
            self.provision(factory)
            self.config_write(at + C.PCI_SRIOV_NUM_VF, 2, n)
            ctrl = self.config_read(at + C.PCI_SRIOV_CTRL, 2)
            self.config_write(at + C.PCI_SRIOV_CTRL, 2, ctrl | C.PCI_SRIOV_CTRL_VFE | C.PCI_SRIOV_CTRL_MSE)
            return list(self._vfs)

    def _create_vfs(self, n: int) -> None:
        if not 1 <= n <= self.total_vfs:
            raise FunctionNumberError(f"{self.name}: VF Enable with NumVFs {n} (TotalVFs {self.total_vfs})")
        factory = self._provisioning
        if factory is None:
            raise FunctionNumberError(f"{self.name}: VF Enable before anything is provisioned behind the VFs")
        created: list[VirtioPciFunction] = []
        for number in range(1, n + 1):
            device, port = factory(number)
            if not isinstance(port, MemoryPort):
                raise TypeError(f"VF factory returned {type(port).__name__} for the port, not a MemoryPort")
            vf = VirtioPciFunction(
                device, port, name=self.vf_name(number), withheld_features=self.vf_withheld_features, vf=True
            )
            vf.add_flr_callback(lambda number=number: self._vf_flr_done(number))
            created.append(vf)
        self._vfs = created
        for cb in list(self._sriov_listeners):
            cb(n)

    def disable_vfs(self) -> None:
        """Clear VF Enable by register: every VF is reset and removed."""
        at = self.caps.sriov
        with self.config.locked():
            ctrl = self.config_read(at + C.PCI_SRIOV_CTRL, 2)
            self.config_write(at + C.PCI_SRIOV_CTRL, 2, ctrl & ~C.PCI_SRIOV_CTRL_VFE)

    def _remove_vfs(self) -> None:
        if not self._vfs:
            return
        for vf in self._vfs:
            vf.flr()
        self._vfs = []
        for cb in list(self._sriov_listeners):
            cb(0)

    def vf_name(self, number: int) -> str:
        return f"{self.name}.vf{number}"

    def vf(self, number: int) -> VirtioPciFunction:
        """VF ``number`` (1..num_vfs)."""
        if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= len(self._vfs):
            raise FunctionNumberError(
                f"{self.name}: VF number {number!r} is not in 1..{len(self._vfs)} (NumVFs)"
            )
        return self._vfs[number - 1]

    def vf_number(self, fn: VirtioPciFunction) -> int:
        """The number of VF ``fn`` (1-based)."""
        for i, vf in enumerate(self._vfs, start=1):
            if vf is fn:
                return i
        raise FunctionNumberError(f"{self.name}: {fn!r} is not one of its VFs")

    # ------------------------------------------------------------------ FLR
    def add_flr_listener(self, cb: Callable[[int], None]) -> None:
        """``cb(vf_number)`` is called after each VF FLR."""
        self._flr_listeners.append(cb)

    def add_sriov_listener(self, cb: Callable[[int], None]) -> None:
        """``cb(num_vfs)`` is called after VFs are enabled (n) or disabled (0)."""
        self._sriov_listeners.append(cb)

    def flr_vf(self, number: int) -> None:
        """Function level reset of VF ``number`` only, by its Device Control register ("Initiate
        Function Level Reset"); then the FLR listeners."""
        vf = self.vf(number)
        devctl = vf.caps.exp + C.PCI_EXP_DEVCTL
        vf.config_write(devctl, 2, vf.config_read(devctl, 2) | C.PCI_EXP_DEVCTL_BCR_FLR)

    def _vf_flr_done(self, number: int) -> None:
        for cb in list(self._flr_listeners):
            cb(number)

    def flr(self) -> None:
        """FLR of the PF: VF Enable clears (all VFs go), then the PF resets."""
        with self.config.locked():
            self._remove_vfs()
            super().flr()
