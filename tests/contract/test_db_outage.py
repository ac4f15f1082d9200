"""A results-database outage mid-run, over every source kind: the shared PostgreSQL is
restarted (``pg_ctl restart -m fast``) under a running ``lrq run --until-idle``.

The workers' commits fail while the server is down. Nothing may be lost or stored twice, no
batch may be marked done without its commit, nothing may be acknowledged to a broker for
work that is not committed (sampled during the run: items acknowledged never exceed items
committed), and the run must carry on by itself once the server is back (issue 13)."""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import servers
from harness import Harness
from sqlalchemy import create_engine, text
from sqlalchemy.exc import SQLAlchemyError
from test_multi_node import stored
from test_sources import config, h, items  # noqa: F401 - h is the harness fixture

from lrqtest import ROOT, killed_on_exit, lrq, poll

pytestmark = [pytest.mark.services, pytest.mark.slow]

N = 3000
SLOW = '''
import time
def handle(items):
    time.sleep(0.02)  # a slow model call: the run lasts long enough to restart the server
    return [{"doc_id": i["doc_id"], "n": len(i["content"])} for i in items]
'''


@pytest.fixture
def own_pg() -> Iterator[servers.PostgresServer]:
    """A PostgreSQL of this test's own: restarting the session's would disturb other tests."""
    if servers.find_postgres_bin() is None:
        pytest.skip("PostgreSQL server binaries not found; run `make services`")
    server = servers.start_postgres()
    try:
        yield server
    finally:
        servers.stop_postgres(server)


def committed_items(url: str) -> int:
    engine = create_engine(url, connect_args={"connect_timeout": 2})
    try:
        with engine.connect() as c:
            return int(c.execute(text("SELECT coalesce(sum(items), 0) FROM lrq_batches"))
                       .scalar_one())
    except SQLAlchemyError:  # down, or the ledger not created yet
        return -1
    finally:
        engine.dispose()


def test_postgres_restart_mid_run_loses_nothing_and_the_run_resumes(
        h: Harness, tmp_path: Path, own_pg: servers.PostgresServer) -> None:
    if h.name == "http-agent":
        pytest.skip("http-agent: the database's side is the same as sql's")
    (tmp_path / "slow.py").write_text(SLOW)
    url = own_pg.url()
    cfg = config(tmp_path / "node", h.source_table(tmp_path), db_url=url, handler="slow:handle",
                 batch_size=50, chunk_size=50)
    h.add(items(0, N))
    acked_over_committed: list[tuple[int, int]] = []

    def progress() -> bool:
        """Sample the acknowledgement invariant; True once some batches are committed."""
        if h.ack_at == "commit":
            acked = N - h.unacknowledged()
            committed = committed_items(url)  # read after: it only grows
            if committed >= 0 and acked > committed:
                acked_over_committed.append((acked, committed))
        return committed_items(url) >= 10 * 50

    with killed_on_exit(subprocess.Popen(
            [sys.executable, "-m", "lrq", "-c", str(cfg), "run", "--until-idle"], cwd=cfg.parent,
            env={**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"},
            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)) as run:
        assert poll(progress, seconds=60), "no batch committed"
        servers.restart_postgres(own_pg, mode="fast")
        assert committed_items(url) < N, "the run ended before the restart: nothing was tested"

        def ended() -> bool:
            progress()  # keep sampling the invariant while the run recovers and drains
            return run.poll() is not None

        poll(ended, seconds=240, every=0.2)
        out, err = run.communicate(timeout=60)
    assert not acked_over_committed, f"acknowledged before commit: {acked_over_committed[:5]}"
    # The workers backed off and carried on: the run drained and exits 0, and no worker
    # process ended with an error (errors recovered from are not failures).
    assert run.returncode == 0, err[-3000:]
    log = (cfg.parent / "data" / "lrq.log").read_text()
    backoffs = [line for line in log.splitlines() if "lrq.worker: backoff queue=docs" in line]
    assert backoffs, "the outage was not seen"
    assert all("DatabaseUnreachable" in b and f"@127.0.0.1:{own_pg.port}/" in b
               for b in backoffs), backoffs
    assert own_pg.password not in log
    assert "\n\tIs the server running" not in log  # psycopg's hint, joined into the line
    assert "worker-exit" not in log, log[-3000:]
    assert stored(url) == [f"d{i:05d}" for i in range(N)]  # nothing lost, nothing twice
    assert h.unacknowledged() == 0
    v = lrq("-c", str(cfg), "verify", cwd=cfg.parent)
    assert v.returncode == 0, v.stdout + v.stderr
