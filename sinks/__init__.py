"""ClickHouse sinks: the storage interface, its two backends, and the batching Kafka sink."""

from sinks._store import Columns, QueryResult, Store, load_migrations, open_store

__all__ = ["Columns", "QueryResult", "Store", "load_migrations", "open_store"]
