"""Device side of the split virtqueue, driven by our driver queue: round trips, wraparound,
EVENT_IDX, notification suppression, dirty tracking of device writes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio_lm.errors import ChainSpaceError, VirtqueueError
from virtio_lm.memory import PAGE_SHIFT, Memory
from virtio_lm.virtqueue import Allocator, DescriptorChain, DriverQueue, Segment, Virtqueue

MEM = 1 << 20


class Pair:
    """A driver queue (CPU port) and the device queue (a device port) on one memory."""

    def __init__(self, size: int = 8, *, event_idx: bool = False, mem_size: int = MEM) -> None:
        self.mem = Memory(mem_size)
        self.alloc = Allocator(0, mem_size)
        self.dq = DriverQueue.allocate(self.mem.cpu, self.alloc, size, event_idx=event_idx)
        self.port = self.mem.device_port("dev")
        self.vq = Virtqueue(0, size, name="vq")
        self.vq.desc_addr = self.dq.desc_addr
        self.vq.avail_addr = self.dq.avail_addr
        self.vq.used_addr = self.dq.used_addr
        self.vq.event_idx = event_idx
        self.vq.check_config(self.port)
        self.vq.enabled = True
        self.errors: list[VirtqueueError] = []
        self.vq.on_error = self.errors.append
        self.irqs = 0

        def irq() -> None:
            self.irqs += 1

        self.vq.interrupt = irq

    def start_at(self, idx: int) -> None:
        self.dq.set_start_index(idx)
        self.vq.last_avail_idx = idx
        self.vq.used_idx = idx

    def buffer(self, data: bytes) -> Segment:
        addr = self.alloc.alloc(max(1, len(data)), 1)
        self.mem.cpu.write(addr, data)
        return Segment(addr, len(data))

    def space(self, n: int) -> Segment:
        addr = self.alloc.alloc(max(1, n), 1)
        self.mem.cpu.fill(addr, max(1, n), 0)
        return Segment(addr, n)


def echo_upper(pair: Pair, chain: DescriptorChain) -> int:
    """A toy device: write the readable bytes, upper-cased, into the writable part."""
    data = chain.read(pair.port).upper()
    n = min(len(data), chain.writable_len)
    return chain.write(pair.port, data[:n])


def test_round_trip_many_chains_with_wraparound_and_mixed_indirect():
    pair = Pair(16)
    pair.start_at(65530)
    sent: dict[int, tuple[bytes, Segment]] = {}
    indirect_of_head: dict[int, bool] = {}
    seq = 0
    for batch in range(12):
        for _ in range(3):
            payload = f"chain-{seq}-".encode() * (1 + seq % 3)
            pieces = [payload[i : i + 11] for i in range(0, len(payload), 11)]
            out = pair.space(len(payload))
            head = pair.dq.add([pair.buffer(p) for p in pieces], [out], indirect=bool(seq % 2), token=seq)
            indirect_of_head[head] = bool(seq % 2)
            sent[seq] = (payload, out)
            seq += 1
        pair.dq.publish()
        chains = pair.vq.pop_all(pair.port)
        assert len(chains) == 3
        for chain in chains:
            assert chain.indirect == indirect_of_head.pop(chain.head)
            pair.vq.push(pair.port, chain.head, echo_upper(pair, chain))
        assert pair.vq.notify_driver(pair.port)
        for token, written in pair.dq.get_all_used():
            payload, out = sent.pop(token)
            assert written == len(payload)
            assert pair.mem.read(out.addr, out.len) == payload.upper()
    assert not sent and pair.errors == [] and pair.irqs == 12
    # indices wrapped past 65535
    assert pair.vq.used_idx == (65530 + 36) & 0xFFFF == pair.dq.last_used_idx == 30
    assert pair.vq.last_avail_idx == pair.dq.avail_idx == 30
    assert pair.dq.num_free() == 16


def test_chain_contents_match_what_the_driver_added():
    pair = Pair(16)
    r = [pair.buffer(b"a" * 3), pair.buffer(b"b" * 5)]
    w = [pair.space(4), pair.space(6), pair.space(2)]
    head = pair.dq.add(r, w, token="x")
    pair.dq.publish()
    chain = pair.vq.pop(pair.port)
    assert chain is not None and chain.head == head and chain.avail_idx == 0
    assert chain.readable == tuple(r) and chain.writable == tuple(w)
    assert chain.readable_len == 8 and chain.writable_len == 12
    assert chain.read(pair.port) == b"aaabbbbb"
    assert chain.read_range(pair.port, 2, 3) == b"abb"
    assert not chain.indirect
    assert pair.vq.pop(pair.port) is None


def test_indirect_chain_contents():
    pair = Pair(4)
    r = [pair.buffer(b"hdr!"), pair.buffer(b"data")]
    w = [pair.space(3)]
    head = pair.dq.add(r, w, indirect=True, token=1)
    assert pair.dq.num_free() == 3  # one descriptor for the whole chain
    pair.dq.publish()
    chain = pair.vq.pop(pair.port)
    assert chain.head == head and chain.indirect
    assert chain.readable == tuple(r) and chain.writable == tuple(w)


def test_write_scatters_across_segments_from_offset():
    pair = Pair()
    w = [pair.space(3), pair.space(4), pair.space(5)]
    pair.dq.add([], w)
    pair.dq.publish()
    chain = pair.vq.pop(pair.port)
    assert chain.write(pair.port, b"ABCDEF", offset=2) == 6
    got = b"".join(pair.mem.read(s.addr, s.len) for s in w)
    assert got == b"\0\0ABCDEF\0\0\0\0"


def test_write_beyond_writable_part_refused_and_writes_nothing():
    pair = Pair()
    w = [pair.space(4), pair.space(4)]
    pair.dq.add([pair.buffer(b"r")], w)
    pair.dq.publish()
    chain = pair.vq.pop(pair.port)
    before = pair.mem.array.copy()
    with pytest.raises(ChainSpaceError):
        chain.write(pair.port, b"x" * 7, offset=2)
    with pytest.raises(ChainSpaceError):
        chain.write(pair.port, b"x", offset=-1)
    assert (pair.mem.array == before).all()
    assert chain.write(pair.port, b"x" * 6, offset=2) == 6  # exactly fits


def test_read_range_beyond_readable_part_refused():
    pair = Pair()
    pair.dq.add([pair.buffer(b"abc"), pair.buffer(b"de")], [])
    pair.dq.publish()
    chain = pair.vq.pop(pair.port)
    assert chain.read_range(pair.port, 0, 5) == b"abcde"
    assert chain.read_range(pair.port, 5, 0) == b""
    with pytest.raises(ChainSpaceError):
        chain.read_range(pair.port, 3, 3)


def test_pop_on_disabled_queue_returns_none():
    pair = Pair()
    pair.dq.add([pair.buffer(b"x")], [])
    pair.dq.publish()
    pair.vq.enabled = False
    assert pair.vq.pop(pair.port) is None and not pair.vq.has_available(pair.port)
    pair.vq.enabled = True
    assert pair.vq.has_available(pair.port)
    assert pair.vq.pop(pair.port) is not None
    assert not pair.vq.has_available(pair.port)


def test_avail_idx_read_once_per_batch_but_new_chains_are_seen():
    pair = Pair()
    for i in range(2):
        pair.dq.add([pair.buffer(b"x")], [], token=i)
    pair.dq.publish()
    assert pair.vq.pop(pair.port) is not None
    # added after the device read the idx: still found once the cached batch is used up
    pair.dq.add([pair.buffer(b"y")], [], token=2)
    pair.dq.publish()
    assert pair.vq.pop(pair.port) is not None
    assert pair.vq.pop(pair.port) is not None
    assert pair.vq.pop(pair.port) is None


def test_setting_last_avail_idx_drops_cached_avail_idx():
    pair = Pair()
    pair.dq.add([pair.buffer(b"x")], [])
    pair.dq.publish()
    assert pair.vq.has_available(pair.port)
    pair.vq.pop(pair.port)
    pair.vq.last_avail_idx = 0  # e.g. a restore that rewinds to re-take the chain
    chain = pair.vq.pop(pair.port)
    assert chain is not None and chain.avail_idx == 0


def test_reset_returns_to_unconfigured():
    pair = Pair()
    pair.start_at(100)
    pair.vq.broken = True
    pair.vq.reset()
    vq = pair.vq
    assert (vq.size, vq.desc_addr, vq.avail_addr, vq.used_addr) == (8, 0, 0, 0)
    assert (vq.last_avail_idx, vq.used_idx, vq.broken, vq.enabled, vq.event_idx) == (0, 0, False, False, False)
    assert vq.signalled_used is None and vq.indirect_desc


# ----------------------------------------------------------------- interrupts
def test_no_interrupt_flag_suppresses_interrupts():
    pair = Pair()
    pair.dq.set_interrupts(False)
    pair.dq.add([pair.buffer(b"x")], [])
    pair.dq.publish()
    c = pair.vq.pop(pair.port)
    pair.vq.push(pair.port, c.head, 0)
    assert not pair.vq.notify_driver(pair.port) and pair.irqs == 0
    # control: with interrupts enabled the same sequence interrupts
    pair.dq.set_interrupts(True)
    pair.dq.get_all_used()
    pair.dq.add([pair.buffer(b"x")], [])
    pair.dq.publish()
    c = pair.vq.pop(pair.port)
    pair.vq.push(pair.port, c.head, 0)
    assert pair.vq.notify_driver(pair.port) and pair.irqs == 1


def test_notify_without_new_used_entries_does_nothing():
    pair = Pair()
    assert not pair.vq.notify_driver(pair.port)
    pair.dq.add([pair.buffer(b"x")], [])
    pair.dq.publish()
    c = pair.vq.pop(pair.port)
    pair.vq.push(pair.port, c.head, 0)
    assert pair.vq.notify_driver(pair.port)
    assert not pair.vq.notify_driver(pair.port)
    assert pair.irqs == 1


def _complete(pair: Pair, n: int) -> list[bool]:
    """Add n chains; the device completes them one at a time, notifying after each."""
    for _ in range(n):
        pair.dq.add([pair.buffer(b"x")], [])
    pair.dq.publish()
    fired = []
    for _ in range(n):
        c = pair.vq.pop(pair.port)
        pair.vq.push(pair.port, c.head, 0)
        fired.append(pair.vq.notify_driver(pair.port))
    return fired


def test_event_idx_interrupts_only_when_used_event_is_crossed():
    pair = Pair(8, event_idx=True)
    pair.vq.signalled_used = 0  # a known starting point
    pair.dq.set_used_event(3)  # "interrupt me once entry 3 is used"
    assert _complete(pair, 6) == [False, False, False, True, False, False]
    assert pair.irqs == 1


def test_event_idx_first_notify_after_reset_always_interrupts():
    pair = Pair(8, event_idx=True)
    pair.dq.set_used_event(5)
    assert _complete(pair, 2) == [True, False]


def test_event_idx_driver_reaping_rearms_interrupt():
    pair = Pair(8, event_idx=True)
    assert _complete(pair, 1) == [True]
    pair.dq.get_all_used()  # writes used_event = 1
    assert _complete(pair, 2) == [True, False]


def test_event_idx_interrupts_disabled_by_driver():
    pair = Pair(8, event_idx=True)
    assert _complete(pair, 1) == [True]
    pair.dq.set_interrupts(False)
    pair.dq.get_all_used()
    assert _complete(pair, 4) == [False] * 4
    pair.dq.set_interrupts(True)
    pair.dq.get_all_used()
    assert _complete(pair, 1) == [True]


def test_event_idx_across_u16_wrap():
    pair = Pair(8, event_idx=True)
    pair.start_at(65533)
    pair.vq.signalled_used = 65533
    pair.dq.set_used_event(1)  # entry 1 after the wrap: used idx 65534, 65535, 0, 1, 2
    assert _complete(pair, 5) == [False, False, False, False, True]


# ----------------------------------------------------------------- driver notifications
def test_no_notify_flag_and_kick_needed():
    pair = Pair()
    pair.dq.add([pair.buffer(b"x")], [])
    pair.dq.publish()
    assert pair.dq.kick_needed()
    assert not pair.dq.kick_needed()  # nothing new published
    pair.vq.set_notification(pair.port, False)
    pair.dq.add([pair.buffer(b"x")], [])
    pair.dq.publish()
    assert not pair.dq.kick_needed()
    pair.vq.set_notification(pair.port, True)
    pair.dq.add([pair.buffer(b"x")], [])
    pair.dq.publish()
    assert pair.dq.kick_needed()


def test_event_idx_kick_only_when_device_caught_up():
    pair = Pair(8, event_idx=True)
    pair.dq.add([pair.buffer(b"x")], [])
    pair.dq.publish()
    assert pair.dq.kick_needed()  # avail_event 0 crossed
    pair.dq.add([pair.buffer(b"x")], [])
    pair.dq.publish()
    assert not pair.dq.kick_needed()  # device has not taken the first yet
    assert len(pair.vq.pop_all(pair.port)) == 2  # device writes avail_event = 2
    pair.dq.add([pair.buffer(b"x")], [])
    pair.dq.publish()
    assert pair.dq.kick_needed()


def test_event_idx_set_notification_off_and_on():
    pair = Pair(8, event_idx=True)
    pair.vq.set_notification(pair.port, False)
    for _ in range(3):
        pair.dq.add([pair.buffer(b"x")], [])
        pair.dq.publish()
        assert not pair.dq.kick_needed()
    pair.vq.pop_all(pair.port)  # while disabled, pops do not re-arm
    pair.dq.add([pair.buffer(b"x")], [])
    pair.dq.publish()
    assert not pair.dq.kick_needed()
    pair.vq.set_notification(pair.port, True)
    assert pair.vq.has_available(pair.port)  # the re-check after enabling finds the un-kicked chain
    pair.dq.add([pair.buffer(b"x")], [])
    pair.dq.publish()
    assert pair.dq.kick_needed()


# ----------------------------------------------------------------- dirty tracking
class Tracker:
    def __init__(self) -> None:
        self.pages: set[int] = set()

    def mark(self, first: int, last: int) -> None:
        self.pages.update(range(first, last + 1))


def test_device_writes_and_used_ring_reach_the_tracker():
    pair = Pair(8, event_idx=True)
    tracker = Tracker()
    pair.port.writer.tracker = tracker
    pair.mem.cpu.writer.log.start()
    out_addr = pair.alloc.alloc(3 * 4096, 4096) + 4090  # writable part straddles pages
    pair.dq.add([pair.buffer(b"q")], [Segment(out_addr, 12)])
    pair.dq.publish()
    cpu_dirty_before = set(pair.mem.cpu.writer.log.peek().nonzero()[0])
    chain = pair.vq.pop(pair.port)  # writes avail_event (used ring page)
    chain.write(pair.port, b"z" * 12)
    pair.vq.push(pair.port, chain.head, 12)
    used_page = pair.dq.used_addr >> PAGE_SHIFT
    assert {out_addr >> PAGE_SHIFT, (out_addr + 11) >> PAGE_SHIFT, used_page} <= tracker.pages
    assert tracker.pages == {out_addr >> PAGE_SHIFT, (out_addr + 11) >> PAGE_SHIFT} | {
        p >> PAGE_SHIFT for p in (pair.dq.used_addr, pair.dq.used_addr + 4 + 8 * 8 + 1)
    }
    # device writes are not the CPU's: the CPU log saw only the driver's own writes
    assert set(pair.mem.cpu.writer.log.peek().nonzero()[0]) == cpu_dirty_before


def test_without_tracker_device_writes_are_not_recorded():
    """Negative control: the same device work with no tracker installed records nothing."""
    pair = Pair()
    tracker = Tracker()
    pair.port.writer.tracker = tracker
    pair.port.writer.tracker = None  # tracking stopped again
    pair.dq.add([], [pair.space(8)])
    pair.dq.publish()
    chain = pair.vq.pop(pair.port)
    chain.write(pair.port, b"12345678")
    pair.vq.push(pair.port, chain.head, 8)
    assert tracker.pages == set()
    assert pair.port.writer.bytes_written == 8 + 8 + 2


def test_driver_ring_writes_reach_the_cpu_dirty_log():
    pair = Pair()
    log = pair.mem.cpu.writer.log
    log.start()
    pair.dq.add([Segment(0x80000, 4)], [])
    pair.dq.publish()
    dirty = set(log.collect().nonzero()[0])
    assert {pair.dq.desc_addr >> PAGE_SHIFT, pair.dq.avail_addr >> PAGE_SHIFT} <= dirty


# ----------------------------------------------------------------- property test
segment_sizes = st.lists(st.integers(min_value=0, max_value=300), min_size=0, max_size=6)


@settings(max_examples=60, deadline=None)
@given(
    chains=st.lists(
        st.tuples(segment_sizes, segment_sizes, st.booleans(), st.integers(min_value=0, max_value=255)),
        min_size=1,
        max_size=12,
    ),
    start=st.sampled_from([0, 65530, 65535, 1234]),
    event_idx=st.booleans(),
)
@pytest.mark.slow  # 0.3 s or more: out of the one-minute fast subset (CI runs it)
def test_random_chains_device_sees_exactly_what_driver_added(chains, start, event_idx):
    pair = Pair(16, event_idx=event_idx)
    pair.start_at(start)
    expected = {}
    for n, (rsizes, wsizes, indirect, fill) in enumerate(chains):
        if not rsizes and not wsizes:
            wsizes = [1]
        r = [pair.buffer(bytes([(fill + i + k) & 0xFF for k in range(s)])) for i, s in enumerate(rsizes)]
        w = [pair.space(s) for s in wsizes]
        if not indirect and len(r) + len(w) > pair.dq.num_free():
            indirect = True
        head = pair.dq.add(r, w, indirect=indirect, token=n)
        expected[head] = (n, tuple(r), tuple(w), indirect)
        if pair.dq.num_free() == 0 or len(expected) == 16:
            break
    pair.dq.publish()
    seen = []
    for chain in pair.vq.pop_all(pair.port):
        n, r, w, indirect = expected[chain.head]
        assert chain.readable == r and chain.writable == w and chain.indirect == indirect
        assert chain.readable_len == sum(s.len for s in r)
        assert chain.read(pair.port) == b"".join(pair.mem.read(s.addr, s.len) for s in r)
        written = min(chain.writable_len, 5)
        chain.write(pair.port, bytes([n]) * written)
        pair.vq.push(pair.port, chain.head, written)
        seen.append(n)
    assert seen == sorted(e[0] for e in expected.values())
    assert pair.errors == []
    got = pair.dq.get_all_used()
    assert [t for t, _ in got] == seen
    for token, written in got:
        _, _, w, _ = next(v for v in expected.values() if v[0] == token)
        data = b"".join(pair.mem.read(s.addr, s.len) for s in w)
        assert data[:written] == bytes([token]) * written
    assert pair.dq.num_free() == 16 and pair.dq.in_flight() == 0


class RecordingPort:
    """A MemoryPort stand-in that records the order of writes."""

    def __init__(self, port) -> None:
        self._port = port
        self.writes: list[tuple[int, int]] = []
        self.size = port.size

    def read(self, addr: int, length: int) -> bytes:
        return self._port.read(addr, length)

    def check(self, addr: int, length: int) -> None:
        self._port.check(addr, length)

    def write(self, addr: int, data) -> None:
        self.writes.append((addr, len(data)))
        self._port.write(addr, data)


def test_push_writes_used_element_before_used_idx():
    pair = Pair()
    pair.dq.add([pair.buffer(b"x")], [])
    pair.dq.add([pair.buffer(b"y")], [])
    pair.dq.publish()
    rec = RecordingPort(pair.port)
    a, b = pair.vq.pop_all(rec)
    pair.vq.push_many(rec, [(a.head, 1), (b.head, 2)])
    used = pair.dq.used_addr
    assert rec.writes == [(used + 4, 8), (used + 12, 8), (used + 2, 2)]
    pair.vq.push(rec, a.head, 0)
    assert rec.writes[-2:] == [(used + 4 + 16, 8), (used + 2, 2)]


def test_push_refuses_bad_head_or_length_without_publishing():
    from virtio_lm.errors import FieldValueError

    pair = Pair()
    with pytest.raises(FieldValueError):
        pair.vq.push(pair.port, 8, 0)
    with pytest.raises(FieldValueError):
        pair.vq.push(pair.port, 0, 1 << 32)
    assert pair.vq.used_idx == 0 and pair.dq.used_idx() == 0
