"""GuestMemoryMap's read and write: the one-region shortcut agrees with a byte-by-byte model.

The model: guest-physical byte ``g`` is fd byte ``r.mmap_offset + g - r.gpa`` of the one region
``r`` that holds it; an access with any byte outside every region (or a negative address or
length) is a MemoryAccessError and writes nothing.  Region tables here have gaps and adjacent
regions, so accesses fall inside one region (the shortcut), straddle two (the general path) or
run into a gap.  A negative control shows the checker catches a reader that ignores a region's
end."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtio_lm.errors import MemoryAccessError
from virtio_lm.memory import Memory
from virtio_lm.memory.region import Writer
from virtio_lm.vhost.memmap import GuestMemoryMap
from virtio_lm.wire.vhost_user import MemRegion

PAGE = 4096
FD_SIZE = 16 * PAGE


class Recorder(Writer):
    """A writer that keeps every (first page, last page, bytes) it is told."""

    def __init__(self) -> None:
        super().__init__("recorder")
        self.calls: list[tuple[int, int, int]] = []

    def written(self, first_page: int, last_page: int, nbytes: int) -> None:
        self.calls.append((first_page, last_page, nbytes))


@st.composite
def tables(draw):  # type: ignore[no-untyped-def]
    """1-3 regions, each 1-3 pages at its own fd offset; between regions a gap of 0 or 1 page."""
    n = draw(st.integers(1, 3))
    regions, gpa, off = [], draw(st.sampled_from([0, PAGE])), 0
    for _ in range(n):
        pages = draw(st.integers(1, 3))
        regions.append(MemRegion(gpa, pages * PAGE, 0x7000_0000 + gpa * 2, off))
        gpa += pages * PAGE + draw(st.sampled_from([0, PAGE]))
        off += pages * PAGE + PAGE
    return regions


def model_offsets(regions: list[MemRegion], addr: int, n: int) -> list[int] | None:
    """The fd offset of every byte of the access, or None if one is outside every region."""
    if addr < 0 or n < 0:
        return None
    out = []
    for g in range(addr, addr + n):
        r = next((r for r in regions if r.guest_phys_addr <= g < r.guest_phys_addr + r.memory_size), None)
        if r is None:
            return None
        out.append(r.mmap_offset + g - r.guest_phys_addr)
    return out


def check_read(read, regions: list[MemRegion], backing: bytes, addr: int, n: int) -> None:  # type: ignore[no-untyped-def]
    if n == 0:  # zero bytes: the general path's rule (never the shortcut), tested elsewhere
        return
    offs = model_offsets(regions, addr, n)
    if offs is None:
        with pytest.raises(MemoryAccessError):
            read(addr, n)
        return
    assert read(addr, n) == bytes(backing[o] for o in offs), (addr, n)


@pytest.fixture(scope="module")
def fd_memory():
    m = Memory(FD_SIZE, name="fd", backing="memfd")
    m.cpu.write(0, random.Random(5).randbytes(FD_SIZE))  # no period: every fd offset tells
    yield m
    m.close()


def _map(fd_memory: Memory, regions: list[MemRegion]) -> GuestMemoryMap:
    gm = GuestMemoryMap("t")
    gm.set_table(regions, [os.dup(fd_memory.fd) for _ in regions])  # type: ignore[arg-type]
    return gm


accesses = st.tuples(st.integers(-4, 11 * PAGE), st.sampled_from([0, 1, 2, 8, 16, 100, PAGE - 1, PAGE, PAGE + 1, 3 * PAGE]))


@pytest.mark.slow  # over 0.4 s: out of the one-minute fast subset (CI runs it)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(regions=tables(), acc=st.lists(accesses, min_size=1, max_size=8))
def test_read_agrees_with_the_model(fd_memory, regions, acc) -> None:
    gm = _map(fd_memory, regions)
    backing = fd_memory.cpu.read(0, FD_SIZE)
    try:
        for addr, n in acc:
            check_read(gm.read, regions, backing, addr, n)
    finally:
        gm.close()


@pytest.mark.slow  # over 0.4 s: out of the one-minute fast subset (CI runs it)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(regions=tables(), acc=accesses, as_bytearray=st.booleans())
def test_write_agrees_with_the_model_and_marks_its_pages(regions, acc, as_bytearray) -> None:
    fd_memory = Memory(FD_SIZE, name="fdw", backing="memfd")
    gm = _map(fd_memory, regions)
    try:
        addr, n = acc
        data = bytes((addr + i * 13) & 0xFF for i in range(max(n, 0)))
        before = fd_memory.cpu.read(0, FD_SIZE)
        rec = Recorder()
        if n == 0:
            return
        offs = model_offsets(regions, addr, n)
        if offs is None:
            with pytest.raises(MemoryAccessError):
                gm.write(addr, bytearray(data) if as_bytearray else data, rec)
            assert fd_memory.cpu.read(0, FD_SIZE) == before  # nothing written
            assert rec.calls == []
            return
        gm.write(addr, bytearray(data) if as_bytearray else data, rec)
        want = bytearray(before)
        for o, b in zip(offs, data):
            want[o] = b
        assert fd_memory.cpu.read(0, FD_SIZE) == bytes(want)
        assert rec.calls == [(addr // PAGE, (addr + n - 1) // PAGE, n)]
    finally:
        gm.close()
        fd_memory.close()


def test_negative_control_a_reader_that_ignores_the_region_end_is_caught(fd_memory) -> None:
    """Two adjacent regions at distant fd offsets: a read straddling them must join the two
    regions' bytes; a reader that keeps reading the first region's fd past its end is wrong."""
    regions = [MemRegion(0, PAGE, 0x7000_0000, 0), MemRegion(PAGE, PAGE, 0x7100_0000, 8 * PAGE)]
    backing = fd_memory.cpu.read(0, FD_SIZE)
    gm = _map(fd_memory, regions)
    try:
        check_read(gm.read, regions, backing, PAGE - 8, 16)  # the real one passes

        def overrun(addr: int, n: int) -> bytes:
            return backing[addr : addr + n]  # region 0's fd bytes, past its end

        with pytest.raises(AssertionError):
            check_read(overrun, regions, backing, PAGE - 8, 16)
    finally:
        gm.close()
