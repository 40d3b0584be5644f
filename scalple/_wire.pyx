# cython: language_level=3
"""Framing of PostgreSQL protocol messages on the relay path.

The relay forwards every received chunk unchanged; this module only *looks*
at the chunk while it is being forwarded.  A :class:`MessageScanner` walks the
message headers of a byte stream that arrives in arbitrary pieces, validates
them (length cap, legal message types) and hands back the few messages the
audit side needs, while counting the bulky ones (DataRow, CopyData) without
copying them.  The scanner does no I/O and knows nothing about asyncio.

On the backend side the scanner can also read the values of data-subject
columns (a customer id, say) out of every DataRow while the row is being
forwarded, so the audit record can say *whose* data a statement returned.
That reading happens here, on the relay path, because it must cost nothing
per byte: only the few listed values are copied, nothing else of a row is.

Body parsers for the frontend messages that carry statements (Query, Parse,
Bind, Execute, Close) live here too, because they run once per statement.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from libc.stdint cimport int16_t, int32_t, uint32_t
from libc.string cimport memchr, memcpy, memset

from collections import deque as _deque
from operator import index as _index

__all__ = (
    "SUBJECT_VALUES",
    "MessageScanner",
    "ProtocolViolation",
    "identity_hint",
    "parse_bind",
    "parse_close",
    "parse_execute",
    "parse_parse",
    "read_cstring",
    "unpack_row_values",
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


cdef inline uint32_t _le32(const unsigned char *p) noexcept nogil:
    return ((<uint32_t>p[3]) << 24) | ((<uint32_t>p[2]) << 16) | ((<uint32_t>p[1]) << 8) | p[0]


cdef inline void _put_le32(unsigned char *p, uint32_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = v >> 24


# ---------------------------------------------------------------------------
# Data-subject values: what the scanner reads out of result rows.

SUBJECT_VALUES = 0
"""Type of the synthetic entry :meth:`MessageScanner.feed` reports the values in
(0 is no protocol message type, so it cannot be mistaken for one)."""

cdef enum:
    # Size of one packed value's head: u8 kind, u8 format, u32 type OID, u32 length.
    VALUE_HEAD = 10
    # A RowDescription larger than this is not read (its result is not
    # watched).  PostgreSQL's own is at most 1664 fields of a 63-byte name
    # and 18 bytes, about 136 KB: only a broken or hostile server goes past
    # it, and the scanner must not buffer whatever length it is told.
    ROWDESC_LIMIT = 1 << 20
    # Side buffers that grew past this are freed when emptied, not kept.
    KEEP_CAPACITY = 1 << 16
    # Result shapes queued by push_row_description / push_ready_marker: past
    # this many the queue is dropped and only counted (see there), so a
    # client that pipelines without end cannot make it grow.
    SHAPES_LIMIT = 4096


cdef object _READY = object()
"""The queue entry of push_ready_marker (a Bind's is its description, bytes
or None, or the tuple of its description and its body)."""


cdef struct ByteBuffer:
    # A growable C buffer: the scanner's side data never becomes a Python
    # object until it is reported, so the hot path allocates nothing.
    unsigned char *data
    Py_ssize_t size
    Py_ssize_t cap


cdef int _buffer_grow(ByteBuffer *b, Py_ssize_t extra) except -1:
    cdef Py_ssize_t want = b.size + extra
    cdef Py_ssize_t cap = b.cap * 2 if b.cap else 256
    cdef unsigned char *grown
    if cap < want:
        cap = want
    grown = <unsigned char *>PyMem_Realloc(b.data, cap)
    if grown == NULL:
        raise MemoryError()
    b.data = grown
    b.cap = cap
    return 0


cdef inline int _buffer_append(ByteBuffer *b, const unsigned char *p, Py_ssize_t n) except -1:
    if n > b.cap - b.size:
        _buffer_grow(b, n)
    memcpy(b.data + b.size, p, n)
    b.size += n
    return 0


cdef inline void _buffer_clear(ByteBuffer *b) noexcept:
    """Empty ``b``; give its memory back when one large value made it grow."""
    b.size = 0
    if b.cap > KEEP_CAPACITY:
        PyMem_Free(b.data)
        b.data = NULL
        b.cap = 0


cdef struct SubjectField:
    # One subject column of the current result, as its RowDescription gave it.
    int32_t field         # position in the row
    uint32_t type_oid
    unsigned char kind    # the caller's subject-kind index
    unsigned char format  # 0 text, 1 binary


cdef Py_ssize_t _bind_result_codes(const unsigned char *p, Py_ssize_t n,
                                   int *count) noexcept nogil:
    """Offset of the result-column format codes in the Bind body ``p[:n]``,
    their number in ``count``; -1 if the body is cut short or malformed."""
    cdef const void *nul
    cdef Py_ssize_t i = 0
    cdef int k, nparams
    cdef int32_t length
    for k in range(2):   # portal and statement names
        if i >= n:
            return -1
        nul = memchr(p + i, 0, n - i)
        if nul == NULL:
            return -1
        i = <const unsigned char *>nul - p + 1
    if n - i < 2 or _be16(p + i) < 0 or n - i - 2 < 2 * _be16(p + i):
        return -1
    i += 2 + 2 * _be16(p + i)   # parameter format codes
    if n - i < 2 or _be16(p + i) < 0:
        return -1
    nparams = _be16(p + i)
    i += 2
    for k in range(nparams):
        if n - i < 4:
            return -1
        length = <int32_t>_be32(p + i)
        i += 4
        if length < -1 or n - i < length:
            return -1
        if length > 0:
            i += length
    if n - i < 2 or _be16(p + i) < 0 or n - i - 2 != 2 * _be16(p + i):
        return -1
    count[0] = _be16(p + i)
    return i + 2


# What the side reader does with the message whose body is still streaming.
cdef enum SideMode:
    SIDE_NONE = 0
    SIDE_ROWDESC = 1     # a RowDescription split across chunks: its body is buffered
    SIDE_DATAROW = 2     # a DataRow of a watched result: parsed as its bytes pass
    SIDE_COMPLETION = 3  # CommandComplete & co.: the values are reported at its end


# Where the DataRow parser is inside a row; it resumes there with the next piece.
cdef enum RowState:
    R_COUNT = 0    # reading the Int16 column count
    R_LENGTH = 1   # reading the Int32 length of column _row_col
    R_VALUE = 2    # inside that column's value, _row_need bytes to go
    R_DONE = 3     # every subject column of the row is read: the rest is skipped
    R_BAD = 4      # the row does not hold what its RowDescription promised


cdef inline bint _has_table(const uint32_t *tables, Py_ssize_t n, uint32_t oid) noexcept nogil:
    """Binary search of the sorted table OIDs: most columns of most results
    belong to no subject table and are ruled out without a Python object."""
    cdef Py_ssize_t lo = 0
    cdef Py_ssize_t hi = n
    cdef Py_ssize_t mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if tables[mid] < oid:
            lo = mid + 1
        elif tables[mid] > oid:
            hi = mid
        else:
            return True
    return False


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

    With :meth:`set_row_subjects` the scanner also reads data-subject values
    out of result rows; they are reported as one extra ``SUBJECT_VALUES``
    entry just before the completion that ends them (see there).
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

        # Data-subject values (set_row_subjects).  _side_on is the one test
        # every message pays; it is False unless something is configured or
        # still pending.
        bint _side_on
        SideMode _side_mode           # what the streaming message's bytes are for
        dict _columns                 # (table OID, attnum) -> kind, for the next RowDescription
        uint32_t *_tables             # the table OIDs of _columns, sorted
        Py_ssize_t _ntables
        Py_ssize_t _next_limit        # limit for the next RowDescription
        Py_ssize_t _limit             # values kept per statement, current result
        SubjectField *_fields         # subject columns of the current result, in row order
        Py_ssize_t _nfields_cap
        Py_ssize_t _npos              # how many (0: the current result is not watched)
        int _row_width                # column count its RowDescription announced
        ByteBuffer _pending           # packed values kept since the last completion
        Py_ssize_t _kept
        Py_ssize_t _seen              # non-NULL subject values seen, kept or not
        ByteBuffer _rowdesc           # a RowDescription split across chunks
        # The DataRow being parsed, which may arrive in pieces.
        RowState _row_state
        int _row_col                  # column whose length or value is being read
        Py_ssize_t _row_next          # index in _fields of the next subject column
        Py_ssize_t _row_need          # value bytes still to come
        bint _row_keep                # whether those bytes are kept
        unsigned char _row_int[4]     # an integer split across pieces
        int _row_have
        Py_ssize_t _row_mark          # _pending.size, _kept and _seen before the row,
        Py_ssize_t _row_kept          # to take a malformed row's values back
        Py_ssize_t _row_seen
        # The shapes of results to come (push_row_description), for the
        # results that start at a BindComplete with no RowDescription.
        # None while extraction is off.
        object _shapes                # deque: per Bind bytes / None / (bytes, bind); _READY
        Py_ssize_t _shape_markers     # _READY entries in _shapes
        # Entries dropped when _shapes overflowed, only counted: _gap_markers
        # ready markers, then _gap_binds Binds after the last of them.  They
        # come before everything in _shapes; while _gap_blind, pushes are
        # counted here too instead of being queued.
        Py_ssize_t _gap_markers
        Py_ssize_t _gap_binds
        bint _gap_blind

    def __cinit__(self):
        self._header_len = 0
        self._remaining = 0
        self._capturing = False
        self._counted = 0
        self._offset = 0
        self._start = -1
        self.messages = 0
        self._body = None
        self._side_on = False
        self._side_mode = SIDE_NONE
        self._columns = None
        self._tables = NULL
        self._ntables = 0
        self._next_limit = 0
        self._limit = 0
        self._fields = NULL
        self._nfields_cap = 0
        self._npos = 0
        self._row_width = 0
        self._pending.data = NULL
        self._pending.size = 0
        self._pending.cap = 0
        self._rowdesc.data = NULL
        self._rowdesc.size = 0
        self._rowdesc.cap = 0
        self._kept = 0
        self._seen = 0
        self._shapes = None
        self._shape_markers = 0
        self._gap_markers = 0
        self._gap_binds = 0
        self._gap_blind = False

    def __dealloc__(self):
        PyMem_Free(self._tables)
        PyMem_Free(self._fields)
        PyMem_Free(self._pending.data)
        PyMem_Free(self._rowdesc.data)

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

    def set_row_subjects(self, columns, Py_ssize_t limit):
        """Read data-subject values out of result rows, or stop (``columns=None``).

        ``columns`` maps ``(table OID, attnum)`` (what RowDescription says of
        a column that comes straight from a table) to a subject-kind index
        0..255 chosen by the caller; ``limit`` (>= 0) bounds the values kept
        per statement, so a million-row result costs a bounded amount of
        memory.  Values over the limit are still counted.

        The setting is read at each RowDescription, so calling this at any
        time is safe: the result being read keeps the columns it was
        described with until it ends.  Raises TypeError or ValueError (and
        changes nothing) on a malformed mapping.

        At each CommandComplete, PortalSuspended, ErrorResponse or
        EmptyQueryResponse after which values were seen, :meth:`feed` puts
        ``(SUBJECT_VALUES, packed, truncated, seen, end)`` just before that
        completion's own entry, with the completion's ``end``: ``packed``
        holds each kept value as ``u8 kind | u8 format | u32 type OID (LE) |
        u32 length (LE) | value`` (see :func:`unpack_row_values`), ``seen``
        counts every non-NULL subject value and ``truncated`` says some were
        not kept.  A RowDescription or DataRow that is not what it should be
        stops the reading for the rest of that result (the row's own values
        are given back); it never raises, the relay forwards it regardless.
        Columns stay known across PortalSuspended, and are forgotten at the
        other completions, at BindComplete and at ReadyForQuery.

        A result that starts at a BindComplete is described by what
        :meth:`push_row_description` queued for its Bind; turning extraction
        off empties that queue and turning it on starts with an empty one.
        Turn it on when no request is in flight, as at the first
        ReadyForQuery: the Binds and Syncs a client pipelined before are not
        queued, so their answers would take the entries of later ones.
        """
        cdef dict clean
        cdef list tables
        cdef uint32_t *sorted_tables = NULL
        cdef Py_ssize_t i
        if limit < 0:
            raise ValueError("limit must be >= 0")
        if columns is None or not columns:
            clean = None
            tables = []
        else:
            clean = {}
            for key, kind in columns.items():
                if not isinstance(key, tuple) or len(key) != 2:
                    raise TypeError("subject column %r is not (table OID, attnum)" % (key,))
                table = _index(key[0])
                attnum = _index(key[1])
                kind = _index(kind)
                if not (0 < table <= 0xFFFFFFFF and -0x8000 <= attnum <= 0x7FFF):
                    raise ValueError("subject column %r is out of range" % (key,))
                if not 0 <= kind <= 255:
                    raise ValueError("subject kind %r of %r is not in 0..255" % (kind, key))
                clean[(table, attnum)] = kind
            tables = sorted({t for t, _a in clean})
            sorted_tables = <uint32_t *>PyMem_Realloc(NULL, len(tables) * sizeof(uint32_t))
            if sorted_tables == NULL:
                raise MemoryError()
            for i in range(len(tables)):
                sorted_tables[i] = tables[i]
        PyMem_Free(self._tables)
        self._tables = sorted_tables
        self._ntables = len(tables)
        self._columns = clean
        self._next_limit = limit
        if clean is None:
            self._shapes = None
            self._shape_markers = 0
            self._gap_markers = 0
            self._gap_binds = 0
            self._gap_blind = False
        elif self._shapes is None:
            self._shapes = _deque()
        self._update_side()

    @property
    def queued(self):
        """Entries :meth:`push_row_description` and :meth:`push_ready_marker`
        queued that the server has not answered yet (always 0 while
        extraction is off, or while an overflow is being waited out)."""
        return len(self._shapes) if self._shapes is not None else 0

    def push_row_description(self, bytes body, bytes bind=None):
        """The client just sent a Bind: queue the shape of the result it opens.

        ``body`` is the RowDescription body (no type byte, no length) of the
        bound statement, as its Describe answered, or None when unknown or
        when the statement returns no rows.  ``bind`` is that Bind's body:
        the result-column format codes at its end give each column's format,
        which a statement's description does not know (it always says text).
        Without ``bind`` the body's own format codes are used.

        At the BindComplete that answers this Bind, the entry is taken off
        the queue and read exactly as a RowDescription would be, with the
        subject columns configured then; None leaves the result unwatched.
        A RowDescription that arrives afterwards in the same result (after a
        Describe of the portal) replaces it.  A ``bind`` that is cut short,
        malformed or whose format codes do not fit the columns leaves the
        result unwatched.  A BindComplete that finds no Bind entry at the
        front (a ready marker, or nothing) takes nothing off and leaves its
        result unwatched until a RowDescription.

        Costs one test and queues nothing while extraction is off.  See
        :meth:`push_ready_marker` for how the queue stays aligned and bounded.
        """
        if self._columns is None:
            return
        if self._gap_blind or not self._shapes_room():
            self._gap_binds += 1
        elif bind is None or body is None:
            self._shapes.append(body)
        else:
            self._shapes.append((body, bind))

    def push_ready_marker(self):
        """The client just sent a message answered by one ReadyForQuery: a
        Sync, a simple Query or a FunctionCall.

        It is queued in order with the Bind entries.  At each ReadyForQuery
        the entries up to and including the first marker are taken off: the
        Binds the server skipped after an error, up to the Sync, go with it
        (everything goes when no marker is queued).

        At most 4096 entries are queued.  The push that would make it 4097
        empties the queue instead: what it held, and what is pushed from
        then on, is only counted (its markers, and the Binds after the last
        of them), until as many ReadyForQuery as counted markers have come.
        Meanwhile every BindComplete leaves its result unwatched; the queue
        is then aligned again, whatever the client pipelined, and a client
        that pipelines without end only ever costs two counters.

        Costs one test and queues nothing while extraction is off.
        """
        if self._columns is None:
            return
        if self._gap_blind or not self._shapes_room():
            self._gap_markers += 1
            self._gap_binds = 0
        else:
            self._shapes.append(_READY)
            self._shape_markers += 1

    cdef bint _shapes_room(self) except -1:
        """Whether one more entry may be queued; if not, the queue becomes counts."""
        cdef object shapes = self._shapes
        cdef Py_ssize_t trailing = 0
        if len(shapes) < SHAPES_LIMIT:
            return True
        if self._shape_markers:
            for entry in reversed(shapes):
                if entry is _READY:
                    break
                trailing += 1
            self._gap_binds = trailing   # earlier gap Binds go with the first marker
        else:
            self._gap_binds += len(shapes)
        self._gap_markers += self._shape_markers
        shapes.clear()
        self._shape_markers = 0
        self._gap_blind = True
        return False

    cdef int _shape_bound(self) except -1:
        """A BindComplete: a new portal's result starts, described by the
        front entry of the queue if that is a Bind's."""
        cdef object shapes = self._shapes
        cdef object entry
        cdef object body
        cdef bytes bind
        cdef const unsigned char *codes = NULL
        cdef int ncodes = -1
        cdef Py_ssize_t at
        self._npos = 0
        if shapes is None:
            return 0
        if self._gap_markers or self._gap_binds:
            if not self._gap_markers:
                self._gap_binds -= 1
            return 0
        if not shapes or shapes[0] is _READY:
            return 0   # misaligned: nothing is taken off
        entry = shapes.popleft()
        if type(entry) is tuple:
            body = (<tuple>entry)[0]
            bind = (<tuple>entry)[1]
            at = _bind_result_codes(<const unsigned char *>PyBytes_AS_STRING(bind),
                                    PyBytes_GET_SIZE(bind), &ncodes)
            if at < 0:
                return 0
            codes = <const unsigned char *>PyBytes_AS_STRING(bind) + at
        else:
            body = entry
        if body is None or PyBytes_GET_SIZE(body) > ROWDESC_LIMIT:
            return 0
        self._limit = self._next_limit
        self._read_rowdesc(<const unsigned char *>PyBytes_AS_STRING(body),
                           PyBytes_GET_SIZE(body), codes, ncodes)
        return 0

    cdef int _shape_ready(self) except -1:
        """A ReadyForQuery: take off what it answered."""
        cdef object shapes = self._shapes
        if shapes is None:
            return 0
        if self._gap_markers:
            self._gap_markers -= 1
        else:
            self._gap_binds = 0
            if self._shape_markers:
                while shapes.popleft() is not _READY:
                    pass
                self._shape_markers -= 1
            else:
                shapes.clear()
        if not self._gap_markers:
            self._gap_blind = False
        return 0

    cdef inline void _update_side(self) noexcept:
        self._side_on = self._columns is not None or self._npos > 0 or self._seen > 0

    cdef list _side_begin(self, list out, const unsigned char *p, Py_ssize_t avail,
                          Py_ssize_t pos):
        """Look at the message whose header was just read (``_type``).

        ``p`` holds ``avail`` bytes of its body, starting at ``pos`` in the
        chunk.  A body that is all there is handled at once, straight from
        the chunk; otherwise ``_side_mode`` says what to do with the pieces.
        Returns ``out``, created if a values entry had to be added.
        """
        cdef unsigned char mtype = self._type
        cdef Py_ssize_t n = self._body_length
        cdef bint whole = n <= avail
        self._side_mode = SIDE_NONE
        if mtype == 68:   # DataRow
            if self._npos == 0:
                return out     # a result without subject columns: rows are not read
            self._row_begin()
            if whole:
                self._row_feed(p, n)
                self._row_end()
            else:
                self._side_mode = SIDE_DATAROW
        elif mtype == 84:   # RowDescription: a new result replaces the columns
            self._npos = 0
            if self._columns is not None and n <= ROWDESC_LIMIT:
                self._limit = self._next_limit
                if whole:
                    self._read_rowdesc(p, n, NULL, -1)
                else:
                    self._rowdesc.size = 0
                    self._side_mode = SIDE_ROWDESC
        elif mtype == 67 or mtype == 69 or mtype == 73 or mtype == 115:   # C E I s
            if whole:
                out = self._complete(out, pos + n)
            else:
                self._side_mode = SIDE_COMPLETION
        elif mtype == 50:   # BindComplete: a new portal, with the shape queued for it
            self._shape_bound()
        elif mtype == 90:   # ReadyForQuery
            # Every statement has ended; values no completion claimed (only a
            # broken server leaves any) would go to the wrong one: dropped.
            self._npos = 0
            self._drop_values()
            self._shape_ready()
        self._update_side()
        return out

    cdef int _side_bytes(self, const unsigned char *p, Py_ssize_t n) except -1:
        """The next ``n`` body bytes of a message split across chunks."""
        if self._side_mode == SIDE_DATAROW:
            self._row_feed(p, n)
        elif self._side_mode == SIDE_ROWDESC:
            _buffer_append(&self._rowdesc, p, n)
        return 0

    cdef list _side_end(self, list out, Py_ssize_t end):
        """The split message has ended at ``end`` in this chunk."""
        cdef SideMode mode = self._side_mode
        self._side_mode = SIDE_NONE
        if mode == SIDE_DATAROW:
            self._row_end()
        elif mode == SIDE_ROWDESC:
            self._read_rowdesc(self._rowdesc.data, self._rowdesc.size, NULL, -1)
            _buffer_clear(&self._rowdesc)
        elif mode == SIDE_COMPLETION:
            out = self._complete(out, end)
        self._update_side()
        return out

    cdef list _complete(self, list out, Py_ssize_t end):
        """A statement (or a batch of a suspended portal) ended at ``end``:
        report the values seen since the last completion, if any."""
        if self._seen:
            if out is None:
                out = []
            out.append((SUBJECT_VALUES,
                        PyBytes_FromStringAndSize(<const char *>self._pending.data,
                                                  self._pending.size),
                        self._seen > self._kept, self._seen, end))
            self._drop_values()
        if self._type != 115:
            # PortalSuspended keeps the columns: the portal's next Execute
            # sends more rows without a new RowDescription.
            self._npos = 0
        return out

    cdef inline void _drop_values(self) noexcept:
        _buffer_clear(&self._pending)
        self._kept = 0
        self._seen = 0

    cdef int _read_rowdesc(self, const unsigned char *p, Py_ssize_t n,
                           const unsigned char *codes, int ncodes) except -1:
        """Find the subject columns of the result that RowDescription ``p[:n]``
        describes.  Anything malformed leaves the result unwatched: the
        relay forwards it regardless, and a guess could misattribute data.

        With ``ncodes`` >= 0 the format of the columns comes from the
        ``ncodes`` Int16 format codes at ``codes`` (a Bind's result formats:
        none for all text, one for all columns, or one per column) instead
        of the description's."""
        cdef Py_ssize_t i = 2
        cdef Py_ssize_t npos = 0
        cdef int nfields, f
        cdef uint32_t table
        cdef int16_t fmt
        cdef const void *nul
        cdef SubjectField *grown
        cdef SubjectField *sf
        cdef dict columns = self._columns
        self._npos = 0
        if n < 2 or columns is None:
            return 0
        nfields = _be16(p)
        if nfields < 0 or (ncodes > 1 and ncodes != nfields):
            return 0
        for f in range(nfields):
            if i >= n:
                return 0
            nul = memchr(p + i, 0, n - i)   # the field name
            if nul == NULL:
                return 0
            i = <const unsigned char *>nul - p + 1
            if n - i < 18:
                return 0
            table = _be32(p + i)
            if table != 0 and _has_table(self._tables, self._ntables, table):
                kind = columns.get((table, _be16(p + i + 4)))
                if kind is not None:
                    if ncodes < 0:
                        fmt = _be16(p + i + 16)
                    elif ncodes == 0:
                        fmt = 0
                    else:
                        fmt = _be16(codes + (2 * f if ncodes > 1 else 0))
                    if fmt != 0 and fmt != 1:
                        return 0
                    if npos == self._nfields_cap:
                        grown = <SubjectField *>PyMem_Realloc(
                            self._fields, (npos * 2 + 8) * sizeof(SubjectField))
                        if grown == NULL:
                            raise MemoryError()
                        self._fields = grown
                        self._nfields_cap = npos * 2 + 8
                    sf = &self._fields[npos]
                    sf.field = f
                    sf.type_oid = _be32(p + i + 6)
                    sf.kind = <unsigned char>kind
                    sf.format = <unsigned char>fmt
                    npos += 1
            i += 18
        if i != n:
            return 0
        self._row_width = nfields
        self._npos = npos
        return 0

    cdef inline void _row_begin(self) noexcept:
        self._row_state = R_COUNT
        self._row_col = 0
        self._row_next = 0
        self._row_have = 0
        self._row_mark = self._pending.size
        self._row_kept = self._kept
        self._row_seen = self._seen

    cdef int _row_feed(self, const unsigned char *p, Py_ssize_t n) except -1:
        """Parse the next ``n`` bytes of the DataRow's body.

        Resumable at any byte, so a row split across chunks is never
        buffered: only the kept values are copied, and an Int16/Int32 split
        between two pieces (at most 4 bytes).  Nothing is read past ``n``;
        a value that claims more bytes than the row has is caught at the
        row's end.  Once the last subject column is read the rest of the
        row is skipped without looking at it.
        """
        cdef Py_ssize_t i = 0
        cdef Py_ssize_t take
        cdef Py_ssize_t want
        cdef const unsigned char *q
        while i < n:
            if self._row_state == R_VALUE:
                take = n - i
                if take > self._row_need:
                    take = self._row_need
                if self._row_keep:
                    _buffer_append(&self._pending, p + i, take)
                i += take
                self._row_need -= take
                if self._row_need == 0:
                    self._row_column_done()
                continue
            if self._row_state >= R_DONE:
                return 0
            want = 2 if self._row_state == R_COUNT else 4
            if self._row_have == 0 and n - i >= want:
                q = p + i
                i += want
            else:
                take = want - self._row_have
                if take > n - i:
                    take = n - i
                memcpy(self._row_int + self._row_have, p + i, take)
                self._row_have += take
                i += take
                if self._row_have < want:
                    return 0
                self._row_have = 0
                q = self._row_int
            if self._row_state == R_COUNT:
                self._row_state = R_LENGTH if _be16(q) == self._row_width else R_BAD
            else:
                self._row_length(<int32_t>_be32(q))
        return 0

    cdef int _row_length(self, int32_t length) except -1:
        """The length of column ``_row_col`` was read (-1: NULL)."""
        cdef SubjectField *sf = &self._fields[self._row_next]
        cdef unsigned char head[VALUE_HEAD]
        if length < -1:
            self._row_state = R_BAD
            return 0
        if self._row_col != sf.field:   # not a subject column: skip its value
            if length <= 0:
                self._row_col += 1
            else:
                self._row_keep = False
                self._row_need = length
                self._row_state = R_VALUE
            return 0
        if length == -1:                # a NULL is no subject
            self._row_column_done()
            return 0
        self._seen += 1
        self._row_keep = self._kept < self._limit
        if self._row_keep:
            self._kept += 1
            head[0] = sf.kind
            head[1] = sf.format
            _put_le32(head + 2, sf.type_oid)
            _put_le32(head + 6, <uint32_t>length)
            _buffer_append(&self._pending, head, VALUE_HEAD)
        self._row_need = length
        if length == 0:
            self._row_column_done()
        else:
            self._row_state = R_VALUE
        return 0

    cdef inline void _row_column_done(self) noexcept:
        if self._row_col == self._fields[self._row_next].field:
            self._row_next += 1
            if self._row_next == self._npos:
                self._row_state = R_DONE
                return
        self._row_col += 1
        self._row_state = R_LENGTH

    cdef inline void _row_end(self) noexcept:
        """The DataRow's body has ended.  A row that ended before its last
        subject column, or did not match its RowDescription, gives back what
        was taken from it and leaves the rest of the result unwatched."""
        if self._row_state != R_DONE:
            self._pending.size = self._row_mark
            self._kept = self._row_kept
            self._seen = self._row_seen
            self._npos = 0

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
                if self._side_on:
                    out = self._side_begin(out, buf + pos, size - pos, pos)
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
                if self._side_on:
                    out = self._side_begin(out, buf + pos, size - pos, pos)
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
            if self._side_mode != SIDE_NONE:
                self._side_bytes(buf + pos, take)
            pos += take
            self._remaining -= take
            if self._remaining == 0:
                self.messages += 1
                if self._side_mode != SIDE_NONE:
                    out = self._side_end(out, pos)
                if self._capturing:
                    if out is None:
                        out = []
                    self._emit(out, bytes(self._body), len(self._body) < self._body_length, pos)
                    self._body = None
        self._offset += size
        return out


def unpack_row_values(bytes packed not None):
    """The values of a ``SUBJECT_VALUES`` entry, as ``[(kind, format, type_oid, value)]``.

    ``kind`` is the index given to :meth:`MessageScanner.set_row_subjects`,
    ``format`` 0 (text) or 1 (binary) and ``type_oid`` the column's type,
    which together say how to read ``value``.  Runs on the audit side, not
    the relay.  A cut-short input gives the whole values before the cut.
    """
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(packed)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(packed)
    cdef Py_ssize_t i = 0
    cdef uint32_t length
    cdef list out = []
    while n - i >= VALUE_HEAD:
        length = _le32(p + i + 6)
        if <size_t>length > <size_t>(n - i - VALUE_HEAD):
            break
        out.append((p[i], p[i + 1], _le32(p + i + 2),
                    PyBytes_FromStringAndSize(<const char *>p + i + VALUE_HEAD, length)))
        i += VALUE_HEAD + length
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


# ---------------------------------------------------------------------------
# Literal lexer for PII masking.
#
# The audit log must never hold a value from the audited database, so every
# literal in a statement's text is located and replaced before the text is
# stored.  Locating literals needs PostgreSQL's lexical rules (quotes inside
# comments, dollar quotes, E-string escapes...), and it runs once per
# statement on the audit path, so it is one pass over the bytes here rather
# than a Python re-parse.  The rules follow PostgreSQL 16+'s scanner with
# standard_conforming_strings on.  Where the server would reject the text
# (trailing junk after a number, an unterminated string), the lexer still
# answers, erring towards reporting too much: a wrong guess can only mask an
# identifier, never leave a value in clear.

from libc.string cimport memcmp

__all__ = __all__ + (
    "LIT_BIT_STRING",
    "LIT_DOLLAR",
    "LIT_ESCAPE_STRING",
    "LIT_NUMBER",
    "LIT_STRING",
    "LIT_UNICODE_STRING",
    "literal_text",
    "scan_literals",
)

cdef enum LiteralKind:
    K_STRING = 1
    K_ESCAPE_STRING = 2
    K_DOLLAR = 3
    K_NUMBER = 4
    K_BIT_STRING = 5
    K_UNICODE_STRING = 6

LIT_STRING = K_STRING
LIT_ESCAPE_STRING = K_ESCAPE_STRING
LIT_DOLLAR = K_DOLLAR
LIT_NUMBER = K_NUMBER
LIT_BIT_STRING = K_BIT_STRING
LIT_UNICODE_STRING = K_UNICODE_STRING

# How the body of a quoted literal ends: what a quote and a backslash mean.
cdef enum QuoteMode:
    Q_STANDARD = 0   # '' is a quote, backslash is an ordinary byte
    Q_ESCAPE = 1     # '' is a quote, backslash escapes the next byte
    Q_BIT = 2        # the first quote ends the body (B'' / X'' have no doubling)

# Character classes (bit flags, index: the byte).  Bytes >= 0x80 count as
# letters, as in PostgreSQL, so a multibyte UTF-8 name is one identifier.
cdef enum CharClass:
    C_IDENT_START = 1    # [A-Za-z_\x80-\xff]
    C_IDENT_CONT = 2     # start chars, digits and '$'
    C_DIGIT = 4
    C_HEX = 8
    C_SPACE = 16         # [ \t\n\r\f\v]
    C_DOLQ_CONT = 32     # what a dollar-quote tag may continue with (no '$')

cdef unsigned char _CLASS[256]


cdef void _init_classes() noexcept:
    cdef int c
    memset(_CLASS, 0, 256)
    for c in range(256):
        if (65 <= c <= 90) or (97 <= c <= 122) or c == 95 or c >= 128:
            _CLASS[c] |= C_IDENT_START | C_IDENT_CONT | C_DOLQ_CONT
        if 48 <= c <= 57:
            _CLASS[c] |= C_DIGIT | C_HEX | C_IDENT_CONT | C_DOLQ_CONT
        if (65 <= c <= 70) or (97 <= c <= 102):
            _CLASS[c] |= C_HEX
        if c == 32 or (9 <= c <= 13):
            _CLASS[c] |= C_SPACE
    _CLASS[36] |= C_IDENT_CONT   # '$' continues an identifier: foo$bar


_init_classes()


cdef inline bint _is(unsigned char c, int cls) noexcept nogil:
    return (_CLASS[c] & cls) != 0


cdef inline bint _is_newline(unsigned char c) noexcept nogil:
    return c == 10 or c == 13


cdef inline Py_ssize_t _quoted_body_end(const unsigned char *p, Py_ssize_t i, Py_ssize_t n,
                                        QuoteMode mode) noexcept nogil:
    """Index just past the quote closing the body that starts at ``i``, or ``n``."""
    cdef const void *hit
    cdef unsigned char c
    if mode == Q_ESCAPE:
        while i < n:
            c = p[i]
            if c == 92:   # backslash: the next byte is escaped, whatever it is
                i += 2
            elif c == 39:
                if i + 1 < n and p[i + 1] == 39:
                    i += 2
                else:
                    return i + 1
            else:
                i += 1
        return n
    while i < n:
        hit = memchr(p + i, 39, n - i)
        if hit == NULL:
            return n
        i = <const unsigned char *>hit - p + 1
        if mode == Q_STANDARD and i < n and p[i] == 39:
            i += 1       # '' stands for one quote
        else:
            return i
    return n


cdef inline Py_ssize_t _continuation(const unsigned char *p, Py_ssize_t i,
                                     Py_ssize_t n) noexcept nogil:
    """Index just past the quote that continues a string ending at ``i``, or -1.

    PostgreSQL joins 'foo' and 'bar' into one literal when only whitespace
    and -- comments separate them and that stretch holds a newline.  The
    pieces are one value, so they are reported (and masked) as one token.
    """
    cdef bint newline = False
    cdef unsigned char c
    while i < n:
        c = p[i]
        if _is_newline(c):
            newline = True
            i += 1
        elif _is(c, C_SPACE):
            i += 1
        elif c == 45 and i + 1 < n and p[i + 1] == 45:   # -- comment
            i += 2
            while i < n and not _is_newline(p[i]):
                i += 1
        else:
            break
    if newline and i < n and p[i] == 39:
        return i + 1
    return -1


cdef inline Py_ssize_t _string_end(const unsigned char *p, Py_ssize_t i, Py_ssize_t n,
                                   QuoteMode mode) noexcept nogil:
    """End of a quoted literal (with its continuations) whose body starts at ``i``."""
    cdef Py_ssize_t j
    while True:
        i = _quoted_body_end(p, i, n, mode)
        if i >= n:
            return n
        j = _continuation(p, i, n)
        if j < 0:
            return i
        i = j


cdef inline Py_ssize_t _decimal_end(const unsigned char *p, Py_ssize_t i,
                                    Py_ssize_t n) noexcept nogil:
    """End of ``digit (_? digit)*`` starting at the digit at ``i``."""
    i += 1
    while i < n:
        if _is(p[i], C_DIGIT):
            i += 1
        elif p[i] == 95 and i + 1 < n and _is(p[i + 1], C_DIGIT):
            i += 2
        else:
            break
    return i


cdef inline bint _in_radix(unsigned char c, int radix) noexcept nogil:
    if radix == 16:
        return _is(c, C_HEX)
    if radix == 8:
        return 48 <= c <= 55
    return c == 48 or c == 49


cdef inline Py_ssize_t _radix_end(const unsigned char *p, Py_ssize_t i, Py_ssize_t n,
                                  int radix) noexcept nogil:
    """End of ``(_? digit)+`` in ``radix`` from ``i``; ``i`` itself when there is none."""
    while i < n:
        if _in_radix(p[i], radix):
            i += 1
        elif p[i] == 95 and i + 1 < n and _in_radix(p[i + 1], radix):
            i += 2
        else:
            break
    return i


cdef inline Py_ssize_t _number_end(const unsigned char *p, Py_ssize_t i,
                                   Py_ssize_t n) noexcept nogil:
    """End of the numeric literal at ``i`` (a digit, or '.' before a digit)."""
    cdef Py_ssize_t j
    cdef int radix = 0
    cdef unsigned char c
    if p[i] == 48 and i + 2 < n:   # 0x1F, 0o17, 0b101 (PostgreSQL 16)
        c = p[i + 1] | 32
        if c == 120:
            radix = 16
        elif c == 111:
            radix = 8
        elif c == 98:
            radix = 2
        if radix:
            j = _radix_end(p, i + 2, n, radix)
            if j > i + 2:
                return j
    if p[i] == 46:
        i = _decimal_end(p, i + 1, n)
    else:
        i = _decimal_end(p, i, n)
        # "1..5" is an integer followed by "..", not the numeric "1."
        if i < n and p[i] == 46 and not (i + 1 < n and p[i + 1] == 46):
            i += 1
            if i < n and _is(p[i], C_DIGIT):
                i = _decimal_end(p, i, n)
    if i < n and (p[i] | 32) == 101:   # exponent, only when digits follow
        j = i + 1
        if j < n and (p[j] == 43 or p[j] == 45):
            j += 1
        if j < n and _is(p[j], C_DIGIT):
            i = _decimal_end(p, j, n)
    return i


cdef inline Py_ssize_t _quoted_ident_end(const unsigned char *p, Py_ssize_t i,
                                         Py_ssize_t n) noexcept nogil:
    """Index just past the '"' closing the identifier whose body starts at ``i``."""
    cdef const void *hit
    while i < n:
        hit = memchr(p + i, 34, n - i)
        if hit == NULL:
            return n
        i = <const unsigned char *>hit - p + 1
        if i < n and p[i] == 34:
            i += 1
        else:
            return i
    return n


cdef inline Py_ssize_t _block_comment_end(const unsigned char *p, Py_ssize_t i,
                                          Py_ssize_t n) noexcept nogil:
    """Index just past the comment whose body starts at ``i`` (comments nest)."""
    cdef Py_ssize_t depth = 1
    while i + 1 < n:
        if p[i] == 47 and p[i + 1] == 42:
            depth += 1
            i += 2
        elif p[i] == 42 and p[i + 1] == 47:
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    return n


cdef inline Py_ssize_t _dollar_end(const unsigned char *p, Py_ssize_t start, Py_ssize_t tag_end,
                                   Py_ssize_t n) noexcept nogil:
    """End of a dollar-quoted literal whose opening delimiter is ``p[start:tag_end]``.

    The body runs to the first copy of the delimiter: PostgreSQL tries a
    delimiter at every '$' of the body, so the first copy always closes it.
    """
    cdef Py_ssize_t size = tag_end - start
    cdef Py_ssize_t i = tag_end
    cdef const void *hit
    while n - i >= size:
        hit = memchr(p + i, 36, n - i - size + 1)
        if hit == NULL:
            return n
        i = <const unsigned char *>hit - p
        if memcmp(p + i, p + start, size) == 0:
            return i + size
        i += 1
    return n


cdef inline Py_ssize_t _skip_blanks(const unsigned char *p, Py_ssize_t i,
                                    Py_ssize_t n) noexcept nogil:
    """Index of the first byte from ``i`` that is not whitespace or a comment."""
    while i < n:
        if _is(p[i], C_SPACE):
            i += 1
        elif p[i] == 45 and i + 1 < n and p[i + 1] == 45:
            i += 2
            while i < n and not _is_newline(p[i]):
                i += 1
        elif p[i] == 47 and i + 1 < n and p[i + 1] == 42:
            i = _block_comment_end(p, i + 2, n)
        else:
            break
    return i


cdef inline Py_ssize_t _uescape_end(const unsigned char *p, Py_ssize_t i,
                                    Py_ssize_t n) noexcept nogil:
    """End of a ``UESCAPE '<char>'`` clause after the U&'' string ending at ``i``, or ``i``.

    The clause belongs to the literal: masking the string alone would leave
    ``'***' UESCAPE '***'``, which no longer parses, and the escape character
    is needed to decode the value.  U&"names" take the clause too.
    """
    cdef Py_ssize_t j = _skip_blanks(p, i, n)
    if not _word_at(p + j, n - j, b"uescape", 7):
        return i
    j += 7
    if j < n and _is(p[j], C_IDENT_CONT):
        return i   # a longer name such as uescapes
    j = _skip_blanks(p, j, n)
    if j >= n or p[j] != 39:
        return i
    return _string_end(p, j + 1, n, Q_STANDARD)


cdef object _scan(const unsigned char *p, Py_ssize_t n):
    cdef list out = []
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t start, j
    cdef unsigned char c, low, nxt
    while i < n:
        c = p[i]
        start = i
        if c == 39:   # '
            i = _string_end(p, i + 1, n, Q_STANDARD)
            out.append((start, i, K_STRING))
        elif _is(c, C_IDENT_START):
            nxt = p[i + 1] if i + 1 < n else 0
            low = c | 32
            if nxt == 39 and (low == 101 or low == 110 or low == 98 or low == 120):
                if low == 101:     # E'...'
                    i = _string_end(p, i + 2, n, Q_ESCAPE)
                    out.append((start, i, K_ESCAPE_STRING))
                elif low == 110:   # N'...': a standard string of type nchar
                    i = _string_end(p, i + 2, n, Q_STANDARD)
                    out.append((start, i, K_STRING))
                else:              # B'...', X'...'
                    i = _string_end(p, i + 2, n, Q_BIT)
                    out.append((start, i, K_BIT_STRING))
            elif low == 117 and nxt == 38 and i + 2 < n and p[i + 2] == 39:   # U&'...'
                i = _string_end(p, i + 3, n, Q_STANDARD)
                i = _uescape_end(p, i, n)
                out.append((start, i, K_UNICODE_STRING))
            elif low == 117 and nxt == 38 and i + 2 < n and p[i + 2] == 34:   # U&"..."
                # A name, not a value: its UESCAPE '!' clause is skipped with it.
                i = _uescape_end(p, _quoted_ident_end(p, i + 3, n), n)
            else:
                i += 1
                while i < n and _is(p[i], C_IDENT_CONT):
                    i += 1
        elif _is(c, C_DIGIT) or (c == 46 and i + 1 < n and _is(p[i + 1], C_DIGIT)):
            i = _number_end(p, i, n)
            out.append((start, i, K_NUMBER))
        elif c == 46 and i + 1 < n and p[i + 1] == 46:
            i += 2      # "..": the digits after it start a number of their own
        elif c == 34:   # "identifier"
            i = _quoted_ident_end(p, i + 1, n)
        elif c == 45 and i + 1 < n and p[i + 1] == 45:   # -- comment
            i += 2
            while i < n and not _is_newline(p[i]):
                i += 1
        elif c == 47 and i + 1 < n and p[i + 1] == 42:   # /* comment */
            i = _block_comment_end(p, i + 2, n)
        elif c == 36:   # $
            if i + 1 < n and _is(p[i + 1], C_DIGIT):
                # A parameter ($1): its digits are not a literal.  What follows
                # is lexed normally, so "$1$a$x$a$" still finds the dollar quote.
                i = _decimal_end(p, i + 1, n)
                continue
            j = i + 1
            if j < n and _is(p[j], C_IDENT_START):
                j += 1
                while j < n and _is(p[j], C_DOLQ_CONT):
                    j += 1
            if j < n and p[j] == 36:
                i = _dollar_end(p, i, j + 1, n)
                out.append((start, i, K_DOLLAR))
            else:
                i += 1
        else:
            i += 1
    return out


def scan_literals(sql):
    """Every literal token of ``sql`` (UTF-8 bytes of one or more statements).

    Returns ``[(start, end, kind), ...]`` in text order: byte offsets, end
    exclusive, start on the prefix of E'', N'', B'', X'' and U&'' literals,
    kind one of the ``LIT_*`` constants.  A U&'' string's token includes a
    following ``UESCAPE '!'`` clause, so that the two are masked together.  Nothing inside comments or quoted
    identifiers is reported, and a '$1' parameter or the digits of 't1' are
    not numbers.  An unterminated literal runs to the end of the text so
    that it is still masked.  Never raises on content: any bytes, including
    invalid UTF-8 and NUL, give an answer within bounds.
    """
    cdef const unsigned char[::1] view
    if type(sql) is bytes:
        return _scan(<const unsigned char *>PyBytes_AS_STRING(sql), PyBytes_GET_SIZE(sql))
    view = memoryview(sql).cast("B")
    if view.shape[0] == 0:
        return []
    return _scan(&view[0], view.shape[0])


# The value of a literal, for the masks that keep or hash part of it.  Runs
# only for literals that are masked, so plain Python is fast enough.

_SIMPLE_ESCAPES = {98: 8, 102: 12, 110: 10, 114: 13, 116: 9}   # \b \f \n \r \t
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
_OCT_DIGITS = frozenset(b"01234567")
_REPLACEMENT = "\ufffd".encode()


cdef object _code_point_bytes(Py_ssize_t cp):
    """UTF-8 of a code point from a \\u escape; U+FFFD if it is not a scalar value."""
    if 0 <= cp <= 0x10FFFF and not (0xD800 <= cp <= 0xDFFF):
        return chr(cp).encode()
    return _REPLACEMENT


cdef object _hex_run(bytes data, Py_ssize_t pos, Py_ssize_t count):
    """Value of exactly ``count`` hex digits at ``pos``, or -1."""
    if pos + count > len(data):
        return -1
    for b in data[pos:pos + count]:
        if b not in _HEX_DIGITS:
            return -1
    return int(data[pos:pos + count], 16)


cdef object _unicode_escape(bytes data, Py_ssize_t pos, Py_ssize_t digits, bytes low_marker):
    """Decode an escape of ``digits`` hex digits at ``pos`` (just past its marker).

    Returns ``(utf8, next_pos)`` or None when the digits are missing.  A
    high surrogate followed by ``low_marker`` and four hex digits of a low
    one is joined into one code point, as PostgreSQL does; any other
    surrogate becomes U+FFFD.
    """
    cdef Py_ssize_t cp = _hex_run(data, pos, digits)
    cdef Py_ssize_t low
    cdef Py_ssize_t m = len(low_marker)
    if cp < 0:
        return None
    pos += digits
    if 0xD800 <= cp <= 0xDBFF and data[pos:pos + m] == low_marker:
        low = _hex_run(data, pos + m, 4)
        if 0xDC00 <= low <= 0xDFFF:
            return _code_point_bytes(0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00)), pos + m + 4
    return _code_point_bytes(cp), pos


cdef object _quoted_pieces(bytes token, Py_ssize_t pos, int mode):
    """Body of a quoted literal from its opening quote at ``pos``.

    Joins continuation pieces, undoes '' doubling and, for E-strings, the
    backslash escapes.  An unterminated body runs to the end of the token.
    Returns ``(body, pos)`` with ``pos`` just past the last closing quote.
    """
    out = bytearray()
    cdef Py_ssize_t n = len(token)
    cdef Py_ssize_t k, value, piece
    cdef unsigned char b, e
    while pos < n and token[pos] == 39:
        pos += 1
        closed = False
        while pos < n:
            b = token[pos]
            if b == 39:
                if mode != Q_BIT and pos + 1 < n and token[pos + 1] == 39:
                    out.append(39)
                    pos += 2
                    continue
                pos += 1
                closed = True
                break
            if mode == Q_ESCAPE and b == 92:
                if pos + 1 >= n:
                    pos += 1
                    break
                e = token[pos + 1]
                pos += 2
                if e in _OCT_DIGITS:
                    value = e - 48
                    k = 1
                    while k < 3 and pos < n and token[pos] in _OCT_DIGITS:
                        value = value * 8 + token[pos] - 48
                        pos += 1
                        k += 1
                    out.append(value & 0xFF)
                elif e == 120 and pos < n and token[pos] in _HEX_DIGITS:
                    k = 2 if pos + 1 < n and token[pos + 1] in _HEX_DIGITS else 1
                    out.append(int(token[pos:pos + k], 16))
                    pos += k
                elif e == 117 or e == 85:
                    decoded = _unicode_escape(token, pos, 4 if e == 117 else 8, b"\\u")
                    if decoded is None:
                        out.append(e)
                    else:
                        out += decoded[0]
                        pos = decoded[1]
                else:
                    out.append(_SIMPLE_ESCAPES.get(e, e))
                continue
            out.append(b)
            pos += 1
        if not closed:
            break
        # The next piece of a continued string, by the scanner's own rule.
        piece = _continuation(<const unsigned char *>PyBytes_AS_STRING(token), pos, n)
        if piece < 0:
            break
        pos = piece - 1
    return bytes(out), pos


cdef object _uescape_char(bytes tail):
    """The escape character set by the UESCAPE clause that ``tail`` may hold."""
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(tail)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(tail)
    cdef Py_ssize_t i = _skip_blanks(p, 0, n)
    if not _word_at(p + i, n - i, b"uescape", 7):
        return 92
    i = _skip_blanks(p, i + 7, n)
    if i + 2 < n and p[i] == 39 and p[i + 2] == 39:
        return p[i + 1]
    return 92


cdef object _unicode_body(bytes raw, unsigned char esc):
    """Undo the escapes of a U&'' body: \\XXXX, \\+XXXXXX and a doubled escape."""
    out = bytearray()
    cdef Py_ssize_t pos = 0
    cdef Py_ssize_t n = len(raw)
    marker = bytes((esc,))
    while pos < n:
        b = raw[pos]
        if b != esc or pos + 1 >= n:
            out.append(b)
            pos += 1
            continue
        if raw[pos + 1] == esc:
            out.append(esc)
            pos += 2
            continue
        if raw[pos + 1] == 43:
            decoded = _unicode_escape(raw, pos + 2, 6, marker)
        else:
            decoded = _unicode_escape(raw, pos + 1, 4, marker)
        if decoded is None:
            out.append(b)
            pos += 1
        else:
            out += decoded[0]
            pos = decoded[1]
    return bytes(out)


cdef object _bits_from_hex(str digits):
    """X'1F' as PostgreSQL shows the value: 00011111 (4 bits a digit)."""
    try:
        return "".join(format(int(d, 16), "04b") for d in digits)
    except ValueError:
        return digits


def literal_text(sql, Py_ssize_t start, Py_ssize_t end, int kind):
    """The value of the literal ``sql[start:end]`` of ``kind``, as the server sees it.

    Quotes and prefixes are removed, '' is one quote, E-string escapes are
    decoded (best effort), continued strings are joined, U&'' escapes use
    the character of the UESCAPE clause the token may end with.  Numbers
    lose their underscores and 0x/0o/0b numbers are given in decimal, so
    0x2A, 42 and '42' hash alike; X'' bit strings are given as binary digits
    like B'' ones.  Invalid UTF-8 becomes U+FFFD.  Raises ValueError for
    offsets outside the text or an unknown kind.
    """
    data = sql if type(sql) is bytes else memoryview(sql).cast("B")
    if not 0 <= start <= end <= len(data):
        raise ValueError("literal offsets %d:%d outside a text of %d bytes"
                         % (start, end, len(data)))
    token = bytes(data[start:end])
    cdef Py_ssize_t close
    if kind == K_NUMBER:
        text = token.decode("utf-8", "replace").replace("_", "")
        if len(text) > 2 and text[0] == "0" and text[1] in "xXoObB":
            try:
                return str(int(text[2:], {"x": 16, "o": 8, "b": 2}[text[1].lower()]))
            except ValueError:
                return text
        return text
    if kind == K_DOLLAR:
        close = token.find(b"$", 1)
        if close < 0:
            return ""
        tag = token[:close + 1]
        body = token[close + 1:]
        if len(body) >= len(tag) and body.endswith(tag):
            body = body[:len(body) - len(tag)]
        return body.decode("utf-8", "replace")
    if kind == K_STRING:
        skip = 1 if token[:1] in (b"n", b"N") else 0
        return _quoted_pieces(token, skip, Q_STANDARD)[0].decode("utf-8", "replace")
    if kind == K_ESCAPE_STRING:
        return _quoted_pieces(token, 1, Q_ESCAPE)[0].decode("utf-8", "replace")
    if kind == K_BIT_STRING:
        digits = _quoted_pieces(token, 1, Q_BIT)[0].decode("utf-8", "replace")
        return _bits_from_hex(digits) if token[:1] in (b"x", b"X") else digits
    if kind == K_UNICODE_STRING:
        raw, close = _quoted_pieces(token, 2, Q_STANDARD)
        esc = _uescape_char(token[close:])
        return _unicode_body(raw, esc).decode("utf-8", "replace")
    raise ValueError("unknown literal kind %d" % kind)
