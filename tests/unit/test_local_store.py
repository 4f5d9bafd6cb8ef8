"""The durable local state (stream_processors._store) without a broker.

The store must read like the in-memory reference (:class:`DictState`) whatever the order of
writes, undo, sends and acknowledgements, keep on disk only acknowledged changes with the
changelog offset they reach, and expire dedupe ids by event hour from its local index.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_processors._state import DictState, StateNotReady, seen_value
from stream_processors._store import DurableState, LocalStore

pytestmark = pytest.mark.unit


class Sent:
    """A stand-in for the output producer: records what would go to the changelog."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes | None, bytes | None, int]] = []

    def produce(self, topic: str, key: bytes | None, value: bytes | None, partition: int) -> None:
        self.messages.append((topic, key, value, partition))


def state(root: Path, table: str = "windows", **kw: Any) -> DurableState:
    return DurableState(LocalStore(root, auto_open=True), table, f"app-{table}-changelog", **kw)


def test_reads_see_unacknowledged_changes_and_disk_only_acknowledged_ones(tmp_path: Path) -> None:
    s = state(tmp_path)
    out = Sent()
    s.store.next_offset[("windows", 0)] = 100  # restored up to offset 100
    s.put(0, "a", b"1")
    s.put(0, "b", b"2")
    assert s.get("a", 0) == b"1" and s.get("a") == b"1"
    s.flush_changelog(out)  # type: ignore[arg-type]
    assert [m[1] for m in out.messages] == [b'"a"', b'"b"']  # faust's JSON keys
    assert s.store.db(0).get(b'w"a"') is None  # sent, not acknowledged: not on disk
    s.delete(0, "a")
    mark = s.sent_mark()
    assert s.apply_acked(mark) == 2
    assert s.store.db(0).get(b'w"a"') == b"1"
    assert s.get("a", 0) is None  # the unsent delete still wins
    assert s.store.stored_offset("windows", 0) == 102
    s.flush_changelog(out)  # type: ignore[arg-type]
    s.apply_acked(s.sent_mark())
    assert s.store.db(0).get(b'w"a"') is None
    assert s.store.stored_offset("windows", 0) == 103
    s.store.close_all()
    reopened = state(tmp_path)
    assert reopened.get("b", 0) == b"2" and reopened.get("a", 0) is None
    assert reopened.store.stored_offset("windows", 0) == 103


def test_rollback_undoes_the_overlay_and_the_queued_sends(tmp_path: Path) -> None:
    s = state(tmp_path)
    s.put(0, "a", b"1")
    s.savepoint()
    s.put(0, "a", b"2")
    s.put(1, "b", b"3")
    s.delete(0, "a")
    s.rollback()
    assert s.get("a", 0) == b"1" and s.get("b", 1) is None
    out = Sent()
    assert s.flush_changelog(out) == 1  # type: ignore[arg-type]
    assert out.messages == [("app-windows-changelog", b'"a"', b"1", 0)]


def test_a_partition_not_opened_is_never_read_as_empty(tmp_path: Path) -> None:
    s = DurableState(LocalStore(tmp_path), "caps", "c")
    with pytest.raises(StateNotReady):
        s.get("u", 3)
    assert s.get("u") is None  # a search looks only in open partitions


def test_the_seen_index_expires_by_event_hour_and_ignores_stale_entries(tmp_path: Path) -> None:
    s = state(tmp_path, "seen", hour_index=True)
    for i, hour in enumerate([10, 10, 11, 12, 13]):
        s.put(0, f"e{i}", seen_value(0, hour, i, False))
    s.put(1, "other", seen_value(1, 5, 0, False))
    s.flush_changelog(None)  # no producer: stored at once
    assert s.expire(0, 12) == 3
    assert {k for k, _ in s.items()} == {"e3", "e4", "other"}
    s.flush_changelog(None)
    # e3 is stored again under another hour: its old index entry must not delete it.
    s.put(0, "e3", seen_value(0, 20, 9, False))
    s.flush_changelog(None)
    assert s.expire(0, 14) == 1  # e4 only
    assert s.get("e3", 0) == seen_value(0, 20, 9, False)
    assert s.expire(1, 6) == 1


ops = st.lists(
    st.tuples(
        st.sampled_from(["put", "delete", "send", "ack", "savepoint", "rollback", "reopen"]),
        st.integers(0, 2),  # partition
        st.sampled_from(["k1", "k2", "k3", "k4"]),
        st.binary(min_size=1, max_size=3),
    ),
    max_size=60,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=ops)
def test_reads_like_the_reference_whatever_the_order(tmp_path_factory: Any, ops: list[Any]) -> None:
    root = tmp_path_factory.mktemp("store")
    durable, ref, out = state(root), DictState(), Sent()
    saved = False
    for op, partition, key, value in ops:
        # One key lives in one partition (a user's data is co-partitioned).
        partition = int(key[1]) % 3
        if op == "put":
            durable.put(partition, key, value)
            ref.put(partition, key, value)
        elif op == "delete":
            durable.delete(partition, key)
            ref.delete(partition, key)
        elif op == "send":
            durable.flush_changelog(out)  # type: ignore[arg-type]
            saved = False
        elif op == "ack":
            durable.apply_acked(durable.sent_mark())
        elif op == "savepoint":
            durable.savepoint()
            ref.savepoint()
            saved = True
        elif op == "rollback" and saved:
            durable.rollback()
            ref.rollback()
        elif op == "reopen":
            # A restart after everything was acknowledged: the disk alone holds the state.
            durable.flush_changelog(out)  # type: ignore[arg-type]
            durable.apply_acked(durable.sent_mark())
            durable.store.close_all()
            durable = state(root)
            ref.savepoint()  # the reference's undo log does not survive either
            saved = False
        for k in ("k1", "k2", "k3", "k4"):
            assert durable.get(k, int(k[1]) % 3) == ref.get(k), (op, k)
    assert dict(durable.items()) == dict(ref.items())
    # What went to the changelog, replayed in order, is the state (sends were complete).
    durable.flush_changelog(out)  # type: ignore[arg-type]
    replayed: dict[bytes, bytes] = {}
    for _, k, v, _ in out.messages:
        assert k is not None
        if v is None:
            replayed.pop(k, None)
        else:
            replayed[k] = v
    assert {k.strip(b'"').decode(): v for k, v in replayed.items()} == dict(ref.items())


def test_a_failed_restore_stops_processing_every_time_it_is_asked(tmp_path: Path) -> None:
    import asyncio

    from stream_processors._store import Recovery

    recovery = Recovery(LocalStore(tmp_path), [], {}, {}, partitions=6, replication=1)

    def broken(todo: list[int], stop: Any) -> None:
        raise RuntimeError("the changelog cannot be read")

    recovery._restore = broken  # type: ignore[method-assign]

    async def run() -> None:
        recovery.assign({0, 1})
        with pytest.raises(RuntimeError, match="changelog"):
            await recovery.wait()
        assert not recovery.restoring  # done, yet the next batch must still be refused
        with pytest.raises(RuntimeError, match="changelog"):
            await recovery.wait()

    asyncio.run(run())
