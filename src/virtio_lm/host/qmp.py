"""The host's monitor: QEMU's QMP wire protocol over a unix or TCP socket.

Three layers:

* :class:`CommandTable` -- the commands a monitor knows: name, handler,
  argument schema.  Built in: ``qmp_capabilities``, ``query-version``,
  ``query-commands``.  The host process registers the rest.
* :class:`QmpConnection` -- the sans-I/O protocol of one client: bytes in,
  requests out, bytes back.  Greeting, capabilities negotiation, request
  checking, argument checking, dispatch, responses, events.
* :class:`QmpServer` -- an asyncio event loop in a background thread that
  listens, accepts many clients, runs each :class:`QmpConnection`, and a
  dispatcher thread that runs command handlers.

Wire format (as QEMU's ``docs/interop/qmp-spec``)
-------------------------------------------------
Each server message is one JSON object followed by ``\\r\\n``.  On connect
the server sends the greeting::

    {"QMP": {"version": {"qemu": {"major": 8, "minor": 2, "micro": 0},
                         "package": "virtio-lm 0.1.0"},
             "capabilities": []}}

Version scheme: ``qemu`` is the QEMU release whose QMP migration interface
(command names, argument and field names, units) this monitor follows
(:data:`QEMU_COMPAT_VERSION`), so tools that gate features on the QEMU
version see the interface they expect; ``package`` names virtio-lm and its
own version.  (The ``qemu.qmp`` client only checks that ``version`` is an
object and ``capabilities`` an array.)  No capability is offered: there is
no out-of-band execution, so ``exec-oob`` is refused like any unexpected
member, and ``qmp_capabilities`` with ``enable: ["oob"]`` fails.

Clients send JSON objects, with or without newlines between them, split
across reads or several per read.  A request is
``{"execute": NAME, "arguments": {...}, "id": ANY}`` (``arguments`` and
``id`` optional); the answer is ``{"return": VALUE, "id": ID}`` or
``{"error": {"class": CLASS, "desc": TEXT}, "id": ID}`` (``id`` echoed when
the request had one).  Events are
``{"event": NAME, "data": {...}, "timestamp": {"seconds": S,
"microseconds": US}}`` (``data`` omitted for events without data), sent to
every client that has completed negotiation.

Until a client has run ``qmp_capabilities``, every other command fails with
``CommandNotFound`` "Expecting capabilities negotiation with
'qmp_capabilities'"; a second ``qmp_capabilities`` fails with
``CommandNotFound`` too.  Malformed input gets QEMU's ``GenericError``
texts ("JSON parse error, ...", "QMP input must be a JSON object", "QMP
input lacks member 'execute'", ...), with no ``id`` when the input could not
be read as an object.  Argument errors use QEMU's texts: "Parameter 'x' is
unexpected", "Parameter 'x' is missing", "Invalid parameter type for 'x',
expected: integer", "Parameter 'x' does not accept value 'y'".

Bounds (hostile clients)
------------------------
* One message may hold at most ``max_message`` bytes (default 1 MiB) and
  nest at most ``max_depth`` (default 64) arrays/objects.  Past either the
  client gets an error (no ``id``) and is disconnected
  (:class:`~virtio_lm.errors.QmpLimitError` as the connection's
  ``close_reason``): an unterminated message cannot be resynchronised.
* Garbage that *is* delimited (a stray token, a bad object) gets an error
  and the stream goes on with the next message.
* The server reads no further while a client has a command running and
  ``read_high_water`` bytes (default 256 KiB) waiting: a client flooding
  commands is slowed by TCP, not buffered without end.
* A client that does not read what it is sent (responses, events) is
  disconnected once ``max_output`` bytes (default 4 MiB) wait for it.
* At most ``max_clients`` (default 64) clients; more are closed at once.

Threads and handlers
--------------------
The event loop thread does all socket I/O, parsing, request checking and
the built-in commands.  Every registered command's handler runs on one
dispatcher thread, one command at a time in arrival order over all
clients (as QEMU runs QMP commands under its big lock), so handlers never
race each other and may block; a blocking handler delays other clients'
commands but never I/O, greetings, events or the built-ins.  Long work
(``migrate``) should start a job and return at once, as in QEMU.  Each
client has at most one command in flight, so its answers come back in
request order.  :meth:`QmpServer.emit_event` may be called from any thread
(handlers included: an event emitted while a command runs reaches the
client before that command's answer).  :meth:`QmpServer.close` may be
called from any thread, a handler too (``quit``): that handler's answer is
still delivered before the connections close.

Handlers receive one ``dict`` of validated arguments (optional arguments
that were not given are absent) and return a JSON-able value (``None``
answers ``{}``), or raise :class:`~virtio_lm.errors.QmpError` with a QMP
error class.  Any other :class:`~virtio_lm.errors.VirtioLmError` answers
``GenericError`` with its message; any other exception is a bug: it is
logged with its traceback and answers ``GenericError`` "internal error
...", and the monitor keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import re
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from virtio_lm import __version__
from virtio_lm import addr as addresses
from virtio_lm.errors import (
    CommandRegistrationError,
    MonitorAddressError,
    MonitorError,
    QmpError,
    QmpLimitError,
    VirtioLmError,
)
from virtio_lm.wire import strictjson

log = logging.getLogger(__name__)

#: The QEMU release whose QMP interface (names, fields, units) the monitor follows.
QEMU_COMPAT_VERSION: tuple[int, int, int] = (8, 2, 0)
#: What the greeting and ``query-version`` report as ``package``.
PACKAGE = f"virtio-lm {__version__}"

DEFAULT_MAX_MESSAGE = 1 << 20
DEFAULT_MAX_DEPTH = 64
DEFAULT_MAX_OUTPUT = 4 << 20
DEFAULT_READ_HIGH_WATER = 256 << 10
DEFAULT_MAX_CLIENTS = 64

NEGOTIATION_DESC = "Expecting capabilities negotiation with 'qmp_capabilities'"
ALREADY_NEGOTIATED_DESC = "Capabilities negotiation is already complete, command ignored"

_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.+-]*\Z")
_EVENT_RE = re.compile(r"[A-Z][A-Z0-9_]*\Z")
_BUILTINS = ("qmp_capabilities", "query-version", "query-commands")

Handler = Callable[[dict[str, Any]], Any]


# =========================================================================== schema
#
# Argument schemas follow QAPI's notation:
#   {"uri": "str", "*detach": "bool", "*caps": ["str"], "*mode": ("a", "b"),
#    "*limits": {"rate": "uint64", "*burst": "size"}}
# A leading '*' marks an optional member.  Types: "str", "int" (int64),
# "uint64", "size" (uint64), "number" (int or float), "bool", "any",
# "object" (any JSON object); [T] an array of T; a tuple of strings an enum;
# a dict a nested struct.

_SCALARS = {
    "str": "string",
    "int": "integer",
    "uint64": "integer",
    "size": "integer",
    "number": "number",
    "bool": "boolean",
    "any": None,
    "object": "object",
}
_INT64 = (-(1 << 63), (1 << 63) - 1)
_UINT64 = (0, (1 << 64) - 1)


@dataclass(frozen=True)
class _Member:
    name: str
    optional: bool
    node: Any


def _compile(spec: Any, where: str) -> Any:
    """Turn a schema spec into a node: ("scalar", t) | ("array", n) | ("enum", vals) | ("struct", members)."""
    if isinstance(spec, str):
        if spec not in _SCALARS:
            raise CommandRegistrationError(f"{where}: unknown type {spec!r}")
        return ("scalar", spec)
    if isinstance(spec, list):
        if len(spec) != 1:
            raise CommandRegistrationError(f"{where}: an array type is [T] with exactly one T")
        return ("array", _compile(spec[0], f"{where}[]"))
    if isinstance(spec, tuple):
        if not spec or not all(isinstance(v, str) and v for v in spec) or len(set(spec)) != len(spec):
            raise CommandRegistrationError(f"{where}: an enum is a tuple of distinct non-empty strings")
        return ("enum", spec)
    if isinstance(spec, Mapping):
        members = []
        seen = set()
        for key, sub in spec.items():
            if not isinstance(key, str):
                raise CommandRegistrationError(f"{where}: member names are strings, got {key!r}")
            optional = key.startswith("*")
            name = key[1:] if optional else key
            if not _NAME_RE.match(name) or name in seen:
                raise CommandRegistrationError(f"{where}: bad or repeated member name {key!r}")
            seen.add(name)
            members.append(_Member(name, optional, _compile(sub, f"{where}.{name}")))
        return ("struct", tuple(members))
    raise CommandRegistrationError(f"{where}: cannot read schema {spec!r}")


def _type_error(path: str, expected: str) -> QmpError:
    return QmpError(f"Invalid parameter type for '{path}', expected: {expected}")


def _check(value: Any, node: Any, path: str) -> Any:
    kind = node[0]
    if kind == "scalar":
        t = node[1]
        if t == "any":
            return value
        if t == "str":
            if not isinstance(value, str):
                raise _type_error(path, "string")
        elif t == "bool":
            if not isinstance(value, bool):
                raise _type_error(path, "boolean")
        elif t == "number":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _type_error(path, "number")
        elif t == "object":
            if not isinstance(value, dict):
                raise _type_error(path, "object")
        else:  # int, uint64, size
            if isinstance(value, bool) or not isinstance(value, int):
                raise _type_error(path, "integer")
            lo, hi = _INT64 if t == "int" else _UINT64
            if not lo <= value <= hi:
                if t == "int":
                    raise _type_error(path, "integer")
                raise QmpError(f"Parameter '{path}' expects {t}")
        return value
    if kind == "enum":
        if not isinstance(value, str):
            raise _type_error(path, "string")
        if value not in node[1]:
            raise QmpError(f"Parameter '{path}' does not accept value '{value}'")
        return value
    if kind == "array":
        if not isinstance(value, list):
            raise _type_error(path, "array")
        return [_check(v, node[1], f"{path}[{i}]") for i, v in enumerate(value)]
    # struct
    if not isinstance(value, dict):
        raise _type_error(path, "object")
    return _check_struct(value, node[1], path)


def _check_struct(value: dict, members: tuple[_Member, ...], path: str | None) -> dict:
    out = {}
    known = set()
    for m in members:
        known.add(m.name)
        sub = m.name if path is None else f"{path}.{m.name}"
        if m.name not in value:
            if not m.optional:
                raise QmpError(f"Parameter '{sub}' is missing")
            continue
        out[m.name] = _check(value[m.name], m.node, sub)
    for key in value:
        if key not in known:
            sub = key if path is None else f"{path}.{key}"
            raise QmpError(f"Parameter '{sub}' is unexpected")
    return out


# =========================================================================== command table
@dataclass(frozen=True)
class Command:
    """A registered command: its name, handler and compiled argument schema."""

    name: str
    handler: Handler
    members: tuple[_Member, ...]

    def validate(self, arguments: dict) -> dict:
        """Check ``arguments`` against the schema; return the validated dict or raise QmpError."""
        return _check_struct(arguments, self.members, None)


class CommandTable:
    """The commands a monitor knows.  Thread-safe: register while the server runs.

    ``qemu_version`` and ``package`` are what the greeting and ``query-version``
    report (see the module docstring for the scheme).
    """

    def __init__(
        self,
        *,
        qemu_version: tuple[int, int, int] = QEMU_COMPAT_VERSION,
        package: str = PACKAGE,
    ) -> None:
        if len(qemu_version) != 3 or not all(isinstance(v, int) and v >= 0 for v in qemu_version):
            raise CommandRegistrationError(f"qemu_version must be three non-negative ints, got {qemu_version!r}")
        self._version = tuple(qemu_version)
        self._package = str(package)
        self._lock = threading.Lock()
        self._commands: dict[str, Command] = {}
        self._add("qmp_capabilities", _never_called, {"*enable": [("oob",)]})
        self._add("query-version", lambda args: self.version_info(), None)
        self._add("query-commands", lambda args: [{"name": n} for n in self.names()], None)

    # -- registration
    def _add(self, name: str, handler: Handler, args_schema: Mapping[str, Any] | None) -> None:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise CommandRegistrationError(f"bad command name {name!r}")
        if not callable(handler):
            raise CommandRegistrationError(f"{name}: handler is not callable")
        if args_schema is not None and not isinstance(args_schema, Mapping):
            raise CommandRegistrationError(f"{name}: args_schema must be a mapping (or None)")
        node = _compile(dict(args_schema or {}), name)
        with self._lock:
            if name in self._commands:
                raise CommandRegistrationError(f"command {name!r} is already registered")
            self._commands[name] = Command(name, handler, node[1])

    def register(self, name: str, handler: Handler, *, args_schema: Mapping[str, Any] | None = None) -> None:
        """Register command ``name``.  ``handler(args: dict)`` gets validated arguments and
        returns a JSON-able value (None -> ``{}``) or raises :class:`QmpError`.
        ``args_schema`` uses QAPI notation (module source: "schema"); None = no arguments."""
        self._add(name, handler, args_schema)

    def unregister(self, name: str) -> None:
        if name in _BUILTINS:
            raise CommandRegistrationError(f"built-in command {name!r} cannot be removed")
        with self._lock:
            if self._commands.pop(name, None) is None:
                raise CommandRegistrationError(f"command {name!r} is not registered")

    # -- lookup
    def lookup(self, name: str) -> Command | None:
        with self._lock:
            return self._commands.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._commands)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._commands

    def version_info(self) -> dict:
        major, minor, micro = self._version
        return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": self._package}

    def greeting(self) -> dict:
        return {"QMP": {"version": self.version_info(), "capabilities": []}}

    def call(self, name: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Validate and run a (non-negotiation) command directly; the value it returns
        as it would go on the wire.  Raises :class:`QmpError` like the wire would answer."""
        if name == "qmp_capabilities":
            raise QmpError("qmp_capabilities only makes sense on a connection", "CommandNotFound")
        cmd = self.lookup(name)
        if cmd is None:
            raise QmpError(f"The command {name} has not been found", "CommandNotFound")
        return _run_handler(cmd, dict(arguments or {}))


def _never_called(args: dict) -> Any:  # pragma: no cover - qmp_capabilities is handled by the connection
    raise AssertionError("qmp_capabilities is handled by QmpConnection")


def _run_handler(cmd: Command, arguments: dict) -> Any:
    args = cmd.validate(arguments)
    try:
        result = cmd.handler(args)
    except QmpError:
        raise
    except VirtioLmError as exc:
        raise QmpError(str(exc)) from exc
    except Exception as exc:
        log.exception("QMP command %r failed with an unexpected exception", cmd.name)
        raise QmpError(f"internal error in '{cmd.name}': {type(exc).__name__}: {exc}") from exc
    if result is None:
        result = {}
    try:
        json.dumps(result, allow_nan=False)
    except (TypeError, ValueError) as exc:
        log.error("QMP command %r returned a value that is not JSON: %r", cmd.name, result)
        raise QmpError(f"internal error in '{cmd.name}': result is not JSON ({exc})") from exc
    return result


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


def _error(desc: str, error_class: str = "GenericError", *, has_id: bool = False, id_: Any = None) -> bytes:
    msg: dict[str, Any] = {"error": {"class": error_class, "desc": desc}}
    if has_id:
        msg["id"] = id_
    return encode(msg)


# =========================================================================== sans-I/O connection
_WS = b" \t\r\n"
_STRUCT_RE = re.compile(rb'["{}\[\]]')
_STRING_RE = re.compile(rb'["\\]')
_SCALAR_END_RE = re.compile(rb'[ \t\r\n{}\[\],:"]')


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid keyword '{name}'")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key '{k}'")
        out[k] = v
    return out


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
            and self.command not in _BUILTINS
            and self.command in self._conn.table
        )

    def run(self) -> bytes:
        if self._done:
            raise MonitorError("a QMP request runs once")
        self._done = True
        if self._canned is not None:
            return self._canned
        return self._conn._execute(self)

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
                return Request(self, canned=_error(f"JSON parse error, stray '{payload}'"))
            if kind == "limit":
                self.closing = True
                self.close_reason = payload
                self._buf.clear()
                self._pos = 0
                self._msg_start = -1
                return Request(self, canned=_error(f"JSON parse error, {payload}"), final=True)
            return self._request_from(payload)

    def _request_from(self, raw: bytes) -> Request:
        try:
            obj = _parse(raw)
        except UnicodeDecodeError:
            return Request(self, canned=_error("JSON parse error, invalid UTF-8 sequence"))
        except json.JSONDecodeError as exc:
            if raw[:1] not in (b"{", b"[", b'"'):  # a bare token at top level
                token = raw[:32].decode("utf-8", "replace")
                return Request(self, canned=_error(f"JSON parse error, invalid token '{token}'"))
            return Request(self, canned=_error(f"JSON parse error, {exc.msg.lower()}"))
        except (ValueError, RecursionError) as exc:
            return Request(self, canned=_error(f"JSON parse error, {exc}"))
        if not isinstance(obj, dict):
            return Request(self, canned=_error("QMP input must be a JSON object"))
        has_id = "id" in obj
        id_ = obj.get("id")
        command = None
        for key, value in obj.items():
            if key == "execute":
                if not isinstance(value, str):
                    desc = "QMP input member 'execute' must be a string"
                    return Request(self, canned=_error(desc, has_id=has_id, id_=id_))
                command = value
            elif key == "arguments":
                if not isinstance(value, dict):
                    desc = "QMP input member 'arguments' must be an object"
                    return Request(self, canned=_error(desc, has_id=has_id, id_=id_))
            elif key != "id":
                # 'exec-oob' lands here too: out-of-band execution is not offered.
                desc = f"QMP input member '{key}' is unexpected"
                return Request(self, canned=_error(desc, has_id=has_id, id_=id_))
        if command is None:
            return Request(self, canned=_error("QMP input lacks member 'execute'", has_id=has_id, id_=id_))
        return Request(self, command=command, arguments=obj.get("arguments", {}), has_id=has_id, id_=id_)

    # ---------------------------------------------------------------- dispatch
    def _execute(self, req: Request) -> bytes:
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
                result = _run_handler(cmd, req.arguments)
        except QmpError as exc:
            return _error(exc.desc, exc.error_class, has_id=req.has_id, id_=req.id)
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


# =========================================================================== addresses
@dataclass(frozen=True)
class MonitorAddress:
    """Where a monitor listens: ``kind`` "unix" (``path``) or "tcp" (``host``, ``port``)."""

    kind: str
    path: str | None = None
    host: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else (self.host or "")
        return f"tcp:{host}:{self.port}"

    @property
    def sockaddr(self) -> str | tuple[str, int]:
        """What ``qemu.qmp.QMPClient.connect`` (and socket.connect) take."""
        if self.kind == "unix":
            return self.path  # type: ignore[return-value]
        return (self.host or "127.0.0.1", self.port)  # type: ignore[return-value]


def parse_address(spec: str | os.PathLike | tuple[str, int] | MonitorAddress) -> MonitorAddress:
    """``unix:PATH`` | ``tcp:HOST:PORT`` (``[v6]`` allowed; empty host = every interface)
    | a ``(host, port)`` tuple | a path object (unix)."""
    if isinstance(spec, MonitorAddress):
        return spec
    if isinstance(spec, tuple):
        if len(spec) != 2:
            raise MonitorAddressError(f"a TCP address is (host, port), got {spec!r}")
        return _tcp(str(spec[0]), spec[1], spec)
    if isinstance(spec, os.PathLike):
        return MonitorAddress("unix", path=os.fspath(spec))
    if not isinstance(spec, str):
        raise MonitorAddressError(f"cannot read monitor address {spec!r}")
    if spec.startswith("unix:"):
        path = spec[5:]
        if not path:
            raise MonitorAddressError("unix: address without a path")
        return MonitorAddress("unix", path=path)
    if spec.startswith("tcp:"):
        rest = spec[4:]
        host, sep, port = rest.rpartition(":")
        if not sep:
            raise MonitorAddressError(f"{spec!r}: expected tcp:HOST:PORT")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return _tcp(host, port, spec)
    raise MonitorAddressError(f"{spec!r}: expected unix:PATH or tcp:HOST:PORT")


def _tcp(host: str, port: Any, spec: Any) -> MonitorAddress:
    try:
        p = int(port)
    except (TypeError, ValueError) as exc:
        raise MonitorAddressError(f"{spec!r}: port {port!r} is not a number") from exc
    if isinstance(port, bool) or not 0 <= p <= 65535:
        raise MonitorAddressError(f"{spec!r}: port {port!r} outside 0..65535")
    return MonitorAddress("tcp", host=host, port=p)


# =========================================================================== server
class _Client(asyncio.Protocol):
    """One accepted socket, on the event loop thread."""

    def __init__(self, server: QmpServer) -> None:
        self.server = server
        self.conn = QmpConnection(server.table, max_message=server.max_message, max_depth=server.max_depth)
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.closed = False
        self.paused = False

    # -- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        srv = self.server
        if srv._closing or len(srv._clients) >= srv.max_clients:
            log.warning("QMP: refusing a client (%s)", "closing" if srv._closing else "too many clients")
            self.closed = True
            transport.abort()
            return
        srv._clients.add(self)
        self.write(self.conn.start())

    def data_received(self, data: bytes) -> None:
        if self.gone():
            return
        self.conn.receive_data(data)
        self.pump()

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server._clients.discard(self)

    # -- work
    def gone(self) -> bool:
        """Closed by us, or the transport is closing (a write failed, the peer left):
        nothing more is parsed, run or written for this client."""
        if not self.closed and self.transport is not None and self.transport.is_closing():
            self.closed = True
        return self.closed

    def pump(self) -> None:
        """Answer what can be answered; hand the next command to the dispatcher."""
        while not self.gone() and not self.busy:
            req = self.conn.next_request()
            if req is None:
                if self.paused:
                    self.paused = False
                    self.transport.resume_reading()  # type: ignore[union-attr]
                return
            if req.needs_dispatch:
                self.busy = True
                self.server._submit(self, req)
            else:
                self.deliver(req.run(), req.final)
        if self.busy and not self.paused and not self.gone() \
                and self.conn.buffered_bytes >= self.server.read_high_water:
            self.paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def deliver(self, out: bytes, final: bool) -> None:
        if self.gone():
            return
        self.write(out)
        if final and not self.gone():
            log.warning("QMP: disconnecting a client: %s", self.conn.close_reason)
            self.closed = True
            self.transport.close()  # type: ignore[union-attr]

    def done(self, out: bytes, final: bool) -> None:
        self.busy = False
        self.deliver(out, final)
        self.pump()

    def write(self, data: bytes) -> None:
        if self.gone() or not data:
            return
        t = self.transport
        t.write(data)  # type: ignore[union-attr]
        pending = t.get_write_buffer_size()  # type: ignore[union-attr]
        if pending > self.server.max_output:
            self.conn.close_reason = QmpLimitError("unsent output", pending, self.server.max_output)
            log.warning("QMP: disconnecting a client that does not read: %s", self.conn.close_reason)
            self.closed = True
            t.abort()  # type: ignore[union-attr]


class QmpServer:
    """A QMP monitor listening on ``address`` (``unix:PATH`` / ``tcp:HOST:PORT``, port 0 =
    any free port) for many clients.  ``start()`` binds (raises MonitorAddressError);
    ``address`` is then the bound address.  Also a context manager."""

    def __init__(
        self,
        table: CommandTable,
        address: str | os.PathLike | tuple[str, int] | MonitorAddress,
        *,
        max_message: int = DEFAULT_MAX_MESSAGE,
        max_depth: int = DEFAULT_MAX_DEPTH,
        max_output: int = DEFAULT_MAX_OUTPUT,
        read_high_water: int = DEFAULT_READ_HIGH_WATER,
        max_clients: int = DEFAULT_MAX_CLIENTS,
    ) -> None:
        self.table = table
        self._requested = addresses.parse_address(address, addresses.MONITOR_SCHEMES)
        self.max_message = max_message
        self.max_depth = max_depth
        self.max_output = max_output
        self.read_high_water = read_high_water
        self.max_clients = max_clients
        self._bound: MonitorAddress | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._clients: set[_Client] = set()
        self._queue: queue.Queue = queue.Queue()
        self._io_thread: threading.Thread | None = None
        self._dispatch_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closing = False
        self._close_after_current = False
        self._stopped = threading.Event()
        self._unix_inode: tuple[int, int] | None = None

    # ---------------------------------------------------------------- life cycle
    def start(self) -> QmpServer:
        with self._lock:
            if self._loop is not None:
                raise MonitorError("QmpServer.start() called twice")
            self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._io_thread = threading.Thread(target=self._run_loop, args=(ready,), name="qmp-io", daemon=True)
        self._io_thread.start()
        ready.wait()
        try:
            asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result()
        except BaseException as exc:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._io_thread.join()
            self._closing = True
            self._stopped.set()
            if isinstance(exc, MonitorAddressError):
                raise
            raise MonitorAddressError(f"cannot listen on {self._requested}: {exc}") from exc
        self._dispatch_thread = threading.Thread(target=self._dispatch_loop, name="qmp-dispatch", daemon=True)
        self._dispatch_thread.start()
        return self

    def __enter__(self) -> QmpServer:
        if self._loop is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def address(self) -> MonitorAddress:
        """The bound address (port filled in when 0 was asked)."""
        if self._bound is None:
            raise MonitorError("the server is not listening")
        return self._bound

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def emit_event(self, name: str, data: Mapping[str, Any] | None = None) -> None:
        """Send an event to every negotiated client.  Thread-safe; dropped once closed."""
        encoded = make_event(name, data)
        with self._lock:
            if self._closing or self._loop is None:
                return
            try:
                self._loop.call_soon_threadsafe(self._broadcast, encoded)
            except RuntimeError:  # loop already closed
                return

    def close(self, timeout: float = 5.0) -> None:
        """Stop listening, close every client (flushing what was answered), stop the threads.

        Safe from any thread.  From a command handler (e.g. ``quit``) that handler's
        answer is delivered first and close returns without waiting."""
        with self._lock:
            if self._closing or self._loop is None:
                return
            self._closing = True
        me = threading.current_thread()
        if me is self._dispatch_thread:
            self._close_after_current = True  # the dispatcher shuts down after posting the answer
            return
        self._begin_shutdown()
        if me is self._io_thread:
            return
        self._stopped.wait(timeout)
        if self._dispatch_thread is not None:
            self._dispatch_thread.join(timeout)
        if self._io_thread is not None:
            self._io_thread.join(timeout)

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait until the server has shut down (e.g. after a handler called close())."""
        return self._stopped.wait(timeout)

    # ---------------------------------------------------------------- internals
    def _begin_shutdown(self) -> None:
        self._queue.put(None)
        try:
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._shutdown()))  # type: ignore[union-attr]
        except RuntimeError:
            self._stopped.set()

    def _run_loop(self, ready: threading.Event) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)  # type: ignore[union-attr]
        try:
            loop.run_forever()  # type: ignore[union-attr]
        finally:
            loop.close()  # type: ignore[union-attr]
            self._unlink_socket()
            self._stopped.set()

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        addr = self._requested
        if addr.kind == "unix":
            path = addr.path
            try:
                st = os.lstat(path)  # type: ignore[arg-type]
            except FileNotFoundError:
                pass
            else:
                if not stat.S_ISSOCK(st.st_mode):
                    raise MonitorAddressError(f"{path} exists and is not a socket")
                os.unlink(path)  # type: ignore[arg-type]
            self._server = await loop.create_unix_server(lambda: _Client(self), path)
            st = os.stat(path)  # type: ignore[arg-type]
            self._unix_inode = (st.st_dev, st.st_ino)
            self._bound = MonitorAddress("unix", path=path)
        else:
            host = addr.host or None
            self._server = await loop.create_server(lambda: _Client(self), host, addr.port, reuse_address=True)
            sockname = self._server.sockets[0].getsockname()
            self._bound = MonitorAddress("tcp", host=addr.host or sockname[0], port=sockname[1])

    def _unlink_socket(self) -> None:
        if self._bound is None or self._bound.kind != "unix" or self._unix_inode is None:
            return
        try:  # only the socket we made: never a file someone put there since
            st = os.stat(self._bound.path)  # type: ignore[arg-type]
            if (st.st_dev, st.st_ino) == self._unix_inode:
                os.unlink(self._bound.path)  # type: ignore[arg-type]
        except OSError:
            pass

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for c in list(self._clients):
            c.closed = True
            if c.transport is not None:
                c.transport.close()  # flushes what is buffered, then closes
        deadline = time.monotonic() + 2.0
        while self._clients and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for c in list(self._clients):  # did not take its last bytes in time
            if c.transport is not None:
                c.transport.abort()
        await asyncio.sleep(0)
        asyncio.get_running_loop().stop()

    def _broadcast(self, encoded: bytes) -> None:
        for c in list(self._clients):
            if not c.gone() and c.conn.accepts_events:
                c.write(encoded)

    def _submit(self, client: _Client, req: Request) -> None:
        self._queue.put((client, req))

    def _dispatch_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            client, req = item
            if client.closed:
                continue  # the client left before its command started: drop it, as QEMU does
            out = req.run()
            try:
                self._loop.call_soon_threadsafe(client.done, out, req.final)  # type: ignore[union-attr]
            except RuntimeError:
                return  # loop closed
            if self._close_after_current:
                self._begin_shutdown()
                return
