"""``kafka up|down|status|topics``: the local KRaft broker and the topics.

See docs/DESIGN.md, "Data flow".
"""

from __future__ import annotations

import typer
from rich.table import Table

from spendstream.commands._common import console, fail, settings_or_exit
from spendstream.errors import SpendstreamError

NOT_RUNNING_EXIT = 3
"""``kafka status`` exit code when the broker is not running (the LSB ``status`` convention)."""


def register(app: typer.Typer) -> None:
    """Add the ``kafka`` group."""
    kafka_app = typer.Typer(
        help="Run a local Apache Kafka broker (KRaft, no Docker) and manage the topics.",
        no_args_is_help=True,
    )
    app.add_typer(kafka_app, name="kafka")

    @kafka_app.command("up")
    def kafka_up(
        timeout: float | None = typer.Option(
            None,
            "--timeout",
            min=1,
            help="Seconds to wait for the broker to answer (default: "
            "SPENDSTREAM_KAFKA__LOCAL__START_TIMEOUT_S).",
        ),
    ) -> None:
        """Start the local broker (resolving its jars with Maven once); no-op if it runs."""
        from spendstream.localkafka import LocalKafka

        settings = settings_or_exit()
        broker = LocalKafka.from_settings(settings)
        if timeout is not None:
            broker.start_timeout_s = timeout
        was_running = broker.status().running
        try:
            broker.up()
        except SpendstreamError as exc:
            fail(str(exc))
        verb = "already running" if was_running else "started"
        console.print(f"[green]Kafka {broker.kafka_version} {verb}[/] on {broker.bootstrap}")
        console.print(f"  bootstrap: {broker.bootstrap}")
        console.print(f"  log:       {broker.log_path}")
        console.print(f"  data:      {broker.data_dir}")
        if not settings.kafka.is_local_default:
            console.print(
                "[yellow]note:[/] clients are configured for "
                f"{settings.kafka.bootstrap_servers}, not this broker "
                "(SPENDSTREAM_KAFKA__BOOTSTRAP_SERVERS)."
            )

    @kafka_app.command("down")
    def kafka_down(
        timeout: float = typer.Option(
            30.0, "--timeout", min=0, help="Seconds to wait after SIGTERM before SIGKILL."
        ),
    ) -> None:
        """Stop the local broker that kafka up started (never any other process)."""
        from spendstream.localkafka import LocalKafka

        broker = LocalKafka.from_settings(settings_or_exit())
        try:
            stopped = broker.down(timeout=timeout)
        except SpendstreamError as exc:
            fail(str(exc))
        console.print("stopped the local Kafka broker" if stopped else "not running")

    @kafka_app.command("status")
    def kafka_status() -> None:
        """Show whether the local broker runs and answers (exit code 3 when it does not run)."""
        from spendstream.localkafka import LocalKafka

        st = LocalKafka.from_settings(settings_or_exit()).status()
        if not st.running:
            console.print(f"not running (data: {st.data_dir})")
            raise typer.Exit(NOT_RUNNING_EXIT)
        health = "[green]answering[/]" if st.answering else "[yellow]not answering yet[/]"
        console.print(f"running, pid {st.pid}, {health} on {st.bootstrap}")
        console.print(f"  log:  {st.log_path}")
        console.print(f"  data: {st.data_dir}")

    @kafka_app.command("topics")
    def kafka_topics(
        timeout: float = typer.Option(
            30.0, "--timeout", min=1, help="Seconds to wait for the cluster and for creation."
        ),
    ) -> None:
        """Create the missing spendstream topics on the configured cluster and list them."""
        from spendstream.kafka_admin import ensure_topics, wait_for_broker

        settings = settings_or_exit()
        try:
            wait_for_broker(settings.kafka.confluent_config(), timeout=timeout)
            infos = ensure_topics(settings, timeout=timeout)
        except SpendstreamError as exc:
            fail(str(exc))
        table = Table(title=f"topics on {settings.kafka.bootstrap_servers}")
        table.add_column("role")
        table.add_column("topic")
        table.add_column("partitions", justify="right")
        table.add_column("cleanup")
        table.add_column("")
        for info in infos:
            table.add_row(
                info.role,
                info.name,
                str(info.partitions),
                "compact" if info.compacted else "delete",
                "[green]created[/]" if info.created else "exists",
            )
        console.print(table)
