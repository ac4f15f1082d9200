"""A kafka source member in a process of its own, for the takeover test (SIGKILLed there).

``python kafka_member.py BROKERS TOPIC GROUP DATA_DIR ACK_BELOW``: opens the source with the
test broker's fast-group options, fetches forever, acknowledges every item whose offset is
below ACK_BELOW, and prints one JSON line per event: ``{"assigned": [...]}`` when its
partitions change, ``{"fetched": [[topic, partition, offset], ...]}``, ``{"acked": n}``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from lrq.sources import Context, kafka


def main() -> None:
    brokers, topic, group, data_dir, ack_below = sys.argv[1:6]
    options = json.loads(sys.argv[6])
    settings = kafka.Settings.parse({"brokers": brokers, "topic": topic, "group": group,
                                     "options": options}, Path(data_dir), "source")
    src = kafka.open(settings, Context(Path(data_dir), "events"))
    seen: list[int] = []
    while True:  # ends by SIGKILL (the test's point) or SIGTERM
        f = src.fetch(None, 100)
        if src.assignment() != seen:
            seen = src.assignment()
            print(json.dumps({"assigned": seen}), flush=True)
        if f.items:
            receipts = f.receipts or []
            print(json.dumps({"fetched": receipts}), flush=True)
            done = [r for r in receipts if r[2] < int(ack_below)]
            src.ack(done)
            print(json.dumps({"acked": len(done)}), flush=True)


if __name__ == "__main__":
    main()
