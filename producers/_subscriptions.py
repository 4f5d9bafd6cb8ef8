"""Publishing plan subscriptions to the compacted subscriptions topic."""

from __future__ import annotations

from collections.abc import Iterable

import orjson

from producers._producer import UsageProducer
from schemas import Subscription
from spendstream.settings import Settings


def encode_subscription(sub: Subscription) -> bytes:
    """The wire form of a subscription record: compact JSON of its JSON-mode dump."""
    return orjson.dumps(sub.model_dump(mode="json"))


def publish_subscriptions(
    settings: Settings, subs: Iterable[Subscription], *, timeout_s: float = 60.0
) -> int:
    """Produce every subscription to ``settings.topics.subscriptions`` keyed by ``user_id``.

    Returns once all of them are acknowledged; raises :class:`DeliveryError` if any was not.
    The topic is compacted, so re-publishing a user's record replaces the previous one.
    """
    producer = UsageProducer(settings, topic=settings.topics.subscriptions)
    count = 0
    try:
        for sub in subs:
            producer.send_raw(sub.user_id, encode_subscription(sub))
            count += 1
    finally:
        producer.close(timeout_s)
    return count
