"""Caps end to end on the real broker: the real worker process, alerts, a crash, CapGuard.

A scripted user on a plan with a 1.00 USD monthly allowance (alerts at 50/80/100 %, block at
the cap) sends events of exactly 0.10 USD each (40,000 gpt-4o input tokens). The worker runs as
``python -m spendstream worker`` with this test's settings in ``SPENDSTREAM_*`` variables and is
killed with SIGKILL right after the 50 % alert, then started again.
"""

from __future__ import annotations

import os
import signal
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

from producers import CapGuard, UsageProducer, publish_subscriptions
from schemas import PlanPeriod, Subscription
from spendstream.kafka_admin import ensure_topics
from spendstream.settings import Settings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PLANS_YAML = """
plans:
  - id: capped
    monthly_price: "0"
    windows:
      - name: monthly
        kind: billing_month
        unit: usd
        allowance: "1.00"
        thresholds: [50, 80, 100]
        at_cap: {action: block}
  - id: ceiled
    monthly_price: "0"
    windows:
      - name: monthly
        kind: billing_month
        unit: usd
        allowance: "0.20"
        thresholds: [100]
        at_cap: {action: overage, unit_price: "1", ceiling_usd: "0.10"}
"""


def settings_env(settings: Settings) -> dict[str, str]:
    """The explicitly set fields of ``settings`` as SPENDSTREAM_* variables (nesting with __)."""
    env: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}__{key.upper()}" if prefix else key.upper(), item)
        elif value is not None:
            env[f"SPENDSTREAM_{prefix}"] = str(value)

    walk("", settings.model_dump(mode="json", exclude_unset=True))
    return env


class WorkerProcess:
    """``python -m spendstream worker`` as a child process of this test."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.env = {
            **os.environ,
            **settings_env(settings),
            # faust reads these from the environment: a SIGKILLed member leaves the group after
            # 6 s instead of 60 s, so the restarted worker gets the partitions back quickly.
            "BROKER_SESSION_TIMEOUT": "6",
            "BROKER_HEARTBEAT_INTERVAL": "1",
        }
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = (self.log_dir / f"worker-{self.starts}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "spendstream", "worker", "--loglevel", "warning"],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        """SIGKILL: no flush, no commit, no leave-group."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self) -> str:
        path = self.log_dir / f"worker-{self.starts}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


class TopicReader:
    """Every record of a topic from the start, accumulated across calls."""

    def __init__(self, settings: Settings, topic: str) -> None:
        conf = settings.kafka.confluent_config()
        conf.update({"group.id": f"test-{uuid.uuid4().hex}", "enable.auto.commit": False})
        self.consumer = Consumer(conf)
        meta = self.consumer.list_topics(topic, timeout=30).topics[topic]
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        self.records: list[dict[str, Any]] = []

    def poll(self, timeout_s: float) -> None:
        for msg in self.consumer.consume(1000, timeout_s):
            assert msg.error() is None, msg.error()
            value = msg.value()
            assert value is not None
            self.records.append(orjson.loads(value))

    def wait_for(self, count: int, timeout_s: float, why: str, worker: WorkerProcess) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.records) < count:
            if time.monotonic() > deadline:
                pytest.fail(f"{why}: {self.records}\n--- worker log ---\n{worker.log_tail()}")
            self.poll(0.2)

    def wait_for_ids(self, count: int, timeout_s: float, why: str, worker: WorkerProcess) -> None:
        """Wait for ``count`` distinct alert ids (a replayed alert repeats its id)."""
        deadline = time.monotonic() + timeout_s
        while len({r["alert_id"] for r in self.records}) < count:
            if time.monotonic() > deadline:
                pytest.fail(f"{why}: {self.records}\n--- worker log ---\n{worker.log_tail()}")
            self.poll(0.2)

    def drain(self, quiet_s: float) -> None:
        """Read until nothing new arrived for ``quiet_s``."""
        until = time.monotonic() + quiet_s
        while time.monotonic() < until:
            before = len(self.records)
            self.poll(0.2)
            if len(self.records) != before:
                until = time.monotonic() + quiet_s

    def close(self) -> None:
        self.consumer.close()


@pytest.fixture
def worker_setup(make_settings: Any, tmp_path: Path) -> Iterator[tuple[Settings, WorkerProcess]]:
    plans = tmp_path / "plans.yaml"
    plans.write_text(PLANS_YAML)
    tag = uuid.uuid4().hex[:8]
    settings = make_settings(
        plans_file=plans,
        processor={"app_id": f"caps-test-{tag}", "batch_within_s": 0.05, "batch_size": 500},
    )
    ensure_topics(settings)
    worker = WorkerProcess(settings, tmp_path)
    try:
        yield settings, worker
    finally:
        worker.kill()


def committed_events(settings: Settings) -> int:
    """Offsets of the events topic the worker's consumer group has committed, summed."""
    conf = settings.kafka.confluent_config()
    consumer = Consumer({**conf, "group.id": settings.processor.app_id})
    try:
        topic = settings.topics.events
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        parts = [TopicPartition(topic, p) for p in meta.partitions]
        return sum(max(0, tp.offset) for tp in consumer.committed(parts, timeout=10))
    finally:
        consumer.close()


class ScriptedUser:
    """A new user on ``plan`` (subscribed three days ago) sending events of exactly 0.10 USD
    (40,000 gpt-4o input tokens at 2.5e-6), one second apart in event time."""

    def __init__(self, settings: Settings, plan: str) -> None:
        self.settings = settings
        self.id = f"user-{uuid.uuid4().hex[:8]}"
        now = datetime.now(UTC).replace(microsecond=0)
        publish_subscriptions(
            settings,
            [
                Subscription(
                    user_id=self.id,
                    org_id="org-1",
                    billing_anchor=now - timedelta(days=3),
                    plans=[PlanPeriod(plan_id=plan, effective_at=now - timedelta(days=3))],
                )
            ],
        )
        self.t0 = now - timedelta(minutes=10)

    def send(self, first: int, count: int) -> None:
        """Events ``first`` .. ``first + count - 1`` (ids ``<user>-e<n>``)."""
        with UsageProducer(self.settings) as producer:
            for i in range(first, first + count):
                producer.send(
                    {
                        "event_id": f"{self.id}-e{i}",
                        "occurred_at": (self.t0 + timedelta(seconds=i)).isoformat(),
                        "org_id": "org-1",
                        "user_id": self.id,
                        "gateway": "test",
                        "requested_model": "gpt-4o",
                        "input_tokens": 40_000,
                    }
                )


@pytest.mark.parametrize(
    "after_commit",
    [
        pytest.param(True, id="kill-after-offsets-committed"),
        pytest.param(False, id="kill-right-after-alert"),
    ],
)
def test_alerts_once_across_a_worker_crash_and_the_guard_sees_blocked(
    worker_setup: tuple[Settings, WorkerProcess], after_commit: bool
) -> None:
    settings, worker = worker_setup
    scripted = ScriptedUser(settings, "capped")
    user, send = scripted.id, scripted.send

    alerts = TopicReader(settings, settings.topics.alerts)
    guard = CapGuard(settings).start(wait_s=30)
    try:
        worker.start()
        send(0, 6)  # 0.60 USD: 50 %
        alerts.wait_for(1, 90, "no 50 % alert from the first worker", worker)
        deadline = time.monotonic() + 20
        while guard.check(user).state != "warn" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert guard.check(user).state == "warn" and guard.check(user).action == "allow"

        if after_commit:
            deadline = time.monotonic() + 30
            while committed_events(settings) < 6 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert committed_events(settings) == 6
        worker.kill()  # no flush, no commit, no leave-group
        worker.start()
        send(6, 3)  # 0.90 USD: 80 %, counted on top of the restored 0.60
        alerts.wait_for_ids(2, 90, "no 80 % alert after the restart", worker)
        send(9, 2)  # 1.10 USD: 100 %
        alerts.wait_for_ids(3, 60, "no 100 % alert", worker)
        alerts.drain(quiet_s=3.0)

        # Delivery is at least once: a SIGKILL after an alert was published but before the
        # state recording it was written replays it, with the same alert_id (consumers and
        # the alerts table keep one per id). What must hold: three alerts, each fired once
        # by the event that crossed it, and any repeat identical to the first delivery.
        by_id: dict[str, dict[str, Any]] = {}
        for record in alerts.records:
            first = by_id.setdefault(record["alert_id"], record)
            assert {k: v for k, v in record.items() if k != "detected_at"} == {
                k: v for k, v in first.items() if k != "detected_at"
            }
        got = sorted((a["threshold"], a["usage"], a["event_id"]) for a in by_id.values())
        assert got == [
            (50, "0.5", f"{user}-e4"),
            (80, "0.8", f"{user}-e7"),
            (100, "1", f"{user}-e9"),
        ], got
        assert {a["window_id"] for a in alerts.records} == {
            alerts.records[0]["window_id"]
        }  # one billing-month instance

        deadline = time.monotonic() + 20
        while guard.check(user).action != "block" and time.monotonic() < deadline:
            time.sleep(0.05)
        decision = guard.check(user)
        assert decision.action == "block" and decision.reason == "cap", decision
        assert decision.record is not None
        assert decision.record["remaining"] == "0" and decision.record["usage"] == "1.1"
        staleness = guard.staleness_s()
        assert staleness is not None and staleness < 5
    finally:
        alerts.close()
        guard.close()
        worker.stop()


def test_a_top_up_unblocks_a_user_at_the_overage_ceiling_and_is_drawn_first(
    worker_setup: tuple[Settings, WorkerProcess],
) -> None:
    """Blocked at the ceiling, topped up from the CLI, unblocked with no new event; the next
    event is paid from the credit (a credit_draw record), not billed."""
    settings, worker = worker_setup
    scripted = ScriptedUser(settings, "ceiled")
    user, send = scripted.id, scripted.send

    def top_up(credit_id: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "spendstream", "subscriptions", "top-up", user, "0.25",
             "--credit-id", credit_id],
            cwd=REPO, env=worker.env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    def wait_action(action: str, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while guard.check(user).action != action and time.monotonic() < deadline:
            time.sleep(0.05)
        return guard.check(user)

    overages = TopicReader(settings, settings.topics.overages)
    guard = CapGuard(settings).start(wait_s=30)
    try:
        worker.start()
        send(0, 4)  # 0.40 USD: 0.20 beyond the allowance, billed 0.10 up to the ceiling
        decision = wait_action("block", 90)
        assert decision.action == "block" and decision.reason == "ceiling", (
            decision,
            worker.log_tail(),
        )

        out = top_up("pay-1")
        assert "1 grant(s)" in out, out
        t_granted = time.monotonic()
        decision = wait_action("allow", 30)
        assert decision.action == "allow", (decision, worker.log_tail())
        unblocked_s = time.monotonic() - t_granted
        print(f"\nunblocked {unblocked_s:.2f} s after the top-up was published")
        assert "1 grant(s)" in top_up("pay-1")  # the same purchase again: no second grant

        send(4, 1)  # 0.10 USD beyond the allowance: paid from the 0.25 credit
        deadline = time.monotonic() + 60
        while not any(r["event_id"] == f"{user}-e4" for r in overages.records):
            if time.monotonic() > deadline:
                pytest.fail(f"nothing on overages for e4: {overages.records}\n{worker.log_tail()}")
            overages.poll(0.2)
        overages.drain(quiet_s=2.0)
        after = [r for r in overages.records if r["event_id"] == f"{user}-e4"]
        assert [(r["record"], Decimal(r["amount"])) for r in after] == [
            ("credit_draw", Decimal("0.1"))
        ], overages.records
        billed = sum(Decimal(r["amount"]) for r in overages.records if r["record"] == "overage")
        assert billed == Decimal("0.1")  # only what was billed before the top-up
    finally:
        overages.close()
        guard.close()
        worker.stop()
