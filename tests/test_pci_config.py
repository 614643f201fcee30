"""PCI configuration space of every function: header, the capability lists walked the way Linux
walks them, BAR 0 through the virtio capabilities, SR-IOV and FLR by register, hostile writes."""

from __future__ import annotations

import pytest

from virtio_lm.errors import FunctionNumberError, RegisterAccessError
from virtio_lm.memory import Memory
from virtio_lm.pci import SriovPF, VirtioPciFunction
from virtio_lm.pci.config import ConfigSpace
from virtio_lm.pf.device import Profile, build_pf
from virtio_lm.wire import pcicfg as C
from virtio_lm.wire.pci import COMMON_CFG_BY_NAME, CapType, VirtioPciCap, VirtioPciNotifyCap

from test_pci_sriov import PfDevice, factory_for

# ---------------------------------------------------------------------------- Linux's walk
# include/linux/pci.h / drivers/pci/pci.c semantics, written from what they do:
# * pci_find_capability: only if PCI_STATUS_CAP_LIST; start at PCI_CAPABILITY_LIST; at most
#   PCI_FIND_CAP_TTL (48) steps; each pointer is masked with ~3 and a pointer below 0x40 ends
#   the walk; an id of 0xff ends it.
# * pci_find_ext_capability: only in a 4096-byte space; start at 0x100; at most
#   (4096 - 256) / 8 steps; a header of 0 (or all ones) means no capability; a next pointer
#   below 0x100 ends the walk.


def walk_caps(read) -> list[tuple[int, int]]:
    """[(offset, id)] of the standard list, as pci_find_next_cap_ttl visits it."""
    out: list[tuple[int, int]] = []
    if not read(C.PCI_STATUS, 2) & C.PCI_STATUS_CAP_LIST:
        return out
    pos = read(C.PCI_CAPABILITY_LIST, 1)
    ttl = C.PCI_FIND_CAP_TTL
    while ttl:
        ttl -= 1
        if pos < C.PCI_STD_HEADER_SIZEOF:
            break
        pos &= ~3
        ent = read(pos, 2)
        cap_id = ent & 0xFF
        if cap_id == 0xFF:
            break
        out.append((pos, cap_id))
        pos = ent >> 8
    return out


def linux_find_capability(read, cap_id: int) -> int:
    for pos, cid in walk_caps(read):
        if cid == cap_id:
            return pos
    return 0


def walk_ext_caps(read) -> list[tuple[int, int]]:
    """[(offset, id)] of the extended list, as pci_find_next_ext_capability visits it."""
    out: list[tuple[int, int]] = []
    pos = C.PCI_CFG_SPACE_SIZE
    ttl = (C.PCI_CFG_SPACE_EXP_SIZE - C.PCI_CFG_SPACE_SIZE) // 8
    header = read(pos, 4)
    if header == 0 or header == 0xFFFF_FFFF:
        return out
    while ttl > 0:
        ttl -= 1
        out.append((pos, C.pci_ext_cap_id(header)))
        pos = C.pci_ext_cap_next(header)
        if pos < C.PCI_CFG_SPACE_SIZE:
            break
        header = read(pos, 4)
    return out


def linux_find_ext_capability(read, cap_id: int) -> int:
    for pos, cid in walk_ext_caps(read):
        if cid == cap_id:
            return pos
    return 0


def virtio_caps(read) -> dict[int, int]:
    """cfg_type -> offset of the first vendor capability of each type (virtio_pci_find_capability)."""
    found: dict[int, int] = {}
    for pos, cid in walk_caps(read):
        if cid == C.PCI_CAP_ID_VNDR:
            found.setdefault(read(pos + VirtioPciCap.OFFSETS["cfg_type"], 1), pos)
    return found


def check_list_sane(caps: list[tuple[int, int]], sizes: dict[int, int], lo: int, hi: int) -> None:
    """Every capability inside [lo, hi), none overlapping, no offset visited twice."""
    offsets = [p for p, _ in caps]
    assert len(set(offsets)) == len(offsets), f"the list visits an offset twice: {offsets}"
    spans = sorted((p, p + sizes[p]) for p in offsets)
    for (a0, a1), (b0, _) in zip(spans, spans[1:]):
        assert a1 <= b0, f"capabilities at {a0:#x} and {b0:#x} overlap"
    for p0, p1 in spans:
        assert lo <= p0 and p1 <= hi, f"capability [{p0:#x}, {p1:#x}) outside [{lo:#x}, {hi:#x})"


def cap_size(read, pos: int, cap_id: int) -> int:
    if cap_id == C.PCI_CAP_ID_VNDR:
        return read(pos + 2, 1)  # cap_len
    return {C.PCI_CAP_ID_EXP: C.PCI_CAP_EXP_ENDPOINT_SIZEOF_V2, C.PCI_CAP_ID_MSIX: C.PCI_CAP_MSIX_SIZEOF}[cap_id]


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture
def mems(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 16))
    with Memory(1 << 20, name="host") as host, Memory(1 << 22, name="guest") as guest:
        guest.image = str(image)  # type: ignore[attr-defined]
        yield host, guest


def _blk_net_factory(guest):
    from virtio_lm.devices.blk import BlkDevice
    from virtio_lm.devices.net import NetDevice

    def factory(n):
        dev = BlkDevice(guest.image) if n == 1 else NetDevice(mac=bytes.fromhex("525400123456"))
        return dev, guest.device_port(f"vf{n}")

    return factory


def every_function(mems):
    host, guest = mems
    pf = build_pf(host.device_port("pf"), total_vfs=4, threaded=False)
    pf.enable_vfs(2, _blk_net_factory(guest))
    pf14 = build_pf(host.device_port("pf14"), total_vfs=2, threaded=False, profile=Profile.VIRTIO_1_4, name="pf14")
    pf14.enable_vfs(1, _blk_net_factory(guest))
    return [pf, pf.vf(1), pf.vf(2), pf14, pf14.vf(1)]


# ---------------------------------------------------------------------------- the walk
def test_every_capability_list_walks_like_linux(mems):
    for fn in every_function(mems):
        read = fn.config_read
        caps = walk_caps(read)
        ids = [cid for _, cid in caps]
        assert ids.count(C.PCI_CAP_ID_EXP) == 1 and ids.count(C.PCI_CAP_ID_MSIX) == 1, fn.name
        check_list_sane(caps, {p: cap_size(read, p, cid) for p, cid in caps},
                        C.PCI_STD_HEADER_SIZEOF, C.PCI_CFG_SPACE_SIZE)
        vc = virtio_caps(read)
        want = {CapType.COMMON, CapType.NOTIFY, CapType.ISR, CapType.PCI}
        if fn.device.config_size:
            want.add(CapType.DEVICE)
        assert set(vc) == want, fn.name
        ext = walk_ext_caps(read)
        if isinstance(fn, SriovPF):
            assert ext == [(0x100, C.PCI_EXT_CAP_ID_SRIOV)], fn.name
            check_list_sane(ext, {0x100: C.PCI_EXT_CAP_SRIOV_SIZEOF}, 0x100, 0x1000)
        else:
            assert ext == [], fn.name
            assert linux_find_ext_capability(read, C.PCI_EXT_CAP_ID_SRIOV) == 0


def test_walk_guard_stops_a_looping_list():
    """Negative control: a list that loops is cut by the TTL and the sanity check flags it."""
    cs = ConfigSpace()
    cs.init(C.PCI_STATUS, 2, C.PCI_STATUS_CAP_LIST)
    cs.init(C.PCI_CAPABILITY_LIST, 1, 0x40)
    cs.init(0x40, 2, C.PCI_CAP_ID_MSIX | 0x50 << 8)
    cs.init(0x50, 2, C.PCI_CAP_ID_EXP | 0x40 << 8)  # back to the first: a loop
    caps = walk_caps(cs.read)
    assert len(caps) == C.PCI_FIND_CAP_TTL
    with pytest.raises(AssertionError, match="twice"):
        check_list_sane(caps, {0x40: 12, 0x50: 12}, 0x40, 0x100)
    cs.init(0x100, 4, C.pci_ext_cap(C.PCI_EXT_CAP_ID_SRIOV, 1, 0x100))  # points at itself
    assert len(walk_ext_caps(cs.read)) == (0x1000 - 0x100) // 8


def test_walk_stops_at_pointer_below_header_and_id_ff():
    cs = ConfigSpace()
    cs.init(C.PCI_STATUS, 2, C.PCI_STATUS_CAP_LIST)
    cs.init(C.PCI_CAPABILITY_LIST, 1, 0x40)
    cs.init(0x40, 2, C.PCI_CAP_ID_MSIX | 0x3C << 8)  # next inside the header: the end
    assert walk_caps(cs.read) == [(0x40, C.PCI_CAP_ID_MSIX)]
    cs.init(0x40, 2, 0xFF | 0x50 << 8)
    assert walk_caps(cs.read) == []
    cs.init(C.PCI_STATUS, 2, 0)  # no capability list at all
    assert walk_caps(cs.read) == []


# ---------------------------------------------------------------------------- header
def test_header_of_pf_and_vfs(mems):
    pf, vf1, vf2, _, _ = every_function(mems)
    r = pf.config_read
    assert (r(C.PCI_VENDOR_ID, 2), r(C.PCI_DEVICE_ID, 2)) == (0x1AF4, 0x1042)  # the PF is a virtio-blk device
    assert r(C.PCI_CLASS_DEVICE, 2) == C.PCI_CLASS_STORAGE_SCSI
    assert r(C.PCI_REVISION_ID, 1) >= 1 and r(C.PCI_SUBSYSTEM_ID, 2) >= 0x40
    assert r(C.PCI_SUBSYSTEM_VENDOR_ID, 2) == 0x1AF4 and r(C.PCI_HEADER_TYPE, 1) == 0
    assert r(C.PCI_BASE_ADDRESS_0, 4) == C.PCI_BASE_ADDRESS_MEM_TYPE_64
    for vf, cls in ((vf1, C.PCI_CLASS_STORAGE_SCSI), (vf2, C.PCI_CLASS_NETWORK_ETHERNET)):
        assert vf.config_read(C.PCI_VENDOR_ID, 4) == 0xFFFF_FFFF  # SR-IOV: a VF's ids read all ones
        assert vf.config_read(C.PCI_CLASS_DEVICE, 2) == cls
        assert vf.config_read(C.PCI_BASE_ADDRESS_0, 4) == 0  # VF BARs live in the PF's SR-IOV cap


def test_bar0_sizing_and_64bit_address(mems):
    host, _ = mems
    fn = build_pf(host.device_port("pf"), threaded=False)
    fn.config_write(C.PCI_BASE_ADDRESS_0, 4, 0xFFFF_FFFF)
    assert fn.config_read(C.PCI_BASE_ADDRESS_0, 4) == (~(C.BAR0.size - 1) & 0xFFFF_FFF0) | 0x4
    fn.config_write(C.PCI_BASE_ADDRESS_0 + 4, 4, 0xFFFF_FFFF)
    assert fn.config_read(C.PCI_BASE_ADDRESS_0 + 4, 4) == 0xFFFF_FFFF
    fn.config_write(C.PCI_BASE_ADDRESS_0, 4, 0xFEB0_0000)
    assert fn.config_read(C.PCI_BASE_ADDRESS_0, 4) == 0xFEB0_0004
    for bar in range(2, 6):  # no other BAR: all bits read-only zero
        fn.config_write(C.PCI_BASE_ADDRESS_0 + 4 * bar, 4, 0xFFFF_FFFF)
        assert fn.config_read(C.PCI_BASE_ADDRESS_0 + 4 * bar, 4) == 0


def test_virtio_caps_point_at_bar0_registers(mems):
    host, _ = mems
    fn = build_pf(host.device_port("pf"), threaded=False)
    vc = virtio_caps(fn.config_read)
    common = VirtioPciCap.decode(fn.config.peek(vc[CapType.COMMON], VirtioPciCap.SIZE))
    notify = VirtioPciNotifyCap.decode(fn.config.peek(vc[CapType.NOTIFY], VirtioPciNotifyCap.SIZE))
    isr = VirtioPciCap.decode(fn.config.peek(vc[CapType.ISR], VirtioPciCap.SIZE))
    assert common.bar == notify.bar == isr.bar == 0
    assert common.length >= 0x38 and isr.length >= 1
    assert notify.notify_off_multiplier == 4
    reg = COMMON_CFG_BY_NAME
    fn.bar_write(0, common.offset + reg["device_feature_select"].offset, 4, 1)
    assert fn.bar_read(0, common.offset + reg["device_feature"].offset, 4) == fn.offered_features() >> 32
    fn.bar_write(0, common.offset + reg["device_status"].offset, 1, 1)
    assert fn.common_read(reg["device_status"].offset, 1) == 1
    # every queue's notify address is inside the notify capability's window
    for q in range(len(fn.queues)):
        fn.bar_write(0, common.offset + reg["queue_select"].offset, 2, q)
        off = fn.bar_read(0, common.offset + reg["queue_notify_off"].offset, 2)
        addr = notify.offset + off * notify.notify_off_multiplier
        assert notify.offset <= addr and addr + 2 <= notify.offset + notify.length


def test_notify_through_bar0_reaches_the_queue(mems):
    from test_pci_function import EchoDevice, F_VERSION_1, setup_queue, to_features_ok, w, DRIVER_OK
    host, _ = mems
    fn = VirtioPciFunction(EchoDevice(F_VERSION_1), host.device_port("dev"), name="dev")
    to_features_ok(fn, F_VERSION_1)
    from virtio_lm.virtqueue.driver import Allocator
    dq = setup_queue(fn, host, 0, Allocator(0x1000, 0x80000))
    w(fn, "device_status", fn.status | DRIVER_OK)
    from virtio_lm.virtqueue.device import Segment
    host.cpu.write(0x60000, b"ping")
    dq.add([Segment(0x60000, 4)], [Segment(0x61000, 8)])
    dq.publish()
    assert dq.get_used() is None
    fn.bar_write(0, C.BAR0.notify + 0 * C.BAR0.notify_off_multiplier, 2, 0)
    assert dq.get_used() is not None and host.cpu.read(0x61000, 4) == b"ping"
    with pytest.raises(RegisterAccessError):
        fn.bar_write(0, C.BAR0.notify + 1, 1, 0)  # not a queue's address
    with pytest.raises(RegisterAccessError):
        fn.bar_write(0, C.BAR0.notify + 4 * len(fn.queues), 2, 0)  # past the last queue


def test_isr_through_bar0_is_read_to_clear(mems):
    host, _ = mems
    fn = build_pf(host.device_port("pf"), threaded=False)
    fn.queue_interrupt(0)
    assert fn.bar_read(0, C.BAR0.isr, 1) == 1
    assert fn.bar_read(0, C.BAR0.isr, 1) == 0
    with pytest.raises(RegisterAccessError):
        fn.bar_write(0, C.BAR0.isr, 1, 1)


@pytest.mark.parametrize("bar,offset,width", [
    (1, 0, 4), (0, 0x7000, 4), (0, 0x1001, 1), (0, 2, 4), (0, 0, 3), (0, -4, 4), (0, C.BAR0.size, 4),
    (0, C.BAR0.device + 0x800, 4),
])
def test_bar_access_refused(mems, bar, offset, width):
    host, _ = mems
    fn = build_pf(host.device_port("pf"), threaded=False)
    with pytest.raises(RegisterAccessError):
        fn.bar_read(bar, offset, width)


def test_msix_table_in_bar0_and_enable_bit(mems):
    host, _ = mems
    fn = build_pf(host.device_port("pf"), threaded=False)
    msix = linux_find_capability(fn.config_read, C.PCI_CAP_ID_MSIX)
    flags = fn.config_read(msix + C.PCI_MSIX_FLAGS, 2)
    assert (flags & C.PCI_MSIX_FLAGS_QSIZE) + 1 == len(fn.queues) + 1
    assert fn.config_read(msix + C.PCI_MSIX_TABLE, 4) == C.BAR0.msix_table  # BIR 0
    assert fn.config_read(msix + C.PCI_MSIX_PBA, 4) == C.BAR0.msix_pba
    fn.config_write(msix + C.PCI_MSIX_FLAGS, 2, 0xFFFF)  # only enable / mask-all are writable
    assert fn.config_read(msix + C.PCI_MSIX_FLAGS, 2) == flags | C.PCI_MSIX_FLAGS_ENABLE | C.PCI_MSIX_FLAGS_MASKALL
    assert fn.msix_enabled
    assert fn.bar_read(0, C.BAR0.msix_table + 12, 4) == 1  # vector control: masked at reset
    fn.bar_write(0, C.BAR0.msix_table + 8, 4, 0x4021)
    assert fn.bar_read(0, C.BAR0.msix_table + 8, 4) == 0x4021


def test_pci_cfg_access_capability_reaches_bar0(mems):
    host, _ = mems
    fn = build_pf(host.device_port("pf"), threaded=False)
    at = virtio_caps(fn.config_read)[CapType.PCI]
    status = COMMON_CFG_BY_NAME["device_status"].offset
    fn.config_write(at + VirtioPciCap.OFFSETS["bar"], 1, 0)
    fn.config_write(at + VirtioPciCap.OFFSETS["offset"], 4, C.BAR0.common + status)
    fn.config_write(at + VirtioPciCap.OFFSETS["length"], 4, 1)
    fn.config_write(at + C.VIRTIO_PCI_CFG_CAP_DATA, 1, 1)  # ACKNOWLEDGE through the window
    assert fn.common_read(status, 1) == 1
    assert fn.config_read(at + C.VIRTIO_PCI_CFG_CAP_DATA, 1) == 1
    assert fn.config_read(at + C.VIRTIO_PCI_CFG_CAP_DATA, 4) == 0  # width != length: nothing


# ---------------------------------------------------------------------------- SR-IOV by register
def test_sriov_capability_fields(mems):
    host, _ = mems
    pf = SriovPF(PfDevice(), host.device_port("pf"), name="pf", total_vfs=5)
    s = linux_find_ext_capability(pf.config_read, C.PCI_EXT_CAP_ID_SRIOV)
    r = pf.config_read
    assert s == 0x100 and C.pci_ext_cap_ver(r(s, 4)) == 1
    assert (r(s + C.PCI_SRIOV_TOTAL_VF, 2), r(s + C.PCI_SRIOV_INITIAL_VF, 2), r(s + C.PCI_SRIOV_NUM_VF, 2)) == (5, 5, 0)
    assert (r(s + C.PCI_SRIOV_VF_OFFSET, 2), r(s + C.PCI_SRIOV_VF_STRIDE, 2)) == (1, 1)
    assert r(s + C.PCI_SRIOV_VF_DID, 2) == 0x1042
    assert r(s + C.PCI_SRIOV_SUP_PGSIZE, 4) & r(s + C.PCI_SRIOV_SYS_PGSIZE, 4) == 1
    pf.config_write(s + C.PCI_SRIOV_BAR, 4, 0xFFFF_FFFF)  # VF BAR 0 sizes like BAR 0
    assert r(s + C.PCI_SRIOV_BAR, 4) == (~(C.BAR0.size - 1) & 0xFFFF_FFF0) | 0x4


def test_sriov_enable_and_disable_by_register(mems):
    host, guest = mems
    pf = SriovPF(PfDevice(), host.device_port("pf"), name="pf", total_vfs=4)
    made: list = []
    pf.provision(factory_for(guest, made))
    s = pf.caps.sriov
    events: list[int] = []
    pf.add_sriov_listener(events.append)
    pf.config_write(s + C.PCI_SRIOV_NUM_VF, 2, 3)
    assert pf.num_vfs == 0  # NumVFs alone creates nothing
    pf.config_write(s + C.PCI_SRIOV_CTRL, 2, C.PCI_SRIOV_CTRL_VFE | C.PCI_SRIOV_CTRL_MSE)
    assert pf.num_vfs == 3 and [n for n, _ in made] == [1, 2, 3] and events == [3]
    assert all(vf.is_vf for vf in pf.vfs)
    pf.config_write(s + C.PCI_SRIOV_NUM_VF, 2, 1)  # read-only while VF Enable is set
    assert pf.config_read(s + C.PCI_SRIOV_NUM_VF, 2) == 3
    pf.config_write(s + C.PCI_SRIOV_CTRL, 2, 0)
    assert pf.num_vfs == 0 and events == [3, 0]
    pf.enable_vfs(2, factory_for(guest, made))  # the method: the same register writes
    assert pf.config_read(s + C.PCI_SRIOV_NUM_VF, 2) == 2
    assert pf.config_read(s + C.PCI_SRIOV_CTRL, 2) & C.PCI_SRIOV_CTRL_VFE
    pf.disable_vfs()
    assert not pf.config_read(s + C.PCI_SRIOV_CTRL, 2) & C.PCI_SRIOV_CTRL_VFE and pf.num_vfs == 0


def test_numvfs_above_totalvfs_refused(mems):
    host, guest = mems
    pf = SriovPF(PfDevice(), host.device_port("pf"), name="pf", total_vfs=2)
    with pytest.raises(FunctionNumberError):
        pf.config_write(pf.caps.sriov + C.PCI_SRIOV_NUM_VF, 2, 3)
    assert pf.config_read(pf.caps.sriov + C.PCI_SRIOV_NUM_VF, 2) == 0


def test_vf_enable_with_numvfs_zero_refused(mems):
    host, guest = mems
    pf = SriovPF(PfDevice(), host.device_port("pf"), name="pf", total_vfs=2)
    pf.provision(factory_for(guest, []))
    with pytest.raises(FunctionNumberError):
        pf.config_write(pf.caps.sriov + C.PCI_SRIOV_CTRL, 2, C.PCI_SRIOV_CTRL_VFE)
    assert pf.config_read(pf.caps.sriov + C.PCI_SRIOV_CTRL, 2) == 0 and pf.num_vfs == 0


def test_vf_enable_without_provisioning_refused(mems):
    host, _ = mems
    pf = SriovPF(PfDevice(), host.device_port("pf"), name="pf", total_vfs=2)
    pf.config_write(pf.caps.sriov + C.PCI_SRIOV_NUM_VF, 2, 1)
    with pytest.raises(FunctionNumberError, match="provisioned"):
        pf.config_write(pf.caps.sriov + C.PCI_SRIOV_CTRL, 2, C.PCI_SRIOV_CTRL_VFE)
    assert pf.config_read(pf.caps.sriov + C.PCI_SRIOV_CTRL, 2) == 0 and pf.num_vfs == 0


# ---------------------------------------------------------------------------- FLR by register
def test_vf_flr_by_device_control(mems):
    from test_pci_function import w, r
    host, guest = mems
    pf = SriovPF(PfDevice(), host.device_port("pf"), name="pf", total_vfs=3)
    pf.enable_vfs(2, factory_for(guest, []))
    flrs: list[int] = []
    pf.add_flr_listener(flrs.append)
    vf = pf.vf(2)
    exp = linux_find_capability(vf.config_read, C.PCI_CAP_ID_EXP)
    assert vf.config_read(exp + C.PCI_EXP_DEVCAP, 4) & C.PCI_EXP_DEVCAP_FLR
    w(vf, "device_status", 1)
    w(pf.vf(1), "device_status", 1)
    vf.config_write(C.PCI_COMMAND, 2, C.PCI_COMMAND_MASTER)
    vf.config_write(exp + C.PCI_EXP_DEVCTL, 2, vf.config_read(exp + C.PCI_EXP_DEVCTL, 2) | C.PCI_EXP_DEVCTL_BCR_FLR)
    assert r(vf, "device_status") == 0 and vf.flr_count == 1 and flrs == [2]
    assert not vf.config_read(exp + C.PCI_EXP_DEVCTL, 2) & C.PCI_EXP_DEVCTL_BCR_FLR  # reads 0
    assert vf.config_read(C.PCI_COMMAND, 2) == 0  # the function's config is back to power-on
    assert r(pf.vf(1), "device_status") == 1  # the other VF untouched
    pf.flr_vf(1)  # the method does the same write
    assert r(pf.vf(1), "device_status") == 0 and flrs == [2, 1]


def test_pf_flr_by_device_control_removes_vfs(mems):
    host, guest = mems
    pf = SriovPF(PfDevice(), host.device_port("pf"), name="pf", total_vfs=3)
    pf.enable_vfs(2, factory_for(guest, []))
    events: list[int] = []
    pf.add_sriov_listener(events.append)
    exp = pf.caps.exp
    pf.config_write(exp + C.PCI_EXP_DEVCTL, 2, C.PCI_EXP_DEVCTL_BCR_FLR)
    assert pf.num_vfs == 0 and events == [0] and pf.flr_count == 1
    assert pf.config_read(pf.caps.sriov + C.PCI_SRIOV_CTRL, 2) == 0
    assert pf.config_read(pf.caps.sriov + C.PCI_SRIOV_NUM_VF, 2) == 0


# ---------------------------------------------------------------------------- hostile writes
@pytest.mark.parametrize("offset,width,reason", [
    (0, 3, "width"), (0, 8, "width"), (0, 0, "width"), (2, 4, "misaligned"), (1, 2, "misaligned"),
    (0x1000, 1, "range"), (-1, 1, "range"), (0xFFE, 4, "range"), (0x102, 4, "misaligned"), ("0", 4, "width"), (0, True, "width"),
])
def test_config_access_refused(mems, offset, width, reason):
    host, _ = mems
    fn = build_pf(host.device_port("pf"), threaded=False)
    before = fn.config.peek(0, 0x1000)
    with pytest.raises(RegisterAccessError) as ei:
        fn.config_write(offset, width, 0)
    assert ei.value.reason == reason
    with pytest.raises(RegisterAccessError):
        fn.config_read(offset, width)
    assert fn.config.peek(0, 0x1000) == before


def test_config_write_value_too_big_refused(mems):
    host, _ = mems
    fn = build_pf(host.device_port("pf"), threaded=False)
    for value in (0x1_0000, -1, 1.0, None):
        with pytest.raises(RegisterAccessError):
            fn.config_write(C.PCI_COMMAND, 2, value)


def test_byte_and_dword_writes_reach_an_acting_register(mems):
    """PCI byte enables: the FLR bit written as the upper byte alone, or in a dword with DEVSTA."""
    host, _ = mems
    pf = build_pf(host.device_port("pf"), threaded=False)
    devctl = pf.caps.exp + C.PCI_EXP_DEVCTL
    assert pf.config_read(devctl, 4) == pf.config_read(devctl, 2)  # dword read: DEVCTL + DEVSTA (0)
    pf.config_write(devctl + 1, 1, C.PCI_EXP_DEVCTL_BCR_FLR >> 8)
    assert pf.flr_count == 1
    pf.config_write(devctl, 4, C.PCI_EXP_DEVCTL_BCR_FLR | 0x000F_0000)  # with DEVSTA's W1C bits
    assert pf.flr_count == 2 and not pf.config_read(devctl, 2) & C.PCI_EXP_DEVCTL_BCR_FLR
    pf.config_write(devctl, 1, 0x10)  # the low byte alone: no FLR, the bit lands
    assert pf.flr_count == 2 and pf.config_read(devctl, 2) & 0x10
    s = pf.caps.sriov
    pf.config_write(s + C.PCI_SRIOV_CTRL, 4, 0)  # a dword over CTRL and STATUS
    assert pf.num_vfs == 0


def test_read_only_bits_ignore_writes(mems):
    host, guest = mems
    fn = build_pf(host.device_port("pf"), threaded=False)
    fn.enable_vfs(1, _blk_net_factory(guest))
    ro = [(C.PCI_VENDOR_ID, 4), (C.PCI_REVISION_ID, 4), (C.PCI_HEADER_TYPE, 1), (C.PCI_SUBSYSTEM_VENDOR_ID, 4),
          (C.PCI_CAPABILITY_LIST, 1), (C.PCI_INTERRUPT_PIN, 1), (0x100, 4)]
    ro += [(p, 2) for p, _ in walk_caps(fn.config_read)]  # id and next pointer of every capability
    ro += [(fn.caps.exp + C.PCI_EXP_DEVCAP, 4), (fn.caps.msix + C.PCI_MSIX_TABLE, 4)]
    ro += [(fn.caps.sriov + reg, w) for reg, w in ((C.PCI_SRIOV_TOTAL_VF, 2), (C.PCI_SRIOV_VF_OFFSET, 2),
                                                   (C.PCI_SRIOV_VF_STRIDE, 2), (C.PCI_SRIOV_VF_DID, 2),
                                                   (C.PCI_SRIOV_SUP_PGSIZE, 4))]
    for pos, cid in walk_caps(fn.config_read):
        if cid == C.PCI_CAP_ID_VNDR and fn.config_read(pos + 3, 1) != CapType.PCI:
            ro += [(pos + 4, 4), (pos + 8, 4), (pos + 12, 4)]  # a virtio cap's bar/offset/length
    for off, width in ro:
        before = fn.config.peek(0, 0x1000)
        for value in (0, (1 << (8 * width)) - 1):
            fn.config_write(off, width, value)
            assert fn.config.peek(0, 0x1000) == before, f"{off:#x}/{width} changed"
    assert fn.num_vfs == 1
    vf = fn.vf(1)
    vf.config_write(C.PCI_COMMAND, 2, 0xFFFF)  # a VF: only bus master is writable
    assert vf.config_read(C.PCI_COMMAND, 2) == C.PCI_COMMAND_MASTER


def test_status_error_bits_are_write_one_to_clear(mems):
    host, _ = mems
    fn = build_pf(host.device_port("pf"), threaded=False)
    fn.config.store(C.PCI_STATUS, 2, C.PCI_STATUS_CAP_LIST | 0x8000)  # the device signalled a parity error
    fn.config_write(C.PCI_STATUS, 2, 0)  # writing 0 clears nothing
    assert fn.config_read(C.PCI_STATUS, 2) == C.PCI_STATUS_CAP_LIST | 0x8000
    fn.config_write(C.PCI_STATUS, 2, 0xFFFF)  # writing 1 clears the error, not CAP_LIST
    assert fn.config_read(C.PCI_STATUS, 2) == C.PCI_STATUS_CAP_LIST
