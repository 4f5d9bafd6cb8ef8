"""``spendstream worker``: the faust stream processor."""

from __future__ import annotations

import typer

from spendstream.commands._common import settings_or_exit


def register(app: typer.Typer) -> None:
    """Add the ``worker`` command."""

    @app.command("worker")
    def worker(
        loglevel: str = typer.Option(
            None, "--loglevel", "-l", help="debug, info, warning or error (default: settings)."
        ),
    ) -> None:
        """Validate, dedupe, price and roll up usage events (runs until SIGTERM or Ctrl-C).

        Reads the events topic, writes priced events, rollups and dead letters. Several workers
        with the same SPENDSTREAM_PROCESSOR__APP_ID share the partitions.
        """
        from spendstream.worker import run_worker

        run_worker(settings_or_exit(), loglevel=loglevel)
