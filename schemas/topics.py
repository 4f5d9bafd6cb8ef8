"""Every Kafka topic name spendstream uses, in one place (docs/DESIGN.md, "Data flow").

Settings may rename them (``SPENDSTREAM_TOPICS__EVENTS=...``); these are the defaults. All topics
are keyed by ``user_id`` so that one user's events stay in order on one partition end to end.
"""

from __future__ import annotations

from typing import Final

EVENTS: Final = "usage.events"
"""Raw usage events from gateways (key = user_id)."""
PRICED: Final = "usage.priced"
"""Validated, deduplicated, priced events."""
ROLLUPS: Final = "usage.rollups"
"""Per (user, served model, window) rollups, re-emitted as upserts with a higher version."""
DLQ: Final = "usage.dlq"
"""Dead letters: the original bytes, the reason, and where they came from."""
ALERTS: Final = "usage.alerts"
"""Threshold alerts, once per (user, window instance, threshold)."""
OVERAGES: Final = "usage.overages"
"""Billable overage per event."""
ENFORCEMENT: Final = "usage.enforcement"
"""Compacted: the latest enforcement state per user, read by gateways."""
SUBSCRIPTIONS: Final = "usage.subscriptions"
"""Compacted: which user is on which plan since when."""
ADMISSIONS: Final = "usage.admissions"
"""Answers to admission requests, keyed by gateway (requests go to :data:`EVENTS`)."""
NOTIFY_DLQ: Final = "usage.notify.dlq"
"""Notifications ``spendstream notify`` could not deliver to an endpoint, with the reason."""

COMPACTED: Final = frozenset({ENFORCEMENT, SUBSCRIPTIONS})
