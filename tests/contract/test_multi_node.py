"""Scale-out acceptance (issue 13): three ``lrq run`` nodes on one machine, each with its own
data dir and consumer name, share one consumer group and one results database (PostgreSQL).
One node is SIGKILLed mid-run, its whole process tree, and its data dir deleted, as if the
machine were lost. The survivors must finish every item exactly once, and the group must
have nothing pending at the end.

Run over every harness with a takeover (a consumer taking over a dead one's entries):
the Redis stream and list kinds, Kafka, and the SQLite stand-in broker.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import servers
from harness import Harness
from lrqtest import ROOT, kill_tree, killed_on_exit, poll
from sqlalchemy import create_engine, text
from sqlalchemy.exc import SQLAlchemyError
from test_sources import config, consumer, h, items  # noqa: F401 - h is the harness fixture

pytestmark = [pytest.mark.slow, pytest.mark.services]

N = 3000
NODES = 3
SLOW = '''
import time
def handle(items):
    time.sleep(0.01)  # a slow model call: the run lasts long enough to lose a node in it
    return [{"doc_id": i["doc_id"], "n": len(i["content"])} for i in items]
'''


def stored(url: str) -> list[str]:
    """Every stored key, results and dead letters, duplicates included."""
    engine = create_engine(url, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as c:
            return sorted(k for (k,) in c.execute(text(
                'SELECT "key" FROM doc_results UNION ALL SELECT "key" FROM lrq_dead_letters')))
    except SQLAlchemyError:  # the tables are not made yet
        return []
    finally:
        engine.dispose()


def start(cfg: Path, handlers: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "lrq", "-c", str(cfg), "run"],
                            cwd=cfg.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": f"{handlers}:{ROOT}"},
                            start_new_session=True)


def test_three_nodes_lose_one_and_the_survivors_finish_exactly_once(
        h: Harness, tmp_path: Path, pg_server: servers.PostgresServer) -> None:  # noqa: F811
    if h.takeover is None:
        pytest.skip(f"{h.name} has no takeover: no consumer group to scale out in")
    (tmp_path / "slow.py").write_text(SLOW)
    db = pg_server.create_database()
    url = pg_server.url(db)
    try:
        source = {**h.source_table(tmp_path), **h.takeover}
        cfgs = [config(tmp_path / f"node{i}", {**source, **consumer(h, f"node{i}")}, db_url=url,
                       handler="slow:handle", batch_size=50, chunk_size=50)
                for i in range(NODES)]
        h.add(items(0, N))
        procs = [start(cfg, tmp_path) for cfg in cfgs]
        try:
            assert poll(lambda: len(stored(url)) >= N // 5, seconds=120), "no progress"
            kill_tree(procs[0].pid)  # the machine is lost ...
            procs[0].wait(timeout=30)
            killed_at = time.monotonic()
            assert len(set(stored(url))) < N, "the run ended before the node was lost"
            shutil.rmtree(cfgs[0].parent / "data")  # ... with its disk
            done = poll(lambda: len(set(stored(url))) == N and h.unacknowledged() == 0,
                        seconds=h.takeover_seconds * 10 + 120)
            took = time.monotonic() - killed_at
            assert done, (f"after {took:.0f}s: {len(set(stored(url)))} of {N} stored, "
                          f"{h.unacknowledged()} unacknowledged")
            for p in procs[1:]:
                assert p.poll() is None, "a survivor died"
                p.send_signal(signal.SIGTERM)
            for p in procs[1:]:
                assert p.wait(timeout=60) == 0
        finally:
            for p in procs:
                with killed_on_exit(p):
                    pass
        assert stored(url) == [f"d{i:05d}" for i in range(N)]  # nothing lost, nothing twice
        assert h.unacknowledged() == 0
    finally:
        pg_server.drop_database(db)
