"""The documentation stays true: the documented record is what is written,
and every configuration key is documented."""

from __future__ import annotations

import json
import re
from pathlib import Path

import msgspec

from scalple.config import Config
from scalple.records import StatementRecord

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_audit_record_example_has_the_written_fields_in_order() -> None:
    text = (DOCS / "audit-record.md").read_text()
    example = json.loads(re.search(r"```json\n(.*?)\n```", text, re.S).group(1))  # type: ignore[union-attr]
    assert list(example) == list(StatementRecord.__struct_fields__)


def test_documented_record_fields_are_the_promised_ones() -> None:
    promised = [
        "ts",
        "log_id",
        "seq",
        "session_user_id",
        "session_email",
        "identity_source",
        "identity_verified",
        "db_role",
        "database",
        "application_name",
        "client_addr",
        "session_id",
        "statement_id",
        "protocol",
        "statement_class",
        "command",
        "query",
        "query_fingerprint",
        "params",
        "affected_tables",
        "columns_accessed",
        "rows",
        "status",
        "sqlstate",
        "duration_us",
        "in_transaction",
    ]
    assert list(StatementRecord.__struct_fields__[: len(promised)]) == promised


def test_every_configuration_key_is_documented() -> None:
    text = (DOCS / "configuration.md").read_text()
    for table_name in Config.__struct_fields__:
        assert f"## `[{table_name}]`" in text, table_name
        table = getattr(Config(), table_name)
        if isinstance(table, dict):
            continue  # a table of the user's own keys (column names)
        for key in msgspec.structs.fields(table):
            assert f"| `{key.name}` |" in text, f"[{table_name}] {key.name}"
