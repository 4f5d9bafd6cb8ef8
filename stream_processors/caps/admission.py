"""Admission: reserve budget before a model call, settle it with the call's usage event.

Pure and deterministic (docs/DESIGN.md, "Admission (reservations)"): the answer depends only on
the user's :class:`~stream_processors.caps.UserCapState` (settled usage, wallet, open
reservations), the plan, the estimate and the request's time - never on a clock.

*Holds.* An admitted request's estimate counts against every window of the plan in force at its
time, as if spent at that time (the fixed instance containing it, the rolling bucket it falls
in), unless the window exempts the served model, until the reservation is settled (its usage
event arrived and counts instead) or expires (:attr:`Reservation.expires`).

*Per window*, with ``total`` = settled usage + held amounts in the window's unit and ``amount``
the request's (``need = max(amount, 1)``, so a full window admits nothing, as enforcement says):

* ``block``: admitted iff ``total + need <= allowance``; else blocked until the window has room.
  A rolling window is checked at every bucket the request would count in, not only the current
  one, so holds or usage at later times (clocks of gateways that disagree) are respected too.
* ``downgrade``: when the requested model does not fit, the request is re-decided on the
  downgrade model with the estimate for it; downgrade windows do not refuse a downgraded request
  (enforcement never blocks at a downgrade cap), block windows and the overage ceiling do.
* ``overage``: beyond the allowance the projected value (the engine's exact
  ``floor(cumulative overage * unit_price)``) is paid by credit first, the rest billed; admitted
  iff the projected billed total stays within ``ceiling_usd`` (and, as in enforcement, not once
  the ceiling is reached with no credit left). Without a ceiling it is always admitted.

The projection is conservative: with actual usage at most the estimate, settled usage never
passes a block window's allowance and the engine never has to clamp overage at the ceiling
(usage it would otherwise serve unbilled).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable
from itertools import accumulate
from typing import NamedTuple

from stream_processors.caps.reservations import NOTHING, Admission, Estimate, Reservation
from stream_processors.caps.rules import PlanRules, WindowRule
from stream_processors.caps.state import FixedState, RollingState, UserCapState

__all__ = [
    "MAX_REMEMBERED_BLOCKS",
    "SETTLED_MEMORY_S",
    "Bounds",
    "DowngradeEstimate",
    "decide",
    "expire",
    "remember",
    "settle",
]

SETTLED_MEMORY_S = 120
"""How long after its request a *settled* reservation is still remembered (at most its TTL).

It holds nothing any more; it is kept only so that a repeated request gets the first answer:
a gateway asks again within its deadline (``admission.deadline_s``, 90 s by default), a worker
replays only what it had not committed. Forgetting it sooner than the TTL keeps a busy user's
state small: the state holds about ``calls/s * 120`` of them instead of ``calls/s * TTL``, and
every admission scans them. A request repeated later still is decided afresh (a new hold,
released by its TTL: never an overshoot)."""
MAX_REMEMBERED_BLOCKS = 64
"""Blocked request ids remembered per user (for replays); the oldest beyond are forgotten.
Admitted ones are never dropped before they expire: they hold budget."""

Bounds = Callable[[WindowRule, int], tuple[int, int]]
"""``(rule, t)`` -> the instance ``[start, end)`` of a fixed window containing ``t``."""
DowngradeEstimate = Estimate | Callable[[str], Estimate] | None
"""The estimate of the request on the downgrade model: given, computed from the model's name
(the price catalog lives with the caller), or not available."""


class _Check(NamedTuple):
    fits: bool
    retry_after: int | None
    reason: str
    credit: int
    billed: int


_FITS = _Check(True, None, "ok", 0, 0)


def expire(state: UserCapState, at: int) -> int:
    """Drop the reservations expired at ``at`` (epoch seconds); how many were dropped.

    Settled ones go from the oldest settled on, up to the first one not expired yet: a
    settled one expires :data:`SETTLED_MEMORY_S` after its request, so they expire in about
    the order they were settled, and one that outlives its time a little holds nothing (a
    repeat of its id is answered ``settled`` rather than decided afresh). This keeps each
    admission's cost independent of how many calls the user made in the last two minutes.
    """
    gone = [rid for rid, r in state.reservations.items() if r.expires <= at]
    for rid in gone:
        del state.reservations[rid]
    settled = state.settled
    n = len(gone)
    while settled:
        rid = next(iter(settled))
        if settled[rid].expires > at:
            break
        del settled[rid]
        n += 1
    return n


def settle(state: UserCapState, reservation_id: str) -> bool:
    """Release the hold of a reservation whose usage event arrived; False if nothing was held.

    The usage itself counts through the engine as any event does. The settled reservation is
    kept (holding nothing) for :data:`SETTLED_MEMORY_S` after its request (at most until it
    expires), so a repeated admission gets the same answer. Unknown, expired, blocked or
    already settled ids change nothing.
    """
    reservation = state.reservations.get(reservation_id)
    if reservation is None or not reservation.held:
        return False
    expires = min(reservation.expires, reservation.at + SETTLED_MEMORY_S)
    del state.reservations[reservation_id]
    state.settled[reservation_id] = Reservation.done(reservation.admission, expires)
    return True


def remember(state: UserCapState, reservation: Reservation) -> None:
    """Keep a new reservation; at most :data:`MAX_REMEMBERED_BLOCKS` blocked ones."""
    state.reservations[reservation.admission.reservation_id] = reservation
    if reservation.admission.action == "block":
        blocked = [rid for rid, r in state.reservations.items() if r.admission.action == "block"]
        for rid in blocked[:-MAX_REMEMBERED_BLOCKS]:
            del state.reservations[rid]


def decide(
    state: UserCapState,
    plan: PlanRules,
    reservation_id: str,
    model: str,
    estimate: Estimate,
    at: int,
    bounds: Bounds,
    downgrade_estimate: DowngradeEstimate = None,
) -> Admission:
    """The admission decision for a new request (the state is not changed; see the module)."""
    holds = [
        r
        for r in state.reservations.values()
        if r.held and r.plan_id == plan.id and r.admission.model is not None
    ]
    credit, billed, blocks, downgrades = _pass(state, plan, model, estimate, at, bounds, holds)
    if not downgrades:
        if blocks:
            return _block(reservation_id, blocks)
        reason = "overage" if billed else "credit" if credit else "ok"
        return Admission(
            reservation_id, "allow", reason, model, estimate, None, None, credit, billed
        )
    # The downgrade window that lasts longest decides the model, as in enforcement.
    deciding = max(downgrades, key=lambda c: _later(c[1].retry_after))[0]
    target = deciding.downgrade_to
    assert target is not None  # a downgrade rule always names its model
    if callable(downgrade_estimate):
        downgrade_estimate = downgrade_estimate(target)
    if downgrade_estimate is None:
        return Admission(
            reservation_id, "block", "downgrade_without_estimate", None, NOTHING, deciding.key
        )
    credit, billed, blocks, _ = _pass(state, plan, target, downgrade_estimate, at, bounds, holds)
    if blocks:
        return _block(reservation_id, blocks)
    return Admission(
        reservation_id,
        "downgrade",
        "cap",
        target,
        downgrade_estimate,
        deciding.key,
        None,
        credit,
        billed,
    )


def _later(retry_after: int | None) -> float:
    return float("inf") if retry_after is None else retry_after


def _block(reservation_id: str, blocks: list[tuple[WindowRule, _Check]]) -> Admission:
    # Every blocking window must have room again: the latest of them decides.
    rule, check = max(blocks, key=lambda c: _later(c[1].retry_after))
    return Admission(
        reservation_id, "block", check.reason, None, NOTHING, rule.key, check.retry_after
    )


def _pass(
    state: UserCapState,
    plan: PlanRules,
    model: str,
    estimate: Estimate,
    at: int,
    bounds: Bounds,
    holds: list[Reservation],
) -> tuple[int, int, list[tuple[WindowRule, _Check]], list[tuple[WindowRule, _Check]]]:
    """One request on one model over the plan's windows: credit, billed, failing windows."""
    credit = billed = 0
    blocks: list[tuple[WindowRule, _Check]] = []
    downgrades: list[tuple[WindowRule, _Check]] = []
    for rule in plan.windows:
        if model in rule.exempt_models:
            continue
        counted = [r for r in holds if r.admission.model not in rule.exempt_models]
        amount = estimate.amount(rule.amount_index)
        if rule.rolling:
            check = _rolling_check(state, rule, at, amount, counted)
        else:
            check = _fixed_check(state, rule, at, amount, counted, bounds)
        if check.fits:
            credit += check.credit
            billed += check.billed
        elif rule.action == "downgrade":
            downgrades.append((rule, check))
        else:
            blocks.append((rule, check))
    return credit, billed, blocks, downgrades


def _fixed_check(
    state: UserCapState,
    rule: WindowRule,
    at: int,
    amount: int,
    holds: list[Reservation],
    bounds: Bounds,
) -> _Check:
    start, end = bounds(rule, at)
    window = state.windows.get(rule.key)
    inst = window.find(at) if isinstance(window, FixedState) else None
    used = inst.usage if inst is not None else 0
    index = rule.amount_index
    held = sum(r.admission.reserved.amount(index) for r in holds if start <= r.at < end)
    total = used + held
    allowance = rule.allowance
    if rule.action != "overage":
        need = max(amount, 1)
        if total + need <= allowance:
            return _FITS
        return _Check(False, end if need <= allowance else None, "cap", 0, 0)
    if total + amount <= allowance:
        return _FITS
    # Overage: the value of everything held and this request beyond what is settled, priced
    # as the engine prices it (floor of the cumulative value), paid by credit first.
    num, den = rule.price_numerator, rule.price_denominator
    base = max(0, used - allowance) * num // den
    value_before = max(0, total - allowance) * num // den - base
    value_after = (total + amount - allowance) * num // den - base
    wallet = state.wallet
    credit_before, credit_after = min(wallet, value_before), min(wallet, value_after)
    billed_before, billed_after = value_before - credit_before, value_after - credit_after
    if rule.ceiling is not None:
        settled_billed = inst.billed if inst is not None else 0
        if settled_billed + billed_after > rule.ceiling or (
            settled_billed + billed_before >= rule.ceiling and wallet <= credit_before
        ):
            return _Check(False, end, "ceiling", 0, 0)
    return _Check(True, None, "ok", credit_after - credit_before, billed_after - billed_before)


def _rolling_check(
    state: UserCapState, rule: WindowRule, at: int, amount: int, holds: list[Reservation]
) -> _Check:
    bucket_s, count, allowance = rule.bucket_s, rule.bucket_count, rule.allowance
    need = max(amount, 1)
    if need > allowance:
        return _Check(False, None, "cap", 0, 0)
    here = at // bucket_s
    # Everything counted at some bucket: settled buckets and holds (at their request's bucket).
    spent: dict[int, int] = {}
    window = state.windows.get(rule.key)
    if isinstance(window, RollingState):
        spent.update(window.buckets)
    index = rule.amount_index
    for r in holds:
        value = r.admission.reserved.amount(index)
        if value:
            bucket = r.at // bucket_s
            spent[bucket] = spent.get(bucket, 0) + value
    keys = sorted(spent)
    sums = [0, *accumulate(spent[k] for k in keys)]

    def rolling(bucket: int) -> int:  # the rolling sum at ``bucket``
        return sums[bisect_right(keys, bucket)] - sums[bisect_right(keys, bucket - count)]

    # The rolling sum only changes at a bucket that holds something (up) or ``count`` buckets
    # after one (down): its maximum over a range is its maximum at those points in it.
    points = sorted(p for p in {here, *keys, *(k + count for k in keys)} if p >= here)
    values = [rolling(p) for p in points]
    # This request counts in buckets [here, here + count).
    if max(values[: bisect_left(points, here + count)]) + need <= allowance:
        return _FITS
    # Room again at the first point b after which the sums over [b, b + count) leave ``need``.
    limit = allowance - need
    window_max: deque[int] = deque()
    nxt = 1
    for i in range(1, len(points)):
        edge = points[i] + count
        while nxt < len(points) and points[nxt] < edge:
            while window_max and values[window_max[-1]] <= values[nxt]:
                window_max.pop()
            window_max.append(nxt)
            nxt += 1
        while window_max[0] < i:
            window_max.popleft()
        if values[window_max[0]] <= limit:
            return _Check(False, points[i] * bucket_s, "cap", 0, 0)
    raise AssertionError("unreachable: the rolling sum is 0 after the last point")
