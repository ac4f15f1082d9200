"""Benchmark W2 model service: lrq workers calling an HTTP model, against its ceiling.

The local entity service (``workers.entity_service.make_server``) runs in a thread of this
process on 127.0.0.1 with ``delay_ms`` + ``per_item_ms`` per item of latency (defaults
20 ms + 0.2 ms/doc, like a remote model). One queue maps N sample documents through it:
``handler = "workers.entity_service:EntityService"``, ``model = "workers.models:DocEntMap"``,
``workers = W``, ``batch_size = 100``, ``chunk_size = C`` (one HTTP call per chunk).

N is chosen per configuration so that the ceiling run lasts ``--seconds`` (default 20 s,
5 s with ``--quick``; rounded up to a multiple of 1000 docs): lrq's fixed start-up (about a
second: scheduler, first sniff, a worker process's start) then weighs a few percent, not
half of a 1.5 s run. ``--docs`` fixes N for every configuration instead.

Compared, in the same run, for every C:

``lrq``
    ``lrq -c CFG run --until-idle`` as a subprocess, launch to exit; then ``lrq verify``
    must exit 0 and ``doc_ent_map`` must hold exactly N rows equal to the plain loop's.
``plain``
    W threads in this process, each with its own ``EntityService``, calling the service on
    the same calls lrq makes (batches of ``batch_size``, each cut into chunks of C) taken
    from a shared list; nothing is stored. Timed from the threads' start to their join.
``ceiling``
    What the service allows at concurrency W: W calls in flight at all times (one per
    worker), no time between calls, each call of k items answered after exactly
    ``delay_ms + per_item_ms * k``; the calls split evenly over the W workers. When C
    divides ``batch_size`` and ``batch_size`` divides N that is
    ``W * C / ((delay_ms + per_item_ms * C) / 1000)`` items/s; otherwise the short chunks
    at the end of each batch are counted as the calls they are.
``lrq window``
    Items after the first batch over first to last batch done: the steady state, without
    lrq's start-up (launch to first batch started, reported separately) and its tail (last
    batch done to exit).

JSON goes to ``bench/results/<timestamp>-w2-service.json``.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.entity_service import EntityServer

import run  # bench/run.py (first on sys.path): source cache, lrq command, machine info, tables
from run import BenchError

NAME = "w2-service"
WORKLOAD = "W2 model service"
QUEUE = "ents"

CONFIG = """\
data_dir = "data"
db_url   = "sqlite:///data/results.db"

[queues.{queue}]
handler         = "workers.entity_service:EntityService"
handler_options = {{ url = "{url}" }}
model           = "workers.models:DocEntMap"
key             = "doc_id"
workers         = {workers}
batch_size      = {batch}
chunk_size      = {chunk}
""" + run.SOURCE_CONFIG

EXAMPLES = """\
examples:
  python bench/w2_service.py --quick            ~5 s ceiling runs, C = 10 and 50, W = 2
  python bench/w2_service.py                    ~20 s ceiling runs (19,000 and 67,000 docs)
  python bench/w2_service.py --docs 5000        5000 docs for every configuration
  python bench/w2_service.py --repeat 3 --chunks 10,50,100 --workers 2,4
"""




@dataclass
class Measured:
    seconds: float
    rows: int
    digest: str
    detail: dict[str, Any] = field(default_factory=dict)


def calls(n: int, batch: int, chunk: int) -> list[int]:
    """Items per HTTP call, as lrq makes them: batches of ``batch``, cut into ``chunk``s."""
    return [min(chunk, b - i) for b in (min(batch, n - s) for s in range(0, n, batch))
            for i in range(0, b, chunk)]


def ceiling(n: int, workers: int, batch: int, chunk: int, delay_ms: float,
            per_item_ms: float) -> float:
    """Items/s with ``workers`` calls always in flight and nothing between them: the calls
    of :func:`calls` split evenly over the workers, each answered after exactly
    ``delay_ms + per_item_ms * k``. ``W * C / ((delay_ms + per_item_ms * C) / 1000)`` when
    C divides ``batch`` and ``batch`` divides N."""
    service_ms = sum(delay_ms + per_item_ms * k for k in calls(n, batch, chunk))
    return n / (service_ms / 1000 / workers)


def docs_for(seconds: float, workers: int, batch: int, chunk: int, delay_ms: float,
             per_item_ms: float) -> int:
    """N for a ceiling run of about ``seconds``, rounded up to a multiple of 1000 and of
    ``batch`` (so cached sources are few and batches full)."""
    step = math.lcm(1000, batch)
    per_batch = ceiling(batch, workers, batch, chunk, delay_ms, per_item_ms)
    return max(step, math.ceil(per_batch * seconds / step) * step)


def rows_digest(rows: list[tuple[str, str, str]]) -> str:
    h = hashlib.sha1()
    for r in sorted(rows):
        h.update("\t".join(r).encode() + b"\n")
    return h.hexdigest()


# -- the service ---------------------------------------------------------------------------
class Service:
    """The entity service serving in a daemon thread of this process."""

    def __init__(self, delay_ms: float, per_item_ms: float) -> None:
        from workers.entity_service import make_server

        self.server: EntityServer = make_server(host="127.0.0.1", port=0, delay_ms=delay_ms,
                                                per_item_ms=per_item_ms)
        self.thread = threading.Thread(target=self.server.serve_forever, name="entity-service",
                                       daemon=True)

    @property
    def url(self) -> str:
        return str(self.server.url)

    def __enter__(self) -> Service:
        self.thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


# -- plain: W threads in process ------------------------------------------------------------
def load_items(source: Path) -> list[dict[str, Any]]:
    """The items lrq's sniffer would make: fields id, doc_id, content."""
    with sqlite3.connect(source) as conn:
        return [{"id": i, "doc_id": mid, "content": content} for i, mid, content in
                conn.execute("SELECT id, mid, content FROM source_data ORDER BY id")]


def run_plain(url: str, items: list[dict[str, Any]], workers: int, batch: int, chunk: int,
              timeout: float) -> Measured:
    from workers.entity_service import EntityService

    chunks, at = [], 0
    for k in calls(len(items), batch, chunk):
        chunks.append(items[at:at + k])
        at += k
    chunks.reverse()  # popped from the end: the first call first
    lock = threading.Lock()
    out: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    clients = [EntityService(url) for _ in range(workers)]

    def loop(client: EntityService) -> None:
        try:
            while True:
                with lock:
                    if not chunks or errors:
                        return
                    part = chunks.pop()
                rows = client(part)
                with lock:
                    out.extend(rows)
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            with lock:
                errors.append(e)

    threads = [threading.Thread(target=loop, args=(c,), daemon=True) for c in clients]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    seconds = time.perf_counter() - t0
    for c in clients:
        c.close()
    if any(t.is_alive() for t in threads):
        with lock:
            chunks.clear()
        raise BenchError(f"plain loop did not finish in {timeout:.0f}s")
    if errors:
        raise BenchError(f"plain loop failed: {type(errors[0]).__name__}: {errors[0]}")
    rows = [(str(r["doc_id"]), r["ent_list_str"], r["mapped_list_str"]) for r in out]
    return Measured(seconds=seconds, rows=len(rows), digest=rows_digest(rows))


# -- lrq -------------------------------------------------------------------------------------
def run_lrq(url: str, source: Path, n: int, workers: int, batch: int, chunk: int,
            tmp: str | None, timeout: float) -> Measured:
    with tempfile.TemporaryDirectory(prefix="lrq-bench-w2-", dir=tmp) as d:
        work = Path(d)
        src = work / "source.db"
        shutil.copyfile(source, src)
        cfg = work / "lrq.toml"
        cfg.write_text(CONFIG.format(queue=QUEUE, url=url, workers=workers, batch=batch,
                                     chunk=chunk, source=src))
        log = work / "run.out"
        cmd = [*run.lrq_command(), "-c", str(cfg)]
        t0 = time.perf_counter()
        launched = time.time()
        with log.open("w") as out:
            proc = subprocess.Popen([*cmd, "run", "--until-idle"], cwd=work, env=run.lrq_env(),
                                    stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                run._stop(proc)
                raise BenchError(f"lrq run did not finish in {timeout:.0f}s; log tail:\n"
                                 f"{run._tail(log)}") from None
        seconds = time.perf_counter() - t0
        if code != 0:
            raise BenchError(f"lrq run exited {code}; log tail:\n{run._tail(log)}")
        check = subprocess.run([*cmd, "verify"], cwd=work, env=run.lrq_env(),
                               capture_output=True, text=True, timeout=timeout)
        if check.returncode != 0:
            raise BenchError(f"lrq verify exited {check.returncode}:\n{check.stdout}"
                             f"{check.stderr}")
        with sqlite3.connect(work / "data" / "results.db") as conn:
            rows = [(str(a), b, c) for a, b, c in conn.execute(
                "SELECT doc_id, ent_list_str, mapped_list_str FROM doc_ent_map")]
        detail = run.lrq_timeline(work / "data" / "lrq.log", launched)
        detail.update(batch_times(run, work / "data" / "lrq.log", launched, workers))
    first, last = detail.get("first_done"), detail.get("last_done")
    batches = sum(detail.get("batches_per_worker_pid", {}).values())
    if detail.get("worker_spans"):  # launch to the first batch started in any worker
        detail["startup"] = min(span[0] for span in detail["worker_spans"].values())
    if last is not None:  # the last batch done to the run's exit (idle seen, shut down)
        detail["tail"] = round(seconds - last, 3)
    if first is not None and last is not None and last > first and batches > 1:
        # Items done after the first batch, over the time after it: the steady state.
        detail["window_items_per_s"] = round((n - n / batches) / (last - first), 1)
    return Measured(seconds=seconds, rows=len(rows), digest=rows_digest(rows), detail=detail)


#: A worker's ``done`` line as the scheduler relays it: ``[QUEUE PID] lrq.worker: done ...``.
_DONE = re.compile(r"\[\S+ (\d+)\] (?:\S+: )?done queue=\S+ batch=\S+ items=(\d+) "
                   r".* seconds=([\d.]+)")


def batch_times(run: Any, log: Path, launched: float, workers: int) -> dict[str, Any]:
    """From the ``done`` lines: how long a batch took inside a worker (load to done marker,
    the ``seconds=`` field), when each worker process was busy, and how much of the
    ``workers`` x window the workers spent on batches."""
    per_pid: dict[str, list[tuple[float, float]]] = {}
    for line in log.read_text(errors="replace").splitlines():
        m = run._LOG_LINE.match(line)
        d = _DONE.search(line) if m else None
        if not (m and d):
            continue
        at = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp() - launched
        per_pid.setdefault(d[1], []).append((at, float(d[3])))
    if not per_pid:
        return {}
    spans = {pid: (round(v[0][0] - v[0][1], 3), round(v[-1][0], 3), len(v))
             for pid, v in per_pid.items()}
    busy = sum(s for v in per_pid.values() for _, s in v)
    start = min(s[0] for s in spans.values())
    end = max(s[1] for s in spans.values())
    seconds = sorted(s for v in per_pid.values() for _, s in v)
    return {"worker_spans": spans,  # pid: (first batch started, last batch done, batches)
            "batch_seconds_median": round(statistics.median(seconds), 4),
            "batch_seconds_max": round(seconds[-1], 4),
            "busy_share": round(busy / (workers * (end - start)), 3) if end > start else None}


# -- driving ---------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=20.0,
                   help="N per configuration: docs for a ceiling run this long (default 20)")
    p.add_argument("--docs", type=int, help="N for every configuration instead of --seconds")
    p.add_argument("--chunks", type=run.ints, default=[10, 50], help="chunk sizes C (default 10,50)")
    p.add_argument("--workers", type=run.ints, default=[2], help="worker counts W (default 2)")
    p.add_argument("--batch", type=int, default=100, help="batch_size (default 100)")
    p.add_argument("--repeat", type=int, default=1, help="runs per configuration (median)")
    p.add_argument("--delay-ms", type=float, default=20.0, help="service latency per call")
    p.add_argument("--per-item-ms", type=float, default=0.2, help="service latency per doc")
    p.add_argument("--quick", action="store_true", help="--seconds 5, one run")
    p.add_argument("--tmp", help="folder for the per-run temporary folders")
    a = p.parse_args(argv)
    if a.quick:
        a.seconds, a.repeat = 5.0, 1
    if min([a.docs or 1, a.batch, a.repeat, *a.chunks, *a.workers]) < 1 or a.seconds <= 0:
        p.error("every count and --seconds must be positive")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    stamp, report = run.new_report("workload", WORKLOAD, {
        "docs": a.docs, "seconds": a.seconds, "chunks": a.chunks, "workers": a.workers,
        "batch": a.batch, "repeat": a.repeat, "delay_ms": a.delay_ms,
        "per_item_ms": a.per_item_ms, "interval": 1.0})
    size = f"docs {a.docs}" if a.docs else f"docs for a {a.seconds:g} s ceiling run"
    print(f"{WORKLOAD}: {size}, chunks {a.chunks}, workers {a.workers}, batch {a.batch}, "
          f"service {a.delay_ms} ms + {a.per_item_ms} ms/doc, repeat {a.repeat}", flush=True)
    try:
        with Service(a.delay_ms, a.per_item_ms) as svc:
            for w in a.workers:
                for c in a.chunks:
                    n = a.docs or docs_for(a.seconds, w, a.batch, c, a.delay_ms,
                                           a.per_item_ms)
                    source = run.cached_source(n)
                    items = load_items(source)
                    # A bound per run: 2 minutes plus 10 times the ceiling run (one call per
                    # document, as before, gave a 67,000-doc run 25 minutes to hang).
                    timeout = 120 + 10 * n / ceiling(n, w, a.batch, c, a.delay_ms,
                                                      a.per_item_ms)
                    runs: dict[str, list[Measured]] = {"plain": [], "lrq": []}
                    for r in range(a.repeat):
                        for method in ("plain", "lrq"):  # interleaved: drift hits both
                            m = (run_plain(svc.url, items, w, a.batch, c, timeout)
                                 if method == "plain"
                                 else run_lrq(svc.url, source, n, w, a.batch, c, a.tmp, timeout))
                            if m.rows != n:
                                raise BenchError(f"{method} W={w} C={c}: {m.rows} rows, "
                                                 f"expected {n}")
                            runs[method].append(m)
                            print(f"  N={n} W={w} C={c} run {r + 1}/{a.repeat} {method:5s} "
                                  f"{m.seconds:7.2f}s {n / m.seconds:8.0f} items/s", flush=True)
                    digests = {m.digest for ms in runs.values() for m in ms}
                    if len(digests) != 1:
                        raise BenchError(f"W={w} C={c}: lrq's stored rows differ from the "
                                         "plain loop's answers")
                    report["results"].append(summarize(n, w, c, a, runs))
    except (BenchError, subprocess.TimeoutExpired) as e:
        print(f"bench: FAILED: {e}", file=sys.stderr)
        return 1
    run.write_report(report, stamp, NAME, table(report))
    return 0


def summarize(n: int, w: int, c: int, a: argparse.Namespace,
              runs: dict[str, list[Measured]]) -> dict[str, Any]:
    top = ceiling(n, w, a.batch, c, a.delay_ms, a.per_item_ms)
    out: dict[str, Any] = {"docs": n, "workers": w, "chunk": c,
                           "ceiling_items_per_s": round(top, 1),
                           "ceiling_seconds": round(n / top, 3)}
    for method, ms in runs.items():
        median = statistics.median(m.seconds for m in ms)
        rate = n / median
        out[method] = {"median_seconds": round(median, 3), "items_per_s": round(rate, 1),
                       "of_ceiling": round(rate / top, 3),
                       "seconds": [round(m.seconds, 3) for m in ms]}
    out["lrq"]["timeline"] = [m.detail for m in runs["lrq"]]
    out["ideal_batch_seconds"] = round(sum(
        a.delay_ms + a.per_item_ms * k for k in calls(a.batch, a.batch, c)) / 1000, 4)
    windows = [m.detail["window_items_per_s"] for m in runs["lrq"]
               if "window_items_per_s" in m.detail]
    if windows:
        out["lrq"]["window_items_per_s"] = statistics.median(windows)
        out["lrq"]["window_of_ceiling"] = round(statistics.median(windows) / top, 3)
        out["lrq"]["windows_of_ceiling"] = [round(x / top, 3) for x in windows]
    for key in ("startup", "tail"):
        values = [m.detail[key] for m in runs["lrq"] if key in m.detail]
        if values:
            out["lrq"][f"{key}_seconds"] = values
    out["lrq/plain"] = round(out["lrq"]["items_per_s"] / out["plain"]["items_per_s"], 3)
    return out


def table(report: dict[str, Any]) -> str:
    s = report["settings"]
    rows = [("docs", "W", "C", "ceiling/s", "method", "median s", "items/s", "of ceiling",
             "runs (s)")]
    for r in report["results"]:
        rows.append((str(r["docs"]), str(r["workers"]), str(r["chunk"]),
                     f"{r['ceiling_items_per_s']:,.0f}", "ceiling", f"{r['ceiling_seconds']:.2f}",
                     f"{r['ceiling_items_per_s']:,.0f}", "1.00", ""))
        for m in ("plain", "lrq"):
            v = r[m]
            rows.append(("", "", "", "", m, f"{v['median_seconds']:.2f}",
                         f"{v['items_per_s']:,.0f}", f"{v['of_ceiling']:.2f}",
                         " ".join(f"{x:.2f}" for x in v["seconds"])))
        v = r["lrq"]
        if "window_items_per_s" in v:
            rows.append(("", "", "", "", "lrq window", "", f"{v['window_items_per_s']:,.0f}",
                         f"{v['window_of_ceiling']:.2f}",
                         " ".join(f"{x:.2f}" for x in v["windows_of_ceiling"])
                         + " (of ceiling)"))
        if "startup_seconds" in v:
            rows.append(("", "", "", "", "lrq start-up",
                         f"{statistics.median(v['startup_seconds']):.2f}", "", "",
                         " ".join(f"{x:.2f}" for x in v["startup_seconds"])))
        if "tail_seconds" in v:
            rows.append(("", "", "", "", "lrq tail",
                         f"{statistics.median(v['tail_seconds']):.2f}", "", "",
                         " ".join(f"{x:.2f}" for x in v["tail_seconds"])))
    lines = [f"{WORKLOAD}: service {s['delay_ms']} ms + {s['per_item_ms']} ms/doc, batch "
             f"{s['batch']}, repeat {s['repeat']} (median)",
             "ceiling: W calls always in flight (one per worker), nothing between calls, each "
             "call of k items",
             f"  answered after exactly {s['delay_ms']:g} + {s['per_item_ms']:g} k ms; = W C / "
             f"(({s['delay_ms']:g} + {s['per_item_ms']:g} C) / 1000) items/s when C divides "
             f"the batch",
             "lrq window: items after the first batch over first to last batch done; start-up: "
             "launch to",
             "  first batch started; tail: last batch done to exit (seconds)",
             *run._columns(rows, right={0, 1, 2, 3, 5, 6, 7})]
    lines += ["", "lrq relative to the in-process loop (items/s, 1.00 = as fast):"]
    lines += [f"  W={r['workers']} C={r['chunk']}: lrq/plain {r['lrq/plain']:.2f}"
              for r in report["results"]]
    lines += ["", "lrq run timelines (seconds after launch; batches done per worker process):"]
    for r in report["results"]:
        for t in r["lrq"]["timeline"]:
            lines.append(f"  W={r['workers']} C={r['chunk']}: started {t.get('started')}, first "
                         f"batch done {t.get('first_done')}, last {t.get('last_done')}, idle "
                         f"{t.get('idle')}; "
                         f"{'/'.join(str(v) for v in t['batches_per_worker_pid'].values())}")
            if "batch_seconds_median" in t:
                spans = ", ".join(f"{a:.2f}-{b:.2f} ({k})"
                                  for a, b, k in t["worker_spans"].values())
                lines.append(f"    batch in a worker: median {t['batch_seconds_median']:.3f}s, "
                             f"max {t['batch_seconds_max']:.3f}s (the service alone: "
                             f"{r['ideal_batch_seconds']:.3f}s); workers busy "
                             f"{t['busy_share']} of W x window; worker spans {spans}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
