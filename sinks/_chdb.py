"""Embedded ClickHouse (chDB) as a :class:`~sinks.Store`, with one owner process.

See docs/DESIGN.md, "Storage".

chDB locks its data folder: only one process can open it. The process that opens it is the
*owner*: it writes an owner file next to the folder (pid, command, the address of a local
query endpoint and a random token, mode 0600; the folder itself is 0700) and serves read-only
queries on 127.0.0.1 from a second session opened with ``readonly=1``. Any other process reads
through that endpoint (:class:`RemoteChdbStore`); a second writer fails at once with
:class:`~spendstream.errors.StoreLockedError` naming the owner and the way out.
"""

from __future__ import annotations

import atexit
import contextlib
import hmac
import json
import os
import secrets
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson

from sinks._store import (
    Columns,
    Parameters,
    QueryResult,
    TableFunctions,
    apply_migrations,
    check_read_only,
    decode_json_compact,
    params_as_text,
    to_arrow_table,
    vet_read_only,
)
from spendstream.errors import StoreError, StoreLockedError

_SESSION_SETTINGS = (
    # Decimals as JSON strings so that no reader ever parses money as a float.
    "SET output_format_json_quote_decimals = 1",
    "SET output_format_json_quote_64bit_integers = 0",
)
# The read-only session's settings are start-up arguments, and readonly=1 forbids SET and
# SETTINGS clauses, so no statement can change them (readonly=2 would allow that, and lets
# file(), url(), s3() ... run). Python() is off: it would read this process's variables.
_READONLY_CONNECTION = (
    "readonly=1&allow_python_table_function=0&allow_introspection_functions=0"
    "&output_format_json_quote_decimals=1&output_format_json_quote_64bit_integers=0"
)
_TOKEN_HEADER = "X-Spendstream-Token"
_MAX_BODY = 1 << 20


@dataclass(frozen=True)
class OwnerInfo:
    """What the owner file says about the process that holds the chDB folder."""

    pid: int
    command: str
    endpoint: str
    token: str
    path: str
    started_at: float

    def describe(self) -> str:
        """``pid 123 (spendstream sink)``."""
        return f"pid {self.pid} ({self.command})"


def owner_file(path: Path) -> Path:
    """The owner file of the chDB folder ``path`` (beside it, not inside chDB's own files)."""
    return path.parent / f"{path.name}.owner.json"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_owner(path: Path) -> OwnerInfo | None:
    """The live owner of ``path``, or None; a stale owner file (dead pid) is removed."""
    file = owner_file(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        info = OwnerInfo(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        # Half-written or foreign file: the chDB lock, not this file, is the authority.
        return None
    if info.pid != os.getpid() and not _pid_alive(info.pid):
        with contextlib.suppress(OSError):
            file.unlink()
        return None
    return info


def _write_owner(path: Path, info: OwnerInfo) -> None:
    file = owner_file(path)
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=file.name, suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)  # the token in it guards the query endpoint
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(asdict(info), fh)
        os.replace(tmp, file)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    # chDB prints "Cannot lock file ..." on fd 2 before raising; the caller reports it better.
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _locked_message(path: Path, owner: OwnerInfo | None) -> str:
    who = owner.describe() if owner else "another process"
    return (
        f"the embedded ClickHouse store {path} is in use by {who}; stop that process, "
        "or point SPENDSTREAM_CLICKHOUSE__URL at a ClickHouse server"
    )


class ChdbStore:
    """The embedded store, owned by this process while open (file-backed chDB session)."""

    def __init__(
        self,
        path: Path,
        *,
        database: str = "spendstream",
        command: str | None = None,
        serve: bool = True,
        ttl_days: int | None = None,
    ) -> None:
        self.path = Path(path).resolve()
        self.database = database
        self._ttl_days = ttl_days
        self._lock = threading.Lock()
        self._rw_guard = threading.Lock()
        self._ro_guard = threading.Lock()
        self._types: dict[str, dict[str, str]] = {}
        self._server: ThreadingHTTPServer | None = None
        self._ro: Any = None
        self._table_functions: TableFunctions | None = None
        _private_folder(self.path)
        owner = read_owner(self.path)
        if owner is not None and owner.pid != os.getpid():
            raise StoreLockedError(_locked_message(self.path, owner))
        try:
            with _quiet_stderr():
                self._session: Any = _new_session(str(self.path))
        except Exception as exc:
            text = str(exc)
            if "already initialized with path" in text:
                raise StoreError(
                    f"this process already has another chDB folder open; close it before "
                    f"opening {self.path}"
                ) from exc
            if "EmbeddedServer" in text or "lock" in text.lower():
                raise StoreLockedError(_locked_message(self.path, read_owner(self.path))) from exc
            raise StoreError(
                f"cannot open the embedded ClickHouse store {self.path}: {text}"
            ) from exc
        try:
            for statement in _SESSION_SETTINGS:
                self._session.query(statement)
            self.owner: OwnerInfo | None = None
            if serve:
                self._serve(command or " ".join(sys.argv) or "python")
        except Exception:
            self.close()
            raise
        atexit.register(self.close)

    # -- Store -----------------------------------------------------------------------------

    def migrate(self) -> list[str]:
        """Apply pending migrations (see :func:`sinks._store.apply_migrations`)."""
        applied = apply_migrations(self.database, self._execute, self.query, self._ttl_days)
        self._types.clear()
        return applied

    def insert(self, table: str, columns: Columns, dedup_token: str) -> int:
        """Insert a batch through chDB's ``Python()`` table function (zero-copy from Arrow)."""
        arrow = to_arrow_table(columns, self._column_types(table))
        if arrow.num_rows == 0:
            return 0
        names = ", ".join(f"`{n}`" for n in arrow.column_names)
        token = dedup_token.replace("\\", "\\\\").replace("'", "\\'")
        # chDB resolves Python(batch) from this frame's locals: no row ever becomes SQL text.
        # optimize_on_insert=0: the Replacing collapse inside one block is already done by the
        # buffer (one row per offset) and FINAL does it at read time; skipping it doubles the
        # insert rate.
        batch = arrow  # noqa: F841 - referenced by name in the SQL below
        sql = (
            f"INSERT INTO {self.database}.{table} ({names}) "
            f"SETTINGS insert_deduplication_token = '{token}', optimize_on_insert = 0 "
            f"SELECT {names} FROM Python(batch)"
        )
        self._run(sql, None)
        return int(arrow.num_rows)

    def query(self, sql: str, parameters: Parameters | None = None) -> QueryResult:
        """Run one statement with ``{name:Type}`` parameters; rows typed from the result meta."""
        return _decode(self._run(sql, parameters, fmt="JSONCompact"))

    def query_readonly(self, sql: str, parameters: Parameters | None = None) -> QueryResult:
        """Run a user's statement read-only (see :meth:`readonly_json`)."""
        return _decode(self.readonly_json(sql, params_as_text(parameters)))

    def readonly_json(self, sql: str, params_text: dict[str, str]) -> bytes:
        """Raw ``JSONCompact`` bytes of a user's statement (the endpoint answers with these).

        ``params_text`` are query parameters already in ClickHouse's escaped text form
        (:func:`~sinks._store.params_as_text`). The statement runs on the ``readonly=1``
        session, after :func:`~sinks._store.vet_read_only` has parsed it with the engine.
        """
        session = self._readonly_session()

        def ask(statement: str, parameters: Parameters | None) -> QueryResult:
            raw = self._run_text(statement, params_as_text(parameters), "JSONCompact", session)
            return _decode(raw)

        def table_functions() -> TableFunctions:
            if self._table_functions is None:
                self._table_functions = TableFunctions.of(ask)
            return self._table_functions

        statement = vet_read_only(sql, ask, table_functions, parser_required=True)
        return self._run_text(statement, params_text, "JSONCompact", session)

    def close(self) -> None:
        """Stop the endpoint, remove the owner file, release the folder lock."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if getattr(self, "owner", None) is not None:
            current = read_owner(self.path)
            if current is not None and current.pid == os.getpid():
                with contextlib.suppress(OSError):
                    owner_file(self.path).unlink()
            self.owner = None
        for name in ("_ro", "_session"):
            session = getattr(self, name, None)
            if session is not None:
                setattr(self, name, None)
                with contextlib.suppress(Exception):
                    session.close()

    # -- internals -------------------------------------------------------------------------

    def _execute(self, sql: str) -> None:
        self._run(sql, None)

    def _run(
        self, sql: str, parameters: Parameters | None, fmt: str = "CSV", session: Any = None
    ) -> bytes:
        return self._run_text(sql, params_as_text(parameters), fmt, session or self._session)

    def _run_text(self, sql: str, params: dict[str, str], fmt: str, session: Any) -> bytes:
        if session is None:
            raise StoreError("the embedded store is closed")
        with self._ro_guard if session is self._ro else self._rw_guard:
            try:
                if params:
                    result = session.query(sql, fmt, params=params)
                else:
                    result = session.query(sql, fmt)
            except Exception as exc:
                # chDB keeps the rows a failed statement had already produced and hands them
                # out with the next statement's result on this session (another client's,
                # on the endpoint): one throw-away statement takes them.
                with contextlib.suppress(Exception):
                    session.query("SELECT 1", "CSV")
                raise StoreError(
                    f"ClickHouse (chDB) refused the statement: {_first_line(exc)}"
                ) from exc
        return bytes(result.bytes()) if hasattr(result, "bytes") else str(result).encode()

    def _column_types(self, table: str) -> dict[str, str]:
        if table not in self._types:
            _, rows = self.query(
                "SELECT name, type FROM system.columns WHERE database = {d:String} "
                "AND table = {t:String} ORDER BY position",
                {"d": self.database, "t": table},
            )
            if not rows:
                raise StoreError(
                    f"no table {self.database}.{table}; run `spendstream clickhouse migrate`"
                )
            self._types[table] = {str(r[0]): str(r[1]) for r in rows}
        return self._types[table]

    def _readonly_session(self) -> Any:
        with self._lock:
            if self._session is None:
                raise StoreError("the embedded store is closed")
            if self._ro is None:
                # A second session on the same folder, read-only at the engine level: no
                # user statement runs on the owner's read-write session.
                try:
                    self._ro = _new_session(f"{self.path}?{_READONLY_CONNECTION}")
                except Exception as exc:
                    raise StoreError(
                        f"cannot open a read-only session on {self.path}: {_first_line(exc)}"
                    ) from exc
                # Queries name tables as users know them (`FROM priced_events`): the configured
                # database is the session's default. Before the first migration it does not
                # exist yet; qualified names still work then.
                with contextlib.suppress(Exception):
                    self._ro.query(f"USE `{self.database}`", "CSV")
            return self._ro

    def _serve(self, command: str) -> None:
        token = secrets.token_urlsafe(24)
        handler = _make_handler(self, token)
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        thread = threading.Thread(
            target=server.serve_forever, name="spendstream-chdb-endpoint", daemon=True
        )
        thread.start()
        self._server = server
        port = server.server_address[1]
        self.owner = OwnerInfo(
            pid=os.getpid(),
            command=command,
            endpoint=f"http://127.0.0.1:{port}",
            token=token,
            path=str(self.path),
            started_at=time.time(),
        )
        _write_owner(self.path, self.owner)


def _private_folder(path: Path) -> None:
    # The store holds every user's usage and spend: only its owner's account may read it.
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(OSError):  # a folder someone else owns keeps its mode
        if path.stat().st_mode & 0o077:
            path.chmod(0o700)


def _new_session(conn: str) -> Any:
    from chdb import session as chdb_session

    factory: Any = chdb_session.Session  # chDB ships no annotations for it
    return factory(conn)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _decode(raw: bytes) -> QueryResult:
    if not raw.strip():
        return [], []
    try:
        return decode_json_compact(orjson.loads(raw))
    except orjson.JSONDecodeError as exc:
        raise StoreError(f"unreadable result from chDB: {exc}") from exc


def _parse_request(raw: bytes) -> tuple[str, dict[str, str]]:
    """``{"sql": "...", "parameters": {"name": "escaped text"}}`` -> (sql, parameters)."""
    try:
        request = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise StoreError(f"the request body is not JSON: {exc}") from exc
    if not isinstance(request, dict) or not isinstance(request.get("sql"), str):
        raise StoreError('the request body must be a JSON object {"sql": "...", "parameters": {}}')
    params = request.get("parameters")
    if params is None:
        params = {}
    if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
        raise StoreError("parameters must be an object of strings")
    return check_read_only(request["sql"]), params


def _make_handler(store: ChdbStore, token: str) -> type[BaseHTTPRequestHandler]:
    expected = token.encode()

    class Handler(BaseHTTPRequestHandler):
        server_version = "spendstream-chdb"

        def log_message(self, format: str, *args: Any) -> None:
            return  # quiet: the owner's console is for the owner

        def _reply(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/ping":
                self._reply(200, orjson.dumps({"pid": os.getpid()}))
            else:
                self._reply(404, orjson.dumps({"error": "POST /query"}))

        def _error(self, status: int, message: str) -> None:
            self._reply(status, orjson.dumps({"error": message}))

        def do_POST(self) -> None:
            given = self.headers.get(_TOKEN_HEADER) or ""
            # Constant time: the answer's timing must not tell how much of a guess was right.
            if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected):
                self._error(403, "bad or missing token")
                return
            if self.path != "/query":
                self._error(404, "POST /query")
                return
            raw_length = self.headers.get("Content-Length")
            try:
                length = int(raw_length) if raw_length is not None else -1
            except ValueError:
                length = -1
            if length < 0:
                self._error(400, "a Content-Length of 0 or more bytes is required")
                return
            if length > _MAX_BODY:
                self._error(413, f"the request is over {_MAX_BODY} bytes")
                return
            try:
                sql, params = _parse_request(self.rfile.read(length))
                body = store.readonly_json(sql, params)
            except StoreError as exc:
                self._error(400, str(exc))
                return
            except Exception as exc:
                # The owner's console shows no traceback for what a client sent.
                self._error(500, f"the store owner failed: {type(exc).__name__}: {exc}")
                return
            self._reply(200, body or b"{}")

    return Handler


class RemoteChdbStore:
    """Read-only client of the owner's local query endpoint (same results as the owner)."""

    def __init__(self, owner: OwnerInfo, *, database: str, timeout_s: float = 30.0) -> None:
        self.owner = owner
        self.database = database
        self._timeout = timeout_s

    def migrate(self) -> list[str]:
        """Not possible through the owner: raises :class:`StoreLockedError`."""
        raise StoreLockedError(_locked_message(Path(self.owner.path), self.owner))

    def insert(self, table: str, columns: Columns, dedup_token: str) -> int:
        """Not possible through the owner: raises :class:`StoreLockedError`."""
        raise StoreLockedError(_locked_message(Path(self.owner.path), self.owner))

    def query(self, sql: str, parameters: Parameters | None = None) -> QueryResult:
        """Ask the owner (read-only statements only: see :meth:`ChdbStore.readonly_json`)."""
        return self.query_readonly(sql, parameters)

    def query_readonly(self, sql: str, parameters: Parameters | None = None) -> QueryResult:
        """Ask the owner, who runs the statement read-only (:meth:`ChdbStore.readonly_json`)."""
        check_read_only(sql)
        body = orjson.dumps({"sql": sql, "parameters": params_as_text(parameters)})
        request = urllib.request.Request(
            self.owner.endpoint + "/query",
            data=body,
            headers={"Content-Type": "application/json", _TOKEN_HEADER: self.owner.token},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            try:
                message = str(orjson.loads(exc.read()).get("error", exc))
            except (orjson.JSONDecodeError, AttributeError):
                message = str(exc)
            raise StoreError(message) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise StoreError(
                f"the store owner {self.owner.describe()} did not answer at "
                f"{self.owner.endpoint}: {exc}"
            ) from exc
        return _decode(raw)

    def close(self) -> None:
        """Nothing to release."""


def _ping(owner: OwnerInfo, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(owner.endpoint + "/ping", timeout=timeout_s) as response:
            return int(orjson.loads(response.read()).get("pid", -1)) == owner.pid
    except (urllib.error.URLError, OSError, ValueError, orjson.JSONDecodeError):
        return False


def open_embedded(
    path: Path,
    *,
    database: str,
    readonly: bool = False,
    command: str | None = None,
    ttl_days: int | None = None,
    wait_s: float = 3.0,
) -> ChdbStore | RemoteChdbStore:
    """Own the chDB folder, or (``readonly``) read through its live owner; never hangs."""
    path = Path(path).resolve()
    deadline = time.monotonic() + wait_s
    while True:
        owner = read_owner(path)
        if owner is not None and owner.pid != os.getpid() and not _ping(owner):
            # pid alive but no endpoint: maybe a reused pid. The chDB lock decides below.
            owner = None
        if owner is not None and owner.pid != os.getpid():
            if readonly:
                return RemoteChdbStore(owner, database=database)
            raise StoreLockedError(_locked_message(path, owner))
        try:
            return ChdbStore(path, database=database, command=command, ttl_days=ttl_days)
        except StoreLockedError:
            # Locked but no owner file yet: the owner may be starting. Wait briefly for its
            # file, then give up with the clear message.
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)
