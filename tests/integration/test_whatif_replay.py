"""`whatif` replays stored usage exactly as the worker and a gateway would have run it.

A simulated stream (subscribers in four time zones, a billing anchor before the month, some
with prepaid credit) goes through the worker's pure pipeline under plans A, which cap nothing,
and lands in chDB. ``whatif`` with plans B (the sample tiers with tight allowances: every window
kind and every action, including an overage ceiling and credits) on what landed must give, to
the last digit, the per-tier figures of the same stream run through the pipeline under plans B
directly, with a gateway in front that follows the published enforcement records (CapGuard's
``decide`` and its ``until`` expiry): blocked requests are not sent, downgraded ones are sent at
the downgrade model. The gateway sees each user's state after their previous event (a batch
never holds two events of one user).
"""

from __future__ import annotations

import zlib
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest
import yaml

from producers._guard import decide
from producers._subscriptions import encode_subscription
from schemas import CreditGrant, Subscription, decode_enforcement
from schemas.plans import SAMPLE_PLANS, PlanCatalog, parse_plans
from sinks import ChdbStore
from sinks._buffer import PRICED_EVENTS, SUBSCRIPTIONS
from spendstream.analytics import load_plans_into
from spendstream.simulate import Simulator
from spendstream.whatif import Scenario, run_whatif
from stream_processors import CapEngine, DictState, InRecord, PriceCatalog, UsageProcessor
from stream_processors._pipeline import BatchPipeline
from stream_processors.caps import CapStage

pytestmark = pytest.mark.integration

NOV = date(2026, 11, 1)
MONTH_START = datetime(2026, 11, 1, tzinfo=UTC)
MONTH_END = datetime(2026, 12, 1, tzinfo=UTC)
START = datetime(2026, 10, 27, 12, tzinfo=UTC)  # a warm-up before the month
EVENTS = 9_000
PARTITIONS = 4


def scaled_plans(usd: Decimal, tokens: Decimal, requests: Decimal, ceiling: Decimal) -> PlanCatalog:
    """The sample plans with allowances (and overage ceilings) multiplied per unit."""
    raw = yaml.safe_load(SAMPLE_PLANS.read_text())
    factor = {"usd": usd, "tokens": tokens, "requests": requests}
    for plan in raw["plans"]:
        for window in plan["windows"]:
            value = Decimal(str(window["allowance"])) * factor[window["unit"]]
            window["allowance"] = format(
                max(value, Decimal(1)) if window["unit"] != "usd" else value, "f"
            )
            cap = window["at_cap"]
            if cap.get("ceiling_usd") is not None:
                cap["ceiling_usd"] = format(Decimal(str(cap["ceiling_usd"])) * ceiling, "f")
    return parse_plans(raw)


PLANS_A = scaled_plans(Decimal(10**4), Decimal(10**4), Decimal(10**4), Decimal(1))
PLANS_B = scaled_plans(Decimal("0.005"), Decimal("0.002"), Decimal("0.06"), Decimal("0.0005"))


def simulation() -> tuple[list[dict[str, Any]], list[Subscription]]:
    sim = Simulator(150, seed=7, start=START, rate=EVENTS / (12 * 86400), rhythm=False)
    events: list[dict[str, Any]] = []
    for event in sim.events():
        if len(events) >= EVENTS:
            break
        events.append(event)
    subs = []
    for i, sub in enumerate(sim.subscriptions()):
        if i % 2 == 0:  # prepaid credit, bought before the stream
            grant = CreditGrant(
                credit_id=f"c-{i}", amount_usd=Decimal("0.05"), granted_at=START - timedelta(days=1)
            )
            sub = sub.with_credit(grant)
        subs.append(sub)
    return events, subs


@dataclass
class Tier:
    """The figures compared, per tier (money exact)."""

    requests: int = 0
    inference_cost: Decimal = Decimal(0)
    overage_revenue: Decimal = Decimal(0)
    credits_drawn: Decimal = Decimal(0)
    requests_blocked: int = 0
    requests_downgraded: int = 0
    alerts: int = 0
    users_alerted: set[str] = field(default_factory=set)
    users_blocked: set[str] = field(default_factory=set)
    users_downgraded: set[str] = field(default_factory=set)
    users_overage: set[str] = field(default_factory=set)

    def row(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "inference_cost": self.inference_cost,
            "overage_revenue": self.overage_revenue,
            "credits_drawn": self.credits_drawn,
            "requests_blocked": self.requests_blocked,
            "requests_downgraded": self.requests_downgraded,
            "alerts": self.alerts,
            "users_alerted": len(self.users_alerted),
            "users_blocked": len(self.users_blocked),
            "users_downgraded": len(self.users_downgraded),
            "users_overage": len(self.users_overage),
        }


@dataclass
class Run:
    """One pass of the stream through the pipeline behind a gateway."""

    priced: list[bytes] = field(default_factory=list)
    tiers: dict[str, Tier] = field(default_factory=lambda: defaultdict(Tier))
    seen: Counter[str] = field(default_factory=Counter)


def run_pipeline(plans: PlanCatalog, events: list[dict[str, Any]], subs: list[Subscription]) -> Run:
    by_user = {s.user_id: s for s in subs}
    states = [DictState() for _ in range(4)]
    processor = UsageProcessor(
        PriceCatalog.load(),
        by_user.get,
        seen=states[0],
        windows=states[1],
        marks=states[2],
        window_s=60,
        grace_s=300,
        dedupe_horizon_s=86_400,
    )
    caps = CapStage(CapEngine(plans, grace_s=300), by_user.get, states[3])
    pipeline = BatchPipeline(processor, caps, states)
    run = Run()
    latest: dict[str, bytes] = {}  # the compacted enforcement topic, as a gateway holds it
    in_month: dict[str, tuple[str, bool]] = {}  # event_id -> (tier, in the month)
    offsets = [0] * PARTITIONS
    batch: list[InRecord] = []
    users: set[str] = set()

    def flush() -> None:
        if not batch:
            return
        last = max(r.timestamp or 0 for r in batch)
        out = pipeline.run(batch, datetime.fromtimestamp(last / 1000, UTC) + timedelta(seconds=1))
        assert not out.poison and not out.capped.dead
        run.priced += [value for _, value in out.result.priced]
        for key, value in out.capped.enforcement:
            latest[key] = value
            record = orjson.loads(value)
            run.seen[f"{record['plan_id']}.{record['window']}:{record['state']}"] += 1
        for _, value in out.capped.alerts:
            alert = orjson.loads(value)
            tier, counted = in_month[alert["event_id"]]
            if counted:
                run.tiers[tier].alerts += 1
                run.tiers[tier].users_alerted.add(alert["user_id"])
        for _, value in out.capped.overages:
            record = orjson.loads(value)
            tier, counted = in_month[record["event_id"]]
            if not counted:
                continue
            if record["record"] == "overage":
                run.tiers[tier].overage_revenue += Decimal(record["amount"])
                run.tiers[tier].users_overage.add(record["user_id"])
            else:
                run.tiers[tier].credits_drawn += Decimal(record["amount"])
        batch.clear()
        users.clear()

    for event in events:
        user = event["user_id"]
        if user in users:
            flush()
        when = datetime.fromisoformat(event["occurred_at"]).astimezone(UTC)
        tier = by_user[user].plan_at(when)
        counted = MONTH_START <= when < MONTH_END
        totals = run.tiers[tier]
        action = "allow"
        if user in latest:
            decision = decide(decode_enforcement(latest[user]))
            expired = decision.until is not None and when.timestamp() >= decision.until
            action = "allow" if expired else decision.action
            run.seen[f"{action}"] += 1
        if action == "block":
            if counted:
                totals.requests_blocked += 1
                totals.users_blocked.add(user)
            continue
        if action == "downgrade":
            event = {k: v for k, v in event.items() if k != "provider"}
            event["served_model"] = decision.model
            if counted:
                totals.requests_downgraded += 1
                totals.users_downgraded.add(user)
        in_month[event["event_id"]] = (tier, counted)
        key = user.encode()
        partition = zlib.crc32(key) % PARTITIONS
        arrived = int(when.timestamp() * 1000) + 5
        batch.append(
            InRecord(
                "usage.events", partition, offsets[partition], key, orjson.dumps(event), arrived
            )
        )
        offsets[partition] += 1
        users.add(user)
    flush()
    for value in run.priced:
        priced = orjson.loads(value)
        tier, counted = in_month[priced["event_id"]]
        if counted:
            run.tiers[tier].requests += 1
            run.tiers[tier].inference_cost += Decimal(priced["cost"])
    return run


@pytest.fixture(scope="module")
def landed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ChdbStore, Run]]:
    events, subs = simulation()
    run_a = run_pipeline(PLANS_A, events, subs)
    assert run_a.seen["block"] == run_a.seen["downgrade"] == 0, "plans A must cap nothing"
    run_b = run_pipeline(PLANS_B, events, subs)
    store = ChdbStore(tmp_path_factory.mktemp("whatif") / "chdb", serve=False)
    try:
        store.migrate()
        load_plans_into(store, PLANS_A, source="test")
        rows = [SUBSCRIPTIONS.decode(encode_subscription(s)) for s in subs]
        store.insert("subscriptions", SUBSCRIPTIONS.to_arrow(rows), "subs-1")
        for i in range(0, len(run_a.priced), 2000):
            table = PRICED_EVENTS.from_json_lines(run_a.priced[i : i + 2000])
            store.insert("priced_events", table, f"priced-{i}")
        yield store, run_b
    finally:
        store.close()


COMPARED = tuple(Tier().row())


def test_the_replay_under_b_equals_the_pipeline_under_b(
    landed: tuple[ChdbStore, Run],
) -> None:
    store, run_b = landed
    catalog = PriceCatalog.load()
    result = run_whatif(store, Scenario(PLANS_A, catalog), Scenario(PLANS_B, catalog), month=NOV)
    expected = {t: v.row() for t, v in run_b.tiers.items() if any(v.row().values())}
    got = {
        r["tier"]: {k: r[k] for k in COMPARED}
        for r in result.alternative
        if any(r[k] for k in COMPARED)
    }
    assert got == expected
    # The data crosses every window kind and action of plans B, or the equality proves little.
    total = {k: sum(v[k] for v in expected.values()) for k in COMPARED}
    print(total, dict(run_b.seen))
    for key in ("requests_blocked", "requests_downgraded", "overage_revenue", "credits_drawn"):
        assert total[key] > 0, key
    # every window of plans B set a state at least once (all four kinds, all three actions)
    for plan in PLANS_B:
        for window in plan.windows:
            assert any(k.startswith(f"{plan.id}.{plan.id}.{window.name}:") for k in run_b.seen), (
                plan.id,
                window.name,
            )
    assert any(k.endswith(":blocked") and "enterprise.monthly" in k for k in run_b.seen), "ceiling"


def test_the_current_replay_is_what_landed(landed: tuple[ChdbStore, Run]) -> None:
    store, _ = landed
    catalog = PriceCatalog.load()
    result = run_whatif(store, Scenario(PLANS_A, catalog), Scenario(PLANS_A, catalog), month=NOV)
    _, rows = store.query(
        "SELECT toString(plan_id), count(), sum(toDecimal256(cost, 24)) "
        "FROM spendstream.priced_events FINAL WHERE toStartOfMonth(occurred_at) = '2026-11-01' "
        "GROUP BY plan_id"
    )
    stored = {str(r[0]): (int(r[1]), Decimal(r[2])) for r in rows}
    got = {r["tier"]: (r["requests"], r["inference_cost"]) for r in result.current if r["requests"]}
    assert got == stored
    assert result.current == result.alternative
    assert all(r["requests_blocked"] == r["requests_downgraded"] == 0 for r in result.current)
