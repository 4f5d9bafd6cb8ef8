"""Fault-suite reporting: how long each scenario took, printed at the end of the run."""

from __future__ import annotations

from typing import Any

import pytest

_durations: list[tuple[str, str, float]] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Any:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        _durations.append((item.name, report.outcome, report.duration))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _durations:
        return
    terminalreporter.section("fault scenarios")
    for name, outcome, seconds in _durations:
        terminalreporter.write_line(f"{seconds:7.1f} s  {outcome:7s}  {name}")
