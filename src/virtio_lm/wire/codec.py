"""Fixed-layout little-endian structures, declared as data.

Every byte layout in virtio-lm is a frozen dataclass decorated with
:func:`layout`, which binds it to a :mod:`struct` format (always ``<``) and
gives it ``SIZE``, ``FIELDS`` (name, offset, size of each field),
``OFFSETS`` (name -> offset), ``encode()``, ``decode()`` (exact size),
``decode_from()`` (a prefix; returns the value and the bytes consumed) and
``unpack_from()`` (at an offset, no length check beyond the prefix).

Per-field rules come from dataclass field metadata:

* ``reserved()``      -- must be zero on decode and on encode;
* ``enum_field(E)``   -- the raw value must be a member of the IntEnum ``E``;
                         the decoded attribute is the enum member;
* ``flags_field(F)``  -- an IntFlag; unknown bits are refused unless
                         ``allow_unknown=True`` (on decode and on encode).

A ``Ns`` code is a fixed byte string of exactly ``N`` bytes (a MAC address,
an id string); as a ``reserved()`` field it must be all zero and reads as 0.

This module (and the rest of :mod:`virtio_lm.wire`) is the only place in the
project that calls :mod:`struct`.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import struct
from typing import Any, Callable, ClassVar, Self, TypeVar

from virtio_lm.errors import (
    EnumValueError,
    FieldValueError,
    ReservedFieldError,
    ShortBufferError,
    TrailingDataError,
)

T = TypeVar("T")

_RESERVED = "virtio_lm.reserved"
_ENUM = "virtio_lm.enum"
_FLAGS = "virtio_lm.flags"
_FLAGS_UNKNOWN_OK = "virtio_lm.flags_unknown_ok"


def reserved() -> Any:
    """A reserved field: encodes as 0, refused on decode when not 0."""
    return dataclasses.field(default=0, metadata={_RESERVED: True})


def enum_field(enum_type: type[enum.IntEnum], default: Any = dataclasses.MISSING) -> Any:
    """A field whose raw value must be a member of ``enum_type``."""
    kw: dict[str, Any] = {"metadata": {_ENUM: enum_type}}
    if default is not dataclasses.MISSING:
        kw["default"] = default
    return dataclasses.field(**kw)


def flags_field(
    flag_type: type[enum.IntFlag], default: Any = dataclasses.MISSING, *, allow_unknown: bool = False
) -> Any:
    """A bit-flags field; bits outside ``flag_type`` are refused unless allowed."""
    kw: dict[str, Any] = {"metadata": {_FLAGS: flag_type, _FLAGS_UNKNOWN_OK: allow_unknown}}
    if default is not dataclasses.MISSING:
        kw["default"] = default
    return dataclasses.field(**kw)


def _flag_mask(flag_type: type[enum.IntFlag]) -> int:
    mask = 0
    for member in flag_type:
        mask |= int(member)
    return mask


class _Field:
    __slots__ = ("name", "reserved", "enum", "flags", "unknown_ok", "bits", "nbytes")

    def __init__(self, f: dataclasses.Field[Any], bits: int, nbytes: int) -> None:
        self.name = f.name
        self.reserved = bool(f.metadata.get(_RESERVED))
        self.enum = f.metadata.get(_ENUM)
        self.flags = f.metadata.get(_FLAGS)
        self.unknown_ok = bool(f.metadata.get(_FLAGS_UNKNOWN_OK))
        self.bits = bits
        self.nbytes = nbytes  # > 0 only for an ``Ns`` byte-string field


_BITS = {"B": 8, "b": 8, "H": 16, "h": 16, "I": 32, "i": 32, "Q": 64, "q": 64}
_TOKEN = re.compile(r"(\d*)([A-Za-z?])")


def _as_int(value: Any) -> int:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return int.from_bytes(value, "little")
    return int(value)


def _is_zero(value: Any) -> bool:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return not any(bytes(value))
    return value == 0


def layout(fmt: str) -> Callable[[type[T]], type[T]]:
    """Bind a frozen dataclass to the little-endian struct format ``fmt``.

    ``fmt`` lists one code per dataclass field, in field order; pad bytes
    (``x``) are allowed and must be zero on decode.
    """
    if not fmt.startswith("<"):
        raise ValueError("wire layouts are little-endian: format must start with '<'")

    def wrap(cls: type[T]) -> type[T]:
        s = struct.Struct(fmt)
        tokens = _TOKEN.findall(fmt[1:])
        if "".join(n + c for n, c in tokens) != fmt[1:]:
            raise TypeError(f"{cls.__name__}: cannot parse format {fmt!r}")
        codes: list[tuple[str, int]] = []
        for count, code in tokens:
            if code == "x":
                continue
            if code == "s":
                codes.append((code, int(count or 1)))
            elif count:
                raise TypeError(f"{cls.__name__}: repeat counts only for 's' and 'x' in {fmt!r}")
            else:
                codes.append((code, 0))
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        if len(codes) != len(fields):
            raise TypeError(f"{cls.__name__}: {len(fields)} fields but format {fmt!r} has {len(codes)}")
        infos = [_Field(f, _BITS.get(c, 0), n) for f, (c, n) in zip(fields, codes)]
        # (name, offset, size) of every field, from the packed ("<") format
        field_table: list[tuple[str, int, int]] = []
        pos = 0
        fi = iter(fields)
        for count, code in tokens:
            width = struct.calcsize("<" + count + code)
            if code != "x":
                field_table.append((next(fi).name, pos, width))
            pos += width
        name = cls.__name__
        has_pad = "x" in fmt

        def _check(values: tuple[Any, ...]) -> list[Any]:
            out: list[Any] = []
            for info, v in zip(infos, values):
                if info.reserved:
                    if not _is_zero(v):
                        raise ReservedFieldError(name, info.name, _as_int(v))
                    v = 0
                elif info.enum is not None:
                    try:
                        v = info.enum(v)
                    except ValueError:
                        raise EnumValueError(name, info.name, v, [int(m) for m in info.enum]) from None
                elif info.flags is not None:
                    if not info.unknown_ok and v & ~_flag_mask(info.flags):
                        raise FieldValueError(
                            name, info.name, v, f"only bits of {info.flags.__name__} may be set"
                        )
                    v = info.flags(v) if not (v & ~_flag_mask(info.flags)) else v
                out.append(v)
            return out

        def encode(self: Any) -> bytes:
            values = []
            for info in infos:
                v = getattr(self, info.name)
                if info.reserved and not _is_zero(v):
                    raise ReservedFieldError(name, info.name, _as_int(v))
                if info.nbytes:
                    if info.reserved:
                        v = bytes(info.nbytes)
                    if not isinstance(v, (bytes, bytearray, memoryview)) or len(v) != info.nbytes:
                        raise FieldValueError(name, info.name, v, f"exactly {info.nbytes} bytes")
                    values.append(bytes(v))
                    continue
                if info.flags is not None and not info.unknown_ok and int(v) & ~_flag_mask(info.flags):
                    raise FieldValueError(
                        name, info.name, v, f"only bits of {info.flags.__name__} may be set"
                    )
                if info.enum is not None:
                    try:
                        info.enum(v)
                    except ValueError:
                        raise EnumValueError(name, info.name, v, [int(m) for m in info.enum]) from None
                if info.bits and not 0 <= int(v) < (1 << info.bits):
                    raise FieldValueError(name, info.name, v, f"fits in u{info.bits}")
                values.append(int(v))
            return s.pack(*values)

        @classmethod  # type: ignore[misc]
        def unpack_from(klass: type[Self], buf: bytes | bytearray | memoryview, offset: int = 0) -> Self:
            if offset < 0:
                raise FieldValueError(name, None, offset, "offset must not be negative")
            if len(buf) - offset < s.size:
                raise ShortBufferError(name, None, s.size, max(0, len(buf) - offset))
            values = s.unpack_from(buf, offset)
            obj = klass(*_check(values))
            if has_pad and bytes(buf[offset : offset + s.size]) != obj.encode():
                raise FieldValueError(name, None, "pad", "pad bytes must be zero")
            return obj

        @classmethod  # type: ignore[misc]
        def decode(klass: type[Self], buf: bytes | bytearray | memoryview) -> Self:
            if len(buf) > s.size:
                raise TrailingDataError(name, s.size, len(buf))
            return klass.unpack_from(buf, 0)

        @classmethod  # type: ignore[misc]
        def decode_from(klass: type[Self], buf: bytes | bytearray | memoryview) -> tuple[Self, int]:
            return klass.unpack_from(buf, 0), s.size

        cls.SIZE = s.size  # type: ignore[attr-defined]
        cls.FORMAT = fmt  # type: ignore[attr-defined]
        cls.FIELDS = tuple(field_table)  # type: ignore[attr-defined]
        cls.OFFSETS = {n: o for n, o, _ in field_table}  # type: ignore[attr-defined]
        cls.encode = encode  # type: ignore[attr-defined]
        cls.unpack_from = unpack_from  # type: ignore[attr-defined]
        cls.decode = decode  # type: ignore[attr-defined]
        cls.decode_from = decode_from  # type: ignore[attr-defined]
        return cls

    return wrap


class Layout:
    """Typing aid: what :func:`layout` adds to a class."""

    SIZE: ClassVar[int]
    FORMAT: ClassVar[str]
    FIELDS: ClassVar[tuple[tuple[str, int, int], ...]]  # (name, offset, size)
    OFFSETS: ClassVar[dict[str, int]]

    def encode(self) -> bytes:  # pragma: no cover - provided by @layout
        raise NotImplementedError

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview) -> Self:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def decode_from(cls, buf: bytes | bytearray | memoryview) -> tuple[Self, int]:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def unpack_from(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> Self:  # pragma: no cover
        raise NotImplementedError


# ------------------------------------------------------------------ scalar helpers
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def u16(value: int) -> bytes:
    return _U16.pack(value)


def u32(value: int) -> bytes:
    return _U32.pack(value)


def u64(value: int) -> bytes:
    return _U64.pack(value)


def read_u16(buf: bytes | bytearray | memoryview, offset: int = 0) -> int:
    return _U16.unpack_from(buf, offset)[0]


def read_u32(buf: bytes | bytearray | memoryview, offset: int = 0) -> int:
    return _U32.unpack_from(buf, offset)[0]


def read_u64(buf: bytes | bytearray | memoryview, offset: int = 0) -> int:
    return _U64.unpack_from(buf, offset)[0]


def int_le(value: int, width: int) -> bytes:
    """``value`` as ``width`` little-endian bytes (register access of 1/2/4/8)."""
    return value.to_bytes(width, "little")


def le_int(buf: bytes | bytearray | memoryview) -> int:
    return int.from_bytes(buf, "little")
