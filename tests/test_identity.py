"""Identity channels: sqlcommenter comments, SET / set_config, signed tokens,
and how IdentityState merges them.  Pure unit tests: no server needed.

Tokens are built here by hand (base64url + hmac / cryptography), not with
the verifier under test, so a bug in one cannot hide a bug in the other.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from scalple.identity import comment as comment_mod
from scalple.identity import settings as settings_mod
from scalple.identity.comment import parse_sqlcommenter
from scalple.identity.settings import IdentityChange, identity_changes
from scalple.identity.startup import StartupIdentity
from scalple.identity.state import (
    DYNAMIC_PROBLEM,
    NO_TOKEN_VERIFIER,
    Identity,
    IdentityState,
)
from scalple.identity.token import TokenError, TokenVerifier, VerifiedToken

NOW = 1_700_000_000.0
SECRET = b"s3cret-s3cret-s3cret-s3cret-s3cret-42"


# --- helpers -----------------------------------------------------------------


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(
    claims: dict[str, Any],
    sign: Callable[[bytes], bytes] | None,
    alg: str,
    **header: Any,
) -> str:
    head = b64(json.dumps({"alg": alg, "typ": "JWT", **header}).encode())
    body = b64(json.dumps(claims).encode())
    signing_input = f"{head}.{body}".encode()
    signature = sign(signing_input) if sign else b""
    return f"{head}.{body}.{b64(signature)}"


def hs256(secret: bytes = SECRET) -> Callable[[bytes], bytes]:
    return lambda data: hmac.new(secret, data, hashlib.sha256).digest()


def claims(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "u-42", "email": "ann@example.com", "exp": NOW + 600}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


@pytest.fixture
def secret_file(tmp_path: Path) -> str:
    path = tmp_path / "hs256.secret"
    path.write_bytes(SECRET + b"\n")  # `echo secret > file` leaves a newline
    return str(path)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def hs_verifier(secret_file: str, clock: Clock) -> TokenVerifier:
    return TokenVerifier(hs256_secret_file=secret_file, clock=clock)


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture
def ed_pem_file(tmp_path: Path, ed_key: ed25519.Ed25519PrivateKey) -> str:
    path = tmp_path / "ed25519.pem"
    path.write_bytes(public_pem(ed_key))
    return str(path)


@pytest.fixture
def rsa_pem_file(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> str:
    path = tmp_path / "rsa.pem"
    path.write_bytes(public_pem(rsa_key))
    return str(path)


def refused(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(TokenError) as info:
        verifier.verify(token)
    return info.value.reason


# --- sqlcommenter ------------------------------------------------------------


class TestSqlcommenter:
    def test_comment_at_end(self) -> None:
        sql = "SELECT * FROM t /*scalple.email='ann%40example.com',scalple.user_id='42'*/"
        assert parse_sqlcommenter(sql) == {
            "scalple.email": "ann@example.com",
            "scalple.user_id": "42",
        }

    def test_comment_at_start_and_trailing_semicolon(self) -> None:
        assert parse_sqlcommenter("/*scalple.user_id='7'*/ SELECT 1;") == {"scalple.user_id": "7"}
        assert parse_sqlcommenter("SELECT 1 /*scalple.user_id='7'*/;") == {"scalple.user_id": "7"}
        assert parse_sqlcommenter("SELECT 1; /*scalple.user_id='7'*/") == {"scalple.user_id": "7"}

    def test_other_sqlcommenter_keys_ignored(self) -> None:
        sql = (
            "SELECT 1 /*action='%2Flist',controller='users',db_driver='psycopg',"
            "scalple.user_id='42',"
            "traceparent='00-5bd66ef5095369c7b0d1f8f4bd33716a-c532cb4098ac3dd2-01',"
            "tracestate='congo%3Dt61rcWkgMzE%2Crojo%3D00f067aa0ba902b7'*/"
        )
        assert parse_sqlcommenter(sql) == {"scalple.user_id": "42"}

    def test_escaped_quote_and_percent_encoding(self) -> None:
        sql = r"SELECT 1 /*scalple.user_id='o\'brien%20jr',scalple.email='a%2Bb%40x.org'*/"
        assert parse_sqlcommenter(sql) == {
            "scalple.user_id": "o'brien jr",
            "scalple.email": "a+b@x.org",
        }

    def test_percent_encoded_quote(self) -> None:
        # Python's urllib.parse.quote (OpenTelemetry) writes ' as %27.
        assert parse_sqlcommenter("SELECT 1 /*scalple.user_id='o%27brien'*/") == {
            "scalple.user_id": "o'brien"
        }

    def test_whitespace_tolerated(self) -> None:
        sql = "SELECT 1 /* scalple.user_id='1' , scalple.email='e' */"
        assert parse_sqlcommenter(sql) == {"scalple.user_id": "1", "scalple.email": "e"}

    def test_key_case_folded(self) -> None:
        assert parse_sqlcommenter("SELECT 1 /*Scalple.User_Id='1'*/") == {"scalple.user_id": "1"}

    def test_token_value(self) -> None:
        token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln-_x"
        assert parse_sqlcommenter(f"SELECT 1 /*scalple.token='{token}'*/") == {
            "scalple.token": token
        }

    @pytest.mark.parametrize(
        "sql",
        [
            "SELECT '/*scalple.user_id=''evil''*/'",
            "SELECT '/*scalple.user_id=''evil''*/' /*other='x'*/",
            "SELECT E'\\' /*scalple.user_id=\\'evil\\'*/'",
            "SELECT $$ /*scalple.user_id='evil'*/ $$",
            "SELECT $tag$ /*scalple.user_id='evil'*/ $tag$",
            "SELECT 1 AS \"/*scalple.user_id='evil'*/\"",
            "SELECT 1 -- /*scalple.user_id='evil'*/",
        ],
    )
    def test_not_fooled_by_literals(self, sql: str) -> None:
        assert parse_sqlcommenter(sql) == {}

    @pytest.mark.parametrize(
        "sql",
        [
            "SELECT 1 /* scalple.user_id=42 */",  # prose, not sqlcommenter
            "SELECT 1 /* set by scalple.user_id='42' */",
            "SELECT 1 /*scalple.user_id='42*/",  # unterminated value
            "SELECT 1 /*scalple.user_id='42',*/",  # dangling comma
            "SELECT 1 /*scalple.user_id='42' scalple.email='x'*/",  # no comma
            "SELECT 1 /*scalple.user_id=42*/",  # unquoted
            "SELECT 1 /*scalple.user_id='1' /* nested */ */",
            "SELECT 1 /*scalple.user_id='1'",  # unterminated comment: a syntax error
            "SELECT 'x /*scalple.user_id='1'*/",  # unterminated literal
            "SELECT 1 /**/",
            "SELECT 1 /*=''*/ scalple.",
            "",
        ],
    )
    def test_malformed_ignored(self, sql: str) -> None:
        assert parse_sqlcommenter(sql) == {}

    def test_ordinary_comments_beside(self) -> None:
        sql = "/* report */ SELECT 1 -- why\n /*scalple.user_id='3'*/"
        assert parse_sqlcommenter(sql) == {"scalple.user_id": "3"}

    def test_non_ascii_before_comment(self) -> None:
        sql = "SELECT 'ünïcødé ☃' /*scalple.user_id='%C3%A9'*/; SELECT 2"
        assert parse_sqlcommenter(sql) == {"scalple.user_id": "é"}
        assert parse_sqlcommenter(sql, 0) == {"scalple.user_id": "é"}
        assert parse_sqlcommenter(sql, 1) == {}

    def test_per_statement_index(self) -> None:
        sql = (
            "/*scalple.user_id='a'*/ SELECT 1; SELECT 2 /*scalple.user_id='b'*/;"
            " SELECT 3;; SELECT 4 /*scalple.user_id='d'*/; /*scalple.email='tail'*/"
        )
        assert parse_sqlcommenter(sql, 0) == {"scalple.user_id": "a"}
        assert parse_sqlcommenter(sql, 1) == {"scalple.user_id": "b"}
        assert parse_sqlcommenter(sql, 2) == {}
        assert parse_sqlcommenter(sql, 3) == {"scalple.user_id": "d", "scalple.email": "tail"}
        assert parse_sqlcommenter(sql, 4) == {}
        assert parse_sqlcommenter(sql)["scalple.user_id"] == "d"  # whole text: last wins

    def test_semicolon_inside_function_body_does_not_split(self) -> None:
        sql = (
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1; SELECT 2 $$;"
            " SELECT f() /*scalple.user_id='x'*/"
        )
        assert parse_sqlcommenter(sql, 1) == {"scalple.user_id": "x"}
        assert parse_sqlcommenter(sql, 0) == {}

    def test_no_scan_without_comment_opener(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def boom(sql: str) -> Any:
            raise AssertionError("scanned")

        monkeypatch.setattr("scalple.identity.comment.pg_parser.scan", boom)
        comment_mod._scalple_pairs.cache_clear()
        assert parse_sqlcommenter("SET scalple.user_id = 'x'") == {}

    @pytest.mark.parametrize(
        "sql",
        [
            # an E'' string continued on the next line keeps its escapes
            "SELECT E'a'\n'b\\' /*scalple.user_id=\\'evil\\'*/'",
            "SELECT E'a' -- note\n  'b\\' /*scalple.user_id=\\'evil\\'*/'",
            # $E'..': a lone "$", then an E'' string
            "SELECT $E'\\' /*scalple.user_id=\\'evil\\'*/'",
            # right after a dollar quote, E'..' is an E string
            "SELECT $$x$$E'\\' /*scalple.user_id=\\'evil\\'*/'",
            # nested comment: the inner one is part of an ordinary comment
            "SELECT 1 /* note /*scalple.user_id='evil'*/ still a note */",
        ],
    )
    def test_lexer_edge_cases(self, sql: str) -> None:
        assert parse_sqlcommenter(sql) == {}

    @pytest.mark.parametrize(
        "sql",
        [
            "SELECT a$b$c, x$$ /*scalple.user_id='1'*/",  # "$" inside names
            "SELECT namE'x' /*scalple.user_id='1'*/",  # E ends a name: '..' is standard
            "SELECT 'a\\' /*scalple.user_id='1'*/",  # no escapes in standard strings
            "SELECT $q$ $$ $q$ /*scalple.user_id='1'*/",
            "SELECT 'a'\n'b' /*scalple.user_id='1'*/",  # continued standard string
            "SELECT 1$$x$$ /*scalple.user_id='1'*/",  # ambiguous for the lexer: pglast
            "SELECT 2*/**/3 /*scalple.user_id='1'*/",
            "SELECT 1 /**/ /*scalple.user_id='1'*/ /*/ x */",
        ],
    )
    def test_lexer_finds_real_comment(self, sql: str) -> None:
        assert parse_sqlcommenter(sql) == {"scalple.user_id": "1"}

    @settings(max_examples=2000, deadline=None)
    @given(
        st.lists(
            st.sampled_from(
                [
                    *"/*'\"$;-\\eEuU&x1 \n\t\v\fé_",
                    *["/*", "*/", "--", "$$", "$a$", "E'", "U&'", "''", "\\'", "\n'"],
                    "; SELECT 1",
                ]
            ),
            max_size=25,
        ).map("".join)
    )
    def test_lexer_agrees_with_pglast(self, sql: str) -> None:
        reference = comment_mod._lex_with_pglast(sql)
        try:
            mine = comment_mod._lex(sql)
        except comment_mod._Ambiguous:
            return  # handed to pglast in production
        if reference is None:
            return  # PostgreSQL rejects the text; the statement fails anyway
        assert mine is not None
        assert mine.comments == reference.comments
        assert mine.semicolons == reference.semicolons
        assert comment_mod._several_statements(sql, mine) == comment_mod._several_statements(
            sql, reference
        )

    @pytest.mark.parametrize(
        "sql",
        [
            "SELECT E'x'" + " -- a" * 20000,
            "SELECT E'x'\n" + " \n" * 20000 + "x /*scalple.user_id='1'*/",
            "SELECT 1 /*" + "scalple.user_id='1'," * 5000 + "x='y'*/",
            "SELECT 1 /*" + "a='\\" * 20000 + "*/ scalple.",
            "/*" * 20000 + "*/" * 20000 + " scalple.",
        ],
    )
    def test_hostile_input_is_linear(self, sql: str) -> None:
        started = time.perf_counter()
        parse_sqlcommenter(sql)
        parse_sqlcommenter(sql, 1)
        assert time.perf_counter() - started < 2.0

    @settings(max_examples=300, deadline=None)
    @given(st.text(alphabet=st.sampled_from(list("/*'\"$;-\\=,% \nscalple._ab1é")), max_size=60))
    def test_never_raises(self, sql: str) -> None:
        result = parse_sqlcommenter(sql + " scalple.")
        assert all(key.startswith("scalple.") for key in result)
        for index in range(3):
            parse_sqlcommenter(sql, index)


# --- SET / RESET / set_config --------------------------------------------------


def change(index: int, key: str | None, value: str | None, scope: str = "session", **kw: Any):
    return IdentityChange(index, key, value, scope, **kw)  # type: ignore[arg-type]


class TestIdentityChanges:
    @pytest.mark.parametrize(
        ("sql", "expected"),
        [
            ("SET scalple.user_id = 'ann'", change(0, "user_id", "ann")),
            ("SET scalple.user_id TO 'ann'", change(0, "user_id", "ann")),
            ("set scalple.user_id to ann", change(0, "user_id", "ann")),
            ("SET scalple.user_id = Ann", change(0, "user_id", "ann")),  # folded, like PG
            ('SET scalple.user_id = "Ann"', change(0, "user_id", "Ann")),
            ("SET scalple.user_id = 42", change(0, "user_id", "42")),
            ("SET scalple.user_id = -7", change(0, "user_id", "-7")),
            ("SET scalple.user_id = 4.50", change(0, "user_id", "4.50")),
            ("SET scalple.user_id = E'o\\'b'", change(0, "user_id", "o'b")),
            ("SET SESSION scalple.email = 'a@b.c'", change(0, "email", "a@b.c")),
            ("SET LOCAL scalple.user_id = 'ann'", change(0, "user_id", "ann", "local")),
            ("SET LOCAL scalple.user_id TO 42", change(0, "user_id", "42", "local")),
            ("SET scalple.user_id = DEFAULT", change(0, "user_id", None)),
            ("SET scalple.user_id TO DEFAULT", change(0, "user_id", None)),
            ("SET LOCAL scalple.user_id TO DEFAULT", change(0, "user_id", None, "local")),
            ("RESET scalple.user_id", change(0, "user_id", None)),
            ("RESET ALL", change(0, None, None, reset_all=True)),
            ("DISCARD ALL", change(0, None, None, reset_all=True)),
            ("discard all;", change(0, None, None, reset_all=True)),
            ("SET \"Scalple.User_ID\" = 'x'", change(0, "user_id", "x")),
            ("SET SCALPLE.USER_ID = 'x'", change(0, "user_id", "x")),
            ("SET scalple.token = 'a.b.c'", change(0, "token", "a.b.c")),
            ("SET scalple.tenant = 'acme'", change(0, "tenant", "acme")),
        ],
    )
    def test_set_forms(self, sql: str, expected: IdentityChange) -> None:
        assert identity_changes(sql) == [expected]

    @pytest.mark.parametrize(
        "sql",
        [
            "SET search_path = public",
            "RESET search_path",
            "DISCARD PLANS",
            "DISCARD TEMP",
            "SET scalple.user_id FROM CURRENT",
            "SELECT 'scalple.user_id'",
            "SELECT set_config('search_path', 'x', false)",
            "SELECT password_reset FROM users",
            "SET scalple.user_id = ",  # syntax error
            "SELECT 'unterminated scalple.",
            "",
        ],
    )
    def test_no_identity_change(self, sql: str) -> None:
        assert identity_changes(sql) == []

    @pytest.mark.parametrize(
        ("sql", "expected"),
        [
            (
                "SELECT set_config('scalple.user_id', 'ann', true)",
                change(0, "user_id", "ann", "local"),
            ),
            (
                "SELECT set_config('scalple.user_id', 'ann', false)",
                change(0, "user_id", "ann"),
            ),
            (
                "select pg_catalog.set_config('scalple.email', 'a@b', 'on')",
                change(0, "email", "a@b", "local"),
            ),
            (
                "SELECT set_config('scalple.user_id', '7'::text, 'f'::boolean)",
                change(0, "user_id", "7"),
            ),
            (
                "SELECT 1, set_config('Scalple.User_Id', 'x', TRUE) AS s, now()",
                change(0, "user_id", "x", "local"),
            ),
            (
                "SELECT set_config('scalple.user_id', NULL, false)",
                change(0, "user_id", None),
            ),
            (
                "SELECT * FROM (SELECT set_config('scalple.user_id', 'sub', false)) s",
                change(0, "user_id", "sub"),
            ),
            (
                "EXPLAIN ANALYZE SELECT set_config('scalple.user_id', 'e', false)",
                change(0, "user_id", "e"),
            ),
        ],
    )
    def test_set_config_forms(self, sql: str, expected: IdentityChange) -> None:
        assert identity_changes(sql) == [expected]

    def test_set_config_calls_in_text_order(self) -> None:
        sql = (
            "SELECT set_config('scalple.user_id', 'u', true),"
            " set_config('scalple.email', 'e', true), set_config('other.x', 'y', true)"
        )
        assert identity_changes(sql) == [
            change(0, "user_id", "u", "local"),
            change(0, "email", "e", "local"),
        ]

    @pytest.mark.parametrize(
        "sql",
        [
            "EXPLAIN SELECT set_config('scalple.user_id', 'x', false)",
            "CREATE VIEW v AS SELECT set_config('scalple.user_id', 'x', false)",
            "PREPARE p AS SELECT set_config('scalple.user_id', 'x', false)",
            "CREATE TABLE t AS SELECT set_config('scalple.user_id', 'x', false) WITH NO DATA",
        ],
    )
    def test_set_config_not_executed(self, sql: str) -> None:
        assert identity_changes(sql) == []

    def test_dynamic_value(self) -> None:
        assert identity_changes("SELECT set_config('scalple.user_id', current_user, false)") == [
            change(0, "user_id", None, dynamic=True)
        ]
        sql = "SELECT set_config('scalple.user_id', (SELECT id FROM u LIMIT 1)::text, true)"
        assert identity_changes(sql) == [change(0, "user_id", None, "local", dynamic=True)]

    def test_dynamic_name(self) -> None:
        sql = "SELECT set_config('scalple.' || 'user_id', 'x', false)"
        assert identity_changes(sql) == [change(0, None, None, dynamic=True)]

    def test_dynamic_is_local(self) -> None:
        sql = "SELECT set_config('scalple.user_id', 'x', random() > 0.5)"
        assert identity_changes(sql) == [change(0, "user_id", None, dynamic=True)]

    def test_bind_parameters(self) -> None:
        sql = "SELECT set_config('scalple.user_id', $1, $2)"
        assert identity_changes(sql) == [change(0, "user_id", None, dynamic=True)]
        assert identity_changes(sql, [b"42", b"true"]) == [change(0, "user_id", "42", "local")]
        # asyncpg: binary format (bytearray); text is UTF-8, bool is one byte
        assert identity_changes(sql, [bytearray(b"42"), bytearray(b"\x00")]) == [
            change(0, "user_id", "42")
        ]
        assert identity_changes(sql, [None, b"f"]) == [change(0, "user_id", None)]
        assert identity_changes(sql, [b"42"]) == [change(0, "user_id", None, dynamic=True)]
        named = "SELECT set_config($1, $2, false)"
        assert identity_changes(named, ["scalple.email", "e@x"]) == [change(0, "email", "e@x")]
        assert identity_changes(named, ["search_path", "x"]) == []

    def test_multi_statement_indexes(self) -> None:
        sql = (
            "SET scalple.user_id = 'a'; SELECT 1;; "
            "/* c */ SET LOCAL scalple.email TO 'e'; "
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1; SELECT 2 $$; "
            "SELECT set_config('scalple.user_id', 'b', true); RESET ALL"
        )
        assert identity_changes(sql) == [
            change(0, "user_id", "a"),
            change(2, "email", "e", "local"),
            change(4, "user_id", "b", "local"),
            change(5, None, None, reset_all=True),
        ]

    def test_begin_atomic_body_does_not_split(self) -> None:
        sql = (
            "CREATE FUNCTION g() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT 2; END;"
            " SET scalple.user_id = 'z'"
        )
        assert identity_changes(sql) == [change(1, "user_id", "z")]

    def test_prefilter_skips_parse(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def boom(sql: str) -> Any:
            raise AssertionError("parsed")

        monkeypatch.setattr(settings_mod, "_templates", boom)
        assert identity_changes("SELECT * FROM users WHERE id = 1") == []
        assert identity_changes("SET search_path = public") == []
        # scalple. only in a sqlcommenter comment: a SELECT, not a SET
        assert identity_changes("SELECT 1 /*scalple.user_id='1'*/") == []
        assert identity_changes("SELECT 1 -- scalple.user_id\n") == []

    def test_set_after_case_changing_unicode(self) -> None:
        # "İ".lower() is two characters: positions must not drift
        sql = "SELECT '" + "İ" * 40 + "'; SET scalple.user_id = 'x' /*scalple.user_id='y'*/"
        assert identity_changes(sql) == [change(1, "user_id", "x")]

    def test_set_with_comment_still_parsed(self) -> None:
        sql = "SET /* why */ scalple.user_id = 'x' /*scalple.user_id='y'*/"
        assert identity_changes(sql) == [change(0, "user_id", "x")]
        assert identity_changes("SET \"scalple.user_id\" = 'q'") == [change(0, "user_id", "q")]

    @settings(max_examples=200, deadline=None)
    @given(st.text(max_size=80))
    def test_never_raises(self, sql: str) -> None:
        assert isinstance(identity_changes("SET scalple.x = 1; " + sql), list)


# --- tokens ------------------------------------------------------------------------


class TestTokens:
    def test_hs256_good(self, hs_verifier: TokenVerifier) -> None:
        got = hs_verifier.verify(jwt(claims(), hs256(), "HS256"))
        assert got == VerifiedToken(sub="u-42", email="ann@example.com", expires_at=NOW + 600)

    def test_expired_beyond_leeway(self, hs_verifier: TokenVerifier) -> None:
        assert refused(hs_verifier, jwt(claims(exp=NOW - 31), hs256(), "HS256")) == "token expired"
        # within the (default 30 s) leeway: still fine
        assert hs_verifier.verify(jwt(claims(exp=NOW - 29), hs256(), "HS256")).sub == "u-42"

    def test_configurable_leeway(self, secret_file: str, clock: Clock) -> None:
        verifier = TokenVerifier(hs256_secret_file=secret_file, leeway=0, clock=clock)
        assert refused(verifier, jwt(claims(exp=NOW - 1), hs256(), "HS256")) == "token expired"

    def test_forged_signature(self, hs_verifier: TokenVerifier) -> None:
        forged = jwt(claims(), hs256(b"another-secret-another-secret-!!"), "HS256")
        assert refused(hs_verifier, forged) == "bad signature"

    def test_tampered_payload(self, hs_verifier: TokenVerifier) -> None:
        head, _, sig = jwt(claims(), hs256(), "HS256").split(".")
        evil = b64(json.dumps(claims(sub="admin")).encode())
        assert refused(hs_verifier, f"{head}.{evil}.{sig}") == "bad signature"

    def test_forged_expired_token_reports_signature(self, hs_verifier: TokenVerifier) -> None:
        forged = jwt(claims(exp=NOW - 1000), hs256(b"x" * 32), "HS256")
        assert refused(hs_verifier, forged) == "bad signature"

    @pytest.mark.parametrize("alg", ["none", "None", "NONE"])
    def test_alg_none(self, hs_verifier: TokenVerifier, alg: str) -> None:
        assert refused(hs_verifier, jwt(claims(), None, alg)) == f"unsupported algorithm {alg}"
        # even with a "signature" attached
        assert refused(hs_verifier, jwt(claims(), hs256(), alg)).startswith("unsupported")

    def test_key_confusion_hs256_with_public_key(
        self, ed_pem_file: str, ed_key: ed25519.Ed25519PrivateKey, clock: Clock
    ) -> None:
        # The classic attack: sign HS256 with the *public* key's PEM as secret.
        verifier = TokenVerifier(public_key_file=ed_pem_file, clock=clock)
        forged = jwt(claims(), hs256(public_pem(ed_key)), "HS256")
        assert refused(verifier, forged) == "unsupported algorithm HS256"

    def test_key_confusion_rsa(
        self, rsa_pem_file: str, rsa_key: rsa.RSAPrivateKey, clock: Clock
    ) -> None:
        verifier = TokenVerifier(public_key_file=rsa_pem_file, clock=clock)
        forged = jwt(claims(), hs256(public_pem(rsa_key)), "HS256")
        assert refused(verifier, forged) == "unsupported algorithm HS256"

    def test_wrong_asymmetric_alg(
        self, ed_pem_file: str, rsa_key: rsa.RSAPrivateKey, clock: Clock
    ) -> None:
        verifier = TokenVerifier(public_key_file=ed_pem_file, clock=clock)
        token = jwt(
            claims(), lambda d: rsa_key.sign(d, padding.PKCS1v15(), hashes.SHA256()), "RS256"
        )
        assert refused(verifier, token) == "unsupported algorithm RS256"

    def test_eddsa_good(
        self, ed_pem_file: str, ed_key: ed25519.Ed25519PrivateKey, clock: Clock
    ) -> None:
        verifier = TokenVerifier(public_key_file=ed_pem_file, clock=clock)
        assert verifier.algorithms == frozenset({"EdDSA", "Ed25519"})
        assert verifier.verify(jwt(claims(), ed_key.sign, "EdDSA")).sub == "u-42"
        assert verifier.verify(jwt(claims(sub="b"), ed_key.sign, "Ed25519")).sub == "b"
        other = ed25519.Ed25519PrivateKey.generate()
        assert refused(verifier, jwt(claims(), other.sign, "EdDSA")) == "bad signature"

    def test_rs256_good(self, rsa_pem_file: str, rsa_key: rsa.RSAPrivateKey, clock: Clock) -> None:
        verifier = TokenVerifier(public_key_file=rsa_pem_file, clock=clock)
        assert verifier.algorithms == frozenset({"RS256"})

        def sign(data: bytes) -> bytes:
            return rsa_key.sign(data, padding.PKCS1v15(), hashes.SHA256())

        got = verifier.verify(jwt(claims(), sign, "RS256"))
        assert (got.sub, got.email) == ("u-42", "ann@example.com")
        token = jwt(claims(), sign, "RS256")
        head, body, sig = token.split(".")
        assert refused(verifier, f"{head}.{body}.{sig[:-4]}AAAA") == "bad signature"
        assert refused(verifier, jwt(claims(), sign, "PS256")) == "unsupported algorithm PS256"

    def test_both_keys_each_pinned(
        self,
        secret_file: str,
        ed_pem_file: str,
        ed_key: ed25519.Ed25519PrivateKey,
        clock: Clock,
    ) -> None:
        verifier = TokenVerifier(
            hs256_secret_file=secret_file, public_key_file=ed_pem_file, clock=clock
        )
        assert verifier.verify(jwt(claims(), hs256(), "HS256")).sub == "u-42"
        assert verifier.verify(jwt(claims(), ed_key.sign, "EdDSA")).sub == "u-42"
        forged = jwt(claims(), hs256(public_pem(ed_key)), "HS256")
        assert refused(verifier, forged) == "bad signature"

    def test_audience(self, secret_file: str, clock: Clock) -> None:
        verifier = TokenVerifier(hs256_secret_file=secret_file, audience="scalple", clock=clock)
        assert verifier.verify(jwt(claims(aud="scalple"), hs256(), "HS256")).sub == "u-42"
        assert verifier.verify(jwt(claims(aud=["x", "scalple"]), hs256(), "HS256"))
        assert refused(verifier, jwt(claims(aud="other"), hs256(), "HS256")) == "audience mismatch"
        assert refused(verifier, jwt(claims(), hs256(), "HS256")) == "audience mismatch"

    def test_audience_present_but_not_configured(self, hs_verifier: TokenVerifier) -> None:
        token = jwt(claims(aud="someone-else"), hs256(), "HS256")
        assert refused(hs_verifier, token) == "audience mismatch"

    def test_issuer(self, secret_file: str, clock: Clock) -> None:
        verifier = TokenVerifier(hs256_secret_file=secret_file, issuer="https://idp", clock=clock)
        assert verifier.verify(jwt(claims(iss="https://idp"), hs256(), "HS256"))
        assert refused(verifier, jwt(claims(iss="https://evil"), hs256(), "HS256")) == (
            "issuer mismatch"
        )
        assert refused(verifier, jwt(claims(), hs256(), "HS256")) == "issuer mismatch"

    def test_not_yet_valid_is_not_cached(self, hs_verifier: TokenVerifier, clock: Clock) -> None:
        token = jwt(claims(nbf=NOW + 100), hs256(), "HS256")
        assert refused(hs_verifier, token) == "token not yet valid"
        clock.now += 80  # 100 - 30 s leeway
        assert hs_verifier.verify(token).sub == "u-42"

    def test_required_claims(self, hs_verifier: TokenVerifier, secret_file: str) -> None:
        no_exp = jwt(claims(exp=None), hs256(), "HS256")
        assert refused(hs_verifier, no_exp) == "token has no expiry"
        lax = TokenVerifier(hs256_secret_file=secret_file, require_exp=False)
        assert lax.verify(no_exp).expires_at is None
        no_sub = jwt(claims(sub=None), hs256(), "HS256")
        assert refused(hs_verifier, no_sub) == "token has no sub claim"
        int_sub = jwt(claims(sub=42), hs256(), "HS256")
        assert refused(hs_verifier, int_sub) == "token has no sub claim"
        no_email = hs_verifier.verify(jwt(claims(email=None), hs256(), "HS256"))
        assert no_email.email is None
        bool_exp = jwt(claims(exp=True), hs256(), "HS256")
        assert refused(hs_verifier, bool_exp) == "malformed token"

    @pytest.mark.parametrize(
        "token",
        [
            "",
            "abc",
            "a.b",
            "a.b.c.d.e",  # JWE
            "!!!.e30.AAAA",
            "e30.e30.A",  # no alg
            b64(b'{"alg":"HS256"}') + ".e30.A",  # impossible base64 length
            b64(b"not json") + ".e30.AAAA",
            b64(b"[1]") + ".e30.AAAA",
            b64(b'{"alg": 1}') + ".e30.AAAA",
        ],
    )
    def test_malformed(self, hs_verifier: TokenVerifier, token: str) -> None:
        assert refused(hs_verifier, token) == "malformed token"

    def test_payload_not_object(self, hs_verifier: TokenVerifier) -> None:
        head = b64(b'{"alg":"HS256"}')
        body = b64(b"[1, 2]")
        sig = b64(hs256()(f"{head}.{body}".encode()))
        assert refused(hs_verifier, f"{head}.{body}.{sig}") == "malformed token"

    def test_crit_header_refused(self, hs_verifier: TokenVerifier) -> None:
        token = jwt(claims(), hs256(), "HS256", crit=["b64"], b64=False)
        assert refused(hs_verifier, token) == "unsupported critical header"

    def test_oversized(self, hs_verifier: TokenVerifier) -> None:
        assert refused(hs_verifier, "a" * 9000) == "token too large"

    def test_cache_hit_and_expiry(
        self, hs_verifier: TokenVerifier, clock: Clock, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        calls = []
        real = TokenVerifier._verify

        def counting(self: TokenVerifier, token: str) -> VerifiedToken:
            calls.append(1)
            return real(self, token)

        monkeypatch.setattr(TokenVerifier, "_verify", counting)
        token = jwt(claims(), hs256(), "HS256")
        first = hs_verifier.verify(token)
        assert hs_verifier.verify(token) is first
        assert len(calls) == 1
        clock.now = NOW + 600 + 31  # past exp + leeway, still cached
        assert refused(hs_verifier, token) == "token expired"
        assert refused(hs_verifier, token) == "token expired"
        assert len(calls) == 1

    def test_refusals_cached(
        self, hs_verifier: TokenVerifier, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        calls = []
        real = TokenVerifier._verify

        def counting(self: TokenVerifier, token: str) -> VerifiedToken:
            calls.append(1)
            return real(self, token)

        monkeypatch.setattr(TokenVerifier, "_verify", counting)
        forged = jwt(claims(), hs256(b"y" * 32), "HS256")
        for _ in range(3):
            assert refused(hs_verifier, forged) == "bad signature"
        assert len(calls) == 1

    def test_cache_bounded(self, secret_file: str, clock: Clock) -> None:
        verifier = TokenVerifier(hs256_secret_file=secret_file, cache_size=2, clock=clock)
        for i in range(5):
            verifier.verify(jwt(claims(sub=f"u{i}"), hs256(), "HS256"))
        assert len(verifier._cache) == 2

    def test_configuration_errors(self, tmp_path: Path, ed_key: ed25519.Ed25519PrivateKey) -> None:
        with pytest.raises(ValueError, match="needs"):
            TokenVerifier()
        short = tmp_path / "short"
        short.write_bytes(b"tooshort\n")
        with pytest.raises(ValueError, match="at least 32"):
            TokenVerifier(hs256_secret_file=str(short))
        private = tmp_path / "private.pem"
        private.write_bytes(
            ed_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        with pytest.raises(ValueError, match="public"):
            TokenVerifier(public_key_file=str(private))
        weak = tmp_path / "weak.pem"
        weak.write_bytes(public_pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)))
        with pytest.raises(ValueError, match="2048"):
            TokenVerifier(public_key_file=str(weak))

    def test_secret_and_token_never_in_messages(self, hs_verifier: TokenVerifier) -> None:
        assert SECRET.decode() not in repr(hs_verifier)
        token = jwt(claims(exp=NOW - 100), hs256(), "HS256")
        with pytest.raises(TokenError) as info:
            hs_verifier.verify(token)
        assert token not in str(info.value)
        assert "u-42" not in str(info.value)


# --- IdentityState -----------------------------------------------------------------


def state(
    startup: StartupIdentity | None = None, verifier: TokenVerifier | None = None
) -> IdentityState:
    return IdentityState(startup or StartupIdentity(), verifier)


def ok(st_: IdentityState, sql: str, *params: bytes) -> None:
    """Run every statement of ``sql`` successfully."""
    for index in range(len(settings_mod._templates(sql)) + 8):
        st_.statement_succeeded(sql, index, list(params) if params else None)


class TestIdentityState:
    def test_nobody(self) -> None:
        ident = state().for_statement("SELECT 1")
        assert ident == Identity(None, None, "none", False, None)

    def test_startup(self) -> None:
        s = state(StartupIdentity(user_id="7", email="s@x"))
        assert s.for_statement("SELECT 1") == Identity("7", "s@x", "startup")

    def test_cached_object_reused(self) -> None:
        s = state(StartupIdentity(user_id="7"))
        first = s.for_statement("SELECT 1")
        assert s.for_statement("SELECT 2") is first
        assert s.for_statement(None) is first
        s.statement_succeeded("SELECT * FROM t", 0)
        s.transaction_ended()
        assert s.for_statement("SELECT 3") is first
        s.statement_succeeded("SET scalple.tenant = 'acme'", 0)  # not an identity key
        assert s.for_statement("SELECT 4") is first
        s.statement_succeeded("SET scalple.user_id = '8'", 0)
        second = s.for_statement("SELECT 5")
        assert second is not first and second.user_id == "8"
        assert s.for_statement("SELECT 6") is second

    def test_set_overrides_startup_and_reset_restores(self) -> None:
        s = state(StartupIdentity(user_id="boot"))
        s.statement_succeeded("SET scalple.user_id = 'ann'", 0)
        s.transaction_ended()
        assert s.for_statement("SELECT 1") == Identity("ann", None, "set")
        s.statement_succeeded("RESET scalple.user_id", 0)
        assert s.for_statement("SELECT 1") == Identity("boot", None, "startup")

    @pytest.mark.parametrize("reset", ["RESET ALL", "DISCARD ALL", "SET scalple.user_id = DEFAULT"])
    def test_session_resets(self, reset: str) -> None:
        s = state(StartupIdentity(user_id="boot"))
        s.statement_succeeded("SET SESSION scalple.user_id = 'ann'", 0)
        s.statement_succeeded(reset, 0)
        assert s.for_statement("SELECT 1").user_id == "boot"

    def test_set_local_scoped_to_transaction(self) -> None:
        s = state()
        s.statement_succeeded("SET scalple.user_id = 'session'", 0)
        s.statement_succeeded("BEGIN", 0)
        s.statement_succeeded("SET LOCAL scalple.user_id = 'local'", 0)
        assert s.for_statement("SELECT 1").user_id == "local"
        s.transaction_ended()
        assert s.for_statement("SELECT 1").user_id == "session"

    def test_set_local_is_a_whole_channel(self) -> None:
        s = state()
        s.statement_succeeded("SET scalple.user_id = 'ann'; SET scalple.email = 'ann@x'", 0)
        s.statement_succeeded("SET scalple.user_id = 'ann'; SET scalple.email = 'ann@x'", 1)
        s.statement_succeeded("SET LOCAL scalple.user_id = 'bob'", 0)
        # never ann's email next to bob's id
        assert s.for_statement("SELECT 1") == Identity("bob", None, "set")

    def test_set_local_default_hides_session_value(self) -> None:
        s = state(StartupIdentity(user_id="boot"))
        s.statement_succeeded("SET scalple.user_id = 'ann'", 0)
        s.statement_succeeded("SET LOCAL scalple.user_id TO DEFAULT", 0)
        assert s.for_statement("SELECT 1") == Identity("boot", None, "startup")
        s.transaction_ended()
        assert s.for_statement("SELECT 1").user_id == "ann"

    def test_session_set_after_local_wins(self) -> None:
        s = state()
        s.statement_succeeded("SET LOCAL scalple.user_id = 'local'", 0)
        s.statement_succeeded("SET scalple.user_id = 'session'", 0)
        assert s.for_statement("SELECT 1").user_id == "session"
        s.transaction_ended()
        assert s.for_statement("SELECT 1").user_id == "session"

    def test_reset_all_clears_local_too(self) -> None:
        s = state(StartupIdentity(user_id="boot"))
        s.statement_succeeded("SET LOCAL scalple.user_id = 'local'", 0)
        s.statement_succeeded("RESET ALL", 0)
        assert s.for_statement("SELECT 1").user_id == "boot"

    def test_rollback_undoes_session_set(self) -> None:
        s = state()
        s.statement_succeeded("SET scalple.user_id = 'ann'", 0)
        s.transaction_ended()
        s.statement_succeeded("SET scalple.user_id = 'bob'", 0)
        s.statement_succeeded("SET scalple.email = 'bob@x'", 0)
        assert s.for_statement("SELECT 1") == Identity("bob", "bob@x", "set")
        s.transaction_ended(committed=False)
        assert s.for_statement("SELECT 1") == Identity("ann", None, "set")
        s.statement_succeeded("RESET ALL", 0)
        s.transaction_ended(committed=False)
        assert s.for_statement("SELECT 1").user_id == "ann"

    def test_set_config_scopes(self) -> None:
        s = state()
        s.statement_succeeded("SELECT set_config('scalple.user_id', 'sess', false)", 0)
        s.statement_succeeded("SELECT set_config('scalple.user_id', 'loc', true)", 0)
        assert s.for_statement("SELECT 1").user_id == "loc"
        s.transaction_ended()
        assert s.for_statement("SELECT 1").user_id == "sess"

    def test_set_config_with_bind_parameters(self) -> None:
        s = state()
        s.statement_succeeded("SELECT set_config('scalple.user_id', $1, true)", 0, [b"99"])
        assert s.for_statement("SELECT 1") == Identity("99", None, "set")

    def test_multi_statement_applies_by_index(self) -> None:
        sql = "SET scalple.user_id = 'a'; SELECT 1; SET LOCAL scalple.user_id = 'b'"
        s = state()
        s.statement_succeeded(sql, 0)
        assert s.for_statement("SELECT 1").user_id == "a"
        s.statement_succeeded(sql, 1)
        assert s.for_statement("SELECT 1").user_id == "a"
        s.statement_succeeded(sql, 2)
        assert s.for_statement("SELECT 1").user_id == "b"

    def test_dynamic_set_is_a_problem(self) -> None:
        s = state(StartupIdentity(user_id="boot"))
        s.statement_succeeded("SELECT set_config('scalple.user_id', current_user, false)", 0)
        ident = s.for_statement("SELECT 1")
        assert ident == Identity("boot", None, "startup", False, DYNAMIC_PROBLEM)
        s.statement_succeeded("SELECT set_config('scalple.user_id', $1, false)", 0)  # no params
        assert s.for_statement("SELECT 1").problem == DYNAMIC_PROBLEM
        s.statement_succeeded("RESET scalple.user_id", 0)
        assert s.for_statement("SELECT 1") == Identity("boot", None, "startup")

    def test_comment_for_its_statement_only(self) -> None:
        s = state(StartupIdentity(user_id="boot"))
        s.statement_succeeded("SET scalple.user_id = 'sess'", 0)
        sql = "SELECT 1 /*scalple.email='c%40x',scalple.user_id='c'*/"
        assert s.for_statement(sql) == Identity("c", "c@x", "comment")
        assert s.for_statement("SELECT 2").user_id == "sess"
        s.statement_succeeded(sql, 0)  # a comment is not a SET
        assert s.for_statement("SELECT 3").user_id == "sess"

    def test_comment_with_only_other_keys(self) -> None:
        s = state(StartupIdentity(user_id="boot"))
        base = s.for_statement(None)
        assert s.for_statement("SELECT 1 /*scalple.tenant='x',route='y'*/") is base
        assert s.for_statement("SELECT 'scalple.' /* plain */") is base

    def test_comment_by_statement_index(self) -> None:
        s = state()
        sql = "SELECT 1 /*scalple.user_id='one'*/; SELECT 2"
        assert s.for_statement(sql, 0).user_id == "one"
        assert s.for_statement(sql, 1).source == "none"

    def test_session_token(self, hs_verifier: TokenVerifier) -> None:
        s = state(StartupIdentity(user_id="boot"), hs_verifier)
        token = jwt(claims(), hs256(), "HS256")
        s.statement_succeeded(f"SET scalple.token = '{token}'", 0)
        ident = s.for_statement("SELECT 1")
        assert ident == Identity("u-42", "ann@example.com", "token", True, None)
        assert ident.acceptable("verified")

    def test_token_overrides_plain_id_in_same_channel(self, hs_verifier: TokenVerifier) -> None:
        s = state(verifier=hs_verifier)
        token = jwt(claims(), hs256(), "HS256")
        s.statement_succeeded("SET scalple.user_id = 'claimed'", 0)
        s.statement_succeeded(f"SET scalple.token = '{token}'", 0)
        assert s.for_statement("SELECT 1").user_id == "u-42"

    def test_startup_token(self, hs_verifier: TokenVerifier) -> None:
        token = jwt(claims(), hs256(), "HS256")
        s = state(StartupIdentity(user_id="ignored", token=token), hs_verifier)
        assert s.for_statement("SELECT 1") == Identity("u-42", "ann@example.com", "token", True)

    def test_comment_token(self, hs_verifier: TokenVerifier) -> None:
        s = state(StartupIdentity(user_id="boot"), hs_verifier)
        token = jwt(claims(sub="c-1"), hs256(), "HS256")
        ident = s.for_statement(f"SELECT 1 /*scalple.token='{token}'*/")
        assert (ident.user_id, ident.source, ident.verified) == ("c-1", "token", True)

    def test_refused_comment_token_falls_back_with_problem(
        self, hs_verifier: TokenVerifier
    ) -> None:
        s = state(StartupIdentity(user_id="boot"), hs_verifier)
        s.statement_succeeded("SET scalple.user_id = 'sess'", 0)
        expired = jwt(claims(exp=NOW - 100), hs256(), "HS256")
        ident = s.for_statement(f"SELECT 1 /*scalple.token='{expired}',scalple.user_id='c'*/")
        # the comment's plain user_id came with a failed token: not used
        assert ident == Identity("sess", None, "set", False, "token expired")
        assert ident.acceptable("any") and not ident.acceptable("verified")
        assert s.for_statement("SELECT 2").problem is None

    def test_refused_token_without_fallback(self, hs_verifier: TokenVerifier) -> None:
        s = state(verifier=hs_verifier)
        forged = jwt(claims(), hs256(b"z" * 32), "HS256")
        s.statement_succeeded(f"SET scalple.token = '{forged}'", 0)
        s.statement_succeeded("SET scalple.user_id = 'claimed'", 0)
        ident = s.for_statement("SELECT 1")
        assert ident == Identity(None, None, "none", False, "bad signature")
        assert not ident.acceptable("any")
        assert ident.acceptable("none")

    def test_highest_refusal_is_reported(self, hs_verifier: TokenVerifier) -> None:
        bad = jwt(claims(), hs256(b"z" * 32), "HS256")
        old = jwt(claims(exp=NOW - 100), hs256(), "HS256")
        s = state(StartupIdentity(user_id="boot", token=old), hs_verifier)
        assert s.for_statement("SELECT 1").problem == "token expired"
        s.statement_succeeded(f"SET LOCAL scalple.token = '{bad}'", 0)
        assert s.for_statement("SELECT 1") == Identity(None, None, "none", False, "bad signature")

    def test_lower_channel_token_keeps_higher_problem(self, hs_verifier: TokenVerifier) -> None:
        good = jwt(claims(), hs256(), "HS256")
        bad = jwt(claims(), None, "none")
        s = state(StartupIdentity(token=good), hs_verifier)
        s.statement_succeeded(f"SET LOCAL scalple.token = '{bad}'", 0)
        ident = s.for_statement("SELECT 1")
        assert ident == Identity(
            "u-42", "ann@example.com", "token", True, "unsupported algorithm none"
        )
        s.transaction_ended()
        assert s.for_statement("SELECT 1").problem is None

    def test_token_expires_while_in_use(self, hs_verifier: TokenVerifier, clock: Clock) -> None:
        s = state(StartupIdentity(user_id="boot"), hs_verifier)
        token = jwt(claims(exp=NOW + 60), hs256(), "HS256")
        s.statement_succeeded(f"SET scalple.token = '{token}'", 0)
        assert s.for_statement("SELECT 1").verified
        clock.now = NOW + 60 + 31
        assert s.for_statement("SELECT 1") == Identity(
            "boot", None, "startup", False, "token expired"
        )

    def test_token_without_verifier(self) -> None:
        s = state(StartupIdentity(user_id="boot"))
        s.statement_succeeded("SET scalple.token = 'a.b.c'", 0)
        assert s.for_statement("SELECT 1") == Identity(
            "boot", None, "startup", False, NO_TOKEN_VERIFIER
        )

    def test_acceptable(self) -> None:
        verified = Identity("1", None, "token", True)
        plain = Identity("1", None, "set")
        email_only = Identity(None, "e@x", "comment")
        nobody = Identity(None, None, "none", False, "token expired")
        assert [i.acceptable("verified") for i in (verified, plain, email_only, nobody)] == [
            True,
            False,
            False,
            False,
        ]
        assert [i.acceptable("any") for i in (verified, plain, email_only, nobody)] == [
            True,
            True,
            True,
            False,
        ]
        assert all(i.acceptable("none") for i in (verified, plain, email_only, nobody))

    def test_empty_value_means_unset(self) -> None:
        s = state(StartupIdentity(user_id="boot"))
        s.statement_succeeded("SET scalple.user_id = 'ann'", 0)
        s.statement_succeeded("SELECT set_config('scalple.user_id', '', false)", 0)
        assert s.for_statement("SELECT 1").user_id == "boot"
