"""The dashboards' ``$org`` filter on the real engine (chDB) with hostile values.

The variable reaches SQL as ``decodeURLComponent('${org:percentencode}')``: whatever is typed in
the box or put in the URL (``?var-org=...``) selects at most that organisation. Grafana's
``sqlstring`` formatter is shown not to be enough on ClickHouse, which is why it is not used.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chdb import session as chdb_session

from spendstream.analytics.grafana import expand_macros, org_filter

pytestmark = pytest.mark.integration

ORGS = ["acme", "o'brien\\", 'quote"d', "é\u202eorg", "100%"]
HOSTILE = [
    "x' OR 1=1 --",
    "x' OR '1'='1",
    "\\' = '' ) OR 1=1 --",
    "x\\' OR 1=1 --",
    "'); DROP TABLE orgs; --",
    "%27) OR 1=1 --",
    "\\",
    "'",
    "${org}",
]


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Any]:
    factory: Any = chdb_session.Session  # chDB ships no annotations for it
    sess = factory(str(tmp_path / "chdb"))
    sess.query("CREATE DATABASE IF NOT EXISTS g")
    sess.query("CREATE TABLE g.orgs (org_id String) ENGINE = MergeTree ORDER BY org_id")
    for org in ORGS:
        literal = org.replace("\\", "\\\\").replace("'", "\\'")
        sess.query(f"INSERT INTO g.orgs VALUES ('{literal}')")
    try:
        yield sess
    finally:
        sess.cleanup()


def orgs_selected(engine: Any, condition: str, org: str) -> list[str]:
    sql = expand_macros(
        f"SELECT org_id FROM g.orgs WHERE {condition}",
        from_s=0,
        to_s=1,
        variables={"org": org},
    )
    assert "$" not in sql.replace("${org}", ""), sql
    # The format is an argument, not a FORMAT clause: an injected "--" cannot drop it.
    text = engine.query(sql, "TSVRaw").bytes().decode()
    return sorted(line for line in text.split("\n") if line)


def test_the_filter_selects_exactly_the_org_typed(engine: Any) -> None:
    assert orgs_selected(engine, org_filter(), "") == sorted(ORGS)  # empty: every org
    for org in ORGS:
        assert orgs_selected(engine, org_filter(), org) == [org]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_select_nothing(engine: Any, value: str) -> None:
    assert orgs_selected(engine, org_filter(), value) == []
    assert engine.query("SELECT count() FROM g.orgs", "CSV").bytes().strip() == b"5"


def test_sqlstring_would_let_a_backslash_end_the_literal(engine: Any) -> None:
    condition = "(${org:sqlstring} = '' OR org_id = ${org:sqlstring})"
    assert orgs_selected(engine, condition, "x' OR 1=1 --") == []  # quotes alone are handled
    # ... but ClickHouse reads \' as an escaped quote, so this value ends the literal.
    assert orgs_selected(engine, condition, "\\' = '' ) OR 1=1 --") == sorted(ORGS)
