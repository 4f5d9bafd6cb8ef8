"""The traffic simulator: deterministic, realistic, and honest about its fractions."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from schemas import UsageEvent, decode_event, event_from_obj
from spendstream.errors import InvalidEventError
from spendstream.simulate import (
    MALFORMED_KINDS,
    MODEL_MIX,
    PROVIDERS,
    ROUTES,
    Simulator,
    malformed_payload,
    malformed_payloads,
)

pytestmark = pytest.mark.unit

PRICE_MAP = Path(__file__).resolve().parents[2] / "stream_processors/data/litellm_model_prices.json"
START = datetime(2025, 6, 2, tzinfo=UTC)


def _take(sim: Simulator, n: int) -> list[Any]:
    return list(itertools.islice(sim.stream(), n))


def test_same_seed_same_stream() -> None:
    kw: dict[str, Any] = {"out_of_order": 0.1, "duplicates": 0.05, "malformed": 0.02}
    a = _take(Simulator(300, seed=11, start=START, **kw), 3000)
    b = _take(Simulator(300, seed=11, start=START, **kw), 3000)
    assert a == b
    assert Simulator(300, seed=11).subscriptions() == Simulator(300, seed=11).subscriptions()
    c = _take(Simulator(300, seed=12, start=START, **kw), 3000)
    assert a != c


def test_events_are_valid_with_unique_ids_and_offsets() -> None:
    events = list(itertools.islice(Simulator(200, seed=1, start=START).events(), 20_000))
    parsed = [event_from_obj(e) for e in events]
    assert len({e.event_id for e in parsed}) == len(parsed)
    assert all(e["occurred_at"][-6] in "+-" for e in events)  # RFC 3339 with offset
    assert all(isinstance(e, UsageEvent) for e in parsed)


def test_tier_spread() -> None:
    plans = Counter(u.plan_id for u in Simulator(10_000, seed=3).users)
    assert set(plans) == {"free", "pro", "team", "enterprise"}
    for plan, share in (("free", 0.60), ("pro", 0.30), ("team", 0.08), ("enterprise", 0.02)):
        assert abs(plans[plan] / 10_000 - share) < 0.02, plans


def test_subscriptions_cover_every_user() -> None:
    sim = Simulator(500, seed=5, start=START)
    subs = sim.subscriptions()
    assert [s.user_id for s in subs] == [u.user_id for u in sim.users]
    for sub, user in zip(subs, sim.users, strict=True):
        assert sub.org_id == user.org_id
        assert sub.plan_at(datetime(2025, 12, 1, tzinfo=UTC)) == user.plan_id
        assert sub.billing_anchor <= START
    assert any(len(s.plans) > 1 for s in subs)  # a few upgrades mid-stream


def test_heavy_tail_few_users_carry_most_tokens() -> None:
    sim = Simulator(1000, seed=2, start=START)
    tokens: Counter[str] = Counter()
    for e in itertools.islice(sim.events(), 50_000):
        tokens[e["user_id"]] += e["input_tokens"] + e["output_tokens"]
    ranked = sorted(tokens.values(), reverse=True)
    top_decile = sum(ranked[: len(sim.users) // 10])
    assert top_decile / sum(ranked) > 0.4
    median = ranked[len(ranked) // 2]
    assert ranked[0] > 20 * median


def test_models_exist_in_the_price_map() -> None:
    prices = json.loads(PRICE_MAP.read_text(encoding="utf-8"))
    names = set(PROVIDERS) | set(ROUTES.values())
    names |= {m for mix in MODEL_MIX.values() for m, _ in mix}
    for name in names:
        assert name in prices, name
        assert prices[name]["input_cost_per_token"] > 0


def test_traffic_has_every_lever() -> None:
    events = list(itertools.islice(Simulator(300, seed=4, start=START).events(), 20_000))
    routed = [
        e for e in events if e.get("served_model", e["requested_model"]) != e["requested_model"]
    ]
    assert 0.03 < len(routed) / len(events) < 0.2
    assert all(ROUTES[e["requested_model"]] == e["served_model"] for e in routed)
    assert any(e["cached_input_tokens"] > 0 for e in events)
    assert any(e["cache_write_tokens"] > 0 for e in events)
    semantic = sum(e["semantic_cache_hit"] for e in events) / len(events)
    assert 0.03 < semantic < 0.07
    reasoning = [e for e in events if e["reasoning_tokens"] > 0]
    assert reasoning
    served = {e.get("served_model", e["requested_model"]) for e in reasoning}
    assert "o3-mini" in served and served <= {"o3-mini", "gemini-2.5-flash", "claude-sonnet-4-5"}
    assert len({e["requested_model"] for e in events}) >= 6


def test_daily_rhythm() -> None:
    sim = Simulator(100, seed=6, start=START, rate=1.0)
    hours: Counter[int] = Counter()
    for item in itertools.islice(sim.stream(), 86_400 * 2):
        hours[item.emitted_at.hour] += 1
    assert hours[14] > 2.5 * hours[2]


@pytest.mark.parametrize("field", ["out_of_order", "duplicates", "malformed"])
def test_fractions(field: str) -> None:
    sim = Simulator(200, seed=8, start=START, **{field: 0.1})
    items = _take(sim, 20_000)
    kind = {"out_of_order": "late", "duplicates": "duplicate", "malformed": "malformed"}[field]
    share = sum(i.kind == kind for i in items) / len(items)
    assert 0.08 < share < 0.12
    assert {i.kind for i in items} == {"event", kind}


def test_late_duplicate_and_malformed_items_are_what_they_say() -> None:
    sim = Simulator(100, seed=9, start=START, out_of_order=0.1, duplicates=0.1, malformed=0.1)
    seen: dict[str, dict[str, Any]] = {}
    emitted = []
    for item in _take(sim, 5000):
        emitted.append(item.emitted_at)
        if item.kind == "malformed":
            assert isinstance(item.payload, bytes)
            with pytest.raises(InvalidEventError):
                decode_event(item.payload)
            continue
        assert isinstance(item.payload, dict)
        event = event_from_obj(item.payload)
        if item.kind == "duplicate":
            assert seen[event.event_id] == item.payload
        else:
            assert event.event_id not in seen
            seen[event.event_id] = item.payload
        if item.kind == "late":
            assert event.occurred_at < item.emitted_at
        else:
            assert abs((event.occurred_at - item.emitted_at).total_seconds()) < 0.001 or (
                item.kind == "duplicate"
            )
    assert emitted == sorted(emitted)


@pytest.mark.parametrize("kind", MALFORMED_KINDS)
def test_every_malformed_kind_is_rejected(kind: str) -> None:
    import random

    with pytest.raises(InvalidEventError):
        decode_event(malformed_payload(kind, random.Random(1)))


def test_malformed_payloads_cycle_kinds() -> None:
    payloads = malformed_payloads(25, seed=3)
    assert {k for k, _ in payloads} == set(MALFORMED_KINDS)
    assert payloads == malformed_payloads(25, seed=3)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="fraction"):
        Simulator(10, duplicates=1.5)
    with pytest.raises(ValueError, match="offset"):
        Simulator(10, start=datetime(2025, 1, 1))
    with pytest.raises(ValueError):
        Simulator(0)


def test_dry_run_is_deterministic(tmp_path: Path) -> None:
    from spendstream.cli import app

    args = ["simulate", "--users", "50", "--duration", "30", "--rate", "20", "--seed", "3"]
    args += ["--malformed", "0.05", "--duplicates", "0.05", "--start", "2025-06-02T00:00:00Z"]
    runner = CliRunner()
    outs = []
    for name in ("a.jsonl", "b.jsonl"):
        result = runner.invoke(app, [*args, "--dry-run", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1]
    lines = outs[0].splitlines()
    assert 200 < len(lines) < 1000  # ~20/s for 30 s, slowed by the daily rhythm at midnight
    assert len(decode_errors(lines)) > 0


def decode_errors(lines: list[bytes]) -> list[int]:
    bad = []
    for number, line in enumerate(lines, 1):
        try:
            decode_event(line)
        except InvalidEventError:
            bad.append(number)
    return bad
