"""Stored data printed safely: escape sequences, control and bidi characters, rich markup and
spreadsheet formulas in ids and model names reach the terminal or the CSV as inert text.

The command-level tests run ``spendstream query`` through the CLI with a stand-in store that
returns hostile values (tests/integration/test_safe_output_store.py does the same on chDB).
"""

from __future__ import annotations

import csv
import io
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

import sinks
from spendstream.analytics.report import PnlReport, render
from spendstream.cli import app
from spendstream.commands import store as store_cmd
from spendstream.commands._common import fail
from spendstream.commands._safe import csv_cell, markup_safe, printable, safe_text

ESC = "\x1b"
HOSTILE_ID = "\x1b[31mred[/x]"  # an SGR sequence and a closing tag that opens nothing
BIDI = "user\u202egnp.exe"


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain-id_1.2", "plain-id_1.2"),
        ("é 中文 🙂", "é 中文 🙂"),  # printable non-ASCII passes
        ("\x1b[2J", "\\x1b[2J"),  # clear screen
        ("\x1b]0;title\x07", "\\x1b]0;title\\x07"),  # OSC set-title, BEL
        ("a\x00b", "a\\x00b"),
        ("a\x08b", "a\\x08b"),  # backspace overwrites on a terminal
        ("a\rb", "a\\x0db"),  # carriage return rewrites the line
        ("a\nb\tc", "a\\x0ab\\x09c"),
        ("a\x7fb", "a\\x7fb"),  # DEL
        ("a\x9b31mb", "a\\x9b31mb"),  # C1 CSI
        ("a\x85b", "a\\x85b"),  # C1 next line
        (BIDI, "user\\u202egnp.exe"),  # right-to-left override
        ("\u202a\u202b\u202c\u202d", "\\u202a\\u202b\\u202c\\u202d"),
        ("\u2066\u2067\u2068\u2069", "\\u2066\\u2067\\u2068\\u2069"),  # isolates
        ("\u200e\u200f\u061c", "\\u200e\\u200f\\u061c"),  # bidi marks
        ("a\u2028b\u2029c", "a\\u2028b\\u2029c"),  # line and paragraph separators
        ("[/x] [bold]b[/bold]", "[/x] [bold]b[/bold]"),  # markup is not printable's concern
    ],
)
def test_printable(raw: str, shown: str) -> None:
    assert printable(raw) == shown


def test_printable_keeps_only_what_is_asked() -> None:
    assert printable("one\ntwo\x1b", keep="\n") == "one\ntwo\\x1b"
    assert printable("one\ttwo", keep="\n") == "one\\x09two"


def _render(renderable: Any, *, emoji: bool = True) -> str:
    """What a console (colour terminal, default settings) writes for ``renderable``."""
    out = io.StringIO()
    Console(file=out, force_terminal=True, color_system=None, width=200, emoji=emoji).print(
        renderable
    )
    return out.getvalue()


@pytest.mark.parametrize(
    "data",
    [
        "[/x]",
        "[bold]not bold[/bold]",
        "[link=https://evil.example]click[/link]",
        "org\\",  # a trailing backslash must not escape the markup that follows
        "\\[/x]",
        ":warning: :smile:",
        "[",
        "]",
    ],
)
def test_data_prints_literally_through_rich(data: str) -> None:
    assert _render(safe_text(data)).rstrip("\n") == data
    # Escaped data between two pieces of markup: neither side is read as a tag.
    markup = f"[dim]<[/dim]{markup_safe(data)}[dim]>[/dim]"
    assert _render(markup, emoji=False).rstrip("\n") == f"<{data}>"


def test_escape_sequences_never_reach_the_console() -> None:
    text = _render(safe_text(HOSTILE_ID + BIDI))
    assert ESC not in text and "\u202e" not in text
    assert "\\x1b[31mred[/x]" in text and "\\u202e" in text


@pytest.mark.parametrize(
    ("text", "number", "cell"),
    [
        ("=1+1", False, "'=1+1"),
        ('=HYPERLINK("http://x")', False, '\'=HYPERLINK("http://x")'),
        ("+cmd|' /C calc'!A0", False, "'+cmd|' /C calc'!A0"),
        ("-x", False, "'-x"),
        ("-", False, "'-"),
        ("@SUM(A1:A9)", False, "'@SUM(A1:A9)"),
        ("\t=1", False, "'\t=1"),
        ("\r=1", False, "'\r=1"),
        ("-1+2", False, "'-1+2"),  # a formula, not a number
        ("-inf", False, "'-inf"),
        ("-1.5", False, "-1.5"),  # numbers keep their sign
        ("+3", False, "+3"),
        ("-0.000012", False, "-0.000012"),
        ("-2e-05", False, "-2e-05"),
        ("-.5", False, "-.5"),
        ("-1.5", True, "-1.5"),
        ("-inf", True, "-inf"),  # a float column stays as the engine wrote it
        ("gpt-4o", False, "gpt-4o"),
        ("a=b", False, "a=b"),  # only the first character starts a formula
        ("", False, ""),
        ("'quoted", False, "'quoted"),
    ],
)
def test_csv_cell(text: str, number: bool, cell: str) -> None:
    assert csv_cell(text, number=number) == cell


# -- spendstream query ------------------------------------------------------------------------

ROWS: list[tuple[Any, ...]] = [
    (HOSTILE_ID, Decimal("-1.500"), "=1+1", BIDI, -3, "-x"),
    ("u2", Decimal("0"), "@cmd", "plain", 7, "+12.5"),
]
NAMES = ["user_id", "cost", "formula", "model", "n", "note"]


class FakeStore:
    """Answers every query with :data:`ROWS` (stands in for the engine)."""

    database = "spendstream"

    def __init__(self, names: list[str], rows: list[tuple[Any, ...]]) -> None:
        self.names, self.rows = names, rows

    def query(self, sql: str, parameters: Any = None) -> tuple[list[str], list[tuple[Any, ...]]]:
        return self.names, self.rows

    query_readonly = query

    def close(self) -> None:
        pass


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("SPENDSTREAM_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("SPENDSTREAM_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9")
    monkeypatch.setattr(sinks, "open_store", lambda *a, **k: FakeStore(NAMES, ROWS))
    return CliRunner()


def test_query_table_shows_hostile_values_escaped(cli: CliRunner) -> None:
    result = cli.invoke(app, ["query", "SELECT 1"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and result.exception is None
    assert ESC not in result.output and "\u202e" not in result.output
    assert "\\x1b[31mred[/x]" in result.output
    assert "user\\u202egnp.exe" in result.output
    assert "-1.5" in result.output and "2 rows" in result.output


def test_query_table_headers_are_literal_too(
    cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        sinks, "open_store", lambda *a, **k: FakeStore(["[/x]", "c\x1b[0m"], [("a", "b")])
    )
    result = cli.invoke(app, ["query", "SELECT 1"])
    assert result.exit_code == 0, result.output
    assert "[/x]" in result.output and "c\\x1b[0m" in result.output
    assert ESC not in result.output


def test_query_csv_guards_formulas_and_keeps_numbers(cli: CliRunner) -> None:
    result = cli.invoke(app, ["query", "SELECT 1", "--format", "csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(io.StringIO(result.output)))
    assert rows[0] == NAMES
    assert rows[1] == [HOSTILE_ID, "-1.5", "'=1+1", BIDI, "-3", "'-x"]  # a file keeps the data
    assert rows[2] == ["u2", "0", "'@cmd", "plain", "7", "+12.5"]


def test_query_csv_on_a_terminal_escapes_control_characters(
    capsys: pytest.CaptureFixture[str],
) -> None:
    store_cmd._print_result(NAMES, ROWS, "csv", terminal=True)
    out = capsys.readouterr().out
    assert ESC not in out and "\u202e" not in out
    row = next(r for r in csv.reader(io.StringIO(out)) if r[0].startswith("\\x1b"))
    assert row == ["\\x1b[31mred[/x]", "-1.5", "'=1+1", "user\\u202egnp.exe", "-3", "'-x"]


def test_query_json_stays_exact(cli: CliRunner) -> None:
    result = cli.invoke(app, ["query", "SELECT 1", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert ESC not in result.output and "\u202e" not in result.output  # JSON escapes them
    first = json.loads(result.output)[0]
    assert first["user_id"] == HOSTILE_ID and first["model"] == BIDI
    assert first["formula"] == "=1+1" and first["cost"] == "-1.5"


def test_query_refusal_with_markup_in_it_prints_no_traceback(cli: CliRunner) -> None:
    result = cli.invoke(app, ["query", "SELECT 1", "--format", "[/x]\x1b[2J"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)  # a clean exit, not a MarkupError
    assert "--format must be table, json or csv" in result.output
    assert "[/x]" in result.output and ESC not in result.output


# -- fail() -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    ["closing [/x] tag", "[bold]not bold[/bold]", "path C:\\data\\[/x]\\", "emoji :warning:"],
)
def test_fail_prints_markup_like_messages_literally(
    message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        fail(message, code=3)
    assert exited.value.code == 3
    assert capsys.readouterr().err == f"error: {message}\n"


def test_fail_escapes_control_characters_but_keeps_line_breaks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        fail("bad user \x1b[31mid\u202e\nsecond problem")
    assert capsys.readouterr().err == "error: bad user \\x1b[31mid\\u202e\nsecond problem\n"


# -- report tables ------------------------------------------------------------------------------


MONEY_COLUMNS = (
    "active_subscribers",
    "revenue",
    "inference_cost",
    "gross_margin",
    "margin_pct",
    "users_cost_over_pay_pct",
    "cost_p50",
    "cost_p90",
    "cost_p99",
    "top1pct_cost_share_pct",
    "overage_revenue",
    "credit_revenue",
    "list_value",
    "saved_prompt_cache",
    "saved_semantic_cache",
    "saved_routing",
    "saved_service_tier",
    "saved_total",
)
COUNT_COLUMNS = (
    "users",
    "users_alerted",
    "users_capped",
    "users_blocked",
    "users_downgraded",
    "requests_downgraded",
    "users_overage",
)


def _tier(name: str) -> dict[str, Any]:
    row: dict[str, Any] = {"tier": name}
    row.update(dict.fromkeys(MONEY_COLUMNS, Decimal("1.5")))
    row.update(dict.fromkeys(COUNT_COLUMNS, 1))
    return row


def test_report_tables_print_stored_ids_literally() -> None:
    from datetime import date

    report = PnlReport(
        month=date(2026, 11, 1),
        org="[/x]org\x1b[2J",
        tiers=[_tier("pro[/x]\x1b[31m")],
        heavy_users=[
            {
                "user_id": HOSTILE_ID,
                "org_id": BIDI,
                "tier": "[bold]pro",
                "requests": 3,
                "cost": Decimal("-1"),
                "revenue": Decimal("2"),
                "margin": Decimal("3"),
                "capped": 1,
            }
        ],
    )
    out = io.StringIO()
    render(report, Console(file=out, width=300, color_system=None))
    text = out.getvalue()
    assert ESC not in text and "\u202e" not in text
    for shown in ("[/x]org\\x1b[2J", "pro[/x]\\x1b[31m", "\\x1b[31mred[/x]", "[bold]pro"):
        assert shown in text, shown
    assert "user\\u202egnp.exe" in text


def test_report_without_rows_prints_the_org_literally() -> None:
    from datetime import date

    report = PnlReport(month=date(2026, 11, 1), org="[/x]\x1b", tiers=[], heavy_users=[])
    out = io.StringIO()
    render(report, Console(file=out, width=200, color_system=None))
    assert out.getvalue() == "no usage or subscriptions in 2026-11 - org [/x]\\x1b\n"


def test_whatif_tables_print_stored_tiers_literally() -> None:
    from datetime import date

    from spendstream.whatif import WhatIfResult
    from spendstream.whatif import render as render_whatif

    result = WhatIfResult(
        month=date(2026, 11, 1),
        org="[/x]org\x1b[2J",
        current=[{"tier": "pro[/x]\x1b[31m", "users": 1}],
        alternative=[{"tier": "pro[/x]\x1b[31m", "users": 2}],
    )
    out = io.StringIO()
    render_whatif(result, Console(file=out, width=300, color_system=None))
    text = out.getvalue()
    assert ESC not in text
    assert "[/x]org\\x1b[2J" in text and "pro[/x]\\x1b[31m" in text


class _Rows:
    """A store whose every query returns one row of hostile text (and numbers where summed)."""

    def query(self, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
        if "count() AS alerts" in sql:
            return ["plan_id", "window", "alerts"], [("[/x]\x1b[31m", "5h\u202e", 1)]
        if "enforcement_changes" in sql:
            return ["plan_id", "reason", "changes"], [("[bold]p", "\x1b]8;;x\x07", 1)]
        return ["plan_id", "usd"], [("[/x]", Decimal("1"))]


def test_demo_caps_tables_print_stored_values_literally() -> None:
    from spendstream.demo import print_caps
    from spendstream.settings import load_settings

    out = io.StringIO()
    print_caps(_Rows(), load_settings(), Console(file=out, width=300, color_system=None))
    text = out.getvalue()
    assert ESC not in text and "\u202e" not in text and "\x07" not in text
    assert "[/x]\\x1b[31m" in text and "[bold]p" in text
