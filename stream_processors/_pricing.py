"""The price catalog and the cost of one call (DESIGN §4).

The catalog reads the LiteLLM model-price JSON format with every number parsed as a decimal
(``parse_float=Decimal``), plus an overrides file of the same format (negotiated prices,
self-hosted models). Internally prices are integers of 10**-24 USD per token, so pricing an
event is a handful of integer multiplications.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any

from schemas import MAX_PRICE_PER_TOKEN, UsageEvent
from schemas._wire import DecodedEvent
from spendstream.errors import ConfigError
from stream_processors._money import to_units

VENDORED_CATALOG = Path(__file__).with_name("data") / "litellm_model_prices.json"


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """Per-token prices of one model, in units of 10**-24 USD."""

    input: int
    output: int
    cache_read: int
    cache_write: int
    reasoning: int

    @classmethod
    def from_entry(cls, name: str, entry: Mapping[str, Any]) -> ModelPrice | None:
        """Build from a LiteLLM entry; ``None`` when the entry is not priced per token."""
        inp = entry.get("input_cost_per_token")
        out = entry.get("output_cost_per_token")
        if inp is None or out is None:
            return None
        try:
            inp_u, out_u = price_units(inp), price_units(out)

            def opt(field: str, default: int) -> int:
                raw = entry.get(field)
                return default if raw is None else price_units(raw)

            return cls(
                input=inp_u,
                output=out_u,
                cache_read=opt("cache_read_input_token_cost", inp_u),
                cache_write=opt("cache_creation_input_token_cost", inp_u),
                reasoning=opt("output_cost_per_reasoning_token", out_u),
            )
        except (ConfigError, ArithmeticError, ValueError, TypeError) as exc:
            raise ConfigError(f"price entry {name!r}: {exc}") from exc


_MAX_PRICE_UNITS = to_units(MAX_PRICE_PER_TOKEN)


def price_units(value: Any) -> int:
    """A per-token price in units of 10**-24 USD; :class:`ConfigError` unless it is an exact
    number from 0 to :data:`~schemas.MAX_PRICE_PER_TOKEN` (the bound that keeps every sum
    storable, see docs/DESIGN.md)."""
    units = to_units(_dec(value))
    if not 0 <= units <= _MAX_PRICE_UNITS:
        raise ConfigError(f"price per token {value} is outside 0 to {MAX_PRICE_PER_TOKEN} USD")
    return units


def _dec(value: Any) -> Decimal:
    if isinstance(value, Decimal):
        return value
    if isinstance(value, bool) or not isinstance(value, int | str):
        # A float here means someone parsed the file with floats: refuse rather than round.
        raise ConfigError(f"price {value!r} is not an exact number")
    return Decimal(value)


@dataclass(frozen=True, slots=True)
class Quote:
    """The money side of one priced call, all in units of 10**-24 USD.

    ``list_value - cost == saved_prompt_cache + saved_semantic_cache + saved_routing``.
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

    def lookup(self, model: str, provider: str | None = None) -> ModelPrice | None:
        """The price of ``model`` (also tried as ``provider/model`` and without a prefix)."""
        price = self._prices.get(model)
        if price is None and provider:
            price = self._prices.get(f"{provider}/{model}")
        if price is None and "/" in model:
            price = self._prices.get(model.split("/", 1)[1])
        return price

    def quote(self, event: UsageEvent | DecodedEvent) -> Quote:
        """Cost, list value and savings of one call, exactly per DESIGN §4."""
        served = event.served_model or event.requested_model
        served_price = self.lookup(served, event.provider)
        requested_price = (
            served_price
            if served == event.requested_model
            else self.lookup(event.requested_model, event.provider)
        )
        unknown = served_price is None or requested_price is None
        sp = served_price or self.fallback
        rp = requested_price or self.fallback

        inp, out = event.input_tokens, event.output_tokens
        cached, written, reasoning = (
            event.cached_input_tokens,
            event.cache_write_tokens,
            event.reasoning_tokens,
        )
        plain_out = out - reasoning
        # List value: the same tokens at the requested model, no cache discount, no semantic cache.
        list_value = inp * rp.input + plain_out * rp.output + reasoning * rp.reasoning
        if event.semantic_cache_hit:
            return Quote(0, list_value, 0, list_value, 0, unknown)
        cost = (
            (inp - cached - written) * sp.input
            + cached * sp.cache_read
            + written * sp.cache_write
            + plain_out * sp.output
            + reasoning * sp.reasoning
        )
        served_uncached = inp * sp.input + plain_out * sp.output + reasoning * sp.reasoning
        return Quote(
            cost=cost,
            list_value=list_value,
            saved_prompt_cache=served_uncached - cost,
            saved_semantic_cache=0,
            saved_routing=list_value - served_uncached,
            unknown_model=unknown,
        )


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
