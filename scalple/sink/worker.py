"""The audit worker process: receives event batches, stores records.

The proxy pickles batches of raw events down a pipe; this process builds the
records (SQL analysis, catalog look-ups), appends them to the store, and
acknowledges.  Keeping this work out of the proxy's process keeps it off the
relay's GIL.

Durability is decided here.  Batches that are already waiting are written
together and fsynced once (group commit).  In strict mode a batch is
acknowledged only after that fsync, and the proxy holds each statement's
completion until its batch is acknowledged; in async mode a batch is
acknowledged once written and fsync follows within ``sync_interval``.
"""

from __future__ import annotations

import gc
import logging
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import msgspec

from scalple.config import Config

if TYPE_CHECKING:
    from scalple.sink.writer import RecordWriter

__all__ = ["Ack", "Resent", "Started", "worker_main"]

_GROUP_LIMIT = 64  # batches written before one fsync, at most


class Ack(msgspec.Struct, array_like=True):
    """What the worker tells the proxy: batches done, and the store's state."""

    batches: int  # batches completed by this ack, in the order they were sent
    events: int  # events in them
    counts: dict[str, int]  # their statements by status
    failed_writes: int  # failed write attempts so far
    lost: int  # records given up so far (on_failure = "continue")
    failing: str | None  # why the store cannot write, while it cannot
    unsynced: int  # records written but not fsynced (async mode's loss window)


def worker_main(batches: Connection, acks: Connection, config: Config, verbose: bool) -> None:
    """Entry point of the worker process (multiprocessing 'spawn')."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s[worker]: %(message)s",
        stream=sys.stderr,
    )
    # The proxy decides when to stop (it sends None after the last batch);
    # a terminal's Ctrl-C reaches the whole process group, so ignore it here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    from scalple.sink.enrich import build_enricher
    from scalple.sink.writer import RecordWriter

    # Records, postings and tags are acyclic and many (a result's subject
    # values make a million small objects per segment): collect cycles
    # rarely, or the collector walks them all again and again.
    gc.set_threshold(100_000, 50, 100)

    try:
        writer = RecordWriter(config, build_enricher(config))
    except Exception as exc:
        # The proxy reports this and does not start: a log it cannot open
        # (held by another process, damaged below a checkpoint) needs a person.
        acks.send(Started(error=str(exc)))
        acks.close()
        return
    acks.send(Started(error=None))
    _Loop(writer, batches, acks, config).run()


class Resent(msgspec.Struct, array_like=True):
    """A batch sent again after a worker died: some of it may be stored already."""

    batch: list[Any]


class Started(msgspec.Struct, array_like=True):
    """The worker's first message: the store is open, or why it is not."""

    error: str | None


class _Loop:
    """Receive, store, acknowledge; sign and seal when due.

    fsync runs on a thread of its own (``_Syncer``): while it makes one group
    durable the loop already receives, enriches and writes the next, which
    is what makes group commit pay in strict mode, and keeps async mode's
    fsync every ``sync_interval`` however busy the loop is.
    """

    def __init__(
        self, writer: RecordWriter, batches: Connection, acks: Connection, config: Config
    ) -> None:
        self.writer = writer
        self.batches = batches
        self.acks = acks
        self.strict = config.log.durability == "strict"
        self.tick_interval = min(config.log.checkpoint_interval, 0.5)
        self._send_lock = threading.Lock()  # the loop and the syncer both send
        self.syncer = _Syncer(self, config.log.sync_interval)

    def send(self, batches: int, events: int, counts: dict[str, int]) -> None:
        writer = self.writer
        ack = Ack(
            batches,
            events,
            counts,
            writer.failed_writes,
            writer.lost,
            writer.failing,
            writer.store.unsynced,
        )
        with self._send_lock:
            self.acks.send(ack)

    def on_failing(self, reason: str | None) -> None:
        self.send(0, 0, {})

    def run(self) -> None:
        writer = self.writer
        self.syncer.start()
        try:
            while True:
                if not self.batches.poll(self.tick_interval):
                    writer.store.tick(time.time_ns())
                    continue
                group = self.receive()
                if group is None:
                    break
                self.store(group)
                writer.store.tick(time.time_ns())
        except EOFError:
            pass  # the proxy is gone; what was received is stored
        finally:
            self.syncer.stop()
            writer.close()
            self.acks.close()

    def receive(self) -> list[list[Any] | Resent] | None:
        """The batches waiting now (at least one); None when told to stop."""
        group: list[list[Any] | Resent] = []
        while True:
            batch = self.batches.recv()
            if batch is None:
                if group:
                    self.store(group)
                return None
            group.append(batch)
            if len(group) >= _GROUP_LIMIT or not self.batches.poll(0):
                return group

    def store(self, group: list[list[Any] | Resent]) -> None:
        writer = self.writer
        done: list[tuple[int, dict[str, int]]] = []
        for item in group:
            if isinstance(item, Resent):
                batch, resent = item.batch, True
            else:
                batch, resent = item, False
            counts = writer.write(batch, self.on_failing, resent=resent)
            done.append((len(batch), counts))
        events = sum(n for n, _ in done)
        totals: dict[str, int] = {}
        for _, part in done:
            for status, count in part.items():
                totals[status] = totals.get(status, 0) + count
        if self.strict:
            self.syncer.durable_then_ack(len(done), events, totals)
        else:
            self.send(len(done), events, totals)
            self.syncer.wake()
        for message in writer.take_subject_maps():
            with self._send_lock:
                self.acks.send(message)


class _Syncer(threading.Thread):
    """Makes written records durable and, in strict mode, acknowledges them.

    Strict: every group the loop wrote is queued here; one fdatasync covers
    all groups queued when it starts, then one acknowledgement releases
    them.  Async: an fdatasync at most ``interval`` after a write.
    """

    def __init__(self, loop: _Loop, interval: float) -> None:
        super().__init__(name="scalple-syncer", daemon=True)
        self._loop = loop
        self._interval = interval
        self._cond = threading.Condition()
        self._waiting: list[tuple[int, int, dict[str, int]]] = []
        self._stopping = False
        self._synced_at = time.monotonic()

    def durable_then_ack(self, batches: int, events: int, counts: dict[str, int]) -> None:
        with self._cond:
            self._waiting.append((batches, events, counts))
            self._cond.notify()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self.join()

    def run(self) -> None:
        loop = self._loop
        store = loop.writer.store
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    if not store.unsynced:
                        self._cond.wait()
                        continue
                    # Async: writes gather until an interval after the last sync.
                    left = self._synced_at + self._interval - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                waiting, self._waiting = self._waiting, []
                stopping = self._stopping
            loop.writer.sync(loop.on_failing)
            self._synced_at = time.monotonic()
            if waiting:
                totals: dict[str, int] = {}
                for _, _, counts in waiting:
                    for status, count in counts.items():
                        totals[status] = totals.get(status, 0) + count
                loop.send(sum(w[0] for w in waiting), sum(w[1] for w in waiting), totals)
            elif not store.unsynced:
                loop.send(0, 0, {})  # the loss window closed: tell the metrics
            if stopping:
                with self._cond:
                    if not self._waiting:
                        return
