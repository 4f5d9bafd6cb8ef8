"""The sink's isolating insert on the real ClickHouse engine (chDB): a batch the store refuses
for its data is split until what is left stores, and rows refused alone become dead letters."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pyarrow as pa
import pytest

from sinks import ChdbStore
from sinks._buffer import PRICED_EVENTS, Batch, SinkBuffer
from sinks._sink import insert_isolating
from spendstream.bench.sink import sample_priced_event

pytestmark = pytest.mark.integration


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ChdbStore]:
    s = ChdbStore(tmp_path / "chdb", serve=False)
    try:
        s.migrate()
        yield s
    finally:
        s.close()


def test_a_batch_over_more_months_than_one_insert_may_touch_is_stored_whole(
    store: ChdbStore,
) -> None:
    # ClickHouse refuses an insert touching more than 100 partitions (months here); retried as
    # it was, the batch stalled the sink for good. Valid data does this: a backfill in order.
    buf = SinkBuffer({"p": PRICED_EVENTS}, batch_rows=1000, batch_age_s=60, max_buffer_rows=1000)
    for month in range(150):
        event = sample_priced_event(month)
        year, mon = 2010 + month // 12, 1 + month % 12
        when = f"{year}-{mon:02d}-03T10:00:00+00:00"
        event.update(occurred_at=when, window_start=when, processed_at=when)
        buf.add("p", 0, month, orjson.dumps(event))
    (batch,) = buf.drain().batches
    with pytest.raises(Exception, match="partitions for single INSERT block"):
        store.insert(batch.table, batch.data, "whole")  # what the sink met before
    assert insert_isolating(store, batch) == []
    _, rows = store.query(
        "SELECT count(), uniqExact(toYYYYMM(occurred_at)) FROM spendstream.priced_events"
    )
    assert rows == [(150, 150)]


def test_rows_the_store_refuses_alone_are_reported_and_the_rest_stored(store: ChdbStore) -> None:
    store.query(
        "CREATE TABLE spendstream.checked (v Int64, CONSTRAINT small CHECK v < 100) "
        "ENGINE = MergeTree ORDER BY v"
    )
    values = [1, 2, 500, 3, 4, 5, 700, 6]
    batch = Batch("checked", pa.table({"v": pa.array(values, pa.int64())}), "tok")
    refused = insert_isolating(store, batch)
    assert [i for i, _ in refused] == [2, 6]
    assert all("VIOLATED_CONSTRAINT" in reason for _, reason in refused)
    _, rows = store.query("SELECT v FROM spendstream.checked ORDER BY v")
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5, 6]
