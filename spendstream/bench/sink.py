"""Benchmark of the sink's write path into embedded ClickHouse (chDB).

Measures priced-event rows/s through what the sink does per record: wire JSON -> SinkBuffer
(decode, dedup bookkeeping) -> Arrow columns (drain) -> one batch insert through chDB's
Python() table function. Kafka is not involved; this is the sink's own ceiling.

    python -m spendstream.bench.sink --rows 500000
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from spendstream.settings import Settings, load_settings

_PRICE_IN = Decimal("0.000000546875")
_PRICE_OUT = Decimal("0.0000021875")
_MODELS = ("gpt-4o-mini", "claude-3-5-haiku", "llama-3.1-8b", "gpt-4o")
_PLANS = ("free", "pro", "team", "enterprise")


def sample_priced_event(i: int) -> dict[str, Any]:
    """A realistic :class:`~schemas.PricedEvent` (exact decimal-string money)."""
    tokens_in = 100 + (i * 37) % 4000
    tokens_out = 20 + (i * 13) % 800
    cost = _PRICE_IN * tokens_in + _PRICE_OUT * tokens_out
    second = i % 86_400
    ts = f"2024-05-{1 + (i // 86_400) % 28:02d}T{second // 3600:02d}:{second // 60 % 60:02d}:"
    ts += f"{second % 60:02d}.{i % 1_000_000:06d}+00:00"
    model = _MODELS[i % len(_MODELS)]
    return {
        "event_id": f"evt-{i:012d}",
        "occurred_at": ts,
        "org_id": f"org-{i % 50}",
        "user_id": f"user-{i % 5000}",
        "api_key_id": None,
        "gateway": "gw-1",
        "request_id": f"req-{i}",
        "provider": "openai",
        "requested_model": model,
        "served_model": model,
        "input_tokens": tokens_in,
        "cached_input_tokens": tokens_in // 4,
        "cache_write_tokens": 0,
        "output_tokens": tokens_out,
        "reasoning_tokens": 0,
        "cache_write_1h_tokens": 0,
        "input_audio_tokens": 0,
        "input_image_tokens": 0,
        "output_audio_tokens": 0,
        "output_image_tokens": 0,
        "service_tier": "batch" if i % 10 == 0 else "standard",
        "web_search_requests": 0,
        "search_context_size": None,
        "semantic_cache_hit": False,
        "status": "ok",
        "latency_ms": 300 + i % 700,
        "feature": "chat",
        "attributes": {"region": "eu"},
        "plan_id": _PLANS[i % len(_PLANS)],
        "cost": str(cost),
        "list_value": str(cost),
        "saved_prompt_cache": "0",
        "saved_semantic_cache": "0",
        "saved_routing": "0",
        "saved_service_tier": "0",
        "unknown_model": False,
        "price_approximated": False,
        "late": False,
        "window_start": ts[:17] + "00+00:00",
        "processed_at": ts,
    }


def run_sink_bench(settings: Settings, rows: int, batch_rows: int | None = None) -> dict[str, Any]:
    """Push ``rows`` priced events through buffer -> Arrow -> chDB; return the timings.

    Uses a fresh chDB folder under a temporary directory (never the settings' store, which a
    running sink may own). ``batch_rows`` defaults to ``settings.sink.batch_rows``.
    """
    from sinks import PRICED_EVENTS, ChdbStore, SinkBuffer, warm_up

    batch = batch_rows or max(settings.sink.batch_rows, 1)
    warm_up()  # as the sink does when it starts
    payloads = [orjson.dumps(sample_priced_event(i)) for i in range(rows)]
    workdir = Path(tempfile.mkdtemp(prefix="spendstream-bench-"))
    store = ChdbStore(workdir / "chdb", database=settings.clickhouse.database, serve=False)
    try:
        store.migrate()
        buffer = SinkBuffer(
            {"bench.priced": PRICED_EVENTS},
            batch_rows=batch,
            batch_age_s=3600,
            max_buffer_rows=max(batch, settings.sink.max_buffer_rows),
        )
        t_add = t_drain = t_insert = 0.0
        latencies: list[float] = []
        start = time.perf_counter()
        for offset, payload in enumerate(payloads):
            t0 = time.perf_counter()
            buffer.add("bench.priced", offset % 6, offset, payload)
            t_add += time.perf_counter() - t0
            if len(buffer) >= batch or offset == rows - 1:
                t1 = time.perf_counter()
                drained = buffer.drain()
                t2 = time.perf_counter()
                for b in drained.batches:
                    store.insert(b.table, b.data, b.dedup_token)
                t3 = time.perf_counter()
                t_drain += t2 - t1
                t_insert += t3 - t2
                latencies.append(t3 - t2)
        total = time.perf_counter() - start
        _, stored = store.query(f"SELECT count(), sum(cost) FROM {store.database}.priced_events")
    finally:
        store.close()
        shutil.rmtree(workdir, ignore_errors=True)
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    return {
        "rows": rows,
        "batch_rows": batch,
        "batches": len(latencies),
        "stored_rows": int(stored[0][0]),
        "stored_cost": str(stored[0][1]),
        "seconds": round(total, 3),
        "rows_per_s": round(rows / total),
        "buffer_add_rows_per_s": round(rows / t_add) if t_add else None,
        "drain_to_arrow_rows_per_s": round(rows / t_drain) if t_drain else None,
        "insert_rows_per_s": round(rows / t_insert) if t_insert else None,
        "insert_ms_p50": round(pct(0.5), 2),
        "insert_ms_p99": round(pct(0.99), 2),
    }


def main(argv: list[str] | None = None) -> None:
    """``python -m spendstream.bench.sink --rows N [--batch-rows N]``."""
    parser = argparse.ArgumentParser(description="priced-event insert throughput into chDB")
    parser.add_argument("--rows", type=int, default=500_000, help="priced events to insert")
    parser.add_argument("--batch-rows", type=int, default=None, help="rows per insert batch")
    args = parser.parse_args(argv)
    result = run_sink_bench(load_settings(), args.rows, args.batch_rows)
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
