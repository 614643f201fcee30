"""The virtio-1.4 profile's group administration commands (sans-I/O).

:class:`AdminHandler` is what a PF of the virtio-1.4 profile runs for each
buffer on its administration virtqueue: the device-readable bytes and the
size of the device-writable part in, the bytes to write out (status block
and result, truncated to the room given) -- nothing here touches a queue or
memory.  The owner is the PF; the groups are the self group (type 0, member
0: the capability commands) and the SR-IOV group (type 1, members = VF
numbers 1..NumVFs: resource objects, device parts, device mode).

Checks, in the spec's order, each a refusal with no side effect
(docs/profile-1.4.md has the table of every status and qualifier)::

    reserved1 of the head not zero                 EINVAL  INVALID_COMMAND
    group_type not 0 / 1; SR-IOV with VF Enable clear  EINVAL  INVALID_GROUP
      (LIST_QUERY / LIST_USE excepted when ``lists_before_vf_enable``)
    opcode not supported for the group, or not
      in the list the driver used (LIST_USE)      EINVAL  INVALID_OPCODE
    group_member_id invalid (when used)           EINVAL  INVALID_MEMBER
    the command's own checks                      (per command)

The spec (admin.tex, device requirements) says a device MUST fail *all*
SR-IOV-group commands with INVALID_GROUP while VF Enable is clear; Linux
6.12's virtio_pci sends LIST_QUERY / LIST_USE for that group once, when the
PF's admin queue comes up at probe -- before any VF can exist -- and keeps an
empty command list for the device's life if refused.  ``lists_before_vf_enable``
answers those two (they address no member) while VF Enable is clear; every
member command is still refused.  Off by default: the spec's rule.
(docs/decisions.md, "Linux 6.12 on the virtio-1.4 PF".)

The member's device mode is :data:`MODE_TRANSITIONS`, a table over every
(mode, request) pair; its device is driven through
:class:`~virtio_lm.devices.base.PartsMigratable`.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field

from virtio_lm.devices.base import PartsMigratable
from virtio_lm.errors import AdminCommandRefusedError, DeviceBusyError, DevicePartsError, WireError
from virtio_lm.pci.function import VirtioPciFunction
from virtio_lm.pci.sriov import SriovPF
from virtio_lm.wire.admin import (
    CMD_HDR_SIZE,
    OPCODE_STRUCT_LAST,
    STATUS_SIZE,
    AdminCmdHdr,
    AdminOpcode,
    AdminQualifier,
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
    encode_status,
    pad_read,
    truncate_written,
)
from virtio_lm.wire.parts import DevPart, decode_hdrs, decode_parts, encode_hdrs, encode_parts

_Op = AdminOpcode
_S = AdminStatus
_Q = AdminQualifier

#: commands supported per group type -- fixed for the device's life (the list never shrinks)
SUPPORTED: dict[GroupType, frozenset[int]] = {
    GroupType.SELF: frozenset({_Op.LIST_QUERY, _Op.LIST_USE, _Op.CAP_ID_LIST_QUERY, _Op.DEVICE_CAP_GET, _Op.DRIVER_CAP_SET}),
    GroupType.SRIOV: frozenset({
        _Op.LIST_QUERY, _Op.LIST_USE,
        _Op.RESOURCE_OBJ_CREATE, _Op.RESOURCE_OBJ_MODIFY, _Op.RESOURCE_OBJ_QUERY, _Op.RESOURCE_OBJ_DESTROY,
        _Op.DEV_PARTS_METADATA_GET, _Op.DEV_PARTS_GET, _Op.DEV_PARTS_SET, _Op.DEV_MODE_SET,
    }),
}  # fmt: skip
#: what is assumed used after a reset, before LIST_USE
INITIAL_USE = frozenset({int(_Op.LIST_QUERY), int(_Op.LIST_USE)})
#: commands that address a member (the rest ignore group_member_id)
_NO_MEMBER = frozenset({_Op.LIST_QUERY, _Op.LIST_USE})

DEFAULT_GET_OBJECTS = 2
DEFAULT_SET_OBJECTS = 2
DEFAULT_STOP_TIMEOUT = 10.0
MAX_PARTS_DATA = 1 << 20  # a DEV_PARTS_SET larger than this is refused before decoding


class MemberMode(enum.Enum):
    RUNNING = "running"
    STOPPED = "stopped"


class ModeAction(enum.Enum):
    NOOP = "noop"
    STOP = "stop"
    START = "start"


#: (member mode, STOPPED requested?) -> what DEV_MODE_SET does.  Every pair is listed.
MODE_TRANSITIONS: dict[tuple[MemberMode, bool], tuple[ModeAction, MemberMode]] = {
    (MemberMode.RUNNING, True): (ModeAction.STOP, MemberMode.STOPPED),
    (MemberMode.RUNNING, False): (ModeAction.NOOP, MemberMode.RUNNING),
    (MemberMode.STOPPED, True): (ModeAction.NOOP, MemberMode.STOPPED),
    (MemberMode.STOPPED, False): (ModeAction.START, MemberMode.RUNNING),
}


@dataclass
class Member:
    """The owner's state for one SR-IOV member (a VF)."""

    number: int
    fn: VirtioPciFunction
    mode: MemberMode = MemberMode.RUNNING
    objects: dict[int, DevPartsObjType] = field(default_factory=dict)
    parts_set: int = 0  # successful DEV_PARTS_SET commands since the last stop

    @property
    def device(self) -> PartsMigratable:
        return self.fn.device  # type: ignore[return-value]


@dataclass(frozen=True)
class MemberView:
    """A copy of a member's state (monitors and tests)."""

    number: int
    mode: MemberMode
    objects: dict[int, DevPartsObjType]


def _refuse(opcode: int, member: int | None, status: AdminStatus, qualifier: AdminQualifier, reason: str) -> AdminCommandRefusedError:
    return AdminCommandRefusedError(opcode, member, int(status), int(qualifier), reason)


def _pad8(result: bytes) -> bytes:
    """Results are initialized up to a multiple of 64 bits (the spec's rule)."""
    return result + bytes(-len(result) % 8)


class AdminHandler:
    """Group administration commands of a virtio-1.4 PF over its VFs; see the module docstring."""

    def __init__(
        self,
        pf: SriovPF,
        *,
        get_objects: int = DEFAULT_GET_OBJECTS,
        set_objects: int = DEFAULT_SET_OBJECTS,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        lists_before_vf_enable: bool = False,
    ) -> None:
        for name, v in (("get_objects", get_objects), ("set_objects", set_objects)):
            if not 0 <= v <= 0xFF:
                raise ValueError(f"{name} must fit the capability's u8, got {v}")
        self.pf = pf
        self.device_cap = DevPartsCap(get_objects, set_objects)
        self.stop_timeout = stop_timeout
        #: answer the SR-IOV group's LIST_QUERY / LIST_USE while VF Enable is clear (see above)
        self.lists_before_vf_enable = lists_before_vf_enable
        self._lock = threading.RLock()
        self._members: dict[int, Member] = {}
        self._used: dict[GroupType, frozenset[int]] = {g: INITIAL_USE for g in GroupType}
        self._driver_cap = DevPartsCap(0, 0)
        self.last_error: str | None = None
        self.counts: dict[str, int] = {"ok": 0, "err": 0}
        pf.add_flr_listener(self._on_vf_flr)
        pf.add_sriov_listener(self._on_sriov_change)
        self._on_sriov_change(pf.num_vfs)

    # ================================================================== bookkeeping
    def _on_sriov_change(self, num_vfs: int) -> None:
        with self._lock:
            self._members = {n: Member(n, self.pf.vf(n)) for n in range(1, num_vfs + 1)}

    def _on_vf_flr(self, number: int) -> None:
        """A member FLR: its parts are reset (the function's FLR did that), its objects
        destroyed, and it runs again (mastering: the FLR'd device is a fresh one)."""
        with self._lock:
            m = self._members.get(number)
            if m is None:
                return
            m.objects.clear()
            m.mode = MemberMode.RUNNING
            m.parts_set = 0
            m.fn.port.bus_master = True

    def reset(self) -> None:
        """The owner was reset: every resource object is destroyed, the driver's
        capabilities and the used command lists are back to their initial values."""
        with self._lock:
            for m in self._members.values():
                m.objects.clear()
            self._used = {g: INITIAL_USE for g in GroupType}
            self._driver_cap = DevPartsCap(0, 0)

    def member(self, number: int) -> MemberView:
        with self._lock:
            m = self._members[number]
            return MemberView(m.number, m.mode, dict(m.objects))

    @property
    def driver_cap(self) -> DevPartsCap:
        return self._driver_cap

    def used_commands(self, group: GroupType) -> frozenset[int]:
        return self._used[group]

    # ================================================================== entry point
    def handle(self, readable: bytes, writable_len: int) -> bytes:
        """One admin buffer: the bytes to write into its writable part."""
        try:
            with self._lock:
                result = self._route(readable, writable_len)
        except AdminCommandRefusedError as exc:
            self.last_error = str(exc)
            self.counts["err"] += 1
            out = encode_status(AdminStatus(exc.status), AdminQualifier(exc.qualifier))
            return truncate_written(out, writable_len)
        self.counts["ok"] += 1
        out = encode_status(_S.OK, _Q.OK) + _pad8(result)
        return truncate_written(out, writable_len)

    def _route(self, readable: bytes, writable_len: int) -> bytes:
        head = pad_read(readable, CMD_HDR_SIZE)
        try:
            hdr = AdminCmdHdr.decode(head)
        except WireError as exc:
            raw_op = int.from_bytes(head[:2], "little")
            raise _refuse(raw_op, None, _S.EINVAL, _Q.INVALID_COMMAND, str(exc)) from exc
        op, mid = hdr.opcode, hdr.group_member_id
        data = bytes(readable[CMD_HDR_SIZE:])
        room = max(0, writable_len - STATUS_SIZE)
        try:
            group = GroupType(hdr.group_type)
        except ValueError:
            raise _refuse(op, None, _S.EINVAL, _Q.INVALID_GROUP, f"group type {hdr.group_type} is not supported") from None
        if group is GroupType.SRIOV and self.pf.num_vfs == 0 and not (
                self.lists_before_vf_enable and op in _NO_MEMBER):
            raise _refuse(op, None, _S.EINVAL, _Q.INVALID_GROUP, "SR-IOV group: VF Enable is clear")
        if op > OPCODE_STRUCT_LAST or op not in SUPPORTED[group]:
            raise _refuse(op, None, _S.EINVAL, _Q.INVALID_OPCODE, f"opcode {op:#x} is not supported for {group.name}")
        if op not in self._used[group]:
            raise _refuse(op, None, _S.EINVAL, _Q.INVALID_OPCODE, f"opcode {op:#x} is not in the list the driver uses")
        opcode = _Op(op)
        member: Member | None = None
        if opcode not in _NO_MEMBER:
            if group is GroupType.SELF and mid != 0:
                raise _refuse(op, mid, _S.EINVAL, _Q.INVALID_MEMBER, "the self group's only member is 0")
            if group is GroupType.SRIOV:
                member = self._members.get(mid)
                if member is None:
                    raise _refuse(op, mid, _S.EINVAL, _Q.INVALID_MEMBER, f"member must be a VF number in 1..{self.pf.num_vfs}")
        try:
            return self._execute(opcode, group, member, data, room)
        except WireError as exc:  # a command-specific field that does not decode
            raise _refuse(op, mid, _S.EINVAL, _Q.INVALID_FIELD, str(exc)) from exc

    def _execute(self, op: AdminOpcode, group: GroupType, m: Member | None, data: bytes, room: int) -> bytes:
        if op is _Op.LIST_QUERY:
            return encode_bitmap(SUPPORTED[group])
        if op is _Op.LIST_USE:
            return self._list_use(group, data)
        if op is _Op.CAP_ID_LIST_QUERY:
            return encode_bitmap({int(CapId.DEV_PARTS)})
        if op is _Op.DEVICE_CAP_GET:
            self._cap_id(op, CapGetData.decode(pad_read(data, CapGetData.SIZE)).id)
            return self.device_cap.encode()
        if op is _Op.DRIVER_CAP_SET:
            return self._driver_cap_set(data)
        assert m is not None  # every other command is an SR-IOV member's
        if op is _Op.RESOURCE_OBJ_CREATE:
            return self._obj_create(m, data)
        if op is _Op.RESOURCE_OBJ_MODIFY:
            return self._obj_modify(m, data)
        if op is _Op.RESOURCE_OBJ_QUERY:
            return self._obj_query(m, data)
        if op is _Op.RESOURCE_OBJ_DESTROY:
            return self._obj_destroy(m, data)
        if op is _Op.DEV_PARTS_METADATA_GET:
            return self._metadata(m, data, room)
        if op is _Op.DEV_PARTS_GET:
            return self._parts_get(m, data, room)
        if op is _Op.DEV_PARTS_SET:
            return self._parts_set(m, data)
        assert op is _Op.DEV_MODE_SET
        return self._mode_set(m, data)

    # ================================================================== discovery
    def _list_use(self, group: GroupType, data: bytes) -> bytes:
        words = pad_read(data, -(-len(data) // 8) * 8 or 8)
        wanted = decode_bitmap(words)
        extra = wanted - SUPPORTED[group]
        if extra:
            raise _refuse(_Op.LIST_USE, None, _S.EINVAL, _Q.INVALID_FIELD, f"opcodes {sorted(extra)} are not supported")
        self._used[group] = frozenset(wanted)
        return b""

    # ================================================================== capabilities
    def _cap_id(self, op: AdminOpcode, cap: int) -> None:
        if cap != CapId.DEV_PARTS:
            raise _refuse(op, 0, _S.ENXIO, _Q.INVALID_FIELD, f"capability {cap:#x} is not reported")

    def _driver_cap_set(self, data: bytes) -> bytes:
        op = _Op.DRIVER_CAP_SET
        head = CapGetData.decode(pad_read(data, CapGetData.SIZE))
        self._cap_id(op, head.id)
        cap = DevPartsCap.decode(pad_read(data[CapGetData.SIZE :], DevPartsCap.SIZE))
        dev = self.device_cap
        if (
            cap.get_parts_resource_objects_limit > dev.get_parts_resource_objects_limit
            or cap.set_parts_resource_objects_limit > dev.set_parts_resource_objects_limit
        ):
            raise _refuse(op, 0, _S.EINVAL, _Q.INVALID_FIELD, f"limits {cap} above the device's {dev}")
        if cap != self._driver_cap and any(m.objects for m in self._members.values()):
            raise _refuse(op, 0, _S.EBUSY, _Q.INVALID_COMMAND, "device parts objects exist; destroy them first")
        self._driver_cap = cap
        return b""

    # ================================================================== resource objects
    def _id_limit(self) -> int:
        c = self._driver_cap
        return c.get_parts_resource_objects_limit + c.set_parts_resource_objects_limit

    def _obj_head(self, op: AdminOpcode, m: Member, obj_type: int, obj_id: int) -> None:
        if obj_type != ResourceObjType.DEV_PARTS:
            raise _refuse(op, m.number, _S.EINVAL, _Q.INVALID_FIELD, f"resource object type {obj_type:#x} is not supported")
        if obj_id >= self._id_limit():
            raise _refuse(op, m.number, _S.EINVAL, _Q.INVALID_FIELD, f"object id {obj_id} is over the limit {self._id_limit()}")

    def _existing(self, op: AdminOpcode, m: Member, obj_type: int, obj_id: int) -> DevPartsObjType:
        self._obj_head(op, m, obj_type, obj_id)
        kind = m.objects.get(obj_id)
        if kind is None:
            raise _refuse(op, m.number, _S.ENXIO, _Q.INVALID_FIELD, f"no device parts object {obj_id}")
        return kind

    def _obj_kind(self, op: AdminOpcode, m: Member, flags: int, specific: bytes) -> DevPartsObjType:
        if flags:
            raise _refuse(op, m.number, _S.EINVAL, _Q.INVALID_FIELD, f"flags {flags:#x}: none are defined")
        raw = ResourceObjDevParts.decode(pad_read(specific, ResourceObjDevParts.SIZE))
        try:
            return DevPartsObjType(raw.type)
        except ValueError:
            raise _refuse(op, m.number, _S.EINVAL, _Q.INVALID_FIELD, f"device parts object type {raw.type}") from None

    def _count(self, m: Member, kind: DevPartsObjType) -> int:
        return sum(1 for k in m.objects.values() if k is kind)

    def _obj_create(self, m: Member, data: bytes) -> bytes:
        op = _Op.RESOURCE_OBJ_CREATE
        head = ResourceObjCreateHead.decode(pad_read(data, ResourceObjCreateHead.SIZE))
        self._obj_head(op, m, head.type, head.id)
        kind = self._obj_kind(op, m, head.flags, data[ResourceObjCreateHead.SIZE :])
        if head.id in m.objects:
            raise _refuse(op, m.number, _S.EEXIST, _Q.INVALID_FIELD, f"object {head.id} exists")
        c = self._driver_cap
        limit = c.get_parts_resource_objects_limit if kind is DevPartsObjType.GET else c.set_parts_resource_objects_limit
        if self._count(m, kind) >= limit:
            raise _refuse(op, m.number, _S.ENOSPC, _Q.NORESOURCE, f"{limit} {kind.name} objects exist already")
        m.objects[head.id] = kind
        return b""

    def _obj_modify(self, m: Member, data: bytes) -> bytes:
        op = _Op.RESOURCE_OBJ_MODIFY
        head = ResourceObjCreateHead.decode(pad_read(data, ResourceObjCreateHead.SIZE))
        old = self._existing(op, m, head.type, head.id)
        kind = self._obj_kind(op, m, head.flags, data[ResourceObjCreateHead.SIZE :])
        if kind is not old:
            c = self._driver_cap
            limit = c.get_parts_resource_objects_limit if kind is DevPartsObjType.GET else c.set_parts_resource_objects_limit
            if self._count(m, kind) >= limit:
                raise _refuse(op, m.number, _S.ENOSPC, _Q.NORESOURCE, f"{limit} {kind.name} objects exist already")
        m.objects[head.id] = kind
        return b""

    def _obj_query(self, m: Member, data: bytes) -> bytes:
        op = _Op.RESOURCE_OBJ_QUERY
        head = ResourceObjCreateHead.decode(pad_read(data, ResourceObjCreateHead.SIZE))
        if head.flags:
            raise _refuse(op, m.number, _S.EINVAL, _Q.INVALID_FIELD, f"flags {head.flags:#x}: none are defined")
        kind = self._existing(op, m, head.type, head.id)
        return ResourceObjDevParts(int(kind)).encode()

    def _obj_destroy(self, m: Member, data: bytes) -> bytes:
        op = _Op.RESOURCE_OBJ_DESTROY
        head = ResourceObjCmdHdr.decode(pad_read(data, ResourceObjCmdHdr.SIZE))
        self._existing(op, m, head.type, head.id)
        del m.objects[head.id]
        return b""

    # ================================================================== device parts
    def _parts_object(self, op: AdminOpcode, m: Member, head: PartsCmdHead | ResourceObjCmdHdr, want: DevPartsObjType) -> None:
        obj_type = head.obj_type if isinstance(head, PartsCmdHead) else head.type
        obj_id = head.obj_id if isinstance(head, PartsCmdHead) else head.id
        kind = self._existing(op, m, obj_type, obj_id)
        if kind is not want:
            raise _refuse(op, m.number, _S.EINVAL, _Q.INVALID_FIELD, f"object {obj_id} is a {kind.name} object; {want.name} needed")

    def _metadata(self, m: Member, data: bytes, room: int) -> bytes:
        op = _Op.DEV_PARTS_METADATA_GET
        head = PartsCmdHead.decode(pad_read(data, PartsCmdHead.SIZE))
        self._parts_object(op, m, head, DevPartsObjType.GET)
        try:
            kind = MetadataType(head.type)
        except ValueError:
            raise _refuse(op, m.number, _S.EINVAL, _Q.INVALID_FIELD, f"metadata type {head.type}") from None
        if kind is MetadataType.SIZE:
            return MetadataResultHead(m.device.mig_max_parts_size()).encode()
        hdrs = [p.hdr for p in m.device.mig_parts()]
        if kind is MetadataType.COUNT:
            return MetadataResultHead(len(hdrs)).encode()
        out = MetadataResultHead(len(hdrs)).encode() + encode_hdrs(hdrs)
        if len(out) > room:
            raise _refuse(op, m.number, _S.ENOMEM, _Q.NORESOURCE, f"the list needs {len(out)} bytes, {room} given")
        return out

    def _parts_get(self, m: Member, data: bytes, room: int) -> bytes:
        op = _Op.DEV_PARTS_GET
        head = PartsCmdHead.decode(pad_read(data, PartsCmdHead.SIZE))
        self._parts_object(op, m, head, DevPartsObjType.GET)
        try:
            kind = PartsGetType(head.type)
        except ValueError:
            raise _refuse(op, m.number, _S.EINVAL, _Q.INVALID_FIELD, f"get type {head.type}") from None
        tail = data[PartsCmdHead.SIZE :]
        parts = m.device.mig_parts()
        if kind is PartsGetType.ALL:
            if any(tail):
                raise _refuse(op, m.number, _S.EINVAL, _Q.INVALID_FIELD, "GET ALL takes an empty header list")
            chosen = parts
        else:
            wanted = {h.key() for h in decode_hdrs(tail)}
            chosen = [p for p in parts if p.hdr.key() in wanted]  # already in the mandatory order
        out = encode_parts(chosen)
        if len(out) > room:
            raise _refuse(op, m.number, _S.ENOMEM, _Q.NORESOURCE, f"the parts need {len(out)} bytes, {room} given")
        return out

    def _parts_set(self, m: Member, data: bytes) -> bytes:
        op = _Op.DEV_PARTS_SET
        head = ResourceObjCmdHdr.decode(pad_read(data, ResourceObjCmdHdr.SIZE))
        self._parts_object(op, m, head, DevPartsObjType.SET)
        if m.mode is not MemberMode.STOPPED:
            raise _refuse(op, m.number, _S.EINVAL, _Q.INVALID_COMMAND, "the member is not stopped")
        body = data[ResourceObjCmdHdr.SIZE :]
        if len(body) > MAX_PARTS_DATA:
            raise _refuse(op, m.number, _S.EINVAL, _Q.INVALID_FIELD, f"{len(body)} bytes of parts > {MAX_PARTS_DATA}")
        parts: list[DevPart] = decode_parts(body, max_value=MAX_PARTS_DATA)
        try:
            validated = m.device.mig_validate_parts(parts)
        except DevicePartsError as exc:
            raise _refuse(op, m.number, _S.EINVAL, _Q.INVALID_FIELD, str(exc)) from exc
        m.device.mig_set_parts(validated)
        m.parts_set += 1
        return b""

    def _mode_set(self, m: Member, data: bytes) -> bytes:
        op = _Op.DEV_MODE_SET
        flags = DevModeSetData.decode(pad_read(data, DevModeSetData.SIZE)).flags
        action, new = MODE_TRANSITIONS[(m.mode, bool(flags & DevModeFlags.STOPPED))]
        if action is ModeAction.STOP:
            try:
                m.device.mig_stop(self.stop_timeout)
            except DeviceBusyError as exc:
                raise _refuse(op, m.number, _S.EAGAIN, _Q.TRYAGAIN, str(exc)) from exc
            m.parts_set = 0
        elif action is ModeAction.START:
            m.device.mig_start()
        m.mode = new
        return b""

