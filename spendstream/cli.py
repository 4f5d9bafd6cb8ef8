"""The ``spendstream`` command line: one entry point, one command group per concern."""

from __future__ import annotations

import importlib

import typer

from spendstream.errors import SpendstreamError

# Modules under spendstream.commands that contribute commands; each has register(app).
COMMAND_MODULES = (
    "core",
    "kafka",
    "worker",
    "demo",
    "bench",
    "traffic",
    "store",
    "report",
    "subscriptions",
    "notify",
)

app = typer.Typer(
    name="spendstream",
    help="Usage metering for AI services: produce, price, cap and account every model call.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _name in COMMAND_MODULES:
    importlib.import_module(f"spendstream.commands.{_name}").register(app)


def main() -> None:
    """Console-script entry point."""
    from spendstream.commands._common import fail_on

    try:
        app()
    except SpendstreamError as exc:
        fail_on(exc)


if __name__ == "__main__":
    main()
