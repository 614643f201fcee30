"""The virtio-1.4 profile's admin queue, through the REAL queue: one test per normative statement.

A threaded PF of the virtio-1.4 profile on host memory, brought up by
:class:`AdminDriver` through registers; VFs with a gated DMA test device on
guest memories, brought up by their own (guest) drivers.  Test names follow
the statement they check (admin.tex, admin-cmds-*.tex, transport-pci.tex);
every refusal is checked for its status and qualifier and for having changed
nothing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest

from helpers import MEM_SIZE, RING_AREA, GatedDmaTestDevice, Rig, check_result, wait_until
from virtio_lm.drivers.admin_driver import AdminDriver
from virtio_lm.errors import FeatureMissingError
from virtio_lm.memory import Memory
from virtio_lm.pci import PciDriverTransport
from virtio_lm.pci.parts import part_name
from virtio_lm.pci.sriov import SriovPF
from virtio_lm.pf.admin import INITIAL_USE, MODE_TRANSITIONS, SUPPORTED, MemberMode, ModeAction
from virtio_lm.pf.device import PF_FEATURES, PF_FEATURES_1_4, Profile, build_pf
from virtio_lm.virtqueue.device import Segment
from virtio_lm.virtqueue.driver import Allocator
from virtio_lm.wire.admin import (
    STATUS_SIZE,
    AdminOpcode,
    AdminQualifier,
    AdminStatus,
    CapGetData,
    CapId,
    DevPartsCap,
    DevPartsObjType,
    GroupType,
    MetadataType,
    PartsCmdHead,
    PartsGetType,
    ResourceObjCmdHdr,
    ResourceObjCreateHead,
    ResourceObjDevParts,
    ResourceObjType,
    decode_bitmap,
    encode_bitmap,
    encode_command,
)
from virtio_lm.wire.blk import BlkFeature
from virtio_lm.wire.codec import u16
from virtio_lm.wire.features import DeviceStatus, Feature, ProposalFeature, bit
from virtio_lm.wire.parts import (
    NO_SELECTOR,
    CommonCfgSelector,
    DevPart,
    DevPartHdr,
    PartFlags,
    PartType,
    VqCfgValue,
    VqIndexSelector,
    VqNotifyValue,
    encode_features,
    encode_hdrs,
    encode_parts,
)
from virtio_lm.wire.pci import COMMON_CFG_BY_NAME

HOST_SIZE = 8 << 20
NUM_VFS = 2
TIMEOUT = 20.0
OP, S, Q, G = AdminOpcode, AdminStatus, AdminQualifier, GroupType
DP = ResourceObjType.DEV_PARTS


# ====================================================================== rig
@dataclass
class Host:
    host: Memory
    pf: SriovPF
    drv: AdminDriver
    guests: dict[int, Memory] = field(default_factory=dict)
    devs: dict[int, GatedDmaTestDevice] = field(default_factory=dict)
    rigs: dict[int, Rig] = field(default_factory=dict)

    @property
    def admin(self):
        return self.pf.device.admin  # type: ignore[attr-defined]

    def enable(self, n: int = NUM_VFS) -> None:
        def factory(k: int):
            mem = Memory(MEM_SIZE, name=f"vm{k}")
            dev = GatedDmaTestDevice(gated=False)
            self.guests[k], self.devs[k] = mem, dev
            return dev, mem.device_port(f"vf{k}")

        self.drv.enable_vfs(n, factory)

    def guest_driver(self, k: int) -> Rig:
        fn = self.pf.vf(k)
        rig = Rig(self.guests[k], fn, self.devs[k])
        fn.on_interrupt = rig.interrupts.append
        rig.tr = PciDriverTransport(fn, self.guests[k].cpu, Allocator(*RING_AREA))
        (rig.dq,) = rig.tr.bring_up(bit(Feature.VERSION_1) | bit(Feature.EVENT_IDX), 1, size=64)
        self.rigs[k] = rig
        return rig

    def raw(self, opcode: int, group: int, member: int, data: bytes = b"", space: int = 64, **kw):
        return self.drv.raw_command(opcode, group, member, data, space, **kw)

    def close(self) -> None:
        try:
            self.drv.close()
        finally:
            self.pf.flr()
            self.pf.device.close()
            for dev in self.devs.values():
                dev.open_all()
                dev.close()
            for mem in self.guests.values():
                mem.close()
            self.host.close()


def make_host(*, vfs: int = NUM_VFS, discover: bool = True, up: bool = True, **kw) -> Host:
    host = Memory(HOST_SIZE, name="host")
    pf = build_pf(host.device_port("pf0"), total_vfs=4, profile="virtio-1.4", **kw)
    drv = AdminDriver(pf, host.cpu, Allocator(0x10000, HOST_SIZE - 0x10000), timeout=TIMEOUT)
    h = Host(host, pf, drv)
    if up:
        drv.bring_up(discover=discover)
        if vfs:
            if discover:
                h.enable(vfs)
            else:
                def factory(k: int):
                    mem = Memory(MEM_SIZE, name=f"vm{k}")
                    dev = GatedDmaTestDevice(gated=False)
                    h.guests[k], h.devs[k] = mem, dev
                    return dev, mem.device_port(f"vf{k}")

                pf.enable_vfs(vfs, factory)
    return h


@pytest.fixture
def h():
    host = make_host()
    yield host
    host.close()


def expect(h: Host, status: AdminStatus, qualifier: AdminQualifier, opcode: int, group: int, member: int,
           data: bytes = b"", space: int = 64, **kw) -> None:
    st, result, used = h.raw(opcode, group, member, data, space, **kw)
    assert (st.status, st.status_qualifier) == (status, qualifier), (h.admin.last_error, st)
    if status is not S.OK:
        assert used == STATUS_SIZE and result == b""


def snapshot(h: Host, vf: int) -> tuple:
    """Everything a refused command must leave as it was."""
    fn = h.pf.vf(vf)
    view = h.admin.member(vf)
    queues = tuple((q.size, q.enabled, q.desc_addr, q.avail_addr, q.used_addr, q.last_avail_idx, q.used_idx) for q in fn.queues)
    return (view.mode, view.objects, fn.status, fn.driver_features, fn.config_msix_vector, queues,
            fn.port.bus_master, h.admin.driver_cap, h.admin.used_commands(G.SELF), h.admin.used_commands(G.SRIOV))


def create_data(obj_id: int, kind: int = DevPartsObjType.GET, *, obj_type: int = DP, flags: int = 0) -> bytes:
    return ResourceObjCreateHead(obj_type, 0, obj_id, flags).encode() + ResourceObjDevParts(kind).encode()


# ====================================================================== profile and transport
def test_virtio_1_4_pf_offers_admin_vq_and_never_the_proposals_bits():
    h = make_host()
    try:
        offered = h.pf.offered_features()
        assert offered & bit(Feature.ADMIN_VQ) and offered & bit(Feature.SR_IOV)
        for b in (ProposalFeature.GENERIC_CTRL_VQ_VER_1, ProposalFeature.VF_MIGRATION, BlkFeature.CTRL_VQ):
            assert not offered & bit(b), b
        for k in (1, 2):
            vf = h.pf.vf(k).offered_features()
            assert not vf & (bit(39) | bit(40))
        assert PF_FEATURES_1_4 & ~PF_FEATURES == bit(Feature.ADMIN_VQ)
    finally:
        h.close()


def test_seed_profile_is_unchanged_and_has_no_admin_queue():
    host = Memory(HOST_SIZE, name="host")
    try:
        pf = build_pf(host.device_port("pf0"), total_vfs=2)
        assert pf.device.profile is Profile.SEED
        assert pf.offered_features() & bit(ProposalFeature.VF_MIGRATION)
        assert not pf.offered_features() & bit(Feature.ADMIN_VQ)
        for name in ("admin_queue_index", "admin_queue_num"):
            reg = COMMON_CFG_BY_NAME[name]
            assert pf.common_read(reg.offset, reg.width) == 0
        pf.device.close()
    finally:
        host.close()


def test_admin_queue_index_is_at_least_num_queues_and_admin_queue_num_fits():
    h = make_host(up=False)
    try:
        t = PciDriverTransport(h.pf, h.host.cpu, Allocator(0x10000, HOST_SIZE - 0x10000))
        r = lambda n: h.pf.common_read(COMMON_CFG_BY_NAME[n].offset, 2)  # noqa: E731
        t.negotiate(bit(Feature.VERSION_1))  # ADMIN_VQ not negotiated: the fields read 0
        assert r("admin_queue_index") == 0 and r("admin_queue_num") == 0
        t.negotiate(bit(Feature.VERSION_1) | bit(Feature.ADMIN_VQ))
        idx, num = r("admin_queue_index"), r("admin_queue_num")
        assert idx >= r("num_queues") == 1 and num == 1 and num <= 0x10000 - idx
    finally:
        h.close()


def test_admin_queue_refuses_commands_while_admin_vq_is_not_negotiated():
    h = make_host(up=False)
    try:
        t = PciDriverTransport(h.pf, h.host.cpu, Allocator(0x10000, HOST_SIZE - 0x10000))
        t.negotiate(bit(Feature.VERSION_1) | bit(Feature.SR_IOV))
        dq = t.setup_queue(1, 8)
        t.driver_ok()
        rd, wr = 0x200000, 0x201000
        h.host.cpu.write(rd, encode_command(OP.LIST_QUERY, G.SELF, 0))
        dq.add([Segment(rd, 24)], [Segment(wr, 16)], token="x")
        t.kick(1)
        wait_until(lambda: dq.used_idx() != 0, "the admin buffer to come back")
        (token, used), = dq.get_all_used()
        st = h.host.read(wr, 4)
        assert used == STATUS_SIZE and st == u16(S.EINVAL) + u16(Q.INVALID_COMMAND)
    finally:
        h.close()


def test_driver_refuses_a_pf_without_admin_vq():
    host = Memory(HOST_SIZE, name="host")
    try:
        pf = build_pf(host.device_port("pf0"), total_vfs=2)  # the seed profile: no ADMIN_VQ
        drv = AdminDriver(pf, host.cpu, Allocator(0x10000, HOST_SIZE - 0x10000))
        with pytest.raises(FeatureMissingError, match="ADMIN_VQ"):
            drv.bring_up()
        assert pf.status & int(DeviceStatus.FAILED)
        pf.device.close()
    finally:
        host.close()


# ====================================================================== discovery (admin.tex)
def test_after_reset_only_list_query_and_list_use_are_accepted():
    h = make_host(discover=False)
    try:
        for group in G:
            for op in sorted(SUPPORTED[group] - {OP.LIST_QUERY, OP.LIST_USE}):
                expect(h, S.EINVAL, Q.INVALID_OPCODE, op, group, 1 if group is G.SRIOV else 0, bytes(16))
            expect(h, S.OK, Q.OK, OP.LIST_QUERY, group, 0)
        assert h.admin.used_commands(G.SELF) == {0, 1}
    finally:
        h.close()


def test_list_query_always_reports_list_query_and_list_use(h):
    for group in G:
        got = h.drv.list_query(group)
        assert {0, 1} <= got and got == SUPPORTED[group]


def test_list_query_result_is_div_round_up_max_cmd_64_words(h):
    st, result, used = h.raw(OP.LIST_QUERY, G.SRIOV, 0, space=64)
    assert used == STATUS_SIZE + 8 and decode_bitmap(result[:8]) == SUPPORTED[G.SRIOV]


def test_command_not_in_the_used_list_is_einval_invalid_opcode(h):
    h.drv.list_use(G.SRIOV, SUPPORTED[G.SRIOV] - {OP.DEV_MODE_SET})
    before = snapshot(h, 1)
    expect(h, S.EINVAL, Q.INVALID_OPCODE, OP.DEV_MODE_SET, G.SRIOV, 1, b"\x01" + bytes(7))
    assert snapshot(h, 1) == before and h.admin.member(1).mode is MemberMode.RUNNING


def test_list_use_of_an_unsupported_opcode_is_einval_invalid_field_and_changes_nothing(h):
    before = h.admin.used_commands(G.SRIOV)
    for extra in (OP.LEGACY_COMMON_CFG_READ, OP.CAP_ID_LIST_QUERY, 200):
        expect(h, S.EINVAL, Q.INVALID_FIELD, OP.LIST_USE, G.SRIOV, 0, encode_bitmap(set(SUPPORTED[G.SRIOV]) | {int(extra)}))
    assert h.admin.used_commands(G.SRIOV) == before


def test_list_use_sets_the_list_and_may_block_list_query(h):
    h.drv.list_use(G.SELF, {OP.LIST_USE})
    expect(h, S.EINVAL, Q.INVALID_OPCODE, OP.LIST_QUERY, G.SELF, 0)
    expect(h, S.EINVAL, Q.INVALID_OPCODE, OP.CAP_ID_LIST_QUERY, G.SELF, 0)
    h.drv.list_use(G.SELF, SUPPORTED[G.SELF])
    assert h.drv.cap_id_list_query() == {CapId.DEV_PARTS}


def test_supported_list_never_shrinks_and_the_same_list_use_succeeds_after_reset(h):
    first = {g: h.drv.list_query(g) for g in G}
    used = {g: h.admin.used_commands(g) for g in G}
    h.drv.close()
    h.drv.bring_up(discover=False)
    for g in G:
        assert h.drv.list_query(g) == first[g]
        h.drv.list_use(g, used[g])
    assert {g: h.admin.used_commands(g) for g in G} == used


@pytest.mark.parametrize("group", [2, 0x7FFF, 0xFFFF])
def test_invalid_group_type_is_einval_invalid_group(h, group):
    expect(h, S.EINVAL, Q.INVALID_GROUP, OP.LIST_QUERY, group, 0)
    expect(h, S.EINVAL, Q.INVALID_GROUP, 0x7000, group, 99)  # the group is checked first


def test_sriov_group_with_vf_enable_clear_is_einval_invalid_group():
    h = make_host(vfs=0)
    try:
        expect(h, S.EINVAL, Q.INVALID_GROUP, OP.LIST_QUERY, G.SRIOV, 0)
        expect(h, S.OK, Q.OK, OP.LIST_QUERY, G.SELF, 0)
        expect(h, S.EINVAL, Q.INVALID_GROUP, OP.LIST_USE, G.SRIOV, 0, encode_bitmap(INITIAL_USE))
        assert h.admin.used_commands(G.SRIOV) == INITIAL_USE
    finally:
        h.close()


def test_lists_before_vf_enable_answers_only_the_two_list_commands_while_vf_enable_is_clear():
    """Linux 6.12's probe-time LIST_QUERY / LIST_USE (no member) are answered; a member
    command is still INVALID_GROUP, and the used list holds once VFs are enabled."""
    h = make_host(vfs=0, lists_before_vf_enable=True)
    try:
        st, result, _ = h.raw(OP.LIST_QUERY, G.SRIOV, 0, space=64)
        assert (st.status, st.status_qualifier) == (S.OK, Q.OK)
        assert decode_bitmap(result) == SUPPORTED[G.SRIOV]
        used = frozenset({int(OP.LIST_QUERY), int(OP.LIST_USE), int(OP.DEV_MODE_SET)})
        expect(h, S.OK, Q.OK, OP.LIST_USE, G.SRIOV, 0, encode_bitmap(used))
        assert h.admin.used_commands(G.SRIOV) == used
        # still no group to address a member in: the member commands keep the spec's answer
        expect(h, S.EINVAL, Q.INVALID_GROUP, OP.DEV_MODE_SET, G.SRIOV, 1, b"\x01" + bytes(7))
        expect(h, S.EINVAL, Q.INVALID_GROUP, OP.RESOURCE_OBJ_CREATE, G.SRIOV, 1, create_data(0))
        def factory(k: int):
            mem = Memory(MEM_SIZE, name=f"vm{k}")
            dev = GatedDmaTestDevice(gated=False)
            h.guests[k], h.devs[k] = mem, dev
            return dev, mem.device_port(f"vf{k}")

        h.pf.enable_vfs(1, factory)  # the register write alone: no new LIST_USE
        assert h.admin.used_commands(G.SRIOV) == used
        expect(h, S.OK, Q.OK, OP.DEV_MODE_SET, G.SRIOV, 1, b"\x01" + bytes(7))
        expect(h, S.EINVAL, Q.INVALID_OPCODE, OP.RESOURCE_OBJ_CREATE, G.SRIOV, 1, create_data(0))  # not in the used list
    finally:
        h.close()



@pytest.mark.parametrize("opcode", [0x12, 0x7FFF, 0x8000, 0xFFFF, OP.LEGACY_COMMON_CFG_WRITE])
def test_unsupported_opcode_is_einval_invalid_opcode_before_the_member(h, opcode):
    expect(h, S.EINVAL, Q.INVALID_OPCODE, opcode, G.SRIOV, 0)  # member 0 is invalid too: the opcode wins


@pytest.mark.parametrize("member", [0, NUM_VFS + 1, 1 << 63, (1 << 64) - 1])
def test_sriov_member_outside_1_to_numvfs_is_einval_invalid_member(h, member):
    before = snapshot(h, 1)
    for op, data in ((OP.DEV_MODE_SET, b"\x01" + bytes(7)), (OP.RESOURCE_OBJ_CREATE, create_data(0))):
        expect(h, S.EINVAL, Q.INVALID_MEMBER, op, G.SRIOV, member, data)
    assert snapshot(h, 1) == before


def test_list_commands_ignore_the_member_id(h):
    expect(h, S.OK, Q.OK, OP.LIST_QUERY, G.SRIOV, 12345)


def test_self_group_member_other_than_zero_is_einval_invalid_member(h):
    expect(h, S.EINVAL, Q.INVALID_MEMBER, OP.DEVICE_CAP_GET, G.SELF, 1, CapGetData(CapId.DEV_PARTS).encode())


def test_reserved_bytes_of_the_command_head_are_einval_invalid_command(h):
    raw = bytearray(encode_command(OP.LIST_QUERY, G.SELF, 0))
    raw[4 + 5] = 1  # inside reserved1[12]
    expect(h, S.EINVAL, Q.INVALID_COMMAND, 0, 0, 0, readable=bytes(raw))


def test_ok_status_has_qualifier_ok_and_reserved2_zero(h):
    st, _, used = h.raw(OP.LIST_QUERY, G.SELF, 0)
    assert st.status is S.OK and st.status_qualifier is Q.OK and used >= STATUS_SIZE


def test_short_readable_part_reads_as_zero(h):
    # two bytes: opcode 0 (LIST_QUERY); group_type and the rest missing -> the self group
    st, result, _ = h.raw(0, 0, 0, readable=b"\0\0")
    assert st.status is S.OK and decode_bitmap(result[:8]) == SUPPORTED[G.SELF]
    # DEV_MODE_SET with no data: flags read as 0 -> resume, a no-op on a running member
    st, _, _ = h.raw(0, 0, 0, readable=encode_command(OP.DEV_MODE_SET, G.SRIOV, 1))
    assert st.status is S.OK and h.admin.member(1).mode is MemberMode.RUNNING


def test_longer_readable_part_is_ignored_past_the_structure(h):
    data = CapGetData(CapId.DEV_PARTS).encode() + b"\xff" * 24
    st, result, _ = h.raw(OP.DEVICE_CAP_GET, G.SELF, 0, data)
    assert st.status is S.OK and DevPartsCap.decode(result[:2]) == h.admin.device_cap


def test_short_writable_part_is_truncated_not_failed(h):
    st, result, used = h.raw(OP.LIST_QUERY, G.SRIOV, 0, space=0)
    assert st.status is S.OK and used == STATUS_SIZE and result == b""
    status, _, used = h.drv.raw_command(OP.LIST_QUERY, G.SELF, 0, b"", 0)
    assert used == STATUS_SIZE


def test_writable_result_is_initialized_to_a_multiple_of_64_bits(h):
    _, _, used = h.raw(OP.DEVICE_CAP_GET, G.SELF, 0, CapGetData(CapId.DEV_PARTS).encode())
    assert used == STATUS_SIZE + 8  # a 2-byte capability, zero-padded to 8


# ====================================================================== capabilities
def test_cap_id_list_query_reports_the_dev_parts_capability(h):
    assert h.drv.cap_id_list_query() == {CapId.DEV_PARTS}


def test_device_cap_get_of_an_unreported_id_is_enxio(h):
    expect(h, S.ENXIO, Q.INVALID_FIELD, OP.DEVICE_CAP_GET, G.SELF, 0, CapGetData(1).encode())


def test_cap_commands_for_the_sriov_group_are_refused(h):
    expect(h, S.EINVAL, Q.INVALID_OPCODE, OP.DEVICE_CAP_GET, G.SRIOV, 1, CapGetData(CapId.DEV_PARTS).encode())


def test_driver_cap_set_above_the_device_capability_is_einval(h):
    before = h.admin.driver_cap
    for cap in (DevPartsCap(3, 1), DevPartsCap(1, 3)):
        expect(h, S.EINVAL, Q.INVALID_FIELD, OP.DRIVER_CAP_SET, G.SELF, 0, CapGetData(CapId.DEV_PARTS).encode() + cap.encode())
    assert h.admin.driver_cap == before


def test_driver_cap_set_of_an_unreported_id_is_enxio(h):
    expect(h, S.ENXIO, Q.INVALID_FIELD, OP.DRIVER_CAP_SET, G.SELF, 0, CapGetData(7).encode() + b"\1\1")


def test_driver_cap_set_reserved_not_zero_is_einval(h):
    expect(h, S.EINVAL, Q.INVALID_FIELD, OP.DRIVER_CAP_SET, G.SELF, 0, b"\0\0\1" + bytes(5) + b"\1\1")


def test_driver_cap_set_may_lower_the_limits(h):
    h.drv.driver_cap_set(DevPartsCap(1, 0))
    assert h.admin.driver_cap == DevPartsCap(1, 0)
    h.drv.obj_create(1, DevPartsObjType.GET, 0)
    expect(h, S.EINVAL, Q.INVALID_FIELD, OP.RESOURCE_OBJ_CREATE, G.SRIOV, 1, create_data(1, DevPartsObjType.SET))


def test_driver_cap_set_while_objects_exist_is_ebusy(h):
    h.drv.obj_create(1, DevPartsObjType.GET, 0)
    expect(h, S.EBUSY, Q.INVALID_COMMAND, OP.DRIVER_CAP_SET, G.SELF, 0,
           CapGetData(CapId.DEV_PARTS).encode() + DevPartsCap(1, 1).encode())
    h.drv.driver_cap_set(h.admin.driver_cap)  # the same values: nothing is disabled


def test_driver_resource_limits_are_zero_until_set():
    h = make_host(discover=False)
    try:
        h.drv.use_commands(G.SELF)
        h.drv.use_commands(G.SRIOV)
        expect(h, S.EINVAL, Q.INVALID_FIELD, OP.RESOURCE_OBJ_CREATE, G.SRIOV, 1, create_data(0))
    finally:
        h.close()


def test_device_reset_resets_driver_capabilities_and_destroys_every_object(h):
    h.drv.obj_create(1, DevPartsObjType.GET, 0)
    h.drv.obj_create(2, DevPartsObjType.SET, 1)
    h.drv.close()
    assert h.admin.driver_cap == DevPartsCap(0, 0)
    assert h.admin.member(1).objects == {} and h.admin.member(2).objects == {}
    assert h.admin.used_commands(G.SRIOV) == {0, 1}


# ====================================================================== resource objects
def test_create_query_modify_destroy_and_recreate(h):
    assert h.drv.obj_create(1, DevPartsObjType.GET, 2) == 2
    assert h.drv.obj_query(1, 2) is DevPartsObjType.GET
    h.drv.obj_modify(1, 2, DevPartsObjType.SET)
    assert h.drv.obj_query(1, 2) is DevPartsObjType.SET
    h.drv.obj_destroy(1, 2)
    expect(h, S.ENXIO, Q.INVALID_FIELD, OP.RESOURCE_OBJ_QUERY, G.SRIOV, 1, ResourceObjCreateHead(DP, 0, 2, 0).encode())
    h.drv.obj_create(1, DevPartsObjType.GET, 2)  # a destroyed id may be used again


def test_objects_are_per_member(h):
    h.drv.obj_create(1, DevPartsObjType.GET, 0)
    h.drv.obj_create(2, DevPartsObjType.GET, 0)
    assert h.admin.member(1).objects == {0: DevPartsObjType.GET} == h.admin.member(2).objects


def test_create_with_an_existing_id_is_eexist(h):
    h.drv.obj_create(1, DevPartsObjType.GET, 0)
    before = snapshot(h, 1)
    expect(h, S.EEXIST, Q.INVALID_FIELD, OP.RESOURCE_OBJ_CREATE, G.SRIOV, 1, create_data(0, DevPartsObjType.SET))
    assert snapshot(h, 1) == before


def test_create_with_an_id_over_the_limit_is_einval(h):
    limit = sum(h.admin.driver_cap.encode())
    for bad in (limit, limit + 1, 0xFFFF_FFFF):
        expect(h, S.EINVAL, Q.INVALID_FIELD, OP.RESOURCE_OBJ_CREATE, G.SRIOV, 1, create_data(bad))
    assert h.admin.member(1).objects == {}


def test_create_beyond_the_per_kind_limit_is_enospc(h):
    n = h.admin.driver_cap.get_parts_resource_objects_limit
    for i in range(n):
        h.drv.obj_create(1, DevPartsObjType.GET, i)
    before = snapshot(h, 1)
    expect(h, S.ENOSPC, Q.NORESOURCE, OP.RESOURCE_OBJ_CREATE, G.SRIOV, 1, create_data(n, DevPartsObjType.GET))
    assert snapshot(h, 1) == before
    h.drv.obj_create(1, DevPartsObjType.SET, n)  # the SET limit is its own


def test_modify_into_a_kind_at_its_limit_is_enospc(h):
    n = h.admin.driver_cap.get_parts_resource_objects_limit
    for i in range(n):
        h.drv.obj_create(1, DevPartsObjType.GET, i)
    h.drv.obj_create(1, DevPartsObjType.SET, n)
    expect(h, S.ENOSPC, Q.NORESOURCE, OP.RESOURCE_OBJ_MODIFY, G.SRIOV, 1, create_data(n, DevPartsObjType.GET))
    assert h.drv.obj_query(1, n) is DevPartsObjType.SET


@pytest.mark.parametrize(
    "data",
    [
        create_data(0, obj_type=1),
        create_data(0, obj_type=0x200),
        create_data(0, flags=1),
        create_data(0, kind=2),
        ResourceObjCreateHead(DP, 0, 0, 0).encode() + b"\0\1" + bytes(6),  # dev parts reserved
        b"\0\0\1\0" + bytes(12) + bytes(8),  # object header reserved
    ],
    ids=["generic_type_1", "device_type_0x200", "flags", "parts_type_2", "parts_reserved", "hdr_reserved"],
)
def test_create_with_a_bad_field_is_einval_invalid_field(h, data):
    before = snapshot(h, 1)
    expect(h, S.EINVAL, Q.INVALID_FIELD, OP.RESOURCE_OBJ_CREATE, G.SRIOV, 1, data)
    assert snapshot(h, 1) == before


@pytest.mark.parametrize("op", [OP.RESOURCE_OBJ_QUERY, OP.RESOURCE_OBJ_MODIFY, OP.RESOURCE_OBJ_DESTROY])
def test_object_commands_on_an_unknown_object_are_enxio(h, op):
    data = create_data(1) if op is OP.RESOURCE_OBJ_MODIFY else ResourceObjCreateHead(DP, 0, 1, 0).encode()
    expect(h, S.ENXIO, Q.INVALID_FIELD, op, G.SRIOV, 1, data)


def test_query_with_flags_is_einval(h):
    h.drv.obj_create(1, DevPartsObjType.GET, 0)
    expect(h, S.EINVAL, Q.INVALID_FIELD, OP.RESOURCE_OBJ_QUERY, G.SRIOV, 1, ResourceObjCreateHead(DP, 0, 0, 4).encode())


def test_object_commands_for_the_self_group_are_refused(h):
    expect(h, S.EINVAL, Q.INVALID_OPCODE, OP.RESOURCE_OBJ_CREATE, G.SELF, 0, create_data(0))


# ====================================================================== device parts: GET side
@pytest.fixture
def up(h):
    """VF 1 brought up by its guest driver, with requests completed; a GET object 0."""
    rig = h.guest_driver(1)
    reqs = [rig.fill(i, 300) for i in range(5)]
    rig.kick()
    wait_until(lambda: rig.dq.used_idx() == len(reqs), "requests")
    for req, used in rig.reap():
        check_result(rig.mem, req, used)
    h.drv.obj_create(1, DevPartsObjType.GET, 0)
    return h


def test_get_all_is_in_the_mandatory_order_with_dev_features_optional_and_first(up):
    parts = up.drv.parts_get(1, 0)
    names = [part_name(p) for p in parts]
    assert names == ["DEV_FEATURES", "DRV_FEATURES", "PCI_COMMON_CFG@0x10", "PCI_COMMON_CFG@0x12",
                     "DEVICE_STATUS", "VQ_CFG[0]", "VQ_NOTIFY_CFG[0]"]
    assert parts[0].hdr.flags == PartFlags.OPTIONAL and all(p.hdr.flags == 0 for p in parts[1:])
    vq = VqCfgValue.decode(parts[5].value)
    q = up.pf.vf(1).queues[0]
    assert (vq.queue_size, vq.enabled, vq.queue_desc, vq.queue_driver, vq.queue_device) == (q.size, 1, q.desc_addr, q.avail_addr, q.used_addr)


def test_device_supports_getting_the_parts_multiple_times(up):
    assert up.drv.parts_get(1, 0) == up.drv.parts_get(1, 0)


def test_metadata_size_count_and_list_describe_get_all(up):
    parts = up.drv.parts_get(1, 0)
    assert up.drv.metadata_size(1, 0) >= len(encode_parts(parts))
    assert up.drv.metadata_count(1, 0) == len(parts)
    assert up.drv.metadata_list(1, 0) == [p.hdr for p in parts]


def test_metadata_list_without_room_is_enomem(up):
    data = PartsCmdHead(DP, 0, 0, MetadataType.LIST).encode()
    expect(up, S.ENOMEM, Q.NORESOURCE, OP.DEV_PARTS_METADATA_GET, G.SRIOV, 1, data, space=16)


def test_get_selected_answers_in_the_mandatory_order_and_skips_unknown_parts(up):
    parts = up.drv.parts_get(1, 0)
    want = [parts[5].hdr, parts[1].hdr, DevPartHdr(0x1FF, PartFlags(0), 0, NO_SELECTOR, 0)]
    got = up.drv.parts_get(1, 0, want, space=4096)
    assert got == [parts[1], parts[5]]


def test_get_all_with_a_header_list_is_einval(up):
    hdr = up.drv.metadata_list(1, 0)[0]
    data = PartsCmdHead(DP, 0, 0, PartsGetType.ALL).encode() + encode_hdrs([hdr])
    expect(up, S.EINVAL, Q.INVALID_FIELD, OP.DEV_PARTS_GET, G.SRIOV, 1, data, space=4096)


def test_get_without_room_is_enomem(up):
    data = PartsCmdHead(DP, 0, 0, PartsGetType.ALL).encode()
    expect(up, S.ENOMEM, Q.NORESOURCE, OP.DEV_PARTS_GET, G.SRIOV, 1, data, space=32)


@pytest.mark.parametrize("op", [OP.DEV_PARTS_METADATA_GET, OP.DEV_PARTS_GET])
def test_get_side_commands_refuse_a_set_object_an_unknown_object_and_a_bad_type(up, op):
    up.drv.obj_create(1, DevPartsObjType.SET, 1)
    expect(up, S.EINVAL, Q.INVALID_FIELD, op, G.SRIOV, 1, PartsCmdHead(DP, 0, 1, 0).encode(), space=4096)
    expect(up, S.ENXIO, Q.INVALID_FIELD, op, G.SRIOV, 1, PartsCmdHead(DP, 0, 3, 0).encode(), space=4096)
    expect(up, S.EINVAL, Q.INVALID_FIELD, op, G.SRIOV, 1, PartsCmdHead(DP, 0, 0, 9).encode(), space=4096)
    expect(up, S.EINVAL, Q.INVALID_FIELD, op, G.SRIOV, 1, PartsCmdHead(1, 0, 0, 0).encode(), space=4096)
    expect(up, S.EINVAL, Q.INVALID_FIELD, op, G.SRIOV, 1, PartsCmdHead(DP, 0, 0, 0).encode()[:12] + b"\0\1\0\0", space=4096)


# ====================================================================== device parts: SET side and modes
def stop(h: Host, vf: int = 1) -> None:
    h.drv.mode_set(vf, stopped=True)


def test_parts_set_while_running_is_refused_and_the_member_is_unchanged(up):
    parts = up.drv.parts_get(1, 0)
    up.drv.obj_create(1, DevPartsObjType.SET, 1)
    before = snapshot(up, 1)
    data = ResourceObjCmdHdr(DP, 0, 1).encode() + encode_parts(parts)
    expect(up, S.EINVAL, Q.INVALID_COMMAND, OP.DEV_PARTS_SET, G.SRIOV, 1, data)
    assert snapshot(up, 1) == before


def test_parts_set_with_a_get_object_is_einval(up):
    stop(up)
    data = ResourceObjCmdHdr(DP, 0, 0).encode() + encode_parts(up.drv.parts_get(1, 0))
    expect(up, S.EINVAL, Q.INVALID_FIELD, OP.DEV_PARTS_SET, G.SRIOV, 1, data)


def test_parts_set_with_an_unknown_object_is_enxio(up):
    stop(up)
    expect(up, S.ENXIO, Q.INVALID_FIELD, OP.DEV_PARTS_SET, G.SRIOV, 1, ResourceObjCmdHdr(DP, 0, 3).encode())


def _common(parts: list[DevPart], *names: str) -> list[DevPart]:
    return [p for p in parts if part_name(p) in names]


def _replace(parts: list[DevPart], name: str, value: bytes) -> list[DevPart]:
    return [DevPart(DevPartHdr(p.hdr.part_type, p.hdr.flags, 0, p.hdr.selector, len(value)), value)
            if part_name(p) == name else p for p in parts]


def _hostile(parts: list[DevPart]) -> dict[str, bytes]:
    vq = VqCfgValue.decode(_common(parts, "VQ_CFG[0]")[0].value)
    by = {part_name(p): p for p in parts}
    out: dict[str, list[DevPart] | bytes] = {
        "wrong_order": [by["DRV_FEATURES"], by["DEV_FEATURES"]] + parts[2:],
        "status_before_common_cfg": parts[:2] + [by["DEVICE_STATUS"]] + parts[2:4] + parts[5:],
        "bad_length_drv_features": _replace(parts, "DRV_FEATURES", bytes(8)),
        "bad_length_device_status": _replace(parts, "DEVICE_STATUS", b"\x0f\x00"),
        "bad_length_vq_cfg": _replace(parts, "VQ_CFG[0]", by["VQ_CFG[0]"].value + bytes(8)),
        "unknown_mandatory_common_part": parts + [DevPart.make(0x106, b"")],
        "unknown_mandatory_device_part": parts + [DevPart.make(0x2FF, b"\0")],
        "unknown_reserved_range_part": parts + [DevPart.make(0x600, b"", optional=True)],
        "duplicate_device_status": parts[:5] + [by["DEVICE_STATUS"]] + parts[5:],
        "duplicate_vq_cfg": parts[:6] + [by["VQ_CFG[0]"]] + parts[6:],
        "duplicate_common_cfg_offset": parts[:3] + [by["PCI_COMMON_CFG@0x10"]] + parts[3:],
        "vq_index_over_the_limit": parts[:5] + [DevPart.make(PartType.VQ_CFG, by["VQ_CFG[0]"].value, selector=VqIndexSelector(1).encode())] + parts[6:],
        "vq_cfg_without_device_status": [p for p in parts if part_name(p) != "DEVICE_STATUS"],
        "dev_features_mismatch": _replace(parts, "DEV_FEATURES", encode_features(bit(Feature.VERSION_1))),
        "num_queues_mismatch": _replace(parts, "PCI_COMMON_CFG@0x12", u16(2)),
        "unknown_common_cfg_offset": parts[:4] + [DevPart.make(PartType.PCI_COMMON_CFG, u16(0), selector=CommonCfgSelector(0x16).encode())] + parts[4:],
        "vq_notify_mismatch": _replace(parts, "VQ_NOTIFY_CFG[0]", VqNotifyValue(1, 0).encode()),
        "unreachable_status": _replace(parts, "DEVICE_STATUS", b"\x05"),
        "features_ok_without_version_1": _replace(parts, "DRV_FEATURES", encode_features(bit(Feature.EVENT_IDX))),
        "driver_features_not_offered": _replace(parts, "DRV_FEATURES", encode_features(bit(Feature.VERSION_1) | bit(Feature.RING_PACKED))),
        "queue_outside_memory": _replace(parts, "VQ_CFG[0]", VqCfgValue(vq.queue_size, 0, 1, 0, MEM_SIZE, vq.queue_driver, vq.queue_device).encode()),
        "queue_size_not_a_power_of_two": _replace(parts, "VQ_CFG[0]", VqCfgValue(48, 0, 1, 0, vq.queue_desc, vq.queue_driver, vq.queue_device).encode()),
        "queue_enabled_not_0_or_1": _replace(parts, "VQ_CFG[0]", VqCfgValue(vq.queue_size, 0, 2, 0, vq.queue_desc, vq.queue_driver, vq.queue_device).encode()),
        "selector_on_device_status": parts[:4] + [DevPart(DevPartHdr(PartType.DEVICE_STATUS, PartFlags(0), 0, b"\1" + bytes(7), 1), b"\x0f")] + parts[5:],
    }
    raw = encode_parts(parts)
    cut = bytearray(raw)
    out_bytes = {k: encode_parts(v) for k, v in out.items()}  # type: ignore[arg-type]
    out_bytes["truncated_header"] = raw + bytes(PART_HDR_TAIL)
    bad_len = bytearray(raw)
    bad_len[12:16] = (len(raw)).to_bytes(4, "little")  # DEV_FEATURES length runs past the buffer
    out_bytes["length_past_the_buffer"] = bytes(bad_len)
    cut[3] = 1  # the first header's reserved byte
    out_bytes["header_reserved_not_zero"] = bytes(cut)
    flags = bytearray(raw)
    flags[2] = 0x03  # an unknown flag bit
    out_bytes["unknown_flag_bit"] = bytes(flags)
    return out_bytes


PART_HDR_TAIL = 10
HOSTILE = [
    "wrong_order", "status_before_common_cfg", "bad_length_drv_features", "bad_length_device_status",
    "bad_length_vq_cfg", "unknown_mandatory_common_part", "unknown_mandatory_device_part",
    "unknown_reserved_range_part", "duplicate_device_status", "duplicate_vq_cfg",
    "duplicate_common_cfg_offset", "vq_index_over_the_limit", "vq_cfg_without_device_status",
    "dev_features_mismatch", "num_queues_mismatch", "unknown_common_cfg_offset", "vq_notify_mismatch",
    "unreachable_status", "features_ok_without_version_1", "driver_features_not_offered",
    "queue_outside_memory", "queue_size_not_a_power_of_two", "queue_enabled_not_0_or_1",
    "selector_on_device_status", "truncated_header", "length_past_the_buffer", "header_reserved_not_zero",
    "unknown_flag_bit",
]  # fmt: skip


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_parts_are_refused_and_the_member_is_unchanged(up, name):
    parts = up.drv.parts_get(1, 0)
    stop(up)
    up.drv.obj_create(1, DevPartsObjType.SET, 1)
    body = _hostile(parts)[name]
    before = snapshot(up, 1)
    expect(up, S.EINVAL, Q.INVALID_FIELD, OP.DEV_PARTS_SET, G.SRIOV, 1, ResourceObjCmdHdr(DP, 0, 1).encode() + body)
    assert snapshot(up, 1) == before
    assert up.drv.parts_get(1, 0) == parts
    up.drv.parts_set(1, 1, parts)  # positive control: the same parts, unharmed, are taken


def test_unknown_optional_part_is_ignored(up):
    parts = up.drv.parts_get(1, 0)
    stop(up)
    up.drv.obj_create(1, DevPartsObjType.SET, 1)
    up.drv.parts_set(1, 1, parts + [DevPart.make(0x2FE, b"whatever", optional=True)])


def test_dev_features_may_be_left_out_of_a_set(up):
    parts = up.drv.parts_get(1, 0)
    stop(up)
    up.drv.obj_create(1, DevPartsObjType.SET, 1)
    up.drv.parts_set(1, 1, parts[1:])


def test_parts_set_may_set_the_same_parts_multiple_times_and_applies_them(up):
    parts = up.drv.parts_get(1, 0)
    stop(up)
    up.drv.obj_create(1, DevPartsObjType.SET, 1)
    up.drv.parts_set(1, 1, _replace(parts, "PCI_COMMON_CFG@0x10", u16(7)))
    assert up.pf.vf(1).config_msix_vector == 7
    up.drv.parts_set(1, 1, parts)
    assert up.pf.vf(1).config_msix_vector == parts[2].value[0] | parts[2].value[1] << 8


# ---------------------------------------------------------------------- DEV_MODE_SET
@pytest.mark.parametrize("start", list(MemberMode), ids=lambda m: m.name)
@pytest.mark.parametrize("stopped", [True, False], ids=["STOPPED", "resume"])
def test_dev_mode_set_table_over_every_pair(h, start, stopped):
    h.guest_driver(1)
    if start is MemberMode.STOPPED:
        stop(h)
    action, new = MODE_TRANSITIONS[(start, stopped)]
    h.drv.mode_set(1, stopped=stopped)
    assert h.admin.member(1).mode is new
    assert h.pf.vf(1).port.bus_master is (new is MemberMode.RUNNING)
    assert action is {(True, True): ModeAction.NOOP, (False, False): ModeAction.NOOP,
                      (False, True): ModeAction.STOP, (True, False): ModeAction.START}[(start is MemberMode.STOPPED, stopped)]


def test_mode_table_lists_every_pair():
    assert set(MODE_TRANSITIONS) == {(m, s) for m in MemberMode for s in (True, False)}


def test_dev_mode_set_with_an_unknown_flag_is_einval(h):
    before = snapshot(h, 1)
    expect(h, S.EINVAL, Q.INVALID_FIELD, OP.DEV_MODE_SET, G.SRIOV, 1, b"\x03" + bytes(7))
    assert snapshot(h, 1) == before


def test_stopping_finishes_every_outstanding_transaction_before_completing(h):
    rig = h.guest_driver(1)
    dev = h.devs[1]
    dev.gated = True
    dev.all_open.clear()
    reqs = [rig.fill(100 + i, 500) for i in range(6)]
    rig.kick()
    wait_until(lambda: dev.in_flight == 6, "requests taken")
    done = threading.Event()
    errs: list[BaseException] = []

    def do_stop():
        try:
            stop(h)
        except BaseException as exc:  # noqa: BLE001
            errs.append(exc)
        finally:
            done.set()

    t = threading.Thread(target=do_stop)
    t.start()
    wait_until(lambda: dev.stopping, "the stop to begin")
    assert not done.wait(0.2)  # the command waits for the requests ...
    assert h.pf.vf(1).port.bus_master  # ... which still complete: the device masters on
    dev.open_all()
    t.join(TIMEOUT)
    assert not errs and h.admin.member(1).mode is MemberMode.STOPPED
    assert dev.in_flight == 0 and rig.dq.used_idx() == 6  # every observed buffer written back
    for req, used in rig.reap():
        check_result(rig.mem, req, used)


def test_while_stopped_no_dma_no_interrupt_and_notifications_are_accepted(h):
    rig = h.guest_driver(1)
    stop(h)
    written, irqs = rig.device_bytes_written(), len(rig.interrupts)
    reqs = [rig.fill(200 + i, 300) for i in range(3)]
    rig.kick()  # a doorbell while stopped: accepted, remembered
    assert h.devs[1].kicks_while_quiesced >= 1
    assert rig.device_bytes_written() == written and len(rig.interrupts) == irqs and rig.dq.used_idx() == 0
    assert h.pf.vf(1).common_read(COMMON_CFG_BY_NAME["queue_size"].offset, 2) == 64  # PCI reads answered
    h.drv.mode_set(1, stopped=False)
    wait_until(lambda: rig.dq.used_idx() == 3, "the requests kicked while stopped")
    for req, used in rig.reap():
        check_result(rig.mem, req, used)
    assert len(reqs) == 3


@pytest.mark.slow  # 0.3 s or more: out of the one-minute fast subset (CI runs it)
def test_stop_that_cannot_finish_is_eagain_and_the_member_runs_on():
    h = make_host(freeze_timeout=0.3)
    try:
        rig = h.guest_driver(1)
        dev = h.devs[1]
        dev.gated = True
        dev.all_open.clear()
        rig.fill(300, 100)
        rig.kick()
        wait_until(lambda: dev.in_flight == 1, "request taken")
        expect(h, S.EAGAIN, Q.TRYAGAIN, OP.DEV_MODE_SET, G.SRIOV, 1, b"\x01" + bytes(7))
        assert h.admin.member(1).mode is MemberMode.RUNNING and h.pf.vf(1).port.bus_master
        dev.open_all()
        wait_until(lambda: rig.dq.used_idx() == 1, "the request to complete")
        rig.fill(301, 100)
        rig.kick()
        wait_until(lambda: rig.dq.used_idx() == 2, "a new request after the failed stop")
    finally:
        h.close()


def test_flr_resets_the_parts_destroys_the_objects_and_the_member_runs(up):
    stop(up)
    up.drv.obj_create(1, DevPartsObjType.SET, 1)
    up.pf.flr_vf(1)
    view = up.admin.member(1)
    assert view.objects == {} and view.mode is MemberMode.RUNNING and up.pf.vf(1).port.bus_master
    up.drv.obj_create(1, DevPartsObjType.GET, 0)
    parts = {part_name(p): p for p in up.drv.parts_get(1, 0)}
    assert parts["DEVICE_STATUS"].value == b"\0" and parts["DRV_FEATURES"].value == bytes(16)
    assert VqCfgValue.decode(parts["VQ_CFG[0]"].value).enabled == 0
