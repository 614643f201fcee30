"""Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): a back-end restart loses no request.

The back-end creates the region (GET_INFLIGHT_FD: a memfd, laid out as
:mod:`virtio_lm.wire.vhost_user` documents); the front-end keeps the fd and hands it
to the next back-end process on the same socket (SET_INFLIGHT_FD).  Per queue the
back-end keeps, in that shared memory, which heads it took and has not returned:

* a chain taken from the avail ring: ``desc[head].counter`` = the next counter,
  ``desc[head].inflight`` = 1 (:meth:`InflightQueue.take`);
* chains returned (a batch): each head's ``next`` = ``last_batch_head``,
  ``last_batch_head`` = head; the used elements and the used ring's idx are written;
  then each ``inflight`` = 0 and ``used_idx`` = the used ring's idx
  (:meth:`InflightQueue.returned`, around the ring's own push);
* at a ring start on a region that was already in use (a restart): if ``used_idx``
  differs from the used ring's idx, the process died between writing the used ring
  and clearing the batch, so the batch (the list from ``last_batch_head``, as long as
  the difference) is cleared and ``used_idx`` set; every head still marked is a chain
  taken and not returned -- the ring continues from ``used idx + that many`` (every
  chain taken is either returned or marked) and the marked chains are executed again,
  oldest counter first (:meth:`InflightQueue.recover`).

Content of a region handed back by the front-end is untrusted (the front-end never reads
it, but a region is only as good as whoever held the fd): :meth:`InflightRegion.attach`
checks every queue header (version, desc_num), every inflight byte (0 or 1), every
``next`` and ``last_batch_head`` (< desc_num) before anything is used, and refuses the
region (:class:`~virtio_lm.errors.VhostInflightError`) otherwise.
"""

from __future__ import annotations

import mmap
import os
import threading

import numpy as np

from virtio_lm.errors import VhostInflightError
from virtio_lm.wire.vhost_user import (
    INFLIGHT_DESC_DTYPE,
    INFLIGHT_HEADER_DTYPE,
    INFLIGHT_VERSION,
    Inflight,
    inflight_queue_stride,
)

__all__ = ["InflightQueue", "InflightRegion"]

U16 = 0xFFFF
HDR = INFLIGHT_HEADER_DTYPE.itemsize
#: where the fields are, for code that writes the region itself: offsets of the header's
#: last_batch_head and used_idx, the descriptor stride, offsets of its inflight, next, counter
JOURNAL_LAYOUT = (
    INFLIGHT_HEADER_DTYPE.fields["last_batch_head"][1],
    INFLIGHT_HEADER_DTYPE.fields["used_idx"][1],
    INFLIGHT_DESC_DTYPE.itemsize,
    INFLIGHT_DESC_DTYPE.fields["inflight"][1],
    INFLIGHT_DESC_DTYPE.fields["next"][1],
    INFLIGHT_DESC_DTYPE.fields["counter"][1],
)


class InflightQueue:
    """One queue's part of the region (see the module docstring)."""

    def __init__(self, buf: mmap.mmap, offset: int, queue_size: int) -> None:
        self.size = queue_size
        self.hdr = np.ndarray((1,), INFLIGHT_HEADER_DTYPE, buffer=buf, offset=offset)
        self.desc = np.ndarray((queue_size,), INFLIGHT_DESC_DTYPE, buffer=buf, offset=offset + HDR)
        self.inflight = self.desc["inflight"]
        self.counter = self.desc["counter"]
        self.next = self.desc["next"]
        c = self.counter[self.inflight == 1]
        self._counter = int(c.max()) + 1 if c.size else 1
        self._lock = threading.Lock()
        self.fresh = False  # made by this process and not started yet: nothing to recover

    def init(self) -> None:
        self.hdr[0] = (0, INFLIGHT_VERSION, self.size, 0, 0)
        self.desc[:] = np.zeros(self.size, INFLIGHT_DESC_DTYPE)
        self._counter = 1
        self.fresh = True

    def check(self, q: int) -> None:
        h = self.hdr[0]
        if int(h["version"]) != INFLIGHT_VERSION:
            raise VhostInflightError(f"inflight queue {q}: version {int(h['version'])}, not {INFLIGHT_VERSION}")
        if int(h["desc_num"]) != self.size:
            raise VhostInflightError(f"inflight queue {q}: desc_num {int(h['desc_num'])}, the queue size is {self.size}")
        if int(h["last_batch_head"]) >= self.size:
            raise VhostInflightError(f"inflight queue {q}: last_batch_head {int(h['last_batch_head'])} >= {self.size}")
        bad = np.flatnonzero(self.inflight > 1)
        if bad.size:
            raise VhostInflightError(f"inflight queue {q}: desc[{int(bad[0])}].inflight is {int(self.inflight[bad[0]])}")
        bad = np.flatnonzero(self.next >= self.size)
        if bad.size:
            raise VhostInflightError(f"inflight queue {q}: desc[{int(bad[0])}].next {int(self.next[bad[0]])} >= {self.size}")

    # ------------------------------------------------------------------ the data path
    def take(self, head: int) -> None:
        with self._lock:
            self.counter[head] = self._counter
            self._counter += 1
            self.inflight[head] = 1

    def returning(self, heads: list[int]) -> None:
        """Before the used ring is written: the batch list."""
        last = int(self.hdr["last_batch_head"][0])
        for h in heads:
            self.next[h] = last
            last = h
        self.hdr["last_batch_head"][0] = last

    def returned(self, heads: list[int], used_idx: int) -> None:
        """After the used ring's idx was written."""
        for h in heads:
            self.inflight[h] = 0
        self.hdr["used_idx"][0] = used_idx

    def served(self, run):  # type: ignore[no-untyped-def]
        """``run(journal)``'s result, for code that takes and returns chains itself (the C fast
        path of :mod:`virtio_lm.devices.blk`), which records them in this queue's part as
        :meth:`take`, :meth:`returning` and :meth:`returned` do.  ``journal`` is ``(header,
        descriptors, next counter, *JOURNAL_LAYOUT)``; ``run`` returns ``(result, next counter)``."""
        with self._lock:
            result, self._counter = run((self.hdr, self.desc, self._counter, *JOURNAL_LAYOUT))
        return result

    # ------------------------------------------------------------------ restart
    def recover(self, ring_used_idx: int) -> list[int]:
        """The heads to execute again, oldest first (see the module docstring).  A fresh
        region only takes the used ring's idx (a first start may come after a migration)."""
        if self.fresh:
            self.fresh = False
            self.hdr["used_idx"][0] = ring_used_idx
            return []
        stale = (ring_used_idx - int(self.hdr["used_idx"][0])) & U16
        if stale:
            if stale > self.size:
                raise VhostInflightError(
                    f"inflight: used ring idx {ring_used_idx} is {stale} past the region's {int(self.hdr['used_idx'][0])} "
                    f"(more than a queue of {self.size})"
                )
            h = int(self.hdr["last_batch_head"][0])
            for _ in range(stale):
                self.inflight[h] = 0
                h = int(self.next[h])
            self.hdr["used_idx"][0] = ring_used_idx
        heads = np.flatnonzero(self.inflight == 1)
        order = np.argsort(self.counter[heads], kind="stable")
        out = [int(x) for x in heads[order]]
        c = self.counter[heads]
        self._counter = int(c.max()) + 1 if c.size else 1
        return out


class InflightRegion:
    """The whole region: one :class:`InflightQueue` per queue."""

    def __init__(self, fd: int, info: Inflight, *, created: bool) -> None:
        self.fd = fd
        self.info = info
        self.created = created  # made by this process: no chain of an earlier one to recover
        try:
            self.mm = mmap.mmap(fd, info.mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                                offset=info.mmap_offset)
        except (OSError, ValueError, OverflowError) as exc:
            os.close(fd)
            raise VhostInflightError(f"inflight region: mmap of {info.mmap_size} bytes at {info.mmap_offset} failed: {exc}") from exc
        stride = inflight_queue_stride(info.queue_size)
        self.queues = [InflightQueue(self.mm, q * stride, info.queue_size) for q in range(info.num_queues)]

    @staticmethod
    def size_for(num_queues: int, queue_size: int) -> int:
        return num_queues * inflight_queue_stride(queue_size)

    @classmethod
    def create(cls, num_queues: int, queue_size: int) -> "InflightRegion":
        """GET_INFLIGHT_FD: a fresh region (a memfd) with every queue initialised."""
        size = cls.size_for(num_queues, queue_size)
        fd = os.memfd_create("vhost-inflight", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        r = cls(fd, Inflight(size, 0, num_queues, queue_size), created=True)
        for q in r.queues:
            q.init()
        return r

    @classmethod
    def attach(cls, fd: int, info: Inflight, *, max_queues: int, max_size: int) -> "InflightRegion":
        """SET_INFLIGHT_FD: the front-end's region, checked whole before use (owns ``fd``)."""
        try:
            if not 1 <= info.num_queues <= max_queues:
                raise VhostInflightError(f"inflight region: {info.num_queues} queues, the device has {max_queues}")
            qs = info.queue_size
            if qs == 0 or qs & (qs - 1) or qs > max_size:
                raise VhostInflightError(f"inflight region: queue size {qs} is not a power of two <= {max_size}")
            want = cls.size_for(info.num_queues, qs)
            if info.mmap_size != want:
                raise VhostInflightError(f"inflight region: mmap_size {info.mmap_size}, {want} for this shape")
            if info.mmap_offset % mmap.ALLOCATIONGRANULARITY:
                raise VhostInflightError(f"inflight region: mmap_offset {info.mmap_offset} is not page aligned")
            try:
                have = os.fstat(fd).st_size
            except OSError as exc:
                raise VhostInflightError(f"inflight region: fstat: {exc}") from exc
            if info.mmap_offset + info.mmap_size > have:
                raise VhostInflightError(
                    f"inflight region: [{info.mmap_offset}, +{info.mmap_size}) is past the fd's {have} bytes"
                )
        except VhostInflightError:
            os.close(fd)
            raise
        r = cls(fd, info, created=False)
        try:
            for i, q in enumerate(r.queues):
                q.check(i)
        except VhostInflightError:
            r.close()
            raise
        return r

    def same_file(self, fd: int) -> bool:
        """Whether ``fd`` opens this region's file."""
        try:
            a, b = os.fstat(self.fd), os.fstat(fd)
        except OSError:
            return False
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

    def close(self) -> None:
        for q in self.queues:
            del q.hdr, q.desc, q.inflight, q.counter, q.next
        self.queues = []
        try:
            self.mm.close()
        except BufferError:  # a view still exported somewhere: unmapped when collected
            pass
        try:
            os.close(self.fd)
        except OSError:
            pass
