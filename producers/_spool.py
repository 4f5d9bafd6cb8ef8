"""A bounded, append-only, on-disk spool of produced messages (DESIGN §2, issue 6 part 3).

When is a message spooled? **Always, first (write-ahead).** With a spool,
:meth:`UsageProducer.send <producers.UsageProducer.send>` appends the encoded event to the spool
and returns; a drain thread reads the spool in order and hands each record to librdkafka; the
record is acknowledged in the spool when the broker acknowledged it (``acks=all``). Write-ahead
is the simplest design that is correct across a process restart: a spool-on-failure design would
lose what sat in librdkafka's memory queue when the process died during an outage, and could not
keep one user's events in order when some were queued in memory and later ones on disk.

Layout of the folder::

    LOCK                        flock()ed by the one process (and producer) using the folder
    00000000000000000000.seg    records with seq 0.. (the name is the first seq, zero padded)
    00000000000000000000.ack    acknowledged seqs of that segment (8-byte little-endian each)

A record is ``<len:u32><crc32:u32><seq:u64><payload>`` where ``payload`` is
``<topic_len:u16><key_len:u32><topic><key><value>`` (``key_len`` 0xFFFFFFFF = no key) and the
CRC covers seq and payload. A segment is rolled once it holds ``segment_bytes`` and deleted
(with its ``.ack`` file) once every record in it is acknowledged. A torn or corrupt tail (a crash
in the middle of a write) is detected by length and CRC and truncated at open.

Ordering: records are read back in seq order, i.e. in the order they were appended, so every
user's events reach librdkafka (and, being keyed by user, one partition) in order.

A restart replays every record whose acknowledgement was not recorded. A record can be delivered
but its acknowledgement lost (a crash between the broker's ack and the ``.ack`` write), so a
replay may duplicate an event; that is harmless because every event carries its ``event_id``
and the stream processor drops duplicates by ``event_id`` (DESIGN §3, §5). The idempotent
producer only prevents duplicates within one producer session, not across restarts.

Durability (``fsync``): records are written with ``os.write`` (no user-space buffer), so a
*process* crash never loses an appended record. ``always`` also ``fsync``\\ s before
:meth:`DiskSpool.append` returns (survives power loss, costs a disk flush per event);
``batch`` fsyncs from the background thread about every ``fsync_interval_s``; ``never`` leaves
it to the operating system.

Bound (``max_bytes``): the bytes of unacknowledged records (the backlog). When an append would
exceed it, ``full_policy`` applies: ``block`` waits for room (up to the caller's timeout, then
raises :class:`SpoolFullError`), ``reject`` raises :class:`SpoolFullError` at once. Disk use is
at most ``max_bytes`` plus one partially acknowledged segment.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from spendstream.errors import BackpressureError, ConfigError

log = logging.getLogger(__name__)

FullPolicy = Literal["block", "reject"]
FsyncPolicy = Literal["always", "batch", "never"]

_HEADER = struct.Struct("<IIQ")  # payload length, crc32(seq + payload), seq
_PAYLOAD_HEAD = struct.Struct("<HI")  # topic length, key length
_SEQ = struct.Struct("<Q")
_NO_KEY = 0xFFFFFFFF
_MAX_PAYLOAD = 64 * 1024 * 1024  # larger lengths are corruption, not records
_READ_CHUNK = 256 * 1024
SEGMENT_SUFFIX = ".seg"
ACK_SUFFIX = ".ack"


class SpoolFullError(BackpressureError):
    """The spool holds ``max_bytes`` of unacknowledged events and the policy refused to wait."""


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    """One spooled message."""

    seq: int
    topic: str
    key: bytes | None
    value: bytes
    size: int
    """Bytes the record takes on disk (header included): what it counts against the bound."""


@dataclass(frozen=True, slots=True)
class SpoolStats:
    """A snapshot of a spool's counters (depth = records and bytes not yet acknowledged)."""

    records: int
    bytes: int
    segments: int
    appended: int
    acknowledged: int
    rejected: int
    blocked: int
    replayed: int
    truncated_bytes: int


@dataclass
class _Segment:
    first_seq: int
    path: Path
    next_seq: int  # one past the last seq written
    size: int = 0
    pending: int = 0  # records not yet acknowledged
    acked: set[int] = field(default_factory=set)
    ack_fd: int | None = None
    sealed: bool = False

    @property
    def ack_path(self) -> Path:
        return self.path.with_suffix(ACK_SUFFIX)


def encode_record(seq: int, topic: str, key: bytes | None, value: bytes) -> bytes:
    """The on-disk bytes of one record."""
    topic_b = topic.encode()
    key_len = _NO_KEY if key is None else len(key)
    payload = b"".join((_PAYLOAD_HEAD.pack(len(topic_b), key_len), topic_b, key or b"", value))
    crc = zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq)))
    return _HEADER.pack(len(payload), crc, seq) + payload


def _decode_payload(seq: int, payload: bytes, size: int) -> SpoolRecord:
    topic_len, key_len = _PAYLOAD_HEAD.unpack_from(payload)
    pos = _PAYLOAD_HEAD.size
    topic = payload[pos : pos + topic_len].decode()
    pos += topic_len
    key: bytes | None = None
    if key_len != _NO_KEY:
        key = payload[pos : pos + key_len]
        pos += key_len
    return SpoolRecord(seq, topic, key, payload[pos:], size)


def read_segment(path: Path) -> tuple[list[SpoolRecord], int]:
    """Every intact record of a segment file, and the byte length of that intact prefix.

    Reading stops at the first short, oversized or CRC-failing record: a write torn by a crash
    (or later corruption); everything from there on cannot be framed reliably.
    """
    return _parse(path.read_bytes())


def _parse(data: bytes) -> tuple[list[SpoolRecord], int]:
    """The intact records at the start of ``data`` and how many bytes they take."""
    records: list[SpoolRecord] = []
    pos = 0
    while pos + _HEADER.size <= len(data):
        length, crc, seq = _HEADER.unpack_from(data, pos)
        end = pos + _HEADER.size + length
        if length > _MAX_PAYLOAD or end > len(data) or length < _PAYLOAD_HEAD.size:
            break
        payload = data[pos + _HEADER.size : end]
        if zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq))) != crc:
            break
        records.append(_decode_payload(seq, payload, end - pos))
        pos = end
    return records, pos


def _read_acks(path: Path) -> set[int]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return set()
    whole = len(data) - len(data) % _SEQ.size  # a torn last ack is just not an ack
    return {s for (s,) in _SEQ.iter_unpack(data[:whole])}


class DiskSpool:
    """A bounded write-ahead log of messages waiting for Kafka (see the module doc).

    Thread-safe: producers append from any thread, one drain thread reads, the delivery-report
    thread acknowledges. One process (and one spool object) owns a folder at a time.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = 256 * 1024 * 1024,
        full_policy: FullPolicy = "block",
        fsync: FsyncPolicy = "batch",
        segment_bytes: int | None = None,
        fsync_interval_s: float = 0.05,
    ) -> None:
        """Open (creating) the spool folder, take its lock and recover what it holds."""
        if full_policy not in ("block", "reject"):
            raise ConfigError(f"spool full_policy must be block or reject, not {full_policy!r}")
        if fsync not in ("always", "batch", "never"):
            raise ConfigError(f"spool fsync must be always, batch or never, not {fsync!r}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.full_policy: FullPolicy = full_policy
        self.fsync: FsyncPolicy = fsync
        # Several segments per bound, so acknowledged space is given back in steps.
        self.segment_bytes = segment_bytes or max(4096, min(max_bytes // 8, 16 * 1024 * 1024))
        self.fsync_interval_s = fsync_interval_s
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # notified when acks free room
        self._readable = threading.Condition(self._lock)  # notified on append / rewind
        self._segments: list[_Segment] = []
        self._firsts: list[int] = []  # first_seq of each segment, for bisect
        self._active_fd: int | None = None
        self._dirty = False
        self._last_sync = time.monotonic()
        self._pending_records = 0
        self._pending_bytes = 0
        self._appended = self._acknowledged = self._rejected = self._blocked = 0
        self._replayed = 0
        self._truncated = 0
        self._closed = False
        # The read cursor: the first seq of the segment being read and a byte offset in it.
        self._read_first = 0
        self._read_offset = 0
        self._read_buf: list[SpoolRecord] = []
        self._read_pos = 0

        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.path / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise ConfigError(
                    f"the producer spool {self.path} is in use by another producer; give each "
                    "producer process its own SPENDSTREAM_PRODUCER__SPOOL_DIR"
                ) from None
            raise
        try:
            self._next_seq = self._recover()
            self._read_first = self._firsts[0] if self._firsts else self._next_seq
        except BaseException:
            self._release_lock()
            raise

    # -- recovery ---------------------------------------------------------------------------

    def _recover(self) -> int:
        next_seq = 0
        for seg_path in sorted(self.path.glob(f"*{SEGMENT_SUFFIX}")):
            try:
                first = int(seg_path.stem)
            except ValueError:
                continue
            records, good = read_segment(seg_path)
            size = seg_path.stat().st_size
            if good < size:
                # A torn tail: the crash happened mid-write, the record was never acknowledged
                # to the caller as durable under fsync=always, and cannot be framed anyway.
                log.warning(
                    "spool segment %s: truncating %d bytes of torn or corrupt tail",
                    seg_path,
                    size - good,
                )
                self._truncated += size - good
                os.truncate(seg_path, good)
            acked = _read_acks(seg_path.with_suffix(ACK_SUFFIX))
            seg = _Segment(first, seg_path, first, size=good, sealed=True)
            for rec in records:
                seg.next_seq = rec.seq + 1
                if rec.seq in acked:
                    seg.acked.add(rec.seq)
                else:
                    seg.pending += 1
                    self._pending_bytes += rec.size
            next_seq = max(next_seq, seg.next_seq, first)
            if seg.pending == 0:
                self._delete(seg)
                continue
            self._pending_records += seg.pending
            self._replayed += seg.pending
            self._segments.append(seg)
            self._firsts.append(first)
        for stray in self.path.glob(f"*{ACK_SUFFIX}"):
            if not stray.with_suffix(SEGMENT_SUFFIX).exists():
                stray.unlink(missing_ok=True)
        if self._pending_records:
            log.info(
                "spool %s: %d unacknowledged events (%d bytes) from an earlier run will be "
                "sent first",
                self.path,
                self._pending_records,
                self._pending_bytes,
            )
        return next_seq

    # -- writing ----------------------------------------------------------------------------

    def append(
        self,
        topic: str,
        key: str | bytes | None,
        value: bytes,
        timeout_s: float | None = None,
        *,
        on_seq: Callable[[int], None] | None = None,
    ) -> int:
        """Append one message durably (per the fsync policy); return its sequence number.

        When the backlog would exceed ``max_bytes``: with ``block``, wait up to ``timeout_s``
        (``None`` = as long as it takes) for acknowledgements to free room; with ``reject``,
        or when the wait times out, raise :class:`SpoolFullError`. ``on_seq`` is called with
        the sequence number before any reader can see the record (to attach a waiter to it).
        """
        key_b = key.encode() if isinstance(key, str) else key
        with self._lock:
            if self._closed:
                raise SpoolFullError(f"the spool {self.path} is closed", retry_after=1.0)
            seq = self._next_seq
            data = encode_record(seq, topic, key_b, value)
            if len(data) > self.max_bytes:
                raise SpoolFullError(
                    f"a {len(data)}-byte message can never fit the {self.max_bytes}-byte spool",
                    retry_after=0.0,
                )
            if self._pending_bytes + len(data) > self.max_bytes:
                self._wait_for_room(len(data), timeout_s)
                seq = self._next_seq  # others may have appended while this thread waited
                data = encode_record(seq, topic, key_b, value)
            seg = self._active_segment()
            os.write(self._active_fd_or_raise(), data)
            if self.fsync == "always":
                os.fsync(self._active_fd_or_raise())
            else:
                self._dirty = True
            self._next_seq = seq + 1
            seg.next_seq = seq + 1
            seg.size += len(data)
            seg.pending += 1
            self._pending_records += 1
            self._pending_bytes += len(data)
            self._appended += 1
            if on_seq is not None:
                on_seq(seq)
            if seg.size >= self.segment_bytes:
                self._seal_active()
            self._readable.notify()
            return seq

    def has_room(self, size: int) -> bool:
        """True if ``size`` more bytes fit the bound now (a hint: others may append first)."""
        return self._pending_bytes + size <= self.max_bytes

    def _wait_for_room(self, size: int, timeout_s: float | None) -> None:
        if self.full_policy == "reject":
            self._rejected += 1
            raise SpoolFullError(self._full_message(), retry_after=1.0)
        self._blocked += 1
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._pending_bytes + size > self.max_bytes:
            remaining = None if deadline is None else deadline - time.monotonic()
            if self._closed or (remaining is not None and remaining <= 0):
                self._rejected += 1
                raise SpoolFullError(
                    self._full_message() + f"; waited {timeout_s}s for room", retry_after=1.0
                )
            self._room.wait(remaining)

    def _full_message(self) -> str:
        return (
            f"the producer spool {self.path} is full: {self._pending_records} events "
            f"({self._pending_bytes} bytes) wait for Kafka, the bound is {self.max_bytes} bytes "
            "(SPENDSTREAM_PRODUCER__SPOOL_MAX_BYTES)"
        )

    def _active_segment(self) -> _Segment:
        if self._segments and not self._segments[-1].sealed:
            return self._segments[-1]
        seq = self._next_seq
        seg = _Segment(seq, self.path / f"{seq:020d}{SEGMENT_SUFFIX}", seq)
        self._active_fd = os.open(seg.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._segments.append(seg)
        self._firsts.append(seq)
        return seg

    def _active_fd_or_raise(self) -> int:
        assert self._active_fd is not None
        return self._active_fd

    def _seal_active(self) -> None:
        if self._active_fd is not None:
            if self._dirty or self.fsync != "never":
                os.fsync(self._active_fd)
            os.close(self._active_fd)
            self._active_fd = None
            self._dirty = False
        if self._segments and not self._segments[-1].sealed:
            seg = self._segments[-1]
            seg.sealed = True
            if seg.pending == 0:
                self._drop_segment(seg)

    def sync(self, force: bool = False) -> None:
        """fsync the active segment and flush acknowledgements, if due (``batch``) or forced."""
        with self._lock:
            now = time.monotonic()
            if not force and now - self._last_sync < self.fsync_interval_s:
                return
            self._last_sync = now
            if self._dirty and self._active_fd is not None and self.fsync != "never":
                os.fsync(self._active_fd)
            self._dirty = False

    # -- reading and acknowledging ----------------------------------------------------------

    def read(self, timeout_s: float = 0.0) -> SpoolRecord | None:
        """The next record to send, in append order; ``None`` if none arrives in ``timeout_s``.

        Records are read back from the segment files (the page cache, in practice), so memory
        stays bounded whatever the backlog. Acknowledged records are skipped (after
        :meth:`rewind` some may be).
        """
        with self._lock:
            rec = self._next_unread()
            if rec is None and timeout_s > 0 and not self._closed:
                self._readable.wait(timeout_s)
                rec = self._next_unread()
            return rec

    def _next_unread(self) -> SpoolRecord | None:
        while True:
            if self._read_pos < len(self._read_buf):
                rec = self._read_buf[self._read_pos]
                self._read_pos += 1
                if not self._is_acked(rec.seq):
                    return rec
                continue
            if not self._fill_read_buf():
                return None

    def _fill_read_buf(self) -> bool:
        """Parse the next chunk of records at the read cursor; False when nothing is left."""
        self._read_buf, self._read_pos = [], 0
        while True:
            seg = self._reader_segment()
            if seg is None:
                return False
            if self._read_offset < seg.size:
                fd = os.open(seg.path, os.O_RDONLY)
                try:
                    chunk = os.pread(fd, _READ_CHUNK, self._read_offset)
                    records, used = _parse(chunk)
                    if not records and used == 0:
                        # One record larger than the chunk: read exactly it.
                        (length,) = struct.unpack_from("<I", chunk)
                        chunk = os.pread(fd, _HEADER.size + length, self._read_offset)
                        records, used = _parse(chunk)
                finally:
                    os.close(fd)
                if not records:
                    # Only possible if the file changed under us; never spin on it.
                    raise OSError(f"unreadable spool segment {seg.path} at {self._read_offset}")
                self._read_offset += used
                self._read_buf = records
                return True
            if not seg.sealed:
                return False  # the active segment: wait for appends
            self._read_first = seg.next_seq  # move to the segment after it
            self._read_offset = 0

    def _reader_segment(self) -> _Segment | None:
        """The segment the read cursor is in (``_read_first`` is its first seq).

        If that segment was deleted meanwhile (every record acknowledged), the cursor moves to
        the start of the next one.
        """
        i = bisect.bisect_left(self._firsts, self._read_first)
        if i >= len(self._segments):
            return None
        seg = self._segments[i]
        if seg.first_seq != self._read_first:
            self._read_first, self._read_offset = seg.first_seq, 0
        return seg

    def _is_acked(self, seq: int) -> bool:
        seg = self._segment_of(seq)
        return seg is None or seq in seg.acked

    def _segment_of(self, seq: int) -> _Segment | None:
        i = bisect.bisect_right(self._firsts, seq) - 1
        if i < 0:
            return None
        seg = self._segments[i]
        return seg if seq < seg.next_seq else None

    def ack(self, seq: int, size: int) -> None:
        """Record that the broker acknowledged record ``seq`` (``size`` bytes on disk)."""
        with self._lock:
            seg = self._segment_of(seq)
            if seg is None or seq in seg.acked:
                return  # already acknowledged (a replayed record delivered twice)
            seg.acked.add(seq)
            seg.pending -= 1
            self._pending_records -= 1
            self._pending_bytes -= size
            self._acknowledged += 1
            if seg.pending == 0 and seg.sealed:
                self._drop_segment(seg)
            else:
                if seg.ack_fd is None:
                    seg.ack_fd = os.open(
                        seg.ack_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644
                    )
                # Not fsynced: a lost ack only means a harmless duplicate after a restart.
                os.write(seg.ack_fd, _SEQ.pack(seq))
            self._room.notify_all()

    def rewind(self) -> None:
        """Read again from the oldest unacknowledged record (after a failed delivery)."""
        with self._lock:
            self._read_first = self._firsts[0] if self._firsts else self._next_seq
            self._read_offset = 0
            self._read_buf, self._read_pos = [], 0
            self._readable.notify_all()

    def _drop_segment(self, seg: _Segment) -> None:
        i = self._segments.index(seg)
        del self._segments[i]
        del self._firsts[i]
        if seg.first_seq <= self._read_first < seg.next_seq:
            # The reader was inside it: every record in it is acknowledged, move on.
            self._read_first = seg.next_seq
            self._read_offset = 0
            self._read_buf, self._read_pos = [], 0
        self._delete(seg)

    def _delete(self, seg: _Segment) -> None:
        if seg.ack_fd is not None:
            os.close(seg.ack_fd)
            seg.ack_fd = None
        seg.path.unlink(missing_ok=True)
        seg.ack_path.unlink(missing_ok=True)

    # -- state ------------------------------------------------------------------------------

    def stats(self) -> SpoolStats:
        """A consistent snapshot of depth and counters."""
        with self._lock:
            return SpoolStats(
                records=self._pending_records,
                bytes=self._pending_bytes,
                segments=len(self._segments),
                appended=self._appended,
                acknowledged=self._acknowledged,
                rejected=self._rejected,
                blocked=self._blocked,
                replayed=self._replayed,
                truncated_bytes=self._truncated,
            )

    def __len__(self) -> int:
        """Records not yet acknowledged."""
        return self._pending_records

    def wait_empty(self, timeout_s: float | None) -> bool:
        """Wait until every record is acknowledged; False on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._lock:
            while self._pending_records:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._room.wait(remaining if remaining is None else min(remaining, 0.1))
            return True

    def segment_files(self) -> Iterator[Path]:
        """The segment files on disk, oldest first (for tools and tests)."""
        return iter(sorted(self.path.glob(f"*{SEGMENT_SUFFIX}")))

    def close(self) -> None:
        """fsync, close the files and release the folder; unacknowledged records stay."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._active_fd is not None:
                if self.fsync != "never":
                    os.fsync(self._active_fd)
                os.close(self._active_fd)
                self._active_fd = None
            for seg in list(self._segments):
                if seg.ack_fd is not None:
                    os.close(seg.ack_fd)
                    seg.ack_fd = None
                if seg.pending == 0:
                    self._delete(seg)
            self._room.notify_all()
            self._readable.notify_all()
        self._release_lock()

    def _release_lock(self) -> None:
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        finally:
            os.close(self._lock_fd)

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed
