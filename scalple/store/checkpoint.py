"""Signed checkpoints: the log's Merkle tree head, as C2SP tlog-checkpoint notes.

A checkpoint commits the log to its first ``size`` records through the RFC
6962 root hash; signing it is what lets a later reader prove that records
were neither changed nor dropped.  The format is c2sp.org/tlog-checkpoint
inside a c2sp.org/signed-note, byte for byte, so an auditor can check a
checkpoint with Go's ``golang.org/x/mod/sumdb/note`` or the transparency-dev
tools without trusting any Scalple code::

    <origin>
    <tree size, decimal, no leading zeros>
    <root hash, standard base64>
    [<extension line>...]
    <empty line>
    — <key name> <base64(4-byte key id || Ed25519 signature)>
    [— <other signer> <...>]

Each of those lines ends in "\\n".  The signature covers the text above the
empty line including its last newline.  Verification follows the spec:
signatures whose (name, key id) pair matches no configured key are skipped,
a signature from a configured key that does not verify rejects the whole
note, and at least one signature by a configured key is required.

Several checkpoints are appended to one file; ``frame_note`` and
``split_notes`` define that file (see ``split_notes``).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass

from scalple.store.keys import SigningKey, VerifierKey, b64decode_strict, is_valid_key_name

__all__ = [
    "MAX_SIGNATURES",
    "Checkpoint",
    "CheckpointError",
    "frame_note",
    "open_checkpoint",
    "open_note",
    "sign_checkpoint",
    "sign_note",
    "split_notes",
]

MAX_SIGNATURES = 100
"""Signature lines accepted in one note.

The spec requires accepting at least 16 and asks for some limit, so that a
note padded with junk signatures cannot make a reader do unbounded work;
100 is the limit Go's note package applies.
"""

_SIG_PREFIX = "\u2014 ".encode()  # em dash, space
_CONTROL = re.compile(rb"[\x00-\x09\x0b-\x1f]")
_SIZE = re.compile(r"0|[1-9][0-9]*")  # ASCII only: int() also takes "+1", "1_0", other digits
_MAX_SIZE = 2**64 - 1  # tree sizes are uint64 for every other implementation


class CheckpointError(ValueError):
    """A checkpoint or signed note that is malformed, unsigned or not the one expected."""


def _line_no(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _check_text_chars(data: bytes, what: str) -> str:
    """Decode ``data`` as a note requires: valid UTF-8, no controls but newline."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = _line_no(data, exc.start)
        raise CheckpointError(f"malformed {what} line {line}: not valid UTF-8") from None
    bad = _CONTROL.search(data)
    if bad is not None:
        line = _line_no(data, bad.start())
        raise CheckpointError(
            f"malformed {what} line {line}: control character 0x{bad.group()[0]:02x}"
        )
    return text


def _check_line(value: str, what: str) -> None:
    """A field that becomes one line of a checkpoint: non-empty, no newline or control."""
    if not isinstance(value, str):
        raise CheckpointError(f"{what} must be a str, got {type(value).__name__}")
    if not value:
        raise CheckpointError(f"{what} must not be empty")
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError(f"{what} is not well-formed Unicode") from None
    if "\n" in value or _CONTROL.search(encoded) is not None:
        raise CheckpointError(f"{what} must be one line without control characters")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A tree head: the log ``origin`` has ``size`` records whose RFC 6962 root is ``root``.

    Validated on construction, so a Checkpoint that exists always has a
    ``body()`` that ``parse`` reads back to an equal value.
    """

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_line(self.origin, "origin")
        if isinstance(self.size, bool) or not isinstance(self.size, int):
            raise CheckpointError(f"tree size must be an int, got {type(self.size).__name__}")
        if not 0 <= self.size <= _MAX_SIZE:
            raise CheckpointError(f"tree size {self.size} is outside 0..2**64-1")
        if not isinstance(self.root, bytes | bytearray | memoryview):
            raise CheckpointError(f"root must be bytes, got {type(self.root).__name__}")
        root = bytes(self.root)
        if len(root) != 32:
            raise CheckpointError(f"root hash must be 32 bytes (SHA-256), got {len(root)}")
        extensions = tuple(self.extensions)
        for i, line in enumerate(extensions):
            _check_line(line, f"extension line {i + 1}")
        object.__setattr__(self, "root", root)
        object.__setattr__(self, "extensions", extensions)

    def body(self) -> bytes:
        """The checkpoint text that gets signed: one "\\n"-terminated line per field."""
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode("ascii")]
        lines.extend(self.extensions)
        return "".join(line + "\n" for line in lines).encode("utf-8")

    @classmethod
    def parse(cls, body: bytes) -> Checkpoint:
        """Read checkpoint text (the note text, without the signatures).

        Strict on purpose: the size must be plain ASCII decimal without
        leading zeros and the root canonical base64, so every checkpoint has
        exactly one encoding and two equal checkpoints have equal bodies.
        """
        text = _check_text_chars(bytes(body), "checkpoint")
        if not text.endswith("\n"):
            raise CheckpointError("malformed checkpoint: text must end with a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise CheckpointError(
                f"malformed checkpoint: {len(lines)} line(s), need origin, tree size and root hash"
            )
        origin, size_text, root_text, *extensions = lines
        if not origin:
            raise CheckpointError("malformed checkpoint line 1: empty origin")
        if _SIZE.fullmatch(size_text) is None:
            raise CheckpointError(
                "malformed checkpoint line 2: tree size must be a decimal number "
                "without sign or leading zeros"
            )
        size = int(size_text)
        if size > _MAX_SIZE:
            raise CheckpointError("malformed checkpoint line 2: tree size exceeds 2**64-1")
        try:
            root = b64decode_strict(root_text)
        except ValueError as exc:
            raise CheckpointError(f"malformed checkpoint line 3: root hash is {exc}") from None
        if len(root) != 32:
            raise CheckpointError(
                f"malformed checkpoint line 3: root hash must be 32 bytes, got {len(root)}"
            )
        for i, line in enumerate(extensions):
            if not line:
                raise CheckpointError(f"malformed checkpoint line {i + 4}: empty extension line")
        return cls(origin, size, root, tuple(extensions))


def sign_note(text: bytes, key: SigningKey) -> bytes:
    """Sign ``text`` with ``key``: the complete signed note, one signature line.

    ``text`` must be what a note may hold (UTF-8, no controls but newline)
    and end in a newline, since the signature covers exactly those bytes and
    a reader finds them again by splitting at the last empty line.
    """
    text = bytes(text)
    _check_text_chars(text, "note text")
    if not text.endswith(b"\n"):
        raise CheckpointError("note text must end with a newline")
    signature = base64.b64encode(key.key_id + key.sign(text))
    return text + b"\n" + _SIG_PREFIX + key.name.encode("utf-8") + b" " + signature + b"\n"


def sign_checkpoint(checkpoint: Checkpoint, key: SigningKey) -> bytes:
    """The signed note for ``checkpoint``: its ``body()``, an empty line, ``key``'s signature."""
    return sign_note(checkpoint.body(), key)


def _parse_note(note: bytes) -> tuple[bytes, list[tuple[str, bytes, bytes, int]]]:
    """Split a signed note into its text and (name, key id, signature, line no) per line.

    Syntax only; nothing is verified here.  The text ends at the last empty
    line, as the spec says, so the text itself may contain empty lines.
    """
    _check_text_chars(note, "note")
    split = note.rfind(b"\n\n")
    if split < 0:
        raise CheckpointError("malformed note: no empty line before the signatures")
    text, block = note[: split + 1], note[split + 2 :]
    first = _line_no(note, split + 2)
    if not block:
        raise CheckpointError(f"malformed note line {first}: no signature lines")
    if not block.endswith(b"\n"):
        last = _line_no(note, len(note))
        raise CheckpointError(f"malformed note line {last}: missing final newline")
    lines = block[:-1].split(b"\n")
    if len(lines) > MAX_SIGNATURES:
        raise CheckpointError(f"malformed note: more than {MAX_SIGNATURES} signatures")
    sigs: list[tuple[str, bytes, bytes, int]] = []
    for n, raw in enumerate(lines, start=first):
        if not raw.startswith(_SIG_PREFIX):
            raise CheckpointError(f"malformed note line {n}: not a signature line ('— name sig')")
        name, sep, sig64 = raw[len(_SIG_PREFIX) :].decode("utf-8").partition(" ")
        if not sep or not is_valid_key_name(name):
            raise CheckpointError(f"malformed note line {n}: invalid key name")
        try:
            sig = b64decode_strict(sig64, canonical=False)
        except ValueError as exc:
            raise CheckpointError(f"malformed note line {n}: signature is {exc}") from None
        if len(sig) < 5:
            raise CheckpointError(f"malformed note line {n}: signature too short")
        sigs.append((name, sig[:4], sig[4:], n))
    return text, sigs


def open_note(note: bytes, verifiers: Sequence[VerifierKey]) -> bytes:
    """Verify a signed note; return its text (which ends in a newline).

    A signature counts as known only when both its key name and key id
    match a verifier: the id alone is 32 bits and not meant to be secure,
    and a known name with an unknown id is typically a rotated-out key or
    another party's key, which the spec says to ignore.  Every known
    signature is verified, even repeats (Go's package checks only the
    first per key); one that fails rejects the note.
    """
    note = bytes(note)
    text, sigs = _parse_note(note)
    known: dict[tuple[str, bytes], VerifierKey] = {}
    for verifier in verifiers:
        slot = (verifier.name, verifier.key_id)
        if slot in known and known[slot] != verifier:
            raise CheckpointError(
                f"ambiguous verifier keys: two different keys named "
                f"{verifier.name}+{verifier.key_id.hex()}"
            )
        known[slot] = verifier
    verified = 0
    for name, key_id, signature, line in sigs:
        match = known.get((name, key_id))
        if match is None:
            continue
        if not match.verify(text, signature):
            raise CheckpointError(f"bad signature from {name}+{key_id.hex()} (note line {line})")
        verified += 1
    if not verified:
        seen = ", ".join(sorted({f"{n}+{k.hex()}" for n, k, _, _ in sigs}))
        raise CheckpointError(f"no signature by a known key (note is signed by: {seen})")
    return text


def open_checkpoint(
    note: bytes, verifiers: Sequence[VerifierKey], *, origin: str | None = None
) -> Checkpoint:
    """Verify a signed checkpoint and return it.

    The signatures are checked before the text is interpreted at all, as
    the spec requires of unverified text.  ``origin``, when given, must
    equal the checkpoint's: a valid checkpoint of another log signed by a
    shared key must not pass for this log's.
    """
    checkpoint = Checkpoint.parse(open_note(note, verifiers))
    if origin is not None and checkpoint.origin != origin:
        raise CheckpointError(
            f"origin mismatch: expected {origin!r}, checkpoint is for {checkpoint.origin!r}"
        )
    return checkpoint


def frame_note(note: bytes) -> bytes:
    """The bytes to append to a checkpoint file for ``note``: the note, then one "\\n".

    The note must be well-formed and its text free of empty lines (true of
    every checkpoint, whose lines are all non-empty); that is what makes the
    file format in ``split_notes`` unambiguous.
    """
    note = bytes(note)
    text, _ = _parse_note(note)
    if text.startswith(b"\n") or b"\n\n" in text:
        raise CheckpointError("note text contains an empty line; it cannot be framed")
    return note + b"\n"


def split_notes(data: bytes) -> tuple[list[bytes], int]:
    """Cut a checkpoint file into its signed notes.

    The file is the notes one after another, each followed by one empty
    line: it reads like the notes themselves, and any one entry, cut out,
    is a valid signed note for any other tool.  An entry is::

        non-empty text line, one or more
        empty line
        "— " signature line, one or more
        empty line                      <- the frame: end of entry

    Text lines are never empty, so the first empty line ends the text and
    the next empty line ends the entry, whatever the text lines hold
    (an extension line starting with "— " included).

    Returns the whole notes (without the framing newline) and the offset
    where the last whole entry ends.  An appender killed mid-write leaves a
    prefix of an entry, which lacks its final empty line: those bytes are
    not returned and ``offset < len(data)`` tells the caller to truncate
    there.  A complete line that no valid entry could contain, or a whole
    entry that is not a well-formed note, is damage rather than a torn
    write, and raises CheckpointError with the byte offset.  Signatures are
    not checked here; that is ``open_checkpoint``'s job for each note.
    """
    data = bytes(data)
    notes: list[bytes] = []
    good_end = 0
    start = 0  # first byte of the entry being read
    pos = 0
    text_lines = 0
    sig_lines = 0
    in_sigs = False
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            break  # no complete line left: anything here is a torn tail
        line = data[pos:nl]
        if not in_sigs:
            if line:
                text_lines += 1
            elif text_lines == 0:
                raise CheckpointError(
                    f"damaged checkpoint file at byte {pos}: unexpected empty line"
                )
            else:
                in_sigs = True
        elif line:
            if not line.startswith(_SIG_PREFIX):
                raise CheckpointError(
                    f"damaged checkpoint file at byte {pos}: expected a signature line"
                )
            sig_lines += 1
        elif sig_lines == 0:
            raise CheckpointError(
                f"damaged checkpoint file at byte {pos}: entry without signatures"
            )
        else:
            note = data[start:pos]
            try:
                _parse_note(note)
            except CheckpointError as exc:
                raise CheckpointError(
                    f"damaged checkpoint file, entry at byte {start}: {exc}"
                ) from None
            notes.append(note)
            good_end = start = nl + 1
            text_lines = sig_lines = 0
            in_sigs = False
        pos = nl + 1
    return notes, good_end
