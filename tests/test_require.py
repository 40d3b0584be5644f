"""[identity] require: statements without an acceptable identity are refused
with SQLSTATE 28000 and a message that says how to pass one; the session
goes on, and the refusal is on record."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from scalple.devcluster import PgBouncer, PostgresCluster
from scalple.devproxy import ScalpleServer
from tests.conftest import ProxyFactory

SECRET = b"s" * 40


def jwt(claims: dict[str, Any], secret: bytes = SECRET) -> str:
    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    signature = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(signature)}"


@pytest.fixture(params=["direct", "bouncer"])
def upstream(request: pytest.FixtureRequest, pg: PostgresCluster) -> str:
    if request.param == "bouncer":
        pool: PgBouncer = request.getfixturevalue("bouncer")
        return f"{pool.host}:{pool.port}"
    return f"{pg.host}:{pg.port}"


def proxy_requiring(
    factory: ProxyFactory, upstream: str, tmp_path: Path, require: str, **identity: Any
) -> ScalpleServer:
    secret = tmp_path / "hs256.secret"
    secret.write_bytes(SECRET)
    rules = {"require": require, "hs256_secret_file": str(secret), **identity}
    return factory(upstream, {"identity": rules})


def connect(proxy: ScalpleServer, **params: str) -> psycopg.Connection[Any]:
    params.setdefault("user", "app_user")
    params.setdefault("password", "app_pass")
    return psycopg.connect(proxy.dsn(dbname="app", **params), autocommit=True)


def test_unattributed_statements_are_refused_and_recorded(
    proxy_factory: ProxyFactory, upstream: str, tmp_path: Path
) -> None:
    proxy = proxy_requiring(proxy_factory, upstream, tmp_path, "any")
    marker = "r" + uuid.uuid4().hex[:8]
    with connect(proxy) as conn:
        with pytest.raises(psycopg.errors.InvalidAuthorizationSpecification) as info:
            conn.execute(f"select 1 as {marker}")  # simple protocol
        assert "scalple.user_id" in str(info.value)
        with pytest.raises(psycopg.errors.InvalidAuthorizationSpecification):
            conn.execute(f"select %s::int as {marker}", (2,))  # extended protocol
        # The session goes on: identity-setting and attributed statements run.
        assert conn.execute(f"select 3 as {marker} /*scalple.user_id='ann'*/").fetchone() == (3,)
        with conn.transaction():
            conn.execute("set local scalple.user_id = 'ann'")
            assert conn.execute(f"select %s::int as {marker}", (4,)).fetchone() == (4,)
        with pytest.raises(psycopg.errors.InvalidAuthorizationSpecification):
            conn.execute(f"select 5 as {marker}")  # SET LOCAL ended with the transaction
    records = proxy.wait_for_records(lambda rs: sum(marker in (r["query"] or "") for r in rs) >= 5)
    outcome = [
        (r["status"], r["sqlstate"], r["session_user_id"])
        for r in records
        if marker in (r["query"] or "")
    ]
    assert outcome == [
        ("error", "28000", None),
        ("error", "28000", None),
        ("ok", None, "ann"),
        ("ok", None, "ann"),
        ("error", "28000", None),
    ]


def test_refusal_inside_a_pipeline_skips_to_sync(
    proxy_factory: ProxyFactory, upstream: str, tmp_path: Path
) -> None:
    proxy = proxy_requiring(proxy_factory, upstream, tmp_path, "any")
    with connect(proxy) as conn:
        with pytest.raises(psycopg.errors.InvalidAuthorizationSpecification), conn.pipeline():
            conn.execute("select %s::int", (1,))
            conn.execute("select %s::int", (2,))
        assert conn.execute("select 1 /*scalple.user_id='bo'*/").fetchone() == (1,)


def test_startup_identity_passes_and_exempt_roles(
    proxy_factory: ProxyFactory, pg: PostgresCluster, tmp_path: Path
) -> None:
    proxy = proxy_requiring(
        proxy_factory, f"{pg.host}:{pg.port}", tmp_path, "any", exempt_roles=["md5_user"]
    )
    with connect(proxy, options="-c scalple.user_id=cy") as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    with connect(proxy, user="md5_user", password="md5_pass") as conn:  # migrations role
        assert conn.execute("select 2").fetchone() == (2,)


def test_require_verified_accepts_only_good_tokens(
    proxy_factory: ProxyFactory, pg: PostgresCluster, tmp_path: Path
) -> None:
    proxy = proxy_requiring(proxy_factory, f"{pg.host}:{pg.port}", tmp_path, "verified")
    good = jwt({"sub": "dee", "email": "dee@example.com", "exp": time.time() + 600})
    expired = jwt({"sub": "dee", "exp": time.time() - 600})
    forged = jwt({"sub": "dee", "exp": time.time() + 600}, secret=b"x" * 40)
    with connect(proxy, options="-c scalple.user_id=dee") as conn:
        with pytest.raises(psycopg.errors.InvalidAuthorizationSpecification) as info:
            conn.execute("select 1")  # a plain user id is not verified
        assert "scalple.token" in str(info.value)
        for bad in (expired, forged):
            with pytest.raises(psycopg.errors.InvalidAuthorizationSpecification):
                conn.execute(f"select 2 /*scalple.token='{bad}'*/")
        assert conn.execute(f"select 3 /*scalple.token='{good}'*/").fetchone() == (3,)
    with connect(proxy, options=f"-c scalple.token={good}") as conn:
        assert conn.execute("select 4").fetchone() == (4,)
    records = proxy.wait_for_records(lambda rs: any(r["query"] == "select 4" for r in rs))
    ok = [
        r for r in records if r["status"] == "ok" and r["query"] and r["query"].startswith("select")
    ]
    assert {(r["session_user_id"], r["identity_verified"], r["identity_source"]) for r in ok} == {
        ("dee", True, "token")
    }
    problems = {r["identity_problem"] for r in records if r["sqlstate"] == "28000"}
    assert any(p and "expired" in p for p in problems)
    log_bytes = proxy.log_bytes()
    assert good.encode() not in log_bytes and forged.encode() not in log_bytes


def test_asyncpg_set_config_with_bind_parameter(
    proxy_factory: ProxyFactory, pg: PostgresCluster, tmp_path: Path
) -> None:
    proxy = proxy_requiring(proxy_factory, f"{pg.host}:{pg.port}", tmp_path, "any")

    async def work() -> tuple[int, str]:
        conn = await asyncpg.connect(
            host=proxy.host,
            port=proxy.port,
            user="app_user",
            password="app_pass",
            database="app",
            statement_cache_size=0,
        )
        try:
            with pytest.raises(asyncpg.exceptions.InvalidAuthorizationSpecificationError):
                await conn.fetchval("select 1")
            async with conn.transaction():
                await conn.execute("select set_config('scalple.user_id', $1, true)", "eli")
                value = await conn.fetchval("select $1::int", 7)
            return value, "ok"
        finally:
            await conn.close()

    assert asyncio.run(work()) == (7, "ok")
    records = proxy.wait_for_records(lambda rs: any(r["query"] == "select $1::int" for r in rs))
    (seven,) = [r for r in records if r["query"] == "select $1::int"]
    assert seven["session_user_id"] == "eli" and seven["identity_source"] == "set"


def test_refused_statement_split_across_reads(
    proxy_factory: ProxyFactory, pg: PostgresCluster, tmp_path: Path
) -> None:
    """A Query larger than one socket read is held back whole, then refused."""
    proxy = proxy_requiring(proxy_factory, f"{pg.host}:{pg.port}", tmp_path, "any")
    big = "select length('" + "x" * 500_000 + "')"
    with connect(proxy) as conn:
        with pytest.raises(psycopg.errors.InvalidAuthorizationSpecification):
            conn.execute(big)
        assert conn.execute(big + " /*scalple.user_id='fay'*/").fetchone() == (500_000,)


@pytest.mark.parametrize(
    "sql",
    [
        "select set_config('scalple.user_id', '', false), 1",  # not a bare set_config
        "set scalple.user_id = ''; select 1",  # an empty identity is no identity
        "reset scalple.user_id; select 1",
        "/*scalple.user_id='x'*/ select 1; select 2",  # the comment covers its statement only
        "begin; select 1; commit",
    ],
)
def test_require_cannot_be_talked_around(
    proxy_factory: ProxyFactory, pg: PostgresCluster, tmp_path: Path, sql: str
) -> None:
    proxy = proxy_requiring(proxy_factory, f"{pg.host}:{pg.port}", tmp_path, "any")
    with connect(proxy) as conn, pytest.raises(psycopg.errors.InvalidAuthorizationSpecification):
        conn.execute(sql)


def test_require_verified_ignores_unsigned_tokens(
    proxy_factory: ProxyFactory, pg: PostgresCluster, tmp_path: Path
) -> None:
    proxy = proxy_requiring(proxy_factory, f"{pg.host}:{pg.port}", tmp_path, "verified")
    with connect(proxy) as conn, pytest.raises(psycopg.errors.InvalidAuthorizationSpecification):
        conn.execute("set scalple.token = 'garbage'; select 1")
    good = jwt({"sub": "gus", "exp": time.time() + 600})
    with connect(proxy) as conn:
        conn.execute(f"set scalple.token = '{good}'")
        assert conn.execute("select 5").fetchone() == (5,)


def test_function_call_protocol_is_checked(
    proxy_factory: ProxyFactory, pg: PostgresCluster, tmp_path: Path
) -> None:
    """psql's \\lo_import uses FunctionCall messages: refused without identity."""
    import os
    import subprocess

    proxy = proxy_requiring(proxy_factory, f"{pg.host}:{pg.port}", tmp_path, "any")
    blob = tmp_path / "blob"
    blob.write_bytes(b"x" * 100)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {
        "PGPASSWORD": "app_pass"
    }
    args = ["psql", "-X", "-h", proxy.host, "-p", str(proxy.port), "-U", "app_user", "-d", "app"]
    refused = subprocess.run(
        [*args, "-c", f"\\lo_import {blob}"], env=env, capture_output=True, text=True
    )
    assert refused.returncode != 0 and "statement refused" in refused.stderr
    env["PGOPTIONS"] = "-c scalple.user_id=hal"
    allowed = subprocess.run(
        [*args, "-c", f"\\lo_import {blob}"], env=env, capture_output=True, text=True
    )
    assert allowed.returncode == 0, allowed.stderr
