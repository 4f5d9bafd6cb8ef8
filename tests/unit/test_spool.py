"""DiskSpool: order, acknowledgement, recovery after a restart, torn tails, the bound, the lock."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producers._spool import DiskSpool, SpoolFullError, SpoolRecord, encode_record
from spendstream.errors import BackpressureError, ConfigError

TOPIC = "usage.events"


def drain(spool: DiskSpool) -> list[SpoolRecord]:
    out = []
    while (rec := spool.read()) is not None:
        out.append(rec)
    return out


def fill(spool: DiskSpool, n: int, start: int = 0) -> list[int]:
    return [
        spool.append(TOPIC, f"user-{i % 7}", b'{"event_id": "e-%d"}' % i)
        for i in range(start, start + n)
    ]


def test_records_come_back_in_order_and_acks_empty_the_folder(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, max_bytes=1 << 20, segment_bytes=4096)
    seqs = fill(spool, 500)
    assert seqs == list(range(500))
    read = drain(spool)
    assert [r.seq for r in read] == seqs
    assert read[3].topic == TOPIC and read[3].key == b"user-3"
    assert read[3].value == b'{"event_id": "e-3"}'
    assert len(list(spool.segment_files())) > 5  # rolled
    stats = spool.stats()
    assert (stats.records, stats.bytes) == (500, sum(r.size for r in read))
    for rec in reversed(read):  # acks arrive in any order
        spool.ack(rec.seq, rec.size)
    stats = spool.stats()
    assert (stats.records, stats.bytes, stats.acknowledged) == (0, 0, 500)
    # Only the active segment (all acknowledged) is left; it goes at close.
    assert len(list(spool.segment_files())) == 1
    spool.close()
    assert list(spool.segment_files()) == []


def test_none_key_and_large_value_roundtrip(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, max_bytes=4 << 20)
    big = bytes(range(256)) * 2000  # larger than one read chunk
    spool.append(TOPIC, None, big)
    spool.append(TOPIC, b"k", b"")
    recs = drain(spool)
    assert [(r.key, r.value) for r in recs] == [(None, big), (b"k", b"")]
    spool.close()


def test_restart_replays_exactly_the_unacknowledged_records_in_order(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, max_bytes=1 << 20, segment_bytes=2048)
    fill(spool, 300)
    read = drain(spool)
    acked = {r.seq for r in read if r.seq % 3 == 0 or r.seq < 100}
    for rec in read:
        if rec.seq in acked:
            spool.ack(rec.seq, rec.size)
    spool.close()  # a "restart": the next process opens the same folder

    again = DiskSpool(tmp_path, max_bytes=1 << 20, segment_bytes=2048)
    replay = drain(again)
    assert [r.seq for r in replay] == [s for s in range(300) if s not in acked]
    assert again.stats().replayed == len(replay)
    assert again.stats().records == len(replay)
    # New appends continue after the old sequence numbers and are read after the replay.
    new = again.append(TOPIC, "user-1", b"new")
    assert new == 300
    assert [r.seq for r in drain(again)] == [300]
    again.close()


def test_rewind_rereads_only_unacknowledged(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, max_bytes=1 << 20, segment_bytes=1024)
    fill(spool, 60)
    first = drain(spool)
    for rec in first[:30]:
        spool.ack(rec.seq, rec.size)
    spool.ack(first[45].seq, first[45].size)
    spool.rewind()
    assert [r.seq for r in drain(spool)] == [s for s in range(30, 60) if s != 45]
    spool.close()


def test_torn_tail_is_truncated_and_the_intact_records_survive(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, max_bytes=1 << 20, fsync="always")
    fill(spool, 10)
    spool.close()
    (segment,) = sorted(tmp_path.glob("*.seg"))
    whole = segment.read_bytes()
    # A crash in the middle of the 11th write: half a record at the end of the file.
    half = encode_record(10, TOPIC, b"user-3", b"x" * 100)[:40]
    segment.write_bytes(whole + half)

    again = DiskSpool(tmp_path, max_bytes=1 << 20)
    assert [r.seq for r in drain(again)] == list(range(10))
    assert again.stats().truncated_bytes == len(half)
    assert segment.read_bytes() == whole
    again.close()


def test_a_corrupt_record_ends_the_segment_at_the_last_intact_one(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, max_bytes=1 << 20)
    fill(spool, 10)
    spool.close()
    (segment,) = sorted(tmp_path.glob("*.seg"))
    data = bytearray(segment.read_bytes())
    one = len(data) // 10  # records here have equal sizes
    data[one * 6 + 20] ^= 0xFF  # flip a byte inside record 6: its CRC fails
    segment.write_bytes(bytes(data))
    again = DiskSpool(tmp_path, max_bytes=1 << 20)
    assert [r.seq for r in drain(again)] == list(range(6))
    again.close()


def test_reject_policy_raises_a_clear_error_and_counts(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, max_bytes=4096, full_policy="reject")
    fill(spool, 10)
    with pytest.raises(SpoolFullError) as err:
        fill(spool, 200, start=10)
    assert isinstance(err.value, BackpressureError)
    message = str(err.value)
    assert "spool" in message and "full" in message and "SPOOL_MAX_BYTES" in message
    stats = spool.stats()
    assert stats.rejected == 1 and stats.bytes <= 4096
    # Acknowledging frees room again.
    for rec in drain(spool):
        spool.ack(rec.seq, rec.size)
    spool.append(TOPIC, "user-1", b"fits again")
    spool.close()


def test_block_policy_waits_for_acks_then_times_out(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, max_bytes=4096, full_policy="block")
    while spool.stats().bytes + 100 < 4096:
        spool.append(TOPIC, "u", b"v" * 50)
    pending = drain(spool)

    def ack_later() -> None:
        time.sleep(0.3)
        for rec in pending:
            spool.ack(rec.seq, rec.size)

    acker = threading.Thread(target=ack_later)
    acker.start()
    started = time.monotonic()
    spool.append(TOPIC, "u", b"v" * 200, timeout_s=10)
    assert 0.2 < time.monotonic() - started < 5
    acker.join()
    assert spool.stats().blocked == 1

    while spool.stats().bytes + 300 < 4096:
        spool.append(TOPIC, "u", b"v" * 200)
    with pytest.raises(SpoolFullError, match=r"waited 0\.2s"):
        spool.append(TOPIC, "u", b"v" * 200, timeout_s=0.2)
    assert spool.stats().blocked == 2 and spool.stats().rejected == 1
    spool.close()


def test_a_message_larger_than_the_bound_is_refused(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, max_bytes=4096)
    with pytest.raises(SpoolFullError, match="can never fit"):
        spool.append(TOPIC, "u", b"x" * 5000)
    spool.close()


def test_one_owner_per_folder(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path)
    with pytest.raises(ConfigError, match="in use by another producer"):
        DiskSpool(tmp_path)
    spool.close()
    DiskSpool(tmp_path).close()  # released at close


def test_invalid_policies_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        DiskSpool(tmp_path, full_policy="drop")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        DiskSpool(tmp_path, fsync="sometimes")  # type: ignore[arg-type]


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("append"), st.integers(1, 20)),
            st.tuples(st.just("read"), st.integers(1, 30)),
            st.tuples(st.just("ack"), st.integers(0, 1000)),
            st.tuples(st.just("rewind"), st.just(0)),
            st.tuples(st.just("restart"), st.just(0)),
        ),
        max_size=40,
    )
)
def test_model_every_unacknowledged_record_is_delivered_in_order(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int]]
) -> None:
    """Against a model: reads return exactly the unacknowledged, not yet read records, oldest
    first; after a rewind or a restart, reading starts again at the oldest unacknowledged."""
    path = tmp_path_factory.mktemp("spool")
    spool = DiskSpool(path, max_bytes=1 << 20, segment_bytes=600)
    appended: list[int] = []  # message ids (in the value), in append order
    acked: set[int] = set()
    read: list[SpoolRecord] = []  # read since the last rewind / restart
    try:
        for op, arg in ops:
            if op == "append":
                for _ in range(arg):
                    ident = len(appended)
                    spool.append(TOPIC, "k", b"%d:" % ident + b"x" * (ident % 50))
                    appended.append(ident)
            elif op == "read":
                for _ in range(arg):
                    rec = spool.read()
                    done = {int(r.value.split(b":")[0]) for r in read}
                    expected = [i for i in appended if i not in acked and i not in done]
                    if rec is None:
                        assert expected == []
                        break
                    assert int(rec.value.split(b":")[0]) == expected[0]
                    read.append(rec)
            elif op == "ack":
                if read:
                    rec = read[arg % len(read)]
                    spool.ack(rec.seq, rec.size)
                    acked.add(int(rec.value.split(b":")[0]))
            else:
                if op == "restart":
                    spool.close()
                    spool = DiskSpool(path, max_bytes=1 << 20, segment_bytes=600)
                else:
                    spool.rewind()
                read = []
            pending = [i for i in appended if i not in acked]
            assert spool.stats().records == len(pending)
    finally:
        spool.close()
