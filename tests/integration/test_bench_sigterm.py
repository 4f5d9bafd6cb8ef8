"""SIGTERM to ``spendstream bench`` stops the worker processes it started (and cleans up).

Python's default SIGTERM ends a process without running ``finally`` blocks; the bench and demo
commands turn it into an interrupt, so their clean-up runs as it does on Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spendstream.kafka_admin import topic_partitions
from spendstream.settings import Settings

pytestmark = pytest.mark.integration


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the ppid follows the last ')'.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_sigterm_stops_the_benchmark_worker_and_deletes_its_topics(settings: Settings) -> None:
    conf = settings.kafka.confluent_config()
    before = {t for t in topic_partitions(conf) if t.startswith("bench-caps-")}
    sections = ("producer", "worker", "sink", "baselines", "state", "recovery", "admission")
    cmd = [sys.executable, "-m", "spendstream", "bench", "--caps-rate", "200"]
    cmd += ["--caps-seconds", "120", *(a for s in sections for a in ("--skip", s))]
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, **settings.to_env()},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        workers: list[int] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not workers:
            assert proc.poll() is None, proc.communicate()[0].decode()[-3000:]
            workers = children(proc.pid)
            time.sleep(0.2)
        assert workers, "the latency section did not start its worker"
        time.sleep(3)  # mid-section
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, "an interrupted benchmark does not report success"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p) for p in workers):
        time.sleep(0.2)
    assert not [p for p in workers if alive(p)], output.decode()[-3000:]
    left = {t for t in topic_partitions(conf) if t.startswith("bench-caps-")} - before
    assert not left, f"topics left behind: {sorted(left)}"
