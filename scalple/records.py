"""Audit records: the stored form of what the relay observed.

The relay hands over raw :mod:`scalple.events`; this module turns them into
records with stable field names, on the writer's side, never on the relay's.
Field order is part of the format: new fields are appended, never inserted.
"""

from __future__ import annotations

import struct
import uuid
from datetime import UTC, datetime

import msgspec

from scalple.events import (
    SessionClosed,
    SessionInfo,
    SessionRejected,
    StatementEvent,
    monotonic_to_wall_ns,
)

__all__ = [
    "SessionRecord",
    "StatementRecord",
    "format_param",
    "rfc3339",
    "to_record",
]


def rfc3339(wall_ns: int) -> str:
    """RFC 3339 UTC with microseconds: ``2026-11-26T07:18:41.123456Z``."""
    seconds, ns = divmod(wall_ns, 1_000_000_000)
    stamp = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{ns // 1000:06d}Z"


_BINARY_INT = {21: 2, 23: 4, 20: 8, 26: 4}  # int2, int4, int8, oid: width
_BINARY_FLOAT = {700: ">f", 701: ">d"}  # float4, float8
_BINARY_TEXT = frozenset(
    {25, 1043, 1042, 19, 114, 705}
)  # text, varchar, bpchar, name, json, unknown


def format_param(value: bytes | bytearray | None, oid: int = 0) -> str | None:
    """A parameter as the text PostgreSQL would print for it.

    Text-format values are already text.  Binary ones (``bytearray``) are
    decoded for the common scalar types the declared OID names; anything else
    is shown as PostgreSQL's ``\\x`` hex, never guessed.
    """
    if value is None:
        return None
    if not isinstance(value, bytearray):
        return value.decode("utf-8", "replace")
    width = _BINARY_INT.get(oid)
    if width is not None and len(value) == width:
        return str(int.from_bytes(value, "big", signed=oid != 26))
    fmt = _BINARY_FLOAT.get(oid)
    if fmt is not None and len(value) == struct.calcsize(fmt):
        return repr(struct.unpack(fmt, value)[0])
    if oid == 16 and len(value) == 1:
        return "true" if value[0] else "false"
    if oid in _BINARY_TEXT:
        return value.decode("utf-8", "replace")
    if oid == 2950 and len(value) == 16:
        return str(uuid.UUID(bytes=bytes(value)))
    return "\\x" + value.hex()


class StatementRecord(msgspec.Struct, kw_only=True, omit_defaults=False):
    """One executed statement.

    Attributes
    ----------
    kind: always ``statement``.
    ts: when the statement reached the proxy (RFC 3339 UTC, microseconds).
    session_id, statement_id: the session and the statement's number in it.
    session_user_id, session_email, identity_source: the person.
    db_role, database, application_name, client_addr: the connection.
    protocol: ``simple``, ``extended`` or ``function``.
    query: statement text (a multi-statement Query is stored whole, see
        ``query_index``); None when the proxy never saw it prepared.
    query_index: position of the statement within a multi-statement Query.
    query_truncated: the text was cut at ``[log] capture_limit``.
    params: bind parameters as text (binary ones as ``\\x`` hex).
    command: first word of the command tag (``SELECT``, ``INSERT``, ...).
    tag: the full command tag.
    rows: rows returned or affected.
    status: ``ok``, ``error`` or ``incomplete``.
    sqlstate: error code, for ``error`` and ``incomplete``.
    duration_us: from the request reaching the proxy to its completion.
    in_transaction: inside an explicit transaction block.
    """

    kind: str = "statement"
    ts: str
    session_id: str
    statement_id: int
    session_user_id: str | None
    session_email: str | None
    identity_source: str
    db_role: str
    database: str
    application_name: str
    client_addr: str
    protocol: str
    query: str | None
    query_index: int
    query_truncated: bool
    params: list[str | None] | None
    command: str | None
    tag: str | None
    rows: int | None
    status: str
    sqlstate: str | None
    duration_us: int
    in_transaction: bool


class SessionRecord(msgspec.Struct, kw_only=True):
    """A session opening, closing, or a connection refused before it became one."""

    kind: str  # session_open | session_close | session_reject
    ts: str
    session_id: str | None
    client_addr: str
    db_role: str | None
    database: str | None
    application_name: str | None = None
    session_user_id: str | None = None
    session_email: str | None = None
    identity_source: str | None = None
    tls: bool | None = None
    statements: int | None = None
    reason: str | None = None
    sqlstate: str | None = None


def _params(event: StatementEvent) -> list[str | None] | None:
    if not event.params:
        return None
    types = event.param_types
    return [
        format_param(value, types[i] if i < len(types) else 0)
        for i, value in enumerate(event.params)
    ]


def _session_open(info: SessionInfo) -> SessionRecord:
    return SessionRecord(
        kind="session_open",
        ts=rfc3339(info.opened_ns),
        session_id=info.session_id,
        client_addr=info.client_addr,
        db_role=info.db_role,
        database=info.database,
        application_name=info.application_name,
        session_user_id=info.user_id,
        session_email=info.email,
        identity_source=info.identity_source,
        tls=info.tls,
    )


def to_record(
    event: StatementEvent | SessionInfo | SessionClosed | SessionRejected,
) -> StatementRecord | SessionRecord:
    """The record for one event; the only place events become records."""
    if isinstance(event, StatementEvent):
        s = event.session
        tag = event.tag.decode("ascii", "replace") if event.tag is not None else None
        return StatementRecord(
            ts=rfc3339(monotonic_to_wall_ns(event.started_ns)),
            session_id=s.session_id,
            statement_id=event.statement_id,
            session_user_id=s.user_id,
            session_email=s.email,
            identity_source=s.identity_source,
            db_role=s.db_role,
            database=s.database,
            application_name=s.application_name,
            client_addr=s.client_addr,
            protocol=event.protocol,
            query=event.query.decode("utf-8", "replace") if event.query is not None else None,
            query_index=event.query_index,
            query_truncated=event.query_truncated,
            params=_params(event),
            command=tag.split(" ", 1)[0] if tag else None,
            tag=tag,
            rows=event.rows,
            status=event.status,
            sqlstate=event.sqlstate,
            duration_us=max(0, (event.ended_ns - event.started_ns) // 1000),
            in_transaction=event.in_transaction,
        )
    if isinstance(event, SessionInfo):
        return _session_open(event)
    if isinstance(event, SessionClosed):
        record = _session_open(event.session)
        record.kind = "session_close"
        record.ts = rfc3339(event.closed_ns)
        record.statements = event.statements
        record.reason = event.reason
        return record
    return SessionRecord(
        kind="session_reject",
        ts=rfc3339(event.at_ns),
        session_id=None,
        client_addr=event.client_addr,
        db_role=event.db_role,
        database=event.database,
        reason=event.reason,
        sqlstate=event.sqlstate,
    )
