"""Both Redis kinds: a password in the URL never shows in errors, logs or ``status``; an
unreachable or refusing server is a quick :class:`SourceError` naming the redacted URL."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest
from lrqtest import open_source
from servers import free_port
from services.redis_server import running_redis

from lrq.errors import SourceError

pytestmark = pytest.mark.services
pytest.importorskip("redis")

PASSWORD = "s3cret-Pw-1f2e"
KINDS = {"redis-stream": {"stream": "events", "block": 0}, "redis-list": {"list": "jobs"}}


def make(kind: str, url: str, tmp_path: Path) -> Any:
    return open_source(kind, {"url": url, **KINDS[kind]}, tmp_path)


@pytest.fixture(scope="module")
def guarded() -> Any:
    with running_redis(password=PASSWORD) as server:
        yield server


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_password_never_shown(kind: str, guarded: Any, tmp_path: Path, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    src = make(kind, guarded.url(), tmp_path)
    try:
        src.fetch(None, 10)
        status = src.status()
        assert status["url"] == f"redis://:***@127.0.0.1:{guarded.port}/0"
        assert PASSWORD not in repr(status)
    finally:
        src.close()
    wrong = guarded.url().replace(PASSWORD, PASSWORD[::-1])
    with pytest.raises(SourceError) as e:
        make(kind, wrong, tmp_path).fetch(None, 10)
    assert "***@127.0.0.1" in str(e.value)
    assert PASSWORD[::-1] not in str(e.value) and e.value.__cause__ is None
    query = f"redis://127.0.0.1:{guarded.port}/0?password=bad-{PASSWORD}"
    with pytest.raises(SourceError) as e:
        make(kind, query, tmp_path).fetch(None, 10)
    assert "password=***" in str(e.value) and PASSWORD not in str(e.value)
    assert PASSWORD not in caplog.text and PASSWORD[::-1] not in caplog.text


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_unreachable_server_fails_fast(kind: str, tmp_path: Path) -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"
    t = time.monotonic()
    with pytest.raises(SourceError) as e:
        make(kind, url, tmp_path).fetch(None, 10)
    assert time.monotonic() - t < 3
    message = str(e.value)
    assert message.startswith(f"redis redis://:***@127.0.0.1:{url.rsplit(':', 1)[1]}: cannot ")
    assert PASSWORD not in message


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_server_gone_mid_run(kind: str, tmp_path: Path) -> None:
    """A fetch on a server that went away is a SourceError (the sniffer backs off and tries
    again), not a hang."""
    with running_redis() as server:
        src = make(kind, server.url(), tmp_path)
        src.fetch(None, 1)
        server.proc.kill()
        server.proc.wait(10)
        t = time.monotonic()
        with pytest.raises(SourceError):
            src.fetch(None, 1)
        assert time.monotonic() - t < 3
