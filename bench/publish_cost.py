"""Publish cost: the sniffer's wall time and CPU per published batch (issue 12, scope pub).

W1 (bench/run.py's source and config: lrq's defaults plus ``batch_size = B``) with lrq's real
objects in this process: ``Sniffer.tick`` as ``lrq sniff`` runs it (no ``stop``: it returns
when ``max_pending`` pauses it), then the published batches are deleted, as workers and
cleanup would remove them (deletions are part of the cost: on ext4 a new inode right after
deletions is slower, see this folder's README), and so on until ``--batches`` are published.
Only the ticks are timed: wall (``perf_counter``) and CPU (``getrusage(RUSAGE_SELF)``, every
thread of this process). Nothing else runs in the process meanwhile.

Old vs new: run it once per checkout, alternating, each with its own code on ``PYTHONPATH``::

    PYTHONPATH=/work/main .venv/bin/python bench/publish_cost.py --batch 100 --repeat 3
    PYTHONPATH=. .venv/bin/python bench/publish_cost.py --batch 100 --repeat 3

The first line of the output names the ``lrq`` package that ran.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import run  # bench/run.py (first on sys.path): source cache, config


@contextlib.contextmanager
def folder(source: Path, batch: int, tmp: str | None) -> Iterator[Path]:
    """A fresh run folder with a copy of the source and ``lrq.toml``; the cwd meanwhile."""
    with tempfile.TemporaryDirectory(prefix="lrq-bench-publish-", dir=tmp) as d:
        work = Path(d)
        shutil.copyfile(source, work / "source.db")
        cfg = work / "lrq.toml"
        cfg.write_text(run.config_text(work / "source.db", batch))
        old = os.getcwd()
        os.chdir(work)
        try:
            yield cfg
        finally:
            os.chdir(old)


def one_run(batch: int, batches: int, tmp: str | None) -> tuple[float, float, int]:
    """(wall s, CPU s, batches published) of the ticks publishing ``batches`` batches."""
    from lrq import config
    from lrq.app import App

    source = run.cached_source(batch * batches)
    with folder(source, batch, tmp) as cfg:
        app = App(config.load(cfg))
        sniffer = app.sniffer(app.queues()[0])
        spool = sniffer.spool
        wall = cpu = 0.0
        published = 0
        with spool.lock("sniff"):
            while published < batches:
                r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                k = sniffer.tick()
                w1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
                wall += w1 - w0
                cpu += (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
                published += k
                if k == 0 and sniffer.drained:
                    break
                for entry in os.scandir(spool.left):  # consumed and cleaned up, untimed
                    os.unlink(entry.path)
        sniffer.source.close()
    return wall, cpu, published


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=run.ints, default=[100], help="items per batch (default 100)")
    p.add_argument("--batches", type=int, default=300, help="batches per run (default 300)")
    p.add_argument("--repeat", type=int, default=3, help="runs per batch size (default 3)")
    p.add_argument("--tmp", help="folder for the run folders (default: system tmp)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import lrq

    logging.basicConfig(level=logging.WARNING)
    print(f"lrq from {Path(lrq.__file__).parent}")
    print(f"{'B':>5} {'run':>4} {'batches':>8} {'wall us/batch':>14} {'cpu us/batch':>13}")
    for b in args.batch:
        walls, cpus = [], []
        for i in range(args.repeat):
            wall, cpu, n = one_run(b, args.batches, args.tmp)
            walls.append(wall * 1e6 / n)
            cpus.append(cpu * 1e6 / n)
            print(f"{b:>5} {i + 1:>4} {n:>8} {walls[-1]:>14.0f} {cpus[-1]:>13.0f}")
        print(f"{b:>5} {'med':>4} {'':>8} {statistics.median(walls):>14.0f} "
              f"{statistics.median(cpus):>13.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
