"""The LiteLLM plug-in on the real broker with the real worker.

Calls made through LiteLLM (offline: mocked responses, LiteLLM's bundled price map) are logged
by the plug-in as usage events; they land on the broker and the worker (``spendstream worker``,
a child process) prices them to exactly what the catalog gives for the same tokens. The
pre-call hook, run by LiteLLM's proxy hook machinery, enforces enforcement records read from
the topic the worker publishes them to.
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer
from pipeline_support import read_topic

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
litellm = pytest.importorskip(
    "litellm", reason="the LiteLLM plug-in needs the litellm extra (pip install -e '.[litellm]')"
)
pytest.importorskip(
    "fastapi", reason="LiteLLM's proxy hooks need fastapi, backoff and redis (the proxy's extras)"
)

from fastapi import HTTPException  # noqa: E402
from litellm import ModelResponse  # noqa: E402
from litellm.caching.dual_cache import DualCache  # noqa: E402
from litellm.proxy._types import ProxyException, UserAPIKeyAuth  # noqa: E402
from litellm.proxy.common_request_processing import ProxyBaseLLMRequestProcessing  # noqa: E402
from litellm.proxy.utils import ProxyLogging  # noqa: E402
from litellm.types.utils import (  # noqa: E402
    CacheCreationTokenDetails,
    CompletionTokensDetailsWrapper,
    PromptTokensDetailsWrapper,
    ServerToolUse,
    Usage,
)

from producers.litellm import SpendstreamLogger  # noqa: E402
from schemas import UsageEvent, decode_event  # noqa: E402
from spendstream.kafka_admin import ensure_topics  # noqa: E402
from spendstream.runner import WorkerProcess  # noqa: E402
from spendstream.settings import Settings  # noqa: E402
from stream_processors import PriceCatalog, units_to_decimal  # noqa: E402

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "hello"}]


def events_on(settings: Settings, count: int, timeout_s: float = 30.0) -> list[UsageEvent]:
    """The usage events on the events topic, once there are ``count`` of them."""
    deadline = time.monotonic() + timeout_s
    while True:
        values = [v for _, _, v in read_topic(settings, settings.topics.events)]
        if len(values) >= count or time.monotonic() > deadline:
            return [decode_event(v) for v in values]
        time.sleep(0.2)


def priced_on(
    settings: Settings, count: int, worker: WorkerProcess, timeout_s: float = 120.0
) -> list[dict[str, Any]]:
    """The worker's priced events, once there are ``count`` of them."""
    deadline = time.monotonic() + timeout_s
    while True:
        worker.check_alive()
        records = [orjson.loads(v) for _, _, v in read_topic(settings, settings.topics.priced) if v]
        if len(records) >= count:
            return records
        if time.monotonic() > deadline:
            log = worker.log_path.read_text(errors="replace")[-3000:]
            pytest.fail(f"{len(records)} of {count} events priced\n--- worker log ---\n{log}")
        time.sleep(0.5)


def test_calls_through_litellm_are_priced_by_the_worker_as_the_catalog_prices_them(
    make_settings: Any, tmp_path: Path, callbacks: list[Any]
) -> None:
    settings = make_settings(processor={"batch_within_s": 0.05})
    ensure_topics(settings)
    handler = SpendstreamLogger(settings)
    callbacks.append(handler)
    who = {"user_api_key_user_id": "alice", "user_api_key_org_id": "org-acme"}

    openai = ModelResponse(
        model="gpt-4o",
        choices=[{"message": {"role": "assistant", "content": "hi"}}],
        usage=Usage(
            prompt_tokens=1_000,
            completion_tokens=300,
            total_tokens=1_300,
            prompt_tokens_details=PromptTokensDetailsWrapper(cached_tokens=400),
            completion_tokens_details=CompletionTokensDetailsWrapper(reasoning_tokens=200),
        ),
    )
    anthropic = ModelResponse(  # LiteLLM's shape of an Anthropic answer: the whole input
        model="claude-sonnet-4-5",
        choices=[{"message": {"role": "assistant", "content": "hi"}}],
        usage=Usage(
            prompt_tokens=12_000,
            completion_tokens=700,
            total_tokens=12_700,
            prompt_tokens_details=PromptTokensDetailsWrapper(
                cached_tokens=6_000,
                cache_creation_tokens=4_000,
                cache_creation_token_details=CacheCreationTokenDetails(
                    ephemeral_5m_input_tokens=1_000, ephemeral_1h_input_tokens=3_000
                ),
            ),
            completion_tokens_details=CompletionTokensDetailsWrapper(reasoning_tokens=300),
            server_tool_use=ServerToolUse(web_search_requests=2),
        ),
    )

    async def calls() -> None:
        await litellm.acompletion(
            model="gpt-4o", messages=MESSAGES, mock_response=openai, metadata=who
        )
        await litellm.acompletion(
            model="anthropic/claude-sonnet-4-5",
            messages=MESSAGES,
            mock_response=anthropic,
            metadata=who,
        )
        stream = await litellm.acompletion(
            model="gpt-4o-mini",
            messages=MESSAGES,
            mock_response="a streamed answer of a few tokens",
            stream=True,
            metadata=who,
        )
        async for _ in stream:
            pass
        with pytest.raises(litellm.exceptions.InternalServerError):
            await litellm.acompletion(
                model="gpt-4o", messages=MESSAGES, mock_response=Exception("down"), metadata=who
            )
        deadline = time.monotonic() + 20
        while handler.stats().sent < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    try:
        asyncio.run(calls())
        assert handler.flush(30) == 0
    finally:
        handler.close()
    stats = handler.stats()
    assert (stats.sent, stats.invalid, stats.dropped) == (4, 0, 0), stats

    events = {(e.served_model, e.status): e for e in events_on(settings, 4)}
    assert len(events) == 4, events
    ok = events["gpt-4o", "ok"]
    assert (ok.input_tokens, ok.cached_input_tokens, ok.output_tokens, ok.reasoning_tokens) == (
        1_000,
        400,
        300,
        200,
    )
    assert (ok.user_id, ok.org_id, ok.gateway, ok.provider) == (
        "alice",
        "org-acme",
        "litellm",
        "openai",
    )
    claude = events["claude-sonnet-4-5", "ok"]
    assert claude.provider == "anthropic"
    assert (
        claude.input_tokens,
        claude.cached_input_tokens,
        claude.cache_write_tokens,
        claude.cache_write_1h_tokens,
        claude.output_tokens,
        claude.reasoning_tokens,
        claude.web_search_requests,
    ) == (12_000, 6_000, 4_000, 3_000, 700, 300, 2)
    assert events["gpt-4o-mini", "ok"].output_tokens > 0
    assert events["gpt-4o", "error"].input_tokens == 0

    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        priced = {r["event_id"]: r for r in priced_on(settings, 4, worker)}
    finally:
        worker.stop()
    catalog = PriceCatalog.load()
    for event in events.values():
        record, quote = priced[event.event_id], catalog.quote(event)
        assert Decimal(record["cost"]) == units_to_decimal(quote.cost), event
        assert Decimal(record["list_value"]) == units_to_decimal(quote.list_value), event
        assert not record["unknown_model"], event
    assert Decimal(priced[claude.event_id]["saved_prompt_cache"]) != 0  # reads and writes priced
    assert Decimal(priced[ok.event_id]["cost"]) > 0


def publish_enforcement(settings: Settings, records: dict[str, dict[str, Any]]) -> None:
    """Enforcement records keyed by user, on the compacted topic, as the worker publishes them."""
    producer = Producer(settings.kafka.confluent_config())
    for user, record in records.items():
        producer.produce(settings.topics.enforcement, orjson.dumps(record), user.encode())
    assert producer.flush(30) == 0


def enforcement(user: str, state: str, until: datetime, **kw: Any) -> dict[str, Any]:
    """A schemas.EnforcementRecord of ``user``."""
    stamp = until.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "user_id": user, "org_id": "org-acme", "plan_id": "pro", "state": state,
        "reason": "cap", "window": "pro.daily", "window_id": f"pro.daily|{stamp[:10]}",
        "unit": "usd", "usage": "5", "limit": "5", "remaining": "0", "until": stamp,
        "downgrade_to": None, "as_of": stamp, "version": 1, "updated_at": stamp, **kw,
    }  # fmt: skip


def test_the_pre_call_hook_enforces_the_records_on_the_enforcement_topic(
    make_settings: Any, callbacks: list[Any]
) -> None:
    settings = make_settings()
    ensure_topics(settings)
    until = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=10)
    publish_enforcement(
        settings,
        {
            "blocked-user": enforcement("blocked-user", "blocked", until),
            "thrifty-user": enforcement(
                "thrifty-user", "downgrade", until, downgrade_to="gpt-4o-mini"
            ),
        },
    )
    handler = SpendstreamLogger(settings)
    callbacks.append(handler)
    proxy = ProxyLogging(user_api_key_cache=DualCache())

    def pre_call(user: str) -> dict[str, Any]:
        key = UserAPIKeyAuth(api_key="88dc28d0", user_id=user, org_id="org-acme")
        data = {"model": "gpt-4o", "messages": MESSAGES, "metadata": {}}
        return asyncio.run(
            proxy.pre_call_hook(user_api_key_dict=key, data=data, call_type="acompletion")
        )

    try:
        with pytest.raises(HTTPException) as raised:
            pre_call("blocked-user")  # the first check reads the topic to its end first
        assert raised.value.status_code == 429
        retry_after = int(raised.value.headers["Retry-After"])
        assert 0 <= retry_after - (until - datetime.now(UTC)).total_seconds() < 3
        key = UserAPIKeyAuth(api_key="88dc28d0", user_id="blocked-user")
        with pytest.raises(ProxyException) as answered:
            asyncio.run(
                ProxyBaseLLMRequestProcessing(data={"model": "gpt-4o"}).handle_llm_api_exception(
                    raised.value, key, proxy
                )
            )
        assert answered.value.code == "429"
        assert answered.value.headers["Retry-After"] == str(retry_after)

        data = pre_call("thrifty-user")
        assert data["model"] == "gpt-4o-mini"
        assert pre_call("someone-else")["model"] == "gpt-4o"

        # the downgraded request, served: its event names the model asked for and the one served
        async def serve() -> None:
            await litellm.acompletion(**data, mock_response="served by the cheaper model")
            while handler.stats().sent < 1:
                await asyncio.sleep(0.05)

        data["metadata"].update(user_api_key_user_id="thrifty-user")
        asyncio.run(asyncio.wait_for(serve(), 20))
        assert handler.flush(30) == 0
        (event,) = events_on(settings, 1)
        assert (event.user_id, event.requested_model, event.served_model) == (
            "thrifty-user",
            "gpt-4o",
            "gpt-4o-mini",
        )

        # the worker lifts the block (a top-up, a new day): the guard follows the topic live
        publish_enforcement(
            settings,
            {"blocked-user": enforcement("blocked-user", "ok", until, reason="ok", version=2)},
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                assert pre_call("blocked-user")["model"] == "gpt-4o"
                break
            except HTTPException:
                assert time.monotonic() < deadline, "the lifted block was not seen"
                time.sleep(0.1)
        assert handler.stats().blocked >= 1 and handler.stats().downgraded == 1
    finally:
        handler.close()
