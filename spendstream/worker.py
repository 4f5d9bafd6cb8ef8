"""Run the stream-processing worker (one deployable, one entry point: ``spendstream worker``)."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from spendstream.settings import Settings

GC_GEN0_THRESHOLD = 100_000
"""Allocations between the cyclic collector's young-generation passes (CPython's default: 700)."""


@contextmanager
def gc_tuned() -> Iterator[None]:
    """Collect cycles less often while the block runs (the worker runs in one).

    Each event allocates a dozen objects that reference counting frees; with the default
    threshold the cyclic collector still ran every few dozen events and, on every older pass,
    walked the whole start-up heap (faust, pydantic, the price map). Freezing that heap and
    raising the threshold measured +15 % on the pure pipeline (4 alternating runs each).
    Cycles are still collected, only in larger steps.
    """
    before = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, before[1], before[2])
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def run_worker(settings: Settings, *, loglevel: str | None = None) -> None:
    """Build the faust app from settings and run it until SIGTERM/SIGINT (graceful stop).

    Subscriptions are read to the end of their topic before the first event is consumed.
    """
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        pass
    else:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    import faust

    from spendstream import metrics
    from spendstream.kafka_admin import ensure_answer_topic
    from stream_processors import build_app

    ensure_answer_topic(settings)

    last_batch = [time.monotonic()]

    def on_batch(result: Any) -> None:
        last_batch[0] = time.monotonic()
        metrics.observe_worker_batch(result.counters, size=result.counters.get("in", 0))

    def on_caps(capped: Any) -> None:
        metrics.observe_worker_batch(capped.counters)

    built = build_app(settings, on_batch=on_batch, on_caps=on_caps)
    app, view = built.app, built.subscriptions
    closers = _serve_worker_metrics(
        settings,
        built.stats,
        last_batch,
        None if built.recovery is None else built.recovery.progress,
    )
    if view is not None:
        view.start(wait_s=60)
    level = (loglevel or settings.log_level).lower()
    worker: Any = faust.Worker(app, loglevel=level, quiet=True)
    logging.getLogger("faust").setLevel(level.upper())
    try:
        with gc_tuned():
            worker.execute_from_commandline()
    finally:
        for close in closers:
            close()
        if view is not None:
            view.close()


def worker_stalled(lag: int | None, idle_s: float, stall_after_s: float) -> bool:
    """Whether a worker with input ``lag`` that finished no batch for ``idle_s`` is stalled.

    An idle worker without lag is waiting, not stalled; an unknown lag (the broker did not
    answer) is reported by the lag probe instead.
    """
    return bool(lag) and idle_s > stall_after_s


def _serve_worker_metrics(
    settings: Settings, stats: Any, last_batch: list[float], restore: Any = None
) -> list[Callable[[], None]]:
    """``/metrics`` + ``/health`` and a lag probe of the worker's group, if a port is set.

    Healthy while the group's lag can be read (the broker answers); details carry the lag,
    the batch count, the seconds since the last batch and the state restore (``recovering``
    with the changelog records left per table). A restoring worker is healthy, not stalled:
    restarting it would only start the restore again.
    """
    port = settings.processor.metrics_port
    if not port:
        return []
    from spendstream import metrics

    # faust's consumer group id is the app id.
    probe = metrics.LagProbe(
        settings.kafka.confluent_config(), settings.processor.app_id, [settings.topics.events]
    )

    stall_after_s = settings.processor.stall_after_s
    if restore is not None:
        metrics.watch_restore(restore)

    def health() -> dict[str, Any]:
        idle_s = time.monotonic() - last_batch[0]
        restoring = restore is not None and restore.active
        if restoring:
            last_batch[0] = time.monotonic()  # the stall clock starts after the restore
        details: dict[str, Any] = {
            "batches": stats.batches,
            "seconds_since_batch": round(idle_s, 3),
            "lag": probe.total,
            "poison_records": stats.counters.get("poison", 0),
        }
        if restore is not None:
            details["state"] = restore.snapshot()
        if probe.error is not None:
            details["kafka_error"] = probe.error
        stalled = worker_stalled(probe.total, idle_s, stall_after_s)
        if stalled:
            details["stalled"] = (
                f"input lag {probe.total} and no batch for {idle_s:.0f} s "
                f"(processor.stall_after_s = {stall_after_s:g})"
            )
        return {"ok": probe.ok() and not stalled, "details": details}

    server = metrics.serve(port, health)
    return [server.close, probe.close]
