"""virtio-lm bench profiles: the figures taken from each run, and (slow) one real run per profile."""

from __future__ import annotations

import json
import math

import pytest

from virtio_lm.bench_profiles import Plan, run, run_record, summarize


def _record(profile: str, *, quiesce: int, save: int, restore: int, run_: int, collect_ms: float, pages: int) -> dict:
    return {
        "status": "completed", "downtime": 10.0, "total": 500.0, "phases": {"quiesce": 1.0}, "verified": True,
        "vf-source": {"calls": {"quiesce": {"commands": quiesce, "ms": 1.0}, "save": {"commands": save, "ms": 2.0},
                                "collect-dirty": {"commands": 3, "ms": collect_ms},
                                "pre-copy": {"commands": 6, "ms": 4.0}},
                      "image-bytes": 740, "pre-copy-bytes": 740, "dirty": {"pages-scanned": pages}},
        "vf-destination": {"calls": {"prepare": {"commands": 4, "ms": 5.0}, "restore": {"commands": restore, "ms": 3.0},
                                     "run": {"commands": run_, "ms": 0.5}}},
        "profile": profile,
    }


def test_commands_in_the_downtime_are_quiesce_save_restore_and_run():
    f = run_record(_record("seed", quiesce=2, save=6, restore=6, run_=2, collect_ms=10.0, pages=1 << 18))
    assert f["commands-in-downtime"] == 16 and f["commands-in-downtime-ms"] == pytest.approx(6.5)
    assert f["commands"] == 16 + 3 + 6 + 4  # collection, pre-copy and the RESUMING set-up are outside it
    assert f["dirty-ms-per-gib"] == pytest.approx(10.0)  # 2**18 pages of 4 KiB = 1 GiB covered
    assert f["image-bytes"] == 740 and f["pre-copy-bytes"] == 740


def test_no_page_covered_gives_no_cost_per_gib_and_failed_runs_are_left_out():
    f = run_record(_record("virtio-1.4", quiesce=2, save=4, restore=4, run_=2, collect_ms=1.0, pages=0))
    assert math.isnan(f["dirty-ms-per-gib"])
    s = summarize({"seed": [_record("seed", quiesce=2, save=6, restore=6, run_=2, collect_ms=1.0, pages=1),
                            {"status": "failed", "error": "x"}]})
    assert s["seed"]["runs"] == 2 and s["seed"]["completed"] == 1 and s["seed"]["verified"] == 1
    assert s["seed"]["commands-in-downtime"]["median"] == 16


@pytest.mark.slow  # two migrations between fresh host processes
def test_one_run_per_profile_migrates_verifies_and_writes_json_and_png(tmp_path, capsys):
    summary = run(Plan(runs=1, memory_mib=64, sweep_mib=16, warmup_s=0.5), tmp_path, progress=False)
    for prof in ("seed", "virtio-1.4"):
        assert summary[prof]["completed"] == summary[prof]["verified"] == 1, summary[prof]
    assert summary["seed"]["dirty-commands"]["median"] > 0 and summary["virtio-1.4"]["dirty-commands"]["median"] == 0
    assert summary["virtio-1.4"]["pre-copy-bytes"]["median"] > 0 and summary["seed"]["pre-copy-bytes"]["median"] == 0
    doc = json.loads((tmp_path / "profiles.json").read_text())
    assert set(doc["runs"]) == {"seed", "virtio-1.4"}
    assert (tmp_path / "profiles.png").stat().st_size > 10_000
    assert "1.4/seed" in capsys.readouterr().out
