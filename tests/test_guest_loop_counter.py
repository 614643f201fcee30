"""The guest's verifying loop (tests/qemu/loop.sh) publishes its round count in /tmp/iter; the
host reads it through the console (``cat /tmp/iter``) while the loop runs.  A stress trial read
it empty once (``echo $i > /tmp/iter`` truncates, then writes): the count must be replaced
whole.  These run the loop's own line in a host shell against a reader -- the same race, the
same shell semantics (redirection, rename) as the guest's busybox sh."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

LOOP = Path(__file__).resolve().parent / "qemu" / "loop.sh"


def the_loops_line() -> str:
    lines = [ln.split("#")[0].strip() for ln in LOOP.read_text().splitlines() if "/tmp/iter" in ln]
    assert len(lines) == 1, lines
    return lines[0]


def empty_reads(line: str, path: Path, *, seconds: float = 2.0, until_bad: bool = False) -> tuple[int, int]:
    """Run ``line`` (with /tmp/iter as ``path``) in a shell loop while reading ``path`` for
    ``seconds`` (host-side; with ``until_bad``, only until a read finds no number); returns
    (reads, reads that found no number)."""
    cmd = f"i=0; while :; do i=$((i + 1)); {line.replace('/tmp/iter', str(path))}; done"
    writer = subprocess.Popen(["sh", "-c", cmd])
    try:
        deadline = time.monotonic() + 10
        while not path.exists():
            assert time.monotonic() < deadline, "the writer never wrote"
            time.sleep(0.001)
        reads = bad = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                text = path.read_text()
            except FileNotFoundError:
                text = ""
            reads += 1
            if not re.fullmatch(r"\d+\n", text):
                bad += 1
                if until_bad:
                    break
        return reads, bad
    finally:
        writer.kill()
        writer.wait()


@pytest.mark.slow  # over 0.4 s: out of the one-minute fast subset (CI runs it)
def test_the_count_is_never_read_half_written(tmp_path):
    reads, bad = empty_reads(the_loops_line(), tmp_path / "iter")
    assert reads > 100 and bad == 0, (reads, bad)


def test_negative_control_a_truncating_write_is_caught(tmp_path):
    """The line before the fix: the reader sees an empty file (here most reads do)."""
    path = tmp_path / "iter"
    reads, bad = empty_reads("echo $i > /tmp/iter", path, seconds=10.0, until_bad=True)
    assert bad > 0, f"{reads} reads, none empty"
    os.unlink(path)
