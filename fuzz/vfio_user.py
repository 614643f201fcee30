"""vfio-user messages from a hostile client, through the real reader and device.

The bytes go through :class:`MessageReader` (framing) into the :class:`VfioUserDevice`
of one function of a real host (``VfioUserHost``, virtio-1.4 profile), as the socket
server feeds them: the first input byte picks the PF of a host with nothing provisioned
behind its VFs (even; its SR-IOV registers and its FLR are the client's to write) or VF 1
of a second host, a virtio-blk VF on a 1 MiB image whose PF no input touches (odd) -- so
a PF reset by one input cannot take the VF away from the next.  File descriptors come with a chunk when the input says so:
a 1 MiB memfd (a DMA window) or an eventfd (an MSI-X vector), as a client passes them
with SCM_RIGHTS.  At the end the client leaves (``MessageReader.eof`` and
``VfioUserDevice.disconnect``), as the server does.

Input: a selector byte, then chunks of ``nfds u8 (mod 3), kind u8 (bit i: fd i is an
eventfd), length u16 (mod 4 KiB), bytes``.

Invariants:
* The reader and the device refuse a broken message only with
  :class:`VfioUserMessageError` (the server then drops the client); a refused request
  is an error *reply*, never an exception.
* Every reply answers its request: the same message id and command, the REPLY flag,
  ``size`` equal to the reply's length; an error reply carries the ERROR flag, a
  non-zero errno and no payload.  A NO_REPLY request gets no reply.
* Nothing leaks: once the client is gone every fd it passed is closed (the process has
  the same open fds as before the input).
* The function stays serviceable: after the disconnect a new client's VERSION and a
  read of the vendor id in configuration space are answered.
"""

from __future__ import annotations

import json
import os
import tempfile

from fuzzlib import Reader, main, serve_connection

from virtio_lm.devices.blk import BlkDevice
from virtio_lm.errors import VfioUserMessageError
from virtio_lm.vfio_user.host import VfioUserHost
from virtio_lm.vfio_user.protocol import Message, MessageReader, VfioUserDevice
from virtio_lm.wire import vfio_user as W

MIB = 1 << 20
MAX_CHUNKS = 24
_devices: dict[str, VfioUserDevice] = {}


def device(which: str) -> VfioUserDevice:
    if not _devices:
        work = tempfile.mkdtemp(prefix="vlm-fuzz-vfio-")
        image = os.path.join(work, "disk.img")
        with open(image, "wb") as f:
            f.truncate(MIB)
        os.mkdir(os.path.join(work, "pf"))
        os.mkdir(os.path.join(work, "vf"))
        pf_host = VfioUserHost(os.path.join(work, "pf"), [], profile="virtio-1.4")
        vf_host = VfioUserHost(
            os.path.join(work, "vf"),
            [lambda: BlkDevice(image, queue_max_size=256)],
            total_vfs=2,
            profile="virtio-1.4",
        )
        os.unlink(image)  # the device holds it open
        _devices.update(pf=pf_host.devices["pf"], vf=vf_host.devices["vf1"])
    return _devices[which]


def check_reply(reply: bytes | None, msg: Message) -> None:
    h = msg.header
    if h.flags & W.MsgFlags.NO_REPLY:
        assert reply is None, (msg.name, reply[:16] if reply else reply)
        return
    assert reply is not None, msg.name
    r = W.Header.decode(reply[: W.HEADER_SIZE])
    assert (r.id, r.command) == (h.id, h.command), (r, h)
    assert r.size == len(reply), (r.size, len(reply))
    assert r.flags & W.MSG_TYPE_MASK == W.MSG_TYPE_REPLY, r.flags
    if r.flags & W.MsgFlags.ERROR:
        assert r.error != 0 and len(reply) == W.HEADER_SIZE, r
    else:
        assert r.error == 0, r


def _hello(dev: VfioUserDevice) -> None:
    """A fresh client: VERSION, then the vendor id from configuration space."""
    caps = (
        json.dumps(
            {"capabilities": {"max_msg_fds": 8, "max_data_xfer_size": MIB}}
        ).encode()
        + b"\0"
    )
    payload = W.VersionHead(W.VERSION_MAJOR, W.VERSION_MINOR).encode() + caps
    reader = MessageReader()
    try:
        for m in reader.feed(
            W.Header(1, W.Command.VERSION, W.HEADER_SIZE + len(payload), 0, 0).encode()
            + payload
        ):
            check_reply(dev.handle(m), m)
        access = W.RegionAccess(0, W.PciRegion.CONFIG, 2).encode()
        (m,) = reader.feed(
            W.Header(
                2, W.Command.REGION_READ, W.HEADER_SIZE + len(access), 0, 0
            ).encode()
            + access
        )
        reply = dev.handle(m)
        check_reply(reply, m)
        assert reply is not None and int.from_bytes(reply[-2:], "little") in (
            0x1AF4,
            0xFFFF,
        ), reply
    finally:
        reader.close()
        dev.disconnect()


def TestOneInput(data: bytes) -> None:
    r = Reader(data)
    dev = device("vf" if r.u8() & 1 else "pf")
    serve_connection(
        r,
        MessageReader(),
        dev.handle,
        dev.disconnect,
        check_reply,
        VfioUserMessageError,
        VfioUserMessageError,
        MAX_CHUNKS,
    )
    _hello(dev)


if __name__ == "__main__":
    main(TestOneInput)
