"""``spendstream query`` on the real engine (chDB) with hostile values in the result.

tests/unit/test_safe_output.py covers the helpers and every format with a stand-in store; here
the values come out of ClickHouse itself, as stored ids and model names would.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import pytest
from typer.testing import CliRunner

from spendstream.cli import app

pytestmark = pytest.mark.integration

# An SGR sequence and a closing tag that opens nothing; a right-to-left override; a formula.
SQL = (
    "SELECT concat(char(27), '[31mred', '[/x]') AS user_id, "
    "concat('user', char(0xE2, 0x80, 0xAE), 'gnp.exe') AS model, "
    "toDecimal64(-1.5, 2) AS cost, '=1+1' AS note"
)


@pytest.fixture
def runner(make_settings: Any, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    settings = make_settings(broker=False)
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    return CliRunner()


def test_query_table_escapes_what_the_engine_returns(runner: CliRunner) -> None:
    result = runner.invoke(app, ["query", SQL])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and result.exception is None
    assert "\x1b" not in result.output and "\u202e" not in result.output
    assert "\\x1b[31mred[/x]" in result.output and "user\\u202egnp.exe" in result.output


def test_query_csv_and_json_from_the_engine(runner: CliRunner) -> None:
    result = runner.invoke(app, ["query", SQL, "--format", "csv"])
    assert result.exit_code == 0, result.output
    header, row = list(csv.reader(io.StringIO(result.output)))
    assert header == ["user_id", "model", "cost", "note"]
    assert row == ["\x1b[31mred[/x]", "user\u202egnp.exe", "-1.5", "'=1+1"]

    result = runner.invoke(app, ["query", SQL, "--format", "json"])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output
    assert json.loads(result.output) == [
        {"user_id": "\x1b[31mred[/x]", "model": "user\u202egnp.exe", "cost": "-1.5", "note": "=1+1"}
    ]


def test_queries_name_tables_as_users_know_them(runner: CliRunner) -> None:
    # The configured database is the default: `FROM priced_events` once failed "Unknown table".
    assert runner.invoke(app, ["clickhouse", "migrate"]).exit_code == 0
    result = runner.invoke(app, ["query", "SELECT count() AS n FROM priced_events", "-f", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == [{"n": 0}]
