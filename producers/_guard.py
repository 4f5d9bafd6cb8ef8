"""CapGuard: the gateway's in-memory view of every user's enforcement state.

See docs/DESIGN.md, "Caps, alerts and enforcement".

The stream workers publish one :class:`~schemas.EnforcementRecord` per user to the
compacted enforcement topic whenever the user's state changes. A gateway holds the whole topic
in memory (a :class:`~producers.CompactedTopicView`: read from the start, then followed live in a
background thread) and asks :meth:`CapGuard.check` before each model call: a dict lookup and a
clock comparison, no network call, a few hundred nanoseconds.

Decisions
---------
==========================  ==========  ============================================
enforcement ``state``       ``action``  notes
==========================  ==========  ============================================
(no record for the user)    allow       reason ``unknown``: never seen over a threshold
``ok`` / ``warn``           allow       reason ``ok`` / ``threshold`` / ``overage``
``downgrade``               downgrade   ``model`` = the plan's cheaper model
``blocked``                 block       reason ``cap`` or ``ceiling``
any, ``until`` passed       allow       reason ``expired``: the window ended or rolled
==========================  ==========  ============================================

The expiry rule matters because a worker publishes a new record only when it sees the user's
next event: a user blocked until the end of the day must be let through at midnight so that
that next event can happen. ``until`` is computed by the worker from event time, so the guard's
clock and the event clocks must roughly agree (NTP); a skew only shifts the release time.
"""

from __future__ import annotations

import asyncio
import calendar
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

from producers._view import CompactedTopicView
from schemas import DecodedEnforcement, decode_enforcement
from spendstream.settings import Settings

Action = Literal["allow", "downgrade", "block"]

__all__ = ["Action", "CapGuard", "Decision"]


@dataclass(frozen=True, slots=True)
class Decision:
    """What a gateway should do with a user's next request."""

    action: Action
    """``allow``, ``downgrade`` (serve :attr:`model` instead) or ``block``."""
    reason: str
    """``unknown`` (no record), ``ok``, ``threshold``, ``overage``, ``cap``, ``ceiling``,
    ``expired`` (the deciding window's ``until`` has passed)."""
    model: str | None = None
    """The model to serve instead, for ``downgrade``."""
    until: float | None = None
    """Epoch seconds when the deciding window ends or rolls below its level; ``None`` if open."""
    state: str = "ok"
    """The enforcement state as published (``ok``, ``warn``, ``downgrade``, ``blocked``)."""
    window: str | None = None
    """The window that decided (``plan.window``)."""
    record: Mapping[str, Any] | None = None
    """The full enforcement record the decision came from (``None`` when unknown)."""

    @property
    def allowed(self) -> bool:
        """True unless blocked (a downgraded request still goes through, on another model)."""
        return self.action != "block"


ALLOW_UNKNOWN = Decision("allow", "unknown")
"""The decision for a user without an enforcement record."""


class _Entry:
    """A decoded record with its decision precomputed, so :meth:`CapGuard.check` only compares."""

    __slots__ = ("decision", "expired", "until")

    def __init__(self, decision: Decision, expired: Decision | None, until: float | None):
        self.decision = decision
        self.expired = expired
        self.until = until


def parse_until(value: str | None) -> float | None:
    """Epoch seconds of an RFC 3339 UTC ``until`` (``2026-12-01T00:00:00Z``); exact seconds."""
    if value is None:
        return None
    # The workers write whole-second UTC stamps; calendar.timegm avoids any local-time step.
    return float(calendar.timegm(time.strptime(value[:19], "%Y-%m-%dT%H:%M:%S")))


def decide(record: DecodedEnforcement) -> Decision:
    """The decision an enforcement record implies while its ``until`` has not passed."""
    state, reason, window, raw = record.state, record.reason, record.window, record.record
    until = parse_until(record.until)
    if state == "blocked":
        return Decision("block", reason, None, until, "blocked", window, raw)
    if state == "downgrade":
        model = record.downgrade_to
        if not model:
            # A downgrade without a model cannot be served: refusing is the safe reading.
            return Decision("block", "downgrade_without_model", None, until, state, window, raw)
        return Decision("downgrade", reason, model, until, state, window, raw)
    return Decision("allow", reason, None, until, state, window, raw)


def _entry_of(value: bytes) -> _Entry:
    """Decode one enforcement message into its decisions; ``ValueError`` for anything unusable.

    The record is read through its contract (:func:`schemas.decode_enforcement`): a record whose
    state is unknown, or whose ``reason``, ``until``, ``window`` or ``downgrade_to`` is neither
    a string nor null, or whose ``until`` is not an RFC 3339 time, is refused; the view counts
    it in ``rejected`` and keeps the user's previous record.
    """
    decision = decide(decode_enforcement(value))
    expired = None
    if decision.action != "allow" or decision.until is not None:
        expired = Decision(
            "allow",
            "expired",
            None,
            decision.until,
            decision.state,
            decision.window,
            decision.record,
        )
    return _Entry(decision, expired, decision.until)


class CapGuard:
    """Answers "may this user call a model now, and which one?" from memory.

    ``CapGuard(settings)`` follows ``settings.topics.enforcement`` with the settings' Kafka
    config; or pass ``config`` (librdkafka properties) and ``topic``. ``clock`` returns epoch
    seconds (tests pass a fake). Use it as a (async) context manager, or call :meth:`start` /
    :meth:`astart` and :meth:`close` / :meth:`aclose`.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        config: Mapping[str, Any] | None = None,
        topic: str | None = None,
        clock: Callable[[], float] = time.time,
        poll_interval_s: float = 0.05,
    ) -> None:
        if settings is not None:
            conf = dict(config) if config is not None else settings.kafka.confluent_config()
            name = topic or settings.topics.enforcement
        elif config is not None and topic is not None:
            conf, name = dict(config), topic
        else:
            raise ValueError("CapGuard needs settings, or both config and topic")
        self._view: CompactedTopicView[_Entry] = CompactedTopicView(
            conf, name, _entry_of, poll_interval_s=poll_interval_s
        )
        self._clock = clock
        self.topic = name

    # -- the hot path -------------------------------------------------------------------------
    def check(self, user_id: str) -> Decision:
        """The decision for ``user_id`` now: a dict lookup and one clock read, no I/O."""
        # The view's dict directly: one lookup fewer than view.get(); reads need no lock.
        entry = self._view._data.get(user_id)
        if entry is None:
            return ALLOW_UNKNOWN
        if entry.expired is not None and entry.until is not None and self._clock() >= entry.until:
            return entry.expired
        return entry.decision

    def record(self, user_id: str) -> Mapping[str, Any] | None:
        """The latest enforcement record of ``user_id`` as published, or ``None``."""
        entry = self._view.get(user_id)
        return entry.decision.record if entry is not None else None

    def __len__(self) -> int:
        return len(self._view)

    # -- freshness ----------------------------------------------------------------------------
    def staleness_s(self) -> float | None:
        """Seconds since the view last heard from the broker (``None`` before the first poll).

        The background thread polls every ``poll_interval_s`` even when nothing changes, so a
        value well above that means the broker is unreachable and decisions may be outdated.
        """
        return self._view.staleness_s()

    def last_update_age_s(self) -> float | None:
        """Seconds since the last enforcement record arrived (``None`` if none yet)."""
        last = self._view.last_update_monotonic
        return None if last is None else time.monotonic() - last

    @property
    def rejected(self) -> int:
        """Records that could not be decoded (skipped; see the log)."""
        return self._view.rejected

    def wait_caught_up(self, timeout_s: float) -> bool:
        """True once everything present on the topic at start has been read."""
        return self._view.wait_caught_up(timeout_s)

    # -- feeding (the view's thread, or tests) ------------------------------------------------
    def apply(self, user_id: str, value: bytes | None) -> None:
        """Apply one message of the enforcement topic (``None`` = tombstone): what the
        background thread does for each record; public so tests need no broker."""
        self._view._apply(user_id.encode(), value)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, *, wait_s: float | None = 30.0) -> CapGuard:
        """Start following the topic; with ``wait_s``, block until its current end was read."""
        self._view.start(wait_s=wait_s)
        return self

    async def astart(self, *, wait_s: float | None = 30.0) -> CapGuard:
        """:meth:`start` without blocking the event loop (the wait runs in a worker thread)."""
        await asyncio.to_thread(self._view.start, wait_s=wait_s)
        return self

    def close(self) -> None:
        """Stop following the topic."""
        self._view.close()

    async def aclose(self) -> None:
        """:meth:`close` without blocking the event loop."""
        await asyncio.to_thread(self._view.close)

    def __enter__(self) -> CapGuard:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> CapGuard:
        return await self.astart()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
