"""``progress_rates``: the benchmarks' events/s from progress samples."""

from __future__ import annotations

import pytest

from spendstream.bench_worker import progress_rates


@pytest.mark.parametrize(
    ("samples", "expected"),
    [
        # start-up without progress is not counted; 2,000 events in 2 s after the first progress
        ([(0.0, 0), (1.0, 0), (2.0, 1000), (3.0, 2000), (4.0, 3000)], (2.0, 1000.0, 1000.0)),
        # steps without progress are left out of the median, not counted as zero
        ([(0.0, 500), (1.0, 500), (2.0, 1500), (2.5, 2500)], (0.0, 800.0, 1500.0)),
        # a single sample: no steps, the median falls back to the overall rate
        ([(5.0, 100)], (5.0, 0.0, 0.0)),
    ],
)
def test_progress_rates(
    samples: list[tuple[float, int]], expected: tuple[float, float, float]
) -> None:
    assert progress_rates(samples) == pytest.approx(expected)


def test_no_progress_at_all_is_an_error() -> None:
    with pytest.raises(ValueError, match="no progress"):
        progress_rates([(0.0, 0), (1.0, 0)])
