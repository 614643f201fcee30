"""The PF's own virtio device: a management virtio-blk device with the proposal's control queue.

The proposal puts the migration commands on a device's control queue:
for virtio-blk, VIRTIO_BLK_F_CTRL_VQ (bit 15, needs VIRTIO_BLK_F_MQ) adds a
control queue at index ``num_queues``.  virtio-lm's PF is such a device:

* queue 0, a virtio-blk request queue of a disk with capacity 0 (a
  management-only PF: IN/OUT/DISCARD/WRITE_ZEROES are beyond capacity ->
  IOERR, FLUSH -> OK, GET_ID -> the PF's serial, anything else -> UNSUPP);
* queue 1 = ``num_queues``, the control queue, speaking the generic v1
  format to :class:`~virtio_lm.ctrl.dispatch.ControlDispatcher`, which routes
  class 128 to :class:`~virtio_lm.pf.controller.VfMigrationController`.

Features offered: VERSION_1, EVENT_IDX, INDIRECT_DESC, VIRTIO_BLK_F_MQ,
VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_CTRL_VQ, VIRTIO_F_GENERIC_CTRL_VQ_VER_1 (39),
VIRTIO_F_VF_MIGRATION (40); the SR-IOV PF transport adds VIRTIO_F_SR_IOV
(37).  FEATURES_OK is refused when the driver's set breaks a rule:
VF_MIGRATION needs SR_IOV, GENERIC_CTRL_VQ_VER_1 and a control queue
(BLK_F_CTRL_VQ); BLK_F_CTRL_VQ needs BLK_F_MQ.

Control buffers are processed in order on a thread of their own, so a slow
command (a FREEZE waiting for a VF's back-end I/O) holds up the control
queue only -- never a VF's data path, nor the PF's request queue.

Profiles
--------
One PF speaks one profile, chosen when it is built (``build_pf(profile=)``):

* ``Profile.SEED`` -- the proposal's control queue, as above;
* ``Profile.VIRTIO_1_4`` -- the standard's way: no bit 39 / 40 and no
  VIRTIO_BLK_F_CTRL_VQ on the PF, and bits 39 / 40 withheld from every VF
  (virtio 1.4 gives them other meanings); the PF offers VIRTIO_F_ADMIN_VQ
  (41) instead, reports ``num_queues`` 1 and one administration virtqueue at
  ``admin_queue_index`` 1 (``admin_queue_num`` 1), whose buffers go to
  :class:`~virtio_lm.pf.admin.AdminHandler` on the same worker thread.
  Buffers on that queue while VIRTIO_F_ADMIN_VQ is not negotiated complete
  with EINVAL / INVALID_COMMAND and do nothing.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass

from virtio_lm.errors import VirtioLmError, WireError
from virtio_lm.memory import MemoryPort
from virtio_lm.memory.iommu import IommuDirtyDomain
from virtio_lm.pci.device import VirtioDevice
from virtio_lm.pci.function import VirtioPciFunction
from virtio_lm.pci.sriov import SriovPF
from virtio_lm.ctrl.dispatch import ControlDispatcher
from virtio_lm.pf.admin import AdminHandler
from virtio_lm.pf.controller import ALL_MODES, VfMigrationController, VfStatus
from virtio_lm.virtqueue.device import DescriptorChain
from virtio_lm.wire.blk import (
    BLK_REQUIREMENTS,
    OUTHDR_SIZE,
    BlkConfig,
    BlkFeature,
    BlkOutHdr,
    BlkReqType,
    BlkStatus,
    ctrl_queue_index,
    encode_blk_id,
)
from virtio_lm.wire.ctrl import TrackModeCaps
from virtio_lm.wire.features import REQUIREMENTS, DeviceId, Feature, ProposalFeature, bit, unmet_requirements
from virtio_lm.wire.admin import AdminQualifier, AdminStatus, encode_status, truncate_written
from virtio_lm.wire.state import MAX_IMAGE_SIZE
from virtio_lm.pf.admin import MAX_PARTS_DATA

NUM_REQUEST_QUEUES = 1
REQUEST_QUEUE = 0
CTRL_QUEUE = ctrl_queue_index(NUM_REQUEST_QUEUES)
MAX_CTRL_READABLE = MAX_IMAGE_SIZE + 64  # a RESTORE portion of a whole image, plus headers
MAX_ADMIN_READABLE = MAX_PARTS_DATA + 64  # a DEV_PARTS_SET of the largest parts, plus headers
ADMIN_QUEUE = NUM_REQUEST_QUEUES  # the 1.4 profile's admin queue follows the request queue


class Profile(str, enum.Enum):
    """The migration control plane a PF speaks."""

    SEED = "seed"
    VIRTIO_1_4 = "virtio-1.4"


PF_FEATURES = (
    bit(Feature.VERSION_1)
    | bit(Feature.EVENT_IDX)
    | bit(Feature.INDIRECT_DESC)
    | bit(BlkFeature.MQ)
    | bit(BlkFeature.FLUSH)
    | bit(BlkFeature.CTRL_VQ)
    | bit(ProposalFeature.GENERIC_CTRL_VQ_VER_1)
    | bit(ProposalFeature.VF_MIGRATION)
)
#: the virtio-1.4 profile's PF: no proposal bits, no blk control queue; an admin queue
PF_FEATURES_1_4 = (
    bit(Feature.VERSION_1)
    | bit(Feature.EVENT_IDX)
    | bit(Feature.INDIRECT_DESC)
    | bit(BlkFeature.MQ)
    | bit(BlkFeature.FLUSH)
    | bit(Feature.ADMIN_VQ)
)
#: what a virtio-1.4 PF withholds from its VFs: the bits 1.4 gives other meanings
VF_WITHHELD_1_4 = bit(ProposalFeature.GENERIC_CTRL_VQ_VER_1) | bit(ProposalFeature.VF_MIGRATION)


class PfDevice(VirtioDevice):
    """The PF's device model; see the module docstring."""

    device_id = DeviceId.BLOCK
    num_queues = NUM_REQUEST_QUEUES + 1
    queue_max_size = 256

    def __init__(self, *, serial: str = "virtio-lm-pf", threaded: bool = True, profile: Profile = Profile.SEED) -> None:
        super().__init__()
        self.profile = Profile(profile)
        if self.profile is Profile.VIRTIO_1_4:
            self.num_queues = NUM_REQUEST_QUEUES
            self.admin_queues = 1
        self.serial = serial
        self.threaded = threaded
        self.controller: VfMigrationController | None = None
        self.dispatcher: ControlDispatcher | None = None
        self.admin: AdminHandler | None = None
        self._config = BlkConfig(capacity=0, num_queues=NUM_REQUEST_QUEUES).encode()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._ctrl_lock = threading.Lock()
        self.ctrl_processed = 0

    def attach(self, controller: VfMigrationController) -> None:
        if self.profile is not Profile.SEED:
            raise VirtioLmError(f"a {self.profile.value} PF has no proposal control queue")
        self.controller = controller
        fn = self.fn
        self.dispatcher = ControlDispatcher(negotiated=lambda: fn.negotiated, migration=controller)

    def attach_admin(self, handler: AdminHandler) -> None:
        if self.profile is not Profile.VIRTIO_1_4:
            raise VirtioLmError(f"a {self.profile.value} PF has no admin queue")
        self.admin = handler

    @property
    def fn(self) -> VirtioPciFunction:
        if self.function is None:
            raise VirtioLmError("PfDevice is not bound to a function")
        return self.function

    # ------------------------------------------------------------------ features / config
    def offered_features(self) -> int:
        return PF_FEATURES_1_4 if self.profile is Profile.VIRTIO_1_4 else PF_FEATURES

    def validate_features(self, features: int) -> str | None:
        problems = unmet_requirements(features, REQUIREMENTS, BLK_REQUIREMENTS, device_bits=BlkFeature)
        if features & bit(ProposalFeature.VF_MIGRATION) and not features & bit(BlkFeature.CTRL_VQ):
            problems.append("VIRTIO_F_VF_MIGRATION requires a control queue (VIRTIO_BLK_F_CTRL_VQ)")
        return "; ".join(problems) or None

    @property
    def config_size(self) -> int:
        return len(self._config)

    def config_read(self, offset: int, length: int) -> bytes:
        return self._config[offset : offset + length]

    # ------------------------------------------------------------------ lifecycle
    def activate(self, fn: VirtioPciFunction) -> None:
        if self.threaded and self._worker is None:
            self._stop.clear()
            self._worker = threading.Thread(target=self._ctrl_loop, name=f"{fn.name}-ctrlq", daemon=True)
            self._worker.start()

    def reset(self) -> None:
        self._stop_worker()
        if self.controller is not None:
            self.controller.reset()
        if self.admin is not None:
            self.admin.reset()

    def close(self) -> None:
        self._stop_worker()

    def _stop_worker(self) -> None:
        w = self._worker
        if w is not None:
            self._stop.set()
            self._wake.set()
            if w is not threading.current_thread():
                w.join(timeout=30)
            self._worker = None

    def queue_notify(self, fn: VirtioPciFunction, queue: int) -> None:
        if queue == CTRL_QUEUE:
            if self.threaded:
                self._wake.set()
            else:
                self.process_control_queue()
        elif queue == REQUEST_QUEUE:
            self._serve_requests()

    # ------------------------------------------------------------------ control queue
    def _ctrl_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                return
            self.process_control_queue()

    def process_control_queue(self) -> int:
        """Process every available control buffer, in order; returns how many."""
        fn = self.fn
        vq = fn.queues[CTRL_QUEUE]
        n = 0
        with self._ctrl_lock:
            while (chain := vq.pop(fn.port)) is not None:
                self._control(chain)
                n += 1
                vq.notify_driver(fn.port)
        self.ctrl_processed += n
        return n

    def _control(self, chain: DescriptorChain) -> None:
        if self.profile is Profile.VIRTIO_1_4:
            self._admin(chain)
            return
        fn = self.fn
        assert self.dispatcher is not None, "PfDevice.attach() was not called"
        if chain.readable_len > MAX_CTRL_READABLE:
            outcome = self.dispatcher.handle(b"", chain.writable_len)  # ERR: no class/command
        else:
            outcome = self.dispatcher.handle(chain.read(fn.port), chain.writable_len)
        written = chain.write(fn.port, outcome.written) if outcome.written else 0
        fn.queues[CTRL_QUEUE].push(fn.port, chain.head, written)

    def _admin(self, chain: DescriptorChain) -> None:
        fn = self.fn
        assert self.admin is not None, "PfDevice.attach_admin() was not called"
        room = chain.writable_len
        if not fn.negotiated & bit(Feature.ADMIN_VQ):
            out = truncate_written(encode_status(AdminStatus.EINVAL, AdminQualifier.INVALID_COMMAND), room)
        elif chain.readable_len > MAX_ADMIN_READABLE:
            out = truncate_written(encode_status(AdminStatus.EINVAL, AdminQualifier.INVALID_COMMAND), room)
        else:
            out = self.admin.handle(chain.read(fn.port), room)
        written = chain.write(fn.port, out) if out else 0
        fn.queues[ADMIN_QUEUE].push(fn.port, chain.head, written)

    # ------------------------------------------------------------------ request queue (capacity 0)
    def _serve_requests(self) -> None:
        fn = self.fn
        vq = fn.queues[REQUEST_QUEUE]
        while (chain := vq.pop(fn.port)) is not None:
            if chain.writable_len < 1:
                vq.push(fn.port, chain.head, 0)  # nowhere to put a status
                continue
            payload = b""
            try:
                hdr = BlkOutHdr.decode(chain.read_range(fn.port, 0, OUTHDR_SIZE))
            except (WireError, VirtioLmError):
                status = BlkStatus.UNSUPP if chain.readable_len >= OUTHDR_SIZE else BlkStatus.IOERR
            else:
                if hdr.type is BlkReqType.FLUSH:
                    status = BlkStatus.OK
                elif hdr.type is BlkReqType.GET_ID:
                    payload, status = encode_blk_id(self.serial), BlkStatus.OK
                elif hdr.type in (BlkReqType.IN, BlkReqType.OUT, BlkReqType.DISCARD, BlkReqType.WRITE_ZEROES):
                    status = BlkStatus.IOERR  # every sector is beyond capacity 0
                else:
                    status = BlkStatus.UNSUPP
            room = chain.writable_len - 1  # the status byte is the last writable byte
            payload = payload[:room]
            if payload:
                chain.write(fn.port, payload)
            chain.write(fn.port, bytes([status]), room)
            vq.push(fn.port, chain.head, len(payload) + 1)
        vq.notify_driver(fn.port)


def build_pf(
    port: MemoryPort,
    *,
    total_vfs: int = 8,
    name: str = "pf0",
    modes: TrackModeCaps = ALL_MODES,
    log_max_pull_bitmap: int = 24,
    log_max_pull_bytemap: int = 24,
    freeze_timeout: float = 10.0,
    threaded: bool = True,
    profile: Profile | str = Profile.SEED,
    lists_before_vf_enable: bool = False,
) -> SriovPF:
    """A PF function with its device and its profile's control plane wired together.

    ``profile`` ``"seed"`` (the proposal's control queue and
    :class:`VfMigrationController`; ``modes``, ``log_max_*`` and
    ``freeze_timeout`` apply) or ``"virtio-1.4"`` (the admin queue and
    :class:`AdminHandler`; ``freeze_timeout`` bounds DEV_MODE_SET's stop;
    ``lists_before_vf_enable`` answers the SR-IOV group's LIST_QUERY / LIST_USE
    while VF Enable is clear, as Linux 6.12 expects at probe)."""
    prof = Profile(profile)
    dev = PfDevice(threaded=threaded, profile=prof)
    if prof is Profile.VIRTIO_1_4:
        pf = SriovPF(dev, port, name=name, total_vfs=total_vfs, vf_withheld_features=VF_WITHHELD_1_4)
        dev.attach_admin(AdminHandler(pf, stop_timeout=freeze_timeout, lists_before_vf_enable=lists_before_vf_enable))
        return pf
    pf = SriovPF(dev, port, name=name, total_vfs=total_vfs)
    dev.attach(
        VfMigrationController(
            pf,
            modes=modes,
            log_max_pull_bitmap=log_max_pull_bitmap,
            log_max_pull_bytemap=log_max_pull_bytemap,
            freeze_timeout=freeze_timeout,
        )
    )
    return pf


def _pf_device(pf: SriovPF) -> PfDevice:
    dev = pf.device
    if not isinstance(dev, PfDevice) or dev.controller is None:
        raise VirtioLmError(f"{pf.name} was not built by build_pf (no VF migration controller)")
    return dev


def vf_status(pf: SriovPF, func_id: int) -> VfStatus:
    """VF ``func_id``'s migration state and tracking, as a monitor shows it (refused with
    :class:`~virtio_lm.errors.CommandRefusedError` for a number that is not a VF)."""
    return _pf_device(pf).controller.status(func_id)  # type: ignore[union-attr]


def vf_commands(pf: SriovPF) -> VfMigrationController:
    """The class-128 command handlers of ``pf``, called in-process without the control queue
    (``net.testbed.NetVm.controller``, for tests that drive a VF's state directly; a
    migration goes through the PF driver and the queue)."""
    return _pf_device(pf).controller  # type: ignore[return-value]


@dataclass(frozen=True)
class VfMonitorStatus:
    """What a monitor shows of one VF, whatever the PF's profile: the device-side state (the
    proposal's VF state, or virtio 1.4's member mode), the dirty tracking VF DMA goes
    through (the device's mode, ``"iommu"`` for the platform's, None), marks and overflows."""

    profile: str
    state: str
    tracking: str | None
    tracked_marks: int
    overflow_events: int


def pf_profile(pf: SriovPF) -> Profile:
    dev = pf.device
    if not isinstance(dev, PfDevice):
        raise VirtioLmError(f"{pf.name} was not built by build_pf")
    return dev.profile


def vf_monitor_status(pf: SriovPF, func_id: int) -> VfMonitorStatus:
    """VF ``func_id`` as a monitor shows it (both profiles)."""
    dev = pf.device
    if isinstance(dev, PfDevice) and dev.admin is not None:
        member = dev.admin.member(func_id)
        platform = pf.vf(func_id).port.writer.platform
        tracking = "iommu" if isinstance(platform, IommuDirtyDomain) and platform.tracking else None
        return VfMonitorStatus(dev.profile.value, member.mode.name, tracking, 0, 0)
    st = vf_status(pf, func_id)
    return VfMonitorStatus(Profile.SEED.value, st.state.name, st.mode.cli_name if st.mode is not None else None,
                           st.tracked_marks, st.overflow_events)
