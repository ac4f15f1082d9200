"""The related system's validation run, on its own design (``kind = "redis-list"``): insert
0..N, fail every second item once (a transient error, as a flaky model service gives), and
check that all N come out exactly once and the list holds nothing, taken or not."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from harness_redis_list import RedisListHarness
from lrqtest import lrq
from test_sources import config, stored

N = 1000

FLAKY = '''
import os
from pathlib import Path

SEEN = Path(os.environ["FLAKY_SEEN"])


def handle(items):
    for it in items:
        if it["id"] % 2 and _first_sight(it["id"]):
            raise ConnectionError(f"model service reset the connection on item {it['id']}")
    return [{"doc_id": it["doc_id"], "n": len(it["content"])} for it in items]


def _first_sight(i):
    """True once per item, across retries and processes (an exclusive create)."""
    try:
        os.close(os.open(SEEN / str(i), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False
'''


@pytest.mark.slow
def test_every_second_item_failing_once_all_n_come_out_exactly_once(tmp_path: Path) -> None:
    h = RedisListHarness()
    try:
        (tmp_path / "flaky.py").write_text(FLAKY)
        (tmp_path / "seen").mkdir()
        cfg = config(tmp_path / "node", h.source_table(tmp_path), handler="flaky:handle",
                     batch_size=50, chunk_size=10, backoff=0.01)
        h.add([{"id": i, "doc_id": f"d{i:05d}", "content": f"item {i}"} for i in range(N)])
        env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "FLAKY_SEEN": str(tmp_path / "seen")}
        r = lrq("-c", str(cfg), "run", "--until-idle", env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert len(os.listdir(tmp_path / "seen")) == N // 2  # every odd item failed once
        assert stored(tmp_path / "node/results.db") == [f"d{i:05d}" for i in range(N)]
        assert h.unacknowledged() == 0
        v = lrq("-c", str(cfg), "verify", env=env)
        assert v.returncode == 0 and "dead letters 0" in v.stdout, v.stdout
    finally:
        h.close()
