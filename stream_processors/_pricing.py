"""The price catalog and the cost of one call (DESIGN §4; docs/DESIGN.md, "Exact money").

The catalog reads the LiteLLM model-price JSON format with every number parsed as a decimal
(``parse_float=Decimal``), plus an overrides file of the same format (negotiated prices,
self-hosted models). Internally prices are integers of 10**-24 USD per token. What is priced,
from which keys and with which rule (thresholds, service tiers, caches, modalities, web
search, off-peak windows) is in :mod:`stream_processors._price_rules`; it is resolved per
model at load time into one tuple of rates per tier and band of input tokens, so pricing an
event is a table lookup and a handful of integer multiplications.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import InitVar, dataclass, field
from datetime import datetime
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any

from schemas import UsageEvent
from schemas.wire import DecodedEvent
from spendstream.errors import ConfigError
from stream_processors._price_rules import (
    AIN,
    AOUT,
    CR,
    CW,
    CW1H,
    IIN,
    IN,
    IOUT,
    MAX_PRICE_PER_QUERY,
    OUT,
    RS,
    Rates,
    Rules,
    Search,
    build_rules,
    default_rules,
    price_units,
    query_price_units,
)

__all__ = [
    "MAX_PRICE_PER_QUERY",
    "VENDORED_CATALOG",
    "ModelPrice",
    "PriceCatalog",
    "Quote",
    "price_units",
    "query_price_units",
]

VENDORED_CATALOG = Path(__file__).with_name("data") / "litellm_model_prices.json"
_SIZE_INDEX = {"low": 0, "medium": 1, "high": 2}


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """Prices of one model, in units of 10**-24 USD.

    The five fields are the standard-tier rates below any long-context threshold; ``rules``
    (every tier, band, modality and search price, see :mod:`stream_processors._price_rules`)
    defaults to those five with every other rate falling back to them.
    """

    input: int
    output: int
    cache_read: int
    cache_write: int
    reasoning: int
    rules: InitVar[Rules | None] = None
    _rules: Rules = field(init=False, repr=False, compare=False)
    _flat: Rates | None = field(init=False, repr=False, compare=False)
    """The standard-tier rates when they do not depend on the call (no thresholds, no
    off-peak windows): the common case, read without a lookup."""

    def __post_init__(self, rules: Rules | None) -> None:
        if rules is None:
            rules = default_rules(
                self.input, self.output, self.cache_read, self.cache_write, self.reasoning
            )
        object.__setattr__(self, "_rules", rules)
        flat = None if rules.bounds or rules.off_peak else rules.bands["standard"][0]
        object.__setattr__(self, "_flat", flat)

    @property
    def price_rules(self) -> Rules:
        """The model's resolved rate tables."""
        return self._rules

    @classmethod
    def from_entry(cls, name: str, entry: Mapping[str, Any]) -> ModelPrice | None:
        """Build from a LiteLLM entry; ``None`` when the entry is not priced per token."""
        try:
            rules = build_rules(name, entry)
        except ConfigError:
            raise
        except (ArithmeticError, ValueError, TypeError) as exc:
            raise ConfigError(f"price entry {name!r}: {exc}") from exc
        if rules is None:
            return None
        return cls(*rules.base, rules=rules)

    def rates(self, tier: str, input_tokens: int, when: datetime) -> Rates:
        """The rates of a call at ``tier`` with ``input_tokens`` of input at ``when``."""
        rules = self._rules
        table = rules.bands
        if rules.off_peak is not None and rules.off_peak.is_open(when):
            assert rules.off_peak_bands is not None
            table = rules.off_peak_bands
        rows = table[tier]
        return rows[bisect_left(rules.bounds, input_tokens)] if rules.bounds else rows[0]


@dataclass(frozen=True, slots=True)
class Quote:
    """The money side of one priced call, all in units of 10**-24 USD.

    ``list_value`` is the call at the requested model, standard tier, without caches (its
    long-context rates by its own token counts; 0 cost and the whole list value saved on a
    semantic cache hit), and exactly::

        list_value - cost == saved_prompt_cache + saved_semantic_cache + saved_routing
                             + saved_service_tier

    ``saved_routing``: requested vs served model, both at standard tier without caches;
    ``saved_service_tier``: the served model at standard vs at the call's tier, without
    caches; ``saved_prompt_cache``: the rest. Savings are signed (a priority tier or a cache
    write can cost more). ``approximated``: a rate the cost, list value or savings needed is
    not in the map and the closest one was used (see :mod:`stream_processors._price_rules`).
    """

    cost: int
    list_value: int
    saved_prompt_cache: int
    saved_semantic_cache: int
    saved_routing: int
    unknown_model: bool
    saved_service_tier: int = 0
    approximated: bool = False


class PriceCatalog:
    """Model name -> :class:`ModelPrice`, with a fallback that is never free."""

    def __init__(self, prices: Mapping[str, ModelPrice], fallback: ModelPrice) -> None:
        if fallback.input <= 0 and fallback.output <= 0:
            raise ConfigError("the fallback price must not be zero: unknown models are never free")
        self._prices = dict(prices)
        self.fallback = fallback

    def __len__(self) -> int:
        return len(self._prices)

    def __contains__(self, model: object) -> bool:
        return model in self._prices

    @classmethod
    def load(
        cls,
        catalog: Path | None = None,
        overrides: Path | None = None,
        *,
        fallback_input: Decimal = Decimal("0.00001"),
        fallback_output: Decimal = Decimal("0.00003"),
    ) -> PriceCatalog:
        """Read a LiteLLM-format map (default: the vendored copy) and an optional overrides file."""
        prices = dict(_load_file(catalog or VENDORED_CATALOG))
        if overrides is not None:
            prices.update(_load_file(overrides))
        fb_in, fb_out = price_units(fallback_input), price_units(fallback_output)
        fallback = ModelPrice(fb_in, fb_out, fb_in, fb_in, fb_out)
        return cls(prices, fallback)

    def with_overrides(self, overrides: Path) -> PriceCatalog:
        """A copy with the entries of another LiteLLM-format file added or replaced."""
        return PriceCatalog({**self._prices, **_load_file(overrides)}, self.fallback)

    def lookup(self, model: str, provider: str | None = None) -> ModelPrice | None:
        """The price of ``model`` (also tried as ``provider/model`` and without a prefix)."""
        price = self._prices.get(model)
        if price is None and provider:
            price = self._prices.get(f"{provider}/{model}")
        if price is None and "/" in model:
            price = self._prices.get(model.split("/", 1)[1])
        return price

    def estimate(self, model: str, input_tokens: int, output_tokens: int, when: datetime) -> int:
        """The cost (USD units) of a call of at most these tokens on ``model`` at ``when``.

        What an admission holds (docs/DESIGN.md, "Admission (reservations)"): the call as a
        usage event with these counts, standard tier, no cache, no search, quoted like any
        event (an unknown model at the fallback price, never free). A call whose tokens stay
        within these counts at the standard tier costs at most this.
        """
        event = DecodedEvent(
            event_id="estimate",
            occurred_at=when,
            org_id="-",
            user_id="-",
            gateway="-",
            requested_model=model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
        )
        return self.quote(event).cost

    def quote(self, event: UsageEvent | DecodedEvent) -> Quote:
        """Cost, list value and savings of one call, exactly per DESIGN §4."""
        requested = event.requested_model
        served = event.served_model or requested
        prices = self._prices
        sp = prices.get(served) or self.lookup(served, event.provider)
        if served == requested:
            rp = sp
        else:
            rp = prices.get(requested) or self.lookup(requested, event.provider)
        unknown = sp is None or rp is None
        if sp is None:
            sp = self.fallback
        if rp is None:
            rp = self.fallback

        n = event.input_tokens
        ain = event.input_audio_tokens
        iin = event.input_image_tokens
        out = event.output_tokens
        reasoning = event.reasoning_tokens
        aout = event.output_audio_tokens
        iout = event.output_image_tokens
        searches = event.web_search_requests
        when = event.occurred_at
        plain_in = n - ain - iin  # text input, cache reads and writes included
        text_out = out - reasoning - aout - iout
        modal = ain or iin or aout or iout

        # The requested model at standard tier without caches.
        rr = rp._flat or rp.rates("standard", n, when)
        list_value = rr[0] * plain_in + rr[6] * text_out + rr[7] * reasoning
        if modal:
            list_value += rr[4] * ain + rr[5] * iin + rr[8] * aout + rr[9] * iout
        approx = False
        if searches:
            add, approx = _search_cost(rp._rules.search, event.search_context_size, searches)
            list_value += add
        flags = rr[10]
        if flags & _TEXT or (modal and flags):
            approx = approx or _flagged(flags, plain_in, text_out, reasoning, ain, iin, aout, iout)
        if event.semantic_cache_hit:
            return Quote(0, list_value, 0, list_value, 0, unknown, 0, approx)

        tier = event.service_tier
        if sp is rp:
            r = rr
            std_uncached = list_value
        else:
            r = sp._flat or sp.rates("standard", n, when)
            std_uncached = r[0] * plain_in + r[6] * text_out + r[7] * reasoning
            if modal:
                std_uncached += r[4] * ain + r[5] * iin + r[8] * aout + r[9] * iout
            if searches:
                add, flag = _search_cost(sp._rules.search, event.search_context_size, searches)
                std_uncached += add
                approx = approx or flag
            approx = approx or _flagged(r[10], plain_in, text_out, reasoning, ain, iin, aout, iout)
        tier_uncached = std_uncached
        if tier != "standard":
            r = sp.rates(tier, n, when)
            tier_uncached = r[0] * plain_in + r[6] * text_out + r[7] * reasoning
            if modal:
                tier_uncached += r[4] * ain + r[5] * iin + r[8] * aout + r[9] * iout
            if searches:
                search = sp._rules.search
                tier_uncached += _search_cost(search, event.search_context_size, searches)[0]
            approx = approx or _flagged(r[10], plain_in, text_out, reasoning, ain, iin, aout, iout)
        cost = tier_uncached
        cached = event.cached_input_tokens
        written = event.cache_write_tokens
        if cached or written:
            w1h = event.cache_write_1h_tokens
            w5m = written - w1h
            ri = r[0]
            cost += (r[1] - ri) * cached + (r[2] - ri) * w5m + (r[3] - ri) * w1h
            if r[10]:
                cache_used = (CR if cached else 0) | (CW if w5m else 0) | (CW1H if w1h else 0)
                approx = approx or bool(r[10] & cache_used)
        return Quote(
            cost=cost,
            list_value=list_value,
            saved_prompt_cache=tier_uncached - cost,
            saved_semantic_cache=0,
            saved_routing=list_value - std_uncached,
            unknown_model=unknown,
            saved_service_tier=std_uncached - tier_uncached,
            approximated=approx,
        )


_TEXT = IN | OUT | RS


def _flagged(
    flags: int,
    plain_in: int,
    text_out: int,
    reasoning: int,
    ain: int,
    iin: int,
    aout: int,
    iout: int,
) -> bool:
    """Whether a class of the call without caches (plain input, text output, reasoning,
    input audio, input image, output audio, output image) has an approximated rate."""
    if not flags:
        return False
    return bool(
        flags
        & (
            (IN if plain_in else 0)
            | (OUT if text_out else 0)
            | (RS if reasoning else 0)
            | (AIN if ain else 0)
            | (IIN if iin else 0)
            | (AOUT if aout else 0)
            | (IOUT if iout else 0)
        )
    )


def _search_cost(search: Search, size: str | None, searches: int) -> tuple[int, bool]:
    """Price of ``searches`` web searches at ``size`` (the model's default when None)."""
    price, flagged = search.prices[search.default_size if size is None else _SIZE_INDEX[size]]
    return price * (1 if search.per_prompt else searches), flagged


@lru_cache(maxsize=8)
def _load_file(path: Path) -> Mapping[str, ModelPrice]:
    try:
        with path.open("rb") as fh:
            raw = json.load(fh, parse_float=Decimal)
    except OSError as exc:
        raise ConfigError(f"cannot read price file {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigError(f"price file {path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"price file {path} must hold a JSON object of model -> prices")
    prices: dict[str, ModelPrice] = {}
    for name, entry in raw.items():
        if name == "sample_spec" or not isinstance(entry, dict):
            continue
        price = ModelPrice.from_entry(name, entry)
        if price is not None:
            prices[name] = price
    return prices
