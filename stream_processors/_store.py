"""The worker's durable state: one RocksDB per input partition, every table in it, and restore.

Why (docs/DESIGN.md, "State"): with faust's memory store every restart rebuilt the whole state
(a day of dedupe ids, windows, caps) from the changelogs at about 5,200 events of state per
second, and the worker metered nothing meanwhile. Here a partition's state lives in
``<state_dir>/store/<app_id>/p<N>`` (rocksdict). A worker restarted on the same machine reopens
it and reads only the changelog written after the offsets stored with the data; a worker on a
new machine restores from the changelog in batches (one ``WriteBatch`` per few thousand
records, no per-record Python call into faust).

The changelog stays the source of truth and keeps faust's format (keys JSON-encoded, values
raw, topic ``<app_id>-<table>-changelog``), so state written by earlier versions restores.

Local writes follow the changelog, never lead it: a change is kept in an in-memory overlay
until its changelog message is acknowledged (:meth:`DurableState.apply_acked`), then written
to RocksDB in one batch with the changelog offset it reaches. The offset is counted, not
asked: while a worker owns a partition it is the only writer of that partition's changelogs,
and each acknowledged message of an idempotent, non-transactional producer takes exactly one
offset. Replaying a changelog from an offset at or below the true one is harmless (last write
wins per key), so a crash between the acknowledgement and the local write costs a few records
of replay, never a wrong state.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from rocksdict import BlockBasedOptions, Cache, Options, Rdict, WriteBatch, WriteBufferManager

from spendstream.kafka_fetch import fetch_ready
from stream_processors._output import OutputProducer
from stream_processors._state import StateNotReady, seen_hour

log = logging.getLogger(__name__)

TABLES: dict[str, bytes] = {"seen": b"s", "windows": b"w", "marks": b"m", "caps": b"c"}
"""Table name -> its key prefix in a partition's database."""

_HOUR_INDEX = b"T"  # local only: T<hour, 10 digits><JSON key> of each seen id, for eviction
_OFFSET = b"O"  # O<table prefix> -> the next changelog offset the table's data reflects
_FORMAT_KEY = b"V"
_FORMAT = b"1"
_MISSING = object()
_RESTORE_BATCH = 20_000


def _json_key(key: str) -> bytes:
    """``key`` as faust's JSON key serializer writes it, in a bytes object of its own size.

    orjson hands back every result in a 4 KiB buffer whatever its length: kept as is, each key
    held until its change is stored would cost 4 KiB (measured with tracemalloc).
    """
    return memoryview(orjson.dumps(key)).tobytes()


def _scan(db: Rdict, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Keys and values of ``db`` that start with ``prefix``, in key order."""
    it: Any = db.items(from_key=prefix)
    for k, v in it:
        if not k.startswith(prefix):
            return
        yield k, v


def changelog_topic(app_id: str, table: str) -> str:
    """The changelog topic of ``table`` (faust's name for it, so older changelogs restore)."""
    return f"{app_id}-{table}-changelog"


def _options(cache: Cache, memtables: WriteBufferManager) -> Options:
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    # Bounded memory whatever the state size: every partition's blocks, indexes, filters and
    # memtables are charged to one cache (processor.state_memory_mib).
    table = BlockBasedOptions()
    table.set_block_cache(cache)
    table.set_cache_index_and_filter_blocks(True)
    table.set_pin_l0_filter_and_index_blocks_in_cache(True)
    # Most lookups are misses (a new event id): a bloom filter answers them without a block read.
    table.set_bloom_filter(10, False)
    opts.set_block_based_table_factory(table)
    opts.set_write_buffer_manager(memtables)
    opts.set_write_buffer_size(8 << 20)
    opts.set_max_write_buffer_number(2)
    opts.set_keep_log_file_num(2)
    opts.set_max_open_files(256)
    return opts


class LocalStore:
    """The per-partition RocksDB databases of one worker process.

    ``auto_open`` (``agent.test_context()``, benchmarks without a broker) opens a partition on
    first use; a worker opens them on assignment, after restoring them.
    """

    def __init__(self, root: Path, *, auto_open: bool = False, memory_mib: int = 64) -> None:
        self.root = root
        self.auto_open = auto_open
        self._cache = Cache(memory_mib << 20)
        self._memtables = WriteBufferManager.new_write_buffer_manager_with_cache(
            (memory_mib << 20) // 2, False, self._cache
        )
        self._dbs: dict[int, Rdict] = {}
        self.next_offset: dict[tuple[str, int], int] = {}
        """(table, partition) -> the changelog offset after the last acknowledged write."""

    def path(self, partition: int) -> Path:
        """The folder of ``partition``'s database."""
        return self.root / f"p{partition}"

    def db(self, partition: int) -> Rdict:
        """The open database of ``partition``."""
        db = self._dbs.get(partition)
        if db is None:
            if not self.auto_open:
                raise StateNotReady(f"the state of partition {partition} is not open")
            db = self.open(partition)
        return db

    def is_open(self, partition: int) -> bool:
        """Whether ``partition``'s database is open in this process."""
        return partition in self._dbs

    def partitions(self) -> list[int]:
        """The open partitions."""
        return sorted(self._dbs)

    def open(self, partition: int, *, lock_wait_s: float = 10.0) -> Rdict:
        """Open (or create) ``partition``'s database; wait for another process to let go of it.

        Two workers on one machine share the folder: a partition moving between them reopens
        the state its last owner left. If its last owner still holds it after ``lock_wait_s``
        (a process paused or hung, which the group has already replaced), a private folder of
        this process is used instead and restored from the changelog. A format this code does
        not know is wiped (the changelog restores it).
        """
        if partition in self._dbs:
            return self._dbs[partition]
        path = self.path(partition)
        path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + lock_wait_s
        while True:
            try:
                db = Rdict(str(path), _options(self._cache, self._memtables))
                break
            except Exception as exc:
                if "lock" not in str(exc).lower():
                    raise
                if time.monotonic() > deadline:
                    private = path.with_name(f"{path.name}.pid{os.getpid()}")
                    log.warning(
                        "the state folder of partition %d is held by another process; "
                        "restoring into %s instead",
                        partition,
                        private,
                    )
                    shutil.rmtree(private, ignore_errors=True)
                    path = private
                    deadline = float("inf")
                    continue
                time.sleep(0.2)
        fmt = db.get(_FORMAT_KEY)
        if fmt != _FORMAT:
            if fmt is not None:
                log.warning("state of partition %d has format %r: rebuilding it", partition, fmt)
                db.close()
                Rdict.destroy(str(path))
                db = Rdict(str(path), _options(self._cache, self._memtables))
            db.put(_FORMAT_KEY, _FORMAT)
        self._dbs[partition] = db
        return db

    def stored_offset(self, table: str, partition: int) -> int | None:
        """The changelog offset the stored data of ``table`` reflects (None: nothing stored)."""
        raw = self.db(partition).get(_OFFSET + TABLES[table])
        return None if raw is None else int(raw)

    def close(self, partition: int) -> None:
        """Close ``partition``'s database (its files stay for a later owner on this machine)."""
        db = self._dbs.pop(partition, None)
        if db is not None:
            db.close()
        for key in [k for k in self.next_offset if k[1] == partition]:
            del self.next_offset[key]

    def close_all(self) -> None:
        """Close every database."""
        for partition in list(self._dbs):
            self.close(partition)

    def wipe(self) -> None:
        """Close and delete every partition's database (a fresh state directory)."""
        self.close_all()
        shutil.rmtree(self.root, ignore_errors=True)


class DurableState:
    """:class:`~stream_processors.PartitionedState` of one table over a :class:`LocalStore`.

    Reads see the overlay of changes not yet acknowledged, then RocksDB. The changelog protocol
    is the one :class:`~stream_processors._checkpoint.Checkpointer` drives: changes are queued
    (:meth:`put`, :meth:`delete`), sent (:meth:`flush_changelog`), and written locally once the
    producer acknowledged them (:meth:`apply_acked`). ``hour_index`` (the seen table) keeps a
    local index of ids by event hour for :meth:`expire`.
    """

    def __init__(
        self, store: LocalStore, table: str, changelog: str, *, hour_index: bool = False
    ) -> None:
        self.store = store
        self.table = table
        self.changelog = changelog
        self._prefix = TABLES[table]
        self._hour_index = hour_index
        self._dirty: dict[int, dict[bytes, bytes | None]] = {}
        # (partition, JSON key, value or None for a tombstone)
        self._pending: list[tuple[int, bytes, bytes | None]] = []
        self._held: list[tuple[int, bytes, bytes | None]] = []
        self._sent: list[tuple[int, bytes, bytes | None]] = []
        self._undo: list[tuple[int, bytes, object]] = []
        self._pending_at_savepoint = 0

    # -- reads ---------------------------------------------------------------------------------
    def get(self, key: str, partition: int | None = None) -> bytes | None:
        """The value, or ``None``; without ``partition`` every open partition is looked in."""
        k = orjson.dumps(key)
        if partition is not None:
            return self._get(partition, k)
        for p in self._partitions():
            value = self._get(p, k)
            if value is not None:
                return value
        return None

    def _partitions(self) -> list[int]:
        """The open partitions and those with changes (opened on use under ``auto_open``)."""
        open_ = self.store.partitions()
        return sorted({*open_, *self._dirty}) if self.store.auto_open else open_

    def _get(self, partition: int, k: bytes) -> bytes | None:
        dirty = self._dirty.get(partition)
        if dirty is not None:
            value = dirty.get(k, _MISSING)
            if value is not _MISSING:
                return value  # type: ignore[return-value]
        raw: Any = self.store.db(partition).get(self._prefix + k)
        return raw  # type: ignore[no-any-return]

    def items(self) -> Iterator[tuple[str, bytes]]:
        """Every key and value of the open partitions."""
        out: list[tuple[str, bytes]] = []
        prefix, n = self._prefix, len(self._prefix)
        for p in self._partitions():
            dirty = self._dirty.get(p, {})
            for k, v in _scan(self.store.db(p), prefix):
                if k[n:] not in dirty:
                    out.append((orjson.loads(k[n:]), v))
            out.extend((orjson.loads(k), v) for k, v in dirty.items() if v is not None)
        return iter(out)

    def __len__(self) -> int:
        return sum(1 for _ in self.items())

    # -- writes --------------------------------------------------------------------------------
    def put(self, partition: int, key: str, value: bytes) -> None:
        """Set ``key``; its changelog message goes to ``partition``."""
        self._change(partition, _json_key(key), value)

    def delete(self, partition: int, key: str) -> None:
        """Remove ``key`` (a tombstone in ``partition`` of the changelog)."""
        self._change(partition, _json_key(key), None)

    def _change(self, partition: int, k: bytes, value: bytes | None) -> None:
        dirty = self._dirty.get(partition)
        if dirty is None:
            dirty = self._dirty[partition] = {}
        self._undo.append((partition, k, dirty.get(k, _MISSING)))
        dirty[k] = value
        self._pending.append((partition, k, value))

    def expire(self, partition: int, before_hour: int) -> int:
        """Delete the ids whose event hour is before ``before_hour`` (``hour_index`` only).

        Reads the local index; ids whose change is not acknowledged yet are found by a later
        call. Returns how many ids were deleted.
        """
        db = self.store.db(partition)
        bound = _HOUR_INDEX + b"%010d" % max(before_hour, 0)
        n = 0
        stale: list[bytes] = []
        dirty = self._dirty.get(partition, {})
        for ikey, _ in _scan(db, _HOUR_INDEX):
            if ikey >= bound:
                break
            k = ikey[11:]
            hour = int(ikey[1:11])
            if k in dirty:
                continue  # changed since: its own change decides
            value: Any = db.get(self._prefix + k)
            if value is None or _hour_or_none(value) != hour:
                stale.append(ikey)  # the id was deleted or stored again since
                continue
            self._change(partition, k, None)
            n += 1
        if stale:
            wb = WriteBatch(raw_mode=True)
            for ikey in stale:
                wb.delete(ikey)
            db.write(wb)
        return n

    # -- undo (stream_processors._isolation) ------------------------------------------------------
    def savepoint(self) -> None:
        """Start recording changes for :meth:`rollback`."""
        self._undo.clear()
        self._pending_at_savepoint = len(self._pending)

    def rollback(self) -> None:
        """Undo the changes since the last :meth:`savepoint`, their changelog writes too."""
        for partition, k, old in reversed(self._undo):
            dirty = self._dirty[partition]
            if old is _MISSING:
                dirty.pop(k, None)
            else:
                dirty[k] = old  # type: ignore[assignment]
        self._undo.clear()
        del self._pending[self._pending_at_savepoint :]

    # -- the changelog protocol ----------------------------------------------------------------
    def hold(self) -> None:
        """Keep the pending changes for the next ``flush_changelog(previous=True)``."""
        self._held.extend(self._pending)
        self._pending = []

    def flush_changelog(self, out: OutputProducer | None, *, previous: bool = False) -> int:
        """Send the pending (with ``previous``: the held) changes to the changelog.

        Without a producer (``agent.test_context()``) there is no changelog: the changes are
        written locally at once.
        """
        if previous:
            pending, self._held = self._held, []
        else:
            pending, self._pending = self._pending, []
        if not pending:
            return 0
        if out is None:
            self._sent.extend(pending)
            self.apply_acked(len(self._sent))
            return len(pending)
        topic = self.changelog
        for partition, k, value in pending:
            out.produce(topic, k, value, partition)
        self._sent.extend(pending)
        return len(pending)

    def sent_mark(self) -> int:
        """How many changes are sent; take it before a flush, pass it to :meth:`apply_acked`."""
        return len(self._sent)

    def apply_acked(self, upto: int) -> int:
        """Write the first ``upto`` sent changes (acknowledged by a flush) to RocksDB."""
        if upto <= 0:
            return 0
        applied, self._sent = self._sent[:upto], self._sent[upto:]
        by_partition: dict[int, list[tuple[bytes, bytes | None]]] = {}
        for partition, k, value in applied:
            by_partition.setdefault(partition, []).append((k, value))
        prefix, offsets = self._prefix, self.store.next_offset
        for partition, changes in by_partition.items():
            db = self.store.db(partition)
            wb = WriteBatch(raw_mode=True)
            for k, value in changes:
                if value is None:
                    wb.delete(prefix + k)
                else:
                    wb.put(prefix + k, value)
                    if self._hour_index and (hour := _hour_or_none(value)) is not None:
                        wb.put(_HOUR_INDEX + b"%010d" % hour + k, b"")
            slot = (self.table, partition)
            if slot in offsets:
                offsets[slot] += len(changes)
                wb.put(_OFFSET + prefix, b"%d" % offsets[slot])
            db.write(wb)
            dirty = self._dirty.get(partition)
            if dirty is not None:
                for k, value in changes:
                    if dirty.get(k, _MISSING) == value:
                        del dirty[k]
        return len(applied)

    def forget(self, partitions: set[int]) -> None:
        """Drop the overlay of ``partitions`` (revoked; their changes were acknowledged)."""
        for p in partitions:
            self._dirty.pop(p, None)
        self._sent = [c for c in self._sent if c[0] not in partitions]


# -- restore -----------------------------------------------------------------------------------


@dataclass
class RestoreProgress:
    """What a restore has left, for ``/health``, the metrics and the logs."""

    left: dict[str, int] = field(default_factory=dict)
    """Table -> changelog records still to read."""
    restored: int = 0
    """Changelog records read since the restore started."""
    started: float = 0.0
    finished: float | None = None
    partitions: list[int] = field(default_factory=list)

    @property
    def active(self) -> bool:
        """Whether a restore is running."""
        return self.finished is None and bool(self.partitions)

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able view."""
        elapsed = (self.finished or time.monotonic()) - self.started if self.started else 0.0
        return {
            "recovering": self.active,
            "partitions": list(self.partitions),
            "records_left": dict(self.left),
            "records_restored": self.restored,
            "seconds": round(elapsed, 3),
        }


def restore_partitions(
    store: LocalStore,
    consumer_config: Mapping[str, Any],
    changelogs: Mapping[str, str],
    partitions: list[int],
    progress: RestoreProgress,
    *,
    stop: threading.Event | None = None,
    timeout_s: float = 600.0,
) -> None:
    """Open ``partitions`` and bring each table up to the end of its changelog (blocking).

    ``changelogs`` maps table -> changelog topic. A stored offset outside the changelog's
    range (the topic was recreated, or the folder belongs to another cluster) rebuilds the
    table from the changelog's start.
    """
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

    progress.partitions = sorted(partitions)
    progress.started = time.monotonic()
    progress.finished = None
    progress.restored = 0
    consumer = Consumer(
        {
            **consumer_config,
            "group.id": "spendstream-restore",  # assign() only: nothing is committed
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "fetch.max.bytes": 64 * 1024 * 1024,
            "max.partition.fetch.bytes": 16 * 1024 * 1024,
        }
    )
    try:
        plan: list[tuple[str, int, int, int]] = []  # table, partition, from, to
        for p in partitions:
            store.open(p)
            for table, topic in changelogs.items():
                low, high = _watermarks(consumer, TopicPartition(topic, p))
                stored = store.stored_offset(table, p)
                start = low if stored is None else stored
                if stored is not None and not low <= stored <= high:
                    log.warning(
                        "state of %s[%d] is at changelog offset %d, outside %d..%d: rebuilding",
                        table,
                        p,
                        stored,
                        low,
                        high,
                    )
                    _wipe_table(store, table, p)
                    start = low
                if start < high:
                    plan.append((table, p, start, high))
                else:
                    store.db(p).put(_OFFSET + TABLES[table], b"%d" % high)
                store.next_offset[(table, p)] = high
        for table in changelogs:
            progress.left[table] = sum(b - a for t, _, a, b in plan if t == table)
        if plan:
            consumer.assign(
                [
                    TopicPartition(changelogs[t], p, a if a > 0 else OFFSET_BEGINNING)
                    for t, p, a, _ in plan
                ]
            )
            ends = {(changelogs[t], p): (t, p, b) for t, p, _, b in plan}
            open_ = dict(ends)
            deadline = time.monotonic() + timeout_s
            next_log = time.monotonic() + 2.0
            while open_:
                if time.monotonic() >= next_log:
                    next_log = time.monotonic() + 2.0
                    log.info(
                        "restoring state: %d changelog records read, left per table: %s",
                        progress.restored,
                        progress.left,
                    )
                if stop is not None and stop.is_set():
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"restore did not finish in {timeout_s:.0f} s")
                msgs: list[Any] = fetch_ready(consumer, 0.5, 50_000)
                batches: dict[tuple[str, int], list[Any]] = {}  # where -> [batch, n, last]
                for m in msgs:
                    err = m.error()
                    where = (m.topic(), m.partition())
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            if m.offset() >= ends[where][2]:
                                open_.pop(where, None)
                            continue
                        raise RuntimeError(f"restoring {where}: {err}")
                    entry = batches.get(where)
                    if entry is None:
                        entry = batches[where] = [WriteBatch(raw_mode=True), 0, 0]
                    wb = entry[0]
                    table = ends[where][0]
                    prefix, k, v = TABLES[table], m.key(), m.value()
                    if v is None:
                        wb.delete(prefix + k)
                    else:
                        wb.put(prefix + k, v)
                        if table == "seen":
                            hour = _hour_or_none(v)
                            if hour is not None:
                                wb.put(_HOUR_INDEX + b"%010d" % hour + k, b"")
                    entry[1] += 1
                    entry[2] = offset = m.offset()
                    if offset >= ends[where][2] - 1:
                        open_.pop(where, None)
                for where, (wb, n, last) in batches.items():
                    table, p, _ = ends[where]
                    wb.put(_OFFSET + TABLES[table], b"%d" % (last + 1))
                    store.db(p).write(wb)
                    progress.left[table] = max(progress.left[table] - n, 0)
                    progress.restored += n
            for t, p, _, b in plan:
                store.db(p).put(_OFFSET + TABLES[t], b"%d" % b)
        progress.left = {t: 0 for t in changelogs}
    finally:
        consumer.close()
        progress.finished = time.monotonic()


def _watermarks(consumer: Any, tp: Any, timeout_s: float = 60.0) -> tuple[int, int]:
    """(low, high) of ``tp``; retried while the partition has no leader yet (a new topic)."""
    from confluent_kafka import KafkaException

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            low, high = consumer.get_watermark_offsets(tp, timeout=10.0, cached=False)
            return int(low), int(high)
        except KafkaException as exc:
            if not exc.args[0].retriable() and "LEADER" not in exc.args[0].name():
                raise
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _hour_or_none(value: bytes) -> int | None:
    try:
        return seen_hour(value)
    except ValueError:
        return None  # not a seen value this code can read: never evicted by hour


def _wipe_table(store: LocalStore, table: str, partition: int) -> None:
    db = store.db(partition)
    prefix = TABLES[table]
    db.delete_range(prefix, bytes([prefix[0] + 1]))
    if table == "seen":
        db.delete_range(_HOUR_INDEX, bytes([_HOUR_INDEX[0] + 1]))
    db.delete(_OFFSET + prefix)


def changelog_topics(app_id: str) -> dict[str, str]:
    """Table -> changelog topic for the worker ``app_id``."""
    return {t: changelog_topic(app_id, t) for t in TABLES}


StoreFactory = Callable[[Path], LocalStore]


def ensure_changelogs(
    admin_config: Mapping[str, Any], topics: list[str], partitions: int, replication: int
) -> None:
    """Create the compacted changelog topics that do not exist yet (faust used to)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    admin = AdminClient(dict(admin_config))
    existing = set(admin.list_topics(timeout=30.0).topics)
    missing = [t for t in topics if t not in existing]
    if not missing:
        return
    futures = admin.create_topics(
        [
            NewTopic(t, partitions, replication, config={"cleanup.policy": "compact"})
            for t in missing
        ],
        operation_timeout=30.0,
        request_timeout=30.0,
    )
    for fut in futures.values():
        try:
            fut.result(timeout=30.0)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        md = admin.list_topics(timeout=10.0).topics
        if all(t in md and len(md[t].partitions) == partitions for t in missing):
            return
        time.sleep(0.1)


class Recovery:
    """Opens and restores the partitions a worker is assigned; closes the revoked ones.

    Restores run in a thread; the worker processes nothing until :meth:`wait` returns (a
    batch must never read a partition's state half restored). Progress is in
    :attr:`progress` for ``/health``, the metrics and the logs.
    """

    def __init__(
        self,
        store: LocalStore,
        states: list[DurableState],
        consumer_config: Mapping[str, Any],
        changelogs: Mapping[str, str],
        *,
        partitions: int,
        replication: int,
    ) -> None:
        self.store = store
        self.states = states
        self._config = dict(consumer_config)
        self._changelogs = dict(changelogs)
        self._partitions = partitions
        self._replication = replication
        self.progress = RestoreProgress()
        self._task: Any = None
        self._stop = threading.Event()
        self._topics_ready = False

    @property
    def restoring(self) -> bool:
        """Whether a restore is running (the worker processes nothing meanwhile)."""
        return self._task is not None and not self._task.done()

    def assign(self, partitions: set[int]) -> None:
        """Start restoring the assigned ``partitions`` that are not open yet."""
        import asyncio

        todo = sorted(p for p in partitions if not self.store.is_open(p))
        if not todo:
            return
        previous = self._task
        self._stop = threading.Event()
        stop = self._stop

        async def run() -> None:
            if previous is not None and not previous.done():
                await previous
            log.info("restoring the state of partitions %s", todo)
            await asyncio.to_thread(self._restore, todo, stop)
            snap = self.progress.snapshot()
            log.info(
                "state of partitions %s restored: %d changelog records in %.2f s",
                todo,
                snap["records_restored"],
                snap["seconds"],
            )

        self._task = asyncio.ensure_future(run())

    def _restore(self, todo: list[int], stop: threading.Event) -> None:
        if not self._topics_ready:
            ensure_changelogs(
                self._config,
                list(self._changelogs.values()),
                self._partitions,
                self._replication,
            )
            self._topics_ready = True
        restore_partitions(
            self.store, self._config, self._changelogs, todo, self.progress, stop=stop
        )

    async def revoke(self, partitions: set[int]) -> None:
        """Close the revoked ``partitions`` (their state was made durable before)."""
        if self._task is not None and not self._task.done():
            self._stop.set()
            try:
                await self._task
            except Exception:
                log.warning("a restore stopped by a rebalance failed", exc_info=True)
        for state in self.states:
            state.forget(partitions)
        for p in partitions:
            self.store.close(p)

    async def wait(self) -> None:
        """Return once no restore is running; raise what a failed restore raised."""
        task = self._task
        if task is not None:
            await task  # a failure propagates: the worker cannot go on without its state
