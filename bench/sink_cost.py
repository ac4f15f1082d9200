"""Benchmark one worker commit: CPU and statements of ``Sink.store`` on SQLite, per batch.

The results are W1's (``workers.wordcount``: ``doc_id``, ``words``, ``sha1``) into the
generic table, as ``lrq work`` stores them on the default settings. For each batch size a
fresh SQLite file (WAL, as :func:`lrq.db.make_engine` opens it) takes ``--warm`` batches,
then ``--stores`` more, timed with ``time.thread_time`` (the committing thread's CPU: the
driver's work, the commit and SQLAlchemy around them); repeated ``--repeat`` times, the
median is printed. Statements are counted as the database got them, over one more batch
after the clock (``BEGIN`` and ``COMMIT`` not counted; ``statements_sent`` of
tests/lrqtest.py: SQLite's trace callback, as lrq's commit there bypasses SQLAlchemy's events).

Old against new in one session: the ``lrq`` package imported is whichever comes first on
``sys.path``, and the table names it, so::

    .venv/bin/python bench/sink_cost.py                          # this checkout
    PYTHONPATH=/work/main .venv/bin/python bench/sink_cost.py    # another one
"""
from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from lrqtest import statements_sent  # noqa: E402

EXAMPLES = """\
examples:
  python bench/sink_cost.py                       batch 100 and 1000, 5 repeats
  python bench/sink_cost.py --quick               fewer stores, 3 repeats
  PYTHONPATH=../main python bench/sink_cost.py    the same against another checkout
"""


def results(batch: int, n: int) -> list[dict[str, Any]]:
    """``n`` results shaped like W1's handler output, keys unique to ``batch``."""
    return [{"doc_id": f"doc-{batch}-{i}", "words": 40,
             "sha1": hashlib.sha1(f"{batch}-{i}".encode()).hexdigest()} for i in range(n)]


def one_run(size: int, stores: int, warm: int, tmp: str | None) -> tuple[float, float]:
    """(CPU ms per store, statements per store) over ``stores`` batches of ``size``."""
    from lrq.config import QueueConfig, SourceConfig
    from lrq.db import make_engine
    from lrq.sink import Sink
    from lrq.sources import sql

    with tempfile.TemporaryDirectory(prefix="lrq-bench-sink-", dir=tmp) as d:
        engine = make_engine(f"sqlite:///{d}/results.db")
        try:
            queue = QueueConfig(name="docs", handler="workers.wordcount:handle", key="doc_id",
                                result_table="doc_results", batch_size=size, chunk_size=size,
                                source=SourceConfig("sql", sql.Settings(url="sqlite:///unused.db",
                                                    table="source_data")))
            sink = Sink(engine, queue).prepare()
            batches = [results(b, size) for b in range(warm + stores)]
            for b in range(warm):
                sink.store(f"warm-{b}", size, batches[b])
            t0 = time.thread_time()
            for b in range(warm, warm + stores):
                if not sink.store(f"b-{b}", size, batches[b]).recorded:
                    raise SystemExit(f"batch b-{b} was not recorded")
            cpu = time.thread_time() - t0
            if sink.count() != (warm + stores) * size:
                raise SystemExit(f"stored {sink.count()} rows, expected {(warm + stores) * size}")
            with statements_sent(engine) as sent:  # one more batch, untimed
                sink.store("counted", size, results(warm + stores, size))
            statements = sum(not sql.lstrip().upper().startswith(("BEGIN", "COMMIT"))
                             for sql in sent)
        finally:
            engine.dispose()
    return cpu / stores * 1e3, statements


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", default="100,1000", help="results per batch, comma-separated")
    p.add_argument("--stores", type=int, default=100_000,
                   help="results stored per run and batch size (default 100000)")
    p.add_argument("--warm", type=int, default=20, help="batches stored before the clock")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="20000 results a run, 3 repeats")
    p.add_argument("--tmp", help="folder for the SQLite files (default: the system's)")
    a = p.parse_args(argv)
    if a.quick:
        a.stores, a.repeat = 20_000, 3
    import lrq

    print(f"lrq from {Path(lrq.__file__).parent}")
    print(f"{'batch':>6} {'stores':>7} {'statements':>10} {'CPU ms/store, median':>21}  runs")
    for size in (int(s) for s in a.batch.split(",")):
        stores = max(a.stores // size, 1)
        runs = [one_run(size, stores, a.warm, a.tmp) for _ in range(a.repeat)]
        cpu = [r[0] for r in runs]
        print(f"{size:>6} {stores:>7} {runs[0][1]:>10.1f} {statistics.median(cpu):>21.3f}  "
              f"{' '.join(f'{c:.3f}' for c in cpu)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
