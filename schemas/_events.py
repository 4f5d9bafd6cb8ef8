"""The public usage-event contract (docs/DESIGN.md, "The event contract") and its wire codec.

Field names are a public contract: producers in other languages depend on them. Models may add
optional fields; they never rename or repurpose one.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal, Protocol

import orjson
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from spendstream.errors import InvalidEventError

MAX_EVENT_BYTES = 16 * 1024
"""Largest encoded event accepted; larger messages go to the dead-letter topic."""
MAX_ATTRIBUTES = 32
MAX_ATTRIBUTE_KEY_CHARS = 64
MAX_ATTRIBUTE_VALUE_CHARS = 256
MAX_TOKENS = 10**8
"""Upper bound on any token count of one call: ten times the largest context window in the
vendored price map (10,485,760 tokens). With per-token prices bounded by
:data:`MAX_PRICE_PER_TOKEN` (and searches by 1 USD each), one event costs at most 2,001,000 USD,
so a user's billing month stays below what ``Decimal(38, 24)`` holds (10**14 USD) for 5 * 10**7
calls at that maximum (docs/DESIGN.md, "Accepted ranges")."""
MAX_LATENCY_MS = 7 * 86_400_000
"""Upper bound on ``latency_ms`` (a week; the stored column is ``UInt32``)."""
MAX_PRICE_PER_TOKEN = Decimal("0.01")
"""Upper bound on any per-token price the catalog takes (the vendored map's highest USD
price is 0.0006: o1-pro's output)."""
EARLIEST_TIME = datetime(2000, 1, 1, tzinfo=UTC)
"""The earliest ``occurred_at`` (and plan, anchor or grant time) the contract accepts."""
LATEST_TIME = datetime(2100, 1, 1, tzinfo=UTC)
"""The first instant *after* the accepted range of times."""
TIME_RANGE_TEXT = "from 2000-01-01T00:00:00Z up to (not including) 2100-01-01T00:00:00Z"

Id = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Tokens = Annotated[int, Field(ge=0, le=MAX_TOKENS, strict=True)]
LatencyMs = Annotated[int, Field(ge=0, le=MAX_LATENCY_MS, strict=True)]
AttrKey = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ATTRIBUTE_KEY_CHARS)]
AttrValue = Annotated[str, StringConstraints(max_length=MAX_ATTRIBUTE_VALUE_CHARS)]


_SAFE_FIRST_YEAR = EARLIEST_TIME.year + 1
_SAFE_LAST_YEAR = LATEST_TIME.year - 2


def time_in_range(when: datetime) -> bool:
    """Whether an aware datetime lies in the accepted range of times.

    The year is looked at first: converting ``0001-01-01T00:00:00+01:00`` to UTC, or comparing
    it with a UTC time, raises ``OverflowError`` (year 0), which is not a validation error.
    """
    year = when.year
    if _SAFE_FIRST_YEAR <= year <= _SAFE_LAST_YEAR:
        # Whatever its UTC offset (under 24 h), such a time is inside: no aware comparison,
        # which cost about 1 µs per event when the offset is not UTC (producers, worker).
        return True
    if not EARLIEST_TIME.year - 1 <= year <= LATEST_TIME.year:
        return False
    return EARLIEST_TIME <= when < LATEST_TIME


def require_time_in_range(value: datetime) -> datetime:
    """``value`` if it is in the accepted range; ``ValueError`` (naming the range) if not."""
    if not time_in_range(value):
        raise ValueError(f"time must be {TIME_RANGE_TEXT}, got {value.isoformat()}")
    return value


BoundedTime = Annotated[
    AwareDatetime,
    AfterValidator(require_time_in_range),
    WithJsonSchema(
        {
            "type": "string",
            "format": "date-time",
            "formatMinimum": "2000-01-01T00:00:00Z",
            "formatExclusiveMaximum": "2100-01-01T00:00:00Z",
        }
    ),
]
"""An RFC 3339 time with an offset, in the accepted range (its offset kept)."""


def _to_utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


MAX_WEB_SEARCHES = 1000
"""Upper bound on ``web_search_requests`` of one call."""

ServiceTier = Literal["standard", "batch", "flex", "priority"]
"""How the provider ran the call: its prices differ per tier (batch is about half)."""
SearchContextSize = Literal["low", "medium", "high"]


class _TokenCounts(Protocol):
    @property
    def input_tokens(self) -> int: ...
    @property
    def cached_input_tokens(self) -> int: ...
    @property
    def cache_write_tokens(self) -> int: ...
    @property
    def cache_write_1h_tokens(self) -> int: ...
    @property
    def input_audio_tokens(self) -> int: ...
    @property
    def input_image_tokens(self) -> int: ...
    @property
    def output_tokens(self) -> int: ...
    @property
    def reasoning_tokens(self) -> int: ...
    @property
    def output_audio_tokens(self) -> int: ...
    @property
    def output_image_tokens(self) -> int: ...


def token_classes_problem(ev: _TokenCounts) -> str | None:
    """The contract's rule across token fields: what is wrong, or None when they fit.

    Every class is a part of its total: cached, cache-write, audio and image input tokens are
    disjoint parts of ``input_tokens`` (1-hour cache writes a part of the cache writes);
    reasoning, audio and image output tokens disjoint parts of ``output_tokens``.
    """
    if (
        ev.cached_input_tokens
        + ev.cache_write_tokens
        + ev.input_audio_tokens
        + ev.input_image_tokens
        > ev.input_tokens
    ):
        return (
            "cached_input_tokens + cache_write_tokens + input_audio_tokens + input_image_tokens "
            "must not exceed input_tokens"
        )
    if ev.cache_write_1h_tokens > ev.cache_write_tokens:
        return "cache_write_1h_tokens must not exceed cache_write_tokens"
    if ev.reasoning_tokens + ev.output_audio_tokens + ev.output_image_tokens > ev.output_tokens:
        return (
            "reasoning_tokens + output_audio_tokens + output_image_tokens must not exceed "
            "output_tokens"
        )
    return None


class UsageEvent(BaseModel):
    """One model call, as emitted by a gateway after the call.

    See docs/DESIGN.md, "The event contract".

    Token fields follow the provider-neutral convention: ``input_tokens`` counts *all* input
    tokens of the call, of which ``cached_input_tokens`` were read from and
    ``cache_write_tokens`` written to the prompt cache (``cache_write_1h_tokens`` of them with
    a one-hour lifetime), and ``input_audio_tokens`` / ``input_image_tokens`` were audio and
    image; ``output_tokens`` counts all output tokens, of which ``reasoning_tokens`` were spent
    on reasoning and ``output_audio_tokens`` / ``output_image_tokens`` were audio and images.
    ``service_tier`` and the web searches the call ran complete what its price depends on
    (docs/DESIGN.md, "Exact money").
    """

    model_config = ConfigDict(extra="ignore", frozen=True, str_strip_whitespace=False)

    event_id: Id = Field(description="Unique per call: the idempotency key.")
    occurred_at: Annotated[BoundedTime, AfterValidator(_to_utc)] = Field(
        description="Event time, RFC 3339 with an offset, from 2000-01-01T00:00:00Z up to "
        "(not including) 2100-01-01T00:00:00Z; stored as UTC."
    )
    org_id: Id
    user_id: Id
    api_key_id: Id | None = None
    gateway: Name = Field(description="Which gateway or service emitted the event.")
    request_id: Id | None = None
    reservation_id: Id | None = Field(
        default=None,
        description="The admission reservation this call was admitted under (from "
        "`Admitter.admit`); settles its hold in the worker. Optional: gateways that do not "
        "reserve leave it out.",
    )
    provider: Name | None = Field(default=None, description="openai, anthropic, bedrock, ...")
    requested_model: Name = Field(description="The model the client asked for.")
    served_model: Name | None = Field(
        default=None, description="The model that answered (routing); defaults to requested."
    )
    input_tokens: Tokens = 0
    cached_input_tokens: Tokens = 0
    cache_write_tokens: Tokens = 0
    output_tokens: Tokens = 0
    reasoning_tokens: Tokens = 0
    cache_write_1h_tokens: Tokens = Field(
        default=0, description="Part of cache_write_tokens written with a 1-hour lifetime."
    )
    input_audio_tokens: Tokens = Field(default=0, description="Part of input_tokens: audio.")
    input_image_tokens: Tokens = Field(default=0, description="Part of input_tokens: images.")
    output_audio_tokens: Tokens = Field(default=0, description="Part of output_tokens: audio.")
    output_image_tokens: Tokens = Field(default=0, description="Part of output_tokens: images.")
    service_tier: ServiceTier = Field(
        default="standard", description="The provider's processing tier for the call."
    )
    web_search_requests: Annotated[int, Field(ge=0, le=MAX_WEB_SEARCHES, strict=True)] = 0
    search_context_size: SearchContextSize | None = Field(
        default=None, description="The web search context size (the provider's default if unset)."
    )
    semantic_cache_hit: Annotated[bool, Field(strict=True)] = False
    status: Literal["ok", "error"] = "ok"
    latency_ms: LatencyMs | None = None
    feature: Name | None = None
    attributes: dict[AttrKey, AttrValue] | None = Field(
        default=None, max_length=MAX_ATTRIBUTES, description="Bounded string -> string map."
    )
    schema_version: Annotated[int, Field(ge=1, le=1, strict=True)] = 1

    @field_validator("occurred_at", mode="before")
    @classmethod
    def _rfc3339_only(cls, value: Any) -> Any:
        # pydantic would accept unix numbers, and numeric strings as unix time too; the contract
        # is an RFC 3339 string with an offset (the date and time parts checked by pydantic).
        if isinstance(value, datetime):
            return value
        if isinstance(value, str) and value[4:5] == "-" and value[10:11] in ("T", "t", " "):
            return value
        raise ValueError("occurred_at must be an RFC 3339 timestamp string with an offset")

    @model_validator(mode="after")
    def _token_classes_fit(self) -> UsageEvent:
        problem = token_classes_problem(self)
        if problem is not None:
            raise ValueError(problem)
        return self

    @property
    def model(self) -> str:
        """The model that answered: ``served_model`` or, without routing, the requested one."""
        return self.served_model or self.requested_model


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "event"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def oversize_reason(size: int) -> str:
    """Why an event of ``size`` bytes (over :data:`MAX_EVENT_BYTES`) is refused."""
    return f"event is {size} bytes, over the {MAX_EVENT_BYTES} limit"


def decode_event(data: bytes | str | None) -> UsageEvent:
    """Parse and validate one wire message; raise :class:`InvalidEventError` with the reason."""
    if data is None:
        raise InvalidEventError("message has no value (a null or tombstone record)")
    if len(data) > MAX_EVENT_BYTES:
        raise InvalidEventError(oversize_reason(len(data)))
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidEventError(f"not JSON: {exc}") from exc
    return event_from_obj(obj)


def event_from_obj(obj: Any) -> UsageEvent:
    """Validate an already-parsed JSON object as a :class:`UsageEvent`."""
    if not isinstance(obj, dict):
        raise InvalidEventError(f"event must be a JSON object, got {type(obj).__name__}")
    try:
        return UsageEvent.model_validate(obj)
    except ValidationError as exc:
        raise InvalidEventError(_describe(exc)) from exc


def encode_event(event: UsageEvent) -> bytes:
    """The wire form: compact UTF-8 JSON, UTC timestamps, unset optional fields left out."""
    return orjson.dumps(event.model_dump(exclude_none=True), option=orjson.OPT_UTC_Z)


def event_json_schema() -> dict[str, Any]:
    """JSON Schema of the contract, for producers in other languages."""
    schema = UsageEvent.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://spendstream.dev/schemas/usage_event.schema.json"
    schema["additionalProperties"] = True
    return schema
