"""The admission protocol on the wire: a gateway's request and the owning worker's answer.

See docs/DESIGN.md, "Admission (reservations)". A gateway that wants a hard cap to hold under
concurrent requests asks *before* the model call. Its request goes to the usage-events topic,
keyed by ``user_id`` like the user's usage events, so the worker that owns the user's partition
decides it in offset order with the user's usage, against the same per-user state. The answer
goes to the admissions topic, on the partition :func:`reply_partition` gives for the gateway.

A request is told from a usage event by its first bytes: its JSON starts with ``{"kind":``
(:data:`REQUEST_PREFIX`; a usage event has no ``kind`` field, so it can never start so), which is
how :func:`encode_request` writes it. Anything starting so that is not a valid request goes to
the dead-letter topic with stage ``admission``.

Two kinds travel so: ``admission`` (:class:`AdmissionRequest`, answered) and ``release``
(:class:`ReleaseRequest`, not answered): a gateway gives back reservations it will not use, such
as the pool it holds when it stops, so that they stop holding the user's budget before their TTL.
"""

from __future__ import annotations

import zlib
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from schemas._events import MAX_TOKENS
from spendstream.errors import InvalidEventError

__all__ = [
    "MAX_POOL",
    "MAX_RELEASE",
    "MAX_RESERVATION_ID_CHARS",
    "REQUEST_PREFIX",
    "AdmissionAnswer",
    "AdmissionRequest",
    "ReleaseRequest",
    "decode_answer",
    "decode_request",
    "encode_answer",
    "encode_request",
    "pool_ids",
    "reply_partition",
]

REQUEST_PREFIX = b'{"kind":'
"""How an admission request's JSON starts (and a usage event's never does)."""
MAX_POOL = 64
"""At most this many extra reservations per request (the gateway's local pool)."""
MAX_RELEASE = 1024
"""At most this many reservation ids per release request."""
MAX_RESERVATION_ID_CHARS = 200
"""A request's reservation id; pooled ones add ``.N`` and stay within the contract's 256."""

_Id = Annotated[str, Meta(min_length=1, max_length=256)]
_Rid = Annotated[str, Meta(min_length=1, max_length=MAX_RESERVATION_ID_CHARS)]
_Name = Annotated[str, Meta(min_length=1, max_length=128)]
_Tokens = Annotated[int, Meta(ge=0, le=MAX_TOKENS)]


class AdmissionRequest(
    msgspec.Struct, kw_only=True, forbid_unknown_fields=True, tag_field="kind", tag="admission"
):
    """Reserve budget for one model call of at most the given tokens (and, maybe, a pool).

    The worker prices the estimate itself, with its catalog: ``input_tokens`` and
    ``output_tokens`` at the standard tier, without cache discounts, on ``model`` (and on the
    plan's downgrade model when a downgrade is due). ``pool`` asks for up to that many further
    reservations of the same shape (ids :func:`pool_ids`) for the gateway to hand out without
    asking, granted only while the user stays far from every cap after them.
    """

    v: Literal[1] = 1
    org_id: _Id
    user_id: _Id
    reservation_id: _Rid
    gateway: _Name
    """The asking gateway replica: the answer's key, and its partition (:func:`reply_partition`)."""
    model: _Name
    input_tokens: _Tokens = 0
    output_tokens: _Tokens = 0
    pool: Annotated[int, Meta(ge=0, le=MAX_POOL)] = 0


class ReleaseRequest(
    msgspec.Struct, kw_only=True, forbid_unknown_fields=True, tag_field="kind", tag="release"
):
    """Give back reservations that no call will use: their holds end now, not at their TTL.

    Not answered. The worker releases each listed id the user's state holds (admitted, not yet
    settled) as if its usage had arrived with nothing spent; unknown, expired, blocked or
    settled ids change nothing, so a replay or a repeat is harmless. An id released while its
    call is still running leaves that call's usage unreserved: release only ids that no call
    was or will be made under (``Admitter.close`` releases its unused pool).
    """

    v: Literal[1] = 1
    org_id: _Id
    user_id: _Id
    gateway: _Name
    reservation_ids: Annotated[list[_Id], Meta(min_length=1, max_length=MAX_RELEASE)]


class AdmissionAnswer(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The worker's answer; the same for every replay of the request (while remembered)."""

    reservation_id: str
    gateway: str
    user_id: str
    action: Literal["allow", "downgrade", "block"]
    reason: str
    """``ok``, ``overage``, ``credit``, ``cap``, ``ceiling``, ``downgrade_without_estimate``;
    ``no_plan`` (no subscription or plan: caps do not apply, nothing is held); ``settled`` (a
    repeat of a request whose call's usage already settled it: nothing more is held);
    ``wrong_org`` (a block: the request's ``org_id`` is not the subscription's; nothing held)."""
    model: str | None = None
    """The model to serve (``None`` when blocked)."""
    window: str | None = None
    retry_after: int | None = None
    """For a block: epoch seconds when the blocking windows have room again (``None``: never
    for this estimate, or nothing to wait for)."""
    cost: str = "0"
    """USD held for the call, as a decimal string (exact)."""
    pooled: list[str] = msgspec.field(default_factory=list)
    """Extra reservations granted for the gateway's pool (same model and token maxima)."""
    answered_at: str = ""


_request_decoder = msgspec.json.Decoder(AdmissionRequest | ReleaseRequest)
_answer_decoder = msgspec.json.Decoder(AdmissionAnswer)
_encoder = msgspec.json.Encoder()


def encode_request(request: AdmissionRequest | ReleaseRequest) -> bytes:
    """The request's JSON (starting with :data:`REQUEST_PREFIX`)."""
    return _encoder.encode(request)


def decode_request(value: bytes | None) -> AdmissionRequest | ReleaseRequest:
    """Parse one request of either kind; :class:`InvalidEventError` with the reason when it is
    not one."""
    if value is None:
        raise InvalidEventError("admission request: empty message")
    try:
        return _request_decoder.decode(value)
    except msgspec.DecodeError as exc:
        raise InvalidEventError(f"admission request: {exc}") from exc


def encode_answer(answer: AdmissionAnswer) -> bytes:
    """The answer's JSON."""
    return _encoder.encode(answer)


def decode_answer(value: bytes) -> AdmissionAnswer:
    """Parse one answer; :class:`InvalidEventError` when it is not one."""
    try:
        return _answer_decoder.decode(value)
    except msgspec.DecodeError as exc:
        raise InvalidEventError(f"admission answer: {exc}") from exc


def pool_ids(reservation_id: str, pool: int) -> list[str]:
    """The ids of a request's pooled reservations: ``<id>.1`` ... ``<id>.<pool>``."""
    return [f"{reservation_id}.{i}" for i in range(1, pool + 1)]


def reply_partition(gateway: str, partitions: int) -> int:
    """The admissions-topic partition a gateway's answers go to (stable: CRC-32 of its name)."""
    return zlib.crc32(gateway.encode()) % partitions
