"""Masking plans: which constants, parameters and result columns of a statement
belong to configured PII and data-subject columns.

All against a small hand-built catalog (no server needed): ``public.users``,
``public.orders``, views over ``users``, and a second schema ``crm`` with its own
``users`` to check that names resolve through the search path.  Literal offsets
are UTF-8 byte offsets; every expectation is written as "the constant whose
token starts with this text", located in the encoded statement.
"""

from __future__ import annotations

from typing import Any

import pytest

from scalple.analysis import Catalog, Relation
from scalple.masking.plan import ColumnRole, MaskingPlan, plan_masking

PII = {
    "public.users.email": "email",
    "public.users.phone": "partial",
    "public.users.iban": "redact",
    "public.users.name": "pseudonym",
}
SUBJECTS = {"public.users.id": "customer", "public.orders.user_id": "customer"}

EMAIL = ColumnRole("public.users.email", "email", None)
PHONE = ColumnRole("public.users.phone", "partial", None)
IBAN = ColumnRole("public.users.iban", "redact", None)
NAME = ColumnRole("public.users.name", "pseudonym", None)
USER_ID = ColumnRole("public.users.id", None, "customer")
ORDER_USER = ColumnRole("public.orders.user_id", None, "customer")
USERS = [USER_ID, EMAIL, PHONE, IBAN, NAME]
# What a subject-only column gives a value that reaches it through an expression.
USER_ID_HIDDEN = ColumnRole("public.users.id", "redact", None)

RELATIONS = [
    Relation("public", "users", "table", ("id", "email", "phone", "iban", "name")),
    Relation("public", "orders", "table", ("id", "user_id", "amount")),
    Relation(
        "public",
        "contacts",
        "view",
        ("uid", "mail", "lname", "phone2"),
        "SELECT id AS uid, email AS mail, lower(name) AS lname, phone || '' AS phone2 "
        "FROM public.users WHERE id > 0",
    ),
    Relation("public", "active_users", "view", ("id", "email"), "SELECT * FROM public.contacts"),
    Relation(
        "public",
        "big_spenders",
        "matview",
        ("user_id", "total"),
        "SELECT user_id, sum(amount) AS total FROM public.orders GROUP BY user_id",
    ),
    Relation("crm", "users", "table", ("id", "email")),
]
CATALOG = Catalog(RELATIONS)


def plan(sql: str, catalog: Catalog | None = CATALOG, **config: dict[str, str]) -> MaskingPlan:
    result = plan_masking(sql, catalog, config.get("pii", PII), config.get("subjects", SUBJECTS))
    data = sql.encode()
    for offset in result.literals:  # every offset is where a literal token starts
        assert len(data[offset : offset + 1]) == 1
        assert data[offset : offset + 1] in b"'$-+.0123456789EeNnUuBbXx", (sql, offset)
    return result


def at(sql: str, token: str, occurrence: int = 1) -> int:
    """Byte offset of the ``occurrence``-th ``token`` in the UTF-8 statement."""
    data, needle = sql.encode(), token.encode()
    offset = -1
    for _ in range(occurrence):
        offset = data.index(needle, offset + 1)
    return offset


def literals(sql: str, *expected: tuple[Any, ...]) -> dict[int, ColumnRole]:
    """The expected ``literals`` from ``(token, role)`` or ``(token, occurrence, role)``."""
    result: dict[int, ColumnRole] = {}
    for item in expected:
        token, *occurrence, role = item
        result[at(sql, token, *occurrence)] = role
    return result


# --------------------------------------------------------------------------- literals


COMPARISONS = [
    ("select 1 from users where email = 'j.m@x.org'", [("'j.m", EMAIL)]),
    ("select 1 from users where 'j.m@x.org' = email", [("'j.m", EMAIL)]),
    ("select 1 from users where email <> 'a' and id != 4", [("'a'", EMAIL), ("4", USER_ID)]),
    (
        "select 1 from users where id < 10 or id > 20 or id <= 30 or id >= 40",
        [("10", USER_ID), ("20", USER_ID), ("30", USER_ID), ("40", USER_ID)],
    ),
    ("select 1 from users where email is distinct from 'a'", [("'a'", EMAIL)]),
    ("select 1 from users where 'a' is not distinct from name", [("'a'", NAME)]),
    ("select 1 from users where email like '%@x.org'", [("'%@", EMAIL)]),
    ("select 1 from users where email not like 'a%'", [("'a%'", EMAIL)]),
    ("select 1 from users where name ilike 'jo%' escape '!'", [("'jo%'", NAME)]),
    ("select 1 from users where name similar to '(a|b)%'", [("'(a|b)", NAME)]),
    ("select 1 from users where name ~* '^jo'", [("'^jo'", NAME)]),
    ("select 1 from users where iban ~~ 'DE%'", [("'DE%'", IBAN)]),
    (
        "select 1 from users where phone in ('+49 1', '+49 2') and id not in (1, 2)",
        [("'+49 1'", PHONE), ("'+49 2'", PHONE), ("1,", USER_ID), ("2)", USER_ID)],
    ),
    ("select 1 from users where email = any('{a@x,b@x}')", [("'{a@x", EMAIL)]),
    ("select 1 from users where email = any('{a@x}'::text[])", [("'{a@x", EMAIL)]),
    (
        "select 1 from users where email = any(array['a@x', 'b@x'])",
        [("'a@x'", EMAIL), ("'b@x'", EMAIL)],
    ),
    (
        "select 1 from users where email like any(array['%a', '%b'])",
        [("'%a'", EMAIL), ("'%b'", EMAIL)],
    ),
    ("select 1 from users where id <> all('{1,2}')", [("'{1,2}'", USER_ID)]),
    ("select 1 from users where id between 100 and 200", [("100", USER_ID), ("200", USER_ID)]),
    (
        "select 1 from users where id not between symmetric 3 and 1",
        [("3", USER_ID), ("1", 2, USER_ID)],
    ),
    ("select 1 from users where email::text = 'c'", [("'c'", EMAIL)]),
    ("select 1 from users where id = '42'::int", [("'42'", USER_ID)]),
    ("select 1 from users where cast(id as text) = cast('42' as text)", [("'42'", USER_ID)]),
    # lower() on the constant: it reaches email through an expression (fail-closed).
    ("select 1 from users where lower(email) = lower('A@X')", [("'A@X'", EMAIL)]),
    (
        "select 1 from users where lower(email) = 'a@x' and upper(name) = 'J'",
        [("'a@x'", EMAIL), ("'J'", NAME)],
    ),
    ("select 1 from users where email collate \"C\" = 'c'", [("'c'", EMAIL)]),
    ("select 1 from users where nullif(email, '') is null", [("''", EMAIL)]),
    (
        "select case email when 'a@x' then 1 when 'b@x' then 2 end from users",
        [("'a@x'", EMAIL), ("'b@x'", EMAIL)],
    ),
    (
        "select 1 from users where (id, email) = (7, 'r@x')",
        [("7", USER_ID), ("'r@x'", EMAIL)],
    ),
    (
        "select 1 from users where (id, email) in ((1, 'a'), (2, 'b'))",
        [("1,", USER_ID), ("'a'", EMAIL), ("2,", USER_ID), ("'b'", EMAIL)],
    ),
    # Through an expression around the column: fail-closed, everything it meets.
    (
        "select 1 from users where length(email) = 5 and email || 'x' = 'yx'",
        [("5", EMAIL), ("'x'", EMAIL), ("'yx'", EMAIL)],
    ),
    (
        "select 1 from users where coalesce(email, 'none') = 'a'",
        [("'none'", EMAIL), ("'a'", EMAIL)],
    ),
    # Columns that are not configured: nothing to attribute.
    ("select 1 from orders where amount = 5 and id = 6", []),
    ("select 1 from orders where amount + 1 = abs(-5) and id::text = lower('x')", []),
]


@pytest.mark.parametrize(("sql", "expected"), COMPARISONS, ids=[c[0][26:] for c in COMPARISONS])
def test_comparisons(sql: str, expected: list[tuple[str, ColumnRole]]) -> None:
    result = plan(sql)
    assert result.literals == literals(sql, *expected)
    assert result.params == {}
    assert result.unresolved == []


def test_every_query_level() -> None:
    """JOIN ON, HAVING, subqueries, CTEs, derived tables, EXISTS, DML predicates."""
    sql = (
        "with recent as (select user_id from orders where user_id = 11) "
        "select u.name, count(*) from users u "
        "join orders o on o.user_id = u.id and u.email = 'on@x' "
        "where u.id in (select id from users where phone = 'sub') "
        "and exists (select 1 from users x where x.id = u.id and x.iban = 'DE00') "
        "and u.id in (select user_id from recent) "
        "and u.id = (select d.user_id from (select user_id from orders where user_id = 12) d) "
        "group by u.name having u.name <> 'grp'"
    )
    assert plan(sql).literals == literals(
        sql,
        ("11", ORDER_USER),
        ("'on@x'", EMAIL),
        ("'sub'", PHONE),
        ("'DE00'", IBAN),
        ("12", ORDER_USER),
        ("'grp'", NAME),
    )
    update = "update users set phone = null where email = 'u@x' and id in (1, 2)"
    assert plan(update).literals == literals(
        update, ("'u@x'", EMAIL), ("1,", USER_ID), ("2)", USER_ID)
    )
    delete = "delete from users u using orders o where o.user_id = u.id and u.name like 'D%'"
    assert plan(delete).literals == literals(delete, ("'D%'", NAME))


def test_join_through_a_subject_column() -> None:
    sql = "select o.amount from orders o join users u on u.id = o.user_id where o.user_id = 42"
    assert plan(sql).literals == literals(sql, ("42", ORDER_USER))
    # With only users.id configured, the join makes orders.user_id the same subject.
    only_users = {"public.users.id": "customer"}
    assert plan(sql, subjects=only_users).literals == literals(sql, ("42", USER_ID))
    comma = "select 1 from orders o, users u where o.user_id = u.id and o.user_id in (5, 6)"
    assert plan(comma, subjects=only_users).literals == literals(
        comma, ("5", USER_ID), ("6", USER_ID)
    )
    using = "select 1 from users join orders using (id) where id = 9"
    assert plan(using).literals == literals(using, ("9", USER_ID))
    # No equality, no attribution.
    unrelated = "select 1 from orders o, users u where o.amount > u.id and o.user_id = 3"
    assert plan(unrelated, subjects=only_users).literals == {}


# --------------------------------------------------------------------------- assignments


def test_insert_values_by_column_list_and_every_row() -> None:
    sql = "insert into users (email, id, amount_note) values ('a@x', 1, 'n'), ('b@x', 2, DEFAULT)"
    result = plan(sql)
    assert result.literals == literals(
        sql, ("'a@x'", EMAIL), ("1,", USER_ID), ("'b@x'", EMAIL), ("2,", USER_ID)
    )
    assert result.unresolved == ["column amount_note is not a column of public.users"]


def test_insert_without_column_list_uses_catalog_order() -> None:
    sql = "insert into users values (7, 'e@x', '+1 555', 'DE99', 'Ann'), (8, null, 'p2')"
    assert plan(sql).literals == literals(
        sql,
        ("7", USER_ID),
        ("'e@x'", EMAIL),
        ("'+1 555'", PHONE),
        ("'DE99'", IBAN),
        ("'Ann'", NAME),
        ("8", USER_ID),
        ("'p2'", PHONE),
    )


def test_insert_select_and_on_conflict() -> None:
    sql = (
        "insert into users (id, name) select 3, 'Bo' union all select 4, 'Cy' "
        "on conflict (id) do update set name = 'Dee', email = excluded.email"
    )
    assert plan(sql).literals == literals(
        sql, ("3", USER_ID), ("'Bo'", NAME), ("4", USER_ID), ("'Cy'", NAME), ("'Dee'", NAME)
    )
    from_table = "insert into orders (user_id, amount) select id, 10 from users where email = 'f'"
    assert plan(from_table).literals == literals(from_table, ("'f'", EMAIL))


def test_update_set() -> None:
    sql = (
        "update users u set email = 'new@x', (phone, name) = ('+2', $2), iban = $1 "
        "from orders o where o.user_id = u.id and o.id = $3"
    )
    result = plan(sql)
    assert result.literals == literals(sql, ("'new@x'", EMAIL), ("'+2'", PHONE))
    assert result.params == {1: IBAN, 2: NAME}


def test_merge() -> None:
    sql = (
        "merge into users t using orders s on t.id = s.user_id "
        "when matched and t.email = 'm@x' then update set name = 'M' "
        "when not matched then insert (id, phone) values (s.user_id, '+3')"
    )
    assert plan(sql).literals == literals(sql, ("'m@x'", EMAIL), ("'M'", NAME), ("'+3'", PHONE))


def test_writing_through_a_view() -> None:
    sql = "insert into contacts (mail, uid) values ('v@x', 5)"
    assert plan(sql).literals == literals(sql, ("'v@x'", EMAIL), ("5", USER_ID))
    update = "update contacts set mail = 'w@x' where uid = 6"
    assert plan(update).literals == literals(update, ("'w@x'", EMAIL), ("6", USER_ID))


# --------------------------------------------------------------------------- parameters


def test_parameters() -> None:
    sql = (
        "select 1 from users where email = $1 and $2 = id and phone in ($3, '+4') "
        "and name = any($4) and iban like $5 and id between $6 and $7 and email = $8::text "
        "and id = any(array[$9, $10]) and id > $11 + 1"
    )
    result = plan(sql)
    assert result.params == {
        1: EMAIL,
        2: USER_ID,
        3: PHONE,
        4: NAME,
        5: IBAN,
        6: USER_ID,
        7: USER_ID,
        8: EMAIL,
        9: USER_ID,
        10: USER_ID,
        11: USER_ID_HIDDEN,  # $11 + 1 is not an id: hidden, not tagged
    }
    plus_one = at(sql, "+ 1") + len("+ ")
    assert result.literals == {**literals(sql, ("'+4'", PHONE)), plus_one: USER_ID_HIDDEN}
    insert = "insert into users (id, email) values ($1, $2), ($3, $4) returning id"
    result = plan(insert)
    assert result.params == {1: USER_ID, 2: EMAIL, 3: USER_ID, 4: EMAIL}
    assert result.output == {0: USER_ID}


def test_a_parameter_meeting_two_columns_keeps_the_first() -> None:
    result = plan("select 1 from users where email = $1 or name = $1")
    assert result.params == {1: EMAIL}
    assert result.unresolved == [
        "$1 meets public.users.email and public.users.name; kept the first"
    ]


# --------------------------------------------------------------------------- through expressions


# (statement, expected constants as (token, role) / (token, occurrence, role), expected params)
THROUGH: list[tuple[str, list[tuple[Any, ...]], dict[int, ColumnRole]]] = [
    # The review's reproductions.
    ("update users set email = trim($1)", [], {1: EMAIL}),
    ("select * from users where email = lower($1)", [], {1: EMAIL}),
    ("select 1 from users where lower(email) = lower('ANA@X.ORG')", [("'ANA", EMAIL)], {}),
    ("update users set email = lower('ANA@X.ORG')", [("'ANA", EMAIL)], {}),
    (
        "update users set (email, phone) = (select 'ana@x.org', '0612345678')",
        [("'ana", EMAIL), ("'061", PHONE)],
        {},
    ),
    ("select 1 from users where email in (values ('ana@x.org'))", [("'ana", EMAIL)], {}),
    ("select 1 from users where email = (select 'ana@x.org')", [("'ana", EMAIL)], {}),
    ("select 1 from users where email = any(select 'ana@x.org')", [("'ana", EMAIL)], {}),
    (
        "select 1 from users where email = any(select x from (values ('ana@x.org')) v(x))",
        [("'ana", EMAIL)],
        {},
    ),
    (
        "with v(e) as (values ('ana@x.org')) select 1 from users where email in (select e from v)",
        [("'ana", EMAIL)],
        {},
    ),
    ("insert into users (email) select x from (values ('ana@x.org')) v(x)", [("'ana", EMAIL)], {}),
    ("select email from users union select 'bob@x.org'", [("'bob", EMAIL)], {}),
    ("select $1 union all select email from users", [], {1: EMAIL}),
    ("select 1 from users where to_json(email)::text = '\"ana@x.org\"'", [("'\"ana", EMAIL)], {}),
    ("select coalesce(email, 'ana@x.org') from users", [("'ana", EMAIL)], {}),
    (
        "select 1 from users where coalesce(email, 'ana@x.org') = $1",
        [("'ana", EMAIL)],
        {1: EMAIL},
    ),
    ("select email || 'x' from users", [("'x'", EMAIL)], {}),
    (
        "select 1 from users where format('%s', 'ana@x.org') = email",
        [("'%s'", EMAIL), ("'ana", EMAIL)],
        {},
    ),
    (
        "select greatest(email, 'ana@x.org'), least(name, $1) from users",
        [("'ana", EMAIL)],
        {1: NAME},
    ),
    ("select 1 from users where left(email, 3) = 'ana'", [("3", EMAIL), ("'ana'", EMAIL)], {}),
    (
        "select 1 from users where email = concat('ana', '@x.org')",
        [("'ana'", EMAIL), ("'@x.org'", EMAIL)],
        {},
    ),
    # Operators and functions that test the column without a comparison.
    (
        "select 1 from users where email % 'ana' or starts_with(name, $1) or phone ^@ '+33'",
        [("'ana'", EMAIL), ("'+33'", PHONE)],
        {1: NAME},
    ),
    # LIKE over a built pattern; the ESCAPE character is no value of the column.
    (
        "select 1 from users where name like '%' || $1 || '%' escape '!'",
        [("'%'", NAME), ("'%'", 2, NAME)],
        {1: NAME},
    ),
    # A function in FROM, a VALUES list joined in.
    ("select 1 from users, unnest($1::text[]) as t(e) where email = t.e", [], {1: EMAIL}),
    (
        "select 1 from users u join (values ('a@x')) v(x) on u.email = v.x",
        [("'a@x'", EMAIL)],
        {},
    ),
    # Writes fed through expressions, sub-selects and VALUES.
    ("update users set email = v.x from (values ('a@x')) v(x)", [("'a@x'", EMAIL)], {}),
    (
        "insert into users (email, name) values (lower('a@x'), $1 || ' ' || $2)",
        [("'a@x'", EMAIL), ("' '", NAME)],
        {1: NAME, 2: NAME},
    ),
    (
        "with v(e) as (values ('a@x')) insert into users (email) values ((select e from v))",
        [("'a@x'", EMAIL)],
        {},
    ),
    (
        "insert into users select * from (values (1, 'a@x')) v",
        [("1,", USER_ID_HIDDEN), ("'a@x'", EMAIL)],
        {},
    ),
    (
        "insert into users (id, email) values (1, 'a') on conflict (id) "
        "do update set email = lower($1)",
        [("1,", USER_ID), ("'a'", EMAIL)],
        {1: EMAIL},
    ),
    (
        "merge into users t using orders s on t.id = s.user_id "
        "when matched then update set name = upper($1) "
        "when not matched then insert (id, email) values (s.user_id, lower('m@x'))",
        [("'m@x'", EMAIL)],
        {1: NAME},
    ),
    # CASE: WHEN values are compared with the subject, THEN/ELSE are alternatives.
    (
        "select case email when lower('a@x') then 1 end, "
        "case when id > 0 then email else 'none@x' end from users",
        [("'a@x'", EMAIL), ("0", USER_ID), ("'none@x'", EMAIL)],
        {},
    ),
]


@pytest.mark.parametrize(("sql", "constants", "params"), THROUGH, ids=[t[0] for t in THROUGH])
def test_values_reaching_a_column_through_expressions(
    sql: str, constants: list[tuple[Any, ...]], params: dict[int, ColumnRole]
) -> None:
    result = plan(sql)
    assert result.literals == literals(sql, *constants)
    assert result.params == params
    # Every value reached through an expression is masked (USER_ID: a plain id, tagged).
    roles = (*result.literals.values(), *result.params.values())
    assert all(role.mask is not None for role in roles if role != USER_ID)


def test_rows_pair_element_by_element_through_expressions() -> None:
    sql = "select 1 from users where (id, email) in ((1, lower('a')), (2, $1))"
    result = plan(sql)
    assert result.literals == literals(sql, ("1,", USER_ID), ("'a'", EMAIL), ("2,", USER_ID))
    assert result.params == {1: EMAIL}
    for sub in (
        "select 1 from users where (id, email) = (select 1, 'a')",
        "select 1 from users where (id, email) in (select 1, 'a')",
    ):
        # Fed through a sub-select: not a plain id, so hidden rather than tagged.
        assert plan(sub).literals == literals(sub, ("1,", USER_ID_HIDDEN), ("'a'", EMAIL))


def test_subject_columns_through_expressions_are_hidden_not_tagged() -> None:
    sql = "select 1 from users where id = abs($1) and id = $2 and id + 1 = 7"
    result = plan(sql)
    assert result.params == {1: USER_ID_HIDDEN, 2: USER_ID}
    assert result.literals == literals(sql, ("1 =", USER_ID_HIDDEN), ("7", USER_ID_HIDDEN))
    # Through an equality with a configured column, too.
    joined = "select 1 from orders o join users u on u.id = o.user_id where o.user_id + 0 = $1"
    assert plan(joined, subjects={"public.users.id": "customer"}).params == {1: USER_ID_HIDDEN}
    # A plain value keeps its subject tag even if it also meets the column through more.
    both = "select 1 from users where id = $1 and id = abs($1)"
    assert plan(both).params == {1: USER_ID}


def test_a_masked_role_displaces_an_unmasked_one() -> None:
    """Fail-closed: a value that is also an email must not be logged as a bare id."""
    result = plan("select 1 from users where id = $1 or email = $1")
    assert result.params == {1: EMAIL}
    assert result.unresolved == [
        "$1 meets public.users.id and public.users.email; kept the masked one"
    ]
    result = plan("select 1 from users where email = $1 or id = abs($1)")
    assert result.params == {1: EMAIL}
    assert result.unresolved == ["$1 meets public.users.email and public.users.id; kept the first"]


def test_values_next_to_widened_ones_are_unaffected() -> None:
    sql = (
        "with w(n) as (values (5)) "
        "select o.amount * 2, 'label' from users u join orders o on o.user_id = u.id "
        "where u.email = lower($1) and o.amount > 100 and o.amount = abs($2) "
        "and left(u.name, 3) = 'Bob' and o.amount between 1 and $3 "
        "and o.id in (select id from orders where amount < 7) "
        "and o.amount in (select n from w) and coalesce(o.amount, 0) <> 9"
    )
    result = plan(sql)
    assert result.params == {1: EMAIL}
    assert result.literals == literals(sql, ("3)", NAME), ("'Bob'", NAME))
    insert = "insert into orders (user_id, amount) values (7, abs(5)), (8, $1)"
    result = plan(insert)
    assert (result.literals, result.params) == (
        literals(insert, ("7", ORDER_USER), ("8", ORDER_USER)),
        {},
    )


def test_constants_in_a_sub_select_filter_are_not_followed() -> None:
    """Documented limit: only what feeds the value is followed, not its filters."""
    sql = (
        "with v(e) as (values ('a@x'), ('b@x')) "
        "select 1 from users where email = (select e from v where e <> 'c@x')"
    )
    assert plan(sql).literals == literals(sql, ("'a@x'", EMAIL), ("'b@x'", EMAIL))


def test_view_definition_constants_are_never_reported() -> None:
    """contacts is defined with ``phone || ''``: that constant is not in this text."""
    sql = "select 1 from contacts where phone2 = $1 and mail = lower($2)"
    result = plan(sql)
    assert (result.literals, result.params) == ({}, {1: PHONE, 2: EMAIL})


# --------------------------------------------------------------------------- result columns


OUTPUTS = [
    ("select u.email, u.id from users u", {0: EMAIL, 1: USER_ID}),
    ("select * from users", dict(enumerate(USERS))),
    ("table users", dict(enumerate(USERS))),
    ("select amount, u.*, 1 from users u", {i + 1: r for i, r in enumerate(USERS)}),
    (
        "select email as e, id + 0, lower(name), email::text, length(email) from users",
        {0: EMAIL, 2: NAME, 3: EMAIL},
    ),
    ("select count(email), max(id), email || '' from users", {}),
    ("select * from orders", {1: ORDER_USER}),
    # JOIN USING columns come first, as in PostgreSQL.
    (
        "select * from orders join users using (id)",
        {0: USER_ID, 1: ORDER_USER, 3: EMAIL, 4: PHONE, 5: IBAN, 6: NAME},
    ),
    (
        "select * from users natural join orders",
        {0: USER_ID, 1: EMAIL, 2: PHONE, 3: IBAN, 4: NAME, 5: ORDER_USER},
    ),
    (
        "select j.* from (orders o join users u using (id)) as j(a, b)",
        {0: USER_ID, 1: ORDER_USER, 3: EMAIL, 4: PHONE, 5: IBAN, 6: NAME},
    ),
    ("select b from (orders o join users u using (id)) as j(a, b)", {0: ORDER_USER}),
    # Views, subqueries, CTEs, set operations.
    ("select * from contacts", {0: USER_ID, 1: EMAIL, 2: NAME}),
    ("select email, id from active_users", {0: EMAIL, 1: USER_ID}),
    ("select m from (select mail as m from contacts) s", {0: EMAIL}),
    ("with c(x, y) as (select name, phone from users) select y, x from c", {0: PHONE, 1: NAME}),
    ("select email from users union select 'nobody'", {0: EMAIL}),
    ("select 'nobody', 1 union all select name, id from users", {0: NAME, 1: USER_ID}),
    ("select user_id, total from big_spenders", {0: ORDER_USER}),
    (
        "select * from users u join lateral (select o.user_id from orders o) s on true",
        {**dict(enumerate(USERS)), 5: ORDER_USER},
    ),
    ("select * from crm.users", {}),
    ("select 1", {}),
    ("values (1, 'a')", {}),
    ("select email into backup from users", {}),
]


@pytest.mark.parametrize(("sql", "expected"), OUTPUTS, ids=[o[0] for o in OUTPUTS])
def test_output_columns(sql: str, expected: dict[int, ColumnRole]) -> None:
    assert plan(sql).output == expected


def test_returning() -> None:
    assert plan("delete from users where id = 1 returning id, email").output == {
        0: USER_ID,
        1: EMAIL,
    }
    assert plan("update users set name = 'x' returning *").output == dict(enumerate(USERS))
    assert plan("insert into orders (user_id) values (1) returning amount, user_id").output == {
        1: ORDER_USER
    }
    update_from = "update orders o set amount = 0 from users u where u.id = o.user_id returning *"
    assert plan(update_from).output == {1: ORDER_USER, **{i + 3: r for i, r in enumerate(USERS)}}


def test_unknown_columns_stop_positions() -> None:
    result = plan("select u.email, x.*, u.id from users u, elsewhere x")
    assert result.output == {0: EMAIL}
    assert result.unresolved == [
        "relation elsewhere is not in the catalog",
        "* on elsewhere not expanded (not in the catalog)",
        "result columns from position 1 on are not known",
    ]
    # Columns of a complete FROM item before the unknown one keep their places.
    assert plan("select * from users, elsewhere").output == dict(enumerate(USERS))


# --------------------------------------------------------------------------- names


def test_views_are_looked_through() -> None:
    sql = "select 1 from contacts where mail = 'm@x' and lname = 'l' and phone2 = 'p' and uid = 4"
    # phone2 is ``phone || ''``: not phone's value, but made of it (fail-closed).
    assert plan(sql).literals == literals(
        sql, ("'m@x'", EMAIL), ("'l'", NAME), ("'p'", PHONE), ("4", USER_ID)
    )
    # A view over a view over users.
    nested = "select 1 from active_users a where a.email like 'n%'"
    assert plan(nested).literals == literals(nested, ("'n%'", EMAIL))
    # A view column can be configured itself; it is closer than the base column.
    phone2 = ColumnRole("public.contacts.phone2", "partial", None)
    config = {"public.contacts.phone2": "partial", **PII}
    assert plan(sql, pii=config).literals == literals(
        sql, ("'m@x'", EMAIL), ("'l'", NAME), ("'p'", phone2), ("4", USER_ID)
    )


def test_search_path() -> None:
    crm_first = CATALOG.with_search_path("crm, public")
    sql = "select email, id from users where email = 'c@x' and id = 1"
    result = plan(sql, crm_first)
    assert (result.literals, result.output) == ({}, {})  # crm.users is not configured
    crm = {"crm.users.email": "email"}
    crm_email = ColumnRole("crm.users.email", "email", None)
    result = plan(sql, crm_first, pii=crm, subjects={})
    assert result.literals == literals(sql, ("'c@x'", crm_email))
    assert result.output == {0: crm_email}
    # Qualified names and relations only in public still resolve.
    mixed = "select 1 from public.users p, orders o where p.email = 'p@x' and o.user_id = 2"
    assert plan(mixed, crm_first).literals == literals(mixed, ("'p@x'", EMAIL), ("2", ORDER_USER))


def test_aliases_and_ambiguity() -> None:
    sql = "select 1 from users as u(a, b) where b = 'renamed@x' and u.a = 1"
    assert plan(sql).literals == literals(sql, ("'renamed@x'", EMAIL), ("1", 2, USER_ID))
    ambiguous = "select 1 from users, crm.users c where email = 'amb'"
    result = plan(ambiguous)
    assert result.literals == literals(ambiguous, ("'amb'", EMAIL))  # either one: fail-closed
    assert result.unresolved == ["column reference email is ambiguous"]


def test_configuration_names() -> None:
    pii = {"Public.Users.EMAIL": "email", 'public."users".name': "pseudonym", "users.phone": "x"}
    subjects = {"public.users.email": "person"}
    sql = "select email, name from users where email = 'a' and name = 'b'"
    result = plan(sql, pii=pii, subjects=subjects)
    email_and_person = ColumnRole("public.users.email", "email", "person")
    assert result.literals == literals(sql, ("'a'", email_and_person), ("'b'", NAME))
    assert result.output == {0: email_and_person, 1: NAME}
    assert result.unresolved == ["PII column 'users.phone' is not schema.table.column; ignored"]
    quoted = Catalog([Relation("public", "Mixed Case", "table", ("Id", "mail"))])
    role = ColumnRole('public."Mixed Case"."Id"', None, "customer")
    sql = 'select "Id" from "Mixed Case" where "Id" = 3'
    result = plan(sql, quoted, pii={}, subjects={'public."Mixed Case"."Id"': "customer"})
    assert (result.literals, result.output) == (literals(sql, ("3", role)), {0: role})


# --------------------------------------------------------------------------- offsets


def test_offsets_are_utf8_bytes() -> None:
    sql = "select 'ünïcødé 😀' as x, email from users where email = 'ä@x' and name = '名前'"
    result = plan(sql)
    data = sql.encode()
    email_at, name_at = sorted(result.literals)
    assert data[email_at:].startswith("'ä@x'".encode())
    assert data[name_at:].startswith("'名前'".encode())
    assert (result.literals[email_at], result.literals[name_at]) == (EMAIL, NAME)
    assert email_at != sql.index("'ä@x'")  # a character offset would be smaller


def test_literal_token_forms() -> None:
    """Offsets point at the token's first byte, prefix included (module docstring)."""
    sql = (
        "select 1 from users where email = E'a\\tb' and name = U&'d!0061t' UESCAPE '!' "
        "and phone = N'nat' and iban = n'low' and name = $$dollar$$ and email = $q$tag$q$ "
        "and iban = B'101' and phone = X'1F' and name = text 'typed' "
        "and email = 'con'\n'tinued'"
    )
    assert plan(sql).literals == literals(
        sql,
        ("E'a", EMAIL),
        ("U&'d", NAME),
        ("N'nat'", PHONE),
        ("n'low'", IBAN),
        ("$$dollar", NAME),
        ("$q$tag", EMAIL),
        ("B'101'", IBAN),
        ("X'1F'", PHONE),
        ("'typed'", NAME),
        ("'con'", EMAIL),
    )


def test_numbers_and_signs() -> None:
    sql = (
        "select 1 from users where id = -5 or id = - 6 or id = -/*c*/7 or id = +8 "
        "or id = -'9'::int or id = 1.5e3 or id = .5 or id = 0x1F or id = null or id = true"
    )
    assert plan(sql).literals == literals(
        sql,
        ("-5", USER_ID),  # folded: at the sign
        ("- 6", USER_ID),
        ("-/*c*/7", USER_ID),
        ("8", USER_ID),  # unary plus is not folded: at the digit
        ("'9'", USER_ID),  # a sign before a cast is not folded either
        ("1.5e3", USER_ID),
        (".5", 2, USER_ID),
        ("0x1F", USER_ID),
    )


def test_interval_typmod_constant_is_not_reported() -> None:
    sql = "select 1 from users where name = interval '1' day"
    assert plan(sql).literals == literals(sql, ("'1'", NAME))


# --------------------------------------------------------------------------- degraded


def test_without_catalog_only_qualified_names_match() -> None:
    sql = "select email, * from users where email = 'a' and id = 1"
    result = plan(sql, None)
    assert (result.literals, result.params, result.output) == ({}, {}, {})
    assert result.unresolved == [
        "no catalog: only columns of schema-qualified relations can be matched; "
        "* is not expanded and views are not looked through",
        "* on users not expanded (no catalog)",
        "result columns from position 1 on are not known",
    ]
    qualified = "select u.email, u.id from public.users u where email = 'q' and u.id = $1"
    result = plan(qualified, None)
    assert result.literals == literals(qualified, ("'q'", EMAIL))
    assert (result.params, result.output) == ({1: USER_ID}, {0: EMAIL, 1: USER_ID})
    view = plan("select mail from public.contacts where mail = 'v'", None)
    assert view.literals == {}  # a view is not known to be one without a catalog
    insert = plan("insert into public.users values (1, 'e')", None)
    assert insert.literals == {}
    assert "target columns of INSERT into public.users are unknown (no catalog)" in (
        insert.unresolved
    )
    assert plan("select 1", None).unresolved == []


def test_unparsable_empty_and_several_statements() -> None:
    bad = plan("selec email from users where email = 'x'")
    assert (bad.literals, bad.params, bad.output) == ({}, {}, {})
    # The error never quotes the statement (the token could be personal data).
    assert bad.unresolved == ["statement could not be parsed: syntax error at byte 0"]
    assert plan("").unresolved == ["empty statement"]
    assert plan("-- only a comment").unresolved == ["empty statement"]
    two = "select 1 from users where email = 'a'; select 1 from users where name = 'b'"
    result = plan(two)
    assert result.literals == literals(two, ("'a'", EMAIL))
    assert result.unresolved == ["2 statements given; only the first was planned"]
    deep = plan("select 1 from users where " + "not " * 2000 + "email = 'x'")
    assert deep.unresolved[0].startswith("statement could not be parsed")


NEVER_RAISE = [
    "create table t (email text default 'x')",
    "alter table users add column x int default 5",
    "do $$ begin perform 1 from users where email = 'x'; end $$",
    "explain analyze select * from users where email = 'e'",
    "explain select * from users where email = 'e'",
    "copy (select email from users where id = 3) to stdout",
    "prepare p as select * from users where email = $1",
    "execute p('x')",
    "set search_path = crm",
    "call proc('x')",
    "create view v as select * from users where email = 'x'",
    "select * from users where email = (select 'x')",
    "select * from users where email in (select email from crm.users where email = 'y')",
    "select * from json_to_record('{}') as r(email text) where email = 'x'",
    "select * from generate_series(1, 3) g where g = 2",
    "select (u).email from users u where (u).email = 'x'",
    "select * from users where users = users and ctid = '(0,1)'",
    "with recursive r as (select 1 as n union all select n + 1 from r where n < 3) select * from r",
    "select row_number() over (partition by email order by id) from users",
    "select * from users for update",
    "lock users",
    "select * from users where email = any(select email from users)",
    "select 1 from users where id = $0",
]


@pytest.mark.parametrize("sql", NEVER_RAISE)
def test_never_raises(sql: str) -> None:
    for catalog in (CATALOG, None):
        result = plan_masking(sql, catalog, PII, SUBJECTS)
        assert not any("internal error" in note for note in result.unresolved), result


def test_statements_other_than_queries() -> None:
    explain = "explain analyze select email from users where email = 'e'"
    result = plan(explain)
    assert (result.literals, result.output) == (literals(explain, ("'e'", EMAIL)), {})
    prepared = plan("prepare p as select * from users where email = $1")
    assert (prepared.params, prepared.output) == ({1: EMAIL}, {})


def test_view_definitions_are_memoised_per_catalog() -> None:
    catalog = Catalog(RELATIONS)
    plan("select mail from contacts", catalog)
    assert "masking-view:public.contacts" in catalog.memo
    crm_first = catalog.with_search_path("crm, public")
    assert "masking-view:public.contacts" in crm_first.memo  # shared by variants
    assert plan("select mail from contacts", crm_first).output == {0: EMAIL}
