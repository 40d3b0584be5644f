"""Type stubs for the Cython framing extension (see _wire.pyx for the why)."""

from typing import Final

from typing_extensions import Buffer

__all__ = (
    "LIT_BIT_STRING",
    "LIT_DOLLAR",
    "LIT_ESCAPE_STRING",
    "LIT_NUMBER",
    "LIT_STRING",
    "LIT_UNICODE_STRING",
    "SUBJECT_VALUES",
    "MessageScanner",
    "ProtocolViolation",
    "identity_hint",
    "literal_text",
    "parse_bind",
    "parse_close",
    "parse_execute",
    "parse_parse",
    "read_cstring",
    "scan_literals",
    "unpack_row_values",
)

class ProtocolViolation(Exception):
    offset: int
    def __init__(self, message: str, offset: int) -> None: ...

Captured = tuple[int, bytes, bool, int, int]
"""(message type, body or its first capture_limit bytes, truncated, counted since
last, offset in the chunk just past the message).  A SUBJECT_VALUES entry is
(SUBJECT_VALUES, packed values, values over the limit were dropped, non-NULL
values seen, offset of the completion it precedes)."""

SUBJECT_VALUES: Final = 0
"""Type of the entry carrying data-subject values, just before its completion."""

SubjectValue = tuple[int, int, int, bytes]
"""(kind index, format code 0 text / 1 binary, type OID, value bytes)"""

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
    def set_row_subjects(self, columns: dict[tuple[int, int], int] | None, limit: int) -> None: ...
    @property
    def queued(self) -> int: ...
    def push_row_description(self, body: bytes | None, bind: bytes | None = None) -> None: ...
    def push_ready_marker(self) -> None: ...
    def feed(self, data: bytes) -> list[Captured] | None: ...

def read_cstring(body: bytes, pos: int = 0) -> tuple[bytes, int]: ...
def parse_parse(body: bytes) -> tuple[bytes, bytes, tuple[int, ...]]: ...
def parse_execute(body: bytes) -> tuple[bytes, int]: ...
def parse_close(body: bytes) -> tuple[bytes, bytes]: ...
def parse_bind(body: bytes) -> tuple[bytes, bytes, tuple[bytes | bytearray | None, ...]]: ...
def identity_hint(data: bytes) -> bool: ...
def unpack_row_values(packed: bytes) -> list[SubjectValue]: ...

LIT_STRING: Final = 1
"""'...' (and N'...'): standard quoting, '' is a quote, backslash is ordinary."""
LIT_ESCAPE_STRING: Final = 2
"""E'...': backslash escapes and '' doubling."""
LIT_DOLLAR: Final = 3
"""$$...$$ and $tag$...$tag$."""
LIT_NUMBER: Final = 4
"""42, 1.5, .5, 1e10, 0x1F, 0o17, 0b101, 1_000."""
LIT_BIT_STRING: Final = 5
"""B'0101' and X'1F'."""
LIT_UNICODE_STRING: Final = 6
"""U&'...', with its UESCAPE '!' clause if it has one."""

LiteralToken = tuple[int, int, int]
"""(start, end, kind): byte offsets, end exclusive, start on any prefix; kind a LIT_* value."""

def scan_literals(sql: Buffer) -> list[LiteralToken]: ...
def literal_text(sql: Buffer, start: int, end: int, kind: int) -> str: ...
