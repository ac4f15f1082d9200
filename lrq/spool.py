"""The spool: the only code that touches a queue's folders. This docstring is the protocol.

Layout, per queue, under ``<data_dir>/<queue>/`` (folders are created 0700)::

    tmp/<name>.pkl       a batch being written; never read; orphans are swept by cleanup
    left/<name>.pkl      a published batch: tmp write, fsync, rename here, fsync left/
    right/<name>         the claim (the ack): exclusive create (O_CREAT|O_EXCL), one winner;
                         holds the owner record as JSON (host, pid, process start, attempt, token)
    right/<name>.done    the done marker, written after the database commit; the batch ledger
                         in the results database is the truth it can be rebuilt from
    failed/<name>.pkl    a batch that could not be processed, beside failed/<name>.error
    position.json        the source position, advanced only after the batch file is durable
    <job>.lock           flock files making the sniffer (and the scheduler) single per folder

Names are ``<UTC time to the microsecond>-<shortuuid>``, e.g.
``20261123T064512123456-Xk3pQ9aLm2Zt``: unique, and sorting by name sorts by creation (one
process never hands out the same microsecond twice).

A batch is *pending* when ``left/<name>.pkl`` exists and ``right/<name>`` does not, *claimed*
when ``right/<name>`` exists without ``right/<name>.done``, *done* with both, *failed* when it
sits in ``failed/``.

Batch file: the magic ``LRQ1\\n`` followed by a pickle of ``{"name", "queue", "created",
"position", "items"}``. Only files this module wrote are read back.

Crash windows and what covers them:

* killed while writing ``tmp/``: the file is never visible; the source position did not move,
  so the same items are fetched again.
* killed after the rename, before the position is saved: the items are published again in a
  later batch; the results table's unique keys absorb the replay.
* killed after the claim: the batch stays claimed; the claim names its owner so a reaper can
  tell a dead owner from a live one.
* killed after the database commit, before the done marker: the next claimer finds the batch
  in the ledger and only writes the marker.
"""
from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import functools
import json
import os
import pickle
import random
import socket
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import shortuuid

from lrq.errors import AlreadyRunning, BatchCorrupt

MAGIC = b"LRQ1\n"
SUFFIX = ".pkl"
DONE = ".done"
ERROR = ".error"
DIR_MODE = 0o700
FILE_MODE = 0o600
_uuid = shortuuid.ShortUUID()


class State(enum.Enum):
    PENDING = "pending"
    CLAIMED = "claimed"
    DONE = "done"
    FAILED = "failed"
    MISSING = "missing"


@dataclass(frozen=True)
class Claim:
    """What ``right/<name>`` holds: who claimed the batch, when, and which attempt this is."""

    name: str
    token: str
    attempt: int
    host: str
    pid: int
    start: int
    claimed_at: float


@dataclass(frozen=True)
class Batch:
    name: str
    queue: str
    created: float
    position: Any
    items: list[dict[str, Any]]


@dataclass(frozen=True)
class Counts:
    pending: int
    claimed: int
    done: int
    failed: int
    bytes: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@functools.cache
def process_start() -> int:
    """This process's start time in clock ticks since boot (tells a reused pid apart)."""
    try:
        stat = Path(f"/proc/{os.getpid()}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, tmp_dir: Path) -> None:
    """Write ``data`` to ``path`` so that a reader sees all of it or nothing.

    Any error (including from fsync or close) removes the temporary file and propagates:
    the caller must then treat the write as not having happened.
    """
    tmp = tmp_dir / f"{path.name}.{os.getpid()}.{_uuid.random(8)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


class Spool:
    """One queue's folders. Safe to use from many processes at once."""

    def __init__(self, data_dir: Path, queue: str, *, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None) -> None:
        self.queue = queue
        self.root = Path(data_dir) / queue
        self.left = self.root / "left"
        self.right = self.root / "right"
        self.tmp = self.root / "tmp"
        self.failed = self.root / "failed"
        self.clock = clock
        self.rng = rng or random.Random()
        self._last_us = 0
        self._candidates: list[str] = []

    def ensure(self) -> "Spool":
        for d in (self.root.parent, self.root, self.left, self.right, self.tmp, self.failed):
            d.mkdir(mode=DIR_MODE, exist_ok=True)
        return self

    # -- names ---------------------------------------------------------------------------
    def new_name(self) -> str:
        us = max(int(self.clock() * 1_000_000), self._last_us + 1)
        self._last_us = us
        stamp = datetime.fromtimestamp(us // 1_000_000, timezone.utc).strftime("%Y%m%dT%H%M%S")
        return f"{stamp}{us % 1_000_000:06d}-{_uuid.random(12)}"

    # -- publishing ----------------------------------------------------------------------
    def publish(self, items: list[dict[str, Any]], position: Any = None) -> str:
        """Write a batch durably into ``left/`` and return its name."""
        name = self.new_name()
        body = {"name": name, "queue": self.queue, "created": self.clock(),
                "position": position, "items": items}
        data = MAGIC + pickle.dumps(body, protocol=pickle.HIGHEST_PROTOCOL)
        write_atomic(self.left / f"{name}{SUFFIX}", data, self.tmp)
        return name

    def read_position(self) -> Any:
        try:
            return json.loads((self.root / "position.json").read_text())["position"]
        except FileNotFoundError:
            return None

    def write_position(self, position: Any) -> None:
        data = json.dumps({"position": position, "at": self.clock()}).encode()
        write_atomic(self.root / "position.json", data, self.tmp)

    # -- listing -------------------------------------------------------------------------
    def _names(self, folder: Path, suffix: str) -> set[str]:
        try:
            return {e.name[: -len(suffix)] if suffix else e.name
                    for e in os.scandir(folder) if e.name.endswith(suffix)}
        except FileNotFoundError:
            return set()

    def pending(self) -> list[str]:
        """Names in ``left/`` without a claim in ``right/``, oldest first."""
        return sorted(self._names(self.left, SUFFIX) - self._names(self.right, ""))

    def has_pending(self) -> bool:
        claimed = self._names(self.right, "")
        try:
            with os.scandir(self.left) as it:
                return any(e.name.endswith(SUFFIX) and e.name[: -len(SUFFIX)] not in claimed
                           for e in it)
        except FileNotFoundError:
            return False

    def claimed(self) -> list[str]:
        right = self._names(self.right, "")
        return sorted(n for n in right if not n.endswith(DONE) and f"{n}{DONE}" not in right)

    def counts(self) -> Counts:
        size = 0
        left: set[str] = set()
        right: set[str] = set()
        failed = 0
        for folder, into in ((self.left, left), (self.right, right), (self.failed, None),
                             (self.tmp, None)):
            try:
                with os.scandir(folder) as it:
                    for e in it:
                        size += e.stat(follow_symlinks=False).st_size
                        if into is not None:
                            into.add(e.name)
                        elif folder == self.failed and e.name.endswith(SUFFIX):
                            failed += 1
            except FileNotFoundError:
                pass
        left_names = {n[: -len(SUFFIX)] for n in left if n.endswith(SUFFIX)}
        done = {n[: -len(DONE)] for n in right if n.endswith(DONE)}
        claims = {n for n in right if not n.endswith(DONE)}
        return Counts(pending=len(left_names - claims), claimed=len(claims - done),
                      done=len(done), failed=failed, bytes=size)

    def state(self, name: str) -> State:
        if (self.right / f"{name}{DONE}").exists():
            return State.DONE
        if (self.right / name).exists():
            return State.CLAIMED
        if (self.left / f"{name}{SUFFIX}").exists():
            return State.PENDING
        if (self.failed / f"{name}{SUFFIX}").exists():
            return State.FAILED
        return State.MISSING

    # -- claiming ------------------------------------------------------------------------
    def claim(self, name: str, attempt: int = 1) -> Claim | None:
        """Claim ``name`` with an exclusive create; None when someone else has it."""
        c = Claim(name=name, token=_uuid.random(16), attempt=attempt, host=socket.gethostname(),
                  pid=os.getpid(), start=process_start(), claimed_at=self.clock())
        try:
            fd = os.open(self.right / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except FileExistsError:
            return None
        try:
            os.write(fd, json.dumps(asdict(c)).encode())
        finally:
            os.close(fd)
        if not (self.left / f"{name}{SUFFIX}").exists():
            # Cleanup removed the batch after our listing: undo and report no claim.
            os.unlink(self.right / name)
            return None
        return c

    def read_claim(self, name: str) -> Claim | None:
        try:
            return Claim(**json.loads((self.right / name).read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            return None

    def pick(self, order: str = "random") -> Claim | None:
        """Claim one pending batch, or return None when there is none.

        The listing is cached between calls and refreshed when used up, so a claim costs
        O(1) amortised however long the backlog; a stale entry only costs a failed create.
        """
        refreshed = False
        while True:
            if not self._candidates:
                if refreshed:
                    return None
                self._candidates = self.pending()
                if order == "fifo":
                    self._candidates.reverse()
                refreshed = True
                continue
            if order == "fifo":
                name = self._candidates.pop()
            else:
                i = self.rng.randrange(len(self._candidates))
                self._candidates[i], self._candidates[-1] = self._candidates[-1], self._candidates[i]
                name = self._candidates.pop()
            claim = self.claim(name)
            if claim is not None:
                return claim

    # -- reading -------------------------------------------------------------------------
    def load(self, name: str) -> Batch:
        for folder in (self.left, self.failed):
            path = folder / f"{name}{SUFFIX}"
            try:
                data = path.read_bytes()
                break
            except FileNotFoundError:
                continue
        else:
            raise FileNotFoundError(f"batch {name} is not in {self.left} or {self.failed}")
        if not data.startswith(MAGIC):
            raise BatchCorrupt(path, "not an lrq batch file (bad magic)")
        try:
            body = pickle.loads(data[len(MAGIC):])
            return Batch(name=body["name"], queue=body["queue"], created=body["created"],
                         position=body["position"], items=body["items"])
        except Exception as e:  # a truncated or foreign pickle can raise almost anything
            raise BatchCorrupt(path, f"{type(e).__name__}: {e}") from e

    # -- finishing -----------------------------------------------------------------------
    def mark_done(self, claim: Claim, info: dict[str, Any] | None = None) -> None:
        """Write the done marker; call only after the results are committed."""
        data = json.dumps({"token": claim.token, "done_at": self.clock(), **(info or {})})
        (self.right / f"{claim.name}{DONE}").write_text(data)

    def is_done(self, name: str) -> bool:
        return (self.right / f"{name}{DONE}").exists()

    def release(self, claim: Claim) -> bool:
        """Give a claim back (the batch becomes pending) if we still own it."""
        current = self.read_claim(claim.name)
        if current is None or current.token != claim.token:
            return False
        os.unlink(self.right / claim.name)
        return True

    def fail(self, claim: Claim, error: str) -> Path:
        """Move a claimed batch to ``failed/`` with an error file; return the error file."""
        err = self.failed / f"{claim.name}{ERROR}"
        record = {"name": claim.name, "queue": self.queue, "attempt": claim.attempt,
                  "claimed_at": claim.claimed_at, "failed_at": self.clock(),
                  "host": claim.host, "pid": claim.pid, "error": error}
        write_atomic(err, json.dumps(record, indent=2).encode(), self.tmp)
        os.rename(self.left / f"{claim.name}{SUFFIX}", self.failed / f"{claim.name}{SUFFIX}")
        fsync_dir(self.failed)
        fsync_dir(self.left)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.right / claim.name)
        return err

    def read_error(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.failed / f"{name}{ERROR}").read_text())
        except FileNotFoundError:
            return None

    # -- singletons ----------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, job: str) -> Iterator[None]:
        with flock(self.root / f"{job}.lock", f"{job} of queue {self.queue}"):
            yield


@contextlib.contextmanager
def flock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive, non-blocking ``flock`` on ``path``; the kernel drops it if we die."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise AlreadyRunning(f"{what} is already running (pid {holder}; lock {path})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)
