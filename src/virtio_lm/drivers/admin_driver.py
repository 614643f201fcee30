"""A minimal host driver for a PF of the virtio-1.4 profile: admin commands over its admin queue.

:class:`AdminDriver` brings the PF up through its registers only (a
:class:`~virtio_lm.pci.transport.PciDriverTransport`): it negotiates
VERSION_1, VIRTIO_F_SR_IOV and VIRTIO_F_ADMIN_VQ (refusing a device that
does not offer them), reads ``admin_queue_index`` / ``admin_queue_num``
from the common configuration (0x3C / 0x3E), sets up the first admin queue
with its rings and every command buffer in host memory, and sets DRIVER_OK.
Then, as admin.tex asks, it queries and uses the command lists: the self
group's at bring-up (and the device-parts capability: it asks for the
object limits the device offers), the SR-IOV group's when VFs are enabled.

Each command is ONE chain -- device-readable ``virtio_admin_cmd`` head and
data, device-writable status block and result room -- kicked and waited
for (the PF's interrupt, the used ring polled as a fallback).  A status
other than OK raises :class:`~virtio_lm.errors.AdminCommandError` with the
status and qualifier; no used entry in time, a used length larger than the
room, or a status block cut short raise the driver errors the seed's
:class:`~virtio_lm.drivers.pf_driver.PfDriver` raises for the same faults.

Typed methods cover every command; :meth:`AdminDriver.save_parts` and
:meth:`AdminDriver.restore_parts` are the sequences Linux's
virtio-vfio-pci uses (a GET object, METADATA SIZE, GET ALL, destroy; a
SET object, SET, destroy).  Dirty pages are not the device's business in
this profile: see :mod:`virtio_lm.memory.iommu`.
"""

from __future__ import annotations

import itertools
import threading
import time

from virtio_lm.errors import (
    AdminCommandError,
    AllocationError,
    CommandTimeoutError,
    DeviceNeedsResetError,
    DriverError,
    FeatureMissingError,
    ShortBufferError,
    UsedRingError,
)
from virtio_lm.memory import MemoryPort
from virtio_lm.pci.function import CONFIG_INTERRUPT, VirtioPciFunction
from virtio_lm.pci.sriov import SriovPF, VfFactory
from virtio_lm.pci.transport import PciDriverTransport
from virtio_lm.virtqueue.device import Segment
from virtio_lm.virtqueue.driver import Allocator, DriverQueue
from virtio_lm.wire.admin import (
    STATUS_SIZE,
    AdminCmdStatus,
    AdminOpcode,
    AdminStatus,
    CapGetData,
    CapId,
    DevModeFlags,
    DevModeSetData,
    DevPartsCap,
    DevPartsObjType,
    GroupType,
    MetadataResultHead,
    MetadataType,
    PartsCmdHead,
    PartsGetType,
    ResourceObjCmdHdr,
    ResourceObjCreateHead,
    ResourceObjDevParts,
    ResourceObjType,
    decode_bitmap,
    encode_bitmap,
    encode_command,
)
from virtio_lm.wire.features import DeviceStatus, Feature, bit, feature_names
from virtio_lm.wire.parts import PART_HDR_SIZE, DevPart, DevPartHdr, decode_hdrs, decode_parts, encode_hdrs, encode_parts
from virtio_lm.wire.pci import COMMON_CFG_BY_NAME

__all__ = ["ADMIN_FEATURES", "AdminDriver"]

#: what the driver needs negotiated
ADMIN_FEATURES = bit(Feature.VERSION_1) | bit(Feature.SR_IOV) | bit(Feature.ADMIN_VQ)
_OP = AdminOpcode
_SELF_USES = frozenset({_OP.LIST_QUERY, _OP.LIST_USE, _OP.CAP_ID_LIST_QUERY, _OP.DEVICE_CAP_GET, _OP.DRIVER_CAP_SET})
_SRIOV_USES = frozenset({
    _OP.LIST_QUERY, _OP.LIST_USE, _OP.RESOURCE_OBJ_CREATE, _OP.RESOURCE_OBJ_MODIFY, _OP.RESOURCE_OBJ_QUERY,
    _OP.RESOURCE_OBJ_DESTROY, _OP.DEV_PARTS_METADATA_GET, _OP.DEV_PARTS_GET, _OP.DEV_PARTS_SET, _OP.DEV_MODE_SET,
})  # fmt: skip


class AdminDriver:
    """Host driver of a virtio-1.4 PF's admin queue; see the module docstring."""

    def __init__(
        self,
        pf: SriovPF,
        port: MemoryPort,
        alloc: Allocator,
        *,
        timeout: float = 10.0,
        queue_size: int = 64,
        poll_interval: float = 0.05,
    ) -> None:
        self.pf = pf
        self.port = port
        self.alloc = alloc
        self.timeout = timeout
        self.queue_size = queue_size
        self.poll_interval = poll_interval
        self.transport = PciDriverTransport(pf, port, alloc)
        self.features = 0
        self.admin_index: int | None = None
        self.adminq: DriverQueue | None = None
        self.device_cap: DevPartsCap | None = None
        self.commands = 0
        self._lock = threading.RLock()
        self._irq = threading.Event()
        self._tokens = itertools.count(1)
        self._abandoned: dict[int, tuple[int, int]] = {}
        self._next_obj: dict[int, int] = {}

    # ================================================================== bring-up
    def _r(self, name: str) -> int:
        reg = COMMON_CFG_BY_NAME[name]
        return self.pf.common_read(reg.offset, reg.width)

    def _fail(self, message: str, error: type[DriverError] = DriverError) -> DriverError:
        t = self.transport
        t.fn.common_write(COMMON_CFG_BY_NAME["device_status"].offset, 1, t.status | int(DeviceStatus.FAILED))
        return error(f"{self.pf.name}: {message}")

    def bring_up(self, *, discover: bool = True) -> int:
        """Negotiate, find and set up the admin queue, DRIVER_OK, then (``discover``)
        use the self group's commands and ask for the device's object limits."""
        with self._lock:
            t = self.transport
            t.reset()
            self._forget()
            offered = t.read_device_features()
            missing = ADMIN_FEATURES & ~offered
            if missing:
                t.fn.common_write(COMMON_CFG_BY_NAME["device_status"].offset, 1, int(DeviceStatus.ACKNOWLEDGE))
                raise self._fail(f"the device does not offer {', '.join(feature_names(missing))}", FeatureMissingError)
            features = t.negotiate(ADMIN_FEATURES | bit(Feature.EVENT_IDX))
            index, num = self._r("admin_queue_index"), self._r("admin_queue_num")
            if num == 0 or index < t.num_queues():
                raise self._fail(f"admin_queue_index {index} / admin_queue_num {num} name no admin queue")
            self.pf.on_interrupt = self._on_interrupt
            self.adminq = t.setup_queue(index, self.queue_size)
            self.admin_index = index
            t.driver_ok()
            self.features = features
            if not discover:
                return features
            self.use_commands(GroupType.SELF)
            if CapId.DEV_PARTS not in self.cap_id_list_query():
                raise self._fail("the device does not report VIRTIO_DEV_PARTS_CAP")
            self.device_cap = self.device_cap_get()
            self.driver_cap_set(self.device_cap)
            return features

    def _on_interrupt(self, source: int) -> None:
        if source == self.admin_index or source == CONFIG_INTERRUPT:
            self._irq.set()

    def _forget(self) -> None:
        if self.adminq is not None:
            for rd, wr in self._abandoned.values():
                self.alloc.free(rd)
                self.alloc.free(wr)
            self._abandoned.clear()
            for addr in (self.adminq.desc_addr, self.adminq.avail_addr, self.adminq.used_addr):
                self.alloc.free(addr)
        self.adminq = None
        self.admin_index = None
        self.device_cap = None
        self.features = 0
        self._next_obj.clear()

    def close(self) -> None:
        """Reset the PF: its admin queue stops, every resource object is destroyed."""
        with self._lock:
            self.transport.reset()
            self._forget()

    def enable_vfs(self, n: int, factory: VfFactory) -> list[VirtioPciFunction]:
        """Enable VFs 1..n (stand-in for the SR-IOV capability write), then use the SR-IOV group's commands."""
        with self._lock:
            vfs = self.pf.enable_vfs(n, factory)
            self.use_commands(GroupType.SRIOV)
            return vfs

    def use_commands(self, group: GroupType) -> frozenset[int]:
        """LIST_QUERY, then LIST_USE of what this driver knows of that list."""
        supported = self.list_query(group)
        use = supported & (_SELF_USES if group is GroupType.SELF else _SRIOV_USES)
        self.list_use(group, use)
        return use

    # ================================================================== one command
    def raw_command(
        self, opcode: int, group: int, member: int, data: bytes = b"", result_space: int = 0, *, readable: bytes | None = None
    ) -> tuple[AdminCmdStatus, bytes, int]:
        """Send one command; ``(status block, result, used_len)``.  ``readable``
        replaces the whole device-readable part (hostile-input tests)."""
        if readable is None:
            readable = encode_command(opcode, group, member, data)
        wlen = STATUS_SIZE + result_space
        with self._lock:
            dq = self.adminq
            if dq is None or self.admin_index is None:
                raise DriverError(f"{self.pf.name}: the admin driver is not up (bring_up first)")
            try:
                rd = self.alloc.alloc(max(1, len(readable)), 8)
            except AllocationError as exc:
                raise DriverError(f"{self.pf.name}: no host memory for a {len(readable)}-byte command") from exc
            try:
                wr = self.alloc.alloc(wlen, 8)
            except AllocationError as exc:
                self.alloc.free(rd)
                raise DriverError(f"{self.pf.name}: no host memory for a {wlen}-byte result") from exc
            token = next(self._tokens)
            try:
                self.port.write(rd, readable)
                self.port.fill(wr, wlen, 0)
                dq.add([Segment(rd, len(readable))] if readable else [], [Segment(wr, wlen)], token=token)
                self._irq.clear()
                self.commands += 1
                self.transport.kick(self.admin_index)
                used_len = self._wait(dq, token, rd, wr)
            except BaseException:
                if token not in self._abandoned:  # abandoned buffers are freed when (if) returned
                    self.alloc.free(rd)
                    self.alloc.free(wr)
                raise
            try:
                if used_len > wlen:
                    raise UsedRingError(f"{self.pf.name}: admin command used_len {used_len} > its {wlen} writable bytes")
                if used_len < 4:
                    raise ShortBufferError("virtio_admin_cmd", "status", 4, used_len)
                out = self.port.read(wr, used_len)
                status = AdminCmdStatus.decode(out[:STATUS_SIZE] + bytes(max(0, STATUS_SIZE - used_len)))
                return status, out[STATUS_SIZE:], used_len
            finally:
                self.alloc.free(rd)
                self.alloc.free(wr)

    def _wait(self, dq: DriverQueue, token: int, rd: int, wr: int) -> int:
        deadline = time.monotonic() + self.timeout
        while True:
            while (item := dq.get_used()) is not None:
                got, used_len = item
                if got == token:
                    return used_len
                bufs = self._abandoned.pop(got, None)  # type: ignore[call-overload]
                if bufs is None:
                    raise UsedRingError(f"{self.pf.name}: used entry for unknown admin command {got!r}")
                for addr in bufs:
                    self.alloc.free(addr)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._abandoned[token] = (rd, wr)
                raise CommandTimeoutError(f"{self.pf.name}: admin command not completed within {self.timeout}s")
            if not self._irq.wait(min(remaining, self.poll_interval)):
                pass
            self._irq.clear()
            if self.transport.status & (int(DeviceStatus.DEVICE_NEEDS_RESET) | int(DeviceStatus.FAILED)):
                self._abandoned[token] = (rd, wr)
                raise DeviceNeedsResetError(f"{self.pf.name}: the PF needs a reset; admin command abandoned")

    def command(self, opcode: AdminOpcode, group: GroupType, member: int, data: bytes = b"", result_space: int = 0) -> bytes:
        """Send one command; its result, or :class:`AdminCommandError` for a status other than OK."""
        status, result, _ = self.raw_command(opcode, group, member, data, result_space)
        if status.status is not AdminStatus.OK:
            raise AdminCommandError(int(opcode), member or None, int(status.status), int(status.status_qualifier))
        return result

    # ================================================================== discovery and capabilities
    def list_query(self, group: GroupType) -> frozenset[int]:
        return decode_bitmap(self.command(_OP.LIST_QUERY, group, 0, result_space=64))

    def list_use(self, group: GroupType, opcodes: frozenset[int] | set[int]) -> None:
        self.command(_OP.LIST_USE, group, 0, encode_bitmap(set(opcodes)))

    def cap_id_list_query(self) -> frozenset[int]:
        return decode_bitmap(self.command(_OP.CAP_ID_LIST_QUERY, GroupType.SELF, 0, result_space=64))

    def device_cap_get(self) -> DevPartsCap:
        out = self.command(_OP.DEVICE_CAP_GET, GroupType.SELF, 0, CapGetData(CapId.DEV_PARTS).encode(), 8)
        return DevPartsCap.decode(out[: DevPartsCap.SIZE])

    def driver_cap_set(self, cap: DevPartsCap) -> None:
        self.command(_OP.DRIVER_CAP_SET, GroupType.SELF, 0, CapGetData(CapId.DEV_PARTS).encode() + cap.encode())

    # ================================================================== resource objects
    def obj_create(self, vf: int, kind: DevPartsObjType, obj_id: int | None = None) -> int:
        """Create a device parts object of ``kind`` for VF ``vf``; its id."""
        if obj_id is None:
            obj_id = self._alloc_id(vf)
        data = ResourceObjCreateHead(ResourceObjType.DEV_PARTS, 0, obj_id, 0).encode() + ResourceObjDevParts(int(kind)).encode()
        self.command(_OP.RESOURCE_OBJ_CREATE, GroupType.SRIOV, vf, data)
        return obj_id

    def _alloc_id(self, vf: int) -> int:
        cap = self.device_cap
        if cap is None:
            raise DriverError(f"{self.pf.name}: the admin driver is not up")
        limit = cap.get_parts_resource_objects_limit + cap.set_parts_resource_objects_limit
        nxt = self._next_obj.get(vf, 0)
        self._next_obj[vf] = (nxt + 1) % max(1, limit)
        return nxt

    def obj_modify(self, vf: int, obj_id: int, kind: DevPartsObjType) -> None:
        data = ResourceObjCreateHead(ResourceObjType.DEV_PARTS, 0, obj_id, 0).encode() + ResourceObjDevParts(int(kind)).encode()
        self.command(_OP.RESOURCE_OBJ_MODIFY, GroupType.SRIOV, vf, data)

    def obj_query(self, vf: int, obj_id: int) -> DevPartsObjType:
        data = ResourceObjCreateHead(ResourceObjType.DEV_PARTS, 0, obj_id, 0).encode()
        out = self.command(_OP.RESOURCE_OBJ_QUERY, GroupType.SRIOV, vf, data, 8)
        return DevPartsObjType(ResourceObjDevParts.decode(out[: ResourceObjDevParts.SIZE]).type)

    def obj_destroy(self, vf: int, obj_id: int) -> None:
        self.command(_OP.RESOURCE_OBJ_DESTROY, GroupType.SRIOV, vf, ResourceObjCmdHdr(ResourceObjType.DEV_PARTS, 0, obj_id).encode())

    # ================================================================== device parts
    def _metadata(self, vf: int, obj_id: int, kind: MetadataType, space: int = 8) -> bytes:
        data = PartsCmdHead(ResourceObjType.DEV_PARTS, 0, obj_id, int(kind)).encode()
        return self.command(_OP.DEV_PARTS_METADATA_GET, GroupType.SRIOV, vf, data, space)

    def metadata_size(self, vf: int, obj_id: int) -> int:
        return MetadataResultHead.decode(self._metadata(vf, obj_id, MetadataType.SIZE)).value

    def metadata_count(self, vf: int, obj_id: int) -> int:
        return MetadataResultHead.decode(self._metadata(vf, obj_id, MetadataType.COUNT)).value

    def metadata_list(self, vf: int, obj_id: int) -> list[DevPartHdr]:
        count = self.metadata_count(vf, obj_id)
        out = self._metadata(vf, obj_id, MetadataType.LIST, 8 + count * PART_HDR_SIZE)
        head = MetadataResultHead.decode(out[:8])
        return decode_hdrs(out[8 : 8 + head.value * PART_HDR_SIZE])

    def parts_get(self, vf: int, obj_id: int, selected: list[DevPartHdr] | None = None, *, space: int | None = None) -> list[DevPart]:
        """DEV_PARTS_GET: all parts, or those matching ``selected``; the room is
        METADATA SIZE unless ``space`` is given."""
        if space is None:
            space = self.metadata_size(vf, obj_id)
        kind = PartsGetType.ALL if selected is None else PartsGetType.SELECTED
        data = PartsCmdHead(ResourceObjType.DEV_PARTS, 0, obj_id, int(kind)).encode() + encode_hdrs(selected or [])
        out = self.command(_OP.DEV_PARTS_GET, GroupType.SRIOV, vf, data, space)
        return decode_parts(_trim(out))

    def parts_set(self, vf: int, obj_id: int, parts: list[DevPart]) -> None:
        data = ResourceObjCmdHdr(ResourceObjType.DEV_PARTS, 0, obj_id).encode() + encode_parts(parts)
        self.command(_OP.DEV_PARTS_SET, GroupType.SRIOV, vf, data)

    def mode_set(self, vf: int, *, stopped: bool) -> None:
        flags = DevModeFlags.STOPPED if stopped else DevModeFlags(0)
        self.command(_OP.DEV_MODE_SET, GroupType.SRIOV, vf, DevModeSetData(flags).encode() + bytes(7))

    # ================================================================== sequences
    def save_parts(self, vf: int) -> list[DevPart]:
        """Every part of VF ``vf`` through a GET object (created and destroyed here)."""
        obj = self.obj_create(vf, DevPartsObjType.GET)
        try:
            return self.parts_get(vf, obj)
        finally:
            self.obj_destroy(vf, obj)

    def restore_parts(self, vf: int, parts: list[DevPart]) -> None:
        """Set ``parts`` on (stopped) VF ``vf`` through a SET object."""
        obj = self.obj_create(vf, DevPartsObjType.SET)
        try:
            self.parts_set(vf, obj, parts)
        finally:
            self.obj_destroy(vf, obj)


def _trim(result: bytes) -> bytes:
    """A GET result the device padded to a multiple of 8 bytes: the parts without the
    pad (fewer than 8 zero bytes after the last part)."""
    pos = 0
    while len(result) - pos >= PART_HDR_SIZE:
        pos += PART_HDR_SIZE + DevPartHdr.unpack_from(result, pos).length
    if pos < len(result) and (len(result) - pos >= 8 or any(result[pos:])):
        return result  # not a pad: let decode_parts refuse it
    return result[:pos]
