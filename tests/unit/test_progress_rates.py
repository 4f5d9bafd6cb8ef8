"""``progress_rates``: the benchmarks' events/s from progress samples."""

from __future__ import annotations

import pytest

from spendstream.bench.worker import progress_rates


@pytest.mark.parametrize(
    ("samples", "total", "expected"),
    [
        pytest.param(
            [(0.0, 0), (1.0, 0), (2.0, 1000), (3.0, 2000), (4.0, 3000)],
            None,
            (2.0, 1000.0, 1000.0),
            id="start-up without progress is not counted",
        ),
        pytest.param(
            # 10 % (100) first reached at 1 s, 90 % (900) at 3 s: 800 events in 2 s
            [(0.0, 50), (1.0, 100), (2.0, 100), (3.0, 900), (9.0, 1000)],
            None,
            (0.0, 950 / 9, 400.0),
            id="steady rate leaves out the slow start and the tail",
        ),
        pytest.param(
            # bursts of a batch with idle steps between: the steady rate is the average
            [(0.0, 0), (0.1, 2000), (0.2, 2000), (0.3, 4000), (0.4, 4000), (0.5, 6000),
             (0.6, 6000), (0.7, 8000), (0.8, 8000), (0.9, 10000)],
            10_000,
            (0.1, 8000 / 0.8, 6000 / 0.6),
            id="bursts: steady is not the rate of the busy steps",
        ),
        pytest.param(
            [(0.0, 100), (1.0, 300)],
            1000,
            (0.0, 200.0, 200.0),
            id="90 % of the total never reached: the overall rate",
        ),
        pytest.param(
            [(0.0, 0), (0.1, 0), (0.25, 6000), (0.35, 6000), (0.45, 6000)],
            6000,
            (0.25, 6000 / 0.15, 6000 / 0.15),
            id="all progress in one step: the rate over that step, not 0",
        ),
        pytest.param([(5.0, 100)], None, (5.0, 0.0, 0.0), id="a single sample"),
    ],
)  # fmt: skip
def test_progress_rates(
    samples: list[tuple[float, int]], total: int | None, expected: tuple[float, float, float]
) -> None:
    assert progress_rates(samples, total) == pytest.approx(expected)


def test_no_progress_at_all_is_an_error() -> None:
    with pytest.raises(ValueError, match="no progress"):
        progress_rates([(0.0, 0), (1.0, 0)])
