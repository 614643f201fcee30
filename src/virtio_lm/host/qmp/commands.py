"""The monitor's commands: argument schemas (QAPI-style, compiled and checked) and the
command table handlers register in (see :mod:`virtio_lm.host.qmp`)."""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from virtio_lm import __version__
from virtio_lm.errors import (
    CommandRegistrationError,
    QmpError,
    VirtioLmError,
)

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
BUILTINS = ("qmp_capabilities", "query-version", "query-commands")

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
        if name in BUILTINS:
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
        return run_handler(cmd, dict(arguments or {}))


def _never_called(args: dict) -> Any:  # pragma: no cover - qmp_capabilities is handled by the connection
    raise AssertionError("qmp_capabilities is handled by QmpConnection")


def run_handler(cmd: Command, arguments: dict) -> Any:
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
