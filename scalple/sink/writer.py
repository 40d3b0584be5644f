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
from scalple.records import AUDIT_FILE, SessionRecord, StatementRecord, to_session_record
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
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - (1 << 16)))
            tail = handle.read()
    except FileNotFoundError:
        return 0
    for line in reversed(tail.split(b"\n")):
        if not line.strip():
            continue
        try:
            record = msgspec.json.decode(line)
        except msgspec.DecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("seq"), int):
            return int(record["seq"])
    return 0


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
        data = self._records(batch)
        while True:
            try:
                self._file.write(data)
                break
            except OSError as exc:
                self.failed_writes += 1
                log.error("cannot write audit log %s: %s; retrying", self.path, exc)
                time.sleep(_RETRY_SECONDS)
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
            record: StatementRecord | SessionRecord
            if type(event) is StatementEvent:
                try:
                    record = self._enricher.record(event)
                except Exception as exc:
                    # Never lose the statement: fall back to what the relay saw.
                    log.error("building the record failed (%s); writing it bare", where(exc))
                    record = self._enricher.bare_record(event)
            else:
                record = to_session_record(event)  # type: ignore[arg-type]
            self._seq += 1
            record.seq = self._seq
            digest = blake3.blake3(_LEAF_PREFIX + encode(record)).hexdigest()
            record.log_id = "immutable-" + digest[:16]
            lines.append(encode(record))
        lines.append(b"")
        return b"\n".join(lines)

    def close(self) -> None:
        os.fsync(self._file.fileno())
        self._file.close()
