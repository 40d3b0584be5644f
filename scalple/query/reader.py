"""Reading the audit log back: every command that looks at records goes
through here (or through scalple/store for proofs), so no reader needs to
know the segment format.

Reading checks each frame's stored hash: a frame that does not match is not
shown, and the segment is read no further (``scalple verify`` says why).
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from scalple.config import ConfigError, parse_duration
from scalple.records import decode_record, record_dict
from scalple.store import layout
from scalple.store.segment import SegmentError, frame_end, read_file_header, scan_frames

__all__ = ["LogReader", "StoredRecord", "parse_time", "segment_records", "stored_records"]

log = logging.getLogger(__name__)


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """A point in time from the command line.

    Accepts RFC 3339 / ISO 8601 (``2026-05-01``, ``2026-05-01T10:00:00Z``;
    a time without zone is UTC) or an age relative to now: ``90s``, ``15m``,
    ``12h``, ``7d``.
    """
    text = text.strip()
    if text[-1:].isalpha() and text[:-1].replace(".", "", 1).isdigit():
        try:
            seconds = parse_duration(text)
        except ConfigError:
            pass
        else:
            return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"cannot read {text!r} as a time: use 2026-05-01, 2026-05-01T10:00:00Z or 7d"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _stamp(when: datetime) -> str:
    """The record ``ts`` form, so that times compare as strings."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class StoredRecord:
    """A record with where it is stored: its leaf index and hash."""

    __slots__ = ("digest", "end", "index", "payload", "record", "segment")

    def __init__(
        self, record: dict[str, Any], index: int, digest: bytes, segment: int, payload: bytes
    ) -> None:
        self.record = record
        self.index = index
        self.digest = digest
        self.segment = segment
        self.payload = payload
        self.end = 0  # byte offset after it in its segment


def segment_records(path: Path, number: int, offset: int = 0) -> Iterator[StoredRecord]:
    """The intact records of one segment from byte ``offset`` (0: the first),
    each with the offset after it; stops at the first incomplete or damaged
    frame.  Leaf indexes are known only when reading from the first record
    (-1 otherwise: following the log needs none)."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return  # removed by retention meanwhile
    with handle:
        try:
            header, start = read_file_header(handle, path)
        except SegmentError as exc:
            log.warning("%s", exc)
            return
        begin = max(start, offset)
        handle.seek(begin)
        data = handle.read()
    index = header.first_index if begin == start else -1
    for item in scan_frames(data, 0):
        if not item.intact:
            log.warning(
                "%s: damaged record at byte %d; run scalple verify", path, begin + item.offset
            )
            return
        try:
            record = decode_record(item.payload)
        except Exception:
            log.warning(
                "%s: unreadable record at byte %d; run scalple verify", path, begin + item.offset
            )
            return
        record.log_id = "immutable-" + item.digest.hex()[:16]
        stored = StoredRecord(record_dict(record), index, item.digest, number, item.payload)
        stored.end = begin + frame_end(item)
        yield stored
        if index >= 0:
            index += 1


def stored_records(origin_dir: Path) -> Iterator[StoredRecord]:
    """Every readable record of one origin, in log order."""
    for number in layout.segment_numbers(origin_dir):
        yield from segment_records(layout.segment_path(origin_dir, number), number)


class LogReader:
    """Records of one log directory (all origins), oldest first."""

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        if not self.log_dir.is_dir():
            raise FileNotFoundError(f"no audit log directory {self.log_dir}")

    def records(
        self,
        *,
        kinds: frozenset[str] | None = frozenset({"statement"}),
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Matching records; ``since`` is inclusive, ``until`` exclusive."""
        low = _stamp(since) if since else None
        high = _stamp(until) if until else None
        streams = [
            (s.record for s in stored_records(directory))
            for directory in layout.origin_dirs(self.log_dir)
        ]
        merged = (
            streams[0]
            if len(streams) == 1
            else heapq.merge(*streams, key=lambda record: str(record.get("ts", "")))
        )
        for record in merged:
            if kinds is not None and record.get("kind") not in kinds:
                continue
            ts = record.get("ts", "")
            if (low is not None and ts < low) or (high is not None and ts >= high):
                continue
            yield record

    def follow(
        self, *, kinds: frozenset[str] | None = frozenset({"statement"}), poll: float = 0.2
    ) -> Iterator[dict[str, Any]]:
        """New records as they are appended (every origin), until interrupted."""
        positions: dict[Path, tuple[int, int]] = {}  # origin dir -> (segment, offset)
        for directory in layout.origin_dirs(self.log_dir):
            numbers = layout.segment_numbers(directory)
            path = layout.segment_path(directory, numbers[-1])
            positions[directory] = (numbers[-1], path.stat().st_size)
        while True:
            found = False
            for directory in layout.origin_dirs(self.log_dir):
                number, offset = positions.get(directory, (0, 0))
                numbers = [n for n in layout.segment_numbers(directory) if n >= number]
                for current in numbers:
                    path = layout.segment_path(directory, current)
                    start = offset if current == number else 0
                    for stored in segment_records(path, current, start):
                        found = True
                        offset = stored.end
                        if kinds is None or stored.record.get("kind") in kinds:
                            yield stored.record
                    if current != numbers[-1]:
                        offset = 0
                    number = current
                positions[directory] = (number, offset)
            if not found:
                time.sleep(poll)
