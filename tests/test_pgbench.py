"""pgbench, the capacity-test tool our users run, through both routes, with
every transaction's statements accounted for in the audit log."""

from __future__ import annotations

import os
import re
import subprocess
from typing import Any

import pytest

from scalple.devcluster import PostgresCluster
from tests.conftest import Route, init_pgbench


@pytest.fixture(scope="module")
def pgbench_db(pg: PostgresCluster) -> str:
    return init_pgbench(pg, "bench")


@pytest.mark.parametrize("mode", ["simple", "extended"])
def test_pgbench_select_only(route: Route, pgbench_db: str, mode: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {
        "PGPASSWORD": "app_pass",
        "PGOPTIONS": "-c scalple.user_id=bench-runner",
    }
    before = len(route.proxy.records())
    result = subprocess.run(
        [
            str(route.pg.bindir / "pgbench"),
            "-n",
            "-S",
            "-c",
            "4",
            "-j",
            "2",
            "-t",
            "200",
            "-M",
            mode,
            "-h",
            route.proxy.host,
            "-p",
            str(route.proxy.port),
            "-U",
            "app_user",
            pgbench_db,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"number of transactions actually processed: 800/800", result.stdout)

    def bench_selects(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            r
            for r in records[before:]
            if r["database"] == "bench"
            and "from pgbench_accounts where aid" in (r["query"] or "").lower()
        ]

    selects = bench_selects(route.proxy.wait_for_records(lambda rs: len(bench_selects(rs)) >= 800))
    assert len(selects) == 800
    assert all(r["session_user_id"] == "bench-runner" and r["rows"] == 1 for r in selects)
    assert {r["protocol"] for r in selects} == {"simple" if mode == "simple" else "extended"}
