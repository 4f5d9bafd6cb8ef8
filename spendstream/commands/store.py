"""``clickhouse migrate``, ``query`` and ``sink``: the ClickHouse side of the CLI."""

from __future__ import annotations

import csv
import io
import json
import signal
import sys
import threading
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import typer

from spendstream.commands._common import console, fail, fail_on, settings_or_exit
from spendstream.commands._safe import csv_cell, printable, safe_text
from spendstream.errors import SpendstreamError


def _parse_params(raw: list[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for item in raw:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            fail(f"--param expects name=value, got {item!r}", code=2)
        params[name.strip()] = value
    return params


def _serve_sink_metrics(settings: Any, runner: Any) -> list[Callable[[], None]]:
    """Start ``/metrics`` + ``/health`` and the lag probe if ``sink.metrics_port`` is set.

    Returns the closers to call at shutdown.
    """
    port = settings.sink.metrics_port
    if not port:
        return []
    from spendstream import metrics

    probe = metrics.LagProbe(
        settings.kafka.confluent_config(), settings.sink.group_id, list(runner.topics)
    )

    def health() -> dict[str, Any]:
        report = runner.health()
        report["details"]["lag"] = probe.total
        if probe.error is not None:
            report["details"]["kafka_error"] = probe.error
        if not probe.ok():
            report["ok"] = False
        return dict(report)

    server = metrics.serve(port, health)
    console.print(f"metrics on {server.url}/metrics, health on {server.url}/health")
    return [server.close, probe.close]


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, Decimal):
        return format(value.normalize(), "f") if value else "0"
    return str(value)


def _json_value(value: Any) -> Any:
    if isinstance(value, Decimal):
        return _text(value)  # money stays exact: a string, never a JSON float
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | Decimal) and not isinstance(value, bool)


def _print_result(
    names: list[str], rows: list[tuple[Any, ...]], fmt: str, *, terminal: bool
) -> None:
    """Print a query result as ``fmt`` (table, json or csv).

    JSON is exact (``json.dumps`` escapes control characters). CSV cells are guarded against
    spreadsheet formulas and, on a terminal, have control characters escaped. The table is
    built from literal text: stored values cannot inject markup or escape sequences.
    """
    if fmt == "json":
        typer.echo(
            json.dumps(
                [{n: _json_value(v) for n, v in zip(names, row, strict=True)} for row in rows],
                indent=2,
            )
        )
    elif fmt == "csv":

        def cell(text: str, number: bool = False) -> str:
            text = csv_cell(text, number=number)
            return printable(text) if terminal else text

        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow([cell(n) for n in names])
        writer.writerows([cell(_text(v), _is_number(v)) for v in row] for row in rows)
        # color=True: click would otherwise strip what looks like an ANSI sequence from the
        # data when it goes to a file; on a terminal the cells are already escaped.
        typer.echo(out.getvalue(), nl=False, color=True)
    else:
        from rich.table import Table

        table = Table(show_lines=False)
        for name in names:
            table.add_column(safe_text(name))
        for row in rows:
            table.add_row(*(safe_text(_text(v)) for v in row))
        console.print(table)
        console.print(f"{len(rows)} row{'s' if len(rows) != 1 else ''}", style="dim")


def register(app: typer.Typer) -> None:
    """Add the ``clickhouse`` group and the ``query`` and ``sink`` commands."""
    ch_app = typer.Typer(
        help="The ClickHouse store (server or embedded chDB).", no_args_is_help=True
    )
    app.add_typer(ch_app, name="clickhouse")

    @ch_app.command("migrate")
    def clickhouse_migrate() -> None:
        """Create the database and apply pending numbered migrations (idempotent)."""
        from sinks import open_store

        settings = settings_or_exit()
        try:
            store = open_store(settings, command="spendstream clickhouse migrate")
            try:
                applied = store.migrate()
            finally:
                store.close()
        except SpendstreamError as exc:
            fail_on(exc)
        if applied:
            for name in applied:
                console.print(f"applied {name}")
        else:
            console.print("schema up to date (no migration pending)")

    @app.command("query")
    def query(
        sql: str = typer.Argument(
            ..., help="One SQL statement; use {name:Type} placeholders for values."
        ),
        param: list[str] = typer.Option(
            [],
            "--param",
            "-p",
            help="name=value bound to {name:Type} as a query parameter (repeatable); "
            "values are never formatted into the SQL text.",
        ),
        fmt: str = typer.Option(
            "table", "--format", "-f", help="Output: table (default), json or csv."
        ),
    ) -> None:
        """Run a read-only query (SELECT, WITH, SHOW, DESCRIBE) against the store.

        Read-only is enforced by ClickHouse (readonly=1), after its own parser has checked for
        one read statement with no INTO OUTFILE and no file or network table function. With the
        embedded store owned by a running sink, the query is answered by that owner.
        """
        from sinks import check_read_only, open_store

        if fmt not in ("table", "json", "csv"):
            fail(f"--format must be table, json or csv, not {fmt!r}", code=2)
        params = _parse_params(param)
        settings = settings_or_exit()
        try:
            check_read_only(sql)  # reports, not DDL: schema changes go through migrations
            store = open_store(settings, readonly=True, command="spendstream query")
            try:
                names, rows = store.query(sql, params)
            finally:
                store.close()
        except SpendstreamError as exc:
            fail_on(exc)
        _print_result(names, rows, fmt, terminal=sys.stdout.isatty())

    @app.command("sink")
    def sink(
        migrate: bool = typer.Option(
            True, "--migrate/--no-migrate", help="Apply pending migrations before consuming."
        ),
    ) -> None:
        """Land the pipeline's topics in ClickHouse until SIGTERM/SIGINT.

        Priced events, rollups, dead letters, alerts, enforcement changes, overage and credit
        draws, and subscriptions. Batches by size or age, inserts, then commits offsets; a stop
        flushes what is buffered.
        With the embedded store this process owns it and answers other processes' queries.
        """
        from sinks import Sink, open_store

        settings = settings_or_exit()
        stop = threading.Event()

        def _on_signal(signum: int, frame: Any) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        try:
            store = open_store(settings, command="spendstream sink")
            try:
                if migrate:
                    for name in store.migrate():
                        console.print(f"applied {name}")
                runner = Sink(settings, store)
                endpoint = _serve_sink_metrics(settings, runner)
                console.print(
                    f"sink consuming {', '.join(runner.topics)} -> "
                    f"{store.database} (group {settings.sink.group_id}); Ctrl-C to stop"
                )
                try:
                    # SIGTERM/SIGINT set ``stop``; run() then flushes the buffer, inserts it,
                    # commits its offsets and leaves the group before returning (exit 0).
                    runner.run(stop)
                finally:
                    for closer in endpoint:
                        closer()
                console.print_json(json.dumps(runner.counters.as_dict()))
            finally:
                store.close()
        except SpendstreamError as exc:
            fail_on(exc)
