"""The CPU ledger's accounting (bench/cpu_steps.py): nested calls counted once, the
remainder computed, missing names reported, originals restored.

A fake per-thread clock advanced by the wrapped functions themselves makes every figure
exact: nothing here is timed."""
from __future__ import annotations

import importlib.util
import sys
import threading
import types
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("cpu_steps", BENCH / "cpu_steps.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["cpu_steps"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


steps = _load()


class FakeClock:
    """A thread's CPU clock that moves only when told to (one counter per thread)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def __call__(self) -> float:
        return getattr(self._local, "now", 0.0)

    def spend(self, seconds: float) -> None:
        self._local.now = self() + seconds


clock = FakeClock()


class Base:
    def inherited(self) -> str:
        clock.spend(2.0)
        return "base"


class Pipeline(Base):
    """outer spends 3 + inner's 5 + 1; helper is called from both."""

    def outer(self) -> str:
        clock.spend(3.0)
        self.inner()
        clock.spend(1.0)
        return "outer"

    def inner(self) -> None:
        clock.spend(4.0)
        self.helper()

    def helper(self) -> None:
        clock.spend(1.0)

    def position(self) -> None:
        clock.spend(0.5)
        self.helper()

    @staticmethod
    def static(x: int) -> int:
        clock.spend(0.25)
        return x * 2


def ledger_for(*targets: object) -> tuple[object, object]:
    ledger = steps.Ledger(clock=clock)
    ledger.phase = "p"
    return ledger, steps.install(ledger, targets)


def by_step(ledger: object, total: float) -> tuple[dict[str, float], object]:
    s = ledger.summary("p", total)
    return {r.step: r.seconds for r in s.rows}, s


def test_a_nested_call_counts_to_the_innermost_step_once() -> None:
    T = steps.Target
    ledger, done = ledger_for(T("outer", f"{__name__}:Pipeline.outer"),
                              T("inner", f"{__name__}:Pipeline.inner"))
    try:
        assert Pipeline().outer() == "outer"
    finally:
        done.restore()
    seconds, s = by_step(ledger, total=10.0)
    # inner's 4 + helper's 1 (not wrapped: part of inner); outer's own 3 + 1, not 9.
    assert seconds == {"outer": 4.0, "inner": 5.0}
    assert s.accounted == 9.0
    assert s.unaccounted == 1.0
    assert s.fraction == 0.9


def test_within_makes_a_call_part_of_other_enclosing_steps() -> None:
    T = steps.Target
    ledger, done = ledger_for(T("inner", f"{__name__}:Pipeline.inner"),
                              T("position", f"{__name__}:Pipeline.position"),
                              T("write", f"{__name__}:Pipeline.helper", ("inner",)))
    try:
        p = Pipeline()
        p.inner()  # helper inside inner: its own step
        p.position()  # helper inside position: position's
        p.helper()  # outside every wrapped call: its own step
    finally:
        done.restore()
    seconds, _ = by_step(ledger, total=7.5)
    assert seconds == {"inner": 4.0, "write": 2.0, "position": 1.5}


def test_missing_names_are_reported_and_originals_restored() -> None:
    T = steps.Target
    before = (Pipeline.__dict__["outer"], Pipeline.__dict__["static"])
    ledger, done = ledger_for(T("a", f"{__name__}:Pipeline.outer"),
                              T("b", f"{__name__}:Pipeline.renamed"),
                              T("c", "no_such_module_here:f"),
                              T("d", f"{__name__}:Pipeline.inherited"),
                              T("e", f"{__name__}:Pipeline.static"))
    assert set(done.missing) == {f"{__name__}:Pipeline.renamed", "no_such_module_here:f"}
    assert [t.step for t in done.wrapped] == ["a", "d", "e"]
    assert Pipeline().inherited() == "base"
    assert Pipeline.static(4) == 8 and Pipeline().static(1) == 2
    done.restore()
    assert (Pipeline.__dict__["outer"], Pipeline.__dict__["static"]) == before
    assert "inherited" not in Pipeline.__dict__  # the base class's shows again
    seconds, _ = by_step(ledger, total=2.5)
    assert seconds == {"d": 2.0, "e": 0.5}


def test_a_target_listed_twice_is_refused() -> None:
    T = steps.Target
    with pytest.raises(ValueError, match="twice"):
        steps.install(steps.Ledger(clock=clock), [T("a", f"{__name__}:Pipeline.outer"),
                                                  T("b", f"{__name__}:Pipeline.outer")])
    assert not hasattr(Pipeline.outer, "__wrapped__")


def test_threads_keep_their_own_stacks() -> None:
    """A call in another thread while this one is inside ``outer`` is not subtracted from
    ``outer``: each thread's steps are its own."""
    T = steps.Target
    ledger, done = ledger_for(T("outer", f"{__name__}:Pipeline.outer"),
                              T("inner", f"{__name__}:Pipeline.inner"))
    entered, release = threading.Event(), threading.Event()
    original = Pipeline.__dict__["helper"]

    def helper(self: Pipeline) -> None:  # holds the main thread inside outer -> inner
        entered.set()
        assert release.wait(10)
        original(self)

    Pipeline.helper = helper  # type: ignore[method-assign]
    try:
        t = threading.Thread(target=Pipeline().outer)
        t.start()
        assert entered.wait(10)
        Pipeline.helper = original  # type: ignore[method-assign]
        Pipeline().inner()  # this thread: inner 5, at top level
        release.set()
        t.join(10)
    finally:
        Pipeline.helper = original  # type: ignore[method-assign]
        done.restore()
    seconds, _ = by_step(ledger, total=14.0)
    assert seconds == {"outer": 4.0, "inner": 10.0}


def test_phases_are_kept_apart() -> None:
    T = steps.Target
    ledger, done = ledger_for(T("inner", f"{__name__}:Pipeline.inner"))
    try:
        Pipeline().inner()
        ledger.phase = "q"
        Pipeline().inner()
        Pipeline().inner()
    finally:
        done.restore()
    assert ledger.tallies("p") == {("inner", f"{__name__}:Pipeline.inner"): (5.0, 1)}
    assert ledger.tallies("q") == {("inner", f"{__name__}:Pipeline.inner"): (10.0, 2)}
