"""Bad input and broken peers: each gets a clear error, loses nothing, and
disturbs no other session."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator

import asyncpg
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scalple import protocol as P
from scalple.devcluster import PgBouncer, PostgresCluster, free_port
from scalple.devproxy import ScalpleServer
from tests.conftest import ProxyFactory


def startup_packet(user: str = "trust_user", database: str = "app", **extra: str) -> bytes:
    return P.build_startup(
        P.StartupPacket(P.PROTOCOL_3, {"user": user, "database": database, **extra})
    )


def read_messages(sock: socket.socket, timeout: float = 5.0) -> list[tuple[bytes, bytes]]:
    """Every message until the peer closes (or ``timeout`` passes)."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(socket.timeout, ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    messages = []
    while len(data) >= 5:
        length = struct.unpack("!I", data[1:5])[0]
        messages.append((data[:1], data[5 : 1 + length]))
        data = data[1 + length :]
    return messages


def error_of(messages: list[tuple[bytes, bytes]]) -> dict[str, str]:
    errors = [P.parse_error_fields(body) for mtype, body in messages if mtype == b"E"]
    assert errors, f"no ErrorResponse in {messages!r}"
    return errors[-1]


@contextlib.contextmanager
def raw(proxy: ScalpleServer) -> Iterator[socket.socket]:
    sock = socket.create_connection((proxy.host, proxy.port), timeout=5)
    try:
        yield sock
    finally:
        sock.close()


def ready_session(proxy: ScalpleServer) -> socket.socket:
    """A raw, authenticated session (trust) straight to PostgreSQL."""
    sock = socket.create_connection((proxy.host, proxy.port), timeout=5)
    sock.sendall(startup_packet())
    data = b""
    while not data.endswith(P.build_message(b"Z", b"I")):
        chunk = sock.recv(65536)
        assert chunk, f"closed during startup: {data!r}"
        data += chunk
    return sock


def healthy(proxy: ScalpleServer, pg: PostgresCluster) -> None:
    with psycopg.connect(proxy.dsn(user="app_user", password="app_pass", dbname="app")) as conn:
        assert conn.execute("select 41 + 1").fetchone() == (42,)


# -- malformed input ---------------------------------------------------------


def test_garbage_before_startup(proxy_direct: ScalpleServer, pg: PostgresCluster) -> None:
    with raw(proxy_direct) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        error = error_of(read_messages(sock))
    assert error["C"] == "08P01" and "invalid length of startup packet" in error["M"]
    healthy(proxy_direct, pg)
    rejects = proxy_direct.wait_for_records(
        lambda rs: any("invalid length" in (r["reason"] or "") for r in rs), kind="session_reject"
    )
    assert rejects


def test_unsupported_protocol_version(proxy_direct: ScalpleServer) -> None:
    with raw(proxy_direct) as sock:
        sock.sendall(struct.pack("!II", 8, 2 << 16))
        error = error_of(read_messages(sock))
    assert error["C"] == "08P01" and "unsupported frontend protocol" in error["M"]


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b"!" + struct.pack("!I", 4), "unknown message type"),
        (b"Q" + struct.pack("!I", 2), "invalid message length"),
        (b"Q" + struct.pack("!I", 0x7FFFFFF0), "over the limit"),
    ],
)
def test_malformed_frame_after_startup(
    proxy_direct: ScalpleServer, pg: PostgresCluster, frame: bytes, message: str
) -> None:
    with healthy_neighbour(proxy_direct) as neighbour:
        sock = ready_session(proxy_direct)
        try:
            sock.sendall(frame)
            error = error_of(read_messages(sock))
        finally:
            sock.close()
        assert error["C"] == "08P01" and message in error["M"]
        assert neighbour.execute("select 1").fetchone() == (1,)
    assert proxy_direct.log_contains("protocol violation")


def test_configurable_message_cap(proxy_factory: ProxyFactory, pg: PostgresCluster) -> None:
    proxy = proxy_factory(f"{pg.host}:{pg.port}", {"server": {"max_message_size": 4096}})
    with psycopg.connect(proxy.dsn(user="app_user", password="app_pass", dbname="app")) as conn:
        assert conn.execute("select length(%s)", ("x" * 1000,)).fetchone() == (1000,)
        with pytest.raises(psycopg.OperationalError, match="over the limit of 4096"):
            conn.execute("select length(%s)", ("x" * 10_000,))
    healthy(proxy, pg)


@contextlib.contextmanager
def healthy_neighbour(proxy: ScalpleServer) -> Iterator[psycopg.Connection]:
    with psycopg.connect(
        proxy.dsn(user="app_user", password="app_pass", dbname="app"), autocommit=True
    ) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        yield conn


_frontend_types = st.sampled_from([*list(P.FRONTEND_ALLOWED), 0, ord("!"), ord("z"), 255])
_frames = st.lists(
    st.tuples(_frontend_types, st.integers(min_value=-4, max_value=300), st.binary(max_size=64)),
    min_size=1,
    max_size=6,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(frames=_frames, pre_startup=st.booleans())
def test_fuzzed_frames_never_disturb_a_healthy_session(
    proxy_direct: ScalpleServer, frames: list[tuple[int, int, bytes]], pre_startup: bool
) -> None:
    """Random, mostly malformed frames, before or after startup; meanwhile a
    healthy session keeps working and the proxy keeps accepting."""
    with healthy_neighbour(proxy_direct) as neighbour:
        payload = b"".join(
            bytes([t]) + struct.pack("!i", 4 + len(body) + delta) + body
            for t, delta, body in frames
        )
        payload += b"X" + struct.pack("!I", 4)  # Terminate, if it got that far
        sock = (
            socket.create_connection((proxy_direct.host, proxy_direct.port), timeout=5)
            if pre_startup
            else ready_session(proxy_direct)
        )
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)  # an incomplete frame then ends in EOF
            read_messages(sock, timeout=5)  # the proxy answers or closes; never hangs
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            sock.close()
        assert neighbour.execute("select 2").fetchone() == (2,)


# -- broken upstream -----------------------------------------------------------


def test_upstream_unreachable_gives_clear_error(proxy_factory: ProxyFactory) -> None:
    dead = free_port()
    proxy = proxy_factory(f"127.0.0.1:{dead}", {"upstream": {"connect_timeout": 2.0}})
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(
            proxy.dsn(user="app_user", password="x", dbname="app", connect_timeout="10")
        )
    assert f"could not connect to upstream 127.0.0.1:{dead}" in str(info.value)
    rejects = proxy.wait_for_records(lambda rs: len(rs) == 1, kind="session_reject")
    assert rejects[0]["sqlstate"] == "08006" and rejects[0]["db_role"] == "app_user"


def test_upstream_killed_mid_query(proxy_factory: ProxyFactory, pg: PostgresCluster) -> None:
    bouncer = PgBouncer(pg)
    bouncer.start()
    try:
        proxy = proxy_factory(f"{bouncer.host}:{bouncer.port}")
        marker = "k" + uuid.uuid4().hex[:8]
        errors: list[BaseException] = []
        conn = psycopg.connect(
            proxy.dsn(
                user="app_user", password="app_pass", dbname="app", options="-c scalple.user_id=eve"
            )
        )

        def run() -> None:
            try:
                conn.execute(f"select pg_sleep(30) as {marker}")
            except BaseException as exc:
                errors.append(exc)

        worker = threading.Thread(target=run)
        worker.start()
        time.sleep(0.5)
        os.kill(bouncer.pid(), signal.SIGKILL)
        worker.join(10)
        assert not worker.is_alive(), "client hung after the upstream died"
        conn.close()
        assert errors and isinstance(errors[0], psycopg.OperationalError)
        assert "lost" in str(errors[0]) or "closed" in str(errors[0])
        records = proxy.wait_for_records(lambda rs: any(marker in (r["query"] or "") for r in rs))
        (record,) = [r for r in records if marker in (r["query"] or "")]
        assert record["status"] == "incomplete" and record["sqlstate"] == "08006"
        assert record["session_user_id"] == "eve"
        # A new upstream on the same port: the proxy serves again.
        bouncer.stop()
        bouncer.start()
        healthy(proxy, pg)
    finally:
        bouncer.cleanup()


# -- limits and shutdown -------------------------------------------------------


def test_connection_limit(proxy_factory: ProxyFactory, pg: PostgresCluster) -> None:
    proxy = proxy_factory(f"{pg.host}:{pg.port}", {"server": {"max_client_conn": 2}})
    dsn = proxy.dsn(user="app_user", password="app_pass", dbname="app")
    with (
        psycopg.connect(dsn),
        psycopg.connect(dsn),
        pytest.raises(psycopg.OperationalError, match="too many clients"),
    ):
        psycopg.connect(dsn)
    # The slots free up once the proxy has seen both sockets close.
    deadline = time.monotonic() + 5
    while True:
        try:
            healthy(proxy, pg)
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_sigterm_lets_open_transaction_finish(
    proxy_factory: ProxyFactory, pg: PostgresCluster
) -> None:
    proxy = proxy_factory(f"{pg.host}:{pg.port}", {"server": {"shutdown_timeout": 20.0}})
    marker = "g" + uuid.uuid4().hex[:8]
    pg.psql(f"create table {marker} (a int); grant all on {marker} to app_user")
    conn = psycopg.connect(proxy.dsn(user="app_user", password="app_pass", dbname="app"))
    conn.execute(f"insert into {marker} values (1)")  # transaction open
    idle = psycopg.connect(
        proxy.dsn(user="app_user", password="app_pass", dbname="app"), autocommit=True
    )
    proxy.signal(signal.SIGTERM)
    time.sleep(0.3)
    # The idle session was told and closed; new connections are refused.
    with pytest.raises(psycopg.OperationalError):
        idle.execute("select 1")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(
            proxy.dsn(user="app_user", password="app_pass", dbname="app", connect_timeout="3")
        )
    conn.execute(f"insert into {marker} values (2)")
    conn.commit()  # the open transaction finished
    assert proxy.stop() == 0
    assert pg.psql(f"select count(*) from {marker}") == "2"
    inserts = [r for r in proxy.records() if marker in (r["query"] or "")]
    assert [r["status"] for r in inserts] == ["ok", "ok"]
    conn.close()
    idle.close()


def test_five_hundred_concurrent_clients(proxy_bouncer: ScalpleServer) -> None:
    marker = "c" + uuid.uuid4().hex[:8]
    clients = 500

    async def client(i: int) -> int:
        conn = await asyncpg.connect(
            host=proxy_bouncer.host,
            port=proxy_bouncer.port,
            user="app_user",
            password="app_pass",
            database="app",
            statement_cache_size=0,
            server_settings={"scalple.user_id": f"user{i}"},
            timeout=60,
        )
        try:
            total = 0
            for j in range(3):
                total += await conn.fetchval(f"select $1::int + {j} as {marker}", i)
            return total
        finally:
            await conn.close()

    async def main() -> list[int]:
        return await asyncio.gather(*(client(i) for i in range(clients)))

    results = asyncio.run(main())
    assert results == [3 * i + 3 for i in range(clients)]
    records = proxy_bouncer.wait_for_records(
        lambda rs: sum(marker in (r["query"] or "") for r in rs) >= 3 * clients, timeout=30
    )
    mine = [r for r in records if marker in (r["query"] or "")]
    assert len(mine) == 3 * clients
    assert {r["session_user_id"] for r in mine} == {f"user{i}" for i in range(clients)}
    assert all(r["params"][0] == r["session_user_id"][4:] for r in mine)
