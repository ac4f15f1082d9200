"""Log source: lines/s from a growing log file into batch files (issue 15, target 100k/s).

A generated file of apache-like access lines (``--lines``, default 1M, ~150 bytes each) is
read by ``kind = "logfile"`` through lrq's real objects on the default settings (the log
kind's ``batch_size`` 1000, ``max_pending`` 50, the disk budget, group-committed fsyncs): the
``Sniffer.tick`` as ``lrq sniff`` runs it, which returns when ``max_pending`` pauses it;
between ticks the published batches are unlinked, untimed (workers would take them). Only
the ticks are timed. Against it, in the same run: ``cat FILE > /dev/null`` (the cost of
reading the bytes at all) and the source's ``fetch`` alone (no batch files), so the ratio
and the split are measured on the same machine load::

    .venv/bin/python bench/logfile_source.py            # 1M lines, 3 repeats
    .venv/bin/python bench/logfile_source.py --quick    # 200k lines, 1 repeat

Prints a table; writes ``bench/results/<stamp>-logfile.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import run  # bench/run.py (first on sys.path): reports

TARGET = 100_000  # lines/s into batch files (issue 15)


def generate(path: Path, n: int) -> int:
    """Write ``n`` apache combined-format lines; their total bytes."""
    with open(path, "wb") as fh:
        for start in range(0, n, 10_000):
            fh.write(b"".join(
                (f'10.{i % 7}.{i // 250 % 250}.{i % 250} - - [01/Dec/2026:13:{i // 60 % 60:02d}:'
                 f'{i % 60:02d} +0000] "GET /shop/item/{i}?ref=mail&page={i % 40} HTTP/1.1" '
                 f'{(200, 200, 200, 304, 404)[i % 5]} {i % 50_000} "https://example.com/" '
                 f'"Mozilla/5.0 (X11; Linux x86_64) bench/{i % 97}"\n').encode()
                for i in range(start, min(start + 10_000, n))))
    return path.stat().st_size


def time_cat(path: Path) -> float:
    t = time.perf_counter()
    subprocess.run(f"cat '{path}' > /dev/null", shell=True, check=True)
    return time.perf_counter() - t


def time_fetch(path: Path, n: int, batch: int) -> tuple[float, float]:
    """The source's fetch alone, ``batch`` lines at a time, as the sniffer calls it."""
    from lrq.sources import logfile

    src = logfile.open(logfile.Settings(paths=(str(path),)))
    pos, got = None, 0
    t, c = time.perf_counter(), time.process_time()
    while True:
        f = src.fetch(pos, batch)
        if not f.items:
            break
        got, pos = got + len(f.items), f.position
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    src.close()
    if got != n:
        raise SystemExit(f"fetch read {got} lines, expected {n}")
    return wall, cpu


def time_sniff(log: Path, n: int, tmp: str | None,
               batch: int | None) -> tuple[float, float, int]:
    """(wall s, CPU s of the ticks, batches published) through App/Sniffer/Spool on defaults."""
    from lrq import config
    from lrq.app import App

    with tempfile.TemporaryDirectory(prefix="lrq-bench-logfile-", dir=tmp) as d:
        cfg = Path(d) / "lrq.toml"
        cfg.write_text('data_dir = "data"\ndb_url = "sqlite:///results.db"\n'
                       '[queues.access]\nhandler = "workers.wordcount:handle"\nkey = "id"\n'
                       + (f"batch_size = {batch}\n" if batch else "")
                       + f'[queues.access.source]\nkind = "logfile"\npaths = ["{log}"]\n')
        app = App(config.load(cfg))
        q = app.queues()[0]
        sniffer = app.sniffer(q)
        spool = sniffer.spool
        wall, cpu, published, items = 0.0, 0.0, 0, 0
        with spool.lock("sniff"):
            while True:
                t, c = time.perf_counter(), time.process_time()
                k = sniffer.tick()
                wall += time.perf_counter() - t
                cpu += time.process_time() - c
                published += k
                for entry in os.scandir(spool.left):  # taken by workers: untimed
                    if items == 0:
                        items = len(spool.load(entry.name[: -len(".pkl")]).items) if \
                            entry.name.endswith(".pkl") else 0
                    os.unlink(entry.path)
                if k == 0 and sniffer.drained:
                    break
        position = spool.read_position()
        sniffer.source.close()
    offset = position["files"][0]["offset"]
    if offset != log.stat().st_size:
        raise SystemExit(f"the saved position is at {offset}, not at the end of the file")
    if published != -(-n // q.batch_size):
        raise SystemExit(f"published {published} batches for {n} lines at {q.batch_size}")
    return wall, cpu, published


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lines", type=int, default=1_000_000, help="lines in the file (default 1M)")
    p.add_argument("--repeat", type=int, default=3, help="runs; medians reported (default 3)")
    p.add_argument("--batch", type=int, help="batch_size (default: the log kind's, 1000)")
    p.add_argument("--quick", action="store_true", help="200k lines, one run")
    p.add_argument("--tmp", help="folder for the log file and the data dir (default: system tmp)")
    args = p.parse_args(argv)
    if args.quick:
        args.lines, args.repeat = 200_000, 1
    stamp, report = run.new_report("benchmark", "logfile", vars(args))
    samples: dict[str, list[float]] = {"cat": [], "fetch": [], "sniff": [], "fetch_cpu": [],
                                       "sniff_cpu": []}
    with tempfile.TemporaryDirectory(prefix="lrq-bench-log-", dir=args.tmp) as d:
        log = Path(d) / "access.log"
        size = generate(log, args.lines)
        with contextlib.suppress(OSError):
            log.read_bytes()  # in the page cache for every contender
        for i in range(args.repeat):
            samples["cat"].append(time_cat(log))
            wall, cpu = time_fetch(log, args.lines, args.batch or 1000)
            samples["fetch"].append(wall)
            samples["fetch_cpu"].append(cpu)
            wall, cpu, batches = time_sniff(log, args.lines, args.tmp, args.batch)
            samples["sniff"].append(wall)
            samples["sniff_cpu"].append(cpu)
            print(f"run {i + 1}: cat {samples['cat'][-1]:.3f}s  fetch {samples['fetch'][-1]:.3f}s  "
                  f"sniff {wall:.3f}s (CPU {cpu:.3f}s, {batches} batches)", flush=True)
    med = {k: statistics.median(v) for k, v in samples.items()}
    rows: list[dict[str, Any]] = []
    for k, what in (("cat", "cat FILE > /dev/null"),
                    ("fetch", f"LogfileSource.fetch(limit={args.batch or 1000})"),
                    ("sniff", f"Sniffer.tick into left/ (batch_size {args.batch or 1000})")):
        cpu = med.get(f"{k}_cpu")
        rows.append({"what": what, "seconds": med[k], "lines_per_s": args.lines / med[k],
                     "mb_per_s": size / med[k] / 1e6, "cpu_seconds": cpu,
                     "lines_per_cpu_s": args.lines / cpu if cpu else None, "samples": samples[k]})
    ratio = med["cat"] / med["sniff"]
    report["results"] = rows
    report.update(file_bytes=size, lines=args.lines, ratio_sniff_to_cat=ratio,
                  target_lines_per_s=TARGET, met=rows[2]["lines_per_s"] >= TARGET)
    table = [f"{'':<40} {'wall s':>8} {'lines/s':>12} {'MB/s':>8} {'lines/CPU s':>12}"]
    table += [f"{r['what']:<40} {r['seconds']:>8.3f} {r['lines_per_s']:>12,.0f} "
              f"{r['mb_per_s']:>8.1f} {r['lines_per_cpu_s'] or 0:>12,.0f}" for r in rows]
    table.append(f"\n{args.lines:,} lines, {size / 1e6:.0f} MB; into batch files at "
                 f"{ratio:.4f} x cat's speed (wall); target {TARGET:,} lines/s (wall): "
                 f"{'met' if report['met'] else 'NOT MET'}. The wall time beyond the CPU time "
                 f"is mostly each batch file's fsync (see bench/README.md).")
    run.write_report(report, stamp, "logfile", "\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
