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


EXTRA_OF_MODULE = {
    "faust": "worker",
    "mode": "worker",
    "aiokafka": "worker",
    "uvloop": "worker",
    "chdb": "sink",
    "clickhouse_connect": "sink",
    "pyarrow": "sink",
    "numpy": "sink",
    "plotly": "analytics",
    "grafana_foundation_sdk": "analytics",
    "litellm": "litellm",
    "aiohttp": "notify",
}
"""Third-party modules of the optional extras (pyproject.toml): a base install has none."""


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """The extra that installs the module ``exc`` could not find, if it is one of ours."""
    name = (exc.name or "").split(".")[0]
    return EXTRA_OF_MODULE.get(name)


def main() -> None:
    """Console-script entry point."""
    from spendstream.commands._common import fail, fail_on

    try:
        app()
    except SpendstreamError as exc:
        fail_on(exc)
    except ModuleNotFoundError as exc:
        extra = missing_extra(exc)
        if extra is None:
            raise
        fail(
            f"this command needs {exc.name}, which the {extra!r} extra installs: "
            f"pip install 'spendstream[{extra}]'",
            code=2,
        )


if __name__ == "__main__":
    main()
