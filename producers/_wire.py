"""The producer's fast path for dict events: msgspec checks and encodes, pydantic has the last word.

:class:`schemas.UsageEvent` (pydantic) is the contract. Through it, validating and encoding a
gateway's dict took about 5 µs per event here, three times what ``produce()`` itself costs, and
was what held the producer to a third of raw ``produce()`` throughput. msgspec does both in C in
about 1.5 µs (BENCHMARKS.md). It only *accepts* here: anything it refuses is re-validated by the
pydantic model, so an invalid event's error is the contract's, word for word, and an event the
fast path refuses wrongly is merely slower, never lost.

The opposite mistake (msgspec accepting what the contract refuses) would send an event the
worker dead-letters. ``tests/unit/test_wire.py`` guards it: :class:`WireEvent`'s JSON Schema
must equal the model's field for field, and on generated valid and broken events the fast path
must accept only what the model accepts, into bytes that decode to the model's event.

The bytes are a valid wire form of the same event, not byte-for-byte ``encode_event``: fields
at their default (zero tokens, ``false``, ``"ok"``, ``None``) are left out and ``occurred_at``
keeps the offset it came with (the worker stores it as UTC). Consumers apply the contract's
defaults, as for any producer in another language.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from schemas._events import (
    MAX_ATTRIBUTE_KEY_CHARS,
    MAX_ATTRIBUTE_VALUE_CHARS,
    MAX_ATTRIBUTES,
    MAX_TOKENS,
)

_Id = Annotated[str, Meta(min_length=1, max_length=256)]
_Name = Annotated[str, Meta(min_length=1, max_length=128)]
_Tokens = Annotated[int, Meta(ge=0, le=MAX_TOKENS)]
_AttrKey = Annotated[str, Meta(min_length=1, max_length=MAX_ATTRIBUTE_KEY_CHARS)]
_AttrValue = Annotated[str, Meta(max_length=MAX_ATTRIBUTE_VALUE_CHARS)]
_Attributes = Annotated[dict[_AttrKey, _AttrValue], Meta(max_length=MAX_ATTRIBUTES)]


class WireEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """:class:`schemas.UsageEvent`'s fields and per-field rules, in its order, for msgspec.

    The rule across token fields is checked by :func:`encode_dict`; the model's own checks
    (an RFC 3339 string or aware datetime for ``occurred_at``) are what msgspec's strict
    conversion does anyway.
    """

    event_id: _Id
    occurred_at: Annotated[datetime, Meta(tz=True)]
    org_id: _Id
    user_id: _Id
    api_key_id: _Id | None = None
    gateway: _Name
    request_id: _Id | None = None
    provider: _Name | None = None
    requested_model: _Name
    served_model: _Name | None = None
    input_tokens: _Tokens = 0
    cached_input_tokens: _Tokens = 0
    cache_write_tokens: _Tokens = 0
    output_tokens: _Tokens = 0
    reasoning_tokens: _Tokens = 0
    semantic_cache_hit: bool = False
    status: Literal["ok", "error"] = "ok"
    latency_ms: _Tokens | None = None
    feature: _Name | None = None
    attributes: _Attributes | None = None
    schema_version: Annotated[int, Meta(ge=1, le=1)] = 1


_convert = msgspec.convert
_encode = msgspec.json.Encoder().encode
_Invalid = (msgspec.ValidationError, msgspec.EncodeError, TypeError, ValueError)


def encode_dict(obj: dict[str, Any]) -> tuple[str, bytes] | None:
    """(user_id, wire bytes) of a valid event dict, or None: then ask the pydantic model why."""
    try:
        ev = _convert(obj, WireEvent)
        if (
            ev.cached_input_tokens + ev.cache_write_tokens > ev.input_tokens
            or ev.reasoning_tokens > ev.output_tokens
        ):
            return None
        when = obj["occurred_at"]
        if type(when) is str and when[19:20] == "." and when[26:27].isdigit():
            # More than 6 fractional digits: msgspec rounds to the microsecond where the
            # model truncates, so let the model have it (msgspec accepted the string, so
            # its seconds end at index 19).
            return None
        return ev.user_id, _encode(ev)
    except _Invalid:
        return None
