"""Appending to the store: frames, the tree, checkpoints, seals, recovery.

One ``StoreWriter`` owns one origin directory (an exclusive lock says so)
and runs in the audit worker process.  Records arrive in batches; each
batch is encoded, hashed and written with one ``write``; fsync happens in
groups (the caller decides when: every batch in strict mode, on a timer in
async mode).  A checkpoint is signed only over records already fsynced, so
a signed tree size is never lost to a crash, and recovery never cuts below
one: it cuts a torn tail back to the last whole record and goes on.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct
import threading
import time
from pathlib import Path
from typing import Any

import blake3

from scalple.config import LogConfig, log_origin, parse_duration
from scalple.records import (
    SessionRecord,
    StatementRecord,
    decode_record,
    encode_record,
    rfc3339,
)
from scalple.store import layout
from scalple.store.catalog import Catalog, SegmentEntry
from scalple.store.checkpoint import (
    Checkpoint,
    CheckpointError,
    frame_note,
    open_checkpoint,
    sign_checkpoint,
    split_notes,
)
from scalple.store.hashing import leaf_hash
from scalple.store.index import IndexBuilder
from scalple.store.keys import SigningKey
from scalple.store.merkle import CompactRange
from scalple.store.segment import (
    MAGIC,
    SegmentError,
    SegmentHeader,
    frame,
    frame_end,
    read_header,
    scan_frames,
    write_header,
)

__all__ = ["RETENTION_EXTENSION", "StoreError", "StoreWriter", "open_signing_key"]

log = logging.getLogger(__name__)

_SEQ_BLOCK = 1 << 16  # sequence numbers reserved ahead, so a crash never reuses one
_BUILDING = ".new"  # suffix of a segment being created (not yet listed as one)
RETENTION_EXTENSION = "scalple-retention-keeps-from"  # checkpoint line: first record kept
_HEADER_LENGTH = struct.Struct("<I")  # a segment header's length field (segment.py)
_HEADER_LIMIT = 1 << 16  # far above any real header (a few dozen hashes)


class StoreError(Exception):
    """The store cannot be written (or must not be): the message says why."""


def open_signing_key(config: LogConfig) -> SigningKey:
    """The configured signing key, or one created beside the log on first use."""
    if config.signing_key:
        return SigningKey.load(Path(config.signing_key))
    keys = Path(config.dir) / layout.KEYS_DIR
    path = keys / "signing.key"
    if not path.exists():
        from scalple.store.keys import write_keypair

        write_keypair(keys, _key_name(log_origin(config)))
        log.warning(
            "no [log] signing_key configured: created %s. A key kept beside the log protects "
            "less: whoever can rewrite the log can re-sign it. Keep the key elsewhere "
            "(scalple keygen) and give its path as [log] signing_key.",
            path,
        )
    return SigningKey.load(path)


def _key_name(origin: str) -> str:
    """A signed-note key name for ``origin`` (no '+' and no spaces allowed)."""
    return "".join("_" if c == "+" or c.isspace() else c for c in origin) or "scalple"


class _Segment:
    """The open, newest segment of the origin."""

    def __init__(
        self, number: int, path: Path, fd: int, header: SegmentHeader, end: int, digest: Any
    ) -> None:
        self.number = number
        self.path = path
        self.fd = fd
        self.header = header
        self.end = end  # offset after the last whole frame
        self.created_ns = header.created_ns
        self.digest = digest  # blake3 of the file's bytes up to ``end`` (the catalog's)


class StoreWriter:
    """Appends records to one origin's segments and signs its checkpoints."""

    def __init__(self, config: LogConfig, key: SigningKey) -> None:
        self.origin = log_origin(config)
        self.log_dir = Path(config.dir)
        self.dir = layout.origin_dir(self.log_dir, self.origin)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._key = key
        self._verifier = key.verifier()
        self._mirror = (
            layout.origin_dir(Path(config.checkpoint_mirror), self.origin)
            if config.checkpoint_mirror
            else None
        )
        self._segment_size = config.segment_size
        self._segment_age_ns = int(parse_duration(config.segment_age) * 1e9)
        self._retention_ns = int(parse_duration(config.retention) * 1e9) if config.retention else 0
        self._checkpoint_ns = int(config.checkpoint_interval * 1e9)
        self._checkpoint_records = config.checkpoint_records
        self._lock_fd = self._lock()
        self._range = CompactRange()
        self._synced_end = 0
        self._synced_size = 0
        self._signed_size = -1
        self._signed_ns = 0
        self._seq = 0
        self._reserved = 0
        self._index: IndexBuilder
        self._segment: _Segment
        self.checkpoint_failures = 0
        self.mirror_failures = 0
        self._catalog: Catalog | None = None
        self._io_lock = threading.Lock()
        try:
            self._recover()
        except BaseException:
            os.close(self._lock_fd)  # a refused start must not leave the origin locked
            raise

    # -- state --------------------------------------------------------------

    @property
    def size(self) -> int:
        """Leaves in the tree (records written, fsynced or not)."""
        return self._range.size

    @property
    def unsynced(self) -> int:
        """Records written but not yet fsynced: the power-loss window."""
        return self._range.size - self._synced_size

    @property
    def seq(self) -> int:
        return self._seq

    def root(self) -> bytes:
        return self._range.root()

    # -- appending ---------------------------------------------------------

    def append(self, records: list[StatementRecord | SessionRecord]) -> None:
        """Number, encode, hash and write ``records`` (one write, no fsync).

        On failure nothing of the batch remains: the file is cut back, the
        tree and the sequence are as before, and StoreError says why; the
        caller may retry the same records.
        """
        if not records:
            return
        segment = self._segment
        seq = self._seq
        if seq + len(records) > self._reserved:
            self._reserve(seq + len(records))
        parts: list[bytes] = []
        digests: list[bytes] = []
        for record in records:
            seq += 1
            record.seq = seq
            payload = encode_record(record)
            digest = leaf_hash(payload)
            parts.append(frame(payload, digest))
            digests.append(digest)
        data = b"".join(parts)
        try:
            _write_all(segment.fd, data, segment.end)
        except OSError as exc:
            self._cut_back(segment, segment.end)
            raise StoreError(f"cannot write {segment.path.name}: {_reason(exc)}") from None
        segment.end += len(data)
        segment.digest.update(data)
        self._seq = seq
        extend = self._range.append
        add = self._index.add
        for record, digest in zip(records, digests, strict=True):
            extend(digest)
            add(record)
            record.log_id = "immutable-" + digest.hex()[:16]

    def sync(self) -> None:
        """Make everything written durable (fdatasync of the segment).

        May run on another thread than ``append`` (the worker's syncer, so
        that writing the next group overlaps this fsync): what was written
        when it starts is what it marks durable, and a seal waits for it
        before closing the segment.
        """
        with self._io_lock:
            segment = self._segment
            end, size = segment.end, self._range.size  # append moves end first
            if self._synced_end >= end and self._synced_size >= size:
                return
            try:
                os.fdatasync(segment.fd)
            except OSError as exc:
                raise StoreError(f"cannot fsync {segment.path.name}: {_reason(exc)}") from None
            if segment is self._segment:  # a seal meanwhile synced and replaced it
                self._synced_end = max(self._synced_end, end)
                self._synced_size = max(self._synced_size, size)

    # -- timed work --------------------------------------------------------

    def due(self, now_ns: int) -> bool:
        """Whether a checkpoint or a seal is due."""
        if self._range.size != self._signed_size and (
            now_ns - self._signed_ns >= self._checkpoint_ns
            or self._range.size - max(self._signed_size, 0) >= self._checkpoint_records
        ):
            return True
        return self._seal_due(now_ns)

    def tick(self, now_ns: int) -> None:
        """Sign a checkpoint or seal the segment when due; failures are logged."""
        try:
            if self._seal_due(now_ns):
                self.seal()
            elif self.due(now_ns):
                self.checkpoint()
        except StoreError as exc:
            self.checkpoint_failures += 1
            log.error("%s; will retry", exc)

    def _seal_due(self, now_ns: int) -> bool:
        segment = self._segment
        if self._index.count == 0:
            return False
        return (
            segment.end >= self._segment_size or now_ns - segment.created_ns >= self._segment_age_ns
        )

    # -- checkpoints -------------------------------------------------------

    def checkpoint(self, extensions: tuple[str, ...] = ()) -> bytes:
        """Sign the current tree (after an fsync) and publish it; the note."""
        self.sync()
        note = self._sign_tree(extensions)
        try:
            _append_file(layout.checkpoints_path(self.dir, self._segment.number), frame_note(note))
            _replace_file(self.dir / layout.CHECKPOINT_FILE, note)
        except OSError as exc:
            raise StoreError(f"cannot write a checkpoint: {_reason(exc)}") from None
        self._signed_size = self._range.size
        self._signed_ns = time.time_ns()
        self._publish_mirror(note)
        return note

    def _sign_tree(self, extensions: tuple[str, ...] = ()) -> bytes:
        """The signed checkpoint note of the tree as it is now."""
        checkpoint = Checkpoint(
            origin=self.origin,
            size=self._range.size,
            root=self._range.root(),
            extensions=extensions,
        )
        return sign_checkpoint(checkpoint, self._key)

    def _publish_mirror(self, note: bytes) -> None:
        if self._mirror is None:
            return
        try:
            self._mirror.mkdir(parents=True, exist_ok=True)
            _append_file(self._mirror / "checkpoints", frame_note(note))
            _replace_file(self._mirror / layout.CHECKPOINT_FILE, note)
        except OSError as exc:
            self.mirror_failures += 1
            log.error("cannot write the checkpoint mirror %s: %s", self._mirror, _reason(exc))

    # -- sealing -----------------------------------------------------------

    def seal(self) -> None:
        """Close the newest segment: last checkpoint, postings, catalog; open the next."""
        segment = self._segment
        if self._signed_size != self._range.size:
            self.checkpoint()
        index_bytes = self._index.encode()
        index_file = layout.index_path(self.dir, segment.number)
        try:
            _replace_file(index_file, index_bytes)
            digest = segment.digest.hexdigest()  # kept as written: no second read
            catalog = self._open_catalog()
            built = self._index
            catalog.add(
                SegmentEntry(
                    origin=self.origin,
                    number=segment.number,
                    first_index=built.first_index,
                    count=built.count,
                    first_seq=built.first_seq,
                    last_seq=built.last_seq,
                    first_ts=built.first_ts,
                    last_ts=built.last_ts,
                    segment_digest=digest,
                    index_digest=blake3.blake3(index_bytes).hexdigest(),
                    sealed_ns=time.time_ns(),
                )
            )
            self._open_segment(segment.number + 1)
        except StoreError:
            raise
        except Exception as exc:  # OSError, sqlite3.Error
            raise StoreError(f"cannot seal {segment.path.name}: {_reason(exc)}") from None
        with self._io_lock:  # a sync on another thread may be using the old one
            os.close(segment.fd)
        self._apply_retention()

    def _open_segment(self, number: int) -> None:
        """Create segment ``number`` starting at the current tree, with its
        opening checkpoint (the tree as it is now, already signed).

        The segment is written under a temporary name and renamed once its
        header and opening checkpoint are on disk, so that a reader listing
        segments (``scalple verify`` on a live log) never meets one without
        its checkpoints.
        """
        path = layout.segment_path(self.dir, number)
        building = path.with_name(path.name + _BUILDING)
        header = SegmentHeader(
            version=1,
            origin=self.origin,
            number=number,
            first_index=self._range.size,
            created_ns=time.time_ns(),
            start_hashes=list(self._range.hashes),
        )
        if path.exists():
            raise StoreError(f"{path} exists already: run scalple verify")
        fd = os.open(building, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            end = write_header(fd, header)
            os.fsync(fd)
            note = self._sign_tree()
            # Replaced, not appended: a crash may have left one of an earlier try.
            _replace_file(layout.checkpoints_path(self.dir, number), frame_note(note))
            os.rename(building, path)
            _fsync_dir(self.dir)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                building.unlink()
            raise
        digest = blake3.blake3(os.pread(fd, end, 0))
        self._segment = _Segment(number, path, fd, header, end, digest)
        self._synced_end = end
        self._index = IndexBuilder(self.origin, number, header.first_index)

    def _open_catalog(self) -> Catalog:
        if self._catalog is None:
            self._catalog = Catalog(self.log_dir)
        return self._catalog

    # -- retention ---------------------------------------------------------

    def _apply_retention(self, now_ns: int | None = None) -> None:
        """Remove whole sealed segments whose newest record is past retention.

        Only a prefix of the log goes (oldest first), never the newest
        segment; what stays still verifies from its own opening checkpoint.
        """
        if not self._retention_ns:
            return
        now_ns = now_ns or time.time_ns()
        limit = rfc3339(now_ns - self._retention_ns)
        catalog = self._open_catalog()
        sealed = {e.number: e for e in catalog.entries(self.origin) if e.removed_ns is None}
        removable: list[SegmentEntry] = []
        for number in layout.segment_numbers(self.dir):
            if number >= self._segment.number:
                break
            entry = sealed.get(number)
            if entry is None or entry.last_ts >= limit:
                break
            removable.append(entry)
        if not removable:
            return
        # Signed before anything goes: the log itself says, under the key,
        # from which record on it is kept, so removing old segments without
        # the key shows in verify (the catalog alone could be edited).
        last = removable[-1]
        self.checkpoint((f"{RETENTION_EXTENSION} {last.first_index + last.count}",))
        for entry in removable:
            number = entry.number
            for path in (
                layout.segment_path(self.dir, number),
                layout.index_path(self.dir, number),
                layout.checkpoints_path(self.dir, number),
            ):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            catalog.mark_removed(self.origin, number)
            log.info(
                "retention: removed segment %d of %s (newest record %s)",
                number,
                self.origin,
                entry.last_ts,
            )

    # -- sequence numbers ---------------------------------------------------

    def _reserve(self, needed: int) -> None:
        """Record a high-water mark above ``needed`` before using those numbers."""
        reserved = needed + _SEQ_BLOCK
        try:
            _replace_file(self.dir / layout.SEQ_FILE, b"%d\n" % reserved)
        except OSError as exc:
            raise StoreError(f"cannot reserve sequence numbers: {_reason(exc)}") from None
        self._reserved = reserved

    # -- recovery ----------------------------------------------------------

    def _lock(self) -> int:
        fd = os.open(self.dir / layout.LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(
                f"another process is writing origin {self.origin!r} in {self.dir}: "
                "give each proxy its own [log] origin"
            ) from None
        return fd

    def _recover(self) -> None:
        for stray in self.dir.glob("*.seg" + _BUILDING):
            log.warning("removing %s: a crash cut its creation short", stray.name)
            stray.unlink()
        numbers = layout.segment_numbers(self.dir)
        reserved = _read_seq(self.dir / layout.SEQ_FILE)
        if numbers and self._unfinished(numbers[-1]):
            numbers.pop()  # a crash while opening it: the one before is the newest
        if not numbers:
            self._seq = reserved
            self._open_segment(1)
            self._signed_size = 0
            self._signed_ns = time.time_ns()
            self._reserve(self._seq)
            return
        number = numbers[-1]
        path = layout.segment_path(self.dir, number)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self._recover_segment(number, path, fd, reserved)
        except BaseException:
            os.close(fd)
            raise

    def _unfinished(self, number: int) -> bool:
        """Remove segment ``number`` if a crash cut its creation short.

        A segment is created, its header fsynced, then its opening checkpoint
        written; before that last step is whole it can hold no record.
        """
        checkpoints = layout.checkpoints_path(self.dir, number)
        try:
            if split_notes(checkpoints.read_bytes())[0]:
                return False
        except FileNotFoundError:
            pass
        except CheckpointError:
            return False  # damage, not a crash: _recover_segment says so
        path = layout.segment_path(self.dir, number)
        data = path.read_bytes()
        try:
            _, start = read_header(data, path)
        except SegmentError:
            start = len(data) if _header_cut_short(data) else len(MAGIC)
        if len(data) > start:
            return False  # records without a checkpoint file: damage, not a crash
        log.warning("removing %s: its creation was cut short by a crash", path.name)
        with contextlib.suppress(FileNotFoundError):
            checkpoints.unlink()  # first: a new segment of this number must not append to it
        path.unlink()
        index = layout.index_path(self.dir, number - 1)
        with contextlib.suppress(FileNotFoundError):
            index.unlink()  # the segment before is the newest again: no postings yet
        return True

    def _recover_segment(self, number: int, path: Path, fd: int, reserved: int) -> None:
        data = path.read_bytes()
        header, start = read_header(data, path)
        with contextlib.suppress(FileNotFoundError):
            layout.index_path(self.dir, number).unlink()  # postings of a seal cut short
        if header.origin != self.origin or header.number != number:
            raise StoreError(f"{path}: belongs to origin {header.origin!r} segment {header.number}")
        notes = self._read_checkpoints(number)
        if not notes:
            raise StoreError(f"{path}: no opening checkpoint; run scalple verify")
        opening, latest = notes[0], notes[-1]
        tree = CompactRange(header.first_index, header.start_hashes)
        if opening.size != header.first_index or opening.root != tree.root():
            raise StoreError(f"{path}: header does not match its opening checkpoint")
        index = IndexBuilder(self.origin, number, header.first_index)
        end = start
        last_seq = 0
        checks = {note.size: note.root for note in notes}
        for item in scan_frames(data, start):
            if not item.intact:
                break
            try:
                record = decode_record(item.payload)
            except Exception:
                break
            tree.append(item.digest)
            index.add(record)
            last_seq = record.seq
            end = frame_end(item)
            expected = checks.get(tree.size)
            if expected is not None and expected != tree.root():
                raise StoreError(
                    f"{path}: record {tree.size - 1} does not match a signed checkpoint"
                )
        if tree.size < latest.size:
            raise StoreError(
                f"{path}: holds {tree.size} records but checkpoint says {latest.size}: "
                "the log was cut below a signed checkpoint; run scalple verify"
            )
        # What the previous process wrote may still be only in the page cache
        # (it was killed, the machine was not): make it durable before it is
        # counted as synced and signed.
        if end < len(data):
            self._quarantine(path, data[end:])
            os.ftruncate(fd, end)
        os.fsync(fd)
        _fsync_dir(self.dir)
        if end < len(data):
            log.warning(
                "recovered %s: cut a torn tail of %d bytes after record %d (kept as %s.torn-*)",
                path.name,
                len(data) - end,
                tree.size,
                path.name,
            )
        self._segment = _Segment(number, path, fd, header, end, blake3.blake3(data[:end]))
        self._range = tree
        self._index = index
        self._synced_end = end
        self._synced_size = tree.size
        self._signed_size = latest.size
        self._signed_ns = 0
        self._seq = max(last_seq, reserved)
        self._reserve(self._seq)
        if self._range.size != latest.size:
            self.checkpoint()  # the recovered tail is signed at once

    def _read_checkpoints(self, number: int) -> list[Checkpoint]:
        path = layout.checkpoints_path(self.dir, number)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
        try:
            notes, whole = split_notes(data)
        except CheckpointError as exc:
            raise StoreError(f"{path}: {exc}; run scalple verify") from None
        if whole < len(data):
            with open(path, "r+b") as handle:  # a torn last checkpoint: never signed in full
                handle.truncate(whole)
        result = []
        for note in notes:
            try:
                result.append(open_checkpoint(note, [self._verifier], origin=self.origin))
            except CheckpointError as exc:
                raise StoreError(f"{path}: {exc}; run scalple verify") from None
        return result

    def _quarantine(self, path: Path, tail: bytes) -> None:
        keep = path.with_name(f"{path.name}.torn-{time.time_ns()}")
        with contextlib.suppress(OSError):
            keep.write_bytes(tail)

    def _cut_back(self, segment: _Segment, end: int) -> None:
        try:
            os.ftruncate(segment.fd, end)
        except OSError as exc:
            log.error(
                "cannot cut %s back after a failed write: %s", segment.path.name, _reason(exc)
            )

    # -- ending ------------------------------------------------------------

    def close(self) -> None:
        """Sync, sign the final checkpoint, release the origin."""
        try:
            if self._range.size != self._signed_size:
                self.checkpoint()
            else:
                self.sync()
            _replace_file(self.dir / layout.SEQ_FILE, b"%d\n" % self._seq)
        finally:
            os.close(self._segment.fd)
            os.close(self._lock_fd)
            if self._catalog is not None:
                self._catalog.close()


# -- small file helpers -------------------------------------------------------


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written == 0:
            raise OSError(errno.EIO, "write returned 0")
        view = view[written:]
        offset += written


def _append_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        size = os.fstat(fd).st_size
        try:
            _write_synced(fd, data)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def _write_synced(fd: int, data: bytes) -> None:
    """All of ``data`` at the file position, then fsync (writes may be short)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _replace_file(path: Path, data: bytes) -> None:
    """Write ``path`` atomically: a reader sees the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        _write_synced(fd, data)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)  # the rename itself must survive a power loss (the seq mark)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _header_cut_short(data: bytes) -> bool:
    """Whether ``data`` is the start of a segment header whose write a crash cut short."""
    if not MAGIC.startswith(data[: len(MAGIC)]):
        return False
    if len(data) < len(MAGIC) + _HEADER_LENGTH.size:
        return True
    end = len(MAGIC) + _HEADER_LENGTH.size + int(_HEADER_LENGTH.unpack_from(data, len(MAGIC))[0])
    return len(data) < end <= _HEADER_LIMIT


def _read_seq(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except FileNotFoundError:
        return 0
    except ValueError:
        raise StoreError(f"{path}: not a sequence number; run scalple verify") from None


def _reason(exc: BaseException) -> str:
    """An OS error as its errno name and text (never a record's content)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{errno.errorcode.get(exc.errno, exc.errno)} ({exc.strerror})"
    return type(exc).__name__
