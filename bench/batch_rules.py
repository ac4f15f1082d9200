"""What the sniffer's batch rules cost per item, against encoding the same items.

The sniffer cuts each fetch with a :class:`lrq.batching.Batcher` (add, ready, piece, drop per
batch, as :meth:`lrq.sniffer.Sniffer.tick` calls them). Measured over the W1 sample documents
(``lrq.sample.documents``, ~300 bytes each), fetched ``--batch`` at a time:

``none``
    no rule: the fast path (nothing per item);
``max_bytes``
    ``batch_max_bytes`` of 16 items' worth (a pickle per item);
``separate``
    ``separate = workers.storage:apart`` (kinds 0-3 at random), ``batch_size`` as given;
``encode``
    the baseline, in the same run: ``pickle.dumps`` of each batch, the spool's encoding before
    compression and signing (the sniffer's ``encode`` step is more: compression and HMAC).

Prints µs per item (median of ``--repeat`` rounds) and each rule's ratio to ``encode``, and
writes ``bench/results/<UTC timestamp>-batch-rules.json``.

    .venv/bin/python bench/batch_rules.py [--quick] [--items 100000] [--batch 100]
"""
from __future__ import annotations

import argparse
import pickle
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from run import new_report, write_report  # noqa: E402

from lrq.batching import Batcher, Rules, item_size  # noqa: E402
from lrq.sample import documents  # noqa: E402
from lrq.sources import Fetched  # noqa: E402
from workers.storage import apart  # noqa: E402


def cut_all(rules: Rules, items: list[dict[str, Any]], batch: int) -> int:
    """Feed ``items`` through a batcher ``batch`` at a time, as the sniffer does; the number
    of batches made."""
    b, made = Batcher(rules), 0
    for start in range(0, len(items), batch):
        b.add(Fetched(items[start:start + batch], start + batch), 0.0)
        while b.ready(0.0):
            b.piece(None)
            b.drop()
            made += 1
    return made


def encode_all(items: list[dict[str, Any]], batch: int) -> int:
    for start in range(0, len(items), batch):
        pickle.dumps(items[start:start + batch], protocol=pickle.HIGHEST_PROTOCOL)
    return -(-len(items) // batch)


def per_item(fn: Any, n: int, repeat: int) -> tuple[float, int]:
    rounds, made = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        made = fn()
        rounds.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(rounds), made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="--items 20000 --repeat 3")
    args = ap.parse_args()
    if args.quick:
        args.items, args.repeat = 20_000, 3
    rng = random.Random(15)
    items = [{"id": d["id"], "doc_id": d["mid"], "content": d["content"],
              "kind": rng.choice((0, 1, 2, 3))} for d in documents(args.items)]
    limit = 16 * item_size(items[0])
    cases = {
        "none": Rules(batch_size=args.batch),
        "max_bytes": Rules(batch_size=args.batch, max_bytes=limit),
        "separate": Rules(batch_size=args.batch, separate=apart),
    }
    out: dict[str, Any] = {}
    base, _ = per_item(lambda: encode_all(items, args.batch), args.items, args.repeat)
    out["encode_us_per_item"] = round(base, 3)
    rows = [f"{'encode (baseline)':<18} {base:>8.3f} µs/item"]
    for name, rules in cases.items():
        us, made = per_item(lambda r=rules: cut_all(r, items, args.batch), args.items,
                            args.repeat)
        out[f"{name}_us_per_item"] = round(us, 3)
        out[f"{name}_ratio_to_encode"] = round(us / base, 3)
        out[f"{name}_batches"] = made
        rows.append(f"{name:<18} {us:>8.3f} µs/item  {us / base:>6.2f}x encode  {made} batches")
    stamp, report = new_report("benchmark", "batch-rules", vars(args))
    report["results"] = [out]
    write_report(report, stamp, "batch-rules", "\n".join(rows))


if __name__ == "__main__":
    main()
