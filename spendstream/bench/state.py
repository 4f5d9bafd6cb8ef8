"""State size: bytes of worker state per active user-window at 100,000 users.

The worker's pure pipeline (validate, dedupe, price, roll up, caps; the code the faust agent
runs) processes simulated traffic of ``users`` users, each active, with states that keep what
the worker's memory store keeps: one ``bytes`` value per key. Then every state is measured two
ways: the serialized bytes (key + value: what the changelog carries and a restore reads) and
the Python heap it takes (``sys.getsizeof`` of keys, values and the dict, which is what the
memory store holds).

An *active user-window* is one (user, window instance) with state: a rollup window of the
user (per served model and minute) or a cap window of the user's plan (billing month, day,
rolling hours, the break-even month). The dedupe index is per event, not per window, so it is
reported on its own (bytes per event within the dedupe horizon).
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import Any

import orjson

from spendstream.settings import Settings
from stream_processors._state import DictState

BENCH_START = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


class _Values(DictState):
    """A :class:`~stream_processors.PartitionedState` holding only the values (like faust's
    memory store did), without the write and undo logs that tests' DictState keeps."""

    def put(self, partition: int, key: str, value: bytes) -> None:
        self.data[key] = value
        self._index(partition, key, value)

    def delete(self, partition: int, key: str) -> None:
        self.data.pop(key, None)


def _sizes(state: _Values) -> tuple[int, int]:
    """(serialized key+value bytes, Python heap bytes of keys, values and the dict)."""
    wire = heap = 0
    for key, value in state.data.items():
        wire += len(key.encode()) + len(value)
        heap += sys.getsizeof(key) + sys.getsizeof(value)
    return wire, heap + sys.getsizeof(state.data)


def run_state_bench(settings: Settings, users: int = 100_000, per_user: int = 3) -> dict[str, Any]:
    """Process ``users * per_user`` events of ``users`` users; measure every state."""
    from spendstream.bench.worker import run_pure
    from spendstream.simulate import Simulator
    from stream_processors import InRecord

    sim = Simulator(users, seed=11, start=BENCH_START, rate=20_000.0, rhythm=False)
    subs = {s.user_id: s for s in sim.subscriptions()}
    records: list[InRecord] = []
    # The simulator's mix (models, sizes, timing, how active each tier is) decides who sends
    # what; users that sent nothing have no state and are not counted as active.
    for item in sim.stream():
        if len(records) >= users * per_user:
            break
        if isinstance(item.payload, dict):
            user = item.payload["user_id"]
            records.append(
                InRecord(
                    "bench", hash(user) % 6, len(records), user.encode(), orjson.dumps(item.payload)
                )
            )
    seen, windows, marks, caps_state = _Values(), _Values(), _Values(), _Values()
    elapsed = run_pure(settings, subs.get, records, (seen, windows, marks, caps_state))

    cap_windows = 0
    for raw in caps_state.data.values():
        state = orjson.loads(raw)["s"]
        cap_windows += len(state.get("x", {})) + (1 if state.get("m") else 0)
    rollup_windows = len(windows)
    user_windows = rollup_windows + cap_windows
    (seen_wire, seen_heap) = _sizes(seen)
    (win_wire, win_heap) = _sizes(windows)
    (caps_wire, caps_heap) = _sizes(caps_state)
    (marks_wire, marks_heap) = _sizes(marks)
    window_wire = win_wire + caps_wire + marks_wire
    window_heap = win_heap + caps_heap + marks_heap
    return {
        "users_active": len(caps_state),
        "events": len(records),
        "rollup_windows": rollup_windows,
        "cap_windows": cap_windows,
        "active_user_windows": user_windows,
        "window_state_wire_bytes_per_user_window": round(window_wire / max(user_windows, 1), 1),
        "window_state_heap_bytes_per_user_window": round(window_heap / max(user_windows, 1), 1),
        "caps_state_wire_bytes_per_user": round(caps_wire / max(len(caps_state), 1), 1),
        "rollup_state_wire_bytes_per_window": round(win_wire / max(rollup_windows, 1), 1),
        "dedupe_index_heap_bytes_per_event": round(seen_heap / max(len(seen), 1), 1),
        "dedupe_index_wire_bytes_per_event": round(seen_wire / max(len(seen), 1), 1),
        "state_heap_mib_total": round((window_heap + seen_heap) / 2**20, 1),
        "processing_s": round(elapsed, 1),
    }
