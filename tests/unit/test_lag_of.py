"""Lag from committed and listed offsets: the arithmetic and the refusals (fake admin client;
the real broker path is tests/integration/test_lag.py)."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from spendstream.lag import lag_of


@dataclass
class Committed:
    topic: str
    partition: int
    offset: int
    error: Any = None


@dataclass
class Listed:
    offset: int


class FakeAdmin:
    """Answers ``list_offsets`` from fixed start and end offsets, counting the requests."""

    def __init__(self, starts: dict[int, int], ends: dict[int, int]) -> None:
        self.starts, self.ends = starts, ends
        self.requests: list[int] = []

    def list_offsets(self, request: dict[Any, Any], request_timeout: float) -> dict[Any, Any]:
        self.requests.append(len(request))
        out = {}
        for tp, spec in request.items():
            table = self.ends if type(spec).__name__ == "LatestSpec" else self.starts
            future: Future[Listed] = Future()
            future.set_result(Listed(table[tp.partition]))
            out[tp] = future
        return out


@pytest.mark.parametrize(
    ("committed", "starts", "ends", "lag"),
    [
        ({0: 2, 1: 3}, {0: 0, 1: 0}, {0: 5, 1: 3}, {0: 3, 1: 0}),
        # Nothing committed: counted from the first offset left (retention may have moved it).
        ({0: -1001}, {0: 1200}, {0: 1500}, {0: 300}),
        # A commit past the end (a topic recreated smaller) is no negative lag.
        ({0: 90}, {0: 0}, {0: 40}, {0: 0}),
    ],
)
def test_lag_per_partition(
    committed: dict[int, int], starts: dict[int, int], ends: dict[int, int], lag: dict[int, int]
) -> None:
    admin = FakeAdmin(starts, ends)
    parts = [Committed("t", p, o) for p, o in committed.items()]
    assert lag_of(admin, parts, 5.0) == {("t", p): n for p, n in lag.items()}
    # One request for every end offset, and one more only when something has no commit.
    unset = sum(1 for o in committed.values() if o < 0)
    assert admin.requests == [len(committed)] + ([unset] if unset else [])


def test_a_partition_whose_commit_could_not_be_read_is_an_error() -> None:
    error = KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED)
    with pytest.raises(KafkaException):
        lag_of(FakeAdmin({0: 0}, {0: 5}), [Committed("t", 0, -1001, error)], 5.0)
