# cython: language_level=3
"""Framing of PostgreSQL protocol messages on the relay path.

The relay forwards every received chunk unchanged; this module only *looks*
at the chunk while it is being forwarded.  A :class:`MessageScanner` walks the
message headers of a byte stream that arrives in arbitrary pieces, validates
them (length cap, legal message types) and hands back the few messages the
audit side needs, while counting the bulky ones (DataRow, CopyData) without
copying them.  The scanner does no I/O and knows nothing about asyncio.

Body parsers for the frontend messages that carry statements (Query, Parse,
Bind, Execute, Close) live here too, because they run once per statement.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int16_t, int32_t, uint32_t
from libc.string cimport memchr, memcpy, memset

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
    """The peer sent bytes that are not a well-formed protocol message.

    ``offset`` is the position in the stream (bytes since the scanner was
    created) where the bad header starts, so the log can say where it was.
    """

    def __init__(self, str message, long long offset):
        super().__init__(message)
        self.offset = offset


# What the scanner does with each message type (index: the type byte).
cdef enum Disposition:
    SKIP = 0      # legal, forwarded, not reported
    CAPTURE = 1   # reported with its body (up to the capture cap)
    COUNT = 2     # legal, counted in the next reported message, body skipped
    ILLEGAL = 3   # not allowed from this peer: ProtocolViolation


cdef inline uint32_t _be32(const unsigned char *p) nogil:
    return ((<uint32_t>p[0]) << 24) | ((<uint32_t>p[1]) << 16) | ((<uint32_t>p[2]) << 8) | p[3]


cdef inline int16_t _be16(const unsigned char *p) nogil:
    return <int16_t>(((<uint32_t>p[0]) << 8) | p[1])


cdef class MessageScanner:
    """Incremental scanner over one direction of a post-startup stream.

    ``capture`` are the type bytes whose bodies are reported, ``count`` the
    types that are only counted, and ``allowed`` (or None for "any type")
    the legal types; anything else raises :class:`ProtocolViolation`.

    :meth:`feed` returns ``None`` when nothing was captured (the common case
    for DataRow streams) or a list of ``(type, body, truncated, counted, end)``
    tuples, where ``counted`` is the number of counted messages seen since the
    previous reported message and ``end`` the offset in this chunk just past
    the message (so a caller can split the chunk there).  Bodies longer than ``capture_limit`` are cut
    to that size and flagged ``truncated``; the message is still forwarded
    whole by the caller.
    """

    cdef:
        unsigned char _disposition[256]
        Py_ssize_t _max_length        # largest body accepted
        Py_ssize_t _capture_limit     # largest body reported
        unsigned char _header[5]      # header bytes of a message split across chunks
        int _header_len
        unsigned char _type           # type of the message whose body is streaming
        Py_ssize_t _remaining         # body bytes of that message still to come
        Py_ssize_t _body_length
        bint _capturing
        bytearray _body               # captured part of a body split across chunks
        Py_ssize_t _counted
        long long _offset             # bytes consumed since creation
        Py_ssize_t _start             # offset in the last chunk where the unfinished message began (-1: earlier)
        readonly long long messages   # whole messages seen since creation

    def __cinit__(self):
        self._header_len = 0
        self._remaining = 0
        self._capturing = False
        self._counted = 0
        self._offset = 0
        self._start = -1
        self.messages = 0
        self._body = None

    def __init__(self, bytes capture, bytes count=b"", allowed=None,
                 Py_ssize_t max_length=0x3FFFFFFF, Py_ssize_t capture_limit=1 << 20):
        cdef int i
        if max_length < 0 or capture_limit < 0:
            raise ValueError("max_length and capture_limit must be >= 0")
        if allowed is None:
            memset(self._disposition, SKIP, 256)
        else:
            memset(self._disposition, ILLEGAL, 256)
            for i in (<bytes>allowed):
                self._disposition[i] = SKIP
        for i in count:
            self._disposition[i] = COUNT
        for i in capture:
            self._disposition[i] = CAPTURE
        self._max_length = max_length
        self._capture_limit = capture_limit

    @property
    def at_boundary(self):
        """True when the stream seen so far ends exactly between messages.

        Only then may the relay inject a message of its own (an error) into
        this direction without corrupting the peer's framing.
        """
        return self._header_len == 0 and self._remaining == 0

    @property
    def offset(self):
        return self._offset

    @property
    def pending_type(self):
        """Type byte of the message the last chunk ended inside, or -1.

        With :attr:`pending_start`, lets a caller hold back an unfinished
        message it may have to rewrite instead of forwarding half of it.
        """
        if self._remaining:
            return self._type
        if self._header_len:
            return self._header[0]
        return -1

    @property
    def pending_start(self):
        """Offset in the last chunk where the unfinished message began; -1
        when it began in an earlier chunk or when there is none."""
        return self._start if self.pending_type != -1 else -1

    def reconfigure(self, bytes capture, bytes count=b""):
        """Change which types are captured or counted (legal types stay)."""
        cdef int i
        for i in range(256):
            if self._disposition[i] != ILLEGAL:
                self._disposition[i] = SKIP
        for i in count:
            if self._disposition[i] != ILLEGAL:
                self._disposition[i] = COUNT
        for i in capture:
            if self._disposition[i] != ILLEGAL:
                self._disposition[i] = CAPTURE

    cdef inline object _start_message(self, const unsigned char *hdr, long long at):
        cdef unsigned char mtype = hdr[0]
        cdef uint32_t length = _be32(hdr + 1)
        cdef Disposition disp = <Disposition>self._disposition[mtype]
        if disp == ILLEGAL:
            raise ProtocolViolation(
                "unknown message type 0x%02x (%r)" % (mtype, chr(mtype)), at)
        if length < 4:
            raise ProtocolViolation(
                "invalid message length %d for type %r (want >= 4)" % (length, chr(mtype)), at)
        if <Py_ssize_t>(length - 4) > self._max_length:
            raise ProtocolViolation(
                "message of type %r is %d bytes, over the limit of %d"
                % (chr(mtype), length - 4, self._max_length), at)
        self._type = mtype
        self._body_length = length - 4
        self._remaining = self._body_length
        self._capturing = disp == CAPTURE
        if disp == COUNT:
            self._counted += 1
        return None

    cdef inline object _emit(self, list out, bytes body, bint truncated, Py_ssize_t end):
        out.append((self._type, body, truncated, self._counted, end))
        self._counted = 0
        return None

    def feed(self, bytes data not None):
        """Scan one chunk; return captured messages or None."""
        cdef const unsigned char *buf = <const unsigned char *>PyBytes_AS_STRING(data)
        cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t take, want, keep
        cdef list out = None
        cdef long long base = self._offset

        self._start = -1
        while pos < size:
            if self._remaining == 0 and self._header_len == 0 and size - pos >= 5:
                # Fast path: a whole header is in this chunk.
                self._start = pos
                self._start_message(buf + pos, base + pos)
                pos += 5
                if self._remaining == 0:
                    self.messages += 1
                    if self._capturing:
                        if out is None:
                            out = []
                        self._emit(out, b"", False, pos)
                    continue
                if self._capturing and size - pos >= self._remaining:
                    # Fast path: the whole body is in this chunk too.
                    keep = self._remaining
                    if keep > self._capture_limit:
                        keep = self._capture_limit
                    if out is None:
                        out = []
                    self._emit(out, PyBytes_FromStringAndSize(<const char *>buf + pos, keep),
                               keep < self._remaining, pos + self._remaining)
                    pos += self._remaining
                    self._remaining = 0
                    self.messages += 1
                    continue
                if self._capturing:
                    self._body = bytearray()
            elif self._remaining == 0:
                # A header split across chunks: collect its 5 bytes.
                if self._header_len == 0:
                    self._start = pos
                take = 5 - self._header_len
                if take > size - pos:
                    take = size - pos
                memcpy(self._header + self._header_len, buf + pos, take)
                self._header_len += take
                pos += take
                if self._header_len < 5:
                    break
                self._header_len = 0
                self._start_message(self._header, base + pos - 5)
                if self._remaining == 0:
                    self.messages += 1
                    if self._capturing:
                        if out is None:
                            out = []
                        self._emit(out, b"", False, pos)
                    continue
                if self._capturing:
                    self._body = bytearray()

            # Streaming body bytes of the current message.
            take = self._remaining
            if take > size - pos:
                take = size - pos
            if self._capturing:
                want = self._capture_limit - len(self._body)
                if want > take:
                    want = take
                if want > 0:
                    self._body += data[pos:pos + want]
            pos += take
            self._remaining -= take
            if self._remaining == 0:
                self.messages += 1
                if self._capturing:
                    if out is None:
                        out = []
                    self._emit(out, bytes(self._body), len(self._body) < self._body_length, pos)
                    self._body = None
        self._offset += size
        return out


# ---------------------------------------------------------------------------
# Frontend message bodies.  Each parser raises ProtocolViolation (offset -1)
# on a body that does not hold what its type promises.

cdef inline Py_ssize_t _cstring_end(const unsigned char *buf, Py_ssize_t pos,
                                    Py_ssize_t size) except -2:
    cdef const void *nul
    if pos >= size:
        raise ProtocolViolation("message body ends inside a string", -1)
    nul = memchr(buf + pos, 0, size - pos)
    if nul == NULL:
        raise ProtocolViolation("string in message body is not NUL-terminated", -1)
    return <const unsigned char *>nul - buf


def read_cstring(bytes body not None, Py_ssize_t pos=0):
    """Return ``(text, next_pos)`` for the NUL-terminated string at ``pos``."""
    cdef const unsigned char *buf = <const unsigned char *>PyBytes_AS_STRING(body)
    cdef Py_ssize_t end = _cstring_end(buf, pos, PyBytes_GET_SIZE(body))
    return PyBytes_FromStringAndSize(<const char *>buf + pos, end - pos), end + 1


def parse_parse(bytes body not None):
    """Parse: ``(statement_name, query, param_type_oids)``.

    The type OIDs (0 = unspecified) let the audit side render binary-format
    parameters as values instead of hex.
    """
    cdef const unsigned char *buf = <const unsigned char *>PyBytes_AS_STRING(body)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(body)
    cdef Py_ssize_t end1 = _cstring_end(buf, 0, size)
    cdef Py_ssize_t end2 = _cstring_end(buf, end1 + 1, size)
    cdef Py_ssize_t pos = end2 + 1
    cdef int ntypes, i
    if size - pos < 2:
        raise ProtocolViolation("Parse message too short", -1)
    ntypes = _be16(buf + pos)
    pos += 2
    if ntypes < 0 or size - pos < 4 * ntypes:
        raise ProtocolViolation("Parse parameter types overrun the body", -1)
    oids = tuple([_be32(buf + pos + 4 * i) for i in range(ntypes)])
    return (PyBytes_FromStringAndSize(<const char *>buf, end1),
            PyBytes_FromStringAndSize(<const char *>buf + end1 + 1, end2 - end1 - 1),
            oids)


def parse_execute(bytes body not None):
    """Execute: ``(portal_name, max_rows)``."""
    cdef const unsigned char *buf = <const unsigned char *>PyBytes_AS_STRING(body)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(body)
    cdef Py_ssize_t end = _cstring_end(buf, 0, size)
    if size - end - 1 < 4:
        raise ProtocolViolation("Execute message too short", -1)
    return (PyBytes_FromStringAndSize(<const char *>buf, end),
            <int32_t>_be32(buf + end + 1))


def parse_close(bytes body not None):
    """Close: ``(kind, name)`` with kind ``b'S'`` (statement) or ``b'P'`` (portal)."""
    cdef const unsigned char *buf = <const unsigned char *>PyBytes_AS_STRING(body)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(body)
    if size < 2:
        raise ProtocolViolation("Close message too short", -1)
    cdef Py_ssize_t end = _cstring_end(buf, 1, size)
    return (PyBytes_FromStringAndSize(<const char *>buf, 1),
            PyBytes_FromStringAndSize(<const char *>buf + 1, end - 1))


def parse_bind(bytes body not None):
    """Bind: ``(portal, statement, params)``.

    ``params`` is a tuple with one entry per parameter: ``None`` for SQL NULL,
    ``bytes`` for a text-format value and ``bytearray`` for a binary-format
    value, so the audit side can render each correctly without a second
    format list.  A body shorter than its counts claim raises.
    """
    cdef const unsigned char *buf = <const unsigned char *>PyBytes_AS_STRING(body)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(body)
    cdef Py_ssize_t end1 = _cstring_end(buf, 0, size)
    cdef Py_ssize_t end2 = _cstring_end(buf, end1 + 1, size)
    cdef Py_ssize_t pos = end2 + 1
    cdef int nformats, nparams, i, fmt
    cdef int32_t plen
    cdef Py_ssize_t fmt_pos
    if size - pos < 2:
        raise ProtocolViolation("Bind message too short", -1)
    nformats = _be16(buf + pos)
    pos += 2
    if nformats < 0 or size - pos < 2 * nformats + 2:
        raise ProtocolViolation("Bind message format codes overrun the body", -1)
    fmt_pos = pos
    pos += 2 * nformats
    nparams = _be16(buf + pos)
    pos += 2
    if nparams < 0 or (nformats > 1 and nformats != nparams):
        raise ProtocolViolation(
            "Bind has %d format codes for %d parameters" % (nformats, nparams), -1)
    params = [None] * nparams
    for i in range(nparams):
        if size - pos < 4:
            raise ProtocolViolation("Bind parameter %d overruns the body" % (i + 1), -1)
        plen = <int32_t>_be32(buf + pos)
        pos += 4
        if plen == -1:
            params[i] = None
            continue
        if plen < 0 or size - pos < plen:
            raise ProtocolViolation("Bind parameter %d overruns the body" % (i + 1), -1)
        if nformats == 0:
            fmt = 0
        elif nformats == 1:
            fmt = _be16(buf + fmt_pos)
        else:
            fmt = _be16(buf + fmt_pos + 2 * i)
        value = PyBytes_FromStringAndSize(<const char *>buf + pos, plen)
        params[i] = value if fmt == 0 else bytearray(value)
        pos += plen
    return (PyBytes_FromStringAndSize(<const char *>buf, end1),
            PyBytes_FromStringAndSize(<const char *>buf + end1 + 1, end2 - end1 - 1),
            tuple(params))


# ---------------------------------------------------------------------------
# Per-statement pre-filter for the identity parsers.

cdef inline unsigned char _lower(unsigned char c) noexcept nogil:
    return c + 32 if 65 <= c <= 90 else c


cdef inline bint _word_at(const unsigned char *p, Py_ssize_t left, const char *word,
                          Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    if left < n:
        return False
    for i in range(n):
        if _lower(p[i]) != <unsigned char>word[i]:
            return False
    return True


def identity_hint(bytes data not None):
    """Whether a statement may carry or change an identity.

    True when ``scalple.``, ``set_config``, ``reset`` or ``discard`` occurs
    in it, case-insensitively (PostgreSQL folds unquoted names).  Every
    statement passes through this on the event loop; only the rare ones that
    match are handed to the identity parsers.  One pass, no allocation.
    """
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t i
    cdef unsigned char c
    for i in range(n):
        c = _lower(p[i])
        if c == 115:  # s
            if _word_at(p + i, n - i, b"scalple.", 8) or _word_at(p + i, n - i, b"set_config", 10):
                return True
        elif c == 114:  # r
            if _word_at(p + i, n - i, b"reset", 5):
                return True
        elif c == 100:  # d
            if _word_at(p + i, n - i, b"discard", 7):
                return True
    return False
