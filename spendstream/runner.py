"""Run pipeline processes locally: a worker child process, and waiting on consumer lag."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from spendstream.errors import KafkaError, SpendstreamError
from spendstream.settings import Settings


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises ``KeyboardInterrupt`` in the main thread.

    Python's default SIGTERM ends the process at once, so ``finally`` blocks never stop the
    worker processes, broker or topics a command started. With this, ``kill`` cleans up like
    Ctrl-C does. Outside the main thread (where handlers cannot be set) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class WorkerProcess:
    """``spendstream worker`` as a child process, configured by ``settings``, logging to a file."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        self._start_size = self._log.tell()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "spendstream", "worker"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **settings.to_env()},
            start_new_session=True,
        )

    def check_alive(self) -> None:
        """Raise with the log's last lines if the worker has exited."""
        code = self.proc.poll()
        if code is not None:
            tail = self.log_path.read_text(errors="replace").splitlines()[-15:]
            raise SpendstreamError(
                f"the worker exited with code {code}; last lines of {self.log_path}:\n"
                + "\n".join(tail)
            )

    def wait_state_ready(self, timeout_s: float = 120.0) -> str | None:
        """Wait until the worker logged that its state is restored; return that line.

        ``None`` if it did not within ``timeout_s`` (the worker goes on; the caller decides).
        The log is read from where this process started writing it.
        """
        start = self._start_size
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            with self.log_path.open("rb") as f:
                f.seek(start)
                for line in f.read().decode(errors="replace").splitlines():
                    if "restored:" in line and "changelog records" in line:
                        return line.split("] ")[-1].strip()
            time.sleep(0.2)
        return None

    def kill(self) -> None:
        """SIGKILL: a crash, for fault tests."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (graceful: faust flushes and commits), SIGKILL after ``timeout_s``."""
        stop_process(self.proc, timeout_s)
        self._log.close()


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """SIGTERM ``proc`` if it still runs; SIGKILL it if it has not exited after ``timeout_s``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_for_lag_zero(
    settings: Settings,
    group_id: str,
    topics: list[str],
    timeout_s: float,
    *,
    check: Callable[[], None] = lambda: None,
    stable_s: float = 1.0,
) -> None:
    """Block until ``group_id`` has committed everything on ``topics`` (and stays so)."""
    from spendstream.lag import group_lag

    conf = settings.kafka.confluent_config()
    deadline = time.monotonic() + timeout_s
    zero_since: float | None = None
    last_error: KafkaError | None = None
    while time.monotonic() < deadline:
        check()
        try:
            lag = sum(group_lag(conf, group_id, topics).values())
        except KafkaError as exc:
            # A young broker answers NOT_COORDINATOR or "load in progress" for a while: not
            # an answer about the lag; asked again until the deadline.
            last_error = exc
            zero_since = None
            time.sleep(0.5)
            continue
        if lag == 0:
            zero_since = zero_since or time.monotonic()
            if time.monotonic() - zero_since >= stable_s:
                return
        else:
            zero_since = None
        time.sleep(0.5)
    why = f" (last error: {last_error})" if last_error is not None else ""
    raise KafkaError(
        f"group {group_id!r} still has lag on {', '.join(topics)} after {timeout_s:.0f} s{why}"
    )
