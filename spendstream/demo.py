"""``spendstream demo``: the whole pipeline on one machine, then a per-tier report.

Local Kafka (unless one is configured) -> topics -> ClickHouse migrations (embedded chDB unless a
server is configured) -> a worker process and an in-process sink -> simulated gateway traffic ->
wait until everything is landed (consumer lag 0) -> report -> clean shutdown.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from spendstream.commands._safe import safe_text
from spendstream.settings import Settings

TIER_ORDER = ("free", "pro", "team", "enterprise")

TIER_SQL = """
SELECT
    if(plan_id = '', '(no plan)', plan_id) AS tier,
    uniqExact(user_id) AS users,
    count() AS requests,
    sum(input_tokens) AS tokens_in,
    sum(output_tokens) AS tokens_out,
    sum(toDecimal256(cost, 24)) AS cost_usd,
    sum(toDecimal256(list_value, 24)) AS list_value_usd,
    sum(toDecimal256(saved_prompt_cache, 24)) + sum(toDecimal256(saved_semantic_cache, 24))
        AS saved_caching_usd,
    sum(toDecimal256(saved_routing, 24)) AS saved_routing_usd
FROM {db}.priced_events FINAL
GROUP BY plan_id
ORDER BY indexOf(['free', 'pro', 'team', 'enterprise'], plan_id), plan_id
"""

PIPELINE_SQL = """
SELECT
    (SELECT count() FROM {db}.priced_events FINAL) AS priced_events,
    (SELECT countIf(late) FROM {db}.priced_events FINAL) AS late_events,
    (SELECT countIf(unknown_model) FROM {db}.priced_events FINAL) AS unknown_model_events,
    (SELECT count() FROM {db}.dead_letters FINAL) AS dead_letters,
    (SELECT sum(requests) FROM {db}.rollups FINAL) AS rollup_requests
"""


@dataclass
class DemoOptions:
    """What to simulate."""

    users: int = 2000
    duration_s: float = 60.0
    rate: float = 300.0
    seed: int | None = None
    out_of_order: float = 0.02
    duplicates: float = 0.01
    malformed: float = 0.002
    drain_timeout_s: float = 300.0
    notify: bool = False
    """Also run ``spendstream notify`` against a local receiver and count what it got."""


def run_demo(settings: Settings, options: DemoOptions, console: Console) -> dict[str, Any]:
    """Run the demo end to end; return the report rows (also printed)."""
    from sinks import Sink, open_store
    from spendstream.kafka_admin import ensure_topics
    from spendstream.localkafka import LocalKafka
    from spendstream.runner import WorkerProcess, wait_for_lag_zero
    from spendstream.simulate import Simulator, run_simulation

    seed = options.seed if options.seed is not None else int(time.time())
    local: LocalKafka | None = None
    worker: Any = None
    sink: Sink | None = None
    sink_thread: threading.Thread | None = None
    stop_sink = threading.Event()
    store = None
    notifier: Any = None
    try:
        if settings.kafka.is_local_default:
            local = LocalKafka.from_settings(settings)
            if local.status().answering:
                console.print(f"[green]✓[/] Kafka already running at {local.bootstrap}")
                local = None  # not ours to stop
            else:
                with console.status("starting the local Kafka broker (KRaft)…"):
                    local.up()
                console.print(f"[green]✓[/] Kafka {local.bootstrap} (log: {local.log_path})")
        else:
            console.print(f"[green]✓[/] Kafka at {settings.kafka.bootstrap_servers}")
        ensure_topics(settings)
        console.print("[green]✓[/] topics ready")

        store = open_store(settings, command="spendstream demo")
        applied = store.migrate()
        from spendstream.analytics import load_current_plans

        load_current_plans(store, settings.plans_file)  # the plans in force, for the P&L
        where = settings.clickhouse.url or f"embedded chDB at {settings.chdb_path}"
        console.print(f"[green]✓[/] ClickHouse: {where} ({len(applied)} new migrations)")

        worker = WorkerProcess(settings, settings.state_dir / "worker.log")
        console.print(f"[green]✓[/] worker started (pid {worker.proc.pid}, log {worker.log_path})")
        with console.status("worker: joining its group and restoring its state…"):
            ready = worker.wait_state_ready(timeout_s=options.drain_timeout_s)
        if ready is None:
            console.print("[yellow]![/] the worker has not reported its state ready; going on")
        else:
            console.print(f"[green]✓[/] worker {escape(ready)}", highlight=False)
        sink = Sink(settings, store)
        sink_thread = threading.Thread(target=sink.run, args=(stop_sink,), name="sink", daemon=True)
        sink_thread.start()
        console.print("[green]✓[/] sink started")
        if options.notify:
            from spendstream.notify.receiver import LocalNotify

            notifier = LocalNotify(settings, group_id=f"{settings.processor.app_id}-demo-notify")
            console.print(f"[green]✓[/] notify started, to {notifier.receiver.url}")

        sim = Simulator(
            options.users,
            seed,
            datetime.now(UTC),
            rhythm=False,  # live traffic: a flat rate, so event time never runs ahead of now
            rate=options.rate,
            out_of_order=options.out_of_order,
            duplicates=options.duplicates,
            malformed=options.malformed,
        )
        console.print(
            f"simulating {options.users} users for {options.duration_s:g} s at about "
            f"{options.rate:g} events/s (seed {seed})"
        )
        run_simulation(settings, sim, options.duration_s, console=console)
        with console.status("admission: a burst of concurrent requests against a hard cap…"):
            burst = admission_burst(settings)
        console.print(
            f"[green]✓[/] admission: {burst['requests']} concurrent requests of "
            f"{burst['estimate_usd']} USD at most, {burst['allowance_usd']} USD allowed: "
            f"{burst['admitted']} admitted, {burst['refused']} refused (CapGuard alone, which "
            "knows only finished calls, would have let all of them through)",
            highlight=False,
        )

        with console.status("waiting for the worker to process everything…"):
            wait_for_lag_zero(
                settings,
                settings.processor.app_id,
                [settings.topics.events],
                options.drain_timeout_s,
                check=worker.check_alive,
            )
        console.print("[green]✓[/] worker caught up (lag 0)")
        t = settings.topics
        sink_topics = [t.priced, t.rollups, t.dlq, t.alerts, t.enforcement, t.overages]
        with console.status("waiting for the sink to land everything in ClickHouse…"):
            wait_for_lag_zero(
                settings, settings.sink.group_id, sink_topics, options.drain_timeout_s
            )
        console.print("[green]✓[/] sink drained (lag 0)")
        if notifier is not None:
            with console.status("waiting for notify to deliver every notification…"):
                notifier.drain(options.drain_timeout_s)

        report = print_report(store, settings, console)
        report["caps"] = print_caps(store, settings, console)
        burst["spent_usd"] = str(_spent(store, settings, burst["user_id"]))
        report["admission"] = burst
        console.print(
            f"admission burst: {burst['spent_usd']} USD of usage landed in ClickHouse for "
            f"{burst['user_id']}, against {burst['allowance_usd']} USD allowed",
            highlight=False,
        )
        if notifier is not None:
            report["notifications"] = notifier.receiver.counts()
            console.print(notifier.summary(), markup=False, highlight=False)
        console.print(
            "more: [bold]spendstream report[/] (tier P&L, heaviest users, savings; --html FILE "
            "for plots), [bold]spendstream whatif --plans deploy/whatif_sample_plans.yaml[/]"
        )
        return report
    finally:
        if notifier is not None:
            notifier.close()
        if worker is not None:
            worker.stop()
        if sink_thread is not None and sink is not None:
            stop_sink.set()
            sink_thread.join(timeout=30)
            sink.close()
        if store is not None:
            store.close()
        if local is not None:
            local.down()
            console.print("[green]✓[/] local Kafka stopped")


BURST_REQUESTS = 20
BURST_TOKENS = (10_000, 100)  # gpt-4o: 0.025 + 0.001 = 0.026 USD at most per call


def admission_burst(settings: Settings) -> dict[str, Any]:
    """Reserve-before-call under concurrency: one fresh user on the sample ``free`` plan (0.10
    USD per rolling 5 hours, block) and :data:`BURST_REQUESTS` concurrent admissions of a
    0.026 USD call; each admitted call sends its usage with the reservation id."""
    import asyncio
    import uuid

    from producers import Admitter, UsageProducer, publish_subscriptions
    from schemas import PlanPeriod, Subscription

    user = f"demo-burst-{uuid.uuid4().hex[:6]}"
    now = datetime.now(UTC)
    publish_subscriptions(
        settings,
        [
            Subscription(
                user_id=user,
                org_id="org-demo",
                billing_anchor=now - timedelta(days=1),
                plans=[PlanPeriod(plan_id="free", effective_at=now - timedelta(days=1))],
            )
        ],
    )
    inp, out = BURST_TOKENS

    async def burst() -> list[Any]:
        async with Admitter(settings, pool=0) as admitter:
            # The worker learns the new subscription from its topic: until then it answers
            # "no_plan" (caps do not apply). A one-token admission finds out when it has.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                probe = await admitter.aadmit(
                    user, "org-demo", "gpt-4o", input_tokens=1, output_tokens=0
                )
                if probe.reason != "no_plan":
                    break
                await asyncio.sleep(0.2)
            return list(
                await asyncio.gather(
                    *(
                        admitter.aadmit(
                            user, "org-demo", "gpt-4o", input_tokens=inp, output_tokens=out
                        )
                        for _ in range(BURST_REQUESTS)
                    )
                )
            )

    tickets = asyncio.run(burst())
    admitted = [t for t in tickets if t.allowed]
    with UsageProducer(settings) as producer:
        for ticket in admitted:
            producer.send(
                {
                    "event_id": f"{ticket.reservation_id}-call",
                    "occurred_at": datetime.now(UTC).isoformat(),
                    "org_id": "org-demo",
                    "user_id": user,
                    "gateway": "demo-burst",
                    "requested_model": ticket.model or "gpt-4o",
                    "input_tokens": inp,
                    "output_tokens": out,
                    "reservation_id": ticket.reservation_id,
                }
            )
    return {
        "user_id": user,
        "requests": BURST_REQUESTS,
        "admitted": len(admitted),
        "refused": BURST_REQUESTS - len(admitted),
        "estimate_usd": "0.026",
        "allowance_usd": "0.10",
    }


def _spent(store: Any, settings: Settings, user: str) -> Any:
    db = settings.clickhouse.database
    _, rows = store.query(
        f"SELECT sum(toDecimal256(cost, 24)) FROM {db}.priced_events FINAL "
        "WHERE user_id = {user:String}",
        parameters={"user": user},
    )
    return rows[0][0] if rows else 0


def print_report(store: Any, settings: Settings, console: Console) -> dict[str, Any]:
    """Print the per-tier table and pipeline counts from ClickHouse SQL; return them."""
    db = settings.clickhouse.database
    columns, rows = store.query(TIER_SQL.format(db=db))
    table = Table(title="Usage and inference cost per tier (ClickHouse, priced_events FINAL)")
    money_cols = {"cost_usd", "list_value_usd", "saved_caching_usd", "saved_routing_usd"}
    for name in columns:
        table.add_column(name.replace("_", " "), justify="left" if name == "tier" else "right")
    for row in rows:
        table.add_row(
            *[
                f"{v:,.2f}"
                if c in money_cols
                else (f"{v:,}" if isinstance(v, int) else safe_text(str(v)))
                for c, v in zip(columns, row, strict=True)
            ]
        )
    console.print(table)
    count_cols, count_rows = store.query(PIPELINE_SQL.format(db=db))
    summary = dict(zip(count_cols, count_rows[0], strict=True)) if count_rows else {}
    console.print(
        "pipeline: "
        + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in summary.items() if v is not None)
    )
    return {
        "tiers": [dict(zip(columns, r, strict=True)) for r in rows],
        "pipeline": summary,
    }


ALERTS_SQL = """
SELECT plan_id, window, kind, threshold, count() AS alerts, uniqExact(user_id) AS users
FROM {db}.alerts FINAL
GROUP BY plan_id, window, kind, threshold
ORDER BY indexOf(['free', 'pro', 'team', 'enterprise'], plan_id), window, kind, threshold
"""

ENFORCEMENT_SQL = """
SELECT plan_id, state, reason, count() AS changes, uniqExact(user_id) AS users
FROM {db}.enforcement_changes FINAL
GROUP BY plan_id, state, reason
ORDER BY indexOf(['free', 'pro', 'team', 'enterprise'], plan_id), state, reason
"""

OVERAGE_SQL = """
SELECT plan_id, record, count() AS records, uniqExact(user_id) AS users,
    sum(toDecimal256(amount, 24)) AS usd
FROM {db}.overages FINAL
GROUP BY plan_id, record
ORDER BY indexOf(['free', 'pro', 'team', 'enterprise'], plan_id), record
"""


def print_caps(store: Any, settings: Settings, console: Console) -> dict[str, Any]:
    """Print the alerts, enforcement changes and overage the run produced; return them."""
    db = settings.clickhouse.database
    out: dict[str, Any] = {}
    for title, sql, key in (
        (
            "Threshold and break-even alerts (once per user, window instance, threshold)",
            ALERTS_SQL,
            "alerts",
        ),
        ("Enforcement changes published to gateways", ENFORCEMENT_SQL, "enforcement"),
        ("Overage billed and credits drawn", OVERAGE_SQL, "overage"),
    ):
        columns, rows = store.query(sql.format(db=db))
        out[key] = [dict(zip(columns, r, strict=True)) for r in rows]
        table = Table(title=title)
        for name in columns:
            table.add_column(
                name,
                justify="right"
                if name in {"alerts", "users", "changes", "records", "usd", "threshold"}
                else "left",
            )
        for row in rows:
            table.add_row(
                *[
                    f"{v:,.4f}" if c == "usd" else safe_text(str(v))
                    for c, v in zip(columns, row, strict=True)
                ]
            )
        if not rows:
            table.add_row(*["-"] * len(columns))
        console.print(table)
    return out
