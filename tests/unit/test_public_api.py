"""Each package's public surface, pinned: a name added or removed is a decision, made here.

And the light packages stay light: what a gateway imports (the contract and the producers)
loads no worker, storage or analytics library.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

PUBLIC: dict[str, list[str]] = {
    "schemas": [
        "AdmissionAnswer",
        "AdmissionRequest",
        "AlertRecord",
        "BoundedTime",
        "CreditDrawRecord",
        "CreditGrant",
        "DeadLetter",
        "DecodedEnforcement",
        "EARLIEST_TIME",
        "ENFORCEMENT_STATES",
        "EnforcementReason",
        "EnforcementRecord",
        "EnforcementStateName",
        "EventContext",
        "LATEST_TIME",
        "MAX_ATTRIBUTES",
        "MAX_CREDIT_GRANTS",
        "MAX_EVENT_BYTES",
        "MAX_LATENCY_MS",
        "MAX_POOL",
        "MAX_PRICE_PER_TOKEN",
        "MAX_RELEASE",
        "MAX_TOKENS",
        "MONEY_SCALE",
        "OverageRecord",
        "PlanPeriod",
        "PricedEvent",
        "REQUEST_PREFIX",
        "ReleaseRequest",
        "Rollup",
        "Subscription",
        "UsageEvent",
        "decode_answer",
        "decode_enforcement",
        "decode_event",
        "decode_request",
        "encode_answer",
        "encode_event",
        "encode_request",
        "event_from_obj",
        "event_json_schema",
        "from_anthropic_usage",
        "from_cloudevent",
        "from_openai_chat_usage",
        "from_openai_responses_usage",
        "oversize_reason",
        "pool_ids",
        "reply_partition",
        "service_tier_of",
        "topics",
    ],
    "producers": [
        "AdmissionTimeout",
        "Admitter",
        "AsyncUsageProducer",
        "CapGuard",
        "CompactedTopicView",
        "Decision",
        "DeliveryCallback",
        "DeliveryReport",
        "DiskSpool",
        "PRODUCER_DEFAULTS",
        "ProducerStats",
        "SpoolFullError",
        "SpoolIOError",
        "SpoolRecord",
        "SpoolStats",
        "Ticket",
        "UsageProducer",
        "encode_for_send",
        "encode_subscription",
        "grant_credit",
        "load_subscriptions",
        "producer_config",
        "publish_subscriptions",
        "read_subscription",
        "validate_event",
    ],
    "stream_processors": [
        "AlertRecord",
        "BatchResult",
        "CapEngine",
        "CapEvent",
        "CreditDrawRecord",
        "DEFAULT_GRACE_S",
        "DictState",
        "Effects",
        "EnforcementRecord",
        "InRecord",
        "LateUsage",
        "ModelPrice",
        "NO_PLAN",
        "OverageRecord",
        "PartitionedState",
        "Plan",
        "PlanCatalog",
        "PriceCatalog",
        "PricedRecord",
        "Quote",
        "RejectedEvent",
        "SAMPLE_PLANS",
        "UsageProcessor",
        "UserCapState",
        "VENDORED_CATALOG",
        "WindowUsage",
        "build_app",
        "faust_app",
        "input_lane",
        "late_segment",
        "load_plans",
        "parse_plans",
        "to_micros",
        "to_units",
        "units_to_decimal",
        "units_to_str",
    ],
    "sinks": [
        "Batch",
        "ChdbStore",
        "Columns",
        "Drained",
        "OwnerInfo",
        "PRICED_EVENTS",
        "QueryResult",
        "RemoteChdbStore",
        "SINK_TABLES",
        "ServerStore",
        "Sink",
        "SinkBuffer",
        "SinkCounters",
        "Store",
        "TableSpec",
        "check_read_only",
        "load_migrations",
        "open_store",
        "read_owner",
        "sink_topics",
        "warm_up",
    ],
    "spendstream": [
        "BackpressureError",
        "ConfigError",
        "DeliveryError",
        "InvalidEventError",
        "KafkaError",
        "LocalKafkaError",
        "ReadOnlyQueryError",
        "SpendstreamError",
        "StoreError",
        "StoreLockedError",
        "__version__",
    ],
}


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_the_public_surface_is_what_was_decided(package: str) -> None:
    module = importlib.import_module(package)
    assert sorted(module.__all__) == PUBLIC[package]
    for name in module.__all__:
        assert getattr(module, name) is not None, name  # every exported name resolves


HEAVY = ("faust", "aiokafka", "mode", "chdb", "clickhouse_connect", "plotly", "pyarrow", "litellm")


@pytest.mark.parametrize("package", ["schemas", "producers"])
def test_what_a_gateway_imports_loads_no_worker_or_storage_library(package: str) -> None:
    code = (
        "import sys\n"
        f"import {package}\n"
        f"from {package} import *\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert run.stdout.strip() == "[]", run.stdout
