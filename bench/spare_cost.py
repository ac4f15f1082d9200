"""Spare cost: CPU of getting a batch's ``tmp/`` file, a new inode against a spare, right
after many deletions (issue 12, scope spare).

On journal-less ext4 a new inode is checked against recently deleted ones (the kernel's
``recently_deleted``), so creating a file costs more the more files were deleted in the last
minutes, which is what retention does in steady state. This first deletes ``--churn`` files
in the folder (a retention burst), then alternates rounds of ``--files`` of each:

* new: ``lrq.spool.files.create`` (``O_CREAT|O_EXCL``), close; the file is then unlinked,
  untimed, as retention would;
* spare: ``lrq.spool.files.take_spare`` (lstat, rename ``spare/`` -> ``tmp/``, open, fstat,
  truncate), close; the file is then retired again, untimed (``lrq.spool.files.retire``).

CPU is ``time.thread_time`` around each call (system time included: the cost is in the
kernel), in microseconds per file, medians over the rounds::

    .venv/bin/python bench/spare_cost.py --churn 20000 --files 2000 --rounds 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lrq.spool.files import create, retire, take_spare


def churn(folder: Path, n: int) -> None:
    """Create and delete ``n`` files in ``folder``: recently deleted inodes, as retention leaves."""
    for i in range(n):
        p = folder / f"c{i}"
        os.close(create(p))
        os.unlink(p)


def new_round(tmp: Path, n: int) -> float:
    cpu = 0.0
    for i in range(n):
        p = tmp / f"n{i}"
        t0 = time.thread_time()
        os.close(create(p))
        cpu += time.thread_time() - t0
    for i in range(n):
        os.unlink(tmp / f"n{i}")
    return cpu * 1e6 / n


def spare_round(tmp: Path, spare: Path, n: int) -> float:
    cpu = 0.0
    names = [e.name for e in os.scandir(spare)][:n]
    for i, name in enumerate(names):
        p = tmp / f"s{i}"
        t0 = time.thread_time()
        fd = take_spare(spare / name, p)
        assert fd is not None
        os.close(fd)
        cpu += time.thread_time() - t0
    for i in range(len(names)):
        if retire(tmp / f"s{i}", spare) is None:
            raise RuntimeError("retire failed")
    return cpu * 1e6 / max(len(names), 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--churn", type=int, default=20000, help="files deleted first (default 20000)")
    p.add_argument("--files", type=int, default=2000, help="files per round (default 2000)")
    p.add_argument("--rounds", type=int, default=5, help="rounds of each (default 5)")
    p.add_argument("--tmp", help="folder for the run (default: system tmp)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lrq-bench-spare-", dir=args.tmp) as d:
        tmp, spare = Path(d) / "tmp", Path(d) / "spare"
        tmp.mkdir()
        spare.mkdir()
        for i in range(args.files):  # the spares, made once
            os.close(create(tmp / f"x{i}"))
            retire(tmp / f"x{i}", spare)
        churn(tmp, args.churn)
        got: dict[str, list[float]] = {"new": [], "spare": []}
        print(f"{'round':>5} {'new us':>8} {'spare us':>9}   (CPU per file, after {args.churn} deletions)")
        for r in range(args.rounds):
            order = ("new", "spare") if r % 2 == 0 else ("spare", "new")
            for which in order:
                got[which].append(new_round(tmp, args.files) if which == "new"
                                  else spare_round(tmp, spare, args.files))
            print(f"{r + 1:>5} {got['new'][-1]:>8.1f} {got['spare'][-1]:>9.1f}")
        new, sp = statistics.median(got["new"]), statistics.median(got["spare"])
        print(f"{'med':>5} {new:>8.1f} {sp:>9.1f}   spare/new {sp / new:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
