"""Baselines for the worker's throughput, on the same pre-produced topic data.

These figures put the worker's events/s in context:

* **bare** (the near-limit): :func:`bare_rate`, one confluent-kafka consumer in one process doing
  the same per-event work in plain Python, with none of a stream processor's guarantees;
* **quix** (the peer framework): :func:`quix_rate`, the same job written idiomatically with
  quixstreams, run as a child process against the same broker and input topic, measured on its
  output topic as the worker is measured on its priced topic;
* **faust ceiling**: :func:`spendstream.bench.faust_ceiling.faust_ceiling_rate`, the worker's
  faust App with an agent that only takes and counts the input batches: what faust itself
  costs, through the worker's hand-over (the input lane) and through faust's own stream
  (``take_events``).

quixstreams pins older confluent-kafka and pydantic than spendstream uses, so it is not
installed next to the project: the job runs under the interpreter named by
``SPENDSTREAM_BENCH_QUIX_PYTHON`` (a venv holding quixstreams and the project's dependencies;
the project itself comes from ``PYTHONPATH``), or this interpreter when quixstreams imports
here. With neither, the quix figure is reported as skipped, with the reason.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spendstream.bench.worker import BenchInput
    from spendstream.settings import Settings

QUIX_PYTHON_ENV = "SPENDSTREAM_BENCH_QUIX_PYTHON"
"""Interpreter with quixstreams installed, used for the peer baseline."""

_JOB_ENV = "SPENDSTREAM_BENCH_QUIX_JOB"
_REPO_ROOT = Path(__file__).resolve().parent.parent


def run_baselines(
    settings: Settings,
    events: int = 100_000,
    users: int = 2_000,
    *,
    worker_events_per_s: float | None = None,
) -> dict[str, Any]:
    """Bare-consumer, quixstreams and faust-ceiling events/s on one input, next to the worker's.

    ``worker_events_per_s`` is the worker section's figure for the same ``events`` and ``users``
    (the input is deterministic); without it the worker is measured here on the same topic.
    Ratios are worker / baseline: below 1, the baseline is faster.
    """
    from spendstream.bench.faust_ceiling import faust_ceiling_rate
    from spendstream.bench.worker import bench_input, measure_worker

    with bench_input(settings, events, users, name="bench-base") as data:
        worker_source = "worker section" if worker_events_per_s is not None else "measured here"
        if worker_events_per_s is None:
            worker_events_per_s = float(measure_worker(data)["worker_events_per_s"])
        bare = bare_rate(data)
        quix = quix_rate(data)
        ceiling = faust_ceiling_rate(data, "lane")
        stream = faust_ceiling_rate(data, "stream")
    figures: dict[str, Any] = {
        "events": len(data.payloads),
        "users": users,
        "batch_size": data.settings.processor.batch_size,
        "partitions": data.settings.topics.partitions,
        "worker_events_per_s": worker_events_per_s,
        "worker_figure_from": worker_source,
        "bare_events_per_s": bare["events_per_s"],
        "worker_vs_bare": worker_events_per_s / bare["events_per_s"],
        "faust_ceiling_events_per_s": ceiling["events_per_s"],
        "worker_vs_faust_ceiling": worker_events_per_s / ceiling["events_per_s"],
        "faust_stream_events_per_s": stream["events_per_s"],
        "faust_lane_vs_stream": ceiling["events_per_s"] / stream["events_per_s"],
    }
    if "events_per_s" in quix:
        figures["quix_events_per_s"] = quix["events_per_s"]
        figures["quix_steady_events_per_s"] = quix["steady_events_per_s"]
        figures["worker_vs_quix"] = worker_events_per_s / quix["events_per_s"]
        figures["quix_startup_s"] = quix["startup_s"]
        figures["quix_version"] = quix["version"]
    else:
        figures["quix_skipped"] = quix["skipped"]
    figures["bare"] = bare
    figures["quix"] = quix
    figures["faust_ceiling"] = ceiling
    figures["faust_stream"] = stream
    return figures


# -- the near-limit: a bare consumer ---------------------------------------------------------


def bare_rate(data: BenchInput) -> dict[str, Any]:
    """Events/s of a bare consumer doing the worker's per-event work, nothing more.

    What it does, in this process, on ``data``'s input topic from the beginning: one
    confluent-kafka consumer (its own group, no commits) reads in batches of the worker's
    ``processor.batch_size`` (``consume(num_messages=...)``); per message it decodes and
    validates the event with ``schemas._wire.decode_usage`` (msgspec, the pydantic model for
    anything msgspec refuses, as the worker does), drops a repeated ``event_id`` with a Python
    set, prices it with :meth:`stream_processors.PriceCatalog.quote`, and adds requests,
    tokens, cost and list value to a dict keyed by (user, served model, 1-minute window
    start).

    What it does not do: no plan lookup, lateness, watermark or dedupe horizon; no dead letters
    (invalid events are counted only); no state store or changelog; no outputs (no priced
    events, rollups, alerts or enforcement); no caps; no offset commits. So it is an upper
    bound for Python doing this job on this machine, not a competitor.

    The rate runs from the end of the first non-empty batch to the end of the last one, so the
    group join and first fetch are not counted (the worker is measured likewise from its first
    output).
    """
    from confluent_kafka import Consumer

    from schemas.wire import decode_usage
    from spendstream.errors import InvalidEventError
    from stream_processors import PriceCatalog

    s = data.settings
    p = s.processor
    catalog = PriceCatalog.load(p.price_catalog, p.price_overrides)
    window_us = p.window_s * 1_000_000
    expected = len(data.payloads)
    consumer = Consumer(
        {
            **data.conf,
            "group.id": f"{data.prefix}-bare",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
        }
    )
    seen: set[str] = set()
    # (user, served model, window start µs) -> [requests, input, output, cost, list value]
    windows: dict[tuple[str, str, int], list[int]] = {}
    done = invalid = duplicates = 0
    first: tuple[float, int] | None = None
    deadline = time.monotonic() + 900
    try:
        consumer.subscribe([s.topics.events])
        while done < expected:
            if time.monotonic() > deadline:
                raise TimeoutError("the bare consumer did not finish within 15 minutes")
            batch = consumer.consume(num_messages=p.batch_size, timeout=1.0)
            for msg in batch:
                if msg.error():
                    continue
                done += 1
                try:
                    event = decode_usage(msg.value())
                except InvalidEventError:
                    invalid += 1
                    continue
                if event.event_id in seen:
                    duplicates += 1
                    continue
                seen.add(event.event_id)
                quote = catalog.quote(event)
                t = event.occurred_at
                t_us = int(t.timestamp()) * 1_000_000 + t.microsecond
                key = (
                    event.user_id,
                    event.served_model or event.requested_model,
                    t_us - t_us % window_us,
                )
                agg = windows.get(key)
                if agg is None:
                    agg = windows[key] = [0, 0, 0, 0, 0]
                agg[0] += 1
                agg[1] += event.input_tokens
                agg[2] += event.output_tokens
                agg[3] += quote.cost
                agg[4] += quote.list_value
            if batch and first is None:
                first = (time.monotonic(), done)
        end = time.monotonic()
    finally:
        consumer.close()
    assert first is not None
    rate = (done - first[1]) / max(end - first[0], 1e-9) if done > first[1] else 0.0
    return {
        "events_per_s": rate,
        "events": done,
        "invalid": invalid,
        "duplicates": duplicates,
        "windows": len(windows),
        "requests_aggregated": sum(a[0] for a in windows.values()),
    }


# -- the peer: quixstreams -------------------------------------------------------------------


def quix_python() -> tuple[str | None, str]:
    """(interpreter with quixstreams, how it was found) or (None, why there is none)."""
    named = os.environ.get(QUIX_PYTHON_ENV)
    if named:
        if Path(named).exists():
            return named, f"${QUIX_PYTHON_ENV}"
        return None, f"${QUIX_PYTHON_ENV}={named} does not exist"
    if importlib.util.find_spec("quixstreams") is not None:
        return sys.executable, "this interpreter"
    return None, f"no quixstreams here; set ${QUIX_PYTHON_ENV} (see spendstream.bench.baselines)"


def quix_rate(data: BenchInput) -> dict[str, Any]:
    """Events/s of the quixstreams job (:func:`quix_job`) over ``data``'s input topic.

    The job runs as a child process with its own consumer group and RocksDB state folder; its
    progress is read on its output topic (one message per new, valid event: the window's
    updated aggregate), sampled every 0.1 s, exactly as the worker's is read on its priced
    topic. The rate runs from the first sample with output to the last one, so start-up, topic
    creation and the group join are not counted.
    """
    from spendstream.bench.worker import TopicSize, progress_rates
    from spendstream.runner import stop_process

    python, how = quix_python()
    if python is None:
        return {"skipped": how}
    s = data.settings
    output = f"{data.prefix}.quix.windows"
    job = {
        "partitions": s.topics.partitions,
        "replication_factor": s.topics.replication_factor,
        "conf": data.conf,
        "input": s.topics.events,
        "output": output,
        "group": f"{data.prefix}-quix",
        "state_dir": str(data.workdir / "quix-state"),
        "window_s": s.processor.window_s,
        "grace_s": s.processor.grace_s,
        "price_catalog": str(s.processor.price_catalog or ""),
        "price_overrides": str(s.processor.price_overrides or ""),
    }
    log_path = data.workdir / "quix.log"
    env = {
        **os.environ,
        _JOB_ENV: json.dumps(job),
        "PYTHONPATH": os.pathsep.join(
            [str(_REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
    }
    expected = len({orjson_event_id(v) for _, v in data.payloads})
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [python, "-m", "spendstream.bench.baselines"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        samples: list[tuple[float, int]] = []
        size = TopicSize(data.conf, output)
        t0 = time.monotonic()
        try:
            while True:
                if proc.poll() is not None:
                    tail = log_path.read_text(errors="replace").splitlines()[-15:]
                    raise RuntimeError(
                        f"the quixstreams job exited with code {proc.returncode}:\n"
                        + "\n".join(tail)
                    )
                done = size()
                now = time.monotonic()
                samples.append((now, done))
                if done >= expected:
                    break
                if now - t0 > 900:
                    raise TimeoutError("the quixstreams job did not finish within 15 minutes")
                time.sleep(0.1)
        finally:
            size.close()
            stop_process(proc)
    version = log_path.read_text(errors="replace").partition("quixstreams ")[2].split()[:1]
    first, rate, steady = progress_rates(samples, expected)
    return {
        "events_per_s": rate,
        "steady_events_per_s": steady,
        "outputs": samples[-1][1],
        "startup_s": first - t0,
        "version": version[0] if version else "?",
        "python": python,
        "found_by": how,
    }


def orjson_event_id(value: bytes) -> str:
    """The ``event_id`` of a produced payload (to count the unique events)."""
    import orjson

    return str(orjson.loads(value)["event_id"])


def quix_job(job: dict[str, Any]) -> None:  # pragma: no cover - runs in the child process
    """The spendstream job in idiomatic quixstreams; runs until SIGTERM.

    ``Application`` (at-least-once, RocksDB state with changelog topics, as quixstreams does
    by default) over the input topic, JSON-deserialized, event time from ``occurred_at``:
    ``apply`` validates (``schemas._wire.decode_dict``: msgspec and the pydantic model, the
    worker's decoder for a parsed dict) and prices
    (:meth:`~stream_processors.PriceCatalog.quote`); a stateful ``filter`` drops repeated
    event ids (state per user key); a tumbling 1-minute window per user (with the worker's
    grace) ``reduce``-s requests, tokens, cost and list value per served model; ``current()``
    emits every updated window to the output topic. Invalid events are dropped (no DLQ).
    """
    from datetime import datetime

    quixstreams: Any = importlib.import_module("quixstreams")
    from schemas.wire import decode_dict
    from spendstream.errors import InvalidEventError
    from stream_processors import PriceCatalog

    catalog = PriceCatalog.load(
        Path(job["price_catalog"]) if job["price_catalog"] else None,
        Path(job["price_overrides"]) if job["price_overrides"] else None,
    )
    print(f"quixstreams {quixstreams.__version__}", flush=True)

    def event_time(value: Any, headers: Any, timestamp: int, timestamp_type: Any) -> int:
        try:
            return int(datetime.fromisoformat(value["occurred_at"]).timestamp() * 1000)
        except (KeyError, TypeError, ValueError):
            return timestamp

    def validate_and_price(value: Any) -> dict[str, Any] | None:
        try:
            event = decode_dict(value)
        except InvalidEventError:
            return None
        quote = catalog.quote(event)
        return {
            "event_id": event.event_id,
            "model": event.served_model or event.requested_model,
            "input_tokens": event.input_tokens,
            "output_tokens": event.output_tokens,
            # Money in 10**-24 USD exceeds 64 bits: strings, as the worker's state keeps it.
            "cost": str(quote.cost),
            "list_value": str(quote.list_value),
        }

    def first_time(row: dict[str, Any], state: Any) -> bool:
        if state.get(row["event_id"]) is not None:
            return False
        state.set(row["event_id"], 1)
        return True

    def initializer(row: dict[str, Any]) -> dict[str, list[Any]]:
        return reducer({}, row)

    def reducer(agg: dict[str, list[Any]], row: dict[str, Any]) -> dict[str, list[Any]]:
        sums = agg.get(row["model"]) or [0, 0, 0, "0", "0"]
        agg[row["model"]] = [
            sums[0] + 1,
            sums[1] + row["input_tokens"],
            sums[2] + row["output_tokens"],
            str(int(sums[3]) + int(row["cost"])),
            str(int(sums[4]) + int(row["list_value"])),
        ]
        return agg

    app = quixstreams.Application(
        broker_address=quixstreams.kafka.configuration.ConnectionConfig.from_librdkafka_dict(
            job["conf"], ignore_extras=True
        ),
        consumer_group=job["group"],
        auto_offset_reset="earliest",
        state_dir=job["state_dir"],
        loglevel="WARNING",
    )
    source = app.topic(
        job["input"],
        value_deserializer="json",
        key_deserializer="str",
        timestamp_extractor=event_time,
    )
    sink = app.topic(
        job["output"],
        value_serializer="json",
        key_serializer="str",
        config=quixstreams.models.topics.TopicConfig(
            num_partitions=job["partitions"], replication_factor=job["replication_factor"]
        ),
    )
    sdf = app.dataframe(source)
    sdf = sdf.apply(validate_and_price).filter(lambda row: row is not None)
    sdf = sdf.filter(first_time, stateful=True)
    sdf = (
        sdf.tumbling_window(duration_ms=job["window_s"] * 1000, grace_ms=job["grace_s"] * 1000)
        .reduce(reducer=reducer, initializer=initializer)
        .current()
    )
    sdf.to_topic(sink)
    app.run()


if __name__ == "__main__":  # pragma: no cover - the quixstreams child process
    quix_job(json.loads(os.environ[_JOB_ENV]))
