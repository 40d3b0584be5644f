"""PostgreSQL protocol vocabulary: message codes, SQLSTATEs and the few
message bodies the proxy builds or rewrites itself.

Everything here is pure (no sockets, no asyncio) so that the relay, the tests
and the fuzzers share one definition of each byte.
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = [
    "BACKEND_CAPTURE",
    "BACKEND_CAPTURE_DESCRIBED",
    "BACKEND_COUNT",
    "FRONTEND_ALLOWED",
    "FRONTEND_CAPTURE",
    "MAX_STARTUP_LENGTH",
    "StartupError",
    "StartupPacket",
    "build_error",
    "build_message",
    "build_startup",
    "parse_error_fields",
    "parse_startup",
]

# --- Startup-phase request codes (the int32 after the length) -------------
PROTOCOL_3: Final = 3 << 16  # StartupMessage, protocol 3.x (minor in low bits)
CANCEL_REQUEST_CODE: Final = 80877102  # CancelRequest
SSL_REQUEST_CODE: Final = 80877103  # SSLRequest
GSSENC_REQUEST_CODE: Final = 80877104  # GSSENCRequest
MAX_STARTUP_LENGTH: Final = 10000  # PostgreSQL's own cap on startup packets
TLS_HANDSHAKE_BYTE: Final = 0x16  # first byte of a TLS record: direct TLS (PG 17)

# --- Frontend message types ------------------------------------------------
F_BIND: Final = ord("B")  # Bind
F_CLOSE: Final = ord("C")  # Close
F_COPY_DATA: Final = ord("d")  # CopyData
F_COPY_DONE: Final = ord("c")  # CopyDone
F_COPY_FAIL: Final = ord("f")  # CopyFail
F_DESCRIBE: Final = ord("D")  # Describe
F_EXECUTE: Final = ord("E")  # Execute
F_FLUSH: Final = ord("H")  # Flush
F_FUNCTION_CALL: Final = ord("F")  # FunctionCall
F_PARSE: Final = ord("P")  # Parse
F_PASSWORD: Final = ord("p")  # PasswordMessage / SASL responses / GSS
F_QUERY: Final = ord("Q")  # Query (simple protocol)
F_SYNC: Final = ord("S")  # Sync
F_TERMINATE: Final = ord("X")  # Terminate

FRONTEND_ALLOWED: Final = b"BCdcfDEHFPpQSX"
"""Every type a client may send after the startup packet."""
FRONTEND_CAPTURE: Final = b"QPBECSFXDcf"
"""Types whose bodies the statement tracker needs."""

# --- Backend message types -------------------------------------------------
B_AUTHENTICATION: Final = ord("R")  # Authentication*
B_BACKEND_KEY: Final = ord("K")  # BackendKeyData
B_BIND_COMPLETE: Final = ord("2")  # BindComplete
B_PARAMETER_DESCRIPTION: Final = ord("t")  # ParameterDescription
B_COMMAND_COMPLETE: Final = ord("C")  # CommandComplete
B_COPY_DATA: Final = ord("d")  # CopyData
B_COPY_IN: Final = ord("G")  # CopyInResponse
B_DATA_ROW: Final = ord("D")  # DataRow
B_EMPTY_QUERY: Final = ord("I")  # EmptyQueryResponse
B_ERROR: Final = ord("E")  # ErrorResponse
B_FUNCTION_RESULT: Final = ord("V")  # FunctionCallResponse
B_NOTICE: Final = ord("N")  # NoticeResponse
B_PARAMETER_STATUS: Final = ord("S")  # ParameterStatus
B_PARSE_COMPLETE: Final = ord("1")  # ParseComplete
B_PORTAL_SUSPENDED: Final = ord("s")  # PortalSuspended
B_READY_FOR_QUERY: Final = ord("Z")  # ReadyForQuery
B_ROW_DESCRIPTION: Final = ord("T")  # RowDescription
B_NO_DATA: Final = ord("n")  # NoData

BACKEND_CAPTURE: Final = b"CEZsIVtGS"
# With [subjects]: statement descriptions too, so that results of prepared
# statements (no RowDescription of their own) can be watched for subjects.
BACKEND_CAPTURE_DESCRIBED: Final = BACKEND_CAPTURE + b"Tn"
"""Types that end a statement or a request: the tracker matches on these."""
BACKEND_COUNT: Final = b"Dd"
"""Types counted per statement (result rows, COPY OUT rows)."""

# --- Authentication request codes (int32 after 'R') ------------------------
AUTH_SASL: Final = 10  # AuthenticationSASL: list of mechanisms
SCRAM_PLUS: Final = b"SCRAM-SHA-256-PLUS"

# --- SQLSTATEs the proxy itself reports -----------------------------------
SQLSTATE_PROTOCOL_VIOLATION: Final = "08P01"
SQLSTATE_CONNECTION_FAILURE: Final = "08006"
SQLSTATE_TOO_MANY_CONNECTIONS: Final = "53300"
SQLSTATE_ADMIN_SHUTDOWN: Final = "57P01"
SQLSTATE_FEATURE_NOT_SUPPORTED: Final = "0A000"
SQLSTATE_INVALID_AUTHORIZATION: Final = "28000"
SQLSTATE_DISK_FULL: Final = "53100"

_HEADER = struct.Struct("!cI")
_INT32 = struct.Struct("!I")
_STARTUP_HEAD = struct.Struct("!II")


def build_message(mtype: bytes, body: bytes) -> bytes:
    """One typed message: type byte, int32 length (including itself), body."""
    return _HEADER.pack(mtype, len(body) + 4) + body


def build_error(
    code: str, message: str, *, severity: str = "FATAL", detail: str | None = None
) -> bytes:
    """An ErrorResponse the client's driver will show as a normal server error."""
    fields = [
        b"S" + severity.encode(),
        b"V" + severity.encode(),
        b"C" + code.encode(),
        b"M" + message.encode("utf-8", "replace"),
    ]
    if detail:
        fields.append(b"D" + detail.encode("utf-8", "replace"))
    return build_message(b"E", b"\0".join(fields) + b"\0\0")


def parse_error_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse body, keyed by field letter."""
    fields: dict[str, str] = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


class StartupError(ValueError):
    """A startup-phase packet that cannot be accepted; the text says why."""


class StartupPacket:
    """A StartupMessage's protocol version and parameters, in client order."""

    __slots__ = ("parameters", "version")

    def __init__(self, version: int, parameters: dict[str, str]) -> None:
        self.version = version
        self.parameters = parameters


def parse_startup(packet: bytes) -> StartupPacket:
    """Decode a whole StartupMessage (length prefix included).

    Parameter names and values are decoded as UTF-8 with surrogate escapes so
    that re-encoding gives back the exact bytes the client sent.
    """
    if len(packet) < 8:
        raise StartupError("startup packet too short")
    length, version = _STARTUP_HEAD.unpack_from(packet)
    if length != len(packet):
        raise StartupError(f"startup packet length {length} does not match {len(packet)} bytes")
    if version >> 16 != 3:
        raise StartupError(
            f"unsupported frontend protocol {version >> 16}.{version & 0xFFFF}: "
            "server supports 3.0 to 3.0"
        )
    body = packet[8:]
    if not body.endswith(b"\0"):
        raise StartupError("startup packet is not NUL-terminated")
    parts = body[:-1].split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    if len(parts) % 2:
        raise StartupError("startup packet has a parameter name without a value")
    parameters: dict[str, str] = {}
    for i in range(0, len(parts), 2):
        name = parts[i].decode("utf-8", "surrogateescape")
        if not name:
            raise StartupError("startup packet has an empty parameter name")
        parameters[name] = parts[i + 1].decode("utf-8", "surrogateescape")
    if "user" not in parameters:
        raise StartupError("no PostgreSQL user name specified in startup packet")
    return StartupPacket(version, parameters)


def build_startup(startup: StartupPacket) -> bytes:
    """Encode a StartupMessage; the inverse of :func:`parse_startup`."""
    body = b"".join(
        name.encode("utf-8", "surrogateescape")
        + b"\0"
        + value.encode("utf-8", "surrogateescape")
        + b"\0"
        for name, value in startup.parameters.items()
    )
    return _STARTUP_HEAD.pack(len(body) + 9, startup.version) + body + b"\0"


def build_ssl_request() -> bytes:
    """SSLRequest, as sent to the upstream when upstream TLS is on."""
    return _STARTUP_HEAD.pack(8, SSL_REQUEST_CODE)


def strip_scram_plus(body: bytes) -> bytes:
    """Remove SCRAM-SHA-256-PLUS from an AuthenticationSASL body.

    Channel binding ties SCRAM to the TLS certificate the client sees, which
    behind a TLS-terminating proxy is ours, not the server's: offering it
    would make every channel-binding client fail.
    """
    mechanisms = [m for m in body[4:].split(b"\0") if m and m != SCRAM_PLUS]
    return body[:4] + b"".join(m + b"\0" for m in mechanisms) + b"\0"


def auth_code(body: bytes) -> int:
    """The int32 request code at the start of an Authentication message."""
    return int(_INT32.unpack_from(body)[0])
