"""Exact money as integers of 10**-24 USD.

Every price in the catalog has at most :data:`~schemas.MONEY_SCALE` decimal places and token
counts are integers, so costs and sums are exact integers in these units: no float, no rounding,
no decimal context to get wrong (Python's default context keeps only 28 significant digits,
which a long sum of 24-place prices exceeds).

Two conversions into units, which differ in how they refuse a value, because their callers
handle a refusal differently (both kept as they were when the cap engine had its own copy):

* :func:`to_units` reads configured money (price sheets, overrides): a value it cannot keep
  exact is a :class:`~spendstream.errors.ConfigError` naming the value, and non-finite values
  are refused as such.
* :func:`decimal_to_units` converts money on the data path (the cap engine's costs, plan
  amounts and credit grants, its stored state): a value it cannot keep exact, or a NaN, is a
  ``ValueError``, which the cap engine turns into a rejected event rather than a configuration
  failure. It takes a ``Decimal`` only.

Both give the same units for every value both accept.
"""

from __future__ import annotations

from decimal import Context, Decimal, Inexact, InvalidOperation, Overflow

from schemas import MONEY_SCALE
from spendstream.errors import ConfigError

SCALE = 10**MONEY_SCALE
"""One USD in units."""
_WIDE = Context(prec=120, traps=[Inexact, InvalidOperation, Overflow])


def to_units(value: Decimal | str | int) -> int:
    """Exact conversion to units of 10**-24 USD; more decimal places than that is an error."""
    dec = value if isinstance(value, Decimal) else Decimal(value)
    if not dec.is_finite():
        raise ConfigError(f"money must be a finite number, got {value!r}")
    sign, digits, exponent = dec.as_tuple()
    assert isinstance(exponent, int)
    if exponent < -MONEY_SCALE:
        # Trailing zeros beyond the scale are harmless: normalize them away first.
        dec = dec.normalize()
        sign, digits, exponent = dec.as_tuple()
        assert isinstance(exponent, int)
        if exponent < -MONEY_SCALE:
            raise ConfigError(
                f"{value} has more than {MONEY_SCALE} decimal places; spendstream keeps money "
                f"exact at that scale"
            )
    shift: int = 10 ** (exponent + MONEY_SCALE)
    magnitude = int("".join(map(str, digits)) or "0") * shift
    return -magnitude if sign else magnitude


def units_to_str(units: int) -> str:
    """Decimal string of an amount in units, e.g. ``123 -> "0.000000000000000000000123"``."""
    # String slicing rather than divmod and a padded format: this runs several times per
    # event (every money field of every output), and zero (no savings) is the common value.
    if not units:
        return "0"
    if units < 0:
        return "-" + units_to_str(-units)
    digits = str(units)
    if len(digits) <= MONEY_SCALE:
        digits = digits.rjust(MONEY_SCALE + 1, "0")
    frac = digits[-MONEY_SCALE:].rstrip("0")
    return f"{digits[:-MONEY_SCALE]}.{frac}" if frac else digits[:-MONEY_SCALE]


def units_to_decimal(units: int) -> Decimal:
    """The amount as an exact :class:`~decimal.Decimal`."""
    return Decimal(units_to_str(units))


def decimal_to_units(value: Decimal) -> int:
    """USD as exact units on the data path; more decimal places than that is a ``ValueError``."""
    scaled = value.scaleb(MONEY_SCALE, _WIDE)
    units = int(scaled)
    if units != scaled:
        raise ValueError(f"{value} has more than {MONEY_SCALE} decimal places")
    return units


def units_from_str(text: str) -> int:
    """Inverse of :func:`units_to_str` (through :func:`decimal_to_units`)."""
    return decimal_to_units(Decimal(text))


def as_fraction(value: Decimal) -> tuple[int, int]:
    """A non-negative decimal as an exact fraction ``(num, den)`` with ``den`` a power of ten."""
    sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int) and not sign
    num = int("".join(map(str, digits)) or "0")
    if exponent >= 0:
        return num * 10**exponent, 1
    return num, 10**-exponent
