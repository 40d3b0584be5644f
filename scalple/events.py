"""What the relay tells the audit side: sessions and the statements they ran.

These are raw observations (bytes as seen on the wire, monotonic clock
readings).  Turning them into audit records (decoding, analysis, masking) is
the sink's job, off the relay path.  Structs are ``gc=False``: they hold no
reference cycles and are created once per statement on the hot path.
"""

from __future__ import annotations

import time
from typing import Literal

import msgspec

from scalple.identity.state import Identity

__all__ = [
    "IdentitySource",
    "SessionClosed",
    "SessionInfo",
    "SessionRejected",
    "StatementEvent",
    "StatementStatus",
    "WireProtocol",
    "monotonic_to_wall_ns",
]

IdentitySource = Literal["startup", "set", "comment", "token", "none"]
WireProtocol = Literal["simple", "extended", "function"]
StatementStatus = Literal["ok", "error", "incomplete"]


class SessionInfo(msgspec.Struct, frozen=True, gc=False):
    """One client connection, fixed once its startup packet was accepted.

    Attributes
    ----------
    session_id: unique for the lifetime of the log (origin-local counter).
    client_addr: ``host:port`` of the client as the proxy saw it.
    db_role: the ``user`` of the startup packet (the shared pool role).
    database: the ``database`` of the startup packet (defaults to db_role).
    application_name: from the startup packet, empty when unset.
    user_id: the person, from ``scalple.user_id`` at startup, if any.
    email: from ``scalple.email`` at startup, if any.
    identity_source: ``startup`` when the startup packet named the person.
    tls: whether the client's connection to the proxy is encrypted.
    opened_ns: wall-clock time the startup packet arrived.
    """

    session_id: str
    client_addr: str
    db_role: str
    database: str
    application_name: str
    user_id: str | None
    email: str | None
    identity_source: IdentitySource
    tls: bool
    opened_ns: int


class StatementEvent(msgspec.Struct, gc=False):
    """One executed statement, as the relay saw it.

    Attributes
    ----------
    session: the session it ran in.
    statement_id: 1, 2, ... per session, in completion order.
    protocol: ``simple`` (Query), ``extended`` (Parse/Bind/Execute) or
        ``function`` (FunctionCall).
    query: the SQL text: the whole Query string for simple protocol (see
        ``query_index``), the prepared statement's text for extended, None
        when the statement was prepared where the proxy could not see it.
    query_truncated: the text was longer than the capture limit.
    query_index: 0-based position of this statement among those in a
        multi-statement simple Query; 0 otherwise.
    params: bind parameters (bytes: text format, bytearray: binary format,
        None: NULL), or None when there were none or they were not captured.
    param_types: the parameter type OIDs the Parse declared (0 or missing:
        unspecified), used to render binary parameters.
    started_ns, ended_ns: monotonic clock when the request reached the proxy
        and when its completion came back (see monotonic_to_wall_ns).
    tag: the CommandComplete tag, e.g. ``b"SELECT 3"``; None on error.
    rows: rows affected or returned, from the tag or the DataRow count.
    sqlstate: the error code when status is ``error`` or ``incomplete``.
    status: ``ok``, ``error``, or ``incomplete`` when the session ended
        before the statement's completion came back.
    in_transaction: the statement ran inside an explicit transaction block.
    identity: the person in force for this statement (comment, SET LOCAL,
        SET, startup or token; see scalple.identity.state).
    row_values: the data-subject column values the backend scanner read
        from the statement's result rows, packed (``unpack_row_values``).
    row_values_seen, row_values_truncated: how many it saw; more than it kept.
    """

    session: SessionInfo
    statement_id: int
    protocol: WireProtocol
    query: bytes | None
    query_truncated: bool
    query_index: int
    params: tuple[bytes | bytearray | None, ...] | None
    param_types: tuple[int, ...]
    started_ns: int
    ended_ns: int
    tag: bytes | None
    rows: int | None
    sqlstate: str | None
    status: StatementStatus
    in_transaction: bool
    identity: Identity
    row_values: bytes | None = None
    row_values_seen: int = 0
    row_values_truncated: bool = False
    escape_strings: bool = False  # the session had standard_conforming_strings off


class SessionClosed(msgspec.Struct, frozen=True, gc=False):
    """A session ended; ``reason`` says who ended it and why."""

    session: SessionInfo
    closed_ns: int
    statements: int
    reason: str


class SessionRejected(msgspec.Struct, frozen=True, gc=False):
    """A connection that never became a session (auth failure, bad startup,
    upstream unreachable, limit reached): evidence of attempts matters too."""

    client_addr: str
    db_role: str | None
    database: str | None
    at_ns: int
    sqlstate: str
    reason: str


_offset_ns = time.time_ns() - time.monotonic_ns()


def monotonic_to_wall_ns(mono_ns: int) -> int:
    """Wall-clock nanoseconds for a monotonic reading.

    The relay reads only the monotonic clock (one call per received chunk);
    the offset is taken at import and refreshed by :func:`resync_clock`, so a
    wall-clock step never makes a duration negative.
    """
    return mono_ns + _offset_ns


def resync_clock() -> None:
    """Re-read the wall/monotonic offset (called periodically by the janitor)."""
    global _offset_ns
    _offset_ns = time.time_ns() - time.monotonic_ns()
