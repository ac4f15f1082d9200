"""Batch files in a queue's folders: publishing them signed, reading them back (signature
first, then unpickling), the data dir's key ids, batch names and the source position. The
bytes themselves are :mod:`lrq.spool.batchfile`'s; the protocol is in :mod:`lrq.spool`.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lrq import failpoints, signing
from lrq.errors import BatchCorrupt, BatchUnsigned, ForeignEntry, KeyMismatch, LrqError
from lrq.spool.batchfile import CODECS, MAGIC_V2, check, compress, decompress, key_id_in, seal
from lrq.spool.files import (
    ATTEMPT,
    AWAITING_ACK_MODE,
    ERROR,
    FILE_MODE,
    SUFFIX,
    create,
    fsync_dir,
    read_regular,
    take_spare,
    token,
    write_atomic,
)
from lrq.spool.listing import Listing, State
from lrq.spool.wake import Doorbell

#: Where a data dir lists the ids of the keys it has signed batches with.
KEY_IDS = "key-ids"
#: Pending batches the start-up key check reads.
KEY_SAMPLE = 16


@dataclass(frozen=True)
class Batch:
    name: str
    queue: str
    created: float
    position: Any
    items: list[dict[str, Any]]
    #: Published by ``lrq retry-dead``: storing it replaces its keys' dead letters.
    replace_dead: bool = False
    #: One receipt per item from a source acknowledged at commit (:mod:`lrq.acker`); None
    #: for other sources, retry batches and files written before receipts.
    receipts: list[Any] | None = None


class Batches(Listing):
    """The batch-file layer of :class:`~lrq.spool.Spool`; its attributes are set there."""

    compress: str
    _key: bytes | None
    _previous: tuple[bytes, ...]
    _keys: dict[bytes, bytes] | None
    _key_noted: bool
    _last_us: int
    bell: Doorbell
    _spare_names: list[str]
    _spare_empty_at: int | None
    _foreign: dict[str, str]

    @property
    def key(self) -> bytes:
        if self._key is None:
            self._key = signing.load_key(None, self.root.parent)
        return self._key

    @property
    def keys(self) -> dict[bytes, bytes]:
        """Every key that verifies, by key id, the current one first."""
        if self._keys is None:
            self._keys = {signing.key_id(k): k for k in (self.key, *self._previous)}
        return self._keys

    def seen_key_ids(self) -> set[bytes]:
        """Ids of every key this data dir has signed batches with."""
        try:
            text = read_regular(self.root.parent / KEY_IDS).decode(errors="replace")
        except (FileNotFoundError, ForeignEntry):
            return set()
        out = set()
        for line in text.split():
            with contextlib.suppress(ValueError):
                out.add(bytes.fromhex(line))
        return out

    def _signed(self, payload: bytes) -> bytes:
        """A batch file around ``payload`` (codec byte + body), signed with the current key.

        Before the first file a key signs, its id is added to ``<data_dir>/key-ids``: a later
        reader without that key then knows the key changed (stop, quarantine nothing), where
        a key id never used here marks a file lrq did not write (quarantine it)."""
        kid = next(iter(self.keys))
        if not self._key_noted:
            if kid not in self.seen_key_ids():
                fd = os.open(self.root.parent / KEY_IDS, os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                             FILE_MODE)
                try:
                    os.write(fd, kid.hex().encode() + b"\n")  # one small append: atomic
                    os.fsync(fd)
                finally:
                    os.close(fd)
            self._key_noted = True
        return seal(self.key, kid, payload)

    def _signature(self, data: bytes) -> tuple[str, int]:
        """:func:`lrq.spool.batchfile.check` with this spool's keys."""
        return check(data, self.keys, self.seen_key_ids)

    def _newer_than_key_ids(self, path: os.PathLike[str]) -> bool:
        """Was ``path`` (an LRQ2 file no key verifies) written after this data dir's first
        LRQ3 file? Since ``key-ids`` exists lrq writes only LRQ3 files (renames into left/
        keep a file's mtime), so such a file is not lrq's: quarantine it, never let it say
        the key changed."""
        try:
            return os.stat(path).st_mtime_ns > os.stat(self.root.parent / KEY_IDS).st_mtime_ns
        except FileNotFoundError:
            return False

    def key_problem(self) -> KeyMismatch | None:
        """A key mismatch shown by a sample of pending batches, or None: a batch signed with
        a key this data dir used but the config lacks, or old (LRQ2) batches older than
        ``key-ids`` none of which verifies (LRQ3 files verifying say nothing of the key that
        wrote LRQ2 ones). Checked before ``lrq run``, ``lrq work`` and ``lrq sniff``."""
        claims = self._claims()
        names = [n for n in self._sample_left() if n not in claims][:KEY_SAMPLE]
        verified, unverified = False, []
        for name in names:
            path = self.left / f"{name}{SUFFIX}"
            try:
                data = read_regular(path)
            except (FileNotFoundError, ForeignEntry):
                continue
            verdict, _ = self._signature(data)
            if verdict == "other-key":
                return KeyMismatch(self.queue, name, key_id_in(data))
            if data.startswith(MAGIC_V2):
                verified |= verdict == "ok"
                if verdict == "unverified" and not self._newer_than_key_ids(path):
                    unverified.append(name)
        return KeyMismatch(self.queue, unverified[0], None) if unverified and not verified else None

    def new_name(self) -> str:
        us = max(int(self.clock() * 1_000_000), self._last_us + 1)
        self._last_us = us
        stamp = datetime.fromtimestamp(us // 1_000_000, UTC).strftime("%Y%m%dT%H%M%S")
        return f"{stamp}{us % 1_000_000:06d}-{token(12)}"

    # -- publishing ----------------------------------------------------------------------
    def publish(self, items: list[dict[str, Any]], position: Any = None, *,
                replace_dead: bool = False, name: str | None = None,
                created: float | None = None, sync: bool = True,
                receipts: list[Any] | None = None) -> str:
        """Write a batch durably into ``left/`` and return its name (a new one, unless
        ``name`` is given: the halves of a split).

        ``sync=False`` is the sniffer's group commit: the file is fsynced and renamed into
        ``left/`` (visible, so a worker may claim it at once) but ``left/`` is not fsynced;
        the caller calls :meth:`sync_published` once for the group before it moves the source
        position, which is what the name's durability protects."""
        name = name or self.new_name()
        body = {"name": name, "queue": self.queue,
                "created": self.clock() if created is None else created,
                "position": position, "items": items}
        if replace_dead:
            body["replace_dead"] = True
        if receipts is not None:
            body["receipts"] = receipts
        codec = CODECS[self.compress]
        payload = bytes([codec]) + compress(codec, pickle.dumps(body, protocol=pickle.HIGHEST_PROTOCOL))
        write_atomic(self.left / f"{name}{SUFFIX}", self._signed(payload), self.tmp, sync_dir=sync,
                     opener=self._open_tmp if receipts is None else self._open_held)
        failpoints.hit("sniff-after-rename")
        self.bell.ring()  # after the rename: a worker woken by it finds the batch
        return name

    def _open_held(self, tmp: Path) -> int:
        """:meth:`_open_tmp`, made :data:`AWAITING_ACK_MODE` (the open descriptor still
        writes): the batch's items await their acknowledgement to the source."""
        fd = self._open_tmp(tmp)
        try:
            os.fchmod(fd, AWAITING_ACK_MODE)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_tmp(self, tmp: Path) -> int:
        """The batch's ``tmp/`` file, open for writing and empty: a spare from ``spare/``
        when there is one (no new inode: on ext4 creating one right after many deletions is
        the publish's costliest step), else a new file. The names come from this process's
        cache of ``spare/``, listed again only once it is used up; an empty ``spare/`` is
        listed again only once its mtime changed (a stat per publish meanwhile, ~1 us against
        the hundreds a new inode costs). A foreign entry is noted and left."""
        listed = False
        while True:
            if not self._spare_names:
                if listed:
                    break
                try:
                    stamp = os.stat(self.spare).st_mtime_ns  # before listing: a later change shows
                except FileNotFoundError:
                    break
                if stamp == self._spare_empty_at:
                    break  # empty when last listed, unchanged since
                self._spare_names = [e.name for e in self.files(self.spare)
                                     if e.path not in self._foreign]
                self._spare_empty_at = None if self._spare_names else stamp
                listed = True
                continue
            spare = self.spare / self._spare_names.pop()
            try:
                fd = take_spare(spare, tmp)
            except ForeignEntry as e:
                self.note_foreign(spare, e.what)  # and never listed again by this process
                continue
            if fd is not None:
                return fd
        return create(tmp)

    def sync_published(self) -> None:
        """Make the names of the batches published with ``sync=False`` durable: one fsync of
        ``left/`` for the whole group (the rename into ``left/`` and the entry leaving
        ``tmp/`` are both in it on the filesystems lrq runs on)."""
        failpoints.hit("sniff-before-dir-sync")
        fsync_dir(self.left)

    def read_position(self) -> Any:
        try:
            return json.loads(read_regular(self.root / "position.json"))["position"]
        except FileNotFoundError:
            return None

    def write_position(self, position: Any, *, batch_bytes: int = 0) -> None:
        """Save the source position; ``batch_bytes``, the size of the last batch published,
        is kept beside it for :meth:`last_batch_bytes` once no batch file is left."""
        record = {"position": position, "at": self.clock()}
        if batch_bytes:
            record["batch_bytes"] = batch_bytes
        data = json.dumps(record).encode()
        write_atomic(self.root / "position.json", data, self.tmp)

    # -- reading -------------------------------------------------------------------------
    def load(self, name: str) -> Batch:
        for folder in (self.left, self.done, self.failed, self.quarantine):
            path = folder / f"{name}{SUFFIX}"
            try:
                data = read_regular(path)
                break
            except FileNotFoundError:
                continue
            except ForeignEntry as e:  # a worker moves it to failed/, out of the way
                self.note_foreign(path, e.what)
                raise BatchCorrupt(path, f"cannot be read: it is {e.what}") from e
        else:
            raise FileNotFoundError(f"batch {name} is not in {self.left}, {self.done}, {self.failed} "
                                    f"or {self.quarantine}")
        verdict, start = self._signature(data)
        if verdict == "other-key":
            raise KeyMismatch(self.queue, name, key_id_in(data))
        if verdict == "unverified" and self._newer_than_key_ids(path):
            verdict = "planted"
        elif verdict == "unverified" and self.key_problem() is not None:
            raise KeyMismatch(self.queue, name, None)  # no pending batch verifies: the key
        if verdict != "ok":
            raise BatchUnsigned(path, {
                "foreign": "not an lrq batch file (bad magic or truncated header)",
                "altered": "signature does not match its key: the file was altered",
                "stranger": "signature does not match: signed with a key this data dir never "
                            f"used (key id {key_id_in(data)})",
                "unverified": "signature does not match this data dir's keys",
                "planted": "an old-format (LRQ2) file no key verifies, written after this data "
                           "dir's first LRQ3 file (key-ids), so not by lrq",
            }[verdict] + "; not unpickled")
        view = memoryview(data)
        try:
            body = pickle.loads(decompress(data[start], view[start + 1:]))
            return Batch(name=body["name"], queue=body["queue"], created=body["created"],
                         position=body["position"], items=body["items"],
                         replace_dead=bool(body.get("replace_dead", False)),
                         receipts=body.get("receipts"))
        except Exception as e:  # a truncated or foreign pickle can raise almost anything
            raise BatchCorrupt(path, f"{type(e).__name__}: {e}") from e

    def read_error(self, name: str) -> dict[str, Any] | None:
        for folder in (self.failed, self.quarantine):
            try:
                return json.loads(read_regular(folder / f"{name}{ERROR}"))
            except (FileNotFoundError, ForeignEntry, ValueError):
                continue
        return None

    def resign(self, name: str) -> None:
        """Sign a quarantined batch again with the current key and make it pending, once an
        operator vouches for it (e.g. written before a key change). Only the HMAC is
        recomputed over the stored payload: nothing is decompressed or unpickled here, but a
        worker will unpickle it, which runs whatever code a forged file carries."""
        state = self.state(name)
        if state is not State.QUARANTINED:
            raise LrqError(f"batch {name} is {state.value}, not quarantined; nothing re-signed")
        path = self.quarantine / f"{name}{SUFFIX}"
        data = read_regular(path)
        verdict, start = self._signature(data)
        if verdict == "foreign":
            raise LrqError(f"{path} is not an lrq batch file (bad magic or truncated header); "
                           "it cannot be re-signed: remove it")
        write_atomic(self.left / f"{name}{SUFFIX}", self._signed(data[start:]), self.tmp)
        for leftover in (path, self.quarantine / f"{name}{ERROR}", self.right / f"{name}{ATTEMPT}"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
        fsync_dir(self.quarantine)
