"""The C fast path of the virtio-blk device (``virtio_lm.devices.blkfast``) against the Python path.

Two vhost-user-blk back-ends, each with its own guest memory (two regions of one memfd, like
tests/test_vhost_user_protocol.py) and its own copy of one image: one serves with the fast path on,
the other with it off.  The same chains -- well-formed reads and writes of many shapes, other
request types, requests the device refuses, and hostile chains -- are planted in both, one kick
each, and everything the driver or the host can see must come out the same: guest memory, the
image, the used ring and the queue's indices, the dirty log, the inflight region, the device's
counters, the interrupt, NEEDS_RESET.  The fast path takes only chains the Python path would serve
with the same result and leaves the rest to it, so equality is the whole contract.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_vhost_user_protocol import MIB, PROTO, g2u, msg, regions, u64b

from virtio_lm.devices import blkfast
from virtio_lm.devices.blk import BlkDevice
from virtio_lm.memory import Memory
from virtio_lm.vhost.backend import VhostUserBackend
from virtio_lm.wire.blk import BlkFeature, BlkOutHdr, BlkReqType, BlkStatus
from virtio_lm.wire.codec import u16
from virtio_lm.wire.features import Feature, bit
from virtio_lm.wire.ring import DescFlags, VirtqDesc
from virtio_lm.wire.vhost_user import (
    Inflight,
    LogBase,
    ProtocolFeature,
    Request,
    VringAddr,
    VringState,
    encode_mem_table,
)

QSIZE = 64
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
TABLES = 0x4000  # indirect tables, 0x200 apart
HEADERS = 0x10000
DATA = 0x20000  # data buffers, bump-allocated; some cross into region 1 at 1 MiB
IMAGE_SECTORS = 512  # a 256 KiB image
LOG_ALL = 1 << 26
PF = (
    bit(ProtocolFeature.MQ)
    | bit(ProtocolFeature.LOG_SHMFD)
    | bit(ProtocolFeature.REPLY_ACK)
    | bit(ProtocolFeature.CONFIG)
)
NEXT, WRITE, INDIRECT = int(DescFlags.NEXT), int(DescFlags.WRITE), int(DescFlags.INDIRECT)


@pytest.fixture(scope="module")
def image_bytes() -> bytes:
    return np.random.default_rng(7).integers(0, 256, IMAGE_SECTORS * 512, dtype=np.uint8).tobytes()


class Rig:
    """One back-end with its guest, image, log and (optionally) inflight region."""

    def __init__(self, path: Path, content: bytes, *, fast: bool, features: int, inflight: bool,
                 read_only: bool = False) -> None:
        path.write_bytes(content)
        self.path = path
        self.guest = Memory(2 * MIB, name="guest", backing="memfd")
        self.log = Memory(4096, name="log", backing="memfd")
        dev = BlkDevice(path, queue_max_size=256, read_only=read_only)
        dev.direct_dma = True
        dev.fast_path = fast
        dev.inline_max = 1 << 30  # every request on the kick's path: completions in avail order on both
        dev.fast_threads_min = 256 << 10  # batches of this test's small image reach the pool too
        self.dev = dev
        self.be = be = VhostUserBackend(dev, log_writes=True)
        be.handle(msg(Request.SET_FEATURES, u64b(bit(Feature.VERSION_1) | PROTO | LOG_ALL | features)))
        be.handle(msg(Request.SET_PROTOCOL_FEATURES, u64b(PF | (bit(ProtocolFeature.INFLIGHT_SHMFD) if inflight else 0))))
        self.inflight_fd = None
        if inflight:
            be.handle(msg(Request.GET_INFLIGHT_FD, Inflight(0, 0, 1, QSIZE).encode()))
            self.inflight_fd = os.dup(be.take_reply_fds()[0])
        be.handle(msg(Request.SET_MEM_TABLE, encode_mem_table(regions()), [os.dup(self.guest.fd), os.dup(self.guest.fd)]))
        be.handle(msg(Request.SET_LOG_BASE, LogBase(4096, 0).encode(), [os.dup(self.log.fd)]))
        be.handle(msg(Request.SET_VRING_NUM, VringState(0, QSIZE).encode()))
        be.handle(msg(Request.SET_VRING_BASE, VringState(0, 0).encode()))
        be.handle(msg(Request.SET_VRING_ADDR, VringAddr(0, 1, g2u(DESC), g2u(USED), g2u(AVAIL), USED).encode()))
        self.call = os.eventfd(0, os.EFD_NONBLOCK)
        be.handle(msg(Request.SET_VRING_CALL, u64b(0), [os.dup(self.call)]))
        be.handle(msg(Request.SET_VRING_KICK, u64b(0), [os.eventfd(0)]))
        be.handle(msg(Request.SET_VRING_ENABLE, VringState(0, 1).encode()))

    def plant(self, writes: list[tuple[int, bytes]]) -> None:
        for addr, data in writes:
            self.guest.cpu.write(addr, data)

    def run(self) -> None:
        self.be.kick(0)
        assert self.dev.wait_idle(10)

    def state(self) -> dict:
        """Everything the driver or the host can see."""
        q = self.be.fn.queues[0]
        d = self.dev
        try:
            calls = os.eventfd_read(self.call)
        except BlockingIOError:
            calls = 0
        out = {
            "memory": self.guest.read(0, 2 * MIB),
            "image": self.path.read_bytes(),
            "log": self.log.read(0, 4096),
            "queue": (q.last_avail_idx, q.used_idx, q.broken, q.signalled_used, q.pending_notify, q.taken),
            "needs_reset": self.be.fn.needs_reset,
            "counters": (dict(d.status_counts), d.reads, d.writes, d.bytes_read, d.bytes_written, d.completed,
                         d.no_status, d.syncs),
            "calls": calls,
        }
        if d.status_counts[BlkStatus.IOERR] == 0:  # a failed read marks what arrived, the fast one all
            out["bytes_written"] = self.be.fn.port.writer.bytes_written
        if self.inflight_fd is not None:
            out["inflight"] = os.pread(self.inflight_fd, 1 << 16, 0)
        return out

    def close(self) -> None:
        self.be.disconnect()
        self.dev.close()
        self.guest.close()
        self.log.close()
        os.close(self.call)
        if self.inflight_fd is not None:
            os.close(self.inflight_fd)


def differences(a: dict, b: dict) -> list[str]:
    """The keys whose values differ (for memory, the first differing address too)."""
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            if isinstance(a.get(k), bytes) and isinstance(b.get(k), bytes) and len(a[k]) == len(b[k]):
                at = int(np.flatnonzero(np.frombuffer(a[k], np.uint8) != np.frombuffer(b[k], np.uint8))[0])
                out.append(f"{k} at {at:#x}")
            else:
                out.append(f"{k}: {a.get(k)!r:.200} != {b.get(k)!r:.200}")
    return out


# ============================================================================ building chains
@dataclass
class Req:
    type: int = BlkReqType.IN
    sector: int = 0
    nbytes: int = 4096
    splits: int = 1  # data descriptors
    header_alone: bool = True  # else an OUT's header shares its first data buffer
    status_alone: bool = True  # else an IN's status byte shares its last data buffer
    indirect: bool = False
    cross: bool = False  # a data buffer crosses from region 0 into region 1 (gpa-adjacent)
    extra_writable: int = 0  # an OUT with more than the status byte writable
    mutation: str | None = None


MUTATIONS = ["loop", "next_oob", "zero_len", "outside", "unknown_flag", "r_after_w", "no_writable",
             "head_oob", "indirect_nested", "indirect_bad_len", "short_header"]


@dataclass
class Planter:
    writes: list[tuple[int, bytes]] = field(default_factory=list)
    next_desc: int = 0
    data: int = DATA
    data1: int = MIB + 0x1000
    heads: list[int] = field(default_factory=list)
    n: int = 0

    def buf(self, n: int, cross: bool = False) -> int:
        if cross:
            return MIB - n // 2  # half in each region
        a = self.data if self.n % 2 == 0 else self.data1
        if self.n % 2 == 0:
            self.data += (n + 0xFFF) & ~0xFFF
        else:
            self.data1 += (n + 0xFFF) & ~0xFFF
        return a

    def add(self, r: Req, seed: int) -> None:
        self.n += 1
        hdr_addr = HEADERS + 0x20 * len(self.heads)
        rng = np.random.default_rng(seed)
        n = r.nbytes
        segs: list[tuple[int, int, int]] = []  # addr, len, flags (WRITE or 0)
        out_like = r.type != BlkReqType.IN
        sizes = [n // r.splits] * (r.splits - 1) + [n - n // r.splits * (r.splits - 1)] if n else []
        sizes = [s for s in sizes if s] or ([0] if r.mutation == "zero_len" else [])
        hdr = BlkOutHdr(BlkReqType(r.type) if r.type in set(BlkReqType) else BlkReqType.IN, 0, r.sector).encode()
        if r.type not in set(BlkReqType):
            hdr = r.type.to_bytes(4, "little") + hdr[4:]
        if r.mutation == "short_header":
            hdr = hdr[:10]
        if out_like:
            first = True
            for i, s in enumerate(sizes):
                a = self.buf(s + (16 if first and not r.header_alone else 0), r.cross and i == 0)
                payload = rng.integers(0, 256, s, dtype=np.uint8).tobytes()
                if first and not r.header_alone:
                    self.writes.append((a, hdr + payload))
                    segs.append((a, 16 + s, 0))
                else:
                    if first:
                        self.writes.append((hdr_addr, hdr))
                        segs.append((hdr_addr, len(hdr), 0))
                    self.writes.append((a, payload))
                    segs.append((a, s, 0))
                first = False
            if first:  # no data
                self.writes.append((hdr_addr, hdr))
                segs.append((hdr_addr, len(hdr), 0))
            if r.mutation != "no_writable":
                st_addr = hdr_addr + 0x18
                segs.append((st_addr, 1 + r.extra_writable, WRITE))
                self.writes.append((st_addr, b"\xee" * (1 + r.extra_writable)))
        else:
            self.writes.append((hdr_addr, hdr))
            segs.append((hdr_addr, len(hdr), 0))
            for i, s in enumerate(sizes):
                last = i == len(sizes) - 1
                extra = 1 if last and not r.status_alone else 0
                a = self.buf(s + extra, r.cross and i == 0)
                self.writes.append((a, b"\xdd" * (s + extra)))
                segs.append((a, s + extra, WRITE))
            if (r.status_alone or not sizes) and r.mutation != "no_writable":
                st_addr = hdr_addr + 0x18
                self.writes.append((st_addr, b"\xee"))
                segs.append((st_addr, 1, WRITE))
        if r.mutation == "r_after_w" and len(segs) >= 2:
            segs.append((hdr_addr, 4, 0))
        if r.mutation == "zero_len":
            segs.insert(1, (hdr_addr, 0, 0))
        if r.mutation == "outside":
            a, ln, f = segs[-1]
            segs[-1] = (4 * MIB, ln, f)
        descs = []
        for i, (a, ln, f) in enumerate(segs):
            more = i < len(segs) - 1
            descs.append([a, ln, f | (NEXT if more else 0), 0])
        if r.mutation == "unknown_flag":
            descs[0][2] |= 0x8
        if r.indirect:
            table = TABLES + 0x200 * len(self.heads)
            for i, d in enumerate(descs):
                d[3] = i + 1 if d[2] & NEXT else 0
            self._mutate_links(descs, r.mutation, len(descs))
            if r.mutation == "indirect_nested":
                descs[-1][2] |= INDIRECT
            raw = b"".join(VirtqDesc(*d).encode() for d in descs)
            self.writes.append((table, raw))
            head = self.next_desc
            self.next_desc += 1
            tlen = len(raw) + (8 if r.mutation == "indirect_bad_len" else 0)
            self.writes.append((DESC + 16 * head, VirtqDesc(table, tlen, INDIRECT, 0).encode()))
        else:
            slots = list(range(self.next_desc, self.next_desc + len(descs)))
            self.next_desc += len(descs)
            for i, d in enumerate(descs):
                d[3] = slots[i + 1] if d[2] & NEXT else 0
            self._mutate_links(descs, r.mutation, QSIZE, slots)
            for s, d in zip(slots, descs):
                self.writes.append((DESC + 16 * s, VirtqDesc(*d).encode()))
            head = slots[0]
        if r.mutation == "head_oob":
            head = QSIZE + 3
        k = len(self.heads)
        self.writes.append((AVAIL + 4 + 2 * k, u16(head)))
        self.heads.append(head)

    @staticmethod
    def _mutate_links(descs, mutation, tlen, slots=None) -> None:
        if len(descs) < 2:
            return
        if mutation == "loop":
            descs[-1][2] |= NEXT
            descs[-1][3] = slots[0] if slots else 0
        elif mutation == "next_oob":
            descs[0][3] = tlen + 5

    def publish(self) -> list[tuple[int, bytes]]:
        return self.writes + [(AVAIL + 2, u16(len(self.heads)))]


def requests(draw_mutation: bool) -> st.SearchStrategy[Req]:
    return st.builds(
        Req,
        type=st.sampled_from([BlkReqType.IN] * 4 + [BlkReqType.OUT] * 4 + [BlkReqType.FLUSH, BlkReqType.GET_ID, 99]),
        sector=st.one_of(st.integers(0, IMAGE_SECTORS // 8 - 2).map(lambda s: s * 8), st.integers(0, IMAGE_SECTORS + 8)),
        nbytes=st.sampled_from([512, 1024, 4096, 8192, 12288, 700, 0]),
        splits=st.integers(1, 4),
        header_alone=st.booleans(),
        status_alone=st.booleans(),
        indirect=st.booleans(),
        cross=st.sampled_from([False] * 5 + [True]),
        extra_writable=st.sampled_from([0] * 5 + [3]),
        mutation=st.sampled_from([None] * 8 + MUTATIONS) if draw_mutation else st.none(),
    )


FEATURES = {
    "plain": bit(BlkFeature.FLUSH),
    "event-idx+indirect": bit(Feature.EVENT_IDX) | bit(Feature.INDIRECT_DESC) | bit(BlkFeature.FLUSH),
    "seg/size-max": bit(Feature.INDIRECT_DESC) | bit(BlkFeature.SEG_MAX) | bit(BlkFeature.SIZE_MAX)
    | bit(BlkFeature.FLUSH),
    "no-flush": bit(Feature.INDIRECT_DESC),
}


def both(tmp: Path, content: bytes, features: int, inflight: bool) -> tuple[Rig, Rig]:
    return (Rig(tmp / "fast.img", content, fast=True, features=features, inflight=inflight),
            Rig(tmp / "python.img", content, fast=False, features=features, inflight=inflight))


def run_both(tmp: Path, content: bytes, reqs: list[Req], features: int, inflight: bool, seed: int = 0):
    p = Planter()
    for i, r in enumerate(reqs):
        p.add(r, seed + i)
    fast, slow = both(tmp, content, features, inflight)
    try:
        for rig in (fast, slow):
            rig.plant(p.publish())
            rig.run()
        return fast.state(), slow.state(), fast.dev.fast_served
    finally:
        fast.close()
        slow.close()


# ============================================================================ the differential test
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reqs=st.lists(requests(draw_mutation=True), min_size=1, max_size=8),
       features=st.sampled_from(sorted(FEATURES)), inflight=st.booleans(), seed=st.integers(0, 1000))
@pytest.mark.slow  # over 0.4 s: out of the one-minute fast subset (CI runs it)
def test_both_paths_leave_everything_the_same(tmp_path_factory, image_bytes, reqs, features, inflight, seed) -> None:
    tmp = tmp_path_factory.mktemp("d")
    a, b, served = run_both(tmp, image_bytes, reqs, FEATURES[features], inflight, seed)
    assert differences(a, b) == []
    event(f"served in C: {'none' if not served else 'all' if served == len(reqs) else 'some'}")
    event(f"queue broken: {a['needs_reset']}")


@pytest.mark.parametrize("features", sorted(FEATURES))
@pytest.mark.parametrize("inflight", [False, True], ids=["no-inflight", "inflight"])
def test_plain_reads_and_writes_are_all_served_in_c(tmp_path, image_bytes, features, inflight) -> None:
    ind = bool(FEATURES[features] & bit(Feature.INDIRECT_DESC))
    reqs = [Req(BlkReqType.IN, 8 * i, 4096, splits=1 + i % 3, indirect=ind and bool(i % 2)) for i in range(6)]
    reqs += [Req(BlkReqType.OUT, 64 + 8 * i, 4096, splits=1 + i % 2, header_alone=bool(i % 2)) for i in range(6)]
    a, b, served = run_both(tmp_path, image_bytes, reqs, FEATURES[features], inflight)
    assert differences(a, b) == []
    writes_in_c = features != "no-flush"  # write-through (no FLUSH) is the Python path's
    assert served == (12 if writes_in_c else 6)
    assert a["counters"][0][BlkStatus.OK] == 12 and a["queue"][:2] == (12, 12)
    assert a["image"] != image_bytes  # the writes reached the image ...
    assert a["log"] != bytes(4096)  # ... and the reads' pages the dirty log


def test_the_comparison_sees_one_wrong_byte(tmp_path, image_bytes) -> None:
    """Negative control: the fast rig's image differs in one byte that a request then reads."""
    reqs = [Req(BlkReqType.IN, 8, 4096)]
    p = Planter()
    p.add(reqs[0], 0)
    wrong = bytearray(image_bytes)
    wrong[8 * 512 + 100] ^= 1
    fast = Rig(tmp_path / "fast.img", bytes(wrong), fast=True, features=FEATURES["plain"], inflight=False)
    slow = Rig(tmp_path / "python.img", image_bytes, fast=False, features=FEATURES["plain"], inflight=False)
    try:
        for rig in (fast, slow):
            rig.plant(p.publish())
            rig.run()
        diff = differences(fast.state(), slow.state())
    finally:
        fast.close()
        slow.close()
    assert diff == ["image at 0x1064", f"memory at {MIB + 0x1000 + 100:#x}"]


# ============================================================================ one named test per hostile chain
@pytest.mark.parametrize("mutation", MUTATIONS)
@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_hostile_chain_is_left_to_the_python_path(tmp_path, image_bytes, mutation, indirect) -> None:
    """A good read, the hostile chain, a good write: the first is served in C, the hostile one
    by the Python path (which breaks the queue or answers it, exactly as with the fast path off)."""
    reqs = [Req(BlkReqType.IN, 8, 4096), Req(BlkReqType.IN, 16, 4096, splits=2, indirect=indirect, mutation=mutation),
            Req(BlkReqType.OUT, 24, 4096)]
    a, b, served = run_both(tmp_path, image_bytes, reqs, FEATURES["event-idx+indirect"], inflight=True)
    assert differences(a, b) == []
    assert served >= 1
    assert a["counters"][5] + int(a["needs_reset"]) >= 1


@pytest.mark.parametrize("features", sorted(FEATURES))
@pytest.mark.parametrize("inflight", [False, True], ids=["no-inflight", "inflight"])
def test_a_batch_large_enough_for_threads_ends_the_same(tmp_path, image_bytes, features, inflight) -> None:
    """Eight 32 KiB requests in one notification: their I/O runs on several threads.  Their ranges
    do not overlap: requests in flight together have no order between them (virtio-blk leaves it
    to the driver), so two writes of one sector, or a read of a sector being written, could end
    either way -- and did, in this test's first version."""
    ind = bool(FEATURES[features] & bit(Feature.INDIRECT_DESC))
    reqs = [Req(BlkReqType.IN if i % 2 else BlkReqType.OUT, 64 * i, 32 << 10, splits=1 + i % 4,
                indirect=ind and i > 3) for i in range(8)]
    before = blkfast.threaded_batches()
    a, b, served = run_both(tmp_path, image_bytes, reqs, FEATURES[features], inflight)
    assert differences(a, b) == []
    if features != "no-flush":
        assert served == 8 and blkfast.threaded_batches() > before
    assert a["counters"][0][BlkStatus.OK] == 8


@pytest.mark.parametrize("op", [BlkReqType.IN, BlkReqType.OUT], ids=["read", "write"])
@pytest.mark.parametrize("splits", [1, 3, 5])
def test_one_large_request_is_cut_into_units_the_same_way(tmp_path, image_bytes, op, splits) -> None:
    """256 KiB in one request, its buffers cut where they fall: units of 128 KiB on several threads."""
    before = blkfast.threaded_batches()
    a, b, served = run_both(tmp_path, image_bytes, [Req(op, 0, 256 << 10, splits=splits)],
                            FEATURES["event-idx+indirect"], inflight=True)
    assert differences(a, b) == []
    assert served == 1 and blkfast.threaded_batches() > before


def test_a_forked_child_serves_threaded_batches_with_its_own_pool(tmp_path, image_bytes) -> None:
    run_both(tmp_path, image_bytes, [Req(BlkReqType.IN, 0, 256 << 10)], FEATURES["plain"], inflight=False)
    pid = os.fork()  # the parent's pool threads exist now; the child has none
    if pid == 0:
        code = 1
        try:
            (tmp_path / "child").mkdir()
            a, b, served = run_both(tmp_path / "child", image_bytes, [Req(BlkReqType.IN, 0, 256 << 10)],
                                    FEATURES["plain"], inflight=False)
            code = 0 if differences(a, b) == [] and served == 1 else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child did not finish its batch in 60 s")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_read_only_image_refuses_writes_on_the_python_path_and_serves_reads_in_c(tmp_path, image_bytes) -> None:
    p = Planter()
    for i, r in enumerate([Req(BlkReqType.IN, 8, 4096), Req(BlkReqType.OUT, 16, 4096), Req(BlkReqType.IN, 24, 4096)]):
        p.add(r, i)
    feats = FEATURES["event-idx+indirect"] | bit(BlkFeature.RO)
    fast = Rig(tmp_path / "fast.img", image_bytes, fast=True, features=feats, inflight=True, read_only=True)
    slow = Rig(tmp_path / "python.img", image_bytes, fast=False, features=feats, inflight=True, read_only=True)
    try:
        for rig in (fast, slow):
            rig.plant(p.publish())
            rig.run()
        a, b, served = fast.state(), slow.state(), fast.dev.fast_served
    finally:
        fast.close()
        slow.close()
    assert differences(a, b) == []
    assert served == 2 and a["counters"][0][BlkStatus.IOERR] == 1 and a["image"] == image_bytes


# ============================================================================ I/O errors
@pytest.mark.parametrize("nbytes", [4096, 128 << 10], ids=["one-thread", "threads"])
def test_a_read_past_the_images_end_completes_ioerr_the_same_way(tmp_path, image_bytes, nbytes) -> None:
    fast, slow = both(tmp_path, image_bytes, FEATURES["plain"], inflight=True)
    try:
        p = Planter()
        p.add(Req(BlkReqType.IN, IMAGE_SECTORS - nbytes // 512, nbytes, splits=2), 0)
        p.add(Req(BlkReqType.IN, 0, nbytes), 1)
        for rig in (fast, slow):
            os.truncate(rig.path, (IMAGE_SECTORS - 4) * 512)  # the image shrank under the device
            rig.plant(p.publish())
            rig.run()
        a, b = fast.state(), slow.state()
        assert fast.dev.fast_served == 2
    finally:
        fast.close()
        slow.close()
    assert differences(a, b) == []
    assert a["counters"][0][BlkStatus.IOERR] == 1 and a["counters"][0][BlkStatus.OK] == 1


# ============================================================================ hostile guest memory
FUZZ = Path(__file__).resolve().parent.parent / "fuzz"


@settings(max_examples=300, deadline=None)
@given(which=st.sampled_from(["read-and-write", "indirect-read", "loop"]),
       flips=st.lists(st.tuples(st.integers(0, 0x3FFF), st.integers(0, 255)), max_size=12),
       head=st.binary(min_size=11, max_size=11))
@pytest.mark.slow  # over 0.4 s: out of the one-minute fast subset (CI runs it)
def test_mutated_guest_memory_never_escapes_the_regions(which, flips, head) -> None:
    """The fuzz harness's invariants (fuzz/blk_fast_path.py: no crash, no write outside the
    regions or not reported) on its seeds with bytes changed anywhere in the rings, descriptors,
    headers and parameters."""
    import sys

    if str(FUZZ) not in sys.path:
        sys.path.insert(0, str(FUZZ))
    import blk_fast_path  # the harness
    import fuzzlib

    data = bytearray((fuzzlib.CORPUS_DIR / "blk_fast_path" / f"seed-{which}").read_bytes())
    data[:11] = head
    for at, v in flips:
        data[11 + at] = v
    blk_fast_path.TestOneInput(bytes(data))


# ============================================================================ the module's own refusals
def test_run_refuses_bad_arguments_and_writes_nothing() -> None:
    mem = np.zeros(1 << 16, np.uint8)
    q = (16, 0x0, 0x1000, 0x2000, 0, -1, 0, False, True, True)
    dev = (-1, 100, 512, 0, 0, 1 << 20, False, True, 256 << 10)
    with pytest.raises(ValueError, match="out of range"):
        blkfast.run(((0, mem),), (12,) + q[1:], dev, None)  # not a power of two
    with pytest.raises(ValueError, match="out of range"):
        blkfast.run(((0, mem),), q, (-1, 100, 1000, 0, 0, 1 << 20, False, True, 256 << 10), None)
    with pytest.raises(BufferError):
        blkfast.run(((0, bytes(1 << 16)),), q, dev, None)  # a read-only buffer
    with pytest.raises(TypeError):
        blkfast.run(((0,),), q, dev, None)
    with pytest.raises(TypeError, match="tuple"):
        blkfast.run(([0, mem],), q, dev, None)
    for bad in ((16, 0x8) + q[2:], (16, 0x0, 0x1001) + q[3:], (16, 0x0, 0x1000, 0x2002) + q[4:]):
        with pytest.raises(ValueError, match="out of range"):  # a misaligned ring
            blkfast.run(((0, mem),), bad, dev, None)
    with pytest.raises(ValueError, match="journal"):
        blkfast.run(((0, mem),), q, dev, (np.zeros(16, np.uint8), np.zeros(16, np.uint8), 1, 12, 14, 16, 0, 6, 8))
    assert not mem.any()
    r = blkfast.run(((0, mem),), q, dev, None)  # an empty ring: nothing to do
    assert r[:5] == (blkfast.STOP_EMPTY, 0, 0, 0, 0) and r[13:] == (b"", -1)
    assert not mem.any()


def test_rings_outside_the_regions_leave_everything_to_the_python_path() -> None:
    mem = np.zeros(1 << 12, np.uint8)
    q = (16, 0x0, 0x1000, 0x2000, 0, -1, 0, False, True, True)  # avail and used past the region's end
    r = blkfast.run(((0, mem),), q, (-1, 100, 512, 0, 0, 1 << 20, False, True, 256 << 10), None)
    assert r[0] == blkfast.STOP_SLOW and r[1] == 0
    assert not mem.any()
