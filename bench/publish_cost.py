"""Publish cost: the sniffer's wall time and CPU per published batch (issue 12, scope pub).

W1 (bench/run.py's source and config: lrq's defaults plus ``batch_size = B``) with lrq's real
objects in this process: ``Sniffer.tick`` as ``lrq sniff`` runs it (no ``stop``: it returns
when ``max_pending`` pauses it), then the published batches leave ``left/`` as workers move
them: renamed into ``done/`` (the default: done batches are kept ``keep_done``, 7 days), or
with ``--delete`` unlinked, as cleanup does once the data dir is at ``cleanup.max_bytes``
(on journal-less ext4 a new inode right after deletions costs more CPU, see this folder's
README), or with ``--retire`` moved into ``done/`` and removed by lrq's own cleanup
(``cleanup.run`` past ``keep_done``: from the spare branch on, retention retires them into
``spare/`` for the sniffer to reuse; before it, it unlinks them), and so on until
``--batches`` are published.
Only the ticks are timed: wall (``perf_counter``) and CPU (``getrusage(RUSAGE_SELF)``, every
thread of this process). Nothing else runs in the process meanwhile.

Old vs new: ``--compare /work/main`` runs each repeat twice, as child processes alternating
between that checkout's ``lrq`` and this one's (``PYTHONPATH``), and prints the medians and
their ratio (new / old), so both see the same machine load::

    .venv/bin/python bench/publish_cost.py --batch 100 --repeat 5 --compare /work/main

Without it, one run with whatever ``lrq`` imports (the first line of the output names it).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import run  # bench/run.py (first on sys.path): source cache, config


@contextlib.contextmanager
def folder(source: Path, batch: int, tmp: str | None) -> Iterator[Path]:
    """A fresh run folder with ``lrq.toml``; the cwd meanwhile. The sniffer only reads the
    cached source (its position is in the data dir), so it is not copied: writing back and
    deleting a copy of tens of MB per run made the next runs' fsyncs slower."""
    with tempfile.TemporaryDirectory(prefix="lrq-bench-publish-", dir=tmp) as d:
        work = Path(d)
        cfg = work / "lrq.toml"
        cfg.write_text(run.config_text(source, batch))
        with contextlib.chdir(work):
            yield cfg


def one_run(batch: int, batches: int, tmp: str | None, delete: bool,
            retire: bool = False) -> tuple[float, float, int]:
    """(wall s, CPU s, batches published) of the ticks publishing ``batches`` batches."""
    from lrq import cleanup, config
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
                for entry in os.scandir(spool.left):  # consumed (and cleaned up), untimed
                    if delete:
                        os.unlink(entry.path)
                    else:
                        os.rename(entry.path, spool.done / entry.name)
                if retire:
                    cleanup.run(app, now=time.time() + app.cfg.cleanup.keep_done + 1)
        sniffer.source.close()
    return wall, cpu, published


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=run.ints, default=[100], help="items per batch (default 100)")
    p.add_argument("--batches", type=int, default=300, help="batches per run (default 300)")
    p.add_argument("--repeat", type=int, default=3, help="runs per batch size (default 3)")
    p.add_argument("--quick", action="store_true", help="100 batches, one run")
    p.add_argument("--tmp", help="folder for the run folders (default: system tmp)")
    p.add_argument("--delete", action="store_true",
                   help="unlink the published batches (retention at work) instead of moving them")
    p.add_argument("--retire", action="store_true",
                   help="remove the published batches by lrq's cleanup (retention) after each tick")
    p.add_argument("--compare", metavar="CHECKOUT",
                   help="alternate runs with CHECKOUT's lrq (old) and this checkout's (new)")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.repeat = 100, 1
    return args


def compare(args: argparse.Namespace) -> int:
    """Alternate child runs of old (``--compare``) and new (this checkout) code; ratios."""
    here = Path(__file__).resolve().parent.parent
    checkouts = {"old": Path(args.compare).resolve(), "new": here}
    print(f"old: {checkouts['old']}  new: {checkouts['new']}")
    print(f"{'B':>5} {'run':>4} {'old wall':>9} {'new wall':>9} {'old cpu':>8} {'new cpu':>8}   (us/batch)")
    for b in args.batch:
        got: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
        for i in range(args.repeat):
            for which in (("old", "new") if i % 2 == 0 else ("new", "old")):
                cmd = [sys.executable, __file__, "--batch", str(b), "--batches", str(args.batches),
                       "--repeat", "1", *(["--tmp", args.tmp] if args.tmp else []),
                       *(["--delete"] if args.delete else []),
                       *(["--retire"] if args.retire else [])]
                env = {**os.environ, "PYTHONPATH": str(checkouts[which])}
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True,
                                     timeout=600).stdout
                wall, cpu = out.splitlines()[-1].split()[-2:]
                got[which].append((float(wall), float(cpu)))
            (ow, oc), (nw, nc) = got["old"][-1], got["new"][-1]
            print(f"{b:>5} {i + 1:>4} {ow:>9.0f} {nw:>9.0f} {oc:>8.0f} {nc:>8.0f}")
        med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
               for k, v in got.items()}
        print(f"{b:>5} {'med':>4} {med['old'][0]:>9.0f} {med['new'][0]:>9.0f} {med['old'][1]:>8.0f} "
              f"{med['new'][1]:>8.0f}   new/old: wall {med['new'][0] / med['old'][0]:.2f}, "
              f"cpu {med['new'][1] / med['old'][1]:.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compare:
        return compare(args)
    import lrq

    logging.basicConfig(level=logging.WARNING)
    print(f"lrq from {Path(lrq.__file__).parent}")
    print(f"{'B':>5} {'run':>4} {'batches':>8} {'wall us/batch':>14} {'cpu us/batch':>13}")
    for b in args.batch:
        walls, cpus = [], []
        for i in range(args.repeat):
            wall, cpu, n = one_run(b, args.batches, args.tmp, args.delete, args.retire)
            walls.append(wall * 1e6 / n)
            cpus.append(cpu * 1e6 / n)
            print(f"{b:>5} {i + 1:>4} {n:>8} {walls[-1]:>14.0f} {cpus[-1]:>13.0f}")
        print(f"{b:>5} {'med':>4} {'':>8} {statistics.median(walls):>14.0f} "
              f"{statistics.median(cpus):>13.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
