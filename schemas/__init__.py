"""The event contract of spendstream and the names of its topics.

See docs/DESIGN.md, "The event contract".

Importable without Kafka or ClickHouse: producers in any process can validate against it.
"""

from schemas import topics
from schemas._events import (
    EARLIEST_TIME,
    LATEST_TIME,
    MAX_ATTRIBUTES,
    MAX_EVENT_BYTES,
    MAX_LATENCY_MS,
    MAX_PRICE_PER_TOKEN,
    MAX_TOKENS,
    BoundedTime,
    UsageEvent,
    decode_event,
    encode_event,
    event_from_obj,
    event_json_schema,
)
from schemas._records import (
    MAX_CREDIT_GRANTS,
    MONEY_SCALE,
    CreditGrant,
    DeadLetter,
    PlanPeriod,
    PricedEvent,
    Rollup,
    Subscription,
)
from schemas.adapters import (
    EventContext,
    from_anthropic_usage,
    from_cloudevent,
    from_openai_chat_usage,
    from_openai_responses_usage,
    service_tier_of,
)

__all__ = [
    "EARLIEST_TIME",
    "LATEST_TIME",
    "MAX_ATTRIBUTES",
    "MAX_CREDIT_GRANTS",
    "MAX_EVENT_BYTES",
    "MAX_LATENCY_MS",
    "MAX_PRICE_PER_TOKEN",
    "MAX_TOKENS",
    "MONEY_SCALE",
    "BoundedTime",
    "CreditGrant",
    "DeadLetter",
    "EventContext",
    "PlanPeriod",
    "PricedEvent",
    "Rollup",
    "Subscription",
    "UsageEvent",
    "decode_event",
    "encode_event",
    "event_from_obj",
    "event_json_schema",
    "from_anthropic_usage",
    "from_cloudevent",
    "from_openai_chat_usage",
    "from_openai_responses_usage",
    "service_tier_of",
    "topics",
]
