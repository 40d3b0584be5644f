"""``scalple log tail`` and ``scalple log export`` over a real proxy's log."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from scalple.devcluster import PostgresCluster
from scalple.devproxy import ScalpleServer
from scalple.query.reader import parse_time
from tests.conftest import ProxyFactory


def scalple(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scalple", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def logged(proxy_factory: ProxyFactory, pg: PostgresCluster) -> ScalpleServer:
    proxy = proxy_factory(f"{pg.host}:{pg.port}")
    dsn = proxy.dsn(
        user="app_user", password="app_pass", dbname="app", options="-c scalple.user_id=ivan"
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(30):
            conn.execute(f"select {i} as n")
    proxy.wait_for_records(lambda rs: len(rs) == 30)
    return proxy


def test_tail_shows_the_last_records(logged: ScalpleServer) -> None:
    result = scalple("log", "tail", "--log-dir", str(logged.log_dir), "-n", "5")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("time (UTC)") and len(lines) == 6
    assert all("ivan" in line and "SELECT" in line for line in lines[1:])
    assert "select 29 as n" in lines[-1]


def test_tail_reads_log_dir_from_config(logged: ScalpleServer) -> None:
    result = scalple("log", "tail", "--config", str(logged.config_path), "-n", "1", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["query"] == "select 29 as n"


def test_export_json_with_time_window(logged: ScalpleServer) -> None:
    result = scalple("log", "export", "--json", "--log-dir", str(logged.log_dir))
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 30 and "30 records exported" in result.stderr
    middle = records[10]["ts"]
    later = scalple("log", "export", "--json", "--log-dir", str(logged.log_dir), "--since", middle)
    assert len(later.stdout.splitlines()) == len([r for r in records if r["ts"] >= middle])
    earlier = scalple(
        "log", "export", "--json", "--log-dir", str(logged.log_dir), "--until", middle
    )
    assert len(earlier.stdout.splitlines()) == len([r for r in records if r["ts"] < middle])
    future = scalple(
        "log", "export", "--json", "--log-dir", str(logged.log_dir), "--since", "2999-01-01"
    )
    assert future.stdout == ""


def test_export_rejects_bad_time(logged: ScalpleServer) -> None:
    result = scalple(
        "log", "export", "--json", "--log-dir", str(logged.log_dir), "--since", "yesterday"
    )
    assert result.returncode == 2 and "cannot read 'yesterday' as a time" in result.stderr


def test_follow_prints_new_records(logged: ScalpleServer) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scalple",
            "log",
            "tail",
            "-f",
            "-n",
            "0",
            "--json",
            "--log-dir",
            str(logged.log_dir),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.0)
        dsn = logged.dsn(user="app_user", password="app_pass", dbname="app")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("select 'followed' as marker")
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert json.loads(line)["query"] == "select 'followed' as marker"
    finally:
        proc.terminate()
        proc.wait(10)


def test_parse_time_forms() -> None:
    now = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    assert parse_time("7d", now=now) == now - timedelta(days=7)
    assert parse_time("2026-05-01") == datetime(2026, 5, 1, tzinfo=UTC)
    assert parse_time("2026-05-01T10:00:00Z") == datetime(2026, 5, 1, 10, tzinfo=UTC)
    with pytest.raises(ValueError):
        parse_time("soon")


def test_missing_log_dir_is_a_clear_error() -> None:
    result = scalple("log", "tail", "--log-dir", "/nonexistent/scalple")
    assert result.returncode == 2 and "no audit log directory" in result.stderr
