"""The LiteLLM plug-in without a broker: the event mapping, its never-raise sending, the pre-call
hook through LiteLLM's own proxy hook machinery, and how the module loads.

The payloads are LiteLLM's standard logging object as LiteLLM 1.110 builds it (the shapes below
were taken from real calls and trimmed of what the mapping ignores); the tests at the end of the
mapping section make LiteLLM itself build them, offline, from mocked responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import orjson
import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
litellm = pytest.importorskip(
    "litellm", reason="the LiteLLM plug-in needs the litellm extra (pip install -e '.[litellm]')"
)

from litellm import ModelResponse  # noqa: E402
from litellm.integrations.custom_logger import CustomLogger  # noqa: E402
from litellm.types.utils import (  # noqa: E402
    CompletionTokensDetailsWrapper,
    PromptTokensDetailsWrapper,
    Usage,
)

from producers import (  # noqa: E402
    AdmissionTimeout,
    Admitter,
    CapGuard,
    Ticket,
    validate_event,
)
from producers.litellm import (  # noqa: E402
    REQUESTED_MODEL_KEY,
    RESERVATION_ID_KEY,
    LiteLLMOptions,
    SpendstreamLogger,
    input_token_bound,
    unbounded_cost,
    usage_event_fields,
    usage_tokens,
)
from spendstream.errors import DeliveryError, InvalidEventError, KafkaError  # noqa: E402
from spendstream.settings import Settings  # noqa: E402

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
NO_BROKER = "127.0.0.1:9"
START, END = 1_796_405_750.633783, 1_796_405_752.72123  # 2026-12-04T17:35:50.633783Z ...
CALL_ID = "c2ecd15b-b882-4da3-bd61-39a3439cad00"
EVENT_ID = f"{CALL_ID}:1796405750633783"

_META_KEYS = [
    "user_api_key_hash",
    "user_api_key_alias",
    "user_api_key_spend",
    "user_api_key_max_budget",
    "user_api_key_team_id",
    "user_api_key_org_id",
    "user_api_key_org_alias",
    "user_api_key_project_id",
    "user_api_key_user_id",
    "user_api_key_team_alias",
    "user_api_key_user_email",
    "user_api_key_end_user_id",
    "user_api_key_request_route",
    "spend_logs_metadata",
    "requester_ip_address",
    "user_agent",
    "requester_metadata",
    "applied_guardrails",
    "routing_decision",
]


def slo(
    *,
    usage: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    response: dict[str, Any] | None = None,
    **top: Any,
) -> dict[str, Any]:
    """A standard logging object as LiteLLM builds it for a successful SDK call of gpt-4o."""
    usage = (
        {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}
        if usage is None
        else usage
    )
    payload: dict[str, Any] = {
        "id": "chatcmpl-80154e34-1a84-4226-ab41-809276132c64",
        "litellm_call_id": CALL_ID,
        "trace_id": "a76e86c7-1a53-4ba9-8f62-ec82e651dc61",
        "call_type": "acompletion",
        "cache_hit": None,
        "stream": None,
        "status": "success",
        "custom_llm_provider": "openai",
        "startTime": START,
        "endTime": END,
        "completionStartTime": END,
        "model": "gpt-4o",
        "model_id": "",
        "model_group": "",
        "model_map_information": {"model_map_key": "gpt-4o", "model_map_value": {}},
        "metadata": {**dict.fromkeys(_META_KEYS), "usage_object": usage, **(meta or {})},
        "response_cost": 0.0003,
        "cost_breakdown": {"total_cost": 0.0003, "service_tier": None},
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "completion_tokens": usage.get("completion_tokens", 0),
        "end_user": None,
        "model_parameters": {"stream": False},
        "hidden_params": {"litellm_model_name": "gpt-4o", "response_cost": 0.0003},
        "response": response
        if response is not None
        else {"id": "chatcmpl-80154e34", "model": "gpt-4o", "choices": [], "usage": usage},
        "error_str": None,
        "standard_built_in_tools_params": {"web_search_options": None, "file_search": None},
    }
    payload.update(top)
    return payload


PROXY_META = {
    "user_api_key_hash": "88dc28d0f030c55ed4ab77ed8faf098196cb1c05df778539800c9f1243fe6b4b",
    "user_api_key_alias": "web-app",
    "user_api_key_user_id": "alice",
    "user_api_key_team_id": "team-research",
    "user_api_key_org_id": "org-acme",
    "user_api_key_end_user_id": "customer-7",
}

BASE = {
    "event_id": EVENT_ID,
    "occurred_at": "2026-12-04T17:35:52.721230+00:00",
    "gateway": "litellm",
    "request_id": CALL_ID,
    "provider": "openai",
    "requested_model": "gpt-4o",
    "served_model": "gpt-4o",
    "latency_ms": 2087,
    "status": "ok",
    "semantic_cache_hit": False,
}

ANTHROPIC_USAGE = {  # LiteLLM's calculate_usage of an Anthropic response: the whole input
    "prompt_tokens": 12_000,  # 2,000 uncached + 4,000 written + 6,000 read
    "completion_tokens": 700,
    "total_tokens": 12_700,
    "prompt_tokens_details": {
        "cached_tokens": 6_000,
        "cache_creation_tokens": 4_000,
        "cache_write_tokens": 4_000,
        "cache_creation_token_details": {
            "ephemeral_5m_input_tokens": 1_000,
            "ephemeral_1h_input_tokens": 3_000,
        },
        "text_tokens": 2_000,
    },
    "completion_tokens_details": {"reasoning_tokens": 300, "text_tokens": 400},
    "cache_creation_input_tokens": 4_000,
    "cache_read_input_tokens": 6_000,
    "server_tool_use": {"web_search_requests": 2, "tool_search_requests": None},
    "service_tier": "priority",
}

# (name, payload, options, requested_model, expected fields)
CASES: list[tuple[str, dict[str, Any], LiteLLMOptions | None, str | None, dict[str, Any]]] = [
    (
        "openai, SDK: cached and reasoning tokens, the request's user",
        slo(
            usage={
                "prompt_tokens": 1_000,
                "completion_tokens": 300,
                "total_tokens": 1_300,
                "prompt_tokens_details": {"cached_tokens": 400, "audio_tokens": None},
                "completion_tokens_details": {"reasoning_tokens": 200, "audio_tokens": None},
            },
            model_parameters={"stream": False, "user": "sdk-user"},
        ),
        None,
        None,
        {
            **BASE,
            "user_id": "sdk-user",
            "org_id": "default",
            "input_tokens": 1_000,
            "cached_input_tokens": 400,
            "output_tokens": 300,
            "reasoning_tokens": 200,
            "attributes": {"end_user": "sdk-user", "call_type": "acompletion"},
        },
    ),
    (
        "proxy: the end user is the user, the key's org the org; the key is the api key",
        slo(
            meta=PROXY_META,
            end_user="customer-7",
            model="openai/gpt-4o",
            model_group="gpt-4o",
            model_map_information={"model_map_key": "gpt-4o"},
        ),
        None,
        None,
        {
            **BASE,
            "user_id": "customer-7",
            "org_id": "org-acme",
            "api_key_id": PROXY_META["user_api_key_hash"],
            "input_tokens": 10,
            "output_tokens": 20,
            "attributes": {
                "team_id": "team-research",
                "end_user": "customer-7",
                "key_user_id": "alice",
                "key_alias": "web-app",
                "model_group": "gpt-4o",
                "call_type": "acompletion",
            },
        },
    ),
    (
        "proxy without end user or org: the key's user, the key's team",
        slo(
            meta={**PROXY_META, "user_api_key_end_user_id": None, "user_api_key_org_id": None},
            model_group="gpt-4o",
        ),
        None,
        None,
        {**BASE, "user_id": "alice", "org_id": "team-research", "input_tokens": 10},
    ),
    (
        "anthropic: cache reads, writes (1 h part), reasoning, web searches, priority tier",
        slo(
            usage=ANTHROPIC_USAGE,
            meta=PROXY_META,
            custom_llm_provider="anthropic",
            model="anthropic/claude-sonnet-4-5",
            model_group="claude-sonnet-4-5",
            model_map_information={"model_map_key": "claude-sonnet-4-5"},
            standard_built_in_tools_params={
                "web_search_options": {"search_context_size": "high"},
                "file_search": None,
            },
        ),
        None,
        None,
        {
            "provider": "anthropic",
            "requested_model": "claude-sonnet-4-5",
            "served_model": "claude-sonnet-4-5",
            "input_tokens": 12_000,
            "cached_input_tokens": 6_000,
            "cache_write_tokens": 4_000,
            "cache_write_1h_tokens": 3_000,
            "output_tokens": 700,
            "reasoning_tokens": 300,
            "web_search_requests": 2,
            "search_context_size": "high",
            "service_tier": "priority",
        },
    ),
    (
        "anthropic via the usage's top-level cache fields only",
        slo(
            usage={
                "prompt_tokens": 5_000,
                "completion_tokens": 10,
                "prompt_tokens_details": {"cached_tokens": 1_000},
                "cache_creation_input_tokens": 3_000,
                "cache_read_input_tokens": 1_000,
            },
            custom_llm_provider="anthropic",
            model_parameters={"user": "u"},
        ),
        None,
        None,
        {"input_tokens": 5_000, "cached_input_tokens": 1_000, "cache_write_tokens": 3_000},
    ),
    (
        "failure: status error, no usage, the attempt's id",
        slo(
            usage={},
            id=CALL_ID,
            status="failure",
            error_str="litellm.InternalServerError: OpenAIException - boom",
            response={},
            prompt_tokens=0,
            completion_tokens=0,
            model_parameters={"user": "sdk-user"},
        ),
        None,
        None,
        {**BASE, "status": "error", "user_id": "sdk-user"},
    ),
    (
        "streaming: the final chunk's payload (details null, text tokens)",
        slo(
            usage={
                "completion_tokens": 3,
                "prompt_tokens": 8,
                "total_tokens": 11,
                "completion_tokens_details": {"reasoning_tokens": 0, "text_tokens": 3},
                "prompt_tokens_details": None,
                "cost": 5e-05,
            },
            stream=True,
            model_parameters={"stream": True, "user": "streamer"},
        ),
        None,
        None,
        {**BASE, "user_id": "streamer", "input_tokens": 8, "output_tokens": 3},
    ),
    (
        "LiteLLM's cache answered: a cache hit, no model call",
        slo(cache_hit=True, id=f"chatcmpl-1_cache_hit{END}", model_parameters={"user": "u"}),
        None,
        None,
        {"semantic_cache_hit": True, "input_tokens": 10, "output_tokens": 20},
    ),
    (
        "audio and images in and out (cached audio counted once)",
        slo(
            usage={
                "prompt_tokens": 1_000,
                "completion_tokens": 900,
                "prompt_tokens_details": {
                    "cached_tokens": 600,
                    "audio_tokens": 500,
                    "image_tokens": 100,
                },
                "completion_tokens_details": {
                    "reasoning_tokens": 100,
                    "audio_tokens": 300,
                    "image_tokens": 200,
                },
            },
            model_parameters={"user": "u"},
        ),
        None,
        None,
        {
            "input_tokens": 1_000,
            "cached_input_tokens": 600,
            "input_audio_tokens": 400,
            "output_tokens": 900,
            "reasoning_tokens": 100,
            "output_audio_tokens": 300,
            "output_image_tokens": 200,
        },
    ),
    (
        "an OpenAI search model's answer citing the web: one search at the asked size",
        slo(
            response={
                "choices": [
                    {
                        "message": {
                            "role": "assistant",
                            "content": "...",
                            "annotations": [{"type": "url_citation", "url_citation": {}}],
                        }
                    }
                ]
            },
            standard_built_in_tools_params={"web_search_options": {"search_context_size": "low"}},
            model_parameters={"user": "u"},
        ),
        None,
        None,
        {"web_search_requests": 1, "search_context_size": "low"},
    ),
    (
        "service tier from the cost breakdown; OpenAI's 'default' is standard",
        slo(cost_breakdown={"service_tier": "flex"}, model_parameters={"user": "u"}),
        None,
        None,
        {"service_tier": "flex"},
    ),
    (
        "an Azure deployment priced as its base model",
        slo(
            model="azure/prod-eastus-4o",
            custom_llm_provider="azure",
            model_group="smart",
            model_map_information={"model_map_key": "azure/gpt-4o-2024-08-06"},
            model_parameters={"user": "u"},
        ),
        None,
        None,
        {"requested_model": "smart", "served_model": "azure/gpt-4o-2024-08-06"},
    ),
    (
        "downgraded by the pre-call hook: the model asked for is the requested one",
        slo(
            model="gpt-4o-mini",
            model_group="gpt-4o-mini",
            model_parameters={"user": "u"},
            model_map_information={"model_map_key": "gpt-4o-mini"},
        ),
        None,
        "gpt-4o",
        {"requested_model": "gpt-4o", "served_model": "gpt-4o-mini"},
    ),
    (
        "configured fields: a dotted path, a team alias, a gateway name",
        slo(
            meta={
                **PROXY_META,
                "user_api_key_team_alias": "Research",
                "requester_metadata": {"tenant_user": "t-42"},
            }
        ),
        LiteLLMOptions(
            user_fields="metadata.requester_metadata.tenant_user,end_user",
            org_fields="user_api_key_team_alias",
            gateway="edge-eu",
        ),
        None,
        {"user_id": "t-42", "org_id": "Research", "gateway": "edge-eu"},
    ),
    (
        "no user in any field: the configured default",
        slo(),
        LiteLLMOptions(default_user_id="anonymous"),
        None,
        {"user_id": "anonymous", "org_id": "default"},
    ),
]


@pytest.mark.parametrize(
    ("payload", "options", "requested", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_the_payload_maps_to_a_valid_event(
    payload: dict[str, Any],
    options: LiteLLMOptions | None,
    requested: str | None,
    expected: dict[str, Any],
) -> None:
    fields = usage_event_fields(payload, options, requested_model=requested)
    assert {k: fields.get(k) for k in expected} == expected
    validate_event(fields)  # the contract accepts it as sent


def test_only_the_classes_litellm_reports_are_set() -> None:
    fields = usage_event_fields(slo(model_parameters={"user": "u"}))
    assert set(fields) == {
        *BASE,
        "user_id",
        "org_id",
        "input_tokens",
        "output_tokens",
        "attributes",
    }


def test_without_a_user_the_contract_refuses_the_event_with_its_reason() -> None:
    fields = usage_event_fields(slo())
    assert "user_id" not in fields
    with pytest.raises(InvalidEventError, match="user_id"):
        validate_event(fields)


def test_token_classes_never_overlap_whatever_the_details_say() -> None:
    # cache writes larger than what is left after the reads, audio on top: capped, not refused
    tokens = usage_tokens(
        {
            "prompt_tokens": 100,
            "completion_tokens": 10,
            "prompt_tokens_details": {
                "cached_tokens": 70,
                "cache_write_tokens": 50,
                "audio_tokens": 20,
                "cache_creation_token_details": {"ephemeral_1h_input_tokens": 90},
            },
            "completion_tokens_details": {"reasoning_tokens": 8, "image_tokens": 5},
        }
    )
    assert tokens["cache_write_tokens"] == 30 and tokens["cache_write_1h_tokens"] == 30
    assert tokens["input_audio_tokens"] == 0 and tokens["output_image_tokens"] == 2


def test_an_unknown_service_tier_is_refused_with_the_contract_reason() -> None:
    with pytest.raises(InvalidEventError, match="service_tier"):
        usage_event_fields(slo(cost_breakdown={"service_tier": "turbo"}))


def test_a_too_long_call_id_is_hashed_into_the_id_bound() -> None:
    fields = usage_event_fields(slo(litellm_call_id="x" * 300, model_parameters={"user": "u"}))
    assert fields["event_id"].startswith("sha256:") and len(fields["event_id"]) == 71


# -- payloads LiteLLM builds itself, offline --------------------------------------------------


class Capture(CustomLogger):
    """Collects LiteLLM's logging kwargs, success and failure alike."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[dict[str, Any]] = []

    async def async_log_success_event(
        self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        self.logged.append(kwargs)

    async def async_log_failure_event(
        self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        self.logged.append(kwargs)

    async def wait_for(self, count: int, timeout_s: float = 20.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while len(self.logged) < count:
            assert time.monotonic() < deadline, f"LiteLLM logged {len(self.logged)} of {count}"
            await asyncio.sleep(0.02)
        return self.logged


MESSAGES = [{"role": "user", "content": "hello"}]


def test_litellm_s_own_payloads_success_stream_and_failure(callbacks: list[Any]) -> None:
    capture = Capture()
    callbacks.append(capture)
    usage = Usage(
        prompt_tokens=1_000,
        completion_tokens=300,
        total_tokens=1_300,
        prompt_tokens_details=PromptTokensDetailsWrapper(cached_tokens=400),
        completion_tokens_details=CompletionTokensDetailsWrapper(reasoning_tokens=200),
    )
    mocked = ModelResponse(model="gpt-4o", usage=usage, choices=[{"message": {"content": "hi"}}])
    meta = {"user_api_key_user_id": "alice", "user_api_key_org_id": "org-acme"}

    async def calls() -> list[dict[str, Any]]:
        await litellm.acompletion(
            model="gpt-4o", messages=MESSAGES, mock_response=mocked, metadata=meta
        )
        await capture.wait_for(1)
        stream = await litellm.acompletion(
            model="gpt-4o", messages=MESSAGES, mock_response="a streamed answer", stream=True,
            metadata=meta,
        )  # fmt: skip
        async for _ in stream:
            pass
        await capture.wait_for(2)
        with pytest.raises(litellm.exceptions.InternalServerError):
            await litellm.acompletion(
                model="gpt-4o", messages=MESSAGES, mock_response=Exception("down"), metadata=meta
            )
        return await capture.wait_for(3)

    logged = asyncio.run(calls())
    events = [validate_event(usage_event_fields(k["standard_logging_object"])) for k in logged]
    ok, streamed, failed = events
    assert (ok.input_tokens, ok.cached_input_tokens, ok.output_tokens, ok.reasoning_tokens) == (
        1_000, 400, 300, 200,
    )  # fmt: skip
    assert (ok.user_id, ok.org_id, ok.status, ok.served_model) == (
        "alice",
        "org-acme",
        "ok",
        "gpt-4o",
    )
    assert streamed.output_tokens > 0 and streamed.status == "ok"
    assert failed.status == "error" and failed.input_tokens == 0
    assert len({e.event_id for e in events}) == 3
    for kwargs, event in zip(logged, events, strict=True):
        assert event.request_id == kwargs["standard_logging_object"]["litellm_call_id"]


def test_router_retries_and_fallbacks_are_distinct_events_of_one_request(
    callbacks: list[Any],
) -> None:
    """LiteLLM logs each attempt with the request's litellm_call_id: an event id of the call id
    alone would make the worker drop the fallback's success as a duplicate."""
    capture = Capture()
    callbacks.append(capture)
    router = litellm.Router(
        model_list=[
            {"model_name": "big", "litellm_params": {
                "model": "openai/gpt-4o", "api_key": "sk-x", "mock_response": Exception("down")}},
            {"model_name": "small", "litellm_params": {
                "model": "openai/gpt-4o-mini", "api_key": "sk-x", "mock_response": "ok"}},
        ],
        fallbacks=[{"big": ["small"]}],
        num_retries=1,
        retry_after=0,
    )  # fmt: skip

    async def call() -> list[dict[str, Any]]:
        await router.acompletion(
            model="big", messages=MESSAGES, litellm_call_id="req-1", metadata={
                "user_api_key_user_id": "alice"}
        )  # fmt: skip
        return await capture.wait_for(3)

    events = [
        validate_event(usage_event_fields(k["standard_logging_object"]))
        for k in asyncio.run(call())
    ]
    assert sorted(e.status for e in events) == ["error", "error", "ok"]
    assert {e.request_id for e in events} == {"req-1"}
    assert len({e.event_id for e in events}) == 3
    ok = next(e for e in events if e.status == "ok")
    assert (ok.requested_model, ok.served_model) == ("small", "openai/gpt-4o-mini")


# -- the handler: never raises, never waits ---------------------------------------------------


def settings(tmp_path: Path, **producer: Any) -> Settings:
    return Settings(
        state_dir=tmp_path / "state",
        kafka={"bootstrap_servers": NO_BROKER},
        topics={"events": "t.usage.events", "enforcement": "t.usage.enforcement"},
        producer=producer,
    )


def shut(handler: SpendstreamLogger) -> None:
    """Close without waiting for a broker that is not there (undelivered events raise)."""
    with contextlib.suppress(DeliveryError):
        handler.close(timeout_s=0.1)


def logged(payload: dict[str, Any], **litellm_params: Any) -> dict[str, Any]:
    return {"standard_logging_object": payload, "litellm_params": litellm_params}


VALID = slo(model_parameters={"user": "u1"})


def test_a_full_queue_drops_and_counts_without_waiting(tmp_path: Path) -> None:
    handler = SpendstreamLogger(
        settings(tmp_path), producer_config={"queue.buffering.max.messages": 1}
    )
    try:
        handler.record(logged(VALID))  # creates the producer
        began = time.monotonic()
        for i in range(10):
            handler.record(logged({**VALID, "startTime": START + i + 1}))
        assert time.monotonic() - began < 0.3  # no 50 ms poll for room per refused event
        stats = handler.stats()
        assert (stats.sent, stats.dropped, stats.invalid) == (1, 10, 0)
        assert stats.last_error is not None and "full" in stats.last_error
    finally:
        shut(handler)


def test_a_refused_event_is_counted_with_the_contract_reason(tmp_path: Path) -> None:
    handler = SpendstreamLogger(settings(tmp_path))
    handler.record(logged(slo()))  # no user
    handler.record({"no": "payload"})
    stats = handler.stats()
    assert stats.invalid == 2 and stats.sent == 0
    assert stats.last_error == "LiteLLM gave no standard_logging_object for the call"
    handler.record(logged(slo(cost_breakdown={"service_tier": "turbo"})))
    assert "service_tier" in (handler.stats().last_error or "")
    handler.close()


@pytest.mark.parametrize(
    ("payload", "params"),
    [
        pytest.param(VALID, {"proxy_rejected_before_routing": True}, id="refused-by-the-proxy"),
        pytest.param({**VALID, "call_type": "aget_responses"}, {}, id="read-of-a-stored-response"),
        pytest.param(
            {**VALID, "model": "", "model_map_information": {}, "hidden_params": {}},
            {},
            id="no-model",
        ),
    ],
)
def test_what_is_not_a_model_call_is_skipped(
    tmp_path: Path, payload: dict[str, Any], params: dict[str, Any]
) -> None:
    handler = SpendstreamLogger(settings(tmp_path))
    handler.record(logged(payload, **params))
    assert handler.stats().skipped == 1 and handler.producer_stats() is None
    handler.close()


def test_an_unusable_producer_drops_and_is_retried_later(tmp_path: Path) -> None:
    handler = SpendstreamLogger(settings(tmp_path), producer_config={"no.such.property": 1})
    handler.record(logged(VALID))
    handler.record(logged(VALID))
    stats = handler.stats()
    assert (stats.sent, stats.dropped) == (0, 2)
    assert stats.last_error == "the producer is not available"
    handler.close()


def test_with_a_spool_each_process_takes_a_free_slot_and_a_full_spool_drops(
    tmp_path: Path,
) -> None:
    conf = settings(tmp_path, spool_enabled=True, spool_max_bytes=4096, full_policy="block")
    first, second = SpendstreamLogger(conf), SpendstreamLogger(conf)
    try:
        first.record(logged(VALID))
        second.record(logged(VALID))
        spool = conf.state_dir / "spool"
        assert sorted(p.name for p in spool.iterdir()) == ["litellm-0", "litellm-1"]
        began = time.monotonic()
        for i in range(20):  # about 600 bytes each: the 4 KiB spool fills
            first.record(logged({**VALID, "startTime": START + i + 1}))
        assert time.monotonic() - began < 1.0  # the block policy does not wait here
        stats = first.stats()
        assert stats.dropped > 0 and stats.sent + stats.dropped == 21
        assert "spool" in (stats.last_error or "")
    finally:
        shut(first)
        shut(second)


# -- the pre-call hook through LiteLLM's proxy hook machinery ---------------------------------

pytest.importorskip(
    "fastapi", reason="LiteLLM's proxy hooks need fastapi, backoff and redis (the proxy's extras)"
)
from fastapi import HTTPException  # noqa: E402
from litellm.caching.dual_cache import DualCache  # noqa: E402
from litellm.proxy._types import ProxyException, UserAPIKeyAuth  # noqa: E402
from litellm.proxy.common_request_processing import ProxyBaseLLMRequestProcessing  # noqa: E402
from litellm.proxy.utils import ProxyLogging  # noqa: E402

NOW = 1_796_083_000.0  # 200 s before UNTIL
UNTIL = "2026-12-01T00:00:00Z"


def enforcement(state: str, reason: str = "cap", until: str | None = UNTIL, **kw: Any) -> bytes:
    """An enforcement record as the worker publishes it (schemas.EnforcementRecord)."""
    return orjson.dumps(
        {
            "user_id": "u", "org_id": "org-acme", "plan_id": "pro", "state": state,
            "reason": reason, "window": "pro.monthly", "window_id": "pro.monthly|2026-11",
            "unit": "usd", "usage": "30", "limit": "30", "remaining": "0", "until": until,
            "downgrade_to": None, "as_of": "2026-11-20T10:00:00Z", "version": 3,
            "updated_at": "2026-11-20T10:00:01Z", **kw,
        }
    )  # fmt: skip


def proxy_with(handler: SpendstreamLogger, callbacks: list[Any]) -> ProxyLogging:
    callbacks.append(handler)
    return ProxyLogging(user_api_key_cache=DualCache())


def guarded(tmp_path: Path, now: float = NOW, **options: Any) -> SpendstreamLogger:
    guard = CapGuard(config={"bootstrap.servers": NO_BROKER}, topic="t", clock=lambda: now)
    guard.apply("blocked", enforcement("blocked"))
    guard.apply("ceiling", enforcement("blocked", "ceiling", until=None))
    guard.apply("downgraded", enforcement("downgrade", downgrade_to="gpt-4o-mini"))
    guard.apply("broken-downgrade", enforcement("downgrade"))
    guard.apply("warned", enforcement("warn", "threshold"))
    return SpendstreamLogger(
        settings(tmp_path), LiteLLMOptions(**options), guard=guard, clock=lambda: now
    )


def request(model: str = "gpt-4o", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, "metadata": {}, **extra}


def pre_call(
    proxy: ProxyLogging, data: dict[str, Any], user: str | None = None, **auth: Any
) -> dict[str, Any]:
    key = UserAPIKeyAuth(api_key="88dc28d0", user_id=user, **auth)
    return asyncio.run(
        proxy.pre_call_hook(user_api_key_dict=key, data=data, call_type="acompletion")
    )


@pytest.mark.parametrize(
    ("user", "model_after"),
    [
        pytest.param("unknown-user", "gpt-4o", id="no-record"),
        pytest.param("warned", "gpt-4o", id="warn-passes"),
        pytest.param("downgraded", "gpt-4o-mini", id="downgrade"),
    ],
)
def test_allow_and_downgrade(
    tmp_path: Path, callbacks: list[Any], user: str, model_after: str
) -> None:
    handler = guarded(tmp_path)
    data = pre_call(proxy_with(handler, callbacks), request(), user)
    assert data["model"] == model_after
    if model_after != "gpt-4o":
        assert data["metadata"][REQUESTED_MODEL_KEY] == "gpt-4o"
        assert handler.stats().downgraded == 1
    else:
        assert REQUESTED_MODEL_KEY not in data["metadata"]


def test_a_block_is_the_proxy_s_429_with_retry_after(tmp_path: Path, callbacks: list[Any]) -> None:
    handler = guarded(tmp_path)
    proxy = proxy_with(handler, callbacks)
    data = request()
    key = UserAPIKeyAuth(api_key="88dc28d0", user_id="blocked")
    with pytest.raises(HTTPException) as raised:
        asyncio.run(proxy.pre_call_hook(user_api_key_dict=key, data=data, call_type="acompletion"))
    assert raised.value.status_code == 429
    assert raised.value.headers == {"Retry-After": "200"}
    assert raised.value.detail["reason"] == "cap" and raised.value.detail["until"] == UNTIL
    # what the proxy's error path makes of it: the response's status, headers and body
    with pytest.raises(ProxyException) as answered:
        asyncio.run(
            ProxyBaseLLMRequestProcessing(data=data).handle_llm_api_exception(
                raised.value, key, proxy
            )
        )
    assert answered.value.code == "429" and answered.value.headers["Retry-After"] == "200"
    assert answered.value.type == "rate_limit_error"
    assert "usage cap reached in pro.monthly" in answered.value.message
    assert handler.stats().blocked == 1


@pytest.mark.parametrize(
    ("user", "now", "headers"),
    [
        pytest.param("ceiling", NOW, None, id="blocked-without-until: no Retry-After"),
        pytest.param("broken-downgrade", NOW, {"Retry-After": "200"}, id="downgrade-without-model"),
        pytest.param("blocked", NOW + 199.5, {"Retry-After": "1"}, id="at-least-one-second"),
    ],
)
def test_other_blocks(
    tmp_path: Path, callbacks: list[Any], user: str, now: float, headers: Any
) -> None:
    proxy = proxy_with(guarded(tmp_path, now), callbacks)
    with pytest.raises(HTTPException) as raised:
        pre_call(proxy, request(), user)
    assert raised.value.status_code == 429 and raised.value.headers == headers


def test_a_block_whose_until_passed_lets_the_request_through(
    tmp_path: Path, callbacks: list[Any]
) -> None:
    proxy = proxy_with(guarded(tmp_path, NOW + 200), callbacks)
    assert pre_call(proxy, request(), "blocked")["model"] == "gpt-4o"


def test_the_hook_checks_the_user_the_event_is_metered_under(
    tmp_path: Path, callbacks: list[Any]
) -> None:
    """The end user (the request's ``user``) comes first, as in the event."""
    proxy = proxy_with(guarded(tmp_path), callbacks)
    with pytest.raises(HTTPException):
        pre_call(proxy, request(user="blocked"), "alice")
    with pytest.raises(HTTPException):
        pre_call(proxy, request(), "alice", end_user_id="blocked")
    assert pre_call(proxy, request(user="customer-9"), "blocked")["model"] == "gpt-4o"


def test_configured_user_fields_apply_to_the_check_too(
    tmp_path: Path, callbacks: list[Any]
) -> None:
    proxy = proxy_with(guarded(tmp_path, user_fields="user_api_key_team_id"), callbacks)
    with pytest.raises(HTTPException):
        pre_call(proxy, request(user="customer-9"), "alice", team_id="blocked")


@pytest.mark.parametrize(
    ("options", "data"),
    [
        pytest.param({"enforce": False}, request(), id="enforcement-off"),
        pytest.param({}, {"messages": MESSAGES}, id="no-model-in-the-request"),
    ],
)
def test_requests_that_are_not_checked(
    tmp_path: Path, callbacks: list[Any], options: dict[str, Any], data: dict[str, Any]
) -> None:
    handler = guarded(tmp_path, **options)
    passed = pre_call(proxy_with(handler, callbacks), dict(data), "blocked")
    assert passed.get("model") == data.get("model")
    assert handler.stats() == SpendstreamLogger(settings(tmp_path)).stats()  # nothing counted


def test_without_a_reachable_broker_requests_pass_after_the_start_wait(
    tmp_path: Path, callbacks: list[Any]
) -> None:
    # (the guard is not closed: its reader is still waiting for the broker's metadata)
    handler = SpendstreamLogger(settings(tmp_path), LiteLLMOptions(guard_wait_s=0.3))
    proxy = proxy_with(handler, callbacks)
    began = time.monotonic()
    assert pre_call(proxy, request(), "blocked")["model"] == "gpt-4o"
    assert pre_call(proxy, request(), "blocked")["model"] == "gpt-4o"
    assert time.monotonic() - began < 2.0  # waited once, at most guard_wait_s


def test_a_guard_that_never_reached_the_broker_is_started_again(
    tmp_path: Path, callbacks: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import producers.litellm as plugin

    monkeypatch.setattr(plugin, "_RETRY_AFTER_FAILURE_S", 0.2)
    handler = SpendstreamLogger(settings(tmp_path), LiteLLMOptions(guard_wait_s=0))
    proxy = proxy_with(handler, callbacks)
    pre_call(proxy, request(), "blocked")
    first = handler._guard
    assert first is not None and first.staleness_s() is None
    time.sleep(0.3)
    pre_call(proxy, request(), "blocked")
    assert handler._guard is not None and handler._guard is not first


# -- admission (options.admit) ----------------------------------------------------------------


class FakeAdmitter:
    """Answers every admission with ``answer`` (a Ticket, or an exception to raise)."""

    def __init__(self, answer: Ticket | Exception, start_error: Exception | None = None) -> None:
        self.answer = answer
        self.start_error = start_error
        self.asked: list[dict[str, Any]] = []
        self.starts = 0
        self.closed = False

    def start(self, *, wait_s: float = 30.0) -> FakeAdmitter:
        self.starts += 1
        if self.start_error is not None:
            raise self.start_error
        return self

    def close(self) -> None:
        self.closed = True

    async def aadmit(
        self, user_id: str, org_id: str, model: str, *, input_tokens: int, output_tokens: int
    ) -> Ticket:
        self.asked.append(
            {"user": user_id, "org": org_id, "model": model, "in": input_tokens,
             "out": output_tokens}
        )  # fmt: skip
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


ALLOW = Ticket("allow", "ok", "gpt-4o", "rid-1")


def admitting(
    tmp_path: Path, admitter: FakeAdmitter, now: float = NOW, **options: Any
) -> SpendstreamLogger:
    """``guarded``'s guard (its users' records), with admission on through ``admitter``."""
    handler = guarded(tmp_path, now, admit=True, **options)
    handler._admitter, handler._own_admitter = cast("Admitter", admitter), False
    return handler


def test_an_admitted_request_carries_its_reservation_id_to_the_usage_event(
    tmp_path: Path, callbacks: list[Any]
) -> None:
    admitter = FakeAdmitter(ALLOW)
    handler = admitting(tmp_path, admitter)
    data = pre_call(proxy_with(handler, callbacks), request(user="alice"), "k", org_id="org-acme")
    assert data["metadata"][RESERVATION_ID_KEY] == "rid-1" and data["model"] == "gpt-4o"
    assert data["max_tokens"] == 4096  # no limit given: the default, which was reserved
    assert admitter.asked == [
        {"user": "alice", "org": "org-acme", "model": "gpt-4o", "in": 5 + 8, "out": 4096}
    ]
    assert admitter.starts == 1
    # LiteLLM hands the request's metadata to the callbacks: the event carries the id
    capture = Capture()
    callbacks.append(capture)

    async def call() -> list[dict[str, Any]]:
        await litellm.acompletion(**data, mock_response="hi")
        return await capture.wait_for(1)

    (kwargs,) = asyncio.run(call())
    sent: list[dict[str, Any]] = []
    handler._send = sent.append  # type: ignore[method-assign]
    handler.record(kwargs)
    assert sent[0]["reservation_id"] == "rid-1"
    assert validate_event(sent[0]).reservation_id == "rid-1"
    # without the metadata key, no reservation id
    assert "reservation_id" not in usage_event_fields(VALID)
    stats = handler.stats()
    assert (stats.blocked, stats.downgraded, stats.unadmitted, stats.unchecked) == (0, 0, 0, 0)


@pytest.mark.parametrize(
    ("limits", "reserved"),
    [
        pytest.param({"max_tokens": 100}, 100, id="max_tokens"),
        pytest.param({"max_completion_tokens": 300}, 300, id="max_completion_tokens"),
        pytest.param({"max_tokens": 100, "max_completion_tokens": 300}, 300, id="both: larger"),
        pytest.param({"max_tokens": 100, "n": 3}, 300, id="n-choices"),
    ],
)
def test_a_limit_the_request_gives_is_reserved_and_kept(
    tmp_path: Path, callbacks: list[Any], limits: dict[str, int], reserved: int
) -> None:
    admitter = FakeAdmitter(ALLOW)
    data = pre_call(proxy_with(admitting(tmp_path, admitter), callbacks), request(**limits), "a")
    assert admitter.asked[0]["out"] == reserved
    assert {k: data.get(k) for k in limits} == limits  # nothing added or changed
    assert "max_tokens" in limits or "max_tokens" not in data


def test_the_input_bound_counts_utf8_bytes_of_every_text() -> None:
    assert input_token_bound({"messages": [{"role": "user", "content": "hello"}]}) == 5 + 8
    assert input_token_bound({"messages": [{"role": "user", "content": "héllo €"}]}) == 10 + 8
    parts = [
        {"type": "text", "text": "look at"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "this"},
    ]
    calls = [{"id": "c1", "type": "function",
              "function": {"name": "get", "arguments": '{"city":"Köln"}'}}]  # fmt: skip
    data = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": parts},
            {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ]
    }
    assert input_token_bound(data) == 8 + (7 + 4) + (3 + 16) + 5 + 4 * 8
    tools = [{"type": "function", "function": {"name": "get", "parameters": {}}}]
    assert input_token_bound({**data, "tools": tools}) == input_token_bound(data) + len(
        orjson.dumps(tools)
    )
    assert input_token_bound({"messages": "not a list"}) == 0


def test_an_admission_block_is_refused_like_the_guard_s(
    tmp_path: Path, callbacks: list[Any]
) -> None:
    retry_at = NOW + 200  # UNTIL, as the guard path refuses "blocked" above
    admitter = FakeAdmitter(Ticket("block", "cap", None, "rid-2", retry_after=int(retry_at),
                                   window="pro.monthly"))  # fmt: skip
    handler = admitting(tmp_path, admitter)
    proxy = proxy_with(handler, callbacks)
    data = request()
    with pytest.raises(HTTPException) as admitted:
        pre_call(proxy, data, "alice")
    callbacks.clear()  # the guard path, alone
    with pytest.raises(HTTPException) as guarded_:
        pre_call(proxy_with(guarded(tmp_path), callbacks), request(), "blocked")
    callbacks[:] = [handler]
    a, g = admitted.value, guarded_.value
    assert (a.status_code, a.headers, a.detail) == (g.status_code, g.headers, g.detail)
    assert a.detail["until"] == UNTIL
    assert RESERVATION_ID_KEY not in data["metadata"] and "max_tokens" not in data
    assert handler.stats().blocked == 1
    # a block no wait can lift: no Retry-After, as for a guard block without until
    admitter.answer = Ticket("block", "ceiling", None, "rid-3", window="pro.monthly")
    with pytest.raises(HTTPException) as never:
        pre_call(proxy, request(), "alice")
    assert never.value.status_code == 429 and never.value.headers is None


def test_an_admission_downgrade_serves_the_ticket_s_model(
    tmp_path: Path, callbacks: list[Any]
) -> None:
    admitter = FakeAdmitter(Ticket("downgrade", "cap", "gpt-4o-mini", "rid-4"))
    handler = admitting(tmp_path, admitter)
    data = pre_call(proxy_with(handler, callbacks), request(), "alice")  # the guard says allow
    assert data["model"] == "gpt-4o-mini"
    assert data["metadata"][REQUESTED_MODEL_KEY] == "gpt-4o"
    assert data["metadata"][RESERVATION_ID_KEY] == "rid-4"  # the downgrade holds its estimate
    assert handler.stats().downgraded == 1


@pytest.mark.parametrize(
    "admitter",
    [
        pytest.param(FakeAdmitter(AdmissionTimeout("no answer")), id="timeout"),
        pytest.param(FakeAdmitter(KafkaError("reader stopped")), id="kafka-error"),
        pytest.param(FakeAdmitter(RuntimeError("a bug")), id="any-error"),
        pytest.param(FakeAdmitter(ALLOW, start_error=KafkaError("no broker")), id="start-failed"),
    ],
)
def test_without_an_admitter_the_guard_decides_and_it_is_counted(
    tmp_path: Path, callbacks: list[Any], admitter: FakeAdmitter
) -> None:
    handler = admitting(tmp_path, admitter)
    proxy = proxy_with(handler, callbacks)
    with pytest.raises(HTTPException) as raised:
        pre_call(proxy, request(), "blocked")
    assert raised.value.status_code == 429 and raised.value.detail["until"] == UNTIL
    data = pre_call(proxy, request(), "downgraded")
    assert data["model"] == "gpt-4o-mini" and RESERVATION_ID_KEY not in data["metadata"]
    assert "max_tokens" not in data
    stats = handler.stats()
    assert (stats.unadmitted, stats.blocked, stats.downgraded) == (2, 1, 1)
    assert stats.last_error is not None
    if admitter.start_error is not None:
        assert admitter.starts == 1  # not asked again at once: retried after a while


IMAGE = {"type": "image_url", "image_url": {"url": "https://example.test/cat.png"}}
TEXT_PART = {"type": "text", "text": "hello"}


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        pytest.param({}, None, id="text"),
        pytest.param({"messages": [{"role": "user", "content": [TEXT_PART, "x"]}]}, None,
                     id="text-parts"),
        pytest.param({"messages": [{"role": "user", "content": [TEXT_PART, IMAGE]}]},
                     "image_url", id="image"),
        pytest.param({"messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]},
                     "input_audio", id="audio-in"),
        pytest.param({"messages": [{"role": "user", "content": [{"type": "file"}]}]},
                     "file", id="file"),
        pytest.param({"modalities": ["text", "audio"]}, "audio output", id="audio-out"),
        pytest.param({"audio": {"voice": "alloy", "format": "wav"}}, "audio output",
                     id="audio-param"),
        pytest.param({"modalities": ["text"]}, None, id="text-modality"),
        pytest.param({"web_search_options": {}}, "web search", id="empty-search-options"),
        pytest.param({"web_search_options": None}, None, id="no-search-options"),
        pytest.param({"web_search_options": {"search_context_size": "low"}}, "web search",
                     id="search-options"),
        pytest.param({"tools": [{"type": "web_search_preview"}]}, "web search",
                     id="search-tool"),
        pytest.param({"tools": [{"type": "function", "function": {"name": "f"}}]}, None,
                     id="function-tool"),
        pytest.param({"service_tier": "priority"}, "priority", id="priority"),
        pytest.param({"service_tier": "flex"}, None, id="flex"),
        pytest.param({"service_tier": "auto"}, None, id="auto"),
        pytest.param({"fallbacks": ["claude-opus-4"]}, "fallbacks", id="fallbacks"),
        pytest.param({"fallbacks": [{"gpt-4o": ["o1-pro"]}]}, "fallbacks",
                     id="fallbacks-by-model"),
        pytest.param({"fallbacks": []}, None, id="no-fallbacks"),
        pytest.param({"fallbacks": None}, None, id="fallbacks-none"),
        pytest.param({"context_window_fallback_dict": {"gpt-4o": "gpt-4.1"}}, "fallbacks",
                     id="context-window-fallbacks"),
        pytest.param({"context_window_fallback_dict": {}}, None,
                     id="no-context-window-fallbacks"),
        pytest.param({"model": "gpt-4o-with-fallbacks"}, "guard_models", id="guard-model"),
        pytest.param({"model": "gpt-4o-mini"}, None, id="other-model"),
        pytest.param({"model": ["gpt-4o-with-fallbacks"]}, None, id="model-not-a-string"),
    ],
)  # fmt: skip
def test_what_an_admission_estimate_does_not_bound(
    extra: dict[str, Any], reason: str | None
) -> None:
    found = unbounded_cost(request(**extra), frozenset({"gpt-4o-with-fallbacks", "o3"}))
    assert (found is None) == (reason is None), found
    if reason is not None:
        assert found is not None and reason in found


def test_guard_models_are_read_from_the_environment_and_decided_by_the_guard(
    tmp_path: Path, callbacks: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPENDSTREAM_LITELLM_GUARD_MODELS", " gpt-4o , o3,")
    assert LiteLLMOptions().guard_model_set == frozenset({"gpt-4o", "o3"})
    assert LiteLLMOptions(guard_models="").guard_model_set == frozenset()
    admitter = FakeAdmitter(ALLOW)
    handler = admitting(tmp_path, admitter, guard_models="gpt-4o")
    proxy = proxy_with(handler, callbacks)
    with pytest.raises(HTTPException) as raised:
        pre_call(proxy, request(), "blocked")  # gpt-4o: the guard blocks, nobody is asked
    assert raised.value.status_code == 429
    assert admitter.asked == [] and admitter.starts == 0
    data = pre_call(proxy, request(model="gpt-4o-mini"), "alice")
    assert RESERVATION_ID_KEY in data["metadata"] and len(admitter.asked) == 1
    stats = handler.stats()
    assert stats.unadmitted == 1 and stats.last_error is not None
    assert "guard_models" in stats.last_error


def test_a_request_the_estimate_does_not_bound_is_decided_by_the_guard(
    tmp_path: Path, callbacks: list[Any]
) -> None:
    admitter = FakeAdmitter(ALLOW)
    handler = admitting(tmp_path, admitter)
    proxy = proxy_with(handler, callbacks)
    picture = [{"role": "user", "content": [TEXT_PART, IMAGE]}]
    with pytest.raises(HTTPException) as raised:
        pre_call(proxy, request(messages=picture), "blocked")
    assert raised.value.status_code == 429
    data = pre_call(proxy, request(messages=picture), "alice")
    assert RESERVATION_ID_KEY not in data["metadata"] and "max_tokens" not in data
    assert admitter.asked == [] and admitter.starts == 0
    stats = handler.stats()
    assert stats.unadmitted == 2 and stats.blocked == 1
    assert stats.last_error is not None and "image_url" in stats.last_error
    # A text request through the same handler is admitted.
    assert RESERVATION_ID_KEY in pre_call(proxy, request(), "alice")["metadata"]
    assert len(admitter.asked) == 1


def test_other_calls_and_enforcement_off_are_not_admitted(
    tmp_path: Path, callbacks: list[Any]
) -> None:
    admitter = FakeAdmitter(ALLOW)
    handler = admitting(tmp_path, admitter)
    key = UserAPIKeyAuth(api_key="88dc28d0", user_id="alice")
    proxy = proxy_with(handler, callbacks)
    asyncio.run(
        proxy.pre_call_hook(
            user_api_key_dict=key, data={"model": "gpt-4o", "input": "x"}, call_type="aembedding"
        )
    )
    callbacks.clear()
    off = admitting(tmp_path, FakeAdmitter(ALLOW), enforce=False)
    assert pre_call(proxy_with(off, callbacks), request(), "alice") == request()
    assert admitter.asked == [] and handler.stats().unadmitted == 0


def test_admission_is_off_by_default_and_close_closes_an_own_admitter(tmp_path: Path) -> None:
    assert LiteLLMOptions().admit is False and LiteLLMOptions().admit_max_output_tokens == 4096
    shared = FakeAdmitter(ALLOW)
    handler = admitting(tmp_path, shared)
    handler.close()
    assert not shared.closed  # the gateway's own
    own = FakeAdmitter(ALLOW)
    handler = admitting(tmp_path, own)
    handler._own_admitter = True
    handler.close()
    assert own.closed


# -- loading ----------------------------------------------------------------------------------


def _python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )


def test_import_producers_never_imports_litellm() -> None:
    run = _python("import sys, producers; print('litellm' in sys.modules)")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"


def test_without_litellm_the_error_names_the_extra() -> None:
    run = _python(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'litellm':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import producers.litellm\n"
    )
    assert run.returncode != 0
    assert "pip install 'spendstream[litellm]'" in run.stderr


def test_the_module_handler_is_made_on_first_access_only() -> None:
    run = _python(
        "import producers.litellm as m\n"
        "from litellm.integrations.custom_logger import CustomLogger\n"
        "print(m._handler is None)\n"
        "h = m.handler\n"
        "print(isinstance(h, CustomLogger), h is m.handler, h.producer_stats() is None)\n"
        "print('async_pre_call_hook' in vars(type(h)))\n"
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["True", "True", "True", "True", "True"]


# -- the example proxy config -----------------------------------------------------------------

EXAMPLE = ROOT / "deploy" / "litellm" / "config.yaml"


def test_the_example_config_loads_the_handler_and_its_models_are_metered(
    tmp_path: Path, callbacks: list[Any]
) -> None:
    import yaml
    from litellm.proxy.types_utils.utils import get_instance_fn

    from schemas.plans import DowngradeAtCap, load_plans
    from stream_processors import PriceCatalog

    config = yaml.safe_load(EXAMPLE.read_text())
    (entry,) = config["litellm_settings"]["callbacks"]
    assert isinstance(get_instance_fn(entry, config_file_path=str(EXAMPLE)), SpendstreamLogger)

    names = [m["model_name"] for m in config["model_list"]]
    targets = {
        w.at_cap.model
        for p in load_plans().plans
        for w in p.windows
        if isinstance(w.at_cap, DowngradeAtCap)
    }
    assert targets and targets <= set(names)  # every downgrade can be served

    capture = Capture()
    callbacks.append(capture)
    router = litellm.Router(model_list=config["model_list"])

    async def every_model() -> list[dict[str, Any]]:
        for name in names:
            await router.acompletion(model=name, messages=MESSAGES, user="user-000042")
        return await capture.wait_for(len(names))

    catalog = PriceCatalog.load()
    for kwargs in asyncio.run(every_model()):
        event = validate_event(usage_event_fields(kwargs["standard_logging_object"]))
        assert event.user_id == "user-000042" and event.input_tokens > 0
        assert catalog.lookup(event.requested_model, event.provider) is not None, event
        assert catalog.lookup(event.model, event.provider) is not None, event


def test_a_token_bound_over_the_contract_is_not_sent_to_the_worker(
    tmp_path: Path, callbacks: list[Any]
) -> None:
    admitter = FakeAdmitter(ALLOW)
    handler = admitting(tmp_path, admitter)
    pre_call(proxy_with(handler, callbacks), request(max_tokens=10_000, n=100_000), "a")
    assert admitter.asked == []  # 10^9 output tokens: the worker would dead-letter it
    assert handler.stats().unadmitted == 1
