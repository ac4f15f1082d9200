"""Throwaway redis-server instances for the tests, on 127.0.0.1 at free ports.

``redis_server`` (session fixture): one server for the whole session, no persistence, in a
temporary folder removed at the end; tests keep apart by using keys of their own (a fresh
stream or list name per test). :func:`running_redis` starts one more for a single test (with
``--requirepass``, or to stop it mid-test). The binary comes from the Debian package
``redis-server`` (``make services``); without it the tests skip, or fail under ``CI``.

Readiness is a PING over a plain socket (no client library needed), polled with a deadline.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from servers import HOST, PORT_ATTEMPTS, START_TIMEOUT, ServerError, _stop_process, _tail, free_port, wait_for

MISSING = "redis-server not found; run `make services` (root, Debian)"


def find_redis_server() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    return next((f"{d}/redis-server" for d in ("/usr/bin", "/usr/sbin", "/usr/local/bin")
                 if os.access(f"{d}/redis-server", os.X_OK)), None)


@dataclass
class RedisServer:
    root: Path
    proc: subprocess.Popen
    port: int
    password: str | None = None
    host: str = HOST

    @property
    def log(self) -> Path:
        return self.root / "redis.log"

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/{db}"


def _ping(host: str, port: int) -> bool:
    """True once the server answers PING (NOAUTH also means it is up)."""
    with socket.create_connection((host, port), timeout=1) as s:
        s.settimeout(1)
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        answer = s.recv(64)
    return answer.startswith((b"+PONG", b"-NOAUTH"))


def start_redis(password: str | None = None, timeout: float = START_TIMEOUT) -> RedisServer:
    binary = find_redis_server()
    if binary is None:
        raise ServerError(MISSING)
    root = Path(tempfile.mkdtemp(prefix="lrq-redis-"))
    try:
        for attempt in range(PORT_ATTEMPTS):
            port = free_port()
            args = [binary, "--port", str(port), "--bind", HOST, "--save", "",
                    "--appendonly", "no", "--dir", str(root), "--logfile", str(root / "redis.log"),
                    "--daemonize", "no"]
            if password:
                args += ["--requirepass", password]
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            server = RedisServer(root, proc, port, password)

            def ready(server: RedisServer = server) -> bool | None:
                if server.proc.poll() is not None:
                    raise ServerError(f"redis-server exited {server.proc.returncode}:\n"
                                      f"{_tail(server.log)}")
                return _ping(server.host, server.port) or None

            try:
                wait_for(ready, timeout, f"redis-server on {HOST}:{port}")
                return server
            except ServerError:
                _stop_process(proc)
                if attempt + 1 < PORT_ATTEMPTS and "in use" in _tail(root / "redis.log", 20):
                    continue
                raise
        raise AssertionError("unreachable")
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


def stop_redis(server: RedisServer) -> None:
    try:
        _stop_process(server.proc)
    finally:
        shutil.rmtree(server.root, ignore_errors=True)


def _missing() -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{MISSING} [CI is set, so service tests must run]", pytrace=False)
    pytest.skip(MISSING)


@contextlib.contextmanager
def running_redis(password: str | None = None) -> Iterator[RedisServer]:
    """A server of its own for one test (skips, or fails under CI, without the binary)."""
    if find_redis_server() is None:
        _missing()
    server = start_redis(password)
    try:
        yield server
    finally:
        stop_redis(server)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with running_redis() as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    """``redis://127.0.0.1:PORT/0`` on the session's redis-server."""
    return redis_server.url()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[Any]:
    """A redis-py client on the session's server (skips without redis-py)."""
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(redis_url, socket_timeout=10)
    yield client
    client.close()


class ServerHarness:
    """The part of the contract-suite harnesses (tests/contract) both Redis kinds share: a
    redis-server of the harness's own, a client on it, both gone at ``close``."""

    ack_at = "commit"
    takeover_seconds = 1.0  # each kind's ``takeover`` option: claim_idle, timeout
    named_consumers = True

    def __init__(self) -> None:
        if find_redis_server() is None:
            from harness import missing  # tests/contract/harness.py

            missing("redis-server not found")
        import redis

        self.server = start_redis()
        self.client = redis.Redis.from_url(self.server.url(), socket_timeout=10)

    def close(self) -> None:
        self.client.close()
        stop_redis(self.server)
