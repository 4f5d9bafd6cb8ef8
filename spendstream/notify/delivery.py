"""One delivery attempt over HTTP, what its answer means, and when to try again.

* ``2xx``: delivered.
* ``408``, ``429``, any other status (``3xx`` included: redirects are not followed, the spec
  asks senders to fail them), a timeout or a connection error: try again, up to
  ``max_attempts``.
* any other ``4xx``: the receiver refuses this notification; trying again would not change
  that, so it is given up at once (dead-lettered).

The wait before attempt ``n + 1`` is exponential with jitter: a uniform draw in
``[b/2, b]`` with ``b = min(retry_max_s, retry_initial_s * 2**(n-1))``, so a fleet of senders
that failed together does not retry together, and no wait exceeds ``retry_max_s``. A
``Retry-After`` (seconds or an HTTP date) lengthens the wait, never beyond ``retry_max_s``.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Literal

import aiohttp

from spendstream.notify.records import Notification
from spendstream.notify.routing import Endpoint
from spendstream.notify.signing import sign

Verdict = Literal["delivered", "retry", "reject"]

USER_AGENT = "spendstream-notify/1"


def classify(status: int) -> Verdict:
    """What an HTTP status means for a notification (see the module docstring)."""
    if 200 <= status < 300:
        return "delivered"
    if status in (408, 429) or not 400 <= status < 500:
        return "retry"
    return "reject"


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date); None if absent
    or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with jitter (see the module docstring)."""

    max_attempts: int
    initial_s: float
    max_s: float

    def delay(self, failed: int, rng: random.Random, retry_after: float | None = None) -> float:
        """Seconds to wait after ``failed`` (>= 1) failed attempts before the next one."""
        base = min(self.max_s, self.initial_s * 2.0 ** min(failed - 1, 64))
        wait = rng.uniform(base / 2, base)
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_s))
        return wait


@dataclass(frozen=True)
class Attempt:
    """The outcome of one POST."""

    verdict: Verdict
    status: int | None
    """The HTTP status; None when no answer came (timeout, connection error)."""
    detail: str
    """``HTTP 503 Service Unavailable``, ``timeout after 15 s``, ``connection refused ...``."""
    retry_after: float | None
    seconds: float


async def attempt(
    session: aiohttp.ClientSession, endpoint: Endpoint, notification: Notification
) -> Attempt:
    """POST ``notification`` to ``endpoint`` once, signed with the attempt's timestamp."""
    started = time.perf_counter()
    now = time.time()
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        **sign(list(endpoint.keys), notification.webhook_id, int(now), notification.body),
    }
    try:
        async with session.post(
            endpoint.url,
            data=notification.body,
            headers=headers,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=endpoint.timeout_s),
        ) as response:
            await response.read()
            status = response.status
            reason = response.reason or ""
            retry_after = parse_retry_after(response.headers.get("Retry-After"), time.time())
    except TimeoutError:
        return Attempt(
            "retry", None, f"timeout after {endpoint.timeout_s:g} s", None, _since(started)
        )
    except (aiohttp.ClientError, OSError) as exc:
        # The URL may carry a token: say what failed, never where.
        why = getattr(exc, "strerror", None)
        detail = f"{type(exc).__name__}: {why}" if why else type(exc).__name__
        return Attempt("retry", None, detail, None, _since(started))
    detail = f"HTTP {status} {reason}".rstrip()
    return Attempt(classify(status), status, detail, retry_after, _since(started))


def _since(started: float) -> float:
    return time.perf_counter() - started
