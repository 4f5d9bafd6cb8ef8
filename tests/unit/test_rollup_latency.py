"""Event-to-rollup matching of the latency benchmark, as a table of cases."""

from __future__ import annotations

import pytest

from spendstream.bench.caps import max_by_second, rollup_latencies

W0, W1 = 0, 60_000_000

CASES = [
    pytest.param([], [], [], id="nothing"),
    pytest.param(
        [("u", W0, 1.0), ("u", W0, 2.0)],
        [("u", W0, 1, 1.5), ("u", W0, 2, 2.25)],
        [0.25, 0.5],
        id="one upsert per event",
    ),
    pytest.param(
        [("u", W0, 1.0), ("u", W0, 2.0), ("u", W0, 3.0)],
        [("u", W0, 3, 4.0)],
        [1.0, 2.0, 3.0],
        id="one batch upsert counts all three",
    ),
    pytest.param(
        [("u", W0, 1.0), ("u", W0, 2.0)],
        [("u", W0, 1, 1.5)],
        [0.5],
        id="an event no upsert has counted yet is left out",
    ),
    pytest.param(
        [("u", W0, 1.0), ("u", W1, 2.0), ("u", W1, 3.0)],
        [("u", W1, 1, 2.5), ("u", W0, 1, 5.0), ("u", W1, 2, 3.5)],
        [0.5, 0.5, 4.0],
        id="windows are matched separately",
    ),
    pytest.param(
        [("a", W0, 1.0), ("b", W0, 1.0)],
        [("b", W0, 1, 1.1), ("a", W0, 1, 1.3)],
        [pytest.approx(0.1), pytest.approx(0.3)],
        id="users are matched separately",
    ),
    pytest.param(
        [("u", W0, 1.0), ("u", W0, 2.0)],
        [("u", W0, 1, 1.2), ("u", W0, 1, 1.4), ("u", W0, 2, 9.0)],
        [pytest.approx(0.2), 7.0],
        id="a repeated upsert does not count the next event",
    ),
    pytest.param(
        [("u", W0, 1.0)],
        [("other", W0, 5, 1.1), ("u", W1, 5, 1.1)],
        [],
        id="other users' and windows' upserts do not count",
    ),
]


@pytest.mark.parametrize(("sent", "rollups", "expected"), CASES)
def test_rollup_latencies(
    sent: list[tuple[str, int, float]],
    rollups: list[tuple[str, int, int, float]],
    expected: list[float],
) -> None:
    assert rollup_latencies(sent, rollups) == expected


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        pytest.param([], [], id="nothing"),
        pytest.param([(100.2, 0.05), (100.9, 0.2), (102.5, 1.5)], [200.0, 0.0, 1500.0],
                     id="worst per second, a quiet second is 0"),
    ],
)  # fmt: skip
def test_max_by_second(pairs: list[tuple[float, float]], expected: list[float]) -> None:
    assert max_by_second(100.0, pairs) == expected
