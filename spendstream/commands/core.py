"""``config show`` and ``schema export``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from spendstream.commands._common import console, settings_or_exit

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "usage_event.schema.json"


def register(app: typer.Typer) -> None:
    """Add the ``config`` and ``schema`` groups."""
    config_app = typer.Typer(help="Inspect the effective settings.", no_args_is_help=True)
    schema_app = typer.Typer(help="The public event contract.", no_args_is_help=True)
    app.add_typer(config_app, name="config")
    app.add_typer(schema_app, name="schema")

    @config_app.command("show")
    def config_show() -> None:
        """Print the effective settings (environment + defaults), secrets masked."""
        settings = settings_or_exit()
        console.print_json(json.dumps(settings.masked()))

    @schema_app.command("export")
    def schema_export(
        out: Path | None = typer.Option(
            None, "--out", "-o", help="Write here instead of standard output."
        ),
    ) -> None:
        """Export the JSON Schema of the usage event for producers in any language."""
        from schemas import event_json_schema

        text = json.dumps(event_json_schema(), indent=2, sort_keys=True) + "\n"
        if out is None:
            typer.echo(text, nl=False)
        else:
            out.write_text(text, encoding="utf-8")
            console.print(f"wrote {out}")
