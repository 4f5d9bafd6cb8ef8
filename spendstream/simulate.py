"""Deterministic, realistic gateway traffic for demos, tests and benchmarks (pure Python).

A :class:`Simulator` owns a population of users spread over the tiers ``free``, ``pro``,
``team`` and ``enterprise`` with heavy-tailed volumes (a few users carry most of the cost), and
emits one usage event per model call the way a gateway would: real model names from the LiteLLM
price map, routing from an expensive requested model to a cheap served one, prompt-cache reads
and writes, semantic-cache hits, reasoning tokens, a daily rhythm, and, on request, late
(out-of-order) events, re-sent duplicates and malformed payloads. Everything derives from one
``random.Random(seed)``: the same arguments give the same stream, event ids included.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple

import orjson

from schemas import PlanPeriod, Subscription

if TYPE_CHECKING:
    from rich.console import Console

    from spendstream.settings import Settings

DEFAULT_START: Final = datetime(2025, 6, 2, 0, 0, tzinfo=UTC)
"""Start of simulated time when none is given (a Monday), so that runs are reproducible."""

PLAN_MIX: Final[tuple[tuple[str, float], ...]] = (
    ("free", 0.60),
    ("pro", 0.30),
    ("team", 0.08),
    ("enterprise", 0.02),
)
"""Share of users per plan id."""

PLAN_VOLUME: Final[dict[str, float]] = {"free": 0.25, "pro": 1.0, "team": 2.0, "enterprise": 4.0}
"""Mean request volume of a user relative to a ``pro`` user."""

PROVIDERS: Final[dict[str, str]] = {
    "gpt-4o": "openai",
    "gpt-4o-mini": "openai",
    "o3-mini": "openai",
    "claude-sonnet-4-5": "anthropic",
    "claude-haiku-4-5": "anthropic",
    "gemini-2.5-flash": "google",
}
"""Every model the simulator names (all are keys of the LiteLLM price map) and its provider."""

MODEL_MIX: Final[dict[str, tuple[tuple[str, float], ...]]] = {
    "free": (
        ("gpt-4o-mini", 45),
        ("gemini-2.5-flash", 30),
        ("claude-haiku-4-5", 20),
        ("gpt-4o", 5),
    ),
    "pro": (
        ("gpt-4o", 30),
        ("claude-sonnet-4-5", 30),
        ("gpt-4o-mini", 15),
        ("o3-mini", 10),
        ("gemini-2.5-flash", 10),
        ("claude-haiku-4-5", 5),
    ),
    "team": (
        ("claude-sonnet-4-5", 35),
        ("gpt-4o", 25),
        ("o3-mini", 15),
        ("gemini-2.5-flash", 10),
        ("gpt-4o-mini", 10),
        ("claude-haiku-4-5", 5),
    ),
    "enterprise": (
        ("claude-sonnet-4-5", 40),
        ("o3-mini", 20),
        ("gpt-4o", 20),
        ("gemini-2.5-flash", 10),
        ("claude-haiku-4-5", 5),
        ("gpt-4o-mini", 5),
    ),
}
"""Which models the users of a plan ask for, with weights."""

ROUTES: Final[dict[str, str]] = {
    "gpt-4o": "gpt-4o-mini",
    "claude-sonnet-4-5": "claude-haiku-4-5",
    "o3-mini": "gpt-4o-mini",
}
"""Expensive requested model -> the cheap model a router may serve instead."""

REASONING_SHARE: Final[dict[str, float]] = {
    "o3-mini": 1.0,
    "gemini-2.5-flash": 0.4,
    "claude-sonnet-4-5": 0.2,
}
"""Share of calls of a served model that spend reasoning (thinking) tokens."""

GATEWAYS: Final[tuple[tuple[str, timezone], ...]] = (
    ("gw-eu-1", timezone(timedelta(hours=2))),
    ("gw-us-1", timezone(timedelta(hours=-5))),
    ("gw-ap-1", timezone(timedelta(hours=9))),
    ("gw-core", UTC),
)
"""Gateways and the UTC offset each writes its timestamps with (all valid RFC 3339)."""

FEATURES: Final = ("chat", "code", "summarize", "agent", "search")
TIMEZONES: Final = ("UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo")

MALFORMED_KINDS: Final = (
    "not_json",
    "not_utf8",
    "not_object",
    "missing_field",
    "negative_tokens",
    "cached_exceeds_input",
    "reasoning_exceeds_output",
    "naive_timestamp",
    "bool_as_string",
    "bad_status",
)
"""The kinds of broken payload :func:`malformed_payload` makes; each breaks the contract
(docs/DESIGN.md, "The event contract")."""


ItemKind = Literal["event", "late", "duplicate", "malformed"]


class SimItem(NamedTuple):
    """One item a gateway emits: when, what kind, and the payload."""

    emitted_at: datetime
    """When the gateway sends it (UTC, non-decreasing): use it to pace real-time replay."""
    kind: ItemKind
    """``event``; ``late`` (``occurred_at`` before ``emitted_at``); ``duplicate`` (an exact
    re-send of an earlier event); ``malformed`` (bytes that break the contract)."""
    payload: dict[str, Any] | bytes


@dataclass(frozen=True, slots=True)
class SimUser:
    """One simulated user: ids, plan, and relative request volume."""

    user_id: str
    org_id: str
    plan_id: str
    weight: float
    api_key_id: str
    gateway: int


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _rhythm(t: datetime) -> float:
    """Load relative to the daily mean (0.4 at night .. 1.6 at the afternoon peak, UTC)."""
    hours = t.hour + t.minute / 60
    return 1.0 + 0.6 * math.sin(2 * math.pi * (hours - 8) / 24)


def malformed_payload(kind: str, rng: random.Random) -> bytes:
    """One payload of ``kind`` (see :data:`MALFORMED_KINDS`) that the contract must reject."""
    event_id = _uuid(rng)
    base: dict[str, Any] = {
        "event_id": event_id,
        "occurred_at": "2025-06-02T10:00:00.000+02:00",
        "org_id": "org-bad",
        "user_id": f"user-bad-{rng.randrange(1000):03d}",
        "gateway": "gw-eu-1",
        "requested_model": "gpt-4o",
        "input_tokens": 1200,
        "output_tokens": 300,
    }
    if kind == "not_json":
        return b'{"event_id": "' + event_id.encode() + b'", "occurred_at": '
    if kind == "not_utf8":
        return b'{"event_id": "\xff\xfe\xfa"}'
    if kind == "not_object":
        return b'["event", 1, 2]'
    if kind == "missing_field":
        del base[rng.choice(("event_id", "user_id", "occurred_at", "requested_model"))]
    elif kind == "negative_tokens":
        base[rng.choice(("input_tokens", "output_tokens"))] = -rng.randrange(1, 500)
    elif kind == "cached_exceeds_input":
        base["cached_input_tokens"] = 1000
        base["cache_write_tokens"] = 400
    elif kind == "reasoning_exceeds_output":
        base["reasoning_tokens"] = 301
    elif kind == "naive_timestamp":
        base["occurred_at"] = "2025-06-02T10:00:00"
    elif kind == "bool_as_string":
        base["semantic_cache_hit"] = "yes"
    elif kind == "bad_status":
        base["status"] = "timeout"
    else:
        raise ValueError(f"unknown malformed kind {kind!r}; known: {', '.join(MALFORMED_KINDS)}")
    return orjson.dumps(base)


def malformed_payloads(n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """``n`` broken payloads cycling through every kind: ``(kind, bytes)`` pairs."""
    rng = random.Random(seed)
    return [
        (kind, malformed_payload(kind, rng))
        for kind in (MALFORMED_KINDS[i % len(MALFORMED_KINDS)] for i in range(n))
    ]


class Simulator:
    """A seeded population of users and the gateway traffic they cause.

    ``rate`` is the mean number of calls per second of simulated time, averaged over a day;
    the actual rate follows a daily rhythm unless ``rhythm`` is false. ``out_of_order``,
    ``duplicates`` and ``malformed`` are fractions of emitted items: an event dated back by
    30 s to 15 min, an exact re-send of an earlier event, and a payload that breaks the
    contract (only in :meth:`stream` and :meth:`lines`; :meth:`events` yields valid events).
    """

    def __init__(
        self,
        users: int,
        seed: int = 0,
        start: datetime | None = None,
        *,
        rate: float = 50.0,
        out_of_order: float = 0.0,
        duplicates: float = 0.0,
        malformed: float = 0.0,
        rhythm: bool = True,
        route_share: float = 0.15,
        semantic_cache_share: float = 0.05,
        error_share: float = 0.01,
    ) -> None:
        """Create ``users`` users; ``start`` (aware) defaults to :data:`DEFAULT_START`."""
        if users < 1:
            raise ValueError("users must be at least 1")
        if rate <= 0:
            raise ValueError("rate must be positive")
        for name, value in (
            ("out_of_order", out_of_order),
            ("duplicates", duplicates),
            ("malformed", malformed),
            ("route_share", route_share),
            ("semantic_cache_share", semantic_cache_share),
            ("error_share", error_share),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a fraction between 0 and 1, got {value}")
        if start is not None and start.tzinfo is None:
            raise ValueError("start must carry a UTC offset")
        self.seed = seed
        self.start = (start or DEFAULT_START).astimezone(UTC)
        self.rate = rate
        self.out_of_order = out_of_order
        self.duplicates = duplicates
        self.malformed = malformed
        self.rhythm = rhythm
        self.route_share = route_share
        self.semantic_cache_share = semantic_cache_share
        self.error_share = error_share
        self.users: list[SimUser] = self._make_users(users, random.Random(f"users:{seed}"))
        cum = 0.0
        self._cum_weights: list[float] = []
        for user in self.users:
            cum += user.weight
            self._cum_weights.append(cum)

    # -- population -------------------------------------------------------------------------

    def _make_users(self, n: int, rng: random.Random) -> list[SimUser]:
        plans = [p for p, _ in PLAN_MIX]
        shares = [s for _, s in PLAN_MIX]
        result = []
        org_seq = 0
        open_orgs: dict[str, tuple[str, int]] = {}
        seats = {"team": 5, "enterprise": 20}
        for i in range(n):
            plan = rng.choices(plans, weights=shares)[0]
            if plan in seats:
                org, used = open_orgs.get(plan, ("", seats[plan]))
                if used >= seats[plan]:
                    org_seq += 1
                    org, used = f"org-{org_seq:05d}", 0
                open_orgs[plan] = (org, used + 1)
            else:
                org_seq += 1
                org = f"org-{org_seq:05d}"
            # Lognormal volume with sigma 1.5: the top decile carries well over half the load.
            weight = PLAN_VOLUME[plan] * rng.lognormvariate(0.0, 1.5)
            result.append(
                SimUser(
                    user_id=f"user-{i:06d}",
                    org_id=org,
                    plan_id=plan,
                    weight=weight,
                    api_key_id=f"key-{rng.getrandbits(48):012x}",
                    gateway=rng.randrange(len(GATEWAYS)),
                )
            )
        return result

    def subscriptions(self) -> list[Subscription]:
        """One subscription per user; about 3 % upgraded from ``free`` to ``pro`` on day one."""
        rng = random.Random(f"subs:{self.seed}")
        subs = []
        for user in self.users:
            anchor = self.start - timedelta(days=rng.randrange(0, 28), hours=rng.randrange(24))
            periods = [PlanPeriod(plan_id=user.plan_id, effective_at=anchor)]
            if user.plan_id == "pro" and rng.random() < 0.1:
                periods = [
                    PlanPeriod(plan_id="free", effective_at=anchor),
                    PlanPeriod(
                        plan_id="pro",
                        effective_at=self.start + timedelta(minutes=rng.randrange(1, 24 * 60)),
                    ),
                ]
            subs.append(
                Subscription(
                    user_id=user.user_id,
                    org_id=user.org_id,
                    timezone=rng.choice(TIMEZONES),
                    billing_anchor=anchor,
                    plans=periods,
                )
            )
        return subs

    # -- traffic ----------------------------------------------------------------------------

    def stream(self) -> Iterator[SimItem]:
        """Endless items in emission order: events, late events, duplicates, malformed bytes."""
        rng = random.Random(f"traffic:{self.seed}")
        t = self.start
        recent: list[dict[str, Any]] = []
        users, cum = self.users, self._cum_weights
        while True:
            load = _rhythm(t) if self.rhythm else 1.0
            t += timedelta(seconds=rng.expovariate(self.rate * load))
            roll = rng.random()
            if roll < self.malformed:
                kind = MALFORMED_KINDS[rng.randrange(len(MALFORMED_KINDS))]
                yield SimItem(t, "malformed", malformed_payload(kind, rng))
                continue
            if recent and roll < self.malformed + self.duplicates:
                yield SimItem(t, "duplicate", recent[rng.randrange(len(recent))])
                continue
            user = rng.choices(users, cum_weights=cum)[0]
            occurred = t
            late = rng.random() < self.out_of_order
            if late:
                occurred = t - timedelta(seconds=rng.uniform(30, 900))
            event = self._event(rng, user, occurred)
            if self.duplicates:
                if len(recent) >= 256:
                    recent[rng.randrange(256)] = event
                else:
                    recent.append(event)
            yield SimItem(t, "late" if late else "event", event)

    def events(self) -> Iterator[dict[str, Any]]:
        """Endless valid events (JSON-ready dicts), duplicates and late events included."""
        for item in self.stream():
            if isinstance(item.payload, dict):
                yield item.payload

    def lines(self) -> Iterator[bytes]:
        """Endless JSON lines (without newline): events and, if asked for, malformed items."""
        for item in self.stream():
            payload = item.payload
            yield payload if isinstance(payload, bytes) else orjson.dumps(payload)

    def _event(self, rng: random.Random, user: SimUser, occurred: datetime) -> dict[str, Any]:
        models = MODEL_MIX[user.plan_id]
        requested = _pick(rng, models)
        served = requested
        if requested in ROUTES and rng.random() < self.route_share:
            served = ROUTES[requested]
        provider = PROVIDERS[served]
        gateway, tz = GATEWAYS[user.gateway]

        input_tokens = min(int(rng.lognormvariate(7.0, 1.1)) + 20, 400_000)
        output_tokens = min(int(rng.lognormvariate(5.5, 1.0)) + 1, 64_000)
        reasoning = 0
        if rng.random() < REASONING_SHARE.get(served, 0.0):
            reasoning = int(rng.lognormvariate(6.5, 0.9))
            output_tokens += reasoning
        cached, write = _prompt_cache(rng, provider, input_tokens)
        status = "ok"
        semantic = False
        latency = int(250 + output_tokens * rng.uniform(8, 25))
        roll = rng.random()
        if roll < self.error_share:
            status = "error"
            output_tokens = reasoning = 0
            latency = int(rng.uniform(50, 30_000))
        elif roll < self.error_share + self.semantic_cache_share:
            # Answered from the semantic cache: no model call, so no prompt cache either; the
            # tokens are what the call would have used (the pricing turns them into savings).
            semantic = True
            cached = write = 0
            latency = int(rng.uniform(5, 40))

        event: dict[str, Any] = {
            "event_id": _uuid(rng),
            "occurred_at": occurred.astimezone(tz).isoformat(timespec="milliseconds"),
            "org_id": user.org_id,
            "user_id": user.user_id,
            "api_key_id": user.api_key_id,
            "gateway": gateway,
            "request_id": f"req_{rng.getrandbits(64):016x}",
            "provider": provider,
            "requested_model": requested,
            "input_tokens": input_tokens,
            "cached_input_tokens": cached,
            "cache_write_tokens": write,
            "output_tokens": output_tokens,
            "reasoning_tokens": reasoning,
            "semantic_cache_hit": semantic,
            "status": status,
            "latency_ms": latency,
            "feature": FEATURES[rng.randrange(len(FEATURES))],
        }
        if served != requested or rng.random() < 0.7:
            event["served_model"] = served
        if rng.random() < 0.3:
            event["attributes"] = {"client": rng.choice(("web", "api", "ide")), "region": gateway}
        return event


def _pick(rng: random.Random, weighted: Sequence[tuple[str, float]]) -> str:
    return rng.choices([name for name, _ in weighted], weights=[w for _, w in weighted])[0]


def _prompt_cache(rng: random.Random, provider: str, input_tokens: int) -> tuple[int, int]:
    """(cached_input_tokens, cache_write_tokens) as each provider's prompt cache behaves."""
    if provider == "openai":
        # Automatic caching of prefixes of 1024+ tokens, in 128-token increments; no writes.
        if input_tokens >= 1024 and rng.random() < 0.45:
            return int(input_tokens * rng.uniform(0.3, 0.95)) // 128 * 128, 0
        return 0, 0
    if provider == "anthropic":
        cached = write = 0
        if rng.random() < 0.35:
            cached = int(input_tokens * rng.uniform(0.5, 0.95))
        if rng.random() < 0.12:
            write = int((input_tokens - cached) * rng.uniform(0.3, 0.9))
        return cached, write
    if rng.random() < 0.25:
        return int(input_tokens * rng.uniform(0.3, 0.9)), 0
    return 0, 0


def run_simulation(
    settings: Settings,
    sim: Simulator,
    duration_s: float,
    *,
    console: Console | None = None,
) -> dict[str, Any]:
    """Publish ``sim``'s subscriptions, then produce its traffic in real time for ``duration_s``.

    Items are sent when the wall clock reaches their ``emitted_at`` (relative to ``sim.start``),
    so the rate follows the simulator (pass ``rhythm=False`` for a flat rate). Malformed items
    are sent as they are, for the pipeline's dead-letter path. Shows a progress bar with the
    events/s on ``console`` and returns the counts; raises :class:`DeliveryError` if any item
    was not delivered.
    """
    import time
    from collections import Counter

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from producers import UsageProducer, publish_subscriptions

    console = console or Console()
    published = publish_subscriptions(settings, sim.subscriptions())
    console.print(f"published {published} subscriptions to {settings.topics.subscriptions}")

    counts: Counter[str] = Counter()
    progress = Progress(
        TextColumn("[bold]simulate"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f} s"),
        TextColumn("{task.fields[sent]} events"),
        TextColumn("[cyan]{task.fields[rate]:.0f} events/s"),
        TimeElapsedColumn(),
        console=console,
    )
    sent = 0
    with UsageProducer(settings) as producer, progress:
        task = progress.add_task("traffic", total=duration_s, sent=0, rate=0.0)
        t0 = time.monotonic()
        last_update = t0
        for item in sim.stream():
            offset = (item.emitted_at - sim.start).total_seconds()
            if offset >= duration_s:
                break
            ahead = t0 + offset - time.monotonic()
            if ahead > 0.002:
                time.sleep(ahead)
            payload = item.payload
            if isinstance(payload, bytes):
                producer.send_raw(b"malformed", payload)
            else:
                producer.send(payload)
            sent += 1
            counts[item.kind] += 1
            now = time.monotonic()
            if now - last_update >= 0.2:
                last_update = now
                progress.update(
                    task, completed=min(now - t0, duration_s), sent=sent, rate=sent / (now - t0)
                )
        # Wait out the tail of the window so the run lasts ``duration_s`` like it says.
        remaining = t0 + duration_s - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)
        elapsed = time.monotonic() - t0
        progress.update(task, completed=duration_s, sent=sent, rate=sent / max(elapsed, 1e-9))
    stats = producer.stats()
    summary: dict[str, Any] = {
        "subscriptions": published,
        "items": sent,
        **{kind: counts[kind] for kind in ("event", "late", "duplicate", "malformed")},
        "seconds": round(elapsed, 3),
        "per_s": round(sent / max(elapsed, 1e-9), 1),
        "delivered": stats.delivered,
        "failed": stats.failed,
        "topic": settings.topics.events,
    }
    console.print(
        f"produced {sent} items to {settings.topics.events} in {elapsed:.1f} s "
        f"({summary['per_s']:.0f}/s): {counts['event']} events, {counts['late']} late, "
        f"{counts['duplicate']} duplicates, {counts['malformed']} malformed; "
        f"delivered {stats.delivered}, failed {stats.failed}",
        highlight=False,
    )
    return summary
