"""Crash recovery of the audit log store (scalple/store/writer.py).

The store's promises are about what survives a crash: a signed checkpoint is
never lost and never cut below, a torn tail is cut back to the last whole
record (and kept aside, not thrown away), a sequence number is never handed
out twice, and a log being written to still verifies.  These tests break the
store the way crashes, full disks and careless operators do, then check that
the next writer and ``verify_log`` see what the design says they must.

Crashes are real where that is cheap: the writer runs in a subprocess
(``_child_main``) that ends with ``os._exit`` or SIGKILL, never ``close``.
Damage a crash could leave on disk (a torn frame, a half-written header) is
then made by hand, since no kill can be timed to land inside one ``write``.
"""

from __future__ import annotations

import errno
import itertools
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import msgspec
import pytest

from scalple.config import LogConfig
from scalple.query.reader import LogReader
from scalple.records import SessionRecord, StatementRecord, decode_record, encode_record, rfc3339
from scalple.store import layout
from scalple.store import verify as verify_module
from scalple.store.checkpoint import open_checkpoint, split_notes
from scalple.store.hashing import leaf_hash
from scalple.store.keys import SigningKey
from scalple.store.segment import MAGIC, frame, frame_end, read_header, scan_frames
from scalple.store.verify import OriginReport, verify_log
from scalple.store.writer import StoreError, StoreWriter

ROOT = Path(__file__).resolve().parent.parent
ORIGIN = "test.example/audit"

Record = StatementRecord | SessionRecord


# -- helpers --------------------------------------------------------------------


def _config(log_dir: Path, **overrides: Any) -> LogConfig:
    """A store config for ``log_dir``; large segments and rare checkpoints unless told."""
    settings: dict[str, Any] = {"segment_size": 64 << 20, "checkpoint_records": 100_000}
    settings.update(overrides)
    return LogConfig(dir=str(log_dir), origin=ORIGIN, **settings)


def _batch(first_seq: int, count: int, *, pad: int = 0) -> list[Record]:
    """Records whose content names the seq the writer will give them.

    The writer numbers records itself; building each record from the seq it
    is about to get lets a reader tell a record that is whole but not the one
    written (mixed-up bytes) from the right one.  Every fifth is a session
    record, so reading with ``kinds=None`` is what finds them all.
    """
    records: list[Record] = []
    for seq in range(first_seq, first_seq + count):
        ts = rfc3339(time.time_ns())
        if seq % 5 == 0:
            records.append(
                SessionRecord(
                    kind="session_open",
                    ts=ts,
                    session_id=f"s{seq}",
                    client_addr="127.0.0.1",
                    db_role="app",
                    database="db",
                )
            )
            continue
        records.append(
            StatementRecord(
                ts=ts,
                session_user_id="alice",
                session_email=None,
                identity_source="startup",
                identity_verified=False,
                db_role="app",
                database="db",
                application_name="test",
                client_addr="127.0.0.1",
                session_id="s0",
                statement_id=seq,
                protocol="simple",
                statement_class="READ",
                command="SELECT",
                query=f"select {seq}" + " " * pad,
                query_fingerprint=None,
                params=None,
                affected_tables=[],
                columns_accessed={},
                rows=1,
                status="ok",
                sqlstate=None,
                duration_us=10,
                in_transaction=False,
            )
        )
    return records


def _append(writer: StoreWriter, count: int, *, pad: int = 0) -> list[Record]:
    """Append ``count`` records numbered from the writer's next seq."""
    records = _batch(writer.seq + 1, count, pad=pad)
    writer.append(records)
    return records


def _content_matches(record: dict[str, Any]) -> bool:
    """Whether a record read back is the one ``_batch`` built for its seq."""
    seq = record["seq"]
    if record["kind"] == "statement":
        return bool(record["query"].rstrip() == f"select {seq}")
    return bool(record["session_id"] == f"s{seq}")


def _read_back(log_dir: Path) -> list[dict[str, Any]]:
    return list(LogReader(log_dir).records(kinds=None))


def _verify(log_dir: Path, key: SigningKey) -> OriginReport:
    reports = verify_log(log_dir, [key.verifier()])
    assert len(reports) == 1
    return reports[0]


def _origin_dir(log_dir: Path) -> Path:
    return layout.origin_dir(log_dir, ORIGIN)


def _newest_segment(log_dir: Path) -> Path:
    directory = _origin_dir(log_dir)
    return layout.segment_path(directory, layout.segment_numbers(directory)[-1])


def _frame_offsets(path: Path) -> list[int]:
    """Where each whole frame of a segment starts, and where the last one ends."""
    data = path.read_bytes()
    _, start = read_header(data, path)
    ends = [start]
    for item in scan_frames(data, start):
        ends.append(frame_end(item))
    return ends


def _segment_seqs(path: Path) -> list[int]:
    data = path.read_bytes()
    _, start = read_header(data, path)
    return [decode_record(item.payload).seq for item in scan_frames(data, start)]


def _snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` with its bytes."""
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def _latest_checkpoint_size(log_dir: Path, key: SigningKey) -> int:
    note = (_origin_dir(log_dir) / layout.CHECKPOINT_FILE).read_bytes()
    return open_checkpoint(note, [key.verifier()], origin=ORIGIN).size


# -- the writer subprocess ----------------------------------------------------------


def _child_main(argv: list[str]) -> None:
    """A writer process that ends without ``close`` (run by ``_spawn``).

    ``crash SIGNED EXTRA END``: append SIGNED records, sync and sign them,
    append EXTRA more unsigned, print a JSON summary, then end with
    ``os._exit`` (END=exit) or SIGKILL (END=kill).

    ``load``: recover, print ``ready SEQ SIZE``, wait for a line on stdin
    (none: close cleanly and stop), then append batches forever, printing
    ``ack SEQ`` once SEQ is fsynced, until killed.
    """
    mode, config_json, key_file, *rest = argv
    config = msgspec.json.decode(config_json, type=LogConfig)
    writer = StoreWriter(config, SigningKey.load(Path(key_file)))
    if mode == "crash":
        signed, extra, end = int(rest[0]), int(rest[1]), rest[2]
        _append(writer, signed)
        writer.checkpoint()
        _append(writer, extra)
        summary = {"signed": signed, "size": writer.size, "seq": writer.seq}
        sys.stdout.write(msgspec.json.encode(summary).decode() + "\n")
        sys.stdout.flush()
        if end == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(0)
    assert mode == "load"
    print(f"ready {writer.seq} {writer.size}", flush=True)
    if not sys.stdin.readline():
        writer.close()
        return
    while True:
        _append(writer, 7)
        writer.sync()
        print(f"ack {writer.seq}", flush=True)
        writer.tick(time.time_ns())


def _spawn(mode: str, config: LogConfig, key_file: Path, *args: str) -> subprocess.Popen[str]:
    code = (
        "import sys; from tests.test_store_recovery import _child_main; _child_main(sys.argv[1:])"
    )
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            mode,
            msgspec.json.encode(config).decode(),
            str(key_file),
            *args,
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _crash(
    config: LogConfig, key_file: Path, signed: int, extra: int, end: str = "exit"
) -> dict[str, int]:
    """Run a writer that signs ``signed`` records, writes ``extra`` more and dies."""
    child = _spawn("crash", config, key_file, str(signed), str(extra), end)
    out, _ = child.communicate(timeout=30)
    expected = -signal.SIGKILL if end == "kill" else 0
    assert child.returncode == expected, out
    summary: dict[str, int] = msgspec.json.decode(out.strip().splitlines()[-1])
    return summary


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate("test")


@pytest.fixture
def key_file(tmp_path: Path, key: SigningKey) -> Path:
    path = tmp_path / "signing.key"
    path.write_text(key.to_text() + "\n")
    return path


# -- 1. a torn tail ----------------------------------------------------------------


def _torn_tail(kind: str) -> bytes:
    """Bytes a crash (or a power loss) can leave after the last whole frame."""
    payload = encode_record(_batch(1, 1)[0])
    if kind == "garbage":
        return b"\xde\xad\xbe\xef not a frame at all"
    if kind == "partial-frame":
        return frame(payload, leaf_hash(payload))[:-10]
    if kind == "wrong-hash":
        return frame(payload, leaf_hash(payload + b"x"))
    assert kind == "not-a-record"  # hashes right, but no record decodes from it
    return frame(b"Znot a record", leaf_hash(b"Znot a record"))


@pytest.mark.parametrize("tail", ["garbage", "partial-frame", "wrong-hash", "not-a-record"])
def test_torn_tail_is_cut_kept_and_signed(
    tmp_path: Path, key: SigningKey, key_file: Path, tail: str
) -> None:
    """A writer killed with unsigned records and a torn frame after them
    restarts with the torn bytes cut (and kept aside for an investigator), the
    unsigned but whole records kept and signed at once, and appends going on."""
    log_dir = tmp_path / "log"
    config = _config(log_dir)
    summary = _crash(config, key_file, signed=10, extra=5)
    segment = _newest_segment(log_dir)
    whole = segment.read_bytes()
    assert _frame_offsets(segment)[-1] == len(whole)  # the crash itself tore nothing
    torn = _torn_tail(tail)
    with segment.open("ab") as handle:
        handle.write(torn)

    writer = StoreWriter(config, key)
    try:
        assert segment.read_bytes() == whole
        kept = list(segment.parent.glob(segment.name + ".torn-*"))
        assert [path.read_bytes() for path in kept] == [torn]
        assert writer.size == summary["size"] == 15
        assert _latest_checkpoint_size(log_dir, key) == 15
        ckpt_notes, _ = split_notes(layout.checkpoints_path(segment.parent, 1).read_bytes())
        last = open_checkpoint(ckpt_notes[-1], [key.verifier()], origin=ORIGIN)
        assert (last.size, last.root) == (15, writer.root())
        report = _verify(log_dir, key)
        assert (report.records, report.signed_size, report.unsigned) == (15, 15, 0)

        _append(writer, 3)
        writer.checkpoint()
    finally:
        writer.close()
    report = _verify(log_dir, key)
    assert (report.records, report.signed_size) == (18, 18)
    records = _read_back(log_dir)
    seqs = [record["seq"] for record in records]
    assert len(seqs) == 18 and seqs == sorted(set(seqs))
    assert all(_content_matches(record) for record in records)


# -- 2. sequence numbers ------------------------------------------------------------


@pytest.mark.parametrize("end", ["exit", "kill"])
def test_seq_never_reused_after_a_crash(
    tmp_path: Path, key: SigningKey, key_file: Path, end: str
) -> None:
    """The record whose frame a crash tore is cut, but its seq may already be
    in someone's hands (a SIEM that tailed the log): the next writer must never
    hand that number out again."""
    log_dir = tmp_path / "log"
    config = _config(log_dir)
    summary = _crash(config, key_file, signed=10, extra=5, end=end)
    segment = _newest_segment(log_dir)
    written = _segment_seqs(segment)
    assert max(written) == summary["seq"]
    offsets = _frame_offsets(segment)
    with segment.open("r+b") as handle:  # tear the last frame: its record is lost
        handle.truncate((offsets[-2] + offsets[-1]) // 2)

    writer = StoreWriter(config, key)
    try:
        assert writer.size == 14
        assert writer.seq >= max(written)
        _append(writer, 1)
        new_seq = writer.seq
    finally:
        writer.close()
    assert new_seq > max(written)
    seqs = [record["seq"] for record in _read_back(log_dir)]
    assert seqs == [*written[:-1], new_seq]
    _verify(log_dir, key)


def test_seq_continues_without_a_gap_after_close(tmp_path: Path, key: SigningKey) -> None:
    """After a clean close nothing was lost, so nothing needs skipping: the
    numbers go on one by one (a gap would look like a removed record)."""
    log_dir = tmp_path / "log"
    config = _config(log_dir)
    writer = StoreWriter(config, key)
    _append(writer, 6)
    writer.close()
    for _ in range(2):
        writer = StoreWriter(config, key)
        _append(writer, 4)
        writer.close()
    seqs = [record["seq"] for record in _read_back(log_dir)]
    assert seqs == list(range(1, 15))
    _verify(log_dir, key)


# -- 3. never below a checkpoint -----------------------------------------------------


@pytest.mark.parametrize("damage", ["whole-frames-cut", "frame-torn", "byte-flipped"])
def test_never_cut_below_a_signed_checkpoint(tmp_path: Path, key: SigningKey, damage: str) -> None:
    """Records a checkpoint signs were fsynced first, so their loss is not a
    crash but tampering or a broken disk: recovery must refuse, and must not
    "repair" anything on the way (that would destroy the evidence)."""
    log_dir = tmp_path / "log"
    config = _config(log_dir)
    writer = StoreWriter(config, key)
    _append(writer, 10)
    writer.checkpoint()
    writer.close()
    segment = _newest_segment(log_dir)
    original = segment.read_bytes()
    offsets = _frame_offsets(segment)
    if damage == "whole-frames-cut":
        damaged = original[: offsets[-3]]
    elif damage == "frame-torn":
        damaged = original[: offsets[-3] - 7]
    else:
        flip = offsets[4] + 6
        damaged = original[:flip] + bytes([original[flip] ^ 0x20]) + original[flip + 1 :]
    segment.write_bytes(damaged)
    before = _snapshot(log_dir)

    with pytest.raises(StoreError, match="checkpoint"):
        StoreWriter(config, key)
    assert _snapshot(log_dir) == before

    # Once the operator restores the file, the same process may open the store:
    # the refused attempt must not have kept the origin locked.
    segment.write_bytes(original)
    writer = StoreWriter(config, key)
    _append(writer, 1)
    writer.close()
    assert _verify(log_dir, key).records == 11


# -- 4. a crash while creating a segment ----------------------------------------------


@pytest.mark.parametrize(
    ("segment_bytes", "ckpt_bytes"),
    [
        ("header", None),
        ("partial-header", None),
        ("magic-prefix", None),
        ("empty", None),
        ("header", "empty"),
        ("header", "torn"),
    ],
)
def test_crash_while_creating_a_segment(
    tmp_path: Path, key: SigningKey, segment_bytes: str, ckpt_bytes: str | None
) -> None:
    """A seal creates the next segment (header, fsync, opening checkpoint);
    a crash inside that leaves a segment that can hold no record.  Restart
    must drop it and go on with the one before, which a later seal closes
    again as if nothing had happened."""
    log_dir = tmp_path / "log"
    config = _config(log_dir)
    writer = StoreWriter(config, key)
    _append(writer, 8)
    writer.seal()
    writer.close()
    directory = _origin_dir(log_dir)
    assert layout.segment_numbers(directory) == [1, 2]
    second = layout.segment_path(directory, 2)
    second_ckpt = layout.checkpoints_path(directory, 2)
    header = second.read_bytes()
    assert _frame_offsets(second) == [len(header)]  # only its header
    opening = second_ckpt.read_bytes()
    second.write_bytes(
        {
            "header": header,
            "partial-header": header[: len(header) // 2],
            "magic-prefix": MAGIC[:5],
            "empty": b"",
        }[segment_bytes]
    )
    if ckpt_bytes is None:
        second_ckpt.unlink()
    else:
        second_ckpt.write_bytes(b"" if ckpt_bytes == "empty" else opening[: len(opening) // 2])

    writer = StoreWriter(config, key)
    try:
        assert layout.segment_numbers(directory) == [1]
        assert not second_ckpt.exists()
        assert not layout.index_path(directory, 1).exists()  # segment 1 is open again
        assert writer.size == 8
        assert _verify(log_dir, key).records == 8
        _append(writer, 4)
        writer.seal()
        _append(writer, 2)
    finally:
        writer.close()
    assert layout.segment_numbers(directory) == [1, 2]
    report = _verify(log_dir, key)
    assert (report.segments, report.records, report.unsigned) == (2, 14, 0)
    seqs = [record["seq"] for record in _read_back(log_dir)]
    assert seqs == list(range(1, 15))


# -- 5. kill -9 under load ---------------------------------------------------------------


def _collect_acks(stream: IO[str], acks: list[int], first: threading.Event) -> None:
    """Whole ``ack SEQ`` lines only: a line cut by the kill acknowledged nothing."""
    for line in stream:
        if line.startswith("ack ") and line.endswith("\n"):
            acks.append(int(line.split()[1]))
            first.set()


def test_repeated_kill_9_under_load(tmp_path: Path, key: SigningKey, key_file: Path) -> None:
    """A writer killed at any moment must have lost nothing it had fsynced
    (acknowledged), and the next writer must start from a log that verifies,
    with numbers still going up.  Small segments and frequent checkpoints put
    kills inside seals and checkpoint writes too."""
    log_dir = tmp_path / "log"
    config = _config(log_dir, segment_size=4096, checkpoint_records=20, checkpoint_interval=0.02)
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    acked: list[int] = []
    rounds = 5
    for round_no in range(rounds + 1):
        child = _spawn("load", config, key_file)
        assert child.stdin is not None and child.stdout is not None
        try:
            ready = child.stdout.readline().split()
            assert ready[:1] == ["ready"], f"seed {seed}, round {round_no}: {ready}"
            seq, size = int(ready[1]), int(ready[2])
            # The child holds the lock, recovered, and writes nothing until told.
            records = _read_back(log_dir)
            seqs = [record["seq"] for record in records]
            where = f"seed {seed}, round {round_no}"
            assert all(b > a for a, b in itertools.pairwise(seqs)), where
            assert set(acked) <= set(seqs), f"{where}: lost {sorted(set(acked) - set(seqs))}"
            assert all(_content_matches(record) for record in records), where
            assert size == len(seqs), where
            assert seq >= max(seqs, default=0), where
            _verify(log_dir, key)
            if round_no == rounds:
                child.stdin.close()
                assert child.wait(timeout=10) == 0
                break
            before = len(acked)
            first = threading.Event()
            reader = threading.Thread(target=_collect_acks, args=(child.stdout, acked, first))
            reader.start()
            child.stdin.write("go\n")
            child.stdin.flush()
            assert first.wait(timeout=10), f"{where}: the writer acknowledged nothing"
            time.sleep(rng.uniform(0.0, 0.4))
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
            reader.join(timeout=10)
            assert len(acked) > before
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()
    assert len(layout.segment_numbers(_origin_dir(log_dir))) > rounds  # seals happened
    assert _verify(log_dir, key).unsigned == 0


# -- 6. verify while writing -------------------------------------------------------------


class FalseViolation(Exception):
    """``verify_log`` failed on a log that was only being written to."""


@pytest.mark.parametrize(
    "sealing",
    [
        pytest.param(False, id="checkpoints"),
        pytest.param(True, id="seals"),
    ],
)
def test_verify_and_read_while_writing(tmp_path: Path, key: SigningKey, sealing: bool) -> None:
    """``scalple verify`` and readers run against a live log: a record being
    written, a checkpoint being appended or a segment being sealed must never
    look like tampering, and a reader must never be handed a damaged record.

    A reader's failure is an AssertionError (a real failure in either case);
    verify's failures are collected and raised as FalseViolation at the end,
    so that the sealing case still checks the readers while verify is broken.
    """
    log_dir = tmp_path / "log"
    config = _config(
        log_dir,
        segment_size=4096 if sealing else 64 << 20,
        checkpoint_records=5,
        checkpoint_interval=0.01,
    )
    writer = StoreWriter(config, key)
    _append(writer, 5)
    writer.checkpoint()
    stop = threading.Event()
    failures: list[BaseException] = []

    def write() -> None:
        try:
            while not stop.is_set():
                _append(writer, 3)
                writer.sync()
                writer.tick(time.time_ns())
        except BaseException as exc:
            failures.append(exc)
        finally:
            writer.close()  # here: the catalog's SQLite connection belongs to this thread

    thread = threading.Thread(target=write)
    thread.start()
    runs = 0
    false_alarms: list[str] = []
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                verify_log(log_dir, [key.verifier()])
            except Exception as exc:
                false_alarms.append(f"{type(exc).__name__}: {exc}")
            records = _read_back(log_dir)
            seqs = [record["seq"] for record in records]
            assert seqs == list(range(1, len(seqs) + 1))
            assert all(_content_matches(record) for record in records)
            runs += 1
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not failures
    assert runs >= 5
    segments = len(layout.segment_numbers(_origin_dir(log_dir)))
    assert segments >= 5 if sealing else segments == 1
    report = _verify(log_dir, key)  # at rest it verifies, whatever happened meanwhile
    assert report.unsigned == 0
    assert report.checkpoints > 20  # checkpoints were signed while verify was running
    if false_alarms:
        shown = "; ".join(sorted(set(false_alarms))[:3])
        raise FalseViolation(f"{len(false_alarms)} of {runs} verify runs failed: {shown}")


def test_verify_while_a_segment_is_sealed(
    tmp_path: Path, key: SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The seal race of verify, made deterministic: the writer seals just
    after verify_log has read the catalog.  Nothing is wrong with the log."""
    log_dir = tmp_path / "log"
    writer = StoreWriter(_config(log_dir), key)
    try:
        _append(writer, 5)
        writer.seal()
        _append(writer, 3)
        writer.checkpoint()
        read_catalog = verify_module._catalog_entries

        def read_catalog_then_seal(directory: Path) -> Any:
            entries = read_catalog(directory)
            writer.seal()
            return entries

        monkeypatch.setattr(verify_module, "_catalog_entries", read_catalog_then_seal)
        verify_log(log_dir, [key.verifier()])
    finally:
        writer.close()


def test_verify_while_the_first_segment_is_sealed(
    tmp_path: Path, key: SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another seal race, made deterministic: no catalog yet when verify
    starts, and the writer seals while verify reads the checkpoint files (a
    verify that lists the segments twice meets a segment whose checkpoints it
    never read)."""
    log_dir = tmp_path / "log"
    writer = StoreWriter(_config(log_dir), key)
    try:
        _append(writer, 5)
        writer.checkpoint()
        read_checkpoints = verify_module._read_checkpoints

        def read_checkpoints_then_seal(*args: Any) -> Any:
            notes = read_checkpoints(*args)
            if len(layout.segment_numbers(_origin_dir(log_dir))) == 1:
                writer.seal()
            return notes

        monkeypatch.setattr(verify_module, "_read_checkpoints", read_checkpoints_then_seal)
        verify_log(log_dir, [key.verifier()])
        assert layout.segment_numbers(_origin_dir(log_dir)) == [1, 2]  # it did seal meanwhile
    finally:
        writer.close()


def test_verify_while_the_catalog_is_created(tmp_path: Path, key: SigningKey) -> None:
    """The first seal creates the catalog: ``Catalog()`` turns on WAL (which
    writes the file) before it creates its table.  A verify in between sees a
    database without the table; the log itself is fine."""
    log_dir = tmp_path / "log"
    writer = StoreWriter(_config(log_dir), key)
    _append(writer, 5)
    writer.close()
    db = sqlite3.connect(log_dir / layout.CATALOG_FILE)
    try:
        db.execute("PRAGMA journal_mode=WAL")  # what Catalog.__init__ does first
        verify_log(log_dir, [key.verifier()])
    finally:
        db.close()


# -- 7. one writer per origin -------------------------------------------------------------


def test_second_writer_on_an_origin_is_refused(tmp_path: Path, key: SigningKey) -> None:
    """Two proxies writing one origin would interleave frames and fork the
    tree; the second must be stopped, told which origin, and leave the first
    undisturbed."""
    config = _config(tmp_path / "log")
    first = StoreWriter(config, key)
    try:
        _append(first, 3)
        with pytest.raises(StoreError, match=re.escape(repr(ORIGIN))):
            StoreWriter(config, key)
        _append(first, 3)
    finally:
        first.close()
    again = StoreWriter(config, key)  # the lock goes with the writer holding it
    again.close()
    report = _verify(tmp_path / "log", key)
    assert (report.records, report.unsigned) == (6, 0)


# -- 8. a full disk ------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs, so that the disk fills up on demand."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=True)  # a file left open


def _fill(path: Path) -> None:
    """Write ``path`` until the file system has no room left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        chunk = b"\0" * 4096
        while True:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                return
    finally:
        os.close(fd)


def test_full_disk_leaves_nothing_behind(small_fs: Path, key: SigningKey) -> None:
    """A write that fails half-way must not leave half a batch in the segment
    (it would be cut as a torn tail at best, or break the tree at worst), nor
    use up sequence numbers; once there is room the same batch goes in."""
    log_dir = small_fs / "log"
    writer = StoreWriter(_config(log_dir), key)
    try:
        _append(writer, 5)
        writer.checkpoint()
        segment = _newest_segment(log_dir)
        before = segment.read_bytes()
        size, seq = writer.size, writer.seq
        records = _batch(seq + 1, 40, pad=300)  # several pages: more than any page's slack
        filler = small_fs / "filler"
        _fill(filler)
        with pytest.raises(StoreError, match="ENOSPC"):
            writer.append(records)
        assert segment.read_bytes() == before
        assert (writer.size, writer.seq) == (size, seq)
        filler.unlink()
        writer.append(records)
        assert (writer.size, writer.seq) == (size + 40, seq + 40)
        writer.checkpoint()
    finally:
        writer.close()
    report = _verify(log_dir, key)
    assert (report.records, report.unsigned) == (45, 0)
    assert [record["seq"] for record in _read_back(log_dir)] == list(range(1, 46))
