"""Usage events from real provider payloads (docs/DESIGN.md, "The event contract").

Each adapter maps one provider's ``usage`` object onto the provider-neutral token fields of
:class:`~schemas.UsageEvent` and validates the result, so a gateway writes::

    event = from_anthropic_usage(response["usage"], ctx)

where ``ctx`` is the :class:`EventContext` of the call (ids, time, who, which models). Missing
or ``null`` counters count as zero, as the providers document them as optional.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from schemas._events import UsageEvent, event_from_obj
from spendstream.errors import InvalidEventError

TOKEN_FIELDS = (
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
)


@dataclass(frozen=True, slots=True)
class EventContext:
    """What the gateway knows about a call besides its token usage."""

    event_id: str
    occurred_at: datetime | str
    org_id: str
    user_id: str
    gateway: str
    requested_model: str
    served_model: str | None = None
    provider: str | None = None
    api_key_id: str | None = None
    request_id: str | None = None
    status: str = "ok"
    latency_ms: int | None = None
    feature: str | None = None
    semantic_cache_hit: bool = False
    attributes: Mapping[str, str] | None = None
    service_tier: str | None = None
    """standard, batch, flex or priority, or the provider's name for it (mapped by
    :func:`service_tier_of`): OpenAI returns the tier beside its usage, not in it, and a
    gateway that sent a Batch API request knows it ran as ``batch``."""
    web_search_requests: int | None = None
    search_context_size: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    reservation_id: str | None = None
    """The id :meth:`producers.Admitter.admit` gave the call: the event settles that hold."""

    def as_fields(self) -> dict[str, Any]:
        """The context as event fields, ``None`` values left out."""
        occurred = (
            self.occurred_at.isoformat()
            if isinstance(self.occurred_at, datetime)
            else self.occurred_at
        )
        out: dict[str, Any] = {
            "event_id": self.event_id,
            "occurred_at": occurred,
            "org_id": self.org_id,
            "user_id": self.user_id,
            "gateway": self.gateway,
            "requested_model": self.requested_model,
            "served_model": self.served_model,
            "provider": self.provider,
            "api_key_id": self.api_key_id,
            "request_id": self.request_id,
            "status": self.status,
            "latency_ms": self.latency_ms,
            "feature": self.feature,
            "semantic_cache_hit": self.semantic_cache_hit,
            "attributes": dict(self.attributes) if self.attributes is not None else None,
            "service_tier": service_tier_of(self.service_tier),
            "web_search_requests": self.web_search_requests,
            "search_context_size": self.search_context_size,
            "reservation_id": self.reservation_id,
            **self.extra,
        }
        return {k: v for k, v in out.items() if v is not None}


def _count(obj: Mapping[str, Any] | None, key: str, source: str) -> int:
    if obj is None:
        return 0
    value = obj.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidEventError(f"{source}.{key}: expected an integer, got {value!r}")
    return value


def _details(usage: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    value = usage.get(key)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidEventError(f"usage.{key}: expected an object, got {value!r}")
    return value


_SERVICE_TIERS = {
    # OpenAI (the response's service_tier): "default" and "auto" run at standard prices,
    # "scale" is a reserved-capacity contract billed outside the per-token prices.
    "default": "standard",
    "auto": "standard",
    "scale": "standard",
    # Anthropic (usage.service_tier) and the contract's own names
    "standard": "standard",
    "batch": "batch",
    "flex": "flex",
    "priority": "priority",
}


def service_tier_of(value: Any) -> str | None:
    """The contract's service tier for a provider's name of it (``None`` when not given).

    An unknown name is refused rather than priced at standard: a tier the catalog does not
    know would be counted at the wrong price.
    """
    if value is None:
        return None
    tier = _SERVICE_TIERS.get(value) if isinstance(value, str) else None
    if tier is None:
        raise InvalidEventError(f"service_tier: unknown tier {value!r}")
    return tier


def _build(ctx: EventContext, tokens: dict[str, Any], provider: str | None) -> UsageEvent:
    fields = ctx.as_fields()
    if provider is not None:
        fields.setdefault("provider", provider)
    # What the usage object says about the call wins over defaults; the context (what the
    # gateway knows, e.g. that it sent a Batch API request) wins over the usage object.
    for key, value in tokens.items():
        if key in ("service_tier", "web_search_requests") and key in fields:
            continue
        fields[key] = value
    return event_from_obj(fields)


def _part(total: int, taken: int, value: int) -> int:
    """``value`` capped to what is left of ``total`` after ``taken``: providers count some
    tokens in two details (cached audio), the contract's classes are disjoint."""
    return max(0, min(value, total - taken))


def openai_chat_tokens(usage: Mapping[str, Any]) -> dict[str, int]:
    """Token fields from an OpenAI Chat Completions ``usage`` object."""
    prompt = _details(usage, "prompt_tokens_details")
    completion = _details(usage, "completion_tokens_details")
    inp = _count(usage, "prompt_tokens", "usage")
    cached = _count(prompt, "cached_tokens", "usage.prompt_tokens_details")
    audio_in = _part(inp, cached, _count(prompt, "audio_tokens", "usage.prompt_tokens_details"))
    image_in = _part(
        inp, cached + audio_in, _count(prompt, "image_tokens", "usage.prompt_tokens_details")
    )
    out = _count(usage, "completion_tokens", "usage")
    reasoning = _count(completion, "reasoning_tokens", "usage.completion_tokens_details")
    audio_out = _part(
        out, reasoning, _count(completion, "audio_tokens", "usage.completion_tokens_details")
    )
    return {
        "input_tokens": inp,
        "cached_input_tokens": cached,
        "input_audio_tokens": audio_in,
        "input_image_tokens": image_in,
        "output_tokens": out,
        "reasoning_tokens": reasoning,
        "output_audio_tokens": audio_out,
    }


def openai_responses_tokens(usage: Mapping[str, Any]) -> dict[str, int]:
    """Token fields from an OpenAI Responses API ``usage`` object."""
    inp = _details(usage, "input_tokens_details")
    out = _details(usage, "output_tokens_details")
    return {
        "input_tokens": _count(usage, "input_tokens", "usage"),
        "cached_input_tokens": _count(inp, "cached_tokens", "usage.input_tokens_details"),
        "output_tokens": _count(usage, "output_tokens", "usage"),
        "reasoning_tokens": _count(out, "reasoning_tokens", "usage.output_tokens_details"),
    }


def anthropic_tokens(usage: Mapping[str, Any]) -> dict[str, Any]:
    """Token fields from an Anthropic Messages ``usage`` object.

    Anthropic's ``input_tokens`` excludes cached tokens: the call's full input is the sum of
    ``input_tokens``, ``cache_creation_input_tokens`` and ``cache_read_input_tokens``. The
    one-hour cache writes are ``cache_creation.ephemeral_1h_input_tokens``; web searches are
    ``server_tool_use.web_search_requests``; ``service_tier`` is standard, priority or batch.
    """
    uncached = _count(usage, "input_tokens", "usage")
    write = _count(usage, "cache_creation_input_tokens", "usage")
    read = _count(usage, "cache_read_input_tokens", "usage")
    creation = _details(usage, "cache_creation")
    tools = _details(usage, "server_tool_use")
    fields: dict[str, Any] = {
        "input_tokens": uncached + write + read,
        "cached_input_tokens": read,
        "cache_write_tokens": write,
        "cache_write_1h_tokens": _part(
            write, 0, _count(creation, "ephemeral_1h_input_tokens", "usage.cache_creation")
        ),
        "output_tokens": _count(usage, "output_tokens", "usage"),
        "web_search_requests": _count(tools, "web_search_requests", "usage.server_tool_use"),
    }
    tier = service_tier_of(usage.get("service_tier"))
    if tier is not None:
        fields["service_tier"] = tier
    return fields


def from_openai_chat_usage(usage: Mapping[str, Any], ctx: EventContext) -> UsageEvent:
    """A usage event from the ``usage`` of an OpenAI Chat Completions response."""
    return _build(ctx, openai_chat_tokens(usage), "openai")


def from_openai_responses_usage(usage: Mapping[str, Any], ctx: EventContext) -> UsageEvent:
    """A usage event from the ``usage`` of an OpenAI Responses API response."""
    return _build(ctx, openai_responses_tokens(usage), "openai")


def from_anthropic_usage(usage: Mapping[str, Any], ctx: EventContext) -> UsageEvent:
    """A usage event from the ``usage`` of an Anthropic Messages response."""
    return _build(ctx, anthropic_tokens(usage), "anthropic")


def from_cloudevent(
    cloudevent: Mapping[str, Any],
    *,
    org_id: str | None = None,
    gateway: str | None = None,
    requested_model: str | None = None,
) -> UsageEvent:
    """A usage event from an OpenMeter-style CloudEvent.

    ``id`` -> ``event_id``, ``subject`` -> ``user_id``, ``time`` -> ``occurred_at``; ``data``
    carries the token fields and any other event fields (``org_id``, ``requested_model``, ...).
    ``gateway`` defaults to the CloudEvent ``source``. ``gateway`` and ``requested_model``
    fill fields that ``data`` lacks. ``org_id``, when given, is the tenant the caller
    authenticated: ``data`` cannot move the event to another org (a different
    ``data.org_id`` is refused with :class:`InvalidEventError`).
    """
    data = cloudevent.get("data")
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise InvalidEventError(f"cloudevent.data: expected an object, got {data!r}")
    missing = [k for k in ("id", "subject", "time") if not cloudevent.get(k)]
    if missing:
        raise InvalidEventError(f"cloudevent: missing {', '.join(missing)}")
    fields: dict[str, Any] = {
        "org_id": org_id,
        "gateway": gateway or cloudevent.get("source"),
        "requested_model": requested_model,
    }
    fields = {k: v for k, v in fields.items() if v is not None}
    fields.update(data)
    if org_id is not None and fields["org_id"] != org_id:
        raise InvalidEventError(
            f"cloudevent.data.org_id {fields['org_id']!r} differs from the caller's org "
            f"{org_id!r}: an event cannot name another tenant"
        )
    fields["event_id"] = cloudevent["id"]
    fields["user_id"] = cloudevent["subject"]
    fields["occurred_at"] = cloudevent["time"]
    if "requested_model" not in fields and "model" in data:
        fields["requested_model"] = data["model"]
    return event_from_obj(fields)
