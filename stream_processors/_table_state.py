"""Partitioned state over a faust Table: explicit partitions, changelog writes batched, undo.

See stream_processors.faust_patches for the faust internals this reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

from stream_processors._output import OutputProducer


class TableState:
    """:class:`~stream_processors.PartitionedState` over a faust Table, partition explicit.

    The in-memory value changes at once; the changelog message is written by
    :meth:`flush_changelog`, so the agent decides the order in which a batch's state and
    outputs become durable (see the agent in :func:`build_app`). Keys are encoded as faust's
    ``json`` key serializer does and values raw, so faust restores the table from the changelog
    as if it had written it.
    """

    def __init__(self, table: Any) -> None:
        self._table = table
        self._store: dict[str, bytes] = table.data.data  # the memory store's dict: fast reads
        self._pending: list[tuple[int, str, bytes | None]] = []
        self._held: list[tuple[int, str, bytes | None]] = []
        # (key, value before, its partition before) of each change since the savepoint.
        self._undo: list[tuple[str, bytes | None, int | None]] = []
        self._pending_at_savepoint = 0

    def savepoint(self) -> None:
        """Start recording changes for :meth:`rollback` (see stream_processors._isolation)."""
        self._undo.clear()
        self._pending_at_savepoint = len(self._pending)

    def rollback(self) -> None:
        """Undo the changes since the last :meth:`savepoint`, their changelog writes too."""
        store = self._table.data
        for key, old, partition in reversed(self._undo):
            if old is None:
                store.data.pop(key, None)
                store._key_partition.pop(key, None)
            else:
                store.data[key] = old
                if partition is not None:
                    store._key_partition[key] = partition
        self._undo.clear()
        del self._pending[self._pending_at_savepoint :]

    def hold(self) -> None:
        """Keep the pending changes for the next ``flush_changelog(previous=True)``."""
        self._held.extend(self._pending)
        self._pending = []

    def flush_changelog(self, out: OutputProducer | None, *, previous: bool = False) -> int:
        """Write pending changes (with ``previous``: the held ones) to the changelog.

        Without an :class:`OutputProducer` (under ``agent.test_context()``) faust's sends it.
        """
        if previous:
            pending, self._held = self._held, []
        else:
            pending, self._pending = self._pending, []
        if out is None:
            for partition, key, value in pending:
                self._table.send_changelog(partition, key, value, value_serializer="raw")
        else:
            topic = self._table.changelog_topic.get_topic_name()
            for partition, key, value in pending:
                out.produce(topic, orjson.dumps(key), value, partition)
        return len(pending)

    def get(self, key: str) -> bytes | None:
        """The value, or ``None``."""
        return self._store.get(key)

    def put(self, partition: int, key: str, value: bytes) -> None:
        """Set and send the change to ``partition`` of the changelog."""
        store = self._table.data
        self._undo.append((key, self._store.get(key), store._key_partition.get(key)))
        store[key] = value
        # The memory store uses this to drop keys of partitions assigned elsewhere.
        store._key_partition[key] = partition
        self._pending.append((partition, key, value))

    def delete(self, partition: int, key: str) -> None:
        """Remove and send a tombstone to ``partition`` of the changelog."""
        store = self._table.data
        self._undo.append((key, store.data.pop(key, None), store._key_partition.pop(key, None)))
        self._pending.append((partition, key, None))

    def items(self) -> Iterator[tuple[str, bytes]]:
        """Every key and value held by this worker."""
        return iter([(k, v) for k, v in self._table.data.items() if v is not None])

    def __len__(self) -> int:
        return len(self._table.data)
