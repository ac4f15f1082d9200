"""A results-database outage mid-run: PostgreSQL restarted under a running ``lrq run``.

The workers' commits fail while the server is down; nothing may be lost or stored twice,
no batch may be marked done without its commit, and the run must carry on by itself once
the server is back (issue 13: "the workers back off and resume by themselves")."""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import servers
from lrqtest import ROOT, killed_on_exit, lrq, poll, write_config
from sqlalchemy import create_engine, text
from sqlalchemy.exc import SQLAlchemyError

pytestmark = [pytest.mark.services, pytest.mark.slow]

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


def ledger_rows(url: str) -> int:
    engine = create_engine(url, connect_args={"connect_timeout": 2})
    try:
        with engine.connect() as c:
            return c.execute(text("SELECT count(*) FROM lrq_batches")).scalar_one()
    except SQLAlchemyError:  # down, or the ledger not created yet
        return 0
    finally:
        engine.dispose()


def test_postgres_restart_mid_run_loses_nothing_and_the_run_resumes(
        tmp_path: Path, own_pg: servers.PostgresServer) -> None:
    (tmp_path / "slow.py").write_text(SLOW)
    url = own_pg.url()
    cfg = write_config(tmp_path, docs=6000, batch_size=100, chunk_size=50, handler="slow:handle",
                       top={"db_url": url})
    with killed_on_exit(subprocess.Popen(
            [sys.executable, "-m", "lrq", "-c", str(cfg), "run", "--until-idle"], cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"},
            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)) as run:
        assert poll(lambda: ledger_rows(url) >= 5, seconds=60), "no batch committed"
        servers.restart_postgres(own_pg, mode="fast")
        assert ledger_rows(url) < 60, "the run ended before the restart: nothing was tested"
        out, err = run.communicate(timeout=300)
    # The workers backed off and carried on: the run drained and exits 0, and no worker
    # process ended with an error (errors recovered from are not failures).
    assert run.returncode == 0, err[-3000:]
    log = (tmp_path / "data" / "lrq.log").read_text()
    backoffs = [line for line in log.splitlines() if "lrq.worker: backoff queue=docs" in line]
    assert backoffs, "the outage was not seen"
    assert all("DatabaseUnreachable" in b and f"@127.0.0.1:{own_pg.port}/" in b for b in backoffs), \
        backoffs
    assert own_pg.password not in log
    assert "\n\tIs the server running" not in log  # psycopg's hint, joined into the line
    assert "worker-exit" not in log, log[-3000:]
    v = lrq("-c", str(cfg), "verify", cwd=tmp_path)
    assert v.returncode == 0, v.stdout + v.stderr
    assert "source 6000, results 6000, dead letters 0, missing 0, duplicated 0" in v.stdout
    assert ledger_rows(url) == 60
