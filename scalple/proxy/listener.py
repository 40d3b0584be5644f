"""The client-facing listener: accepts connections, applies limits, shuts down.

``Proxy`` owns what all links share (configuration, TLS context, upstream
connector, sink) and the set of live links; it creates one ``ClientLink``
per accepted connection and is the only place that knows about all of them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import ssl
import time

from scalple.config import Config, parse_address
from scalple.events import resync_clock
from scalple.identity.token import TokenVerifier
from scalple.logsafe import where
from scalple.proxy.link import ClientLink, Pause, Phase
from scalple.proxy.tls import server_context
from scalple.proxy.upstream import UpstreamConnector, UpstreamError
from scalple.sink.base import Sink

__all__ = ["Proxy"]


def _first_certificate_der(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, encoding="ascii") as fh:
        pem = fh.read()
    end = pem.find("-----END CERTIFICATE-----")
    return ssl.PEM_cert_to_DER_cert(pem[: end + 25]) if end >= 0 else None


log = logging.getLogger(__name__)


class Proxy:
    """A listening Scalple proxy bound to one event loop."""

    def __init__(
        self, config: Config, sink: Sink, loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        self.config = config
        self.sink = sink
        self.loop = loop or asyncio.get_running_loop()
        self.connector = UpstreamConnector(config.upstream)
        self.tls_context = (
            server_context(config.server.tls_cert, config.server.tls_key)
            if config.server.tls_cert and config.server.tls_key
            else None
        )
        # SCRAM channel binding (tls-server-end-point) survives the proxy only
        # when clients see the very certificate the upstream presents.
        self.tls_cert_der = (
            _first_certificate_der(config.server.tls_cert) if self.tls_context else None
        )
        self.token_verifier = _token_verifier(config)
        self.links: set[ClientLink] = set()
        self.shutting_down = False
        # Counters read by the metrics collector at scrape time.
        self.observation_errors = 0
        self.accepted = 0
        self.rejected: dict[str, int] = {}
        self.protocol_violations = 0
        self.upstream_failures = 0
        self._ids = itertools.count(1)
        self._session_ids = itertools.count(1)
        self._boot = secrets.token_hex(3)
        self._server: asyncio.Server | None = None
        self._clock: asyncio.TimerHandle | None = None
        # Why statements are refused with 53100: the log cannot be written and
        # [log] on_failure = "block".  None while the log works.
        self.refusing: str | None = None
        # Result columns whose values name data subjects, per database, as
        # RowDescription identifies them; learned from the audit worker.
        self.subject_columns: dict[str, dict[tuple[int, int], int]] = {}
        sink.notify(
            self.loop,
            self._sink_congested,
            self._sink_drained,
            self._store_failing,
            self._learn_subject_columns,
        )

    @property
    def address(self) -> tuple[str, int]:
        """Where the listener is bound (the real port when 0 was asked for)."""
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def start(self) -> None:
        host, port = parse_address(self.config.server.listen, key="server.listen")
        self._server = await self.loop.create_server(
            self._new_link, host, port, reuse_address=True, backlog=2048
        )
        self._tick()
        log.info(
            "listening on %s:%d, upstream %s (tls %s), client tls %s",
            *self.address,
            self.connector.address,
            self.connector.mode,
            "on" if self.tls_context else "off",
        )

    def _tick(self) -> None:
        resync_clock()
        self._clock = self.loop.call_later(1.0, self._tick)

    def _new_link(self) -> ClientLink:
        over = len(self.links) >= self.config.server.max_client_conn
        return ClientLink(self, next(self._ids), over)

    def new_session_id(self) -> str:
        return f"{self._boot}-{next(self._session_ids)}"

    def link_opened(self, link: ClientLink) -> None:
        self.accepted += 1
        self.links.add(link)
        if self.sink.congested:
            link.pause(Pause.SINK)

    def link_closed(self, link: ClientLink) -> None:
        self.links.discard(link)

    def _sink_drained(self) -> None:
        if self.sink.congested:
            return
        for link in self.links:
            link.resume(Pause.SINK)

    def _sink_congested(self) -> None:
        for link in self.links:
            link.pause(Pause.SINK)

    def _store_failing(self, reason: str | None) -> None:
        """The store started (reason) or stopped (None) failing to write."""
        if reason is not None:
            log.critical("the audit log cannot be written: %s", reason)
        if self.config.log.on_failure != "block" or reason == self.refusing:
            return
        if reason is not None and self.refusing is None:
            log.critical("refusing new statements with 53100 until the audit log can be written")
        elif reason is None:
            log.warning("the audit log can be written again: accepting statements")
        self.refusing = reason
        for link in self.links:
            link.update_fast()

    def _learn_subject_columns(self, database: str, columns: dict[tuple[int, int], int]) -> None:
        self.subject_columns[database] = columns
        for link in self.links:
            if link.database == database:
                link.read_row_subjects(columns)

    def observation_failed(self, link: ClientLink, direction: str, exc: BaseException) -> None:
        self.observation_errors += 1
        log.error(
            "client %s: observing %s traffic failed (%s); traffic still relayed",
            link.client_addr,
            direction,
            where(exc),
        )

    async def forward_cancel(self, packet: bytes) -> None:
        """Send a CancelRequest upstream and wait until the upstream closes the
        connection: that is how the protocol says "processed" (libpq waits for
        it too).  Hanging up first makes PgBouncer drop the cancel, or (1.18,
        pgbouncer#801) crash with "bad client state: 0"."""
        closed: asyncio.Future[None] = self.loop.create_future()
        try:
            transport, _ = await self.connector.connect(self.loop, lambda: _CloseWaiter(closed))
        except UpstreamError as exc:
            log.warning("cancel request not delivered: %s", exc)
            return
        transport.write(packet)
        try:
            await asyncio.wait_for(closed, self.config.upstream.connect_timeout)
        except TimeoutError:
            log.warning("cancel request: upstream did not close the connection in time")
        finally:
            transport.close()

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting, let open transactions finish, then close everything."""
        if timeout is None:
            timeout = self.config.server.shutdown_timeout
        self.shutting_down = True
        if self._server is not None:
            self._server.close()
        for link in list(self.links):
            link.shutdown()
        deadline = time.monotonic() + timeout
        while self.links and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for link in list(self.links):
            if link.phase is not Phase.CLOSED:
                log.warning("client %s: still busy after %.1fs; closing", link.client_addr, timeout)
                link.force_close("terminating connection because the proxy is shutting down")
        await asyncio.sleep(0)
        if self._clock is not None:
            self._clock.cancel()
        if self._server is not None:
            await self._server.wait_closed()


class _CloseWaiter(asyncio.Protocol):
    """Resolves ``closed`` when the peer hangs up (the CancelRequest's only answer)."""

    def __init__(self, closed: asyncio.Future[None]) -> None:
        self._closed = closed

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed.done():
            self._closed.set_result(None)


def _token_verifier(config: Config) -> TokenVerifier | None:
    ident = config.identity
    if not (ident.hs256_secret_file or ident.public_key_file):
        return None
    return TokenVerifier(
        hs256_secret_file=ident.hs256_secret_file,
        public_key_file=ident.public_key_file,
        audience=ident.audience,
        issuer=ident.issuer,
        leeway=ident.leeway,
    )
