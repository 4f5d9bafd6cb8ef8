"""Prepaid credit grants on the subscription record: applied once, drawn before overage billing,
and able to unblock a user at the overage ceiling without an event (pure logic, no Kafka)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from producers import load_subscriptions
from schemas import CreditGrant, PlanPeriod, Subscription, UsageEvent
from spendstream.errors import ConfigError
from stream_processors import CapEngine, DictState, PricedRecord, Quote, parse_plans, to_units
from stream_processors.caps import CapStage

pytestmark = pytest.mark.unit

T0 = datetime(2026, 11, 2, 12, 0, tzinfo=UTC)
NOW = datetime(2026, 11, 2, 13, 0, tzinfo=UTC)
D = Decimal
PLANS = parse_plans(
    {
        "plans": [
            {
                "id": "metered",
                "monthly_price": "10",
                "windows": [
                    {
                        "name": "monthly",
                        "kind": "billing_month",
                        "unit": "usd",
                        "allowance": "1.00",
                        "thresholds": [100],
                        # 1 USD beyond the allowance at most, then blocked until credit arrives
                        "at_cap": {"action": "overage", "unit_price": "1", "ceiling_usd": "1"},
                    }
                ],
            }
        ]
    }
)


def grant(credit_id: str, amount: str) -> CreditGrant:
    return CreditGrant(credit_id=credit_id, amount_usd=D(amount), granted_at=T0)


def subscription(*grants: CreditGrant) -> Subscription:
    return Subscription(
        user_id="u",
        org_id="org",
        billing_anchor=datetime(2026, 11, 1, tzinfo=UTC),
        plans=[PlanPeriod(plan_id="metered", effective_at=datetime(2026, 1, 1, tzinfo=UTC))],
        credits=list(grants),
    )


class Subs:
    """A subscriptions lookup whose record can be replaced (as the compacted topic does)."""

    def __init__(self, sub: Subscription) -> None:
        self.sub = sub

    def __call__(self, user_id: str) -> Subscription | None:
        return self.sub if user_id == "u" else None


_offsets = iter(range(10**9))


def rec(cost: str) -> PricedRecord:
    i = next(_offsets)
    event = UsageEvent(
        event_id=f"e{i}",
        occurred_at=T0 + timedelta(seconds=i + 1),
        org_id="org",
        user_id="u",
        gateway="g",
        requested_model="m",
        input_tokens=10,
        output_tokens=5,
    )
    units = to_units(D(cost))
    return PricedRecord(event, Quote(units, units, 0, 0, 0, False), "metered", 3, False, i)


def money(outs: Any) -> list[tuple[str, Decimal]]:
    """(record kind, amount) of every overage-topic record, in order."""
    return [
        (r["record"], D(r["amount"]))
        for o in outs
        for r in (orjson.loads(v) for _, v in o.overages)
    ]


def enforcement(out: Any) -> dict[str, Any] | None:
    return orjson.loads(out.enforcement[-1][1]) if out.enforcement else None


def test_a_grant_is_drawn_before_overage_is_billed() -> None:
    subs = Subs(subscription(grant("c1", "0.25")))
    st = CapStage(CapEngine(PLANS), subs, DictState())
    out = st.process([rec("1.00"), rec("0.50")], NOW)
    # 0.50 beyond the allowance at 1 USD/USD: 0.25 from the credit, 0.25 billed.
    assert money([out]) == [("credit_draw", D("0.25")), ("overage", D("0.25"))]
    assert out.counters["caps_credit_grants"] == 1


def test_a_grant_is_applied_once_however_often_the_record_comes_again() -> None:
    subs = Subs(subscription(grant("c1", "0.25")))
    st = CapStage(CapEngine(PLANS), subs, DictState())
    outs = [st.process([rec("1.00")], NOW)]
    # The same record re-published (compaction, a restart of the loader): no second top-up.
    outs.append(st.apply_credits(["u"], NOW))
    subs.sub = subscription(grant("c1", "0.25"))
    outs.append(st.process([rec("0.50")], NOW))
    assert money(outs) == [("credit_draw", D("0.25")), ("overage", D("0.25"))]
    assert sum(o.counters["caps_credit_grants"] for o in outs) == 1


def test_only_the_new_grants_of_a_longer_list_are_applied() -> None:
    subs = Subs(subscription(grant("c1", "0.10")))
    st = CapStage(CapEngine(PLANS), subs, DictState())
    outs = [st.process([rec("1.00")], NOW)]
    subs.sub = subs.sub.with_credit(grant("c2", "0.20"))
    outs.append(st.process([rec("0.50")], NOW))
    assert money(outs) == [("credit_draw", D("0.30")), ("overage", D("0.20"))]


def test_a_top_up_unblocks_a_user_at_the_ceiling_without_an_event() -> None:
    subs = Subs(subscription())
    st = CapStage(CapEngine(PLANS), subs, DictState())
    out = st.process([rec("1.00"), rec("1.50")], NOW)  # 1.50 beyond: billed up to the ceiling
    blocked = enforcement(out)
    assert blocked is not None and blocked["state"] == "blocked", blocked

    subs.sub = subs.sub.with_credit(grant("c1", "5"))
    freed = st.apply_credits(["u"], NOW)
    after = enforcement(freed)
    assert after is not None and after["state"] != "blocked", after
    assert freed.partitions == {"u": 3}  # the partition the user's state and outputs live on
    assert freed.counters["caps_credit_grants"] == 1
    # The next event is paid from the credit, not billed.
    nxt = st.process([rec("0.40")], NOW)
    assert money([nxt]) == [("credit_draw", D("0.40"))]


def test_apply_credits_leaves_users_without_state_or_grants_alone() -> None:
    subs = Subs(subscription(grant("c1", "1")))
    st = CapStage(CapEngine(PLANS), subs, DictState())
    assert not st.apply_credits(["u", "nobody"], NOW)  # no state yet: applied with the 1st event
    assert st.apply_credits(["u"], NOW).counters["caps_credit_grants"] == 0
    out = st.process([rec("1.20")], NOW)
    assert money([out]) == [("credit_draw", D("0.2"))]


def test_duplicate_credit_ids_are_refused() -> None:
    with pytest.raises(ValidationError, match="listed twice"):
        subscription(grant("c1", "1"), grant("c1", "2"))


@pytest.mark.parametrize("amount", ["0", "-1", "1e13", "0.0000000000000000000000001"])
def test_bad_amounts_are_refused(amount: str) -> None:
    with pytest.raises(ValidationError):
        grant("c", amount)


@pytest.mark.parametrize("field", ["billing_anchor", "plans.effective_at", "credits.granted_at"])
@pytest.mark.parametrize(
    "when", ["0001-01-01T00:00:00+01:00", "1999-12-31T23:59:59Z", "2100-01-01T00:00:00Z"]
)
def test_subscription_times_out_of_range_are_refused(field: str, when: str) -> None:
    # A year-1 anchor once passed `subscriptions load` and crashed the caps stage.
    record = subscription(grant("c1", "1")).model_dump(mode="json")
    if field == "billing_anchor":
        record["billing_anchor"] = when
    elif field == "plans.effective_at":
        record["plans"][0]["effective_at"] = when
    else:
        record["credits"][0]["granted_at"] = when
    with pytest.raises(ValidationError, match="time must be from 2000-01-01"):
        Subscription.model_validate(record)


def test_with_credit_keeps_the_record_when_the_id_is_known() -> None:
    sub = subscription(grant("c1", "1"))
    assert sub.with_credit(grant("c1", "1")) is sub
    assert [c.credit_id for c in sub.with_credit(grant("c2", "1")).credits] == ["c1", "c2"]


def test_load_subscriptions_reads_money_exactly(tmp_path: Path) -> None:
    path = tmp_path / "subs.yaml"
    path.write_text(
        "subscriptions:\n"
        "  - user_id: u\n"
        "    org_id: org\n"
        "    billing_anchor: '2026-11-01T00:00:00Z'\n"
        "    plans: [{plan_id: metered, effective_at: '2026-01-01T00:00:00Z'}]\n"
        "    credits: [{credit_id: c1, amount_usd: 0.1, granted_at: '2026-11-02T00:00:00Z'}]\n"
    )
    [sub] = load_subscriptions(path, plans=PLANS)
    assert sub.credits[0].amount_usd == D("0.1")


def test_load_subscriptions_lists_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "subs.yaml"
    path.write_text(
        "- {user_id: a, org_id: o, billing_anchor: '2026-11-01T00:00:00Z',\n"
        "   plans: [{plan_id: gold, effective_at: '2026-01-01T00:00:00Z'}]}\n"
        "- {user_id: b, org_id: o, timezone: Mars/Olympus,\n"
        "   plans: [{plan_id: metered, effective_at: '2026-01-01T00:00:00Z'}]}\n"
        "- {user_id: a, org_id: o, billing_anchor: '2026-11-01T00:00:00Z',\n"
        "   plans: [{plan_id: metered, effective_at: '2026-01-01T00:00:00Z'}]}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_subscriptions(path, plans=PLANS)
    text = str(info.value)
    assert "subscriptions[0] (a): unknown plan 'gold'" in text
    assert "subscriptions[1] (b): timezone" in text
    assert "subscriptions[1] (b): billing_anchor" in text
    assert "subscriptions[2] (a): user already listed at [0]" in text


def test_load_subscriptions_names_an_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read subscriptions file"):
        load_subscriptions(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("subscriptions: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_subscriptions(bad)


def test_the_example_subscriptions_file_is_valid_against_the_sample_plans() -> None:
    from stream_processors import SAMPLE_PLANS, load_plans

    path = Path(__file__).resolve().parents[2] / "deploy" / "subscriptions.example.yaml"
    subs = load_subscriptions(path, plans=load_plans(SAMPLE_PLANS))
    assert [s.user_id for s in subs] == ["user-000001", "user-000002"]
    assert subs[1].credits[0].amount_usd == D("50.00")


def test_cli_load_validates_without_a_broker(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from spendstream.cli import app

    runner = CliRunner()
    example = Path(__file__).resolve().parents[2] / "deploy" / "subscriptions.example.yaml"
    ok = runner.invoke(app, ["subscriptions", "load", "--dry-run", str(example)])
    assert ok.exit_code == 0, ok.output
    assert "2 subscription(s) valid; nothing published" in ok.output

    bad = tmp_path / "bad.yaml"
    bad.write_text(example.read_text().replace("plan_id: team", "plan_id: platinum"))
    refused = runner.invoke(app, ["subscriptions", "load", "--dry-run", str(bad)])
    assert refused.exit_code == 2
    assert "unknown plan 'platinum'" in refused.output


def test_cli_top_up_refuses_a_bad_amount_before_touching_kafka() -> None:
    from typer.testing import CliRunner

    from spendstream.cli import app

    result = CliRunner().invoke(app, ["subscriptions", "top-up", "u", "0"])
    assert result.exit_code == 2 and "greater than 0" in result.output, result.output
    result = CliRunner().invoke(app, ["subscriptions", "top-up", "u", "ten"])
    assert result.exit_code == 2 and "decimal number" in result.output, result.output
