"""Partitioned key-value state: a faust Table in the worker, a dict in tests.

Writes name the partition explicitly. faust would otherwise take it from the "current event",
which in a batch (``take_events``) is the batch's last event, so a key could land in the
changelog partition of another user and be restored on the wrong worker after a rebalance.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol


class PartitionedState(Protocol):
    """Key -> bytes, each key written to the changelog partition of the data it came from."""

    def get(self, key: str) -> bytes | None:
        """The value, or ``None``."""

    def put(self, partition: int, key: str, value: bytes) -> None:
        """Set ``key`` and record the change in ``partition`` of the changelog."""

    def delete(self, partition: int, key: str) -> None:
        """Remove ``key`` (a tombstone in ``partition`` of the changelog)."""

    def items(self) -> Iterator[tuple[str, bytes]]:
        """Every key and value held by this process."""

    def __len__(self) -> int:
        """Number of keys held by this process."""


class Revertible(Protocol):
    """State whose changes since a savepoint can be undone (see :mod:`._isolation`)."""

    def savepoint(self) -> None:
        """Start recording: :meth:`rollback` undoes every change made after this call."""

    def rollback(self) -> None:
        """Undo the changes since the last :meth:`savepoint`, queued changelog writes too."""


class DictState:
    """In-memory :class:`PartitionedState` that records writes per partition (for tests)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.writes: list[tuple[int, str, bytes | None]] = []
        self._undo: list[tuple[str, bytes | None]] = []
        self._writes_at_savepoint = 0

    def get(self, key: str) -> bytes | None:
        """The value, or ``None``."""
        return self.data.get(key)

    def put(self, partition: int, key: str, value: bytes) -> None:
        """Set and record the write."""
        self._undo.append((key, self.data.get(key)))
        self.data[key] = value
        self.writes.append((partition, key, value))

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

    def items(self) -> Iterator[tuple[str, bytes]]:
        """Every key and value."""
        return iter(list(self.data.items()))

    def __len__(self) -> int:
        return len(self.data)
