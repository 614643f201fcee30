"""Memory that CPUs and devices read and write: the single DMA path.

A :class:`Memory` is one contiguous mmap of ``size`` bytes addressed from 0
(guest-physical addresses for a VM's memory, bus addresses for a host's PF
driver memory).  Backing is anonymous, a memfd (so a second process can map
the same pages from the fd) or a file.

Nobody writes the mapping directly.  Every write names its
:class:`Writer` -- the CPU (the VM's own stores, logged like a hypervisor's
dirty log) or a device (whose ``tracker`` the PF sets while the proposal's
dirty page tracking is on) -- and the memory calls the writer's sinks with the
pages touched, after the bytes are in place.  A device gets a :class:`MemoryPort`
bound to its writer and never sees the raw mapping, so its writes cannot
escape tracking.  Reads are free.

Every access is bounds-checked first; an access outside the memory or whose
``addr + length`` overflows raises :class:`MemoryAccessError` and touches
nothing.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
from array import array
from typing import Callable, Iterator, Sequence

import numpy as np

from virtio_lm.errors import DmaDisabledError, MemoryAccessError, PlatformTrackingError
from virtio_lm.memory.dirty import PAGE_SHIFT, PAGE_SIZE, RING_DRAIN_AT, RING_MAX_RUN, DirtyLog, DirtySink, RingSink

Buffer = bytes | bytearray | memoryview

#: most buffers one preadv / pwritev takes (the kernel's UIO_MAXIOV)
IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024


def _advance(bufs: list[memoryview], i: int, k: int) -> int:
    """Past ``k`` bytes moved from buffer ``i`` on: the first buffer not yet full, itself cut
    to its unmoved part."""
    while k and i < len(bufs):
        b = bufs[i]
        if k >= len(b):
            k -= len(b)
            i += 1
        else:
            bufs[i] = b[k:]
            k = 0
    return i


def preadv_all(fd: int, offset: int, bufs: list[memoryview]) -> int:
    """Fill ``bufs`` in order from ``fd`` at ``offset`` (``IOV_MAX`` at a time, short reads
    continued) until they are full or the file ends; the bytes read.  ``bufs`` is consumed."""
    total = 0
    i = 0
    while i < len(bufs):
        k = os.preadv(fd, bufs[i : i + IOV_MAX], offset + total)
        if k == 0:
            break
        total += k
        i = _advance(bufs, i, k)
    return total


def pwritev_all(fd: int, offset: int, bufs: list[memoryview]) -> int:
    """Write ``bufs`` in order to ``fd`` at ``offset`` (``IOV_MAX`` at a time, short writes
    continued); the bytes written (all of them: a write that moves nothing is EIO)."""
    total = 0
    i = 0
    while i < len(bufs):
        k = os.pwritev(fd, bufs[i : i + IOV_MAX], offset + total)
        if k <= 0:
            raise OSError(errno.EIO, f"pwritev wrote {k} bytes at offset {offset + total}")
        total += k
        i = _advance(bufs, i, k)
    return total


def read_file_into(fd: int, offset: int, bufs: list[memoryview], pieces: Sequence[tuple[int, int]],
                   writer: Writer) -> int:
    """:func:`preadv_all` into ``bufs`` (the mapped bytes of ``pieces``, which it releases), then
    the pages of what arrived marked for ``writer`` -- every piece's if the read fails part-way
    (what it wrote is not known).  The memories' ``preadv`` share it."""
    try:
        got = preadv_all(fd, offset, list(bufs))
    except BaseException:
        mark_pieces(writer, pieces, sum(n for _, n in pieces))
        raise
    finally:
        for b in bufs:
            b.release()
    mark_pieces(writer, pieces, got)
    return got


def write_file_from(fd: int, offset: int, bufs: list[memoryview]) -> int:
    """:func:`pwritev_all` from ``bufs``, which it releases."""
    try:
        return pwritev_all(fd, offset, list(bufs))
    finally:
        for b in bufs:
            b.release()


def mark_pieces(writer: Writer, pieces: Sequence[tuple[int, int]], nbytes: int) -> None:
    """Tell ``writer`` of the first ``nbytes`` bytes of ``pieces`` (in order) as written: one
    call for them all when the writer has no sink to tell of pages (:meth:`Writer.written_bytes`)."""
    if nbytes > 0 and isinstance(writer, Writer) and not writer.sinks():
        writer.written_bytes(nbytes)
        return
    written = writer.written
    for addr, n in pieces:
        if nbytes <= 0:
            return
        n = min(n, nbytes)
        if n:
            written(addr >> PAGE_SHIFT, (addr + n - 1) >> PAGE_SHIFT, n)
            nbytes -= n


class Writer:
    """Who writes: the CPU or one device.  Holds the sinks told of each write."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.bytes_written = 0

    def sinks(self) -> tuple[DirtySink, ...]:  # overridden
        return ()

    def written(self, first_page: int, last_page: int, nbytes: int) -> None:
        self.bytes_written += nbytes
        for sink in self.sinks():
            sink.mark(first_page, last_page)

    def written_bytes(self, nbytes: int) -> None:
        """``nbytes`` written where no sink is to be told (:meth:`sinks` is empty)."""
        self.bytes_written += nbytes


class CpuWriter(Writer):
    """The VM's own stores; ``log`` is the hypervisor-style dirty log."""

    def __init__(self, name: str, num_pages: int) -> None:
        super().__init__(name)
        self.log = DirtyLog(num_pages)

    def sinks(self) -> tuple[DirtySink, ...]:
        return (self.log,)


class DeviceWriter(Writer):
    """A device's DMA writes.  ``tracker`` is set while the device's own (the
    proposal's) dirty tracking runs; the platform's tracker -- an IOMMU
    translating this device's DMA, outside the device -- is attached with
    :meth:`attach_platform`.

    When the tracker is the only sink and is a :class:`~virtio_lm.memory.dirty.RingSink`,
    a write of up to :data:`~virtio_lm.memory.dirty.RING_MAX_RUN` pages appends to the
    tracker's ring (and drains it at :data:`~virtio_lm.memory.dirty.RING_DRAIN_AT`
    entries) instead of calling ``mark``."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._tracker: DirtySink | None = None
        self._platform: DirtySink | None = None
        self._sinks: tuple[DirtySink, ...] = ()
        self._ring_sink: RingSink | None = None
        self._ring: array | None = None  # the ring sink's ring, looked up once

    @property
    def tracker(self) -> DirtySink | None:
        return self._tracker

    @tracker.setter
    def tracker(self, sink: DirtySink | None) -> None:
        self._tracker = sink
        self._rewire()

    def attach_platform(self, sink: DirtySink) -> None:
        """Route this device's writes through the platform tracker ``sink`` too."""
        if self._platform is not None and self._platform is not sink:
            raise PlatformTrackingError(f"{self.name}: already attached to another platform tracker")
        self._platform = sink
        self._rewire()

    def detach_platform(self, sink: DirtySink) -> None:
        if self._platform is sink:
            self._platform = None
            self._rewire()

    def _rewire(self) -> None:
        t, p = self._tracker, self._platform
        rs = t if p is None and isinstance(t, RingSink) and getattr(t, "ring", None) is not None else None
        self._ring = None  # a write meanwhile takes the slow path, never a stale ring
        self._sinks = tuple(s for s in (t, p) if s is not None)
        self._ring_sink = rs
        self._ring = rs.ring if rs is not None else None

    @property
    def platform(self) -> DirtySink | None:
        return self._platform

    def sinks(self) -> tuple[DirtySink, ...]:
        return self._sinks

    def written(self, first_page: int, last_page: int, nbytes: int,
                _drain_at: int = RING_DRAIN_AT, _max_run: int = RING_MAX_RUN) -> None:
        self.bytes_written += nbytes
        ring = self._ring
        if ring is not None:  # the hot path: a few C calls, no Python frame
            if first_page == last_page:
                ring.append(first_page)
            elif last_page - first_page < _max_run:
                ring.extend((~first_page, last_page))  # a run (see RingSink); one C call: writers
                # on other threads cannot come between its two entries
            else:
                ring = None
            if ring is not None:
                if len(ring) >= _drain_at:
                    rs = self._ring_sink
                    if rs is not None:
                        rs.drain()
                return
        for sink in self._sinks:
            sink.mark(first_page, last_page)


class Memory:
    """A bounds-checked, write-logged mmap region."""

    def __init__(
        self,
        size: int,
        *,
        name: str = "memory",
        backing: str = "anon",
        path: str | os.PathLike[str] | None = None,
        fd: int | None = None,
    ) -> None:
        """Create (or map) ``size`` bytes.

        ``backing`` is ``"anon"`` (private to this process), ``"memfd"``
        (a new memfd, shareable via :attr:`fd`), ``"file"`` (``path``,
        created or extended to ``size``) or ``"fd"`` (map an existing shared
        fd, e.g. a memfd received from another process).
        """
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"memory size must be a positive multiple of {PAGE_SIZE}, got {size}")
        self.name = name
        self.size = size
        self.num_pages = size >> PAGE_SHIFT
        #: only this process can map it (anonymous backing): every read goes through this object
        self.private = backing == "anon"
        self.fd: int | None = None
        self._own_fd = False
        if backing == "anon":
            self._mm = mmap.mmap(-1, size)
        elif backing == "memfd":
            self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
            self._own_fd = True
            os.ftruncate(self.fd, size)
            self._mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        elif backing == "file":
            if path is None:
                raise ValueError("backing='file' needs path")
            self.fd = os.open(os.fspath(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._own_fd = True
            if os.fstat(self.fd).st_size < size:
                os.ftruncate(self.fd, size)
            self._mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        elif backing == "fd":
            if fd is None:
                raise ValueError("backing='fd' needs fd")
            if os.fstat(fd).st_size < size:
                raise ValueError(f"fd {fd} is smaller than {size} bytes")
            self.fd = fd
            self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        else:
            raise ValueError(f"unknown backing {backing!r}")
        self._rw = np.frombuffer(self._mm, dtype=np.uint8)
        self._ro = self._rw.view()
        self._ro.flags.writeable = False
        self._atomic = threading.Lock()
        self._barriers: tuple[Callable[[], None], ...] = ()
        self.cpu = MemoryPort(self, CpuWriter(f"{name}.cpu", self.num_pages))

    # ------------------------------------------------------------------ checks
    def check(self, addr: int, length: int) -> None:
        """Raise :class:`MemoryAccessError` unless ``[addr, addr+length)`` is inside."""
        if addr < 0 or length < 0 or addr + length > self.size:
            raise MemoryAccessError(self.name, addr, length, self.size)

    def contains(self, addr: int, length: int) -> bool:
        return 0 <= addr and 0 <= length and addr + length <= self.size

    # ------------------------------------------------------------------ read barriers
    def add_read_barrier(self, drain: Callable[[], None]) -> None:
        """Call ``drain`` before every read of this memory (a push tracker's ring, whose
        marks belong in a map here: whoever reads the map sees every mark made before).
        Only for a :attr:`private` memory: another process's reads of a shared one pass no
        barrier (ValueError)."""
        if not self.private:
            raise ValueError(f"{self.name}: another process may map this memory; no read barrier reaches it")
        self._barriers = (*self._barriers, drain)

    def remove_read_barrier(self, drain: Callable[[], None]) -> None:
        self._barriers = tuple(b for b in self._barriers if b != drain)

    def _drain(self) -> None:
        for drain in self._barriers:
            drain()

    def _check_read(self, addr: int, length: int) -> None:
        """:meth:`check`, then pass the read barriers (outside any lock: a drain takes them)."""
        self.check(addr, length)
        if self._barriers:
            self._drain()

    # ------------------------------------------------------------------ reads
    def read(self, addr: int, length: int) -> bytes:
        self._check_read(addr, length)
        return self._mm[addr : addr + length]

    def readv(self, pieces: Sequence[tuple[int, int]]) -> bytes:
        """The bytes of several ``(addr, length)`` pieces, concatenated (a chain's gather); every
        piece is checked before any is read."""
        for addr, length in pieces:
            self.check(addr, length)
        if self._barriers:
            self._drain()
        mm = self._mm
        return b"".join([mm[addr : addr + length] for addr, length in pieces])

    def readinto(self, addr: int, buf: bytearray | memoryview) -> None:
        n = len(buf)
        self._check_read(addr, n)
        memoryview(buf).cast("B")[:] = memoryview(self._mm)[addr : addr + n]

    @property
    def array(self) -> np.ndarray:
        """Read-only numpy view of the whole memory (uint8)."""
        if self._barriers:
            self._drain()
        return self._ro

    # ------------------------------------------------------------------ writes
    def write(self, addr: int, data: Buffer, writer: Writer) -> None:
        n = len(data)
        self.check(addr, n)
        if n == 0:
            return
        self._mm[addr : addr + n] = data
        writer.written(addr >> PAGE_SHIFT, (addr + n - 1) >> PAGE_SHIFT, n)

    def writev(self, pieces: Sequence[tuple[int, Buffer]], writer: Writer) -> None:
        """Several writes in one call (a chain's scatter): every piece is checked before any byte
        is written, then each is written and its pages marked as :meth:`write` does."""
        for addr, data in pieces:
            self.check(addr, len(data))
        mm = self._mm
        written = writer.written
        for addr, data in pieces:
            n = len(data)
            if n:
                mm[addr : addr + n] = data
                written(addr >> PAGE_SHIFT, (addr + n - 1) >> PAGE_SHIFT, n)

    # ------------------------------------------------------------------ file I/O (DMA to and from a file)
    def preadv(self, fd: int, offset: int, pieces: Sequence[tuple[int, int]], writer: Writer) -> int:
        """Read ``fd`` from ``offset`` straight into the ``(addr, length)`` pieces, in order (a
        chain's scatter, zero-copy); the bytes read, fewer than the pieces hold only where the
        file ends.  Every piece is checked before any byte moves; the pages of the bytes that
        arrived are marked as :meth:`write` marks them -- all the pieces' pages if the read
        fails part-way (what it wrote is not known)."""
        for addr, length in pieces:
            self.check(addr, length)
        with memoryview(self._mm) as mv:
            bufs = [mv[addr : addr + length] for addr, length in pieces if length]
        return read_file_into(fd, offset, bufs, pieces, writer)

    def pwritev(self, fd: int, offset: int, pieces: Sequence[tuple[int, int]]) -> int:
        """Write the ``(addr, length)`` pieces, in order, to ``fd`` from ``offset`` (a chain's
        gather, zero-copy); every piece is checked and the read barriers passed first."""
        for addr, length in pieces:
            self._check_read(addr, length)
        with memoryview(self._mm) as mv:
            bufs = [mv[addr : addr + length] for addr, length in pieces if length]
        return write_file_from(fd, offset, bufs)

    def fill(self, addr: int, length: int, value: int, writer: Writer) -> None:
        self.check(addr, length)
        if length == 0:
            return
        self._rw[addr : addr + length] = value
        writer.written(addr >> PAGE_SHIFT, (addr + length - 1) >> PAGE_SHIFT, length)

    @contextlib.contextmanager
    def modify(self, addr: int, length: int, writer: Writer) -> Iterator[np.ndarray]:
        """A writable numpy view of ``[addr, addr+length)``; pages marked on exit."""
        self._check_read(addr, length)
        view = self._rw[addr : addr + length]
        try:
            yield view
        finally:
            if length:
                writer.written(addr >> PAGE_SHIFT, (addr + length - 1) >> PAGE_SHIFT, length)

    def atomic_or(self, addr: int, data: Buffer, writer: Writer) -> None:
        """OR ``data`` into memory, atomic against :meth:`atomic_fetch_and_clear`."""
        n = len(data)
        self.check(addr, n)
        if n == 0:
            return
        with self._atomic:
            cur = self._rw[addr : addr + n]
            np.bitwise_or(cur, np.frombuffer(data, dtype=np.uint8), out=cur)
        writer.written(addr >> PAGE_SHIFT, (addr + n - 1) >> PAGE_SHIFT, n)

    def atomic_or_at(self, addrs: np.ndarray, value: int, writer: Writer) -> None:
        """OR ``value`` into the byte at each of ``addrs`` (a scatter, e.g. sparse marks of a
        bytemap), atomic like :meth:`atomic_or`.  The writer is told of the page range from the
        lowest to the highest address (a superset of the pages written)."""
        if len(addrs) == 0:
            return
        lo, hi = int(addrs.min()), int(addrs.max())
        self.check(lo, hi - lo + 1)
        with self._atomic:
            rw = self._rw
            rw[addrs] = rw[addrs] | value
        writer.written(lo >> PAGE_SHIFT, hi >> PAGE_SHIFT, len(addrs))

    def atomic_or_byte(self, addr: int, value: int, writer: Writer) -> None:
        """OR one byte (the common case of a dirty mark), atomic like :meth:`atomic_or`."""
        self.check(addr, 1)
        mm = self._mm
        with self._atomic:
            mm[addr] = mm[addr] | value
        writer.written(addr >> PAGE_SHIFT, addr >> PAGE_SHIFT, 1)

    def atomic_store_byte(self, addr: int, value: int, writer: Writer) -> None:
        """Store one byte, atomic against :meth:`atomic_fetch_and_clear`."""
        self.check(addr, 1)
        with self._atomic:
            self._rw[addr] = value
        writer.written(addr >> PAGE_SHIFT, addr >> PAGE_SHIFT, 1)

    def atomic_fetch_and_clear(self, addr: int, length: int, writer: Writer) -> np.ndarray:
        """Return a copy of ``[addr, addr+length)`` and zero it, atomically."""
        self._check_read(addr, length)  # drains outside the lock: a drain takes it to write the marks
        with self._atomic:
            out = self._rw[addr : addr + length].copy()
            self._rw[addr : addr + length] = 0
        if length:
            writer.written(addr >> PAGE_SHIFT, (addr + length - 1) >> PAGE_SHIFT, length)
        return out

    # ------------------------------------------------------------------ scans
    def zero_pages(self, first_page: int = 0, count: int | None = None) -> np.ndarray:
        """Boolean array: which of pages ``first_page..first_page+count-1`` are all zero."""
        if count is None:
            count = self.num_pages - first_page
        self._check_read(first_page << PAGE_SHIFT, count << PAGE_SHIFT)
        words = self._ro[first_page << PAGE_SHIFT : (first_page + count) << PAGE_SHIFT].view(np.uint64)
        return ~words.reshape(count, PAGE_SIZE // 8).any(axis=1)

    def populated_pages(self) -> np.ndarray:
        """Boolean array over all pages: False where the page is certainly zero because
        its backing has no data there (a hole of an fd-backed memory: a fresh memfd
        is all holes), True where it may hold data.  Found with ``SEEK_DATA`` /
        ``SEEK_HOLE``, without touching a page; anonymous memory: all True."""
        out = np.ones(self.num_pages, dtype=bool)
        if self.fd is None:
            return out
        out[:] = False
        pos = 0
        while pos < self.size:
            try:
                start = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            if start >= self.size:
                break
            end = min(os.lseek(self.fd, start, os.SEEK_HOLE), self.size)
            out[start >> PAGE_SHIFT : (end + PAGE_SIZE - 1) >> PAGE_SHIFT] = True
            pos = end
        return out

    def page(self, page: int) -> np.ndarray:
        """Read-only view of one page."""
        self._check_read(page << PAGE_SHIFT, PAGE_SIZE)
        return self._ro[page << PAGE_SHIFT : (page + 1) << PAGE_SHIFT]

    # ------------------------------------------------------------------ ports
    def pinned(self) -> contextlib.AbstractContextManager[tuple[tuple[int, np.ndarray], ...] | None]:
        """The whole memory as one region, ``((0, writable bytes),)``, for code that moves the
        bytes itself and then calls :meth:`tell_written` -- or ``None`` while a read barrier is
        registered: reads must pass it, and code moving the bytes itself would not.  The region
        is a numpy view: while it lives the mapping cannot be closed under it."""
        if self._barriers:
            return contextlib.nullcontext(None)
        return contextlib.nullcontext(((0, self._rw),))

    def tell_written(self, writer: Writer, written: bytes | None, nbytes: int) -> None:
        """Tell ``writer`` of writes made through :meth:`pinned`: ``written`` holds them as
        little-endian u64 ``(addr, len)`` pairs, ``nbytes`` their total.  ``None`` (the list was
        lost): every page counts as written."""
        if written is None:
            writer.written(0, self.num_pages - 1, 0)
            writer.written_bytes(nbytes)
            return
        mark_pieces(writer, np.frombuffer(written, dtype="<u8").reshape(-1, 2).tolist(), nbytes)

    def device_port(self, name: str) -> "MemoryPort":
        """A port for one device's DMA; its writer's ``tracker`` starts unset."""
        return MemoryPort(self, DeviceWriter(name))

    def close(self) -> None:
        """Unmap (and close an owned fd).  If numpy views of the memory are still
        alive somewhere, the mapping is left for the garbage collector instead."""
        del self._ro, self._rw
        try:
            self._mm.close()
        except BufferError:
            pass  # exported views remain; the mapping goes when they do
        if self._own_fd and self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "Memory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Memory({self.name!r}, size={self.size:#x})"


class MemoryPort:
    """Memory as one writer sees it: what devices and queues are handed.

    Reads and writes go to :attr:`memory`; every write is attributed to
    :attr:`writer`.  This is the object virtqueue functions take as their
    memory parameter.  :attr:`bus_master` is the function's bus-master
    enable: while it is off (a VF in QUIESCED or FREEZED) every access
    through the port raises :class:`DmaDisabledError` and touches nothing.
    """

    __slots__ = ("memory", "writer", "bus_master")

    def __init__(self, memory: Memory, writer: Writer) -> None:
        self.memory = memory
        self.writer = writer
        self.bus_master = True

    def _gate(self, op: str, addr: int, length: int) -> None:
        if not self.bus_master:
            raise DmaDisabledError(self.writer.name, op, addr, length)

    @property
    def size(self) -> int:
        return self.memory.size

    def check(self, addr: int, length: int) -> None:
        self.memory.check(addr, length)

    def contains(self, addr: int, length: int) -> bool:
        return self.memory.contains(addr, length)

    def read(self, addr: int, length: int) -> bytes:
        if not self.bus_master:  # (the gate inline on the hot paths: one attribute test)
            self._gate("read", addr, length)
        return self.memory.read(addr, length)

    def readv(self, pieces: Sequence[tuple[int, int]]) -> bytes:
        if not self.bus_master and pieces:
            self._gate("read", pieces[0][0], sum(n for _, n in pieces))
        return self.memory.readv(pieces)

    def readinto(self, addr: int, buf: bytearray | memoryview) -> None:
        self._gate("read", addr, len(buf))
        self.memory.readinto(addr, buf)

    def write(self, addr: int, data: Buffer) -> None:
        if not self.bus_master:
            self._gate("write", addr, len(data))
        self.memory.write(addr, data, self.writer)

    def writev(self, pieces: Sequence[tuple[int, Buffer]]) -> None:
        if not self.bus_master and pieces:
            self._gate("write", pieces[0][0], sum(len(d) for _, d in pieces))
        self.memory.writev(pieces, self.writer)

    def preadv(self, fd: int, offset: int, pieces: Sequence[tuple[int, int]]) -> int:
        """DMA from a file into ``pieces`` (:meth:`Memory.preadv`); a write of guest memory."""
        if not self.bus_master and pieces:
            self._gate("write", pieces[0][0], sum(n for _, n in pieces))
        return self.memory.preadv(fd, offset, pieces, self.writer)

    def pwritev(self, fd: int, offset: int, pieces: Sequence[tuple[int, int]]) -> int:
        """DMA from ``pieces`` to a file (:meth:`Memory.pwritev`); a read of guest memory."""
        if not self.bus_master and pieces:
            self._gate("read", pieces[0][0], sum(n for _, n in pieces))
        return self.memory.pwritev(fd, offset, pieces)

    def pinned(self) -> contextlib.AbstractContextManager[tuple[tuple[int, np.ndarray], ...] | None]:
        """The memory's regions as ``(gpa, writable bytes)`` pairs while the context lasts, for code
        that moves data itself and then calls :meth:`tell_written`; ``None`` where the memory does
        not offer them.  The caller checks :attr:`bus_master` first."""
        return self.memory.pinned()

    def tell_written(self, written: bytes | None, nbytes: int) -> None:
        """Attribute writes made through :meth:`pinned` to :attr:`writer` (see the memory's own)."""
        self.memory.tell_written(self.writer, written, nbytes)  # type: ignore[attr-defined]

    def fill(self, addr: int, length: int, value: int = 0) -> None:
        self._gate("write", addr, length)
        self.memory.fill(addr, length, value, self.writer)

    def modify(self, addr: int, length: int) -> contextlib.AbstractContextManager[np.ndarray]:
        self._gate("write", addr, length)
        return self.memory.modify(addr, length, self.writer)

    def atomic_or(self, addr: int, data: Buffer) -> None:
        self._gate("write", addr, len(data))
        self.memory.atomic_or(addr, data, self.writer)

    def atomic_or_at(self, addrs: np.ndarray, value: int) -> None:
        if len(addrs):
            self._gate("write", int(addrs.min()), 1)
        self.memory.atomic_or_at(addrs, value, self.writer)

    def atomic_or_byte(self, addr: int, value: int) -> None:
        self._gate("write", addr, 1)
        self.memory.atomic_or_byte(addr, value, self.writer)

    def atomic_store_byte(self, addr: int, value: int) -> None:
        self._gate("write", addr, 1)
        self.memory.atomic_store_byte(addr, value, self.writer)

    def atomic_fetch_and_clear(self, addr: int, length: int) -> np.ndarray:
        self._gate("write", addr, length)
        return self.memory.atomic_fetch_and_clear(addr, length, self.writer)

    def __repr__(self) -> str:
        return f"MemoryPort({self.memory.name!r}, writer={self.writer.name!r})"
