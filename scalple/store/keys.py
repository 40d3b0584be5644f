"""Ed25519 keys for signing checkpoints, in the text forms of C2SP signed-note.

The log's checkpoints are meant to be checked by people and tools that are
not Scalple: a witness, an auditor with Go's ``golang.org/x/mod/sumdb/note``,
anything that speaks c2sp.org/signed-note.  So the keys use that ecosystem's
text encodings rather than PEM, and a verifier key can be pasted anywhere
such a key is accepted::

    <name>+<key id, 8 hex digits>+<base64(0x01 || 32-byte public key)>
    PRIVATE+KEY+<name>+<key id>+<base64(0x01 || 32-byte seed)>

The key id is ``SHA-256(name || 0x0A || 0x01 || public key)[:4]``.  It is an
identifier, not a security property: it only lets a verifier pick the right
key out of several, which is also why a signature counts only when both the
name and the id match a configured key.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

__all__ = [
    "ALG_ED25519",
    "SIGNING_KEY_FILE",
    "VERIFIER_KEY_FILE",
    "SigningKey",
    "VerifierKey",
    "b64decode_strict",
    "is_valid_key_name",
    "key_id_for",
    "write_keypair",
]

ALG_ED25519 = 0x01
"""Signature type byte for Ed25519 in signed-note (the only type Scalple signs with)."""

SIGNING_KEY_FILE = "signing.key"
VERIFIER_KEY_FILE = "signing.pub"

_PRIVATE_PREFIX = "PRIVATE+KEY+"
_HEX8 = re.compile(r"[0-9a-fA-F]{8}")
_B64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def is_valid_key_name(name: str) -> bool:
    """Whether ``name`` may appear as a key name in keys and signature lines.

    The spec forbids empty names, '+' (it separates the fields of a key) and
    Unicode spaces (a signature line is split at the first space).  Control
    characters are refused too: a note may not contain them, so a key with
    one could never sign anything.  ``str.isspace`` covers every character
    Go's ``unicode.IsSpace`` does, and only adds controls refused anyway.
    """
    if not name or "+" in name:
        return False
    if any(ch.isspace() or ord(ch) < 0x20 for ch in name):
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: not well-formed UTF-8
        return False
    return True


def key_id_for(name: str, public: bytes) -> bytes:
    """The 4-byte key id of the Ed25519 key ``public`` under ``name``.

    The name is hashed in so that one key pair used under two names is two
    keys to a verifier, and the type byte so that one name can have keys of
    different algorithms without their ids colliding by construction.
    """
    digest = hashlib.sha256(name.encode("utf-8") + b"\n" + bytes([ALG_ED25519]) + public)
    return digest.digest()[:4]


def b64decode_strict(text: str, *, canonical: bool = True) -> bytes:
    """Standard base64 (RFC 4648 section 4), padded, nothing but the alphabet.

    Python's decoder on its own skips stray characters and tolerates missing
    padding; a signature or key that decodes "anyway" is not something to
    accept silently.  With ``canonical`` the text must also be exactly what
    encoding the result gives back (no non-zero unused bits), so each value
    has a single spelling: used for keys and root hashes, which are compared
    as text elsewhere.  Signature lines from other signers are decoded with
    ``canonical=False``, which is what Go accepts.
    """
    if len(text) % 4 != 0 or _B64.fullmatch(text) is None:
        raise ValueError("not padded standard base64")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not padded standard base64 ({exc})") from None
    if canonical and base64.b64encode(raw).decode("ascii") != text:
        raise ValueError("not canonical base64 (non-zero unused bits)")
    return raw


def _parse_key_fields(name: str, id_hex: str, data64: str, what: str) -> tuple[bytes, bytes]:
    """Check the common ``name+id+data`` fields; return (claimed id, 32-byte key material).

    Error messages name the field that is wrong but never quote the data,
    so a mangled private key does not end up in a log or a traceback.
    """
    if not is_valid_key_name(name):
        raise ValueError(f"{what}: invalid key name (empty, or contains '+', a space or a control)")
    if _HEX8.fullmatch(id_hex) is None:
        raise ValueError(f"{what}: key id must be 8 hex digits")
    try:
        data = b64decode_strict(data64)
    except ValueError as exc:
        raise ValueError(f"{what}: key data is {exc}") from None
    if not data:
        raise ValueError(f"{what}: key data is empty")
    if data[0] != ALG_ED25519:
        raise ValueError(f"{what}: unsupported key type 0x{data[0]:02x} (only Ed25519, 0x01)")
    if len(data) != 33:
        raise ValueError(f"{what}: Ed25519 key data must be 32 bytes, got {len(data) - 1}")
    return bytes.fromhex(id_hex), data[1:]


@dataclass(frozen=True, slots=True)
class VerifierKey:
    """A public key and the name it signs under: what a checker configures.

    Two verifier keys are equal when name and public key are; the key id is
    derived from those, so it never disagrees with them.
    """

    name: str
    public: bytes
    key_id: bytes = field(init=False)
    _key: Ed25519PublicKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not is_valid_key_name(self.name):
            raise ValueError(f"invalid key name {self.name!r}")
        public = bytes(self.public)
        if len(public) != 32:
            raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(public)}")
        try:
            key = Ed25519PublicKey.from_public_bytes(public)
        except ValueError as exc:
            raise ValueError(f"not an Ed25519 public key: {exc}") from None
        object.__setattr__(self, "public", public)
        object.__setattr__(self, "key_id", key_id_for(self.name, public))
        object.__setattr__(self, "_key", key)

    @classmethod
    def from_text(cls, text: str) -> VerifierKey:
        """Parse ``<name>+<key id>+<base64(0x01 || public key)>``.

        The stated key id must match the one computed from name and key: a
        mismatch means a typo or a key edited by hand, and either way the
        signatures it would be asked about were made by some other key.
        """
        if text.startswith(_PRIVATE_PREFIX):
            raise ValueError("this is a private signing key, not a verifier key")
        parts = text.split("+", 2)  # base64 may contain '+', names may not
        if len(parts) != 3:
            raise ValueError("verifier key: expected <name>+<key id>+<key data>")
        key_id, public = _parse_key_fields(parts[0], parts[1], parts[2], "verifier key")
        verifier = cls(parts[0], public)
        if verifier.key_id != key_id:
            raise ValueError(
                f"verifier key: key id {parts[1]} does not match the key "
                f"(computed {verifier.key_id.hex()})"
            )
        return verifier

    def to_text(self) -> str:
        """The verifier key text, as ``from_text`` and Go's ``note.NewVerifier`` read it."""
        data = base64.b64encode(bytes([ALG_ED25519]) + self.public).decode("ascii")
        return f"{self.name}+{self.key_id.hex()}+{data}"

    @classmethod
    def load(cls, path: Path) -> VerifierKey:
        """Read a verifier key file (one key, surrounding whitespace ignored)."""
        text = _read_key_text(path, "verifier key")
        try:
            return cls.from_text(text)
        except ValueError as exc:
            raise ValueError(f"{path}: not a valid verifier key: {exc}") from None

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is this key's Ed25519 signature of ``message``."""
        if len(signature) != 64:
            return False
        try:
            self._key.verify(bytes(signature), bytes(message))
        except InvalidSignature:
            return False
        return True

    def __str__(self) -> str:
        return self.to_text()


class SigningKey:
    """The log's private key and its name.

    Not a dataclass on purpose: nothing here prints, compares or pickles the
    seed by accident.  ``repr`` shows the name and key id only.
    """

    __slots__ = ("_key", "_name", "_seed", "_verifier")

    def __init__(self, name: str, seed: bytes) -> None:
        if not is_valid_key_name(name):
            raise ValueError(f"invalid key name {name!r}")
        if len(seed) != 32:
            raise ValueError(f"an Ed25519 seed is 32 bytes, got {len(seed)}")
        self._name = name
        self._seed = bytes(seed)
        self._key = Ed25519PrivateKey.from_private_bytes(self._seed)
        self._verifier = VerifierKey(name, self._key.public_key().public_bytes_raw())

    @classmethod
    def generate(cls, name: str) -> SigningKey:
        """A new key from the operating system's CSPRNG."""
        return cls(name, secrets.token_bytes(32))

    @classmethod
    def from_seed(cls, name: str, seed: bytes) -> SigningKey:
        """The key whose RFC 8032 private key (seed) is ``seed``; mainly for test vectors."""
        return cls(name, seed)

    @classmethod
    def from_text(cls, text: str) -> SigningKey:
        """Parse ``PRIVATE+KEY+<name>+<key id>+<base64(0x01 || seed)>``.

        The key id in the text is checked against the one derived from the
        seed, so a private key whose text was damaged is refused here rather
        than signing checkpoints nobody can verify.
        """
        if not text.startswith(_PRIVATE_PREFIX):
            if text.count("+") >= 2:
                raise ValueError("this looks like a verifier (public) key, not a signing key")
            raise ValueError("signing key: expected PRIVATE+KEY+<name>+<key id>+<key data>")
        parts = text[len(_PRIVATE_PREFIX) :].split("+", 2)
        if len(parts) != 3:
            raise ValueError("signing key: expected PRIVATE+KEY+<name>+<key id>+<key data>")
        key_id, seed = _parse_key_fields(parts[0], parts[1], parts[2], "signing key")
        key = cls(parts[0], seed)
        if key.key_id != key_id:
            raise ValueError(
                f"signing key: key id {parts[1]} does not match the key "
                f"(computed {key.key_id.hex()})"
            )
        return key

    def to_text(self) -> str:
        """The private key text, as ``from_text`` and Go's ``note.NewSigner`` read it."""
        data = base64.b64encode(bytes([ALG_ED25519]) + self._seed).decode("ascii")
        return f"{_PRIVATE_PREFIX}{self._name}+{self.key_id.hex()}+{data}"

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        """Read a signing key file (one key, surrounding whitespace ignored).

        The file's permissions are not checked: ``write_keypair`` creates it
        0600, and a deployment that hands the key over some other way (a
        secret mount, say) decides its own modes.
        """
        text = _read_key_text(path, "signing key")
        try:
            return cls.from_text(text)
        except ValueError as exc:
            raise ValueError(f"{path}: not a valid signing key: {exc}") from None

    @property
    def name(self) -> str:
        return self._name

    @property
    def key_id(self) -> bytes:
        return self._verifier.key_id

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``message`` (deterministic, RFC 8032)."""
        return self._key.sign(bytes(message))

    def verifier(self) -> VerifierKey:
        """The public half, to hand to whoever checks the checkpoints."""
        return self._verifier

    def __repr__(self) -> str:
        return f"SigningKey(name={self._name!r}, key_id={self.key_id.hex()!r})"

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a SigningKey is not picklable; pass its file path instead")


def _read_key_text(path: Path, what: str) -> str:
    """The one key in ``path``; a ValueError naming the file when it holds something else."""
    try:
        text = Path(path).read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a {what} file (not UTF-8 text)") from None
    if not text or any(ch.isspace() for ch in text):
        raise ValueError(f"{path}: not a {what} file (expected exactly one key on one line)")
    return text


def write_keypair(out_dir: Path, name: str, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Generate a key pair and write ``signing.key`` (0600) and ``signing.pub`` (0644).

    The private key file is created with ``O_CREAT | O_EXCL`` and mode 0600
    in the same call, so it is never readable by others, not even between
    creation and a later chmod; ``O_EXCL`` also refuses a symlink planted at
    that name.  Replacing an existing pair (``overwrite=True``) writes new
    files beside the old ones and renames them over, so a crash leaves
    either the old key or the new one, never a half-written one.  Without
    ``overwrite`` an existing file of either name is a FileExistsError: a
    log's signing key is its identity and is not replaced by accident.

    ``out_dir`` is created 0700 if missing (an existing one is left as is).
    Returns (private key path, verifier key path).
    """
    out_dir = Path(out_dir)
    key = SigningKey.generate(name)
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_path = out_dir / SIGNING_KEY_FILE
    pub_path = out_dir / VERIFIER_KEY_FILE
    if not overwrite:
        for path in (key_path, pub_path):
            if path.exists() or path.is_symlink():
                raise _exists_error(path)
    _write_file(key_path, (key.to_text() + "\n").encode("ascii"), 0o600, replace=overwrite)
    try:
        _write_file(pub_path, (key.verifier().to_text() + "\n").encode(), 0o644, replace=overwrite)
    except FileExistsError:
        # Lost a race for the .pub after creating the .key: take back our key
        # so the directory is as we found it.
        key_path.unlink(missing_ok=True)
        raise
    return key_path, pub_path


def _exists_error(path: Path) -> FileExistsError:
    return FileExistsError(
        errno.EEXIST,
        f"refusing to overwrite existing key file {path} (pass overwrite=True to replace it)",
        str(path),
    )


def _write_file(path: Path, data: bytes, mode: int, *, replace: bool) -> None:
    """Write ``data`` to a new file at ``path`` with exactly ``mode``, durably.

    ``fchmod`` after the create gives the exact mode whatever the umask (a
    umask only ever removes bits, so the private key is never wider than
    0600 at any moment).  With ``replace`` the data goes to a fresh
    temporary name first and is renamed over ``path``.
    """
    target = path
    if replace:
        path = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise _exists_error(target) from None
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(path, target)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the new directory entry durable (best effort where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
