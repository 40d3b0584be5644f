"""Ground truth for audit records.

A known workload runs through Scalple -> PgBouncer (transaction mode) ->
PostgreSQL, with every participant at the same time: psql sessions
(multi-statement queries, ``\\copy`` both ways, DDL), a connection pool whose
requests carry sqlcommenter comments for different people over the same
connections, an asyncpg pool using ``SET LOCAL`` / ``set_config`` per request
(prepared statements, a cursor fetched in two steps, ``executemany``), and a
pipelined batch with an error in the middle.  Afterwards every record of the
log is compared with what the workload did.

Also: signed tokens end to end (three channels; good, expired and forged
tokens; never written to the log), the scope of identities set with SQL
(compared with what the server itself reports for the setting), per-client
identity over shared PgBouncer server connections, and analysis without a
catalog.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import hmac
import json
import os
import queue
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import asyncpg
import psycopg
import pytest

from scalple.devcluster import PgBouncer, PostgresCluster
from scalple.devproxy import ScalpleServer
from tests.conftest import ProxyFactory

Record = dict[str, Any]

COMPARED = (
    "session_user_id",
    "session_email",
    "identity_source",
    "identity_verified",
    "identity_problem",
    "command",
    "statement_class",
    "affected_tables",
    "columns_accessed",
    "rows",
    "status",
    "sqlstate",
    "protocol",
    "params",
)
TS_RE = re.compile(r"\A\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z\Z")
LOG_ID_RE = re.compile(r"\Aimmutable-[0-9a-f]{16}\Z")
REDACTED = "[token redacted]"


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Who:
    """The person a record should name, and how."""

    user: str | None
    source: str
    email: str | None = None
    verified: bool = False
    problem: str | None = None

    def refused(self, problem: str) -> Who:
        return dataclasses.replace(self, problem=problem)


NOBODY = Who(None, "none")


def expect(
    command: str | None,
    statement_class: str | None,
    who: Who,
    *,
    tables: dict[str, list[str]] | list[str] | None = None,
    rows: int | None = None,
    status: str = "ok",
    sqlstate: str | None = None,
    protocol: str = "simple",
    params: list[str | None] | None = None,
) -> Record:
    """The compared fields of one expected record.

    ``tables`` maps relation -> columns (a list: relations without columns).
    """
    if isinstance(tables, list):
        affected, columns = sorted(tables), {}
    else:
        columns = {name: sorted(cols) for name, cols in (tables or {}).items()}
        affected = sorted(columns)
        columns = {name: cols for name, cols in columns.items() if cols}
    return {
        "session_user_id": who.user,
        "session_email": who.email,
        "identity_source": who.source,
        "identity_verified": who.verified,
        "identity_problem": who.problem,
        "command": command,
        "statement_class": statement_class,
        "affected_tables": affected,
        "columns_accessed": columns,
        "rows": rows,
        "status": status,
        "sqlstate": sqlstate,
        "protocol": protocol,
        "params": params,
    }


def project(record: Record) -> Record:
    return {key: record.get(key) for key in COMPARED}


def canonical(groups: dict[str, list[Record]]) -> dict[str, list[Record]]:
    """Each group as a multiset: sorted, so the order of concurrent work does not matter."""
    return {
        key: sorted(items, key=lambda item: json.dumps(item, sort_keys=True))
        for key, items in sorted(groups.items())
    }


def app_env(pg: PostgresCluster, options: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSWORD"] = pg.role("app_user").password or ""
    if options is not None:
        env["PGOPTIONS"] = options
    return env


def run_psql(
    pg: PostgresCluster,
    proxy: ScalpleServer,
    *commands: str,
    options: str | None = None,
    stdin: str | None = None,
) -> str:
    """psql through the proxy: each command a separate ``-c`` (one Query each)."""
    args = ["psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"]
    args += ["-h", proxy.host, "-p", str(proxy.port), "-U", "app_user", "-d", "app"]
    for command in commands:
        args += ["-c", command]
    result = subprocess.run(
        args,
        input=stdin or "",
        env=app_env(pg, options),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_jwt(secret: bytes, **claims: object) -> str:
    """A compact HS256 JWT, built by hand."""
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = b64url(json.dumps(claims, separators=(",", ":")).encode())
    signed = f"{header}.{payload}".encode("ascii")
    signature = b64url(hmac.new(secret, signed, hashlib.sha256).digest())
    return f"{header}.{payload}.{signature}"


def sqlcommenter(**pairs: str) -> str:
    """A comment as sqlcommenter writes it: keys sorted, values URL-encoded."""
    body = ",".join(
        f"{quote(key, safe='')}='{quote(value, safe='')}'" for key, value in sorted(pairs.items())
    )
    return f"/*{body}*/"


def assert_groups_equal(actual: dict[str, list[Record]], expected: dict[str, list[Record]]) -> None:
    """Compare multisets of records per key; on failure, say which fields differ."""
    got, want = canonical(actual), canonical(expected)
    problems: list[str] = []
    for key in sorted(set(got) | set(want)):
        a, e = got.get(key, []), want.get(key, [])
        if a == e:
            continue
        if len(a) != len(e):
            problems.append(f"{key}: {len(a)} records, expected {len(e)}:\n  got {a}\n  want {e}")
            continue
        for ra, re_ in zip(a, e, strict=True):
            diff = {f: (ra.get(f), re_.get(f)) for f in re_ if ra.get(f) != re_.get(f)}
            if diff:
                problems.append(f"{key}: (got, expected) {diff}")
    assert not problems, "\n".join(problems)


def check_log_integrity(proxy: ScalpleServer, started: float) -> list[Record]:
    """Every record of the log (statements and sessions): seq, log_id and ts."""
    records = proxy.records(None)
    assert records
    seqs = [r["seq"] for r in records]
    assert seqs == list(range(1, len(records) + 1))  # from 1, strictly increasing, unique
    log_ids = [r["log_id"] for r in records]
    assert all(isinstance(x, str) and LOG_ID_RE.match(x) for x in log_ids), log_ids[:5]
    assert len(set(log_ids)) == len(log_ids)
    for record in records:
        ts = record["ts"]
        assert TS_RE.match(ts), ts
        when = datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
        assert started - 1 <= when <= time.time() + 1, ts
    # Per session, statement ids follow the log order, and the close record counts them.
    by_session: dict[str, list[int]] = {}
    for record in records:
        if record["kind"] == "statement":
            by_session.setdefault(record["session_id"], []).append(record["statement_id"])
    for record in records:
        if record["kind"] == "session_close":
            ids = by_session.get(record["session_id"], [])
            assert ids == list(range(1, len(ids) + 1)), (record["session_id"], ids)
            assert record["statements"] == len(ids), record
    return records


# --------------------------------------------------------------------------- fixtures


@dataclass
class Shop:
    """Uniquely named tables of one test (the cluster is shared by the whole suite)."""

    mark: str  # every statement of the workload carries ``<mark>_<key>``
    customers: str
    orders: str
    imports: str
    view: str

    @property
    def key_re(self) -> re.Pattern[str]:
        return re.compile(rf"{self.mark}_([a-z0-9]+)")

    def key(self, query: str | None) -> str | None:
        found = self.key_re.search(query or "")
        return found.group(1) if found else None

    def q(self, name: str) -> str:
        """``public.<name>`` as the records name relations."""
        return f"public.{name}"


@pytest.fixture
def shop(pg: PostgresCluster) -> Iterator[Shop]:
    run = uuid.uuid4().hex[:8]
    mark = f"m{run}"
    s = Shop(
        mark=mark,
        customers=f"t{run}_customers",
        orders=f"t{run}_orders",
        imports=f"{mark}_imports",
        view=f"t{run}_big_orders",
    )
    pg.psql(
        f"""
        CREATE TABLE {s.customers} (id int PRIMARY KEY, name text NOT NULL, email text, city text);
        CREATE TABLE {s.orders} (id int PRIMARY KEY, customer_id int REFERENCES {s.customers},
                                 amount numeric);
        CREATE TABLE {s.imports} (id int, amount numeric);
        CREATE VIEW {s.view} AS
            SELECT c.name, c.city, o.amount FROM {s.customers} c
            JOIN {s.orders} o ON o.customer_id = c.id WHERE o.amount > 100;
        INSERT INTO {s.customers}
            SELECT g, 'name' || g, 'c' || g || '@example.com',
                   (ARRAY['Oslo', 'Oslo', 'Rome', 'Rome', 'Lima', 'Lima'])[g]
            FROM generate_series(1, 6) g;
        INSERT INTO {s.orders} SELECT g, g % 6 + 1, g * 10 FROM generate_series(1, 20) g;
        GRANT SELECT, INSERT, UPDATE, DELETE ON {s.customers}, {s.orders}, {s.imports}, {s.view}
            TO app_user;
        """
    )
    try:
        yield s
    finally:
        pg.psql(
            f"DROP VIEW IF EXISTS {s.view}; "
            f"DROP TABLE IF EXISTS {s.orders}, {s.customers}, {s.imports}, "
            f"{mark}_ddl1, {mark}_ddl2 CASCADE;"
        )


@pytest.fixture
def fresh_server_connections(bouncer: PgBouncer) -> Iterator[PgBouncer]:
    """The shared PgBouncer, whose server connections are replaced afterwards.

    Once ``SET LOCAL scalple.user_id`` has run on a server connection, the
    placeholder setting exists there for good (``current_setting`` returns
    ``''`` instead of NULL); other tests reuse those connections and must not
    see it.  ``RECONNECT`` closes them as soon as they are released.
    """
    yield bouncer
    with psycopg.connect(
        bouncer.dsn(user="postgres", database="pgbouncer"), autocommit=True
    ) as admin:
        admin.execute("RECONNECT app")


@pytest.fixture(scope="module")
def hs256_secret(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, str]:
    secret = os.urandom(24).hex().encode("ascii")  # 48 bytes
    path = tmp_path_factory.mktemp("identity") / "hs256.secret"
    path.write_bytes(secret + b"\n")
    path.chmod(0o600)
    return secret, str(path)


@pytest.fixture(scope="module")
def ident_direct(pg: PostgresCluster, hs256_secret: tuple[bytes, str]) -> Iterator[ScalpleServer]:
    """Scalple -> PostgreSQL with HS256 token verification (no catalog: not needed)."""
    server = ScalpleServer(
        f"{pg.host}:{pg.port}",
        config={
            "catalog": {"enabled": False},
            "identity": {"hs256_secret_file": hs256_secret[1]},
        },
    )
    server.start()
    yield server
    server.cleanup()


def dsn(pg: PostgresCluster, proxy: ScalpleServer, options: str | None = None) -> str:
    params = {"user": "app_user", "dbname": "app", "password": pg.role("app_user").password or ""}
    if options is not None:
        params["options"] = options
    return proxy.dsn(**params)


def marker_key(mark: str, query: str) -> str:
    """The ``<key>`` of the ``<mark>_<key>`` in ``query``."""
    found = re.search(rf"{mark}_([a-z0-9]+)", query)
    assert found is not None, query
    return found.group(1)


def at_least(n: int) -> Callable[[list[Record]], bool]:
    return lambda records: len(records) >= n


def wait_keys(
    proxy: ScalpleServer, mark: str, want: Callable[[list[Record]], bool], timeout: float = 10.0
) -> list[Record]:
    """Records carrying ``mark``, once ``want`` holds for them."""

    def mine(records: list[Record]) -> list[Record]:
        return [r for r in records if mark in (r["query"] or "")]

    return mine(proxy.wait_for_records(lambda rs: want(mine(rs)), timeout=timeout))


# --------------------------------------------------------------------------- the workload


class Workload:
    """The participants; each notes the records it expects (by marker key) as it goes."""

    def __init__(
        self, pg: PostgresCluster, proxy: ScalpleServer, shop: Shop, secret: bytes
    ) -> None:
        self.pg = pg
        self.proxy = proxy
        self.shop = shop
        self.secret = secret
        self.expected: dict[str, list[Record]] = {}
        self.unmarked: list[Record] = []  # expected records without a marker (BEGIN, resets)
        # (key, command) -> the analysis_notes expected (none where not listed)
        self.notes: dict[tuple[str, str | None], list[str]] = {}
        self._lock = threading.Lock()

    def add(self, key: str, record: Record, notes: list[str] | None = None) -> None:
        with self._lock:
            self.expected.setdefault(key, []).append(record)
            if notes:
                self.notes[key, record["command"]] = notes

    def add_unmarked(self, query: str, record: Record) -> None:
        with self._lock:
            self.unmarked.append({"query": query, **record})

    # -- 1. psql sessions ---------------------------------------------------------------

    def psql_alice(self) -> None:
        s, m = self.shop, self.shop.mark
        who = Who("alice", "startup", email="alice@example.com")
        options = r"-c scalple.user_id=alice -c scalple.email=alice@example.com"
        copy_in = "".join(f"{i}\t{i}.5\n" for i in range(1, 6))
        out = run_psql(
            self.pg,
            self.proxy,
            f"select id, name as {m}_a1 from {s.customers} where city = 'Oslo' order by id; "
            f"update /*{m}_a2*/ {s.orders} set amount = amount + 0 where customer_id = 1 "
            "/*scalple.user_id='zed'*/; "  # a comment names the person of its statement only
            f"select count(*) as {m}_a3 from {s.orders} where customer_id = 1",
            f"\\copy {s.imports} from pstdin",
            f"\\copy (select id, name as {m}_a5 from {s.customers} where city = 'Rome' "
            "order by id) to pstdout",
            options=options,
            stdin=copy_in,
        )
        assert out.splitlines() == ["1|name1", "2|name2", "3", "3\tname3", "4\tname4"]
        c, o, i = s.q(s.customers), s.q(s.orders), s.q(s.imports)
        self.add("a1", expect("SELECT", "READ", who, tables={c: ["id", "name", "city"]}, rows=2))
        self.add(
            "a2",
            expect(
                "UPDATE",
                "WRITE",
                Who("zed", "comment"),
                tables={o: ["amount", "customer_id"]},
                rows=3,
            ),
        )
        self.add("a3", expect("SELECT", "READ", who, tables={o: ["customer_id"]}, rows=1))
        self.add("imports", expect("COPY", "WRITE", who, tables={i: ["id", "amount"]}, rows=5))
        self.add("a5", expect("COPY", "READ", who, tables={c: ["id", "name", "city"]}, rows=2))

        # DDL in one Query (one implicit transaction): the table never exists
        # committed, so a catalog read afterwards cannot know it; the records
        # say so instead of guessing a schema.
        d1 = f"{m}_ddl1"
        run_psql(
            self.pg,
            self.proxy,
            f"create table {d1} (a int); alter table {d1} add column b text; drop table {d1}",
            options=options,
        )
        unknown = f"relation {d1} is not in the catalog"
        self.add("ddl1", expect("CREATE TABLE", "DDL", who, tables={s.q(d1): ["a"]}))
        self.add("ddl1", expect("ALTER TABLE", "DDL", who, tables={d1: ["b"]}), [unknown])
        self.add("ddl1", expect("DROP TABLE", "DDL", who, tables=[d1]), [unknown])

        # DDL one statement at a time, each committed and recorded before the
        # next: every record names the relation schema-qualified.
        d2 = f"{m}_ddl2"
        steps: list[tuple[str, str, str, dict[str, list[str]] | list[str]]] = [
            (f"create table {d2} (a int, b text)", "CREATE TABLE", "DDL", {s.q(d2): ["a", "b"]}),
            (f"alter table {d2} add column c int", "ALTER TABLE", "DDL", {s.q(d2): ["c"]}),
            (
                f"select a, c from {d2} where b is null",
                "SELECT",
                "READ",
                {s.q(d2): ["a", "b", "c"]},
            ),
            (f"drop table {d2}", "DROP TABLE", "DDL", [s.q(d2)]),
        ]
        for n, (sql, command, cls, tables) in enumerate(steps, 1):
            run_psql(self.pg, self.proxy, sql, options=options)
            rows = 0 if command == "SELECT" else None
            self.add("ddl2", expect(command, cls, who, tables=tables, rows=rows))
            wait_keys(self.proxy, d2, at_least(n))

    # -- 2. a connection pool, sqlcommenter per request ---------------------------------

    def pool_requests(self) -> None:
        s, m = self.shop, self.shop.mark
        c, o, v = s.q(s.customers), s.q(s.orders), s.q(s.view)
        options = "-c scalple.user_id=pool_app"
        pool: queue.Queue[psycopg.Connection[Any]] = queue.Queue()
        conns = [
            psycopg.connect(
                dsn(self.pg, self.proxy, options), autocommit=True, prepare_threshold=None
            )
            for _ in range(2)
        ]
        for conn in conns:
            pool.put(conn)
        people = {"bob": "bob@example.com", "carol": "carol@example.com"}
        token = make_jwt(
            self.secret, sub="bob-verified", email="bob@example.com", exp=int(time.time()) + 600
        )

        def request(n: int) -> None:
            conn = pool.get()
            try:
                user = "bob" if n % 2 == 0 else "carol"
                tag = sqlcommenter(**{"scalple.user_id": user, "scalple.email": people[user]})
                # psycopg parses %-placeholders: a literal % is written %%.
                tagged = tag.replace("%", "%%")
                who = Who(user, "comment", email=people[user])
                cid = n % 6 + 1
                if n == 8:
                    rows = conn.execute(
                        f"select name, amount as {m}_p{n} from {s.view} where city = %s {tagged}",
                        ("Oslo",),
                    ).fetchall()
                    assert len(rows) == 4
                    tables = {
                        v: ["amount", "city", "name"],
                        c: ["city", "id", "name"],
                        o: ["amount", "customer_id"],
                    }
                    record = expect(
                        "SELECT",
                        "READ",
                        who,
                        tables=tables,
                        rows=4,
                        protocol="extended",
                        params=["Oslo"],
                    )
                elif n == 9:  # no comment: the connection's own identity
                    conn.execute(f"select %s::int as {m}_p{n}", (n,))
                    record = expect(
                        "SELECT",
                        "READ",
                        Who("pool_app", "startup"),
                        rows=1,
                        protocol="extended",
                        params=[str(n)],
                    )
                elif n == 10:  # a signed token in the comment
                    conn.execute(f"select 1 as {m}_p{n} /*scalple.token='{token}'*/")
                    record = expect(
                        "SELECT",
                        "READ",
                        Who("bob-verified", "token", email="bob@example.com", verified=True),
                        rows=1,  # no parameters: psycopg sends a Query
                    )
                elif user == "bob":
                    cur = conn.execute(
                        f"select name as {m}_p{n} from {s.customers} where id = %s {tagged}",
                        (cid,),
                    )
                    assert cur.fetchall() == [(f"name{cid}",)]
                    record = expect(
                        "SELECT",
                        "READ",
                        who,
                        tables={c: ["id", "name"]},
                        rows=1,
                        protocol="extended",
                        params=[str(cid)],
                    )
                else:
                    cur = conn.execute(
                        f"update /*{m}_p{n}*/ {s.customers} set email = email where id = %s "
                        f"{tagged}",
                        (cid,),
                    )
                    assert cur.rowcount == 1
                    record = expect(
                        "UPDATE",
                        "WRITE",
                        who,
                        tables={c: ["email", "id"]},
                        rows=1,
                        protocol="extended",
                        params=[str(cid)],
                    )
                self.add(f"p{n}", record)
            finally:
                pool.put(conn)

        try:
            workers = [
                threading.Thread(target=self._each, args=(request, range(k, 11, 4)))
                for k in range(4)
            ]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
        finally:
            for conn in conns:
                conn.close()

    def _each(self, fn: Callable[[int], None], items: range) -> None:
        for item in items:
            fn(item)

    # -- 3. an asyncpg pool, SET LOCAL / set_config per request -------------------------

    def asyncpg_requests(self) -> None:
        asyncio.run(self._asyncpg_requests())

    async def _asyncpg_requests(self) -> None:
        s, m = self.shop, self.shop.mark
        c, o, v = s.q(s.customers), s.q(s.orders), s.q(s.view)
        svc = Who("svc_async", "startup")
        pool = await asyncpg.create_pool(
            host=self.proxy.host,
            port=self.proxy.port,
            user="app_user",
            password=self.pg.role("app_user").password,
            database="app",
            statement_cache_size=0,  # PgBouncer transaction mode: no named statements
            server_settings={"scalple.user_id": "svc_async"},
            min_size=2,
            max_size=2,
        )
        assert pool is not None
        releases = 0

        async def dave() -> None:
            nonlocal releases
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SET LOCAL scalple.user_id = 'dave'")
                rows = await conn.fetch(
                    f"select id, amount as {m}_d1 from {s.orders} where customer_id = $1 "
                    "order by id",
                    2,
                )
                assert [r["id"] for r in rows] == [1, 7, 13, 19]
                cursor = await conn.cursor(
                    f"select id as {m}_d2 from {s.orders} where amount > $1::int order by id",
                    100,
                )
                first = await cursor.fetch(3)
                second = await cursor.fetch(4)
                assert [r[0] for r in first + second] == list(range(11, 18))
                await conn.executemany(
                    f"insert /*{m}_d3*/ into {s.orders} (id, customer_id, amount) "
                    "values ($1, $2, $3::int)",
                    [(1000 + k, 5, k) for k in range(1, 5)],
                )
                # A cursor still open when the transaction commits: the
                # portal ends with the transaction.
                cursor = await conn.cursor(
                    f"select id as {m}_d4 from {s.orders} where customer_id = $1 order by id",
                    3,
                )
                assert [r[0] for r in await cursor.fetch(2) + await cursor.fetch(1)] == [
                    2,
                    8,
                    14,
                ]
            releases += 1
            who = Who("dave", "set")
            self.add_unmarked("BEGIN;", expect("BEGIN", "MISC", svc))
            self.add_unmarked("SET LOCAL scalple.user_id = 'dave'", expect("SET", "MISC", svc))
            self.add(
                "d1",
                expect(
                    "SELECT",
                    "READ",
                    who,
                    tables={o: ["amount", "customer_id", "id"]},
                    rows=4,
                    protocol="extended",
                    params=["2"],
                ),
            )
            self.add(
                "d2",
                expect(
                    "SELECT",
                    "READ",
                    who,
                    tables={o: ["amount", "id"]},
                    rows=7,
                    protocol="extended",
                    params=["100"],
                ),
            )
            for k in range(1, 5):
                self.add(
                    "d3",
                    expect(
                        "INSERT",
                        "WRITE",
                        who,
                        tables={o: ["amount", "customer_id", "id"]},
                        rows=1,
                        protocol="extended",
                        params=[str(1000 + k), "5", str(k)],
                    ),
                )
            self.add(
                "d4",
                expect(
                    "SELECT",
                    "READ",
                    who,
                    tables={o: ["customer_id", "id"]},
                    rows=3,
                    protocol="extended",
                    params=["3"],
                ),
            )
            self.add_unmarked("COMMIT;", expect("COMMIT", "MISC", who))

        async def erin() -> None:
            nonlocal releases
            async with pool.acquire() as conn:
                async with conn.transaction():
                    await conn.fetchval(
                        f"select set_config('scalple.user_id', $1, true) as {m}_e0", "erin"
                    )
                    n = await conn.fetchval(
                        f"select count(*) as {m}_e1 from {s.view} where city = $1", "Rome"
                    )
                    assert n == 3
                # the transaction is over: SET LOCAL is gone
                assert await conn.fetchval(f"select $1::int as {m}_e2", 7) == 7
            releases += 1
            self.add_unmarked("BEGIN;", expect("BEGIN", "MISC", svc))
            self.add(
                "e0",
                expect("SELECT", "READ", svc, rows=1, protocol="extended", params=["erin"]),
            )
            self.add(
                "e1",
                expect(
                    "SELECT",
                    "READ",
                    Who("erin", "set"),
                    tables={v: ["city"], c: ["city", "id"], o: ["amount", "customer_id"]},
                    rows=1,
                    protocol="extended",
                    params=["Rome"],
                ),
            )
            self.add_unmarked("COMMIT;", expect("COMMIT", "MISC", Who("erin", "set")))
            self.add("e2", expect("SELECT", "READ", svc, rows=1, protocol="extended", params=["7"]))

        async def plain() -> None:
            nonlocal releases
            async with pool.acquire() as conn:
                rows = await conn.fetch(
                    f"select city, count(*) as {m}_s1 from {s.customers} group by city"
                )
                assert len(rows) == 3
            releases += 1
            self.add(
                "s1",
                expect("SELECT", "READ", svc, tables={c: ["city"]}, rows=3, protocol="extended"),
            )

        try:
            await asyncio.gather(dave(), erin(), plain())
        finally:
            await pool.close()
        # asyncpg resets a connection when it goes back to the pool.
        for _ in range(releases):
            self.add_unmarked(
                "SELECT pg_advisory_unlock_all()",
                expect("SELECT", "READ", svc, rows=1),
            )
            self.add_unmarked("CLOSE ALL", expect("CLOSE CURSOR ALL", "MISC", svc))
            self.add_unmarked("UNLISTEN *", expect("UNLISTEN", "MISC", svc))
            self.add_unmarked("RESET ALL", expect("RESET", "MISC", svc))

    # -- 4. a pipeline with an error in the middle --------------------------------------

    def pipeline(self) -> None:
        s, m = self.shop, self.shop.mark
        who = Who("frank", "startup")
        with psycopg.connect(
            dsn(self.pg, self.proxy, "-c scalple.user_id=frank"),
            autocommit=True,
            prepare_threshold=None,
        ) as conn:
            with pytest.raises(psycopg.errors.DivisionByZero), conn.pipeline():
                conn.execute(f"select %s::int as {m}_x1", (1,))
                conn.execute(f"select 1 / %s::int as {m}_x2", (0,))
                conn.execute(
                    f"insert /*{m}_x3*/ into {s.imports} (id, amount) values (%s, 0)", (999,)
                )
            # The insert after the error never ran.
            n = conn.execute(
                f"select count(*) as {m}_x4 from {s.imports} where id = %s", (999,)
            ).fetchone()
            assert n == (0,)
        i = s.q(s.imports)
        self.add("x1", expect("SELECT", "READ", who, rows=1, protocol="extended", params=["1"]))
        self.add(
            "x2",
            expect(
                "SELECT",
                "READ",
                who,
                status="error",
                sqlstate="22012",
                protocol="extended",
                params=["0"],
            ),
        )
        self.add(
            "x4",
            expect(
                "SELECT",
                "READ",
                who,
                tables={i: ["id"]},
                rows=1,
                protocol="extended",
                params=["999"],
            ),
        )

    # -- running it ---------------------------------------------------------------------

    def run(self) -> None:
        """All participants at the same time; re-raise the first failure."""
        participants = [self.psql_alice, self.pool_requests, self.asyncpg_requests, self.pipeline]
        errors: list[BaseException] = []
        start = threading.Barrier(len(participants))

        def go(fn: Callable[[], None]) -> None:
            try:
                start.wait(timeout=10)
                fn()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=go, args=(p,)) for p in participants]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        if errors:
            raise errors[0]


def test_concurrent_workload_records_match_ground_truth(
    pg: PostgresCluster,
    fresh_server_connections: PgBouncer,
    catalog_password: str,
    hs256_secret: tuple[bytes, str],
    proxy_factory: ProxyFactory,
    shop: Shop,
) -> None:
    started = time.time()
    bouncer = fresh_server_connections
    proxy = proxy_factory(
        f"{bouncer.host}:{bouncer.port}",
        {
            "catalog": {"password_file": catalog_password},
            "identity": {"hs256_secret_file": hs256_secret[1]},
        },
    )
    work = Workload(pg, proxy, shop, hs256_secret[0])
    work.run()

    expected_total = sum(len(v) for v in work.expected.values()) + len(work.unmarked)
    with contextlib.suppress(TimeoutError):  # the comparison below says what is missing
        proxy.wait_for_records(lambda rs: len(rs) >= expected_total)
    time.sleep(0.1)  # anything extra would show up now
    records = check_log_integrity(proxy, started)
    statements = [r for r in records if r["kind"] == "statement"]

    # Every record with a marker is one the workload made, with the right fields.
    actual: dict[str, list[Record]] = {}
    unmarked: list[Record] = []
    for record in statements:
        key = shop.key(record["query"])
        if key is None:
            unmarked.append({"query": record["query"], **project(record)})
        else:
            actual.setdefault(key, []).append(project(record))
    assert_groups_equal(actual, work.expected)
    # ...and so is every record without one (transaction control, pool resets).
    assert_groups_equal({"unmarked": unmarked}, {"unmarked": work.unmarked})

    # Notes: said where something could not be resolved, and only there.
    for record in statements:
        key = shop.key(record["query"])
        wanted = work.notes.get((key or "", record["command"]), [])
        assert record["analysis_notes"] == wanted, (record["query"], record["analysis_notes"])

    # The text of each statement of a multi-statement Query is its own.
    a2 = next(r for r in statements if shop.key(r["query"]) == "a2")
    assert a2["query"] == (
        f"update /*{shop.mark}_a2*/ {shop.orders} set amount = amount + 0 where customer_id = 1 "
        "/*scalple.user_id='zed'*/"
    )
    # The pool shared two connections between bob and carol.
    pool_sessions = {r["session_id"] for r in statements if (shop.key(r["query"]) or "")[:1] == "p"}
    assert len(pool_sessions) == 2
    # The asyncpg cursors ran inside the explicit transaction, over two
    # round trips each (the portal was suspended in between).
    cursors = {
        key: (record["in_transaction"], record["duration_us"] > 0)
        for record in statements
        if (key := shop.key(record["query"])) in ("d2", "d4")
    }
    assert cursors == {"d2": (True, True), "d4": (True, True)}, (
        "cursor records: (in_transaction, duration_us > 0)"
    )


# --------------------------------------------------------------------------- tokens


def test_tokens_end_to_end(
    pg: PostgresCluster, ident_direct: ScalpleServer, hs256_secret: tuple[bytes, str]
) -> None:
    proxy = ident_direct
    secret = hs256_secret[0]
    m = "k" + uuid.uuid4().hex[:10]
    now = int(time.time())
    good = make_jwt(secret, sub="tok-7", email="t7@example.com", exp=now + 600)
    expired = make_jwt(secret, sub="old-1", email="old@example.com", exp=now - 3600)
    forged = make_jwt(b"not the secret, but as long as it" * 2, sub="mallory", exp=now + 600)
    verified = Who("tok-7", "token", email="t7@example.com", verified=True)
    fallback = Who("fallback", "startup")
    expected: dict[str, Record] = {}

    def probe(conn: psycopg.Connection[Any], key: str, suffix: str = "") -> None:
        conn.execute(f"select 1 as {m}_{key} {suffix}".rstrip())

    # (a) in the startup packet; a refused token takes the whole channel with it.
    for key, token, who in [
        ("a1", good, verified),
        ("a2", expired, NOBODY.refused("token expired")),
        ("a3", forged, NOBODY.refused("bad signature")),
    ]:
        options = f"-c scalple.token={token} -c scalple.user_id=plain"
        with psycopg.connect(dsn(pg, proxy, options), autocommit=True) as conn:
            probe(conn, key)
        expected[key] = expect("SELECT", "READ", who, rows=1)

    with psycopg.connect(dsn(pg, proxy, "-c scalple.user_id=fallback"), autocommit=True) as conn:
        # (b) in a sqlcommenter comment, for that statement only.
        for key, token, who in [
            ("b1", good, verified),
            ("b2", expired, fallback.refused("token expired")),
            ("b3", forged, fallback.refused("bad signature")),
        ]:
            probe(conn, key, f"/*scalple.token='{token}'*/")
            expected[key] = expect("SELECT", "READ", who, rows=1)
        probe(conn, "b4")
        expected["b4"] = expect("SELECT", "READ", fallback, rows=1)

        # (c) with SET, until changed.
        for key, token, who in [
            ("c1", good, verified),
            ("c2", expired, fallback.refused("token expired")),
            ("c3", forged, fallback.refused("bad signature")),
        ]:
            conn.execute(f"SET scalple.token = '{token}'")
            probe(conn, key)
            expected[key] = expect("SELECT", "READ", who, rows=1)
        conn.execute("RESET scalple.token")
        probe(conn, "c4")
        expected["c4"] = expect("SELECT", "READ", fallback, rows=1)

    records = wait_keys(proxy, m, lambda rs: len(rs) >= len(expected))
    got = {marker_key(m, r["query"]): project(r) for r in records}
    assert got == expected

    # The tokens themselves are never written: not in the audit log, not in the
    # proxy's own log.  The SETs are on record, with the token redacted.
    log = proxy.log_bytes()
    for token in (good, expired, forged):
        assert token.encode() not in log
        assert token.rsplit(".", 1)[1].encode() not in log  # nor its signature
        assert token not in proxy.stderr()
    sets = [
        r["query"] for r in proxy.records() if (r["query"] or "").startswith("SET scalple.token")
    ]
    assert f"SET scalple.token = '{REDACTED}'" in sets
    commented = next(r for r in records if r["query"].startswith(f"select 1 as {m}_b1"))
    assert commented["query"] == f"select 1 as {m}_b1 /*scalple.token='{REDACTED}'*/"


# --------------------------------------------------------------------------- identity scope


def test_identity_scope_follows_postgresql(
    pg: PostgresCluster, ident_direct: ScalpleServer
) -> None:
    """SET LOCAL ends with its transaction; SET ends with RESET / RESET ALL /
    DISCARD ALL and is undone by a rollback.  Ground truth: what the server
    reports for the setting at each probe (the startup identity never reaches
    it, so an empty value there means "the startup channel")."""
    m = "s" + uuid.uuid4().hex[:10]
    seen: dict[str, str | None] = {}

    with psycopg.connect(dsn(pg, ident_direct, "-c scalple.user_id=base"), autocommit=True) as conn:

        def probe(key: str) -> None:
            row = conn.execute(
                f"select current_setting('scalple.user_id', true) as {m}_{key}"
            ).fetchone()
            assert row is not None
            seen[key] = row[0] or None

        probe("p01")
        conn.execute("begin")
        conn.execute("SET LOCAL scalple.user_id = 'loc'")
        probe("p02")
        conn.execute("commit")
        probe("p03")  # SET LOCAL gone after COMMIT

        conn.execute("SET scalple.user_id = 'ses'")
        probe("p04")
        conn.execute("RESET ALL")
        probe("p05")

        conn.execute("SET scalple.user_id = 'ses2'")
        probe("p06")
        conn.execute("DISCARD ALL")
        probe("p07")

        conn.execute("begin")
        conn.execute("SET scalple.user_id = 'rolled'")
        probe("p08")
        conn.execute("rollback")
        probe("p09")  # the SET is undone with its transaction

        conn.execute("SET scalple.user_id = 'keep'")
        conn.execute("begin")
        conn.execute("SET LOCAL scalple.user_id = 'inner'")
        probe("p10")
        conn.execute("commit")
        probe("p11")  # back to the session value
        conn.execute("RESET scalple.user_id")
        probe("p12")

        conn.execute("begin")
        conn.execute("select set_config('scalple.user_id', 'cfg', true)")
        probe("p13")
        conn.execute("commit")
        probe("p14")

        conn.execute("begin")
        conn.execute("SET scalple.user_id = 'doomed'")
        probe("p15")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("select 1/0")
        conn.execute("rollback")
        probe("p16")  # an error aborted the transaction: its SET is undone too

    assert seen == {
        "p01": None, "p02": "loc", "p03": None, "p04": "ses", "p05": None, "p06": "ses2",
        "p07": None, "p08": "rolled", "p09": None, "p10": "inner", "p11": "keep", "p12": None,
        "p13": "cfg", "p14": None, "p15": "doomed", "p16": None,
    }  # fmt: skip
    records = wait_keys(ident_direct, m, lambda rs: len(rs) >= len(seen))
    got = {
        marker_key(m, r["query"]): (
            r["session_user_id"],
            r["identity_source"],
        )
        for r in records
    }
    want = {k: (v, "set") if v else ("base", "startup") for k, v in seen.items()}
    assert got == want


def test_session_set_does_not_leak_between_clients_over_pgbouncer(
    pg: PostgresCluster, proxy_factory: ProxyFactory
) -> None:
    """A one-connection PgBouncer pool: every client's statements run on the
    same server connection, so a session-level SET by one client is visible
    to the others *on the server* -- but each client's records keep their own
    person."""
    m = "l" + uuid.uuid4().hex[:10]
    pool = PgBouncer(pg, pool_mode="transaction", default_pool_size=1)
    pool.start()
    try:
        proxy = proxy_factory(f"{pool.host}:{pool.port}", {"catalog": {"enabled": False}})
        seen: dict[str, str | None] = {}

        def probe(conn: psycopg.Connection[Any], key: str) -> None:
            row = conn.execute(
                f"select current_setting('scalple.user_id', true) as {m}_{key}"
            ).fetchone()
            assert row is not None
            seen[key] = row[0] or None

        with (
            psycopg.connect(dsn(pg, proxy, "-c scalple.user_id=amy"), autocommit=True) as amy,
            psycopg.connect(dsn(pg, proxy, "-c scalple.user_id=bea"), autocommit=True) as bea,
            psycopg.connect(dsn(pg, proxy), autocommit=True) as anon,
        ):
            probe(bea, "k1")
            amy.execute("SET scalple.user_id = 'mallory'")
            probe(amy, "k2")
            probe(bea, "k3")
            probe(anon, "k4")
            amy.execute("RESET scalple.user_id")
            probe(bea, "k5")
        assert seen == {"k1": None, "k2": "mallory", "k3": "mallory", "k4": "mallory", "k5": None}
        records = wait_keys(proxy, m, lambda rs: len(rs) >= len(seen))
        got = {
            marker_key(m, r["query"]): (
                r["session_user_id"],
                r["identity_source"],
            )
            for r in records
        }
        assert got == {
            "k1": ("bea", "startup"),
            "k2": ("mallory", "set"),
            "k3": ("bea", "startup"),
            "k4": (None, "none"),
            "k5": ("bea", "startup"),
        }
    finally:
        pool.cleanup()


# --------------------------------------------------------------------------- no catalog


def test_without_catalog_star_is_noted_not_guessed(
    pg: PostgresCluster, proxy_factory: ProxyFactory, shop: Shop
) -> None:
    proxy = proxy_factory(f"{pg.host}:{pg.port}", {"catalog": {"enabled": False}})
    m = shop.mark
    with psycopg.connect(dsn(pg, proxy), autocommit=True) as conn:
        rows = conn.execute(f"select * /*{m}_n1*/ from {shop.customers}").fetchall()
        assert len(rows) == 6
        conn.execute(f"select name /*{m}_n2*/ from {shop.customers} where city = 'Oslo'")
    records = wait_keys(proxy, m, lambda rs: len(rs) >= 2)
    (star,) = [r for r in records if shop.key(r["query"]) == "n1"]
    (named,) = [r for r in records if shop.key(r["query"]) == "n2"]
    assert star["query"].startswith("select *")
    assert star["affected_tables"] == [shop.customers]  # as written: no schema guessed
    assert star["columns_accessed"] == {}
    assert f"* on {shop.customers} not expanded (no catalog)" in star["analysis_notes"]
    assert star["rows"] == 6 and star["command"] == "SELECT" and star["statement_class"] == "READ"
    # Named columns are still reported, unqualified relation and all.
    assert named["columns_accessed"] == {shop.customers: ["city", "name"]}
    assert any("no catalog" in note for note in named["analysis_notes"])
