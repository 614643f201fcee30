"""vhost-user messages from a hostile front-end, through the real reader and back-end.

The bytes go through :class:`MessageReader` (framing) into a
:class:`VhostUserBackend` serving a virtio-blk device, as the socket server feeds
them.  File descriptors come with a chunk when the input says so: a 1 MiB memfd
(guest memory or a dirty log) or an eventfd (kick / call), as a front-end would
pass them with SCM_RIGHTS.  At the end the connection is dropped
(``MessageReader.eof`` and ``VhostUserBackend.disconnect``), as the server does.

Input: chunks of ``nfds u8 (mod 3), kind u8 (bit i: fd i is an eventfd),
length u16 (mod 4 KiB), bytes``.

Invariants:
* The reader refuses only with :class:`VhostMessageError` and the back-end only
  with :class:`VhostUserError`; a refusal ends the connection (as in the server).
* Every reply is one well-formed reply: a header with version 1 and the REPLY
  flag, the request it answers, and exactly ``size`` payload bytes.
* Nothing leaks: once the connection is gone every fd the front-end passed is
  closed (the process has the same open fds as before the input).
"""

from __future__ import annotations

import os
import tempfile

from fuzzlib import Reader, main, serve_connection

from virtio_lm.devices.blk import BlkDevice
from virtio_lm.errors import VhostMessageError, VhostUserError
from virtio_lm.vhost.backend import VhostUserBackend
from virtio_lm.vhost.protocol import MessageReader
from virtio_lm.wire.vhost_user import VERSION, Header, HeaderFlags

MIB = 1 << 20
MAX_CHUNKS = 24
_backend: VhostUserBackend | None = None


def backend() -> VhostUserBackend:
    global _backend
    if _backend is None:
        fd, path = tempfile.mkstemp(prefix="vlm-fuzz-", suffix=".img")
        os.ftruncate(fd, MIB)
        os.close(fd)
        _backend = VhostUserBackend(
            BlkDevice(path, queue_max_size=256), name="fuzz-vhost"
        )
        os.unlink(path)  # the device holds it open
    return _backend


def check_reply(reply: bytes | None, msg) -> None:
    if reply is None:
        return
    h = Header.decode(reply[: Header.SIZE])  # type: ignore[attr-defined]
    assert h.request == msg.request, (h.request, msg.request)
    assert h.flags & HeaderFlags.REPLY and h.flags & 0x3 == VERSION, h.flags
    assert len(reply) == Header.SIZE + h.size, (len(reply), h.size)  # type: ignore[attr-defined]


def TestOneInput(data: bytes) -> None:
    be = backend()
    r = Reader(data)
    serve_connection(
        r,
        MessageReader(),
        be.handle,
        be.disconnect,
        check_reply,
        VhostMessageError,
        VhostUserError,
        MAX_CHUNKS,
    )


if __name__ == "__main__":
    main(TestOneInput)
