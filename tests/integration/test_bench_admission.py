"""The admission section of ``spendstream bench`` on the real broker, small: its figures are
measured and add up (the local path was served from the pool, the open loop was answered, the
burst did not pass the hard cap). Speed is never asserted here."""

from __future__ import annotations

from typing import Any

import pytest

from spendstream.bench.admission import LOCAL_POOL, run_admission_bench

pytestmark = pytest.mark.integration


def test_the_admission_section_measures_both_paths_and_the_burst(make_settings: Any) -> None:
    settings = make_settings(processor={"session_timeout_s": 6})
    figures = run_admission_bench(settings, seconds=2, rate=100, local_users=10, blend_rounds=3)

    # Local path: every pooled reservation was granted (far from the roomy cap) and each timed
    # admit() was served from the pool.
    assert figures["local_decisions"] == 10 * LOCAL_POOL
    assert figures["local_served"] == figures["local_decisions"]
    assert figures["local_decisions_per_s"] > 0
    # Blended: one strict round trip per pool + 1 admissions, the rest local.
    assert figures["blended_admissions"] == 3 * (LOCAL_POOL + 1)
    assert figures["blended_strict"] == 3
    assert figures["blended_local"] == 3 * LOCAL_POOL
    assert figures["blended_per_s"] > 0
    assert figures["blended_strict_rtt_mean_ms"] > 0

    # Strict path: every scheduled request answered on its plan, admitted.
    assert figures["strict_sent"] == 200
    assert figures["strict_answered"] == 200
    assert figures["strict_errors"] == 0
    assert figures["strict_blocked"] == 0
    assert figures["strict_no_plan"] == 0
    assert figures["strict_sent_per_s"] > 0
    assert 0 < figures["strict_p50_ms"] <= figures["strict_p99_ms"] <= figures["strict_max_ms"]

    # Burst: 60 calls on 0.10 USD left; the cap held and nothing was blocked needlessly.
    assert figures["burst_calls"] == 60
    assert figures["burst_prespent_usd"] == pytest.approx(0.40)
    assert figures["burst_remaining_usd"] == pytest.approx(0.10)
    assert figures["burst_overshoot_usd"] == 0
    assert figures["burst_spent_usd"] <= figures["burst_remaining_usd"]
    assert figures["burst_admitted"] >= figures["burst_estimates_that_fit"] == 6
    assert figures["burst_events_landed"] == figures["burst_admitted"]
    assert figures["burst_local"] == 0  # near the cap no pool is granted
