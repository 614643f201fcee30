"""Feature bits, status bits, device ids and mask helpers (wire/features.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio_lm.errors import FieldValueError
from virtio_lm.wire import features as F
from virtio_lm.wire.blk import BlkFeature
from virtio_lm.wire.features import DeviceId, DeviceStatus, Feature, ProposalFeature
from virtio_lm.wire.net import NetFeature


def test_standard_bit_numbers() -> None:
    assert {f.name: int(f) for f in Feature} == {
        "INDIRECT_DESC": 28, "EVENT_IDX": 29, "VERSION_1": 32, "ACCESS_PLATFORM": 33,
        "RING_PACKED": 34, "IN_ORDER": 35, "ORDER_PLATFORM": 36, "SR_IOV": 37,
        "NOTIFICATION_DATA": 38, "NOTIF_CONFIG_DATA": 39, "RING_RESET": 40, "ADMIN_VQ": 41,
    }  # fmt: skip


def test_proposal_bits_collide_with_standard_ones() -> None:
    assert ProposalFeature.GENERIC_CTRL_VQ_VER_1 == Feature.NOTIF_CONFIG_DATA == 39
    assert ProposalFeature.VF_MIGRATION == Feature.RING_RESET == 40
    assert F.COLLIDING_STANDARD == {Feature.NOTIF_CONFIG_DATA, Feature.RING_RESET}
    assert F.standard_collisions(F.mask(39, 32)) == ["NOTIF_CONFIG_DATA"]
    assert F.standard_collisions(F.mask(32, 37)) == []


def test_status_and_ids() -> None:
    assert [int(s) for s in DeviceStatus] == [1, 2, 4, 8, 0x40, 0x80]
    assert (int(DeviceId.NET), int(DeviceId.BLOCK)) == (1, 2)


def test_bit_and_mask() -> None:
    assert F.bit(0) == 1 and F.bit(32) == 1 << 32 and F.bit(127) == 1 << 127
    assert F.mask(Feature.VERSION_1, Feature.SR_IOV) == (1 << 32) | (1 << 37)
    assert F.mask() == 0
    assert F.has(F.mask(40), ProposalFeature.VF_MIGRATION)
    assert not F.has(F.mask(39), 40)


@pytest.mark.parametrize("n", [-1, 128, 1000])
def test_bit_out_of_range(n: int) -> None:
    with pytest.raises(FieldValueError) as ei:
        F.bit(n)
    assert ei.value.field == "bit"


@settings(max_examples=200, deadline=None)
@given(st.integers(0, (1 << 128) - 1))
def test_bits_of_round_trip(m: int) -> None:
    assert F.mask(*F.bits_of(m)) == m


@settings(max_examples=200, deadline=None)
@given(st.integers(0, (1 << 64) - 1), st.integers(0, 3), st.integers(0, 0xFFFF_FFFF))
def test_feature_words(m: int, select: int, word: int) -> None:
    assert F.feature_word(m, 0) | F.feature_word(m, 1) << 32 == m
    assert F.feature_word(m, 2) == 0
    m2 = F.with_feature_word(m, select, word)
    assert F.feature_word(m2, select) == word
    for other in range(4):
        if other != select:
            assert F.feature_word(m2, other) == F.feature_word(m, other)


def test_feature_word_errors() -> None:
    with pytest.raises(FieldValueError):
        F.feature_word(1, -1)
    with pytest.raises(FieldValueError) as ei:
        F.with_feature_word(0, 0, 1 << 32)
    assert ei.value.field == "word"
    with pytest.raises(FieldValueError):
        F.bits_of(-1)


def test_names_device_specific_and_transport() -> None:
    m = F.mask(NetFeature.MAC, NetFeature.CTRL_VQ, NetFeature.SPEED_DUPLEX, 32, 37, 39, 40, 45)
    assert F.feature_names(m, NetFeature) == [
        "MAC", "CTRL_VQ", "VERSION_1", "SR_IOV", "GENERIC_CTRL_VQ_VER_1", "VF_MIGRATION", "bit45",
        "SPEED_DUPLEX",
    ]  # fmt: skip
    assert F.feature_names(F.mask(39, 40), proposal=False) == ["NOTIF_CONFIG_DATA", "RING_RESET"]
    # without a device table, device bits are numbered, not misnamed
    assert F.feature_names(F.mask(5, 28)) == ["bit5", "INDIRECT_DESC"]
    assert F.feature_names(F.mask(15), BlkFeature) == ["CTRL_VQ"]
    assert F.render_features(F.mask(32, 1), BlkFeature) == "0x100000002 <SIZE_MAX|VERSION_1>"


def test_names_to_mask_round_trip() -> None:
    m = F.mask(BlkFeature.MQ, BlkFeature.CTRL_VQ, 32, 37, 39, 40)
    assert F.names_to_mask(F.feature_names(m, BlkFeature), BlkFeature) == m
    with pytest.raises(FieldValueError) as ei:
        F.names_to_mask(["NOPE"])
    assert ei.value.field == "name"


def test_vf_migration_requirements() -> None:
    vf = F.mask(ProposalFeature.VF_MIGRATION)
    assert F.unmet_requirements(vf, F.REQUIREMENTS) == [
        "VF_MIGRATION requires SR_IOV",
        "VF_MIGRATION requires GENERIC_CTRL_VQ_VER_1",
    ]
    full = vf | F.mask(Feature.SR_IOV, ProposalFeature.GENERIC_CTRL_VQ_VER_1)
    assert F.unmet_requirements(full, F.REQUIREMENTS) == []
    assert F.unmet_requirements(F.mask(Feature.SR_IOV), F.REQUIREMENTS) == []
