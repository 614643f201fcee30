"""A host's functions served over vfio-user: the PF and each VF on a socket of its own.

:class:`VfioUserHost` builds a PF of the chosen profile (``build_pf``) whose DMA port and every
VF's DMA port are :class:`~virtio_lm.memory.MemoryPort` s over their own
:class:`~virtio_lm.vhost.memmap.GuestMemoryMap` (filled by the client's DMA_MAP), provisions the
VFs from ``vf_devices`` (one device model per VF, in VF number order), enables them by register
(NumVFs, VF Enable), and serves ``pf.sock``, ``vf1.sock``, ... in ``directory`` -- or only the
functions named in ``serve``.

DEVICE_RESET on a VF's socket is that VF's Function Level Reset (through its Device Control
register); on the PF's socket it is the PF's, which -- as in PCIe -- clears VF Enable: the VFs
are gone, their sockets close their clients and refuse every message after.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from virtio_lm.errors import VfioUserMessageError
from virtio_lm.memory import MemoryPort
from virtio_lm.memory.region import DeviceWriter
from virtio_lm.pci.function import VirtioPciFunction
from virtio_lm.pci.sriov import SriovPF
from virtio_lm.pf.device import Profile, build_pf
from virtio_lm.vfio_user.protocol import Message, VfioUserDevice
from virtio_lm.vfio_user.server import VfioUserServer
from virtio_lm.vhost.memmap import GuestMemoryMap

__all__ = ["VfioUserHost"]

MAX_WINDOWS = 64


class _VfDevice(VfioUserDevice):
    """A VF's vfio-user device: refuses everything once the VF is gone (VF Enable cleared)."""

    gone = False

    def handle(self, msg: Message) -> bytes | None:
        if self.gone:
            msg.close_fds()
            raise VfioUserMessageError(f"{self.name}: the VF is gone (its PF cleared VF Enable)")
        return super().handle(msg)


def guest_port(name: str) -> tuple[GuestMemoryMap, MemoryPort]:
    gmap = GuestMemoryMap(f"{name}.guest", max_regions=MAX_WINDOWS)
    return gmap, MemoryPort(gmap, DeviceWriter(f"{name}.dma"))  # type: ignore[arg-type]


class VfioUserHost:
    def __init__(
        self,
        directory: str,
        vf_devices: list[Callable[[], Any]],
        *,
        profile: Profile | str = Profile.SEED,
        total_vfs: int = 8,
        serve: set[str] | None = None,
        name: str = "pf0",
        lists_before_vf_enable: bool = False,
    ) -> None:
        self.directory = directory
        self.pf_memory, pf_port = guest_port(name)
        self.pf: SriovPF = build_pf(pf_port, total_vfs=max(total_vfs, len(vf_devices), 1), name=name,
                                    profile=profile, lists_before_vf_enable=lists_before_vf_enable)
        self.vf_memory: dict[int, GuestMemoryMap] = {}

        def factory(number: int) -> tuple[Any, MemoryPort]:
            gmap, port = guest_port(self.pf.vf_name(number))
            self.vf_memory[number] = gmap
            return vf_devices[number - 1](), port

        self.devices: dict[str, VfioUserDevice] = {"pf": VfioUserDevice(self.pf, self.pf_memory, name=name)}
        if vf_devices:
            self.pf.enable_vfs(len(vf_devices), factory)
        for number, vf in enumerate(self.pf.vfs, start=1):
            self.devices[f"vf{number}"] = _VfDevice(vf, self.vf_memory[number], name=vf.name,
                                                    reset=lambda n=number: self.pf.flr_vf(n))
        self.pf.add_sriov_listener(self._sriov_changed)
        wanted = set(self.devices) if serve is None else set(serve)
        unknown = wanted - set(self.devices)
        if unknown:
            raise ValueError(f"no function {sorted(unknown)} (have {sorted(self.devices)})")
        self.servers: dict[str, VfioUserServer] = {
            key: VfioUserServer(os.path.join(directory, f"{key}.sock"), dev)
            for key, dev in self.devices.items() if key in wanted
        }

    def _sriov_changed(self, num_vfs: int) -> None:
        if num_vfs == 0:
            for key, dev in self.devices.items():
                if isinstance(dev, _VfDevice):
                    dev.gone = True

    def function(self, key: str) -> VirtioPciFunction:
        return self.devices[key].fn

    def start(self) -> "VfioUserHost":
        for s in self.servers.values():
            s.start()
        return self

    def close(self) -> None:
        for s in self.servers.values():
            s.close()
        for vf in self.pf.vfs:
            close = getattr(vf.device, "close", None)
            if close is not None:
                close()
        close = getattr(self.pf.device, "close", None)
        if close is not None:
            close()
