"""The one parser of the addresses virtio-lm is given: monitors, migration URIs, the switch.

Forms (QEMU's spelling)::

    tcp:HOST:PORT      HOST a name, an IPv4 address, or an IPv6 address in [brackets];
                       HOST may be empty (see below); PORT decimal, 0..65535
    unix:PATH          a unix socket (monitors)
    file:PATH          a file (migration streams)
    HOST:PORT          the bare form (``virtio-lm switch --listen``, ``--switch``):
                       :func:`parse_hostport`, the same rules as ``tcp:``

An IPv6 address must be bracketed: ``tcp:[::1]:4444`` is host ``::1``, port 4444, and
``tcp:::1:4444`` is refused rather than guessed.  An empty host is kept empty
(``Address.host == ""``); what it means is said where the address is used:
:attr:`Address.host_or_any` (listening: every interface) or :attr:`Address.host_or_loopback`
(connecting: this machine).  Every refusal is an :class:`~virtio_lm.errors.AddressError`
subclass naming the part at fault.  Imports nothing of ours but ``errors``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from virtio_lm.errors import (
    AddressHostError,
    AddressPathError,
    AddressPortError,
    AddressSchemeError,
)

__all__ = [
    "ANY_HOST",
    "LOOPBACK_HOST",
    "MIGRATION_SCHEMES",
    "MONITOR_SCHEMES",
    "Address",
    "parse_address",
    "parse_hostport",
]

SCHEMES = ("tcp", "unix", "file")
MONITOR_SCHEMES = ("unix", "tcp")
MIGRATION_SCHEMES = ("tcp", "file")
ANY_HOST = "0.0.0.0"  # an empty host, listening
LOOPBACK_HOST = "127.0.0.1"  # an empty host, connecting
MAX_PORT = 65535


@dataclass(frozen=True)
class Address:
    """A parsed address: ``kind`` "tcp" (``host``, ``port``), "unix" or "file" (``path``)."""

    kind: str
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "tcp":
            return f"tcp:{self.hostport}"
        return f"{self.kind}:{self.path}"

    @property
    def hostport(self) -> str:
        """``HOST:PORT`` (an IPv6 host in brackets): what :func:`parse_hostport` reads back."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def host_or_any(self) -> str:
        """The host to listen on: an empty host is every (IPv4) interface."""
        return self.host or ANY_HOST

    @property
    def host_or_loopback(self) -> str:
        """The host to connect to: an empty host is this machine."""
        return self.host or LOOPBACK_HOST

    @property
    def sockaddr(self) -> str | tuple[str, int]:
        """What ``socket.connect`` takes: the path, or ``(host_or_loopback, port)``."""
        if self.kind == "tcp":
            return (self.host_or_loopback, self.port)
        return self.path


def parse_address(
    spec: str | os.PathLike | tuple[str, int] | Address, schemes: tuple[str, ...] = SCHEMES
) -> Address:
    """Parse ``spec``, taking only the ``schemes`` given (a subset of tcp, unix, file).

    Besides text: a ``(host, port)`` tuple is a tcp address, a path object a unix one
    (when those schemes are taken), an :class:`Address` is itself."""
    unknown = set(schemes) - set(SCHEMES)
    if unknown:
        raise AddressSchemeError(schemes, f"parse_address takes schemes among {SCHEMES}, not {sorted(unknown)}")
    if isinstance(spec, Address):
        _take(spec, spec.kind, schemes)
        return spec
    if isinstance(spec, tuple):
        _take(spec, "tcp", schemes)
        if len(spec) != 2:
            raise AddressPortError(spec, "a TCP address is (host, port)")
        host, port = spec
        if not isinstance(host, str):
            raise AddressHostError(spec, f"host {host!r} is not a string")
        if isinstance(port, bool) or not isinstance(port, int):
            raise AddressPortError(spec, f"port {port!r} is not an int")
        return Address("tcp", host=_host(host, spec, bracketed=":" in host), port=_port(port, spec))
    if isinstance(spec, os.PathLike):
        _take(spec, "unix", schemes)
        return Address("unix", path=_path(os.fspath(spec), spec))
    if not isinstance(spec, str):
        raise AddressSchemeError(spec, f"an address is text, a (host, port) tuple or a path, not {type(spec).__name__}")
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in SCHEMES:
        raise AddressSchemeError(spec, f"expected {' or '.join(_forms(schemes))}")
    _take(spec, kind, schemes)
    if kind == "tcp":
        host, port = _split_hostport(rest, spec)
        return Address("tcp", host=host, port=port)
    return Address(kind, path=_path(rest, spec))


def parse_hostport(text: str) -> Address:
    """The bare ``HOST:PORT`` form: a tcp :class:`Address`, by the rules of ``tcp:``."""
    if not isinstance(text, str):
        raise AddressSchemeError(text, f"HOST:PORT is text, not {type(text).__name__}")
    host, port = _split_hostport(text, text)
    return Address("tcp", host=host, port=port)


# --------------------------------------------------------------------------- parts
_FORMS = {"tcp": "tcp:HOST:PORT", "unix": "unix:PATH", "file": "file:PATH"}


def _forms(schemes: tuple[str, ...]) -> list[str]:
    return [_FORMS[s] for s in schemes]


def _take(spec: object, kind: str, schemes: tuple[str, ...]) -> None:
    if kind not in schemes:
        raise AddressSchemeError(spec, f"a {kind} address is not taken here; expected {' or '.join(_forms(schemes))}")


def _split_hostport(text: str, spec: object) -> tuple[str, int]:
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise AddressHostError(spec, "'[' without ']'")
        host = _host(text[1:close], spec, bracketed=True)
        after = text[close + 1 :]
        if not after.startswith(":"):
            raise AddressPortError(spec, "no ':PORT' after the bracketed host")
        return host, _port(after[1:], spec)
    host, sep, port = text.rpartition(":")
    if not sep:
        raise AddressPortError(spec, "no ':PORT'")
    return _host(host, spec), _port(port, spec)


def _host(host: str, spec: object, *, bracketed: bool = False) -> str:
    """``bracketed``: an IPv6 address (from ``[...]``, or a tuple's host), else a name or IPv4."""
    if bracketed and ":" not in host:
        raise AddressHostError(spec, f"brackets hold an IPv6 address, got [{host}]")
    if not bracketed and ":" in host:
        raise AddressHostError(spec, f"an IPv6 host goes in brackets: [{host}]")
    if "[" in host or "]" in host:
        raise AddressHostError(spec, f"stray bracket in host {host!r}")
    if host != host.strip() or any(c.isspace() for c in host):
        raise AddressHostError(spec, f"white space in host {host!r}")
    return host


def _port(port: int | str, spec: object) -> int:
    if isinstance(port, int):
        value = port
    elif isinstance(port, str) and port.isascii() and port.isdigit():
        value = int(port)
    else:
        raise AddressPortError(spec, f"port {port!r} is not a decimal number")
    if not 0 <= value <= MAX_PORT:
        raise AddressPortError(spec, f"port {value} outside 0..{MAX_PORT}")
    return value


def _path(path: str, spec: object) -> str:
    if not path:
        raise AddressPathError(spec, "no path")
    return path

