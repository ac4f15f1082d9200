"""Every error lrq raises on purpose derives from :class:`LrqError`.

The class docstring is the default message; fields carry what callers need to act. A
message is one line: a driver's multi-line text (psycopg's "Is the server running on that
host..." hint) is joined, so each error is one log line and one line on stderr.
"""
from __future__ import annotations


def one_line(text: str) -> str:
    """``text`` with its line breaks (and the indentation after them) as single spaces."""
    if "\n" not in text and "\r" not in text:
        return text
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


class LrqError(Exception):
    """lrq failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(one_line(message or (self.__doc__ or "").strip().splitlines()[0]))


class ConfigError(LrqError):
    """The configuration is invalid."""


class HandlerError(LrqError):
    """The handler failed or returned something lrq cannot store."""


class BatchCorrupt(LrqError):
    """A batch file cannot be read."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = path
        super().__init__(f"batch file {path} is corrupt: {reason}")


class NoSuchBatch(LrqError):
    """No queue holds a batch of that name (``lrq requeue NAME``, the web page's requeue)."""

    def __init__(self, name: str, where: str) -> None:
        self.name = name
        super().__init__(f"no batch named {name!r} in {where}")


class ForeignEntry(LrqError):
    """An entry in a queue folder that lrq did not write: a directory, FIFO, socket, symlink
    or unreadable file. It is skipped and reported, never read, followed or deleted."""

    def __init__(self, path: object, what: str) -> None:
        self.path = path
        self.what = what
        super().__init__(f"{path} is {what}: not lrq's; remove it")


class ClaimLost(LrqError):
    """A worker no longer owns the batch it is processing."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"claim on batch {name} was lost")


class SourceError(LrqError):
    """The source cannot be read."""


class SinkError(LrqError):
    """The results database cannot be written.

    Raised as one of its subclasses when the database's answer says which kind of failure it
    is; a bare ``SinkError`` is a fault of lrq's own and, like :class:`StatementRefused`, is
    not treated as infrastructure."""


class DatabaseUnreachable(SinkError):
    """The results database cannot be reached or is busy (a failed connect, a disconnect, a
    timeout, a lock wait, a deadlock, a full disk): infrastructure, the batch is not at fault.
    The worker releases the batch without counting an attempt and backs off."""


class StatementRefused(SinkError):
    """The results database refused a statement for a reason that is not one row's values:
    a missing table or column, a privilege, a value lrq cannot bind. A schema or
    configuration problem: the batch counts an attempt and, after ``max_attempts``, moves to
    ``failed/`` with this message."""


class AlreadyRunning(LrqError):
    """Another process holds this lock."""


class BatchUnsigned(BatchCorrupt):
    """A batch file's signature does not match: lrq did not write it (or it was altered)."""


class KeyMismatch(ConfigError):
    """A batch file was signed with a key this configuration does not have (the key changed):
    the files are fine, the key is wrong, so nothing is quarantined."""

    def __init__(self, queue: str, name: str, key_id: str | None) -> None:
        self.queue = queue
        self.name = name
        which = f"key id {key_id}" if key_id else "no configured key verifies it"
        super().__init__(
            f"queue {queue}: batch {name} was signed with another key ({which}); nothing was "
            "quarantined. Set `secret` (or LRQ_SECRET) back to the key that wrote it, or add "
            "that key to `previous_secrets` (or LRQ_PREVIOUS_SECRETS)")


class Retryable(LrqError):
    """An infrastructure failure (service down, timeout): retry later, the items are not at fault.

    Handlers may raise it themselves; lrq also treats connection errors, timeouts, HTTP 5xx
    and 429, and database disconnects this way.
    """


class HandlerTimeout(LrqError):
    """A handler call ran past ``handler_timeout``."""


class HandlerBroken(HandlerError):
    """The handler fails on every item the same way, or hangs: it is broken, not the items.

    Raised by :class:`lrq.policy.HandlerPolicy` once the evidence is in (see its docstring).
    The worker moves the batch to ``failed/`` with this error (nothing of it is
    dead-lettered), logs ``handler-broken`` once and its run ends with :attr:`exit_code`;
    the scheduler pauses the queue (``lrq run --until-idle`` stops). Fix the handler or the
    service, then ``lrq requeue --failed``.
    """

    #: Exit status of ``lrq work`` and ``lrq run --until-idle`` when the handler is broken.
    exit_code = 4

    def __init__(self, handler: str, error: str, why: str, detail: str = "") -> None:
        self.handler = handler
        self.error = error
        self.detail = detail
        super().__init__(f"handler {handler} is broken: {why}: {error}")
