"""A record can fail, the batch goes on: bisection around records whose processing raises."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import PlanPeriod, Subscription
from schemas.plans import SAMPLE_PLANS, load_plans
from stream_processors import CapEngine, DictState, InRecord, PriceCatalog, UsageProcessor
from stream_processors._isolation import StageError, run_isolated
from stream_processors._pipeline import BatchPipeline
from stream_processors.caps import CapStage

pytestmark = pytest.mark.unit

T0 = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
NOW = T0 + timedelta(hours=1)
CATALOG = PriceCatalog.load()
PLANS = load_plans(SAMPLE_PLANS)


# -- run_isolated on plain values: a table of cases ------------------------------------------


class Ledger:
    """A revertible list: what the attempts appended, undone on rollback."""

    def __init__(self) -> None:
        self.items: list[int] = []
        self._at = 0

    def savepoint(self) -> None:
        self._at = len(self.items)

    def rollback(self) -> None:
        del self.items[self._at :]


def _run(values: list[int], bad: set[int]) -> tuple[Ledger, Any]:
    ledger = Ledger()

    def attempt(chunk: Sequence[int]) -> list[int]:
        for v in chunk:
            ledger.items.append(v)  # written before the failure: must be rolled back
            if v in bad:
                raise ValueError(f"bad {v}")
        return list(chunk)

    return ledger, run_isolated(values, attempt, [ledger])


CASES = [
    ("no poison", list(range(8)), set()),
    ("first", list(range(8)), {0}),
    ("last", list(range(8)), {7}),
    ("middle", list(range(9)), {4}),
    ("two apart", list(range(16)), {3, 12}),
    ("neighbours", list(range(16)), {5, 6}),
    ("all", list(range(5)), {0, 1, 2, 3, 4}),
    ("single good", [1], set()),
    ("single bad", [1], {1}),
    ("empty", [], set()),
]


@pytest.mark.parametrize(("values", "bad"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_poison_is_isolated_and_the_rest_processed_in_order(
    values: list[int], bad: set[int]
) -> None:
    ledger, out = _run(values, bad)
    good = [v for v in values if v not in bad]
    assert [v for chunk in out.results for v in chunk] == good
    assert ledger.items == good  # nothing of a failed attempt stays
    assert [p.record for p in out.poison] == [v for v in values if v in bad]
    assert all(isinstance(p.error, ValueError) and p.stage == "worker" for p in out.poison)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1)))))
def test_any_poison_pattern(case: tuple[int, set[int]]) -> None:
    n, bad = case
    ledger, out = _run(list(range(n)), bad)
    assert ledger.items == [v for v in range(n) if v not in bad]
    assert sorted(p.record for p in out.poison) == sorted(bad)
    if len(bad) == 1:  # one bad record costs about 2 * log2(n) attempts, not n
        assert out.attempts <= 2 * n.bit_length() + 1


def test_systemic_errors_are_not_blamed_on_a_record() -> None:
    def attempt(chunk: Sequence[int]) -> None:
        raise MemoryError

    with pytest.raises(MemoryError):
        run_isolated([1, 2, 3], attempt, [])


def test_the_stage_is_named() -> None:
    def attempt(chunk: Sequence[int]) -> None:
        raise StageError("caps", KeyError("x"))

    out = run_isolated([1], attempt, [])
    assert (out.poison[0].stage, type(out.poison[0].error)) == ("caps", KeyError)


# -- the worker's pipeline with a fault injected in one record ---------------------------------


class FaultyCatalog(PriceCatalog):
    """The real catalog, but pricing the model ``boom`` raises (a stand-in for a bug)."""

    def __init__(self) -> None:
        super().__init__(CATALOG._prices, CATALOG.fallback)

    def quote(self, event: Any) -> Any:
        if event.requested_model == "boom":
            raise ZeroDivisionError("a bug met by this record")
        return super().quote(event)


def _sub(user: str) -> Subscription:
    return Subscription(
        user_id=user,
        org_id="o",
        billing_anchor=T0 - timedelta(days=3),
        plans=[PlanPeriod(plan_id="pro", effective_at=T0 - timedelta(days=3))],
    )


SUBS = {f"u{i}": _sub(f"u{i}") for i in range(5)}


def _lookup(user: str) -> Subscription | None:
    return SUBS.get(user) or (_sub(user) if user.startswith("u") else None)


def _caps_lookup(user: str) -> Subscription | None:
    if user == "u-caps-bug":  # the caps stage meets a bug on this user's events
        raise RuntimeError("subscription lookup failed for this user")
    return _lookup(user)


def _pipeline(catalog: PriceCatalog) -> tuple[BatchPipeline, list[DictState]]:
    states = [DictState() for _ in range(4)]
    seen, windows, marks, caps_state = states
    processor = UsageProcessor(
        catalog, _lookup, seen=seen, windows=windows, marks=marks, grace_s=120
    )
    caps = CapStage(CapEngine(PLANS, grace_s=120), _caps_lookup, caps_state)
    return BatchPipeline(processor, caps, states), states


def _event(i: int, user: str, model: str = "gpt-4o") -> bytes:
    return orjson.dumps(
        {
            "event_id": f"e{i}",
            "occurred_at": (T0 + timedelta(seconds=i)).isoformat(),
            "org_id": "o",
            "user_id": user,
            "gateway": "gw",
            "requested_model": model,
            "input_tokens": 1000 + i,
            "output_tokens": 100,
        }
    )


def _records(values: list[bytes]) -> list[InRecord]:
    return [InRecord("usage.events", 0, i, b"k", v) for i, v in enumerate(values)]


def _final_rollups(rollups: list[tuple[str, bytes]]) -> dict[Any, dict[str, Any]]:
    best: dict[Any, dict[str, Any]] = {}
    for _, raw in rollups:
        r = orjson.loads(raw)
        key = (r["user_id"], r["served_model"], r["window_start"], r["segment"])
        if key not in best or r["version"] > best[key]["version"]:
            best[key] = {k: v for k, v in r.items() if k != "updated_at"}
    return best


@pytest.mark.parametrize(
    ("poison", "stage"),
    [(_event(500, "u1", model="boom"), "price"), (_event(501, "u-caps-bug"), "caps")],
    ids=["pricing raises", "caps raises"],
)
def test_a_raising_record_is_a_dead_letter_and_the_rest_counts_as_without_it(
    poison: bytes, stage: str
) -> None:
    clean = [_event(i, f"u{i % 5}") for i in range(40)]
    dirty = [*clean[:17], poison, *clean[17:]]

    reference, ref_states = _pipeline(FaultyCatalog())
    expected = reference.run(_records(clean), NOW)
    pipeline, states = _pipeline(FaultyCatalog())
    # The offsets differ by one after the poison; compare what they produce, not offsets.
    got = pipeline.run(_records(dirty), NOW)

    assert len(got.poison) == 1 and got.poison[0].stage == stage
    letters = [orjson.loads(v) for _, v, _ in got.result.dead]
    assert [(d["stage"], d["source_offset"]) for d in letters] == [(stage, 17)]
    assert "raised" in letters[0]["reason"]
    assert [k for k, _ in got.result.priced] == [k for k, _ in expected.result.priced]
    priced = [orjson.loads(v)["event_id"] for _, v in got.result.priced]
    assert priced == [f"e{i}" for i in range(40)]
    got_rollups = _final_rollups(got.result.rollups)
    assert {k: v["requests"] for k, v in got_rollups.items()} == {
        k: v["requests"] for k, v in _final_rollups(expected.result.rollups).items()
    }
    assert {k: v["cost"] for k, v in got_rollups.items()} == {
        k: v["cost"] for k, v in _final_rollups(expected.result.rollups).items()
    }
    # The poison left no trace in state: its id is not seen, so a fixed worker could take it.
    assert states[0].get(orjson.loads(poison)["event_id"]) is None
    assert set(states[0].data) == set(ref_states[0].data)
    caps_users = {k for k in states[3].data}
    assert caps_users == set(ref_states[3].data)
    assert got.result.counters["poison"] == 1


def test_a_batch_without_poison_is_one_attempt() -> None:
    pipeline, _ = _pipeline(FaultyCatalog())
    out = pipeline.run(_records([_event(i, "u1") for i in range(10)]), NOW)
    assert not out.poison and out.result.counters["isolation_attempts"] == 0
    assert len(out.result.priced) == 10
