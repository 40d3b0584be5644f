"""Signed checkpoints and their keys (scalple/store/checkpoint.py, keys.py).

The interoperability tests use published vectors, copied as data:

* Go's note package (golang.org/x/mod/sumdb/note: the package doc example
  and note_test.go): the PeterNeumann private and verifier keys and the note
  they sign; the EnochRoot verifier key and its signature of the same text.
  Go's ``ExampleSign_add_signatures`` generates EnochRoot's key from a reader
  of zero bytes, so its Ed25519 seed is 32 zero bytes.
* The Go checksum database: its verifier key as built into the go command
  (src/cmd/go/internal/modfetch/key.go, ``knownGOSUMDB``) and a real
  checkpoint it signed, used as a fixture in transparency-dev/formats
  (log/note_test.go, ``TestSumDBNoteParsing``).
* transparency-dev/formats log/note_test.go: the ``Log`` test key pair.

Ed25519 signatures are deterministic, so signing the same text with the same
key must reproduce Go's output byte for byte.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from scalple.store.checkpoint import (
    MAX_SIGNATURES,
    Checkpoint,
    CheckpointError,
    frame_note,
    open_checkpoint,
    open_note,
    sign_checkpoint,
    sign_note,
    split_notes,
)
from scalple.store.keys import (
    SigningKey,
    VerifierKey,
    is_valid_key_name,
    key_id_for,
    write_keypair,
)

# -- published vectors ---------------------------------------------------------

PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
PETER_TEXT = (
    b"If you think cryptography is the answer to your problem,\n"
    b"then you don't know what your problem is.\n"
)
PETER_SIG = (
    "\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNX"
    "gKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
).encode()
ENOCH_SIG = (
    "\u2014 EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01"
    "oOTGwnWLox33WWd1RvMc+QQ=\n"
).encode()
PETER_NOTE = PETER_TEXT + b"\n" + PETER_SIG

SUMDB_VKEY = "sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8"
SUMDB_NOTE = (
    "go.sum database tree\n"
    "6476701\n"
    "mb8QLQIs0Z0yP5Cstq6guj87oXWeC9gEM8oVikmm9Wk=\n"
    "\n"
    "\u2014 sum.golang.org Az3grsLX85Gz+s1SiTbgkuqxgItqFq7gsMUEyVnrsa9LM7Us9S+1xbFIGu95949r"
    "j4nPRYfvimWEPWL+o3GeoWwOoAw=\n"
).encode()

TDEV_LOG_VKEY = "Log+2271c621+AemuH5ooBpEPcr+W8onrjA1NfuzBVHdezakU81Ekarvs"
TDEV_LOG_SKEY = "PRIVATE+KEY+Log+2271c621+AdEIq9FLRQni54Wg68T96VJO+iayOaulswav2DUMKgvQ"

ORIGIN = "scalple.test/audit"
ROOT = hashlib.sha256(b"a root").digest()


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate(ORIGIN)


def _checkpoint(size: int = 42, root: bytes = ROOT, **kw: object) -> Checkpoint:
    return Checkpoint(ORIGIN, size, root, **kw)  # type: ignore[arg-type]


# -- interoperability with Go ------------------------------------------------


def test_go_example_keys_parse_and_match() -> None:
    signer = SigningKey.from_text(PETER_SKEY)
    assert signer.name == "PeterNeumann"
    assert signer.key_id == bytes.fromhex("c74f20a3")
    assert signer.to_text() == PETER_SKEY
    assert signer.verifier().to_text() == PETER_VKEY
    assert signer.verifier() == VerifierKey.from_text(PETER_VKEY)


def test_key_id_is_sha256_of_name_newline_type_and_key() -> None:
    verifier = VerifierKey.from_text(PETER_VKEY)
    expected = hashlib.sha256(b"PeterNeumann\n\x01" + verifier.public).digest()[:4]
    assert verifier.key_id == expected == key_id_for("PeterNeumann", verifier.public)
    assert expected.hex() == "c74f20a3"


def test_sign_reproduces_go_example_note() -> None:
    assert sign_note(PETER_TEXT, SigningKey.from_text(PETER_SKEY)) == PETER_NOTE


def test_open_go_example_note() -> None:
    assert open_note(PETER_NOTE, [VerifierKey.from_text(PETER_VKEY)]) == PETER_TEXT


def test_go_enoch_root_key_from_zero_seed() -> None:
    enoch = SigningKey.from_seed("EnochRoot", bytes(32))
    assert enoch.verifier().to_text() == ENOCH_VKEY
    assert sign_note(PETER_TEXT, enoch) == PETER_TEXT + b"\n" + ENOCH_SIG


def test_go_doubly_signed_note() -> None:
    note = PETER_TEXT + b"\n" + PETER_SIG + ENOCH_SIG
    peter = VerifierKey.from_text(PETER_VKEY)
    enoch = VerifierKey.from_text(ENOCH_VKEY)
    assert open_note(note, [peter]) == PETER_TEXT  # EnochRoot unknown: ignored
    assert open_note(note, [enoch]) == PETER_TEXT
    assert open_note(note, [peter, enoch]) == PETER_TEXT
    with pytest.raises(CheckpointError, match="no signature by a known key"):
        open_note(note, [])


def test_go_rejects_corrupted_signature_so_do_we() -> None:
    # note_test.go: inserting "ABCD" into the base64 is an invalid signature.
    sig = PETER_SIG.decode()
    bad = PETER_TEXT + b"\n" + (sig[:60] + "ABCD" + sig[60:]).encode()
    with pytest.raises(CheckpointError, match=r"bad signature from PeterNeumann\+c74f20a3"):
        open_note(bad, [VerifierKey.from_text(PETER_VKEY)])


def test_real_sum_golang_org_checkpoint() -> None:
    checkpoint = open_checkpoint(
        SUMDB_NOTE, [VerifierKey.from_text(SUMDB_VKEY)], origin="go.sum database tree"
    )
    assert checkpoint.origin == "go.sum database tree"
    assert checkpoint.size == 6476701
    assert checkpoint.root == base64.b64decode("mb8QLQIs0Z0yP5Cstq6guj87oXWeC9gEM8oVikmm9Wk=")
    assert checkpoint.extensions == ()
    assert checkpoint.body() == SUMDB_NOTE[: SUMDB_NOTE.index(b"\n\n") + 1]
    with pytest.raises(CheckpointError, match="origin mismatch"):
        open_checkpoint(SUMDB_NOTE, [VerifierKey.from_text(SUMDB_VKEY)], origin="other")


def test_transparency_dev_test_key_pair() -> None:
    signer = SigningKey.from_text(TDEV_LOG_SKEY)
    assert signer.verifier().to_text() == TDEV_LOG_VKEY


# -- keys ----------------------------------------------------------------------


def test_key_text_round_trip(key: SigningKey) -> None:
    again = SigningKey.from_text(key.to_text())
    assert again.to_text() == key.to_text()
    assert again.key_id == key.key_id
    assert VerifierKey.from_text(key.verifier().to_text()) == key.verifier()
    assert len(key.key_id) == 4
    assert key.verifier().verify(b"msg", key.sign(b"msg"))
    assert not key.verifier().verify(b"msh", key.sign(b"msg"))
    assert not key.verifier().verify(b"msg", key.sign(b"msg")[:-1])


def test_signing_key_repr_hides_the_seed(key: SigningKey) -> None:
    seed64 = key.to_text().rsplit("+", 1)[1]
    assert seed64 not in repr(key)
    assert key.key_id.hex() in repr(key)


@pytest.mark.parametrize("name", ["", "a+b", "a b", "a\tb", "a\u00a0b", "a\u2003b", "a\u3000b"])
def test_invalid_key_names(name: str) -> None:
    assert not is_valid_key_name(name)
    with pytest.raises(ValueError):
        SigningKey.generate(name)


@pytest.mark.parametrize("name", ["example.com/log", "Señor-1", "a—b", "x"])
def test_valid_key_names(name: str) -> None:
    assert is_valid_key_name(name)


def test_go_manglings_of_verifier_key_are_refused() -> None:
    # note_test.go's approach: every proper substring and every one-byte
    # increment of the key text must fail to parse.
    text = PETER_VKEY
    for i in range(len(text) + 1):
        for j in range(i + 1, len(text) + 1):
            if (i, j) != (0, len(text)):
                with pytest.raises(ValueError):
                    VerifierKey.from_text(text[i:j])
    for i in range(len(text)):
        mangled = text[:i] + chr(ord(text[i]) + 1) + text[i + 1 :]
        with pytest.raises(ValueError):
            VerifierKey.from_text(mangled)


def test_go_manglings_of_signing_key_are_refused() -> None:
    text = PETER_SKEY
    for i in range(len(text)):
        mangled = text[:i] + chr(ord(text[i]) + 1) + text[i + 1 :]
        with pytest.raises(ValueError):
            SigningKey.from_text(mangled)
    for cut in range(1, len(text)):
        with pytest.raises(ValueError):
            SigningKey.from_text(text[:cut])


def test_mixed_up_key_kinds_are_named() -> None:
    with pytest.raises(ValueError, match="verifier"):
        SigningKey.from_text(PETER_VKEY)
    with pytest.raises(ValueError, match="private"):
        VerifierKey.from_text(PETER_SKEY)


def test_key_errors_do_not_quote_the_private_key() -> None:
    seed64 = PETER_SKEY.rsplit("+", 1)[1]
    with pytest.raises(ValueError) as info:
        SigningKey.from_text(PETER_SKEY.replace("c74f20a3", "c74f20a4"))
    assert seed64 not in str(info.value)


def test_write_keypair_modes_and_load(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    old_umask = os.umask(0o022)
    try:
        key_path, pub_path = write_keypair(out, ORIGIN)
    finally:
        os.umask(old_umask)
    assert (key_path, pub_path) == (out / "signing.key", out / "signing.pub")
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub_path.stat().st_mode) == 0o644
    assert key_path.read_text().endswith("\n")
    signer = SigningKey.load(key_path)
    verifier = VerifierKey.load(pub_path)
    assert signer.verifier() == verifier
    assert signer.name == verifier.name == ORIGIN
    assert sorted(p.name for p in out.iterdir()) == ["signing.key", "signing.pub"]


def test_write_keypair_mode_ignores_a_permissive_umask(tmp_path: Path) -> None:
    old_umask = os.umask(0)
    try:
        key_path, pub_path = write_keypair(tmp_path, ORIGIN)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub_path.stat().st_mode) == 0o644


def test_write_keypair_refuses_to_overwrite(tmp_path: Path) -> None:
    key_path, pub_path = write_keypair(tmp_path, ORIGIN)
    before = key_path.read_bytes(), pub_path.read_bytes()
    with pytest.raises(FileExistsError, match=r"refusing to overwrite.*signing\.key"):
        write_keypair(tmp_path, ORIGIN)
    assert (key_path.read_bytes(), pub_path.read_bytes()) == before

    key_path.unlink()  # only the .pub left: still refused, and no .key is left behind
    with pytest.raises(FileExistsError, match=r"signing\.pub"):
        write_keypair(tmp_path, ORIGIN)
    assert not key_path.exists()


def test_write_keypair_overwrite_replaces_both(tmp_path: Path) -> None:
    key_path, pub_path = write_keypair(tmp_path, ORIGIN)
    old = SigningKey.load(key_path)
    write_keypair(tmp_path, ORIGIN, overwrite=True)
    new = SigningKey.load(key_path)
    assert new.key_id != old.key_id
    assert VerifierKey.load(pub_path) == new.verifier()
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["signing.key", "signing.pub"]


def test_write_keypair_refuses_a_planted_symlink(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "signing.key").symlink_to(elsewhere)
    with pytest.raises(FileExistsError):
        write_keypair(tmp_path / "keys", ORIGIN)
    assert not elsewhere.exists()


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.key"
    path.write_text("PRIVATE+KEY+x+00000000+AAAA\n")
    with pytest.raises(ValueError, match=r"bad\.key"):
        SigningKey.load(path)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match=r"bad\.key.*UTF-8"):
        SigningKey.load(path)
    path.write_text(PETER_SKEY + "\n" + PETER_SKEY + "\n")
    with pytest.raises(ValueError, match="one key"):
        SigningKey.load(path)
    path.write_text(PETER_VKEY + "\n")
    with pytest.raises(ValueError, match=r"bad\.key.*verifier"):
        SigningKey.load(path)
    pub = tmp_path / "bad.pub"
    pub.write_text("junk\n")
    with pytest.raises(ValueError, match=r"bad\.pub"):
        VerifierKey.load(pub)
    pub.write_text(PETER_SKEY + "\n")
    with pytest.raises(ValueError, match=r"bad\.pub.*private"):
        VerifierKey.load(pub)


# -- checkpoint body -----------------------------------------------------------


def test_body_format() -> None:
    checkpoint = _checkpoint(size=0, extensions=("ext one", "— looks like a signature"))
    root64 = base64.b64encode(ROOT).decode()
    assert checkpoint.body() == (
        f"{ORIGIN}\n0\n{root64}\next one\n— looks like a signature\n".encode()
    )
    assert Checkpoint.parse(checkpoint.body()) == checkpoint


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"o\n1\n", "need origin, tree size and root hash"),
        (b"\n1\n" + base64.b64encode(ROOT) + b"\n", "line 1: empty origin"),
        (b"o\n01\n" + base64.b64encode(ROOT) + b"\n", "line 2"),
        (b"o\n+1\n" + base64.b64encode(ROOT) + b"\n", "line 2"),
        (b"o\n1_0\n" + base64.b64encode(ROOT) + b"\n", "line 2"),
        (b"o\n \n" + base64.b64encode(ROOT) + b"\n", "line 2"),
        (b"o\n18446744073709551616\n" + base64.b64encode(ROOT) + b"\n", "exceeds"),
        (b"o\n1\n" + base64.b64encode(ROOT[:31]) + b"\n", "32 bytes"),
        (b"o\n1\n" + base64.b64encode(ROOT).rstrip(b"=") + b"\n", "line 3"),
        (b"o\n1\n" + base64.urlsafe_b64encode(b"\xff" * 32) + b"\n", "line 3"),
        (b"o\n1\n" + base64.b64encode(ROOT), "end with a newline"),
        (b"o\n1\n" + base64.b64encode(ROOT) + b"\n\n", "line 4: empty extension"),
        (b"o\r\n1\n" + base64.b64encode(ROOT) + b"\n", "line 1: control"),
        (b"o\xff\n1\n" + base64.b64encode(ROOT) + b"\n", "line 1: not valid UTF-8"),
    ],
)
def test_parse_rejects(body: bytes, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        Checkpoint.parse(body)


def test_parse_accepts_the_largest_size() -> None:
    body = b"o\n18446744073709551615\n" + base64.b64encode(ROOT) + b"\n"
    assert Checkpoint.parse(body).size == 2**64 - 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"origin": ""},
        {"origin": "a\nb"},
        {"size": -1},
        {"size": 2**64},
        {"size": True},
        {"root": b"short"},
        {"extensions": ("",)},
        {"extensions": ("two\nlines",)},
    ],
)
def test_constructor_validates(kwargs: dict[str, object]) -> None:
    fields: dict[str, object] = {"origin": ORIGIN, "size": 1, "root": ROOT} | kwargs
    with pytest.raises(CheckpointError):
        Checkpoint(**fields)  # type: ignore[arg-type]


def test_origin_may_contain_spaces() -> None:
    checkpoint = Checkpoint("go.sum database tree", 1, ROOT)
    assert Checkpoint.parse(checkpoint.body()) == checkpoint


# -- signing and opening -------------------------------------------------------


def test_sign_and_open_round_trip(key: SigningKey) -> None:
    checkpoint = _checkpoint(extensions=("x",))
    note = sign_checkpoint(checkpoint, key)
    assert note.startswith(checkpoint.body() + "\n— ".encode() + ORIGIN.encode() + b" ")
    assert note.endswith(b"\n")
    sig = base64.b64decode(note.rsplit(b" ", 1)[1])
    assert sig[:4] == key.key_id and len(sig) == 68
    assert open_checkpoint(note, [key.verifier()], origin=ORIGIN) == checkpoint


def _replace_line(note: bytes, index: int, line: bytes) -> bytes:
    lines = note.split(b"\n")
    lines[index] = line
    return b"\n".join(lines)


@pytest.mark.parametrize(
    ("index", "line"),
    [
        (0, b"scalple.test/other"),  # origin
        (1, b"43"),  # size
        (2, base64.b64encode(hashlib.sha256(b"another root").digest())),  # root
    ],
)
def test_tampered_text_fails(key: SigningKey, index: int, line: bytes) -> None:
    note = sign_checkpoint(_checkpoint(), key)
    with pytest.raises(CheckpointError, match="bad signature from"):
        open_checkpoint(_replace_line(note, index, line), [key.verifier()])


def test_added_extension_line_fails(key: SigningKey) -> None:
    note = sign_checkpoint(_checkpoint(), key)
    text, sigs = note.split(b"\n\n")
    with pytest.raises(CheckpointError, match="bad signature from"):
        open_checkpoint(text + b"\nextra\n\n" + sigs, [key.verifier()])


def test_resigned_with_another_key_of_the_same_name(key: SigningKey) -> None:
    impostor = SigningKey.generate(key.name)
    assert impostor.key_id != key.key_id
    forged = sign_checkpoint(_checkpoint(size=1), impostor)
    with pytest.raises(CheckpointError, match="no signature by a known key"):
        open_checkpoint(forged, [key.verifier()])


def test_signature_with_right_name_and_id_but_wrong_key(key: SigningKey) -> None:
    # A forger can copy the key id into the signature line; the signature is
    # then checked against the configured key and fails.
    impostor = SigningKey.generate(key.name)
    text = _checkpoint().body()
    sig = base64.b64encode(key.key_id + impostor.sign(text))
    note = text + b"\n" + "— ".encode() + key.name.encode() + b" " + sig + b"\n"
    with pytest.raises(CheckpointError, match=f"bad signature from {key.name}"):
        open_checkpoint(note, [key.verifier()])


def test_signature_line_removed(key: SigningKey) -> None:
    note = sign_checkpoint(_checkpoint(), key)
    with pytest.raises(CheckpointError, match="no signature lines"):
        open_checkpoint(note[: note.index(b"\n\n") + 2], [key.verifier()])
    with pytest.raises(CheckpointError, match="no empty line"):
        open_checkpoint(note[: note.index(b"\n\n") + 1], [key.verifier()])


def test_extra_unknown_signature_is_ignored(key: SigningKey) -> None:
    checkpoint = _checkpoint()
    note = sign_checkpoint(checkpoint, key)
    witness = SigningKey.generate("witness.example/w1")
    cosigned = note + sign_note(checkpoint.body(), witness).split(b"\n\n")[1]
    assert open_checkpoint(cosigned, [key.verifier()]) == checkpoint
    assert open_checkpoint(cosigned, [witness.verifier()]) == checkpoint
    assert open_checkpoint(cosigned, [key.verifier(), witness.verifier()]) == checkpoint
    # The same with the unknown signature first, and with junk signature bytes.
    junk = "— someone.else AAAAAAA=\n".encode()
    assert open_checkpoint(note.replace(b"\n\n", b"\n\n" + junk), [key.verifier()]) == checkpoint


def test_bad_signature_from_a_known_cosigner_rejects(key: SigningKey) -> None:
    checkpoint = _checkpoint()
    witness = SigningKey.generate("witness.example/w1")
    bad = base64.b64encode(witness.key_id + bytes(64))
    note = sign_checkpoint(checkpoint, key) + "— witness.example/w1 ".encode() + bad + b"\n"
    assert open_checkpoint(note, [key.verifier()]) == checkpoint
    with pytest.raises(CheckpointError, match=r"bad signature from witness\.example/w1"):
        open_checkpoint(note, [key.verifier(), witness.verifier()])


def test_duplicate_verifier_is_harmless(key: SigningKey) -> None:
    note = sign_checkpoint(_checkpoint(), key)
    assert open_checkpoint(note, [key.verifier(), key.verifier()]) == _checkpoint()


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda n: n[:-1], "missing final newline"),
        (lambda n: n + b"trailing\n", "line 6: not a signature line"),
        (lambda n: n.replace("— ".encode(), b"- "), "line 5: not a signature line"),
        (lambda n: n.replace(b"\n\n", b"\n\x01\n\n"), "line 4: control"),
        (lambda n: n.replace(b"\n\n", b"\n\xff\n\n"), "line 4: not valid UTF-8"),
        (lambda n: n.replace(b" " + n.rsplit(b" ", 1)[1], b"  x"), "line 5"),
        (lambda n: n.rsplit(b" ", 1)[0] + b" AAAA\n", "line 5: signature too short"),
        (lambda n: n.rsplit(b" ", 1)[0] + b"\n", "line 5"),
    ],
)
def test_malformed_notes(key: SigningKey, mangle: Callable[[bytes], bytes], message: str) -> None:
    note = sign_checkpoint(_checkpoint(), key)
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(mangle(note), [key.verifier()])


def test_too_many_signatures(key: SigningKey) -> None:
    note = sign_checkpoint(_checkpoint(), key)
    sig_line = note.split(b"\n\n")[1]
    assert open_checkpoint(note + sig_line * (MAX_SIGNATURES - 1), [key.verifier()])
    with pytest.raises(CheckpointError, match="more than"):
        open_checkpoint(note + sig_line * MAX_SIGNATURES, [key.verifier()])


def test_a_valid_note_that_is_not_a_checkpoint(key: SigningKey) -> None:
    note = sign_note(b"just one line\n", key)
    assert open_note(note, [key.verifier()]) == b"just one line\n"
    with pytest.raises(CheckpointError, match="need origin"):
        open_checkpoint(note, [key.verifier()])


def test_sign_note_rejects_bad_text(key: SigningKey) -> None:
    with pytest.raises(CheckpointError, match="end with a newline"):
        sign_note(b"no newline", key)
    with pytest.raises(CheckpointError, match="control"):
        sign_note(b"tab\there\n", key)


# -- the checkpoint file -------------------------------------------------------


def _file(key: SigningKey, count: int) -> tuple[list[bytes], bytes]:
    notes = [
        sign_checkpoint(_checkpoint(size=i, extensions=("— ext",) * (i % 2)), key)
        for i in range(count)
    ]
    return notes, b"".join(frame_note(n) for n in notes)


def test_split_notes_round_trip(key: SigningKey) -> None:
    notes, data = _file(key, 4)
    assert split_notes(data) == (notes, len(data))
    assert split_notes(b"") == ([], 0)
    for i, note in enumerate(split_notes(data)[0]):
        assert open_checkpoint(note, [key.verifier()], origin=ORIGIN).size == i


def test_split_notes_with_cosignatures(key: SigningKey) -> None:
    witness = SigningKey.generate("witness")
    body = _checkpoint().body()
    note = sign_note(body, key) + sign_note(body, witness).split(b"\n\n")[1]
    data = frame_note(note) * 2
    assert split_notes(data) == ([note, note], len(data))


def test_split_notes_torn_tail_at_every_offset(key: SigningKey) -> None:
    notes, data = _file(key, 2)
    first_end = len(frame_note(notes[0]))
    for cut in range(first_end, len(data)):
        assert split_notes(data[:cut]) == ([notes[0]], first_end), cut
    for cut in range(first_end):
        assert split_notes(data[:cut]) == ([], 0), cut


def test_split_notes_garbage_tail_without_newline(key: SigningKey) -> None:
    notes, data = _file(key, 1)
    assert split_notes(data + b"\x00" * 4096) == (notes, len(data))


def test_split_notes_damage_in_the_middle_raises(key: SigningKey) -> None:
    notes, data = _file(key, 3)
    first = frame_note(notes[0])
    # A first entry that lost its framing newline runs into the next entry.
    with pytest.raises(CheckpointError, match="expected a signature line"):
        split_notes(first[:-1] + data[len(first) :])
    with pytest.raises(CheckpointError, match="unexpected empty line"):
        split_notes(b"\n" + data)
    with pytest.raises(CheckpointError, match="without signatures"):
        split_notes(b"o\n1\nroot\n\n\n" + data)
    damaged = data.replace("— ".encode() + key.name.encode(), "— bad+name".encode(), 1)
    with pytest.raises(CheckpointError, match=r"entry at byte 0.*invalid key name"):
        split_notes(damaged)


def test_frame_note_refuses_text_with_empty_lines(key: SigningKey) -> None:
    note = sign_note(b"para one\n\npara two\n", key)
    assert open_note(note, [key.verifier()]) == b"para one\n\npara two\n"
    with pytest.raises(CheckpointError, match="empty line"):
        frame_note(note)
    with pytest.raises(CheckpointError):
        frame_note(b"not a note\n")
