"""The guarantee of the PII issue, end to end: a workload reads and writes
known personal data through every path (simple and extended protocol,
binary parameters, COPY, a unique violation whose DETAIL holds the value),
then every byte the proxy wrote (log directory, its own log, the metrics
page) is scanned for each value, raw, case-folded and JSON-escaped."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from scalple.devcluster import PostgresCluster, free_port
from scalple.devproxy import ScalpleServer

EMAILS = ["ana.lopez@example.org", "Bruno.Keller@Example.net", "chloe+tag@exemple.fr"]
PHONES = ["+33612345678", "+41791234567", "+4915112345678"]
IBANS = ["FR7630006000011234567890189", "CH9300762011623852957", "DE89370400440532013000"]
NAMES = ["Ana Lopez-Garcia", "Bruno Keller", "Chloé Dubois"]
SECRET_VALUES = EMAILS + PHONES + IBANS + NAMES

_SCHEMA = """
create table if not exists pii_users (
    id int primary key, email text unique, phone text, iban text, name text
);
create table if not exists pii_orders (id serial primary key, user_id int, amount numeric);
grant select, insert, update, delete on pii_users, pii_orders to app_user;
grant usage on sequence pii_orders_id_seq to app_user;
"""


@pytest.fixture
def masked_proxy(
    pg: PostgresCluster, catalog_password: str, tmp_path: Path
) -> Iterator[ScalpleServer]:
    yield from _masked_proxy(pg, catalog_password, tmp_path, subjects_limit=10_000)


def _masked_proxy(
    pg: PostgresCluster, catalog_password: str, tmp_path: Path, *, subjects_limit: int
) -> Iterator[ScalpleServer]:
    pg.psql(_SCHEMA)
    pg.psql("truncate pii_users, pii_orders")
    key = tmp_path / "masking.key"
    key.write_text("k" * 48 + "\n")
    key.chmod(0o600)
    metrics_port = free_port()
    config: dict[str, dict[str, object]] = {
        "catalog": {"password_file": catalog_password},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        "masking": {"key_file": str(key), "subjects_limit": subjects_limit},
        "log": {"checkpoint_mirror": str(tmp_path / "mirror"), "checkpoint_interval": 0.2},
        "pii": {
            "public.pii_users.email": "email",
            "public.pii_users.phone": "partial",
            "public.pii_users.iban": "redact",
            "public.pii_users.name": "pseudonym",
        },
        "subjects": {
            "public.pii_users.id": "customer",
            "public.pii_orders.user_id": "customer",
        },
    }
    proxy = ScalpleServer(f"{pg.host}:{pg.port}", tmp_path / "proxy", config=config)
    proxy.metrics_port = metrics_port  # type: ignore[attr-defined]
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.cleanup()


def _dsn(proxy: ScalpleServer) -> str:
    return proxy.dsn(
        user="app_user", password="app_pass", dbname="app", options="-c scalple.user_id=dpo-test"
    )


def _workload(proxy: ScalpleServer) -> None:
    with psycopg.connect(_dsn(proxy), autocommit=True) as conn:
        # simple protocol, literals
        conn.execute(
            f"insert into pii_users values (1001, '{EMAILS[0]}', '{PHONES[0]}', "
            f"'{IBANS[0]}', '{NAMES[0]}')",
            prepare=False,
        )
        conn.execute(
            f"select id, name from pii_users where email = '{EMAILS[0]}'", prepare=False
        ).fetchall()
        conn.execute(
            f"select id from pii_users where email in ('{EMAILS[0]}', '{EMAILS[1]}')",
            prepare=False,
        ).fetchall()
        conn.execute(
            "select id from pii_users where lower(email) like 'ana.lopez@%'", prepare=False
        ).fetchall()
        conn.execute(f"update pii_users set phone = '{PHONES[2]}' where id = 1001", prepare=False)
        # extended protocol, text parameters
        conn.execute(
            "insert into pii_users (id, email, phone, iban, name) values (%s, %s, %s, %s, %s)",
            (1002, EMAILS[1], PHONES[1], IBANS[1], NAMES[1]),
        )
        conn.execute("select * from pii_users where email = %s", (EMAILS[1],)).fetchall()
        conn.execute("select id from pii_users where email = any(%s)", ([EMAILS[0], EMAILS[1]],))
        conn.execute(
            "insert into pii_orders (user_id, amount) values (%s, 10), (1002, 20)", (1001,)
        )
        # COPY: the rows travel as CopyData, never captured
        with conn.cursor() as cur, cur.copy("copy pii_users from stdin") as copy:
            copy.write_row((1003, EMAILS[2], PHONES[2], IBANS[2], NAMES[2]))
        # a unique violation: PostgreSQL's DETAIL carries the email
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("insert into pii_users (id, email) values (%s, %s)", (1004, EMAILS[2]))
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(
                f"insert into pii_users (id, email) values (1005, '{EMAILS[0]}')", prepare=False
            )
        # standard_conforming_strings = off: a backslash-escaped quote would
        # put the value outside what a standard-strings lexer calls a literal
        conn.execute("set standard_conforming_strings = off")
        conn.execute(
            f"select id from pii_users where name = '\\' {EMAILS[1]} '", prepare=False
        ).fetchall()
        conn.execute("reset standard_conforming_strings")
        # a syntax error next to a value: the error names the token
        with pytest.raises(psycopg.errors.SyntaxError):
            conn.execute(f"select * from pii_users where email = '{EMAILS[1]}' '{IBANS[2]}'")

    async def binary() -> None:
        conn = await asyncpg.connect(
            host=proxy.host,
            port=proxy.port,
            user="app_user",
            password="app_pass",
            database="app",
            server_settings={"scalple.user_id": "dpo-test"},
        )
        try:
            await conn.fetch("select id from pii_users where iban = $1", IBANS[2])
            await conn.fetch("select email from pii_users where id = $1", 1003)
        finally:
            await conn.close()

    asyncio.run(binary())


def _variants(value: str) -> set[str]:
    escaped = json.dumps(value)[1:-1]
    return {value, value.lower(), value.upper(), escaped, escaped.lower()}


def test_no_pii_value_reaches_anything_the_proxy_wrote(masked_proxy: ScalpleServer) -> None:
    proxy = masked_proxy
    _workload(proxy)
    records = proxy.wait_for_records(lambda rs: len(rs) >= 15, timeout=20)
    port = proxy.metrics_port  # type: ignore[attr-defined]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
        metrics = page.read()
    assert proxy.stop() == 0
    mirror = proxy.base_dir.parent / "mirror"
    mirrored = b"".join(p.read_bytes() for p in sorted(mirror.rglob("*")) if p.is_file())
    assert mirrored, "the checkpoint mirror was written"
    written = proxy.log_bytes() + proxy.stderr().encode() + metrics + mirrored
    assert b"pii_users" in written  # the scan reads the real log
    for value in SECRET_VALUES:
        for form in _variants(value):
            assert form.encode() not in written, f"{value!r} found as {form!r}"
    by_query = {r["query"]: r for r in records}
    insert = next(r for q, r in by_query.items() if q.startswith("insert into pii_users values"))
    shown = {f["column"]: f["value"] for f in insert["masked_fields"]}
    assert shown["public.pii_users.email"] == "a***@***.org"
    assert shown["public.pii_users.phone"] == "***78"
    assert shown["public.pii_users.iban"] == "***"
    assert shown["public.pii_users.name"].startswith("pn_")
    extended = next(
        r for r in records if r["command"] == "INSERT" and r["params"] and len(r["params"]) == 5
    )
    assert extended["params"][0].startswith("sub_")  # a subject id: its tag stands for it
    assert extended["params"][1:4] == ["B***@***.net", "***67", "***"]
    array = next(r for r in records if "any($1)" in (r["query"] or ""))
    assert array["params"] == ["{a***@***.org,B***@***.net}"]
    return_records(records)


def return_records(records: list[dict[str, Any]]) -> None:
    """Hook for the subject assertions below (kept apart for readability)."""
    tagged = [r for r in records if r["subjects"]]
    assert tagged, "predicates on subject columns produce tags"
    assert all(r["subject_kinds"] == ["customer"] for r in tagged)


def test_subject_tag_cli_finds_the_predicate_subject(masked_proxy: ScalpleServer) -> None:
    proxy = masked_proxy
    with psycopg.connect(_dsn(proxy), autocommit=True) as conn:
        conn.execute("select 1 from pii_users where id = 1001", prepare=False).fetchall()
        conn.execute("select 1 from pii_orders where user_id = %s", (1002,)).fetchall()
        conn.execute("select 1 from pii_users where id in (1001, 1003)", prepare=False)
    records = proxy.wait_for_records(lambda rs: len(rs) >= 3)
    tag = subprocess.run(
        [
            sys.executable,
            "-m",
            "scalple",
            "subject-tag",
            "--config",
            str(proxy.config_path),
            "customer",
            "1001",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert tag.returncode == 0, tag.stderr
    tag_1001 = tag.stdout.strip()
    assert tag_1001.startswith("sub_")
    first, second, third = records[-3:]
    assert first["subjects"] == [tag_1001]
    assert "1001" not in first["query"] and tag_1001 in first["query"]
    assert second["subjects"] and second["subjects"] != [tag_1001]
    assert tag_1001 in third["subjects"] and third["subjects_count"] == 2


def _tag(proxy: ScalpleServer, subject_id: str) -> str:
    result = subprocess.run(
        [
            *(sys.executable, "-m", "scalple", "subject-tag"),
            *("--config", str(proxy.config_path), "customer", subject_id),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_subjects_from_result_rows_text_and_binary(masked_proxy: ScalpleServer) -> None:
    """A subject column among the result's columns: every row's value is a
    subject, read by the relay's scanner (text format from psycopg, binary
    from asyncpg), with no predicate naming it."""
    proxy = masked_proxy
    with psycopg.connect(_dsn(proxy), autocommit=True) as conn:
        for n in (2001, 2002, 2003):
            conn.execute(
                "insert into pii_users (id, email) values (%s, %s)", (n, f"u{n}@example.org")
            )
        # The worker maps subject columns to OIDs from the catalog it loads for
        # the session's database; wait until the relay reads them.
        for attempt in range(50):
            marker = f"and {attempt} = {attempt}"
            conn.execute(f"select id from pii_users where email like 'u200%' {marker}").fetchall()
            records = proxy.wait_for_records(
                lambda rs, m=marker: any(m in (r["query"] or "") for r in rs)  # type: ignore[misc]
            )
            last = next(r for r in records if marker in (r["query"] or ""))
            if last["subjects"]:
                break
    tags = {_tag(proxy, str(n)) for n in (2001, 2002, 2003)}
    assert set(last["subjects"]) == tags and last["subjects_count"] == 3
    assert last["subject_kinds"] == ["customer"]

    async def binary() -> None:
        conn = await asyncpg.connect(
            host=proxy.host,
            port=proxy.port,
            user="app_user",
            password="app_pass",
            database="app",
            server_settings={"scalple.user_id": "dpo-test"},
        )
        try:
            rows = await conn.fetch("select o.id, u.id from pii_users u, pii_orders o limit 0")
            assert rows == []
            await conn.fetch("select id, email from pii_users where id > $1 order by id", 2001)
        finally:
            await conn.close()

    asyncio.run(binary())
    records = proxy.wait_for_records(
        lambda rs: any("where id > $1" in (r["query"] or "") for r in rs)
    )
    fetched = next(r for r in records if "where id > $1" in (r["query"] or ""))
    assert set(fetched["subjects"]) >= {_tag(proxy, "2002"), _tag(proxy, "2003")}
    assert "u2002@example.org" not in proxy.log_bytes().decode("utf-8", "replace")


@pytest.fixture
def bounded_proxy(
    pg: PostgresCluster, catalog_password: str, tmp_path: Path
) -> Iterator[ScalpleServer]:
    yield from _masked_proxy(pg, catalog_password, tmp_path, subjects_limit=2)


def test_join_and_write_subjects_and_the_bound(bounded_proxy: ScalpleServer) -> None:
    """Ground truth for a join through the subject column, a DELETE, and a
    result with more subjects than the bound."""
    proxy = bounded_proxy
    with psycopg.connect(_dsn(proxy), autocommit=True) as conn:
        for n in (3001, 3002, 3003):
            conn.execute("insert into pii_users (id, email) values (%s, %s)", (n, f"j{n}@x.org"))
        conn.execute("insert into pii_orders (user_id, amount) values (3001, 5), (3002, 7)")
        conn.execute(
            "select o.amount from pii_orders o join pii_users u on u.id = o.user_id "
            "where o.user_id = 3002",
            prepare=False,
        ).fetchall()
        conn.execute("delete from pii_orders where user_id = %s", (3001,))
        for attempt in range(50):
            marker = f"and {attempt} = {attempt}"
            conn.execute(f"select id from pii_users where id >= 3001 {marker}").fetchall()
            records = proxy.wait_for_records(
                lambda rs, m=marker: any(m in (r["query"] or "") for r in rs)  # type: ignore[misc]
            )
            last = next(r for r in records if marker in (r["query"] or ""))
            if last["subjects_truncated"]:
                break
    by_text = {r["query"]: r for r in records if r["query"]}
    join = next(r for q, r in by_text.items() if q.startswith("select o.amount"))
    assert join["subjects"] == [_tag(proxy, "3002")]
    delete = next(r for q, r in by_text.items() if q.startswith("delete from pii_orders"))
    assert delete["subjects"] == [_tag(proxy, "3001")]
    assert last["subjects_truncated"] and len(last["subjects"]) == 2
    assert last["subjects_count"] == 2  # the third row was past the bound: not read
    assert set(last["subjects"]) <= {_tag(proxy, str(n)) for n in (3001, 3002, 3003)}
