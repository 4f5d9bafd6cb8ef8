"""Caps: per-user window usage, threshold alerts, enforcement state, overage and credits.

Pure domain logic (docs/DESIGN.md, "Caps, alerts and enforcement"): no Kafka, no clock, no I/O.
One module per concept:

* ``windows``: window kinds and their bounds in the subscriber's time zone, rolling buckets;
* ``rules``: the plans catalog compiled to integers (:class:`~.rules.WindowRule`);
* ``state``: :class:`UserCapState`, what the engine remembers per user, and its serialized form
  (stored in the worker's ``caps`` table and changelog);
* ``thresholds``: threshold and break-even alerts;
* ``overage``: overage billing and prepaid credits;
* ``enforcement``: the user's enforcement state over the windows of their plan;
* ``effects``: what goes in (:class:`CapEvent`) and comes out (:class:`Effects`);
* ``engine``: :class:`CapEngine`, which routes each event through the above;
* ``stage``: :class:`CapStage`, what the worker runs per batch, and its :class:`CapOutputs`;
* ``reservations`` and ``admission``: admission before a model call (:meth:`CapEngine.admit`),
  its :class:`Estimate`, :class:`Admission` and the reservations held in the state (pure core,
  not wired into the worker or the gateways yet).

The records the engine emits (:class:`~schemas.AlertRecord`, :class:`~schemas.EnforcementRecord`,
:class:`~schemas.OverageRecord`, :class:`~schemas.CreditDrawRecord`) are part of the contract, in
:mod:`schemas`; they are re-exported here.
"""

from __future__ import annotations

from schemas import AlertRecord, CreditDrawRecord, EnforcementRecord, OverageRecord
from stream_processors.caps.effects import CapEvent, Effects, LateUsage, RejectedEvent, WindowUsage
from stream_processors.caps.engine import DEFAULT_GRACE_S, DEFAULT_RESERVATION_TTL_S, CapEngine
from stream_processors.caps.reservations import Admission, Estimate
from stream_processors.caps.stage import CapOutputs, CapStage, SubscriptionLookup, cap_event
from stream_processors.caps.state import UserCapState

__all__ = [
    "DEFAULT_GRACE_S",
    "DEFAULT_RESERVATION_TTL_S",
    "Admission",
    "AlertRecord",
    "CapEngine",
    "CapEvent",
    "CapOutputs",
    "CapStage",
    "CreditDrawRecord",
    "Effects",
    "EnforcementRecord",
    "Estimate",
    "LateUsage",
    "OverageRecord",
    "RejectedEvent",
    "SubscriptionLookup",
    "UserCapState",
    "WindowUsage",
    "cap_event",
]
