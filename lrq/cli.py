"""``lrq``: the command line. Each command is a few lines calling the library.

Exit codes: 0 ok, 1 the command ran and found a problem (verify mismatch, failed batch),
2 bad usage or configuration, 3 another process holds the lock (scheduler, sniffer),
4 the handler is broken (``lrq work``, ``lrq run --until-idle``: see ``handler-broken`` in
the log).
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import logging.handlers
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn

from lrq.errors import AlreadyRunning, ConfigError, HandlerBroken, LrqError

if TYPE_CHECKING:
    from lrq.config import Config

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, EXIT_BUSY = 0, 1, 2, 3
EXIT_BROKEN = HandlerBroken.exit_code
log = logging.getLogger("lrq")

EXAMPLES = """\
examples:
  lrq init                      write a commented starter lrq.toml
  lrq run --until-idle          scheduler until the sources are drained and the queue is empty
  nohup lrq run &               the scheduler, unattended (logs rotate under data/)
  lrq work docs --burst         process every pending batch of queue docs, then exit
  lrq status --json             counts per queue
  lrq verify docs               every source item stored exactly once?
  lrq cleanup --dry-run         what the reaper and the tmp sweep would do
  lrq requeue --failed          put every failed batch back
"""


def _app(args: argparse.Namespace) -> Any:
    from lrq import config
    from lrq.app import App

    return App(config.load(args.config))


def cmd_run(args: argparse.Namespace) -> int:
    # The worker fork server imports lrq while this process does the same: this module
    # leaves SQLAlchemy and the rest to the commands, so the server starts within ~50 ms.
    from lrq.launcher import Launcher

    launcher = Launcher()
    launcher.warm()
    from lrq import schedule

    app = _app(args)
    _log_to_file(app.cfg)
    app.cfg.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return schedule.run(app, until_idle=args.until_idle, launcher=launcher)


def cmd_sniff(args: argparse.Namespace) -> int:
    app = _app(args)
    for q in app.queues(args.queue):
        sniffer = app.sniffer(q)
        total = 0
        with sniffer.spool.lock("sniff"):
            while True:
                n = sniffer.tick(max_batches=1 if args.once else None)
                total += n
                if args.once or n == 0 or sniffer.drained or sniffer.paused:
                    break
        state = "drained" if sniffer.drained else f"paused ({sniffer.paused})" if sniffer.paused \
            else "more to fetch"
        print(f"{q.name}: published {total} batches; source {state}")
        if sniffer.paused in ("budget", "min_free", "disk-full"):
            print(f"lrq: {q.name}: no room on disk for more batches; run `lrq cleanup` or see "
                  "`lrq status`", file=sys.stderr)
            return EXIT_PROBLEM
    return EXIT_OK


def _graceful(stop: threading.Event, grace: float, current: list[Any]) -> None:
    """SIGTERM/SIGINT: stop claiming; after ``grace`` seconds (or a second signal) give the
    current batch back, uncounted, and exit 0."""

    def give_up() -> None:
        for worker in current:
            worker.abandon()
        logging.shutdown()
        os._exit(EXIT_OK)

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():
            give_up()
        stop.set()
        log.info("stopping signal=%s: finishing the current batch (grace %.0fs)",
                 signal.Signals(signum).name, grace)
        timer = threading.Timer(grace, give_up)
        timer.daemon = True
        timer.start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)


def cmd_work(args: argparse.Namespace) -> int:
    app = _app(args)
    stop = threading.Event()
    current: list[Any] = []
    _graceful(stop, app.cfg.grace, current)
    failed = 0
    for q in app.queues(args.queue):
        worker = app.worker(q, stop=stop)
        current[:] = [worker]
        log.info("working queue=%s pid=%d", q.name, os.getpid())  # signals are handled now
        try:
            if args.batch:
                if not worker.run_named(args.batch):
                    print(f"lrq: batch {args.batch} is {worker.spool.state(args.batch).value}, "
                          "not pending", file=sys.stderr)
                    return EXIT_PROBLEM
            elif args.once:
                if not worker.run_once():
                    log.info("idle queue=%s nothing pending", q.name)
            else:
                worker.run(burst=args.burst, max_seconds=args.max_seconds, progress=True,
                           idle_exit=args.idle_exit, idle_wait=0.2 if args.idle_exit else 1.0)
        except HandlerBroken:  # logged once, as handler-broken, by the worker
            return EXIT_BROKEN
        s = worker.stats
        failed += s.failed + s.infra_errors
        log.info("finished queue=%s batches=%d items=%d dead=%d failed=%d infra_errors=%d "
                 "seconds=%.1f rate=%.0f/s", q.name, s.batches, s.items, s.dead, s.failed,
                 s.infra_errors, s.seconds, s.rate)
    return EXIT_PROBLEM if failed else EXIT_OK


def cmd_cleanup(args: argparse.Namespace) -> int:
    from lrq import cleanup

    reports = cleanup.run(_app(args), queue=args.queue, dry_run=args.dry_run)
    if args.json:
        print(json.dumps([r.as_dict() for r in reports], indent=2))
    for r in reports:
        for line in r.lines(args.dry_run):
            print(line)
    return EXIT_BUSY if any(r.skipped for r in reports) else EXIT_OK


def cmd_requeue(args: argparse.Namespace) -> int:
    from lrq.spool import State

    app = _app(args)
    if not args.names and not args.failed:
        raise ConfigError("name batches to requeue, or pass --failed for every failed batch")
    spools = [app.spool(q) for q in app.queues(args.queue)]
    todo = [(sp, p.stem) for sp in spools for p in sorted(sp.failed.glob("*.pkl"))] \
        if args.failed else []
    missing = []
    for name in args.names:
        sp = next((sp for sp in spools if sp.state(name) is not State.MISSING), None)
        if sp is None:
            missing.append(name)
        else:
            todo.append((sp, name))
    for sp, name in todo:
        print(f"{sp.queue}: {name}: {sp.requeue(name)}")
    for name in missing:
        print(f"lrq: no batch named {name}", file=sys.stderr)
    print(f"requeued {len(todo)} batches")
    return EXIT_PROBLEM if missing else EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    st = _app(args).status(args.queue)
    if args.json:
        print(json.dumps(st, indent=2, default=str))
        return EXIT_OK
    rows = [("queue", "pending", "claimed", "stale", "done", "failed", "quarantined",
             "dead letters", "disk", "stored items", "position")]
    for name, s in st["queues"].items():
        rows.append((name, s["pending"], s["claimed"], s["stale"], s["done"], s["failed"],
                     s["quarantined"], s["dead_letters"], _human(s["bytes"]), s["ledger_items"],
                     s["position"]))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
    print("bytes by state: " + "; ".join(
        f"{name} pending {_human(s['pending_bytes'])}, claimed {_human(s['claimed_bytes'])}, "
        f"done {_human(s['done_bytes'])}, failed {_human(s['failed_bytes'])}, "
        f"tmp {_human(s['tmp_bytes'])}" for name, s in st["queues"].items()))
    d = st["disk"]
    print(f"data dir {st['data_dir']}: {_human(d['used'])} of budget {_human(d['max_bytes'])} "
          f"({d['used'] / max(d['max_bytes'], 1):.0%}); filesystem free {_human(d['free_bytes'])} "
          f"of {_human(d['total_bytes'])}, {d['free_inodes']} inodes; min_free {d['min_free']}"
          + (f"  WARNING: {d['below_min_free']}" if d["below_min_free"] else ""))
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    app = _app(args)
    bad = False
    for q in app.queues(args.queue):
        v = app.verify(q)
        print(f"{q.name}: source {v.source}, results {v.results}, dead letters {v.dead}, "
              f"missing {v.missing}, duplicated {v.duplicated}, not in source {v.extra}, "
              f"failed batches {v.failed_batches}, quarantined {v.quarantined_batches}")
        if v.missing_sample:
            print(f"  missing keys (first {len(v.missing_sample)}): {', '.join(v.missing_sample)}")
        bad |= not v.ok
    return EXIT_PROBLEM if bad else EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    print(json.dumps(_app(args).show(args.name), indent=2, default=str))
    return EXIT_OK


def cmd_init(args: argparse.Namespace) -> int:
    from lrq.starter import STARTER

    from lrq.config import DEFAULT_CONFIG

    path = Path(args.config or os.environ.get("LRQ_CONFIG") or DEFAULT_CONFIG)
    if path.exists() and not args.force:
        raise ConfigError(f"{path} exists; pass --force to overwrite it")
    path.write_text(STARTER)
    print(f"wrote {path}; edit the [queues.*] tables, then run `lrq run`")
    return EXIT_OK


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lrq", description=__doc__.splitlines()[0].strip("`: "),
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=argparse.SUPPRESS,
                        help="config file (default ./lrq.toml, env LRQ_CONFIG)")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging")
    p.add_argument("-c", "--config", help="config file (default ./lrq.toml, env LRQ_CONFIG)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help, parents=[common])
        sp.set_defaults(func=func)
        return sp

    r = add("run", cmd_run, "run the scheduler in the foreground (same as python scheduler.py)")
    r.add_argument("--until-idle", action="store_true",
                   help="exit once sources are drained and nothing is pending or claimed")
    s = add("sniff", cmd_sniff, "prefetch batches from the source now")
    s.add_argument("queue", nargs="?")
    s.add_argument("--once", action="store_true", help="publish at most one batch")
    w = add("work", cmd_work, "process batches by hand")
    w.add_argument("queue", nargs="?")
    mode = w.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="process one batch")
    mode.add_argument("--burst", action="store_true", help="process every pending batch, then exit")
    mode.add_argument("--batch", metavar="NAME", help="process the named batch")
    w.add_argument("--max-seconds", type=float, help="stop claiming after this long")
    w.add_argument("--idle-exit", type=float, metavar="SECONDS",
                   help="exit once nothing was pending for this long")
    st = add("status", cmd_status, "pending, claimed, done and failed batches per queue")
    st.add_argument("queue", nargs="?")
    st.add_argument("--json", action="store_true")
    v = add("verify", cmd_verify, "check every source item has exactly one result")
    v.add_argument("queue", nargs="?")
    c = add("cleanup", cmd_cleanup, "reap stale claims, sweep orphan tmp files; print what was done")
    c.add_argument("queue", nargs="?")
    c.add_argument("--dry-run", action="store_true", help="only say what would be done")
    c.add_argument("--json", action="store_true")
    rq = add("requeue", cmd_requeue, "put failed (or stuck claimed) batches back to pending")
    rq.add_argument("names", nargs="*", metavar="NAME")
    rq.add_argument("--failed", action="store_true", help="every failed batch")
    rq.add_argument("--queue", help="only this queue")
    sh = add("show", cmd_show, "inspect one batch")
    sh.add_argument("name")
    i = add("init", cmd_init, "write a commented starter lrq.toml")
    i.add_argument("--force", action="store_true", help="overwrite an existing file")
    return p


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("LRQ_CHILD"):
        # A scheduler's worker process: the parent adds the time and re-logs each line.
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("apscheduler").setLevel(logging.ERROR)


def _log_to_file(cfg: Config) -> None:
    if cfg.log_file is None:
        return
    cfg.log_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    h = logging.handlers.RotatingFileHandler(cfg.log_file, maxBytes=cfg.log_max_bytes,
                                             backupCount=cfg.log_backups)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(h)


def entry(argv: list[str] | None = None) -> NoReturn:
    """The ``lrq`` program: :func:`main`, then exit without the interpreter's teardown.

    Freeing every object of a process that imported SQLAlchemy and APScheduler took 0.15-0.2 s
    here, after all work was done; a scheduler stopped by a signal or ``--until-idle`` and
    every short command paid it. atexit handlers still run and logs and output are flushed;
    nothing of lrq's own is left to write at that point (batches and claims are fsynced or
    renamed into place as they happen, and the database commits before a batch is done)."""
    code = main(argv)
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except AlreadyRunning as e:
        print(f"lrq: {e}", file=sys.stderr)
        return EXIT_BUSY
    except ConfigError as e:
        print(f"lrq: {e}", file=sys.stderr)
        return EXIT_USAGE
    except LrqError as e:
        print(f"lrq: {e}", file=sys.stderr)
        return EXIT_PROBLEM
    except Exception as e:
        from sqlalchemy.exc import SQLAlchemyError  # imported by every command that gets here

        if not isinstance(e, SQLAlchemyError):
            raise
        print(f"lrq: database error: {getattr(e, 'orig', None) or e}", file=sys.stderr)
        return EXIT_PROBLEM
    except KeyboardInterrupt:
        return 130
