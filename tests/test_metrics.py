"""The Prometheus endpoint reflects what the proxy did, and nothing personal."""

from __future__ import annotations

import re
import urllib.request

import psycopg
import pytest

from scalple.devcluster import PostgresCluster, free_port
from tests.conftest import ProxyFactory


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def value(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not in metrics"
    return float(match.group(1))


def test_metrics_count_sessions_statements_and_rejects(
    proxy_factory: ProxyFactory, pg: PostgresCluster
) -> None:
    port = free_port()
    proxy = proxy_factory(f"{pg.host}:{pg.port}", {"metrics": {"listen": f"127.0.0.1:{port}"}})
    dsn = proxy.dsn(
        user="app_user", password="app_pass", dbname="app", options="-c scalple.user_id=mallory"
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("select 1")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("select 1/0")
        text = scrape(port)
        assert value(text, "scalple_client_connections") == 1
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn(user="app_user", password="wrong", dbname="app"))
    proxy.wait_for_records(lambda rs: len(rs) == 1, kind="session_reject")
    text = scrape(port)
    assert value(text, 'scalple_statements_total{status="ok"}') == 1
    assert value(text, 'scalple_statements_total{status="error"}') == 1
    assert value(text, 'scalple_connections_rejected_total{sqlstate="28P01"}') == 1
    assert value(text, "scalple_client_connections_accepted_total") == 2
    assert value(text, "scalple_audit_events_pending") == 0
    assert "mallory" not in text and "select" not in text


def test_metrics_port_in_use_is_a_clear_error(
    proxy_factory: ProxyFactory, pg: PostgresCluster
) -> None:
    with pytest.raises(RuntimeError, match="cannot serve metrics"):
        proxy_factory(f"{pg.host}:{pg.port}", {"metrics": {"listen": f"127.0.0.1:{pg.port}"}})
