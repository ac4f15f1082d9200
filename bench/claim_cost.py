"""Benchmark claim cost against backlog: ``Spool.pick`` with 1k, 10k, 100k pending batches.

One queue folder is grown to each backlog size in turn (tiny batches of one item,
``Spool.publish([{"doc_id": i}])``). For every size:

``pending``
    ``Spool.pending()``: the listing of ``left/`` minus the claims in ``right/``, sorted.
``counts``
    ``Spool.counts()``: the census with a ``stat`` per file the sniffer takes every tick.
``fresh``
    ``Spool.pick("random")`` on a new ``Spool`` object each time, so nothing is cached (a
    worker process's first claim): it reads a sample of ``left/`` from a random offset and
    lists the backlog only if none of the sample is pending.
``warm``
    ``Spool.pick("random")`` repeatedly on one ``Spool`` (the steady state of a long-running
    worker): it takes a name from what an earlier pick cached (a sample, or a listing).

Claims taken are removed again after each phase, so every phase sees the full backlog.

Done backlog (``--done``, default 100,000): a separate queue with 60 pending batches, timed
with no done batches and then with ``--done`` kept done batches (as retention keeps them for
``keep_done``), in the same run: fresh ``pick`` p50, ``has_pending()`` and ``pending_stats()``.
The done batches are made in the layout of the lrq imported: ``done/<name>.pkl``, or for a
version without ``done/``, ``left/<name>.pkl`` beside ``right/<name>.done``.

Generating the backlog: real publishes (tmp write, fsync, rename, fsync ``left/``) are timed
on a sample; if publishing the largest backlog that way is estimated to take longer than
``--publish-budget`` seconds (default 180), the rest is made by writing the bytes of one
published file under new names from ``Spool.new_name()`` (no fsync). lrq checks only the
signature, which covers the content, not the name; one copy is loaded to prove it.

The folders are freshly written, so the listings run against a warm dentry cache.
JSON goes to ``bench/results/<timestamp>-claim-cost.json``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lrq.spool import Spool

import run  # bench/run.py (first on sys.path): source cache, lrq command, machine info, tables

NAME = "claim-cost"
QUEUE = "q"
TARGET = 2.0  # p50(largest backlog) / p50(smallest) a claim should stay within

EXAMPLES = """\
examples:
  python bench/claim_cost.py --quick         1k, 10k, 100k pending; 50 claims, mostly copies
  python bench/claim_cost.py                 1k, 10k, 100k pending; 200 claims per phase
  python bench/claim_cost.py --sizes 1000,100000 --claims 500 --tmp /dev/shm
"""



@dataclass
class Backlog:
    """A growing queue folder and how its files were made."""

    data: Path
    spool: Spool
    published: int = 0
    publish_seconds: float = 0.0
    copied: int = 0
    copy_seconds: float = 0.0
    template: bytes = b""

    def size(self) -> int:
        return len(self.spool.pending())


def percentiles(samples: list[float]) -> dict[str, float]:
    """Milliseconds: p50, p95, min, max, mean, and the sample count."""
    s = sorted(samples)
    p95 = s[min(len(s) - 1, max(0, round(0.95 * len(s)) - 1))]
    return {"n": len(s), "p50_ms": round(statistics.median(s) * 1e3, 4),
            "p95_ms": round(p95 * 1e3, 4), "min_ms": round(s[0] * 1e3, 4),
            "max_ms": round(s[-1] * 1e3, 4), "mean_ms": round(statistics.fmean(s) * 1e3, 4)}


# -- the backlog -----------------------------------------------------------------------------
def publish(b: Backlog, count: int) -> None:
    from lrq.spool import SUFFIX

    t0 = time.perf_counter()
    name = ""
    for _ in range(count):
        name = b.spool.publish([{"doc_id": b.published + b.copied}])
        b.published += 1
    b.publish_seconds += time.perf_counter() - t0
    if name and not b.template:
        b.template = (b.spool.left / f"{name}{SUFFIX}").read_bytes()


def copy(b: Backlog, count: int) -> None:
    """``count`` more pending batches: the template's bytes under new names, no fsync."""
    from lrq.spool import SUFFIX

    t0 = time.perf_counter()
    for _ in range(count):
        fd = os.open(b.spool.left / f"{b.spool.new_name()}{SUFFIX}",
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b.template)
        finally:
            os.close(fd)
        b.copied += 1
    b.copy_seconds += time.perf_counter() - t0


def grow(b: Backlog, size: int, use_copies: bool) -> None:
    have = b.published + b.copied
    if size <= have:
        return
    if use_copies:
        copy(b, size - have)
    else:
        publish(b, size - have)


def publish_rate(b: Backlog, sample: int) -> float:
    """Seconds per real publish, over ``sample`` publishes (they stay in the backlog)."""
    publish(b, sample)
    return b.publish_seconds / b.published


# -- the measurements ------------------------------------------------------------------------
def timed(fn: Callable[[], Any], reps: int, budget: float) -> list[float]:
    """Up to ``reps`` timings of ``fn()``, stopping early after ``budget`` seconds."""
    out: list[float] = []
    deadline = time.monotonic() + budget
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
        if time.monotonic() > deadline:
            break
    return out


def release_all(spool: Spool) -> int:
    """Remove every claim in ``right/`` (they are ours): the backlog is whole again."""
    n = 0
    for e in os.scandir(spool.right):
        os.unlink(e.path)
        n += 1
    return n


def pick_phase(data: Path, key: bytes, claims: int, fresh: bool,
               budget: float) -> tuple[list[float], float]:
    """Times of ``claims`` picks (fresh Spool each, or one warm Spool); and the first one."""
    from lrq.spool import Spool

    warm = Spool(data, QUEUE, key=key)
    times: list[float] = []
    deadline = time.monotonic() + budget
    for _ in range(claims):
        spool = Spool(data, QUEUE, key=key) if fresh else warm
        t0 = time.perf_counter()
        claim = spool.pick("random")
        times.append(time.perf_counter() - t0)
        if claim is None:
            raise RuntimeError("pick found nothing pending; the backlog is smaller than claimed")
        if time.monotonic() > deadline:
            break
    release_all(warm)
    return times, times[0]


def done_backlog(tmp: str | None, done: int, claims: int) -> dict[str, Any]:
    """Fresh pick p50, has_pending and pending_stats with 60 pending and 0, then ``done``,
    kept done batches (see the module docstring)."""
    from lrq.spool import Spool

    out: dict[str, Any] = {"pending": 60, "done": done}
    with tempfile.TemporaryDirectory(prefix="lrq-bench-done-", dir=tmp) as d:
        data = Path(d) / "data"
        spool = Spool(data, QUEUE).ensure()
        for i in range(60):
            spool.publish([{"doc_id": i}])
        for label in ("none", "kept"):
            if label == "kept":
                for i in range(done):
                    name = f"20200101T000000{i:06d}-done{i:08d}"
                    if hasattr(spool, "done"):
                        (spool.done / f"{name}.pkl").write_bytes(b"x")
                    else:  # the previous layout: the file stays in left/, a marker in right/
                        (spool.left / f"{name}.pkl").write_bytes(b"x")
                        (spool.right / f"{name}.done").write_bytes(b"")
            fresh, _ = pick_phase(data, spool.key, min(claims, 50), fresh=True, budget=60.0)
            out[label] = {"fresh_pick": percentiles(fresh),
                          "has_pending": percentiles(timed(spool.has_pending, 5, 60.0)),
                          "pending_stats": percentiles(timed(spool.pending_stats, 5, 60.0))}
    return out


def measure(b: Backlog, claims: int, reps: int, budget: float) -> dict[str, Any]:
    spool = b.spool
    key = spool.key
    out: dict[str, Any] = {}
    out["pending"] = percentiles(timed(spool.pending, reps, budget))
    out["counts"] = percentiles(timed(spool.counts, reps, budget))
    fresh, _ = pick_phase(b.data, key, claims, fresh=True, budget=budget)
    out["fresh"] = percentiles(fresh)
    warm, first = pick_phase(b.data, key, claims, fresh=False, budget=budget)
    out["warm"] = percentiles(warm)
    out["warm"]["first_ms"] = round(first * 1e3, 4)
    out["warm"]["p50_after_first_ms"] = round(statistics.median(warm[1:]) * 1e3, 4) \
        if len(warm) > 1 else None
    return out


# -- driving ---------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=run.ints, default=[1000, 10_000, 100_000],
                   help="pending backlog sizes, ascending (default 1000,10000,100000)")
    p.add_argument("--claims", type=int, default=200, help="picks per phase (default 200)")
    p.add_argument("--reps", type=int, default=20,
                   help="timings of pending() and counts() per size (default 20)")
    p.add_argument("--sample", type=int, default=500,
                   help="real publishes timed to estimate publishing everything (default 500)")
    p.add_argument("--publish-budget", type=float, default=180.0,
                   help="seconds real publishing may take, else copies (default 180)")
    p.add_argument("--phase-budget", type=float, default=90.0,
                   help="seconds after which a phase stops early (default 90)")
    p.add_argument("--quick", action="store_true",
                   help="50 claims, 10 reps, sample 200, publish budget 20 s")
    p.add_argument("--tmp", help="folder for the temporary data dir (default: system tmp)")
    p.add_argument("--done", type=int, default=100_000,
                   help="kept done batches in the done-backlog case (default 100000; 0 skips)")
    a = p.parse_args(argv)
    if a.quick:
        a.claims, a.reps, a.sample = 50, 10, 200
        a.publish_budget = min(a.publish_budget, 20.0)
    a.sizes = sorted(set(a.sizes))
    if min([*a.sizes, a.claims, a.reps, a.sample]) < 1:
        p.error("sizes, --claims, --reps and --sample must be positive")
    if a.claims > a.sizes[0]:
        p.error(f"--claims {a.claims} is more than the smallest backlog {a.sizes[0]}: each "
                "phase claims that many pending batches")
    if a.sample > a.sizes[0]:
        a.sample = a.sizes[0]
    return a


def main(argv: list[str] | None = None) -> int:
    from lrq.spool import SUFFIX, Spool

    a = parse_args(argv)
    stamp, report = run.new_report("benchmark", NAME, {
        "sizes": a.sizes, "claims": a.claims, "reps": a.reps, "sample": a.sample,
        "publish_budget": a.publish_budget, "tmp": a.tmp or tempfile.gettempdir()})
    print(f"claim cost: sizes {a.sizes}, {a.claims} claims per phase, "
          f"tmp {report['settings']['tmp']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="lrq-bench-claim-", dir=a.tmp) as d:
        data = Path(d) / "data"
        b = Backlog(data=data, spool=Spool(data, QUEUE).ensure())
        per_publish = publish_rate(b, a.sample)
        estimate = per_publish * a.sizes[-1]
        use_copies = estimate > a.publish_budget
        gen = {"sample_publishes": b.published, "publish_ms": round(per_publish * 1e3, 3),
               "estimated_publish_all_seconds": round(estimate, 1),
               "method": "copies" if use_copies else "publish"}
        print(f"  {b.published} publishes: {per_publish * 1e3:.2f} ms each; all "
              f"{a.sizes[-1]:,} would take ~{estimate:.0f}s -> "
              f"{'copying the rest' if use_copies else 'publishing all'}", flush=True)
        for size in a.sizes:
            grow(b, size, use_copies)
            if b.copied and "copy_load_check" not in gen:
                # A copy must pass the same signature check as a publish.
                copied = sorted(b.spool.pending())[-1]
                b.spool.load(copied)
                gen["copy_load_check"] = f"loaded {copied}{SUFFIX}: signature valid"
            have = b.size()
            if have != size:
                raise RuntimeError(f"backlog has {have} pending batches, expected {size}")
            t0 = time.perf_counter()
            row = {"size": size, **measure(b, a.claims, a.reps, a.phase_budget)}
            row["measure_seconds"] = round(time.perf_counter() - t0, 2)
            report["results"].append(row)
            print(f"  {size:>7,} pending: pending() p50 {row['pending']['p50_ms']:.2f} ms, "
                  f"fresh pick p50 {row['fresh']['p50_ms']:.2f} ms, warm pick p50 "
                  f"{row['warm']['p50_ms']:.3f} ms ({row['measure_seconds']}s)", flush=True)
        gen.update({"published": b.published, "publish_seconds": round(b.publish_seconds, 2),
                    "copied": b.copied, "copy_seconds": round(b.copy_seconds, 2)})
        if b.copied:
            gen["copy_ms"] = round(b.copy_seconds / b.copied * 1e3, 4)
        report["generation"] = gen
    if a.done:
        db = report["done_backlog"] = done_backlog(a.tmp, a.done, a.claims)
        print(f"  60 pending, 0 / {a.done:,} done: fresh pick p50 "
              f"{db['none']['fresh_pick']['p50_ms']:.3f} / {db['kept']['fresh_pick']['p50_ms']:.3f} ms, "
              f"has_pending {db['none']['has_pending']['p50_ms']:.2f} / "
              f"{db['kept']['has_pending']['p50_ms']:.2f} ms", flush=True)
    lo, hi = report["results"][0], report["results"][-1]
    report["ratios"] = {
        "sizes": [lo["size"], hi["size"]], "target": TARGET,
        **{f"{k}_p50": round(hi[k]["p50_ms"] / lo[k]["p50_ms"], 2)
           for k in ("pending", "counts", "fresh", "warm")}}
    run.write_report(report, stamp, NAME, table(report))
    return 0


def table(report: dict[str, Any]) -> str:
    g = report["generation"]
    rows: list[tuple[str, ...]] = [("pending", "what", "p50 ms", "p95 ms", "min ms", "max ms",
                                    "mean ms", "n")]
    labels = {"pending": "pending()", "counts": "counts()", "fresh": "pick, fresh Spool",
              "warm": "pick, warm Spool"}
    for r in report["results"]:
        for k, label in labels.items():
            v = r[k]
            rows.append((f"{r['size']:,}" if k == "pending" else "", label,
                         *(f"{v[f]:.3f}" for f in ("p50_ms", "p95_ms", "min_ms", "max_ms",
                                                   "mean_ms")), str(v["n"])))
    q = report["ratios"]
    lines = [f"claim cost against backlog ({report['settings']['claims']} claims per phase; "
             f"backlog by {g['method']}: {g['published']:,} publishes at {g['publish_ms']} ms"
             + (f", {g['copied']:,} copies at {g['copy_ms']} ms" if g.get("copied") else "")
             + ")", *run._columns(rows, right={0, 2, 3, 4, 5, 6, 7}), "",
             "warm Spool, first pick / p50 of the rest:"]
    lines += [f"  {r['size']:>7,}: {r['warm']['first_ms']:.2f} ms / "
              f"{r['warm']['p50_after_first_ms']:.3f} ms" for r in report["results"]]
    lines += ["", f"p50 at {q['sizes'][1]:,} / p50 at {q['sizes'][0]:,} pending "
              f"(target <= {q['target']:g} for a claim):"]
    lines += [f"  {labels[k]:18s} {q[f'{k}_p50']:8.2f}"
              for k in ("pending", "counts", "fresh", "warm")]
    if "done_backlog" in report:
        db = report["done_backlog"]
        lines += ["", f"60 pending, p50 ms with 0 / {db['done']:,} kept done batches:"]
        lines += [f"  {k:18s} {db['none'][k]['p50_ms']:8.3f} {db['kept'][k]['p50_ms']:10.3f}"
                  for k in ("fresh_pick", "has_pending", "pending_stats")]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
