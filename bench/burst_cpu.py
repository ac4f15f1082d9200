"""CPU per batch of one ``lrq work --burst`` over a fresh backlog, for two code trees in
the same session (the tree of this file and ``--old``, e.g. main's), alternating runs.

Each run: a new data dir with ``--docs`` W1 documents at ``--batch`` items per batch,
sniffed by this tree (the batch format is shared), then ``python -m lrq work --burst`` run
with the tree under test first on ``sys.path``; its user + system CPU (``getrusage`` of the
child), less that of a burst over an empty queue (start and stop), divided by the batches
it did. Prints each run and the median per tree::

    .venv/bin/python bench/burst_cpu.py --old /work/main
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(HERE / "tests"), str(HERE)]


def run_burst(tree: Path, cfg: Path) -> float:
    """CPU seconds of one ``lrq work --burst`` run with ``tree``'s code."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-m", "lrq", "-c", str(cfg), "work", "--burst"], cwd=tree,
                   env={**os.environ, "PYTHONPATH": str(tree)}, check=True,
                   capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def one_run(tree: Path, docs: int, batch: int) -> tuple[float, int]:
    """(CPU seconds, batches done) of a burst over ``docs`` documents (0: an empty queue,
    the process's start and stop alone)."""
    from lrqtest import write_config

    with tempfile.TemporaryDirectory(prefix="lrq-bench-burst-") as d:
        cfg = write_config(Path(d), docs=max(docs, 1), batch_size=batch,
                           chunk_size=min(batch, 100), max_pending=10**6)
        if docs:
            subprocess.run([sys.executable, "-m", "lrq", "-c", str(cfg), "sniff"], cwd=HERE,
                           check=True, capture_output=True)
        cpu = run_burst(tree, cfg)
        q = Path(d) / "data/docs"  # done batches: in done/, or the older trees' right/*.done
        return cpu, len(list(q.glob("done/*.pkl"))) + len(list(q.glob("right/*.done")))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", required=True, help="the other code tree (e.g. /work/main)")
    p.add_argument("--docs", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    out: dict[str, list[float]] = {"new": [], "old": []}
    for _ in range(a.rounds):
        for label, tree in (("old", Path(a.old)), ("new", HERE)):
            idle, _ = one_run(tree, 0, a.batch)
            cpu, batches = one_run(tree, a.docs, a.batch)
            ms = (cpu - idle) / batches * 1e3
            out[label].append(ms)
            print(f"{label}: {batches} batches, {cpu:.2f} s CPU, {idle:.2f} s of it start and "
                  f"stop: {ms:.3f} ms CPU per batch", flush=True)
    old, new = statistics.median(out["old"]), statistics.median(out["new"])
    print(f"median: old {old:.3f} ms, new {new:.3f} ms per batch; new/old {new / old:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
