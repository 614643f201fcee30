"""Device-independent feature bits, device status bits and device ids.

Feature bits are numbered 0..127; a feature *mask* is an int with bit ``n``
set when feature ``n`` is offered / negotiated.  Bits 0..23 and 50..127 are
device-type specific (see :mod:`.blk`, :mod:`.net`); 24..49 are reserved for
the queue and transport mechanisms (:class:`Feature`).

Collisions with today's virtio spec
-----------------------------------
The 2021 VF migration proposal picked bits that were free in its author's tree
but that the virtio spec has since given to other features:

=============================  ======  ==========================================
proposal                       bit     the virtio spec today
=============================  ======  ==========================================
VIRTIO_F_GENERIC_CTRL_VQ_VER_1  39     VIRTIO_F_NOTIF_CONFIG_DATA (virtio 1.2)
VIRTIO_F_VF_MIGRATION           40     VIRTIO_F_RING_RESET (virtio 1.2)
VIRTIO_BLK_F_CTRL_VQ            blk 15  VIRTIO_BLK_F_LIFETIME (virtio 1.2)
=============================  ======  ==========================================

virtio-lm implements the proposal's numbers (:class:`ProposalFeature`) and
never offers the colliding standard feature on the same device: on a
virtio-lm device bit 39 *means* GENERIC_CTRL_VQ_VER_1 and bit 40 *means*
VF_MIGRATION.  :class:`Feature` still lists the standard meanings so that the
numbers can be checked against the Linux headers; :func:`feature_names`
renders bits 39/40 with the proposal's names unless asked otherwise.

Device status (``device_status``) bits and the virtio device ids live here too,
since they are the same for every transport.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping

from virtio_lm.errors import FieldValueError

# Feature-bit ranges (virtio 1.3, 6 "Reserved Feature Bits").
DEVICE_SPECIFIC_RANGES = ((0, 23), (50, 127))
TRANSPORT_RANGE = (24, 49)
MAX_FEATURE_BIT = 127


class Feature(enum.IntEnum):
    """Device-independent feature bits as the virtio spec numbers them."""

    INDIRECT_DESC = 28
    EVENT_IDX = 29
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34
    IN_ORDER = 35
    ORDER_PLATFORM = 36
    SR_IOV = 37
    NOTIFICATION_DATA = 38
    NOTIF_CONFIG_DATA = 39  # collides with ProposalFeature.GENERIC_CTRL_VQ_VER_1
    RING_RESET = 40  # collides with ProposalFeature.VF_MIGRATION
    ADMIN_VQ = 41


class ProposalFeature(enum.IntEnum):
    """The 2021 VF migration proposal's device-independent bits (what virtio-lm uses)."""

    GENERIC_CTRL_VQ_VER_1 = 39
    VF_MIGRATION = 40


#: Standard features a virtio-lm device never offers, because their bit means
#: a proposal feature on our devices.
COLLIDING_STANDARD = frozenset({Feature.NOTIF_CONFIG_DATA, Feature.RING_RESET})


class DeviceStatus(enum.IntFlag):
    """``device_status`` bits (virtio 1.x, 2.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 0x40
    FAILED = 0x80


class DeviceId(enum.IntEnum):
    """Virtio device type ids (virtio 1.x, 5 "Device Types"); the two virtio-lm models."""

    NET = 1
    BLOCK = 2


# ------------------------------------------------------------------ mask helpers
def bit(n: int) -> int:
    """The mask of feature bit ``n`` (0..127)."""
    if not 0 <= int(n) <= MAX_FEATURE_BIT:
        raise FieldValueError("features", "bit", n, f"a feature bit in 0..{MAX_FEATURE_BIT}")
    return 1 << int(n)


def mask(*bits: int) -> int:
    """The mask with every bit in ``bits`` set."""
    out = 0
    for n in bits:
        out |= bit(n)
    return out


def has(features: int, n: int) -> bool:
    """Whether feature bit ``n`` is set in ``features``."""
    return bool(features & bit(n))


def bits_of(features: int) -> list[int]:
    """The set bit numbers of ``features``, ascending."""
    if features < 0:
        raise FieldValueError("features", "mask", features, "not negative")
    return [n for n in range(features.bit_length()) if features >> n & 1]


def feature_word(features: int, select: int) -> int:
    """The 32-bit word ``select`` of ``features`` (what ``device_feature`` shows)."""
    if select < 0:
        raise FieldValueError("features", "select", select, "not negative")
    return (features >> (32 * select)) & 0xFFFF_FFFF


def with_feature_word(features: int, select: int, word: int) -> int:
    """``features`` with its 32-bit word ``select`` replaced by ``word``."""
    if select < 0:
        raise FieldValueError("features", "select", select, "not negative")
    if not 0 <= word <= 0xFFFF_FFFF:
        raise FieldValueError("features", "word", word, "fits in u32")
    shift = 32 * select
    return (features & ~(0xFFFF_FFFF << shift)) | (word << shift)


def is_device_specific(n: int) -> bool:
    return any(lo <= n <= hi for lo, hi in DEVICE_SPECIFIC_RANGES)


def feature_name(n: int, device_bits: type[enum.IntEnum] | None = None, *, proposal: bool = True) -> str:
    """The name of bit ``n``: a device-specific name from ``device_bits`` in the
    device-specific ranges, else the device-independent name (the proposal's
    name for bits 39/40 unless ``proposal=False``), else ``"bit<n>"``."""
    if is_device_specific(n):
        if device_bits is not None:
            try:
                return device_bits(n).name
            except ValueError:
                pass
        return f"bit{n}"
    if proposal:
        try:
            return ProposalFeature(n).name
        except ValueError:
            pass
    try:
        return Feature(n).name
    except ValueError:
        return f"bit{n}"


def feature_names(
    features: int, device_bits: type[enum.IntEnum] | None = None, *, proposal: bool = True
) -> list[str]:
    """Names of every bit set in ``features``, ascending by bit number."""
    return [feature_name(n, device_bits, proposal=proposal) for n in bits_of(features)]


def render_features(
    features: int, device_bits: type[enum.IntEnum] | None = None, *, proposal: bool = True
) -> str:
    """``"0x... <NAME|NAME|...>"`` for logs and the monitor."""
    names = feature_names(features, device_bits, proposal=proposal)
    return f"{features:#x} <{'|'.join(names)}>"


# ------------------------------------------------------------------ dependency rules
#: ``{feature: (group, group, ...)}``: every group must be satisfied, a group
#: by any one of its bits ("requires A, and B or C" is ``((A,), (B, C))``).
Requirements = Mapping[int, tuple[tuple[int, ...], ...]]

#: The proposal's rule for VF_MIGRATION: only with SR_IOV and
#: GENERIC_CTRL_VQ_VER_1 (the device's own control-queue bit is device
#: specific; the device adds it to its own table).
REQUIREMENTS: dict[int, tuple[tuple[int, ...], ...]] = {
    ProposalFeature.VF_MIGRATION: ((Feature.SR_IOV,), (ProposalFeature.GENERIC_CTRL_VQ_VER_1,)),
}


def unmet_requirements(
    features: int, *tables: Requirements, device_bits: type[enum.IntEnum] | None = None
) -> list[str]:
    """One message per feature in ``features`` whose requirement group is not met."""
    problems: list[str] = []
    for table in tables:
        for feat, groups in table.items():
            if not has(features, feat):
                continue
            for group in groups:
                if not any(has(features, g) for g in group):
                    want = " or ".join(feature_name(g, device_bits) for g in group)
                    problems.append(f"{feature_name(feat, device_bits)} requires {want}")
    return problems


def standard_collisions(features: int) -> list[str]:
    """Names of standard features in ``features`` that virtio-lm reads as proposal bits.

    Useful for documentation and logs: it is the list of meanings a spec-only
    driver might wrongly assume for bits a virtio-lm device sets.
    """
    return [Feature(n).name for n in sorted(COLLIDING_STANDARD) if has(features, n)]


def names_to_mask(names: Iterable[str], device_bits: type[enum.IntEnum] | None = None) -> int:
    """The mask for feature names (device-specific names first, then proposal, then standard)."""
    out = 0
    for name in names:
        for table in (device_bits, ProposalFeature, Feature):
            if table is not None and name in table.__members__:
                out |= bit(table.__members__[name])
                break
        else:
            raise FieldValueError("features", "name", name, "a known feature name")
    return out
