"""Partitioned key-value state: a faust Table in the worker, a dict in tests.

Writes name the partition explicitly. faust would otherwise take it from the "current event",
which in a batch (``take_events``) is the batch's last event, so a key could land in the
changelog partition of another user and be restored on the wrong worker after a rebalance.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol


def seen_value(partition: int, hour: int, offset: int, late: bool) -> bytes:
    """A dedupe index entry: where the id was first seen, its event hour, whether it was late."""
    return b"%d:%d:%d:%d" % (partition, hour, offset, late)


def seen_hour(value: bytes) -> int:
    """The event hour of a dedupe index entry (see :func:`seen_value`); ValueError if none."""
    return int(value.split(b":", 2)[1])


class StateNotReady(RuntimeError):
    """A partition's state was used before it was opened and restored (never a record's fault)."""


class PartitionedState(Protocol):
    """Key -> bytes, each key written to the changelog partition of the data it came from."""

    def get(self, key: str, partition: int | None = None) -> bytes | None:
        """The value, or ``None``; ``partition`` (where the key lives) saves a search."""

    def put(self, partition: int, key: str, value: bytes) -> None:
        """Set ``key`` and record the change in ``partition`` of the changelog."""

    def delete(self, partition: int, key: str) -> None:
        """Remove ``key`` (a tombstone in ``partition`` of the changelog)."""

    def items(self) -> Iterator[tuple[str, bytes]]:
        """Every key and value held by this process."""

    def __len__(self) -> int:
        """Number of keys held by this process."""


class HourIndexed(Protocol):
    """The dedupe index: entries (see :func:`seen_value`) can be expired by event hour."""

    def expire(self, partition: int, before_hour: int) -> int:
        """Delete the entries of ``partition`` whose event hour is before ``before_hour``;
        return how many. An entry written in the current batch may be left to a later call."""


class Revertible(Protocol):
    """State whose changes since a savepoint can be undone (see :mod:`._isolation`)."""

    def savepoint(self) -> None:
        """Start recording: :meth:`rollback` undoes every change made after this call."""

    def rollback(self) -> None:
        """Undo the changes since the last :meth:`savepoint`, queued changelog writes too."""


class SeenIndex(PartitionedState, HourIndexed, Protocol):
    """The dedupe index's state."""


class DictState:
    """In-memory :class:`PartitionedState` that records writes per partition (for tests)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.writes: list[tuple[int, str, bytes | None]] = []
        self._undo: list[tuple[str, bytes | None]] = []
        self._writes_at_savepoint = 0
        # partition -> hour -> keys, built by the first expire() (only the seen table's).
        self._hours: dict[int, dict[int, set[str]]] | None = None

    def get(self, key: str, partition: int | None = None) -> bytes | None:
        """The value, or ``None``."""
        return self.data.get(key)

    def put(self, partition: int, key: str, value: bytes) -> None:
        """Set and record the write."""
        self._undo.append((key, self.data.get(key)))
        self.data[key] = value
        self.writes.append((partition, key, value))
        self._index(partition, key, value)

    def _index(self, partition: int, key: str, value: bytes) -> None:
        if self._hours is not None:
            self._hours.setdefault(partition, {}).setdefault(seen_hour(value), set()).add(key)

    def expire(self, partition: int, before_hour: int) -> int:
        """Delete the seen entries of ``partition`` from before ``before_hour``."""
        if self._hours is None:
            self._hours = {}
            for key, value in self.data.items():
                p = int(value.split(b":", 1)[0])
                self._hours.setdefault(p, {}).setdefault(seen_hour(value), set()).add(key)
        hours = self._hours.get(partition, {})
        n = 0
        for hour in sorted(h for h in hours if h < before_hour):
            for key in sorted(hours.pop(hour)):
                current = self.data.get(key)
                if current is not None and seen_hour(current) == hour:
                    self.delete(partition, key)
                    n += 1
        return n

    def delete(self, partition: int, key: str) -> None:
        """Remove and record the tombstone."""
        self._undo.append((key, self.data.pop(key, None)))
        self.writes.append((partition, key, None))

    def savepoint(self) -> None:
        """Start recording changes for :meth:`rollback`."""
        self._undo.clear()
        self._writes_at_savepoint = len(self.writes)

    def rollback(self) -> None:
        """Undo the changes since the last :meth:`savepoint`."""
        for key, old in reversed(self._undo):
            if old is None:
                self.data.pop(key, None)
            else:
                self.data[key] = old
        self._undo.clear()
        del self.writes[self._writes_at_savepoint :]
        self._hours = None  # rebuilt by the next expire()

    def items(self) -> Iterator[tuple[str, bytes]]:
        """Every key and value."""
        return iter(list(self.data.items()))

    def __len__(self) -> int:
        return len(self.data)
