"""Fixtures shared by every test tier: real database servers and a clean database per test.

``pg_url`` / ``mariadb_url`` (session): a throwaway server started on 127.0.0.1 at a free
port (see ``tests/servers.py``), stopped and removed at the end of the session. Missing
binaries skip the tests that need them (``make services`` installs them), except under
``CI``, where they fail: CI must really run them.

``tansu`` (session, tests/services/tansu.py): a Kafka-protocol broker on 127.0.0.1.

``db_url``: one test per backend (sqlite, postgresql, mariadb), each on a database of its
own, so no test sees another's rows.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import servers
from services.http_agent import http_agent  # noqa: F401 - the fixture, for every tier
from services.tansu import tansu  # noqa: F401  (the fixture)

_MISSING = "{} server binaries not found; run `make services` (root, Debian)"


def _binaries_missing(name: str) -> None:
    message = _MISSING.format(name)
    if os.environ.get("CI"):
        pytest.fail(f"{message} [CI is set, so service tests must run]", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[servers.PostgresServer]:
    if servers.find_postgres_bin() is None:
        _binaries_missing("PostgreSQL")
    server = servers.start_postgres()
    try:
        yield server
    finally:
        servers.stop_postgres(server)


@pytest.fixture(scope="session")
def mariadb_server() -> Iterator[servers.MariaDBServer]:
    if servers.find_mariadbd() is None or servers.find_mariadb_install_db() is None:
        _binaries_missing("MariaDB")
    server = servers.start_mariadb()
    try:
        yield server
    finally:
        servers.stop_mariadb(server)


@pytest.fixture(scope="session")
def pg_url(pg_server: servers.PostgresServer) -> str:
    """``postgresql+psycopg://lrq:…@127.0.0.1:PORT/lrq`` on the session's PostgreSQL."""
    return pg_server.url()


@pytest.fixture(scope="session")
def mariadb_url(mariadb_server: servers.MariaDBServer) -> str:
    """``mysql+pymysql://lrq:…@127.0.0.1:PORT/lrq?charset=utf8mb4`` on the session's MariaDB."""
    return mariadb_server.url()


@pytest.fixture(params=["sqlite",
                        pytest.param("postgresql", marks=pytest.mark.services),
                        pytest.param("mariadb", marks=pytest.mark.services)])
def db_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """A URL of an empty database of its own: a SQLite file in tmp_path, or a new database
    on the session's PostgreSQL / MariaDB server, dropped after the test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'results.db'}"
        return
    server = request.getfixturevalue("pg_server" if request.param == "postgresql"
                                     else "mariadb_server")
    name = server.create_database()
    try:
        yield server.url(name)
    finally:
        server.drop_database(name)



@pytest.fixture
def engine(db_url: str) -> Iterator[Any]:
    """A SQLAlchemy engine on :func:`db_url`'s database, disposed after the test."""
    from lrq.db import make_engine

    e = make_engine(db_url)
    try:
        yield e
    finally:
        e.dispose()

# The redis-server fixtures (redis_server, redis_url, redis_client) live with their server code.
from services.redis_server import redis_client, redis_server, redis_url  # noqa: E402, F401
