"""Signed identity tokens (``scalple.token``): compact JWS / JWT verification.

A plain ``scalple.user_id`` is a claim anybody holding the pool's database
password can make.  A token signed by the application's identity provider
is evidence: its ``sub`` and ``email`` claims become the identity with
``verified = true``.

Written directly on ``hmac`` (HS256) and ``cryptography`` (EdDSA, RS256)
instead of a general JWT library, because what is accepted here is tiny and
fixed: compact serialisation only, one algorithm per configured key, a
handful of registered claims.  The usual JWT-library pitfalls are closed by
construction:

* the algorithm is pinned to the key that is configured, never chosen by
  the token: ``alg: none`` is refused, and an HS256 token is checked only
  against the HS256 secret file, never against a public key's PEM bytes
  (the classic RS256/EdDSA -> HS256 key-confusion forgery);
* the signature is checked before any claim is looked at (so a forged token
  is reported as ``bad signature``, not as whatever its claims say);
* ``crit`` headers are refused (RFC 7515 section 4.1.11), JWE (five parts)
  and JSON serialisation are not tokens here, base64url is decoded strictly;
* HS256 secrets shorter than 256 bits and RSA keys shorter than 2048 bits
  are refused at configuration time.

Secrets come only from files.  Nothing here logs; errors carry a fixed
reason (``token expired``, ``bad signature``, ``unsupported algorithm
none``, ...), never the token, a claim value or the secret.

``cryptography`` is imported only when a public key is configured, so an
HS256-only deployment needs nothing beyond the standard library.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

__all__ = ["MAX_TOKEN_LENGTH", "TokenError", "TokenVerifier", "VerifiedToken"]

MAX_TOKEN_LENGTH = 8192
"""Longer strings are refused before any decoding (cheap denial of service)."""

_MIN_HS256_SECRET = 32  # RFC 7518 section 3.2: a key at least as long as the hash
_MIN_RSA_BITS = 2048
_B64URL = re.compile(r"[A-Za-z0-9_-]*\Z")


class TokenError(Exception):
    """A token was refused; ``reason`` is safe to log and to put in a record."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class VerifiedToken(msgspec.Struct, frozen=True, gc=False):
    """What a verified token says about the person.

    ``expires_at`` is the ``exp`` claim (Unix seconds), None if the token
    has none (only accepted with ``require_exp=False``).
    """

    sub: str
    email: str | None
    expires_at: float | None


def _b64url_decode(part: str) -> bytes:
    """Strict base64url without padding (RFC 7515 section 2).

    The standard library silently skips characters outside the alphabet;
    a token with stray characters is malformed, not something to repair.
    """
    if len(part) % 4 == 1 or not _B64URL.match(part):
        raise TokenError("malformed token")
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("malformed token") from None


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        raise TokenError("malformed token") from None
    if not isinstance(value, dict):
        raise TokenError("malformed token")
    return value


def _number(value: Any) -> float | None:
    """A NumericDate claim; bool is not a number here even though Python thinks so."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _printable_alg(alg: str) -> str:
    """The ``alg`` header for an error message: short and printable only."""
    text = "".join(ch for ch in alg[:32] if ch.isprintable())
    return text or "(empty)"


class _PublicKey:
    """A loaded public key and the one algorithm it is used with."""

    __slots__ = ("algorithms", "verify")

    def __init__(self, algorithms: frozenset[str], verify: Callable[[bytes, bytes], bool]):
        self.algorithms = algorithms
        self.verify = verify


def _load_public_key(path: str) -> _PublicKey:
    """Load a PEM public key (or certificate) and pin its algorithm.

    Ed25519 keys verify EdDSA (``alg`` ``EdDSA`` or its fully specified
    name ``Ed25519``); RSA keys verify RS256.  Any other key type, a private
    key, or a short RSA key is a configuration error.
    """
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

    data = Path(path).read_bytes()
    try:
        key: Any = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            key = x509.load_pem_x509_certificate(data).public_key()
        except ValueError:
            raise ValueError(
                f"{path}: not a PEM public key or certificate (a private key does not "
                "belong on the proxy: give the public half)"
            ) from None

    if isinstance(key, ed25519.Ed25519PublicKey):
        ed_key = key

        def verify_ed25519(signature: bytes, signed: bytes) -> bool:
            try:
                ed_key.verify(signature, signed)
            except (InvalidSignature, ValueError):
                return False
            return True

        return _PublicKey(frozenset({"EdDSA", "Ed25519"}), verify_ed25519)

    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise ValueError(f"{path}: RSA key of {key.key_size} bits, at least 2048 needed")
        rsa_key = key

        def verify_rs256(signature: bytes, signed: bytes) -> bool:
            try:
                rsa_key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())
            except (InvalidSignature, ValueError):
                return False
            return True

        return _PublicKey(frozenset({"RS256"}), verify_rs256)

    raise ValueError(f"{path}: unsupported key type {type(key).__name__} (Ed25519 or RSA)")


# Refusals that stay true for ever, so they can be cached like successes.
# ("token not yet valid" is not one of them.)
_PERMANENT = frozenset(
    {
        "malformed token",
        "token too large",
        "bad signature",
        "token expired",
        "token has no expiry",
        "token has no sub claim",
        "audience mismatch",
        "issuer mismatch",
        "unsupported critical header",
    }
)


class TokenVerifier:
    """Verifies ``scalple.token`` values; configured once, shared by sessions.

    Parameters
    ----------
    hs256_secret_file: file holding the shared HS256 secret (raw bytes; a
        trailing newline is ignored; at least 32 bytes).
    public_key_file: PEM public key (or certificate): Ed25519 -> EdDSA,
        RSA (>= 2048 bits) -> RS256.  Both files may be given (e.g. while
        migrating); each algorithm is still checked only with its own key.
    audience: when set, ``aud`` (a string or a list) must contain it.  When
        unset, a token that carries an ``aud`` is refused (RFC 7519 section
        4.1.3: it was meant for somebody else).
    issuer: when set, ``iss`` must equal it.
    leeway: seconds of clock skew tolerated for ``exp`` and ``nbf``.
    require_exp: refuse tokens without ``exp`` (a token that never expires
        is a password in disguise).
    cache_size: verified tokens remembered (LRU), so the token an
        application repeats on every statement is verified once, not per
        statement.  Permanent refusals are remembered too.
    clock: Unix time source, for tests.

    Not thread-safe: used from the event loop only.
    """

    __slots__ = (
        "_algorithms",
        "_audience",
        "_cache",
        "_cache_size",
        "_issuer",
        "_public",
        "_secret",
        "clock",
        "leeway",
        "require_exp",
    )

    def __init__(
        self,
        hs256_secret_file: str | None = None,
        public_key_file: str | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 30.0,
        *,
        require_exp: bool = True,
        cache_size: int = 1024,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if hs256_secret_file is None and public_key_file is None:
            raise ValueError("token verification needs hs256_secret_file or public_key_file")
        if leeway < 0:
            raise ValueError("leeway must not be negative")
        self._secret: bytes | None = None
        if hs256_secret_file is not None:
            secret = Path(hs256_secret_file).read_bytes().rstrip(b"\r\n")
            if len(secret) < _MIN_HS256_SECRET:
                raise ValueError(
                    f"{hs256_secret_file}: HS256 secret of {len(secret)} bytes, "
                    f"at least {_MIN_HS256_SECRET} needed"
                )
            self._secret = secret
        self._public = _load_public_key(public_key_file) if public_key_file else None
        algorithms: set[str] = set()
        if self._secret is not None:
            algorithms.add("HS256")
        if self._public is not None:
            algorithms |= self._public.algorithms
        self._algorithms = frozenset(algorithms)
        self._audience = audience
        self._issuer = issuer
        self.leeway = float(leeway)
        self.require_exp = require_exp
        self.clock = clock
        self._cache_size = max(0, cache_size)
        self._cache: OrderedDict[str, VerifiedToken | str] = OrderedDict()

    def __repr__(self) -> str:  # never the secret
        return f"TokenVerifier(algorithms={sorted(self.algorithms)})"

    @property
    def algorithms(self) -> frozenset[str]:
        """The ``alg`` values accepted with the configured keys."""
        return self._algorithms

    def verify(self, token: str) -> VerifiedToken:
        """Check ``token`` and return what it says; raise :class:`TokenError`.

        A cached success is re-checked against the clock, so a token that
        expires while cached is refused from then on.
        """
        cached = self._cache.get(token)
        if cached is not None:
            self._cache.move_to_end(token)
            if isinstance(cached, str):
                raise TokenError(cached)
            if cached.expires_at is not None and self.clock() > cached.expires_at + self.leeway:
                self._remember(token, "token expired")
                raise TokenError("token expired")
            return cached
        try:
            verified = self._verify(token)
        except TokenError as exc:
            if exc.reason in _PERMANENT:
                self._remember(token, exc.reason)
            raise
        self._remember(token, verified)
        return verified

    def _remember(self, token: str, outcome: VerifiedToken | str) -> None:
        if self._cache_size == 0 or len(token) > MAX_TOKEN_LENGTH:
            return
        cache = self._cache
        cache[token] = outcome
        cache.move_to_end(token)
        while len(cache) > self._cache_size:
            cache.popitem(last=False)

    def _verify(self, token: str) -> VerifiedToken:
        if len(token) > MAX_TOKEN_LENGTH:
            raise TokenError("token too large")
        parts = token.strip().split(".")
        if len(parts) != 3:
            raise TokenError("malformed token")
        header_b64, payload_b64, signature_b64 = parts
        header = _json_object(_b64url_decode(header_b64))
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise TokenError("malformed token")
        if alg not in self._algorithms:
            raise TokenError(f"unsupported algorithm {_printable_alg(alg)}")
        if "crit" in header:
            raise TokenError("unsupported critical header")
        signature = _b64url_decode(signature_b64)
        signed = f"{header_b64}.{payload_b64}".encode("ascii")
        if alg == "HS256":
            assert self._secret is not None  # alg in self.algorithms
            expected = hmac.new(self._secret, signed, hashlib.sha256).digest()
            good = hmac.compare_digest(expected, signature)
        else:
            assert self._public is not None
            good = self._public.verify(signature, signed)
        if not good:
            raise TokenError("bad signature")
        return self._claims(_json_object(_b64url_decode(payload_b64)))

    def _claims(self, claims: dict[str, Any]) -> VerifiedToken:
        """Registered-claim checks, only ever on a signature-verified payload."""
        now = self.clock()
        exp: float | None = None
        if "exp" in claims:
            exp = _number(claims["exp"])
            if exp is None:
                raise TokenError("malformed token")
            if now > exp + self.leeway:
                raise TokenError("token expired")
        elif self.require_exp:
            raise TokenError("token has no expiry")
        if "nbf" in claims:
            nbf = _number(claims["nbf"])
            if nbf is None:
                raise TokenError("malformed token")
            if now + self.leeway < nbf:
                raise TokenError("token not yet valid")
        if self._issuer is not None and claims.get("iss") != self._issuer:
            raise TokenError("issuer mismatch")
        if "aud" in claims or self._audience is not None:
            aud = claims.get("aud")
            audiences = aud if isinstance(aud, list) else [aud]
            if self._audience is None or self._audience not in audiences:
                raise TokenError("audience mismatch")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise TokenError("token has no sub claim")
        email = claims.get("email")
        return VerifiedToken(
            sub=sub, email=email if isinstance(email, str) and email else None, expires_at=exp
        )
