"""The one-pass walk of an indirect table (``Virtqueue.fast_walk_min``, ``_linear_table``).

It is an optimisation only: for every table, the chain it returns, or the typed error the queue
breaks with, must be exactly what the entry-by-entry walk gives.  The property test below plants
random tables (mostly near-linear, with one or two faults of every kind the walk checks) and pops
each with both walks; the named tests pin the cases the one pass must hand back to the walk.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtio_lm.errors import VirtqueueError
from virtio_lm.memory import Memory
from virtio_lm.virtqueue import Allocator, DriverQueue, Segment, Virtqueue
from virtio_lm.virtqueue.device import FAST_WALK_MIN
from virtio_lm.wire.ring import DescFlags, VirtqDesc

MEM = 1 << 20
N = int(DescFlags.NEXT)
W = int(DescFlags.WRITE)
I = int(DescFlags.INDIRECT)
U64 = (1 << 64) - 1


def _queue(mem: Memory, fast_min: int | None) -> tuple[DriverQueue, Virtqueue, list[VirtqueueError]]:
    alloc = Allocator(0, 64 << 10)  # rings low; tables are written at TABLE
    dq = DriverQueue.allocate(mem.cpu, alloc, 8)
    vq = Virtqueue(0, 8, name="fast")
    vq.fast_walk_min = fast_min
    vq.desc_addr, vq.avail_addr, vq.used_addr = dq.desc_addr, dq.avail_addr, dq.used_addr
    vq.check_config(mem.device_port("dev"))
    vq.enabled = True
    errors: list[VirtqueueError] = []
    vq.on_error = errors.append
    return dq, vq, errors


TABLE = 128 << 10


def pop_table(entries: list[tuple[int, int, int, int]], fast_min: int | None) -> tuple[object, int]:
    """Plant ``entries`` (addr, len, flags, next) as the indirect table of chain 0 and pop it.
    Returns the outcome -- the chain, or ``(error type, message)`` -- and the one-pass count."""
    mem = Memory(MEM)
    try:
        dq, vq, errors = _queue(mem, fast_min)
        raw = b"".join(VirtqDesc(a, n, DescFlags(f), x).encode() for a, n, f, x in entries)
        mem.cpu.write(TABLE, raw)
        dq.write_desc(0, VirtqDesc(TABLE, len(raw), DescFlags.INDIRECT, 0))
        dq.put_avail(0)
        chain = vq.pop(mem.device_port("dev"))
        if chain is None:
            assert vq.broken and len(errors) == 1
            return (type(errors[0]), str(errors[0])), vq.fast_walks
        return chain, vq.fast_walks
    finally:
        mem.close()


def linear(n: int, writable_from: int, addr: int = 0x4_0000, length: int = 512) -> list[tuple[int, int, int, int]]:
    """A driver's table: ``n`` entries 0 -> 1 -> ... -> n-1, writable from ``writable_from``."""
    return [
        (addr + length * i, length, (N if i + 1 < n else 0) | (W if i >= writable_from else 0), i + 1 if i + 1 < n else 0)
        for i in range(n)
    ]


def both(entries: list[tuple[int, int, int, int]]) -> tuple[object, object, int]:
    """Pop the table with the walk alone and with the one pass tried first on any length."""
    slow, slow_fast = pop_table(entries, None)
    fast, fast_count = pop_table(entries, 1)
    assert slow_fast == 0
    return slow, fast, fast_count


# ----------------------------------------------------------------- the path is taken, and agrees
def test_a_driver_built_table_takes_the_one_pass_and_matches_the_walk():
    mem = Memory(MEM)
    try:
        alloc = Allocator(0, MEM)
        dq = DriverQueue.allocate(mem.cpu, alloc, 8)
        buf = alloc.alloc(128 * 4096)
        readable = [Segment(buf, 16)]
        writable = [Segment(buf + 4096 * (i + 1), 4096) for i in range(125)] + [Segment(buf + 16, 1)]
        chains = {}
        for fast_min in (None, FAST_WALK_MIN):
            vq = Virtqueue(0, 8, name="fast")
            vq.fast_walk_min = fast_min
            vq.desc_addr, vq.avail_addr, vq.used_addr = dq.desc_addr, dq.avail_addr, dq.used_addr
            vq.enabled = True
            vq.last_avail_idx = dq.avail_idx
            dq.add(readable, writable, indirect=True)
            dq.publish()
            chains[fast_min] = chain = vq.pop(mem.device_port("dev"))
            assert chain is not None and not vq.broken
            assert vq.fast_walks == (0 if fast_min is None else 1)
        slow, fast = chains[None], chains[FAST_WALK_MIN]
        assert (fast.readable, fast.writable) == (tuple(readable), tuple(writable))
        assert (fast.readable_len, fast.writable_len, fast.indirect) == (16, 125 * 4096 + 1, True)
        assert (fast.readable, fast.writable, fast.readable_len, fast.writable_len) == (
            slow.readable, slow.writable, slow.readable_len, slow.writable_len)
        assert all(type(s) is Segment for s in fast.readable + fast.writable)
    finally:
        mem.close()


def test_a_table_shorter_than_the_threshold_is_walked():
    entries = linear(FAST_WALK_MIN - 1, 3)
    chain, count = pop_table(entries, FAST_WALK_MIN)
    assert count == 0 and not isinstance(chain, tuple)
    chain, count = pop_table(linear(FAST_WALK_MIN, 3), FAST_WALK_MIN)
    assert count == 1 and len(chain.readable) == 3 and len(chain.writable) == FAST_WALK_MIN - 3


def test_entries_after_the_chain_end_are_left_to_the_walk():
    """A table longer than its chain (garbage past the entry without NEXT) is sound; the one
    pass takes only tables that are exactly the chain, so the walk takes this one."""
    entries = linear(20, 5) + [(U64, 99, N | I, 7)] * 4
    slow, fast, count = both(entries)
    assert count == 0 and slow == fast and len(fast.writable) == 15


def test_an_unknown_flag_bit_is_left_to_the_walk():
    entries = linear(20, 5)
    entries[3] = entries[3][:2] + (entries[3][2] | 0x8000,) + entries[3][3:]
    slow, fast, count = both(entries)
    assert count == 0 and slow == fast and not isinstance(slow, tuple)


# ----------------------------------------------------------------- tables the one pass hands back
# (the first is sound -- 5 -> 9 skips three entries -- the others are faults the walk names)
HANDED_BACK = {
    "next-not-the-following-entry": lambda t: t.__setitem__(5, t[5][:3] + (9,)),
    "loop-back": lambda t: t.__setitem__(10, t[10][:3] + (2,)),
    "next-beyond-the-table": lambda t: t.__setitem__(19, (t[19][0], t[19][1], t[19][2] | N, 20)),
    "indirect-inside": lambda t: t.__setitem__(4, (t[4][0], 16, t[4][2] | I, t[4][3])),
    "buffer-past-memory": lambda t: t.__setitem__(7, (MEM - 100, 101, t[7][2], t[7][3])),
    "buffer-at-memory-end": lambda t: t.__setitem__(7, (MEM, 1, t[7][2], t[7][3])),
    "addr-plus-len-overflows-u64": lambda t: t.__setitem__(7, (U64 - 10, 100, t[7][2], t[7][3])),
    "readable-after-writable": lambda t: t.__setitem__(12, (t[12][0], t[12][1], t[12][2] & ~W, t[12][3])),
    "longer-than-u32": lambda t: [t.__setitem__(i, (0, 0x1000_0000, t[i][2], t[i][3])) for i in range(17)],
}


@pytest.mark.parametrize("fault", sorted(HANDED_BACK))
def test_a_faulty_table_is_refused_the_same_way(fault):
    entries = linear(20, 8)
    HANDED_BACK[fault](entries)
    slow, fast, count = both(entries)
    assert count == 0, "the one pass accepted a table it must hand back"
    if fault == "next-not-the-following-entry":  # a sound chain, only not in table order: the walk takes it
        assert not isinstance(slow, tuple) and len(slow.readable) + len(slow.writable) == 17
    else:
        assert isinstance(slow, tuple) and issubclass(slow[0], VirtqueueError), slow
    assert fast == slow


def test_a_buffer_ending_exactly_at_memory_end_is_accepted_by_both():
    entries = linear(20, 8)
    entries[7] = (MEM - 100, 100, entries[7][2], entries[7][3])
    slow, fast, count = both(entries)
    assert count == 1 and slow == fast


def test_negative_control_the_comparison_sees_a_wrong_chain(monkeypatch):
    """A one pass that got the split wrong would be caught: the comparison is not vacuous."""
    from virtio_lm.virtqueue import device

    real = device._linear_table

    def off_by_one(table, mem_size):
        got = real(table, mem_size)
        if got is None:
            return None
        r, w, rl, wl = got
        return r + w[:1], w[1:], rl + w[0].len, wl - w[0].len

    monkeypatch.setattr(device, "_linear_table", off_by_one)
    slow, fast, count = both(linear(20, 8))
    assert count == 1 and slow != fast


# ----------------------------------------------------------------- the property
_addr = st.one_of(st.integers(0x4_0000, 0x8_0000), st.integers(MEM - 600, MEM + 2), st.integers(U64 - 600, U64))
_len = st.one_of(st.integers(0, 4096), st.integers(0x7FFF_FF00, 0xFFFF_FFFF))


@st.composite
def tables(draw):
    n = draw(st.integers(1, 40))
    entries = linear(n, draw(st.integers(0, n)))
    for _ in range(draw(st.integers(0, 3))):  # a few faults anywhere
        i = draw(st.integers(0, n - 1))
        a, ln, f, x = entries[i]
        kind = draw(st.sampled_from(["addr", "len", "flags", "next"]))
        if kind == "addr":
            a = draw(_addr)
        elif kind == "len":
            ln = draw(_len)
        elif kind == "flags":
            f = draw(st.integers(0, 7))
        else:
            x = draw(st.integers(0, n + 1))
        entries[i] = (a, ln, f, x)
    return entries


@pytest.mark.slow  # over 0.4 s: out of the one-minute fast subset (CI runs it)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tables())
def test_the_one_pass_and_the_walk_agree_on_every_table(entries):
    slow, fast, count = both(entries)
    assert fast == slow
    if count:  # what the one pass accepted, the walk accepted too
        assert not isinstance(slow, tuple)
