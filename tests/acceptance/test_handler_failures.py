"""Handlers that fail, as users meet them: real ``lrq run --until-idle`` / ``lrq work --burst``
subprocesses, each bounded by a subprocess timeout, then the invariants on disk and in the
database (``lrq verify``, ``lrq status``, the dead-letter table)."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from lrqtest import ROOT, load_app, lrq, write_config

POISON = '''
def handle(items):
    out = []
    for it in items:
        if it["id"] % 100 == 37:
            raise ValueError(f"cannot map document {it['id']}")
        out.append({"doc_id": it["doc_id"], "n": len(it["content"])})
    return out
'''
BROKEN = '''
def handle(items):
    return [{"doc_id": it["doc_id"], "n": it["missing_field"]} for it in items]
'''
HUNG = '''
import time
def handle(items):
    time.sleep(600)  # a service that never answers
    return []
'''
SWALLOW = '''
import time
def handle(items):
    while True:
        try:
            time.sleep(600)
        except BaseException:  # catches HandlerTimeout too, and keeps waiting
            pass
'''
BROKEN_EXIT = 4


def setup(tmp_path: Path, handler: str, docs: int = 2000, **keys: object) -> Path:
    (tmp_path / "h.py").write_text(handler)
    return write_config(tmp_path, docs=docs, batch_size=200, chunk_size=50, workers=2,
                        handler="h:handle", **keys)


def run(cfg: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``lrq -c CFG ARGS`` as a subprocess: the timeout is the bound under test."""
    return subprocess.run([sys.executable, "-m", "lrq", "-c", str(cfg), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def status(cfg: Path) -> dict:
    return json.loads(lrq("-c", str(cfg), "status", "--json", check=True).stdout)["queues"]["docs"]


def test_one_percent_poison_ends_with_exactly_the_poison_dead_lettered(tmp_path: Path) -> None:
    cfg = setup(tmp_path, POISON)
    p = run(cfg, "run", "--until-idle", timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    v = lrq("-c", str(cfg), "verify")
    assert v.returncode == 0, v.stdout
    assert "source 2000, results 1980, dead letters 20, missing 0, duplicated 0" in v.stdout
    with sqlite3.connect(tmp_path / "source.db") as c:
        poison = {m for (m,) in c.execute("SELECT mid FROM source_data WHERE id % 100 = 37")}
    app = load_app(cfg)
    dead = app.sink(app.queues("docs")[0]).dead_letters()
    assert {d["key"] for d in dead} == poison and len(dead) == 20
    assert all("ValueError: cannot map document" in d["error"] for d in dead)
    assert "handler-broken" not in p.stderr and "retry queue" not in p.stderr


def test_a_handler_raising_on_everything_stops_the_run_and_dead_letters_nothing(
        tmp_path: Path) -> None:
    cfg = setup(tmp_path, BROKEN)
    p = run(cfg, "run", "--until-idle", timeout=120)
    assert p.returncode == BROKEN_EXIT, p.stderr[-3000:]
    assert "handler-broken queue=docs" in p.stderr and "KeyError: 'missing_field'" in p.stderr
    assert "stopping: queue docs cannot work (handler-broken" in p.stderr
    st = status(cfg)
    assert st["failed"] in (1, 2) and st["claimed"] == 0 and st["dead_letters"] == 0
    assert st["pending"] + st["failed"] == 10  # the rest waits for the fix
    v = lrq("-c", str(cfg), "verify")
    assert "results 0, dead letters 0" in v.stdout and f"failed batches {st['failed']}" in v.stdout
    # lrq work --burst on the same: one batch more in failed/, exit 4, one clear line.
    w = run(cfg, "work", "docs", "--burst", timeout=120)
    assert w.returncode == BROKEN_EXIT and w.stderr.count("handler-broken") == 1
    assert status(cfg)["failed"] == st["failed"] + 1


def test_a_hung_service_ends_the_run_in_bounded_time(tmp_path: Path) -> None:
    """handler_timeout 1 s, retries 2, backoff 0.5: a batch's verdict takes (1 + 2) + 2 + 1
    calls of 1 s plus 1.5 s of backoff; the run ends with exit 4, nothing stored twice or
    dead-lettered, every batch pending or failed."""
    cfg = setup(tmp_path, HUNG, docs=1000, handler_timeout=1)
    p = run(cfg, "run", "--until-idle", timeout=120)
    assert p.returncode == BROKEN_EXIT, p.stderr[-3000:]
    assert "ran past handler_timeout" in p.stderr and "handler-broken queue=docs" in p.stderr
    st = status(cfg)
    assert st["claimed"] == 0 and st["dead_letters"] == 0 and st["pending"] + st["failed"] == 5


def test_a_handler_swallowing_the_timeout_ends_its_process_and_the_reaper_takes_it_back(
        tmp_path: Path) -> None:
    """handler_timeout 1 s, lease 4 s: the call is overrun 1 + 5 s after it starts, seen
    within a beat (1 s); the process exits 1, its claim goes back to pending, counted."""
    cfg = setup(tmp_path, SWALLOW, docs=200, handler_timeout=1, lease=4)
    assert lrq("-c", str(cfg), "sniff").returncode == 0
    w = run(cfg, "work", "docs", "--burst", timeout=60)
    assert w.returncode == 1, w.stderr[-3000:]
    assert "batch-overrun queue=docs" in w.stderr
    assert status(cfg)["claimed"] == 1
    assert lrq("-c", str(cfg), "cleanup").returncode == 0
    st = status(cfg)
    assert (st["claimed"], st["pending"], st["ledger_items"]) == (0, 1, 0)
    app = load_app(cfg)
    spool = app.spool(app.queues("docs")[0])
    assert spool.attempts(spool.pending()[0])["attempts"] == 1
