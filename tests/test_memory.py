"""Memory: bounds-checked access, writer attribution, dirty logs, sharing, scans."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio_lm.errors import MemoryAccessError
from virtio_lm.memory import (
    PAGE_SIZE,
    DirtyLog,
    Memory,
    pack_bitmap,
    pages_spanned,
    unpack_bitmap,
)

SIZE = 64 * PAGE_SIZE


class Recorder:
    """A DirtySink that remembers every page it was told of."""

    def __init__(self) -> None:
        self.pages: set[int] = set()

    def mark(self, first_page: int, last_page: int) -> None:
        self.pages.update(range(first_page, last_page + 1))


@pytest.fixture(params=["anon", "memfd", "file"])
def mem(request, tmp_path):
    m = Memory(SIZE, name="guest", backing=request.param, path=tmp_path / "ram")
    yield m
    m.close()


def test_size_must_be_whole_pages():
    with pytest.raises(ValueError):
        Memory(PAGE_SIZE + 1)
    with pytest.raises(ValueError):
        Memory(0)


def test_read_write_round_trip(mem):
    mem.cpu.write(100, b"hello")
    assert mem.read(100, 5) == b"hello"
    buf = bytearray(5)
    mem.readinto(100, buf)
    assert buf == b"hello"
    assert mem.array[100:105].tobytes() == b"hello"


def test_numpy_view_is_read_only(mem):
    with pytest.raises(ValueError):
        mem.array[0] = 1


@pytest.mark.parametrize(
    "addr,length",
    [(-1, 1), (SIZE, 1), (SIZE - 1, 2), (0, SIZE + 1), ((1 << 64) - 1, 2), (10, -1)],
)
def test_out_of_range_write_raises_and_writes_nothing(mem, addr, length):
    rec = Recorder()
    port = mem.device_port("vf1")
    port.writer.tracker = rec
    before = mem.array.copy()
    with pytest.raises(MemoryAccessError) as e:
        port.write(addr, b"\xff" * max(length, 0)) if length >= 0 else mem.check(addr, length)
    assert e.value.region == "guest"
    assert np.array_equal(mem.array, before)
    assert rec.pages == set()


@pytest.mark.parametrize("addr,length", [(SIZE - 1, 2), (-5, 1), (1 << 70, 1)])
def test_out_of_range_read_raises(mem, addr, length):
    with pytest.raises(MemoryAccessError):
        mem.read(addr, length)
    with pytest.raises(MemoryAccessError):
        mem.readinto(addr, bytearray(length))


def test_fill_and_modify_out_of_range(mem):
    with pytest.raises(MemoryAccessError):
        mem.cpu.fill(SIZE - 2, 4, 0xAA)
    with pytest.raises(MemoryAccessError):
        with mem.cpu.modify(SIZE - 2, 4):
            pass


def test_whole_memory_boundary_is_inclusive(mem):
    mem.cpu.write(SIZE - 4, b"tail")
    assert mem.read(SIZE - 4, 4) == b"tail"
    mem.cpu.write(SIZE, b"")  # empty access at the end is fine


@settings(max_examples=200)
@given(st.integers(0, SIZE - 1), st.integers(1, 3 * PAGE_SIZE))
def test_device_write_marks_every_page_it_touches(addr, length):
    length = min(length, SIZE - addr)
    with Memory(SIZE) as m:
        port = m.device_port("vf")
        rec = Recorder()
        port.writer.tracker = rec
        port.write(addr, b"\x01" * length)
        assert rec.pages == set(range(addr // PAGE_SIZE, (addr + length - 1) // PAGE_SIZE + 1))


def test_cpu_log_only_when_started_and_collect_clears(mem):
    log = mem.cpu.writer.log
    mem.cpu.write(0, b"x")
    assert log.count() == 0  # logging off
    log.start()
    mem.cpu.write(PAGE_SIZE - 1, b"ab")  # crosses pages 0 and 1
    mem.cpu.fill(5 * PAGE_SIZE, 1, 7)
    with mem.cpu.modify(9 * PAGE_SIZE + 10, PAGE_SIZE) as v:
        v[:] = 3
    assert set(np.flatnonzero(log.collect())) == {0, 1, 5, 9, 10}
    assert log.count() == 0
    assert set(np.flatnonzero(log.collect())) == set()


def test_cpu_writes_are_not_device_writes(mem):
    port = mem.device_port("vf")
    rec = Recorder()
    port.writer.tracker = rec
    mem.cpu.write(0, b"cpu")
    assert rec.pages == set()
    mem.cpu.writer.log.start()
    port.write(3 * PAGE_SIZE, b"dev")
    assert rec.pages == {3}
    assert mem.cpu.writer.log.count() == 0


def test_two_devices_have_separate_trackers(mem):
    a, b = mem.device_port("a"), mem.device_port("b")
    ra, rb = Recorder(), Recorder()
    a.writer.tracker, b.writer.tracker = ra, rb
    a.write(0, b"1")
    b.write(PAGE_SIZE * 2, b"2")
    assert (ra.pages, rb.pages) == ({0}, {2})


def test_tracker_cleared_stops_marking(mem):
    port = mem.device_port("vf")
    rec = Recorder()
    port.writer.tracker = rec
    port.write(0, b"1")
    port.writer.tracker = None
    port.write(PAGE_SIZE, b"1")
    assert rec.pages == {0}
    assert port.writer.bytes_written == 2


def test_zero_page_scan(mem):
    assert mem.zero_pages().all()
    mem.cpu.write(3 * PAGE_SIZE + 4095, b"\x01")
    mem.cpu.write(7 * PAGE_SIZE, b"\x80")
    z = mem.zero_pages()
    assert set(np.flatnonzero(~z)) == {3, 7}
    assert list(mem.zero_pages(2, 3)) == [True, False, True]
    with pytest.raises(MemoryAccessError):
        mem.zero_pages(60, 10)


def test_atomic_fetch_and_clear_and_or(mem):
    port = mem.device_port("pf")
    port.atomic_or(10, b"\x01\x02")
    port.atomic_or(10, b"\x04\x00")
    port.atomic_store_byte(12, 9)
    got = port.atomic_fetch_and_clear(10, 3)
    assert got.tobytes() == b"\x05\x02\x09"
    assert mem.read(10, 3) == b"\x00\x00\x00"


def test_atomic_or_races_with_fetch_and_clear_lose_nothing():
    with Memory(PAGE_SIZE) as m:
        dev, drv = m.device_port("dev"), m.device_port("drv")
        n = 2000
        seen = np.zeros(n, dtype=bool)

        def device():
            for i in range(n):
                dev.atomic_or(i // 8, bytes([1 << (i % 8)]))

        t = threading.Thread(target=device)
        t.start()
        while t.is_alive():
            bits = np.unpackbits(drv.atomic_fetch_and_clear(0, n // 8), bitorder="little").astype(bool)
            assert not (seen & bits).any()  # each mark collected once
            seen |= bits
        t.join()
        seen |= np.unpackbits(drv.atomic_fetch_and_clear(0, n // 8), bitorder="little").astype(bool)
        assert seen.all()


def test_memfd_is_shared_with_another_process():
    with Memory(4 * PAGE_SIZE, backing="memfd") as m:
        m.cpu.write(PAGE_SIZE, b"from parent")
        code = (
            "import os,sys\n"
            "from virtio_lm.memory import Memory\n"
            "m = Memory(4*4096, backing='fd', fd=int(sys.argv[1]))\n"
            "assert m.read(4096, 11) == b'from parent'\n"
            "m.cpu.write(8192, b'from child')\n"
        )
        fd = m.fd
        subprocess.run([sys.executable, "-c", code, str(fd)], check=True, pass_fds=(fd,))
        assert m.read(2 * PAGE_SIZE, 10) == b"from child"


def test_file_backing_persists(tmp_path):
    p = tmp_path / "ram.img"
    with Memory(2 * PAGE_SIZE, backing="file", path=p) as m:
        m.cpu.write(5000, b"disk")
    assert os.path.getsize(p) == 2 * PAGE_SIZE
    with open(p, "rb") as f:
        f.seek(5000)
        assert f.read(4) == b"disk"


def test_fd_backing_refuses_small_fd(tmp_path):
    p = tmp_path / "small"
    p.write_bytes(b"\x00" * PAGE_SIZE)
    fd = os.open(p, os.O_RDWR)
    try:
        with pytest.raises(ValueError):
            Memory(2 * PAGE_SIZE, backing="fd", fd=fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- dirty log helpers
def test_pages_spanned():
    assert pages_spanned(0, 0) is None
    assert pages_spanned(4095, 1) == (0, 0)
    assert pages_spanned(4095, 2) == (0, 1)
    assert pages_spanned(8192, 8193) == (2, 4)


@settings(max_examples=100)
@given(st.lists(st.booleans(), min_size=1, max_size=200))
def test_bitmap_pack_unpack_round_trip(bits):
    pages = np.array(bits, dtype=bool)
    packed = pack_bitmap(pages)
    assert len(packed) == (len(bits) + 7) // 8
    assert np.array_equal(unpack_bitmap(packed, len(bits)), pages)
    assert np.array_equal(unpack_bitmap(packed.tobytes(), len(bits)), pages)


def test_bitmap_is_kvm_layout():
    pages = np.zeros(16, dtype=bool)
    pages[[0, 9]] = True
    assert pack_bitmap(pages).tobytes() == b"\x01\x02"


def test_dirty_log_start_all_dirty_and_stop():
    log = DirtyLog(10)
    log.mark(0, 3)
    assert log.count() == 0
    log.start(all_dirty=True)
    assert log.count() == 10
    log.collect()
    log.mark(2, 2)
    assert list(np.flatnonzero(log.peek())) == [2]
    log.stop()
    log.mark(5, 5)
    assert log.count() == 0


def test_dirty_log_concurrent_mark_and_collect_lose_nothing():
    log = DirtyLog(4096, enabled=True)
    collected = np.zeros(4096, dtype=bool)
    done = threading.Event()

    def marker():
        for p in range(4096):
            log.mark(p, p)
        done.set()

    t = threading.Thread(target=marker)
    t.start()
    while not done.is_set():
        collected |= log.collect()
    t.join()
    collected |= log.collect()
    assert collected.all()


def test_bus_master_off_refuses_every_access_and_writes_nothing(mem):
    from virtio_lm.errors import DmaDisabledError

    port = mem.device_port("vf1")
    rec = Recorder()
    port.writer.tracker = rec
    port.bus_master = False
    before = mem.array.copy()
    for op in (
        lambda: port.write(0, b"x"),
        lambda: port.read(0, 1),
        lambda: port.readinto(0, bytearray(1)),
        lambda: port.fill(0, 1, 1),
        lambda: port.atomic_or(0, b"\x01"),
        lambda: port.atomic_store_byte(0, 1),
        lambda: port.atomic_fetch_and_clear(0, 1),
        lambda: port.modify(0, 1),
    ):
        with pytest.raises(DmaDisabledError) as e:
            op()
        assert e.value.port == "vf1"
    assert np.array_equal(mem.array, before) and rec.pages == set()
    port.bus_master = True
    port.write(0, b"x")
    assert rec.pages == {0}


def test_atomic_or_byte(mem):
    port = mem.device_port("pf")
    port.atomic_or_byte(5, 0x01)
    port.atomic_or_byte(5, 0x80)
    assert mem.read(5, 1) == b"\x81"
    with pytest.raises(MemoryAccessError):
        port.atomic_or_byte(SIZE, 1)


# ---------------------------------------------------------------------- populated pages (SEEK_DATA)
def test_populated_pages_of_a_fresh_memfd_are_none_and_written_ones_show():
    from virtio_lm.memory import Memory, Writer

    with Memory(64 * 4096, name="pop", backing="memfd") as mem:
        assert not mem.populated_pages().any()  # all holes: reads as zero without touching a page
        w = Writer("t")
        mem.write(5 * 4096 + 10, b"\x01", w)
        mem.fill(40 * 4096, 2 * 4096, 7, w)
        got = np.flatnonzero(mem.populated_pages())
        assert {5, 40, 41} <= set(got.tolist())
        assert len(got) < 64  # a hole stays a hole


def test_populated_pages_of_anonymous_memory_are_all_maybe():
    from virtio_lm.memory import Memory

    with Memory(8 * 4096, name="anon") as mem:
        assert mem.populated_pages().all()  # no fd to ask: every page may hold data
