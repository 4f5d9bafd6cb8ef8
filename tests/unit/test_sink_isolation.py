"""insert_isolating as a table of cases: the store refuses rows, or refuses everything."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest

from sinks._buffer import Batch
from sinks._sink import blames_rows, insert_isolating
from spendstream.errors import StoreError

pytestmark = pytest.mark.unit

DATA_ERROR = "Code: 53. DB::Exception: Type mismatch in the row. (TYPE_MISMATCH)"
DOWN = "Code: 210. DB::NetException: Connection refused (NETWORK_ERROR)"
PARTITIONS = (
    "Code: 252. DB::Exception: Too many partitions for single INSERT block (more than 100)."
)


class Store:
    """Refuses inserts holding a bad value (with ``error``), or everything while ``down``."""

    def __init__(self, bad: set[int], error: str = DATA_ERROR, down: bool = False) -> None:
        self.bad, self.error, self.down = bad, error, down
        self.rows: list[int] = []
        self.tokens: list[str] = []

    def insert(self, table: str, columns: Any, dedup_token: str) -> int:
        values = columns.column("v").to_pylist()
        if self.down:
            raise StoreError(DOWN)
        if self.bad & set(values):
            raise StoreError(self.error)
        self.rows += values
        self.tokens.append(dedup_token)
        return len(values)


def batch(n: int) -> Batch:
    return Batch("t", pa.table({"v": list(range(n))}), "tok")


@pytest.mark.parametrize(
    ("n", "bad"),
    [(10, set()), (10, {0}), (10, {9}), (11, {5}), (64, {3, 40}), (7, set(range(7))), (1, {0})],
)
def test_only_the_rows_refused_alone_are_reported(n: int, bad: set[int]) -> None:
    store = Store(bad)
    refused = insert_isolating(store, batch(n))  # type: ignore[arg-type]
    assert [i for i, _ in refused] == sorted(bad)
    assert all("TYPE_MISMATCH" in reason for _, reason in refused)
    assert sorted(store.rows) == [v for v in range(n) if v not in bad]  # each stored once


def test_one_insert_when_nothing_is_wrong() -> None:
    store = Store(set())
    assert insert_isolating(store, batch(100)) == []  # type: ignore[arg-type]
    assert store.tokens == ["tok"]


def test_a_store_that_is_down_is_not_blamed_on_rows() -> None:
    store = Store(set(), down=True)
    with pytest.raises(StoreError, match="Connection refused"):
        insert_isolating(store, batch(10))  # type: ignore[arg-type]


def test_split_tokens_are_deterministic() -> None:
    first, second = Store({5}), Store({5})
    insert_isolating(first, batch(16))  # type: ignore[arg-type]
    insert_isolating(second, batch(16))  # type: ignore[arg-type]
    assert first.tokens == second.tokens and len(set(first.tokens)) == len(first.tokens)


@pytest.mark.parametrize(
    ("message", "rows"),
    [
        (DATA_ERROR, True),
        (PARTITIONS, True),
        ("Code: 407. DB::Exception: Decimal math overflow. (DECIMAL_OVERFLOW)", True),
        (DOWN, False),
        ("Code: 252. DB::Exception: Too many parts (300). Merges are processing ...", False),
        ("Code: 241. DB::Exception: Memory limit exceeded (MEMORY_LIMIT_EXCEEDED)", False),
        ("cannot reach the ClickHouse server", False),
    ],
)
def test_which_errors_blame_the_rows(message: str, rows: bool) -> None:
    assert blames_rows(StoreError(message)) is rows
