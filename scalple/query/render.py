"""Human-readable rendering of records for the terminal (``log tail``, the demo)."""

from __future__ import annotations

import shutil
import sys
from typing import Any

__all__ = ["format_record", "header", "touched"]

_LAYOUT = (
    "{ts:<26} {person:<10} {session:<9} {cls:<5} {command:<7} {rows:>6} {status:<11} {touched:<30} "
)
_COLUMNS = (
    _LAYOUT.format(
        ts="time (UTC)",
        person="person",
        session="session",
        cls="class",
        command="command",
        rows="rows",
        status="status",
        touched="tables(columns)",
    )
    + "query"
)


def header() -> str:
    return _COLUMNS


def _width() -> int | None:
    """The terminal's width, or None when output goes to a pipe or file
    (then lines are never cut: another program is reading them)."""
    if not sys.stdout.isatty():
        return None
    return max(80, shutil.get_terminal_size((120, 24)).columns)


def touched(record: dict[str, Any]) -> str:
    """``customers(email,id)`` for each relation the statement touched."""
    columns = record.get("columns_accessed") or {}
    parts = [
        f"{table.removeprefix('public.')}({','.join(columns.get(table, []))})"
        for table in record.get("affected_tables") or []
    ]
    return " ".join(parts) or "-"


def format_record(record: dict[str, Any], width: int | None = None) -> str:
    """One line per record, cut to the terminal width."""
    width = width or _width()
    rows = record.get("rows")
    status = record.get("status", "?")
    if status != "ok":
        status = f"{status}:{record.get('sqlstate') or '-'}"
    query = " ".join((record.get("query") or "").split())
    if record.get("params"):
        query += "  -- params " + ", ".join(str(p) for p in record["params"])
    line = _LAYOUT.format(
        ts=record.get("ts", "")[:26],
        person=(record.get("session_user_id") or "-")[:10],
        session=str(record.get("session_id"))[:9],
        cls=(record.get("statement_class") or "-")[:5],
        command=(record.get("command") or "-")[:7],
        rows="" if rows is None else rows,
        status=status,
        touched=touched(record)[:30],
    )
    if width is None:
        return line + query
    room = max(10, width - len(line))
    return line + (query if len(query) <= room else query[: room - 1] + "…")
