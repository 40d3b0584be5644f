"""The segment catalog: a small SQLite table of every sealed segment.

One row per sealed segment of every origin in the log directory: its record
and time ranges and the digests of its files.  It is how a search picks the
few segments worth opening, and how ``verify`` notices a segment that was
replaced or removed outside retention.  It is a convenience, not evidence:
the segments and signed checkpoints are; ``verify`` checks it against them.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec

from scalple.store.layout import CATALOG_FILE

__all__ = ["Catalog", "SegmentEntry"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS segments (
    origin TEXT NOT NULL,
    number INTEGER NOT NULL,
    first_index INTEGER NOT NULL,
    count INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    first_ts TEXT NOT NULL,
    last_ts TEXT NOT NULL,
    segment_digest TEXT NOT NULL,
    index_digest TEXT NOT NULL,
    sealed_ns INTEGER NOT NULL,
    removed_ns INTEGER,
    PRIMARY KEY (origin, number)
);
CREATE INDEX IF NOT EXISTS segments_time ON segments (first_ts, last_ts);
"""


class SegmentEntry(msgspec.Struct, frozen=True):
    """One catalog row."""

    origin: str
    number: int
    first_index: int
    count: int
    first_seq: int
    last_seq: int
    first_ts: str
    last_ts: str
    segment_digest: str
    index_digest: str
    sealed_ns: int
    removed_ns: int | None = None


class Catalog:
    """The catalog of one log directory; safe to open from several processes."""

    def __init__(self, log_dir: Path, *, readonly: bool = False) -> None:
        self.path = log_dir / CATALOG_FILE
        if readonly:
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
        else:
            self._db = sqlite3.connect(self.path, timeout=10)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)

    def add(self, entry: SegmentEntry) -> None:
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO segments VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                msgspec.structs.astuple(entry),
            )

    def mark_removed(self, origin: str, number: int) -> None:
        with self._db:
            self._db.execute(
                "UPDATE segments SET removed_ns = ? WHERE origin = ? AND number = ?",
                (time.time_ns(), origin, number),
            )

    def entries(self, origin: str | None = None) -> Iterator[SegmentEntry]:
        query = "SELECT * FROM segments"
        args: tuple[str, ...] = ()
        if origin is not None:
            query += " WHERE origin = ?"
            args = (origin,)
        for row in self._db.execute(query + " ORDER BY origin, number", args):
            yield SegmentEntry(*row)

    def close(self) -> None:
        self._db.close()
