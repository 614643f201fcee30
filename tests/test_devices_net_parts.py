"""virtio-net's device parts (VIRTIO_NET_DEV_PART_CVQ_CFG_PART) on a VF of a virtio-1.4 PF:
what the device gives, what it takes, and one test per refused part (the device unchanged)."""

from __future__ import annotations

import pytest

from virtio_lm.devices.net import NetDevice
from virtio_lm.drivers.admin_driver import AdminDriver
from virtio_lm.drivers.net_driver import DEFAULT_WANTED, NetDriver
from virtio_lm.errors import AdminCommandError, DevicePartsError
from virtio_lm.memory import Memory
from virtio_lm.pci.parts import part_name
from virtio_lm.pf.device import build_pf
from virtio_lm.virtqueue.driver import Allocator
from virtio_lm.wire.admin import AdminQualifier, AdminStatus
from virtio_lm.wire.features import bit
from virtio_lm.wire.net import CtrlClass, MacCmd, MacTables, MqCmd, NetFeature, RxCmd, VlanCmd
from virtio_lm.wire.netstate import RxModeFlags
from virtio_lm.wire.parts import DevPart, NetCvqSelector, PartType

GUEST = 8 << 20
HOST = 4 << 20


def cvq(cls: int, cmd: int, value: bytes, *, optional: bool = False) -> DevPart:
    return DevPart.make(PartType.NET_CVQ_CFG, value, selector=NetCvqSelector(cls, cmd).encode(), optional=optional)


@pytest.fixture
def vm():
    host, guest = Memory(HOST, name="host"), Memory(GUEST, name="guest")
    pf = build_pf(host.device_port("pf"), total_vfs=1, profile="virtio-1.4")
    adm = AdminDriver(pf, host.cpu, Allocator(0x10000, HOST - 0x10000))
    adm.bring_up()
    dev = NetDevice(None, max_pairs=4)
    adm.enable_vfs(1, lambda n: (dev, guest.device_port("vf1")))
    drv = NetDriver(pf.vf(1), guest.cpu, ring_alloc=Allocator(0x1000, 0x1FF000), buf_alloc=Allocator(0x200000, GUEST - 0x200000))
    pf.vf(1).on_interrupt = drv.on_interrupt
    drv.bring_up(DEFAULT_WANTED, queue_size=64, pairs=2)
    yield adm, dev, drv
    pf.device.close()
    dev.close()
    guest.close()
    host.close()


def state(dev: NetDevice) -> tuple:
    return (dev.mac, dev.rx_mode, dev.curr_pairs, dev.unicast, dev.multicast, frozenset(dev.vlans))


def test_net_parts_carry_the_control_queue_configuration(vm):
    adm, dev, drv = vm
    drv.set_promisc(False)
    drv.set_allmulti(True)
    drv.set_mac_table([bytes.fromhex("02000000aa01")], [bytes.fromhex("01005e0000aa")])
    drv.vlan_add(5)
    drv.set_mac(bytes.fromhex("525400777777"))
    parts = adm.save_parts(1)
    names = [part_name(p) for p in parts if p.hdr.part_type == PartType.NET_CVQ_CFG]
    assert names == [f"NET_CVQ_CFG/{NetCvqSelector(c, m).encode().hex()}" for c, m in (
        (CtrlClass.RX, RxCmd.PROMISC), (CtrlClass.RX, RxCmd.ALLMULTI), (CtrlClass.MAC, MacCmd.TABLE_SET),
        (CtrlClass.MAC, MacCmd.ADDR_SET), (CtrlClass.VLAN, VlanCmd.ADD), (CtrlClass.MQ, MqCmd.VQ_PAIRS_SET))]
    before = state(dev)
    # the driver changes everything again; then, stopped, the saved parts put it back
    drv.set_promisc(True)
    drv.set_allmulti(False)
    drv.set_mac_table([], [])
    drv.vlan_del(5)
    drv.set_mac(bytes.fromhex("525400888888"))
    assert state(dev) != before
    adm.mode_set(1, stopped=True)
    adm.restore_parts(1, parts)
    assert state(dev) == before == (bytes.fromhex("525400777777"), RxModeFlags.ALLMULTI, 2,
                                    (bytes.fromhex("02000000aa01"),), (bytes.fromhex("01005e0000aa"),), frozenset({5}))


def test_net_part_values_follow_the_command_formats(vm):
    adm, dev, drv = vm
    common = [p for p in adm.save_parts(1) if p.hdr.part_type < 0x200]
    adm.mode_set(1, stopped=True)
    tables = MacTables((bytes.fromhex("020000000001"),), ())
    parts = common + [
        cvq(CtrlClass.RX, RxCmd.PROMISC, b"\0"),
        cvq(CtrlClass.MAC, MacCmd.TABLE_SET, tables.encode()),
        cvq(CtrlClass.VLAN, VlanCmd.ADD, (7).to_bytes(2, "little") + (9).to_bytes(2, "little")),
        cvq(CtrlClass.MQ, MqCmd.VQ_PAIRS_SET, (3).to_bytes(2, "little")),
    ]
    adm.restore_parts(1, parts)
    assert dev.rx_mode == RxModeFlags(0) and dev.unicast == tables.unicast
    assert dev.vlans == {7, 9} and dev.curr_pairs == 3


BAD = {
    "unknown_selector": cvq(CtrlClass.RX, 7, b"\1"),
    "rx_extra_not_negotiated": cvq(CtrlClass.RX, RxCmd.NOBCAST, b"\1"),
    "announce_ack_not_taken": cvq(CtrlClass.ANNOUNCE, 0, b""),
    "rx_value_not_0_or_1": cvq(CtrlClass.RX, RxCmd.PROMISC, b"\2"),
    "rx_value_too_long": cvq(CtrlClass.RX, RxCmd.PROMISC, b"\1\0"),
    "mac_table_cut_short": cvq(CtrlClass.MAC, MacCmd.TABLE_SET, b"\1\0\0\0"),
    "mac_table_too_many_entries": cvq(CtrlClass.MAC, MacCmd.TABLE_SET, MacTables(tuple(bytes([2, 0, 0, 0, i // 256, i % 256]) for i in range(65)), ()).encode()),
    "mac_addr_group_address": cvq(CtrlClass.MAC, MacCmd.ADDR_SET, bytes.fromhex("010000000001")),
    "mac_addr_wrong_length": cvq(CtrlClass.MAC, MacCmd.ADDR_SET, bytes(5)),
    "vlan_table_odd_length": cvq(CtrlClass.VLAN, VlanCmd.ADD, b"\1\0\2"),
    "vlan_table_not_ascending": cvq(CtrlClass.VLAN, VlanCmd.ADD, (9).to_bytes(2, "little") + (7).to_bytes(2, "little")),
    "vlan_id_too_large": cvq(CtrlClass.VLAN, VlanCmd.ADD, (4096).to_bytes(2, "little")),
    "pairs_above_max": cvq(CtrlClass.MQ, MqCmd.VQ_PAIRS_SET, (5).to_bytes(2, "little")),
    "pairs_zero": cvq(CtrlClass.MQ, MqCmd.VQ_PAIRS_SET, (0).to_bytes(2, "little")),
    "selector_reserved_not_zero": DevPart.make(PartType.NET_CVQ_CFG, b"\1", selector=b"\0\0\1" + bytes(5)),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_net_part_is_refused_and_the_device_unchanged(vm, name):
    adm, dev, drv = vm
    common = [p for p in adm.save_parts(1) if p.hdr.part_type < 0x200]
    adm.mode_set(1, stopped=True)
    before = state(dev)
    with pytest.raises(DevicePartsError):
        dev.mig_validate_parts(common + [BAD[name]])
    with pytest.raises(AdminCommandError) as ei:  # and through the admin queue
        adm.restore_parts(1, common + [BAD[name]])
    assert (ei.value.status, ei.value.qualifier) == (AdminStatus.EINVAL, AdminQualifier.INVALID_FIELD)
    assert state(dev) == before


def test_net_part_for_a_feature_not_negotiated_is_refused(vm):
    adm, dev, drv = vm
    common = [p for p in adm.save_parts(1) if p.hdr.part_type < 0x200]
    drv_features = next(p for p in common if p.hdr.part_type == PartType.DRV_FEATURES)
    negotiated = int.from_bytes(drv_features.value[:8], "little")
    assert negotiated & bit(NetFeature.CTRL_VLAN)
    with pytest.raises(DevicePartsError, match="CTRL_VLAN"):
        dev.validate_device_parts([cvq(CtrlClass.VLAN, VlanCmd.ADD, b"")], negotiated & ~bit(NetFeature.CTRL_VLAN))


def test_unknown_optional_net_selector_is_ignored(vm):
    adm, dev, drv = vm
    common = [p for p in adm.save_parts(1) if p.hdr.part_type < 0x200]
    adm.mode_set(1, stopped=True)
    adm.restore_parts(1, common + [cvq(CtrlClass.MQ, MqCmd.RSS_CONFIG, b"xx", optional=True)])
