"""Statement analysis for audit records: what one SQL statement touches.

Pure functions (no I/O) over pglast (libpg_query, the PostgreSQL parser itself).
They run off the event loop, in a worker pool, behind
:class:`scalple.analysis.cache.AnalysisCache`.

Splitting
    :func:`split_statements` cuts a simple-protocol Query string into the
    statements the server executes, one per CommandComplete: empty statements
    (``;;``) produce nothing, a string of only whitespace/comments produces
    ``[]`` (the server answers EmptyQueryResponse), and a syntax error anywhere
    yields ``[sql]`` (the server rejects the whole string with one error before
    running anything).

Classes (``statement_class``), following pgAudit (``GetCommandLogLevel`` +
``log_audit_event``):

=========  ================================================================
READ       SELECT, COPY ... TO, DECLARE CURSOR, PREPARE of a SELECT
WRITE      INSERT, UPDATE, DELETE, MERGE, TRUNCATE, COPY ... FROM
FUNCTION   DO blocks
ROLE       GRANT/REVOKE (also on tables), CREATE/ALTER/DROP ROLE, GRANT ROLE,
           ALTER DEFAULT PRIVILEGES, ALTER ROLE ... SET, user mappings
DDL        all other DDL, including CREATE TABLE AS / SELECT INTO
MISC       everything else: SET, BEGIN/COMMIT, FETCH, VACUUM, CHECKPOINT,
           DISCARD, EXECUTE, LOCK, plain EXPLAIN ...
=========  ================================================================

Where this deliberately departs from pgAudit's primary class (pgAudit logs the
other class too, as a separate sub-statement line):

* a SELECT that touches no relation but calls a user-defined function
  (``select f(1)``) is FUNCTION (pgAudit: READ plus a FUNCTION line), because
  the function body is what does the work; ``CALL`` is FUNCTION (pgAudit: MISC
  plus FUNCTION);
* a SELECT with a data-modifying CTE (``WITH d AS (DELETE ...) SELECT``) is
  WRITE (pgAudit: READ, with the write only visible in object logging);
* ``EXPLAIN ANALYZE <stmt>`` has the class of ``<stmt>``, because it executes
  it (pgAudit: MISC for a SELECT, plus the executor's READ line).  Plain
  ``EXPLAIN`` is MISC; its tables and columns are still reported, with a note
  that nothing was executed, so auditors can see what was probed.

``command`` is PostgreSQL's ``CreateCommandTag()`` for the raw statement (what
pgAudit logs); it equals the CommandComplete tag except ``SELECT INTO``,
``CREATE TABLE AS`` and ``CREATE MATERIALIZED VIEW``, which complete as
``SELECT n``, and ``EXECUTE``, which completes with the prepared statement's tag.

Relations and columns
    ``affected_tables`` lists relations schema-qualified and quoted like
    ``regclass`` output (``public."Mixed Case"``): base tables, and for views the
    view *and* the relations its definition reads, recursively.  Partitioned
    tables are reported as named (partitions are not listed); a materialized view
    is a leaf (reading it reads its stored rows, not its sources).  System
    catalogs (``pg_catalog``, ``information_schema``) are reported like any
    relation, since auditors want to know about catalog reads.
    ``columns_accessed`` maps each relation to every column read or written: the
    select list, predicates, join conditions, grouping, ordering, DML target
    columns, SET/VALUES expressions, RETURNING, ON CONFLICT.  For a view: the view
    columns used, the base columns they come from, and the columns the view's own
    definition reads to produce rows (its joins and filters).  ``*`` is expanded
    from the catalog.  An INSERT without a column list writes every column.
    For DDL the relation is listed with the columns the statement names or
    defines.  A relation being created is named in the schema it will be
    created in (the first existing schema of the search path).

    Without a catalog nothing is guessed: names are reported as written,
    ``*`` and unattributable columns are listed in ``unresolved``.

``unresolved``
    Human-readable reasons something could not be fully resolved: unknown
    relations or columns, ``*`` without column knowledge, user-defined functions
    (their bodies are not analysed), dynamic SQL in DO blocks, EXECUTE of a
    prepared statement, unparsable statements.

Deliberate over-reporting (the cache keys on the fingerprint, which ignores
constants and output aliases, so results must not depend on them): ``ORDER BY 2``
counts every output column; a bare ``ORDER BY x`` that matches both an output
name and an input column counts both; an INSERT without a column list counts
every column of the target; a whole-row reference (``select c from t c``) counts
every column.

Not handled:

* bodies of functions, procedures, triggers, rules and row-level security
  policies, and what foreign keys, defaults or generated columns read as a side
  effect of DML; overloaded functions are named, not resolved by argument type;
* SQL built at run time (``EXECUTE`` in DO blocks, ``query_to_xml(text)``...),
  and ``EXECUTE`` of a prepared statement (its text is elsewhere);
* partitions and inheritance children are not listed under their parent;
* temporary tables are not in the snapshot (reported as written, with a note);
* ``search_path`` changes are followed only inside one :func:`analyze_query`
  call (``SET``/``RESET``), not via ``set_config()``; session state is the
  proxy's business (:meth:`Catalog.with_search_path`);
* the parser is libpg_query with PostgreSQL 18's grammar: newer syntax is
  analysed even though a 15 server rejects it, and
  ``standard_conforming_strings = off`` (backslash escapes in ``''``) is not
  supported.
"""

from __future__ import annotations

import hashlib
from typing import Final

import msgspec
from pglast import parser as pg_parser

from scalple.analysis._commands import command_tag, pgaudit_class
from scalple.analysis._errors import describe_parse_error
from scalple.analysis._resolver import FULL_TEXT, INSENSITIVE, Analyzer, parse_json
from scalple.analysis.catalog import Catalog

__all__ = [
    "STATEMENT_CLASSES",
    "StatementAnalysis",
    "analyze",
    "analyze_query",
    "fingerprint",
    "split_statements",
    "strip_comments",
]

STATEMENT_CLASSES: Final = ("READ", "WRITE", "DDL", "ROLE", "FUNCTION", "MISC")

_COMMENT_TOKENS: Final = frozenset({"C_COMMENT", "SQL_COMMENT"})
_CONSTANT_TOKENS: Final = frozenset(
    {"SCONST", "USCONST", "ICONST", "FCONST", "BCONST", "XCONST", "PARAM"}
)
_SEMICOLON: Final = "ASCII_59"


class StatementAnalysis(msgspec.Struct, frozen=True):
    """What the audit record says about one statement.

    Instances are shared between cache hits: treat the lists and dict as read-only.
    """

    command: str
    """Command tag word(s): ``SELECT``, ``INSERT``, ``CREATE TABLE``, ``GRANT``..."""
    statement_class: str
    """pgAudit class: READ, WRITE, DDL, ROLE, FUNCTION or MISC."""
    affected_tables: list[str]
    """Schema-qualified relations (views and their base tables), sorted."""
    columns_accessed: dict[str, list[str]]
    """Relation -> sorted column names read or written."""
    unresolved: list[str]
    """What could not be resolved, in the order it was found."""
    fingerprint: str
    """pglast fingerprint; ``unparsed:...`` when the statement does not parse."""


class _Result(msgspec.Struct, frozen=True):
    """An analysis plus what a cache needs to reuse it safely."""

    analysis: StatementAnalysis
    sensitivity: int
    search_path: str | None


# --------------------------------------------------------------------------- text


def split_statements(sql: str) -> list[str]:
    """Split a Query string into the statements PostgreSQL runs, in order.

    Element *i* pairs with the *i*-th CommandComplete (or the ErrorResponse that
    ends the string).  Each element is the statement's original text, trimmed,
    including comments before it (after the previous ``;``) and inside it;
    comments after the last ``;`` belong to no statement.  Uses the real parser,
    so ``;`` inside strings, dollar quotes, ``E''`` escapes, comments and
    ``BEGIN ATOMIC`` bodies does not split.
    """
    try:
        slices = pg_parser.split(sql, only_slices=True)
    except pg_parser.ParseError:
        return [sql] if sql.strip() else []
    result: list[str] = []
    previous_end = 0
    for piece in slices:
        start = piece.start
        gap = sql[previous_end:start]
        if "--" in gap or "/*" in gap:
            start = _start_after_semicolon(sql, previous_end, start)
        text = sql[start : piece.stop].strip()
        if text:
            result.append(text)
        previous_end = piece.stop
    return result


def _start_after_semicolon(sql: str, gap_start: int, gap_end: int) -> int:
    """Move a statement's start back over the comments that precede it.

    Between two statements there are only whitespace, ``;`` and comments; the
    comments after the last ``;`` introduce the next statement.
    """
    gap = sql[gap_start:gap_end]
    try:
        tokens = pg_parser.scan(gap)
    except pg_parser.ParseError:
        return gap_end
    start = gap_start
    for token in tokens:
        if token.name == _SEMICOLON:
            start = gap_start + token.end + 1
    return start


def strip_comments(sql: str) -> str:
    """``sql`` without ``--`` and ``/* */`` comments, found by PostgreSQL's scanner.

    A comment is replaced by one space where it separated two tokens, so
    ``select/**/1`` stays valid, and leaves no double blank behind; text inside
    literals (``'/* no */'``) is kept.
    If the text cannot be scanned (unterminated quote or comment) it is returned
    unchanged, only trimmed.
    """
    try:
        tokens = pg_parser.scan(sql)
    except pg_parser.ParseError:
        return sql.strip()
    pieces: list[str] = []
    last = ""
    position = 0
    for token in tokens:
        if token.name not in _COMMENT_TOKENS:
            continue
        chunk = sql[position : token.start]
        if chunk:
            pieces.append(chunk)
            last = chunk[-1]
        position = token.end + 1
        following = sql[position : position + 1]
        if last and not last.isspace() and following and not following.isspace():
            pieces.append(" ")
            last = " "
        elif last.isspace():
            while sql[position : position + 1] in (" ", "\t"):
                position += 1  # no double blank where the comment was
    pieces.append(sql[position:])
    return "".join(pieces).strip()


def fingerprint(sql: str) -> str:
    """pglast's fingerprint: equal for statements differing only in constants,
    comments, whitespace, select-list aliases and a few names.

    Text that does not parse gets ``unparsed:`` plus a hash of its comment-free,
    whitespace-normalised text, so repeated identical errors still group.
    """
    try:
        return str(pg_parser.fingerprint(sql))
    except pg_parser.ParseError:
        normalized = " ".join(strip_comments(sql).split())
        digest = hashlib.blake2b(normalized.encode(), digest_size=8).hexdigest()
        return f"unparsed:{digest}"


def signature(sql: str, sensitivity: int) -> str:
    """What must match, besides the fingerprint, to reuse an analysis.

    The fingerprint ignores things the analysis depends on for some statements
    (aliases, select output names, digit runs in relation names, DO bodies); for
    those the cache also compares this: a hash of the statement's tokens without
    comments, and without constants unless ``sensitivity`` is FULL_TEXT.
    """
    if sensitivity <= INSENSITIVE:
        return ""
    keep_constants = sensitivity >= FULL_TEXT
    digest = hashlib.blake2b(digest_size=16)
    try:
        tokens = pg_parser.scan(sql)
    except pg_parser.ParseError:
        digest.update(" ".join(sql.split()).encode())
        return digest.hexdigest()
    for token in tokens:
        name = token.name
        if name in _COMMENT_TOKENS or (not keep_constants and name in _CONSTANT_TOKENS):
            continue
        digest.update(sql[token.start : token.end + 1].encode())
        digest.update(b"\x1f")
    return digest.hexdigest()


# --------------------------------------------------------------------------- analysis


def analyze(sql: str, catalog: Catalog | None = None) -> StatementAnalysis:
    """Analyse ONE statement (split first with :func:`split_statements`)."""
    return analyze_full(sql, catalog).analysis


def analyze_full(sql: str, catalog: Catalog | None, fp: str | None = None) -> _Result:
    """:func:`analyze` plus cache metadata (used by the cache)."""
    fp = fingerprint(sql) if fp is None else fp
    try:
        statements = parse_json(sql)
    except pg_parser.ParseError as exc:
        words = strip_comments(sql).split(None, 1)
        return _Result(
            StatementAnalysis(
                command=words[0].upper() if words else "",
                statement_class="MISC",
                affected_tables=[],
                columns_accessed={},
                unresolved=[f"statement could not be parsed: {describe_parse_error(exc)}"],
                fingerprint=fp,
            ),
            FULL_TEXT,
            None,
        )
    if not statements:
        return _Result(
            StatementAnalysis("", "MISC", [], {}, ["empty statement"], fp), INSENSITIVE, None
        )
    analyzer = Analyzer(catalog)
    node = statements[0]
    try:
        command, statement_class = analyzer.statement(node)
    except Exception as exc:  # a parse tree shape the analyser does not expect
        node_type, body = next(iter(node.items()))
        analyzer.note(f"internal error while analyzing: {type(exc).__name__}")
        command, statement_class = command_tag(node_type, body), pgaudit_class(node_type, body)
    if len(statements) > 1:
        analyzer.note(
            f"{len(statements)} statements given to analyze(); only the first was analyzed"
        )
    analyzer.finish()
    columns = {table: sorted(cols) for table, cols in sorted(analyzer.columns.items()) if cols}
    tables = set(analyzer.tables) | set(columns)
    return _Result(
        StatementAnalysis(
            command=command,
            statement_class=statement_class,
            affected_tables=sorted(tables),
            columns_accessed=columns,
            unresolved=list(analyzer.notes),
            fingerprint=fp,
        ),
        analyzer.sensitivity,
        analyzer.search_path_change,
    )


def analyze_query(sql: str, catalog: Catalog | None = None) -> list[StatementAnalysis]:
    """Split a simple-protocol Query string and analyse each statement.

    A ``SET search_path`` inside the string applies to the statements after it
    (the proxy's session state is its own business).
    """
    results: list[StatementAnalysis] = []
    current = catalog
    for statement in split_statements(sql):
        result = analyze_full(statement, current)
        results.append(result.analysis)
        current = apply_search_path(catalog, current, result.search_path)
    return results


def apply_search_path(
    original: Catalog | None, current: Catalog | None, change: str | None
) -> Catalog | None:
    """The catalog to use after a statement that may have set ``search_path``."""
    if original is None or current is None or change is None:
        return current
    if change == "":
        return original
    return original.with_search_path(change)
