"""The proxy's side of the audit log: collect events, hand them to the worker.

The relay's only cost is a list append.  A handoff thread swaps the list out
every ``flush_interval`` and pickles it down a pipe to the audit worker
process (scalple/sink/worker.py), which builds and writes the records and
acknowledges each batch.  Batches stay queued here until acknowledged: when
more than ``max_pending`` events are unacknowledged the sink is congested and
the relay stops reading from clients; if the worker dies it is restarted and
the unacknowledged batches are sent again.  No event is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

from scalple.config import Config
from scalple.events import StatementEvent
from scalple.logsafe import where
from scalple.masking.rows import SubjectColumns
from scalple.sink.base import Event
from scalple.sink.worker import Ack, Resent, Started, worker_main

__all__ = ["AuditLogUnavailable", "AuditSink"]

log = logging.getLogger(__name__)

_CONTEXT = multiprocessing.get_context("spawn")  # never fork a process with threads
_START_TIMEOUT = 120.0  # recovery scans at most the newest segment
_RESTART_DELAY = 1.0
_MAX_ROW_BYTES = 64 << 20  # subject values from result rows in flight, at most


class AuditLogUnavailable(RuntimeError):
    """The audit worker could not open the log; the message says why."""


class AuditSink:
    """Events in on the event loop; records out in the worker process."""

    def __init__(self, config: Config, *, verbose: bool = False) -> None:
        self.log_dir = Path(config.log.dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._config = config
        self.strict = config.log.durability == "strict"
        self._row_subjects = bool(config.subjects)  # events may carry values from rows
        self._verbose = verbose
        self._pending: list[Event] = []
        self._max_pending = config.log.max_pending
        self._interval = config.log.flush_interval
        self._unacked: deque[list[Event]] = deque()
        self._unacked_events = 0
        # Each counter has one writing thread (loop, ack reader): no lock.
        self._row_bytes_in = 0
        self._row_bytes_out = 0
        self._lock = threading.Lock()  # guards _unacked between handoff and ack threads
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_congested: Callable[[], None] = _nothing
        self._on_drained: Callable[[], None] = _nothing
        self._on_failing: Callable[[str | None], None] = _nothing_failing
        self._on_subject_columns: Callable[[str, dict[tuple[int, int], int]], None] = (
            lambda database, columns: None
        )
        self._stop = threading.Event()
        self._wake = threading.Event()  # strict mode: hand over now, someone waits
        self._holds: deque[tuple[int, Callable[[], None]]] = deque()  # (ticket, release)
        self._release_scheduled = False
        # Set by the ack reader when the worker's pipe closes: how the handoff
        # thread learns of a dead worker without polling the process.
        self._worker_gone = threading.Event()
        self.congested = False
        self.submitted = 0
        self.written = 0
        self.statements: dict[str, int] = {}  # written, by status (for metrics)
        self.failed_writes = 0
        self.worker_restarts = 0
        self.lost = 0  # records the store gave up (on_failure = "continue")
        self.failing: str | None = None  # why the store cannot write, while it cannot
        self.unsynced = 0  # records written but not yet fsynced
        self._process: BaseProcess | None = None
        self._batches: Connection | None = None
        self._acker: threading.Thread | None = None
        error = self._start_worker()
        if error is not None:
            raise AuditLogUnavailable(error)
        self._handoff = threading.Thread(target=self._run, name="scalple-handoff", daemon=True)
        self._handoff.start()

    # -- the relay's side ------------------------------------------------------

    def submit(self, event: Event) -> None:
        """Queue one event; called on the event loop, must stay cheap."""
        pending = self._pending
        pending.append(event)
        self.submitted += 1
        if len(pending) >= self._max_pending and not self.congested:
            self._congest(f"{len(pending)} events not yet handed to the audit worker")
        if self._row_subjects and type(event) is StatementEvent and event.row_values:
            # Subject values from result rows make some events large: bound
            # the bytes in flight as well as the number of events.
            self._row_bytes_in += len(event.row_values)
            if self.row_bytes_pending >= _MAX_ROW_BYTES and not self.congested:
                self._congest(f"{self.row_bytes_pending} bytes of subject values in flight")

    def notify(
        self,
        loop: asyncio.AbstractEventLoop,
        on_congested: Callable[[], None],
        on_drained: Callable[[], None],
        on_failing: Callable[[str | None], None] = lambda reason: None,
        on_subject_columns: Callable[[str, dict[tuple[int, int], int]], None] = (
            lambda database, columns: None
        ),
    ) -> None:
        """Tell ``loop`` when the relay must pause (and may resume) reading,
        when the store starts (a reason) and stops (None) failing, and the
        subject columns of each database as the worker learns them."""
        self._loop = loop
        self._on_congested = on_congested
        self._on_drained = on_drained
        self._on_failing = on_failing
        self._on_subject_columns = on_subject_columns

    def hold(self, release: Callable[[], None]) -> None:
        """Strict durability: call ``release`` on the loop once every event
        submitted so far is durable.  Called on the loop."""
        ticket = self.submitted
        self._holds.append((ticket, release))
        self._wake.set()
        if self.written >= ticket:
            # Acknowledged already, maybe between the test and the append
            # (the ack thread saw no hold then): release on the loop now.
            self._release_holds()

    def _release_holds(self) -> None:
        """On the loop: release the holds whose events are now durable."""
        self._release_scheduled = False
        holds = self._holds
        written = self.written
        while holds and holds[0][0] <= written:
            _, release = holds.popleft()
            try:
                release()
            except Exception as exc:
                log.error("releasing a held completion failed (%s)", where(exc))

    @property
    def row_bytes_pending(self) -> int:
        """Bytes of result-row subject values submitted and not yet written."""
        return self._row_bytes_in - self._row_bytes_out

    @property
    def pending(self) -> int:
        """Events not yet written (queued here or in flight to the worker)."""
        return len(self._pending) + self._unacked_events

    # -- worker lifecycle ------------------------------------------------------

    def _start_worker(self) -> str | None:
        """Start the worker; None once its store is open, else why not."""
        batches_out, batches_in = _CONTEXT.Pipe(duplex=False)
        acks_out, acks_in = _CONTEXT.Pipe(duplex=False)
        process = _CONTEXT.Process(
            target=worker_main,
            args=(batches_out, acks_in, self._config, self._verbose),
            name="scalple-audit-worker",
            daemon=True,
        )
        self._worker_gone.clear()
        process.start()
        batches_out.close()
        acks_in.close()
        self._process = process
        self._batches = batches_in
        error: str | None
        try:
            if not acks_out.poll(_START_TIMEOUT):
                error = f"the audit worker did not open the log in {_START_TIMEOUT:.0f} s"
            else:
                started = acks_out.recv()
                error = started.error if isinstance(started, Started) else "unexpected reply"
        except (EOFError, OSError):
            error = f"the audit worker exited (code {process.exitcode}) before opening the log"
        if error is not None:
            acks_out.close()
            self._worker_gone.set()
            return error
        self._acker = threading.Thread(
            target=self._read_acks, args=(acks_out,), name="scalple-acks", daemon=True
        )
        self._acker.start()
        return None

    def _restart_worker(self) -> None:
        """The worker died: start another and resend what it did not confirm."""
        self.worker_restarts += 1
        self._congest("audit worker died")
        log.critical(
            "audit worker died (exit %s); restarting it and resending %d unconfirmed events",
            self._process.exitcode if self._process else "?",
            self._unacked_events,
        )
        if self._batches is not None:
            self._batches.close()
        error = self._start_worker()
        if error is not None:
            log.critical("audit worker cannot start: %s; retrying", error)
            if self._process is not None:
                self._process.join(5.0)
            self._stop.wait(_RESTART_DELAY)
            return  # still gone: the handoff thread tries again
        with self._lock:
            resend = list(self._unacked)
        for batch in resend:
            self._send(Resent(batch))
        if not resend:
            self._drained()  # nothing to confirm: no ack would ever clear it

    def _send(self, batch: list[Event] | Resent) -> bool:
        assert self._batches is not None
        try:
            self._batches.send(batch)
        except (BrokenPipeError, OSError):
            return False
        return True

    # -- threads ---------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            self._handoff_pending()
            if self._worker_gone.is_set() and not self._stop.is_set():
                if self._process is not None:
                    self._process.join(1.0)  # reap it; its pipe is already closed
                self._restart_worker()
        self._handoff_pending()

    def _handoff_pending(self) -> None:
        batch, self._pending = self._pending, []  # atomic swap under the GIL
        if not batch:
            return
        with self._lock:
            self._unacked.append(batch)
            self._unacked_events += len(batch)
        self._send(batch)  # on failure the batch stays unacked; a restart resends it

    def _read_acks(self, acks: Connection) -> None:
        while True:
            try:
                ack: Ack | SubjectColumns = acks.recv()
            except (EOFError, OSError):
                self._worker_gone.set()  # the handoff thread restarts it
                return
            try:
                self._acknowledge(ack)
            except Exception as exc:  # keep reading acks whatever happens
                log.error("handling an audit acknowledgement failed (%s)", where(exc))

    def _acknowledge(self, ack: Ack | SubjectColumns) -> None:
        if isinstance(ack, SubjectColumns):
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(self._on_subject_columns, ack.database, ack.columns)
            return
        self.failed_writes = max(self.failed_writes, ack.failed_writes)
        self.lost = max(self.lost, ack.lost)
        self.unsynced = ack.unsynced
        if ack.failing != self.failing:
            self.failing = ack.failing
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(self._on_failing, ack.failing)
        if not ack.batches:
            return
        events = 0
        row_bytes = 0
        with self._lock:
            for _ in range(ack.batches):
                batch = self._unacked.popleft()
                events += len(batch)
                row_bytes += _row_bytes(batch)
            self._unacked_events -= events
        self._row_bytes_out += row_bytes
        if events != ack.events:
            log.error("audit worker confirmed %d events for batches of %d", ack.events, events)
        self.written += events
        for status, count in ack.counts.items():
            self.statements[status] = self.statements.get(status, 0) + count
        if self._holds and not self._release_scheduled:
            loop = self._loop
            if loop is not None and not loop.is_closed():
                self._release_scheduled = True
                loop.call_soon_threadsafe(self._release_holds)
        if (
            self.congested
            and self.pending < self._max_pending // 2
            and self.row_bytes_pending < _MAX_ROW_BYTES // 2
        ):
            self._drained()
        elif not self.congested and self._unacked_events >= self._max_pending:
            self._congest(f"{self._unacked_events} events not yet written by the audit worker")

    def _drained(self) -> None:
        """Let the relay read from clients again; called from any thread."""
        self.congested = False
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._on_drained)

    def _congest(self, why: str) -> None:
        """Stop the relay reading from clients; called from any thread."""
        if self.congested:
            return
        self.congested = True
        log.warning("audit log congested (%s): pausing client reads", why)
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._on_congested()
        else:
            loop.call_soon_threadsafe(self._on_congested)

    # -- ending ----------------------------------------------------------------

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until what was submitted so far is written (tests, shutdown)."""
        target = self.submitted
        deadline = time.monotonic() + timeout
        while self.written < target and time.monotonic() < deadline:
            time.sleep(self._interval)

    def close(self, timeout: float = 30.0) -> None:
        """Hand over and write everything still queued, then stop the worker."""
        self._stop.set()
        self._wake.set()
        self._handoff.join(timeout)
        self.flush(timeout)
        if self.written < self.submitted:
            log.critical(
                "audit worker did not confirm %d events before shutdown",
                self.submitted - self.written,
            )
        if self._batches is not None:
            with contextlib.suppress(OSError):
                self._batches.send(None)
            self._batches.close()
        if self._process is not None:
            self._process.join(timeout)
        if self._acker is not None:
            self._acker.join(5)


def _row_bytes(batch: list[Event]) -> int:
    return sum(
        len(event.row_values)
        for event in batch
        if type(event) is StatementEvent and event.row_values
    )


def _nothing() -> None:
    """Flow-control callback before the relay registered its own."""


def _nothing_failing(reason: str | None) -> None:
    """Store-state callback before the relay registered its own."""
