"""Real drivers on our functions: Linux 6.1 under QEMU 11.1.3 (vfio-user-pci).

* the blk VF and the net VF, served by ``virtio-lm vfio-user`` as a separate process: the
  guest's virtio_blk reads what the host put in the image and writes what the host then finds
  there; its virtio_net exchanges UDP through the L2 switch with the network peer;
* the PF of the proposal's profile, served in this process so that its registers can be read
  afterwards: what Linux 6.1's virtio_pci / virtio_blk do with the proposal's bits 39 and 40
  (NOTIF_CONFIG_DATA and RING_RESET to a standard driver) -- the evidence in docs/decisions.md.

Skipped, with the reason, only where QEMU 11.1, the kernel, busybox-static or gcc cannot be had
(``.ci/run`` fetches QEMU 11.1 with ``scripts/fetch-qemu11``).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from virtio_lm.net.peer import NetPeer
from virtio_lm.net.switch import L2Switch
from virtio_lm.qemu_guest import QemuUnavailable
from virtio_lm.vfio_user.host import VfioUserHost
from virtio_lm.wire.blk import BlkFeature
from virtio_lm.wire.features import DeviceStatus, Feature, ProposalFeature, bit
from virtio_lm.wire.pci import COMMON_CFG, COMMON_CFG_V1_0_SIZE
from virtio_lm.wire.vfio_user import PciRegion

from qemu.vfio import VfioServer, VfioVm, vfio_assets

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

VM_MAC = "52:54:00:12:34:57"
PEER_MAC = bytes.fromhex("5254000000fe")
IMAGE_SIZE = 4 << 20


@pytest.fixture(scope="module")
def assets():
    try:
        return vfio_assets()
    except QemuUnavailable as exc:
        pytest.skip(f"real-guest vfio-user tests: {exc}")


def _pattern(seed: int, n: int) -> bytes:
    out = bytearray()
    block = hashlib.sha256(seed.to_bytes(8, "little")).digest()
    while len(out) < n:
        out += block
        block = hashlib.sha256(block).digest()
    return bytes(out[:n])


class Guest:
    """One Linux 6.1 guest with three vfio-user-pci devices, booted once for the module: the seed PF
    (served in this process, so its registers can be read), the blk VF and the net VF (served by
    ``virtio-lm vfio-user`` as a separate process)."""

    def __init__(self, tmp: Path) -> None:
        self.image = tmp / "disk.img"
        self.read_part = _pattern(1, 64 << 10)  # what the guest must read at offset 0
        self.image.write_bytes(self.read_part + bytes(IMAGE_SIZE - len(self.read_part)))
        self.switch = L2Switch(host="127.0.0.1")
        self.switch.start()
        self.peer = NetPeer(self.switch.address, PEER_MAC, ip="10.0.0.1", udp_echo_ports=(7,))
        (tmp / "pf").mkdir()
        self.host = VfioUserHost(str(tmp / "pf"), [], serve={"pf"}, profile="seed").start()
        self.pf = self.host.devices["pf"]
        self.pf.record_accesses = True
        self.server: VfioServer | None = None
        self.vm: VfioVm | None = None
        self.server = VfioServer(tmp, ["--blk", str(self.image), "--mac", VM_MAC, "--switch",
                                       f"{self.switch.address[0]}:{self.switch.address[1]}"], serve="vf1,vf2")
        # the PF first: it is 0000:00:01.0; loglevel 6 shows the kernel's first line
        self.vm = VfioVm(tmp, "vfio-vm", [self.host.servers["pf"].path, self.server.sockets["vf1"],
                                          self.server.sockets["vf2"]], extra_append="loglevel=6")
        self.vm.q.wait_for(r"Linux version", time.monotonic() + 120)
        self.pf.accesses.clear()  # what SeaBIOS's virtio-blk driver did before the kernel is not Linux's
        self.vm.boot()
        self.vm.sh("dmesg -n 1")  # kernel messages off the console: only command output from here
        self.vm.wait_sh("test -b /dev/vda && test -e /sys/class/net/eth0", timeout=60)

    def diag(self) -> str:
        return "\n".join([self.vm.diag() if self.vm else "", self.server.output()[-3000:] if self.server else ""])

    def close(self) -> None:
        if self.vm is not None:
            self.vm.stop()
        if self.server is not None:
            self.server.stop()
        self.host.close()
        self.peer.close()
        self.switch.stop()


@pytest.fixture(scope="module")
def guest(assets, tmp_path_factory):
    g = None
    try:
        g = Guest(tmp_path_factory.mktemp("vfio"))
        yield g
    except Exception:
        if g is not None:
            print(g.diag())
        raise
    finally:
        if g is not None:
            g.close()


def test_linux_drives_blk_and_net_vfs_over_vfio_user(guest):
    vm, image, read_part, peer = guest.vm, guest.image, guest.read_part, guest.peer
    try:
        # ------------------------------------------------ virtio_blk: read what the host wrote
        _, out = vm.sh("dd if=/dev/vda bs=4096 count=16 2>/dev/null | md5sum")
        assert out.split()[0] == hashlib.md5(read_part).hexdigest(), out
        _, out = vm.sh("dd if=/dev/vda bs=4096 skip=16 count=16 2>/dev/null | md5sum")  # negative control
        assert out.split()[0] != hashlib.md5(read_part).hexdigest()
        # ------------------------------------------------ virtio_blk: write, the host finds it
        status, out = vm.sh("dd if=/dev/urandom of=/tmp/p bs=4096 count=64 2>/dev/null && "
                            "dd if=/tmp/p of=/dev/vda bs=4096 seek=256 conv=fsync 2>/dev/null && md5sum /tmp/p")
        assert status == 0, out
        written = out.split()[0]
        with open(image, "rb") as f:
            f.seek(256 * 4096)
            on_disk = f.read(64 * 4096)
        assert hashlib.md5(on_disk).hexdigest() == written
        assert hashlib.md5(bytes(len(on_disk))).hexdigest() != written  # the region was zero before
        # ------------------------------------------------ virtio_net: UDP through the switch
        status, out = vm.sh("ip link set eth0 up && ip addr add 10.0.0.2/24 dev eth0 && "
                            "cat /sys/class/net/eth0/address")
        assert status == 0 and out.strip().endswith(VM_MAC), out
        status, out = vm.sh("udp 10.0.0.1 7 20", timeout=90)
        assert status == 0 and out.strip().endswith("UDP 20 20"), out
        got = [(src, port, data) for src, port, data in peer.udp_received if port == 7]
        assert [d for _, _, d in got] == [f"vlm-udp {i}".encode() for i in range(20)]
        assert {s for s, _, _ in got} == {bytes([10, 0, 0, 2])} and peer.arp_replies >= 1
        # negative control: a port the peer does not echo -> the guest counts no echo
        status, out = vm.sh("udp 10.0.0.1 9 2 1", timeout=30)  # 1 s each: no echo can come
        assert out.strip().endswith("UDP 2 0"), out
    except Exception:
        print(guest.diag())
        raise


def test_linux_61_on_the_proposals_pf(guest):
    """Evidence for docs/decisions.md: Linux 6.1's virtio_pci + virtio_blk on the seed PF."""
    vm, dev = guest.vm, guest.pf
    fn = dev.fn
    try:
        deadline = time.monotonic() + 60
        while not fn.status & DeviceStatus.FAILED and time.monotonic() < deadline:
            time.sleep(0.1)
        offered, accepted = fn.offered_features(), fn.driver_features
        assert offered & bit(ProposalFeature.GENERIC_CTRL_VQ_VER_1) and offered & bit(ProposalFeature.VF_MIGRATION)
        # bit 40 is RING_RESET to Linux 6.1: accepted; bit 39 (NOTIF_CONFIG_DATA) it does not know
        assert accepted & bit(Feature.RING_RESET)
        assert not accepted & bit(Feature.NOTIF_CONFIG_DATA)
        # SR_IOV: QEMU's vfio does not show the SR-IOV capability to the guest, so not taken
        assert not accepted & bit(Feature.SR_IOV)
        assert not accepted & bit(BlkFeature.CTRL_VQ)  # blk bit 15: LIFETIME to Linux, unknown to 6.1
        # the PF refuses FEATURES_OK (VF_MIGRATION without its requirements); the driver gives up
        assert fn.negotiated == 0 and "VF_MIGRATION" in (fn.features_refusal or "")
        assert fn.status & DeviceStatus.FAILED and not fn.status & DeviceStatus.DRIVER_OK
        assert "device refuses features" in vm.text()
        # it never touched a register the proposal does not define (queue_notif_config_data 0x38,
        # queue_reset 0x3a, the admin queue registers): only virtio 1.0's common configuration
        bar0 = {off for region, off, _, _ in dev.accesses if region == PciRegion.BAR0 and off < 0x1000}
        assert bar0 and max(bar0) < COMMON_CFG_V1_0_SIZE, sorted(hex(o) for o in bar0)
        touched = sorted({f.name for f in COMMON_CFG for o in bar0 if f.offset <= o < f.offset + f.width})
        print("Linux 6.1 on the seed PF: wrote features", hex(accepted), "touched", touched)
        # refused at FEATURES_OK, it never set a queue up: status and feature registers only
        assert set(touched) <= {"device_status", "device_feature_select", "device_feature",
                                "driver_feature_select", "driver_feature"}, touched
        status, out = vm.sh("ls /sys/bus/pci/devices/0000:00:01.0/ | grep -c sriov; "
                            "hexdump -s 256 -n 4 -e '1/4 \"%08x\"' /sys/bus/pci/devices/0000:00:01.0/config; echo")
        count, ext = out.split()[-2:]
        assert count == "0"  # no SR-IOV in the guest's view ...
        assert int(ext, 16) & 0xFFFF != 0x10  # ... because no SR-IOV capability at 0x100 reaches it
        _, out = vm.sh("cat /sys/bus/pci/devices/0000:00:01.0/vendor /sys/bus/pci/devices/0000:00:01.0/device")
        assert out.split()[-2:] == ["0x1af4", "0x1042"]  # it is our PF at 00:01.0
    except Exception:
        print(guest.diag())
        raise


def test_linux_612_admin_queue_on_the_14_pf(tmp_path):
    """The virtio-1.4 profile's PF under Debian trixie's 6.12, whose virtio_pci speaks the admin
    virtqueue.  Probe 1, the spec's rule: the driver's LIST_QUERY for the SR-IOV group, sent while
    VF Enable is clear, gets EINVAL / INVALID_GROUP and nothing else is sent.  Probe 2 (the driver
    unbound and bound again) with ``lists_before_vf_enable``: LIST_QUERY and LIST_USE are answered
    OK, and so is every command the driver sends after them."""
    try:
        vfio_assets("6.12")
    except QemuUnavailable as exc:
        pytest.skip(f"6.12 real-guest test: {exc}")
    from virtio_lm.pf.admin import SUPPORTED
    from virtio_lm.wire.admin import AdminCmdHdr, AdminCmdStatus, AdminOpcode, AdminQualifier, AdminStatus, GroupType

    host = VfioUserHost(str(tmp_path), [], serve={"pf"}, profile="virtio-1.4").start()
    fn = host.devices["pf"].fn
    handler = fn.device.admin
    served: list[tuple[str, int]] = []
    inner = handler.handle

    def recording(readable: bytes, writable_len: int) -> bytes:
        out = inner(readable, writable_len)
        op = AdminCmdHdr.decode_from(readable)[0].opcode
        head = AdminCmdStatus.decode_from(out)[0] if len(out) >= AdminCmdStatus.SIZE else None
        status = (int(head.status), int(head.status_qualifier)) if head else (-1, -1)
        try:
            name = AdminOpcode(op).name
        except ValueError:
            name = hex(op)
        served.append((name, AdminCmdHdr.decode_from(readable)[0].group_type, *status))
        return out

    handler.handle = recording  # type: ignore[method-assign]
    vm = None
    try:
        vm = VfioVm(tmp_path, "vfio-pf14", [host.servers["pf"].path], kernel_version="6.12")
        vm.boot()
        vm.wait_sh("test -b /dev/vda", timeout=60)
        assert fn.status & DeviceStatus.DRIVER_OK and fn.negotiated & bit(Feature.ADMIN_VQ)
        print("Linux 6.12 on the 1.4 PF, probe 1 (spec rule): admin commands", served,
              "features", hex(fn.negotiated))
        assert host.pf.num_vfs == 0 and not handler.lists_before_vf_enable
        assert served == [("LIST_QUERY", 1, AdminStatus.EINVAL, AdminQualifier.INVALID_GROUP)], served

        # probe 2: the same driver, bound again, against the Linux-compatible answer
        handler.lists_before_vf_enable = True
        served.clear()
        _, out = vm.sh("cat /sys/bus/pci/devices/0000:00:01.0/vendor /sys/bus/pci/devices/0000:00:01.0/device")
        assert out.split()[-2:] == ["0x1af4", "0x1042"]  # our PF is 00:01.0
        vm.sh("echo 0000:00:01.0 > /sys/bus/pci/drivers/virtio-pci/unbind")
        vm.wait_sh("! test -b /dev/vda", timeout=60)
        vm.sh("echo 0000:00:01.0 > /sys/bus/pci/drivers/virtio-pci/bind")
        vm.wait_sh("test -b /dev/vda", timeout=60)
        assert fn.status & DeviceStatus.DRIVER_OK and fn.negotiated & bit(Feature.ADMIN_VQ)
        print("Linux 6.12 on the 1.4 PF, probe 2 (lists_before_vf_enable): admin commands", served,
              "used list", sorted(handler.used_commands(GroupType.SRIOV)))
        names = [n for n, *_ in served]
        assert names[:2] == ["LIST_QUERY", "LIST_USE"], served
        assert all(status == AdminStatus.OK for _, _, status, _ in served), served
        # what Linux put in LIST_USE is what the device now holds, and a subset of what it offered
        assert handler.used_commands(GroupType.SRIOV) <= SUPPORTED[GroupType.SRIOV]
    except Exception:
        print(vm.diag() if vm else "", served)
        raise
    finally:
        if vm is not None:
            vm.stop()
        host.close()
