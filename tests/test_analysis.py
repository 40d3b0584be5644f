"""Statement analysis: splitting, fingerprints, classification, relation and column
resolution against a real catalog, and the analysis cache.

The schema is created once per module in database ``app``; the catalog is loaded
as ``app_user`` like the proxy would.  Command tags and statement splitting are
checked against the server itself where it has an opinion.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import NamedTuple

import psycopg
import pytest
from psycopg import pq

from scalple.analysis import (
    AnalysisCache,
    Catalog,
    Relation,
    StatementAnalysis,
    analyze,
    analyze_query,
    fingerprint,
    load_catalog,
    split_statements,
    strip_comments,
)
from scalple.devcluster import PostgresCluster

SCHEMA = """
DROP SCHEMA IF EXISTS crm, app_user CASCADE;
DROP VIEW IF EXISTS big_orders, customer_orders CASCADE;
DROP MATERIALIZED VIEW IF EXISTS city_stats;
DROP TABLE IF EXISTS customers, orders, events, "Mixed Case" CASCADE;
DROP FUNCTION IF EXISTS order_total(int), top_customers(int);
CREATE SCHEMA crm;
CREATE SCHEMA app_user AUTHORIZATION app_user;
CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL, email text UNIQUE, city text);
CREATE TABLE orders (id serial PRIMARY KEY, customer_id int REFERENCES customers (id),
                     amount numeric, note text);
CREATE VIEW customer_orders AS
    SELECT c.name, c.city, o.amount FROM customers c JOIN orders o ON o.customer_id = c.id;
CREATE VIEW big_orders AS SELECT name, amount FROM customer_orders WHERE amount > 100;
CREATE TABLE events (id int, created date, payload text) PARTITION BY RANGE (created);
CREATE TABLE events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE crm.leads (id int PRIMARY KEY, email text, score int);
CREATE TABLE crm.customers (id int, vip boolean);
CREATE TABLE app_user.private_notes (id int, body text);
CREATE TABLE "Mixed Case" ("Id" int, "Full Name" text);
CREATE FUNCTION order_total(cid int) RETURNS numeric LANGUAGE sql STABLE
    AS $$ SELECT sum(amount) FROM orders WHERE customer_id = cid $$;
CREATE FUNCTION top_customers(n int) RETURNS TABLE (customer_id int, total numeric)
    LANGUAGE sql AS $$ SELECT customer_id, sum(amount) FROM orders GROUP BY 1 ORDER BY 2 LIMIT n $$;
CREATE MATERIALIZED VIEW city_stats AS SELECT city, count(*) AS n FROM customers GROUP BY city;
ALTER TABLE customers ADD COLUMN dropped_col int;
ALTER TABLE customers DROP COLUMN dropped_col;
GRANT USAGE ON SCHEMA crm TO app_user;
GRANT ALL ON ALL TABLES IN SCHEMA public, crm TO app_user;
GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO app_user;
"""

TEARDOWN = """
DROP SCHEMA IF EXISTS crm, app_user CASCADE;
DROP VIEW IF EXISTS big_orders, customer_orders CASCADE;
DROP MATERIALIZED VIEW IF EXISTS city_stats;
DROP TABLE IF EXISTS customers, orders, events, "Mixed Case" CASCADE;
DROP FUNCTION IF EXISTS order_total(int), top_customers(int);
"""

CUSTOMERS = ["city", "email", "id", "name"]
ORDERS = ["amount", "customer_id", "id", "note"]
NO_BODY = "is called; its body is not analyzed"


@pytest.fixture(scope="module")
def shop(pg: PostgresCluster) -> Iterator[PostgresCluster]:
    pg.psql(SCHEMA)
    try:
        yield pg
    finally:
        pg.psql(TEARDOWN)


@pytest.fixture(scope="module")
def catalog(shop: PostgresCluster) -> Catalog:
    return load_catalog(shop.dsn(user="app_user"))


# --------------------------------------------------------------------------- catalog


def test_catalog_snapshot(shop: PostgresCluster, catalog: Catalog) -> None:
    assert catalog.user == "app_user"
    assert catalog.search_path == ("app_user", "public")  # "$user", public
    customers = catalog.resolve("customers")
    assert customers is not None
    assert (customers.qualified, customers.kind) == ("public.customers", "table")
    assert customers.columns == ("id", "name", "email", "city")  # attnum order, no dropped
    kinds = {
        name: catalog.resolve(name).kind  # type: ignore[union-attr]
        for name in ("customer_orders", "city_stats", "events", "events_2024", "crm.leads")
    }
    assert kinds == {
        "customer_orders": "view",
        "city_stats": "matview",
        "events": "partitioned table",
        "events_2024": "table",
        "crm.leads": "table",
    }
    view = catalog.resolve("big_orders")
    assert view is not None and view.definition is not None
    assert "public.customer_orders" in view.definition  # fully qualified
    assert catalog.resolve('"Mixed Case"') is not None
    assert catalog.resolve(("public", "Mixed Case")) is not None
    assert catalog.resolve("private_notes").qualified == "app_user.private_notes"  # type: ignore[union-attr]
    assert catalog.resolve("pg_class").qualified == "pg_catalog.pg_class"  # type: ignore[union-attr]
    assert catalog.resolve("leads") is None
    assert not any(schema == "pg_toast" for schema, _ in catalog.relations)
    crm = catalog.with_search_path("crm, public")
    assert crm.search_path == ("crm", "public")
    assert crm.resolve("customers").qualified == "crm.customers"  # type: ignore[union-attr]
    assert crm.version != catalog.version
    assert catalog.with_search_path("crm, public") is crm  # memoised
    override = load_catalog(shop.dsn(user="app_user"), search_path='crm, "$user"')
    assert override.search_path == ("crm", "app_user")
    assert override.version != catalog.version


# --------------------------------------------------------------------------- analysis


class Case(NamedTuple):
    id: str
    sql: str
    command: str
    statement_class: str
    columns: dict[str, list[str]]
    tables: list[str] | None = None  # default: the keys of columns
    unresolved: list[str] = []


CASES = [
    Case(
        "select-star",
        "select * from customers",
        "SELECT",
        "READ",
        {"public.customers": CUSTOMERS},
    ),
    Case(
        "qualified-star-and-aliases",
        "select c.*, o.amount from customers c join orders o on o.customer_id = c.id",
        "SELECT",
        "READ",
        {"public.customers": CUSTOMERS, "public.orders": ["amount", "customer_id"]},
    ),
    Case(
        "predicate-and-order-columns-count",
        "select c.name from customers c where c.city = $1 order by c.email limit 5",
        "SELECT",
        "READ",
        {"public.customers": ["city", "email", "name"]},
    ),
    Case(
        "join-using",
        "select name, amount from customers join orders using (id)",
        "SELECT",
        "READ",
        {"public.customers": ["id", "name"], "public.orders": ["amount", "id"]},
    ),
    Case(
        "natural-join",
        "select name from customers natural join orders",
        "SELECT",
        "READ",
        {"public.customers": ["id", "name"], "public.orders": ["id"]},
    ),
    Case(
        "unqualified-columns-resolved-by-catalog",
        "select name, amount from customers left join orders on customer_id = customers.id",
        "SELECT",
        "READ",
        {"public.customers": ["id", "name"], "public.orders": ["amount", "customer_id"]},
    ),
    Case(
        "in-subquery",
        "select name from customers where id in "
        "(select customer_id from orders where amount > 100)",
        "SELECT",
        "READ",
        {"public.customers": ["id", "name"], "public.orders": ["amount", "customer_id"]},
    ),
    Case(
        "correlated-exists",
        "select name from customers c where exists "
        "(select 1 from orders o where o.customer_id = c.id)",
        "SELECT",
        "READ",
        {"public.customers": ["id", "name"], "public.orders": ["customer_id"]},
    ),
    Case(
        "scalar-subquery-in-select-list",
        "select name, (select max(amount) from orders o where o.customer_id = c.id) "
        "from customers c",
        "SELECT",
        "READ",
        {"public.customers": ["id", "name"], "public.orders": ["amount", "customer_id"]},
    ),
    Case(
        "subquery-in-from-only-used-columns",
        "select s.n from (select name as n, email from customers) s",
        "SELECT",
        "READ",
        {"public.customers": ["name"]},
    ),
    Case(
        "subquery-in-from-grouping",
        "select s.total from (select customer_id, sum(amount) as total from orders "
        "group by customer_id) s",
        "SELECT",
        "READ",
        {"public.orders": ["amount", "customer_id"]},
    ),
    Case(
        "cte-reports-base-tables",
        "with big as (select customer_id, amount from orders where amount > 100) "
        "select c.name, big.amount from big join customers c on c.id = big.customer_id",
        "SELECT",
        "READ",
        {"public.customers": ["id", "name"], "public.orders": ["amount", "customer_id"]},
    ),
    Case(
        "recursive-cte",
        "with recursive chain(id, depth) as ("
        " select id, 0 from customers where id = 1"
        " union all"
        " select o.id, chain.depth + 1 from orders o join chain on o.customer_id = chain.id"
        ") select id from chain",
        "SELECT",
        "READ",
        {"public.customers": ["id"], "public.orders": ["customer_id", "id"]},
    ),
    Case(
        "union",
        "select email from customers union select email from crm.leads",
        "SELECT",
        "READ",
        {"crm.leads": ["email"], "public.customers": ["email"]},
    ),
    Case(
        "except-in-subquery-uses-all-columns",
        "select x.email from (select email, city from customers "
        "except select email, null from crm.leads) x",
        "SELECT",
        "READ",
        {"crm.leads": ["email"], "public.customers": ["city", "email"]},
    ),
    Case(
        "lateral",
        "select c.name, x.amount from customers c cross join lateral "
        "(select amount from orders o where o.customer_id = c.id order by amount desc limit 1) x",
        "SELECT",
        "READ",
        {"public.customers": ["id", "name"], "public.orders": ["amount", "customer_id"]},
    ),
    Case(
        "view-and-base-tables",
        "select name from customer_orders where amount > 10",
        "SELECT",
        "READ",
        {
            "public.customer_orders": ["amount", "name"],
            "public.customers": ["id", "name"],
            "public.orders": ["amount", "customer_id"],
        },
    ),
    Case(
        "view-on-view",
        "select name from big_orders",
        "SELECT",
        "READ",
        {
            "public.big_orders": ["name"],
            "public.customer_orders": ["amount", "name"],
            "public.customers": ["id", "name"],
            "public.orders": ["amount", "customer_id"],
        },
    ),
    Case(
        "matview-is-a-leaf",
        "select city, n from city_stats",
        "SELECT",
        "READ",
        {"public.city_stats": ["city", "n"]},
    ),
    Case(
        "partitioned-table",
        "select payload from events where created >= '2024-06-01'",
        "SELECT",
        "READ",
        {"public.events": ["created", "payload"]},
    ),
    Case(
        "user-function-in-from",
        "select c.name, t.total from top_customers(5) t join customers c on c.id = t.customer_id",
        "SELECT",
        "READ",
        {"public.customers": ["id", "name"]},
        unresolved=[f"function public.top_customers(integer) {NO_BODY}"],
    ),
    Case(
        "only-a-user-function-in-from",
        "select customer_id, total from top_customers(5)",
        "SELECT",
        "FUNCTION",
        {},
        unresolved=[f"function public.top_customers(integer) {NO_BODY}"],
    ),
    Case(
        "builtin-functions-in-from",
        "select g, u from generate_series(1, 3) g, unnest(array['a']) with ordinality u(u, i)",
        "SELECT",
        "READ",
        {},
    ),
    Case(
        "select-only-a-function",
        "select order_total(1)",
        "SELECT",
        "FUNCTION",
        {},
        unresolved=[f"function public.order_total(integer) {NO_BODY}"],
    ),
    Case(
        "function-over-a-table",
        "select name, order_total(id) from customers",
        "SELECT",
        "READ",
        {"public.customers": ["id", "name"]},
        unresolved=[f"function public.order_total(integer) {NO_BODY}"],
    ),
    Case(
        "unknown-relation",
        "select id, name from nosuch_table",
        "SELECT",
        "READ",
        {"nosuch_table": ["id", "name"]},
        unresolved=["relation nosuch_table is not in the catalog"],
    ),
    Case(
        "unknown-column",
        "select c.nosuch from customers c",
        "SELECT",
        "READ",
        {},
        ["public.customers"],
        unresolved=["column nosuch is not a column of public.customers"],
    ),
    Case(
        "ambiguous-column",
        "select id from customers, orders",
        "SELECT",
        "READ",
        {"public.customers": ["id"], "public.orders": ["id"]},
        unresolved=["column reference id is ambiguous"],
    ),
    Case(
        "whole-row-reference",
        "select c from customers c",
        "SELECT",
        "READ",
        {"public.customers": CUSTOMERS},
    ),
    Case(
        "window-group-having-order-alias",
        "select city as town, count(*) over (partition by city order by min(name)) "
        "from customers group by city having max(email) is not null order by town",
        "SELECT",
        "READ",
        {"public.customers": ["city", "email", "name"]},
    ),
    Case(
        "select-for-update",
        "select id from orders where id = 1 for update",
        "SELECT",
        "READ",
        {"public.orders": ["id"]},
    ),
    Case(
        "system-catalog",
        "select relname from pg_class where relkind = 'r'",
        "SELECT",
        "READ",
        {"pg_catalog.pg_class": ["relkind", "relname"]},
    ),
    Case(
        "quoted-identifiers",
        'select "Full Name" from "Mixed Case" where "Id" = 1',
        "SELECT",
        "READ",
        {'public."Mixed Case"': ["Full Name", "Id"]},
    ),
    Case(
        "schema-qualified",
        "select l.email, crm.leads.score from crm.leads, crm.leads l",
        "SELECT",
        "READ",
        {"crm.leads": ["email", "score"]},
    ),
    Case(
        "search-path-user-schema",
        "select body from private_notes",
        "SELECT",
        "READ",
        {"app_user.private_notes": ["body"]},
    ),
    Case(
        "search-path-miss",
        "select * from leads",
        "SELECT",
        "READ",
        {},
        ["leads"],
        unresolved=[
            "relation leads is not in the catalog",
            "* on leads not expanded (not in the catalog)",
        ],
    ),
    Case(
        "data-modifying-cte-is-write",
        "with d as (delete from orders where amount < 0 returning customer_id) "
        "select count(*) from d",
        "SELECT",
        "WRITE",
        {"public.orders": ["amount", "customer_id"]},
    ),
    Case(
        "insert-returning",
        "insert into orders (customer_id, amount) values ($1, $2) returning id",
        "INSERT",
        "WRITE",
        {"public.orders": ["amount", "customer_id", "id"]},
    ),
    Case(
        "insert-without-column-list-writes-the-row",
        "insert into crm.leads values (1, 'x@example.com', 3)",
        "INSERT",
        "WRITE",
        {"crm.leads": ["email", "id", "score"]},
    ),
    Case(
        "insert-select",
        "insert into crm.leads (id, email) select id, email from customers where city = 'Oslo'",
        "INSERT",
        "WRITE",
        {"crm.leads": ["email", "id"], "public.customers": ["city", "email", "id"]},
    ),
    Case(
        "insert-on-conflict-do-update",
        "insert into customers (name, email) values ('a', 'a@example.com') "
        "on conflict (email) do update set name = excluded.name where customers.city is null",
        "INSERT",
        "WRITE",
        {"public.customers": ["city", "email", "name"]},
    ),
    Case(
        "update-from-returning",
        "update orders o set note = c.name from customers c "
        "where c.id = o.customer_id and c.city = 'Oslo' returning o.id, o.amount",
        "UPDATE",
        "WRITE",
        {"public.customers": ["city", "id", "name"], "public.orders": ORDERS},
    ),
    Case(
        "delete-using",
        "delete from orders o using customers c "
        "where c.id = o.customer_id and c.email like '%@example.com'",
        "DELETE",
        "WRITE",
        {"public.customers": ["email", "id"], "public.orders": ["customer_id"]},
    ),
    Case(
        "merge",
        "merge into crm.leads l using customers c on l.email = c.email "
        "when matched then update set score = l.score + 1 "
        "when not matched then insert (id, email) values (c.id, c.email)",
        "MERGE",
        "WRITE",
        {"crm.leads": ["email", "id", "score"], "public.customers": ["email", "id"]},
    ),
    Case(
        "truncate",
        "truncate orders, crm.leads",
        "TRUNCATE TABLE",
        "WRITE",
        {},
        ["crm.leads", "public.orders"],
    ),
    Case(
        "copy-from-stdin",
        "copy crm.leads (id, email) from stdin",
        "COPY",
        "WRITE",
        {"crm.leads": ["email", "id"]},
    ),
    Case(
        "copy-table-to",
        "copy orders to stdout",
        "COPY",
        "READ",
        {"public.orders": ORDERS},
    ),
    Case(
        "copy-query-to",
        "copy (select name, email from customers where city = 'Oslo') to stdout with csv",
        "COPY",
        "READ",
        {"public.customers": ["city", "email", "name"]},
    ),
    Case(
        "explain-analyze",
        "explain analyze select name from customers where id = 1",
        "EXPLAIN",
        "READ",
        {"public.customers": ["id", "name"]},
    ),
    Case(
        "explain-analyze-dml",
        "explain (analyze, buffers) delete from orders where amount < 0",
        "EXPLAIN",
        "WRITE",
        {"public.orders": ["amount"]},
    ),
    Case(
        "explain-plain",
        "explain select * from orders",
        "EXPLAIN",
        "MISC",
        {"public.orders": ORDERS},
        unresolved=["EXPLAIN without ANALYZE: the statement was planned, not executed"],
    ),
    Case(
        "create-table",
        "create table crm.notes (id int primary key, body text, "
        "lead_id int references crm.leads (id))",
        "CREATE TABLE",
        "DDL",
        {"crm.leads": ["id"], "crm.notes": ["body", "id", "lead_id"]},
    ),
    Case(
        "create-table-in-first-schema-of-path",
        "create table scratch (a int)",
        "CREATE TABLE",
        "DDL",
        {"app_user.scratch": ["a"]},
    ),
    Case(
        "alter-table",
        "alter table customers add column phone text, alter column city set not null",
        "ALTER TABLE",
        "DDL",
        {"public.customers": ["city", "phone"]},
    ),
    Case(
        "drop-table",
        "drop table if exists crm.leads, orders",
        "DROP TABLE",
        "DDL",
        {},
        ["crm.leads", "public.orders"],
    ),
    Case(
        "create-index",
        "create index on orders (customer_id, (lower(note))) where amount > 0",
        "CREATE INDEX",
        "DDL",
        {"public.orders": ["amount", "customer_id", "note"]},
    ),
    Case(
        "create-view",
        "create view crm.vip as select id, name from customers where city = 'Oslo'",
        "CREATE VIEW",
        "DDL",
        {"public.customers": ["city", "id", "name"]},
        ["crm.vip", "public.customers"],
    ),
    Case(
        "create-table-as",
        "create table crm.snapshot as select * from orders",
        "CREATE TABLE AS",
        "DDL",
        {"public.orders": ORDERS},
        ["crm.snapshot", "public.orders"],
    ),
    Case(
        "select-into",
        "select name into temp tmp_names from customers",
        "SELECT INTO",
        "DDL",
        {"public.customers": ["name"]},
        ["public.customers", "tmp_names"],
    ),
    Case(
        "refresh-matview-reads-its-sources",
        "refresh materialized view city_stats",
        "REFRESH MATERIALIZED VIEW",
        "DDL",
        {"public.customers": ["city"]},
        ["public.city_stats", "public.customers"],
    ),
    Case(
        "grant-columns",
        "grant select (name, email) on customers to app_user",
        "GRANT",
        "ROLE",
        {"public.customers": ["email", "name"]},
    ),
    Case(
        "grant-all-tables-in-schema",
        "grant select on all tables in schema crm to app_user",
        "GRANT",
        "ROLE",
        {},
        ["crm.customers", "crm.leads"],
    ),
    Case("revoke", "revoke all on orders from app_user", "REVOKE", "ROLE", {}, ["public.orders"]),
    Case("create-role", "create role auditor login password 'secret'", "CREATE ROLE", "ROLE", {}),
    Case("grant-role", "grant pg_read_all_data to app_user", "GRANT ROLE", "ROLE", {}),
    Case("set", "set statement_timeout = '5s'", "SET", "MISC", {}),
    Case("begin", "begin isolation level serializable", "BEGIN", "MISC", {}),
    Case("commit", "commit", "COMMIT", "MISC", {}),
    Case(
        "vacuum",
        "vacuum analyze customers (name)",
        "VACUUM",
        "MISC",
        {"public.customers": ["name"]},
    ),
    Case("lock", "lock table orders in share mode", "LOCK TABLE", "MISC", {}, ["public.orders"]),
    Case("checkpoint", "checkpoint", "CHECKPOINT", "MISC", {}),
    Case("discard", "discard all", "DISCARD ALL", "MISC", {}),
    Case(
        "do-block",
        "do $$ declare n int; begin "
        "select count(*) into n from orders where amount > 0; "
        "update customers set city = 'x' where id = n; "
        "execute 'truncate ' || 'orders'; end $$",
        "DO",
        "FUNCTION",
        {"public.customers": ["city", "id"], "public.orders": ["amount"]},
        unresolved=["dynamic SQL in DO block not analyzed"],
    ),
    Case(
        "prepare",
        "prepare q(int) as select name from customers where id = $1",
        "PREPARE",
        "READ",
        {"public.customers": ["id", "name"]},
        unresolved=["PREPARE: the statement is planned here and runs on EXECUTE"],
    ),
    Case(
        "execute",
        "execute q(1)",
        "EXECUTE",
        "MISC",
        {},
        unresolved=["EXECUTE: the prepared statement's text is not known to the analyzer"],
    ),
    Case(
        "declare-cursor",
        "declare cur cursor for select email from customers",
        "DECLARE CURSOR",
        "READ",
        {"public.customers": ["email"]},
    ),
    Case("fetch", "fetch 10 from cur", "FETCH", "MISC", {}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_analyze(case: Case, catalog: Catalog) -> None:
    result = analyze(case.sql, catalog)
    expected_tables = case.tables if case.tables is not None else sorted(case.columns)
    assert (
        result.command,
        result.statement_class,
        result.affected_tables,
        result.columns_accessed,
        result.unresolved,
    ) == (case.command, case.statement_class, expected_tables, case.columns, case.unresolved)
    assert result.fingerprint == fingerprint(case.sql)


def test_search_path_of_a_session(catalog: Catalog) -> None:
    crm = catalog.with_search_path("crm, public")
    result = analyze("select * from customers join leads using (id)", crm)
    assert result.columns_accessed == {
        "crm.customers": ["id", "vip"],
        "crm.leads": ["email", "id", "score"],
    }
    # A SET inside a multi-statement string applies to what follows it.
    first, _, third, _, fifth = analyze_query(
        "select vip from customers; set search_path = crm; select vip from customers; "
        "reset search_path; select email from customers",
        catalog,
    )
    assert first.unresolved == ["column vip could not be resolved"]
    assert third.columns_accessed == {"crm.customers": ["vip"]}
    assert fifth.columns_accessed == {"public.customers": ["email"]}


def test_without_catalog_nothing_is_guessed() -> None:
    result = analyze("select * from customers")
    assert (result.affected_tables, result.columns_accessed) == (["customers"], {})
    assert result.unresolved[0] == "* on customers not expanded (no catalog)"
    joined = analyze(
        "select c.name, o.amount from customers c join crm.orders o on o.customer_id = c.id"
    )
    assert joined.columns_accessed == {
        "crm.orders": ["amount", "customer_id"],
        "customers": ["id", "name"],
    }
    ambiguous = analyze("select name from customers, orders")
    assert ambiguous.columns_accessed == {}
    assert ambiguous.unresolved[0] == (
        "column name could not be attributed to one of: customers, orders"
    )
    assert analyze("select lower(name) from t").unresolved == [
        "no catalog: relations are reported as written and views are not expanded"
    ]
    assert analyze("select f(1)").unresolved == [f"function f {NO_BODY}"]


def test_hand_built_catalog() -> None:
    catalog = Catalog(
        [
            Relation("public", "t", "table", ("a", "b")),
            Relation("public", "v", "view", ("x",), "select a as x from t where b > 0"),
        ]
    )
    result = analyze("select x from v", catalog)
    assert result.columns_accessed == {"public.t": ["a", "b"], "public.v": ["x"]}


def test_unparsable_statement(catalog: Catalog) -> None:
    result = analyze("selec name from customers", catalog)
    assert (result.command, result.statement_class, result.affected_tables) == ("SELEC", "MISC", [])
    assert result.unresolved[0].startswith("statement could not be parsed: syntax error")
    assert result.fingerprint.startswith("unparsed:")


def test_command_tags_match_the_server(shop: PostgresCluster, catalog: Catalog) -> None:
    """``command`` is what the server's CommandComplete says (minus row counts).

    Known exceptions, not listed: SELECT INTO / CREATE TABLE AS / CREATE MATERIALIZED
    VIEW complete as ``SELECT n``, and EXECUTE with the prepared statement's tag.
    """
    statements = [
        "select 1",
        "insert into crm.leads values (1, 'a', 1)",
        "update crm.leads set score = 2",
        "merge into crm.leads l using customers c on l.id = c.id when matched then do nothing",
        "delete from crm.leads",
        "create table crm.t1 (a int)",
        "alter table crm.t1 add column b int",
        "create index on crm.t1 (a)",
        "create view crm.v1 as select a from crm.t1",
        "create sequence crm.s1",
        "create function crm.f1() returns int language sql as 'select 1'",
        "alter function crm.f1() stable",
        "comment on table crm.t1 is 'x'",
        "grant select on crm.t1 to app_user",
        "revoke select on crm.t1 from app_user",
        "create role scalple_tag_probe",
        "grant scalple_tag_probe to app_user",
        "alter role scalple_tag_probe nologin",
        "drop role scalple_tag_probe",
        "truncate crm.t1",
        "lock table crm.t1",
        "drop view crm.v1",
        "drop table crm.t1",
        "set local work_mem = '8MB'",
        "reset work_mem",
        "show work_mem",
        "do $$ begin end $$",
        "explain select 1",
        "prepare p1 as select 1",
        "deallocate p1",
        "declare c1 cursor for select 1",
        "fetch c1",
        "move c1",
        "close c1",
        "savepoint sp",
        "release sp",
        "refresh materialized view city_stats",
        "analyze crm.leads",
    ]
    with psycopg.connect(shop.dsn(user="postgres")) as conn:
        for sql in statements:
            cursor = conn.execute(sql)
            tag = (cursor.statusmessage or "").rstrip("0123456789 ")
            if tag == "INSERT":  # "INSERT 0 1"
                tag = "INSERT"
            assert analyze(sql, catalog).command == tag, sql
        conn.rollback()


# --------------------------------------------------------------------------- splitting


SPLIT_CASES = [
    ("select 1;;select 2", ["select 1", "select 2"]),
    ("  -- only a comment\n  ", []),
    ("/* only */", []),
    (";", []),
    (";;", []),
    ("select 1; -- tail", ["select 1"]),
    (
        "/* lead */ select 1 /* inside */ ; /*second*/ select 2 -- end",
        ["/* lead */ select 1 /* inside */", "/*second*/ select 2 -- end"],
    ),
    (
        "create function s_f() returns int language plpgsql as $$ begin return 1; end $$; "
        "select s_f(); drop function s_f()",
        [
            "create function s_f() returns int language plpgsql as $$ begin return 1; end $$",
            "select s_f()",
            "drop function s_f()",
        ],
    ),
    (
        "create function s_g() returns int language sql begin atomic select 1; end; "
        "drop function s_g()",
        [
            "create function s_g() returns int language sql begin atomic select 1; end",
            "drop function s_g()",
        ],
    ),
    ("select E'a\\';b'; select 'c;d'", ["select E'a\\';b'", "select 'c;d'"]),
    ("select 'ä;ö' ; select $tag$;$tag$", ["select 'ä;ö'", "select $tag$;$tag$"]),
    ("select 1; selec 2", ["select 1; selec 2"]),
    ("begin; select 1;; commit", ["begin", "select 1", "commit"]),
]


@pytest.mark.parametrize(("sql", "expected"), SPLIT_CASES)
def test_split_statements(sql: str, expected: list[str]) -> None:
    assert split_statements(sql) == expected


def test_split_pairs_with_the_servers_responses(shop: PostgresCluster) -> None:
    """One element per CommandComplete; [] exactly when the server says EmptyQuery;
    [sql] when the server fails the whole string with one error."""
    with psycopg.connect(shop.dsn(user="postgres"), autocommit=True) as conn:
        pgconn = conn.pgconn
        for sql, expected in SPLIT_CASES:
            pgconn.send_query(sql.encode())
            statuses = []
            while (result := pgconn.get_result()) is not None:
                statuses.append(pq.ExecStatus(result.status))
            if expected == []:
                assert statuses == [pq.ExecStatus.EMPTY_QUERY], sql
            elif pq.ExecStatus.FATAL_ERROR in statuses and len(statuses) == 1:
                assert expected == [sql], sql
            else:
                assert len(statuses) == len(expected), sql
                assert pq.ExecStatus.EMPTY_QUERY not in statuses, sql


# --------------------------------------------------------------------------- text


def test_strip_comments_uses_the_scanner() -> None:
    assert strip_comments("select '/* not a comment */' /* real */ from t -- x") == (
        "select '/* not a comment */' from t"
    )
    assert strip_comments("select/**/1") == "select 1"
    assert strip_comments("select 1 /* a /* nested */ comment */ + $$--$$") == "select 1 + $$--$$"
    assert strip_comments("select 'it''s -- fine'") == "select 'it''s -- fine'"


def test_fingerprint() -> None:
    plain = "select * from customers where id = 42"
    commented = "select * from customers where id = 42 /*scalple.user_id='42'*/"
    assert fingerprint(plain) == fingerprint(commented)
    assert fingerprint(plain) == fingerprint("SELECT *\n FROM customers WHERE id = 7")
    assert fingerprint(plain) != fingerprint("select * from orders where id = 42")
    broken = fingerprint("selec  1 /* x */")
    assert broken.startswith("unparsed:")
    assert broken == fingerprint("selec 1")
    assert broken != fingerprint("selec 2")


# --------------------------------------------------------------------------- cache


def test_cache_hit_after_miss(catalog: Catalog) -> None:
    cache = AnalysisCache(maxsize=100)
    first = cache.analyze_cached("select name from customers where id = 1", catalog)
    second = cache.analyze_cached(
        "select name from customers where id = 2 /*scalple.user_id='42'*/", catalog
    )
    assert second is first
    assert (cache.hits, cache.misses) == (1, 1)
    assert first == analyze("select name from customers where id = 1", catalog)


def test_cache_invalidated_by_new_catalog_version(shop: PostgresCluster, catalog: Catalog) -> None:
    cache = AnalysisCache()
    before = cache.analyze_cached("select * from crm.leads", catalog)
    shop.psql("alter table crm.leads add column phone text")
    try:
        changed = load_catalog(shop.dsn(user="app_user"))
    finally:
        shop.psql("alter table crm.leads drop column phone")
    assert changed.version != catalog.version
    after = cache.analyze_cached("select * from crm.leads", changed)
    assert before.columns_accessed == {"crm.leads": ["email", "id", "score"]}
    assert after.columns_accessed == {"crm.leads": ["email", "id", "phone", "score"]}
    assert (cache.hits, cache.misses) == (0, 2)
    assert cache.analyze_cached("select * from crm.leads", catalog) is before


def test_cache_tells_apart_what_the_fingerprint_ignores(catalog: Catalog) -> None:
    """Same fingerprint, different analysis: aliases swapped, digit runs in relation
    names, DO bodies, subquery output names.  The cache must not mix them up."""
    pairs = [
        (
            "select a.email from customers a, crm.leads b",
            "select a.email from customers b, crm.leads a",
        ),
        ("select * from events_2024", "select * from events_2025"),
        ("do $$ begin delete from orders; end $$", "do $$ begin delete from crm.leads; end $$"),
        (
            "select s.x from (select name as x, email as y from customers) s",
            "select s.x from (select name as y, email as x from customers) s",
        ),
        ("set search_path = crm", "set search_path = public"),
        (
            "select 1 from customers where exists "
            "(select o.note as amount from orders o order by amount)",
            "select 1 from customers where exists (select o.note from orders o order by amount)",
        ),
        (
            "select j.name from (customers join orders using (id)) j",
            "select j.name from (customers join orders using (id))",
        ),
        (
            "select name as town, count(*) from customers group by town",
            "select name, count(*) from customers group by town",
        ),
        (
            "select name as email from customers order by email",
            "select name from customers order by email",
        ),
    ]
    cache = AnalysisCache()
    for one, other in pairs:
        assert fingerprint(one) == fingerprint(other), one
        for sql in (one, other, one, other):
            assert cache.analyze_cached(sql, catalog) == analyze(sql, catalog), sql
    assert cache.analyze_query("set search_path = crm; select vip from customers", catalog)[
        1
    ].columns_accessed == {"crm.customers": ["vip"]}


def test_cache_is_bounded_and_thread_safe(catalog: Catalog) -> None:
    cache = AnalysisCache(maxsize=3)
    queries = [f"select {col} from customers c where c.id = 1" for col in CUSTOMERS] + [
        "select name from customer_orders",
        "select * from big_orders b join city_stats s using (city)",
    ]
    expected = {q: analyze(q, catalog) for q in queries}
    errors: list[str] = []

    def worker() -> None:
        for _ in range(20):
            for q in queries:
                if cache.analyze_cached(q, catalog) != expected[q]:
                    errors.append(q)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(cache) == 3
    assert cache.hits + cache.misses == 8 * 20 * len(queries)


def test_statement_analysis_is_a_frozen_struct() -> None:
    result = analyze("select 1")
    assert isinstance(result, StatementAnalysis)
    with pytest.raises(AttributeError):
        result.command = "x"  # type: ignore[misc]


def test_parse_error_notes_never_quote_the_statement() -> None:
    """PostgreSQL's syntax error names the token it stopped at; that token can
    be a constant holding personal data, and notes are stored in the record."""
    from scalple.analysis.sql import analyze

    leaky = "select * from users where email = 'ana@example.com' 'bob@example.com'"
    notes = analyze(leaky).unresolved
    assert notes and notes[0].startswith("statement could not be parsed: syntax error at byte")
    assert not any("example.com" in note for note in notes)
    block = analyze("do $$ begin perform 'ana@example.com' 'x'; end $$").unresolved
    assert not any("example.com" in note for note in block)
