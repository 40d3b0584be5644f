"""Name resolution over pglast's JSON parse trees: which relations and columns a
statement touches.

This is a small re-implementation of the parts of PostgreSQL's parse analysis
that decide what a name refers to (``transformFromClause``, ``colNameToVar``,
``ExpandColumnRefStar``...), working on the raw tree plus a :class:`Catalog`.
pglast's JSON form is used rather than its Python node objects because it is
about six times faster to produce and the walker only needs dictionaries.

Every column reference resolves to a *lineage*: the set of ``(relation, column)``
pairs its value comes from.  A base table column is its own lineage; a column of
a view, subquery or CTE carries the lineage of the expression that defines it
(plus, for a view, the view column itself).  Predicates, join conditions,
grouping and ordering expressions are "touched" (recorded as accessed) right
away; the output columns of a subquery, CTE or view only when something outside
uses them, so ``select name from customer_orders`` does not report every column
the view could produce.  Where an output column's value is used even though it is
not referenced by name (``DISTINCT``, ``UNION`` without ``ALL``,
``INTERSECT``/``EXCEPT``), all output columns are touched.

The analyser also records whether its result depended on something the
fingerprint ignores (see :attr:`Analyzer.sensitivity`), so the cache can tell
apart statements that share a fingerprint but not an analysis.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

import orjson
from pglast import parser as pg_parser

from scalple.analysis._commands import command_tag, explain_analyzes, pgaudit_class
from scalple.analysis.catalog import Catalog, Relation, quote_ident

__all__ = ["EMPTY", "Analyzer", "parse_json"]

Node = dict[str, Any]
Lineage = frozenset[tuple[str, str]]
EMPTY: Final[Lineage] = frozenset()

# Sensitivity levels (see Analyzer.sensitivity).
INSENSITIVE: Final = 0
IDENTIFIERS: Final = 1
FULL_TEXT: Final = 2

_DIGIT_RUN = re.compile(r"[0-9]{2}")

# System functions that run SQL (or read a relation) named by a text argument.
_SQL_RUNNING_BUILTINS: Final = frozenset(
    {
        "query_to_xml",
        "query_to_xmlschema",
        "query_to_xml_and_xmlschema",
        "table_to_xml",
        "table_to_xmlschema",
        "table_to_xml_and_xmlschema",
        "cursor_to_xml",
        "schema_to_xml",
        "schema_to_xmlschema",
        "schema_to_xml_and_xmlschema",
        "database_to_xml",
        "database_to_xmlschema",
        "database_to_xml_and_xmlschema",
        "pg_read_file",
        "pg_read_binary_file",
        "lo_export",
        "lo_import",
    }
)

# Used only without a catalog (or one without function info): common built-in
# functions, so that ``lower(name)`` is not reported as an unanalysed user function.
_COMMON_BUILTIN_NAMES: Final = """
    abs acos age array_agg array_append array_cat array_length array_lower array_position
    array_positions array_prepend array_remove array_replace array_to_json array_to_string
    array_upper ascii asin atan atan2 avg bit_and bit_length bit_or bool_and bool_or
    btrim cardinality cbrt ceil ceiling char_length character_length chr clock_timestamp
    coalesce concat concat_ws convert_from convert_to corr cos count covar_pop covar_samp
    cume_dist current_database current_schema current_schemas current_setting currval
    date_bin date_part date_trunc decode degrees dense_rank div encode every exp extract
    first_value floor format gen_random_uuid generate_series generate_subscripts
    greatest has_column_privilege has_schema_privilege has_table_privilege hashtext
    initcap isfinite json_agg json_array_elements json_array_elements_text
    json_array_length json_build_array json_build_object json_each json_each_text
    json_extract_path json_extract_path_text json_object json_object_agg json_object_keys
    json_populate_record json_populate_recordset json_to_record json_to_recordset
    json_typeof jsonb_agg jsonb_array_elements jsonb_array_elements_text
    jsonb_array_length jsonb_build_array jsonb_build_object jsonb_each jsonb_each_text
    jsonb_extract_path jsonb_extract_path_text jsonb_insert jsonb_object
    jsonb_object_agg jsonb_object_keys jsonb_path_exists jsonb_path_query
    jsonb_populate_record jsonb_pretty jsonb_set jsonb_strip_nulls jsonb_to_record
    jsonb_to_recordset jsonb_typeof justify_days justify_hours justify_interval lag
    last_value lastval lead least left length ln localtime localtimestamp log log10 lower
    lpad ltrim make_date make_interval make_time make_timestamp make_timestamptz max md5
    min mod mode now nth_value ntile nullif num_nonnulls num_nulls octet_length overlay
    percent_rank percentile_cont percentile_disc pg_backend_pid pg_sleep pi position power
    quote_ident quote_literal quote_nullable radians random rank regexp_match
    regexp_matches regexp_replace regexp_split_to_array regexp_split_to_table repeat
    replace reverse right round row_number row_to_json rpad rtrim set_config setseed
    setval sha224 sha256 sha384 sha512 sign sin split_part sqrt starts_with
    statement_timestamp stddev stddev_pop stddev_samp string_agg string_to_array
    string_to_table strpos substr substring sum tan timeofday to_char to_date to_hex
    to_json to_jsonb to_number to_timestamp transaction_timestamp translate trim trunc
    unnest upper uuid_generate_v4 var_pop var_samp variance version width_bucket
    xmlagg nextval pg_typeof txid_current pg_current_xact_id
"""
_COMMON_BUILTINS: Final = frozenset(_COMMON_BUILTIN_NAMES.split())

# Set-returning built-ins known to yield one column (used without a catalog).
_SINGLE_COLUMN_BUILTINS: Final = frozenset(
    {
        "generate_series",
        "generate_subscripts",
        "unnest",
        "regexp_split_to_table",
        "string_to_table",
        "regexp_matches",
        "json_array_elements",
        "json_array_elements_text",
        "jsonb_array_elements",
        "jsonb_array_elements_text",
        "json_object_keys",
        "jsonb_object_keys",
        "jsonb_path_query",
    }
)

# Columns every stored relation has besides its user columns (never in ``*``).
_SYSTEM_COLUMNS: Final = frozenset({"tableoid", "ctid", "xmin", "xmax", "cmin", "cmax"})

_RELATION_OBJECT_TYPES: Final = frozenset(
    {"OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_FOREIGN_TABLE"}
)

# ALTER TABLE subcommands whose ``name`` is a column name.
_COLUMN_SUBTYPES: Final = frozenset(
    {
        "AT_ColumnDefault",
        "AT_CookedColumnDefault",
        "AT_DropNotNull",
        "AT_SetNotNull",
        "AT_SetExpression",
        "AT_DropExpression",
        "AT_CheckNotNull",
        "AT_SetStatistics",
        "AT_SetOptions",
        "AT_ResetOptions",
        "AT_SetStorage",
        "AT_SetCompression",
        "AT_DropColumn",
        "AT_AlterColumnType",
        "AT_AlterColumnGenericOptions",
        "AT_AddIdentity",
        "AT_SetIdentity",
        "AT_DropIdentity",
    }
)


def parse_json(sql: str) -> list[Node]:
    """Raw statements of ``sql`` as pglast JSON (raises ``pglast.parser.ParseError``)."""
    tree = orjson.loads(pg_parser.parse_sql_json(sql))
    return [s.get("stmt", {}) for s in tree.get("stmts", ())]


def _unwrap(node: Node, expected: str) -> Node:
    """Typed fields come unwrapped, generic ones as ``{"Type": {...}}``; accept both."""
    inner = node.get(expected)
    if len(node) == 1 and isinstance(inner, dict):
        return inner
    return node


def _only(node: Node) -> tuple[str, Node]:
    for key, value in node.items():
        return key, value
    return "", {}


def _strings(items: Iterable[Node] | None) -> list[str]:
    out: list[str] = []
    for item in items or ():
        if "String" in item:
            out.append(str(item["String"].get("sval", "")))
    return out


def _union(lineages: Iterable[Lineage]) -> Lineage:
    result: set[tuple[str, str]] = set()
    for lin in lineages:
        result |= lin
    return frozenset(result)


# --------------------------------------------------------------------------- scopes


class _Col:
    """One output column of a FROM item: its name and where its value comes from."""

    __slots__ = ("lineage", "name")

    def __init__(self, name: str, lineage: Lineage) -> None:
        self.name = name
        self.lineage = lineage


class _Shape:
    """Output columns of a query; ``open`` holds FROM items a ``*`` could not expand."""

    __slots__ = ("columns", "open")

    def __init__(self, columns: list[_Col], open_items: list[_Rte] | None = None) -> None:
        self.columns = columns
        self.open: list[_Rte] = open_items or []


class _Rte:
    """A FROM item as seen by name resolution (PostgreSQL's namespace item).

    ``complete`` is False when the column list is unknown (no catalog, unknown
    relation, function with undeclared output); then any name may be a column of
    it and is attributed to ``target`` (a relation label) if there is one.
    ``hidden`` are names merged by ``JOIN ... USING``/``NATURAL`` that an
    unqualified reference must resolve through the join instead.
    """

    __slots__ = (
        "columns",
        "complete",
        "hidden",
        "label",
        "open",
        "qualified",
        "refname",
        "schema",
        "system_label",
        "target",
        "unqualified",
    )

    def __init__(
        self,
        refname: str | None,
        columns: list[_Col],
        *,
        label: str,
        complete: bool = True,
        target: str | None = None,
        schema: str | None = None,
        open_items: list[_Rte] | None = None,
        qualified: bool = True,
        unqualified: bool = True,
    ) -> None:
        self.refname = refname
        self.columns = columns
        self.label = label
        self.open: list[_Rte] = open_items or []
        self.complete = complete and not self.open
        self.target = target
        self.schema = schema
        self.hidden: set[str] = set()
        self.qualified = qualified
        self.unqualified = unqualified
        self.system_label: str | None = None
        """Set for stored relations, which also have ``ctid``, ``xmin``..."""

    def has(self, name: str) -> bool | None:
        """True: it has that column; False: it has not; None: cannot tell."""
        for col in self.columns:
            if col.name == name:
                return True
        if self.system_label is not None and name in _SYSTEM_COLUMNS:
            return True
        if self.complete:
            return False
        if self.target is None and self.open and all(o.has(name) is False for o in self.open):
            return False
        return None

    def lookup(self, name: str) -> Lineage:
        found = [col.lineage for col in self.columns if col.name == name]
        if found:
            return _union(found)
        if self.system_label is not None and name in _SYSTEM_COLUMNS:
            return frozenset({(self.system_label, name)})
        result: set[tuple[str, str]] = set()
        if self.target is not None:
            result.add((self.target, name))
        for item in self.open:
            if item.has(name) is not False:
                result |= item.lookup(name)
        return frozenset(result)

    def rename(self, colnames: list[str]) -> None:
        """Apply an alias column list (``AS t(a, b)``) positionally."""
        for i, new in enumerate(colnames):
            if i < len(self.columns):
                self.columns[i] = _Col(new, self.columns[i].lineage)
            elif not self.complete:
                self.columns.append(_Col(new, EMPTY))


class _Cte:
    __slots__ = ("colnames", "name", "query", "recursive", "scope", "shape", "state")

    def __init__(self, name: str, query: Node, colnames: list[str], recursive: bool) -> None:
        self.name = name
        self.query = query
        self.colnames = colnames
        self.recursive = recursive
        self.shape: _Shape | None = None
        self.state = "pending"
        self.scope: _Scope | None = None


class _Scope:
    """One query level: its FROM items and CTEs, linked to the enclosing level."""

    __slots__ = ("ctes", "items", "parent")

    def __init__(self, parent: _Scope | None) -> None:
        self.parent = parent
        self.items: list[_Rte] = []
        self.ctes: dict[str, _Cte] = {}

    def chain(self) -> Iterator[_Scope]:
        level: _Scope | None = self
        while level is not None:
            yield level
            level = level.parent

    def find_cte(self, name: str) -> _Cte | None:
        for level in self.chain():
            cte = level.ctes.get(name)
            if cte is not None:
                return cte
        return None

    def find(self, refname: str, schema: str | None = None) -> _Rte | None:
        for rte in self.items:
            if rte.qualified and rte.refname == refname and schema in (None, rte.schema):
                return rte
        return None


class _ViewInfo:
    """A view definition analysed once per catalog: what using the view reads."""

    __slots__ = ("columns", "lineages", "notes", "tables", "user_calls")

    def __init__(
        self,
        tables: tuple[str, ...],
        columns: dict[str, frozenset[str]],
        notes: tuple[str, ...],
        lineages: list[Lineage],
        user_calls: int,
    ) -> None:
        self.tables = tables
        self.columns = columns
        self.notes = notes
        self.lineages = lineages
        self.user_calls = user_calls


# --------------------------------------------------------------------------- analyser


class Analyzer:
    """Collects what one statement touches.  Not thread-safe; make one per statement."""

    def __init__(
        self,
        catalog: Catalog | None,
        *,
        variables: frozenset[str] = frozenset(),
        view_stack: tuple[str, ...] = (),
    ) -> None:
        self.catalog = catalog
        self.variables = variables
        self.view_stack = view_stack
        self.tables: dict[str, None] = {}
        self.columns: dict[str, set[str]] = {}
        self.notes: dict[str, None] = {}
        self.user_calls = 0
        self.writes = False
        self.sensitivity = INSENSITIVE
        """What a cache must compare besides the fingerprint: 0 nothing, 1 the
        identifiers (aliases, output names, relation names with digit runs), 2 the
        whole text including constants (DO bodies)."""
        self._creation_schema: str | None = None
        self.search_path_change: str | None = None
        """After ``SET search_path``: the new setting ("" for RESET/DEFAULT)."""
        self._expr_handlers: dict[str, Callable[[Node, _Scope], Lineage]] = {
            "ColumnRef": self._column_ref_expr,
            "SubLink": self._sublink,
            "FuncCall": self._func_call,
            "A_Const": _no_lineage,
            "ParamRef": _no_lineage,
            "String": _no_lineage,
            "Integer": _no_lineage,
            "Float": _no_lineage,
            "Boolean": _no_lineage,
            "TypeName": _no_lineage,
            "SQLValueFunction": _no_lineage,
            "CurrentOfExpr": _no_lineage,
            "SetToDefault": _no_lineage,
            "TypeCast": self._type_cast,
            "SelectStmt": self._nested_select,
            "ResTarget": self._res_target_expr,
        }

    # -- recording --------------------------------------------------------------------

    def note(self, text: str) -> None:
        self.notes[text] = None

    def add_table(self, label: str) -> None:
        self.tables[label] = None

    def touch(self, lineage: Lineage) -> None:
        for rel, col in lineage:
            self.columns.setdefault(rel, set()).add(col)

    def touch_columns(self, label: str, names: Iterable[str]) -> None:
        cols = self.columns.setdefault(label, set())
        cols.update(names)
        if not cols:
            del self.columns[label]

    def mark(self, level: int) -> None:
        if level > self.sensitivity:
            self.sensitivity = level

    def finish(self) -> None:
        if self.catalog is None and self.tables:
            self.note("no catalog: relations are reported as written and views are not expanded")

    # -- statements -------------------------------------------------------------------

    def statement(self, node: Node) -> tuple[str, str]:
        """Analyse one raw statement; returns (command tag, statement class)."""
        node_type, body = _only(node)
        command = command_tag(node_type, body)
        cls = pgaudit_class(node_type, body)
        handler = getattr(self, f"_stmt_{node_type}", None)
        if handler is not None:
            adjusted: str | None = handler(body)
            if adjusted:
                cls = adjusted
        return command, cls

    def _read_class(self) -> str:
        """READ, or WRITE when a data-modifying CTE ran, or FUNCTION when nothing
        but user functions was touched (``select f(1)``)."""
        if self.writes:
            return "WRITE"
        if not self.tables and self.user_calls:
            return "FUNCTION"
        return "READ"

    def _stmt_SelectStmt(self, body: Node) -> str | None:
        self.select(body, None, touch=True)
        if body.get("intoClause"):
            return "DDL"
        return self._read_class()

    def _stmt_InsertStmt(self, body: Node) -> str | None:
        self.insert(body, None, touch=True)
        return None

    def _stmt_UpdateStmt(self, body: Node) -> str | None:
        self.update(body, None, touch=True)
        return None

    def _stmt_DeleteStmt(self, body: Node) -> str | None:
        self.delete(body, None, touch=True)
        return None

    def _stmt_MergeStmt(self, body: Node) -> str | None:
        self.merge(body, None, touch=True)
        return None

    def _stmt_ExplainStmt(self, body: Node) -> str | None:
        query = body.get("query") or {}
        _, inner_cls = self.statement(query)
        if explain_analyzes(body):
            return inner_cls
        self.note("EXPLAIN without ANALYZE: the statement was planned, not executed")
        return "MISC"

    def _stmt_PrepareStmt(self, body: Node) -> str | None:
        query = body.get("query") or {}
        self.statement(query)
        self.note("PREPARE: the statement is planned here and runs on EXECUTE")
        return None

    def _stmt_ExecuteStmt(self, body: Node) -> str | None:
        for param in body.get("params") or ():
            self.touch(self.expr(param, _Scope(None)))
        self.note("EXECUTE: the prepared statement's text is not known to the analyzer")
        return None

    def _stmt_DeclareCursorStmt(self, body: Node) -> str | None:
        query = body.get("query") or {}
        self.statement(query)
        return "WRITE" if self.writes else "READ"

    def _stmt_CopyStmt(self, body: Node) -> str | None:
        if body.get("is_program"):
            self.note("COPY ... PROGRAM runs a program on the database server")
        query = body.get("query")
        if query:
            self.statement(query)
            return "WRITE" if self.writes else "READ"
        relation = body.get("relation")
        if not relation:
            return None
        scope = _Scope(None)
        rte = self.range_var(_unwrap(relation, "RangeVar"), scope)
        scope.items.append(rte)
        names = _strings(body.get("attlist"))
        if names:
            self.touch_target(rte, names)
        else:
            self.touch_all(rte, "COPY")
        if body.get("whereClause"):
            self.touch(self.expr(body["whereClause"], scope))
        return None

    def _stmt_CreateTableAsStmt(self, body: Node) -> str | None:
        into = body.get("into") or {}
        rel = into.get("rel")
        query = body.get("query") or {}
        self.statement(query)
        if rel:
            label = self.new_relation_label(_unwrap(rel, "RangeVar"))
            self.add_table(label)
            self.touch_columns(label, _strings(into.get("colNames")))
        return None

    def _stmt_ViewStmt(self, body: Node) -> str | None:
        view = body.get("view")
        self.statement(body.get("query") or {})
        if view:
            label = self.new_relation_label(_unwrap(view, "RangeVar"))
            self.add_table(label)
            self.touch_columns(label, _strings(body.get("aliases")))
        return None

    def _stmt_CreateStmt(self, body: Node) -> str | None:
        self.create_table(body)
        return None

    def _stmt_CreateForeignTableStmt(self, body: Node) -> str | None:
        self.create_table(body.get("base") or {})
        return None

    def _stmt_AlterTableStmt(self, body: Node) -> str | None:
        relation = body.get("relation")
        if not relation:
            return None
        rte = self.range_var(_unwrap(relation, "RangeVar"), _Scope(None))
        names: list[str] = []
        for cmd_node in body.get("cmds") or ():
            cmd = _unwrap(cmd_node, "AlterTableCmd")
            subtype = cmd.get("subtype", "")
            definition = cmd.get("def") or {}
            if subtype == "AT_AddColumn" and "ColumnDef" in definition:
                names.append(str(definition["ColumnDef"].get("colname", "")))
                self.constraints(definition["ColumnDef"].get("constraints"))
            elif subtype in _COLUMN_SUBTYPES and cmd.get("name"):
                names.append(str(cmd["name"]))
            elif subtype == "AT_AddConstraint" and "Constraint" in definition:
                self.constraints([definition])
                keys = _strings(definition["Constraint"].get("keys")) + _strings(
                    definition["Constraint"].get("fk_attrs")
                )
                names.extend(keys)
            elif subtype in ("AT_AttachPartition", "AT_DetachPartition"):
                part = definition.get("PartitionCmd", {}).get("name")
                if part:
                    self.range_var(_unwrap(part, "RangeVar"), _Scope(None))
        label = rte.target or rte.label
        self.touch_columns(label, [n for n in names if n])
        return None

    def _stmt_RenameStmt(self, body: Node) -> str | None:
        relation = body.get("relation")
        if relation and body.get("renameType") not in ("OBJECT_SCHEMA", "OBJECT_DATABASE"):
            rte = self.range_var(_unwrap(relation, "RangeVar"), _Scope(None))
            if body.get("renameType") == "OBJECT_COLUMN" and body.get("subname"):
                self.touch_columns(rte.target or rte.label, [str(body["subname"])])
        return None

    def _stmt_AlterObjectSchemaStmt(self, body: Node) -> str | None:
        relation = body.get("relation")
        if relation and body.get("objectType") in _RELATION_OBJECT_TYPES:
            self.range_var(_unwrap(relation, "RangeVar"), _Scope(None))
        return None

    def _stmt_AlterOwnerStmt(self, body: Node) -> str | None:
        relation = body.get("relation")
        if relation and body.get("objectType") in _RELATION_OBJECT_TYPES:
            self.range_var(_unwrap(relation, "RangeVar"), _Scope(None))
        return None

    def _stmt_DropStmt(self, body: Node) -> str | None:
        if body.get("removeType") not in _RELATION_OBJECT_TYPES:
            return None
        for obj in body.get("objects") or ():
            names = _strings(obj.get("List", {}).get("items"))
            if names:
                self.relation_by_names(names)
        return None

    def _stmt_TruncateStmt(self, body: Node) -> str | None:
        for rel in body.get("relations") or ():
            self.range_var(_unwrap(rel, "RangeVar"), _Scope(None))
        return None

    def _stmt_LockStmt(self, body: Node) -> str | None:
        return self._stmt_TruncateStmt(body)

    def _stmt_VacuumStmt(self, body: Node) -> str | None:
        for item in body.get("rels") or ():
            vrel = _unwrap(item, "VacuumRelation")
            relation = vrel.get("relation")
            if relation:
                rte = self.range_var(_unwrap(relation, "RangeVar"), _Scope(None))
                cols = _strings(vrel.get("va_cols"))
                if cols:
                    self.touch_target(rte, cols)
        return None

    def _stmt_ClusterStmt(self, body: Node) -> str | None:
        relation = body.get("relation")
        if relation:
            self.range_var(_unwrap(relation, "RangeVar"), _Scope(None))
        return None

    def _stmt_ReindexStmt(self, body: Node) -> str | None:
        relation = body.get("relation")
        if relation and body.get("kind") == "REINDEX_OBJECT_TABLE":
            self.range_var(_unwrap(relation, "RangeVar"), _Scope(None))
        return None

    def _stmt_IndexStmt(self, body: Node) -> str | None:
        relation = body.get("relation")
        if not relation:
            return None
        scope = _Scope(None)
        rte = self.range_var(_unwrap(relation, "RangeVar"), scope)
        scope.items.append(rte)
        for elem_node in (body.get("indexParams") or []) + (body.get("indexIncludingParams") or []):
            elem = _unwrap(elem_node, "IndexElem")
            if elem.get("name"):
                self.touch_target(rte, [str(elem["name"])])
            elif elem.get("expr"):
                self.touch(self.expr(elem["expr"], scope))
        if body.get("whereClause"):
            self.touch(self.expr(body["whereClause"], scope))
        return None

    def _stmt_CreateStatsStmt(self, body: Node) -> str | None:
        scope = _Scope(None)
        for rel in body.get("relations") or ():
            if "RangeVar" in rel:
                scope.items.append(self.range_var(rel["RangeVar"], scope))
        for elem_node in body.get("exprs") or ():
            elem = _unwrap(elem_node, "StatsElem")
            if elem.get("name") and scope.items:
                self.touch_target(scope.items[0], [str(elem["name"])])
            elif elem.get("expr"):
                self.touch(self.expr(elem["expr"], scope))
        return None

    def _stmt_CreateTrigStmt(self, body: Node) -> str | None:
        return self._stmt_ClusterStmt(body)

    def _stmt_RuleStmt(self, body: Node) -> str | None:
        return self._stmt_ClusterStmt(body)

    def _stmt_CreatePolicyStmt(self, body: Node) -> str | None:
        table = body.get("table")
        if not table:
            return None
        scope = _Scope(None)
        rte = self.range_var(_unwrap(table, "RangeVar"), scope)
        scope.items.append(rte)
        for key in ("qual", "with_check"):
            if body.get(key):
                self.touch(self.expr(body[key], scope))
        return None

    def _stmt_AlterPolicyStmt(self, body: Node) -> str | None:
        return self._stmt_CreatePolicyStmt(body)

    def _stmt_CommentStmt(self, body: Node) -> str | None:
        objtype = body.get("objtype")
        obj = body.get("object") or {}
        names = _strings(obj.get("List", {}).get("items"))
        if objtype in _RELATION_OBJECT_TYPES and names:
            self.relation_by_names(names)
        elif objtype == "OBJECT_COLUMN" and len(names) >= 2:
            label = self.relation_by_names(names[:-1])
            self.touch_columns(label, [names[-1]])
        return None

    def _stmt_GrantStmt(self, body: Node) -> str | None:
        if body.get("objtype") != "OBJECT_TABLE":
            return None
        cols: list[str] = []
        for priv in body.get("privileges") or ():
            cols.extend(_strings(_unwrap(priv, "AccessPriv").get("cols")))
        targtype = body.get("targtype")
        if targtype == "ACL_TARGET_OBJECT":
            for obj in body.get("objects") or ():
                rte = self.range_var(_unwrap(obj, "RangeVar"), _Scope(None))
                if cols:
                    self.touch_target(rte, cols)
        elif targtype == "ACL_TARGET_ALL_IN_SCHEMA":
            for schema in _strings(body.get("objects")):
                if self.catalog is None:
                    self.note(
                        f"tables of schema {quote_ident(schema)} are unknown without a catalog"
                    )
                    continue
                for rel in self.catalog.schema_relations(schema):
                    self.add_table(rel.qualified)
        return None

    def _stmt_CallStmt(self, body: Node) -> str | None:
        call = body.get("funccall")
        if call:
            self.touch(self.expr({"FuncCall": _unwrap(call, "FuncCall")}, _Scope(None)))
        return "FUNCTION"

    def _stmt_RefreshMatViewStmt(self, body: Node) -> str | None:
        relation = body.get("relation")
        if not relation:
            return None
        rv = _unwrap(relation, "RangeVar")
        label, rel = self.resolve_relation(rv.get("schemaname"), str(rv.get("relname", "")))
        self.add_table(label)
        if rel is not None and rel.definition is not None:
            info = self.view_info(rel)
            for lineage in info.lineages:
                self.touch(lineage)
        return None

    def _stmt_CreateSchemaStmt(self, body: Node) -> str | None:
        previous = self._creation_schema
        self._creation_schema = body.get("schemaname") or previous
        try:
            for element in body.get("schemaElts") or ():
                self.statement(element)
        finally:
            self._creation_schema = previous
        return None

    def _stmt_VariableSetStmt(self, body: Node) -> str | None:
        if body.get("name") != "search_path" and body.get("kind") != "VAR_RESET_ALL":
            return None
        self.mark(FULL_TEXT)  # the value is a constant, which the fingerprint ignores
        kind = body.get("kind")
        if kind == "VAR_SET_VALUE":
            parts = []
            for arg in body.get("args") or ():
                const = arg.get("A_Const", {})
                value = const.get("sval", {}).get("sval")
                if value is not None:
                    parts.append(quote_ident(str(value)) if value != "$user" else '"$user"')
            self.search_path_change = ", ".join(parts)
        elif kind in ("VAR_SET_DEFAULT", "VAR_RESET", "VAR_RESET_ALL"):
            self.search_path_change = ""
        return None

    def _stmt_DoStmt(self, body: Node) -> str | None:
        from scalple.analysis._plpgsql import analyze_do_block

        self.mark(FULL_TEXT)
        analyze_do_block(self, body)
        return "FUNCTION"

    # -- DDL helpers ------------------------------------------------------------------

    def create_table(self, body: Node) -> None:
        relation = body.get("relation")
        if not relation:
            return
        rv = _unwrap(relation, "RangeVar")
        label = self.new_relation_label(rv)
        self.add_table(label)
        names: list[str] = []
        for elt in body.get("tableElts") or ():
            if "ColumnDef" in elt:
                names.append(str(elt["ColumnDef"].get("colname", "")))
                self.constraints(elt["ColumnDef"].get("constraints"))
            elif "Constraint" in elt:
                self.constraints([elt])
            elif "TableLikeClause" in elt:
                like = elt["TableLikeClause"].get("relation")
                if like:
                    self.range_var(_unwrap(like, "RangeVar"), _Scope(None))
        for parent in body.get("inhRelations") or ():
            self.range_var(_unwrap(parent, "RangeVar"), _Scope(None))
        self.touch_columns(label, [n for n in names if n])

    def constraints(self, items: list[Node] | None) -> None:
        """Foreign keys name the table they reference: record it."""
        for item in items or ():
            con = item.get("Constraint", {})
            pktable = con.get("pktable")
            if con.get("contype") == "CONSTR_FOREIGN" and pktable:
                rte = self.range_var(_unwrap(pktable, "RangeVar"), _Scope(None))
                pk_attrs = _strings(con.get("pk_attrs"))
                if pk_attrs:
                    self.touch_target(rte, pk_attrs)

    def new_relation_label(self, rv: Node) -> str:
        """Label of a relation being created (it is not in the snapshot yet)."""
        self._check_relname(rv)
        schema = rv.get("schemaname")
        name = str(rv.get("relname", ""))
        if rv.get("relpersistence") == "t":
            return quote_ident(name) if not schema else f"{quote_ident(schema)}.{quote_ident(name)}"
        if not schema:
            schema = self._creation_schema
        if not schema and self.catalog is not None:
            existing = self.catalog.resolve((name,))
            if existing is not None:
                return existing.qualified
            schema = self.catalog.creation_schema()
        if not schema:
            return quote_ident(name)
        return f"{quote_ident(schema)}.{quote_ident(name)}"

    def relation_by_names(self, names: list[str]) -> str:
        schema = names[-2] if len(names) >= 2 else None
        label, _ = self.resolve_relation(schema, names[-1])
        self.add_table(label)
        return label

    # -- relations --------------------------------------------------------------------

    def _check_relname(self, rv: Node) -> None:
        """The fingerprint drops digit runs from relation names and temp table names."""
        if rv.get("relpersistence") == "t" or _DIGIT_RUN.search(str(rv.get("relname", ""))):
            self.mark(IDENTIFIERS)

    def resolve_relation(self, schema: str | None, name: str) -> tuple[str, Relation | None]:
        written = f"{quote_ident(schema)}.{quote_ident(name)}" if schema else quote_ident(name)
        if self.catalog is None:
            return written, None
        rel = self.catalog.resolve((schema, name) if schema else (name,))
        if rel is None:
            self.note(f"relation {written} is not in the catalog")
            return written, None
        return rel.qualified, rel

    def range_var(self, rv: Node, scope: _Scope) -> _Rte:
        """A relation (or CTE) named in FROM, a DML target or a utility statement."""
        self._check_relname(rv)
        schema = rv.get("schemaname")
        relname = str(rv.get("relname", ""))
        alias = rv.get("alias")
        colnames: list[str] = []
        refname = relname
        if alias:
            refname = str(alias.get("aliasname", relname))
            colnames = _strings(alias.get("colnames"))
            if colnames:
                self.mark(IDENTIFIERS)
        if not schema:
            cte = scope.find_cte(relname)
            if cte is not None:
                shape = self.cte_shape(cte)
                rte = _Rte(
                    refname,
                    list(shape.columns),
                    label=relname,
                    open_items=list(shape.open),
                )
                rte.rename(colnames)
                return rte
        label, rel = self.resolve_relation(schema, relname)
        self.add_table(label)
        if rel is None:
            rte = _Rte(refname, [], label=label, complete=False, target=label, schema=schema)
        elif rel.kind == "view":
            rte = _Rte(refname, self.view_columns(rel), label=label, schema=rel.schema)
        else:
            rte = _Rte(
                refname,
                [_Col(c, frozenset({(label, c)})) for c in rel.columns],
                label=label,
                schema=rel.schema,
            )
            rte.system_label = label
        if alias is not None:
            rte.schema = None  # an aliased relation cannot be referred to as schema.name
        rte.rename(colnames)
        return rte

    def view_columns(self, rel: Relation) -> list[_Col]:
        """Columns of a view: the view column plus the base columns it comes from.

        Using a view also reads what its definition reads to produce rows (join
        and filter columns): those are recorded here, whichever columns are used.
        """
        label = rel.qualified
        info = self.view_info(rel)
        for table in info.tables:
            self.add_table(table)
        for table, cols in info.columns.items():
            self.touch_columns(table, cols)
        for text in info.notes:
            self.note(text)
        self.user_calls += info.user_calls
        columns = []
        for i, name in enumerate(rel.columns):
            base = info.lineages[i] if i < len(info.lineages) else EMPTY
            columns.append(_Col(name, frozenset({(label, name)}) | base))
        return columns

    def view_info(self, rel: Relation) -> _ViewInfo:
        label = rel.qualified
        catalog = self.catalog
        assert catalog is not None
        key = f"view:{label}"
        cached = catalog.memo.get(key)
        if isinstance(cached, _ViewInfo):
            return cached
        if label in self.view_stack:
            return _ViewInfo((), {}, (f"view {label} refers to itself; not expanded",), [], 0)
        sub = Analyzer(catalog._for_view_definitions(), view_stack=(*self.view_stack, label))
        lineages: list[Lineage] = []
        try:
            stmts = parse_json(rel.definition or "")
        except pg_parser.ParseError:
            stmts = []
            sub.note(f"definition of view {label} could not be parsed")
        if stmts and "SelectStmt" in stmts[0]:
            shape = sub.select(stmts[0]["SelectStmt"], None, touch=False)
            lineages = [col.lineage for col in shape.columns]
        info = _ViewInfo(
            tuple(sub.tables),
            {k: frozenset(v) for k, v in sub.columns.items()},
            tuple(sub.notes),
            lineages,
            sub.user_calls,
        )
        with catalog.memo_lock:
            catalog.memo.setdefault(key, info)
        return info

    # -- DML targets ------------------------------------------------------------------

    def touch_target(self, rte: _Rte, names: Iterable[str]) -> None:
        for name in names:
            if rte.has(name) is False:
                self.note(f"column {name} is not a column of {rte.label}")
                continue
            self.touch(rte.lookup(name))

    def touch_all(self, rte: _Rte, what: str) -> None:
        for col in rte.columns:
            self.touch(col.lineage)
        if not rte.complete:
            reason = "no catalog" if self.catalog is None else "not in the catalog"
            self.note(f"columns of {rte.label} used by {what} are unknown ({reason})")

    def _returning(self, body: Node) -> list[Node]:
        clause = body.get("returningClause")
        if isinstance(clause, dict):
            return list(clause.get("exprs") or ())
        return list(body.get("returningList") or ())

    def _returning_shape(self, body: Node, scope: _Scope, touch: bool) -> _Shape:
        outputs: list[_Col] = []
        opens: list[_Rte] = []
        for item in self._returning(body):
            self._target_entry(item, scope, outputs, opens)
        shape = _Shape(outputs, opens)
        if touch:
            self._touch_shape(shape)
        return shape

    def _dml_scope(self, body: Node, parent: _Scope | None) -> _Scope:
        scope = _Scope(parent)
        if body.get("withClause"):
            self.with_clause(_unwrap(body["withClause"], "WithClause"), scope)
        return scope

    def insert(self, body: Node, parent: _Scope | None, *, touch: bool) -> _Shape:
        self.writes = True
        scope = self._dml_scope(body, parent)
        target = self.range_var(_unwrap(body["relation"], "RangeVar"), scope)
        names = [str(_unwrap(c, "ResTarget").get("name", "")) for c in body.get("cols") or ()]
        select = body.get("selectStmt")
        if select:
            sel = _unwrap(select, "SelectStmt")
            if sel.get("valuesLists") and not sel.get("fromClause"):
                for row in sel["valuesLists"]:
                    for item in row.get("List", {}).get("items", []):
                        self.touch(self.expr(item, scope))
            else:
                self.select(sel, scope, touch=True)
        if names:
            self.touch_target(target, names)
        elif select:  # not DEFAULT VALUES
            # Without a column list the whole row is written (the rest from defaults);
            # the number of values cannot matter anyway: the fingerprint folds
            # lists of constants, so (1, 2) and (1, 2, 3) look the same to the cache.
            if target.complete:
                for col in target.columns:
                    self.touch(col.lineage)
            else:
                reason = "no catalog" if self.catalog is None else "not in the catalog"
                self.note(f"target columns of INSERT into {target.label} are unknown ({reason})")
        tscope = _Scope(scope)
        tscope.items.append(target)
        conflict = body.get("onConflictClause")
        if conflict:
            self.on_conflict(_unwrap(conflict, "OnConflictClause"), target, tscope)
        self._add_old_new(target, tscope)
        return self._returning_shape(body, tscope, touch)

    def _add_old_new(self, target: _Rte, scope: _Scope) -> None:
        """RETURNING may use ``old``/``new`` (PostgreSQL 18)."""
        for name in ("old", "new"):
            if scope.find(name) is None:
                scope.items.append(
                    _Rte(
                        name,
                        list(target.columns),
                        label=target.label,
                        complete=target.complete,
                        target=target.target,
                        unqualified=False,
                    )
                )

    def on_conflict(self, clause: Node, target: _Rte, scope: _Scope) -> None:
        excluded = _Rte(
            "excluded",
            list(target.columns),
            label=target.label,
            complete=target.complete,
            target=target.target,
            unqualified=False,
        )
        scope.items.append(excluded)
        infer = clause.get("infer")
        if infer:
            infer = _unwrap(infer, "InferClause")
            for elem_node in infer.get("indexElems") or ():
                elem = _unwrap(elem_node, "IndexElem")
                if elem.get("name"):
                    self.touch_target(target, [str(elem["name"])])
                elif elem.get("expr"):
                    self.touch(self.expr(elem["expr"], scope))
            if infer.get("whereClause"):
                self.touch(self.expr(infer["whereClause"], scope))
        self._set_list(clause.get("targetList"), target, scope)
        if clause.get("whereClause"):
            self.touch(self.expr(clause["whereClause"], scope))

    def _set_list(self, targets: list[Node] | None, target: _Rte, scope: _Scope) -> None:
        """``SET col = expr``: the column is written, the expression read."""
        for item in targets or ():
            res = _unwrap(item, "ResTarget")
            if res.get("name"):
                self.touch_target(target, [str(res["name"])])
            if res.get("val"):
                self.touch(self.expr(res["val"], scope))
            for ind in res.get("indirection") or ():
                self.touch(self.expr(ind, scope))

    def update(self, body: Node, parent: _Scope | None, *, touch: bool) -> _Shape:
        self.writes = True
        scope = self._dml_scope(body, parent)
        target = self.range_var(_unwrap(body["relation"], "RangeVar"), scope)
        scope.items.append(target)
        self.from_list(body.get("fromClause"), scope, parent)
        self._set_list(body.get("targetList"), target, scope)
        if body.get("whereClause"):
            self.touch(self.expr(body["whereClause"], scope))
        self._add_old_new(target, scope)
        return self._returning_shape(body, scope, touch)

    def delete(self, body: Node, parent: _Scope | None, *, touch: bool) -> _Shape:
        self.writes = True
        scope = self._dml_scope(body, parent)
        target = self.range_var(_unwrap(body["relation"], "RangeVar"), scope)
        scope.items.append(target)
        self.from_list(body.get("usingClause"), scope, parent)
        if body.get("whereClause"):
            self.touch(self.expr(body["whereClause"], scope))
        self._add_old_new(target, scope)
        return self._returning_shape(body, scope, touch)

    def merge(self, body: Node, parent: _Scope | None, *, touch: bool) -> _Shape:
        self.writes = True
        scope = self._dml_scope(body, parent)
        target = self.range_var(_unwrap(body["relation"], "RangeVar"), scope)
        source = body.get("sourceRelation")
        if source:
            self.from_item(source, scope, parent)
        scope.items.append(target)
        if body.get("joinCondition"):
            self.touch(self.expr(body["joinCondition"], scope))
        for clause_node in body.get("mergeWhenClauses") or ():
            clause = _unwrap(clause_node, "MergeWhenClause")
            if clause.get("condition"):
                self.touch(self.expr(clause["condition"], scope))
            kind = clause.get("commandType")
            if kind == "CMD_UPDATE":
                self._set_list(clause.get("targetList"), target, scope)
            elif kind == "CMD_INSERT":
                names = [
                    str(_unwrap(t, "ResTarget").get("name", ""))
                    for t in clause.get("targetList") or ()
                ]
                values = clause.get("values") or []
                for value in values:
                    self.touch(self.expr(value, scope))
                if names:
                    self.touch_target(target, names)
                elif target.complete:
                    for col in target.columns:
                        self.touch(col.lineage)
        self._add_old_new(target, scope)
        return self._returning_shape(body, scope, touch)

    # -- queries ----------------------------------------------------------------------

    def query_shape(self, node: Node, scope: _Scope | None, *, touch: bool = False) -> _Shape:
        """A query used as a value source: SELECT, or DML with RETURNING (in WITH)."""
        node_type, body = _only(node)
        if node_type == "SelectStmt":
            return self.select(body, scope, touch=touch)
        # A data-modifying WITH item runs to completion, RETURNING list included,
        # whether or not the rest of the statement reads its output.
        if node_type == "InsertStmt":
            return self.insert(body, scope, touch=True)
        if node_type == "UpdateStmt":
            return self.update(body, scope, touch=True)
        if node_type == "DeleteStmt":
            return self.delete(body, scope, touch=True)
        if node_type == "MergeStmt":
            return self.merge(body, scope, touch=True)
        if node_type:
            self.note(f"{node_type} inside a query is not analyzed")
        return _Shape([])

    def with_clause(self, clause: Node, scope: _Scope) -> None:
        # CTE output names may come from SELECT aliases, which the fingerprint ignores.
        self.mark(IDENTIFIERS)
        recursive = bool(clause.get("recursive"))
        ctes: list[_Cte] = []
        for item in clause.get("ctes") or ():
            body = _unwrap(item, "CommonTableExpr")
            cte = _Cte(
                str(body.get("ctename", "")),
                body.get("ctequery") or {},
                _strings(body.get("aliascolnames")),
                recursive,
            )
            cte.scope = scope
            ctes.append(cte)
            if recursive:
                scope.ctes[cte.name] = cte
        for cte in ctes:
            if not recursive:
                # A plain WITH item sees only the items before it.
                self.cte_shape(cte)
                scope.ctes[cte.name] = cte
            else:
                self.cte_shape(cte)

    def cte_shape(self, cte: _Cte) -> _Shape:
        if cte.shape is not None:
            return cte.shape
        if cte.state == "running":
            # A recursive self-reference before the non-recursive term is known.
            return _Shape([_Col(n, EMPTY) for n in cte.colnames])
        cte.state = "running"
        node_type, body = _only(cte.query)

        def provisional(left: _Shape) -> None:
            cte.shape = self._rename_shape(left, cte.colnames)

        is_set_op = body.get("op", "SETOP_NONE") != "SETOP_NONE"
        if node_type == "SelectStmt" and cte.recursive and is_set_op:
            shape = self.select(body, cte.scope, touch=False, after_left=provisional)
        else:
            shape = self.query_shape(cte.query, cte.scope)
        cte.shape = self._rename_shape(shape, cte.colnames)
        cte.state = "done"
        return cte.shape

    @staticmethod
    def _rename_shape(shape: _Shape, colnames: list[str]) -> _Shape:
        if not colnames:
            return shape
        cols = list(shape.columns)
        for i, name in enumerate(colnames):
            if i < len(cols):
                cols[i] = _Col(name, cols[i].lineage)
            else:
                cols.append(_Col(name, EMPTY))
        return _Shape(cols, shape.open)

    def _touch_shape(self, shape: _Shape) -> None:
        for col in shape.columns:
            self.touch(col.lineage)

    def select(
        self,
        body: Node,
        parent: _Scope | None,
        *,
        touch: bool,
        after_left: Callable[[_Shape], None] | None = None,
    ) -> _Shape:
        """Analyse a SELECT (or VALUES, or a set operation); return its output shape.

        ``touch``: the caller uses every output column (top-level SELECT, the
        source of INSERT ... SELECT, COPY (query) TO), so record their lineage now;
        otherwise the caller touches the lineage of the outputs it uses.
        """
        scope = _Scope(parent)
        if body.get("withClause"):
            self.with_clause(_unwrap(body["withClause"], "WithClause"), scope)
        op = body.get("op", "SETOP_NONE")
        if op != "SETOP_NONE":
            return self._set_operation(body, scope, touch=touch, after_left=after_left)
        if body.get("valuesLists"):
            return self._values(body, scope, touch=touch)
        self.from_list(body.get("fromClause"), scope, parent)
        outputs: list[_Col] = []
        opens: list[_Rte] = []
        for item in body.get("targetList") or ():
            self._target_entry(item, scope, outputs, opens)
        shape = _Shape(outputs, opens)
        if body.get("whereClause"):
            self.touch(self.expr(body["whereClause"], scope))
        for item in body.get("groupClause") or ():
            self.touch(self._group_item(item, scope, shape))
        if body.get("havingClause"):
            self.touch(self.expr(body["havingClause"], scope))
        for item in body.get("windowClause") or ():
            self.touch(self.expr(item, scope))
        distinct = body.get("distinctClause")
        if distinct:
            if all(not d for d in distinct):
                self._touch_shape(shape)  # DISTINCT compares every output column
            else:
                for item in distinct:
                    self.touch(self._sort_key(item, scope, shape, outputs_touched=touch))
        for item in body.get("sortClause") or ():
            node = _unwrap(item, "SortBy").get("node") or {}
            self.touch(self._sort_key(node, scope, shape, outputs_touched=touch))
        for key in ("limitOffset", "limitCount"):
            if body.get(key):
                self.touch(self.expr(body[key], scope))
        into = body.get("intoClause")
        if into:
            rel = into.get("rel")
            if rel:
                label = self.new_relation_label(_unwrap(rel, "RangeVar"))
                self.add_table(label)
                self.touch_columns(label, _strings(into.get("colNames")))
            touch = True
        if touch:
            self._touch_shape(shape)
        return shape

    def _target_entry(
        self,
        item: Node,
        scope: _Scope,
        outputs: list[_Col],
        opens: list[_Rte],
    ) -> None:
        res = _unwrap(item, "ResTarget")
        val = res.get("val") or {}
        name = res.get("name")
        ref = val.get("ColumnRef")
        if ref is not None and any("A_Star" in f for f in ref.get("fields", ())):
            cols, more = self.star(ref.get("fields", []), scope)
            outputs.extend(cols)
            opens.extend(more)
            return
        outputs.append(_Col(str(name) if name else _figure_colname(val), self.expr(val, scope)))

    def _values(self, body: Node, scope: _Scope, *, touch: bool) -> _Shape:
        lineages: list[set[tuple[str, str]]] = []
        for row in body.get("valuesLists") or ():
            for i, item in enumerate(row.get("List", {}).get("items", [])):
                while len(lineages) <= i:
                    lineages.append(set())
                lineages[i] |= self.expr(item, scope)
        shape = _Shape([_Col(f"column{i + 1}", frozenset(lin)) for i, lin in enumerate(lineages)])
        for item in body.get("sortClause") or ():
            node = _unwrap(item, "SortBy").get("node") or {}
            self.touch(self._sort_key(node, scope, shape, outputs_touched=True))
        if touch:
            self._touch_shape(shape)
        return shape

    def _set_operation(
        self,
        body: Node,
        scope: _Scope,
        *,
        touch: bool,
        after_left: Callable[[_Shape], None] | None,
    ) -> _Shape:
        # Without ALL, every column takes part in duplicate elimination.
        sides_touch = touch or not body.get("all")
        left = self.select(body.get("larg") or {}, scope, touch=sides_touch)
        if after_left is not None:
            after_left(left)
        right = self.select(body.get("rarg") or {}, scope, touch=sides_touch)
        columns = []
        for i, col in enumerate(left.columns):
            other = right.columns[i].lineage if i < len(right.columns) else EMPTY
            columns.append(_Col(col.name, col.lineage | other))
        shape = _Shape(columns, left.open + right.open)
        for item in body.get("sortClause") or ():
            node = _unwrap(item, "SortBy").get("node") or {}
            self.touch(self._sort_key(node, scope, shape, outputs_touched=sides_touch))
        for key in ("limitOffset", "limitCount"):
            if body.get(key):
                self.touch(self.expr(body[key], scope))
        return shape

    @staticmethod
    def _bare_name(node: Node) -> str | None:
        ref = node.get("ColumnRef")
        if ref is None:
            return None
        fields = ref.get("fields") or []
        names = _strings(fields)
        return names[0] if len(names) == 1 and len(fields) == 1 else None

    @staticmethod
    def _input_has(name: str, scope: _Scope) -> bool:
        return any(
            rte.unqualified and name not in rte.hidden and rte.has(name) is not False
            for level in scope.chain()
            for rte in level.items
        )

    def _sort_key(
        self, node: Node, scope: _Scope, shape: _Shape, *, outputs_touched: bool
    ) -> Lineage:
        """ORDER BY / DISTINCT ON: output names first, then input columns (SQL92 rule).

        A position (``ORDER BY 2``) counts as using every output column: the
        fingerprint ignores the number, so the result must not depend on it.  For
        the same reason a bare name that matches both an output (possibly by an
        alias, which the fingerprint ignores) and an input column counts as both
        when the outputs are read anyway; otherwise the result depends on output
        names and the cache is told so.
        """
        if "A_Const" in node:
            return _union(c.lineage for c in shape.columns)
        name = self._bare_name(node)
        if name is None:
            return self.expr(node, scope)
        found = [c.lineage for c in shape.columns if c.name == name]
        if not outputs_touched:
            self.mark(IDENTIFIERS)
            if found:
                return _union(found)
            return self.expr(node, scope)
        if self._input_has(name, scope):
            return _union(found) | self.unqualified(name, scope)
        if found:
            return _union(found)
        self.mark(IDENTIFIERS)
        return self.expr(node, scope)

    def _group_item(self, node: Node, scope: _Scope, shape: _Shape) -> Lineage:
        """GROUP BY: input columns first, then output names (SQL99 rule)."""
        if "A_Const" in node:
            return _union(c.lineage for c in shape.columns)
        name = self._bare_name(node)
        if name is not None and not self._input_has(name, scope):
            self.mark(IDENTIFIERS)  # resolved by output names, which may be aliases
            found = [c.lineage for c in shape.columns if c.name == name]
            if found:
                return _union(found)
        return self.expr(node, scope)

    # -- FROM -------------------------------------------------------------------------

    def from_list(self, items: list[Node] | None, level: _Scope, outer: _Scope | None) -> None:
        """Add a comma-separated FROM list (also UPDATE ... FROM, DELETE ... USING).

        The fingerprint sorts the items of such a list and loses which alias
        belongs to which relation when several are aliased.
        """
        items = items or []
        if len(items) >= 2 and sum(_aliased_relations(item) for item in items) >= 2:
            self.mark(IDENTIFIERS)
        for item in items:
            self.from_item(item, level, outer)

    def from_item(self, node: Node, level: _Scope, outer: _Scope | None) -> None:
        """Add the namespace items of one FROM entry to ``level``.

        ``outer`` is the scope a non-LATERAL subquery sees (the enclosing query,
        without this level's other FROM items).
        """
        node_type, body = _only(node)
        # The fingerprint ignores the aliases of everything but plain relations, and
        # the output names of subqueries (SELECT-list aliases).
        if node_type == "RangeSubselect" or (
            node_type not in ("RangeVar", "RangeTableSample")
            and (body.get("alias") or body.get("join_using_alias"))
        ):
            self.mark(IDENTIFIERS)
        if node_type == "RangeVar":
            level.items.append(self.range_var(body, level))
        elif node_type == "JoinExpr":
            self._join(body, level, outer)
        elif node_type == "RangeSubselect":
            self._range_subselect(body, level, outer)
        elif node_type == "RangeFunction":
            self._range_function(body, level)
        elif node_type == "RangeTableSample":
            relation = body.get("relation") or {}
            self.from_item(relation, level, outer)
            for arg in body.get("args") or ():
                self.touch(self.expr(arg, level))
            if body.get("repeatable"):
                self.touch(self.expr(body["repeatable"], level))
        elif node_type == "RangeTableFunc":
            self._range_table_func(body, level)
        elif node_type == "JsonTable":
            refname = (body.get("alias") or {}).get("aliasname")
            self.touch(self.expr(body.get("context_item"), level))
            self.touch(self.expr(body.get("passing"), level))
            names = _json_table_columns(body.get("columns"))
            level.items.append(
                _Rte(refname or "json_table", [_Col(n, EMPTY) for n in names], label="JSON_TABLE")
            )
        else:
            # JSON_TABLE and anything newer: read its expressions, columns unknown.
            alias = body.get("alias") or {}
            self.touch(self.expr(body, level))
            level.items.append(_Rte(alias.get("aliasname"), [], label=node_type, complete=False))

    def _alias(self, body: Node) -> tuple[str | None, list[str]]:
        alias = body.get("alias")
        if not alias:
            return None, []
        return alias.get("aliasname"), _strings(alias.get("colnames"))

    def _range_subselect(self, body: Node, level: _Scope, outer: _Scope | None) -> None:
        refname, colnames = self._alias(body)
        scope = level if body.get("lateral") else outer
        shape = self.query_shape(body.get("subquery") or {}, scope)
        rte = _Rte(
            refname,
            list(shape.columns),
            label=f"subquery {refname}" if refname else "subquery",
            open_items=list(shape.open),
        )
        rte.rename(colnames)
        level.items.append(rte)

    def _range_function(self, body: Node, level: _Scope) -> None:
        refname, colnames = self._alias(body)
        columns: list[_Col] = []
        complete = True
        single_scalar = False
        first_name: str | None = None
        coldeflist = _coldef_names(body.get("coldeflist"))
        for entry in body.get("functions") or ():
            items = entry.get("List", {}).get("items", [])
            if not items:
                continue
            call = items[0]
            self.touch(self.expr(call, level))
            fn_name = _function_name(call)
            first_name = first_name or fn_name
            declared = _coldef_names(items[1]) if len(items) > 1 and items[1] else None
            names = declared or self._function_outputs(call, fn_name)
            single_scalar = names == [fn_name] and not declared
            if names is None:
                complete = False
            else:
                columns.extend(_Col(n, EMPTY) for n in names)
        if coldeflist:
            columns, complete = [_Col(n, EMPTY) for n in coldeflist], True
        if refname and len(columns) == 1 and single_scalar:
            columns = [_Col(refname, EMPTY)]  # ``generate_series(1, 3) AS g``: column g
        if body.get("ordinality"):
            columns.append(_Col("ordinality", EMPTY))
        if colnames and not complete:
            columns, complete = [_Col(n, EMPTY) for n in colnames], True
        rte = _Rte(
            refname or first_name,
            columns,
            label=f"function {first_name or '?'}",
            complete=complete,
        )
        rte.rename(colnames)
        level.items.append(rte)

    def _function_outputs(self, call: Node, fn_name: str | None) -> list[str] | None:
        """Column names a function in FROM yields, or None if not known."""
        if "FuncCall" not in call or fn_name is None:
            return [fn_name] if fn_name else None
        parts = _strings(call["FuncCall"].get("funcname"))
        if self.catalog is not None and self.catalog.has_function_catalog:
            kind, overloads = self.catalog.resolve_function(parts)
            if kind == "system":
                system_outs = self.catalog.system_function_outputs(parts)
                return list(system_outs) if system_outs else [fn_name]
            if kind == "user":
                variants = {fn.out_columns for fn in overloads}
                if len(variants) == 1:
                    only = next(iter(variants))
                    return list(only) if only else [fn_name]
            return None
        if fn_name in _SINGLE_COLUMN_BUILTINS:
            return [fn_name]
        return None

    def _range_table_func(self, body: Node, level: _Scope) -> None:
        refname, colnames = self._alias(body)
        for key in ("docexpr", "rowexpr", "namespaces"):
            if body.get(key):
                self.touch(self.expr(body[key], level))
        columns = []
        for col_node in body.get("columns") or ():
            col = _unwrap(col_node, "RangeTableFuncCol")
            columns.append(_Col(str(col.get("colname", "")), EMPTY))
            if col.get("colexpr"):
                self.touch(self.expr(col["colexpr"], level))
        rte = _Rte(refname or "xmltable", columns, label="XMLTABLE")
        rte.rename(colnames)
        level.items.append(rte)

    def _join(self, body: Node, level: _Scope, outer: _Scope | None) -> None:
        start = len(level.items)
        self.from_item(body.get("larg") or {}, level, outer)
        middle = len(level.items)
        self.from_item(body.get("rarg") or {}, level, outer)
        left = [r for r in level.items[start:middle] if r.unqualified]
        right = [r for r in level.items[middle:] if r.unqualified]
        using = _strings(body.get("usingClause"))
        if body.get("isNatural"):
            using = self._natural_columns(left, right)
        merged: list[_Col] = []
        for name in using:
            lineage = _union(
                r.lookup(name)
                for r in left + right
                if name not in r.hidden and r.has(name) is not False
            )
            merged.append(_Col(name, lineage))
            self.touch(lineage)  # USING/NATURAL columns are the join condition
        for rte in left + right:
            rte.hidden.update(using)
        if merged:
            level.items.append(_Rte(None, merged, label="join", qualified=False))
        if body.get("quals"):
            self.touch(self.expr(body["quals"], level))
        using_alias = body.get("join_using_alias")
        if using_alias:
            level.items.append(
                _Rte(
                    str(using_alias.get("aliasname", "")),
                    list(merged),
                    label="join",
                    unqualified=False,
                )
            )
        refname, colnames = self._alias(body)
        if refname:
            members = level.items[start:]
            columns = list(merged)
            opens: list[_Rte] = []
            for rte in members:
                if rte.refname is None and rte.label == "join":
                    continue
                columns.extend(c for c in rte.columns if c.name not in using)
                if not rte.complete:
                    opens.append(rte)
                rte.qualified = False
                rte.unqualified = False
            for rte in members:
                rte.qualified = False
                rte.unqualified = False
            join_rte = _Rte(refname, columns, label=f"join {refname}", open_items=opens)
            join_rte.rename(colnames)
            level.items.append(join_rte)

    def _natural_columns(self, left: list[_Rte], right: list[_Rte]) -> list[str]:
        if not all(r.complete for r in left + right):
            self.note("NATURAL join columns could not be determined")
            return []
        left_names = [c.name for r in left for c in r.columns if c.name not in r.hidden]
        right_names = {c.name for r in right for c in r.columns if c.name not in r.hidden}
        seen: list[str] = []
        for name in left_names:
            if name in right_names and name not in seen:
                seen.append(name)
        return seen

    # -- stars and column references ----------------------------------------------------

    def star(self, fields: list[Node], scope: _Scope) -> tuple[list[_Col], list[_Rte]]:
        """Expand ``*`` or ``t.*`` into columns (and FROM items it could not expand)."""
        names = _strings(fields)
        if names:
            rte = self._find_qualified(names, scope)
            if rte is None:
                self.mark(IDENTIFIERS)  # may name an alias the fingerprint ignores
                self.note(f"{'.'.join(names)}.* does not name a FROM item")
                return [], []
            items = [rte]
            columns = list(rte.columns)
        else:
            items = [r for r in scope.items if r.unqualified]
            columns = [c for r in items for c in r.columns if c.name not in r.hidden]
        opens: list[_Rte] = []
        for rte in items:
            if not rte.complete:
                opens.append(rte)
                if rte.target is not None:
                    reason = "no catalog" if self.catalog is None else "not in the catalog"
                    self.note(f"* on {rte.label} not expanded ({reason})")
                elif not rte.open:
                    self.note(f"* on {rte.label} not expanded (its columns are unknown)")
        return columns, opens

    def _find_qualified(self, names: list[str], scope: _Scope) -> _Rte | None:
        for level in scope.chain():
            rte = None
            if len(names) == 1:
                rte = level.find(names[0])
            elif len(names) >= 2:
                rte = level.find(names[-1], schema=names[-2])
            if rte is not None:
                return rte
        return None

    def _column_ref_expr(self, body: Node, scope: _Scope) -> Lineage:
        fields = body.get("fields") or []
        if any("A_Star" in f for f in fields):
            columns, _ = self.star(fields, scope)
            return _union(c.lineage for c in columns)
        names = _strings(fields)
        if not names:
            return EMPTY
        if names[0] in self.variables:
            return EMPTY
        if len(names) == 1:
            return self.unqualified(names[0], scope)
        return self.qualified(names, scope)

    def unqualified(self, name: str, scope: _Scope) -> Lineage:
        for level in scope.chain():
            visible = [r for r in level.items if r.unqualified and name not in r.hidden]
            definite = [r for r in visible if r.has(name) is True]
            if definite:
                if len(definite) > 1:
                    self.note(f"column reference {name} is ambiguous")
                return _union(r.lookup(name) for r in definite)
            maybe = [r for r in visible if r.has(name) is None]
            if len(maybe) == 1:
                return maybe[0].lookup(name)
            if maybe:
                labels = ", ".join(sorted({r.label for r in maybe}))
                self.note(f"column {name} could not be attributed to one of: {labels}")
                return EMPTY
        for level in scope.chain():
            rte = level.find(name)
            if rte is not None:  # whole-row reference: ``select c from customers c``
                return _union(c.lineage for c in rte.columns)
        self.mark(IDENTIFIERS)  # may name an alias the fingerprint ignores
        self.note(f"column {name} could not be resolved")
        return EMPTY

    def qualified(self, names: list[str], scope: _Scope) -> Lineage:
        for level in scope.chain():
            candidates: list[tuple[_Rte | None, str]] = [(level.find(names[0]), names[1])]
            if len(names) >= 3:
                candidates.append((level.find(names[1], schema=names[0]), names[2]))
            if len(names) >= 4:
                candidates.append((level.find(names[2], schema=names[1]), names[3]))
            for rte, column in candidates:
                if rte is None:
                    continue
                if rte.has(column) is False:
                    self.note(f"column {column} is not a column of {rte.label}")
                    return EMPTY
                return rte.lookup(column)
        # ``(composite_column).field`` written without parentheses.
        for level in scope.chain():
            for rte in level.items:
                if rte.unqualified and names[0] not in rte.hidden and rte.has(names[0]):
                    return rte.lookup(names[0])
        self.mark(IDENTIFIERS)  # may name an alias the fingerprint ignores
        self.note(f"column {'.'.join(names)} could not be resolved")
        return EMPTY

    # -- expressions --------------------------------------------------------------------

    def expr(self, node: Any, scope: _Scope) -> Lineage:
        """Lineage of an expression: every column its value depends on.

        Nested queries are analysed on the way (their own predicates are touched);
        their output columns are part of the returned lineage, except for EXISTS.
        """
        if isinstance(node, list):
            return _union(self.expr(x, scope) for x in node)
        if not isinstance(node, dict):
            return EMPTY
        if len(node) == 1:
            key, value = next(iter(node.items()))
            if key[:1].isupper() and isinstance(value, dict):
                handler = self._expr_handlers.get(key)
                if handler is not None:
                    return handler(value, scope)
                return self._children(value, scope)
        return self._children(node, scope)

    def _children(self, body: Node, scope: _Scope) -> Lineage:
        result: set[tuple[str, str]] = set()
        for value in body.values():
            if isinstance(value, (dict, list)):
                result |= self.expr(value, scope)
        return frozenset(result)

    def _type_cast(self, body: Node, scope: _Scope) -> Lineage:
        return self.expr(body.get("arg"), scope)

    def _res_target_expr(self, body: Node, scope: _Scope) -> Lineage:
        return self.expr(body.get("val"), scope)

    def _nested_select(self, body: Node, scope: _Scope) -> Lineage:
        shape = self.select(body, scope, touch=False)
        return _union(c.lineage for c in shape.columns)

    def _sublink(self, body: Node, scope: _Scope) -> Lineage:
        shape = self.query_shape(body.get("subselect") or {}, scope)
        test = self.expr(body.get("testexpr"), scope)
        if body.get("subLinkType") == "EXISTS_SUBLINK":
            return test
        return test | _union(c.lineage for c in shape.columns)

    def _func_call(self, body: Node, scope: _Scope) -> Lineage:
        self.function_called(_strings(body.get("funcname")))
        result: set[tuple[str, str]] = set()
        for key in ("args", "agg_order", "agg_filter", "over"):
            if body.get(key):
                result |= self.expr(body[key], scope)
        return frozenset(result)

    def function_called(self, parts: list[str], *, procedure: bool = False) -> None:
        if not parts:
            return
        name = parts[-1]
        shown = ".".join(quote_ident(p) for p in parts)
        catalog = self.catalog
        if catalog is not None and catalog.has_function_catalog:
            kind, overloads = catalog.resolve_function(parts)
            if kind == "system":
                if name in _SQL_RUNNING_BUILTINS:
                    self.note(f"function {name} reads data named in its arguments; not analyzed")
                return
            self.user_calls += 1
            if kind == "user":
                if len(overloads) == 1:
                    self.note(
                        f"{overloads[0].kind} {overloads[0].signature} is called; "
                        "its body is not analyzed"
                    )
                else:
                    first = overloads[0]
                    self.note(
                        f"{first.kind} {first.signature.split('(')[0]} "
                        f"({len(overloads)} overloads) is called; its body is not analyzed"
                    )
            else:
                self.note(f"function {shown} is not in the catalog")
            return
        if (len(parts) >= 2 and parts[-2] in ("pg_catalog", "information_schema")) or (
            len(parts) == 1 and name in _COMMON_BUILTINS
        ):
            if name in _SQL_RUNNING_BUILTINS:
                self.note(f"function {name} reads data named in its arguments; not analyzed")
            return
        self.user_calls += 1
        self.note(f"function {shown} is called; its body is not analyzed")


def _no_lineage(body: Node, scope: _Scope) -> Lineage:
    return EMPTY


def _function_name(call: Node) -> str | None:
    if "FuncCall" in call:
        parts = _strings(call["FuncCall"].get("funcname"))
        return parts[-1] if parts else None
    if "SQLValueFunction" in call:
        return "?column?"
    if "CoalesceExpr" in call:
        return "coalesce"
    return None


def _aliased_relations(node: Node) -> int:
    """Aliased plain relations in a FROM item, looking through joins."""
    node_type, body = _only(node)
    if node_type == "RangeVar":
        return 1 if body.get("alias") else 0
    if node_type == "JoinExpr":
        return _aliased_relations(body.get("larg") or {}) + _aliased_relations(
            body.get("rarg") or {}
        )
    if node_type == "RangeTableSample":
        return _aliased_relations(body.get("relation") or {})
    return 0


def _json_table_columns(columns: list[Node] | None) -> list[str]:
    names: list[str] = []
    for item in columns or ():
        col = _unwrap(item, "JsonTableColumn")
        if col.get("coltype") == "JTC_NESTED":
            names.extend(_json_table_columns(col.get("columns")))
        elif col.get("name"):
            names.append(str(col["name"]))
    return names


def _coldef_names(node: Any) -> list[str]:
    if isinstance(node, dict) and "List" in node:
        node = node["List"].get("items", [])
    names = []
    for item in node or ():
        if isinstance(item, dict) and "ColumnDef" in item:
            names.append(str(item["ColumnDef"].get("colname", "")))
    return names


def _figure_colname(val: Node) -> str:
    """PostgreSQL's FigureColname for the common cases (names of unaliased outputs)."""
    node_type, body = _only(val)
    if node_type == "ColumnRef":
        names = _strings(body.get("fields"))
        return names[-1] if names else "?column?"
    if node_type == "FuncCall":
        parts = _strings(body.get("funcname"))
        return parts[-1] if parts else "?column?"
    if node_type == "TypeCast":
        inner = _figure_colname(body.get("arg") or {})
        if inner != "?column?":
            return inner
        names = _strings((body.get("typeName") or {}).get("names"))
        return names[-1] if names else "?column?"
    if node_type == "A_Indirection":
        names = _strings(body.get("indirection"))
        return names[-1] if names else _figure_colname(body.get("arg") or {})
    if node_type == "CaseExpr":
        return "case"
    if node_type == "CoalesceExpr":
        return "coalesce"
    if node_type == "SubLink" and body.get("subLinkType") == "EXPR_SUBLINK":
        sub = _unwrap(body.get("subselect") or {}, "SelectStmt")
        targets = sub.get("targetList") or []
        if targets:
            res = _unwrap(targets[0], "ResTarget")
            return str(res.get("name") or _figure_colname(res.get("val") or {}))
    if node_type == "SubLink" and body.get("subLinkType") == "EXISTS_SUBLINK":
        return "exists"
    if node_type == "SubLink" and body.get("subLinkType") == "ARRAY_SUBLINK":
        return "array"
    return "?column?"
