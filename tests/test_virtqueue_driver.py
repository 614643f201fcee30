"""Driver side of the split virtqueue: allocator, descriptor accounting, used ring checks, planting helpers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio_lm.errors import AllocationError, DriverError, QueueFullError, UsedRingError
from virtio_lm.memory import Memory
from virtio_lm.virtqueue import Allocator, DriverQueue, Segment
from virtio_lm.wire.codec import read_u16, u16
from virtio_lm.wire.ring import (
    DescFlags,
    VirtqDesc,
    VirtqUsedElem,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)

MEM = 1 << 20


# ----------------------------------------------------------------- allocator
def test_allocator_alignment_and_bounds():
    a = Allocator(0x1000, 0x1000)
    x = a.alloc(3, 1)
    y = a.alloc(10, 64)
    z = a.alloc(100, 16)
    assert x == 0x1000 and y % 64 == 0 and z % 16 == 0
    spans = sorted([(x, 3), (y, 10), (z, 100)])
    for (s1, l1), (s2, _) in zip(spans, spans[1:]):
        assert s1 + l1 <= s2
    assert all(0x1000 <= s and s + l <= 0x2000 for s, l in spans)


def test_allocator_exhaustion():
    a = Allocator(0, 256)
    a.alloc(200)
    with pytest.raises(AllocationError):
        a.alloc(100)


def test_allocator_free_coalesces_back_to_one_range():
    a = Allocator(0, 4096)
    addrs = [a.alloc(100, 1) for _ in range(30)]
    for addr in addrs[::2] + addrs[1::2]:
        a.free(addr)
    assert a.free_bytes() == 4096 and a.allocated() == 0
    assert a.alloc(4096, 1) == 0  # one range again: the whole region fits


def test_allocator_double_free_and_bad_free():
    a = Allocator(0, 4096)
    x = a.alloc(64)
    a.free(x)
    with pytest.raises(AllocationError):
        a.free(x)
    with pytest.raises(AllocationError):
        a.free(12345)


def test_allocator_bad_arguments():
    a = Allocator(0, 4096)
    with pytest.raises(AllocationError):
        a.alloc(0)
    with pytest.raises(AllocationError):
        a.alloc(16, 24)
    with pytest.raises(AllocationError):
        Allocator(0, 0)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 300), st.sampled_from([1, 2, 8, 16, 64, 4096])), max_size=60))
def test_allocator_random_never_overlaps(ops):
    a = Allocator(4096, 64 * 1024)
    live: dict[int, int] = {}
    for do_free, size, align in ops:
        if do_free and live:
            addr = next(iter(live))
            a.free(addr)
            del live[addr]
            continue
        try:
            addr = a.alloc(size, align)
        except AllocationError:
            continue
        assert addr % align == 0 and 4096 <= addr and addr + size <= 4096 + 64 * 1024
        for s, l in live.items():
            assert addr + size <= s or s + l <= addr
        live[addr] = size
    # alignment gaps stay free ranges: nothing is lost
    assert a.free_bytes() == 64 * 1024 - sum(live.values())
    for addr in list(live):
        a.free(addr)
    assert a.free_bytes() == 64 * 1024 and a.alloc(64 * 1024, 1) == 4096


# ----------------------------------------------------------------- queue layout
def test_allocate_places_aligned_non_overlapping_zeroed_rings():
    mem = Memory(MEM)
    mem.cpu.fill(0, MEM, 0xAA)
    a = Allocator(0x100, MEM - 0x100)
    dq = DriverQueue.allocate(mem.cpu, a, 64, event_idx=True)
    assert dq.desc_addr % 16 == 0 and dq.avail_addr % 2 == 0 and dq.used_addr % 4 == 0
    parts = sorted(
        [(dq.desc_addr, desc_table_size(64)), (dq.avail_addr, avail_ring_size(64)), (dq.used_addr, used_ring_size(64))]
    )
    for (s1, l1), (s2, _) in zip(parts, parts[1:]):
        assert s1 + l1 <= s2
    for s, l in parts:
        assert mem.read(s, l) == bytes(l)


def test_misaligned_ring_address_refused():
    mem = Memory(MEM)
    with pytest.raises(DriverError):
        DriverQueue(mem.cpu, 8, 0x1008, 0x2000, 0x3000)
    with pytest.raises(DriverError):
        DriverQueue(mem.cpu, 8, 0x1000, 0x2001, 0x3000)
    with pytest.raises(DriverError):
        DriverQueue(mem.cpu, 8, 0x1000, 0x2000, 0x3002)


def make(size: int = 8, **kw) -> tuple[Memory, Allocator, DriverQueue]:
    mem = Memory(MEM)
    a = Allocator(0, MEM)
    return mem, a, DriverQueue.allocate(mem.cpu, a, size, **kw)


# ----------------------------------------------------------------- descriptors
def test_direct_chain_descriptors_written_as_linked_list():
    mem, a, dq = make()
    head = dq.add([Segment(0x10000, 10), Segment(0x10010, 20)], [Segment(0x20000, 30)])
    d = [VirtqDesc.unpack_from(mem.read(dq.desc_addr + 16 * i, 16)) for i in range(8)]
    first = d[head]
    assert (first.addr, first.len, int(first.flags)) == (0x10000, 10, int(DescFlags.NEXT))
    second = d[first.next]
    assert (second.addr, second.len, int(second.flags)) == (0x10010, 20, int(DescFlags.NEXT))
    third = d[second.next]
    assert (third.addr, third.len, int(third.flags)) == (0x20000, 30, int(DescFlags.WRITE))
    assert dq.num_free() == 5


def test_add_is_invisible_until_publish():
    mem, a, dq = make()
    dq.add([Segment(0x10000, 1)], [])
    assert read_u16(mem.read(dq.avail_addr + 2, 2)) == 0
    dq.publish()
    assert read_u16(mem.read(dq.avail_addr + 2, 2)) == 1
    assert read_u16(mem.read(dq.avail_addr + 4, 2)) == 0  # ring[0] = head 0


def test_queue_full_direct():
    mem, a, dq = make(4)
    dq.add([Segment(0x10000, 1)] * 3, [])
    with pytest.raises(QueueFullError):
        dq.add([Segment(0x10000, 1)], [Segment(0x10000, 1)])
    assert dq.num_free() == 1  # the refused add took nothing
    dq.add([Segment(0x10000, 1)], [])
    with pytest.raises(QueueFullError):
        dq.add([Segment(0x10000, 1)], [], indirect=True)


def test_indirect_uses_one_descriptor_and_frees_its_table():
    mem, a, dq = make(4)
    before = a.free_bytes()
    head = dq.add([Segment(0x10000, 4)] * 10, [Segment(0x20000, 4)] * 10, indirect=True, token="big")
    assert dq.num_free() == 3
    assert a.free_bytes() == before - 20 * 16
    d = VirtqDesc.unpack_from(mem.read(dq.desc_addr + 16 * head, 16))
    assert int(d.flags) == int(DescFlags.INDIRECT) and d.len == 20 * 16
    dq.publish()
    # play device: return it
    mem.cpu.write(dq.used_addr + 4, VirtqUsedElem(head, 40).encode())
    mem.cpu.write(dq.used_addr + 2, u16(1))
    assert dq.get_used() == ("big", 40)
    assert dq.num_free() == 4 and a.free_bytes() == before


def test_indirect_without_allocator_refused():
    mem = Memory(MEM)
    dq = DriverQueue(mem.cpu, 8, 0x1000, 0x2000, 0x3000)
    with pytest.raises(DriverError):
        dq.add([Segment(0x10000, 1)], [], indirect=True)


def test_empty_chain_refused():
    mem, a, dq = make()
    with pytest.raises(DriverError):
        dq.add([], [])


# ----------------------------------------------------------------- used ring checks
def _used(mem: Memory, dq: DriverQueue, slot: int, head: int, length: int, idx: int) -> None:
    mem.cpu.write(dq.used_addr + 4 + 8 * slot, VirtqUsedElem(head, length).encode())
    mem.cpu.write(dq.used_addr + 2, u16(idx))


def test_used_entry_naming_a_head_not_in_flight():
    mem, a, dq = make()
    dq.add([Segment(0x10000, 1)], [])
    dq.publish()
    _used(mem, dq, 0, 5, 0, 1)
    with pytest.raises(UsedRingError):
        dq.get_used()


def test_used_idx_too_far_ahead():
    mem, a, dq = make()
    _used(mem, dq, 0, 0, 0, 9)
    with pytest.raises(UsedRingError):
        dq.get_used()


def test_same_head_returned_twice_refused():
    mem, a, dq = make()
    head = dq.add([Segment(0x10000, 1)], [], token="t")
    dq.publish()
    _used(mem, dq, 0, head, 0, 1)
    assert dq.get_used() == ("t", 0)
    _used(mem, dq, 1, head, 0, 2)
    with pytest.raises(UsedRingError):
        dq.get_used()


def test_get_used_empty_returns_none():
    mem, a, dq = make()
    assert dq.get_used() is None and dq.get_all_used() == []


# ----------------------------------------------------------------- planting helpers
def test_planting_helpers_write_raw_ring_content():
    mem, a, dq = make()
    dq.write_desc(7, VirtqDesc(0xDEAD, 3, DescFlags.NEXT | DescFlags.INDIRECT, 9))
    raw = VirtqDesc.unpack_from(mem.read(dq.desc_addr + 7 * 16, 16))
    assert (raw.addr, raw.len, int(raw.flags), raw.next) == (0xDEAD, 3, 5, 9)
    dq.set_avail_idx(65535)
    dq.put_avail(40000)
    assert read_u16(mem.read(dq.avail_addr + 4 + 2 * (65535 % 8), 2)) == 40000
    assert read_u16(mem.read(dq.avail_addr + 2, 2)) == 0  # wrapped
    with pytest.raises(DriverError):
        dq.write_desc(8, VirtqDesc(0, 0))


def test_set_start_index_writes_both_rings():
    mem, a, dq = make(event_idx=True)
    dq.set_start_index(65530)
    assert read_u16(mem.read(dq.avail_addr + 2, 2)) == 65530
    assert read_u16(mem.read(dq.used_addr + 2, 2)) == 65530
    assert dq.get_used() is None
    dq.add([Segment(0x10000, 1)], [])
    with pytest.raises(DriverError):
        dq.set_start_index(0)


def test_allocator_clone_is_independent() -> None:
    a = Allocator(0x1000, 0x1000)
    x = a.alloc(0x100)
    b = a.clone()
    y = b.alloc(0x200)
    b.free(x)
    assert a.allocated() == 1 and b.allocated() == 1 and a.free_bytes() == 0x1000 - 0x100
    with pytest.raises(AllocationError):
        a.free(y)  # never allocated from a
    a.free(x)
    assert a.free_bytes() == 0x1000 and b.free_bytes() == 0x1000 - 0x200


def test_driver_queue_clone_is_independent_and_rebound() -> None:
    mem, alloc, dq = make(8)
    buf = alloc.alloc(64)
    dq.add([Segment(buf, 16)], [], token="a")
    c = dq.clone(None, None)
    assert (c.port, c.alloc) == (None, None) and (dq.port, dq.alloc) == (mem.cpu, alloc)
    c2 = c.clone(mem.cpu, alloc)
    c2.add([Segment(buf, 8)], [Segment(buf + 16, 8)], token="b")
    assert dq.in_flight() == 1 and c.in_flight() == 1 and c2.in_flight() == 2
    assert dq.num_free() == 7 and c2.num_free() == 5
