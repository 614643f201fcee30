"""The one exception tree of virtio-lm.

Every error virtio-lm raises on purpose derives from :class:`VirtioLmError`.
Errors raised because of something else keep it as ``__cause__``
(``raise X(...) from exc``).  This module imports nothing of ours, so every
layer may use it (``wire`` and ``memory`` included).

::

    VirtioLmError
     +-- WireError                      bytes that do not decode / values that do not encode
     |    +-- ShortBufferError          fewer bytes than the layout needs
     |    +-- TrailingDataError         bytes left over after a fixed-size layout
     |    +-- ReservedFieldError        a reserved field that is not zero
     |    +-- EnumValueError            a value outside the field's enum
     |    +-- FieldValueError           a value out of the field's range / rules
     +-- AddressError (+ ValueError)    an address that does not parse (virtio_lm.addr)
     |    +-- AddressSchemeError        no scheme, or one the caller does not take
     |    +-- AddressHostError          an IPv6 host without [brackets], unbalanced or empty brackets
     |    +-- AddressPortError          a port missing, not decimal digits, outside 0..65535
     |    +-- AddressPathError          unix: / file: without a path
     +-- StrictJsonError (+ ValueError) JSON text refused by wire.strictjson: a duplicate key,
     |                                  NaN / Infinity
     +-- MemoryAccessError              DMA or CPU access outside a memory region
     +-- DmaDisabledError               a device DMA while its bus mastering is off (QUIESCED/FREEZED)
     +-- VirtqueueError                 a driver's ring content the device refuses
     |    +-- DescriptorLoopError       chain revisits a descriptor / too long
     |    +-- DescriptorIndexError      next index >= queue size
     |    +-- DescriptorAddressError    addr+len overflows or leaves memory
     |    +-- ChainLengthError          total chain length > 2**32 - 1
     |    +-- IndirectDescriptorError   nested table, INDIRECT with NEXT, bad table length
     |    +-- DescriptorOrderError      readable descriptor after a writable one
     |    +-- AvailIndexError           avail idx more than queue size ahead
     |    +-- RingAddressError          a ring part the device must access is outside memory
     |    +-- ChainSpaceError           device read/write beyond a chain's readable/writable part
     +-- TransportError                 register access the PCI model refuses
     |    +-- RegisterAccessError       unknown offset, wrong width, read-only, value too wide
     |    +-- StatusTransitionError     device_status write that adds bits out of order
     |    +-- QueueSetupError           queue register write the queue rules refuse
     |    +-- FunctionNumberError       VF number outside 1..NumVFs, SR-IOV enable misuse
     +-- DriverError                    a host-side driver could not do what was asked
     |    +-- DeviceNeedsResetError     the device set NEEDS_RESET or FAILED
     |    +-- FeaturesNotAcceptedError  FEATURES_OK did not stick
     |    |    +-- FeatureMissingError  the device does not offer a feature the driver needs
     |    +-- CommandTimeoutError       a control command was never completed
     |    +-- AllocationError           driver memory allocator full / bad free
     |    +-- QueueFullError            not enough free descriptors for a chain
     |    +-- UsedRingError             the device put something invalid on the used ring
     |    +-- ControlCommandError       the PF acked a control command with VIRTIO_CTRL_ERR
     |    +-- AdminCommandError         an admin command completed with a status other than OK
     |    +-- MigrationArcError         a VFIO-style migration state change the host refuses or
     |                                  could not complete (drivers/vfio.py)
     |    +-- BlkIOError                a virtio-blk request completed with status IOERR / UNSUPP
     |    +-- BlkDataError              blocks read back through a virtio-blk device, or found in its
     |                                  image, differ from what was written (a bench's data check)
     +-- StateTransitionError           SET_STATE the VF state machine refuses (ack ERR)
     |    +-- StalePlanError            a planned transition applied after the state moved on
     +-- TrackingError                  dirty page tracking set-up or report refused
     |    +-- MapTableError             push map segment outside host memory / overlapping / none
     |    +-- DirtyReportError          a dirty report marking pages past the VM's memory
     |    +-- PlatformTrackingError     an IOMMU-style dirty bitmap request the platform refuses
     +-- CommandRefusedError            the PF refuses a control command (it acks ERR)
     +-- AdminCommandRefusedError       the PF refuses an admin command (virtio 1.4: status + qualifier)
     +-- DevicePartsError               device parts (virtio 1.4) the member device refuses
     +-- StateImageError                a restored state image whose content the device refuses
     +-- GuestStateError                a guest driver state document (JSON) refused; names the field path
     +-- DeviceBusyError                back-end I/O did not settle in time (FREEZE)
     +-- MigrationError                 a live migration that cannot go on (the source rolls back
          |                             before commit; see migration/session.py)
          +-- StreamError               migration stream bytes refused (names section and offset)
          |    +-- StreamChecksumError  a section whose CRC-32 does not match
          |    +-- StreamTruncatedError the stream ended inside a section / before COMPLETE
          |    +-- SectionTooLargeError a section length above its type's maximum
          |    +-- UnexpectedSectionError  unknown type, wrong direction, wrong order / sequence
          |    +-- StreamVersionError   not a virtio-lm stream (magic) or a version we do not know
          +-- ConfigMismatchError       the destination cannot take this VM (memory, VFs, features)
          +-- DestinationError          the destination reported ERROR (code, text)
          +-- PeerGoneError             the other side vanished: EOF, reset, timeout
          +-- MigrationCancelledError   migrate_cancel (or the source's ABORT, seen by the destination)
          +-- NotConvergingError        max rounds / max time reached without converging
          +-- MigrationStateError       a call the session's status does not allow (e.g. start twice)
          +-- LeaseLostError            the VM's lease is held by another host: this one must not run it
     +-- MonitorError                   the QMP monitor (host/qmp/)
          +-- QmpError                  a command failed: becomes {"error": {"class", "desc"}}
          +-- QmpLimitError             client input/output past a bound; the client is disconnected
          +-- CommandRegistrationError  a bad command name / argument schema at register() time
          +-- MonitorAddressError       a listen address that does not parse or cannot be bound
     +-- BackendError                   a network back-end failed (socket, TAP)
     |    +-- BackendUnavailableError   the back-end cannot be used on this system (no /dev/net/tun, no CAP_NET_ADMIN)
     +-- VhostUserError                 a vhost-user front-end's message the back-end refuses
          |                             (the connection is closed; the server keeps listening)
          +-- VhostMessageError         malformed: bad header / flags / version, unknown request,
          |                             payload size wrong for the request, wrong number of fds
          +-- VhostMemoryError          memory table refused: overlapping regions, a region past
          |                             its fd's size or wrapping, too many regions, mmap failed
          +-- VhostRingError            vring set-up refused: index out of range, bad size,
          |                             a ring address outside every region, ring running
          +-- VhostLogError             dirty log refused: no fd, size/offset past the fd

Later layers add their own subtrees (control commands, device state images,
migration) under :class:`VirtioLmError` and draw them here.
"""

from __future__ import annotations


class VirtioLmError(Exception):
    """Base of every error virtio-lm raises on purpose."""


# --------------------------------------------------------------------------- addresses
class AddressError(VirtioLmError, ValueError):
    """An address (``tcp:HOST:PORT``, ``unix:PATH``, ``file:PATH``, ``HOST:PORT``) that does
    not parse.  Also a ``ValueError``: callers that took the older parsers' ``ValueError``
    keep working.  ``spec`` is what was given."""

    def __init__(self, spec: object, message: str) -> None:
        self.spec = spec
        super().__init__(f"{spec!r}: {message}")


class AddressSchemeError(AddressError):
    """No scheme, or a scheme the caller does not take (e.g. ``file:`` for a monitor)."""


class AddressHostError(AddressError):
    """An IPv6 host without ``[brackets]``, or brackets unbalanced / empty."""


class AddressPortError(AddressError):
    """A port missing, not decimal digits, or outside 0..65535."""


class AddressPathError(AddressError):
    """``unix:`` or ``file:`` without a path."""


# --------------------------------------------------------------------------- strict JSON
class StrictJsonError(VirtioLmError, ValueError):
    """JSON text that parses under Python's lenient rules but not under RFC 8259's
    interoperable ones: a duplicate object key, or ``NaN`` / ``Infinity``.  Also a
    ``ValueError`` (what ``json.loads`` raises for malformed text)."""


# --------------------------------------------------------------------------- wire
class WireError(VirtioLmError):
    """Bytes that do not decode, or values that do not encode.

    ``layout`` names the structure, ``field`` the field (or ``None``).
    """

    def __init__(self, layout: str, field: str | None, message: str) -> None:
        self.layout = layout
        self.field = field
        where = f"{layout}.{field}" if field else layout
        super().__init__(f"{where}: {message}")


class ShortBufferError(WireError):
    def __init__(self, layout: str, field: str | None, needed: int, got: int) -> None:
        self.needed = needed
        self.got = got
        super().__init__(layout, field, f"needs {needed} bytes, got {got}")


class TrailingDataError(WireError):
    def __init__(self, layout: str, expected: int, got: int) -> None:
        self.expected = expected
        self.got = got
        super().__init__(layout, None, f"fixed size {expected} bytes, got {got} ({got - expected} trailing)")


class ReservedFieldError(WireError):
    def __init__(self, layout: str, field: str, value: int) -> None:
        self.value = value
        super().__init__(layout, field, f"reserved field must be 0, got {value:#x}")


class EnumValueError(WireError):
    def __init__(self, layout: str, field: str, value: int, allowed: object) -> None:
        self.value = value
        self.allowed = allowed
        super().__init__(layout, field, f"value {value} is not one of {allowed}")


class FieldValueError(WireError):
    def __init__(self, layout: str, field: str | None, value: object, rule: str) -> None:
        self.value = value
        self.rule = rule
        super().__init__(layout, field, f"value {value!r} breaks rule: {rule}")


# --------------------------------------------------------------------------- memory
class MemoryAccessError(VirtioLmError):
    """An access outside a memory region, or whose address + length overflows."""

    def __init__(self, region: str, addr: int, length: int, size: int) -> None:
        self.region = region
        self.addr = addr
        self.length = length
        self.size = size
        super().__init__(
            f"{region}: access [{addr:#x}, +{length:#x}) outside memory of size {size:#x}"
        )


class DmaDisabledError(VirtioLmError):
    """A device tried to master a transaction (DMA) while it may not.

    A VF in QUIESCED or FREEZED masters no transaction; its memory port has
    bus mastering off and refuses every access.  Seeing this error means a
    device model broke the contract.
    """

    def __init__(self, port: str, op: str, addr: int, length: int) -> None:
        self.port = port
        self.op = op
        self.addr = addr
        self.length = length
        super().__init__(f"{port}: DMA {op} of {length} bytes at {addr:#x} with bus mastering off")


# --------------------------------------------------------------------------- virtqueue
class VirtqueueError(VirtioLmError):
    """Ring content written by a driver that the device refuses.

    The device side catches these, sets NEEDS_RESET and stops the queue; they
    never escape into a device's processing loop.
    """

    def __init__(self, queue: str, message: str) -> None:
        self.queue = queue
        super().__init__(f"{queue}: {message}")


class DescriptorLoopError(VirtqueueError):
    pass


class DescriptorIndexError(VirtqueueError):
    pass


class DescriptorAddressError(VirtqueueError):
    pass


class ChainLengthError(VirtqueueError):
    pass


class IndirectDescriptorError(VirtqueueError):
    pass


class DescriptorOrderError(VirtqueueError):
    pass


class AvailIndexError(VirtqueueError):
    pass


class RingAddressError(VirtqueueError):
    """A ring part (descriptor table, avail or used ring) the device must access is outside memory."""


class ChainSpaceError(VirtqueueError):
    """A device read or write beyond the readable / writable part of a chain."""


# --------------------------------------------------------------------------- transport
class TransportError(VirtioLmError):
    """A register access or transport operation the PCI function model refuses."""


class RegisterAccessError(TransportError):
    """An access to an unknown offset, at the wrong width, to a read-only
    register, or with a value wider than the register."""


class StatusTransitionError(TransportError):
    """A device_status write that clears bits or adds them out of order."""


class QueueSetupError(TransportError):
    """A queue register write the queue rules refuse (bad size, enabled queue,
    invalid ring addresses, queue_enable=0, non-existent queue)."""


class FunctionNumberError(TransportError):
    """A VF number outside 1..NumVFs, or an SR-IOV enable/disable misuse."""


# --------------------------------------------------------------------------- drivers
class DriverError(VirtioLmError):
    """A host-side or guest-side driver could not complete what was asked."""


class DeviceNeedsResetError(DriverError):
    """The device reported NEEDS_RESET or FAILED in its status."""


class FeaturesNotAcceptedError(DriverError):
    """The device did not keep FEATURES_OK after the driver wrote its features."""


class FeatureMissingError(FeaturesNotAcceptedError):
    """The device does not offer a feature the driver cannot work without (the driver sets FAILED)."""


class CommandTimeoutError(DriverError):
    """A command placed on a queue was not completed in time."""


class AllocationError(DriverError):
    """A driver's memory allocator has no free range big enough, or was asked to free a bad address."""


class QueueFullError(DriverError):
    """Not enough free descriptors on a driver queue for the chain asked for."""


class UsedRingError(DriverError):
    """The device put something invalid on the used ring (bad head id, idx too far ahead)."""


# --------------------------------------------------------------------------- VF state machine
class StateTransitionError(VirtioLmError):
    """A SET_STATE the VF state machine refuses (the PF acks ERR); the state is unchanged.

    ``state`` is the VF's current state, ``requested`` the state asked for
    (both :class:`virtio_lm.wire.ctrl.VfState` values).
    """

    def __init__(self, state: object, requested: object, message: str | None = None) -> None:
        self.state = state
        self.requested = requested
        super().__init__(message or f"VF state {_name(state)} -> {_name(requested)} is not allowed")


class StalePlanError(StateTransitionError):
    """A planned transition applied after the VF's state moved on (an FLR or another
    transition came between plan and apply); nothing was changed."""


# --------------------------------------------------------------------------- dirty tracking
class TrackingError(VirtioLmError):
    """Dirty page tracking that cannot be set up, or a dirty report that cannot be used."""


class MapTableError(TrackingError):
    """A push-mode map table the device refuses: no segment, a segment outside the
    PF driver's memory, or segments that overlap."""


class DirtyReportError(TrackingError):
    """A dirty report (bitmap / bytemap) marking a page past the memory it describes."""


class PlatformTrackingError(TrackingError):
    """A request to the platform's (IOMMU-style) dirty tracker it refuses: a range not
    page aligned or outside the domain, reading a bitmap while tracking is off."""


def _name(v: object) -> str:
    return getattr(v, "name", None) or repr(v)


# --------------------------------------------------------------------------- PF control path
class CommandRefusedError(VirtioLmError):
    """The PF refuses a control command; the dispatcher acks it VIRTIO_CTRL_ERR.

    ``command`` names the command, ``func_id`` the VF (or None), ``state``
    the VF's state when refused (or None), ``reason`` why.
    """

    def __init__(self, command: str, func_id: int | None, state: object, reason: str) -> None:
        self.command = command
        self.func_id = func_id
        self.state = state
        self.reason = reason
        where = f" VF {func_id}" if func_id is not None else ""
        st = f" in state {getattr(state, 'name', state)}" if state is not None else ""
        super().__init__(f"{command}{where}{st}: {reason}")


class StateImageError(VirtioLmError):
    """A saved device state whose content the restoring device refuses.

    ``record`` names the record (e.g. ``"queue[1]"``), ``reason`` the rule.
    """

    def __init__(self, record: str, reason: str) -> None:
        self.record = record
        self.reason = reason
        super().__init__(f"state image {record}: {reason}")


class AdminCommandRefusedError(VirtioLmError):
    """The owner device refuses a group administration command (virtio 1.4).

    ``opcode`` the command, ``member`` the group member id (or None),
    ``status`` and ``qualifier`` what goes on the wire (ints of
    ``wire.admin.AdminStatus`` / ``AdminQualifier``), ``reason`` why.
    """

    def __init__(self, opcode: int, member: int | None, status: int, qualifier: int, reason: str) -> None:
        self.opcode = opcode
        self.member = member
        self.status = status
        self.qualifier = qualifier
        self.reason = reason
        where = f" member {member}" if member is not None else ""
        super().__init__(f"admin opcode {opcode:#x}{where}: status {status}/{qualifier}: {reason}")


class DevicePartsError(VirtioLmError):
    """Device parts (virtio 1.4) that a member device refuses to take.

    ``part`` names the part (e.g. ``"VQ_CFG[1]"``), ``reason`` the rule.
    """

    def __init__(self, part: str, reason: str) -> None:
        self.part = part
        self.reason = reason
        super().__init__(f"device part {part}: {reason}")


class GuestStateError(VirtioLmError):
    """A guest driver's migrated state (the JSON document of :mod:`virtio_lm.vm.guest_state`)
    that does not decode, or a state that cannot be encoded.

    ``path`` names the offending field (e.g. ``"blk.queues.0.free[3]"``;
    ``"<document>"`` for the document as a whole), ``reason`` the rule it breaks.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"guest state {path}: {reason}")


class DeviceBusyError(VirtioLmError):
    """Back-end I/O did not settle within the time allowed (a FREEZE that cannot complete)."""


class ControlCommandError(DriverError):
    """The PF acked a control command with VIRTIO_CTRL_ERR.

    ``command`` is the command's name, ``func_id`` the VF, ``state`` the VF's
    state as the driver read it back after the error (None if unknown).
    """

    def __init__(self, command: str, func_id: int | None, state: object, detail: str = "") -> None:
        self.command = command
        self.func_id = func_id
        self.state = state
        where = f" for VF {func_id}" if func_id is not None else ""
        st = f" (VF state {getattr(state, 'name', state)})" if state is not None else ""
        extra = f": {detail}" if detail else ""
        super().__init__(f"{command}{where} failed with VIRTIO_CTRL_ERR{st}{extra}")


class AdminCommandError(DriverError):
    """An admin command (virtio 1.4) completed with a status other than OK.

    ``opcode``, ``member``, ``status`` and ``qualifier`` as read from the
    used buffer.
    """

    def __init__(self, opcode: int, member: int | None, status: int, qualifier: int, detail: str = "") -> None:
        self.opcode = opcode
        self.member = member
        self.status = status
        self.qualifier = qualifier
        where = f" for member {member}" if member is not None else ""
        extra = f": {detail}" if detail else ""
        super().__init__(f"admin opcode {opcode:#x}{where} failed: status {status}, qualifier {qualifier}{extra}")


class MigrationArcError(DriverError):
    """A VFIO migration v2 state change (drivers/vfio.py) the host's state machine refuses
    -- no path (a blocked transition, the ERROR state, ERROR requested), VFs in different
    states, the data a RESUMING -> STOP arc loads missing -- or one an arc's commands failed
    in (then ``__cause__`` is the driver's error).  ``vfs`` the VFs, ``state`` and
    ``requested`` the state names."""

    def __init__(self, vfs: object, state: str, requested: str, reason: str) -> None:
        self.vfs = vfs
        self.state = state
        self.requested = requested
        self.reason = reason
        super().__init__(f"VFs {vfs}: {state} -> {requested}: {reason}")


# --------------------------------------------------------------------------- network back-ends
class BackendError(VirtioLmError):
    """A network back-end (UDP switch port, TAP) failed."""


class BackendUnavailableError(BackendError):
    """The back-end cannot be used here (no /dev/net/tun, no CAP_NET_ADMIN, ...); ``reason`` says why."""

    def __init__(self, backend: str, reason: str) -> None:
        self.backend = backend
        self.reason = reason
        super().__init__(f"{backend} back-end unavailable: {reason}")


# --------------------------------------------------------------------------- vhost-user
class VhostUserError(VirtioLmError):
    """A vhost-user message the back-end refuses; the connection that sent it is closed."""


class VhostMessageError(VhostUserError):
    """A malformed message: header, flags, version, unknown request, payload size or fd count."""


class VhostMemoryError(VhostUserError):
    """A memory table / region the back-end refuses (overlap, past the fd's size, mmap failure)."""


class VhostRingError(VhostUserError):
    """A vring set-up the back-end refuses (index, size, an address outside every region)."""


class VhostLogError(VhostUserError):
    """A dirty log (SET_LOG_BASE) the back-end refuses."""


class VhostInflightError(VhostUserError):
    """An inflight region (GET_INFLIGHT_FD / SET_INFLIGHT_FD) the back-end refuses: sizes that
    do not fit, a region whose content (kept by the front-end across a back-end restart, so
    untrusted) is not a state this back-end could have written."""


# --------------------------------------------------------------------------- vfio-user
class VfioUserError(VirtioLmError):
    """A vfio-user message the server refuses; the connection that sent it is closed."""


class VfioUserMessageError(VfioUserError):
    """A malformed message: header, type, size, payload shape, fds where none belong, order."""


class VfioUserRequestError(VirtioLmError):
    """A well-formed vfio-user request the device refuses: answered with an error reply
    carrying ``errno``; the connection stays up."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno


class BlkIOError(DriverError):
    """A virtio-blk request completed with a status other than OK.

    ``status`` is the status byte the device wrote (a
    :class:`virtio_lm.wire.blk.BlkStatus` value when known, else the raw int;
    ``None`` when the device returned the chain without writing one),
    ``type`` the request type and ``sector`` its first sector.
    """

    def __init__(self, status: object, type: object, sector: int, detail: str = "") -> None:
        self.status = status
        self.type = type
        self.sector = sector
        st = getattr(status, "name", status)
        kind = getattr(type, "name", type)
        extra = f": {detail}" if detail else ""
        super().__init__(f"virtio-blk {kind} at sector {sector} completed with status {st}{extra}")


class BlkDataError(DriverError):
    """Blocks read back through a virtio-blk device, or found in its image file, are not the
    bytes written through it (:func:`virtio_lm.benches.vhost_blk.check_data`)."""


# --------------------------------------------------------------------------- QMP monitor
class MonitorError(VirtioLmError):
    """Base of the QMP monitor's errors (:mod:`virtio_lm.host.qmp`)."""


#: The error classes QEMU's QMP uses (qapi ``QapiErrorClass``).
QMP_ERROR_CLASSES = frozenset(
    {"GenericError", "CommandNotFound", "DeviceNotActive", "DeviceNotFound", "KVMMissingCap"}
)


class QmpError(MonitorError):
    """A QMP command failed.  The monitor answers ``{"error": {"class": error_class,
    "desc": desc}}`` (with the request's ``id``).  Command handlers raise it."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        if error_class not in QMP_ERROR_CLASSES:
            raise ValueError(f"unknown QMP error class {error_class!r}")
        self.desc = desc
        self.error_class = error_class
        super().__init__(f"{error_class}: {desc}")


class QmpLimitError(MonitorError):
    """A client went past one of the monitor's bounds (message size, nesting depth,
    unsent output); the monitor answers an error, if it still can, and disconnects it.

    ``limit`` names the bound, ``value`` what the client reached, ``maximum`` the bound.
    """

    def __init__(self, limit: str, value: int, maximum: int) -> None:
        self.limit = limit
        self.value = value
        self.maximum = maximum
        super().__init__(f"{limit} limit exceeded: {value} > {maximum}")


class CommandRegistrationError(MonitorError):
    """A command registered twice, with a bad name, or with an argument schema that
    does not parse."""


class MonitorAddressError(MonitorError):
    """A monitor address that does not parse (``unix:PATH`` / ``tcp:HOST:PORT``) or
    that cannot be listened on."""


# --------------------------------------------------------------------------- migration
class MigrationError(VirtioLmError):
    """A live migration that cannot go on.  Before the source commits, the
    source session rolls back on any of these: the VM runs on where it was."""


class StreamError(MigrationError):
    """Migration stream bytes that do not decode.

    ``section`` names the section (type name, or ``None`` when the header
    itself is bad), ``offset`` is the stream offset of the section's first
    byte (or of the bad byte when no section could be framed).
    """

    def __init__(self, message: str, *, section: str | None = None, offset: int | None = None) -> None:
        self.section = section
        self.offset = offset
        where = []
        if section is not None:
            where.append(f"section {section}")
        if offset is not None:
            where.append(f"offset {offset}")
        prefix = f"stream {' at '.join(where)}: " if where else "stream: "
        self.detail = message
        super().__init__(prefix + message)


class StreamChecksumError(StreamError):
    """A section whose CRC-32 (over header and payload) does not match."""


class StreamTruncatedError(StreamError):
    """The stream ended inside a section, or before the section that ends it."""


class SectionTooLargeError(StreamError):
    """A section header announcing more payload than its type may carry."""


class UnexpectedSectionError(StreamError):
    """An unknown section type, one for the other direction, or one out of order / sequence."""


class StreamVersionError(StreamError):
    """Not a virtio-lm migration stream (bad magic), or a stream version we do not know."""


class ConfigMismatchError(MigrationError):
    """The destination cannot take this VM; ``reason`` says what differs."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"configuration mismatch: {reason}")


class DestinationError(MigrationError):
    """The destination reported an ERROR message (``code``, ``text``)."""

    def __init__(self, code: object, text: str) -> None:
        self.code = code
        self.text = text
        super().__init__(f"destination error {getattr(code, 'name', code)}: {text}")


class PeerGoneError(MigrationError):
    """The other side of the migration vanished (EOF, connection reset, timeout)."""


class MigrationCancelledError(MigrationError):
    """The migration was cancelled (migrate_cancel, or the source's ABORT on the destination)."""


class NotConvergingError(MigrationError):
    """The pre-copy reached its round / time bound without converging, even throttled."""


class MigrationStateError(MigrationError):
    """A call the migration session's current status does not allow."""


class LeaseLostError(MigrationError):
    """The VM's lease (migration/lease.py) is held by another host: this one must not run
    the VM (a destination that would start, a source that would resume)."""
