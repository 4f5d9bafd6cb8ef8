"""A webhook receiver on 127.0.0.1 that verifies, deduplicates and counts, and the notify
service wired to it (what ``spendstream demo`` shows of notifications).

It shows the receiving side of the contract: check the signature on the raw body
(:func:`~spendstream.notify.signing.verify`), answer 401 when it fails, and keep one
notification per ``webhook-id`` (a redelivery after a restart repeats the id).
"""

from __future__ import annotations

import base64
import os
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pydantic import SecretStr

from spendstream.notify.records import EVENT_TYPES
from spendstream.notify.signing import ID_HEADER, WebhookVerificationError, verify
from spendstream.settings import NotifyEndpoint, NotifyRoute, Settings


class LocalReceiver:
    """An HTTP server in a daemon thread; :meth:`close` stops it."""

    def __init__(self, secret: str, *, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen at once on ``host:port`` (0: a free port) for notifications signed with
        ``secret``."""
        self.secret = secret
        self.by_type: Counter[str] = Counter()
        self.ids: set[str] = set()
        self.repeats = 0
        self.refused = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="notify-receiver", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        """Where to POST: ``http://127.0.0.1:<port>/hooks``."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/hooks"

    def counts(self) -> dict[str, int]:
        """Distinct notifications received per body ``type``."""
        with self._lock:
            return dict(self.by_type)

    def _take(self, body: bytes, headers: dict[str, str]) -> int:
        try:
            payload = verify(self.secret, body, headers)
        except WebhookVerificationError:
            with self._lock:
                self.refused += 1
            return 401
        with self._lock:
            msg_id = headers[ID_HEADER]
            if msg_id in self.ids:
                self.repeats += 1
            else:
                self.ids.add(msg_id)
                self.by_type[str(payload.get("type"))] += 1
        return 204

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                self.send_response(receiver._take(body, headers))
                self.send_header("Content-Length", "0")
                self.end_headers()

        return Handler

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> LocalReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalNotify:
    """The notify service in a thread, delivering every kind to a :class:`LocalReceiver`
    (``spendstream demo`` with notifications): start, :meth:`drain`, :meth:`summary`,
    :meth:`close`."""

    def __init__(self, settings: Settings, *, group_id: str) -> None:
        """Start the receiver and notify (one endpoint ``local``, a fresh secret)."""
        from spendstream.notify.service import NotifyService

        secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
        self.receiver = LocalReceiver(secret)
        notify = settings.notify.model_copy(
            update={
                "group_id": group_id,
                "routes_file": None,
                "endpoints": [NotifyEndpoint(name="local", url=SecretStr(self.receiver.url))],
                "routes": [NotifyRoute(endpoints=["local"])],
                "signing_secret": SecretStr(secret),
                "endpoint_secrets": {},
            }
        )
        self.settings = settings.model_copy(update={"notify": notify})
        self.service = NotifyService(self.settings)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self.service.run, args=(self._stop,), name="notify", daemon=True
        )
        self._thread.start()

    def drain(self, timeout_s: float) -> None:
        """Wait until every record on the alerts and enforcement topics is delivered (and
        committed)."""
        from spendstream.runner import wait_for_lag_zero

        runner = self.service.runners["local"]
        wait_for_lag_zero(self.settings, runner.group_id, list(runner.topics), timeout_s)

    def summary(self) -> str:
        """One line: notifications per type, where they went, what was refused or repeated."""
        counts = self.receiver.counts()
        kinds = ", ".join(f"{counts.get(t, 0)} {t}" for t in EVENT_TYPES.values())
        return (
            f"notifications to {self.receiver.url} (signed, verified): {kinds}; "
            f"{self.receiver.repeats} repeat(s) dropped by webhook-id, "
            f"{self.receiver.refused} refused"
        )

    def close(self) -> None:
        """Stop notify (committing what was delivered) and the receiver."""
        self._stop.set()
        self._thread.join(timeout=60)
        self.receiver.close()
