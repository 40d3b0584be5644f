"""Data subjects in result rows: which columns the relay reads, and what
the audit worker makes of the values.

The relay knows a result column only by RowDescription's table OID and
attribute number; the configuration names ``schema.table.column``.  The
worker, which has the catalog, turns one into the other per database and
sends the map to the proxy (``SubjectColumns``); the backend scanner then
copies those columns' values out of DataRows (``MessageScanner.
set_row_subjects``) and the worker turns them into tags here.  Kinds travel
as indexes into ``subject_kinds(config)``, the same list on both sides.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from scalple._wire import unpack_row_values
from scalple.analysis.catalog import Catalog, parse_identifier_list
from scalple.records import format_param

__all__ = ["SubjectColumns", "row_subject_columns", "row_subject_values", "subject_kinds"]

_TEXT_FORMAT = 0


class SubjectColumns(msgspec.Struct, array_like=True):
    """Worker to proxy: the subject columns of one database, as RowDescription names them."""

    database: str
    columns: dict[tuple[int, int], int]  # (table OID, attnum) -> kind index


def subject_kinds(subjects: Mapping[str, str]) -> list[str]:
    """The subject kinds in index order (both processes derive it alike)."""
    return sorted(set(subjects.values()))


def row_subject_columns(
    catalog: Catalog, subjects: Mapping[str, str]
) -> dict[tuple[int, int], int]:
    """(table OID, attnum) -> kind index for every configured subject column
    the catalog knows (a column it does not know is simply not read)."""
    kinds = {kind: index for index, kind in enumerate(subject_kinds(subjects))}
    relations = catalog.relations
    columns: dict[tuple[int, int], int] = {}
    for name, kind in subjects.items():
        parts = parse_identifier_list(name, ".")
        if len(parts) != 3:
            continue
        relation = relations.get((parts[0], parts[1]))
        if relation is None or not relation.oid or len(relation.attnums) != len(relation.columns):
            continue
        try:
            position = relation.columns.index(parts[2])
        except ValueError:
            continue
        columns[(relation.oid, relation.attnums[position])] = kinds[kind]
    return columns


def row_subject_values(packed: bytes, kinds: list[str]) -> list[tuple[str, str]]:
    """(kind, value as PostgreSQL prints it) for each value read from rows."""
    values: list[tuple[str, str]] = []
    for index, fmt, type_oid, raw in unpack_row_values(packed):
        if index >= len(kinds):
            continue
        if fmt == _TEXT_FORMAT:
            text = raw.decode("utf-8", "replace")
        else:
            text = format_param(bytearray(raw), type_oid) or ""
        values.append((kinds[index], text))
    return values
