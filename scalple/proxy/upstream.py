"""Opening connections to the upstream (PgBouncer or PostgreSQL).

Upstream TLS follows PostgreSQL's own negotiation: an SSLRequest on the plain
socket, a one-byte answer, then the TLS handshake on that same socket, which
asyncio performs when given the connected socket and a context.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import TypeVar

from scalple.config import UpstreamConfig, parse_address
from scalple.protocol import build_ssl_request

__all__ = ["UpstreamConnector", "UpstreamError"]

P = TypeVar("P", bound=asyncio.BaseProtocol)


class UpstreamError(ConnectionError):
    """The upstream could not be reached or refused what was configured."""


class UpstreamConnector:
    """Knows where the upstream is and how to talk to it; reusable per connection."""

    def __init__(self, config: UpstreamConfig) -> None:
        self.host, self.port = parse_address(config.address, key="upstream.address")
        self.timeout = config.connect_timeout
        self.mode = config.tls
        self.server_name = config.tls_server_name or self.host
        self._ctx: ssl.SSLContext | None = None
        if config.tls == "verify-full":
            self._ctx = ssl.create_default_context(cafile=config.tls_ca_file)
        elif config.tls == "require":
            self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            self._ctx.check_hostname = False
            self._ctx.verify_mode = ssl.CERT_NONE

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def connect(
        self, loop: asyncio.AbstractEventLoop, factory: Callable[[], P]
    ) -> tuple[asyncio.Transport, P]:
        """A connected (and, if configured, encrypted) transport with ``factory()``."""
        try:
            return await asyncio.wait_for(self._connect(loop, factory), self.timeout)
        except TimeoutError:
            raise UpstreamError(
                f"timed out after {self.timeout:g}s connecting to upstream {self.address}"
            ) from None
        except ssl.SSLError as exc:
            raise UpstreamError(f"TLS with upstream {self.address} failed: {exc}") from None
        except OSError as exc:
            raise UpstreamError(
                f"could not connect to upstream {self.address}: {exc.strerror or exc}"
            ) from None

    async def _connect(
        self, loop: asyncio.AbstractEventLoop, factory: Callable[[], P]
    ) -> tuple[asyncio.Transport, P]:
        if self._ctx is None:
            transport, protocol = await loop.create_connection(factory, self.host, self.port)
            return transport, protocol
        infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        family, type_, proto, _, address = infos[0]
        sock = socket.socket(family, type_, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
            await loop.sock_sendall(sock, build_ssl_request())
            answer = await loop.sock_recv(sock, 1)
            if answer != b"S":
                raise UpstreamError(
                    f"upstream {self.address} does not accept TLS (answered {answer!r}) "
                    f"but [upstream] tls = {self.mode!r}"
                )
            transport, protocol = await loop.create_connection(
                factory, sock=sock, ssl=self._ctx, server_hostname=self.server_name
            )
        except BaseException:
            sock.close()
            raise
        return transport, protocol
