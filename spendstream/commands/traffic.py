"""``produce``, ``simulate`` and ``consume``: getting usage events in and looking at topics."""

from __future__ import annotations

import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson
import typer

from schemas import MAX_EVENT_BYTES
from spendstream.commands._common import console, err_console, fail, settings_or_exit
from spendstream.commands._safe import printable
from spendstream.errors import SpendstreamError


def _parse_start(value: str | None) -> datetime:
    if value is None:
        return datetime.now(UTC).replace(microsecond=0)
    try:
        start = datetime.fromisoformat(value)
    except ValueError:
        fail(f"--start {value!r} is not an ISO 8601 timestamp (e.g. 2025-06-02T00:00:00+00:00)")
    if start.tzinfo is None:
        fail(f"--start {value!r} needs a UTC offset (e.g. 2025-06-02T00:00:00Z)")
    return start


def _fraction(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise typer.BadParameter("must be a fraction between 0 and 1")
    return value


_LINE_LIMIT = MAX_EVENT_BYTES + 2
"""The longest line ``produce`` keeps: the largest event and a CRLF ending."""
_SKIP_CHUNK = 1 << 16


def _bounded_lines(stream: IO[bytes]) -> Iterator[tuple[bytes | None, int, int]]:
    """Each line of ``stream`` without its end, the bytes it took and its length.

    The line is ``None`` when it is longer than any event can be: it is read past in chunks
    and never held whole, so a torn or binary file with no line end for gigabytes does not
    take that much memory.
    """
    while raw := stream.readline(_LINE_LIMIT + 1):
        if len(raw) <= _LINE_LIMIT or raw.endswith(b"\n"):
            line = raw.rstrip(b"\r\n")
            yield line, len(raw), len(line)
            continue
        size, last = len(raw), raw[-1:]
        content = size
        while chunk := stream.readline(_SKIP_CHUNK):
            size += len(chunk)
            if chunk.endswith(b"\n"):
                before = chunk[-2:-1] if len(chunk) > 1 else last
                content = size - (2 if before == b"\r" else 1)
                break
            last = chunk[-1:]
        else:
            content = size  # the file ended inside the line
        yield None, size, content


class _LineProgress:
    """A progress bar on standard error while ``produce`` reads its lines, on a terminal only.

    Invalid lines are reported above the bar (or as plain lines when there is none), one line
    each. Off a terminal (a pipe, a log, the tests' runner) nothing but the reports is written.
    """

    _EVERY_S = 0.2

    def __init__(self, total_bytes: int | None) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._bar: Progress | None = None
        self._task: Any = None
        self._t0 = self._last = time.monotonic()
        if err_console.is_terminal:
            self._bar = Progress(
                TextColumn("[bold]produce"),
                BarColumn(),
                DownloadColumn(),
                TextColumn("{task.fields[lines]} lines"),
                TextColumn("[cyan]{task.fields[rate]:.0f} lines/s"),
                TimeElapsedColumn(),
                console=err_console,
            )
            self._task = self._bar.add_task("lines", total=total_bytes, lines=0, rate=0.0)

    def __enter__(self) -> _LineProgress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def advance(self, read_bytes: int, lines: int, *, last: bool = False) -> None:
        """Show ``read_bytes`` and ``lines`` read so far (at most every 0.2 s unless ``last``)."""
        if self._bar is None:
            return
        now = time.monotonic()
        if last or now - self._last >= self._EVERY_S:
            self._last = now
            rate = lines / max(now - self._t0, 1e-9)
            self._bar.update(self._task, completed=read_bytes, lines=lines, rate=rate)

    def report(self, text: str) -> None:
        """One line on standard error, above the bar when there is one."""
        if self._bar is None:
            typer.echo(text, err=True)
        else:
            self._bar.console.print(text, markup=False, highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add the ``produce``, ``simulate`` and ``consume`` commands."""

    @app.command("produce")
    def produce(
        file: str = typer.Argument(
            "-", help="JSON-lines file of usage events, or - for standard input."
        ),
    ) -> None:
        """Validate and send usage events, one JSON object per line, to the events topic.

        Every invalid line is reported on standard error with its line number and the reason;
        each valid line is sent as it is, keyed by its user. On a terminal a progress bar shows
        the bytes and lines read. Exits 1 if any line was invalid or not delivered.
        """
        from producers import UsageProducer
        from schemas import oversize_reason
        from schemas.wire import decode_usage
        from spendstream.errors import InvalidEventError

        settings = settings_or_exit()
        total: int | None = None
        if file == "-":
            stream: IO[bytes] = sys.stdin.buffer
        else:
            path = Path(file)
            if not path.is_file():
                fail(f"no such file: {path}")
            total = path.stat().st_size
            stream = path.open("rb")
        sent = invalid = blank = read = number = 0
        try:
            with stream, UsageProducer(settings) as producer, _LineProgress(total) as shown:
                lines = _bounded_lines(stream)
                for number, (line, size, length) in enumerate(lines, start=1):
                    read += size
                    shown.advance(read, number)
                    if line is None:
                        invalid += 1
                        shown.report(f"line {number}: {oversize_reason(length)}")
                        continue
                    if not line.strip():
                        blank += 1
                        continue
                    try:
                        # The contract's verdict and reason (as schemas.decode_event), through
                        # msgspec: about 3 us a line against about 10 us for the model's
                        # decode and re-encode (BENCHMARKS.md). A valid line needs no
                        # re-encoding: the worker reads the bytes that were checked here.
                        event = decode_usage(line)
                    except InvalidEventError as exc:
                        invalid += 1
                        shown.report(f"line {number}: {printable(str(exc))}")
                        continue
                    producer.send_raw(event.user_id, line)
                    sent += 1
                shown.advance(read, number, last=True)
        except SpendstreamError as exc:
            fail(f"{exc} ({sent} events sent before the error)")
        console.print(
            f"sent {sent} events to {settings.topics.events}; {invalid} invalid lines"
            + (f"; {blank} blank lines skipped" if blank else ""),
            highlight=False,
        )
        if invalid:
            raise typer.Exit(1)

    @app.command("simulate")
    def simulate(
        users: int = typer.Option(100, "--users", "-u", min=1, help="Simulated users."),
        duration: float = typer.Option(
            60.0, "--duration", "-d", min=0.1, help="Seconds of traffic to produce."
        ),
        rate: float = typer.Option(
            100.0, "--rate", "-r", min=0.001, help="Mean events per second."
        ),
        seed: int = typer.Option(0, "--seed", "-s", help="Random seed: same seed, same traffic."),
        out_of_order: float = typer.Option(
            0.0,
            "--out-of-order",
            callback=_fraction,
            help="Fraction of events dated 30 s to 15 min back (late arrivals).",
        ),
        duplicates: float = typer.Option(
            0.0,
            "--duplicates",
            callback=_fraction,
            help="Fraction of items that re-send an earlier event unchanged.",
        ),
        malformed: float = typer.Option(
            0.0,
            "--malformed",
            callback=_fraction,
            help="Fraction of items that break the contract (they should reach the DLQ).",
        ),
        start: str | None = typer.Option(
            None,
            "--start",
            help="Event time of the first event, ISO 8601 with offset (default: now). "
            "Give it for byte-identical runs.",
        ),
        dry_run: Path | None = typer.Option(
            None,
            "--dry-run",
            help="Write the events as JSON lines to this file (- for standard output) "
            "instead of producing them; no Kafka needed, no real-time pacing, daily rhythm on.",
        ),
    ) -> None:
        """Publish subscriptions for simulated users, then produce realistic traffic.

        Users are spread over the free/pro/team/enterprise plans with heavy-tailed volumes;
        events use real model names, routing, prompt and semantic caching and reasoning.
        Traffic is paced in real time at --rate for --duration seconds.
        """
        from spendstream.simulate import Simulator

        sim = Simulator(
            users,
            seed,
            _parse_start(start),
            rate=rate,
            out_of_order=out_of_order,
            duplicates=duplicates,
            malformed=malformed,
            rhythm=dry_run is not None,
        )
        if dry_run is not None:
            _simulate_to_file(sim, duration, dry_run)
            return
        from spendstream.simulate import run_simulation

        settings = settings_or_exit()
        try:
            run_simulation(settings, sim, duration, console=console)
        except SpendstreamError as exc:
            fail(str(exc))

    @app.command("consume")
    def consume(
        topic: str = typer.Argument(
            ...,
            help="A topic role (events, priced, rollups, dlq, alerts, overages, enforcement, "
            "subscriptions) or a literal topic name.",
        ),
        from_beginning: bool = typer.Option(
            False, "--from-beginning", "-b", help="Start at the oldest message, not the newest."
        ),
        max_messages: int | None = typer.Option(
            None, "--max", "-n", min=1, help="Stop after this many messages."
        ),
        timeout: float | None = typer.Option(
            None,
            "--timeout",
            "-t",
            min=0.0,
            help="Stop after this many seconds without a message (default: run until Ctrl-C).",
        ),
    ) -> None:
        """Print a topic as JSON lines (key, partition, offset, timestamp, value) for debugging.

        The value is shown as JSON when it is JSON, as text when it is UTF-8, else as base64.
        """
        settings = settings_or_exit()
        name = settings.topics.names().get(topic, topic)
        try:
            _consume(settings, name, from_beginning, max_messages, timeout)
        except SpendstreamError as exc:
            fail(str(exc))


def _simulate_to_file(sim: Any, duration: float, out: Path) -> None:
    counts: Counter[str] = Counter()
    target: IO[bytes] = sys.stdout.buffer if str(out) == "-" else out.open("wb")
    with target:
        for item in sim.stream():
            if (item.emitted_at - sim.start).total_seconds() >= duration:
                break
            payload = item.payload
            target.write(payload if isinstance(payload, bytes) else orjson.dumps(payload))
            target.write(b"\n")
            counts[item.kind] += 1
    if str(out) != "-":
        err_console.print(f"wrote {sum(counts.values())} lines to {out}: {_kinds(counts)}")


def _kinds(counts: Counter[str]) -> str:
    return ", ".join(f"{counts[k]} {k}" for k in ("event", "late", "duplicate", "malformed"))


def _render(msg: Any) -> bytes:
    value = msg.value()
    out: dict[str, Any] = {
        "topic": msg.topic(),
        "partition": msg.partition(),
        "offset": msg.offset(),
        "timestamp": msg.timestamp()[1],
        "key": None if msg.key() is None else msg.key().decode("utf-8", "replace"),
    }
    if value is None:
        out["value"] = None
    else:
        try:
            out["value"] = orjson.loads(value)
        except orjson.JSONDecodeError:
            try:
                out["value"] = value.decode("utf-8")
            except UnicodeDecodeError:
                import base64

                out["value_b64"] = base64.b64encode(value).decode("ascii")
    return orjson.dumps(out)


def _consume(
    settings: Any,
    topic: str,
    from_beginning: bool,
    max_messages: int | None,
    timeout: float | None,
) -> None:
    from confluent_kafka import Consumer, KafkaException
    from confluent_kafka import KafkaError as RdKafkaError

    from spendstream.errors import KafkaError

    conf = settings.kafka.confluent_config()
    conf.update(
        {
            "group.id": f"spendstream-consume-{uuid.uuid4().hex[:12]}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest" if from_beginning else "latest",
            "enable.partition.eof": False,
        }
    )
    try:
        consumer = Consumer(conf)
    except KafkaException as exc:
        raise KafkaError(f"cannot create a Kafka consumer: {exc}") from exc
    out = sys.stdout.buffer
    seen = 0
    last = time.monotonic()
    try:
        consumer.subscribe([topic])
        while max_messages is None or seen < max_messages:
            msg = consumer.poll(0.2)
            if msg is None:
                if timeout is not None and time.monotonic() - last >= timeout:
                    break
                continue
            err = msg.error()
            if err is not None:
                unknown = (RdKafkaError._UNKNOWN_TOPIC, RdKafkaError.UNKNOWN_TOPIC_OR_PART)
                if err.fatal() or err.code() in unknown:
                    raise KafkaError(f"cannot consume {topic}: {err.str()}")
                continue
            last = time.monotonic()
            out.write(_render(msg) + b"\n")
            out.flush()
            seen += 1
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
