"""Batch files as bytes: the format's header, its signature check and codecs.
:mod:`lrq.spool`'s docstring specifies the format; this module encodes and checks it
without knowing about folders (reading only regular files is :mod:`lrq.spool.files`').
"""
from __future__ import annotations

import threading
import zlib
from collections.abc import Callable
from typing import Any

from lrq import signing

MAGIC = b"LRQ3\n"
#: The format before key ids (still read, no longer written): magic, HMAC, codec, body.
MAGIC_V2 = b"LRQ2\n"
HEADER = len(MAGIC) + signing.KEY_ID_SIZE + signing.SIZE
#: Batch-file codecs (the byte after the signature). zstd is the default: on sample batches
#: it keeps 26% of the pickle at ~300 MB/s (bench/compression.py); zlib needs 2.3x the CPU.
CODECS = {"none": 0, "zlib": 1, "zstd": 2}
#: zstd's level. Level 1 would save 20% of the compress CPU at batch 100 (63 against 79 µs on
#: W1, 10% at batch 1000) for 7-9% more bytes; the disk budget is in bytes, so 3 stays.
ZSTD_LEVEL = 3

#: One zstd compressor and decompressor per thread, made on first use: building them costs
#: 10-15% of compressing a 100-item batch, and a zstandard object must not be shared
#: between threads.
_zstd = threading.local()


def seal(key: bytes, kid: bytes, payload: bytes) -> bytes:
    """A batch file around ``payload`` (codec byte + body), signed with ``key`` (id ``kid``)."""
    return MAGIC + kid + signing.sign(key, payload) + payload


def key_id_in(data: bytes) -> str:
    """The key id an LRQ3 file names, in hex."""
    return data[len(MAGIC):HEADER - signing.SIZE].hex()


def check(data: bytes, keys: dict[bytes, bytes], seen: Callable[[], set[bytes]]) -> tuple[str, int]:
    """Check a batch file's signature without unpickling it: (verdict, payload start).

    ``keys`` are the keys that verify, by key id; ``seen()`` the ids of every key the data
    dir has signed with. Verdicts: ``ok``; ``altered`` (its key is ours, the HMAC fails);
    ``other-key`` (a key the data dir signed with but ``keys`` lacks: the key changed);
    ``stranger`` (a key id never used there); ``unverified`` (an LRQ2 file no key verifies:
    it cannot say which key wrote it); ``foreign`` (bad magic or a truncated header)."""
    view = memoryview(data)
    if data.startswith(MAGIC) and len(data) > HEADER:
        kid = data[len(MAGIC):len(MAGIC) + signing.KEY_ID_SIZE]
        key = keys.get(kid)
        if key is None:
            return ("other-key" if kid in seen() else "stranger"), HEADER
        ok = signing.valid(key, view[HEADER:], data[HEADER - signing.SIZE:HEADER])
        return ("ok" if ok else "altered"), HEADER
    start = len(MAGIC_V2) + signing.SIZE
    if data.startswith(MAGIC_V2) and len(data) > start:
        ok = any(signing.valid(k, view[start:], data[len(MAGIC_V2):start]) for k in keys.values())
        return ("ok" if ok else "unverified"), start
    return "foreign", 0


def compress(codec: int, data: bytes) -> bytes:
    if codec == 1:
        return zlib.compress(data, 1)
    if codec == 2:
        return _zstd_pair()[0].compress(data)
    return data


def decompress(codec: int, data: memoryview) -> bytes | memoryview:
    if codec == 0:
        return data
    if codec == 1:
        return zlib.decompress(data)
    if codec == 2:
        return _zstd_pair()[1].decompress(data)
    raise ValueError(f"unknown codec byte {codec}")


def _zstd_pair() -> tuple[Any, Any]:
    """This thread's (compressor, decompressor); zstandard is imported on first use only."""
    pair = getattr(_zstd, "pair", None)
    if pair is None:
        import zstandard

        pair = _zstd.pair = (zstandard.ZstdCompressor(level=ZSTD_LEVEL), zstandard.ZstdDecompressor())
    return pair
