"""``scalple demo`` (what ``make demo`` runs) attributes two people's queries
sent over PgBouncer transaction-mode connections."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_demo_attributes_two_people(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "scalple", "demo", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    statements = [r for r in records if r["kind"] == "statement"]
    by_person = {(r["session_user_id"], r["command"]) for r in statements}
    assert ("alice", "SELECT") in by_person and ("bob", "UPDATE") in by_person
    assert all(r["db_role"] == "app_user" for r in statements)
    assert "current_user='app_user', scalple.user_id=None" in result.stderr
    assert any((tmp_path / ".demo" / "log").rglob("*.seg"))
    assert "log intact:" in result.stderr
