"""Fan-out crash test: a real worker process SIGKILLed between two outputs' inserts
(``LRQ_FAILPOINT=between-outputs``). Either all of a batch's outputs are stored or none;
after the reaper and another worker, every output is exact (each item once, stored or
dead-lettered) and the aggregating output's sums equal a direct computation."""
from __future__ import annotations

import json
import shutil
import signal
import sqlite3
from pathlib import Path
from typing import Any

import fanout_handlers as fh
import pytest
from lrqtest import ROOT, lrq, write_config

from lrq.sample import documents

DOCS = 200
OUTPUTS = {
    "words": {"handler": "fanout_handlers:words", "result_table": "doc_words"},
    "picky": {"handler": "fanout_handlers:picky", "result_table": "doc_picky"},
    "totals": {"handler": "fanout_handlers:totals", "result_table": "doc_totals",
               "aggregate": True, "key": "bucket"},
}


def counts(tmp_path: Path) -> dict[str, int]:
    with sqlite3.connect(tmp_path / "results.db") as db:
        return {t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                for t in ("lrq_batches", "doc_words", "doc_picky", "doc_totals",
                          "lrq_dead_letters")}


def totals(tmp_path: Path) -> dict[str, dict[str, Any]]:
    with sqlite3.connect(tmp_path / "results.db") as db:
        return {k: {f: json.loads(v)[f] for f in ("docs", "words")}
                for k, v in db.execute("SELECT key, value FROM doc_totals")}


def direct_totals() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for d in documents(DOCS, 40, 1, 1):
        item = {"doc_id": d["mid"]}
        if fh.number(item) in fh.TOTALS_BAD:
            continue
        r = out.setdefault(fh.bucket_of(item), {"docs": 0, "words": 0})
        r["docs"] += 1
        r["words"] += len(d["content"].split())
    return out


@pytest.mark.parametrize("done_before", [0, 1])
def test_killed_between_outputs_stores_all_or_none(tmp_path: Path, done_before: int) -> None:
    shutil.copy(ROOT / "tests" / "fanout_handlers.py", tmp_path / "fanout_handlers.py")
    cfg = write_config(tmp_path, docs=DOCS, batch_size=50, chunk_size=10, handler=None,
                       result_table=None, backoff=0, retries=0, outputs=OUTPUTS)
    c = ["-c", str(cfg)]
    lrq(*c, "sniff", check=True)
    for _ in range(done_before):
        lrq(*c, "work", "--once", check=True)

    r = lrq(*c, "work", "--once", env={"LRQ_FAILPOINT": "between-outputs"})
    assert r.returncode == -signal.SIGKILL, f"between-outputs was not reached:\n{r.stderr}"
    # The first output's insert died with its transaction: nothing of the killed batch.
    got = counts(tmp_path)
    assert got["lrq_batches"] == done_before
    assert got["doc_words"] == 50 * done_before and got["doc_picky"] <= got["doc_words"]
    assert (got["doc_totals"] > 0) == (done_before > 0)

    assert "reclaim 1 stale claims" in lrq(*c, "cleanup", check=True).stdout
    lrq(*c, "work", "--burst", check=True)

    v = json.loads(lrq(*c, "verify", "docs", "--json", check=True).stdout)
    assert v["ok"] and v["source"] == DOCS and v["missing"] == 0 and v["duplicated"] == 0
    assert {n: (o["results"], o["dead"], o["ok"]) for n, o in v["outputs"].items()} == {
        "words": (DOCS, 0, True), "picky": (DOCS - 2, 2, True), "totals": (3, 1, True)}
    assert totals(tmp_path) == direct_totals()  # each batch added exactly once
    assert counts(tmp_path)["lrq_batches"] == DOCS // 50
