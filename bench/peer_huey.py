"""Benchmark W1 against a durable peer: lrq and Huey (SQLite storage), workers up before the clock.

Both systems do W1 (``bench/run.py``): N documents from the cached sample source, the
``workers.wordcount.handle`` handler, one row per document in a SQLite results file with
lrq's ``doc_results`` table, checked by the same digest (exactly N rows, every value equal
to the other system's), in batches of B documents (B = 100 and 1000 by default).

``huey-process``, ``huey-thread``
    ``SqliteHuey`` (task table in its own file, Huey's defaults: WAL, SQLite's default
    ``synchronous``) and a consumer subprocess with 2 workers, of worker type ``process``
    (as lrq's 2 worker processes) or ``thread`` (Huey's default type: one process, whose
    workers share one connection under a lock instead of queueing on SQLite's file lock, but
    also the GIL). Which is faster varies with the batch and the disk (bench/README.md), so
    both run and lrq is compared with the faster. Huey's polling defaults. One task per
    batch: the handler, then
    the rows inserted in one transaction (``bench/run.py``'s ``store``). Before the clock the
    consumer is started and each of its 2 workers answers a ping (a barrier task that waits
    for both). The clock runs from enqueueing the first task (the parent reads the source in
    keyset pages of B and enqueues one task per page) until all N rows are in the results.
``lrq``
    ``lrq -c CFG run`` on lrq's defaults plus ``batch_size = chunk_size = B`` (so
    ``workers = 2``, ``max_pending`` and ``interval`` as shipped), over a SQLite source table
    that is empty at start (WAL, SQLite's default ``synchronous``, as Huey's task file).
    Before the clock it is up: its log says ``started`` and its process tree (scheduler and
    worker fork server) has gone quiet. lrq starts worker processes when batches appear; that
    is inside the clock. The clock runs from the parent inserting the first page of B
    documents into the source table (one commit per page: lrq's "enqueue") until all N rows
    are in lrq's results; then lrq gets SIGTERM (it must exit 0) and ``lrq verify`` must pass.

The systems run interleaved per B (huey-process, huey-thread, lrq, huey-process ...); the
median of ``--repeat`` runs is reported, with lrq items/s over each Huey's and over the
faster Huey's (``lrq/huey``, the figure the target is read from). Every run also records
when the first row landed, how long the enqueueing took and its CPU in the parent, and the
CPU seconds of the system's process tree during the clock (per batch: lrq's sniffer is in
it, Huey's enqueueing is not).
Huey is an optional, bench-only dependency: ``pip install -e '.[bench]'`` (``make bench``
does it). JSON goes to ``bench/results/<timestamp>-peer-huey.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import run  # bench/run.py (first on sys.path): source cache, results table, digest, reports
from idle_cpu import tree_cpu
from run import BenchError

NAME = "peer-huey"
SYSTEMS = ("huey-process", "huey-thread", "lrq")
TARGET = 1.0        # lrq items/s over Huey's at batch 100 (issue 12)
TARGET_BATCH = 100
READY_SECONDS = 60  # bound on a system coming up before the clock
QUIET = 0.3         # seconds of at most one CPU tick: lrq's tree has finished starting
POLL = 0.01         # seconds between looks at the results while the clock runs

SELECT_PAGE = ("SELECT id, mid, content, created FROM source_data WHERE id > ? "
               "ORDER BY id LIMIT ?")
INSERT_SOURCE = "INSERT INTO source_data (id, mid, content, created) VALUES (?, ?, ?, ?)"

EXAMPLES = """\
examples:
  python bench/peer_huey.py                         100k docs, batch 100 and 1000, 3 runs each
  python bench/peer_huey.py --quick                 20k docs, batch 100 and 1000, 1 run each
  python bench/peer_huey.py --batch 100 --repeat 5
  python bench/peer_huey.py --systems huey-thread,lrq --tmp /dev/shm
"""


@dataclass
class Run:
    """One timed run of one system."""

    seconds: float
    first_row: float  # seconds after the clock started
    enqueued: float   # seconds the parent took to enqueue (or insert) everything
    enqueue_cpu: float  # CPU seconds of the parent doing that (outside the system's tree)
    cpu: float        # CPU seconds of the system's process tree during the clock
    rows: int
    digest: str


# -- the Huey side: tasks run in the consumer's workers -----------------------------------
_results: threading.local = threading.local()
_results_path: str = ""


def w1_batch(i: int, items: list[dict[str, Any]]) -> None:
    """Huey task: one batch of W1, stored as ``bench/run.py``'s methods store it."""
    from workers.wordcount import handle

    conn = getattr(_results, "conn", None)
    if conn is None:  # one connection per worker (process or thread)
        conn = _results.conn = run.open_results(Path(_results_path), create=False)
    run.store(conn, f"task-{i}", handle(items))


def ping(folder: str, workers: int) -> str:
    """Huey task: a barrier that returns only once ``workers`` workers have arrived, so a
    ping per worker proves every worker is up (one worker cannot take two of them)."""
    me = f"{os.getpid()}-{threading.get_ident()}"
    Path(folder, me).touch()
    deadline = time.monotonic() + READY_SECONDS
    while len(os.listdir(folder)) < workers:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(os.listdir(folder))} of {workers} workers arrived")
        time.sleep(0.005)
    return me


def make_huey(path: Path) -> tuple[Any, Any, Any]:
    """A ``SqliteHuey`` on ``path`` with both tasks registered: (huey, w1_batch, ping)."""
    from huey import SqliteHuey

    huey = SqliteHuey("w1", filename=str(path))
    return huey, huey.task(name="w1_batch")(w1_batch), huey.task(name="ping")(ping)


def consume(huey_db: str, results: str, workers: int, worker_type: str) -> None:
    """The consumer subprocess: Huey's own ``Consumer``, in the foreground until SIGTERM."""
    import logging

    global _results_path
    _results_path = results
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    huey, _, _ = make_huey(Path(huey_db))
    huey.create_consumer(workers=workers, worker_type=worker_type).run()


def run_huey(work: Path, source: Path, n: int, batch: int, worker_type: str) -> Run:
    from huey.exceptions import HueyException, TaskException

    out = work / "results.db"
    run.open_results(out, create=True).close()
    huey_db = work / "huey.db"
    huey, task, ping_task = make_huey(huey_db)
    log = work / "consumer.out"
    with log.open("w") as f:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__)), "--consume", str(huey_db), str(out),
             str(run.WORKERS), worker_type],
            cwd=run.ROOT, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
    try:
        barrier = work / "ready"
        barrier.mkdir()
        answers = [ping_task(str(barrier), run.WORKERS) for _ in range(run.WORKERS)]
        try:
            seen = {a.get(blocking=True, timeout=READY_SECONDS) for a in answers}
        except (HueyException, TaskException) as e:
            raise BenchError(f"huey: workers not up: {type(e).__name__}: {e}; log tail:\n"
                             f"{run._tail(log)}") from None
        if len(seen) != run.WORKERS:
            raise BenchError(f"huey: pings answered by {sorted(seen)}, want {run.WORKERS} "
                             f"workers; log tail:\n{run._tail(log)}")
        cpu0 = tree_cpu(proc.pid)[0]
        t0, c0 = time.perf_counter(), time.process_time()
        rows = _Rows(out, n, t0, proc, log)
        with _source(source) as pages:
            for i, page in enumerate(pages(batch)):
                task(i, [{"id": r[0], "doc_id": r[1], "content": r[2]} for r in page])
        enqueued, enqueue_cpu = time.perf_counter() - t0, time.process_time() - c0
        first, seconds = rows.wait()
        cpu = tree_cpu(proc.pid)[0] - cpu0
    finally:
        _stop(proc, log, "huey consumer")
    huey.storage.close()
    stored, sha = run.digest(out)
    return Run(seconds, first, enqueued, enqueue_cpu, cpu, stored, sha)


# -- the lrq side -------------------------------------------------------------------------
def run_lrq(work: Path, source: Path, n: int, batch: int) -> Run:
    src = work / "source.db"
    with contextlib.closing(sqlite3.connect(source)) as cache, \
            contextlib.closing(sqlite3.connect(src, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        for (ddl,) in cache.execute("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL"):
            conn.execute(ddl)  # source_data and its index, empty
    cfg = work / "lrq.toml"
    cfg.write_text(run.config_text(src, batch))  # defaults + batch_size = chunk_size = B
    out = work / "data" / "results.db"
    log = work / "run.out"
    with log.open("w") as f:
        proc = subprocess.Popen([*run.lrq_command(), "-c", str(cfg), "run"], cwd=work,
                                env=run.lrq_env(), stdin=subprocess.DEVNULL, stdout=f,
                                stderr=subprocess.STDOUT)
    try:
        _wait_lrq_up(proc, work / "data" / "lrq.log", log)
        cpu0 = tree_cpu(proc.pid)[0]
        with contextlib.closing(sqlite3.connect(src, isolation_level=None)) as dst:
            t0, c0 = time.perf_counter(), time.process_time()
            rows = _Rows(out, n, t0, proc, log)
            with _source(source) as pages:
                for page in pages(batch):
                    dst.execute("BEGIN")
                    dst.executemany(INSERT_SOURCE, page)
                    dst.execute("COMMIT")
            enqueued, enqueue_cpu = time.perf_counter() - t0, time.process_time() - c0
        first, seconds = rows.wait()
        cpu = tree_cpu(proc.pid)[0] - cpu0
    finally:
        code = _stop(proc, log, "lrq run")
    if code != 0:
        raise BenchError(f"lrq run exited {code} after SIGTERM; log tail:\n{run._tail(log)}")
    check = subprocess.run([*run.lrq_command(), "-c", str(cfg), "verify"], cwd=work,
                           env=run.lrq_env(), capture_output=True, text=True,
                           timeout=run.timeout_for(n))
    if check.returncode != 0:
        raise BenchError(f"lrq verify exited {check.returncode}:\n{check.stdout}{check.stderr}")
    stored, sha = run.digest(out)
    return Run(seconds, first, enqueued, enqueue_cpu, cpu, stored, sha)


def _wait_lrq_up(proc: subprocess.Popen[bytes], lrq_log: Path, out: Path) -> None:
    """Bounded: the scheduler logged ``started`` and its process tree (scheduler, worker
    fork server importing lrq, first sniff and cleanup ticks) used at most one CPU tick
    over ``QUIET`` seconds."""
    deadline = time.monotonic() + READY_SECONDS
    last = (-1.0, time.monotonic())
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"lrq run exited {proc.returncode} while starting; log tail:\n"
                             f"{run._tail(out)}")
        if lrq_log.exists() and "lrq.schedule: started" in lrq_log.read_text(errors="replace"):
            cpu, now = tree_cpu(proc.pid)[0], time.monotonic()
            if cpu - last[0] > 0.011:
                last = (cpu, now)
            elif now - last[1] >= QUIET:
                return
        time.sleep(0.05)
    raise BenchError(f"lrq run not up and quiet within {READY_SECONDS}s; log tail:\n"
                     f"{run._tail(out)}")


# -- shared -------------------------------------------------------------------------------
class _source:
    """The cached source, read-only, as keyset pages of raw rows (id, mid, content,
    created): ``with _source(path) as pages: for page in pages(size): ...``."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)

    def __enter__(self) -> Callable[[int], Iterator[list[tuple[Any, ...]]]]:
        return self.pages

    def __exit__(self, *exc: object) -> None:
        self.conn.close()

    def pages(self, size: int) -> Iterator[list[tuple[Any, ...]]]:
        last = 0
        while rows := self.conn.execute(SELECT_PAGE, (last, size)).fetchall():
            yield rows
            last = rows[-1][0]


class _Rows(threading.Thread):
    """Watches the results from the clock's start, beside the parent's enqueueing (so the
    first row is seen when it lands), until N rows are there; :meth:`wait` returns (first
    row, all rows) in seconds after ``t0``."""

    def __init__(self, db: Path, n: int, t0: float, proc: subprocess.Popen[bytes],
                 log: Path) -> None:
        super().__init__(name="watch-results", daemon=True)
        self.args = (db, n, t0, lambda: proc.poll() is None, log)
        self.n = n
        self.found: tuple[float, float] | None = None
        self.error: BenchError | None = None
        self.start()

    def run(self) -> None:
        try:
            self.found = _wait_rows(*self.args)
        except BenchError as e:
            self.error = e

    def wait(self) -> tuple[float, float]:
        self.join(timeout=run.timeout_for(self.n) + 30)  # _wait_rows is bounded by less
        if self.error is not None:
            raise self.error
        if self.found is None:
            raise BenchError("the results watcher did not finish")
        return self.found


def _wait_rows(db: Path, n: int, t0: float, alive: Callable[[], bool],
               log: Path) -> tuple[float, float]:
    """Poll the results until N rows are there, bounded by ``run.timeout_for(n)``; return
    (first row, all rows) in seconds after ``t0``. ``max(id)`` is the cheap probe (rows are
    only inserted, so it counts them unless a rolled-back insert left a gap); ``count(*)``
    decides."""
    deadline = t0 + run.timeout_for(n)
    first: float | None = None
    conn: sqlite3.Connection | None = None
    try:
        while (now := time.perf_counter()) < deadline:
            if conn is None and db.exists():
                conn = sqlite3.connect(db, timeout=10)
            top = 0
            if conn is not None:
                with contextlib.suppress(sqlite3.OperationalError):  # no table yet (lrq)
                    top = conn.execute(f"SELECT max(id) FROM {run.TABLE}").fetchone()[0] or 0
            if top and first is None:
                first = now - t0
            if top >= n and conn is not None:
                count = conn.execute(f"SELECT count(*) FROM {run.TABLE}").fetchone()[0]
                if count >= n:
                    return first or now - t0, now - t0
            if not alive():
                raise BenchError(f"the system exited before storing {n} rows ({top} so far); "
                                 f"log tail:\n{run._tail(log)}")
            time.sleep(POLL)
    finally:
        if conn is not None:
            conn.close()
    raise BenchError(f"not all {n} rows stored within {run.timeout_for(n):.0f}s; log tail:\n"
                     f"{run._tail(log)}")


def _stop(proc: subprocess.Popen[bytes], log: Path, what: str) -> int:
    """SIGTERM, bounded wait, then SIGKILL; the exit code (a kill is a failure)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=45)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
        raise BenchError(f"{what} ignored SIGTERM for 45 s; killed. log tail:\n"
                         f"{run._tail(log)}") from None


def measure(system: str, source: Path, n: int, batch: int, tmp: str | None,
            done: list[str] | None = None) -> Run:
    """One checked run in a folder of its own. With ``done``, the folder is left for the
    caller to remove once every run is over (its name appended): removing one run's files
    (lrq's thousand batch files; Huey's few) while the next run creates files taxes that run
    on ext4 (a new inode near recently deleted ones is slow to find), and only lrq creates a
    file per batch, so removing as it went charged lrq for the bench's own cleanup."""
    d = tempfile.mkdtemp(prefix=f"lrq-bench-peer-{system}-", dir=tmp)
    try:
        result = (run_lrq(Path(d), source, n, batch) if system == "lrq"
                  else run_huey(Path(d), source, n, batch, system.removeprefix("huey-")))
    finally:
        if done is None:
            shutil.rmtree(d, ignore_errors=True)
        else:
            done.append(d)
    if result.rows != n:
        raise BenchError(f"{system} N={n} B={batch}: stored {result.rows} rows, expected {n}")
    return result


# -- driving ------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=100_000, help="documents (default 100000)")
    p.add_argument("--batch", type=run.ints, default=[100, 1000],
                   help="comma list of documents per batch/task (default 100,1000)")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs per system and batch, interleaved; the median is reported "
                        "(default 3)")
    p.add_argument("--quick", action="store_true", help="20000 docs, one run each")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help=f"subset of {','.join(SYSTEMS)} (default all)")
    p.add_argument("--tmp", help="folder for the per-run temporary folders (default: system tmp)")
    p.add_argument("--consume", nargs=4, metavar=("HUEY_DB", "RESULTS", "WORKERS", "TYPE"),
                   help=argparse.SUPPRESS)  # the consumer subprocess
    a = p.parse_args(argv)
    if a.quick:
        a.docs, a.repeat = 20_000, 1
    a.systems = [s for s in a.systems.split(",") if s]
    if set(a.systems) - set(SYSTEMS) or not a.systems:
        p.error(f"--systems: choose from {','.join(SYSTEMS)}")
    if a.repeat < 1 or a.docs < 1 or not a.batch or min(a.batch) < 1:
        p.error("--repeat, --docs and --batch must be positive")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.consume:
        huey_db, results, workers, worker_type = a.consume
        consume(huey_db, results, int(workers), worker_type)
        return 0
    if any(s.startswith("huey") for s in a.systems) and not huey_installed():
        print("bench: huey is not installed: pip install -e '.[bench]' (make bench does it)",
              file=sys.stderr)
        return 2
    from lrq.config import Config, QueueConfig

    defaults = {"interval": Config.interval,
                **{k: getattr(QueueConfig, k) for k in ("workers", "max_pending", "run_seconds")}}
    stamp, report = run.new_report("workload", "W1 docs-to-db, lrq against Huey", {
        "docs": a.docs, "batch": a.batch, "repeat": a.repeat, "systems": a.systems,
        "huey_workers": run.WORKERS,
        "huey": _version("huey"), "lrq_queue_defaults": defaults})
    report["ratios"] = []
    print(f"W1 lrq vs Huey (SQLite): docs {a.docs}, batch {a.batch}, repeat {a.repeat}, "
          f"systems {','.join(a.systems)}", flush=True)
    print(f"  {run.probe_line(a.tmp, report)}", flush=True)
    source = run.cached_source(a.docs)
    reference: str | None = None
    folders: list[str] = []  # removed once every run is over (see measure)
    try:
        for b in a.batch:
            runs: dict[str, list[Run]] = {s: [] for s in a.systems}
            for r in range(a.repeat):
                for s in a.systems:  # interleaved, so drift hits every system alike
                    res = measure(s, source, a.docs, b, a.tmp, folders)
                    reference = reference or res.digest
                    if res.digest != reference:
                        raise BenchError(f"{s} B={b}: results differ from the other runs' "
                                         "(digest mismatch)")
                    runs[s].append(res)
                    print(f"  N={a.docs} B={b} run {r + 1}/{a.repeat} {s:12s} "
                          f"{res.seconds:7.2f}s {a.docs / res.seconds:9.0f} items/s  first "
                          f"row {res.first_row:.2f}s, enqueued in {res.enqueued:.2f}s "
                          f"(CPU {res.enqueue_cpu:.2f}s), system CPU {res.cpu:.2f}s", flush=True)
            _summarize(report, a.docs, b, runs)
    except (BenchError, subprocess.TimeoutExpired) as e:
        print(f"bench: FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        for d in folders:
            shutil.rmtree(d, ignore_errors=True)
    run.write_report(report, stamp, NAME, table(report))
    return 0


def huey_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("huey") is not None


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def _summarize(report: dict[str, Any], n: int, b: int, runs: dict[str, list[Run]]) -> None:
    rate: dict[str, float] = {}
    for s, rs in runs.items():
        median = statistics.median(r.seconds for r in rs)
        rate[s] = n / median
        report["results"].append({
            "docs": n, "batch": b, "system": s, "median_seconds": round(median, 3),
            "items_per_s": round(rate[s], 1), "seconds": [round(r.seconds, 3) for r in rs],
            "first_row_seconds": [round(r.first_row, 3) for r in rs],
            "enqueue_seconds": [round(r.enqueued, 3) for r in rs],
            "enqueue_cpu_seconds": [round(r.enqueue_cpu, 3) for r in rs],
            "cpu_seconds": [round(r.cpu, 2) for r in rs],
            "cpu_ms_per_batch": round(1000 * statistics.median(r.cpu for r in rs)
                                      / -(-n // b), 3),
            "digest": rs[0].digest})
    hueys = {s: v for s, v in rate.items() if s != "lrq"}
    if "lrq" in rate and hueys:
        best = max(hueys, key=hueys.__getitem__)
        report["ratios"].append({
            "docs": n, "batch": b, "lrq/huey": round(rate["lrq"] / hueys[best], 3),
            "huey": best, **{f"lrq/{s}": round(rate["lrq"] / v, 3) for s, v in hueys.items()}})


def table(report: dict[str, Any]) -> str:
    rows: list[tuple[str, ...]] = [
        ("docs", "batch", "system", "median s", "items/s", "CPU ms/batch", "runs (s)")]
    for r in report["results"]:
        rows.append((str(r["docs"]), str(r["batch"]), r["system"], f"{r['median_seconds']:.2f}",
                     f"{r['items_per_s']:,.0f}", f"{r['cpu_ms_per_batch']:.2f}",
                     " ".join(f"{s:.2f}" for s in r["seconds"])))
    s = report["settings"]
    lines = [f"W1 lrq vs Huey with SQLite storage (repeat {s['repeat']}, median; Huey "
             f"{s['huey']}, {s['huey_workers']} workers; lrq on its defaults)",
             *run._columns(rows, right={0, 1, 3, 4, 5})]
    if report["ratios"]:
        lines += ["", "lrq items/s over Huey's, each worker type and the faster (target at "
                  f"batch {TARGET_BATCH}: lrq/huey >= {TARGET}):"]
        for q in report["ratios"]:
            each = ", ".join(f"{k} {v:.2f}" for k, v in q.items()
                             if k.startswith("lrq/huey-"))
            lines.append(f"  N={q['docs']} B={q['batch']}: lrq/huey {q['lrq/huey']:.2f} "
                         f"(faster Huey: {q['huey']}; {each})")
    return "\n".join(lines)


if __name__ == "__main__":
    # Through the module's own name, so Huey registers the tasks as ``peer_huey.*`` in this
    # process and in the consumer subprocess alike (not as ``__main__.*``).
    import peer_huey

    sys.exit(peer_huey.main())
