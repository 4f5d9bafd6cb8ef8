"""A hard cap holds under concurrent requests from three gateway replicas (the real broker).

One user on a 0.50 USD hard cap has spent 0.40 USD: 0.10 USD remain. Three gateway processes
(``tests/admission_gateway.py``) fire 20 concurrent calls each, every call admitted first
through :class:`producers.Admitter` (estimate 0.015 USD: 4,000 gpt-4o input and 500 output
tokens at most), and each admitted call sends its usage event with the reservation id and at
most those tokens. The oracle is the priced-events topic: what landed for the user after the
0.40 must not pass 0.10, and at least as many calls must be admitted as 0.10 holds estimates
(6), so nothing was blocked needlessly. Then the same with the worker SIGKILLed during the
burst (its calls spread over 2 s, the kill at 0.5 s) and started again: the gateways ask again
with the same ids until it answers.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from producers import publish_subscriptions
from schemas import PlanPeriod, Subscription
from spendstream.bench.admission import prespend, priced_of
from spendstream.kafka_admin import ensure_topics
from spendstream.runner import WorkerProcess
from spendstream.settings import Settings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
GATEWAY = REPO / "tests" / "admission_gateway.py"
PLANS_YAML = """
plans:
  - id: hard
    monthly_price: "0"
    windows:
      - name: monthly
        kind: billing_month
        unit: usd
        allowance: "0.50"
        at_cap: {action: block}
"""
ESTIMATE = Decimal("0.015")
REMAINING = Decimal("0.10")


@pytest.fixture
def setup(make_settings: Any, tmp_path: Path) -> Iterator[tuple[Settings, Path]]:
    plans = tmp_path / "plans.yaml"
    plans.write_text(PLANS_YAML)
    tag = uuid.uuid4().hex[:8]
    settings = make_settings(
        plans_file=plans,
        processor={
            "app_id": f"admit-{tag}",
            "batch_within_s": 0.02,
            "batch_size": 500,
            "session_timeout_s": 6,
        },
        admission={"timeout_s": 2.0, "deadline_s": 120.0, "pool": 8},
    )
    ensure_topics(settings)
    yield settings, tmp_path


def _subscribe(settings: Settings) -> tuple[str, datetime]:
    """A new user on the hard plan (org-1); the user and the time the plan starts from."""
    user = f"u-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC).replace(microsecond=0)
    publish_subscriptions(
        settings,
        [
            Subscription(
                user_id=user,
                org_id="org-1",
                billing_anchor=now - timedelta(days=3),
                plans=[PlanPeriod(plan_id="hard", effective_at=now - timedelta(days=3))],
            )
        ],
    )
    return user, now


def _subscribe_and_prespend(settings: Settings) -> tuple[str, datetime]:
    user, now = _subscribe(settings)
    prespend(settings, user, now, org="org-1")  # 0.40 USD
    return user, now


def _burst(
    settings: Settings, tmp_path: Path, user: str, worker_kill: WorkerProcess | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], WorkerProcess | None]:
    """Three gateway processes, 20 concurrent calls each; returns their lines (and summaries)."""
    go = tmp_path / f"go-{uuid.uuid4().hex[:6]}"
    env = {**settings.to_env(), "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(GATEWAY),
                "--user",
                user,
                "--org",
                "org-1",
                "--gateway",
                f"gw-{i}-{uuid.uuid4().hex[:4]}",
                "--calls",
                "20",
                "--go",
                str(go),
                "--seed",
                str(i),
                "--spread",
                "2.0" if worker_kill is not None else "0",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=REPO,
        )
        for i in range(3)
    ]
    for proc in procs:  # each replica prints "ready" once its answers reader is assigned
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert b"ready" in first, (first, proc.stderr.read() if proc.stderr else b"")
    go.touch()
    restarted = None
    if worker_kill is not None:
        # The calls start over 2 s: some are answered, then the worker dies, and the rest
        # (and any answer it had not sent) wait for the restarted one.
        time.sleep(0.5)
        worker_kill.kill()
        restarted = WorkerProcess(settings, tmp_path / "worker-2.log")
    lines: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
        for raw in out.splitlines():
            row = orjson.loads(raw)
            (summaries if "done" in row else lines).append(row)
    return lines, summaries, restarted


@pytest.mark.parametrize("kill", [False, True], ids=["steady", "worker-sigkilled-mid-burst"])
def test_sixty_concurrent_calls_from_three_gateways_never_pass_the_cap(
    setup: tuple[Settings, Path], kill: bool
) -> None:
    settings, tmp_path = setup
    worker = WorkerProcess(settings, tmp_path / "worker-1.log")
    restarted: WorkerProcess | None = None
    try:
        assert worker.wait_state_ready(120) is not None
        user, _ = _subscribe_and_prespend(settings)
        pre = priced_of(settings, user, 4, 60)
        assert len(pre) == 4, pre
        lines, summaries, restarted = _burst(settings, tmp_path, user, worker if kill else None)
        assert len(lines) == 60
        admitted = [row for row in lines if row["action"] != "block"]
        blocked = [row for row in lines if row["action"] == "block"]
        assert {row["reason"] for row in blocked} <= {"cap"}, blocked
        assert not any(row["local"] for row in lines)  # near the cap: no pool is granted
        assert len({row["reservation_id"] for row in lines}) == 60
        landed = priced_of(settings, user, 4 + len(admitted), 120)
        spent = sum((Decimal(r["cost"]) for r in landed), Decimal(0)) - Decimal("0.40")
        # No overshoot: the calls that landed cost at most what remained.
        assert spent <= REMAINING, (spent, len(admitted))
        # No needless block: at least as many admitted as whole estimates fit.
        assert len(admitted) >= int(REMAINING / ESTIMATE), (len(admitted), lines)
        # Every admitted call's usage landed once, and nothing else did.
        assert {r["event_id"] for r in landed} - {f"{user}-pre{i}" for i in range(4)} == {
            row["event_id"] for row in admitted
        }
        if kill:
            assert sum(s["resent"] for s in summaries) > 0  # the kill did interrupt answers
    finally:
        worker.stop()
        if restarted is not None:
            restarted.stop()


def test_a_worker_creates_a_missing_answer_topic_and_refuses_a_short_one(
    make_settings: Any,
) -> None:
    from spendstream.errors import KafkaError
    from spendstream.kafka_admin import (
        create_topics,
        delete_topics,
        ensure_answer_topic,
        topic_partitions,
    )

    settings = make_settings(topics={"partitions": 4})
    conf = settings.kafka.confluent_config()
    name = settings.topics.admissions
    delete_topics(conf, [name])  # a deployment from before admission existed
    ensure_answer_topic(settings)
    assert topic_partitions(conf)[name] == 4
    delete_topics(conf, [name])
    create_topics(conf, [name], 2)
    with pytest.raises(KafkaError, match="has 2 partitions but 4 are configured"):
        ensure_answer_topic(settings)


def test_without_a_worker_admit_asks_again_then_raises_at_its_deadline(make_settings: Any) -> None:
    from producers import AdmissionTimeout, Admitter

    settings = make_settings(admission={"timeout_s": 0.3, "deadline_s": 1.5})
    ensure_topics(settings)
    with Admitter(settings, gateway="lonely") as admitter:
        started = time.monotonic()
        with pytest.raises(AdmissionTimeout, match=r"within 1\.5 s"):
            admitter.admit("u", "o", "gpt-4o", input_tokens=10, output_tokens=10)
        took = time.monotonic() - started
    assert admitter.resent >= 3  # one request, asked again every 0.3 s until 1.5 s
    assert 1.4 <= took < 10
    # Every ask went to the events topic, keyed by the user, with the same id.
    conf = settings.kafka.confluent_config()
    consumer = Consumer({**conf, "group.id": f"t-{uuid.uuid4().hex}", "enable.auto.commit": False})
    topic = settings.topics.events
    meta = consumer.list_topics(topic, timeout=30).topics[topic]
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
    asked = [m for m in consumer.consume(100, 5.0) if m.error() is None]
    consumer.close()
    assert {m.key() for m in asked} == {b"u"}
    assert len({orjson.loads(m.value() or b"{}")["reservation_id"] for m in asked}) == 1
    assert len(asked) == admitter.resent + 1


def test_the_demo_burst_admits_what_the_free_plan_holds(make_settings: Any, tmp_path: Path) -> None:
    from spendstream.demo import admission_burst

    settings = make_settings(processor={"batch_within_s": 0.02, "session_timeout_s": 6})
    ensure_topics(settings)
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        assert worker.wait_state_ready(120) is not None
        burst = admission_burst(settings)
        # The sample free plan: 0.10 USD per rolling 5 hours; each call at most 0.026 USD.
        assert (burst["admitted"], burst["refused"]) == (3, 17), burst
        landed = priced_of(settings, burst["user_id"], 3, 60)
        assert sum((Decimal(r["cost"]) for r in landed), Decimal(0)) == Decimal("0.078")
    finally:
        worker.stop()


def test_a_closed_gateway_gives_back_its_pool_and_another_can_use_the_budget(
    setup: tuple[Settings, Path],
) -> None:
    """0.50 USD, nothing spent: 33 estimates fit. Gateway A asks once with a pool of 8 (all
    granted: far from the cap) and closes; gateway B then asks one call at a time. With A's
    pool given back only A's own call stays held, so B gets 32; were the pool still held
    until its TTL, B would get 24."""
    from producers import Admitter

    settings, tmp_path = setup
    user, _ = _subscribe(settings)
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        assert worker.wait_state_ready(120) is not None
        shape = {"input_tokens": 4_000, "output_tokens": 500}
        with Admitter(settings, gateway="gw-a", pool=8) as a:
            first = a.admit(user, "org-1", "gpt-4o", **shape)
            assert (first.action, first.cost) == ("allow", ESTIMATE)
            assert a.pooled(user, "gpt-4o", 4_000, 500) == 8
        assert a.released == 8
        with Admitter(settings, gateway="gw-b", pool=0) as b:
            actions = [b.admit(user, "org-1", "gpt-4o", **shape).action for _ in range(34)]
        assert actions == ["allow"] * 32 + ["block"] * 2, actions
    finally:
        worker.stop()
