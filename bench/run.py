"""Benchmark W1 docs-to-db: lrq against a plain loop and a multiprocessing pool.

Every method reads the same SQLite ``source_data`` table by keyset paging, runs
``workers.wordcount.handle`` (word count + sha1 per document) and stores one row per
document in a SQLite results table shaped like lrq's generic table. The methods:

``lrq``
    ``lrq -c CONFIG run --until-idle`` as a subprocess, timed end to end (interpreter and
    scheduler start-up, sniffing, 2 worker processes, idle detection), then ``lrq verify``.
    The config sets only what the workload needs (queue, handler, key, source, results
    table, ``workers = 2``, ``batch_size = chunk_size = B``): everything else, ``max_pending``
    and ``interval`` included, is lrq's default, which is what users get.
``lrq-unlimited``
    The same with ``max_pending`` unlimited (:data:`UNLIMITED`), so the sniffer never
    pauses: ``lrq/lrq-unlimited`` is what backpressure on the defaults costs.
``plain``
    One process, no framework: page, handle, ``executemany``, one commit per page.
``pool``
    The parent pages the source and hands each page to a ``multiprocessing.Pool(2)``;
    ``--pool-mode children`` (default, the faster here): children compute and insert (two
    SQLite writers queueing on the write lock); ``--pool-mode parent``: children compute,
    the parent inserts.

Each run gets a fresh temporary folder and a fresh copy of the cached source, and its
results are checked: exactly N rows, and a digest of (key, value) that must be identical
for every method and batch size. A wrong result aborts the benchmark with exit code 1.
``--profile`` also runs ``lrq sniff`` and then ``lrq work QUEUE --burst`` under cProfile.

The table is printed; JSON (figures, every repeat, machine info) goes to
``bench/results/<timestamp>.json``; sample sources are cached in ``bench/results/cache/``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import platform
import re
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lrq.db import dumps_json  # the baselines serialize results as lrq does

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
CACHE = RESULTS / "cache"

WORKLOAD = "W1 docs-to-db"
QUEUE = "docs"
TABLE = "doc_results"
WORDS = 40
WORKERS = 2
METHODS = ("plain", "pool", "lrq", "lrq-unlimited")
LRQ_METHODS = ("lrq", "lrq-unlimited")
#: ``max_pending`` of the ``lrq-unlimited`` method: more batches than any run publishes.
UNLIMITED = 1_000_000_000

SELECT_PAGE = "SELECT id, mid, content FROM source_data WHERE id > ? ORDER BY id LIMIT ?"
# The DDL SQLAlchemy emits for lrq.schema.generic_table(TABLE) on SQLite, copied verbatim.
RESULTS_DDL = f"""
CREATE TABLE {TABLE} (
    id INTEGER NOT NULL,
    queue VARCHAR(64) NOT NULL,
    "key" VARCHAR(255) NOT NULL,
    batch VARCHAR(64) NOT NULL,
    value JSON NOT NULL,
    created_at DATETIME DEFAULT CURRENT_TIMESTAMP NOT NULL,
    PRIMARY KEY (id),
    CONSTRAINT uq_{TABLE}_queue_key UNIQUE (queue, "key")
);
CREATE INDEX ix_{TABLE}_created_at ON {TABLE} (created_at);
"""
# The same on-conflict insert lrq's sink issues (lrq.db.insert_ignore on SQLite).
INSERT = (f'INSERT INTO {TABLE} (queue, "key", batch, value) VALUES (?, ?, ?, ?) '
          'ON CONFLICT (queue, "key") DO NOTHING')
LRQ_ENV = ("LRQ_CONFIG", "LRQ_DATA_DIR", "LRQ_DB_URL")  # must not redirect a benchmark run

#: The W1 sample source table as a queue's source (a format template: queue, source).
SOURCE_CONFIG = """[queues.{queue}.source]
kind     = "sql"
url      = "sqlite:///{source}"
table    = "source_data"
order_by = "id"
columns  = {{ id = "id", doc_id = "mid", content = "content" }}
"""

CONFIG = """\
data_dir = "data"
db_url   = "sqlite:///data/results.db"

[queues.{queue}]
handler      = "{handler}"
key          = "doc_id"
result_table = "{table}"
workers      = {workers}
batch_size   = {batch}
chunk_size   = {chunk}
{extra}""" + SOURCE_CONFIG


EXAMPLES = """\
examples:
  python bench/run.py                                  100k docs, batch 1000 (make bench)
  python bench/run.py --quick                          20k docs, batch 1000 (make bench-quick)
  python bench/run.py --docs 100000,1000000 --batch 100,1000 --repeat 3
  python bench/run.py --profile                        + cProfile of lrq sniff and lrq work
"""


class BenchError(Exception):
    """A run failed or stored wrong results; the figures would be meaningless."""


@dataclass
class Run:
    """One timed run of one method."""

    seconds: float
    rows: int
    digest: str
    #: lrq only: what its log says about where the time went.
    detail: dict[str, Any] = field(default_factory=dict)


# -- the source ---------------------------------------------------------------------------
def cached_source(n: int) -> Path:
    """A SQLite file with documents 1..n, generated once by ``lrq.sample.write_documents``."""
    path = CACHE / f"source-{n}-w{WORDS}.db"
    if path.exists():
        return path
    from lrq.sample import write_documents

    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    for p in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        p.unlink(missing_ok=True)
    print(f"generating {n} documents into {path} ...", flush=True)
    write_documents(f"sqlite:///{tmp}", n, words=WORDS)
    with sqlite3.connect(tmp) as conn:  # one self-contained file, safe to copy
        conn.execute("PRAGMA journal_mode = DELETE")
    tmp.rename(path)
    return path


def pages(conn: sqlite3.Connection, size: int) -> Iterator[list[dict[str, Any]]]:
    """Keyset pages of items shaped like lrq's (fields id, doc_id, content)."""
    last = 0
    while True:
        rows = conn.execute(SELECT_PAGE, (last, size)).fetchall()
        if not rows:
            return
        yield [{"id": i, "doc_id": mid, "content": content} for i, mid, content in rows]
        last = rows[-1][0]


# -- results ------------------------------------------------------------------------------
def open_results(path: Path, create: bool) -> sqlite3.Connection:
    """A results connection configured like lrq's engine: WAL, synchronous FULL (a commit is
    durable when it returns, as lrq's are), so every method pays the same for its commits."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=60)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    if create:
        conn.executescript(RESULTS_DDL)
    return conn


def store(conn: sqlite3.Connection, batch: str, results: list[dict[str, Any]]) -> None:
    rows = [(QUEUE, str(r["doc_id"]), batch, dumps_json(r)) for r in results]
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(INSERT, rows)
    conn.execute("COMMIT")


def digest(db: Path) -> tuple[int, str]:
    """(rows, sha1 over key and canonical value JSON, by key); equal results, equal digests."""
    h = hashlib.sha1()
    n = 0
    with sqlite3.connect(db) as conn:
        for key, value in conn.execute(
                f'SELECT "key", value FROM {TABLE} WHERE queue = ? ORDER BY "key"', (QUEUE,)):
            h.update(f"{key}\t{json.dumps(json.loads(value), sort_keys=True)}\n".encode())
            n += 1
    return n, h.hexdigest()


# -- (b) plain loop -----------------------------------------------------------------------
def run_plain(source: Path, out: Path, batch: int) -> float:
    from workers.wordcount import handle

    t0 = time.perf_counter()
    src = sqlite3.connect(source)
    dst = open_results(out, create=True)
    for i, items in enumerate(pages(src, batch)):
        store(dst, f"page-{i}", handle(items))
    src.close()
    dst.close()
    return time.perf_counter() - t0


# -- (c) multiprocessing pool -------------------------------------------------------------
_child_db: sqlite3.Connection | None = None


def _compute(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from workers.wordcount import handle

    return handle(items)


def _child_open(path: str) -> None:
    global _child_db
    _child_db = open_results(Path(path), create=False)


def _compute_and_store(task: tuple[int, list[dict[str, Any]]]) -> int:
    from workers.wordcount import handle

    assert _child_db is not None
    i, items = task
    results = handle(items)
    store(_child_db, f"page-{i}", results)
    return len(results)


def run_pool(source: Path, out: Path, batch: int, mode: str) -> float:
    """Pages of ``batch`` items to a Pool(2); ``mode`` says who inserts (parent/children)."""
    ctx = multiprocessing.get_context("fork")
    t0 = time.perf_counter()
    # The pool's task thread iterates pages(), so the source is read off the main thread.
    src = sqlite3.connect(source, check_same_thread=False)
    dst = open_results(out, create=True)
    if mode == "parent":
        with ctx.Pool(WORKERS) as pool:
            for i, results in enumerate(pool.imap(_compute, pages(src, batch))):
                store(dst, f"page-{i}", results)
            pool.close()
            pool.join()
    else:
        with ctx.Pool(WORKERS, initializer=_child_open, initargs=(str(out),)) as pool:
            for _ in pool.imap_unordered(_compute_and_store, enumerate(pages(src, batch))):
                pass
            pool.close()
            pool.join()
    src.close()
    dst.close()
    return time.perf_counter() - t0


# -- (a) lrq ------------------------------------------------------------------------------
def lrq_command() -> list[str]:
    script = Path(sys.executable).with_name("lrq")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lrq"]


def lrq_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in LRQ_ENV}


def config_text(source: Path, batch: int, *, unlimited: bool = False, chunk: int | None = None,
                handler: str = "workers.wordcount:handle") -> str:
    """W1's ``lrq.toml``: lrq's defaults plus ``batch_size = B`` and ``chunk_size = chunk``
    (B unless given), ``handler``, and ``max_pending`` unlimited if asked."""
    extra = f"max_pending  = {UNLIMITED}\n" if unlimited else ""
    return CONFIG.format(queue=QUEUE, table=TABLE, workers=WORKERS, batch=batch,
                         chunk=chunk or batch, handler=handler, extra=extra, source=source)


def write_config(work: Path, source: Path, batch: int, *, unlimited: bool = False) -> Path:
    """Write the run's ``lrq.toml`` (:func:`config_text`) into ``work``."""
    cfg = work / "lrq.toml"
    cfg.write_text(config_text(source, batch, unlimited=unlimited))
    return cfg


def timeout_for(n: int) -> float:
    """A bound for one lrq run: 2 minutes plus 2 ms a document (500 docs/s is a failure)."""
    return 120 + n * 0.002


def run_lrq(source: Path, work: Path, n: int, batch: int, *,
            unlimited: bool = False) -> tuple[float, float]:
    """Time ``lrq run --until-idle`` then require ``lrq verify`` to pass; return
    (seconds, launch wall-clock time for :func:`lrq_timeline`)."""
    cfg = write_config(work, source, batch, unlimited=unlimited)
    return until_idle(cfg, work, timeout_for(n))


def until_idle(cfg: Path, work: Path, timeout: float, *, what: str = "lrq run",
               log: Path | None = None, verify: bool = True) -> tuple[float, float]:
    """Time ``lrq -c CFG run --until-idle`` (its output in ``log``, by default
    ``work/run.out``), bounded by ``timeout``, then, with ``verify``, require ``lrq verify``
    to pass; return (seconds, launch wall-clock time for :func:`lrq_timeline`). Every
    bench that runs lrq to the end runs it here."""
    log = log or work / "run.out"
    t0 = time.perf_counter()
    launched = time.time()
    with log.open("w") as out:
        proc = subprocess.Popen([*lrq_command(), "-c", str(cfg), "run", "--until-idle"],
                                cwd=work, env=lrq_env(), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            raise BenchError(f"{what} did not finish in {timeout:.0f}s; "
                             f"log tail:\n{_tail(log)}") from None
    seconds = time.perf_counter() - t0
    if code != 0:
        raise BenchError(f"{what} exited {code}; log tail:\n{_tail(log)}")
    if verify:
        check = subprocess.run([*lrq_command(), "-c", str(cfg), "verify"], cwd=work,
                               env=lrq_env(), capture_output=True, text=True, timeout=timeout)
        if check.returncode != 0:
            raise BenchError(f"{what}: lrq verify exited {check.returncode}:\n"
                             f"{check.stdout}{check.stderr}")
    return seconds, launched


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the scheduler stops its workers within its grace), then SIGKILL."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=45)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ (\S+): (.*)$")


def lrq_timeline(log: Path, launched: float) -> dict[str, Any]:
    """Seconds after launch at which the scheduler started, the first and last batch were
    done and idle was seen; and how many worker processes did the work."""
    marks: dict[str, float] = {}
    pids: dict[str, int] = {}
    for line in log.read_text(errors="replace").splitlines():
        m = _LOG_LINE.match(line)
        if not m:
            continue
        at = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp() - launched
        msg = m[3]
        if m[2] == "lrq.schedule" and msg.startswith("started"):
            marks.setdefault("started", at)
        elif m[2] == "lrq.schedule" and msg.startswith("idle"):
            marks["idle"] = at
        elif "done queue=" in msg:
            marks.setdefault("first_done", at)
            marks["last_done"] = at
            pid = re.search(r"\[\S+ (\d+)\]", msg)
            if pid:
                pids[pid[1]] = pids.get(pid[1], 0) + 1
    return {**{k: round(v, 3) for k, v in marks.items()}, "batches_per_worker_pid": pids}


# -- profile ------------------------------------------------------------------------------
#: Where a worker's time goes: (label, file suffix, function) whose cumulative time to show.
FOCUS = (
    ("imports (all modules)", "<frozen importlib._bootstrap>", "_find_and_load"),
    ("Worker.process (all batches)", "lrq/worker.py", "process"),
    ("  Sink.is_recorded", "lrq/sink.py", "is_recorded"),
    ("  Spool.load (read + unpickle)", "lrq/spool/batches.py", "load"),
    ("  Worker.handle (handler + checks)", "lrq/worker.py", "handle"),
    ("    workers.wordcount.handle", "workers/wordcount.py", "handle"),
    ("  Sink.store (one transaction)", "lrq/sink.py", "store"),
    ("    lrq.db._dumps (JSON per row)", "lrq/db.py", "_dumps"),
    ("    sqlite3 executemany", "~", "<method 'executemany' of 'sqlite3.Cursor' objects>"),
    ("  Spool.mark_done", "lrq/spool/claims.py", "mark_done"),
    ("Spool.pick (listing + claim)", "lrq/spool/claims.py", "pick"),
    ("Sniffer.tick", "lrq/sniffer.py", "tick"),
    ("  SqlSource.fetch", "lrq/sources/sql.py", "fetch"),
    ("  Spool.publish (pickle + fsync)", "lrq/spool/batches.py", "publish"),
    ("  Spool.write_position (fsync)", "lrq/spool/batches.py", "write_position"),
)


#: A child that runs ``lrq.cli.main(argv)`` under cProfile and writes the stats (argv[1]).
#: Not ``python -m cProfile -m lrq``: the ``lrq`` program leaves through ``os._exit``
#: (:func:`lrq.cli.entry`), so cProfile never got to write its file. Imports are profiled,
#: and so is every thread the run starts (each gets its own profiler, merged at the end):
#: a worker commits on its store-behind thread, which a main-thread profile would miss.
PROFILE_CHILD = """\
import cProfile, pstats, sys, threading
out, argv = sys.argv[1], sys.argv[2:]
threads = []
def per_thread(frame, event, arg):
    sys.setprofile(None)
    threads.append(cProfile.Profile())
    threads[-1].enable()
def run():
    from lrq.cli import main
    return main(argv)
prof = cProfile.Profile()
threading.setprofile(per_thread)
try:
    code = prof.runcall(run)
finally:
    threading.setprofile(None)
    stats = pstats.Stats(prof)
    for p in threads:
        p.disable()
        stats.add(p)
    stats.dump_stats(out)
sys.exit(code)
"""


def profile_lrq(source: Path, n: int, batch: int, tmp: str | None, stamp: str) -> dict[str, Any]:
    """cProfile ``lrq sniff`` filling left/, then one ``lrq work QUEUE --burst`` draining it.

    Full listings go to ``bench/results/<stamp>-{sniff,worker}-profile.txt``."""
    with tempfile.TemporaryDirectory(prefix="lrq-bench-prof-", dir=tmp) as d:
        work = Path(d)
        src = work / "source.db"
        shutil.copyfile(source, src)
        cfg = write_config(work, src, batch)
        out: dict[str, Any] = {"docs": n, "batch": batch}
        for step, args in (("sniff", ["sniff"]), ("worker", ["work", QUEUE, "--burst"])):
            prof = work / f"{step}.prof"
            t0 = time.perf_counter()
            _check_call([sys.executable, "-c", PROFILE_CHILD, str(prof), "-c", str(cfg), *args],
                        work, n)
            out[step] = _digest_profile(prof, RESULTS / f"{stamp}-{step}-profile.txt",
                                        f"lrq {' '.join(args)}, {n} docs, batch {batch}")
            out[step]["wall_seconds"] = round(time.perf_counter() - t0, 3)
        _check_call([*lrq_command(), "-c", str(cfg), "verify"], work, n)
    return out


def _digest_profile(prof: Path, text: Path, title: str) -> dict[str, Any]:
    import pstats

    with text.open("w") as f:
        f.write(f"# {WORKLOAD}: {title}, under cProfile\n")
        listing = pstats.Stats(str(prof), stream=f)
        listing.sort_stats("cumulative").print_stats(40)
        listing.sort_stats("tottime").print_stats(25)
    stats: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = \
        pstats.Stats(str(prof)).stats  # type: ignore[attr-defined]

    def row(func: tuple[str, int, str]) -> dict[str, Any]:
        _, nc, tt, ct, _ = stats[func]
        return {"function": pstats.func_std_string(func), "ncalls": nc,
                "tottime": round(tt, 3), "cumtime": round(ct, 3)}

    def top(index: int) -> list[dict[str, Any]]:
        return [row(f) for f in sorted(stats, key=lambda f: stats[f][index], reverse=True)[:10]]

    focus = {}
    for label, suffix, name in FOCUS:
        found = [v for f, v in stats.items() if f[0].endswith(suffix) and f[2] == name]
        if found:
            focus[label] = {"ncalls": sum(v[1] for v in found),
                            "cumtime": round(max(v[3] for v in found), 3)}
    total = max((v[3] for v in stats.values()), default=0.0)
    return {"total_seconds": round(total, 3), "top_cumulative": top(3), "top_tottime": top(2),
            "focus": focus, "text": str(text.relative_to(ROOT))}


def _check_call(cmd: list[str], cwd: Path, n: int) -> None:
    r = subprocess.run(cmd, cwd=cwd, env=lrq_env(), capture_output=True, text=True,
                       timeout=timeout_for(n))
    if r.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}{r.stderr[-3000:]}")


# -- driving ------------------------------------------------------------------------------
def measure(method: str, source: Path, n: int, batch: int, pool_mode: str,
            tmp: str | None) -> Run:
    """One run of ``method`` in a fresh folder with a fresh copy of the source, checked."""
    with tempfile.TemporaryDirectory(prefix=f"lrq-bench-{method}-", dir=tmp) as d:
        work = Path(d)
        src = work / "source.db"
        shutil.copyfile(source, src)
        detail: dict[str, Any] = {}
        if method in LRQ_METHODS:
            seconds, launched = run_lrq(src, work, n, batch,
                                        unlimited=method == "lrq-unlimited")
            db = work / "data" / "results.db"
            detail = lrq_timeline(work / "data" / "lrq.log", launched)
        else:
            db = work / "results.db"
            seconds = (run_plain(src, db, batch) if method == "plain"
                       else run_pool(src, db, batch, pool_mode))
        rows, sha = digest(db)
    if rows != n:
        raise BenchError(f"{method} N={n} B={batch}: stored {rows} rows, expected {n}")
    return Run(seconds=seconds, rows=rows, digest=sha, detail=detail)


def machine() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    def first(path: str, prefix: str) -> str | None:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return None

    return {"nproc": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "cpu": first("/proc/cpuinfo", "model name"),
            "memory": first("/proc/meminfo", "MemTotal"),
            "python": sys.version.split()[0], "implementation": platform.python_implementation(),
            "platform": platform.platform(), "sqlite": sqlite3.sqlite_version,
            "lrq": ver("lrq"), "sqlalchemy": ver("sqlalchemy"), "commit": _commit(),
            # Without cached bytecode every lrq process recompiles lrq's own modules.
            "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE")}


#: Files :func:`create_cost` creates (and removes) to probe a folder.
PROBE_FILES = 100


def create_cost(tmp: str | None) -> float:
    """µs of CPU to create one empty file in a new folder under ``tmp`` (the system tmp for
    None): what each lrq batch file costs the kernel before a byte is written. On ext4
    without a journal a new inode is checked against the ones deleted recently in its block
    group (``recently_deleted``), so a folder near many deleted files (a test suite's tmp)
    costs up to 25x a quiet one (bench/README.md, "Where a new file's CPU goes"). Printed by the
    benchmarks so that a figure can be read with it; :data:`PROBE_FILES` files, then removed."""
    d = tempfile.mkdtemp(prefix="lrq-bench-probe-", dir=tmp)
    try:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        for i in range(PROBE_FILES):
            os.close(os.open(f"{d}/{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        r1 = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return round(cpu / PROBE_FILES * 1e6, 1)


def probe_line(tmp: str | None, report: dict[str, Any]) -> str:
    """Probe ``tmp`` (:func:`create_cost`), record it in ``report``'s machine facts, and
    return the line the benchmarks print."""
    us = report["machine"]["create_us"] = create_cost(tmp)
    where = tmp or tempfile.gettempdir()
    return (f"a new file in {where}: {us:.0f} µs of CPU (a quiet folder: ~20-35 µs; "
            "bench/README.md, \"Where a new file's CPU goes\")")


def _commit() -> str | None:
    """The checked-out commit, read from .git's files (no git command is run)."""
    try:
        head = (ROOT / ".git" / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        path = ROOT / ".git" / ref
        if path.exists():
            return path.read_text().strip()
        for line in (ROOT / ".git" / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return None


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def new_report(kind: str, name: str, settings: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A UTC stamp and the JSON report every benchmark starts with (``kind`` is "workload"
    or "benchmark"); makes sure ``bench/results/`` exists."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = _stamp()
    return stamp, {kind: name, "timestamp": stamp, "argv": sys.argv, "machine": machine(),
                   "settings": settings, "results": []}


def write_report(report: dict[str, Any], stamp: str, name: str | None, *tables: str) -> Path:
    """Write ``report`` to ``bench/results/<stamp>[-name].json``; print ``tables`` and where
    the JSON went."""
    out = RESULTS / (f"{stamp}-{name}.json" if name else f"{stamp}.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    for t in tables:
        print(t)
    print(f"\nwrote {out.relative_to(ROOT)}")
    return out


def ints(text: str) -> list[int]:
    """A comma list of integers (``100_000`` allowed), for argparse."""
    return [int(x.replace("_", "")) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=ints, default=[100_000], help="comma list (default 100000)")
    p.add_argument("--batch", type=ints, default=[1000], help="comma list (default 1000)")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs per configuration; the median is reported")
    p.add_argument("--quick", action="store_true", help="20000 docs, batch 1000, one run")
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    p.add_argument("--pool-mode", choices=("parent", "children"), default="children",
                   help="who inserts in the pool method (default children: the faster here)")
    p.add_argument("--profile", action="store_true",
                   help="also cProfile `lrq sniff`, then `lrq work --burst` (first docs/batch)")
    p.add_argument("--tmp", help="folder for the per-run temporary folders (default: system tmp)")
    a = p.parse_args(argv)
    if a.quick:
        a.docs, a.batch, a.repeat = [20_000], [1000], 1
    a.methods = [m for m in a.methods.split(",") if m]
    if unknown := set(a.methods) - set(METHODS):
        p.error(f"unknown methods {sorted(unknown)}")
    if a.repeat < 1 or not a.docs or not a.batch or min(a.docs + a.batch) < 1:
        p.error("--repeat, --docs and --batch must be positive")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    stamp, report = new_report("workload", WORKLOAD, {
        "docs": a.docs, "batch": a.batch, "repeat": a.repeat, "words": WORDS,
        "workers": WORKERS, "methods": a.methods, "pool_mode": a.pool_mode})
    report["ratios"] = []
    print(f"{WORKLOAD}: docs {a.docs}, batch {a.batch}, repeat {a.repeat}, "
          f"nproc {report['machine']['nproc']}, python {report['machine']['python']}", flush=True)
    print(f"  {probe_line(a.tmp, report)}", flush=True)
    try:
        for n in a.docs:
            source = cached_source(n)
            reference: str | None = None
            for b in a.batch:
                runs: dict[str, list[Run]] = {m: [] for m in a.methods}
                for r in range(a.repeat):
                    for m in a.methods:  # interleaved, so drift hits every method alike
                        run = measure(m, source, n, b, a.pool_mode, a.tmp)
                        reference = reference or run.digest
                        if run.digest != reference:
                            raise BenchError(f"{m} N={n} B={b}: results differ from the "
                                             "other runs' (digest mismatch)")
                        runs[m].append(run)
                        print(f"  N={n} B={b} run {r + 1}/{a.repeat} {m:13s} "
                              f"{run.seconds:8.2f}s {n / run.seconds:10.0f} items/s", flush=True)
                _summarize(report, n, b, runs)
        if a.profile:
            n, b = a.docs[0], a.batch[0]
            print(f"profiling lrq sniff and lrq work --burst, N={n} B={b} ...", flush=True)
            report["profile"] = profile_lrq(cached_source(n), n, b, a.tmp, stamp)
    except (BenchError, subprocess.TimeoutExpired) as e:
        print(f"bench: FAILED: {e}", file=sys.stderr)
        return 1
    write_report(report, stamp, None, table(report),
                 *([profile_table(report["profile"])] if "profile" in report else []))
    return 0


def _summarize(report: dict[str, Any], n: int, b: int, runs: dict[str, list[Run]]) -> None:
    rate: dict[str, float] = {}
    for m, rs in runs.items():
        median = statistics.median(r.seconds for r in rs)
        rate[m] = n / median
        report["results"].append({
            "docs": n, "batch": b, "method": m, "median_seconds": round(median, 3),
            "items_per_s": round(rate[m], 1), "seconds": [round(r.seconds, 3) for r in rs],
            "digest": rs[0].digest, **({"lrq_timeline": [r.detail for r in rs]}
                                       if m in LRQ_METHODS else {})})
    if "lrq" in rate:
        report["ratios"].append({
            "docs": n, "batch": b,
            **{f"lrq/{m}": round(rate["lrq"] / rate[m], 3)
               for m in ("plain", "pool", "lrq-unlimited") if m in rate}})


def table(report: dict[str, Any]) -> str:
    rows = [("docs", "batch", "method", "median s", "items/s", "runs (s)")]
    for r in report["results"]:
        rows.append((str(r["docs"]), str(r["batch"]), r["method"], f"{r['median_seconds']:.2f}",
                     f"{r['items_per_s']:,.0f}", " ".join(f"{s:.2f}" for s in r["seconds"])))
    lines = [f"{WORKLOAD} (repeat {report['settings']['repeat']}, median; "
             f"pool mode {report['settings']['pool_mode']})", *_columns(rows, right={0, 1, 3, 4})]
    if report["ratios"]:
        keys = [k for k in ("lrq/plain", "lrq/pool", "lrq/lrq-unlimited")
                if k in report["ratios"][0]]
        ratios = [("docs", "batch", *keys)]
        ratios += [(str(q["docs"]), str(q["batch"]), *(f"{q[k]:.2f}" for k in keys))
                   for q in report["ratios"]]
        lines += ["", "lrq items/s relative to the baselines (1.00 = as fast):",
                  *_columns(ratios, right=set(range(len(ratios[0]))))]
    timelines = [(r["docs"], r["batch"], r["method"], t) for r in report["results"]
                 for t in r.get("lrq_timeline", [])]
    if timelines:
        lines += ["", "lrq run timelines (seconds after launch; batches done per worker process):"]
        lines += [f"  N={n} B={b} {m}: started {t.get('started')}, first batch done "
                  f"{t.get('first_done')}, last {t.get('last_done')}, idle {t.get('idle')}; "
                  f"{'/'.join(str(v) for v in t['batches_per_worker_pid'].values())}"
                  for n, b, m, t in timelines]
    return "\n".join(lines)


def _columns(rows: list[tuple[str, ...]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(v.rjust(w) if i in right else v.ljust(w)
                      for i, (v, w) in enumerate(zip(r, widths))).rstrip() for r in rows]


def profile_table(p: dict[str, Any]) -> str:
    lines = []
    for step in ("worker", "sniff"):
        s = p[step]
        lines += ["", f"lrq {step} under cProfile (N={p['docs']} B={p['batch']}): "
                  f"{s['total_seconds']}s profiled, {s['wall_seconds']}s wall; full listing "
                  f"{s['text']}"]
        if step == "worker":
            lines.append("top 10 by cumulative time:")
            lines += _columns([("ncalls", "tottime", "cumtime", "function")] + [
                (str(t["ncalls"]), f"{t['tottime']:.3f}", f"{t['cumtime']:.3f}", t["function"])
                for t in s["top_cumulative"]], right={0, 1, 2})
        lines.append("where the time goes (cumulative):")
        lines += [f"  {label:36s} {v['cumtime']:7.3f}s  {v['ncalls']:>7} calls"
                  for label, v in s["focus"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
