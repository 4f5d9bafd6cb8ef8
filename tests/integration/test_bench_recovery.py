"""The recovery section of ``spendstream bench`` on the real broker, small: its figures are
measured, not made up (a restart that read the whole changelog, or a probe never priced,
fails here)."""

from __future__ import annotations

from typing import Any

import pytest

from spendstream.bench.recovery import run_recovery_bench

pytestmark = pytest.mark.integration


def test_the_recovery_section_restarts_restores_and_fails_over(make_settings: Any) -> None:
    settings = make_settings(processor={"session_timeout_s": 6})
    figures = run_recovery_bench(settings, events=3_000, users=200, dedupe_events=20_000)
    assert figures["events"] == 3_000
    # The same folder after a graceful stop: nothing to read again.
    assert figures["same_machine_changelog_records_read"] == 0
    # A fresh folder read every table's changelog: at least one seen id per event.
    assert figures["fresh_restore_changelog_records"] >= 3_000
    assert 0 < figures["restart_same_machine_s"] < 120
    assert 0 < figures["restart_fresh_machine_s"] < 120
    # Fail-over waits for the session timeout before another worker takes the partitions. The
    # broker counts it from the killed worker's last heartbeat, which can precede the kill by
    # one heartbeat interval (session timeout / 10, stream_processors/_app.py).
    assert figures["failover_to_other_machine_s"] >= 6 - 6 / 10
    assert figures["state_disk_bytes_per_event"] > 0
    assert figures["dedupe_heap_growth_bytes_per_event"] < 100
