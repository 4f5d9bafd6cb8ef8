"""How one LiteLLM price entry becomes per-call rate tables (the price model, DESIGN §4).

The catalog prices every per-token and per-request key family of the LiteLLM map that a chat,
completion or responses call uses, with LiteLLM's semantics (the generic cost calculator
``generic_cost_per_token``, its batch calculator and its web-search calculators), resolved
once per model at load time. Each model gets, per service tier and per *band* of input tokens
(the long-context thresholds), one tuple of integer rates in units of 10**-24 USD, so pricing
an event is a table lookup and a handful of integer multiplications.

Priced families (counts are entries of the vendored map that carry them):

=============================================  ======  ==========================================
family                                         models  rule
=============================================  ======  ==========================================
``input_cost_per_token``, ``output_cost_per_``   3922  plain input and output tokens
``token``
``cache_read_input_token_cost``                  1916  cache reads; absent: the input rate
``cache_creation_input_token_cost``               555  cache writes; absent: the input rate
``cache_creation_input_token_cost_above_1hr``     233  1-hour cache writes; absent: the write rate
``output_cost_per_reasoning_token``                75  reasoning tokens; absent: the output rate
``*_above_{N}_tokens`` (32k ... 512k)         104+163  all rates of a call whose input exceeds N
                                               (200k,  (>= N for xAI) where the entry defines them
                                               272k)
``*_batches``, ``*_flex``, ``*_priority``   592, 312,  service tiers, alone and with thresholds
                                                  433
``tiered_pricing``                                 54  all tokens at the tier the input falls in
``input_cost_per_audio_token`` (+tiers, N)        134  input audio; absent: the input rate
``output_cost_per_audio_token``                    84  output audio; absent: the output rate
``input_cost_per_image_token`` (+batches)         127  input images; absent: the input rate
``output_cost_per_image_token`` (+tiers)           61  output images; absent: the output rate
``search_context_cost_per_query``                 503  web searches by context size, per query
                                                       (per grounded prompt for Gemini 2.x)
``off_peak_pricing``                               10  the off-peak rates inside their windows
=============================================  ======  ==========================================

Left out, deliberately:

- per-second (``*_per_second*``, ``cost_per_second``; 139 + 147 + 28 entries), per-character
  (``*_per_character*``, 52), per-image and per-pixel generation (``input_cost_per_image``,
  ``output_cost_per_image*``, ``*_per_pixel``; 99 + 346 + 68), per-page OCR and annotation,
  per-query search/rerank endpoints (``input_cost_per_query``, 50), ``input_cost_per_request``
  (4), ``input_cost_per_text_message`` (3), ``ocr_cost_per_credit`` (2),
  ``guardrail_cost_per_unit`` (1), video (``*_video_*``; 16 + 8 token rates): not chat-call
  token prices, or the event carries no seconds, characters, images, pages, messages or video
  tokens to multiply them by;
- regional and speed uplifts (``regional_processing_uplift_multiplier_*``,
  ``fedramp_uplift_multiplier``, ``regional_endpoint_uplift_multiplier``,
  ``provider_specific_entry``; 25 + 112 + 39 + 91): the event does not say where or how fast
  the call was served;
- ``cache_read_input_audio_token_cost`` and ``cache_read_input_image_token_cost`` (39, 37):
  the event's cache reads are not split by modality, so they are text cache reads, as LiteLLM
  prices a usage without ``cached_tokens_details``;
- ``cache_creation_input_token_cost_above_12hr*`` (12): the event has no 12-hour write class;
- ``input_cost_per_token_cache_hit`` (43): DeepSeek's older name of the cache-read rate, which
  the same entries carry as ``cache_read_input_token_cost``; LiteLLM does not read it;
- ``explicit_cache_read_input_token_cost`` (5): needs to know the cache was explicit;
- tiers the contract does not have (``_ultrafast``, ``_balanced``, ``_decisions``; 8, 10, 1);
- ``google_maps_grounding_cost_per_query`` (49), ``code_interpreter_cost_per_session`` (2),
  ``citation_cost_per_token`` (1), ``search_free_requests`` (49, a daily free quota): the
  event does not count them;
- ``input_dbu_cost_per_token`` / ``output_dbu_cost_per_token`` (80, 77): Databricks DBUs, a
  unit that is not USD; the same entries carry the USD rate.

Semantics (LiteLLM's unless said otherwise):

- **Thresholds.** A call crosses ``N`` when its input tokens (all of them: cached, written,
  audio and image included) exceed ``N`` (``>=`` for xAI). Every rate the entry defines at the
  highest crossed threshold replaces the lower one, for every token class of the call.
- **Tiers.** A tier rate is the tier-suffixed key (``input_cost_per_token_priority``, or
  ``output_cost_per_token_above_272k_tokens_priority`` above a threshold), else the standard
  key of the same band. Batch follows LiteLLM's batch calculator: ``*_batches`` keys (with
  their own thresholds); absent batch cache rates fall back to the standard ones; an entry
  with no batch input rate is priced at half the standard price of the call.
- **Fallbacks, flagged.** Wherever the entry does not define the rate a token class of the
  call needs (a tier, a threshold, a modality, a cache class, a search price), the call is
  priced at the closest rate LiteLLM would use and the rate is *approximated*:

  ==================================  =====================================================
  missing                             closest rate used
  ==================================  =====================================================
  tier rate (flex, priority)          the standard rate of the same band
  batch rate, no batch input rate     half the standard rate of the same band, rounded up
                                      to 10**-24 USD
  batch rate of one class             batch cache read: the standard cache-read rate;
                                      batch reasoning and output audio: the batch output
                                      rate; batch writes: the batch input rate
  rate above a crossed threshold      the rate of the band below
  cache read / cache write            the input rate of the band
  1-hour cache write                  the cache-write rate of the band
  input / output audio                the input / output rate of the band
  output image                        the output rate of the band
  search price                        LiteLLM's list price for Gemini and Vertex (0.035 USD
                                      per grounded prompt) and xAI (0.005 USD); else 0
  ==================================  =====================================================

  Two fallbacks are the providers' own rule and are not flagged: reasoning tokens without a
  reasoning rate are output tokens (OpenAI, Anthropic, Google bill them so; 75 entries say
  otherwise), and input image tokens without an image rate are input tokens (2251 vision
  entries, 127 with an image rate). A cache read on fireworks_ai without a cache-read rate is
  half the input rate (LiteLLM's default for that provider), flagged.
- **Our choices where LiteLLM differs** (each one in tests/unit/test_pricing_litellm.py's
  table of expected differences): a batch call on an entry without batch input rates is half
  of the whole standard price of the call (thresholds, caches and modalities included; LiteLLM
  halves only the flat base rates and prices cache reads without a cache-read rate at 0);
  a call with 0 input tokens on a ``tiered_pricing`` entry is in the first tier (LiteLLM has
  no tier for it and prices it at 0); the call's ``search_context_size`` is honoured for
  Perplexity (LiteLLM always takes ``low`` there); 1-hour writes of a flex or priority call
  above a threshold, on an entry without that tier's rates, are at the standard long-context
  1-hour rate like every other class (LiteLLM keeps the below-threshold 1-hour rate there).
- **Web search.** ``search_context_cost_per_query[search_context_size_{size}]`` per search,
  size ``medium`` when unset (``low`` for Perplexity, as LiteLLM); Gemini and Vertex Gemini
  models bill one charge per grounded prompt unless ``web_search_billing_unit`` is
  ``per_query``.
- **Off-peak.** Inside a window of ``off_peak_pricing`` (at the event's ``occurred_at``) its
  rates replace the input, output, cache and reasoning rates of every band and tier but batch.

Bounds: every per-token rate passes :func:`price_units` (0 to
:data:`~schemas.MAX_PRICE_PER_TOKEN`), every per-query price :func:`query_price_units` (0 to
:data:`MAX_PRICE_PER_QUERY`); with at most 10**8 tokens per class (input classes summing to
``input_tokens``, output classes to ``output_tokens``) and at most 1000 web searches, one call
costs at most 2 * 10**8 * 0.01 + 1000 * 1 = 2,001,000 USD.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, time, tzinfo
from decimal import Decimal
from typing import Any, Final, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from schemas import MAX_PRICE_PER_TOKEN
from spendstream.errors import ConfigError
from stream_processors._money import to_units

_T = TypeVar("_T")

MAX_PRICE_PER_QUERY: Final = Decimal("1")
"""Upper bound on a per-query (web search) price; the map's highest is 0.14 USD."""

TIERS: Final = ("standard", "batch", "flex", "priority")
SIZES: Final = ("low", "medium", "high")

# Token classes of a call, as bits of a rate tuple's flags (which rates are approximated).
IN, CR, CW, CW1H, AIN, IIN, OUT, RS, AOUT, IOUT = (1 << i for i in range(10))
ALL_CLASSES: Final = (1 << 10) - 1

Rates = tuple[int, int, int, int, int, int, int, int, int, int, int]
"""Per-token rates of one (tier, band): input, cache read, cache write, 1-hour cache write,
input audio, input image, output, reasoning, output audio, output image; then the flags of
the approximated ones."""

# Base keys of the families, by token class.
_IN = "input_cost_per_token"
_OUT = "output_cost_per_token"
_CR = "cache_read_input_token_cost"
_CW = "cache_creation_input_token_cost"
_CW1H = "cache_creation_input_token_cost_above_1hr"
_RS = "output_cost_per_reasoning_token"
_AIN = "input_cost_per_audio_token"
_IIN = "input_cost_per_image_token"
_AOUT = "output_cost_per_audio_token"
_IOUT = "output_cost_per_image_token"
_MAIN = (_IN, _OUT, _CR, _CW, _CW1H)
_PRICED = (*_MAIN, _RS, _AIN, _IIN, _AOUT, _IOUT)
_SUFFIX: Final = {"standard": "", "batch": "_batches", "flex": "_flex", "priority": "_priority"}
_KEY = re.compile(
    r"(?P<base>[a-z0-9_]+?)(?:_above_(?P<n>\d+)(?P<k>k?)_tokens)?(?P<sfx>_batches|_flex|_priority)?"
)
# LiteLLM's list prices where an entry has no search price (its Gemini and xAI calculators).
_GOOGLE_SEARCH_DEFAULT: Final = Decimal("0.035")
_XAI_SEARCH_DEFAULT: Final = Decimal("0.005")
_INCLUSIVE_PROVIDERS: Final = frozenset({"xai"})
_MAX_PRICE_UNITS = to_units(MAX_PRICE_PER_TOKEN)
_MAX_QUERY_UNITS = to_units(MAX_PRICE_PER_QUERY)


def price_units(value: Any) -> int:
    """A per-token price in units of 10**-24 USD; :class:`ConfigError` unless it is an exact
    number from 0 to :data:`~schemas.MAX_PRICE_PER_TOKEN` (the bound that keeps every sum
    storable, see docs/DESIGN.md)."""
    units = to_units(_dec(value))
    if not 0 <= units <= _MAX_PRICE_UNITS:
        raise ConfigError(f"price per token {value} is outside 0 to {MAX_PRICE_PER_TOKEN} USD")
    return units


def query_price_units(value: Any) -> int:
    """A per-query price in units of 10**-24 USD: an exact number from 0 to
    :data:`MAX_PRICE_PER_QUERY`, else :class:`ConfigError`."""
    units = to_units(_dec(value))
    if not 0 <= units <= _MAX_QUERY_UNITS:
        raise ConfigError(f"price per query {value} is outside 0 to {MAX_PRICE_PER_QUERY} USD")
    return units


def _dec(value: Any) -> Decimal:
    if isinstance(value, Decimal):
        return value
    if isinstance(value, bool) or not isinstance(value, int | str):
        # A float here means someone parsed the file with floats: refuse rather than round.
        raise ConfigError(f"price {value!r} is not an exact number")
    return Decimal(value)


def _half(units: int) -> int:
    # Rounded up: a rate with 24 decimal places and an odd last digit has no exact half at
    # this scale (bigmodel/glm-5.3-flash's cache read, 3.2857142857142855e-08, is one).
    return -(-units // 2)


@dataclass(frozen=True, slots=True)
class OffPeak:
    """The windows of an entry's ``off_peak_pricing`` (LiteLLM's rule: ``HH:MM-HH:MM`` in
    UTC, start inclusive, end exclusive, wrapping past midnight, equal ends the whole day;
    ``weekdays`` 1-7 read on ``weekday_timezone``'s calendar, UTC by default)."""

    every_day: tuple[tuple[int, int], ...]
    by_weekday: tuple[tuple[frozenset[int] | None, tuple[tuple[int, int], ...]], ...]
    calendar: tzinfo

    def is_open(self, when: datetime) -> bool:
        """Whether ``when`` (aware) falls in an off-peak window."""
        utc = when.astimezone(UTC)
        now = (utc.hour * 3600 + utc.minute * 60 + utc.second) * 1_000_000 + utc.microsecond
        if _in_windows(self.every_day, now):
            return True
        if not self.by_weekday:
            return False
        weekday = utc.astimezone(self.calendar).isoweekday()
        return any(
            (days is None or weekday in days) and _in_windows(windows, now)
            for days, windows in self.by_weekday
        )


def _in_windows(windows: tuple[tuple[int, int], ...], now: int) -> bool:
    for start, end in windows:
        if (start <= now < end) if start < end else (now >= start or now < end):
            return True
    return False


def _parse_windows(value: Any) -> tuple[tuple[int, int], ...]:
    items = (value,) if isinstance(value, str) else value if isinstance(value, list) else ()
    out = []
    for item in items:
        try:
            start, end = (time.fromisoformat(p.strip()) for p in str(item).split("-"))
        except ValueError:
            continue  # LiteLLM ignores a malformed window
        out.append(tuple(((t.hour * 60 + t.minute) * 60) * 1_000_000 for t in (start, end)))
    return tuple((s, e) for s, e in out)


def _parse_off_peak(block: Mapping[str, Any]) -> OffPeak:
    zone = block.get("weekday_timezone")
    calendar: tzinfo = UTC
    if isinstance(zone, str) and zone.strip():
        try:
            calendar = ZoneInfo(zone.strip())
        except (ValueError, ZoneInfoNotFoundError):
            calendar = UTC
    rules = []
    for rule in block.get("windows") or ():
        if not isinstance(rule, Mapping):
            continue
        days = rule.get("weekdays")
        day_set = None if days is None else frozenset(d for d in days if isinstance(d, int))
        rules.append((day_set, _parse_windows(rule.get("hours_utc"))))
    return OffPeak(_parse_windows(block.get("hours_utc")), tuple(rules), calendar)


@dataclass(frozen=True, slots=True)
class Search:
    """Web-search pricing of a model: per size (low, medium, high) the price in units and
    whether it is approximated; the size used when the call names none; whether a call is
    charged once per grounded prompt rather than per search."""

    prices: tuple[tuple[int, bool], tuple[int, bool], tuple[int, bool]]
    default_size: int
    per_prompt: bool


NO_SEARCH_PRICE: Final = Search(((0, True), (0, True), (0, True)), 1, False)


@dataclass(frozen=True, slots=True)
class Rules:
    """Everything the catalog needs to price calls to one model, precomputed."""

    base: tuple[int, int, int, int, int]
    """Standard tier, first band: input, output, cache read, cache write, reasoning."""
    bounds: tuple[int, ...]
    """Ascending: the band of a call is the number of bounds below its input tokens."""
    bands: Mapping[str, tuple[Rates, ...]]
    off_peak: OffPeak | None
    off_peak_bands: Mapping[str, tuple[Rates, ...]] | None
    search: Search


class _Entry:
    """One map entry's keys indexed by (family, threshold, tier suffix); values validated
    (:func:`price_units`) when first used."""

    def __init__(self, name: str, raw: Mapping[str, Any]) -> None:
        self.name = name
        self.raw = raw
        self.provider = str(raw.get("litellm_provider") or "")
        self.keys: dict[tuple[str, int, str], str] = {}
        self.thresholds: dict[str, dict[str, set[int]]] = {}
        self.units: dict[str, int] = {}
        for key, value in raw.items():
            if value is None or isinstance(value, dict | list):
                continue
            match = _KEY.fullmatch(key)
            if match is None or match["base"] not in _PRICED:
                continue
            n = int(match["n"]) * (1000 if match["k"] else 1) if match["n"] else 0
            sfx = match["sfx"] or ""
            self.keys[(match["base"], n, sfx)] = key
            if n:
                self.thresholds.setdefault(match["base"], {}).setdefault(sfx, set()).add(n)

    def get(self, base: str, n: int = 0, sfx: str = "") -> int | None:
        key = self.keys.get((base, n, sfx))
        if key is None:
            return None
        units = self.units.get(key)
        if units is None:
            try:
                units = self.units[key] = price_units(self.raw[key])
            except (ConfigError, ArithmeticError, ValueError, TypeError) as exc:
                raise ConfigError(f"price entry {self.name!r}: {key}: {exc}") from exc
        return units

    def has(self, base: str, n: int = 0, sfx: str = "") -> bool:
        return (base, n, sfx) in self.keys

    def has_any(self, base: str) -> bool:
        return any(k[0] == base for k in self.keys)

    def tier_get(self, base: str, n: int, sfx: str) -> int | None:
        """The tier key, else the standard key of the same threshold (LiteLLM's fallback)."""
        if sfx:
            value = self.get(base, n, sfx)
            if value is not None:
                return value
        return self.get(base, n)

    def crossed(
        self, bases: tuple[str, ...], sfxs: tuple[str, ...], band: tuple[int, ...]
    ) -> list[int]:
        """The thresholds among ``band`` (the crossed ones) at which one of ``bases`` has a
        key with one of ``sfxs``, ascending."""
        found = {
            n
            for b in bases
            for s in sfxs
            for n in self.thresholds.get(b, {}).get(s, ())
            if n in band
        }
        return sorted(found)


def build_rules(name: str, raw: Mapping[str, Any]) -> Rules | None:
    """The rules of one LiteLLM entry; ``None`` when it has no per-token chat prices.

    :class:`ConfigError` (naming the entry and key) when a price it uses is not an exact
    number within its bound.
    """
    entry = _Entry(name, raw)
    tiers = _token_tiers(entry)
    if tiers is None and (not entry.has(_IN) or not entry.has(_OUT)):
        return None
    all_n: set[int] = set()
    for by_sfx in entry.thresholds.values():
        for ns in by_sfx.values():
            all_n |= ns
    inclusive = entry.provider in _INCLUSIVE_PROVIDERS
    if tiers is not None:
        thresholds = [start for start, _ in tiers[1:]]
        inclusive = False  # tier ranges are start < tokens <= end for every provider
    else:
        thresholds = sorted(all_n)
    bounds = tuple(n - 1 if inclusive else n for n in thresholds)
    bands_crossed = [tuple(thresholds[:i]) for i in range(len(thresholds) + 1)]
    off_peak_raw = raw.get("off_peak_pricing")
    peak_block = off_peak_raw if isinstance(off_peak_raw, Mapping) else None
    off_peak = None if peak_block is None else _parse_off_peak(peak_block)

    def table(peak: Mapping[str, Any] | None) -> dict[str, tuple[Rates, ...]]:
        out: dict[str, tuple[Rates, ...]] = {}
        for tier in TIERS:
            rows = []
            for i, crossed in enumerate(bands_crossed):
                if tiers is not None:
                    std = _tiered_rates(entry, tiers[i][1], peak)
                    rows.append(_degrade(std, tier))
                else:
                    rows.append(_rates(entry, tier, crossed, peak))
            out[tier] = tuple(rows)
        return out

    bands = table(None)
    off_peak_bands = None
    if peak_block is not None:
        off_peak_bands = table(_off_peak_units(entry, peak_block))
        off_peak_bands["batch"] = bands["batch"]  # LiteLLM's batch calculator has no off-peak
    first = bands["standard"][0]
    try:
        search = _search(entry)
    except ConfigError as exc:
        raise ConfigError(f"price entry {name!r}: {exc}") from exc
    return Rules(
        base=(first[0], first[6], first[1], first[2], first[7]),
        bounds=bounds,
        bands=bands,
        off_peak=off_peak,
        off_peak_bands=off_peak_bands,
        search=search,
    )


def default_rules(inp: int, out: int, cache_read: int, cache_write: int, reasoning: int) -> Rules:
    """Rules of a price given by its five standard rates only (the fallback, or a
    :class:`~stream_processors.ModelPrice` built by hand): every other rate falls back."""
    std: Rates = (inp, cache_read, cache_write, cache_write, inp, inp, out, reasoning, out, out,
                  CW1H | AIN | AOUT | IOUT)  # fmt: skip
    bands = {tier: (_degrade(std, tier),) for tier in TIERS}
    return Rules((inp, out, cache_read, cache_write, reasoning), (), bands, None, None,
                 NO_SEARCH_PRICE)  # fmt: skip


def _degrade(std: Rates, tier: str) -> Rates:
    """A tier's rates where the entry has none of its own: flex and priority at the standard
    rates, batch at half of them; every class approximated."""
    if tier == "standard":
        return std
    if tier == "batch":
        h = [_half(r) for r in std[:10]]
        return (h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9], ALL_CLASSES)
    return (*std[:10], ALL_CLASSES)


def _rates(
    entry: _Entry, tier: str, crossed: tuple[int, ...], peak: Mapping[str, Any] | None
) -> Rates:
    if tier == "batch":
        return _batch_rates(entry, crossed, peak)
    sfx = _SUFFIX[tier]
    sfxs = ("", sfx) if sfx else ("",)
    main_n = entry.crossed(_MAIN, sfxs, crossed)
    audio_n = entry.crossed((_AIN,), sfxs, crossed)
    top = max([*main_n, *audio_n], default=0)

    def exact(base: str) -> bool:
        return entry.has(base, top, sfx)

    inp = entry.tier_get(_IN, 0, sfx)
    out = entry.tier_get(_OUT, 0, sfx)
    cr = entry.tier_get(_CR, 0, sfx)
    cw = entry.tier_get(_CW, 0, sfx)
    cw1h = entry.tier_get(_CW1H, 0, sfx)
    assert inp is not None and out is not None
    if out == 0 and entry.has(_IOUT):
        # LiteLLM: an entry priced by output image tokens only bills all output so.
        out = entry.get(_IOUT) or 0
    for n in main_n:
        inp = _first(entry.tier_get(_IN, n, sfx), inp)
        out = _first(entry.tier_get(_OUT, n, sfx), out)
        cr = _first(entry.tier_get(_CR, n, sfx), cr)
        cw = _first(entry.tier_get(_CW, n, sfx), cw)
        cw1h = _first(entry.tier_get(_CW1H, n, sfx), cw1h)
    flags = 0
    for bit, base in ((IN, _IN), (OUT, _OUT), (CR, _CR), (CW, _CW), (CW1H, _CW1H)):
        if not exact(base):
            flags |= bit
    if cr is None and entry.provider == "fireworks_ai":
        cr = _half(entry.get(_IN) or 0)  # LiteLLM's default cache-read rate for fireworks_ai
    if peak is not None:
        inp = peak.get(_IN, inp)
        out = peak.get(_OUT, out)
        cr = peak.get(_CR, cr)
        cw = peak.get(_CW, cw)
        for bit, base in ((IN, _IN), (OUT, _OUT), (CR, _CR), (CW, _CW)):
            if base in peak:
                flags &= ~bit
    if cr is None:
        cr = inp
    if cw is None:
        cw = inp
    if cw1h is None:
        cw1h = cw

    # Reasoning: the tier's own reasoning rate, else (the tier having its own output rate) the
    # output rate, else the standard reasoning rate, else the output rate.
    has_reasoning = entry.has_any(_RS)
    if sfx and entry.has(_RS, 0, sfx):
        rs = entry.get(_RS, 0, sfx) or 0
    elif sfx and entry.has(_OUT, 0, sfx):
        rs = out
    else:
        rs = _first(entry.get(_RS), out)
    if peak is not None and _RS in peak:
        rs = peak[_RS]
    elif not has_reasoning:
        flags |= (flags & OUT) and RS
    elif not exact(_RS):
        flags |= RS

    # Input audio: the key at the highest crossed audio threshold (tier, else standard), else
    # the base audio key, else the input rate.
    audio_top = max(audio_n, default=0)
    ain = entry.tier_get(_AIN, audio_top, sfx)
    if ain is None:
        ain = inp
        flags |= AIN
    elif not exact(_AIN):
        flags |= AIN
    # Input images: no thresholds in LiteLLM; without an image rate, input tokens.
    iin = entry.tier_get(_IIN, 0, sfx)
    if iin is None:
        iin = inp
        flags |= flags & IN and IIN
    elif not exact(_IIN):
        flags |= IIN
    # Output audio: LiteLLM reads the standard key only.
    aout = entry.get(_AOUT)
    if aout is None or sfx or top:
        flags |= AOUT
    aout = _first(aout, out)
    iout = entry.tier_get(_IOUT, 0, sfx)
    if iout is None or not exact(_IOUT):
        flags |= IOUT
    iout = _first(iout, out)
    return (inp, cr, cw, cw1h, ain, iin, out, rs, aout, iout, flags)


def _first(value: _T | None, default: _T) -> _T:
    return default if value is None else value


def _batch_rates(entry: _Entry, crossed: tuple[int, ...], peak: Mapping[str, Any] | None) -> Rates:
    """LiteLLM's batch calculator: ``*_batches`` keys with their own thresholds."""
    bs = "_batches"

    def batch(base: str) -> int | None:
        # The batch key at the highest crossed batch threshold of this family, else flat.
        ns = entry.crossed((base,), (bs,), crossed)
        if ns:
            return entry.get(base, ns[-1], bs)
        return entry.get(base, 0, bs)

    inp = batch(_IN)
    std = _rates(entry, "standard", crossed, peak)
    if inp is None:
        return _degrade(std, "batch")
    every = entry.crossed((*_MAIN, _AIN), ("", bs), crossed)
    top = max(every, default=0)
    flags = 0 if entry.has(_IN, top, bs) else IN
    # Cache reads: the batch rate, else the standard one (thresholds followed), else input.
    cr = batch(_CR)
    if cr is None or not entry.has(_CR, top, bs):
        flags |= CR
    if cr is None:
        ns = entry.crossed((_CR,), ("",), crossed)
        cr = _first(entry.get(_CR, ns[-1]) if ns else entry.get(_CR), inp)
    cw, cw1h = batch(_CW), batch(_CW1H)
    if cw is None or not entry.has(_CW, top, bs):
        flags |= CW
    if cw1h is None or not entry.has(_CW1H, top, bs):
        flags |= CW1H
    cw = _first(cw, inp)
    cw1h = _first(cw1h, cw)
    ain_ns = entry.crossed((_AIN,), ("", bs), crossed)
    ain = entry.get(_AIN, ain_ns[-1], bs) if ain_ns else None
    ain = _first(ain, entry.get(_AIN, 0, bs))
    if ain is None or not entry.has(_AIN, top, bs):
        flags |= AIN
    ain = _first(ain, inp)
    iin = entry.get(_IIN, 0, bs)
    if iin is None:
        iin = inp
        if entry.has_any(_IIN) or flags & IN:
            flags |= IIN
    elif top:
        flags |= IIN
    out = batch(_OUT)
    if out is None or not entry.has(_OUT, top, bs):
        flags |= OUT
    if out is None:
        out = _half(std[6])
    # Reasoning and output audio bill at the batch output rate.
    rs = aout = out
    flags |= AOUT | (RS if entry.has_any(_RS) or flags & OUT else 0)
    iout = entry.get(_IOUT, 0, bs)
    if iout is None or top:
        flags |= IOUT
    if iout is None:
        std_iout = entry.get(_IOUT)
        iout = _half(std_iout) if std_iout is not None else out
    return (inp, cr, cw, cw1h, ain, iin, out, rs, aout, iout, flags)


def _token_tiers(entry: _Entry) -> list[tuple[int, Mapping[str, Any]]] | None:
    """``tiered_pricing`` tiers priced per token, by range start; ``None`` without any."""
    tiers = entry.raw.get("tiered_pricing")
    if not isinstance(tiers, list):
        return None
    out = []
    for tier in tiers:
        if not isinstance(tier, Mapping) or tier.get("input_cost_per_token") is None:
            continue
        bounds = tier.get("range")
        if not isinstance(bounds, list) or len(bounds) != 2:
            continue
        out.append((int(_dec(bounds[0])), tier))
    out.sort(key=lambda t: t[0])
    return out or None


def _tier_units(entry: _Entry, tier: Mapping[str, Any], key: str) -> int | None:
    value = tier.get(key)
    if value is None:
        return None
    try:
        return price_units(value)
    except ConfigError as exc:
        raise ConfigError(f"price entry {entry.name!r}: tiered_pricing {key}: {exc}") from exc


def _tiered_rates(entry: _Entry, tier: Mapping[str, Any], peak: Mapping[str, Any] | None) -> Rates:
    """Standard rates of one ``tiered_pricing`` tier: every token of the call at the tier."""
    inp = _tier_units(entry, tier, _IN) or 0
    out = _first(_tier_units(entry, tier, _OUT), _first(entry.get(_OUT), 0))
    flags = 0 if _OUT in tier else OUT
    cr = _tier_units(entry, tier, _CR)
    cw = _tier_units(entry, tier, _CW)
    cw1h = _tier_units(entry, tier, _CW1H)
    flags |= (CR if cr is None else 0) | (CW if cw is None else 0) | (CW1H if cw1h is None else 0)
    rs = _tier_units(entry, tier, _RS)
    if rs is None and _OUT not in tier:
        rs = entry.get(_RS)
    if peak is not None:
        inp = peak.get(_IN, inp)
        out = peak.get(_OUT, out)
        cr = peak.get(_CR, cr)
        cw = peak.get(_CW, cw)
        rs = peak.get(_RS, rs)
    cr = _first(cr, inp)
    cw = _first(cw, inp)
    cw1h = _first(cw1h, cw)
    if rs is None:
        rs = out
        flags |= flags & OUT and RS
    ain = entry.get(_AIN)
    iin = entry.get(_IIN)
    aout = entry.get(_AOUT)
    iout = entry.get(_IOUT)
    flags |= (AIN if ain is None else 0) | (AOUT if aout is None else 0)
    flags |= IOUT if iout is None else 0
    return (inp, cr, cw, cw1h, _first(ain, inp), _first(iin, inp), out, rs,
            _first(aout, out), _first(iout, out), flags)  # fmt: skip


def _off_peak_units(entry: _Entry, block: Mapping[str, Any]) -> dict[str, int]:
    out = {}
    for key in (_IN, _OUT, _CR, _CW, _RS):
        value = block.get(key)
        if value is not None:
            try:
                out[key] = price_units(value)
            except ConfigError as exc:
                raise ConfigError(
                    f"price entry {entry.name!r}: off_peak_pricing {key}: {exc}"
                ) from exc
    return out


def _search(entry: _Entry) -> Search:
    provider = entry.provider
    google = provider == "gemini" or (
        provider.startswith("vertex_ai") and "claude" not in entry.name.lower()
    )
    per_prompt = (
        google and (entry.raw.get("web_search_billing_unit") or "per_prompt") == "per_prompt"
    )
    default_size = 0 if provider == "perplexity" else 1
    table = entry.raw.get("search_context_cost_per_query")
    fallback: int = 0
    if google:
        fallback = to_units(_GOOGLE_SEARCH_DEFAULT)
    elif provider == "xai":
        fallback = to_units(_XAI_SEARCH_DEFAULT)
    prices: list[tuple[int, bool]] = []
    for size in SIZES:
        value = table.get(f"search_context_size_{size}") if isinstance(table, Mapping) else None
        if value is None:
            prices.append((fallback, True))
        else:
            prices.append((query_price_units(value), False))
    return Search((prices[0], prices[1], prices[2]), default_size, per_prompt)
