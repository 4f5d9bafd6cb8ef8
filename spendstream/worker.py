"""Run the stream-processing worker (one deployable, one entry point: ``spendstream worker``)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from spendstream.settings import Settings


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

    from stream_processors import build_app

    built = build_app(settings)
    app, view = built.app, built.subscriptions
    if view is not None:
        view.start(wait_s=60)
    level = (loglevel or settings.log_level).lower()
    worker: Any = faust.Worker(app, loglevel=level, quiet=True)
    logging.getLogger("faust").setLevel(level.upper())
    try:
        worker.execute_from_commandline()
    finally:
        if view is not None:
            view.close()
