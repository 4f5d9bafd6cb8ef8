"""``report``, ``whatif`` and the ``analytics`` group (load-plans, grafana): tier profitability."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from spendstream.commands._common import console, err_console, fail, fail_on, settings_or_exit
from spendstream.commands._safe import safe_text
from spendstream.errors import SpendstreamError

if TYPE_CHECKING:  # the store stack is imported by the commands, not at CLI start-up
    from sinks import Store


def _open(readonly: bool) -> Store:
    """The store the settings point at; read-only commands go through a running owner."""
    from sinks import open_store

    settings = settings_or_exit()
    command = "spendstream report" if readonly else "spendstream analytics"
    return open_store(settings, readonly=readonly, command=command)


def _period(text: str | None) -> Any:
    from spendstream.analytics.report import parse_period

    return parse_period(text) if text else None


def _format(fmt: str) -> str:
    if fmt not in ("table", "json"):
        fail(f"--format must be table or json, not {fmt!r}", code=2)
    return fmt


PERIOD = typer.Option(None, "--period", help="Month YYYY-MM (default: newest month with usage).")
ORG = typer.Option("", "--org", help="Only this organisation (bound as a query parameter).")
FORMAT = typer.Option("table", "--format", "-f", help="table (default) or json.")


def register(app: typer.Typer) -> None:
    """Add ``report``, ``whatif`` and the ``analytics`` group."""

    @app.command("report")
    def report(
        period: str | None = PERIOD,
        org: str = ORG,
        fmt: str = FORMAT,
        html: Path | None = typer.Option(
            None, "--html", help="Also write one self-contained HTML file with the plots."
        ),
        top: int = typer.Option(10, "--top", min=1, max=1000, help="Heaviest users listed."),
    ) -> None:
        """Tier P&L of one month from ClickHouse: revenue, cost, margin, savings, cap outcomes.

        Reads the views tier_pnl and user_month_pnl. Subscription revenue needs the plans in
        ClickHouse (`spendstream analytics load-plans`; the demo loads them).
        """
        from spendstream.analytics import build_report, current_plans_loaded, report_json
        from spendstream.analytics.report import render

        fmt = _format(fmt)
        try:
            month = _period(period)
            store = _open(readonly=True)
            try:
                if not current_plans_loaded(store):
                    err_console.print(
                        "[yellow]warning:[/] no plans in ClickHouse, subscription revenue "
                        "reads 0; run `spendstream analytics load-plans`"
                    )
                result = build_report(store, month=month, org=org, top=top)
            finally:
                store.close()
        except SpendstreamError as exc:
            fail_on(exc)
        if fmt == "json":
            typer.echo(json.dumps(report_json(result), indent=2))
        else:
            render(result, console)
        if html is not None:
            from spendstream.analytics.html import write_html

            write_html(result, html)
            (err_console if fmt == "json" else console).print(safe_text(f"wrote {html}"))

    @app.command("whatif")
    def whatif(
        plans: Path = typer.Option(..., "--plans", help="Alternative plans YAML."),
        prices: Path | None = typer.Option(
            None,
            "--prices",
            help="Alternative prices (LiteLLM JSON, overrides on the configured catalog): "
            "every event of the alternative is re-priced with them.",
        ),
        current_plans: Path | None = typer.Option(
            None,
            "--current-plans",
            help="The plans in force (default: SPENDSTREAM_PLANS_FILE, else the sample).",
        ),
        batch_share: list[str] = typer.Option(
            [],
            "--batch-share",
            help="TIER=FRACTION: in the alternative, that share of the tier's requests (a "
            "stable hash of event_id) runs at the batch service tier. Repeatable.",
        ),
        period: str | None = PERIOD,
        org: str = ORG,
        fmt: str = FORMAT,
    ) -> None:
        """Replay a month's stored usage under alternative plans/prices; current vs alternative.

        Each user's events go, in event-time order, through the worker's cap engine and price
        catalog under each scenario (blocked requests cost nothing, downgraded ones are
        re-priced). Read-only: works while a sink owns the store. It sees only the requests
        that were served under the current caps.
        """
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        from schemas.plans import SAMPLE_PLANS, load_plans
        from spendstream.analytics.report import latest_month
        from spendstream.whatif import (
            LIMITS,
            Scenario,
            parse_batch_share,
            render,
            result_json,
            run_whatif,
        )
        from stream_processors import PriceCatalog

        fmt = _format(fmt)
        settings = settings_or_exit()
        try:
            month = _period(period)
            shares = parse_batch_share(batch_share)
            current = load_plans(current_plans or settings.plans_file or SAMPLE_PLANS)
            alternative = load_plans(plans)
            cfg = settings.processor
            catalog = PriceCatalog.load(cfg.price_catalog, cfg.price_overrides)
            alt_prices = catalog.with_overrides(prices) if prices is not None else catalog
            missing = sorted(set(current.ids()) - set(alternative.ids()))
            if missing:
                err_console.print(
                    "[yellow]warning:[/]",
                    safe_text(
                        f"{plans} has no plan {', '.join(missing)}: those tiers replay with "
                        "price 0 and no caps"
                    ),
                )
            store = _open(readonly=True)
            try:
                month = month or latest_month(store, org)
                with Progress(
                    TextColumn("replaying"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("events"),
                    TimeElapsedColumn(),
                    console=err_console,
                    transient=True,
                ) as bar:
                    task = bar.add_task("replay", total=None)
                    result = run_whatif(
                        store,
                        Scenario(current, catalog),
                        Scenario(alternative, alt_prices, prices is not None, shares),
                        month=month,
                        org=org,
                        progress=lambda n: bar.advance(task, n),
                    )
            finally:
                store.close()
        except SpendstreamError as exc:
            fail_on(exc)
        if fmt == "json":
            typer.echo(json.dumps(result_json(result), indent=2))
            err_console.print(safe_text(LIMITS))
        else:
            render(result, console)

    an_app = typer.Typer(
        help="Tier profitability data: plans into ClickHouse, Grafana dashboards.",
        no_args_is_help=True,
    )
    app.add_typer(an_app, name="analytics")

    @an_app.command("load-plans")
    def load_plans_cmd(
        file: Path | None = typer.Argument(
            None, help="Plans YAML (default: SPENDSTREAM_PLANS_FILE, else the sample plans)."
        ),
        scenario: str = typer.Option(
            "current", "--scenario", help="Scenario id; 'current' is the plans in force."
        ),
    ) -> None:
        """Load a plans file into ClickHouse (tables plans, plan_windows) as a new snapshot."""
        from schemas.plans import SAMPLE_PLANS, load_plans
        from spendstream.analytics import load_plans_into

        settings = settings_or_exit()
        path = file or settings.plans_file or SAMPLE_PLANS
        try:
            catalog = load_plans(path)
            store = _open(readonly=False)
            try:
                store.migrate()
                version = load_plans_into(store, catalog, scenario=scenario, source=str(path))
            finally:
                store.close()
        except SpendstreamError as exc:
            fail_on(exc)
        console.print(
            safe_text(
                f"loaded {len(catalog)} plans from {path} as scenario {scenario!r} "
                f"(version {version})"
            )
        )

    @an_app.command("grafana")
    def grafana(
        out: Path = typer.Option(
            Path("deploy/grafana/dashboards"), "--out", help="Folder for the dashboard JSON."
        ),
        database: str | None = typer.Option(
            None, "--database", help="ClickHouse database (default: the configured one)."
        ),
    ) -> None:
        """Generate the Grafana dashboards (JSON) from their Python definitions."""
        from spendstream.analytics.grafana import write_dashboards

        db = database or settings_or_exit().clickhouse.database
        for path in write_dashboards(out, database=db):
            console.print(safe_text(f"wrote {path}"))
