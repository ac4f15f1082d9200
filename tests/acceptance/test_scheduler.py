"""The scheduler as users run it: a subprocess, stopped by idleness or by signals."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from lrqtest import ROOT, killed_on_exit, lrq, poll, write_config
from sqlalchemy import create_engine, text

SLOW = '''
import time
def handle(items):
    time.sleep(0.05)  # a slow model call
    return [{"doc_id": i["doc_id"], "n": len(i["content"])} for i in items]
'''


def status(cfg: Path) -> dict:
    return json.loads(lrq("-c", str(cfg), "status", "--json", check=True).stdout)["queues"]["docs"]


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "lrq", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_run_until_idle_stores_20k_documents_exactly_once(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, docs=20_000, batch_size=200, chunk_size=50, workers=2)
    p = subprocess.run([sys.executable, "-m", "lrq", "-c", str(cfg), "run", "--until-idle"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "idle: sources drained" in p.stderr
    pids = {line.split("[docs ")[1].split("]")[0] for line in p.stderr.splitlines() if "[docs " in line}
    assert len(pids) >= 2, "expected at least two worker processes"
    v = lrq("-c", str(cfg), "verify")
    assert v.returncode == 0, v.stdout
    assert "source 20000, results 20000, dead letters 0, missing 0, duplicated 0" in v.stdout
    st = status(cfg)
    assert (st["pending"], st["claimed"], st["done"], st["failed"]) == (0, 0, 100, 0)
    with create_engine(f"sqlite:///{tmp_path / 'results.db'}").connect() as c:
        assert c.execute(text("SELECT count(DISTINCT key) FROM doc_results")).scalar_one() == 20_000
    log = (tmp_path / "data" / "lrq.log").read_text()
    assert "started" in log and "stopped" in log and "done queue=docs" in log


def test_scheduler_py_is_lrq_run(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, docs=300)
    p = subprocess.run([sys.executable, "scheduler.py", "-c", str(cfg), "--until-idle"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert lrq("-c", str(cfg), "verify").returncode == 0


def test_second_scheduler_refuses_and_sigterm_stops_cleanly(tmp_path: Path) -> None:
    (tmp_path / "slow.py").write_text(SLOW)
    cfg = write_config(tmp_path, docs=3000, batch_size=100, chunk_size=10, handler="slow:handle")
    with killed_on_exit(spawn("-c", str(cfg), "run")) as first:
        assert poll(lambda: status(cfg)["done"] >= 2, seconds=60)
        second = lrq("-c", str(cfg), "run", timeout=60)
        assert second.returncode == 3 and "already running" in second.stderr
        assert second.stderr.count("\n") == 1
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0
    st = status(cfg)
    assert st["claimed"] == 0, "a stopped worker left a claim behind"
    assert 2 <= st["done"] < 30
    # Restarting picks up where it stopped; nothing lost, nothing doubled.
    p = subprocess.run([sys.executable, "-m", "lrq", "-c", str(cfg), "run", "--until-idle"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    v = lrq("-c", str(cfg), "verify")
    assert v.returncode == 0, v.stdout


def test_manual_worker_sigterm_finishes_its_batch_and_exits_0(tmp_path: Path) -> None:
    (tmp_path / "slow.py").write_text(SLOW)
    cfg = write_config(tmp_path, docs=2000, batch_size=100, chunk_size=10, handler="slow:handle")
    lrq("-c", str(cfg), "sniff", check=True)
    with killed_on_exit(spawn("-c", str(cfg), "work", "--burst")) as w:
        assert poll(lambda: status(cfg)["done"] >= 1, seconds=60)
        w.send_signal(signal.SIGTERM)
        assert w.wait(timeout=60) == 0
    st = status(cfg)
    assert st["claimed"] == 0 and st["pending"] > 0 and st["done"] + st["pending"] == 20


def run_until_idle(cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lrq", "-c", str(cfg), "run", "--until-idle"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_run_until_idle_exits_1_and_says_how_many_batches_failed(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, docs=300, batch_size=100)
    with create_engine(f"sqlite:///{tmp_path / 'source.db'}").begin() as c:
        c.execute(text("UPDATE source_data SET mid = 'm' || (id % 28)"))  # every batch fails
    p = run_until_idle(cfg)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "idle: sources drained" in p.stderr
    (line,) = [x for x in p.stderr.splitlines() if "stopped-with-failures" in x]
    assert "failed=3 quarantined=0 earlier=0 queues=docs: see `lrq status` and `lrq show NAME`" \
        in line
    assert status(cfg)["failed"] == 3


def test_run_until_idle_counts_quarantined_batches_of_this_run_only(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, docs=300, batch_size=100)
    lrq("-c", str(cfg), "sniff", check=True)
    first = sorted((tmp_path / "data/docs/left").glob("*.pkl"))[0]
    first.write_bytes(first.read_bytes()[:-20])  # its signature no longer matches
    p = run_until_idle(cfg)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "stopped-with-failures failed=0 quarantined=1 earlier=0" in p.stderr
    # A second run finds the quarantined batch already set aside: not this run's failure.
    again = run_until_idle(cfg)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stopped-with-failures" not in again.stderr
    assert status(cfg)["quarantined"] == 1


def test_worker_processes_remove_their_owner_files_when_they_exit(tmp_path: Path) -> None:
    """A scheduler's worker processes end without exit handlers (multiprocessing): each
    removes its owner file itself, so none is left for cleanup to sweep or the budget to
    count."""
    cfg = write_config(tmp_path, docs=200, batch_size=20)
    r = lrq("-c", str(cfg), "run", "--until-idle", timeout=120)
    assert r.returncode == 0, r.stderr
    owners = tmp_path / "data" / "docs" / "owners"
    assert poll(lambda: not any(owners.iterdir()), seconds=30), list(owners.iterdir())
