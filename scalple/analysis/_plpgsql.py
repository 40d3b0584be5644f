"""Static SQL inside ``DO`` blocks.

A ``DO`` block is the one place where a client can run arbitrary table access in
a statement whose text the proxy sees, so its static SQL is analysed: the body
is parsed with libpg_query's PL/pgSQL parser (wrapped in a throw-away
``CREATE FUNCTION``), every embedded SQL statement and expression is analysed
like a top-level statement, and names declared as PL/pgSQL variables are not
mistaken for columns.  SQL built at run time (``EXECUTE``, ``FOR ... IN
EXECUTE``, ``RETURN QUERY EXECUTE``, ``OPEN ... FOR EXECUTE``) cannot be known
and is reported as unresolved.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import orjson
from pglast import parser as pg_parser

from scalple.analysis._errors import describe_parse_error

if TYPE_CHECKING:
    from scalple.analysis._resolver import Analyzer, Node

__all__ = ["analyze_do_block"]

# (statement type, field) pairs holding SQL text built at run time.
_DYNAMIC: Final = frozenset(
    {
        ("PLpgSQL_stmt_dynexecute", "query"),
        ("PLpgSQL_stmt_dynfors", "query"),
        ("PLpgSQL_stmt_return_query", "dynquery"),
        ("PLpgSQL_stmt_open", "dynquery"),
    }
)

# PLpgSQL_expr.parseMode values (RawParseMode in PostgreSQL).
_MODE_DEFAULT: Final = 0
_MODE_EXPR: Final = 2


def _dollar_quote(body: str) -> str:
    tag = "$__scalple_do$"
    n = 0
    while tag in body:
        n += 1
        tag = f"$__scalple_do{n}$"
    return f"{tag}{body}{tag}"


def analyze_do_block(analyzer: Analyzer, body: Node) -> None:
    """Record what the static SQL of a ``DO`` block touches into ``analyzer``."""
    code: str | None = None
    language = "plpgsql"
    for arg in body.get("args") or ():
        elem = arg.get("DefElem", {})
        value = elem.get("arg", {}).get("String", {}).get("sval")
        if elem.get("defname") == "as" and value is not None:
            code = str(value)
        elif elem.get("defname") == "language" and value is not None:
            language = str(value).lower()
    if code is None:
        return
    if language != "plpgsql":
        analyzer.note(f"DO block in language {language} not analyzed")
        return
    source = (
        "CREATE FUNCTION pg_temp.scalple_do() RETURNS void LANGUAGE plpgsql AS "
        + _dollar_quote(code)
    )
    try:
        tree = orjson.loads(pg_parser.parse_plpgsql_json(source))
    except (pg_parser.ParseError, orjson.JSONDecodeError) as exc:
        analyzer.note(f"DO block could not be parsed: {describe_parse_error(exc)}")
        return
    variables: set[str] = set()
    _collect_variables(tree, variables)
    exprs: list[tuple[dict[str, Any], bool]] = []
    _collect_exprs(tree, None, exprs)
    inner = _sub_analyzer(analyzer, frozenset(variables))
    for expr, dynamic in exprs:
        if dynamic:
            analyzer.note("dynamic SQL in DO block not analyzed")
        _analyze_expr(inner, expr)
    for table in inner.tables:
        analyzer.add_table(table)
    for table, cols in inner.columns.items():
        analyzer.touch_columns(table, cols)
    for text in inner.notes:
        analyzer.note(text)
    analyzer.user_calls += inner.user_calls


def _sub_analyzer(analyzer: Analyzer, variables: frozenset[str]) -> Analyzer:
    from scalple.analysis._resolver import Analyzer

    return Analyzer(analyzer.catalog, variables=variables, view_stack=analyzer.view_stack)


def _collect_variables(node: Any, out: set[str]) -> None:
    if isinstance(node, list):
        for item in node:
            _collect_variables(item, out)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in ("PLpgSQL_var", "PLpgSQL_rec", "PLpgSQL_row") and isinstance(value, dict):
            name = value.get("refname")
            if isinstance(name, str) and not name.startswith("("):
                out.add(name)
        _collect_variables(value, out)


def _collect_exprs(
    node: Any, parent: tuple[str, str] | None, out: list[tuple[dict[str, Any], bool]]
) -> None:
    """Every PLpgSQL_expr in the tree, with whether it is run-time SQL text."""
    if isinstance(node, list):
        for item in node:
            _collect_exprs(item, parent, out)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key == "PLpgSQL_expr" and isinstance(value, dict):
            out.append((value, parent in _DYNAMIC))
            continue
        if key.startswith("PLpgSQL_stmt_") and isinstance(value, dict):
            for field, child in value.items():
                _collect_exprs(child, (key, field), out)
            continue
        _collect_exprs(value, parent, out)


def _analyze_expr(analyzer: Analyzer, expr: dict[str, Any]) -> None:
    from scalple.analysis._resolver import parse_json

    query = str(expr.get("query", ""))
    mode = int(expr.get("parseMode", _MODE_DEFAULT))
    if mode == _MODE_DEFAULT:
        text = query
    elif mode == _MODE_EXPR:
        text = "SELECT " + query
    else:
        # Assignment "target := expression" (or "target = expression").
        text = "SELECT " + _assignment_source(query)
    try:
        statements = parse_json(text)
    except pg_parser.ParseError:
        analyzer.note("a statement in the DO block could not be parsed")
        return
    for statement in statements:
        analyzer.statement(statement)


def _assignment_source(query: str) -> str:
    try:
        tokens = pg_parser.scan(query)
    except pg_parser.ParseError:
        return query
    for token in tokens:
        if token.name in ("COLON_EQUALS", "ASCII_61"):
            return query[token.end + 1 :]
    return query
