"""A batched JSON-lines sink for audit events, written by a thread of its own.

The relay's only cost is a list append.  The writer thread swaps the list out
every ``flush_interval``, turns events into records, encodes them in one call
and appends them to ``audit.jsonl``.  When the writer falls behind by
``max_pending`` events the sink reports itself congested and the relay stops
reading from clients until it has caught up: events are never dropped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import blake3
import msgspec

from scalple.events import StatementEvent
from scalple.records import AUDIT_FILE, SessionRecord, StatementRecord, to_session_record
from scalple.sink.base import Event
from scalple.sink.enrich import Enricher

__all__ = ["JsonLinesSink", "last_seq"]

log = logging.getLogger(__name__)

_LEAF_PREFIX = b"\x00"  # RFC 9162 leaf domain separation


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


class JsonLinesSink:
    """Appends one JSON object per event to ``<log_dir>/audit.jsonl``."""

    def __init__(
        self,
        log_dir: str | Path,
        *,
        enricher: Enricher,
        max_pending: int = 100_000,
        flush_interval: float = 0.005,
    ) -> None:
        self.path = Path(log_dir) / AUDIT_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._enricher = enricher
        self._seq = last_seq(self.path)
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - owned by the thread
        self._pending: list[Event] = []
        self._max_pending = max_pending
        self._interval = flush_interval
        self._encoder = msgspec.json.Encoder()
        self._stop = threading.Event()
        self._drained = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_congested: Callable[[], None] = _nothing
        self._on_drained: Callable[[], None] = _nothing
        self.congested = False
        self.submitted = 0
        self.written = 0
        self.statements: dict[str, int] = {}  # written, by status (for metrics)
        self.failed_writes = 0
        self._thread = threading.Thread(target=self._run, name="scalple-sink", daemon=True)
        self._thread.start()

    def submit(self, event: Event) -> None:
        """Queue one event; called on the event loop, must stay cheap."""
        pending = self._pending
        pending.append(event)
        self.submitted += 1
        if len(pending) >= self._max_pending and not self.congested:
            self.congested = True
            log.warning("audit writer is %d events behind: pausing client reads", len(pending))
            self._on_congested()

    def notify(
        self,
        loop: asyncio.AbstractEventLoop,
        on_congested: Callable[[], None],
        on_drained: Callable[[], None],
    ) -> None:
        """Tell ``loop`` when the relay must pause (and may resume) reading."""
        self._loop = loop
        self._on_congested = on_congested
        self._on_drained = on_drained

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._stop.wait(self._interval)
            self._write_pending()
        self._write_pending()
        self._drained.set()

    def _write_pending(self) -> None:
        batch, self._pending = self._pending, []  # atomic swap under the GIL
        if not batch:
            return
        data = self._encode(batch)
        while True:
            try:
                self._file.write(data)
                break
            except OSError as exc:
                # Disk full or I/O error: keep the batch and retry; the relay
                # is paused through congestion meanwhile, so nothing is lost.
                self.failed_writes += 1
                if not self.congested:
                    self.congested = True
                    if self._loop is not None:
                        self._loop.call_soon_threadsafe(self._on_congested)
                log.error("cannot write audit log %s: %s; retrying", self.path, exc)
                if self._stop.is_set():
                    log.critical("audit log unwritable at shutdown: %d events lost", len(batch))
                    return
                time.sleep(0.5)
        self.written += len(batch)
        counts = self.statements
        for event in batch:
            if type(event) is StatementEvent:
                counts[event.status] = counts.get(event.status, 0) + 1
        if self.congested and len(self._pending) < self._max_pending // 2:
            self.congested = False
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._on_drained)

    def _encode(self, batch: list[Event]) -> bytes:
        """Records for a batch, each with its seq and its leaf-hash log_id."""
        encode = self._encoder.encode
        lines: list[bytes] = []
        for event in batch:
            record: StatementRecord | SessionRecord
            if type(event) is StatementEvent:
                try:
                    record = self._enricher.record(event)
                except Exception:
                    # Never lose the statement: fall back to what the relay saw.
                    log.exception("building the record failed; writing it without analysis")
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

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until what was submitted so far is written (tests, shutdown)."""
        target = self.submitted
        deadline = time.monotonic() + timeout
        while self.written < target and time.monotonic() < deadline:
            time.sleep(self._interval)

    def close(self) -> None:
        """Write everything still queued, then stop the thread and close."""
        self._stop.set()
        self._drained.wait(30)
        self._thread.join(5)
        os.fsync(self._file.fileno())
        self._file.close()


def _nothing() -> None:
    """Flow-control callback before the relay registered its own."""
