"""An immutable snapshot of the catalog facts statement analysis needs.

Column resolution is only as good as the knowledge of which relations exist, what
their columns are and what views are made of.  Asking the server per statement
would put a round trip on every cache miss and make results depend on timing, so
the proxy loads a :class:`Catalog` once (and again after DDL) and analyses
against that snapshot.  Every snapshot carries a :attr:`Catalog.version` digest
of its content and search path, so cached analyses are keyed by it and a new
snapshot after DDL invalidates them without any explicit cache flush.

What is kept, and why:

* relations (tables, views, materialized views, foreign tables, partitioned
  tables) with their non-dropped user columns in ``attnum`` order: ``SELECT *``
  expansion and the resolution of unqualified column names need exactly that;
* view and materialized view definitions as ``pg_get_viewdef`` prints them with
  an *empty* search path, so every relation and function in them is
  schema-qualified and can be resolved without knowing the session's path;
* user-defined functions (schema, name, identity arguments, OUT columns), so a
  call can be named precisely in the "body is not analyzed" note, and the names
  of system functions (``pg_catalog``/``information_schema``), which are known
  not to read user tables;
* the search path setting and the user it was evaluated for.

Indexes, sequences, TOAST tables and other sessions' temporary schemas are left
out: they are not what an auditor asks about.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final

import msgspec

__all__ = [
    "DEFAULT_SEARCH_PATH",
    "SYSTEM_SCHEMAS",
    "Catalog",
    "Function",
    "Relation",
    "load_catalog",
    "parse_identifier_list",
    "parse_qualified_name",
    "quote_ident",
]

DEFAULT_SEARCH_PATH: Final = '"$user", public'
"""PostgreSQL's default ``search_path`` setting."""

SYSTEM_SCHEMAS: Final = frozenset({"pg_catalog", "information_schema"})
"""Schemas whose functions are treated as built in (they read no user table)."""

RELATION_KINDS: Final = frozenset(
    {"table", "view", "matview", "foreign table", "partitioned table"}
)

_RELKIND_NAMES: Final = {
    "r": "table",
    "v": "view",
    "m": "matview",
    "f": "foreign table",
    "p": "partitioned table",
}

_PROKIND_NAMES: Final = {"f": "function", "p": "procedure", "a": "aggregate", "w": "window"}


def _keywords_needing_quotes() -> frozenset[str]:
    from pglast import keywords

    return frozenset(
        keywords.RESERVED_KEYWORDS | keywords.COL_NAME_KEYWORDS | keywords.TYPE_FUNC_NAME_KEYWORDS
    )


_QUOTE_KEYWORDS: Final = _keywords_needing_quotes()
_IDENT_START: Final = frozenset("abcdefghijklmnopqrstuvwxyz_")
_IDENT_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz_0123456789$")


def quote_ident(name: str) -> str:
    """Quote ``name`` exactly when PostgreSQL's ``quote_ident()`` would.

    Relation names in audit records are printed this way (``public."Mixed Case"``)
    so that a dotted name is unambiguous and matches what ``regclass`` prints.
    """
    if (
        name
        and name[0] in _IDENT_START
        and all(ch in _IDENT_CHARS for ch in name)
        and name not in _QUOTE_KEYWORDS
    ):
        return name
    return '"' + name.replace('"', '""') + '"'


def qualified_name(schema: str, name: str) -> str:
    """``schema.name`` with each part quoted as needed."""
    return f"{quote_ident(schema)}.{quote_ident(name)}"


def parse_identifier_list(text: str, separator: str = ",") -> list[str]:
    """Split a list of SQL identifiers the way PostgreSQL splits ``search_path``.

    Unquoted parts are trimmed and down-cased, quoted parts keep their case and
    ``""`` stands for one quote.  Used for ``search_path`` values (comma
    separated) and dotted relation names (``separator="."``).
    """
    parts: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            if parts or text.strip():
                parts.append("")
            break
        if text[i] == '"':
            buf: list[str] = []
            i += 1
            while i < n:
                if text[i] == '"':
                    if i + 1 < n and text[i + 1] == '"':
                        buf.append('"')
                        i += 2
                        continue
                    i += 1
                    break
                buf.append(text[i])
                i += 1
            parts.append("".join(buf))
            while i < n and text[i].isspace():
                i += 1
        else:
            start = i
            while i < n and text[i] != separator:
                i += 1
            parts.append(text[start:i].strip().lower())
        if i < n and text[i] == separator:
            i += 1
            continue
        break
    return [p for p in parts if p != ""]


def parse_qualified_name(name: str) -> tuple[str, ...]:
    """``'crm."Leads"'`` -> ``("crm", "Leads")``."""
    return tuple(parse_identifier_list(name, "."))


class Relation(msgspec.Struct, frozen=True):
    """A table-like relation: what a FROM item can name."""

    schema: str
    name: str
    kind: str
    """One of ``table``, ``view``, ``matview``, ``foreign table``, ``partitioned table``."""
    columns: tuple[str, ...]
    """Non-dropped user columns in ``attnum`` order."""
    definition: str | None = None
    """``SELECT`` text of a view or materialized view (fully qualified when loaded)."""
    oid: int = 0
    """``pg_class`` OID (0 in hand-built catalogs): what RowDescription names."""
    attnums: tuple[int, ...] = ()
    """``attnum`` of each of ``columns`` (dropped columns leave gaps); empty when unknown."""

    @property
    def qualified(self) -> str:
        """The name as audit records print it, e.g. ``crm.leads``."""
        return qualified_name(self.schema, self.name)


class Function(msgspec.Struct, frozen=True):
    """A user-defined function or procedure (one overload)."""

    schema: str
    name: str
    arguments: str
    """Input argument types (``oidvectortypes(proargtypes)``), e.g. ``integer, text``."""
    kind: str = "function"
    """``function``, ``procedure``, ``aggregate`` or ``window``."""
    returns_set: bool = False
    out_columns: tuple[str, ...] = ()
    """Names of OUT/INOUT/TABLE parameters: the columns it yields in FROM."""

    @property
    def signature(self) -> str:
        return f"{qualified_name(self.schema, self.name)}({self.arguments})"


class _Content:
    """The search-path independent part of a catalog, shared by all its variants.

    :meth:`Catalog.with_search_path` creates cheap variants for sessions that change
    their path; they share this object, including the memo of analysed view
    definitions (whose analysis does not depend on the session's search path).
    """

    __slots__ = (
        "digest",
        "function_outputs",
        "functions",
        "memo",
        "memo_lock",
        "relations",
        "schemas",
        "system_functions",
        "variants",
        "view_search_path",
    )

    def __init__(
        self,
        relations: Mapping[tuple[str, str], Relation],
        functions: Mapping[tuple[str, str], tuple[Function, ...]],
        system_functions: frozenset[tuple[str, str]],
        schemas: frozenset[str],
        view_search_path: tuple[str, ...],
        function_outputs: Mapping[tuple[str, str], tuple[str, ...]],
    ) -> None:
        self.relations = relations
        self.functions = functions
        self.system_functions = system_functions
        self.function_outputs = function_outputs
        self.schemas = schemas
        self.view_search_path = view_search_path
        self.memo: dict[str, Any] = {}
        self.memo_lock = threading.Lock()
        self.variants: dict[tuple[str, str], Catalog] = {}
        encoder = msgspec.msgpack.Encoder(order="deterministic")
        digest = hashlib.blake2b(digest_size=16)
        for key in sorted(relations):
            digest.update(encoder.encode(relations[key]))
        for fkey in sorted(functions):
            for fn in functions[fkey]:
                digest.update(encoder.encode(fn))
        digest.update(encoder.encode(sorted(system_functions)))
        digest.update(encoder.encode(sorted(function_outputs.items())))
        digest.update(encoder.encode(sorted(schemas)))
        digest.update(encoder.encode(view_search_path))
        self.digest = digest.hexdigest()


class Catalog:
    """Immutable catalog snapshot plus the search path names are resolved with.

    Build one with :func:`load_catalog`, or directly (tests, offline analysis)::

        Catalog([Relation("public", "t", "table", ("id", "name"))])

    ``search_path`` is the *setting* (``'"$user", public'``); :attr:`search_path`
    holds the effective list: ``$user`` replaced by ``user`` and schemas that do
    not exist dropped, as PostgreSQL does.  ``pg_catalog`` is searched first
    unless the path names it explicitly.
    """

    __slots__ = ("_content", "search_path", "search_path_setting", "user", "version")

    def __init__(
        self,
        relations: Iterable[Relation] = (),
        *,
        functions: Iterable[Function] = (),
        system_functions: Iterable[tuple[str, str] | str] = (),
        system_function_outputs: Mapping[tuple[str, str], tuple[str, ...]] | None = None,
        schemas: Iterable[str] | None = None,
        search_path: str = DEFAULT_SEARCH_PATH,
        user: str = "",
        view_search_path: str | None = None,
        _content: _Content | None = None,
    ) -> None:
        if _content is None:
            rels: dict[tuple[str, str], Relation] = {}
            for rel in relations:
                if rel.kind not in RELATION_KINDS:
                    raise ValueError(f"{rel.qualified}: unknown relation kind {rel.kind!r}")
                rels[(rel.schema, rel.name)] = rel
            funcs: dict[tuple[str, str], list[Function]] = {}
            for fn in functions:
                funcs.setdefault((fn.schema, fn.name), []).append(fn)
            system: set[tuple[str, str]] = set()
            for item in system_functions:
                system.add(("pg_catalog", item) if isinstance(item, str) else item)
            if schemas is None:
                known = {s for s, _ in rels} | {s for s, _ in funcs} | {"public"}
            else:
                known = set(schemas)
            known |= SYSTEM_SCHEMAS
            view_path = parse_identifier_list(
                search_path if view_search_path is None else view_search_path
            )
            view_path = [user if s == "$user" else s for s in view_path]
            _content = _Content(
                MappingProxyType(rels),
                MappingProxyType({k: tuple(v) for k, v in funcs.items()}),
                frozenset(system),
                frozenset(known),
                tuple(s for s in view_path if s in known),
                MappingProxyType(dict(system_function_outputs or {})),
            )
        self._content = _content
        self.user = user
        self.search_path_setting = search_path
        effective: list[str] = []
        for schema in parse_identifier_list(search_path):
            if schema == "$user":
                schema = user
            if schema in _content.schemas and schema not in effective:
                effective.append(schema)
        self.search_path: tuple[str, ...] = tuple(effective)
        digest = hashlib.blake2b(digest_size=12)
        digest.update(_content.digest.encode())
        digest.update(b"\0" + "\0".join(self.search_path).encode())
        self.version: str = digest.hexdigest()
        """Changes whenever anything that can change an analysis changes."""

    # -- derived catalogs -------------------------------------------------------------

    def with_search_path(self, search_path: str, user: str | None = None) -> Catalog:
        """The same snapshot resolved with another ``search_path`` setting.

        For sessions that ``SET search_path``; variants are memoised, so calling this
        per statement is cheap.
        """
        user = self.user if user is None else user
        if search_path == self.search_path_setting and user == self.user:
            return self
        key = (search_path, user)
        variant = self._content.variants.get(key)
        if variant is None:
            variant = Catalog(search_path=search_path, user=user, _content=self._content)
            variant = self._content.variants.setdefault(key, variant)  # first one wins
        return variant

    def _for_view_definitions(self) -> Catalog:
        """Variant used to analyse stored view definitions (fully qualified when loaded)."""
        return self.with_search_path(
            ", ".join(quote_ident(s) for s in self._content.view_search_path), self.user
        )

    # -- lookups ----------------------------------------------------------------------

    @property
    def relations(self) -> Mapping[tuple[str, str], Relation]:
        """All relations by ``(schema, name)``."""
        return self._content.relations

    @property
    def schemas(self) -> frozenset[str]:
        return self._content.schemas

    @property
    def memo(self) -> dict[str, Any]:
        """Scratch memo shared by all variants (analysed view definitions)."""
        return self._content.memo

    @property
    def memo_lock(self) -> threading.Lock:
        return self._content.memo_lock

    def search_order(self) -> tuple[str, ...]:
        """Schemas in the order unqualified names are looked up."""
        if "pg_catalog" in self.search_path:
            return self.search_path
        return ("pg_catalog", *self.search_path)

    def creation_schema(self) -> str | None:
        """Where ``CREATE TABLE t`` puts ``t``: the first existing schema of the path."""
        return self.search_path[0] if self.search_path else None

    def resolve(self, name: str | Sequence[str]) -> Relation | None:
        """Find the relation ``name`` refers to (``"t"``, ``'crm."Leads"'`` or parts).

        Parts given as a sequence are taken literally (already case-folded, as in a
        parse tree); a string is parsed like SQL (unquoted parts are down-cased).  A
        three-part name's database part is ignored.
        """
        parts = parse_qualified_name(name) if isinstance(name, str) else tuple(name)
        rels = self._content.relations
        if len(parts) >= 2:
            return rels.get((parts[-2], parts[-1]))
        if len(parts) != 1:
            return None
        for schema in self.search_order():
            rel = rels.get((schema, parts[0]))
            if rel is not None:
                return rel
        return None

    def schema_relations(self, schema: str) -> list[Relation]:
        """Relations in ``schema`` (``GRANT ... ON ALL TABLES IN SCHEMA``)."""
        return [rel for (s, _), rel in self._content.relations.items() if s == schema]

    def resolve_function(self, parts: Sequence[str]) -> tuple[str, tuple[Function, ...]]:
        """Classify a called function: ``("system", ())``, ``("user", overloads)``
        or ``("unknown", ())``.

        Overloads are not resolved by argument types: analysis results are cached by
        fingerprint, which ignores constants, so nothing may depend on them.
        """
        if not parts:
            return ("unknown", ())
        name = parts[-1]
        schemas: Sequence[str] = (parts[-2],) if len(parts) >= 2 else self.search_order()
        for schema in schemas:
            if (schema, name) in self._content.system_functions:
                return ("system", ())
            found = self._content.functions.get((schema, name))
            if found:
                return ("user", found)
        return ("unknown", ())

    def system_function_outputs(self, parts: Sequence[str]) -> tuple[str, ...] | None:
        """OUT column names of a system function (``pg_stat_get_activity``...), if any."""
        name = parts[-1]
        schemas: Sequence[str] = (parts[-2],) if len(parts) >= 2 else self.search_order()
        for schema in schemas:
            outs = self._content.function_outputs.get((schema, name))
            if outs is not None:
                return outs
        return None

    @property
    def has_function_catalog(self) -> bool:
        """False for hand-built catalogs without function information."""
        return bool(self._content.system_functions)

    def __repr__(self) -> str:
        return (
            f"<Catalog {len(self._content.relations)} relations, "
            f"search_path={self.search_path!r}, version={self.version}>"
        )


# --------------------------------------------------------------------------- loading

_SQL_RELATIONS: Final = """
SELECT n.nspname, c.relname, c.relkind::text,
       CASE WHEN c.relkind IN ('v', 'm') THEN pg_catalog.pg_get_viewdef(c.oid) END,
       c.oid::int8
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'v', 'm', 'f', 'p')
  AND n.nspname <> 'pg_toast'
  AND n.nspname NOT LIKE 'pg\\_temp\\_%'
  AND n.nspname NOT LIKE 'pg\\_toast\\_temp\\_%'
"""

_SQL_COLUMNS: Final = """
SELECT n.nspname, c.relname, a.attname, a.attnum
FROM pg_catalog.pg_attribute a
JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE a.attnum > 0 AND NOT a.attisdropped
  AND c.relkind IN ('r', 'v', 'm', 'f', 'p')
  AND n.nspname <> 'pg_toast'
  AND n.nspname NOT LIKE 'pg\\_temp\\_%'
  AND n.nspname NOT LIKE 'pg\\_toast\\_temp\\_%'
ORDER BY a.attrelid, a.attnum
"""

_SQL_FUNCTIONS: Final = """
SELECT n.nspname, p.proname, pg_catalog.oidvectortypes(p.proargtypes),
       p.prokind::text, p.proretset,
       coalesce(p.proargnames, '{}'::text[]), coalesce(p.proargmodes::text[], '{}'::text[])
FROM pg_catalog.pg_proc p
JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
"""

_SQL_SYSTEM_FUNCTIONS: Final = """
SELECT n.nspname, p.proname,
       coalesce(p.proargnames, '{}'::text[]), coalesce(p.proargmodes::text[], '{}'::text[])
FROM pg_catalog.pg_proc p
JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname IN ('pg_catalog', 'information_schema')
"""


def load_catalog(dsn: str, search_path: str | None = None) -> Catalog:
    """Load a snapshot over one connection, in one REPEATABLE READ transaction.

    One query per kind of fact (not per table), so it stays fast with thousands of
    tables.  ``search_path`` overrides the setting the connection would use; by
    default the role's/database's effective ``search_path`` and ``current_user``
    are taken from the connection, which is what the audited sessions of that role
    see unless they change it.  View definitions are fetched with an empty
    search path so they come back fully schema-qualified.
    """
    import psycopg

    with psycopg.connect(dsn, autocommit=False) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with conn.cursor() as cur:
            cur.execute("SELECT current_user, pg_catalog.current_setting('search_path')")
            row = cur.fetchone()
            assert row is not None
            user, setting = str(row[0]), str(row[1])
            cur.execute("SELECT pg_catalog.set_config('search_path', '', true)")
            cur.execute("SELECT nspname FROM pg_catalog.pg_namespace")
            schemas = {str(r[0]) for r in cur.fetchall()}
            cur.execute(_SQL_RELATIONS)
            rel_rows = cur.fetchall()
            cur.execute(_SQL_COLUMNS)
            columns: dict[tuple[str, str], list[str]] = {}
            attnums: dict[tuple[str, str], list[int]] = {}
            for nsp, rel, att, attnum in cur.fetchall():
                columns.setdefault((nsp, rel), []).append(att)
                attnums.setdefault((nsp, rel), []).append(int(attnum))
            cur.execute(_SQL_FUNCTIONS)
            fn_rows = cur.fetchall()
            cur.execute(_SQL_SYSTEM_FUNCTIONS)
            system: set[tuple[str, str]] = set()
            system_outputs: dict[tuple[str, str], set[tuple[str, ...]]] = {}
            for nsp, name, argnames, argmodes in cur.fetchall():
                system.add((nsp, name))
                outs = _out_columns(argnames, argmodes)
                if outs:
                    system_outputs.setdefault((nsp, name), set()).add(outs)
        conn.rollback()

    relations = [
        Relation(
            schema=nsp,
            name=rel,
            kind=_RELKIND_NAMES[kind],
            columns=tuple(columns.get((nsp, rel), ())),
            definition=_strip_definition(viewdef),
            oid=int(oid),
            attnums=tuple(attnums.get((nsp, rel), ())),
        )
        for nsp, rel, kind, viewdef, oid in rel_rows
    ]
    functions = []
    for nsp, name, args, kind, retset, argnames, argmodes in fn_rows:
        outs = _out_columns(argnames, argmodes)
        functions.append(
            Function(
                schema=nsp,
                name=name,
                arguments=args,
                kind=_PROKIND_NAMES.get(kind, "function"),
                returns_set=bool(retset),
                out_columns=outs,
            )
        )
    return Catalog(
        relations,
        functions=functions,
        system_functions=system,
        # Overloads with different OUT columns (rare) cannot be told apart: omit them.
        system_function_outputs={
            key: next(iter(variants))
            for key, variants in system_outputs.items()
            if len(variants) == 1
        },
        schemas=schemas,
        search_path=setting if search_path is None else search_path,
        user=user,
        view_search_path="",
    )


def _out_columns(argnames: list[str], argmodes: list[str]) -> tuple[str, ...]:
    """Names of OUT/INOUT/TABLE parameters: the columns a function yields in FROM."""
    return tuple(
        argnames[i] if i < len(argnames) and argnames[i] else f"column{i + 1}"
        for i, mode in enumerate(argmodes)
        if mode in ("o", "b", "t")
    )


def _strip_definition(viewdef: object) -> str | None:
    if viewdef is None:
        return None
    text = str(viewdef).strip()
    return text[:-1].rstrip() if text.endswith(";") else text
