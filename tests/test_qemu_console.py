"""QemuProcess's console waits see complete lines only.

A serial console under TCG reaches the host a few bytes at a time.  A stress trial (2026-12-03)
read the dirtier's PID as 8 from the first bytes of "DIRTIER_PID 86": the destination then
showed PID 8 as a kworker, and the baseline called that QEMU losing its guest's state.  These
tests drive :class:`QemuProcess` with a stand-in for QEMU (a Python child that writes to its
stdout in pieces the test releases), so no QEMU is needed."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from virtio_lm.qemu_guest import QemuProcess, QemuProcessError

# Writes each stdin line's text to stdout without a newline of its own ("\n" written as "|"),
# so the test decides where the console's lines end.
FAKE = r"""
import sys
for line in sys.stdin:
    sys.stdout.write(line.rstrip("\n").replace("|", "\n"))
    sys.stdout.flush()
"""


@pytest.fixture
def console(tmp_path: Path):
    q = QemuProcess("fake", tmp_path, [], str(tmp_path / "qmp.sock"), binary=[sys.executable, "-c", FAKE])
    yield q
    q.proc.kill()
    q.proc.wait(30)


def _until_console_has(q: QemuProcess, text: str) -> None:
    deadline = time.monotonic() + 30
    while text not in q.text():
        assert time.monotonic() < deadline, q.text()
        time.sleep(0.01)


def test_a_number_split_across_reads_is_read_whole(console: QemuProcess) -> None:
    console.send("boot|DIRTIER_PID 8")
    _until_console_has(console, "DIRTIER_PID 8")
    console.send("6|")
    m = console.wait_for(r"^DIRTIER_PID (\d+)", time.monotonic() + 30)
    assert m.group(1) == "86"


@pytest.mark.slow  # 0.3 s or more: out of the one-minute fast subset (CI runs it)
def test_a_partial_line_is_not_matched_until_it_ends(console: QemuProcess) -> None:
    console.send("@@END 1 13")
    _until_console_has(console, "@@END 1 13")
    with pytest.raises(QemuProcessError, match="in time"):
        console.wait_for(r"^@@END 1 (\d+)", time.monotonic() + 0.3)
    console.send("0|")
    assert console.wait_for(r"^@@END 1 (\d+)", time.monotonic() + 30).group(1) == "130"


def test_the_last_line_counts_once_the_process_has_exited(console: QemuProcess) -> None:
    console.send("panic: no newline after this")
    _until_console_has(console, "no newline")
    console.proc.stdin.close()
    console.proc.wait(30)
    assert console.wait_for(r"^panic: (.*)", time.monotonic() + 30).group(1) == "no newline after this"


def test_start_beyond_the_last_newline_waits(console: QemuProcess) -> None:
    console.send("one|two")
    _until_console_has(console, "two")
    start = len(console.text())
    with pytest.raises(QemuProcessError, match="in time"):
        console.wait_for(r"three", time.monotonic() + 0.2, start)
    console.send("|three|")
    assert console.wait_for(r"^three$", time.monotonic() + 30, start).group(0) == "three"
