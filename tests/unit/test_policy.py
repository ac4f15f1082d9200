"""The handler policy alone: plain function handlers, a fake clock and sleep, no spool, no DB.

Each test asserts the calls made (their sizes) and the sleeps requested."""
from __future__ import annotations

from typing import Any

import pytest
import requests

from lrq.config import QueueConfig, SourceConfig
from lrq.errors import HandlerBroken, HandlerTimeout, Retryable
from lrq.policy import HandlerPolicy, backoff_wait, overrun_after

Items = list[dict[str, Any]]


def items(n: int) -> Items:
    return [{"doc_id": f"d{i}", "n": i} for i in range(n)]


def echo(chunk: Items) -> Items:
    return [{"doc_id": it["doc_id"], "n": it["n"]} for it in chunk]


class Fake:
    """A handler made of a rule, recording every call's keys; a clock; a sleep recorder."""

    def __init__(self, rule: Any = None) -> None:
        self.rule = rule or (lambda it: None)
        self.calls: list[list[str]] = []
        self.sleeps: list[float] = []
        self.now = 0.0

    def handler(self, chunk: Items) -> Items:
        self.calls.append([it["doc_id"] for it in chunk])
        for it in chunk:
            self.rule(it)
        return echo(chunk)

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now

    @property
    def sizes(self) -> list[int]:
        return [len(c) for c in self.calls]


def policy(fake: Fake, **kw: Any) -> HandlerPolicy:
    q = QueueConfig(name="docs", handler="tests:fake", source=SourceConfig(), key="doc_id",
                    **{"chunk_size": 50, "retries": 2, "backoff": 0.5, **kw})
    return HandlerPolicy(q, fake.handler, sleep=fake.sleep, clock=fake.clock)


def raise_for(keys: set[str], exc: Any = None) -> Any:
    def rule(it: dict[str, Any]) -> None:
        if it["doc_id"] in keys:
            raise (exc(it) if exc else ValueError(f"cannot map {it['doc_id']}"))
    return rule


# -- item errors: split at once, never sleep ------------------------------------------------
def test_poison_items_are_split_out_at_once_without_sleeping() -> None:
    bad = {f"d{i}" for i in range(7, 200, 100)} | {"d140"}  # 3 of 200, in 3 of 4 chunks
    fake = Fake(raise_for(bad))
    results, dead = policy(fake).run(items(200))
    assert {d[0]["doc_id"] for d in dead} == bad
    assert sorted(r["doc_id"] for r in results) == sorted(f"d{i}" for i in range(200)
                                                          if f"d{i}" not in bad)
    assert fake.sleeps == []
    # 4 chunk calls; per bad item: 2 calls per level of a 50-chunk (6 levels), then 3 tries.
    assert len(fake.calls) <= 4 + len(bad) * (2 * 6 + 3)
    assert all("ValueError: cannot map" in error for _, error in dead)


def test_a_lone_bad_item_gets_one_plus_retries_immediate_tries() -> None:
    fake = Fake(raise_for({"d2"}))
    _, dead = policy(fake, chunk_size=4).run(items(4))
    # chunk once; both halves; d2 and d3 alone; d2 twice more (retries = 2).
    assert fake.sizes == [4, 2, 2, 1, 1, 1, 1]
    assert [c for c in fake.calls if c == ["d2"]] == [["d2"]] * 3
    assert [d[0]["doc_id"] for d in dead] == ["d2"] and fake.sleeps == []


def test_a_flaky_lone_item_is_not_dead_lettered() -> None:
    failed: list[str] = []

    def once(it: dict[str, Any]) -> None:
        if it["doc_id"] == "d1" and len(failed) < 2:
            failed.append("x")
            raise ValueError("flaky")

    fake = Fake(once)
    results, dead = policy(fake, chunk_size=1).run(items(3))
    assert dead == [] and len(results) == 3 and fake.sleeps == []


# -- transient: back off, then raise ---------------------------------------------------------
@pytest.mark.parametrize("error", [Retryable("overloaded"),
                                   requests.ConnectionError("refused")])
def test_transient_errors_back_off_then_propagate(error: Exception) -> None:
    def down(it: dict[str, Any]) -> None:
        raise error

    fake = Fake(down)
    with pytest.raises(type(error)):
        policy(fake).run(items(10))
    # the chunk with its waits, then both halves once: nothing answered, the service is down
    assert fake.sizes == [10, 10, 10, 5, 5]
    assert fake.sleeps == [0.5, 1.0]


@pytest.mark.parametrize("error", [Retryable("503 for this input"),
                                   requests.ConnectionError("reset")])
def test_one_item_that_always_fails_transiently_is_isolated_and_dead_lettered(
        error: Exception) -> None:
    def poison(it: dict[str, Any]) -> None:
        if it["doc_id"] == "d7":
            raise error

    fake = Fake(poison)
    results, dead = policy(fake).run(items(100))
    assert [d[0]["doc_id"] for d in dead] == ["d7"]
    assert type(error).__name__ in dead[0][1]
    assert len(results) == 99
    assert fake.sleeps == [0.5, 1.0]  # the first chunk's waits only: parts get one try
    assert len(fake.calls) <= 2 + 3 + 2 * 6


def test_a_service_going_down_mid_batch_raises_instead_of_dead_lettering() -> None:
    down: list[int] = []

    def rule(it: dict[str, Any]) -> None:
        if it["doc_id"] == "d50" or down:
            down.append(1)
            raise Retryable("503")

    fake = Fake(rule)
    with pytest.raises(Retryable):
        policy(fake).run(items(100))  # chunk 1 went in; from chunk 2 on, nothing answers
    assert len(fake.calls) <= 1 + 3 + 2 * 6 + 1


def test_a_transient_blip_costs_one_wait_and_nothing_else() -> None:
    blips: list[int] = []

    def blip(it: dict[str, Any]) -> None:
        if not blips:
            blips.append(1)
            raise Retryable("503")

    fake = Fake(blip)
    results, dead = policy(fake).run(items(10))
    assert len(results) == 10 and dead == []
    assert fake.sizes == [10, 10] and fake.sleeps == [0.5]


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff_wait(0.5, n) for n in range(3)] == [0.5, 1.0, 2.0]
    assert backoff_wait(10, 10) == 60.0


# -- timeouts: transient first, then isolate ---------------------------------------------------
def timeout_for(keys: set[str]) -> Any:
    return raise_for(keys, lambda it: HandlerTimeout("handler call ran past handler_timeout"))


def test_a_hanging_item_is_retried_with_backoff_as_a_chunk_then_isolated() -> None:
    fake = Fake(timeout_for({"d5"}))
    results, dead = policy(fake, chunk_size=8).run(items(8))
    assert [d[0]["doc_id"] for d in dead] == ["d5"] and "HandlerTimeout" in dead[0][1]
    assert len(results) == 7
    assert fake.sizes[:3] == [8, 8, 8] and fake.sleeps == [0.5, 1.0]  # only the chunk waits
    # Then halves, quarters, pairs: one try each, the lone hanging item once.
    assert fake.sizes[3:] == [4, 4, 2, 2, 1, 1]


def test_a_hung_service_is_broken_after_six_calls() -> None:
    fake = Fake(timeout_for({f"d{i}" for i in range(200)}))
    with pytest.raises(HandlerBroken, match="ran past handler_timeout") as e:
        policy(fake).run(items(200))
    # The chunk 3 times (backoff 0.5, 1), both halves, one probe elsewhere (the last item).
    assert fake.sizes == [50, 50, 50, 25, 25, 1] and fake.calls[-1] == ["d199"]
    assert fake.sleeps == [0.5, 1.0]
    assert "HandlerTimeout" in e.value.detail


def test_two_hanging_items_in_separate_halves_are_not_a_hung_service() -> None:
    fake = Fake(timeout_for({"d3", "d30"}))
    results, dead = policy(fake).run(items(100))
    assert sorted(d[0]["doc_id"] for d in dead) == ["d3", "d30"] and len(results) == 98


# -- broken handler --------------------------------------------------------------------------
def test_a_handler_failing_on_everything_is_broken_fast_and_dead_letters_nothing() -> None:
    def boom(it: dict[str, Any]) -> None:
        raise KeyError("content")

    fake = Fake(boom)
    with pytest.raises(HandlerBroken, match="KeyError: 'content'") as e:
        policy(fake).run(items(1000))
    assert len(fake.calls) <= 2 * 6 + 4 * 3 and fake.sleeps == []
    assert e.value.handler == "tests:fake" and "Traceback" in e.value.detail


def test_a_handler_that_breaks_mid_batch_is_broken() -> None:
    seen: list[str] = []

    def breaks(it: dict[str, Any]) -> None:
        seen.append(it["doc_id"])
        if len(seen) > 120:
            raise RuntimeError("token expired")

    fake = Fake(breaks)
    with pytest.raises(HandlerBroken, match="token expired"):
        policy(fake).run(items(1000))
    assert len(fake.calls) < 40


def test_three_poison_items_side_by_side_are_not_a_broken_handler() -> None:
    fake = Fake(raise_for({"d10", "d11", "d12"}, lambda it: ValueError("poison")))
    results, dead = policy(fake).run(items(100))
    assert sorted(d[0]["doc_id"] for d in dead) == ["d10", "d11", "d12"]
    assert len(results) == 97 and fake.sleeps == []


def test_wrong_results_for_every_item_are_a_broken_handler() -> None:
    def wrong_key(chunk: Items) -> Items:
        return [{"id": it["doc_id"]} for it in chunk]

    fake = Fake()
    p = policy(fake)
    p.handler = wrong_key
    with pytest.raises(HandlerBroken, match="HandlerError"):
        p.run(items(200))


# -- the result check and items the handler changes ---------------------------------------------
def test_a_handler_that_pops_the_key_neither_breaks_the_check_nor_the_dead_letter() -> None:
    def popper(chunk: Items) -> Items:
        out = []
        for it in chunk:
            key = it.pop("doc_id")
            it["seen"] = True
            if key == "d3":
                raise ValueError("bad d3")
            out.append({"doc_id": key})
        return out

    originals = items(10)
    fake = Fake()
    p = policy(fake, chunk_size=5)
    p.handler = popper
    results, dead = p.run(originals)
    assert sorted(r["doc_id"] for r in results) == sorted(f"d{i}" for i in range(10) if i != 3)
    assert dead[0][0] == {"doc_id": "d3", "n": 3}  # the original item, unchanged
    assert originals == items(10)


def test_results_in_any_order_are_accepted_and_duplicates_refused() -> None:
    fake = Fake()
    p = policy(fake)
    assert p.check(["a", "b"], [{"doc_id": "b"}, {"doc_id": "a"}])
    p.handler = lambda chunk: echo(chunk)[::-1]
    results, dead = p.run(items(10))
    assert len(results) == 10 and dead == []
    p.handler = lambda chunk: [{"doc_id": "d0"}] * len(chunk)
    _, dead = p.run(items(3))
    assert [d[0]["doc_id"] for d in dead] == ["d1", "d2"]


# -- the watchdog ------------------------------------------------------------------------------
def test_overrun_is_reported_only_while_a_call_runs_past_its_deadline() -> None:
    fake = Fake()
    p = policy(fake, handler_timeout=30.0)
    seen: list[str | None] = []

    def swallower(chunk: Items) -> Items:
        seen.append(p.overrun())
        fake.now += overrun_after(30.0) - 1
        seen.append(p.overrun())
        fake.now += 2  # what a handler that caught HandlerTimeout and went on looks like
        seen.append(p.overrun())
        return echo(chunk)

    p.handler = swallower
    p.run(items(2))
    assert seen[:2] == [None, None] and "past handler_timeout (30s)" in (seen[2] or "")
    assert p.overrun() is None and p.deadline is None
    assert overrun_after(300) == 330 and overrun_after(1) == 6


def test_each_call_of_a_batch_is_cut_by_its_own_alarm_and_the_handler_is_restored() -> None:
    """The SIGALRM handler is installed once for a batch, each call arming the timer: a hung
    call is cut at handler_timeout, calls before and after it run under the same handler
    (each with a fresh timer), and after the batch the previous handler is back and the timer
    is off."""
    import signal
    import time as clock

    def hang(it: dict[str, Any]) -> None:
        if it["doc_id"] == "d2":
            clock.sleep(60)  # the hang being cut, not synchronisation

    def mine(_sig: int, _frame: Any) -> None:
        raise AssertionError("the previous handler ran")

    previous = signal.signal(signal.SIGALRM, mine)
    try:
        fake = Fake(hang)
        p = policy(fake, chunk_size=1, retries=0, handler_timeout=0.2)
        t0 = clock.monotonic()
        results, dead = p.run(items(5))
        assert [r["doc_id"] for r in results] == ["d0", "d1", "d3", "d4"]
        assert [(it["doc_id"], "handler_timeout" in error) for it, error in dead] == [("d2", True)]
        assert clock.monotonic() - t0 < 30
        assert signal.getsignal(signal.SIGALRM) is mine
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    finally:
        signal.signal(signal.SIGALRM, previous)
