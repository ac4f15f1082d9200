"""Benchmark idle cost: the CPU an ``lrq run`` scheduler uses with nothing to do.

For each case ``DOCS:BATCH`` (default ``100:100``, and ``20000:10``, which leaves 2,000 done
batches in the data dir, as retention keeps them for ``keep_done`` = 7 days):

1. a fresh folder with DOCS sample documents and one queue (``workers.wordcount:handle``,
   ``result_table``, ``batch_size = chunk_size = BATCH``, other settings default:
   ``cleanup.every = 15s``); ``lrq run --until-idle`` drains it and ``lrq verify`` must
   pass; with ``--intervals`` the idle part below is repeated once per ``interval`` given
   (written into the config; default: none, the config's default);
2. ``lrq -c CFG run`` (no ``--until-idle``) is started, given ``--settle`` seconds (5), then
   its CPU time (utime + stime from ``/proc/<pid>/stat``, of it and every live descendant,
   plus the children it reaped) is sampled over ``--window`` seconds (60; ``--quick``: 15);
   then it gets SIGTERM and must exit 0;
3. over the same window, the same is measured for ``python -c "import time;
   time.sleep(...)"`` (the baseline: a process that only sleeps);
4. with ``--http`` (default on; ``--no-http`` skips it), step 2 again as ``lrq run --http
   127.0.0.1:0``: the scheduler also serving the web page and ``/metrics`` (one scrape of
   ``/metrics`` while settling checks it is served; nothing polls it in the window).

With ``--attribute`` (default on), the scheduler's periodic jobs are then timed in this
process on the same drained folder (``Sniffer.tick`` under the sniff lock, ``has_pending``,
``cleanup.run``), and their cost per second of wall time is estimated from how often the
scheduler runs them. JSON goes to ``bench/results/<timestamp>-idle-cpu.json``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import run  # bench/run.py (first on sys.path): source cache, lrq command, machine info, tables
from run import BenchError

NAME = "idle-cpu"
TARGET_PCT = 1.0  # % of one core an idle scheduler should stay under


EXAMPLES = """\
examples:
  python bench/idle_cpu.py --quick                 15 s windows
  python bench/idle_cpu.py                         60 s windows
  python bench/idle_cpu.py --cases 100:100 --window 120 --no-attribute
  python bench/idle_cpu.py --quick --cases 100:100 --intervals 1,0.5,0.25,0.1
"""




# -- CPU time from /proc -----------------------------------------------------------------------
@dataclass
class ProcStat:
    pid: int
    ppid: int
    ticks: int  # utime + stime
    child_ticks: int  # cutime + cstime: children it has reaped


def read_stat(pid: int) -> ProcStat | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    rest = text[text.rindex(")") + 2:].split()  # fields 3.. (comm may hold spaces)
    return ProcStat(pid=pid, ppid=int(rest[1]), ticks=int(rest[11]) + int(rest[12]),
                    child_ticks=int(rest[13]) + int(rest[14]))


def tree_cpu(root: int) -> tuple[float, int]:
    """(CPU seconds of ``root``, its live descendants and the children they reaped; number
    of processes in the tree)."""
    stats = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = read_stat(int(entry.name))
            if st is not None:
                stats[st.pid] = st
    if root not in stats:
        raise BenchError(f"process {root} is gone")
    tree = {root}
    grew = True
    while grew:
        grew = False
        for st in stats.values():
            if st.ppid in tree and st.pid not in tree:
                tree.add(st.pid)
                grew = True
    ticks = sum(stats[p].ticks + stats[p].child_ticks for p in tree)
    return ticks / os.sysconf("SC_CLK_TCK"), len(tree)


# -- one case ----------------------------------------------------------------------------------
def drain(run: Any, cfg: Path, work: Path, docs: int) -> float:
    """``lrq run --until-idle``, then ``lrq verify``; returns the run's seconds."""
    timeout = run.timeout_for(docs) * 5  # small batches are slower than run.py's
    return run.until_idle(cfg, work, timeout, what="draining", log=work / "drain.out")[0]


def stop(proc: subprocess.Popen[bytes], grace: float = 45) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
        raise BenchError(f"pid {proc.pid} ignored SIGTERM for {grace:.0f}s; killed") from None


def scrape_once(log: Path, settle: float) -> int:
    """Bytes of one ``/metrics`` scrape of the scheduler whose log is ``log`` (its
    ``http-serving url=`` line), waiting up to ``settle`` + 30 seconds for that line."""
    import re
    import urllib.request

    deadline = time.monotonic() + settle + 30
    while not (m := re.search(r"http-serving url=(\S+)", log.read_text(errors="replace"))):
        if time.monotonic() > deadline:
            raise BenchError(f"lrq run --http never logged http-serving:\n{run._tail(log)}")
        time.sleep(0.2)
    with urllib.request.urlopen(m.group(1) + "metrics", timeout=30) as r:
        body = r.read()
    if b"lrq_batches" not in body:
        raise BenchError("/metrics has no lrq_batches")
    return len(body)


def measure_idle(run: Any, cfg: Path, work: Path, settle: float,
                 window: float, http: bool = False) -> dict[str, Any]:
    """CPU of ``lrq run`` (``--http``: serving the page too) and of a sleeping baseline over
    the same window."""
    log = work / "idle.out"
    sleeper = [sys.executable, "-c", f"import time; time.sleep({settle + window + 30:.0f})"]
    extra = ["--http", "127.0.0.1:0"] if http else []
    with log.open("w") as out:
        lrq = subprocess.Popen([*run.lrq_command(), "-c", str(cfg), "run", *extra], cwd=work,
                               env=run.lrq_env(), stdin=subprocess.DEVNULL, stdout=out,
                               stderr=subprocess.STDOUT)
        base = subprocess.Popen(sleeper, stdin=subprocess.DEVNULL)
        try:
            t_settle = time.monotonic()
            scraped = scrape_once(log, settle) if http else None
            time.sleep(max(0.0, settle - (time.monotonic() - t_settle)))
            if lrq.poll() is not None:
                raise BenchError(f"lrq run exited {lrq.returncode} while settling:\n"
                                 f"{run._tail(log)}")
            t0 = time.monotonic()
            lrq0, lrq_procs0 = tree_cpu(lrq.pid)
            base0, _ = tree_cpu(base.pid)
            procs_seen = lrq_procs0
            deadline = t0 + window
            while (left := deadline - time.monotonic()) > 0:  # watch for worker processes
                time.sleep(min(1.0, left))
                procs_seen = max(procs_seen, tree_cpu(lrq.pid)[1])
            lrq1, _ = tree_cpu(lrq.pid)
            base1, _ = tree_cpu(base.pid)
            elapsed = time.monotonic() - t0
        finally:
            code = stop(lrq)
            stop(base, grace=5)
    if code != 0:
        raise BenchError(f"lrq run exited {code} after SIGTERM:\n{run._tail(log)}")
    lines = log.read_text(errors="replace").splitlines()
    return {"window_seconds": round(elapsed, 2),
            "lrq_cpu_seconds": round(lrq1 - lrq0, 3),
            "lrq_pct_core": round(100 * (lrq1 - lrq0) / elapsed, 3),
            "baseline_cpu_seconds": round(base1 - base0, 3),
            "baseline_pct_core": round(100 * (base1 - base0) / elapsed, 3),
            "max_processes_in_tree": procs_seen, "exit_code": code,
            "http": http, "metrics_bytes": scraped,
            "log_lines": len(lines), "log_tail": lines[-5:]}


# -- attribution -------------------------------------------------------------------------------
def timed(fn: Callable[[], Any], reps: int) -> dict[str, float]:
    """Median wall and CPU milliseconds of ``fn()`` over ``reps`` calls (bounded to ~20 s)."""
    wall: list[float] = []
    cpu: list[float] = []
    deadline = time.monotonic() + 20
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
        if time.monotonic() > deadline:
            break
    return {"wall_ms": round(statistics.median(wall) * 1e3, 3),
            "cpu_ms": round(statistics.median(cpu) * 1e3, 3), "n": len(wall)}


def attribute(cfg_path: Path) -> dict[str, Any]:
    """Each periodic job of the scheduler, timed in this process on the drained folder, and
    its estimated share of a core at the scheduler's frequencies."""
    from lrq import cleanup, config
    from lrq.app import App

    app = App(config.load(cfg_path))
    q = app.queues()[0]
    sniffer = app.sniffer(q)
    spool = app.spool(q)
    budget = app.budget()

    def sniff() -> None:
        with spool.lock("sniff"):
            sniffer.tick(max_seconds=5.0)

    every = {"sniff": app.cfg.interval, "work (has_pending)": app.cfg.interval,
             "cleanup": app.cfg.cleanup.every}
    jobs: dict[str, dict[str, Any]] = {
        "sniff": timed(sniff, 30),
        "work (has_pending)": timed(spool.has_pending, 30),
        "cleanup": timed(lambda: cleanup.run(app), 10),
    }
    if not sniffer.drained:
        raise BenchError("the sniffer does not see the source as drained")
    parts = {"Spool.pending_stats": timed(spool.pending_stats, 30),
             "Budget.used": timed(budget.used, 30),
             "Spool.read_position": timed(spool.read_position, 30),
             "source probe (1 row, empty)": timed(
                 lambda: sniffer.source.fetch(spool.read_position(), 1), 30),
             "statvfs (Budget.space)": timed(budget.space, 30)}
    for name, v in jobs.items():
        v["every_seconds"] = every[name]
        v["est_pct_core"] = round(v["cpu_ms"] / 1e3 / every[name] * 100, 3)
    return {"jobs": jobs, "sniff_parts": parts,
            "est_pct_core_jobs": round(sum(v["est_pct_core"] for v in jobs.values()), 3),
            "files_in_queue": {f: len(os.listdir(app.cfg.data_dir / q.name / f))
                               for f in ("left", "right")}}


# -- driving -----------------------------------------------------------------------------------
def _cases(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        if part.strip():
            docs, _, batch = part.partition(":")
            out.append((int(docs), int(batch or 100)))
    return out


def _floats(text: str) -> list[float | None]:
    return [float(x) for x in text.split(",") if x.strip()]


def with_interval(cfg: Path, interval: float | None) -> None:
    """Set the config's top-level ``interval`` (None: drop it, lrq's default applies)."""
    lines = [x for x in cfg.read_text().splitlines() if not x.startswith("interval")]
    if interval is not None:
        lines.insert(0, f"interval = {interval!r}")
    cfg.write_text("\n".join(lines) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=_cases, default=[(100, 100), (20_000, 10)],
                   help="DOCS:BATCH,... drained before the idle run (default 100:100,20000:10)")
    p.add_argument("--window", type=float, default=60.0, help="seconds measured (default 60)")
    p.add_argument("--settle", type=float, default=5.0, help="seconds before (default 5)")
    p.add_argument("--quick", action="store_true", help="15 s windows")
    p.add_argument("--no-attribute", dest="attribute", action="store_false",
                   help="skip timing the scheduler's jobs in process")
    p.add_argument("--tmp", help="folder for the per-case temporary folders")
    p.add_argument("--no-http", dest="http", action="store_false",
                   help="skip the row of `lrq run --http` (the web page and /metrics served)")
    p.add_argument("--intervals", type=_floats, default=[None],
                   help="comma list of scheduler intervals, each measured idle in turn "
                        "(default: lrq's default)")
    a = p.parse_args(argv)
    if a.quick:
        a.window = 15.0
    if a.window <= 0 or a.settle < 0 or not a.cases or min(min(c) for c in a.cases) < 1:
        p.error("--window must be positive and cases DOCS:BATCH positive")
    return a


def one(a: argparse.Namespace, cfg: Path, work: Path, docs: int, batch: int, drained: float,
        interval: float | None, http: bool = False) -> dict[str, Any]:
    """One idle measurement of the drained folder at ``interval`` (``http``: with
    ``--http``)."""
    from lrq import config

    row: dict[str, Any] = {"docs": docs, "batch": batch, "done_batches": -(-docs // batch),
                           "drain_seconds": round(drained, 2),
                           "interval": config.load(cfg).interval}
    row.update(measure_idle(run, cfg, work, a.settle, a.window, http))
    if a.attribute and not http:
        at = row["attribution"] = attribute(cfg)
        # What the jobs' own work does not explain: APScheduler's loop and thread pool, the
        # 4 Hz supervise job, logging, the interpreter.
        at["unattributed_pct_core"] = round(row["lrq_pct_core"] - at["est_pct_core_jobs"], 3)
    print(f"  {docs}:{batch} ({row['done_batches']} done batches), interval "
          f"{row['interval']:g}: lrq run{' --http' if http else ''} "
          f"{row['lrq_pct_core']:.2f}% of a core, sleep baseline "
          f"{row['baseline_pct_core']:.2f}% over {row['window_seconds']}s", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    stamp, report = run.new_report("benchmark", NAME, {
        "cases": a.cases, "window": a.window, "settle": a.settle,
        "intervals": a.intervals, "cleanup_every": 15.0, "target_pct_core": TARGET_PCT})
    print(f"idle cost: cases {a.cases}, settle {a.settle:g}s, window {a.window:g}s", flush=True)
    try:
        for docs, batch in a.cases:
            with tempfile.TemporaryDirectory(prefix="lrq-bench-idle-", dir=a.tmp) as d:
                work = Path(d)
                src = work / "source.db"
                shutil.copyfile(run.cached_source(docs), src)
                cfg = run.write_config(work, src, batch)  # the W1 queue, wordcount
                drained = drain(run, cfg, work, docs)
                for interval in a.intervals:
                    with_interval(cfg, interval)
                    report["results"].append(one(a, cfg, work, docs, batch, drained, interval))
                if a.http:  # at the last interval given (the default: lrq's)
                    report["results"].append(one(a, cfg, work, docs, batch, drained,
                                                 a.intervals[-1], http=True))
    except (BenchError, subprocess.TimeoutExpired) as e:
        print(f"bench: FAILED: {e}", file=sys.stderr)
        return 1
    run.write_report(report, stamp, NAME, table(report))
    return 0


def table(report: dict[str, Any]) -> str:
    rows = [("docs:batch", "interval", "done batches", "window s", "lrq CPU s", "lrq % core",
             "sleep CPU s", "sleep % core", "procs")]
    for r in report["results"]:
        http = " --http" if r.get("http") else ""
        rows.append((f"{r['docs']}:{r['batch']}{http}", f"{r['interval']:g}",
                     f"{r['done_batches']:,}",
                     f"{r['window_seconds']:.1f}", f"{r['lrq_cpu_seconds']:.2f}",
                     f"{r['lrq_pct_core']:.2f}", f"{r['baseline_cpu_seconds']:.2f}",
                     f"{r['baseline_pct_core']:.2f}", str(r["max_processes_in_tree"])))
    lines = [f"idle cost of `lrq run` (target < {report['settings']['target_pct_core']:g}% of "
             "one core; CPU from /proc, process tree)",
             *run._columns(rows, right=set(range(1, 9)))]
    for r in report["results"]:
        at = r.get("attribution")
        if not at:
            continue
        lines += ["", f"{r['docs']}:{r['batch']}, interval {r['interval']:g}: the scheduler's "
                  f"jobs timed in process (left/ {at['files_in_queue']['left']:,} files, right/ "
                  f"{at['files_in_queue']['right']:,}):"]
        jrows = [("job", "every s", "wall ms", "CPU ms", "est % core")]
        jrows += [(k, f"{v['every_seconds']:g}", f"{v['wall_ms']:.2f}", f"{v['cpu_ms']:.2f}",
                   f"{v['est_pct_core']:.2f}") for k, v in at["jobs"].items()]
        jrows.append(("sum of jobs", "", "", "", f"{at['est_pct_core_jobs']:.2f}"))
        jrows.append(("measured - sum", "", "", "", f"{at['unattributed_pct_core']:.2f}"))
        lines += ["  " + x for x in run._columns(jrows, right={1, 2, 3, 4})]
        lines.append("  sniff parts (a drained tick pays only the position read and the probe; "
                     "a tick with new rows also counts pending and usage): " + ", ".join(
            f"{k} {v['cpu_ms']:.2f} ms" for k, v in at["sniff_parts"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
