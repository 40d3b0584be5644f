"""Identity set with SQL: ``SET``, ``SET LOCAL``, ``RESET``, ``DISCARD ALL``
and ``set_config('scalple.x', value, is_local)``.

:func:`identity_changes` reads a query string (possibly several statements)
and says which ``scalple.*`` settings each statement changes, so that
:class:`~scalple.identity.state.IdentityState` can replay them once the
server confirms the statement ran.  It never talks to the server: what it
cannot see as a constant (an expression, a function, a bind parameter the
caller did not pass) is reported as ``dynamic`` rather than guessed.

Statements are split and numbered by PostgreSQL's own parser (pglast's
``parse_sql_json``), so the index of a change is the position of its
CommandComplete in a multi-statement simple Query: empty statements
(``;;``) do not count, a ``;`` inside a function body does not split.

Cost contract: the function is called for every successful statement, so it
first checks, case-insensitively, whether ``scalple.``, ``reset``,
``discard`` or ``set_config`` occur at all, and returns ``[]`` without
parsing otherwise (about 0.3 us for a 300-character SELECT).  When the only
hint is ``scalple.`` and every occurrence is inside a comment (the
sqlcommenter case), the comment lexer says so and nothing is parsed either.
The parse of a text that passes (about 3 us for a SET) is cached by text:
prepared statements and ORMs repeat the same text.

Limits: a ``set_config`` hidden in a function body, a ``DO`` block or an
``EXECUTE`` of a prepared statement is invisible here; ``SET`` inside
``ALTER ROLE``/``ALTER DATABASE`` does not change the running session and is
ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any, Literal

import msgspec
from pglast import parser as pg_parser

from scalple.identity.comment import mentioned_outside_comments

__all__ = ["IdentityChange", "ParamValue", "Scope", "changes_of_statement", "identity_changes"]

PREFIX = "scalple."

Scope = Literal["local", "session"]
ParamValue = bytes | bytearray | str | None
"""A bind parameter as the tracker captures it: ``bytes`` in text format,
``bytearray`` in binary format, ``str`` already decoded, None for NULL."""


class IdentityChange(msgspec.Struct, frozen=True, gc=False):
    """One change to a ``scalple.*`` setting made by one statement.

    Attributes
    ----------
    index: 0-based position of the statement in the query string, in the
        order PostgreSQL executes (and answers) them.
    key: the setting without its ``scalple.`` prefix, lower-cased
        (``user_id``, ``email``, ``token``, or any other name); None for
        ``reset_all`` and for a ``set_config`` whose name is not a constant.
    value: the new value; None when the setting goes back to its default
        (``RESET``, ``SET ... TO DEFAULT``, ``set_config(name, NULL, ...)``),
        and when ``dynamic``.
    scope: ``local`` (until the transaction ends) or ``session``.
    reset_all: ``RESET ALL`` or ``DISCARD ALL``: every setting back to default.
    dynamic: the statement changed the setting to something not written as
        a constant (an expression, a sub-query, an unknown parameter): the
        value is unknown and must be recorded as "set dynamically, not
        captured" rather than guessed.
    """

    index: int
    key: str | None
    value: str | None
    scope: Scope
    reset_all: bool = False
    dynamic: bool = False


# --- templates: the parse of a query text, before bind parameters -----------


class _Param(msgspec.Struct, frozen=True, gc=False):
    """``$n`` in a ``set_config`` call, resolved per execution."""

    number: int


class _Dynamic(msgspec.Struct, frozen=True, gc=False):
    """An argument that is not a constant (nor a parameter)."""


_DYNAMIC = _Dynamic()

_Arg = str | bool | None | _Param | _Dynamic


class _SetConfig(msgspec.Struct, frozen=True, gc=False):
    index: int
    name: _Arg
    value: _Arg
    is_local: _Arg


_Template = IdentityChange | _SetConfig

# Statement types whose expressions run when the statement runs.  A
# set_config inside CREATE VIEW, PREPARE or DECLARE CURSOR does not run then.
_EXECUTING = frozenset(
    {"SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt", "CallStmt"}
)

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _parse_bool(text: str) -> bool | None:
    """PostgreSQL's ``parse_bool``: a unique prefix of true/false/yes/no,
    ``on``/``off``, ``1``/``0``; None when it is none of them."""
    t = text.strip().lower()
    if not t:
        return None
    if t in ("on", "1"):
        return True
    if t in ("off", "of", "0"):
        return False
    if t == "o":
        return None
    if any(word.startswith(t) for word in _TRUE):
        return True
    if any(word.startswith(t) for word in _FALSE):
        return False
    return None


def _const(node: dict[str, Any]) -> str | bool | _Dynamic | None:
    """The value of an ``A_Const`` node as text (booleans as bool); NULL is None.

    Defaults are omitted in the parser's JSON (``{"ival": {}}`` is 0,
    ``{"boolval": {}}`` is false, ``{"sval": {}}`` is the empty string).
    """
    if node.get("isnull"):
        return None
    if "sval" in node:
        return str(node["sval"].get("sval", ""))
    if "ival" in node:
        return str(int(node["ival"].get("ival", 0)))
    if "fval" in node:
        return str(node["fval"].get("fval", "0"))
    if "boolval" in node:
        return bool(node["boolval"].get("boolval", False))
    return _DYNAMIC  # bit strings and whatever the future brings


def _arg(node: Any) -> _Arg:
    """A ``set_config`` argument: a constant, ``$n``, or dynamic.

    A cast of a constant or parameter (``'42'::text``, ``$1::text``) is
    looked through: it does not change which setting is meant.
    """
    if not isinstance(node, dict) or len(node) != 1:
        return _DYNAMIC
    ((kind, body),) = node.items()
    if kind == "A_Const":
        return _const(body)
    if kind == "ParamRef":
        return _Param(int(body.get("number", 0)))
    if kind == "TypeCast":
        return _arg(body.get("arg"))
    return _DYNAMIC


def _set_value(args: list[Any]) -> str | None:
    """The text PostgreSQL stores for ``SET name = args`` on a custom setting.

    Numbers keep the spelling they were written in; an unquoted word was
    already folded to lower case by the parser.  (A list is an error for a
    custom setting, so such a statement never succeeds; joined anyway.)
    """
    parts: list[str] = []
    for node in args:
        value = _arg(node)
        if isinstance(value, bool):
            parts.append("on" if value else "off")
        elif isinstance(value, str):
            parts.append(value)
    return ", ".join(parts) if parts else None


def _walk_calls(node: Any, out: list[dict[str, Any]]) -> None:
    """Collect every ``set_config`` call in a parse tree, in tree order."""
    if isinstance(node, dict):
        call = node.get("FuncCall")
        if isinstance(call, dict):
            names = call.get("funcname", [])
            if names:
                last = names[-1].get("String", {}).get("sval", "")
                schema = names[0].get("String", {}).get("sval", "") if len(names) == 2 else ""
                if last.lower() == "set_config" and schema.lower() in ("", "pg_catalog"):
                    out.append(call)
        for value in node.values():
            if isinstance(value, dict | list):
                _walk_calls(value, out)
    elif isinstance(node, list):
        for item in node:
            if isinstance(item, dict | list):
                _walk_calls(item, out)


def _explain_analyzes(body: dict[str, Any]) -> bool:
    """EXPLAIN runs its statement only with ANALYZE."""
    for option in body.get("options", []):
        elem = option.get("DefElem", {})
        if elem.get("defname") == "analyze":
            arg = elem.get("arg")
            if arg is None:
                return True
            value = _arg(arg)
            if isinstance(value, bool):
                return value
            return isinstance(value, str) and _parse_bool(value) is True
    return False


def _executed_query(kind: str, body: dict[str, Any]) -> Any:
    """The part of a statement whose expressions run when it runs, or None."""
    if kind in _EXECUTING:
        return body
    if kind == "ExplainStmt" and _explain_analyzes(body):
        query = body.get("query")
        if isinstance(query, dict) and len(query) == 1:
            ((inner_kind, inner),) = query.items()
            return _executed_query(inner_kind, inner)
        return None
    if kind == "CreateTableAsStmt" and not body.get("into", {}).get("skipData"):
        return body.get("query")
    return None


def _statement_templates(index: int, kind: str, body: dict[str, Any], text: str) -> list[_Template]:
    if kind == "VariableSetStmt":
        set_kind = body.get("kind", "VAR_SET_VALUE")
        if set_kind == "VAR_RESET_ALL":
            return [IdentityChange(index, None, None, "session", reset_all=True)]
        name = str(body.get("name", "")).lower()
        if not name.startswith(PREFIX):
            return []
        key = name[len(PREFIX) :]
        scope: Scope = "local" if body.get("is_local") else "session"
        if set_kind == "VAR_SET_VALUE":
            return [IdentityChange(index, key, _set_value(body.get("args", [])), scope)]
        if set_kind in ("VAR_SET_DEFAULT", "VAR_RESET"):
            return [IdentityChange(index, key, None, scope)]
        return []  # FROM CURRENT (no change), SET TRANSACTION ...
    if kind == "DiscardStmt":
        if body.get("target", "DISCARD_ALL") == "DISCARD_ALL":
            return [IdentityChange(index, None, None, "session", reset_all=True)]
        return []
    query = _executed_query(kind, body)
    if query is None or "set_config" not in text.lower():
        return []
    calls: list[dict[str, Any]] = []
    _walk_calls(query, calls)
    calls.sort(key=lambda call: int(call.get("location", 0)))
    out: list[_Template] = []
    mentions_prefix = PREFIX in text.lower()
    for call in calls:
        args = call.get("args", [])
        if len(args) != 3:
            continue
        setting = _arg(args[0])
        if isinstance(setting, str):
            if not setting.lower().startswith(PREFIX):
                continue
        elif isinstance(setting, bool) or setting is None:
            continue
        elif isinstance(setting, _Dynamic) and not mentions_prefix:
            continue  # some other setting, computed: none of our business
        out.append(_SetConfig(index, setting, _arg(args[1]), _arg(args[2])))
    return out


@lru_cache(maxsize=512)
def _templates(sql: str) -> tuple[_Template, ...]:
    """Parse ``sql`` once into change templates (bind parameters unresolved)."""
    try:
        decoded = msgspec.json.decode(pg_parser.parse_sql_json(sql))
    except Exception:
        return ()
    encoded = sql.encode("utf-8")
    out: list[_Template] = []
    for index, raw in enumerate(decoded.get("stmts", [])):
        stmt = raw.get("stmt", {})
        if len(stmt) != 1:
            continue
        ((kind, body),) = stmt.items()
        start = int(raw.get("stmt_location", 0))
        length = int(raw.get("stmt_len", 0))
        chunk = encoded[start : start + length] if length else encoded[start:]
        text = chunk.decode("utf-8", errors="replace")
        out.extend(_statement_templates(index, kind, body, text))
    return tuple(out)


def _param_text(value: ParamValue) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return bytes(value).decode("utf-8", errors="replace")


def _resolve(arg: _Arg, params: Sequence[ParamValue] | None) -> str | bool | _Dynamic | None:
    """A template argument with ``$n`` replaced by the bound value."""
    if not isinstance(arg, _Param):
        return arg
    if params is None or not 1 <= arg.number <= len(params):
        return _DYNAMIC
    return _param_text(params[arg.number - 1])


def _resolve_local(arg: _Arg, params: Sequence[ParamValue] | None) -> bool | None:
    """``is_local`` as a bool; None when unknown."""
    if isinstance(arg, _Param) and params is not None and 1 <= arg.number <= len(params):
        raw = params[arg.number - 1]
        if isinstance(raw, bytearray):  # binary bool: one byte
            return bool(raw[0]) if len(raw) == 1 else None
    value = _resolve(arg, params)
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _parse_bool(value)
    return None


def _set_config_change(
    template: _SetConfig, params: Sequence[ParamValue] | None
) -> IdentityChange | None:
    name = _resolve(template.name, params)
    is_local = _resolve_local(template.is_local, params)
    # Unknown is_local: assume session, the longer-lived (and more cautious) scope.
    scope: Scope = "local" if is_local else "session"
    if isinstance(name, str):
        if not name.lower().startswith(PREFIX):
            return None
        key: str | None = name.lower()[len(PREFIX) :]
    elif isinstance(name, _Dynamic):
        key = None
    else:
        return None  # NULL or boolean name: the call fails
    value = _resolve(template.value, params)
    if key is None or is_local is None or isinstance(value, _Dynamic | bool):
        # bool cannot occur for a text argument; treat it as not understood.
        return IdentityChange(template.index, key, None, scope, dynamic=True)
    return IdentityChange(template.index, key, value, scope)


def _prefilter(sql: str) -> bool:
    """Whether ``sql`` can possibly change a ``scalple.*`` setting.

    ``set_config`` is included for ``set_config($1, $2, ...)``, whose text
    names no setting at all (the name arrives as a bind parameter).  When
    the only hint is ``scalple.``, a statement whose every ``scalple.`` sits
    in a comment (a sqlcommenter comment) cannot change a setting, and the
    lexer says so in about 2 us where a parse costs 15-25 us.
    """
    low = sql.lower()
    if "reset" in low or "discard" in low or "set_config" in low:
        return True
    return "scalple." in low and mentioned_outside_comments(sql, "scalple.")


def identity_changes(sql: str, params: Sequence[ParamValue] | None = None) -> list[IdentityChange]:
    """The ``scalple.*`` setting changes the statements of ``sql`` make.

    In statement order, and within a statement in the order of the text.
    ``params`` are the bind parameters of an extended-protocol execution
    (``set_config('scalple.user_id', $1, true)`` as psycopg and asyncpg send
    it); without them a ``$n`` argument makes the change ``dynamic``.  Bad
    SQL gives ``[]``; this never raises.
    """
    if not _prefilter(sql):
        return []
    try:
        templates = _templates(sql)
        out: list[IdentityChange] = []
        for template in templates:
            if isinstance(template, IdentityChange):
                out.append(template)
            else:
                change = _set_config_change(template, params)
                if change is not None:
                    out.append(change)
        return out
    except Exception:  # pragma: no cover - defensive: never break the relay
        return []


def changes_of_statement(
    sql: str, index: int, params: Sequence[ParamValue] | None = None
) -> list[IdentityChange]:
    """The changes made by statement ``index`` of ``sql`` only."""
    return [change for change in identity_changes(sql, params) if change.index == index]
