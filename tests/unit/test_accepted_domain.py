"""The contract's accepted domain is exactly what every stage handles.

Events drawn from the whole accepted domain (times at the edges of the range in any offset,
token counts and latencies at their bounds, any Unicode in ids, subscribers in far-apart time
zones with anchors at the range's edges), mixed with records just outside it, go through the
producer's encoding, the worker's pipeline (processor and caps) and the sink's buffer. No
exception escapes any stage, no record needs the pipeline's poison isolation, every record is
counted or dead-lettered with a reason, and the sink stores every row the stream emitted (the
stream never counts what storage would refuse).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producers._producer import encode_for_send
from schemas import (
    EARLIEST_TIME,
    MAX_LATENCY_MS,
    MAX_TOKENS,
    PlanPeriod,
    Subscription,
)
from schemas.plans import SAMPLE_PLANS, load_plans
from sinks._buffer import SINK_TABLES, SinkBuffer
from spendstream.errors import InvalidEventError
from stream_processors import CapEngine, DictState, InRecord, PriceCatalog, UsageProcessor
from stream_processors._pipeline import BatchPipeline
from stream_processors.caps import CapStage

pytestmark = pytest.mark.unit

CATALOG = PriceCatalog.load()
PLANS = load_plans(SAMPLE_PLANS)
NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
LAST = datetime(2099, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)
MODELS = ["gpt-4o", "o1-pro", "claude-sonnet-4-5", "gemini-2.5-pro", "no-such-model"]
ZONES = ["UTC", "Pacific/Kiritimati", "Pacific/Pago_Pago", "Asia/Kathmandu", "America/St_Johns"]
USERS = ["u-a", "u-b", "u-c", "u-\u202e\x1b[31m", "u-no-sub"]
SUBSCRIBED = USERS[:4]

ids = st.text(min_size=1, max_size=40)
edges = st.sampled_from(
    [
        EARLIEST_TIME,
        LAST,
        NOW,
        NOW - timedelta(microseconds=1),
        NOW + timedelta(seconds=120),
        NOW + timedelta(seconds=121),
        datetime(2026, 12, 1, tzinfo=UTC),
    ]
)
times = st.one_of(
    edges,
    st.datetimes(min_value=datetime(2000, 1, 1), max_value=LAST.replace(tzinfo=None)).map(
        lambda d: d.replace(tzinfo=UTC)
    ),
)
offsets = st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
tokens = st.one_of(st.sampled_from([0, 1, MAX_TOKENS]), st.integers(0, MAX_TOKENS))


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    """An event of the accepted domain, as a gateway would hand it over."""
    inp, out = draw(tokens), draw(tokens)
    cached = draw(st.integers(0, inp))
    when = draw(times).astimezone(draw(offsets))
    obj: dict[str, Any] = {
        "event_id": draw(ids),
        "occurred_at": when.isoformat(),
        "org_id": draw(ids),
        "user_id": draw(st.sampled_from(USERS)),
        "gateway": draw(ids),
        "requested_model": draw(st.sampled_from(MODELS)),
        "served_model": draw(st.none() | st.sampled_from(MODELS)),
        "input_tokens": inp,
        "cached_input_tokens": cached,
        "cache_write_tokens": draw(st.integers(0, inp - cached)),
        "output_tokens": out,
        "reasoning_tokens": draw(st.integers(0, out)),
        "semantic_cache_hit": draw(st.booleans()),
        "latency_ms": draw(st.none() | st.sampled_from([0, MAX_LATENCY_MS])),
        "attributes": draw(st.none() | st.dictionaries(ids, st.text(max_size=30), max_size=3)),
    }
    return {k: v for k, v in obj.items() if v is not None}


OUTSIDE = [
    ("occurred_at", "0001-01-01T00:00:00+01:00"),
    ("occurred_at", "9999-12-31T23:30:00-01:00"),
    ("occurred_at", "1999-12-31T23:59:59.999999Z"),
    ("occurred_at", "2100-01-01T00:00:00Z"),
    ("input_tokens", MAX_TOKENS + 1),
    ("latency_ms", MAX_LATENCY_MS + 1),
    ("latency_ms", 10**12),
]


def subscriptions(draw: st.DrawFn) -> dict[str, Subscription]:
    subs = {}
    for user in SUBSCRIBED:
        anchor = draw(st.sampled_from([EARLIEST_TIME, LAST, NOW - timedelta(days=40)]))
        subs[user] = Subscription(
            user_id=user,
            org_id="o",
            timezone=draw(st.sampled_from(ZONES)),
            billing_anchor=anchor,
            plans=[
                PlanPeriod(plan_id=draw(st.sampled_from(PLANS.ids())), effective_at=EARLIEST_TIME)
            ],
        )
    return subs


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_every_stage_handles_the_whole_accepted_domain(data: st.DataObject) -> None:
    subs = subscriptions(data.draw)
    drawn = data.draw(st.lists(events(), min_size=1, max_size=40))
    wires: list[bytes] = []
    for obj in drawn:
        try:
            _, wire = encode_for_send(obj)
        except InvalidEventError:
            continue  # refused with the contract's reason: a gateway gets the error
        wires.append(wire)
    # Records just outside the domain reach Kafka anyway (a producer in another language).
    for field_name, value in data.draw(st.lists(st.sampled_from(OUTSIDE), max_size=3)):
        wires.append(orjson.dumps({**drawn[0], field_name: value}))
    wires += data.draw(st.lists(st.sampled_from(wires), max_size=5))  # duplicates

    states = [DictState() for _ in range(4)]
    processor = UsageProcessor(
        CATALOG, subs.get, seen=states[0], windows=states[1], marks=states[2]
    )
    caps = CapStage(CapEngine(PLANS), subs.get, states[3])
    pipeline = BatchPipeline(processor, caps, states)
    arrived = int(NOW.timestamp() * 1000)
    records = [
        InRecord("usage.events", i % 3, i // 3, b"k", w, arrived) for i, w in enumerate(wires)
    ]
    out = pipeline.run(records, NOW)

    assert not out.poison, [(p.stage, repr(p.error)) for p in out.poison]
    c = out.result.counters
    assert c["in"] == len(records) == c["priced"] + c["dead_letters"] + c["duplicates"]
    for _, letter, _ in out.result.dead:
        assert orjson.loads(letter)["reason"]
    assert not out.capped.dead, "the cap engine refused events the processor accepted"

    # The sink stores every row the stream emitted.
    buffer = SinkBuffer(
        {role: spec for role, spec in SINK_TABLES.items()},
        batch_rows=10_000,
        batch_age_s=60,
        max_buffer_rows=100_000,
    )
    outputs = {
        "priced": out.result.priced,
        "rollups": out.result.rollups,
        "dlq": [(k, v) for k, v, _ in out.result.dead],
        "alerts": out.capped.alerts,
        "enforcement": out.capped.enforcement,
        "overages": out.capped.overages,
    }
    for role, messages in outputs.items():
        for offset, (_, value) in enumerate(messages):
            buffer.add(role, 0, offset, value)
    drained = buffer.drain()
    assert drained.dead_lettered == 0
    stored = {b.table: b.rows for b in drained.batches}
    assert stored.get("priced_events", 0) == len(out.result.priced)
    assert stored.get("dead_letters", 0) == len(out.result.dead)
