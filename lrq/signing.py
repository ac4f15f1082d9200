"""The key that signs batch files (HMAC-SHA256), so only lrq's own files are unpickled.

The key comes from ``secret`` in the config, else ``LRQ_SECRET``, else ``<data_dir>/secret.key``,
which the first process to need it creates (32 random bytes, mode 0600).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

DIGEST = hashlib.sha256
SIZE = DIGEST().digest_size
KEY_FILE = "secret.key"


def sign(key: bytes, data: bytes | memoryview) -> bytes:
    return hmac.new(key, data, DIGEST).digest()


def valid(key: bytes, data: bytes | memoryview, signature: bytes) -> bool:
    return hmac.compare_digest(sign(key, data), signature)


def load_key(secret: str | None, data_dir: Path, env: dict[str, str] | None = None) -> bytes:
    env = os.environ if env is None else env
    if secret:
        return secret.encode()
    if env.get("LRQ_SECRET"):
        return env["LRQ_SECRET"].encode()
    path = data_dir / KEY_FILE
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = secrets.token_hex(32).encode()
    tmp = data_dir / f".{KEY_FILE}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # first writer wins; a racing process reads the winner's key
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    return path.read_bytes()
