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

from scalple.events import SessionClosed, SessionInfo, SessionRejected, StatementEvent

__all__ = [
    "SessionRecord",
    "StatementRecord",
    "decode_record",
    "encode_record",
    "format_param",
    "record_dict",
    "rfc3339",
    "statement_params",
    "to_session_record",
]


_STATEMENT = b"S"
_SESSION = b"E"


_second_cache: tuple[int, str] = (-1, "")


def rfc3339(wall_ns: int) -> str:
    """RFC 3339 UTC with microseconds: ``2026-11-26T07:18:41.123456Z``.

    Records arrive in time order, so the date-and-time part of the previous
    call is reused while the second is the same (one per record otherwise).
    """
    global _second_cache
    seconds, ns = divmod(wall_ns, 1_000_000_000)
    cached_second, stamp = _second_cache
    if seconds != cached_second:
        stamp = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second_cache = (seconds, stamp)
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


class StatementRecord(msgspec.Struct, kw_only=True, array_like=True):
    """One executed statement: the audit record.

    The first 26 fields are the record format promised in
    docs/audit-record.md, in that order; fields are only ever appended.

    Attributes
    ----------
    ts: when the statement reached the proxy (RFC 3339 UTC, microseconds).
    log_id: ``immutable-`` and the first 16 hex digits of the blake3 leaf
        hash of the record's stored bytes (written without ``log_id``).
    seq: position in this log, from 1, never reused.
    session_user_id, session_email: the person.
    identity_source: channel that named the person: ``startup``, ``set``,
        ``comment``, ``token`` or ``none``.
    identity_verified: a verified signed token named the person.
    db_role, database, application_name, client_addr: the connection.
    session_id, statement_id: the session, and the statement's number in it.
    protocol: ``simple`` or ``extended`` (``function`` for FunctionCall).
    statement_class: pgAudit's class: READ, WRITE, DDL, ROLE, FUNCTION, MISC.
    command: SELECT, INSERT, CREATE TABLE, ...
    query: this statement's text (one statement of a multi-statement Query).
    query_fingerprint: pglast fingerprint, comments and constants ignored.
    params: bind parameters as text (binary ones decoded by type).
    affected_tables: schema-qualified relations, views and their base tables.
    columns_accessed: relation -> columns read or written.
    rows: rows returned or affected.
    status: ``ok`` or ``error`` (``incomplete`` when the session ended first).
    sqlstate: error code; error messages are never stored (they can hold values).
    duration_us: from the request reaching the proxy to its completion.
    in_transaction: inside an explicit transaction block.
    kind: always ``statement`` (session records share the log).
    tag: the full command tag.
    query_truncated: the text was cut at ``[log] capture_limit``.
    identity_problem: why a presented identity was not used (expired token...).
    analysis_notes: what analysis could not resolve, said explicitly.
    masked_fields: ``{column, mask, value}`` for each value masked in
        ``query`` or ``params`` (``value`` is the masked form, never the raw one).
    subjects: keyed pseudonymous tags of the data subjects the statement
        touched (``scalple subject-tag KIND ID`` gives the tag of an id).
    subject_kinds: the kinds of those subjects (``customer``...), sorted.
    subjects_count: how many distinct subjects were seen (also past the bound).
    subjects_truncated: more than ``[masking] subjects_limit`` subjects: the
        tags stop at the bound.
    """

    ts: str
    log_id: str | None = None
    seq: int = 0
    session_user_id: str | None
    session_email: str | None
    identity_source: str
    identity_verified: bool
    db_role: str
    database: str
    application_name: str
    client_addr: str
    session_id: str
    statement_id: int
    protocol: str
    statement_class: str | None
    command: str | None
    query: str | None
    query_fingerprint: str | None
    params: list[str | None] | None
    affected_tables: list[str]
    columns_accessed: dict[str, list[str]]
    rows: int | None
    status: str
    sqlstate: str | None
    duration_us: int
    in_transaction: bool
    kind: str = "statement"
    tag: str | None = None
    query_truncated: bool = False
    identity_problem: str | None = None
    analysis_notes: list[str] = msgspec.field(default_factory=list)
    masked_fields: list[dict[str, str]] = msgspec.field(default_factory=list)
    subjects: list[str] = msgspec.field(default_factory=list)
    subject_kinds: list[str] = msgspec.field(default_factory=list)
    subjects_count: int = 0
    subjects_truncated: bool = False


class SessionRecord(msgspec.Struct, kw_only=True, array_like=True):
    """A session opening, closing, or a connection refused before it became one."""

    kind: str  # session_open | session_close | session_reject
    ts: str
    log_id: str | None = None
    seq: int = 0
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


def statement_params(event: StatementEvent) -> list[str | None] | None:
    """The event's bind parameters rendered as text."""
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


def to_session_record(event: SessionInfo | SessionClosed | SessionRejected) -> SessionRecord:
    """The record for a session event."""
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


_encode = msgspec.msgpack.Encoder().encode
_decode_statement = msgspec.msgpack.Decoder(StatementRecord).decode
_decode_session = msgspec.msgpack.Decoder(SessionRecord).decode


def encode_record(record: StatementRecord | SessionRecord) -> bytes:
    """The stored bytes of a record: a type byte, then positional msgpack.

    These bytes are what the Merkle tree commits to; ``log_id`` is not among
    them (it is derived from their hash), so it is left out when encoding.
    """
    record.log_id = None
    kind = _STATEMENT if type(record) is StatementRecord else _SESSION
    return kind + _encode(record)


def decode_record(payload: bytes) -> StatementRecord | SessionRecord:
    """The record stored as ``payload``; raises msgspec.DecodeError or ValueError."""
    kind = payload[:1]
    if kind == _STATEMENT:
        return _decode_statement(payload[1:])
    if kind == _SESSION:
        return _decode_session(payload[1:])
    raise ValueError(f"unknown record type byte {kind!r}")


def record_dict(record: StatementRecord | SessionRecord) -> dict[str, object]:
    """A record as a mapping with its field names (what readers and JSON show)."""
    return msgspec.structs.asdict(record)
