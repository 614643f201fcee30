"""Decode a saved migration stream into a summary (``virtio-lm analyze-stream FILE``).

Like QEMU's ``scripts/analyze-migration.py``: walk the sections of a stream
written by ``migrate file:PATH`` and report what is in it -- the configuration
HELLO announced, every round (its ROUND record and what the sections really
held), pages with data and zero pages / runs, each VF's state image with its
records (``wire.state.decode_image``), the CPU state size, whether the stream
is complete, and the first error if it is not a valid stream.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import BinaryIO

from virtio_lm.errors import StreamError, WireError
from virtio_lm.wire.parts import decode_parts_image, is_parts_image
from virtio_lm.wire.state import RecordType, decode_image
from virtio_lm.wire.stream import (
    CompleteRecord,
    CpuState,
    Device,
    Hello,
    RamPages,
    RoundRecord,
    StreamDecoder,
    ZeroRuns,
)

__all__ = ["analyze_bytes", "analyze_file", "format_summary"]


def _record_name(rtype: int) -> str:
    try:
        return RecordType(rtype).name
    except ValueError:
        return f"DEVICE_{rtype:#06x}"


def _new_round(index: int) -> dict:
    return {"round": index, "sections": 0, "normal": 0, "zero": 0, "zero-runs": 0, "bytes": 0, "final": False}


class _Analyzer:
    def __init__(self) -> None:
        self.dec = StreamDecoder()
        self.counts: Counter[str] = Counter()
        self.sizes: Counter[str] = Counter()
        self.rounds: list[dict] = []
        self.cur = _new_round(0)
        self.config: dict | None = None
        self.devices: list[dict] = []
        self.cpu_state: int | None = None
        self.complete = False
        self.after_complete = 0
        self.normal = self.zero = self.runs = 0

    def feed(self, data: bytes) -> None:
        for sec in self.dec.feed(data):
            name = sec.type.name
            self.counts[name] += 1
            self.sizes[name] += sec.size
            if self.complete:
                self.after_complete += 1
            b = sec.body
            if isinstance(b, Hello):
                c = b.config
                self.config = {
                    "version": b.version,
                    "memory-size": c.memory_size,
                    "page-size": c.page_size,
                    "pages": c.num_pages,
                    "workload": c.workload,
                    "vfs": [
                        {"index": v.index, "device-id": v.device_id, "offered-features": hex(v.offered_features),
                         "negotiated-features": hex(v.negotiated_features)}
                        for v in c.vfs
                    ],
                }
            elif isinstance(b, (RamPages, ZeroRuns)):
                self.cur["sections"] += 1
                self.cur["bytes"] += sec.size
                self.cur["final"] = self.cur["final"] or sec.final
                if isinstance(b, RamPages):
                    self.cur["normal"] += len(b.pages)
                    self.normal += len(b.pages)
                else:
                    n = b.num_pages
                    self.cur["zero"] += n
                    self.cur["zero-runs"] += len(b.runs)
                    self.zero += n
                    self.runs += len(b.runs)
            elif isinstance(b, RoundRecord):
                self.cur["final"] = self.cur["final"] or sec.final
                self.cur["record"] = {
                    "round": b.round, "throttle": b.throttle, "pages": b.pages, "normal": b.normal,
                    "zero": b.zero, "bytes": b.nbytes, "elapsed-ms": b.elapsed_us / 1000,
                }
                self.cur["consistent"] = (b.normal, b.zero, b.nbytes) == (
                    self.cur["normal"], self.cur["zero"], self.cur["bytes"]
                )
                self.rounds.append(self.cur)
                self.cur = _new_round(len(self.rounds))
            elif isinstance(b, Device):
                entry: dict = {"vf-index": b.vf_index, "device-id": b.device_id, "size": len(b.image)}
                try:
                    if is_parts_image(b.image):  # the virtio-1.4 profile: device parts
                        entry["parts"] = [{"type": f"{p.hdr.part_type:#x}", "length": len(p.value)}
                                          for p in decode_parts_image(b.image)[1]]
                    else:
                        img = decode_image(b.image)
                        entry["records"] = [{"type": _record_name(r.type), "length": len(r.payload)} for r in img.records]
                except WireError as exc:  # pragma: no cover - the decoder already checked it
                    entry["error"] = str(exc)
                self.devices.append(entry)
            elif isinstance(b, CpuState):
                self.cpu_state = len(b.data)
            elif isinstance(b, CompleteRecord):
                self.complete = True

    def summary(self, error: StreamError | None) -> dict:
        out: dict = {
            "valid": error is None and self.complete and not self.after_complete,
            "complete": self.complete,
            "bytes": self.dec.bytes_fed,
            "config": self.config,
            "sections": {k: {"count": self.counts[k], "bytes": self.sizes[k]} for k in self.counts},
            "rounds": self.rounds,
            "pages": {"normal": self.normal, "zero": self.zero, "zero-runs": self.runs},
            "devices": self.devices,
            "cpu-state-bytes": self.cpu_state,
        }
        if self.after_complete:
            out["sections-after-complete"] = self.after_complete
        if error is not None:
            out["error"] = {"type": type(error).__name__, "message": str(error), "section": error.section,
                            "offset": error.offset}
        elif not self.complete:
            out["error"] = {"type": "StreamTruncatedError", "message": "no COMPLETE section", "section": None,
                            "offset": self.dec.bytes_fed}
        return out


def _run(chunks) -> dict:
    a = _Analyzer()
    err: StreamError | None = None
    try:
        for c in chunks:
            a.feed(c)
        a.dec.finish()
    except StreamError as exc:
        err = exc
    return a.summary(err)


def analyze_bytes(data: bytes | bytearray | memoryview) -> dict:
    """Summary of a stream held in memory (never raises for bad streams: see ``error``)."""
    return _run([data])


def analyze_file(path: str | os.PathLike[str] | BinaryIO, *, chunk: int = 4 << 20) -> dict:
    """Summary of a stream file, read in chunks."""
    if hasattr(path, "read"):
        f = path  # type: ignore[assignment]
        return _run(iter(lambda: f.read(chunk), b""))
    with open(path, "rb") as f:
        return _run(iter(lambda: f.read(chunk), b""))


def format_summary(s: dict, *, as_json: bool = False) -> str:
    """Human text (or JSON) of :func:`analyze_file`'s summary."""
    if as_json:
        return json.dumps(s, indent=2)
    lines = []
    state = "valid, complete" if s["valid"] else ("INVALID" if "error" in s else "incomplete")
    lines.append(f"virtio-lm migration stream: {s['bytes']} bytes, {state}")
    c = s["config"]
    if c:
        lines.append(
            f"  version {c['version']}, memory {c['memory-size']} bytes ({c['pages']} pages of {c['page-size']}), "
            f"workload {c['workload']!r}"
        )
        for v in c["vfs"]:
            lines.append(f"  VF {v['index']}: device type {v['device-id']}, negotiated {v['negotiated-features']}")
    lines.append("  sections:")
    for name, v in s["sections"].items():
        lines.append(f"    {name:<10} {v['count']:>8}  {v['bytes']:>14} bytes")
    p = s["pages"]
    lines.append(f"  pages: {p['normal']} with data, {p['zero']} zero in {p['zero-runs']} runs")
    for r in s["rounds"]:
        rec = r.get("record", {})
        tag = " (final, VM stopped)" if r["final"] else ""
        ok = "" if r.get("consistent", True) else "  [ROUND record disagrees with the sections]"
        lines.append(
            f"  round {r['round']}{tag}: {r['normal']} pages, {r['zero']} zero ({r['zero-runs']} runs), "
            f"{r['bytes']} bytes, throttle {rec.get('throttle', 0)} %, {rec.get('elapsed-ms', 0):.1f} ms{ok}"
        )
    for d in s["devices"]:
        recs = ", ".join(f"{r['type']}({r['length']})" for r in d.get("records", []))
        lines.append(f"  VF {d['vf-index']} state image: device type {d['device-id']}, {d['size']} bytes: {recs}")
    if s["cpu-state-bytes"] is not None:
        lines.append(f"  CPU state: {s['cpu-state-bytes']} bytes")
    if "error" in s:
        e = s["error"]
        lines.append(f"  error: {e['type']}: {e['message']}")
    return "\n".join(lines)
