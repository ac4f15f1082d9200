"""Engines: pre-ping, bounded connect waits, SQLite in WAL with immediate transactions."""
from __future__ import annotations

import json
import os
from typing import Any

import orjson
from sqlalchemy import Table, create_engine, event, literal_column
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.sql.dml import Insert
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from lrq.errors import ConfigError

CONNECT_TIMEOUT = 10  # seconds, for network databases
STATEMENT_TIMEOUT = 300  # seconds any one statement may run or wait for a lock
SQLITE_BUSY_MS = 60_000

_DRIVERS = {"postgresql": "psycopg (pip install 'lrq[postgres]')",
            "mysql": "pymysql (pip install 'lrq[mysql]')",
            "mariadb": "pymysql (pip install 'lrq[mysql]')"}


def sqlite_path(url: str) -> str | None:
    """The file of a SQLite URL, or None (not SQLite, or in memory)."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or u.database in (None, "", ":memory:"):
        return None
    return u.database


def make_engine(url: str, what: str = "db_url", *, create: bool = True, writer: bool = True,
                **kw: Any) -> Engine:
    """An engine for ``url``. ``create=False``: a missing SQLite file is an error, not created.
    ``writer=False`` (a source that lrq only reads): SQLite is opened as it is, without
    switching the user's database to WAL or taking write locks for reads."""
    try:
        u = make_url(url)
    except ArgumentError as e:
        raise ConfigError(f"{what} {url!r} is not a database URL") from e
    backend = u.get_backend_name()
    path = sqlite_path(url)
    if path is not None and not path.startswith("file:"):
        if not create and not os.path.exists(path):
            raise ConfigError(f"{what}: SQLite file {path} does not exist")
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    if backend == "postgresql" and u.drivername == "postgresql":
        u = u.set(drivername="postgresql+psycopg")
    if backend in ("mysql", "mariadb") and "+" not in u.drivername:
        u = u.set(drivername=f"{backend}+pymysql")
    args: dict[str, Any] = {}
    if backend == "sqlite":
        args["timeout"] = SQLITE_BUSY_MS / 1000
    elif backend == "postgresql":
        args.update(connect_timeout=CONNECT_TIMEOUT,
                    options=f"-c statement_timeout={STATEMENT_TIMEOUT * 1000}")
    elif backend in ("mysql", "mariadb"):
        args.update(connect_timeout=CONNECT_TIMEOUT, read_timeout=STATEMENT_TIMEOUT,
                    write_timeout=STATEMENT_TIMEOUT)
    try:
        # Pre-ping guards against server-side disconnects; a SQLite file has none to detect.
        engine = create_engine(u, pool_pre_ping=backend != "sqlite", connect_args=args,
                               json_serializer=dumps_json, **kw)
    except NoSuchModuleError as e:
        raise ConfigError(f"{what}: no SQLAlchemy dialect for {u.drivername!r}") from e
    except ImportError as e:
        need = _DRIVERS.get(backend, "its driver")
        raise ConfigError(f"{what}: the {backend} driver is not installed; install {need}") from e
    if backend == "sqlite" and writer:
        _sqlite_setup(engine)
    return engine


def _sqlite_setup(engine: Engine) -> None:
    """WAL so readers never block the writer; BEGIN IMMEDIATE so concurrent writers queue on
    the busy timeout instead of failing on a read-to-write upgrade. A connection opened with
    ``execution_options(READ_ONLY)`` (see :func:`reader`) takes no write lock: its statements
    run in SQLite's autocommit mode, each its own read transaction."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_MS}")
        if engine.url.database not in (None, "", ":memory:"):
            cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        if not conn.get_execution_options().get(READ_ONLY):
            conn.exec_driver_sql("BEGIN IMMEDIATE")


#: Execution option marking a connection that only reads (see :func:`reader`).
READ_ONLY = "lrq_read_only"


def reader(engine: Engine) -> Connection:
    """A connection for single reads. On SQLite it does not queue for the write lock, so
    a worker checking the ledger does not wait behind another worker's commit."""
    return engine.connect().execution_options(**{READ_ONLY: True})


#: Fallback encoder for what orjson refuses (integers beyond 64 bits): json.dumps() with
#: options would build a new encoder per call.
_JSON = json.JSONEncoder(default=str, ensure_ascii=False)
_ORJSON = orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME


def dumps_json(value: Any) -> str:
    """Every JSON value lrq writes (generic results, dead letters, model JSON columns):
    UTF-8 text, compact; dates, decimals and other non-JSON values as ``str(value)``; NaN
    and infinities as null. orjson does this at a seventh of the stdlib's cost, which was
    an eighth of a worker's time on W1 (bench/README.md)."""
    try:
        return orjson.dumps(value, default=str, option=_ORJSON).decode()
    except orjson.JSONEncodeError:
        return _JSON.encode(value)


def insert_ignore(engine: Engine, table: Table, unique: list[str]) -> Insert:
    """``INSERT`` that skips rows whose ``unique`` columns already exist, in the dialect's form.

    MySQL/MariaDB get ``ON DUPLICATE KEY UPDATE k = k``, spelled with ``literal_column``
    because PyMySQL's executemany rejects bound parameters after that clause.
    """
    # Each dialect's module is imported when used: the PostgreSQL and MySQL ones took ~50 ms of
    # every lrq process's start (python -X importtime) for an SQLite user.
    name = engine.dialect.name
    if name == "sqlite":
        from sqlalchemy.dialects import sqlite

        return sqlite.insert(table).on_conflict_do_nothing(index_elements=unique)
    if name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(table).on_conflict_do_nothing(index_elements=unique)
    if name in ("mysql", "mariadb"):
        from sqlalchemy.dialects import mysql

        k = unique[0]
        return mysql.insert(table).on_duplicate_key_update({k: literal_column(f"`{k}`")})
    raise ConfigError(f"db_url: lrq cannot store results in {name!r} "
                      "(supported: sqlite, postgresql, mysql, mariadb)")
