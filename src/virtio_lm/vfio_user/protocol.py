"""The vfio-user protocol core, sans I/O: bytes and fds in, reply bytes out.

:class:`MessageReader` frames the byte stream (a 16-byte header, then ``size - 16`` bytes) and
keeps the fds that came with a message's first byte beside it.  :class:`VfioUserDevice` answers
one client's messages for one PCI function (a PF or a VF): :meth:`VfioUserDevice.handle` takes a
:class:`Message` and returns the reply's bytes (or ``None`` for a NO_REPLY command).

Two kinds of refusal:

* a message that breaks the protocol -- a bad header (type, flags, size), a payload of the wrong
  shape, fds where none belong, anything before VERSION or a second VERSION, an unknown command
  -- raises :class:`~virtio_lm.errors.VfioUserMessageError`: the socket layer closes that
  connection (and calls :meth:`VfioUserDevice.disconnect`) and serves the next client;
* a well-formed request the device refuses -- a region or IRQ index that does not exist, an
  access the function refuses (:class:`~virtio_lm.errors.TransportError`), a DMA window that
  overlaps one mapped (EEXIST) -- gets an error reply with an errno; the connection stays.

The regions (VFIO's PCI indexes): BAR 0 (the function's registers, :data:`BAR0`), the 4096-byte
configuration space (index 7: PCI Express), every other index of size 0.  No region is
mappable: every access is a REGION_READ / REGION_WRITE message (QEMU posts BAR writes with
NO_REPLY).  Interrupts: MSI-X only, one eventfd per vector (SET_IRQS, DATA_EVENTFD with
ACTION_TRIGGER); the function's interrupt for a queue or a configuration change writes the
eventfd of the vector the driver programmed for it.  QEMU emulates the MSI-X table and masking.

Guest memory: every DMA_MAP with an fd maps that window into a
:class:`~virtio_lm.vhost.memmap.GuestMemoryMap`, addressed by IOVA (the guest-physical address
without a vIOMMU); the function's DMA port is a :class:`~virtio_lm.memory.MemoryPort` over it,
so every device write names its writer and a dirty tracker attached to that writer sees it --
the same single DMA path as the vhost-user back-end.  A window without an fd is recorded but
not reachable (a device access there is a :class:`~virtio_lm.errors.MemoryAccessError`).

A VF's configuration space reads vendor and device id 0xffff and has no Memory Space Enable
(SR-IOV: the PF's VF MSE governs it); the client is shown the VF the way Linux's vfio-pci shows
one to a VMM: vendor 0x1af4 and the modern id of the VF's device type, and a Memory Space Enable
bit kept for the client (without it a guest's read-modify-write of the command register turns
the VMM's BAR mapping off).

When the client leaves (:meth:`VfioUserDevice.disconnect`) every window is unmapped, every
eventfd closed, and the function reset (its rings lived in memory that left with the client).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Callable

from virtio_lm.errors import (
    FieldValueError,
    MemoryAccessError,
    TransportError,
    VfioUserMessageError,
    VfioUserRequestError,
    VirtioLmError,
    WireError,
)
from virtio_lm.pci.function import CONFIG_INTERRUPT, VirtioPciFunction
from virtio_lm.vhost.memmap import GuestMemoryMap
from virtio_lm.vhost.protocol import CarriesFds
from virtio_lm.wire import pcicfg as C
from virtio_lm.wire import vfio_user as W
from virtio_lm.wire.pci import VIRTIO_PCI_VENDOR_ID, VIRTIO_MSI_NO_VECTOR, modern_device_id
from virtio_lm.wire.vhost_user import MemRegion

__all__ = ["Message", "MessageReader", "VfioUserDevice"]

log = logging.getLogger(__name__)


@dataclass
class Message(CarriesFds):
    """One client message: header, payload, the fds that came with it (owned until taken)."""

    header: W.Header
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        try:
            return W.Command(self.header.command).name
        except ValueError:
            return f"command {self.header.command}"


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def check_header(h: W.Header) -> None:
    what = f"message {h.id} (command {h.command})"
    if h.flags & ~W.MSG_FLAGS_KNOWN:
        raise VfioUserMessageError(f"{what}: unknown flag bits {h.flags & ~W.MSG_FLAGS_KNOWN:#x}")
    if h.flags & W.MSG_TYPE_MASK != W.MSG_TYPE_COMMAND:
        raise VfioUserMessageError(f"{what}: type {h.flags & W.MSG_TYPE_MASK}, a client sends commands (0)")
    if h.flags & W.MsgFlags.ERROR or h.error:
        raise VfioUserMessageError(f"{what}: ERROR flag or error field set on a command")
    if not W.HEADER_SIZE <= h.size <= W.MAX_MESSAGE:
        raise VfioUserMessageError(f"{what}: size {h.size} outside {W.HEADER_SIZE}..{W.MAX_MESSAGE}")


class MessageReader:
    """Incremental framer: :meth:`feed` bytes (and fds), get whole messages."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._header: W.Header | None = None
        self._fds: list[int] = []

    def want(self) -> int:
        """How many more bytes complete the header or the current message (for exact reads)."""
        if self._header is None:
            return W.HEADER_SIZE - len(self._buf)
        return self._header.size - W.HEADER_SIZE - len(self._buf)

    def feed(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> list[Message]:
        self._fds.extend(fds)
        self._buf += data
        out: list[Message] = []
        while True:
            if self._header is None:
                if len(self._buf) < W.HEADER_SIZE:
                    break
                h = W.Header.decode(bytes(self._buf[: W.HEADER_SIZE]))
                del self._buf[: W.HEADER_SIZE]
                try:
                    check_header(h)
                except VfioUserMessageError:
                    for m in out:
                        m.close_fds()
                    self.close()
                    raise
                self._header = h
            h = self._header
            need = h.size - W.HEADER_SIZE
            if len(self._buf) < need:
                break
            payload = bytes(self._buf[:need])
            del self._buf[:need]
            out.append(Message(h, payload, self._fds))
            self._fds = []
            self._header = None
        return out

    def eof(self) -> None:
        """The peer closed: refuse a message cut short."""
        cut = self._header is not None or bool(self._buf)
        self.close()
        if cut:
            raise VfioUserMessageError("connection closed inside a message")

    def close(self) -> None:
        for fd in self._fds:
            _close(fd)
        self._fds = []
        self._buf.clear()
        self._header = None


# ---------------------------------------------------------------------------- the device
#: payload size each command must have (None: checked by its handler)
_FIXED_PAYLOAD: dict[int, int | None] = {
    W.Command.VERSION: None,
    W.Command.DMA_MAP: W.DmaMap.SIZE,
    W.Command.DMA_UNMAP: W.DmaUnmap.SIZE,
    W.Command.DEVICE_GET_INFO: W.DeviceInfo.SIZE,
    W.Command.DEVICE_GET_REGION_INFO: W.RegionInfo.SIZE,
    W.Command.DEVICE_GET_IRQ_INFO: W.IrqInfo.SIZE,
    W.Command.DEVICE_SET_IRQS: None,
    W.Command.REGION_READ: W.RegionAccess.SIZE,
    W.Command.REGION_WRITE: None,
    W.Command.DEVICE_RESET: 0,
    W.Command.DEVICE_FEATURE: None,
    W.Command.DEVICE_GET_REGION_IO_FDS: None,
    W.Command.REGION_WRITE_MULTI: None,
    W.Command.MIG_DATA_READ: None,
    W.Command.MIG_DATA_WRITE: None,
}
#: commands that may carry fds, and how many at most
_FDS_ALLOWED = {W.Command.DMA_MAP: 1, W.Command.DEVICE_SET_IRQS: W.MAX_MSG_FDS}

_EVENTFD_ONE = (1).to_bytes(8, "little")


@dataclass
class _Window:
    address: int
    size: int
    offset: int
    flags: int
    mapped: bool


class VfioUserDevice:
    """One PCI function served to one client at a time (see the module docstring).

    ``memory`` is the map the function's DMA port reads and writes; ``reset`` is what
    DEVICE_RESET does (a VF: its FLR through the PF; a PF: its own FLR)."""

    def __init__(
        self, fn: VirtioPciFunction, memory: GuestMemoryMap, *, reset: Callable[[], None] | None = None,
        name: str | None = None,
    ) -> None:
        self.fn = fn
        self.memory = memory
        self.name = name or fn.name
        self._reset = reset or fn.flr
        self.version_done = False
        self.client_caps: dict = {}
        self.windows: list[_Window] = []
        self._irq_lock = threading.Lock()
        self._msix: list[int | None] = [None] * fn.msix_vectors
        self.interrupts_sent = 0
        self.interrupts_dropped = 0
        #: (region, offset, count, "r"/"w") of every region access, for the evidence tests
        self.accesses: list[tuple[int, int, int, str]] = []
        self.record_accesses = False
        self.refusals: list[str] = []
        self._vf_mse = 0  # the Memory Space Enable bit shown for a VF (see the module docstring)
        fn.on_interrupt = self._interrupt

    # -------------------------------------------------------------- interrupts
    def _interrupt(self, source: int) -> None:
        vector = self.fn.msix_vector(source) if source == CONFIG_INTERRUPT or source >= 0 else VIRTIO_MSI_NO_VECTOR
        with self._irq_lock:
            fd = self._msix[vector] if vector < len(self._msix) else None
            if fd is None:
                self.interrupts_dropped += 1
                return
            try:
                os.write(fd, _EVENTFD_ONE)
                self.interrupts_sent += 1
            except OSError:
                self.interrupts_dropped += 1

    # -------------------------------------------------------------- the connection
    def disconnect(self) -> None:
        """The client left: unmap every window, close every eventfd, reset the function."""
        with self._irq_lock:
            for i, fd in enumerate(self._msix):
                if fd is not None:
                    _close(fd)
                self._msix[i] = None
        try:
            self._reset()
        except VirtioLmError as exc:  # a reset the device refuses must not keep the memory mapped
            log.warning("%s: reset on disconnect: %s", self.name, exc)
        self.memory.clear()
        self.windows.clear()
        self.version_done = False
        self.client_caps = {}
        self._vf_mse = 0

    def handle(self, msg: Message) -> bytes | None:
        """The reply to ``msg`` (``None`` when it asks for none); see the module docstring."""
        h = msg.header
        try:
            cmd = W.Command(h.command)
        except ValueError:
            msg.close_fds()
            raise VfioUserMessageError(f"{self.name}: unknown command {h.command}") from None
        if cmd not in _FIXED_PAYLOAD:
            msg.close_fds()
            raise VfioUserMessageError(f"{self.name}: {cmd.name} is sent by a server, not by a client")
        try:
            self._check_shape(cmd, msg)
            payload = self._dispatch(cmd, msg)
        except VfioUserRequestError as exc:
            msg.close_fds()
            self.refusals.append(f"{cmd.name}: {exc}")
            log.info("%s: %s refused (%s): %s", self.name, cmd.name, errno.errorcode.get(exc.errno, exc.errno), exc)
            if h.flags & W.MsgFlags.NO_REPLY:
                return None
            return W.Header(h.id, h.command, W.HEADER_SIZE, W.MsgFlags.REPLY | W.MsgFlags.ERROR, exc.errno).encode()
        except (WireError, FieldValueError) as exc:
            msg.close_fds()
            raise VfioUserMessageError(f"{self.name}: {cmd.name}: {exc}") from exc
        finally:
            msg.close_fds()
        if h.flags & W.MsgFlags.NO_REPLY:
            return None
        return W.Header(h.id, h.command, W.HEADER_SIZE + len(payload), W.MsgFlags.REPLY, 0).encode() + payload

    def _check_shape(self, cmd: W.Command, msg: Message) -> None:
        if len(msg.fds) > _FDS_ALLOWED.get(cmd, 0):
            raise VfioUserMessageError(f"{self.name}: {cmd.name} with {len(msg.fds)} fds")
        fixed = _FIXED_PAYLOAD[cmd]
        if fixed is not None and len(msg.payload) != fixed:
            raise VfioUserMessageError(f"{self.name}: {cmd.name} payload of {len(msg.payload)} bytes, not {fixed}")
        if cmd is W.Command.VERSION:
            if self.version_done:
                raise VfioUserMessageError(f"{self.name}: a second VERSION")
        elif not self.version_done:
            raise VfioUserMessageError(f"{self.name}: {cmd.name} before VERSION")

    def _dispatch(self, cmd: W.Command, msg: Message) -> bytes:
        handler = {
            W.Command.VERSION: self._version,
            W.Command.DMA_MAP: self._dma_map,
            W.Command.DMA_UNMAP: self._dma_unmap,
            W.Command.DEVICE_GET_INFO: self._get_info,
            W.Command.DEVICE_GET_REGION_INFO: self._region_info,
            W.Command.DEVICE_GET_IRQ_INFO: self._irq_info,
            W.Command.DEVICE_SET_IRQS: self._set_irqs,
            W.Command.REGION_READ: self._region_read,
            W.Command.REGION_WRITE: self._region_write,
            W.Command.DEVICE_RESET: self._device_reset,
            W.Command.DEVICE_FEATURE: self._device_feature,
        }.get(cmd)
        if handler is None:  # known to the spec, not offered here (no write_multiple, no migration)
            raise VfioUserRequestError(errno.ENOTSUP, f"{cmd.name} is not supported")
        return handler(msg)

    # -------------------------------------------------------------- VERSION
    def _version(self, msg: Message) -> bytes:
        head, caps = W.decode_version(msg.payload)
        if head.major != W.VERSION_MAJOR:
            raise VfioUserMessageError(f"{self.name}: VERSION {head.major}.{head.minor}; only major 0 is spoken")
        self.client_caps = caps
        self.version_done = True
        ours = {"max_msg_fds": W.MAX_MSG_FDS, "max_data_xfer_size": W.MAX_DATA_XFER}
        reply = W.VersionHead(W.VERSION_MAJOR, min(head.minor, W.VERSION_MINOR))
        return W.encode_version(reply, ours, limit=len(msg.payload))

    # -------------------------------------------------------------- DMA
    def _dma_map(self, msg: Message) -> bytes:
        m = W.DmaMap.decode(msg.payload)
        if m.flags & ~(W.VFIO_USER_DMA_MAP_FLAG_READ | W.VFIO_USER_DMA_MAP_FLAG_WRITE):
            raise VfioUserRequestError(errno.EINVAL, f"DMA_MAP flags {m.flags:#x}")
        if m.size == 0 or m.address + m.size > 1 << 64:
            raise VfioUserRequestError(errno.EINVAL, f"DMA_MAP window [{m.address:#x}, +{m.size:#x})")
        for w in self.windows:
            if m.address < w.address + w.size and w.address < m.address + m.size:
                raise VfioUserRequestError(errno.EEXIST, f"DMA_MAP [{m.address:#x}, +{m.size:#x}) overlaps "
                                                         f"[{w.address:#x}, +{w.size:#x})")
        if len(self.windows) >= self.memory.max_regions:
            raise VfioUserRequestError(errno.ENOSPC, f"at most {self.memory.max_regions} DMA windows")
        fds = msg.take_fds()
        if fds:
            try:
                self.memory.add_region(MemRegion(m.address, m.size, m.address, m.offset), fds[0])  # owns the fd
            except VirtioLmError as exc:
                raise VfioUserRequestError(errno.EINVAL, f"DMA_MAP: {exc}") from exc
        self.windows.append(_Window(m.address, m.size, m.offset, m.flags, bool(fds)))
        return b""

    def _dma_unmap(self, msg: Message) -> bytes:
        u = W.DmaUnmap.decode(msg.payload)
        if u.flags:
            raise VfioUserRequestError(errno.EINVAL, f"DMA_UNMAP flags {u.flags:#x}")
        for i, w in enumerate(self.windows):
            if (w.address, w.size) == (u.address, u.size):
                if w.mapped:
                    self.memory.remove_region(MemRegion(w.address, w.size, w.address, w.offset))
                del self.windows[i]
                return msg.payload
        raise VfioUserRequestError(errno.EINVAL, f"DMA_UNMAP [{u.address:#x}, +{u.size:#x}) matches no window")

    # -------------------------------------------------------------- info
    def _get_info(self, msg: Message) -> bytes:
        req = W.DeviceInfo.decode(msg.payload)
        if req.argsz < W.DeviceInfo.SIZE:
            raise VfioUserRequestError(errno.EINVAL, f"DEVICE_GET_INFO argsz {req.argsz}")
        return W.DeviceInfo(W.DeviceInfo.SIZE, W.VFIO_DEVICE_FLAGS_RESET | W.VFIO_DEVICE_FLAGS_PCI,
                            W.VFIO_PCI_NUM_REGIONS, W.VFIO_PCI_NUM_IRQS).encode()

    def region_size(self, index: int) -> int:
        if index == W.PciRegion.BAR0:
            return C.BAR0.size
        if index == W.PciRegion.CONFIG:
            return self.fn.config.size
        return 0

    def _region_info(self, msg: Message) -> bytes:
        req = W.RegionInfo.decode(msg.payload)
        if req.argsz < W.RegionInfo.SIZE:
            raise VfioUserRequestError(errno.EINVAL, f"DEVICE_GET_REGION_INFO argsz {req.argsz}")
        if req.index >= W.VFIO_PCI_NUM_REGIONS:
            raise VfioUserRequestError(errno.EINVAL, f"region index {req.index}")
        size = self.region_size(req.index)
        flags = W.VFIO_REGION_INFO_FLAG_READ | W.VFIO_REGION_INFO_FLAG_WRITE if size else 0
        return W.RegionInfo(W.RegionInfo.SIZE, flags, req.index, 0, size, 0).encode()

    def _irq_info(self, msg: Message) -> bytes:
        req = W.IrqInfo.decode(msg.payload)
        if req.argsz < W.IrqInfo.SIZE:
            raise VfioUserRequestError(errno.EINVAL, f"DEVICE_GET_IRQ_INFO argsz {req.argsz}")
        if req.index >= W.VFIO_PCI_NUM_IRQS:
            raise VfioUserRequestError(errno.EINVAL, f"IRQ index {req.index}")
        if req.index == W.PciIrq.MSIX:
            return W.IrqInfo(W.IrqInfo.SIZE, W.VFIO_IRQ_INFO_EVENTFD | W.VFIO_IRQ_INFO_NORESIZE, req.index,
                             self.fn.msix_vectors).encode()
        return W.IrqInfo(W.IrqInfo.SIZE, 0, req.index, 0).encode()  # no INTx, MSI, ERR or REQ

    # -------------------------------------------------------------- interrupts
    def _set_irqs(self, msg: Message) -> bytes:
        if len(msg.payload) < W.IrqSet.SIZE:
            raise VfioUserMessageError(f"{self.name}: SET_IRQS payload of {len(msg.payload)} bytes")
        s = W.IrqSet.decode(msg.payload[: W.IrqSet.SIZE])
        data = msg.payload[W.IrqSet.SIZE :]
        dtype, action = s.flags & W.VFIO_IRQ_SET_DATA_TYPE_MASK, s.flags & W.VFIO_IRQ_SET_ACTION_TYPE_MASK
        if s.flags & ~(W.VFIO_IRQ_SET_DATA_TYPE_MASK | W.VFIO_IRQ_SET_ACTION_TYPE_MASK) \
                or dtype & (dtype - 1) or action & (action - 1) or not dtype or not action:
            raise VfioUserRequestError(errno.EINVAL, f"SET_IRQS flags {s.flags:#x}")
        if dtype == W.VFIO_IRQ_SET_DATA_BOOL and len(data) != s.count:
            raise VfioUserMessageError(f"{self.name}: SET_IRQS with {s.count} bools but {len(data)} data bytes")
        if dtype != W.VFIO_IRQ_SET_DATA_BOOL and data:
            raise VfioUserMessageError(f"{self.name}: SET_IRQS with {len(data)} unexpected data bytes")
        if dtype != W.VFIO_IRQ_SET_DATA_EVENTFD and msg.fds:
            raise VfioUserMessageError(f"{self.name}: SET_IRQS without DATA_EVENTFD but with fds")
        if s.index != W.PciIrq.MSIX:
            if s.count == 0 and dtype == W.VFIO_IRQ_SET_DATA_NONE:
                return b""  # disabling an index that has no interrupts
            raise VfioUserRequestError(errno.EINVAL, f"IRQ index {s.index} has no interrupts")
        n = self.fn.msix_vectors
        if dtype == W.VFIO_IRQ_SET_DATA_NONE and s.count == 0:
            if action != W.VFIO_IRQ_SET_ACTION_TRIGGER:
                raise VfioUserRequestError(errno.EINVAL, "MSI-X is not maskable")
            self._assign(0, [None] * n)
            return b""
        if s.start + s.count > n or s.count == 0:
            raise VfioUserRequestError(errno.EINVAL, f"MSI-X vectors [{s.start}, +{s.count}) of {n}")
        if action != W.VFIO_IRQ_SET_ACTION_TRIGGER:
            raise VfioUserRequestError(errno.EINVAL, "MSI-X is not maskable")
        if dtype == W.VFIO_IRQ_SET_DATA_EVENTFD:
            fds = msg.take_fds()
            if fds and len(fds) != s.count:
                for fd in fds:
                    _close(fd)
                raise VfioUserRequestError(errno.EINVAL, f"SET_IRQS: {len(fds)} eventfds for {s.count} vectors")
            self._assign(s.start, list(fds) if fds else [None] * s.count)
            return b""
        # DATA_NONE / DATA_BOOL with TRIGGER: the client triggers the vectors itself
        for i in range(s.count):
            if dtype == W.VFIO_IRQ_SET_DATA_NONE or data[i]:
                with self._irq_lock:
                    fd = self._msix[s.start + i]
                if fd is not None:
                    os.write(fd, _EVENTFD_ONE)
        return b""

    def _assign(self, start: int, fds: list[int | None]) -> None:
        with self._irq_lock:
            for i, fd in enumerate(fds):
                old = self._msix[start + i]
                if old is not None:
                    _close(old)
                self._msix[start + i] = fd

    @property
    def eventfds(self) -> list[int | None]:
        with self._irq_lock:
            return list(self._msix)

    # -------------------------------------------------------------- region access
    def _access(self, raw: bytes) -> W.RegionAccess:
        a = W.RegionAccess.decode(raw)
        if a.count > W.MAX_DATA_XFER:
            raise VfioUserMessageError(f"{self.name}: access of {a.count} bytes > {W.MAX_DATA_XFER}")
        size = self.region_size(a.region) if a.region < W.VFIO_PCI_NUM_REGIONS else 0
        if a.count == 0 or a.offset + a.count > size:
            raise VfioUserRequestError(errno.EINVAL, f"region {a.region} [{a.offset:#x}, +{a.count}) "
                                                     f"outside its {size} bytes")
        if self.record_accesses:
            self.accesses.append((a.region, a.offset, a.count, "?"))
        return a

    def _region_read(self, msg: Message) -> bytes:
        a = self._access(msg.payload)
        if self.record_accesses:
            self.accesses[-1] = (a.region, a.offset, a.count, "r")
        try:
            if a.region == W.PciRegion.CONFIG:
                data = self._config_read(a.offset, a.count)
            else:
                if a.count not in (1, 2, 4, 8):
                    raise VfioUserRequestError(errno.EINVAL, f"BAR 0 read of {a.count} bytes")
                data = self.fn.bar_read(0, a.offset, a.count).to_bytes(a.count, "little")
        except (TransportError, MemoryAccessError) as exc:
            raise VfioUserRequestError(errno.EINVAL, str(exc)) from exc
        return W.RegionAccess(a.offset, a.region, a.count).encode() + data

    def _region_write(self, msg: Message) -> bytes:
        if len(msg.payload) < W.RegionAccess.SIZE:
            raise VfioUserMessageError(f"{self.name}: REGION_WRITE payload of {len(msg.payload)} bytes")
        head = msg.payload[: W.RegionAccess.SIZE]
        data = msg.payload[W.RegionAccess.SIZE :]
        a = W.RegionAccess.decode(head)
        if len(data) != a.count:
            raise VfioUserMessageError(f"{self.name}: REGION_WRITE count {a.count} with {len(data)} data bytes")
        a = self._access(head)
        if self.record_accesses:
            self.accesses[-1] = (a.region, a.offset, a.count, "w")
        if a.count not in (1, 2, 4, 8):
            raise VfioUserRequestError(errno.EINVAL, f"region {a.region} write of {a.count} bytes")
        value = int.from_bytes(data, "little")
        try:
            if a.region == W.PciRegion.CONFIG:
                if a.count == 8:
                    raise VfioUserRequestError(errno.EINVAL, "configuration write of 8 bytes")
                if self.fn.is_vf and a.offset <= C.PCI_COMMAND < a.offset + a.count:
                    self._vf_mse = value >> (8 * (C.PCI_COMMAND - a.offset)) & C.PCI_COMMAND_MEMORY
                self.fn.config_write(a.offset, a.count, value)
            else:
                self.fn.bar_write(0, a.offset, a.count, value)
        except (TransportError, MemoryAccessError) as exc:
            raise VfioUserRequestError(errno.EINVAL, str(exc)) from exc
        return W.RegionAccess(a.offset, a.region, a.count).encode()

    def _config_read(self, offset: int, count: int) -> bytes:
        if count in (1, 2, 4) and offset % count == 0:
            data = self.fn.config_read(offset, count).to_bytes(count, "little")
        else:  # a bulk read (QEMU reads the whole space once): the bytes as stored, no read hooks
            data = self.fn.config.peek(offset, count)
        if self.fn.is_vf and offset < C.PCI_COMMAND + 1:  # shown as vfio-pci shows a VF
            ids = VIRTIO_PCI_VENDOR_ID | self.vf_device_id() << 16
            shown = bytearray(data)
            for i in range(offset, min(4, offset + count)):
                shown[i - offset] = ids >> (8 * i) & 0xFF
            if offset <= C.PCI_COMMAND < offset + count:
                shown[C.PCI_COMMAND - offset] |= self._vf_mse
            data = bytes(shown)
        return data

    def vf_device_id(self) -> int:
        t = int(self.fn.device.device_id)
        return modern_device_id(t) if 1 <= t <= 63 else modern_device_id(1) - 1

    # -------------------------------------------------------------- reset, features
    def _device_reset(self, msg: Message) -> bytes:
        try:
            self._reset()
        except VirtioLmError as exc:
            raise VfioUserRequestError(errno.EIO, f"reset: {exc}") from exc
        return b""

    def _device_feature(self, msg: Message) -> bytes:
        if len(msg.payload) < W.DeviceFeature.SIZE:
            raise VfioUserMessageError(f"{self.name}: DEVICE_FEATURE payload of {len(msg.payload)} bytes")
        f = W.DeviceFeature.decode(msg.payload[: W.DeviceFeature.SIZE])
        feature = f.flags & W.VFIO_DEVICE_FEATURE_MASK
        # no feature is offered (migration v2 is not served): as VFIO answers an unknown feature
        raise VfioUserRequestError(errno.ENOTTY, f"device feature {feature} is not supported")
