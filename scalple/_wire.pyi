"""Type stubs for the Cython framing extension (see _wire.pyx for the why)."""

__all__ = (
    "MessageScanner",
    "ProtocolViolation",
    "identity_hint",
    "parse_bind",
    "parse_close",
    "parse_execute",
    "parse_parse",
    "read_cstring",
)

class ProtocolViolation(Exception):
    offset: int
    def __init__(self, message: str, offset: int) -> None: ...

Captured = tuple[int, bytes, bool, int, int]
"""(message type, body or its first capture_limit bytes, truncated, counted since
last, offset in the chunk just past the message)"""

class MessageScanner:
    messages: int
    def __init__(
        self,
        capture: bytes,
        count: bytes = b"",
        allowed: bytes | None = None,
        max_length: int = 0x3FFFFFFF,
        capture_limit: int = 1 << 20,
    ) -> None: ...
    @property
    def at_boundary(self) -> bool: ...
    @property
    def offset(self) -> int: ...
    @property
    def pending_type(self) -> int: ...
    @property
    def pending_start(self) -> int: ...
    def reconfigure(self, capture: bytes, count: bytes = b"") -> None: ...
    def feed(self, data: bytes) -> list[Captured] | None: ...

def read_cstring(body: bytes, pos: int = 0) -> tuple[bytes, int]: ...
def parse_parse(body: bytes) -> tuple[bytes, bytes, tuple[int, ...]]: ...
def parse_execute(body: bytes) -> tuple[bytes, int]: ...
def parse_close(body: bytes) -> tuple[bytes, bytes]: ...
def parse_bind(body: bytes) -> tuple[bytes, bytes, tuple[bytes | bytearray | None, ...]]: ...
def identity_hint(data: bytes) -> bool: ...
