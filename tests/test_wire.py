"""The Cython framer on its own: framing across every split, limits, body parsers."""

from __future__ import annotations

import contextlib
import re
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scalple import protocol as P
from scalple._wire import (
    MessageScanner,
    ProtocolViolation,
    identity_hint,
    parse_bind,
    parse_close,
    parse_execute,
    parse_parse,
)


def msg(mtype: bytes, body: bytes) -> bytes:
    return P.build_message(mtype, body)


def backend() -> MessageScanner:
    return MessageScanner(P.BACKEND_CAPTURE, P.BACKEND_COUNT, None, 1 << 20, 64)


def frontend(max_length: int = 1 << 20, capture_limit: int = 1 << 20) -> MessageScanner:
    return MessageScanner(P.FRONTEND_CAPTURE, b"", P.FRONTEND_ALLOWED, max_length, capture_limit)


RESULT = (
    msg(b"T", b"\x00\x01a\x00" + b"\x00" * 18)
    + msg(b"D", b"\x00\x01\x00\x00\x00\x011") * 3
    + msg(b"C", b"SELECT 3\x00")
    + msg(b"C", b"UPDATE 2\x00")
    + msg(b"Z", b"I")
)
_END_C1 = 27 + 3 * 12 + 14  # RowDescription, three DataRows, the first CommandComplete
EXPECTED = [
    (ord("C"), b"SELECT 3\x00", False, 3, _END_C1),
    (ord("C"), b"UPDATE 2\x00", False, 0, _END_C1 + 14),
    (ord("Z"), b"I", False, 0, len(RESULT)),
]

Got = list[tuple[int, bytes, bool, int, int]]


def feed_in_pieces(scanner: MessageScanner, data: bytes, cuts: list[int]) -> Got:
    """Feed ``data`` cut at ``cuts``; ends are turned into stream offsets."""
    out: Got = []
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        got = scanner.feed(data[start:cut]) or []
        out.extend((t, b, tr, c, start + end) for t, b, tr, c, end in got)
        start = cut
    return out


def test_whole_chunk() -> None:
    scanner = backend()
    assert scanner.feed(RESULT) == EXPECTED
    assert scanner.at_boundary
    assert scanner.messages == 7


def test_every_single_split_gives_the_same_messages() -> None:
    for cut in range(1, len(RESULT)):
        scanner = backend()
        assert feed_in_pieces(scanner, RESULT, [cut]) == EXPECTED, cut
        assert scanner.at_boundary


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(RESULT) - 1), max_size=20))
def test_arbitrary_splits(cuts: list[int]) -> None:
    assert feed_in_pieces(backend(), RESULT, cuts) == EXPECTED


def test_byte_at_a_time() -> None:
    scanner = backend()
    assert feed_in_pieces(scanner, RESULT, list(range(1, len(RESULT)))) == EXPECTED


def test_not_at_boundary_mid_message() -> None:
    scanner = backend()
    scanner.feed(RESULT[:9])
    assert not scanner.at_boundary
    assert scanner.pending_type == ord("T") and scanner.pending_start == 0


def test_pending_message_position() -> None:
    scanner = backend()
    scanner.feed(RESULT[:30])  # RowDescription whole, a DataRow begun at 27
    assert (scanner.pending_type, scanner.pending_start) == (ord("D"), 27)
    scanner.feed(RESULT[30:32])  # still inside that DataRow: it began earlier
    assert (scanner.pending_type, scanner.pending_start) == (ord("D"), -1)
    scanner.feed(RESULT[32:])
    assert (scanner.pending_type, scanner.pending_start) == (-1, -1)
    split_header = backend()
    split_header.feed(RESULT[:29])  # two bytes of the DataRow header
    assert (split_header.pending_type, split_header.pending_start) == (ord("D"), 27)


def test_capture_limit_truncates_but_frames_correctly() -> None:
    long_tag = b"X" * 200 + b"\x00"
    data = msg(b"C", long_tag) + msg(b"Z", b"I")
    for cut in (0, 3, 50, 150):
        scanner = backend()
        got = feed_in_pieces(scanner, data, [cut] if cut else [])
        assert got[0][1] == long_tag[:64] and got[0][2] is True
        assert got[1] == (ord("Z"), b"I", False, 0, len(data))


def test_unknown_frontend_type_is_a_violation() -> None:
    scanner = frontend()
    with pytest.raises(ProtocolViolation, match="unknown message type") as info:
        scanner.feed(msg(b"Q", b"select 1\x00") + msg(b"!", b""))
    assert info.value.offset == 14


@pytest.mark.parametrize("length", [0, 1, 3])
def test_length_below_four_is_a_violation(length: int) -> None:
    with pytest.raises(ProtocolViolation, match="invalid message length"):
        frontend().feed(b"Q" + struct.pack("!I", length))


def test_oversize_is_a_violation_before_the_body_arrives() -> None:
    with pytest.raises(ProtocolViolation, match="over the limit of 1024"):
        frontend(max_length=1024).feed(b"Q" + struct.pack("!I", 5000))


def test_legal_but_uncaptured_types_pass() -> None:
    scanner = frontend()
    assert scanner.feed(msg(b"d", b"1\t2\n") + msg(b"H", b"")) is None
    assert scanner.messages == 2


def test_parse_execute_close_bodies() -> None:
    assert parse_parse(b"stmt\x00select $1\x00\x00\x00") == (b"stmt", b"select $1", ())
    assert parse_parse(b"\x00q\x00\x00\x01\x00\x00\x00\x17")[2] == (23,)
    assert parse_execute(b"\x00\x00\x00\x00\x0a") == (b"", 10)
    assert parse_close(b"Sname\x00") == (b"S", b"name")


def test_parse_bind_formats() -> None:
    body = (
        b"portal\x00stmt\x00"
        + struct.pack("!hhh", 2, 0, 1)  # two format codes: text, binary
        + struct.pack("!h", 2)
        + struct.pack("!i", 2)
        + b"42"
        + struct.pack("!i", 4)
        + b"\x00\x00\x00\x07"
        + struct.pack("!h", 0)
    )
    portal, statement, params = parse_bind(body)
    assert (portal, statement) == (b"portal", b"stmt")
    assert params == (b"42", bytearray(b"\x00\x00\x00\x07"))
    assert isinstance(params[1], bytearray)


def test_parse_bind_null_and_single_format() -> None:
    body = (
        b"\x00\x00"
        + struct.pack("!hh", 1, 0)
        + struct.pack("!h", 2)
        + struct.pack("!i", -1)
        + struct.pack("!i", 1)
        + b"x"
        + b"\x00\x00"
    )
    assert parse_bind(body)[2] == (None, b"x")


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"p\x00",
        b"p\x00s\x00\x00",
        b"p\x00s\x00\x00\x00\x00\x01\x00\x00\x00\x09abc",  # value overruns
        b"p\x00s\x00\x00\x02\x00\x00\x00\x00\x00\x03",  # 2 formats for 3 params
    ],
)
def test_parse_bind_rejects_short_bodies(body: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        parse_bind(body)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
def test_body_parsers_never_crash(body: bytes) -> None:
    for parser in (parse_bind, parse_parse, parse_execute, parse_close):
        with contextlib.suppress(ProtocolViolation):
            parser(body)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(min_value=0, max_value=200), max_size=5))
def test_scanner_on_garbage_either_frames_or_raises(data: bytes, cuts: list[int]) -> None:
    scanner = frontend(max_length=1 << 16)
    try:
        feed_in_pieces(scanner, data, [c for c in cuts if 0 < c < len(data)])
    except ProtocolViolation as exc:
        assert 0 <= exc.offset < len(data)


_HINT_REFERENCE = re.compile(rb"(?i)scalple\.|reset|discard|set_config")


@settings(max_examples=2000, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                b"scalple.",
                b"SCALPLE.",
                b"Scalple",
                b"reset",
                b"ReSeT",
                b"rese",
                b"discard",
                b"DISCAR",
                b"set_config",
                b"SET_CONFIG",
                b"set_confi",
                b"select ",
                b"'",
                b"_",
                b".",
            ]
        )
        | st.binary(max_size=6),
        max_size=8,
    )
)
def test_identity_hint_matches_its_definition(parts: list[bytes]) -> None:
    data = b"".join(parts)
    assert identity_hint(data) == (_HINT_REFERENCE.search(data) is not None)
