"""``scalple demo``: the product in one minute on an empty machine.

Starts a private PostgreSQL 15 and a PgBouncer in transaction mode, puts
Scalple in front, runs a small workload as two different people sharing the
pool's one database role, and prints the audit log Scalple wrote.  Everything
runs in a temporary directory and is removed afterwards.
"""

from __future__ import annotations

import secrets
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

__all__ = ["run_demo"]

_SCHEMA = """
create table customers (id int primary key, name text, email text, city text);
create table orders (id serial primary key, customer_id int references customers, amount numeric);
insert into customers
  select i, 'Customer ' || i, 'customer' || i || '@example.com',
         (array['Lyon','Milan','Berlin'])[1 + i % 3]
  from generate_series(1, 200) i;
insert into orders (customer_id, amount)
  select 1 + i % 200, (i * 7) % 500 from generate_series(1, 1000) i;
grant select, insert, update, delete on customers, orders to app_user;
grant usage on sequence orders_id_seq to app_user;
"""


def _step(text: str) -> None:
    print(f"  {text}", file=sys.stderr, flush=True)


@contextmanager
def _timed(text: str) -> Iterator[None]:
    start = time.monotonic()
    print(f"  {text} ...", end="", file=sys.stderr, flush=True)
    yield
    print(f" done ({time.monotonic() - start:.1f}s)", file=sys.stderr, flush=True)


def _workload(dsn_for: Any) -> tuple[str, str | None]:
    """Two people, each on their own client connection, both through the same
    PgBouncer pool (transaction mode) and so the same database role."""
    import psycopg

    with (
        psycopg.connect(dsn_for("alice", "alice@support.example")) as alice,
        psycopg.connect(dsn_for("bob", "bob@billing.example")) as bob,
    ):
        alice.autocommit = True
        bob.autocommit = True
        alice.execute("select id, name, email from customers where id = %s", (42,)).fetchall()
        bob.execute("select sum(amount) from orders where customer_id = %s", (42,)).fetchall()
        alice.execute("select name, city from customers where city = 'Lyon' limit 5").fetchall()
        alice.execute(
            "select id, city from customers where email = 'customer7@example.com'"
        ).fetchall()
        with bob.transaction():
            bob.execute("insert into orders (customer_id, amount) values (%s, %s)", (42, 99))
            bob.execute("update customers set city = 'Turin' where id = %s", (42,))
        with (
            alice.cursor() as cur,
            cur.copy("copy (select id, city from customers) to stdout") as copy,
        ):
            for _ in copy:
                pass
        with suppress(psycopg.errors.UndefinedTable):
            alice.execute("select * from customer_secrets")
        # What PostgreSQL itself sees: the pool's role, never the person.
        row = alice.execute(
            "select current_user, current_setting('scalple.user_id', true)"
        ).fetchone()
        assert row is not None
        return row[0], row[1]


def _verify(log_dir: Path) -> str:
    """``scalple verify`` on the copy, in one line for the demo."""
    from scalple.store.keys import VerifierKey
    from scalple.store.verify import verify_log

    key = VerifierKey.load(log_dir / "keys" / "signing.pub")
    report = verify_log(log_dir, [key])[0]
    return (
        f"log intact: {report.records} records, {report.checkpoints} signed checkpoint(s) "
        f"match, root {report.root[:16]}"
    )


def run_demo(*, json_output: bool = False) -> int:
    from scalple.devcluster import PgBouncer, PostgresCluster
    from scalple.devproxy import ScalpleServer
    from scalple.query.render import format_record, header

    print(
        "Scalple demo: PostgreSQL 15 <- PgBouncer (transaction mode) <- Scalple <- two people",
        file=sys.stderr,
    )
    with ExitStack() as stack:
        with _timed("starting a private PostgreSQL 15"):
            pg = stack.enter_context(PostgresCluster(tls=False))
            pg.psql(_SCHEMA)
        with _timed("starting PgBouncer in transaction mode"):
            bouncer = stack.enter_context(
                PgBouncer(pg, pool_mode="transaction", default_pool_size=2)
            )
        with _timed("starting Scalple in front of PgBouncer"):
            # The catalog connection (for column analysis) logs in as the
            # pool's role; its password comes from a file, never the config.
            secret = pg.base_dir / "catalog-password"
            secret.write_text("app_pass\n")
            secret.chmod(0o600)
            # The key of pseudonyms and subject tags: a throw-away one here.
            key = pg.base_dir / "masking.key"
            key.write_bytes(secrets.token_hex(32).encode() + b"\n")
            key.chmod(0o600)
            proxy = stack.enter_context(
                ScalpleServer(
                    f"{bouncer.host}:{bouncer.port}",
                    config={
                        "catalog": {"password_file": str(secret)},
                        "masking": {"key_file": str(key)},
                        "pii": {
                            "public.customers.email": "email",
                            "public.customers.name": "pseudonym",
                        },
                        "subjects": {
                            "public.customers.id": "customer",
                            "public.orders.customer_id": "customer",
                        },
                    },
                )
            )
        _step(
            f"apps connect to Scalple at {proxy.host}:{proxy.port}"
            " with options=-c scalple.user_id=..."
        )

        def dsn_for(user_id: str, email: str) -> str:
            options = f"-c scalple.user_id={user_id} -c scalple.email={email}"
            return proxy.dsn(
                user="app_user",
                password="app_pass",
                dbname="app",
                options=options,
                application_name="crm",
            )

        with _timed("running the workload as alice and bob over pooled connections"):
            seen = _workload(dsn_for)
        _step(f"PostgreSQL itself saw current_user={seen[0]!r}, scalple.user_id={seen[1]!r}")
        with _timed("stopping Scalple (flushes the audit log)"):
            proxy.stop()
        records = proxy.records()
        kept = Path(".demo") / "log"
        shutil.rmtree(kept, ignore_errors=True)
        shutil.copytree(proxy.log_dir, kept)
        with _timed("verifying the log: every hash, root and checkpoint signature"):
            report = _verify(kept)
        _step(report)
        if json_output:
            import msgspec

            for record in proxy.records(kind=None):
                sys.stdout.buffer.write(msgspec.json.encode(record) + b"\n")
            sys.stdout.flush()
        else:
            print(f"\nAudit log ({len(records)} statements; a copy is in {kept}):\n")
            # Always at least 100 columns: the demo is read by people, even in a pipe.
            width = max(100, shutil.get_terminal_size((160, 24)).columns)
            print(header())
            for record in records:
                print(format_record(record, width))
            people = sorted({r["session_user_id"] for r in records if r["session_user_id"]})
            print("\nEvery statement above reached PostgreSQL as 'app_user' through a shared pool;")
            print(f"Scalple attributed each one to its person: {', '.join(people)}.")
            print(
                f"Check it yourself: scalple verify --log-dir {kept}; prove one record: "
                f"scalple prove {records[0]['log_id']} --log-dir {kept}"
            )
    return 0
