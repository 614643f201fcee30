"""The switch-over estimate: bandwidth from delivered bytes, recorded traces, the empty-round case,
the calibrated fixed cost, and downtime-overrun accounting.  No timed assertions: fake clocks."""

from __future__ import annotations

import math

import pytest

from virtio_lm.migration.policy import BandwidthEstimator, Decision, MigrationParams, Policy
from virtio_lm.migration.session import SwitchoverHistory
from virtio_lm.wire.stream import StreamConfig, VfConfig


def test_estimator_unknown_until_a_byte_is_delivered():
    e = BandwidthEstimator(min_sample_bytes=1000)
    assert e.value == math.inf
    e.add(0.1, 0, 0.1)
    assert e.value == math.inf


def test_estimator_pools_small_rounds_then_takes_the_pooled_rate():
    e = BandwidthEstimator(min_sample_bytes=1_000_000, window_s=10)
    e.add(1.0, 500_000, 0.5)  # below the sample size: the pool's rate stands in
    assert e.value == pytest.approx(1_000_000)
    e.add(1.1, 500_000, 0.1)  # pool complete: 1 MB in 0.6 s
    assert e.value == pytest.approx(1_000_000 / 0.6)
    assert len(e.samples) == 1


def test_estimator_forgets_samples_outside_the_window():
    e = BandwidthEstimator(min_sample_bytes=1, window_s=0.5)
    e.add(1.0, 100_000_000, 0.1)  # 1 GB/s
    e.add(2.0, 10_000_000, 0.1)  # a slowed link: 100 MB/s; the old sample is 1 s old
    assert e.value == pytest.approx(100_000_000)


def test_estimator_rejects_negative_samples():
    with pytest.raises(ValueError):
        BandwidthEstimator().add(0.0, -1, 0.1)
    with pytest.raises(ValueError):
        BandwidthEstimator().add(0.0, 1, float("nan"))


# A trace recorded from a 256 MiB push-bitmap run (bytes the destination confirmed per round,
# the round's seconds without the zero check, pages found dirty at its end), then the rounds
# a vCPU at rest leaves: each an empty ROUND record of ~60 bytes and one round trip.
TRACE = [(91_000_000, 0.070, 40_000), (9_900_000, 0.008, 350)] + [(60, 0.0002, 0)] * 5


def _replay(trace, limit_ms=100, fixed=0.0):
    p = Policy(MigrationParams(downtime_limit_ms=limit_ms), 4096, 4104)
    p.fixed_cost_s = fixed
    p.begin(0.0)
    now, out = 0.0, []
    for nbytes, seconds, dirty in trace:
        now += seconds
        p.record_sent(nbytes)
        p.record_delivered(now, nbytes, seconds)
        out.append(p.end_round(now, dirty))
        if out[-1].decision is Decision.SWITCH:
            break
    return out


def test_trace_converges_and_the_estimate_matches_the_rate_seen():
    reports = _replay(TRACE)
    assert [r.decision for r in reports] == [Decision.CONTINUE, Decision.SWITCH]
    bw = reports[-1].bandwidth
    assert bw == pytest.approx((91_000_000 + 9_900_000) / 0.078, rel=1e-6)
    assert reports[-1].expected_downtime_s == pytest.approx(reports[-1].pending_bytes / bw)


def test_empty_rounds_do_not_ruin_the_bandwidth_estimate():
    """The case that broke convergence: empty rounds timed alone give ~300 kB/s (60 B per
    200 us), which would make even a handful of pending pages look too slow to send."""
    trace = [TRACE[0]] + [(60, 0.0002, 0)] * 3 + [(60, 0.0002, 20)]
    reports = _replay(trace, limit_ms=30, fixed=0.02)
    assert all(r.bandwidth > 1e8 for r in reports)
    assert reports[-1].decision is Decision.SWITCH or any(r.decision is Decision.SWITCH for r in reports)
    # negative control: the naive per-round estimate would not switch with 20 pages pending
    naive = 60 / 0.0002
    assert 20 * 4104 / naive > 0.030 - 0.02


def test_fixed_cost_above_the_limit_gives_up_and_says_so():
    reports = _replay(TRACE, limit_ms=30, fixed=0.05)
    assert reports[0].decision is Decision.GIVE_UP


def _cfg(kind=1):
    return StreamConfig(memory_size=1 << 26, page_size=4096, vfs=(VfConfig(0, kind, 0, 0),), workload="w")


def test_history_calibration_is_separate_from_what_migrations_learned():
    h = SwitchoverHistory()
    assert h.get(_cfg()) is None and h.calibrated(_cfg()) is None
    h.calibrate(_cfg(), 0.012, 0.005)
    assert h.calibrated(_cfg()) == (0.012, 0.005) and h.get(_cfg()) is None
    assert h.calibrated(_cfg(kind=2)) is None  # another kind of VM
    h.record(_cfg(), 0.02)
    assert h.get(_cfg()) == 0.02
    h.calibrate(_cfg(), float("nan"))  # ignored
    h.calibrate(_cfg(), 0.01, 0.02)  # a restore part longer than the whole: ignored
    assert h.calibrated(_cfg()) == (0.012, 0.005)


def test_history_ratio_scales_the_calibration_and_refuses_broken_samples():
    h = SwitchoverHistory(weight=0.5)
    assert h.ratio(_cfg()) is None
    h.record_ratio(_cfg(), 2.0)
    h.record_ratio(_cfg(), 1.0)
    assert h.ratio(_cfg()) == pytest.approx(1.5)
    h.record_ratio(_cfg(), 500.0)  # a sample no real switch-over gives: ignored
    h.record_ratio(_cfg(), float("inf"))
    assert h.ratio(_cfg()) == pytest.approx(1.5)


def test_round_zero_counts_only_until_a_later_round_gives_a_sample():
    e = BandwidthEstimator(min_sample_bytes=1_000_000, window_s=10)
    e.add(0.2, 64_000_000, 0.2, provisional=True)  # first touch of the destination's memory: 320 MB/s
    assert e.value == pytest.approx(320e6)
    e.add(0.21, 500_000, 0.001)  # too small to time alone: the provisional one still stands
    assert e.value == pytest.approx(320e6)
    e.add(0.25, 20_000_000, 0.02)  # a later round: ~1 GB/s, and round 0 no longer counts
    assert e.value == pytest.approx(20_500_000 / 0.021)


def test_a_big_final_send_waits_for_a_bandwidth_sample_past_round_zero():
    p = Policy(MigrationParams(downtime_limit_ms=100), 4096, 4104)
    p.begin(0.0)
    p.record_sent(64_000_000)
    p.record_delivered(0.2, 64_000_000, 0.2, provisional=True)  # 320 MB/s, first touch
    r = p.end_round(0.2, 2000)  # 8.2 MB: 26 ms > 10 % of the limit
    assert r.decision is Decision.CONTINUE
    p.record_delivered(0.23, 8_200_000, 0.01)  # round 1: 820 MB/s
    assert p.end_round(0.23, 2000).decision is Decision.SWITCH
    # negative control: a small final send switches on round 0's figure
    q = Policy(MigrationParams(downtime_limit_ms=100), 4096, 4104)
    q.begin(0.0)
    q.record_delivered(0.2, 64_000_000, 0.2, provisional=True)
    assert q.end_round(0.2, 100).decision is Decision.SWITCH
