"""Benchmark W1 with 1% poison: lrq with a handler that raises on 1% of the documents,
against the same run without poison, one after the other in the same invocation.

Both runs: the W1 source (``bench/run.py``), batch 200, chunk 50, ``workers = 2``, every
other setting at lrq's default (``max_pending``, ``retries``, ``backoff``,
``handler_timeout`` ...). Clean: ``workers.wordcount:handle``. Poison: ``workers.poison:handle``,
the same work, raising ``ValueError`` for every document whose ``id`` is 37 mod 100.
Each is ``lrq run --until-idle`` timed launch to exit; then ``lrq verify`` must exit 0 and
the rows must be right: clean, N results and no dead letter; poison, N - N/100 results and
exactly the poison documents' keys in ``lrq_dead_letters``. A wrong result exits 1.

Figure: poison items/s over clean items/s (the issue's target: at least 0.5).
"""
from __future__ import annotations

import argparse
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import run  # bench/run.py (first on sys.path): source cache, lrq command, machine info, tables
from run import BenchError

NAME = "poison"
BATCH, CHUNK = 200, 50
HANDLERS = {"clean": "workers.wordcount:handle", "poison": "workers.poison:handle"}
TARGET = 0.5

EXAMPLES = """\
examples:
  python bench/poison.py               10,000 docs, clean then poison, 1 run each
  python bench/poison.py --quick       5,000 docs
  python bench/poison.py --repeat 3    median of 3 runs each, interleaved
"""


def measure(kind: str, source: Path, n: int, tmp: str | None) -> tuple[float, int, int]:
    """One checked run; (seconds, results, dead letters)."""
    with tempfile.TemporaryDirectory(prefix=f"lrq-bench-{kind}-", dir=tmp) as d:
        work = Path(d)
        src = work / "source.db"
        shutil.copyfile(source, src)
        cfg = work / "lrq.toml"
        cfg.write_text(run.config_text(src, BATCH, chunk=CHUNK, handler=HANDLERS[kind]))
        seconds = run.until_idle(cfg, work, run.timeout_for(n), what=f"{kind}: lrq run")[0]
        results, dead = _check(kind, work, src, n)
    return seconds, results, dead


def _check(kind: str, work: Path, src: Path, n: int) -> tuple[int, int]:
    with sqlite3.connect(src) as c:
        poison = {m for (m,) in c.execute("SELECT mid FROM source_data WHERE id % 100 = 37")}
    with sqlite3.connect(work / "data" / "results.db") as c:
        results = c.execute(f"SELECT count(*) FROM {run.TABLE}").fetchone()[0]
        dead = {k for (k,) in c.execute('SELECT "key" FROM lrq_dead_letters')}
    want = poison if kind == "poison" else set()
    if dead != want or results != n - len(want):
        raise BenchError(f"{kind}: {results} results and {len(dead)} dead letters; expected "
                         f"{n - len(want)} and exactly the {len(want)} poison documents")
    return results, len(dead)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=10_000)
    p.add_argument("--repeat", type=int, default=1, help="runs of each; the median is used")
    p.add_argument("--quick", action="store_true", help="5,000 docs, one run each")
    p.add_argument("--tmp", help="folder for the per-run temporary folders")
    a = p.parse_args(argv)
    if a.quick:
        a.docs, a.repeat = 5_000, 1
    if a.docs < 100 or a.repeat < 1:
        p.error("--docs must be at least 100 and --repeat positive")
    stamp, report = run.new_report("workload", "W1 with 1% poison", {
        "docs": a.docs, "batch": BATCH, "chunk": CHUNK, "workers": run.WORKERS,
        "repeat": a.repeat, "handlers": HANDLERS})
    source = run.cached_source(a.docs)
    seconds: dict[str, list[float]] = {k: [] for k in HANDLERS}
    try:
        for r in range(a.repeat):
            for kind in HANDLERS:  # interleaved, so drift hits both alike
                s, results, dead = measure(kind, source, a.docs, a.tmp)
                seconds[kind].append(s)
                print(f"  N={a.docs} run {r + 1}/{a.repeat} {kind:6s} {s:7.2f}s "
                      f"{a.docs / s:9.0f} items/s  results {results} dead {dead}", flush=True)
    except (BenchError, subprocess.TimeoutExpired) as e:
        print(f"bench: FAILED: {e}", file=sys.stderr)
        return 1
    rate = {k: a.docs / statistics.median(v) for k, v in seconds.items()}
    ratio = round(rate["poison"] / rate["clean"], 3)
    report["results"] = [{"kind": k, "docs": a.docs, "median_seconds":
                          round(statistics.median(v), 3), "items_per_s": round(rate[k], 1),
                          "seconds": [round(s, 3) for s in v]} for k, v in seconds.items()]
    report["ratio"] = ratio
    rows = [("run", "median s", "items/s", "runs (s)")] + [
        (x["kind"], f"{x['median_seconds']:.2f}", f"{x['items_per_s']:,.0f}",
         " ".join(f"{s:.2f}" for s in x["seconds"])) for x in report["results"]]
    table = "\n".join([f"W1 with 1% poison, N={a.docs}, batch {BATCH}, chunk {CHUNK}",
                       *run._columns(rows, right={1, 2}),
                       f"poison/clean items/s: {ratio:.2f} (target >= {TARGET})"])
    run.write_report(report, stamp, NAME, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
