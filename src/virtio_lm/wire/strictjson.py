"""Strict JSON text: the one parser for JSON that crosses a boundary (QMP messages, the
guest state document inside CPU_STATE).

Python's :func:`json.loads` takes two things RFC 8259 leaves undefined or excludes: a
duplicate object key (the last one silently wins) and the constants ``NaN``,
``Infinity``, ``-Infinity``.  :func:`loads` refuses both with a
:class:`~virtio_lm.errors.StrictJsonError`; malformed text raises what ``json.loads``
raises (:class:`json.JSONDecodeError`, a ``ValueError``), so a caller can tell "not
JSON" from "JSON we do not take".  Depth and size limits are the caller's: they differ
(QMP counts nesting while framing; a guest state document has its own bounds).
"""

from __future__ import annotations

import json
from typing import Any

from virtio_lm.errors import StrictJsonError

__all__ = ["loads"]


def _reject_constant(name: str) -> Any:
    raise StrictJsonError(f"invalid keyword '{name}'")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)  # built in C (a guest state decode is on the switch-over path)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise StrictJsonError(f"duplicate key '{key}'")  # the first one repeated
            seen.add(key)
    return out


def loads(text: str) -> Any:
    """Parse one JSON text; refuses duplicate keys and NaN / Infinity (StrictJsonError)."""
    return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
