"""Authentication and TLS through Scalple, with real clients and real servers.

Every password method PostgreSQL offers is relayed untouched (trust, cleartext,
md5, SCRAM), directly and through PgBouncer; the client side speaks TLS via
SSLRequest or PostgreSQL 17 direct TLS; the upstream side speaks TLS with and
without certificate verification; SCRAM-SHA-256-PLUS is withheld from clients
unless the proxy presents the server's own certificate (see section 6); cancel
requests reach the server, directly and through PgBouncer; and session records
say who connected from where.

Some tests here fail on purpose until the proxy is fixed; each says what it
expects and why (PostgreSQL's own behaviour is the reference).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import socket
import ssl
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from psycopg import errors as pg_errors

from scalple import protocol as P
from scalple.devcluster import PgBouncer, PostgresCluster
from scalple.devproxy import ScalpleServer
from tests.conftest import ProxyFactory, Route

T = TypeVar("T")

PSQL = "/usr/bin/psql"
LIBPQ_VERSION = psycopg.pq.version()
CONNECT_TIMEOUT = 5

PASSWORD_ROLES = ["pw_user", "md5_user", "app_user"]  # password, md5, scram-sha-256
ALL_ROLES = ["trust_user", *PASSWORD_ROLES]


# -- helpers ------------------------------------------------------------------


def tag() -> str:
    """A unique marker so each test finds its own records in a shared log."""
    return "t" + uuid.uuid4().hex[:12]


def proxy_dsn(
    proxy: ScalpleServer, pg: PostgresCluster, user: str = "app_user", **params: str
) -> str:
    password = pg.role(user).password
    if password is not None:
        params.setdefault("password", password)
    params.setdefault("dbname", "app")
    params.setdefault("connect_timeout", str(CONNECT_TIMEOUT))
    return proxy.dsn(user=user, **params)


def connect(dsn: str) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, autocommit=True)


def scalar(conn: psycopg.Connection[Any], sql: str) -> Any:
    row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0]


def local_addr(conn: psycopg.Connection[Any]) -> str:
    """The client's ``host:port`` as the proxy sees it."""
    sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
    try:
        host, port = sock.getsockname()[:2]
    finally:
        sock.close()
    return f"{host}:{port}"


def psql(
    conninfo: str, *commands: str, password: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env["PGCONNECT_TIMEOUT"] = str(CONNECT_TIMEOUT)
    if password is not None:
        env["PGPASSWORD"] = password
    args = [PSQL, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", conninfo]
    for command in commands:
        args += ["-c", command]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=30, check=False)


def session_opens(proxy: ScalpleServer, app: str, count: int = 1) -> list[dict[str, Any]]:
    records = proxy.wait_for_records(
        lambda rs: sum(1 for r in rs if r.get("application_name") == app) >= count,
        kind="session_open",
    )
    return [r for r in records if r.get("application_name") == app]


def rejects_of(proxy: ScalpleServer, role: str) -> list[dict[str, Any]]:
    return [r for r in proxy.records("session_reject") if r.get("db_role") == role]


def wait_new_reject(
    proxy: ScalpleServer, role: str, before: int, timeout: float = 10.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = rejects_of(proxy, role)
        if len(found) > before:
            return found[-1]
        if time.monotonic() > deadline:
            raise AssertionError(
                f"no new session_reject record for {role!r}; all records: "
                f"{proxy.records(None)[-10:]}"
            )
        time.sleep(0.02)


def upstream_uses_tls(conn: psycopg.Connection[Any]) -> bool:
    return bool(scalar(conn, "select ssl from pg_stat_ssl where pid = pg_backend_pid()"))


def startup_packet(**params: str) -> bytes:
    body = struct.pack("!I", 196608)
    for key, value in params.items():
        body += key.encode() + b"\0" + value.encode() + b"\0"
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


def read_message(recv: Callable[[int], bytes]) -> tuple[bytes, bytes]:
    """One backend message (type, body) from a blocking ``recv``; EOFError at close."""

    def exactly(n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = recv(n - len(out))
            if not chunk:
                raise EOFError(f"connection closed after {len(out)} of {n} bytes")
            out += chunk
        return out

    head = exactly(5)
    length = int.from_bytes(head[1:5], "big")
    return head[:1], exactly(length - 4)


def read_until_ready(recv: Callable[[int], bytes]) -> list[tuple[bytes, bytes]]:
    messages = []
    while True:
        mtype, body = read_message(recv)
        messages.append((mtype, body))
        if mtype in (b"Z", b"E"):
            return messages


def self_signed_ca(directory: Path) -> Path:
    """A CA unrelated to the dev cluster's, for verification failures."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Not the Scalple dev CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = directory / "other-ca.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 20))


# -- proxies --------------------------------------------------------------------


def _serve(upstream: str, config: Mapping[str, Mapping[str, object]]) -> Iterator[ScalpleServer]:
    server = ScalpleServer(upstream, config=config)
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def proxy_cert(pg: PostgresCluster) -> tuple[Path, Path]:
    return pg.issue_cert("scalple", hosts=("localhost", "127.0.0.1"))


@pytest.fixture(scope="module")
def client_tls(proxy_cert: tuple[Path, Path]) -> dict[str, object]:
    cert, key = proxy_cert
    return {"tls_cert": str(cert), "tls_key": str(key)}


@pytest.fixture(scope="module")
def proxy_tls(pg: PostgresCluster, client_tls: dict[str, object]) -> Iterator[ScalpleServer]:
    """Client TLS on, plain connection to PostgreSQL."""
    yield from _serve(f"{pg.host}:{pg.port}", {"server": client_tls})


@pytest.fixture(scope="module")
def proxy_tls_both(pg: PostgresCluster, client_tls: dict[str, object]) -> Iterator[ScalpleServer]:
    """Client TLS on, verified TLS to PostgreSQL (which then offers SCRAM-SHA-256-PLUS)."""
    assert pg.ca_cert is not None
    upstream = {
        "tls": "verify-full",
        "tls_ca_file": str(pg.ca_cert),
        "tls_server_name": "localhost",
    }
    yield from _serve(f"{pg.host}:{pg.port}", {"server": client_tls, "upstream": upstream})


@pytest.fixture(scope="module")
def proxy_upstream_require(pg: PostgresCluster) -> Iterator[ScalpleServer]:
    """No client TLS; unverified TLS to PostgreSQL."""
    yield from _serve(f"{pg.host}:{pg.port}", {"upstream": {"tls": "require"}})


# -- 1. every auth method, Scalple -> PostgreSQL --------------------------------


@pytest.mark.parametrize("user", ALL_ROLES)
def test_auth_method_psycopg(proxy_direct: ScalpleServer, pg: PostgresCluster, user: str) -> None:
    with connect(proxy_dsn(proxy_direct, pg, user)) as conn:
        assert scalar(conn, "select current_user") == user
        assert scalar(conn, "select 40 + 2") == 42


@pytest.mark.parametrize("user", ALL_ROLES)
def test_auth_method_asyncpg(proxy_direct: ScalpleServer, pg: PostgresCluster, user: str) -> None:
    async def go() -> tuple[str, int]:
        conn = await asyncpg.connect(
            host=proxy_direct.host,
            port=proxy_direct.port,
            user=user,
            password=pg.role(user).password,
            database="app",
            timeout=CONNECT_TIMEOUT,
        )
        try:
            return await conn.fetchval("select current_user"), await conn.fetchval("select 42")
        finally:
            await conn.close()

    assert run_async(go()) == (user, 42)


@pytest.mark.parametrize("user", ALL_ROLES)
def test_auth_method_psql(proxy_direct: ScalpleServer, pg: PostgresCluster, user: str) -> None:
    result = psql(
        proxy_direct.dsn(user=user, dbname="app"),
        "select current_user",
        password=pg.role(user).password,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == user


@pytest.mark.parametrize("user", PASSWORD_ROLES)
def test_wrong_password_psycopg(
    proxy_direct: ScalpleServer, pg: PostgresCluster, user: str
) -> None:
    before = len(rejects_of(proxy_direct, user))
    start = time.monotonic()
    with pytest.raises(psycopg.OperationalError) as info:
        connect(proxy_dsn(proxy_direct, pg, user, password="wrong-password"))
    assert time.monotonic() - start < CONNECT_TIMEOUT
    assert f'password authentication failed for user "{user}"' in str(info.value)
    record = wait_new_reject(proxy_direct, user, before)
    assert record["sqlstate"] == "28P01", record
    assert record["database"] == "app"
    # The proxy is still healthy.
    with connect(proxy_dsn(proxy_direct, pg, user)) as conn:
        assert scalar(conn, "select 1") == 1


@pytest.mark.parametrize("user", PASSWORD_ROLES)
def test_wrong_password_asyncpg_sqlstate(
    proxy_direct: ScalpleServer, pg: PostgresCluster, user: str
) -> None:
    before = len(rejects_of(proxy_direct, user))

    async def go() -> None:
        await asyncpg.connect(
            host=proxy_direct.host,
            port=proxy_direct.port,
            user=user,
            password="wrong-password",
            database="app",
            timeout=CONNECT_TIMEOUT,
        )

    with pytest.raises(asyncpg.InvalidPasswordError) as info:
        run_async(go())
    assert info.value.sqlstate == "28P01"
    assert wait_new_reject(proxy_direct, user, before)["sqlstate"] == "28P01"
    with connect(proxy_dsn(proxy_direct, pg, user)) as conn:
        assert scalar(conn, "select 1") == 1


# -- 2. SCRAM through Scalple -> PgBouncer -> PostgreSQL ------------------------


def test_scram_through_bouncer_psycopg(
    proxy_bouncer: ScalpleServer, pg: PostgresCluster, bouncer: PgBouncer
) -> None:
    with connect(proxy_dsn(proxy_bouncer, pg, "app_user")) as conn:
        assert scalar(conn, "select current_user") == "app_user"
        # PgBouncer sits in between: the backend's port is PgBouncer's peer, not ours.
        assert scalar(conn, "select inet_server_port()") == pg.port


def test_scram_through_bouncer_asyncpg(proxy_bouncer: ScalpleServer, pg: PostgresCluster) -> None:
    async def go() -> str:
        conn = await asyncpg.connect(
            host=proxy_bouncer.host,
            port=proxy_bouncer.port,
            user="app_user",
            password=pg.role("app_user").password,
            database="app",
            timeout=CONNECT_TIMEOUT,
            statement_cache_size=0,  # transaction pooling
        )
        try:
            return str(await conn.fetchval("select current_user"))
        finally:
            await conn.close()

    assert run_async(go()) == "app_user"


def test_scram_wrong_password_through_bouncer(
    proxy_bouncer: ScalpleServer, pg: PostgresCluster
) -> None:
    before = len(rejects_of(proxy_bouncer, "app_user"))
    # PgBouncer answers for itself here ("SASL authentication failed").
    with pytest.raises(psycopg.OperationalError, match="authentication failed"):
        connect(proxy_dsn(proxy_bouncer, pg, "app_user", password="wrong-password"))
    wait_new_reject(proxy_bouncer, "app_user", before)
    with connect(proxy_dsn(proxy_bouncer, pg, "app_user")) as conn:
        assert scalar(conn, "select 1") == 1


# -- 3. client-side TLS via SSLRequest -------------------------------------------


def test_tls_require_psycopg(proxy_tls: ScalpleServer, pg: PostgresCluster) -> None:
    app = tag()
    dsn = proxy_dsn(proxy_tls, pg, "app_user", sslmode="require", application_name=app)
    with connect(dsn) as conn:
        assert conn.pgconn.ssl_in_use
        assert scalar(conn, "select current_user") == "app_user"
        # A larger result crosses several TLS records.
        assert (
            scalar(
                conn, "select length(string_agg(md5(g::text), '')) from generate_series(1, 20000) g"
            )
            == 640000
        )
        assert len(scalar(conn, "select repeat('x', 1000000)")) == 1_000_000
    (record,) = session_opens(proxy_tls, app)
    assert record["tls"] is True


@pytest.mark.parametrize("user", ALL_ROLES)
def test_tls_require_every_auth_method(
    proxy_tls: ScalpleServer, pg: PostgresCluster, user: str
) -> None:
    with connect(proxy_dsn(proxy_tls, pg, user, sslmode="require")) as conn:
        assert conn.pgconn.ssl_in_use
        assert scalar(conn, "select current_user") == user


def test_tls_require_psql(proxy_tls: ScalpleServer, pg: PostgresCluster) -> None:
    app = tag()
    result = psql(
        proxy_tls.dsn(user="app_user", dbname="app", sslmode="require", application_name=app),
        "\\conninfo",
        "select 'ok'",
        password=pg.role("app_user").password,
    )
    assert result.returncode == 0, result.stderr
    assert "SSL connection (protocol: TLSv1." in result.stdout
    assert result.stdout.strip().endswith("ok")
    (record,) = session_opens(proxy_tls, app)
    assert record["tls"] is True


def test_tls_verify_full(proxy_tls: ScalpleServer, pg: PostgresCluster) -> None:
    assert pg.ca_cert is not None
    app = tag()
    dsn = proxy_dsn(
        proxy_tls,
        pg,
        "app_user",
        host="localhost",
        hostaddr="127.0.0.1",  # the proxy listens on IPv4 only
        sslmode="verify-full",
        sslrootcert=str(pg.ca_cert),
        application_name=app,
    )
    with connect(dsn) as conn:
        assert conn.pgconn.ssl_in_use
        assert scalar(conn, "select 1") == 1
    result = psql(dsn, "\\conninfo")
    assert result.returncode == 0, result.stderr
    assert "SSL connection" in result.stdout
    assert [r["tls"] for r in session_opens(proxy_tls, app, 2)] == [True, True]


def test_tls_verify_full_checks_host_name(proxy_tls: ScalpleServer, pg: PostgresCluster) -> None:
    assert pg.ca_cert is not None
    dsn = proxy_dsn(
        proxy_tls,
        pg,
        "app_user",
        host="not-the-proxy.example",
        hostaddr="127.0.0.1",
        sslmode="verify-full",
        sslrootcert=str(pg.ca_cert),
    )
    with pytest.raises(psycopg.OperationalError, match="does not match host name"):
        connect(dsn)


def test_no_tls_config_answers_n(proxy_direct: ScalpleServer, pg: PostgresCluster) -> None:
    app = tag()
    with connect(
        proxy_dsn(proxy_direct, pg, "app_user", sslmode="prefer", application_name=app)
    ) as conn:
        assert not conn.pgconn.ssl_in_use
        assert scalar(conn, "select 1") == 1
    (record,) = session_opens(proxy_direct, app)
    assert record["tls"] is False

    start = time.monotonic()
    with pytest.raises(psycopg.OperationalError, match="server does not support SSL"):
        connect(proxy_dsn(proxy_direct, pg, "app_user", sslmode="require"))
    assert time.monotonic() - start < CONNECT_TIMEOUT

    result = psql(
        proxy_direct.dsn(user="app_user", dbname="app", sslmode="require"),
        "select 1",
        password="app_pass",
    )
    assert result.returncode != 0
    assert "server does not support SSL, but SSL was required" in result.stderr

    # The proxy is fine afterwards.
    with connect(proxy_dsn(proxy_direct, pg, "app_user")) as conn:
        assert scalar(conn, "select 1") == 1


def test_ssl_request_by_hand(proxy_direct: ScalpleServer, proxy_tls: ScalpleServer) -> None:
    for proxy, answer in ((proxy_direct, b"N"), (proxy_tls, b"S")):
        with socket.create_connection((proxy.host, proxy.port), timeout=5) as sock:
            sock.sendall(P.build_ssl_request())
            assert sock.recv(16) == answer


def test_gssenc_prefer_psycopg(proxy_tls: ScalpleServer, pg: PostgresCluster) -> None:
    """gssencmode=prefer falls back (to TLS here) whether or not libpq tries GSS."""
    dsn = proxy_dsn(proxy_tls, pg, "app_user", gssencmode="prefer", sslmode="prefer")
    with connect(dsn) as conn:
        assert scalar(conn, "select 1") == 1
        assert conn.pgconn.ssl_in_use


@pytest.mark.parametrize("tls_configured", [False, True])
def test_gssenc_request_by_hand(
    proxy_direct: ScalpleServer, proxy_tls: ScalpleServer, tls_configured: bool
) -> None:
    """libpq only sends a GSSENCRequest with Kerberos credentials, so send one by hand:
    the answer is the single byte N, after which the connection goes on (per protocol)."""
    proxy = proxy_tls if tls_configured else proxy_direct
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as sock:
        sock.sendall(struct.pack("!II", 8, P.GSSENC_REQUEST_CODE))
        assert sock.recv(16) == b"N"
        if tls_configured:
            # GSSENCRequest declined, then SSLRequest accepted: libpq's prefer/prefer order.
            sock.sendall(P.build_ssl_request())
            assert sock.recv(16) == b"S"
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            with ctx.wrap_socket(sock) as tls:
                tls.sendall(startup_packet(user="trust_user", database="app"))
                messages = read_until_ready(tls.recv)
        else:
            sock.sendall(startup_packet(user="trust_user", database="app"))
            messages = read_until_ready(sock.recv)
    assert messages[0] == (b"R", b"\0\0\0\0")  # AuthenticationOk (trust)
    assert messages[-1][0] == b"Z"


def test_data_after_ssl_request_is_refused(proxy_tls: ScalpleServer) -> None:
    """CVE-2021-23214: plaintext sent before the 'S' could be spliced into the TLS stream."""
    with socket.create_connection((proxy_tls.host, proxy_tls.port), timeout=5) as sock:
        sock.sendall(P.build_ssl_request() + startup_packet(user="trust_user", database="app"))
        mtype, body = read_message(sock.recv)
    assert mtype == b"E"
    fields = P.parse_error_fields(body)
    assert fields["C"] == "08P01"
    assert "unencrypted data after SSL request" in fields["M"]


# -- 4. PostgreSQL 17 direct TLS --------------------------------------------------

needs_libpq17 = pytest.mark.skipif(
    LIBPQ_VERSION < 170000,
    reason=f"sslnegotiation=direct needs libpq >= 17 (psycopg uses libpq {LIBPQ_VERSION})",
)


@needs_libpq17
@pytest.mark.parametrize("user", ["app_user", "md5_user"])
def test_direct_tls(proxy_tls: ScalpleServer, pg: PostgresCluster, user: str) -> None:
    assert pg.ca_cert is not None
    app = tag()
    dsn = proxy_dsn(
        proxy_tls,
        pg,
        user,
        sslnegotiation="direct",
        sslmode="require",
        application_name=app,
    )
    with connect(dsn) as conn:
        assert conn.pgconn.ssl_in_use
        assert scalar(conn, "select current_user") == user
    (record,) = session_opens(proxy_tls, app)
    assert record["tls"] is True


@needs_libpq17
def test_direct_tls_verify_full(proxy_tls: ScalpleServer, pg: PostgresCluster) -> None:
    assert pg.ca_cert is not None
    dsn = proxy_dsn(
        proxy_tls,
        pg,
        "app_user",
        host="localhost",
        hostaddr="127.0.0.1",
        sslnegotiation="direct",
        sslmode="verify-full",
        sslrootcert=str(pg.ca_cert),
    )
    with connect(dsn) as conn:
        assert conn.pgconn.ssl_in_use
        assert scalar(conn, "select 1") == 1


@needs_libpq17
def test_direct_tls_without_tls_config_fails_fast(
    proxy_direct: ScalpleServer, pg: PostgresCluster
) -> None:
    start = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        connect(proxy_dsn(proxy_direct, pg, "app_user", sslnegotiation="direct", sslmode="require"))
    assert time.monotonic() - start < CONNECT_TIMEOUT - 1
    with connect(proxy_dsn(proxy_direct, pg, "app_user")) as conn:
        assert scalar(conn, "select 1") == 1


def test_direct_tls_alpn_negotiated(proxy_tls: ScalpleServer) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["postgresql"])
    with (
        socket.create_connection((proxy_tls.host, proxy_tls.port), timeout=5) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        assert tls.selected_alpn_protocol() == "postgresql"
        tls.sendall(startup_packet(user="trust_user", database="app"))
        messages = read_until_ready(tls.recv)
    assert messages[0] == (b"R", b"\0\0\0\0")
    assert messages[-1][0] == b"Z"


@pytest.mark.parametrize("alpn", [None, "http/1.1"])
def test_direct_tls_requires_postgresql_alpn(proxy_tls: ScalpleServer, alpn: str | None) -> None:
    """PostgreSQL 17 refuses direct TLS unless ALPN selected "postgresql" (protection
    against cross-protocol attacks, ALPACA); a proxy speaking for it must do the same."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn is not None:
        ctx.set_alpn_protocols([alpn])
    outcome: object
    with socket.create_connection((proxy_tls.host, proxy_tls.port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw) as tls:
                tls.sendall(startup_packet(user="trust_user", database="app"))
                outcome = read_message(tls.recv)
        except (ssl.SSLError, EOFError, ConnectionError) as exc:
            outcome = exc
    if isinstance(outcome, tuple):
        mtype, body = outcome
        assert mtype == b"E", (
            f"direct TLS without ALPN 'postgresql' (offered {alpn!r}) was accepted: "
            f"got {mtype!r} {body!r}"
        )


# -- 5. upstream TLS ----------------------------------------------------------------


def test_upstream_tls_require(proxy_upstream_require: ScalpleServer, pg: PostgresCluster) -> None:
    for user in ALL_ROLES:
        with connect(proxy_dsn(proxy_upstream_require, pg, user)) as conn:
            assert scalar(conn, "select current_user") == user
            assert upstream_uses_tls(conn)
            assert not conn.pgconn.ssl_in_use


@pytest.mark.parametrize("user", ALL_ROLES)
def test_upstream_tls_verify_full(
    proxy_tls_both: ScalpleServer, pg: PostgresCluster, user: str
) -> None:
    app = tag()
    dsn = proxy_dsn(proxy_tls_both, pg, user, sslmode="disable", application_name=app)
    with connect(dsn) as conn:
        assert not conn.pgconn.ssl_in_use
        assert upstream_uses_tls(conn)
        assert scalar(conn, "select current_user") == user
        assert len(scalar(conn, "select repeat('y', 500000)")) == 500_000
    (record,) = session_opens(proxy_tls_both, app)
    assert record["tls"] is False


@pytest.mark.parametrize("user", ALL_ROLES)
def test_tls_on_both_sides_without_channel_binding(
    proxy_tls_both: ScalpleServer, pg: PostgresCluster, user: str
) -> None:
    """TLS client -> proxy and proxy -> PostgreSQL, client not attempting channel binding."""
    app = tag()
    dsn = proxy_dsn(
        proxy_tls_both,
        pg,
        user,
        sslmode="require",
        channel_binding="disable",
        application_name=app,
    )
    with connect(dsn) as conn:
        assert conn.pgconn.ssl_in_use
        assert upstream_uses_tls(conn)
        assert scalar(conn, "select current_user") == user
        assert len(scalar(conn, "select repeat('y', 500000)")) == 500_000
    (record,) = session_opens(proxy_tls_both, app)
    assert record["tls"] is True


def test_upstream_plain_by_default(proxy_direct: ScalpleServer, pg: PostgresCluster) -> None:
    with connect(proxy_dsn(proxy_direct, pg, "app_user")) as conn:
        assert not upstream_uses_tls(conn)


@pytest.mark.parametrize("failure", ["wrong-ca", "wrong-name"])
def test_upstream_verify_full_failure(
    proxy_factory: ProxyFactory, pg: PostgresCluster, tmp_path: Path, failure: str
) -> None:
    assert pg.ca_cert is not None
    upstream: dict[str, object] = {"tls": "verify-full"}
    if failure == "wrong-ca":
        upstream.update(tls_ca_file=str(self_signed_ca(tmp_path)), tls_server_name="localhost")
    else:
        upstream.update(tls_ca_file=str(pg.ca_cert), tls_server_name="not-the-server.example")
    proxy = proxy_factory(f"{pg.host}:{pg.port}", {"upstream": upstream})

    start = time.monotonic()
    with pytest.raises(psycopg.OperationalError) as info:
        connect(proxy_dsn(proxy, pg, "app_user"))
    assert time.monotonic() - start < CONNECT_TIMEOUT
    message = str(info.value)
    assert "TLS with upstream" in message, message
    assert "certificate verify failed" in message.lower(), message

    async def go() -> None:
        await asyncpg.connect(
            host=proxy.host,
            port=proxy.port,
            user="app_user",
            password="app_pass",
            database="app",
            timeout=CONNECT_TIMEOUT,
        )

    with pytest.raises(asyncpg.PostgresError) as ainfo:
        run_async(go())
    assert ainfo.value.sqlstate == "08006"
    assert "TLS" in str(ainfo.value)

    records = proxy.wait_for_records(lambda rs: len(rs) >= 2, kind="session_reject")
    assert {r["sqlstate"] for r in records} == {"08006"}
    assert all("TLS" in r["reason"] for r in records)
    assert proxy.records("session_open") == []


def test_upstream_tls_require_against_plain_upstream(
    proxy_factory: ProxyFactory, bouncer: PgBouncer, pg: PostgresCluster
) -> None:
    """PgBouncer here has no TLS: it answers 'N', and tls=require must not fall back."""
    proxy = proxy_factory(f"{bouncer.host}:{bouncer.port}", {"upstream": {"tls": "require"}})
    with pytest.raises(psycopg.OperationalError, match="does not accept TLS"):
        connect(proxy_dsn(proxy, pg, "app_user"))
    (record,) = proxy.wait_for_records(lambda rs: len(rs) >= 1, kind="session_reject")
    assert record["sqlstate"] == "08006"


# -- 6. SCRAM channel binding (SCRAM-SHA-256-PLUS) -----------------------------------
#
# tls-server-end-point binds SCRAM to the hash of the certificate the client saw.
# Through a TLS-terminating proxy that is the proxy's certificate, so PLUS only
# works when the proxy presents the server's own certificate.  With a different
# certificate, PLUS must not be offered (libpq's channel_binding=require then
# refuses by itself); and a client that supports channel binding but is not
# offered it sends the GS2 flag "y", which PostgreSQL on a TLS connection must
# reject (RFC 5802 downgrade protection) - the proxy cannot rewrite that flag
# because it is covered by the SCRAM proof.


@pytest.fixture(scope="module")
def proxy_server_cert(pg: PostgresCluster) -> Iterator[ScalpleServer]:
    """Client TLS with PostgreSQL's own certificate and key, verified TLS upstream."""
    assert pg.server_cert and pg.server_key and pg.ca_cert
    server = {"tls_cert": str(pg.server_cert), "tls_key": str(pg.server_key)}
    upstream = {
        "tls": "verify-full",
        "tls_ca_file": str(pg.ca_cert),
        "tls_server_name": "localhost",
    }
    yield from _serve(f"{pg.host}:{pg.port}", {"server": server, "upstream": upstream})


def test_postgres_offers_scram_plus_directly(pg: PostgresCluster) -> None:
    """The premise: over TLS, PostgreSQL itself offers channel binding."""
    with connect(pg.dsn("app_user", sslmode="require", channel_binding="require")) as conn:
        assert scalar(conn, "select 1") == 1


@pytest.mark.parametrize(
    ("user", "channel_binding"),
    [
        ("app_user", "prefer"),
        ("app_user", "require"),
        ("md5_user", "prefer"),
        ("pw_user", "prefer"),
        ("trust_user", "prefer"),
    ],
)
def test_channel_binding_through_proxy_with_servers_certificate(
    proxy_server_cert: ScalpleServer, pg: PostgresCluster, user: str, channel_binding: str
) -> None:
    """Same certificate on both hops: SCRAM-SHA-256-PLUS must reach the client, and
    the binding (hash of that one certificate) verifies end to end.  libpq's default
    channel_binding=prefer is what every TLS client uses."""
    dsn = proxy_dsn(proxy_server_cert, pg, user, sslmode="require", channel_binding=channel_binding)
    with connect(dsn) as conn:
        assert conn.pgconn.ssl_in_use
        assert upstream_uses_tls(conn)
        assert scalar(conn, "select current_user") == user


def test_channel_binding_default_psql_with_servers_certificate(
    proxy_server_cert: ScalpleServer, pg: PostgresCluster
) -> None:
    """psql with default settings (sslmode=prefer, channel_binding=prefer)."""
    result = psql(
        proxy_server_cert.dsn(user="app_user", dbname="app"), "select 'ok'", password="app_pass"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("user", ["md5_user", "pw_user", "trust_user"])
def test_channel_binding_prefer_non_scram_roles_through_proxy(
    proxy_tls_both: ScalpleServer, pg: PostgresCluster, user: str
) -> None:
    dsn = proxy_dsn(proxy_tls_both, pg, user, sslmode="require", channel_binding="prefer")
    with connect(dsn) as conn:
        assert conn.pgconn.ssl_in_use
        assert upstream_uses_tls(conn)
        assert scalar(conn, "select current_user") == user


def test_channel_binding_prefer_scram_with_proxys_own_certificate(
    proxy_tls_both: ScalpleServer, pg: PostgresCluster
) -> None:
    """The inherent limit (see the section comment): PLUS is withheld, the client
    answers with GS2 flag "y", PostgreSQL over TLS refuses.  It must fail fast, say
    why, and leave the proxy healthy."""
    before = len(rejects_of(proxy_tls_both, "app_user"))
    start = time.monotonic()
    dsn = proxy_dsn(proxy_tls_both, pg, "app_user", sslmode="require", channel_binding="prefer")
    with pytest.raises(psycopg.OperationalError) as info:
        connect(dsn)
    assert time.monotonic() - start < CONNECT_TIMEOUT - 1
    assert "channel binding" in str(info.value), str(info.value)
    assert wait_new_reject(proxy_tls_both, "app_user", before)["sqlstate"] == "28000"
    with connect(proxy_dsn(proxy_tls_both, pg, "app_user", sslmode="disable")) as conn:
        assert scalar(conn, "select 1") == 1


def test_channel_binding_require_fails_cleanly(
    proxy_tls_both: ScalpleServer, pg: PostgresCluster
) -> None:
    """Proxy with its own certificate: SCRAM-SHA-256-PLUS is not offered, so libpq
    refuses by itself instead of failing the binding check (or hanging)."""
    start = time.monotonic()
    dsn = proxy_dsn(proxy_tls_both, pg, "app_user", sslmode="require", channel_binding="require")
    with pytest.raises(psycopg.OperationalError) as info:
        connect(dsn)
    assert time.monotonic() - start < CONNECT_TIMEOUT - 1, "channel_binding=require hung"
    # libpq's own refusal (no SCRAM-SHA-256-PLUS on offer), not a server error.
    message = str(info.value)
    assert "channel binding is required, but server did not offer" in message, message
    assert "FATAL" not in message, message
    # The proxy survives it.
    survivor = proxy_dsn(
        proxy_tls_both, pg, "app_user", sslmode="require", channel_binding="disable"
    )
    with connect(survivor) as conn:
        assert scalar(conn, "select 1") == 1


def test_channel_binding_through_proxy_plain_upstream(
    proxy_tls: ScalpleServer, pg: PostgresCluster
) -> None:
    """Without upstream TLS PostgreSQL offers no PLUS and accepts flag "y": prefer works."""
    dsn = proxy_dsn(proxy_tls, pg, "app_user", sslmode="require", channel_binding="prefer")
    with connect(dsn) as conn:
        assert conn.pgconn.ssl_in_use
        assert not upstream_uses_tls(conn)
        assert scalar(conn, "select 1") == 1


def _sasl(*mechanisms: bytes) -> bytes:
    return struct.pack("!I", P.AUTH_SASL) + b"".join(m + b"\0" for m in mechanisms) + b"\0"


@pytest.mark.parametrize(
    ("offered", "kept"),
    [
        ((b"SCRAM-SHA-256-PLUS", b"SCRAM-SHA-256"), (b"SCRAM-SHA-256",)),
        ((b"SCRAM-SHA-256", b"SCRAM-SHA-256-PLUS"), (b"SCRAM-SHA-256",)),
        ((b"SCRAM-SHA-256",), (b"SCRAM-SHA-256",)),
        (
            (b"OAUTHBEARER", b"SCRAM-SHA-256-PLUS", b"SCRAM-SHA-256"),
            (b"OAUTHBEARER", b"SCRAM-SHA-256"),
        ),
        ((b"SCRAM-SHA-256-PLUS",), ()),
        ((), ()),
    ],
)
def test_strip_scram_plus(offered: tuple[bytes, ...], kept: tuple[bytes, ...]) -> None:
    assert P.strip_scram_plus(_sasl(*offered)) == _sasl(*kept)


def test_strip_scram_plus_is_a_valid_message() -> None:
    body = P.strip_scram_plus(_sasl(b"SCRAM-SHA-256-PLUS", b"SCRAM-SHA-256"))
    message = P.build_message(b"R", body)
    assert message[0:1] == b"R"
    assert int.from_bytes(message[1:5], "big") == len(message) - 1
    assert P.auth_code(body) == P.AUTH_SASL
    assert body.endswith(b"SCRAM-SHA-256\0\0")


# -- 7. cancel ---------------------------------------------------------------------


def cancel_running_query(proxy: ScalpleServer, pg: PostgresCluster, dsn: str, method: str) -> None:
    """Run ``pg_sleep(30)`` through ``proxy``, cancel it with ``conn.<method>()`` and
    check the client sees QueryCanceled promptly, the session goes on, and the audit
    log has the statement as an error with SQLSTATE 57014."""
    marker = tag()
    outcome: dict[str, Any] = {}
    active = (
        "select pid from pg_stat_activity "
        f"where state = 'active' and query like '%{marker}%' and pid <> pg_backend_pid()"
    )
    with connect(dsn) as conn, connect(pg.dsn("postgres")) as admin:

        def run() -> None:
            try:
                conn.execute(f"select pg_sleep(30) /* {marker} */")
            except BaseException as exc:
                outcome["error"] = exc
            outcome["at"] = time.monotonic()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        try:
            deadline = time.monotonic() + 10
            while admin.execute(active).fetchone() is None:
                assert time.monotonic() < deadline, "the query never started"
                time.sleep(0.02)
            cancelled_at = time.monotonic()
            getattr(conn, method)()
            worker.join(5)
            assert not worker.is_alive(), f"conn.{method}() did not cancel the query within 5s"
        finally:
            if worker.is_alive():  # keep a failing test fast: cancel behind the proxy's back
                admin.execute(f"select pg_cancel_backend(pid) from ({active}) a")
                worker.join(10)
        error = outcome.get("error")
        assert isinstance(error, pg_errors.QueryCanceled), repr(error)
        assert error.sqlstate == "57014"
        assert outcome["at"] - cancelled_at < 5
        # The session goes on after the cancelled statement.
        assert scalar(conn, "select 7") == 7

    records = proxy.wait_for_records(
        lambda rs: any(r["query"] and marker in r["query"] for r in rs)
    )
    (record,) = [r for r in records if r["query"] and marker in r["query"]]
    assert record["status"] == "error"
    assert record["sqlstate"] == "57014"
    # Whatever sits behind the proxy survived the cancel (PgBouncer 1.18 crashes when
    # the cancel connection is dropped before it is done, pgbouncer#801).
    time.sleep(0.1)
    with connect(dsn) as conn:
        assert scalar(conn, "select 8") == 8


@pytest.fixture(params=["bouncer", "direct"])
def cancel_route(
    request: pytest.FixtureRequest, pg: PostgresCluster, proxy_factory: ProxyFactory
) -> Iterator[Route]:
    """Like ``route``, but the bouncer route gets a PgBouncer of its own: a proxy that
    drops the cancel connection early crashes PgBouncer 1.18 (pgbouncer#801), which
    must not take the shared one (and every later test) down with it."""
    if request.param == "direct":
        yield Route("direct", request.getfixturevalue("proxy_direct"), pg)
        return
    pool = PgBouncer(pg, pool_mode="transaction", default_pool_size=5, max_client_conn=50)
    pool.start()
    try:
        yield Route("bouncer", proxy_factory(f"{pool.host}:{pool.port}"), pg)
    finally:
        pool.cleanup()


@pytest.mark.parametrize("method", ["cancel", "cancel_safe"])
def test_cancel(cancel_route: Route, pg: PostgresCluster, method: str) -> None:
    dsn = cancel_route.dsn(connect_timeout=str(CONNECT_TIMEOUT))
    cancel_running_query(cancel_route.proxy, pg, dsn, method)


@pytest.mark.parametrize("method", ["cancel", "cancel_safe"])
def test_cancel_over_tls(proxy_tls: ScalpleServer, pg: PostgresCluster, method: str) -> None:
    """With libpq >= 17 cancel_safe() negotiates TLS for the cancel connection like for
    the session (SSLRequest, handshake, CancelRequest inside TLS); cancel() does not."""
    dsn = proxy_dsn(proxy_tls, pg, "app_user", sslmode="require")
    cancel_running_query(proxy_tls, pg, dsn, method)


def test_cancel_request_by_hand_gets_closed(proxy_direct: ScalpleServer) -> None:
    """A CancelRequest with an unknown key gets no answer, only the connection closed."""
    with socket.create_connection((proxy_direct.host, proxy_direct.port), timeout=5) as sock:
        sock.sendall(struct.pack("!IIII", 16, P.CANCEL_REQUEST_CODE, 12345, 67890))
        assert sock.recv(16) == b""


# -- 8. session records ------------------------------------------------------------


def test_session_open_fields(route: Route) -> None:
    app = tag()
    with connect(route.dsn(application_name=app)) as conn:
        client_addr = local_addr(conn)
        assert scalar(conn, "select 1") == 1
    (record,) = session_opens(route.proxy, app)
    assert record["db_role"] == "app_user"
    assert record["database"] == "app"
    assert record["application_name"] == app
    assert record["client_addr"] == client_addr
    assert record["tls"] is False
    assert record["identity_source"] == "none"
    assert record["session_id"]
    closes = route.proxy.wait_for_records(
        lambda rs: any(r["session_id"] == record["session_id"] for r in rs), kind="session_close"
    )
    (close,) = [r for r in closes if r["session_id"] == record["session_id"]]
    assert close["client_addr"] == client_addr
    assert close["db_role"] == "app_user"


@pytest.mark.parametrize("user", ALL_ROLES)
def test_session_open_fields_per_role(
    proxy_tls: ScalpleServer, pg: PostgresCluster, user: str
) -> None:
    app = tag()
    dsn = proxy_dsn(proxy_tls, pg, user, dbname="postgres", sslmode="require", application_name=app)
    with connect(dsn) as conn:
        client_addr = local_addr(conn)
    (record,) = session_opens(proxy_tls, app)
    assert (record["db_role"], record["database"], record["client_addr"], record["tls"]) == (
        user,
        "postgres",
        client_addr,
        True,
    )


def test_session_open_database_defaults_to_user(proxy_direct: ScalpleServer) -> None:
    """A startup packet without ``database`` means the database named like the user."""
    with socket.create_connection((proxy_direct.host, proxy_direct.port), timeout=5) as sock:
        host, port = sock.getsockname()[:2]
        client_addr = f"{host}:{port}"
        sock.sendall(startup_packet(user="postgres"))
        messages = read_until_ready(sock.recv)
        assert messages[-1][0] == b"Z", messages
        sock.sendall(b"X\0\0\0\4")
    records = proxy_direct.wait_for_records(
        lambda rs: any(r["client_addr"] == client_addr for r in rs), kind="session_open"
    )
    (record,) = [r for r in records if r["client_addr"] == client_addr]
    assert (record["db_role"], record["database"], record["application_name"]) == (
        "postgres",
        "postgres",
        "",
    )
