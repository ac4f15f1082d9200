"""Helpers shared by lrq's test tiers: configs in tmp dirs, sample sources, subprocess CLI."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from lrq import config
from lrq.sample import write_documents

ROOT = Path(__file__).resolve().parent.parent

T = TypeVar("T")


def poll(get: Callable[[], T], seconds: float = 30.0, every: float = 0.05) -> T:
    """``get()`` once it is truthy, or its last value after ``seconds``: the bounded wait
    for a condition another process brings about (assert on the result)."""
    deadline = time.monotonic() + seconds
    while not (value := get()) and time.monotonic() < deadline:
        time.sleep(every)
    return value


def toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else toml_value(k)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, dict):  # a key with a dot ("session.timeout.ms") is quoted, not a path
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(folder: Path, *, docs: int | None = 1000, queue: str = "docs",
                 top: dict[str, Any] | None = None, source: dict[str, Any] | None = None,
                 **queue_keys: Any) -> Path:
    """An lrq.toml in ``folder`` for one queue over ``docs`` sample documents (None: no source db)."""
    folder.mkdir(parents=True, exist_ok=True)
    if docs is not None:
        write_documents(f"sqlite:///{folder / 'source.db'}", docs)
    q = {"handler": "workers.wordcount:handle", "key": "doc_id", "batch_size": 100,
         "chunk_size": 50, "workers": 2, "result_table": "doc_results", **queue_keys}
    src = {"kind": "sql", "url": "sqlite:///source.db", "table": "source_data",
           "order_by": "id", "columns": {"id": "id", "doc_id": "mid", "content": "content"},
           **(source or {})}
    top = {"data_dir": "data", "db_url": "sqlite:///results.db", "interval": 0.2,
           "grace": 10, **(top or {})}
    lines = [f"{k} = {toml_value(v)}" for k, v in top.items()]
    lines += [f"[queues.{queue}]"] + [f"{k} = {toml_value(v)}" for k, v in q.items() if v is not None]
    lines += [f"[queues.{queue}.source]"] + [f"{k} = {toml_value(v)}" for k, v in src.items()]
    path = folder / "lrq.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def open_source(kind: str, table: dict[str, Any], data_dir: Path, held: tuple[Any, ...] = (),
                where: str = "queues.q.source") -> Any:
    """A source of ``kind`` on queue "q" from its option table (without ``kind``), checked and
    opened the way a node does it (:func:`lrq.sources.parse`, :func:`lrq.sources.build`)."""
    from lrq.sources import Context, build, parse

    settings = parse(kind, table, Path("."), where)
    return build(config.SourceConfig(kind, settings), Context(data_dir, "q", held))


def load_app(path: Path) -> Any:
    from lrq.app import App

    return App(config.load(path))


def descendants(pid: int) -> list[int]:
    """``pid``'s child processes, theirs, and so on (from /proc), nearest first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # gone meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in (...) may hold spaces
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it, as a lost machine: ``lrq run``'s worker
    processes run in sessions of their own, so a process-group kill misses them (they would
    see their scheduler gone and finish their batch gracefully). The tree is frozen with
    SIGSTOP first, so nothing in it starts a process or reaps one while it is read."""
    tree = [pid]
    for _ in range(3):  # a process forked between the read and its parent's stop: read again
        for p in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGSTOP)
        again = [pid, *descendants(pid)]
        if again == tree:
            break
        tree = again
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


@contextlib.contextmanager
def killed_on_exit(proc: subprocess.Popen[Any]) -> Iterator[subprocess.Popen[Any]]:
    """Make sure a spawned process is gone when the block ends, whatever the test did."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def lrq(*args: str, cwd: Path | None = None, timeout: float = 120, env: dict[str, str] | None = None,
        check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the real ``lrq`` command line in a subprocess."""
    p = subprocess.run([sys.executable, "-m", "lrq", *args], cwd=cwd or ROOT, capture_output=True,
                       text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and p.returncode != 0:
        raise AssertionError(f"lrq {' '.join(args)} exited {p.returncode}:\n{p.stderr}")
    return p


@contextlib.contextmanager
def statements_sent(engine: Any) -> Iterator[list[str]]:
    """Every statement ``engine``'s connections send while the block runs, ``BEGIN``,
    ``COMMIT`` and the like included. On SQLite, through the driver's trace callback (with
    the parameters filled in): lrq's happy-path commit runs on the driver's connection, past
    SQLAlchemy's events (:meth:`lrq.sink.Sink._store_sqlite`); the pool is emptied first so
    every connection used in the block carries the callback. Elsewhere, SQLAlchemy's
    ``before_cursor_execute``."""
    from sqlalchemy import event

    sent: list[str] = []
    if engine.dialect.name == "sqlite":
        def trace(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.set_trace_callback(sent.append)

        engine.dispose()
        event.listen(engine, "connect", trace)
        try:
            yield sent
        finally:
            event.remove(engine, "connect", trace)
            engine.dispose()
        return

    def before(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        sent.append(statement)

    event.listen(engine, "before_cursor_execute", before)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", before)


def run_threads(targets: list[Callable[[], Any]], timeout: float = 60.0) -> list[Any]:
    """Run each callable in its own thread, released together (a barrier); their results or
    exceptions, in order. Each thread is bounded by ``timeout``."""
    import threading

    barrier = threading.Barrier(len(targets), timeout=timeout)
    out: list[Any] = [None] * len(targets)

    def run(i: int) -> None:
        try:
            barrier.wait()
            out[i] = targets[i]()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(targets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), f"a thread did not finish in {timeout} s"
    return out
