"""Benchmark status cost: what one ``lrq status`` look (and one ``/api/status`` or metrics
scrape built on it) costs as the ledger grows.

For each ledger size N (default ``10000,100000``; ``--quick``: ``10000``), in a fresh
folder with one queue over a 1,000-row SQLite source: N ledger rows finished a day ago plus
``--recent`` (1,000) finished now are inserted; then, ``--reps`` times each (20):

* ``finished_within``: :meth:`lrq.sink.Sink.finished_within` over the 60 s and 600 s windows
  (the rates; the ledger has no index on ``finished_at``, so this scans the queue's rows);
* ``status``: :meth:`lrq.app.App.status` whole (spool, database, source, disk), warm App.

And the one-off cost of importing ``rich`` for drawing (``python -c "import rich.live,
rich.table, rich.progress"`` against ``python -c pass``, min of ``--reps`` runs each).

Prints a table of p50/min in ms; JSON goes to ``bench/results/<timestamp>-status-cost.json``.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import run  # bench/run.py (first on sys.path): report files, machine info, tables

NAME = "status-cost"


def timed(fn: Callable[[], Any], reps: int) -> dict[str, float]:
    xs = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        xs.append((time.perf_counter() - t) * 1e3)
    return {"p50_ms": round(statistics.median(xs), 3), "min_ms": round(min(xs), 3), "n": reps}


def config(folder: Path) -> Path:
    from lrq.sample import write_documents

    write_documents(f"sqlite:///{folder / 'source.db'}", 1000)
    cfg = folder / "lrq.toml"
    cfg.write_text('data_dir = "data"\ndb_url = "sqlite:///results.db"\n[queues.docs]\n'
                   'handler = "workers.wordcount:handle"\nkey = "doc_id"\nbatch_size = 100\n'
                   'result_table = "doc_results"\n[queues.docs.source]\nurl = "sqlite:///source.db"\n'
                   'table = "source_data"\ncolumns = { id = "id", doc_id = "mid", content = "content" }\n')
    return cfg


def measure(n: int, recent: int, reps: int) -> dict[str, Any]:
    from sqlalchemy import insert

    from lrq import config as lrq_config
    from lrq import rates
    from lrq.app import App

    with tempfile.TemporaryDirectory() as tmp:
        app = App(lrq_config.load(config(Path(tmp))))
        q = app.queues()[0]
        sink = app.sink(q)
        old = datetime.utcnow() - timedelta(days=1)
        rows = [{"queue": q.name, "name": f"old-{i}", "items": 100, "results": 100, "dead": 0,
                 "attempt": 1, "finished_at": old} for i in range(n)]
        fresh = [{"queue": q.name, "name": f"new-{i}", "items": 100, "results": 100, "dead": 0,
                  "attempt": 1} for i in range(recent)]  # finished_at: the database's now()
        with sink.engine.begin() as conn:
            conn.execute(insert(sink.ledger), rows)
            conn.execute(insert(sink.ledger), fresh)
        got = sink.finished_within(rates.WINDOWS)
        if got[60] != (recent, recent * 100):
            raise RuntimeError(f"finished_within counted {got}, expected {recent} recent batches")
        app.status()  # warm: engines, reflected source table
        return {"ledger_rows": n + recent,
                "finished_within": timed(lambda: sink.finished_within(rates.WINDOWS), reps),
                "status": timed(app.status, reps)}


def import_cost(reps: int) -> dict[str, float]:
    def best(code: str) -> float:
        xs = []
        for _ in range(reps):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            xs.append(time.perf_counter() - t)
        return min(xs) * 1e3

    base = best("pass")
    with_rich = best("import rich.live, rich.table, rich.progress")
    return {"bare_ms": round(base, 1), "rich_ms": round(with_rich, 1),
            "rich_cost_ms": round(with_rich - base, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ledger", type=run.ints, default=[10_000, 100_000],
                   help="comma list of old ledger rows (default 10000,100000)")
    p.add_argument("--recent", type=int, default=1000, help="ledger rows finished now")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="10000 rows, 5 reps")
    a = p.parse_args(argv)
    if a.quick:
        a.ledger, a.reps = [10_000], 5
    stamp, report = run.new_report("benchmark", NAME, vars(a))
    for n in a.ledger:
        row = measure(n, a.recent, a.reps)
        report["results"].append(row)
        print(f"  {row['ledger_rows']:>8,} ledger rows: finished_within p50 "
              f"{row['finished_within']['p50_ms']:.1f} ms, status p50 "
              f"{row['status']['p50_ms']:.1f} ms", flush=True)
    report["import"] = import_cost(a.reps)
    rows: list[tuple[str, ...]] = [("ledger rows", "what", "p50 ms", "min ms", "n")]
    for r in report["results"]:
        for k in ("finished_within", "status"):
            rows.append((f"{r['ledger_rows']:,}", k, f"{r[k]['p50_ms']:.2f}",
                         f"{r[k]['min_ms']:.2f}", str(r[k]["n"])))
    imp = report["import"]
    lines = ["status cost against ledger size", *run._columns(rows, right={0, 2, 3, 4}), "",
             f"import rich.live, rich.table, rich.progress: {imp['rich_cost_ms']} ms over a bare "
             f"interpreter's {imp['bare_ms']} ms (min of {a.reps})"]
    run.write_report(report, stamp, NAME, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
