"""DiskSpool: order, acknowledgement, recovery after a restart, torn tails and damaged records,
the bound, a disk that refuses writes or reads, the drain thread, the lock, file modes."""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producers import UsageProducer
from producers import _producer as producer_module
from producers._spool import (
    DiskSpool,
    SpoolFullError,
    SpoolIOError,
    SpoolRecord,
    encode_record,
)
from spendstream.errors import BackpressureError, ConfigError, SpendstreamError

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


def record_offsets(segment: Path) -> list[int]:
    """Where each record of an intact segment file starts."""
    data = segment.read_bytes()
    offsets, pos = [], 0
    while pos < len(data):
        offsets.append(pos)
        (length,) = struct.unpack_from("<I", data, pos)
        pos += 16 + length
    return offsets


def test_a_corrupt_record_in_the_middle_loses_only_that_record(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, max_bytes=1 << 20)
    fill(spool, 10)
    spool.close()
    (segment,) = sorted(tmp_path.glob("*.seg"))
    data = bytearray(segment.read_bytes())
    offsets = record_offsets(segment)
    data[offsets[6] + 20] ^= 0xFF  # a byte inside record 6: its CRC fails
    segment.write_bytes(bytes(data))

    again = DiskSpool(tmp_path, max_bytes=1 << 20)
    assert [r.seq for r in drain(again)] == [0, 1, 2, 3, 4, 5, 7, 8, 9]
    stats = again.stats()
    assert (stats.records, stats.lost_records) == (9, 1)
    assert stats.corrupt_bytes == offsets[7] - offsets[6]
    assert stats.truncated_bytes == 0 and segment.read_bytes() == bytes(data), "not a tail"
    again.close()


def test_a_corrupt_length_loses_only_that_record(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, max_bytes=1 << 20)
    fill(spool, 10)
    spool.close()
    (segment,) = sorted(tmp_path.glob("*.seg"))
    data = bytearray(segment.read_bytes())
    offsets = record_offsets(segment)
    # Record 3 now claims to run far past the end of the file: not a torn tail for all that.
    struct.pack_into("<I", data, offsets[3], 1 << 20)
    segment.write_bytes(bytes(data))
    again = DiskSpool(tmp_path, max_bytes=1 << 20)
    assert [r.seq for r in drain(again)] == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert again.stats().truncated_bytes == 0
    again.close()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(victim=st.integers(0, 59), where=st.integers(0, 10_000), flip=st.integers(1, 255))
def test_any_damaged_byte_loses_exactly_the_record_it_is_in(
    tmp_path_factory: pytest.TempPathFactory, victim: int, where: int, flip: int
) -> None:
    """One changed byte anywhere in any record (header or payload, any segment) costs that
    record and nothing else, wherever it is."""
    path = tmp_path_factory.mktemp("spool")
    spool = DiskSpool(path, max_bytes=1 << 20, segment_bytes=1200)
    for i in range(60):
        spool.append(TOPIC, f"user-{i % 7}", b"%d:" % i + b"x" * (i * 7 % 90))
    spool.close()
    located = [(seg, off) for seg in sorted(path.glob("*.seg")) for off in record_offsets(seg)]
    segment, offset = located[victim]
    data = bytearray(segment.read_bytes())
    (length,) = struct.unpack_from("<I", data, offset)
    data[offset + where % (16 + length)] ^= flip
    segment.write_bytes(bytes(data))

    again = DiskSpool(path, max_bytes=1 << 20, segment_bytes=1200)
    try:
        assert [r.seq for r in drain(again)] == [s for s in range(60) if s != victim]
        stats = again.stats()
        assert stats.records == 59
        # A final record with a damaged length looks like a write cut by a crash: truncated.
        final_looks_torn = victim == 59 and stats.truncated_bytes > 0
        assert stats.lost_records == (0 if final_looks_torn else 1)
    finally:
        again.close()


def test_a_torn_record_inside_a_segment_keeps_the_records_after_it(tmp_path: Path) -> None:
    """What an earlier version left after a short write it did not notice: a partial record,
    then whole ones. Only the partial one is lost, and nothing is truncated."""
    spool = DiskSpool(tmp_path, max_bytes=1 << 20)
    fill(spool, 4)
    spool.close()
    (segment,) = sorted(tmp_path.glob("*.seg"))
    torn = encode_record(4, TOPIC, b"user-4", b"x" * 100)[:50]
    after = b"".join(encode_record(s, TOPIC, b"user-5", b"after-%d" % s) for s in (5, 6))
    segment.write_bytes(segment.read_bytes() + torn + after)
    again = DiskSpool(tmp_path, max_bytes=1 << 20)
    recs = drain(again)
    assert [r.seq for r in recs] == [0, 1, 2, 3, 5, 6]
    assert recs[-1].value == b"after-6"
    stats = again.stats()
    assert (stats.lost_records, stats.corrupt_bytes, stats.truncated_bytes) == (1, 50, 0)
    again.close()


def test_damage_found_while_running_skips_only_that_record(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path, max_bytes=1 << 20)
    fill(spool, 10)
    (segment,) = sorted(tmp_path.glob("*.seg"))
    offsets = record_offsets(segment)
    with segment.open("r+b") as f:  # the disk changes under the running producer
        f.seek(offsets[6] + 18)
        f.write(b"\x00\x00\x00")
    recs = drain(spool)
    assert [r.seq for r in recs] == [0, 1, 2, 3, 4, 5, 7, 8, 9]
    stats = spool.stats()
    assert (stats.records, stats.lost_records) == (9, 1)
    for rec in recs:
        spool.ack(rec.seq, rec.size)
    assert (spool.stats().records, spool.stats().bytes) == (0, 0), "the lost one is not waited for"
    assert spool.wait_empty(0.1)
    spool.close()
    assert list(spool.segment_files()) == []


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


# -- a disk that refuses writes ----------------------------------------------------------------

# The child appends under a 700-byte file size limit with SIGXFSZ ignored (CPython ignores it
# anyway), so write() comes back short and then fails with EFBIG, as on a full file system.
_LIMITED_CHILD = r"""
import json, resource, signal, sys
from pathlib import Path
from producers._spool import DiskSpool
from spendstream.errors import SpendstreamError

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (700, 700))
spool = DiskSpool(Path(sys.argv[1]), max_bytes=1 << 20, fsync=sys.argv[2])
ok, failed = [], []
for i in range(120):
    value = b"%d:" % i + b"x" * (40, 120, 300, 500, 900)[i * 7 % 5]
    try:
        ok.append([spool.append("usage.events", "user-%d" % (i % 7), value), i])
    except SpendstreamError as exc:
        failed.append([i, type(exc).__name__, str(exc)])
drained = []
while (rec := spool.read()) is not None:
    drained.append(int(rec.value.split(b":")[0]))
stats = spool.stats()
spool.close()
print(json.dumps({"ok": ok, "failed": failed, "drained": drained,
                  "write_errors": stats.write_errors, "read_errors": stats.read_errors}))
"""


@pytest.mark.parametrize("fsync", ["never", "always"])
def test_a_file_size_limit_loses_nothing_that_was_reported_written(
    tmp_path: Path, fsync: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _LIMITED_CHILD, str(tmp_path), fsync],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    written = [i for _, i in out["ok"]]
    # Both paths ran: writes cut short by the limit (retried in a new segment) and events
    # too large for any file under the limit (refused).
    assert out["write_errors"] > len(out["failed"]) > 0 and len(written) > 60
    for _, kind, message in out["failed"]:
        assert kind == "SpoolFullError" and "not spooled" in message and "size limit" in message
    assert sorted(written + [i for i, _, _ in out["failed"]]) == list(range(120))
    assert [seq for seq, _ in out["ok"]] == list(range(len(written))), "no seq was skipped"
    assert out["drained"] == written and out["read_errors"] == 0

    again = DiskSpool(tmp_path, max_bytes=1 << 20)  # a restart, without the limit
    recovered = [int(r.value.split(b":")[0]) for r in drain(again)]
    assert recovered == written
    stats = again.stats()
    assert (stats.lost_records, stats.corrupt_bytes, stats.truncated_bytes) == (0, 0, 0)
    again.close()


class FailingDisk:
    """Replaces os.write for one fd: a short write then ``error``, ``times`` times."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, error: int, times: int = 1) -> None:
        self.error, self.left, self.fd = error, times, -1
        self._write = os.write
        self._cut = False
        monkeypatch.setattr(os, "write", self.write)

    def write(self, fd: int, data: bytes) -> int:
        if fd != self.fd or self.left <= 0:
            return self._write(fd, data)
        if not self._cut:  # the disk takes part of the record...
            self._cut = True
            return self._write(fd, bytes(data)[: len(data) // 2])
        self._cut = False  # ...then refuses the rest
        self.left -= 1
        raise OSError(self.error, os.strerror(self.error))


def test_a_full_disk_under_reject_raises_and_leaves_no_partial_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = DiskSpool(tmp_path, max_bytes=1 << 20, full_policy="reject")
    fill(spool, 3)
    (segment,) = sorted(tmp_path.glob("*.seg"))
    size = segment.stat().st_size
    disk = FailingDisk(monkeypatch, errno.ENOSPC)
    disk.fd = spool._active_fd_or_raise()
    with pytest.raises(SpoolFullError) as err:
        spool.append(TOPIC, "user-1", b"does not fit on the disk")
    message = str(err.value)
    assert str(tmp_path) in message and "disk" in message and "full" in message
    assert "not spooled" in message and isinstance(err.value, BackpressureError)
    assert segment.stat().st_size == size, "the partial record was cut off"
    stats = spool.stats()
    assert (stats.records, stats.rejected, stats.write_errors) == (3, 1, 1)
    assert not spool.has_room(10), "a full disk is no room"
    assert spool.append(TOPIC, "user-1", b"room again") == 3  # the failed seq is not skipped
    assert spool.has_room(10)
    spool.close()
    again = DiskSpool(tmp_path, max_bytes=1 << 20)
    assert [r.value for r in drain(again)][-1] == b"room again"
    assert again.stats().truncated_bytes == 0
    again.close()


def test_a_full_disk_under_block_waits_for_room_then_gives_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = DiskSpool(tmp_path, max_bytes=1 << 20, full_policy="block")
    fill(spool, 2)
    disk = FailingDisk(monkeypatch, errno.EDQUOT, times=2)  # room after two tries
    disk.fd = spool._active_fd_or_raise()
    started = time.monotonic()
    assert spool.append(TOPIC, "user-1", b"after a wait", timeout_s=10) == 2
    assert time.monotonic() - started >= 0.4
    assert (spool.stats().blocked, spool.stats().write_errors) == (1, 2)

    disk.left = 1000
    with pytest.raises(SpoolFullError, match=r"full.*waited 0\.3s"):
        spool.append(TOPIC, "user-1", b"never", timeout_s=0.3)
    assert [r.seq for r in drain(spool)] == [0, 1, 2]
    spool.close()


def test_other_write_errors_raise_a_spool_io_error_and_write_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = DiskSpool(tmp_path, max_bytes=1 << 20, fsync="always")
    fill(spool, 2)
    (segment,) = sorted(tmp_path.glob("*.seg"))
    size = segment.stat().st_size
    disk = FailingDisk(monkeypatch, errno.EIO)
    disk.fd = spool._active_fd_or_raise()
    with pytest.raises(SpoolIOError, match="not spooled") as err:
        spool.append(TOPIC, "user-1", b"x")
    assert isinstance(err.value, SpendstreamError)
    assert segment.stat().st_size == size

    def fsync_fails(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", fsync_fails)  # written, but not durable: not reported
    with pytest.raises(SpoolIOError):
        spool.append(TOPIC, "user-1", b"y")
    assert segment.stat().st_size == size
    assert spool.stats().records == 2
    monkeypatch.undo()
    spool.close()


def test_an_acknowledgement_the_disk_refuses_costs_a_duplicate_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = DiskSpool(tmp_path, max_bytes=1 << 20)
    fill(spool, 6)
    recs = drain(spool)
    spool.ack(recs[0].seq, recs[0].size)  # opens the .ack file
    ack_fd = spool._segments[0].ack_fd
    assert ack_fd is not None
    disk = FailingDisk(monkeypatch, errno.ENOSPC)
    disk.fd = ack_fd
    spool.ack(recs[1].seq, recs[1].size)  # a short write, cut off again
    spool.ack(recs[2].seq, recs[2].size)  # refused
    spool.ack(recs[3].seq, recs[3].size)
    stats = spool.stats()
    assert (stats.records, stats.sync_errors) == (2, 2)
    spool.close()
    again = DiskSpool(tmp_path, max_bytes=1 << 20)
    # 1 and 2 were delivered but their acks never reached the disk: sent again (duplicates
    # are dropped downstream by event_id); 3, written after the torn one, is read correctly.
    assert [r.seq for r in drain(again)] == [1, 2, 4, 5]
    again.close()


# -- the reader ------------------------------------------------------------------------------


def test_a_failed_read_is_retried_after_a_pause_and_skips_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = DiskSpool(tmp_path, max_bytes=1 << 20)
    fill(spool, 5)
    real_pread = os.pread
    failures = [2]

    def flaky(fd: int, n: int, offset: int) -> bytes:
        if failures[0]:
            failures[0] -= 1
            raise OSError(errno.EIO, "Input/output error")
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", flaky)
    assert spool.read() is None
    assert spool.read(timeout_s=0.01) is None, "backing off"
    assert spool.stats().read_errors == 1 and "Input/output" in str(spool.stats().last_error)
    got: list[int] = []
    deadline = time.monotonic() + 5
    while len(got) < 5 and time.monotonic() < deadline:
        rec = spool.read(timeout_s=0.05)
        if rec is not None:
            got.append(rec.seq)
    assert got == [0, 1, 2, 3, 4]
    assert spool.stats().read_errors == 2
    spool.close()


class FakeMessage:
    """What a delivery report carries, for the fake producer below."""

    def __init__(self, topic: str, value: bytes, key: bytes | None, offset: int) -> None:
        self._topic, self._value, self._key, self._offset = topic, value, key, offset

    def topic(self) -> str:
        return self._topic

    def value(self) -> bytes:
        return self._value

    def key(self) -> bytes | None:
        return self._key

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def error(self) -> None:
        return None


class FakeProducer:
    """Stands in for confluent_kafka.Producer: every message is acknowledged at the next poll."""

    def __init__(self, conf: dict[str, Any]) -> None:
        self.sent: list[bytes] = []
        self._reports: list[tuple[Any, FakeMessage]] = []
        self._lock = threading.Lock()

    def produce(self, topic: str, value: bytes, key: Any = None, on_delivery: Any = None) -> None:
        key_b = key.encode() if isinstance(key, str) else key
        with self._lock:
            msg = FakeMessage(topic, value, key_b, len(self.sent))
            self.sent.append(value)
            self._reports.append((on_delivery, msg))

    def poll(self, timeout: float = 0.0) -> int:
        with self._lock:
            reports, self._reports = self._reports, []
        for callback, msg in reports:
            if callback is not None:
                callback(None, msg)
        if not reports:
            time.sleep(min(timeout, 0.01))
        return len(reports)

    def flush(self, timeout: float = 0.0) -> int:
        self.poll(0)
        return 0

    def purge(self, **_: Any) -> None:
        with self._lock:
            self._reports = []

    def close(self) -> None:
        pass

    def __len__(self) -> int:
        return len(self._reports)


def test_the_drain_thread_survives_read_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_settings: Any
) -> None:
    monkeypatch.setattr(producer_module, "Producer", FakeProducer)
    real_pread = os.pread
    failures = [3]

    def flaky(fd: int, n: int, offset: int) -> bytes:
        if failures[0]:
            failures[0] -= 1
            raise OSError(errno.EIO, "Input/output error")
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", flaky)
    producer = UsageProducer(make_settings(broker=False), spool=tmp_path / "spool")
    try:
        values = [b'{"event_id": "e-%d"}' % i for i in range(50)]
        for i, value in enumerate(values):
            producer.send_raw(f"user-{i % 5}", value)
        assert producer.flush(10) == 0, "everything delivered despite the failed reads"
        assert producer._drainer is not None and producer._drainer.is_alive()
        fake = producer._producer
        assert isinstance(fake, FakeProducer) and fake.sent == values
        spool_stats = producer.spool_stats()
        assert spool_stats is not None and spool_stats.read_errors == 3
        assert spool_stats.drain_alive is True
        assert spool_stats.drain_idle_s is not None and spool_stats.drain_idle_s < 1.0
    finally:
        producer.close(timeout_s=5)


def test_stats_show_whether_the_reading_thread_is_alive(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path)
    fill(spool, 3)
    stats = spool.stats()
    assert (stats.drain_alive, stats.drain_idle_s) == (None, None)
    reader = threading.Thread(target=lambda: spool.read())
    reader.start()
    reader.join()  # a drain thread that died after one read
    stats = spool.stats()
    assert stats.drain_alive is False and stats.records == 3
    assert stats.drain_idle_s is not None and 0 <= stats.drain_idle_s < 5
    assert [r.seq for r in drain(spool)] == [1, 2]  # the dead one had taken 0
    assert spool.stats().drain_alive is True  # this thread reads now
    spool.close()


# -- permissions -----------------------------------------------------------------------------


def test_the_folder_is_0700_and_every_file_0600(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # the modes must come from the spool, not from a strict umask
    try:
        folder = tmp_path / "spool"
        spool = DiskSpool(folder, max_bytes=1 << 20, segment_bytes=4096)
        fill(spool, 100)
        for rec in drain(spool)[:10]:
            spool.ack(rec.seq, rec.size)
        files = list(folder.iterdir())
        assert {p.suffix for p in files} == {"", ".seg", ".ack"}
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {
            p.name: 0o600 for p in files
        }
        spool.close()

        # A folder and files an earlier version left readable by everyone are made private.
        loose = tmp_path / "earlier"
        loose.mkdir(mode=0o755)
        (loose / "LOCK").touch(mode=0o644)
        (loose / "00000000000000000000.seg").write_bytes(encode_record(0, TOPIC, None, b"v"))
        (loose / "00000000000000000000.seg").chmod(0o644)
        DiskSpool(loose).close()
        assert stat.S_IMODE(loose.stat().st_mode) == 0o700
        assert {stat.S_IMODE(p.stat().st_mode) for p in loose.iterdir()} == {0o600}
    finally:
        os.umask(old_umask)


def test_the_producer_drain_survives_an_unexpected_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An error the drain pass does not expect (here: the spool's read raising a bug once) is
    # logged and the pass tried again: the thread lives on and the record is handed over.
    from producers import UsageProducer
    from spendstream.settings import load_settings

    settings = load_settings(
        kafka={"bootstrap_servers": "127.0.0.1:9"},
        producer={"spool_enabled": True, "spool_dir": str(tmp_path)},
    )
    producer = UsageProducer(settings)
    try:
        spool = producer.spool
        assert spool is not None
        real_read = spool.read
        calls = {"n": 0}

        def read_once_broken(timeout_s: float) -> Any:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("a bug in one pass")
            return real_read(timeout_s=timeout_s)

        monkeypatch.setattr(spool, "read", read_once_broken)
        producer.send_raw("u", b"one")
        deadline = time.monotonic() + 10
        while calls["n"] < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert calls["n"] >= 3  # the pass after the failure, and the one after that, ran
        assert producer._drainer is not None and producer._drainer.is_alive()
    finally:
        producer.close(0.1)
