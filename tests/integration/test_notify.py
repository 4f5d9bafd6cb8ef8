"""``spendstream notify`` end to end: the real broker, real HTTP receivers on 127.0.0.1.

The records are those the worker publishes for a caps scenario: the real cap engine
(stream_processors.caps) runs scripted users through plans with thresholds, a break-even price
and a cap, and its alerts and enforcement records are produced to the alerts and enforcement
topics keyed by user, as the worker's output producer does. Each receiver checks every request
by hand against the Standard Webhooks algorithm (not with spendstream's verify()).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from schemas import PlanPeriod, Subscription
from schemas.plans import load_plans
from spendstream.kafka_admin import create_topics, ensure_topics
from spendstream.lag import group_lag
from spendstream.settings import Settings
from stream_processors.caps import CapEngine, CapEvent, Effects

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SECRET = "whsec_" + base64.b64encode(b"spendstream-notify-integration-test-key!").decode()
KEY = base64.b64decode(SECRET.removeprefix("whsec_"))
PLANS_YAML = """
plans:
  - id: capped
    monthly_price: "0.45"
    windows:
      - name: monthly
        kind: billing_month
        unit: usd
        allowance: "1.00"
        thresholds: [25, 50, 80, 100]
        at_cap: {action: block}
  - id: downgraded
    monthly_price: "0.25"
    windows:
      - name: daily
        kind: calendar_day
        unit: usd
        allowance: "0.60"
        thresholds: [50, 100]
        at_cap: {action: downgrade, model: gpt-4o-mini}
"""


# -- the records of a caps scenario -------------------------------------------------------------


@dataclass(frozen=True)
class Out:
    """One record as the worker publishes it."""

    role: str  # "alerts" or "enforcement"
    key: bytes
    record: dict[str, Any]

    @property
    def identity(self) -> str:
        """What the webhook-id must name, from the record alone (the contract)."""
        if self.role == "alerts":
            return str(self.record["alert_id"])
        return f"{self.record['user_id']}|enforcement|{self.record['version']}"

    @property
    def type(self) -> str:
        if self.role == "alerts":
            return f"alert.{self.record['kind']}"
        return "enforcement.changed"


def caps_scenario(plans: Path, users: int, events: int, tag: str) -> list[Out]:
    """``users`` users (alternating plans) sending ``events`` events of 0.10 USD each, through
    the real cap engine, one event at a time; what it emits, in order."""
    engine = CapEngine(load_plans(plans))
    now = datetime.now(UTC).replace(microsecond=0)
    out: list[Out] = []
    for u in range(users):
        plan = ("capped", "downgraded")[u % 2]
        user = f"{tag}-user-{u}.{plan}"  # a dot in the id: webhook-ids must escape it
        sub = Subscription(
            user_id=user,
            org_id=f"org-{u % 3}",
            billing_anchor=now - timedelta(days=3),
            plans=[PlanPeriod(plan_id=plan, effective_at=now - timedelta(days=3))],
        )
        state = engine.new_state(user, sub.org_id)
        t0 = now - timedelta(minutes=30)
        for i in range(events):
            event = CapEvent(
                event_id=f"{user}-e{i}",
                user_id=user,
                occurred_at=t0 + timedelta(seconds=i),
                cost=Decimal("0.10"),
                tokens=40_000,
                served_model="gpt-4o",
            )
            effects: Effects = engine.apply(state, sub, event, datetime.now(UTC))
            out += [Out("alerts", user.encode(), dict(a)) for a in effects.alerts]
            out += [Out("enforcement", user.encode(), dict(e)) for e in effects.enforcement]
    return out


def produce(settings: Settings, records: list[Out]) -> dict[str, float]:
    """Publish ``records`` (acks=all); identity -> when the broker's acknowledgement came."""
    producer = Producer({**settings.kafka.confluent_config(), "acks": "all", "linger.ms": 1})
    topics = {"alerts": settings.topics.alerts, "enforcement": settings.topics.enforcement}
    acked: dict[str, float] = {}
    for r in records:

        def on_delivery(err: Any, msg: Any, identity: str = r.identity) -> None:
            assert err is None, err
            acked[identity] = time.time()

        producer.produce(topics[r.role], orjson.dumps(r.record), key=r.key, on_delivery=on_delivery)
        producer.poll(0)
    assert producer.flush(30) == 0
    assert len(acked) == len(records)
    return acked


# -- a receiver ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Got:
    at: float
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def identity(self) -> str:
        return unquote(self.headers["webhook-id"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Receiver:
    """An HTTP server on a fixed 127.0.0.1 port that can be down, up, slow or failing.

    ``respond(headers, body) -> (status, delay_s)`` decides each answer; every request that
    reached it is kept, whatever the answer.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.respond: Callable[[dict[str, str], bytes], tuple[int, float]] = lambda h, b: (204, 0)
        self.got: list[Got] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/{self.name}"

    def up(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, delay = receiver.respond(headers, body)
                at = time.time()
                if delay:
                    time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                finally:
                    with receiver._lock:
                        receiver.got.append(Got(at, headers, body, status))

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def acknowledged(self) -> dict[str, list[Got]]:
        """identity -> the 2xx answers it got."""
        out: dict[str, list[Got]] = {}
        with self._lock:
            for got in self.got:
                if 200 <= got.status < 300:
                    out.setdefault(got.identity, []).append(got)
        return out

    def requests(self) -> list[Got]:
        with self._lock:
            return list(self.got)


def check_by_hand(got: Got) -> None:
    """The Standard Webhooks checks, written out: signature over "{id}.{timestamp}.{body}",
    a timestamp close to the receipt, JSON body {type, timestamp, data}."""
    msg_id, stamp = got.headers["webhook-id"], got.headers["webhook-timestamp"]
    assert "." not in msg_id
    signed = f"{msg_id}.{stamp}.".encode() + got.body
    expected = "v1," + base64.b64encode(hmac.new(KEY, signed, hashlib.sha256).digest()).decode()
    assert expected in got.headers["webhook-signature"].split(), got.headers
    assert abs(int(stamp) - got.at) <= 5
    assert got.headers["content-type"] == "application/json"
    assert set(orjson.loads(got.body)) == {"type", "timestamp", "data"}


def check_exactly(receiver: Receiver, expected: list[Out]) -> int:
    """Every expected notification acknowledged, each with its record as data, repeats only
    under the same id with the same bytes; returns the number of repeats."""
    by_identity = {r.identity: r for r in expected}
    assert len(by_identity) == len(expected)  # the scenario's identities are distinct
    acked = receiver.acknowledged()
    missing = sorted(set(by_identity) - set(acked))
    assert not missing, f"{receiver.name}: {len(missing)} never acknowledged, e.g. {missing[:3]}"
    unexpected = sorted(set(acked) - set(by_identity))
    assert not unexpected, f"{receiver.name}: not routed there: {unexpected[:3]}"
    for got in receiver.requests():
        check_by_hand(got)
        bodies = {g.body for g in receiver.requests() if g.identity == got.identity}
        assert len(bodies) == 1, f"{got.identity} was sent with different bodies"
        record = by_identity[got.identity]
        assert orjson.loads(got.body)["data"] == record.record
        assert orjson.loads(got.body)["type"] == record.type
    return sum(len(v) - 1 for v in acked.values())


def wait_until(what: str, condition: Callable[[], bool], timeout_s: float, why: Any = "") -> float:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what} {why() if callable(why) else why}")
        time.sleep(0.05)
    return time.monotonic()


# -- notify in this process ---------------------------------------------------------------------


class NotifyThread:
    """The notify service in a thread of this process (graceful stop)."""

    def __init__(self, settings: Settings) -> None:
        from spendstream.notify.service import NotifyService

        self.service = NotifyService(settings)
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.service.started.wait(60), "notify did not start"
        wait_until(
            "every endpoint's partitions",
            lambda: all(r.stats.assigned for r in self.service.runners.values()),
            60,
        )

    def _run(self) -> None:
        try:
            self.service.run(self.stop_event)
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(60)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


def read_all(settings: Settings, topic: str, count: int, timeout_s: float) -> list[dict[str, Any]]:
    """At least ``count`` records of ``topic`` from the start (fails after ``timeout_s``)."""
    conf = settings.kafka.confluent_config()
    consumer = Consumer(
        {**conf, "group.id": f"test-{uuid.uuid4().hex}", "enable.auto.commit": False}
    )
    try:
        parts = consumer.list_topics(topic, timeout=30).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < count and time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.5):
                assert msg.error() is None, msg.error()
                out.append(orjson.loads(msg.value()))
        return out
    finally:
        consumer.close()


def lag(settings: Settings, endpoint: str) -> int:
    t = settings.topics
    group = f"{settings.notify.group_id}.{endpoint}"
    return sum(
        group_lag(settings.kafka.confluent_config(), group, [t.alerts, t.enforcement]).values()
    )


@pytest.fixture
def plans_file(tmp_path: Path) -> Path:
    path = tmp_path / "plans.yaml"
    path.write_text(PLANS_YAML)
    return path


def notify_settings(make_settings: Any, plans: Path, **notify: Any) -> Settings:
    prefix = make_settings.prefix
    base = {
        "group_id": f"{prefix}-notify",
        "signing_secret": SECRET,
        "retry_initial_s": 0.05,
        "retry_max_s": 0.5,
        "commit_interval_s": 0.2,
        "shutdown_grace_s": 5,
        "session_timeout_s": 6,
    }
    settings: Settings = make_settings(
        plans_file=plans,
        topics={"notify_dlq": f"{prefix}.usage.notify.dlq"},
        notify={**base, **notify},
    )
    ensure_topics(settings)
    t = settings.topics
    create_topics(settings.kafka.confluent_config(), [t.notify_dlq], t.partitions)
    return settings


def _quantiles(values: list[float]) -> str:
    ordered = sorted(values)

    def ms(q: float) -> str:
        return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000:.0f} ms"

    return f"p50 {ms(0.5)}, p99 {ms(0.99)}, max {ms(1.0)}"


# -- the tests ----------------------------------------------------------------------------------


def test_a_receiver_down_then_up_then_slow_gets_every_notification_once_per_id(
    make_settings: Any, plans_file: Path
) -> None:
    ops = Receiver("ops")
    settings = notify_settings(
        make_settings,
        plans_file,
        endpoints=[{"name": "ops", "url": ops.url, "timeout_s": 0.5, "concurrency": 2}],
        routes=[{"kinds": ["alert", "enforcement"], "endpoints": ["ops"]}],
        max_attempts=100,  # down for a while: retried, never given up
    )
    records = caps_scenario(plans_file, users=8, events=14, tag=make_settings.prefix)
    kinds = {r.type for r in records}
    assert kinds == {"alert.threshold", "alert.break_even", "enforcement.changed"}, kinds
    half = len(records) // 2
    notify = NotifyThread(settings)
    from spendstream import metrics

    server = metrics.serve(0, notify.service.health, host="127.0.0.1")
    try:
        # Down: connection refused. Nothing is delivered, nothing committed, attempts go on.
        produce(settings, records[:half])
        runner = notify.service.runners["ops"]
        wait_until("retries while down", lambda: runner.stats.retried >= 10, 60)
        assert ops.requests() == [] and runner.stats.delivered == 0
        assert lag(settings, "ops") == half
        health = orjson.loads(_get(server.url + "/health"))
        assert health["ok"] is True  # a receiver that is down does not make notify unhealthy
        assert health["details"]["endpoints"]["ops"]["failing_since"] is not None

        # Up: everything held back arrives.
        ops.up()
        wait_until("the first half", lambda: len(ops.acknowledged()) == half, 60)

        # Slow: the first answers come after the 0.5 s timeout (the receiver saw the request,
        # notify did not see the answer: it sends again, same id), then 0.2 s each.
        slow_left = [4]

        def slow(headers: dict[str, str], body: bytes) -> tuple[int, float]:
            if slow_left[0] > 0:
                slow_left[0] -= 1
                return 204, 0.8
            return 204, 0.2

        ops.respond = slow
        produced_at = produce(settings, records[half:])
        wait_until("every notification", lambda: len(ops.acknowledged()) == len(records), 120)
        wait_until("offsets committed", lambda: lag(settings, "ops") == 0, 30)
        repeats = check_exactly(ops, records)
        assert repeats >= 1  # the timed-out ones came twice, under their one id
        late = [
            min(g.at for g in gots) - produced_at[identity]
            for identity, gots in ops.acknowledged().items()
            if identity in produced_at
        ]
        print(
            f"\n{len(records)} notifications ({half} while down), {repeats} repeated under the "
            f"same id; slow phase (0.2 s an answer, 2 in flight), acknowledged by Kafka -> "
            f"first receipt: {_quantiles(late)}"
        )
        text = _get(server.url + "/metrics").decode()
        assert 'spendstream_notify_delivered_total{endpoint="ops",kind="enforcement"}' in text
        assert "spendstream_notify_delivery_seconds_bucket" in text
        assert runner.stats.delivered >= len(records) and runner.stats.dead_lettered == 0
    finally:
        server.close()
        notify.stop()
        ops.down()


def _get(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
        return body


def test_failing_endpoints_dead_letter_with_the_reason_and_do_not_hold_back_another(
    make_settings: Any, plans_file: Path
) -> None:
    good, picky, gone = Receiver("good"), Receiver("picky"), Receiver("gone")
    good.up()
    picky.up()  # refuses alerts (400), fails on enforcement (503); gone stays down

    def picky_answer(headers: dict[str, str], body: bytes) -> tuple[int, float]:
        return (400 if orjson.loads(body)["type"].startswith("alert.") else 503), 0.0

    picky.respond = picky_answer
    settings = notify_settings(
        make_settings,
        plans_file,
        endpoints=[
            {"name": "good", "url": good.url},
            {"name": "picky", "url": picky.url},
            {"name": "gone", "url": gone.url, "timeout_s": 1},
        ],
        routes=[{"endpoints": ["good", "picky", "gone"]}],
        max_attempts=3,
        retry_initial_s=0.2,
        retry_max_s=0.4,
    )
    records = caps_scenario(plans_file, users=6, events=14, tag=make_settings.prefix)
    notify = NotifyThread(settings)
    try:
        produced_at = produce(settings, records)
        wait_until("good to get everything", lambda: len(good.acknowledged()) == len(records), 60)
        late = [min(g.at for g in v) - produced_at[k] for k, v in good.acknowledged().items()]
        print(f"\ngood endpoint, acknowledged by Kafka -> receipt: {_quantiles(late)}")
        gone_runner = notify.service.runners["gone"]
        # The others are still retrying: they did not hold the good endpoint back.
        assert gone_runner.stats.dead_lettered < len(records) / 2, gone_runner.stats
        letters = read_all(settings, settings.topics.notify_dlq, 2 * len(records), 180)
        for endpoint in ("good", "picky", "gone"):
            wait_until(f"{endpoint} committed", lambda e=endpoint: lag(settings, e) == 0, 30)
    finally:
        notify.stop()
        for r in (good, picky, gone):
            r.down()

    assert check_exactly(good, records) == 0
    assert len(letters) == 2 * len(records), len(letters)
    by_identity = {r.identity: r for r in records}
    seen: set[tuple[str, str]] = set()
    for letter in letters:
        identity = unquote(letter["webhook_id"])
        record = by_identity[identity]
        seen.add((letter["endpoint"], identity))
        assert letter["payload"]["data"] == record.record
        assert letter["type"] == record.type
        assert letter["source_topic"] == getattr(settings.topics, record.role)
        if letter["endpoint"] == "picky" and record.role == "alerts":
            assert (letter["status"], letter["attempts"]) == (400, 1)
            assert letter["reason"] == "HTTP 400 Bad Request: refused by the endpoint, not retried"
        elif letter["endpoint"] == "picky":
            assert (letter["status"], letter["attempts"]) == (503, 3)
            assert letter["reason"] == (
                "retries exhausted after 3 attempts; last: HTTP 503 Service Unavailable"
            )
        else:
            assert (letter["endpoint"], letter["status"], letter["attempts"]) == ("gone", None, 3)
            assert letter["reason"].startswith("retries exhausted after 3 attempts; last: ")
            assert "Connect" in letter["reason"] and "/hooks" not in letter["reason"]
    assert seen == {(e, r.identity) for e in ("picky", "gone") for r in records}
    # What picky saw: each alert once (refused at once), each enforcement change three times.
    attempts: dict[str, int] = {}
    for got in picky.requests():
        check_by_hand(got)
        attempts[got.identity] = attempts.get(got.identity, 0) + 1
    assert attempts == {r.identity: 1 if r.role == "alerts" else 3 for r in records}


class NotifyProcess:
    """``python -m spendstream notify`` as a child process (for SIGKILL and SIGTERM)."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.env = {**os.environ, **settings.to_env()}
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = (self.log_dir / f"notify-{self.starts}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "spendstream", "notify"],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def signal(self, signum: int) -> int:
        assert self.proc is not None
        self.proc.send_signal(signum)
        return self.proc.wait(60)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def log_tail(self) -> str:
        path = self.log_dir / f"notify-{self.starts}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def test_a_restart_mid_stream_loses_nothing_and_a_graceful_one_repeats_nothing(
    make_settings: Any, plans_file: Path, tmp_path: Path
) -> None:
    hooks = Receiver("hooks")
    hooks.up()
    hooks.respond = lambda headers, body: (204, 0.02)
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        f"endpoints:\n  - {{name: hooks, url: '{hooks.url}'}}\n"
        "routes:\n  - {kinds: [alert, enforcement], endpoints: [hooks]}\n"
    )
    settings = notify_settings(make_settings, plans_file, routes_file=routes, max_attempts=50)
    records = caps_scenario(plans_file, users=30, events=14, tag=make_settings.prefix)
    first, second = records[: len(records) // 2], records[len(records) // 2 :]
    notify = NotifyProcess(settings, tmp_path)
    try:
        # SIGKILL a third of the way: no drain, no commit, no leave-group.
        notify.start()
        produce(settings, first)
        wait_until(
            "a third", lambda: len(hooks.acknowledged()) >= len(first) // 3, 90, notify.log_tail
        )
        notify.kill()
        killed_at = len(hooks.acknowledged())
        assert killed_at < len(first), "too late: everything was delivered before the kill"
        notify.start()
        wait_until("the rest", lambda: len(hooks.acknowledged()) == len(first), 90, notify.log_tail)
        wait_until("committed", lambda: lag(settings, "hooks") == 0, 30, notify.log_tail)
        repeats_after_kill = check_exactly(hooks, first)

        # SIGTERM a third of the way: the queue drains, offsets are committed, exit 0.
        before = len(hooks.requests())
        produce(settings, second)
        wait_until(
            "a third more",
            lambda: len(hooks.acknowledged()) >= len(first) + len(second) // 3,
            90,
            notify.log_tail,
        )
        assert notify.signal(signal.SIGTERM) == 0, notify.log_tail()
        notify.start()
        wait_until("all", lambda: len(hooks.acknowledged()) == len(records), 90, notify.log_tail)
        wait_until("committed again", lambda: lag(settings, "hooks") == 0, 30, notify.log_tail)
        notify.signal(signal.SIGTERM)
    finally:
        notify.kill()
        hooks.down()
    check_exactly(hooks, records)
    after_term = [g.identity for g in hooks.requests()[before:]]
    assert len(after_term) == len(set(after_term)) == len(second)  # not one repeat
    print(
        f"\n{len(records)} notifications; SIGKILL after {killed_at}: {repeats_after_kill} sent "
        "again (acknowledged, not yet committed); SIGTERM: 0 sent again"
    )
    assert repeats_after_kill <= 40  # a commit interval's worth at most, not everything


def test_a_second_notify_joining_mid_stream_takes_partitions_and_loses_nothing(
    make_settings: Any, plans_file: Path
) -> None:
    hooks = Receiver("hooks")
    hooks.up()
    hooks.respond = lambda headers, body: (204, 0.01)
    settings = notify_settings(
        make_settings,
        plans_file,
        endpoints=[{"name": "hooks", "url": hooks.url}],
        routes=[{"endpoints": ["hooks"]}],
    )
    records = caps_scenario(plans_file, users=30, events=14, tag=make_settings.prefix)
    first = NotifyThread(settings)
    second: NotifyThread | None = None
    try:
        produce(settings, records)
        wait_until("a quarter", lambda: len(hooks.acknowledged()) >= len(records) // 4, 60)
        second = NotifyThread(settings)  # the group rebalances: the first gives partitions up
        wait_until("all", lambda: len(hooks.acknowledged()) == len(records), 90)
        wait_until("committed", lambda: lag(settings, "hooks") == 0, 30)
        one, two = (n.service.runners["hooks"].stats for n in (first, second))
        assert one.assigned and two.assigned and one.assigned + two.assigned == 12
    finally:
        first.stop()
        if second is not None:
            second.stop()
        hooks.down()
    repeats = check_exactly(hooks, records)
    print(f"\n{len(records)} notifications across a rebalance, {repeats} sent again")


def test_an_idle_notify_delivers_a_record_within_milliseconds(
    make_settings: Any, plans_file: Path
) -> None:
    """One record at a time: from the broker's acknowledgement of the record to its receipt."""
    hooks = Receiver("hooks")
    hooks.up()
    settings = notify_settings(
        make_settings,
        plans_file,
        endpoints=[{"name": "hooks", "url": hooks.url}],
        routes=[{"endpoints": ["hooks"]}],
    )
    records = caps_scenario(plans_file, users=4, events=14, tag=make_settings.prefix)[:25]
    notify = NotifyThread(settings)
    late: list[float] = []
    try:
        for record in records:
            acked_at = produce(settings, [record])[record.identity]
            wait_until("the record", lambda r=record: r.identity in hooks.acknowledged(), 30)
            late.append(min(g.at for g in hooks.acknowledged()[record.identity]) - acked_at)
            time.sleep(0.2)  # idle again
    finally:
        notify.stop()
        hooks.down()
    check_exactly(hooks, records)
    print(f"\nidle notify, acknowledged by Kafka -> receipt: {_quantiles(late)}")
    assert sorted(late)[len(late) // 2] < 0.5  # loose: the machine is shared; typical is ~5 ms
