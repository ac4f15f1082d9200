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
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from lrq import logfile, logjson
from lrq.errors import AlreadyRunning, ConfigError, HandlerBroken, LrqError, NoSuchBatch
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
  lrq pause docs --by alice     stop publishing and claiming in queue docs (all processes)
  lrq resume docs               ... and go on
  lrq --log-format json run     one JSON object per log line, for log shippers
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

    cfg = config.load(args.config)
    if args.log_format is None and not os.environ.get(logjson.ENV) and cfg.log_format != "text":
        _use_format(cfg.log_format)  # the config's log_format: switch the lines set up so far
    return App(cfg)


def cmd_run(args: argparse.Namespace) -> int:
    # The worker fork server imports lrq while this process does the same: this module
    # leaves SQLAlchemy and the rest to the commands, so the server starts within ~50 ms.
    from lrq.launcher import Launcher

    launcher = Launcher(models=_names_models(args.config))
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


def _names_models(path: str | None) -> bool:
    """Does the config name a ``model`` anywhere under ``[queues]`` (a queue's or an
    output's)? Read with tomllib alone, before :mod:`lrq.config` (which imports SQLAlchemy),
    so the worker fork server starts at once and preloads the ORM only when a worker will
    need it. True when the file cannot be read: its load says why, right after."""
    import tomllib

    try:
        raw = tomllib.loads(Path(path or os.environ.get("LRQ_CONFIG") or "lrq.toml").read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return True

    def names(table: Any) -> bool:
        return isinstance(table, dict) and ("model" in table or any(map(names, table.values())))

    return names(raw.get("queues"))


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


#: Batches ``lrq sniff`` publishes per sniffer tick: its progress is counted between ticks.
SNIFF_STEP = 20


def cmd_sniff(args: argparse.Namespace) -> int:
    from lrq.display import progress

    app = _app(args)
    app.check_keys()  # as run and work: a changed key stops before anything is published
    for q in app.queues(args.queue):
        app.check_key(q)
        sniffer = app.sniffer(q)
        published = [0]  # read by the progress thread
        left = None if args.once else app.remaining(q)
        with sniffer.spool.lock("sniff"), progress(
                f"sniff {q.name}", functools.partial(published.__getitem__, 0),
                None if left is None else -(-left // q.batch_size)):
            while True:
                n = sniffer.tick(max_batches=1 if args.once else SNIFF_STEP, flush=True)
                published[0] += n
                if args.once or n == 0 or sniffer.drained or sniffer.paused:
                    break
        state = "drained" if sniffer.drained else f"paused ({sniffer.paused})" if sniffer.paused \
            else "more to fetch"
        if sniffer.paused == "operator":
            state = f"not read: the queue is {sniffer.pause_detail} (`lrq resume {q.name}`)"
        print(f"{q.name}: published {published[0]} batches; source {state}")
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
                    log.info("idle queue=%s %s", q.name,
                             "paused" if worker.paused() else "nothing pending")
            else:
                _work(worker, args)
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


def _work(worker: Any, args: argparse.Namespace) -> None:
    """``worker.run`` for ``lrq work [--burst]``: its own progress lines, or on a terminal
    (``--burst`` by hand) a progress bar over the batches pending at the start. A worker
    the scheduler starts never draws (nor imports rich)."""
    bar = args.burst and sys.stderr.isatty() and not os.environ.get("LRQ_CHILD")
    run = functools.partial(worker.run, burst=args.burst, max_seconds=args.max_seconds,
                            progress=not bar, idle_exit=args.idle_exit,
                            idle_wait=0.2 if args.idle_exit else 1.0)
    if not bar:
        run()
        return
    from lrq.display import progress

    sp = worker.spool
    with progress(f"work {worker.queue.name}", lambda: worker.stats.settled,
                  len(sp.pending()) + len(sp.claimed())):
        run()


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
    app = _app(args)
    if args.quarantined:
        return _resign_quarantined(app, args)
    if not args.names and not args.failed:
        raise ConfigError("name batches to requeue, or pass --failed for every failed batch")
    n = app.requeue_failed(args.queue) if args.failed else 0
    missing = []
    for name in args.names:
        try:
            queue, outcome = app.requeue(name, args.queue)
        except NoSuchBatch:
            missing.append(name)
            continue
        n += 1
        print(f"{queue}: {name}: {outcome}")
    for name in missing:
        print(f"lrq: no batch named {name}", file=sys.stderr)
    print(f"requeued {n} batches")
    return EXIT_PROBLEM if missing else EXIT_OK


def cmd_pause(args: argparse.Namespace) -> int:
    app = _app(args)
    before = app.paused(args.queue)
    record = app.pause(args.queue, args.by)
    print(f"{args.queue}: {'already ' if before else ''}paused since {record['since']} by "
          f"{record['by']}: nothing is published or claimed until `lrq resume {args.queue}`; "
          "batches in hand finish")
    return EXIT_OK


def cmd_resume(args: argparse.Namespace) -> int:
    app = _app(args)
    if app.resume(args.queue, args.by):
        print(f"{args.queue}: resumed")
    else:
        print(f"{args.queue}: was not paused")
    return EXIT_OK


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
    from lrq import display

    app = _app(args)
    if args.watch is not None:
        if args.watch <= 0:
            raise ConfigError(f"--watch {args.watch}: give the seconds between refreshes (> 0)")
        return display.watch(app, args.queue, args.watch, as_json=args.json)
    st = app.status(args.queue)
    if args.json:
        print(json.dumps(st.to_json(), indent=2, default=str))
    else:
        for line in display.status_lines(st):
            print(line)
    # the spool's part is still shown, and why the rest is missing
    return EXIT_PROBLEM if st.database_error is not None else EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    app = _app(args)
    bad = False
    found = []
    for q in app.queues(args.queue):
        v = _verify_one(app, q)
        ok = v.ok and not (args.strict and v.dead)
        bad |= not ok
        if args.json:
            found.append({**v.to_json(), "ok": ok})
            continue
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
        for o in v.outputs:
            what = "aggregating, " if o.aggregate else "" if o.listed else "keys not listed, "
            print(f"  output {o.output}: {'ok' if o.ok else 'NOT OK'} ({what}results {o.results}, "
                  f"dead letters {o.dead}, missing {o.missing}, duplicated {o.duplicated}, "
                  f"not in source {o.extra})")
            if o.missing_sample:
                print(f"    missing keys (first {len(o.missing_sample)}): "
                      f"{', '.join(o.missing_sample)}")
    if args.json:
        print(json.dumps(found if args.queue is None else found[0], indent=2, default=str))
    return EXIT_PROBLEM if bad else EXIT_OK


def _verify_one(app: Any, q: Any) -> Any:
    """``app.verify(q)`` with a progress bar (or lines) over the source's keys on stderr;
    its total is the source's row count where it can tell (``remaining(None)``)."""
    from lrq.display import progress

    seen = [0]
    count = getattr(app.source(q), "remaining", None)
    total = count(None) if callable(count) else None
    with progress(f"verify {q.name}", lambda: seen[0], total, unit="keys"):
        return app.verify(q, progress=lambda n: seen.__setitem__(0, n))


def cmd_show(args: argparse.Namespace) -> int:
    from lrq import display

    print(json.dumps(display.readable(_app(args).show(args.name).to_json()), indent=2, default=str))
    return EXIT_OK


def cmd_dead(args: argparse.Namespace) -> int:
    from lrq import display

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
        print(json.dumps([{**d.__dict__, "created_at": display.iso(d.created_at)} for d in shown],
                         indent=2, default=str))
    elif shown:
        display.print_table([("queue", "key", "batch", "created", "error")] + [
            (d.queue, d.key, d.batch, display.iso(d.created_at), display.first_line(d.error)) for d in shown])
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


def cmd_init(args: argparse.Namespace) -> int:
    from lrq.config import DEFAULT_CONFIG
    from lrq.starter import STARTER

    path = Path(args.config or os.environ.get("LRQ_CONFIG") or DEFAULT_CONFIG)
    if path.exists() and not args.force:
        raise ConfigError(f"{path} exists; pass --force to overwrite it")
    path.write_text(STARTER)
    print(f"wrote {path}; edit the [queues.*] tables, then run `lrq run`")
    return EXIT_OK


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
    p.add_argument("--log-format", choices=logjson.FORMATS, default=None,
                   help="log lines as text (default) or one JSON object per line (env "
                        "LRQ_LOG_FORMAT, config log_format)")
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
    st.add_argument("--watch", nargs="?", type=float, const=2.0, metavar="SECONDS",
                    help="refresh every SECONDS (default 2) until Ctrl-C: a live table on a "
                         "terminal, one line per queue per refresh otherwise (with --json: "
                         "one JSON document per line per refresh)")
    v = add("verify", cmd_verify, "check every source item has exactly one result")
    v.add_argument("queue", nargs="?")
    v.add_argument("--strict", action="store_true",
                   help="also fail (exit 1) when any item was dead-lettered")
    v.add_argument("--json", action="store_true",
                   help="one JSON document (a list of them without QUEUE); a queue with "
                        "outputs adds \"outputs\": {name: {...}}")
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
    pa = add("pause", cmd_pause, "pause a queue: publish and claim nothing new (in every "
             "process, across restarts) until `lrq resume`; batches in hand finish")
    pa.add_argument("queue", metavar="NAME")
    pa.add_argument("--by", metavar="WHO", help="who pauses, shown by status (default user@host)")
    re_ = add("resume", cmd_resume, "resume a paused queue")
    re_.add_argument("queue", metavar="NAME")
    re_.add_argument("--by", metavar="WHO", help="who resumes, for the log (default user@host)")
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


def _setup_logging(verbose: bool, fmt: str = "text") -> None:
    """Log to stderr in ``fmt`` ("text" or "json", :mod:`lrq.logjson`)."""
    level = logging.DEBUG if verbose else logging.INFO
    handler: logging.Handler
    if os.environ.get(logfile.LOG_FD_ENV):
        # A scheduler's worker process: it writes to the scheduler's stderr itself (and to
        # its log file, see cmd_work), in the lines the scheduler's relay used to write.
        handler = logfile.LineHandler(int(os.environ[logfile.LOG_FD_ENV]), _formatter(fmt))
    elif os.environ.get("LRQ_CHILD"):
        # A worker process started without the scheduler's stderr: the parent adds the time
        # and re-logs each line (as text: the relay reads the level from its first word).
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(RedactingFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_formatter(fmt))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("apscheduler").setLevel(logging.ERROR)


def _formatter(fmt: str) -> logging.Formatter:
    """This process's line format: a scheduler's worker tags its lines with its queue."""
    if os.environ.get(logfile.LOG_FD_ENV):
        return logfile.child_format(os.environ.get(logfile.QUEUE_ENV, "-"), fmt)
    return logjson.JsonFormatter() if fmt == "json" else RedactingFormatter(logfile.FORMAT)


def _use_format(fmt: str) -> None:
    """Switch the log lines set up by :func:`_setup_logging` to ``fmt`` (the config's
    ``log_format``, known only once the config is read)."""
    if os.environ.get("LRQ_CHILD") and not os.environ.get(logfile.LOG_FD_ENV):
        return  # relayed by the scheduler, which reads the text format
    for h in logging.getLogger().handlers:
        if isinstance(h, (logging.StreamHandler, logfile.LineHandler)):
            h.setFormatter(_formatter(fmt))


def _log_to_file(cfg: Config) -> None:
    if cfg.log_file is None:
        return
    cfg.log_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fmt = logjson.in_use()
    h: logging.Handler
    if os.environ.get(logfile.LOG_FD_ENV):  # a scheduler's worker: its log file, not rotated here
        h = logfile.AppendFileHandler(cfg.log_file, _formatter(fmt))
    else:
        h = logfile.SharedLogFile(cfg.log_file, maxBytes=cfg.log_max_bytes,
                                  backupCount=cfg.log_backups)
        h.setFormatter(_formatter(fmt))
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
    _setup_logging(args.verbose, logjson.chosen(args.log_format))
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
