"""Benchmark a fan-out commit against a single-handler one: CPU of the committing thread per
batch on SQLite, as ratios against the single-handler store measured in the same run.

Cases (batch of ``--size`` W1-shaped results, into fresh SQLite files):

* ``single``: a queue with one ``handler`` (``Sink.store``: the baseline);
* ``fanout-1``: a queue with one output, the same rows (``Sink.store_outputs``: the
  ledger row, the output's rows in a SAVEPOINT);
* ``fanout-2``: two outputs of the same rows (twice the rows);
* ``aggregate``: one aggregating output, the batch's rows merged into 10 keys that every
  batch adds to (SELECT ... FOR UPDATE, UPDATE, INSERT).

    .venv/bin/python bench/fanout_cost.py            # 5 repeats, median
    .venv/bin/python bench/fanout_cost.py --quick
"""
from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from typing import Any


def results(batch: int, n: int) -> list[dict[str, Any]]:
    return [{"doc_id": f"doc-{batch}-{i}", "words": 40,
             "sha1": hashlib.sha1(f"{batch}-{i}".encode()).hexdigest()} for i in range(n)]


def windows(batch: int, n: int) -> list[dict[str, Any]]:
    return [{"window": f"w{i % 10}", "requests": 1, "bytes": 100 + i} for i in range(n)]


def one_run(case: str, size: int, stores: int, warm: int) -> float:
    """CPU ms per store for ``case``."""
    from lrq.config import OutputConfig, QueueConfig, SourceConfig
    from lrq.db import make_engine
    from lrq.sink import Sink
    from lrq.sources import sql

    src = SourceConfig("sql", sql.Settings(url="sqlite:///unused.db", table="source_data"))
    outs: tuple[OutputConfig, ...] = ()
    if case == "fanout-1":
        outs = (OutputConfig("a", "m:f", result_table="res_a"),)
    elif case == "fanout-2":
        outs = (OutputConfig("a", "m:f", result_table="res_a"),
                OutputConfig("b", "m:f", result_table="res_b"))
    elif case == "aggregate":
        outs = (OutputConfig("w", "m:f", result_table="res_w", aggregate=True, key="window"),)
    with tempfile.TemporaryDirectory(prefix="lrq-bench-fanout-") as d:
        engine = make_engine(f"sqlite:///{d}/results.db")
        try:
            queue = QueueConfig(name="docs", handler="m:f" if not outs else "", key="doc_id",
                                result_table="doc_results", source=src, outputs=outs)
            sink = Sink(engine, queue).prepare()
            spent = 0.0
            for b in range(warm + stores):
                rows = windows(b, size) if case == "aggregate" else results(b, size)
                t0 = time.thread_time()
                if case == "single":
                    sink.store(f"b{b}", size, rows)
                else:
                    sink.store_outputs(f"b{b}", size, {o.name: (rows, []) for o in outs})
                if b >= warm:
                    spent += time.thread_time() - t0
            return spent / stores * 1000
        finally:
            engine.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--stores", type=int, default=300)
    ap.add_argument("--warm", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.stores, a.repeat = 100, 3
    cases = ["single", "fanout-1", "fanout-2", "aggregate"]
    got: dict[str, list[float]] = {c: [] for c in cases}
    for _ in range(a.repeat):  # interleaved, so a noisy neighbour hits every case alike
        for c in cases:
            got[c].append(one_run(c, a.size, a.stores, a.warm))
    base = statistics.median(got["single"])
    print(f"batch {a.size}, {a.stores} stores x {a.repeat} repeats, CPU ms per store (median)")
    for c in cases:
        m = statistics.median(got[c])
        print(f"  {c:10s} {m:7.3f} ms   {m / base:5.2f}x single")


if __name__ == "__main__":
    main()
