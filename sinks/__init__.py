"""ClickHouse sinks: the storage interface, its backends, and the batching Kafka sink.

``open_store(settings)`` picks the backend (a server when ``SPENDSTREAM_CLICKHOUSE__URL`` is
set, else embedded chDB owned by this process or, read-only, asked of its owner);
:class:`Sink` consumes our topics into it.
"""

from sinks._buffer import PRICED_EVENTS, SINK_TABLES, Batch, Drained, SinkBuffer, TableSpec, warm_up
from sinks._chdb import ChdbStore, OwnerInfo, RemoteChdbStore, read_owner
from sinks._server import ServerStore
from sinks._sink import Sink, SinkCounters, sink_topics
from sinks._store import (
    Columns,
    QueryResult,
    Store,
    check_read_only,
    load_migrations,
    open_store,
)

__all__ = [
    "PRICED_EVENTS",
    "SINK_TABLES",
    "Batch",
    "ChdbStore",
    "Columns",
    "Drained",
    "OwnerInfo",
    "QueryResult",
    "RemoteChdbStore",
    "ServerStore",
    "Sink",
    "SinkBuffer",
    "SinkCounters",
    "Store",
    "TableSpec",
    "check_read_only",
    "load_migrations",
    "open_store",
    "read_owner",
    "sink_topics",
    "warm_up",
]
