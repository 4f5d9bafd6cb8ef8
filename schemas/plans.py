"""Plans (tiers) as data: metered windows, allowances, thresholds and what happens at the cap.

A plans file is YAML (or JSON, which is YAML)::

    plans:
      - id: pro
        monthly_price: "20"          # USD per seat and billing month
        windows:
          - name: monthly
            kind: billing_month      # billing_month | calendar_day | week | rolling_hours
            unit: usd                # usd (inference cost) | tokens (input+output) | requests
            allowance: "40"
            thresholds: [50, 80, 100]          # percent of the allowance, the default
            at_cap: {action: downgrade, model: gpt-4o-mini}
          - name: 5h
            kind: rolling_hours
            hours: 5
            bucket_minutes: 5        # rolling sums are exact at this granularity (default 5)
            unit: usd
            allowance: "2.50"
            at_cap: {action: block}
            exempt_models: [gpt-4o-mini]   # usage served by these models does not count here

``at_cap`` is ``{action: block}``, ``{action: downgrade, model: <name>}`` or
``{action: overage, unit_price: "<USD per unit>", ceiling_usd: "<USD>"}`` (ceiling optional,
per window instance). Overage needs a fixed window (not ``rolling_hours``: a rolling window has
no period to bill or cap) and a plan has at most one overage window, so one event is never billed
twice. Prepaid credits (a per-user USD wallet, see :mod:`stream_processors.caps`) are drawn before
overage is billed.

Money is exact. Quote money in YAML (``"0.10"``); an unquoted YAML decimal such as ``0.10`` is
read from its source text as an exact :class:`~decimal.Decimal` by :func:`load_plans` (it never
passes through a binary float). When a plan is built from Python objects, a ``float`` is rejected:
it may already carry a binary artefact (``0.1`` is not 1/10) and guessing would hide the bug.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from decimal import Decimal, InvalidOperation
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from schemas._events import MAX_PRICE_PER_TOKEN
from schemas._records import MONEY_SCALE
from spendstream.errors import ConfigError

__all__ = [
    "DEFAULT_THRESHOLDS",
    "MAX_OVERAGE_UNIT_PRICE",
    "MAX_PLAN_AMOUNT",
    "SAMPLE_PLANS",
    "BlockAtCap",
    "CapAction",
    "DowngradeAtCap",
    "FixedWindow",
    "OverageAtCap",
    "Plan",
    "PlanCatalog",
    "PlanWindow",
    "RollingWindow",
    "Unit",
    "WindowKind",
    "exact_yaml",
    "load_plans",
    "parse_plans",
]

SAMPLE_PLANS = Path(__file__).with_name("sample_plans.yaml")
"""The sample catalog shipped with the package: free, pro, team and enterprise tiers."""

DEFAULT_THRESHOLDS: tuple[int, ...] = (50, 80, 100)
"""Alert thresholds, in percent of the allowance, when a window does not list its own."""

MAX_PLAN_AMOUNT = Decimal(10) ** 12
"""Largest amount a plan sets (price, allowance in any unit, ceiling): stored as ``Decimal(38,
24)``, which holds 10**14, so any window's usage and overage stay representable."""
MAX_OVERAGE_UNIT_PRICE: dict[str, Decimal] = {
    "usd": Decimal(100),
    "tokens": MAX_PRICE_PER_TOKEN,
    "requests": Decimal(1000),
}
"""Largest overage ``unit_price`` per window unit: a 100x markup on cost, a per-token price
as high as the catalog's bound, 1,000 USD per request. With the contract's bounds, one
event's overage then stays far below what an overage record stores (docs/DESIGN.md)."""

Unit = Literal["usd", "tokens", "requests"]
"""What a window meters: inference cost in USD, tokens (input + output), or requests."""
WindowKind = Literal["billing_month", "calendar_day", "week", "rolling_hours"]


def _money(value: Any) -> Decimal:
    """Exact decimal from a str, int or Decimal; floats are refused (see module docstring)."""
    if isinstance(value, bool | float):
        raise ValueError(f"money must be a decimal string such as '0.10', not the float {value!r}")
    if isinstance(value, int | Decimal):
        dec = Decimal(value)
    elif isinstance(value, str):
        try:
            dec = Decimal(value.strip().replace("_", ""))
        except InvalidOperation:
            raise ValueError(f"{value!r} is not a decimal number") from None
    else:
        raise ValueError(f"money must be a decimal string, got {type(value).__name__}")
    if not dec.is_finite():
        raise ValueError(f"money must be finite, got {value!r}")
    if dec < 0:
        raise ValueError(f"money must not be negative, got {value!r}")
    if dec > MAX_PLAN_AMOUNT:
        raise ValueError(f"{value!r} is above the largest amount a plan may set (10^12)")
    exponent = dec.normalize().as_tuple().exponent
    if isinstance(exponent, int) and exponent < -MONEY_SCALE:
        raise ValueError(f"{value!r} has more than {MONEY_SCALE} decimal places")
    return dec


Money = Annotated[Decimal, BeforeValidator(_money)]
"""A non-negative exact USD amount (at most MONEY_SCALE decimal places)."""
Name = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
ModelName = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BlockAtCap(_Strict):
    """At the cap, refuse further calls until the window frees up."""

    action: Literal["block"]


class DowngradeAtCap(_Strict):
    """At the cap, serve ``model`` (a cheaper one) instead of the requested model."""

    action: Literal["downgrade"]
    model: ModelName


class OverageAtCap(_Strict):
    """At the cap, keep serving and bill ``unit_price`` per unit beyond the allowance.

    ``unit_price`` is USD per one unit of the window: per USD of inference cost (``"1.2"`` bills
    cost plus 20 %), per token, or per request. ``ceiling_usd`` caps the overage billed per
    window instance; once it is reached (and the user has no credits left) the user is blocked.
    """

    action: Literal["overage"]
    unit_price: Money
    ceiling_usd: Money | None = None

    @field_validator("unit_price")
    @classmethod
    def _positive(cls, value: Decimal) -> Decimal:
        if value <= 0:
            raise ValueError("unit_price must be greater than 0")
        return value


CapAction = Annotated[BlockAtCap | DowngradeAtCap | OverageAtCap, Field(discriminator="action")]


class _WindowBase(_Strict):
    name: Name
    unit: Unit
    allowance: Money = Field(description="In the window's unit; tokens and requests are whole.")
    thresholds: tuple[int, ...] = Field(default=DEFAULT_THRESHOLDS, min_length=1, max_length=16)
    at_cap: CapAction
    exempt_models: frozenset[ModelName] = Field(
        default=frozenset(),
        description="Served models whose usage does not count in this window (e.g. the "
        "downgrade target, so a downgraded user is not capped again by the same window).",
    )

    @field_validator("thresholds", mode="before")
    @classmethod
    def _int_percents(cls, value: Any) -> Any:
        # Whole percents only: alert ids carry the threshold, and "80" must mean one thing.
        if isinstance(value, list | tuple):
            for item in value:
                if isinstance(item, bool) or not isinstance(item, int):
                    raise ValueError(f"thresholds must be whole percents, got {item!r}")
        return value

    @field_validator("thresholds")
    @classmethod
    def _increasing(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        bad = [t for t in value if not 0 < t <= 100]
        if bad:
            raise ValueError(f"thresholds must be in (0, 100], got {bad}")
        if any(b <= a for a, b in pairwise(value)):
            raise ValueError(f"thresholds must be strictly increasing, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _allowance_fits_unit(self) -> _WindowBase:
        if self.allowance <= 0:
            raise ValueError("allowance must be greater than 0")
        if self.unit != "usd" and self.allowance != self.allowance.to_integral_value():
            raise ValueError(f"allowance in {self.unit} must be a whole number")
        if isinstance(self.at_cap, OverageAtCap):
            bound = MAX_OVERAGE_UNIT_PRICE[self.unit]
            if self.at_cap.unit_price > bound:
                raise ValueError(
                    f"overage unit_price {self.at_cap.unit_price} is above the largest for "
                    f"a window in {self.unit} ({bound} USD per unit)"
                )
        return self


class FixedWindow(_WindowBase):
    """A window with fixed instances in the subscriber's timezone.

    ``billing_month`` starts at the subscription's billing anchor (local wall time) every month;
    ``calendar_day`` at local midnight; ``week`` at local midnight on Monday (ISO week).
    """

    kind: Literal["billing_month", "calendar_day", "week"]


class RollingWindow(_WindowBase):
    """Usage over the last ``hours`` hours, exact at ``bucket_minutes`` granularity."""

    kind: Literal["rolling_hours"]
    hours: int = Field(ge=1, le=24 * 31)
    bucket_minutes: int = Field(default=5, ge=1, le=60)

    @model_validator(mode="after")
    def _rolling_rules(self) -> RollingWindow:
        if (self.hours * 60) % self.bucket_minutes:
            raise ValueError(
                f"bucket_minutes ({self.bucket_minutes}) must divide the window "
                f"({self.hours} h = {self.hours * 60} min)"
            )
        if isinstance(self.at_cap, OverageAtCap):
            raise ValueError(
                "at_cap overage needs a fixed window (billing_month, calendar_day or week): "
                "a rolling window has no period to bill or cap"
            )
        return self


PlanWindow = Annotated[FixedWindow | RollingWindow, Field(discriminator="kind")]


class Plan(_Strict):
    """One tier: its price and the windows its usage is metered and capped in."""

    id: Name
    name: str | None = Field(default=None, max_length=128, description="Display name.")
    monthly_price: Money = Field(description="USD per seat and billing month.")
    windows: list[PlanWindow] = Field(min_length=1, max_length=16)

    @model_validator(mode="after")
    def _window_rules(self) -> Plan:
        problems = []
        names = [w.name for w in self.windows]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            problems.append(f"duplicate window names {dupes}")
        overage = [w.name for w in self.windows if isinstance(w.at_cap, OverageAtCap)]
        if len(overage) > 1:
            problems.append(
                f"at most one window may bill overage (so an event is billed once), got {overage}"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def overage_window(self) -> FixedWindow | None:
        """The one window that bills overage, if any."""
        for window in self.windows:
            if isinstance(window.at_cap, OverageAtCap):
                assert isinstance(window, FixedWindow)
                return window
        return None


class PlanCatalog(_Strict):
    """All plans by id. Build it with :func:`load_plans` or :func:`parse_plans`."""

    plans: list[Plan] = Field(min_length=1, max_length=10_000)

    @model_validator(mode="after")
    def _unique_ids(self) -> PlanCatalog:
        dupes = _duplicate_ids([p.id for p in self.plans])
        if dupes:
            raise ValueError(dupes)
        return self

    def model_post_init(self, context: Any, /) -> None:
        object.__setattr__(self, "_by_id", {p.id: p for p in self.plans})

    def get(self, plan_id: str) -> Plan:
        """The plan ``plan_id``; :class:`ConfigError` when the catalog does not have it."""
        try:
            plan: Plan = self._by_id[plan_id]  # type: ignore[attr-defined]
        except KeyError:
            raise ConfigError(
                f"unknown plan {plan_id!r}; the plans file defines {sorted(self.ids())}"
            ) from None
        return plan

    def ids(self) -> list[str]:
        """Plan ids in file order."""
        return [p.id for p in self.plans]

    def __contains__(self, plan_id: object) -> bool:
        return plan_id in self._by_id  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[Plan]:  # type: ignore[override]
        return iter(self.plans)

    def __len__(self) -> int:
        return len(self.plans)


def _duplicate_ids(ids: list[Any]) -> str | None:
    seen: dict[Any, int] = {}
    dupes = []
    for index, plan_id in enumerate(ids):
        if plan_id in seen:
            dupes.append(f"duplicate plan id {plan_id!r} (plans[{seen[plan_id]}] and [{index}])")
        else:
            seen[plan_id] = index
    return "; ".join(dupes) or None


class _ExactLoader(yaml.SafeLoader):
    """SafeLoader that reads YAML floats from their source text as exact decimals."""


def _construct_decimal(loader: yaml.SafeLoader, node: yaml.Node) -> Decimal:
    text = str(loader.construct_scalar(node)).replace("_", "")  # type: ignore[arg-type]
    try:
        value = Decimal(text)
    except InvalidOperation:
        value = Decimal("NaN")
    if not value.is_finite():
        # .inf / .nan: keep the text so validation names it instead of failing here.
        return text  # type: ignore[return-value]
    return value


_ExactLoader.add_constructor("tag:yaml.org,2002:float", _construct_decimal)


def _describe(exc: ValidationError, raw: Any) -> list[str]:
    """One line per problem with the path of the field: ``plans[1](pro).windows[0](5h).hours``.

    Discriminated unions add their tag (``rolling_hours``, ``downgrade``) to pydantic's path; it
    is not a key of the file, so it is left out.
    """
    lines = []
    for err in exc.errors(include_url=False):
        path = ""
        node: Any = raw
        for loc in err["loc"]:
            if isinstance(loc, int):
                item = node[loc] if isinstance(node, list) and 0 <= loc < len(node) else None
                path += f"[{loc}]"
                if isinstance(item, Mapping):
                    ident = item.get("id", item.get("name"))
                    if isinstance(ident, str):
                        path += f"({ident})"
                node = item
            elif (
                isinstance(node, Mapping)
                and loc not in node
                and loc
                in (
                    node.get("kind"),
                    node.get("action"),
                )
            ):
                continue
            else:
                path += f".{loc}" if path else str(loc)
                node = node.get(loc) if isinstance(node, Mapping) else None
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{path or '<file>'}: {msg}")
    return lines


def parse_plans(data: Any, source: str = "<plans>") -> PlanCatalog:
    """Validate already-parsed plan data; one :class:`ConfigError` lists every problem."""
    problems: list[str] = []
    if not isinstance(data, Mapping) or "plans" not in data:
        raise ConfigError(f"{source}: expected a mapping with a 'plans' list")
    raw_plans = data["plans"]
    if isinstance(raw_plans, list):
        # Checked on the raw data too, so duplicates are reported even when other fields fail.
        ids = [p.get("id") for p in raw_plans if isinstance(p, Mapping) and "id" in p]
        dupes = _duplicate_ids(ids)
        if dupes:
            problems.append(f"plans: {dupes}")
    try:
        catalog = PlanCatalog.model_validate(data)
    except ValidationError as exc:
        problems.extend(p for p in _describe(exc, data) if p not in problems)
    else:
        if not problems:
            return catalog
    count = len(problems)
    raise ConfigError(
        f"{source}: {count} problem{'s' if count != 1 else ''} in the plans:\n"
        + "\n".join(f"  - {p}" for p in problems)
    )


def exact_yaml(text: str) -> Any:
    """Parse YAML (or JSON) safely, with floats as exact decimals; ``ValueError`` if invalid."""
    try:
        return yaml.load(text, Loader=_ExactLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from exc


def load_plans(path: str | Path = SAMPLE_PLANS) -> PlanCatalog:
    """Read and validate a plans YAML/JSON file; one :class:`ConfigError` lists every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read plans file {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.load(text, Loader=_ExactLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_plans(data, source=str(path))
