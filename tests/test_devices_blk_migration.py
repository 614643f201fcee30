"""Live migration of a virtio-blk VF between two PFs, two host memories and two guest memories.

The source guest keeps 64+ requests in flight (reads into guest buffers and
writes carrying (lba, generation, checksum)) while the host PF driver
(:class:`~virtio_lm.drivers.pf_driver.PfDriver`, through the PF's real
control queue) starts dirty tracking, the guest memory is copied once in
full and then by dirty pages (the VF's device DMA from the tracker, the
guest's own stores from the CPU dirty log), the VF is QUIESCED and FREEZED,
its image is saved in portions and restored into the destination VF, which
then runs.  The guest driver resumes on the destination from its
bookkeeping and reaps.

The back-end is metered (a semaphore the test releases) so that, at the
freeze, all three kinds of request exist deterministically: (a) completed
and returned on the source but not yet reaped by the guest (their data
reaches the destination only through dirty tracking), (b) executed on the
source while quiesced (held completions, written by the destination
without re-executing), (c) not started (cancelled, re-executed by the
destination from the descriptors in migrated guest memory); plus requests
the guest submitted while the VF was QUIESCED (kicks to remember).

Checks (each with a negative control that makes it fail): every request
completes exactly once from the guest's view; read data and disk content
are right; every write is stable at FREEZED; nothing written by the source
after FREEZED.
"""

from __future__ import annotations

import random
import threading
import time
import zlib
from dataclasses import dataclass, field, replace

import numpy as np
import pytest

from virtio_lm.devices.base import DirectWork, QueueDevice, ReqState
from virtio_lm.devices.blk import BlkDevice
from virtio_lm.drivers.blk_driver import BlkCompletion, BlkDriver
from virtio_lm.drivers.pf_driver import PfDriver
from virtio_lm.errors import ControlCommandError, DriverError, UsedRingError
from virtio_lm.memory import PAGE_SHIFT, PAGE_SIZE, Memory
from virtio_lm.pf.device import build_pf
from virtio_lm.virtqueue.driver import Allocator
from virtio_lm.wire.blk import BlkStatus
from virtio_lm.wire.ctrl import TrackMode, VfState
from virtio_lm.wire.state import QueueRecord, RecordType, StateImage, decode_image, encode_image

BLOCK = 4096
NBLOCKS = 2048  # 8 MiB image
GUEST_SIZE = 16 << 20
HOST_SIZE = 4 << 20
READ_SLOTS = 256
FINAL_BATCH = 64
RELEASE_BEFORE_QUIESCE = 12
THREADS = 8
WAIT = 30.0  # guard against hangs only


# ============================================================================ block content
def make_block(lba: int, gen: int) -> bytes:
    """A 4 KiB block: le64 lba, le64 generation, le32 crc32(payload), payload."""
    payload = np.random.default_rng((lba << 20) | gen).integers(0, 256, BLOCK - 20, dtype=np.uint8).tobytes()
    return lba.to_bytes(8, "little") + gen.to_bytes(8, "little") + zlib.crc32(payload).to_bytes(4, "little") + payload


def block_ok(raw: bytes, lba: int, gen: int) -> bool:
    if len(raw) != BLOCK:
        return False
    if int.from_bytes(raw[:8], "little") != lba or int.from_bytes(raw[8:16], "little") != gen:
        return False
    return zlib.crc32(raw[20:]) == int.from_bytes(raw[16:20], "little") and raw == make_block(lba, gen)


# ============================================================================ devices
class MeteredBlkDevice(BlkDevice):
    """Back-end work waits for a permit (:meth:`release`) before it touches the image."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.permits = threading.Semaphore(0)
        self._m = threading.Lock()
        self.started = 0
        self.finished = 0

    def release(self, n: int) -> None:
        if n > 0:
            self.permits.release(n)

    def handle(self, fn, queue, chain):
        work = super().handle(fn, queue, chain)
        if not callable(work):
            return work

        def metered(run, *args):
            with self._m:
                self.started += 1
            try:
                if not self.permits.acquire(timeout=WAIT):
                    raise TimeoutError("no permit")
                return run(*args)
            finally:
                with self._m:
                    self.finished += 1

        if isinstance(work, DirectWork):  # both forms metered: the base picks one
            return DirectWork(lambda port: metered(work.direct, port), lambda: metered(work.buffered))
        return lambda: metered(work)


class ForgetfulBlkDevice(MeteredBlkDevice):
    """BROKEN: saves no INFLIGHT records and pretends every chain was returned
    (used_idx = last_avail_idx in the QUEUE records), so the image validates."""

    def mig_save(self) -> bytes:
        img = decode_image(super().mig_save())
        out = StateImage(img.device_id)
        for r in img.records:
            if r.type == RecordType.INFLIGHT:
                continue
            if r.type == RecordType.QUEUE:
                q = QueueRecord.decode(r.payload)
                out.add(r.type, replace(q, used_idx=q.last_avail_idx).encode())
            else:
                out.add(r.type, r.payload)
        return encode_image(out)


class DropInflightBlkDevice(MeteredBlkDevice):
    """BROKEN: drops the INFLIGHT records only."""

    def mig_save(self) -> bytes:
        img = decode_image(super().mig_save())
        out = StateImage(img.device_id)
        for r in img.records:
            if r.type != RecordType.INFLIGHT:
                out.add(r.type, r.payload)
        return encode_image(out)


class NoFlushBlkDevice(MeteredBlkDevice):
    """BROKEN: freezes without making the image's writes stable."""

    def mig_freeze(self, timeout: float = 10.0) -> None:
        QueueDevice.mig_freeze(self, timeout)


# ============================================================================ rig
@dataclass
class Host:
    mem: Memory
    pfd: PfDriver
    guest: Memory
    dev: BlkDevice

    @property
    def vf(self):
        return self.pfd.pf.vf(1)

    def close(self) -> None:
        if isinstance(self.dev, MeteredBlkDevice):
            self.dev.release(10_000)
        self.pfd.pf.device.close()
        self.dev.close()
        self.guest.close()
        self.mem.close()


def make_host(name: str, image, dev_cls) -> Host:
    mem = Memory(HOST_SIZE, name=f"{name}-host")
    pf = build_pf(mem.device_port(f"{name}.pf"), total_vfs=2, name=f"{name}.pf")
    pfd = PfDriver(pf, mem.cpu, Allocator(0x10000, HOST_SIZE - 0x10000), timeout=WAIT)
    pfd.bring_up()
    guest = Memory(GUEST_SIZE, name=f"{name}-guest")
    box = {}

    def factory(n: int):
        box["dev"] = dev_cls(image, num_queues=2, backend_threads=THREADS)
        return box["dev"], guest.device_port(f"{name}.vf{n}")

    pfd.enable_vfs(1, factory)
    return Host(mem, pfd, guest, box["dev"])


@dataclass
class Workload:
    """The guest's side: what it submitted, reaped, and expects."""

    drv: BlkDriver
    slots: list[int]
    gen: dict[int, int] = field(default_factory=dict)  # lba -> generation on disk (model)
    outstanding: dict[int, tuple[str, int, int, int | None]] = field(default_factory=dict)  # token -> (kind, lba, gen, slot)
    busy: set[int] = field(default_factory=set)
    reaped: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    next_gen: int = 1
    rng: random.Random = field(default_factory=lambda: random.Random(4))

    def _free_lba(self) -> int:
        while True:
            lba = self.rng.randrange(NBLOCKS)
            if lba not in self.busy:
                return lba

    def submit(self, kind: str) -> int:
        lba = self._free_lba()
        self.busy.add(lba)
        if kind == "w":
            gen = self.next_gen
            self.next_gen += 1
            t = self.drv.submit_write(lba * 8, make_block(lba, gen))
            self.gen[lba] = gen
            self.outstanding[t] = ("w", lba, gen, None)
        else:
            slot = self.slots.pop()
            t = self.drv.submit_read(lba * 8, 8, buf=slot)
            self.outstanding[t] = ("r", lba, self.gen.get(lba, 0), slot)
        return t

    def check(self, c: BlkCompletion, drv: BlkDriver) -> None:
        entry = self.outstanding.pop(c.token, None)
        if entry is None:
            self.problems.append(f"token {c.token} completed twice or never submitted")
            return
        self.reaped.append(c.token)
        kind, lba, gen, slot = entry
        self.busy.discard(lba)
        if c.status != BlkStatus.OK:
            self.problems.append(f"{kind} lba {lba}: status {c.status}")
        if kind == "r":
            if c.data is None or not block_ok(c.data, lba, gen):
                self.problems.append(f"read lba {lba} gen {gen}: wrong data in the guest buffer")
            self.slots.append(slot)

    def reap(self, drv: BlkDriver, limit: int | None = None) -> None:
        for c in drv.reap():
            self.check(c, drv)


def prepare_image(path) -> None:
    with open(path, "wb") as f:
        for lba in range(NBLOCKS):
            f.write(make_block(lba, 0))


def copy_pages(src: Memory, dst: Memory, pages: np.ndarray) -> int:
    idx = np.flatnonzero(pages)
    for p in idx:
        dst.cpu.write(int(p) << PAGE_SHIFT, src.read(int(p) << PAGE_SHIFT, PAGE_SIZE))
    return len(idx)


def wait_for(cond, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


@dataclass
class Result:
    problems: list[str]
    restore_error: Exception | None = None
    unsynced_at_freeze: int = 0
    kinds: dict[str, int] = field(default_factory=dict)


def migrate(tmp_path, src_cls=MeteredBlkDevice, *, copy_device_dirty: bool = True) -> Result:
    image = tmp_path / "shared.raw"
    prepare_image(image)
    src = make_host("src", image, src_cls)
    dst = make_host("dst", image, BlkDevice)
    try:
        return _migrate(src, dst, image, copy_device_dirty)
    finally:
        src.close()
        dst.close()


def _migrate(src: Host, dst: Host, image, copy_device_dirty: bool) -> Result:
    dev = src.dev
    assert isinstance(dev, MeteredBlkDevice)
    alloc = Allocator(0x1000, GUEST_SIZE - 0x1000)
    slot_base = alloc.alloc(READ_SLOTS * BLOCK, PAGE_SIZE)  # read buffers: only the device writes them
    drv = BlkDriver(src.vf, src.guest.cpu, alloc, queue_size=128)
    assert len(drv.queues) == 2
    wl = Workload(drv, [slot_base + i * BLOCK for i in range(READ_SLOTS)][::-1])

    # --- tracking on: the VF's DMA (PF tracker) and the guest's stores (CPU dirty log)
    src.pfd.start_tracking(1, TrackMode.PULL_BITMAP)
    src.guest.cpu.writer.log.start()

    # --- phase A: I/O runs while the whole memory is copied
    for i in range(48):
        wl.submit("w" if i % 2 else "r")
    dev.release(48)
    dst.guest.cpu.write(0, src.guest.read(0, GUEST_SIZE))
    # --- phase B: keep the queue busy, reap some, submit more
    for _ in range(3):
        wl.reap(drv)
        n = 0
        while drv.in_flight() < 48:
            wl.submit("w" if n % 2 else "r")
            n += 1
        dev.release(n)
    wait_for(lambda: dev.in_flight == 0, "phase B to settle on the device")
    # --- final batch: the device holds every permit back
    assert dev.started == dev.finished and dev.permits.acquire(blocking=False) is False
    for i in range(FINAL_BATCH):
        wl.submit("w" if i % 2 else "r")
    wait_for(lambda: dev.started - dev.finished == THREADS, "the pool to start its threads")
    base = dev.completed
    dev.release(RELEASE_BEFORE_QUIESCE)  # (a): returned on the source, not reaped by the guest
    wait_for(lambda: dev.completed == base + RELEASE_BEFORE_QUIESCE, "completions before quiesce")
    assert drv.in_flight() >= 32 + RELEASE_BEFORE_QUIESCE

    # --- QUIESCED: the guest still runs and kicks
    src.pfd.set_state(1, VfState.QUIESCED)
    for i in range(4):
        wl.submit("w" if i % 2 else "r")
    state = drv.save()  # the vCPUs stop here: the driver's bookkeeping migrates with the VM
    # --- FREEZED: not-started work cancelled, running work finishes into held completions
    err: list[BaseException] = []

    def freeze():
        try:
            src.pfd.set_state(1, VfState.FREEZED)
        except BaseException as exc:  # noqa: BLE001 - reported below
            err.append(exc)

    th = threading.Thread(target=freeze)
    th.start()

    def cancelled() -> bool:
        reqs = dev.requests()
        running = sum(r.state is ReqState.RUNNING for r in reqs)
        return running == dev.started - dev.finished or not th.is_alive()

    wait_for(cancelled, "the freeze to cancel work not started")
    dev.release(10_000)
    th.join(WAIT)
    assert not err, err
    kinds = {s.name: 0 for s in ReqState}
    for r in dev.requests():
        kinds[r.state.name] += 1
    res = Result(wl.problems, kinds=kinds)
    res.unsynced_at_freeze = dev.unsynced_writes
    writes_at_freeze = dev.writes

    # --- last copy: dirty pages only
    pages = src.guest.cpu.writer.log.collect()
    device_pages = src.pfd.collect_dirty(1)
    if copy_device_dirty:
        pages |= device_pages
    copy_pages(src.guest, dst.guest, pages)
    blob = src.pfd.save_image(1, portion=4096)

    # --- destination: FREEZED, RESTORE_STATE portions, QUIESCED, RUNNING
    dst.pfd.set_state(1, VfState.FREEZED)
    dst.pfd.restore_image(1, blob, portion=4096)
    try:
        dst.pfd.set_state(1, VfState.QUIESCED)
    except ControlCommandError as exc:
        res.restore_error = exc
        res.problems.append(f"destination refused the image: {exc}")
        return res
    dst.pfd.set_state(1, VfState.RUNNING)
    src.pfd.flr_vf(1)  # the source VF is done with; its cancelled requests must never run there

    # --- the guest resumes on the destination and reaps
    ddrv = BlkDriver.from_state(state, fn=dst.vf, port=dst.guest.cpu)
    if not dst.dev.wait_idle(WAIT):
        res.problems.append(f"destination device still holds {dst.dev.in_flight} requests")
    try:
        wl.reap(ddrv)
    except UsedRingError as exc:
        res.problems.append(f"used ring: {exc}")
    if wl.outstanding:
        res.problems.append(f"{len(wl.outstanding)} requests never completed: {sorted(wl.outstanding)[:8]}")
    if len(wl.reaped) != len(set(wl.reaped)):
        res.problems.append("a request was reaped twice")
    for q, dq in ddrv.queues.items():
        if not (dq.used_idx() == dq.last_used_idx == dq.avail_idx):
            res.problems.append(f"queue {q}: used idx {dq.used_idx()}, reaped {dq.last_used_idx}, avail {dq.avail_idx}")
    # --- the disk, through the file and through the destination's device
    with open(image, "rb") as f:
        for lba in range(NBLOCKS):
            raw = f.read(BLOCK)
            if not block_ok(raw, lba, wl.gen.get(lba, 0)):
                res.problems.append(f"disk lba {lba}: not generation {wl.gen.get(lba, 0)}")
    try:
        for lba in random.Random(5).sample(sorted(wl.gen), 16):
            if not block_ok(ddrv.read(lba * 8, 8, timeout=5), lba, wl.gen[lba]):
                res.problems.append(f"destination read of lba {lba} is wrong")
    except DriverError as exc:
        res.problems.append(f"destination I/O after the migration failed: {exc!r}")
    if dev.writes != writes_at_freeze:
        res.problems.append(f"the source wrote {dev.writes - writes_at_freeze} times after FREEZED")
    if res.unsynced_at_freeze:
        res.problems.append(f"{res.unsynced_at_freeze} writes not stable at FREEZED")
    return res


# ============================================================================ tests
@pytest.mark.slow  # over 0.4 s: out of the one-minute fast subset (CI runs it)
def test_migration_with_requests_in_flight(tmp_path):
    res = migrate(tmp_path)
    assert res.problems == []
    # the three kinds of in-flight request existed at the freeze
    assert res.kinds["DONE"] >= THREADS and res.kinds["PENDING"] >= 16, res.kinds
    assert res.kinds["RUNNING"] == 0


@pytest.mark.slow  # 0.3 s or more: out of the one-minute fast subset (CI runs it)
def test_negative_forgetful_save_is_caught(tmp_path):
    res = migrate(tmp_path, ForgetfulBlkDevice)
    assert res.restore_error is None  # the lie passes validation ...
    assert any("never completed" in p or "used ring" in p for p in res.problems), res.problems  # ... not the guest


def test_negative_dropped_inflight_records_refused(tmp_path):
    res = migrate(tmp_path, DropInflightBlkDevice)
    assert res.restore_error is not None


@pytest.mark.slow  # 0.3 s or more: out of the one-minute fast subset (CI runs it)
def test_negative_no_flush_at_freeze_is_caught(tmp_path):
    res = migrate(tmp_path, NoFlushBlkDevice)
    assert res.unsynced_at_freeze > 0
    assert any("not stable" in p for p in res.problems)


@pytest.mark.slow  # 0.3 s or more: out of the one-minute fast subset (CI runs it)
def test_negative_without_device_dirty_pages_reads_are_wrong(tmp_path):
    res = migrate(tmp_path, copy_device_dirty=False)
    assert any("wrong data in the guest buffer" in p for p in res.problems), res.problems


# ============================================================================ image validation
@pytest.fixture
def pair(tmp_path):
    a = tmp_path / "a.raw"
    b = tmp_path / "b.raw"
    a.write_bytes(bytes(1 << 20))
    b.write_bytes(bytes(2 << 20))
    made = []

    def _dev(path, **kw):
        from virtio_lm.pci import VirtioPciFunction

        mem = Memory(4 << 20)
        d = BlkDevice(path, **kw)
        fn = VirtioPciFunction(d, mem.device_port("vf"), name="vf")
        made.append((d, mem))
        return d, fn

    yield a, b, _dev
    for d, mem in made:
        d.close()
        mem.close()


def _frozen_image(dev, fn) -> bytes:
    BlkDriver(fn, fn.port.memory.cpu, Allocator(0x1000, (4 << 20) - 0x1000))
    dev.mig_freeze(5)
    return dev.mig_save()


def test_image_round_trip_same_config(pair):
    a, _, mk = pair
    d1, f1 = mk(a)
    blob = _frozen_image(d1, f1)
    d2, f2 = mk(a)
    d2.mig_restore(d2.mig_validate(blob))
    assert f2.negotiated == f1.negotiated


@pytest.mark.parametrize(
    "other,field",
    [
        (dict(use_b=True), "capacity"),
        (dict(num_queues=2), None),  # different queue count: refused before CONFIG (function record)
        (dict(seg_max=8), "seg_max"),
        (dict(blk_size=4096), "blk_size"),
        (dict(max_discard_seg=3), "max_discard_seg"),
    ],
)
def test_image_refused_on_config_mismatch(pair, other, field):
    from virtio_lm.errors import StateImageError

    a, b, mk = pair
    d1, f1 = mk(a)
    blob = _frozen_image(d1, f1)
    kw = dict(other)
    path = b if kw.pop("use_b", False) else a
    d2, f2 = mk(path, **kw)
    status = f2.status
    with pytest.raises(StateImageError) as ei:
        d2.mig_validate(blob)
    if field is not None:
        assert ei.value.record == f"config.{field}"
    assert f2.status == status


def test_image_without_config_record_refused(pair):
    from virtio_lm.errors import StateImageError

    a, _, mk = pair
    d1, f1 = mk(a)
    img = decode_image(_frozen_image(d1, f1))
    out = StateImage(img.device_id)
    for r in img.records:
        if r.type != RecordType.CONFIG:
            out.add(r.type, r.payload)
    d2, _ = mk(a)
    with pytest.raises(StateImageError) as ei:
        d2.mig_validate(encode_image(out))
    assert ei.value.record == "config"


def test_image_with_truncated_config_record_refused(pair):
    from virtio_lm.errors import StateImageError

    a, _, mk = pair
    d1, f1 = mk(a)
    img = decode_image(_frozen_image(d1, f1))
    out = StateImage(img.device_id)
    for r in img.records:
        out.add(r.type, r.payload[:40] if r.type == RecordType.CONFIG else r.payload)
    d2, _ = mk(a)
    with pytest.raises(StateImageError):
        d2.mig_validate(encode_image(out))
