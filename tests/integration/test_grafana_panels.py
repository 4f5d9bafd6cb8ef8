"""Every Grafana panel's SQL, macros and variables expanded, on chDB after a simulated run.

The run is the real pipeline (worker process, in-process sink, the session's Kafka broker) on
plans with tiny allowances, so alerts, enforcement changes, overages and credit-free overage
all happen within a few thousand events; malformed items fill the dead letters. The ``$org``
variable is also set to hostile values, written through its formatter as Grafana writes them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from producers import UsageProducer, publish_subscriptions
from schemas.plans import load_plans
from sinks import Sink, open_store
from spendstream.analytics import load_plans_into
from spendstream.analytics.grafana import expand_macros, panel_specs
from spendstream.runner import WorkerProcess, wait_for_lag_zero
from spendstream.settings import Settings
from spendstream.simulate import Simulator

pytestmark = pytest.mark.integration

TIGHT_PLANS = """
plans:
  - id: free
    monthly_price: "0"
    windows:
      - {name: daily, kind: calendar_day, unit: requests, allowance: "3", at_cap: {action: block}}
  - id: pro
    monthly_price: "20"
    windows:
      - name: monthly
        kind: billing_month
        unit: usd
        allowance: "0.001"
        at_cap: {action: downgrade, model: gpt-4o-mini}
        exempt_models: [gpt-4o-mini]
  - id: team
    monthly_price: "30"
    windows:
      - name: monthly
        kind: billing_month
        unit: usd
        allowance: "0.001"
        at_cap: {action: overage, unit_price: "1.10"}
  - id: enterprise
    monthly_price: "200"
    windows:
      - name: monthly
        kind: billing_month
        unit: usd
        allowance: "0.001"
        at_cap: {action: overage, unit_price: "1.05", ceiling_usd: "0.01"}
"""
N_ITEMS = 4000
# $org values from the dashboard URL (?var-org=...): each must select no organisation.
HOSTILE_ORGS = (
    "x' OR 1=1 --",
    "x' OR '1'='1",
    "\\' = '' ) OR 1=1 --",  # ends a sqlstring-formatted literal on ClickHouse
    "x\\' OR 1=1 --",
    "'); DROP TABLE {db}.priced_events; --",
    "\\",
)


@pytest.fixture
def simulated(make_settings: Any, tmp_path: Path) -> Iterator[tuple[Settings, Any]]:
    from spendstream.kafka_admin import ensure_topics

    plans = tmp_path / "plans.yaml"
    plans.write_text(TIGHT_PLANS)
    settings: Settings = make_settings(plans_file=plans)
    ensure_topics(settings)
    store = open_store(settings, command="pytest")
    store.migrate()
    load_plans_into(store, load_plans(plans))
    worker = WorkerProcess(settings, settings.state_dir / "worker.log")
    sink = Sink(settings, store)
    stop = threading.Event()
    thread = threading.Thread(target=sink.run, args=(stop,), daemon=True)
    thread.start()
    try:
        start = datetime.now(UTC) - timedelta(hours=1)
        sim = Simulator(200, seed=5, start=start, rate=2000.0, rhythm=False, malformed=0.01)
        publish_subscriptions(settings, sim.subscriptions())
        with UsageProducer(settings) as producer:
            for i, item in enumerate(sim.stream()):
                if i >= N_ITEMS:
                    break
                if isinstance(item.payload, bytes):
                    producer.send_raw(b"malformed", item.payload)
                else:
                    producer.send(item.payload)
        wait_for_lag_zero(
            settings,
            settings.processor.app_id,
            [settings.topics.events],
            300,
            check=worker.check_alive,
        )
        topics = settings.topics
        wait_for_lag_zero(
            settings,
            settings.sink.group_id,
            [
                topics.priced,
                topics.rollups,
                topics.dlq,
                topics.alerts,
                topics.enforcement,
                topics.overages,
                topics.subscriptions,
            ],
            300,
        )
        yield settings, store
    finally:
        worker.stop()
        stop.set()
        thread.join(30)
        sink.close()
        store.close()


def test_every_panel_returns_rows_with_its_columns(simulated: tuple[Settings, Any]) -> None:
    settings, store = simulated
    now = datetime.now(UTC)
    window = {
        "from_s": int((now - timedelta(days=2)).timestamp()),
        "to_s": int((now + timedelta(hours=1)).timestamp()),
        "interval_s": 60,
        "variables": {"org": ""},
    }
    failures = []
    for board, panel in panel_specs():
        sql = expand_macros(panel.query(settings.clickhouse.database), **window)  # type: ignore[arg-type]
        assert "$" not in sql, f"{board.title} / {panel.title}: unexpanded {sql}"
        names, rows = store.query(sql)
        missing = [c for c in panel.columns if c not in names]
        if missing or not rows:
            failures.append(f"{board.title} / {panel.title}: {len(rows)} rows, missing {missing}")
    assert not failures, "\n".join(failures)

    # One organisation through the variable: the tier P&L panel still answers, for that org only.
    db = settings.clickhouse.database
    _, orgs = store.query(f"SELECT any(org_id) FROM {db}.priced_events")
    board, panel = panel_specs()[0]
    sql = expand_macros(
        panel.query(db),
        **{**window, "variables": {"org": orgs[0][0]}},  # type: ignore[arg-type]
    )
    assert store.query(sql)[1]

    # Hostile values go through the variable's formatter, as Grafana would send them: every
    # query still runs and returns nothing, as for an organisation that does not exist.
    events = store.query(f"SELECT count() FROM {db}.priced_events")[1]
    for board, panel in panel_specs():
        if not board.org_variable:
            continue
        for org in ("no-such-org", *(value.format(db=db) for value in HOSTILE_ORGS)):
            sql = expand_macros(
                panel.query(db),
                **{**window, "variables": {"org": org}},  # type: ignore[arg-type]
            )
            rows = store.query(sql)[1]
            assert rows == [], f"{board.title} / {panel.title} with org {org!r}: {rows[:3]}"
    assert store.query(f"SELECT count() FROM {db}.priced_events")[1] == events
