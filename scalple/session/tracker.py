"""Pairs each client request with the server's answer to it.

The tracker is fed the messages the scanners captured in each direction and
emits one :class:`~scalple.events.StatementEvent` per executed statement.  It
does no I/O and never blocks: the relay has already forwarded the bytes when
the tracker sees them, so nothing here can delay or alter traffic.

The protocol rules it relies on:

* A simple Query may hold several statements; each ends with CommandComplete
  (or EmptyQueryResponse), an ErrorResponse aborts the rest, and
  ReadyForQuery ends the Query.
* In the extended protocol Parse/Bind/Execute may be pipelined with a single
  Sync at the end.  After an ErrorResponse the server discards every message
  up to the next Sync, so requests queued before that Sync never get an
  answer; the Sync itself is answered by ReadyForQuery.
* An Execute with a row limit may end in PortalSuspended; a later Execute of
  the same portal continues the same statement.
* Server responses always refer to requests already sent, so when a response
  arrives its request is already queued here.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Callable
from enum import IntEnum
from typing import TYPE_CHECKING, Final, Protocol

from scalple import protocol as P
from scalple._wire import (
    ProtocolViolation,
    identity_hint,
    parse_bind,
    parse_close,
    parse_execute,
    parse_parse,
)
from scalple.analysis.sql import split_statements
from scalple.events import SessionInfo, StatementEvent, StatementStatus, WireProtocol
from scalple.identity.state import Identity, IdentityState, Requirement

if TYPE_CHECKING:
    from scalple._wire import Captured

__all__ = ["StatementTracker"]

log = logging.getLogger(__name__)


class Kind(IntEnum):
    """What a queued request is waiting for."""

    QUERY = 1  # simple Query: CommandComplete per statement, then ReadyForQuery
    EXECUTE = 2  # Execute: CommandComplete, PortalSuspended or EmptyQueryResponse
    FUNCTION = 3  # FunctionCall: FunctionCallResponse, then ReadyForQuery
    SYNC = 4  # Sync: ReadyForQuery


_ENDS_REQUEST: Final = (Kind.QUERY, Kind.FUNCTION, Kind.SYNC)
_PROTOCOL_OF: Final[dict[Kind, WireProtocol]] = {
    Kind.QUERY: "simple",
    Kind.EXECUTE: "extended",
    Kind.FUNCTION: "function",
    Kind.SYNC: "extended",
}
_ROW_COMMANDS: Final = frozenset(
    {b"SELECT", b"INSERT", b"UPDATE", b"DELETE", b"MERGE", b"COPY", b"FETCH", b"MOVE"}
)
# Statements that set the identity and nothing else: applied, when checking
# [identity] require, to see what the statements after them run as.
_SETS_IDENTITY: Final = re.compile(
    r"(?is)\A\s*(?:set|reset|discard)\b"
    r"|\A\s*select\s+(?:pg_catalog\s*\.\s*)?set_config\s*\(\s*'scalple\.\w+'\s*,"
    r"\s*(?:\$\d+|'(?:[^']|'')*'|null)\s*,\s*(?:true|false|\$\d+)\s*\)\s*(?:as\s+\w+\s*)?;?\s*\Z"
)
# Statements that touch no data: allowed without an identity under
# [identity] require (they are how a client sets one, or manage its session).
_ALWAYS_ALLOWED: Final = re.compile(
    r"(?is)\A\s*(?:begin|commit|rollback|end|abort|start\s+transaction|savepoint|release"
    r"|set|reset|show|discard|deallocate|listen|unlisten)\b"
)
_OPENS_TX: Final = (b"BEGIN", b"START TRANSACTION")
_ROW_VALUES: Final = 0  # the backend scanner's entry for subject values read from rows
_CLOSES_TX: Final = (b"COMMIT", b"ROLLBACK", b"PREPARE TRANSACTION")


class RowWatch(Protocol):
    """Where the shapes of results to come go (the backend MessageScanner)."""

    def push_row_description(self, body: bytes | None, bind: bytes | None = None) -> None: ...

    def push_ready_marker(self) -> None: ...


class Portal:
    """A bound portal: the statement text and parameters it runs."""

    __slots__ = (
        "ended_ns",
        "identity",
        "in_transaction",
        "param_types",
        "params",
        "query",
        "row_values",
        "rows",
        "started_ns",
        "suspended",
        "truncated",
    )

    def __init__(
        self,
        query: bytes | None,
        truncated: bool,
        params: tuple[bytes | bytearray | None, ...] | None,
        param_types: tuple[int, ...] = (),
    ) -> None:
        self.query = query
        self.truncated = truncated
        self.params = params
        self.param_types = param_types
        self.rows = 0  # rows returned by earlier Executes that ended suspended
        self.started_ns = 0  # start of the first Execute of this portal
        self.ended_ns = 0  # when the last Execute of this portal was answered
        self.in_transaction = False  # in a transaction block when it first ran
        self.suspended = False
        # Subject values from Executes that suspended (None: none, no list made).
        self.row_values: list[tuple[bytes, bool, int]] | None = None
        # The person in force when the portal first ran: a suspended portal is
        # recorded when it finishes, maybe after the transaction (and a SET
        # LOCAL identity) ended.
        self.identity: Identity | None = None


class Request:
    """A request the server has not finished answering."""

    __slots__ = (
        "failed",
        "index",
        "kind",
        "portal",
        "query",
        "refused",
        "sets_identity",
        "started_ns",
        "truncated",
    )

    def __init__(
        self,
        kind: Kind,
        started_ns: int,
        query: bytes | None = None,
        truncated: bool = False,
        portal: Portal | None = None,
    ) -> None:
        self.kind = kind
        self.started_ns = started_ns
        self.query = query
        self.truncated = truncated
        self.portal = portal
        self.index = 0  # statement position within a simple Query
        self.failed = False  # an error ended the Query; later completions are not ours
        # SQLSTATE the proxy refused it with (it rewrote it so the server fails
        # it): 28000 under [identity] require, 53100 while the log cannot be written.
        self.refused: str | None = None
        self.sets_identity = False  # it sets scalple.*: what follows it may run


def _tag_rows(tag: bytes) -> int | None:
    """Row count from a CommandComplete tag (``INSERT 0 5`` -> 5)."""
    command, _, rest = tag.partition(b" ")
    if command not in _ROW_COMMANDS or not rest:
        return None
    count = rest.rpartition(b" ")[2]
    return int(count) if count.isdigit() else None


class StatementTracker:
    """The statement-matching state of one client session."""

    __slots__ = (
        "_copy_in",
        "_described",
        "_describes",
        "_emit",
        "_identity",
        "_in_tx",
        "_pending",
        "_portals",
        "_prepared",
        "_rolled_back",
        "_row_descriptions",
        "_row_values",
        "_row_watch",
        "_skip_to_sync",
        "_syncs_answered",
        "_syncs_sent",
        "_tx_error",
        "escape_strings",
        "session",
        "statements",
        "terminated",
    )

    def __init__(
        self,
        session: SessionInfo,
        emit: Callable[[StatementEvent], None],
        identity: IdentityState,
    ) -> None:
        self.session = session
        self._emit = emit
        self._identity = identity
        self._tx_error = False  # an error since the last idle ReadyForQuery
        self._row_values: list[tuple[bytes, bool, int]] = []  # for the next completion
        # Subjects in the results of prepared statements: the RowDescription of
        # each described statement, handed to the backend scanner at each Bind.
        self._row_watch: RowWatch | None = None
        self._row_descriptions: dict[bytes, bytes] = {}
        self._described: bytes | None = None  # statement whose description comes next
        # standard_conforming_strings = off: backslashes escape in '...' too,
        # and the literal lexer (standard strings) would misread the text.
        self.escape_strings = False
        self._rolled_back = False
        self._prepared: dict[bytes, tuple[bytes, bool, tuple[int, ...]]] = {}
        self._portals: dict[bytes, Portal] = {}
        self._pending: deque[Request] = deque()
        self._skip_to_sync = False  # server discards client messages until Sync
        self._copy_in = False  # extended-protocol COPY FROM STDIN: Syncs are ignored
        # Describe(statement) requests awaiting ParameterDescription, with the
        # number of Syncs sent before each: an error skips its whole batch.
        self._describes: deque[tuple[bytes, int]] = deque()
        self._syncs_sent = 0
        self._syncs_answered = 0
        self._in_tx = False
        self.statements = 0
        self.terminated = False  # the client sent Terminate: a closing upstream is expected

    @property
    def answered(self) -> bool:
        """Every request sent so far has been answered."""
        return not self._pending

    @property
    def idle(self) -> bool:
        """No request in flight and no transaction open: safe to disconnect."""
        return not self._pending and not self._in_tx

    # -- client to server ----------------------------------------------------

    def on_frontend(
        self,
        messages: list[Captured],
        now: int,
        require: Requirement | None = None,
        refuse_all: str | None = None,
    ) -> list[int] | None:
        """Track what the client sent.

        With ``require`` (``[identity] require`` applies to this session),
        decide before the chunk is forwarded which statements have no
        acceptable identity: their positions in ``messages`` are returned
        and the proxy rewrites them so that the server refuses them.  With
        ``refuse_all`` (a SQLSTATE) every statement is refused so.
        """
        check = require is not None or refuse_all is not None
        refused: list[int] | None = None
        for position, (mtype, body, truncated, _counted, _end) in enumerate(messages):
            if self._skip_to_sync and mtype != P.F_SYNC:
                continue
            if mtype == P.F_BIND:
                self._bind(body, truncated)
            elif mtype == P.F_EXECUTE:
                request = self._execute(body, now)
                if check and request is not None:
                    portal = request.portal
                    query = portal.query if portal is not None else None
                    params = portal.params if portal is not None else None
                    if self._refuse(request, query, require, params, refuse_all):
                        refused = refused or []
                        refused.append(position)
            elif mtype == P.F_SYNC:
                if self._copy_in:
                    continue  # the server ignores Sync during copy-in
                if self._row_watch is not None:
                    self._row_watch.push_ready_marker()
                self._skip_to_sync = False
                self._syncs_sent += 1
                self._pending.append(Request(Kind.SYNC, now))
            elif mtype == P.F_DESCRIBE:
                if body[:1] == b"S":
                    self._describes.append((body[1:].partition(b"\0")[0], self._syncs_sent))
            elif mtype == P.F_QUERY:
                if self._row_watch is not None:
                    self._row_watch.push_ready_marker()
                query = body[:-1] if body.endswith(b"\0") else body
                request = Request(Kind.QUERY, now, query, truncated)
                self._pending.append(request)
                if check and self._refuse(request, query, require, None, refuse_all):
                    refused = refused or []
                    refused.append(position)
            elif mtype == P.F_PARSE:
                self._parse(body, truncated)
            elif mtype == P.F_CLOSE:
                self._close(body)
            elif mtype == P.F_COPY_DONE or mtype == P.F_COPY_FAIL:
                self._copy_in = False
            elif mtype == P.F_TERMINATE:
                self.terminated = True
            elif mtype == P.F_FUNCTION_CALL:
                if self._row_watch is not None:
                    self._row_watch.push_ready_marker()
                oid = int.from_bytes(body[:4], "big") if len(body) >= 4 else 0
                request = Request(Kind.FUNCTION, now, b"<function call oid=%d>" % oid)
                self._pending.append(request)
                if check and self._refuse(request, None, require, None, refuse_all):
                    refused = refused or []
                    refused.append(position)
        return refused

    def _refuse(
        self,
        request: Request,
        query: bytes | None,
        require: Requirement | None,
        params: tuple[bytes | bytearray | None, ...] | None = None,
        refuse_all: str | None = None,
    ) -> bool:
        """Whether ``request`` must be refused (``refuse_all``), or refused
        for want of an identity (``require``).

        Every statement of the request is checked on its own, in order, on a
        fork of the identity state: statements that set the identity (SET,
        RESET, DISCARD, a bare ``select set_config('scalple.x', ...)``) are
        applied to the fork, transaction and session control passes, and
        every other statement needs an acceptable identity in the fork.  An
        Execute also sees the identity changes pipelined before it in the
        same batch (if one fails, the server skips the rest of the batch).
        """
        if refuse_all is not None:
            request.refused = refuse_all
            return True
        assert require is not None
        state = self._identity
        if query is None:
            # A function call, or a statement prepared where the proxy could
            # not see it: only the identity already in force can allow it.
            if state.for_statement(None).acceptable(require):
                return False
            request.refused = P.SQLSTATE_INVALID_AUTHORIZATION
            return True
        if not identity_hint(query):
            if state.for_statement(None).acceptable(require):
                return False  # the common case: nothing mentions identity
            text = query.decode("utf-8", "replace")
            if all(_ALWAYS_ALLOWED.match(s) for s in split_statements(text)):
                return False
            request.refused = P.SQLSTATE_INVALID_AUTHORIZATION
            return True
        text = query.decode("utf-8", "replace")
        fork = state.fork()
        if request.kind == Kind.EXECUTE:
            self._apply_batch_changes(fork)
        statements = split_statements(text)
        single = len(statements) <= 1
        for index, statement in enumerate(statements):
            position = None if single else index
            if _SETS_IDENTITY.match(statement):
                fork.statement_succeeded(text, index, params)
                request.sets_identity = True
            elif _ALWAYS_ALLOWED.match(statement):
                continue
            elif not fork.for_statement(text, position).acceptable(require):
                request.sets_identity = False
                request.refused = P.SQLSTATE_INVALID_AUTHORIZATION
                return True
        return False

    def _apply_batch_changes(self, fork: IdentityState) -> None:
        """Apply identity changes of the Executes queued since the last Sync."""
        batch: list[Request] = []
        for pending in reversed(self._pending):
            if pending.kind != Kind.EXECUTE:
                break
            batch.append(pending)
        for pending in reversed(batch):
            portal = pending.portal
            if pending.sets_identity and portal is not None and portal.query is not None:
                text = portal.query.decode("utf-8", "replace")
                fork.statement_succeeded(text, 0, portal.params)

    def _parse(self, body: bytes, truncated: bool) -> None:
        try:
            name, query, types = parse_parse(body)
        except ProtocolViolation:
            if not truncated:
                return  # the server rejects it too; nothing will run
            name, _, rest = body.partition(b"\0")
            query, types = rest.partition(b"\0")[0], ()
        if not types:
            # asyncpg describes a statement, then parses the same text again
            # without types before binding: keep what the server told us.
            old = self._prepared.get(name)
            if old is not None and old[0] == query:
                types = old[2]
        previous = self._prepared.get(name)
        if previous is None or previous[0] != query:
            self._row_descriptions.pop(name, None)
        self._prepared[name] = (query, truncated, types)

    def watch_rows(self, watch: RowWatch) -> None:
        """Tell ``watch`` (the backend scanner) the shape of each result to come."""
        self._row_watch = watch

    def _bind(self, body: bytes, truncated: bool) -> None:
        try:
            portal, statement, params = parse_bind(body)
            captured: tuple[bytes | bytearray | None, ...] | None = params or None
        except ProtocolViolation:
            # Parameters past the capture limit: keep the names, drop values.
            parts = body.split(b"\0", 2)
            if len(parts) < 3:
                if self._row_watch is not None:
                    self._row_watch.push_row_description(None)  # keep in step with the server
                return
            portal, statement, captured = parts[0], parts[1], None
        query, query_truncated, types = self._prepared.get(statement, (None, False, ()))
        old = self._portals.get(portal)
        if old is not None and old.suspended:
            self._finish_suspended(old)
        self._portals[portal] = Portal(query, query_truncated, captured, types)
        if self._row_watch is not None:
            # The Bind's result formats say which columns come back binary.
            self._row_watch.push_row_description(self._row_descriptions.get(statement), body)

    def _execute(self, body: bytes, now: int) -> Request | None:
        try:
            name, _max_rows = parse_execute(body)
        except ProtocolViolation:
            return None
        portal = self._portals.get(name)
        if portal is None:
            # Unknown portal: the server will answer with an error; keep the
            # queue aligned with what it will answer.
            portal = Portal(None, False, None)
        if not portal.suspended:
            portal.started_ns = now
        request = Request(Kind.EXECUTE, now, portal=portal)
        self._pending.append(request)
        return request

    def _close(self, body: bytes) -> None:
        try:
            kind, name = parse_close(body)
        except ProtocolViolation:
            return
        if kind == b"S":
            self._prepared.pop(name, None)
            self._row_descriptions.pop(name, None)
        else:
            portal = self._portals.pop(name, None)
            if portal is not None and portal.suspended:
                self._finish_suspended(portal)

    # -- server to client ----------------------------------------------------

    def on_backend(self, messages: list[Captured], now: int) -> None:
        pending = self._pending
        for mtype, body, truncated, counted, _end in messages:
            if mtype == _ROW_VALUES:
                # Subject-column values the scanner read from the rows of the
                # statement whose completion comes next.
                self._row_values.append((body, truncated, counted))
                continue
            if mtype == P.B_PARAMETER_DESCRIPTION:
                self._parameter_types(body)
                continue
            if mtype == P.B_PARAMETER_STATUS:
                name, _, rest = body.partition(b"\0")
                if name == b"standard_conforming_strings":
                    self.escape_strings = rest.partition(b"\0")[0] == b"off"
                continue
            if mtype == P.B_ROW_DESCRIPTION or mtype == P.B_NO_DATA:
                described, self._described = self._described, None
                if described is not None:
                    if mtype == P.B_ROW_DESCRIPTION and not truncated:
                        self._row_descriptions[described] = body
                    else:
                        self._row_descriptions.pop(described, None)
                continue
            if not pending:
                # ReadyForQuery after an error outside any request, async
                # errors (admin shutdown), or traffic before the first request.
                if mtype == P.B_READY_FOR_QUERY:
                    self._ready(body)
                elif mtype == P.B_ERROR and P.parse_error_fields(body).get("S") != "FATAL":
                    # A Parse/Bind/Describe/Close answered after a Flush failed:
                    # the server now skips everything up to the next Sync.
                    self._tx_error = True
                    self._skip_to_sync = True
                continue
            head = pending[0]
            if mtype == P.B_COMMAND_COMPLETE:
                self._complete(head, body.rstrip(b"\0"), counted, now)
            elif mtype == P.B_READY_FOR_QUERY:
                self._ready_for_query(body)
            elif mtype == P.B_ERROR:
                self._error(head, body, counted, now)
            elif mtype == P.B_PORTAL_SUSPENDED:
                if head.kind == Kind.EXECUTE and head.portal is not None:
                    pending.popleft()
                    portal = head.portal
                    portal.rows += counted
                    portal.ended_ns = now
                    if self._row_values:
                        portal.row_values = (portal.row_values or []) + self._row_values
                        self._row_values = []
                    if not portal.suspended:
                        portal.suspended = True
                        portal.in_transaction = self._in_tx
                        portal.identity = self._attribute(portal.query, None, portal.params, True)
            elif mtype == P.B_EMPTY_QUERY:
                if head.kind == Kind.EXECUTE:
                    pending.popleft()
                elif head.kind == Kind.QUERY:
                    head.index += 1
                    head.started_ns = now
            elif mtype == P.B_COPY_IN and head.kind == Kind.EXECUTE:
                self._start_copy_in()
            elif mtype == P.B_FUNCTION_RESULT and head.kind == Kind.FUNCTION:
                self._record(head, now, b"FUNCTION CALL", None, "ok", None, "function")
                head.failed = True  # answered; ReadyForQuery ends it

    def _start_copy_in(self) -> None:
        """An Execute started COPY FROM STDIN.

        The server ignores every Sync it reads until CopyDone or CopyFail,
        and libpq sends one before the data (with the Execute) and one
        after CopyDone: the ones queued so far will get no ReadyForQuery.
        """
        self._copy_in = True
        head = self._pending.popleft()
        self._pending = deque(r for r in self._pending if r.kind != Kind.SYNC)
        self._pending.appendleft(head)

    def _parameter_types(self, body: bytes) -> None:
        """Types the server inferred for a statement prepared without them
        (asyncpg's way): needed to render its binary parameters."""
        describes = self._describes
        while describes and describes[0][1] < self._syncs_answered:
            describes.popleft()  # skipped after an error
        if not describes:
            return
        name, _ = describes.popleft()
        self._described = name  # its RowDescription or NoData follows
        entry = self._prepared.get(name)
        if entry is None or len(body) < 2:
            return
        count = int.from_bytes(body[:2], "big")
        types = tuple(int.from_bytes(body[2 + 4 * i : 6 + 4 * i], "big") for i in range(count))
        if any(entry[2]) or len(types) != count:
            return  # the client declared types itself; those are what it sends
        self._prepared[name] = (entry[0], entry[1], types)

    def _complete(self, head: Request, tag: bytes, counted: int, now: int) -> None:
        command = tag.partition(b" ")[0]
        rows = _tag_rows(tag)
        if command in (b"SELECT", b"FETCH") and rows is None:
            rows = counted
        if head.kind == Kind.QUERY:
            if not head.failed:
                self._record(head, now, tag, rows, "ok", None, "simple")
                head.index += 1
                head.started_ns = now
        elif head.kind == Kind.EXECUTE:
            self._pending.popleft()
            portal = head.portal
            if portal is not None and portal.suspended:
                if command in (b"SELECT", b"FETCH"):
                    rows = portal.rows + counted
                head.started_ns = portal.started_ns
                portal.suspended = False
                portal.rows = 0
            self._record(head, now, tag, rows, "ok", None, "extended")
        else:
            log.debug(
                "session %s: CommandComplete with no statement pending", self.session.session_id
            )
            return
        self._track_transaction(command, tag)

    def _error(self, head: Request, body: bytes, counted: int, now: int) -> None:
        sqlstate = P.parse_error_fields(body).get("C", "XX000")
        self._tx_error = True
        if head.kind == Kind.QUERY or head.kind == Kind.FUNCTION:
            if not head.failed:
                head.failed = True
                if head.refused:
                    sqlstate = head.refused
                self._record(head, now, None, None, "error", sqlstate, _PROTOCOL_OF[head.kind])
            return
        # Extended protocol: the failed request is the first one still
        # queued; the server now skips everything up to the next Sync.
        pending = self._pending
        failed: Request | None = None
        while pending and pending[0].kind != Kind.SYNC:
            request = pending.popleft()
            if failed is None and request.kind == Kind.EXECUTE:
                failed = request
        if not pending:
            self._skip_to_sync = True
        if failed is None:
            # Error answering Sync itself (e.g. a deferred constraint at the
            # implicit commit): recorded against an empty statement.
            failed = Request(Kind.SYNC, now, b"")
        if failed.refused:
            sqlstate = failed.refused
        if failed.portal is not None and failed.portal.suspended:
            failed.started_ns = failed.portal.started_ns
            failed.portal.suspended = False
        self._record(failed, now, None, None, "error", sqlstate, "extended")

    def _ready_for_query(self, body: bytes) -> None:
        pending = self._pending
        while pending:
            request = pending.popleft()
            if request.kind in _ENDS_REQUEST:
                if request.kind == Kind.SYNC:
                    self._syncs_answered += 1
                break
            # An Execute that never got an answer before ReadyForQuery: the
            # server skipped it after an error. It did not run.
        self._ready(body)

    def _ready(self, body: bytes) -> None:
        if self._row_values:
            self._row_values = []  # values of rows whose statement was not ours to record
        status = body[:1]
        self._in_tx = status != b"I"
        if status == b"I":
            committed = not (self._tx_error or self._rolled_back)
            self._tx_error = self._rolled_back = False
            self._identity.transaction_ended(committed)
        elif status == b"E":
            self._tx_error = True
        if status == b"I" and self._portals:
            # Portals end with their transaction.
            for portal in self._portals.values():
                if portal.suspended:
                    self._finish_suspended(portal)
            self._portals.clear()

    def _track_transaction(self, command: bytes, tag: bytes) -> None:
        if tag.startswith(_OPENS_TX):
            self._in_tx = True
        elif tag.startswith(_CLOSES_TX):
            self._in_tx = False
            if command == b"ROLLBACK":
                self._rolled_back = True

    def _finish_suspended(self, portal: Portal) -> None:
        """A portal closed before running to completion: record what it returned."""
        portal.suspended = False
        request = Request(Kind.EXECUTE, portal.started_ns, portal=portal)
        self._record(
            request,
            portal.ended_ns,
            None,
            portal.rows,
            "ok",
            None,
            "extended",
            in_transaction=portal.in_transaction,
        )

    # -- ending --------------------------------------------------------------

    def close(self, now: int, sqlstate: str) -> None:
        """The session ended: record every statement still waiting for its answer."""
        pending, self._pending = self._pending, deque()
        for request in pending:
            if request.kind == Kind.EXECUTE or (
                request.kind in (Kind.QUERY, Kind.FUNCTION) and not request.failed
            ):
                protocol = _PROTOCOL_OF[request.kind]
                self._record(request, now, None, None, "incomplete", sqlstate, protocol)
        for portal in self._portals.values():
            if portal.suspended:
                self._finish_suspended(portal)
        self._portals.clear()

    def _attribute(
        self,
        query: bytes | None,
        index: int | None,
        params: tuple[bytes | bytearray | None, ...] | None,
        succeeded: bool,
    ) -> Identity:
        """The person for a statement that just ran; apply its identity changes."""
        state = self._identity
        text: str | None = None
        if query is not None and identity_hint(query):
            text = query.decode("utf-8", "replace")
        identity = state.for_statement(text, index)
        if text is not None and succeeded:
            state.statement_succeeded(text, index or 0, params)
        return identity

    def _record(
        self,
        request: Request,
        now: int,
        tag: bytes | None,
        rows: int | None,
        status: StatementStatus,
        sqlstate: str | None,
        protocol: WireProtocol,
        *,
        in_transaction: bool | None = None,
    ) -> None:
        self.statements += 1
        portal = request.portal
        if portal is not None:
            query, truncated, params = portal.query, portal.truncated, portal.params
            types = portal.param_types
            index: int | None = None
        else:
            query, truncated, params, types = request.query, request.truncated, None, ()
            index = request.index if protocol == "simple" else None
        if portal is not None and portal.identity is not None:
            identity = portal.identity  # attributed when it first ran
            portal.identity = None
        else:
            identity = self._attribute(query, index, params, status == "ok")
        # The relay's path: no allocation unless subject values were read.
        values = self._row_values
        if portal is not None and portal.row_values:
            values = portal.row_values + values
            portal.row_values = None
        row_values: bytes | None = None
        seen = 0
        truncated = False
        if values:
            self._row_values = []
            row_values = b"".join(v[0] for v in values)
            seen = sum(v[2] for v in values)
            truncated = any(v[1] for v in values)
        self._emit(
            StatementEvent(
                session=self.session,
                statement_id=self.statements,
                protocol=protocol,
                query=query,
                query_truncated=truncated,
                query_index=request.index,
                params=params,
                param_types=types,
                started_ns=request.started_ns,
                ended_ns=now,
                tag=tag,
                rows=rows,
                sqlstate=sqlstate,
                status=status,
                in_transaction=self._in_tx if in_transaction is None else in_transaction,
                identity=identity,
                row_values=row_values,
                row_values_seen=seen,
                row_values_truncated=truncated,
                escape_strings=self.escape_strings,
            )
        )
