"""Virtio PCI register layout, capabilities and ids (wire/pci.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio_lm.errors import (
    EnumValueError,
    FieldValueError,
    RegisterAccessError,
    ReservedFieldError,
    ShortBufferError,
    TrailingDataError,
    TransportError,
)
from virtio_lm.wire import pci
from virtio_lm.wire.features import Feature
from virtio_lm.wire.pci import (
    COMMON_CFG,
    COMMON_CFG_BY_NAME,
    COMMON_CFG_V1_0,
    Access,
    CapType,
    VirtioPciCap,
    VirtioPciCap64,
    VirtioPciNotifyCap,
    lookup,
)

u8 = st.integers(0, 0xFF)
u32 = st.integers(0, 0xFFFF_FFFF)
cap_types = st.sampled_from([t for t in CapType if t is not CapType.VENDOR])
caps = st.builds(
    VirtioPciCap,
    cap_next=u8,
    cap_len=st.integers(16, 0xFF),
    cfg_type=cap_types,
    bar=st.integers(0, 5),
    id=u8,
    offset=u32,
    length=u32,
)
caps64 = st.builds(
    VirtioPciCap64,
    cap_next=u8,
    cap_len=st.integers(24, 0xFF),
    cfg_type=cap_types,
    bar=st.integers(0, 5),
    id=u8,
    offset=u32,
    length=u32,
    offset_hi=u32,
    length_hi=u32,
)
notify_caps = st.builds(
    VirtioPciNotifyCap,
    cap_next=u8,
    cap_len=st.integers(20, 0xFF),
    bar=st.integers(0, 5),
    id=u8,
    offset=u32,
    length=u32,
    notify_off_multiplier=st.sampled_from([0] + [1 << k for k in range(1, 31)]),
)

# The register map of virtio 1.2, 4.1.4.3, written out independently of pci.py.
SPEC_MAP = [
    ("device_feature_select", 0x00, 4, "rw"),
    ("device_feature", 0x04, 4, "ro"),
    ("driver_feature_select", 0x08, 4, "rw"),
    ("driver_feature", 0x0C, 4, "rw"),
    ("config_msix_vector", 0x10, 2, "rw"),
    ("num_queues", 0x12, 2, "ro"),
    ("device_status", 0x14, 1, "rw"),
    ("config_generation", 0x15, 1, "ro"),
    ("queue_select", 0x16, 2, "rw"),
    ("queue_size", 0x18, 2, "rw"),
    ("queue_msix_vector", 0x1A, 2, "rw"),
    ("queue_enable", 0x1C, 2, "rw"),
    ("queue_notify_off", 0x1E, 2, "ro"),
    ("queue_desc", 0x20, 8, "rw"),
    ("queue_driver", 0x28, 8, "rw"),
    ("queue_device", 0x30, 8, "rw"),
    ("queue_notif_config_data", 0x38, 2, "ro"),
    ("queue_reset", 0x3A, 2, "rw"),
    ("admin_queue_index", 0x3C, 2, "ro"),
    ("admin_queue_num", 0x3E, 2, "ro"),
]


# ------------------------------------------------------------------ ids and constants
def test_ids() -> None:
    assert pci.VIRTIO_PCI_VENDOR_ID == 0x1AF4
    assert pci.modern_device_id(1) == 0x1041 and pci.modern_device_id(2) == 0x1042
    assert pci.device_type_of(0x1042) == 2
    assert pci.VIRTIO_MSI_NO_VECTOR == 0xFFFF
    assert int(pci.IsrBits.QUEUE) == 1 and int(pci.IsrBits.CONFIG) == 2


@pytest.mark.parametrize("bad", [0, -1, 64])
def test_modern_device_id_refuses_bad_type(bad: int) -> None:
    with pytest.raises(FieldValueError) as ei:
        pci.modern_device_id(bad)
    assert ei.value.field == "device_type"


@pytest.mark.parametrize("bad", [0x1000, 0x1040, 0x1080])
def test_device_type_of_refuses_non_modern_id(bad: int) -> None:
    with pytest.raises(FieldValueError):
        pci.device_type_of(bad)


def test_cap_type_values() -> None:
    assert {t.name: int(t) for t in CapType} == {
        "COMMON": 1, "NOTIFY": 2, "ISR": 3, "DEVICE": 4, "PCI": 5, "SHARED_MEMORY": 8, "VENDOR": 9,
    }  # fmt: skip


# ------------------------------------------------------------------ common cfg table
def test_common_cfg_table_matches_spec() -> None:
    assert [(f.name, f.offset, f.width, f.access.value) for f in COMMON_CFG] == SPEC_MAP


def test_common_cfg_table_is_contiguous() -> None:
    pos = 0
    for f in COMMON_CFG:
        assert f.offset == pos, f.name
        assert f.offset % min(f.width, 4) == 0, f.name  # naturally aligned (64-bit: to 4)
        pos += f.width
    assert pos == pci.COMMON_CFG_SIZE == 0x40
    assert pci.COMMON_CFG_V1_0_SIZE == 0x38


def test_common_cfg_versions_and_features() -> None:
    later = {f.name: (f.since, f.feature) for f in COMMON_CFG if f.since != "1.0"}
    assert later == {
        "queue_notif_config_data": ("1.2", Feature.NOTIF_CONFIG_DATA),
        "queue_reset": ("1.2", Feature.RING_RESET),
        "admin_queue_index": ("1.3", Feature.ADMIN_VQ),
        "admin_queue_num": ("1.3", Feature.ADMIN_VQ),
    }
    assert all(f.since == "1.0" and f.feature is None for f in COMMON_CFG_V1_0)
    per_queue = {f.name for f in COMMON_CFG if f.per_queue}
    assert per_queue == {n for n, *_ in SPEC_MAP if n.startswith("queue_") and n != "queue_select"}


@pytest.mark.parametrize("name,offset,width,access", [m for m in SPEC_MAP if m[2] != 8])
def test_lookup_every_narrow_register(name: str, offset: int, width: int, access: str) -> None:
    acc = lookup(offset, width)
    assert acc.field.name == name and acc.width == width and acc.shift == 0
    assert acc.field.access is Access(access)
    assert acc.mask == (1 << (8 * width)) - 1


@pytest.mark.parametrize("name", ["queue_desc", "queue_driver", "queue_device"])
def test_lookup_64bit_halves(name: str) -> None:
    base = COMMON_CFG_BY_NAME[name].offset
    lo, hi = lookup(base, 4), lookup(base + 4, 4)
    assert lo.field.name == hi.field.name == name
    assert (lo.shift, hi.shift) == (0, 32)
    assert lo.mask == hi.mask == 0xFFFF_FFFF


def test_every_legal_access_is_found_and_only_those() -> None:
    """Exhaustive over offsets 0..0x47 and widths 1/2/4/8: exactly the spec's accesses work."""
    legal = set()
    for name, off, width, _ in SPEC_MAP:
        if width == 8:
            legal |= {(off, 4, name), (off + 4, 4, name)}
        else:
            legal.add((off, width, name))
    found = set()
    for offset in range(0x48):
        for width in (1, 2, 4, 8):
            try:
                acc = lookup(offset, width)
            except RegisterAccessError:
                continue
            found.add((offset, width, acc.field.name))
    assert found == legal


def test_lookup_v1_0_table_has_no_1_2_registers() -> None:
    with pytest.raises(RegisterAccessError) as ei:
        lookup(0x3A, 2, COMMON_CFG_V1_0)
    assert ei.value.reason == "unknown"
    assert lookup(0x3A, 2).field.name == "queue_reset"


def test_register_access_error_is_a_transport_error() -> None:
    assert issubclass(RegisterAccessError, TransportError)


def test_lookup_misaligned() -> None:
    with pytest.raises(RegisterAccessError) as ei:
        lookup(0x13, 2)  # odd offset for a 16-bit access
    assert ei.value.reason == "misaligned" and ei.value.offset == 0x13 and ei.value.width == 2


def test_lookup_inside_register() -> None:
    with pytest.raises(RegisterAccessError) as ei:
        lookup(0x05, 1)  # second byte of device_feature
    assert ei.value.reason == "misaligned" and ei.value.field == "device_feature"


def test_lookup_unknown_offset() -> None:
    with pytest.raises(RegisterAccessError) as ei:
        lookup(0x40, 4)
    assert ei.value.reason == "unknown" and ei.value.field is None


def test_lookup_negative_offset() -> None:
    with pytest.raises(RegisterAccessError) as ei:
        lookup(-4, 4)
    assert ei.value.reason == "misaligned"


def test_lookup_width_mismatch() -> None:
    with pytest.raises(RegisterAccessError) as ei:
        lookup(0x14, 2)  # device_status is 8-bit; 0x14 is 2-aligned
    assert ei.value.reason == "width" and ei.value.field == "device_status"


def test_lookup_wide_access_to_narrow_register() -> None:
    with pytest.raises(RegisterAccessError) as ei:
        lookup(0x10, 4)  # config_msix_vector + num_queues in one access
    assert ei.value.reason == "width" and ei.value.field == "config_msix_vector"


def test_lookup_64bit_register_refuses_8_byte_access() -> None:
    with pytest.raises(RegisterAccessError) as ei:
        lookup(0x20, 8)
    assert ei.value.reason == "width"


def test_lookup_64bit_register_refuses_16_bit_access() -> None:
    with pytest.raises(RegisterAccessError) as ei:
        lookup(0x22, 2)
    assert ei.value.reason == "width" and ei.value.field == "queue_desc"


@pytest.mark.parametrize("width", [0, 3, 16])
def test_lookup_bad_width(width: int) -> None:
    with pytest.raises(RegisterAccessError) as ei:
        lookup(0, width)
    assert ei.value.reason == "width"


# ------------------------------------------------------------------ capabilities
@settings(max_examples=150, deadline=None)
@given(caps)
def test_cap_round_trip(c: VirtioPciCap) -> None:
    raw = c.encode()
    assert len(raw) == 16 and raw[0] == 0x09
    assert VirtioPciCap.decode(raw) == c


@settings(max_examples=100, deadline=None)
@given(caps64)
def test_cap64_round_trip(c: VirtioPciCap64) -> None:
    raw = c.encode()
    assert len(raw) == 24
    assert VirtioPciCap64.decode(raw) == c
    assert c.offset64 == c.offset | c.offset_hi << 32 and c.length64 == c.length | c.length_hi << 32


@settings(max_examples=150, deadline=None)
@given(notify_caps)
def test_notify_cap_round_trip(c: VirtioPciNotifyCap) -> None:
    raw = c.encode()
    assert len(raw) == 20 and raw[3] == CapType.NOTIFY
    assert VirtioPciNotifyCap.decode(raw) == c
    assert VirtioPciNotifyCap.decode(raw).encode() == raw


def test_notify_address() -> None:
    c = VirtioPciNotifyCap(offset=0x3000, length=0x1000, notify_off_multiplier=4)
    assert pci.notify_address_offset(c, 5) == 0x3014
    assert pci.notify_address_offset(VirtioPciNotifyCap(offset=0x3000), 5) == 0x3000


def test_cap_short_buffer() -> None:
    with pytest.raises(ShortBufferError) as ei:
        VirtioPciCap.decode(bytes(15))
    assert ei.value.layout == "VirtioPciCap"


def test_cap_trailing_bytes() -> None:
    with pytest.raises(TrailingDataError):
        VirtioPciCap.decode(VirtioPciCap().encode() + b"\0")


def test_cap_reserved_padding() -> None:
    raw = bytearray(VirtioPciCap().encode())
    raw[7] = 1
    with pytest.raises(ReservedFieldError) as ei:
        VirtioPciCap.decode(bytes(raw))
    assert ei.value.field == "padding"


@pytest.mark.parametrize("bad", [0, 6, 7, 10, 0xFF])
def test_cap_unknown_cfg_type(bad: int) -> None:
    raw = bytearray(VirtioPciCap().encode())
    raw[3] = bad
    with pytest.raises(EnumValueError) as ei:
        VirtioPciCap.decode(bytes(raw))
    assert ei.value.field == "cfg_type"


def test_cap_vendor_type_has_its_own_layout() -> None:
    raw = bytearray(VirtioPciCap().encode())
    raw[3] = CapType.VENDOR
    with pytest.raises(FieldValueError) as ei:
        VirtioPciCap.decode(bytes(raw))
    assert ei.value.field == "cfg_type"


def test_cap_wrong_vendor_id() -> None:
    raw = bytearray(VirtioPciCap().encode())
    raw[0] = 0x10  # PCI Express capability, not vendor-specific
    with pytest.raises(FieldValueError) as ei:
        VirtioPciCap.decode(bytes(raw))
    assert ei.value.field == "cap_vndr"


def test_cap_bad_bar() -> None:
    raw = bytearray(VirtioPciCap().encode())
    raw[4] = 6
    with pytest.raises(FieldValueError) as ei:
        VirtioPciCap.decode(bytes(raw))
    assert ei.value.field == "bar"


def test_cap_len_too_small() -> None:
    raw = bytearray(VirtioPciCap().encode())
    raw[2] = 15
    with pytest.raises(FieldValueError) as ei:
        VirtioPciCap.decode(bytes(raw))
    assert ei.value.field == "cap_len"


def test_notify_cap_len_too_small() -> None:
    raw = bytearray(VirtioPciNotifyCap().encode())
    raw[2] = 16
    with pytest.raises(FieldValueError) as ei:
        VirtioPciNotifyCap.decode(bytes(raw))
    assert ei.value.field == "cap_len"


def test_notify_cap_wrong_cfg_type() -> None:
    raw = bytearray(VirtioPciNotifyCap().encode())
    raw[3] = CapType.COMMON
    with pytest.raises(FieldValueError) as ei:
        VirtioPciNotifyCap.decode(bytes(raw))
    assert ei.value.field == "cfg_type"


@pytest.mark.parametrize("mult", [1, 3, 6, 12, 0x8000_0001])
def test_notify_cap_bad_multiplier(mult: int) -> None:
    raw = bytearray(VirtioPciNotifyCap().encode())
    raw[16:20] = mult.to_bytes(4, "little")
    with pytest.raises(FieldValueError) as ei:
        VirtioPciNotifyCap.decode(bytes(raw))
    assert ei.value.field == "notify_off_multiplier"


def test_notify_cap_short_buffer() -> None:
    with pytest.raises(ShortBufferError):
        VirtioPciNotifyCap.decode(VirtioPciNotifyCap().encode()[:19])
