"""Human-readable rendering of records for the terminal."""

from __future__ import annotations

import shutil
import sys
from typing import Any

__all__ = ["format_record", "header"]

_LAYOUT = "{ts:<26} {person:<12} {session:<10} {command:<8} {rows:>7} {status:<11} "
_COLUMNS = (
    _LAYOUT.format(
        ts="time (UTC)",
        person="person",
        session="session",
        command="command",
        rows="rows",
        status="status",
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


def format_record(record: dict[str, Any], width: int | None = None) -> str:
    """One line per record, cut to the terminal width."""
    width = width or _width()
    person = record.get("session_user_id") or "-"
    rows = record.get("rows")
    status = record.get("status", "?")
    if status != "ok":
        status = f"{status}:{record.get('sqlstate') or '-'}"
    query = " ".join((record.get("query") or "").split())
    line = _LAYOUT.format(
        ts=record.get("ts", "")[:26],
        person=person[:12],
        session=str(record.get("session_id"))[:10],
        command=(record.get("command") or "-")[:8],
        rows="" if rows is None else rows,
        status=status,
    )
    if width is None:
        return line + query
    room = max(10, width - len(line))
    return line + (query if len(query) <= room else query[: room - 1] + "…")
