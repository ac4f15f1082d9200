"""Run every benchmark of the Benchmarks issue, one after another, and check its targets.

The parts are the standalone scripts, each run here as a subprocess with the same
interpreter, so their own checks, exit codes, printed tables and JSON files are exactly
what they are when run alone:

``w1``     ``bench/run.py``         W1 docs-to-db: lrq against a multiprocessing pool of 2
``w2``     ``bench/w2_service.py``  W2 model service: lrq against the service's ceiling
``claim``  ``bench/claim_cost.py``  claim cost against 1k, 10k, 100k pending batches
``idle``   ``bench/idle_cpu.py``    CPU of an idle ``lrq run`` scheduler
``poison`` ``bench/poison.py``      W1 with 1% poison items against the same run without
``peer``   ``bench/peer_huey.py``   W1 on lrq against Huey with SQLite storage, batch 100 and 1000
``scrape`` ``bench/metrics_scrape.py`` a ``/metrics`` scrape with 10k (and 100k) done batches kept

A part fails when it exits non-zero, runs past its time limit (its process group gets
SIGTERM, then SIGKILL), writes no JSON, or its JSON lacks a figure the summary reads; the
other parts still run, and the run exits 1 naming the failed parts. A missed target is a
result, not a failure. A part whose optional dependency is missing (``peer`` needs Huey,
the ``bench`` extra that ``make bench`` installs) is skipped with a line saying so, and its
summary row reads "skipped".

At the end one table gives, for each target, the figure read from the part's JSON, the
target and whether it is met. That table, every part's command, exit code, time and JSON
path go to ``bench/results/<timestamp>-all.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import operator
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import IO, Any

import run  # bench/run.py (first on sys.path): timestamps, machine info, tables
from run import BENCH, RESULTS, ROOT

NAME = "all"

# The targets, from the Benchmarks issue.
W1_TARGET = 0.7      # lrq items/s over the pool's, at batch 1000 (issue 12; was 0.8)
W1_DEFAULTS_TARGET = 0.9  # lrq on its defaults over lrq with max_pending unlimited, batch 1000
LEDGER_TARGET = 0.9  # share of the measured CPU the CPU ledger's steps account for
W1_TARGET_BATCH = 1000
W2_TARGET = 0.9      # lrq items/s over the service's ceiling
CLAIM_TARGET = 2.0   # claim p50 at the largest backlog over p50 at the smallest
IDLE_TARGET = 1.0    # % of one core, strictly under
POISON_TARGET = 0.5  # W1 with 1% poison, items/s over the same run without
PEER_TARGET = 1.0    # lrq items/s over Huey's (SQLite storage), at batch 100 (issue 12)
PEER_TARGET_BATCH = 100
SCRAPE_TARGET = 50.0  # ms, p50 of a /metrics scrape with 10k done batches kept (issue 14)
SCRAPE_TARGET_DONE = 10_000

QUIET_SECONDS = 60   # a part silent this long gets a "still running" line
OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, "<": operator.lt}

EXAMPLES = """\
examples:
  python bench/all.py                   full: W1 100k,1M x batch 100,1000; W2; claim; idle 60 s;
                                        poison; peer (lrq vs Huey, 100k x batch 100,1000)
  python bench/all.py --quick           every part's --quick (~2-5 min)
  python bench/all.py --only w1,idle    some parts only (always run in the order of PARTS)
  python bench/all.py --repeat 3        W1 and W2: 3 runs per configuration, median
"""


@dataclass(frozen=True)
class Row:
    """One target in the summary: a figure read from a part's JSON against its target."""

    part: str
    figure: str
    measured: float | None  # None: the part failed or was skipped
    op: str  # "": a figure shown without a target
    target: float
    detail: str = ""
    skipped: bool = False

    @property
    def met(self) -> bool | None:
        if self.measured is None or not self.op:
            return None
        return OPS[self.op](self.measured, self.target)

    @property
    def verdict(self) -> str:
        if self.skipped:
            return "skipped"
        if self.measured is not None and not self.op:
            return "no target"
        return {True: "met", False: "not met", None: "failed"}[self.met]


@dataclass(frozen=True)
class Part:
    """A benchmark script, its full-mode arguments and how its JSON becomes summary rows."""

    key: str
    label: str  # the summary's part column
    title: str
    script: str
    full: tuple[str, ...]
    timeouts: tuple[float, float]  # seconds: --quick, full
    figures: Callable[[dict[str, Any]], list[Row]]
    takes_repeat: bool = False
    #: A module the part needs that is an optional dependency: without it, it is skipped.
    needs: str | None = None
    #: The extra that installs it.
    extra: str = "bench"

    def argv(self, quick: bool, repeat: int) -> list[str]:
        if quick:
            return ["--quick"]
        return [*self.full, *(["--repeat", str(repeat)] if self.takes_repeat else [])]


@dataclass
class Outcome:
    """How one part's run went."""

    part: str
    script: str
    argv: list[str]
    exit_code: int | None = None  # None: stopped at its time limit
    seconds: float = 0.0
    json: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


# -- reading the parts' JSON -----------------------------------------------------------------
def _n(n: int) -> str:
    """1000 -> 1k, 1000000 -> 1M."""
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def w1_figures(r: dict[str, Any]) -> list[Row]:
    """``ratios[]`` (docs, batch, lrq/pool) at batch 1000, items/s from ``results[]``."""
    rate = {(x["docs"], x["batch"], x["method"]): x["items_per_s"] for x in r["results"]}
    rows = [Row("W1", f"N={_n(q['docs'])} B={q['batch']} lrq/pool items/s", q["lrq/pool"],
                ">=", W1_TARGET, f"lrq {rate[q['docs'], q['batch'], 'lrq']:,.0f}/s, pool "
                f"{rate[q['docs'], q['batch'], 'pool']:,.0f}/s")
            for q in r["ratios"] if q["batch"] == W1_TARGET_BATCH]
    rows += [Row("W1", f"N={_n(q['docs'])} B={q['batch']} lrq/lrq-unlimited items/s",
                 q["lrq/lrq-unlimited"], ">=", W1_DEFAULTS_TARGET,
                 f"max_pending default vs unlimited: lrq {rate[q['docs'], q['batch'], 'lrq']:,.0f}"
                 f"/s, unlimited {rate[q['docs'], q['batch'], 'lrq-unlimited']:,.0f}/s")
             for q in r["ratios"]
             if q["batch"] == W1_TARGET_BATCH and "lrq/lrq-unlimited" in q]
    if not rows:
        raise KeyError(f"no lrq/pool ratio at batch {W1_TARGET_BATCH}")
    return rows


def w2_figures(r: dict[str, Any]) -> list[Row]:
    """``results[].lrq.of_ceiling``: launch-to-exit items/s over the ceiling, per W and C."""
    rows = []
    for x in r["results"]:
        lrq = x["lrq"]
        window = (f"; steady window {lrq['window_of_ceiling']:.2f}"
                  if "window_of_ceiling" in lrq else "")
        rows.append(Row("W2", f"N={_n(x['docs'])} W={x['workers']} C={x['chunk']} "
                        "lrq/ceiling items/s", lrq["of_ceiling"], ">=", W2_TARGET,
                        f"lrq {lrq['items_per_s']:,.0f}/s, ceiling "
                        f"{x['ceiling_items_per_s']:,.0f}/s{window}"))
    if not rows:
        raise KeyError("no results")
    return rows


def claim_figures(r: dict[str, Any]) -> list[Row]:
    """``results[first/last].{warm,fresh}.p50_ms``: a long-running worker's claim (warm
    ``Spool``) and a new worker process's first claim (fresh ``Spool``)."""
    lo, hi = r["results"][0], r["results"][-1]
    return [Row("claim", f"p50 {_n(hi['size'])}/{_n(lo['size'])} pending, {label}",
                round(hi[k]["p50_ms"] / lo[k]["p50_ms"], 2), "<=", CLAIM_TARGET,
                f"{hi[k]['p50_ms']:.3f} ms at {_n(hi['size'])}, {lo[k]['p50_ms']:.3f} ms at "
                f"{_n(lo['size'])}")
            for k, label in (("warm", "pick, warm Spool"), ("fresh", "pick, fresh Spool"))]


def scrape_figures(r: dict[str, Any]) -> list[Row]:
    """``results[].p50_ms`` per number of done batches; the target at 10k only."""
    rows = [Row("scrape", f"/metrics p50 ms, {_n(x['done_batches'])} done batches",
                x["p50_ms"], "<" if x["done_batches"] == SCRAPE_TARGET_DONE else "",
                SCRAPE_TARGET if x["done_batches"] == SCRAPE_TARGET_DONE else 0.0,
                f"p90 {x['p90_ms']:.1f} ms, {x['scrapes']} scrapes")
            for x in r["results"]]
    if not rows:
        raise KeyError("no results")
    return rows


def idle_figures(r: dict[str, Any]) -> list[Row]:
    """``results[].lrq_pct_core`` per case (DOCS:BATCH, done batches kept)."""
    rows = [Row("idle", f"{x['docs']}:{x['batch']}{' --http' if x.get('http') else ''} "
                f"({x['done_batches']:,} done) % of a core",
                x["lrq_pct_core"], "<", IDLE_TARGET,
                f"{x['window_seconds']:.0f} s window, sleep baseline "
                f"{x['baseline_pct_core']:.2f}%") for x in r["results"]]
    if not rows:
        raise KeyError("no results")
    return rows


def poison_figures(r: dict[str, Any]) -> list[Row]:
    """``ratio``: poison items/s over clean items/s, from ``results[]``."""
    rate = {x["kind"]: x["items_per_s"] for x in r["results"]}
    return [Row("poison", f"N={_n(r['settings']['docs'])} B=200 C=50 1% poison/clean items/s",
                r["ratio"], ">=", POISON_TARGET,
                f"poison {rate['poison']:,.0f}/s, clean {rate['clean']:,.0f}/s")]


def peer_figures(r: dict[str, Any]) -> list[Row]:
    """``ratios[].lrq/huey`` per batch: lrq over the faster Huey (``ratios[].huey`` names
    its worker type; items/s from ``results[]``); the target is at batch 100, the batch 1000
    row is shown without one."""
    rate = {(x["batch"], x["system"]): x["items_per_s"] for x in r["results"]}
    rows = [Row("peer", f"N={_n(q['docs'])} B={q['batch']} lrq/huey items/s", q["lrq/huey"],
                *((">=", PEER_TARGET) if q["batch"] == PEER_TARGET_BATCH else ("", 0.0)),
                f"lrq {rate[q['batch'], 'lrq']:,.0f}/s, {q['huey']} "
                f"{rate[q['batch'], q['huey']]:,.0f}/s")
            for q in r["ratios"]]
    if not any(q["batch"] == PEER_TARGET_BATCH for q in r["ratios"]):
        raise KeyError(f"no lrq/huey ratio at batch {PEER_TARGET_BATCH}")
    return rows


def ledger_figures(r: dict[str, Any]) -> list[Row]:
    """``results[].phases.<phase>.accounted``: the share of each phase's measured CPU its
    steps account for, per batch size (CPU per batch beside it)."""
    rows = [Row("ledger", f"B={x['batch']} {phase} CPU accounted", round(p["accounted"], 3),
                ">=", LEDGER_TARGET, f"{p['total_us_per_batch']:,.0f} µs of CPU per batch")
            for x in r["results"] for phase, p in x["phases"].items()]
    if not rows:
        raise KeyError("no results")
    return rows


PARTS = (
    Part("w1", "W1", "W1 docs-to-db", "run.py",
         ("--docs", "100000,1000000", "--batch", "100,1000"),
         (900, 7200), w1_figures, takes_repeat=True),
    Part("w2", "W2", "W2 model service", "w2_service.py", (), (600, 1800), w2_figures,
         takes_repeat=True),
    Part("claim", "claim", "claim cost against backlog", "claim_cost.py", (), (600, 1800),
         claim_figures),
    Part("idle", "idle", "idle cost", "idle_cpu.py", (), (600, 1800), idle_figures),
    Part("poison", "poison", "W1 with 1% poison", "poison.py", (), (600, 1800),
         poison_figures, takes_repeat=True),
    # Its own --repeat (3 by default: its runs are seconds long), not all.py's.
    Part("ledger", "ledger", "CPU ledger by step", "cpu_ledger.py", (), (300, 900),
         ledger_figures),
    Part("peer", "peer", "W1 against Huey (SQLite)", "peer_huey.py", (), (600, 1800),
         peer_figures, needs="huey"),
    Part("scrape", "scrape", "/metrics scrape with done batches kept", "metrics_scrape.py", (),
         (300, 900), scrape_figures, needs="prometheus_client", extra="web"),
)


# -- running a part --------------------------------------------------------------------------
_say_lock = threading.Lock()


def say(text: str, stream: IO[str] | None = None) -> None:
    with _say_lock:
        print(text, file=stream or sys.stdout, flush=True)


def _signal_group(proc: subprocess.Popen[str], sig: int, grace: float) -> None:
    """Send ``sig`` to the part's process group (its own session); SIGKILL after ``grace``."""
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=grace)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def run_part(part: Part, argv: list[str], timeout: float) -> Outcome:
    """Run one script, echo its output as it comes, and find the JSON it wrote from its
    closing ``wrote bench/results/....json`` line."""
    out = Outcome(part=part.key, script=f"bench/{part.script}", argv=argv)
    proc = subprocess.Popen([sys.executable, str(BENCH / part.script), *argv], cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace",
                            start_new_session=True)  # a group to stop, lrq children included
    t0 = time.monotonic()
    last = [t0]
    wrote: list[str] = []
    errors: deque[str] = deque(maxlen=3)

    def pump(stream: IO[str], sink: IO[str], is_stdout: bool) -> None:
        for line in stream:
            line = line.rstrip("\n")
            last[0] = time.monotonic()
            if is_stdout and line.startswith("wrote ") and line.endswith(".json"):
                wrote.append(line[len("wrote "):])
            elif not is_stdout and line.strip():
                errors.append(line.strip())
            say(line, sink)

    pumps = [threading.Thread(target=pump, args=(proc.stdout, sys.stdout, True), daemon=True),
             threading.Thread(target=pump, args=(proc.stderr, sys.stderr, False), daemon=True)]
    for t in pumps:
        t.start()
    try:
        while True:
            try:
                out.exit_code = proc.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if now - t0 > timeout:
                say(f"[all] {part.key}: past its {timeout:.0f} s limit; stopping it")
                _signal_group(proc, signal.SIGTERM, grace=45)
                out.error = f"stopped after its {timeout:.0f} s limit"
                break
            if now - last[0] >= QUIET_SECONDS:
                say(f"[all] {part.key}: still running, {now - t0:.0f} s so far")
                last[0] = now
    except KeyboardInterrupt:
        _signal_group(proc, signal.SIGINT, grace=30)
        raise
    for t in pumps:
        t.join(timeout=10)
    out.seconds = round(time.monotonic() - t0, 1)
    if out.error is None and out.exit_code != 0:
        out.error = f"exit {out.exit_code}" + (f": {errors[-1]}" if errors else "")
    elif out.error is None and not wrote:
        out.error = "exit 0 but no 'wrote ....json' line"
    if wrote:
        out.json = wrote[-1]
    return out


def figures(part: Part, out: Outcome) -> list[Row]:
    """The part's summary rows from its JSON; on a failure, one row saying so."""
    if out.ok and out.json:
        try:
            return part.figures(json.loads((ROOT / out.json).read_text()))
        except (OSError, ValueError, LookupError, TypeError, ZeroDivisionError) as e:
            out.error = f"cannot read the figures from {out.json}: {type(e).__name__}: {e}"
    return [Row(part.label, part.title, None, "", 0.0, out.error or "")]


# -- the summary -----------------------------------------------------------------------------
def table(rows: list[Row], quick: bool) -> str:
    cells = [("part", "figure", "measured", "target", "verdict", "detail")]
    for r in rows:
        cells.append((r.part, r.figure, "-" if r.measured is None else f"{r.measured:.2f}",
                      f"{r.op} {r.target:.2f}" if r.op else "-", r.verdict, r.detail))
    head = ("summary: targets of the Benchmarks issue"
            + (" (--quick: smaller runs and 15 s idle windows; indicative only)" if quick
               else ""))
    return "\n".join([head, *run._columns(cells, right={2})])


def _keys(text: str) -> list[str]:
    return [k.strip() for k in text.split(",") if k.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    keys = [p.key for p in PARTS]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="run every part with its --quick")
    p.add_argument("--only", type=_keys, default=keys, metavar="PARTS",
                   help=f"comma list of parts to run, of {','.join(keys)} (default all)")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="W1 and W2: runs per configuration, median reported (default 1; "
                        "their --quick runs once)")
    a = p.parse_args(argv)
    unknown = [k for k in a.only if k not in keys]
    if unknown or not a.only:
        p.exit(2, f"{p.prog}: error: --only: unknown part {', '.join(unknown) or '(none)'} "
                  f"(choose from {', '.join(keys)})\n")
    if a.repeat < 1:
        p.exit(2, f"{p.prog}: error: --repeat must be positive\n")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = run._stamp()
    parts = [p for p in PARTS if p.key in a.only]
    mode = "quick" if a.quick else "full"
    say(f"lrq benchmarks, {mode} mode: {', '.join(p.key for p in parts)}")
    t0 = time.monotonic()
    outcomes: list[Outcome] = []
    rows: list[Row] = []
    try:
        for i, part in enumerate(parts, 1):
            argv_ = part.argv(a.quick, a.repeat)
            timeout = part.timeouts[0 if a.quick else 1]
            if part.needs and importlib.util.find_spec(part.needs) is None:
                why = (f"{part.needs} is not installed (the {part.extra} extra: "
                       f"`pip install -e '.[{part.extra}]'`"
                       + (", or `make bench`)" if part.extra == "bench" else ")"))
                say(f"\n== [{i}/{len(parts)}] {part.key}: {part.title}: skipped: {why}")
                rows.append(Row(part.label, part.title, None, "", 0.0, why, skipped=True))
                continue
            clock = datetime.now(UTC).strftime("%H:%M:%S")
            say(f"\n== [{i}/{len(parts)}] {part.key}: {part.title}: "
                f"python bench/{part.script} {' '.join(argv_)}".rstrip()
                + f"  (started {clock} UTC, limit {timeout:.0f} s)")
            out = run_part(part, argv_, timeout)
            rows += figures(part, out)
            outcomes.append(out)
            say(f"== [{i}/{len(parts)}] {part.key}: "
                + (f"done in {out.seconds:.0f} s, {out.json}" if out.ok
                   else f"FAILED after {out.seconds:.0f} s: {out.error}"))
    except KeyboardInterrupt:
        say("\n[all] interrupted; no summary written", sys.stderr)
        return 130
    failed = [o.part for o in outcomes if not o.ok]
    report: dict[str, Any] = {
        "benchmark": NAME, "timestamp": stamp, "argv": sys.argv, "mode": mode,
        "machine": run.machine(), "seconds": round(time.monotonic() - t0, 1),
        "summary": [{**asdict(r), "met": r.met, "verdict": r.verdict} for r in rows],
        "parts": [{**asdict(o), "ok": o.ok} for o in outcomes],
        "failed": failed,
    }
    out_path = RESULTS / f"{stamp}-{NAME}.json"
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    say("")
    say(table(rows, a.quick))
    say(f"\n{len(parts)} parts in {report['seconds']:.0f} s; "
        + (f"FAILED: {', '.join(failed)}" if failed else "all ran")
        + f"; wrote {out_path.relative_to(ROOT)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
