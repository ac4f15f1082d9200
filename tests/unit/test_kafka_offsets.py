"""The Kafka commit point (lrq/sources/kafka_offsets.py) without a broker: batches finish out
of order, held receipts are skipped but still counted, early acks survive until assigned."""
from __future__ import annotations

from lrq.sources.kafka_offsets import Tracker


def fetch(t: Tracker, p: int, offsets: range) -> list[int]:
    return [o for o in offsets if t.fetched(p, o)]


def test_commit_point_is_the_oldest_unacked_offset() -> None:
    t = Tracker()
    t.assigned([0, 1])
    assert fetch(t, 0, range(5, 35)) == list(range(5, 35))
    assert t.due() == {}  # the first fetched offset is where the group already is
    for o in range(15, 25):
        t.acked(0, o)
    assert t.due() == {}
    for o in range(5, 15):
        t.acked(0, o)
    assert t.due() == {0: 25}
    t.confirmed({0: 25})
    assert t.due() == {} and t.in_flight() == 10
    for o in range(25, 35):
        t.acked(0, o)
    assert t.due() == {0: 35} and t.in_flight() == 0


def test_gaps_in_offsets_do_not_stall_the_commit() -> None:
    t = Tracker()
    t.assigned([0])
    fetch(t, 0, range(0, 10, 3))  # 0 3 6 9: compacted offsets between
    for o in (9, 6, 3, 0):
        t.acked(0, o)
    assert t.due() == {0: 10}


def test_held_offsets_are_skipped_but_wait_for_their_ack() -> None:
    t = Tracker(held=[(0, 10), (0, 11), (1, 4)])
    t.acked(0, 11)  # the acker may run before the group assigns anything
    t.assigned([0])  # partition 1 went to another node: its held receipt is forgotten
    assert fetch(t, 0, range(10, 14)) == [12, 13]
    t.acked(0, 12)
    t.acked(0, 13)
    assert t.due() == {}  # 10 is still in a local batch file
    t.acked(0, 10)
    assert t.due() == {0: 14}
    t.assigned([1])
    assert fetch(t, 1, range(4, 6)) == [4, 5]  # no longer skipped: held was dropped


def test_revoked_partitions_ignore_acks_and_forget_held() -> None:
    t = Tracker(held=[(0, 3)])
    t.assigned([0])
    fetch(t, 0, range(0, 3))
    t.revoked([0])
    assert t.acked(0, 0) is False and t.due() == {}
    t.assigned([0])  # back again: fetched from the group's offset, nothing skipped
    assert fetch(t, 0, range(0, 5)) == [0, 1, 2, 3, 4]


def test_an_ack_ahead_of_the_fetch_counts_when_it_comes() -> None:
    t = Tracker()
    t.assigned([0])
    fetch(t, 0, range(0, 2))
    t.acked(0, 2)  # e.g. an old batch of a former ownership: its results are stored
    t.acked(0, 0)
    t.acked(0, 1)
    assert t.due() == {0: 2}
    fetch(t, 0, range(2, 3))
    assert t.due() == {0: 3}
