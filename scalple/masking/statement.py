"""Masking one statement for its record: the query text, the parameters, the
data subjects it names.

Runs in the audit worker, after analysis.  The expensive part, deciding
which constant of a statement belongs to which column, is done once per
statement shape (fingerprint and literal count) by scalple/masking/plan.py
and kept as literal *ordinals*; each statement then costs one pass of the
Cython lexer (``scan_literals``) plus the masks it applies.  When the shape
cannot be planned (no parse, analysis off, an internal error) and PII
columns are configured, every literal is masked: a record may say less than
it could, never more.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Final, Literal

import msgspec

from scalple._wire import LIT_NUMBER, literal_text, scan_literals
from scalple.analysis.catalog import Catalog
from scalple.logsafe import where
from scalple.masking.masks import REDACTED, Masker, mask_literal_token
from scalple.masking.plan import ColumnRole, plan_masking

__all__ = ["MaskedStatement", "StatementMasker", "SubjectSet", "canonical_number"]

log = logging.getLogger(__name__)

LiteralsRule = Literal["pii", "all", "none"]

_PLAN_CACHE_SIZE: Final = 4096
# plan_masking's notes for a statement it could not plan at all.
_UNPLANNED: Final = ("statement could not be parsed", "internal error while planning")
# Statements whose constants reach columns only through something the plan
# cannot see (a prepared statement, a procedure, code in a body): masked whole.
_OPAQUE: Final = re.compile(
    r"(?is)\A(?:\s|/\*.*?\*/|--[^\n]*(?:\n|\Z))*"
    r"(?:execute|call|do|prepare"
    r"|create\s+(?:or\s+replace\s+)?(?:function|procedure|trigger|rule))\b"
)


class SubjectSet:
    """The data subjects of one statement, bounded."""

    __slots__ = ("_seen", "kinds", "limit", "tags", "truncated")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.tags: dict[str, None] = {}  # insertion-ordered set, at most ``limit``
        self._seen: set[str] = set()  # every distinct tag (what gets here is bounded)
        self.kinds: set[str] = set()
        self.truncated = False

    @property
    def count(self) -> int:
        return len(self._seen)

    def add(self, tag: str, kind: str) -> None:
        if tag in self._seen:
            return
        self._seen.add(tag)
        self.kinds.add(kind)
        if len(self.tags) < self.limit:
            self.tags[tag] = None
        else:
            self.truncated = True


class MaskedStatement(msgspec.Struct):
    """What the record shows instead of the raw statement."""

    query: str | None
    params: list[str | None] | None
    masked_fields: list[dict[str, str]]
    notes: list[str]


class _Shape(msgspec.Struct):
    """A planned statement shape: roles by literal ordinal and by parameter."""

    literals: dict[int, ColumnRole]
    params: dict[int, ColumnRole]
    output: dict[int, ColumnRole]
    notes: list[str]
    signs: dict[int, int] = {}  # ordinal -> bytes back to a folded minus sign


_EMPTY_SHAPE: Final = _Shape({}, {}, {}, [])
_UNKNOWN_PARAMS: Final = "statement text unknown: every parameter masked"
_HIDDEN_QUERY: Final = "[query hidden: standard_conforming_strings is off]"
_ESCAPE_NOTE: Final = (
    "standard_conforming_strings was off: constants cannot be told apart, query hidden"
)


class StatementMasker:
    """Applies ``[pii]``, ``[subjects]`` and ``[log] literals`` to statements."""

    def __init__(
        self,
        pii: Mapping[str, str],
        subjects: Mapping[str, str],
        literals: LiteralsRule,
        masker: Masker | None,
    ) -> None:
        self.pii = dict(pii)
        self.subjects = dict(subjects)
        self.literals = literals
        self.masker = masker
        self.active = bool(pii or subjects) or literals == "all"
        self._shapes: OrderedDict[tuple[bytes, str], _Shape | None] = OrderedDict()

    # -- shapes --------------------------------------------------------------

    def _shape(
        self,
        text: str,
        data: bytes,
        tokens: Sequence[tuple[int, int, int]],
        catalog: Catalog | None,
    ) -> _Shape | None:
        """The plan of this statement's shape, from the cache when seen before.

        The shape is the text with every literal's value and every comment
        taken out (``_skeleton``): pglast's fingerprint is not enough, as it
        is the same for reordered columns and for ``$1`` against a constant,
        and a plan is a list of positions.
        """
        if not (self.pii or self.subjects):
            return _EMPTY_SHAPE
        version = catalog.version if catalog is not None else ""
        key = (_skeleton(data, tokens), version)
        shapes = self._shapes
        if key in shapes:
            shapes.move_to_end(key)
            return shapes[key]
        shape: _Shape | None
        try:
            plan = plan_masking(text, catalog, self.pii, self.subjects)
        except Exception as exc:  # the plan must never cost a record
            log.error("masking plan failed (%s); masking every literal", where(exc))
            plan = None
        if (
            plan is None
            or any(note.startswith(_UNPLANNED) for note in plan.unresolved)
            or _OPAQUE.match(text)
        ):
            shape = None
        else:
            starts = [start for start, _end, _kind in tokens]
            ordinal = {start: i for i, start in enumerate(starts)}
            literals: dict[int, ColumnRole] = {}
            signs: dict[int, int] = {}
            for offset, role in plan.literals.items():
                index = ordinal.get(offset)
                if index is None and data[offset : offset + 1] == b"-":
                    # A folded negative number (-5, - 5): the literal after
                    # the sign, masked and tagged with its sign.
                    after = bisect.bisect_right(starts, offset)
                    if after < len(starts):
                        index = after
                        signs[after] = starts[after] - offset
                if index is not None:
                    literals[index] = role
            shape = _Shape(
                literals, dict(plan.params), dict(plan.output), list(plan.unresolved), signs
            )
        shapes[key] = shape
        if len(shapes) > _PLAN_CACHE_SIZE:
            shapes.popitem(last=False)
        return shape

    # -- one statement -----------------------------------------------------

    def apply(
        self,
        text: str | None,
        params: list[str | None] | None,
        *,
        catalog: Catalog | None,
        planned: bool,
        subjects: SubjectSet,
        escape_strings: bool = False,
    ) -> MaskedStatement:
        """Mask ``text`` and ``params``; add the subjects they name to ``subjects``.

        ``planned`` is False when analysis did not run for this statement:
        the shape is then not trusted and, with PII configured, every literal
        and parameter is masked.  The same holds without a catalog: then an
        unqualified column cannot be known not to be a PII column.
        """
        if not self.active:
            return MaskedStatement(text, params, [], [])
        if escape_strings and text is not None and (self.pii or self.literals == "all"):
            # The lexer reads standard strings; with backslash escapes in
            # '...' it could leave a value outside any literal: show nothing.
            return MaskedStatement(_HIDDEN_QUERY, _hidden(params), [], [_ESCAPE_NOTE])
        if text is None:
            # A statement the proxy never saw prepared: nothing says which
            # column a parameter feeds, so with PII configured none is kept.
            if params and (self.pii or self.literals == "all"):
                return MaskedStatement(None, _hidden(params), [], [_UNKNOWN_PARAMS])
            return MaskedStatement(text, params, [], [])
        data = text.encode("utf-8", "surrogateescape")
        tokens = scan_literals(data)
        trusted = planned and catalog is not None
        shape = self._shape(text, data, tokens, catalog) if trusted else None
        notes: list[str] = []
        fail_safe = shape is None and bool(self.pii)
        if fail_safe:
            notes.append("statement not analysed: every constant and parameter masked")
        masked_fields: list[dict[str, str]] = []
        pieces: list[bytes] = []
        position = 0
        for ordinal, (start, end, kind) in enumerate(tokens):
            role = None
            if shape is not None:
                role = shape.literals.get(ordinal)
                back = shape.signs.get(ordinal)
                if role is not None and back is not None and start - back >= position:
                    start -= back  # the sign belongs to the value
            replacement = self._replace(
                data, start, end, kind, role, fail_safe, masked_fields, subjects
            )
            if replacement is not None:
                pieces.append(data[position:start])
                pieces.append(replacement)
                position = end
        if pieces:
            pieces.append(data[position:])
            text = b"".join(pieces).decode("utf-8", "replace")
        if params:
            params = self._params(params, shape, fail_safe, masked_fields, subjects)
        if shape is not None:
            notes.extend(shape.notes)
        return MaskedStatement(text, params, masked_fields, notes)

    def _replace(
        self,
        data: bytes,
        start: int,
        end: int,
        kind: int,
        role: ColumnRole | None,
        fail_safe: bool,
        masked_fields: list[dict[str, str]],
        subjects: SubjectSet,
    ) -> bytes | None:
        """The masked token for one literal, or None to keep it."""
        if role is None:
            if fail_safe or self.literals == "all":
                return mask_literal_token(kind, data[start:end], REDACTED)
            return None
        if data[start : start + 1] == b"-":
            digits = data[start + 1 : end].lstrip()  # after the sign: the number token
            value = "-" + literal_text(digits, 0, len(digits), kind)
        else:
            value = literal_text(data, start, end, kind)
        if kind == LIT_NUMBER:
            value = canonical_number(value)
        masked = self._role_value(role, value, masked_fields, subjects)
        if masked is None:
            return None
        return mask_literal_token(kind, data[start:end], masked)

    def _role_value(
        self,
        role: ColumnRole,
        value: str,
        masked_fields: list[dict[str, str]],
        subjects: SubjectSet,
    ) -> str | None:
        """What a value of ``role``'s column is shown as (None: as it is).

        An array (``= ANY('{a,b}')``, ``= ANY($1)``) is taken element by
        element: each is a value of the column.
        """
        elements = _array_elements(value)
        if elements is not None:
            items = [self._role_value(role, item, masked_fields, subjects) for item in elements]
            if all(item is None for item in items):
                return None
            kept = [s if s is not None else e for s, e in zip(items, elements, strict=True)]
            return "{" + ",".join(_array_quote(item) for item in kept) + "}"
        masker = self.masker
        tag: str | None = None
        if role.subject is not None and masker is not None:
            tag = masker.subject_tag(role.subject, value)
            subjects.add(tag, role.subject)
        if role.mask is not None:
            masked = REDACTED if masker is None else masker.mask(role.mask, value)
            masked_fields.append({"column": role.column, "mask": role.mask, "value": masked})
            return masked
        if tag is not None and self.literals != "none":
            return tag  # the subject's tag stands for its raw id
        if self.literals == "all":
            return REDACTED
        return None

    def _params(
        self,
        params: list[str | None],
        shape: _Shape | None,
        fail_safe: bool,
        masked_fields: list[dict[str, str]],
        subjects: SubjectSet,
    ) -> list[str | None]:
        shown: list[str | None] = []
        for number, value in enumerate(params, start=1):
            if value is None:
                shown.append(None)
                continue
            role = shape.params.get(number) if shape is not None else None
            if role is None:
                keep = not fail_safe and self.literals != "all"
                shown.append(value if keep else REDACTED)
                continue
            masked = self._role_value(role, value, masked_fields, subjects)
            shown.append(value if masked is None else masked)
        return shown

    def output_roles(self, text: str | None, catalog: Catalog | None) -> dict[int, ColumnRole]:
        """Result columns (by position) that are subject or PII columns."""
        if not self.subjects or text is None:
            return {}
        data = text.encode("utf-8", "surrogateescape")
        shape = self._shape(text, data, scan_literals(data), catalog)
        return shape.output if shape is not None else {}


# Between two literals there are only keywords, names, operators, quoted
# identifiers and comments: a quoted identifier is kept whole (it may hold
# "--" or "/*"), a comment is dropped (sqlcommenter's differ per request).
_GAP: Final = re.compile(rb'"(?:[^"]|"")*"?|/\*|--[^\n]*|[^"/-]+|[/-]')


def _without_comments(gap: bytes) -> bytes:
    kept: list[bytes] = []
    position = 0
    while position < len(gap):
        match = _GAP.match(gap, position)
        assert match is not None  # the pattern matches every byte
        piece = match.group()
        if piece == b"/*":
            position = _comment_end(gap, match.end())
            kept.append(b" ")
            continue
        kept.append(b" " if piece.startswith(b"--") else piece)
        position = match.end()
    return b"".join(kept)


def _comment_end(gap: bytes, position: int) -> int:
    """After the ``*/`` closing a (nested) block comment opened before ``position``."""
    depth = 1
    while depth and position < len(gap):
        if gap.startswith(b"/*", position):
            depth += 1
            position += 2
        elif gap.startswith(b"*/", position):
            depth -= 1
            position += 2
        else:
            position += 1
    return position


def _skeleton(data: bytes, tokens: Sequence[tuple[int, int, int]]) -> bytes:
    """The statement without literal values and comments: what its plan
    depends on (quoted identifiers kept whole: two statements differing in
    one must never share a plan)."""
    parts: list[bytes] = []
    position = 0
    for start, end, kind in tokens:
        parts.append(_without_comments(data[position:start]))
        parts.append(b"\x00%d" % kind)
        position = end
    parts.append(_without_comments(data[position:]))
    return hashlib.blake2b(b"".join(parts), digest_size=16).digest()


def _array_elements(value: str) -> list[str] | None:
    """The elements of a one-dimensional PostgreSQL array literal, or None."""
    if len(value) < 2 or value[0] != "{" or value[-1] != "}":
        return None
    body = value[1:-1]
    if not body:
        return []
    elements: list[str] = []
    current: list[str] = []
    quoted = False
    escaped = False
    was_quoted = False
    for char in body:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
            was_quoted = True
        elif char == "," and not quoted:
            elements.append("".join(current) if was_quoted else "".join(current).strip())
            current, was_quoted = [], False
        elif char in "{}" and not quoted:
            return None  # nested arrays: not a list of column values
        else:
            current.append(char)
    if quoted:
        return None
    elements.append("".join(current) if was_quoted else "".join(current).strip())
    return elements


def _array_quote(element: str) -> str:
    """An array element as PostgreSQL's array input reads it back."""
    if element and all(c.isalnum() or c in "_.@*-+" for c in element):
        return element
    return '"' + element.replace("\\", "\\\\").replace('"', '\\"') + '"'


_INTEGER: Final = re.compile(r"\A([+-]?)0*(\d+)(?:\.0*)?\Z")


def canonical_number(value: str) -> str:
    """A numeric constant as PostgreSQL prints the integer it stands for
    (``042``, ``42.0`` -> ``42``), so that a subject named by a constant
    and the same subject read from a result row share one tag.  Only
    number tokens get this: ``'042'`` may be a text id of its own."""
    number = _INTEGER.match(value)
    if number is None:
        return value
    digits = number.group(2)
    return ("-" if number.group(1) == "-" and digits.strip("0") else "") + digits


def _hidden(params: list[str | None] | None) -> list[str | None] | None:
    """Every parameter masked (NULLs stay NULL: they hold nothing)."""
    if params is None:
        return None
    return [None if value is None else REDACTED for value in params]
