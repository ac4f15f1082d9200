"""16 processes race to claim the same batch, 500 rounds: exactly one winner each round."""
from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

from lrq.spool import Spool

PROCS, ROUNDS = 16, 500


def racer(data: str, names: list[str], barrier, results) -> None:
    sp = Spool(Path(data), "q")
    won = []
    for i, name in enumerate(names):
        barrier.wait(timeout=60)  # everyone starts the round together
        if sp.claim(name) is not None:
            won.append(i)
    results.put((os.getpid(), won))


def test_exactly_one_winner_per_round(tmp_path: Path) -> None:
    sp = Spool(tmp_path, "q").ensure()
    names = [sp.publish([{"round": i}]) for i in range(ROUNDS)]
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(PROCS), ctx.Queue()
    procs = [ctx.Process(target=racer, args=(str(tmp_path), names, barrier, results))
             for _ in range(PROCS)]
    for p in procs:
        p.start()
    outcome = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    winners: dict[int, list[int]] = {}
    for pid, won in outcome:
        for i in won:
            winners.setdefault(i, []).append(pid)
    assert sorted(winners) == list(range(ROUNDS))
    assert all(len(w) == 1 for w in winners.values()), {i: w for i, w in winners.items() if len(w) > 1}
    for i, (pid,) in winners.items():
        assert sp.read_claim(names[i]).pid == pid  # the claim names its one owner
    assert len({pid for pid, won in outcome if won}) > 1  # it really was a race
