"""Memory of the dedupe horizon alone: the worker's pure pipeline on its durable store, in
process, over events that only add dedupe ids (a fixed set of users, every event in one
minute: no new windows, no new users, no new cap state).

The figures are the growth of the resident set and of the Python heap (tracemalloc) between a
quarter and the end of the run, per event: what one more id of the horizon costs in RAM. With
faust's memory store the index took 173 bytes of heap per event; here the ids are on disk and
RocksDB's memory is capped by ``processor.state_memory_mib``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import tracemalloc
import zlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from spendstream.settings import Settings

_START = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
_USERS = 200
_BATCH = 5_000


def _rss() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run_dedupe_memory(settings: Settings, events: int = 1_200_000) -> dict[str, Any]:
    """Process ``events`` new ids through the pure pipeline on a temporary durable store."""
    from schemas import PlanPeriod, Subscription
    from stream_processors import (
        SAMPLE_PLANS,
        CapEngine,
        InRecord,
        PriceCatalog,
        UsageProcessor,
        load_plans,
    )
    from stream_processors._store import DurableState, LocalStore
    from stream_processors.caps import CapStage

    subs = {
        f"u{i}": Subscription(
            org_id="o",
            user_id=f"u{i}",
            billing_anchor=_START,
            plans=[PlanPeriod(plan_id="team", effective_at=_START)],
        )
        for i in range(_USERS)
    }
    root = Path(tempfile.mkdtemp(prefix="spendstream-dedupe-"))
    store = LocalStore(root, auto_open=True, memory_mib=settings.processor.state_memory_mib)
    seen, windows, marks, caps_state = (
        DurableState(store, name, name, hour_index=name == "seen")
        for name in ("seen", "windows", "marks", "caps")
    )
    processor = UsageProcessor(
        PriceCatalog.load(), subs.get, seen=seen, windows=windows, marks=marks
    )
    caps = CapStage(CapEngine(load_plans(SAMPLE_PLANS)), subs.get, caps_state)
    now = _START.replace(minute=1)
    states = (seen, windows, marks, caps_state)
    quarter = max((events // 4) // _BATCH * _BATCH, _BATCH)
    samples: dict[str, tuple[int, int]] = {}
    tracemalloc.start()
    try:
        for i0 in range(0, events, _BATCH):
            batch = []
            for i in range(i0, min(i0 + _BATCH, events)):
                user = f"u{i % _USERS}"
                value = orjson.dumps(
                    {
                        "event_id": f"evt-{i:012d}",
                        "occurred_at": "2026-11-02T09:00:30Z",
                        "org_id": "o",
                        "user_id": user,
                        "gateway": "g",
                        "requested_model": "gpt-4o-mini",
                        "input_tokens": 10,
                        "output_tokens": 5,
                    }
                )
                partition = zlib.crc32(user.encode()) % 6
                batch.append(InRecord("events", partition, i, user.encode(), value, None))
            for state in states:
                state.savepoint()
            result = processor.process(batch, now)
            caps.process(result.accepted, now)
            for state in (seen, windows, caps_state, marks):
                state.flush_changelog(None)  # no producer: stored at once
            done = i0 + len(batch)
            if done == quarter:
                samples["quarter"] = (_rss(), tracemalloc.get_traced_memory()[0])
        samples["end"] = (_rss(), tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
        store.close_all()
    disk = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    shutil.rmtree(root, ignore_errors=True)
    (q_rss, q_heap), (e_rss, e_heap) = samples["quarter"], samples["end"]
    n = events - quarter
    return {
        "dedupe_events": events,
        "dedupe_rss_growth_bytes_per_event": round((e_rss - q_rss) / n, 1),
        "dedupe_heap_growth_bytes_per_event": round((e_heap - q_heap) / n, 1),
        "dedupe_disk_bytes_per_event": round(disk / events, 1),
    }
