"""A strict JSON codec for the guest drivers' bookkeeping that migrates with the VM.

The guest's drivers keep part of their state outside guest memory: queue free
lists and chains in flight (:class:`~virtio_lm.virtqueue.driver.DriverQueue`),
memory allocators (:class:`~virtio_lm.virtqueue.driver.Allocator`), requests
in flight (:class:`~virtio_lm.drivers.blk_driver.BlkDriverState`), negotiated
features, MAC (:class:`~virtio_lm.drivers.net_driver.NetDriverState`).  That
state crosses the migration stream, which is untrusted input: no pickle.  This
module turns each state into plain JSON data (dicts, lists, ints, strings,
bools, ``None``; bytes as lowercase hex strings) and back.

Decoding is strict.  Every object must have exactly its keys; every value its
type (``bool`` is not an ``int``, floats are nothing) and range; and the
state must be one the driver could have reached:

* an allocator's free ranges are sorted, non-empty and merged, its live
  allocations sorted, and together they tile ``[base, base + size)``;
* a queue's size is a power of two in 1..32768, its ring addresses aligned
  and disjoint, its indices u16; its free list and in-flight chains
  partition the descriptors ``0..size-1``; each chain's head is its first
  descriptor; an indirect chain has one descriptor and a table that is a
  live allocation; and the chains in flight number
  ``avail_idx + pending - last_used_idx`` (mod 2**16);
* a blk driver's requests are exactly the chains in flight (by token, on
  their queue), own distinct live allocations, and are below ``next_token``;
  a net driver has exactly its receive/transmit(/control) queues, tokens of
  the shape each queue kind uses, and buffers in its buffer allocator.

Any violation raises :class:`~virtio_lm.errors.GuestStateError` naming the
field (``"blk.queues.0.free[3]"``) -- never another exception type.  The
encoders validate what they produce the same way, so a source never sends a
state its destination would refuse.  Decoding is exact: re-encoding a
decoded document gives the same document.

Chain tokens (what a driver attaches to a chain) may be ``None``, ``bool``,
``int`` (in ``-2**63 .. 2**64-1``), ``str`` (at most 64 characters) or a
``tuple`` of tokens (at most 8 items, nested at most 4 deep); tuples travel
as JSON lists (a list is never a token, so the mapping is exact).

:func:`encode_guest_state` / :func:`decode_guest_state` turn such data into
canonical bytes (sorted keys, compact, ASCII) and back; decoding refuses
non-UTF-8 bytes, a document that is not a JSON object, documents over
16 MiB, nesting over 64 levels, duplicate keys and ``NaN`` / ``Infinity``.

Rebuilding: an :class:`Allocator` and a :class:`DriverQueue` own their saved
state (``save()`` gives a frozen :class:`AllocatorState` /
:class:`DriverQueueState`, ``from_state()`` checks the invariants the class
keeps and rebuilds it); this module checks the document's types and ranges,
turns it into those states and prefixes their errors' paths.  A new field of a
state is a new dataclass field: the JSON here must name it, or the codec's
keys and the state's fields disagree (a test compares them).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from virtio_lm.drivers.blk_driver import BlkCompletion, BlkDriver, BlkDriverState, BlkRequest
from virtio_lm.drivers.net_driver import NetDriver, NetDriverState
from virtio_lm.errors import GuestStateError, StrictJsonError, WireError
from virtio_lm.vm.workloads import BlkWorkloadState, NetWorkloadState
from virtio_lm.virtqueue.driver import Allocator, AllocatorState, ChainState, DriverQueue, DriverQueueState
from virtio_lm.wire import strictjson
from virtio_lm.wire.blk import BLK_CONFIG_SIZE, BlkConfig
from virtio_lm.wire.features import bit
from virtio_lm.wire.net import ETH_ALEN
from virtio_lm.wire.ring import (
    MAX_QUEUE_SIZE,
)

__all__ = [
    "MAX_DOCUMENT_BYTES",
    "MAX_NESTING",
    "allocator_from_json",
    "allocator_to_json",
    "blk_state_from_json",
    "blk_state_to_json",
    "decode_guest_state",
    "encode_guest_state",
    "net_state_from_json",
    "net_state_to_json",
    "queue_from_json",
    "queue_to_json",
    "token_from_json",
    "token_to_json",
]

MAX_DOCUMENT_BYTES = 16 << 20
MAX_NESTING = 64
U16 = 0xFFFF
U32 = 0xFFFF_FFFF
U64 = (1 << 64) - 1
I63 = (1 << 63) - 1
TOKEN_INT_MIN = -(1 << 63)
MAX_TOKEN_DEPTH = 4
MAX_TOKEN_ITEMS = 8
MAX_TOKEN_STR = 64
MAX_COUNTER_NAME = 64
DOCUMENT = "<document>"

Json = Any


# =========================================================================== primitives
def _fail(path: str, reason: str) -> GuestStateError:
    return GuestStateError(path, reason)


def _kind(v: object) -> str:
    return "null" if v is None else type(v).__name__


def _obj(v: Json, path: str, keys: tuple[str, ...]) -> dict[str, Json]:
    if type(v) is not dict:
        raise _fail(path, f"expected an object, got {_kind(v)}")
    unknown = sorted(set(v) - set(keys))
    if unknown:
        raise _fail(f"{path}.{unknown[0]}", "unknown key")
    for k in keys:
        if k not in v:
            raise _fail(f"{path}.{k}", "missing key")
    return v


def _int(v: Json, path: str, lo: int, hi: int) -> int:
    if type(v) is not int:
        raise _fail(path, f"expected an integer, got {_kind(v)}")
    if not lo <= v <= hi:
        raise _fail(path, f"{v} is outside {lo}..{hi}")
    return v


def _int_list(v: Json, path: str, lo: int, hi: int) -> list[int]:
    """A list of integers in ``lo..hi``; the element's path is built only for the error."""
    xs = _list(v, path)
    for j, x in enumerate(xs):
        if type(x) is not int or not lo <= x <= hi:
            _int(x, f"{path}[{j}]", lo, hi)
    return xs


def _opt_int(v: Json, path: str, lo: int, hi: int) -> int | None:
    return None if v is None else _int(v, path, lo, hi)


def _bool(v: Json, path: str) -> bool:
    if type(v) is not bool:
        raise _fail(path, f"expected a boolean, got {_kind(v)}")
    return v


def _list(v: Json, path: str) -> list[Json]:
    if type(v) is not list:
        raise _fail(path, f"expected a list, got {_kind(v)}")
    return v


def _str(v: Json, path: str, max_len: int) -> str:
    if type(v) is not str:
        raise _fail(path, f"expected a string, got {_kind(v)}")
    if len(v) > max_len:
        raise _fail(path, f"string of {len(v)} characters (at most {max_len})")
    return v


_HEX = frozenset("0123456789abcdef")


def _hex(v: Json, path: str, length: int | None = None) -> bytes:
    if type(v) is not str:
        raise _fail(path, f"expected a hex string, got {_kind(v)}")
    if len(v) % 2 or not _HEX.issuperset(v):
        raise _fail(path, "not an even-length lowercase hex string")
    raw = bytes.fromhex(v)
    if length is not None and len(raw) != length:
        raise _fail(path, f"{len(raw)} bytes, expected {length}")
    return raw


def _index_key(k: str, path: str, hi: int) -> int:
    """A dict key naming a queue: canonical decimal (no sign, no leading zero)."""
    if not k or not k.isascii() or not k.isdigit() or (len(k) > 1 and k[0] == "0"):
        raise _fail(f"{path}.{k}", "queue key is not a canonical decimal index")
    n = int(k)
    if n > hi:
        raise _fail(f"{path}.{k}", f"queue index {n} above {hi}")
    return n


def _has(features: int, f: int) -> bool:
    return bool(features & bit(f))


# the checks a VF kind's own codec uses (vm/kinds.py: a kind brings its part of the document)
def expect_object(v: Json, path: str, keys: tuple[str, ...]) -> dict[str, Json]:
    """``v`` is an object with exactly ``keys``."""
    return _obj(v, path, keys)


def expect_int(v: Json, path: str, lo: int, hi: int) -> int:
    """``v`` is an integer (not a bool) in ``lo..hi``."""
    return _int(v, path, lo, hi)


def expect_list(v: Json, path: str) -> list[Json]:
    return _list(v, path)


def expect_number(v: Json, path: str) -> float:
    """``v`` is an integer or a float (not a bool)."""
    return _number(v, path)


# =========================================================================== tokens
def token_to_json(token: object, path: str = "token", depth: int = 1) -> Json:
    """A chain token as JSON (tuples become lists); unsupported tokens raise GuestStateError."""
    if token is None or type(token) is bool:
        return token
    if type(token) is int:
        return _int(token, path, TOKEN_INT_MIN, U64)
    if type(token) is str:
        return _str(token, path, MAX_TOKEN_STR)
    if type(token) is tuple:
        if depth >= MAX_TOKEN_DEPTH:
            raise _fail(path, f"token nested deeper than {MAX_TOKEN_DEPTH}")
        if len(token) > MAX_TOKEN_ITEMS:
            raise _fail(path, f"token tuple of {len(token)} items (at most {MAX_TOKEN_ITEMS})")
        return [token_to_json(t, f"{path}[{i}]", depth + 1) for i, t in enumerate(token)]
    raise _fail(path, f"a token of type {_kind(token)} cannot migrate (None, bool, int, str or tuple)")


def _flat_token_item(t: Json) -> bool:
    """An integer or string a token may hold (what token_from_json accepts at a leaf)."""
    tt = type(t)
    return (tt is int and TOKEN_INT_MIN <= t <= U64) or (tt is str and len(t) <= MAX_TOKEN_STR)


def token_from_json(v: Json, path: str = "token", depth: int = 1) -> object:
    """The inverse of :func:`token_to_json` (lists become tuples)."""
    if type(v) is list and depth < MAX_TOKEN_DEPTH and len(v) <= MAX_TOKEN_ITEMS and all(
        _flat_token_item(t) for t in v
    ):
        return tuple(v)  # the common token: a flat tuple of integers and short strings
    if v is None or type(v) is bool:
        return v
    if type(v) is int:
        return _int(v, path, TOKEN_INT_MIN, U64)
    if type(v) is str:
        return _str(v, path, MAX_TOKEN_STR)
    if type(v) is list:
        if depth >= MAX_TOKEN_DEPTH:
            raise _fail(path, f"token nested deeper than {MAX_TOKEN_DEPTH}")
        if len(v) > MAX_TOKEN_ITEMS:
            raise _fail(path, f"token list of {len(v)} items (at most {MAX_TOKEN_ITEMS})")
        return tuple(token_from_json(t, f"{path}[{i}]", depth + 1) for i, t in enumerate(v))
    raise _fail(path, f"a token must be null, bool, int, str or a list of tokens, got {_kind(v)}")


# =========================================================================== allocator
_ALLOC_KEYS = ("base", "size", "free", "live")


def allocator_to_json(a: Allocator, path: str = "alloc", *, validate: bool = True) -> dict[str, Json]:
    """``{"base", "size", "free": [[start, end], ...], "live": [[addr, length], ...]}`` (live sorted)."""
    st = a.save()
    out = {"base": st.base, "size": st.size, "free": [list(r) for r in st.free], "live": [list(r) for r in st.live]}
    if validate:
        allocator_from_json(out, path)
    return out


def _pairs(v: Json, path: str, what: str) -> tuple[tuple[int, int], ...]:
    items = _list(v, path)
    if all(type(x) is list and len(x) == 2 and type(x[0]) is int and type(x[1]) is int for x in items):
        return tuple((x[0], x[1]) for x in items)
    for i, item in enumerate(items):  # name the culprit
        p = f"{path}[{i}]"
        pair = _list(item, p)
        if len(pair) != 2:
            raise _fail(p, f"expected [start, {what}], got {len(pair)} items")
        _int(pair[0], f"{p}[0]", 0, U64)
        _int(pair[1], f"{p}[1]", 0, U64)
    raise AssertionError("unreachable")  # pragma: no cover


def allocator_from_json(v: Json, path: str = "alloc") -> Allocator:
    """An :class:`Allocator` from JSON: the document's types here, the allocator's invariants
    in :meth:`Allocator.from_state`."""
    d = _obj(v, path, _ALLOC_KEYS)
    st = AllocatorState(
        _int(d["base"], f"{path}.base", 0, U64),
        _int(d["size"], f"{path}.size", 1, U64),
        _pairs(d["free"], f"{path}.free", "end"),
        _pairs(d["live"], f"{path}.live", "length"),
    )
    return Allocator.from_state(st, path)


# =========================================================================== queue
_DQ_KEYS = (
    "size", "desc_addr", "avail_addr", "used_addr", "event_idx", "free", "in_flight",
    "avail_idx", "pending", "kick_old", "last_used_idx", "interrupts",
)
#: an in-flight chain is a row ``[head, descs, table, token]`` (positional: the in-flight
#: list of a posted receive ring is hundreds of rows, and a JSON object per row was most of a
#: guest state's decoding time); errors name the field (``in_flight[3].token``)
_IF_FIELDS = ("head", "descs", "table", "token")


def _chain_out(c: ChainState) -> list[Json]:
    token = c.token
    if type(token) is tuple and len(token) <= MAX_TOKEN_ITEMS and all(_flat_token_item(t) for t in token):
        token = list(token)
    elif not (type(token) is int and TOKEN_INT_MIN <= token <= U64):
        token = None if token is None else _NOT_FLAT
    return [c.head, list(c.descs), c.table, token]


_NOT_FLAT = object()  # a token the fast path leaves to token_to_json (which names it in an error)


def queue_to_json(dq: DriverQueue, path: str = "queue", *, validate: bool = True) -> dict[str, Json]:
    """A driver queue's saved state (:meth:`DriverQueue.save`) as JSON."""
    st = dq.save()
    out = {
        "size": st.size,
        "desc_addr": st.desc_addr,
        "avail_addr": st.avail_addr,
        "used_addr": st.used_addr,
        "event_idx": st.event_idx,
        "free": list(st.free),
        "in_flight": [_chain_out(c) for c in st.in_flight],
        "avail_idx": st.avail_idx,
        "pending": st.pending,
        "kick_old": st.kick_old,
        "last_used_idx": st.last_used_idx,
        "interrupts": st.interrupts,
    }
    for i, row in enumerate(out["in_flight"]):  # type: ignore[arg-type]
        if row[3] is _NOT_FLAT:
            row[3] = token_to_json(st.in_flight[i].token, f"{path}.in_flight[{i}].token")
    if validate:
        queue_from_json(out, path)
    return out


def _chains(items: list[Json], path: str) -> tuple[ChainState, ...]:
    """The in-flight rows as :class:`ChainState` (types only; the queue checks the rest)."""
    out = []
    for i, row in enumerate(items):
        if type(row) is list and len(row) == 4:
            head, descs, table, token = row
            if (type(head) is int and type(descs) is list and all(type(x) is int for x in descs)
                    and (table is None or type(table) is int and 0 <= table <= U64)):
                if type(token) is list and len(token) <= MAX_TOKEN_ITEMS and all(_flat_token_item(t) for t in token):
                    token = tuple(token)
                else:
                    token = token_from_json(token, f"{path}[{i}].token")
                out.append(ChainState(head, tuple(descs), table, token))
                continue
        p = f"{path}[{i}]"
        if type(row) is not list or len(row) != 4:
            got = f"a list of {len(row)} items" if type(row) is list else _kind(row)
            raise _fail(p, f"expected a row [{', '.join(_IF_FIELDS)}], got {got}")
        _int(row[0], f"{p}.head", 0, U64)
        _int_list(row[1], f"{p}.descs", 0, U64)
        _opt_int(row[2], f"{p}.table", 0, U64)
        raise AssertionError("unreachable")  # pragma: no cover
    return tuple(out)


def queue_from_json(v: Json, path: str = "queue", *, alloc: Allocator | None = None) -> DriverQueue:
    """A detached :class:`DriverQueue` (no port; ``alloc`` as given) from JSON: the document's
    types here, the queue's invariants in :meth:`DriverQueue.from_state` (with ``alloc``,
    every indirect table in flight must be one of its live allocations)."""
    d = _obj(v, path, _DQ_KEYS)
    event_idx = _bool(d["event_idx"], f"{path}.event_idx")
    st = DriverQueueState(
        size=_int(d["size"], f"{path}.size", 1, MAX_QUEUE_SIZE),
        desc_addr=_int(d["desc_addr"], f"{path}.desc_addr", 0, U64),
        avail_addr=_int(d["avail_addr"], f"{path}.avail_addr", 0, U64),
        used_addr=_int(d["used_addr"], f"{path}.used_addr", 0, U64),
        event_idx=event_idx,
        free=tuple(_int_list(d["free"], f"{path}.free", 0, U64)),
        in_flight=_chains(_list(d["in_flight"], f"{path}.in_flight"), f"{path}.in_flight"),
        avail_idx=_int(d["avail_idx"], f"{path}.avail_idx", 0, U16),
        pending=_int(d["pending"], f"{path}.pending", 0, U64),
        kick_old=_int(d["kick_old"], f"{path}.kick_old", 0, U16),
        last_used_idx=_int(d["last_used_idx"], f"{path}.last_used_idx", 0, U16),
        interrupts=_bool(d["interrupts"], f"{path}.interrupts"),
    )
    return DriverQueue.from_state(st, port=None, alloc=alloc, path=path)


def _queues_from_json(v: Json, path: str, alloc: Allocator) -> dict[int, DriverQueue]:
    if type(v) is not dict:
        raise _fail(path, f"expected an object, got {_kind(v)}")
    out: dict[int, DriverQueue] = {}
    for k in sorted(v, key=lambda s: (len(s), s)):
        n = _index_key(k, path, U16)
        out[n] = queue_from_json(v[k], f"{path}.{k}", alloc=alloc)
    return out


def _queues_to_json(queues: dict[int, Any], path: str) -> dict[str, Json]:
    out = {}
    for i, q in queues.items():
        if type(i) is not int or not 0 <= i <= U16:
            raise _fail(f"{path}.{i}", "queue index is not an int in 0..65535")
        out[str(i)] = queue_to_json(q, f"{path}.{i}", validate=False)
    return out


# =========================================================================== blk
_BLK_KEYS = ("features", "config", "queues", "alloc", "requests", "parked", "next_token", "rr")
_REQ_KEYS = (
    "token", "type", "sector", "queue", "hdr_addr", "buf_addr", "buf_len", "owns_buf",
    "device_writes_buf", "status_addr", "raw",
)
_DONE_KEYS = ("token", "type", "sector", "queue", "status", "used_len", "data")


def blk_state_to_json(state: BlkDriverState, path: str = "blk", *, validate: bool = True) -> dict[str, Json]:
    """A :class:`BlkDriverState` as JSON (validated like the decoder unless ``validate=False``)."""
    try:
        cfg = state.config.encode().hex()  # type: ignore[attr-defined]
    except WireError as exc:
        raise _fail(f"{path}.config", f"does not encode: {exc}") from exc
    out = {
        "features": state.features,
        "config": cfg,
        "queues": _queues_to_json(state.queues, f"{path}.queues"),
        "alloc": allocator_to_json(state.alloc, f"{path}.alloc", validate=False),
        "requests": [
            {
                "token": r.token,
                "type": r.type,
                "sector": r.sector,
                "queue": r.queue,
                "hdr_addr": r.hdr_addr,
                "buf_addr": r.buf_addr,
                "buf_len": r.buf_len,
                "owns_buf": r.owns_buf,
                "device_writes_buf": r.device_writes_buf,
                "status_addr": r.status_addr,
                "raw": [[a, n, w] for a, n, w in r.raw],
            }
            for r in state.requests.values()
        ],
        "parked": [
            {
                "token": c.token,
                "type": c.type,
                "sector": c.sector,
                "queue": c.queue,
                "status": c.status,
                "used_len": c.used_len,
                "data": None if c.data is None else bytes(c.data).hex(),
            }
            for c in state.parked
        ],
        "next_token": state.next_token,
        "rr": state.rr,
    }
    for i, (k, r) in enumerate(state.requests.items()):
        if k != r.token:
            raise _fail(f"{path}.requests[{i}].token", f"request {r.token} kept under key {k!r}")
    if validate:
        blk_state_from_json(out, path)
    return out


def blk_state_from_json(v: Json, path: str = "blk") -> BlkDriverState:
    """A :class:`BlkDriverState` from JSON: the document's types here, the driver's invariants
    in :meth:`BlkDriver.check_state` (the state comes back checked)."""
    d = _obj(v, path, _BLK_KEYS)
    features = _int(d["features"], f"{path}.features", 0, U64)
    raw_cfg = _hex(d["config"], f"{path}.config", BLK_CONFIG_SIZE)
    try:
        config = BlkConfig.decode(raw_cfg)  # type: ignore[attr-defined]
    except WireError as exc:
        raise _fail(f"{path}.config", f"does not decode: {exc}") from exc
    if config.encode() != raw_cfg:  # type: ignore[attr-defined]
        raise _fail(f"{path}.config", "not in canonical form")
    alloc = allocator_from_json(d["alloc"], f"{path}.alloc")
    queues = _queues_from_json(d["queues"], f"{path}.queues", alloc)
    next_token = _int(d["next_token"], f"{path}.next_token", 1, I63)
    rr = _int(d["rr"], f"{path}.rr", 0, I63)
    requests: dict[int, BlkRequest] = {}
    for i, item in enumerate(_list(d["requests"], f"{path}.requests")):
        p = f"{path}.requests[{i}]"
        r = _obj(item, p, _REQ_KEYS)
        token = _int(r["token"], f"{p}.token", 1, I63)
        if token in requests:
            raise _fail(f"{p}.token", f"token {token} twice")
        raw: list[tuple[int, int, bool]] = []
        for j, piece in enumerate(_list(r["raw"], f"{p}.raw")):
            pj = f"{p}.raw[{j}]"
            tri = _list(piece, pj)
            if len(tri) != 3:
                raise _fail(pj, f"expected [addr, length, writable], got {len(tri)} items")
            raw.append((_int(tri[0], f"{pj}[0]", 0, U64), _int(tri[1], f"{pj}[1]", 0, U32), _bool(tri[2], f"{pj}[2]")))
        requests[token] = BlkRequest(
            token,
            _int(r["type"], f"{p}.type", -1, U32),
            _int(r["sector"], f"{p}.sector", 0, U64),
            _int(r["queue"], f"{p}.queue", 0, U16),
            _int(r["hdr_addr"], f"{p}.hdr_addr", -1, U64),
            _opt_int(r["buf_addr"], f"{p}.buf_addr", 0, U64),
            _int(r["buf_len"], f"{p}.buf_len", 0, U32),
            _bool(r["owns_buf"], f"{p}.owns_buf"),
            _bool(r["device_writes_buf"], f"{p}.device_writes_buf"),
            _int(r["status_addr"], f"{p}.status_addr", -1, U64),
            raw,
        )
    parked: list[BlkCompletion] = []
    for i, item in enumerate(_list(d["parked"], f"{path}.parked")):
        p = f"{path}.parked[{i}]"
        c = _obj(item, p, _DONE_KEYS)
        parked.append(
            BlkCompletion(
                _int(c["token"], f"{p}.token", 1, I63),
                _int(c["type"], f"{p}.type", -1, U32),
                _int(c["sector"], f"{p}.sector", 0, U64),
                _int(c["queue"], f"{p}.queue", 0, U16),
                _opt_int(c["status"], f"{p}.status", 0, 0xFF),
                _int(c["used_len"], f"{p}.used_len", 0, U32),
                None if c["data"] is None else _hex(c["data"], f"{p}.data"),
            )
        )
    state = BlkDriverState(
        features=features,
        config=config,
        queues=dict(sorted(queues.items())),
        alloc=alloc,
        requests=requests,
        parked=parked,
        next_token=next_token,
        rr=rr,
    )
    BlkDriver.check_state(state, path)
    return state


# =========================================================================== net
_NET_KEYS = (
    "features", "device_features", "mac", "max_pairs", "curr_pairs", "rx_buf_size", "queues",
    "ring_alloc", "buf_alloc", "counters",
)


def net_state_to_json(state: NetDriverState, path: str = "net", *, validate: bool = True) -> dict[str, Json]:
    """A :class:`NetDriverState` as JSON (validated like the decoder unless ``validate=False``)."""
    counters = {}
    for k, n in state.counters.items():
        if type(k) is not str:
            raise _fail(f"{path}.counters", f"counter name {k!r} is not a string")
        counters[k] = n
    out = {
        "features": state.features,
        "device_features": state.device_features,
        "mac": bytes(state.mac).hex(),
        "max_pairs": state.max_pairs,
        "curr_pairs": state.curr_pairs,
        "rx_buf_size": state.rx_buf_size,
        "queues": _queues_to_json(state.queues, f"{path}.queues"),
        "ring_alloc": allocator_to_json(state.ring_alloc, f"{path}.ring_alloc", validate=False),
        "buf_alloc": allocator_to_json(state.buf_alloc, f"{path}.buf_alloc", validate=False),
        "counters": counters,
    }
    if validate:
        net_state_from_json(out, path)
    return out


def net_state_from_json(v: Json, path: str = "net") -> NetDriverState:
    """A :class:`NetDriverState` from JSON: the document's types here, the driver's invariants
    in :meth:`NetDriver.check_state` (the state comes back checked)."""
    d = _obj(v, path, _NET_KEYS)
    device_features = _int(d["device_features"], f"{path}.device_features", 0, U64)
    features = _int(d["features"], f"{path}.features", 0, U64)
    mac = _hex(d["mac"], f"{path}.mac", ETH_ALEN)
    max_pairs = _int(d["max_pairs"], f"{path}.max_pairs", 1, 0x8000)
    curr_pairs = _int(d["curr_pairs"], f"{path}.curr_pairs", 1, 0x8000)
    rx_buf_size = _int(d["rx_buf_size"], f"{path}.rx_buf_size", 1, U32)
    ring_alloc = allocator_from_json(d["ring_alloc"], f"{path}.ring_alloc")
    buf_alloc = allocator_from_json(d["buf_alloc"], f"{path}.buf_alloc")
    queues = _queues_from_json(d["queues"], f"{path}.queues", ring_alloc)
    if type(d["counters"]) is not dict:
        raise _fail(f"{path}.counters", f"expected an object, got {_kind(d['counters'])}")
    counters = {}
    for k, n in d["counters"].items():
        if not k or len(k) > MAX_COUNTER_NAME:
            raise _fail(f"{path}.counters.{k}", f"counter name of {len(k)} characters (1..{MAX_COUNTER_NAME})")
        counters[k] = _int(n, f"{path}.counters.{k}", 0, I63)
    state = NetDriverState(
        features=features,
        device_features=device_features,
        mac=mac,
        max_pairs=max_pairs,
        curr_pairs=curr_pairs,
        rx_buf_size=rx_buf_size,
        queues=dict(sorted(queues.items())),
        ring_alloc=ring_alloc,
        buf_alloc=buf_alloc,
        counters=counters,
    )
    NetDriver.check_state(state, path)
    return state


# =========================================================================== the document
def vf_part(doc: dict[str, Json], kind: str) -> tuple[Json, Json]:
    """A VF kind's part of the document: ``{"driver": ..., "work": ...}``."""
    d = _obj(doc[kind], kind, ("driver", "work"))
    return d["driver"], d["work"]


# =========================================================================== workloads
_BLK_WORK_KEYS = ("nblocks", "meta_addr", "cache_addr", "qd", "write_percent", "rate", "rng", "inflight", "stats", "errors")
_NET_WORK_KEYS = ("next_seq", "received", "other", "rate")


def _number(v: Json, path: str) -> float:
    if type(v) is not float and type(v) is not int:
        raise _fail(path, f"expected a number, got {_kind(v)}")
    return float(v)


def blk_work_to_json(st: BlkWorkloadState) -> dict[str, Json]:
    return {
        "nblocks": st.nblocks, "meta_addr": st.meta_addr, "cache_addr": st.cache_addr, "qd": st.qd,
        "write_percent": st.write_percent, "rate": st.rate, "rng": st.rng,
        "inflight": [list(x) for x in st.inflight], "stats": dict(st.stats), "errors": list(st.errors),
    }


def blk_work_from_json(v: Json, path: str = "blk.work") -> BlkWorkloadState:
    """A :class:`BlkWorkloadState` from JSON (types; :meth:`BlkWorkload.from_state` checks the rest)."""
    d = _obj(v, path, _BLK_WORK_KEYS)
    inflight = []
    for i, item in enumerate(_list(d["inflight"], f"{path}.inflight")):
        p = f"{path}.inflight[{i}]"
        x = _list(item, p)
        if len(x) != 4:
            raise _fail(p, f"expected [token, op, lba, generation], got {len(x)} items")
        inflight.append((_int(x[0], f"{p}[0]", 1, I63), _str(x[1], f"{p}[1]", 1), _int(x[2], f"{p}[2]", 0, U32),
                         _int(x[3], f"{p}[3]", 0, U32)))
    stats_v = d["stats"]
    if type(stats_v) is not dict:
        raise _fail(f"{path}.stats", f"expected an object, got {_kind(stats_v)}")
    stats = {k: _int(n, f"{path}.stats.{k}", 0, I63) for k, n in stats_v.items()}
    return BlkWorkloadState(
        nblocks=_int(d["nblocks"], f"{path}.nblocks", 1, U32),
        meta_addr=_int(d["meta_addr"], f"{path}.meta_addr", 0, U64),
        cache_addr=_int(d["cache_addr"], f"{path}.cache_addr", 0, U64),
        qd=_int(d["qd"], f"{path}.qd", 1, U32),
        write_percent=_int(d["write_percent"], f"{path}.write_percent", 0, 100),
        rate=_number(d["rate"], f"{path}.rate"),
        rng=_int(d["rng"], f"{path}.rng", 0, U64),
        inflight=tuple(inflight),
        stats=stats,
        errors=tuple(_str(e, f"{path}.errors[{i}]", 4096) for i, e in enumerate(_list(d["errors"], f"{path}.errors"))),
    )


def net_work_to_json(st: NetWorkloadState) -> dict[str, Json]:
    return {"next_seq": st.next_seq, "received": [[f, n] for f, n in st.received], "other": st.other, "rate": st.rate}


def net_work_from_json(v: Json, path: str = "net.work") -> NetWorkloadState:
    """A :class:`NetWorkloadState` from JSON (types; :meth:`NetWorkload.from_state` checks the rest)."""
    d = _obj(v, path, _NET_WORK_KEYS)
    return NetWorkloadState(
        next_seq=_int(d["next_seq"], f"{path}.next_seq", 0, I63),
        received=_pairs(d["received"], f"{path}.received", "count"),
        other=_int(d["other"], f"{path}.other", 0, I63),
        rate=_number(d["rate"], f"{path}.rate"),
    )


# =========================================================================== document bytes
def _depth(doc: Json) -> int:
    """Nesting depth (a scalar is 0, ``{}`` / ``[]`` 1), without recursion."""
    deepest = 0
    stack: list[tuple[Json, int]] = [(doc, 0)]
    while stack:
        node, level = stack.pop()
        if type(node) is dict:
            children = node.values()
        elif type(node) is list:
            children = node
        else:
            continue
        level += 1
        if level > deepest:
            deepest = level
            if deepest > MAX_NESTING:
                return deepest
        stack.extend((c, level) for c in children)
    return deepest


_OPEN = np.zeros(256, dtype=np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


def _text_depth(raw: bytes) -> int:
    """Nesting depth of a *valid* JSON text, from its bytes (vectorized, no recursion):
    brackets outside strings, where a string's quotes are those preceded by an even
    number of backslashes.  Without a backslash in the text (the usual document), every
    quote is real and only the brackets and quotes are looked at past the first pass."""
    a = np.frombuffer(raw, dtype=np.uint8)
    if not len(a):
        return 0
    if b"\\" not in raw:
        b = a[_BRACKET_OR_QUOTE[a]]
        in_string = (np.cumsum(b == ord('"')) % 2).astype(bool)
        step = _OPEN[b].astype(np.int64)
        step[in_string] = 0
        return int(np.cumsum(step).max(initial=0))
    idx = np.arange(len(a))
    backslash = a == ord("\\")
    last_plain = np.maximum.accumulate(np.where(backslash, -1, idx))  # last non-backslash at or before i
    quote = a == ord('"')
    q = np.flatnonzero(quote)
    run_before = (q - 1) - np.where(q > 0, last_plain[np.maximum(q - 1, 0)], -1)  # backslashes right before
    real = np.zeros(len(a), dtype=np.int64)
    real[q[run_before % 2 == 0]] = 1
    in_string = (np.cumsum(real) % 2).astype(bool)  # an opening quote and what follows it
    step = _OPEN[a].astype(np.int64)
    step[in_string] = 0
    return int(np.cumsum(step).max(initial=0))


_BRACKET_OR_QUOTE = np.zeros(256, dtype=bool)
_BRACKET_OR_QUOTE[[ord(c) for c in '[]{}"']] = True


def encode_guest_state(obj: Json, *, check_depth: bool = True) -> bytes:
    """Canonical bytes of a JSON document (object): sorted keys, compact, ASCII.

    Refuses what :func:`decode_guest_state` would refuse (not an object, too
    deep, too big, non-JSON values).  ``check_depth=False`` skips the nesting
    walk for a document whose shape is fixed by the code that built it (the
    VM's own state at switch-over, where every millisecond is downtime); the
    decoder still checks it."""
    if type(obj) is not dict:
        raise _fail(DOCUMENT, f"a guest state document is a JSON object, got {_kind(obj)}")
    if check_depth and _depth(obj) > MAX_NESTING:
        raise _fail(DOCUMENT, f"nested deeper than {MAX_NESTING} levels")
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise _fail(DOCUMENT, f"not JSON data: {exc}") from exc
    raw = text.encode("ascii")
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise _fail(DOCUMENT, f"{len(raw)} bytes (at most {MAX_DOCUMENT_BYTES})")
    return raw


def decode_guest_state(data: bytes | bytearray | memoryview) -> dict[str, Json]:
    """Parse a guest state document; refuses non-UTF-8, non-objects, > 16 MiB, > 64 levels,
    duplicate keys, NaN / Infinity.  Field validation is the ``*_from_json`` functions' job."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _fail(DOCUMENT, f"expected bytes, got {_kind(data)}")
    if len(data) > MAX_DOCUMENT_BYTES:
        raise _fail(DOCUMENT, f"{len(data)} bytes (at most {MAX_DOCUMENT_BYTES})")
    raw = bytes(data)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _fail(DOCUMENT, f"not UTF-8 at byte {exc.start}") from exc
    try:
        doc = strictjson.loads(text)
    except StrictJsonError as exc:
        raise _fail(DOCUMENT, str(exc)) from exc
    except RecursionError as exc:
        raise _fail(DOCUMENT, f"nested deeper than {MAX_NESTING} levels") from exc
    except ValueError as exc:  # JSONDecodeError, and ints past Python's digit limit
        raise _fail(DOCUMENT, f"not JSON: {exc}") from exc
    if type(doc) is not dict:
        raise _fail(DOCUMENT, f"a guest state document is a JSON object, got {_kind(doc)}")
    if _text_depth(raw) > MAX_NESTING:
        raise _fail(DOCUMENT, f"nested deeper than {MAX_NESTING} levels")
    return doc
