"""Tampering with a stored audit log: ``scalple verify`` must notice, and say where.

The store's promise (scalple/store/verify.py) is that whoever can write the
log directory but does not hold the signing key cannot change, drop, add or
reorder a signed record without ``verify_log`` raising a Violation that names
the segment and the record.  Each test here builds a fresh multi-segment log
with the real writer, shows that it verifies, damages it the way an attacker
(or a careless restore) would, and checks both that the damage is found and
that the message points at the right place and says what kind of damage it
is: an investigation starts from that message.

Two limits are shown rather than hidden: records after the newest checkpoint
are not signed yet (verify counts them as unsigned), and an attacker who rolls
the newest segment back to one of its own earlier checkpoints is caught only
by a checkpoint kept elsewhere (the mirror); the tests pass such a copy as a
witness.  The catalog is unsigned, so what it alone catches (a sealed file
rewritten where no tree head looks, segments deleted from either end) holds
only against someone who does not also edit it.
"""

from __future__ import annotations

import base64
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import blake3
import msgspec
import pytest

from scalple.config import LogConfig
from scalple.records import (
    SessionRecord,
    StatementRecord,
    decode_record,
    encode_record,
    rfc3339,
)
from scalple.store import layout
from scalple.store import verify as store_verify
from scalple.store.catalog import Catalog, SegmentEntry
from scalple.store.checkpoint import frame_note, open_checkpoint, split_notes
from scalple.store.hashing import leaf_hash
from scalple.store.index import IndexBuilder, SegmentIndex, read_index
from scalple.store.keys import SigningKey, VerifierKey
from scalple.store.merkle import CompactRange
from scalple.store.proof import InclusionProof, ProofError, check_proof, prove
from scalple.store.segment import (
    MAGIC,
    Frame,
    SegmentHeader,
    frame,
    read_header,
    scan_frames,
)
from scalple.store.verify import OriginReport, Violation, verify_log
from scalple.store.writer import StoreWriter

ORIGIN = "test.example/audit"
SEQ_GAP = 1000  # sequence numbers a crashed writer had reserved and never used
SEALED = 4  # sealed segments in every test log, before the newest one
OLD = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)  # well past a 400-day retention


# -- building a log --------------------------------------------------------------


def statement(n: int, *, variant: str = "", ts: str | None = None) -> StatementRecord:
    """A realistic statement record: a person, a table, columns (the index has work)."""
    table = f"public.{variant}accounts_{n % 4}"
    return StatementRecord(
        ts=ts or rfc3339(time.time_ns()),
        session_user_id=f"{variant}user{n % 3}",
        session_email=f"{variant}user{n % 3}@example.com",
        identity_source="startup",
        identity_verified=n % 2 == 0,
        db_role="app_user",
        database="app",
        application_name="psql",
        client_addr="10.0.0.7",
        session_id=f"s-{n // 10}",
        statement_id=n,
        protocol="extended" if n % 2 else "simple",
        statement_class="READ",
        command="SELECT",
        query=f"select id, balance from {table} where id = $1 -- {n}",
        query_fingerprint="0f3c2a9e",
        params=[str(n)],
        affected_tables=[table],
        columns_accessed={table: ["balance", "id"]},
        rows=1,
        status="ok",
        sqlstate=None,
        duration_us=120 + n,
        in_transaction=False,
    )


def session(n: int, *, variant: str = "", ts: str | None = None) -> SessionRecord:
    """A session opening (the log holds both kinds of record)."""
    return SessionRecord(
        kind="session_open",
        ts=ts or rfc3339(time.time_ns()),
        session_id=f"s-{n // 10}",
        client_addr="10.0.0.7",
        db_role="app_user",
        database="app",
        application_name="psql",
        session_user_id=f"{variant}user{n % 3}",
        identity_source="startup",
        tls=True,
    )


@dataclass
class Log:
    """A log directory built by the real writer, and what the test knows about it."""

    dir: Path
    origin_dir: Path
    key: SigningKey
    log_ids: list[str]  # every record's log id, in tree order
    pubkey: Path  # the auditor's own copy of the public key

    @property
    def verifiers(self) -> list[VerifierKey]:
        return [self.key.verifier()]

    @property
    def size(self) -> int:
        return len(self.log_ids)

    def numbers(self) -> list[int]:
        return layout.segment_numbers(self.origin_dir)

    def seg(self, number: int) -> Path:
        return layout.segment_path(self.origin_dir, number)

    def ckpt(self, number: int) -> Path:
        return layout.checkpoints_path(self.origin_dir, number)

    def idx(self, number: int) -> Path:
        return layout.index_path(self.origin_dir, number)

    @property
    def checkpoint_file(self) -> Path:
        return self.origin_dir / layout.CHECKPOINT_FILE


def log_config(log_dir: Path, *, retention: str = "") -> LogConfig:
    return LogConfig(
        dir=str(log_dir),
        origin=ORIGIN,
        segment_size=4096,
        checkpoint_records=5,
        retention=retention,
    )


class Feeder:
    """Appends batches the way the audit worker does: append, fsync, tick."""

    def __init__(self, writer: StoreWriter, log_ids: list[str], variant: str) -> None:
        self.writer = writer
        self.log_ids = log_ids
        self.variant = variant
        self.n = len(log_ids)

    def batch(self, *, ts: str | None = None) -> None:
        n = self.n
        records: list[StatementRecord | SessionRecord] = [
            statement(n + i, variant=self.variant, ts=ts) for i in range(3)
        ]
        if n % 12 == 0:
            records[0] = session(n, variant=self.variant, ts=ts)
        self.writer.append(records)
        self.writer.sync()
        self.writer.tick(time.time_ns())
        self.n += len(records)
        self.log_ids.extend(str(r.log_id) for r in records)


def build_log(log_dir: Path, key: SigningKey, *, variant: str = "") -> Log:
    """Four sealed segments with several checkpoints each, then an open newest one
    holding records and checkpoints of its own; one writer restart in between
    leaves a gap in the sequence numbers, as a crash does."""
    config = log_config(log_dir)
    origin_dir = layout.origin_dir(log_dir, ORIGIN)
    log_ids: list[str] = []
    writer = StoreWriter(config, key)
    feeder = Feeder(writer, log_ids, variant)
    for _ in range(12):
        feeder.batch()
    writer.close()
    seq_file = origin_dir / layout.SEQ_FILE
    seq_file.write_text(f"{int(seq_file.read_text()) + SEQ_GAP}\n")
    writer = StoreWriter(config, key)
    feeder.writer = writer
    while len(layout.segment_numbers(origin_dir)) <= SEALED:
        feeder.batch()
    for _ in range(4):
        feeder.batch()
    writer.close()
    keys = log_dir / layout.KEYS_DIR
    keys.mkdir()
    (keys / "signing.pub").write_text(key.verifier().to_text() + "\n")
    pubkey = log_dir.parent / f"{log_dir.name}-auditor.pub"
    pubkey.write_text(key.verifier().to_text() + "\n")
    return Log(log_dir, origin_dir, key, log_ids, pubkey)


@pytest.fixture
def log(tmp_path: Path) -> Log:
    """A fresh log for each test, which it may damage at will."""
    built = build_log(tmp_path / "log", SigningKey.generate("test"))
    numbers = built.numbers()
    assert numbers == list(range(1, SEALED + 2))
    newest = signed_in(built, numbers[-1])
    assert len(newest) >= 3 and newest[-1] == built.size  # opening, more, final
    return built


# -- reading and rewriting what is stored -------------------------------------------


def frames(log: Log, number: int) -> tuple[SegmentHeader, bytes, list[Frame]]:
    """A segment's header, its header bytes and its frames."""
    data = log.seg(number).read_bytes()
    header, start = read_header(data, log.seg(number))
    return header, data[:start], list(scan_frames(data, start))


def write_frames(log: Log, number: int, items: Sequence[tuple[bytes, bytes]]) -> None:
    """Replace a segment's records with ``(payload, stored hash)`` pairs, well framed."""
    _, head, _ = frames(log, number)
    log.seg(number).write_bytes(head + b"".join(frame(p, d) for p, d in items))


def pairs(items: Sequence[Frame]) -> list[tuple[bytes, bytes]]:
    return [(item.payload, item.digest) for item in items]


def notes_of(log: Log, number: int) -> list[bytes]:
    notes, whole = split_notes(log.ckpt(number).read_bytes())
    assert whole == log.ckpt(number).stat().st_size
    return notes


def signed_in(log: Log, number: int) -> list[int]:
    """The tree sizes the checkpoints of one segment's .ckpt file sign."""
    return [open_checkpoint(n, log.verifiers).size for n in notes_of(log, number)]


def signed_sizes(log: Log) -> set[int]:
    return {size for number in log.numbers() for size in signed_in(log, number)}


def first_signed_after(log: Log, index: int) -> int:
    """The smallest signed tree size that includes record ``index``: where a
    change to that record must first show as a root mismatch."""
    return min(size for size in signed_sizes(log) if size > index)


def unsigned_pair(log: Log, number: int) -> int:
    """An ordinal ``k`` in segment ``number`` (not at either end) such that no
    checkpoint signs the tree ending at record ``k``: a change of ``k`` and
    ``k + 1`` is then first seen by the seq check, not a root."""
    header, _, items = frames(log, number)
    signed = signed_sizes(log)
    return next(k for k in range(2, len(items) - 2) if header.first_index + k + 1 not in signed)


def reencoded(payload: bytes, change: Callable[[StatementRecord | SessionRecord], None]) -> bytes:
    """The stored bytes of the record ``payload`` after ``change``: what someone
    who edits a record and re-hashes it would write."""
    record = decode_record(payload)
    change(record)
    return encode_record(record)


def seq_of(payload: bytes) -> int:
    return decode_record(payload).seq


def locate(log: Log, index: int) -> tuple[int, int]:
    """The segment and ordinal of leaf ``index``."""
    for number in log.numbers():
        header, _, items = frames(log, number)
        if header.first_index <= index < header.first_index + len(items):
            return number, index - header.first_index
    raise AssertionError(f"no record {index}")


def header_bytes(header: SegmentHeader) -> bytes:
    body = msgspec.msgpack.encode(header)
    return MAGIC + len(body).to_bytes(4, "little") + body


def catalog_rows(log: Log) -> dict[int, SegmentEntry]:
    catalog = Catalog(log.dir, readonly=True)
    try:
        return {e.number: e for e in catalog.entries(ORIGIN)}
    finally:
        catalog.close()


def update_catalog(log: Log, number: int, **columns: object) -> None:
    """Edit a catalog row by hand (it is an unsigned SQLite file)."""
    db = sqlite3.connect(log.dir / layout.CATALOG_FILE)
    try:
        with db:
            sets = ", ".join(f"{name} = ?" for name in columns)
            db.execute(
                f"UPDATE segments SET {sets} WHERE origin = ? AND number = ?",
                (*columns.values(), ORIGIN, number),
            )
    finally:
        db.close()


def intact(log: Log, *, witnesses: Sequence[bytes] = ()) -> OriginReport:
    """The log verifies: every test shows this before it damages anything."""
    (report,) = verify_log(log.dir, log.verifiers, witnesses=witnesses)
    return report


def violation(
    log: Log,
    *,
    verifiers: Sequence[VerifierKey] | None = None,
    witnesses: Sequence[bytes] = (),
) -> Violation:
    with pytest.raises(Violation) as caught:
        verify_log(log.dir, log.verifiers if verifiers is None else verifiers, witnesses=witnesses)
    assert caught.value.origin in (ORIGIN, "-")
    return caught.value


# -- 1. the intact log --------------------------------------------------------------


def test_intact_log_verifies(log: Log) -> None:
    """The baseline every other test relies on: the writer's own log passes,
    every record is counted, everything is signed, and many checkpoints were
    actually compared with the tree (not just read)."""
    report = intact(log, witnesses=[log.checkpoint_file.read_bytes()])
    assert report.origin == ORIGIN
    assert report.segments == SEALED + 1
    assert report.first_index == 0
    assert report.records == log.size
    assert report.signed_size == log.size
    assert report.unsigned == 0
    assert report.removed_segments == 0
    assert report.checkpoints >= 2 * SEALED
    assert report.checkpoints == len({s for s in signed_sizes(log) if s > 0})
    assert len(set(log.log_ids)) == log.size


# -- 2-6. records changed, removed, added, reordered ---------------------------------


def test_flipped_byte_in_a_sealed_record(log: Log) -> None:
    """A single changed byte in a record is found by its stored leaf hash, and
    the message gives the segment, the leaf index and the byte offset."""
    intact(log)
    header, _, items = frames(log, 2)
    target = items[5]
    data = bytearray(log.seg(2).read_bytes())
    data[target.offset + 4 + len(target.payload) // 2] ^= 0x01
    log.seg(2).write_bytes(bytes(data))

    found = violation(log)
    assert found.where == f"segment 2, record {header.first_index + 5} (byte {target.offset})"
    assert "do not hash to its stored leaf hash" in found.what


def test_modified_record_with_recomputed_hash(log: Log) -> None:
    """Someone who edits a record and stores its new leaf hash leaves a frame
    that checks out on its own; the signed checkpoint after it does not."""
    intact(log)
    header, _, items = frames(log, 2)
    k = 4
    original = decode_record(items[k].payload)
    assert isinstance(original, StatementRecord)

    def hide(record: StatementRecord | SessionRecord) -> None:
        record.session_user_id = "someone_else"
        if isinstance(record, StatementRecord):
            record.query = "select 1"

    forged = reencoded(items[k].payload, hide)
    edited = pairs(items)
    edited[k] = (forged, leaf_hash(forged))
    write_frames(log, 2, edited)
    assert all(item.intact for item in frames(log, 2)[2])  # the frames are consistent

    found = violation(log)
    size = first_signed_after(log, header.first_index + k)
    assert found.where.startswith(f"segment 2, record {size - 1} (byte ")
    assert found.where.endswith(f", seq {seq_of(items[size - 1 - header.first_index].payload)}")
    assert f"the tree of {size} records does not match its signed checkpoint" in found.what


def test_deleted_record(log: Log) -> None:
    """A whole frame cut out of a sealed segment leaves a well-formed file with
    increasing seqs (gaps are legal after a crash), so the tree must catch it."""
    intact(log)
    header, _, items = frames(log, 2)
    k = len(items) // 2
    write_frames(log, 2, pairs(items[:k] + items[k + 1 :]))

    found = violation(log)
    size = first_signed_after(log, header.first_index + k)
    assert found.where.startswith(f"segment 2, record {size - 1} (byte ")
    assert f"the tree of {size} records does not match its signed checkpoint" in found.what


def test_inserted_record_with_next_seq(log: Log) -> None:
    """An added record, well framed and correctly hashed, numbered right after
    the one before it, collides with the seq of the record that follows."""
    intact(log)
    header, _, items = frames(log, 3)
    k = unsigned_pair(log, 3)
    seq = seq_of(items[k].payload) + 1
    fake = statement(999)
    fake.seq = seq
    payload = encode_record(fake)
    write_frames(
        log, 3, [*pairs(items[: k + 1]), (payload, leaf_hash(payload)), *pairs(items[k + 1 :])]
    )

    found = violation(log)
    at = header.first_index + k + 2
    assert found.where.startswith(f"segment 3, record {at} (byte ")
    assert found.where.endswith(f", seq {seq}")
    assert found.what == f"seq not above {seq}: reordered or inserted"


def test_inserted_record_in_a_seq_gap(log: Log) -> None:
    """Where a crash left unused sequence numbers, an added record can carry a
    seq that fits between its neighbours; only the signed tree shows it."""
    intact(log)
    seqs = [seq_of(item.payload) for number in log.numbers() for item in frames(log, number)[2]]
    gap = next(i for i in range(1, len(seqs)) if seqs[i] - seqs[i - 1] > 1)
    assert seqs[gap] - seqs[gap - 1] > SEQ_GAP
    number, k = locate(log, gap)
    _, _, items = frames(log, number)
    fake = statement(999)
    fake.seq = seqs[gap - 1] + 1
    payload = encode_record(fake)
    write_frames(log, number, [*pairs(items[:k]), (payload, leaf_hash(payload)), *pairs(items[k:])])

    found = violation(log)
    size = first_signed_after(log, gap)
    assert found.where.startswith(f"segment {number}, record {size - 1} (byte ")
    assert f"the tree of {size} records does not match its signed checkpoint" in found.what


def test_swapped_records(log: Log) -> None:
    """Two neighbouring frames exchanged: their seqs now go down."""
    intact(log)
    header, _, items = frames(log, 3)
    k = unsigned_pair(log, 3)
    swapped = pairs(items)
    swapped[k], swapped[k + 1] = swapped[k + 1], swapped[k]
    write_frames(log, 3, swapped)

    found = violation(log)
    low, high = seq_of(items[k].payload), seq_of(items[k + 1].payload)
    assert found.where.startswith(f"segment 3, record {header.first_index + k + 1} (byte ")
    assert found.where.endswith(f", seq {low}")
    assert found.what == f"seq not above {high}: reordered or inserted"


def test_swapped_records_with_renumbered_seqs(log: Log) -> None:
    """Two records exchanged and given each other's seq (and re-hashed), so the
    seqs still rise: the signed tree still fixes their order."""
    intact(log)
    header, _, items = frames(log, 3)
    k = unsigned_pair(log, 3)
    first, second = items[k].payload, items[k + 1].payload
    seq_first, seq_second = seq_of(first), seq_of(second)

    def renumber(seq: int) -> Callable[[StatementRecord | SessionRecord], None]:
        def change(record: StatementRecord | SessionRecord) -> None:
            record.seq = seq

        return change

    new_first = reencoded(second, renumber(seq_first))
    new_second = reencoded(first, renumber(seq_second))
    edited = pairs(items)
    edited[k] = (new_first, leaf_hash(new_first))
    edited[k + 1] = (new_second, leaf_hash(new_second))
    write_frames(log, 3, edited)

    found = violation(log)
    size = first_signed_after(log, header.first_index + k)
    assert found.where.startswith(f"segment 3, record {size - 1} (byte ")
    assert f"the tree of {size} records does not match its signed checkpoint" in found.what


# -- 7. records cut from the end -------------------------------------------------------


def test_newest_segment_truncated_below_its_checkpoint(log: Log) -> None:
    """Whole frames cut from the newest segment leave a well-formed file (it
    could be a crash), but a checkpoint signs more than is left."""
    intact(log)
    newest = log.numbers()[-1]
    header, _, items = frames(log, newest)
    write_frames(log, newest, pairs(items[:3]))

    found = violation(log)
    kept = header.first_index + 3
    assert found.where == f"segment {newest}"
    assert found.what == (
        f"holds records up to {kept} but a checkpoint signs {log.size}: "
        "records were cut from the end"
    )


def test_truncation_with_checkpoints_rolled_back_needs_a_witness(log: Log) -> None:
    """Cut back to one of its own earlier checkpoints, with the later notes
    dropped, the newest segment is consistent again: nothing in the directory
    can tell.  A checkpoint kept elsewhere (the mirror) signs more than the
    log holds, and that is what catches it."""
    mirror = log.checkpoint_file.read_bytes()
    intact(log, witnesses=[mirror])
    newest = log.numbers()[-1]
    header, _, items = frames(log, newest)
    notes = notes_of(log, newest)
    back_to = signed_in(log, newest)[1]  # a checkpoint inside the segment, not its opening
    assert header.first_index < back_to < log.size
    write_frames(log, newest, pairs(items[: back_to - header.first_index]))
    kept_notes = notes[:2]
    log.ckpt(newest).write_bytes(b"".join(frame_note(n) for n in kept_notes))
    log.checkpoint_file.write_bytes(kept_notes[-1])

    report = intact(log)  # the limit of a log checked alone
    assert report.signed_size == back_to

    found = violation(log, witnesses=[mirror])
    assert found.where == "given checkpoint"
    assert found.what == (
        f"signs {log.size} records but the log holds {back_to}: records were removed from its end"
    )


def test_record_appended_after_the_newest_checkpoint_is_reported_unsigned(log: Log) -> None:
    """A limit, made visible: a well-formed record added after the newest
    checkpoint is indistinguishable from one the writer had not signed yet
    (a crash leaves such records).  verify passes but counts it as unsigned,
    which on a cleanly stopped log (its writer signs everything on close)
    is itself the finding."""
    assert intact(log).unsigned == 0
    newest = log.numbers()[-1]
    _, _, items = frames(log, newest)
    fake = statement(999)
    fake.seq = seq_of(items[-1].payload) + 1
    payload = encode_record(fake)
    write_frames(log, newest, [*pairs(items), (payload, leaf_hash(payload))])

    report = intact(log, witnesses=[log.checkpoint_file.read_bytes()])
    assert report.unsigned == 1
    assert report.records == log.size + 1
    assert report.signed_size == log.size


def test_sealed_segments_removed_from_the_end(log: Log) -> None:
    """The newest segments deleted whole and the latest checkpoint rolled back
    to the last one left: the catalog still lists the sealed segment that is
    gone, and a mirrored checkpoint signs more than is left."""
    mirror = log.checkpoint_file.read_bytes()
    intact(log)
    numbers = log.numbers()
    for number in numbers[-2:]:
        for path in (log.seg(number), log.ckpt(number), log.idx(number)):
            path.unlink(missing_ok=True)
    left = numbers[-3]
    log.checkpoint_file.write_bytes(notes_of(log, left)[-1])

    found = violation(log)
    assert found.where == f"segment {numbers[-2]}"
    assert "the catalog lists it as sealed" in found.what
    assert "cut from the end" in found.what

    # The catalog is unsigned: with its rows deleted too, only the mirror can tell.
    db = sqlite3.connect(log.dir / layout.CATALOG_FILE)
    with db:
        db.execute("DELETE FROM segments WHERE number >= ?", (numbers[-2],))
    db.close()
    header, _, items = frames(log, left)
    kept = header.first_index + len(items)
    assert intact(log).signed_size == kept
    found = violation(log, witnesses=[mirror])
    assert found.where == "given checkpoint"
    assert found.what == (
        f"signs {log.size} records but the log holds {kept}: records were removed from its end"
    )


# -- 8. a segment from another log ------------------------------------------------------


@pytest.mark.parametrize("same_key", [True, False], ids=["same-key", "other-key"])
@pytest.mark.parametrize("files", ["seg", "seg+ckpt+idx"])
def test_segment_replaced_by_another_logs(
    log: Log, tmp_path: Path, same_key: bool, files: str
) -> None:
    """A segment swapped for the same-numbered one of another log of the same
    origin, built the same way (same record count and sizes, so the numbers
    line up): with only the .seg replaced the chain of tree heads breaks; with
    its checkpoints too, they contradict this log's (same key) or do not
    verify (other key)."""
    intact(log)
    key = log.key if same_key else SigningKey.generate("test")
    other = build_log(tmp_path / "other", key, variant="x")
    assert frames(other, 2)[0].first_index == frames(log, 2)[0].first_index
    replaced = [log.seg] if files == "seg" else [log.seg, log.ckpt, log.idx]
    sources = {log.seg: other.seg, log.ckpt: other.ckpt, log.idx: other.idx}
    for target in replaced:
        target(2).write_bytes(sources[target](2).read_bytes())

    found = violation(log)
    start = frames(log, 2)[0].first_index
    if files == "seg":
        assert found.where == "segment 2"
        assert found.what.startswith(
            f"starts at record {start} with another tree than segment 1 ends with"
        )
        assert "segments were replaced, inserted or removed" in found.what
    elif same_key:
        assert found.where == "segment 2 checkpoints, entry 1"
        assert found.what == f"two signed checkpoints of size {start} with different roots"
    else:
        assert found.where == "segment 2 checkpoints, entry 1"
        assert found.what.startswith("checkpoint does not verify: no signature by a known key")


def test_first_segment_replaced_by_another_logs(log: Log, tmp_path: Path) -> None:
    """Segment 1 has no predecessor to chain to (every log starts from the same
    empty tree), so a replaced first segment must be caught by the checkpoints."""
    intact(log)
    other = build_log(tmp_path / "other", log.key, variant="x")
    log.seg(1).write_bytes(other.seg(1).read_bytes())

    found = violation(log)
    size = first_signed_after(log, 0)
    assert found.where.startswith(f"segment 1, record {size - 1} (byte ")
    assert f"the tree of {size} records does not match its signed checkpoint" in found.what


# -- 9. the whole log rewritten without the key ----------------------------------------


def test_whole_log_rewritten_with_another_key(log: Log, tmp_path: Path) -> None:
    """An attacker without the key rebuilds the entire directory with altered
    records and a key of the same name, its public key left in keys/.  The
    auditor's own copy of the public key rejects every checkpoint; a
    checkpoint kept by the mirror rejects the rewrite even for an auditor who
    (wrongly) also trusts the key found in the directory."""
    mirror = log.checkpoint_file.read_bytes()
    intact(log, witnesses=[mirror])
    real = log.key.verifier()
    attacker_key = SigningKey.generate("test")
    assert attacker_key.verifier().key_id != real.key_id
    staging = build_log(tmp_path / "forged", attacker_key, variant="x")
    assert staging.size == log.size
    shutil.rmtree(log.dir)
    shutil.copytree(staging.dir, log.dir)
    found_key = VerifierKey.load(log.dir / layout.KEYS_DIR / "signing.pub")
    assert found_key == attacker_key.verifier()
    assert verify_log(log.dir, [found_key])[0].records == log.size  # fooled alone

    # Route 1: the real public key, held by the auditor.
    found = violation(log, verifiers=[real])
    assert found.where == "segment 1 checkpoints, entry 1"
    assert found.what.startswith("checkpoint does not verify: no signature by a known key")
    assert f"test+{attacker_key.key_id.hex()}" in found.what
    found = violation(log, verifiers=[real], witnesses=[mirror])
    assert found.where == "segment 1 checkpoints, entry 1"

    # Route 2: the mirrored checkpoint, against the key found beside the log.
    found = violation(log, verifiers=[found_key], witnesses=[mirror])
    assert found.where == "given checkpoint"
    assert found.what.startswith("does not verify: no signature by a known key")

    # Both keys trusted: every signature checks, but the trees differ.
    found = violation(log, verifiers=[found_key, real], witnesses=[mirror])
    assert found.where == "given checkpoint"
    assert found.what == (
        f"the log's tree of size {log.size} has another root: the log was rewritten"
    )


# -- 10. indexes and the catalog ---------------------------------------------------------


def _rewrite_index(log: Log, number: int, change: Callable[[SegmentIndex], None]) -> bytes:
    original = log.idx(number).read_bytes()
    index = read_index(log.idx(number))
    assert msgspec.msgpack.encode(index) == original  # re-encoding alone changes nothing
    change(index)
    data = msgspec.msgpack.encode(index)
    log.idx(number).write_bytes(data)
    return data


def test_index_entry_removed(log: Log) -> None:
    """A posting dropped from a sealed segment's index (hiding that a person
    touched a table from searches) no longer matches the records."""
    intact(log)

    def drop(index: SegmentIndex) -> None:
        user = sorted(index.users)[0]
        assert len(index.users[user]) > 1
        index.users[user].pop(1)

    _rewrite_index(log, 2, drop)
    found = violation(log)
    assert found.where == "segment 2 index"
    assert found.what == "does not match the records: an entry was removed or added"


def test_index_entry_removed_and_catalog_digest_updated(log: Log) -> None:
    """Fixing the catalog's digest after editing the index does not help:
    the index is checked against the records themselves."""
    intact(log)

    def drop(index: SegmentIndex) -> None:
        del index.tables[sorted(index.tables)[0]]

    data = _rewrite_index(log, 3, drop)
    update_catalog(log, 3, index_digest=blake3.blake3(data).hexdigest())
    found = violation(log)
    assert found.where == "segment 3 index"
    assert found.what == "does not match the records: an entry was removed or added"


def test_index_replaced_by_an_equal_encoding(log: Log) -> None:
    """An index rewritten with the same postings in another order decodes
    equal to the records' own, so only the catalog's digest shows the file
    is not the one written at seal."""
    intact(log)

    def reorder(index: SegmentIndex) -> None:
        index.users = dict(reversed(index.users.items()))

    _rewrite_index(log, 2, reorder)
    found = violation(log)
    assert found.where == "segment 2 catalog"
    assert found.what == "index digest differs: the index was replaced"


def test_catalog_index_digest_altered(log: Log) -> None:
    """The other direction: the catalog row edited, the index untouched."""
    intact(log)
    update_catalog(log, 1, index_digest="00" * 32)
    found = violation(log)
    assert found.where == "segment 1 catalog"
    assert found.what == "index digest differs: the index was replaced"


def test_sealed_segment_header_rewritten(log: Log) -> None:
    """A header field no tree head covers (its creation time) rewritten in a
    sealed segment: the catalog's digest of the sealed file catches it."""
    intact(log)
    header, head, items = frames(log, 2)
    changed = msgspec.structs.replace(header, created_ns=header.created_ns - 10**12)
    data = header_bytes(changed)
    assert len(data) == len(head)
    log.seg(2).write_bytes(data + b"".join(frame(p, d) for p, d in pairs(items)))

    found = violation(log)
    assert found.where == "segment 2 catalog"
    assert found.what == "segment digest differs: the file was replaced"


@pytest.mark.parametrize("number", [1, 3])
def test_segment_header_with_an_impossible_start(log: Log, number: int) -> None:
    """A header whose first index does not fit its start hashes is damage to
    report (by verify, and by prove, which reads the oldest header), not a
    crash with a traceback."""
    intact(log)
    header, _, items = frames(log, number)
    size = header.first_index + 1
    while size.bit_count() == len(header.start_hashes):
        size += 1
    changed = msgspec.structs.replace(header, first_index=size)
    body = b"".join(frame(p, d) for p, d in pairs(items))
    log.seg(number).write_bytes(header_bytes(changed) + body)

    found = violation(log)
    assert found.where == f"segment {number}"
    assert found.what.startswith("impossible header start: a tree of ")
    if number == 1:
        with pytest.raises(ProofError, match="impossible header start"):
            prove(log.dir, log.log_ids[0], log.verifiers)


def test_no_catalog_row_for_a_sealed_segment(log: Log) -> None:
    """A sealed segment the catalog does not know was not sealed by the writer."""
    intact(log)
    db = sqlite3.connect(log.dir / layout.CATALOG_FILE)
    with db:
        db.execute("DELETE FROM segments WHERE number = 3")
    db.close()
    found = violation(log)
    assert found.where == "segment 3 catalog"
    assert found.what == "no catalog row for a sealed segment"


# -- 11. checkpoints, missing segments ----------------------------------------------------


def _break_signature(note: bytes) -> bytes:
    """The note with one character of its signature changed (still valid base64)."""
    text, _, signature = note.rstrip(b"\n").rpartition(b" ")
    position = len(signature) // 2
    replacement = b"B" if signature[position : position + 1] != b"B" else b"C"
    broken = signature[:position] + replacement + signature[position + 1 :]
    base64.b64decode(broken, validate=True)
    return text + b" " + broken + b"\n"


def test_checkpoint_signature_corrupted(log: Log) -> None:
    """One signature in a segment's checkpoint file no longer verifies."""
    intact(log)
    notes = notes_of(log, 3)
    notes[1] = _break_signature(notes[1])
    log.ckpt(3).write_bytes(b"".join(frame_note(n) for n in notes))

    found = violation(log)
    assert found.where == "segment 3 checkpoints, entry 2"
    assert found.what.startswith(
        f"checkpoint does not verify: bad signature from test+{log.key.key_id.hex()}"
    )


def test_latest_checkpoint_signature_corrupted(log: Log) -> None:
    """The ``checkpoint`` file (what the mirror and provers read) is checked too."""
    intact(log)
    log.checkpoint_file.write_bytes(_break_signature(log.checkpoint_file.read_bytes()))
    found = violation(log)
    assert found.where == "checkpoint file"
    assert found.what.startswith("checkpoint does not verify: bad signature")


def test_checkpoint_text_changed(log: Log) -> None:
    """A checkpoint's size edited under its signature: the signature covers it."""
    intact(log)
    notes = notes_of(log, 2)
    size = signed_in(log, 2)[1]
    notes[1] = notes[1].replace(f"\n{size}\n".encode(), f"\n{size - 1}\n".encode(), 1)
    log.ckpt(2).write_bytes(b"".join(frame_note(n) for n in notes))
    found = violation(log)
    assert found.where == "segment 2 checkpoints, entry 2"
    assert found.what.startswith("checkpoint does not verify: bad signature")


def test_segment_missing_in_the_middle(log: Log) -> None:
    """A sealed segment deleted between two kept ones, with its companions."""
    intact(log)
    for path in (log.seg(3), log.ckpt(3), log.idx(3)):
        path.unlink()
    found = violation(log)
    assert found.where == "segment 3"
    assert found.what == "missing between kept segments"


def test_segment_file_missing_but_checkpoints_kept(log: Log) -> None:
    """Only the .seg of a middle segment deleted."""
    intact(log)
    log.seg(2).unlink()
    found = violation(log)
    assert found.where == "segment 2"
    assert found.what == "missing between kept segments"


def test_checkpoint_file_of_a_segment_missing(log: Log) -> None:
    """A segment without its .ckpt has no opening checkpoint to start from."""
    intact(log)
    log.ckpt(2).unlink()
    found = violation(log)
    assert found.where == "segment 2 checkpoints"
    assert found.what == f"{log.ckpt(2).name} is missing"


def test_first_segment_deleted_without_retention(log: Log) -> None:
    """The oldest segment removed by hand: the catalog does not say retention
    removed it, so the log's first records are missing."""
    intact(log)
    for path in (log.seg(1), log.ckpt(1), log.idx(1)):
        path.unlink()
    found = violation(log)
    assert found.where == "segment 1"
    assert found.what == "missing, and the catalog does not say retention removed it"


def cut_front(log: Log, number: int, records: int, *, catalog: bool = True) -> int:
    """Cut the first ``records`` records of a segment the way someone without
    the key would hide them: the header rewritten to start after them (its
    compact range is computable from the stored leaf hashes), the opening
    checkpoint dropped so that a genuine later one opens the segment, the
    index rebuilt and (with ``catalog``) the catalog row made to match.
    Returns the segment's new first index."""
    header, _, items = frames(log, number)
    start = CompactRange(header.first_index, header.start_hashes)
    for item in items[:records]:
        start.append(item.digest)
    opening = signed_in(log, number).index(start.size)  # a genuine checkpoint signs it
    changed = msgspec.structs.replace(
        header, first_index=start.size, start_hashes=list(start.hashes)
    )
    data = header_bytes(changed) + b"".join(frame(p, d) for p, d in pairs(items[records:]))
    log.seg(number).write_bytes(data)
    notes = notes_of(log, number)[opening:]
    log.ckpt(number).write_bytes(b"".join(frame_note(n) for n in notes))
    builder = IndexBuilder(ORIGIN, number, start.size)
    for item in items[records:]:
        builder.add(decode_record(item.payload))
    index = builder.encode()
    log.idx(number).write_bytes(index)
    if catalog:
        update_catalog(
            log,
            number,
            first_index=start.size,
            count=len(items) - records,
            segment_digest=blake3.blake3(data).hexdigest(),
            index_digest=blake3.blake3(index).hexdigest(),
        )
    return start.size


def test_first_records_cut_from_the_first_segment(log: Log) -> None:
    """The log's first records cut from segment 1 with everything around them
    made consistent (see cut_front): only the rule that the log's first
    segment starts at record 0 is left to catch it, and it does."""
    intact(log)
    cut = next(size for size in signed_in(log, 1) if size > 0)
    assert cut_front(log, 1, cut) == cut

    found = violation(log)
    assert found.where == "segment 1"
    assert found.what == f"starts at record {cut}, not 0: the log's first records were removed"


def renumber(log: Log, delta: int) -> None:
    """Every segment's files, header and postings renumbered by ``delta`` (< 0)."""
    assert delta < 0
    for number in log.numbers():
        header, _, items = frames(log, number)
        changed = msgspec.structs.replace(header, number=number + delta)
        target = layout.segment_path(log.origin_dir, number + delta)
        target.write_bytes(header_bytes(changed) + b"".join(frame(p, d) for p, d in pairs(items)))
        log.seg(number).unlink()
        log.ckpt(number).rename(layout.checkpoints_path(log.origin_dir, number + delta))
        if log.idx(number).exists():  # postings name their segment: rebuilt too
            index = read_index(log.idx(number))
            index.segment = number + delta
            layout.index_path(log.origin_dir, number + delta).write_bytes(
                msgspec.msgpack.encode(index)
            )
            log.idx(number).unlink()


def test_first_records_cut_and_segments_renumbered(log: Log) -> None:
    """The same cut, with the catalog deleted and the segments renumbered from
    0 so that none is "segment 1" any more: numbering starts at 1."""
    intact(log)
    cut = next(size for size in signed_in(log, 1) if size > 0)
    for path in log.dir.glob(layout.CATALOG_FILE + "*"):
        path.unlink()
    cut_front(log, 1, cut, catalog=False)
    renumber(log, -1)
    assert log.numbers()[0] == 0

    found = violation(log)
    assert found.where == "segment 0"
    assert found.what == "segments are numbered from 1"


# -- 12. retention -------------------------------------------------------------------------


@dataclass
class Retained:
    log: Log
    old: int  # records with 2024 timestamps, all in removed segments
    removed: list[int]


def build_retained(log_dir: Path) -> Retained:
    """A log kept for 400 days whose first segments hold records from 2024:
    sealing applies retention, which removes them whole."""
    key = SigningKey.generate("test")
    config = log_config(log_dir, retention="400d")
    origin_dir = layout.origin_dir(log_dir, ORIGIN)
    log_ids: list[str] = []
    writer = StoreWriter(config, key)
    feeder = Feeder(writer, log_ids, "")
    moment = int(OLD.timestamp() * 1e9)
    while layout.segment_numbers(origin_dir)[0] < 3:
        feeder.batch(ts=rfc3339(moment))
        moment += 1_000_000_000
    old = len(log_ids)
    while layout.segment_numbers(origin_dir)[-1] < 6:
        feeder.batch()
    for _ in range(3):
        feeder.batch()
    writer.close()
    pubkey = log_dir.parent / "retained-auditor.pub"
    pubkey.write_text(key.verifier().to_text() + "\n")
    return Retained(Log(log_dir, origin_dir, key, log_ids, pubkey), old, [1, 2])


@pytest.fixture
def retained(tmp_path: Path) -> Retained:
    return build_retained(tmp_path / "log")


def test_retention_removes_old_segments_and_still_verifies(retained: Retained) -> None:
    """Old segments go whole, the catalog says so, and what is left verifies
    from its own opening checkpoint."""
    log = retained.log
    for number in retained.removed:
        assert not log.seg(number).exists()
        assert not log.ckpt(number).exists()
        assert not log.idx(number).exists()
    rows = catalog_rows(log)
    assert all(rows[n].removed_ns is not None for n in retained.removed)
    assert all(rows[n].removed_ns is None for n in rows if n not in retained.removed)
    kept = log.numbers()
    assert kept[0] == 3
    assert frames(log, 3)[0].first_index == retained.old

    report = intact(log, witnesses=[log.checkpoint_file.read_bytes()])
    assert report.removed_segments == len(retained.removed)
    assert report.first_index == retained.old > 0
    assert report.records == log.size - retained.old
    assert report.signed_size == log.size


def test_oldest_kept_segment_deleted_after_retention(retained: Retained) -> None:
    """Retention may only remove what the catalog records as removed; the
    oldest kept segment deleted by hand is not that."""
    log = retained.log
    intact(log)
    oldest = log.numbers()[0]
    for path in (log.seg(oldest), log.ckpt(oldest), log.idx(oldest)):
        path.unlink()
    found = violation(log)
    assert found.where == f"segment {oldest}"
    assert found.what == "missing, and the catalog does not say retention removed it"


def test_oldest_kept_segment_shortened_after_retention(retained: Retained) -> None:
    """After retention the first kept segment may start above record 0, but
    only where the segment retention removed last ended: its first records
    cut (see cut_front) look like more retention, and are not."""
    log = retained.log
    intact(log)
    oldest = log.numbers()[0]
    header = frames(log, oldest)[0]
    ended = header.first_index
    # The first signed size inside the segment (its opening checkpoint, and a
    # retention checkpoint signed when it was newest, sign its first index).
    cut = next(size for size in signed_in(log, oldest) if size > header.first_index)
    cut -= header.first_index
    start = cut_front(log, oldest, cut)

    found = violation(log)
    assert found.where == f"segment {oldest}"
    assert found.what == (
        f"starts at record {start} but segment {oldest - 1}, removed by retention, "
        f"ended at record {ended}: records were removed"
    )


# -- 13. inclusion proofs --------------------------------------------------------------------


def test_proofs_of_first_middle_and_last_record(log: Log) -> None:
    """A proof made from the log is checked with nothing but the public key,
    and returns the very record that was written."""
    intact(log)
    for position in (0, log.size // 2, log.size - 1):
        log_id = log.log_ids[position]
        proof = prove(log.dir, log_id, log.verifiers)
        assert proof.log_id == log_id
        assert proof.leaf_index == position
        assert proof.tree_size == log.size
        record = check_proof(proof, log.verifiers)
        assert record["log_id"] == log_id
        assert record["seq"] == seq_of(base64.b64decode(proof.record))


def test_proof_after_retention(retained: Retained) -> None:
    """Records kept after retention are still provable: the removed prefix
    survives as the oldest kept segment's start hashes.  Removed ones are not."""
    log = retained.log
    for position in (retained.old, retained.old + 1, log.size - 1):
        proof = prove(log.dir, log.log_ids[position], log.verifiers)
        assert proof.leaf_index == position
        assert check_proof(proof, log.verifiers)["log_id"] == log.log_ids[position]
    with pytest.raises(ProofError, match="no record"):
        prove(log.dir, log.log_ids[0], log.verifiers)


def _forge_record(proof: InclusionProof) -> None:
    payload = bytearray(base64.b64decode(proof.record))
    payload[len(payload) // 2] ^= 0x01
    proof.record = base64.b64encode(bytes(payload)).decode()


def _forge_record_and_hash(proof: InclusionProof) -> None:
    _forge_record(proof)
    proof.leaf_hash = leaf_hash(base64.b64decode(proof.record)).hex()


def _forge_path(proof: InclusionProof) -> None:
    node = bytearray(bytes.fromhex(proof.audit_path[1]))
    node[0] ^= 0x80
    proof.audit_path[1] = node.hex()


def _forge_index(proof: InclusionProof) -> None:
    proof.leaf_index += 1


def _forge_tree_size(proof: InclusionProof) -> None:
    proof.tree_size -= 1


def _forge_signature(proof: InclusionProof) -> None:
    proof.checkpoint = _break_signature(proof.checkpoint.encode()).decode()


def _forge_checkpoint_size(proof: InclusionProof) -> None:
    size = proof.tree_size
    proof.checkpoint = proof.checkpoint.replace(f"\n{size}\n", f"\n{size + 1}\n", 1)
    proof.tree_size = size + 1


def _forge_log_id(proof: InclusionProof) -> None:
    proof.log_id = "immutable-" + "0" * 16


def _forge_origin(proof: InclusionProof) -> None:
    proof.origin = "other.example/audit"


@pytest.mark.parametrize(
    ("forge", "message"),
    [
        pytest.param(_forge_record, "do not hash to leaf_hash", id="record"),
        pytest.param(_forge_record_and_hash, "does not lead to", id="record-and-leaf-hash"),
        pytest.param(_forge_path, "does not lead to the checkpoint's root", id="audit-path"),
        pytest.param(_forge_index, "does not lead to the checkpoint's root", id="leaf-index"),
        pytest.param(_forge_tree_size, "but the checkpoint signs", id="tree-size"),
        pytest.param(_forge_signature, "does not verify: bad signature", id="signature"),
        pytest.param(_forge_checkpoint_size, "does not verify: bad signature", id="ckpt-size"),
        pytest.param(_forge_log_id, "is not the proved record's id", id="log-id"),
        pytest.param(_forge_origin, "but the checkpoint is for", id="origin"),
    ],
)
def test_tampered_proof(log: Log, forge: Callable[[InclusionProof], None], message: str) -> None:
    """Every part of a proof is load-bearing: changing any one of them, the
    claims printed to the auditor included, makes it fail."""
    proof = prove(log.dir, log.log_ids[log.size // 3], log.verifiers)
    check_proof(proof, log.verifiers)
    forged = msgspec.json.decode(msgspec.json.encode(proof), type=InclusionProof)
    forge(forged)
    assert forged != proof
    with pytest.raises(ProofError, match=message):
        check_proof(forged, log.verifiers)


def test_proof_checked_with_another_key(log: Log) -> None:
    """A proof is only as good as the key it is checked with."""
    proof = prove(log.dir, log.log_ids[0], log.verifiers)
    with pytest.raises(ProofError, match="no signature by a known key"):
        check_proof(proof, [SigningKey.generate("test").verifier()])


# -- a live log ---------------------------------------------------------------------------


def test_segment_sealed_while_verifying(log: Log, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not tampering, the opposite: verify runs on a live log, so a seal and
    records in the next segment while it reads must not look like damage.
    The writer is driven from inside verify, right after it has read the
    newest segment's checkpoints."""
    numbers = log.numbers()
    before = log.size
    writer = StoreWriter(log_config(log.dir), log.key)
    feeder = Feeder(writer, log.log_ids, "")
    real = store_verify._read_checkpoints

    def read_then_write(directory: Path, number: int, *args: Any) -> Any:
        result = real(directory, number, *args)
        if number == numbers[-1]:
            feeder.batch()
            writer.seal()
            feeder.batch()
            writer.checkpoint()
        return result

    monkeypatch.setattr(store_verify, "_read_checkpoints", read_then_write)
    try:
        report = intact(log)
    finally:
        writer.close()
    assert report.segments == len(numbers)  # the ones listed when it began
    assert report.records == before + 3  # the newest listed, read after its seal
    assert report.signed_size == before
    monkeypatch.undo()
    assert intact(log).records == log.size


# -- the command line, end to end ---------------------------------------------------------


def scalple(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scalple", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_prove_verify_proof_and_verify(log: Log, tmp_path: Path) -> None:
    """What an auditor runs: prove a record, check the proof, verify the log
    (text and JSON), then the same log tampered with."""
    pub = str(log.pubkey)
    log_id = log.log_ids[7]
    proved = scalple("prove", log_id, "--log-dir", str(log.dir), "--pubkey", pub)
    assert proved.returncode == 0, proved.stderr
    proof_file = tmp_path / "proof.json"
    proof_file.write_text(proved.stdout)
    assert json.loads(proved.stdout)["log_id"] == log_id

    checked = scalple("verify-proof", str(proof_file), "--pubkey", pub)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.startswith(f"OK {log_id} ")

    ok = scalple("verify", "--log-dir", str(log.dir), "--pubkey", pub)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith(f"OK {ORIGIN}: {log.size} records in {SEALED + 1} segments")
    ok_json = scalple("verify", "--log-dir", str(log.dir), "--pubkey", pub, "--json")
    assert ok_json.returncode == 0
    result = json.loads(ok_json.stdout)
    assert result["ok"] is True
    assert result["origins"][0]["records"] == log.size

    header, _, items = frames(log, 2)
    data = bytearray(log.seg(2).read_bytes())
    data[items[3].offset + 10] ^= 0x01
    log.seg(2).write_bytes(bytes(data))
    bad = scalple("verify", "--log-dir", str(log.dir), "--pubkey", pub)
    assert bad.returncode == 1
    assert bad.stdout.startswith(
        f"VIOLATION {ORIGIN}: segment 2, record {header.first_index + 3} (byte {items[3].offset})"
    )
    bad_json = scalple("verify", "--log-dir", str(log.dir), "--pubkey", pub, "--json")
    assert bad_json.returncode == 1
    failure = json.loads(bad_json.stdout)
    assert failure["ok"] is False
    assert failure["where"].startswith("segment 2, record ")
    assert "stored leaf hash" in failure["what"]


def test_oldest_segments_removed_as_if_by_retention_without_the_key(log: Log) -> None:
    """Someone without the key deletes the oldest segments and marks them
    removed in the catalog (which is not signed): only the log's own signed
    checkpoints can say from which record retention kept it, and none does."""
    intact(log)
    numbers = log.numbers()
    for number in numbers[:2]:
        for path in (log.seg(number), log.idx(number), log.ckpt(number)):
            path.unlink(missing_ok=True)
    db = sqlite3.connect(log.dir / layout.CATALOG_FILE)
    with db:
        db.execute(
            "UPDATE segments SET removed_ns = 1 WHERE number IN (?, ?)", (numbers[0], numbers[1])
        )
    db.close()
    found = violation(log)
    assert found.where == f"segment {numbers[2]}"
    assert "no signed checkpoint says retention removed records before it" in found.what
