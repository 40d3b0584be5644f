"""The literal lexer (scalple._wire.scan_literals / literal_text) and the masks.

The lexer decides what the audit log never sees, so it is tested three ways:
tables of every literal form and skip rule, property tests on arbitrary bytes
(never raises, never out of bounds), and a cross-check against libpg_query,
PostgreSQL's own scanner and parser as shipped in pglast.

Finding on pglast's offsets, pinned by ``test_pglast_location_units``:
``pglast.parser.parse_sql_json`` hands over libpg_query's ``location`` fields
untouched, and those are *byte* offsets into the UTF-8 text, the same unit
as ``scan_literals``.  ``pglast.parser.scan`` instead converts its token
offsets to *character* indexes of the Python string, with an inclusive end.
The two agree only on ASCII text, so the differential test below sticks to
ASCII and the corpus check uses the JSON locations.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from blake3 import blake3
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pglast import parser as pg

from scalple._wire import (
    LIT_BIT_STRING,
    LIT_DOLLAR,
    LIT_ESCAPE_STRING,
    LIT_NUMBER,
    LIT_STRING,
    LIT_UNICODE_STRING,
    literal_text,
    scan_literals,
)
from scalple.masking.masks import (
    KEY_CONTEXT,
    MASKS,
    Masker,
    key_from_file,
    mask_literal_token,
)

S, E, D, N, B, U = (
    LIT_STRING,
    LIT_ESCAPE_STRING,
    LIT_DOLLAR,
    LIT_NUMBER,
    LIT_BIT_STRING,
    LIT_UNICODE_STRING,
)
KINDS = {S, E, D, N, B, U}


def lits(sql: str | bytes) -> list[tuple[str, int]]:
    """The literal tokens of ``sql`` as (token text, kind)."""
    data = sql.encode() if isinstance(sql, str) else sql
    return [(data[a:b].decode("utf-8", "replace"), k) for a, b, k in scan_literals(data)]


def values(sql: str | bytes) -> list[str]:
    """The value of every literal of ``sql``."""
    data = sql.encode() if isinstance(sql, str) else sql
    return [literal_text(data, a, b, k) for a, b, k in scan_literals(data)]


# ---------------------------------------------------------------------------
# Constants and API shape


def test_kind_constants() -> None:
    assert (S, E, D, N, B, U) == (1, 2, 3, 4, 5, 6)


def test_accepts_bytes_like() -> None:
    text = b"select 'a', 1"
    expected = [(7, 10, S), (12, 13, N)]
    assert scan_literals(text) == expected
    assert scan_literals(bytearray(text)) == expected
    assert scan_literals(memoryview(text)) == expected
    assert scan_literals(memoryview(b"xx" + text)[2:]) == expected
    assert scan_literals(b"") == []
    assert scan_literals(bytearray()) == []
    assert scan_literals(memoryview(b"")) == []
    assert literal_text(bytearray(text), 7, 10, S) == "a"
    assert literal_text(memoryview(text), 12, 13, N) == "1"


def test_rejects_text_and_bad_arguments() -> None:
    with pytest.raises(TypeError):
        scan_literals("select 1")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        literal_text(b"'a'", 0, 4, S)
    with pytest.raises(ValueError):
        literal_text(b"'a'", 2, 1, S)
    with pytest.raises(ValueError):
        literal_text(b"'a'", 0, 3, 99)


# ---------------------------------------------------------------------------
# Literal forms

FORMS: list[tuple[str, list[tuple[str, int]]]] = [
    # standard strings
    ("select 'abc'", [("'abc'", S)]),
    ("select ''", [("''", S)]),
    ("select 'it''s'", [("'it''s'", S)]),
    ("select ''''", [("''''", S)]),
    ("select 'a\\'", [("'a\\'", S)]),  # backslash is ordinary in '...'
    ("select 'a\\', 'b'", [("'a\\'", S), ("'b'", S)]),
    ("select N'nat', n'x'", [("N'nat'", S), ("n'x'", S)]),
    # escape strings
    ("select E'it\\'s'", [("E'it\\'s'", E)]),
    ("select e'a''b'", [("e'a''b'", E)]),
    ("select E'\\\\', 'x'", [("E'\\\\'", E), ("'x'", S)]),
    ("select E'\\n\\t\\x41'", [("E'\\n\\t\\x41'", E)]),
    # dollar quotes
    ("select $$a'b$$", [("$$a'b$$", D)]),
    ("select $fn$ body with 'quotes' $fn$", [("$fn$ body with 'quotes' $fn$", D)]),
    ("select $a$ $b$ inner $b$ $a$", [("$a$ $b$ inner $b$ $a$", D)]),
    ("select $_x1$v$_x1$", [("$_x1$v$_x1$", D)]),
    ("select $$ -- not a comment $$, 1", [("$$ -- not a comment $$", D), ("1", N)]),
    ("select $$/* no */$$", [("$$/* no */$$", D)]),
    ("select $$$$", [("$$$$", D)]),
    ("select $q$x$$y$q$", [("$q$x$$y$q$", D)]),
    ("select $é$x$é$", [("$é$x$é$", D)]),
    # numbers
    ("select 1+2", [("1", N), ("2", N)]),
    ("select 1-2*3/4", [("1", N), ("2", N), ("3", N), ("4", N)]),
    ("select -5", [("5", N)]),
    (
        "select 3.25, .5, 5., 1e10, 1.5E-3, 2e+7, 1.e5",
        [("3.25", N), (".5", N), ("5.", N), ("1e10", N), ("1.5E-3", N), ("2e+7", N), ("1.e5", N)],
    ),
    (
        "select 0x1F, 0X_ff, 0o17, 0b101, 0B1_0",
        [("0x1F", N), ("0X_ff", N), ("0o17", N), ("0b101", N), ("0B1_0", N)],
    ),
    ("select 1_000_000, 1_000.5_0", [("1_000_000", N), ("1_000.5_0", N)]),
    ("select 1..5", [("1", N), ("5", N)]),
    ("select ..5, ...5", [("5", N), (".5", N)]),
    ("select 1_", [("1", N)]),
    ("select 0x", [("0", N)]),
    ("select 1e", [("1", N)]),
    ("select 1e+", [("1", N)]),
    ('select t1, t1.c2, x_1, foo$bar, "t".c3', []),
    ("select $1, $2::int, $10", []),
    ("select t.1", [(".1", N)]),
    ("select a[1:2]", [("1", N), ("2", N)]),
    ("select 1::int, '2'::int, 3::text", [("1", N), ("'2'", S), ("3", N)]),
    # bit strings
    (
        "select B'0101', b'1', X'1F', x'ab'",
        [("B'0101'", B), ("b'1'", B), ("X'1F'", B), ("x'ab'", B)],
    ),
    ("select B''", [("B''", B)]),
    # unicode strings
    ("select U&'d\\0061t\\+000061'", [("U&'d\\0061t\\+000061'", U)]),
    ("select u&'a''b'", [("u&'a''b'", U)]),
    ("select U&'d!0061t' UESCAPE '!'", [("U&'d!0061t' UESCAPE '!'", U)]),
    ("select U&'x'uescape'!', 1", [("U&'x'uescape'!'", U), ("1", N)]),
    ("select U&'x' /* c */ UEscape -- c\n '!'", [("U&'x' /* c */ UEscape -- c\n '!'", U)]),
    ("select U&'x' uescapes '!'", [("U&'x'", U), ("'!'", S)]),
    ("select U&'x' uescape", [("U&'x'", U)]),
    ("select U&'x' uescape 1", [("U&'x'", U), ("1", N)]),
    ("select 'x' uescape '!'", [("'x'", S), ("'!'", S)]),
    ("select U&\"d!0061t\" UESCAPE '!' from t", []),
    ("select U&\"x\" uescape, '!'", [("'!'", S)]),
    # typed literals and containers
    ("select date '2024-01-01', interval '1 day'", [("'2024-01-01'", S), ("'1 day'", S)]),
    ("select date'2024-01-01'", [("'2024-01-01'", S)]),
    ("select '{a,b}'::text[]", [("'{a,b}'", S)]),
    ("select ARRAY['a','b']", [("'a'", S), ("'b'", S)]),
    ("select * from t where c IN ('a','b')", [("'a'", S), ("'b'", S)]),
    ("select '{\"k\": 1}'::jsonb -> 'k'", [("'{\"k\": 1}'", S), ("'k'", S)]),
    # multi-statement text
    ("select 'a'; select 2; insert into t values ('c')", [("'a'", S), ("2", N), ("'c'", S)]),
    # identifiers that look like prefixes
    ("select e, n, b, x, u from t", []),
    ("select typee'x'", [("'x'", S)]),
    ("select ee'x'", [("'x'", S)]),
    ("select U&x", []),
    ("select U & 'x'", [("'x'", S)]),
    ("select 1e'x'", [("1", N), ("e'x'", E)]),
    ("select 0b'1'", [("0", N), ("b'1'", B)]),
    # non-ASCII identifiers and values
    ("select ñame1 from tàble where ç = 'héllo'", [("'héllo'", S)]),
]


@pytest.mark.parametrize(("sql", "expected"), FORMS, ids=[sql for sql, _ in FORMS])
def test_forms(sql: str, expected: list[tuple[str, int]]) -> None:
    assert lits(sql) == expected


SKIPS: list[tuple[str, list[tuple[str, int]]]] = [
    ("select 1 -- comment with 'quote' and 2\n, 'x'", [("1", N), ("'x'", S)]),
    ("select 1 -- 'unterminated comment", [("1", N)]),
    ("select 1 --\r'x'", [("1", N), ("'x'", S)]),
    ("select /* 'a' */ 'b'", [("'b'", S)]),
    ("select /* a /* nested 'q' */ still 3 */ 4", [("4", N)]),
    ("select /**/ 1", [("1", N)]),
    ("select /*/ 1 */ 2", [("2", N)]),
    ("select /* $$ */ 'x'", [("'x'", S)]),
    ("select 1 /* unterminated 'x'", [("1", N)]),
    ("select 1 /* a /* b */ still inside 'x'", [("1", N)]),
    ("select \"ident with 'quote'\" from t", []),
    ('select "a""b \'c\'" , 1', [("1", N)]),
    ('select "t1".c2 from "s 2"."t 3"', []),
    ("select U&\"d\\0061t 'x'\" from t", []),
    ('select u&"a""\'b" , 5', [("5", N)]),
    ("select \"unterminated 'x'", []),
    ("select 1 +-- c\n2", [("1", N), ("2", N)]),
    ("select 1 */* c */ 2", [("1", N), ("2", N)]),
    ("select 'a'/* 'b' */", [("'a'", S)]),
    ("select 'x--y', 'a/*b'", [("'x--y'", S), ("'a/*b'", S)]),
    ("select $$ 'a' $$ -- $$ 'b'", [("$$ 'a' $$", D)]),
]


@pytest.mark.parametrize(("sql", "expected"), SKIPS, ids=[sql for sql, _ in SKIPS])
def test_skips(sql: str, expected: list[tuple[str, int]]) -> None:
    assert lits(sql) == expected


CONTINUATIONS: list[tuple[str, list[tuple[str, int]], list[str]]] = [
    # PostgreSQL joins strings separated by whitespace holding a newline.
    ("select 'a'\n'b'", [("'a'\n'b'", S)], ["ab"]),
    ("select 'a'  \n\t 'b'\n'c'", [("'a'  \n\t 'b'\n'c'", S)], ["abc"]),
    ("select 'a' -- it's\n 'b'", [("'a' -- it's\n 'b'", S)], ["ab"]),
    ("select 'a'\r'b'", [("'a'\r'b'", S)], ["ab"]),
    ("select E'a'\n'\\n'", [("E'a'\n'\\n'", E)], ["a\n"]),
    ("select B'01'\n'10'", [("B'01'\n'10'", B)], ["0110"]),
    ("select U&'a'\n'\\0062'", [("U&'a'\n'\\0062'", U)], ["ab"]),
    # ... but not on one line, nor across a /* */ comment.
    ("select 'a' 'b'", [("'a'", S), ("'b'", S)], ["a", "b"]),
    ("select 'a' /* */\n'b'", [("'a'", S), ("'b'", S)], ["a", "b"]),
    ("select 'a',\n'b'", [("'a'", S), ("'b'", S)], ["a", "b"]),
    # B'' has no '' doubling: the second quote starts a new string.
    ("select B'01''10'", [("B'01'", B), ("'10'", S)], ["01", "10"]),
]


@pytest.mark.parametrize(
    ("sql", "expected", "texts"), CONTINUATIONS, ids=[sql for sql, _, _ in CONTINUATIONS]
)
def test_continuations(sql: str, expected: list[tuple[str, int]], texts: list[str]) -> None:
    assert lits(sql) == expected
    assert values(sql) == texts


UNTERMINATED: list[tuple[str, list[tuple[str, int]], list[str]]] = [
    ("select 'abc", [("'abc", S)], ["abc"]),
    ("select 'it''s", [("'it''s", S)], ["it's"]),
    ("select E'abc\\'", [("E'abc\\'", E)], ["abc'"]),
    ("select E'\\", [("E'\\", E)], [""]),
    ("select N'x", [("N'x", S)], ["x"]),
    ("select B'01", [("B'01", B)], ["01"]),
    ("select U&'x", [("U&'x", U)], ["x"]),
    ("select $$abc", [("$$abc", D)], ["abc"]),
    ("select $tag$abc $ta", [("$tag$abc $ta", D)], ["abc $ta"]),
    ("select $$", [("$$", D)], [""]),
    ("select $$$", [("$$$", D)], ["$"]),
    ("select 'a'\n", [("'a'", S)], ["a"]),
    ("select 'a'\n  -- more", [("'a'", S)], ["a"]),
    ("select '", [("'", S)], [""]),
    ("select E'", [("E'", E)], [""]),
    ("select 'a'\n'", [("'a'\n'", S)], ["a"]),
    ("select $a", [], []),
    ("select $", [], []),
]


@pytest.mark.parametrize(
    ("sql", "expected", "texts"), UNTERMINATED, ids=[sql for sql, _, _ in UNTERMINATED]
)
def test_unterminated(sql: str, expected: list[tuple[str, int]], texts: list[str]) -> None:
    assert lits(sql) == expected
    assert values(sql) == texts


def test_dollar_after_parameter() -> None:
    # "$1" is a parameter, but the dollar quote right after it is a literal.
    assert lits("select $1$a$secret$a$") == [("$a$secret$a$", D)]
    assert lits("select $1_0 + 1") == [("1", N)]


def test_offsets_are_utf8_bytes_and_include_prefixes() -> None:
    data = "select 'é', E'ü', U&'x', N'ñ', X'1F', 2 -- ç\n".encode()
    got = scan_literals(data)
    assert [data[a:b] for a, b, _ in got] == [
        "'é'".encode(),
        "E'ü'".encode(),
        b"U&'x'",
        "N'ñ'".encode(),
        b"X'1F'",
        b"2",
    ]
    assert got[0][0] == 7 and got[1][0] == 13


# ---------------------------------------------------------------------------
# Values

TEXTS: list[tuple[str, str]] = [
    ("'abc'", "abc"),
    ("'it''s'", "it's"),
    ("'a\\nb'", "a\\nb"),
    ("N'x''y'", "x'y"),
    ("'héllo wörld'", "héllo wörld"),
    ("E'it\\'s'", "it's"),
    ("E'a''b'", "a'b"),
    ("E'\\b\\f\\n\\r\\t'", "\b\f\n\r\t"),
    ("E'\\\\'", "\\"),
    ("E'\\q\\\"'", 'q"'),
    ("E'\\x41\\x4a\\x4'", "AJ\x04"),
    ("E'\\xg'", "xg"),
    ("E'\\101\\7\\0101'", "A\x07\x081"),
    ("E'\\u00e9\\U0001F600'", "é😀"),
    ("E'\\uD83D\\uDE00'", "😀"),
    ("E'\\uD83Dx'", "\ufffdx"),
    ("E'\\u12'", "u12"),
    ("E'\\U00110000'", "\ufffd"),
    ("E'\\xc3\\xa9'", "é"),
    ("E'\\xff'", "\ufffd"),
    ("U&'d\\0061t\\+000061'", "data"),
    ("U&'\\D83D\\DE00'", "😀"),
    ("U&'a\\\\b'", "a\\b"),
    ("U&'\\zz'", "\\zz"),
    ("U&'d!0061t' UESCAPE '!'", "dat"),
    ("U&'d!0061t'\n  uescape\t'!'", "dat"),
    ("U&'d!0061t' /* c */ UESCAPE '!'", "dat"),
    ("U&'d!0061'\n'!0062' UESCAPE '!'", "dab"),
    ("U&'d!!t' UESCAPE '!'", "d!t"),
    ("$$a'b$$", "a'b"),
    ("$fn$ body 'q' $fn$", " body 'q' "),
    ("$$é$$", "é"),
    ("42", "42"),
    ("1_000_000", "1000000"),
    ("3.25", "3.25"),
    ("1.5E-3", "1.5E-3"),
    (".5", ".5"),
    ("0x1F", "31"),
    ("0o17", "15"),
    ("0b101", "5"),
    ("0x_FF_FF", "65535"),
    ("B'0101'", "0101"),
    ("X'1F'", "00011111"),
    ("x'aB'", "10101011"),
]


@pytest.mark.parametrize(("token", "text"), TEXTS, ids=[t for t, _ in TEXTS])
def test_literal_text(token: str, text: str) -> None:
    data = ("select " + token).encode()
    start, end, kind = scan_literals(data)[0]
    assert start == 7
    assert literal_text(data, start, end, kind) == text


def test_literal_text_invalid_utf8() -> None:
    data = b"select '\xff\xfeok', $$\xc3$$"
    assert values(data) == ["\ufffd\ufffdok", "\ufffd"]


def test_literal_text_nul() -> None:
    assert values(b"select 'a\x00b'") == ["a\x00b"]


# ---------------------------------------------------------------------------
# Properties on arbitrary input


def check_tokens(data: bytes) -> None:
    """The lexer's contract on any input: ordered, in bounds, not overlapping."""
    tokens = scan_literals(data)
    position = 0
    for start, end, kind in tokens:
        assert position <= start < end <= len(data)
        assert kind in KINDS
        position = end
        assert isinstance(literal_text(data, start, end, kind), str)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    check_tokens(data)


@settings(max_examples=1000, deadline=None)
@given(
    st.binary(max_size=80),
    st.integers(min_value=0, max_value=80),
    st.integers(min_value=0, max_value=80),
    st.integers(min_value=1, max_value=6),
)
def test_fuzz_literal_text_any_span(data: bytes, start: int, end: int, kind: int) -> None:
    """Any in-bounds span of any kind decodes to some text without raising."""
    assume(start <= end <= len(data))
    assert isinstance(literal_text(data, start, end, kind), str)


# An alphabet dense in the bytes that change the lexer's state.
SQLISH = st.lists(
    st.sampled_from(
        [
            "'",
            "''",
            '"',
            "$",
            "$$",
            "$a$",
            "$1",
            "\\",
            "--",
            "/*",
            "*/",
            "\n",
            " ",
            "e",
            "E",
            "n",
            "b",
            "x",
            "X",
            "u",
            "U&",
            "&",
            "0",
            "1",
            "9",
            "_",
            ".",
            "e5",
            "0x",
            "0b",
            "0o",
            "+",
            "-",
            "*",
            "/",
            "a",
            "é",
            "uescape",
            "\x00",
            "\xff",
        ]
    ),
    max_size=60,
).map("".join)


@settings(max_examples=2000, deadline=None)
@given(SQLISH)
def test_fuzz_sqlish(text: str) -> None:
    check_tokens(text.encode("utf-8", "surrogateescape"))


@settings(max_examples=300, deadline=None)
@given(SQLISH, st.integers(min_value=0, max_value=60))
def test_fuzz_prefix_never_leaks_past_itself(text: str, cut: int) -> None:
    """Cutting the text never makes a token end beyond the cut (no over-read)."""
    data = text.encode()[:cut]
    check_tokens(data)


class GuardedBuffer:
    """A buffer whose last byte sits right before an unreadable page (Linux).

    A byte read past the end of the text faults at once instead of reading
    whatever follows in memory, which bytes objects (NUL-terminated, with
    slack) would hide.
    """

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.page = mmap.PAGESIZE
        self.map = mmap.mmap(-1, 2 * self.page)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        if libc.mprotect(base + self.page, self.page, 0) != 0:
            pytest.skip("mprotect unavailable")
        self.view = memoryview(self.map)

    def holding(self, data: bytes) -> memoryview:
        self.map.seek(self.page - len(data))
        self.map.write(data)
        return self.view[self.page - len(data) : self.page]


GUARD: list[GuardedBuffer] = []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mprotect guard page")
@settings(max_examples=2000, deadline=None)
@given(SQLISH)
def test_never_reads_past_the_end(text: str) -> None:
    if not GUARD:
        GUARD.append(GuardedBuffer())
    data = text.encode("utf-8", "surrogateescape")
    view = GUARD[0].holding(data)
    tokens = scan_literals(view)
    assert tokens == scan_literals(data)
    for start, end, kind in tokens:
        assert literal_text(view, start, end, kind) == literal_text(data, start, end, kind)
    del view


def literal_tokens_from_pglast(text: str) -> list[tuple[int, int]]:
    """Spans of the literal tokens libpg_query's scanner finds (ASCII text only)."""
    kinds = {"SCONST", "USCONST", "BCONST", "XCONST", "ICONST", "FCONST"}
    out: list[tuple[int, int]] = []
    previous = ""
    for token in pg.scan(text):
        start, end = token.start, token.end + 1
        if previous == "NCHAR" and token.name == "SCONST" and text[start - 1] in "nN":
            start -= 1  # N'x' is the keyword NCHAR then a string
        if previous == "UESCAPE" and token.name == "SCONST":
            start = out.pop()[0]  # U&'x' UESCAPE '!' is one literal
        if token.name == "UESCAPE" and previous != "USCONST":
            raise pg.ParseError("UESCAPE without a Unicode string", start)
        if token.name in kinds:
            out.append((start, end))
        previous = token.name
    return out


ASCII_SQLISH = st.lists(
    st.sampled_from(
        [
            "'",
            "''",
            '"',
            "$$",
            "$a$",
            "$1",
            "\\",
            "--",
            "/*",
            "*/",
            "\n",
            " ",
            "e",
            "E",
            "N",
            "b",
            "X",
            "U&",
            "0",
            "1",
            "_",
            ".",
            "e5",
            "0x1",
            "0b1",
            "+",
            "-",
            "a",
            "t1",
            ",",
            "(",
            ")",
            "::",
            "uescape",
            "\t",
            "\r",
            ";",
        ]
    ),
    max_size=30,
).map("".join)


@settings(max_examples=int(os.environ.get("LEXER_EXAMPLES", "3000")), deadline=None)
@given(ASCII_SQLISH)
def test_same_tokens_as_libpg_query(text: str) -> None:
    """Wherever PostgreSQL's scanner accepts the text, it finds the same literals."""
    try:
        expected = literal_tokens_from_pglast(text)
    except pg.ParseError:
        assume(False)
        return
    assert [(a, b) for a, b, _ in scan_literals(text.encode())] == expected


# ---------------------------------------------------------------------------
# Cross-check against PostgreSQL's parser

CORPUS = [
    "SELECT id, name FROM customers WHERE email = 'j.muller@company.com'",
    "SELECT * FROM orders WHERE amount > 100.50 AND status IN ('paid', 'shipped')",
    "INSERT INTO customers (name, email, phone) VALUES ('Zoë Ünal', 'z@x.org', '+33612345678')",
    "INSERT INTO t (a, b, c) VALUES (1, -2, 3.5e-2), (4, -.5, 0x1F)",
    "UPDATE customers SET phone = '+4915112345678', score = score + 1 WHERE id = 42",
    "DELETE FROM sessions WHERE created < now() - interval '30 days'",
    "SELECT E'line\\nbreak', E'it\\'s', 'it''s' FROM dual",
    "SELECT $$dollar 'quoted'$$, $tag$ with $$ inside $tag$",
    "SELECT B'1010', X'FF', U&'d\\0061t\\+000061' FROM t",
    "SELECT U&'d!0061t' UESCAPE '!'",
    "SELECT N'national', n'lower'",
    "SELECT '2024-01-01'::date, '{a,b,c}'::text[], 12::bigint",
    "SELECT ARRAY['alice', 'bob'], ARRAY[1, 2, 3]",
    "SELECT c.name FROM customers c JOIN orders o ON o.customer_id = c.id WHERE o.id = 7",
    "SELECT count(*) FROM t WHERE a BETWEEN 10 AND 20 AND b LIKE 'abc%'",
    "SELECT coalesce(nickname, 'anonymous') AS n FROM users LIMIT 10 OFFSET 5",
    'SELECT * FROM t WHERE data @> \'{"email": "a@b.c"}\'::jsonb',
    "SELECT data->>'email', data#>'{a,b}' FROM t WHERE (data->>'age')::int > 30",
    "SELECT 1_000_000, 0o17, 0b101, 1.5E3, .25, 5.",
    "SELECT /* 'skipped' */ 'value' -- 'nor this'\n, 2",
    'SELECT "weird \'col\'" FROM "t 1" WHERE "x""y" = \'v\'',
    "SELECT 'first'\n'second' AS joined",
    "SELECT 'a' -- comment\n  'b'",
    "WITH r AS (SELECT 5 AS n) SELECT n * 2.0 FROM r WHERE n <> 3",
    "SELECT CASE WHEN age < 18 THEN 'minor' ELSE 'adult' END FROM people",
    "SELECT substring('secret value' from 2 for 3)",
    "SELECT to_char(now(), 'YYYY-MM-DD HH24:MI')",
    "SELECT * FROM t WHERE name = 'Ørsted' AND city = '東京' AND n = 1",
    "SELECT 'héllo' || ' ' || 'wörld', length('日本語')",
    "CREATE TABLE t (id int DEFAULT 0, note text DEFAULT 'none', price numeric(10, 2))",
    "ALTER TABLE t ALTER COLUMN note SET DEFAULT 'n/a'",
    "SELECT set_config('scalple.user_id', 'alice', false)",
    "COPY (SELECT 1) TO STDOUT WITH (FORMAT csv, DELIMITER ';')",
    "SELECT * FROM t WHERE id = ANY('{1,2,3}'::int[]) AND flag = true AND x IS NULL",
    "SELECT -1, - 2, -3.5, 4 - 5, +6",
    "SELECT 'a'; SELECT 'b'; INSERT INTO t VALUES ('c', 9)",
    "PREPARE q (int) AS SELECT * FROM t WHERE id = $1 AND name <> 'x'",
    "SELECT $fn$ SELECT 'inner'; $fn$ AS body, E'\\x41\\101'",
    "SELECT a[1], a[2:3] FROM t WHERE b = '12345678901234567890'",
    "SELECT 9223372036854775808, 123456789012345678901234567890.5",
]


def a_consts(tree: Any) -> Iterator[dict[str, Any]]:
    """Every A_Const node that holds a value (not NULL, not a boolean keyword)."""
    if isinstance(tree, dict):
        for key, node in tree.items():
            if key == "A_Const" and any(v in node for v in ("sval", "ival", "fval", "bsval")):
                yield node
            yield from a_consts(node)
    elif isinstance(tree, list):
        for node in tree:
            yield from a_consts(node)


def const_value(node: dict[str, Any]) -> str:
    """The A_Const's value in literal_text's form (a negated number loses its sign)."""
    if "sval" in node:
        return str(node["sval"].get("sval", ""))
    if "ival" in node:
        return str(abs(int(node["ival"].get("ival", 0))))
    if "fval" in node:
        return str(node["fval"]["fval"]).lstrip("-")
    bits = str(node["bsval"]["bsval"])
    if bits[0] in "xX":
        return "".join(format(int(d, 16), "04b") for d in bits[1:])
    return bits[1:]


def parsed_string(sql: str) -> str | None:
    """The value PostgreSQL's parser gives the one string constant of ``sql``, or None."""
    try:
        tree = json.loads(pg.parse_sql_json(sql))
    except (pg.ParseError, UnicodeDecodeError):  # pglast fails to decode some error messages
        return None
    (node,) = a_consts(tree)
    return str(node["sval"].get("sval", ""))


E_PIECES = st.sampled_from(
    [
        "a",
        "é",
        "''",
        "\\'",
        "\\\\",
        "\\n",
        "\\t",
        "\\b",
        "\\q",
        "\\x",
        "\\x4",
        "\\x41",
        "\\xc3",
        "\\xa9",
        "\\101",
        "\\7",
        "\\0",
        "\\u00e9",
        "\\u12",
        "\\U0001F600",
        "\\uD83D",
        "\\uDE00",
        "\\U00110000",
        "1",
        "f",
        " ",
        "\n",
    ]
)


@settings(max_examples=1000, deadline=None)
@given(st.lists(E_PIECES, max_size=12).map("".join))
def test_escape_string_values_match_postgres(body: str) -> None:
    sql = f"SELECT E'{body}'"
    expected = parsed_string(sql)
    assume(expected is not None)
    data = sql.encode()
    ((start, end, kind),) = scan_literals(data)
    assert literal_text(data, start, end, kind) == expected


U_PIECES = st.sampled_from(
    [
        "a",
        "é",
        "''",
        "!",
        "!!",
        "!0061",
        "!+01F600",
        "!D83D",
        "!DE00",
        "!00e9",
        "\\",
        "\\0062",
        "1",
        "+",
        " ",
    ]
)


@settings(max_examples=1000, deadline=None)
@given(st.lists(U_PIECES, max_size=12).map("".join), st.sampled_from(["!", "\\"]))
def test_unicode_string_values_match_postgres(body: str, escape: str) -> None:
    clause = " UESCAPE '!'" if escape == "!" else ""
    sql = f"SELECT U&'{body}'{clause}"
    expected = parsed_string(sql)
    assume(expected is not None)
    data = sql.encode()
    ((start, end, kind),) = scan_literals(data)
    assert end == len(data)
    assert literal_text(data, start, end, kind) == expected


@pytest.mark.parametrize("sql", CORPUS)
def test_pglast_a_const_locations_start_our_tokens(sql: str) -> None:
    data = sql.encode()
    tokens = scan_literals(data)
    starts = {start: (start, end, kind) for start, end, kind in tokens}
    tree = json.loads(pg.parse_sql_json(sql))
    nodes = list(a_consts(tree))
    assert nodes
    for node in nodes:
        location = node["location"]
        if location in starts:
            token = starts[location]
        elif data[location : location + 1] == b"-":
            # PostgreSQL folds -N into one constant located at the sign.
            after = location + 1
            while data[after : after + 1].isspace():
                after += 1
            token = starts[after]
            assert token[2] == LIT_NUMBER
        else:
            # N'x' is the keyword NCHAR and a string located at its quote.
            token = starts[location - 1]
            assert data[location - 1 : location] in (b"N", b"n")
        assert literal_text(data, *token) == const_value(node), sql


def test_pglast_location_units() -> None:
    """parse_sql_json locations are UTF-8 byte offsets; scan() gives characters."""
    sql = "SELECT 'é', 'x'"
    data = sql.encode()
    node = list(a_consts(json.loads(pg.parse_sql_json(sql))))[1]
    assert node["location"] == data.index(b"'x'") == 13
    assert sql.index("'x'") == 12
    assert scan_literals(data)[1][0] == 13
    sconst = [t for t in pg.scan(sql) if t.name == "SCONST"][1]
    assert (sconst.start, sconst.end) == (12, 14)  # characters, end inclusive


# ---------------------------------------------------------------------------
# Masks

KEY = bytes(range(32))


@pytest.fixture
def masker() -> Masker:
    return Masker(KEY)


def test_mask_names() -> None:
    assert frozenset({"email", "partial", "redact", "pseudonym"}) == MASKS


EMAILS = [
    ("j.muller@company.com", "j***@***.com"),
    ("a@b.co.uk", "a***@***.uk"),
    ("zoë.ünal@exämple.de", "z***@***.de"),
    ("émile@exemple.fr", "é***@***.fr"),
    ("user@xn--bcher-kva.xn--tckwe", "u***@***.xn--tckwe"),
    ('"odd@local"@host.org', '"***@***.org'),
    ("@example.com", "***@***.com"),
    ("user@localhost", "u***@***"),
    ("user@host.", "u***@***"),
    ("user@host.0612345678", "u***@***"),
    ("user@host.c0m", "u***@***"),
    ("user@例え.テスト", "u***@***"),
    ("no-at-sign", "***"),
    ("", "***"),
]


@pytest.mark.parametrize(("value", "shown"), EMAILS)
def test_email(masker: Masker, value: str, shown: str) -> None:
    assert masker.mask("email", value) == shown


PARTIALS = [
    ("+33612345678", "***78"),
    ("abc", "***bc"),
    ("ab", "***"),
    ("a", "***"),
    ("", "***"),
    ("Zoë Ünal", "***al"),
    ("東京都港区", "***港区"),
    ("x😀😀", "***😀😀"),
]


@pytest.mark.parametrize(("value", "shown"), PARTIALS)
def test_partial(masker: Masker, value: str, shown: str) -> None:
    assert masker.mask("partial", value) == shown


@pytest.mark.parametrize("value", ["", "x", "secret", "東京", "a'b"])
def test_redact(masker: Masker, value: str) -> None:
    assert masker.mask("redact", value) == "***"


# Known answers: a change here breaks every pseudonym already in deployed logs.
PSEUDONYMS = [
    ("alice", blake3(b"\x00alice", key=KEY).hexdigest()[:12]),
    ("42", blake3(b"\x0042", key=KEY).hexdigest()[:12]),
    ("Zoë", blake3(b"\x00" + "Zoë".encode(), key=KEY).hexdigest()[:12]),
    ("", blake3(b"\x00", key=KEY).hexdigest()[:12]),
]


@pytest.mark.parametrize(("value", "digits"), PSEUDONYMS)
def test_pseudonym(masker: Masker, value: str, digits: str) -> None:
    shown = masker.mask("pseudonym", value)
    assert shown == "pn_" + digits
    assert len(shown) == 15
    assert masker.mask("pseudonym", value) == shown  # stable
    assert Masker(bytes(32)).mask("pseudonym", value) != shown  # keyed


def test_pseudonym_known_vector(masker: Masker) -> None:
    assert masker.mask("pseudonym", "alice") == "pn_" + PSEUDONYMS[0][1]
    assert PSEUDONYMS[0][1] == "01d1fcbf517f"


def test_pseudonym_of_number_literal_and_string_agree(masker: Masker) -> None:
    data = b"select 42, '42', 0x2A, 4_2"
    got = {masker.mask("pseudonym", v) for v in values(data)}
    assert len(got) == 1


def test_pseudonym_never_raises_on_surrogates(masker: Masker) -> None:
    assert masker.mask("pseudonym", "\udcff").startswith("pn_")


def test_subject_tag(masker: Masker) -> None:
    tag = masker.subject_tag("customer_id", "42")
    assert tag.startswith("sub_") and len(tag) == 4 + 24
    int(tag[4:], 16)
    assert masker.subject_tag("customer_id", "42") == tag
    assert masker.subject_tag("employee_id", "42") != tag
    assert masker.subject_tag("customer_id", "43") != tag
    # The kind's length is hashed, so moving bytes between kind and value matters.
    assert masker.subject_tag("ab", "c") != masker.subject_tag("a", "bc")
    # Domain separation from pseudonyms: no common digits for any split.
    assert masker.mask("pseudonym", "42")[3:] not in tag
    assert Masker(bytes(32)).subject_tag("customer_id", "42") != tag


def test_unknown_mask(masker: Masker) -> None:
    with pytest.raises(ValueError, match="unknown mask 'hash'"):
        masker.mask("hash", "x")


def test_key_size() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Masker(b"short")
    assert "0001" not in repr(Masker(KEY)) and "\\x00" not in repr(Masker(KEY))


def test_key_from_file(tmp_path: Path) -> None:
    secret = b"correct horse battery staple, 32+"
    path = tmp_path / "mask.key"
    path.write_bytes(secret + b"\n")
    key = key_from_file(path)
    assert len(key) == 32
    assert key == blake3(secret, derive_key_context=KEY_CONTEXT).digest()
    assert key == blake3(secret, derive_key_context="scalple masking key v1").digest()
    path.write_bytes(secret)
    assert key_from_file(str(path)) == key
    path.write_bytes(secret + b"\r\n")
    assert key_from_file(path) == key
    path.write_bytes(secret + b"\n\n")
    assert key_from_file(path) != key  # only one newline is stripped


def test_key_from_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "short.key"
    path.write_bytes(b"TOPSECRET-but-31-bytes-long-xyz\n")
    with pytest.raises(ValueError) as info:
        key_from_file(path)
    assert str(path) in str(info.value)
    assert "TOPSECRET" not in str(info.value)
    with pytest.raises(ValueError, match="cannot read masking key file"):
        key_from_file(tmp_path / "missing.key")


MASKED_TOKENS = [
    (S, b"'alice'", "***", b"'***'"),
    (E, b"E'it\\'s'", "***'s", b"'***''s'"),
    (D, b"$$x$$", "pn_0123456789ab", b"'pn_0123456789ab'"),
    (B, b"B'0101'", "***", b"'***'"),
    (U, b"U&'x'", "é***", "'é***'".encode()),
    (N, b"612345678", "***78", b"'***78'"),
    (N, b"42", "42", b"42"),
    (N, b"1.5e3", "1.5e3", b"1.5e3"),
    (N, b"0x1F", "31", b"31"),
    (S, b"'42'", "42", b"'42'"),
    (N, b"42", "sub_0123", b"'sub_0123'"),
]


@pytest.mark.parametrize(("kind", "token", "masked", "out"), MASKED_TOKENS)
def test_mask_literal_token(kind: int, token: bytes, masked: str, out: bytes) -> None:
    assert mask_literal_token(kind, token, masked) == out


def mask_all(data: bytes, masker: Masker, mask: str) -> bytes:
    """Every literal of ``data`` replaced by its masked form (as the audit path does)."""
    pieces = []
    position = 0
    for start, end, kind in scan_literals(data):
        value = literal_text(data, start, end, kind)
        pieces += [
            data[position:start],
            mask_literal_token(kind, data[start:end], masker.mask(mask, value)),
        ]
        position = end
    return b"".join([*pieces, data[position:]])


@pytest.mark.parametrize("mask", sorted(MASKS))
@pytest.mark.parametrize("sql", CORPUS)
def test_masked_corpus_keeps_no_value(masker: Masker, mask: str, sql: str) -> None:
    """Masked text still parses and holds no literal value of the original."""
    data = sql.encode()
    masked = mask_all(data, masker, mask)
    pg.parse_sql(masked.decode())
    for start, end, kind in scan_literals(data):
        value = literal_text(data, start, end, kind)
        if len(value) >= 4 and mask in ("redact", "pseudonym"):
            assert value.encode() not in masked, (value, masked)


def test_masked_example(masker: Masker) -> None:
    sql = b"UPDATE c SET email = 'j.muller@company.com', phone = E'+33\\061' WHERE id = 612345678"
    assert mask_all(sql, masker, "email") == (
        b"UPDATE c SET email = 'j***@***.com', phone = '***' WHERE id = '***'"
    )
    assert mask_all(sql, masker, "partial") == (
        b"UPDATE c SET email = '***om', phone = '***31' WHERE id = '***78'"
    )
