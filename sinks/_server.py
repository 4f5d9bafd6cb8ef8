"""A ClickHouse server as a :class:`~sinks.Store`, over clickhouse-connect (HTTP).

Inserts are columnar (Arrow) with ``insert_deduplication_token``; queries bind ``{name:Type}``
placeholders server-side. A user's statement runs with ``readonly=1`` per query. Third-party
errors become :class:`~spendstream.errors.StoreError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

from sinks._store import (
    READONLY_SETTINGS,
    Columns,
    Parameters,
    QueryResult,
    TableFunctions,
    apply_migrations,
    params_as_text,
    to_arrow_table,
    vet_read_only,
)
from spendstream.errors import StoreError
from spendstream.settings import ClickHouseSettings


class ServerStore:
    """ClickHouse server store (production, clusters, Docker)."""

    def __init__(self, settings: ClickHouseSettings) -> None:
        import clickhouse_connect

        if settings.url is None:
            raise StoreError("ServerStore needs SPENDSTREAM_CLICKHOUSE__URL")
        url = urlparse(settings.url)
        self.database = settings.database
        self._ttl_days = settings.raw_ttl_days
        self._types: dict[str, dict[str, str]] = {}
        self._table_functions: TableFunctions | None = None
        try:
            self._client: Any = clickhouse_connect.get_client(
                host=url.hostname or "localhost",
                port=url.port or (8443 if url.scheme == "https" else 8123),
                secure=url.scheme == "https",
                username=settings.username,
                password=settings.password.get_secret_value(),
            )
        except Exception as exc:
            raise StoreError(f"cannot reach ClickHouse at {settings.url}: {exc}") from exc

    def migrate(self) -> list[str]:
        """Apply pending migrations (see :func:`sinks._store.apply_migrations`)."""
        applied = apply_migrations(self.database, self._execute, self.query, self._ttl_days)
        self._types.clear()
        return applied

    def insert(self, table: str, columns: Columns, dedup_token: str) -> int:
        """Columnar insert of one batch, deduplicated by ``dedup_token``."""
        arrow = to_arrow_table(columns, self._column_types(table))
        if arrow.num_rows == 0:
            return 0
        try:
            self._client.insert_arrow(
                f"{self.database}.{table}",
                arrow,
                settings={"insert_deduplication_token": dedup_token, "optimize_on_insert": 0},
            )
        except Exception as exc:
            raise StoreError(f"insert into {self.database}.{table} failed: {exc}") from exc
        return int(arrow.num_rows)

    def query(self, sql: str, parameters: Parameters | None = None) -> QueryResult:
        """Run one statement with server-side bound ``{name:Type}`` parameters."""
        return self._query(sql, parameters, None)

    def query_readonly(self, sql: str, parameters: Parameters | None = None) -> QueryResult:
        """Run a user's statement with ``readonly=1``, once the server's parser vetted it.

        Servers older than ``parseQueryToJSON`` run it unvetted: over HTTP a server refuses
        INTO OUTFILE itself, and ``readonly=1`` refuses writes, setting changes and the table
        functions that reach files or the network.
        """

        def ask(statement: str, params: Parameters | None) -> QueryResult:
            return self._query(statement, params, READONLY_SETTINGS)

        def table_functions() -> TableFunctions:
            if self._table_functions is None:
                self._table_functions = TableFunctions.of(ask)
            return self._table_functions

        statement = vet_read_only(sql, ask, table_functions, parser_required=False)
        return self._query(statement, parameters, READONLY_SETTINGS)

    def _query(
        self, sql: str, parameters: Parameters | None, settings: Mapping[str, int] | None
    ) -> QueryResult:
        try:
            result = self._client.query(
                sql,
                parameters=_server_params(parameters) or None,
                settings=dict(settings) if settings else None,
            )
        except Exception as exc:
            raise StoreError(f"ClickHouse refused the statement: {exc}") from exc
        return list(result.column_names), [tuple(r) for r in result.result_rows]

    def close(self) -> None:
        """Close the HTTP pool."""
        try:
            self._client.close()
        except Exception as exc:
            raise StoreError(f"closing the ClickHouse client failed: {exc}") from exc

    def _execute(self, sql: str) -> None:
        try:
            self._client.command(sql)
        except Exception as exc:
            raise StoreError(f"ClickHouse refused the statement: {exc}") from exc

    def _column_types(self, table: str) -> dict[str, str]:
        if table not in self._types:
            _, rows = self.query(
                "SELECT name, type FROM system.columns WHERE database = {d:String} "
                "AND table = {t:String} ORDER BY position",
                {"d": self.database, "t": table},
            )
            if not rows:
                raise StoreError(f"no table {self.database}.{table}; run migrations first")
            self._types[table] = {str(r[0]): str(r[1]) for r in rows}
        return self._types[table]


def _server_params(parameters: Parameters | None) -> dict[str, Any]:
    # clickhouse-connect escapes a top-level string parameter itself, so strings go as they
    # are; everything else as the text ClickHouse parses for its placeholder type.
    text = params_as_text(parameters)
    return {k: v if isinstance(v, str) else text[k] for k, v in (parameters or {}).items()}
