"""summarize: rounds of `spendstream bench --repeat N` as min/median/max and per-run ratios."""

from __future__ import annotations

from typing import Any

import pytest

from spendstream.bench import is_ratio, summarize

pytestmark = pytest.mark.unit


def rounds() -> list[dict[str, dict[str, Any]]]:
    return [
        {
            "worker": {"worker_events_per_s": 100.0, "batch_size": 5000, "ok": True},
            "baselines": {
                "bare_events_per_s": 400.0,
                "worker_vs_bare": 0.25,
                "quix_events_per_s": 50.0,
                "worker_vs_quix": 2.0,
                "quix_version": "3.28.1",
                "bare": {"events_per_s": 400.0},
            },
        },
        {
            "worker": {"worker_events_per_s": 300.0, "batch_size": 5000, "ok": True},
            "baselines": {
                "bare_events_per_s": 500.0,
                "worker_vs_bare": 0.6,
                "quix_skipped": "not installed",
                "bare": {"events_per_s": 500.0},
            },
        },
        {
            "worker": {"worker_events_per_s": 200.0, "batch_size": 5000, "ok": False},
            "baselines": {
                "bare_events_per_s": 1000.0,
                "worker_vs_bare": 0.2,
                "quix_events_per_s": 100.0,
                "worker_vs_quix": 2.0,
                "bare": {"events_per_s": 1000.0},
            },
        },
    ]


def test_min_median_max_of_each_number() -> None:
    summary = summarize(rounds())
    worker = summary["worker"]["worker_events_per_s"]
    assert (worker["min"], worker["median"], worker["max"]) == (100.0, 200.0, 300.0)
    assert worker["runs"] == [100.0, 300.0, 200.0]  # in round order
    assert "per_run" not in worker
    assert summary["worker"]["batch_size"]["median"] == 5000
    # Booleans, text and nested tables are not figures to summarize.
    assert "ok" not in summary["worker"]
    assert {"quix_version", "quix_skipped", "bare"}.isdisjoint(summary["baselines"])


def test_ratios_are_given_per_run_not_as_a_ratio_of_medians() -> None:
    baselines = summarize(rounds())["baselines"]
    ratio = baselines["worker_vs_bare"]
    assert ratio["per_run"] == [0.25, 0.6, 0.2]
    assert (ratio["min"], ratio["median"], ratio["max"]) == (0.2, 0.25, 0.6)
    # The ratio of the medians (200 / 500 = 0.4) is not what is reported.
    assert ratio["median"] != 200.0 / baselines["bare_events_per_s"]["median"]


def test_a_figure_missing_from_a_round_is_summarized_over_the_others() -> None:
    quix = summarize(rounds())["baselines"]["worker_vs_quix"]
    assert quix["per_run"] == [2.0, 2.0] and quix["median"] == 2.0


def test_even_number_of_rounds_takes_the_middle_mean() -> None:
    two = [{"sink": {"rows_per_s": 90}}, {"sink": {"rows_per_s": 110}}]
    median = summarize(two)["sink"]["rows_per_s"]["median"]
    assert median == 100 and isinstance(median, int)
    assert summarize([{"s": {"n": 1}}, {"s": {"n": 2}}])["s"]["n"]["median"] == 1.5


@pytest.mark.parametrize(
    ("figure", "ratio"),
    [
        ("worker_vs_bare", True),
        ("worker_vs_quix", True),
        ("ratio", True),
        ("worker_events_per_s", False),
        ("insert_ms_p99", False),
    ],
)
def test_which_figures_are_ratios(figure: str, ratio: bool) -> None:
    assert is_ratio(figure) is ratio
