"""Producers of usage events for gateways and services (docs/DESIGN.md, "Data flow").

``UsageProducer`` (threads) and ``AsyncUsageProducer`` (asyncio) validate every event against
the contract of :mod:`schemas`, key it by ``user_id`` and deliver it idempotently with
``acks=all``; with a spool (:class:`DiskSpool`) they write every event to a bounded local disk
log first, so a broker outage or a process restart loses nothing.
``Admitter`` reserves budget before a model call (a hard cap holds under concurrency; see
docs/DESIGN.md, "Admission (reservations)"). ``load_subscriptions`` reads and validates a
subscriptions file, ``publish_subscriptions`` feeds the compacted subscriptions topic,
``grant_credit`` adds prepaid credit to a user's record.
"""

from producers._admit import AdmissionTimeout, Admitter, Ticket
from producers._async import AsyncUsageProducer
from producers._config import PRODUCER_DEFAULTS, producer_config
from producers._guard import CapGuard, Decision
from producers._producer import (
    DeliveryCallback,
    DeliveryReport,
    ProducerStats,
    UsageProducer,
    encode_for_send,
    validate_event,
)
from producers._spool import DiskSpool, SpoolFullError, SpoolIOError, SpoolRecord, SpoolStats
from producers._subscriptions import (
    encode_subscription,
    grant_credit,
    load_subscriptions,
    publish_subscriptions,
    read_subscription,
)
from producers._view import CompactedTopicView

__all__ = [
    "PRODUCER_DEFAULTS",
    "AdmissionTimeout",
    "Admitter",
    "AsyncUsageProducer",
    "CapGuard",
    "CompactedTopicView",
    "Decision",
    "DeliveryCallback",
    "DeliveryReport",
    "DiskSpool",
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
]
