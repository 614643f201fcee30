"""Wire format of the DMA test device (:mod:`virtio_lm.devices.dmatest`).

A virtio-lm-only device type (device id :data:`DMATEST_DEVICE_ID` = 63, which
the virtio spec has not assigned; 63 is also the last id the modern PCI
device-id range 0x1040 + id can carry) with one request queue.  A request is
one descriptor chain::

    device-readable                           device-writable
    +----------------------+-------------+    +------------------------+--------+
    | DmaTestReqHeader (24)| payload ... |    | data area ...          | status |
    +----------------------+-------------+    +------------------------+--------+
      le32 op                (ECHO only)        written by the device      u8
      le32 length                               (FILL / ECHO), zero-padded
      le64 seed                                 up to the status byte
      le32 delay_us
      le32 reserved (0)

Like virtio-blk, the status is the LAST byte of the writable part.  The
device writes the whole writable part (data, zero padding, status) and
returns the chain with ``used_len`` = the writable part's length.

* FILL: ``length`` bytes of the pattern of ``seed`` (see
  :func:`virtio_lm.devices.dmatest.fill_pattern`) at the start of the data
  area; no payload allowed.
* ECHO: the payload (``length`` bytes, exactly the readable bytes after the
  header) copied to the start of the data area.

``delay_us`` (at most :data:`MAX_DELAY_US`) slows the back-end work down.

The device-specific configuration space is :class:`DmaTestConfig`: the
largest data area the device serves (``max_len``); a driver keeps each part
of a request within ``max_len`` (+ header / + status).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from virtio_lm.wire.codec import layout, reserved

DMATEST_DEVICE_ID = 63
STATUS_SIZE = 1
MAX_DELAY_US = 1_000_000


class DmaTestOp(enum.IntEnum):
    FILL = 1
    ECHO = 2


class DmaTestStatus(enum.IntEnum):
    """The status byte at the end of the writable part."""

    OK = 0
    IOERR = 1  # malformed request (short header, bad length, reserved bits, delay too long)
    UNSUPP = 2  # unknown op


@layout("<IIQII")
@dataclass(frozen=True, slots=True)
class DmaTestReqHeader:
    """The request header (24 bytes).  ``op`` is kept raw: an unknown op is UNSUPP, not a decode error."""

    op: int
    length: int
    seed: int
    delay_us: int = 0
    reserved: int = reserved()


@layout("<I")
@dataclass(frozen=True, slots=True)
class DmaTestConfig:
    """Device configuration space (4 bytes, read-only)."""

    max_len: int
