"""Writing records: enrich each event, number it, hash it, append it.

Runs inside the audit worker process (scalple/sink/worker.py), never in the
proxy's: enrichment parses SQL, and the proxy's GIL belongs to the relay.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import blake3
import msgspec

from scalple.events import StatementEvent
from scalple.logsafe import where
from scalple.records import AUDIT_FILE, SessionRecord, StatementRecord, rfc3339, to_session_record
from scalple.sink.base import Event
from scalple.sink.enrich import Enricher

__all__ = ["RecordWriter", "last_seq"]

log = logging.getLogger(__name__)

_LEAF_PREFIX = b"\x00"  # RFC 9162 leaf domain separation
_RETRY_SECONDS = 0.5


def last_seq(path: Path) -> int:
    """The ``seq`` of the last whole record in ``path`` (0 when none).

    A torn last line (a crash mid-write) is skipped: sequence numbers are
    never reused, so the writer continues after the last whole record.
    """
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return 0
    with handle:
        size = handle.seek(0, os.SEEK_END)
        window = 1 << 16
        while True:
            # Grow the window until it holds a whole line (records can be
            # larger than any fixed window: a query up to capture_limit).
            start = max(0, size - window)
            handle.seek(start)
            lines = handle.read(size - start).split(b"\n")
            if start > 0:
                lines = lines[1:]  # the first piece may be a line's tail
            for line in reversed(lines):
                if not line.strip():
                    continue
                try:
                    record = msgspec.json.decode(line)
                except msgspec.DecodeError:
                    continue  # a torn line
                if isinstance(record, dict) and isinstance(record.get("seq"), int):
                    return int(record["seq"])
            if start == 0:
                return 0
            window *= 4


class RecordWriter:
    """Appends records to ``<log_dir>/audit.jsonl``."""

    def __init__(self, log_dir: str | Path, enricher: Enricher) -> None:
        self.path = Path(log_dir) / AUDIT_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._enricher = enricher
        self._seq = last_seq(self.path)
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - owned by this writer
        self._encode = msgspec.json.Encoder().encode
        self.failed_writes = 0

    def write(self, batch: list[Event]) -> dict[str, int]:
        """Append a batch; returns its statements counted by status.

        On a write error (disk full, I/O error) the batch is kept and retried
        until it is written: the proxy has stopped reading from clients
        meanwhile, because this batch is not acknowledged.
        """
        data = memoryview(self._records(batch))
        while data:
            try:
                written = self._file.write(data)  # raw file: may write only part
            except OSError as exc:
                self.failed_writes += 1
                log.error("cannot write audit log %s: %s; retrying", self.path, exc.strerror)
                time.sleep(_RETRY_SECONDS)
                continue
            data = data[written or 0 :]
        counts: dict[str, int] = {}
        for event in batch:
            if type(event) is StatementEvent:
                counts[event.status] = counts.get(event.status, 0) + 1
        return counts

    def _records(self, batch: list[Event]) -> bytes:
        """Records for a batch, each with its seq and its leaf-hash log_id."""
        encode = self._encode
        lines: list[bytes] = []
        for event in batch:
            record = self._record(event)
            self._seq += 1
            record.seq = self._seq
            digest = blake3.blake3(_LEAF_PREFIX + encode(record)).hexdigest()
            record.log_id = "immutable-" + digest[:16]
            lines.append(encode(record))
        lines.append(b"")
        return b"\n".join(lines)

    def _record(self, event: Event) -> StatementRecord | SessionRecord:
        """The record for one event; never raises, so no batch can poison
        the worker (a restart would resend it and fail again)."""
        try:
            if type(event) is StatementEvent:
                try:
                    return self._enricher.record(event)
                except Exception as exc:
                    # Never lose the statement: fall back to what the relay saw.
                    log.error("building the record failed (%s); writing it bare", where(exc))
                    return self._enricher.bare_record(event)
            return to_session_record(event)  # type: ignore[arg-type]
        except Exception as exc:
            log.error("event could not be rendered (%s); writing a stub", where(exc))
            return SessionRecord(
                kind="unrenderable_event",
                ts=rfc3339(time.time_ns()),
                session_id=None,
                client_addr="",
                db_role=None,
                database=None,
                reason=f"event of type {type(event).__name__} could not be rendered: {where(exc)}",
            )

    def close(self) -> None:
        os.fsync(self._file.fileno())
        self._file.close()
