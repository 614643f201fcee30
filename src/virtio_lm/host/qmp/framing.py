"""QMP on the wire, sans-I/O: message encoding and events, and :class:`QmpConnection` --
bytes in, requests and answers out (see :mod:`virtio_lm.host.qmp`)."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping
from typing import Any

from virtio_lm.errors import (
    MonitorError,
    QmpError,
    QmpLimitError,
)
from virtio_lm.wire import strictjson

from virtio_lm.host.qmp.commands import (
    ALREADY_NEGOTIATED_DESC,
    BUILTINS,
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_MESSAGE,
    NEGOTIATION_DESC,
    CommandTable,
    run_handler,
)

log = logging.getLogger(__name__)

_EVENT_RE = re.compile(r"[A-Z][A-Z0-9_]*\Z")


# =========================================================================== encoding
def encode(message: Mapping[str, Any]) -> bytes:
    """One server message on the wire: compact-ish JSON (QEMU's spacing), ASCII, then CRLF."""
    return json.dumps(message, ensure_ascii=True, allow_nan=False).encode("ascii") + b"\r\n"


def make_event(name: str, data: Mapping[str, Any] | None = None, *, now_ns: int | None = None) -> bytes:
    """Encode an event with a timestamp (wall clock, like QEMU's; ``now_ns`` overrides)."""
    if not isinstance(name, str) or not _EVENT_RE.match(name):
        raise MonitorError(f"bad QMP event name {name!r} (upper case, digits, '_')")
    if data is not None and not isinstance(data, Mapping):
        raise MonitorError(f"event {name} data must be a mapping, got {type(data).__name__}")
    ns = time.time_ns() if now_ns is None else now_ns
    msg: dict[str, Any] = {"event": name}
    if data is not None:
        msg["data"] = dict(data)
    msg["timestamp"] = {"seconds": ns // 1_000_000_000, "microseconds": (ns // 1000) % 1_000_000}
    try:
        return encode(msg)
    except (TypeError, ValueError) as exc:
        raise MonitorError(f"event {name} data is not JSON: {exc}") from exc


def error_message(desc: str, error_class: str = "GenericError", *, has_id: bool = False, id_: Any = None) -> bytes:
    msg: dict[str, Any] = {"error": {"class": error_class, "desc": desc}}
    if has_id:
        msg["id"] = id_
    return encode(msg)


# =========================================================================== sans-I/O connection
_WS = b" \t\r\n"
_STRUCT_RE = re.compile(rb'["{}\[\]]')
_STRING_RE = re.compile(rb'["\\]')
_SCALAR_END_RE = re.compile(rb'[ \t\r\n{}\[\],:"]')


def _parse(raw: bytes) -> Any:
    """Parse one complete JSON text strictly (no NaN/Infinity, no duplicate keys)."""
    text = raw.decode("utf-8")
    return strictjson.loads(text)


class Request:
    """One unit of in-band work from a client, in arrival order.

    ``run()`` produces the response bytes (never raises).  ``needs_dispatch`` is
    True when running it calls a registered handler (which may block); False
    when it is answered from the protocol alone.  ``final`` means the client is
    disconnected after the answer.
    """

    __slots__ = ("_conn", "command", "arguments", "has_id", "id", "_canned", "final", "_done")

    def __init__(self, conn: QmpConnection, *, command: str | None = None, arguments: dict | None = None,
                 has_id: bool = False, id_: Any = None, canned: bytes | None = None, final: bool = False) -> None:
        self._conn = conn
        self.command = command
        self.arguments = arguments
        self.has_id = has_id
        self.id = id_
        self._canned = canned
        self.final = final
        self._done = False

    @property
    def needs_dispatch(self) -> bool:
        return (
            self._canned is None
            and self._conn.negotiated
            and self.command not in BUILTINS
            and self.command in self._conn.table
        )

    def run(self) -> bytes:
        if self._done:
            raise MonitorError("a QMP request runs once")
        self._done = True
        if self._canned is not None:
            return self._canned
        return self._conn.execute(self)

    def __repr__(self) -> str:
        what = self.command if self._canned is None else self._canned.decode("ascii", "replace").strip()
        return f"Request({what!r}, id={self.id!r})"


class QmpConnection:
    """The QMP protocol of one client, without I/O.

    ``start()`` -> greeting bytes.  ``receive_data(b)`` buffers input;
    ``next_request()`` returns the next :class:`Request` (or None when no complete
    message is buffered); ``Request.run()`` -> answer bytes.  ``feed(b)`` does all
    three at once (handy when handlers do not block).  ``accepts_events`` says
    whether events go to this client; ``make_event`` encodes one.
    """

    def __init__(self, table: CommandTable, *, max_message: int = DEFAULT_MAX_MESSAGE,
                 max_depth: int = DEFAULT_MAX_DEPTH) -> None:
        if max_message < 16 or max_depth < 1:
            raise MonitorError("max_message must be >= 16 and max_depth >= 1")
        self.table = table
        self.max_message = max_message
        self.max_depth = max_depth
        self.negotiated = False
        self.started = False
        self.closing = False  # a final request was handed out; input is ignored
        self.close_reason: QmpLimitError | None = None
        self._buf = bytearray()
        self._pos = 0  # scan position
        self._msg_start = -1  # start of the message being scanned, -1 between messages
        self._depth = 0
        self._in_str = False
        self._scalar = False

    # ---------------------------------------------------------------- output side
    def start(self) -> bytes:
        if self.started:
            raise MonitorError("the QMP greeting is sent once")
        self.started = True
        return encode(self.table.greeting())

    @property
    def accepts_events(self) -> bool:
        return self.negotiated and not self.closing

    def event(self, name: str, data: Mapping[str, Any] | None = None, *, now_ns: int | None = None) -> bytes:
        """The event's bytes for this client, or b"" if it has not negotiated."""
        if not self.accepts_events:
            return b""
        return make_event(name, data, now_ns=now_ns)

    # ---------------------------------------------------------------- input side
    @property
    def buffered_bytes(self) -> int:
        return len(self._buf) - (self._msg_start if self._msg_start >= 0 else self._pos)

    @property
    def in_message(self) -> bool:
        """True while part of a message has been read and the rest is awaited (an open
        string, array or object, or a token that may go on)."""
        return self._msg_start >= 0

    def receive_data(self, data: bytes) -> None:
        if not self.started:
            raise MonitorError("QmpConnection.start() (the greeting) comes before any input")
        if self.closing:
            return
        self._buf += data

    def feed(self, data: bytes) -> bytes:
        """receive_data + run every complete request; the concatenated answers."""
        self.receive_data(data)
        out = []
        while (req := self.next_request()) is not None:
            out.append(req.run())
        return b"".join(out)

    def next_request(self) -> Request | None:
        if self.closing:
            return None
        while True:
            found = self._scan()
            if found is None:
                return None
            kind, payload = found
            if kind == "stray":
                return Request(self, canned=error_message(f"JSON parse error, stray '{payload}'"))
            if kind == "limit":
                self.closing = True
                self.close_reason = payload
                self._buf.clear()
                self._pos = 0
                self._msg_start = -1
                return Request(self, canned=error_message(f"JSON parse error, {payload}"), final=True)
            return self._request_from(payload)

    def _request_from(self, raw: bytes) -> Request:
        try:
            obj = _parse(raw)
        except UnicodeDecodeError:
            return Request(self, canned=error_message("JSON parse error, invalid UTF-8 sequence"))
        except json.JSONDecodeError as exc:
            if raw[:1] not in (b"{", b"[", b'"'):  # a bare token at top level
                token = raw[:32].decode("utf-8", "replace")
                return Request(self, canned=error_message(f"JSON parse error, invalid token '{token}'"))
            return Request(self, canned=error_message(f"JSON parse error, {exc.msg.lower()}"))
        except (ValueError, RecursionError) as exc:
            return Request(self, canned=error_message(f"JSON parse error, {exc}"))
        if not isinstance(obj, dict):
            return Request(self, canned=error_message("QMP input must be a JSON object"))
        has_id = "id" in obj
        id_ = obj.get("id")
        command = None
        for key, value in obj.items():
            if key == "execute":
                if not isinstance(value, str):
                    desc = "QMP input member 'execute' must be a string"
                    return Request(self, canned=error_message(desc, has_id=has_id, id_=id_))
                command = value
            elif key == "arguments":
                if not isinstance(value, dict):
                    desc = "QMP input member 'arguments' must be an object"
                    return Request(self, canned=error_message(desc, has_id=has_id, id_=id_))
            elif key != "id":
                # 'exec-oob' lands here too: out-of-band execution is not offered.
                desc = f"QMP input member '{key}' is unexpected"
                return Request(self, canned=error_message(desc, has_id=has_id, id_=id_))
        if command is None:
            return Request(self, canned=error_message("QMP input lacks member 'execute'", has_id=has_id, id_=id_))
        return Request(self, command=command, arguments=obj.get("arguments", {}), has_id=has_id, id_=id_)

    # ---------------------------------------------------------------- dispatch
    def execute(self, req: Request) -> bytes:
        name = req.command
        try:
            if not self.negotiated and name != "qmp_capabilities":
                raise QmpError(NEGOTIATION_DESC, "CommandNotFound")
            cmd = self.table.lookup(name)
            if cmd is None:
                raise QmpError(f"The command {name} has not been found", "CommandNotFound")
            if name == "qmp_capabilities":
                args = cmd.validate(req.arguments)
                if self.negotiated:
                    raise QmpError(ALREADY_NEGOTIATED_DESC, "CommandNotFound")
                if args.get("enable"):
                    raise QmpError(f"Capability {args['enable'][0]} not available")
                self.negotiated = True
                result: Any = {}
            else:
                result = run_handler(cmd, req.arguments)
        except QmpError as exc:
            return error_message(exc.desc, exc.error_class, has_id=req.has_id, id_=req.id)
        msg: dict[str, Any] = {"return": result}
        if req.has_id:
            msg["id"] = req.id
        return encode(msg)

    # ---------------------------------------------------------------- framing
    def _compact(self) -> None:
        cut = self._msg_start if self._msg_start >= 0 else self._pos
        if cut > 65536 and cut * 2 > len(self._buf):
            del self._buf[:cut]
            self._pos -= cut
            if self._msg_start >= 0:
                self._msg_start -= cut

    def _scan(self) -> tuple[str, Any] | None:
        """Find the next complete top-level JSON text in the buffer.

        Returns ("msg", bytes), ("stray", char), ("limit", QmpLimitError) or None
        (need more bytes).  Scanning state survives between calls so a message
        arriving a byte at a time is scanned once.
        """
        buf = self._buf
        n = len(buf)
        i = self._pos
        if self._msg_start < 0:
            while i < n and buf[i] in _WS:
                i += 1
            self._pos = i
            if i == n:
                self._compact()
                return None
            c = buf[i]
            if c in b"}],:":
                self._pos = i + 1
                return ("stray", chr(c))
            self._msg_start = i
            self._depth = 0
            self._in_str = False
            self._scalar = False
            if c in b"{[":
                self._depth = 1
            elif c == 0x22:  # '"'
                self._in_str = True
            else:
                self._scalar = True
            i += 1
        start = self._msg_start
        end = -1
        if self._scalar:
            m = _SCALAR_END_RE.search(buf, i)
            if m is not None:
                end = m.start()
            else:
                i = n
        else:
            while True:
                if self._in_str:
                    m = _STRING_RE.search(buf, i)
                    if m is None:
                        i = n
                        break
                    if buf[m.start()] == 0x5C:  # backslash: skip the escaped byte
                        if m.start() + 1 >= n:
                            i = m.start()  # rescan the backslash when more arrives
                            break
                        i = m.start() + 2
                        continue
                    self._in_str = False
                    i = m.end()
                    if self._depth == 0:
                        end = i
                        break
                    continue
                m = _STRUCT_RE.search(buf, i)
                if m is None:
                    i = n
                    break
                c = buf[m.start()]
                i = m.end()
                if c == 0x22:
                    self._in_str = True
                elif c in b"{[":
                    self._depth += 1
                    if self._depth > self.max_depth:
                        return ("limit", QmpLimitError("nesting depth", self._depth, self.max_depth))
                else:
                    self._depth -= 1
                    if self._depth == 0:
                        end = i
                        break
        if end < 0:
            self._pos = i
            if n - start > self.max_message:
                return ("limit", QmpLimitError("message size", n - start, self.max_message))
            self._compact()
            return None
        if end - start > self.max_message:
            return ("limit", QmpLimitError("message size", end - start, self.max_message))
        raw = bytes(buf[start:end])
        self._pos = end
        self._msg_start = -1
        self._compact()
        return ("msg", raw)
