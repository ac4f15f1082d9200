"""What pause checks and lifecycle log lines cost a worker, per claim attempt and per batch.

``pause-check``
    :meth:`lrq.control.Watch.paused` as the worker calls it before every claim attempt: one
    ``lstat`` of ``<queue>/paused.json``, not paused and paused (the record is cached).
``pick``
    A warm :meth:`Spool.pick` + :meth:`Spool.release` on a small backlog (``--pending``), in the
    same run, for scale: the check is a small part of a claim attempt.
``log-line``
    One ``claimed queue=... batch=... attempt=1`` record as a scheduler's worker process
    writes it: to two files (its stderr, its log file), text and ``--log-format json``; and
    the same call at DEBUG while the level is INFO (what ``claimed`` costs today).

Prints a table (µs per call, the median of ``--repeat`` rounds of ``--n`` calls each) and
writes ``bench/results/<UTC timestamp>-control-cost.json``.

    .venv/bin/python bench/control_cost.py [--quick] [--n 20000] [--repeat 5]
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from run import new_report, write_report  # noqa: E402

from lrq import control, logfile  # noqa: E402
from lrq.spool import Spool  # noqa: E402


def per_call(fn: Callable[[], object], n: int, repeat: int) -> float:
    """µs per call, the median of ``repeat`` rounds."""
    rounds = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - t0) / n * 1e6)
    return round(statistics.median(rounds), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--pending", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help="--n 2000 --repeat 3")
    args = ap.parse_args()
    if args.quick:
        args.n, args.repeat = 2000, 3
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        sp = Spool(data, "docs", key=b"k" * 32).ensure()
        for i in range(args.pending):
            sp.publish([{"doc_id": i}])
        watch = control.Watch(data, "docs")
        out["pause_check_not_paused_us"] = per_call(watch.paused, args.n, args.repeat)
        control.pause(data, "docs", "bench")
        logging.getLogger("lrq.control").disabled = True  # its one "paused" line
        out["pause_check_paused_us"] = per_call(watch.paused, args.n, args.repeat)
        control.resume(data, "docs")

        def pick() -> None:
            claim = sp.pick("random")
            assert claim is not None
            sp.release(claim)

        out["pick_release_us"] = per_call(pick, max(args.n // 10, 100), args.repeat)

        log = logging.getLogger("bench.claimed")
        log.propagate = False
        log.setLevel(logging.INFO)
        for fmt in ("text", "json"):
            formatter = logfile.child_format("docs", fmt)
            handlers = [logfile.AppendFileHandler(data / f"stderr-{fmt}", formatter),
                        logfile.AppendFileHandler(data / f"lrq-{fmt}.log", formatter)]
            log.handlers[:] = handlers

            def line() -> None:
                log.info("claimed queue=%s batch=%s attempt=%d", "docs",
                         "20261201T104512123456-Xk3pQ9aLm2Zt", 1)

            out[f"log_line_{fmt}_us"] = per_call(line, args.n, args.repeat)
            for h in handlers:
                h.close()

        def debug_off() -> None:
            log.debug("claimed queue=%s batch=%s attempt=%d", "docs",
                      "20261201T104512123456-Xk3pQ9aLm2Zt", 1)

        out["log_line_debug_disabled_us"] = per_call(debug_off, args.n, args.repeat)
    stamp, report = new_report("benchmark", "control-cost", vars(args))
    report["results"] = [out]
    table = "\n".join(f"{k:<28} {v:>10.2f} µs" for k, v in out.items())
    write_report(report, stamp, "control-cost", table)


if __name__ == "__main__":
    main()
