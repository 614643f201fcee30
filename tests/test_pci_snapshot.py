"""pci.snapshot: transport records of a VirtioPciFunction -- save, validate (one named test per
refused image, each leaving the destination function as it was), apply."""

from __future__ import annotations

import dataclasses

import pytest

from helpers import ALL_FEATURES, Rig, make_destination, make_rig
from virtio_lm.devices.dmatest import DmaTestDevice
from virtio_lm.errors import StateImageError
from virtio_lm.pci.snapshot import apply_function, save_function, validate_function
from virtio_lm.wire.features import Feature, bit
from virtio_lm.wire.ring import USED_ALIGN
from virtio_lm.wire.state import (
    QUEUE_FLAG_BROKEN,
    QUEUE_FLAG_SIGNALLED_VALID,
    FunctionRecord,
    QueueRecord,
    RecordType,
    StateImage,
    decode_image,
    encode_image,
)

DEV_ID = DmaTestDevice.device_id


class TwoQueues(DmaTestDevice):
    num_queues = 2


@pytest.fixture
def src():
    r = make_rig(TwoQueues(), queue_size=64)
    r.fill(seed=1, length=100)
    r.kick()
    r.wait_idle()
    r.reap()
    yield r
    r.close()


@pytest.fixture
def dst():
    d = make_destination(TwoQueues())
    yield d
    d.close()


def image_of(fn) -> StateImage:
    img = StateImage(fn.device.device_id)
    for t, p in save_function(fn):
        img.add(t, p)
    return img


def fn_state(fn) -> tuple:
    return (tuple(save_function(fn)), fn.needs_reset_reason,
            tuple((q.event_idx, q.indirect_desc, q.broken) for q in fn.queues))


def refuse(dst: Rig, img: StateImage, match: str) -> None:
    """Refused by validate_function and, as an encoded image, by the device's mig_validate;
    neither changes the function or the device."""
    before, saved = fn_state(dst.fn), dst.dev.mig_save()
    with pytest.raises(StateImageError, match=match):
        validate_function(dst.fn, img)
    with pytest.raises(StateImageError, match=match):
        dst.dev.mig_validate(encode_image(img))
    assert fn_state(dst.fn) == before
    assert dst.dev.mig_save() == saved


def edit_function(img: StateImage, **changes) -> StateImage:
    out = StateImage(img.device_id)
    for r in img.records:
        p = r.payload
        if r.type == RecordType.FUNCTION:
            p = dataclasses.replace(FunctionRecord.decode(p), **changes).encode()
        out.add(r.type, p)
    return out


def edit_queue(img: StateImage, index: int, **changes) -> StateImage:
    out = StateImage(img.device_id)
    for r in img.records:
        p = r.payload
        if r.type == RecordType.QUEUE and QueueRecord.decode(p).index == index:
            p = dataclasses.replace(QueueRecord.decode(p), **changes).encode()
        out.add(r.type, p)
    return out


# ---------------------------------------------------------------- round trips
def test_save_validate_apply_round_trip(src, dst):
    img = image_of(src.fn)
    snap = validate_function(dst.fn, img)
    apply_function(dst.fn, snap)
    assert save_function(dst.fn) == save_function(src.fn)
    for a, b in zip(src.fn.queues, dst.fn.queues):
        assert (a.event_idx, a.indirect_desc, a.enabled, a.size) == (b.event_idx, b.indirect_desc, b.enabled, b.size)
    assert dst.fn.negotiated == src.fn.negotiated == ALL_FEATURES


def test_round_trip_through_encoded_image(src, dst):
    img = decode_image(encode_image(image_of(src.fn)))
    apply_function(dst.fn, validate_function(dst.fn, img))
    assert save_function(dst.fn) == save_function(src.fn)


def test_mid_negotiation_driver_features_survive(dst):
    """Regression: the driver wrote its features but has not set FEATURES_OK yet; the destination
    must hold them so that FEATURES_OK, written after the migration, sticks."""
    s = make_destination(TwoQueues(), name="mid")
    try:
        from virtio_lm.pci import PciDriverTransport
        from virtio_lm.virtqueue.driver import Allocator

        tr = PciDriverTransport(s.fn, s.mem.cpu, Allocator(0x1000, 0x10000))
        tr.reset()
        tr._add_status(1 | 2)
        for sel in (0, 1):
            tr._w("driver_feature_select", sel)
            tr._w("driver_feature", (ALL_FEATURES >> (32 * sel)) & 0xFFFF_FFFF)
        apply_function(dst.fn, validate_function(dst.fn, image_of(s.fn)))
        assert dst.fn.driver_features == ALL_FEATURES and dst.fn.negotiated == 0
        PciDriverTransport(dst.fn, dst.mem.cpu, Allocator(0x1000, 0x10000))._add_status(8)
        assert dst.fn.status & 8 and dst.fn.negotiated == ALL_FEATURES
    finally:
        s.close()


def test_unoffered_bits_before_features_ok_are_a_register_value(src, dst):
    """Before FEATURES_OK driver_feature holds whatever the driver wrote: accepted as is."""
    img = edit_function(image_of(src.fn), status=1 | 2, driver_features=ALL_FEATURES | bit(5))
    img = edit_queue(edit_queue(img, 0, enabled=0, last_avail_idx=0, used_idx=0), 1, enabled=0)
    apply_function(dst.fn, validate_function(dst.fn, img))
    assert dst.fn.driver_features == ALL_FEATURES | bit(5) and dst.fn.negotiated == 0


def test_flags_restore_broken_and_signalled(src, dst):
    img = edit_queue(image_of(src.fn), 0, flags=QUEUE_FLAG_BROKEN, signalled_used=0)
    apply_function(dst.fn, validate_function(dst.fn, img))
    assert dst.fn.queues[0].broken and dst.fn.queues[0].signalled_used is None
    img = edit_queue(image_of(src.fn), 0, flags=QUEUE_FLAG_SIGNALLED_VALID, signalled_used=7)
    apply_function(dst.fn, validate_function(dst.fn, img))
    assert not dst.fn.queues[0].broken and dst.fn.queues[0].signalled_used == 7


# ---------------------------------------------------------------- refused images (one each)
def test_wrong_device_id(src, dst):
    img = image_of(src.fn)
    img.device_id = 2
    refuse(dst, img, "device type 2")


def test_missing_function_record(src, dst):
    img = image_of(src.fn)
    img.records = [r for r in img.records if r.type != RecordType.FUNCTION]
    refuse(dst, img, "exactly one FUNCTION record expected, got 0")


def test_duplicate_function_record(src, dst):
    img = image_of(src.fn)
    img.records.append(img.of_type(RecordType.FUNCTION)[0])
    refuse(dst, img, "got 2")


def test_device_features_mismatch(src, dst):
    refuse(dst, edit_function(image_of(src.fn), device_features=ALL_FEATURES | bit(5)), "device_features")


def test_unoffered_negotiated_driver_features(src, dst):
    refuse(dst, edit_function(image_of(src.fn), driver_features=ALL_FEATURES | bit(5)), "never offered")


def test_features_ok_without_version_1(src, dst):
    refuse(dst, edit_function(image_of(src.fn), driver_features=ALL_FEATURES & ~bit(Feature.VERSION_1)),
           "VERSION_1")


def test_device_refuses_negotiated_features(src, dst, monkeypatch):
    monkeypatch.setattr(dst.fn.device, "validate_features", lambda f: "EVENT_IDX not allowed here")
    refuse(dst, image_of(src.fn), "EVENT_IDX not allowed here")


@pytest.mark.parametrize("status", [0x10, 0x20, 1 | 2 | 4, 1 | 8, 2, 4, 1 | 2 | 4 | 0x10])
def test_unreachable_status(src, dst, status):
    refuse(dst, edit_function(image_of(src.fn), status=status), "not a status the device can reach")


def test_queue_count_mismatch(src, dst):
    refuse(dst, edit_function(image_of(src.fn), num_queues=3), "num_queues")


def test_missing_queue_record(src, dst):
    img = image_of(src.fn)
    img.records = [r for r in img.records if not (r.type == RecordType.QUEUE and QueueRecord.decode(r.payload).index == 1)]
    refuse(dst, img, r"QUEUE records missing for \[1\]")


def test_duplicate_queue_record(src, dst):
    img = image_of(src.fn)
    img.records.append(img.of_type(RecordType.QUEUE)[0])
    refuse(dst, img, "duplicate QUEUE record")


def test_queue_record_for_nonexistent_queue(src, dst):
    img = image_of(src.fn)
    img.add(RecordType.QUEUE, dataclasses.replace(QueueRecord.decode(img.of_type(RecordType.QUEUE)[0].payload), index=2).encode())
    refuse(dst, img, "no such queue")


@pytest.mark.parametrize("size", [0, 3, 48, 100])
def test_queue_size_not_power_of_two(src, dst, size):
    refuse(dst, edit_queue(image_of(src.fn), 0, size=size), "not a power of two")


def test_queue_size_above_max(src, dst):
    refuse(dst, edit_queue(image_of(src.fn), 0, size=512), "not a power of two in 1..256")


@pytest.mark.parametrize("part,align", [("desc_addr", 16), ("avail_addr", 2), ("used_addr", USED_ALIGN)])
def test_enabled_queue_address_misaligned(src, dst, part, align):
    q = QueueRecord.decode(image_of(src.fn).of_type(RecordType.QUEUE)[0].payload)
    refuse(dst, edit_queue(image_of(src.fn), 0, **{part: getattr(q, part) + align // 2 or 1}), f"{part}.*not aligned")


@pytest.mark.parametrize("part", ["desc_addr", "avail_addr", "used_addr"])
def test_enabled_queue_address_outside_memory(src, dst, part):
    refuse(dst, edit_queue(image_of(src.fn), 0, **{part: dst.mem.size - 64}), f"{part}.*outside")


def test_enabled_queue_address_overflowing_u64(src, dst):
    refuse(dst, edit_queue(image_of(src.fn), 0, desc_addr=(1 << 64) - 16), "outside")


def test_queue_enabled_before_features_ok(src, dst):
    img = edit_function(image_of(src.fn), status=1 | 2, driver_features=0)
    refuse(dst, img, "enabled before FEATURES_OK")


def test_queue_enabled_not_0_or_1(src, dst):
    refuse(dst, edit_queue(image_of(src.fn), 0, enabled=2), "not 0 or 1")


def test_queue_unknown_flags(src, dst):
    refuse(dst, edit_queue(image_of(src.fn), 0, flags=4), "unknown bits")


@pytest.mark.parametrize("flags", [0, QUEUE_FLAG_BROKEN])
def test_signalled_used_without_its_valid_flag(src, dst, flags):
    """Issue 12 defect 3: a value the device would drop (and save back as 0) is refused,
    so that an accepted image saves back byte-identical."""
    refuse(dst, edit_queue(image_of(src.fn), 0, flags=flags, signalled_used=7), "signalled_used 7 without")


def test_held_chains_above_queue_size(src, dst):
    q = QueueRecord.decode(image_of(src.fn).of_type(RecordType.QUEUE)[0].payload)
    refuse(dst, edit_queue(image_of(src.fn), 0, last_avail_idx=(q.used_idx + 65) & 0xFFFF), "65 chains held")


def test_held_chains_on_a_disabled_queue(src, dst):
    refuse(dst, edit_queue(image_of(src.fn), 1, last_avail_idx=3, used_idx=1), "disabled queue holds 2")


def test_held_chains_wrap_around_u16(src, dst):
    """Not refused: indices are free-running u16, last_avail_idx may be numerically below used_idx."""
    img = edit_queue(image_of(src.fn), 0, last_avail_idx=2, used_idx=0xFFFF)
    snap = validate_function(dst.fn, img)
    assert snap.in_flight(0) == 3
