"""Progress in a pipe: whole plain lines, never a live bar cut into fragments.

The migration progress path of ``virtio-lm demo`` / ``virtio-lm migrate``
(:func:`virtio_lm.orchestrate.run_migration` with ``progress=True``) runs in a
child process whose stdout is a pipe, against monitors that answer a scripted
migration; every line it prints must be one whole progress line.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import textwrap

import pytest

from virtio_lm.progress import PlainTasks, is_terminal

LINE = re.compile(
    r"migrate: (setup|active|device|completed), round \d+, [0-9.]+ (B|KiB|MiB|GiB) sent, "
    r"[0-9.]+ (B|KiB|MiB|GiB) left, \d+ Mbit/s, expected downtime \d+ ms, [0-9.]+ s"
)

SCRIPT = textwrap.dedent(
    """
    import time
    from virtio_lm.orchestrate import run_migration

    def infos():
        yield {"status": "setup", "ram": {}}
        for rnd in range(1, 6):
            for k in range(8):  # many polls per round: at most one line each unless a second passes
                yield {"status": "active", "expected-downtime": 12,
                       "ram": {"total": 256 << 20, "transferred": rnd * (40 << 20) + k * 4096,
                               "remaining": (6 - rnd) * (30 << 20), "dirty-sync-count": rnd, "mbps": 934.5}}
        while True:
            yield {"status": "completed", "expected-downtime": 12, "downtime": 20,
                   "ram": {"total": 256 << 20, "transferred": 300 << 20, "remaining": 0, "dirty-sync-count": 6, "mbps": 900.0}}

    class Source:
        def __init__(self):
            self.it = infos()
        def cmd(self, name, **args):
            return next(self.it) if name == "query-migrate" else {}

    class Dest:
        def cmd(self, name, **args):
            if name == "query-migrate":
                return {"status": "completed", "socket-address": [{"host": "127.0.0.1", "port": "1"}]}
            return {}

    info = run_migration(Source(), Dest(), progress=True, poll=0.01)
    print("final", info["status"], flush=True)
    """
)


@pytest.mark.slow  # over 0.4 s: out of the one-minute fast subset (CI runs it)
def test_migration_progress_into_a_pipe_is_whole_lines():
    res = subprocess.run([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[-1] == "final completed"
    progress = lines[:-1]
    assert "\x1b" not in res.stdout and "…" not in res.stdout and "\r" not in res.stdout
    for line in progress:
        assert LINE.fullmatch(line), f"not a whole progress line: {line!r}"
    rounds = [int(re.search(r"round (\d+)", ln).group(1)) for ln in progress if ln.startswith("migrate: active")]
    assert rounds == sorted(rounds) and set(rounds) == {1, 2, 3, 4, 5}  # every round told, in order
    assert len(progress) < 20  # not one line per poll (42 polls): a line per round, status or second
    assert progress[-1].startswith("migrate: completed")


def test_plain_tasks_print_whole_lines_and_always_the_finished_task():
    out = io.StringIO()
    bar = PlainTasks(out, interval=3600)
    t = bar.add_task("tracking", total=3)
    for _ in range(3):
        bar.advance(t)
    u = bar.add_task("modes", total=2)
    bar.advance(u)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # the second advance falls inside the interval: not told
    assert lines[0].startswith("tracking: 1/3 (") and lines[1].startswith("tracking: 3/3 (")
    assert lines[2].startswith("modes: 1/2 (")
    assert not is_terminal(out)


@pytest.mark.slow
def test_demo_progress_into_a_pipe_is_whole_lines():
    res = subprocess.run(
        [sys.executable, "-m", "virtio_lm.cli", "demo", "--memory-mib", "64", "--warmup", "0.5", "--after", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=180,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    progress = [ln for ln in res.stdout.splitlines() if ln.startswith("migrate:")]
    assert progress and progress[-1].startswith("migrate: completed")
    for line in progress:
        assert LINE.fullmatch(line), f"not a whole progress line: {line!r}"
    assert "\x1b" not in res.stdout and "\r" not in res.stdout
    assert res.stdout.rstrip().endswith("PASS")
