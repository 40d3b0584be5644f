"""Masking one statement: the literal rules, the fail-safe, the shape cache.

The end-to-end guarantee is tested through the proxy in test_masking_e2e.py;
here the decisions are pinned one by one, with an in-memory catalog."""

from __future__ import annotations

import pytest

from scalple.analysis.catalog import Catalog, Relation
from scalple.masking.masks import Masker
from scalple.masking.statement import MaskedStatement, StatementMasker, SubjectSet

PII = {"public.users.email": "email", "public.users.phone": "partial"}
SUBJECTS = {"public.users.id": "customer", "public.orders.user_id": "customer"}
CATALOG = Catalog(
    [
        Relation("public", "users", "table", ("id", "email", "phone", "note")),
        Relation("public", "orders", "table", ("id", "user_id", "amount")),
    ]
)
MASKER = Masker(b"k" * 32)


def mask(
    sql: str,
    params: list[str | None] | None = None,
    *,
    literals: str = "pii",
    catalog: Catalog | None = CATALOG,
    planned: bool = True,
    masker: StatementMasker | None = None,
) -> tuple[MaskedStatement, SubjectSet]:
    masker = masker or StatementMasker(PII, SUBJECTS, literals, MASKER)  # type: ignore[arg-type]
    subjects = SubjectSet(10)
    result = masker.apply(sql, params, catalog=catalog, planned=planned, subjects=subjects)
    return result, subjects


def test_pii_rule_masks_only_pii_and_subject_constants() -> None:
    result, subjects = mask(
        "select note from users where email = 'ana@x.org' and note = 'free text' and id = 7"
    )
    tag = MASKER.subject_tag("customer", "7")
    assert result.query == (
        f"select note from users where email = 'a***@***.org' and note = 'free text' "
        f"and id = '{tag}'"
    )
    assert result.masked_fields == [
        {"column": "public.users.email", "mask": "email", "value": "a***@***.org"}
    ]
    assert list(subjects.tags) == [tag] and subjects.kinds == {"customer"}


def test_all_rule_masks_every_constant() -> None:
    result, _ = mask("select note from users where note = 'free text' and 3 > 2", literals="all")
    assert result.query == "select note from users where note = '***' and '***' > '***'"


def test_none_rule_keeps_subject_ids_but_still_masks_pii_and_tags() -> None:
    result, subjects = mask(
        "select 1 from users where id = 7 and email = 'a@b.org'", literals="none"
    )
    assert "id = 7" in (result.query or "") and "a@b.org" not in (result.query or "")
    assert subjects.count == 1


def test_parameters_follow_their_column_and_unresolved_ones_the_rule() -> None:
    sql = "select 1 from users where email = $1 and note = $2"
    pii_rule, _ = mask(sql, ["ana@x.org", "free"])
    assert pii_rule.params == ["a***@***.org", "free"]
    all_rule, _ = mask(sql, ["ana@x.org", "free"], literals="all")
    assert all_rule.params == ["a***@***.org", "***"]


def test_without_a_catalog_or_analysis_every_constant_is_masked() -> None:
    """Unqualified names cannot be resolved: assume the worst, and say so."""
    for kwargs in ({"catalog": None}, {"planned": False}):
        result, _ = mask("select 1 from users where note = 'x' and $1 = 1", ["p"], **kwargs)  # type: ignore[arg-type]
        assert result.query == "select '***' from users where note = '***' and $1 = '***'"
        assert result.params == ["***"]
        assert any("every constant" in note for note in result.notes)


def test_unparsable_statements_are_masked_whole() -> None:
    result, _ = mask("select * from users where email = 'ana@x.org' 'junk'")
    assert "ana@x.org" not in (result.query or "")
    assert any("every constant" in note for note in result.notes)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        # Same pglast fingerprint, different positions of the PII constant.
        (
            "insert into users (id, email) values (1, 'ana@x.org')",
            "insert into users (email, id) values ('ana@x.org', 1)",
        ),
        (
            "select 1 from users where email = 'ana@x.org' and note = 'n'",
            "select 1 from users where note = 'n' and email = 'ana@x.org'",
        ),
        (
            "select 1 from users where note = $1 and email = 'ana@x.org'",
            "select 1 from users where note = 'n' and email = $1",
        ),
    ],
)
def test_the_shape_cache_tells_reordered_statements_apart(first: str, second: str) -> None:
    masker = StatementMasker(PII, SUBJECTS, "pii", MASKER)
    for sql in (first, second, first):
        result, _ = mask(sql, ["ana@x.org"] if "email = $1" in sql else ["n"], masker=masker)
        assert "ana@x.org" not in (result.query or "") + str(result.params), sql


def test_comments_do_not_defeat_the_shape_cache() -> None:
    """sqlcommenter comments differ per request; the plan must be reused."""
    masker = StatementMasker(PII, SUBJECTS, "pii", MASKER)
    for user in ("a", "b", "c"):
        result, _ = mask(
            f"select 1 from users where email = 'e{user}@x.org' /*scalple.user_id='{user}'*/",
            masker=masker,
        )
        assert f"e{user}@x.org" not in (result.query or "")
    assert len(masker._shapes) == 1


def test_subjects_are_bounded() -> None:
    masker = StatementMasker(PII, SUBJECTS, "pii", MASKER)
    subjects = SubjectSet(2)
    masker.apply(
        "select 1 from users where id in (1, 2, 3, 2)",
        None,
        catalog=CATALOG,
        planned=True,
        subjects=subjects,
    )
    assert len(subjects.tags) == 2 and subjects.count == 3 and subjects.truncated


@pytest.mark.parametrize(
    "sql",
    [
        "execute upd('ana@x.org', 7)",
        "call set_email(7, 'ana@x.org')",
        "do $$ begin update users set email = 'ana@x.org' where id = 7; end $$",
        "/* app */ prepare p as update users set email = 'ana@x.org' where id = $1",
        "create or replace function f() returns void language sql as "
        "$$ update users set email = 'ana@x.org' $$",
    ],
)
def test_statements_the_plan_cannot_see_into_are_masked_whole(sql: str) -> None:
    result, _ = mask(sql)
    assert "ana@x.org" not in (result.query or "")
    assert any("every constant" in note for note in result.notes)


def test_a_comment_lookalike_in_a_quoted_identifier_does_not_merge_shapes() -> None:
    """Found in review: stripping "--" inside "x--" made these two statements
    one shape, and the second reused the first's plan (no PII there)."""
    catalog = Catalog(
        [Relation("public", "users", "table", ("id", "email", "phone", "note", "x--"))]
    )
    masker = StatementMasker(PII, SUBJECTS, "pii", MASKER)
    mask("update users set (\"x--\", note) = ('a', 'b')", catalog=catalog, masker=masker)
    result, _ = mask(
        "update users set (\"x--\", email) = ('a', 'ana@x.org')", catalog=catalog, masker=masker
    )
    assert "ana@x.org" not in (result.query or "")


def test_parameters_of_a_statement_never_seen_are_masked() -> None:
    """A Bind to a statement prepared by SQL PREPARE: no text, no columns."""
    result, _ = mask(None, ["ana@x.org", None])  # type: ignore[arg-type]
    assert result.params == ["***", None] and result.notes


def test_subject_ids_are_tagged_as_postgresql_prints_them() -> None:
    """042 and 42.0 name the same customer as the row value 42; a string
    '042' may be a text id of its own and is left as written."""
    tags = set()
    for literal in ("42", "042", "42.0", "-0"):
        _, subjects = mask(f"select 1 from users where id = {literal}")
        tags.update(subjects.tags)
    assert tags == {MASKER.subject_tag("customer", "42"), MASKER.subject_tag("customer", "0")}
    _, text_id = mask("select 1 from users where id = '042'")
    assert list(text_id.tags) == [MASKER.subject_tag("customer", "042")]


def test_a_negative_subject_id_is_tagged_and_masked_with_its_sign() -> None:
    result, subjects = mask("select 1 from users where id = -5")
    tag = MASKER.subject_tag("customer", "-5")
    assert list(subjects.tags) == [tag]
    assert result.query == f"select 1 from users where id = '{tag}'"
