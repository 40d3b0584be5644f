"""A bounded, thread-safe LRU of statement analyses.

The same statements arrive again and again with different constants and with
sqlcommenter comments that make every text unique, so the cache is keyed by the
statement's *fingerprint* (which ignores both) and the catalog version (so a new
snapshot after DDL invalidates everything analysed against the old one).  A hit
costs a fingerprint (a C call, microseconds) and a dict lookup.

The fingerprint also ignores a few things some analyses depend on: output names
of SELECT lists (which the user of a subquery or CTE refers to), aliases of
subqueries, joins and functions, which alias belongs to which table when several
aliased tables share one FROM list (the list is sorted), digit runs in relation
names (``orders_2023`` vs ``orders_2024``), and constants (DO block bodies,
``SET search_path`` values).  The analyser reports when a result depended on such
things; such an entry then holds variants keyed by a signature of the statement's
tokens (without comments, and without constants except for DO/SET), which costs a
scanner pass on a hit.  Single-table statements and joins of aliased tables, the
bulk of OLTP traffic, never pay that.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Final

from scalple.analysis.catalog import Catalog
from scalple.analysis.sql import (
    StatementAnalysis,
    analyze_full,
    apply_search_path,
    fingerprint,
    signature,
    split_statements,
)

__all__ = ["DEFAULT_MAXSIZE", "AnalysisCache"]

DEFAULT_MAXSIZE: Final = 10_000
_MAX_VARIANTS: Final = 64
_NO_CATALOG: Final = "no-catalog"


class _Entry:
    __slots__ = ("analysis", "search_path")

    def __init__(self, analysis: StatementAnalysis, search_path: str | None) -> None:
        self.analysis = analysis
        self.search_path = search_path


class _Variants:
    """Analyses of statements that share a fingerprint but may differ in results."""

    __slots__ = ("entries", "sensitivity")

    def __init__(self, sensitivity: int) -> None:
        self.sensitivity = sensitivity
        self.entries: OrderedDict[str, _Entry] = OrderedDict()


class AnalysisCache:
    """LRU of (fingerprint, catalog version) -> :class:`StatementAnalysis`.

    Safe to share between worker threads: lookups and inserts take a lock;
    analysis itself runs outside it, so two threads missing on the same statement
    may both analyse it (harmless, identical results).
    """

    def __init__(self, maxsize: int = DEFAULT_MAXSIZE) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        self._data: OrderedDict[tuple[str, str], _Entry | _Variants] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def analyze_cached(self, sql: str, catalog: Catalog | None = None) -> StatementAnalysis:
        """Analysis of one statement, from the cache when possible."""
        return self._lookup(sql, catalog).analysis

    def analyze_query(self, sql: str, catalog: Catalog | None = None) -> list[StatementAnalysis]:
        """Split a Query string and analyse each statement through the cache.

        ``SET search_path`` inside the string applies to the statements after it.
        """
        results: list[StatementAnalysis] = []
        current = catalog
        for statement in split_statements(sql):
            entry = self._lookup(statement, current)
            results.append(entry.analysis)
            current = apply_search_path(catalog, current, entry.search_path)
        return results

    def _lookup(self, sql: str, catalog: Catalog | None) -> _Entry:
        fp = fingerprint(sql)
        key = (fp, catalog.version if catalog is not None else _NO_CATALOG)
        sig: str | None = None
        slot_sensitivity = 0
        with self._lock:
            slot = self._data.get(key)
            if slot is not None:
                self._data.move_to_end(key)
                if isinstance(slot, _Entry):
                    self.hits += 1
                    return slot
        if isinstance(slot, _Variants):
            slot_sensitivity = slot.sensitivity
            sig = signature(sql, slot.sensitivity)
            with self._lock:
                entry = slot.entries.get(sig)
                if entry is not None:
                    slot.entries.move_to_end(sig)
                    self.hits += 1
                    return entry
        result = analyze_full(sql, catalog, fp)
        entry = _Entry(result.analysis, result.search_path)
        if result.sensitivity and (sig is None or slot_sensitivity != result.sensitivity):
            sig = signature(sql, result.sensitivity)
        with self._lock:
            self.misses += 1
            if not result.sensitivity:
                self._data[key] = entry
            else:
                variants = self._data.get(key)
                if not isinstance(variants, _Variants) or (
                    variants.sensitivity != result.sensitivity
                ):
                    variants = _Variants(result.sensitivity)
                    self._data[key] = variants
                assert sig is not None
                variants.entries[sig] = entry
                while len(variants.entries) > _MAX_VARIANTS:
                    variants.entries.popitem(last=False)
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)
        return entry

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._data), "hits": self.hits, "misses": self.misses}
