"""Admission data: what a request asks to spend, what it was answered, what the state holds.

Pure data and its compact JSON-safe form (docs/DESIGN.md, "Admission (reservations)"). The
decision itself is :mod:`stream_processors.caps.admission`; the per-user state keeps one
:class:`Reservation` per reservation id in :attr:`UserCapState.reservations
<stream_processors.caps.UserCapState.reservations>` (held and blocked ones) or
:attr:`UserCapState.settled <stream_processors.caps.UserCapState.settled>`.

Money is integer units of 10**-MONEY_SCALE USD (:mod:`stream_processors._money`), never float.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from stream_processors._money import units_from_str, units_to_str

__all__ = ["Admission", "AdmissionAction", "Estimate", "Reservation"]

AdmissionAction = Literal["allow", "downgrade", "block"]


@dataclass(frozen=True, slots=True)
class Estimate:
    """What one model call is expected to spend, in each unit a window can meter.

    ``cost`` is USD units (10**-MONEY_SCALE USD, an ``int``); ``tokens`` input + output tokens
    (counted by windows in tokens, so a plan with a token window needs it); ``requests`` the
    number of requests (1).
    """

    cost: int
    tokens: int = 0
    requests: int = 1

    def __post_init__(self) -> None:
        for name in ("cost", "tokens", "requests"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"estimate {name} must be an int, got {value!r}")
            if value < 0:
                raise ValueError(f"estimate {name} must not be negative, got {value}")

    def amount(self, index: int) -> int:
        """The amount in a window's unit, by :data:`~stream_processors.caps.rules.UNIT_INDEX`."""
        return (self.cost, self.tokens, self.requests)[index]


NOTHING = Estimate(0, 0, 0)
"""What a blocked request holds."""
SETTLED = "settled"
"""The reason a settled reservation's id is answered with (:meth:`Reservation.done`)."""


@dataclass(frozen=True, slots=True)
class Admission:
    """The answer to one admission request (the same answer for every replay of its id).

    ============  =================================================  ======================
    ``action``    ``reason``                                         ``model``
    ============  =================================================  ======================
    ``allow``     ``ok``; ``overage`` (some of it projected to be    the requested model
                  billed); ``credit`` (its overage paid by credit)
    ``downgrade`` ``cap`` (a downgrade window has no room for the    the plan's downgrade
                  requested model; the downgrade model's estimate    model
                  is reserved instead)
    ``block``     ``cap`` (a block window is full); ``ceiling``      ``None``
                  (the overage ceiling would be passed);
                  ``downgrade_without_estimate`` (a downgrade was
                  due and the caller gave no estimate for the
                  downgrade model)
    ============  =================================================  ======================

    A settled reservation is remembered as its action and model with reason ``settled``,
    holding nothing (:meth:`Reservation.done`).
    """

    reservation_id: str
    action: AdmissionAction
    reason: str
    model: str | None
    """The model to serve (``None`` when blocked)."""
    reserved: Estimate
    """What is held against the windows until settled or expired (nothing when blocked)."""
    window: str | None = None
    """The window that decided a downgrade or a block (``plan.window``)."""
    retry_after: int | None = None
    """For a block: epoch seconds when the blocking windows have room for this estimate again,
    assuming no further usage (a fixed window's end; the first bucket edge a rolling window's
    sum is low enough); ``None`` when the estimate can never fit (larger than the allowance),
    or there is nothing to wait for (``downgrade_without_estimate``)."""
    credit: int = 0
    """USD units of this request's projected overage value paid by prepaid credit."""
    billed: int = 0
    """USD units of this request's projected overage value billed (under the ceiling)."""

    @property
    def allowed(self) -> bool:
        """True unless blocked (a downgraded request is served, on another model)."""
        return self.action != "block"


class Reservation:
    """One admission request remembered by the user's state.

    Holds :attr:`Admission.reserved` against every window of :attr:`plan_id` that counts the
    served model, at time :attr:`at`, while it is neither settled nor expired. A settled or
    blocked one holds nothing and is kept until :attr:`expires` so that a replay of its id gets
    the same answer.
    """

    __slots__ = ("admission", "at", "expires", "plan_id", "settled")

    def __init__(
        self, admission: Admission, at: int, expires: int, plan_id: str, settled: bool = False
    ) -> None:
        self.admission = admission
        self.at = at
        """Request time, epoch seconds: where the reserved amount counts, as if spent then."""
        self.expires = expires
        """Epoch seconds from which it is dropped (and its hold released)."""
        self.plan_id = plan_id
        """The plan in force at :attr:`at`: the windows it is held in."""
        self.settled = settled

    @property
    def held(self) -> bool:
        """True while it holds budget: admitted and not settled (expiry removes it)."""
        return not self.settled and self.admission.action != "block"

    @classmethod
    def done(cls, admission: Admission, expires: int) -> Reservation:
        """A settled reservation as the state remembers it until ``expires``.

        It holds nothing; it is kept so that a repeat of its id reserves nothing more, and is
        answered with its action and model (reason ``settled``). Only that is kept: a busy
        user remembers every call of the last
        :data:`~stream_processors.caps.admission.SETTLED_MEMORY_S`, and the whole answer took
        140 bytes of the user's state per call (this form 74), written with every batch of the
        user's events (docs/DESIGN.md, "Admission (reservations)", Durable).
        """
        a = admission
        kept = Admission(a.reservation_id, a.action, SETTLED, a.model, NOTHING)
        return cls(kept, expires, expires, "", settled=True)

    def to_row(self) -> list[Any]:
        """Compact JSON-safe form (a list; money as decimal strings)."""
        a = self.admission
        if self.settled:
            return [a.reservation_id, self.expires, a.action, a.model]
        r = a.reserved
        return [
            a.reservation_id,
            self.at,
            self.expires,
            self.plan_id,
            a.action,
            a.reason,
            a.model,
            units_to_str(r.cost),
            r.tokens,
            r.requests,
            a.window,
            a.retry_after,
            units_to_str(a.credit),
            units_to_str(a.billed),
            1 if self.settled else 0,
        ]

    @classmethod
    def from_row(cls, row: list[Any]) -> Reservation:
        """Inverse of :meth:`to_row` (a settled row of 15 fields, as written before
        :meth:`done` existed, is read as :meth:`done`'s)."""
        if len(row) == 4:
            action = _action(row[2])
            model = None if row[3] is None else str(row[3])
            return cls.done(Admission(str(row[0]), action, SETTLED, model, NOTHING), int(row[1]))
        if len(row) != 15:
            raise ValueError(f"a reservation row has 4 or 15 fields, got {len(row)}")
        action = _action(row[4])
        admission = Admission(
            reservation_id=str(row[0]),
            action=action,
            reason=str(row[5]),
            model=None if row[6] is None else str(row[6]),
            reserved=Estimate(units_from_str(row[7]), int(row[8]), int(row[9])),
            window=None if row[10] is None else str(row[10]),
            retry_after=None if row[11] is None else int(row[11]),
            credit=units_from_str(row[12]),
            billed=units_from_str(row[13]),
        )
        if row[14]:
            return cls.done(admission, int(row[2]))
        return cls(admission, int(row[1]), int(row[2]), str(row[3]))


def _action(value: Any) -> AdmissionAction:
    action = str(value)
    if action not in ("allow", "downgrade", "block"):
        raise ValueError(f"unknown admission action {action!r}")
    return action  # type: ignore[return-value]
