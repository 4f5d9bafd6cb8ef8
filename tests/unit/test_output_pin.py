"""The worker's outputs for a fixed corpus, pinned byte for byte.

A refactoring must not change what the worker publishes. The corpus is the simulator's traffic
at a fixed seed with late (out-of-order and beyond-grace) events, duplicates and malformed
payloads, run through the worker's pure pipeline (processor and caps) in batches with a fixed
clock. Every output record (priced events, rollups, dead letters, alerts, enforcement, overage
and credit draws), its topic, key and partition, in order, goes into one digest.

A change that *means* to change the outputs updates :data:`PINNED` in the same commit and says
why; ``REPIN_OUTPUTS=1`` prints the new digest instead of failing.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import orjson
import pytest
import yaml

from schemas.plans import SAMPLE_PLANS, PlanCatalog, parse_plans
from spendstream.simulate import Simulator
from stream_processors import CapEngine, DictState, InRecord, PriceCatalog, UsageProcessor
from stream_processors._pipeline import BatchPipeline
from stream_processors.caps import CapStage

pytestmark = pytest.mark.unit

PINNED = "da27f7a23fc69c18174e8ae6bfca2a623909ed04b7965436c6a20275ff9a8366"
"""sha256 of every output of the corpus below (see the module docstring)."""

START = datetime(2026, 11, 2, 6, 0, tzinfo=UTC)
ITEMS = 12_000
BATCH = 700
PARTITIONS = 6


def corpus() -> tuple[list[InRecord], Simulator]:
    sim = Simulator(
        300,
        seed=20261204,
        start=START,
        rate=400.0,
        rhythm=False,
        out_of_order=0.04,
        duplicates=0.02,
        malformed=0.01,
    )
    records: list[InRecord] = []
    offsets = [0] * PARTITIONS
    for i, item in enumerate(sim.stream()):
        if i >= ITEMS:
            break
        payload = item.payload
        if isinstance(payload, dict):
            if i % 997 == 0:  # a straggler far beyond grace, under a new id
                when = datetime.fromisoformat(payload["occurred_at"]) - timedelta(minutes=40)
                payload = {**payload, "event_id": f"straggler-{i}", "occurred_at": when.isoformat()}
            key = payload["user_id"].encode()
            value = orjson.dumps(payload)
        else:
            key, value = b"malformed", payload
        partition = zlib.crc32(key) % PARTITIONS
        arrived = int(item.emitted_at.timestamp() * 1000) + 5
        records.append(InRecord("usage.events", partition, offsets[partition], key, value, arrived))
        offsets[partition] += 1
    return records, sim


def tight_plans() -> PlanCatalog:
    """The sample plans with allowances cut so that the corpus crosses every kind of cap."""
    raw = yaml.safe_load(SAMPLE_PLANS.read_text())
    for plan in raw["plans"]:
        for window in plan["windows"]:
            allowance = Decimal(str(window["allowance"]))
            if window["unit"] == "usd":
                window["allowance"] = str(allowance / 2000)
            else:
                window["allowance"] = str(max(allowance // 500, 1))
    return parse_plans(raw)


def run_corpus() -> tuple[str, Counter[str]]:
    records, sim = corpus()
    subs = {s.user_id: s for s in sim.subscriptions()}
    states = [DictState() for _ in range(4)]
    processor = UsageProcessor(
        PriceCatalog.load(),
        subs.get,
        seen=states[0],
        windows=states[1],
        marks=states[2],
        window_s=60,
        grace_s=300,
        dedupe_horizon_s=86_400,
    )
    caps = CapStage(CapEngine(tight_plans(), grace_s=300), subs.get, states[3])
    pipeline = BatchPipeline(processor, caps, states)
    digest = hashlib.sha256()
    seen: Counter[str] = Counter()
    for start in range(0, len(records), BATCH):
        batch = records[start : start + BATCH]
        now = datetime.fromtimestamp(max(r.timestamp or 0 for r in batch) / 1000, UTC)
        out = pipeline.run(batch, now + timedelta(milliseconds=50))
        r, c = out.result, out.capped
        where = out.partition_of
        for topic, messages in (("priced", r.priced), ("rollups", r.rollups)):
            for key, value in messages:
                digest.update(b"%s|%s|%d|%s\n" % (topic.encode(), key.encode(), where[key], value))
        for key_bytes, value, partition in r.dead:
            digest.update(b"dlq|%s|%d|%s\n" % (key_bytes or b"", partition, value))
        for topic, messages in (
            ("alerts", c.alerts),
            ("enforcement", c.enforcement),
            ("overages", c.overages),
            ("dlq", c.dead),
        ):
            for key, value in messages:
                digest.update(
                    b"%s|%s|%d|%s\n" % (topic.encode(), key.encode(), c.partitions[key], value)
                )
        assert not out.poison
        seen.update(r.counters)
        seen.update(c.counters)
        seen.update(alerts=len(c.alerts), enforcement=len(c.enforcement), overages=len(c.overages))
    return digest.hexdigest(), seen


def test_the_outputs_for_the_pinned_corpus_are_unchanged() -> None:
    got, _ = run_corpus()
    if os.environ.get("REPIN_OUTPUTS"):
        print(f"\nPINNED = {got!r}")
        return
    assert got == PINNED, (
        "the worker's outputs for the pinned corpus changed; if that is intended, set PINNED "
        f"to {got!r} and say why in the commit"
    )


def test_the_corpus_exercises_what_it_is_meant_to() -> None:
    # The pin proves little if the corpus misses a path: check that each one is taken.
    _, seen = run_corpus()
    print(dict(seen))
    for path in ("dead_letters", "duplicates", "late", "alerts", "enforcement", "overages"):
        assert seen[path] > 0, path
