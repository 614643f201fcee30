"""PfDriver through the REAL control queue: a threaded PF on host memory, VFs on guest memories.

Every command's success path and error paths, feature negotiation, the VF
state machine over every (state, requested state) pair, dirty tracking
exactness in all four modes (sequential, concurrent, fail-safe), state images
in portions, and a control queue that never completes.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from helpers import MEM_SIZE, RING_AREA, GatedDmaTestDevice, Rig, check_result
from virtio_lm.drivers.pf_driver import DEFAULT_FEATURES, MIGRATION_FEATURES, PfDriver
from virtio_lm.errors import (
    CommandTimeoutError,
    DeviceNeedsResetError,
    ControlCommandError,
    FeatureMissingError,
    FeaturesNotAcceptedError,
    TrackingError,
    UsedRingError,
    WireError,
)
from virtio_lm.memory import PAGE_SIZE, Memory
from virtio_lm.pci import PciDriverTransport
from virtio_lm.pci.sriov import SriovPF
from virtio_lm.pf.controller import VfMigrationController
from virtio_lm.pf.device import CTRL_QUEUE, PF_FEATURES, PfDevice, build_pf
from virtio_lm.pf.tracking import report_to_pages
from virtio_lm.virtqueue.driver import Allocator
from virtio_lm.wire.blk import BlkFeature
from virtio_lm.wire.ctrl import (
    CLASS_VF_MIGRATION,
    Ack,
    FuncId,
    FuncOffset,
    MigrationCommand,
    SetState,
    StartDirtyTrack,
    TrackMode,
    TrackModeCaps,
    VfState,
    encode_map_table,
)
from virtio_lm.wire.features import DeviceStatus, Feature, ProposalFeature, bit
from virtio_lm.wire.ring import DescFlags, VirtqDesc

HOST_SIZE = 16 << 20
NUM_VFS = 2
TIMEOUT = 20.0  # a guard against hangs only, never an assertion about speed
MODES = list(TrackMode)
S = VfState


# ====================================================================== rig
@dataclass
class Host:
    host: Memory
    pf: SriovPF
    drv: PfDriver
    guests: dict[int, Memory] = field(default_factory=dict)
    devs: dict[int, GatedDmaTestDevice] = field(default_factory=dict)

    @property
    def ctl(self) -> VfMigrationController:
        return self.pf.device.controller  # type: ignore[attr-defined]

    def enable(self, n: int = NUM_VFS, guest_size: int = MEM_SIZE) -> None:
        def factory(k: int):
            mem = Memory(guest_size, name=f"vm{k}")
            dev = GatedDmaTestDevice(gated=False)
            self.guests[k], self.devs[k] = mem, dev
            return dev, mem.device_port(f"vf{k}")

        self.drv.enable_vfs(n, factory)

    def guest_driver(self, k: int) -> Rig:
        """VF ``k`` brought up by its own (guest) driver, through registers."""
        fn = self.pf.vf(k)
        rig = Rig(self.guests[k], fn, self.devs[k])
        fn.on_interrupt = rig.interrupts.append
        rig.tr = PciDriverTransport(fn, self.guests[k].cpu, Allocator(*RING_AREA))
        (rig.dq,) = rig.tr.bring_up(bit(Feature.VERSION_1) | bit(Feature.EVENT_IDX), 1, size=64)
        return rig

    def close(self) -> None:
        try:
            self.drv.close()
        finally:
            self.pf.flr()
            for dev in self.devs.values():
                dev.open_all()
                dev.close()
            for mem in self.guests.values():
                mem.close()
            self.host.close()


def make_host(
    *,
    device: PfDevice | None = None,
    wanted: int = DEFAULT_FEATURES,
    require_migration: bool = True,
    vfs: int = NUM_VFS,
    guest_size: int = MEM_SIZE,
    up: bool = True,
    **pf_kw,
) -> Host:
    host = Memory(HOST_SIZE, name="host")
    if device is None:
        pf = build_pf(host.device_port("pf0"), total_vfs=4, **pf_kw)
    else:
        pf = SriovPF(device, host.device_port("pf0"), name="pf0", total_vfs=4)
        device.attach(VfMigrationController(pf, **pf_kw))
    drv = PfDriver(pf, host.cpu, Allocator(0x10000, HOST_SIZE - 0x10000), timeout=TIMEOUT)
    h = Host(host, pf, drv)
    if up:
        drv.bring_up(wanted, require_migration=require_migration)
        if vfs:
            h.enable(vfs, guest_size)
    return h


@pytest.fixture
def h():
    rig = make_host()
    yield rig
    rig.close()


def view(h: Host) -> list[tuple]:
    """Everything an ERR must leave unchanged, per VF."""
    out = []
    for n in range(1, h.pf.num_vfs + 1):
        ctx = h.ctl.context(n)
        port = h.pf.vf(n).port
        out.append(
            (
                ctx.sm.state,
                ctx.mode,
                ctx.tracker,
                ctx.report,
                ctx.image,
                None if ctx.restoring is None else (bytes(ctx.restoring.buf), list(ctx.restoring.ranges)),
                port.writer.tracker,
                port.bus_master,
            )
        )
    return out


def expect_err(h: Host, call, *, command: str, func_id: int | None, state: VfState | None) -> ControlCommandError:
    before = view(h)
    with pytest.raises(ControlCommandError) as ei:
        call()
    err = ei.value
    assert (err.command, err.func_id, err.state) == (command, func_id, state), str(err)
    assert view(h) == before
    return err


def drive(h: Host, vf: int, state: VfState) -> None:
    """Put VF ``vf`` into ``state`` through the queue (INIT by FLR)."""
    h.drv.flr_vf(vf)
    if state is S.RUNNING:
        h.drv.set_state(vf, S.RUNNING)
    elif state is S.QUIESCED:
        h.drv.set_state(vf, S.QUIESCED)
    elif state is S.FREEZED:
        h.drv.set_state(vf, S.QUIESCED)
        h.drv.set_state(vf, S.FREEZED)
    assert h.drv.get_state(vf) is state


# ====================================================================== bring-up and features
def test_bring_up_by_registers_puts_the_control_queue_in_host_memory(h):
    pf, drv = h.pf, h.drv
    assert drv.features & MIGRATION_FEATURES == MIGRATION_FEATURES
    assert pf.negotiated == drv.features
    assert pf.status & DeviceStatus.DRIVER_OK
    assert drv.ctrl_index == CTRL_QUEUE == 1
    q = pf.queues[CTRL_QUEUE]
    assert q.enabled and not pf.queues[0].enabled
    lo, hi = drv.alloc.base, drv.alloc.base + drv.alloc.size
    for addr in (q.desc_addr, q.avail_addr, q.used_addr):
        assert lo <= addr < hi
    assert q.event_idx  # EVENT_IDX negotiated by default


def test_identify_returns_the_devices_capabilities():
    h = make_host(modes=TrackModeCaps.PUSH_BYTEMAP | TrackModeCaps.PULL_BITMAP, log_max_pull_bitmap=9,
                  log_max_pull_bytemap=11, vfs=0)
    try:
        caps = h.drv.identify()
        assert (caps.mjr_ver, caps.mnr_ver, caps.ter_ver) == (1, 0, 0)
        assert caps.dirty_page_track_modes == TrackModeCaps.PUSH_BYTEMAP | TrackModeCaps.PULL_BITMAP
        assert caps.log_max_pages_track_pull_bitmap_mode == 9
        assert caps.log_max_pages_track_pull_bytemap_mode == 11
        assert h.drv.caps == caps
    finally:
        h.close()


class NoMigrationPfDevice(PfDevice):
    def offered_features(self) -> int:
        return PF_FEATURES & ~bit(ProposalFeature.VF_MIGRATION)


def test_driver_refuses_a_device_without_vf_migration():
    h = make_host(device=NoMigrationPfDevice(), up=False)
    try:
        with pytest.raises(FeatureMissingError, match="VF_MIGRATION"):
            h.drv.bring_up()
        assert h.pf.status & DeviceStatus.FAILED
        assert not h.pf.status & DeviceStatus.FEATURES_OK
        assert h.drv.ctrlq is None
        with pytest.raises(Exception, match="not up"):
            h.drv.identify()
    finally:
        h.close()


@pytest.mark.parametrize(
    "dropped, reason",
    [
        (bit(Feature.SR_IOV), "SR_IOV"),
        (bit(ProposalFeature.GENERIC_CTRL_VQ_VER_1), "GENERIC_CTRL_VQ_VER_1"),
        (bit(BlkFeature.CTRL_VQ), "control queue"),
    ],
    ids=["no-sr-iov", "no-generic-ctrl-vq", "no-blk-ctrl-vq"],
)
def test_features_ok_refused_for_vf_migration_without(dropped, reason):
    h = make_host(up=False)
    try:
        with pytest.raises(FeaturesNotAcceptedError):
            h.drv.bring_up(DEFAULT_FEATURES & ~dropped, require_migration=False)
        assert not h.pf.status & DeviceStatus.FEATURES_OK
        assert reason in h.pf.features_refusal
    finally:
        h.close()


def test_features_ok_refused_for_blk_ctrl_vq_without_mq():
    h = make_host(up=False)
    try:
        wanted = bit(Feature.VERSION_1) | bit(BlkFeature.CTRL_VQ)
        with pytest.raises(FeaturesNotAcceptedError):
            h.drv.bring_up(wanted, require_migration=False)
        assert not h.pf.status & DeviceStatus.FEATURES_OK
        assert "MQ" in h.pf.features_refusal
    finally:
        h.close()


# ====================================================================== commands: success paths
def test_every_command_succeeds_through_the_queue(h):
    drv = h.drv
    assert drv.identify().dirty_page_track_modes == TrackModeCaps(15)
    drv.start_tracking(1, TrackMode.PULL_BYTEMAP)
    h.pf.vf(1).port.write(5 * PAGE_SIZE, b"x")
    size = drv.get_dirty_report_size(1)
    assert size == 6
    assert drv.report_dirty_pages(1, 0, 4) == b"\0\0\0\0"
    assert drv.report_dirty_pages(1, 4, 100) == b"\0\x01"
    assert drv.report_dirty_pages(1, 6, 100) == b""  # at the end: 0 bytes, OK
    drv.stop_tracking(1)
    assert drv.get_state_attrs(1) == (0, S.INIT)
    drv.set_state(1, S.QUIESCED)
    drv.set_state(1, S.FREEZED)
    length, state = drv.get_state_attrs(1)
    assert state is S.FREEZED and length == len(h.ctl.context(1).image) > 0
    image = drv.save_state(1, 0, length)
    assert image == h.ctl.context(1).image
    drv.restore_state(1, 0, image)
    drv.set_state(1, S.QUIESCED)
    drv.set_state(1, S.RUNNING)
    assert drv.get_state(1) is S.RUNNING
    assert drv.stats.errors == 0 and drv.stats.timeouts == 0


def test_non_threaded_pf_completes_commands_in_the_kick():
    h = make_host(threaded=False)
    try:
        assert h.drv.get_state_attrs(2) == (0, S.INIT)
        assert h.pf.device.ctrl_processed == h.drv.stats.commands
        assert h.drv.stats.polls == 0
    finally:
        h.close()


def test_commands_from_many_threads(h):
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(40):
                if i % 2:
                    assert h.drv.get_state_attrs(1 + k % 2) == (0, S.INIT)
                else:
                    assert h.drv.identify().mjr_ver == 1
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not errors
    assert h.drv.stats.commands == 160
    assert h.drv.ctrlq.in_flight() == 0


# ====================================================================== commands: error paths
#: one typed call per command that names a VF
CALLS = {
    MigrationCommand.START_DIRTY_PAGE_TRACK: lambda d, f: d.start_dirty_page_track(f, TrackMode.PULL_BITMAP),
    MigrationCommand.STOP_DIRTY_PAGE_TRACK: lambda d, f: d.stop_dirty_page_track(f),
    MigrationCommand.GET_DIRTY_REPORT_SIZE: lambda d, f: d.get_dirty_report_size(f),
    MigrationCommand.REPORT_DIRTY_PAGES: lambda d, f: d.report_dirty_pages(f, 0, 64),
    MigrationCommand.SET_STATE: lambda d, f: d.set_state(f, S.QUIESCED),
    MigrationCommand.GET_STATE_ATTRS: lambda d, f: d.get_state_attrs(f),
    MigrationCommand.SAVE_STATE: lambda d, f: d.save_state(f, 0, 64),
    MigrationCommand.RESTORE_STATE: lambda d, f: d.restore_state(f, 0, b"abc"),
}

#: valid (data, result space) of every command for VF 1
VALID = {
    MigrationCommand.IDENTIFY: (b"", 16),
    MigrationCommand.START_DIRTY_PAGE_TRACK: (StartDirtyTrack(1, TrackMode.PULL_BITMAP).encode(), 0),
    MigrationCommand.STOP_DIRTY_PAGE_TRACK: (FuncId(1).encode(), 0),
    MigrationCommand.GET_DIRTY_REPORT_SIZE: (FuncId(1).encode(), 4),
    MigrationCommand.REPORT_DIRTY_PAGES: (FuncOffset(1, offset=0).encode(), 64),
    MigrationCommand.SET_STATE: (SetState(1, S.QUIESCED).encode(), 0),
    MigrationCommand.GET_STATE_ATTRS: (FuncId(1).encode(), 6),
    MigrationCommand.SAVE_STATE: (FuncOffset(1, offset=0).encode(), 64),
    MigrationCommand.RESTORE_STATE: (FuncOffset(1, offset=0).encode() + b"abc", 0),
}


@pytest.mark.parametrize("func_id", [0, NUM_VFS + 1, 0xFFFF], ids=["zero", "numvfs+1", "max"])
@pytest.mark.parametrize("cmd", list(CALLS), ids=lambda c: c.name)
def test_wrong_func_id_is_err(h, cmd, func_id):
    expect_err(h, lambda: CALLS[cmd](h.drv, func_id), command=cmd.name, func_id=func_id, state=None)


@pytest.mark.parametrize("cmd", [c for c in MigrationCommand if c is not MigrationCommand.IDENTIFY], ids=lambda c: c.name)
def test_short_data_is_err(h, cmd):
    data, space = VALID[cmd]
    fixed = len(data) - (3 if cmd is MigrationCommand.RESTORE_STATE else 0)
    short = data[: fixed - 1]
    expect_err(
        h,
        lambda: h.drv.raw_command(CLASS_VF_MIGRATION, cmd, short, space, func_id=1, check=True),
        command=cmd.name, func_id=1, state=S.INIT,
    )


@pytest.mark.parametrize(
    "cmd",
    [MigrationCommand.IDENTIFY, MigrationCommand.STOP_DIRTY_PAGE_TRACK, MigrationCommand.GET_STATE_ATTRS,
     MigrationCommand.SET_STATE, MigrationCommand.SAVE_STATE],
    ids=lambda c: c.name,
)
def test_trailing_data_is_err(h, cmd):
    data, space = VALID[cmd]
    fid = None if cmd is MigrationCommand.IDENTIFY else 1
    expect_err(
        h,
        lambda: h.drv.raw_command(CLASS_VF_MIGRATION, cmd, data + b"\0", space, func_id=fid, check=True),
        command=cmd.name, func_id=fid, state=None if fid is None else S.INIT,
    )


@pytest.mark.parametrize(
    "cmd, space",
    [(MigrationCommand.IDENTIFY, 15), (MigrationCommand.GET_DIRTY_REPORT_SIZE, 3),
     (MigrationCommand.GET_STATE_ATTRS, 5), (MigrationCommand.GET_STATE_ATTRS, 0)],
    ids=["identify-15", "report-size-3", "state-attrs-5", "state-attrs-0"],
)
def test_result_space_too_small_is_err(h, cmd, space):
    data, _ = VALID[cmd]
    fid = None if cmd is MigrationCommand.IDENTIFY else 1
    if cmd is MigrationCommand.GET_DIRTY_REPORT_SIZE:
        h.drv.start_tracking(1, TrackMode.PULL_BITMAP)
    result, ack = h.drv.raw_command(CLASS_VF_MIGRATION, cmd, data, space)
    assert (result, ack) == (b"", Ack.ERR)
    expect_err(
        h,
        lambda: h.drv.raw_command(CLASS_VF_MIGRATION, cmd, data, space, func_id=fid, check=True),
        command=cmd.name, func_id=fid, state=None if fid is None else S.INIT,
    )


@pytest.mark.parametrize("mode", [TrackMode.PUSH_BITMAP, TrackMode.PUSH_BYTEMAP], ids=lambda m: m.name)
def test_pull_commands_in_push_mode_are_err(h, mode):
    h.drv.start_tracking(1, mode)
    h.pf.vf(1).port.write(0, b"x")
    expect_err(h, lambda: h.drv.get_dirty_report_size(1), command="GET_DIRTY_REPORT_SIZE", func_id=1, state=S.INIT)
    expect_err(h, lambda: h.drv.report_dirty_pages(1, 0, 8), command="REPORT_DIRTY_PAGES", func_id=1, state=S.INIT)
    assert h.drv.collect_dirty(1)[0]  # the mark was not lost by the refused commands


@pytest.mark.parametrize("mode", [TrackMode.PUSH_BITMAP, TrackMode.PUSH_BYTEMAP], ids=lambda m: m.name)
def test_push_start_without_map_table_is_err(h, mode):
    expect_err(h, lambda: h.drv.start_dirty_page_track(1, mode, None),
               command="START_DIRTY_PAGE_TRACK", func_id=1, state=S.INIT)


@pytest.mark.parametrize("mode", [TrackMode.PULL_BITMAP, TrackMode.PULL_BYTEMAP], ids=lambda m: m.name)
def test_pull_start_with_map_table_is_err(h, mode):
    addr = h.drv.alloc.alloc(64)
    expect_err(h, lambda: h.drv.start_dirty_page_track(1, mode, [(addr, 64)]),
               command="START_DIRTY_PAGE_TRACK", func_id=1, state=S.INIT)


def test_start_twice_stop_idle_and_report_before_snapshot_are_err(h):
    expect_err(h, lambda: h.drv.stop_dirty_page_track(1), command="STOP_DIRTY_PAGE_TRACK", func_id=1, state=S.INIT)
    expect_err(h, lambda: h.drv.get_dirty_report_size(1), command="GET_DIRTY_REPORT_SIZE", func_id=1, state=S.INIT)
    h.drv.start_tracking(1, TrackMode.PULL_BITMAP)
    expect_err(h, lambda: h.drv.start_dirty_page_track(1, TrackMode.PULL_BYTEMAP),
               command="START_DIRTY_PAGE_TRACK", func_id=1, state=S.INIT)
    expect_err(h, lambda: h.drv.report_dirty_pages(1, 0, 8), command="REPORT_DIRTY_PAGES", func_id=1, state=S.INIT)
    h.pf.vf(1).port.write(20 * PAGE_SIZE, b"x")
    assert h.drv.get_dirty_report_size(1) == 3
    expect_err(h, lambda: h.drv.report_dirty_pages(1, 4, 8), command="REPORT_DIRTY_PAGES", func_id=1, state=S.INIT)
    assert h.drv.report_dirty_pages(1, 0, 8) == b"\0\0\x10"


def test_unsupported_mode_is_err_on_the_wire_and_refused_by_the_driver():
    h = make_host(modes=TrackModeCaps.PUSH_BITMAP)
    try:
        expect_err(h, lambda: h.drv.start_dirty_page_track(1, TrackMode.PULL_BITMAP),
                   command="START_DIRTY_PAGE_TRACK", func_id=1, state=S.INIT)
        sent = h.drv.stats.commands
        with pytest.raises(TrackingError, match="not supported"):
            h.drv.start_tracking(1, TrackMode.PULL_BYTEMAP)
        assert h.drv.stats.commands == sent + 1  # only IDENTIFY: no START was sent
    finally:
        h.close()


@pytest.mark.parametrize(
    "state, call, command",
    [
        (S.INIT, lambda d: d.save_state(1, 0, 64), "SAVE_STATE"),
        (S.RUNNING, lambda d: d.save_state(1, 0, 64), "SAVE_STATE"),
        (S.QUIESCED, lambda d: d.save_state(1, 0, 64), "SAVE_STATE"),
        (S.INIT, lambda d: d.restore_state(1, 0, b"x"), "RESTORE_STATE"),
        (S.RUNNING, lambda d: d.restore_state(1, 0, b"x"), "RESTORE_STATE"),
        (S.QUIESCED, lambda d: d.restore_state(1, 0, b"x"), "RESTORE_STATE"),
        (S.RUNNING, lambda d: d.set_state(1, S.FREEZED), "SET_STATE"),
        (S.FREEZED, lambda d: d.set_state(1, S.RUNNING), "SET_STATE"),
        (S.FREEZED, lambda d: d.save_state(1, 1 << 20, 64), "SAVE_STATE"),  # past the image's end
        (S.FREEZED, lambda d: d.restore_state(1, (64 << 20) - 1, b"xy"), "RESTORE_STATE"),  # past the limit
    ],
    ids=["save-init", "save-running", "save-quiesced", "restore-init", "restore-running", "restore-quiesced",
         "running-to-freezed", "freezed-to-running", "save-past-end", "restore-past-limit"],
)
def test_wrong_state_is_err(h, state, call, command):
    drive(h, 1, state)
    expect_err(h, lambda: call(h.drv), command=command, func_id=1, state=state)


def test_save_image_outside_freezed_is_err(h):
    drive(h, 1, S.QUIESCED)
    expect_err(h, lambda: h.drv.save_image(1), command="SAVE_STATE", func_id=1, state=S.QUIESCED)


@pytest.mark.parametrize(
    "dropped",
    [bit(ProposalFeature.VF_MIGRATION), bit(ProposalFeature.VF_MIGRATION) | bit(ProposalFeature.GENERIC_CTRL_VQ_VER_1)],
    ids=["no-vf-migration", "no-generic-ctrl-vq"],
)
@pytest.mark.parametrize("cmd", list(MigrationCommand), ids=lambda c: c.name)
def test_migration_commands_before_negotiation_are_err(cmd, dropped):
    h = make_host(wanted=DEFAULT_FEATURES & ~dropped, require_migration=False)
    try:
        assert h.pf.status & DeviceStatus.DRIVER_OK and not h.pf.negotiated & dropped
        data, space = VALID[cmd]
        fid = None if cmd is MigrationCommand.IDENTIFY else 1
        # the read-back of the VF's state is refused too: state unknown
        expect_err(h, lambda: h.drv.raw_command(CLASS_VF_MIGRATION, cmd, data, space, func_id=fid, check=True),
                   command=cmd.name, func_id=fid, state=None)
    finally:
        h.close()


@pytest.mark.parametrize("cls, cmd", [(0, 0), (5, 1), (127, 0), (129, 0), (255, 3), (128, 9), (128, 255)],
                         ids=["c0", "c5", "c127", "c129", "c255", "cmd9", "cmd255"])
def test_unknown_class_or_command_is_err(h, cls, cmd):
    name = f"class {cls} command {cmd}"
    expect_err(h, lambda: h.drv.raw_command(cls, cmd, FuncId(1).encode(), 16, func_id=1, check=True),
               command=name, func_id=1, state=S.INIT)


def _table(*descs: VirtqDesc) -> bytes:
    return b"".join(d.encode() for d in descs)


W = DescFlags.WRITE
MALFORMED_TABLES = {
    "empty": lambda a: b"",
    "not-multiple-of-16": lambda a: encode_map_table([(a, 64)]) + b"\0" * 7,
    "zero-length": lambda a: _table(VirtqDesc(a, 0, W, 0)),
    "next-flag": lambda a: _table(VirtqDesc(a, 64, W | DescFlags.NEXT, 0)),
    "indirect-flag": lambda a: _table(VirtqDesc(a, 64, W | DescFlags.INDIRECT, 0)),
    "next-nonzero": lambda a: _table(VirtqDesc(a, 64, W, 1)),
    "outside-host-memory": lambda a: encode_map_table([(HOST_SIZE - 32, 64)]),
    "addr-overflow": lambda a: _table(VirtqDesc((1 << 64) - 8, 64, W, 0)),
    "overlapping": lambda a: encode_map_table([(a, 64), (a + 32, 64)]),
    "second-outside": lambda a: encode_map_table([(a, 64), (1 << 40, 8)]),
}


@pytest.mark.parametrize("mode", [TrackMode.PUSH_BITMAP, TrackMode.PUSH_BYTEMAP], ids=lambda m: m.name)
@pytest.mark.parametrize("name", list(MALFORMED_TABLES))
def test_malformed_start_map_table_is_err(h, name, mode):
    addr = h.drv.alloc.alloc(128)
    data = StartDirtyTrack(1, mode).encode() + MALFORMED_TABLES[name](addr)
    expect_err(h, lambda: h.drv.raw_command(CLASS_VF_MIGRATION, MigrationCommand.START_DIRTY_PAGE_TRACK, data, 0,
                                            func_id=1, check=True),
               command="START_DIRTY_PAGE_TRACK", func_id=1, state=S.INIT)
    assert h.ctl.context(1).tracker is None and h.pf.vf(1).port.writer.tracker is None


# ====================================================================== misbehaving control queues
class DroppingPfDevice(PfDevice):
    """Takes no control buffer while ``drop`` is set (a stuck control queue)."""

    drop = True

    def queue_notify(self, fn, queue):
        if queue == CTRL_QUEUE and self.drop:
            return
        super().queue_notify(fn, queue)


def test_command_times_out_then_late_completion_is_reaped():
    dev = DroppingPfDevice(threaded=False)
    h = make_host(device=dev, vfs=0)
    try:
        h.drv.timeout = 0.2
        free = h.drv.alloc.free_bytes()
        with pytest.raises(CommandTimeoutError):
            h.drv.identify()
        assert h.drv.stats.timeouts == 1
        assert h.drv.alloc.free_bytes() < free  # the abandoned buffers stay with the device
        dev.drop = False
        # no kick for the next command: the device has not consumed up to its avail_event
        # (EVENT_IDX); it catches up by itself (a late completion), the driver reaps it first
        assert dev.process_control_queue() == 1
        assert h.drv.identify().mjr_ver == 1
        assert h.drv.alloc.free_bytes() == free
        assert dev.ctrl_processed == 2
    finally:
        h.close()


def test_command_times_out_when_the_pf_worker_is_stopped(h):
    h.drv.timeout = 0.2
    h.pf.device.close()  # the control-queue thread ends; kicks are never served
    with pytest.raises(CommandTimeoutError):
        h.drv.get_state_attrs(1)


def test_push_collection_does_not_wait_for_a_stuck_command():
    dev = DroppingPfDevice(threaded=False)
    dev.drop = False
    h = make_host(device=dev)
    try:
        h.drv.start_tracking(1, TrackMode.PUSH_BITMAP)
        dev.drop = True
        outcome: list[object] = []
        stuck = threading.Thread(target=lambda: outcome.append(h.drv.get_state_attrs(2)))
        stuck.start()
        while h.drv.ctrlq.in_flight() == 0:  # the command is on the queue, the queue lock held
            time.sleep(0.001)
        h.pf.vf(1).port.write(3 * PAGE_SIZE, b"x")
        assert list(np.flatnonzero(h.drv.collect_dirty(1))) == [3]
        assert stuck.is_alive() and not outcome  # collected while the command was still waiting
        dev.drop = False
        dev.process_control_queue()
        stuck.join(TIMEOUT)
        assert outcome == [(0, S.INIT)]
    finally:
        h.close()


def test_command_abandoned_when_the_pf_needs_a_reset():
    dev = DroppingPfDevice(threaded=False)
    h = make_host(device=dev, vfs=0)
    try:
        h.drv.poll_interval = 0.01
        h.pf.set_needs_reset("test")
        with pytest.raises(DeviceNeedsResetError):
            h.drv.identify()
        assert h.drv.stats.timeouts == 0
    finally:
        h.close()


class LyingPfDevice(PfDevice):
    """Processes commands correctly, then misreports: used_len + ``extra`` / a bad ack byte."""

    extra = 0
    ack: int | None = None

    def _control(self, chain):
        fn = self.fn
        out = self.dispatcher.handle(chain.read(fn.port), chain.writable_len).written
        if self.ack is not None:
            out = out[:-1] + bytes([self.ack])
        written = chain.write(fn.port, out)
        fn.queues[CTRL_QUEUE].push(fn.port, chain.head, max(0, written + self.extra))


@pytest.mark.parametrize(
    "extra, ack, error",
    [(1, None, UsedRingError), (1000, None, UsedRingError), (-100, None, WireError), (0, 7, WireError),
     (0, 0xFF, WireError)],
    ids=["used-len+1", "used-len+1000", "used-len-0", "ack-7", "ack-ff"],
)
def test_bad_used_length_or_ack_is_a_typed_error(extra, ack, error):
    dev = LyingPfDevice(threaded=False)
    h = make_host(device=dev, vfs=0)
    try:
        dev.extra, dev.ack = extra, ack
        free = h.drv.alloc.free_bytes()
        with pytest.raises(error):
            h.drv.identify()
        assert h.drv.alloc.free_bytes() == free
        dev.extra, dev.ack = 0, None
        assert h.drv.identify().mjr_ver == 1  # the queue goes on
    finally:
        h.close()


# ====================================================================== state machine
ERR = None
#: the proposal's diagram: (from, requested) -> resulting state, or ERR
ORACLE = {
    (S.INIT, S.INIT): ERR, (S.INIT, S.RUNNING): S.RUNNING, (S.INIT, S.QUIESCED): S.QUIESCED, (S.INIT, S.FREEZED): S.FREEZED,
    (S.RUNNING, S.INIT): ERR, (S.RUNNING, S.RUNNING): S.RUNNING, (S.RUNNING, S.QUIESCED): S.QUIESCED,
    (S.RUNNING, S.FREEZED): ERR,
    (S.QUIESCED, S.INIT): ERR, (S.QUIESCED, S.RUNNING): S.RUNNING, (S.QUIESCED, S.QUIESCED): S.QUIESCED,
    (S.QUIESCED, S.FREEZED): S.FREEZED,
    (S.FREEZED, S.INIT): ERR, (S.FREEZED, S.RUNNING): ERR, (S.FREEZED, S.QUIESCED): S.QUIESCED,
    (S.FREEZED, S.FREEZED): S.FREEZED,
}
MASTERING = {S.INIT: True, S.RUNNING: True, S.QUIESCED: False, S.FREEZED: False}


@pytest.mark.parametrize("requested", list(VfState), ids=lambda s: s.name)
@pytest.mark.parametrize("start", list(VfState), ids=lambda s: s.name)
def test_set_state_table(h, start, requested):
    drive(h, 1, start)
    other = h.drv.get_state_attrs(2)
    want = ORACLE[(start, requested)]
    if want is ERR:
        expect_err(h, lambda: h.drv.set_state(1, requested), command="SET_STATE", func_id=1, state=start)
        want = start
    else:
        h.drv.set_state(1, requested)
    assert h.drv.get_state(1) is want
    assert h.pf.vf(1).port.bus_master is MASTERING[want]
    assert h.drv.get_state_attrs(2) == other  # the other VF is untouched


@pytest.mark.parametrize("start", list(VfState), ids=lambda s: s.name)
def test_flr_returns_to_init_from_any_state_and_tracking_goes_on(h, start):
    h.drv.start_tracking(1, TrackMode.PUSH_BITMAP)
    drive(h, 1, start)
    h.drv.collect_dirty(1)
    h.drv.flr_vf(1)
    assert h.drv.get_state_attrs(1) == (0, S.INIT)
    assert h.pf.vf(1).port.bus_master
    h.pf.vf(1).port.write(7 * PAGE_SIZE, b"x")
    assert list(np.flatnonzero(h.drv.collect_dirty(1))) == [7]


def test_vf_driver_ok_moves_init_to_running(h):
    assert h.drv.get_state(1) is S.INIT
    h.guest_driver(1)
    assert h.drv.get_state(1) is S.RUNNING
    assert h.drv.get_state(2) is S.INIT


def test_vf_driver_ok_outside_init_changes_nothing(h):
    h.drv.set_state(1, S.QUIESCED)
    h.guest_driver(1)
    assert h.drv.get_state(1) is S.QUIESCED


# ====================================================================== dirty tracking
def random_writes(rng: random.Random, size: int, count: int) -> list[tuple[int, int]]:
    """(addr, length) device writes: random, page-crossing, and at the memory's edges."""
    out = [(0, 1), (size - 1, 1), (size - PAGE_SIZE - 10, 20)]
    for _ in range(count):
        length = rng.choice([1, 8, 100, PAGE_SIZE - 1, PAGE_SIZE, PAGE_SIZE + 1, 3 * PAGE_SIZE + 5])
        addr = rng.randrange(0, size - length + 1)
        out.append((addr, length))
    rng.shuffle(out)
    return out[: max(1, count)]


def pages_of(writes: list[tuple[int, int]], num_pages: int) -> np.ndarray:
    """Independent oracle: every page a write touches."""
    want = np.zeros(num_pages, dtype=bool)
    for addr, length in writes:
        for p in range(addr // PAGE_SIZE, (addr + length - 1) // PAGE_SIZE + 1):
            want[p] = True
    return want


TRACK_GUEST = MEM_SIZE + 3 * PAGE_SIZE  # 1027 pages: the bitmap's last byte is partial


@pytest.fixture
def th():
    h = make_host(guest_size=TRACK_GUEST)
    h.drv.report_portion = 37  # several REPORT_DIRTY_PAGES per collection
    yield h
    h.close()


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_tracking_is_exact_over_rounds(th, mode):
    h = th
    tr = h.drv.start_tracking(1, mode, map_segments=3)
    assert tr.num_pages == TRACK_GUEST // PAGE_SIZE
    if mode.is_push:
        assert len(tr.segments) == 3 and sum(n for _, n in tr.segments) == mode.map_bytes(tr.num_pages)
    vf_port, other_port, cpu = h.pf.vf(1).port, h.pf.vf(2).port, h.guests[1].cpu
    rng = random.Random(1000 + mode)
    assert not h.drv.collect_dirty(1).any()  # negative control: nothing written yet
    for rnd in range(6):
        writes = random_writes(rng, TRACK_GUEST, rng.randrange(1, 60)) if rnd != 3 else []
        for addr, length in writes:
            vf_port.write(addr, bytes([rnd + 1]) * length)
        for addr, length in random_writes(rng, TRACK_GUEST, 20):  # the VM's CPU: not the device's pages
            cpu.write(addr, b"\xcc" * length)
        for addr, length in random_writes(rng, MEM_SIZE, 10):  # VF 2 is not tracked
            other_port.write(addr, b"\xdd" * length)
        got = h.drv.collect_dirty(1)
        want = pages_of(writes, tr.num_pages)
        assert got.shape == want.shape
        assert not (want & ~got).any(), f"missing pages {np.flatnonzero(want & ~got)}"
        assert not (got & ~want).any(), f"extra pages {np.flatnonzero(got & ~want)}"
    assert tr.failsafe_events == 0
    if not mode.is_push:
        assert h.drv.stats.collect_commands > 2 * 7
    free = h.drv.alloc.free_bytes()
    map_bytes = sum(n for _, n in tr.segments)
    h.drv.stop_tracking(1)
    assert h.drv.alloc.free_bytes() == free + map_bytes
    assert map_bytes == (mode.map_bytes(tr.num_pages) if mode.is_push else 0)
    assert h.pf.vf(1).port.writer.tracker is None


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_tracking_sees_dmatest_fill_requests(th, mode):
    """Device DMA through a real VF queue: the data buffers and the used ring are dirty."""
    h = th
    rig = h.guest_driver(1)
    h.drv.start_tracking(1, mode, map_segments=2)
    rng = random.Random(mode)
    dq = rig.dq
    used_page = dq.used_addr // PAGE_SIZE
    for rnd in range(3):
        reqs = [rig.fill(rng.randrange(1 << 30), rng.randrange(1, 3 * PAGE_SIZE)) for _ in range(rng.randrange(1, 8))]
        rig.kick()
        rig.wait_idle()
        done = rig.reap()
        assert len(done) == len(reqs)
        for req, used_len in done:
            check_result(h.guests[1], req, used_len)
        want = pages_of([(r.buf_addr, r.wlen) for r in reqs] + [(dq.used_addr, 4)], TRACK_GUEST // PAGE_SIZE)
        got = h.drv.collect_dirty(1)
        assert np.array_equal(got, want), (np.flatnonzero(got), np.flatnonzero(want))
        assert got[used_page]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_tracking_races_with_collection(th, mode):
    h = th
    h.drv.start_tracking(1, mode, map_segments=2)
    port = h.pf.vf(1).port
    rng = random.Random(77 + mode)
    writes = random_writes(rng, TRACK_GUEST, 400)
    done = threading.Event()

    def dma() -> None:
        try:
            for addr, length in writes:
                port.write(addr, b"\x5a" * length)
        finally:
            done.set()

    t = threading.Thread(target=dma)
    union = np.zeros(TRACK_GUEST // PAGE_SIZE, dtype=bool)
    want = pages_of(writes, len(union))
    t.start()
    rounds = 0
    while not done.is_set():
        got = h.drv.collect_dirty(1)
        assert not (got & ~want).any(), "a page never written was reported"
        union |= got
        rounds += 1
    t.join(TIMEOUT)
    union |= h.drv.collect_dirty(1)
    assert np.array_equal(union, want), f"missing {np.flatnonzero(want & ~union)}"
    assert not h.drv.collect_dirty(1).any()


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_fail_safe_marks_every_page_then_exact_again(mode):
    """The driver tracks 100 pages; the device writes page 600 (beyond what it can record)."""
    h = make_host(log_max_pull_bitmap=7, log_max_pull_bytemap=7)  # pull capacity 128 pages
    try:
        tr = h.drv.start_tracking(1, mode, num_pages=100, map_segments=2)
        port = h.pf.vf(1).port
        port.write(3 * PAGE_SIZE, b"x")
        assert list(np.flatnonzero(h.drv.collect_dirty(1))) == [3]
        port.write(600 * PAGE_SIZE, b"x")
        assert h.drv.collect_dirty(1).all()  # never silently dropped
        assert h.ctl.context(1).tracker.overflow_events == 1
        if mode is not TrackMode.PUSH_BYTEMAP:  # a bytemap of exactly 100 bytes has no room for "beyond"
            assert tr.failsafe_events == 1
        port.write(9 * PAGE_SIZE, b"x")
        assert list(np.flatnonzero(h.drv.collect_dirty(1))) == [9]
    finally:
        h.close()


@pytest.mark.parametrize("mode", [TrackMode.PULL_BITMAP, TrackMode.PULL_BYTEMAP], ids=lambda m: m.name)
def test_driver_refuses_a_vm_larger_than_pull_capacity(mode):
    h = make_host(log_max_pull_bitmap=9, log_max_pull_bytemap=9)  # 512 pages < 1024
    try:
        sent = h.drv.stats.commands
        with pytest.raises(TrackingError, match="at most"):
            h.drv.start_tracking(1, mode)
        assert h.drv.stats.commands == sent + 1  # IDENTIFY only
        assert h.ctl.context(1).tracker is None and h.drv.tracking(1) is None
        h.drv.start_tracking(1, mode, num_pages=512)  # what fits is accepted
    finally:
        h.close()


@pytest.mark.parametrize("mode", [TrackMode.PUSH_BITMAP, TrackMode.PUSH_BYTEMAP], ids=lambda m: m.name)
def test_driver_refuses_a_push_map_that_does_not_fit_host_memory(h, mode):
    free = h.drv.alloc.free_bytes()
    with pytest.raises(TrackingError, match="does not fit"):
        h.drv.start_tracking(1, mode, num_pages=1 << 31, map_segments=4)
    assert h.drv.alloc.free_bytes() == free
    assert h.ctl.context(1).tracker is None and h.drv.tracking(1) is None


def test_collect_without_tracking_and_double_start_are_refused(h):
    with pytest.raises(TrackingError):
        h.drv.collect_dirty(1)
    h.drv.start_tracking(1, TrackMode.PULL_BITMAP)
    with pytest.raises(TrackingError, match="already"):
        h.drv.start_tracking(1, TrackMode.PUSH_BITMAP)


def test_close_frees_every_host_buffer(h):
    h.drv.start_tracking(1, TrackMode.PUSH_BITMAP, map_segments=3)
    h.drv.start_tracking(2, TrackMode.PUSH_BYTEMAP, map_segments=2)
    h.drv.close()
    assert h.drv.alloc.allocated() == 0
    assert h.ctl.context(1).tracker is None  # the PF reset stopped tracking


# ====================================================================== state images
def _busy_freezed_vf(h: Host, vf: int) -> bytes:
    """VF ``vf`` brought up by its guest, with requests done and some still held; FREEZED; its image."""
    dev = h.devs[vf]
    dev.gated = True
    dev.all_open.clear()
    rig = h.guest_driver(vf)
    rig.fill(1, 100)
    rig.fill(2, 5000)
    rig.kick()
    dev.open(1)
    deadline = time.monotonic() + TIMEOUT  # a hang guard only
    while not (done := rig.reap()):  # request 1 completes; request 2 waits on its gate
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert [req.seed for req, _ in done] == [1]
    h.drv.set_state(vf, S.QUIESCED)
    dev.open(2)
    h.drv.set_state(vf, S.FREEZED)
    return h.drv.save_image(vf)


def test_save_image_in_random_portions_is_the_same_image(h):
    image = _busy_freezed_vf(h, 1)
    assert image == h.ctl.context(1).image
    rng = random.Random(5)
    for _ in range(5):
        assert h.drv.save_image(1, rng.randrange(1, 200)) == image
    assert h.drv.save_image(1, len(image) + 100) == image


def test_restore_in_shuffled_portions_then_resume(h):
    image = _busy_freezed_vf(h, 1)
    h.drv.set_state(2, S.FREEZED)  # INIT -> FREEZED, the destination
    rng = random.Random(11)
    cuts = sorted(rng.sample(range(1, len(image)), 12))
    pieces = [(a, image[a:b]) for a, b in zip([0] + cuts, cuts + [len(image)])]
    rng.shuffle(pieces)
    for off, chunk in pieces:
        h.drv.restore_state(2, off, chunk)
    h.drv.set_state(2, S.QUIESCED)
    h.drv.set_state(2, S.FREEZED)
    assert h.drv.save_image(2) == image  # the destination holds exactly the source's state


@pytest.mark.parametrize("damage", ["flip-byte", "truncated", "header-only", "extra-bytes"])
def test_bad_image_is_refused_at_unfreeze_and_the_vf_is_unchanged(h, damage):
    image = _busy_freezed_vf(h, 1)
    h.drv.set_state(2, S.FREEZED)
    before = h.drv.save_image(2)
    if damage == "flip-byte":
        bad = bytearray(image)
        bad[len(bad) // 2] ^= 0x40
        h.drv.restore_image(2, bytes(bad), 64)
    elif damage == "truncated":
        h.drv.restore_image(2, image[:-7], 64)
    elif damage == "header-only":
        h.drv.restore_image(2, image[:16])
    else:
        h.drv.restore_image(2, image + b"\0" * 9, 64)
    expect_err(h, lambda: h.drv.set_state(2, S.QUIESCED), command="SET_STATE", func_id=2, state=S.FREEZED)
    assert h.drv.get_state_attrs(2) == (len(before), S.FREEZED)
    assert h.drv.save_image(2) == before
    assert not h.pf.vf(2).status  # the destination's function was not touched
    if damage != "extra-bytes":  # a good image sent over the bad one is accepted (the later portion wins)
        h.drv.restore_image(2, image, 100)
        h.drv.set_state(2, S.QUIESCED)
        assert h.drv.get_state(2) is S.QUIESCED


# ====================================================================== batched switch-over
def test_batched_switch_over_equals_one_command_at_a_time(h):
    """set_states / freeze_and_save / restore_and_quiesce (one kick per step for all VFs)
    give the images save_image gives, in small portions too, and restore an image that
    save_image reads back unchanged."""
    image = _busy_freezed_vf(h, 1)
    drive(h, 2, S.QUIESCED)
    before = h.drv.stats.commands
    images = h.drv.freeze_and_save([1, 2], portion=50)  # 1 is FREEZED already: a no-op SET_STATE
    assert h.drv.stats.commands - before == 6 + sum(-(-len(i) // 50) - 1 for i in images)
    assert images == [image, h.drv.save_image(2)]
    h.drv.flr_vf(2)
    h.drv.restore_and_quiesce([(2, image)], portion=37)  # 37-byte portions: many chains, one batch
    assert h.drv.get_state(2) is S.QUIESCED
    h.drv.set_state(2, S.FREEZED)
    assert h.drv.save_image(2) == image
    h.drv.set_states([1, 2], S.QUIESCED)
    h.drv.set_states([1, 2], S.RUNNING)
    assert [h.drv.get_state(v) for v in (1, 2)] == [S.RUNNING, S.RUNNING]


def test_batched_switch_over_refusals_name_the_vf(h):
    drive(h, 1, S.RUNNING)
    drive(h, 2, S.RUNNING)
    # RUNNING -> FREEZED is not a transition: the batch raises for the first VF that refused
    with pytest.raises(ControlCommandError) as ei:
        h.drv.freeze_and_save([1, 2])
    assert (ei.value.command, ei.value.func_id) == ("SET_STATE", 1)
    assert [h.drv.get_state(v) for v in (1, 2)] == [S.RUNNING, S.RUNNING]
    # a bad image: the VF stays FREEZED, the other one in the batch restored
    image = _busy_freezed_vf(h, 1)
    h.drv.flr_vf(2)
    bad = bytearray(image)
    bad[len(bad) // 2] ^= 0x40
    h.drv.flr_vf(1)
    with pytest.raises(ControlCommandError) as ei:
        h.drv.restore_and_quiesce([(1, image), (2, bytes(bad))])
    assert (ei.value.command, ei.value.func_id, ei.value.state) == ("SET_STATE", 2, S.FREEZED)
    assert h.drv.get_state(1) is S.QUIESCED


def test_a_batch_longer_than_the_queue_goes_in_several_kicks(h):
    n = h.drv.queue_size  # chains of two descriptors: twice what one kick can carry
    before = h.drv.stats.commands
    h.drv.set_states([1] * n, S.QUIESCED)
    assert h.drv.stats.commands - before == n and h.drv.get_state(1) is S.QUIESCED
    assert h.drv.ctrlq.num_free() == h.drv.queue_size  # every descriptor back


# ====================================================================== the dirty ring, at the PF
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_leaving_running_puts_every_ringed_mark_into_the_map(mode):
    """A one-page DMA write waits in the tracker's dirty ring until the map is read; QUIESCED
    (and FREEZED) put it in the map at once, so a reader that never drains (another process
    mapping the push map) has every mark before the migration's last collection."""
    h = make_host()
    try:
        h.drv.start_tracking(1, mode, map_segments=2)
        h.pf.vf(1).port.write(5 * PAGE_SIZE + 1, b"x")
        ring = h.ctl.context(1).tracker.ring
        assert list(ring) == [5]  # the control: it is not in the map yet
        h.drv.set_state(1, S.QUIESCED)
        assert len(ring) == 0
        assert list(np.flatnonzero(h.drv.collect_dirty(1))) == [5]
    finally:
        h.close()


@pytest.mark.parametrize("mode", [TrackMode.PUSH_BITMAP, TrackMode.PUSH_BYTEMAP], ids=lambda m: m.name)
def test_stop_puts_the_ring_into_the_push_map_and_a_pf_reset_drops_it(mode):
    h = make_host()
    try:
        tr = h.drv.start_tracking(1, mode, map_segments=2)
        segs = list(tr.segments)
        port = h.pf.vf(1).port
        port.write(3 * PAGE_SIZE, b"x")
        h.ctl.stop_dirty_page_track(1)  # the device side of STOP: the map is complete when it returns
        raw = b"".join(h.host.read(a, n) for a, n in segs)
        assert list(np.flatnonzero(report_to_pages(raw, len(raw) * (8 if mode.is_bitmap else 1),
                                                   bitmap=mode.is_bitmap))) == [3]
        for a, n in segs:
            h.host.cpu.fill(a, n, 0)
        h.ctl.start_dirty_page_track(1, int(mode), segs)
        port.write(4 * PAGE_SIZE, b"x")
        assert len(h.ctl.context(1).tracker.ring) == 1
        h.ctl.reset()  # a reset device writes no map
        assert not any(h.host.read(a, n).strip(b"\0") for a, n in segs)
        assert h.ctl.context(1).tracker is None
    finally:
        h.close()
