"""The audit worker process can die without losing a record: the proxy
restarts it and resends what it had not confirmed."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import msgspec
import psycopg

from scalple.config import AnalysisConfig, load_config
from scalple.devcluster import PostgresCluster
from scalple.events import SessionInfo
from scalple.query.reader import LogReader
from scalple.sink.enrich import build_enricher
from scalple.sink.writer import RecordWriter
from tests.conftest import ProxyFactory


def worker_pid(proxy_pid: int) -> int | None:
    """The audit worker: the proxy's child started by multiprocessing's spawn
    (None while there is none: a killed one is a zombie with no command line)."""
    children = [  # children of every thread: a restarted worker is the handoff thread's
        child
        for task in Path(f"/proc/{proxy_pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]
    for child in children:
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"multiprocessing.spawn" in cmdline and b"resource_tracker" not in cmdline:
            return int(child)
    return None


def test_killed_worker_is_restarted_and_no_record_is_lost(
    proxy_factory: ProxyFactory, pg: PostgresCluster
) -> None:
    proxy = proxy_factory(f"{pg.host}:{pg.port}")
    assert proxy.process is not None
    dsn = proxy.dsn(user="app_user", password="app_pass", dbname="app")
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(20):
            conn.execute(f"select {i} as before_kill")
        first = worker_pid(proxy.process.pid)
        assert first is not None
        os.kill(first, signal.SIGKILL)
        for i in range(20):
            conn.execute(f"select {i} as after_kill")  # the relay keeps relaying
    records = proxy.wait_for_records(
        lambda rs: sum("after_kill" in (r["query"] or "") for r in rs) == 20, timeout=30
    )
    queries = [r["query"] for r in records]
    for i in range(20):
        assert queries.count(f"select {i} as before_kill") == 1  # resends are deduplicated
        assert queries.count(f"select {i} as after_kill") == 1
    seqs = [r["seq"] for r in proxy.records(kind=None)]
    assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))  # never reused
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and worker_pid(proxy.process.pid) in (None, first):
        time.sleep(0.05)
    assert worker_pid(proxy.process.pid) not in (None, first)
    assert proxy.log_contains("audit worker died")
    assert proxy.stop() == 0


def test_analysis_can_be_switched_off(proxy_factory: ProxyFactory, pg: PostgresCluster) -> None:
    proxy = proxy_factory(f"{pg.host}:{pg.port}", {"analysis": {"enabled": False}})
    dsn = proxy.dsn(user="app_user", password="app_pass", dbname="app")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("select 1 as unanalysed")
    (record,) = proxy.wait_for_records(lambda rs: len(rs) == 1)
    assert record["statement_class"] is None and record["affected_tables"] == []
    assert record["analysis_notes"] == ["analysis disabled ([analysis] enabled = false)"]
    assert record["command"] == "SELECT" and record["rows"] == 1


def test_a_resent_batch_is_not_stored_twice(tmp_path: Path) -> None:
    """A worker that wrote a batch and died before confirming it: the next
    worker receives the batch again and stores only what is missing."""
    config = msgspec.structs.replace(
        load_config(None, log__dir=str(tmp_path / "log"), log__origin="test/resend"),
        analysis=AnalysisConfig(enabled=False),
    )
    opened = [
        SessionInfo(f"s-{n}", "127.0.0.1:1", "app_user", "app", "", None, None, "none", False, n)
        for n in range(1, 6)
    ]
    first = RecordWriter(config, build_enricher(config))
    first.write(opened[:3], lambda reason: None)
    first.close()  # as if it died here, before its acknowledgement reached the proxy
    second = RecordWriter(config, build_enricher(config))
    second.write(opened[:4], lambda reason: None, resent=True)  # 3 stored, 1 new
    second.write(opened[4:], lambda reason: None)
    second.close()
    stored = [r["session_id"] for r in LogReader(tmp_path / "log").records(kinds=None)]
    assert stored == ["s-1", "s-2", "s-3", "s-4", "s-5"]
