"""msgspec mirrors of :class:`schemas.UsageEvent` for the hot paths; the pydantic model decides.

:class:`~schemas.UsageEvent` (pydantic) is the contract. Through it, checking one event cost
about 5 µs here: a third of the producer's budget per event and about a tenth of the worker's.
msgspec checks the same field rules in C in about 1.5 µs, and its structs are cheaper to read
than model instances (BENCHMARKS.md). Here it only ever *accepts*: whatever it refuses goes to
the pydantic model, so an invalid event's error is the contract's, word for word, and an event
refused here wrongly is merely slower, never lost or dead-lettered by mistake.

The opposite mistake (msgspec accepting what the contract refuses) would let an event through
that the contract rejects. ``tests/unit/test_wire.py`` guards it: :class:`WireEvent`'s JSON
Schema must equal the model's, field for field, and on generated valid and broken events (as
dicts and as bytes) the fast paths must accept only what the model accepts, with the same
values.

Where msgspec would read an event differently, the event goes to the model instead: more than
six fractional digits (msgspec rounds, the model truncates), any backslash escape or non-UTF-8
byte (msgspec skips unknown fields unread, orjson refuses such text anywhere), nesting deep
enough for a ``RecursionError``, and, in a Python dict, a lone surrogate (caught by encoding).
msgspec also refuses some timestamps the model takes (``2025-06-02T10:00Z``, without seconds);
those simply take the model's path.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from schemas._events import (
    MAX_ATTRIBUTE_KEY_CHARS,
    MAX_ATTRIBUTE_VALUE_CHARS,
    MAX_ATTRIBUTES,
    MAX_EVENT_BYTES,
    MAX_LATENCY_MS,
    MAX_TOKENS,
    MAX_WEB_SEARCHES,
    SearchContextSize,
    ServiceTier,
    UsageEvent,
    decode_event,
    event_from_obj,
    time_in_range,
    token_classes_problem,
)

_Id = Annotated[str, Meta(min_length=1, max_length=256)]
_Name = Annotated[str, Meta(min_length=1, max_length=128)]
_Tokens = Annotated[int, Meta(ge=0, le=MAX_TOKENS)]
_LatencyMs = Annotated[int, Meta(ge=0, le=MAX_LATENCY_MS)]
# msgspec has no range check for times: the JSON Schema says it, and the code paths below
# hand a time out of range to the model (whose error names the range).
_Time = Annotated[
    datetime,
    Meta(
        tz=True,
        extra_json_schema={
            "formatMinimum": "2000-01-01T00:00:00Z",
            "formatExclusiveMaximum": "2100-01-01T00:00:00Z",
        },
    ),
]
_AttrKey = Annotated[str, Meta(min_length=1, max_length=MAX_ATTRIBUTE_KEY_CHARS)]
_AttrValue = Annotated[str, Meta(max_length=MAX_ATTRIBUTE_VALUE_CHARS)]
_Attributes = Annotated[dict[_AttrKey, _AttrValue], Meta(max_length=MAX_ATTRIBUTES)]


class WireEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """:class:`schemas.UsageEvent`'s fields and per-field rules, in its order, for msgspec.

    Encoded, fields at their default are left out (consumers apply the contract's defaults)
    and ``occurred_at`` keeps the offset it came with.
    """

    event_id: _Id
    occurred_at: _Time
    org_id: _Id
    user_id: _Id
    api_key_id: _Id | None = None
    gateway: _Name
    request_id: _Id | None = None
    reservation_id: _Id | None = None
    provider: _Name | None = None
    requested_model: _Name
    served_model: _Name | None = None
    input_tokens: _Tokens = 0
    cached_input_tokens: _Tokens = 0
    cache_write_tokens: _Tokens = 0
    output_tokens: _Tokens = 0
    reasoning_tokens: _Tokens = 0
    cache_write_1h_tokens: _Tokens = 0
    input_audio_tokens: _Tokens = 0
    input_image_tokens: _Tokens = 0
    output_audio_tokens: _Tokens = 0
    output_image_tokens: _Tokens = 0
    service_tier: ServiceTier = "standard"
    web_search_requests: Annotated[int, Meta(ge=0, le=MAX_WEB_SEARCHES)] = 0
    search_context_size: SearchContextSize | None = None
    semantic_cache_hit: bool = False
    status: Literal["ok", "error"] = "ok"
    latency_ms: _LatencyMs | None = None
    feature: _Name | None = None
    attributes: _Attributes | None = None
    schema_version: Annotated[int, Meta(ge=1, le=1)] = 1


class DecodedEvent(WireEvent, kw_only=True, omit_defaults=True):
    """A usage event as the worker reads it: every contract rule checked, ``occurred_at`` in UTC.

    Same fields and values as :class:`schemas.UsageEvent`; built by :func:`decode_usage`.
    """

    def __post_init__(self) -> None:
        if _classes_overflow(self):
            raise ValueError(token_classes_problem(self))
        when = self.occurred_at
        if not time_in_range(when):
            raise ValueError("occurred_at out of range")  # the model words the refusal
        if when.tzinfo is not UTC:
            self.occurred_at = when.astimezone(UTC)


def _classes_overflow(ev: WireEvent) -> bool:
    """Whether the token classes break :func:`~schemas._events.token_classes_problem`'s rule
    (the same sums, inline: this runs once per event on the hot paths)."""
    return (
        ev.cached_input_tokens + ev.cache_write_tokens + ev.input_audio_tokens
        + ev.input_image_tokens > ev.input_tokens
        or ev.cache_write_1h_tokens > ev.cache_write_tokens
        or ev.reasoning_tokens + ev.output_audio_tokens + ev.output_image_tokens
        > ev.output_tokens
    )  # fmt: skip


FIELDS: tuple[str, ...] = WireEvent.__struct_fields__
_INVALID = (
    msgspec.ValidationError,
    msgspec.DecodeError,
    msgspec.EncodeError,
    TypeError,
    ValueError,
    RecursionError,  # deeply nested unknown fields
)
_convert = msgspec.convert
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(DecodedEvent).decode
_KEY = b'"occurred_at":"'
_BACKSLASH = 0x5C


def _over_six_digits(when: str | bytes) -> bool:
    # The seconds of an RFC 3339 timestamp msgspec reads end at index 19; a seventh
    # fractional digit would be at 26 (msgspec rounds it, the model truncates).
    return when[19:20] in (".", b".") and when[26:27].isdigit()


def encode_dict(obj: dict[str, Any]) -> tuple[str, bytes] | None:
    """(user_id, wire bytes) of a valid event dict, or None: then ask the pydantic model why."""
    try:
        ev = _convert(obj, WireEvent)
        if _classes_overflow(ev) or not time_in_range(ev.occurred_at):
            return None
        when = obj["occurred_at"]
        if type(when) is str and _over_six_digits(when):
            return None
        return ev.user_id, _encode(ev)
    except _INVALID:
        return None


def from_model(event: UsageEvent) -> DecodedEvent:
    """The :class:`DecodedEvent` of an event the pydantic model already validated."""
    return DecodedEvent(**{name: getattr(event, name) for name in FIELDS})


def decode_dict(obj: Any) -> DecodedEvent:
    """Validate an already-parsed JSON object; the same verdict as :func:`schemas.event_from_obj`.

    Raises :class:`InvalidEventError` with the contract's reason.
    """
    if type(obj) is dict:
        when = obj.get("occurred_at")
        if type(when) is not str or not _over_six_digits(when):
            try:
                event = _convert(obj, DecodedEvent)
                # Encoding finds lone surrogates, which the model refuses in any string (a
                # parsed JSON message cannot hold them; a Python dict can).
                _encode(event)
            except _INVALID:
                return from_model(event_from_obj(obj))  # the model's verdict and reason
            return event
    return from_model(event_from_obj(obj))


def to_model(event: DecodedEvent) -> UsageEvent:
    """The pydantic :class:`~schemas.UsageEvent` with the same values (for the rare slow path)."""
    return UsageEvent.model_validate({name: getattr(event, name) for name in FIELDS})


def decode_usage(data: bytes | None) -> DecodedEvent:
    """Parse and validate one wire message; raise :class:`InvalidEventError` with the reason.

    The same verdict and values as :func:`schemas.decode_event`, mostly without pydantic.
    """
    if (
        type(data) is bytes
        and len(data) <= MAX_EVENT_BYTES
        # msgspec skips unknown fields without decoding their text, where orjson (the model's
        # parser) refuses invalid UTF-8 and escaped lone surrogates anywhere in the message.
        # Messages with a backslash (any escape) are rare, as encoders write UTF-8: they go
        # to the model, as does non-UTF-8.
        and _BACKSLASH not in data
        and (data.isascii() or _is_utf8(data))
        # The fraction check below reads the "occurred_at" it finds: only when that is the one
        # such key, written compactly (anything else goes to the model).
        and (at := data.find(_KEY)) >= 0
        and data.find(_KEY, at + 1) < 0
    ):
        start = at + len(_KEY)
        if not _over_six_digits(data[start : start + 27]):
            try:
                return _decode(data)
            except _INVALID:
                return from_model(decode_event(data))  # the model's verdict and reason
    return from_model(decode_event(data))


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True
