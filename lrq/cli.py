"""``lrq``: the command line. Each command is a few lines calling the library.

Exit codes: 0 ok, 1 the command ran and found a problem (verify mismatch, or dead letters
with ``verify --strict``; a batch failed or quarantined by ``work`` or during
``run --until-idle``; database unreachable), 2 bad usage or configuration (a key the source
lacks included), 3 another process holds the lock (scheduler, sniffer), 4 the handler is
broken (``lrq work``, ``lrq run --until-idle``: see ``handler-broken`` in the log), 141 stdout
was closed early (a pipe into ``head``; no traceback).
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import json
import logging
import os
import select
import signal
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from lrq import logfile
from lrq.errors import AlreadyRunning, ConfigError, HandlerBroken, LrqError
from lrq.redact import RedactingFormatter, redact_text

if TYPE_CHECKING:
    from lrq.config import Config

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, EXIT_BUSY = 0, 1, 2, 3
#: stdout's reader went away (``lrq show X | head -1``): 128 + SIGPIPE, as a shell reports
#: a program the signal ended, so ``set -o pipefail`` scripts see the output was cut short.
EXIT_PIPE = 141
EXIT_BROKEN = HandlerBroken.exit_code
log = logging.getLogger("lrq")

EXAMPLES = """\
examples:
  lrq init                      write a commented starter lrq.toml
  lrq run --until-idle          scheduler until the sources are drained and the queue is empty
  nohup lrq run &               the scheduler, unattended (logs rotate under data/)
  lrq run --http :8321          ... and the web page, /metrics and the API on 127.0.0.1:8321
  lrq web --http 127.0.0.1:8321 the web page alone, on the data dir (no scheduler)
  lrq work docs --burst         process every pending batch of queue docs, then exit
  lrq status --json             counts per queue
  lrq verify docs               every source item stored exactly once?
  lrq cleanup --dry-run         what the reaper and the tmp sweep would do
  lrq requeue --failed          put every failed batch back
  lrq show NAME | less          one batch: state, claim, attempts (times in ISO 8601 UTC)
  lrq dead docs                 dead letters of queue docs: key, batch, time, error
  lrq dead --key m42 --json     one dead letter in full (traceback, item)
  lrq retry-dead docs --all     after fixing the handler: publish every dead letter again
  lrq retry-dead --key m42      ... or some; storing them replaces their dead letters
  lrq --version
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
    app.check_keys()  # a changed key stops here, before the sniffer or a worker starts
    if not args.http:
        return schedule.run(app, until_idle=args.until_idle, launcher=launcher)
    from lrq import web

    server = web.serve(app.cfg, args.http)  # after the fork server: workers do not inherit it
    try:
        return schedule.run(app, until_idle=args.until_idle, launcher=launcher)
    finally:
        server.close()


def cmd_web(args: argparse.Namespace) -> int:
    from lrq import web

    app = _app(args)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _s, _f: stop.set())
    server = web.serve(app.cfg, args.http)
    print(f"serving {server.url} (data dir {app.cfg.data_dir}); POSTs need the token: "
          f"{_token_source(app.cfg)}", flush=True)
    try:
        stop.wait()
    finally:
        server.close()
    return EXIT_OK


def _token_source(cfg: Any) -> str:
    if cfg.http_token:
        return f"http_token in {cfg.path}"
    if os.environ.get("LRQ_HTTP_TOKEN"):
        return "env LRQ_HTTP_TOKEN"
    return str(cfg.data_dir / "http.token")


def cmd_sniff(args: argparse.Namespace) -> int:
    app = _app(args)
    app.check_keys()  # as run and work: a changed key stops before anything is published
    for q in app.queues(args.queue):
        app.check_key(q)
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
            print(f"lrq: {q.name}: no room on disk for more batches ({sniffer.pause_detail}); "
                  f"{app.budget().advice(app.held(), sniffer.last_bytes)}", file=sys.stderr)
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
    from lrq.process import register_worker
    from lrq.worker import reach

    app = _app(args)
    if not os.environ.get("LRQ_CHILD"):  # the scheduler checked before starting its workers
        app.check_keys()
    elif os.environ.get(logfile.LOG_FD_ENV):  # the scheduler handed over its stderr: its log
        _log_to_file(app.cfg)  # file too (lrq.logfile), where the relay used to write
    stop = threading.Event()
    current: list[Any] = []
    _graceful(stop, app.cfg.grace, current)
    failed = 0
    for q in app.queues(args.queue):
        app.check_key(q)
        if os.environ.get("LRQ_CHILD"):  # a database restarting as the scheduler starts it
            reach(functools.partial(app.sink, q), q, stop)
        worker = app.worker(q, stop=stop)
        current[:] = [worker]
        register_worker(worker.spool)  # a scheduler counts this process among the workers
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
        finally:
            worker.spool.close_owner()  # no exit handlers run in a scheduler's worker process
        s = worker.stats
        failed += s.failed + s.gave_up  # errors it recovered from leave nothing undone
        log.info("finished queue=%s batches=%d items=%d dead=%d failed=%d infra_errors=%d "
                 "seconds=%.1f rate=%.0f/s", q.name, s.batches, s.items, s.dead, s.failed,
                 s.infra_errors, s.seconds, s.rate)
    return EXIT_PROBLEM if failed else EXIT_OK


def cmd_cleanup(args: argparse.Namespace) -> int:
    from lrq import cleanup

    reports = cleanup.run(_app(args), queue=args.queue, dry_run=args.dry_run)
    if args.json:
        print(json.dumps([r.as_dict() for r in reports], indent=2))
    else:
        for r in reports:
            for line in r.lines(args.dry_run):
                print(line)
    return EXIT_BUSY if any(r.skipped for r in reports) else EXIT_OK


def cmd_requeue(args: argparse.Namespace) -> int:
    from lrq.spool import State

    app = _app(args)
    if args.quarantined:
        return _resign_quarantined(app, args)
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


def _resign_quarantined(app: Any, args: argparse.Namespace) -> int:
    """``requeue --quarantined NAME...``: re-sign after the operator confirms (see its help)."""
    from lrq.spool import State

    if not args.names:
        raise ConfigError("name the quarantined batches to re-sign (see `lrq status`, "
                          "`lrq show NAME`); there is no --quarantined for all of them")
    spools = [app.spool(q) for q in app.queues(args.queue)]
    todo = []
    for name in args.names:
        sp = next((sp for sp in spools if sp.state(name) is State.QUARANTINED), None)
        if sp is None:
            raise ConfigError(f"no quarantined batch named {name}")
        todo.append((sp, name))
    if not args.yes:
        if not sys.stdin.isatty():
            raise ConfigError("re-signing quarantined batches needs confirmation: run it on a "
                              "terminal, or pass --yes")
        print(f"Re-sign {len(todo)} quarantined batch(es) with the current key? Workers will then "
              "unpickle them, which runs any code a forged file carries: confirm only files "
              "you know lrq wrote. [y/N] ", end="", flush=True)
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            print("nothing re-signed")
            return EXIT_PROBLEM
    for sp, name in todo:
        sp.resign(name)
        print(f"{sp.queue}: {name}: re-signed, pending again")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    st = _app(args).status(args.queue)
    down = "database" in st  # the spool's part is still shown, and why the rest is missing
    if args.json:
        print(json.dumps(st, indent=2, default=str))
        return EXIT_PROBLEM if down else EXIT_OK
    db_cols = () if down else ("results", "dead letters")
    rows: list[tuple[Any, ...]] = [("queue", "pending", "claimed", "stale", "done", "failed",
                                    "quarantined", *db_cols, "disk", "position")]
    for name, s in st["queues"].items():
        db = () if down else (s["results"], s["dead_letters"])
        rows.append((name, s["pending"], s["claimed"], s["stale"], s["done"], s["failed"],
                     s["quarantined"], *db, _human(s["bytes"]),
                     "-" if s["position"] is None else s["position"]))  # a broker has none
    _print_table(rows)
    print("bytes by state: " + "; ".join(
        f"{name} pending {_human(s['pending_bytes'])}, claimed {_human(s['claimed_bytes'])}, "
        f"done {_human(s['done_bytes'])}, failed {_human(s['failed_bytes'])}, "
        f"tmp {_human(s['tmp_bytes'])}, {s.get('spare', 0)} spare files (empty, kept for reuse)"
        for name, s in st["queues"].items()))
    d = st["disk"]
    print(f"data dir {st['data_dir']}: {_human(d['used'])} of budget {_human(d['max_bytes'])} "
          f"({d['used'] / max(d['max_bytes'], 1):.0%}); filesystem free {_human(d['free_bytes'])} "
          f"of {_human(d['total_bytes'])}, {d['free_inodes']} inodes; min_free {d['min_free']}"
          + (f"  WARNING: {d['below_min_free']}" if d["below_min_free"] else ""))
    if d["blocked"]:
        print(f"WARNING: no room for the next batch: {d['blocked']}")
    for name, s in st["queues"].items():
        if s.get("awaiting_ack"):
            print(f"{name}: {s['awaiting_ack']} of the done batches await their acknowledgement "
                  "to the source (kept until the sniffer's next tick acknowledges them)")
        source = s.get("source") or {}
        if len(source) > 1:
            print(f"{name}: source " + ", ".join(f"{k} {v}" for k, v in source.items()))
        if s["key_problem"]:
            print(f"WARNING: {s['key_problem']}")
        if s["foreign"]["count"]:
            print(f"WARNING: {name}: {s['foreign']['count']} entries lrq did not write (skipped; "
                  f"remove them): {', '.join(s['foreign']['sample'])}")
    if down:
        print(f"database unreachable: {st['database']['error']}")
        return EXIT_PROBLEM
    return EXIT_OK


def _print_table(rows: list[tuple[Any, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())


def cmd_verify(args: argparse.Namespace) -> int:
    app = _app(args)
    bad = False
    for q in app.queues(args.queue):
        v = app.verify(q)
        ok = v.ok and not (args.strict and v.dead)
        dead = f"{v.dead} dead letters" if v.dead else "no dead letters"
        if args.strict and v.dead:
            dead += " (--strict)"
        print(f"{q.name}: {'ok' if ok else 'NOT OK'}, {dead}; source {v.source}, "
              f"results {v.results}, dead letters {v.dead}, missing {v.missing}, "
              f"duplicated {v.duplicated}, not in source {v.extra}, "
              f"failed batches {v.failed_batches}, quarantined {v.quarantined_batches}")
        if v.reconciled:
            print(f"  {v.reconciled}")
        if v.source_duplicates:
            print(f"  key {q.key!r} is not unique in the source: {v.source} items, {v.distinct} "
                  f"distinct; set `key` to a unique column (queues.{q.name}.key)")
        if v.missing_sample:
            print(f"  missing keys (first {len(v.missing_sample)}): {', '.join(v.missing_sample)}")
        bad |= not ok
    return EXIT_PROBLEM if bad else EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    print(json.dumps(_readable(_app(args).show(args.name)), indent=2, default=str))
    return EXIT_OK


def cmd_dead(args: argparse.Namespace) -> int:
    if args.limit < 0:
        raise ConfigError(f"--limit {args.limit}: give a count, or 0 for every dead letter")
    app = _app(args)
    keys = set(args.key) if args.key else None
    shown: list[Any] = []
    more = 0
    for q in app.queues(args.queue):
        sink = app.sink(q)
        room = None if not args.limit else max(args.limit - len(shown), 0)
        got = sink.dead_records(keys, room) if room != 0 else []
        shown += got
        more += sink.dead_count(keys) - len(got)
    if args.json:
        print(json.dumps([{**d.__dict__, "created_at": _iso(d.created_at)} for d in shown],
                         indent=2, default=str))
    elif shown:
        _print_table([("queue", "key", "batch", "created", "error")] + [
            (d.queue, d.key, d.batch, _iso(d.created_at), _first_line(d.error)) for d in shown])
    else:
        print("no dead letters" + (f" for keys {', '.join(sorted(keys))}" if keys else ""))
    if more:
        print(f"... and {more} more (--limit N, or --limit 0 for all)",
              file=sys.stderr if args.json else sys.stdout)
    return EXIT_OK


def cmd_retry_dead(args: argparse.Namespace) -> int:
    if not args.key and not args.all:
        raise ConfigError("name dead letters to retry with --key K (repeatable), or pass --all")
    app = _app(args)
    keys = set(args.key) if args.key else None
    missing = set(keys or ())
    for q in app.queues(args.queue):
        r = app.retry_dead(q, keys)
        missing &= set(r.missing)
        print(f"{q.name}: published {r.items} dead-lettered items as {len(r.batches)} retry "
              f"batches" + (f": {', '.join(r.batches)}" if r.batches else ""))
        if r.waiting:
            batches = sorted(set(r.waiting.values()))
            print(f"{q.name}: {len(r.waiting)} keys skipped: already in retry batches not stored "
                  f"yet ({', '.join(batches)}; `lrq work`, or `lrq requeue` a failed one)")
    for key in sorted(missing):
        print(f"lrq: no dead letter with key {key!r}", file=sys.stderr)
    return EXIT_PROBLEM if missing else EXIT_OK


def _iso(t: float | datetime | None) -> str | None:
    """ISO 8601: epoch seconds (lrq's files) as UTC with a Z; a database timestamp as it is
    (naive: the server's clock, UTC on SQLite)."""
    if t is None:
        return None
    if isinstance(t, datetime):
        if t.tzinfo is not None:
            t = t.astimezone(UTC)
        return t.isoformat(timespec="seconds").replace("+00:00", "Z")
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


def _first_line(text: str) -> str:
    return next((line for line in text.splitlines() if line.strip()), "")


def _exit_text(ex: dict[str, Any]) -> str:
    """A dead owner's end as the procs reaper records it: ``{"code": int|None, "signal": str|None}``."""
    if ex.get("signal") is not None:
        sig = ex["signal"]
        return f"killed by {signal.Signals(sig).name if isinstance(sig, int) else sig}"
    return f"exit code {ex['code']}" if ex.get("code") is not None else ""


def _readable(value: Any, key: str = "") -> Any:
    """``show``'s record for people: every time (``*_at``, ``created``) as ISO 8601 UTC, and
    a dead owner's exit code or signal added to its attempt's ``reason``."""
    if isinstance(value, dict):
        out = {k: _readable(v, k) for k, v in value.items()}
        ex = out.get("exit")
        text = _exit_text(ex) if isinstance(ex, dict) else ""
        if text:
            out["reason"] = f"{out['reason']} ({text})" if out.get("reason") else text
        return out
    if isinstance(value, list):
        return [_readable(v, key) for v in value]
    if isinstance(value, datetime) or (
            (key.endswith("_at") or key == "created") and isinstance(value, (int, float))
            and not isinstance(value, bool)):
        return _iso(value)
    return value


def cmd_init(args: argparse.Namespace) -> int:
    from lrq.config import DEFAULT_CONFIG
    from lrq.starter import STARTER

    path = Path(args.config or os.environ.get("LRQ_CONFIG") or DEFAULT_CONFIG)
    if path.exists() and not args.force:
        raise ConfigError(f"{path} exists; pass --force to overwrite it")
    path.write_text(STARTER)
    print(f"wrote {path}; edit the [queues.*] tables, then run `lrq run`")
    return EXIT_OK


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lrq")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from lrq import __version__

        return __version__


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
    p.add_argument("--version", action="version", version=f"lrq {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help, parents=[common])
        sp.set_defaults(func=func)
        return sp

    r = add("run", cmd_run, "run the scheduler in the foreground (same as python scheduler.py)")
    r.add_argument("--until-idle", action="store_true",
                   help="exit once sources are drained and nothing is pending or claimed; "
                        "exit 1 if batches failed or were quarantined meanwhile")
    r.add_argument("--http", metavar="HOST:PORT",
                   help="also serve the web page, /metrics and the JSON API (host defaults "
                        "to 127.0.0.1)")
    wb = add("web", cmd_web, "serve the web page, /metrics and the JSON API on a data dir")
    wb.add_argument("--http", metavar="HOST:PORT", default="127.0.0.1:8321",
                    help="where to listen (default 127.0.0.1:8321)")
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
    v.add_argument("--strict", action="store_true",
                   help="also fail (exit 1) when any item was dead-lettered")
    c = add("cleanup", cmd_cleanup, "reap stale claims, sweep orphan tmp files; print what was done")
    c.add_argument("queue", nargs="?")
    c.add_argument("--dry-run", action="store_true", help="only say what would be done")
    c.add_argument("--json", action="store_true")
    rq = add("requeue", cmd_requeue, "put failed (or stuck claimed) batches back to pending")
    rq.add_argument("names", nargs="*", metavar="NAME")
    rq.add_argument("--failed", action="store_true", help="every failed batch")
    rq.add_argument("--quarantined", action="store_true",
                    help="re-sign the named quarantined batches with the current key and make "
                         "them pending (only the signature is recomputed; nothing is unpickled "
                         "until a worker takes them): asks first; confirm only files lrq wrote")
    rq.add_argument("--yes", action="store_true",
                    help="with --quarantined: no question (for scripts)")
    rq.add_argument("--queue", help="only this queue")
    sh = add("show", cmd_show, "inspect one batch")
    sh.add_argument("name")
    d = add("dead", cmd_dead, "list dead letters: key, batch, time, the error's first line")
    d.add_argument("queue", nargs="?")
    d.add_argument("--key", action="append", metavar="K", help="only this key (repeatable)")
    d.add_argument("--json", action="store_true",
                   help="full records: the whole error and the stored item")
    d.add_argument("--limit", type=int, default=50, metavar="N",
                   help="show at most N (default 50; 0: all); says how many more there are")
    rd = add("retry-dead", cmd_retry_dead,
             "publish dead-lettered items again as new batches (after fixing the handler); "
             "storing them replaces their dead letters")
    rd.add_argument("queue", nargs="?")
    which = rd.add_mutually_exclusive_group()
    which.add_argument("--key", action="append", metavar="K", help="this key (repeatable)")
    which.add_argument("--all", action="store_true", help="every dead letter of the queue(s)")
    i = add("init", cmd_init, "write a commented starter lrq.toml")
    i.add_argument("--force", action="store_true", help="overwrite an existing file")
    return p


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    handler: logging.Handler
    if os.environ.get(logfile.LOG_FD_ENV):
        # A scheduler's worker process: it writes to the scheduler's stderr itself (and to
        # its log file, see cmd_work), in the lines the scheduler's relay used to write.
        handler = logfile.LineHandler(int(os.environ[logfile.LOG_FD_ENV]),
                                      logfile.child_format(os.environ.get(logfile.QUEUE_ENV, "-")))
    elif os.environ.get("LRQ_CHILD"):
        # A worker process started without the scheduler's stderr: the parent adds the time
        # and re-logs each line.
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(RedactingFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(RedactingFormatter(logfile.FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("apscheduler").setLevel(logging.ERROR)


def _log_to_file(cfg: Config) -> None:
    if cfg.log_file is None:
        return
    cfg.log_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    h: logging.Handler
    if os.environ.get(logfile.LOG_FD_ENV):  # a scheduler's worker: its log file, not rotated here
        h = logfile.AppendFileHandler(
            cfg.log_file, logfile.child_format(os.environ.get(logfile.QUEUE_ENV, "-")))
    else:
        h = logfile.SharedLogFile(cfg.log_file, maxBytes=cfg.log_max_bytes,
                                  backupCount=cfg.log_backups)
        h.setFormatter(RedactingFormatter(logfile.FORMAT))
    logging.getLogger().addHandler(h)


def entry(argv: list[str] | None = None) -> NoReturn:
    """The ``lrq`` program: :func:`main`, then exit without the interpreter's teardown.

    Freeing every object of a process that imported SQLAlchemy and APScheduler took 0.15-0.2 s
    here, after all work was done; a scheduler stopped by a signal or ``--until-idle`` and
    every short command paid it. atexit handlers still run and logs and output are flushed;
    nothing of lrq's own is left to write at that point (batches and claims are fsynced or
    renamed into place as they happen, and the database commits before a batch is done)."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: --help, --version and usage errors
        code = e.code if isinstance(e.code, int) else EXIT_USAGE if e.code else EXIT_OK
    atexit._run_exitfuncs()
    logging.shutdown()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        code = EXIT_PIPE
    except (OSError, ValueError):  # stdout closed or gone some other way: nothing to save
        pass
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    os._exit(code)


def _stdout_closed() -> bool:
    """Has the reader of stdout gone (``lrq show X | head -1``)? Asked when a BrokenPipeError
    reaches :func:`main`, so one from elsewhere (a socket) is not taken for it."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _fd, ev in poll.poll(0))
    except (OSError, ValueError, AttributeError):  # stdout replaced or closed: not a pipe
        return False


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        # The reader left: say nothing more; the rest of the output goes nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE
    except AlreadyRunning as e:
        print(f"lrq: {redact_text(str(e))}", file=sys.stderr)
        return EXIT_BUSY
    except ConfigError as e:
        print(f"lrq: {redact_text(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    except LrqError as e:
        print(f"lrq: {redact_text(str(e))}", file=sys.stderr)
        return EXIT_PROBLEM
    except Exception as e:
        from sqlalchemy.exc import SQLAlchemyError  # imported by every command that gets here

        if not isinstance(e, SQLAlchemyError):
            raise
        print(f"lrq: database error: {redact_text(str(getattr(e, 'orig', None) or e))}", file=sys.stderr)
        return EXIT_PROBLEM
    except KeyboardInterrupt:
        return 130
