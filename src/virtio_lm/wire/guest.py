"""Layouts the simulated guest writes: verifying disk blocks and the migrated guest state.

Block stamp (the first 32 bytes of every 4 KiB block the blk workload writes;
the rest of the block is a pattern derived from lba and generation)::

    +0  le64 magic       "VLMBLOCK"
    +8  le64 lba         block number (4 KiB units)
    +16 le64 generation  1, 2, ... (0 = never written: the block is all zero)
    +24 le32 crc32       CRC-32 of bytes [32, 4096) of the block
    +28 le32 reserved    0

Guest state (what CPU_STATE carries: the vCPU "registers" plus the guest
software's own bookkeeping, which in a real guest would be guest memory)::

    +0  le32 magic       "GSTA"
    +4  le32 vcpu_len    bytes of the vCPU state (wire.vcpu.VcpuState)
    +8  le32 soft_len    bytes of the software state (strict JSON, see vm.guest_state)
    +12 le32 reserved    0
    +16 vcpu[vcpu_len]
    ..  soft[soft_len]
"""

from __future__ import annotations

from dataclasses import dataclass

from virtio_lm.errors import FieldValueError, ShortBufferError, TrailingDataError
from virtio_lm.wire.codec import layout, reserved

BLOCK_MAGIC = int.from_bytes(b"VLMBLOCK", "little")
BLOCK_SIZE = 4096
GUEST_MAGIC = int.from_bytes(b"GSTA", "little")
MAX_SOFT_STATE = 16 << 20


@layout("<QQQII")
@dataclass(frozen=True, slots=True)
class BlockStamp:
    magic: int
    lba: int
    generation: int
    crc32: int
    reserved: int = reserved()


@layout("<IIII")
@dataclass(frozen=True, slots=True)
class GuestStateHeader:
    magic: int
    vcpu_len: int
    soft_len: int
    reserved: int = reserved()


def join_cpu_state(vcpu: bytes, soft: bytes) -> bytes:
    """The CPU_STATE payload: the header, the vCPU state bytes, the software state bytes
    (each already encoded; :func:`virtio_lm.vm.guest_state.encode_guest_state` makes the
    latter)."""
    return GuestStateHeader(GUEST_MAGIC, len(vcpu), len(soft)).encode() + vcpu + soft


def split_cpu_state(buf: bytes | bytearray | memoryview) -> tuple[bytes, bytes]:
    """The inverse of :func:`join_cpu_state`: ``(vcpu bytes, software state bytes)``;
    exact length, magic and bounds checked."""
    hdr = GuestStateHeader.unpack_from(buf, 0)
    if hdr.magic != GUEST_MAGIC:
        raise FieldValueError("GuestStateHeader", "magic", hdr.magic, f"must be {GUEST_MAGIC:#x}")
    if hdr.soft_len > MAX_SOFT_STATE:
        raise FieldValueError("GuestStateHeader", "soft_len", hdr.soft_len, f"at most {MAX_SOFT_STATE}")
    need = GuestStateHeader.SIZE + hdr.vcpu_len + hdr.soft_len
    if len(buf) < need:
        raise ShortBufferError("GuestState", None, need, len(buf))
    if len(buf) > need:
        raise TrailingDataError("GuestState", need, len(buf))
    a = GuestStateHeader.SIZE
    return bytes(buf[a : a + hdr.vcpu_len]), bytes(buf[a + hdr.vcpu_len : need])
