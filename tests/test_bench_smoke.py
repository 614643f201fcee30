"""Smoke test of ``virtio-lm bench``: the migration group runs and prints every figure.

No timing is asserted: figures vary with the machine.  What is checked: every
figure the issue names is printed with its target and a verdict, the
throughput run verified the destination's memory, and the baselines exist.
"""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.slow  # real host processes: seconds per test

from virtio_lm import bench


def test_migration_bench_quick_prints_every_figure(capsys):
    rc = bench.run_benches(("migration",), quick=True)
    out = capsys.readouterr().out
    assert rc == 0, out
    names = [
        r"stream throughput, 256 MiB random, idle .* memory verified",
        r"raw loopback TCP, same bytes, memory-to-memory",
        r"raw loopback TCP, same bytes, cache-hot buffers",
        r"ratio stream / raw memory-to-memory +[0-9.]+ +>= 0\.8 +(met|MISSED)",
        r"idle all-zero 256 MiB VM: bytes on the wire +[0-9,]+ B +<= 1 MiB +(met|MISSED)",
        r"VF switch-over fixed cost, blk \+ net, 32 in flight +[0-9.]+ ms +<= 10 ms +(met|MISSED)",
        r"after the hops the guest verifies: passed",
    ]
    for limit in (30, 100, 300):
        names.append(rf"downtime, limit {limit} ms +([0-9.]+ ms|failed) +<= {limit} ms +(met|MISSED)")
        names.append(rf"expected-downtime, limit {limit} ms +[0-9]+ ms +\+-25 % of measured +(met|MISSED)|"
                     rf"downtime, limit {limit} ms +failed")
    for pat in names:
        assert re.search(pat, out), f"missing {pat!r} in:\n{out}"
    assert "VERIFY FAILED" not in out


def test_unknown_group_is_refused():
    with pytest.raises(ValueError, match="unknown bench group"):
        bench.run_benches(("nope",), quick=True)


def test_a_failing_group_makes_the_exit_status_1(monkeypatch, capsys):
    def boom(quick: bool) -> None:
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(bench, "run_pf", boom)
    assert bench.run_benches(("pf",), quick=True) == 1
    assert "bench group pf failed to run" in capsys.readouterr().out
