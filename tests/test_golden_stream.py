"""The golden stream (tests/golden/, made by make_golden.py; remade for stream version 2,
the guest state document's in-flight rows and received runs) still restores: every section's format and what a destination accepts stay as they were.

A fresh destination host restores ``vm.stream`` with ``migrate-incoming file:`` onto a
copy of the golden disk, resumes the VM and verifies it (memory, page cache, disk); the
stream also still decodes with the analyzer.  Negative controls: the same stream
with a byte flipped (the section CRC), or re-encoded with a key of its guest-state
document changed, is refused, and the destination's VM does not run.
"""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import pytest

from virtio_lm.host.host import Host, HostConfig
from virtio_lm.migration.analyze import analyze_file
from virtio_lm.vm.machine import VmSpec
from virtio_lm.wire.stream import CpuState, StreamEncoder, decode_all

GOLDEN = Path(__file__).resolve().parent / "golden"


def _unpack(tmp_path: Path) -> tuple[Path, Path, dict]:
    meta = json.loads((GOLDEN / "golden.json").read_text())
    out = []
    for name in ("vm.stream", "disk.img"):
        path = tmp_path / name
        path.write_bytes(gzip.decompress((GOLDEN / f"{name}.gz").read_bytes()))
        out.append(path)
    return out[0], out[1], meta


def _restore(tmp_path: Path, stream: Path, disk: Path, meta: dict) -> tuple[Host, dict]:
    spec = VmSpec(**meta["spec"], blk_image=str(disk))
    host = Host(HostConfig(name="dst", qmp=f"unix:{tmp_path}/dst.qmp", vms=[spec], incoming=True, calibrate=False))
    host.table.call("migrate-incoming", {"uri": f"file:{stream}"})
    deadline = time.monotonic() + 60
    while (info := host.table.call("query-migrate"))["status"] not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, info
        time.sleep(0.02)
    return host, info


@pytest.mark.slow  # over 0.4 s: out of the one-minute fast subset (CI runs it)
def test_the_golden_stream_restores_and_verifies(tmp_path: Path) -> None:
    stream, disk, meta = _unpack(tmp_path)
    summary = analyze_file(stream)
    assert summary["valid"] and summary["complete"], summary.get("error")
    assert summary["pages"]["normal"] == meta["ram"]["normal"]
    assert [d["vf-index"] for d in summary["devices"]] == [0, 1]
    host, info = _restore(tmp_path, stream, disk, meta)
    try:
        assert info["status"] == "completed", info.get("error-desc")
        assert host.table.call("query-status")["status"] == "running"
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:  # the guest goes on a moment (its requests in flight complete)
            time.sleep(0.05)
        check = host.table.call("x-vm-verify")
        assert check["passed"], json.dumps(check, default=str)[:3000]
    finally:
        host.close()


def _rewritten(raw: bytes, edit) -> bytes:
    """The stream re-encoded section by section (fresh CRCs) with ``edit`` applied to
    the CPU_STATE section's data (same length, so COMPLETE's counts still hold)."""
    enc = StreamEncoder()
    out = bytearray()
    for sec in decode_all(raw):
        body = sec.body
        if isinstance(body, CpuState):
            data = edit(bytes(body.data))
            assert len(data) == len(body.data)
            body = CpuState(data)
        out += enc.encode(body, sec.flags)
    return bytes(out)


@pytest.mark.parametrize("what, edit, reason", [
    ("a byte flipped (the section's CRC)", None, "CRC-32"),
    ("an unknown key in the guest document", lambda d: d.replace(b'"next_token":', b'"Xext_token":', 1), "Xext_token: unknown key"),
    ("another unknown key (the blk driver's rr)", lambda d: d.replace(b'"rr":', b'"rX":', 1), "rX: unknown key"),
    ("a block workload's request the driver does not have", lambda d: d.replace(b'[3323,"w",52,28]', b'[3399,"w",52,28]', 1),
     "not the driver's outstanding"),
    ("a block workload's request that is neither read nor write", lambda d: d.replace(b'[3324,"r",1,32]', b'[3324,"x",1,32]', 1),
     "neither 'r' nor 'w'"),
    ("a workload rate that is a string", lambda d: d.replace(b'"rate":0.0,', b'"rate":"0",', 1), "blk.work.rate: expected a number"),
    ("a net workload counter that is negative", lambda d: d.replace(b'"next_seq":179', b'"next_seq":-79', 1),
     "net.work.next_seq: -79 is outside"),
])
def test_negative_control_a_changed_stream_is_refused_and_nothing_runs(tmp_path: Path, what, edit, reason) -> None:
    stream, disk, meta = _unpack(tmp_path)
    raw = stream.read_bytes()
    if edit is None:
        bad = bytearray(raw)
        at = raw.find(b'"next_token":')
        assert at > 0
        bad[at + 1] ^= 0x20
        stream.write_bytes(bytes(bad))
    else:
        assert edit(raw) != raw  # the edit applies to this stream
        stream.write_bytes(_rewritten(raw, edit))
    host, info = _restore(tmp_path, stream, disk, meta)
    try:
        assert info["status"] == "failed", info
        assert reason in info.get("error-desc", ""), info
        assert host.table.call("query-status")["status"] != "running"
    finally:
        host.close()
