"""One client connection and its upstream connection: the relay.

``ClientLink`` is the protocol on the client's socket and owns the session:
its phase, the upstream ``ServerLink``, the statement tracker.  Steady-state
traffic is forwarded the moment it arrives, in the chunks it arrived in; the
Cython scanners look at each chunk while it is forwarded and hand the few
messages that matter to the tracker.  Nothing on this path parses SQL, waits
for the disk or allocates per DataRow.

Flow control is symmetric: when one side's write buffer passes its high
water mark the other side stops being read, and the sink can pause every
client when the audit writer falls behind.  Each pause has a reason bit so
that one reason ending does not resume reading while another holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from enum import IntEnum
from typing import TYPE_CHECKING, Final, cast

from scalple import protocol as P
from scalple._wire import MessageScanner, ProtocolViolation
from scalple.events import SessionClosed, SessionInfo, SessionRejected, StatementEvent
from scalple.identity.startup import extract_identity
from scalple.identity.state import IdentityState, Requirement
from scalple.logsafe import where
from scalple.proxy.tls import ALPN_POSTGRESQL, TlsTerminator
from scalple.proxy.upstream import UpstreamError
from scalple.session.tracker import StatementTracker

if TYPE_CHECKING:
    from collections.abc import Callable

    from scalple._wire import Captured
    from scalple.proxy.listener import Proxy
    from scalple.sink.base import Sink

__all__ = ["ClientLink", "Phase", "ServerLink"]

log = logging.getLogger(__name__)

_monotonic_ns = time.monotonic_ns
_TERMINATE: Final = b"X\x00\x00\x00\x04"
_AUTH_MESSAGE_LIMIT: Final = 1 << 20  # no authentication message is near this
_HELD_LIMIT: Final = 1 << 20  # client bytes buffered while the upstream connects

# [identity] require: a refused statement is rewritten so that the server
# itself fails it (a function or portal that cannot exist), which keeps
# responses in order and lets the server skip the rest of a pipeline as it
# would after any error; the resulting error is rewritten into 28000.
_REFUSAL_MARK: Final = b"scalple: statement refused"
# Messages that end a statement (or a request) and so may produce a record.
_COMPLETIONS: Final = frozenset(b"CEIsZ")
_REFUSED_QUERY: Final = P.build_message(b"Q", b'SELECT pg_catalog."' + _REFUSAL_MARK + b'"()\0')
_REFUSED_EXECUTE: Final = P.build_message(b"E", _REFUSAL_MARK + b"\0\0\0\0\0")
_SHUTDOWN_ERROR: Final = P.build_error(
    P.SQLSTATE_ADMIN_SHUTDOWN, "terminating connection because the proxy is shutting down"
)
_CHECKED_TYPES: Final = (P.F_QUERY, P.F_EXECUTE, P.F_FUNCTION_CALL)
_HOW_TO_IDENTIFY: Final = {
    "any": (
        "statement refused: no identity. Name the person with options=-c scalple.user_id=ID "
        "in the connection string, a sqlcommenter comment /*scalple.user_id='ID'*/, "
        "or SET LOCAL scalple.user_id = 'ID'"
    ),
    "verified": (
        "statement refused: no verified identity. Pass a signed token as scalple.token: "
        "options=-c scalple.token=JWT, a comment /*scalple.token='JWT'*/ "
        "or SET LOCAL scalple.token = 'JWT'"
    ),
}


class Phase(IntEnum):
    """Where a client link is in its life; changed only by ``_set_phase``."""

    PREAMBLE = 0  # reading SSLRequest / GSSENCRequest / CancelRequest / StartupMessage
    CONNECTING = 1  # startup accepted; opening the upstream connection
    AUTHENTICATING = 2  # startup forwarded; relaying authentication until ReadyForQuery
    READY = 3  # steady state: forward both ways, observe on the side
    CLOSED = 4  # closing or closed; nothing more is forwarded


_NEXT: Final = {
    Phase.PREAMBLE: frozenset({Phase.CONNECTING, Phase.CLOSED}),
    Phase.CONNECTING: frozenset({Phase.AUTHENTICATING, Phase.CLOSED}),
    Phase.AUTHENTICATING: frozenset({Phase.READY, Phase.CLOSED}),
    Phase.READY: frozenset({Phase.CLOSED}),
    Phase.CLOSED: frozenset(),
}


class Pause(IntEnum):
    """Why reading from the client is paused (bits)."""

    UPSTREAM_FULL = 1  # the upstream's write buffer is above its high water mark
    SINK = 2  # the audit writer is behind
    HELD = 4  # too much arrived before the upstream was connected


class ClientLink(asyncio.Protocol):
    """The client's side of one proxied connection, and the session's owner."""

    def __init__(self, proxy: Proxy, link_id: int, over_limit: bool) -> None:
        self._proxy = proxy
        self.link_id = link_id
        self._over_limit = over_limit
        self.phase = Phase.PREAMBLE
        self._transport: asyncio.Transport | None = None
        self._write: Callable[[bytes], object] = _discard
        self._tls: TlsTerminator | None = None
        self._preamble = bytearray()
        self._held: list[bytes] | None = []
        self._held_size = 0
        self._scanner: MessageScanner | None = None
        self._tracker: StatementTracker | None = None
        self._session: SessionInfo | None = None
        self._startup_params: dict[str, str] = {}
        self._server: ServerLink | None = None
        self._up_transport: asyncio.Transport | None = None
        self._up_write: Callable[[bytes], object] = _discard
        self._fast = False  # READY or AUTHENTICATING without TLS: inline relay
        self._paused = 0
        self._require: Requirement | None = None  # set when [identity] require applies
        self._deferred_columns: dict[tuple[int, int], int] | None = None
        self.unheld_records = 0  # strict: records whose answers are not held yet
        self._partial = b""  # an unfinished Query/Execute held back for checking
        # The error each refused statement gets, in order, while the server's
        # error for it is still to come (rewrite_refusals puts it in place).
        self.refusals: deque[bytes] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self.draining = False
        self._cancelling = False
        self._direct_tls = False
        self.channel_binding_passthrough = False
        self.client_addr = "?"

    # -- phase ---------------------------------------------------------------

    def _set_phase(self, phase: Phase) -> None:
        if phase not in _NEXT[self.phase]:
            raise RuntimeError(
                f"link {self.link_id}: illegal phase change {self.phase.name} -> {phase.name}"
            )
        self.phase = phase

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    # -- asyncio callbacks ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they are one.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        self._write = transport.write
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.client_addr = f"{peer[0]}:{peer[1]}"
        elif peer:
            self.client_addr = str(peer)
        high = self._proxy.config.server.write_buffer_high
        transport.set_write_buffer_limits(high=high, low=high // 4)
        self._timer = self._proxy.loop.call_later(
            self._proxy.config.server.startup_timeout, self._startup_timed_out
        )
        self._proxy.link_opened(self)

    def data_received(self, data: bytes) -> None:
        if self._fast:
            # The steady-state path: scan, forward, then observe.
            try:
                captured = self._scanner.feed(data)  # type: ignore[union-attr]
            except ProtocolViolation as exc:
                self._violation(exc)
                return
            self._up_write(data)
            if captured is not None:
                self._observe_frontend(captured)
            return
        self._slow_received(data)

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.phase is not Phase.CLOSED:
            terminated = self._tracker is not None and self._tracker.terminated
            self._close("client terminated" if terminated else "client disconnected", None)
        self._proxy.link_closed(self)

    def pause_writing(self) -> None:
        if self._up_transport is not None:
            self._up_transport.pause_reading()

    def resume_writing(self) -> None:
        if self._up_transport is not None and self.phase is not Phase.CLOSED:
            self._up_transport.resume_reading()

    # -- flow control ----------------------------------------------------------

    def pause(self, reason: Pause) -> None:
        if not self._paused and self._transport is not None:
            self._transport.pause_reading()
        self._paused |= reason

    def resume(self, reason: Pause) -> None:
        was = self._paused
        self._paused &= ~reason
        if (
            was
            and not self._paused
            and self._transport is not None
            and self.phase is not Phase.CLOSED
        ):
            self._transport.resume_reading()

    # -- everything before the steady state ------------------------------------

    def _slow_received(self, data: bytes) -> None:
        if self.phase is Phase.CLOSED or self._cancelling:
            return
        if self._tls is not None:
            try:
                data = self._tls.receive(data)
            except EOFError:
                self._close("client closed TLS", None)
                return
            except Exception as exc:  # ssl.SSLError and kin
                log.info("client %s: TLS failed: %s", self.client_addr, exc)
                self._reject(
                    P.SQLSTATE_PROTOCOL_VIOLATION, f"TLS handshake failed: {exc}", send=False
                )
                return
            if self._direct_tls and self._tls.handshake_done:
                if self._tls.alpn != ALPN_POSTGRESQL:
                    # As PostgreSQL 17: direct TLS without ALPN "postgresql" is
                    # refused (cross-protocol attacks, ALPACA).
                    log.info("client %s: direct TLS without ALPN postgresql", self.client_addr)
                    self._reject(
                        P.SQLSTATE_PROTOCOL_VIOLATION,
                        "received direct SSL connection request without ALPN protocol "
                        "negotiation extension",
                    )
                    return
                self._direct_tls = False  # checked once
            if not data:
                return
        if self.phase is Phase.PREAMBLE:
            self._preamble += data
            self._read_preamble()
        elif self.phase is Phase.CONNECTING:
            assert self._held is not None
            self._held.append(data)
            self._held_size += len(data)
            if self._held_size > _HELD_LIMIT:
                self.pause(Pause.HELD)
        else:
            self._relay_frontend(data)

    def _relay_frontend(self, data: bytes) -> None:
        try:
            captured = self._scanner.feed(data)  # type: ignore[union-attr]
        except ProtocolViolation as exc:
            self._violation(exc)
            return
        if self._require is not None or self._proxy.refusing is not None:
            self._relay_checked(data, captured)
            return
        self._up_write(data)
        if captured is not None:
            self._observe_frontend(captured)

    def _relay_checked(self, data: bytes, captured: list[Captured] | None) -> None:
        """Forward under ``[identity] require``: refuse before forwarding.

        The tracker sees the messages first and names the statements without
        an acceptable identity; those are rewritten in place.  A Query or
        Execute that is not complete yet is held back until it is.
        """
        assert self._tracker is not None and self._scanner is not None
        held = self._partial
        chunk = held + data if held else data
        shift = len(held)
        cut = len(chunk)
        if self._scanner.pending_type in _CHECKED_TYPES:
            start = self._scanner.pending_start
            cut = shift + start if start >= 0 else 0
        self._partial = chunk[cut:]
        refused: list[int] | None = None
        refusing = self._proxy.refusing
        if captured is not None:
            try:
                refused = self._tracker.on_frontend(
                    captured,
                    _monotonic_ns(),
                    self._require,
                    P.SQLSTATE_DISK_FULL if refusing is not None else None,
                )
            except Exception as exc:
                # The identity check is a gate: when it fails, fail closed.
                log.error(
                    "client %s: identity check failed (%s); closing", self.client_addr, where(exc)
                )
                self._close(
                    "identity check failed",
                    P.build_error(P.SQLSTATE_INVALID_AUTHORIZATION, "identity check failed"),
                    sqlstate=P.SQLSTATE_INVALID_AUTHORIZATION,
                )
                return
        head = chunk[:cut]
        if refused:
            assert captured is not None
            if refusing is not None:
                error = P.build_error(
                    P.SQLSTATE_DISK_FULL,
                    f"statement refused: the audit log cannot be written ({refusing}); "
                    "statements are accepted again as soon as it can",
                    severity="ERROR",
                )
            else:
                error = P.build_error(
                    P.SQLSTATE_INVALID_AUTHORIZATION,
                    _HOW_TO_IDENTIFY[self._require or "any"],
                    severity="ERROR",
                )
            replacements: list[tuple[int, int, bytes]] = []
            for position in refused:
                mtype, body, truncated, _counted, end = captured[position]
                if truncated:
                    self._close(
                        "refused statement too large to rewrite",
                        P.build_error(
                            P.SQLSTATE_INVALID_AUTHORIZATION,
                            _HOW_TO_IDENTIFY[self._require or "any"],
                        ),
                        sqlstate=P.SQLSTATE_INVALID_AUTHORIZATION,
                    )
                    return
                end += shift
                # A FunctionCall is answered like a Query: error, then ReadyForQuery.
                replacement = _REFUSED_EXECUTE if mtype == P.F_EXECUTE else _REFUSED_QUERY
                replacements.append((end - 5 - len(body), end, replacement))
                self.refusals.append(error)
            head = _splice(head, replacements)
        if head:
            self._up_write(head)

    def rewrite_refusals(self, data: bytes, captured: list[Captured]) -> bytes:
        """Turn the server's error for a rewritten statement into the refusal."""
        replacements: list[tuple[int, int, bytes]] = []
        for mtype, body, _truncated, _counted, end in captured:
            if mtype == P.B_ERROR and _REFUSAL_MARK in body and self.refusals:
                error = self.refusals.popleft()
                start = end - 5 - len(body)
                if start < 0:
                    continue  # began in an earlier chunk, already forwarded: leave it
                replacements.append((start, end, error))
        return _splice(data, replacements) if replacements else data

    def _read_preamble(self) -> None:
        buf = self._preamble
        while self.phase is Phase.PREAMBLE and buf:
            if buf[0] == P.TLS_HANDSHAKE_BYTE and self._tls is None:
                self._start_direct_tls()
                return
            if len(buf) < 8:
                return
            length = int.from_bytes(buf[:4], "big")
            if not 8 <= length <= P.MAX_STARTUP_LENGTH:
                self._reject(
                    P.SQLSTATE_PROTOCOL_VIOLATION, f"invalid length of startup packet: {length}"
                )
                return
            if len(buf) < length:
                return
            packet = bytes(buf[:length])
            del buf[:length]
            code = int.from_bytes(packet[4:8], "big")
            if code == P.SSL_REQUEST_CODE:
                self._answer_ssl_request(bool(buf))
            elif code == P.GSSENC_REQUEST_CODE:
                self._write(b"N")
            elif code == P.CANCEL_REQUEST_CODE:
                self._forward_cancel(packet)
            else:
                self._startup(packet)

    def _answer_ssl_request(self, more_buffered: bool) -> None:
        ctx = self._proxy.tls_context
        if self._tls is not None:
            self._reject(P.SQLSTATE_PROTOCOL_VIOLATION, "SSLRequest inside an encrypted connection")
        elif more_buffered:
            # Bytes sent before our answer could be spliced into the TLS
            # stream by an attacker (CVE-2021-23214): refuse.
            self._reject(
                P.SQLSTATE_PROTOCOL_VIOLATION, "received unencrypted data after SSL request"
            )
        elif ctx is None:
            self._write(b"N")
        else:
            self._write(b"S")
            self._tls = TlsTerminator(ctx, self._transport.write)  # type: ignore[union-attr]
            self._write = self._tls.send

    def _start_direct_tls(self) -> None:
        ctx = self._proxy.tls_context
        if ctx is None:
            log.info("client %s: direct TLS attempted but TLS is not configured", self.client_addr)
            self._reject(P.SQLSTATE_PROTOCOL_VIOLATION, "TLS is not configured", send=False)
            return
        self._tls = TlsTerminator(ctx, self._transport.write)  # type: ignore[union-attr]
        self._write = self._tls.send
        self._direct_tls = True
        data = bytes(self._preamble)
        self._preamble.clear()
        self._slow_received(data)

    def _forward_cancel(self, packet: bytes) -> None:
        # A CancelRequest carries PgBouncer's (or PostgreSQL's) key; it goes
        # upstream unchanged on a connection of its own and gets no answer.
        # The client's connection stays open until the upstream has processed
        # it, so that "connection closed" means "cancel delivered" end to end.
        self._cancelling = True
        self._preamble.clear()
        if self._transport is not None:
            self._transport.pause_reading()
        task = self._proxy.loop.create_task(self._proxy.forward_cancel(packet))
        task.add_done_callback(lambda _: self._close("cancel request forwarded", None))

    def _startup(self, packet: bytes) -> None:
        try:
            startup = P.parse_startup(packet)
        except P.StartupError as exc:
            self._reject(P.SQLSTATE_PROTOCOL_VIOLATION, str(exc))
            return
        params = startup.parameters
        self._startup_params = params
        if self._over_limit:
            self._reject(
                P.SQLSTATE_TOO_MANY_CONNECTIONS,
                f"sorry, too many clients already (scalple max_client_conn = "
                f"{self._proxy.config.server.max_client_conn})",
            )
            return
        if self._proxy.shutting_down:
            self._reject(P.SQLSTATE_ADMIN_SHUTDOWN, "the proxy is shutting down")
            return
        forward, identity = extract_identity(params)
        startup.parameters = forward
        user = params["user"]
        self._session = SessionInfo(
            session_id=self._proxy.new_session_id(),
            client_addr=self.client_addr,
            db_role=user,
            database=params.get("database") or user,
            application_name=params.get("application_name", ""),
            user_id=identity.user_id,
            email=identity.email,
            identity_source="none" if identity.empty else "startup",
            tls=self._tls is not None,
            opened_ns=time.time_ns(),
        )
        config = self._proxy.config
        self._scanner = MessageScanner(
            P.FRONTEND_CAPTURE,
            b"",
            P.FRONTEND_ALLOWED,
            config.server.max_message_size,
            config.log.capture_limit,
        )
        sink = self._proxy.sink
        self._tracker = StatementTracker(
            self._session,
            self._record_strictly if sink.strict else sink.submit,
            IdentityState(identity, self._proxy.token_verifier),
        )
        rules = config.identity
        if rules.require != "none" and user not in rules.exempt_roles:
            self._require = rules.require
        self._set_phase(Phase.CONNECTING)
        if self._preamble:
            self._held = [bytes(self._preamble)]
            self._preamble.clear()
        self._proxy.loop.create_task(self._connect_upstream(P.build_startup(startup)))

    async def _connect_upstream(self, startup: bytes) -> None:
        try:
            transport, server = await self._proxy.connector.connect(
                self._proxy.loop, lambda: ServerLink(self)
            )
        except UpstreamError as exc:
            log.warning("client %s: %s", self.client_addr, exc)
            self._reject(P.SQLSTATE_CONNECTION_FAILURE, str(exc))
            return
        if self.phase is Phase.CLOSED:
            transport.close()
            return
        high = self._proxy.config.server.write_buffer_high
        transport.set_write_buffer_limits(high=high, low=high // 4)
        ssl_object = transport.get_extra_info("ssl_object")
        self.channel_binding_passthrough = (
            self._tls is not None
            and ssl_object is not None
            and self._proxy.tls_cert_der is not None
            and ssl_object.getpeercert(binary_form=True) == self._proxy.tls_cert_der
        )
        self._server = server
        self._up_transport = transport
        self._up_write = transport.write
        transport.write(startup)
        self._set_phase(Phase.AUTHENTICATING)
        held, self._held = self._held or [], None
        for chunk in held:
            self._relay_frontend(chunk)
            if self.closed:
                return
        self.resume(Pause.HELD)
        self.update_fast()

    @property
    def database(self) -> str | None:
        return self._session.database if self._session is not None else None

    def read_row_subjects(self, columns: dict[tuple[int, int], int]) -> None:
        """Have the backend scanner read these columns out of result rows.

        Only between requests: the scanner's queue of result shapes is empty
        while extraction is off, so requests already in flight would take
        the shapes of later ones.  Otherwise it waits for the answers.
        """
        tracker = self._tracker
        if tracker is not None and not tracker.answered:
            self._deferred_columns = columns
            return
        self._deferred_columns = None
        if self._server is not None:
            self._server.read_row_subjects(columns)

    def _record_strictly(self, event: StatementEvent) -> None:
        """Strict durability: count the records whose statement's answer must
        wait for them (ServerLink holds the next backend bytes for them).

        A statement refused because the log cannot be written ran nothing,
        and its record cannot become durable until the log works: its answer
        is not held.  Records emitted while observing the client (a suspended
        portal closed by a Bind or Close) are counted too.
        """
        self._proxy.sink.submit(event)
        if not (event.status == "error" and event.sqlstate == P.SQLSTATE_DISK_FULL):
            self.unheld_records += 1

    def update_fast(self) -> None:
        """Whether chunks may take the inline path: nothing to check first."""
        self._fast = (
            self._tls is None
            and self._require is None
            and self._proxy.refusing is None
            and self.phase in (Phase.READY, Phase.AUTHENTICATING)
        )

    def session_ready(self) -> None:
        """The upstream sent its first ReadyForQuery: authentication is done."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._set_phase(Phase.READY)
        assert self._session is not None
        if self._proxy.config.subjects and self._server is not None:
            assert self._tracker is not None
            self._tracker.watch_rows(self._server.scanner)
            columns = self._proxy.subject_columns.get(self._session.database)
            if columns:
                self.read_row_subjects(columns)
        self._proxy.sink.submit(self._session)
        if self._proxy.sink.congested:
            self.pause(Pause.SINK)
        if self.draining:
            self._close_for_shutdown()

    def _startup_timed_out(self) -> None:
        self._timer = None
        if self.phase is not Phase.READY and self.phase is not Phase.CLOSED:
            self._reject(P.SQLSTATE_PROTOCOL_VIOLATION, "startup did not complete in time")

    # -- observation -----------------------------------------------------------

    def _observe_frontend(self, captured: list[Captured]) -> None:
        try:
            self._tracker.on_frontend(captured, _monotonic_ns())  # type: ignore[union-attr]
        except Exception as exc:
            # Observation must never break relaying; the failure is loud.
            self._proxy.observation_failed(self, "frontend", exc)

    def observe_backend(self, captured: list[Captured]) -> None:
        tracker = self._tracker
        try:
            tracker.on_backend(captured, _monotonic_ns())  # type: ignore[union-attr]
        except Exception as exc:
            self._proxy.observation_failed(self, "backend", exc)
        if self._deferred_columns is not None and tracker is not None and tracker.answered:
            self.read_row_subjects(self._deferred_columns)
        if self.refusals and tracker is not None and tracker.answered:
            # A refused statement can end in another error (25P02 in an
            # aborted transaction) or be skipped after an earlier one: once
            # everything is answered, no rewritten error can still come.
            self.refusals.clear()
        if self.draining and tracker is not None and tracker.idle:
            self._close_for_shutdown()

    # -- ending ----------------------------------------------------------------

    def _violation(self, exc: ProtocolViolation) -> None:
        self._proxy.protocol_violations += 1
        log.warning(
            "client %s (session %s): protocol violation at byte %d: %s; closing it",
            self.client_addr,
            self._session.session_id if self._session else "-",
            exc.offset,
            exc,
        )
        self._close(
            f"protocol violation: {exc}", P.build_error(P.SQLSTATE_PROTOCOL_VIOLATION, str(exc))
        )

    def _reject(self, sqlstate: str, message: str, *, send: bool = True) -> None:
        """Refuse a connection that never became a session."""
        self._close(message, P.build_error(sqlstate, message) if send else None, sqlstate=sqlstate)

    def upstream_failed(self, message: str, *, at_boundary: bool) -> None:
        """The upstream closed or broke: tell the client, if its stream allows."""
        if self.phase is Phase.CLOSED:
            return
        if self._tracker is not None and self._tracker.terminated:
            self._close("client terminated", None)
            return
        self._proxy.upstream_failures += 1
        error = P.build_error(P.SQLSTATE_CONNECTION_FAILURE, message) if at_boundary else None
        log.warning("client %s: %s", self.client_addr, message)
        self._close(message, error, sqlstate=P.SQLSTATE_CONNECTION_FAILURE)

    def shutdown(self) -> None:
        """Close now if idle, else when the running transaction ends."""
        self.draining = True
        tracker = self._tracker
        if self.phase is Phase.READY and tracker is not None and tracker.idle:
            self._close_for_shutdown()
        elif self.phase in (Phase.PREAMBLE, Phase.CONNECTING):
            self._reject(P.SQLSTATE_ADMIN_SHUTDOWN, "the proxy is shutting down")

    def _close_for_shutdown(self) -> None:
        self._close("proxy shutting down", _SHUTDOWN_ERROR)

    def force_close(self, reason: str) -> None:
        self._close(
            reason,
            P.build_error(P.SQLSTATE_ADMIN_SHUTDOWN, reason),
            sqlstate=P.SQLSTATE_ADMIN_SHUTDOWN,
        )

    def _close(self, reason: str, error: bytes | None, *, sqlstate: str | None = None) -> None:
        """The one way a link ends: idempotent, records what happened."""
        if self.phase is Phase.CLOSED:
            return
        was = self.phase
        self._set_phase(Phase.CLOSED)
        self._fast = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        server_ok = self._server is None or self._server.at_boundary
        if error is not None and server_ok and self._transport is not None:
            with contextlib.suppress(Exception):  # the client may already be gone
                self._write(error)
        if self._tls is not None:
            with contextlib.suppress(Exception):
                self._tls.close()
        if self._transport is not None:
            self._transport.close()
        if self._up_transport is not None:
            if self._scanner is not None and self._scanner.at_boundary and was is Phase.READY:
                self._up_transport.write(_TERMINATE)
            self._up_transport.close()
        now = _monotonic_ns()
        if self._tracker is not None:
            self._tracker.close(now, sqlstate or P.SQLSTATE_CONNECTION_FAILURE)
        sink = self._proxy.sink
        if was is Phase.READY and self._session is not None:
            statements = self._tracker.statements if self._tracker else 0
            sink.submit(SessionClosed(self._session, time.time_ns(), statements, reason))
        elif was is not Phase.PREAMBLE or self._startup_params or sqlstate is not None:
            params = self._startup_params
            code = sqlstate or self._server_error_code() or P.SQLSTATE_CONNECTION_FAILURE
            rejected = self._proxy.rejected
            rejected[code] = rejected.get(code, 0) + 1
            sink.submit(
                SessionRejected(
                    client_addr=self.client_addr,
                    db_role=params.get("user"),
                    database=params.get("database") or params.get("user"),
                    at_ns=time.time_ns(),
                    sqlstate=code,
                    reason=reason,
                )
            )

    def _server_error_code(self) -> str | None:
        return self._server.auth_error if self._server is not None else None


class ServerLink(asyncio.Protocol):
    """The upstream's side of one proxied connection; belongs to a ClientLink."""

    def __init__(self, client: ClientLink) -> None:
        self._client = client
        self._transport: asyncio.Transport | None = None
        self._ready = False
        self._auth = bytearray()
        self.auth_error: str | None = None
        config = client._proxy.config
        capture = P.BACKEND_CAPTURE_DESCRIBED if config.subjects else P.BACKEND_CAPTURE
        self._scanner = MessageScanner(
            capture, P.BACKEND_COUNT, None, 0x3FFFFFFF, config.log.capture_limit
        )
        # [log] durability = "strict": a statement's completion waits here
        # until its record is durable (scalple/sink/audit.py releases it).
        self._strict = client._proxy.sink.strict
        self._held: list[bytes] | None = None
        self._holds = 0

    @property
    def scanner(self) -> MessageScanner:
        return self._scanner

    def read_row_subjects(self, columns: dict[tuple[int, int], int]) -> None:
        limit = self._client._proxy.config.masking.subjects_limit
        self._scanner.set_row_subjects(columns or None, limit)

    @property
    def at_boundary(self) -> bool:
        """Whether an error message can be injected toward the client now."""
        return (not self._auth) if not self._ready else self._scanner.at_boundary

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._ready:
            try:
                captured = self._scanner.feed(data)
            except ProtocolViolation as exc:
                self._client.upstream_failed(
                    f"upstream protocol violation: {exc}", at_boundary=False
                )
                return
            client = self._client
            if captured is not None and client.refusals:
                data = client.rewrite_refusals(data, captured)
            if self._strict:
                self._relay_durable(data, captured)
                return
            client._write(data)
            if captured is not None:
                client.observe_backend(captured)
            return
        self._authenticating(data)

    def _relay_durable(self, data: bytes, captured: list[Captured] | None) -> None:
        """Strict durability: forward up to the first completion of this
        chunk, hold the rest until every record counted so far (see
        ``ClientLink._record_strictly``) is durable."""
        client = self._client
        sink = client._proxy.sink
        if captured is not None:
            client.observe_backend(captured)
        recorded = client.unheld_records > 0
        if recorded:
            client.unheld_records = 0
        if self._held is not None:
            self._held.append(data)
            if recorded:
                self._hold(sink)
            return
        if not recorded:
            client._write(data)
            return
        cut = 0
        for mtype, body, truncated, _counted, end in captured or ():
            if mtype in _COMPLETIONS:
                start = end - 5 - len(body)
                cut = start if not truncated and start > 0 else 0
                break
        if cut:
            client._write(data[:cut])
        self._held = [data[cut:]]
        if self._transport is not None:
            self._transport.pause_reading()
        self._hold(sink)

    def _hold(self, sink: Sink) -> None:
        self._holds += 1
        sink.hold(self._release)

    def _release(self) -> None:
        self._holds -= 1
        if self._holds or self._held is None:
            return
        held, self._held = self._held, None
        client = self._client
        if client.phase is Phase.CLOSED:
            return
        if self._transport is not None:
            self._transport.resume_reading()  # first: the write may pause it again
        client._write(b"".join(held))

    def _authenticating(self, data: bytes) -> None:
        """Relay authentication message by message, rewriting SASL offers."""
        client = self._client
        if client.phase is Phase.CLOSED:
            return
        buf = self._auth
        buf += data
        out: list[bytes] = []
        while len(buf) >= 5:
            mtype = buf[0]
            length = int.from_bytes(buf[1:5], "big")
            if length < 4 or length > _AUTH_MESSAGE_LIMIT:
                client.upstream_failed(
                    f"upstream sent an invalid message during authentication (length {length})",
                    at_boundary=True,
                )
                return
            end = 1 + length
            if len(buf) < end:
                break
            message = bytes(buf[:end])
            del buf[:end]
            if (
                mtype == P.B_AUTHENTICATION
                and P.auth_code(message[5:]) == P.AUTH_SASL
                and not client.channel_binding_passthrough
            ):
                message = P.build_message(b"R", P.strip_scram_plus(message[5:]))
            elif mtype == P.B_ERROR:
                self.auth_error = P.parse_error_fields(message[5:]).get("C")
            out.append(message)
            if mtype == P.B_READY_FOR_QUERY:
                client._write(b"".join(out))
                rest = bytes(buf)
                buf.clear()
                self._ready = True
                client.session_ready()
                if rest:
                    self.data_received(rest)
                return
        if out:
            client._write(b"".join(out))

    def pause_writing(self) -> None:
        self._client.pause(Pause.UPSTREAM_FULL)

    def resume_writing(self) -> None:
        self._client.resume(Pause.UPSTREAM_FULL)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        client = self._client
        if client.phase is Phase.CLOSED:
            return
        if self.auth_error is not None and not self._ready:
            # The upstream refused the login and said why; the client has it.
            client._close("authentication failed", None, sqlstate=self.auth_error)
            return
        detail = f": {exc}" if exc else ""
        client.upstream_failed(
            f"connection to upstream {client._proxy.connector.address} lost{detail}",
            at_boundary=self.at_boundary,
        )


def _discard(data: bytes) -> None:
    """Writer of a link side that is not connected (yet)."""


def _splice(data: bytes, replacements: list[tuple[int, int, bytes]]) -> bytes:
    """``data`` with each ``(start, end)`` range, in order, replaced."""
    pieces: list[bytes] = []
    pos = 0
    for start, end, replacement in replacements:
        pieces.append(data[pos:start])
        pieces.append(replacement)
        pos = end
    pieces.append(data[pos:])
    return b"".join(pieces)
