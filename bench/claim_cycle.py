"""Benchmark one batch's spool bookkeeping: claim, mark_handled, mark_done, remove_done.

Issue 12 found creating inodes (the claim written aside, the done marker) to be the costly
part of a worker's per-batch spool work on ext4 while cleanup deletes done batches. This
runs that cycle ``--batches`` times over pending batches (copies of one published file, no
fsync), each cycle also deleting the batch it finished (``remove_done``, as cleanup does),
and prints microseconds per batch, wall (``perf_counter``) and CPU (``thread_time``), per
step and in total.

Compare two versions in the same session by running it under each one's code::

    .venv/bin/python bench/claim_cycle.py                         # this tree
    PYTHONPATH=/work/main .venv/bin/python bench/claim_cycle.py   # main
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

STEPS = ("claim", "mark_handled", "mark_done", "remove_done")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=3000, help="cycles (default 3000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the best is reported")
    p.add_argument("--tmp", help="folder for the temporary data dir (default: system tmp)")
    a = p.parse_args(argv)
    import lrq.spool
    from lrq.spool import SUFFIX, Spool

    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="lrq-bench-cycle-", dir=a.tmp) as d:
        sp = Spool(Path(d) / "data", "q", key=b"k" * 32).ensure()
        template = (sp.left / f"{sp.publish([{'doc_id': 0}])}{SUFFIX}").read_bytes()
        for _ in range(a.rounds):
            names = []
            for _ in range(a.batches):
                name = sp.new_name()
                with open(sp.left / f"{name}{SUFFIX}", "wb") as f:
                    f.write(template)
                names.append(name)
            wall = dict.fromkeys(STEPS, 0.0)
            cpu = dict.fromkeys(STEPS, 0.0)
            for name in names:
                for step in STEPS:
                    w0, c0 = time.perf_counter(), time.thread_time()
                    if step == "claim":
                        claim = sp.claim(name)
                        assert claim is not None
                    elif step == "remove_done":
                        sp.remove_done(name)
                    else:
                        getattr(sp, step)(claim)
                    wall[step] += time.perf_counter() - w0
                    cpu[step] += time.thread_time() - c0
            row = {f"{s}_wall_us": wall[s] / a.batches * 1e6 for s in STEPS}
            row.update({f"{s}_cpu_us": cpu[s] / a.batches * 1e6 for s in STEPS})
            row["total_wall_us"] = sum(wall.values()) / a.batches * 1e6
            row["total_cpu_us"] = sum(cpu.values()) / a.batches * 1e6
            if not best or row["total_wall_us"] < best["total_wall_us"]:
                best = row
    print(json.dumps({"lrq": os.path.dirname(lrq.spool.__file__), "batches": a.batches,
                      **{k: round(v, 1) for k, v in best.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
