"""kind = "kafka" output against a real broker (Tansu, tests/services/tansu.py): rows produced
by :class:`lrq.outputs.kafka.KafkaProducer` and read back by a separate consumer (assign mode,
no group: nothing to wedge), dead letters for messages too large, bounded failures.

Tansu enforces no message size of its own (a 3 MB message is stored), so a broker's
MSG_SIZE_TOO_LARGE answer is covered by tests/unit/test_kafka_output.py with a fake client;
here the size is refused by lrq's check and by librdkafka's ``message.max.bytes``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import servers
from lrqtest import poll
from services.tansu import Tansu, fresh

from lrq.errors import ConfigError, Retryable
from lrq.outputs import kafka


def output(brokers: str, topic: str, **table: Any) -> kafka.KafkaProducer:
    settings = kafka.Settings.parse({"bootstrap": brokers, "topic": topic, **table}, Path("."),
                                    "queues.access.outputs.to_kafka")
    return kafka.open(settings, "to_kafka")


def read_topic(tansu: Tansu, topic: str, partitions: int,
               n: int) -> list[tuple[int, bytes, bytes]]:
    return tansu.read(topic, partitions, n)


def test_rows_are_produced_keyed_by_their_key_and_read_back_exactly(tansu: Tansu) -> None:
    topic = fresh("out")
    tansu.create_topic(topic, 3)
    rows = [{"id": f"line-{i}", "status": 200 + i % 3, "bytes": i * 10,
             "text": f"GET /page/{i}"} for i in range(60)]
    out = output(tansu.brokers, topic)
    try:
        assert out.send(rows, "id") == []
        assert out.last is not None and (out.last.delivered, out.last.dead) == (60, 0)
        got = read_topic(tansu, topic, 3, 60)
    finally:
        out.close()
    assert sorted((k.decode(), json.loads(v)) for _, k, v in got) == \
        sorted((r["id"], r) for r in rows)
    assert len({p for p, _, _ in got}) > 1  # keys spread over the partitions


def test_a_resend_produces_the_batch_again_and_keys_dedupe_it(tansu: Tansu) -> None:
    """At least once: the same rows sent twice (a retried batch) arrive twice, same key and
    value, on the same partition, so a consumer keeping the last value per key sees each
    row once."""
    topic = fresh("out")
    tansu.create_topic(topic, 2)
    rows = [{"id": i, "v": str(i)} for i in range(10)]
    out = output(tansu.brokers, topic)
    try:
        out.send(rows, "id")
        out.send(rows, "id")
        got = read_topic(tansu, topic, 2, 20)
    finally:
        out.close()
    assert len(got) == 20
    by_key: dict[bytes, set[tuple[int, bytes]]] = {}
    for p, k, v in got:
        by_key.setdefault(k, set()).add((p, v))
    assert {k: len(v) for k, v in by_key.items()} == {str(i).encode(): 1 for i in range(10)}


def test_an_oversize_row_is_a_dead_letter_and_the_rest_are_delivered(tansu: Tansu) -> None:
    topic = fresh("out")
    tansu.create_topic(topic, 1)
    big = {"id": "big", "text": "x" * 500}
    no_key = {"text": "no id"}
    not_json = {"id": "raw", "text": b"\xff"}
    rows = [{"id": f"r{i}", "text": "ok"} for i in range(5)]
    out = output(tansu.brokers, topic, max_message_bytes=300)
    try:
        dead = out.send([rows[0], big, rows[1], no_key, rows[2], not_json, *rows[3:]], "id")
        got = read_topic(tansu, topic, 1, 5)
    finally:
        out.close()
    assert [row for row, _ in dead] == [big, no_key, not_json]
    size = len(b"big") + len(json.dumps(big, separators=(",", ":")))
    assert f"of {size} bytes (key + JSON value) is over max_message_bytes 300" in dead[0][1]
    assert "no 'id'" in dead[1][1] and "cannot be encoded as JSON" in dead[2][1]
    assert all("\n" not in why for _, why in dead)
    assert [(k.decode(), json.loads(v)) for _, k, v in got] == [(r["id"], r) for r in rows]


def test_a_message_the_client_refuses_as_too_large_is_a_dead_letter(tansu: Tansu) -> None:
    """Under max_message_bytes but over librdkafka's message.max.bytes: MSG_SIZE_TOO_LARGE
    from the client's produce(), dead-lettered like lrq's own check."""
    topic = fresh("out")
    tansu.create_topic(topic, 1)
    big = {"id": "big", "text": "x" * 3000}
    out = output(tansu.brokers, topic, max_message_bytes=100_000,
                 producer={"message.max.bytes": 1000})
    try:
        dead = out.send([{"id": "a"}, big, {"id": "b"}], "id")
        got = read_topic(tansu, topic, 1, 2)
    finally:
        out.close()
    assert [row for row, _ in dead] == [big]
    assert "too large for topic" in dead[0][1]
    assert [k for _, k, _ in got] == [b"a", b"b"]


def test_an_unreachable_broker_fails_within_the_timeout_and_nothing_commits(
        tmp_path: Path) -> None:
    """A closed 127.0.0.1 port: ProduceFailed (Retryable: the worker releases the batch
    uncounted), one line naming the output, topic and brokers; raised inside the batch's
    transaction, it leaves nothing committed."""
    import sqlalchemy as sa
    brokers = f"127.0.0.1:{servers.free_port()}"
    out = output(brokers, "lines", timeout="3s")
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'results.db'}")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE ledger (name TEXT PRIMARY KEY)"))
    start = time.monotonic()
    with pytest.raises(kafka.ProduceFailed) as e, engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO ledger VALUES ('batch-1')"))
        out.send([{"id": 1}, {"id": 2}], "id")
    took = time.monotonic() - start
    out.close()
    message = str(e.value)
    assert isinstance(e.value, Retryable) and "\n" not in message
    assert f"kafka output to_kafka (topic 'lines', bootstrap {brokers})" in message
    assert "cannot reach the brokers" in message or "not acknowledged" in message
    assert took < 3 + kafka.FLUSH_GRACE + 1  # bounded by timeout + grace
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM ledger")).scalar() == 0


def test_a_silent_broker_fails_at_the_timeout() -> None:
    """A port that accepts connections and never answers (a hung broker): the send gives up
    once ``timeout`` (plus the grace for the reports) is over."""
    import socket
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        out = output(f"127.0.0.1:{listener.getsockname()[1]}", "lines", timeout="2s")
        start = time.monotonic()
        with pytest.raises(kafka.ProduceFailed, match="not acknowledged|not delivered"):
            out.send([{"id": 1}], "id")
        took = time.monotonic() - start
        out.close(timeout=0)
    # It waited for the timeout (a lower bound: load only makes it later), and its wait is
    # bounded (the upper bound is generous: this is no speed claim, a hang would blow it).
    assert 1.5 < took < 2 + kafka.FLUSH_GRACE + 30


def test_the_idempotent_producer_is_in_effect(tansu: Tansu) -> None:
    """enable.idempotence and acks=all are lrq's (not overridable), and the broker assigned
    the producer an id: librdkafka's statistics report the idempotence state."""
    topic = fresh("out")
    tansu.create_topic(topic, 1)
    out = output(tansu.brokers, topic, producer={"statistics.interval.ms": 100})
    assert out.config["enable.idempotence"] is True and out.config["acks"] == "all"
    try:
        assert out.send([{"id": 1}], "id") == []
        st = poll(lambda: (s := out.status()).get("idempotence") == "Assigned" and s, 10)
        assert st and st["producer_id"] >= 0 and st["delivered"] == 1
    finally:
        out.close()
    with pytest.raises(ConfigError, match="'enable.idempotence' is set by lrq"):
        output(tansu.brokers, topic, producer={"enable.idempotence": False})


def test_secret_producer_options_never_show(tansu: Tansu,
                                            caplog: pytest.LogCaptureFixture) -> None:
    out = output(tansu.brokers, fresh("out"),
                 producer={"no.such.property": 1, "sasl.password": "hunter2"})
    with pytest.raises(ConfigError, match="no.such.property") as e:
        out.send([{"id": 1}], "id")
    assert "hunter2" not in str(e.value) and "hunter2" not in caplog.text
    assert "hunter2" not in json.dumps(out.status())
