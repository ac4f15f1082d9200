"""The optional ``replace_dead`` field of a batch file (``lrq retry-dead``): written only when
set, read back as False from files without it (files written before it existed)."""
from __future__ import annotations

import pickle
from pathlib import Path

from lrq import signing
from lrq.spool import MAGIC, Spool
from lrq.spool.batchfile import MAGIC_V2


def _spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path, "docs", key=b"k" * 32, compress="none").ensure()


def test_a_batch_file_without_the_field_loads_as_an_ordinary_batch(tmp_path: Path) -> None:
    sp = _spool(tmp_path)
    name = sp.new_name()
    body = {"name": name, "queue": "docs", "created": 1.0, "position": 7,
            "items": [{"id": 1}]}  # the format before replace_dead
    payload = bytes([0]) + pickle.dumps(body)
    (sp.left / f"{name}.pkl").write_bytes(MAGIC_V2 + signing.sign(sp.key, payload) + payload)
    batch = sp.load(name)
    assert (batch.items, batch.position, batch.replace_dead) == ([{"id": 1}], 7, False)


def test_publish_marks_retry_batches_and_leaves_others_as_before(tmp_path: Path) -> None:
    sp = _spool(tmp_path)
    plain = sp.publish([{"id": 1}], position=3)
    retry = sp.publish([{"id": 2}], replace_dead=True)
    assert not sp.load(plain).replace_dead and sp.load(retry).replace_dead
    raw = (sp.left / f"{plain}.pkl").read_bytes()
    body = pickle.loads(raw[len(MAGIC) + signing.KEY_ID_SIZE + signing.SIZE + 1:])
    assert set(body) == {"name", "queue", "created", "position", "items"}
