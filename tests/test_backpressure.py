"""A slow reader must not make the proxy buffer without bound: when the
client stops reading, the proxy stops reading from the upstream."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

from scalple import protocol as P
from scalple.devcluster import PostgresCluster
from tests.conftest import ProxyFactory

RESULT_BYTES = 200_000 * 1000  # the row payload alone; framing comes on top


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_stalled_client_does_not_grow_proxy_memory(
    proxy_factory: ProxyFactory, pg: PostgresCluster
) -> None:
    proxy = proxy_factory(f"{pg.host}:{pg.port}")
    assert proxy.process is not None
    pid = proxy.process.pid
    sock = socket.create_connection((proxy.host, proxy.port), timeout=30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.sendall(
        P.build_startup(P.StartupPacket(P.PROTOCOL_3, {"user": "trust_user", "database": "app"}))
    )
    data = b""
    while not data.endswith(P.build_message(b"Z", b"I")):
        data += sock.recv(65536)
    baseline = rss_bytes(pid)
    sock.sendall(
        P.build_message(b"Q", b"select repeat('x', 1000) from generate_series(1, 200000)\0")
    )
    time.sleep(3)  # the server can produce all 200 MB in well under this
    stalled = rss_bytes(pid)
    # Everything beyond socket buffers and one high-water mark must have been
    # left in the server's socket, not in the proxy.
    assert stalled - baseline < 32 * 1024 * 1024, (baseline, stalled)

    received = 0
    rows = 0
    buf = b""
    done = False
    while not done:
        chunk = sock.recv(1 << 20)
        assert chunk, "proxy closed the connection"
        received += len(chunk)
        buf += chunk
        while len(buf) >= 5:
            length = struct.unpack("!I", buf[1:5])[0]
            if len(buf) < 1 + length:
                break
            mtype = buf[:1]
            if mtype == b"D":
                rows += 1
            elif mtype == b"Z":
                done = True
            buf = buf[1 + length :]
    sock.close()
    assert rows == 200_000 and received > RESULT_BYTES
    (record,) = proxy.wait_for_records(lambda rs: len(rs) == 1)
    assert record["rows"] == 200_000
