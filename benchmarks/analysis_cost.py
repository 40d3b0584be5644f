#!/usr/bin/env python3
"""What statement analysis costs per statement: a cache miss versus a cache hit.

Analysis runs on worker threads, so its cost is CPU time taken from the proxy's
process, not latency added to a client's round trip.  A miss parses the statement
and resolves every name; a hit only fingerprints the text and looks it up (plus a
scanner pass for statements whose analysis depends on aliases, see
:mod:`scalple.analysis.cache`).  This script measures both for five representative
statements against a real catalog: it starts a private PostgreSQL 15, creates a
small schema and loads the catalog as the proxy would.

Usage::

    python benchmarks/analysis_cost.py [--repeat N] [--dsn CONNINFO] [--json]

``--dsn`` skips the private cluster and uses an existing database that already has
the schema below.  Reported numbers are the median of ``--repeat`` timings of a batch,
per statement, in microseconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence

from scalple.analysis import AnalysisCache, Catalog, analyze, fingerprint, load_catalog
from scalple.analysis.sql import analyze_full, signature
from scalple.devcluster import PostgresCluster

SCHEMA = """
CREATE SCHEMA IF NOT EXISTS crm;
CREATE TABLE IF NOT EXISTS customers (id serial PRIMARY KEY, name text, email text, city text);
CREATE TABLE IF NOT EXISTS orders (id serial PRIMARY KEY, customer_id int, amount numeric,
                                   note text);
CREATE OR REPLACE VIEW customer_orders AS
    SELECT c.name, c.city, o.amount FROM customers c JOIN orders o ON o.customer_id = c.id;
CREATE OR REPLACE VIEW big_orders AS SELECT name, amount FROM customer_orders WHERE amount > 100;
CREATE TABLE IF NOT EXISTS crm.leads (id int PRIMARY KEY, email text, score int);
GRANT USAGE ON SCHEMA crm TO app_user;
GRANT SELECT ON ALL TABLES IN SCHEMA public, crm TO app_user;
"""

# (name, statement template); {n} is replaced by a changing constant so every text
# differs, as with real traffic (plus a sqlcommenter comment on some).
STATEMENTS = [
    ("point select", "select id, name, email from customers where id = {n}"),
    (
        "insert returning",
        "insert into orders (customer_id, amount, note) values ({n}, 9.5, 'x') returning id",
    ),
    (
        "join + aggregate",
        "select c.name, sum(o.amount) from customers c join orders o on o.customer_id = c.id "
        "where c.city = 'Oslo' and o.id > {n} group by c.name order by 2 desc limit 10 "
        "/*scalple.user_id='{n}',route='report'*/",
    ),
    ("view on a view", "select name, amount from big_orders where amount > {n}"),
    (
        "CTE + subqueries",
        "with recent as (select customer_id, max(amount) as top from orders "
        "where id > {n} group by customer_id) "
        "select c.email, r.top from customers c join recent r on r.customer_id = c.id "
        "where exists (select 1 from crm.leads l where l.email = c.email) "
        "/*scalple.user_id='{n}'*/",
    ),
]


def per_call_us(fn: Callable[[int], object], batch: int, repeat: int) -> float:
    """Median over ``repeat`` batches of the per-call time of ``fn(i)``, in µs."""
    samples = []
    counter = 0
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(batch):
            counter += 1
            fn(counter)
        samples.append((time.perf_counter() - start) / batch * 1e6)
    return statistics.median(samples)


def measure_one(catalog: Catalog, name: str, template: str, repeat: int) -> dict[str, object]:
    texts = [template.format(n=i) for i in range(2000)]

    def text(i: int) -> str:
        return texts[i % len(texts)]

    sensitivity = analyze_full(text(0), catalog).sensitivity
    analyze(text(0), catalog)  # warm the view-definition memo (steady state)
    miss = per_call_us(lambda i: analyze(text(i), catalog), 50, repeat)
    cache = AnalysisCache()
    cache.analyze_cached(text(0), catalog)
    hit = per_call_us(lambda i: cache.analyze_cached(text(i), catalog), 500, repeat)
    fp = per_call_us(lambda i: fingerprint(text(i)), 500, repeat)
    scan = per_call_us(lambda i: signature(text(i), 1), 500, repeat)
    assert cache.misses == 1, cache.stats()
    return {
        "statement": name,
        "miss_us": round(miss, 1),
        "hit_us": round(hit, 1),
        "fingerprint_us": round(fp, 1),
        "signature_us": round(scan, 1),
        "hit_path": "fingerprint + signature" if sensitivity else "fingerprint",
    }


def measure(catalog: Catalog, repeat: int) -> list[dict[str, object]]:
    return [measure_one(catalog, name, template, repeat) for name, template in STATEMENTS]


def print_table(rows: list[dict[str, object]]) -> None:
    header = f"{'statement':<18} {'miss µs':>9} {'hit µs':>8} {'fp µs':>7} {'scan µs':>8}  hit path"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['statement']!s:<18} {row['miss_us']!s:>9} {row['hit_us']!s:>8} "
            f"{row['fingerprint_us']!s:>7} {row['signature_us']!s:>8}  {row['hit_path']}"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=15, help="batches per measurement")
    parser.add_argument("--dsn", help="use this database instead of a private cluster")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cluster: PostgresCluster | None = None
    try:
        if args.dsn:
            dsn = args.dsn
        else:
            cluster = PostgresCluster()
            cluster.start()
            cluster.psql(SCHEMA)
            dsn = cluster.dsn(user="app_user")
        start = time.perf_counter()
        catalog = load_catalog(dsn)
        load_ms = (time.perf_counter() - start) * 1e3
        print(f"catalog: {catalog!r} loaded in {load_ms:.0f} ms", file=sys.stderr)
        rows = measure(catalog, args.repeat)
    finally:
        if cluster is not None:
            cluster.cleanup()
    if args.json:
        print(json.dumps({"catalog_load_ms": round(load_ms), "statements": rows}, indent=2))
    else:
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
