"""``spendstream bench``: every throughput and latency figure in one run, on this machine.

Sections (each can be skipped): the producer (validated vs raw), one worker (events/s on the
broker, and the same pure processing without Kafka), the sink into chDB (rows/s), the caps
path (event-to-alert and event-to-rollup latency at fixed rates), baselines for the worker (a
bare consumer doing the same per-event work, the same job in quixstreams, and the faust ceiling:
the worker's faust App taking batches and doing nothing else), the worker's state size per
active user-window at 100,000 users, recovery (a restarted worker's blind time), and admission
(decisions/s on the local path, strict-path latency at a fixed rate, a hard cap's overshoot
under a burst). Speed is measured here, never asserted in tests.

``repeat`` runs every selected section that many times, round after round on one broker that
stays up (warm), so that the worker, the bare consumer and quixstreams alternate within each
round and each ratio compares runs made side by side; :func:`summarize` then gives each
figure's min, median and max, and the per-run values of the ratios.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from spendstream.settings import Settings

SECTIONS = ("producer", "worker", "sink", "caps", "baselines", "state", "recovery", "admission")


@dataclass
class BenchOptions:
    """Sizes of each section."""

    producer_events: int = 200_000
    worker_events: int = 100_000
    worker_users: int = 2_000
    worker_processes: int = 1
    """Workers of the worker section (one consumer group, a state folder each)."""
    sink_rows: int = 500_000
    caps_rates: tuple[int, ...] = (2_000, 10_000)
    caps_seconds: float = 10.0
    caps_workers: int = 1
    state_users: int = 100_000
    recovery_events: int = 1_000_000
    admission_seconds: float = 10.0
    """Seconds of open-loop strict admissions for the admission section."""
    admission_rate: int = 1_000
    """Strict admissions/s of the admission section's open loop."""
    skip: tuple[str, ...] = ()
    repeat: int = 1
    """Rounds of every selected section (1: one run, printed and returned as before)."""


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
    """Run the sections not skipped; print a table per section; return every figure.

    With ``options.repeat`` above 1 the sections run that many rounds in turn, all on one
    broker; the result holds every round (``runs``) and :func:`summarize` of them
    (``summary``), printed as one table per section.
    """
    rounds = max(options.repeat, 1)
    runs: list[dict[str, Any]] = []
    names = [name for name, _ in _round_steps(settings, options, {})]
    needs_broker = any(name not in ("sink", "state") for name in names)
    with broker(settings, console) if needs_broker else _nothing():
        for index in range(rounds):
            results: dict[str, Any] = {"machine": machine()}
            runs.append(results)
            label = f" (round {index + 1}/{rounds})" if rounds > 1 else ""
            for name, step in _round_steps(settings, options, results):
                with console.status(f"benchmark: {name}{label}…"):
                    t0 = time.monotonic()
                    figures = step()
                figures["section_s"] = round(time.monotonic() - t0, 1)
                results[name] = figures
                print_section(console, name + label, figures)
    if rounds == 1:
        return runs[0]
    summary = summarize([{k: v for k, v in run.items() if k != "machine"} for run in runs])
    for name, figures in summary.items():
        print_summary(console, name, figures)
    return {
        "machine": runs[0]["machine"],
        "repeat": rounds,
        "load_avg_1m": [run["machine"]["load_avg_1m"] for run in runs],
        "summary": summary,
        "runs": runs,
    }


def _round_steps(
    settings: Settings, options: BenchOptions, results: dict[str, Any]
) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
    """The sections of one round, in order; ``results`` is the round's, filled as it runs."""
    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    if "producer" not in options.skip:
        from spendstream.bench.producer import run_producer_bench

        steps.append(("producer", lambda: run_producer_bench(settings, options.producer_events)))
    if "worker" not in options.skip:
        from spendstream.bench.worker import run_worker_bench

        steps.append(
            (
                "worker",
                lambda: run_worker_bench(
                    settings,
                    options.worker_events,
                    options.worker_users,
                    processes=options.worker_processes,
                ),
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
            # figure is reused rather than measured twice (if it is one worker's).
            section = results.get("worker", {})
            one = section.get("processes", 1) == 1
            worker = section.get("worker_events_per_s") if one else None
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
    if "admission" not in options.skip:
        from spendstream.bench.admission import run_admission_bench

        steps.append(
            (
                "admission",
                lambda: run_admission_bench(
                    settings, options.admission_seconds, options.admission_rate
                ),
            )
        )
    return steps


def is_ratio(figure: str) -> bool:
    """Whether a figure is a ratio of two measured in the same round (worker / bare ...)."""
    return figure == "ratio" or "_vs_" in figure


def summarize(runs: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Section -> figure -> ``min``, ``median``, ``max`` and ``runs`` (every round's value).

    Only numbers are summarized (booleans, text and nested tables are left out); a figure a
    round lacks (quixstreams skipped in that round) is summarized over the rounds that have
    it, and ``runs`` says how many those were. Ratio figures (:func:`is_ratio`) also carry
    ``per_run``: each was computed within its round, so the rounds are compared as ratios,
    never as a ratio of medians.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for run in runs:
        for section, figures in run.items():
            if not isinstance(figures, dict):
                continue
            for figure, value in figures.items():
                if isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                out.setdefault(section, {}).setdefault(figure, {"runs": []})["runs"].append(value)
    for figures in out.values():
        for figure, entry in figures.items():
            values = entry["runs"]
            median = statistics.median(values)
            if all(isinstance(v, int) for v in values) and median == int(median):
                median = int(median)  # a count stays a count (6 partitions, not 6.0)
            entry.update(min=min(values), median=median, max=max(values))
            if is_ratio(figure):
                entry["per_run"] = list(values)
    return out


def caps_latency(settings: Settings, rate: int, seconds: float, workers: int = 1) -> dict[str, Any]:
    """Event-to-alert and event-to-rollup latency at ``rate`` events/s through ``workers``
    workers started for it (one consumer group: they share the partitions)."""
    import shutil
    import tempfile
    import uuid
    from pathlib import Path

    from spendstream.bench.caps import run_caps_bench
    from spendstream.bench.worker import isolated, wait_for_group
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
            wait_for_group(conf, s.processor.app_id, workers, procs)
        figures = run_caps_bench(s, rate, seconds, users=min(2_000, max(rate // 5, 100)))
        for proc in procs:
            proc.check_alive()
        return {**figures, "workers": workers}
    finally:
        for proc in procs:
            proc.stop()
        delete_topics(conf, [t for t in topic_partitions(conf) if t.startswith(prefix)])
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_summary(console: Console, name: str, figures: dict[str, dict[str, Any]]) -> None:
    """One table of a section's figures over the rounds: min, median, max; ratios per run."""
    table = Table(title=f"bench: {name}, over the rounds")
    table.add_column("figure")
    for column in ("min", "median", "max"):
        table.add_column(column, justify="right")
    ratios = any("per_run" in entry for entry in figures.values())
    if ratios:
        table.add_column("per run", justify="right")
    for figure, entry in figures.items():
        cells = [figure, _fmt(entry["min"]), _fmt(entry["median"]), _fmt(entry["max"])]
        if ratios:
            cells.append(", ".join(_fmt(v) for v in entry.get("per_run", ())))
        table.add_row(*cells)
    console.print(table)


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
