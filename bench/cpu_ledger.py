"""CPU ledger: where W1's CPU goes per batch, step by step (issue 12).

W1 (``lrq.sample.write_documents`` documents, handler ``workers.wordcount:handle``, SQLite
results; bench/run.py's config) on the default settings plus ``batch_size = chunk_size = B``,
with lrq's real objects in this process. Every function in :data:`TARGETS` is wrapped so that
each call's thread CPU (``time.thread_time``) goes to its step, a nested call to the innermost
step only (bench/cpu_steps.py). Three phases, each measured as a whole with
``resource.getrusage(RUSAGE_SELF)`` (user + system, every thread of this process):

``sniffer``
    ``Sniffer.tick`` until the source is drained or backpressure (``max_pending``) pauses it,
    as ``lrq sniff`` runs it; alternating with
``worker``
    ``Worker.run(burst=True)`` as ``lrq work QUEUE --burst`` runs it (its store-behind and
    heartbeat threads included), until the source is drained and every batch done;
``scheduler``
    ``lrq run --until-idle`` in this process (``lrq.schedule.Runner``) on a fresh folder: its
    own CPU (the sniffer runs inside it); its worker processes are other processes, not
    counted here (the ``worker`` phase is their ledger).

For each phase: µs per batch and % of the total per step, the unaccounted remainder as its
own row, and whether the steps account for at least 90% of the measured total (the issue's
target; printed as met / not met). JSON goes to ``bench/results/<stamp>-cpu-ledger.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import run  # bench/run.py (first on sys.path): source cache, config, machine info, reports
from cpu_steps import Installed, Ledger, Summary, Target, install, overhead_per_call
from run import BenchError

NAME = "cpu-ledger"
TARGET = 0.9  # the steps must account for this share of the measured CPU
HANDLER = "{handler}"  # stands for the queue's handler, as its config names it
PUBLISHING = ("sniffer.encode", "sniffer.other")


def T(step: str, where: str, within: tuple[str, ...] = ()) -> Target:  # noqa: N802 (a table row)
    return Target(step, where, within)


#: The wrap table: a step's CPU is the own CPU of its functions (wrapped callees subtracted).
#: Add a step or a function with one line; a name that no longer resolves is reported, and
#: its time then shows in the step that calls it.
TARGETS = (
    # -- the sniffer (in the scheduler process; alone as `lrq sniff`) --
    T("sniffer.fetch", "lrq.sources.sql:SqlSource.fetch"),
    T("sniffer.encode", "lrq.spool:Spool.publish"),  # own CPU: name, pickle, compress, HMAC
    # tmp file, write, fsync, rename, fsync of left/ (inside write_position: position's)
    T("sniffer.write", "lrq.spool.batches:write_atomic", PUBLISHING),
    T("sniffer.write", "lrq.spool.files:fsync_dir", PUBLISHING),
    T("sniffer.write", "os:fsync", PUBLISHING),
    T("sniffer.write", "lrq.spool:Spool.sync_published"),  # one fsync of left/ per group
    T("sniffer.position", "lrq.spool:Spool.write_position"),
    T("sniffer.position", "lrq.spool:Spool.read_position"),
    T("sniffer.other", "lrq.sniffer:Sniffer.tick"),  # own CPU: backpressure counts, stat, loop
    # -- a worker (`lrq work`) --
    T("worker.claim", "lrq.spool:Spool.pick"),
    T("worker.claim", "lrq.spool:Spool.claim"),
    T("worker.load", "lrq.spool:Spool.load"),
    T("worker.handler", HANDLER),
    T("worker.policy", "lrq.policy:HandlerPolicy.run"),  # own CPU: chunks, the result check
    T("worker.store", "lrq.sink:Sink.store"),
    T("worker.mark", "lrq.spool:Spool.mark_handled"),
    T("worker.mark", "lrq.spool:Spool.mark_done"),
    T("worker.lease", "lrq.spool:Spool.owns"),  # the token check before a commit and per beat
    T("worker.heartbeat", "lrq.spool:Spool.heartbeat"),
    T("worker.heartbeat", "lrq.pipeline:Heartbeat.hold"),
    T("worker.heartbeat", "lrq.pipeline:Heartbeat.drop"),
    T("worker.heartbeat", "lrq.pipeline:Heartbeat._beat"),  # the heartbeat thread's loop
    T("worker.threads", "lrq.pipeline:StoreBehind.submit"),
    T("worker.threads", "lrq.pipeline:StoreBehind.start"),
    T("worker.threads", "lrq.pipeline:StoreBehind._settle"),
    T("worker.threads", "lrq.pipeline:StoreBehind.wait"),
    T("worker.threads", "lrq.pipeline:StoreBehind.raise_error"),
    T("worker.threads", "lrq.pipeline:StoreBehind.raise_fatal"),
    T("worker.threads", "lrq.pipeline:StoreBehind.close"),
    T("worker.threads", "lrq.pipeline:StoreBehind._run"),  # the committer thread's loop
    T("worker.other", "lrq.worker:Worker.run"),  # own CPU: the loop, key check, counters
    T("worker.other", "lrq.worker:Worker.commit"),  # own CPU: the commit's guard and glue
    # -- the scheduler (`lrq run`): its jobs, their own CPU (the sniffer's steps apart) --
    T("scheduler.sniff job", "lrq.schedule:Runner.sniff"),
    T("scheduler.worker job", "lrq.schedule:Runner.work"),  # spawn, relay the child's log
    T("scheduler.worker job", "lrq.schedule:Runner._start_worker"),  # on each publish
    T("scheduler.supervise", "lrq.schedule:Runner.supervise"),
    T("scheduler.cleanup", "lrq.schedule:Runner.clean"),
    T("scheduler.apscheduler", "apscheduler.schedulers.blocking:BlockingScheduler._main_loop"),
    T("scheduler.apscheduler", "apscheduler.schedulers.base:BaseScheduler._process_jobs"),
    T("scheduler.apscheduler", "apscheduler.schedulers.base:BaseScheduler.modify_job"),
    T("scheduler.apscheduler", "apscheduler.executors.pool:run_job"),
    # -- any phase --
    T("pool threads", "concurrent.futures.thread:_worker"),  # a pool thread: its loop
    T("pool threads", "concurrent.futures.thread:_WorkItem.run"),  # a work item run by it
    T("logging", "logging:Logger._log"),  # records, formatting, handlers
)
#: What each phase's table shows (in this order, a step with no calls as 0).
PHASES = {
    "sniffer": ["sniffer.fetch", "sniffer.encode", "sniffer.write", "sniffer.position",
                "sniffer.other", "logging"],
    "worker": ["worker.claim", "worker.load", "worker.handler", "worker.policy", "worker.store",
               "worker.mark", "worker.lease", "worker.heartbeat", "worker.threads", "pool threads",
               "worker.other", "logging"],
    "scheduler": ["sniffer.fetch", "sniffer.encode", "sniffer.write", "sniffer.position",
                  "sniffer.other", "scheduler.sniff job", "scheduler.worker job",
                  "scheduler.supervise", "scheduler.cleanup", "scheduler.apscheduler",
                  "pool threads", "logging"],
}
#: Steps every phase must have seen called, or the ledger missed its work (a renamed method).
REQUIRED = {
    "sniffer": ["sniffer.fetch", "sniffer.encode", "sniffer.write"],
    "worker": ["worker.claim", "worker.load", "worker.handler", "worker.store", "worker.mark"],
    "scheduler": ["scheduler.sniff job", "scheduler.worker job", "scheduler.supervise"],
}

EXAMPLES = """\
examples:
  python bench/cpu_ledger.py                  batch 100 and 1000, 200 batches each (~20 s)
  python bench/cpu_ledger.py --quick          50 batches each
  python bench/cpu_ledger.py --batch 1000 --batches 500 --detail
"""


def config_text(source: Path, batch: int) -> str:
    """bench/run.py's W1 config: the defaults, plus ``batch_size = chunk_size = B``."""
    return run.config_text(source, batch)


class Meter:
    """Each phase's CPU from ``getrusage(RUSAGE_SELF)`` over its windows, and wall time."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.cpu: dict[str, list[float]] = {}  # phase -> [user, sys, wall]

    @contextlib.contextmanager
    def window(self, phase: str) -> Iterator[None]:
        self.ledger.phase = phase
        r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        try:
            yield
        finally:
            r1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            self.ledger.phase = ""
            acc = self.cpu.setdefault(phase, [0.0, 0.0, 0.0])
            acc[0] += r1.ru_utime - r0.ru_utime
            acc[1] += r1.ru_stime - r0.ru_stime
            acc[2] += w1 - w0

    def total(self, phase: str) -> float:
        user, sys_, _ = self.cpu[phase]
        return user + sys_


@contextlib.contextmanager
def logging_as(fmt: str) -> Iterator[None]:
    """Log as an lrq process does (INFO, APScheduler at ERROR), into /dev/null instead of a
    terminal or a pipe; handlers added inside (the log file) are removed after."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    sink = open(os.devnull, "w")  # noqa: SIM115 (closed below)
    handler = logging.StreamHandler(sink)
    handler.setFormatter(logging.Formatter(fmt))
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    try:
        yield
    finally:
        for h in root.handlers:
            if h not in before:
                h.close()
        root.handlers[:] = before
        root.setLevel(level)
        sink.close()


@contextlib.contextmanager
def folder(source: Path, batch: int, tmp: str | None) -> Iterator[Path]:
    """A fresh run folder with a copy of the source and ``lrq.toml``; the cwd meanwhile (the
    config's relative SQLite URL, and the scheduler's children start there)."""
    with tempfile.TemporaryDirectory(prefix="lrq-bench-ledger-", dir=tmp) as d:
        work = Path(d)
        shutil.copyfile(source, work / "source.db")
        cfg = work / "lrq.toml"
        cfg.write_text(config_text(work / "source.db", batch))
        with contextlib.chdir(work):
            yield cfg


def sniff_and_work(cfg: Path, n: int, batch: int, meter: Meter) -> dict[str, int]:
    """Rounds of ``lrq sniff`` then ``lrq work --burst``, in process, until all is stored."""
    from lrq import config
    from lrq.app import App

    # Two Apps, as two processes would have: their own Spool, engine and caches.
    sniff_app, work_app = App(config.load(cfg)), App(config.load(cfg))
    q = sniff_app.queues()[0]
    sniffer = sniff_app.sniffer(q)
    worker = work_app.worker(work_app.queues()[0])
    published = done = 0
    for _ in range(n // batch + 10):  # every round publishes a batch at least, or drains
        with meter.window("sniffer"), sniffer.spool.lock("sniff"):
            while True:
                k = sniffer.tick()
                published += k
                if k == 0 or sniffer.drained or sniffer.paused:
                    break
        with meter.window("worker"):
            done += worker.run(burst=True, progress=True).batches
        if sniffer.drained and done == published:
            break
    stored = work_app.sink(work_app.queues()[0]).count()
    if stored != n or done != published:
        raise BenchError(f"in-process run B={batch}: {stored} rows stored of {n}, "
                         f"{done} batches done of {published} published")
    return {"sniffer": published, "worker": done}


def schedule(cfg: Path, n: int, batch: int, meter: Meter) -> int:
    """``lrq run --until-idle`` in this process, as ``lrq.cli.cmd_run`` starts it; the number
    of batches its workers did."""
    from lrq import cli, config
    from lrq.app import App
    from lrq.launcher import Launcher
    from lrq.schedule import Runner
    from lrq.spool import flock

    launcher = Launcher()
    launcher.warm()
    app = App(config.load(cfg))
    cli._log_to_file(app.cfg)
    app.cfg.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    app.check_keys()
    app.check()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with flock(app.cfg.data_dir / "scheduler.lock", "a scheduler"):
            runner = Runner(app, until_idle=True, launcher=launcher)
            with meter.window("scheduler"):
                code = runner.run()
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    q = app.queues()[0]
    batches, _items = app.sink(q).ledger_stats()
    stored = app.sink(q).count()
    if code != 0 or stored != n:
        raise BenchError(f"lrq run B={batch}: exit {code}, {stored} rows stored of {n}")
    return batches


def measure(n: int, batch: int, tmp: str | None) -> dict[str, Any]:
    """The ledger of one batch size: every phase's rows, totals and checks."""
    source = run.cached_source(n)
    ledger = Ledger()
    meter = Meter(ledger)
    handler = tomllib.loads(config_text(source, batch))["queues"][run.QUEUE]["handler"]
    targets = [Target(t.step, handler, t.within) if t.where == HANDLER else t for t in TARGETS]
    wrapped: Installed = install(ledger, targets)
    try:
        with logging_as("%(levelname)s %(name)s: %(message)s"), folder(source, batch, tmp) as cfg:
            batches = sniff_and_work(cfg, n, batch, meter)
        with logging_as("%(asctime)s %(levelname)s %(name)s: %(message)s"), \
                folder(source, batch, tmp) as cfg:
            batches["scheduler"] = schedule(cfg, n, batch, meter)
    finally:
        wrapped.restore()
    out: dict[str, Any] = {"docs": n, "batch": batch, "missing": wrapped.missing, "phases": {}}
    for phase, order in PHASES.items():
        s = ledger.summary(phase, meter.total(phase), order)
        out["phases"][phase] = phase_json(s, batches[phase], meter.cpu[phase], order)
    return out


def phase_json(s: Summary, batches: int, cpu: list[float], order: list[str]) -> dict[str, Any]:
    us = 1e6 / batches
    rows = {r.step: r for r in s.rows}
    missing = [step for step in REQUIRED[s.phase] if step not in rows]
    return {
        "batches": batches, "cpu_user_s": round(cpu[0], 4), "cpu_sys_s": round(cpu[1], 4),
        "wall_s": round(cpu[2], 3), "total_us_per_batch": round(s.total * us, 1),
        "steps": [{"step": r.step, "us_per_batch": round(r.seconds * us, 1),
                   "share": round(r.seconds / s.total, 4) if s.total else 0.0,
                   "calls_per_batch": round(r.calls / batches, 2),
                   "targets": {w: {"us_per_batch": round(sec * us, 1), "calls": c}
                               for w, (sec, c) in r.targets.items()}}
                  for r in s.rows],
        "unaccounted_us_per_batch": round(s.unaccounted * us, 1),
        "accounted": round(s.fraction, 4),
        "met": s.fraction >= TARGET and abs(1 - s.fraction) <= 1 - TARGET,
        "steps_not_seen": missing,
        "order": order,
    }


def table(result: dict[str, Any], overhead_us: float, detail: bool) -> str:
    lines = [f"CPU per batch by step, B={result['batch']}, {result['docs']:,} docs "
             "(µs of CPU per batch; % of the phase's getrusage total)"]
    rows: list[tuple[str, ...]] = [("phase", "step", "µs/batch", "%", "calls/batch")]
    for phase, p in result["phases"].items():
        seen = {s["step"]: s for s in p["steps"]}
        first = f"{phase} ({p['batches']} batches)"
        for step in p["order"] + [s for s in seen if s not in p["order"]]:
            s = seen.get(step, {"us_per_batch": 0.0, "share": 0.0, "calls_per_batch": 0.0})
            rows.append((first, step, f"{s['us_per_batch']:,.0f}", f"{100 * s['share']:.1f}",
                         f"{s['calls_per_batch']:.1f}"))
            first = ""
            if detail and step in seen and len(s["targets"]) > 1:
                rows += [("", f"  {w.split(':')[-1]}", f"{t['us_per_batch']:,.0f}", "", "")
                         for w, t in s["targets"].items()]
        total = p["total_us_per_batch"]
        rows.append(("", "unaccounted", f"{p['unaccounted_us_per_batch']:,.0f}",
                     f"{100 * p['unaccounted_us_per_batch'] / total if total else 0:.1f}", ""))
        rows.append(("", "total (getrusage)", f"{total:,.0f}", "100.0", ""))
    lines += run._columns(rows, right={2, 3, 4})
    calls = {ph: sum(s["calls_per_batch"] for s in p["steps"]) for ph, p in result["phases"].items()}
    for phase, p in result["phases"].items():
        verdict = "met" if p["met"] else "NOT MET"
        lines.append(f"{phase}: steps account for {100 * p['accounted']:.1f}% of the measured "
                     f"CPU (target >= {100 * TARGET:.0f}%, sum within 10%): {verdict}; "
                     f"{calls[phase]:.0f} wrapped calls a batch, ~{calls[phase] * overhead_us:.0f} "
                     "µs of it the ledger's own wrappers")
        if p["steps_not_seen"]:
            lines.append(f"  WARNING: {phase}: no call seen for {', '.join(p['steps_not_seen'])}: "
                         "a wrapped method renamed? see the wrap table")
    whole = sum(result["phases"][ph]["total_us_per_batch"] for ph in ("worker", "scheduler"))
    lines.append(f"whole pipeline (scheduler process + the worker phase): "
                 f"{whole:,.0f} µs of CPU per batch, {whole / result['batch']:.1f} µs per item")
    if result["missing"]:
        lines.append("not wrapped (their time shows in the step calling them):")
        lines += [f"  {w}: {why}" for w, why in result["missing"].items()]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=run.ints, default=[100, 1000],
                   help="comma list of batch sizes B (default 100,1000)")
    p.add_argument("--batches", type=int, default=200,
                   help="batches per phase: N = batches x B documents (default 200)")
    p.add_argument("--quick", action="store_true", help="50 batches per batch size")
    p.add_argument("--detail", action="store_true", help="also each step's functions")
    p.add_argument("--tmp", help="folder for the run folders (default: system tmp)")
    a = p.parse_args(argv)
    if a.quick:
        a.batches = 50
    if a.batches < 1 or not a.batch or min(a.batch) < 1:
        p.error("--batches and --batch must be positive")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    for k in run.LRQ_ENV:  # must not redirect the run folders
        os.environ.pop(k, None)
    overhead = overhead_per_call()
    stamp, report = run.new_report("benchmark", NAME, {
        "batch": a.batch, "batches": a.batches, "target": TARGET,
        "wrapper_overhead_us": round(overhead * 1e6, 3),
        "wrap_table": [[t.step, t.where, list(t.within)] for t in TARGETS]})
    print(f"CPU ledger: W1, batch {a.batch}, {a.batches} batches each, nproc "
          f"{report['machine']['nproc']}; a wrapped call costs ~{overhead * 1e6:.2f} µs",
          flush=True)
    print(f"  {run.probe_line(a.tmp, report)}", flush=True)
    tables = []
    try:
        for b in a.batch:
            result = measure(a.batches * b, b, a.tmp)
            report["results"].append(result)
            tables.append(table(result, overhead * 1e6, a.detail))
            print(tables[-1], flush=True)
    except BenchError as e:
        print(f"bench: FAILED: {e}", file=sys.stderr)
        return 1
    report["met"] = all(p["met"] for r in report["results"] for p in r["phases"].values())
    run.write_report(report, stamp, NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
