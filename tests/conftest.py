"""Shared fixtures: one private PostgreSQL 15 and one PgBouncer (transaction
mode) per test session, and Scalple proxies in front of either.

Everything is real: the servers are Debian's binaries in temporary
directories on free ports; the proxy is ``scalple serve`` in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import pytest

from scalple.devcluster import PgBouncer, PostgresCluster
from scalple.devproxy import ScalpleServer

ProxyFactory = Callable[..., ScalpleServer]


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster(max_connections=700)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.cleanup()


def init_pgbench(pg: PostgresCluster, dbname: str) -> str:
    """A database owned by app_user with pgbench's tables (scale 1)."""
    pg.psql(f"create database {dbname} owner app_user")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {
        "PGPASSWORD": "app_pass"
    }
    command = [str(pg.bindir / "pgbench"), "-i", "-q", "-s", "1", "-h", pg.host]
    command += ["-p", str(pg.port), "-U", "app_user", dbname]
    subprocess.run(command, check=True, env=env, capture_output=True, timeout=120)
    return dbname


@pytest.fixture(scope="session")
def bouncer(pg: PostgresCluster) -> Iterator[PgBouncer]:
    pool = PgBouncer(pg, pool_mode="transaction", default_pool_size=20, max_client_conn=2000)
    pool.start()
    try:
        yield pool
    finally:
        pool.cleanup()


def _factory() -> tuple[ProxyFactory, list[ScalpleServer]]:
    started: list[ScalpleServer] = []

    def make(
        upstream: str, config: Mapping[str, Mapping[str, object]] | None = None
    ) -> ScalpleServer:
        server = ScalpleServer(upstream, config=config)
        server.start()
        started.append(server)
        return server

    return make, started


@pytest.fixture
def proxy_factory() -> Iterator[ProxyFactory]:
    """Start proxies with a given upstream and configuration; all stopped after."""
    make, started = _factory()
    yield make
    for server in started:
        server.cleanup()


@pytest.fixture(scope="session")
def catalog_password(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The password file the proxy's catalog connection (as app_user) reads."""
    path = tmp_path_factory.mktemp("secrets") / "catalog-password"
    path.write_text("app_pass\n")
    path.chmod(0o600)
    return str(path)


def _catalogued_proxy(upstream: str, catalog_password: str) -> ScalpleServer:
    server = ScalpleServer(upstream, config={"catalog": {"password_file": catalog_password}})
    server.start()
    return server


@pytest.fixture(scope="module")
def proxy_bouncer(bouncer: PgBouncer, catalog_password: str) -> Iterator[ScalpleServer]:
    server = _catalogued_proxy(f"{bouncer.host}:{bouncer.port}", catalog_password)
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def proxy_direct(pg: PostgresCluster, catalog_password: str) -> Iterator[ScalpleServer]:
    server = _catalogued_proxy(f"{pg.host}:{pg.port}", catalog_password)
    yield server
    server.cleanup()


@dataclass
class Route:
    """A way to reach PostgreSQL through Scalple: ``bouncer`` or ``direct``."""

    name: str
    proxy: ScalpleServer
    pg: PostgresCluster

    def dsn(self, user: str = "app_user", **params: str) -> str:
        password = self.pg.role(user).password
        if password is not None:
            params.setdefault("password", password)
        params.setdefault("dbname", "app")
        return self.proxy.dsn(user=user, **params)


@pytest.fixture(params=["bouncer", "direct"])
def route(request: pytest.FixtureRequest, pg: PostgresCluster) -> Route:
    """Each test using this runs through Scalple -> PgBouncer and Scalple -> PostgreSQL."""
    proxy = request.getfixturevalue(f"proxy_{request.param}")
    return Route(request.param, proxy, pg)
