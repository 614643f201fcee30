"""QMP input: bytes from a client through the monitor's protocol and argument checking.

A :class:`QmpConnection` over a command table with the host's commands and
their argument schemas (``migrate-set-parameters`` with the host's
``PARAM_SCHEMA``, ``migrate``/``migrate-incoming`` with ``uri``, ...).  The
handlers only echo their validated arguments: a fuzzer must not start
migrations, open sockets or write files.  Small limits (``max_message`` 512,
``max_depth`` 8) so that the limit paths are reached.

Input: ``flags u8 (bit 0: negotiate first), ncuts u8 (mod 8), ncuts * u16 cut
offsets, client bytes``.  The bytes are fed once whole and once cut at the
offsets, into two connections.

Invariants:
* ``feed`` never raises, whatever the bytes and however they are cut.
* Every answer is one CRLF-terminated JSON object holding ``return`` xor
  ``error``; an error has a string ``class`` and ``desc``; an ``id`` is echoed
  only as given.
* How the input is cut does not matter: both connections answer the same
  bytes and end in the same state (negotiated, closing, mid-message).
* A connection that closes itself says why with a :class:`QmpLimitError`.
"""

from __future__ import annotations

import json

from fuzzlib import Reader, main

from virtio_lm.errors import QmpLimitError
from virtio_lm.host.host import PARAM_SCHEMA
from virtio_lm.host.qmp import CommandTable, QmpConnection

VM = {"*vm": "str"}
SCHEMAS = {
    "query-status": VM, "stop": VM, "cont": VM, "query-migrate": VM, "migrate_cancel": VM,
    "migrate": {"uri": "str", **VM}, "migrate-incoming": {"uri": "str", **VM},
    "migrate-set-parameters": PARAM_SCHEMA, "query-migrate-parameters": None, "query-vfs": None,
    "x-vm-verify": {"*vm": "str", "*disk": "bool"},
}


def table() -> CommandTable:
    t = CommandTable()
    for name, schema in SCHEMAS.items():
        t.register(name, lambda a: dict(a), args_schema=schema)
    return t


_table = table()


def connection(negotiate: bool) -> QmpConnection:
    c = QmpConnection(_table, max_message=512, max_depth=8)
    c.start()
    if negotiate:
        assert c.feed(b'{"execute": "qmp_capabilities"}') == b'{"return": {}}\r\n'
    return c


def check_answers(out: bytes) -> None:
    assert out == b"" or out.endswith(b"\r\n"), out[-40:]
    for line in out.split(b"\r\n")[:-1]:
        m = json.loads(line)
        assert isinstance(m, dict), m
        assert ("return" in m) != ("error" in m), m
        assert set(m) <= {"return", "error", "id"}, m
        if "error" in m:
            assert isinstance(m["error"]["class"], str) and isinstance(m["error"]["desc"], str), m


def state(c: QmpConnection) -> tuple:
    return c.negotiated, c.closing, c.in_message, type(c.close_reason)


def TestOneInput(data: bytes) -> None:
    r = Reader(data)
    negotiate = bool(r.u8() & 1)
    cuts = [r.u16() for _ in range(r.u8() % 8)]
    body = r.rest()
    whole = connection(negotiate)
    out_whole = whole.feed(body)
    check_answers(out_whole)
    pieces = connection(negotiate)
    out_pieces = b""
    prev = 0
    for cut in sorted({c % (len(body) + 1) for c in cuts}) + [len(body)]:
        out_pieces += pieces.feed(body[prev:cut])
        prev = cut
    assert out_pieces == out_whole, "the answers depend on how the input was cut"
    assert state(pieces) == state(whole), (state(pieces), state(whole))
    if whole.closing:
        assert isinstance(whole.close_reason, QmpLimitError), whole.close_reason


if __name__ == "__main__":
    main(TestOneInput)
