"""Differential test: the catalog against an independent implementation, LiteLLM's own cost
calculator, on generated usages across every model of the vendored map.

Both price from the same data: LiteLLM gets each entry of *our* vendored map as
``model_info`` (its public override path, ``cost_per_token(requested_model_info_override=...)``,
is ``generic_cost_per_token`` with that ``model_info``), never its bundled map
(``LITELLM_LOCAL_MODEL_COST_MAP`` keeps it from fetching one). Per usage LiteLLM's price is:
``generic_cost_per_token`` (standard, flex, priority; at the event's time, for off-peak
windows), ``batch_cost_calculator`` (batch), plus the web-search cost of its provider
calculator (``get_cost_for_web_search_request``; Perplexity's own calculator; the per-call
default otherwise). The two must agree to LiteLLM's float precision; every disagreement must
match a row of :data:`EXPECTED`, whose ``check`` verifies that the difference is exactly the
one its reason states, and every row must be met at least once (a stale row fails).
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from schemas import UsageEvent
from stream_processors import VENDORED_CATALOG, PriceCatalog, units_to_decimal

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
litellm = pytest.importorskip(
    "litellm",
    reason="the differential pricing test needs the litellm extra (pip install -e '.[litellm]'; "
    "./dev setup installs it, so CI runs this test)",
)

from litellm.cost_calculator import batch_cost_calculator  # noqa: E402
from litellm.litellm_core_utils.llm_cost_calc.tool_call_cost_tracking import (  # noqa: E402
    StandardBuiltInToolCostTracking,
)
from litellm.litellm_core_utils.llm_cost_calc.utils import generic_cost_per_token  # noqa: E402
from litellm.llms import get_cost_for_web_search_request  # noqa: E402
from litellm.llms.perplexity import cost_calculator as perplexity_calc  # noqa: E402
from litellm.llms.xai.cost_calculator import (  # noqa: E402
    apply_server_side_tool_usage_details_to_usage,
)
from litellm.types.utils import (  # noqa: E402
    CacheCreationTokenDetails,
    CompletionTokensDetailsWrapper,
    PromptTokensDetailsWrapper,
    ServerToolUse,
    Usage,
)

RAW: dict[str, Any] = json.loads(VENDORED_CATALOG.read_text())  # floats: LiteLLM's own view
CATALOG = PriceCatalog.load()
TIERS = ("standard", "batch", "flex", "priority")
MONDAY = datetime(2026, 11, 23, tzinfo=UTC)
SEED = 20261127


def _close(ours: Decimal, theirs: float) -> bool:
    # LiteLLM sums float products: relative 1e-9 is far above its rounding (about 1e-15).
    a = float(ours)
    return abs(a - theirs) <= 1e-9 * max(abs(a), abs(theirs)) + 1e-15


# --- LiteLLM's price of a usage ----------------------------------------------------------


def _usage(ev: UsageEvent) -> Usage:
    written = ev.cache_write_tokens
    details = PromptTokensDetailsWrapper(
        cached_tokens=ev.cached_input_tokens or None,
        cache_creation_tokens=written or None,
        cache_creation_token_details=CacheCreationTokenDetails(
            ephemeral_5m_input_tokens=written - ev.cache_write_1h_tokens,
            ephemeral_1h_input_tokens=ev.cache_write_1h_tokens,
        )
        if written
        else None,
        audio_tokens=ev.input_audio_tokens or None,
        image_tokens=ev.input_image_tokens or None,
        web_search_requests=ev.web_search_requests or None,
    )
    usage = Usage(
        prompt_tokens=ev.input_tokens,
        completion_tokens=ev.output_tokens,
        total_tokens=ev.input_tokens + ev.output_tokens,
        prompt_tokens_details=details,
        completion_tokens_details=CompletionTokensDetailsWrapper(
            reasoning_tokens=ev.reasoning_tokens or None,
            audio_tokens=ev.output_audio_tokens or None,
            image_tokens=ev.output_image_tokens or None,
        ),
        server_tool_use=ServerToolUse(web_search_requests=ev.web_search_requests)
        if ev.web_search_requests
        else None,
    )
    if ev.web_search_requests:  # where xAI's calculator reads the count
        apply_server_side_tool_usage_details_to_usage(
            usage, {"web_search_calls": ev.web_search_requests}
        )
    return usage


def litellm_price(key: str, ev: UsageEvent, monkeypatch: pytest.MonkeyPatch) -> float:
    """LiteLLM's cost of ``ev`` on map entry ``key``, from our map's entry."""
    info = {**RAW[key], "key": key}
    provider = info.get("litellm_provider") or ""
    usage = _usage(ev)
    if ev.service_tier == "batch":
        prompt, completion = batch_cost_calculator(
            usage=usage, model=key, custom_llm_provider=provider, model_info=info
        )
    else:
        prompt, completion = generic_cost_per_token(
            model=key,
            usage=usage,
            custom_llm_provider=provider,
            service_tier=None if ev.service_tier == "standard" else ev.service_tier,
            model_info=info,
            current_time=ev.occurred_at,
        )
    return float(prompt + completion) + _litellm_search(key, ev, info, usage, monkeypatch)


def _litellm_search(
    key: str, ev: UsageEvent, info: dict[str, Any], usage: Usage, mp: pytest.MonkeyPatch
) -> float:
    n = ev.web_search_requests
    if not n:
        return 0.0
    provider = info.get("litellm_provider") or ""
    if provider == "perplexity":
        # Perplexity's calculator prices searches with the tokens: its difference with and
        # without them, from our entry.
        mp.setattr(perplexity_calc, "get_model_info", lambda model, custom_llm_provider: info)
        with_search = sum(perplexity_calc.cost_per_token(model=key, usage=usage))
        plain = ev.model_copy(update={"web_search_requests": 0})
        return float(
            with_search - sum(perplexity_calc.cost_per_token(model=key, usage=_usage(plain)))
        )
    cost = get_cost_for_web_search_request(
        custom_llm_provider=provider, usage=usage, model_info=info
    )
    if cost is None:  # the per-call default path (OpenAI, Azure, Bedrock, ...)
        size = ev.search_context_size
        options = {"search_context_size": size} if size else None
        per_call = StandardBuiltInToolCostTracking.get_cost_for_web_search(
            web_search_options=options,  # type: ignore[arg-type]
            model_info=info,  # type: ignore[arg-type]
        )
        cost = per_call * n
    return float(cost)


# --- generated usages ----------------------------------------------------------------------


def _part(rnd: random.Random, left: int) -> int:
    return 0 if left <= 0 or rnd.random() < 0.5 else rnd.randint(0, left)


def _event(key: str, n: int, tier: str, rnd: random.Random) -> UsageEvent:
    left = n
    cached = _part(rnd, left)
    left -= cached
    written = _part(rnd, left)
    left -= written
    ain = _part(rnd, left)
    iin = _part(rnd, left - ain)
    out = rnd.randint(0, 6000)
    reasoning = _part(rnd, out)
    aout = _part(rnd, out - reasoning)
    iout = _part(rnd, out - reasoning - aout)
    return UsageEvent.model_validate(
        {
            "event_id": "e",
            "org_id": "o",
            "user_id": "u",
            "gateway": "g",
            "requested_model": key,
            # Any minute of a week: weekdays and weekends, inside and outside off-peak windows.
            "occurred_at": MONDAY + timedelta(minutes=rnd.randint(0, 7 * 24 * 60 - 1)),
            "input_tokens": n,
            "cached_input_tokens": cached,
            "cache_write_tokens": written,
            "cache_write_1h_tokens": _part(rnd, written),
            "input_audio_tokens": ain,
            "input_image_tokens": iin,
            "output_tokens": out,
            "reasoning_tokens": reasoning,
            "output_audio_tokens": aout,
            "output_image_tokens": iout,
            "service_tier": tier,
            "web_search_requests": rnd.randint(1, 4) if rnd.random() < 0.25 else 0,
            "search_context_size": rnd.choice((None, "low", "medium", "high")),
        }
    )


def usages() -> Iterator[tuple[str, UsageEvent]]:
    """Per model: a small call at every tier, a call with no input, and calls just below, at
    and just above every threshold (where the inclusive and exclusive rules part) and far
    above the highest, at random tiers."""
    rnd = random.Random(SEED)
    for key in sorted(k for k in RAW if k in CATALOG):
        bounds = CATALOG.lookup(key).price_rules.bounds  # type: ignore[union-attr]
        for tier in TIERS:
            yield key, _event(key, rnd.randint(1, 8000), tier, rnd)
        yield key, _event(key, 0, rnd.choice(TIERS), rnd)
        probes = [n for b in bounds for n in (b, b + 1, b + 2)]
        if bounds:
            probes.append(bounds[-1] + rnd.randint(1, 400_000))
        for n in probes:
            yield key, _event(key, n, rnd.choice(TIERS), rnd)


# --- expected differences ------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """A disagreement that is not an error: when ``applies``, ``check`` must hold."""

    name: str
    reason: str
    applies: Callable[[str, UsageEvent], bool]
    check: Callable[[str, UsageEvent, Decimal, float], bool]


def _units(ev: UsageEvent, **update: Any) -> int:
    return CATALOG.quote(ev.model_copy(update=update)).cost


def _has_batch_input(key: str) -> bool:
    return any(k.startswith("input_cost_per_token") and k.endswith("_batches") for k in RAW[key])


def _half_of_standard(key: str, ev: UsageEvent, ours: Decimal, theirs: float) -> bool:
    # Ours is the standard price of the call's tokens halved, each rate rounded up to
    # 10**-24 USD (so at most half a unit per token above the exact half); searches in full.
    std_tokens = _units(ev, service_tier="standard", web_search_requests=0)
    batch_tokens = _units(ev, web_search_requests=0)
    searches = CATALOG.quote(ev).cost - batch_tokens
    std_searches = _units(ev, service_tier="standard") - std_tokens
    slack = ev.input_tokens + ev.output_tokens
    return searches == std_searches and 0 <= 2 * batch_tokens - std_tokens <= slack


def _tier_1h_above_threshold(key: str, ev: UsageEvent) -> bool:
    if ev.service_tier not in ("flex", "priority") or not ev.cache_write_1h_tokens:
        return False
    sfx = f"_{ev.service_tier}"
    prefix = "cache_creation_input_token_cost_above_1hr_above_"
    for k in RAW[key]:
        if k.startswith(prefix) and not k.endswith(sfx):
            n = int(k[len(prefix) :].split("k_tokens")[0]) * 1000
            if ev.input_tokens > n and f"{k}{sfx}" not in RAW[key]:
                return True
    return False


def _litellm_1h_rate_below_threshold(
    key: str, ev: UsageEvent, ours: Decimal, theirs: float
) -> bool:
    # LiteLLM bills these writes at the below-threshold 1-hour rate; ours at the band's.
    entry = RAW[key]
    price = CATALOG.lookup(key)
    assert price is not None
    our_rate = units_to_decimal(price.rates(ev.service_tier, ev.input_tokens, ev.occurred_at)[3])
    their_rate = entry.get(f"cache_creation_input_token_cost_above_1hr_{ev.service_tier}")
    if their_rate is None:
        their_rate = entry["cache_creation_input_token_cost_above_1hr"]
    expected = float(ours) - ev.cache_write_1h_tokens * (float(our_rate) - their_rate)
    return abs(expected - theirs) <= 1e-9 * abs(theirs) + 1e-15


def _perplexity_size(key: str, ev: UsageEvent) -> bool:
    return (
        RAW[key].get("litellm_provider") == "perplexity"
        and ev.web_search_requests > 0
        and ev.search_context_size in ("medium", "high")
    )


def _perplexity_low_price(key: str, ev: UsageEvent, ours: Decimal, theirs: float) -> bool:
    table = RAW[key]["search_context_cost_per_query"]
    size = table[f"search_context_size_{ev.search_context_size}"]
    expected = float(ours) - ev.web_search_requests * (size - table["search_context_size_low"])
    return abs(expected - theirs) <= 1e-9 * abs(theirs) + 1e-15


def _tiered_no_input(key: str, ev: UsageEvent) -> bool:
    return "tiered_pricing" in RAW[key] and ev.input_tokens == 0


def _litellm_untiered(key: str, ev: UsageEvent, ours: Decimal, theirs: float) -> bool:
    # LiteLLM picks no tier for 0 input tokens and prices at the entry's top-level rates,
    # which most tiered entries do not have (0): never more than ours.
    return theirs <= float(ours)


EXPECTED = (
    Expected(
        "batch without batch rates",
        "documented choice: a batch call on an entry without batch input rates costs half its "
        "standard price (long-context, cache, audio, image and reasoning rates included; rates "
        "rounded up to 10**-24 USD; searches in full). LiteLLM's batch calculator halves only "
        "the flat base input, output, cache-read and cache-write rates, bills a cache read at "
        "0 when the entry has no cache-read rate, and for a tiered_pricing entry takes the "
        "top-level rates (absent: 0).",
        lambda key, ev: ev.service_tier == "batch" and not _has_batch_input(key),
        _half_of_standard,
    ),
    Expected(
        "1-hour writes of a flex or priority call above a threshold",
        "documented choice: without a tier rate the 1-hour write rate above a threshold is the "
        "standard long-context 1-hour rate, as for every other class. LiteLLM looks only for "
        "the tier-suffixed threshold key and, not finding it, keeps the below-threshold 1-hour "
        "rate (it does take the long-context rate at standard tier).",
        _tier_1h_above_threshold,
        _litellm_1h_rate_below_threshold,
    ),
    Expected(
        "Perplexity search context size",
        "documented choice: the call's search_context_size is honoured; LiteLLM's Perplexity "
        "calculator always takes the low size's price.",
        _perplexity_size,
        _perplexity_low_price,
    ),
    Expected(
        "tiered_pricing entry, 0 input tokens",
        "documented choice: a call with no input tokens is in the first tier; LiteLLM selects "
        "no tier for it and prices it at the entry's top-level rates (usually none: 0).",
        _tiered_no_input,
        _litellm_untiered,
    ),
)


@pytest.fixture()
def offline_litellm(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    # batch_cost_calculator resolves the provider again; for some providers (GitHub Copilot)
    # that starts a device login. The provider is given: hand it back.
    monkeypatch.setattr(
        litellm,
        "get_llm_provider",
        lambda model, custom_llm_provider=None, **_: (model, custom_llm_provider, None, None),
    )
    return monkeypatch


def test_catalog_agrees_with_litellm(offline_litellm: pytest.MonkeyPatch) -> None:
    counts: Counter[str] = Counter()
    models: set[str] = set()
    unexplained: list[str] = []
    for key, ev in usages():
        models.add(key)
        counts["usages"] += 1
        ours = units_to_decimal(CATALOG.quote(ev).cost)
        theirs = litellm_price(key, ev, offline_litellm)
        if _close(ours, theirs):
            counts["agree"] += 1
            continue
        row = next((x for x in EXPECTED if x.applies(key, ev)), None)
        if row is not None and row.check(key, ev, ours, theirs):
            counts[row.name] += 1
            continue
        unexplained.append(
            f"{key} ours={ours} litellm={theirs!r} "
            f"{ev.model_dump(exclude_defaults=True, exclude={'event_id', 'org_id', 'user_id'})}"
        )
    summary = ", ".join(f"{k}: {v}" for k, v in counts.items())
    print(f"\n{len(models)} models; {summary}")
    assert not unexplained, f"{len(unexplained)} unexplained:\n" + "\n".join(unexplained[:20])
    assert len(models) == len(CATALOG), "every priced model of the map is exercised"
    assert counts["usages"] >= 10_000
    stale = [x.name for x in EXPECTED if not counts[x.name]]
    assert not stale, f"expected differences never met (stale rows?): {stale}"


def test_litellm_agrees_on_the_worked_examples(offline_litellm: pytest.MonkeyPatch) -> None:
    # The two headline cases, independently: gemini-2.5-pro above 200k tokens, and a Batch API
    # call at the batch rates.
    long_ctx = UsageEvent.model_validate(
        {"event_id": "e", "occurred_at": "2026-11-27T10:00:00Z", "org_id": "o", "user_id": "u",
         "gateway": "g", "requested_model": "gemini-2.5-pro", "input_tokens": 300_000,
         "output_tokens": 1_000}
    )  # fmt: skip
    assert litellm_price("gemini-2.5-pro", long_ctx, offline_litellm) == pytest.approx(0.765)
    batch = long_ctx.model_copy(
        update={"requested_model": "gpt-4o", "input_tokens": 1000, "output_tokens": 100,
                "service_tier": "batch"}
    )  # fmt: skip
    assert litellm_price("gpt-4o", batch, offline_litellm) == pytest.approx(0.00175)
    assert units_to_decimal(CATALOG.quote(batch).cost) == Decimal("0.00175")
