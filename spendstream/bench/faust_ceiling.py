"""The faust ceiling: how fast faust alone hands the input topic to an agent, with no work.

A child process runs the worker's faust App (:func:`stream_processors.faust_app`, the same
configuration, monitor, fetch wait and fast hand-over of fetched messages) under its own
consumer group, with one agent that takes the input in the worker's batches (``batch_size``
events or ``batch_within_s``), counts them and does nothing else: no decoding, no state, no
outputs.
Two hand-overs can be measured (``path``):

* ``lane``, the worker's: the fetch loop appends the input topic's messages to an
  :class:`~stream_processors._lane.InputLane` and the agent takes them from it; the topic is
  declared without acks, as in the worker (which commits its offsets itself);
* ``stream``, faust's own: the conductor makes an Event per message and the agent iterates its
  stream with ``take_events``; faust acks and commits as usual.

The ``lane`` figure bounds the worker on this machine, since the worker does the same
consumption plus its own work; the ``stream`` figure is what a worker built the usual faust
way could at most reach.

The child writes ``<monotonic seconds> <events so far>`` after each batch to a progress file;
the parent reads it every 0.1 s, as it reads the worker's output topic.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spendstream.runner import stop_process
from spendstream.settings import Settings, load_settings

if TYPE_CHECKING:
    from spendstream.bench.worker import BenchInput

_PROGRESS_ENV = "SPENDSTREAM_BENCH_FAUST_PROGRESS"
_PATH_ENV = "SPENDSTREAM_BENCH_FAUST_PATH"
PATHS = ("lane", "stream")


def faust_ceiling_rate(data: BenchInput, path: str = "lane") -> dict[str, Any]:
    """Events/s of the no-work faust agent over ``data``'s input topic (see the module doc).

    ``path`` is ``lane`` (the worker's hand-over) or ``stream`` (faust's); each path consumes
    under a consumer group of its own.
    """
    from spendstream.bench.worker import progress_rates

    if path not in PATHS:
        raise ValueError(f"path must be one of {', '.join(PATHS)}, not {path!r}")
    progress = data.workdir / f"faust-ceiling-{path}.progress"
    progress.write_text("")
    log_path = data.workdir / f"faust-ceiling-{path}.log"
    env = {
        **os.environ,
        **data.settings.to_env(),
        _PROGRESS_ENV: str(progress),
        _PATH_ENV: path,
    }
    expected = len(data.payloads)
    samples: list[tuple[float, int]] = []
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "spendstream.bench.faust_ceiling"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        t0 = time.monotonic()
        try:
            while not samples or samples[-1][1] < expected:
                if proc.poll() is not None:
                    tail = log_path.read_text(errors="replace").splitlines()[-15:]
                    raise RuntimeError(
                        f"the faust ceiling job exited with code {proc.returncode}:\n"
                        + "\n".join(tail)
                    )
                if time.monotonic() - t0 > 900:
                    raise TimeoutError("the faust ceiling job did not finish within 15 minutes")
                time.sleep(0.1)
                samples = _read_progress(progress)
        finally:
            stop_process(proc)
    first, rate, steady = progress_rates(samples, expected)
    return {
        "path": path,
        "events_per_s": rate,
        "steady_events_per_s": steady,
        "events": samples[-1][1],
        "batches": len(samples),
        "startup_s": first - t0,
    }


def _read_progress(path: Path) -> list[tuple[float, int]]:
    samples = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:  # a line being written is skipped until it is whole
            samples.append((float(parts[0]), int(parts[1])))
    return samples


def run_ceiling_job(settings: Settings, progress: Path, path: str) -> None:  # pragma: no cover
    """Run the no-work agent until SIGTERM, appending progress lines to ``progress``."""
    import faust

    from spendstream.worker import gc_tuned
    from stream_processors import faust_app, input_lane
    from stream_processors.faust_patches import (
        patch_consumers,
        use_fast_handover,
        use_fetch_wait,
        use_lane,
    )

    p = settings.processor
    app = faust_app(settings, app_id=f"{p.app_id}-faust-ceiling-{path}")
    lane = input_lane(settings)  # as the worker's

    def patch(consumer: Any) -> None:
        use_fast_handover(consumer)
        use_fetch_wait(consumer, p.fetch_max_wait_ms)
        if path == "lane":
            use_lane(consumer, lane)

    patch_consumers(app, patch)
    events = app.topic(
        settings.topics.events, key_serializer="raw", value_serializer="raw", acks=path != "lane"
    )
    out = progress.open("a")
    count = 0

    def counted(n: int) -> None:
        nonlocal count
        count += n
        out.write(f"{time.monotonic():.6f} {count}\n")
        out.flush()

    @app.agent(events)
    async def count_only(stream: Any) -> None:
        if path == "stream":
            async for batch in stream.take_events(p.batch_size, within=p.batch_within_s):
                counted(len(batch))
        while True:
            batch, _ = await lane.take(p.batch_size, p.batch_within_s)
            counted(len(batch))

    worker: Any = faust.Worker(app, loglevel="warning", quiet=True)
    with gc_tuned():
        worker.execute_from_commandline()


if __name__ == "__main__":  # pragma: no cover - the child process
    run_ceiling_job(load_settings(), Path(os.environ[_PROGRESS_ENV]), os.environ[_PATH_ENV])
