"""The original system's results table, as an ORM model lrq can store into.

``doc_id`` is unique here (it was only indexed in the original), so a replayed batch adds
nothing.
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Integer, String, Text, func
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
