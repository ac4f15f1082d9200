"""Credentials out of everything lrq shows: errors, logs, ``lrq status`` (plain and JSON).

Every source kind and the results database take URLs that may carry a password
(``postgresql://lrq:pw@db/lrq``, ``redis://:pw@host:6379/0``, ``http://user:pw@agent``) and
client options that hold secrets (Kafka's ``sasl.password``, ``ssl.key.password``). lrq never
needs to show them, so:

- :func:`redact` hides the password of one URL (``scheme://user:***@host``) and the values of
  secret query parameters (``?password=***``), whatever the scheme;
- :func:`redact_options` hides the values of secret options in a client's option table;
- :func:`redact_text` does :func:`redact` on every URL inside a message (a driver's error, a
  traceback) and hides ``password=...`` pairs as a libpq connection string writes them;
- :func:`redact_value` is :func:`redact_text` for any config value (strings, tables, lists);
- :func:`scrub` hides known secrets wherever they appear in a message, for secrets a client
  may quote bare (``AUTH p@ss failed``), where no URL or ``password=`` marks them:
  :func:`url_secrets` gives a URL's, a kind gives its secret options' values;
- :class:`RedactingFormatter` runs every log line through :func:`redact_text`, so a URL a
  library puts into an exception message cannot reach the log file by a path lrq forgot.

Redaction errs on the side of hiding: the user part of a URL ends at the *last* ``@`` before
the query, so a password holding an unencoded ``@`` or ``/`` is hidden whole.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

#: What a hidden value is shown as.
MASK = "***"

#: Option and query-parameter names whose values are secrets: Kafka's ``sasl.password``,
#: ``ssl.key.password``, ``ssl.keystore.password``, ``sasl.oauthbearer.client.secret``,
#: ``sasl.oauthbearer.config``, ``ssl.key.pem``; redis-py's ``password``; libpq's
#: ``password``/``passfile`` is not a secret but ``sslpassword`` is.
_SECRET_NAME = re.compile(r"pass(word|wd)?$|pwd$|secret|token|credential|api[._-]?key|"
                          r"private|\.pem$|oauthbearer\.config|jaas\.config|^auth$", re.I)

#: ``scheme://`` then the rest of the URL up to whitespace or a quote (as it sits in a message).
_URL = re.compile(r"\b([A-Za-z][A-Za-z0-9+.\-]*://)([^\s'\"<>]*)")
#: ``password=value`` as libpq and other drivers write connection parameters in messages.
_PAIR = re.compile(r"(\b(?:password|passwd|pwd|sasl\.password|sslpassword)\s*[=:]\s*)"
                   r"('[^']*'|\"[^\"]*\"|[^\s,;&'\"]+)", re.I)


def is_secret(name: str) -> bool:
    """True for an option or parameter name whose value must never be shown."""
    return bool(_SECRET_NAME.search(name))


def redact(url: str) -> str:
    """``url`` with its password (``user:pw@``) and secret query parameters replaced by
    ``***``; anything that is not a URL comes back unchanged."""
    m = _URL.match(url)
    if m is None:
        return url
    return _redact_rest(m.group(1), m.group(2)) + url[m.end():]


def _redact_rest(scheme: str, rest: str) -> str:
    end = len(rest)
    for stop in ("?", "#"):
        i = rest.find(stop)
        if i != -1:
            end = min(end, i)
    authority_and_path, tail = rest[:end], rest[end:]
    at = authority_and_path.rfind("@")
    if at != -1:
        userinfo = authority_and_path[:at]
        user, colon, _password = userinfo.partition(":")
        if colon:
            authority_and_path = f"{user}:{MASK}{authority_and_path[at:]}"
    if tail.startswith("?"):
        tail = _redact_query(tail)
    return scheme + authority_and_path + tail


def _redact_query(tail: str) -> str:
    query, hash_, fragment = tail[1:].partition("#")
    parts = []
    for part in query.split("&"):
        name, eq, _value = part.partition("=")
        parts.append(f"{name}={MASK}" if eq and is_secret(name) else part)
    return "?" + "&".join(parts) + hash_ + fragment


def redact_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a client's option table (or of any report, such as ``lrq status``) fit to
    show: secret options' values hidden, URLs and ``password=`` pairs in strings redacted,
    nested tables and lists likewise."""
    return {name: MASK if is_secret(str(name)) else redact_value(value)
            for name, value in options.items()}


def redact_value(value: Any) -> Any:
    """A config value fit to show in an error: strings through :func:`redact_text`, tables
    through :func:`redact_options`, lists item by item, anything else as it is."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return redact_options(value)
    if isinstance(value, (list, tuple)):
        return [redact_value(v) for v in value]
    return value


def redact_text(text: str) -> str:
    """``text`` (an error message, a log line) with every URL in it redacted and
    ``password=...`` pairs hidden. Cheap when there is nothing to hide (no ``://``, no
    ``pass``/``pwd``): one substring test each."""
    if "://" in text:
        text = _URL.sub(_redact_match, text)
    lower = text.lower()
    if "pass" in lower or "pwd" in lower:
        text = _PAIR.sub(_redact_pair, text)
    return text


def _redact_match(m: re.Match[str]) -> str:
    """A URL found in a message; punctuation after it (``url: error``) is not part of it."""
    rest = m.group(2)
    kept = rest.rstrip(".,;:)]}")
    return _redact_rest(m.group(1), kept) + rest[len(kept):]


def _redact_pair(m: re.Match[str]) -> str:
    """``password=value``; one a URL's redaction already hid (``=***:``) stays as it is."""
    if m.group(2).rstrip(".,;:)]}") == MASK:
        return m.group(0)
    return m.group(1) + MASK


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of each of ``secrets`` replaced by ``***`` (empty
    ones ignored: they would match everywhere)."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text


def url_secrets(url: str) -> list[str]:
    """The passwords in ``url`` (its ``user:password@`` and secret query parameters), each
    as written and percent-decoded, for :func:`scrub`; [] for a URL that does not parse."""
    try:
        parts = urlsplit(url)
        found = [parts.password or ""]
    except ValueError:
        return []
    found += [v for k, v in parse_qsl(parts.query) if is_secret(k)]
    return [s for p in found if p for s in {p, unquote(p)}]


class RedactingFormatter(logging.Formatter):
    """A log formatter whose lines (message, traceback and all) pass :func:`redact_text`."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))
