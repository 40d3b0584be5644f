#!/usr/bin/env python3
"""What finding the literals of a statement costs, per statement.

Every audited statement with PII masking on goes through
:func:`scalple._wire.scan_literals` once, so its cost is paid per query on the
audit path.  The comparison is the obvious alternative: PostgreSQL's own
scanner through ``pglast.parser.scan``, keeping the literal tokens.  pglast
takes a ``str`` (the proxy holds bytes), so its figure does not even include
the decode it would need; ours takes the bytes as they come off the wire.

Usage::

    python benchmarks/lexer_cost.py [--repeat N] [--json]

Figures are the median of ``--repeat`` timed batches, in microseconds per
statement.  Nothing is asserted: this is for reading, not for CI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial

from pglast import parser as pg

from scalple._wire import scan_literals

_LITERAL_TOKENS = frozenset({"SCONST", "USCONST", "BCONST", "XCONST", "ICONST", "FCONST"})


def _short() -> str:
    """About 60 characters, two literals: a point lookup."""
    return "SELECT id, name FROM customers WHERE id = 42 AND city = 'Oslo'"


def _medium() -> str:
    """About 300 characters with ten literals of several forms."""
    return (
        "INSERT INTO customers (name, email, phone, birth, score, note, tags, active, "
        "balance, code) VALUES ('Zoë Ünal', 'zoe.unal@example.com', '+33612345678', "
        "DATE '1990-04-01', 87, E'first line\\nsecond', '{vip,eu}', true, 1250.75, X'1F', "
        "$$free 'text'$$) /* app=crm, route=signup */ RETURNING id, created_at"
    )


def _long() -> str:
    """About 4 KB: a batch of multi-row inserts with comments, as ORMs send."""
    row = "({n}, 'customer {n}', 'user{n}@example.org', {n}.5, '2024-01-{d:02d}')"
    parts = ["-- nightly import\nINSERT INTO staging (id, name, email, amount, day) VALUES "]
    n = 0
    while sum(len(p) for p in parts) < 4000:
        n += 1
        parts.append(("," if n > 1 else "") + row.format(n=n, d=n % 28 + 1))
    return "".join(parts)


QUERIES = {"short": _short(), "medium": _medium(), "long": _long()}


def per_call_us(fn: Callable[[], object], batch: int, repeat: int) -> float:
    """Median over ``repeat`` batches of the per-call time of ``fn()``, in µs."""
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(batch):
            fn()
        samples.append((time.perf_counter() - start) / batch * 1e6)
    return statistics.median(samples)


def pglast_literals(text: str) -> list[tuple[int, int]]:
    """The same answer as scan_literals, from PostgreSQL's scanner (character offsets)."""
    return [(t.start, t.end + 1) for t in pg.scan(text) if t.name in _LITERAL_TOKENS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    results = []
    for name, text in QUERIES.items():
        data = text.encode()
        batch = max(200, 400_000 // len(data))
        ours = per_call_us(partial(scan_literals, data), batch, args.repeat)
        theirs = per_call_us(partial(pglast_literals, text), batch // 10, args.repeat)
        results.append(
            {
                "query": name,
                "bytes": len(data),
                "literals": len(scan_literals(data)),
                "scan_literals_us": round(ours, 3),
                "pglast_scan_us": round(theirs, 3),
                "ratio": round(theirs / ours, 1),
            }
        )

    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'query':8} {'bytes':>6} {'lits':>5} {'scan_literals':>14} {'pglast.scan':>12} ratio")
    for r in results:
        print(
            f"{r['query']:8} {r['bytes']:>6} {r['literals']:>5} "
            f"{r['scan_literals_us']:>11.2f} µs {r['pglast_scan_us']:>9.2f} µs {r['ratio']:>5}x"
        )


if __name__ == "__main__":
    main()
