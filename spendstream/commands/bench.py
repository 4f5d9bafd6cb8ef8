"""``spendstream bench``: the benchmark command."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from spendstream.commands._common import console, fail, settings_or_exit
from spendstream.errors import SpendstreamError


def register(app: typer.Typer) -> None:
    """Add the ``bench`` command."""

    @app.command("bench")
    def bench(
        producer_events: int = typer.Option(
            200_000, "--producer-events", min=1000, help="Events for the producer section."
        ),
        worker_events: int = typer.Option(
            100_000,
            "--worker-events",
            min=1000,
            help="Events for the worker and baselines sections.",
        ),
        worker_users: int = typer.Option(2_000, "--worker-users", min=1, help="Users simulated."),
        worker_processes: int = typer.Option(
            1,
            "--worker-processes",
            min=1,
            help=(
                "Worker processes (one consumer group, a state folder each) for the worker "
                "section; above 1, the baselines measure one worker of their own."
            ),
        ),
        sink_rows: int = typer.Option(
            500_000, "--sink-rows", min=1000, help="Priced events inserted into chDB."
        ),
        caps_rate: list[int] = typer.Option(
            [2_000, 10_000],
            "--caps-rate",
            min=1,
            help=(
                "Events/s for the event-to-alert and event-to-rollup latency "
                "(repeatable; default 2000 and 10000)."
            ),
        ),
        caps_seconds: float = typer.Option(
            10.0, "--caps-seconds", min=1, help="Seconds of traffic for the latency section."
        ),
        caps_workers: int = typer.Option(
            1,
            "--caps-workers",
            min=1,
            help="Workers (one consumer group) for the latency section.",
        ),
        state_users: int = typer.Option(
            100_000,
            "--state-users",
            min=100,
            help="Users simulated for the state-size section (4 events per user).",
        ),
        recovery_events: int = typer.Option(
            1_000_000,
            "--recovery-events",
            min=1000,
            help="Events of state the recovery section restarts a worker on.",
        ),
        admission_seconds: float = typer.Option(
            10.0,
            "--admission-seconds",
            min=1,
            help="Seconds of open-loop strict admissions for the admission section.",
        ),
        admission_rate: int = typer.Option(
            1_000,
            "--admission-rate",
            min=10,
            help="Strict admissions/s of the admission section's open loop (pool 0).",
        ),
        skip: list[str] = typer.Option(
            [],
            "--skip",
            help=(
                "Skip a section: producer, worker, sink, caps, baselines, state, recovery or "
                "admission (repeatable)."
            ),
        ),
        repeat: int = typer.Option(
            1,
            "--repeat",
            min=1,
            help=(
                "Run the selected sections N times, round after round on one warm broker "
                "(worker, bare consumer and quixstreams alternate within each round), then "
                "print each figure's min/median/max and the per-run ratios."
            ),
        ),
        json_out: Path | None = typer.Option(
            None, "--json", help="Also write every figure to this JSON file."
        ),
    ) -> None:
        """Measure producer, worker, sink, caps, baseline, state-size, recovery and admission
        figures.

        Uses the configured broker or starts the local one (and stops it after); topics are
        created under a unique prefix and deleted afterwards; chDB runs in a temporary folder.
        With --repeat N every selected section runs N times on the same broker, and the
        figures are summarized over the rounds (min, median, max; ratios per run), as
        BENCHMARKS.md quotes them.
        """
        from spendstream.bench import SECTIONS, BenchOptions, run_bench
        from spendstream.runner import sigterm_as_interrupt

        unknown = sorted(set(skip) - set(SECTIONS))
        if unknown:
            fail(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", 2)
        settings = settings_or_exit()
        options = BenchOptions(
            producer_events=producer_events,
            worker_events=worker_events,
            worker_users=worker_users,
            worker_processes=worker_processes,
            sink_rows=sink_rows,
            caps_rates=tuple(caps_rate),
            caps_seconds=caps_seconds,
            caps_workers=caps_workers,
            state_users=state_users,
            recovery_events=recovery_events,
            admission_seconds=admission_seconds,
            admission_rate=admission_rate,
            skip=tuple(skip),
            repeat=repeat,
        )
        try:
            with sigterm_as_interrupt():
                results = run_bench(settings, options, console)
        except SpendstreamError as exc:
            fail(str(exc))
        if json_out is not None:
            json_out.write_text(json.dumps(results, indent=2, default=str) + "\n")
            console.print(f"wrote {json_out}")
