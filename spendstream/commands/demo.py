"""``spendstream demo``: the README's main job."""

from __future__ import annotations

import typer

from spendstream.commands._common import console, fail, settings_or_exit
from spendstream.errors import SpendstreamError


def register(app: typer.Typer) -> None:
    """Add the ``demo`` command."""

    @app.command("demo")
    def demo(
        users: int = typer.Option(2000, "--users", "-u", min=1, help="Simulated users."),
        duration: float = typer.Option(
            60.0, "--duration", "-d", min=1, help="Seconds of simulated traffic."
        ),
        rate: float = typer.Option(300.0, "--rate", "-r", min=1, help="Mean events per second."),
        seed: int | None = typer.Option(
            None, "--seed", "-s", help="Random seed (default: the current time, printed)."
        ),
        drain_timeout: float = typer.Option(
            300.0, "--drain-timeout", min=1, help="Seconds to wait for the pipeline to drain."
        ),
        notify: bool = typer.Option(
            True,
            "--notify/--no-notify",
            help="Also deliver alerts and enforcement changes as signed webhooks to a local "
            "receiver (spendstream notify) and count what it got.",
        ),
    ) -> None:
        """Run the whole pipeline locally and print a per-tier report.

        Starts a local Kafka broker (unless SPENDSTREAM_KAFKA__BOOTSTRAP_SERVERS points
        elsewhere), creates the topics, migrates ClickHouse (embedded chDB unless
        SPENDSTREAM_CLICKHOUSE__URL is set), starts a worker and the sink, simulates gateway
        traffic, waits until everything is landed, prints per-tier usage and cost from
        ClickHouse, and shuts down what it started. Data stays in the state folder, so a second
        run adds to the first.
        """
        from spendstream.demo import DemoOptions, run_demo
        from spendstream.runner import sigterm_as_interrupt

        settings = settings_or_exit()
        options = DemoOptions(
            users=users,
            duration_s=duration,
            rate=rate,
            seed=seed,
            drain_timeout_s=drain_timeout,
            notify=notify,
        )
        try:
            with sigterm_as_interrupt():
                run_demo(settings, options, console)
        except SpendstreamError as exc:
            fail(str(exc))
