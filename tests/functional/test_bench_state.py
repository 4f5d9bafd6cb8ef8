"""The state-size section of ``spendstream bench`` runs without a broker and adds up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spendstream.cli import app

pytestmark = pytest.mark.functional


def test_state_section_through_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    skip = [
        a
        for s in ("producer", "worker", "sink", "caps", "baselines", "recovery", "admission")
        for a in ("--skip", s)
    ]
    result = CliRunner().invoke(app, ["bench", *skip, "--state-users", "300", "--json", str(out)])
    assert result.exit_code == 0, result.output
    state = json.loads(out.read_text())["state"]
    assert state["events"] == 1_200
    assert 0 < state["users_active"] <= 300
    assert state["active_user_windows"] == state["rollup_windows"] + state["cap_windows"]
    # Every active user has at least one rollup window and one cap window.
    assert state["rollup_windows"] >= state["users_active"]
    assert state["cap_windows"] >= state["users_active"]
    assert state["window_state_wire_bytes_per_user_window"] > 0
    assert (
        state["window_state_wire_bytes_per_user_window"]
        < state["window_state_heap_bytes_per_user_window"]
    )
    assert "bench: state" in result.output
