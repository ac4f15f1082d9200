"""A handler that kills its own worker process on one item: the batch is split until that
item is alone, it is dead-lettered with the signal or exit code, and every other item is
stored exactly once; with the scheduler, and by hand; and the split killed at each point."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from lrqtest import ROOT, lrq, write_config
from sqlalchemy import create_engine, text

from lrq.spool import Spool, State

KILLER = "m000000137"
HANDLER = '''
import os, signal
def handle(items):
    for it in items:
        if it["doc_id"] == "{killer}" and os.environ.get("LRQ_TEST_KILL", "1") == "1":
            {how}
    return [{{"doc_id": it["doc_id"], "n": len(it["content"])}} for it in items]
'''
HOW = {"segv": ("os.kill(os.getpid(), signal.SIGSEGV)", "killed by SIGSEGV (exit -11)",
                {"code": None, "signal": "SIGSEGV"}),
       "exit3": ("os._exit(3)", "exited with code 3", {"code": 3, "signal": None})}
#: ``lrq run --until-idle`` over 500 items with one killer must end within this. At most
#: 16 worker deaths (lrq.reaper.SPLIT_AFTER at each of the 7 splits of a 100-item batch and
#: on the item alone), each costing a worker start and the handler up to the item: the
#: whole run took 1.3 s here.
BOUND = 120


def killer_config(tmp_path: Path, how: str, **keys) -> Path:
    (tmp_path / "killer.py").write_text(HANDLER.format(killer=KILLER, how=HOW[how][0]))
    return write_config(tmp_path, handler="killer:handle", **keys)


def status(cfg: Path) -> dict:
    return json.loads(lrq("-c", str(cfg), "status", "--json", check=True).stdout)["queues"]["docs"]


def rows(tmp_path: Path, sql: str) -> list:
    with create_engine(f"sqlite:///{tmp_path / 'results.db'}").connect() as c:
        return list(c.execute(text(sql)))


def assert_all_once(tmp_path: Path, cfg: Path, docs: int, dead: int) -> None:
    v = lrq("-c", str(cfg), "verify")
    assert v.returncode == 0, v.stdout
    assert (f"source {docs}, results {docs - dead}, dead letters {dead}, missing 0, "
            "duplicated 0, not in source 0, failed batches 0") in v.stdout
    ((stored, distinct),) = rows(tmp_path, "SELECT count(*), count(DISTINCT key) FROM doc_results")
    assert stored == distinct == docs - dead
    st = status(cfg)
    assert (st["pending"], st["claimed"], st["failed"]) == (0, 0, 0)
    assert st["ledger_items"] == docs  # every item in exactly one batch of the ledger


@pytest.mark.parametrize("how", ["segv", "exit3"])
def test_run_until_idle_dead_letters_the_item_that_kills_its_worker(tmp_path: Path,
                                                                    how: str) -> None:
    cfg = killer_config(tmp_path, how, docs=500, batch_size=100, chunk_size=10, workers=2)
    p = subprocess.run([sys.executable, "-m", "lrq", "-c", str(cfg), "run", "--until-idle"],
                       cwd=ROOT, capture_output=True, text=True, timeout=BOUND)
    assert "idle: sources drained" in p.stderr, p.stderr[-3000:]
    assert "split queue=docs" in p.stderr
    assert 4 <= p.stderr.count("worker-exit queue=docs") <= 16  # see BOUND
    assert_all_once(tmp_path, cfg, 500, dead=1)
    ((key, batch, error),) = rows(tmp_path, "SELECT key, batch, error FROM lrq_dead_letters")
    assert key == KILLER
    assert error == f"worker {HOW[how][1]} handling this item, 2 times"
    shown = json.loads(lrq("-c", str(cfg), "show", batch, check=True).stdout)
    assert shown["state"] == "done" and shown["keys"] == [KILLER]
    assert [h["exit"] for h in shown["attempts"]["history"]] == [HOW[how][2]] * 2


def test_a_by_hand_worker_s_deaths_read_exit_unknown_and_cleanup_isolates_the_item(
        tmp_path: Path) -> None:
    cfg = killer_config(tmp_path, "segv", docs=160, batch_size=8, chunk_size=2)
    lrq("-c", str(cfg), "sniff", check=True)
    splits = 0
    for _ in range(40):  # 8 items: two deaths at each of 3 splits, two on the item alone
        w = lrq("-c", str(cfg), "work", "--burst")
        if w.returncode == 0:
            break
        assert w.returncode == -signal.SIGSEGV, w.stderr
        report = lrq("-c", str(cfg), "cleanup", "--json", check=True).stdout
        splits += len(json.loads(report[:report.rindex("]") + 1])[0]["split"])
    else:
        pytest.fail("the worker kept dying")
    assert splits >= 3  # more when a batch committing behind died with the killer's
    assert_all_once(tmp_path, cfg, 160, dead=1)
    ((error, batch),) = rows(tmp_path, "SELECT error, batch FROM lrq_dead_letters")
    assert error == "worker died (exit unknown) handling this item, 2 times"
    shown = json.loads(lrq("-c", str(cfg), "show", batch, check=True).stdout)
    assert [h["exit"] for h in shown["attempts"]["history"]] == [{"code": None, "signal": None}] * 2


@pytest.mark.parametrize("point", ["split-after-half-0", "split-after-half-1",
                                   "split-after-retire"])
def test_a_split_killed_at_each_point_loses_nothing_and_stores_nothing_twice(
        tmp_path: Path, point: str) -> None:
    cfg = killer_config(tmp_path, "segv", docs=200, batch_size=100, chunk_size=10)
    lrq("-c", str(cfg), "sniff", check=True)
    sp = Spool(tmp_path / "data", "docs")
    (name,) = [n for n in sp.pending() if KILLER in {i["doc_id"] for i in sp.load(n).items}]
    for death in (1, 2):
        w = lrq("-c", str(cfg), "work", "--batch", name)
        assert w.returncode == -signal.SIGSEGV, w.stderr
        if death == 1:
            assert "reclaim 1 stale claims" in lrq("-c", str(cfg), "cleanup", check=True).stdout
    r = lrq("-c", str(cfg), "cleanup", env={"LRQ_FAILPOINT": point})
    assert r.returncode == -signal.SIGKILL, f"{point} was not reached: {r.stderr}"
    assert sp.state(name) is State.CLAIMED  # by the dead reaper
    r = lrq("-c", str(cfg), "cleanup", check=True)  # its death: split (again)
    assert "split 1 batches" in r.stdout or point == "split-after-retire", r.stdout
    assert sp.state(name) is State.MISSING and len(sp.pending()) == 3
    assert not list(sp.right.iterdir()) and not list(sp.tmp.iterdir())
    items = sorted(i["doc_id"] for n in sp.pending() for i in sp.load(n).items)
    assert items == [f"m{i:09d}" for i in range(1, 201)]  # each item in exactly one batch
    lrq("-c", str(cfg), "work", "--burst", env={"LRQ_TEST_KILL": "0"}, check=True)
    assert_all_once(tmp_path, cfg, 200, dead=0)
