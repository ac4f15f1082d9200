"""The ingest journal's crash windows with a real dead process: ``lrq web --http`` SIGKILLs
itself at a failpoint of the journal's writer while it appends request B (the client gets no
answer), between request A (202) and, after a restart, request C (202). ``lrq run
--until-idle`` then stores A and C exactly once; B is stored or not as its window says (a
half-written record never, a whole one in a closed segment yes: "may or may not" made
exact), never twice."""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from lrqtest import ROOT, killed_on_exit, lrq, poll

pytestmark = pytest.mark.slow  # ~5 s each alone, 15 s on a busy machine

TOKEN = "windows-token"
HANDLER = '''
def handle(items):
    return [{"id": i["id"]} for i in items]
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(port: int, keys: list[str]) -> int | None:
    """The answer's status, or None when the connection dropped without one."""
    body = json.dumps([{"id": k} for k in keys]).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/api/queues/events/items", body,
                     {"Authorization": f"Bearer {TOKEN}"})
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def serving(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
        return True
    return False


@contextlib.contextmanager
def web(cfg: Path, port: int,
        failpoint: str | None = None) -> Iterator[subprocess.Popen[str]]:
    env = {"LRQ_FAILPOINT": failpoint} if failpoint else {}
    proc = subprocess.Popen([sys.executable, "-m", "lrq", "-c", str(cfg), "web", "--http",
                             f"127.0.0.1:{port}"], cwd=ROOT, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, **env})
    with killed_on_exit(proc):
        assert poll(lambda: serving(port) or proc.poll() is not None, 60) and serving(port)
        yield proc


@pytest.mark.parametrize("point, b_stored", [("ingest-mid-write", False),
                                             ("ingest-before-head", True),
                                             ("ingest-before-fsync", True)])
def test_a_writer_killed_in_each_window_loses_no_acknowledged_item(
        tmp_path: Path, point: str, b_stored: bool) -> None:
    (tmp_path / "store.py").write_text(HANDLER)
    cfg = tmp_path / "lrq.toml"
    cfg.write_text("\n".join([
        'data_dir = "data"', 'db_url = "sqlite:///results.db"', f'http_token = "{TOKEN}"',
        "interval = 0.1", "[queues.events]", 'handler = "store:handle"', 'key = "id"',
        'result_table = "events"', "[queues.events.source]", 'kind = "ingest"']) + "\n")
    port = free_port()
    a, b, c = ["a1", "a2"], ["b1", "b2"], ["c1", "c2"]
    with web(cfg, port) as proc:
        assert post(port, a) == 202
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    with web(cfg, port, point) as proc:
        assert post(port, b) is None  # killed before it could answer
        assert proc.wait(timeout=30) == -signal.SIGKILL
    with web(cfg, port) as proc:
        assert post(port, c) == 202
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    r = lrq("-c", str(cfg), "run", "--until-idle", timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("ingest-torn-tail" in r.stderr) == (point == "ingest-mid-write"), r.stderr[-3000:]
    with contextlib.closing(sqlite3.connect(tmp_path / "results.db")) as db:
        rows = sorted(k for (k,) in db.execute("SELECT key FROM events"))
    assert rows == sorted(a + c + (b if b_stored else []))
    v = lrq("-c", str(cfg), "verify")
    assert v.returncode == 0 and "lag 0" in v.stdout, v.stdout
