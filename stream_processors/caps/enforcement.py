"""Enforcement state: what a user may do now, decided over the windows of their plan.

See docs/DESIGN.md, "Enforcement". Evaluated over the windows of the plan in force at the
watermark, at the end of each batch of a user's events, after credit grants, and by
:meth:`~stream_processors.caps.CapEngine.tick`. Per window: at or over the allowance ->
``blocked`` (block), ``downgrade`` (downgrade), ``warn`` reason ``overage`` (overage; ``blocked``
reason ``ceiling`` once the ceiling is billed and no credit is left); otherwise ``warn`` once
any threshold below 100 % is reached; else ``ok``. The user's state is the most severe, ties to
the one lasting longest. A record is emitted only when the state, reason, deciding window,
``until``, downgrade model or plan changes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from schemas import EnforcementReason, EnforcementRecord, EnforcementStateName
from stream_processors._time import rfc3339
from stream_processors.caps.effects import Effects
from stream_processors.caps.rules import PlanRules, WindowRule, amount_text
from stream_processors.caps.state import FixedState, RollingState, UserCapState, WindowState

__all__ = ["SEVERITY", "Verdict", "enforce", "window_verdict"]

SEVERITY: dict[str, int] = {"ok": 0, "warn": 1, "downgrade": 2, "blocked": 3}
"""Order of the enforcement states, least severe first."""


class Verdict(NamedTuple):
    """What one window says about a user at a time."""

    severity: int
    until: int
    """Epoch seconds when the window stops saying it (see :func:`window_verdict`)."""
    state: EnforcementStateName
    reason: EnforcementReason
    rule: WindowRule
    start: int
    """Start of the window instance (of the rolling sum, for a rolling window)."""
    usage: int


def window_verdict(
    state: UserCapState, rule: WindowRule, at: int, window: WindowState | None
) -> Verdict | None:
    """The window's verdict at ``at`` (epoch seconds), ``None`` when it has nothing to say.

    ``until`` is the instance's end, or for a rolling window the first moment its usage drops
    below the level that set the state, assuming no further usage.
    """
    inst = None
    if rule.rolling:
        if not isinstance(window, RollingState):
            return None
        bucket = at // rule.bucket_s
        if at == state.watermark and bucket > window.cur:
            window.advance(bucket, rule.bucket_count)
        used = window.sum_at(bucket, rule.bucket_count)
        start = (bucket - rule.bucket_count + 1) * rule.bucket_s
        end = 0
    else:
        inst = window.find(at) if isinstance(window, FixedState) else None
        if inst is None:
            return None
        used, start, end = inst.usage, inst.start, inst.end
    state_name: EnforcementStateName
    reason: EnforcementReason
    if used >= rule.allowance:
        level = rule.allowance
        if rule.action == "block":
            state_name, reason = "blocked", "cap"
        elif rule.action == "downgrade":
            state_name, reason = "downgrade", "cap"
        elif (
            rule.ceiling is not None
            and inst is not None
            and inst.billed >= rule.ceiling
            and state.wallet == 0
        ):
            state_name, reason = "blocked", "ceiling"
        else:
            state_name, reason = "warn", "overage"
    elif rule.warn_level is not None and used >= rule.warn_level:
        level = rule.warn_level
        state_name, reason = "warn", "threshold"
    else:
        return None
    if rule.rolling:
        assert isinstance(window, RollingState)
        end = _rolling_until(window, rule, at // rule.bucket_s, used, level)
    return Verdict(SEVERITY[state_name], end, state_name, reason, rule, start, used)


def enforce(state: UserCapState, plan: PlanRules, at: int, detected: str, out: Effects) -> None:
    """Evaluate the user's state at ``at`` under ``plan``; emit a record if it changed."""
    best: Verdict | None = None
    for rule in plan.windows:
        verdict = window_verdict(state, rule, at, state.windows.get(rule.key))
        if verdict is not None and (
            best is None or (verdict.severity, verdict.until) > (best.severity, best.until)
        ):
            best = verdict
    if best is None:
        said: tuple[Any, ...] = ("ok", "ok", None, None, None, plan.id)
    else:
        deciding = best.rule
        downgrade = deciding.downgrade_to if best.state == "downgrade" else None
        said = (best.state, best.reason, deciding.key, best.until, downgrade, plan.id)
    if said == state.last_enforcement:
        return
    state.last_enforcement = said
    state.version += 1
    if best is None:
        record = EnforcementRecord(
            user_id=state.user_id,
            org_id=state.org_id,
            plan_id=plan.id,
            state="ok",
            reason="ok",
            window=None,
            window_id=None,
            unit=None,
            usage=None,
            limit=None,
            remaining=None,
            until=None,
            downgrade_to=None,
            as_of=rfc3339(at),
            version=state.version,
            updated_at=detected,
        )
    else:
        deciding = best.rule
        in_usd = deciding.in_usd
        record = EnforcementRecord(
            user_id=state.user_id,
            org_id=state.org_id,
            plan_id=plan.id,
            state=best.state,
            reason=best.reason,
            window=deciding.key,
            window_id=f"{deciding.key}@{rfc3339(best.start)}",
            unit=deciding.unit,
            usage=amount_text(best.usage, in_usd),
            limit=amount_text(deciding.allowance, in_usd),
            remaining=amount_text(max(0, deciding.allowance - best.usage), in_usd),
            until=rfc3339(best.until),
            downgrade_to=said[4],
            as_of=rfc3339(at),
            version=state.version,
            updated_at=detected,
        )
    out.enforcement.append(record)


def _rolling_until(
    window: RollingState, rule: WindowRule, bucket: int, used: int, level: int
) -> int:
    """First bucket edge after which the rolling sum, with no new usage, is below ``level``."""
    lo = bucket - rule.bucket_count
    remaining = used
    for j in sorted(j for j in window.buckets if lo < j <= bucket):
        remaining -= window.buckets[j]
        if remaining < level:
            return (j + rule.bucket_count) * rule.bucket_s
    return (bucket + 1) * rule.bucket_s  # unreachable when used >= level > 0
