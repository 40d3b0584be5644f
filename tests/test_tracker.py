"""The statement tracker and the record writer on their own, with synthetic
protocol traffic: the corner cases no driver produces on demand."""

from __future__ import annotations

from scalple import protocol as P
from scalple.events import SessionInfo, StatementEvent
from scalple.identity.startup import StartupIdentity
from scalple.identity.state import IdentityState
from scalple.session.tracker import StatementTracker

SESSION = SessionInfo("s-1", "127.0.0.1:1", "app_user", "app", "", None, None, "none", False, 0)


def tracker() -> tuple[StatementTracker, list[StatementEvent]]:
    events: list[StatementEvent] = []
    return StatementTracker(SESSION, events.append, IdentityState(StartupIdentity(), None)), events


def fe(mtype: str, body: bytes) -> tuple[int, bytes, bool, int, int]:
    return (ord(mtype), body, False, 0, 0)


def error(code: str, severity: str = "ERROR") -> bytes:
    return P.build_error(code, "boom", severity=severity)[5:]


def test_error_after_flush_with_nothing_pending_skips_to_sync() -> None:
    """Parse fails and is answered after a Flush: the server then skips what
    the client sends until Sync, so a Query sent meanwhile never runs."""
    t, events = tracker()
    t.on_frontend([fe("P", b"\0selec oops\0\0\0"), fe("H", b"")], 1)
    t.on_backend([fe("E", error("42601"))], 2)
    t.on_frontend([fe("Q", b"select 1\0"), fe("S", b"")], 3)
    t.on_backend([fe("Z", b"I")], 4)
    t.on_frontend([fe("Q", b"select 2\0")], 5)
    t.on_backend([fe("C", b"SELECT 1\0"), fe("Z", b"I")], 6)
    assert [(e.query, e.tag) for e in events] == [(b"select 2", b"SELECT 1")]


def test_pipelined_error_skips_the_rest_of_the_batch() -> None:
    t, events = tracker()
    t.on_frontend(
        [
            fe("P", b"\0select 1\0\0\0"),
            fe("B", b"\0\0\0\0\0\0\0\0"),
            fe("E", b"\0\0\0\0\0"),
            fe("P", b"\0select 1/0\0\0\0"),
            fe("B", b"\0\0\0\0\0\0\0\0"),
            fe("E", b"\0\0\0\0\0"),
            fe("P", b"\0select 3\0\0\0"),
            fe("B", b"\0\0\0\0\0\0\0\0"),
            fe("E", b"\0\0\0\0\0"),
            fe("S", b""),
        ],
        1,
    )
    t.on_backend([fe("C", b"SELECT 1\0"), fe("E", error("22012")), fe("Z", b"I")], 2)
    assert [(e.query, e.status, e.sqlstate) for e in events] == [
        (b"select 1", "ok", None),
        (b"select 1/0", "error", "22012"),
    ]
    assert t.idle


def test_extended_copy_from_stdin_with_libpq_syncs() -> None:
    """libpq: Parse/Bind/Describe/Execute/Sync, then (after CopyInResponse)
    CopyData, CopyDone, Sync. The server ignores the first Sync, so there is
    one ReadyForQuery for two Syncs; the queue must not fall one behind."""
    t, events = tracker()
    t.on_frontend(
        [
            fe("P", b"\0copy t from stdin\0\0\0"),
            fe("B", b"\0\0\0\0\0\0\0\0"),
            fe("D", b"P\0"),
            fe("E", b"\0\0\0\0\0"),
            fe("S", b""),
        ],
        1,
    )
    t.on_backend([fe("G", b"\0\0\0")], 2)
    t.on_frontend([fe("c", b""), fe("S", b"")], 3)
    t.on_backend([fe("C", b"COPY 5\0"), fe("Z", b"I")], 4)
    t.on_frontend([fe("Q", b"select 1\0")], 5)
    t.on_backend([fe("C", b"SELECT 1\0"), fe("Z", b"I")], 6)
    assert [(e.query, e.tag, e.rows) for e in events] == [
        (b"copy t from stdin", b"COPY 5", 5),
        (b"select 1", b"SELECT 1", 1),
    ]
    assert t.idle


class _Watch:
    """Records what the tracker tells the backend scanner."""

    def __init__(self) -> None:
        self.pushed: list[object] = []

    def push_row_description(self, body: bytes | None, bind: bytes | None = None) -> None:
        self.pushed.append(body)

    def push_ready_marker(self) -> None:
        self.pushed.append("Z")


def test_prepared_statement_descriptions_reach_the_scanner_at_each_bind() -> None:
    """asyncpg prepares once (Parse, Describe statement, Sync) and then only
    binds: the RowDescription it got when preparing is the only one its
    results will have, so the tracker hands it over at every Bind."""
    t, _events = tracker()
    watch = _Watch()
    t.watch_rows(watch)
    t.on_frontend([fe("P", b"s1\0select id from t\0\0\0"), fe("D", b"Ss1\0"), fe("S", b"")], 1)
    row_description = b"\0\x01id\0" + b"\0" * 18
    t.on_backend([fe("t", b"\0\0"), fe("T", row_description), fe("Z", b"I")], 2)
    t.on_frontend([fe("B", b"\0s1\0\0\0\0\0\0\0"), fe("E", b"\0\0\0\0\0"), fe("S", b"")], 3)
    # A statement described with NoData, then the unnamed one (psycopg).
    t.on_frontend([fe("P", b"s2\0set x = 1\0\0\0"), fe("D", b"Ss2\0"), fe("S", b"")], 4)
    t.on_backend([fe("t", b"\0\0"), fe("n", b""), fe("Z", b"I")], 5)
    t.on_frontend([fe("B", b"\0s2\0\0\0\0\0\0\0"), fe("S", b"")], 6)
    t.on_frontend([fe("C", b"Ss1\0"), fe("B", b"\0s1\0\0\0\0\0\0\0"), fe("Q", b"select 1\0")], 7)
    assert watch.pushed == ["Z", row_description, "Z", "Z", None, "Z", None, "Z"]
