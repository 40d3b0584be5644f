"""TLS on the client side, over memory BIOs.

The proxy must read the first bytes of a connection before it knows whether
they are an SSLRequest, a startup packet or (PostgreSQL 17 direct TLS) a TLS
ClientHello.  Transport-level ``start_tls`` cannot take bytes that were
already read, so the proxy runs the TLS state machine itself and feeds it.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Callable

__all__ = ["ALPN_POSTGRESQL", "TlsTerminator", "server_context"]

ALPN_POSTGRESQL = "postgresql"
_READ_SIZE = 256 * 1024


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """The client-facing context: TLS 1.2+, ALPN ``postgresql`` offered."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    ctx.set_alpn_protocols([ALPN_POSTGRESQL])
    return ctx


class TlsTerminator:
    """Decrypts what the client sends and encrypts what it receives."""

    __slots__ = ("_incoming", "_object", "_outgoing", "_send", "handshake_done")

    def __init__(self, ctx: ssl.SSLContext, send: Callable[[bytes], object]) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._object = ctx.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._send = send
        self.handshake_done = False

    @property
    def alpn(self) -> str | None:
        return self._object.selected_alpn_protocol()

    def receive(self, data: bytes) -> bytes:
        """Ciphertext in, plaintext out (possibly empty).

        Raises ssl.SSLError on a bad handshake or record, and EOFError when
        the client closed the TLS session.
        """
        self._incoming.write(data)
        if not self.handshake_done:
            try:
                self._object.do_handshake()
                self.handshake_done = True
            except ssl.SSLWantReadError:
                self._flush()
                return b""
        chunks: list[bytes] = []
        while True:
            try:
                chunk = self._object.read(_READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self._flush()
                raise EOFError("client closed the TLS session") from None
            if not chunk:
                break
            chunks.append(chunk)
        self._flush()
        return b"".join(chunks)

    def send(self, data: bytes) -> None:
        """Plaintext to the client."""
        self._object.write(data)
        self._flush()

    def close(self) -> None:
        """Send close_notify before the TCP close: OpenSSL 3 clients (libpq >= 17's
        cancel_safe, for one) report a bare close as "unexpected eof while reading"."""
        if not self.handshake_done:
            return
        # SSLWantReadError: close_notify is written; we do not wait for the reply.
        with contextlib.suppress(ssl.SSLError):
            self._object.unwrap()
        self._flush()

    def _flush(self) -> None:
        if self._outgoing.pending:
            self._send(self._outgoing.read())
