"""The durable state's restore on the real broker (stream_processors._store).

A worker restarted on the same machine reads only the changelog written after the offsets it
stored; one on a fresh state folder restores everything; a stored offset the changelog does
not have (a recreated topic) rebuilds from the start. Each restored state is compared with the
state that was written.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from spendstream.settings import Settings
from stream_processors._output import OutputProducer
from stream_processors._state import seen_value
from stream_processors._store import (
    DurableState,
    LocalStore,
    RestoreProgress,
    changelog_topics,
    ensure_changelogs,
    restore_partitions,
)

pytestmark = pytest.mark.integration


def _states(store: LocalStore, changelogs: dict[str, str]) -> dict[str, DurableState]:
    return {
        t: DurableState(store, t, topic, hour_index=t == "seen") for t, topic in changelogs.items()
    }


def _write(
    settings: Settings, states: dict[str, DurableState], first: int, n: int
) -> dict[str, dict[str, bytes]]:
    """Write ``n`` ids to seen and per-user windows on partitions 0 and 1; acknowledge them."""
    out = OutputProducer(settings)
    want: dict[str, dict[str, bytes]] = {"seen": {}, "windows": {}}
    for i in range(first, first + n):
        p = i % 2
        states["seen"].put(p, f"e{i}", seen_value(p, 100 + i % 5, i, False))
        want["seen"][f"e{i}"] = seen_value(p, 100 + i % 5, i, False)
        states["windows"].put(p, f"u{i % 14}", b"%d" % i)  # i % 14 has i's parity: one partition
        if i % 10 == 0:
            states["seen"].delete(p, f"e{i}")
            del want["seen"][f"e{i}"]
    for s in states.values():
        s.flush_changelog(out)
    marks = [s.sent_mark() for s in states.values()]
    asyncio.run(out.flush())
    for s, m in zip(states.values(), marks, strict=True):
        s.apply_acked(m)
    out.close()
    return want


def _read(states: dict[str, DurableState]) -> dict[str, dict[str, bytes]]:
    return {t: dict(states[t].items()) for t in ("seen", "windows")}


def test_restart_reads_only_what_was_written_since_and_a_fresh_folder_everything(
    topics: Settings, tmp_path: Path
) -> None:
    settings = topics
    conf = settings.kafka.confluent_config()
    changelogs = changelog_topics(settings.processor.app_id)
    ensure_changelogs(conf, list(changelogs.values()), settings.topics.partitions, 1)

    store = LocalStore(tmp_path / "a")
    progress = RestoreProgress()
    restore_partitions(store, conf, changelogs, [0, 1], progress)
    assert progress.restored == 0
    states = _states(store, changelogs)
    want = _write(settings, states, 0, 2_000)
    windows_want = {f"u{u}": b"%d" % max(i for i in range(2_000) if i % 14 == u) for u in range(14)}
    first = _read(states)
    assert first == {"seen": want["seen"], "windows": windows_want}
    store.close_all()

    # Same machine: nothing new in the changelog, nothing to read.
    again = LocalStore(tmp_path / "a")
    progress = RestoreProgress()
    restore_partitions(again, conf, changelogs, [0, 1], progress)
    assert progress.restored == 0 and not progress.active
    assert _read(_states(again, changelogs)) == first

    # Another owner wrote meanwhile: only its records are read.
    other = LocalStore(tmp_path / "b")
    restore_partitions(other, conf, changelogs, [0, 1], RestoreProgress())
    more = _write(settings, _states(other, changelogs), 2_000, 300)
    expected = _read(_states(other, changelogs))
    other.close_all()
    again.close_all()
    again = LocalStore(tmp_path / "a")
    progress = RestoreProgress()
    restore_partitions(again, conf, changelogs, [0, 1], progress)
    assert progress.restored == 300 + 30 + 300  # seen puts, their tombstones, windows
    got = _read(_states(again, changelogs))
    assert got == expected
    assert set(more["seen"]) <= set(got["seen"])

    # A fresh folder restores the whole changelog to the same state.
    fresh = LocalStore(tmp_path / "c")
    progress = RestoreProgress()
    restore_partitions(fresh, conf, changelogs, [0, 1], progress)
    assert _read(_states(fresh, changelogs)) == expected
    assert progress.restored == 2_300 + 230 + 2_300
    # The seen index was rebuilt: old hours expire from the restored state too.
    seen = _states(fresh, changelogs)["seen"]
    assert seen.expire(0, 102) == sum(
        1
        for k, v in expected["seen"].items()
        if v.startswith(b"0:") and int(v.split(b":")[1]) < 102
    )


def test_a_stored_offset_the_changelog_does_not_have_rebuilds_the_table(
    topics: Settings, tmp_path: Path
) -> None:
    settings = topics
    conf = settings.kafka.confluent_config()
    changelogs = changelog_topics(settings.processor.app_id)
    ensure_changelogs(conf, list(changelogs.values()), settings.topics.partitions, 1)
    store = LocalStore(tmp_path / "a")
    restore_partitions(store, conf, changelogs, [0, 1], RestoreProgress())
    states = _states(store, changelogs)
    _write(settings, states, 0, 100)
    expected = _read(states)
    # A folder that claims more than the changelog holds (the topic was recreated, or the
    # folder came from another cluster) must not be trusted.
    store.db(0).put(b"Ow", b"999999")
    store.db(0).put(b'w"stale"', b"x")
    store.close_all()
    again = LocalStore(tmp_path / "a")
    restore_partitions(again, conf, changelogs, [0, 1], RestoreProgress())
    assert _read(_states(again, changelogs)) == expected
