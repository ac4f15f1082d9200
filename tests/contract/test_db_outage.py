"""A results-database outage mid-run, over every source kind: the shared PostgreSQL is
stopped (``pg_ctl stop -m fast``) under a running ``lrq run --until-idle``, and started again
once a worker has logged the outage.

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
from lrqtest import ROOT, killed_on_exit, lrq, poll
from sqlalchemy import create_engine, text
from sqlalchemy.exc import SQLAlchemyError
from test_multi_node import stored
from test_sources import config, h, items  # noqa: F401 - h is the harness fixture

pytestmark = [pytest.mark.services, pytest.mark.slow]

N = 3000
FREE = 2  # batches each worker process handles before it waits for the test's go-ahead
HELD = '''
import os, time
handled = 0
def handle(items):
    global handled
    handled += 1
    deadline = time.monotonic() + 120
    while handled > %d and os.path.exists(%r) and time.monotonic() < deadline:
        time.sleep(0.01)  # held: the run cannot end before the server is stopped
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
        h: Harness, tmp_path: Path, own_pg: servers.PostgresServer) -> None:  # noqa: F811
    if h.name == "http-agent":
        pytest.skip("http-agent: the database's side is the same as sql's")
    hold = tmp_path / "hold"
    hold.touch()
    (tmp_path / "held.py").write_text(HELD % (FREE, str(hold)))
    url = own_pg.url()
    cfg = config(tmp_path / "node", h.source_table(tmp_path), db_url=url, handler="held:handle",
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
        return committed_items(url) >= 50

    with killed_on_exit(subprocess.Popen(
            [sys.executable, "-m", "lrq", "-c", str(cfg), "run", "--until-idle"], cwd=cfg.parent,
            env={**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"},
            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)) as run:
        assert poll(progress, seconds=60), "no batch committed"
        servers.halt_postgres(own_pg)
        hold.unlink()  # the held workers now commit into the outage
        log_path = cfg.parent / "data" / "lrq.log"
        assert poll(lambda: "lrq.worker: backoff queue=docs" in log_path.read_text(),
                    seconds=60), "no worker saw the outage"
        servers.start_again(own_pg)

        def ended() -> bool:
            progress()  # keep sampling the invariant while the run recovers and drains
            return run.poll() is not None

        poll(ended, seconds=240, every=0.2)
        out, err = run.communicate(timeout=60)
    assert not acked_over_committed, f"acknowledged before commit: {acked_over_committed[:5]}"
    # The workers backed off and carried on: the run drained and exits 0, and no worker
    # process ended with an error (errors recovered from are not failures).
    assert run.returncode == 0, err[-3000:]
    log = log_path.read_text()
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


def test_a_worker_started_by_the_scheduler_during_an_outage_waits_for_the_database(
        tmp_path: Path, own_pg: servers.PostgresServer) -> None:
    """A worker process the scheduler starts while the results database is down backs off
    as a running worker does, and works once the server is back: it used to exit 1 at once
    ("cannot reach results database"), an ERROR ``worker-exit`` in the scheduler's log for a
    restart of a second or two. ``lrq work`` run by hand still fails at once (see
    tests/integration/test_sink_contract.py)."""
    from harness_sql import SqlHarness

    sql = SqlHarness()
    cfg = config(tmp_path / "node", sql.source_table(tmp_path), db_url=own_pg.url())
    sql.add(items(0, 200))
    lrq("-c", str(cfg), "sniff", cwd=cfg.parent, check=True)
    servers.halt_postgres(own_pg)
    err_path = tmp_path / "work.err"
    with err_path.open("w") as err, killed_on_exit(subprocess.Popen(
            [sys.executable, "-m", "lrq", "-c", str(cfg), "work", "--burst"], cwd=cfg.parent,
            env={**os.environ, "PYTHONPATH": str(ROOT), "LRQ_CHILD": "1"},
            stdout=subprocess.DEVNULL, stderr=err)) as work:
        assert poll(lambda: "backoff queue=docs" in err_path.read_text() or
                    work.poll() is not None, seconds=60)
        assert work.poll() is None, err_path.read_text()[-2000:]  # it waits, not exits
        servers.start_again(own_pg)
        assert work.wait(timeout=120) == 0, err_path.read_text()[-2000:]
    assert "cannot reach results database" in err_path.read_text()  # the wait's reason
    assert stored(own_pg.url()) == [f"d{i:05d}" for i in range(200)]
