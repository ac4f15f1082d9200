"""The kafka output's settings and its delivery checks, with a fake client in place of
librdkafka: the broker's answers Tansu never gives (MSG_SIZE_TOO_LARGE from the broker, a
fatal idempotence error, a full local queue) are scripted here. The real broker's side is
tests/integration/test_kafka_output.py."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError

from lrq.errors import ConfigError, Retryable
from lrq.outputs import kafka

WHERE = "queues.access.outputs.to_kafka"


def settings(**table: Any) -> kafka.Settings:
    return kafka.Settings.parse({"bootstrap": "127.0.0.1:9092", "topic": "lines", **table},
                                Path("."), WHERE)


class Message:
    def __init__(self, key: bytes, value: bytes) -> None:
        self._key, self._value = key, value

    def key(self) -> bytes:
        return self._key

    def value(self) -> bytes:
        return self._value


class FakeProducer:
    """Answers each produced message with ``answer(key)`` (a KafkaError or None) at flush;
    ``stuck`` keys are never answered; ``full`` produce() calls raise BufferError first."""

    made: list[FakeProducer] = []

    def __init__(self, conf: dict[str, Any], answer: Any = None, stuck: frozenset[bytes] = frozenset(),
                 full: int = 0, fatal: bool = False) -> None:
        self.conf = conf
        self.answer = answer or (lambda key: None)
        self.stuck = stuck
        self.full = full
        self.fatal = fatal
        self.queued: list[tuple[bytes, bytes, Any]] = []
        self.sent: list[tuple[bytes, bytes]] = []
        self.purged = False
        FakeProducer.made.append(self)

    def produce(self, topic: str, value: bytes, key: bytes, on_delivery: Any) -> None:
        if self.full:
            self.full -= 1
            raise BufferError("Local: Queue full")
        self.queued.append((key, value, on_delivery))

    def poll(self, timeout: float = 0) -> int:
        if self.fatal:
            self.fatal = False
            self.conf["error_cb"](KafkaError(KafkaError._FENCED, "producer fenced", fatal=True))
        served = 0
        for item in list(self.queued):
            key, value, report = item
            if key in self.stuck:
                continue
            self.queued.remove(item)
            err = self.answer(key)
            if err is None:
                self.sent.append((key, value))
            report(err, Message(key, value))
            served += 1
        return served

    def flush(self, timeout: float = 0) -> int:
        self.poll(0)
        return len(self.queued)

    def purge(self) -> None:
        self.purged = True
        self.queued.clear()


def fake(**kw: Any) -> Any:
    return lambda conf: FakeProducer(conf, **kw)


@pytest.fixture(autouse=True)
def _fresh_fakes(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeProducer.made = []
    monkeypatch.setattr(kafka, "FLUSH_GRACE", 0.0)


@pytest.mark.parametrize("table, message", [
    ({"bootstrap": ""}, f"^{WHERE}: missing 'bootstrap' \\(e.g. bootstrap = "),
    ({"topic": None}, f"^{WHERE}: missing 'topic'"),
    ({"topic": 5}, f"^{WHERE}.topic: expected str"),
    ({"bootstrap": "localhost"}, "'localhost' is not host:port"),
    ({"max_message_bytes": 0}, "max_message_bytes: must be 1 to"),
    ({"max_message_bytes": "2 apples"}, "is not a size; write e.g. 10GB"),
    ({"timeout": "0s"}, "timeout: must be more than 0 seconds"),
    ({"timeout": "soon"}, "is not a duration"),
    ({"timeout": 0.5}, "timeout: must be at least 1s, got 0.5s"),
    ({"acks": 1}, f"^{WHERE}: unknown key 'acks' for kind \"kafka\" \\(known keys: kind, bootstrap, "),
    ({"producer": {"acks": "1"}}, "'acks' is set by lrq"),
    ({"producer": {"message.timeout.ms": 5}}, "set by lrq .* `timeout`"),
    ({"producer": {"linger.ms": [1]}}, "producer.linger.ms: expected a string, number"),
])
def test_bad_settings_are_one_line_config_errors(table: dict[str, Any], message: str) -> None:
    """``table`` over a good one; a None value removes that key."""
    merged = {"bootstrap": "h:1", "topic": "t", **table}
    with pytest.raises(ConfigError, match=message) as e:
        kafka.Settings.parse({k: v for k, v in merged.items() if v is not None}, Path("."), WHERE)
    assert "\n" not in str(e.value)


def test_settings_and_the_producer_config_they_make() -> None:
    s = settings(max_message_bytes="2MB", timeout="5s", producer={"linger.ms": 20})
    assert (s.max_message_bytes, s.timeout) == (2_000_000, 5.0)
    conf = kafka.KafkaProducer(s).config
    assert conf["enable.idempotence"] is True and conf["acks"] == "all"
    assert conf["message.timeout.ms"] == 5000 and conf["request.timeout.ms"] == 5000
    assert conf["socket.timeout.ms"] == 5000 and conf["linger.ms"] == 20
    assert conf["message.max.bytes"] == 2_000_000 + kafka.FRAMING_BYTES  # the client lets it by
    assert settings().max_message_bytes == 1_000_000 and settings().timeout == 30.0


def test_nothing_is_made_before_the_first_send() -> None:
    out = kafka.KafkaProducer(settings(), make_producer=fake())
    assert FakeProducer.made == [] and out.status()["topic"] == "lines"
    assert out.send([{"id": 1}], "id") == []
    assert len(FakeProducer.made) == 1 and FakeProducer.made[0].sent == [(b"1", b'{"id":1}')]
    out.send([{"id": 2}], "id")
    assert len(FakeProducer.made) == 1  # one client for the output's life


def test_the_brokers_size_refusal_is_a_dead_letter_for_that_row_only() -> None:
    too_large = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "Broker: Message size too large")
    out = kafka.KafkaProducer(settings(), make_producer=fake(
        answer=lambda key: too_large if key == b"b" else None))
    rows = [{"id": "a"}, {"id": "b", "text": "long"}, {"id": "c"}]
    dead = out.send(rows, "id")
    assert dead == [(rows[1], "the message is too large for topic 'lines': "
                               "Broker: Message size too large")]
    assert [k for k, _ in FakeProducer.made[0].sent] == [b"a", b"c"]
    assert out.last is not None and (out.last.delivered, out.last.dead) == (2, 1)


def test_a_failed_delivery_raises_and_the_next_send_uses_a_new_client() -> None:
    timed_out = KafkaError(KafkaError._MSG_TIMED_OUT, "Local: Message timed out")
    answers = iter([None, timed_out, None])
    made = [fake(answer=lambda key: next(answers)), fake()]
    out = kafka.KafkaProducer(settings(), make_producer=lambda conf: made.pop(0)(conf))
    with pytest.raises(kafka.ProduceFailed, match="1 of 3 messages to topic 'lines' not "
                       "delivered: Local: Message timed out") as e:
        out.send([{"id": i} for i in range(3)], "id")
    assert isinstance(e.value, Retryable)  # the worker releases the batch uncounted
    assert FakeProducer.made[0].purged
    assert out.send([{"id": 9}], "id") == []
    assert len(FakeProducer.made) == 2 and FakeProducer.made[1].sent == [(b"9", b'{"id":9}')]


def test_a_flush_that_does_not_finish_raises_at_the_timeout() -> None:
    quick = kafka.Settings(bootstrap="h:1", topic="lines", timeout=0.3)  # parse wants 1 s
    out = kafka.KafkaProducer(quick, make_producer=fake(stuck=frozenset({b"2"})))
    with pytest.raises(kafka.ProduceFailed, match="1 of 3 messages not acknowledged within "
                       "0.3 s"):
        out.send([{"id": i} for i in range(3)], "id")
    assert FakeProducer.made[0].purged


def test_a_fatal_producer_error_raises_at_once() -> None:
    out = kafka.KafkaProducer(settings(timeout=60), make_producer=fake(
        stuck=frozenset({b"1"}), fatal=True))
    with pytest.raises(kafka.ProduceFailed, match="fatal producer error: .*producer fenced"):
        out.send([{"id": 1}], "id")


def test_a_full_client_queue_waits_for_room_bounded() -> None:
    out = kafka.KafkaProducer(settings(), make_producer=fake(full=3))
    assert out.send([{"id": 1}, {"id": 2}], "id") == []
    assert [k for k, _ in FakeProducer.made[0].sent] == [b"1", b"2"]


def test_keys_values_and_rows_that_cannot_be_messages() -> None:
    out = kafka.KafkaProducer(settings(max_message_bytes=40), make_producer=fake())
    when = __import__("datetime").datetime(2026, 12, 1, 13, 0)
    rows = [{"id": 7, "at": when}, {"id": None}, {"id": "x", "blob": object()},
            {"id": "y", "text": "z" * 40}]
    dead = out.send(rows, "id")
    assert FakeProducer.made[0].sent == [(b"7", b'{"id":7,"at":"2026-12-01T13:00:00"}')]
    assert [r for r, _ in dead] == rows[1:]
    assert "has no 'id'" in dead[0][1] and "cannot be encoded as JSON" in dead[1][1]
    assert "over max_message_bytes 40" in dead[2][1]


def test_the_output_interface_sends_results_and_returns_the_undeliverable() -> None:
    """KafkaOutput (lrq.outputs' Output for kind "kafka"): write() sends through the
    producer, keyed by the queue's key, and returns (row, key, error) for each dead letter."""
    from types import SimpleNamespace
    out = kafka.KafkaOutput(None, SimpleNamespace(name="access", key="id"), SimpleNamespace(
        name="to_kafka", aggregate=False, key=None, settings=settings(max_message_bytes=30)))
    out.producer._make = fake()
    assert kafka.KafkaOutput.parse({"bootstrap": "h:1", "topic": "t"}, WHERE).topic == "t"
    assert out.write(None, "b1", [], False) == [] and FakeProducer.made == []
    refused = out.write(None, "b1", [{"id": 1}, {"id": 2, "text": "y" * 40}], False)
    assert [(row["id"], key) for row, key, _ in refused] == [(2, "2")]
    assert isinstance(refused[0][2], kafka.Undeliverable) and "over max_message_bytes 30" in \
        str(refused[0][2])
    assert FakeProducer.made[0].sent == [(b"1", b'{"id":1}')]
    assert out.keys() is None and out.count() is None and out.duplicates() == 0


def test_loading_a_config_with_a_kafka_output_does_not_import_the_client(tmp_path: Path) -> None:
    """The kind is checked at config load (lrq.outputs.KINDS); confluent_kafka is imported
    only by the first send, so every lrq command that reads the config stays cheap."""
    import subprocess
    import sys

    from lrqtest import ROOT, write_config
    cfg = write_config(tmp_path, docs=None, handler=None, result_table=None, outputs={
        "to_kafka": {"kind": "kafka", "handler": "workers.wordcount:handle",
                     "bootstrap": "127.0.0.1:9", "topic": "t", "producer": {"linger.ms": 5}}})
    code = ("import sys; from lrq import config; c = config.load(sys.argv[1]); "
            "o = c.queues['docs'].outputs[0]; print(o.kind, o.settings.topic, "
            "'confluent_kafka' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.stdout.split() == ["kafka", "t", "False"], out.stderr
