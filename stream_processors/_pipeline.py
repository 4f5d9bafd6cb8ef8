"""One batch through the worker's pure stages: price and roll up, then caps; poison isolated.

:class:`BatchPipeline` is what the faust agent runs per batch and what the benchmarks and
property tests run without Kafka. A record whose processing raises is isolated by
:func:`~stream_processors._isolation.run_isolated` and becomes a dead letter naming the stage
and the exception; the rest of the batch is processed as if it had not been there.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from stream_processors._isolation import SYSTEMIC, Poison, StageError, run_isolated
from stream_processors._processor import BatchResult, SourceRecord, UsageProcessor, dead_letter
from stream_processors._state import Revertible
from stream_processors.caps import CapOutputs, CapStage

log = logging.getLogger(__name__)


@dataclass(slots=True)
class BatchOutput:
    """What one batch produced: the priced side, the caps side, and the poison."""

    result: BatchResult
    capped: CapOutputs
    poison: list[Poison[SourceRecord]] = field(default_factory=list)

    @property
    def partition_of(self) -> dict[str, int]:
        """user_id -> the partition of the user's records (where their outputs go)."""
        return {r.event.user_id: r.partition for r in self.result.accepted}


class BatchPipeline:
    """The processor and the caps stage over states that can be rolled back.

    ``states`` must list every state the two write (seen, windows, marks, caps).
    """

    def __init__(
        self, processor: UsageProcessor, caps: CapStage, states: Sequence[Revertible]
    ) -> None:
        self.processor = processor
        self.caps = caps
        self.states = list(states)

    def _attempt(self, records: Sequence[SourceRecord], now: datetime) -> BatchOutput:
        try:
            result = self.processor.process(records, now)
        except SYSTEMIC:
            raise
        except Exception as exc:
            raise StageError("price", exc) from exc
        try:
            capped = self.caps.process(result.accepted, now, result.admissions)
        except SYSTEMIC:
            raise
        except Exception as exc:
            raise StageError("caps", exc) from exc
        return BatchOutput(result, capped)

    def run(self, records: Sequence[SourceRecord], now: datetime | None = None) -> BatchOutput:
        """Process one batch; never raises for a record (systemic errors propagate)."""
        now = now or datetime.now(UTC)
        isolated = run_isolated(
            records,
            lambda chunk: self._attempt(chunk, now),
            self.states,
            self.processor.rolled_back,
        )
        if len(isolated.results) == 1 and not isolated.poison:
            return isolated.results[0]
        out = _merge(isolated.results)
        out.poison = isolated.poison
        counters = out.result.counters
        counters["poison"] += len(isolated.poison)
        counters["isolation_attempts"] += isolated.attempts
        for bad in isolated.poison:
            rec = bad.record
            # Logged with the traceback once per record: the dead letter has the message,
            # the log the place in the code.
            log.error(
                "record %s[%d]@%d raised in stage %s; sent to the dead-letter topic",
                rec.topic,
                rec.partition,
                rec.offset,
                bad.stage,
                exc_info=bad.error,
            )
            letter = dead_letter(rec, bad.reason, bad.stage, now)
            out.result.dead.append((rec.key, letter, rec.partition))
            counters["dead_letters"] += 1
            counters["in"] += 1
        return out


def _merge(parts: list[BatchOutput]) -> BatchOutput:
    """The outputs of consecutive sub-batches as one batch's, in order."""
    result, capped = BatchResult(), CapOutputs()
    for part in parts:
        r, c = part.result, part.capped
        result.priced += r.priced
        result.rollups += r.rollups
        result.dead += r.dead
        result.accepted += r.accepted
        result.admissions += r.admissions
        result.counters.update(r.counters)
        capped.alerts += c.alerts
        capped.enforcement += c.enforcement
        capped.overages += c.overages
        capped.dead += c.dead
        capped.answers += c.answers
        capped.partitions.update(c.partitions)
        capped.counters.update(c.counters)
    return BatchOutput(result, capped)
