"""The vCPU workload's migrated state (what ``CPU_STATE`` carries).

::

    +0  le32 magic        "VCPU" (0x55504356)
    +4  le16 version      1
    +6  le16 kind         1 = page sweep (QEMU migration-test style)
    +8  le64 region_start guest-physical address of the first swept page
    +16 le64 region_pages pages in the swept region
    +24 le64 sweeps       complete sweeps so far
    +32 le64 position     pages of the current sweep already incremented
    +40 le32 throttle     percent of time the vCPU sleeps (auto-converge)
    +44 le32 reserved     0
"""

from __future__ import annotations

from dataclasses import dataclass

from virtio_lm.errors import FieldValueError
from virtio_lm.wire.codec import layout, reserved

VCPU_MAGIC = 0x55504356
VCPU_VERSION = 1
KIND_PAGE_SWEEP = 1


@layout("<IHHQQQQII")
@dataclass(frozen=True, slots=True)
class VcpuState:
    magic: int
    version: int
    kind: int
    region_start: int
    region_pages: int
    sweeps: int
    position: int
    throttle: int
    reserved: int = reserved()

    def __post_init__(self) -> None:
        if self.magic != VCPU_MAGIC:
            raise FieldValueError("VcpuState", "magic", self.magic, f"must be {VCPU_MAGIC:#x}")
        if self.version != VCPU_VERSION:
            raise FieldValueError("VcpuState", "version", self.version, f"only version {VCPU_VERSION}")
        if self.kind != KIND_PAGE_SWEEP:
            raise FieldValueError("VcpuState", "kind", self.kind, "1 (page sweep)")
        if self.region_start % 4096:
            raise FieldValueError("VcpuState", "region_start", self.region_start, "page aligned")
        if not 0 <= self.position <= self.region_pages:
            raise FieldValueError("VcpuState", "position", self.position, f"0..region_pages ({self.region_pages})")
        if not 0 <= self.throttle <= 99:
            raise FieldValueError("VcpuState", "throttle", self.throttle, "0..99 percent")
