"""Per-step CPU accounting for ``bench/cpu_ledger.py``: wrap named functions, add each call's
thread CPU to its step.

A :class:`Target` names a function as ``"module:Qual.name"`` (a method, a module function, a
static or class method) and the step its calls count to. :func:`install` replaces each with a
wrapper that reads ``time.thread_time()`` (the calling thread's user + system CPU) before and
after the call; :meth:`Installed.restore` puts the originals back. A name that no longer
resolves (another branch renamed it) is not an error: it is listed in
:attr:`Installed.missing` and reported, and its time shows up in the enclosing step.

Nested calls are counted once: a wrapped call inside another is attributed to the innermost
step, and its time is subtracted from the outer call's, so the steps add up to the CPU the
wrapped calls took. A target with ``within`` is its own step only inside those steps (or
outside every wrapped call); inside any other step it is part of that step (``write_atomic``
is "write" inside ``publish``, but "position" inside ``write_position``).

Each thread keeps its own stack and tallies (no lock on the hot path); a ledger's
``phase`` (set by the driver between phases) is part of every tally's key.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Target:
    """One wrapped function (``where``, ``"module:Qual.name"``) and the step it counts to."""

    step: str
    where: str
    #: Steps inside which this call is its own step; elsewhere it is part of the enclosing
    #: step. Empty: always its own step.
    within: tuple[str, ...] = ()


class Ledger:
    """Thread CPU of wrapped calls, by (phase, step, target)."""

    def __init__(self, clock: Callable[[], float] = time.thread_time) -> None:
        self.clock = clock
        #: Added to every tally's key; the driver sets it before each phase.
        self.phase = ""
        self._local = threading.local()
        self._tallies: list[dict[tuple[str, str, str], list[float]]] = []
        self._lock = threading.Lock()

    def _state(self) -> tuple[list[list[Any]], dict[tuple[str, str, str], list[float]]]:
        state = getattr(self._local, "state", None)
        if state is None:
            state = self._local.state = ([], {})
            with self._lock:  # once per thread
                self._tallies.append(state[1])
        return state

    def call(self, target: Target, fn: Callable[..., Any], args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> Any:
        """Run ``fn(*args, **kwargs)``, counting its CPU minus its wrapped callees' to
        ``target``'s step (or to the enclosing step, see :attr:`Target.within`)."""
        stack, tally = self._state()
        if target.within and stack and stack[-1][0] not in target.within:
            return fn(*args, **kwargs)  # part of the enclosing step
        frame: list[Any] = [target.step, 0.0]  # step, CPU of wrapped calls inside this one
        stack.append(frame)
        clock = self.clock
        t0 = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            spent = clock() - t0
            stack.pop()
            if stack:
                stack[-1][1] += spent
            key = (self.phase, target.step, target.where)
            entry = tally.get(key)
            if entry is None:
                entry = tally[key] = [0.0, 0]
            entry[0] += spent - frame[1]
            entry[1] += 1

    def tallies(self, phase: str) -> dict[tuple[str, str], tuple[float, int]]:
        """(step, target) -> (own CPU seconds, calls) of ``phase``, summed over threads."""
        out: dict[tuple[str, str], tuple[float, int]] = {}
        with self._lock:
            every = list(self._tallies)
        for tally in every:
            for (ph, step, where), (seconds, calls) in list(tally.items()):
                if ph == phase:
                    s, c = out.get((step, where), (0.0, 0))
                    out[(step, where)] = (s + seconds, c + int(calls))
        return out

    def summary(self, phase: str, total: float, order: Sequence[str] = ()) -> Summary:
        """The steps of ``phase`` against its measured ``total`` CPU seconds: rows in
        ``order`` (steps not in it after, as they came), and the unaccounted remainder."""
        rows: dict[str, StepRow] = {}
        for (step, where), (seconds, calls) in self.tallies(phase).items():
            row = rows.setdefault(step, StepRow(step))
            row.seconds += seconds
            row.calls += calls
            row.targets[where] = (seconds, calls)
        rank = {s: i for i, s in enumerate(order)}
        ordered = sorted(rows.values(), key=lambda r: rank.get(r.step, len(rank)))
        return Summary(phase, total, ordered)


@dataclass
class StepRow:
    step: str
    seconds: float = 0.0
    calls: int = 0
    #: target -> (own CPU seconds, calls)
    targets: dict[str, tuple[float, int]] = field(default_factory=dict)


@dataclass
class Summary:
    """One phase: its steps, the measured total and what the steps leave unaccounted."""

    phase: str
    total: float
    rows: list[StepRow]

    @property
    def accounted(self) -> float:
        return sum(r.seconds for r in self.rows)

    @property
    def unaccounted(self) -> float:
        """Measured CPU no wrapped call took (negative if the steps exceed the total)."""
        return self.total - self.accounted

    @property
    def fraction(self) -> float:
        """The steps' sum over the measured total (1.0 = all of it)."""
        return self.accounted / self.total if self.total > 0 else 0.0


@dataclass
class Installed:
    """What :func:`install` wrapped, what it could not, and how to undo it."""

    wrapped: list[Target] = field(default_factory=list)
    #: target -> why it was not wrapped
    missing: dict[str, str] = field(default_factory=dict)
    _undo: list[Callable[[], None]] = field(default_factory=list)

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()


def _resolve(where: str) -> tuple[Any, str, Any]:
    """(owner, attribute name, the attribute as stored) for ``"module:Qual.name"``."""
    module, _, qual = where.partition(":")
    if not module or not qual:
        raise ValueError(f"{where!r} must look like 'module:Qual.name'")
    owner: Any = importlib.import_module(module)
    *path, name = qual.split(".")
    for part in path:
        owner = getattr(owner, part)
    raw = inspect.getattr_static(owner, name) if inspect.isclass(owner) else getattr(owner, name)
    return owner, name, raw


def install(ledger: Ledger, targets: Iterable[Target]) -> Installed:
    """Wrap every target's function so its calls are counted in ``ledger``."""
    out = Installed()
    targets = list(targets)
    where = [t.where for t in targets]
    twice = sorted({w for w in where if where.count(w) > 1})
    if twice:  # checked before anything is wrapped
        raise ValueError(f"in the wrap table twice: {', '.join(twice)}")
    for t in targets:
        try:
            owner, name, raw = _resolve(t.where)
        except (ImportError, AttributeError, ValueError) as e:
            out.missing[t.where] = f"{type(e).__name__}: {e}"
            continue
        kind = type(raw) if isinstance(raw, (staticmethod, classmethod)) else None
        fn = raw.__func__ if kind is not None else raw
        if not callable(fn) or isinstance(fn, type):
            out.missing[t.where] = f"not a function ({type(raw).__name__})"
            continue
        if inspect.isgeneratorfunction(fn):
            out.missing[t.where] = "a generator function: only creating it would be timed"
            continue
        wrapper = _wrapper(ledger, t, fn)
        had = not inspect.isclass(owner) or name in vars(owner)
        setattr(owner, name, kind(wrapper) if kind is not None else wrapper)
        out.wrapped.append(t)
        out._undo.append(functools.partial(_put_back, owner, name, raw, had))
    return out


def _wrapper(ledger: Ledger, target: Target, fn: Callable[..., Any]) -> Callable[..., Any]:
    call = ledger.call

    @functools.wraps(fn)
    def counted(*args: Any, **kwargs: Any) -> Any:
        return call(target, fn, args, kwargs)

    return counted


def _put_back(owner: Any, name: str, raw: Any, had: bool) -> None:
    if had:
        setattr(owner, name, raw)
    else:
        delattr(owner, name)  # it was inherited: show the base class's again


def overhead_per_call(iterations: int = 20_000) -> float:
    """Thread CPU seconds one wrapped call adds over a bare call (the ledger's own cost, part
    of it inside the steps): best of three runs of ``iterations`` no-op calls each."""

    class Probe:
        def noop(self) -> None:
            return None

    ledger = Ledger()
    ledger.phase = "calibration"
    bare = Probe().noop
    counted = Probe()
    counted.noop = _wrapper(ledger, Target("probe", "probe:noop"),  # type: ignore[method-assign]
                            Probe.noop).__get__(counted)
    best = float("inf")
    for _ in range(3):
        t0 = time.thread_time()
        for _ in range(iterations):
            bare()
        t1 = time.thread_time()
        for _ in range(iterations):
            counted.noop()
        t2 = time.thread_time()
        best = min(best, ((t2 - t1) - (t1 - t0)) / iterations)
    return max(best, 0.0)
