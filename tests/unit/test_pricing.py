"""Pricing checked by hand against entries of the real LiteLLM map (DESIGN §4)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import MAX_TOKENS, UsageEvent
from schemas._wire import decode_usage
from spendstream.errors import ConfigError
from stream_processors import (
    VENDORED_CATALOG,
    ModelPrice,
    PriceCatalog,
    Quote,
    to_units,
    units_to_decimal,
    units_to_str,
)

CATALOG = PriceCatalog.load()
CATALOG_PATH = (
    Path(__file__).parents[2] / "stream_processors" / "data" / "litellm_model_prices.json"
)


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
    assert q.list_value - q.cost == (
        q.saved_prompt_cache + q.saved_semantic_cache + q.saved_routing + q.saved_service_tier
    )


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


# --- the whole price model ---------------------------------------------------------------
# (description, event fields, cost, list value, saved_service_tier, approximated). Every number
# is worked out by hand from the vendored map's entry named in the case.
MODEL_CASES = [
    (
        "long context: gemini-2.5-pro above 200k, every token at the long-context rates",
        dict(requested_model="gemini-2.5-pro", input_tokens=300_000, output_tokens=1_000),
        D("0.765"),  # 300000*2.5e-6 + 1000*1.5e-5
        D("0.765"),
        D("0"),
        False,
    ),
    (
        "long context: exactly at the threshold is not above it",
        dict(requested_model="gemini-2.5-pro", input_tokens=200_000, output_tokens=1_000),
        D("0.26"),  # 200000*1.25e-6 + 1000*1e-5
        D("0.26"),
        D("0"),
        False,
    ),
    (
        "long context, xAI: at the threshold counts (>=)",
        dict(requested_model="xai/grok-4.20-multi-agent-beta-0309", input_tokens=200_000,
             output_tokens=100),
        D("0.5005"),  # 200000*2.5e-6 + 100*5e-6
        D("0.5005"),
        D("0"),
        False,
    ),
    (
        "long context, xAI: one token below",
        dict(requested_model="xai/grok-4.20-multi-agent-beta-0309", input_tokens=199_999,
             output_tokens=100),
        D("0.25024875"),  # 199999*1.25e-6 + 100*2.5e-6
        D("0.25024875"),
        D("0"),
        False,
    ),
    (
        "Batch API: gpt-4o at its batch rates, half the list value",
        dict(input_tokens=1_000, output_tokens=100, service_tier="batch"),
        D("0.00175"),  # 1000*1.25e-6 + 100*5e-6
        D("0.0035"),  # 1000*2.5e-6 + 100*1e-5
        D("0.00175"),
        False,
    ),
    (
        "flex: gpt-5 with cache reads at the flex cache rate",
        dict(requested_model="gpt-5", input_tokens=10_000, cached_input_tokens=4_000,
             output_tokens=2_000, service_tier="flex"),
        D("0.014"),  # 6000*6.25e-7 + 4000*6.25e-8 + 2000*5e-6
        D("0.0325"),  # 10000*1.25e-6 + 2000*1e-5
        D("0.01625"),  # list - (10000*6.25e-7 + 2000*5e-6)
        False,
    ),
    (
        "priority costs more: the service-tier saving is negative",
        dict(requested_model="gpt-5", input_tokens=1_000, output_tokens=1_000,
             service_tier="priority"),
        D("0.0225"),  # 1000*2.5e-6 + 1000*2e-5
        D("0.01125"),
        D("-0.01125"),
        False,
    ),
    (
        "tier + threshold: gpt-6-astra priority above 272k",
        dict(requested_model="gpt-6-astra", input_tokens=300_000, output_tokens=1_000,
             service_tier="priority"),
        D("12.15"),  # 300000*4e-5 + 1000*1.5e-4 (the _above_272k_tokens_priority keys)
        D("6.075"),  # 300000*2e-5 + 1000*7.5e-5
        D("-6.075"),
        False,
    ),
    (
        "tier + threshold: gpt-6-astra batch above 272k",
        dict(requested_model="gpt-6-astra", input_tokens=300_000, output_tokens=1_000,
             service_tier="batch"),
        D("3.0375"),  # 300000*1e-5 + 1000*3.75e-5
        D("6.075"),
        D("3.0375"),
        False,
    ),
    (
        "tier + threshold: gpt-6-astra flex at 272k, not above",
        dict(requested_model="gpt-6-astra", input_tokens=272_000, output_tokens=1_000,
             service_tier="flex"),
        D("1.385"),  # 272000*5e-6 + 1000*2.5e-5
        D("2.77"),  # 272000*1e-5 + 1000*5e-5
        D("1.385"),
        False,
    ),
    (
        "1-hour cache writes at their own rate",
        dict(requested_model="claude-sonnet-4-5", input_tokens=10_000, cached_input_tokens=6_000,
             cache_write_tokens=2_000, cache_write_1h_tokens=1_000, output_tokens=500),
        # 2000*3e-6 + 6000*3e-7 + 1000*3.75e-6 + 1000*6e-6 + 500*1.5e-5
        D("0.02505"),
        D("0.0375"),
        D("0"),
        False,
    ),
    (
        "batch 1-hour writes without a batch 1-hour rate: the batch write rate, flagged",
        dict(requested_model="claude-sonnet-4-5", input_tokens=10_000, cached_input_tokens=6_000,
             cache_write_tokens=2_000, cache_write_1h_tokens=1_000, output_tokens=500,
             service_tier="batch"),
        # 2000*1.5e-6 + 6000*1.5e-7 + 2000*1.875e-6 + 500*7.5e-6
        D("0.0114"),
        D("0.0375"),
        D("0.01875"),  # list - (10000*1.5e-6 + 500*7.5e-6)
        True,
    ),
    (
        "audio in and out at the audio rates",
        dict(requested_model="gpt-4o-audio-preview-2024-12-17", input_tokens=1_000,
             input_audio_tokens=400, output_tokens=500, output_audio_tokens=300),
        D("0.0435"),  # 600*2.5e-6 + 400*4e-5 + 200*1e-5 + 300*8e-5
        D("0.0435"),
        D("0"),
        False,
    ),
    (
        "audio without an audio rate: input tokens, flagged",
        dict(input_tokens=1_000, input_audio_tokens=400, output_tokens=100),
        D("0.0035"),
        D("0.0035"),
        D("0"),
        True,
    ),
    (
        "images without an image rate are input tokens (the providers' rule): not flagged",
        dict(input_tokens=1_000, input_image_tokens=400, output_tokens=100),
        D("0.0035"),
        D("0.0035"),
        D("0"),
        False,
    ),
    (
        "output images at the image rate",
        dict(requested_model="gemini-2.5-flash-image", input_tokens=100, output_tokens=1_300,
             output_image_tokens=1_290),
        D("0.038755"),  # 100*3e-7 + 10*2.5e-6 + 1290*3e-5
        D("0.038755"),
        D("0"),
        False,
    ),
    (
        "web search per query at the context size's price",
        dict(requested_model="gpt-4o-search-preview", input_tokens=1_000, output_tokens=100,
             web_search_requests=2, search_context_size="high"),
        D("0.0535"),  # 0.0035 + 2*0.025
        D("0.0535"),
        D("0"),
        False,
    ),
    (
        "web search by size: perplexity high",
        dict(requested_model="perplexity/sonar", input_tokens=1_000, output_tokens=100,
             web_search_requests=1, search_context_size="high"),
        D("0.0131"),  # 1000*1e-6 + 100*1e-6 + 0.012
        D("0.0131"),
        D("0"),
        False,
    ),
    (
        "web search, size unset: perplexity's default is low",
        dict(requested_model="perplexity/sonar", input_tokens=1_000, output_tokens=100,
             web_search_requests=1),
        D("0.0061"),  # 0.0011 + 0.005
        D("0.0061"),
        D("0"),
        False,
    ),
    (
        "web search, Gemini 2.x: one charge per grounded prompt",
        dict(requested_model="gemini-2.5-pro", input_tokens=1_000, output_tokens=100,
             web_search_requests=3),
        D("0.03725"),  # 1000*1.25e-6 + 100*1e-5 + 0.035
        D("0.03725"),
        D("0"),
        False,
    ),
    (
        "web search, Gemini billed per query",
        dict(requested_model="gemini/gemini-robotics-er-2-preview", input_tokens=1_000,
             output_tokens=100, web_search_requests=3),
        D("0.0435"),  # 1000*1e-6 + 100*5e-6 + 3*0.014
        D("0.0435"),
        D("0"),
        False,
    ),
    (
        "a search without a search price: 0, flagged",
        dict(input_tokens=1_000, output_tokens=100, web_search_requests=1),
        D("0.0035"),
        D("0.0035"),
        D("0"),
        True,
    ),
    (
        "tiered_pricing: every token at the tier the input falls in",
        dict(requested_model="dashscope/qwen-plus-2025-07-28", input_tokens=300_000,
             output_tokens=1_000, reasoning_tokens=400),
        D("0.36696"),  # 300000*1.2e-6 + 600*3.6e-6 + 400*1.2e-5
        D("0.36696"),
        D("0"),
        False,
    ),
    (
        "tiered_pricing: the end of a range is in it",
        dict(requested_model="dashscope/qwen-plus-2025-07-28", input_tokens=256_000,
             output_tokens=1_000, reasoning_tokens=400),
        D("0.10472"),  # 256000*4e-7 + 600*1.2e-6 + 400*4e-6
        D("0.10472"),
        D("0"),
        False,
    ),
    (
        "off-peak window (a Saturday): the off-peak rates",
        dict(requested_model="deepseek-v4-pro", input_tokens=1_000, output_tokens=100,
             occurred_at="2026-11-28T10:00:00Z"),
        D("0.000858"),  # 1000*6.6e-7 + 100*1.98e-6
        D("0.000858"),
        D("0"),
        False,
    ),
    (
        "outside the off-peak windows (Friday 08:00 UTC): the standard rates",
        dict(requested_model="deepseek-v4-pro", input_tokens=1_000, output_tokens=100,
             occurred_at="2026-11-27T08:00:00Z"),
        D("0.001716"),  # 1000*1.32e-6 + 100*3.96e-6
        D("0.001716"),
        D("0"),
        False,
    ),
    (
        "flex on a model without flex rates: the standard rates, flagged",
        dict(input_tokens=1_000, output_tokens=100, service_tier="flex"),
        D("0.0035"),
        D("0.0035"),
        D("0"),
        True,
    ),
    (
        "batch on a model without batch rates: half the standard price, flagged",
        dict(requested_model="gpt-4o-audio-preview-2024-12-17", input_tokens=1_000,
             output_tokens=100, service_tier="batch"),
        D("0.00175"),  # (1000*2.5e-6 + 100*1e-5) / 2
        D("0.0035"),
        D("0.00175"),
        True,
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "fields", "cost", "list_value", "saved_tier", "approximated"),
    MODEL_CASES,
    ids=[c[0] for c in MODEL_CASES],
)
def test_price_model(
    name: str,
    fields: dict[str, object],
    cost: Decimal,
    list_value: Decimal,
    saved_tier: Decimal,
    approximated: bool,
) -> None:
    ev = event(**fields)
    q = CATALOG.quote(ev)
    assert (units_to_decimal(q.cost), units_to_decimal(q.list_value)) == (cost, list_value)
    assert units_to_decimal(q.saved_service_tier) == saved_tier
    assert q.approximated is approximated
    assert not q.unknown_model
    assert q.list_value - q.cost == (
        q.saved_prompt_cache + q.saved_semantic_cache + q.saved_routing + q.saved_service_tier
    )
    # The worker's decoded form prices the same.
    wire = decode_usage(msgspec.json.encode(ev.model_dump(mode="json", exclude_none=True)))
    assert CATALOG.quote(wire) == q


def test_savings_split_with_routing_tier_and_cache() -> None:
    # Requested gpt-5, served gpt-4o at batch with cache reads: each cause its own saving.
    q = CATALOG.quote(
        event(requested_model="gpt-5", served_model="gpt-4o", input_tokens=10_000,
              cached_input_tokens=4_000, output_tokens=1_000, service_tier="batch")
    )  # fmt: skip
    # list: 10000*1.25e-6 + 1000*1e-5 = 0.0225; gpt-4o standard: 10000*2.5e-6 + 1000*1e-5 = 0.035
    assert units_to_decimal(q.saved_routing) == D("-0.0125")
    # gpt-4o batch without caches: 10000*1.25e-6 + 1000*5e-6 = 0.0175
    assert units_to_decimal(q.saved_service_tier) == D("0.0175")
    # gpt-4o batch cache reads: no batch cache-read rate, the standard one (1.25e-6), flagged
    assert units_to_decimal(q.cost) == D("0.0175") and q.saved_prompt_cache == 0
    assert q.approximated


def test_quote_keeps_its_positional_form() -> None:
    q = Quote(1, 2, 3, 4, 5, False)
    assert (q.saved_service_tier, q.approximated) == (0, False)


def test_a_price_from_five_rates_prices_every_class() -> None:
    # A ModelPrice built by hand (a negotiated sheet): the other classes fall back, flagged.
    p = ModelPrice(10**18, 3 * 10**18, 10**17, 2 * 10**18, 3 * 10**18)
    cat = PriceCatalog({"m": p}, p)
    q = cat.quote(event(requested_model="m", input_tokens=10, output_tokens=10,
                        output_audio_tokens=5))  # fmt: skip
    assert units_to_decimal(q.cost) == D("0.00004") and q.approximated
    batch = cat.quote(event(requested_model="m", input_tokens=10, service_tier="batch"))
    assert units_to_decimal(batch.cost) == D("0.000005") and batch.approximated


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"input_cost_per_token": 1e-6, "output_cost_per_token": 1e-6,
             "input_cost_per_token_priority": 0.02},
            "input_cost_per_token_priority: price per token 0.02 is outside 0 to 0.01 USD",
        ),
        (
            {"input_cost_per_token": 1e-6, "output_cost_per_token": 1e-6,
             "search_context_cost_per_query": {"search_context_size_low": 2}},
            "price per query 2 is outside 0 to 1 USD",
        ),
        (
            {"tiered_pricing": [{"input_cost_per_token": -1e-6, "range": [0, 10]}]},
            "tiered_pricing input_cost_per_token",
        ),
    ],
    ids=["tier rate above the bound", "search price above the bound", "negative tier"],
)  # fmt: skip
def test_every_priced_family_is_bounded(tmp_path: Path, entry: object, message: str) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"m": entry}))
    with pytest.raises(ConfigError, match=message):
        PriceCatalog.load(overrides=path)


MODELS = sorted(m for m in json.loads(VENDORED_CATALOG.read_text()) if m in CATALOG)
SIZES = st.sampled_from([None, "low", "medium", "high"])


@st.composite
def calls(draw: st.DrawFn) -> UsageEvent:
    def part(total: int) -> int:
        return draw(st.integers(0, total))

    n = draw(st.one_of(st.integers(0, 5_000), st.integers(0, MAX_TOKENS)))
    cached = part(n)
    written = part(n - cached)
    ain = part(n - cached - written)
    out = draw(st.one_of(st.integers(0, 5_000), st.integers(0, MAX_TOKENS)))
    reasoning = part(out)
    aout = part(out - reasoning)
    return event(
        requested_model=draw(st.sampled_from(MODELS)),
        served_model=draw(st.one_of(st.none(), st.sampled_from(MODELS))),
        occurred_at=draw(st.datetimes(datetime(2026, 1, 1), datetime(2027, 1, 1),
                                      timezones=st.just(UTC))),
        input_tokens=n,
        cached_input_tokens=cached,
        cache_write_tokens=written,
        cache_write_1h_tokens=part(written),
        input_audio_tokens=ain,
        input_image_tokens=part(n - cached - written - ain),
        output_tokens=out,
        reasoning_tokens=reasoning,
        output_audio_tokens=aout,
        output_image_tokens=part(out - reasoning - aout),
        service_tier=draw(st.sampled_from(["standard", "batch", "flex", "priority"])),
        web_search_requests=draw(st.sampled_from([0, 0, 1, 3, 1000])),
        search_context_size=draw(SIZES),
        semantic_cache_hit=draw(st.booleans()),
    )  # fmt: skip


# One call's cost is bounded: 2 * 10**8 tokens at 0.01 USD and 1000 searches at 1 USD.
MAX_CALL_UNITS = to_units(D("2001000"))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls())
def test_savings_identity_over_all_models(ev: UsageEvent) -> None:
    q = CATALOG.quote(ev)
    assert q.list_value - q.cost == (
        q.saved_prompt_cache + q.saved_semantic_cache + q.saved_routing + q.saved_service_tier
    )
    assert 0 <= q.cost <= MAX_CALL_UNITS and 0 <= q.list_value <= MAX_CALL_UNITS
    if ev.semantic_cache_hit:
        assert q.cost == 0 and q.saved_semantic_cache == q.list_value
        assert q.saved_prompt_cache == q.saved_routing == q.saved_service_tier == 0
    else:
        assert q.saved_semantic_cache == 0
        if ev.service_tier == "standard":
            assert q.saved_service_tier == 0
        if not (ev.served_model and ev.served_model != ev.requested_model):
            assert q.saved_routing == 0
