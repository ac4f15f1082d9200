"""Batch rules with real processes over a real SQLite source: ``lrq run --until-idle``,
``lrq sniff --once`` ending a tick between the pieces of a fetch, and a SIGKILLed scheduler.
Every batch file keeps the rules, every document is stored exactly once, and the saved
position never passes a document that is not in a batch file."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from lrqtest import ROOT, kill_tree, killed_on_exit, load_app, lrq, poll, write_config

from lrq.batching import item_size
from lrq.sources import sqlite_broker
from lrq.spool import SUFFIX

#: The storage service's rule on the sample documents: kind = id % 3; kinds 1 and 2 apart.
RULES = '''
def kind(item):
    return item["id"] % 3

def apart(batch_so_far, item):
    k = kind(item)
    return k in (1, 2) and any(kind(o) == 3 - k for o in batch_so_far)
'''

SLOW = '''
import time
def handle(items):
    time.sleep(0.01)
    return [{"doc_id": i["doc_id"], "n": len(i["content"])} for i in items]
'''

LIMIT = 1200  # bytes: three or four sample documents (~300 bytes each)


def config(tmp_path: Path, docs: int, **keys: Any) -> Path:
    (tmp_path / "rules.py").write_text(RULES)  # imported from the config's folder
    return write_config(tmp_path, docs=docs, batch_size=5, chunk_size=5, separate="rules:apart",
                        batch_max_bytes="1.2KB", **keys)


def status(cfg: Path) -> dict:
    return json.loads(lrq("-c", str(cfg), "status", "--json", check=True).stdout)["queues"]["docs"]


def files(cfg: Path) -> dict[str, list[dict[str, Any]]]:
    """Every batch file of queue "docs" (pending, claimed, done, failed): name -> items."""
    app = load_app(cfg)
    sp = app.spool(app.queues("docs")[0])
    names = {p.name[:-len(SUFFIX)] for folder in (sp.left, sp.done, sp.failed)
             for p in folder.glob(f"*{SUFFIX}")}
    return {n: sp.load(n).items for n in sorted(names)}


def assert_rules_kept(batches: dict[str, list[dict[str, Any]]]) -> None:
    for name, items in batches.items():
        kinds = {i["id"] % 3 for i in items}
        assert 1 <= len(items) <= 5, name
        assert not {1, 2} <= kinds, f"{name} holds kinds 1 and 2: {[i['id'] for i in items]}"
        assert len(items) == 1 or sum(item_size(i) for i in items) <= LIMIT, name


def assert_exactly_once(cfg: Path, docs: int) -> None:
    v = lrq("-c", str(cfg), "verify")
    assert v.returncode == 0, v.stdout
    assert f"source {docs}, results {docs}, dead letters 0, missing 0, duplicated 0" in v.stdout


def test_run_until_idle_keeps_the_rules_and_stores_each_document_once(tmp_path: Path) -> None:
    cfg = config(tmp_path, 600, batch_linger="0.3s")
    p = subprocess.run([sys.executable, "-m", "lrq", "-c", str(cfg), "run", "--until-idle"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert_exactly_once(cfg, 600)
    batches = files(cfg)
    assert_rules_kept(batches)
    ids = sorted(i["id"] for items in batches.values() for i in items)
    assert ids == list(range(1, 601)), "a document was cut twice or lost"
    assert len(batches) > 600 / 5 * 1.5, "the rules never cut a fetch"
    assert status(cfg)["position"] == 600


def test_a_commit_acked_source_keeps_receipts_with_their_items(tmp_path: Path) -> None:
    """sqlite-broker (acknowledged at commit) through ``lrq run --until-idle``: every batch
    file's receipts are its items' entries, and every entry is stored and acknowledged."""
    kinds = [(i * 7) % 5 % 3 for i in range(500)]  # 0, 1, 2 mixed; 1 and 2 must stay apart
    sqlite_broker.add(str(tmp_path / "broker.db"),
                      [{"id": i + 1, "kind": k} for i, k in enumerate(kinds)])
    cfg = tmp_path / "lrq.toml"
    cfg.write_text(
        'data_dir = "data"\ndb_url = "sqlite:///results.db"\ninterval = 0.2\n'
        '[queues.docs]\nhandler = "workers.storage:handle"\nkey = "id"\n'
        'result_table = "stored"\nbatch_size = 5\nseparate = "workers.storage:apart"\n'
        'batch_linger = "0.2s"\nmax_pending = 1000\n'
        '[queues.docs.source]\nkind = "sqlite-broker"\npath = "broker.db"\n')
    p = subprocess.run([sys.executable, "-m", "lrq", "-c", str(cfg), "run", "--until-idle"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    app = load_app(cfg)
    sp = app.spool(app.queues("docs")[0])
    seen: list[int] = []
    for path in sp.done.glob(f"*{SUFFIX}"):
        batch = sp.load(path.name[:-len(SUFFIX)])
        assert batch.receipts == [i["id"] for i in batch.items]  # entry id == item id
        assert 1 <= len(batch.items) <= 5 and not {1, 2} <= {i["kind"] for i in batch.items}
        seen += batch.receipts
    assert sorted(seen) == list(range(1, 501))
    assert len(list(sp.done.glob(f"*{SUFFIX}"))) > 500 / 5, "the rule never cut a fetch"
    with sqlite3.connect(tmp_path / "broker.db") as db:
        assert db.execute("SELECT count(*) FROM entries WHERE acked = 0").fetchone() == (0,)
    with sqlite3.connect(tmp_path / "results.db") as db:
        assert db.execute("SELECT count(DISTINCT key), count(*) FROM stored").fetchone() == (500, 500)


def test_a_tick_ending_between_the_pieces_of_a_fetch_saves_no_position(tmp_path: Path) -> None:
    cfg = config(tmp_path, 100, max_pending=1000)
    r = lrq("-c", str(cfg), "sniff", "--once", check=True)
    assert "published 1 batches" in r.stdout
    st = status(cfg)
    assert st["pending"] == 1
    # The first fetch (5 documents) was cut: the rest died with the process, unpublished, so
    # the position must not have moved past them.
    (items,) = files(cfg).values()
    assert len(items) < 5 and st["position"] is None
    lrq("-c", str(cfg), "sniff", check=True)
    assert status(cfg)["position"] == 100
    batches = files(cfg)
    assert_rules_kept(batches)
    assert {i["id"] for b in batches.values() for i in b} == set(range(1, 101))
    lrq("-c", str(cfg), "work", "--burst", check=True)
    assert_exactly_once(cfg, 100)  # the first piece, published twice, was absorbed


@pytest.mark.slow
def test_a_sigkilled_scheduler_loses_nothing_and_its_position_is_covered(tmp_path: Path) -> None:
    (tmp_path / "slowrules.py").write_text(SLOW)
    cfg = config(tmp_path, 2000, handler="slowrules:handle", batch_linger="0.2s", max_pending=20)
    run = subprocess.Popen([sys.executable, "-m", "lrq", "-c", str(cfg), "run"], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with killed_on_exit(run):
        assert poll(lambda: status(cfg)["done"] >= 30, seconds=120)
        kill_tree(run.pid)
        run.wait(timeout=30)
    st = status(cfg)
    assert st["position"] is not None and st["position"] < 2000, "killed too late to test"
    on_disk = {i["id"] for b in files(cfg).values() for i in b}
    assert set(range(1, st["position"] + 1)) <= on_disk, "the position passed unpublished items"
    p = subprocess.run([sys.executable, "-m", "lrq", "-c", str(cfg), "run", "--until-idle"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert_exactly_once(cfg, 2000)
    assert_rules_kept(files(cfg))
