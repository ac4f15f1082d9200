"""Issue 15's ingest acceptance test: ``lrq run --http 127.0.0.1:PORT`` with a ``kind =
"ingest"`` queue; 4 client threads post 50k items (each with its own key) in requests of 100,
retrying on connection errors and 503 a bounded number of times, while the test SIGKILLs the
whole scheduler tree twice (``kill_tree``: web server, sniffer, workers at once) and starts
it again on the same port. Then ``lrq run --until-idle`` drains what is left.

Every item acknowledged with 202 is stored exactly once (items posted but never
acknowledged may or may not be: only never twice), ``lrq verify`` passes (it reconciles the
ledger against the journal, which must hold nothing unread), and the journal is down to its
last segment."""
from __future__ import annotations

import contextlib
import http.client
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from lrqtest import ROOT, kill_tree, killed_on_exit, lrq, poll

from lrq import journal

pytestmark = pytest.mark.slow

ITEMS = 50_000
PER_REQUEST = 100
CLIENTS = 4
TRIES = 400  # per request, 0.05-0.5 s apart: a restart takes a few seconds
TOKEN = "acceptance-token"
HANDLER = '''
def handle(items):
    return [{"id": i["id"], "n": i["n"]} for i in items]
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(folder: Path) -> Path:
    (folder / "store.py").write_text(HANDLER)
    path = folder / "lrq.toml"
    path.write_text("\n".join([
        'data_dir = "data"', 'db_url = "sqlite:///results.db"', f'http_token = "{TOKEN}"',
        "interval = 0.2", "grace = 10",
        "[queues.events]", 'handler = "store:handle"', 'key = "id"', "batch_size = 500",
        "chunk_size = 500", "workers = 2", 'result_table = "events"',
        "[queues.events.source]", 'kind = "ingest"', 'segment_bytes = "200KB"',
        'max_unread_bytes = "2MB"', 'max_request_bytes = "100KB"']) + "\n")
    return path


class Clients:
    """``CLIENTS`` threads posting disjoint keys; what each request ended as."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.acked: set[str] = set()
        self.unacked: set[str] = set()
        self.retries = {"connection": 0, "503": 0}
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(t,), daemon=True)
                        for t in range(CLIENTS)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def done(self) -> bool:
        return not any(t.is_alive() for t in self.threads)

    def run(self, t: int) -> None:
        per = ITEMS // CLIENTS
        for start in range(0, per, PER_REQUEST):
            keys = [f"c{t}-{i}" for i in range(start, min(start + PER_REQUEST, per))]
            body = json.dumps([{"id": k, "n": i} for i, k in enumerate(keys)]).encode()
            ok = self.post(body)
            with self.lock:
                (self.acked if ok else self.unacked).update(keys)

    def post(self, body: bytes) -> bool:
        """True once answered 202; False after ``TRIES`` connection errors and 503s."""
        for n in range(TRIES):
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                try:
                    conn.request("POST", "/api/queues/events/items", body,
                                 {"Authorization": f"Bearer {TOKEN}",
                                  "Content-Type": "application/json"})
                    r = conn.getresponse()
                    r.read()
                finally:
                    conn.close()
            except (OSError, http.client.HTTPException):
                with self.lock:
                    self.retries["connection"] += 1
            else:
                if r.status == 202:
                    return True
                assert r.status == 503, f"unexpected answer {r.status}"
                with self.lock:
                    self.retries["503"] += 1
            time.sleep(min(0.05 * (n + 1), 0.5))  # a client's backoff, not synchronisation
        return False


def start_run(cfg: Path, port: int, log: Path) -> subprocess.Popen[str]:
    with log.open("a") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "lrq", "--log-format", "json", "-c", str(cfg), "run",
             "--http", f"127.0.0.1:{port}"], cwd=ROOT, text=True, stdout=subprocess.DEVNULL,
            stderr=err, start_new_session=True)


def serving(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
        return True
    return False


def stored(folder: Path) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(folder / "results.db", timeout=30)) as c:
        return dict(c.execute("SELECT key, count(*) FROM events WHERE queue = 'events' "
                              "GROUP BY key").fetchall())


def test_acknowledged_items_survive_two_sigkills_exactly_once(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    port = free_port()
    log = tmp_path / "run.log"
    clients = Clients(port)
    kills: list[int] = []
    run = start_run(cfg, port, log)
    try:
        assert poll(lambda: serving(port) or run.poll() is not None, 60) and serving(port), \
            log.read_text()[-3000:]
        clients.start()
        for threshold in (ITEMS // 5, ITEMS // 2):
            assert poll(lambda t=threshold: len(clients.acked) >= t or clients.done(), 300)
            assert not clients.done(), "the clients finished before the kill: post more"
            kills.append(len(clients.acked))
            kill_tree(run.pid)
            run.wait(timeout=30)
            run = start_run(cfg, port, log)
        assert poll(clients.done, 600), "the clients never finished"
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if run.poll() is None:
            kill_tree(run.pid)
            run.wait(timeout=30)
    print(f"killed at {kills} acknowledged items; acked {len(clients.acked)}, unacked "
          f"{len(clients.unacked)}, retries {clients.retries}")
    assert len(clients.acked) + len(clients.unacked) == ITEMS
    assert len(clients.acked) >= ITEMS * 0.99, "most requests should get through"

    with killed_on_exit(subprocess.Popen(
            [sys.executable, "-m", "lrq", "-c", str(cfg), "run", "--until-idle"], cwd=ROOT,
            text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)) as drain:
        _, err = drain.communicate(timeout=600)
    assert drain.returncode == 0, err[-3000:]

    rows = stored(tmp_path)
    lost = clients.acked - rows.keys()
    assert not lost, f"{len(lost)} acknowledged items were lost, e.g. {sorted(lost)[:10]}"
    assert all(n == 1 for n in rows.values())
    assert set(rows) <= clients.acked | clients.unacked
    v = lrq("-c", str(cfg), "verify", "events")
    assert v.returncode == 0, v.stdout + v.stderr
    assert "missing 0, duplicated 0" in v.stdout, v.stdout
    assert "cannot list its keys" in v.stdout and "lag 0" in v.stdout, v.stdout
    folder = tmp_path / "data" / "events" / "ingest"
    assert len(journal.segments(folder)) <= 2, journal.segments(folder)  # read ones deleted
    st = json.loads(lrq("-c", str(cfg), "status", "--json", check=True).stdout)
    assert st["queues"]["events"]["source"]["lag"] == 0
    assert st["queues"]["events"]["ledger_items"] >= len(rows)
    events: list[dict[str, Any]] = [json.loads(x) for x in log.read_text().splitlines()
                                    if x.startswith("{")]
    assert sum(e["event"] == "ingest-segment-started" for e in events) >= 3  # one a process
