"""The worker's commit protocol in one object: when is an input offset committed?

Answer: after the batch it belongs to was processed, its outputs acknowledged by the broker,
the state changes that say those outputs were produced written to their changelogs and
acknowledged too, and then at most ``commit_interval_s`` later (docs/DESIGN.md, "Delivery
guarantee"). In steps, for each batch processed under :attr:`Checkpointer.lock`:

1. :meth:`batch_done` flushes the output producer. That acknowledges this batch's outputs and
   the *previous* batch's state changes, so the previous batches' offsets become committable.
   Then it writes the previous batch's held watermarks (states before watermarks: an advanced
   watermark would change how a replay classifies lateness) and queues this batch's state
   changes; this batch's watermarks are held for the next flush. This batch's offsets are
   pending until then.
2. :meth:`commit_due` commits the committable offsets, at most every ``commit_interval_s``:
   a commit is a broker round trip on the batch path.
3. :meth:`idle` (a timer) makes the pending state durable and commits everything when no
   batch comes to do it.
4. :meth:`revoke` makes the state durable before a rebalance moves partitions; after the
   rebalance :meth:`rebalanced` forgets every offset not committed (the partitions' new owners
   replay from the last commit, and each state records the last offset it applied, so a replay
   counts once).

A crash anywhere before a commit replays into exactly-once state. Each flush also stores
locally the state changes it acknowledged (the local store follows the changelog, never leads
it: stream_processors._store). Without an output producer (``agent.test_context()``) outputs
go through faust, state is stored at once and nothing is committed here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from stream_processors._output import OutputProducer


class ChangelogState(Protocol):
    """What the checkpointer needs of a state (stream_processors._store.DurableState)."""

    def flush_changelog(self, out: OutputProducer | None, *, previous: bool = False) -> int:
        """Write the pending (or, with ``previous``, the held) changes to the changelog."""

    def hold(self) -> None:
        """Keep the pending changes for the next ``flush_changelog(previous=True)``."""

    def sent_mark(self) -> int:
        """How many sent changes await an acknowledgement (taken before a flush)."""

    def apply_acked(self, upto: int) -> int:
        """Store locally the first ``upto`` sent changes, acknowledged by a flush."""


class Checkpointer:
    """Owns "batch done -> outputs acknowledged -> state durable -> offsets committed".

    ``states`` are written with each batch; ``marks`` (the watermarks) one batch later.
    ``commit`` commits offsets (faust TP -> next offset to read).
    """

    def __init__(
        self,
        states: Sequence[ChangelogState],
        marks: ChangelogState,
        commit: Callable[[Mapping[Any, int]], Awaitable[None]],
        *,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lock = asyncio.Lock()
        """Held while a batch is processed and its state queued, and while anything else
        (the credits timer, a revocation) writes state: no state change may be written
        ahead of the outputs it belongs to."""
        self.output: OutputProducer | None = None
        """The worker's output producer, once its agent started (None under test)."""
        self._states = list(states)
        self._marks = marks
        self._commit = commit
        self._interval_s = interval_s
        self._clock = clock
        self._last_commit = 0.0
        self.pending: dict[Any, int] = {}
        """Offsets of processed batches whose state is queued, not yet known durable."""
        self.committable: dict[Any, int] = {}
        """Offsets whose batches' state is durable, not committed yet."""

    async def flush(self) -> None:
        """Wait for the producer's acknowledgements; store locally the changes they cover.

        Only the changes sent before the flush started are applied: another task may send
        more while it waits.
        """
        out = self.output
        if out is None:
            return
        states = [*self._states, self._marks]
        sent = [state.sent_mark() for state in states]
        await out.flush()
        for state, upto in zip(states, sent, strict=True):
            state.apply_acked(upto)

    async def make_durable(self) -> None:
        """Acknowledge everything queued: outputs and states, then the held watermarks."""
        out = self.output
        if out is None:
            return
        await self.flush()
        self._marks.flush_changelog(out, previous=True)
        await self.flush()

    async def batch_done(self, offsets: Mapping[Any, int]) -> dict[Any, int]:
        """Step 1 for a processed batch whose outputs are queued (hold :attr:`lock`).

        Returns the offsets this made committable: the previous batches', whose state the
        flush made durable.
        """
        out = self.output
        await self.flush()
        self._marks.flush_changelog(out, previous=True)
        ready = dict(self.pending)
        self.pending.clear()
        for state in self._states:
            state.flush_changelog(out)
        self._marks.hold()
        if out is not None:
            pending = self.pending
            for tp, offset in offsets.items():
                pending[tp] = max(pending.get(tp, 0), offset)
        return ready

    async def commit_due(self, ready: Mapping[Any, int], *, now: bool = False) -> None:
        """Step 2: add ``ready`` to the committable offsets; commit them if the interval
        passed (or ``now``). Call it outside :attr:`lock`: a commit can wait on a rebalance,
        which waits for the lock."""
        committable = self.committable
        for tp, offset in ready.items():
            if offset > committable.get(tp, -1):
                committable[tp] = offset
        if committable and (now or self._clock() - self._last_commit >= self._interval_s):
            offsets = dict(committable)
            committable.clear()
            self._last_commit = self._clock()
            await self._commit(offsets)

    async def idle(self) -> None:
        """Step 3: the last batch before a pause: make its state durable, commit everything."""
        if self.output is None or not (self.pending or self.committable):
            return
        async with self.lock:
            await self.make_durable()
            ready = dict(self.pending)
            self.pending.clear()
        await self.commit_due(ready, now=True)

    async def revoke(self) -> None:
        """Step 4, before a rebalance: the last batch's state durable before its owner changes.

        The caller holds the input lane's busy lock (the batch in progress has finished)."""
        if self.output is not None:
            async with self.lock:
                await self.make_durable()

    def rebalanced(self) -> None:
        """Step 4, after a rebalance: revoked partitions' offsets are no longer ours."""
        self.pending.clear()
        self.committable.clear()
