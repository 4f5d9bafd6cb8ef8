"""The spendstream plug-in for LiteLLM: meter every call, enforce every cap, in one config line.

A LiteLLM proxy enables it with::

    litellm_settings:
      callbacks: ["producers.litellm.handler"]

``handler`` is a :class:`SpendstreamLogger` configured from the ``SPENDSTREAM_*`` settings
(:func:`spendstream.settings.load_settings`) and the plug-in's own ``SPENDSTREAM_LITELLM_*``
options (:class:`LiteLLMOptions`). It is created on first access, and connects to Kafka only
when the first call is logged or checked. LiteLLM itself is an optional extra
(``pip install 'spendstream[litellm]'``); ``import producers`` never imports it.

**Metering.** After every call (success or failure; a stream once, at its end) LiteLLM hands
the plug-in its standard logging payload, which becomes one usage event (docs/DESIGN.md, "The
event contract"; :func:`usage_event_fields` has the mapping). The event goes to Kafka through
:class:`~producers.UsageProducer` without ever waiting: see :meth:`SpendstreamLogger.stats`
for what is counted and the README's "LiteLLM" section for what happens while Kafka is away.
Nothing the plug-in meets (a refused event, a full queue, Kafka down, a bug) is raised into
LiteLLM.

**Enforcement.** Before each proxied call :meth:`SpendstreamLogger.async_pre_call_hook` asks
:class:`~producers.CapGuard` (docs/DESIGN.md, "Caps, alerts and enforcement"): ``block``
answers HTTP 429 with the reason and ``Retry-After``, ``downgrade`` rewrites the request's
``model``, ``allow`` passes it unchanged.

**Admission** (opt-in, ``SPENDSTREAM_LITELLM_ADMIT=true``). The hook asks an
:class:`~producers.Admitter` instead (docs/DESIGN.md, "Admission (reservations)"): the user's
worker reserves the call's cost before it is made, so a hard cap holds under concurrent
requests. The reservation id travels in the request's metadata to the usage event, which
settles the hold. While the Admitter is not available the guard decides (counted).
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

try:
    import litellm.constants as _litellm_constants
    from litellm.integrations.custom_logger import CustomLogger
except ModuleNotFoundError as _missing:
    if _missing.name is None or _missing.name.split(".")[0] != "litellm":
        raise
    raise ModuleNotFoundError(
        "producers.litellm is the LiteLLM plug-in and needs LiteLLM: "
        "pip install 'spendstream[litellm]'",
        name=_missing.name,
    ) from _missing

from producers._admit import Admitter, Ticket
from producers._guard import CapGuard, Decision
from producers._producer import ProducerStats, UsageProducer, encode_for_send
from schemas import MAX_LATENCY_MS, MAX_TOKENS
from schemas.adapters import openai_chat_tokens, service_tier_of
from spendstream.errors import BackpressureError, ConfigError, InvalidEventError, KafkaError
from spendstream.settings import Settings, load_settings

if TYPE_CHECKING:
    from litellm.caching.dual_cache import DualCache
    from litellm.types.proxy.auth.user_api_key_auth import UserAPIKeyAuth
    from litellm.types.utils import CallTypesLiteral

    handler: SpendstreamLogger

__all__ = [
    "REQUESTED_MODEL_KEY",
    "RESERVATION_ID_KEY",
    "LiteLLMOptions",
    "PluginStats",
    "SpendstreamLogger",
    "input_token_bound",
    "request_view",
    "usage_event_fields",
    "usage_tokens",
]

log = logging.getLogger(__name__)

REQUESTED_MODEL_KEY = "spendstream_requested_model"
"""Request metadata key where the pre-call hook keeps the model asked for before a downgrade."""
RESERVATION_ID_KEY = "spendstream_reservation_id"
"""Request metadata key where the pre-call hook keeps the admission's reservation id."""
# LiteLLM's proxy marks the logging of a request it refused before any provider saw it
# (auth, rate limits, a pre-call hook such as ours): no model was called, nothing to meter.
_REJECTED_BEFORE_ROUTING = "proxy_rejected_before_routing"
# LiteLLM's reads and management of stored objects (a read reports the usage of the call that
# created the object); older LiteLLM releases lack the constant.
_NOT_MODEL_CALLS: frozenset[str] = frozenset(
    getattr(
        _litellm_constants,
        "NON_INFERENCE_CALL_TYPES",
        ("get_responses", "aget_responses", "list_input_items", "alist_input_items"),
    )
)
_SEARCH_CONTEXT_SIZES = frozenset({"low", "medium", "high"})
_MAX_ID_CHARS = 256
_MAX_ATTRIBUTE_CHARS = 256
_SPOOL_SLOTS = 64
_RETRY_AFTER_FAILURE_S = 30.0
_WARN_EVERY = 1000
# Admission: chat completions only (other calls have other limits, or none, on their output).
_ADMITTED_CALL_TYPES = frozenset({"completion", "acompletion"})
_ADMIT_START_WAIT_S = 10.0
_MESSAGE_ALLOWANCE = 8
"""Input tokens allowed per message beyond its text: role and the chat template's markers."""


class LiteLLMOptions(BaseSettings):
    """The plug-in's own options, from ``SPENDSTREAM_LITELLM_*`` variables.

    A field name is looked up in the payload's proxy metadata (``user_api_key_user_id``,
    ``user_api_key_team_id``, ``user_api_key_org_id``, ``user_api_key_end_user_id``,
    ``user_api_key_hash``, ``user_api_key_alias``, ...), then at the payload's top level;
    ``end_user`` is the end user of the call (the request's ``user``); a dotted name such as
    ``metadata.requester_metadata.tenant`` is a path from the payload's top. The first field
    with a value wins.
    """

    model_config = SettingsConfigDict(env_prefix="SPENDSTREAM_LITELLM_", extra="ignore")

    gateway: str = Field(default="litellm", min_length=1, max_length=128)
    """The events' ``gateway``."""
    user_fields: str = "end_user,user_api_key_user_id"
    """Comma-separated fields, in order, whose first value becomes ``user_id``."""
    org_fields: str = "user_api_key_org_id,user_api_key_team_id"
    """Comma-separated fields, in order, whose first value becomes ``org_id``."""
    default_user_id: str | None = None
    """``user_id`` when no user field has a value; unset, such a call's event is refused
    (counted in ``invalid`` and logged)."""
    default_org_id: str | None = "default"
    """``org_id`` when no org field has a value; unset, such a call's event is refused."""
    enforce: bool = True
    """Whether the pre-call hook applies the enforcement state (off: metering only)."""
    guard_wait_s: float = Field(default=5.0, ge=0, le=300)
    """How long the first checked request waits for the enforcement topic to be read to its
    end; later requests never wait."""
    admit: bool = False
    """Reserve each call's cost before it is made, through the user's worker: a hard cap then
    holds under concurrent requests (chat completions; needs ``enforce``)."""
    admit_max_output_tokens: int = Field(default=4096, ge=1)
    """The output limit set on an admitted request that gives neither ``max_tokens`` nor
    ``max_completion_tokens``: the call cannot exceed what was reserved."""
    guard_models: str = ""
    """Comma-separated models (the names requests ask for) never admitted on an estimate: the
    guard decides their requests. List those the proxy's router falls back from (its
    ``fallbacks``, ``context_window_fallbacks`` or ``content_policy_fallbacks``): an estimate
    prices the requested model, and a fallback may cost more."""

    @property
    def user_path(self) -> tuple[str, ...]:
        """``user_fields`` as a tuple."""
        return _split(self.user_fields)

    @property
    def org_path(self) -> tuple[str, ...]:
        """``org_fields`` as a tuple."""
        return _split(self.org_fields)

    @property
    def guard_model_set(self) -> frozenset[str]:
        """``guard_models`` as a set."""
        return frozenset(_split(self.guard_models))


def _split(fields: str) -> tuple[str, ...]:
    return tuple(f.strip() for f in fields.split(",") if f.strip())


@dataclass(frozen=True, slots=True)
class PluginStats:
    """Counters of one :class:`SpendstreamLogger` since it was created."""

    sent: int
    """Events handed to the producer (queued in memory, or spooled on disk)."""
    invalid: int
    """Events the contract refused (logged with the contract's reason); never sent."""
    dropped: int
    """Valid events not handed over: the queue or spool was full, or the producer could not
    be created."""
    skipped: int
    """Logged calls that are not model calls (refused by the proxy before routing, reads of
    stored responses)."""
    blocked: int
    """Requests answered 429 by the pre-call hook."""
    downgraded: int
    """Requests whose model the pre-call hook rewrote."""
    unchecked: int
    """Requests let through unchecked because the guard was not available."""
    unadmitted: int
    """Requests decided by the guard because the Admitter was not available (``admit`` on)."""
    last_error: str | None
    """The last reason an event was refused, dropped or a request went unchecked."""


# -- the mapping: standard logging payload -> event fields --------------------------------------


def _text(value: Any) -> str | None:
    """A non-empty id from a payload value (strings, and integers some proxies use)."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _part(total: int, taken: int, value: int) -> int:
    """``value`` capped to what is left of ``total`` after ``taken``: the contract's token
    classes are disjoint, and providers count some tokens in two details."""
    return max(0, min(value, total - taken))


def _lookup(payload: Mapping[str, Any], name: str) -> str | None:
    """The value of one configured field in a payload (see :class:`LiteLLMOptions`)."""
    if "." in name:
        node: Any = payload
        for part in name.split("."):
            node = _mapping(node).get(part)
        return _text(node)
    if name == "end_user":
        return _text(payload.get("end_user")) or _text(
            _mapping(payload.get("model_parameters")).get("user")
        )
    return _text(_mapping(payload.get("metadata")).get(name)) or _text(payload.get(name))


def _first(payload: Mapping[str, Any], names: tuple[str, ...]) -> str | None:
    for name in names:
        value = _lookup(payload, name)
        if value is not None:
            return value
    return None


def usage_tokens(usage: Mapping[str, Any]) -> dict[str, int]:
    """The contract's token fields from a LiteLLM ``usage`` (OpenAI-shaped, as LiteLLM
    normalises every provider's).

    LiteLLM's ``prompt_tokens`` is the whole input, cache reads and writes included, as
    OpenAI's is (for Anthropic LiteLLM adds ``cache_read_input_tokens`` and
    ``cache_creation_input_tokens`` to Anthropic's ``input_tokens``), so the OpenAI Chat
    Completions adapter reads it; LiteLLM's additions are read here: cache writes
    (``prompt_tokens_details.cache_write_tokens`` / ``cache_creation_tokens``, or
    ``cache_creation_input_tokens``), their one-hour part
    (``cache_creation_token_details.ephemeral_1h_input_tokens``), output images
    (``completion_tokens_details.image_tokens``) and the web searches the provider reported
    (``server_tool_use.web_search_requests``, ``prompt_tokens_details.web_search_requests``,
    ``server_side_tool_usage_details.web_search_calls``). Raises
    :class:`~spendstream.errors.InvalidEventError` for a counter that is not an integer.
    """
    tokens = openai_chat_tokens(usage)
    prompt = _mapping(usage.get("prompt_tokens_details"))
    completion = _mapping(usage.get("completion_tokens_details"))
    inp, cached = tokens["input_tokens"], tokens["cached_input_tokens"]
    out = tokens["output_tokens"]
    raw_write = (
        _int(prompt.get("cache_write_tokens"))
        or _int(prompt.get("cache_creation_tokens"))
        or _int(usage.get("cache_creation_input_tokens"))
    )
    write = _part(inp, cached, raw_write)
    creation = _mapping(prompt.get("cache_creation_token_details"))
    audio_in = _part(inp, cached + write, tokens["input_audio_tokens"])
    image_in = _part(inp, cached + write + audio_in, tokens["input_image_tokens"])
    taken_out = tokens["reasoning_tokens"] + tokens["output_audio_tokens"]
    searches = (
        _int(_mapping(usage.get("server_tool_use")).get("web_search_requests"))
        or _int(prompt.get("web_search_requests"))
        or _int(_mapping(usage.get("server_side_tool_usage_details")).get("web_search_calls"))
    )
    return {
        **tokens,
        "cache_write_tokens": write,
        "cache_write_1h_tokens": _part(write, 0, _int(creation.get("ephemeral_1h_input_tokens"))),
        "input_audio_tokens": audio_in,
        "input_image_tokens": image_in,
        "output_image_tokens": _part(out, taken_out, _int(completion.get("image_tokens"))),
        "web_search_requests": searches,
    }


def _usage_of(slo: Mapping[str, Any]) -> Mapping[str, Any]:
    usage = _mapping(_mapping(slo.get("metadata")).get("usage_object"))
    if usage:
        return usage
    usage = _mapping(_mapping(slo.get("response")).get("usage"))
    if usage:
        return usage
    return {
        "prompt_tokens": slo.get("prompt_tokens") or 0,
        "completion_tokens": slo.get("completion_tokens") or 0,
    }


def _cited_the_web(slo: Mapping[str, Any]) -> bool:
    """Whether a chat answer carries ``url_citation`` annotations: the only sign of a web
    search an OpenAI search model gives, which LiteLLM bills as one search."""
    response = slo.get("response")
    if not isinstance(response, Mapping):
        return False
    for choice in response.get("choices") or ():
        message = _mapping(_mapping(choice).get("message"))
        for note in message.get("annotations") or ():
            if _mapping(note).get("type") == "url_citation":
                return True
    return False


def _service_tier(slo: Mapping[str, Any], usage: Mapping[str, Any]) -> str | None:
    for value in (
        _mapping(slo.get("cost_breakdown")).get("service_tier"),
        usage.get("service_tier"),
        _mapping(slo.get("response")).get("service_tier"),
    ):
        if isinstance(value, str) and value:
            return service_tier_of(value)
    return None


def _event_id(slo: Mapping[str, Any]) -> str | None:
    """``litellm_call_id`` and the attempt's start, in microseconds.

    LiteLLM keeps one ``litellm_call_id`` for every attempt of a request (the router's retries
    and fallbacks, each logged on its own), so the call id alone would make the worker drop a
    fallback's success as a duplicate of the failed first attempt. The attempt's start time
    tells the attempts apart and is the same however often one attempt is logged.
    """
    call_id = _text(slo.get("litellm_call_id")) or _text(slo.get("id"))
    if call_id is None:
        return None
    start = slo.get("startTime")
    if isinstance(start, int | float) and not isinstance(start, bool) and math.isfinite(start):
        call_id = f"{call_id}:{round(start * 1_000_000)}"
    if len(call_id) > _MAX_ID_CHARS:
        call_id = "sha256:" + hashlib.sha256(call_id.encode()).hexdigest()
    return call_id


def _served_model(slo: Mapping[str, Any]) -> str | None:
    # The price-map key LiteLLM priced the call with: for a deployment under another name (an
    # Azure deployment with a base_model) it is the model, where ``model`` is the deployment.
    return (
        _text(_mapping(slo.get("model_map_information")).get("model_map_key"))
        or _text(slo.get("model"))
        or _text(_mapping(slo.get("hidden_params")).get("litellm_model_name"))
    )


def _time(seconds: Any) -> datetime | None:
    if isinstance(seconds, int | float) and not isinstance(seconds, bool):
        try:
            return datetime.fromtimestamp(seconds, UTC)
        except (OverflowError, OSError, ValueError):
            return None
    return None


def usage_event_fields(
    slo: Mapping[str, Any],
    options: LiteLLMOptions | None = None,
    *,
    requested_model: str | None = None,
    reservation_id: str | None = None,
) -> dict[str, Any]:
    """The usage event of one call from LiteLLM's standard logging payload.

    =====================  ==========================================================
    event field            from the payload
    =====================  ==========================================================
    ``event_id``           ``litellm_call_id`` + ``:`` + the attempt's start in µs
    ``request_id``         ``litellm_call_id`` (what the proxy returns as
                           ``x-litellm-call-id``; shared by retries and fallbacks)
    ``occurred_at``        ``endTime``; ``latency_ms``: ``endTime - startTime``
    ``user_id``            ``options.user_fields`` (default: the end user, else
                           ``user_api_key_user_id``), else ``options.default_user_id``
    ``org_id``             ``options.org_fields`` (default: ``user_api_key_org_id``,
                           else ``user_api_key_team_id``), else ``options.default_org_id``
    ``api_key_id``         ``metadata.user_api_key_hash`` (the hashed key)
    ``requested_model``    ``requested_model`` (the model before a downgrade by the
                           pre-call hook), else ``model_group`` (the proxy's model
                           name the client asked for), else ``model``
    ``served_model``       ``model_map_information.model_map_key`` (the price-map key
                           LiteLLM priced it with), else ``model``
    ``provider``           ``custom_llm_provider``
    token fields           ``metadata.usage_object`` (:func:`usage_tokens`)
    ``web_search_*``       the usage's count, else 1 for a chat answer citing the web
                           (LiteLLM's rule); the size from the request's
                           ``web_search_options``
    ``service_tier``       ``cost_breakdown.service_tier``, the usage's or the
                           response's (:func:`schemas.service_tier_of`)
    ``semantic_cache_hit`` ``cache_hit``: LiteLLM answered from its cache, no model call
    ``status``             ``ok`` for ``success``, else ``error``
    ``attributes``         ``team_id``, ``end_user``, ``key_user_id``, ``key_alias``,
                           ``model_group``, ``call_type``, where LiteLLM gives them
    ``reservation_id``     ``reservation_id`` (the admission the pre-call hook got)
    =====================  ==========================================================

    The fields are not validated here: :class:`~producers.UsageProducer` does that, with the
    contract's reason, when they are sent.
    """
    opts = options if options is not None else LiteLLMOptions()
    meta = _mapping(slo.get("metadata"))
    usage = _usage_of(slo)
    tokens = usage_tokens(usage)
    if not tokens["web_search_requests"] and _cited_the_web(slo):
        tokens["web_search_requests"] = 1
    searches = tokens["web_search_requests"]
    served = _served_model(slo)
    requested = requested_model or _text(slo.get("model_group")) or _text(slo.get("model"))
    start, end = _time(slo.get("startTime")), _time(slo.get("endTime"))
    fields: dict[str, Any] = {
        "event_id": _event_id(slo),
        "occurred_at": (end or start or datetime.now(UTC)).isoformat(),
        "org_id": _first(slo, opts.org_path) or opts.default_org_id or None,
        "user_id": _first(slo, opts.user_path) or opts.default_user_id or None,
        "api_key_id": _text(meta.get("user_api_key_hash")),
        "gateway": opts.gateway,
        "request_id": _text(slo.get("litellm_call_id")),
        "reservation_id": reservation_id or None,
        "provider": _text(slo.get("custom_llm_provider")),
        "requested_model": requested or served,
        "served_model": served,
        **{k: v for k, v in tokens.items() if v},
        "semantic_cache_hit": slo.get("cache_hit") is True,
        "status": "ok" if slo.get("status") == "success" else "error",
    }
    tier = _service_tier(slo, usage)
    if tier is not None:
        fields["service_tier"] = tier
    if searches:
        options_ = _mapping(
            _mapping(slo.get("standard_built_in_tools_params")).get("web_search_options")
        )
        size = options_.get("search_context_size")
        if size in _SEARCH_CONTEXT_SIZES:
            fields["search_context_size"] = size
    if start is not None and end is not None:
        elapsed = round((end - start).total_seconds() * 1000)
        fields["latency_ms"] = min(max(elapsed, 0), MAX_LATENCY_MS)
    attributes = {
        "team_id": _text(meta.get("user_api_key_team_id")),
        "end_user": _lookup(slo, "end_user"),
        "key_user_id": _text(meta.get("user_api_key_user_id")),
        "key_alias": _text(meta.get("user_api_key_alias")),
        "model_group": _text(slo.get("model_group")),
        "call_type": _text(slo.get("call_type")),
    }
    kept = {k: v[:_MAX_ATTRIBUTE_CHARS] for k, v in attributes.items() if v}
    if kept:
        fields["attributes"] = kept
    return {k: v for k, v in fields.items() if v is not None}


def _request_metadata(litellm_params: Mapping[str, Any]) -> Mapping[str, Any]:
    return {
        **_mapping(litellm_params.get("metadata")),
        **_mapping(litellm_params.get("litellm_metadata")),
    }


def _is_model_call(kwargs: Mapping[str, Any], slo: Mapping[str, Any]) -> bool:
    if _mapping(kwargs.get("litellm_params")).get(_REJECTED_BEFORE_ROUTING):
        return False
    return slo.get("call_type") not in _NOT_MODEL_CALLS


# -- the pre-call view: the same fields, from the request the proxy is about to route ---------

# UserAPIKeyAuth attributes under the names the proxy logs them with.
_AUTH_FIELDS = (
    ("user_api_key_user_id", "user_id"),
    ("user_api_key_team_id", "team_id"),
    ("user_api_key_org_id", "org_id"),
    ("user_api_key_end_user_id", "end_user_id"),
    ("user_api_key_alias", "key_alias"),
    ("user_api_key_user_email", "user_email"),
    ("user_api_key_team_alias", "team_alias"),
    ("user_api_key_org_alias", "organization_alias"),
    ("user_api_key_project_id", "project_id"),
)


def request_view(auth: Any, data: Mapping[str, Any]) -> dict[str, Any]:
    """What the logging payload of this request will say about its caller, from the pre-call
    hook's arguments: the key's auth (``UserAPIKeyAuth``) and the request, with the metadata
    the proxy attached to it. The fields of :class:`LiteLLMOptions` resolve on it as on the
    payload, so the guard checks the user the event will be metered under.
    """
    meta: dict[str, Any] = {**_request_metadata(data)}
    for logged, attr in _AUTH_FIELDS:
        value = getattr(auth, attr, None)
        if value is not None:
            meta[logged] = value
    key = getattr(auth, "api_key", None)
    if getattr(auth, "is_session_token", False) and getattr(auth, "key_alias", None):
        key = auth.key_alias  # what the proxy logs for a UI session
    if key is not None:
        meta["user_api_key_hash"] = key
    end_user = _text(getattr(auth, "end_user_id", None)) or _text(data.get("user"))
    return {"end_user": end_user, "metadata": meta, "model_parameters": {"user": data.get("user")}}


# -- admission: token maxima the call cannot exceed --------------------------------------------


def _utf8(value: Any) -> int:
    return len(value.encode("utf-8", "surrogatepass")) if isinstance(value, str) else 0


def _content_bytes(content: Any) -> int:
    """UTF-8 bytes of a message's text: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return _utf8(content)
    if not isinstance(content, list):
        return 0
    return sum(
        _utf8(part) if isinstance(part, str) else _utf8(_mapping(part).get("text"))
        for part in content
    )


def input_token_bound(data: Mapping[str, Any]) -> int:
    """An upper bound of a chat request's input tokens, without a tokenizer.

    Every tokenizer in use (byte-level BPE, SentencePiece with byte fall-back) makes a token of
    at least one UTF-8 byte, so a text's byte length bounds its tokens. Counted: each message's
    text (a string content, the text parts of a list content, its ``name``, the names and
    arguments of its ``tool_calls`` and ``function_call``) plus ``_MESSAGE_ALLOWANCE`` (8) per
    message for its role and the chat template's markers, and the JSON of the request's
    ``tools``, ``functions`` and ``response_format``, which providers put into the prompt too.
    Not bounded: images, audio and files in list contents (their tokens do not follow from
    bytes): :func:`unbounded_cost` keeps such requests from being admitted on this bound.
    """
    total = 0
    messages = data.get("messages")
    for message in messages if isinstance(messages, list) else ():
        message = _mapping(message)
        total += _MESSAGE_ALLOWANCE + _content_bytes(message.get("content"))
        total += _utf8(message.get("name"))
        calls = message.get("tool_calls")
        functions = [_mapping(c).get("function") for c in (calls or ()) if isinstance(c, Mapping)]
        for function in [*functions, message.get("function_call")]:
            function = _mapping(function)
            total += _utf8(function.get("name")) + _utf8(function.get("arguments"))
    for key in ("tools", "functions", "response_format"):
        if data.get(key):
            total += len(orjson.dumps(data[key], default=str))
    return total


_TEXT_PARTS = frozenset({"text"})
"""Content part types whose tokens :func:`input_token_bound` bounds by their bytes."""


def unbounded_cost(data: Mapping[str, Any], guard_models: Collection[str] = ()) -> str | None:
    """Why an admission estimate would not bound the chat request ``data``'s cost (``None``:
    it does).

    An admission holds the call's token maxima on the requested model, priced at the standard
    tier, with text rates, no cache and no search. A request that can cost more than that is
    not admitted on such an estimate; the guard decides it instead: one with image, audio or
    file input (content parts other than text), audio output (``modalities`` other than text,
    or ``audio``), web search (``web_search_options``, or a tool whose type starts with
    ``web_search``), the ``priority`` tier, or fallbacks of its own (``fallbacks``,
    ``context_window_fallback_dict``: LiteLLM may serve the call on another model, which the
    estimate did not price). So is a request for a model in ``guard_models``: the proxy
    configuration's fallbacks are not in the request, and the operator lists the models that
    have some (``LiteLLMOptions.guard_models``).
    """
    messages = data.get("messages")
    for message in messages if isinstance(messages, list) else ():
        content = _mapping(message).get("content")
        if isinstance(content, list):
            for part in content:
                kind = _mapping(part).get("type", "text") if not isinstance(part, str) else "text"
                if kind not in _TEXT_PARTS:
                    return f"a {kind!s:.40} content part is priced by more than its bytes"
    modalities = data.get("modalities")
    if data.get("audio") or (isinstance(modalities, list) and any(m != "text" for m in modalities)):
        return "audio output is priced at audio rates"
    tools = data.get("tools")
    # An empty ``web_search_options`` ({}) turns search on too.
    if data.get("web_search_options") is not None or any(
        str(_mapping(tool).get("type", "")).startswith("web_search")
        for tool in (tools if isinstance(tools, list) else ())
    ):
        return "web search is priced per search"
    if data.get("service_tier") == "priority":
        return "the priority tier costs more than the standard estimate"
    # An empty list or mapping names no other model: only a non-empty one can move the call.
    if data.get("fallbacks") or data.get("context_window_fallback_dict"):
        return "its fallbacks may serve a model the estimate did not price"
    model = data.get("model")
    if isinstance(model, str) and model in guard_models:
        return "the proxy falls back from this model (guard_models)"
    return None


def _positive(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


# -- the handler ------------------------------------------------------------------------------


class SpendstreamLogger(CustomLogger):
    """LiteLLM callback: one usage event per call, cap enforcement before each proxied call.

    ``settings`` default to :func:`~spendstream.settings.load_settings` (``SPENDSTREAM_*``),
    ``options`` to :class:`LiteLLMOptions` (``SPENDSTREAM_LITELLM_*``). The producer (with
    ``producer_config``: librdkafka properties over the defaults and the settings) and the
    guard are created on first use. ``guard``: a started :class:`~producers.CapGuard` to use
    instead, which the gateway shares with other code and closes itself. ``admitter``: an
    :class:`~producers.Admitter` to use when ``options.admit`` is on (started on first use if
    it is not; closed by the gateway), else one is created on first use. ``clock`` (epoch
    seconds) is for tests.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        options: LiteLLMOptions | None = None,
        *,
        producer_config: Mapping[str, Any] | None = None,
        guard: CapGuard | None = None,
        admitter: Admitter | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.settings = settings if settings is not None else load_settings()
        self.options = options if options is not None else LiteLLMOptions()
        self._guard_models = self.options.guard_model_set
        self._producer_config = dict(producer_config) if producer_config is not None else None
        self._clock = clock
        self._lock = threading.Lock()
        self._producer: UsageProducer | None = None
        self._producer_failed_at: float | None = None
        self._own_guard = guard is None
        self._guard: CapGuard | None = guard
        self._guard_started_at = 0.0
        self._guard_failed_at: float | None = None
        self._guard_ready = guard is not None
        self._own_admitter = admitter is None
        self._admitter: Admitter | None = admitter
        self._admitter_started = False
        self._admitter_failed_at: float | None = None
        self._admit_lock = threading.Lock()  # held while starting: not the counters' lock
        self._closed = False
        self._counts = dict.fromkeys(
            (
                "sent",
                "invalid",
                "dropped",
                "skipped",
                "blocked",
                "downgraded",
                "unchecked",
                "unadmitted",
            ),
            0,
        )
        self._last_error: str | None = None

    # -- counters ---------------------------------------------------------------------------

    def stats(self) -> PluginStats:
        """A snapshot of the counters (delivery itself is counted by :meth:`producer_stats`)."""
        with self._lock:
            return PluginStats(**self._counts, last_error=self._last_error)

    def producer_stats(self) -> ProducerStats | None:
        """The producer's :class:`~producers.ProducerStats` (``None`` before the first event)."""
        producer = self._producer
        return None if producer is None else producer.stats()

    def _count(self, name: str, error: str | None = None) -> int:
        with self._lock:
            self._counts[name] += 1
            if error is not None:
                self._last_error = error
            return self._counts[name]

    # -- LiteLLM's logging hooks ------------------------------------------------------------

    def log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        """A call (or a whole stream) succeeded: send its usage event."""
        self.record(kwargs)

    def log_failure_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        """A call failed: send its usage event, with ``status`` ``error``."""
        self.record(kwargs)

    async def async_log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        """As :meth:`log_success_event`, off the event loop's way (see :meth:`_ready`)."""
        await self._ready()
        self.record(kwargs)

    async def async_log_failure_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        """As :meth:`log_failure_event`, off the event loop's way (see :meth:`_ready`)."""
        await self._ready()
        self.record(kwargs)

    async def _ready(self) -> None:
        # Opening a spool reads back what it holds: done in a thread, so the first logged
        # call waits for it, not every request the loop is serving.
        if self._producer is None and not self._closed:
            await asyncio.to_thread(self._producer_or_none)

    def record(self, kwargs: Mapping[str, Any]) -> None:
        """Send the usage event of the call LiteLLM logged with ``kwargs``. Never raises."""
        try:
            slo = kwargs.get("standard_logging_object")
            if not isinstance(slo, Mapping):
                self._refused("LiteLLM gave no standard_logging_object for the call")
                return
            if not _is_model_call(kwargs, slo):
                self._count("skipped")
                return
            request_meta = _request_metadata(_mapping(kwargs.get("litellm_params")))
            fields = usage_event_fields(
                slo,
                self.options,
                requested_model=_text(request_meta.get(REQUESTED_MODEL_KEY)),
                reservation_id=_text(request_meta.get(RESERVATION_ID_KEY)),
            )
            if "requested_model" not in fields:
                self._count("skipped")  # no model named: a file or batch operation
                return
            self._send(fields)
        except InvalidEventError as exc:
            self._refused(str(exc))
        except Exception as exc:  # a bug here must not fail the call LiteLLM is logging
            n = self._count("dropped", f"{type(exc).__name__}: {exc}")
            if n == 1 or n % _WARN_EVERY == 0:
                log.exception("spendstream: usage event not sent (%d dropped so far)", n)

    def _refused(self, reason: str) -> None:
        n = self._count("invalid", reason)
        if n == 1 or n % _WARN_EVERY == 0:
            log.warning("spendstream: usage event refused (%d so far): %s", n, reason)
        else:
            log.debug("spendstream: usage event refused: %s", reason)

    def _send(self, fields: dict[str, Any]) -> None:
        key, value = encode_for_send(fields)  # InvalidEventError: the contract's reason
        producer = self._producer_or_none()
        if producer is None:
            self._dropped("the producer is not available")
            return
        try:
            if producer.spool is not None:
                # queue_full_timeout_s=0: a full spool raises at once, whatever its policy.
                producer.send_raw(key, value)
            elif not producer._try_produce(key, value, None):
                # UsageProducer.send would poll for room on LiteLLM's event loop.
                raise BackpressureError(
                    f"the local producer queue for {producer.topic} is full", retry_after=1.0
                )
        except (BackpressureError, KafkaError) as exc:
            self._dropped(str(exc))
            return
        self._count("sent")

    def _dropped(self, reason: str) -> None:
        n = self._count("dropped", reason)
        if n == 1 or n % _WARN_EVERY == 0:
            log.warning("spendstream: usage event dropped (%d so far): %s", n, reason)

    # -- the producer -----------------------------------------------------------------------

    def _producer_or_none(self) -> UsageProducer | None:
        producer = self._producer
        if producer is not None:
            return producer
        with self._lock:
            if self._producer is not None or self._closed:
                return self._producer
            failed = self._producer_failed_at
            if failed is not None and time.monotonic() - failed < _RETRY_AFTER_FAILURE_S:
                return None
            try:
                self._producer = self._open_producer()
            except Exception as exc:
                self._producer_failed_at = time.monotonic()
                self._last_error = f"cannot create the producer: {exc}"
                log.error(
                    "spendstream: cannot create the usage producer (retried in %.0f s): %s",
                    _RETRY_AFTER_FAILURE_S,
                    exc,
                )
                return None
            atexit.register(self._close_at_exit)
            return self._producer

    def _open_producer(self) -> UsageProducer:
        settings, config = self.settings, self._producer_config
        if not settings.producer.spool_enabled:
            return UsageProducer(settings, config=config, queue_full_timeout_s=0.0, spool=False)
        # A proxy runs several worker processes and a spool folder serves one process: each
        # takes the first free slot, so after a restart whichever process takes a slot sends
        # what was left in it.
        base = settings.producer.spool_dir or settings.state_dir / "spool"
        last: ConfigError | None = None
        for slot in range(_SPOOL_SLOTS):
            try:
                return UsageProducer(
                    settings,
                    config=config,
                    queue_full_timeout_s=0.0,
                    spool=Path(base) / f"litellm-{slot}",
                )
            except ConfigError as exc:
                last = exc
        raise ConfigError(f"all {_SPOOL_SLOTS} spool slots under {base} are in use: {last}")

    def flush(self, timeout_s: float = 30.0) -> int:
        """Wait until every event sent so far is delivered (or spooled ones acknowledged);
        return how many remain."""
        producer = self._producer
        return 0 if producer is None else producer.flush(timeout_s)

    def close(self, timeout_s: float = 30.0) -> None:
        """Flush and close the producer, stop the guard and the Admitter. Later events are
        dropped (counted)."""
        with self._lock:
            self._closed = True
            producer, self._producer = self._producer, None
            guard, self._guard = self._guard, None
            admitter, self._admitter = self._admitter, None
            self._admitter_started = False
        if guard is not None and self._own_guard:
            guard.close()
        if admitter is not None and self._own_admitter:
            admitter.close()
        if producer is not None:
            producer.close(timeout_s)

    def _close_at_exit(self) -> None:
        try:
            self.close(timeout_s=10.0)
        except Exception as exc:
            log.error("spendstream: closing the usage producer at exit: %s", exc)

    # -- enforcement ------------------------------------------------------------------------

    async def async_pre_call_hook(
        self,
        user_api_key_dict: UserAPIKeyAuth,
        cache: DualCache,
        data: dict[str, Any],
        call_type: CallTypesLiteral,
    ) -> dict[str, Any] | None:
        """Apply the user's enforcement state to a request the proxy is about to route.

        ``block`` raises ``fastapi.HTTPException`` 429 (the proxy answers it as is, with
        ``Retry-After`` until the deciding window's ``until``); ``downgrade`` sets
        ``data["model"]`` to the plan's model and keeps the one asked for in the request's
        metadata, so the event reports both; ``allow`` returns ``None`` (unchanged). A request
        without a model, or whose user cannot be told, passes. While the guard is not
        available the request passes too (counted in ``unchecked``): the gateway stays up
        when Kafka is not.

        With ``options.admit`` a chat completion is decided by :meth:`admit` instead (the same
        refusal and downgrade, and the reservation id in the request's metadata); while the
        Admitter is not available the guard decides (counted in ``unadmitted``).
        """
        if not self.options.enforce or not isinstance(data.get("model"), str):
            return None
        view = request_view(user_api_key_dict, data)
        user = _first(view, self.options.user_path) or self.options.default_user_id
        if not user:
            return None
        if self.options.admit and call_type in _ADMITTED_CALL_TYPES:
            org = _first(view, self.options.org_path) or self.options.default_org_id
            ticket = await self.admit(user, org, data) if org else None
            if ticket is not None:
                return self._apply_ticket(ticket, data)
        decision = await self.decide(user)
        if decision is None:
            return None
        if decision.action == "block":
            self._count("blocked")
            raise self._blocked_response(decision)
        if decision.action == "downgrade" and decision.model and decision.model != data["model"]:
            self._downgrade(data, decision.model)
            return data
        return None

    def _downgrade(self, data: dict[str, Any], model: str) -> None:
        self._count("downgraded")
        _writable_metadata(data).setdefault(REQUESTED_MODEL_KEY, data["model"])
        data["model"] = model

    # -- admission --------------------------------------------------------------------------

    async def admit(self, user_id: str, org_id: str, data: dict[str, Any]) -> Ticket | None:
        """Reserve the cost of the chat request ``data`` for the user; ``None`` (counted in
        ``unadmitted``) if the Admitter is not available or fails.

        The maxima reserved are ones the call cannot exceed: :func:`input_token_bound` for the
        input, and for the output ``max_completion_tokens`` or ``max_tokens`` (the larger if
        both), times ``n`` choices. A request that gives neither limit gets ``max_tokens`` =
        ``options.admit_max_output_tokens`` once admitted. A request whose cost such maxima
        do not bound (:func:`unbounded_cost`: image, audio or file input, audio output, web
        search, the priority tier, fallbacks in the request, a model in
        ``options.guard_models``) is not admitted. The first request waits up to
        10 s for the Admitter to connect; one that gets no answer waits up to
        ``admission.deadline_s`` before the guard decides it.
        """
        unbounded = unbounded_cost(data, self._guard_models)
        if unbounded is not None:
            self._unadmitted(f"not bounded by an estimate: {unbounded}")
            return None
        admitter = (
            self._admitter
            if self._admitter_started
            else await asyncio.to_thread(self._started_admitter)
        )
        if admitter is None:
            self._unadmitted("the Admitter is not available")
            return None
        limits = [_positive(data.get(k)) for k in ("max_completion_tokens", "max_tokens")]
        output = max((v for v in limits if v is not None), default=None)
        inp = input_token_bound(data)
        out = (output or self.options.admit_max_output_tokens) * (_positive(data.get("n")) or 1)
        if max(inp, out) > MAX_TOKENS:
            # The worker would refuse such a request (a dead letter, no answer): say it here.
            self._unadmitted(f"token bound over the contract's {MAX_TOKENS:,}")
            return None
        try:
            ticket = await admitter.aadmit(
                user_id, org_id, data["model"], input_tokens=inp, output_tokens=out
            )
        except Exception as exc:  # AdmissionTimeout, KafkaError, or a bug: the guard decides
            if isinstance(exc, KafkaError):
                self._admitter_broke(admitter)
            self._unadmitted(f"admission failed: {type(exc).__name__}: {exc}")
            return None
        if ticket.allowed and output is None:
            data["max_tokens"] = self.options.admit_max_output_tokens
        return ticket

    def _apply_ticket(self, ticket: Ticket, data: dict[str, Any]) -> dict[str, Any]:
        if ticket.action == "block":
            self._count("blocked")
            until = None if ticket.retry_after is None else float(ticket.retry_after)
            raise self._refusal(ticket.reason, ticket.window, until, _iso(until))
        _writable_metadata(data)[RESERVATION_ID_KEY] = ticket.reservation_id
        if ticket.action == "downgrade" and ticket.model and ticket.model != data["model"]:
            self._downgrade(data, ticket.model)
        return data

    def _unadmitted(self, reason: str) -> None:
        n = self._count("unadmitted", reason)
        if n == 1 or n % _WARN_EVERY == 0:
            log.warning("spendstream: the guard decided %d requests so far: %s", n, reason)

    def _started_admitter(self) -> Admitter | None:
        """The Admitter, started (blocking: called in a thread); ``None`` while it cannot be."""
        with self._admit_lock:
            if self._closed:
                return None
            if self._admitter_started:
                return self._admitter
            failed = self._admitter_failed_at
            if failed is not None and time.monotonic() - failed < _RETRY_AFTER_FAILURE_S:
                return None
            admitter = self._admitter or Admitter(self.settings)
            try:
                admitter.start(wait_s=_ADMIT_START_WAIT_S)
            except Exception as exc:
                self._admitter_failed_at = time.monotonic()
                log.error(
                    "spendstream: cannot start the Admitter (retried in %.0f s): %s",
                    _RETRY_AFTER_FAILURE_S,
                    exc,
                )
                return None
            with self._lock:
                if self._closed:
                    if self._own_admitter:
                        admitter.close()
                    return None
                self._admitter, self._admitter_started = admitter, True
            return admitter

    def _admitter_broke(self, admitter: Admitter) -> None:
        """The Admitter's reader stopped (or it was never started): start again later."""
        with self._lock:
            if self._admitter is not admitter or not self._admitter_started:
                return
            self._admitter_started = False
            self._admitter_failed_at = time.monotonic()
            if self._own_admitter:
                self._admitter = None
                threading.Thread(target=admitter.close, daemon=True).start()

    async def decide(self, user_id: str) -> Decision | None:
        """The guard's decision for ``user_id`` (``None`` if the guard is not available)."""
        guard = self._guard_or_none()
        if guard is None:
            self._count("unchecked", "the enforcement guard is not available")
            return None
        if not self._guard_ready:
            remaining = self._guard_started_at + self.options.guard_wait_s - time.monotonic()
            caught_up = guard.wait_caught_up(0) or (
                remaining > 0 and await asyncio.to_thread(guard.wait_caught_up, remaining)
            )
            if caught_up or remaining <= 0:
                if not caught_up:
                    log.warning(
                        "spendstream: the enforcement topic %s was not read to its end within "
                        "%.1f s; deciding on what has been read so far",
                        guard.topic,
                        self.options.guard_wait_s,
                    )
                self._guard_ready = True
        return guard.check(user_id)

    def _guard_or_none(self) -> CapGuard | None:
        guard = self._guard
        if guard is not None and (not self._own_guard or not self._guard_stuck()):
            return guard
        with self._lock:
            if self._closed:
                return None
            if self._guard is not None and self._guard_stuck():
                # The guard's reader gives up when it cannot reach the broker at start.
                log.warning("spendstream: the enforcement guard never reached Kafka; restarting it")
                threading.Thread(target=self._guard.close, daemon=True).start()
                self._guard = None
            if self._guard is not None:
                return self._guard
            failed = self._guard_failed_at
            if failed is not None and time.monotonic() - failed < _RETRY_AFTER_FAILURE_S:
                return None
            try:
                guard = CapGuard(self.settings, clock=self._clock)
                guard.start(wait_s=None)
            except Exception as exc:
                self._guard_failed_at = time.monotonic()
                log.error("spendstream: cannot start the enforcement guard: %s", exc)
                return None
            self._guard, self._guard_started_at, self._guard_ready = guard, time.monotonic(), False
            return guard

    def _guard_stuck(self) -> bool:
        guard = self._guard
        return (
            guard is not None
            and guard.staleness_s() is None
            and time.monotonic() - self._guard_started_at > _RETRY_AFTER_FAILURE_S
        )

    def _blocked_response(self, decision: Decision) -> Exception:
        until = decision.record.get("until") if decision.record else None
        return self._refusal(decision.reason, decision.window, decision.until, until)

    def _refusal(
        self, reason: str, window: str | None, until_s: float | None, until: Any
    ) -> Exception:
        """The 429 of a block: ``until_s`` (epoch seconds) gives ``Retry-After``, ``until`` (the
        window's end as published) the text."""
        from fastapi import HTTPException

        where = f" in {window}" if window else ""
        headers: dict[str, str] = {}
        if until_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(until_s - self._clock())))
        return HTTPException(
            status_code=429,
            detail={
                "error": f"usage cap reached{where} ({reason})"
                + (f"; resets at {until}" if until else ""),
                "type": "usage_cap_reached",
                "reason": reason,
                "window": window,
                "until": until,
            },
            headers=headers or None,
        )


def _writable_metadata(data: dict[str, Any]) -> dict[str, Any]:
    """The request's metadata dict that LiteLLM hands to the logging callbacks as
    ``litellm_params`` (``litellm_metadata`` on the routes that use it), created if missing."""
    key = "litellm_metadata" if isinstance(data.get("litellm_metadata"), dict) else "metadata"
    meta = data.get(key)
    if not isinstance(meta, dict):
        meta = data[key] = {}
    return meta


def _iso(epoch_s: float | None) -> str | None:
    if epoch_s is None:
        return None
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_handler: SpendstreamLogger | None = None
_handler_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    """``handler``, created on first access (LiteLLM's proxy reads it when it loads its
    config), so that importing this module reads no settings and connects nowhere."""
    global _handler
    if name != "handler":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _handler_lock:
        if _handler is None:
            _handler = SpendstreamLogger()
        return _handler
