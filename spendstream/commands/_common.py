"""Helpers shared by the command modules."""

from __future__ import annotations

import sys
from typing import NoReturn

from rich.console import Console
from rich.text import Text

from spendstream.commands._safe import printable
from spendstream.errors import ConfigError, SpendstreamError
from spendstream.settings import Settings, load_settings

# Piped output (CI logs, files) gets a width that fits the report tables instead of 80 columns.
# No emoji codes: a stored id such as ":warning:" prints as written.
console = Console(width=None if sys.stdout.isatty() else 140, emoji=False)
err_console = Console(stderr=True, emoji=False)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one clear message to stderr and exit with ``code`` (no traceback).

    The message is printed literally: it often quotes stored data or user input, so brackets
    are not read as markup and control characters are shown escaped (line breaks kept).
    """
    err_console.print(
        Text.assemble(("error:", "bold red"), " ", printable(message, keep="\n")),
        highlight=False,
        soft_wrap=True,
    )
    # SystemExit, not typer.Exit: the entry point also fails outside the click context.
    raise SystemExit(code)


def settings_or_exit() -> Settings:
    """Load settings or exit 2 with every problem listed."""
    try:
        return load_settings()
    except ConfigError as exc:
        fail(str(exc), code=2)


def fail_on(exc: SpendstreamError) -> NoReturn:
    """Exit for a spendstream error: 2 for bad configuration, 1 otherwise."""
    fail(str(exc), code=2 if isinstance(exc, ConfigError) else 1)
