"""Standard Webhooks signing and verification, checked against the spec's algorithm computed
here by hand (hmac + hashlib + base64), and the notification's identity and body."""

from __future__ import annotations

import base64
import hashlib
import hmac
import string
from typing import Any
from urllib.parse import unquote

import orjson
import pytest

from spendstream.errors import ConfigError, SpendstreamError
from spendstream.notify import WebhookVerificationError, sign, verify
from spendstream.notify.records import (
    alert_notification,
    enforcement_notification,
    notification,
    webhook_id,
)
from spendstream.notify.signing import secret_keys, signature
from spendstream.settings import NotifySettings, load_settings

# The example of the reference implementation's tests (standard-webhooks, libraries/python).
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TS = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

OTHER_SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()


def by_hand(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The spec, step by step: key = base64-decode(secret without whsec_), content =
    "{id}.{timestamp}.{body}", signature = "v1," + base64(HMAC-SHA256(key, content))."""
    key = base64.b64decode(secret[len("whsec_") :])
    content = msg_id.encode() + b"." + str(timestamp).encode() + b"." + body
    return "v1," + base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()


def test_the_spec_example_signs_to_its_published_signature() -> None:
    assert by_hand(SPEC_SECRET, SPEC_ID, SPEC_TS, SPEC_BODY) == SPEC_SIGNATURE
    headers = sign(secret_keys(SPEC_SECRET), SPEC_ID, SPEC_TS, SPEC_BODY)
    assert headers == {
        "webhook-id": SPEC_ID,
        "webhook-timestamp": str(SPEC_TS),
        "webhook-signature": SPEC_SIGNATURE,
    }
    assert verify(SPEC_SECRET, SPEC_BODY, headers, now=SPEC_TS) == {"test": 2432232314}


@pytest.mark.parametrize(
    ("msg_id", "timestamp", "body"),
    [
        ("a", 0, b""),
        ("user-1|pro%2Emonthly@2026-01-01T00:00:00Z|80", 1767225600, b'{"type":"x"}'),
        ("u%C3%A9|enforcement|7", 4102444799, '{"é": 1}'.encode()),
        ("x" * 500, 1, b"\x00\xff" * 100),
    ],
)
def test_signatures_match_the_algorithm_computed_by_hand(
    msg_id: str, timestamp: int, body: bytes
) -> None:
    for secret in (SPEC_SECRET, OTHER_SECRET):
        (key,) = secret_keys(secret)
        assert signature(key, msg_id, timestamp, body) == by_hand(secret, msg_id, timestamp, body)


def test_a_rotated_secret_signs_with_every_key_and_either_verifies() -> None:
    both = f"{OTHER_SECRET} {SPEC_SECRET}"
    headers = sign(secret_keys(both), SPEC_ID, SPEC_TS, SPEC_BODY)
    assert headers["webhook-signature"] == " ".join(
        by_hand(s, SPEC_ID, SPEC_TS, SPEC_BODY) for s in (OTHER_SECRET, SPEC_SECRET)
    )
    for secret in (SPEC_SECRET, OTHER_SECRET, both):
        assert verify(secret, SPEC_BODY, headers, now=SPEC_TS) == {"test": 2432232314}


def _headers(**changes: str | None) -> dict[str, str]:
    headers = {
        "webhook-id": SPEC_ID,
        "webhook-timestamp": str(SPEC_TS),
        "webhook-signature": SPEC_SIGNATURE,
    }
    for name, value in changes.items():
        key = name.replace("_", "-")
        if value is None:
            headers.pop(key)
        else:
            headers[key] = value
    return headers


@pytest.mark.parametrize(
    ("secret", "body", "headers", "now", "error"),
    [
        (SPEC_SECRET, SPEC_BODY, _headers(webhook_id=None), SPEC_TS, "missing"),
        (SPEC_SECRET, SPEC_BODY, _headers(webhook_timestamp=None), SPEC_TS, "missing"),
        (SPEC_SECRET, SPEC_BODY, _headers(webhook_signature=None), SPEC_TS, "missing"),
        (SPEC_SECRET, SPEC_BODY, _headers(webhook_timestamp="soon"), SPEC_TS, "not an integer"),
        (SPEC_SECRET, SPEC_BODY, _headers(), SPEC_TS + 301, "more than 300 s"),
        (SPEC_SECRET, SPEC_BODY, _headers(), SPEC_TS - 301, "more than 300 s"),
        (OTHER_SECRET, SPEC_BODY, _headers(), SPEC_TS, "no webhook-signature matches"),
        (SPEC_SECRET, b'{"test": 2432232315}', _headers(), SPEC_TS, "no webhook-signature"),
        (SPEC_SECRET, SPEC_BODY, _headers(webhook_id=SPEC_ID + "x"), SPEC_TS, "no webhook-sig"),
        # The timestamp is signed: moving it within the tolerance still fails.
        (SPEC_SECRET, SPEC_BODY, _headers(webhook_timestamp=str(SPEC_TS + 1)), SPEC_TS, "no webh"),
        # Only v1 counts: the same bytes labelled otherwise are not a v1 signature.
        (
            SPEC_SECRET,
            SPEC_BODY,
            _headers(webhook_signature="v1a," + SPEC_SIGNATURE[3:]),
            SPEC_TS,
            "no webhook-signature",
        ),
        (SPEC_SECRET, SPEC_BODY, _headers(webhook_signature="garbage"), SPEC_TS, "no webhook-"),
        ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", SPEC_BODY, _headers(), SPEC_TS, "start with whsec_"),
    ],
)
def test_verify_refuses(
    secret: str, body: bytes, headers: dict[str, str], now: int, error: str
) -> None:
    with pytest.raises(WebhookVerificationError, match=error) as caught:
        verify(secret, body, headers, now=now)
    assert isinstance(caught.value, SpendstreamError)


@pytest.mark.parametrize(
    ("headers", "now"),
    [
        (_headers(), SPEC_TS + 300),  # the edge of the tolerance
        (_headers(), SPEC_TS - 300),
        ({k.upper(): v for k, v in _headers().items()}, SPEC_TS),  # header names in any case
        (_headers(webhook_signature=f"v1,AAAA v2,xyz {SPEC_SIGNATURE}"), SPEC_TS),
    ],
)
def test_verify_accepts(headers: dict[str, str], now: int) -> None:
    assert verify(SPEC_SECRET, SPEC_BODY.decode(), headers, now=now) == {"test": 2432232314}


@pytest.mark.parametrize(
    ("secret", "error"),
    [
        ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "start with whsec_"),
        ("whsec_not*base64", "whsec_ \\+ base64"),
        ("whsec_" + base64.b64encode(b"x" * 23).decode(), "24 to 64 bytes, not 23"),
        ("whsec_" + base64.b64encode(b"x" * 65).decode(), "24 to 64 bytes, not 65"),
        (f"{SPEC_SECRET} whsec_", "24 to 64 bytes, not 0"),
        ("   ", "empty"),
    ],
)
def test_settings_refuse_malformed_secrets_without_printing_them(secret: str, error: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=error) as caught:
        NotifySettings(signing_secret=secret)  # type: ignore[arg-type]
    assert "MfKQ9r8G" not in str(caught.value)
    with pytest.raises(ValidationError, match="oncall"):
        NotifySettings(endpoint_secrets={"oncall": secret})  # type: ignore[dict-item]
    # What a user sees: one ConfigError naming the variable, never the value.
    with pytest.raises(ConfigError, match=error) as config_error:
        load_settings(notify={"endpoint_secrets": {"oncall": secret}})
    assert "SPENDSTREAM_NOTIFY__ENDPOINT_SECRETS: Value error, oncall: " in str(config_error.value)
    assert "MfKQ9r8G" not in str(config_error.value)


@pytest.mark.parametrize(
    ("identity", "expected"),
    [
        ("msg_p5jXN8AQM9LWM0D4loKWxJek", "msg_p5jXN8AQM9LWM0D4loKWxJek"),
        (
            "user-000042|monthly@2026-03-01T00:00:00Z|80",
            "user-000042|monthly@2026-03-01T00:00:00Z|80",
        ),
        (
            "u|pro.break_even@2026-03-01T00:00:00Z|100",
            "u|pro%2Ebreak_even@2026-03-01T00:00:00Z|100",
        ),
        ("a.b%2Ec", "a%2Eb%252Ec"),
        ("user é|enforcement|3", "user%20%C3%A9|enforcement|3"),
        ("line\r\nbreak\t", "line%0D%0Abreak%09"),
    ],
)
def test_webhook_ids_have_no_dot_are_header_safe_and_reversible(
    identity: str, expected: str
) -> None:
    got = webhook_id(identity)
    assert got == expected
    assert "." not in got
    assert set(got) <= set(string.ascii_letters + string.digits + "_-~|@:+=!$&'()*,;/%")
    assert unquote(got) == identity


ALERT: dict[str, Any] = {
    "alert_id": "user-1|monthly@2026-03-01T00:00:00Z|80",
    "kind": "threshold",
    "user_id": "user-1",
    "org_id": "org-1",
    "plan_id": "pro",
    "window": "monthly",
    "window_id": "monthly@2026-03-01T00:00:00Z",
    "window_kind": "billing_month",
    "unit": "usd",
    "threshold": 80,
    "usage": "16",
    "limit": "20",
    "window_start": "2026-03-01T00:00:00Z",
    "window_end": "2026-04-01T00:00:00Z",
    "event_id": "e-9",
    "event_time": "2026-03-12T10:00:00Z",
    "detected_at": "2026-03-12T10:00:00.5Z",
}
ENFORCEMENT: dict[str, Any] = {
    "user_id": "user-1",
    "org_id": "org-1",
    "plan_id": "pro",
    "state": "blocked",
    "reason": "cap",
    "window": "monthly",
    "window_id": "monthly@2026-03-01T00:00:00Z",
    "unit": "usd",
    "usage": "20.1",
    "limit": "20",
    "remaining": "0",
    "until": "2026-04-01T00:00:00Z",
    "downgrade_to": None,
    "as_of": "2026-03-12T11:00:00Z",
    "version": 3,
    "updated_at": "2026-03-12T11:00:00.2Z",
}


def test_an_alert_becomes_a_standard_webhooks_payload_with_its_id() -> None:
    made = notification("alerts", orjson.dumps(ALERT))
    assert (made.webhook_id, made.kind, made.type) == (
        ALERT["alert_id"],
        "threshold",
        "alert.threshold",
    )
    assert (made.user_id, made.org_id, made.plan_id) == ("user-1", "org-1", "pro")
    assert orjson.loads(made.body) == {
        "type": "alert.threshold",
        "timestamp": ALERT["detected_at"],
        "data": ALERT,
    }
    # The same record gives the same bytes: a redelivery is byte-for-byte the first one.
    assert notification("alerts", orjson.dumps(ALERT)).body == made.body
    broke = alert_notification({**ALERT, "kind": "break_even", "window": "pro.break_even"})
    assert broke.type == "alert.break_even" and broke.kind == "break_even"


def test_an_enforcement_change_is_identified_by_user_and_version() -> None:
    made = enforcement_notification(orjson.dumps(ENFORCEMENT))
    assert (made.webhook_id, made.kind, made.type) == (
        "user-1|enforcement|3",
        "enforcement",
        "enforcement.changed",
    )
    assert orjson.loads(made.body)["data"] == ENFORCEMENT
    later = enforcement_notification(orjson.dumps({**ENFORCEMENT, "version": 4, "state": "ok"}))
    assert later.webhook_id != made.webhook_id


@pytest.mark.parametrize(
    ("role", "value", "error"),
    [
        ("alerts", b"not json", "not JSON"),
        ("alerts", b"[1]", "JSON object"),
        ("alerts", orjson.dumps({**ALERT, "kind": "other"}), "unknown alert kind"),
        ("alerts", orjson.dumps({**ALERT, "alert_id": None}), "alert_id must be a string"),
        ("alerts", orjson.dumps({k: v for k, v in ALERT.items() if k != "plan_id"}), "plan_id"),
        ("enforcement", b"{", "unexpected end of data"),
        ("enforcement", orjson.dumps({**ENFORCEMENT, "state": "gone"}), "unknown enforcement"),
        ("enforcement", orjson.dumps({**ENFORCEMENT, "version": "3"}), "version must be an int"),
        ("enforcement", orjson.dumps({**ENFORCEMENT, "version": True}), "version must be an int"),
        ("enforcement", orjson.dumps({**ENFORCEMENT, "user_id": 5}), "user_id must be a string"),
    ],
)
def test_records_without_a_notification_are_refused(role: Any, value: bytes, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        notification(role, value)


def test_the_local_receiver_counts_once_per_id_and_refuses_forgeries() -> None:
    import time
    import urllib.error
    import urllib.request

    from spendstream.notify.receiver import LocalReceiver

    def post(url: str, body: bytes, headers: dict[str, str]) -> int:
        request = urllib.request.Request(url, body, headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    made = notification("alerts", orjson.dumps(ALERT))
    now = int(time.time())
    with LocalReceiver(SPEC_SECRET) as receiver:
        headers = sign(secret_keys(SPEC_SECRET), made.webhook_id, now, made.body)
        assert post(receiver.url, made.body, headers) == 204
        assert post(receiver.url, made.body, headers) == 204  # a redelivery: same id
        forged = sign(secret_keys(OTHER_SECRET), made.webhook_id, now, made.body)
        assert post(receiver.url, made.body, forged) == 401
        assert post(receiver.url, made.body + b" ", headers) == 401
        assert receiver.counts() == {"alert.threshold": 1}
        assert (receiver.repeats, receiver.refused) == (1, 2)
