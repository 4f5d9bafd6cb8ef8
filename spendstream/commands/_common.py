"""Helpers shared by the command modules."""

from __future__ import annotations

import sys
from typing import NoReturn

import typer
from rich.console import Console

from spendstream.errors import ConfigError, SpendstreamError
from spendstream.settings import Settings, load_settings

# Piped output (CI logs, files) gets a width that fits the report tables instead of 80 columns.
console = Console(width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one clear message to stderr and exit with ``code`` (no traceback)."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def settings_or_exit() -> Settings:
    """Load settings or exit 2 with every problem listed."""
    try:
        return load_settings()
    except ConfigError as exc:
        fail(str(exc), code=2)


def fail_on(exc: SpendstreamError) -> NoReturn:
    """Exit for a spendstream error: 2 for bad configuration, 1 otherwise."""
    fail(str(exc), code=2 if isinstance(exc, ConfigError) else 1)
