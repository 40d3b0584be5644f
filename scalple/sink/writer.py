"""From events to stored records, under the configured failure policy.

Runs inside the audit worker process (scalple/sink/worker.py), never in the
proxy's: enrichment parses SQL, and the proxy's GIL belongs to the relay.
The store (scalple/store/writer.py) numbers, hashes and appends; this module
decides what happens when it cannot: ``[log] on_failure = "block"`` keeps
the records and retries (the proxy refuses new statements meanwhile),
``"continue"`` counts them as lost and writes a ``records_lost`` record as
soon as the store works again.  Nothing is lost without a trace.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from scalple.config import Config
from scalple.events import SessionInfo, StatementEvent
from scalple.logsafe import where
from scalple.query.reader import segment_records
from scalple.records import (
    SessionRecord,
    StatementRecord,
    record_dict,
    rfc3339,
    to_session_record,
)
from scalple.sink.base import Event
from scalple.sink.enrich import Enricher
from scalple.store import layout
from scalple.store.writer import StoreError, StoreWriter, open_signing_key

__all__ = ["RecordWriter"]

log = logging.getLogger(__name__)

_RETRY_SECONDS = 0.2

Record = StatementRecord | SessionRecord


class RecordWriter:
    """Builds records for event batches and appends them to the store."""

    def __init__(self, config: Config, enricher: Enricher) -> None:
        self.store = StoreWriter(config.log, open_signing_key(config.log))
        self._enricher = enricher
        self._continue = config.log.on_failure == "continue"
        self.failed_writes = 0  # attempts that failed (either policy)
        self.lost = 0  # records given up (on_failure = "continue" only)
        self._lost_since: tuple[int, str, str] | None = None  # count, first ts, why
        # Why appending, and why fsyncing, fails while it does: kept apart,
        # since the loop appends and the syncer fsyncs, and one succeeding
        # says nothing of the other.
        self._write_failure: str | None = None
        self._sync_failure: str | None = None
        self._state_lock = threading.Lock()
        self._recent: set[tuple[object, ...]] | None = None  # built on the first resend

    def write(
        self, batch: list[Event], on_failing: Callable[[str | None], None], *, resent: bool = False
    ) -> dict[str, int]:
        """Store a batch; returns its statements counted by status.

        ``on_failing`` is told when the store starts and stops failing, so the
        proxy can refuse statements (block) or count losses (continue).  A
        ``resent`` batch (the worker before this one died before confirming
        it) is stored without the records the log already holds.
        """
        records = [self._record(event) for event in batch]
        if resent:
            stored = self._stored_keys()
            kept = [r for r in records if _identity_of(record_dict(r)) not in stored]
            if len(kept) != len(records):
                log.warning(
                    "a resent batch: %d of its %d records were already stored",
                    len(records) - len(kept),
                    len(records),
                )
            records = kept
        while True:
            try:
                pending = self._lost_since
                if pending is not None:
                    self.store.append([self._lost_marker(pending)])
                    self._reported(pending)
                self.store.append(records)
            except StoreError as exc:
                self._set_failure("write", str(exc), on_failing)
                if self._continue:
                    self._lose(records, str(exc))
                    break
                log.error("%s; %d records held, retrying", exc, len(records))
                time.sleep(_RETRY_SECONDS)
                continue
            self._set_failure("write", None, on_failing)
            break
        counts: dict[str, int] = {}
        for event in batch:
            if type(event) is StatementEvent:
                counts[event.status] = counts.get(event.status, 0) + 1
        return counts

    def sync(self, on_failing: Callable[[str | None], None]) -> None:
        """fsync, retrying (block) or giving up loudly (continue).

        Giving up counts the records written since the last good fsync as
        lost (after a failed fsync the kernel may have dropped them) and
        queues a ``records_lost`` record saying so; they may yet be in the
        log, but nothing may claim they are.
        """
        while True:
            at_risk = self.store.unsynced
            try:
                self.store.sync()
            except StoreError as exc:
                log.critical("%s", exc)
                self._set_failure("sync", str(exc), on_failing)
                if self._continue:
                    self._lose_unsynced(at_risk, str(exc))
                    return
                time.sleep(_RETRY_SECONDS)
                continue
            self._set_failure("sync", None, on_failing)
            return

    @property
    def failing(self) -> str | None:
        """Why the store cannot write, while it cannot."""
        return self._write_failure or self._sync_failure

    def _set_failure(
        self, what: str, reason: str | None, on_failing: Callable[[str | None], None]
    ) -> None:
        with self._state_lock:
            before = self.failing
            if reason is not None:
                self.failed_writes += 1
            if what == "write":
                self._write_failure = reason
            else:
                self._sync_failure = reason
            after = self.failing
        if (before is None) != (after is None):
            if after is None:
                log.warning("the audit log is writable again")
            on_failing(after)

    def _lose_unsynced(self, count: int, reason: str) -> None:
        if count <= 0:
            return
        self._count_lost(count, rfc3339(time.time_ns()), f"fsync failed: {reason}")
        log.critical(
            "AUDIT RECORDS AT RISK: fsync failed (%s); %d records written since the last "
            "good fsync may be lost ([log] on_failure = continue)",
            reason,
            count,
        )

    def _stored_keys(self) -> set[tuple[object, ...]]:
        """What identifies the records of the newest two segments (a batch
        the previous worker wrote before dying is in there)."""
        if self._recent is None:
            directory = self.store.dir
            numbers = layout.segment_numbers(directory)[-2:]
            self._recent = {
                _identity_of(stored.record)
                for number in numbers
                for stored in segment_records(layout.segment_path(directory, number), number)
            }
        return self._recent

    def _lose(self, records: list[Record], reason: str) -> None:
        count = len(records)
        self._count_lost(count, records[0].ts if records else rfc3339(time.time_ns()), reason)
        log.critical(
            "AUDIT RECORDS LOST: %d records could not be written (%s); %d lost so far "
            "([log] on_failure = continue)",
            count,
            reason,
            self.lost,
        )

    def _count_lost(self, count: int, first: str, reason: str) -> None:
        """Add to the losses the next ``records_lost`` record will report."""
        with self._state_lock:
            self.lost += count
            if self._lost_since is None:
                self._lost_since = (count, first, reason)
            else:
                total, since, why = self._lost_since
                self._lost_since = (total + count, since, why)

    def _reported(self, pending: tuple[int, str, str]) -> None:
        """A marker for ``pending`` is written: keep only losses since."""
        with self._state_lock:
            current = self._lost_since
            if current is pending:
                self._lost_since = None
            elif current is not None:
                self._lost_since = (current[0] - pending[0], current[1], current[2])

    def _lost_marker(self, pending: tuple[int, str, str]) -> SessionRecord:
        """The record that says how many records are missing, and since when."""
        count, first, reason = pending
        return SessionRecord(
            kind="records_lost",
            ts=rfc3339(time.time_ns()),
            session_id=None,
            client_addr="",
            db_role=None,
            database=None,
            statements=count,
            reason=f"{count} records from {first} on could not be written: {reason}",
        )

    def _record(self, event: Event) -> Record:
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
            if type(event) is SessionInfo:
                self._enricher.prefetch(event.database, event.db_role)
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

    def take_subject_maps(self) -> list[object]:
        """Subject-column maps for the proxy, computed since the last call."""
        maps, self._enricher.subject_maps = self._enricher.subject_maps, []
        return list(maps)

    def close(self) -> None:
        self.store.close()


def _identity_of(record: dict[str, object]) -> tuple[object, ...]:
    """What tells two records apart, whatever their seq: the session, the
    statement's number in it, the kind and the time."""
    return (
        record.get("kind"),
        record.get("session_id"),
        record.get("statement_id"),
        record.get("ts"),
        record.get("client_addr"),
    )
