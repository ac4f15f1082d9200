"""Redis source cost: ``fetch(B)`` + ``ack`` per batch on loopback, and the idle cost of
fetching from an empty stream (issue 13).

A throwaway redis-server (tests/services/redis_server.py) on 127.0.0.1. For each kind
(``redis-stream``, ``redis-list``) and each repeat: ``--items`` sample documents
(``lrq.sample.documents``: doc_id + ~40 words) are added, then one source object runs
``fetch(None, B)`` then ``ack(receipts)`` until the source is empty. Only the loop is timed:
wall per batch of fetch and of ack (``perf_counter``), items/s over the loop, and this
process's CPU (``getrusage``; the server's CPU is not in it). The SQL source (SQLite,
keyset paging, the same documents) runs the same loop for reference (no ack: it is
acknowledged at publish), so the source's share of the 0.8x target can be read off.

Takeover (``--takeover N``): N times, consumer A reads an entry and is dropped without
ack; consumer B fetches every ``--tick`` seconds (as a sniffer ticks); the time from A's read
to B's first item, against ``claim_idle`` (2 s).

Idle: ``fetch`` on an empty stream in a loop for ``--idle`` seconds, as a sniffer with
nothing to do would call it (the stream's ``block`` waits on the server; ``block = 0`` is
the sniffer's own interval's business); this process's CPU per wall second.

    .venv/bin/python bench/redis_source.py --items 100000 --batch 100 --repeat 3
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(HERE / "tests"), str(HERE)]

from services.redis_server import start_redis, stop_redis  # noqa: E402

from lrq.sample import documents, write_documents  # noqa: E402
from lrq.sources import Context, module  # noqa: E402


def cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def open_kind(kind: str, table: dict[str, Any], data: Path) -> Any:
    mod = module(kind)
    return mod.open(mod.Settings.parse(table, data, f"bench.{kind}"), Context(data, "bench"))


def open_sql(url: str, data: Path) -> Any:
    """The SQL source through the registry once it has ``Settings`` (src branch), else the
    class of the branch this runs on."""
    mod = module("sql")
    table = {"url": url, "table": "source_data", "order_by": "id",
             "columns": {"id": "id", "doc_id": "mid", "content": "content"}}
    if hasattr(mod, "Settings"):
        return mod.open(mod.Settings.parse(table, data, "bench.sql"), Context(data, "bench"))
    from lrq.config import SourceConfig

    return mod.SqlSource(SourceConfig(url=url, table="source_data", order_by="id",
                                      columns=tuple(table["columns"].items())))


def fill(client: Any, kind: str, key: str, docs: list[dict[str, Any]]) -> None:
    pipe = client.pipeline(transaction=False)
    for i, d in enumerate(docs):
        if kind == "redis-stream":
            pipe.xadd(key, {"doc_id": d["mid"], "content": d["content"]})
        else:
            pipe.rpush(key, json.dumps({"doc_id": d["mid"], "content": d["content"]}))
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()


def loop(src: Any, batch: int, ack: bool) -> dict[str, float]:
    fetch_s: list[float] = []
    ack_s: list[float] = []
    n = 0
    position = None
    c0, t0 = cpu(), time.perf_counter()
    while True:
        t = time.perf_counter()
        got = src.fetch(position, batch)
        fetch_s.append(time.perf_counter() - t)
        if not got.items:
            break
        n += len(got.items)
        position = got.position
        if ack:
            t = time.perf_counter()
            src.ack(got.receipts)
            ack_s.append(time.perf_counter() - t)
    wall, used = time.perf_counter() - t0, cpu() - c0
    batches = len(fetch_s) - 1
    return {"items": n, "items_per_s": n / wall, "cpu_s": used, "wall_s": wall,
            "fetch_us": statistics.median(fetch_s[:-1]) * 1e6 if batches else 0.0,
            "ack_us": statistics.median(ack_s) * 1e6 if ack_s else 0.0}


def idle(src: Any, seconds: float) -> dict[str, float]:
    calls = 0
    c0, t0 = cpu(), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        assert not src.fetch(None, 100).items
        calls += 1
    wall = time.perf_counter() - t0
    return {"calls_per_s": calls / wall, "cpu_per_wall_s": (cpu() - c0) / wall}


def takeover(url: str, data: Path, runs: int, tick: float) -> dict[str, float]:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=30)
    seconds = []
    for run in range(runs):
        stream = f"takeover-{run}"
        client.xadd(stream, {"id": "0"})
        table = {"url": url, "stream": stream, "claim_idle": 2, "block": 0}
        dead, live = (open_kind("redis-stream", table, data / name) for name in ("a", "b"))
        assert dead.fetch(None, 100).items
        t0 = time.monotonic()
        dead.close()
        while not (got := live.fetch(None, 100)).items:  # live runs: it fetches every tick
            assert time.monotonic() - t0 < 30, "no takeover in 30 s"
            time.sleep(tick)  # the sniffer's interval
        seconds.append(time.monotonic() - t0)
        live.ack(got.receipts)
        live.close()
    client.close()
    return {"claim_idle_s": 2.0, "tick_s": tick, "max_s": max(seconds),
            "median_s": statistics.median(seconds)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--idle", type=float, default=10.0, help="seconds of idle fetching (0: skip)")
    p.add_argument("--takeover", type=int, default=5, help="takeover runs (0: skip)")
    p.add_argument("--tick", type=float, default=0.25, help="seconds between fetches there")
    args = p.parse_args(argv)
    import redis

    docs = documents(args.items)
    server = start_redis()
    rows: dict[str, list[dict[str, float]]] = {}
    try:
        url = server.url()
        client = redis.Redis.from_url(url, socket_timeout=30)
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp)
            sql_url = f"sqlite:///{data / 'source.db'}"
            write_documents(sql_url, args.items)
            for r in range(args.repeat):
                for kind in ("redis-stream", "redis-list", "sql"):
                    if kind == "sql":
                        src = open_sql(sql_url, data)
                    else:
                        key = f"bench-{kind}-{r}"
                        fill(client, kind, key, docs)
                        name = "stream" if kind == "redis-stream" else "list"
                        src = open_kind(kind, {"url": url, name: key, "block": 0}
                                        if kind == "redis-stream" else {"url": url, name: key},
                                        data)
                    rows.setdefault(kind, []).append(loop(src, args.batch, kind != "sql"))
                    if kind != "sql":
                        assert src.settled(), f"{kind}: not settled after the loop"
                    src.close()
            if args.takeover:
                rows["takeover"] = [takeover(url, data, args.takeover, args.tick)]
            if args.idle:
                for block in (0.5, 0.0):
                    src = open_kind("redis-stream", {"url": url, "stream": "idle",
                                                     "block": block}, data)
                    src.fetch(None, 1)  # the group, the own-pending pass
                    rows[f"idle block={block:g}s"] = [idle(src, args.idle)]
                    src.close()
        client.close()
    finally:
        stop_redis(server)
    print(f"redis-py {redis.__version__}, {args.items} items, batch {args.batch}, "
          f"{args.repeat} repeats (medians)")
    for kind, runs in rows.items():
        med = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
        print(f"{kind:>20}: " + ", ".join(f"{k} {v:,.0f}" if v >= 100 else f"{k} {v:.4g}"
                                          for k, v in med.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
