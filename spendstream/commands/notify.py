"""``spendstream notify``: alerts and enforcement changes to HTTP endpoints (signed webhooks)."""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

import typer

from spendstream.commands._common import console, fail_on, settings_or_exit
from spendstream.errors import SpendstreamError


def _serve_metrics(settings: Any, service: Any) -> list[Callable[[], None]]:
    """``/metrics`` + ``/health`` and one lag probe per endpoint group, if a port is set."""
    port = settings.notify.metrics_port
    if not port:
        return []
    from spendstream import metrics

    conf = settings.kafka.confluent_config()
    probes = {
        name: metrics.LagProbe(conf, runner.group_id, list(runner.topics))
        for name, runner in service.runners.items()
    }

    def health() -> dict[str, Any]:
        report = service.health()
        for name, probe in probes.items():
            endpoint = report["details"]["endpoints"][name]
            endpoint["lag"] = probe.total
            if probe.error is not None:
                endpoint["kafka_error"] = probe.error
            if not probe.ok():
                report["ok"] = False
        return dict(report)

    server = metrics.serve(port, health)
    console.print(f"metrics on {server.url}/metrics, health on {server.url}/health")
    return [server.close, *(p.close for p in probes.values())]


def register(app: typer.Typer) -> None:
    """Add the ``notify`` command."""

    @app.command("notify")
    def notify(
        check: bool = typer.Option(
            False, "--check", help="Check the settings and routes, print the routes and exit."
        ),
    ) -> None:
        """Deliver threshold and break-even alerts and enforcement changes to HTTP endpoints.

        Runs until SIGTERM/SIGINT. Each endpoint has its own consumer group
        (<notify.group_id>.<endpoint>): a notification is POSTed as a Standard Webhook
        (webhook-id, webhook-timestamp, webhook-signature), retried with backoff, and
        dead-lettered to the notify dead-letter topic when refused (a 4xx other than 408/429)
        or when its attempts run out; offsets are committed once delivered or dead-lettered.
        Endpoints and routes come from SPENDSTREAM_NOTIFY__ROUTES_FILE (YAML) or
        SPENDSTREAM_NOTIFY__ENDPOINTS / __ROUTES; secrets from SPENDSTREAM_NOTIFY__SIGNING_SECRET
        or SPENDSTREAM_NOTIFY__ENDPOINT_SECRETS__<NAME>.
        """
        from spendstream.notify.routing import load_routes

        settings = settings_or_exit()
        try:
            table = load_routes(settings)
        except SpendstreamError as exc:
            fail_on(exc)
        for name, endpoint in table.endpoints.items():
            kinds = sorted(table.kinds_for(name))
            console.print(
                f"endpoint {name}: {', '.join(kinds)} (timeout {endpoint.timeout_s:g} s, "
                f"{endpoint.concurrency} in flight)",
                highlight=False,
            )
        if check:
            console.print(f"{len(table.endpoints)} endpoint(s), {len(table.routes)} route(s): ok")
            return
        if not logging.getLogger().handlers:
            logging.basicConfig(
                level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
            )
        if settings.log_level != "DEBUG":
            # aiokafka narrates every group join at INFO, and logs the coordinator a young
            # broker has not elected yet at ERROR although it asks again at once.
            kafka_log = logging.getLogger("aiokafka")
            kafka_log.setLevel(logging.WARNING)
            logging.getLogger("aiokafka.consumer.group_coordinator").addFilter(
                lambda record: "GroupCoordinatorNotAvailable" not in record.getMessage()
            )
        from spendstream.notify.service import NotifyService

        stop = threading.Event()

        def _on_signal(signum: int, frame: Any) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        try:
            service = NotifyService(settings, table)
            closers = _serve_metrics(settings, service)
            console.print(
                f"notify: {settings.topics.alerts}, {settings.topics.enforcement} -> "
                f"{len(table.endpoints)} endpoint(s); dead letters to "
                f"{settings.topics.notify_dlq}; Ctrl-C to stop"
            )
            try:
                service.run(stop)
            finally:
                for close in closers:
                    close()
            console.print_json(json.dumps(service.health()["details"], default=str))
        except SpendstreamError as exc:
            fail_on(exc)
