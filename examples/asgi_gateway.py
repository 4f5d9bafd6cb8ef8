"""A minimal AI gateway as a pure ASGI middleware: check the cap, call the model, meter the call.

No framework and no dependency beyond spendstream: :class:`CapGuardMiddleware` wraps any ASGI
app (FastAPI, Starlette, a bare callable) and, for every HTTP request,

1. reads the user from the ``x-user-id`` header and asks :class:`producers.CapGuard` (an
   in-memory lookup of the compacted enforcement topic, no network call): ``block`` answers
   ``429`` with the reason and ``Retry-After``; ``downgrade`` tells the app which cheaper model
   to serve (``scope["spendstream"]["model"]``);
2. calls the app, which calls the model (here :func:`model_app`, a stub) and reports the usage
   in ``scope["spendstream"]["usage"]``;
3. emits the usage event with :class:`producers.AsyncUsageProducer` without delaying the
   response (``wait=False``: delivery failures reach the producer's counters and log).

With an :class:`producers.Admitter` (``--admit``), step 1 reserves instead: the call's estimate
(the request's ``model`` and ``max_tokens``, with the prompt's size as input tokens) is held by
the worker that owns the user before the model is called, so concurrent requests cannot pass a
hard cap together; the usage event then carries the reservation id, which settles the hold.
CapGuard's check stays the answer for gateways that do not reserve.

Run it::

    python examples/asgi_gateway.py --help
    python examples/asgi_gateway.py --demo          # drives requests in-process
    python examples/asgi_gateway.py --demo --admit  # the same, each call reserved first
    uvicorn examples.asgi_gateway:app               # any ASGI server (reads SPENDSTREAM_*)

The demo needs a running broker (``spendstream kafka up``) and, to see users blocked, a running
worker (``spendstream worker``) on the sample plans: it subscribes a few users to the ``free``
plan (0.10 USD per rolling 5 hours, block at the cap) and sends them 0.026 USD requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from producers import Admitter, AsyncUsageProducer, CapGuard, publish_subscriptions
from schemas import PlanPeriod, Subscription
from spendstream.settings import Settings, load_settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def _json_response(
    send: Send, status: int, body: Any, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class CapGuardMiddleware:
    """Cap check before, usage event after, every HTTP request to ``app``."""

    def __init__(
        self,
        app: ASGIApp,
        guard: CapGuard,
        producer: AsyncUsageProducer,
        *,
        gateway: str = "asgi-example",
        org_id: str = "example-org",
        user_header: bytes = b"x-user-id",
        admitter: Admitter | None = None,
    ) -> None:
        self.app = app
        self.guard = guard
        self.admitter = admitter
        self.producer = producer
        self.gateway = gateway
        self.org_id = org_id
        self.user_header = user_header

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)  # lifespan, websockets: not metered here
            return
        user = dict(scope["headers"]).get(self.user_header, b"").decode()
        if not user:
            await _json_response(send, 401, {"error": "missing x-user-id"})
            return
        ctx: dict[str, Any] = {"user_id": user}
        if self.admitter is not None:
            body = await _read_body(receive)
            receive = _replay(body)
            request = json.loads(body or b"{}")
            ticket = await self.admitter.aadmit(
                user,
                self.org_id,
                str(request.get("model", "gpt-4o")),
                # What the call may use at most: the caller's limits (a real gateway would
                # count the prompt's tokens); the usage must stay within them.
                input_tokens=int(request.get("max_input_tokens", 10_000)),
                output_tokens=int(request.get("max_tokens", 100)),
            )
            if not ticket.allowed:
                retry = (
                    [(b"retry-after", str(max(1, ticket.retry_after - int(time.time()))).encode())]
                    if ticket.retry_after is not None
                    else []
                )
                await _json_response(
                    send,
                    429,
                    {
                        "error": "usage cap reached",
                        "reason": ticket.reason,
                        "window": ticket.window,
                    },
                    retry,
                )
                return
            ctx["model"] = ticket.model if ticket.action == "downgrade" else None
            ctx["reservation_id"] = ticket.reservation_id
        else:
            decision = self.guard.check(user)  # microseconds: a dict lookup
            if decision.action == "block":
                retry = (
                    [
                        (
                            b"retry-after",
                            str(max(1, math.ceil(decision.until - time.time()))).encode(),
                        )
                    ]
                    if decision.until is not None
                    else []
                )
                await _json_response(
                    send,
                    429,
                    {
                        "error": "usage cap reached",
                        "reason": decision.reason,
                        "window": decision.window,
                        "until": decision.record.get("until") if decision.record else None,
                    },
                    retry,
                )
                return
            ctx["model"] = decision.model
        started = time.monotonic()
        await self.app({**scope, "spendstream": ctx}, receive, send)
        usage = ctx.get("usage")
        if usage is None:
            return  # the app did not call a model
        await self.producer.send(
            {
                "event_id": str(uuid.uuid4()),
                "occurred_at": datetime.now(UTC).isoformat(),
                "org_id": self.org_id,
                "user_id": user,
                "gateway": self.gateway,
                "latency_ms": int((time.monotonic() - started) * 1000),
                **({"reservation_id": ctx["reservation_id"]} if "reservation_id" in ctx else {}),
                **usage,
            },
            wait=False,
        )


async def _read_body(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += bytes(message.get("body", b""))
        if not message.get("more_body"):
            return body


def _replay(body: bytes) -> Receive:
    """A ``receive`` that hands the already-read body to the app again."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def model_app(scope: Scope, receive: Receive, send: Send) -> None:
    """A stub model endpoint: ``POST {"model": ..., "prompt": ...}`` -> a canned completion.

    It serves the downgrade model when the middleware asks for one, and reports usage (10,000
    input tokens, 100 output tokens per call) in ``scope["spendstream"]["usage"]``.
    """
    request = json.loads(await _read_body(receive) or b"{}")
    requested = str(request.get("model", "gpt-4o"))
    ctx = scope.get("spendstream", {})
    served = ctx.get("model") or requested
    await asyncio.sleep(0.001)  # "the model"
    ctx["usage"] = {
        "requested_model": requested,
        "served_model": served,
        "provider": "openai",
        "input_tokens": 10_000,
        "output_tokens": 100,
    }
    await _json_response(send, 200, {"model": served, "output": "Hello from the stub model."})


def build_gateway(
    guard: CapGuard, producer: AsyncUsageProducer, admitter: Admitter | None = None
) -> ASGIApp:
    """The stub model behind the cap middleware (reserving first when given an admitter)."""
    return CapGuardMiddleware(model_app, guard, producer, admitter=admitter)


class _LazyApp:
    """``uvicorn examples.asgi_gateway:app``: guard and producer built at lifespan startup."""

    def __init__(self) -> None:
        self._inner: ASGIApp | None = None
        self._guard: CapGuard | None = None
        self._producer: AsyncUsageProducer | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    settings = load_settings()
                    self._guard = await CapGuard(settings).astart()
                    self._producer = AsyncUsageProducer(settings)
                    self._inner = build_gateway(self._guard, self._producer)
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if self._producer is not None:
                        await self._producer.close()
                    if self._guard is not None:
                        await self._guard.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if self._inner is None:
            await _json_response(send, 503, {"error": "starting"})
            return
        await self._inner(scope, receive, send)


app = _LazyApp()


async def call(
    asgi: ASGIApp, user: str, body: dict[str, Any]
) -> tuple[int, dict[str, Any], dict[bytes, bytes]]:
    """One in-process HTTP request (no server): status, JSON body and headers."""
    raw = json.dumps(body).encode()
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(b"x-user-id", user.encode()), (b"content-type", b"application/json")],
    }
    sent = False
    out: dict[str, Any] = {"body": b""}

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
            out["headers"] = dict(message["headers"])
        else:
            out["body"] += message.get("body", b"")

    await asgi(scope, receive, send)
    return out["status"], json.loads(out["body"]), out["headers"]


async def demo(
    settings: Settings, users: int, requests: int, pause_s: float, admit: bool = False
) -> int:
    """Subscribe ``users`` demo users to the free plan and drive requests through the gateway.

    With ``admit``, each user's requests go at once (a concurrent burst) through a gateway that
    reserves first: only as many as the budget holds are served.
    """
    from spendstream.kafka_admin import ensure_topics

    ensure_topics(settings)
    now = datetime.now(UTC)
    tag = uuid.uuid4().hex[:6]
    names = [f"demo-{tag}-{i}" for i in range(users)]
    publish_subscriptions(
        settings,
        [
            Subscription(
                user_id=u,
                org_id="example-org",
                billing_anchor=now - timedelta(days=1),
                plans=[PlanPeriod(plan_id="free", effective_at=now - timedelta(days=1))],
            )
            for u in names
        ],
    )
    print(f"subscribed {users} users to the 'free' plan (0.10 USD / rolling 5 h, block)")
    if admit:
        return await _admit_demo(settings, names, requests)
    async with CapGuard(settings) as guard, AsyncUsageProducer(settings) as producer:
        gateway = build_gateway(guard, producer)
        blocked = 0
        for n in range(requests):
            for user in names:
                status, body, _ = await call(gateway, user, {"model": "gpt-4o", "prompt": "hi"})
                d = guard.check(user)
                blocked += status == 429
                detail = body.get("reason") if status == 429 else body.get("model")
                print(f"#{n:<3} {user:<18} {status}  {detail:<10} guard: {d.action}/{d.state}")
            await producer.flush()
            await asyncio.sleep(pause_s)  # let the worker price, cap and publish
        print(
            f"{blocked} requests refused; guard holds {len(guard)} users, "
            f"staleness {guard.staleness_s() or 0:.2f} s"
        )
        if blocked == 0:
            print("nobody was blocked: is `spendstream worker` running on the sample plans?")
    return 0


async def _admit_demo(settings: Settings, names: list[str], requests: int) -> int:
    body = {"model": "gpt-4o", "prompt": "hi", "max_input_tokens": 10_000, "max_tokens": 100}
    async with (
        CapGuard(settings) as guard,
        AsyncUsageProducer(settings) as producer,
        Admitter(settings) as admitter,
    ):
        gateway = build_gateway(guard, producer, admitter)
        for user in names:
            results = await asyncio.gather(*(call(gateway, user, body) for _ in range(requests)))
            served = sum(status == 200 for status, _, _ in results)
            print(
                f"{user:<18} {requests} concurrent requests: {served} served, "
                f"{requests - served} refused (0.026 USD each, 0.10 USD allowed)"
            )
        await producer.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line: ``--demo`` runs the in-process demo (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description="A minimal ASGI gateway middleware over spendstream's CapGuard.",
        epilog="Settings come from SPENDSTREAM_* variables; see spendstream/settings.py.",
    )
    parser.add_argument("--demo", action="store_true", help="drive requests in-process")
    parser.add_argument("--bootstrap", help="Kafka bootstrap servers (default: settings)")
    parser.add_argument("--users", type=int, default=2, help="demo users (default 2)")
    parser.add_argument("--requests", type=int, default=8, help="requests per user (default 8)")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between rounds")
    parser.add_argument(
        "--admit",
        action="store_true",
        help="reserve each call first (Admitter): a concurrent burst cannot pass the cap",
    )
    args = parser.parse_args(argv)
    if not args.demo:
        parser.print_help()
        return 0
    overrides: dict[str, Any] = {}
    if args.bootstrap:
        overrides["kafka"] = {"bootstrap_servers": args.bootstrap}
    settings = load_settings(**overrides)
    return asyncio.run(demo(settings, args.users, args.requests, args.pause, args.admit))


if __name__ == "__main__":
    raise SystemExit(main())
