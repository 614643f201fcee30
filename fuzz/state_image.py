"""Device state images through a VF's save / validate / restore.

Targets (the first input byte picks one): a virtio-net VF (its NET_* records,
queues, requests in flight) and a DmaTest VF (transport records and INFLIGHT
records only).  Each is a frozen destination VF built once per process; a
restore overwrites all of its migratable state, so inputs do not leak into
each other.

Input: ``target u8, fix u8, image bytes``.  With ``fix`` bit 0 the harness
rewrites the header's ``total_len`` and CRC-32 to match the bytes that follow,
so that mutations reach the record checks instead of dying at the checksum.

Invariants:
* ``mig_validate`` either returns or raises :class:`StateImageError` -- never
  anything else -- and a refused image changes nothing: the VF saves the same
  image as before.
* An accepted image round-trips exactly: restored, the VF saves it back
  byte-identical (issue 12: a field accepted and then dropped is a defect).
"""

from __future__ import annotations

import zlib

from fuzzlib import Reader, main

from virtio_lm.devices.dmatest import DmaTestDevice
from virtio_lm.errors import StateImageError, WireError
from virtio_lm.memory import Memory
from virtio_lm.net.testbed import make_vm
from virtio_lm.pci import VirtioPciFunction
from virtio_lm.wire.ctrl import VfState
from virtio_lm.wire.state import ImageHeader

_targets: list | None = None


def targets() -> list:
    """[(name, device)]: the destination devices, built on first use."""
    global _targets
    if _targets is None:
        net = make_vm(None, name="fuzz-net")
        net.controller.set_state(1, VfState.FREEZED)
        mem = Memory(1 << 20, name="fuzz-dma")
        fn = VirtioPciFunction(DmaTestDevice(), mem.device_port("fuzz-dma-vf"), name="fuzz-dma-vf")
        _targets = [("net", net.dev), ("dmatest", fn.device)]
    return _targets


def fix_header(blob: bytes) -> bytes:
    """total_len and CRC-32 made to match the body (the other header fields kept)."""
    if len(blob) < ImageHeader.SIZE:
        return blob
    try:
        h = ImageHeader.unpack_from(blob, 0)
    except WireError:  # a header the codec cannot even read (pad bytes): left as it is
        return blob
    body = blob[ImageHeader.SIZE :]
    return ImageHeader(h.magic, h.version, h.device_id, len(blob), zlib.crc32(body), h.num_records).encode() + body


def TestOneInput(data: bytes) -> None:
    r = Reader(data)
    ts = targets()
    _, dev = ts[r.u8() % len(ts)]
    fix = r.u8()
    blob = r.rest()
    if fix & 1:
        blob = fix_header(blob)
    before = dev.mig_save()
    try:
        parsed = dev.mig_validate(blob)
    except StateImageError:
        assert dev.mig_save() == before, "a refused image changed the VF"
        return
    dev.mig_restore(parsed)
    again = dev.mig_save()
    assert again == blob, "an accepted image did not save back byte-identical"


if __name__ == "__main__":
    main(TestOneInput)
