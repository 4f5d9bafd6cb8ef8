"""``spendstream bench``: every throughput and latency figure in one run, on this machine.

Sections (each can be skipped): the producer (validated vs raw), one worker (events/s on the
broker, and the same pure processing without Kafka), the sink into chDB (rows/s), the caps
path (event-to-alert and event-to-rollup latency at fixed rates), baselines for the worker (a
bare consumer doing the same per-event work, the same job in quixstreams, and the faust ceiling:
the worker's faust App taking batches and doing nothing else), and the worker's state size per
active user-window at 100,000 users. Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from spendstream.settings import Settings

SECTIONS = ("producer", "worker", "sink", "caps", "baselines", "state", "recovery")


@dataclass
class BenchOptions:
    """Sizes of each section."""

    producer_events: int = 200_000
    worker_events: int = 100_000
    worker_users: int = 2_000
    sink_rows: int = 500_000
    caps_rates: tuple[int, ...] = (2_000, 10_000)
    caps_seconds: float = 10.0
    caps_workers: int = 1
    state_users: int = 100_000
    recovery_events: int = 1_000_000
    skip: tuple[str, ...] = ()


@contextmanager
def broker(settings: Settings, console: Console) -> Iterator[None]:
    """The configured broker, or a local one started (and stopped) for the benchmark."""
    from spendstream.localkafka import LocalKafka

    local = None
    if settings.kafka.is_local_default:
        candidate = LocalKafka.from_settings(settings)
        if not candidate.status().answering:
            with console.status("starting the local Kafka broker…"):
                candidate.up()
            local = candidate
    try:
        yield
    finally:
        if local is not None:
            local.down()


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import os

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
    }


def run_bench(settings: Settings, options: BenchOptions, console: Console) -> dict[str, Any]:
    """Run the sections not skipped; print a table per section; return every figure."""
    results: dict[str, Any] = {"machine": machine()}
    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    if "producer" not in options.skip:
        from spendstream.bench.producer import run_producer_bench

        steps.append(("producer", lambda: run_producer_bench(settings, options.producer_events)))
    if "worker" not in options.skip:
        from spendstream.bench.worker import run_worker_bench

        steps.append(
            (
                "worker",
                lambda: run_worker_bench(settings, options.worker_events, options.worker_users),
            )
        )
    if "sink" not in options.skip:
        from spendstream.bench.sink import run_sink_bench

        steps.append(("sink", lambda: run_sink_bench(settings, options.sink_rows)))
    if "caps" not in options.skip:
        for rate in options.caps_rates:
            steps.append(
                (
                    f"caps@{rate}/s",
                    lambda r=rate: caps_latency(  # type: ignore[misc]
                        settings, r, options.caps_seconds, options.caps_workers
                    ),
                )
            )
    if "baselines" not in options.skip:
        from spendstream.bench.baselines import run_baselines

        def baselines() -> dict[str, Any]:
            # Same events and users as the worker section: the input is deterministic, so its
            # figure is reused rather than measured twice.
            worker = results.get("worker", {}).get("worker_events_per_s")
            return run_baselines(
                settings,
                options.worker_events,
                options.worker_users,
                worker_events_per_s=worker,
            )

        steps.append(("baselines", baselines))
    if "state" not in options.skip:
        from spendstream.bench.state import run_state_bench

        steps.append(("state", lambda: run_state_bench(settings, options.state_users, per_user=4)))
    if "recovery" not in options.skip:
        from spendstream.bench.recovery import run_recovery_bench

        steps.append(("recovery", lambda: run_recovery_bench(settings, options.recovery_events)))
    needs_broker = any(name not in ("sink", "state") for name, _ in steps)
    with broker(settings, console) if needs_broker else _nothing():
        for name, step in steps:
            with console.status(f"benchmark: {name}…"):
                t0 = time.monotonic()
                figures = step()
            figures["section_s"] = round(time.monotonic() - t0, 1)
            results[name] = figures
            print_section(console, name, figures)
    return results


def caps_latency(settings: Settings, rate: int, seconds: float, workers: int = 1) -> dict[str, Any]:
    """Event-to-alert and event-to-rollup latency at ``rate`` events/s through ``workers``
    workers started for it (one consumer group: they share the partitions)."""
    import shutil
    import tempfile
    import uuid
    from pathlib import Path

    from spendstream.bench.caps import run_caps_bench
    from spendstream.bench.worker import isolated
    from spendstream.kafka_admin import delete_topics, ensure_topics, topic_partitions
    from spendstream.runner import WorkerProcess

    prefix = f"bench-caps-{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix="spendstream-bench-caps-"))
    s = isolated(settings, prefix, workdir)
    conf = s.kafka.confluent_config()
    ensure_topics(s)
    procs = [WorkerProcess(s, workdir / f"worker-{i}.log") for i in range(workers)]
    try:
        if workers > 1:
            # Measure only once the group has settled: a rebalance mid-run would be measured.
            _wait_for_group(conf, s.processor.app_id, workers, procs)
        figures = run_caps_bench(s, rate, seconds, users=min(2_000, max(rate // 5, 100)))
        for proc in procs:
            proc.check_alive()
        return {**figures, "workers": workers}
    finally:
        for proc in procs:
            proc.stop()
        delete_topics(conf, [t for t in topic_partitions(conf) if t.startswith(prefix)])
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_for_group(
    conf: dict[str, Any], group_id: str, members: int, procs: list[Any], timeout_s: float = 180.0
) -> None:
    """Block until ``group_id`` is stable with ``members`` members (faust's assignor encodes
    assignments in its own format, so the members' partitions are not read here)."""
    from confluent_kafka import ConsumerGroupState, KafkaException

    from spendstream.kafka_admin import admin_client

    admin = admin_client(conf, quiet=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in procs:
            proc.check_alive()
        try:
            group = admin.describe_consumer_groups([group_id])[group_id].result(timeout=10)
        except (KafkaException, TimeoutError):  # no group yet, or its coordinator is loading
            group = None
        if (
            group is not None
            and group.state == ConsumerGroupState.STABLE
            and len(group.members) == members
        ):
            return
        time.sleep(0.5)
    raise TimeoutError(f"group {group_id!r} did not settle with {members} members in time")


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_section(console: Console, name: str, figures: dict[str, Any]) -> None:
    """One two-column table of a section's figures."""
    table = Table(title=f"bench: {name}", show_header=False)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in figures.items():
        if isinstance(value, dict | list):
            continue
        table.add_row(key, _fmt(value))
    console.print(table)
