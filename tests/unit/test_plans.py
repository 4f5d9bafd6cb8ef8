"""Plans as data: the sample catalog loads, bad plan files list every problem with its path."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from schemas.plans import (
    DEFAULT_THRESHOLDS,
    SAMPLE_PLANS,
    DowngradeAtCap,
    OverageAtCap,
    PlanCatalog,
    load_plans,
    parse_plans,
)
from spendstream.errors import ConfigError

pytestmark = pytest.mark.unit


def _window(**overrides: Any) -> dict[str, Any]:
    window: dict[str, Any] = {
        "name": "monthly",
        "kind": "billing_month",
        "unit": "usd",
        "allowance": "10",
        "at_cap": {"action": "block"},
    }
    window.update(overrides)
    return window


def _plan(plan_id: str = "p", **overrides: Any) -> dict[str, Any]:
    plan: dict[str, Any] = {"id": plan_id, "monthly_price": "20", "windows": [_window()]}
    plan.update(overrides)
    return plan


def test_sample_plans_load() -> None:
    catalog = load_plans(SAMPLE_PLANS)
    assert catalog.ids() == ["free", "pro", "team", "enterprise"]
    free, pro, team, enterprise = (catalog.get(i) for i in catalog.ids())
    assert free.monthly_price == Decimal("0")
    assert {w.kind for w in free.windows} == {"calendar_day", "rolling_hours"}
    assert all(w.at_cap.action == "block" for w in free.windows)
    assert isinstance(pro.windows[1].at_cap, DowngradeAtCap)
    assert pro.windows[1].at_cap.model in pro.windows[1].exempt_models
    assert team.overage_window is not None
    assert isinstance(team.overage_window.at_cap, OverageAtCap)
    assert team.overage_window.at_cap.unit_price == Decimal("1.10")
    assert enterprise.overage_window is not None
    assert isinstance(enterprise.overage_window.at_cap, OverageAtCap)
    assert enterprise.overage_window.at_cap.ceiling_usd == Decimal("1000")
    assert catalog.get("free").windows[0].thresholds == (80, 100)
    assert catalog.get("team").windows[0].thresholds == DEFAULT_THRESHOLDS


def test_default_load_is_the_sample() -> None:
    assert load_plans() == load_plans(SAMPLE_PLANS)


def test_unquoted_yaml_decimal_is_exact(tmp_path: Path) -> None:
    path = tmp_path / "plans.yaml"
    path.write_text(
        "plans:\n"
        "  - id: p\n"
        "    monthly_price: 0.1\n"
        "    windows:\n"
        "      - {name: m, kind: billing_month, unit: usd, allowance: 0.30000000000000004,\n"
        "         at_cap: {action: overage, unit_price: 1.1}}\n"
    )
    plan = load_plans(path).get("p")
    assert plan.monthly_price == Decimal("0.1")
    assert plan.windows[0].allowance == Decimal("0.30000000000000004")
    at_cap = plan.windows[0].at_cap
    assert isinstance(at_cap, OverageAtCap)
    assert at_cap.unit_price == Decimal("1.1")


def test_python_float_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"plans\[0\]\(p\)\.monthly_price: .*not the float"):
        parse_plans({"plans": [_plan(monthly_price=0.1)]})


def test_unknown_plan_is_a_config_error() -> None:
    catalog = parse_plans({"plans": [_plan()]})
    assert "p" in catalog and "x" not in catalog
    with pytest.raises(ConfigError, match="unknown plan 'x'"):
        catalog.get("x")


BAD_PLANS: list[tuple[str, dict[str, Any], list[str]]] = [
    (
        "allowance of 1e40",
        {"plans": [_plan(windows=[_window(allowance="1e40")])]},
        ["above the largest amount a plan may set"],
    ),
    (
        "monthly price above the bound",
        {"plans": [_plan(monthly_price="1000000000000.01")]},
        ["above the largest amount a plan may set"],
    ),
    (
        "overage per token above the per-token price bound",
        {
            "plans": [
                _plan(
                    windows=[
                        _window(
                            unit="tokens",
                            allowance="1000",
                            at_cap={"action": "overage", "unit_price": "0.02"},
                        )
                    ]
                )
            ]
        },
        ["overage unit_price 0.02 is above the largest for a window in tokens"],
    ),
    (
        "overage markup above 100x",
        {"plans": [_plan(windows=[_window(at_cap={"action": "overage", "unit_price": "101"})])]},
        ["overage unit_price 101 is above the largest for a window in usd"],
    ),
    (
        "unknown action",
        {"plans": [_plan(windows=[_window(at_cap={"action": "throttle"})])]},
        ["plans[0](p).windows[0](monthly).at_cap: Input tag 'throttle'"],
    ),
    (
        "downgrade without a target model",
        {"plans": [_plan(windows=[_window(at_cap={"action": "downgrade"})])]},
        ["plans[0](p).windows[0](monthly).at_cap.model: Field required"],
    ),
    (
        "thresholds not increasing",
        {"plans": [_plan(windows=[_window(thresholds=[80, 50, 100])])]},
        ["plans[0](p).windows[0](monthly).thresholds: thresholds must be strictly increasing"],
    ),
    (
        "threshold above 100",
        {"plans": [_plan(windows=[_window(thresholds=[50, 120])])]},
        ["plans[0](p).windows[0](monthly).thresholds: thresholds must be in (0, 100]"],
    ),
    (
        "threshold of 0",
        {"plans": [_plan(windows=[_window(thresholds=[0, 100])])]},
        ["thresholds must be in (0, 100], got [0]"],
    ),
    (
        "fractional threshold",
        {"plans": [_plan(windows=[_window(thresholds=[50.5, 100])])]},
        ["thresholds must be whole percents"],
    ),
    (
        "duplicate plan ids",
        {"plans": [_plan("pro"), _plan("team"), _plan("pro")]},
        ["plans: duplicate plan id 'pro' (plans[0] and [2])"],
    ),
    (
        "duplicate ids reported beside field errors",
        {"plans": [_plan("pro"), _plan("pro", monthly_price="abc")]},
        ["duplicate plan id 'pro'", "plans[1](pro).monthly_price: 'abc' is not a decimal"],
    ),
    (
        "unknown window kind",
        {"plans": [_plan(windows=[_window(kind="fortnight")])]},
        ["plans[0](p).windows[0](monthly): Input tag 'fortnight' found using 'kind'"],
    ),
    (
        "rolling window without hours",
        {"plans": [_plan(windows=[_window(kind="rolling_hours")])]},
        ["plans[0](p).windows[0](monthly).hours: Field required"],
    ),
    (
        "overage on a rolling window",
        {
            "plans": [
                _plan(
                    windows=[
                        _window(
                            kind="rolling_hours",
                            hours=5,
                            at_cap={"action": "overage", "unit_price": "1"},
                        )
                    ]
                )
            ]
        },
        ["overage needs a fixed window"],
    ),
    (
        "two overage windows",
        {
            "plans": [
                _plan(
                    windows=[
                        _window(name="a", at_cap={"action": "overage", "unit_price": "1"}),
                        _window(name="b", at_cap={"action": "overage", "unit_price": "1"}),
                    ]
                )
            ]
        },
        ["plans[0](p): at most one window may bill overage"],
    ),
    (
        "negative and non-numeric money",
        {"plans": [_plan(monthly_price="-1", windows=[_window(allowance="ten")])]},
        [
            "plans[0](p).monthly_price: money must not be negative",
            "plans[0](p).windows[0](monthly).allowance: 'ten' is not a decimal number",
        ],
    ),
    (
        "fractional token allowance",
        {"plans": [_plan(windows=[_window(unit="tokens", allowance="10.5")])]},
        ["allowance in tokens must be a whole number"],
    ),
    (
        "zero allowance and zero unit price",
        {
            "plans": [
                _plan(
                    windows=[
                        _window(allowance="0", at_cap={"action": "overage", "unit_price": "0"})
                    ]
                )
            ]
        },
        ["at_cap.unit_price: unit_price must be greater than 0"],
    ),
    (
        "bucket not dividing the window",
        {"plans": [_plan(windows=[_window(kind="rolling_hours", hours=1, bucket_minutes=7)])]},
        ["bucket_minutes (7) must divide the window"],
    ),
    (
        "unknown field",
        {"plans": [_plan(windows=[_window(alowance="3")])]},
        ["plans[0](p).windows[0](monthly).alowance: Extra inputs are not permitted"],
    ),
    (
        "duplicate window names",
        {"plans": [_plan(windows=[_window(), _window()])]},
        ["duplicate window names ['monthly']"],
    ),
    (
        "no plans",
        {"plans": []},
        ["plans: List should have at least 1 item"],
    ),
]


@pytest.mark.parametrize(
    ("data", "expected"), [(d, e) for _, d, e in BAD_PLANS], ids=[c[0] for c in BAD_PLANS]
)
def test_bad_plans_list_every_problem(data: dict[str, Any], expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_plans(data, source="plans.yaml")
    message = str(info.value)
    assert message.startswith("plans.yaml: ")
    for fragment in expected:
        assert fragment in message, message


def test_many_problems_in_one_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "plans:\n"
        "  - id: a\n"
        "    monthly_price: '1'\n"
        "    windows:\n"
        "      - {name: m, kind: billing_month, unit: usd, allowance: '1',\n"
        "         at_cap: {action: zap}}\n"
        "      - {name: d, kind: calendar_day, unit: usd, allowance: '1', thresholds: [90, 80],\n"
        "         at_cap: {action: downgrade}}\n"
        "  - id: a\n"
        "    monthly_price: '1'\n"
        "    windows: [{name: m, kind: week, unit: bytes, allowance: '1',\n"
        "               at_cap: {action: block}}]\n"
    )
    with pytest.raises(ConfigError) as info:
        load_plans(path)
    lines = [line for line in str(info.value).splitlines() if line.startswith("  - ")]
    assert str(path) in str(info.value)
    assert len(lines) == 5, lines
    assert any("duplicate plan id 'a'" in line for line in lines)
    assert any("windows[0](m).at_cap: Input tag 'zap'" in line for line in lines)
    assert any("windows[1](d).thresholds" in line for line in lines)
    assert any("windows[1](d).at_cap.model: Field required" in line for line in lines)
    assert any("plans[1](a).windows[0](m).unit: Input should be" in line for line in lines)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("plans: [unclosed", "not valid YAML"),
        ("- just a list\n", "expected a mapping with a 'plans' list"),
    ],
)
def test_unreadable_files(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "plans.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        load_plans(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read plans file"):
        load_plans(tmp_path / "nope.yaml")


def test_catalog_is_iterable_and_sized() -> None:
    catalog = parse_plans({"plans": [_plan("a"), _plan("b")]})
    assert isinstance(catalog, PlanCatalog)
    assert [p.id for p in catalog] == ["a", "b"]
    assert len(catalog) == 2
