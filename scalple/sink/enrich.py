"""From what the relay saw to the audit record: split, analyse, attribute.

Runs on the writer's thread.  The relay hands over raw statement events
(bytes, monotonic times, the identity in force); here a multi-statement Query
is split so each record holds its own statement, the statement is analysed
through the fingerprint cache against the database's catalog snapshot, and
the record is assembled.  DDL that succeeded marks the catalog stale so the
next statement sees the new shape.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from typing import Final

from scalple.analysis.cache import AnalysisCache
from scalple.analysis.catalog import Catalog
from scalple.analysis.provider import CatalogProvider, CatalogSource
from scalple.analysis.sql import StatementAnalysis, split_statements
from scalple.config import Config, parse_address
from scalple.events import StatementEvent, monotonic_to_wall_ns
from scalple.logsafe import where
from scalple.masking.masks import Masker, key_from_file
from scalple.masking.rows import (
    SubjectColumns,
    row_subject_columns,
    row_subject_values,
    subject_kinds,
)
from scalple.masking.statement import StatementMasker, SubjectSet
from scalple.records import StatementRecord, rfc3339, statement_params

__all__ = ["REDACTED_TOKEN", "Enricher", "build_enricher", "redact_tokens"]

log = logging.getLogger(__name__)

_SPLIT_CACHE_SIZE: Final = 2048
_EXACT_CACHE_SIZE: Final = 4096
_FUNCTION_CALL: Final = StatementAnalysis(
    command="FUNCTION CALL",
    statement_class="FUNCTION",
    affected_tables=[],
    columns_accessed={},
    unresolved=["fast-path function call: the function's body is not analyzed"],
    fingerprint="function-call",
)


# A JWT (header.payload.signature, base64url; the header always starts with
# '{"' = "eyJ"). Tokens are credentials: they never reach the log.
_JWT: Final = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
REDACTED_TOKEN: Final = "[token redacted]"


def redact_tokens(text: str) -> str:
    """``text`` with every JWT-shaped string replaced."""
    return _JWT.sub(REDACTED_TOKEN, text) if "eyJ" in text else text


def _tag_command(tag: str) -> str:
    """``INSERT 0 5`` -> ``INSERT``; ``CREATE TABLE`` stays."""
    return " ".join(word for word in tag.split() if not word.isdigit())


class Enricher:
    """Builds statement records; owns the analysis cache and the catalogs."""

    def __init__(
        self,
        cache: AnalysisCache,
        catalogs: CatalogProvider | None,
        *,
        analyse: bool = True,
        masker: StatementMasker | None = None,
        subjects_limit: int = 1_000,
    ) -> None:
        self.cache = cache
        self.catalogs = catalogs
        self.analyse = analyse
        self.masker = masker or StatementMasker({}, {}, "none", None)
        self.subjects_limit = subjects_limit
        self._kinds = subject_kinds(self.masker.subjects)
        self._maps_sent: dict[str, str] = {}  # database -> catalog version of its map
        self.subject_maps: list[SubjectColumns] = []  # for the proxy, taken by the worker
        self._splits: OrderedDict[str, list[str]] = OrderedDict()
        self._exact: OrderedDict[tuple[str, str], StatementAnalysis] = OrderedDict()
        self.failures = 0

    def _statement_text(self, text: str, index: int) -> str:
        """Statement ``index`` of a simple Query string."""
        body = text.rstrip().rstrip(";")
        if index == 0 and ";" not in body:
            return text.strip()  # one statement: the common case, no scan
        parts = self._splits.get(text)
        if parts is None:
            parts = split_statements(text)
            self._splits[text] = parts
            if len(self._splits) > _SPLIT_CACHE_SIZE:
                self._splits.popitem(last=False)
        return parts[index] if index < len(parts) else text

    def _analyse(
        self, event: StatementEvent, text: str | None
    ) -> tuple[StatementAnalysis | None, list[str], Catalog | None]:
        if event.protocol == "function":
            return _FUNCTION_CALL, list(_FUNCTION_CALL.unresolved), None
        if text is None:
            return (
                None,
                ["statement text not seen by the proxy (prepared before it or elsewhere)"],
                None,
            )
        if not self.analyse:
            return None, ["analysis disabled ([analysis] enabled = false)"], None
        session = event.session
        notes: list[str] = []
        catalog = None
        if self.catalogs is not None:
            catalog, unavailable = self.catalogs.get(session.database, session.db_role)
            if unavailable:
                notes.append(unavailable)
            elif catalog is not None:
                self._map_subjects(session.database, catalog)
        try:
            analysis = self._analysis(text, catalog)
        except Exception as exc:  # analysis must never cost a record
            self.failures += 1
            log.error(
                "analysis failed (%s) for a statement of session %s", where(exc), session.session_id
            )
            return None, [*notes, f"analysis failed: {type(exc).__name__}"], catalog
        if (
            analysis.statement_class in ("DDL", "ROLE")
            and event.status == "ok"
            and self.catalogs is not None
        ):
            self.catalogs.invalidate(session.database)
        return analysis, [*notes, *analysis.unresolved], catalog

    def _map_subjects(self, database: str, catalog: Catalog) -> None:
        """Queue the subject-column map of ``database`` for the proxy when its
        catalog is new (first use, after DDL, on refresh)."""
        if not self._kinds or self._maps_sent.get(database) == catalog.version:
            return
        self._maps_sent[database] = catalog.version
        columns = row_subject_columns(catalog, self.masker.subjects)
        self.subject_maps.append(SubjectColumns(database, columns))

    def prefetch(self, database: str, role: str) -> None:
        """A session opened: load its catalog now, so the proxy has the
        subject-column map before the session's first result rows."""
        if self._kinds and self.catalogs is not None and self.analyse:
            catalog, _ = self.catalogs.get(database, role)
            if catalog is not None:
                self._map_subjects(database, catalog)

    def _analysis(self, text: str, catalog: Catalog | None) -> StatementAnalysis:
        """Exact text first (prepared statements repeat it byte for byte: no
        parse at all), then the fingerprint cache."""
        key = (text, catalog.version if catalog is not None else "")
        exact = self._exact
        analysis = exact.get(key)
        if analysis is not None:
            exact.move_to_end(key)
            return analysis
        analysis = self.cache.analyze_cached(text, catalog)
        exact[key] = analysis
        if len(exact) > _EXACT_CACHE_SIZE:
            exact.popitem(last=False)
        return analysis

    def record(self, event: StatementEvent) -> StatementRecord:
        """The full record: this statement's text, analysis and identity."""
        raw = event.query.decode("utf-8", "replace") if event.query is not None else None
        text = raw
        if raw is not None and event.protocol == "simple":
            text = self._statement_text(raw, event.query_index)
        analysis, notes, catalog = self._analyse(event, text)
        return self._build(event, text, analysis, notes, catalog)

    def bare_record(self, event: StatementEvent) -> StatementRecord:
        """A record without analysis, when building the full one failed:
        masking then assumes the worst (every constant and parameter)."""
        text = event.query.decode("utf-8", "replace") if event.query is not None else None
        return self._build(
            event, text, None, ["record written without analysis (internal error)"], None
        )

    def _build(
        self,
        event: StatementEvent,
        text: str | None,
        analysis: StatementAnalysis | None,
        notes: list[str],
        catalog: Catalog | None,
    ) -> StatementRecord:
        session = event.session
        identity = event.identity
        params = statement_params(event)
        subjects = SubjectSet(self.subjects_limit)
        masker = self.masker
        masked_fields: list[dict[str, str]] = []
        if masker.active:
            # Planned only with a catalog: without one, unqualified columns
            # cannot be told to be PII, and every constant is masked instead.
            masked = masker.apply(
                text,
                params,
                catalog=catalog,
                planned=analysis is not None and catalog is not None,
                subjects=subjects,
                escape_strings=event.escape_strings,
            )
            text, params, masked_fields = masked.query, masked.params, masked.masked_fields
            notes = notes + [note for note in masked.notes if note not in notes]
        if event.row_values and masker.masker is not None:
            make_tag = masker.masker.subject_tag
            tags: dict[tuple[str, str], str] = {}  # a subject repeats across rows
            for pair in row_subject_values(event.row_values, self._kinds):
                if pair not in tags:
                    tags[pair] = make_tag(*pair)
                    subjects.add(tags[pair], pair[0])
            if event.row_values_truncated:
                subjects.truncated = True  # rows past the bound were not read
        if text is not None:
            text = redact_tokens(text)
        if params:
            params = [redact_tokens(p) if p is not None else None for p in params]
        tag = event.tag.decode("ascii", "replace") if event.tag is not None else None
        command = _tag_command(tag) if tag else (analysis.command if analysis else None)
        return StatementRecord(
            ts=rfc3339(monotonic_to_wall_ns(event.started_ns)),
            session_user_id=identity.user_id,
            session_email=identity.email,
            identity_source=identity.source,
            identity_verified=identity.verified,
            db_role=session.db_role,
            database=session.database,
            application_name=session.application_name,
            client_addr=session.client_addr,
            session_id=session.session_id,
            statement_id=event.statement_id,
            protocol=event.protocol,
            statement_class=analysis.statement_class if analysis else None,
            command=command,
            query=text,
            query_fingerprint=analysis.fingerprint if analysis else None,
            params=params,
            affected_tables=list(analysis.affected_tables) if analysis else [],
            columns_accessed=dict(analysis.columns_accessed) if analysis else {},
            rows=event.rows,
            status=event.status,
            sqlstate=event.sqlstate,
            duration_us=max(0, (event.ended_ns - event.started_ns) // 1000),
            in_transaction=event.in_transaction,
            tag=tag,
            query_truncated=event.query_truncated,
            identity_problem=identity.problem,
            analysis_notes=notes,
            masked_fields=masked_fields,
            subjects=list(subjects.tags),
            subject_kinds=sorted(subjects.kinds),
            subjects_count=subjects.count,
            subjects_truncated=subjects.truncated,
        )


def build_enricher(config: Config) -> Enricher:
    """Analysis cache and catalog access as the configuration says."""
    catalogs = None
    if config.catalog.enabled and config.analysis.enabled:
        host, port = parse_address(config.upstream.address, key="upstream.address")
        up = config.upstream
        source = CatalogSource(
            host=host,
            port=port,
            dsn=config.catalog.dsn,
            password_file=config.catalog.password_file,
            sslmode={"disable": "disable", "require": "require", "verify-full": "verify-full"}[
                up.tls
            ],
            sslrootcert=up.tls_ca_file,
        )
        catalogs = CatalogProvider(source, refresh_interval=config.catalog.refresh_interval)
    keyed = None
    if config.masking.key_file is not None:
        keyed = Masker(key_from_file(config.masking.key_file))
    masker = StatementMasker(config.pii, config.subjects, config.log.literals, keyed)
    return Enricher(
        AnalysisCache(config.analysis.cache_size),
        catalogs,
        analyse=config.analysis.enabled,
        masker=masker,
        subjects_limit=config.masking.subjects_limit,
    )
