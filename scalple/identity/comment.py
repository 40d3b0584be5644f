"""Identity carried in a sqlcommenter comment on the statement itself.

Applications instrumented with OpenTelemetry's sqlcommenter append a comment
such as ``/*route='%2Fusers',scalple.user_id='42',traceparent='00-...'*/`` to
every statement.  Only the ``scalple.*`` pairs matter here; the rest is
somebody else's metadata and is ignored.

The sqlcommenter serialisation (https://google.github.io/sqlcommenter/spec/):
keys and values are URL-encoded (percent-encoding), a ``'`` left in them is
escaped as ``\\'``, values are wrapped in single quotes, pairs are ``key='value'``
joined by commas (sorted by key).  A comment counts only when its whole body
has that shape: an ordinary comment that happens to mention
``scalple.user_id=42`` is prose, not a claim.

Comments are found by PostgreSQL's lexical rules (scan.l), so ``/*...*/``
inside a string literal (``'..'``, ``E'..'`` with its backslash escapes,
continued literals), a quoted identifier or a dollar-quoted body is never
mistaken for a comment: a value a user typed into a search box, inlined by a
client-side-binding driver, cannot make the audit log attribute the
statement to somebody else.  A small regex lexer does this (see "finding
comments" below); pglast's scanner (``pglast.parser.scan``, the parser
PostgreSQL itself uses) settles the rare cases where the lexer cannot tell,
and the tests check the two agree on generated input.  Text PostgreSQL
rejects (an unterminated literal or comment) yields nothing.

Cost contract
-------------
The caller calls :func:`parse_sqlcommenter` / :func:`sqlcommenter_pairs`
only for statements that contain the substring ``scalple.`` (a cheap ``in``
test; sqlcommenter writes keys verbatim, so keys must be written in lower
case to be seen).  Without ``/*`` in the text they return at once.  Otherwise
a 330-character ORM statement with a five-key comment costs about 6 us
(pglast's scanner alone: about 20 us); results for the 256 most recent
(text, index) pairs are cached.  The lexer is linear in the text (no
backtracking regex on client input), and only a multi-statement text with
an ``index`` is parsed (pglast ``parse_sql_json``) to find statement bounds.
"""

from __future__ import annotations

import re
from functools import lru_cache
from urllib.parse import unquote

import msgspec
from pglast import parser as pg_parser

__all__ = ["mentioned_outside_comments", "parse_sqlcommenter", "sqlcommenter_pairs"]

PREFIX = "scalple."

# A URL-encoded key: unreserved characters, percent escapes and the few
# sub-delimiters JavaScript's encodeURIComponent leaves alone.  No quotes,
# no '=' or ',', no blank, no '/' (so a nested comment never parses as a key).
_KEY = r"[A-Za-z0-9_.~%*!()+\-]+"
# A quoted value: anything but an unescaped quote; backslash escapes one
# character.  Written as "unrolled loops" (a character class run, then
# escape + run ...), which the regex engine walks fast and without
# backtracking.
_VALUE = r"'([^'\\]*(?:\\.[^'\\]*)*)'"
# One pair and what follows it: a comma, or the end of the body.
_ITEM_RE = re.compile(rf"\s*({_KEY})={_VALUE}\s*(,|\Z)", re.DOTALL)
_UNESCAPE_RE = re.compile(r"\\(.)", re.DOTALL)


def _decode(text: str) -> str:
    """Undo sqlcommenter's escaping: ``\\'`` first, then percent-encoding."""
    if "\\" in text:
        text = _UNESCAPE_RE.sub(r"\1", text)
    if "%" in text:
        text = unquote(text, errors="replace")
    return text


def _comment_pairs(body: str) -> tuple[tuple[str, str], ...] | None:
    """The ``scalple.*`` pairs of a sqlcommenter comment body, decoded, keys
    lower-cased, in order.

    Returns None when the body is not entirely in sqlcommenter form (an
    ordinary comment, a malformed or truncated one), so that it is ignored
    as a whole rather than half-trusted.  Only ``scalple.*`` pairs are
    decoded: the other keys (``traceparent``, ``route``) are not ours.
    """
    out: list[tuple[str, str]] = []
    pos = 0
    last = ""
    for m in _ITEM_RE.finditer(body):
        if m.start() != pos:
            return None  # something between pairs that is not a pair
        key, value, last = m.groups()
        pos = m.end()
        if key[:8].lower() == PREFIX:
            out.append((_decode(key).lower(), _decode(value)))
    if pos != len(body) or last != "":
        return None  # no pair at all, trailing garbage, or a dangling comma
    return tuple(out)


# --- finding comments ----------------------------------------------------------
#
# A lexer for the one question asked here, "where are the /* */ comments?",
# following PostgreSQL's scan.l (standard_conforming_strings on, as pglast's
# scanner and every modern server assume).  pglast's scanner answers the same
# question but builds a Python object per token: about 20 us for an ORM
# statement, on the event loop, for every statement that carries a comment.
# This one lets the regex engine skip ordinary code and stops only at
# literals, quoted identifiers, comments and semicolons (about 2 us).  Where
# PostgreSQL's rules depend on what precedes a "$" or an "E'" (a number, a
# parameter or an identifier), it hands over to pglast.  tests/test_identity.py
# checks it against pglast's scanner on generated inputs.

_IDENT_CHAR = r"A-Za-z0-9_$\x80-\U0010FFFF"  # scan.l ident_cont
_LETTER = r"A-Za-z_\x80-\U0010FFFF"  # scan.l ident_start (also dolq_start)
_DOLQ_CONT = r"A-Za-z0-9_\x80-\U0010FFFF"
# scan.l whitespace_with_newline: the only thing allowed between the parts of
# a continued string literal ('a'<newline>'b' is 'ab'); the continued parts
# of an E'..' string are E'..' too.  Atomic: the longest run is the only
# candidate, and no backtracking into it (nested quantifiers over blanks
# would be exponential on hostile input).
_CONTINUE = r"(?>(?:[ \t\f\v]|--[^\n\r]*+)*+[\n\r](?:[ \t\n\r\f\v]|--[^\n\r]*+[\n\r])*+)"
_E_BODY = r"'[^'\\]*+(?:(?:\\.|'')[^'\\]*+)*+'"

# Where the lexer may have something to look at.  A plain character set, not
# an alternation: the regex engine skips ordinary code three times faster.
_CANDIDATE = re.compile(r"['\"$;/-]")
_STANDARD = re.compile(r"'[^']*+(?:''[^']*+)*+'")  # also B'', X'', N'', U&''
_E_STRING = re.compile(rf"[eE]{_E_BODY}(?:{_CONTINUE}{_E_BODY})*+", re.DOTALL)
_QUOTED = re.compile(r'"[^"]*+(?:""[^"]*+)*+"')  # also U&""
_DOLLAR = re.compile(rf"\$(?:[{_LETTER}][{_DOLQ_CONT}]*+)?\$")
_LINE = re.compile(r"--[^\n\r]*+")
_COMMENT_EDGE = re.compile(r"/\*|\*/")
_IDENT_BEFORE = re.compile(rf"[{_IDENT_CHAR}]")
_LETTER_BEFORE = re.compile(rf"[{_LETTER}]")


class _Ambiguous(Exception):
    """The fast lexer cannot tell; ask PostgreSQL's own scanner."""


class _Lexed:
    """Block comments as ``(start, end_exclusive)``, ``;`` positions, and
    trivia (block and line comments) for telling statements apart."""

    __slots__ = ("comments", "semicolons", "trivia")

    def __init__(self) -> None:
        self.comments: list[tuple[int, int]] = []
        self.semicolons: list[int] = []
        self.trivia: list[tuple[int, int]] = []


def _lex(sql: str) -> _Lexed | None:
    """Find comments and semicolons outside literals; None if the text has an
    unterminated literal or comment (PostgreSQL rejects it: nothing counts).

    What precedes a ``$`` or an ``E'`` decides what it is: inside an
    identifier (``a$b$``, ``namE'x'``) it is part of the name.  A character
    that ended the previous literal never starts an identifier, hence
    ``token_end``.  A digit or ``$`` just before (a number, a parameter or
    an identifier?) is left to pglast: :class:`_Ambiguous`.
    """
    out = _Lexed()
    candidate = _CANDIDATE.search
    pos = 0
    token_end = 0  # end of the last literal or comment consumed
    while True:
        c = candidate(sql, pos)
        if c is None:
            return out
        start = c.start()
        first = sql[start]
        if first == "'":
            m = None
            if start > token_end and sql[start - 1] in "eE":
                e = start - 1
                if e == token_end or not _IDENT_BEFORE.match(sql, e - 1):
                    m = _E_STRING.match(sql, e)  # E starts a token: E'..'
                    if m is None:
                        return None
                elif not _LETTER_BEFORE.match(sql, e - 1):
                    raise _Ambiguous  # "x1e'..'" (a name) vs "1e'..'" (trailing junk)
            if m is None:
                m = _STANDARD.match(sql, start)
                if m is None:
                    return None
            end = m.end()
        elif first == '"':
            m = _QUOTED.match(sql, start)
            if m is None:
                return None
            end = m.end()
        elif first == "$":
            m = _DOLLAR.match(sql, start)
            if m is None:
                pos = start + 1  # $1, or a "$" in a name
                continue
            if start > token_end and _IDENT_BEFORE.match(sql, start - 1):
                if sql[start - 1] == "$" or _LETTER_BEFORE.match(sql, start - 1):
                    pos = start + 1  # a "$" inside a name such as a$b$
                    continue
                raise _Ambiguous  # "1$$" (number, then a string) vs "x1$$" (a name)
            delimiter = m.group(0)
            close = sql.find(delimiter, m.end())
            if close < 0:
                return None
            end = close + len(delimiter)
        elif first == ";":
            out.semicolons.append(start)
            end = start + 1
        elif first == "-":
            if not sql.startswith("-", start + 1):
                pos = start + 1  # minus, not a comment
                continue
            end = _LINE.match(sql, start).end()  # type: ignore[union-attr]
            out.trivia.append((start, end))
        else:
            if not sql.startswith("*", start + 1):
                pos = start + 1  # division, not a comment
                continue
            end = _comment_end(sql, start)
            if end < 0:
                return None
            out.comments.append((start, end))
            out.trivia.append((start, end))
        pos = token_end = end


def _comment_end(sql: str, start: int) -> int:
    """End (exclusive) of the block comment opened at ``start``; -1 when it
    is never closed.

    Comments nest in PostgreSQL.  The usual comment has no ``/*`` inside, so
    the first ``*/`` ends it; otherwise count.  (An opener overlapping the
    closer, ``/*/``, opens: the scanner sees ``/*`` first, and so does the
    search range here, which ends just past the closer's ``*``.)
    """
    close = sql.find("*/", start + 2)
    if close < 0:
        return -1
    if sql.find("/*", start + 2, close + 1) < 0:
        return close + 2
    depth = 0
    for edge in _COMMENT_EDGE.finditer(sql, start):
        if edge.group(0) == "/*":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return edge.end()
    return -1


def _lex_with_pglast(sql: str) -> _Lexed | None:
    """The same answer from pglast's scanner (the authority; slower)."""
    try:
        tokens = pg_parser.scan(sql)
    except Exception:
        return None
    out = _Lexed()
    for token in tokens:
        if token.name == "C_COMMENT":
            out.comments.append((token.start, token.end + 1))
            out.trivia.append((token.start, token.end + 1))
        elif token.name == "SQL_COMMENT":
            out.trivia.append((token.start, token.end + 1))
        elif token.name == "ASCII_59":
            out.semicolons.append(token.start)
    return out


@lru_cache(maxsize=64)
def _find_comments(sql: str) -> _Lexed | None:
    """Comments and semicolons of ``sql`` outside literals (see above).

    Cached: the identity layer asks twice about the same text (the comment
    channel before the statement runs, the SET detector after).  Callers
    must not modify the result.
    """
    try:
        return _lex(sql)
    except _Ambiguous:
        return _lex_with_pglast(sql)


def mentioned_outside_comments(sql: str, word: str) -> bool:
    """Whether ``word`` (lower case) occurs in ``sql``, case-insensitively,
    other than inside comments.

    Lets the SET detector skip parsing a statement whose only ``scalple.``
    is in its sqlcommenter comment (every statement of an instrumented
    application).  True when unsure (text the lexer rejects), so that the
    parser decides.  Never raises.
    """
    if sql.isascii():
        low = sql.lower()
        hits: list[int] = []
        at = low.find(word)
        while at >= 0:
            hits.append(at)
            at = low.find(word, at + 1)
    else:
        # str.lower() may change the length of non-ASCII text ("İ" becomes
        # two characters): take positions from the original, as the lexer.
        hits = [m.start() for m in re.finditer(re.escape(word), sql, re.IGNORECASE)]
    if not hits:
        return False
    try:
        lexed = _find_comments(sql)
    except Exception:  # pragma: no cover - defensive
        return True
    if lexed is None:
        return True
    trivia = lexed.trivia
    return any(not any(start <= at < end for start, end in trivia) for at in hits)


def _several_statements(sql: str, lexed: _Lexed) -> bool:
    """Whether code follows the first ``;`` (not just comments, blanks, ``;``).

    A single statement with a trailing ``;`` is the common case and needs no
    parse to know which statement a comment belongs to.
    """
    if not lexed.semicolons:
        return False
    pos = lexed.semicolons[0] + 1
    for start, end in lexed.trivia:
        if end <= pos:
            continue
        if sql[pos:start].strip(" \t\n\r\f\v;"):
            return True
        pos = end
    return bool(sql[pos:].strip(" \t\n\r\f\v;"))


def _statement_bounds(sql: str) -> list[int] | None:
    """Character offset where each statement of ``sql`` ends (its ``;``).

    Uses the real parser so the split is exactly PostgreSQL's (function
    bodies, ``BEGIN ATOMIC`` blocks and empty statements included).  None
    when the text does not parse: such a query fails as a whole.
    """
    try:
        decoded = msgspec.json.decode(pg_parser.parse_sql_json(sql))
    except Exception:
        return None
    raw = decoded.get("stmts", []) if isinstance(decoded, dict) else []
    encoded = None if sql.isascii() else sql.encode("utf-8")
    bounds: list[int] = []
    for stmt in raw:
        start = int(stmt.get("stmt_location", 0))
        length = int(stmt.get("stmt_len", 0))
        if length == 0:
            bounds.append(len(sql))
            continue
        end_byte = start + length
        # parser locations are UTF-8 byte offsets; the lexers work in characters.
        if encoded is None:
            bounds.append(end_byte)
        else:
            bounds.append(len(encoded[:end_byte].decode("utf-8", errors="ignore")))
    return bounds


@lru_cache(maxsize=256)
def _scalple_pairs(sql: str, index: int | None) -> tuple[tuple[str, str], ...]:
    """The ``scalple.*`` pairs of the sqlcommenter comments of ``sql``.

    With ``index``, only comments belonging to that statement of a
    multi-statement string count: statement *k* owns the text after the
    ``;`` that ends statement *k-1* up to its own ``;``, and the last
    statement also owns whatever follows the final ``;`` (sqlcommenter
    appends after the text it is given, which may end in ``;``).
    """
    if "/*" not in sql:
        return ()
    lexed = _find_comments(sql)
    if lexed is None:
        return ()  # unterminated literal or comment: the statement fails anyway
    found: list[tuple[int, tuple[tuple[str, str], ...]]] = []
    for start, end in lexed.comments:
        text = sql[start:end]
        if PREFIX not in text.lower():
            continue
        mine = _comment_pairs(text[2:-2])
        if mine:
            found.append((start, mine))
    if not found:
        return ()
    if index is not None:
        if _several_statements(sql, lexed):
            bounds = _statement_bounds(sql)
            if not bounds or index >= len(bounds):
                return ()
            lower = bounds[index - 1] if index > 0 else -1
            upper = bounds[index] if index < len(bounds) - 1 else len(sql) + 1
            found = [(pos, pairs) for pos, pairs in found if lower < pos < upper]
        elif index != 0:
            return ()
    return tuple(pair for _, pairs in found for pair in pairs)


def sqlcommenter_pairs(sql: str, index: int | None = None) -> tuple[tuple[str, str], ...]:
    """``(key, value)`` pairs with ``scalple.*`` keys (lower-cased, decoded),
    in the order they appear; cached, never raises.

    ``index`` restricts the search to one statement of a multi-statement
    simple Query (0-based, PostgreSQL's order); None looks at the whole text.
    """
    try:
        return _scalple_pairs(sql, index)
    except Exception:  # pragma: no cover - defensive: identity must never break relaying
        return ()


def parse_sqlcommenter(sql: str, index: int | None = None) -> dict[str, str]:
    """The ``scalple.*`` settings of the sqlcommenter comment(s) in ``sql``.

    Keys keep their ``scalple.`` prefix and are lower-cased; values are
    decoded (``%40`` -> ``@``, ``\\'`` -> ``'``).  Other sqlcommenter keys,
    ordinary comments, malformed comments and anything inside literals are
    ignored; when several comments name the same key the last one wins.
    Never raises.  See the module docstring for the cost contract: call it
    only when ``"scalple." in sql``.
    """
    return dict(sqlcommenter_pairs(sql, index))
