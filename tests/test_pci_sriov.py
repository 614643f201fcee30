"""SriovPF: VF enable/disable, numbering, per-VF memory, VF FLR isolation, PF FLR."""

from __future__ import annotations

import pytest

from test_pci_function import (
    ACK,
    DRIVER,
    DRIVER_OK,
    F_SR_IOV,
    F_VERSION_1,
    FEATURES_OK,
    EchoDevice,
    r,
    read_offered,
    setup_queue,
    to_features_ok,
    w,
)
from virtio_lm.errors import FunctionNumberError
from virtio_lm.memory import Memory
from virtio_lm.pci import SriovPF, VirtioDevice, VirtioPciFunction
from virtio_lm.virtqueue.device import Segment
from virtio_lm.virtqueue.driver import Allocator


class PfDevice(VirtioDevice):
    device_id = 0x7F
    num_queues = 1
    queue_max_size = 16

    def __init__(self) -> None:
        super().__init__()
        self.resets = 0

    def offered_features(self) -> int:
        return F_VERSION_1

    def reset(self) -> None:
        self.resets += 1


@pytest.fixture
def host_mem():
    with Memory(1 << 20, name="host") as m:
        yield m


@pytest.fixture
def guest_mem():
    with Memory(1 << 20, name="guest") as m:
        yield m


def make_pf(host_mem, total=4):
    return SriovPF(PfDevice(), host_mem.device_port("pf"), name="pf", total_vfs=total)


def factory_for(guest_mem, made):
    def factory(n):
        dev = EchoDevice(F_VERSION_1 | F_SR_IOV)  # a VF never offers SR_IOV, whatever its device says
        made.append((n, dev))
        return dev, guest_mem.device_port(f"vf{n}")

    return factory


def test_pf_offers_sr_iov_vf_does_not(host_mem, guest_mem):
    pf = make_pf(host_mem)
    assert read_offered(pf) == F_VERSION_1 | F_SR_IOV
    w(pf, "device_feature_select", 1)
    assert r(pf, "device_feature") & (1 << 5)  # bit 37 in the high word
    pf.enable_vfs(1, factory_for(guest_mem, []))
    assert read_offered(pf.vf(1)) == F_VERSION_1
    # the PF negotiates SR_IOV
    to_features_ok(pf, F_VERSION_1 | F_SR_IOV)
    assert pf.negotiated == F_VERSION_1 | F_SR_IOV


def test_enable_vfs_creates_numbered_functions(host_mem, guest_mem):
    pf = make_pf(host_mem)
    made: list = []
    seen: list[int] = []
    pf.add_sriov_listener(seen.append)
    vfs = pf.enable_vfs(3, factory_for(guest_mem, made))
    assert pf.num_vfs == 3 and seen == [3]
    assert [n for n, _ in made] == [1, 2, 3]
    assert [pf.vf(n) for n in (1, 2, 3)] == vfs == list(pf.vfs)
    assert len({id(v) for v in vfs}) == 3
    for n, dev in made:
        vf = pf.vf(n)
        assert isinstance(vf, VirtioPciFunction) and not isinstance(vf, SriovPF)
        assert vf.device is dev and vf.name == f"pf.vf{n}"
        assert vf.port.memory is guest_mem and vf.port is not pf.port
        assert pf.vf_number(vf) == n
        assert r(vf, "num_queues") == 2


@pytest.mark.parametrize("number", [0, 4, -1, 65, True, "1", 1.0, None])
def test_vf_number_outside_range_refused(host_mem, guest_mem, number):
    pf = make_pf(host_mem)
    pf.enable_vfs(3, factory_for(guest_mem, []))
    with pytest.raises(FunctionNumberError):
        pf.vf(number)
    with pytest.raises(FunctionNumberError):
        pf.flr_vf(number)


def test_vf_lookup_without_vfs_refused(host_mem):
    pf = make_pf(host_mem)
    with pytest.raises(FunctionNumberError, match=r"1\.\.0"):
        pf.vf(1)


@pytest.mark.parametrize("n", [0, 5, -1, True])
def test_enable_vfs_count_refused(host_mem, guest_mem, n):
    pf = make_pf(host_mem, total=4)
    made: list = []
    with pytest.raises(FunctionNumberError):
        pf.enable_vfs(n, factory_for(guest_mem, made))
    assert pf.num_vfs == 0 and made == []


def test_enable_while_enabled_refused_disable_first(host_mem, guest_mem):
    pf = make_pf(host_mem)
    pf.enable_vfs(2, factory_for(guest_mem, []))
    with pytest.raises(FunctionNumberError, match="disable them"):
        pf.enable_vfs(3, factory_for(guest_mem, []))
    assert pf.num_vfs == 2
    pf.disable_vfs()
    pf.enable_vfs(3, factory_for(guest_mem, []))
    assert pf.num_vfs == 3


@pytest.mark.parametrize("total", [0, -1, 1 << 16, True])
def test_total_vfs_refused(host_mem, total):
    with pytest.raises(FunctionNumberError):
        SriovPF(PfDevice(), host_mem.device_port("pf"), name="pf", total_vfs=total)


def test_disable_vfs_resets_and_removes(host_mem, guest_mem):
    pf = make_pf(host_mem)
    made: list = []
    seen: list[int] = []
    pf.add_sriov_listener(seen.append)
    pf.enable_vfs(2, factory_for(guest_mem, made))
    pf.disable_vfs()
    assert pf.num_vfs == 0 and pf.vfs == () and seen == [2, 0]
    assert all(dev.resets == 1 for _, dev in made)
    with pytest.raises(FunctionNumberError):
        pf.vf(1)
    pf.disable_vfs()  # disabling with none enabled is a no-op
    assert seen == [2, 0]


def bring_up_vf(vf, mem, base):
    to_features_ok(vf)
    alloc = Allocator(base, 0x10000)
    dq = setup_queue(vf, mem, 0, alloc, size=8)
    w(vf, "device_status", ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    return dq


def test_vf_dma_goes_to_guest_memory_not_pf_memory(host_mem, guest_mem):
    pf = make_pf(host_mem)
    pf.enable_vfs(1, factory_for(guest_mem, []))
    vf = pf.vf(1)
    dq = bring_up_vf(vf, guest_mem, 0x10000)
    guest_mem.cpu.write(0x80000, b"to the guest")
    dq.add([Segment(0x80000, 12)], [Segment(0x81000, 12)])
    dq.publish()
    vf.notify(0)
    assert guest_mem.read(0x81000, 12) == b"to the guest"
    assert host_mem.read(0x81000, 12) == bytes(12)  # negative control: nothing landed in PF memory
    assert vf.port.writer.bytes_written > 0 and pf.port.writer.bytes_written == 0


def test_flr_of_one_vf_leaves_the_others_untouched(host_mem, guest_mem):
    pf = make_pf(host_mem)
    made: list = []
    pf.enable_vfs(3, factory_for(guest_mem, made))
    flrs: list[int] = []
    pf.add_flr_listener(flrs.append)
    queues = {n: bring_up_vf(pf.vf(n), guest_mem, 0x10000 * n) for n in (1, 2, 3)}
    # some traffic on each so the queue indices move
    for n, dq in queues.items():
        guest_mem.cpu.write(0x80000 + 0x100 * n, b"abcd")
        dq.add([Segment(0x80000 + 0x100 * n, 4)], [Segment(0x90000 + 0x100 * n, 4)])
        dq.publish()
        pf.vf(n).notify(0)
    full = ACK | DRIVER | FEATURES_OK | DRIVER_OK
    before = {
        n: (r(pf.vf(n), "device_status"), pf.vf(n).negotiated, pf.vf(n).queues[0].used_idx, pf.vf(n).queues[0].desc_addr)
        for n in (1, 3)
    }
    pf.flr_vf(2)
    assert flrs == [2]
    vf2 = pf.vf(2)
    assert r(vf2, "device_status") == 0 and vf2.negotiated == 0
    assert not vf2.queues[0].enabled and vf2.queues[0].used_idx == 0
    assert dict(made)[2].resets == 1
    for n in (1, 3):
        vf = pf.vf(n)
        assert r(vf, "device_status") == full
        assert (r(vf, "device_status"), vf.negotiated, vf.queues[0].used_idx, vf.queues[0].desc_addr) == before[n]
        assert dict(made)[n].resets == 0
        # and they keep working
        dq = queues[n]
        guest_mem.cpu.write(0xA0000 + 0x100 * n, b"more")
        dq.add([Segment(0xA0000 + 0x100 * n, 4)], [Segment(0xB0000 + 0x100 * n, 4)])
        dq.publish()
        vf.notify(0)
        assert guest_mem.read(0xB0000 + 0x100 * n, 4) == b"more"
    assert r(pf, "device_status") == 0 and pf.device.resets == 0  # the PF was not touched either


def test_pf_flr_disables_vfs_and_resets_pf(host_mem, guest_mem):
    pf = make_pf(host_mem)
    made: list = []
    seen: list[int] = []
    pf.add_sriov_listener(seen.append)
    pf.enable_vfs(2, factory_for(guest_mem, made))
    to_features_ok(pf, F_VERSION_1 | F_SR_IOV)
    pf.flr()
    assert pf.num_vfs == 0 and seen == [2, 0]
    assert r(pf, "device_status") == 0 and pf.device.resets == 1
    assert all(dev.resets == 1 for _, dev in made)
