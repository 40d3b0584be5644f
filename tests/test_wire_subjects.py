"""Data-subject values read out of result rows by the backend scanner.

The scanner is configured like ServerLink's; each stream is fed whole, a
byte at a time and cut at random places, and must give the same entries.
A scanner with extraction off is the reference for everything else: the
relay's own entries (and their DataRow counts) must not change.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scalple import protocol as P
from scalple._wire import SUBJECT_VALUES, MessageScanner, unpack_row_values

Got = list[tuple[int, bytes, bool, int, int]]
Value = tuple[int, int, int, bytes]

USERS = 16_384  # table OIDs
ORDERS = 16_390
INT4 = 23  # type OIDs
TEXT = 25
CUSTOMER = 0  # subject-kind indexes
EMAIL = 1
SUBJECTS = {(USERS, 1): CUSTOMER, (ORDERS, 3): EMAIL}


# --- building backend streams ------------------------------------------------


def msg(mtype: bytes, body: bytes) -> bytes:
    return P.build_message(mtype, body)


def field(name: str, table: int = 0, attnum: int = 0, type_oid: int = TEXT, fmt: int = 0) -> bytes:
    """One RowDescription field: name, table OID, attnum, type, size, modifier, format."""
    return name.encode() + b"\0" + struct.pack("!IhIhih", table, attnum, type_oid, -1, -1, fmt)


def row_description(*fields: bytes) -> bytes:
    return msg(b"T", struct.pack("!h", len(fields)) + b"".join(fields))


def data_row(*values: bytes | None) -> bytes:
    body = struct.pack("!h", len(values))
    for value in values:
        body += struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value
    return msg(b"D", body)


def complete(tag: str) -> bytes:
    return msg(b"C", tag.encode() + b"\0")


READY = msg(b"Z", b"I")
SUSPENDED = msg(b"s", b"")
EMPTY_QUERY = msg(b"I", b"")
ERROR = P.build_error("22012", "division by zero", severity="ERROR")

# SELECT id, name, note FROM users: id is the subject, name is a plain table
# column, note a computed one (table OID 0).
USERS_TEXT = row_description(
    field("id", USERS, 1, INT4),
    field("name", USERS, 2, TEXT),
    field("note", 0, 0, TEXT),
)
USERS_BINARY = row_description(
    field("id", USERS, 1, INT4, fmt=1),
    field("name", USERS, 2, TEXT, fmt=1),
)
# SELECT total, buyer_email FROM orders: the subject is the second column.
ORDERS_TEXT = row_description(field("total", ORDERS, 2, INT4), field("email", ORDERS, 3, TEXT))
NO_SUBJECTS = row_description(field("total", ORDERS, 2, INT4), field("note"))


def packed(*values: Value) -> bytes:
    """The documented packing: u8 kind, u8 format, u32 type OID LE, u32 length LE, value."""
    return b"".join(struct.pack("<BBII", k, f, t, len(v)) + v for k, f, t, v in values)


# --- feeding -------------------------------------------------------------------


def backend(
    subjects: dict[tuple[int, int], int] | None = SUBJECTS, limit: int = 100
) -> MessageScanner:
    scanner = MessageScanner(P.BACKEND_CAPTURE, P.BACKEND_COUNT, None, 1 << 20, 64)
    if subjects is not None:
        scanner.set_row_subjects(subjects, limit)
    return scanner


def feed_in_pieces(scanner: MessageScanner, data: bytes, cuts: list[int]) -> Got:
    """Feed ``data`` cut at ``cuts``; ends are turned into stream offsets."""
    out: Got = []
    start = 0
    for cut in [*sorted({c for c in cuts if 0 < c < len(data)}), len(data)]:
        got = scanner.feed(data[start:cut]) or []
        out.extend((t, b, tr, c, start + end) for t, b, tr, c, end in got)
        start = cut
    return out


def relay_entries(got: Got) -> Got:
    return [entry for entry in got if entry[0] != SUBJECT_VALUES]


def subject_entries(got: Got) -> list[tuple[int, list[Value], bool, int, int]]:
    """Each values entry with its values unpacked and its index in the list."""
    return [
        (i, unpack_row_values(body), truncated, seen, end)
        for i, (mtype, body, truncated, seen, end) in enumerate(got)
        if mtype == SUBJECT_VALUES
    ]


def end_of(data: bytes, message: bytes, after: int = 0) -> int:
    """Stream offset just past the first copy of ``message`` at or after ``after``."""
    at = data.index(message, after)
    return at + len(message)


def check_every_way(
    data: bytes, subjects: dict[tuple[int, int], int] | None = SUBJECTS, limit: int = 100
) -> Got:
    """Feed whole, byte by byte and at every single cut; all must agree, and
    the relay's entries must be those of a scanner with extraction off."""
    whole = feed_in_pieces(backend(subjects, limit), data, [])
    reference = feed_in_pieces(backend(None), data, [])
    assert relay_entries(whole) == reference
    assert feed_in_pieces(backend(subjects, limit), data, list(range(len(data)))) == whole
    for cut in range(1, len(data)):
        assert feed_in_pieces(backend(subjects, limit), data, [cut]) == whole, cut
    return whole


# --- the values ------------------------------------------------------------------

ONE_RESULT = (
    USERS_TEXT
    + data_row(b"1", b"alice", b"x")
    + data_row(None, b"bob", None)  # NULL subject: not a value, not seen
    + data_row(b"3", None, b"y")
    + data_row(b"", b"eve", None)  # empty but not NULL: a value
    + complete("SELECT 4")
    + READY
)


def test_values_of_one_result_in_one_chunk() -> None:
    got = backend().feed(ONE_RESULT)
    c_end = end_of(ONE_RESULT, complete("SELECT 4"))
    assert got == [
        (
            SUBJECT_VALUES,
            packed((CUSTOMER, 0, INT4, b"1"), (CUSTOMER, 0, INT4, b"3"), (CUSTOMER, 0, INT4, b"")),
            False,
            3,
            c_end,
        ),
        (ord("C"), b"SELECT 4\0", False, 4, c_end),  # DataRows still counted
        (ord("Z"), b"I", False, 0, len(ONE_RESULT)),
    ]


def test_one_result_every_way() -> None:
    got = check_every_way(ONE_RESULT)
    assert [entry[0] for entry in got] == [SUBJECT_VALUES, ord("C"), ord("Z")]


def test_binary_format_values_keep_their_format_and_type() -> None:
    data = (
        USERS_BINARY
        + data_row(struct.pack("!i", 42), b"alice")
        + data_row(struct.pack("!i", -7), None)
        + complete("SELECT 2")
        + READY
    )
    got = check_every_way(data)
    assert subject_entries(got) == [
        (
            0,
            [(CUSTOMER, 1, INT4, b"\0\0\0\x2a"), (CUSTOMER, 1, INT4, struct.pack("!i", -7))],
            False,
            2,
            end_of(data, complete("SELECT 2")),
        )
    ]


def test_subject_column_not_first_and_long_values() -> None:
    email = b"someone.with.a.long.address@example.org" * 50  # split by most cuts
    data = (
        ORDERS_TEXT + data_row(b"10", email) + data_row(b"20", None) + complete("SELECT 2") + READY
    )
    got = check_every_way(data)
    assert subject_entries(got) == [
        (0, [(EMAIL, 0, TEXT, email)], False, 1, end_of(data, complete("SELECT 2")))
    ]


def test_limit_keeps_the_first_values_and_counts_all() -> None:
    rows = b"".join(data_row(str(i).encode(), b"n", None) for i in range(10))
    data = USERS_TEXT + rows + complete("SELECT 10") + READY
    got = check_every_way(data, limit=3)
    assert subject_entries(got) == [
        (
            0,
            [(CUSTOMER, 0, INT4, b"0"), (CUSTOMER, 0, INT4, b"1"), (CUSTOMER, 0, INT4, b"2")],
            True,
            10,
            end_of(data, complete("SELECT 10")),
        )
    ]
    assert got[1] == (ord("C"), b"SELECT 10\0", False, 10, end_of(data, complete("SELECT 10")))


def test_limit_zero_counts_without_keeping() -> None:
    data = USERS_TEXT + data_row(b"1", b"a", None) + complete("SELECT 1") + READY
    got = backend(limit=0).feed(data)
    assert got is not None
    assert got[0] == (SUBJECT_VALUES, b"", True, 1, end_of(data, complete("SELECT 1")))


def test_portal_suspended_reports_each_batch() -> None:
    # Execute(max_rows=2), Execute(max_rows=0), Sync: the second batch comes
    # without a RowDescription and still belongs to the described result.
    data = (
        USERS_TEXT
        + data_row(b"1", b"a", None)
        + data_row(b"2", b"b", None)
        + SUSPENDED
        + data_row(b"3", b"c", None)
        + data_row(None, b"d", None)
        + complete("SELECT 2")
        + READY
    )
    got = check_every_way(data)
    s_end = end_of(data, SUSPENDED)
    c_end = end_of(data, complete("SELECT 2"))
    assert subject_entries(got) == [
        (0, [(CUSTOMER, 0, INT4, b"1"), (CUSTOMER, 0, INT4, b"2")], False, 2, s_end),
        (2, [(CUSTOMER, 0, INT4, b"3")], False, 1, c_end),
    ]
    assert got[1] == (ord("s"), b"", False, 2, s_end)
    assert got[3] == (ord("C"), b"SELECT 2\0", False, 2, c_end)


def test_ready_for_query_ends_the_described_result() -> None:
    # A portal resumed after a Sync sends rows with no RowDescription: they
    # are no longer attributed to columns (documented limitation).
    data = (
        USERS_TEXT
        + data_row(b"1", b"a", None)
        + SUSPENDED
        + READY
        + data_row(b"2", b"b", None)
        + complete("SELECT 1")
        + READY
    )
    got = check_every_way(data)
    assert [(i, values) for i, values, *_ in subject_entries(got)] == [
        (0, [(CUSTOMER, 0, INT4, b"1")])
    ]


def test_error_ends_a_result_with_its_values() -> None:
    data = USERS_TEXT + data_row(b"1", b"a", None) + ERROR + READY
    got = check_every_way(data)
    e_end = end_of(data, ERROR)
    assert subject_entries(got) == [(0, [(CUSTOMER, 0, INT4, b"1")], False, 1, e_end)]
    assert got[1][0] == ord("E") and got[1][4] == e_end


def test_two_statements_in_one_query() -> None:
    data = (
        USERS_TEXT
        + data_row(b"1", b"a", None)
        + complete("SELECT 1")
        + ORDERS_TEXT
        + data_row(b"5", b"x@example.org")
        + data_row(b"6", b"y@example.org")
        + complete("SELECT 2")
        + READY
    )
    got = check_every_way(data)
    first = end_of(data, complete("SELECT 1"))
    second = end_of(data, complete("SELECT 2"))
    assert subject_entries(got) == [
        (0, [(CUSTOMER, 0, INT4, b"1")], False, 1, first),
        (
            2,
            [(EMAIL, 0, TEXT, b"x@example.org"), (EMAIL, 0, TEXT, b"y@example.org")],
            False,
            2,
            second,
        ),
    ]
    assert [e[0] for e in got] == [SUBJECT_VALUES, ord("C"), SUBJECT_VALUES, ord("C"), ord("Z")]


def test_result_without_subject_columns_has_no_entry() -> None:
    data = (
        USERS_TEXT
        + data_row(b"1", b"a", None)
        + complete("SELECT 1")
        + NO_SUBJECTS
        + data_row(b"1", b"1")
        + data_row(b"2", b"2")
        + complete("SELECT 2")
        + complete("UPDATE 3")  # no rows at all: no entry either
        + EMPTY_QUERY
        + READY
    )
    got = check_every_way(data)
    assert [(i, seen) for i, _v, _t, seen, _e in subject_entries(got)] == [(0, 1)]


def test_all_null_subjects_give_no_entry() -> None:
    data = USERS_TEXT + data_row(None, b"a", None) + complete("SELECT 1") + READY
    assert subject_entries(check_every_way(data)) == []


def test_off_by_default_and_after_none() -> None:
    off = MessageScanner(P.BACKEND_CAPTURE, P.BACKEND_COUNT, None, 1 << 20, 64)
    reference = off.feed(ONE_RESULT)
    assert reference is not None and subject_entries(reference) == []
    turned_off = backend()
    turned_off.set_row_subjects(None, 5)
    assert turned_off.feed(ONE_RESULT) == reference
    assert subject_entries(check_every_way(ONE_RESULT, subjects=None)) == []


def test_a_change_takes_effect_at_the_next_row_description() -> None:
    head = USERS_TEXT + data_row(b"1", b"a", None)
    tail = data_row(b"2", b"b", None) + complete("SELECT 2") + USERS_TEXT
    tail += data_row(b"3", b"c", None) + complete("SELECT 1") + READY
    # Turned off mid-result: the result being read still reports, the next not.
    scanner = backend()
    assert scanner.feed(head) is None
    scanner.set_row_subjects(None, 0)
    got = scanner.feed(tail) or []
    assert [(values, seen) for _i, values, _t, seen, _e in subject_entries(got)] == [
        ([(CUSTOMER, 0, INT4, b"1"), (CUSTOMER, 0, INT4, b"2")], 2)
    ]
    # Turned on mid-result: only the next described result reports.
    scanner = backend(None)
    assert scanner.feed(head) is None
    scanner.set_row_subjects(SUBJECTS, 1)
    got = scanner.feed(tail) or []
    assert [(values, seen) for _i, values, _t, seen, _e in subject_entries(got)] == [
        ([(CUSTOMER, 0, INT4, b"3")], 1)
    ]


def test_row_description_is_reported_only_when_captured() -> None:
    scanner = MessageScanner(P.BACKEND_CAPTURE + b"T", P.BACKEND_COUNT, None, 1 << 20, 1 << 10)
    scanner.set_row_subjects(SUBJECTS, 10)
    got = feed_in_pieces(scanner, ONE_RESULT, [3, 20])
    assert got[0] == (ord("T"), USERS_TEXT[5:], False, 0, len(USERS_TEXT))
    assert got[1][0] == SUBJECT_VALUES and got[1][3] == 3


# --- malformed input -------------------------------------------------------------

MALFORMED_ROW_DESCRIPTIONS = [
    b"",
    b"\x00",
    struct.pack("!h", -1),
    struct.pack("!h", 2) + field("id", USERS, 1, INT4),  # one field short
    struct.pack("!h", 1) + b"id",  # name without NUL
    struct.pack("!h", 1) + field("id", USERS, 1, INT4)[:-3],  # field cut short
    struct.pack("!h", 1) + field("id", USERS, 1, INT4) + b"junk",  # trailing bytes
    struct.pack("!h", 1) + field("id", USERS, 1, INT4, fmt=2),  # no such format
]


@pytest.mark.parametrize("body", MALFORMED_ROW_DESCRIPTIONS)
def test_malformed_row_description_leaves_the_result_unwatched(body: bytes) -> None:
    data = msg(b"T", body) + data_row(b"1") + complete("SELECT 1") + READY
    assert subject_entries(check_every_way(data)) == []


MALFORMED_ROWS = [
    b"",
    b"\x00",
    struct.pack("!h", 2) + struct.pack("!i", 1) + b"1",  # fewer columns than described
    struct.pack("!h", 4) + (struct.pack("!i", 1) + b"1") * 4,  # more columns
    struct.pack("!h", 3) + struct.pack("!i", -2),  # negative length
    struct.pack("!h", 3) + struct.pack("!i", 50) + b"1",  # value overruns the row
    struct.pack("!h", 3) + b"\x00\x00",  # ends inside a length
    struct.pack("!h", -3),
]


@pytest.mark.parametrize("body", MALFORMED_ROWS)
def test_malformed_data_row_gives_no_values(body: bytes) -> None:
    data = (
        USERS_TEXT
        + msg(b"D", body)
        + data_row(b"2", b"b", None)  # the rest of that result is not read
        + complete("SELECT 2")
        + USERS_TEXT
        + data_row(b"3", b"c", None)  # the next result is
        + complete("SELECT 1")
        + READY
    )
    got = check_every_way(data)
    assert [(values, seen) for _i, values, _t, seen, _e in subject_entries(got)] == [
        ([(CUSTOMER, 0, INT4, b"3")], 1)
    ]


def test_malformed_row_gives_back_its_values_but_keeps_earlier_ones() -> None:
    data = (
        ORDERS_TEXT
        + data_row(b"1", b"kept@example.org")
        + msg(b"D", struct.pack("!hi", 2, 1) + b"9" + struct.pack("!i", 99) + b"cut")
        + complete("SELECT 2")
        + READY
    )
    got = check_every_way(data)
    assert [(values, seen) for _i, values, _t, seen, _e in subject_entries(got)] == [
        ([(EMAIL, 0, TEXT, b"kept@example.org")], 1)
    ]


def test_oversized_row_description_is_not_buffered() -> None:
    huge = row_description(field("x" * (1 << 20), USERS, 1, INT4))
    data = huge + data_row(b"1") + complete("SELECT 1") + READY
    for cuts in ([], [100, len(huge) - 3]):
        scanner = MessageScanner(P.BACKEND_CAPTURE, P.BACKEND_COUNT, None, 1 << 21, 64)
        scanner.set_row_subjects(SUBJECTS, 10)
        assert subject_entries(feed_in_pieces(scanner, data, cuts)) == []


_ANY_BODY = st.binary(max_size=40) | st.sampled_from(
    [*MALFORMED_ROW_DESCRIPTIONS, *MALFORMED_ROWS, USERS_TEXT[5:], data_row(b"1", b"a", None)[5:]]
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(b"TDCsEIZ"), _ANY_BODY), max_size=12),
    st.lists(st.integers(min_value=1, max_value=600), max_size=8),
    st.integers(min_value=0, max_value=3),
)
def test_arbitrary_bodies_never_break_the_framing(
    messages: list[tuple[int, bytes]], cuts: list[int], limit: int
) -> None:
    data = b"".join(msg(bytes((t,)), body) for t, body in messages)
    got = feed_in_pieces(backend(limit=limit), data, cuts)
    assert relay_entries(got) == feed_in_pieces(backend(None), data, [])
    for i, values, truncated, seen, end in subject_entries(got):
        assert got[i + 1][0] in b"CsEI" and got[i + 1][4] == end
        assert len(values) == min(seen, limit) and truncated == (seen > limit)


# --- random splits of a stream with everything in it ----------------------------

MIXED = (
    USERS_TEXT
    + data_row(b"1", b"alice", b"x")
    + data_row(None, None, None)
    + SUSPENDED
    + data_row(b"22", b"bob", None)
    + complete("SELECT 2")
    + USERS_BINARY
    + data_row(struct.pack("!i", 7), b"carol")
    + ERROR
    + READY
    + NO_SUBJECTS
    + data_row(b"1", b"2")
    + complete("SELECT 1")
    + ORDERS_TEXT
    + b"".join(data_row(b"9", b"dave%d@example.org" % i) for i in range(5))
    + complete("SELECT 5")
    + READY
)
MIXED_WHOLE = feed_in_pieces(backend(limit=3), MIXED, [])


def test_mixed_stream_entries() -> None:
    assert [
        (i, [v[3] for v in values], truncated, seen)
        for i, values, truncated, seen, _e in subject_entries(MIXED_WHOLE)
    ] == [
        (0, [b"1"], False, 1),
        (2, [b"22"], False, 1),
        (4, [b"\0\0\0\x07"], False, 1),
        (8, [b"dave0@example.org", b"dave1@example.org", b"dave2@example.org"], True, 5),
    ]
    assert relay_entries(MIXED_WHOLE) == feed_in_pieces(backend(None), MIXED, [])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(MIXED) - 1), max_size=30))
def test_mixed_stream_random_splits(cuts: list[int]) -> None:
    assert feed_in_pieces(backend(limit=3), MIXED, cuts) == MIXED_WHOLE
    assert relay_entries(MIXED_WHOLE) == feed_in_pieces(backend(None), MIXED, cuts)


def test_mixed_stream_byte_at_a_time() -> None:
    scanner = backend(limit=3)
    assert feed_in_pieces(scanner, MIXED, list(range(len(MIXED)))) == MIXED_WHOLE
    assert scanner.at_boundary


# --- the API around it -------------------------------------------------------------


def test_unpack_stops_at_a_cut() -> None:
    whole = packed((1, 0, TEXT, b"abc"), (2, 1, INT4, b"\0\0\0\1"))
    values = unpack_row_values(whole)
    assert values == [(1, 0, TEXT, b"abc"), (2, 1, INT4, b"\0\0\0\1")]
    for cut in range(len(whole)):
        expected = values[:1] if cut >= 13 else []
        assert unpack_row_values(whole[:cut]) == expected, cut


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_unpack_never_crashes(data: bytes) -> None:
    for kind, fmt, type_oid, value in unpack_row_values(data):
        assert 0 <= kind <= 255 and 0 <= fmt <= 255 and 0 <= type_oid < 1 << 32
        assert len(value) <= len(data) - 10


@pytest.mark.parametrize(
    ("columns", "limit", "error"),
    [
        ({(USERS, 1): 0}, -1, ValueError),
        ({(USERS, 1): 256}, 1, ValueError),
        ({(0, 1): 0}, 1, ValueError),
        ({(USERS, 40_000): 0}, 1, ValueError),
        ({(USERS,): 0}, 1, TypeError),
        ({(USERS, "id"): 0}, 1, TypeError),
    ],
)
def test_set_row_subjects_rejects_bad_settings(
    columns: dict[tuple[int, int], int], limit: int, error: type[Exception]
) -> None:
    scanner = backend()
    with pytest.raises(error):
        scanner.set_row_subjects(columns, limit)
    got = scanner.feed(ONE_RESULT)  # the earlier setting stands
    assert got is not None and got[0][3] == 3


# --- results that start at a BindComplete: shapes queued by the client side -------
#
# A driver that prepares once (asyncpg) gets the RowDescription when it
# prepares, then runs Bind + Execute + Sync: those results start with
# BindComplete and go straight to DataRows.  The tracker pushes, for every
# Bind, the description it remembers for the statement (and the Bind itself,
# for its result formats) and a ready marker for every Sync, Query or
# FunctionCall.  A script interleaves those pushes with the backend bytes.

PARSE_COMPLETE = msg(b"1", b"")
BIND_COMPLETE = msg(b"2", b"")


def int4(value: int) -> bytes:
    return struct.pack("!i", value)


def parameter_description(*oids: int) -> bytes:
    return msg(b"t", struct.pack("!h", len(oids)) + b"".join(struct.pack("!I", o) for o in oids))


def bind_body(
    params: tuple[bytes | None, ...] = (),
    result_formats: tuple[int, ...] = (),
    statement: bytes = b"stmt",
    portal: bytes = b"",
) -> bytes:
    """A Bind body: names, no parameter format codes (text), parameters, result formats."""
    body = portal + b"\0" + statement + b"\0" + struct.pack("!hh", 0, len(params))
    for value in params:
        body += struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value
    return body + struct.pack(f"!h{len(result_formats)}h", len(result_formats), *result_formats)


@dataclass(frozen=True)
class Bind:
    """The client sent a Bind: the tracker pushes the statement's description."""

    description: bytes | None
    bind: bytes | None = None


class Ready:
    """The client sent a Sync, a simple Query or a FunctionCall."""


SYNC = Ready()
Script = list[bytes | Bind | Ready]

USERS_DESCRIBED = USERS_TEXT[5:]  # as Describe(statement) gives it: every format 0
ORDERS_DESCRIBED = ORDERS_TEXT[5:]
NO_SUBJECTS_DESCRIBED = NO_SUBJECTS[5:]
BINARY_RESULTS = bind_body((b"1",), (1,))  # asyncpg asks for binary results


def backend_bytes(script: Script) -> bytes:
    return b"".join(step for step in script if isinstance(step, bytes))


def play(
    scanner: MessageScanner,
    script: Script,
    cuts: Sequence[int] = (),
    queued: list[int] | None = None,
) -> Got:
    """Run ``script``: pushes in order, backend bytes cut at the stream offsets
    ``cuts``; ``queued`` gets the queue's length after each step."""
    out: Got = []
    offset = 0
    for step in script:
        if isinstance(step, Bind):
            if step.bind is None:
                scanner.push_row_description(step.description)
            else:
                scanner.push_row_description(step.description, step.bind)
        elif isinstance(step, Ready):
            scanner.push_ready_marker()
        else:
            local = [c - offset for c in cuts if offset < c < offset + len(step)]
            got = feed_in_pieces(scanner, step, local)
            out.extend((t, b, tr, c, offset + end) for t, b, tr, c, end in got)
            offset += len(step)
        if queued is not None:
            queued.append(scanner.queued)
    return out


def play_off(script: Script, cuts: Sequence[int] = ()) -> Got:
    """The reference: extraction off, where pushes cost nothing and queue nothing."""
    queued: list[int] = []
    got = play(backend(None), script, cuts, queued)
    assert set(queued) <= {0}
    return got


def check_script(script: Script, subjects: dict[tuple[int, int], int] | None = SUBJECTS) -> Got:
    """Play whole and a byte at a time; both must agree, the queue must be
    empty at the end, and the relay's entries must be those with extraction off."""
    scanner = backend(subjects)
    whole = play(scanner, script)
    assert scanner.queued == 0
    data = backend_bytes(script)
    assert play(backend(subjects), script, list(range(len(data)))) == whole
    off = play_off(script)
    assert relay_entries(whole) == off
    assert subject_entries(off) == []
    return whole


def values_of(got: Got) -> list[tuple[list[Value], int]]:
    return [(values, seen) for _i, values, _t, seen, _e in subject_entries(got)]


ASYNCPG_PREPARE: Script = [
    SYNC,  # Parse + Describe(statement) + Sync: no Bind, one ReadyForQuery
    PARSE_COMPLETE + parameter_description(INT4) + USERS_TEXT + READY,
]
ASYNCPG_RUN_1: Script = [
    Bind(USERS_DESCRIBED, BINARY_RESULTS),
    SYNC,  # Bind + Execute + Sync
    BIND_COMPLETE
    + data_row(int4(1), b"alice", b"x")
    + data_row(None, b"bob", None)
    + data_row(int4(2), b"carol", None)
    + complete("SELECT 3")
    + READY,
]
ASYNCPG_RUN_2: Script = [
    Bind(USERS_DESCRIBED, BINARY_RESULTS),
    SYNC,
    BIND_COMPLETE + data_row(int4(3), b"dave", None) + complete("SELECT 1") + READY,
]
ASYNCPG_VALUES = [
    ([(CUSTOMER, 1, INT4, int4(1)), (CUSTOMER, 1, INT4, int4(2))], 2),
    ([(CUSTOMER, 1, INT4, int4(3))], 1),
]


def test_asyncpg_prepared_statement_runs() -> None:
    script = ASYNCPG_PREPARE + ASYNCPG_RUN_1 + ASYNCPG_RUN_2
    got = check_script(script)
    assert values_of(got) == ASYNCPG_VALUES
    data = backend_bytes(script)
    first = end_of(data, complete("SELECT 3"))
    second = end_of(data, complete("SELECT 1"))
    assert [(e[0], e[4]) for e in got] == [
        (ord("t"), len(PARSE_COMPLETE + parameter_description(INT4))),
        (ord("Z"), len(backend_bytes(ASYNCPG_PREPARE))),
        (SUBJECT_VALUES, first),
        (ord("C"), first),
        (ord("Z"), first + len(READY)),
        (SUBJECT_VALUES, second),
        (ord("C"), second),
        (ord("Z"), len(data)),
    ]
    assert got[3][3] == 3  # the DataRows are still counted


def test_asyncpg_runs_pushed_before_any_answer() -> None:
    pushes: Script = [step for step in ASYNCPG_RUN_1 + ASYNCPG_RUN_2 if not isinstance(step, bytes)]
    answers: Script = [step for step in ASYNCPG_RUN_1 + ASYNCPG_RUN_2 if isinstance(step, bytes)]
    got = check_script(ASYNCPG_PREPARE + pushes + answers)
    assert values_of(got) == ASYNCPG_VALUES


@pytest.mark.parametrize(
    ("formats", "expected"),
    [
        ((), [(CUSTOMER, 0, INT4, b"7")]),  # no codes: all text
        ((0,), [(CUSTOMER, 0, INT4, b"7")]),
        ((1, 0, 0), [(CUSTOMER, 1, INT4, b"7")]),  # one per column
        ((0, 1, 1), [(CUSTOMER, 0, INT4, b"7")]),
        ((1, 1), []),  # neither one nor one per column: not read
        ((2,), []),  # no such format
    ],
)
def test_bind_result_formats_give_the_formats(
    formats: tuple[int, ...], expected: list[Value]
) -> None:
    script: Script = [
        Bind(USERS_DESCRIBED, bind_body((None, b"abc"), formats)),
        SYNC,
        BIND_COMPLETE + data_row(b"7", b"a", None) + complete("SELECT 1") + READY,
    ]
    assert [values for values, _seen in values_of(check_script(script))] == (
        [expected] if expected else []
    )


def test_bind_cut_short_leaves_the_result_unwatched() -> None:
    bind = bind_body((b"1", None, b"xyz"), (1,))
    run = BIND_COMPLETE + data_row(int4(1), b"a", None) + complete("SELECT 1") + READY
    for cut in range(len(bind)):
        got = play(backend(), [Bind(USERS_DESCRIBED, bind[:cut]), SYNC, run])
        assert values_of(got) == [], cut
    got = check_script([Bind(USERS_DESCRIBED, bind), SYNC, run])
    assert values_of(got) == [([(CUSTOMER, 1, INT4, int4(1))], 1)]


def test_without_bind_the_description_formats_stand() -> None:
    script: Script = [
        Bind(USERS_BINARY[5:]),
        SYNC,
        BIND_COMPLETE + data_row(int4(5), b"a") + complete("SELECT 1") + READY,
    ]
    assert values_of(check_script(script)) == [([(CUSTOMER, 1, INT4, int4(5))], 1)]


# Bind, Execute three times, one Sync; the second fails, so the server skips
# the third Bind: its entry goes with the ReadyForQuery, and the next batch
# is read with its own description (with the third's it would not match).
FAILED_PIPELINE: Script = [
    Bind(USERS_DESCRIBED),
    Bind(ORDERS_DESCRIBED),
    Bind(USERS_DESCRIBED),
    SYNC,
    BIND_COMPLETE
    + data_row(b"1", b"a", None)
    + complete("SELECT 1")
    + BIND_COMPLETE
    + data_row(b"10", b"x@example.org")
    + ERROR
    + READY,
    Bind(ORDERS_DESCRIBED),
    SYNC,
    BIND_COMPLETE + data_row(b"20", b"y@example.org") + complete("SELECT 1") + READY,
]


def test_failed_pipeline_discards_the_skipped_binds() -> None:
    got = check_script(FAILED_PIPELINE)
    assert values_of(got) == [
        ([(CUSTOMER, 0, INT4, b"1")], 1),
        ([(EMAIL, 0, TEXT, b"x@example.org")], 1),
        ([(EMAIL, 0, TEXT, b"y@example.org")], 1),
    ]
    data = backend_bytes(FAILED_PIPELINE)
    assert subject_entries(got)[1][4] == end_of(data, ERROR)


def test_failed_pipeline_with_the_next_batch_pushed_early() -> None:
    # The next batch is sent before the failure is answered: still aligned.
    script = FAILED_PIPELINE[:4] + FAILED_PIPELINE[5:7] + [FAILED_PIPELINE[4], FAILED_PIPELINE[7]]
    assert values_of(check_script(script)) == values_of(check_script(FAILED_PIPELINE))


# psycopg: Parse + Bind + Describe(portal) + Execute + Sync.  The tracker has
# no description for the unnamed statement yet: the RowDescription comes.
PORTAL_DESCRIBED: Script = [
    Bind(None),
    SYNC,
    PARSE_COMPLETE
    + BIND_COMPLETE
    + USERS_TEXT
    + data_row(b"1", b"a", None)
    + data_row(b"2", b"b", None)
    + complete("SELECT 2")
    + READY,
]


def test_unknown_description_then_describe_portal() -> None:
    got = check_script(PORTAL_DESCRIBED)
    assert values_of(got) == [([(CUSTOMER, 0, INT4, b"1"), (CUSTOMER, 0, INT4, b"2")], 2)]


@pytest.mark.parametrize(
    ("queued", "sent", "values"),
    [
        (NO_SUBJECTS_DESCRIBED, USERS_TEXT, [b"1"]),  # the real one replaces the queued one
        (USERS_DESCRIBED, row_description(*[field("c")] * 3), []),
    ],
)
def test_row_description_after_bind_complete_replaces_the_queued_one(
    queued: bytes, sent: bytes, values: list[bytes]
) -> None:
    script: Script = [
        Bind(queued),
        SYNC,
        BIND_COMPLETE + sent + data_row(b"1", b"a", None) + complete("SELECT 1") + READY,
    ]
    assert [[v[3] for v in vs] for vs, _seen in values_of(check_script(script))] == (
        [values] if values else []
    )


def test_unknown_description_without_describe_reads_nothing() -> None:
    # Nor are the columns of a suspended portal carried over to a new one.
    script: Script = [
        Bind(USERS_DESCRIBED),
        Bind(None),
        SYNC,
        BIND_COMPLETE
        + data_row(b"1", b"a", None)
        + SUSPENDED
        + BIND_COMPLETE
        + data_row(b"2", b"b", None)
        + complete("SELECT 1")
        + READY,
    ]
    assert values_of(check_script(script)) == [([(CUSTOMER, 0, INT4, b"1")], 1)]


# A simple Query between extended batches: its ReadyForQuery takes its own
# marker off, not the next batch's Bind.
QUERY_BETWEEN: Script = [
    Bind(USERS_DESCRIBED),
    SYNC,
    SYNC,  # the Query
    Bind(ORDERS_DESCRIBED),
    SYNC,
    BIND_COMPLETE + data_row(b"1", b"a", None) + complete("SELECT 1") + READY,
    USERS_TEXT + data_row(b"2", b"b", None) + complete("SELECT 1") + READY,
    BIND_COMPLETE + data_row(b"3", b"z@example.org") + complete("SELECT 1") + READY,
]


def test_simple_query_between_extended_batches() -> None:
    assert values_of(check_script(QUERY_BETWEEN)) == [
        ([(CUSTOMER, 0, INT4, b"1")], 1),
        ([(CUSTOMER, 0, INT4, b"2")], 1),
        ([(EMAIL, 0, TEXT, b"z@example.org")], 1),
    ]


def test_failed_simple_query_between_extended_batches() -> None:
    script: Script = [
        Bind(USERS_DESCRIBED),
        SYNC,
        SYNC,
        Bind(ORDERS_DESCRIBED),
        SYNC,
        BIND_COMPLETE + data_row(b"1", b"a", None) + complete("SELECT 1") + READY,
        ERROR + READY,
        BIND_COMPLETE + data_row(b"3", b"z@example.org") + complete("SELECT 1") + READY,
    ]
    assert [vs[0][3] for vs, _seen in values_of(check_script(script))] == [b"1", b"z@example.org"]


def test_bind_complete_with_no_bind_entry_takes_nothing_off() -> None:
    # Misaligned (the entry is a ready marker, or there is none): the result
    # is not read and the marker stays for its ReadyForQuery.
    run = BIND_COMPLETE + data_row(b"1", b"a", None) + complete("SELECT 1") + READY
    script: Script = [SYNC, run, BIND_COMPLETE + data_row(b"2", b"b", None) + complete("SELECT 1")]
    script += [READY, Bind(USERS_DESCRIBED), SYNC, run]
    scanner = backend()
    scanner.push_ready_marker()
    assert scanner.feed(BIND_COMPLETE) is None
    assert scanner.queued == 1
    assert values_of(check_script(script)) == [([(CUSTOMER, 0, INT4, b"1")], 1)]


def test_ready_without_marker_empties_the_queue() -> None:
    scanner = backend()
    scanner.push_row_description(USERS_DESCRIBED)
    scanner.push_row_description(USERS_DESCRIBED)
    assert scanner.queued == 2
    assert scanner.feed(READY) == [(ord("Z"), b"I", False, 0, len(READY))]
    assert scanner.queued == 0


# --- the bound ---------------------------------------------------------------------


def test_4097th_push_empties_the_queue_until_ready() -> None:
    scanner = backend()
    for _ in range(4096):
        scanner.push_row_description(USERS_DESCRIBED)
    assert scanner.queued == 4096
    scanner.push_row_description(USERS_DESCRIBED)  # the 4097th
    assert scanner.queued == 0
    scanner.push_ready_marker()
    scanner.push_row_description(USERS_DESCRIBED)
    assert scanner.queued == 0  # ignored: only counted
    run = BIND_COMPLETE + data_row(b"1", b"a", None) + complete("SELECT 1")
    assert values_of(play(scanner, [run * 4097 + READY])) == []
    # Answered: the Bind pushed after the marker is still to come.
    assert values_of(play(scanner, [Bind(USERS_DESCRIBED), SYNC, run, run + READY])) == [
        ([(CUSTOMER, 0, INT4, b"1")], 1)
    ]
    assert scanner.queued == 0


def _overflowing_pipeline() -> tuple[Script, list[list[bytes]]]:
    """2049 batches of Bind + Sync pipelined (4098 pushes: the queue
    overflows), whose results have three columns and no subject.  After the
    first answer the client pushes one more batch of USERS, still counted;
    once everything is answered, a last batch is read again."""
    plain = data_row(b"1", b"a", None)  # three columns, like USERS_TEXT
    batch = BIND_COMPLETE + plain + complete("SELECT 1") + READY
    script: Script = [step for _ in range(2049) for step in (Bind(None), SYNC)]
    script += [batch, Bind(USERS_DESCRIBED), SYNC, batch * 2048]
    script += [BIND_COMPLETE + data_row(b"2", b"b", None) + complete("SELECT 1") + READY]
    script += [Bind(USERS_DESCRIBED), SYNC]
    script += [BIND_COMPLETE + data_row(b"3", b"c", None) + complete("SELECT 1") + READY]
    return script, [[b"2"], [b"3"]]


def test_overflow_stays_aligned_across_pipelined_syncs() -> None:
    # Had the pushes after the first ReadyForQuery been queued, the USERS
    # description would have been applied to the next (subject-free) result.
    script, _ = _overflowing_pipeline()
    scanner = backend()
    got = play(scanner, script[:4098])
    assert got == [] and scanner.queued == 0
    got = play(scanner, script[4098:])
    assert [[v[3] for v in vs] for vs, _seen in values_of(got)] == [[b"3"]]
    assert scanner.queued == 0


@settings(max_examples=10, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=130_000), max_size=40))
def test_overflow_random_splits(cuts: list[int]) -> None:
    script, _ = _overflowing_pipeline()
    whole = play(backend(), script)
    assert play(backend(), script, cuts) == whole
    assert relay_entries(whole) == play(backend(None), script, cuts)


# --- extraction off, on and off again --------------------------------------------------


def test_pushes_while_off_queue_nothing() -> None:
    scanner = backend(None)
    for _ in range(10_000):
        scanner.push_row_description(USERS_DESCRIBED, BINARY_RESULTS)
        scanner.push_ready_marker()
    assert scanner.queued == 0
    script = ASYNCPG_PREPARE + ASYNCPG_RUN_1 + ASYNCPG_RUN_2
    assert subject_entries(play(scanner, script)) == []
    assert scanner.queued == 0


def test_turning_off_empties_the_queue_and_on_starts_empty() -> None:
    scanner = backend()
    scanner.push_row_description(USERS_DESCRIBED)
    scanner.push_ready_marker()
    assert scanner.queued == 2
    scanner.set_row_subjects(None, 10)
    assert scanner.queued == 0
    scanner.push_row_description(USERS_DESCRIBED)
    assert scanner.queued == 0
    scanner.set_row_subjects(SUBJECTS, 10)
    assert scanner.queued == 0
    assert values_of(play(scanner, ASYNCPG_RUN_1)) == ASYNCPG_VALUES[:1]


def test_a_new_setting_keeps_the_queue_and_applies_at_bind_complete() -> None:
    scanner = backend()
    play(scanner, ASYNCPG_RUN_1[:2])
    scanner.set_row_subjects({(USERS, 1): EMAIL}, 1)
    got = play(scanner, ASYNCPG_RUN_1[2:])
    assert values_of(got) == [([(EMAIL, 1, INT4, int4(1))], 2)]


def test_push_takes_bytes_only() -> None:
    scanner = backend()
    with pytest.raises(TypeError):
        scanner.push_row_description(bytearray(USERS_DESCRIBED))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        scanner.push_row_description(USERS_DESCRIBED, "bind")  # type: ignore[arg-type]
    assert scanner.queued == 0


# --- random splits of every script, and random scripts ----------------------------------

SCRIPTS: list[tuple[Script, list[list[bytes]]]] = [
    (ASYNCPG_PREPARE + ASYNCPG_RUN_1 + ASYNCPG_RUN_2, [[int4(1), int4(2)], [int4(3)]]),
    (FAILED_PIPELINE, [[b"1"], [b"x@example.org"], [b"y@example.org"]]),
    (PORTAL_DESCRIBED, [[b"1", b"2"]]),
    (QUERY_BETWEEN, [[b"1"], [b"2"], [b"z@example.org"]]),
]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(range(len(SCRIPTS))), st.lists(st.integers(min_value=1), max_size=20))
def test_scripts_random_splits(which: int, cuts: list[int]) -> None:
    script, expected = SCRIPTS[which]
    size = len(backend_bytes(script))
    cuts = [1 + c % (size - 1) for c in cuts]
    scanner = backend()
    got = play(scanner, script, cuts)
    assert [[v[3] for v in vs] for vs, _seen in values_of(got)] == expected
    assert scanner.queued == 0
    off = backend(None)
    assert play(off, script, cuts) == relay_entries(got)
    assert off.queued == 0


_PUSH = st.builds(
    Bind,
    st.sampled_from([None, USERS_DESCRIBED, ORDERS_DESCRIBED, *MALFORMED_ROW_DESCRIPTIONS]),
    st.none() | st.sampled_from([BINARY_RESULTS, bind_body()]) | st.binary(max_size=24),
) | st.just(SYNC)
_ANSWER = st.lists(st.tuples(st.sampled_from(b"2TDCsEIZ"), _ANY_BODY), min_size=1, max_size=6).map(
    lambda messages: b"".join(msg(bytes((t,)), body) for t, body in messages)
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(_PUSH | _ANSWER, max_size=16),
    st.lists(st.integers(min_value=1, max_value=600), max_size=8),
)
def test_arbitrary_scripts_never_break_the_framing(
    script: list[bytes | Bind | Ready], cuts: list[int]
) -> None:
    scanner = backend(limit=2)
    got = play(scanner, script, cuts)
    assert got == play(backend(limit=2), script)
    assert relay_entries(got) == play(backend(None), script, cuts)
    for i, values, truncated, seen, end in subject_entries(got):
        assert got[i + 1][0] in b"CsEI" and got[i + 1][4] == end
        assert len(values) == min(seen, 2) and truncated == (seen > 2)
    assert 0 <= scanner.queued <= 16
