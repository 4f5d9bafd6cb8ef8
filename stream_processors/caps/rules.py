"""The plans catalog compiled to integers for the cap engine's hot path.

A plan (:class:`~schemas.plans.Plan`) is validated data with exact decimals; the engine
compares and sums integers only (USD as units of 10**-MONEY_SCALE, tokens and requests as
counts), so each window is compiled once, when the engine is built, into a :class:`WindowRule`.
"""

from __future__ import annotations

from decimal import Decimal

from schemas.plans import OverageAtCap, Plan, PlanWindow, RollingWindow
from stream_processors._money import SCALE, as_fraction, decimal_to_units, units_to_str

__all__ = ["UNIT_INDEX", "PlanRules", "WindowRule", "amount_decimal", "amount_text"]

UNIT_INDEX = {"usd": 0, "tokens": 1, "requests": 2}
"""Position of a window's unit in an event's amounts ``(cost units, tokens, requests)``."""


class WindowRule:
    """One window of a plan, compiled: its allowance, threshold levels and action at the cap.

    Amounts are in the window's unit: USD units when :attr:`in_usd`, else a count.
    """

    __slots__ = (
        "action",
        "allowance",
        "amount_index",
        "bucket_count",
        "bucket_s",
        "ceiling",
        "downgrade_to",
        "exempt_models",
        "in_usd",
        "key",
        "kind",
        "lowest_level",
        "name",
        "plan_id",
        "price_denominator",
        "price_numerator",
        "rolling",
        "span_s",
        "threshold_levels",
        "unit",
        "unit_price",
        "warn_level",
    )

    def __init__(self, plan: Plan, window: PlanWindow) -> None:
        self.plan_id = plan.id
        self.name: str = window.name
        self.key = f"{plan.id}.{window.name}"
        """``plan.window``: the window's name in records and in the user's state."""
        self.kind: str = window.kind
        self.unit: str = window.unit
        self.amount_index = UNIT_INDEX[window.unit]
        self.in_usd = window.unit == "usd"
        self.allowance = (
            decimal_to_units(window.allowance) if self.in_usd else int(window.allowance)
        )
        # Level of p %: the least integer usage with usage * 100 >= p * allowance.
        self.threshold_levels: tuple[tuple[int, int], ...] = tuple(
            (p, -((-p * self.allowance) // 100)) for p in window.thresholds
        )
        """``(percent, usage level)`` per threshold, in increasing order."""
        self.lowest_level = self.threshold_levels[0][1]
        below = [level for p, level in self.threshold_levels if p < 100]
        self.warn_level: int | None = below[0] if below else None
        """The level of the lowest threshold below 100 %: from there the state is ``warn``."""
        self.exempt_models: frozenset[str] = window.exempt_models
        at_cap = window.at_cap
        self.action: str = at_cap.action
        self.downgrade_to: str | None = getattr(at_cap, "model", None)
        self.unit_price: Decimal | None = None
        self.price_numerator = self.price_denominator = 1
        self.ceiling: int | None = None
        """The overage ceiling per window instance, USD units."""
        if isinstance(at_cap, OverageAtCap):
            self.unit_price = at_cap.unit_price
            num, den = as_fraction(at_cap.unit_price)
            # value in USD units = quantity * num / den; a token or request quantity is a count,
            # a USD quantity is already in units.
            self.price_numerator = num if self.in_usd else num * SCALE
            self.price_denominator = den
            if at_cap.ceiling_usd is not None:
                self.ceiling = decimal_to_units(at_cap.ceiling_usd)
        self.rolling = isinstance(window, RollingWindow)
        if isinstance(window, RollingWindow):
            self.span_s = window.hours * 3600
            self.bucket_s = window.bucket_minutes * 60
            self.bucket_count = self.span_s // self.bucket_s
        else:
            self.span_s = self.bucket_s = self.bucket_count = 0


class PlanRules:
    """One plan, compiled: its monthly price in USD units and its windows' rules."""

    __slots__ = ("id", "monthly_price", "windows")

    def __init__(self, plan: Plan) -> None:
        self.id = plan.id
        self.monthly_price = decimal_to_units(plan.monthly_price)
        self.windows = tuple(WindowRule(plan, w) for w in plan.windows)


def amount_text(value: int, in_usd: bool) -> str:
    """An amount in a window's unit as record text: a decimal USD string or a count."""
    return units_to_str(value) if in_usd else str(value)


def amount_decimal(value: int, in_usd: bool) -> Decimal:
    """An amount in a window's unit as an exact Decimal (USD for ``usd``)."""
    return Decimal(units_to_str(value)) if in_usd else Decimal(value)
