"""Adapters from provider payloads, on payloads shaped as the providers document them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from schemas import (
    EventContext,
    encode_event,
    from_anthropic_usage,
    from_cloudevent,
    from_openai_chat_usage,
    from_openai_responses_usage,
)
from spendstream.errors import InvalidEventError

pytestmark = pytest.mark.unit

CTX = EventContext(
    event_id="evt-42",
    occurred_at=datetime(2025, 6, 2, 10, 0, tzinfo=UTC),
    org_id="org-1",
    user_id="user-1",
    gateway="gw-eu-1",
    requested_model="gpt-4o",
    served_model="gpt-4o-2024-08-06",
    request_id="req-1",
    latency_ms=1234,
)

OPENAI_CHAT_RESPONSE = orjson.loads(b"""
{
  "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
  "object": "chat.completion",
  "created": 1741570283,
  "model": "gpt-4o-2024-08-06",
  "choices": [
    {"index": 0,
     "message": {"role": "assistant", "content": "Hello!", "refusal": null, "annotations": []},
     "logprobs": null, "finish_reason": "stop"}
  ],
  "usage": {
    "prompt_tokens": 1117,
    "completion_tokens": 46,
    "total_tokens": 1163,
    "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
    "completion_tokens_details": {
      "reasoning_tokens": 0, "audio_tokens": 0,
      "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0
    }
  },
  "service_tier": "default",
  "system_fingerprint": "fp_fc9f1d7035"
}
""")

OPENAI_O_SERIES_USAGE = {
    "prompt_tokens": 75,
    "completion_tokens": 1186,
    "total_tokens": 1261,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 1024,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}

OPENAI_RESPONSES_RESPONSE = orjson.loads(b"""
{
  "id": "resp_67ccd3a9da748190baa7f1570fe91ac604becb25c45a8e3a",
  "object": "response",
  "created_at": 1741476777,
  "status": "completed",
  "model": "o3-mini-2025-01-31",
  "output": [],
  "usage": {
    "input_tokens": 328,
    "input_tokens_details": {"cached_tokens": 128},
    "output_tokens": 1052,
    "output_tokens_details": {"reasoning_tokens": 896},
    "total_tokens": 1380
  }
}
""")

ANTHROPIC_MESSAGE = orjson.loads(b"""
{
  "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
  "type": "message",
  "role": "assistant",
  "model": "claude-sonnet-4-5-20250929",
  "content": [{"type": "text", "text": "Hi! My name is Claude."}],
  "stop_reason": "end_turn",
  "stop_sequence": null,
  "usage": {
    "input_tokens": 21,
    "cache_creation_input_tokens": 188086,
    "cache_read_input_tokens": 2048,
    "output_tokens": 393,
    "service_tier": "standard",
    "cache_creation": {"ephemeral_5m_input_tokens": 188086, "ephemeral_1h_input_tokens": 0}
  }
}
""")

OPENMETER_CLOUDEVENT = orjson.loads(b"""
{
  "specversion": "1.0",
  "type": "prompt",
  "id": "00001",
  "time": "2025-06-02T10:00:00.001+02:00",
  "source": "chat-service",
  "subject": "customer-1",
  "data": {
    "org_id": "org-9",
    "model": "gpt-4o",
    "input_tokens": 500,
    "cached_input_tokens": 100,
    "output_tokens": 20
  }
}
""")


def _tokens(event: Any) -> tuple[int, int, int, int, int]:
    return (
        event.input_tokens,
        event.cached_input_tokens,
        event.cache_write_tokens,
        event.output_tokens,
        event.reasoning_tokens,
    )


def test_openai_chat_completions() -> None:
    event = from_openai_chat_usage(OPENAI_CHAT_RESPONSE["usage"], CTX)
    assert _tokens(event) == (1117, 1024, 0, 46, 0)
    assert event.provider == "openai"
    assert event.event_id == "evt-42"
    assert event.served_model == "gpt-4o-2024-08-06"
    assert event.latency_ms == 1234


def test_openai_chat_reasoning_tokens() -> None:
    event = from_openai_chat_usage(OPENAI_O_SERIES_USAGE, CTX)
    assert _tokens(event) == (75, 0, 0, 1186, 1024)


def test_openai_chat_without_details() -> None:
    # Older models and some compatible servers send only the three totals.
    usage = {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}
    assert _tokens(from_openai_chat_usage(usage, CTX)) == (9, 0, 0, 12, 0)


def test_openai_chat_null_details() -> None:
    usage = {"prompt_tokens": 9, "completion_tokens": 12, "prompt_tokens_details": None}
    assert _tokens(from_openai_chat_usage(usage, CTX)) == (9, 0, 0, 12, 0)


def test_openai_responses_api() -> None:
    event = from_openai_responses_usage(OPENAI_RESPONSES_RESPONSE["usage"], CTX)
    assert _tokens(event) == (328, 128, 0, 1052, 896)
    assert event.provider == "openai"


def test_anthropic_input_is_the_sum_of_its_cache_classes() -> None:
    event = from_anthropic_usage(ANTHROPIC_MESSAGE["usage"], CTX)
    assert _tokens(event) == (21 + 188086 + 2048, 2048, 188086, 393, 0)
    assert event.provider == "anthropic"


def test_anthropic_without_cache_fields() -> None:
    usage = {"input_tokens": 2095, "output_tokens": 503}
    assert _tokens(from_anthropic_usage(usage, CTX)) == (2095, 0, 0, 503, 0)


def test_context_provider_wins_over_adapter_default() -> None:
    ctx = EventContext(**{**_ctx_fields(), "provider": "bedrock"})
    assert from_anthropic_usage({"input_tokens": 1, "output_tokens": 1}, ctx).provider == (
        "bedrock"
    )


def test_the_context_carries_the_admission_reservation() -> None:
    ctx = EventContext(**{**_ctx_fields(), "reservation_id": "res-7"})
    event = from_anthropic_usage({"input_tokens": 1, "output_tokens": 1}, ctx)
    assert event.reservation_id == "res-7"
    assert from_anthropic_usage({"input_tokens": 1}, CTX).reservation_id is None


def _ctx_fields() -> dict[str, Any]:
    return {
        "event_id": "e",
        "occurred_at": "2025-06-02T10:00:00Z",
        "org_id": "o",
        "user_id": "u",
        "gateway": "g",
        "requested_model": "claude-sonnet-4-5",
    }


def test_cloudevent() -> None:
    event = from_cloudevent(OPENMETER_CLOUDEVENT)
    assert event.event_id == "00001"
    assert event.user_id == "customer-1"
    assert event.occurred_at == datetime(2025, 6, 2, 8, 0, 0, 1000, tzinfo=UTC)
    assert event.gateway == "chat-service"
    assert event.org_id == "org-9"
    assert event.requested_model == "gpt-4o"
    assert _tokens(event) == (500, 100, 0, 20, 0)


def test_cloudevent_keyword_defaults() -> None:
    ce = {k: v for k, v in OPENMETER_CLOUDEVENT.items() if k != "data"}
    ce["data"] = {"input_tokens": 5}
    event = from_cloudevent(ce, org_id="org-x", requested_model="gpt-4o-mini", gateway="gw")
    assert (event.org_id, event.requested_model, event.gateway) == ("org-x", "gpt-4o-mini", "gw")


def test_cloudevent_data_cannot_name_another_tenant() -> None:
    # The caller's org is the tenant it authenticated; data written by its client may not
    # move the event (and its cost) to another org.
    with pytest.raises(InvalidEventError, match="another tenant"):
        from_cloudevent(OPENMETER_CLOUDEVENT, org_id="org-x")
    same = from_cloudevent(OPENMETER_CLOUDEVENT, org_id="org-9")
    assert same.org_id == "org-9"


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda: from_openai_chat_usage({"prompt_tokens": "12"}, CTX), "prompt_tokens"),
        (lambda: from_openai_chat_usage({"prompt_tokens": -1}, CTX), "input_tokens"),
        (
            lambda: from_openai_chat_usage(
                {"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 11}}, CTX
            ),
            "cached_input_tokens",
        ),
        (lambda: from_anthropic_usage({"input_tokens": True}, CTX), "input_tokens"),
        (
            lambda: from_openai_responses_usage(
                {"output_tokens": 1, "output_tokens_details": {"reasoning_tokens": 2}}, CTX
            ),
            "reasoning_tokens",
        ),
        (
            lambda: from_openai_chat_usage(
                {}, EventContext(**{**_ctx_fields(), "occurred_at": "2025-06-02T10:00:00"})
            ),
            "occurred_at",
        ),
        (
            lambda: from_anthropic_usage(
                {"input_tokens": 10**8, "cache_read_input_tokens": 1}, CTX
            ),
            "input_tokens",
        ),
        (
            lambda: from_openai_chat_usage(
                {}, EventContext(**{**_ctx_fields(), "occurred_at": "1999-12-31T23:59:59Z"})
            ),
            "occurred_at",
        ),
        (
            lambda: from_openai_chat_usage(
                {}, EventContext(**{**_ctx_fields(), "latency_ms": 7 * 86_400_000 + 1})
            ),
            "latency_ms",
        ),
        (lambda: from_cloudevent({"id": "1", "source": "s", "data": {}}), "subject, time"),
        (lambda: from_cloudevent({**OPENMETER_CLOUDEVENT, "data": [1]}), "data"),
    ],
    ids=[
        "string count",
        "negative",
        "cached > input",
        "bool count",
        "reasoning > output",
        "naive time",
        "anthropic sum over the bound",
        "time before 2000",
        "latency over a week",
        "cloudevent missing",
        "cloudevent data",
    ],
)
def test_invalid_payloads_rejected(build: Any, reason: str) -> None:
    with pytest.raises(InvalidEventError, match=reason):
        build()


def test_adapted_event_encodes_to_the_contract() -> None:
    wire = orjson.loads(encode_event(from_anthropic_usage(ANTHROPIC_MESSAGE["usage"], CTX)))
    assert wire["occurred_at"] == "2025-06-02T10:00:00Z"
    assert wire["input_tokens"] == 190155


def test_anthropic_one_hour_writes_web_searches_and_tier() -> None:
    usage = {
        "input_tokens": 50,
        "cache_creation_input_tokens": 3000,
        "cache_read_input_tokens": 0,
        "output_tokens": 10,
        "service_tier": "priority",
        "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000},
        "server_tool_use": {"web_search_requests": 3},
    }
    event = from_anthropic_usage(usage, CTX)
    assert (event.cache_write_tokens, event.cache_write_1h_tokens) == (3000, 2000)
    assert (event.web_search_requests, event.service_tier) == (3, "priority")
    # a Batch API result: the gateway's context names the tier; it wins over the usage's
    batch = EventContext(**{**_ctx_fields(), "service_tier": "batch"})
    assert from_anthropic_usage(usage, batch).service_tier == "batch"


def test_openai_audio_and_image_tokens_and_tier_names() -> None:
    usage = {
        "prompt_tokens": 1000,
        "completion_tokens": 300,
        "prompt_tokens_details": {"cached_tokens": 600, "audio_tokens": 500, "image_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 100, "audio_tokens": 250},
    }
    ctx = EventContext(**{**_ctx_fields(), "service_tier": "default"})  # OpenAI's name
    event = from_openai_chat_usage(usage, ctx)
    # cached audio is counted once: the classes are disjoint parts of their totals
    assert (event.cached_input_tokens, event.input_audio_tokens) == (600, 400)
    assert (event.reasoning_tokens, event.output_audio_tokens) == (100, 200)
    assert event.service_tier == "standard"
    flex = EventContext(**{**_ctx_fields(), "service_tier": "flex"})
    assert from_openai_chat_usage(usage, flex).service_tier == "flex"


@pytest.mark.parametrize("tier", ["express", "", 3])
def test_unknown_service_tiers_are_refused(tier: Any) -> None:
    with pytest.raises(InvalidEventError, match="service_tier"):
        from_openai_chat_usage({}, EventContext(**{**_ctx_fields(), "service_tier": tier}))
