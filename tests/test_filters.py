"""The filter grammar of searches: what parses, every error with its position, and injection
attempts that stay literals or fail to parse."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from fimntk.contract.filters import (
    MAX_CLAUSES,
    MAX_FILTER_LENGTH,
    MAX_IN_VALUES,
    Clause,
    FilterError,
    parse,
)


def test_empty_filter_is_every_job() -> None:
    assert parse("") == [] and parse("   ") == []


def test_clauses_of_each_operator_and_kind() -> None:
    text = (
        "labels.run = 'seed0' and rep IN ('kfac','ekfac') AND step >= 1000 AND "
        "scalars.trace < -1.5e3 AND created_at > '2025-01-31T12:00:00Z' AND model LIKE 'sha%' "
        "AND status != 'failed' AND scalars.lambda_max <= .5 AND step > 2 AND labels.a-b.c = ''"
    )
    assert parse(text) == [
        Clause("labels.run", "=", ("seed0",)),
        Clause("rep", "IN", ("kfac", "ekfac")),
        Clause("step", ">=", (1000.0,)),
        Clause("scalars.trace", "<", (-1500.0,)),
        Clause("created_at", ">", (datetime(2025, 1, 31, 12, tzinfo=timezone.utc),)),
        Clause("model", "LIKE", ("sha%",)),
        Clause("status", "!=", ("failed",)),
        Clause("scalars.lambda_max", "<=", (0.5,)),
        Clause("step", ">", (2.0,)),
        Clause("labels.a-b.c", "=", ("",)),
    ]
    kinds = [c.kind for c in parse(text)]
    assert kinds[:5] == ["label", "text", "number", "scalar", "time"]
    assert parse(text)[0].key == "run"


def test_doubled_quote_is_one_quote() -> None:
    assert parse("labels.note = 'it''s'")[0].values == ("it's",)


@pytest.mark.parametrize(
    ("text", "position", "words"),
    [
        ("rep =", 5, "got the end"),
        ("rep == 'a'", 5, "expected a literal"),
        ("rep", 3, "expected an operator"),
        ("rep ~ 'a'", 4, "unexpected character"),
        ("rep BETWEEN 'a'", 4, "expected an operator"),
        ("foo = 'a'", 0, "unknown name"),
        ("labels. = 'a'", 0, "unknown name"),
        ("labels.9x = 'a'", 0, "bad key"),
        ("rep = 'a' OR rep = 'b'", 10, "expected AND"),
        ("rep = 'a' rep = 'b'", 10, "expected AND"),
        ("step = 'x'", 7, "compares to a number"),
        ("rep = 3", 6, "compares to quoted text"),
        ("labels.run = 3", 13, "compares to quoted text"),
        ("step LIKE 3", 10, "LIKE applies to text"),
        ("created_at LIKE '2025%'", 16, "LIKE applies to text"),
        ("created_at > 'yesterday'", 13, "not an ISO 8601"),
        ("rep IN 'a'", 7, "expected '('"),
        ("rep IN ('a' 'b')", 12, "expected ',' or ')'"),
        ("rep IN ('a',", 12, "got the end"),
        ("rep = rep", 6, "expected a literal"),
        ("labels.run = 'unterminated", 13, "unexpected character"),
        ("(rep = 'a')", 0, "expected a name"),
    ],
)
def test_each_error_names_its_position(text: str, position: int, words: str) -> None:
    with pytest.raises(FilterError) as caught:
        parse(text)
    assert caught.value.position == position
    assert words in str(caught.value) and f"position {position}" in str(caught.value)


@pytest.mark.parametrize(
    "text",
    [
        "rep = 'a'; DROP TABLE jobs",
        "rep = 'a' -- comment",
        "rep = 'a' /* x */",
        'rep = "a"',
        "rep = 'a' UNION SELECT 1",
        "labels.run = 'x' OR 1 = 1",
    ],
)
def test_injection_attempts_do_not_parse(text: str) -> None:
    with pytest.raises(FilterError):
        parse(text)


def test_injection_inside_quotes_stays_one_literal() -> None:
    (clause,) = parse("labels.run = 'x'' OR ''1''=''1'")
    assert clause.values == ("x' OR '1'='1",)


def test_bounds() -> None:
    with pytest.raises(FilterError, match="at most"):
        parse("x" * (MAX_FILTER_LENGTH + 1))
    many = " AND ".join(["step > 1"] * (MAX_CLAUSES + 1))
    with pytest.raises(FilterError, match=f"at most {MAX_CLAUSES} clauses"):
        parse(many)
    assert len(parse(" AND ".join(["step > 1"] * MAX_CLAUSES))) == MAX_CLAUSES
    values = ",".join(["'a'"] * (MAX_IN_VALUES + 1))
    with pytest.raises(FilterError, match=f"at most {MAX_IN_VALUES} values"):
        parse(f"rep IN ({values})")
