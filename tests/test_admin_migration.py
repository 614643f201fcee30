"""Round trips under the virtio-1.4 profile: a running blk VF and a running net VF move between
two PFs with I/O in flight -- DEV_MODE_SET STOPPED, METADATA, GET parts, SET parts on another
VF, resume -- all through the real admin queues, with platform (IOMMU) dirty tracking.

The standard has no in-flight part: the source device completes every chain it took before
it reports STOPPED.  The checks: every request completes exactly once from the guest's view,
on the source; nothing the guest queued after the stop is lost (the destination takes it from
the avail ring); data and disk are right; the source does no DMA after STOPPED; the net
control-queue configuration travels in its parts.  Negative controls: a device that stops
without completing what it took, and a copy that skips the platform's dirty pages, are caught.
"""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

from test_devices_blk_migration import (
    BLOCK,
    NBLOCKS,
    READ_SLOTS,
    MeteredBlkDevice,
    Workload,
    block_ok,
    copy_pages,
    prepare_image,
    wait_for,
)
from virtio_lm.devices.base import QueueDevice
from virtio_lm.devices.blk import BlkDevice
from virtio_lm.devices.net import NetDevice
from virtio_lm.drivers.admin_driver import AdminDriver
from virtio_lm.drivers.blk_driver import BlkDriver
from virtio_lm.drivers.net_driver import DEFAULT_WANTED, NetDriver
from virtio_lm.errors import DriverError, UsedRingError
from virtio_lm.memory import PAGE_SIZE, Memory
from virtio_lm.memory.iommu import IommuDirtyDomain
from virtio_lm.net.backends import UdpSwitchPort
from virtio_lm.net.peer import NetPeer, parse_seq, seq_frame
from virtio_lm.net.switch import L2Switch
from virtio_lm.pci.parts import part_name
from virtio_lm.pf.device import build_pf
from virtio_lm.virtqueue.driver import Allocator
from virtio_lm.wire.admin import DevPartsObjType
from virtio_lm.wire.net import announce_frame
from virtio_lm.wire.netstate import RxModeFlags
from virtio_lm.wire.parts import PartType

HOST_SIZE = 4 << 20
GUEST_SIZE = 16 << 20
THREADS = 8
WAIT = 30.0


class Side:
    """One host: host memory, a virtio-1.4 PF and its admin driver, a guest memory, VF 1."""

    def __init__(self, name: str, device_factory) -> None:
        self.host = Memory(HOST_SIZE, name=f"{name}-host")
        self.pf = build_pf(self.host.device_port(f"{name}.pf"), total_vfs=2, name=f"{name}.pf", profile="virtio-1.4")
        self.drv = AdminDriver(self.pf, self.host.cpu, Allocator(0x10000, HOST_SIZE - 0x10000), timeout=WAIT)
        self.drv.bring_up()
        self.guest = Memory(GUEST_SIZE, name=f"{name}-guest")
        self.dev = device_factory()
        self.drv.enable_vfs(1, lambda n: (self.dev, self.guest.device_port(f"{name}.vf{n}")))

    @property
    def vf(self):
        return self.pf.vf(1)

    def close(self) -> None:
        if isinstance(self.dev, MeteredBlkDevice):
            self.dev.release(10_000)
        self.pf.device.close()
        self.dev.close()
        self.guest.close()
        self.host.close()


def move_parts(src: Side, dst: Side, *, resume: bool = True) -> list:
    """METADATA (size, count, list), GET ALL, then on the destination: stop, SET, resume."""
    obj = src.drv.obj_create(1, DevPartsObjType.GET)
    size = src.drv.metadata_size(1, obj)
    hdrs = src.drv.metadata_list(1, obj)
    parts = src.drv.parts_get(1, obj, space=size)
    src.drv.obj_destroy(1, obj)
    assert [p.hdr for p in parts] == hdrs
    dst.drv.mode_set(1, stopped=True)
    dst.drv.restore_parts(1, parts)
    if resume:
        dst.drv.mode_set(1, stopped=False)
    return parts


# ====================================================================== blk
class StopForgetsBlkDevice(MeteredBlkDevice):
    """BROKEN: reports STOPPED without completing the chains it took (quiesce only)."""

    def mig_stop(self, timeout: float = 10.0) -> None:
        QueueDevice.mig_quiesce(self)


def blk_round_trip(tmp_path, src_cls=MeteredBlkDevice, *, copy_platform_dirty: bool = True) -> list[str]:
    image = tmp_path / "shared.raw"
    prepare_image(image)
    src = Side("src", lambda: src_cls(image, num_queues=2, backend_threads=THREADS))
    dst = Side("dst", lambda: BlkDevice(image, num_queues=2))
    try:
        return _blk(src, dst, image, copy_platform_dirty)
    finally:
        src.close()
        dst.close()


def _blk(src: Side, dst: Side, image, copy_platform_dirty: bool) -> list[str]:
    dev = src.dev
    alloc = Allocator(0x1000, GUEST_SIZE - 0x1000)
    slot_base = alloc.alloc(READ_SLOTS * BLOCK, PAGE_SIZE)
    drv = BlkDriver(src.vf, src.guest.cpu, alloc, queue_size=128)
    wl = Workload(drv, [slot_base + i * BLOCK for i in range(READ_SLOTS)][::-1])
    iommu = IommuDirtyDomain(src.vf.port)  # the platform's, not the device's
    iommu.set_dirty_tracking(True)
    src.guest.cpu.writer.log.start()
    # pre-copy: I/O runs while all of memory is copied, then a round of dirty pages
    for i in range(48):
        wl.submit("w" if i % 2 else "r")
    dev.release(48)
    dst.guest.cpu.write(0, src.guest.read(0, GUEST_SIZE))
    wl.reap(drv)
    # requests in flight when the stop comes: the device holds every permit back
    wait_for(lambda: dev.in_flight == 0, "the first batch to settle")
    for i in range(64):
        wl.submit("w" if i % 2 else "r")
    wait_for(lambda: dev.started - dev.finished == THREADS, "the pool to start its threads")
    assert dev.in_flight == 64
    errs: list[BaseException] = []

    def do_stop() -> None:
        try:
            src.drv.mode_set(1, stopped=True)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errs.append(exc)

    th = threading.Thread(target=do_stop)
    th.start()
    wait_for(lambda: dev.stopping or not th.is_alive(), "the stop to begin")
    for _ in range(8):  # the requests finish while the stop waits
        if not th.is_alive():
            break
        dev.release(8)
        time.sleep(0.002)
    th.join(WAIT)
    assert not errs, errs
    problems: list[str] = []
    if dev.in_flight:
        problems.append(f"STOPPED with {dev.in_flight} requests still held by the source device")
    written_at_stop, writes_at_stop = src.vf.port.writer.bytes_written, dev.writes
    dev.release(10_000)  # whatever the source still has to do, it may do now (a correct device: nothing)
    wait_for(lambda: dev.started == dev.finished, "the source's back-end to settle")
    for i in range(4):  # the guest still kicks: accepted, not served by a stopped device
        wl.submit("w" if i % 2 else "r")
    state = drv.save()  # the vCPUs stop: the driver's bookkeeping migrates with the VM
    # the last round: the CPU's dirty log and the platform's dirty bitmap
    pages = src.guest.cpu.writer.log.collect()
    device = np.frombuffer(iommu.get_dirty_bitmap(0, GUEST_SIZE), dtype=np.uint8)
    device_pages = np.unpackbits(device, bitorder="little")[: GUEST_SIZE // PAGE_SIZE].astype(bool)
    if copy_platform_dirty:
        pages |= device_pages
    copy_pages(src.guest, dst.guest, pages)
    parts = move_parts(src, dst)
    assert [part_name(p) for p in parts][:5] == ["DEV_FEATURES", "DRV_FEATURES", "PCI_COMMON_CFG@0x10", "PCI_COMMON_CFG@0x12", "DEVICE_STATUS"]
    assert not any(p.hdr.part_type >= 0x200 for p in parts)  # blk has no device-type part
    src.pf.flr_vf(1)
    # the guest resumes on the destination
    ddrv = BlkDriver.from_state(state, fn=dst.vf, port=dst.guest.cpu)
    if not dst.dev.wait_idle(WAIT):
        problems.append(f"destination still holds {dst.dev.in_flight} requests")
    try:
        deadline = time.monotonic() + 5
        while wl.outstanding and time.monotonic() < deadline:
            wl.reap(ddrv)
            time.sleep(0.005)
    except UsedRingError as exc:
        problems.append(f"used ring: {exc}")
    problems += wl.problems
    if wl.outstanding:
        problems.append(f"{len(wl.outstanding)} requests never completed")
    if len(wl.reaped) != len(set(wl.reaped)):
        problems.append("a request was reaped twice")
    with open(image, "rb") as f:
        for lba in range(NBLOCKS):
            if not block_ok(f.read(BLOCK), lba, wl.gen.get(lba, 0)):
                problems.append(f"disk lba {lba}: not generation {wl.gen.get(lba, 0)}")
    try:
        for lba in random.Random(5).sample(sorted(wl.gen), 8):
            if not block_ok(ddrv.read(lba * 8, 8, timeout=5), lba, wl.gen[lba]):
                problems.append(f"destination read of lba {lba} is wrong")
    except DriverError as exc:
        problems.append(f"destination I/O failed: {exc!r}")
    if dev.writes != writes_at_stop:
        problems.append(f"the source wrote the image {dev.writes - writes_at_stop} times after STOPPED")
    if src.vf.port.writer.bytes_written != written_at_stop:
        problems.append("the source DMAed after STOPPED")
    return problems


@pytest.mark.slow  # 0.3 s or more: out of the one-minute fast subset (CI runs it)
def test_blk_round_trip_with_requests_in_flight_loses_nothing(tmp_path):
    assert blk_round_trip(tmp_path) == []


@pytest.mark.slow  # 0.3 s or more: out of the one-minute fast subset (CI runs it)
def test_negative_control_a_stop_that_keeps_requests_is_caught(tmp_path):
    problems = blk_round_trip(tmp_path, StopForgetsBlkDevice)
    assert any("STOPPED with" in p for p in problems), problems
    assert any("wrote the image" in p for p in problems), problems  # it executed them after STOPPED


@pytest.mark.slow  # 0.3 s or more: out of the one-minute fast subset (CI runs it)
def test_negative_control_skipping_the_platform_dirty_pages_is_caught(tmp_path):
    problems = blk_round_trip(tmp_path, copy_platform_dirty=False)
    assert any("wrong data in the guest buffer" in p for p in problems), problems


# ====================================================================== net
PEER_MAC = bytes.fromhex("02aabbccdd01")


def wait_until(pred, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


@pytest.fixture
def net():
    sw = L2Switch(idle_timeout=60).start()
    peer = NetPeer(sw.address, PEER_MAC)
    peer.send_raw(announce_frame(PEER_MAC))
    assert sw.wait_learned(PEER_MAC, peer.address, WAIT)
    src = Side("src", lambda: NetDevice(UdpSwitchPort(sw.address, name="src"), max_pairs=4))
    dst = Side("dst", lambda: NetDevice(UdpSwitchPort(sw.address, name="dst"), max_pairs=4))
    yield sw, peer, src, dst
    src.close()
    dst.close()
    peer.close()
    sw.stop()


def test_net_round_trip_with_tx_in_flight_and_the_control_queue_configuration(net):
    sw, peer, src, dst = net
    drv = NetDriver(src.vf, src.guest.cpu, ring_alloc=Allocator(0x1000, 0x1FF000), buf_alloc=Allocator(0x200000, GUEST_SIZE - 0x200000))
    src.vf.on_interrupt = drv.on_interrupt
    drv.bring_up(DEFAULT_WANTED, queue_size=128, pairs=1)
    assert not src.vf.negotiated & (1 << 39)  # the proposal's generic control format is not offered
    mac = drv.mac
    rx: list[int] = []

    def collect(d: NetDriver) -> None:
        for _, f in d.receive():
            p = parse_seq(f)
            assert p is not None
            rx.append(p[3])

    # steady state, then the control-queue configuration the parts must carry
    drv.send_many([seq_frame(PEER_MAC, mac, 9, s) for s in range(20)])
    wait_until(lambda: peer.count_from(mac) >= 20, "20 TX frames")
    peer.send_seq(mac, 20)
    wait_until(lambda: (collect(drv), len(rx) >= 20)[1], "20 RX frames")
    drv.set_allmulti(True)
    drv.set_mac_table([bytes.fromhex("02000000aa01")], [bytes.fromhex("01005e0000aa")])
    drv.vlan_add(7)
    drv.vlan_add(4000)
    drv.set_mac(bytes.fromhex("525400999999"))
    mac = drv.mac
    drv.reap_tx()
    # 40 frames queued behind a paused link: the stop must send and complete every one
    src.dev.backend.pause_tx()
    drv.send_many([seq_frame(PEER_MAC, mac, 9, s) for s in range(20, 60)])
    wait_until(lambda: src.dev.in_flight == 40, "40 TX chains taken")
    errs: list[BaseException] = []
    th = threading.Thread(target=lambda: _try(errs, lambda: src.drv.mode_set(1, stopped=True)))
    th.start()
    wait_until(lambda: src.dev.stopping, "the stop to begin")
    src.dev.backend.grant_tx(40)
    th.join(WAIT)
    assert not errs, errs
    assert src.dev.in_flight == 0 and src.dev.stats["tx_frames"] == 60
    written = src.vf.port.writer.bytes_written
    peer.send_seq(mac, 15)  # RX while stopped: dropped and counted, no DMA
    wait_until(lambda: src.dev.stats["rx_dropped_quiesced"] == 15, "15 RX drops")
    assert src.vf.port.writer.bytes_written == written
    state = drv.save()
    dst.guest.cpu.write(0, src.guest.read(0, GUEST_SIZE))
    parts = move_parts(src, dst, resume=False)
    cvq = [p for p in parts if p.hdr.part_type == PartType.NET_CVQ_CFG]
    assert len(cvq) == 6, [part_name(p) for p in parts]
    src.pf.flr_vf(1)
    new = NetDriver.from_state(state, fn=dst.vf, port=dst.guest.cpu)
    dst.vf.on_interrupt = new.on_interrupt
    dst.drv.mode_set(1, stopped=False)
    dev = dst.dev
    assert (dev.mac, dev.rx_mode) == (bytes.fromhex("525400999999"), RxModeFlags.PROMISC | RxModeFlags.ALLMULTI)
    assert dev.unicast == (bytes.fromhex("02000000aa01"),) and dev.vlans == {7, 4000}
    # every TX completed once, on the source; the destination re-sends nothing
    wait_until(lambda: (new.reap_tx(), new.tx_in_flight() == 0)[1], "TX completions reaped")
    assert new.counters["tx_completed"] == new.counters["tx_submitted"] == 60
    time.sleep(0.05)
    seqs = peer.seqs_from(mac) + peer.seqs_from(bytes.fromhex("525400123456"))
    assert sorted(s for s in seqs) == list(range(60)), "TX lost or sent twice"
    # the destination announces itself, RX reaches it
    new.poll()
    assert sw.wait_learned(mac, dst.dev.backend.local_addr, WAIT)
    peer.send_seq(mac, 25)
    wait_until(lambda: (collect(new), len(rx) >= 45)[1], "RX on the destination")
    assert rx == list(range(20)) + list(range(35, 60))
    # the device drops a chain from its table just after publishing it on the used ring
    wait_until(lambda: dst.dev.in_flight == 0, "the last RX chain out of the device's table")
    assert not dst.vf.needs_reset


def _try(errs: list[BaseException], f) -> None:
    try:
        f()
    except BaseException as exc:  # noqa: BLE001 - reported by the caller
        errs.append(exc)
