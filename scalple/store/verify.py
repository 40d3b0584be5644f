"""Checking a whole log: every byte, every root, every signature, every index.

``verify_log`` re-reads an origin's segments from the oldest kept one,
re-hashes every stored record, rebuilds the tree and compares its root with
every signed checkpoint at that size; it checks the checkpoints' signatures,
the segment headers' chaining, the sealed segments' postings and catalog
digests.  It stops at the first violation and names it (origin, segment,
byte offset or seq, what), because the first is where an investigation
starts.  Nothing here trusts the writer's own bookkeeping.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

import blake3
import msgspec

from scalple.records import decode_record
from scalple.store import layout
from scalple.store.catalog import Catalog, SegmentEntry
from scalple.store.checkpoint import Checkpoint, CheckpointError, open_checkpoint, split_notes
from scalple.store.index import IndexBuilder, read_index
from scalple.store.keys import VerifierKey
from scalple.store.merkle import CompactRange
from scalple.store.segment import (
    SegmentError,
    frame_end,
    read_file_header,
    read_header,
    scan_frames,
)
from scalple.store.writer import RETENTION_EXTENSION

__all__ = ["OriginReport", "Violation", "verify_log", "verify_origin"]


class Violation(Exception):
    """The log is not intact; the message says where and what."""

    def __init__(self, origin: str, where: str, what: str) -> None:
        super().__init__(f"{origin}: {where}: {what}")
        self.origin = origin
        self.where = where
        self.what = what


class OriginReport(msgspec.Struct):
    """What verification of one origin found (when nothing was wrong)."""

    origin: str
    directory: str
    segments: int
    first_index: int  # leaves before it were removed by retention
    records: int  # leaves verified (from first_index on)
    checkpoints: int  # signed checkpoints checked against the tree
    signed_size: int  # the largest signed tree size
    root: str  # hex root of the whole tree as stored
    unsigned: int  # records after the newest checkpoint (not yet signed)
    removed_segments: int  # sealed segments the catalog says retention removed


Progress = Callable[[int], None]


def verify_log(
    log_dir: Path,
    verifiers: Sequence[VerifierKey],
    *,
    witnesses: Sequence[bytes] = (),
    progress: Progress | None = None,
) -> list[OriginReport]:
    """Verify every origin of ``log_dir``; raises Violation at the first fault.

    ``witnesses`` are signed checkpoints kept elsewhere (the mirror, a
    witness): each must verify and match the log of its origin.
    """
    directories = layout.origin_dirs(log_dir)
    if not directories:
        raise Violation("-", str(log_dir), "no segments found: not a Scalple log directory")
    reports = []
    seen: dict[str, dict[int, bytes]] = {}
    for directory in directories:
        report, roots = verify_origin(directory, verifiers, progress=progress)
        reports.append(report)
        seen[report.origin] = roots
    for note in witnesses:
        _check_witness(note, verifiers, seen, reports)
    return reports


def _check_witness(
    note: bytes,
    verifiers: Sequence[VerifierKey],
    seen: dict[str, dict[int, bytes]],
    reports: list[OriginReport],
) -> None:
    try:
        checkpoint = open_checkpoint(note, verifiers)
    except CheckpointError as exc:
        raise Violation("-", "given checkpoint", f"does not verify: {exc}") from None
    roots = seen.get(checkpoint.origin)
    if roots is None:
        raise Violation(checkpoint.origin, "given checkpoint", "no log of this origin here")
    report = next(r for r in reports if r.origin == checkpoint.origin)
    if checkpoint.size > report.first_index + report.records:
        raise Violation(
            checkpoint.origin,
            "given checkpoint",
            f"signs {checkpoint.size} records but the log holds "
            f"{report.first_index + report.records}: records were removed from its end",
        )
    root = roots.get(checkpoint.size)
    if root is None:
        raise Violation(
            checkpoint.origin,
            "given checkpoint",
            f"size {checkpoint.size} is before the oldest kept record {report.first_index}",
        )
    if root != checkpoint.root:
        raise Violation(
            checkpoint.origin,
            "given checkpoint",
            f"the log's tree of size {checkpoint.size} has another root: the log was rewritten",
        )


def _catalog_entries(log_dir: Path) -> dict[tuple[str, int], SegmentEntry] | None:
    if not (log_dir / layout.CATALOG_FILE).exists():
        return None
    catalog = Catalog(log_dir, readonly=True)
    try:
        return {(e.origin, e.number): e for e in catalog.entries()}
    except sqlite3.OperationalError:
        return {}  # being created by the first seal: no segment is sealed yet
    finally:
        catalog.close()


def verify_origin(
    directory: Path,
    verifiers: Sequence[VerifierKey],
    *,
    progress: Progress | None = None,
) -> tuple[OriginReport, dict[int, bytes]]:
    """Verify one origin directory; returns the report and every tree size
    that a checkpoint signs with the root the log has at that size."""
    # Checkpoints first: everything they sign was fsynced before they were
    # written, so a log being appended to meanwhile still verifies.  The newest
    # is read before the segments are listed, so that whatever a checkpoint
    # read here signs lies in a listed segment; only those are verified (one
    # created since has no checkpoints read, and the newest listed is read as
    # the newest even if it was sealed meanwhile).
    latest_file = directory / layout.CHECKPOINT_FILE
    latest_note = latest_file.read_bytes() if latest_file.exists() else None
    numbers = layout.segment_numbers(directory)
    origin = _origin_of(directory, numbers[0])
    checkpoints: dict[int, list[Checkpoint]] = {}
    signed: dict[int, bytes] = {}
    for number in numbers:
        checkpoints[number] = _read_checkpoints(directory, number, origin, verifiers, signed)
    if latest_note is not None:
        latest = _open(latest_note, verifiers, origin, f"{latest_file.name} file")
        _remember(signed, latest, origin, latest_file.name)
    retained_from = _retained_from(checkpoints, latest_note, verifiers, origin)
    # The catalog after the listing: a segment is sealed (its row committed)
    # before the next one is created, so every listed segment but the newest
    # has its row in what is read now.
    catalog = _catalog_entries(directory.parent)
    removed = _check_start(directory, numbers, origin, catalog)
    _check_end(directory, numbers, origin, catalog)

    tree: CompactRange | None = None
    roots: dict[int, bytes] = {}
    first_index = 0
    last_seq = 0
    checked = 0
    for position, number in enumerate(numbers):
        path = layout.segment_path(directory, number)
        where = f"segment {number}"
        data = path.read_bytes()
        try:
            header, start = read_header(data, path)
        except SegmentError as exc:
            raise Violation(origin, where, str(exc)) from None
        if header.origin != origin or header.number != number:
            raise Violation(
                origin, where, f"header names origin {header.origin!r} segment {header.number}"
            )
        try:
            start_range = CompactRange(header.first_index, header.start_hashes)
        except ValueError as exc:
            raise Violation(origin, where, f"impossible header start: {exc}") from None
        if tree is None:
            _check_first(number, header.first_index, origin, catalog)
            if header.first_index > retained_from:
                raise Violation(
                    origin,
                    f"segment {number}",
                    f"the log starts at record {header.first_index}, but no signed checkpoint "
                    f"says retention removed records before it (signed: before "
                    f"{retained_from}): old segments were removed without the key",
                )
            tree = start_range
            first_index = header.first_index
        elif header.first_index != tree.size or start_range.root() != tree.root():
            raise Violation(
                origin,
                where,
                f"starts at record {header.first_index} with another tree than segment "
                f"{numbers[position - 1]} ends with ({tree.size} records): segments were "
                "replaced, inserted or removed",
            )
        opening = checkpoints[number][:1]
        if not opening or opening[0].size != tree.size or opening[0].root != tree.root():
            raise Violation(origin, where, "its opening checkpoint does not match its header")
        roots[tree.size] = tree.root()
        builder = IndexBuilder(origin, number, header.first_index)
        end = start
        for item in scan_frames(data, start):
            at = f"{where}, record {tree.size} (byte {item.offset})"
            if not item.intact:
                raise Violation(origin, at, "its bytes do not hash to its stored leaf hash")
            try:
                record = decode_record(item.payload)
            except Exception:
                raise Violation(origin, at, "not a readable record") from None
            if record.seq <= last_seq:
                raise Violation(
                    origin,
                    f"{at}, seq {record.seq}",
                    f"seq not above {last_seq}: reordered or inserted",
                )
            last_seq = record.seq
            tree.append(item.digest)
            builder.add(record)
            end = frame_end(item)
            expected = signed.get(tree.size)
            if expected is not None:
                root = tree.root()
                roots[tree.size] = root
                if root != expected:
                    raise Violation(
                        origin,
                        f"{at}, seq {record.seq}",
                        f"the tree of {tree.size} records does not match its signed checkpoint: "
                        "records before it were modified, inserted, removed or reordered",
                    )
                checked += 1
            if progress is not None and tree.size % 10_000 == 0:
                progress(tree.size - first_index)
        newest = position == len(numbers) - 1
        if end != len(data) and not newest:
            raise Violation(origin, where, f"{len(data) - end} bytes after its last record")
        if not newest:
            _check_sealed(directory, number, origin, builder, path, catalog)
    assert tree is not None
    signed_size = max(signed)
    if signed_size > tree.size:
        raise Violation(
            origin,
            f"segment {numbers[-1]}",
            f"holds records up to {tree.size} but a checkpoint signs {signed_size}: "
            "records were cut from the end",
        )
    for size, root in signed.items():
        if size >= first_index and roots.get(size, root) != root:
            raise Violation(origin, f"checkpoint of size {size}", "does not match the tree")
    report = OriginReport(
        origin=origin,
        directory=str(directory),
        segments=len(numbers),
        first_index=first_index,
        records=tree.size - first_index,
        checkpoints=checked,
        signed_size=signed_size,
        root=tree.root().hex(),
        unsigned=tree.size - signed_size,
        removed_segments=removed,
    )
    return report, roots


def _origin_of(directory: Path, number: int) -> str:
    path = layout.segment_path(directory, number)
    try:
        with path.open("rb") as handle:
            header, _ = read_file_header(handle, path)
    except SegmentError as exc:
        raise Violation(directory.name, f"segment {number}", str(exc)) from None
    return header.origin


def _open(note: bytes, verifiers: Sequence[VerifierKey], origin: str, where: str) -> Checkpoint:
    try:
        return open_checkpoint(note, verifiers, origin=origin)
    except CheckpointError as exc:
        raise Violation(origin, where, f"checkpoint does not verify: {exc}") from None


def _remember(signed: dict[int, bytes], checkpoint: Checkpoint, origin: str, where: str) -> None:
    known = signed.setdefault(checkpoint.size, checkpoint.root)
    if known != checkpoint.root:
        raise Violation(
            origin,
            where,
            f"two signed checkpoints of size {checkpoint.size} with different roots",
        )


def _read_checkpoints(
    directory: Path,
    number: int,
    origin: str,
    verifiers: Sequence[VerifierKey],
    signed: dict[int, bytes],
) -> list[Checkpoint]:
    path = layout.checkpoints_path(directory, number)
    where = f"segment {number} checkpoints"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise Violation(origin, where, f"{path.name} is missing") from None
    try:
        notes, _whole = split_notes(data)  # a torn last one is being written or was never whole
    except CheckpointError as exc:
        raise Violation(origin, where, str(exc)) from None
    result = []
    previous = -1
    for position, note in enumerate(notes):
        checkpoint = _open(note, verifiers, origin, f"{where}, entry {position + 1}")
        if checkpoint.size < previous:
            raise Violation(origin, f"{where}, entry {position + 1}", "tree size went down")
        previous = checkpoint.size
        _remember(signed, checkpoint, origin, f"{where}, entry {position + 1}")
        result.append(checkpoint)
    return result


def _check_start(
    directory: Path,
    numbers: list[int],
    origin: str,
    catalog: dict[tuple[str, int], SegmentEntry] | None,
) -> int:
    """Segments before the oldest kept one must be ones retention removed."""
    first = numbers[0]
    for number in range(1, first):
        entry = catalog.get((origin, number)) if catalog is not None else None
        if entry is None or entry.removed_ns is None:
            raise Violation(
                origin,
                f"segment {number}",
                "missing, and the catalog does not say retention removed it",
            )
    for previous, number in itertools.pairwise(numbers):
        if number != previous + 1:
            raise Violation(origin, f"segment {previous + 1}", "missing between kept segments")
    return first - 1


def _retained_from(
    checkpoints: dict[int, list[Checkpoint]],
    latest_note: bytes | None,
    verifiers: Sequence[VerifierKey],
    origin: str,
) -> int:
    """The first record the log's own signed checkpoints say retention kept."""
    signed = [cp for kept in checkpoints.values() for cp in kept]
    if latest_note is not None:
        signed.append(_open(latest_note, verifiers, origin, "checkpoint file"))
    kept_from = 0
    for checkpoint in signed:
        for line in checkpoint.extensions:
            name, _, value = line.partition(" ")
            if name == RETENTION_EXTENSION and value.isdigit():
                kept_from = max(kept_from, int(value))
    return kept_from


def _check_first(
    number: int,
    first_index: int,
    origin: str,
    catalog: dict[tuple[str, int], SegmentEntry] | None,
) -> None:
    """The oldest kept segment starts where the log starts, or where the
    segment retention removed last ended: never inside what it removed."""
    if number < 1:
        raise Violation(origin, f"segment {number}", "segments are numbered from 1")
    if number == 1:
        if first_index != 0:
            raise Violation(
                origin,
                "segment 1",
                f"starts at record {first_index}, not 0: the log's first records were removed",
            )
        return
    entry = catalog.get((origin, number - 1)) if catalog is not None else None
    if entry is not None and entry.first_index + entry.count != first_index:
        raise Violation(
            origin,
            f"segment {number}",
            f"starts at record {first_index} but segment {number - 1}, removed by retention, "
            f"ended at record {entry.first_index + entry.count}: records were removed",
        )


def _check_end(
    directory: Path,
    numbers: list[int],
    origin: str,
    catalog: dict[tuple[str, int], SegmentEntry] | None,
) -> None:
    """Segments after the newest one present that the catalog lists as sealed
    (retention never removes the newest) were removed from the end.  One
    sealed since the listing (the catalog is read after it) still exists."""
    if catalog is None:
        return
    for entry_origin, number in sorted(catalog):
        if (
            entry_origin == origin
            and number > numbers[-1]
            and not layout.segment_path(directory, number).exists()
        ):
            raise Violation(
                origin,
                f"segment {number}",
                "missing, but the catalog lists it as sealed: records were cut from the end",
            )


def _check_sealed(
    directory: Path,
    number: int,
    origin: str,
    builder: IndexBuilder,
    path: Path,
    catalog: dict[tuple[str, int], SegmentEntry] | None,
) -> None:
    where = f"segment {number}"
    index_file = layout.index_path(directory, number)
    try:
        index_bytes = index_file.read_bytes()
        stored = read_index(index_file)
    except (OSError, ValueError) as exc:
        raise Violation(origin, f"{where} index", f"unreadable: {exc}") from None
    if stored != builder.build():
        raise Violation(
            origin, f"{where} index", "does not match the records: an entry was removed or added"
        )
    if catalog is None:
        return
    entry = catalog.get((origin, number))
    if entry is None:
        raise Violation(origin, f"{where} catalog", "no catalog row for a sealed segment")
    if entry.segment_digest != blake3.blake3(path.read_bytes()).hexdigest():
        raise Violation(origin, f"{where} catalog", "segment digest differs: the file was replaced")
    if entry.index_digest != blake3.blake3(index_bytes).hexdigest():
        raise Violation(origin, f"{where} catalog", "index digest differs: the index was replaced")
