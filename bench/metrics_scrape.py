"""Benchmark a ``/metrics`` scrape with many done batches kept (issue 14: under 50 ms with
10k done batches).

For each N in ``--done`` (default 10000, and 100000 to see how it grows; ``--quick``: 10000):

1. a fresh folder with one queue (the W1 config: ``workers.wordcount:handle``, SQLite
   results), one real batch published by the spool (signed, 10 items), and N done batches
   made from it: its file copied into ``done/`` under N new names (where a worker's
   ``mark_done`` leaves them) and N ledger rows, with ``seconds`` spread over the
   histogram's buckets and ``finished_at`` evenly over the last ``SPREAD_HOURS`` (24),
   inserted in one transaction;
2. ``lrq web --http 127.0.0.1:0`` on it (a subprocess; the same server ``lrq run --http``
   starts in the scheduler);
3. ``GET /metrics`` ``--warmup`` times (3), then ``--scrapes`` times (30): wall ms of each,
   client side; p50, p90, max; the text must parse with ``prometheus_client.parser`` and
   count N done batches.

Also, in process on the same folder, the parts of a scrape: the spool's ``counts()`` (one
listing of every folder, a stat per file: what a scrape would cost without
:class:`lrq.metrics.Listing`), the scrape's listing (``done/`` sizes kept between scrapes),
the ledger's ``GROUP BY`` with the histogram's bucket counts on a first scrape (every row)
and on later ones (rows of the last hour or two; older sums kept), and the whole collector,
median ms of 20 calls each. JSON goes to
``bench/results/<timestamp>-metrics-scrape.json``; the exit code is 0 whether or not the
target is met (a result), 1 when a scrape fails.
"""
from __future__ import annotations

import argparse
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import run  # bench/run.py (first on sys.path): source cache, lrq command, machine info, tables
from run import BenchError

NAME = "metrics-scrape"
TARGET_MS = 50.0  # p50 of a scrape with 10k done batches kept
#: The done batches' ledger rows finish evenly over this many hours before now: retention
#: keeps done batches for days (keep_done = 7d), so most are over an hour old.
SPREAD_HOURS = 24
EXAMPLES = """\
examples:
  python bench/metrics_scrape.py --quick          10k done batches, 30 scrapes
  python bench/metrics_scrape.py                  10k and 100k done batches
  python bench/metrics_scrape.py --done 10000,50000 --scrapes 100
"""


def build(work: Path, done: int) -> Path:
    """The folder of step 1; returns its config."""
    from sqlalchemy import insert

    from lrq import config
    from lrq.app import App
    from lrq.metrics import BUCKETS

    src = work / "source.db"
    shutil.copyfile(run.cached_source(100), src)
    cfg_path = run.write_config(work, src, 10)
    app = App(config.load(cfg_path))
    q = app.queues()[0]
    sp = app.spool(q)
    name = sp.publish([{"doc_id": f"m{i:09d}", "content": "x " * 50} for i in range(10)])
    data = (sp.left / f"{name}.pkl").read_bytes()
    (sp.left / f"{name}.pkl").unlink()
    rng = random.Random(14)
    names = [f"{name[:-6]}{i:06d}" for i in range(done)]
    for n in names:
        (sp.done / f"{n}.pkl").write_bytes(data)
    sink = app.sink(q)
    top = BUCKETS[-1]
    now = datetime.now(UTC).replace(tzinfo=None)  # SQLite's CURRENT_TIMESTAMP is UTC
    rows = [{"queue": q.name, "name": n, "items": 10, "results": 10, "dead": 0, "attempt": 1,
             "seconds": rng.uniform(0.001, top),
             "finished_at": now - timedelta(hours=SPREAD_HOURS) * (1 - i / done)}
            for i, n in enumerate(names)]
    with sink.engine.begin() as conn:
        conn.execute(insert(sink.ledger), rows)
    app.engine.dispose()
    return cfg_path


def timed_parts(cfg: Path, reps: int = 20) -> dict[str, float]:
    """Median ms of the parts of a scrape, in this process."""
    from lrq import config, metrics
    from lrq.app import App

    app = App(config.load(cfg))
    q = app.queues()[0]
    collector = metrics.Collector(app)
    reg = metrics.registry(app)
    metrics.render(reg)  # warm: engine, tables, key
    parts = {"spool counts()": lambda: app.spool(q).counts(),
             "ledger, first scrape": lambda: metrics.Collector(app)._query([q.name]),
             "scrape listing (done/ sizes kept)": lambda: collector.listing.read(app.spool(q)),
             "ledger GROUP BY": lambda: collector._query([q.name]),
             "whole collector + text": lambda: metrics.render(reg)}
    out = {}
    for label, fn in parts.items():
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        out[label] = round(statistics.median(samples), 3)
    app.engine.dispose()
    return out


def scrape(cfg: Path, work: Path, done: int, warmup: int, scrapes: int) -> dict[str, Any]:
    from prometheus_client.parser import text_string_to_metric_families

    log = work / "web.out"
    with log.open("w") as out:
        proc = subprocess.Popen([*run.lrq_command(), "-c", str(cfg), "web", "--http",
                                 "127.0.0.1:0"], cwd=work, env=run.lrq_env(),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (m := re.search(r"http-serving url=(\S+)", log.read_text(errors="replace"))):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"lrq web did not start:\n{run._tail(log)}")
            time.sleep(0.1)
        url = m.group(1) + "metrics"
        samples = []
        body = b""
        for i in range(warmup + scrapes):
            t0 = time.perf_counter()
            with urllib.request.urlopen(url, timeout=60) as r:
                body = r.read()
            if i >= warmup:
                samples.append((time.perf_counter() - t0) * 1e3)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    seen = {s.labels["state"]: s.value for s in families["lrq_batches"].samples}
    if seen.get("done") != done:
        raise BenchError(f"/metrics counts {seen.get('done')} done batches, expected {done}")
    samples.sort()
    return {"done_batches": done, "scrapes": len(samples), "bytes": len(body),
            "p50_ms": round(statistics.median(samples), 2),
            "p90_ms": round(samples[int(0.9 * (len(samples) - 1))], 2),
            "max_ms": round(samples[-1], 2)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--done", type=run.ints, default=[10_000, 100_000],
                   help="done batches kept, comma list (default 10000,100000)")
    p.add_argument("--scrapes", type=int, default=30, help="scrapes timed (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="scrapes first, untimed (default 3)")
    p.add_argument("--quick", action="store_true", help="10k done batches only")
    p.add_argument("--tmp", help="folder for the temporary folders")
    a = p.parse_args(argv)
    if a.quick:
        a.done = [10_000]
    if a.scrapes < 1 or min(a.done) < 1:
        p.error("--scrapes and --done must be positive")
    return a


def table(report: dict[str, Any]) -> str:
    rows = [("done batches", "scrapes", "bytes", "p50 ms", "p90 ms", "max ms", "counts() ms",
             "listing ms", "ledger 1st ms", "ledger ms", "collector ms", "p50/target")]
    for r in report["results"]:
        parts = r["parts"]
        rows.append((f"{r['done_batches']:,}", str(r["scrapes"]), f"{r['bytes']:,}",
                     f"{r['p50_ms']:.1f}", f"{r['p90_ms']:.1f}", f"{r['max_ms']:.1f}",
                     f"{parts['spool counts()']:.1f}",
                     f"{parts['scrape listing (done/ sizes kept)']:.1f}",
                     f"{parts['ledger, first scrape']:.1f}", f"{parts['ledger GROUP BY']:.1f}",
                     f"{parts['whole collector + text']:.1f}",
                     f"{r['p50_ms'] / TARGET_MS:.2f}"))
    return "\n".join([f"/metrics scrape, client wall time (target p50 < {TARGET_MS:g} ms at "
                      "10k done batches; parts: in process, median)",
                      *run._columns(rows, right=set(range(0, 12)))])


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    stamp, report = run.new_report("benchmark", NAME, {
        "done": a.done, "scrapes": a.scrapes, "warmup": a.warmup, "target_ms": TARGET_MS})
    try:
        for done in a.done:
            with tempfile.TemporaryDirectory(prefix="lrq-bench-metrics-", dir=a.tmp) as d:
                work = Path(d)
                t0 = time.monotonic()
                cfg = build(work, done)
                print(f"  {done:,} done batches built in {time.monotonic() - t0:.1f}s",
                      flush=True)
                row = scrape(cfg, work, done, a.warmup, a.scrapes)
                row["parts"] = timed_parts(cfg)
                row["ratio_to_target"] = round(row["p50_ms"] / TARGET_MS, 3)
                print(f"  {done:,}: p50 {row['p50_ms']:.1f} ms, p90 {row['p90_ms']:.1f} ms",
                      flush=True)
                report["results"].append(row)
    except (BenchError, subprocess.TimeoutExpired, OSError) as e:
        print(f"bench: FAILED: {e}", file=sys.stderr)
        return 1
    run.write_report(report, stamp, NAME, table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
