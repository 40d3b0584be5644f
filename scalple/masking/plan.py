"""Which constants, parameters and result columns of one statement belong to a
PII or data-subject column: the plan the masking layer applies to a record.

Masking works on the statement text, token by token, but whether ``'j.m@x.org'``
must be masked depends on what it is compared with, assigned to or inserted
into, and that is a name-resolution question: ``email`` may be unqualified, an
alias, a view column, a CTE column.  The audit analyser already answers it
(:mod:`scalple.analysis._resolver`), so the plan is made by a subclass of its
:class:`~scalple.analysis._resolver.Analyzer` that watches the expressions go
by, instead of by a second resolver that could disagree with the audit record.

Configuration names columns fully qualified, ``schema.table.column`` (parsed
like SQL: unquoted parts are down-cased, ``"Quoted"`` parts kept), and the
plan reports them in the same canonical spelling the audit records use
(``public.users.email``, ``public."Mixed Case"."Id"``).

What is recognised
    A constant or ``$n`` is attributed to a column when it is compared with it
    (``= <> < > <= >=``, ``IS [NOT] DISTINCT FROM``, ``NULLIF``, ``LIKE``/``ILIKE``/
    ``SIMILAR TO`` and their negations and ``~`` operators, ``IN (...)``,
    ``BETWEEN``, ``= ANY/ALL (...)`` over an array literal, ``ARRAY[...]`` or a
    parameter, ``CASE col WHEN ...``), in either order, with casts, ``COLLATE``,
    ``lower()``/``upper()`` around the column and casts or a sign around the
    constant; row comparisons ``(a, b) = (1, 2)`` and ``(a, b) IN ((1, 2))`` pair
    element by element.  Assignments: ``INSERT ... VALUES`` (every row, by column
    list or, without one, by the table's column order), ``INSERT ... SELECT``
    with constants in its select list, ``UPDATE ... SET`` (also ``(a, b) =
    (...)``), ``ON CONFLICT DO UPDATE SET``, ``MERGE`` actions.  This happens at
    every query level: WHERE, JOIN ON, HAVING, subqueries, CTEs, DML.

    Through expressions, fail-closed.  A constant that only *reaches* a column
    through an expression is still a value of that column as far as the log is
    concerned: ``email = lower($1)``, ``left(email, 3) = 'ana'``, ``email ||
    'x' = 'yx'``, ``email % 'ana'`` all show part of an address.  So wherever
    values meet a column (a comparison of any kind, an operator or function
    applied to it, ``IN``/``= ANY`` over a sub-select, the alternatives of
    ``COALESCE``/``GREATEST``/``LEAST``/``CASE`` results, an assignment, an
    insertion, a set-operation column), every constant and ``$n`` anywhere in
    the values that meet it gets the column's role, also those inside the
    expression wrapped around the column itself.  "Anywhere" follows the
    analyser's lineage, into which each constant and parameter is entered as a
    pseudo-column of its own: through function arguments, casts, operators,
    row and array constructors, sub-select target lists, VALUES lists, CTE and
    derived-table columns, set operations, and functions in FROM.  Over-masking
    (``length(email) = 5`` masks the 5) is accepted; leaking is not.  Such a
    *widened* role keeps the column's mask but never its subject kind: the
    value of ``lower('ANA')`` or ``id + 1`` is not the subject's id, so tagging
    it would file the statement under the wrong subject.  A subject-only column
    reached that way gives ``ColumnRole(column, "redact", None)``: the value is
    hidden but not tagged.  A value that meets a column directly as well keeps
    the direct role.  When one value meets several columns the first role is
    kept, except that a role with a mask displaces one without (``id = $1 or
    email = $1`` masks ``$1`` rather than only tagging it); either way the
    conflict is noted in ``unresolved``.

    A column that is not configured itself but is equated (``=``, ``JOIN
    USING``) with a configured column anywhere in the statement lends it its
    role, so ``orders o JOIN users u ON u.id = o.user_id WHERE o.user_id = 42``
    attributes 42 to ``users.id`` when only that column is configured (when
    ``orders.user_id`` is configured too, it is reported, being the closer one).

    Result columns (``output``) are reported when their value is a plain
    reference to a configured column, looking through casts, ``lower``/``upper``,
    views, subqueries, CTEs, ``JOIN USING`` columns and set operations (a
    ``UNION`` column is reported if one branch is such a reference).  ``*`` is
    expanded from the catalog in PostgreSQL's order, ``USING`` columns first.
    Equalities are not used for outputs: ``select o.user_id`` is not reported
    because of a join with ``users.id``.

Byte offsets (``MaskingPlan.literals``)
    pglast's JSON parse tree (``parse_sql_json``, which the analyser uses) gives
    every node's ``location`` as a *byte* offset into the UTF-8 statement:
    libpg_query's own numbers, unconverted.  (pglast's Python node API,
    ``parse_sql``, converts them to *character* offsets: for ``select '😀', 'x'``
    the ``'x'`` is at 15 in JSON, at 12 through ``parse_sql``.)  So no
    conversion is needed here, and none is done.  What an ``A_Const`` location
    points at, found by experiment with pglast 8.8 / libpg_query 18:

    * ``'...'``, ``$$...$$``, ``$tag$...$tag$``: the opening quote or ``$``;
      a string continued over lines (``'a'`` newline ``'b'``) is one constant at
      its first quote;
    * ``E'...'``, ``U&'...'`` (with or without ``UESCAPE``), ``B'...'``,
      ``X'...'``: the prefix letter, so the offset is the token's first byte;
    * ``N'...'``: the *quote* (PostgreSQL's scanner returns ``N`` as a separate
      NCHAR keyword); the plan moves such offsets back by one, to the ``N``, so
      that every offset is where a literal token including its prefix starts;
    * typed literals (``date '2024-01-01'``, ``interval '1' day``): the quote;
      the type name is a separate token.  (The ``day`` of an interval becomes a
      synthetic typmod constant located at ``day``; it is never reported.)
    * numbers: the first character of the number; but a minus sign is folded
      into a numeric constant by the grammar and then the location is the
      ``-`` sign, also when blanks or comments separate it from the digits
      (``- 5``, ``-/**/5``, ``-(5)``).  Such offsets are kept: they point at the
      ``-``, and the number token starts after it.  A minus before a string or
      a cast (``-'5'::int``) is not folded: the offset is the quote.  Unary
      ``+5`` is not folded either: the offset is the digit.

    ``NULL``, ``TRUE`` and ``FALSE`` are keywords, not literal tokens, and carry
    no value worth masking: they are not reported.

Limits (see also ``unresolved``)
    Without a catalog nothing is guessed: only columns of schema-qualified
    relations can match (``public.users``, not ``users``), ``*`` is not
    expanded and views are not looked through.  Through expressions, only
    constants that feed the *value* are followed: one in a sub-select's WHERE
    (``email = (select e from v where e <> 'b')``) is compared with ``e``, not
    with ``email``, and is not attributed; nor are the outputs of a FROM
    function whose columns are unknown, ``XMLTABLE`` or ``JSON_TABLE``.  A
    constant merely listed next to a column (``select email, 'x'``) meets
    nothing.  The offsets are those of this exact text.  A plan reused for
    another text with the same fingerprint is only right if the constants appear in the same
    order and roles: the fingerprint also ignores whether a value is a constant
    or ``$n``, the order of ``AND``-ed conditions, of the select list, of an
    INSERT column list and of SET items.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final

import msgspec
from pglast import parser as pg_parser

from scalple.analysis._errors import describe_parse_error
from scalple.analysis._resolver import (
    EMPTY,
    Analyzer,
    Lineage,
    Node,
    _Col,
    _only,
    _Rte,
    _Scope,
    _Shape,
    _strings,
    _union,
    _unwrap,
    parse_json,
)
from scalple.analysis.catalog import (
    Catalog,
    Relation,
    parse_identifier_list,
    qualified_name,
    quote_ident,
)

__all__ = ["ColumnRole", "MaskingPlan", "plan_masking"]

Pair = tuple[str, str]
"""``(relation label, column)`` as in the analyser's lineages: ``("public.users", "email")``."""
Chain = tuple[Pair, ...]
"""Where a plain value comes from, outermost first: a view column, then its base column."""

_COMPARISONS: Final = frozenset(
    {"=", "<>", "<", ">", "<=", ">=", "~~", "!~~", "~~*", "!~~*", "~", "~*", "!~", "!~*"}
)
_PATTERN_FUNCTIONS: Final = frozenset({"like_escape", "similar_to_escape"})
_TRANSPARENT_FUNCTIONS: Final = frozenset({"lower", "upper"})
_VALUE_KEYS: Final = ("sval", "ival", "fval", "bsval")
_LITERAL_LABEL: Final = "\x00literal"
_PARAM_LABEL: Final = "\x00param"
"""Pseudo-relations of the constants and parameters entered into lineages (see
:meth:`_Planner._constant_lineage`); no relation label starts with a NUL."""
_SLOT_LABELS: Final = frozenset({_LITERAL_LABEL, _PARAM_LABEL})
_IDENT_BYTES: Final = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_$")
_NO_CATALOG: Final = (
    "no catalog: only columns of schema-qualified relations can be matched; "
    "* is not expanded and views are not looked through"
)


class ColumnRole(msgspec.Struct, frozen=True):
    """A configured column a value belongs to, and what to do with such values."""

    column: str
    """Canonical ``schema.table.column``, quoted like audit records (``public.users.email``)."""
    mask: str | None
    """The ``[pii]`` mask of the column, or None."""
    subject: str | None
    """The ``[subjects]`` kind of the column, or None."""


class MaskingPlan(msgspec.Struct):
    """Roles of one statement's constants, parameters and result columns."""

    literals: dict[int, ColumnRole]
    """UTF-8 byte offset of a constant's first byte (see the module docstring) -> role."""
    params: dict[int, ColumnRole]
    """1-based ``$n`` -> role."""
    output: dict[int, ColumnRole]
    """0-based result column (SELECT list after ``*`` expansion, or RETURNING) -> role."""
    unresolved: list[str]
    """What could not be resolved, in plain words."""


class _Plain(frozenset[Pair]):
    """A lineage whose value *is* a column's value (not computed from it).

    The analyser passes lineages along unchanged through renames, ``*``, CTE and
    subquery columns, and combines them with ``|`` (which yields a plain
    ``frozenset``) wherever a value is computed.  Marking the lineage itself is
    what lets plainness travel exactly as far as the analyser's own bookkeeping
    does, without a parallel resolver.  ``chains`` are alternatives (a ``USING``
    column or a ``UNION`` column may come from either side).
    """

    __slots__ = ("chains",)
    chains: tuple[Chain, ...]

    def __new__(cls, lineage: Iterable[Pair], chains: tuple[Chain, ...]) -> _Plain:
        self = super().__new__(cls, lineage)
        self.chains = chains
        return self


class _ViewChains:
    """Per view column, the chains of its defining expression (memoised per catalog)."""

    __slots__ = ("columns",)

    def __init__(self, columns: tuple[tuple[Chain, ...] | None, ...]) -> None:
        self.columns = columns


class _Operand:
    """One side of a comparison: its lineage, and per element for a row ``(a, b)``."""

    __slots__ = ("lineage", "parts")

    def __init__(self, lineage: Lineage, parts: list[Lineage] | None) -> None:
        self.lineage = lineage
        self.parts = parts


Slot = tuple[bool, int]
"""``(True, byte offset)`` for a constant, ``(False, n)`` for ``$n``."""
Observation = tuple[Slot, tuple[Chain, ...]]


class _Planner(Analyzer):
    """The analyser, plus a record of which constants and parameters meet which
    column chains, and plainness tracking for result columns."""

    def __init__(
        self, catalog: Catalog | None, sql: bytes = b"", *, view_stack: tuple[str, ...] = ()
    ) -> None:
        super().__init__(catalog, view_stack=view_stack)
        self.sql = sql
        self.observations: list[Observation] = []
        """A constant or parameter *is* a value of one of these chains' columns."""
        self.widened: dict[Observation, None] = {}
        """A constant or parameter reaches these chains' columns through an
        expression (fail-closed: masked, never tagged as a subject)."""
        self._wanted: set[int] = set()
        self._captured: dict[int, Lineage] = {}
        self.parent: dict[Pair, Pair] = {}
        """Union-find over columns that are equated somewhere in the statement."""
        self._shapes: dict[int, _Shape] = {}
        self._barriers: dict[int, tuple[list[_Col], int]] = {}
        self._spans: dict[int, tuple[_Scope, dict[int, tuple[int, list[_Col] | None]]]] = {}
        self._expr_handlers.update(
            {
                "A_Expr": self._a_expr,
                "CaseExpr": self._case_expr,
                "CollateClause": self._collate,
                "CoalesceExpr": self._alternatives,
                "MinMaxExpr": self._alternatives,
            }
        )
        if sql:  # not for a view definition: its constants are not in the text
            self._expr_handlers.update(
                {"A_Const": self._literal_expr, "ParamRef": self._param_expr}
            )

    # -- the statement ------------------------------------------------------------------

    def plan(self, node: Node) -> _Shape | None:
        """Analyse the statement; its result shape if it returns rows to the client."""
        node_type, body = _only(node)
        if node_type == "SelectStmt":
            shape = self.select(body, None, touch=True)
            return None if body.get("intoClause") else shape
        if node_type == "InsertStmt":
            return self.insert(body, None, touch=True)
        if node_type == "UpdateStmt":
            return self.update(body, None, touch=True)
        if node_type == "DeleteStmt":
            return self.delete(body, None, touch=True)
        if node_type == "MergeStmt":
            return self.merge(body, None, touch=True)
        self.statement(node)
        return None

    def barrier(self, shape: _Shape) -> int:
        """How many leading result columns have a known position."""
        entry = self._barriers.get(id(shape.columns))
        if entry is not None and entry[0] is shape.columns:
            return entry[1]
        return len(shape.columns)

    def _set_barrier(self, columns: list[_Col], position: int) -> None:
        entry = self._barriers.get(id(columns))
        if entry is None or entry[0] is not columns or entry[1] > position:
            self._barriers[id(columns)] = (columns, position)

    # -- recording ----------------------------------------------------------------------

    def observe(self, node: Any, chains: tuple[Chain, ...]) -> None:
        """``node`` (a constant or parameter, perhaps cast or signed) meets ``chains``."""
        slot = self._slot(node)
        if slot is not None:
            self.observations.append((slot, chains))

    def _slot(self, node: Any) -> Slot | None:
        while isinstance(node, dict) and len(node) == 1:
            key, body = _only(node)
            if key in ("TypeCast", "CollateClause"):
                node = body.get("arg")
            elif key == "A_Expr" and _is_sign(body):
                node = body.get("rexpr")
            elif key == "ParamRef":
                number = body.get("number")
                return (False, number) if isinstance(number, int) and number > 0 else None
            elif key == "A_Const":
                location = body.get("location")
                if not any(k in body for k in _VALUE_KEYS) or not isinstance(location, int):
                    return None  # NULL, TRUE, FALSE: keywords, nothing to mask
                return (True, self._token_start(location)) if location >= 0 else None
            else:
                return None
        return None

    def _token_start(self, location: int) -> int:
        """Move an ``N'...'`` constant's offset from the quote back to the ``N``."""
        sql = self.sql
        if (
            location >= 1
            and sql[location : location + 1] == b"'"
            and sql[location - 1 : location] in (b"N", b"n")
            and (location == 1 or not _is_ident_byte(sql[location - 2]))
        ):
            return location - 1
        return location

    def observe_array(self, node: Any, chains: tuple[Chain, ...]) -> None:
        """The right side of ``= ANY (...)``: an array constructor's elements, or one value."""
        while isinstance(node, dict) and "TypeCast" in node:
            node = node["TypeCast"].get("arg")
        if isinstance(node, dict) and "A_ArrayExpr" in node:
            for element in node["A_ArrayExpr"].get("elements") or ():
                self.observe_array(element, chains)
        else:
            self.observe(node, chains)

    def widen(self, lineage: Lineage, chains: tuple[Chain, ...]) -> None:
        """Every constant and parameter in ``lineage`` reaches ``chains``' columns."""
        if chains:
            for slot in _slots(lineage):
                self.widened.setdefault((slot, chains), None)

    def meet(self, *lineages: Lineage) -> None:
        """These values meet (are compared, combined, alternatives of each other):
        the constants and parameters among them reach every column among them."""
        chains = tuple(dict.fromkeys(chain for lin in lineages for chain in _value_chains(lin)))
        if chains:
            for lineage in lineages:
                self.widen(lineage, chains)

    def _meet_operands(self, left: _Operand, right: _Operand) -> None:
        """Like :meth:`meet`, element by element for two rows of the same length."""
        if (
            left.parts is not None
            and right.parts is not None
            and len(left.parts) == len(right.parts)
        ):
            for a, b in zip(left.parts, right.parts, strict=True):
                self.meet(a, b)
        else:
            self.meet(left.lineage, right.lineage)

    def equate(self, chains: Iterable[Chain]) -> None:
        """Record that the columns of ``chains`` hold equal values."""
        first: Pair | None = None
        for chain in chains:
            for pair in chain:
                if first is None:
                    first = pair
                else:
                    self._union_pairs(first, pair)

    def find(self, pair: Pair) -> Pair:
        parent = self.parent
        root = pair
        while parent.get(root, root) != root:
            root = parent[root]
        while pair != root:  # path compression
            following = parent[pair]
            parent[pair] = root
            pair = following
        return root

    def _union_pairs(self, a: Pair, b: Pair) -> None:
        self.parent.setdefault(a, a)
        self.parent.setdefault(b, b)
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    # -- expressions --------------------------------------------------------------------

    def expr(self, node: Any, scope: _Scope) -> Lineage:
        lineage = super().expr(node, scope)
        if self._wanted and id(node) in self._wanted:
            self._captured[id(node)] = lineage
        return lineage

    def _capture(self, nodes: Iterable[Any]) -> list[int]:
        """Ask :meth:`expr` to keep the lineage of ``nodes`` when the analyser
        evaluates them (it computes it and throws it away); :meth:`_release` hands
        it back.  Evaluating them a second time instead would record every note,
        call and observation twice."""
        ids = [id(node) for node in nodes if isinstance(node, dict)]
        self._wanted.update(ids)
        return ids

    def _release(self, ids: list[int]) -> dict[int, Lineage]:
        captured = {i: self._captured.pop(i) for i in ids if i in self._captured}
        self._wanted.difference_update(ids)
        return captured

    def _literal_expr(self, body: Node, scope: _Scope) -> Lineage:
        return self._constant_lineage({"A_Const": body})

    def _param_expr(self, body: Node, scope: _Scope) -> Lineage:
        return self._constant_lineage({"ParamRef": body})

    def _column_ref_expr(self, body: Node, scope: _Scope) -> Lineage:
        lineage = super()._column_ref_expr(body, scope)
        if not lineage:
            return lineage
        fields = body.get("fields") or []
        if any("A_Star" in f for f in fields):
            return lineage
        names = _strings(fields)
        if not names or names[0] in self.variables:
            return lineage
        if len(names) == 1:
            chains = self._unqualified_chains(names[0], scope)
        else:
            chains = self._qualified_chains(names, scope)
        return _Plain(lineage, chains) if chains else lineage

    def _unqualified_chains(self, name: str, scope: _Scope) -> tuple[Chain, ...] | None:
        """Mirror of :meth:`Analyzer.unqualified`, returning chains instead of lineage."""
        for level in scope.chain():
            visible = [r for r in level.items if r.unqualified and name not in r.hidden]
            definite = [r for r in visible if r.has(name) is True]
            if definite:
                return _rte_chains(definite[0], name) if len(definite) == 1 else None
            maybe = [r for r in visible if r.has(name) is None]
            if maybe:
                return _rte_chains(maybe[0], name) if len(maybe) == 1 else None
        return None

    def _qualified_chains(self, names: list[str], scope: _Scope) -> tuple[Chain, ...] | None:
        """Mirror of :meth:`Analyzer.qualified` (composite field access is not plain)."""
        for level in scope.chain():
            candidates: list[tuple[_Rte | None, str]] = [(level.find(names[0]), names[1])]
            if len(names) >= 3:
                candidates.append((level.find(names[1], schema=names[0]), names[2]))
            if len(names) >= 4:
                candidates.append((level.find(names[2], schema=names[1]), names[3]))
            for rte, column in candidates:
                if rte is not None:
                    return None if rte.has(column) is False else _rte_chains(rte, column)
        return None

    def _collate(self, body: Node, scope: _Scope) -> Lineage:
        return self.expr(body.get("arg"), scope)

    def _func_call(self, body: Node, scope: _Scope) -> Lineage:
        parts = _strings(body.get("funcname"))
        args = body.get("args") or []
        if (
            parts
            and parts[-1] in _TRANSPARENT_FUNCTIONS
            and (len(parts) == 1 or parts[-2] == "pg_catalog")
            and len(args) == 1
            and not any(body.get(k) for k in ("agg_order", "agg_filter", "over", "agg_star"))
        ):
            self.function_called(parts)
            return self.expr(args[0], scope)  # lower(email) is treated as email
        lineage = super()._func_call(body, scope)
        self.meet(lineage)  # left(email, 3), starts_with(email, 'ana'): the 3 and 'ana' too
        return lineage

    def _alternatives(self, body: Node, scope: _Scope) -> Lineage:
        """``COALESCE``/``GREATEST``/``LEAST``: each argument may be the value."""
        args = [self.expr(arg, scope) for arg in body.get("args") or ()]
        self.meet(*args)
        return _union(args)

    def _sublink(self, body: Node, scope: _Scope) -> Lineage:
        """``col IN (SELECT ...)``, ``col = ANY (SELECT ...)``, ``(a, b) = (SELECT ...)``:
        the tested value meets the sub-select's output, column by column for a row."""
        shape = self.query_shape(body.get("subselect") or {}, scope)
        test_node = body.get("testexpr")
        test = self._operand(test_node, scope)
        if body.get("subLinkType") == "EXISTS_SUBLINK":
            return test.lineage
        output = _union(col.lineage for col in shape.columns)
        if test_node is not None:
            self._meet_operands(test, _Operand(output, self._positions(shape)))
        return test.lineage | output

    def _positions(self, shape: _Shape) -> list[Lineage] | None:
        """A sub-select's output column by column, if every position is known."""
        if shape.open or self.barrier(shape) < len(shape.columns):
            return None
        return [col.lineage for col in shape.columns]

    def _operand(self, node: Any, scope: _Scope) -> _Operand:
        if isinstance(node, dict) and "RowExpr" in node:
            parts = [self.expr(arg, scope) for arg in node["RowExpr"].get("args") or ()]
            return _Operand(_union(parts), parts)
        lineage = self.expr(node, scope)
        sub = node.get("SubLink") if isinstance(node, dict) else None
        if isinstance(sub, dict) and sub.get("subLinkType") == "EXPR_SUBLINK":
            # ``(a, b) = (SELECT x, y ...)`` is this, not a row comparison, in the raw tree.
            shape = self._shapes.get(id((sub.get("subselect") or {}).get("SelectStmt")))
            if shape is not None and len(shape.columns) > 1:
                return _Operand(lineage, self._positions(shape))
        return _Operand(lineage, None)

    def _a_expr(self, body: Node, scope: _Scope) -> Lineage:
        kind = str(body.get("kind", ""))
        lnode, rnode = body.get("lexpr"), body.get("rexpr")
        left = self._operand(lnode, scope)
        items = _list_items(rnode) if kind == "AEXPR_IN" else []
        if items:  # each IN item on its own, so that rows pair element by element
            right_items = [self._operand(item, scope) for item in items]
            right = _Operand(_union(r.lineage for r in right_items), None)
        else:
            right_items = []
            right = self._operand(rnode, scope)
        names = _strings(body.get("name"))
        op = names[-1] if names else ""
        if lnode is None:
            return right.lineage  # prefix operator: nothing meets
        if kind in ("AEXPR_DISTINCT", "AEXPR_NOT_DISTINCT", "AEXPR_NULLIF") or (
            kind == "AEXPR_OP" and op in _COMPARISONS
        ):
            self._compare(left, rnode)
            self._compare(right, lnode)
            if op == "=" and kind in ("AEXPR_OP", "AEXPR_NOT_DISTINCT"):
                self._equate_operands(left, right)
        elif kind in ("AEXPR_OP_ANY", "AEXPR_OP_ALL") and op in _COMPARISONS:
            if isinstance(left.lineage, _Plain):
                self.observe_array(rnode, left.lineage.chains)
            elif isinstance(right.lineage, _Plain):  # 'x' = ANY (array_column)
                self.observe(lnode, right.lineage.chains)
        elif kind in ("AEXPR_LIKE", "AEXPR_ILIKE", "AEXPR_SIMILAR"):
            if isinstance(left.lineage, _Plain):
                self.observe(_pattern(rnode), left.lineage.chains)
            escape = _escape(rnode)
            if escape is not None:  # the ESCAPE character is no value of the column
                dropped = self._constant_lineage(escape)
                right = _Operand(right.lineage - dropped, None)
        elif kind == "AEXPR_IN":
            for item in items:
                self._compare(left, item)
            for item_operand in right_items:
                self._meet_operands(left, item_operand)
            return left.lineage | right.lineage
        elif "BETWEEN" in kind and isinstance(left.lineage, _Plain):
            for item in _list_items(rnode):
                self.observe(item, left.lineage.chains)
        # Whatever the operator (=, ||, %, @>, ...), its operands meet.
        self._meet_operands(left, right)
        return left.lineage | right.lineage

    def _constant_lineage(self, node: Any) -> Lineage:
        """A constant or ``$n`` as a pseudo-column of its own, for lineages.

        The analyser then carries it wherever it carries columns (function
        arguments, CTE and subquery columns, VALUES, set operations), so where a
        value ends up compared with or written to a column, the constants it is
        made of are known, without a second walk that could follow less.
        """
        slot = self._slot(node)
        if slot is None or not self.sql:
            return EMPTY
        return frozenset({(_LITERAL_LABEL if slot[0] else _PARAM_LABEL, str(slot[1]))})

    def _compare(self, column: _Operand, value: Any) -> None:
        """``column`` is compared with ``value``: attribute the value if it is a constant."""
        if isinstance(column.lineage, _Plain):
            self.observe(value, column.lineage.chains)
        elif column.parts is not None and isinstance(value, dict) and "RowExpr" in value:
            items = value["RowExpr"].get("args") or []
            if len(items) == len(column.parts):
                for part, item in zip(column.parts, items, strict=True):
                    if isinstance(part, _Plain):
                        self.observe(item, part.chains)

    def _equate_operands(self, left: _Operand, right: _Operand) -> None:
        pairs: list[tuple[Lineage, Lineage]] = [(left.lineage, right.lineage)]
        if (
            left.parts is not None
            and right.parts is not None
            and len(left.parts) == len(right.parts)
        ):
            pairs.extend(zip(left.parts, right.parts, strict=True))
        for a, b in pairs:
            if isinstance(a, _Plain) and isinstance(b, _Plain):
                self.equate(a.chains + b.chains)

    def _case_expr(self, body: Node, scope: _Scope) -> Lineage:
        """``CASE col WHEN 'x' THEN ...`` compares ``col`` with each WHEN value; the
        THEN and ELSE results are alternatives of one value, like COALESCE's."""
        arg = body.get("arg")
        subject = self.expr(arg, scope)
        conditions: list[Lineage] = []
        results: list[Lineage] = []
        for item in body.get("args") or []:
            when = _unwrap(item, "CaseWhen")
            condition = self.expr(when.get("expr"), scope)
            if isinstance(subject, _Plain):
                self.observe(when.get("expr"), subject.chains)
            if arg is not None:
                self.meet(subject, condition)
            conditions.append(condition)
            results.append(self.expr(when.get("result"), scope))
        results.append(self.expr(body.get("defresult"), scope))
        self.meet(*results)
        return subject | _union(conditions) | _union(results)

    # -- assignments --------------------------------------------------------------------

    def insert(self, body: Node, parent: _Scope | None, *, touch: bool) -> _Shape:
        """Each written value meets its target column: a plain constant directly,
        and whatever a computed one is made of (captured while the analyser
        evaluates it, or through the source query's shape) fail-closed."""
        select = body.get("selectStmt")
        source = _unwrap(select, "SelectStmt") if isinstance(select, dict) else None
        rows = list(_rows(source)) if source is not None else []
        wanted = self._capture(value for row in rows for value in row)
        shape = super().insert(body, parent, touch=touch)
        captured = self._release(wanted)
        target = self._target(body)
        names = [str(_unwrap(c, "ResTarget").get("name", "")) for c in body.get("cols") or ()]
        columns = self._target_columns(target, names)
        if columns and source is not None:
            for row in rows:
                self._assign_row(columns, row, captured)
            fed = self._shapes.get(id(source))
            if fed is not None:  # positions a * or a subquery makes: by the source's shape
                self._assign_shape(columns, fed)
        return shape

    def merge(self, body: Node, parent: _Scope | None, *, touch: bool) -> _Shape:
        clauses = [
            _unwrap(clause_node, "MergeWhenClause")
            for clause_node in body.get("mergeWhenClauses") or ()
        ]
        inserts = [c for c in clauses if c.get("commandType") == "CMD_INSERT" and c.get("values")]
        wanted = self._capture(value for clause in inserts for value in clause["values"])
        shape = super().merge(body, parent, touch=touch)
        captured = self._release(wanted)
        target: _Rte | None = None
        for clause in inserts:
            target = target or self._target(body)
            names = [
                str(_unwrap(t, "ResTarget").get("name", "")) for t in clause.get("targetList") or ()
            ]
            self._assign_row(self._target_columns(target, names), clause["values"], captured)
        return shape

    def _target(self, body: Node) -> _Rte:
        """The DML target relation, resolved again (the analyser keeps it local).

        An empty scope is right: a WITH item cannot be the target of a write.
        """
        return self.range_var(_unwrap(body["relation"], "RangeVar"), _Scope(None))

    def _target_columns(self, target: _Rte, names: list[str]) -> list[tuple[Chain, ...] | None]:
        if names:
            return [_rte_chains(target, name) for name in names]
        if target.complete:
            return [_col_chains(col) for col in target.columns]
        return []

    def _assign_row(
        self,
        columns: list[tuple[Chain, ...] | None],
        values: list[Any],
        captured: Mapping[int, Lineage],
    ) -> None:
        """One row written to ``columns``: each value, and whatever it is made of."""
        for chains, value in zip(columns, values, strict=False):
            if chains:
                self.observe(value, chains)
                self.widen(captured.get(id(value), EMPTY), chains)

    def _assign_shape(self, columns: list[tuple[Chain, ...] | None], shape: _Shape) -> None:
        """An INSERT source's output written to ``columns`` by position; past the
        last known position, every later value may land in any later column."""
        known = self.barrier(shape)
        rest = tuple(dict.fromkeys(c for chains in columns[known:] if chains for c in chains))
        for i, col in enumerate(shape.columns):
            if i >= known:
                self.widen(col.lineage, rest)
            elif i < len(columns):
                self.widen(col.lineage, columns[i] or ())

    def _column_at(self, shape: _Shape, index: int) -> Lineage:
        """Output ``index`` of a sub-select; all of them from an unknown position on."""
        known = self.barrier(shape)
        if index < known and index < len(shape.columns) and not shape.open:
            return shape.columns[index].lineage
        return _union(col.lineage for col in shape.columns[min(index, known) :])

    def _set_list(self, targets: list[Node] | None, target: _Rte, scope: _Scope) -> None:
        """``SET col = value``, like an INSERT row; ``SET (a, b) = (SELECT ...)``
        takes column ``colno`` of the sub-select, which the tree repeats per item."""
        assigned: list[tuple[str, Any, bool]] = []  # (column, value, from a sub-select)
        for item in targets or ():
            res = _unwrap(item, "ResTarget")
            name, value = res.get("name"), res.get("val")
            if not name or not isinstance(value, dict):
                continue
            multi = value.get("MultiAssignRef")
            if multi is not None:  # SET (a, b) = (1, 2): this is column ``colno`` of the row
                source = multi.get("source") or {}
                colno = multi.get("colno")
                if not isinstance(colno, int) or colno < 1:
                    continue
                if "RowExpr" not in source:  # SET (a, b) = (SELECT ...): resolved below
                    assigned.append((str(name), multi, True))
                    continue
                args = source["RowExpr"].get("args") or []
                if colno > len(args):
                    continue
                value = args[colno - 1]
            assigned.append((str(name), value, False))
        wanted = self._capture(value for _name, value, sub in assigned if not sub)
        super()._set_list(targets, target, scope)
        captured = self._release(wanted)
        for name, value, sub in assigned:
            chains = _rte_chains(target, name)
            if not chains:
                continue
            if sub:
                subselect = _unwrap(value["source"], "SubLink").get("subselect") or {}
                fed = self._shapes.get(id(subselect.get("SelectStmt")))
                if fed is not None:
                    self.widen(self._column_at(fed, int(value["colno"]) - 1), chains)
                continue
            self.observe(value, chains)
            self.widen(captured.get(id(value), EMPTY), chains)

    # -- relations and columns ----------------------------------------------------------

    def range_var(self, rv: Node, scope: _Scope) -> _Rte:
        rte = super().range_var(rv, scope)
        if rte.system_label is None:
            return rte  # a CTE (columns carry their own chains), a view, or unknown
        definition = self._stored_definition(rv)
        for i, col in enumerate(rte.columns):
            if len(col.lineage) != 1 or isinstance(col.lineage, _Plain):
                continue
            pair = next(iter(col.lineage))
            base = definition[i] if definition is not None and i < len(definition) else None
            chains = tuple((pair, *chain) for chain in base) if base else ((pair,),)
            col.lineage = _Plain(col.lineage, chains)
        return rte

    def _stored_definition(self, rv: Node) -> tuple[tuple[Chain, ...] | None, ...] | None:
        """A materialized view's column chains: its stored rows copy its sources."""
        if self.catalog is None:
            return None
        schema, name = rv.get("schemaname"), str(rv.get("relname", ""))
        rel = self.catalog.resolve((schema, name) if schema else (name,))
        if rel is None or rel.kind != "matview" or rel.definition is None:
            return None
        return self._view_chains(rel)

    def _range_function(self, body: Node, level: _Scope) -> None:
        """A function in FROM: its columns carry what its arguments are made of
        (``unnest($1::text[]) AS t(e) ... WHERE email = t.e``), fail-closed."""
        calls = [
            (entry.get("List", {}).get("items") or [None])[0]
            for entry in body.get("functions") or ()
        ]
        wanted = self._capture(calls)
        before = len(level.items)
        super()._range_function(body, level)
        fed = _union(self._release(wanted).values())
        if fed and len(level.items) > before:
            for col in level.items[-1].columns:
                col.lineage = col.lineage | fed

    def view_columns(self, rel: Relation) -> list[_Col]:
        columns = super().view_columns(rel)
        definition = self._view_chains(rel)
        for i, col in enumerate(columns):
            pair = (rel.qualified, col.name)
            base = definition[i] if i < len(definition) else None
            chains = tuple((pair, *chain) for chain in base) if base else ((pair,),)
            col.lineage = _Plain(col.lineage, chains)
        return columns

    def _view_chains(self, rel: Relation) -> tuple[tuple[Chain, ...] | None, ...]:
        """Chains of a view's output columns, from its definition; memoised per catalog."""
        label = rel.qualified
        catalog = self.catalog
        if catalog is None or label in self.view_stack:
            return ()
        key = f"masking-view:{label}"
        cached = catalog.memo.get(key)
        if isinstance(cached, _ViewChains):
            return cached.columns
        sub = _Planner(catalog._for_view_definitions(), view_stack=(*self.view_stack, label))
        columns: tuple[tuple[Chain, ...] | None, ...] = ()
        try:
            stmts = parse_json(rel.definition or "")
            if stmts and "SelectStmt" in stmts[0]:
                shape = sub.select(stmts[0]["SelectStmt"], None, touch=False)
                known = shape.columns[: sub.barrier(shape)]
                columns = tuple(_col_chains(col) for col in known)
        except Exception:  # an unusable definition just hides the chains
            columns = ()
        with catalog.memo_lock:
            catalog.memo.setdefault(key, _ViewChains(columns))
        return columns

    # -- result columns -----------------------------------------------------------------

    def select(
        self,
        body: Node,
        parent: _Scope | None,
        *,
        touch: bool,
        after_left: Callable[[_Shape], None] | None = None,
    ) -> _Shape:
        shape = super().select(body, parent, touch=touch, after_left=after_left)
        self._shapes[id(body)] = shape  # for set operations; the tree outlives the planner
        return shape

    def _set_operation(
        self,
        body: Node,
        scope: _Scope,
        *,
        touch: bool,
        after_left: Callable[[_Shape], None] | None,
    ) -> _Shape:
        shape = super()._set_operation(body, scope, touch=touch, after_left=after_left)
        sides = [self._shapes.get(id(body.get(key))) for key in ("larg", "rarg")]
        barrier = len(shape.columns)
        for side in sides:
            if side is None:
                barrier = 0
                continue
            barrier = min(barrier, self.barrier(side))
        for i, col in enumerate(shape.columns):
            chains: tuple[Chain, ...] = ()
            for side in sides:
                if side is not None and i < len(side.columns):
                    chains += _col_chains(side.columns[i]) or ()
            if chains:
                col.lineage = _Plain(col.lineage, chains)
            if i < barrier:  # the same column: a constant in one branch is its value
                self.meet(col.lineage)
        if barrier < len(shape.columns):
            self._set_barrier(shape.columns, barrier)
            self.meet(*(col.lineage for col in shape.columns[barrier:]))
        return shape

    def _target_entry(
        self, item: Node, scope: _Scope, outputs: list[_Col], opens: list[_Rte]
    ) -> None:
        before, opens_before = len(outputs), len(opens)
        super()._target_entry(item, scope, outputs, opens)
        val = _unwrap(item, "ResTarget").get("val") or {}
        ref = val.get("ColumnRef")
        if ref is None or not any("A_Star" in f for f in ref.get("fields") or ()):
            return
        if _strings(ref.get("fields")):  # t.*: the relation's columns, in order
            if len(opens) > opens_before:
                self._set_barrier(outputs, before)
            return
        # The analyser lists ``*`` per FROM item, with JOIN USING columns last;
        # PostgreSQL puts them first, so the positions are recomputed here.
        added = outputs[before:]
        ordered, complete = self._star_columns(scope)
        added_ids = {id(c) for c in added}
        ordered_ids = {id(c) for c in ordered}
        if not ordered_ids <= added_ids or len(ordered_ids) != len(ordered):
            self._set_barrier(outputs, before)
            return
        rest = [c for c in added if id(c) not in ordered_ids]
        if complete and rest:
            self._set_barrier(outputs, before)
            return
        outputs[before:] = ordered + rest
        if not complete:
            self._set_barrier(outputs, before + len(ordered))

    def _star_columns(self, scope: _Scope) -> tuple[list[_Col], bool]:
        """What ``*`` yields at this level, in order; False if something is unknown."""
        entry = self._spans.get(id(scope))
        spans = entry[1] if entry is not None and entry[0] is scope else {}
        items = scope.items
        out: list[_Col] = []
        i = 0
        while i < len(items):
            span = spans.get(i)
            if span is not None:
                end, columns = span
                if columns is None:
                    return out, False
                out.extend(columns)
                i = end
                continue
            rte = items[i]
            i += 1
            if not rte.unqualified:
                continue
            if not rte.complete:
                return out, False
            out.extend(c for c in rte.columns if c.name not in rte.hidden)
        return out, True

    def from_item(self, node: Node, level: _Scope, outer: _Scope | None) -> None:
        start = len(level.items)
        super().from_item(node, level, outer)
        node_type, body = _only(node)
        if node_type == "JoinExpr":
            self._order_join(body, level, start)

    def _order_join(self, body: Node, level: _Scope, start: int) -> None:
        """Record what ``*`` yields for this join: USING columns, then the left
        side's other columns, then the right side's; and make USING columns plain.

        The analyser appends a join's items as: left items, right items, the
        merged USING columns, the USING alias, the join alias.  An aliased join's
        own column list is reordered to match (and its alias column names
        reapplied to the right columns).
        """
        entry = self._spans.setdefault(id(level), (level, {}))
        spans = entry[1]
        end = len(level.items)
        middle, left = self._entry_columns(level, start, spans)
        right_end, right = self._entry_columns(level, middle, spans)
        merged: list[_Col] = []
        if right_end < end:
            candidate = level.items[right_end]
            if candidate.label == "join" and candidate.refname is None:
                merged = candidate.columns
        using = {c.name for c in merged}
        for col in merged:
            chains: tuple[Chain, ...] = ()
            for side in (left, right):
                for other in side or ():
                    if other.name == col.name:
                        chains += _col_chains(other) or ()
                        break
            if chains:
                col.lineage = _Plain(col.lineage, chains)
                self.equate(chains)
        ordered: list[_Col] | None = None
        if left is not None and right is not None:
            ordered = (
                list(merged)
                + [c for c in left if c.name not in using]
                + [c for c in right if c.name not in using]
            )
        alias = body.get("alias")
        if alias and ordered is not None:
            joined = level.items[end - 1]
            if joined.refname == alias.get("aliasname"):
                colnames = _strings(alias.get("colnames"))
                ordered = [
                    _Col(colnames[i], c.lineage) if i < len(colnames) else c
                    for i, c in enumerate(ordered)
                ]
                joined.columns = ordered
        spans[start] = (end, ordered)

    @staticmethod
    def _entry_columns(
        level: _Scope, index: int, spans: dict[int, tuple[int, list[_Col] | None]]
    ) -> tuple[int, list[_Col] | None]:
        """The FROM entry starting at ``index``: where it ends and its ``*`` columns."""
        span = spans.get(index)
        if span is not None:
            return span
        if index >= len(level.items):
            return index, None
        rte = level.items[index]
        return index + 1, (list(rte.columns) if rte.complete else None)


# --------------------------------------------------------------------------- helpers


def _is_ident_byte(byte: int) -> bool:
    return byte >= 0x80 or byte in _IDENT_BYTES


def _is_sign(body: Node) -> bool:
    """A unary ``+``/``-`` the grammar did not fold into a constant."""
    names = _strings(body.get("name"))
    return (
        body.get("kind") == "AEXPR_OP"
        and body.get("lexpr") is None
        and names[-1:] in (["+"], ["-"])
    )


def _pattern(node: Any) -> Any:
    """The pattern of LIKE/SIMILAR TO, without the ``ESCAPE`` wrapper function."""
    if isinstance(node, dict) and "FuncCall" in node:
        call = node["FuncCall"]
        parts = _strings(call.get("funcname"))
        args = call.get("args") or []
        if parts and parts[-1] in _PATTERN_FUNCTIONS and args:
            return args[0]
    return node


def _escape(node: Any) -> Any:
    """The ``ESCAPE`` character of LIKE/SIMILAR TO, or None."""
    if isinstance(node, dict) and "FuncCall" in node:
        call = node["FuncCall"]
        parts = _strings(call.get("funcname"))
        args = call.get("args") or []
        if parts and parts[-1] in _PATTERN_FUNCTIONS and len(args) >= 2:
            return args[1]
    return None


def _slots(lineage: Lineage) -> list[Slot]:
    """The constants and parameters entered into ``lineage``, in a stable order."""
    return sorted((rel == _LITERAL_LABEL, int(col)) for rel, col in lineage if rel in _SLOT_LABELS)


def _value_chains(lineage: Lineage) -> tuple[Chain, ...]:
    """Chains of the columns a value is or is computed from: a plain value's own
    chains (outermost first), then every other column of its lineage alone."""
    chains: tuple[Chain, ...] = lineage.chains if isinstance(lineage, _Plain) else ()
    seen = {pair for chain in chains for pair in chain}
    others = sorted(p for p in lineage if p[0] not in _SLOT_LABELS and p not in seen)
    return chains + tuple((pair,) for pair in others)


def _list_items(node: Any) -> list[Any]:
    if isinstance(node, dict) and "List" in node:
        return list(node["List"].get("items") or ())
    if isinstance(node, list):
        return node
    return []


def _rows(select: Node) -> Iterator[list[Any]]:
    """The rows of values an INSERT source yields, as expressions by position."""
    if select.get("op", "SETOP_NONE") != "SETOP_NONE":
        for key in ("larg", "rarg"):
            side = select.get(key)
            if isinstance(side, dict):
                yield from _rows(side)
        return
    if select.get("valuesLists"):
        for row in select["valuesLists"]:
            yield list(row.get("List", {}).get("items") or ())
        return
    values: list[Any] = []
    for item in select.get("targetList") or ():
        val = _unwrap(item, "ResTarget").get("val") or {}
        ref = val.get("ColumnRef")
        if ref is not None and any("A_Star" in f for f in ref.get("fields") or ()):
            break  # positions after a * are not known here
        values.append(val)
    yield values


def _col_chains(col: _Col) -> tuple[Chain, ...] | None:
    return col.lineage.chains if isinstance(col.lineage, _Plain) else None


def _rte_chains(rte: _Rte, name: str) -> tuple[Chain, ...] | None:
    """Mirror of :meth:`_Rte.lookup`: the chains of column ``name`` of a FROM item."""
    found = [col for col in rte.columns if col.name == name]
    if found:
        return _col_chains(found[0]) if len(found) == 1 else None
    if rte.system_label is not None and rte.has(name):
        return None  # ctid, xmin...
    chains: list[Chain] = []
    if rte.target is not None:  # columns unknown: a name is taken as written
        chains.append(((rte.target, name),))
    for item in rte.open:
        if item.has(name) is not False:
            more = _rte_chains(item, name)
            if more is None:
                return None
            chains.extend(more)
    return tuple(chains) or None


def _configured(
    pii: Mapping[str, str], subjects: Mapping[str, str]
) -> tuple[dict[Pair, ColumnRole], list[str]]:
    """Configured columns by ``(relation label, column)``; notes for unusable names."""
    masks: dict[Pair, str] = {}
    kinds: dict[Pair, str] = {}
    notes: list[str] = []
    for what, source, into in (("PII", pii, masks), ("subject", subjects, kinds)):
        for name, value in source.items():
            parts = parse_identifier_list(name, ".")
            if len(parts) != 3:
                notes.append(f"{what} column {name!r} is not schema.table.column; ignored")
                continue
            into[(qualified_name(parts[0], parts[1]), parts[2])] = value
    roles = {
        pair: ColumnRole(f"{pair[0]}.{quote_ident(pair[1])}", masks.get(pair), kinds.get(pair))
        for pair in sorted(masks.keys() | kinds.keys())
    }
    return roles, notes


def _keep(
    target: dict[int, ColumnRole],
    is_literal: bool,
    key: int,
    role: ColumnRole,
    conflicts: dict[str, None],
) -> None:
    """Record ``role`` for a value: the first one stays, unless it has no mask
    and this one has (fail-closed); a differing role is noted either way."""
    kept = target.setdefault(key, role)
    if (role.mask, role.subject) == (kept.mask, kept.subject):
        return
    what = f"the constant at byte {key}" if is_literal else f"${key}"
    if kept.mask is None and role.mask is not None:
        target[key] = role
        conflicts[f"{what} meets {kept.column} and {role.column}; kept the masked one"] = None
    else:
        conflicts[f"{what} meets {kept.column} and {role.column}; kept the first"] = None


class _Roles:
    """Turns chains into roles: directly, or through equated columns."""

    def __init__(self, roles: dict[Pair, ColumnRole], planner: _Planner) -> None:
        self.roles = roles
        self.planner = planner
        self._classes: dict[Pair, ColumnRole] | None = None

    def direct(self, chains: tuple[Chain, ...]) -> list[ColumnRole]:
        """Per alternative, the outermost configured column of its chain."""
        found: list[ColumnRole] = []
        for chain in chains:
            for pair in chain:
                role = self.roles.get(pair)
                if role is not None:
                    if role not in found:
                        found.append(role)
                    break
        return found

    def widened(self, chains: tuple[Chain, ...]) -> ColumnRole | None:
        """The role of a value that reaches ``chains`` through an expression.

        A configured column with a mask wins over one without; the role keeps
        the mask but not the subject kind (the module docstring says why), and a
        subject-only column gives ``redact``.
        """
        found = self.direct(chains)
        masked = [role for role in found if role.mask is not None]
        role = masked[0] if masked else found[0] if found else self.equated(chains)
        if role is None:
            return None
        return ColumnRole(role.column, role.mask or "redact", None)

    def equated(self, chains: tuple[Chain, ...]) -> ColumnRole | None:
        if self._classes is None:
            self._classes = {}
            planner = self.planner
            for pair in sorted(planner.parent):
                role = self.roles.get(pair)
                if role is not None:
                    self._classes.setdefault(planner.find(pair), role)
        for chain in chains:
            for pair in chain:
                if pair in self.planner.parent:
                    role = self._classes.get(self.planner.find(pair))
                    if role is not None:
                        return role
        return None


def plan_masking(
    sql: str,
    catalog: Catalog | None,
    pii: Mapping[str, str],
    subjects: Mapping[str, str],
) -> MaskingPlan:
    """Plan the masking of ONE statement (split Query strings first).

    ``pii`` maps ``schema.table.column`` to a mask name, ``subjects`` maps
    ``schema.table.column`` to a subject kind.  Never raises: text that does not
    parse gives an empty plan whose ``unresolved`` starts with ``statement could
    not be parsed``; an unexpected tree shape keeps what was found before it and
    says ``internal error while planning``.
    """
    roles, notes = _configured(pii, subjects)
    plan = MaskingPlan({}, {}, {}, notes)
    try:
        statements = parse_json(sql)
    except pg_parser.ParseError as exc:
        plan.unresolved.append(f"statement could not be parsed: {describe_parse_error(exc)}")
        return plan
    except Exception as exc:  # e.g. a tree nested too deeply for orjson
        plan.unresolved.append(f"statement could not be parsed: {type(exc).__name__}")
        return plan
    if not statements:
        plan.unresolved.append("empty statement")
        return plan
    planner = _Planner(catalog, sql.encode("utf-8", "surrogateescape"))
    shape: _Shape | None = None
    try:
        shape = planner.plan(statements[0])
    except Exception as exc:  # a tree shape the analyser does not expect
        planner.note(f"internal error while planning: {type(exc).__name__}")
    if len(statements) > 1:
        planner.note(f"{len(statements)} statements given; only the first was planned")
    try:
        _fill(plan, planner, shape, _Roles(roles, planner))
    except Exception as exc:  # never cost the caller a record
        return MaskingPlan(
            {}, {}, {}, [*notes, f"internal error while planning: {type(exc).__name__}"]
        )
    return plan


def _fill(plan: MaskingPlan, planner: _Planner, shape: _Shape | None, roles: _Roles) -> None:
    """Resolve the observations into roles and the result columns.

    Direct observations first, then the widened ones (which only add what the
    direct ones did not decide).  The first role kept for a value stays, except
    that one with a mask displaces one without: a value that is also a PII
    column's value must not be logged as it is (see :func:`_keep`).
    """
    if planner.catalog is None and planner.tables:
        plan.unresolved.append(_NO_CATALOG)
    conflicts: dict[str, None] = {}
    direct: dict[Slot, set[str]] = {}
    for slot, chains in planner.observations:
        found = roles.direct(chains)
        if not found:
            equated = roles.equated(chains)
            found = [equated] if equated is not None else []
        is_literal, key = slot
        target = plan.literals if is_literal else plan.params
        for role in found:
            direct.setdefault(slot, set()).add(role.column)
            _keep(target, is_literal, key, role, conflicts)
    for slot, chains in planner.widened:
        widened = roles.widened(chains)
        if widened is None or widened.column in direct.get(slot, ()):
            continue  # a plain value of that column: its direct role (and subject tag) decides
        is_literal, key = slot
        _keep(plan.literals if is_literal else plan.params, is_literal, key, widened, conflicts)
    if shape is not None:
        barrier = planner.barrier(shape)
        for position, col in enumerate(shape.columns[:barrier]):
            plain = _col_chains(col)
            found = roles.direct(plain) if plain else []
            if found:
                plan.output[position] = found[0]
        if barrier < len(shape.columns) or shape.open:
            planner.note(f"result columns from position {barrier} on are not known")
    plan.literals = dict(sorted(plan.literals.items()))  # text order, for people reading it
    plan.params = dict(sorted(plan.params.items()))
    notes = [n for n in planner.notes if n not in plan.unresolved]
    plan.unresolved.extend(notes)
    plan.unresolved.extend(conflicts)
