"""A record can fail; the batch goes on (docs/DESIGN.md, "A record can fail, the worker cannot").

The worker applies a batch of records to its state in one call (pricing, windows, caps). If
that call raises, something in the batch met a bug or a state this code cannot handle; which
record is unknown. :func:`run_isolated` then undoes the batch's state changes, splits it in
halves and tries each, down to single records: those that still raise are returned as poison
(to the dead-letter topic, with the exception), every other record is processed, in order.
With one bad record in a batch of n, that costs about 2 * log2(n) extra attempts; a batch
without one costs nothing extra beyond the undo log the states keep.

Errors that say the *process* cannot go on (out of memory, the operating system refusing
I/O) are not a record's: they propagate, and the worker exits non-zero to be restarted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from stream_processors._state import Revertible, StateNotReady

R = TypeVar("R")
T = TypeVar("T")

SYSTEMIC: tuple[type[BaseException], ...] = (MemoryError, OSError, StateNotReady)
"""Exceptions that are never blamed on a record."""


class StageError(Exception):
    """An exception raised in a named stage of the batch (``price``, ``caps``, ...)."""

    def __init__(self, stage: str, error: Exception) -> None:
        super().__init__(f"{stage}: {type(error).__name__}: {error}")
        self.stage = stage
        self.error = error


@dataclass
class Poison(Generic[R]):
    """A record that raised when processed alone, with where and what."""

    record: R
    stage: str
    error: Exception

    @property
    def reason(self) -> str:
        """One line for the dead letter: the exception's type and message."""
        return f"processing raised {type(self.error).__name__}: {self.error}"


@dataclass
class Isolated(Generic[R, T]):
    """What :func:`run_isolated` made of a batch: results in record order, and the poison."""

    results: list[T] = field(default_factory=list)
    poison: list[Poison[R]] = field(default_factory=list)
    attempts: int = 0


def run_isolated(
    records: Sequence[R],
    attempt: Callable[[Sequence[R]], T],
    states: Sequence[Revertible],
    rolled_back: Callable[[], None] = lambda: None,
) -> Isolated[R, T]:
    """Apply ``attempt`` to ``records``; bisect around records whose processing raises.

    ``states`` are every state ``attempt`` writes: each attempt starts at a savepoint, and a
    failed one is rolled back before its halves are tried. ``rolled_back`` is then called so
    that in-memory caches over those states can follow. Systemic errors (:data:`SYSTEMIC`)
    propagate unchanged.
    """
    out: Isolated[R, T] = Isolated()
    # Iterative, first half first, so results and poison keep the records' order.
    todo: list[Sequence[R]] = [records]
    while todo:
        chunk = todo.pop()
        for state in states:
            state.savepoint()
        out.attempts += 1
        try:
            out.results.append(attempt(chunk))
            continue
        except SYSTEMIC:
            raise
        except Exception as exc:  # any exception of a record's is isolated
            error = exc
        for state in states:
            state.rollback()
        rolled_back()
        if len(chunk) == 1:
            stage = error.stage if isinstance(error, StageError) else "worker"
            cause = error.error if isinstance(error, StageError) else error
            out.poison.append(Poison(chunk[0], stage, cause))
            continue
        mid = len(chunk) // 2
        todo.append(chunk[mid:])
        todo.append(chunk[:mid])
    return out
