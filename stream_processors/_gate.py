"""Input order: each partition's records reach the processor once, in offset order, without gaps.

The processor's states skip a record whose offset is at or below the last one they applied
(that is how a replay after a crash counts nothing twice). So a record that reaches them after
a later record of its partition is lost to them, and so is one that never reaches them while
later ones do. faust can do both around a rebalance: its fetch loop drops records below a
"read offset" that a fetch from before a seek may already have moved past, and its flow
control drops queued records. :class:`InputGate` checks every batch against the offset this
worker expects next per partition. A record below it was processed already and is dropped; a
record above it is a gap. A gap is asked of the broker (:class:`OffsetProbe`): when the log
really has nothing there (a transaction marker, retention) the gate moves on; otherwise the
partition is sought back and its records are held back until the missing one arrives.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from stream_processors._processor import SourceRecord

log = logging.getLogger(__name__)

Part = tuple[str, int]
"""(topic, partition)."""


class OffsetProbe(Protocol):
    """What the gate asks the broker."""

    async def start_offsets(self, parts: Sequence[Part]) -> dict[Part, int]:
        """Where processing resumes: the group's committed offset, else the earliest one."""
        ...

    async def first_offset(self, part: Part, offset: int) -> int | None:
        """The offset of the first record at or after ``offset`` (None: none came in time)."""
        ...


@dataclass
class Admission:
    """What :meth:`InputGate.admit` let through, and what it did about the rest."""

    kept: list[int] = field(default_factory=list)
    """Indexes (into the batch) of the records to process, in order."""
    dropped: list[int] = field(default_factory=list)
    """Indexes of records not to process: repeats, or held back behind a gap."""
    seeks: dict[Part, int] = field(default_factory=dict)
    """Partitions to seek back, to the offset the gate waits for."""
    redelivered: int = 0
    held_back: int = 0
    gaps_skipped: int = 0


class InputGate:
    """Admits each input partition's records in offset order, from where processing resumes.

    ``next`` maps a partition to the offset expected next; it starts at
    :meth:`OffsetProbe.start_offsets` the first time a partition is seen (and after
    :meth:`keep_only` dropped it). A partition sought back is not sought again for
    ``reseek_after_s``: the records queued before the seek still arrive and are held back.
    """

    def __init__(
        self,
        probe: OffsetProbe,
        *,
        reseek_after_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._probe = probe
        self._reseek_after_s = reseek_after_s
        self._clock = clock
        self.next: dict[Part, int] = {}
        self._sought: dict[Part, tuple[int, float]] = {}
        self._progress: dict[Part, float] = {}
        # Partition -> (an expected offset, the broker's first record at or after it).
        self._first: dict[Part, tuple[int, int]] = {}

    def keep_only(self, parts: Iterable[Part]) -> None:
        """Forget every partition but ``parts`` (after a rebalance: the ones held throughout)."""
        keep = set(parts)
        for part in [p for p in self.next if p not in keep]:
            del self.next[part]
            self._sought.pop(part, None)
            self._progress.pop(part, None)
            self._first.pop(part, None)

    async def stalled(self, highwaters: Mapping[Part, int]) -> dict[Part, int]:
        """Partitions to seek back because the record expected next never came.

        A gap shows only when a later record arrives; if the lost record was the last one
        written, none does. So a partition whose log end (``highwaters``: the assigned
        partitions) is past the offset expected, and that let nothing through for
        ``reseek_after_s``, is sought back too; a partition not seen yet is expected at its
        start offset.
        """
        await self._learn(highwaters.keys())
        now = self._clock()
        seeks: dict[Part, int] = {}
        for part, expected in self.next.items():
            end = highwaters.get(part)
            if end is None or end <= expected:
                self._progress[part] = now  # nothing to read: not stalled
                continue
            if now - self._progress.get(part, now) < self._reseek_after_s:
                continue
            sought = self._sought.get(part)
            if sought is not None and now - sought[1] < self._reseek_after_s:
                continue
            log.warning("%s[%d]: nothing from %d on for a while; seeking back", *part, expected)
            seeks[part] = expected
            self._sought[part] = (expected, now)
        return seeks

    async def admit(self, records: Sequence[SourceRecord]) -> Admission:
        """Decide, per record of a batch, whether it is processed now."""
        out = Admission()
        await self._learn({(r.topic, r.partition) for r in records})
        blocked: set[Part] = set()
        for i, rec in enumerate(records):
            part = (rec.topic, rec.partition)
            expected = self.next[part]
            if part in blocked:
                out.dropped.append(i)
                out.held_back += 1
            elif rec.offset < expected:
                out.dropped.append(i)
                out.redelivered += 1
            elif rec.offset == expected or await self._gap_is_real(part, expected, rec, out):
                out.kept.append(i)
                self.next[part] = rec.offset + 1
                self._sought.pop(part, None)
                self._progress[part] = self._clock()
            else:
                blocked.add(part)
                out.dropped.append(i)
                out.held_back += 1
        return out

    async def _learn(self, parts: Iterable[Part]) -> None:
        unknown = sorted(set(parts) - self.next.keys())
        if unknown:
            self.next.update(await self._probe.start_offsets(unknown))
            now = self._clock()
            self._progress.update((part, now) for part in unknown)

    async def _gap_is_real(
        self, part: Part, expected: int, rec: SourceRecord, out: Admission
    ) -> bool:
        first = self._first.get(part)
        if first is None or first[0] != expected or rec.offset < first[1]:
            # Asked once per expected offset: the records queued before a seek back all
            # arrive with the same question.
            answer = await self._probe.first_offset(part, expected)
            first = (expected, answer if answer is not None else expected)
            if answer is not None:
                self._first[part] = first
        if first[1] >= rec.offset:
            out.gaps_skipped += 1
            log.info("%s[%d]: no records in [%d, %d) on the broker", *part, expected, rec.offset)
            return True
        now = self._clock()
        sought = self._sought.get(part)
        if sought is not None and sought[0] == expected and now - sought[1] < self._reseek_after_s:
            return False  # already sought back: wait for the re-read
        log.warning(
            "%s[%d]: record %d arrived while %d was expected; seeking back",
            *part,
            rec.offset,
            expected,
        )
        out.seeks[part] = expected
        self._sought[part] = (expected, now)
        return False


class BrokerProbe:
    """:class:`OffsetProbe` over a confluent-kafka consumer that never joins the group.

    ``config`` is the client configuration (``Settings.kafka.confluent_config()``) and
    ``group_id`` the worker's consumer group, whose committed offsets it reads. Calls run in a
    thread, one at a time.
    """

    def __init__(self, config: dict[str, Any], group_id: str, *, timeout_s: float = 10.0) -> None:
        self._config = {
            **config,
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
        }
        self._timeout_s = timeout_s
        self._consumer: Any = None
        self._lock = asyncio.Lock()

    def _client(self) -> Any:
        if self._consumer is None:
            from confluent_kafka import Consumer

            self._consumer = Consumer(self._config)
        return self._consumer

    async def start_offsets(self, parts: Sequence[Part]) -> dict[Part, int]:
        """The group's committed offset of each partition, else its earliest offset.

        Retried until the broker answers: without them no record of these partitions can be
        admitted, and a worker that waits is better than one that guesses.
        """
        from confluent_kafka import KafkaException

        delay = 0.5
        while True:
            async with self._lock:
                try:
                    return await asyncio.to_thread(self._start_offsets, parts)
                except KafkaException as exc:
                    log.warning("start offsets of %s: %s; retrying in %.1f s", parts, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def first_offset(self, part: Part, offset: int) -> int | None:
        """The offset of the first record at or after ``offset``, read from the broker.

        None when the broker did not answer: the gate then seeks back, which is always safe.
        """
        from confluent_kafka import KafkaException

        async with self._lock:
            try:
                return await asyncio.to_thread(self._first_offset, part, offset)
            except KafkaException as exc:
                log.warning("first offset of %s[%d] from %d: %s", *part, offset, exc)
                return None

    def _start_offsets(self, parts: Sequence[Part]) -> dict[Part, int]:
        from confluent_kafka import KafkaException, TopicPartition

        client = self._client()
        committed = client.committed(
            [TopicPartition(t, p) for t, p in parts], timeout=self._timeout_s
        )
        out: dict[Part, int] = {}
        for tp in committed:
            if tp.error is not None:
                raise KafkaException(tp.error)
            if tp.offset >= 0:
                out[(tp.topic, tp.partition)] = tp.offset
            else:  # nothing committed
                low, _ = client.get_watermark_offsets(tp, timeout=self._timeout_s)
                out[(tp.topic, tp.partition)] = low
        return out

    def _first_offset(self, part: Part, offset: int) -> int | None:
        from confluent_kafka import KafkaError, TopicPartition

        client = self._client()
        client.assign([TopicPartition(part[0], part[1], offset)])
        try:
            deadline = time.monotonic() + self._timeout_s
            while time.monotonic() < deadline:
                msg = client.poll(0.2)
                if msg is None:
                    continue
                err = msg.error()
                if err is None:
                    return int(msg.offset())
                if err.code() == KafkaError._PARTITION_EOF:
                    return None
            return None
        finally:
            client.unassign()

    def close(self) -> None:
        """Close the consumer (if one was made)."""
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
