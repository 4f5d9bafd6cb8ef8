"""Standard Webhooks signatures (https://www.standardwebhooks.com), symmetric scheme ``v1``.

A notification is an HTTP POST whose body is JSON and whose headers are

* ``webhook-id``: the notification's identity, the same on every attempt and every redelivery
  (receivers drop repeats by it);
* ``webhook-timestamp``: the attempt's time, integer unix seconds;
* ``webhook-signature``: ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``, one per
  signing secret, separated by spaces (several while a secret is rotated).

A secret is ``whsec_`` followed by the base64 of 24 to 64 random bytes; the HMAC key is those
bytes. This module uses the standard library only, so a receiver can call :func:`verify` (or copy
this file) without the rest of spendstream.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

from spendstream.errors import SpendstreamError

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
DEFAULT_TOLERANCE_S = 300
"""How far a timestamp may be from the receiver's clock (the spec's five minutes)."""


class WebhookVerificationError(SpendstreamError):
    """A received webhook is not authentic: a header missing, a stale time or no valid signature."""


def secret_keys(secret: str) -> list[bytes]:
    """The HMAC keys of ``secret``: one ``whsec_<base64>`` or several separated by spaces.

    ``ValueError`` (without the secret in the message) when one is malformed.
    """
    keys = []
    for part in secret.split():
        if not part.startswith("whsec_"):
            raise ValueError("a signing secret must start with whsec_")
        try:
            keys.append(base64.b64decode(part.removeprefix("whsec_"), validate=True))
        except binascii.Error:
            raise ValueError("a signing secret must be whsec_ + base64") from None
    if not keys:
        raise ValueError("a signing secret is empty")
    return keys


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64>``: the HMAC-SHA256 of ``{msg_id}.{timestamp}.{body}`` under ``key``."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def sign(keys: list[bytes], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers of one attempt, signed with every key."""
    return {
        ID_HEADER: msg_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: " ".join(signature(k, msg_id, timestamp, body) for k in keys),
    }


def verify(
    secret: str,
    body: bytes | str,
    headers: Mapping[str, str],
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> Any:
    """Check a received webhook and return its decoded JSON body.

    ``secret`` is the endpoint's ``whsec_...`` (or several, space-separated); ``body`` the raw
    bytes as received (never re-serialized JSON); ``headers`` the request headers (any case).
    Raises :class:`WebhookVerificationError` when a header is missing, the timestamp is further
    than ``tolerance_s`` from ``now`` (default: the clock), or no ``v1`` signature matches.
    Receivers should then drop a ``webhook-id`` they have already processed.
    """
    raw = body.encode() if isinstance(body, str) else body
    lower = {k.lower(): v for k, v in headers.items()}
    msg_id = lower.get(ID_HEADER)
    stamp = lower.get(TIMESTAMP_HEADER)
    sent = lower.get(SIGNATURE_HEADER)
    if not msg_id or not stamp or not sent:
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        timestamp = int(stamp)
    except ValueError:
        raise WebhookVerificationError(f"webhook-timestamp is not an integer: {stamp!r}") from None
    clock = time.time() if now is None else now
    if abs(clock - timestamp) > tolerance_s:
        raise WebhookVerificationError(
            f"webhook-timestamp {timestamp} is more than {tolerance_s:g} s from now"
        )
    try:
        keys = secret_keys(secret)
    except ValueError as exc:
        raise WebhookVerificationError(str(exc)) from None
    given = [part for part in sent.split() if part.startswith("v1,")]
    for key in keys:
        expected = signature(key, msg_id, timestamp, raw)
        if any(hmac.compare_digest(expected, candidate) for candidate in given):
            return json.loads(raw)
    raise WebhookVerificationError("no webhook-signature matches")
