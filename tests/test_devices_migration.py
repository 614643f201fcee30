"""The migration interface of QueueDevice, between two DmaTestDevice instances on two memories.

Source: a driver keeps 40+ requests in flight (some finished, some running on
the back-end pool, most not started) -> quiesce (no DMA, no interrupt, kicks
remembered) -> freeze (not-started work cancelled) -> save.  Guest memory is
copied to the destination, which validates, restores and resumes: every
request completes exactly once from the guest driver's view, with the right
bytes.  Also: rollback on the source, negative controls (broken saves), and
one named test per hostile INFLIGHT / framing image.
"""

from __future__ import annotations

import dataclasses

import pytest

from helpers import (
    WAIT,
    GatedDmaTestDevice,
    Req,
    Rig,
    check_result,
    clone_driver_queue,
    copy_memory,
    make_destination,
    make_rig,
    wait_until,
)
from virtio_lm.devices.base import MAX_HELD_DATA, ReqState
from virtio_lm.errors import DeviceBusyError, StateImageError, UsedRingError
from virtio_lm.pci.snapshot import save_function
from virtio_lm.virtqueue.driver import DriverQueue
from virtio_lm.wire.codec import read_u16
from virtio_lm.wire.state import (
    ImageHeader,
    InflightHeader,
    QueueRecord,
    RecordType,
    StateImage,
    build_image,
    decode_image,
    encode_image,
)

N_IN_FLIGHT = 40


# ================================================================== scenario
@dataclasses.dataclass
class Frozen:
    src: Rig
    reaped: list[tuple[Req, int]]  # completed on the source before the quiesce
    submitted: list[Req]
    image: bytes
    quiet_kick: list[Req]  # added and kicked while quiesced


def used_idx_in_memory(rig: Rig, dq: DriverQueue) -> int:
    return read_u16(rig.mem.read(dq.used_addr + 2, 2))


def in_flight_to_frozen(device: GatedDmaTestDevice | None = None) -> Frozen:
    """Run the source up to a saved image, checking the QUIESCED / FREEZED rules on the way."""
    src = make_rig(device if device is not None else GatedDmaTestDevice(gated=True, backend_threads=4))
    dev = src.dev
    submitted: list[Req] = []
    # a few requests done and reaped before: used idx is not 0
    dev.open(100, 101, 102)
    submitted += [src.fill(seed=s, length=300) for s in (100, 101, 102)]
    src.kick()
    wait_until(lambda: dev.completed == 3, "warm-up requests")
    reaped = src.reap()
    dev.started.clear()
    # 40 requests in flight: FILL and ECHO, direct and indirect
    for s in range(N_IN_FLIGHT):
        if s % 5 == 4:
            submitted.append(src.echo(seed=s, payload=bytes([s]) * (100 + s), indirect=bool(s % 2)))
        else:
            submitted.append(src.fill(seed=s, length=1000 + 37 * s, indirect=bool(s % 2)))
    src.kick()
    assert dev.in_flight == N_IN_FLIGHT
    wait_until(lambda: dev.started == {0, 1, 2, 3}, "four requests running")
    dev.open(1)  # finishes while running: out of order, request 0 (older) stays held
    wait_until(lambda: dev.completed == 4 and dev.started == {0, 1, 2, 3, 4}, "request 1")
    reaped += src.reap()
    assert [t.seed for t, _ in reaped[3:]] == [1]

    # ---- QUIESCE: no DMA, no interrupt from here on
    dev.mig_quiesce()
    assert src.fn.port.bus_master is False and not dev.mastering
    src.tracker.collect()
    written, irqs, used = src.device_bytes_written(), len(src.interrupts), used_idx_in_memory(src, src.dq)
    dev.open(0, 2)  # back-end work finishes while quiesced: held
    wait_until(lambda: sum(r.state is ReqState.DONE for r in dev.requests()) == 2, "held completions")
    wait_until(lambda: dev.started == {0, 1, 2, 3, 4, 5, 6}, "pool picks up the next two")
    quiet = [src.fill(seed=s, length=64) for s in (200, 201, 202)]
    assert src.kick() is True  # the driver notified...
    assert dev.kicks_while_quiesced == 1  # ...and the device remembered, without taking anything
    assert dev.in_flight == N_IN_FLIGHT - 1
    # ---- FREEZE: first with no time to settle (work is gated): refused, not-started work cancelled
    with pytest.raises(DeviceBusyError):
        dev.mig_freeze(0)
    assert not dev.frozen
    states = [r.state for r in dev.requests()]
    assert states.count(ReqState.RUNNING) == 4 and states.count(ReqState.DONE) == 2
    assert states.count(ReqState.PENDING) == N_IN_FLIGHT - 1 - 6
    dev.open_all()
    dev.mig_freeze(WAIT)
    assert dev.frozen
    states = [r.state for r in dev.requests()]
    assert states.count(ReqState.DONE) == 6 and states.count(ReqState.PENDING) == N_IN_FLIGHT - 1 - 6
    assert dev.started == {0, 1, 2, 3, 4, 5, 6}  # the cancelled never ran
    # nothing was mastered while quiesced / frozen
    assert src.device_bytes_written() == written
    assert not src.tracker.peek().any()
    assert len(src.interrupts) == irqs
    assert used_idx_in_memory(src, src.dq) == used
    image = dev.mig_save()
    assert dev.mig_save() == image  # stable while frozen
    return Frozen(src, reaped, submitted, image, quiet)


def exactly_once(f: Frozen, reaped_later: list[tuple[Req, int]], mem) -> None:
    """Every submitted request completed exactly once, OK, with the right bytes in ``mem``."""
    everything = f.reaped + reaped_later
    ids = [id(t) for t, _ in everything]
    assert len(ids) == len(set(ids)), "a request completed twice"
    want = f.submitted + f.quiet_kick
    assert set(ids) == {id(r) for r in want}, f"{len(want) - len(set(ids) & {id(r) for r in want})} requests lost"
    for token, used_len in everything:
        check_result(mem, token, used_len)


def reap_all(dq: DriverQueue) -> list[tuple[Req, int]]:
    try:
        return dq.get_all_used()  # type: ignore[return-value]
    except UsedRingError as exc:  # the used ring itself is inconsistent: entries lost or invented
        raise AssertionError(f"used ring broken: {exc}") from exc


def migrate(f: Frozen, dst_device=None) -> tuple[Rig, DriverQueue]:
    """Destination: INIT -> FREEZE, memory copied, validate + restore, unfreeze, resume."""
    dst = make_destination(dst_device)
    dst.dev.mig_freeze()
    copy_memory(f.src.mem, dst.mem)
    validated = dst.dev.mig_validate(f.image)
    dst.dev.mig_restore(validated)
    dst.dev.mig_unfreeze()
    dst.dev.mig_resume()
    return dst, clone_driver_queue(f.src.dq, dst.mem.cpu)


@pytest.fixture
def frozen():
    f = in_flight_to_frozen()
    yield f
    f.src.close()


# ================================================================== migration
def test_migration_completes_every_request_exactly_once(frozen):
    f = frozen
    src_written = f.src.device_bytes_written()
    dst, dq = migrate(f)
    try:
        dst.wait_idle()
        later = reap_all(dq)
        exactly_once(f, later, dst.mem)
        assert dq.in_flight() == 0 and dq.used_idx() == dq.avail_idx
        assert dst.dev.in_flight == 0
        assert dst.interrupts  # the destination interrupted for what it returned
        assert f.src.device_bytes_written() == src_written  # the frozen source stayed silent
        # the held completions were written by the destination (its tracker saw them)
        held_pages = {p for t, _ in later if t.seed in (0, 2, 3) for p in range(t.buf_addr >> 12, (t.buf_addr + t.wlen - 1 >> 12) + 1)}
        assert held_pages <= set(dst.tracker.peek().nonzero()[0])
    finally:
        dst.close()


def test_image_holds_done_and_pending_records_out_of_order(frozen):
    """Regression: held chains are not the last ones taken (request 0 is held while
    1 completed), so an avail_idx window check would refuse this valid image."""
    img = decode_image(frozen.image)
    hdrs = [InflightHeader.unpack_from(r.payload) for r in img.of_type(RecordType.INFLIGHT)]
    assert len(hdrs) == N_IN_FLIGHT - 1
    assert sum(h.done for h in hdrs) == 6 and all(h.data_len for h in hdrs if h.done)
    (q,) = [QueueRecord.decode(r.payload) for r in img.of_type(RecordType.QUEUE)]
    held = (q.last_avail_idx - q.used_idx) & 0xFFFF
    assert held == len(hdrs)
    recent = {(q.last_avail_idx - 1 - k) & 0xFFFF for k in range(held)}
    assert any(h.avail_idx not in recent for h in hdrs)
    dst = make_destination()
    try:
        dst.dev.mig_freeze()
        dst.dev.mig_validate(frozen.image)  # accepted
    finally:
        dst.close()


def test_rollback_unfreeze_and_resume_on_the_source(frozen):
    f = frozen
    f.src.dev.mig_unfreeze()
    f.src.dev.mig_resume()
    assert f.src.fn.port.bus_master
    f.src.wait_idle()
    exactly_once(f, reap_all(f.src.dq), f.src.mem)
    assert f.src.dev.started >= set(range(N_IN_FLIGHT))  # the cancelled ones ran after all


def test_quiesce_then_resume_without_freeze():
    src = make_rig(GatedDmaTestDevice(gated=True, backend_threads=2))
    try:
        reqs = [src.fill(seed=s, length=500) for s in range(10)]
        src.kick()
        wait_until(lambda: src.dev.started == {0, 1}, "two running")
        src.dev.mig_quiesce()
        written = src.device_bytes_written()
        src.dev.open(0)  # held
        wait_until(lambda: any(r.state is ReqState.DONE for r in src.dev.requests()), "held")
        more = src.fill(seed=50, length=10)
        src.kick()
        assert src.device_bytes_written() == written and src.reap() == []
        src.dev.mig_resume()
        src.dev.open_all()
        src.wait_idle()
        done = reap_all(src.dq)
        assert sorted(t.seed for t, _ in done) == sorted(r.seed for r in reqs + [more])
        for t, n in done:
            check_result(src.mem, t, n)
    finally:
        src.close()


def test_reset_while_work_is_running_and_queued_does_not_hang():
    """Regression: reset() used to wait for cancelled futures that never run."""
    src = make_rig(GatedDmaTestDevice(gated=True, backend_threads=1))
    try:
        for s in range(5):
            src.fill(seed=s, length=10)
        src.kick()
        wait_until(lambda: src.dev.started == {0}, "one running")
        src.dev.open(0)
        src.fn.reset()  # waits for request 0, cancels 1..4
        assert src.dev.in_flight == 0
        assert src.dev.started == {0}
    finally:
        src.close()


# ================================================================== negative controls
class DropsInflight(GatedDmaTestDevice):
    """A broken save that forgets the INFLIGHT records."""

    def mig_save(self) -> bytes:
        img = decode_image(super().mig_save())
        img.records = [r for r in img.records if r.type != RecordType.INFLIGHT]
        return encode_image(img)


class HidesHeldCompletions(GatedDmaTestDevice):
    """A broken save that forgets the held completions and covers it up by moving
    used_idx on (as if they had been returned): the counts agree, validation passes."""

    def mig_save(self) -> bytes:
        img = decode_image(super().mig_save())
        done = [r for r in img.of_type(RecordType.INFLIGHT) if InflightHeader.unpack_from(r.payload).done]
        out = StateImage(img.device_id)
        for r in img.records:
            if r in done:
                continue
            if r.type == RecordType.QUEUE:
                q = QueueRecord.decode(r.payload)
                r = dataclasses.replace(r, payload=dataclasses.replace(q, used_idx=(q.used_idx + len(done)) & 0xFFFF).encode())
            out.records.append(r)
        return encode_image(out)


def test_negative_control_dropped_inflight_records_caught_by_validate():
    f = in_flight_to_frozen(DropsInflight(gated=True, backend_threads=4))
    dst = make_destination()
    try:
        dst.dev.mig_freeze()
        with pytest.raises(StateImageError, match="INFLIGHT records"):
            dst.dev.mig_validate(f.image)
    finally:
        dst.close()
        f.src.close()


def test_negative_control_hidden_held_completions_caught_by_exactly_once():
    f = in_flight_to_frozen(HidesHeldCompletions(gated=True, backend_threads=4))
    try:
        dst, dq = migrate(f)  # validation cannot see it: the counts agree
        try:
            dst.wait_idle()
            with pytest.raises(AssertionError):
                exactly_once(f, reap_all(dq), dst.mem)
        finally:
            dst.close()
    finally:
        f.src.close()


# ================================================================== hostile images (INFLIGHT, framing)
@pytest.fixture(scope="module")
def valid_image():
    f = in_flight_to_frozen()
    try:
        yield f.image
    finally:
        f.src.close()


@pytest.fixture
def dst(valid_image):
    """A frozen destination that already holds a restored state (so 'unchanged' means something)."""
    d = make_destination()
    d.dev.mig_freeze()
    d.dev.mig_restore(d.dev.mig_validate(valid_image))
    yield d
    d.close()


def fn_state(d: Rig) -> tuple:
    fn = d.fn
    qs = tuple((q.size, q.enabled, q.desc_addr, q.avail_addr, q.used_addr, q.last_avail_idx, q.used_idx,
                q.signalled_used, q.broken, q.event_idx, q.indirect_desc) for q in fn.queues)
    reqs = tuple(sorted((r.queue, r.head, r.avail_idx, r.state.name, r.data) for r in d.dev.requests()))
    return (fn.status, fn.driver_features, fn.negotiated, fn.config_generation, fn.config_msix_vector,
            tuple(fn.queue_msix_vectors), fn.queue_select, qs, reqs, d.dev.frozen, fn.port.bus_master)


def refuse(d: Rig, blob: bytes, match: str) -> None:
    before, state = d.dev.mig_save(), fn_state(d)
    with pytest.raises(StateImageError, match=match):
        d.dev.mig_validate(blob)
    assert d.dev.mig_save() == before
    assert fn_state(d) == state


def records(blob: bytes) -> list[tuple[int, bytes]]:
    return [(r.type, r.payload) for r in decode_image(blob).records]


def with_inflight(blob: bytes, edit) -> bytes:
    """Rebuild the image with ``edit(list of InflightHeader + data)`` applied to the INFLIGHT records."""
    recs = records(blob)
    infl = [(InflightHeader.unpack_from(p), p[InflightHeader.SIZE :]) for t, p in recs if t == RecordType.INFLIGHT]
    infl = edit(infl)
    rest = [(t, p) for t, p in recs if t != RecordType.INFLIGHT]
    return build_image(decode_image(blob).device_id, rest + [(RecordType.INFLIGHT, h.encode() + d) for h, d in infl])


def test_valid_image_is_accepted_and_restores_the_same_state(dst, valid_image):
    assert dst.dev.mig_save() == valid_image


def test_inflight_for_nonexistent_queue(dst, valid_image):
    blob = with_inflight(valid_image, lambda l: [(dataclasses.replace(l[0][0], queue=1), l[0][1])] + l[1:])
    refuse(dst, blob, "queue 1 does not exist")


def test_inflight_head_not_below_queue_size(dst, valid_image):
    blob = with_inflight(valid_image, lambda l: [(dataclasses.replace(l[0][0], head=128), l[0][1])] + l[1:])
    refuse(dst, blob, "head 128 >= queue size 128")


def test_inflight_duplicate_chain(dst, valid_image):
    def dup(l):
        return [(dataclasses.replace(l[1][0], head=l[0][0].head), l[1][1])] + l[:1] + l[2:]

    refuse(dst, with_inflight(valid_image, dup), "recorded twice")


def test_inflight_count_below_held(dst, valid_image):
    refuse(dst, with_inflight(valid_image, lambda l: l[1:]), "INFLIGHT records")


def test_inflight_count_above_held(dst, valid_image):
    def extra(l):
        used = {h.head for h, _ in l}
        free = next(h for h in range(128) if h not in used)
        return l + [(InflightHeader(0, free, 0, 0, 0), b"")]

    refuse(dst, with_inflight(valid_image, extra), "INFLIGHT records")


def test_inflight_not_executed_with_data(dst, valid_image):
    def data(l):
        h, _ = next((h, d) for h, d in l if not h.done)
        rest = [(x, d) for x, d in l if x is not h]
        return [(dataclasses.replace(h, data_len=3), b"abc")] + rest

    refuse(dst, with_inflight(valid_image, data), "not executed carries 3 bytes")


def test_inflight_held_data_too_large(dst, valid_image):
    def big(l):
        h, _ = l[0]
        return [(dataclasses.replace(h, done=1, data_len=MAX_HELD_DATA + 1), bytes(MAX_HELD_DATA + 1))] + l[1:]

    refuse(dst, with_inflight(valid_image, big), "too large")


def test_inflight_on_a_disabled_queue(dst, valid_image):
    recs = []
    for t, p in records(valid_image):
        if t == RecordType.QUEUE:
            q = QueueRecord.decode(p)
            p = dataclasses.replace(q, enabled=0, used_idx=q.last_avail_idx).encode()
        elif t == RecordType.INFLIGHT:
            continue
        recs.append((t, p))
    recs.append((RecordType.INFLIGHT, InflightHeader(0, 0, 0, 0, 0).encode()))
    refuse(dst, build_image(63, recs), "queue 0 is not enabled")


def test_unexpected_device_record(dst, valid_image):
    refuse(dst, build_image(63, records(valid_image) + [(0x100, b"x")]), "unexpected device records")


def test_unexpected_config_record(dst, valid_image):
    refuse(dst, build_image(63, records(valid_image) + [(RecordType.CONFIG, b"\0\0\0\0")]), "unexpected device records")


def test_truncated_image(dst, valid_image):
    refuse(dst, valid_image[:-1], "needs")


def test_truncated_header(dst, valid_image):
    refuse(dst, valid_image[: ImageHeader.SIZE - 1], "needs")


def test_corrupt_byte_fails_checksum(dst, valid_image):
    bad = bytearray(valid_image)
    bad[ImageHeader.SIZE + 40] ^= 0x10
    refuse(dst, bytes(bad), "crc32")


def test_trailing_bytes(dst, valid_image):
    refuse(dst, valid_image + b"\0", "trailing")


def test_bad_magic(dst, valid_image):
    refuse(dst, b"XXXX" + valid_image[4:], "magic")


def test_inflight_record_with_bad_done_flag(dst, valid_image):
    def bad(l):
        h, d = l[0]
        return l[1:] + [(dataclasses.replace(h, done=2), d)]

    refuse(dst, with_inflight(valid_image, bad), "done")


def test_restore_refused_while_work_runs():
    """mig_restore is for a frozen device: with back-end work running it refuses and changes nothing."""
    r = make_rig(GatedDmaTestDevice(gated=True, backend_threads=1))
    try:
        r.fill(seed=0, length=8)
        r.kick()
        wait_until(lambda: r.dev.started == {0}, "running")
        r.dev.mig_quiesce()
        validated = r.dev.mig_validate(save_function_image(r))
        with pytest.raises(DeviceBusyError):
            r.dev.mig_restore(validated)
        assert [q.state for q in r.dev.requests()] == [ReqState.RUNNING]
    finally:
        r.close()


def save_function_image(r: Rig) -> bytes:
    """An image of ``r`` whose INFLIGHT records say 'not executed' (built by hand: mig_save refuses
    while work runs)."""
    recs = save_function(r.fn)
    for req in r.dev.requests():
        recs.append((RecordType.INFLIGHT, InflightHeader(req.queue, req.head, req.avail_idx, 0, 0).encode()))
    return build_image(63, recs)


def test_work_that_raises_not_executed_goes_back_to_pending_and_runs_again_at_resume():
    """QueueDevice's NotExecuted hook (used by net's transmit): the request is 'not executed'
    again -- saved without data, re-run at resume -- and completes exactly once."""
    from virtio_lm.devices.base import NotExecuted
    from virtio_lm.devices.dmatest import DmaTestDevice

    class GiveUpOnce(DmaTestDevice):
        def __init__(self) -> None:
            super().__init__()
            self.gave_up = False

        def handle(self, fn, queue, chain):  # type: ignore[override]
            work = super().handle(fn, queue, chain)
            if not callable(work) or self.gave_up:
                return work

            def first_time() -> bytes:
                self.gave_up = True
                raise NotExecuted()

            return first_time

    rig = make_rig(GiveUpOnce())
    try:
        req = rig.fill(7, 256)
        rig.dq.publish()
        rig.kick()
        wait_until(lambda: rig.dev.deferred == 1)
        (held,) = rig.dev.requests()
        assert held.state is ReqState.PENDING and rig.reap() == []
        rig.dev.mig_quiesce()
        rig.dev.mig_resume()  # re-executes it
        rig.wait_idle()
        ((token, used),) = rig.reap()
        assert token is req and used == 257
        check_result(rig.mem, req, used)
    finally:
        rig.close()
