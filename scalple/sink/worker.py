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

import logging
import signal
import sys
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
    """Receive, store, fsync, acknowledge; sign and seal when due."""

    def __init__(
        self, writer: RecordWriter, batches: Connection, acks: Connection, config: Config
    ) -> None:
        self.writer = writer
        self.batches = batches
        self.acks = acks
        self.strict = config.log.durability == "strict"
        self.sync_interval = config.log.sync_interval
        self.tick_interval = min(config.log.checkpoint_interval, 0.5)
        self.synced_at = time.monotonic()

    def send(self, batches: int, events: int, counts: dict[str, int]) -> None:
        writer = self.writer
        self.acks.send(
            Ack(
                batches,
                events,
                counts,
                writer.failed_writes,
                writer.lost,
                writer.failing,
                writer.store.unsynced,
            )
        )

    def on_failing(self, reason: str | None) -> None:
        self.send(0, 0, {})

    def run(self) -> None:
        writer = self.writer
        try:
            while True:
                timeout = self.tick_interval
                if writer.store.unsynced:
                    timeout = max(0.0, self.synced_at + self.sync_interval - time.monotonic())
                if not self.batches.poll(timeout):
                    self.idle()
                    continue
                group = self.receive()
                if group is None:
                    break
                self.store(group)
                if writer.store.unsynced and (
                    time.monotonic() - self.synced_at >= self.sync_interval
                ):
                    self.sync()
                writer.store.tick(time.time_ns())
        except EOFError:
            pass  # the proxy is gone; what was received is stored
        finally:
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
        if self.strict:
            self.sync()
        events = sum(n for n, _ in done)
        totals: dict[str, int] = {}
        for _, part in done:
            for status, count in part.items():
                totals[status] = totals.get(status, 0) + count
        self.send(len(done), events, totals)

    def sync(self) -> None:
        self.writer.sync(self.on_failing)
        self.synced_at = time.monotonic()

    def idle(self) -> None:
        writer = self.writer
        if writer.store.unsynced:
            self.sync()
            self.send(0, 0, {})  # the loss window closed: tell the metrics
        writer.store.tick(time.time_ns())
