"""The two back-ends of the host's VFIO-style state machine, on real PFs (drivers/vfio_backends.py).

virtio 1.4: the admin commands each arc issues, in Linux virtio-vfio-pci's order; a parts image
round trip between two PFs; hostile images refused with the VF left where it was.  Seed: the
arcs map to the proposal's states and the switch-over's batches."""

from __future__ import annotations

import pytest

from virtio_lm.devices.dmatest import DmaTestDevice
from virtio_lm.drivers.admin_driver import AdminDriver
from virtio_lm.drivers.pf_driver import PfDriver
from virtio_lm.drivers.vfio import MigState, VfMigration
from virtio_lm.drivers.vfio_backends import AdminBackend, SeedBackend, backend_for
from virtio_lm.errors import MigrationArcError
from virtio_lm.memory import Memory
from virtio_lm.pf.device import build_pf
from virtio_lm.virtqueue.driver import Allocator
from virtio_lm.wire.admin import AdminOpcode as Op
from virtio_lm.wire.ctrl import VfState
from virtio_lm.wire.state import build_image

S = MigState
HOST = 4 << 20


def _side(name: str, profile: str):
    host = Memory(HOST, name=f"{name}-host")
    pf = build_pf(host.device_port(f"{name}.pf"), total_vfs=2, name=f"{name}.pf", profile=profile)
    cls = AdminDriver if profile == "virtio-1.4" else PfDriver
    drv = cls(pf, host.cpu, Allocator(0x10000, HOST - 0x10000), timeout=10)
    drv.bring_up()
    guest = Memory(1 << 20, name=f"{name}-guest")
    drv.enable_vfs(2, lambda n: (DmaTestDevice(), guest.device_port(f"{name}.vf{n}")))
    return pf, drv, VfMigration(backend_for(drv))


@pytest.fixture
def admin_pair():
    a, b = _side("a", "virtio-1.4"), _side("b", "virtio-1.4")
    yield a, b
    for pf, drv, _ in (a, b):
        drv.close()
        pf.disable_vfs()


def _record(drv: AdminDriver) -> list[int]:
    seen: list[int] = []
    raw = drv.raw_command

    def rec(opcode, *args, **kw):
        seen.append(int(opcode))
        return raw(opcode, *args, **kw)

    drv.raw_command = rec  # type: ignore[method-assign]
    return seen


def test_admin_arcs_issue_linuxs_commands_in_its_order(admin_pair):
    (_, sdrv, src), (_, ddrv, dst) = admin_pair
    assert isinstance(src.backend, AdminBackend)
    seen = _record(sdrv)

    def step(m, new, images=None):
        seen.clear()
        out = m.set_states([1, 2], new, images)
        return out, [Op(o).name for o in seen]

    _, cmds = step(src, S.PRE_COPY)  # the pre-copy read: a GET object, its size, every part
    assert cmds == ["RESOURCE_OBJ_CREATE", "DEV_PARTS_METADATA_GET", "DEV_PARTS_GET"] * 2
    _, cmds = step(src, S.PRE_COPY_P2P)
    assert cmds == ["DEV_MODE_SET"] * 2
    images, cmds = step(src, S.STOP_COPY)  # re-read on the same object, the members stopped
    assert cmds == ["DEV_PARTS_METADATA_GET", "DEV_PARTS_GET"] * 2
    assert images is not None and len(images) == 2
    assert src.backend.parts_bytes["pre-copy"] == src.backend.parts_bytes["stop-copy"] > 0
    _, cmds = step(src, S.STOP)
    assert cmds == ["RESOURCE_OBJ_DESTROY"] * 2

    seen = _record(ddrv)
    _, cmds = step(dst, S.RESUMING)
    assert cmds == ["DEV_MODE_SET"] * 2 + ["RESOURCE_OBJ_CREATE"] * 2
    _, cmds = step(dst, S.RUNNING_P2P, images)
    assert cmds == ["DEV_PARTS_SET", "RESOURCE_OBJ_DESTROY"] * 2
    _, cmds = step(dst, S.RUNNING)
    assert cmds == ["DEV_MODE_SET"] * 2
    assert dst.fresh(1) is not None  # running a migrated state, not freshly reset


def test_a_seed_state_image_is_refused_by_the_1_4_back_end_and_the_vf_stays_resuming(admin_pair):
    _, (dpf, _, dst) = admin_pair
    dst.set_states([1], S.RESUMING)
    with pytest.raises(MigrationArcError, match="not a device parts image"):
        dst.set_states([1], S.RUNNING_P2P, images=[build_image(0x1F, [])])
    assert dst.state(1) is S.RESUMING
    dst.reset(1)
    assert dst.state(1) is S.RUNNING and dst.fresh(1) is None


def test_parts_of_another_device_type_are_refused(admin_pair):
    from virtio_lm.wire.parts import encode_parts_image

    _, (_, _, dst) = admin_pair
    dst.set_states([1], S.RESUMING)
    with pytest.raises(MigrationArcError, match="device type"):
        dst.set_states([1], S.RUNNING_P2P, images=[encode_parts_image(1, [])])
    assert dst.state(1) is S.RESUMING


def test_hostile_parts_are_refused_by_the_member_and_the_vf_stays_resuming(admin_pair):
    from virtio_lm.wire.parts import DevPart, PartType, encode_parts_image

    _, (dpf, _, dst) = admin_pair
    dst.set_states([1], S.RESUMING)
    wrong_order = [DevPart.make(PartType.DEVICE_STATUS, b"\x0f"), DevPart.make(PartType.DRV_FEATURES, bytes(16))]
    with pytest.raises(MigrationArcError, match="status 22"):  # EINVAL / INVALID_FIELD from the member
        dst.set_states([1], S.RUNNING_P2P, images=[encode_parts_image(dpf.vf(1).device.device_id, wrong_order)])
    assert dst.state(1) is S.RESUMING


def test_seed_arcs_map_to_the_proposals_states():
    pf, drv, m = _side("s", "seed")
    try:
        assert isinstance(m.backend, SeedBackend)
        m.set_states([1, 2], S.PRE_COPY)
        assert drv.get_state(1) is VfState.INIT  # no command: the proposal has no pre-copy data
        m.set_states([1, 2], S.PRE_COPY_P2P)
        assert drv.get_state(1) is VfState.QUIESCED
        before = drv.stats.commands
        images = m.set_states([1, 2], S.STOP_COPY)
        assert drv.stats.commands - before == 6  # FREEZED + attrs + SAVE_STATE per VF, one batch
        assert drv.get_state(2) is VfState.FREEZED and images is not None
        m.recover([1, 2])
        assert drv.get_state(1) is VfState.RUNNING and m.state(1) is S.RUNNING
        for vf in (1, 2):
            m.reset(vf)
        m.set_states([1, 2], S.RESUMING)
        assert drv.get_state(1) is VfState.FREEZED
        m.set_states([1, 2], S.RUNNING_P2P, images=images)  # RESTORE + QUIESCED
        assert drv.get_state(1) is VfState.QUIESCED
    finally:
        drv.close()
        pf.disable_vfs()
