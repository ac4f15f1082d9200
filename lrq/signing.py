"""The key that signs batch files (HMAC-SHA256), so only lrq's own files are unpickled.

The key comes from ``secret`` in the config, else ``LRQ_SECRET``, else ``<data_dir>/secret.key``,
which the first process to need it creates (32 random bytes, mode 0600). That file is read
only if it is a regular file and not empty (a FIFO there would hang every command);
anything else is a one-line :class:`~lrq.errors.ConfigError`.

Rotation: keys listed in ``previous_secrets`` (config) or ``LRQ_PREVIOUS_SECRETS``
(comma-separated, nothing stripped) still verify batch files; only the current key signs. Each file names its
key by a *key id* (:func:`key_id`, a short HMAC of a fixed string, which reveals nothing of
the key), so a file signed with a key lrq does not have is told apart from an altered one.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path

from lrq.errors import ConfigError, ForeignEntry
from lrq.regular import create_once, read_regular

DIGEST = hashlib.sha256
SIZE = DIGEST().digest_size
KEY_FILE = "secret.key"
KEY_ID_SIZE = 8
PREVIOUS_ENV = "LRQ_PREVIOUS_SECRETS"


def key_id(key: bytes) -> bytes:
    """A key's id in batch headers: the first 8 bytes of HMAC(key, a fixed string)."""
    return hmac.new(key, b"lrq batch-file key id", DIGEST).digest()[:KEY_ID_SIZE]


def previous_keys(secrets_: Iterable[str] = (), env: Mapping[str, str] | None = None) -> tuple[bytes, ...]:
    """Keys that still verify (rotation): the config's ``previous_secrets``, then
    ``LRQ_PREVIOUS_SECRETS`` split on commas. Nothing is stripped: a key is used exactly as
    ``secret`` or ``LRQ_SECRET`` gave it, so a secret with surrounding spaces or a newline
    can still be rotated out (write ``a,b``, not ``a, b``); empty entries are skipped."""
    env = os.environ if env is None else env
    listed = [*secrets_, *env.get(PREVIOUS_ENV, "").split(",")]
    return tuple(dict.fromkeys(s.encode() for s in listed if s))


def sign(key: bytes, data: bytes | memoryview) -> bytes:
    return hmac.new(key, data, DIGEST).digest()


def valid(key: bytes, data: bytes | memoryview, signature: bytes) -> bool:
    return hmac.compare_digest(sign(key, data), signature)


def load_key(secret: str | None, data_dir: Path, env: Mapping[str, str] | None = None) -> bytes:
    env = os.environ if env is None else env
    if secret:
        return secret.encode()
    if env.get("LRQ_SECRET"):
        return env["LRQ_SECRET"].encode()
    path = data_dir / KEY_FILE
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    create_once(path, secrets.token_hex(32).encode())  # a racing process's may win: read it
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    """The key file's bytes, read like a batch file (:func:`lrq.regular.read_regular`): a FIFO
    there would otherwise hang every command, and an empty key would sign with nothing."""
    fix = "put the key back as a regular file, or set `secret` in the config (or LRQ_SECRET)"
    try:
        key = read_regular(path)
    except ForeignEntry as e:
        raise ConfigError(f"{path}: the batch-signing key file is {e.what}; {fix}") from None
    if not key:
        raise ConfigError(f"{path}: the batch-signing key file is empty; {fix}")
    return key
