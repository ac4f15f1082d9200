"""Engines: pre-ping, bounded connect waits, SQLite in WAL with immediate transactions; and
:func:`fault`, which reads a database error as a refused row, a refused statement or an
unreachable database."""
from __future__ import annotations

import enum
import json
import os
from typing import Any

import orjson
from sqlalchemy import Table, create_engine, event, literal_column
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.sql.dml import Insert

from lrq.errors import ConfigError
from lrq.redact import redact

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


def shown_url(engine: Engine) -> str:
    """The engine's URL fit for a message: no password (in the user part or the query)."""
    return redact(engine.url.render_as_string(hide_password=False))


def make_engine(url: str, what: str = "db_url", *, create: bool = True, writer: bool = True,
                **kw: Any) -> Engine:
    """An engine for ``url``. ``create=False``: a missing SQLite file is an error, not created.
    ``writer=False`` (a source that lrq only reads): SQLite is opened as it is, without
    switching the user's database to WAL or taking write locks for reads."""
    try:
        u = make_url(url)
    except (ArgumentError, ValueError) as e:  # ValueError: a port that is not a number
        raise ConfigError(f"{what} {redact(url)!r} is not a database URL") from e
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
    """WAL so readers never block the writer, synchronous FULL so a commit is durable (see
    below); BEGIN IMMEDIATE so concurrent writers queue on
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
        # FULL: a commit is on disk before it returns. With NORMAL (WAL synced only at
        # checkpoints) an OS crash or power loss may roll back the last commits while the
        # batches' moves to done/ after them survive: items lost with nothing to replay them
        # (invariant 3). Costs ~0.9 ms of wall a commit on this disk (bench/README.md).
        cur.execute("PRAGMA synchronous = FULL")
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


class Fault(enum.Enum):
    """What a database error says is at fault (see :func:`fault`)."""

    #: The row's values: NOT NULL, CHECK, foreign key, a unique key other than the one lrq
    #: upserts on, a value too long or out of range, a trigger's refusal. Other rows are fine.
    ROW = "row"
    #: The statement, whatever the rows: a missing table or column, a privilege, syntax.
    STATEMENT = "statement"
    #: The database: a failed connect, a disconnect, a timeout, a lock wait, a deadlock, a
    #: full disk. The same statement may succeed later.
    UNREACHABLE = "unreachable"


# PostgreSQL SQLSTATE classes: 22 data exception, 23 integrity constraint, P0 a trigger's
# RAISE; 08 connection, 40 rollback (deadlock, serialization), 53 resources, 55 lock not
# available, 57 operator intervention (statement timeout, shutdown), 58 system error.
_PG_ROW = ("22", "23", "P0")
_PG_UNREACHABLE = ("08", "40", "53", "55", "57", "58")
# MySQL/MariaDB server error numbers (client errors, 2000-2999, are all unreachable). A
# packet over max_allowed_packet (1153) is the batch's size, not the server: a statement.
_MY_ROW = {1048, 1062, 1216, 1263, 1264, 1265, 1292, 1364, 1366, 1367, 1406, 1451, 1452,
           1644, 3819, 4025}
_MY_UNREACHABLE = {1021, 1037, 1040, 1041, 1042, 1043, 1045, 1053, 1077, 1078, 1079, 1080,
                   1114, 1152, 1154, 1155, 1156, 1157, 1158, 1159, 1160, 1161, 1184,
                   1205, 1213, 1317, 1927, 1969, 3024}
# SQLite primary result codes: 18 TOOBIG, 19 CONSTRAINT, 20 MISMATCH, 25 RANGE; 5 BUSY,
# 6 LOCKED, 7 NOMEM, 8 READONLY, 10 IOERR, 11 CORRUPT, 13 FULL, 14 CANTOPEN, 15 PROTOCOL,
# 26 NOTADB.
_SQLITE_ROW = {18, 19, 20, 25}
_SQLITE_UNREACHABLE = {5, 6, 7, 8, 10, 11, 13, 14, 15, 26}


def fault(exc: BaseException) -> Fault:
    """Read a SQLAlchemy error as :class:`Fault`, by the driver's own code where it has one
    (PostgreSQL's SQLSTATE, MySQL's error number, SQLite's result code), else by the DB-API
    class: ``IntegrityError``/``DataError`` are rows, ``OperationalError`` and disconnects
    are the database, anything else (``ProgrammingError``, ...) is the statement.

    The codes matter because the classes mislead: PyMySQL raises an unknown column or a
    failed CHECK as ``OperationalError``, and SQLite a missing table as one."""
    if isinstance(exc, (sa_exc.DisconnectionError, sa_exc.TimeoutError)):
        return Fault.UNREACHABLE  # a pre-ping's disconnect, the pool's wait for a connection
    if not isinstance(exc, sa_exc.DBAPIError):
        return Fault.STATEMENT  # compiling or binding failed before the database saw it
    if exc.connection_invalidated:
        return Fault.UNREACHABLE
    orig = exc.orig
    args = getattr(orig, "args", ())
    if type(orig).__module__.startswith("pymysql") and args and isinstance(args[0], int):
        number = args[0]
        if number in _MY_ROW:
            return Fault.ROW
        if 2000 <= number < 3000 or number in _MY_UNREACHABLE or number == 0:
            return Fault.UNREACHABLE
        return Fault.STATEMENT
    state = getattr(orig, "sqlstate", None)
    if isinstance(state, str) and len(state) == 5:
        if state.startswith(_PG_ROW):
            return Fault.ROW
        return Fault.UNREACHABLE if state.startswith(_PG_UNREACHABLE) else Fault.STATEMENT
    code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(code, int):
        code &= 0xFF
        if code in _SQLITE_ROW:
            return Fault.ROW
        return Fault.UNREACHABLE if code in _SQLITE_UNREACHABLE else Fault.STATEMENT
    if isinstance(exc, (sa_exc.IntegrityError, sa_exc.DataError)):
        return Fault.ROW
    if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError)):
        return Fault.UNREACHABLE
    return Fault.STATEMENT
