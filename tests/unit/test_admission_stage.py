"""Admission requests through the worker's pure batch pipeline (no Kafka).

Requests travel on the events topic (docs/DESIGN.md, "Admission (reservations)"): the processor
tells them from usage events by their first bytes, the caps stage decides them in offset order
with the user's usage, and the answers leave on the admissions topic. These cases run whole
batches of raw records, as the worker does.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest

from schemas import (
    AdmissionRequest,
    PlanPeriod,
    ReleaseRequest,
    Subscription,
    encode_request,
    pool_ids,
    reply_partition,
)
from stream_processors import (
    CapEngine,
    DictState,
    InRecord,
    PriceCatalog,
    UsageProcessor,
    parse_plans,
)
from stream_processors._pipeline import BatchOutput, BatchPipeline
from stream_processors.caps import CapStage

pytestmark = pytest.mark.unit

T0 = datetime(2026, 11, 2, 12, 0, tzinfo=UTC)
T0_MS = int(T0.timestamp() * 1000)
PARTITION = 2
CATALOG = PriceCatalog.load()
MODEL = "gpt-4o"
IN, OUT = 2_000, 1_000
PLANS = parse_plans(
    {
        "plans": [
            {
                "id": "capped",
                "monthly_price": "0",
                "windows": [
                    {
                        "name": "monthly",
                        "kind": "billing_month",
                        "unit": "usd",
                        "allowance": "0.10",
                        "at_cap": {"action": "block"},
                    }
                ],
            },
            {
                "id": "roomy",
                "monthly_price": "0",
                "windows": [
                    {
                        "name": "monthly",
                        "kind": "billing_month",
                        "unit": "usd",
                        "allowance": "100",
                        "at_cap": {"action": "block"},
                    }
                ],
            },
        ]
    }
)


def _sub(user: str, plan: str) -> Subscription:
    return Subscription(
        user_id=user,
        org_id="org",
        billing_anchor=datetime(2026, 1, 1, tzinfo=UTC),
        plans=[PlanPeriod(plan_id=plan, effective_at=datetime(2026, 1, 1, tzinfo=UTC))],
    )


SUBS = {"near": _sub("near", "capped"), "far": _sub("far", "roomy")}
ESTIMATE = CATALOG.estimate(MODEL, IN, OUT, T0)  # USD units of one call at most
UNIT = Decimal(10) ** -24


def _pipeline(
    states: list[DictState] | None = None, plans: Any = PLANS, subs: Any = SUBS
) -> tuple[BatchPipeline, list[DictState]]:
    states = states or [DictState() for _ in range(4)]
    processor = UsageProcessor(
        CATALOG, subs.get, seen=states[0], windows=states[1], marks=states[2]
    )
    caps = CapStage(
        CapEngine(plans, reservation_ttl_s=600),
        subs.get,
        states[3],
        estimator=CATALOG.estimate,
        pool_zone=5,
        reply_partitions=6,
    )
    return BatchPipeline(processor, caps, states), states


def _block_at_20_estimates(plan_id: str) -> Any:
    """One plan whose billing month blocks at 20 estimated calls."""
    return parse_plans(
        {
            "plans": [
                {
                    "id": plan_id,
                    "monthly_price": "0",
                    "windows": [
                        {
                            "name": "monthly",
                            "kind": "billing_month",
                            "unit": "usd",
                            "allowance": str(ESTIMATE * UNIT * 20),
                            "at_cap": {"action": "block"},
                        }
                    ],
                }
            ]
        }
    )


def _request(user: str, rid: str, pool: int = 0, gateway: str = "gw-1", org: str = "org") -> bytes:
    return encode_request(
        AdmissionRequest(
            org_id=org,
            user_id=user,
            reservation_id=rid,
            gateway=gateway,
            model=MODEL,
            input_tokens=IN,
            output_tokens=OUT,
            pool=pool,
        )
    )


def _usage(i: int, user: str, rid: str | None, inp: int = IN, out: int = OUT) -> bytes:
    event: dict[str, Any] = {
        "event_id": f"e-{user}-{i}",
        "occurred_at": (T0 + timedelta(seconds=i)).isoformat(),
        "org_id": "org",
        "user_id": user,
        "gateway": "gw",
        "requested_model": MODEL,
        "input_tokens": inp,
        "output_tokens": out,
    }
    if rid is not None:
        event["reservation_id"] = rid
    return orjson.dumps(event)


def _records(values: list[bytes], first_offset: int = 0) -> list[InRecord]:
    return [
        InRecord("usage.events", PARTITION, first_offset + i, b"k", v, T0_MS + i)
        for i, v in enumerate(values)
    ]


def _answers(out: BatchOutput) -> list[dict[str, Any]]:
    return [
        {**orjson.loads(encode), "_key": key, "_partition": p}
        for key, encode, p in out.capped.answers
    ]


def test_the_estimate_is_the_catalog_price_of_the_token_maxima() -> None:
    price = CATALOG.lookup(MODEL)
    assert price is not None
    # gpt-4o: 2.5 USD per million input, 10 USD per million output tokens.
    assert Decimal("0.005") + Decimal("0.010") == ESTIMATE * UNIT


def test_a_burst_is_admitted_up_to_the_cap_and_no_further() -> None:
    pipeline, _ = _pipeline()
    fit = int(Decimal("0.10") / (ESTIMATE * UNIT))  # 6 calls of 0.015 fit in 0.10
    out = pipeline.run(_records([_request("near", f"r{i}") for i in range(20)]), T0)
    answers = _answers(out)
    assert [a["reservation_id"] for a in answers] == [f"r{i}" for i in range(20)]
    assert [a["action"] for a in answers] == ["allow"] * fit + ["block"] * (20 - fit)
    assert {a["reason"] for a in answers[fit:]} == {"cap"}
    assert all(a["retry_after"] is not None for a in answers[fit:])
    assert {(a["_key"], a["_partition"]) for a in answers} == {
        (b"gw-1".decode(), reply_partition("gw-1", 6))
    }
    assert Decimal(answers[0]["cost"]) == ESTIMATE * UNIT
    assert out.result.counters["admission_requests"] == 20
    assert not out.result.priced  # a request is not usage


def test_usage_settles_its_hold_and_earlier_usage_counts_first() -> None:
    pipeline, _ = _pipeline()
    # Two admitted, then their calls' usage (half the estimate each) settles them; in the
    # same batch, later requests see the settled spend and the released holds.
    batch = [
        _request("near", "a"),
        _request("near", "b"),
        _usage(1, "near", "a", IN // 2, OUT // 2),
        _usage(2, "near", "b", IN // 2, OUT // 2),
        *[_request("near", f"c{i}") for i in range(10)],
    ]
    out = pipeline.run(_records(batch), T0 + timedelta(seconds=5))
    actions = [a["action"] for a in _answers(out)]
    # 0.10 - 2 * 0.0075 spent = 0.085 left: 5 more calls of 0.015 fit.
    assert actions == ["allow", "allow"] + ["allow"] * 5 + ["block"] * 5
    assert len(out.result.priced) == 2


def test_a_replayed_batch_gets_the_same_answers_and_holds_nothing_more() -> None:
    pipeline, states = _pipeline()
    records = _records([_request("near", f"r{i}") for i in range(10)])
    first = _answers(pipeline.run(records, T0))
    # The worker died before committing: the same records again, on the state it wrote.
    again, _ = _pipeline(states)
    second = _answers(again.run(records, T0 + timedelta(seconds=3)))
    strip = [{k: v for k, v in a.items() if k != "answered_at"} for a in first]
    assert [{k: v for k, v in a.items() if k != "answered_at"} for a in second] == strip
    # And a request that was not answered before sees the same budget as then: none left.
    later = _answers(again.run(_records([_request("near", "new")], 10), T0))
    assert later[0]["action"] == "block"


def test_a_request_asked_again_under_a_new_offset_is_answered_once() -> None:
    pipeline, _ = _pipeline()
    out = pipeline.run(_records([_request("near", "x")] * 8), T0)
    answers = _answers(out)
    assert [a["action"] for a in answers] == ["allow"] * 8
    # One hold: the rest of the budget is still there.
    more = _answers(pipeline.run(_records([_request("near", f"y{i}") for i in range(9)], 8), T0))
    assert [a["action"] for a in more].count("allow") == 5


def test_a_pool_is_granted_far_from_every_cap_and_never_near_one() -> None:
    pipeline, _ = _pipeline()
    out = pipeline.run(_records([_request("far", "f", pool=8), _request("near", "n", pool=8)]), T0)
    far, near = _answers(out)
    assert far["action"] == "allow"
    assert far["pooled"] == pool_ids("f", 8)
    assert near["action"] == "allow"
    assert not near.get("pooled")  # 0.10 leaves room for 6 calls: not 1 + 1 + pool_zone=5


def test_pooled_reservations_are_held_and_settled_like_any() -> None:
    # A user with room for 20 calls, pool zone 5: the pool stops where 5 more would not fit.
    subs = {**SUBS, "mid": _sub("mid", "capped")}
    pipeline, _ = _pipeline(plans=_block_at_20_estimates("capped"), subs=subs)
    out = _answers(pipeline.run(_records([_request("mid", "m", pool=64)]), T0))
    # 1 + pooled held; each pooled one left room for 5 more: 1 + k + 5 <= 20.
    assert len(out[0]["pooled"]) == 14
    rest = _answers(pipeline.run(_records([_request("mid", f"z{i}") for i in range(10)], 1), T0))
    assert [a["action"] for a in rest].count("allow") == 5


def test_a_torn_request_is_a_dead_letter_and_the_batch_goes_on() -> None:
    pipeline, _ = _pipeline()
    torn = _request("near", "t")[:-5]
    forged = b'{"kind":"admission","v":1,"user_id":"near"}'
    out = pipeline.run(_records([torn, forged, _request("near", "ok")]), T0)
    letters = [orjson.loads(letter) for _, letter, _ in out.result.dead]
    assert [letter["stage"] for letter in letters] == ["admission", "admission"]
    assert [a["reservation_id"] for a in _answers(out)] == ["ok"]


def test_a_user_without_a_plan_is_admitted_and_nothing_is_held() -> None:
    pipeline, states = _pipeline()
    out = _answers(pipeline.run(_records([_request("nobody", "q")]), T0))
    assert (out[0]["action"], out[0]["reason"]) == ("allow", "no_plan")
    assert states[3].get("nobody") is None


def test_a_request_naming_another_org_is_blocked_and_holds_nothing() -> None:
    pipeline, states = _pipeline()
    # A gateway of another tenant asks for "near"'s budget, pools included, between and
    # around the user's own requests: it is refused and the user's budget is untouched.
    batch = [
        _request("near", "x0", org="intruder"),
        _request("near", "own0"),
        *[_request("near", f"x{i}", pool=8, org="intruder") for i in range(1, 10)],
        *[_request("near", f"own{i}") for i in range(1, 10)],
        _request("far", "x-far", pool=8, org="ORG"),  # ids compare exactly
    ]
    records = _records(batch)
    out = pipeline.run(records, T0)
    answers = {a["reservation_id"]: a for a in _answers(out)}
    assert len(answers) == len(batch)
    refused = [rid for rid, a in answers.items() if rid.startswith("x")]
    assert len(refused) == 11
    for rid in refused:
        a = answers[rid]
        assert (a["action"], a["reason"], a.get("pooled", [])) == ("block", "wrong_org", [])
        assert a.get("model") is None
    # The user's own requests see the whole 0.10: six calls of 0.015 fit, as without them.
    fit = int(Decimal("0.10") / (ESTIMATE * UNIT))
    own = [answers[f"own{i}"]["action"] for i in range(10)]
    assert own == ["allow"] * fit + ["block"] * (10 - fit)
    assert out.capped.counters["admission_wrong_org"] == 11
    # Replayed (a crash before the commit): the same refusals, nothing held for them.
    again = {a["reservation_id"]: a for a in _answers(pipeline.run(records, T0))}
    assert {rid: again[rid]["reason"] for rid in refused} == dict.fromkeys(refused, "wrong_org")
    state = states[3].get("far")
    assert state is None or b"x-far" not in state


def _stage_with(windows: list[dict[str, Any]]) -> BatchPipeline:
    plans = parse_plans({"plans": [{"id": "p", "monthly_price": "0", "windows": windows}]})
    subs = {"u": _sub("u", "p")}
    states = [DictState() for _ in range(4)]
    processor = UsageProcessor(
        CATALOG, subs.get, seen=states[0], windows=states[1], marks=states[2]
    )
    caps = CapStage(
        CapEngine(plans, reservation_ttl_s=600), subs.get, states[3], estimator=CATALOG.estimate
    )
    return BatchPipeline(processor, caps, states)


def test_a_downgrade_cap_admits_on_the_downgrade_model_and_holds_its_price() -> None:
    pipeline = _stage_with(
        [
            {
                "name": "monthly",
                "kind": "billing_month",
                "unit": "usd",
                "allowance": str(ESTIMATE * UNIT * 2),
                "at_cap": {"action": "downgrade", "model": "gpt-4o-mini"},
                "exempt_models": ["gpt-4o-mini"],
            }
        ]
    )
    answers = _answers(pipeline.run(_records([_request("u", f"d{i}") for i in range(4)]), T0))
    assert [(a["action"], a["model"]) for a in answers] == [
        ("allow", MODEL),
        ("allow", MODEL),
        ("downgrade", "gpt-4o-mini"),
        ("downgrade", "gpt-4o-mini"),
    ]
    mini = CATALOG.estimate("gpt-4o-mini", IN, OUT, T0)
    assert Decimal(answers[2]["cost"]) == mini * UNIT < ESTIMATE * UNIT


def test_an_overage_ceiling_admits_billed_calls_until_the_ceiling() -> None:
    est = ESTIMATE * UNIT
    pipeline = _stage_with(
        [
            {
                "name": "monthly",
                "kind": "billing_month",
                "unit": "usd",
                "allowance": str(est),
                "at_cap": {"action": "overage", "unit_price": "1", "ceiling_usd": str(est * 2)},
            }
        ]
    )
    answers = _answers(pipeline.run(_records([_request("u", f"o{i}") for i in range(5)]), T0))
    assert [(a["action"], a["reason"]) for a in answers] == [
        ("allow", "ok"),
        ("allow", "overage"),
        ("allow", "overage"),
        ("block", "ceiling"),
        ("block", "ceiling"),
    ]


def _release(user: str, rids: list[str], org: str = "org") -> bytes:
    return encode_request(
        ReleaseRequest(org_id=org, user_id=user, gateway="gw-1", reservation_ids=rids)
    )


def _pooled_pipeline() -> tuple[BatchPipeline, DictState]:
    """One user, a block cap of 20 estimates, pools granted while 6 more estimates fit."""
    pipeline, states = _pipeline(plans=_block_at_20_estimates("p"), subs={"u": _sub("u", "p")})
    return pipeline, states[3]


def _pool_of_eight(pipeline: BatchPipeline) -> list[str]:
    first = _answers(pipeline.run(_records([_request("u", "r0", pool=8)]), T0))
    assert (first[0]["action"], len(first[0]["pooled"])) == ("allow", 8)
    return list(first[0]["pooled"])


# (what precedes a burst of 20 strict requests, allowed in the burst, released, counters)
RELEASES = [
    ("nothing", lambda pooled: [], 11, {}),
    ("the pool", lambda pooled: [_release("u", pooled)], 19, {"release_released": 8}),
    ("half", lambda pooled: [_release("u", pooled[:4])], 15, {"release_released": 4}),
    (
        "the pool twice, and ids never held",
        lambda pooled: [_release("u", pooled), _release("u", [*pooled, "nope", "r0.99"])],
        19,
        {"release_released": 8, "release_not_held": 10},
    ),
    (
        "the pool, by another org",
        lambda pooled: [_release("u", pooled, org="intruder")],
        11,
        {"release_wrong_org": 1},
    ),
]


@pytest.mark.parametrize(("name", "before", "allowed", "counters"), RELEASES)
def test_released_pooled_reservations_stop_holding_budget(
    name: str, before: Any, allowed: int, counters: dict[str, int]
) -> None:
    pipeline, _ = _pooled_pipeline()
    pooled = _pool_of_eight(pipeline)  # 1 + 8 estimates held: 11 of 20 left
    releases = before(pooled)
    burst = [_request("u", f"b{i}") for i in range(20)]
    out = pipeline.run(_records([*releases, *burst], first_offset=1), T0)
    answers = _answers(out)
    assert [a["reservation_id"] for a in answers] == [f"b{i}" for i in range(20)]
    assert [a["action"] for a in answers] == ["allow"] * allowed + ["block"] * (20 - allowed)
    for key in ("release_released", "release_not_held", "release_wrong_org"):
        assert out.capped.counters[key] == counters.get(key, 0), key
    assert out.result.counters["release_requests"] == len(releases)


def test_a_replayed_release_releases_nothing_more_and_is_not_answered() -> None:
    pipeline, _ = _pooled_pipeline()
    pooled = _pool_of_eight(pipeline)
    records = _records([_release("u", pooled), _request("u", "after")], first_offset=1)
    first = pipeline.run(records, T0)
    again = pipeline.run(records, T0)  # a crash before the commit: the same records
    assert first.capped.counters["release_released"] == 8
    assert again.capped.counters["release_released"] == 0
    assert [a["reservation_id"] for a in _answers(again)] == ["after"]
    assert _answers(again)[0]["action"] == _answers(first)[0]["action"] == "allow"


def test_a_torn_or_empty_release_is_a_dead_letter() -> None:
    pipeline, _ = _pooled_pipeline()
    pooled = _pool_of_eight(pipeline)
    torn = _release("u", pooled)[:-3]
    empty = (
        b'{"kind":"release","v":1,"org_id":"org","user_id":"u","gateway":"g","reservation_ids":[]}'
    )
    out = pipeline.run(_records([torn, empty], first_offset=1), T0)
    letters = [orjson.loads(letter) for _, letter, _ in out.result.dead]
    assert [letter["stage"] for letter in letters] == ["admission", "admission"]
    assert out.capped.counters["release_released"] == 0
