"""Per-segment postings: which records of a segment name a person, a table,
a data subject.

Built while the segment is written, stored beside it when it is sealed.  A
search opens only the postings of the segments the catalog says overlap its
time range: nothing global grows with the log.  The postings hold record
ordinals within the segment (0 = the segment's first record), ascending.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from scalple.records import SessionRecord, StatementRecord

__all__ = ["IndexBuilder", "SegmentIndex", "read_index"]


class SegmentIndex(msgspec.Struct, array_like=True):
    """The stored postings of one sealed segment."""

    version: int
    origin: str
    segment: int
    first_index: int
    count: int
    users: dict[str, list[int]]
    tables: dict[str, list[int]]
    subjects: dict[str, list[int]]
    first_seq: int = 0
    last_seq: int = 0
    first_ts: str = ""
    last_ts: str = ""


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(SegmentIndex).decode


class IndexBuilder:
    """Collects postings record by record as the segment grows."""

    def __init__(self, origin: str, segment: int, first_index: int) -> None:
        self.origin = origin
        self.segment = segment
        self.first_index = first_index
        self.count = 0
        self.users: dict[str, list[int]] = {}
        self.tables: dict[str, list[int]] = {}
        self.subjects: dict[str, list[int]] = {}
        self.first_seq = 0
        self.last_seq = 0
        self.first_ts = ""
        self.last_ts = ""

    def add(self, record: StatementRecord | SessionRecord) -> None:
        ordinal = self.count
        self.count += 1
        if not self.first_seq:
            self.first_seq = record.seq
            self.first_ts = record.ts
        self.last_seq = record.seq
        self.last_ts = max(self.last_ts, record.ts)
        user = record.session_user_id
        if user is not None:
            _post(self.users, user, ordinal)
        if type(record) is StatementRecord:
            for table in record.affected_tables:
                _post(self.tables, table, ordinal)
            for tag in getattr(record, "subjects", None) or ():
                _post(self.subjects, tag, ordinal)

    def build(self) -> SegmentIndex:
        return SegmentIndex(
            version=1,
            origin=self.origin,
            segment=self.segment,
            first_index=self.first_index,
            count=self.count,
            users=self.users,
            tables=self.tables,
            subjects=self.subjects,
            first_seq=self.first_seq,
            last_seq=self.last_seq,
            first_ts=self.first_ts,
            last_ts=self.last_ts,
        )

    def encode(self) -> bytes:
        return _encode(self.build())


def _post(postings: dict[str, list[int]], key: str, ordinal: int) -> None:
    entries = postings.get(key)
    if entries is None:
        postings[key] = [ordinal]
    elif entries[-1] != ordinal:
        entries.append(ordinal)


def read_index(path: Path) -> SegmentIndex:
    """A sealed segment's postings; raises ValueError when unreadable."""
    try:
        return _decode(path.read_bytes())
    except msgspec.DecodeError as exc:
        raise ValueError(f"{path}: unreadable index ({exc})") from None
