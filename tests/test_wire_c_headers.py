"""Cross-check of virtio_lm.wire against the Linux uapi headers, compiled with gcc.

tests/c/layout.c prints sizeof/offsetof/vring_size/vring_need_event and the
numeric constants of linux/virtio_*.h as ``key=value`` lines; every key below
is compared with the value virtio_lm.wire computes, one test per key, so a
wrong Python offset or constant fails under its own name.  Skipped only when
gcc or the headers are missing.  Keys in OPTIONAL are macros that only newer
headers define; they are skipped (with the reason) when the installed headers
lack them, and compared when present.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from virtio_lm.wire import blk, net, pci, pcicfg, ring, vfio_user
from virtio_lm.wire.blk import BlkConfig, BlkFeature, BlkOutHdr, BlkReqType, BlkStatus, DiscardSegment
from virtio_lm.wire.features import DeviceId, DeviceStatus, Feature
from virtio_lm.wire.net import (
    AnnounceCmd,
    CtrlClass,
    GsoType,
    MacCmd,
    MqCmd,
    NetAck,
    NetConfig,
    NetFeature,
    NetHdrFlags,
    NetHdrV1,
    NetStatus,
    RxCmd,
    VlanCmd,
)
from virtio_lm.wire.pci import (
    COMMON_CFG_BY_NAME,
    COMMON_CFG_V1_0_SIZE,
    CapType,
    IsrBits,
    VirtioPciCap,
    VirtioPciCap64,
    VirtioPciNotifyCap,
)
from virtio_lm.wire.ring import AvailFlags, DescFlags, UsedFlags, VirtqDesc, VirtqUsedElem

HERE = Path(__file__).parent
SOURCE = HERE / "c" / "layout.c"
HEADERS = (
    "linux/virtio_config.h",
    "linux/virtio_ids.h",
    "linux/virtio_ring.h",
    "linux/virtio_pci.h",
    "linux/virtio_blk.h",
    "linux/virtio_net.h",
    "linux/if_ether.h",
    "linux/pci_regs.h",
    "linux/vfio.h",
)


def _offsets(prefix: str, cls: type, rename: dict[str, str] | None = None) -> dict[str, int]:
    rename = rename or {}
    return {f"{prefix}.{rename.get(name, name)}": off for name, off in cls.OFFSETS.items()}


#: pci_regs.h macros with the same name in virtio_lm.wire.pcicfg
PCI_REGS_NAMES = sorted(
    n for n in dir(pcicfg)
    if n.startswith(("PCI_", "PCI_EXT_")) and isinstance(getattr(pcicfg, n), int)
    and n not in {"PCI_FIND_CAP_TTL", "PCI_STATUS_W1C", "PCI_EXP_DEVSTA_W1C", "PCI_BASE_ADDRESS_MEM_MASK",
                  "PCI_CLASS_STORAGE_SCSI", "PCI_CLASS_NETWORK_ETHERNET", "PCI_CLASS_OTHERS"}
)


def _expected() -> dict[str, int]:
    e: dict[str, int] = {}
    # ------------------------------------------------------------ ring
    e["sizeof.vring_desc"] = VirtqDesc.SIZE
    e.update(_offsets("vring_desc", VirtqDesc))
    e["sizeof.vring_used_elem"] = VirtqUsedElem.SIZE
    e.update(_offsets("vring_used_elem", VirtqUsedElem))
    for part in ("vring_avail", "vring_used"):
        e[f"sizeof.{part}"] = ring.RingHeader.SIZE
        e[f"{part}.flags"] = ring.RingHeader.OFFSETS["flags"]
        e[f"{part}.idx"] = ring.RingHeader.OFFSETS["idx"]
    e["vring_avail.ring"] = ring.avail_entry_offset(0)
    e["vring_used.ring"] = ring.used_elem_offset(0)
    e["VRING_DESC_F_NEXT"] = DescFlags.NEXT
    e["VRING_DESC_F_WRITE"] = DescFlags.WRITE
    e["VRING_DESC_F_INDIRECT"] = DescFlags.INDIRECT
    e["VRING_USED_F_NO_NOTIFY"] = UsedFlags.NO_NOTIFY
    e["VRING_AVAIL_F_NO_INTERRUPT"] = AvailFlags.NO_INTERRUPT
    e["VRING_DESC_ALIGN_SIZE"] = ring.DESC_ALIGN
    e["VRING_AVAIL_ALIGN_SIZE"] = ring.AVAIL_ALIGN
    e["VRING_USED_ALIGN_SIZE"] = ring.USED_ALIGN
    e["VIRTIO_RING_F_INDIRECT_DESC"] = Feature.INDIRECT_DESC
    e["VIRTIO_RING_F_EVENT_IDX"] = Feature.EVENT_IDX
    for shift in range(16):
        num = 1 << shift
        for align in (2, 4, 16, 64, 4096):
            e[f"vring_size.{num}.{align}"] = ring.legacy_vring_size(num, align)
    # ------------------------------------------------------------ config, ids
    for c_name, py in (
        ("ACKNOWLEDGE", DeviceStatus.ACKNOWLEDGE),
        ("DRIVER", DeviceStatus.DRIVER),
        ("DRIVER_OK", DeviceStatus.DRIVER_OK),
        ("FEATURES_OK", DeviceStatus.FEATURES_OK),
        ("NEEDS_RESET", DeviceStatus.DEVICE_NEEDS_RESET),
        ("FAILED", DeviceStatus.FAILED),
    ):
        e[f"VIRTIO_CONFIG_S_{c_name}"] = py
    for f in Feature:
        if f not in (Feature.INDIRECT_DESC, Feature.EVENT_IDX):  # VIRTIO_RING_F_* above
            e[f"VIRTIO_F_{f.name}"] = f
    e["VIRTIO_ID_NET"] = DeviceId.NET
    e["VIRTIO_ID_BLOCK"] = DeviceId.BLOCK
    # ------------------------------------------------------------ pci
    e["sizeof.virtio_pci_cap"] = VirtioPciCap.SIZE
    e.update(_offsets("virtio_pci_cap", VirtioPciCap))
    e["sizeof.virtio_pci_cap64"] = VirtioPciCap64.SIZE
    e["virtio_pci_cap64.offset_hi"] = VirtioPciCap64.OFFSETS["offset_hi"]
    e["virtio_pci_cap64.length_hi"] = VirtioPciCap64.OFFSETS["length_hi"]
    e["sizeof.virtio_pci_notify_cap"] = VirtioPciNotifyCap.SIZE
    e["virtio_pci_notify_cap.notify_off_multiplier"] = VirtioPciNotifyCap.OFFSETS["notify_off_multiplier"]
    for c_name, field in (
        ("VNDR", "cap_vndr"),
        ("NEXT", "cap_next"),
        ("LEN", "cap_len"),
        ("CFG_TYPE", "cfg_type"),
        ("BAR", "bar"),
        ("OFFSET", "offset"),
        ("LENGTH", "length"),
    ):
        e[f"VIRTIO_PCI_CAP_{c_name}"] = VirtioPciCap.OFFSETS[field]
    e["VIRTIO_PCI_NOTIFY_CAP_MULT"] = VirtioPciNotifyCap.OFFSETS["notify_off_multiplier"]
    for t in CapType:
        e[f"VIRTIO_PCI_CAP_{t.name}_CFG"] = t
    e["VIRTIO_PCI_ISR_CONFIG"] = IsrBits.CONFIG
    e["VIRTIO_MSI_NO_VECTOR"] = pci.VIRTIO_MSI_NO_VECTOR
    # Linux's struct stops at the 1.0 registers and names halves *_lo/_hi
    e["sizeof.virtio_pci_common_cfg"] = COMMON_CFG_V1_0_SIZE
    reg = {n: f.offset for n, f in COMMON_CFG_BY_NAME.items()}
    linux_struct = {
        "device_feature_select": reg["device_feature_select"],
        "device_feature": reg["device_feature"],
        "guest_feature_select": reg["driver_feature_select"],
        "guest_feature": reg["driver_feature"],
        "msix_config": reg["config_msix_vector"],
        "num_queues": reg["num_queues"],
        "device_status": reg["device_status"],
        "config_generation": reg["config_generation"],
        "queue_select": reg["queue_select"],
        "queue_size": reg["queue_size"],
        "queue_msix_vector": reg["queue_msix_vector"],
        "queue_enable": reg["queue_enable"],
        "queue_notify_off": reg["queue_notify_off"],
        "queue_desc_lo": reg["queue_desc"],
        "queue_desc_hi": reg["queue_desc"] + 4,
        "queue_avail_lo": reg["queue_driver"],
        "queue_avail_hi": reg["queue_driver"] + 4,
        "queue_used_lo": reg["queue_device"],
        "queue_used_hi": reg["queue_device"] + 4,
    }
    for name, off in linux_struct.items():
        e[f"virtio_pci_common_cfg.{name}"] = off
    for macro, name in (
        ("DFSELECT", "device_feature_select"),
        ("DF", "device_feature"),
        ("GFSELECT", "guest_feature_select"),
        ("GF", "guest_feature"),
        ("MSIX", "msix_config"),
        ("NUMQ", "num_queues"),
        ("STATUS", "device_status"),
        ("CFGGENERATION", "config_generation"),
        ("Q_SELECT", "queue_select"),
        ("Q_SIZE", "queue_size"),
        ("Q_MSIX", "queue_msix_vector"),
        ("Q_ENABLE", "queue_enable"),
        ("Q_NOFF", "queue_notify_off"),
        ("Q_DESCLO", "queue_desc_lo"),
        ("Q_DESCHI", "queue_desc_hi"),
        ("Q_AVAILLO", "queue_avail_lo"),
        ("Q_AVAILHI", "queue_avail_hi"),
        ("Q_USEDLO", "queue_used_lo"),
        ("Q_USEDHI", "queue_used_hi"),
    ):
        e[f"VIRTIO_PCI_COMMON_{macro}"] = linux_struct[name]
    e["VIRTIO_PCI_COMMON_Q_NDATA"] = reg["queue_notif_config_data"]
    e["VIRTIO_PCI_COMMON_Q_RESET"] = reg["queue_reset"]
    # ------------------------------------------------------------ blk
    for f in BlkFeature:  # iterating skips the LIFETIME alias: add it by hand
        if f is not BlkFeature.CTRL_VQ:
            e[f"VIRTIO_BLK_F_{f.name}"] = f
    e["VIRTIO_BLK_F_LIFETIME"] = BlkFeature.LIFETIME
    for t in BlkReqType:
        e[f"VIRTIO_BLK_T_{t.name}"] = t
    for s in BlkStatus:
        e[f"VIRTIO_BLK_S_{s.name}"] = s
    e["VIRTIO_BLK_ID_BYTES"] = blk.VIRTIO_BLK_ID_BYTES
    e["VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP"] = blk.SegmentFlags.UNMAP
    e["sizeof.virtio_blk_outhdr"] = BlkOutHdr.SIZE
    e.update(_offsets("virtio_blk_outhdr", BlkOutHdr))
    e["sizeof.virtio_blk_discard_write_zeroes"] = DiscardSegment.SIZE
    e.update(_offsets("virtio_blk_discard_write_zeroes", DiscardSegment))
    e["sizeof.virtio_blk_config_through_secure_erase"] = BlkConfig.SIZE
    e.update(
        _offsets(
            "virtio_blk_config",
            BlkConfig,
            {
                "geometry_cylinders": "geometry.cylinders",
                "geometry_heads": "geometry.heads",
                "geometry_sectors": "geometry.sectors",
                "writeback": "wce",
                "unused0": "unused",
            },
        )
    )
    # ------------------------------------------------------------ net
    for f in NetFeature:
        e[f"VIRTIO_NET_F_{f.name}"] = f
    for s in NetStatus:
        e[f"VIRTIO_NET_S_{s.name}"] = s
    for fl in NetHdrFlags:
        e[f"VIRTIO_NET_HDR_F_{fl.name}"] = fl
    for g in GsoType:
        e[f"VIRTIO_NET_HDR_GSO_{g.name}"] = g
    e["VIRTIO_NET_HDR_GSO_ECN"] = net.GSO_ECN
    e["VIRTIO_NET_OK"] = NetAck.OK
    e["VIRTIO_NET_ERR"] = NetAck.ERR
    for c in CtrlClass:
        e[f"VIRTIO_NET_CTRL_{c.name}"] = c
    for enum_cls, prefix in (
        (RxCmd, "RX"),
        (MacCmd, "MAC"),
        (VlanCmd, "VLAN"),
        (AnnounceCmd, "ANNOUNCE"),
        (MqCmd, "MQ"),
    ):
        for cmd in enum_cls:
            e[f"VIRTIO_NET_CTRL_{prefix}_{cmd.name}"] = cmd
    e["VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET"] = net.GuestOffloadsCmd.SET
    e["VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN"] = net.MQ_VQ_PAIRS_MIN
    e["VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX"] = net.MQ_VQ_PAIRS_MAX
    e["sizeof.virtio_net_hdr_v1"] = NetHdrV1.SIZE
    e.update(_offsets("virtio_net_hdr_v1", NetHdrV1))
    e["sizeof.virtio_net_config"] = NetConfig.SIZE
    e.update(_offsets("virtio_net_config", NetConfig))
    e["ETH_ALEN"] = net.ETH_ALEN
    e["ETH_HLEN"] = net.ETH_HLEN
    e["ETH_ZLEN"] = net.ETH_ZLEN
    e["ETH_P_IP"] = net.ETHERTYPE_IPV4
    e["ETH_P_ARP"] = net.ETHERTYPE_ARP
    e["ETH_P_RARP"] = net.ETHERTYPE_RARP
    e["ETH_P_8021Q"] = net.ETHERTYPE_VLAN
    # ------------------------------------------------------------ pci_regs.h (configuration space)
    for name in PCI_REGS_NAMES:
        e[name] = getattr(pcicfg, name)
    e["PCI_EXT_CAP_ID(0x12345678)"] = pcicfg.pci_ext_cap_id(0x12345678)
    e["PCI_EXT_CAP_VER(0x12345678)"] = pcicfg.pci_ext_cap_ver(0x12345678)
    e["PCI_EXT_CAP_NEXT(0x12345678)"] = pcicfg.pci_ext_cap_next(0x12345678)
    e["sizeof.virtio_pci_cfg_cap"] = pcicfg.VIRTIO_PCI_CFG_CAP_SIZEOF
    e["virtio_pci_cfg_cap.pci_cfg_data"] = pcicfg.VIRTIO_PCI_CFG_CAP_DATA
    # ------------------------------------------------------------ vfio.h (the VFIO ABI vfio-user reuses)
    for name in dir(vfio_user):
        if name.startswith("VFIO_") and not name.startswith("VFIO_USER_"):
            e[name] = getattr(vfio_user, name)
    for r in vfio_user.PciRegion:
        e[f"VFIO_PCI_{r.name}_REGION_INDEX"] = r
    for q in vfio_user.PciIrq:
        e[f"VFIO_PCI_{q.name}_IRQ_INDEX"] = q
    for c_name, cls in (("vfio_region_info", vfio_user.RegionInfo), ("vfio_irq_info", vfio_user.IrqInfo),
                        ("vfio_irq_set", vfio_user.IrqSet), ("vfio_device_feature", vfio_user.DeviceFeature)):
        e[f"sizeof.{c_name}"] = cls.SIZE
        e.update(_offsets(c_name, cls))
    return {k: int(v) for k, v in e.items()}


EXPECTED = _expected()

#: Defined only by newer headers than some distributions ship.
OPTIONAL = frozenset(
    {
        "VIRTIO_F_NOTIFICATION_DATA",
        "VIRTIO_F_NOTIF_CONFIG_DATA",
        "VIRTIO_F_ADMIN_VQ",
        "VIRTIO_F_RING_RESET",
        "VIRTIO_PCI_CAP_VENDOR_CFG",
        "VIRTIO_PCI_COMMON_Q_NDATA",
        "VIRTIO_PCI_COMMON_Q_RESET",
        "VIRTIO_BLK_F_LIFETIME",
        "VIRTIO_BLK_T_GET_LIFETIME",
        "VIRTIO_NET_HDR_GSO_UDP_L4",
    }
)


def _need_event_keys() -> list[tuple[int, int, int]]:
    v = (0, 1, 2, 3, 0x7FFF, 0x8000, 0x8001, 0xFFFE, 0xFFFF)
    return [(a, b, c) for a in v for b in v for c in v]


@pytest.fixture(scope="module")
def c_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: cannot compile the Linux header cross-check")
    tmp = tmp_path_factory.mktemp("c_headers")
    probe = tmp / "probe.c"
    probe.write_text("".join(f"#include <{h}>\n" for h in HEADERS) + "int main(void){return 0;}\n")
    r = subprocess.run([gcc, "-fsyntax-only", str(probe)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"Linux virtio uapi headers not available ({r.stderr.strip().splitlines()[0]})")
    exe = tmp / "layout"
    # from here on a failure is a real failure: layout.c must build and run
    r = subprocess.run(
        [gcc, "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-o", str(exe), str(SOURCE)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, f"tests/c/layout.c does not compile:\n{r.stderr}"
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    values: dict[str, int] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        assert key not in values, f"duplicate key {key}"
        values[key] = int(value)
    return values


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_matches_linux_header(key: str, c_values: dict[str, int]) -> None:
    if key not in c_values:
        if key in OPTIONAL:
            pytest.skip(f"{key} is not defined by the installed Linux headers (newer than them)")
        pytest.fail(f"{key}: layout.c printed no value for it")
    assert EXPECTED[key] == c_values[key], f"{key}: python {EXPECTED[key]} != C {c_values[key]}"


def test_every_c_value_is_checked(c_values: dict[str, int]) -> None:
    """Nothing layout.c prints goes unchecked (a key typo would hide a check)."""
    need_event = {k for k in c_values if k.startswith("need_event.")}
    unchecked = set(c_values) - set(EXPECTED) - need_event
    assert not unchecked, f"layout.c prints keys with no python counterpart: {sorted(unchecked)}"


def test_need_event_matches_vring_need_event(c_values: dict[str, int]) -> None:
    mismatches = []
    for ev, new, old in _need_event_keys():
        c = c_values[f"need_event.{ev}.{new}.{old}"]
        py = int(ring.need_event(ev, new, old))
        if c != py:
            mismatches.append((ev, new, old, py, c))
    assert len(_need_event_keys()) == 729
    assert not mismatches, f"(event, new, old, python, C): {mismatches[:10]}"


def test_linux_blk_ctrl_vq_collision_is_real(c_values: dict[str, int]) -> None:
    """The proposal's VIRTIO_BLK_F_CTRL_VQ shares bit 15 with the spec's LIFETIME."""
    if "VIRTIO_BLK_F_LIFETIME" not in c_values:
        pytest.skip("VIRTIO_BLK_F_LIFETIME is not defined by the installed Linux headers")
    assert c_values["VIRTIO_BLK_F_LIFETIME"] == BlkFeature.CTRL_VQ


def test_linux_ring_reset_collision_is_real(c_values: dict[str, int]) -> None:
    """The proposal's VF_MIGRATION shares bit 40 with the spec's RING_RESET."""
    from virtio_lm.wire.features import ProposalFeature

    if "VIRTIO_F_RING_RESET" not in c_values:
        pytest.skip("VIRTIO_F_RING_RESET is not defined by the installed Linux headers")
    assert c_values["VIRTIO_F_RING_RESET"] == ProposalFeature.VF_MIGRATION
