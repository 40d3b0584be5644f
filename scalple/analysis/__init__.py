"""Statement analysis for audit records: command, pgAudit class, relations and columns.

Runs off the event loop (worker threads), results cached by fingerprint; see
:mod:`scalple.analysis.sql` for the rules and :mod:`scalple.analysis.cache`.
"""

from scalple.analysis.cache import AnalysisCache
from scalple.analysis.catalog import Catalog, Function, Relation, load_catalog
from scalple.analysis.sql import (
    StatementAnalysis,
    analyze,
    analyze_query,
    fingerprint,
    split_statements,
    strip_comments,
)

__all__ = [
    "AnalysisCache",
    "Catalog",
    "Function",
    "Relation",
    "StatementAnalysis",
    "analyze",
    "analyze_query",
    "fingerprint",
    "load_catalog",
    "split_statements",
    "strip_comments",
]
