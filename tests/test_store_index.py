"""Per-segment postings: person, table and data-subject tag, as sealed.

The subject tags are what a DPO's search for one person's accesses will
open; they must be in the segment's postings exactly where the records are."""

from __future__ import annotations

import time
from pathlib import Path

from scalple.config import LogConfig
from scalple.records import StatementRecord, rfc3339
from scalple.store import layout
from scalple.store.index import read_index
from scalple.store.keys import SigningKey
from scalple.store.verify import verify_log
from scalple.store.writer import StoreWriter


def _record(user: str | None, tables: list[str], subjects: list[str]) -> StatementRecord:
    return StatementRecord(
        ts=rfc3339(time.time_ns()),
        session_user_id=user,
        session_email=None,
        identity_source="startup" if user else "none",
        identity_verified=False,
        db_role="app_user",
        database="app",
        application_name="crm",
        client_addr="127.0.0.1:5000",
        session_id="s-1",
        statement_id=1,
        protocol="simple",
        statement_class="READ",
        command="SELECT",
        query="select 1",
        query_fingerprint="f",
        params=None,
        affected_tables=tables,
        columns_accessed={},
        rows=1,
        status="ok",
        sqlstate=None,
        duration_us=10,
        in_transaction=False,
        subjects=subjects,
        subject_kinds=["customer"] if subjects else [],
        subjects_count=len(subjects),
    )


def test_sealed_postings_by_person_table_and_subject(tmp_path: Path) -> None:
    key = SigningKey.generate("test")
    config = LogConfig(dir=str(tmp_path / "log"), origin="test/index")
    writer = StoreWriter(config, key)
    writer.append(
        [
            _record("ana", ["public.users"], ["sub_a", "sub_b"]),
            _record("bob", ["public.orders"], []),
            _record("ana", ["public.users", "public.orders"], ["sub_b"]),
            _record(None, [], ["sub_c"]),
        ]
    )
    writer.seal()
    writer.close()
    index = read_index(layout.index_path(layout.origin_dir(tmp_path / "log", "test/index"), 1))
    assert index.users == {"ana": [0, 2], "bob": [1]}
    assert index.tables == {"public.users": [0, 2], "public.orders": [1, 2]}
    assert index.subjects == {"sub_a": [0], "sub_b": [0, 2], "sub_c": [3]}
    assert verify_log(tmp_path / "log", [key.verifier()])[0].records == 4
