"""Admission: what a decision costs on each path, and whether a hard cap holds under a burst.

One worker (``spendstream worker``, a child process) on topics of their own, with two plans: a
roomy one (a large monthly allowance: its users stay far from every cap) and a hard one (0.50
USD a month, blocked at the cap). Then, in turn:

* **local path**: an :class:`~producers.Admitter` with ``pool=64`` fills its pools (one strict
  admission per far user, each granted up to 64 pooled reservations), then ``admit()`` is timed
  over every pooled reservation it holds: a decision served from the pool, no network call
  (``local_served`` says how many of the timed ones were local: all of them, or the figure is
  not that of the local path). The **blended** rate is a sequential loop of ``admit()`` for one
  far user with the same pool: 64 local decisions, then a strict round trip, and so on. It is
  bounded by that round trip: at most ``pool + 1`` admissions per strict round trip.
* **strict path**: ``aadmit()`` with ``pool=0`` in an open loop: requests issued on a fixed
  schedule at ``rate`` per second for ``seconds`` over many users with roomy caps (spread over
  the partitions), each latency measured from the request's scheduled time until its answer,
  so a slow answer cannot slow the schedule down (no coordinated omission).
* **burst** (the scenario of tests/integration/test_admission_stream.py): one user on the hard
  cap has spent 0.40 USD (0.10 left); three Admitters with distinct gateway names (in this
  process: the tests folder is not part of the installed package) fire 20 concurrent
  admissions each, 4,000 gpt-4o input and 500 output tokens at most (0.015 USD estimated);
  each admitted call "runs" 10 to 200 ms and sends its usage event with the reservation id and
  at most those tokens. The priced topic is the oracle: what landed for the user after the
  0.40 (``burst_spent_usd``), its excess over the 0.10 left (``burst_overshoot_usd``, 0 when the
  cap held), and the admitted calls next to how many whole estimates 0.10 holds.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from producers import Admitter, UsageProducer, publish_subscriptions
from schemas import PlanPeriod, Subscription
from spendstream.kafka_fetch import fetch_ready
from spendstream.settings import Settings

ORG = "bench"
PLANS_YAML = """\
plans:
  - id: roomy
    monthly_price: "0"
    windows:
      - name: monthly
        kind: billing_month
        unit: usd
        allowance: "1000000"
        at_cap: {action: block}
  - id: hard
    monthly_price: "0"
    windows:
      - name: monthly
        kind: billing_month
        unit: usd
        allowance: "0.50"
        at_cap: {action: block}
"""
FAR_MODEL, FAR_IN, FAR_OUT = "gpt-4o-mini", 100, 100
"""The far users' calls: one shape, so every pooled reservation serves any of their calls."""
BURST_MODEL, BURST_IN, BURST_OUT = "gpt-4o", 4_000, 500
"""0.010 + 0.005 = 0.015 USD at most per call."""
BURST_ESTIMATE = Decimal("0.015")
BURST_GATEWAYS, BURST_CALLS = 3, 20
PRESPENT, REMAINING = Decimal("0.40"), Decimal("0.10")
LOCAL_POOL = 64


def _percentile(ascending: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (``q`` in 0..100)."""
    rank = max(1, -(-len(ascending) * q // 100))
    return ascending[int(rank) - 1]


def _subscription(user: str, plan: str, now: datetime) -> Subscription:
    since = now - timedelta(days=3)
    return Subscription(
        user_id=user,
        org_id=ORG,
        billing_anchor=since,
        plans=[PlanPeriod(plan_id=plan, effective_at=since)],
    )


async def _admit_all(admitter: Admitter, users: list[str], limit_s: float = 120.0) -> int:
    """One strict admission per user (concurrently) until each is decided on its plan: a user
    whose subscription the worker has not read yet is answered ``no_plan`` and asked again.
    Returns how many were admitted."""
    left = list(users)
    deadline = time.monotonic() + limit_s
    admitted = 0
    while left:
        tickets = await asyncio.gather(
            *(
                admitter.aadmit(u, ORG, FAR_MODEL, input_tokens=FAR_IN, output_tokens=FAR_OUT)
                for u in left
            )
        )
        admitted += sum(1 for t in tickets if t.reason == "ok")
        left = [u for u, t in zip(left, tickets, strict=True) if t.reason == "no_plan"]
        if left:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(left)} users still without a plan at the worker")
            await asyncio.sleep(0.5)
    return admitted


def _local_path(s: Settings, users: int, blend_rounds: int) -> dict[str, Any]:
    """Decisions/s served from the pool alone, and blended with the strict round trips."""
    far = [f"far-{i}" for i in range(users)]
    with Admitter(s, gateway=f"{s.processor.app_id}-local", pool=LOCAL_POOL) as admitter:
        asyncio.run(_admit_all(admitter, far))
        held = [(u, admitter.pooled(u, FAR_MODEL, FAR_IN, FAR_OUT)) for u in far]
        calls = [u for u, n in held for _ in range(n)]
        admit = admitter.admit
        local = 0
        t0 = time.perf_counter()
        for user in calls:
            local += admit(user, ORG, FAR_MODEL, input_tokens=FAR_IN, output_tokens=FAR_OUT).local
        local_s = time.perf_counter() - t0
        local_rate = len(calls) / local_s if local_s > 0 else 0.0

        # Blended: one far user, sequential, the pool refilled by every strict round trip.
        strict_s: list[float] = []
        blended = blend_rounds * (LOCAL_POOL + 1)
        blended_local = 0
        t0 = time.perf_counter()
        for _ in range(blended):
            t1 = time.perf_counter()
            ticket = admit("blend-0", ORG, FAR_MODEL, input_tokens=FAR_IN, output_tokens=FAR_OUT)
            if ticket.local:
                blended_local += 1
            else:
                strict_s.append(time.perf_counter() - t1)
        blended_s = time.perf_counter() - t0
    rtt = sum(strict_s) / len(strict_s) if strict_s else 0.0
    per_local = 1 / local_rate if local_rate else 0.0
    bound = (LOCAL_POOL + 1) / (rtt + LOCAL_POOL * per_local) if rtt else 0.0
    return {
        "local_users": users,
        "local_decisions": len(calls),
        "local_served": local,
        "local_decisions_per_s": round(local_rate),
        "local_decision_us": round(per_local * 1e6, 2),
        "blended_admissions": blended,
        "blended_strict": len(strict_s),
        "blended_local": blended_local,
        "blended_per_s": round(blended / blended_s) if blended_s > 0 else 0,
        "blended_strict_rtt_mean_ms": round(rtt * 1000, 1),
        "blended_strict_rtt_max_ms": round(max(strict_s, default=0.0) * 1000, 1),
        "blended_bound_per_s": round(bound),
        "blended_bounded_by": (
            f"one strict round trip per {LOCAL_POOL + 1} admissions (pool {LOCAL_POOL} + 1): "
            f"{LOCAL_POOL + 1} / (round trip + {LOCAL_POOL} local decisions)"
        ),
    }


async def _open_loop(
    admitter: Admitter, users: list[str], rate: int, seconds: float
) -> tuple[list[float], int, float, float, int, dict[str, int]]:
    """Issue ``rate * seconds`` strict admissions on a fixed schedule: (ascending latencies,
    requests sent, seconds the sending took, latest send behind schedule, errors, outcomes)."""
    total = max(int(rate * seconds), 1)
    latencies: list[float] = []
    outcomes = {"blocked": 0, "no_plan": 0, "local": 0}

    async def one(i: int, scheduled: float) -> None:
        ticket = await admitter.aadmit(
            users[i % len(users)], ORG, FAR_MODEL, input_tokens=FAR_IN, output_tokens=FAR_OUT
        )
        latencies.append(time.monotonic() - scheduled)
        outcomes["blocked"] += ticket.action == "block"
        outcomes["no_plan"] += ticket.reason == "no_plan"
        outcomes["local"] += ticket.local

    tasks: list[asyncio.Task[None]] = []
    lag_max = 0.0
    t0 = time.monotonic() + 0.01
    i = 0
    while i < total:
        now = time.monotonic()
        due = min(total, int((now - t0) * rate) + 1) if now >= t0 else 0
        while i < due:
            scheduled = t0 + i / rate
            lag_max = max(lag_max, now - scheduled)
            tasks.append(asyncio.create_task(one(i, scheduled)))
            i += 1
        if i < total:
            await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
    sent_s = time.monotonic() - t0
    results = await asyncio.gather(*tasks, return_exceptions=True)
    errors = sum(1 for r in results if isinstance(r, BaseException))
    return sorted(latencies), total, sent_s, lag_max, errors, outcomes


def _strict_path(s: Settings, rate: int, seconds: float) -> dict[str, Any]:
    """Open-loop strict admissions at ``rate``/s: latency from scheduled send to answer."""
    users = [f"lat-{i}" for i in range(max(100, rate // 5))]
    with Admitter(s, gateway=f"{s.processor.app_id}-strict", pool=0) as admitter:
        # Warm: every user decided once on its plan (the worker has read the subscriptions).
        asyncio.run(_admit_all(admitter, users))
        resent = admitter.resent
        latencies, total, sent_s, lag_max, errors, outcomes = asyncio.run(
            _open_loop(admitter, users, rate, seconds)
        )
        resent = admitter.resent - resent
    figures: dict[str, Any] = {
        "strict_rate_target": rate,
        "strict_users": len(users),
        "strict_sent": total,
        "strict_sent_per_s": round(total / sent_s) if sent_s > 0 else 0,
        "strict_send_lag_max_ms": round(lag_max * 1000, 1),
        "strict_answered": len(latencies),
        "strict_errors": errors,
        "strict_resent": resent,
        "strict_blocked": outcomes["blocked"],
        "strict_no_plan": outcomes["no_plan"],
    }
    if latencies:
        figures.update(
            strict_p50_ms=round(_percentile(latencies, 50) * 1000, 1),
            strict_p99_ms=round(_percentile(latencies, 99) * 1000, 1),
            strict_max_ms=round(latencies[-1] * 1000, 1),
        )
    figures["worker_batch_within_ms"] = round(s.processor.batch_within_s * 1000, 1)
    return figures


def priced_of(s: Settings, user: str, want: int, limit_s: float) -> list[dict[str, Any]]:
    """The user's priced events (by event id) once ``want`` arrived, and 3 s more (anything
    beyond ``want`` would be an overshoot)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    conf = s.kafka.confluent_config()
    consumer = Consumer(
        {**conf, "group.id": f"bench-admission-{uuid.uuid4().hex}", "enable.auto.commit": False}
    )
    topic = s.topics.priced
    meta = consumer.list_topics(topic, timeout=30).topics[topic]
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
    seen: dict[str, dict[str, Any]] = {}
    key = user.encode()
    deadline = time.monotonic() + limit_s
    quiet_until: float | None = None
    try:
        while time.monotonic() < deadline:
            for msg in fetch_ready(consumer, 0.2):
                if msg.error() is None and msg.key() == key:
                    row = orjson.loads(msg.value() or b"{}")
                    seen[row["event_id"]] = row
                    quiet_until = None
            if len(seen) >= want:
                quiet_until = quiet_until or time.monotonic() + 3.0
                if time.monotonic() >= quiet_until:
                    break
    finally:
        consumer.close()
    if len(seen) < want:
        raise TimeoutError(f"{len(seen)} of {want} priced events of {user!r} in {limit_s} s")
    return list(seen.values())


def prespend(s: Settings, user: str, now: datetime, org: str = ORG) -> set[str]:
    """0.40 USD of usage before the burst: 4 x 40,000 gpt-4o input tokens; their event ids."""
    ids = {f"{user}-pre{i}" for i in range(4)}
    with UsageProducer(s) as producer:
        for i in range(4):
            producer.send(
                {
                    "event_id": f"{user}-pre{i}",
                    "occurred_at": (now - timedelta(minutes=5, seconds=-i)).isoformat(),
                    "org_id": org,
                    "user_id": user,
                    "gateway": "bench",
                    "requested_model": BURST_MODEL,
                    "input_tokens": 40_000,
                }
            )
    return ids


async def burst_call(
    admitter: Admitter, producer: UsageProducer, user: str, org: str, rng: random.Random
) -> dict[str, Any]:
    """One call of the burst: admitted first; if so, "run" (a short sleep) and send its usage,
    at most the estimated tokens, with the reservation id. One row: the decision (and the
    event id of an admitted call)."""
    ticket = await admitter.aadmit(
        user, org, BURST_MODEL, input_tokens=BURST_IN, output_tokens=BURST_OUT
    )
    row: dict[str, Any] = {
        "reservation_id": ticket.reservation_id,
        "action": ticket.action,
        "reason": ticket.reason,
        "local": ticket.local,
        "cost": str(ticket.cost),
    }
    if ticket.allowed:
        await asyncio.sleep(rng.uniform(0.01, 0.2))  # the model call
        event_id = uuid.uuid4().hex
        producer.send(
            {
                "event_id": event_id,
                "occurred_at": datetime.now(UTC).isoformat(),
                "org_id": org,
                "user_id": user,
                "gateway": admitter.gateway,
                "requested_model": ticket.model or BURST_MODEL,
                "input_tokens": rng.randint(BURST_IN // 2, BURST_IN),
                "output_tokens": rng.randint(0, BURST_OUT),
                "reservation_id": ticket.reservation_id,
            }
        )
        row["event_id"] = event_id
    return row


async def _burst(s: Settings, user: str, producer: UsageProducer) -> list[dict[str, Any]]:
    """Three Admitters, 20 concurrent calls each, all at once; one row per call."""
    admitters = [Admitter(s, gateway=f"{s.processor.app_id}-gw-{i}") for i in range(BURST_GATEWAYS)]

    try:
        await asyncio.gather(*(asyncio.to_thread(a.start) for a in admitters))
        return list(
            await asyncio.gather(
                *(
                    burst_call(a, producer, user, ORG, random.Random(n * BURST_CALLS + k))
                    for n, a in enumerate(admitters)
                    for k in range(BURST_CALLS)
                )
            )
        )
    finally:
        await asyncio.gather(*(asyncio.to_thread(a.close) for a in admitters))


def _burst_overshoot(s: Settings, user: str, now: datetime) -> dict[str, Any]:
    """The hard-cap burst; the priced topic says what it cost."""
    pre_ids = prespend(s, user, now)
    pre = priced_of(s, user, len(pre_ids), 120)
    prespent = sum((Decimal(r["cost"]) for r in pre), Decimal(0))
    with UsageProducer(s) as producer:
        rows = asyncio.run(_burst(s, user, producer))
        producer.flush(30)
    admitted = [r for r in rows if r["action"] != "block"]
    landed = priced_of(s, user, len(pre_ids) + len(admitted), 120)
    spent = sum((Decimal(r["cost"]) for r in landed if r["event_id"] not in pre_ids), Decimal(0))
    # Summed exactly above; floats only here, for the figures table and --repeat's medians
    # (an overshoot of exactly 0 stays 0.0).
    return {
        "burst_calls": len(rows),
        "burst_admitted": len(admitted),
        "burst_blocked": len(rows) - len(admitted),
        "burst_local": sum(1 for r in rows if r["local"]),
        "burst_estimates_that_fit": int(REMAINING / BURST_ESTIMATE),
        "burst_prespent_usd": float(prespent),
        "burst_remaining_usd": float(REMAINING),
        "burst_spent_usd": float(spent),
        "burst_overshoot_usd": float(max(Decimal(0), spent - REMAINING)),
        "burst_events_landed": len(landed) - len(pre_ids),
    }


def run_admission_bench(
    settings: Settings,
    seconds: float = 10.0,
    rate: int = 1_000,
    *,
    local_users: int = 400,
    blend_rounds: int = 20,
) -> dict[str, Any]:
    """Start a worker on topics of its own; measure the local path, the strict path at
    ``rate`` admissions/s for ``seconds``, and the burst's overshoot; return the figures."""
    from spendstream.bench.worker import isolated
    from spendstream.kafka_admin import delete_topics, ensure_topics, topic_partitions
    from spendstream.runner import WorkerProcess

    prefix = f"bench-admission-{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix="spendstream-bench-admission-"))
    plans = workdir / "plans.yaml"
    plans.write_text(PLANS_YAML)
    s = isolated(settings, prefix, workdir).model_copy(update={"plans_file": plans})
    conf = s.kafka.confluent_config()
    now = datetime.now(UTC).replace(microsecond=0)
    burst_user = f"burst-{uuid.uuid4().hex[:8]}"
    roomy = [
        *(f"far-{i}" for i in range(local_users)),
        "blend-0",
        *(f"lat-{i}" for i in range(max(100, rate // 5))),
    ]
    worker = None
    try:
        ensure_topics(s)
        publish_subscriptions(
            s,
            [_subscription(u, "roomy", now) for u in roomy]
            + [_subscription(burst_user, "hard", now)],
        )
        worker = WorkerProcess(s, workdir / "worker.log")
        if worker.wait_state_ready(300) is None:
            raise TimeoutError("the worker did not report its state ready in 300 s")
        figures: dict[str, Any] = {}
        figures.update(_local_path(s, local_users, blend_rounds))
        worker.check_alive()
        figures.update(_strict_path(s, rate, seconds))
        worker.check_alive()
        figures.update(_burst_overshoot(s, burst_user, now))
        worker.check_alive()
        return figures
    finally:
        if worker is not None:
            worker.stop()
        delete_topics(conf, [t for t in topic_partitions(conf) if prefix in t])
        shutil.rmtree(workdir, ignore_errors=True)
