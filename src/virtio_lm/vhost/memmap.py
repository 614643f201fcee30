"""Guest memory as a vhost-user back-end sees it: regions mapped from fds.

The front-end (QEMU) passes its guest RAM as file descriptors, one per
region, each with a guest-physical address, a size, the front-end's own
virtual address of the region (``userspace_addr``, which ring addresses are
given in) and an offset into the fd.  :class:`GuestMemoryMap` maps them and
offers the same access surface as :class:`virtio_lm.memory.Memory` (read,
readinto, write, fill, modify, atomic_or, atomic_or_byte, atomic_store_byte,
atomic_fetch_and_clear, check, contains, size), addressed by
guest-physical address -- so a :class:`virtio_lm.memory.MemoryPort` built
on it (``MemoryPort(gmap, DeviceWriter(name))``) is what
:class:`~virtio_lm.virtqueue.device.Virtqueue` and
:class:`~virtio_lm.devices.blk.BlkDevice` use, unchanged, and every write
still names its writer, whose ``tracker`` hears of the pages (guest-physical
page numbers: exactly the vhost-user log's indexing).  Our
:class:`~virtio_lm.memory.Memory` is one region from 0 and is not changed.

Region rules (checked before anything is mapped; a refused table changes
nothing): size > 0, a multiple of nothing in particular but no wrap past
2**64 in guest-physical or user space, ``mmap_offset + size`` within the
fd's size (``fstat``), no two regions overlapping in guest-physical space
nor in user space, at most ``max_regions`` regions.

Accesses may cross from one region into one that starts exactly where it
ends; any byte not inside a region is a :class:`MemoryAccessError`.

:class:`LogMap` is the dirty log (SET_LOG_BASE): one mapped fd, addressed from
the map's first byte, with ``atomic_or`` -- the surface the push tracker
writes through.
"""

from __future__ import annotations

import bisect
import contextlib
import mmap
import os
import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from virtio_lm.errors import MemoryAccessError, VhostLogError, VhostMemoryError
from virtio_lm.memory.dirty import PAGE_SHIFT, PAGE_SIZE
from virtio_lm.memory.region import Writer, mark_pieces, read_file_into, write_file_from
from virtio_lm.wire.vhost_user import MemRegion

__all__ = ["GuestMemoryMap", "LogMap", "MappedRegion", "check_regions"]

_U64 = 1 << 64
Buffer = bytes | bytearray | memoryview


def _map_fd(fd: int, offset: int, length: int, what: str, err: type[Exception]) -> tuple[mmap.mmap, int]:
    """mmap ``[offset, offset+length)`` of ``fd``; returns the map and the delta of ``offset`` in it."""
    base = offset & ~(mmap.ALLOCATIONGRANULARITY - 1)
    delta = offset - base
    try:
        mm = mmap.mmap(fd, delta + length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=base)
    except (OSError, ValueError, OverflowError) as exc:
        raise err(f"{what}: mmap of fd {fd} [{offset:#x}, +{length:#x}) failed: {exc}") from exc
    return mm, delta


def _same_file(a: int, b: int) -> bool:
    """Whether fds ``a`` and ``b`` open the same file."""
    try:
        sa, sb = os.fstat(a), os.fstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


@dataclass(eq=False)
class MappedRegion:
    """One mapped region.  ``view`` is the region's bytes as a writable numpy array; ``mm`` maps
    from the allocation-granularity boundary below ``mmap_offset``, so the region's first byte is
    ``mm[delta]``."""

    gpa: int
    size: int
    uaddr: int
    mmap_offset: int
    fd: int
    mm: mmap.mmap
    view: np.ndarray
    delta: int = 0
    refs: int = 1  # ADD_MEM_REG of this very region again (one per vhost device sharing the connection)

    @property
    def gpa_end(self) -> int:
        return self.gpa + self.size

    def close(self) -> None:
        self.view = np.empty(0, dtype=np.uint8)
        try:
            self.mm.close()
        except BufferError:
            pass  # a numpy view is still alive somewhere; the map goes with it
        try:
            os.close(self.fd)
        except OSError:
            pass


def _fd_size(fd: int, what: str) -> int:
    try:
        return os.fstat(fd).st_size
    except OSError as exc:
        raise VhostMemoryError(f"{what}: fd {fd} cannot be used: {exc}") from exc


def check_regions(regions: list[MemRegion], fds: list[int], *, max_regions: int) -> None:
    """Refuse a region set (see the module docstring); maps nothing."""
    if len(regions) != len(fds):
        raise VhostMemoryError(f"{len(regions)} regions but {len(fds)} fds")
    if len(regions) > max_regions:
        raise VhostMemoryError(f"{len(regions)} regions, at most {max_regions}")
    for i, (r, fd) in enumerate(zip(regions, fds)):
        what = f"region {i} (gpa {r.guest_phys_addr:#x})"
        if r.memory_size == 0:
            raise VhostMemoryError(f"{what}: memory_size 0")
        if r.guest_phys_addr + r.memory_size > _U64 or r.userspace_addr + r.memory_size > _U64:
            raise VhostMemoryError(f"{what}: size {r.memory_size:#x} wraps past 2**64")
        if r.mmap_offset + r.memory_size > _U64:
            raise VhostMemoryError(f"{what}: mmap_offset {r.mmap_offset:#x} + size wraps past 2**64")
        have = _fd_size(fd, what)
        if r.mmap_offset + r.memory_size > have:
            raise VhostMemoryError(
                f"{what}: [{r.mmap_offset:#x}, +{r.memory_size:#x}) runs past the fd's size {have:#x}"
            )
    for key, name in ((lambda r: r.guest_phys_addr, "guest-physical"), (lambda r: r.userspace_addr, "user")):
        order = sorted(range(len(regions)), key=lambda i: key(regions[i]))
        for a, b in zip(order, order[1:]):
            if key(regions[a]) + regions[a].memory_size > key(regions[b]):
                raise VhostMemoryError(f"regions {a} and {b} overlap in {name} address space")


class _Pinned:
    """:meth:`GuestMemoryMap.pinned`'s context: the map's lock held, its regions handed out (a
    class, not a generator: it runs once per notification on the vhost-user data path)."""

    __slots__ = ("lock", "regions")

    def __init__(self, lock: threading.RLock) -> None:
        self.lock = lock
        self.regions: tuple[tuple[int, np.ndarray], ...] = ()  # (gpa, writable bytes) per region

    def __enter__(self) -> tuple[tuple[int, np.ndarray], ...]:
        self.lock.acquire()
        return self.regions

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


class GuestMemoryMap:
    """Guest RAM from fds, addressed by guest-physical address (see the module docstring).

    Thread-safe: every access holds :attr:`lock` (an RLock) so a region
    removed by the front-end is never unmapped under a device's access.
    """

    def __init__(self, name: str = "guest", *, max_regions: int = 32) -> None:
        self.name = name
        self.max_regions = max_regions
        self.lock = threading.RLock()
        self._regions: list[MappedRegion] = []  # sorted by gpa
        self._starts: list[int] = []
        # per region, what an access inside it needs: (gpa end, its map, map offset of gpa 0)
        self._spans: list[tuple[int, mmap.mmap, int]] = []
        self._pin = _Pinned(self.lock)
        self._atomic = threading.Lock()

    # ------------------------------------------------------------------ table
    @property
    def regions(self) -> tuple[MappedRegion, ...]:
        with self.lock:
            return tuple(self._regions)

    def _reindex(self) -> None:
        self._regions.sort(key=lambda r: r.gpa)
        self._starts = [r.gpa for r in self._regions]
        self._spans = [(r.gpa_end, r.mm, r.delta - r.gpa) for r in self._regions]
        self._pin.regions = tuple((r.gpa, r.view) for r in self._regions)

    def pinned(self) -> _Pinned:
        """The regions as ``(gpa, writable bytes)`` pairs while the context lasts, for code that
        moves data in and out of guest memory itself (the C fast path of
        :mod:`virtio_lm.devices.blk`).  The table is held meanwhile: no region is unmapped under
        it.  Whoever writes through them tells the writer afterwards (:meth:`tell_written`)."""
        return self._pin

    def tell_written(self, writer: Writer, written: bytes | None, nbytes: int) -> None:
        """Tell ``writer`` of writes made through :meth:`pinned`: ``written`` holds them as
        little-endian u64 ``(addr, len)`` pairs, ``nbytes`` their total.  ``None`` (the list was
        lost): every region counts as written."""
        if written is None:
            with self.lock:
                spans = [(r.gpa, r.size) for r in self._regions]
            for gpa, size in spans:
                writer.written(gpa >> PAGE_SHIFT, (gpa + size - 1) >> PAGE_SHIFT, 0)
            writer.written_bytes(nbytes)
            return
        mark_pieces(writer, np.frombuffer(written, dtype="<u8").reshape(-1, 2).tolist(), nbytes)

    def _map(self, r: MemRegion, fd: int) -> MappedRegion:
        mm, delta = _map_fd(fd, r.mmap_offset, r.memory_size, f"region gpa {r.guest_phys_addr:#x}", VhostMemoryError)
        arr = np.frombuffer(mm, dtype=np.uint8, count=r.memory_size, offset=delta)
        return MappedRegion(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset, fd, mm, arr, delta)

    def set_table(self, regions: list[MemRegion], fds: list[int]) -> None:
        """Replace every region (SET_MEM_TABLE).  The fds are owned from here on
        (closed on refusal too)."""
        try:
            check_regions(regions, fds, max_regions=self.max_regions)
            mapped: list[MappedRegion] = []
            try:
                for r, fd in zip(regions, fds):
                    mapped.append(self._map(r, fd))
            except VhostMemoryError:
                for m in mapped:
                    m.mm.close()
                raise
        except VhostMemoryError:
            for fd in fds:
                _close(fd)
            raise
        with self.lock:
            old, self._regions = self._regions, mapped
            self._reindex()
        for m in old:
            m.close()

    def add_region(self, region: MemRegion, fd: int) -> None:
        """ADD_MEM_REG: one more region (must not overlap those mapped).

        The very region again -- same guest-physical address, size, user address, offset and
        backing file -- takes one more reference instead: QEMU 7.2 sends each region once per
        vhost device, and a multi-queue vhost-user-net has one device per queue pair on the
        same connection.  REM_MEM_REG drops a reference; the last one unmaps."""
        with self.lock:
            for m in self._regions:
                if (m.gpa, m.size, m.uaddr, m.mmap_offset) == (
                    region.guest_phys_addr, region.memory_size, region.userspace_addr, region.mmap_offset
                ) and _same_file(m.fd, fd):
                    m.refs += 1
                    _close(fd)
                    return
            current = [MemRegion(m.gpa, m.size, m.uaddr, m.mmap_offset) for m in self._regions]
            try:
                check_regions(current + [region], [m.fd for m in self._regions] + [fd], max_regions=self.max_regions)
                mapped = self._map(region, fd)
            except VhostMemoryError:
                _close(fd)
                raise
            self._regions.append(mapped)
            self._reindex()

    def remove_region(self, region: MemRegion) -> None:
        """REM_MEM_REG: the region with this gpa, size and user address."""
        with self.lock:
            for i, m in enumerate(self._regions):
                if m.gpa == region.guest_phys_addr and m.size == region.memory_size and m.uaddr == region.userspace_addr:
                    m.refs -= 1
                    if m.refs > 0:
                        return
                    del self._regions[i]
                    self._reindex()
                    m.close()
                    return
        raise VhostMemoryError(
            f"REM_MEM_REG: no region at gpa {region.guest_phys_addr:#x} size {region.memory_size:#x} "
            f"uaddr {region.userspace_addr:#x}"
        )

    def clear(self) -> None:
        with self.lock:
            old, self._regions = self._regions, []
            self._reindex()
        for m in old:
            m.close()

    close = clear

    # ------------------------------------------------------------------ translation
    def user_to_gpa(self, uaddr: int, length: int) -> int:
        """The guest-physical address of front-end virtual address ``uaddr``;
        ``[uaddr, +length)`` must lie inside one region."""
        with self.lock:
            for m in self._regions:
                if m.uaddr <= uaddr and uaddr + length <= m.uaddr + m.size:
                    return m.gpa + (uaddr - m.uaddr)
        raise MemoryAccessError(f"{self.name} (user addresses)", uaddr, length, 0)

    @property
    def size(self) -> int:
        """One past the highest guest-physical address mapped (0 with no region)."""
        with self.lock:
            return self._regions[-1].gpa_end if self._regions else 0

    def _pieces(self, addr: int, length: int) -> list[tuple[MappedRegion, int, int]]:
        """``(region, offset in region, n)`` covering ``[addr, addr+length)``; called under lock.
        A zero-length access is fine anywhere inside a region or at its end."""
        if addr < 0 or length < 0 or addr + length > _U64:
            raise MemoryAccessError(self.name, addr, length, self.size)
        k = bisect.bisect_right(self._starts, addr) - 1
        if length == 0:
            if k >= 0 and addr <= self._regions[k].gpa_end:
                return []
            raise MemoryAccessError(self.name, addr, length, self.size)
        out: list[tuple[MappedRegion, int, int]] = []
        pos, end = addr, addr + length
        while True:
            if k < 0 or k >= len(self._regions):
                raise MemoryAccessError(self.name, addr, length, self.size)
            m = self._regions[k]
            if not m.gpa <= pos < m.gpa_end:
                raise MemoryAccessError(self.name, addr, length, self.size)
            n = min(end, m.gpa_end) - pos
            out.append((m, pos - m.gpa, n))
            pos += n
            if pos >= end:
                return out
            k += 1

    def _one(self, addr: int, length: int) -> tuple[mmap.mmap, int] | None:
        """``(map, offset in it)`` of ``[addr, addr+length)`` when ``length`` > 0 and the
        range lies inside one region; else None (:meth:`_pieces` decides).  Under lock."""
        k = bisect.bisect_right(self._starts, addr) - 1
        if k < 0 or length <= 0:
            return None
        end, mm, base = self._spans[k]
        return (mm, base + addr) if addr + length <= end else None

    def check(self, addr: int, length: int) -> None:
        with self.lock:
            self._pieces(addr, length)

    def contains(self, addr: int, length: int) -> bool:
        try:
            self.check(addr, length)
        except MemoryAccessError:
            return False
        return True

    # ------------------------------------------------------------------ reads
    def read(self, addr: int, length: int) -> bytes:
        with self.lock:
            hit = self._one(addr, length)  # the common case: inside one region (a ring entry, a header)
            if hit is not None:
                return hit[0][hit[1] : hit[1] + length]
            pieces = self._pieces(addr, length)
            if len(pieces) == 1:
                m, off, n = pieces[0]
                off += m.delta
                return m.mm[off : off + n]  # mmap slices are bytes: one copy, no numpy on the way
            return b"".join(m.mm[m.delta + off : m.delta + off + n] for m, off, n in pieces)

    def readv(self, pieces: Sequence[tuple[int, int]]) -> bytes:
        """Several ``(addr, length)`` pieces, concatenated, under one hold of the lock; every
        piece is mapped before any is read (as :meth:`Memory.readv`)."""
        with self.lock:
            if len(pieces) == 1:  # one piece inside one region: one slice
                addr, length = pieces[0]
                hit = self._one(addr, length)
                if hit is not None:
                    return hit[0][hit[1] : hit[1] + length]
            plans = [self._pieces(addr, length) for addr, length in pieces if length]
            return b"".join([m.mm[m.delta + off : m.delta + off + n] for parts in plans for m, off, n in parts])

    def readinto(self, addr: int, buf: bytearray | memoryview) -> None:
        out = memoryview(buf).cast("B")
        with self.lock:
            at = 0
            for m, off, n in self._pieces(addr, len(out)):
                out[at : at + n] = m.view[off : off + n].data
                at += n

    # ------------------------------------------------------------------ writes
    def _mark(self, writer: Writer, addr: int, n: int) -> None:
        if n:
            writer.written(addr >> PAGE_SHIFT, (addr + n - 1) >> PAGE_SHIFT, n)

    def _write_one(self, addr: int, src: Buffer, n: int, writer: Writer) -> bool:
        """Write the ``n`` bytes of ``src`` at ``addr`` and mark their pages when they fall inside
        one region; False, nothing written, otherwise (the general path decides)."""
        with self.lock:
            hit = self._one(addr, n)
            if hit is None:
                return False
            mm, off = hit
            mm[off : off + n] = src
        writer.written(addr >> PAGE_SHIFT, (addr + n - 1) >> PAGE_SHIFT, n)
        return True

    def write(self, addr: int, data: Buffer, writer: Writer) -> None:
        if type(data) is bytes and self._write_one(addr, data, len(data), writer):
            return  # the common case: bytes inside one region
        src = memoryview(data).cast("B")
        with self.lock:
            at = 0
            for m, off, n in self._pieces(addr, len(src)):
                with memoryview(m.mm) as dst:  # a memoryview copy: a few times faster than numpy's
                    dst[m.delta + off : m.delta + off + n] = src[at : at + n]
                at += n
        self._mark(writer, addr, len(src))

    def writev(self, pieces: Sequence[tuple[int, Buffer]], writer: Writer) -> None:
        """Several writes under one hold of the lock (a chain's scatter): every piece is mapped
        before any byte is written (as :meth:`Memory.writev`)."""
        if len(pieces) == 1:  # one piece inside one region: one slice assignment
            addr, data = pieces[0]
            src = memoryview(data).cast("B")
            if self._write_one(addr, src, len(src), writer):
                return
        with self.lock:
            plans = [(self._pieces(addr, len(data)), memoryview(data).cast("B")) for addr, data in pieces]
            views: dict[int, memoryview] = {}
            try:
                for parts, src in plans:
                    at = 0
                    for m, off, n in parts:
                        dst = views.get(id(m))
                        if dst is None:
                            dst = views[id(m)] = memoryview(m.mm)
                        dst[m.delta + off : m.delta + off + n] = src[at : at + n]
                        at += n
            finally:
                for v in views.values():
                    v.release()
        for addr, data in pieces:
            self._mark(writer, addr, len(data))

    # ------------------------------------------------------------------ file I/O (DMA to and from a file)
    def _views(self, pieces: Sequence[tuple[int, int]]) -> list[memoryview]:
        """Memoryviews of the mapped bytes of ``pieces``, in order; every piece is mapped before
        any view is made.  The views hold their maps: a region the front-end removes meanwhile is
        unmapped only once they are released, so the I/O runs outside :attr:`lock`."""
        with self.lock:
            if pieces and len(self._regions) >= 1:
                # most often every piece is inside one region: one bounds pass, no per-piece lookup
                first = pieces[0][0]
                k = bisect.bisect_right(self._starts, first) - 1
                if k >= 0:
                    m = self._regions[k]
                    lo, hi, base = m.gpa, m.gpa_end, m.delta - m.gpa
                    if all(lo <= a and a + n <= hi for a, n in pieces):
                        with memoryview(m.mm) as mv:
                            return [mv[base + a : base + a + n] for a, n in pieces if n]
            plans = [self._pieces(addr, length) for addr, length in pieces if length]
            whole: dict[int, memoryview] = {}
            bufs: list[memoryview] = []
            try:
                for parts in plans:
                    for m, off, n in parts:
                        mv = whole.get(id(m))
                        if mv is None:
                            mv = whole[id(m)] = memoryview(m.mm)
                        bufs.append(mv[m.delta + off : m.delta + off + n])
            finally:
                for mv in whole.values():
                    mv.release()  # the slices keep their own hold on the map
            return bufs

    def preadv(self, fd: int, offset: int, pieces: Sequence[tuple[int, int]], writer: Writer) -> int:
        """Read ``fd`` from ``offset`` straight into the pieces (as :meth:`Memory.preadv`)."""
        return read_file_into(fd, offset, self._views(pieces), pieces, writer)

    def pwritev(self, fd: int, offset: int, pieces: Sequence[tuple[int, int]]) -> int:
        """Write the pieces to ``fd`` from ``offset`` (as :meth:`Memory.pwritev`)."""
        return write_file_from(fd, offset, self._views(pieces))

    def fill(self, addr: int, length: int, value: int, writer: Writer) -> None:
        with self.lock:
            for m, off, n in self._pieces(addr, length):
                m.view[off : off + n] = value
        self._mark(writer, addr, length)

    @contextlib.contextmanager
    def modify(self, addr: int, length: int, writer: Writer) -> Iterator[np.ndarray]:
        """A writable copy of ``[addr, addr+length)``, written back (and marked) on exit."""
        buf = np.frombuffer(bytearray(self.read(addr, length)), dtype=np.uint8)
        try:
            yield buf
        finally:
            self.write(addr, buf.tobytes(), writer)

    def atomic_or(self, addr: int, data: Buffer, writer: Writer) -> None:
        src = np.frombuffer(data, dtype=np.uint8)
        with self.lock, self._atomic:
            at = 0
            for m, off, n in self._pieces(addr, len(src)):
                cur = m.view[off : off + n]
                np.bitwise_or(cur, src[at : at + n], out=cur)
                at += n
        self._mark(writer, addr, len(src))

    def atomic_or_byte(self, addr: int, value: int, writer: Writer) -> None:
        """OR one byte (a one-page dirty mark), atomic like :meth:`atomic_or`."""
        with self.lock, self._atomic:
            ((m, off, _),) = self._pieces(addr, 1)
            m.view[off] |= value
        self._mark(writer, addr, 1)

    def atomic_or_at(self, addrs: np.ndarray, value: int, writer: Writer) -> None:
        """OR ``value`` into the byte at each of ``addrs``, atomic like :meth:`atomic_or`; the writer
        is told of the lowest to the highest address (as :meth:`Memory.atomic_or_at`)."""
        if len(addrs) == 0:
            return
        with self.lock, self._atomic:
            at = [self._pieces(a, 1)[0] for a in addrs.tolist()]  # every address checked first
            for m, off, _ in at:
                m.view[off] |= value
        lo = int(addrs.min())
        self._mark(writer, lo, int(addrs.max()) - lo + 1)

    def atomic_store_byte(self, addr: int, value: int, writer: Writer) -> None:
        with self.lock, self._atomic:
            ((m, off, _),) = self._pieces(addr, 1)
            m.view[off] = value
        self._mark(writer, addr, 1)

    def atomic_fetch_and_clear(self, addr: int, length: int, writer: Writer) -> np.ndarray:
        with self.lock, self._atomic:
            out = np.frombuffer(bytearray(self.read(addr, length)), dtype=np.uint8)
            for m, off, n in self._pieces(addr, length):
                m.view[off : off + n] = 0
        self._mark(writer, addr, length)
        return out

    def __repr__(self) -> str:
        regs = ", ".join(f"[{m.gpa:#x}, +{m.size:#x})" for m in self.regions)
        return f"GuestMemoryMap({self.name!r}, {regs})"


class LogMap(GuestMemoryMap):
    """The vhost-user dirty log: ``mmap_size`` bytes at ``mmap_offset`` of ``fd``,
    addressed from 0.  The fd is owned from here on (closed on refusal too)."""

    def __init__(self, fd: int, mmap_size: int, mmap_offset: int) -> None:
        super().__init__("vhost-log", max_regions=1)
        try:
            if mmap_size == 0:
                raise VhostLogError("SET_LOG_BASE: mmap_size 0")
            if mmap_offset + mmap_size > _U64:
                raise VhostLogError(f"SET_LOG_BASE: offset {mmap_offset:#x} + size {mmap_size:#x} wraps")
            try:
                have = os.fstat(fd).st_size
            except OSError as exc:
                raise VhostLogError(f"SET_LOG_BASE: fd {fd} cannot be used: {exc}") from exc
            if mmap_offset + mmap_size > have:
                raise VhostLogError(
                    f"SET_LOG_BASE: [{mmap_offset:#x}, +{mmap_size:#x}) runs past the fd's size {have:#x}"
                )
            mm, delta = _map_fd(fd, mmap_offset, mmap_size, "SET_LOG_BASE", VhostLogError)
        except VhostLogError:
            _close(fd)
            raise
        arr = np.frombuffer(mm, dtype=np.uint8, count=mmap_size, offset=delta)
        self._regions = [MappedRegion(0, mmap_size, 0, mmap_offset, fd, mm, arr)]
        self._reindex()

    @property
    def log_bytes(self) -> int:
        return self._regions[0].size if self._regions else 0

    @property
    def pages(self) -> int:
        """Guest pages the log covers (one bit per 4 KiB page)."""
        return self.log_bytes * 8


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


assert PAGE_SIZE == 4096  # the vhost-user log is one bit per 4 KiB page (VHOST_LOG_PAGE)
