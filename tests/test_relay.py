"""Steady-state relaying through Scalple -> PgBouncer and Scalple -> PostgreSQL,
with real clients, and the statement events the relay emits on the side."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import uuid
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.conftest import Route


def tag() -> str:
    """A unique marker so each test finds its own records in a shared log."""
    return "t" + uuid.uuid4().hex[:12]


def mine(route: Route, marker: str, expected: int, **kw: Any) -> list[dict[str, Any]]:
    return route.proxy.wait_for_records(
        lambda rs: sum(1 for r in rs if r["query"] and marker in r["query"]) >= expected, **kw
    )


def only(records: list[dict[str, Any]], marker: str) -> list[dict[str, Any]]:
    return [r for r in records if r["query"] and marker in r["query"]]


def psql(route: Route, sql: str, *, options: str | None = None, user: str = "app_user") -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSWORD"] = route.pg.role(user).password or ""
    if options is not None:
        env["PGOPTIONS"] = options
    result = subprocess.run(
        [
            "psql",
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            route.proxy.host,
            "-p",
            str(route.proxy.port),
            "-U",
            user,
            "-d",
            "app",
            "-c",
            sql,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


# -- identity in the startup packet ------------------------------------------


def test_psql_identity_is_recorded_and_stripped_upstream(route: Route) -> None:
    marker = tag()
    out = psql(
        route,
        f"select coalesce(current_setting('scalple.user_id', true), '') = '' as {marker}",
        options=r"-c scalple.user_id=john\ doe -c scalple.email=john@example.com",
    )
    # The setting never reached PostgreSQL (and PgBouncer accepted it). A pooled
    # server connection may report '' once any client used SET LOCAL scalple.*.
    assert out == "t"
    (record,) = only(mine(route, marker, 1), marker)
    assert record["session_user_id"] == "john doe"
    assert record["session_email"] == "john@example.com"
    assert record["identity_source"] == "startup"
    assert record["db_role"] == "app_user" and record["database"] == "app"
    assert record["application_name"] == "psql"
    assert record["command"] == "SELECT" and record["rows"] == 1 and record["status"] == "ok"


def test_other_options_are_forwarded(route: Route) -> None:
    if route.name == "bouncer":
        pytest.skip("PgBouncer 1.18 rejects any remaining options; covered by the direct route")
    out = psql(
        route, "show statement_timeout", options="-c scalple.user_id=7 -c statement_timeout=4321"
    )
    assert out == "4321ms"


def test_without_identity_session_says_none(route: Route) -> None:
    marker = tag()
    psql(route, f"select 1 as {marker}")
    (record,) = only(mine(route, marker, 1), marker)
    assert record["session_user_id"] is None and record["identity_source"] == "none"


def test_two_people_over_pooled_connections(route: Route) -> None:
    """The reason the product exists: PgBouncer hands both the same server
    connections, yet each statement is attributed to its person."""
    marker = tag()
    with (
        psycopg.connect(route.dsn(options="-c scalple.user_id=alice")) as alice,
        psycopg.connect(route.dsn(options="-c scalple.user_id=bob")) as bob,
    ):
        alice.autocommit = bob.autocommit = True
        for i in range(5):
            alice.execute(f"select {i} as {marker}_alice")
            bob.execute(f"select {i} as {marker}_bob")
    records = only(mine(route, marker, 10), marker)
    by_user = {(r["session_user_id"], r["query"].split()[-1].split("_")[-1]) for r in records}
    assert by_user == {("alice", "alice"), ("bob", "bob")}


# -- simple and extended protocol --------------------------------------------


def test_multi_statement_simple_query_is_matched_per_statement(route: Route) -> None:
    marker = tag()
    psql(
        route,
        f"create temp table {marker}(a int); insert into {marker} values (1),(2),(3); "
        f"update {marker} set a = a + 1 where a > 1; select * from {marker}",
    )
    records = only(mine(route, marker, 4), marker)
    assert [(r["query"], r["tag"], r["rows"]) for r in records] == [
        (f"create temp table {marker}(a int)", "CREATE TABLE", None),
        (f"insert into {marker} values (1),(2),(3)", "INSERT 0 3", 3),
        (f"update {marker} set a = a + 1 where a > 1", "UPDATE 2", 2),
        (f"select * from {marker}", "SELECT 3", 3),
    ]
    assert [r["statement_id"] for r in records] == sorted(r["statement_id"] for r in records)


def test_error_in_multi_statement_query_ends_it(route: Route) -> None:
    marker = tag()
    with psycopg.connect(route.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute(f"select 1 as {marker}; select 1/0 as {marker}; select 2 as {marker}")
        conn.execute("select 1")  # the session goes on
    records = only(mine(route, marker, 2), marker)
    assert [(r["query"], r["status"], r["sqlstate"]) for r in records] == [
        (f"select 1 as {marker}", "ok", None),
        (f"select 1/0 as {marker}", "error", "22012"),
    ]


def test_extended_protocol_params_are_recorded(route: Route) -> None:
    marker = tag()
    with psycopg.connect(route.dsn(), autocommit=True) as conn:
        row = conn.execute(
            f"select %s::int + %s::int as {marker}, %s::text", (40, 2, None)
        ).fetchone()
        assert row == (42, None)
        # binary parameters render as hex
        conn.execute(f"select %b::bytea as {marker}", (b"\x01\x02",))
    records = only(mine(route, marker, 2), marker)
    assert records[0]["protocol"] == "extended"
    assert records[0]["params"] == ["40", "2", None]
    assert records[0]["rows"] == 1 and records[0]["tag"] == "SELECT 1"
    assert records[1]["params"] == ["\\x0102"]


def test_pipeline_with_error_in_the_middle(route: Route) -> None:
    """Parse/Bind/Execute pipelined with one Sync; the server skips what follows
    the error, so exactly the statements that ran are recorded."""
    marker = tag()
    with psycopg.connect(route.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero), conn.pipeline():
            conn.execute(f"select %s::int as {marker}_1", (1,))
            conn.execute(f"select 1/%s::int as {marker}_2", (0,))
            conn.execute(f"select %s::int as {marker}_3", (3,))
        assert conn.execute("select 7").fetchone() == (7,)
        with conn.pipeline():
            for i in range(4, 8):
                conn.execute(f"select %s::int as {marker}_{i}", (i,))
    records = only(mine(route, marker, 6), marker)
    outcome = [(r["query"].rsplit("_", 1)[1], r["status"], r["sqlstate"]) for r in records]
    assert outcome == [
        ("1", "ok", None),
        ("2", "error", "22012"),
        ("4", "ok", None),
        ("5", "ok", None),
        ("6", "ok", None),
        ("7", "ok", None),
    ]


def test_asyncpg_prepared_cursor_and_executemany(route: Route) -> None:
    marker = tag()

    async def work() -> None:
        # Named prepared statements do not survive PgBouncer transaction
        # mode, hence no statement cache; asyncpg then uses unnamed ones.
        conn = await asyncpg.connect(
            host=route.proxy.host,
            port=route.proxy.port,
            user="app_user",
            password="app_pass",
            database="app",
            statement_cache_size=0,
            server_settings={"scalple.user_id": "carol"},
        )
        try:
            await conn.execute(f"create table {marker} (a int)")
            await conn.executemany(f"insert into {marker} values ($1)", [(i,) for i in range(10)])
            async with conn.transaction():
                cursor = await conn.cursor(f"select a from {marker} order by a")
                first = await cursor.fetch(3)
                second = await cursor.fetch(4)
                assert [r[0] for r in first + second] == list(range(7))
            assert await conn.fetchval(f"select count(*) from {marker}") == 10
            await conn.execute(f"drop table {marker}")
        finally:
            await conn.close()

    asyncio.run(work())
    records = only(mine(route, marker, 14), marker)
    assert all(r["session_user_id"] == "carol" for r in records)
    inserts = [r for r in records if r["command"] == "INSERT"]
    assert len(inserts) == 10 and sorted(r["params"][0] for r in inserts) == [
        str(i) for i in range(10)
    ]
    cursor = [r for r in records if r["query"].startswith("select a from")]
    assert len(cursor) == 1 and cursor[0]["rows"] == 7  # two suspended Executes, one statement


# -- COPY, notifications, function calls, large results ----------------------


def test_copy_in_and_out(route: Route) -> None:
    marker = tag()
    with psycopg.connect(route.dsn()) as conn:
        conn.execute(f"create temp table {marker} (a int, b text)")
        with conn.cursor().copy(f"copy {marker} from stdin") as copy:
            for i in range(1000):
                copy.write_row((i, f"row {i}"))
        out = io.BytesIO()
        with conn.cursor().copy(f"copy {marker} to stdout") as copy:
            for chunk in copy:
                out.write(chunk)
        conn.commit()
    assert out.getvalue().count(b"\n") == 1000
    records = only(mine(route, marker, 3), marker)
    copies = [(r["tag"], r["rows"]) for r in records if r["command"] == "COPY"]
    assert copies == [("COPY 1000", 1000), ("COPY 1000", 1000)]


def test_listen_notify(route: Route) -> None:
    if route.name == "bouncer":
        pytest.skip("LISTEN needs a session; PgBouncer transaction mode does not keep one")
    channel = tag()
    with (
        psycopg.connect(route.dsn(), autocommit=True) as listener,
        psycopg.connect(route.dsn(), autocommit=True) as sender,
    ):
        listener.execute(f"listen {channel}")
        sender.execute(f"notify {channel}, 'hello'")
        notifies = listener.notifies(timeout=5, stop_after=1)
        got = [(n.channel, n.payload) for n in notifies]
    assert got == [(channel, "hello")]


def test_function_call_protocol(route: Route, tmp_path: Any) -> None:
    """psql's \\lo_import uses the FunctionCall message (libpq fast path)."""
    source = tmp_path / "blob.bin"
    source.write_bytes(os.urandom(50_000))
    out = psql(route, f"\\lo_import {source}")
    oid = int(out.split()[-1])
    assert psql(route, f"select length(lo_get({oid}))") == "50000"
    psql(route, f"select lo_unlink({oid})")
    records = route.proxy.wait_for_records(lambda rs: any(r["protocol"] == "function" for r in rs))
    assert any(r["protocol"] == "function" and r["status"] == "ok" for r in records)


def test_hundred_megabyte_result(route: Route) -> None:
    marker = tag()
    total = 0
    with psycopg.connect(route.dsn(), autocommit=True) as conn, conn.cursor(binary=False) as cur:
        cur.execute(f"select repeat('x', 1000) as {marker} from generate_series(1, 100000)")
        while rows := cur.fetchmany(5000):
            total += sum(len(r[0]) for r in rows)
    assert total == 100_000_000
    (record,) = only(mine(route, marker, 1, timeout=30), marker)
    assert record["rows"] == 100_000 and record["tag"] == "SELECT 100000"


def test_terminate_closes_session_cleanly(route: Route) -> None:
    with psycopg.connect(route.dsn(options="-c scalple.user_id=dora")) as conn:
        conn.execute("select 1")
    closes = route.proxy.wait_for_records(
        lambda rs: any(r["session_user_id"] == "dora" for r in rs), kind="session_close"
    )
    assert any(
        r["session_user_id"] == "dora" and r["reason"] == "client terminated" for r in closes
    )


def test_error_details_with_row_values_are_not_stored(route: Route) -> None:
    """A unique violation's DETAIL quotes the row's value; the value came from
    a table, not the query text, so it must appear nowhere the proxy writes."""
    marker = tag()
    secret = f"{marker}-jane.secret@example.com"
    route.pg.psql(
        f"create table {marker}_src (email text); insert into {marker}_src values ('{secret}');"
        f"create table {marker}_dst (email text unique);"
        f"insert into {marker}_dst values ('{secret}');"
        f"grant all on {marker}_src, {marker}_dst to app_user"
    )
    with psycopg.connect(route.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UniqueViolation) as info:
            conn.execute(f"insert into {marker}_dst select email from {marker}_src")
        assert secret in str(info.value.diag.message_detail)  # the client does see it
    (record,) = only(mine(route, marker, 1), marker)
    assert record["status"] == "error" and record["sqlstate"] == "23505"
    assert secret.encode() not in route.proxy.log_bytes()
    assert secret not in route.proxy.stderr()
