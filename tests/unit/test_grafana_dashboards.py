"""The generated Grafana dashboards: variables reach SQL only through a safe formatter, every
panel has options, every target carries the plugin's query version.

The committed JSON is checked as well as the generator's output (test_compose.py checks that
both are the same); tests/integration/test_grafana_panels.py runs the panels' SQL with hostile
``$org`` values on chDB.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from spendstream.analytics.grafana import (
    DASHBOARDS,
    ORG_VALUE,
    build_dashboard,
    expand_macros,
    format_variable,
    org_filter,
    panel_specs,
)

DASHBOARD_DIR = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards"
# Any Grafana variable reference: ${name}, ${name:format}, [[name]], [[name:format]], $name.
VARIABLE = re.compile(r"\$\{(\w+)(?::(\w+))?\}|\[\[(\w+)(?::(\w+))?\]\]|\$(\w+)")
SAFE_REFERENCE = "decodeURLComponent('${org:percentencode}')"


def _dashboards() -> list[tuple[str, dict[str, Any]]]:
    generated = [(spec.uid, build_dashboard(spec)) for spec in DASHBOARDS]
    committed = [(p.name, json.loads(p.read_text())) for p in sorted(DASHBOARD_DIR.glob("*.json"))]
    assert len(committed) == len(DASHBOARDS)
    return generated + committed


def _panels() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{name} / {panel['title']}", panel)
        for name, board in _dashboards()
        for panel in board["panels"]
    ]


def _variable_references(sql: str) -> list[tuple[str, str | None]]:
    """(name, format) of every variable in ``sql``; the plugin's ``$__`` macros excluded."""
    refs = []
    for m in VARIABLE.finditer(sql):
        name = m[1] or m[3] or m[5]
        if not name.startswith("__"):
            refs.append((name, m[2] or m[4]))
    return refs


def test_the_reference_finder_sees_every_syntax() -> None:
    sql = "'${org}' $org [[org]] ${org:sqlstring} [[org:raw]] $__timeFilter(t) ${__from}"
    assert _variable_references(sql) == [
        ("org", None),
        ("org", None),
        ("org", None),
        ("org", "sqlstring"),
        ("org", "raw"),
    ]


def test_no_panel_sql_quotes_a_raw_variable() -> None:
    for where, panel in _panels():
        for target in panel["targets"]:
            sql = target["rawSql"]
            assert "'${" not in sql.replace(SAFE_REFERENCE, ""), f"{where}: {sql}"
            refs = _variable_references(sql)
            assert all(ref == ("org", "percentencode") for ref in refs), f"{where}: {refs}"
            # ... and the encoded value is only ever used decoded, inside its own literal.
            assert sql.count("${org:percentencode}") == sql.count(SAFE_REFERENCE), where


def test_org_dashboards_filter_by_org_and_the_pipeline_does_not() -> None:
    for spec in DASHBOARDS:
        for panel in spec.panels:
            uses_org = SAFE_REFERENCE in panel.sql
            assert uses_org == spec.org_variable, f"{spec.title} / {panel.title}"


def test_every_panel_has_options() -> None:
    for where, panel in _panels():
        options = panel.get("options")
        assert isinstance(options, dict) and options, f"{where}: options {options!r}"
        if panel["type"] in ("timeseries", "barchart"):
            assert options["legend"]["showLegend"] is True, where
        if panel["type"] == "table":
            assert options["showHeader"] is True, where


def test_every_target_carries_a_v4_plugin_version() -> None:
    for where, panel in _panels():
        for target in panel["targets"]:
            major = int(target["pluginVersion"].split(".")[0])
            assert major >= 4, f"{where}: the plugin would migrate it as a v3 query"
            assert target["editorType"] == "sql" and target["queryType"] in ("table", "timeseries")


def test_the_org_variable_is_a_textbox() -> None:
    for name, board in _dashboards():
        variables = board.get("templating", {}).get("list", [])
        for variable in variables:
            assert variable["name"] == "org" and variable["type"] == "textbox", name


# -- Grafana's formatters, as expand_macros applies them ----------------------------------------


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        ("", ""),
        ("acme-corp_1.2~x", "acme-corp_1.2~x"),
        ("a b+c", "a%20b%2Bc"),
        ("x' OR 1=1 --", "x%27%20OR%201%3D1%20--"),
        ("\\'\"", "%5C%27%22"),
        ("!'()*", "%21%27%28%29%2A"),  # encoded too, as Grafana's strict variant does
        ("é\u202e", "%C3%A9%E2%80%AE"),
        ("${org}%", "%24%7Borg%7D%25"),
    ],
)
def test_percentencode_leaves_nothing_that_can_end_a_literal(value: str, encoded: str) -> None:
    assert format_variable(value, "percentencode") == encoded
    assert re.fullmatch(r"[A-Za-z0-9\-_.~%]*", encoded)


@pytest.mark.parametrize(
    ("value", "formatted"),
    [
        ("acme", "'acme'"),
        ("x' OR 1=1 --", "'x'' OR 1=1 --'"),
        ('say "hi"', "'say \\\"hi\\\"'"),
        ("back\\slash'", "'back\\slash'''"),  # backslashes pass: why the panels do not use it
    ],
)
def test_sqlstring_matches_grafana(value: str, formatted: str) -> None:
    assert format_variable(value, "sqlstring") == formatted


def test_unknown_formats_are_refused() -> None:
    assert format_variable("a'b") == "a'b" == format_variable("a'b", "raw")
    with pytest.raises(ValueError, match="lucene"):
        format_variable("x", "lucene")


def test_expand_macros_formats_each_reference() -> None:
    sql = "${org} $org [[org]] ${org:percentencode} [[org:sqlstring]] ${other} $__interval_s"
    out = expand_macros(sql, from_s=0, to_s=1, interval_s=30, variables={"org": "a'b c"})
    assert out == "a'b c a'b c a'b c a%27b%20c 'a''b c' ${other} 30"


def test_org_filter_uses_the_safe_reference() -> None:
    assert ORG_VALUE == SAFE_REFERENCE
    assert org_filter("org") == f"({SAFE_REFERENCE} = '' OR org = {SAFE_REFERENCE})"
    assert {p.title for _, p in panel_specs() if "org_id = decodeURL" in p.sql}
