"""Smoke test of ``virtio-lm bench``: the migration group runs and prints every figure.

No timing is asserted: figures vary with the machine.  What is checked: every
figure the issue names is printed with its target and a verdict, the
throughput run verified the destination's memory, and the baselines exist.
"""

from __future__ import annotations

import re

import pytest

from virtio_lm import bench


def check_migration_output(out: str) -> None:
    """Every figure the issue names, printed with its target and a verdict; a row that
    failed is a failure; a MISSED target is one only where the figure does not depend on
    the machine's speed (timing targets are the bench's to report, not a test's)."""
    names = [
        r"stream throughput, 256 MiB random, idle .* memory verified",
        r"raw loopback TCP, same bytes, memory-to-memory",
        r"raw loopback TCP, same bytes, cache-hot buffers",
        r"ratio stream / raw memory-to-memory +[0-9.]+ +>= 0\.8 +(met|MISSED)",
        r"idle all-zero 256 MiB VM: bytes on the wire +[0-9,]+ B +<= 1 MiB +(met|MISSED)",
        r"switch-over fixed cost, blk \+ net VFs, 32 in flight +[0-9.]+ ms +<= 10 ms +(met|MISSED)",
        r"after the hops the guest verifies: passed",
    ]
    for limit in (30, 100, 300):
        names.append(rf"downtime, limit {limit} ms +([0-9.]+ ms +<= {limit} ms +(met|MISSED)|gave up +<= {limit} ms)")
        names.append(rf"expected-downtime, limit {limit} ms +[0-9]+ ms +\+-25 % of measured +(met|MISSED)|"
                     rf"downtime, limit {limit} ms +gave up")
    for pat in names:
        assert re.search(pat, out), f"missing {pat!r} in:\n{out}"
    assert "VERIFY FAILED" not in out
    assert not re.search(r"^  downtime, .*  (failed|cancelled|\?)  ", out, re.M), out  # a migration that broke
    assert re.search(r"idle all-zero 256 MiB VM: bytes on the wire .* met", out), out


@pytest.mark.slow  # real host processes
def test_migration_bench_quick_prints_every_figure(capsys):
    rc = bench.run_benches(("migration",), quick=True)
    out = capsys.readouterr().out
    assert rc == 0, out
    check_migration_output(out)


_GOOD = """
  stream throughput, 256 MiB random, idle  900 MB/s    memory verified
  raw loopback TCP, same bytes, memory-to-memory  1000 MB/s
  raw loopback TCP, same bytes, cache-hot buffers  2000 MB/s
  ratio stream / raw memory-to-memory  0.9  >= 0.8  met
  idle all-zero 256 MiB VM: bytes on the wire  70,000 B  <= 1 MiB  met
  switch-over fixed cost, blk + net VFs, 32 in flight  9.0 ms  <= 10 ms  met
  downtime, limit 30 ms  gave up  <= 30 ms          the switch-over's fixed cost, 40 ms
  downtime, limit 100 ms  20.0 ms  <= 100 ms  met
  expected-downtime, limit 100 ms  19 ms  +-25 % of measured  met
  downtime, limit 300 ms  25.0 ms  <= 300 ms  MISSED
  expected-downtime, limit 300 ms  20 ms  +-25 % of measured  MISSED
  after the hops the guest verifies: passed
"""


@pytest.mark.parametrize("bad", [
    ("downtime, limit 100 ms  20.0 ms  <= 100 ms  met", "downtime, limit 100 ms  failed  <= 100 ms  MISSED  broken"),
    ("bytes on the wire  70,000 B  <= 1 MiB  met", "bytes on the wire  9,000,000 B  <= 1 MiB  MISSED"),
    ("after the hops the guest verifies: passed", "after the hops the guest verifies: FAILED"),
])
def test_the_output_check_catches_a_broken_row(bad):
    check_migration_output(_GOOD)  # the control: a good output passes
    with pytest.raises(AssertionError):
        check_migration_output(_GOOD.replace(*bad))


def test_unknown_group_is_refused():
    with pytest.raises(ValueError, match="unknown bench group"):
        bench.run_benches(("nope",), quick=True)


def test_a_failing_group_makes_the_exit_status_1(monkeypatch, capsys):
    def boom(quick: bool) -> None:
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(bench, "run_pf", boom)
    assert bench.run_benches(("pf",), quick=True) == 1
    assert "bench group pf failed to run" in capsys.readouterr().out


@pytest.mark.slow  # seconds: every micro-benchmark once, short
def test_the_micro_bench_groups_run(capsys):
    """foundation, pf and devices (virtio_lm.benches) run to the end and print their tables."""
    assert bench.run_benches(("foundation", "pf", "devices"), quick=True) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    for needle in ("zero-page scan", "pull-bytemap", "TX in flight"):
        assert needle in out, out[-3000:]


@pytest.mark.slow  # matplotlib's import alone is seconds here
def test_downtime_replot_draws_every_run_from_the_json(tmp_path):
    """``replot`` rebuilds the cells from a matrix JSON: every completed run is a marker
    (a run missing from the JSON is a marker fewer -- the negative control)."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from virtio_lm import bench_downtime as bd

    runs = [{"limit": lim, "mode": mode, "rate": 32.0, "status": "completed", "downtime": d, "expected": 10.0}
            for lim, mode, d in ((30, "push-bitmap", 12.0), (30, "push-bitmap", 574.7), (100, "pull-bytemap", 20.0))]
    drawn: list[int] = []
    real = bd.plot

    def counting(cells, path, title, **kw):
        drawn.append(sum(len(c.runs) for c in cells))
        real(cells, path, title, **kw)

    for doc, want in (({"runs": runs}, 3), ({"runs": runs[1:]}, 2)):
        src = tmp_path / "m.json"
        src.write_text(json.dumps(doc))
        out = tmp_path / "m.png"
        bd.plot, saved = counting, bd.plot
        try:
            bd.replot(src, out, "t")
        finally:
            bd.plot = saved
        assert out.stat().st_size > 0 and drawn[-1] == want
    plt.close("all")
