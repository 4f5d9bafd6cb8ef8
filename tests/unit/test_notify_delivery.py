"""Notify delivery: what an answer means, the retry policy, one attempt against a real local
HTTP server, and the offset tracker that decides what may be committed."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import random
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import aiohttp
import pytest

from spendstream.notify.delivery import RetryPolicy, attempt, classify, parse_retry_after
from spendstream.notify.records import Notification
from spendstream.notify.routing import Endpoint
from spendstream.notify.service import OffsetTracker

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
KEY = base64.b64decode(SECRET.removeprefix("whsec_"))


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, "delivered"),
        (201, "delivered"),
        (202, "delivered"),
        (204, "delivered"),
        (299, "delivered"),
        (408, "retry"),  # request timeout: the receiver was slow
        (429, "retry"),  # rate limited
        (500, "retry"),
        (502, "retry"),
        (503, "retry"),
        (504, "retry"),
        (301, "retry"),  # redirects are failures (not followed), not a refusal of the content
        (302, "retry"),
        (307, "retry"),
        (100, "retry"),
        (400, "reject"),
        (401, "reject"),
        (403, "reject"),
        (404, "reject"),
        (409, "reject"),
        (410, "reject"),
        (413, "reject"),
        (422, "reject"),
        (499, "reject"),
    ],
)
def test_what_a_status_means(status: int, verdict: str) -> None:
    assert classify(status) == verdict


NOW = datetime(2026, 3, 12, 10, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("7", 7.0),
        (" 120 ", 120.0),
        ("-3", None),
        ("1.5", None),
        ("soon", None),
        (format_datetime(NOW + timedelta(seconds=30), usegmt=True), 30.0),
        (format_datetime(NOW - timedelta(seconds=30), usegmt=True), 0.0),
        ("Wed, 21 Oct 2015 07:28:00", None),  # no zone: unreadable, not guessed
    ],
)
def test_retry_after_in_seconds_or_as_a_date(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header, NOW.timestamp()) == expected


def test_backoff_is_exponential_with_jitter_and_bounded() -> None:
    policy = RetryPolicy(max_attempts=12, initial_s=0.5, max_s=20.0)
    rng = random.Random(7)
    for failed in range(1, 12):
        base = min(20.0, 0.5 * 2 ** (failed - 1))
        waits = [policy.delay(failed, rng) for _ in range(300)]
        assert all(base / 2 <= w <= base for w in waits), (failed, min(waits), max(waits))
        assert max(waits) - min(waits) > base / 4  # jittered, not a fixed schedule
    assert policy.delay(10_000, rng) <= 20.0  # no overflow far out


@pytest.mark.parametrize(
    ("failed", "retry_after", "low", "high"),
    [
        (1, None, 0.25, 0.5),
        (1, 3.0, 3.0, 3.0),  # the receiver asked for longer: honoured
        (1, 0.1, 0.25, 0.5),  # shorter: the backoff stands
        (1, 3600.0, 20.0, 20.0),  # never beyond retry_max_s
        (6, None, 8.0, 16.0),
    ],
)
def test_retry_after_lengthens_the_wait_up_to_the_bound(
    failed: int, retry_after: float | None, low: float, high: float
) -> None:
    policy = RetryPolicy(max_attempts=10, initial_s=0.5, max_s=20.0)
    rng = random.Random(1)
    for _ in range(50):
        assert low <= policy.delay(failed, rng, retry_after) <= high


# -- one attempt, against a real server on 127.0.0.1 --------------------------------------------


class Server:
    """Answers each POST with ``status`` (after ``delay_s``), recording what it got."""

    def __init__(self) -> None:
        self.status = 204
        self.delay_s = 0.0
        self.headers: dict[str, str] = {}
        self.extra: dict[str, str] = {}
        self.requests: list[tuple[dict[str, str], bytes]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                server.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                threading.Event().wait(server.delay_s)
                self.send_response(server.status)
                for name, value in server.extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/hook"

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


NOTE = Notification("u-1|m@2026-03-01T00:00:00Z|50", "threshold", "u-1", "o", "pro", b'{"a":1}')


def _attempt(url: str, timeout_s: float = 2.0) -> Any:
    endpoint = Endpoint("e", url, (KEY,), timeout_s, 1)

    async def go() -> Any:
        async with aiohttp.ClientSession() as session:
            return await attempt(session, endpoint, NOTE)

    return asyncio.run(go())


@pytest.mark.parametrize(
    ("status", "extra", "verdict", "retry_after"),
    [
        (204, {}, "delivered", None),
        (200, {}, "delivered", None),
        (503, {"Retry-After": "4"}, "retry", 4.0),
        (429, {}, "retry", None),
        (302, {"Location": "http://127.0.0.1:9/elsewhere"}, "retry", None),
        (400, {}, "reject", None),
        (410, {}, "reject", None),
    ],
)
def test_one_attempt_posts_the_signed_body_and_reads_the_answer(
    server: Server, status: int, extra: dict[str, str], verdict: str, retry_after: float | None
) -> None:
    server.status, server.extra = status, extra
    result = _attempt(server.url)
    assert (result.verdict, result.status, result.retry_after) == (verdict, status, retry_after)
    assert result.detail.startswith(f"HTTP {status}")
    ((headers, body),) = server.requests  # one request: a redirect is not followed
    assert body == NOTE.body
    assert headers["content-type"] == "application/json"
    assert headers["webhook-id"] == NOTE.webhook_id
    stamp = headers["webhook-timestamp"]
    assert abs(int(stamp) - datetime.now(UTC).timestamp()) < 5
    signed = f"{NOTE.webhook_id}.{stamp}.".encode() + body
    expected = base64.b64encode(hmac.new(KEY, signed, hashlib.sha256).digest()).decode()
    assert headers["webhook-signature"] == f"v1,{expected}"


def test_a_slow_receiver_times_out_and_a_closed_port_is_an_error(server: Server) -> None:
    server.delay_s = 1.0
    slow = _attempt(server.url, timeout_s=0.2)
    assert (slow.verdict, slow.status, slow.detail) == ("retry", None, "timeout after 0.2 s")
    url = server.url
    server.close()
    down = _attempt(url)
    assert (down.verdict, down.status) == ("retry", None)
    assert "/hook" not in down.detail  # where it failed is not said: URLs may carry tokens


# -- the offset tracker -------------------------------------------------------------------------

P0, P1 = ("alerts", 0), ("alerts", 1)


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        # read (offset, pending) / done offset, on P0 -> what may be committed
        ([("read", 0, True)], {P0: 0}),
        ([("read", 0, False)], {P0: 1}),
        ([("read", 0, True), ("done", 0)], {P0: 1}),
        ([("read", 0, True), ("read", 1, True), ("done", 1)], {P0: 0}),
        ([("read", 0, True), ("read", 1, True), ("done", 1), ("done", 0)], {P0: 2}),
        ([("read", 5, True), ("read", 9, False), ("done", 5)], {P0: 10}),  # gaps (compaction)
        ([("read", 5, True), ("read", 9, True), ("read", 12, False), ("done", 5)], {P0: 9}),
        ([("read", 3, False), ("read", 4, True), ("read", 7, False)], {P0: 4}),
        ([("done", 3)], {}),  # nothing read: nothing to commit
    ],
)
def test_the_committable_offset_is_the_lowest_pending_or_past_the_last_read(
    steps: list[tuple[Any, ...]], expected: dict[Any, int]
) -> None:
    tracker = OffsetTracker()
    for step in steps:
        if step[0] == "read":
            tracker.read(P0, step[1], pending=step[2])
        else:
            tracker.done(P0, step[1])
    assert tracker.committable() == expected


def test_the_tracker_commits_only_progress_and_forgets_revoked_partitions() -> None:
    tracker = OffsetTracker()
    tracker.read(P0, 0, pending=True)
    tracker.read(P1, 0, pending=False)
    assert tracker.committable() == {P0: 0, P1: 1}
    tracker.committed({P0: 0, P1: 1})
    assert tracker.committable() == {}
    assert tracker.pending() == 1 and tracker.pending([P1]) == 0
    tracker.done(P0, 0)
    assert tracker.committable([P0, P1]) == {P0: 1}
    tracker.forget([P0])
    assert tracker.committable() == {} and tracker.pending() == 0
    tracker.done(P0, 0)  # a late acknowledgement of a revoked partition changes nothing
    assert tracker.committable() == {}
