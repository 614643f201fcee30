"""Cross-check of wire/admin.py and wire/parts.py against Linux's uapi <linux/virtio_pci.h>.

tests/c/admin_layout.c prints the admin-command structs' sizes and offsets and
the constants as ``key=value`` lines; each key is one test.  Linux added the
device-parts commands to its uapi header long after bookworm's 6.1 headers:
where the installed header does not define VIRTIO_ADMIN_CMD_DEV_MODE_SET, the test
compiles against a newer header tree: ``$VIRTIO_LM_UAPI_INCLUDE`` (a directory
holding ``linux/virtio_pci.h``) or ``/tmp/virtio-lm-uapi/usr/include``, where
``scripts/fetch-uapi-headers`` (run by ``.ci/run``) extracts a newer Debian
linux-libc-dev.  Where none has the commands the whole module is skipped with
that reason (and where gcc is missing).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from virtio_lm.wire import admin as A
from virtio_lm.wire import parts as P
from virtio_lm.wire.pci import COMMON_CFG_BY_NAME

SOURCE = Path(__file__).parent / "c" / "admin_layout.c"
FETCHED = Path("/tmp/virtio-lm-uapi/usr/include")  # scripts/fetch-uapi-headers puts them there


def _include_dirs() -> list[str]:
    """-isystem flags for a newer uapi header tree, if one is there (else the installed headers)."""
    root = os.environ.get("VIRTIO_LM_UAPI_INCLUDE") or (str(FETCHED) if FETCHED.is_dir() else "")
    if not root:
        return []
    flags = ["-isystem", root]
    arch = Path(root) / f"{platform.machine()}-linux-gnu"
    if arch.is_dir():  # Debian's arch-independent linux-libc-dev keeps asm/ per triplet
        flags += ["-isystem", str(arch)]
    return flags


def _expected() -> dict[str, int]:
    e: dict[str, int] = {"sizeof.virtio_admin_cmd_hdr": A.AdminCmdHdr.SIZE}
    e.update({f"virtio_admin_cmd_hdr.{k}": v for k, v in A.AdminCmdHdr.OFFSETS.items()})
    e["sizeof.virtio_admin_cmd_status"] = A.AdminCmdStatus.SIZE
    e.update({f"virtio_admin_cmd_status.{k}": v for k, v in A.AdminCmdStatus.OFFSETS.items()})
    e["sizeof.virtio_dev_parts_cap"] = A.DevPartsCap.SIZE
    e["sizeof.virtio_admin_cmd_cap_get_data"] = A.CapGetData.SIZE
    e["sizeof.virtio_admin_cmd_resource_obj_cmd_hdr"] = A.ResourceObjCmdHdr.SIZE
    e["virtio_admin_cmd_resource_obj_cmd_hdr.id"] = A.ResourceObjCmdHdr.OFFSETS["id"]
    e["sizeof.virtio_admin_cmd_resource_obj_create_data"] = A.ResourceObjCreateHead.SIZE
    e["virtio_admin_cmd_resource_obj_create_data.flags"] = A.ResourceObjCreateHead.OFFSETS["flags"]
    e["sizeof.virtio_resource_obj_dev_parts"] = A.ResourceObjDevParts.SIZE
    e["sizeof.virtio_admin_cmd_dev_parts_metadata_data"] = A.PartsCmdHead.SIZE
    e["virtio_admin_cmd_dev_parts_metadata_data.type"] = A.PartsCmdHead.OFFSETS["type"]
    e["sizeof.virtio_admin_cmd_dev_parts_get_data"] = A.PartsCmdHead.SIZE  # hdr_list[] adds nothing
    e["sizeof.virtio_admin_cmd_dev_parts_set_data"] = A.ResourceObjCmdHdr.SIZE  # parts[] adds nothing
    e["sizeof.virtio_dev_part_hdr"] = P.DevPartHdr.SIZE
    e.update({f"virtio_dev_part_hdr.{k}": v for k, v in P.DevPartHdr.OFFSETS.items() if k != "reserved"})
    e["sizeof.virtio_admin_cmd_dev_mode_set_data"] = A.DevModeSetData.SIZE
    e["VIRTIO_PCI_COMMON_ADM_Q_IDX"] = COMMON_CFG_BY_NAME["admin_queue_index"].offset
    e["VIRTIO_PCI_COMMON_ADM_Q_NUM"] = COMMON_CFG_BY_NAME["admin_queue_num"].offset
    e["VIRTIO_ADMIN_STATUS_OK"] = A.AdminStatus.OK
    e["VIRTIO_ADMIN_GROUP_TYPE_SRIOV"] = A.GroupType.SRIOV
    for op in A.AdminOpcode:
        if op.name.startswith("LEGACY") or op in (A.AdminOpcode.RESOURCE_OBJ_MODIFY, A.AdminOpcode.RESOURCE_OBJ_QUERY):
            continue  # legacy: not this profile's; MODIFY / QUERY: not in Linux's header
        e[f"VIRTIO_ADMIN_CMD_{op.name}"] = op
    e["VIRTIO_DEV_PARTS_CAP"] = A.CapId.DEV_PARTS
    e["VIRTIO_RESOURCE_OBJ_DEV_PARTS"] = A.ResourceObjType.DEV_PARTS
    e["VIRTIO_RESOURCE_OBJ_DEV_PARTS_TYPE_GET"] = A.DevPartsObjType.GET
    e["VIRTIO_RESOURCE_OBJ_DEV_PARTS_TYPE_SET"] = A.DevPartsObjType.SET
    for t in A.MetadataType:
        e[f"VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_TYPE_{t.name}"] = t
    for t in A.PartsGetType:
        e[f"VIRTIO_ADMIN_CMD_DEV_PARTS_GET_TYPE_{t.name}"] = t
    # Linux names the bit number (0), the spec's value is bit 0 set
    e["VIRTIO_DEV_PART_F_OPTIONAL"] = int(P.PartFlags.OPTIONAL).bit_length() - 1
    e["VIRTIO_ADMIN_CMD_DEV_MODE_F_STOPPED"] = int(A.DevModeFlags.STOPPED).bit_length() - 1
    return e


EXPECTED = _expected()


@pytest.fixture(scope="module")
def c_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler (gcc) to build tests/c/admin_layout.c")
    tmp = tmp_path_factory.mktemp("admin_c_headers")
    probe = tmp / "probe.c"
    probe.write_text(
        "#include <linux/virtio_pci.h>\n#ifndef VIRTIO_ADMIN_CMD_DEV_MODE_SET\n#error no device parts\n#endif\n"
        "int main(void){return 0;}\n"
    )
    inc = _include_dirs()
    r = subprocess.run([gcc, *inc, "-fsyntax-only", str(probe)], capture_output=True, text=True)
    if r.returncode != 0:
        where = f"the uapi headers in {inc[1]}" if inc else "the installed Linux uapi headers"
        pytest.skip(
            f"{where}: <linux/virtio_pci.h> has no virtio 1.4 device-parts admin commands "
            "(VIRTIO_ADMIN_CMD_DEV_MODE_SET undefined: headers older than the kernels that added them, "
            "e.g. Debian bookworm's 6.1); scripts/fetch-uapi-headers extracts newer ones (.ci/run runs it)"
        )
    exe = tmp / "admin_layout"
    r = subprocess.run([gcc, *inc, "-std=gnu11", "-Wall", "-Werror", "-o", str(exe), str(SOURCE)],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"tests/c/admin_layout.c does not compile:\n{r.stderr}"
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, _, v in (line.partition("=") for line in out.splitlines())}


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_admin_layout_matches_linux_header(key: str, c_values: dict[str, int]) -> None:
    assert key in c_values, f"{key}: admin_layout.c printed no value for it"
    assert EXPECTED[key] == c_values[key], f"{key}: python {EXPECTED[key]} != C {c_values[key]}"


def test_every_admin_c_value_is_checked(c_values: dict[str, int]) -> None:
    assert not set(c_values) - set(EXPECTED), sorted(set(c_values) - set(EXPECTED))
