"""The guest drivers' migrated state as strict JSON (virtio_lm.vm.guest_state).

* Round trips of real drivers in mid-flight: a BlkDriver with requests in
  flight (direct, indirect, raw, parked completions) and a NetDriver with TX
  in flight and RX buffers posted (some already filled) -> JSON bytes ->
  decode -> rebuilt on a copy of guest memory (blk) / migrated through the
  PF to a second VF and memory (net) -> the rebuilt driver reaps every
  completion correctly.  Negative controls: no memory copy, a stale state.
* Hypothesis: any mutation of a valid document (tree edits, byte edits)
  decodes to a state that re-encodes to exactly the mutated document, or
  raises GuestStateError -- never another exception.
* One named test per refused field class, each naming the offending path.
"""

from __future__ import annotations

import copy
from dataclasses import replace as dataclasses_replace
import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtio_lm.devices.blk import BlkDevice
from virtio_lm.drivers.blk_driver import BlkDriver
from virtio_lm.drivers.net_driver import NetDriver
from virtio_lm.errors import DriverError, GuestStateError, UsedRingError, VirtioLmError
from virtio_lm.memory import Memory
from virtio_lm.net.backends import NetBackend
from virtio_lm.net.peer import parse_seq, seq_frame
from virtio_lm.net.switch import POLL
from virtio_lm.net.testbed import NetVm, make_vm, restore_image, save_image
from virtio_lm.pci import VirtioPciFunction
from virtio_lm.virtqueue.device import Segment
from virtio_lm.virtqueue.driver import Allocator, DriverQueue
from virtio_lm.vm.guest_state import (
    MAX_DOCUMENT_BYTES,
    MAX_NESTING,
    allocator_from_json,
    allocator_to_json,
    blk_state_from_json,
    blk_state_to_json,
    decode_guest_state,
    encode_guest_state,
    net_state_from_json,
    net_state_to_json,
    queue_from_json,
    queue_to_json,
    token_from_json,
    token_to_json,
)
from virtio_lm.wire.blk import SECTOR_SIZE, BlkOutHdr, BlkReqType, BlkStatus
from virtio_lm.wire.ctrl import VfState

IMAGE_SIZE = 1 << 20
MEM_SIZE = 4 << 20
WAIT = 20.0  # a guard against hangs only
PEER = bytes.fromhex("02aabbccdd01")


def wait_until(pred: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def pattern(seed: int, n: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


# ============================================================================ blk rig
class GatedBlkDevice(BlkDevice):
    """Back-end work waits for ``gate``: deterministic 'in flight' without timing."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.gate = threading.Event()
        self.gate.set()

    def handle(self, fn, queue, chain):  # type: ignore[no-untyped-def]
        work = super().handle(fn, queue, chain)
        if not callable(work):
            return work

        def gated() -> bytes:
            self.gate.wait(30)
            return work()

        return gated


@dataclass
class BlkRig:
    path: Any
    mem: Memory
    fn: VirtioPciFunction
    dev: GatedBlkDevice
    drv: BlkDriver
    baseline_free: int  # allocator free bytes with nothing in flight
    baseline_live: int
    expect: dict[int, tuple[str, bytes | None]]  # token -> (kind, expected data)

    def settled(self) -> bool:
        return all(dq.used_idx() == dq.avail_idx for dq in self.drv.queues.values())

    def close(self) -> None:
        self.dev.gate.set()
        self.dev.close()
        self.mem.close()


def make_blk_rig(tmp) -> BlkRig:  # type: ignore[no-untyped-def]
    """A blk driver (2 queues of 16) with 2 parked completions and 6 requests in flight."""
    path = tmp / "disk.raw"
    path.write_bytes(pattern(7, IMAGE_SIZE))
    dev = GatedBlkDevice(path, num_queues=2, queue_max_size=16, size_max=4096, seg_max=8)
    mem = Memory(MEM_SIZE, name="guest-a")
    fn = VirtioPciFunction(dev, mem.device_port("vf1"), name="vf1")
    drv = BlkDriver(fn, mem.cpu, Allocator(0x1000, MEM_SIZE - 0x1000), queue_size=16)
    rig = BlkRig(path, mem, fn, dev, drv, drv.alloc.free_bytes(), drv.alloc.allocated(), {})
    image = path.read_bytes()
    # two completions the driver reaped but parked (it waited for a later one)
    a = drv.submit_read(3, 1, queue=0)
    b = drv.submit_flush(queue=0)
    wait_until(rig.settled, "the first requests")
    drv.wait(b)
    assert [c.token for c in drv._parked] == [a]
    rig.expect[a] = ("read", image[3 * SECTOR_SIZE : 4 * SECTOR_SIZE])
    # six requests held by the back-end: indirect reads, a direct flush, a write, GET_ID, a raw chain
    dev.gate.clear()
    t = drv.submit_read(10, 16, queue=0)  # 8 KiB in two 4 KiB segments -> indirect
    rig.expect[t] = ("read", image[10 * SECTOR_SIZE : 26 * SECTOR_SIZE])
    t = drv.submit_read(100, 2, queue=1)
    rig.expect[t] = ("read", image[100 * SECTOR_SIZE : 102 * SECTOR_SIZE])
    t = drv.submit_flush(queue=1)
    rig.expect[t] = ("flush", None)
    t = drv.submit_write(200, pattern(8, 3 * SECTOR_SIZE), queue=0)
    rig.expect[t] = ("write", pattern(8, 3 * SECTOR_SIZE))
    t = drv.submit_get_id(queue=1)
    rig.expect[t] = ("id", None)
    t = drv.submit_raw([BlkOutHdr(BlkReqType.IN, 0, 5).encode()], [SECTOR_SIZE, 1], queue=0)
    rig.expect[t] = ("raw", image[5 * SECTOR_SIZE : 6 * SECTOR_SIZE] + bytes([BlkStatus.OK]))
    assert drv.in_flight() == 6
    assert any(rec.table is not None for dq in drv.queues.values() for rec in dq._inflight.values())
    assert any(rec.table is None for dq in drv.queues.values() for rec in dq._inflight.values())
    return rig


def copy_guest(src: Memory, name: str) -> Memory:
    dst = Memory(src.size, name=name)
    dst.cpu.write(0, src.read(0, src.size))
    return dst


def check_blk_completions(rig: BlkRig, comps: list, image_after: bytes) -> None:  # type: ignore[type-arg]
    got = {c.token: c for c in comps}
    assert sorted(got) == sorted(rig.expect)
    for token, (kind, want) in rig.expect.items():
        c = got[token]
        if kind == "raw":
            assert c.status == BlkStatus.OK and c.used_len == SECTOR_SIZE + 1 and c.data == want, c
            continue
        assert c.status == BlkStatus.OK, (kind, c)
        if kind == "read":
            assert c.data == want
        elif kind == "write":
            assert image_after[200 * SECTOR_SIZE : 203 * SECTOR_SIZE] == want
        elif kind == "id":
            assert c.data is not None and c.data.startswith(b"virtio-lm-blk")


@pytest.fixture
def blk_rig(tmp_path):  # type: ignore[no-untyped-def]
    rig = make_blk_rig(tmp_path)
    yield rig
    rig.close()


def blk_bytes(drv: BlkDriver) -> bytes:
    return encode_guest_state({"blk": blk_state_to_json(drv.save())})


def blk_restore(raw: bytes, fn: VirtioPciFunction, mem: Memory) -> BlkDriver:
    state = blk_state_from_json(decode_guest_state(raw)["blk"])
    return BlkDriver.from_state(state, fn=fn, port=mem.cpu, attach_interrupts=False)


def test_blk_round_trip_in_flight_rebuilt_on_copied_memory_reaps_everything(blk_rig: BlkRig) -> None:
    rig = blk_rig
    raw = blk_bytes(rig.drv)
    assert json.loads(raw) == decode_guest_state(raw)
    rig.dev.gate.set()
    wait_until(rig.settled, "the held requests")
    mem_b = copy_guest(rig.mem, "guest-b")
    try:
        drv_b = blk_restore(raw, rig.fn, mem_b)
        assert drv_b.in_flight() == 6
        # the rebuilt state re-encodes to the same bytes
        assert blk_bytes(drv_b) == raw
        comps = drv_b.reap()
        check_blk_completions(rig, comps, rig.path.read_bytes())
        assert drv_b.in_flight() == 0
        # every header, buffer and indirect table went back to the allocator
        assert drv_b.alloc.free_bytes() == rig.baseline_free
        assert drv_b.alloc.allocated() == rig.baseline_live
        # the source driver (same state, its own memory) sees the very same completions
        assert rig.drv.reap() == comps
    finally:
        mem_b.close()


def test_blk_negative_control_without_memory_copy_refused(blk_rig: BlkRig) -> None:
    raw = blk_bytes(blk_rig.drv)
    blk_rig.dev.gate.set()
    wait_until(blk_rig.settled, "the held requests")
    fresh = Memory(MEM_SIZE, name="guest-fresh")
    try:
        drv = blk_restore(raw, blk_rig.fn, fresh)
        with pytest.raises(UsedRingError):
            drv.reap()  # used idx 0 is far behind last_used_idx: the rings did not come along
    finally:
        fresh.close()


def test_blk_negative_control_stale_state_refused_at_reap(blk_rig: BlkRig) -> None:
    rig = blk_rig
    stale = blk_bytes(rig.drv)
    rig.drv.submit_read(300, 1, queue=0)  # after the export: the stale state does not know it
    rig.dev.gate.set()
    wait_until(rig.settled, "the held requests")
    mem_b = copy_guest(rig.mem, "guest-b")
    try:
        drv = blk_restore(stale, rig.fn, mem_b)
        with pytest.raises(DriverError):
            for _ in range(3):
                drv.reap()
    finally:
        mem_b.close()


# ============================================================================ net rig
class ListBackend(NetBackend):
    """An in-process back-end: sent frames are kept; frames arrive through the device's receive()."""

    kind = "list"

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.sent: list[bytes] = []
        self._lock = threading.Lock()

    def _recv(self) -> bytes | None:
        self._closed.wait(POLL)
        return None

    def send(self, frame: bytes) -> None:
        with self._lock:
            self.sent.append(bytes(frame))


def seqs(frames: list[bytes]) -> list[int]:
    out = []
    for f in frames:
        p = parse_seq(f)
        assert p is not None
        out.append(p[3])
    return out


@dataclass
class NetPair:
    src: NetVm
    dst: NetVm
    drv: NetDriver

    def close(self) -> None:
        for vm in (self.src, self.dst):
            backend = vm.dev.backend
            if backend is not None:
                backend.resume_tx()
            vm.close()


def make_net_pair() -> NetPair:
    """Source VM with 3 TX frames done, 5 TX in flight behind a paused link, 2 RX frames
    in receive buffers not yet taken by the driver; destination VM in INIT."""
    src = make_vm(ListBackend("src"), name="src", queue_max_size=32)
    dst = make_vm(ListBackend("dst"), name="dst", queue_max_size=32)
    drv = src.bring_up(queue_size=32)
    backend = src.dev.backend
    assert isinstance(backend, ListBackend)
    drv.send_many([seq_frame(PEER, drv.mac, 1, s) for s in range(3)])
    wait_until(lambda: (drv.reap_tx(), drv.tx_in_flight() == 0)[1], "3 TX")
    for s in range(3):
        assert src.dev.receive(seq_frame(drv.mac, PEER, 2, s))
    assert seqs([f for _, f in drv.receive()]) == [0, 1, 2]
    backend.pause_tx()
    drv.send_many([seq_frame(PEER, drv.mac, 1, s) for s in range(3, 8)])
    wait_until(lambda: src.dev.in_flight == 5, "5 TX chains taken")
    for s in range(3, 5):
        assert src.dev.receive(seq_frame(drv.mac, PEER, 2, s))
    assert drv.tx_in_flight() == 5
    return NetPair(src, dst, drv)


@pytest.fixture
def net_pair():  # type: ignore[no-untyped-def]
    p = make_net_pair()
    yield p
    p.close()


def net_bytes(drv: NetDriver) -> bytes:
    return encode_guest_state({"net": net_state_to_json(drv.save())})


def migrate_net(p: NetPair, state_bytes: Callable[[], bytes]) -> NetDriver:
    """The testbed's migration, with the guest driver's state carried as JSON bytes."""
    sc, dc = p.src.controller, p.dst.controller
    sc.set_state(1, VfState.QUIESCED)
    sc.set_state(1, VfState.FREEZED)
    image = save_image(p.src)
    raw = state_bytes()
    p.dst.mem.cpu.write(0, p.src.mem.read(0, p.src.mem.size))
    dc.set_state(1, VfState.FREEZED)
    restore_image(p.dst, image)
    dc.set_state(1, VfState.QUIESCED)
    state = net_state_from_json(decode_guest_state(raw)["net"])
    drv = NetDriver.from_state(state, fn=p.dst.fn, port=p.dst.mem.cpu)
    p.dst.fn.on_interrupt = drv.on_interrupt
    p.dst.drv = drv
    dc.set_state(1, VfState.RUNNING)
    return drv


def test_net_round_trip_tx_in_flight_and_rx_posted_through_a_migration(net_pair: NetPair) -> None:
    p = net_pair
    raw = net_bytes(p.drv)
    doc = decode_guest_state(raw)["net"]
    tokens = [Row(r)["token"] for q in doc["queues"].values() for r in q["in_flight"]]
    assert sum(t[0] == "tx" for t in tokens) == 5 and sum(t[0] == "rx" for t in tokens) == 32
    new = migrate_net(p, lambda: raw)
    assert net_bytes(new) == raw  # nothing was lost or reshaped on the way
    # the 5 held frames go out from the destination, exactly once, and complete
    dst_backend = p.dst.dev.backend
    assert isinstance(dst_backend, ListBackend)
    wait_until(lambda: (new.reap_tx(), new.tx_in_flight() == 0)[1], "TX completions on the destination")
    assert seqs(dst_backend.sent) == [3, 4, 5, 6, 7]
    assert new.counters["tx_completed"] == new.counters["tx_submitted"] == 8
    # the 2 frames that landed before the migration are reaped from the copied memory
    assert seqs([f for _, f in new.receive()]) == [3, 4]
    # the reposted buffers carry new traffic
    for s in range(5, 40):
        assert p.dst.dev.receive(seq_frame(new.mac, PEER, 2, s))
        assert seqs([f for _, f in new.receive()]) == [s]
    assert new.buf_alloc.allocated() == 32  # only the RX ring's buffers remain
    for dq in new.tr.queues.values():
        assert dq.used_idx() == dq.last_used_idx


def test_net_negative_control_stale_state_is_caught(net_pair: NetPair) -> None:
    """A state exported before the last TX frames were queued: the device completes heads
    the driver believes free, and the driver refuses them."""
    p = net_pair
    # "stale": the 5 TX chains in flight dropped (as if exported before they were queued)
    doc = net_state_to_json(p.drv.save())
    q = doc["queues"]["1"]
    dropped = q["in_flight"]
    q["free"] = q["free"] + [d for r in dropped for d in Row(r)["descs"]]
    q["in_flight"] = []
    q["avail_idx"] = (q["avail_idx"] - len(dropped)) & 0xFFFF
    q["kick_old"] = q["avail_idx"]
    stale = encode_guest_state({"net": doc})
    net_state_from_json(decode_guest_state(stale)["net"])  # a valid state
    new = migrate_net(p, lambda: stale)
    with pytest.raises(UsedRingError):
        wait_until(lambda: (new.reap_tx(), False)[1], "never")


# ============================================================================ documents for mutation
@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    rig = make_blk_rig(tmp_path_factory.mktemp("blk"))
    p = make_net_pair()
    try:
        return {
            "blk": blk_state_to_json(rig.drv.save()),
            "net": net_state_to_json(p.drv.save()),
        }
    finally:
        rig.close()
        p.close()


DECODERS = {"blk": (blk_state_from_json, blk_state_to_json), "net": (net_state_from_json, net_state_to_json)}


def decode_root(raw: bytes) -> dict[str, Any]:
    doc = decode_guest_state(raw)
    out = {}
    for k, v in doc.items():
        if k not in DECODERS:
            raise GuestStateError(k, "unknown root")
        frm, to = DECODERS[k]
        out[k] = to(frm(v, k), k)
    return out


def nodes(doc: Any) -> list[tuple[Any, Any]]:
    """(container, key) of every value below ``doc``."""
    out: list[tuple[Any, Any]] = []
    stack = [doc]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            out.append((node, k))
            stack.append(v)
    return out


INTS = st.one_of(
    st.integers(-3, 70),
    st.sampled_from([-1, 0xFFFF, 0x10000, 0x8000, 2**32 - 1, 2**32, 2**63, 2**64 - 1, 2**64]),
    st.integers(),
)
SCALARS = st.one_of(st.none(), st.booleans(), INTS, st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6))
VALUES = st.recursive(SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3), max_leaves=6)


@st.composite
def mutation(draw, doc: dict[str, Any]) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        where = nodes(doc)
        if not where:
            break
        parent, key = draw(st.sampled_from(where))
        value = parent[key]
        op = draw(st.sampled_from(["replace", "tweak", "delete", "add", "dup", "swap"]))
        if op == "replace":
            parent[key] = draw(VALUES)
        elif op == "tweak" and type(value) is int:
            parent[key] = value + draw(st.sampled_from([-1, 1, -16, 16, 0x10000, -0x10000]))
        elif op == "tweak" and type(value) is str:
            i = draw(st.integers(0, len(value)))
            parent[key] = value[:i] + draw(st.sampled_from(["", "0", "f", "A", "z", "00"])) + value[i + 1 :]
        elif op == "tweak" and type(value) is bool:
            parent[key] = not value
        elif op == "delete":
            del parent[key]
        elif op == "add" and isinstance(value, dict):
            value[draw(st.text(max_size=6))] = draw(VALUES)
        elif op == "add" and isinstance(value, list):
            value.insert(draw(st.integers(0, len(value))), draw(VALUES))
        elif op == "dup" and isinstance(value, list) and value:
            value.append(copy.deepcopy(value[draw(st.integers(0, len(value) - 1))]))
        elif op == "swap" and isinstance(value, list) and len(value) > 1:
            i, j = draw(st.integers(0, len(value) - 1)), draw(st.integers(0, len(value) - 1))
            value[i], value[j] = value[j], value[i]
        else:
            parent[key] = draw(VALUES)
    return doc


@pytest.mark.slow  # over 0.4 s: out of the one-minute fast subset (CI runs it)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_tree_mutation_decodes_exactly_or_raises_guest_state_error(docs: dict[str, Any], data: Any) -> None:
    mutated = data.draw(mutation(docs))
    try:
        raw = encode_guest_state(mutated)
    except GuestStateError:
        return
    try:
        back = decode_root(raw)
    except GuestStateError:
        return
    assert encode_guest_state(back) == raw  # a decoded document re-encodes to itself


@pytest.mark.slow  # 0.3 s or more: out of the one-minute fast subset (CI runs it)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_byte_mutation_decodes_exactly_or_raises_guest_state_error(docs: dict[str, Any], data: Any) -> None:
    raw = bytearray(encode_guest_state(docs))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.sampled_from(["set", "insert", "delete"]))
        b = data.draw(st.sampled_from(list(b'0123456789",:[]{}-.eEnulltrufalsx \\\x80\xff')))
        if op == "set":
            raw[i] = b
        elif op == "insert":
            raw.insert(i, b)
        else:
            del raw[i]
    try:
        back = decode_root(bytes(raw))
    except GuestStateError:
        return
    again = encode_guest_state(back)
    assert encode_guest_state(decode_root(again)) == again


def test_valid_documents_decode_and_re_encode(docs: dict[str, Any]) -> None:
    raw = encode_guest_state(docs)
    assert encode_guest_state(decode_root(raw)) == raw
    assert raw == json.dumps(docs, sort_keys=True, separators=(",", ":")).encode()


# ============================================================================ refused, one test each
class Row:
    """An in-flight row ``[head, descs, table, token]`` seen by field name (the edits below)."""

    def __init__(self, row: list[Any]) -> None:
        self.row = row

    def __getitem__(self, name: str) -> Any:
        return self.row[gs._IF_FIELDS.index(name)]

    def __setitem__(self, name: str, value: Any) -> None:
        self.row[gs._IF_FIELDS.index(name)] = value

    def update(self, **fields: Any) -> None:
        for name, value in fields.items():
            self[name] = value


def _q(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["blk"]["queues"]["0"]


def _first_indirect(doc: dict[str, Any]) -> Row:
    return next(Row(r) for r in _q(doc)["in_flight"] if Row(r)["table"] is not None)


def _first_direct(doc: dict[str, Any]) -> Row:
    return next(Row(r) for r in _q(doc)["in_flight"] if Row(r)["table"] is None and len(Row(r)["descs"]) > 1)


def _req(doc: dict[str, Any], kind: str) -> dict[str, Any]:
    reqs = doc["blk"]["requests"]
    if kind == "raw":
        return next(r for r in reqs if r["hdr_addr"] == -1)
    if kind == "owned":
        return next(r for r in reqs if r["owns_buf"])
    return reqs[0]


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        node = doc
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value

    return edit


def _alloc_overlap(doc: dict[str, Any]) -> None:
    a = doc["blk"]["alloc"]
    s, e = a["free"][0]
    a["live"].append([s, 16])
    a["live"].sort()


def _alloc_unmerged(doc: dict[str, Any]) -> None:
    a = doc["blk"]["alloc"]
    s, e = a["free"][-1]
    a["free"][-1:] = [[s, s + 16], [s + 16, e]]


def _alloc_gap(doc: dict[str, Any]) -> None:
    a = doc["blk"]["alloc"]
    a["free"][-1][1] -= 16


def _alloc_unsorted(doc: dict[str, Any]) -> None:
    a = doc["blk"]["alloc"]
    a["live"][0], a["live"][1] = a["live"][1], a["live"][0]


def _desc_twice(doc: dict[str, Any]) -> None:
    q = _q(doc)
    q["free"][1] = q["free"][0]


def _desc_lost(doc: dict[str, Any]) -> None:
    _q(doc)["free"].pop()


def _desc_both(doc: dict[str, Any]) -> None:
    _q(doc)["free"][0] = _first_direct(doc)["descs"][1]


def _head_not_first(doc: dict[str, Any]) -> None:
    r = _first_direct(doc)
    r["descs"].reverse()


def _indirect_two_descs(doc: dict[str, Any]) -> None:
    q = _q(doc)
    _first_indirect(doc)["descs"].append(q["free"].pop())


def _table_not_live(doc: dict[str, Any]) -> None:
    _first_indirect(doc)["table"] += 0x10


def _inflight_count(doc: dict[str, Any]) -> None:
    _q(doc)["avail_idx"] = (_q(doc)["avail_idx"] + 1) & 0xFFFF


def _chain_without_request(doc: dict[str, Any]) -> None:
    tok = Row(_q(doc)["in_flight"][0])["token"]
    doc["blk"]["requests"] = [r for r in doc["blk"]["requests"] if r["token"] != tok]


def _request_without_chain(doc: dict[str, Any]) -> None:
    r = copy.deepcopy(doc["blk"]["requests"][0])
    r["token"] = doc["blk"]["parked"][0]["token"]  # a token below next_token, not in flight
    doc["blk"]["parked"] = []
    doc["blk"]["requests"].append(r)


def _request_wrong_queue(doc: dict[str, Any]) -> None:
    r = next(r for r in doc["blk"]["requests"] if r["queue"] == 0)
    r["queue"] = 1


def _request_dup(doc: dict[str, Any]) -> None:
    doc["blk"]["requests"].append(copy.deepcopy(doc["blk"]["requests"][0]))


def _shared_allocation(doc: dict[str, Any]) -> None:
    reqs = [r for r in doc["blk"]["requests"] if r["hdr_addr"] >= 0]
    reqs[1]["hdr_addr"] = reqs[0]["hdr_addr"]
    reqs[1]["status_addr"] = reqs[0]["status_addr"]


def _queue_key(key: str) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        qs = doc["blk"]["queues"]
        qs[key] = qs.pop("1")

    return edit


def _parked_in_flight(doc: dict[str, Any]) -> None:
    doc["blk"]["parked"][0]["token"] = doc["blk"]["requests"][0]["token"]


def _net_queue_missing(doc: dict[str, Any]) -> None:
    del doc["net"]["queues"]["2"]


def _net_queue_extra(doc: dict[str, Any]) -> None:
    doc["net"]["queues"]["3"] = copy.deepcopy(doc["net"]["queues"]["1"])


def _net_token(value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        row = Row(doc["net"]["queues"]["1"]["in_flight"][0])
        row["token"] = value(row["token"])

    return edit


def _net_same_buffer(doc: dict[str, Any]) -> None:
    fl = doc["net"]["queues"]["1"]["in_flight"]
    Row(fl[1])["token"] = ["tx", Row(fl[0])["token"][1]]


def _net_alloc_overlap(doc: dict[str, Any]) -> None:
    n = doc["net"]
    n["buf_alloc"] = copy.deepcopy(n["ring_alloc"])
    n["buf_alloc"]["base"] += 0  # same range


REFUSED: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    # ---- structure and types
    ("unknown_key", _set(["blk", "queues", "0", "colour"], 1), "blk.queues.0.colour"),
    ("missing_key", lambda d: d["blk"].pop("rr"), "blk.rr"),
    ("bool_for_int", _set(["blk", "queues", "0", "avail_idx"], True), "blk.queues.0.avail_idx"),
    ("float_for_int", _set(["blk", "next_token"], 10.0), "blk.next_token"),
    ("string_for_int", _set(["blk", "features"], "1"), "blk.features"),
    ("int_for_bool", _set(["blk", "queues", "0", "interrupts"], 1), "blk.queues.0.interrupts"),
    ("list_for_object", _set(["blk", "alloc"], []), "blk.alloc"),
    ("null_for_list", _set(["blk", "queues", "0", "free"], None), "blk.queues.0.free"),
    # ---- ranges
    ("negative_address", _set(["blk", "queues", "0", "desc_addr"], -16), "blk.queues.0.desc_addr"),
    ("address_past_u64", _set(["blk", "queues", "0", "used_addr"], 2**64), "blk.queues.0.used_addr"),
    ("index_over_u16", _set(["blk", "queues", "0", "last_used_idx"], 0x10000), "blk.queues.0.last_used_idx"),
    ("features_over_u64", _set(["blk", "features"], 2**64), "blk.features"),
    ("status_over_u8", lambda d: d["blk"]["parked"][0].update(status=256), "blk.parked[0].status"),
    ("pending_over_size", _set(["blk", "queues", "0", "pending"], 17), "blk.queues.0.pending"),
    # ---- queue shape
    ("queue_size_not_power_of_two", _set(["blk", "queues", "0", "size"], 24), "blk.queues.0.size"),
    ("queue_size_zero", _set(["blk", "queues", "0", "size"], 0), "blk.queues.0.size"),
    ("queue_size_too_big", _set(["blk", "queues", "0", "size"], 65536), "blk.queues.0.size"),
    ("ring_misaligned", lambda d: d["blk"]["queues"]["0"].update(desc_addr=d["blk"]["queues"]["0"]["desc_addr"] + 8), "blk.queues.0.desc_addr"),
    ("rings_overlap", lambda d: d["blk"]["queues"]["0"].update(used_addr=d["blk"]["queues"]["0"]["desc_addr"]), "blk.queues.0."),
    ("inflight_head_out_of_range", lambda d: _first_indirect(d).update(head=16, descs=[16]), "blk.queues.0.in_flight["),
    ("inflight_head_not_first_desc", _head_not_first, ".head"),
    ("free_duplicate", _desc_twice, "blk.queues.0.free[1]"),
    ("free_out_of_range", lambda d: _q(d)["free"].__setitem__(0, 16), "blk.queues.0.free[0]"),
    ("descriptor_free_and_in_flight", _desc_both, "blk.queues.0."),
    ("descriptor_lost", _desc_lost, "blk.queues.0.free"),
    ("empty_chain", lambda d: _first_direct(d).update(descs=[]), ".descs"),
    ("indirect_with_two_descriptors", _indirect_two_descs, ".descs"),
    ("indirect_table_not_allocated", _table_not_live, ".table"),
    ("in_flight_count_vs_indices", _inflight_count, "blk.queues.0.in_flight"),
    ("event_idx_vs_features", lambda d: _q(d).update(event_idx=not _q(d)["event_idx"]), "blk.queues.0.event_idx"),
    # ---- allocator
    ("allocator_free_overlaps_live", _alloc_overlap, "blk.alloc."),
    ("allocator_free_not_merged", _alloc_unmerged, "blk.alloc.free["),
    ("allocator_bytes_unaccounted", _alloc_gap, "blk.alloc"),
    ("allocator_live_unsorted", _alloc_unsorted, "blk.alloc.live[1]"),
    ("allocator_negative_base", _set(["blk", "alloc", "base"], -1), "blk.alloc.base"),
    ("allocator_range_past_u64", _set(["blk", "alloc", "size"], 2**64 - 1), "blk.alloc.size"),
    ("allocator_pair_shape", lambda d: d["blk"]["alloc"]["free"][0].append(1), "blk.alloc.free[0]"),
    # ---- tokens
    ("token_float", lambda d: Row(_q(d)["in_flight"][0]).update(token=1.5), "blk.queues.0.in_flight[0].token"),
    ("token_object", lambda d: Row(_q(d)["in_flight"][0]).update(token={"a": 1}), "blk.queues.0.in_flight[0].token"),
    ("token_too_deep", lambda d: Row(_q(d)["in_flight"][0]).update(token=[[[[1]]]]), "blk.queues.0.in_flight[0].token[0][0][0]"),
    ("token_too_long", lambda d: Row(_q(d)["in_flight"][0]).update(token="x" * 65), "blk.queues.0.in_flight[0].token"),
    ("token_too_many_items", lambda d: Row(_q(d)["in_flight"][0]).update(token=list(range(9))), "blk.queues.0.in_flight[0].token"),
    ("blk_token_not_int", lambda d: Row(_q(d)["in_flight"][0]).update(token="7"), "blk.queues.0.in_flight[0].token"),
    # ---- blk cross-checks
    ("config_bad_hex", _set(["blk", "config"], "zz"), "blk.config"),
    ("config_uppercase_hex", lambda d: d["blk"].update(config="A" + d["blk"]["config"][1:]), "blk.config"),
    ("config_wrong_length", lambda d: d["blk"].update(config=d["blk"]["config"][:-2]), "blk.config"),
    ("config_reserved_nonzero", lambda d: d["blk"].update(config=d["blk"]["config"][:2 * 33] + "01" + d["blk"]["config"][2 * 34 :]), "blk.config"),
    ("queue_key_leading_zero", _queue_key("01"), "blk.queues.01"),
    ("queue_key_signed", _queue_key("+1"), "blk.queues.+1"),
    ("queue_keys_not_contiguous", _queue_key("5"), "blk.queues.5"),
    ("no_queues", _set(["blk", "queues"], {}), "blk.queues"),
    ("chain_without_request", _chain_without_request, ".token"),
    ("request_without_chain", _request_without_chain, ".token"),
    ("request_on_wrong_queue", _request_wrong_queue, ".token"),
    ("request_twice", _request_dup, ".token"),
    ("request_queue_unknown", lambda d: d["blk"]["requests"][0].update(queue=7), "blk.requests[0].queue"),
    ("allocation_owned_twice", _shared_allocation, ".hdr_addr"),
    ("header_not_allocated", lambda d: _req(d, "owned").update(hdr_addr=_req(d, "owned")["hdr_addr"] + 1), ".hdr_addr"),
    ("status_outside_header", lambda d: _req(d, "owned").update(status_addr=_req(d, "owned")["hdr_addr"] - 1), ".status_addr"),
    ("buffer_length_without_address", lambda d: _req(d, "owned").update(buf_addr=None, owns_buf=False), ".buf_addr"),
    ("raw_request_with_buffer", lambda d: _req(d, "raw").update(buf_len=4), ".buf_len"),
    ("raw_request_without_pieces", lambda d: _req(d, "raw").update(raw=[]), ".raw"),
    ("raw_piece_longer_than_allocation", lambda d: _req(d, "raw")["raw"][0].__setitem__(1, 4096), ".raw[0][1]"),
    ("raw_piece_shape", lambda d: _req(d, "raw")["raw"][0].pop(), ".raw[0]"),
    ("request_type_out_of_range", lambda d: d["blk"]["requests"][0].update(type=-2), "blk.requests[0].type"),
    ("parked_still_in_flight", _parked_in_flight, "blk.parked[0].token"),
    ("parked_data_odd_hex", lambda d: d["blk"]["parked"][0].update(data="abc"), "blk.parked[0].data"),
    ("next_token_not_above_tokens", _set(["blk", "next_token"], 2), "blk."),
    # ---- net
    ("mac_wrong_length", _set(["net", "mac"], "0200000000"), "net.mac"),
    ("features_not_offered", lambda d: d["net"].update(features=d["net"]["features"] | (1 << 63)), "net.features"),
    ("curr_pairs_above_max", _set(["net", "curr_pairs"], 2), "net.curr_pairs"),
    ("max_pairs_zero", _set(["net", "max_pairs"], 0), "net.max_pairs"),
    ("net_queue_missing", _net_queue_missing, "net.queues"),
    ("net_queue_extra", _net_queue_extra, "net.queues.3"),
    ("net_token_wrong_kind", _net_token(lambda t: ["rx", t[1]]), "net.queues.1.in_flight[0].token"),
    ("net_token_wrong_shape", _net_token(lambda t: t[1]), "net.queues.1.in_flight[0].token"),
    ("net_token_buffer_not_allocated", _net_token(lambda t: ["tx", t[1] + 1]), "net.queues.1.in_flight[0].token"),
    ("net_token_buffer_twice", _net_same_buffer, "net.queues.1.in_flight[1].token"),
    ("allocators_overlap", _net_alloc_overlap, "net.buf_alloc"),
    ("rx_buf_size_zero", _set(["net", "rx_buf_size"], 0), "net.rx_buf_size"),
    ("rx_buf_size_above_buffers", lambda d: d["net"].update(rx_buf_size=d["net"]["rx_buf_size"] + 1), "net.queues.0.in_flight[0].token"),
    ("counter_negative", lambda d: d["net"]["counters"].update(tx_submitted=-1), "net.counters.tx_submitted"),
    ("counter_empty_name", lambda d: d["net"]["counters"].update({"": 1}), "net.counters."),
]


@pytest.mark.parametrize("edit,where", [pytest.param(e, w, id=n) for n, e, w in REFUSED])
def test_refused_field(docs: dict[str, Any], edit: Callable[[dict[str, Any]], None], where: str) -> None:
    doc = copy.deepcopy(docs)
    edit(doc)
    raw = encode_guest_state(doc)
    assert raw != encode_guest_state(docs)  # (compared as bytes: in Python, True == 1)
    with pytest.raises(GuestStateError) as info:
        decode_root(raw)
    path = info.value.path
    ok = path.endswith(where) if where.startswith(".") else path.startswith(where)
    assert ok, (path, str(info.value))
    # the unedited document still decodes (the edit, not the rig, caused the refusal)
    decode_root(encode_guest_state(docs))


# ============================================================================ refused documents, one test each
def test_document_not_utf8() -> None:
    with pytest.raises(GuestStateError, match="UTF-8"):
        decode_guest_state(b'{"a":"\xff"}')


@pytest.mark.parametrize("raw", [b"[]", b"1", b'"x"', b"null"])
def test_document_not_an_object(raw: bytes) -> None:
    with pytest.raises(GuestStateError, match="object"):
        decode_guest_state(raw)


def test_document_too_big() -> None:
    raw = b'{"a":"' + b"0" * MAX_DOCUMENT_BYTES + b'"}'
    with pytest.raises(GuestStateError, match="at most"):
        decode_guest_state(raw)
    with pytest.raises(GuestStateError, match="at most"):
        encode_guest_state({"a": "0" * MAX_DOCUMENT_BYTES})


def test_document_nesting_limit() -> None:
    ok = b'{"a":' + b"[" * (MAX_NESTING - 1) + b"]" * (MAX_NESTING - 1) + b"}"
    assert decode_guest_state(ok)
    deep = b'{"a":' + b"[" * MAX_NESTING + b"]" * MAX_NESTING + b"}"
    with pytest.raises(GuestStateError, match="nested"):
        decode_guest_state(deep)
    very_deep = b'{"a":' + b"[" * 200000 + b"]" * 200000 + b"}"
    with pytest.raises(GuestStateError, match="nested"):
        decode_guest_state(very_deep)


from virtio_lm.vm import guest_state as gs  # noqa: E402 - the private scanners under test

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab', max_size=6),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(alphabet='[]{}"\\ab', max_size=4), kids, max_size=3),
    max_leaves=20,
)


@pytest.mark.slow  # over 0.4 s: out of the one-minute fast subset (CI runs it)
@given(doc=_JSON)
@settings(max_examples=300, deadline=None)
def test_text_depth_is_the_parsed_depth_with_brackets_quotes_and_backslashes_in_strings(doc) -> None:
    """The byte scan (both its no-backslash fast path and the general one) against a walk
    of the parsed document."""
    for ascii_only in (True, False):
        raw = json.dumps(doc, ensure_ascii=ascii_only).encode()
        assert gs._text_depth(raw) == gs._depth(doc)


def test_text_depth_counts_brackets_after_an_escaped_backslash_at_a_string_end() -> None:
    assert gs._text_depth(br'{"a":"\\\\","b":[[1]]}') == 3  # the string ends after two escaped backslashes
    assert gs._text_depth(br'{"a":"[[[\"]]]"}') == 1  # brackets inside the string (escaped quote)


def test_document_duplicate_keys() -> None:
    with pytest.raises(GuestStateError, match="duplicate"):
        decode_guest_state(b'{"a":1,"a":2}')


@pytest.mark.parametrize("const", [b"NaN", b"Infinity", b"-Infinity"])
def test_document_non_finite_numbers(const: bytes) -> None:
    with pytest.raises(GuestStateError, match="invalid keyword"):
        decode_guest_state(b'{"a":' + const + b"}")


def test_document_trailing_garbage() -> None:
    with pytest.raises(GuestStateError, match="not JSON"):
        decode_guest_state(b'{"a":1}x')


def test_document_integer_with_too_many_digits() -> None:
    with pytest.raises(GuestStateError, match="not JSON"):
        decode_guest_state(b'{"a":' + b"9" * 5000 + b"}")


def test_document_not_bytes() -> None:
    with pytest.raises(GuestStateError):
        decode_guest_state('{"a":1}')  # type: ignore[arg-type]


def test_encode_refuses_non_json_values() -> None:
    with pytest.raises(GuestStateError):
        encode_guest_state({"a": b"\x00"})
    with pytest.raises(GuestStateError):
        encode_guest_state({"a": float("nan")})
    with pytest.raises(GuestStateError):
        encode_guest_state([1])  # type: ignore[arg-type]


def test_encoding_is_canonical() -> None:
    assert encode_guest_state({"b": [1, None, True], "a": {"y": "z", "x": 0}}) == b'{"a":{"x":0,"y":"z"},"b":[1,null,true]}'


# ============================================================================ unit round trips
def test_tokens_round_trip_exactly() -> None:
    for tok in (None, True, False, 0, 1, -1, 2**64 - 1, -(2**63), "", "rx", ("tx", 4096), ("ctrl", 1, 2), ((1,), ("a", None))):
        j = token_to_json(tok)
        back = token_from_json(json.loads(json.dumps(j)))
        assert back == tok and type(back) is type(tok)
    assert token_from_json([True]) == (True,) and type(token_from_json([True])[0]) is bool
    for bad in ([1], 1.5, b"x", object(), 2**64, "x" * 65, (((("deep",),),),)):
        with pytest.raises(GuestStateError):
            token_to_json(bad)


def test_allocator_round_trip_and_behaviour_preserved() -> None:
    a = Allocator(0x1000, 0x10000)
    addrs = [a.alloc(n, al) for n, al in ((100, 16), (4096, 4096), (7, 64), (300, 16))]
    a.free(addrs[2])
    j = allocator_to_json(a)
    b = allocator_from_json(json.loads(json.dumps(j)))
    assert allocator_to_json(b) == j
    assert b.free_bytes() == a.free_bytes() and b.allocated() == a.allocated()
    # the same future: same addresses handed out, same frees accepted
    for n, al in ((32, 16), (5000, 4096), (64, 64)):
        assert b.alloc(n, al) == a.alloc(n, al)
    b.free(addrs[0])
    a.free(addrs[0])
    assert allocator_to_json(b) == allocator_to_json(a)


def test_driver_queue_round_trip_keeps_working_on_copied_memory() -> None:
    mem = Memory(1 << 20, name="q-a")
    alloc = Allocator(0x1000, 0x80000)
    from virtio_lm.virtqueue.device import Segment

    dq = DriverQueue.allocate(mem.cpu, alloc, 8, event_idx=True)
    dq.set_start_index(0xFFFE)  # across the u16 wrap
    dq.add([Segment(0x90000, 8)], [Segment(0x91000, 8)], token=("a", 1))
    dq.add([Segment(0x92000, 8)] * 3, [], indirect=True, token=7)
    dq.publish()
    dq.add([], [Segment(0x93000, 4)], token=None)  # added, not published
    j = queue_to_json(dq)
    alloc_j = allocator_to_json(alloc)
    mem_b = copy_guest(mem, "q-b")
    try:
        alloc_b = allocator_from_json(alloc_j)
        dq_b = queue_from_json(json.loads(json.dumps(j)), alloc=alloc_b)
        dq_b.port = mem_b.cpu
        assert queue_to_json(dq_b) == j
        assert (dq_b.avail_idx, dq_b._pending, dq_b.in_flight(), dq_b.num_free()) == (0, 1, 3, 4)  # 0xFFFE + 2 wrapped
        dq_b.publish()
        assert mem_b.read(dq_b.avail_addr + 2, 2) == (1).to_bytes(2, "little")
        # play the device: return the indirect chain, then the first one
        heads = list(dq_b._inflight)
        from virtio_lm.wire.ring import used_elem_offset

        for n, head in enumerate(heads[1::-1]):
            idx = (0xFFFE + n) & 0xFFFF
            mem_b.cpu.write(dq_b.used_addr + used_elem_offset(idx % 8), head.to_bytes(4, "little") + (5).to_bytes(4, "little"))
            mem_b.cpu.write(dq_b.used_addr + 2, ((idx + 1) & 0xFFFF).to_bytes(2, "little"))
        assert dq_b.get_all_used() == [(7, 5), (("a", 1), 5)]
        assert alloc_b.allocated() == 3  # the indirect table was freed; the three ring parts remain
    finally:
        mem.close()
        mem_b.close()


def test_the_codecs_keys_are_the_states_fields() -> None:
    """A field added to a saved state must appear in the document (or the two disagree here)."""
    import dataclasses

    from virtio_lm.virtqueue.driver import AllocatorState, ChainState, DriverQueueState

    assert set(gs._DQ_KEYS) == {f.name for f in dataclasses.fields(DriverQueueState)}
    assert set(gs._ALLOC_KEYS) == {f.name for f in dataclasses.fields(AllocatorState)}
    assert gs._IF_FIELDS == ChainState._fields  # a row holds them in this order


def test_a_queue_saves_and_restores_to_the_same_state() -> None:
    mem = Memory(1 << 20, name="q")
    try:
        alloc = Allocator(0x1000, 0x10000)
        dq = DriverQueue.allocate(mem.cpu, alloc, 8, event_idx=True)
        dq.add([Segment(0x20000, 16)], [Segment(0x20010, 8)], token=("a", 1))
        dq.add([Segment(0x20000, 16), Segment(0x20020, 4)], [], indirect=True, token=7)
        st = dq.save()
        again = DriverQueue.from_state(st, port=mem.cpu, alloc=Allocator.from_state(alloc.save()))
        assert again.save() == st
        with pytest.raises(GuestStateError, match="neither free nor in flight"):
            DriverQueue.from_state(dataclasses_replace(st, free=st.free[1:]), port=None, alloc=None)
    finally:
        mem.close()


def test_errors_are_virtio_lm_errors() -> None:
    e = GuestStateError("blk.queues.0.free[3]", "descriptor 3 twice")
    assert isinstance(e, VirtioLmError)
    assert str(e) == "guest state blk.queues.0.free[3]: descriptor 3 twice"


# ------------------------------------------------------------------ the bulk path for in-flight chains
def _rx_queue(n: int = 8) -> dict[str, Any]:
    return {
        "size": n, "desc_addr": 0x10000, "avail_addr": 0x11000, "used_addr": 0x12000, "event_idx": False,
        "free": [], "in_flight": [[i, [i], None, ["rx", 0x20000 + 1536 * i]] for i in range(n)],
        "avail_idx": n, "pending": 0, "kick_old": n, "last_used_idx": 0, "interrupts": True,
    }


def test_a_well_formed_in_flight_list_restores_on_the_bulk_path():
    dq = queue_from_json(_rx_queue())
    assert [(c.head, c.descs, c.table, c.token) for c in dq.chains()] == [
        (i, (i,), None, ("rx", 0x20000 + 1536 * i)) for i in range(8)
    ]


@pytest.mark.parametrize("mutate, where", [
    (lambda d: Row(d["in_flight"][3]).update(descs=[2]), "in_flight[3]"),  # descriptor 2 twice
    (lambda d: d["in_flight"][1].pop(), "in_flight[1]: expected a row [head, descs, table, token], got a list of 3"),
    (lambda d: d["in_flight"][1].append(1), "in_flight[1]: expected a row [head, descs, table, token], got a list of 5"),
    (lambda d: d["in_flight"].__setitem__(2, {"head": 2}), "in_flight[2]: expected a row [head, descs, table, token], got dict"),
    (lambda d: Row(d["in_flight"][5]).update(token=["rx", "x" * 65]), "in_flight[5].token"),  # string too long
    (lambda d: Row(d["in_flight"][6]).update(descs=[6, 8]), "in_flight[6].descs[1]"),  # out of range
    (lambda d: Row(d["in_flight"][0]).update(head=True), "in_flight[0].head"),  # a bool is not an index
])
def test_bulk_path_refuses_what_the_checked_path_names(mutate, where):
    doc = _rx_queue()
    mutate(doc)
    with pytest.raises(GuestStateError) as exc:
        queue_from_json(doc, "q")
    assert where in str(exc.value)
