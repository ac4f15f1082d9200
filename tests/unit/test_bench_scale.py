"""Issue 13's benchmarks' arithmetic (``bench/scale_out.py``, ``bench/broker_node.py``): the
Kafka takeover read from the survivors' logs, and the node ratios and their verdict. Figures
are not asserted: speed is the benchmark's business (the scripts run the real servers)."""
from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCH))  # the scripts import each other by name
    return importlib.import_module


def line(clock: str, event: str, partitions: str) -> str:
    return (f"2026-12-01 06:19:{clock} INFO lrq.sources.kafka: kafka-{event} topic=t "
            f"partitions={partitions}")


def test_kafka_takeover_is_when_the_survivors_cover_every_partition(
        bench: ModuleType, tmp_path: Path) -> None:
    scale = bench("scale_out")
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    a.write_text("\n".join([
        "2026-12-01 06:19:00,000 INFO lrq.sources.kafka: kafka-open queue=docs brokers=x",
        line("01,000", "assigned", "0,1"),
        line("10,000", "revoked", "0,1"),  # the rebalance the kill started
        line("11,500", "assigned", "1,2"),
        line("12,500", "assigned", "0")]) + "\n")
    b.write_text("\n".join([line("01,000", "assigned", "3"),
                            line("11,000", "assigned", "4,5")]) + "\n")
    killed = scale.kafka_events(a)[0][0] + 7.0  # 06:19:08
    covered = scale.kafka_covered([a, b], 6, killed)
    # 0 was revoked at 10,000: covered only once it came back at 12,500, not at 11,500
    assert covered is not None and round(covered - killed, 3) == 4.5
    assert round(scale.rebalance_seen([a, b], killed, covered), 3) == 2.5  # from 10,000
    assert round(scale.first_assignment([a, b]), 3) == 1.0  # open 00,000 -> assigned 01,000
    assert scale.kafka_covered([a, b], 7, killed) is None  # partition 6 never assigned


def test_node_ratios_and_the_stream_target(bench: ModuleType) -> None:
    node = bench("broker_node")
    run = {"busy_seconds": 1.0, "exit_after_last_done": 0.1}
    report: dict = {"results": [], "ratios": {}}
    node.summarize(report, {"sql": [{**run, "seconds": 2.0}, {**run, "seconds": 4.0},
                                    {**run, "seconds": 3.0}],
                            "redis-stream": [{**run, "seconds": 4.0, "busy_seconds": 0.8}]},
                   1000)
    assert report["ratios"] == {"redis-stream/sql": 0.75}  # medians: 3 s against 4 s
    assert report["busy_ratios"] == {"redis-stream/sql": 1.25}
    assert report["target"] == {"figure": "redis-stream/sql", "ratio": 0.75, "target": 0.8,
                                "met": False}
    assert "0.75, not met" in node.table({**report, "settings": {
        "docs": 1000, "batch": 100, "repeat": 3}})
