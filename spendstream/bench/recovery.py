"""Recovery: how long a restarted worker is blind, on the same machine and on a fresh one.

One worker (``spendstream worker``, a child process) builds state from ``events`` simulated
events. Then, twice, it is stopped (SIGTERM), one new event is produced, and a worker is
started again; the figure is the time from that start to the new event's priced output:

* **same machine**: the state folder is kept; the worker reopens it and reads only the
  changelog written since its last local write;
* **fresh machine**: the state folder is deleted; the worker restores every table from its
  changelog (the restore's own duration and record count come from the worker's log line).

Fail-over: a second worker with a folder of its own (another machine) joins and restores half
the partitions; the first is then killed (SIGKILL), and the figure is the time from the kill
until new events of every partition are priced: the group's session timeout, then the restore
of the dead worker's partitions from their changelogs.

Memory: the worker's resident set at a quarter and at the end of the build; its growth per
event over the last three quarters is what more state costs in RAM (with faust's memory store
the dedupe index alone took 173 bytes of heap per event). The resident set of the worker
restarted on the full state is printed too; that growth includes the windows and users the
simulated traffic keeps adding. The dedupe horizon alone is measured in process by
:mod:`spendstream.bench.dedupe`. Disk: the state folder's bytes per event.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Any

import orjson

from spendstream.settings import Settings

_RESTORED = re.compile(r"restored: (\d+) changelog records in ([\d.]+) s")


def _rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _restores(log_path: Path) -> tuple[int, float]:
    """(changelog records, seconds) of the restores the worker logged (summed)."""
    records, seconds = 0, 0.0
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    for m in _RESTORED.finditer(text):
        records += int(m.group(1))
        seconds += float(m.group(2))
    return records, seconds


def _probe(settings: Settings, n: int, users: int = 1) -> set[str]:
    """One new event for each of ``users`` new users, to be priced after a restart."""
    from producers import UsageProducer
    from spendstream.bench.worker import BENCH_START

    with UsageProducer(settings) as producer:
        for u in range(users):
            user = f"recovery-probe-{n}-{u}"
            event: dict[str, Any] = {
                "event_id": f"{user}-{time.time_ns()}",
                "occurred_at": BENCH_START.isoformat(),
                "org_id": "bench",
                "user_id": user,
                "gateway": "bench",
                "requested_model": "gpt-4o-mini",
                "input_tokens": 10,
                "output_tokens": 10,
            }
            producer.send_raw(user.encode(), orjson.dumps(event))
    return {f"recovery-probe-{n}-{u}" for u in range(users)}


class _Probes:
    """Waits for the priced output of given users, read from where the priced topic ended.

    Counting the topic's messages would not do: a worker may publish a priced event again
    (a replay after a rebalance; the sink keeps one row), and a count then runs ahead.
    """

    def __init__(self, conf: dict[str, Any], topic: str) -> None:
        from confluent_kafka import Consumer, TopicPartition

        self._consumer = Consumer(
            {**conf, "group.id": "bench-recovery-probe", "enable.auto.commit": False}
        )
        parts = self._consumer.list_topics(topic, timeout=10).topics[topic].partitions
        tps = []
        for p in parts:
            _, high = self._consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            tps.append(TopicPartition(topic, p, high))
        self._consumer.assign(tps)

    def wait(self, worker: Any, users: set[str], limit_s: float) -> float:
        """Seconds until a priced event of each of ``users`` was read."""
        left = {u.encode() for u in users}
        t0 = time.monotonic()
        while left:
            worker.check_alive()
            if time.monotonic() - t0 > limit_s:
                raise TimeoutError(f"{len(left)} probe users not priced within {limit_s} s")
            msg = self._consumer.poll(0.05)
            if msg is not None and msg.error() is None:
                left.discard(msg.key())
        return time.monotonic() - t0

    def close(self) -> None:
        self._consumer.close()


def _run_until(worker: Any, size: Any, target: int, limit_s: float) -> float:
    """Seconds until the priced topic holds ``target`` messages."""
    t0 = time.monotonic()
    while size() < target:
        worker.check_alive()
        if time.monotonic() - t0 > limit_s:
            raise TimeoutError(f"the worker did not reach {target} priced events in {limit_s} s")
        time.sleep(0.05)
    return time.monotonic() - t0


def run_recovery_bench(
    settings: Settings,
    events: int = 1_000_000,
    users: int = 20_000,
    *,
    dedupe_events: int = 1_200_000,
) -> dict[str, Any]:
    """Build state from ``events`` events, then restart on it and on a fresh folder."""
    from spendstream.bench.worker import TopicSize, bench_input
    from spendstream.runner import WorkerProcess

    with bench_input(settings, events, users, name="recovery") as data:
        s = data.settings
        store = s.state_dir / "store"
        size = TopicSize(data.conf, s.topics.priced)
        figures: dict[str, Any] = {"events": events, "users": users}
        probes: _Probes | None = None
        try:
            worker = WorkerProcess(s, data.workdir / "build.log")
            try:
                build_s = _run_until(worker, size, events // 4, 1800)
                quarter_rss = _rss_bytes(worker.proc.pid)
                build_s += _run_until(worker, size, events, 1800)
                figures["build_s"] = round(build_s, 1)
                time.sleep(1.0)  # the last batch's state reaches the store
                built_rss = _rss_bytes(worker.proc.pid)
            finally:
                worker.stop()
            figures["state_disk_bytes_per_event"] = round(_folder_bytes(store) / events, 1)

            probes = _Probes(data.conf, s.topics.priced)
            users_1 = _probe(s, 1)
            worker = WorkerProcess(s, data.workdir / "same.log")
            try:
                figures["restart_same_machine_s"] = round(probes.wait(worker, users_1, 600), 2)
                small_rss = _rss_bytes(worker.proc.pid)
            finally:
                worker.stop()
            records, seconds = _restores(data.workdir / "same.log")
            figures["same_machine_changelog_records_read"] = records

            shutil.rmtree(store)
            users_2 = _probe(s, 2)
            worker = WorkerProcess(s, data.workdir / "fresh.log")
            other = None
            try:
                figures["restart_fresh_machine_s"] = round(probes.wait(worker, users_2, 1800), 2)
                # Fail-over to another machine: a second worker with a folder of its own takes
                # half the partitions (restoring them), then the first is killed; the time is
                # from the kill until events of every partition are priced again.
                b = s.model_copy(update={"state_dir": data.workdir / "machine-b"})
                other = WorkerProcess(b, data.workdir / "machine-b.log")
                if other.wait_state_ready(timeout_s=300) is None:
                    raise TimeoutError("the second worker did not report its state ready")
                time.sleep(2.0)  # the group settles: both workers hold partitions
                worker.kill()
                t_kill = time.monotonic()
                users_3 = _probe(s, 3, users=24)  # 24 users: every partition, almost surely
                probes.wait(other, users_3, 600)
                figures["failover_to_other_machine_s"] = round(time.monotonic() - t_kill, 2)
                figures["session_timeout_s"] = s.processor.session_timeout_s
            finally:
                worker.stop()
                if other is not None:
                    other.stop()
            records, seconds = _restores(data.workdir / "fresh.log")
            figures["fresh_restore_changelog_records"] = records
            figures["fresh_restore_s"] = round(seconds, 2)
            figures["fresh_restore_events_of_state_per_s"] = (
                round(events / seconds) if seconds else None
            )
            figures["fresh_restore_records_per_s"] = round(records / seconds) if seconds else None
            if built_rss is not None and quarter_rss is not None and small_rss is not None:
                figures["worker_rss_mib_at_quarter_of_build"] = round(quarter_rss / 2**20, 1)
                figures["worker_rss_mib_at_end_of_build"] = round(built_rss / 2**20, 1)
                figures["worker_rss_mib_restarted_on_the_state"] = round(small_rss / 2**20, 1)
                # Growth over the last three quarters: the warm-up (buffers, imports, caches
                # of a worker catching up) is in both samples and cancels out.
                figures["rss_growth_bytes_per_event_of_state"] = round(
                    (built_rss - quarter_rss) / (events - events // 4), 1
                )
        finally:
            size.close()
            if probes is not None:
                probes.close()
    from spendstream.bench.dedupe import run_dedupe_memory

    figures.update(run_dedupe_memory(settings, dedupe_events))
    return figures
