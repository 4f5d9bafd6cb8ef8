"""A bounded, append-only, on-disk spool of produced messages (docs/DESIGN.md, "Data flow").

When is a message spooled? **Always, first (write-ahead).** With a spool,
:meth:`UsageProducer.send <producers.UsageProducer.send>` appends the encoded event to the spool
and returns; a drain thread reads the spool in order and hands each record to librdkafka; the
record is acknowledged in the spool when the broker acknowledged it (``acks=all``). Write-ahead
is the simplest design that is correct across a process restart: a spool-on-failure design would
lose what sat in librdkafka's memory queue when the process died during an outage, and could not
keep one user's events in order when some were queued in memory and later ones on disk.

Layout of the folder (mode 0700; every file in it 0600: the records are usage data)::

    LOCK                        flock()ed by the one process (and producer) using the folder
    00000000000000000000.seg    records with seq 0.. (the name is the first seq, zero padded)
    00000000000000000000.ack    acknowledged seqs of that segment (8-byte little-endian each)

A record is ``<len:u32><crc32:u32><seq:u64><payload>`` where ``payload`` is
``<topic_len:u16><key_len:u32><topic><key><value>`` (``key_len`` 0xFFFFFFFF = no key) and the
CRC covers seq and payload. A segment is rolled once it holds ``segment_bytes`` and deleted
(with its ``.ack`` file) once every record in it is acknowledged.

Writes are all or nothing: :meth:`DiskSpool.append` writes the whole record (a short
``write`` is continued) and, if the disk refuses part of it, cuts the file back to where the
record began and raises; it never returns for a record that is not wholly in the file. A full
disk (``ENOSPC``, ``EDQUOT``) goes through ``full_policy`` like a full bound; a file at its
size limit (``EFBIG``) is sealed and the record written to a new segment; any other I/O error
raises :class:`SpoolIOError`.

Damage (a crash in the middle of a write, or bytes changed later on disk) loses only the
records it touches. Reading stops at a record whose length, CRC or sequence number is wrong and
looks for the next valid record after it, byte by byte: the CRC over seq and payload is what
makes a frame trustworthy there (a wrong length frames bytes whose CRC does not match, and a
false frame in damaged bytes would need a CRC-32 match and a sequence number in the segment's
range, about one chance in 2**32 per candidate position), so the format needs no change. The
damaged bytes are skipped (and counted) and every record before and after them is sent. A torn
final record (a crash mid-write: the file ends inside the record) is truncated at open.

Ordering: records are read back in seq order, i.e. in the order they were appended, so every
user's events reach librdkafka (and, being keyed by user, one partition) in order.

A restart replays every record whose acknowledgement was not recorded. A record can be delivered
but its acknowledgement lost (a crash between the broker's ack and the ``.ack`` write, or an
``.ack`` write the disk refused), so a replay may duplicate an event; that is harmless because
every event carries its ``event_id`` and the stream processor drops duplicates by ``event_id``
(docs/DESIGN.md, "Event time and lateness" and "Delivery guarantee"). The idempotent
producer only prevents duplicates within one producer session, not across restarts.

Durability (``fsync``): records are written with ``os.write`` (no user-space buffer), so a
*process* crash never loses an appended record. ``always`` also ``fsync``\\ s before
:meth:`DiskSpool.append` returns (survives power loss, costs a disk flush per event);
``batch`` fsyncs from the background thread about every ``fsync_interval_s``; ``never`` leaves
it to the operating system.

Bound (``max_bytes``): the bytes of unacknowledged records (the backlog). When an append would
exceed it, or the disk is full, ``full_policy`` applies: ``block`` waits for room (up to the
caller's timeout, then raises :class:`SpoolFullError`), ``reject`` raises
:class:`SpoolFullError` at once. Disk use is at most ``max_bytes`` plus one partially
acknowledged segment.

The reader never raises on I/O: :meth:`DiskSpool.read` logs a failed read, backs off (up to
five seconds) and returns ``None``, so the drain thread keeps running and retries the same
record. Nor do :meth:`DiskSpool.ack` and :meth:`DiskSpool.sync`, which run on the producer's
threads: what they fail to write costs durability or a duplicate, never a record. Failed
reads and writes, lost records, and whether the thread reading the spool is alive are in
:meth:`DiskSpool.stats`.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import functools
import logging
import os
import re
import stat
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from spendstream.errors import BackpressureError, ConfigError, DeliveryError

log = logging.getLogger(__name__)

FullPolicy = Literal["block", "reject"]
FsyncPolicy = Literal["always", "batch", "never"]

_HEADER = struct.Struct("<IIQ")  # payload length, crc32(seq + payload), seq
_PAYLOAD_HEAD = struct.Struct("<HI")  # topic length, key length
_SEQ = struct.Struct("<Q")
_NO_KEY = 0xFFFFFFFF
_MAX_PAYLOAD = 64 * 1024 * 1024  # larger lengths are corruption, not records
_MIN_RECORD = _HEADER.size + _PAYLOAD_HEAD.size
_READ_CHUNK = 256 * 1024
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_DISK_RETRY_S = 0.5  # a full disk can be freed by others: look again this often while blocked
_READ_BACKOFF_S = (0.05, 5.0)  # first and longest pause after a failed read
_LOG_EVERY_S = 60.0  # repeated I/O failures are logged at most this often
_DIR_MODE = 0o700
_FILE_MODE = 0o600
SEGMENT_SUFFIX = ".seg"
ACK_SUFFIX = ".ack"


class SpoolFullError(BackpressureError):
    """The spool holds ``max_bytes`` of unacknowledged events, or its disk is full, and the
    policy refused to wait (or waited in vain). The event was not spooled."""


class SpoolIOError(DeliveryError):
    """The spool's disk failed (an I/O error other than a full disk); the event was not
    spooled."""


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
    """Bytes of torn final records cut off at open (writes a crash interrupted)."""
    write_errors: int = 0
    """Appends the disk refused (each attempt; the caller got an error or the policy waited)."""
    read_errors: int = 0
    """Reads that failed with an I/O error (the drain backs off and retries)."""
    sync_errors: int = 0
    """fsyncs, acknowledgement writes and deletions that failed (durability, not data, at risk:
    a lost acknowledgement only means a duplicate after a restart)."""
    lost_records: int = 0
    """Records found unreadable (damaged on disk) before they were acknowledged: skipped, so
    never sent (again)."""
    corrupt_bytes: int = 0
    """Bytes of damaged records that reading skipped."""
    drain_alive: bool | None = None
    """Whether the thread that reads the spool (the producer's drain) is still running
    (``None``: nothing has read it yet). False means nothing sends the spool any more."""
    drain_idle_s: float | None = None
    """Seconds since the reader last looked for records (``None``: never). An idle drain looks
    every 50 ms; a busy one at every chunk read; a drain holding a record for a full
    librdkafka queue does not look, so a large value with records waiting means the drain is
    stuck or the broker away."""
    last_error: str | None = None
    """The last I/O error, if any."""


@dataclass
class _Segment:
    first_seq: int
    path: Path
    next_seq: int  # one past the last seq written
    size: int = 0  # bytes of whole records (appends go here; reading stops here)
    pending: int = 0  # records not yet acknowledged
    pending_bytes: int = 0
    acked: set[int] = field(default_factory=set)
    lost: set[int] = field(default_factory=set)  # found unreadable: no longer pending
    holes: list[tuple[int, int]] = field(default_factory=list)  # damaged byte ranges, sorted
    ack_fd: int | None = None
    ack_size: int = 0
    ack_broken: bool = False
    sealed: bool = False

    @property
    def ack_path(self) -> Path:
        return self.path.with_suffix(ACK_SUFFIX)


@dataclass
class _Scan:
    """What reading a whole segment found."""

    records: list[SpoolRecord]
    holes: list[tuple[int, int]]  # damaged ranges with a readable record after them
    end: int  # where the last readable record ends; after it nothing is readable


def encode_record(seq: int, topic: str, key: bytes | None, value: bytes) -> bytes:
    """The on-disk bytes of one record."""
    topic_b = topic.encode()
    key_len = _NO_KEY if key is None else len(key)
    payload = b"".join((_PAYLOAD_HEAD.pack(len(topic_b), key_len), topic_b, key or b"", value))
    crc = zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq)))
    return _HEADER.pack(len(payload), crc, seq) + payload


def _decode_payload(seq: int, payload: bytes, size: int) -> SpoolRecord | None:
    topic_len, key_len = _PAYLOAD_HEAD.unpack_from(payload)
    pos = _PAYLOAD_HEAD.size
    if pos + topic_len + (0 if key_len == _NO_KEY else key_len) > len(payload):
        return None  # a CRC-valid frame that is not a record: only in crafted bytes
    try:
        topic = payload[pos : pos + topic_len].decode()
    except UnicodeDecodeError:
        return None
    pos += topic_len
    key: bytes | None = None
    if key_len != _NO_KEY:
        key = payload[pos : pos + key_len]
        pos += key_len
    return SpoolRecord(seq, topic, key, payload[pos:], size)


def _record_at(data: bytes, pos: int, lo: int, hi: int | None) -> SpoolRecord | None:
    """The record framed at ``pos`` if it is whole, its CRC matches and lo <= seq < hi."""
    if pos + _MIN_RECORD > len(data):
        return None
    length, crc, seq = _HEADER.unpack_from(data, pos)
    end = pos + _HEADER.size + length
    if length < _PAYLOAD_HEAD.size or length > _MAX_PAYLOAD or end > len(data):
        return None
    if seq < lo or (hi is not None and seq >= hi):
        return None
    payload = data[pos + _HEADER.size : end]
    if zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq))) != crc:
        return None
    return _decode_payload(seq, payload, end - pos)


def _parse(data: bytes, lo: int = 0, hi: int | None = None) -> tuple[list[SpoolRecord], int]:
    """The intact records at the start of ``data`` (seqs increasing from ``lo``, below ``hi``)
    and how many bytes they take; stops at the first byte that does not start one."""
    records: list[SpoolRecord] = []
    append = records.append
    pos = 0
    size = len(data)
    unpack = _HEADER.unpack_from
    pack_seq = _SEQ.pack
    crc32 = zlib.crc32
    # The drain's hot path: _record_at's checks, inlined.
    while pos + _MIN_RECORD <= size:
        length, crc, seq = unpack(data, pos)
        start = pos + _HEADER.size
        end = start + length
        if length < _PAYLOAD_HEAD.size or length > _MAX_PAYLOAD or end > size:
            break
        if seq < lo or (hi is not None and seq >= hi):
            break
        payload = data[start:end]
        if crc32(payload, crc32(pack_seq(seq))) != crc:
            break
        rec = _decode_payload(seq, payload, end - pos)
        if rec is None:
            break
        append(rec)
        pos = end
        lo = seq + 1
    return records, pos


@functools.lru_cache(maxsize=8)
def _candidates(seq_high: int) -> re.Pattern[bytes]:
    """Where a header can start: a length below 64 MiB (its top byte at most 3) and a seq
    whose top four bytes are ``seq_high``. Matched in C, so damaged bytes are skipped fast."""
    high = re.escape(struct.pack("<I", seq_high))
    return re.compile(rb"(?=[\x00-\xff]{3}[\x00-\x03][\x00-\xff]{8}" + high + rb")")


_NONZERO = re.compile(rb"[^\x00]")
_ZEROS = bytes(4)


def _resync(data: bytes, start: int, lo: int, hi: int | None) -> tuple[int, SpoolRecord] | None:
    """The first valid record at or after offset ``start``, and its offset."""
    size = len(data)
    # Seqs in a segment are consecutive and a record takes at least _MIN_RECORD bytes, so the
    # seq after n damaged bytes is at most about n / _MIN_RECORD above the next one expected
    # (the margin covers short writes that earlier versions did not notice).
    top = lo + (size - start) // _MIN_RECORD + 1024
    hi = top if hi is None else min(hi, top)
    if hi <= lo:
        return None
    finder = _candidates(lo >> 32) if lo >> 32 == (hi - 1) >> 32 else None
    unpack = _HEADER.unpack_from
    last = size - _MIN_RECORD
    pos = start
    while pos <= last:
        if finder is not None:
            found = finder.search(data, pos)
            if found is None or found.start() > last:
                return None
            pos = found.start()
        if data[pos : pos + 4] == _ZEROS:
            # A length is never 0: a header starts at most three bytes before a nonzero byte.
            nonzero = _NONZERO.search(data, pos)
            if nonzero is None:
                return None
            pos = max(pos + 1, nonzero.start() - 3)
            continue
        length, _, seq = unpack(data, pos)
        if _PAYLOAD_HEAD.size <= length <= size - pos - _HEADER.size and lo <= seq < hi:
            rec = _record_at(data, pos, lo, hi)
            if rec is not None:
                return pos, rec
        pos += 1
    return None


def _scan(data: bytes, first: int, hi: int | None) -> _Scan:
    """Every readable record of a whole segment, skipping damaged bytes between them.

    ``first`` is the segment's first seq, ``hi`` (if known) the first seq of the next segment:
    a valid record has a seq above the previous record's and below ``hi``.
    """
    records: list[SpoolRecord] = []
    holes: list[tuple[int, int]] = []
    pos = end = 0
    lo = first
    while pos < len(data):
        rec = _record_at(data, pos, lo, hi)
        if rec is None:
            found = _resync(data, pos + 1, lo, hi)
            if found is None:
                break
            holes.append((pos, found[0]))
            pos, rec = found
        records.append(rec)
        lo = rec.seq + 1
        pos = end = pos + rec.size
    return _Scan(records, holes, end)


def _is_torn(data: bytes, pos: int) -> bool:
    """True if the bytes from ``pos`` to the end are the start of one record (a cut write)."""
    if len(data) - pos < _HEADER.size:
        return True
    length: int = struct.unpack_from("<I", data, pos)[0]
    return _PAYLOAD_HEAD.size <= length <= _MAX_PAYLOAD and pos + _HEADER.size + length > len(data)


def read_segment(path: Path) -> tuple[list[SpoolRecord], int]:
    """Every readable record of a segment file, and where the last of them ends.

    Damaged records are skipped (the records after them are still returned); the bytes after
    the returned end are a torn or damaged tail with no readable record in it.
    """
    first = int(path.stem) if path.stem.isdigit() else 0
    scan = _scan(path.read_bytes(), first, None)
    return scan.records, scan.end


def _write_rest(fd: int, data: bytes, done: int) -> None:
    """Write ``data`` after its first ``done`` bytes (a filling disk makes ``write`` short
    before it fails)."""
    view = memoryview(data)
    while done < len(data):
        n = os.write(fd, view[done:])
        if n <= 0:
            raise OSError(errno.EIO, "write() wrote nothing")
        done += n


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
        self._write_errors = self._read_errors = self._sync_errors = 0
        self._lost = 0
        self._corrupt = 0
        self._last_error: str | None = None
        self._last_logged: dict[str, float] = {}
        self._disk_full = False
        self._last_read: float | None = None
        self._reader: threading.Thread | None = None
        self._read_backoff = 0.0
        self._read_retry_at = 0.0
        self._closed = False
        # The read cursor: the first seq of the segment being read and a byte offset in it.
        self._read_first = 0
        self._read_offset = 0
        self._read_buf: list[SpoolRecord] = []
        self._read_pos = 0

        self._lock_released = False
        self._make_private_dir()
        self._lock_fd = os.open(self.path / "LOCK", os.O_RDWR | os.O_CREAT, _FILE_MODE)
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
        except OSError as exc:
            self._release_lock()
            raise SpoolIOError(f"cannot read the producer spool {self.path}: {exc}") from exc
        except BaseException:
            self._release_lock()
            raise

    def _make_private_dir(self) -> None:
        self.path.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        mode = stat.S_IMODE(self.path.stat().st_mode)
        if mode & 0o077:
            # A folder made by an earlier version, or by hand: the records are usage data.
            try:
                os.chmod(self.path, mode & _DIR_MODE)
            except OSError as exc:
                log.warning("cannot make the spool folder %s private (%s)", self.path, exc)

    # -- recovery ---------------------------------------------------------------------------

    def _recover(self) -> int:
        for entry in self.path.iterdir():
            # Files written by an earlier version were readable by everyone.
            if entry.is_file() and stat.S_IMODE(entry.stat().st_mode) & 0o077:
                try:
                    os.chmod(entry, _FILE_MODE)
                except OSError as exc:
                    log.warning("cannot make %s private (%s)", entry, exc)
        found = sorted(
            (int(p.stem), p) for p in self.path.glob(f"*{SEGMENT_SUFFIX}") if p.stem.isdigit()
        )
        next_seq = 0
        for i, (first, seg_path) in enumerate(found):
            hi = found[i + 1][0] if i + 1 < len(found) else None
            seg = self._recover_segment(first, seg_path, hi)
            next_seq = max(next_seq, seg.next_seq, first)
            if seg.pending == 0:
                self._delete(seg)
                continue
            self._pending_records += seg.pending
            self._pending_bytes += seg.pending_bytes
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

    def _recover_segment(self, first: int, seg_path: Path, hi: int | None) -> _Segment:
        data = seg_path.read_bytes()
        scan = _scan(data, first, hi)
        seg = _Segment(first, seg_path, first, size=len(data), sealed=True)
        for start, stop in scan.holes:
            log.error(
                "spool segment %s: %d damaged bytes at offset %d skipped; the records after "
                "them are kept",
                seg_path,
                stop - start,
                start,
            )
            self._corrupt += stop - start
        seg.holes = list(scan.holes)
        acked = _read_acks(seg.ack_path)
        next_lo = scan.records[-1].seq + 1 if scan.records else first
        torn = scan.end < len(data) and _is_torn(data, scan.end)
        lost = 0
        if scan.holes or scan.end < len(data):
            # Seqs in a segment are consecutive: the missing ones are those lost, unless they
            # were acknowledged already. After the last segment's final record nothing tells
            # how many a damaged tail held: one at least, unless it is just a torn write.
            readable = {r.seq for r in scan.records}
            last = hi if hi is not None else next_lo
            lost = sum(1 for s in range(first, last) if s not in readable and s not in acked)
            if hi is None and scan.end < len(data) and not torn and next_lo not in acked:
                lost += 1
        if scan.end < len(data):
            tail = len(data) - scan.end
            if torn:
                # A crash mid-write: that append never returned, so no caller counts on it.
                log.warning(
                    "spool segment %s: truncating a torn final record (%d bytes)", seg_path, tail
                )
                self._truncated += tail
                try:
                    os.truncate(seg_path, scan.end)
                    seg.size = scan.end
                except OSError as exc:
                    log.warning("cannot truncate %s (%s); its tail is skipped", seg_path, exc)
                    seg.holes.append((scan.end, len(data)))
            else:
                log.error(
                    "spool segment %s: its last %d bytes are damaged and hold no readable "
                    "record; skipped",
                    seg_path,
                    tail,
                )
                self._corrupt += tail
                seg.holes.append((scan.end, len(data)))
        if lost:
            log.error("spool segment %s: %d events are unreadable and lost", seg_path, lost)
            self._lost += lost
        for rec in scan.records:
            if rec.seq in acked:
                seg.acked.add(rec.seq)
            else:
                seg.pending += 1
                seg.pending_bytes += rec.size
        seg.next_seq = next_lo
        return seg

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

        When the backlog would exceed ``max_bytes`` or the disk is full: with ``block``, wait
        up to ``timeout_s`` (``None`` = as long as it takes) for acknowledgements (or the disk)
        to free room; with ``reject``, or when the wait times out, raise
        :class:`SpoolFullError`. Any other I/O error raises :class:`SpoolIOError`. When this
        raises, nothing of the record is left in the spool. ``on_seq`` is called with the
        sequence number before any reader can see the record (to attach a waiter to it).
        """
        key_b = key.encode() if isinstance(key, str) else key
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        waited = False
        with self._lock:
            while True:
                if self._closed:
                    raise SpoolFullError(f"the spool {self.path} is closed", retry_after=1.0)
                # Others may have appended while this thread waited: encode with the seq now.
                seq = self._next_seq
                data = encode_record(seq, topic, key_b, value)
                if len(data) > self.max_bytes:
                    raise SpoolFullError(
                        f"a {len(data)}-byte message can never fit the {self.max_bytes}-byte spool",
                        retry_after=0.0,
                    )
                if self._pending_bytes + len(data) > self.max_bytes:
                    waited = self._wait(self._full_message(), waited, deadline, timeout_s, None)
                    continue
                try:
                    seg = self._write(data)
                except OSError as exc:
                    self._write_errors += 1
                    self._last_error = f"write: {exc}"
                    self._log_io("write", "cannot append to the spool %s (%s)", self.path, exc)
                    if exc.errno == errno.EFBIG:
                        self._rejected += 1
                        raise SpoolFullError(
                            f"a {len(data)}-byte event does not fit in a file of the producer "
                            f"spool {self.path} ({exc.strerror}: the process's or the file "
                            "system's file size limit is smaller); it was not spooled",
                            retry_after=0.0,
                        ) from exc
                    if exc.errno in _DISK_FULL:
                        self._disk_full = True
                        waited = self._wait(
                            self._disk_full_message(exc), waited, deadline, timeout_s, exc
                        )
                        continue
                    raise SpoolIOError(
                        f"cannot write to the producer spool {self.path} ({exc}); the event "
                        "was not spooled"
                    ) from exc
                break
            self._disk_full = False
            self._next_seq = seq + 1
            seg.next_seq = seq + 1
            seg.size += len(data)
            seg.pending += 1
            seg.pending_bytes += len(data)
            self._pending_records += 1
            self._pending_bytes += len(data)
            self._appended += 1
            if on_seq is not None:
                on_seq(seq)
            if seg.size >= self.segment_bytes:
                self._seal_active()
            self._readable.notify()
            return seq

    def _write(self, data: bytes) -> _Segment:
        """Write one whole record at the end of the active segment, or leave it as it was."""
        seg = self._active_segment()
        fd = self._active_fd_or_raise()
        try:
            written = os.write(fd, data)
            if written != len(data):
                _write_rest(fd, data, written)
            if self.fsync == "always":
                os.fsync(fd)
            else:
                self._dirty = True
        except OSError as exc:
            self._roll_back(seg, fd)
            if exc.errno != errno.EFBIG or seg.size == 0:
                raise
            # This file is at its size limit: seal it and write to a new, empty segment (once:
            # on an empty segment EFBIG is raised; the lock is held, so nothing fills it first).
            self._write_errors += 1
            self._last_error = f"write: {exc}"
            log.warning(
                "spool segment %s is at its size limit (%s); starting another", seg.path, exc
            )
            self._seal_active()
            return self._write(data)
        return seg

    def _roll_back(self, seg: _Segment, fd: int) -> None:
        """Cut off whatever part of a failed record reached the file."""
        try:
            os.ftruncate(fd, seg.size)
        except OSError as exc:
            # Nothing reads past seg.size, and no later append lands after the torn bytes:
            # the segment is sealed here, and the next open truncates them as a torn tail.
            log.error("cannot cut a failed write off %s (%s); sealing it", seg.path, exc)
            self._seal_active()

    def _wait(
        self,
        message: str,
        waited: bool,
        deadline: float | None,
        timeout_s: float | None,
        cause: OSError | None,
    ) -> bool:
        """Apply ``full_policy`` once: raise, or wait a while for room. True (waited)."""
        if self.full_policy == "reject":
            self._rejected += 1
            raise SpoolFullError(message, retry_after=1.0) from cause
        if not waited:
            self._blocked += 1
        remaining = None if deadline is None else deadline - time.monotonic()
        if self._closed or (remaining is not None and remaining <= 0):
            self._rejected += 1
            raise SpoolFullError(
                message + f"; waited {timeout_s}s for room", retry_after=1.0
            ) from cause
        if cause is not None:
            # Acknowledgements delete segments and free disk, but so may others: look again.
            remaining = _DISK_RETRY_S if remaining is None else min(remaining, _DISK_RETRY_S)
        self._room.wait(remaining)
        return True

    def has_room(self, size: int) -> bool:
        """True if ``size`` more bytes fit the bound now and the disk was not found full (a
        hint: others may append first)."""
        return not self._disk_full and self._pending_bytes + size <= self.max_bytes

    def _full_message(self) -> str:
        return (
            f"the producer spool {self.path} is full: {self._pending_records} events "
            f"({self._pending_bytes} bytes) wait for Kafka, the bound is {self.max_bytes} bytes "
            "(SPENDSTREAM_PRODUCER__SPOOL_MAX_BYTES)"
        )

    def _disk_full_message(self, exc: OSError) -> str:
        return (
            f"the disk of the producer spool {self.path} is full ({exc.strerror}); the event "
            f"was not spooled; {self._pending_records} events ({self._pending_bytes} bytes) "
            "wait for Kafka"
        )

    def _active_segment(self) -> _Segment:
        if self._segments and not self._segments[-1].sealed:
            return self._segments[-1]
        seq = self._next_seq
        seg = _Segment(seq, self.path / f"{seq:020d}{SEGMENT_SUFFIX}", seq)
        fd = os.open(seg.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, _FILE_MODE)
        try:
            if os.fstat(fd).st_size:
                # Left by a segment whose deletion failed: all acknowledged or unreadable.
                os.ftruncate(fd, 0)
        except OSError:
            os.close(fd)
            raise
        self._active_fd = fd
        self._segments.append(seg)
        self._firsts.append(seq)
        return seg

    def _active_fd_or_raise(self) -> int:
        assert self._active_fd is not None
        return self._active_fd

    def _seal_active(self) -> None:
        if self._active_fd is not None:
            fd, self._active_fd = self._active_fd, None
            try:
                if self._dirty or self.fsync != "never":
                    os.fsync(fd)
            except OSError as exc:
                self._sync_failed("fsync of a full segment", exc)
            finally:
                self._close_fd(fd)
            self._dirty = False
        if self._segments and not self._segments[-1].sealed:
            seg = self._segments[-1]
            seg.sealed = True
            if seg.pending == 0:
                self._drop_segment(seg)

    def sync(self, force: bool = False) -> None:
        """fsync the active segment, if due (``batch``) or forced. Never raises: a failed
        fsync is logged and counted (the records stay readable; only power loss is at risk)."""
        with self._lock:
            now = time.monotonic()
            if not force and now - self._last_sync < self.fsync_interval_s:
                return
            self._last_sync = now
            if self._dirty and self._active_fd is not None and self.fsync != "never":
                try:
                    os.fsync(self._active_fd)
                except OSError as exc:
                    self._sync_failed("fsync", exc)
                    return  # still dirty: tried again next time
            self._dirty = False

    # -- reading and acknowledging ----------------------------------------------------------

    def read(self, timeout_s: float = 0.0) -> SpoolRecord | None:
        """The next record to send, in append order; ``None`` if none arrives in ``timeout_s``.

        Records are read back from the segment files (the page cache, in practice), so memory
        stays bounded whatever the backlog. Acknowledged records are skipped (after
        :meth:`rewind` some may be), and so are records damaged on disk (counted in
        :attr:`SpoolStats.lost_records`). Never raises on I/O: after a failed read it logs,
        returns ``None`` and waits a little longer before each retry (the same record is read
        again, nothing is skipped).
        """
        with self._lock:
            now = time.monotonic()
            if now < self._read_retry_at:
                self._last_read = now
                if timeout_s > 0 and not self._closed:
                    self._readable.wait(min(timeout_s, self._read_retry_at - now))
                return None
            try:
                rec = self._next_unread()
                if rec is None and timeout_s > 0 and not self._closed:
                    self._readable.wait(timeout_s)
                    rec = self._next_unread()
            except OSError as exc:
                self._read_failed(exc)
                return None
            if self._read_backoff:
                log.info("spool %s: reading again (%d failed reads)", self.path, self._read_errors)
                self._read_backoff = 0.0
            return rec

    def _read_failed(self, exc: OSError) -> None:
        self._read_errors += 1
        self._last_error = f"read: {exc}"
        low, high = _READ_BACKOFF_S
        self._read_backoff = min(high, max(low, self._read_backoff * 2))
        self._read_retry_at = time.monotonic() + self._read_backoff
        self._log_io(
            "read",
            "cannot read the spool %s (%s); retrying in %.2fs",
            self.path,
            exc,
            self._read_backoff,
        )

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
        # Here, not in read(): once per chunk or idle poll rather than once per record.
        self._last_read = time.monotonic()
        self._reader = threading.current_thread()
        while True:
            seg = self._reader_segment()
            if seg is None:
                return False
            limit = self._skip_holes(seg)
            if self._read_offset < limit:
                records, used = self._read_run(seg, limit)
                if not records:
                    self._damaged(seg)  # raises if it finds no damage at the cursor
                    continue
                self._read_offset += used
                self._read_buf = records
                return True
            if not seg.sealed:
                return False  # the active segment: wait for appends
            self._read_first = seg.next_seq  # move to the segment after it
            self._read_offset = 0

    def _skip_holes(self, seg: _Segment) -> int:
        """Move the cursor past damaged bytes; return where the readable run at it ends."""
        for start, stop in seg.holes:
            if stop <= self._read_offset:
                continue
            if start <= self._read_offset:
                self._read_offset = stop
                continue
            return start
        return seg.size

    def _read_run(self, seg: _Segment, limit: int) -> tuple[list[SpoolRecord], int]:
        fd = os.open(seg.path, os.O_RDONLY)
        try:
            chunk = os.pread(fd, min(_READ_CHUNK, limit - self._read_offset), self._read_offset)
            records, used = _parse(chunk, seg.first_seq, seg.next_seq)
            if not records and len(chunk) >= _HEADER.size:
                # One record larger than the chunk: read exactly it.
                (length,) = struct.unpack_from("<I", chunk)
                need = _HEADER.size + length
                if len(chunk) < need <= limit - self._read_offset:
                    chunk = os.pread(fd, need, self._read_offset)
                    records, used = _parse(chunk, seg.first_seq, seg.next_seq)
        finally:
            os.close(fd)
        return records, used

    def _damaged(self, seg: _Segment) -> None:
        """Re-read a segment in which the cursor found bytes that are not a record.

        Records the damaged ranges as holes, so reading skips them and goes on with the
        records after them, and stops counting the records lost in them as pending.
        """
        with open(seg.path, "rb") as f:
            data = f.read(seg.size)
        scan = _scan(data, seg.first_seq, seg.next_seq)
        holes = list(scan.holes)
        if scan.end < seg.size:
            holes.append((scan.end, seg.size))
        if not any(start <= self._read_offset < stop for start, stop in holes):
            raise OSError(
                errno.EIO,
                f"spool segment {seg.path} changed while being read at {self._read_offset}",
            )
        readable = {r.seq for r in scan.records}
        pending = [r for r in scan.records if r.seq not in seg.acked]
        gone = seg.pending - len(pending)
        self._pending_records -= gone
        self._pending_bytes -= seg.pending_bytes - sum(r.size for r in pending)
        seg.pending, seg.pending_bytes = len(pending), sum(r.size for r in pending)
        seg.lost = set(range(seg.first_seq, seg.next_seq)) - readable - seg.acked
        new_bytes = sum(b - a for a, b in holes) - sum(b - a for a, b in seg.holes)
        seg.holes = holes
        self._lost += gone
        self._corrupt += new_bytes
        self._last_error = f"damaged spool segment {seg.path}"
        log.error(
            "spool segment %s: %d bytes are damaged; %d unacknowledged events in them are "
            "lost, the records around them are still sent",
            seg.path,
            new_bytes,
            gone,
        )
        if gone:
            self._room.notify_all()
        if seg.pending == 0 and seg.sealed:
            self._drop_segment(seg)

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
        return seg is None or seq in seg.acked or seq in seg.lost

    def _segment_of(self, seq: int) -> _Segment | None:
        i = bisect.bisect_right(self._firsts, seq) - 1
        if i < 0:
            return None
        seg = self._segments[i]
        return seg if seq < seg.next_seq else None

    def ack(self, seq: int, size: int) -> None:
        """Record that the broker acknowledged record ``seq`` (``size`` bytes on disk).

        Never raises on I/O: an acknowledgement the disk refuses is logged and counted (the
        record is sent again after a restart, a duplicate that is dropped downstream).
        """
        with self._lock:
            seg = self._segment_of(seq)
            if seg is None or seq in seg.acked or seq in seg.lost:
                return  # already acknowledged (a replayed record delivered twice) or lost
            seg.acked.add(seq)
            seg.pending -= 1
            seg.pending_bytes -= size
            self._pending_records -= 1
            self._pending_bytes -= size
            self._acknowledged += 1
            if seg.pending == 0 and seg.sealed:
                self._drop_segment(seg)
            else:
                self._write_ack(seg, seq)
            self._room.notify_all()

    def _write_ack(self, seg: _Segment, seq: int) -> None:
        if seg.ack_broken:
            return
        try:
            if seg.ack_fd is None:
                fd = os.open(seg.ack_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, _FILE_MODE)
                seg.ack_fd = fd
                size = os.fstat(fd).st_size
                seg.ack_size = size - size % _SEQ.size
                if seg.ack_size != size:
                    os.ftruncate(fd, seg.ack_size)  # a torn last ack would misalign the rest
            # Not fsynced: a lost ack only means a harmless duplicate after a restart.
            n = os.write(seg.ack_fd, _SEQ.pack(seq))
            if n != _SEQ.size:
                raise OSError(errno.ENOSPC, f"short write of an acknowledgement ({n} bytes)")
            seg.ack_size += n
        except OSError as exc:
            self._sync_failed("recording an acknowledgement", exc)
            if seg.ack_fd is not None:
                try:
                    os.ftruncate(seg.ack_fd, seg.ack_size)
                except OSError:
                    # Later acks would land after a torn one and be misread: stop writing them.
                    seg.ack_broken = True
                    self._close_fd(seg.ack_fd)
                    seg.ack_fd = None

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
            self._close_fd(seg.ack_fd)
            seg.ack_fd = None
        try:
            seg.path.unlink(missing_ok=True)
            seg.ack_path.unlink(missing_ok=True)
        except OSError as exc:
            # Its records are all acknowledged: if it survives, the next open replays none of
            # them (the .ack file says so) or, without the .ack file, sends duplicates.
            self._sync_failed(f"deleting {seg.path}", exc)

    # -- I/O failures -----------------------------------------------------------------------

    def _sync_failed(self, what: str, exc: OSError) -> None:
        self._sync_errors += 1
        self._last_error = f"{what}: {exc}"
        self._log_io("sync", "spool %s: %s failed (%s)", self.path, what, exc)

    def _log_io(self, kind: str, msg: str, *args: object) -> None:
        """Log an I/O failure, at most once a minute per kind (they come in bursts)."""
        now = time.monotonic()
        if now - self._last_logged.get(kind, -_LOG_EVERY_S) >= _LOG_EVERY_S:
            self._last_logged[kind] = now
            log.error(msg, *args)

    def _close_fd(self, fd: int) -> None:
        try:
            os.close(fd)
        except OSError as exc:
            self._sync_failed("close", exc)

    # -- state ------------------------------------------------------------------------------

    def stats(self) -> SpoolStats:
        """A consistent snapshot of depth, counters and I/O health."""
        with self._lock:
            idle = None if self._last_read is None else time.monotonic() - self._last_read
            alive = None if self._reader is None else self._reader.is_alive()
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
                write_errors=self._write_errors,
                read_errors=self._read_errors,
                sync_errors=self._sync_errors,
                lost_records=self._lost,
                corrupt_bytes=self._corrupt,
                drain_alive=alive,
                drain_idle_s=idle,
                last_error=self._last_error,
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
        try:
            with self._lock:
                if self._closed:
                    return
                self._closed = True
                if self._active_fd is not None:
                    fd, self._active_fd = self._active_fd, None
                    try:
                        if self.fsync != "never":
                            os.fsync(fd)
                    except OSError as exc:
                        self._sync_failed("fsync at close", exc)
                    finally:
                        self._close_fd(fd)
                for seg in list(self._segments):
                    if seg.ack_fd is not None:
                        self._close_fd(seg.ack_fd)
                        seg.ack_fd = None
                    if seg.pending == 0:
                        self._delete(seg)
                self._room.notify_all()
                self._readable.notify_all()
        finally:
            if not self._lock_released:
                self._release_lock()

    def _release_lock(self) -> None:
        self._lock_released = True
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        finally:
            os.close(self._lock_fd)

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed


def _read_acks(path: Path) -> set[int]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return set()
    whole = len(data) - len(data) % _SEQ.size  # a torn last ack is just not an ack
    return {s for (s,) in _SEQ.iter_unpack(data[:whole])}
