"""The vfio-user server: the sans-I/O core message by message, hostile messages (one named test
each: a protocol breach closes the connection, a refused request gets an errno reply), and the
socket layer (SCM_RIGHTS, a bad client dropped while the server keeps serving)."""

from __future__ import annotations

import errno
import json
import os
import socket

import pytest

from virtio_lm.errors import VfioUserMessageError
from virtio_lm.vfio_user.host import VfioUserHost
from virtio_lm.vfio_user.protocol import MessageReader
from virtio_lm.vfio_user.server import recv_with_fds
from virtio_lm.wire import pcicfg as C
from virtio_lm.wire import vfio_user as W
from virtio_lm.wire.pci import COMMON_CFG_BY_NAME

MIB = 1 << 20


# ---------------------------------------------------------------------------- helpers
def raw(cmd: int, payload: bytes = b"", *, mid: int = 1, flags: int = 0, error: int = 0, size: int | None = None) -> bytes:
    return W.Header(mid, cmd, W.HEADER_SIZE + len(payload) if size is None else size, flags, error).encode() + payload


def version_payload(major: int = 0, minor: int = 0, caps: dict | None = None) -> bytes:
    text = json.dumps({"capabilities": caps if caps is not None else {"max_msg_fds": 8, "max_data_xfer_size": 1 << 20}})
    return W.VersionHead(major, minor).encode() + text.encode() + b"\0"


class Session:
    """One client's messages through the reader and the device, replies decoded."""

    def __init__(self, dev) -> None:
        self.dev = dev
        self.reader = MessageReader()

    def send(self, data: bytes, fds: list[int] | None = None):
        out = []
        for m in self.reader.feed(data, fds or []):
            r = self.dev.handle(m)
            out.append(None if r is None else (W.Header.decode(r[:16]), r[16:]))
        assert len(out) == 1
        return out[0]

    def cmd(self, cmd: int, payload: bytes = b"", fds: list[int] | None = None, **kw):
        return self.send(raw(cmd, payload, **kw), fds)

    def ok(self, cmd: int, payload: bytes = b"", fds: list[int] | None = None, **kw) -> bytes:
        h, body = self.cmd(cmd, payload, fds, **kw)
        assert h.flags == W.MsgFlags.REPLY and h.error == 0 and h.command == cmd, h
        return body

    def err(self, cmd: int, payload: bytes = b"", fds: list[int] | None = None, **kw) -> int:
        h, body = self.cmd(cmd, payload, fds, **kw)
        assert h.flags & W.MsgFlags.ERROR and body == b"", h
        return h.error

    def hello(self) -> None:
        self.ok(W.Command.VERSION, version_payload())

    def read(self, region: int, offset: int, count: int) -> bytes:
        body = self.ok(W.Command.REGION_READ, W.RegionAccess(offset, region, count).encode())
        assert W.RegionAccess.decode(body[:16]) == W.RegionAccess(offset, region, count)
        return body[16:]

    def write(self, region: int, offset: int, data: bytes) -> None:
        self.ok(W.Command.REGION_WRITE, W.RegionAccess(offset, region, len(data)).encode() + data)


@pytest.fixture
def host(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 * MIB))
    from virtio_lm.devices.blk import BlkDevice

    h = VfioUserHost(str(tmp_path), [lambda: BlkDevice(str(image))], total_vfs=2)
    yield h
    h.close()


@pytest.fixture
def vf(host):
    s = Session(host.devices["vf1"])
    s.hello()
    return s


def memfd(size: int) -> int:
    fd = os.memfd_create("guest")
    os.ftruncate(fd, size)
    return fd


def common(name: str) -> int:
    return C.BAR0.common + COMMON_CFG_BY_NAME[name].offset


# ---------------------------------------------------------------------------- the happy path
def test_version_reply_is_no_longer_than_the_request(host):
    s = Session(host.devices["vf1"])
    req = version_payload(0, 7)
    body = s.ok(W.Command.VERSION, req)
    head, caps = W.decode_version(body)
    assert (head.major, head.minor) == (0, W.VERSION_MINOR) and len(body) <= len(req)
    assert caps["max_msg_fds"] <= 16  # QEMU refuses a peer claiming more
    s2 = Session(host.devices["pf"])
    assert s2.ok(W.Command.VERSION, W.VersionHead(0, 0).encode()) == W.VersionHead(0, 0).encode()


def test_device_region_and_irq_info(vf, host):
    info = W.DeviceInfo.decode(vf.ok(W.Command.DEVICE_GET_INFO, W.DeviceInfo().encode()))
    assert info.flags == W.VFIO_DEVICE_FLAGS_RESET | W.VFIO_DEVICE_FLAGS_PCI
    assert (info.num_regions, info.num_irqs) == (9, 5)
    sizes = {}
    for i in range(9):
        r = W.RegionInfo.decode(vf.ok(W.Command.DEVICE_GET_REGION_INFO, W.RegionInfo(index=i).encode()))
        sizes[i] = r.size
        assert not r.flags & W.VFIO_REGION_INFO_FLAG_MMAP
    assert sizes == {0: C.BAR0.size, 1: 0, 2: 0, 3: 0, 4: 0, 5: 0, 6: 0, 7: 4096, 8: 0}
    msix = W.IrqInfo.decode(vf.ok(W.Command.DEVICE_GET_IRQ_INFO, W.IrqInfo(index=W.PciIrq.MSIX).encode()))
    assert msix.count == host.function("vf1").msix_vectors and msix.flags & W.VFIO_IRQ_INFO_EVENTFD
    intx = W.IrqInfo.decode(vf.ok(W.Command.DEVICE_GET_IRQ_INFO, W.IrqInfo(index=W.PciIrq.INTX).encode()))
    assert intx.count == 0


def test_vf_config_shown_as_vfio_pci_shows_a_vf(vf, host):
    cfg = vf.read(W.PciRegion.CONFIG, 0, 256)  # QEMU's bulk read
    assert cfg[0:4] == bytes.fromhex("f41a4210")  # 1af4:1042 where the VF itself reads ffff:ffff
    assert host.function("vf1").config_read(0, 4) == 0xFFFF_FFFF
    assert vf.read(W.PciRegion.CONFIG, 2, 2) == bytes.fromhex("4210")
    vf.write(W.PciRegion.CONFIG, C.PCI_COMMAND, (C.PCI_COMMAND_MEMORY | C.PCI_COMMAND_MASTER).to_bytes(2, "little"))
    assert int.from_bytes(vf.read(W.PciRegion.CONFIG, C.PCI_COMMAND, 2), "little") == 6  # MSE kept for the client
    assert host.function("vf1").config_read(C.PCI_COMMAND, 2) == C.PCI_COMMAND_MASTER  # the VF has none


def test_dma_map_is_the_devices_memory_with_dirty_tracking(vf, host):
    fd = memfd(4 * MIB)
    vf.ok(W.Command.DMA_MAP, W.DmaMap(flags=3, offset=0, address=0, size=4 * MIB).encode(), [fd])
    fn = host.function("vf1")
    marks: list[tuple[int, int]] = []

    class Sink:
        def mark(self, first: int, last: int) -> None:
            marks.append((first, last))

    fn.port.writer.tracker = Sink()
    fn.port.write(0x5000, b"dma!")  # a device write lands in the client's memory, tracked
    assert marks == [(5, 5)]
    with open(f"/proc/self/fd/{host.vf_memory[1].regions[0].fd}", "rb") as guest:  # the client's view
        guest.seek(0x5000)
        assert guest.read(4) == b"dma!"
    assert vf.err(W.Command.DMA_MAP, W.DmaMap(flags=3, address=MIB, size=MIB).encode()) == errno.EEXIST
    assert vf.ok(W.Command.DMA_UNMAP, W.DmaUnmap(address=0, size=4 * MIB).encode()) == \
        W.DmaUnmap(address=0, size=4 * MIB).encode()
    assert vf.err(W.Command.DMA_UNMAP, W.DmaUnmap(address=0, size=4 * MIB).encode()) == errno.EINVAL
    with pytest.raises(Exception):
        fn.port.write(0x5000, b"gone")  # no memory there any more


def test_msix_eventfd_signalled_for_the_programmed_vector(vf, host):
    fn = host.function("vf1")
    efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(fn.msix_vectors)]
    vf.ok(W.Command.DEVICE_SET_IRQS, W.IrqSet(flags=W.VFIO_IRQ_SET_DATA_EVENTFD | W.VFIO_IRQ_SET_ACTION_TRIGGER,
                                              index=W.PciIrq.MSIX, start=0, count=len(efds)).encode(),
          [os.dup(e) for e in efds])
    vf.write(W.PciRegion.BAR0, common("queue_select"), (0).to_bytes(2, "little"))
    vf.write(W.PciRegion.BAR0, common("queue_msix_vector"), (1).to_bytes(2, "little"))
    fn.queue_interrupt(0)
    assert os.eventfd_read(efds[1]) == 1
    with pytest.raises(BlockingIOError):
        os.eventfd_read(efds[0])
    vf.ok(W.Command.DEVICE_SET_IRQS, W.IrqSet(flags=W.VFIO_IRQ_SET_DATA_NONE | W.VFIO_IRQ_SET_ACTION_TRIGGER,
                                              index=W.PciIrq.MSIX, start=0, count=0).encode())
    fn.queue_interrupt(0)  # every vector disabled: nothing signalled
    with pytest.raises(BlockingIOError):
        os.eventfd_read(efds[1])
    for e in efds:
        os.close(e)


def test_posted_write_gets_no_reply_and_reset_is_a_vf_flr(vf, host):
    fn = host.function("vf1")
    assert vf.cmd(W.Command.REGION_WRITE, W.RegionAccess(common("device_status"), 0, 1).encode() + b"\x01",
                  flags=W.MsgFlags.NO_REPLY) is None
    assert fn.status == 1
    flrs: list[int] = []
    host.pf.add_flr_listener(flrs.append)
    vf.ok(W.Command.DEVICE_RESET)
    assert fn.status == 0 and flrs == [1]


def test_device_feature_and_unoffered_commands_answered_with_errno(vf):
    assert vf.err(W.Command.DEVICE_FEATURE, W.DeviceFeature(flags=W.VFIO_DEVICE_FEATURE_PROBE | 1).encode()) \
        == errno.ENOTTY
    assert vf.err(W.Command.REGION_WRITE_MULTI, bytes(8)) == errno.ENOTSUP


# ---------------------------------------------------------------------------- refused requests: errno replies
@pytest.mark.parametrize("name,cmd,payload,want", [
    ("region_index", W.Command.DEVICE_GET_REGION_INFO, W.RegionInfo(index=99).encode(), errno.EINVAL),
    ("irq_index", W.Command.DEVICE_GET_IRQ_INFO, W.IrqInfo(index=7).encode(), errno.EINVAL),
    ("short_argsz", W.Command.DEVICE_GET_INFO, W.DeviceInfo(argsz=4).encode(), errno.EINVAL),
    ("bar_read_3_bytes", W.Command.REGION_READ, W.RegionAccess(0, 0, 3).encode(), errno.EINVAL),
    ("read_past_region", W.Command.REGION_READ, W.RegionAccess(C.BAR0.size - 2, 0, 4).encode(), errno.EINVAL),
    ("read_empty_region", W.Command.REGION_READ, W.RegionAccess(0, 1, 4).encode(), errno.EINVAL),
    ("read_no_register", W.Command.REGION_READ, W.RegionAccess(0x7000, 0, 4).encode(), errno.EINVAL),
    ("write_read_only_register", W.Command.REGION_WRITE,
     W.RegionAccess(common("num_queues"), 0, 2).encode() + b"\1\0", errno.EINVAL),
    ("config_write_8", W.Command.REGION_WRITE, W.RegionAccess(0, 7, 8).encode() + bytes(8), errno.EINVAL),
    ("msix_mask", W.Command.DEVICE_SET_IRQS,
     W.IrqSet(flags=W.VFIO_IRQ_SET_DATA_NONE | W.VFIO_IRQ_SET_ACTION_MASK, index=2, count=1).encode(), errno.EINVAL),
    ("intx_trigger", W.Command.DEVICE_SET_IRQS,
     W.IrqSet(flags=W.VFIO_IRQ_SET_DATA_NONE | W.VFIO_IRQ_SET_ACTION_TRIGGER, index=0, count=1).encode(), errno.EINVAL),
    ("two_data_types", W.Command.DEVICE_SET_IRQS,
     W.IrqSet(flags=W.VFIO_IRQ_SET_DATA_NONE | W.VFIO_IRQ_SET_DATA_BOOL | W.VFIO_IRQ_SET_ACTION_TRIGGER,
              index=2, count=1).encode(), errno.EINVAL),
    ("vectors_past_the_table", W.Command.DEVICE_SET_IRQS,
     W.IrqSet(flags=W.VFIO_IRQ_SET_DATA_NONE | W.VFIO_IRQ_SET_ACTION_TRIGGER, index=2, start=2, count=9).encode(),
     errno.EINVAL),
    ("dma_map_flags", W.Command.DMA_MAP, W.DmaMap(flags=4, size=4096).encode(), errno.EINVAL),
    ("dma_map_empty", W.Command.DMA_MAP, W.DmaMap(flags=3, size=0).encode(), errno.EINVAL),
    ("dma_unmap_flags", W.Command.DMA_UNMAP, W.DmaUnmap(flags=1, size=4096).encode(), errno.EINVAL),
])
def test_refused_request_gets_errno_and_the_connection_stays(vf, name, cmd, payload, want):
    assert vf.err(cmd, payload) == want
    assert vf.ok(W.Command.DEVICE_GET_INFO, W.DeviceInfo().encode())  # still serving this client


def test_dma_map_of_an_fd_too_small_refused(vf):
    fd = memfd(4096)
    assert vf.err(W.Command.DMA_MAP, W.DmaMap(flags=3, size=MIB).encode(), [fd]) == errno.EINVAL
    with pytest.raises(OSError):
        os.fstat(fd)  # the server closed the fd it was given


def test_set_irqs_with_fewer_eventfds_than_vectors_refused(vf):
    e = os.eventfd(0)
    assert vf.err(W.Command.DEVICE_SET_IRQS, W.IrqSet(flags=W.VFIO_IRQ_SET_DATA_EVENTFD | W.VFIO_IRQ_SET_ACTION_TRIGGER,
                                                      index=2, count=2).encode(), [e]) == errno.EINVAL


# ---------------------------------------------------------------------------- protocol breaches: disconnect
BREACHES = {
    "reply_type": raw(W.Command.DEVICE_GET_INFO, W.DeviceInfo().encode(), flags=W.MsgFlags.REPLY),
    "unknown_flag": raw(W.Command.DEVICE_GET_INFO, W.DeviceInfo().encode(), flags=0x40),
    "error_flag": raw(W.Command.DEVICE_GET_INFO, W.DeviceInfo().encode(), flags=W.MsgFlags.ERROR),
    "error_field": raw(W.Command.DEVICE_GET_INFO, W.DeviceInfo().encode(), error=5),
    "size_below_header": raw(W.Command.DEVICE_GET_INFO, b"", size=8),
    "size_too_large": raw(W.Command.DEVICE_GET_INFO, b"", size=W.MAX_MESSAGE + 1),
    "unknown_command": raw(99, b""),
    "dma_read_from_client": raw(W.Command.DMA_READ, bytes(16)),
    "second_version": raw(W.Command.VERSION, version_payload()),
    "get_info_short": raw(W.Command.DEVICE_GET_INFO, bytes(15)),
    "region_info_long": raw(W.Command.DEVICE_GET_REGION_INFO, bytes(33)),
    "reset_with_payload": raw(W.Command.DEVICE_RESET, b"\0"),
    "region_write_count_mismatch": raw(W.Command.REGION_WRITE, W.RegionAccess(0x14, 0, 4).encode() + b"\1"),
    "region_write_short": raw(W.Command.REGION_WRITE, bytes(8)),
    "region_read_huge": raw(W.Command.REGION_READ, W.RegionAccess(0, 7, W.MAX_DATA_XFER + 1).encode()),
    "set_irqs_short": raw(W.Command.DEVICE_SET_IRQS, bytes(12)),
    "set_irqs_bools_missing": raw(W.Command.DEVICE_SET_IRQS, W.IrqSet(
        flags=W.VFIO_IRQ_SET_DATA_BOOL | W.VFIO_IRQ_SET_ACTION_TRIGGER, index=2, count=3).encode() + b"\1"),
    "set_irqs_stray_data": raw(W.Command.DEVICE_SET_IRQS, W.IrqSet(
        flags=W.VFIO_IRQ_SET_DATA_NONE | W.VFIO_IRQ_SET_ACTION_TRIGGER, index=2, count=1).encode() + b"\1"),
    "device_feature_short": raw(W.Command.DEVICE_FEATURE, bytes(4)),
}


@pytest.mark.parametrize("name", sorted(BREACHES))
def test_protocol_breach_refused(vf, name):
    with pytest.raises(VfioUserMessageError):
        vf.send(BREACHES[name])


@pytest.mark.parametrize("name,cmd,payload,nfds", [
    ("fd_on_get_info", W.Command.DEVICE_GET_INFO, W.DeviceInfo().encode(), 1),
    ("two_fds_on_dma_map", W.Command.DMA_MAP, W.DmaMap(flags=3, size=4096).encode(), 2),
    ("fd_without_data_eventfd", W.Command.DEVICE_SET_IRQS, W.IrqSet(
        flags=W.VFIO_IRQ_SET_DATA_NONE | W.VFIO_IRQ_SET_ACTION_TRIGGER, index=2, count=1).encode(), 1),
])
def test_stray_fds_refused_and_closed(vf, name, cmd, payload, nfds):
    fds = [memfd(4096) for _ in range(nfds)]
    with pytest.raises(VfioUserMessageError):
        vf.cmd(cmd, payload, fds)
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


@pytest.mark.parametrize("name,payload", [
    ("major_1", version_payload(major=1)),
    ("json_not_terminated", W.VersionHead().encode() + b'{"capabilities":{}}'),
    ("json_not_object", W.VersionHead().encode() + b"[1]\0"),
    ("json_garbage", W.VersionHead().encode() + b"{caps\0"),
    ("capabilities_not_object", W.VersionHead().encode() + b'{"capabilities":3}\0'),
    ("too_short", b"\0\0"),
])
def test_bad_version_refused(host, name, payload):
    with pytest.raises(VfioUserMessageError):
        Session(host.devices["vf1"]).cmd(W.Command.VERSION, payload)


def test_command_before_version_refused(host):
    with pytest.raises(VfioUserMessageError):
        Session(host.devices["vf1"]).cmd(W.Command.DEVICE_GET_INFO, W.DeviceInfo().encode())


def test_connection_closed_inside_a_message_refused():
    r = MessageReader()
    assert r.feed(raw(W.Command.DEVICE_GET_INFO, W.DeviceInfo().encode())[:20]) == []
    with pytest.raises(VfioUserMessageError):
        r.eof()


def test_disconnect_unmaps_closes_eventfds_and_resets(vf, host):
    fn = host.function("vf1")
    vf.ok(W.Command.DMA_MAP, W.DmaMap(flags=3, size=MIB).encode(), [memfd(MIB)])
    vf.ok(W.Command.DEVICE_SET_IRQS, W.IrqSet(flags=W.VFIO_IRQ_SET_DATA_EVENTFD | W.VFIO_IRQ_SET_ACTION_TRIGGER,
                                              index=2, count=1).encode(), [os.eventfd(0)])
    vf.write(W.PciRegion.BAR0, common("device_status"), b"\x01")
    vf.dev.disconnect()
    assert host.vf_memory[1].regions == () and vf.dev.eventfds == [None] * fn.msix_vectors
    assert fn.status == 0 and not vf.dev.version_done


def test_vf_socket_refuses_everything_once_its_pf_cleared_vf_enable(vf, host):
    host.pf.disable_vfs()
    with pytest.raises(VfioUserMessageError, match="gone"):
        vf.cmd(W.Command.DEVICE_GET_INFO, W.DeviceInfo().encode())


# ---------------------------------------------------------------------------- the socket layer
def _client(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def _exchange(s: socket.socket, data: bytes, fds: list[int] = ()) -> tuple[W.Header, bytes]:
    s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(memoryview(bytes().join(
        fd.to_bytes(4, "little", signed=True) for fd in fds))))] if fds else [])
    head = b""
    while len(head) < 16:
        chunk = s.recv(16 - len(head))
        assert chunk, "server closed the connection"
        head += chunk
    h = W.Header.decode(head)
    body = b""
    while len(body) < h.size - 16:
        body += s.recv(h.size - 16 - len(body))
    return h, body


def test_socket_server_drops_a_bad_client_and_serves_the_next(host):
    server = host.servers["vf1"].start()
    try:
        bad = _client(server.path)
        bad.sendall(raw(W.Command.DEVICE_GET_INFO, W.DeviceInfo().encode()))  # before VERSION
        assert bad.recv(16) == b""  # disconnected
        bad.close()
        good = _client(server.path)
        h, body = _exchange(good, raw(W.Command.VERSION, version_payload()))
        assert h.flags == W.MsgFlags.REPLY
        fd = memfd(MIB)
        h, _ = _exchange(good, raw(W.Command.DMA_MAP, W.DmaMap(flags=3, size=MIB).encode(), mid=2), [fd])
        os.close(fd)
        assert h.flags == W.MsgFlags.REPLY and h.id == 2 and len(host.vf_memory[1].regions) == 1  # fd over SCM_RIGHTS
        h, body = _exchange(good, raw(W.Command.DEVICE_GET_INFO, W.DeviceInfo().encode(), mid=3))
        assert W.DeviceInfo.decode(body).num_regions == 9
        good.close()
        assert any("before VERSION" in r for r in server.refusals)
    finally:
        server.close()


def test_recv_with_fds_refuses_too_many_fds():
    a, b = socket.socketpair()
    fds = [os.eventfd(0) for _ in range(W.MAX_MSG_FDS + 4)]
    a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, b"".join(f.to_bytes(4, "little") for f in fds))])
    with pytest.raises(VfioUserMessageError):
        recv_with_fds(b, 16)
    for f in fds:
        os.close(f)
    a.close()
    b.close()
