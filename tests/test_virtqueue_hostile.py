"""Hostile driver input: one named test per malformed ring content.

Each test plants the malformed content with the driver queue's raw helpers,
then checks that pop() hands the typed error to on_error, marks the queue
broken, returns None (again and again), raises nothing, and wrote nothing
to memory.
"""

from __future__ import annotations

import pytest

from virtio_lm.errors import (
    AvailIndexError,
    ChainLengthError,
    DescriptorAddressError,
    DescriptorIndexError,
    DescriptorLoopError,
    DescriptorOrderError,
    FieldValueError,
    IndirectDescriptorError,
    MemoryAccessError,
    RingAddressError,
    VirtqueueError,
)
from virtio_lm.memory import Memory
from virtio_lm.virtqueue import MAX_INDIRECT_ENTRIES, Allocator, DriverQueue, Segment, Virtqueue
from virtio_lm.wire.ring import DescFlags, VirtqDesc, VirtqUsedElem

MEM = 1 << 20


@pytest.fixture(autouse=True, params=["walk", "one-pass"])
def walk_kind(request, monkeypatch):
    """Every case twice: indirect tables walked entry by entry, and with the one-pass walk tried
    first on every table (``fast_walk_min`` 1): both must refuse the same input the same way."""
    monkeypatch.setattr(Virtqueue, "fast_walk_min", None if request.param == "walk" else 1)
    return request.param

N = DescFlags.NEXT
W = DescFlags.WRITE
I = DescFlags.INDIRECT
R = DescFlags(0)


class Env:
    def __init__(self, size: int = 8, *, mem_size: int = MEM, event_idx: bool = False) -> None:
        self.mem = Memory(mem_size)
        self.alloc = Allocator(0, mem_size)
        self.dq = DriverQueue.allocate(self.mem.cpu, self.alloc, size, event_idx=event_idx)
        self.port = self.mem.device_port("dev")
        self.vq = Virtqueue(0, size, name="hostile")
        self.vq.desc_addr = self.dq.desc_addr
        self.vq.avail_addr = self.dq.avail_addr
        self.vq.used_addr = self.dq.used_addr
        self.vq.event_idx = event_idx
        self.vq.check_config(self.port)
        self.vq.enabled = True
        self.errors: list[VirtqueueError] = []
        self.vq.on_error = self.errors.append
        self.buf = self.alloc.alloc(4096)

    def table(self, descs: list[VirtqDesc]) -> int:
        addr = self.alloc.alloc(16 * len(descs))
        self.mem.cpu.write(addr, b"".join(d.encode() for d in descs))
        return addr

    def assert_rejected(self, err: type[VirtqueueError]) -> VirtqueueError:
        before = self.mem.array.copy()
        used_before = self.vq.used_idx
        last_before = self.vq.last_avail_idx
        chain = self.vq.pop(self.port)  # must not raise
        assert chain is None
        assert self.vq.broken
        assert len(self.errors) == 1
        assert type(self.errors[0]) is err, repr(self.errors[0])
        assert self.errors[0].queue == "hostile"
        # nothing written, nothing consumed
        assert (self.mem.array == before).all()
        assert self.vq.used_idx == used_before
        assert self.vq.last_avail_idx == last_before
        # stays broken and silent
        assert self.vq.pop(self.port) is None
        assert not self.vq.has_available(self.port)
        assert len(self.errors) == 1
        return self.errors[0]


def test_control_wellformed_chain_is_accepted():
    """Negative control for the planting helpers: a sound planted chain pops fine."""
    env = Env()
    env.dq.write_desc(0, VirtqDesc(env.buf, 16, N, 1))
    env.dq.write_desc(1, VirtqDesc(env.buf + 16, 16, W, 0))
    env.dq.put_avail(0)
    chain = env.vq.pop(env.port)
    assert chain is not None and not env.vq.broken and env.errors == []
    assert chain.readable == (Segment(env.buf, 16),) and chain.writable == (Segment(env.buf + 16, 16),)


def test_descriptor_loop_two_entries():
    env = Env()
    env.dq.write_desc(0, VirtqDesc(env.buf, 16, N, 1))
    env.dq.write_desc(1, VirtqDesc(env.buf, 16, N, 0))
    env.dq.put_avail(0)
    env.assert_rejected(DescriptorLoopError)


def test_descriptor_self_loop():
    env = Env()
    env.dq.write_desc(3, VirtqDesc(env.buf, 16, N, 3))
    env.dq.put_avail(3)
    env.assert_rejected(DescriptorLoopError)


@pytest.mark.slow  # 0.3 s or more: out of the one-minute fast subset (CI runs it)
def test_descriptor_loop_through_whole_large_queue_terminates():
    """A loop over every entry of a 32768-entry queue is still found (bounded walk)."""
    env = Env(32768, mem_size=4 << 20)
    raw = b"".join(VirtqDesc(env.buf, 1, N, (i + 1) % 32768).encode() for i in range(32768))
    env.mem.cpu.write(env.dq.desc_addr, raw)
    env.dq.put_avail(0)
    env.assert_rejected(DescriptorLoopError)


def test_descriptor_loop_in_indirect_table():
    env = Env()
    t = env.table([VirtqDesc(env.buf, 8, N, 1), VirtqDesc(env.buf, 8, N, 2), VirtqDesc(env.buf, 8, N, 0)])
    env.dq.write_desc(0, VirtqDesc(t, 48, I, 0))
    env.dq.put_avail(0)
    env.assert_rejected(DescriptorLoopError)


def test_next_index_beyond_queue_size():
    env = Env()
    env.dq.write_desc(0, VirtqDesc(env.buf, 16, N, 8))
    env.dq.put_avail(0)
    env.assert_rejected(DescriptorIndexError)


def test_next_index_beyond_indirect_table():
    env = Env()
    t = env.table([VirtqDesc(env.buf, 8, N, 1), VirtqDesc(env.buf, 8, N, 2)])
    env.dq.write_desc(0, VirtqDesc(t, 32, I, 0))
    env.dq.put_avail(0)
    env.assert_rejected(DescriptorIndexError)


def test_head_index_beyond_queue_size():
    env = Env()
    env.dq.put_avail(8)
    env.assert_rejected(DescriptorIndexError)


def test_address_plus_length_overflows_u64():
    env = Env()
    env.dq.write_desc(0, VirtqDesc((1 << 64) - 16, 32, R, 0))
    env.dq.put_avail(0)
    env.assert_rejected(DescriptorAddressError)


def test_buffer_outside_memory():
    env = Env()
    env.dq.write_desc(0, VirtqDesc(MEM - 10, 20, W, 0))
    env.dq.put_avail(0)
    env.assert_rejected(DescriptorAddressError)


def test_buffer_starting_past_memory_end():
    env = Env()
    env.dq.write_desc(0, VirtqDesc(MEM + 4096, 1, R, 0))
    env.dq.put_avail(0)
    env.assert_rejected(DescriptorAddressError)


def test_chain_length_over_u32_direct():
    """4096 descriptors of 1 MiB each (all of memory, legally addressed) add up to 2**32."""
    env = Env(4096, mem_size=MEM)
    raw = b"".join(
        VirtqDesc(0, MEM, N if i < 4095 else R, i + 1 if i < 4095 else 0).encode() for i in range(4096)
    )
    env.mem.cpu.write(env.dq.desc_addr, raw)
    env.dq.put_avail(0)
    env.assert_rejected(ChainLengthError)


def test_chain_length_over_u32_indirect():
    env = Env(mem_size=2 * MEM)
    n = 4097
    t = env.table([VirtqDesc(0, MEM, N | W, i + 1) for i in range(n - 1)] + [VirtqDesc(0, MEM, W, 0)])
    env.dq.write_desc(0, VirtqDesc(t, 16 * n, I, 0))
    env.dq.put_avail(0)
    env.assert_rejected(ChainLengthError)


def test_indirect_inside_indirect():
    env = Env()
    inner = env.table([VirtqDesc(env.buf, 8, R, 0)])
    outer = env.table([VirtqDesc(env.buf, 8, N, 1), VirtqDesc(inner, 16, I, 0)])
    env.dq.write_desc(0, VirtqDesc(outer, 32, I, 0))
    env.dq.put_avail(0)
    env.assert_rejected(IndirectDescriptorError)


def test_indirect_with_next():
    env = Env()
    t = env.table([VirtqDesc(env.buf, 8, R, 0)])
    env.dq.write_desc(0, VirtqDesc(t, 16, I | N, 1))
    env.dq.write_desc(1, VirtqDesc(env.buf, 8, W, 0))
    env.dq.put_avail(0)
    env.assert_rejected(IndirectDescriptorError)


def test_indirect_table_length_not_multiple_of_16():
    env = Env()
    t = env.table([VirtqDesc(env.buf, 8, R, 0), VirtqDesc(env.buf, 8, R, 0)])
    env.dq.write_desc(0, VirtqDesc(t, 24, I, 0))
    env.dq.put_avail(0)
    env.assert_rejected(IndirectDescriptorError)


def test_indirect_table_length_zero():
    env = Env()
    t = env.table([VirtqDesc(env.buf, 8, R, 0)])
    env.dq.write_desc(0, VirtqDesc(t, 0, I, 0))
    env.dq.put_avail(0)
    env.assert_rejected(IndirectDescriptorError)


def test_indirect_table_too_many_entries():
    env = Env()
    env.dq.write_desc(0, VirtqDesc(0, 16 * (MAX_INDIRECT_ENTRIES + 1), I, 0))
    env.dq.put_avail(0)
    env.assert_rejected(IndirectDescriptorError)


def test_indirect_table_outside_memory():
    env = Env()
    env.dq.write_desc(0, VirtqDesc(MEM - 16, 32, I, 0))
    env.dq.put_avail(0)
    env.assert_rejected(DescriptorAddressError)


def test_indirect_table_address_overflows_u64():
    env = Env()
    env.dq.write_desc(0, VirtqDesc((1 << 64) - 16, 32, I, 0))
    env.dq.put_avail(0)
    env.assert_rejected(DescriptorAddressError)


def test_indirect_when_feature_not_negotiated():
    env = Env()
    env.vq.indirect_desc = False
    t = env.table([VirtqDesc(env.buf, 8, R, 0)])
    env.dq.write_desc(0, VirtqDesc(t, 16, I, 0))
    env.dq.put_avail(0)
    env.assert_rejected(IndirectDescriptorError)


def test_readable_after_writable_direct():
    env = Env()
    env.dq.write_desc(0, VirtqDesc(env.buf, 8, W | N, 1))
    env.dq.write_desc(1, VirtqDesc(env.buf + 8, 8, R, 0))
    env.dq.put_avail(0)
    env.assert_rejected(DescriptorOrderError)


def test_readable_after_writable_indirect():
    env = Env()
    t = env.table([VirtqDesc(env.buf, 8, N, 1), VirtqDesc(env.buf, 8, W | N, 2), VirtqDesc(env.buf, 8, R, 0)])
    env.dq.write_desc(0, VirtqDesc(t, 48, I, 0))
    env.dq.put_avail(0)
    env.assert_rejected(DescriptorOrderError)


def test_readable_in_indirect_table_after_direct_writable():
    """The order rule spans a direct prefix and the indirect table it ends with."""
    env = Env()
    t = env.table([VirtqDesc(env.buf, 8, R, 0)])
    env.dq.write_desc(0, VirtqDesc(env.buf, 8, W | N, 1))
    env.dq.write_desc(1, VirtqDesc(t, 16, I, 0))
    env.dq.put_avail(0)
    env.assert_rejected(DescriptorOrderError)


def test_avail_idx_more_than_queue_size_ahead():
    env = Env()
    env.dq.write_desc(0, VirtqDesc(env.buf, 8, R, 0))
    env.dq.set_avail_idx(9)
    env.assert_rejected(AvailIndexError)


def test_avail_idx_behind_last_avail_idx():
    """An avail idx that went backwards reads as ~65535 ahead."""
    env = Env()
    env.vq.last_avail_idx = 5
    env.dq.set_avail_idx(4)
    env.assert_rejected(AvailIndexError)


def test_avail_idx_exactly_queue_size_ahead_is_accepted():
    """Boundary control: a full ring (size entries ahead) is legal."""
    env = Env(4)
    for i in range(4):
        env.dq.write_desc(i, VirtqDesc(env.buf, 8, R, 0))
        env.dq.put_avail(i)
    assert [c.head for c in env.vq.pop_all(env.port)] == [0, 1, 2, 3]
    assert not env.vq.broken


def test_rings_outside_memory_unchecked_config():
    """A queue enabled without check_config and pointing outside memory breaks, it does not raise."""
    env = Env()
    env.vq.avail_addr = MEM + 4096
    env.assert_rejected(RingAddressError)


def test_descriptor_table_outside_memory_unchecked_config():
    env = Env()
    env.vq.desc_addr = MEM - 32  # entry 0 and 1 inside, entry 2+ outside
    env.dq.put_avail(5)
    env.assert_rejected(RingAddressError)


def test_hostile_chain_after_good_ones_keeps_earlier_results():
    env = Env()
    env.dq.write_desc(0, VirtqDesc(env.buf, 8, W, 0))
    env.dq.write_desc(1, VirtqDesc(env.buf, 8, N, 1))
    env.dq.put_avail(0)
    env.dq.put_avail(1)
    chain = env.vq.pop(env.port)
    assert chain is not None
    env.vq.push(env.port, chain.head, 8)
    env.assert_rejected(DescriptorLoopError)
    # the good chain's completion is on the used ring, untouched by the rejection
    assert env.dq.used_idx() == 1
    elem = VirtqUsedElem.unpack_from(env.mem.read(env.dq.used_addr + 4, 8))
    assert elem == VirtqUsedElem(0, 8)


def test_push_on_rings_outside_memory_breaks_queue():
    env = Env()
    env.vq.used_addr = MEM + 4096
    env.vq.push(env.port, 0, 0)  # must not raise
    assert env.vq.broken and type(env.errors[0]) is RingAddressError
    assert isinstance(env.errors[0].__cause__, MemoryAccessError)


# ----------------------------------------------------------------- check_config
def _cfg(size: int = 8) -> tuple[Memory, Virtqueue]:
    mem = Memory(64 * 1024)
    vq = Virtqueue(1, 8)
    vq.size = size
    vq.desc_addr, vq.avail_addr, vq.used_addr = 0x1000, 0x2000, 0x3000
    return mem, vq


def test_check_config_accepts_sound_config():
    mem, vq = _cfg()
    vq.check_config(mem.device_port("d"))


def test_check_config_size_not_power_of_two():
    mem, vq = _cfg(6)
    with pytest.raises(FieldValueError) as ei:
        vq.check_config(mem.device_port("d"))
    assert ei.value.field == "size"


def test_check_config_size_above_max():
    mem, vq = _cfg(16)
    with pytest.raises(FieldValueError):
        vq.check_config(mem.device_port("d"))


def test_check_config_size_zero():
    mem, vq = _cfg(0)
    with pytest.raises(FieldValueError):
        vq.check_config(mem.device_port("d"))


@pytest.mark.parametrize(
    "field,addr", [("desc_addr", 0x1008), ("avail_addr", 0x2001), ("used_addr", 0x3002)]
)
def test_check_config_misaligned(field, addr):
    mem, vq = _cfg()
    setattr(vq, field, addr)
    with pytest.raises(FieldValueError) as ei:
        vq.check_config(mem.device_port("d"))
    assert ei.value.field == field


@pytest.mark.parametrize("field", ["desc_addr", "avail_addr", "used_addr"])
def test_check_config_part_outside_memory(field):
    mem, vq = _cfg()
    setattr(vq, field, 64 * 1024 - 16)  # aligned for every part, but the part runs off the end
    with pytest.raises(MemoryAccessError):
        vq.check_config(mem.device_port("d"))


def test_check_config_event_idx_tail_counts():
    """With EVENT_IDX the used ring's avail_event must fit too."""
    mem, vq = _cfg()
    vq.used_addr = 64 * 1024 - (4 + 8 * 8)  # fits exactly without avail_event
    vq.check_config(mem.device_port("d"))
    vq.event_idx = True
    with pytest.raises(MemoryAccessError):
        vq.check_config(mem.device_port("d"))
