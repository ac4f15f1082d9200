"""Result tables as ORM models lrq can store into.

:class:`DocEntMap` is the original system's table; ``doc_id`` is unique here (it was only
indexed in the original), so a replayed batch adds nothing. :class:`AccessLine` holds the
parsed Apache access lines of :func:`workers.apache.parse`.
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Integer, String, Text, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class DocEntMap(Base):
    __tablename__ = "doc_ent_map"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    doc_id: Mapped[str] = mapped_column(String(50), unique=True, index=True)
    ent_list_str: Mapped[str] = mapped_column(Text, default="")
    mapped_list_str: Mapped[str] = mapped_column(Text, default="")
    create_time: Mapped[datetime] = mapped_column(DateTime, server_default=func.now(), index=True)


class AccessLine(Base):
    """One Apache combined-format access line (:func:`workers.apache.parse`).

    ``id`` is the log source's item key ("dev:inode:tag:offset"), unique so a replayed batch adds
    nothing. ``ts`` is the request time in epoch seconds (UTC), an integer rather than a
    DateTime: it is the same on SQLite, PostgreSQL and MariaDB (no time-zone or fractional
    second conversions) and the windows of :mod:`workers.apache` are computed on it. ``url``,
    ``referer`` and ``agent`` are Text: URLs of several kilobytes occur (scanners, tracking
    parameters) and a longer value must not be refused by the database.
    """

    __tablename__ = "access_lines"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    remote: Mapped[str] = mapped_column(String(255), index=True)
    remote_user: Mapped[str] = mapped_column(String(255), default="")
    ts: Mapped[int] = mapped_column(BigInteger, index=True)
    method: Mapped[str] = mapped_column(String(32), default="")
    url: Mapped[str] = mapped_column(Text, default="")
    protocol: Mapped[str] = mapped_column(String(32), default="")
    status: Mapped[int] = mapped_column(Integer, index=True)
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    referer: Mapped[str] = mapped_column(Text, default="")
    agent: Mapped[str] = mapped_column(Text, default="")
