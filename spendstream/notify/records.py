"""From a record of the alerts or enforcement topic to the notification sent for it.

The body follows the Standard Webhooks payload structure: ``{"type", "timestamp", "data"}``
with ``data`` the record as the worker published it (schemas.AlertRecord or
schemas.EnforcementRecord) and ``timestamp`` the time the worker detected it. The body and the
``webhook-id`` depend on the record only, so every attempt and every redelivery (a retry, a
replay after a restart) sends the same bytes under the same id.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypedDict
from urllib.parse import quote

import orjson

from schemas import decode_enforcement

Kind = Literal["threshold", "break_even", "enforcement"]
"""What a notification is about: an alert of either kind, or an enforcement change."""
KINDS: tuple[Kind, ...] = ("threshold", "break_even", "enforcement")
EVENT_TYPES: dict[Kind, str] = {
    "threshold": "alert.threshold",
    "break_even": "alert.break_even",
    "enforcement": "enforcement.changed",
}
"""The body's ``type`` per kind (full-stop delimited, as the spec recommends)."""


@dataclass(frozen=True, slots=True)
class Notification:
    """One record made ready to send: who it is about, its identity and its exact body."""

    webhook_id: str
    kind: Kind
    user_id: str
    org_id: str
    plan_id: str
    body: bytes

    @property
    def type(self) -> str:
        """The body's ``type``: ``alert.threshold``, ``alert.break_even`` or
        ``enforcement.changed``."""
        return EVENT_TYPES[self.kind]


class NotifyDeadLetter(TypedDict):
    """A notification that could not be delivered to one endpoint (topic ``usage.notify.dlq``).

    ``payload`` is the body that was sent (so it can be replayed as is), ``reason`` why it was
    given up (``HTTP 400 ...`` at once, or ``retries exhausted ...`` with the last error).
    """

    webhook_id: str
    type: str
    endpoint: str
    reason: str
    status: int | None
    attempts: int
    source_topic: str
    source_partition: int
    source_offset: int
    payload: Any
    first_attempt_at: str
    dead_lettered_at: str


def webhook_id(identity: str) -> str:
    """``identity`` as a ``webhook-id``: printable ASCII, no ``.``, and reversible.

    The spec forbids ``.`` in the id (it delimits the signed content) and a header carries
    ASCII only, while alert ids hold plan names with dots and user ids of any characters. So
    every byte outside ``A-Z a-z 0-9 _ - ~ | @ : + = ! $ & ' ( ) * , ; /`` is percent-encoded
    (UTF-8), ``.`` and ``%`` included; ``urllib.parse.unquote`` gives the identity back.
    """
    return quote(identity, safe="|@:+=!$&'()*,;/").replace(".", "%2E")


def alert_notification(record: Any) -> Notification:
    """The notification of one alert record (``ValueError`` if it lacks what routing needs)."""
    if not isinstance(record, dict):
        raise ValueError("an alert record must be a JSON object")
    kind = record.get("kind")
    if kind not in ("threshold", "break_even"):
        raise ValueError(f"unknown alert kind {kind!r}")
    alert_id, user, org, plan, detected = (
        _text(record, name) for name in ("alert_id", "user_id", "org_id", "plan_id", "detected_at")
    )
    body = {"type": EVENT_TYPES[kind], "timestamp": detected, "data": record}
    return Notification(webhook_id(alert_id), kind, user, org, plan, orjson.dumps(body))


def enforcement_notification(value: bytes) -> Notification:
    """The notification of one enforcement record; its id is ``<user>|enforcement|<version>``.

    ``version`` grows by one with every record of a user, so (user, version) names one change,
    the key the enforcement_changes table is kept by as well.
    """
    decoded = decode_enforcement(value)  # the state and the fields a decision needs, checked
    record = decoded.record
    user, org, plan, updated = (
        _text(record, name) for name in ("user_id", "org_id", "plan_id", "updated_at")
    )
    version = record.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(f"bad enforcement record: version must be an integer, got {version!r}")
    body = {"type": EVENT_TYPES["enforcement"], "timestamp": updated, "data": record}
    ident = webhook_id(f"{user}|enforcement|{version}")
    return Notification(ident, "enforcement", user, org, plan, orjson.dumps(body))


def notification(role: Literal["alerts", "enforcement"], value: bytes) -> Notification:
    """The notification of a record of the ``alerts`` or ``enforcement`` topic.

    ``ValueError`` for a record that is not JSON or lacks an identity, a user, org or plan.
    """
    if role == "enforcement":
        return enforcement_notification(value)
    try:
        record = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    return alert_notification(record)


def _text(record: Mapping[str, Any], name: str) -> str:
    value = record.get(name)
    if not isinstance(value, str):
        raise ValueError(f"bad record: {name} must be a string, got {value!r}")
    return value
