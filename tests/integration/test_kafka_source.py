"""kind = "kafka" against a real broker (Tansu, tests/services/tansu.py), through the source
interface: Settings.parse, open(settings, Context), fetch, ack, settled, status, close.

Committed offsets are read by a separate client (the AdminClient), not by the member under
test. Each test uses a fresh topic and group (a wedged group cannot leak into another test),
and closes a source only once it was assigned (closing mid-join can wedge a group on Tansu).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from lrqtest import poll
from services.tansu import FAST_GROUP, Tansu, fresh

from lrq.errors import ConfigError, SourceError
from lrq.sources import Context, kafka


def open_source(tansu: Tansu, topic: str, group: str, tmp_path: Path, *, held: Any = (),
                key: str | None = None, **table: Any) -> kafka.KafkaSource:
    settings = kafka.Settings.parse({"brokers": tansu.brokers, "topic": topic, "group": group,
                                     "options": dict(FAST_GROUP), **table}, tmp_path, "source")
    return kafka.open(settings, Context(tmp_path / "data", "events", held, key=key))


def drain(src: kafka.KafkaSource, n: int, seconds: float = 15.0) -> tuple[list[Any], list[Any]]:
    """Fetch until ``n`` items came (bounded); the items and their receipts."""
    items: list[Any] = []
    receipts: list[Any] = []

    def more() -> bool:
        f = src.fetch(None, 100)
        items.extend(f.items)
        receipts.extend(f.receipts or [])
        return len(items) >= n
    poll(more, seconds, every=0)
    return items, receipts


def json_values(ids: range) -> list[bytes]:
    return [json.dumps({"id": i, "text": f"doc {i}"}).encode() for i in ids]


def test_ack_commits_only_the_contiguous_offset(tansu: Tansu, tmp_path: Path) -> None:
    topic, group = fresh("ev"), fresh("g")
    tansu.create_topic(topic, 2)
    tansu.produce(topic, json_values(range(30)), partition=0)
    tansu.produce(topic, [b"not json", b"[1, 2]", b"{}"], partition=1)
    src = open_source(tansu, topic, group, tmp_path, key="doc")
    try:
        items, receipts = drain(src, 33)
        assert len(items) == 33
        by_offset = {tuple(r[1:]): (it, r) for it, r in zip(items, receipts)}
        assert all(r[0] == topic for r in receipts)
        assert [by_offset[(0, o)][0]["id"] for o in range(30)] == list(range(30))
        # bad values are items too: keyed by their coordinates, carrying the error and value
        bad = by_offset[(1, 0)][0]
        assert bad["doc"] == f"{topic}:1:0" and "not JSON" in bad["_lrq_error"]
        assert bad["_lrq_value"] == "not json"
        assert "not a JSON object: list" in by_offset[(1, 1)][0]["_lrq_error"]
        assert by_offset[(1, 2)][0] == {}
        assert not src.settled()  # 33 in flight

        src.ack([by_offset[(0, o)][1] for o in range(10, 20)])  # a later batch finishes first
        assert tansu.committed(group, topic, 2) == {0: -1, 1: -1}
        src.ack([by_offset[(0, o)][1] for o in range(10)])
        assert tansu.committed(group, topic, 2)[0] == 20
        src.ack([by_offset[(0, o)][1] for o in range(5)])  # a repeat changes nothing
        assert tansu.committed(group, topic, 2)[0] == 20
        src.ack([by_offset[(0, o)][1] for o in range(20, 30)] + [by_offset[(1, 1)][1]])
        assert tansu.committed(group, topic, 2) == {0: 30, 1: -1}  # partition 1: 0 unacked
        src.ack([by_offset[(1, o)][1] for o in (0, 2)])
        assert tansu.committed(group, topic, 2) == {0: 30, 1: 3}
        assert src.settled()
        st = src.status()
        assert st["partitions"]["0"]["committed"] == 30 and st["last_commit"]
        assert st["in_flight"] == 0
    finally:
        src.close()


def test_restart_resumes_from_the_committed_offset_and_skips_held(tansu: Tansu,
                                                                   tmp_path: Path) -> None:
    topic, group = fresh("ev"), fresh("g")
    tansu.create_topic(topic, 1)
    tansu.produce(topic, json_values(range(20)))
    first = open_source(tansu, topic, group, tmp_path)
    try:
        _, receipts = drain(first, 20)
        first.ack(receipts[:10])
    finally:
        first.close()
    assert tansu.committed(group, topic, 1) == {0: 10}
    # The node holds offsets 10..14 in a batch file (Context.held): not handed out again.
    held = [[topic, 0, o] for o in range(10, 15)]
    second = open_source(tansu, topic, group, tmp_path, held=held)
    try:
        items, receipts = drain(second, 5)
        assert [it["id"] for it in items] == list(range(15, 20))
        assert second.fetch(None, 100).items == []
        second.ack(receipts)  # 15..19 done, the held 10..14 not yet: nothing moves
        assert tansu.committed(group, topic, 1) == {0: 10}
        assert not second.settled()
        second.ack(held)
        assert tansu.committed(group, topic, 1) == {0: 20}
        assert second.settled()
        tansu.produce(topic, json_values(range(20, 21)))
        assert not second.settled()  # a new message at the committed offset: lag
    finally:
        second.close()


def test_raw_format_items_and_no_password_shown(tansu: Tansu, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    topic, group = fresh("ev"), fresh("g")
    tansu.create_topic(topic, 1)
    tansu.produce(topic, [b"text", b"\xff\xfe", b"x"], keys=[b"k1", None, b"\xff"])
    settings = kafka.Settings.parse({"brokers": tansu.brokers, "topic": topic, "group": group,
                                     "format": "raw", "options": {
                                         **FAST_GROUP, "sasl.username": "lrq",
                                         "sasl.password": "hunter2"}}, tmp_path, "source")
    src = kafka.open(settings, Context(tmp_path, "events"))
    try:
        items, _ = drain(src, 3)
        assert "hunter2" not in json.dumps(src.status(), default=str)
        assert "hunter2" not in caplog.text
        assert items[0] == {"id": f"{topic}:0:0", "key": "k1", "value": "text", "partition": 0,
                            "offset": 0}
        assert items[1]["value"] == b"\xff\xfe" and items[1]["key"] is None  # not UTF-8: bytes
        assert items[2]["key"] == b"\xff"
    finally:
        src.close()


def open_fails(brokers: str, tmp_path: Path) -> float:
    """Seconds ``open`` took to raise the SourceError naming ``brokers``."""
    settings = kafka.Settings.parse({"brokers": brokers, "topic": "t"}, tmp_path, "source")
    start = time.monotonic()
    with pytest.raises(SourceError, match=f"cannot reach kafka brokers {brokers}"):
        kafka.open(settings, Context(tmp_path, "q"))
    return time.monotonic() - start


def test_unreachable_brokers_fail_fast_naming_them(tmp_path: Path) -> None:
    import servers
    assert open_fails(f"127.0.0.1:{servers.free_port()}", tmp_path) < 1  # refused: at once


@pytest.mark.slow
def test_a_silent_broker_fails_within_the_open_timeout(tmp_path: Path) -> None:
    """A port that accepts connections and never answers (a hung broker): bounded anyway."""
    import socket
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        took = open_fails(f"127.0.0.1:{listener.getsockname()[1]}", tmp_path)
    assert kafka.OPEN_TIMEOUT - 0.5 < took < kafka.OPEN_TIMEOUT + 1


def test_missing_topic_is_a_source_error(tansu: Tansu, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="kafka topic 'nope-.*' not found .* create it"):
        open_source(tansu, fresh("nope"), fresh("g"), tmp_path)


@pytest.mark.parametrize("table, message", [
    ({"topic": "t"}, "^source: missing 'brokers' \\(e.g. brokers = "),
    ({"brokers": "localhost", "topic": "t"}, "'localhost' is not host:port"),
    ({"brokers": "h:1", "topic": "t", "format": "avro"}, "'avro' is not one of json, raw"),
    ({"brokers": "h:1", "topic": "t", "partition": 1},
     "^source: unknown key 'partition' for kind \"kafka\" \\(known keys: kind, brokers, "),
    ({"brokers": "h:1", "topic": "t", "options": {"group.id": "x"}}, "'group.id' is set by lrq"),
    ({"brokers": "h:1", "topic": "t", "options": {"a": [1]}}, r"options.a: expected a string"),
])
def test_bad_settings_are_config_errors(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        kafka.Settings.parse(table, Path("."), "source")


def test_unknown_client_option_is_a_config_error_without_secrets(tansu: Tansu,
                                                                 tmp_path: Path) -> None:
    settings = kafka.Settings.parse(
        {"brokers": tansu.brokers, "topic": "t",
         "options": {"no.such.property": 1, "sasl.password": "hunter2"}}, tmp_path, "source")
    with pytest.raises(ConfigError, match="no.such.property") as e:
        kafka.open(settings, Context(tmp_path, "q"))
    assert "hunter2" not in str(e.value)


class Member:
    """``kafka_member.py`` in a subprocess: its JSON lines read by a thread, waited on bounded."""

    def __init__(self, tansu: Tansu, topic: str, group: str, data_dir: Path, ack_below: int,
                 options: dict[str, Any]):
        import subprocess
        import sys
        import threading
        script = Path(__file__).with_name("kafka_member.py")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), tansu.brokers, topic, group, str(data_dir),
             str(ack_below), json.dumps(options)],
            stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.events: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def last(self, kind: str) -> Any:
        return next((e[kind] for e in reversed(self.events) if kind in e), None)

    def kill(self) -> None:
        import signal
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["range", "cooperative-sticky"])
def test_a_member_takes_over_a_killed_members_partitions(tansu: Tansu, tmp_path: Path,
                                                          strategy: str) -> None:
    topic, group = fresh("ev"), fresh("g")
    tansu.create_topic(topic, 4)
    for p in range(4):
        tansu.produce(topic, json_values(range(p * 10, p * 10 + 10)), partition=p)
    options = {**FAST_GROUP, "partition.assignment.strategy": strategy}
    a = Member(tansu, topic, group, tmp_path / "a", ack_below=5, options=options)
    b = None
    try:
        assert poll(lambda: a.last("assigned") == [0, 1, 2, 3] and
                    sum(e.get("acked", 0) for e in a.events) == 20, 30), a.events
        assert poll(lambda: tansu.committed(group, topic, 4) == {p: 5 for p in range(4)}, 10)
        b = open_source(tansu, topic, group, tmp_path / "b", options=options)
        got: dict[tuple[int, int], Any] = {}

        def step(want: list[int]) -> bool:
            f = b.fetch(None, 100)
            got.update({(r[1], r[2]): r for r in f.receipts or []})
            return b.assignment() == want if want else bool(b.assignment())
        assert poll(lambda: step([]), 30), "B never joined"
        mine = b.assignment()
        assert poll(lambda: a.last("assigned") and not set(a.last("assigned")) & set(mine), 30)
        a.kill()  # a lost machine: no LeaveGroup, its session has to expire
        killed = time.monotonic()
        assert poll(lambda: step([0, 1, 2, 3]), 30), "B never got A's partitions"
        takeover = time.monotonic() - killed
        assert poll(lambda: step([0, 1, 2, 3]) and len(got) == 20, 15), sorted(got)
        # B reads every partition from A's committed offset (5), nothing below it
        assert sorted(got) == [(p, o) for p in range(4) for o in range(5, 10)]
        b.ack(list(got.values()))
        assert tansu.committed(group, topic, 4) == {p: 10 for p in range(4)}
        assert b.settled()
        session = FAST_GROUP["session.timeout.ms"] / 1000
        print(f"{strategy}: takeover after SIGKILL {takeover:.2f} s (session timeout {session:g} s)")
        assert takeover < session + 5  # the session timeout plus one rebalance
    finally:
        a.kill()
        if b is not None:
            b.close()


def test_contract_harness_counts_what_the_group_has_not_committed(tansu: Tansu,
                                                                   tmp_path: Path) -> None:
    from contract.harness_kafka import KafkaHarness
    h = KafkaHarness(tansu)
    h.add([{"id": i} for i in range(7)])
    assert h.unacknowledged() == 7
    table = h.source_table(tmp_path)
    assert table.pop("kind") == "kafka"
    src = kafka.open(kafka.Settings.parse(table, tmp_path, "source"),
                     Context(tmp_path, "events"))
    try:
        items, receipts = drain(src, 7)
        assert sorted(it["id"] for it in items) == list(range(7))
        src.ack(receipts[:1])
        assert h.unacknowledged() >= 6
        src.ack(receipts)
        assert h.unacknowledged() == 0
    finally:
        src.close()
        h.close()


def test_closing_before_the_first_assignment_leaves_the_group_usable(tansu: Tansu,
                                                                      tmp_path: Path) -> None:
    """On Tansu a consumer closed mid-join wedges its group: close() waits for the join."""
    topic, group = fresh("ev"), fresh("g")
    tansu.create_topic(topic, 2)
    tansu.produce(topic, json_values(range(4)))
    early = open_source(tansu, topic, group, tmp_path / "early")
    early._join()  # as a first fetch does: the JoinGroup is sent, its answer takes ~1 s
    early._consumer.consume(num_messages=1, timeout=0.05)
    assert early.assignment() == []
    early.close()
    later = open_source(tansu, topic, group, tmp_path / "later")
    try:
        items, _ = drain(later, 4, seconds=10)
        assert sorted(it["id"] for it in items) == [0, 1, 2, 3]  # nothing committed by early
    finally:
        later.close()
