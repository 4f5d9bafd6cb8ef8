"""The faust agent in-process through ``test_context()``: no broker, the real app factory."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import orjson

from schemas import PlanPeriod, Subscription
from spendstream.settings import load_settings
from stream_processors import BatchResult, PriceCatalog, build_app

START = datetime(2026, 11, 1, tzinfo=UTC)
SUBS = {
    "u1": Subscription(
        user_id="u1",
        org_id="o",
        billing_anchor=START,
        plans=[PlanPeriod(plan_id="team", effective_at=START)],
    )
}


def event(i: int, user: str = "u1", **kw: Any) -> bytes:
    return orjson.dumps(
        {
            "event_id": f"e{i}",
            "occurred_at": "2026-11-27T10:00:00+02:00",
            "org_id": "o",
            "user_id": user,
            "gateway": "g",
            "requested_model": "gpt-4o",
            "input_tokens": 1000,
            "cached_input_tokens": 200,
            "output_tokens": 50,
            **kw,
        }
    )


class BuggyCatalog(PriceCatalog):
    """The vendored catalog, except that pricing model ``boom`` raises (a stand-in for a bug)."""

    def __init__(self) -> None:
        real = PriceCatalog.load()
        super().__init__(real._prices, real.fallback)

    def quote(self, event: Any) -> Any:
        if event.requested_model == "boom":
            raise ArithmeticError("a bug this record meets")
        return super().quote(event)


def run_through_agent(
    values: list[bytes], catalog: PriceCatalog | None = None
) -> list[BatchResult]:
    settings = load_settings(
        kafka={"bootstrap_servers": "127.0.0.1:1"},
        processor={"batch_size": 4, "batch_within_s": 0.05},
    )
    results: list[BatchResult] = []
    worker = build_app(
        settings,
        subscriptions=SUBS.get,
        catalog=catalog,
        on_batch=results.append,
        in_process=True,
    )
    agent = worker.app.agents["price-and-rollup"]

    async def feed() -> None:
        async with agent.test_context() as ctx:
            for value in values:
                await ctx.put(key=b"u1", value=value)
            await asyncio.sleep(0.3)

    asyncio.run(feed())
    return results


def test_agent_prices_dedupes_and_dead_letters_in_batches() -> None:
    values = [event(i) for i in range(6)] + [event(2), b"{broken", event(7, input_tokens=-5)]
    results = run_through_agent(values)
    priced = [orjson.loads(v) for r in results for _, v in r.priced]
    dead = [orjson.loads(v) for r in results for _, v, _ in r.dead]
    assert [p["event_id"] for p in priced] == [f"e{i}" for i in range(6)]
    assert {p["plan_id"] for p in priced} == {"team"}
    # 800 * 2.5e-6 + 200 * 1.25e-6 + 50 * 1e-5 (gpt-4o in the vendored LiteLLM map)
    assert {p["cost"] for p in priced} == {"0.00275"}
    assert priced[0]["occurred_at"] == "2026-11-27T08:00:00Z"
    assert len(dead) == 2
    assert sum(r.counters["duplicates"] for r in results) == 1
    assert len(results) >= 2  # batch_size 4: the agent really took batches
    last = max((orjson.loads(v) for r in results for _, v in r.rollups), key=lambda x: x["version"])
    assert last["requests"] == 6 and last["cost"] == "0.0165"


def test_a_record_that_raises_is_a_dead_letter_and_the_agent_goes_on() -> None:
    # Before, an exception escaped the agent: faust restarted it, and nothing more was
    # processed in a process that looked alive.
    values = [event(i) for i in range(3)] + [event(3, requested_model="boom")]
    values += [event(i) for i in range(4, 12)]
    results = run_through_agent(values, catalog=BuggyCatalog())
    priced = [orjson.loads(v)["event_id"] for r in results for _, v in r.priced]
    dead = [orjson.loads(v) for r in results for _, v, _ in r.dead]
    assert priced == [f"e{i}" for i in range(12) if i != 3]
    assert [(d["stage"], d["source_offset"]) for d in dead] == [("price", 3)]
    assert "ArithmeticError: a bug this record meets" in dead[0]["reason"]


def test_worker_app_skips_faust_per_message_bookkeeping() -> None:
    from faust.types import TP

    from stream_processors.faust_patches import LeanMonitor

    settings = load_settings(kafka={"bootstrap_servers": "127.0.0.1:1"})
    worker = build_app(settings, subscriptions=SUBS.get, in_process=True)
    monitor = worker.app.monitor
    assert isinstance(monitor, LeanMonitor)
    tp = TP("t", 0)
    monitor.on_message_in(tp, 1, object())
    monitor.on_message_out(tp, 1, object())
    assert monitor.messages_received_total == 0 and monitor.events_total == 0
    # What the worker's agent runs on is unaffected (see the test above); commit stats remain.
    monitor.on_tp_commit({tp: 5})
    assert monitor.tp_committed_offsets[tp] == 5


def test_the_worker_consumer_waits_at_most_the_configured_fetch_time() -> None:
    # faust creates its aiokafka consumer with fetch_max_wait_ms=1500 and no setting for it.
    settings = load_settings(
        kafka={"bootstrap_servers": "127.0.0.1:1"}, processor={"fetch_max_wait_ms": 40}
    )

    async def created() -> Any:
        worker = build_app(settings, subscriptions=SUBS.get)
        try:
            consumer: Any = worker.app.consumer  # made by faust, patched by build_app
            aio = consumer._thread._create_worker_consumer(worker.app.transport)
            return aio._fetch_max_wait_ms
        finally:
            if worker.subscriptions is not None:
                worker.subscriptions.close()

    assert asyncio.run(created()) == 40
