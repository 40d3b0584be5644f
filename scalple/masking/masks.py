"""The masks that keep personal data values out of the audit log.

A mask turns the value of one literal (or bound parameter) into what the log
may hold.  ``redact``, ``email`` and ``partial`` keep at most a few
characters that let a reviewer tell values apart at a glance; ``pseudonym``
keeps nothing readable but stays equal for equal values, so a reviewer can
still see that two statements touched the same person.  Pseudonyms and
subject tags are keyed BLAKE3 hashes: without the key, a guessed value (a
phone number, an email) cannot be confirmed against the log by hashing it.

Hashes are taken over the *text* of a value as the caller passes it, so the
integer literal ``42``, the string ``'42'`` and a text-format parameter
``42`` give the same pseudonym.  Nothing is stripped or case-folded: the
value is the value.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from blake3 import blake3

from scalple._wire import LIT_NUMBER

__all__ = [
    "KEY_CONTEXT",
    "KEY_SIZE",
    "MASKS",
    "REDACTED",
    "Masker",
    "key_from_file",
    "mask_email",
    "mask_literal_token",
    "mask_partial",
]

MASKS = frozenset({"email", "partial", "redact", "pseudonym"})
"""Mask names accepted in the configuration."""

KEY_SIZE = 32
KEY_CONTEXT = "scalple masking key v1"
"""BLAKE3 derive-key context that turns the secret file into the masking key."""

REDACTED = "***"

# Domain separation: the first byte of every keyed-hash input says what the
# hash is for, so a pseudonym can never equal a subject tag computed over
# the same bytes, and neither can be replayed as the other.
_PSEUDONYM_DOMAIN = b"\x00"
_SUBJECT_DOMAIN = b"\x01"

_PSEUDONYM_HEX = 12
_SUBJECT_HEX = 24

# The one part of a domain an email mask keeps: a top-level domain says
# little about a person, but only a label that looks like one is kept, so
# that "x@y.0612345678" does not keep a phone number.
_TLD = re.compile(r"(?:[A-Za-z]{2,63}|xn--[A-Za-z0-9-]{1,59})", re.ASCII)

# What mask_literal_token may write unquoted in place of a number.
_PLAIN_NUMBER = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?", re.ASCII)


def _utf8(text: str) -> bytes:
    """UTF-8 of ``text`` that never raises: lone surrogates are encoded as is.

    A value decoded elsewhere with ``surrogateescape`` must still hash
    stably rather than crash the audit path.
    """
    return text.encode("utf-8", "surrogatepass")


def mask_email(value: str) -> str:
    """``j.muller@company.com`` -> ``j***@***.com``; no ``@`` -> ``***``."""
    local, at, domain = value.rpartition("@")
    if not at:
        return REDACTED
    first = local[:1]
    _, dot, tld = domain.rpartition(".")
    if dot and _TLD.fullmatch(tld):
        return f"{first}***@***.{tld}"
    return f"{first}***@***"


def mask_partial(value: str) -> str:
    """``+33612345678`` -> ``***78``: the last two characters, ``***`` if that is all."""
    if len(value) <= 2:
        return REDACTED
    return REDACTED + value[-2:]


class Masker:
    """Applies the configured masks with the deployment's secret key.

    The key only matters for ``pseudonym`` and :meth:`subject_tag`; it is
    kept in the object and never shown by its ``repr``.
    """

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"masking key must be {KEY_SIZE} bytes, not {len(key)}")
        self._key = bytes(key)

    def __repr__(self) -> str:
        return "Masker(<key>)"

    def mask(self, kind: str, value: str) -> str:
        """The masked form of ``value`` under the mask named ``kind``."""
        if kind == "pseudonym":
            return self.pseudonym(value)
        if kind == "redact":
            return REDACTED
        if kind == "email":
            return mask_email(value)
        if kind == "partial":
            return mask_partial(value)
        raise ValueError(f"unknown mask {kind!r}; known masks: {', '.join(sorted(MASKS))}")

    def pseudonym(self, value: str) -> str:
        """``pn_`` and 12 hex digits of a keyed hash: equal values, equal pseudonyms."""
        digest = blake3(_PSEUDONYM_DOMAIN + _utf8(value), key=self._key)
        return "pn_" + digest.hexdigest(_PSEUDONYM_HEX // 2)

    def subject_tag(self, subject_kind: str, value: str) -> str:
        """``sub_`` and 24 hex digits naming a data subject (``customer_id`` 42, ...).

        The kind is hashed with the value, so customer 42 and employee 42 get
        different tags; its length comes first, so no split of the input
        into kind and value can be mistaken for another.  The domain byte
        keeps tags apart from pseudonyms.  Longer than a pseudonym because
        tags are looked up across the whole log.
        """
        kind = _utf8(subject_kind)
        data = _SUBJECT_DOMAIN + len(kind).to_bytes(4, "big") + kind + _utf8(value)
        return "sub_" + blake3(data, key=self._key).hexdigest(_SUBJECT_HEX // 2)


def key_from_file(path: str | os.PathLike[str]) -> bytes:
    """The 32-byte masking key derived from the secret file at ``path``.

    The file may hold any secret of at least 32 bytes (one trailing newline,
    as editors add, is not part of it); deriving the key rather than using
    the bytes as they are lets the secret be text of any length.  Errors
    name the file but never show its content.
    """
    where = Path(path)
    try:
        secret = where.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read masking key file {where}: {exc.strerror}") from exc
    if secret.endswith(b"\r\n"):
        secret = secret[:-2]
    elif secret.endswith(b"\n"):
        secret = secret[:-1]
    if len(secret) < KEY_SIZE:
        raise ValueError(
            f"masking key file {where} holds fewer than {KEY_SIZE} bytes of secret "
            f"(e.g. write the output of `head -c 32 /dev/urandom | base64` to it)"
        )
    return blake3(secret, derive_key_context=KEY_CONTEXT).digest()


def mask_literal_token(kind: int, token: bytes, masked_value: str) -> bytes:
    """The text that replaces the literal ``token`` (of lexer ``kind``) in a masked query.

    A masked value becomes a standard-quoted string ``'<masked>'`` with its
    quotes doubled, whatever the literal's form: no escape, prefix or dollar
    tag of the original survives to hint at its content, and the masked query
    stays valid SQL for tools that re-parse the log (an untyped string is
    accepted wherever a constant is; a bare ``***`` is not).  The one
    exception keeps numbers readable: for a ``LIT_NUMBER`` whose masked text
    is itself a plain decimal number (a value the caller chose to keep), that
    text is written unquoted.  Nothing of ``token`` is copied; it is taken so
    that every caller hands over the original form should a kind ever need a
    format of its own.

    Two literals with nothing between them (``1'a'``, possible only in text
    the server rejects) become ``'***''***'``, which reads back as one
    string; a caller splicing tokens may add a space where two replaced
    tokens touch.
    """
    if kind == LIT_NUMBER and _PLAIN_NUMBER.fullmatch(masked_value):
        return masked_value.encode("ascii")
    return b"'" + masked_value.replace("'", "''").encode("utf-8", "replace") + b"'"
