"""Real-process tests for scalple.devcluster (no mocks: these fixtures back every other test)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import psycopg
import pytest

from scalple.devcluster import (
    DEFAULT_ROLES,
    DevClusterError,
    PgBouncer,
    PostgresCluster,
    PsqlError,
    free_port,
    wait_for_port,
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # zombies of reparented daemons count as gone


@pytest.fixture(scope="module")
def cluster():
    t0 = time.monotonic()
    with PostgresCluster() as pg:
        pg.startup_seconds = time.monotonic() - t0  # type: ignore[attr-defined]
        yield pg


@pytest.fixture(scope="module")
def bouncer(cluster):
    with PgBouncer(cluster) as pgb:
        yield pgb


def test_cluster_starts_quickly_and_psql_works(cluster):
    assert cluster.startup_seconds < 10
    assert cluster.psql("SELECT 1 + 1") == "2"
    assert cluster.psql("SELECT current_database()") == "app"
    assert cluster.host == "127.0.0.1"
    assert cluster.port not in (5432, 6432)
    assert cluster.log_file.exists()
    assert _alive(cluster.pid())


def test_psql_reports_errors(cluster):
    with pytest.raises(PsqlError) as info:
        cluster.psql("SELECT * FROM no_such_table")
    assert "no_such_table" in info.value.stderr
    assert cluster.psql("SELECT * FROM no_such_table", check=False) == ""


def test_app_database_owned_by_app_user(cluster):
    assert (
        cluster.psql("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'app'")
        == "app_user"
    )


@pytest.mark.parametrize("role", [r for r in DEFAULT_ROLES], ids=lambda r: r.name)
def test_each_auth_method_over_tcp(cluster, role):
    with psycopg.connect(cluster.dsn(user=role.name, sslmode="disable")) as conn:
        user, db = conn.execute("SELECT current_user, current_database()").fetchone()
        assert (user, db) == (role.name, "app")
        # every role may use schema public in db app
        conn.execute(f"CREATE TEMP TABLE t_{role.name} (x int)")
        conn.execute(f"CREATE TABLE IF NOT EXISTS public.perm_{role.name} (x int)")


@pytest.mark.parametrize(
    "role", [r for r in DEFAULT_ROLES if r.password is not None], ids=lambda r: r.name
)
def test_wrong_password_rejected(cluster, role):
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(cluster.dsn(user=role.name, password="wrong", sslmode="disable"))


def test_password_storage_matches_method(cluster):
    rows = cluster.psql(
        "SELECT rolname, split_part(rolpassword, '-', 1) ~ '^SCRAM', rolpassword ~ '^md5' "
        "FROM pg_authid "
        "WHERE rolname IN ('app_user', 'md5_user', 'pw_user', 'trust_user') ORDER BY 1"
    ).splitlines()
    assert rows == ["app_user|t|f", "md5_user|f|t", "pw_user|t|f", "trust_user||"]


def test_hba_methods_are_enforced(cluster):
    rules = cluster.psql(
        "SELECT user_name[1], auth_method FROM pg_hba_file_rules "
        "WHERE type = 'host' AND address = '127.0.0.1'",
        database="postgres",
    ).splitlines()
    for role in DEFAULT_ROLES:
        assert f"{role.name}|{role.auth}" in rules
    assert rules[-1] == "all|scram-sha-256"


def test_pgaudit_preloaded(cluster):
    assert "pgaudit" in cluster.psql("SHOW shared_preload_libraries")
    assert cluster.psql("SHOW pgaudit.log") == "none"


def test_pgaudit_can_be_enabled(cluster):
    cluster.psql("ALTER SYSTEM SET pgaudit.log = 'write'; SELECT pg_reload_conf();")
    try:
        time.sleep(0.2)  # reload is asynchronous
        cluster.psql(
            "CREATE TABLE IF NOT EXISTS audit_probe (x int); INSERT INTO audit_probe VALUES (42)"
        )
        assert "AUDIT: SESSION" in cluster.log_file.read_text()
    finally:
        cluster.psql("ALTER SYSTEM RESET pgaudit.log; SELECT pg_reload_conf();")


def test_tls_verify_full(cluster):
    assert cluster.ca_cert is not None and cluster.ca_cert.exists()
    dsn = cluster.dsn(
        host="localhost",
        hostaddr="127.0.0.1",
        sslmode="verify-full",
        sslrootcert=str(cluster.ca_cert),
    )
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()[
            0
        ]
        assert conn.pgconn.ssl_in_use


def test_tls_verify_full_by_ip(cluster):
    dsn = cluster.dsn(sslmode="verify-full", sslrootcert=str(cluster.ca_cert))
    with psycopg.connect(dsn) as conn:
        assert conn.pgconn.ssl_in_use


def test_server_key_is_private(cluster):
    assert cluster.server_key is not None
    st = cluster.server_key.stat()
    assert st.st_mode & 0o077 == 0


def test_pgbouncer_transaction_mode_scram(cluster, bouncer):
    assert bouncer.port not in (cluster.port, 5432, 6432)
    assert "ignore_startup_parameters" not in bouncer.ini_path.read_text()
    with psycopg.connect(bouncer.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT current_user, current_database()").fetchone() == (
            "app_user",
            "app",
        )
        # it really is the upstream server behind the bouncer
        port = conn.execute("SELECT current_setting('port')").fetchone()[0]
        assert int(port) == cluster.port
        with conn.transaction():
            conn.execute("CREATE TEMP TABLE bouncer_t (x int) ON COMMIT DROP")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(bouncer.dsn(password="wrong"))
    show = bouncer.dsn(user="postgres", database="pgbouncer")
    with psycopg.connect(show, autocommit=True, prepare_threshold=None) as admin:
        pools = admin.execute("SHOW POOLS").fetchall()
    assert any(row[0] == "app" and row[1] == "app_user" for row in pools)
    assert _alive(bouncer.pid())


def test_wait_for_port_timeout():
    port = free_port()
    with pytest.raises(TimeoutError, match=str(port)):
        wait_for_port("127.0.0.1", port, timeout=0.2)


def test_stop_and_cleanup_leave_nothing_behind():
    pg = PostgresCluster(tls=False, pgaudit=False, max_connections=20)
    pg.start()
    pg.start()  # idempotent
    pgb = PgBouncer(pg)
    pgb.start()
    pg_pid, pgb_pid = pg.pid(), pgb.pid()
    pg_dir, pgb_dir = pg.base_dir, pgb.base_dir
    assert _alive(pg_pid) and _alive(pgb_pid)

    pgb.cleanup()
    pgb.cleanup()  # idempotent
    assert not _alive(pgb_pid)
    assert not pgb_dir.exists()

    pg.stop()
    assert not _alive(pg_pid)
    assert pg_dir.exists()
    pg.stop()  # idempotent
    pg.cleanup()
    assert not pg_dir.exists()
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert str(pg_dir) not in out and str(pgb_dir) not in out


def test_failed_start_reports_log_and_cleans_up():
    pg = PostgresCluster(tls=False, pgaudit=False, extra_conf={"shared_buffers": "bogus"})
    base = pg.base_dir
    with pytest.raises(DevClusterError) as info, pg:
        pass
    assert "shared_buffers" in str(info.value)  # tail of the server log is included
    assert not base.exists()
