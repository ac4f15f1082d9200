"""Batch-file keys: a changed key is a mismatch (stop, keep the files), an altered or strange
file is quarantined, previous_secrets rotate, old LRQ2 files still read, re-signing never
unpickles."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
from lrqtest import load_app, write_config

from lrq import signing
from lrq.errors import BatchUnsigned, KeyMismatch
from lrq.spool import Spool, State
from lrq.spool.batchfile import MAGIC, MAGIC_V2


def items(n: int) -> list[dict]:
    return [{"doc_id": f"d{i}", "content": "a b"} for i in range(n)]


def test_a_changed_key_is_a_mismatch_and_previous_secrets_still_verify(tmp_path: Path) -> None:
    old = Spool(tmp_path, "q", key=b"old key").ensure()
    names = [old.publish(items(3)) for _ in range(3)]
    new = Spool(tmp_path, "q", key=b"new key")
    with pytest.raises(KeyMismatch, match=f"queue q: batch {names[0]} was signed with another key"
                       r" \(key id [0-9a-f]{16}\).*previous_secrets"):
        new.load(names[0])
    problem = new.key_problem()
    assert isinstance(problem, KeyMismatch) and problem.name in names
    rotated = Spool(tmp_path, "q", key=b"new key", previous=(b"old key",))
    assert rotated.key_problem() is None and rotated.load(names[0]).items == items(3)
    name = rotated.publish(items(2))  # signs with the current key only
    assert Spool(tmp_path, "q", key=b"new key").load(name).items == items(2)
    with pytest.raises(KeyMismatch):
        Spool(tmp_path, "q", key=b"old key").load(name)


def test_an_altered_file_or_one_signed_elsewhere_is_unsigned_not_a_mismatch(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "here", "q", key=b"k").ensure()
    name = sp.publish(items(3))
    path = sp.left / f"{name}.pkl"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(BatchUnsigned, match="the file was altered"):
        sp.load(name)
    elsewhere = Spool(tmp_path / "elsewhere", "q", key=b"stranger").ensure()
    strange = elsewhere.publish(items(3))
    (sp.left / f"{strange}.pkl").write_bytes((elsewhere.left / f"{strange}.pkl").read_bytes())
    with pytest.raises(BatchUnsigned, match="a key this data dir never used"):
        sp.load(strange)
    assert sp.key_problem() is None  # neither says the key changed


def test_old_lrq2_files_are_still_read_and_a_wrong_key_on_them_is_a_mismatch(tmp_path: Path) -> None:
    sp = Spool(tmp_path, "q", key=b"k").ensure()
    names = []
    for i in range(2):
        payload = b"\0" + pickle.dumps({"name": f"n{i}", "queue": "q", "created": 0.0,
                                        "position": i, "items": items(2)})
        names.append(f"20250101T00000000000{i}-legacy0000")
        (sp.left / f"{names[-1]}.pkl").write_bytes(MAGIC_V2 + signing.sign(b"k", payload) + payload)
    assert sp.load(names[0]).position == 0
    other = Spool(tmp_path, "q", key=b"other")
    assert isinstance(other.key_problem(), KeyMismatch)
    with pytest.raises(KeyMismatch, match="no configured key verifies it"):
        other.load(names[0])


@pytest.fixture
def app(tmp_path: Path):
    return load_app(write_config(tmp_path, docs=None, top={"secret": "new key"}))


def test_a_worker_meeting_a_changed_key_releases_uncounted_and_quarantines_nothing(app, tmp_path) -> None:
    q = app.queues("docs")[0]
    name = Spool(app.cfg.data_dir, "docs", key=b"old key").ensure().publish(items(4))
    sp = app.spool(q)
    w = app.worker(q)
    with pytest.raises(KeyMismatch):
        w.run(burst=True)
    assert sp.state(name) is State.PENDING and sp.attempts(name)["attempts"] == 0
    assert sp.counts().quarantined == 0 and w.stats.failed == 0


def test_resign_recomputes_the_signature_and_never_unpickles(app, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    q = app.queues("docs")[0]
    sp = app.spool(q)
    payload = b"\0" + pickle.dumps({"name": "x", "queue": "docs", "created": 0, "position": None,
                                    "items": [Evil()]})
    name = "20260101T000000000000-evil00000000"
    kid = signing.key_id(sp.key)
    (sp.left / f"{name}.pkl").write_bytes(MAGIC + kid + b"\0" * 32 + payload)
    assert app.worker(q).run_once()
    assert sp.state(name) is State.QUARANTINED and "altered" in sp.read_error(name)["error"]
    sp.resign(name)
    assert not marker.exists()  # re-signing read no pickle
    assert sp.state(name) is State.PENDING and sp.read_error(name) is None
    data = (sp.left / f"{name}.pkl").read_bytes()
    assert data.startswith(MAGIC + kid) and data.endswith(payload)
    assert signing.valid(sp.key, data[len(MAGIC) + 8 + 32:], data[len(MAGIC) + 8:len(MAGIC) + 40])


def lrq2(sp: Spool, name: str, key: bytes, mtime: float) -> Path:
    """An old-format (LRQ2) batch file in ``left/``, signed with ``key``, of mtime ``mtime``."""
    payload = b"\0" + pickle.dumps({"name": name, "queue": "q", "created": 0.0, "position": 0,
                                    "items": items(2)})
    path = sp.left / f"{name}.pkl"
    path.write_bytes(MAGIC_V2 + signing.sign(key, payload) + payload)
    os.utime(path, (mtime, mtime))
    return path


def test_an_lrq2_file_newer_than_key_ids_is_quarantined_not_a_key_change(tmp_path: Path) -> None:
    sp = Spool(tmp_path, "q", key=b"k").ensure()
    (sp.left / f"{sp.publish(items(1))}.pkl").unlink()  # key-ids written; the queue drained
    written = (tmp_path / "key-ids").stat().st_mtime
    planted = sp.left / "20260101T000000000000-planted00000.pkl"
    planted.write_bytes(b"LRQ2\n" + b"\0" * 32 + b"\0garbage")  # the reviewer's 45 bytes
    os.utime(planted, (written + 60, written + 60))
    assert sp.key_problem() is None
    with pytest.raises(BatchUnsigned, match="written after this data dir's first LRQ3 file"):
        sp.load(planted.stem)
    lrq2(sp, "20250101T000000000000-legacy0000", b"old key", written - 60)  # from before key-ids
    assert isinstance(sp.key_problem(), KeyMismatch)  # only that one says the key changed


def test_lrq3_batches_of_a_new_key_do_not_make_an_lrq2_backlog_look_forged(tmp_path: Path) -> None:
    sp = Spool(tmp_path, "q", key=b"new key").ensure()
    sp.publish(items(1))  # the new key's first batch writes key-ids
    before = (tmp_path / "key-ids").stat().st_mtime - 60
    names = [lrq2(sp, f"20250101T00000000000{i}-legacy0000", b"old key", before).stem
             for i in range(3)]
    problem = sp.key_problem()
    assert isinstance(problem, KeyMismatch) and problem.name in names
    with pytest.raises(KeyMismatch, match="no configured key verifies it"):
        sp.load(names[0])
    rotated = Spool(tmp_path, "q", key=b"new key", previous=(b"old key",))
    assert rotated.key_problem() is None and rotated.load(names[0]).items == items(2)


def test_a_secret_with_surrounding_whitespace_can_be_rotated_out(tmp_path: Path) -> None:
    """``previous_keys`` used to strip what ``load_key`` keeps: such a key never verified."""
    old = signing.load_key(" old key\n", tmp_path)
    assert old == b" old key\n"
    assert signing.previous_keys([" old key\n"], env={}) == (old,)
    assert signing.previous_keys(env={"LRQ_PREVIOUS_SECRETS": "a, old key\n,,b"}) == \
        (b"a", b" old key\n", b"b")
    name = Spool(tmp_path, "q", key=old).ensure().publish(items(2))
    rotated = Spool(tmp_path, "q", key=b"new", previous=signing.previous_keys([" old key\n"], env={}))
    assert rotated.key_problem() is None and rotated.load(name).items == items(2)
