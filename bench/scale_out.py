"""Benchmark the multi-node scenario of issue 13: lose a node, count what was lost or doubled,
and time the takeover of its entries.

Each run is the acceptance test's scenario (tests/contract/test_multi_node.py, whose node
start, handler and stored-keys query are reused): three ``lrq run`` nodes on one machine,
each with its own data dir (and consumer name, where the kind has one), share one consumer
group and one PostgreSQL results database; N = 3000 items, batch 50, a handler sleeping
10 ms a batch; once N/5 are stored, the first node's whole process group is SIGKILLed and
its data dir deleted, as if the machine were lost. The run ends when every key is stored and
the source holds nothing unacknowledged (bounded), then the survivors get SIGTERM.

Per run:

``lost``        source items whose key is not stored (results or dead letters);
``dup``         stored rows minus distinct keys (the results table's unique key makes
                this 0 by construction: the replays it absorbed show in ``replayed``);
``replayed``    the ledger's items summed minus N: items committed again in a batch of their
                own (a survivor's replay of what the dead node had committed, not yet acked);
``pending``     what the source holds unacknowledged at the end (the harness's count);
``takeover``    seconds from the SIGKILL until the survivors hold the dead node's entries:
                redis-stream, until XINFO CONSUMERS shows the dead consumer with 0 pending
                (``first``: until its pending first dropped); redis-list, until no id in the
                in-flight ``owners`` hash names it; kafka, until the survivors' assignments
                (replayed from their logs' ``kafka-assigned``/``kafka-revoked``/``kafka-lost``
                lines, log time) cover every partition again.

Targets: lost 0 and dup 0 in every run; takeover at most ``claim_idle`` (redis-stream) or
``timeout`` (redis-list) plus one sniffer tick (``interval``), and for kafka the session
timeout plus one rebalance, the rebalance taken as this run's own first assignment (from
the nodes' start to their first ``kafka-assigned`` line: one join round on this broker).
The harnesses' settings (tests/contract): claim_idle 1 s, timeout 1 s, interval 0.1 s;
kafka ``session.timeout.ms`` 2000 (the tests' ``FAST_GROUP``) on ``--partitions`` partitions.

The servers are the tests' (tests/servers.py for PostgreSQL, tests/services for redis-server
and Tansu). JSON goes to ``bench/results/<timestamp>-scale-out.json``.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import run  # bench/run.py (first on sys.path): reports
from run import BenchError

sys.path[:0] = [str(run.ROOT / "tests"), str(run.ROOT / "tests" / "contract")]
import servers  # noqa: E402
from lrqtest import killed_on_exit, poll  # noqa: E402
from test_multi_node import NODES, SLOW, N, start, stored  # noqa: E402
from test_sources import config, consumer, items  # noqa: E402

NAME = "scale-out"
KINDS = ("redis-stream", "kafka", "redis-list")
TICK = 0.1  # test_sources.config's interval
WATCH = 0.02  # seconds between looks at the takeover while it runs

EXAMPLES = """\
examples:
  python bench/scale_out.py                         5 runs each of redis-stream, kafka, redis-list
  python bench/scale_out.py --quick                 1 run each
  python bench/scale_out.py --kinds redis-stream --runs 10
"""


class Kind:
    """A kind's harness (tests/contract) and its view of the dead node's entries."""

    def __init__(self, name: str, tansu: Any, partitions: int) -> None:
        self.name, self.tansu, self.partitions = name, tansu, partitions
        self.shared: Any = None
        if name == "redis-stream":
            from harness_redis_stream import RedisStreamHarness
            self.shared = RedisStreamHarness()
        elif name == "redis-list":
            from harness_redis_list import RedisListHarness
            self.shared = RedisListHarness()

    def fresh(self) -> Any:
        """The harness of one run (a new stream/list, or topic and group)."""
        if self.name == "kafka":
            from harness_kafka import KafkaHarness
            return KafkaHarness(self.tansu, self.partitions)
        return self.shared

    def held_by(self, h: Any, source: dict[str, Any], node: str) -> int | None:
        """Entries the dead node still holds at the broker (None: the kind cannot say)."""
        if self.name == "redis-stream":
            for c in h.client.xinfo_consumers(source["stream"], source["group"]):
                name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
                if name == node:
                    return int(c["pending"])
            return 0
        if self.name == "redis-list":
            owners = h.client.hvals(f"{source['list']}:inflight:owners")
            return sum(1 for o in owners if o in (node, node.encode()))
        return None

    def target(self, source: dict[str, Any], rebalance: float | None) -> float:
        if self.name == "redis-stream":
            return float(source["claim_idle"]) + TICK
        if self.name == "redis-list":
            return float(source["timeout"]) + TICK
        return source["options"]["session.timeout.ms"] / 1000 + (rebalance or 0.0)

    def close(self) -> None:
        if self.shared is not None:
            self.shared.close()


_ASSIGN = re.compile(r"^(\S+ \S+) \w+ \S+: kafka-(assigned|revoked|lost) topic=\S+ "
                     r"partitions=(\S*)")


def kafka_events(log: Path) -> list[tuple[float, str, set[int]]]:
    """(unix time, assigned|revoked|lost, partitions) from one node's lrq.log."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        m = _ASSIGN.match(line)
        if m:
            at = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.append((at, m[2], {int(p) for p in m[3].split(",") if p}))
    return out


def kafka_covered(logs: list[Path], partitions: int, after: float) -> float | None:
    """The log time, after ``after``, at which the nodes' assignments first cover every
    partition, replaying each node's lines in time order; None if they never do."""
    events = sorted((at, i, what, ps) for i, log in enumerate(logs)
                    for at, what, ps in kafka_events(log))
    held: list[set[int]] = [set() for _ in logs]
    for at, i, what, ps in events:
        if what == "assigned":
            held[i] |= ps
        else:
            held[i] -= ps
        if at >= after and set().union(*held) == set(range(partitions)):
            return at
    return None


_OPEN = re.compile(r"^(\S+ \S+) \w+ \S+: kafka-open ")


def first_assignment(logs: list[Path]) -> float | None:
    """Seconds from the first ``kafka-open`` line to the first ``kafka-assigned`` line of
    the nodes (the group's first join round: what one rebalance takes on this broker)."""
    opened = [datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
              for log in logs for line in log.read_text(errors="replace").splitlines()
              if (m := _OPEN.match(line))]
    times = [at for log in logs for at, what, _ in kafka_events(log) if what == "assigned"]
    return min(times) - min(opened) if times and opened else None


def rebalance_seen(logs: list[Path], after: float, covered: float) -> float | None:
    """Seconds from the survivors' first ``kafka-revoked``/``kafka-lost`` line after the kill
    to the cover: the rebalance the dead member's eviction started."""
    starts = [at for log in logs for at, what, _ in kafka_events(log)
              if what != "assigned" and after <= at <= covered]
    return covered - min(starts) if starts else None


def removed(folder: Path) -> bool:
    shutil.rmtree(folder, ignore_errors=True)
    return not folder.exists()


def ledger_items(url: str) -> int:
    from sqlalchemy import create_engine, text

    from lrq.schema import LEDGER
    engine = create_engine(url, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as c:
            return int(c.execute(text(f"SELECT COALESCE(SUM(items), 0) FROM {LEDGER}"))
                       .scalar_one())
    finally:
        engine.dispose()


def one_run(kind: Kind, pg: servers.PostgresServer, tmp: Path) -> dict[str, Any]:
    h = kind.fresh()
    (tmp / "slow.py").write_text(SLOW)
    db = pg.create_database()
    url = pg.url(db)
    try:
        source = {**h.source_table(tmp), **h.takeover}
        names = [f"node{i}" for i in range(NODES)]
        cfgs = [config(tmp / n, {**source, **consumer(h, n)}, db_url=url,
                       handler="slow:handle", batch_size=50, chunk_size=50) for n in names]
        h.add(items(0, N))
        procs = [start(cfg, tmp) for cfg in cfgs]
        try:
            if not poll(lambda: len(stored(url)) >= N // 5, seconds=120):
                raise BenchError(f"{kind.name}: no progress in 120 s")
            held_at_kill = kind.held_by(h, source, names[0])
            os.killpg(procs[0].pid, signal.SIGKILL)  # the machine is lost ...
            killed, killed_wall = time.monotonic(), time.time()
            procs[0].wait(timeout=30)
            stored_at_kill = len(set(stored(url)))
            lost_disk = cfgs[0].parent / "data"  # ... with its disk (its killed children
            # may still be going away, so retried, bounded)
            if not poll(lambda: removed(lost_disk), seconds=10):
                raise BenchError(f"{kind.name}: {lost_disk} not removable in 10 s")
            first = took = None
            deadline = killed + h.takeover_seconds * 10 + 120
            while held_at_kill is not None and time.monotonic() < deadline:
                held = kind.held_by(h, source, names[0])  # one round trip: a fine clock
                now = time.monotonic() - killed
                if first is None and held_at_kill and held is not None and held < held_at_kill:
                    first = now
                if held == 0:
                    took = now
                    break
                time.sleep(WATCH)
            if not poll(lambda: len(set(stored(url))) == N and h.unacknowledged() == 0,
                        seconds=max(0.0, deadline - time.monotonic())):
                raise BenchError(f"{kind.name}: not finished {deadline - killed:.0f} s after "
                                 f"the kill: {len(set(stored(url)))} of {N} stored, "
                                 f"{h.unacknowledged()} unacknowledged")
            finished = time.monotonic() - killed
            for p in procs[1:]:
                if p.poll() is not None:
                    raise BenchError(f"{kind.name}: a survivor died (exit {p.returncode})")
                p.send_signal(signal.SIGTERM)
            codes = [p.wait(timeout=60) for p in procs[1:]]
        finally:
            for p in procs:
                with killed_on_exit(p):
                    pass
        keys = stored(url)
        expected = {f"d{i:05d}" for i in range(N)}
        row: dict[str, Any] = {
            "lost": len(expected - set(keys)), "dup": len(keys) - len(set(keys)),
            "replayed": ledger_items(url) - N, "pending": h.unacknowledged(),
            "stored_at_kill": stored_at_kill, "held_at_kill": held_at_kill,
            "finished_s": round(finished, 3), "survivor_exit_codes": codes}
        if kind.name == "kafka":
            logs = [tmp / n / "data" / "lrq.log" for n in names[1:]]
            covered = kafka_covered(logs, kind.partitions, killed_wall)
            rebalance = first_assignment(logs)
            row["takeover_s"] = round(covered - killed_wall, 3) if covered else None
            row["first_assignment_s"] = round(rebalance, 3) if rebalance else None
            seen = rebalance_seen(logs, killed_wall, covered) if covered else None
            row["rebalance_s"] = round(seen, 3) if seen is not None else None
        else:
            rebalance = None
            row["takeover_s"] = round(took, 3) if took is not None else None
            row["takeover_first_s"] = round(first, 3) if first is not None else None
        row["target_s"] = round(kind.target(source, rebalance), 3)
        return row
    finally:
        if kind.name == "kafka":
            h.close()
        pg.drop_database(db)


def summary(report: dict[str, Any]) -> str:
    rows: list[tuple[str, ...]] = [("kind", "runs", "lost", "dup", "replayed", "pending",
                                    "takeover s (median, max)", "target s", "met")]
    for r in report["results"]:
        runs = r["runs"]
        took = [x["takeover_s"] for x in runs if x["takeover_s"] is not None]
        rows.append((r["kind"], str(len(runs)), str(sum(x["lost"] for x in runs)),
                     str(sum(x["dup"] for x in runs)),
                     "/".join(str(x["replayed"]) for x in runs),
                     str(sum(x["pending"] for x in runs)),
                     f"{statistics.median(took):.2f}, {max(took):.2f}" if took else "-",
                     f"{max(x['target_s'] for x in runs):.2f}", "yes" if r["met"] else "NO"))
    lines = [f"multi-node: {NODES} nodes, N = {N}, one SIGKILLed with its data dir deleted "
             "(lost, dup, pending: summed over the runs; replayed: per run)",
             *run._columns(rows, right={1, 2, 3, 5, 7})]
    for r in report["results"]:
        lines.append(f"  {r['kind']}: " + "; ".join(
            f"takeover {x['takeover_s']} s"
            + (f" (first claim {x['takeover_first_s']} s)" if x.get("takeover_first_s")
               is not None else "")
            + (f" (first assignment {x['first_assignment_s']} s, rebalance after the kill "
               f"{x['rebalance_s']} s)" if "first_assignment_s" in x else "")
            + f", done {x['finished_s']} s" for x in r["runs"]))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="runs of each kind (default 5)")
    p.add_argument("--kinds", default=",".join(KINDS),
                   help=f"comma list of {', '.join(KINDS)} (default all)")
    p.add_argument("--partitions", type=int, default=6,
                   help="kafka topic partitions (default 6: two a node)")
    p.add_argument("--quick", action="store_true", help="one run of each kind")
    args = p.parse_args(argv)
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if set(args.kinds) - set(KINDS):
        p.error(f"unknown kinds {sorted(set(args.kinds) - set(KINDS))}; "
                f"choose from {', '.join(KINDS)}")
    if args.quick:
        args.runs = 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from broker_node import available
    kinds = available(args.kinds)
    if servers.find_postgres_bin() is None:
        print("scale-out: PostgreSQL not found; run `make services` (root, Debian)",
              file=sys.stderr)
        return 1
    stamp, report = run.new_report("benchmark", NAME, {
        "runs": args.runs, "kinds": kinds, "nodes": NODES, "items": N,
        "kafka_partitions": args.partitions, "tick_s": TICK})
    pg = servers.start_postgres()
    tansu = None
    try:
        if "kafka" in kinds:
            from services.tansu import find_tansu, start_tansu
            binary = find_tansu()
            assert binary is not None  # available() said so
            tansu = start_tansu(binary)
        for name in kinds:
            kind = Kind(name, tansu, args.partitions)
            rows = []
            try:
                for i in range(args.runs):
                    with tempfile.TemporaryDirectory(prefix="lrq-bench-scale-") as tmp:
                        row = one_run(kind, pg, Path(tmp))
                    rows.append(row)
                    print(f"{name} run {i + 1}/{args.runs}: lost {row['lost']}, dup "
                          f"{row['dup']}, replayed {row['replayed']}, pending {row['pending']}, "
                          f"takeover {row['takeover_s']} s (target {row['target_s']} s), "
                          f"done {row['finished_s']} s after the kill", flush=True)
            finally:
                kind.close()
            met = all(x["lost"] == 0 and x["dup"] == 0 and x["pending"] == 0
                      and x["takeover_s"] is not None and x["takeover_s"] <= x["target_s"]
                      for x in rows)
            report["results"].append({"kind": name, "met": met, "runs": rows})
    except BenchError as e:
        print(f"scale-out: {e}", file=sys.stderr)
        return 1
    finally:
        if tansu is not None:
            from services.tansu import stop_tansu
            stop_tansu(tansu)
        servers.stop_postgres(pg)
    run.write_report(report, stamp, NAME, summary(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
