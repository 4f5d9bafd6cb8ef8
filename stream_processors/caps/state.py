"""Per-user cap state: window usage, fired thresholds, wallet; compact JSON-safe serialization.

The state is plain data mutated only by :class:`~stream_processors.caps.CapEngine`. It is kept
small because the worker writes it to the ``caps`` table (and its changelog topic) on every
update: fixed windows keep only the instances still open (plus grace), rolling windows a sparse
map of buckets.

The serialized form (:meth:`UserCapState.to_dict`, its one-letter keys and their encodings) is
what the changelog stores: a worker restores states written by earlier versions from it, so it
changes only with :data:`FORMAT_VERSION`. Attribute names here are free to change; keys are not.
Optional keys may be added without a new version when a state without them restores as before
(``"r"``, the open reservations, and ``"d"``, the settled ones, were added so: a state written
before them has none).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from math import gcd
from typing import Any

from schemas import MONEY_SCALE
from stream_processors._money import units_from_str
from stream_processors._money import units_to_str as units_str
from stream_processors.caps.reservations import Reservation

NEVER = -(2**62)
"""Watermark of a state that has seen no event yet."""
FORMAT_VERSION = 1
_MAX_JSON_INT = 2**63
MAX_TOPUP_IDS = 32
"""Top-up ids remembered for idempotence (a replayed top-up is not credited twice)."""


def mask_to_list(mask: int) -> list[int]:
    """Fired-threshold bitmask (bit p = p percent) to the sorted list of percents."""
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


def list_to_mask(percents: list[int]) -> int:
    """Inverse of :func:`mask_to_list`."""
    mask = 0
    for p in percents:
        mask |= 1 << p
    return mask


def _encode_amount(value: int, usd: bool) -> str | int:
    # USD units as a short decimal string ("0.0123"): 10**-24 units would be 23-digit integers,
    # too long and beyond orjson's 64-bit integers. Tokens and requests stay JSON integers.
    return units_str(value) if usd else value


def _decode_amount(value: str | int) -> int:
    return units_from_str(value) if isinstance(value, str) else int(value)


class WindowInstance:
    """One instance ``[start, end)`` of a fixed window (or a billing month for break-even)."""

    __slots__ = ("billed", "end", "fired", "start", "usage")

    def __init__(self, start: int, end: int, usage: int = 0, fired: int = 0, billed: int = 0):
        self.start = start
        self.end = end
        self.usage = usage
        self.fired = fired
        """Bitmask of fired thresholds, bit p = p percent (break-even uses bit 100)."""
        self.billed = billed
        """Overage billed in this instance, in USD units (for the ceiling)."""


class FixedState:
    """The open instances of a fixed window, ordered by start (rarely more than two)."""

    __slots__ = ("insts", "usd")

    def __init__(self, usd: bool, insts: list[WindowInstance] | None = None) -> None:
        self.usd = usd
        self.insts: list[WindowInstance] = insts if insts is not None else []
        """The instances held, ordered by start."""

    def find(self, t: int) -> WindowInstance | None:
        """The instance containing ``t``, if it is held."""
        for inst in reversed(self.insts):  # the newest is the likeliest
            if inst.start <= t < inst.end:
                return inst
        return None

    def add(self, inst: WindowInstance) -> None:
        """Insert keeping the order by start."""
        self.insts.append(inst)
        if len(self.insts) > 1 and self.insts[-2].start > inst.start:
            self.insts.sort(key=lambda i: i.start)

    def evict(self, horizon: int) -> None:
        """Drop instances that ended at or before ``horizon`` (= watermark - grace)."""
        if self.insts and self.insts[0].end <= horizon:
            self.insts = [i for i in self.insts if i.end > horizon]

    def empty(self) -> bool:
        """True when nothing is held."""
        return not self.insts

    def to_obj(self) -> Any:
        """Compact JSON-safe form."""
        usd = self.usd
        return {
            "i": [
                [
                    i.start,
                    i.end,
                    _encode_amount(i.usage, usd),
                    mask_to_list(i.fired),
                    units_str(i.billed),
                ]
                if i.billed
                else [i.start, i.end, _encode_amount(i.usage, usd), mask_to_list(i.fired)]
                for i in self.insts
            ]
        }

    @classmethod
    def from_obj(cls, obj: Any, usd: bool) -> FixedState:
        """Inverse of :meth:`to_obj`."""
        insts = [
            WindowInstance(
                int(row[0]),
                int(row[1]),
                _decode_amount(row[2]),
                list_to_mask(row[3]),
                units_from_str(row[4]) if len(row) > 4 else 0,
            )
            for row in obj["i"]
        ]
        return cls(usd, insts)


class RollingState:
    """Bucket sums of a rolling window plus the running sum at the current bucket.

    ``buckets[j]`` is the usage of events with ``t // bucket_s == j`` (only non-zero buckets are
    held). ``cur`` is the current bucket (the user's watermark's) and ``cur_sum`` the sum of
    buckets ``(cur - bucket_count, cur]``: the rolling usage at any time in bucket ``cur``.
    ``fired`` maps an epoch-aligned block of the window's span to the bitmask of thresholds
    fired in it.
    """

    __slots__ = ("buckets", "cur", "cur_sum", "fired", "usd")

    def __init__(self, usd: bool, cur: int) -> None:
        self.usd = usd
        self.buckets: dict[int, int] = {}
        self.cur = cur
        self.cur_sum = 0
        self.fired: dict[int, int] = {}

    def advance(self, bucket: int, bucket_count: int) -> None:
        """Move the running sum to ``bucket`` (no bucket beyond ``cur`` exists yet)."""
        cur = self.cur
        if bucket <= cur:
            return
        if bucket - cur >= bucket_count or not self.buckets:
            self.cur_sum = 0
        else:
            get = self.buckets.get
            total = self.cur_sum
            for j in range(cur - bucket_count + 1, bucket - bucket_count + 1):
                total -= get(j, 0)
            self.cur_sum = total
        self.cur = bucket

    def sum_at(self, bucket: int, bucket_count: int) -> int:
        """Rolling usage in ``bucket``: buckets ``(bucket - bucket_count, bucket]``."""
        if bucket == self.cur:
            return self.cur_sum
        lo = bucket - bucket_count
        return sum(v for j, v in self.buckets.items() if lo < j <= bucket)

    def evict(self, min_bucket: int, min_block: int) -> None:
        """Drop buckets below ``min_bucket`` and fired blocks below ``min_block``."""
        if any(j < min_bucket for j in self.buckets):
            self.buckets = {j: v for j, v in self.buckets.items() if j >= min_bucket}
        if any(b < min_block for b in self.fired):
            self.fired = {b: f for b, f in self.fired.items() if b >= min_block}

    def empty(self) -> bool:
        """True when nothing is held."""
        return not self.buckets and not self.fired

    def to_obj(self) -> Any:
        """Compact JSON-safe form: bucket indices delta-encoded, interleaved with values.

        USD values are written as integers of ``10**(p - MONEY_SCALE)`` USD with the largest
        ``p`` that divides them all (``"s": p``): costs have far fewer decimal places than
        MONEY_SCALE, so ``0.0034375`` becomes ``34375`` - about 40 % fewer bytes than strings.
        """
        keys = sorted(self.buckets)
        values = [self.buckets[j] for j in keys]
        out: dict[str, Any] = {"k": self.cur}
        encoded: Sequence[str | int] = values
        if self.usd and values:
            common = gcd(*values)
            digits = str(common)
            p = min(len(digits) - len(digits.rstrip("0")), MONEY_SCALE)
            scaled = [v // 10**p for v in values]
            if max(scaled) < _MAX_JSON_INT:
                encoded = scaled
                out["s"] = p
            else:  # too large for a 64-bit JSON integer: exact decimal strings instead
                encoded = [units_str(v) for v in values]
        flat: list[str | int] = []
        prev = 0
        for j, value in zip(keys, encoded, strict=True):
            flat.append(j - prev)
            flat.append(value)
            prev = j
        out["b"] = flat
        out["f"] = [[b, mask_to_list(f)] for b, f in sorted(self.fired.items())]
        return out

    @classmethod
    def from_obj(cls, obj: Any, usd: bool, bucket_count: int) -> RollingState:
        """Inverse of :meth:`to_obj`; the running sum is recomputed, not stored."""
        state = cls(usd, int(obj["k"]))
        factor = 10 ** int(obj["s"]) if "s" in obj else 1
        flat = obj["b"]
        j = 0
        for index in range(0, len(flat), 2):
            j += int(flat[index])
            value = flat[index + 1]
            state.buckets[j] = units_from_str(value) if isinstance(value, str) else value * factor
        state.fired = {int(b): list_to_mask(f) for b, f in obj["f"]}
        lo = state.cur - bucket_count
        state.cur_sum = sum(v for b, v in state.buckets.items() if lo < b <= state.cur)
        return state


WindowState = FixedState | RollingState
"""The state of one window of a user: fixed instances or rolling buckets."""


class UserCapState:
    """Everything the cap engine remembers about one user (one faust Table value).

    Restore with :meth:`from_dict` (the window sizes of the plans are needed to rebuild the
    running sums, so pass the engine's catalog via :meth:`CapEngine.restore
    <stream_processors.caps.CapEngine.restore>`).
    """

    __slots__ = (
        "granted",
        "last_enforcement",
        "months",
        "org_id",
        "reservations",
        "settled",
        "topups",
        "user_id",
        "version",
        "wallet",
        "watermark",
        "windows",
    )

    def __init__(self, user_id: str, org_id: str = "") -> None:
        self.user_id = user_id
        self.org_id = org_id
        self.watermark = NEVER
        """Largest event time seen (epoch seconds): 'now' for enforcement and eviction."""
        self.wallet = 0
        """Prepaid credit balance, USD units."""
        self.topups: list[str] = []
        self.granted = 0
        """How many of the subscription's credit grants were applied (they are append-only)."""
        self.version = 0
        """Number of enforcement records emitted so far."""
        self.last_enforcement: tuple[Any, ...] | None = None
        """What the last emitted enforcement record said (to emit only changes): state,
        reason, window, until, downgrade model, plan."""
        self.months = FixedState(usd=True)
        """Billing months, for the break-even alert (usage = inference cost)."""
        self.windows: dict[str, WindowState] = {}
        """Window key (``plan.window``) -> its state."""
        self.reservations: dict[str, Reservation] = {}
        """Reservation id -> the admission request remembered, held or blocked, in the order
        they were made (see :mod:`~stream_processors.caps.admission`)."""
        self.settled: dict[str, Reservation] = {}
        """Reservation id -> a settled reservation (:meth:`Reservation.done
        <stream_processors.caps.reservations.Reservation.done>`), in the order they were
        settled. Apart from :attr:`reservations`, so that deciding a request scans only what
        holds budget: a busy user remembers every call of the last two minutes."""

    def reservation(self, reservation_id: str) -> Reservation | None:
        """The reservation remembered under ``reservation_id``, held, blocked or settled."""
        found = self.reservations.get(reservation_id)
        return found if found is not None else self.settled.get(reservation_id)

    def to_dict(self) -> dict[str, Any]:
        """Compact JSON-safe form (ints, strings, lists; money as decimal strings)."""
        out: dict[str, Any] = {"v": FORMAT_VERSION, "u": self.user_id}
        if self.org_id:
            out["o"] = self.org_id
        if self.watermark != NEVER:
            out["w"] = self.watermark
        if self.wallet:
            out["c"] = units_str(self.wallet)
        if self.topups:
            out["t"] = self.topups
        if self.granted:
            out["g"] = self.granted
        if self.version:
            out["n"] = self.version
        if self.last_enforcement is not None:
            out["e"] = list(self.last_enforcement)
        if self.months.insts:
            out["m"] = self.months.to_obj()["i"]
        if self.windows:
            out["x"] = {key: ws.to_obj() for key, ws in self.windows.items()}
        if self.reservations:
            out["r"] = [r.to_row() for r in self.reservations.values()]
        if self.settled:
            # Under a key of its own: a worker of the version before the compact settled rows
            # ignores the key (it would refuse their rows, and with them the whole state).
            out["d"] = [r.to_row() for r in self.settled.values()]
        return out

    @classmethod
    def from_dict(
        cls, obj: dict[str, Any], window_shapes: Mapping[str, tuple[bool, int]]
    ) -> UserCapState:
        """Inverse of :meth:`to_dict`.

        ``window_shapes`` maps a window key to ``(in_usd, bucket_count)``, the number of
        buckets of a rolling window (0 for a fixed window); windows of plans no longer in the
        catalog are dropped.
        """
        if obj.get("v") != FORMAT_VERSION:
            raise ValueError(f"unsupported cap state format {obj.get('v')!r}")
        state = cls(str(obj["u"]), str(obj.get("o", "")))
        state.watermark = int(obj.get("w", NEVER))
        state.wallet = units_from_str(obj["c"]) if "c" in obj else 0
        state.topups = [str(t) for t in obj.get("t", [])]
        state.granted = int(obj.get("g", 0))
        state.version = int(obj.get("n", 0))
        state.last_enforcement = tuple(obj["e"]) if obj.get("e") is not None else None
        state.months = FixedState.from_obj({"i": obj.get("m", [])}, usd=True)
        for key, wobj in obj.get("x", {}).items():
            if key not in window_shapes:
                continue
            usd, bucket_count = window_shapes[key]
            if "i" in wobj:
                state.windows[key] = FixedState.from_obj(wobj, usd)
            else:
                state.windows[key] = RollingState.from_obj(wobj, usd, bucket_count)
        for row in (*obj.get("r", ()), *obj.get("d", ())):
            reservation = Reservation.from_row(row)
            into = state.settled if reservation.settled else state.reservations
            into[reservation.admission.reservation_id] = reservation
        return state
