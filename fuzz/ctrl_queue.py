"""Generic v1 control buffers through the PF's real control queue.

Each input is a short program of control commands.  A fresh PF (two DmaTest VFs,
VF 1 brought up by a register-only driver) is built for every input; the host PF
driver puts each command on the PF's control virtqueue as the proposal's generic
v1 buffer (class, command, data; writable room for the result and the ack) and the
PF device's dispatcher and VF migration controller answer it.

Input: records of ``class u8, command u8, result_space u16 (mod 64 KiB),
data_len u8, data``, up to 12 commands.

Invariants:
* ``PfDriver.raw_command`` never raises: the device answers every buffer with
  OK or ERR, an ERR carries no result bytes, a result never exceeds its room and
  the used length never exceeds the writable part (the driver checks both).
* ERR has no side effect: every VF's migration state, tracking mode and
  tracking counters (``vf_status``) are as before the command.
* The control queue never breaks: the PF never sets DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

from fuzzlib import Reader, main

from virtio_lm.devices.dmatest import DmaTestDevice
from virtio_lm.drivers.pf_driver import PfDriver
from virtio_lm.memory import Memory
from virtio_lm.pci import PciDriverTransport
from virtio_lm.pf.device import build_pf, vf_status
from virtio_lm.virtqueue.driver import Allocator
from virtio_lm.wire.ctrl import Ack
from virtio_lm.wire.features import DeviceStatus, Feature, bit

HOST_MEM = 1 << 20
GUEST_MEM = 1 << 20
MAX_COMMANDS = 12
VF_FEATURES = bit(Feature.VERSION_1) | bit(Feature.EVENT_IDX) | bit(Feature.INDIRECT_DESC)


class Pf:
    """A PF with two DmaTest VFs; VF 1 driven to DRIVER_OK."""

    def __init__(self) -> None:
        self.host = Memory(HOST_MEM, name="fuzz-host")
        self.guest = Memory(GUEST_MEM, name="fuzz-guest")
        self.pf = build_pf(self.host.device_port("fuzz-pf"), total_vfs=2, name="fuzz-pf", threaded=False,
                           freeze_timeout=1.0)
        self.drv = PfDriver(self.pf, self.host.cpu, Allocator(0x1000, HOST_MEM - 0x1000))
        self.drv.bring_up()
        self.vfs = self.drv.enable_vfs(2, lambda n: (DmaTestDevice(), self.guest.device_port(f"fuzz-vf{n}")))
        PciDriverTransport(self.vfs[0], self.guest.cpu, Allocator(0x1000, GUEST_MEM - 0x1000)).bring_up(
            VF_FEATURES, 1, size=16)

    def vf_view(self) -> tuple:
        return tuple(vf_status(self.pf, n) for n in (1, 2))

    def close(self) -> None:
        for fn in self.vfs:
            fn.device.close()
        self.pf.device.close()  # type: ignore[attr-defined]
        self.guest.close()
        self.host.close()


def TestOneInput(data: bytes) -> None:
    r = Reader(data)
    pf = Pf()
    try:
        for _ in range(MAX_COMMANDS):
            if r.left < 2:
                break
            cls, command, space = r.u8(), r.u8(), r.u16()
            payload = r.bytes(r.u8())
            before = pf.vf_view()
            result, ack = pf.drv.raw_command(cls, command, payload, space)
            assert len(result) <= space, (len(result), space)
            if ack is Ack.ERR:
                assert result == b""
                assert pf.vf_view() == before, f"ERR changed the VFs: {before} -> {pf.vf_view()}"
            assert not pf.pf.status & int(DeviceStatus.DEVICE_NEEDS_RESET), "the control queue broke"
    finally:
        pf.close()


if __name__ == "__main__":
    main(TestOneInput)
