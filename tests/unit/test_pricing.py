"""Pricing checked by hand against entries of the real LiteLLM map (DESIGN §4)."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import UsageEvent
from spendstream.errors import ConfigError
from stream_processors import PriceCatalog, to_units, units_to_decimal, units_to_str

CATALOG = PriceCatalog.load()


def event(**kw: object) -> UsageEvent:
    base: dict[str, object] = {
        "event_id": "e",
        "occurred_at": "2026-11-27T10:00:00Z",
        "org_id": "o",
        "user_id": "u",
        "gateway": "g",
        "requested_model": "gpt-4o",
    }
    base.update(kw)
    return UsageEvent.model_validate(base)


D = Decimal

# (description, event fields, cost, list value) -- the numbers are worked out by hand from the
# map's entries: claude-sonnet-4-5 in 3e-6 / cache read 3e-7 / cache write 3.75e-6 / out 1.5e-5;
# gpt-4o in 2.5e-6 / cache read 1.25e-6 / out 1e-5; o3-mini in 1.1e-6 / read 5.5e-7 / out 4.4e-6;
# dashscope/qwen-turbo in 5e-8 / out 2e-7 / reasoning 5e-7.
CASES = [
    (
        "sonnet 4.5 with cache reads and writes",
        dict(
            requested_model="claude-sonnet-4-5",
            input_tokens=10_000,
            cached_input_tokens=6_000,
            cache_write_tokens=2_000,
            output_tokens=500,
        ),
        # 2000*3e-6 + 6000*3e-7 + 2000*3.75e-6 + 500*1.5e-5 = .006 + .0018 + .0075 + .0075
        D("0.0228"),
        D("0.0375"),  # 10000*3e-6 + 500*1.5e-5
    ),
    (
        "gpt-4o with cached input",
        dict(input_tokens=1_000, cached_input_tokens=400, output_tokens=100),
        D("0.003"),  # 600*2.5e-6 + 400*1.25e-6 + 100*1e-5
        D("0.0035"),
    ),
    (
        "reasoning model without a reasoning price: reasoning at the output price",
        dict(
            requested_model="o3-mini",
            input_tokens=2_000,
            output_tokens=3_000,
            reasoning_tokens=2_500,
        ),
        D("0.0154"),  # 2000*1.1e-6 + 500*4.4e-6 + 2500*4.4e-6
        D("0.0154"),
    ),
    (
        "reasoning model with its own reasoning price",
        dict(
            requested_model="dashscope/qwen-turbo",
            input_tokens=1_000,
            output_tokens=1_000,
            reasoning_tokens=800,
        ),
        D("0.00049"),  # 1000*5e-8 + 200*2e-7 + 800*5e-7 = .00005 + .00004 + .0004
        D("0.00049"),  # list value prices reasoning at the requested model's reasoning price
    ),
    (
        "semantic cache hit costs nothing, list value is the full call",
        dict(input_tokens=1_000, output_tokens=100, semantic_cache_hit=True),
        D("0"),
        D("0.0035"),
    ),
    (
        "routed from gpt-4o to gpt-4o-mini (1.5e-7 / 6e-7)",
        dict(served_model="gpt-4o-mini", input_tokens=1_000, output_tokens=1_000),
        D("0.00075"),  # 1000*1.5e-7 + 1000*6e-7
        D("0.0125"),  # 1000*2.5e-6 + 1000*1e-5
    ),
    (
        "float artefacts of the map stay exact",
        dict(requested_model="databricks/databricks-claude-sonnet-4-1", input_tokens=3),
        D("0.0000089999700000000006"),  # 3 * 2.9999900000000002e-06
        D("0.0000089999700000000006"),
    ),
]


@pytest.mark.parametrize(("name", "fields", "cost", "list_value"), CASES, ids=[c[0] for c in CASES])
def test_cost_and_list_value(
    name: str, fields: dict[str, object], cost: Decimal, list_value: Decimal
) -> None:
    q = CATALOG.quote(event(**fields))
    assert units_to_decimal(q.cost) == cost
    assert units_to_decimal(q.list_value) == list_value
    assert not q.unknown_model
    assert q.list_value - q.cost == q.saved_prompt_cache + q.saved_semantic_cache + q.saved_routing


def test_savings_split_by_cause() -> None:
    routed = CATALOG.quote(event(served_model="gpt-4o-mini", input_tokens=1000, output_tokens=1000))
    assert units_to_decimal(routed.saved_routing) == D("0.01175")
    assert routed.saved_prompt_cache == 0
    cached = CATALOG.quote(event(input_tokens=1000, cached_input_tokens=400, output_tokens=100))
    assert units_to_decimal(cached.saved_prompt_cache) == D("0.0005")
    assert cached.saved_routing == 0
    hit = CATALOG.quote(event(input_tokens=1000, output_tokens=100, semantic_cache_hit=True))
    assert units_to_decimal(hit.saved_semantic_cache) == D("0.0035")


def test_unknown_model_is_never_free() -> None:
    q = CATALOG.quote(event(requested_model="my-private-llm", input_tokens=100, output_tokens=10))
    assert q.unknown_model
    # fallback defaults: 1e-5 in, 3e-5 out
    assert units_to_decimal(q.cost) == D("0.0013")


def test_zero_fallback_rejected() -> None:
    with pytest.raises(ConfigError, match="never free"):
        PriceCatalog.load(fallback_input=D(0), fallback_output=D(0))


def test_overrides_replace_map_entries(tmp_path: Path) -> None:
    path = tmp_path / "ov.json"
    path.write_text(
        json.dumps(
            {
                "gpt-4o": {"input_cost_per_token": 0.000002, "output_cost_per_token": 0.000008},
                "llama-selfhosted": {"input_cost_per_token": 1e-7, "output_cost_per_token": 2e-7},
            }
        )
    )
    cat = PriceCatalog.load(overrides=path)
    assert units_to_decimal(cat.quote(event(input_tokens=1000)).cost) == D("0.002")
    q = cat.quote(event(requested_model="llama-selfhosted", input_tokens=10, output_tokens=10))
    assert units_to_decimal(q.cost) == D("0.000003") and not q.unknown_model


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2]", "JSON object"),
        ("{not json", "not valid JSON"),
        ('{"m": {"input_cost_per_token": "x", "output_cost_per_token": 1}}', "price entry 'm'"),
        (
            '{"m": {"input_cost_per_token": 0.02, "output_cost_per_token": 0.001}}',
            "outside 0 to 0.01 USD",
        ),
        (
            '{"m": {"input_cost_per_token": -1e-6, "output_cost_per_token": 0.001}}',
            "outside 0 to 0.01 USD",
        ),
    ],
    ids=["not an object", "not json", "not a number", "above the bound", "negative"],
)
def test_bad_price_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        PriceCatalog.load(overrides=path)


def test_vendored_map_is_within_the_price_bound() -> None:
    # Every price the catalog reads from the vendored map passed price_units' bound: the map
    # loads whole (a price above it would refuse the whole catalog at start-up).
    assert len(PriceCatalog.load()) > 3000


def test_missing_price_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read price file"):
        PriceCatalog.load(overrides=tmp_path / "nope.json")


@pytest.mark.parametrize(
    ("value", "units"),
    [
        ("0", 0),
        ("1", 10**24),
        ("5.46875e-07", 546875 * 10**12),
        ("1e-24", 1),
        ("-0.5", -(10**24) // 2),
        ("1.000000000000000000000000000", 10**24),
    ],
)
def test_to_units(value: str, units: int) -> None:
    assert to_units(Decimal(value)) == units


def test_too_many_places_is_an_error() -> None:
    with pytest.raises(ConfigError, match="decimal places"):
        to_units(Decimal("1e-25"))


@given(st.integers(min_value=-(10**40), max_value=10**40))
def test_units_string_roundtrip(units: int) -> None:
    assert to_units(Decimal(units_to_str(units))) == units
