"""The audit worker process: receives event batches, writes records.

The proxy pickles batches of raw events down a pipe; this process builds the
records (SQL analysis, catalog look-ups, hashing) and appends them, then
acknowledges each batch with its statement counts.  Keeping this work out of
the proxy's process keeps it off the relay's GIL.
"""

from __future__ import annotations

import logging
import signal
import sys
from multiprocessing.connection import Connection

from scalple.config import Config

__all__ = ["Ack", "worker_main"]

Ack = tuple[int, dict[str, int], int]
"""(events written, their statements by status, failed write attempts so far)"""


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

    writer = RecordWriter(config.log.dir, build_enricher(config))
    try:
        while True:
            try:
                batch = batches.recv()
            except EOFError:
                break  # the proxy is gone
            if batch is None:
                break
            counts = writer.write(batch)
            acks.send((len(batch), counts, writer.failed_writes))
    finally:
        writer.close()
        acks.close()
