"""The filter grammar of ``POST /v1/results:search`` and ``GET /v1/series``, parsed here.

A filter is clauses joined by ``AND`` (no ``OR``, no parentheses)::

    filter  := clause ( "AND" clause )*        (empty: every job)
    clause  := name op literal | name "IN" "(" literal ( "," literal )* ")"
    op      := "=" | "!=" | "<" | "<=" | ">" | ">=" | "LIKE"
    name    := labels.<key> | scalars.<key> | id | status | metric | rep | variant | model
             | dataset | n | step | created_at | finished_at
    literal := 'text' (a quote doubled inside: 'it''s') | number (-1, 2.5, 1e-3)

Keywords are case-insensitive. ``LIKE`` takes ``%`` (any run) and ``_`` (one character) on
text fields. Labels and the text fields compare to quoted text; ``step``, ``n`` (examples)
and ``scalars.<key>`` to numbers; ``created_at``/``finished_at`` to quoted ISO 8601
date-times. The parser builds a list of :class:`Clause`; the store binds every literal as a
SQL parameter, so a filter can never change the query's shape. Errors name the 0-based
character position.

>>> parse("labels.run = 'seed0' AND rep IN ('kfac', 'ekfac') AND step >= 1000")[1]
Clause(name='rep', op='IN', values=('kfac', 'ekfac'))
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from fimntk.contract.vocabulary import LABEL_KEY_PATTERN

#: Longest filter (characters), most clauses, most values of one ``IN``.
MAX_FILTER_LENGTH = 4000
MAX_CLAUSES = 32
MAX_IN_VALUES = 100

#: Fields compared to quoted text.
TEXT_FIELDS = frozenset({"id", "status", "metric", "rep", "variant", "model", "dataset"})
#: Fields compared to numbers.
NUMBER_FIELDS = frozenset({"step", "n"})
#: Fields compared to ISO 8601 date-times (quoted).
TIME_FIELDS = frozenset({"created_at", "finished_at"})
#: Every plain field name (besides ``labels.<key>`` and ``scalars.<key>``).
FIELDS = TEXT_FIELDS | NUMBER_FIELDS | TIME_FIELDS
OPERATORS = ("=", "!=", "<", "<=", ">", ">=", "IN", "LIKE")

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>'(?:[^']|'')*')
      | (?P<number>-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)(?![A-Za-z0-9_.])
      | (?P<op><=|>=|!=|=|<|>)
      | (?P<punct>[(),])
      | (?P<word>[A-Za-z_][A-Za-z0-9_.-]*)
    )""",
    re.VERBOSE,
)
_KEY = re.compile(LABEL_KEY_PATTERN)


class FilterError(ValueError):
    """A filter that does not parse; ``position`` is the 0-based offset of the fault."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(f"{message} (at position {position})")
        self.position = position


@dataclass(frozen=True)
class Clause:
    """One ``name op literal`` clause; ``values`` holds one literal, or several for ``IN``."""

    name: str
    op: str
    values: tuple[str | float | datetime, ...]

    @property
    def kind(self) -> str:
        """``label``, ``scalar``, ``text``, ``number`` or ``time``."""
        if self.name.startswith("labels."):
            return "label"
        if self.name.startswith("scalars."):
            return "scalar"
        if self.name in TEXT_FIELDS:
            return "text"
        return "number" if self.name in NUMBER_FIELDS else "time"

    @property
    def key(self) -> str:
        """The key after ``labels.``/``scalars.``; the name itself for a field."""
        return self.name.split(".", 1)[1] if "." in self.name else self.name


@dataclass(frozen=True)
class _Token:
    kind: str
    text: str
    position: int


def _tokens(text: str) -> list[_Token]:
    tokens = []
    position = 0
    while position < len(text):
        if text[position:].strip() == "":
            break
        match = _TOKEN.match(text, position)
        if match is None or match.lastgroup is None:
            start = len(text) - len(text[position:].lstrip())
            raise FilterError(f"unexpected character {text[start]!r}", start)
        start = match.start(match.lastgroup)
        tokens.append(_Token(match.lastgroup, match.group(match.lastgroup), start))
        position = match.end()
    return tokens


def check_name(name: str, position: int = 0) -> str:
    """A valid field name (``labels.<key>``, ``scalars.<key>`` or a field), unchanged.

    Raises:
        FilterError: An unknown name.
    """
    prefix, _, key = name.partition(".")
    if prefix in ("labels", "scalars") and key:
        if not _KEY.match(key):
            raise FilterError(f"bad key {key!r} (letters, digits, '_', '.', '-')", position)
        return name
    if name in FIELDS:
        return name
    raise FilterError(
        f"unknown name {name!r}: use labels.<key>, scalars.<key> or one of {sorted(FIELDS)}",
        position,
    )


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokens(text)
        self.index = 0

    def _next(self, expected: str) -> _Token:
        if self.index >= len(self.tokens):
            raise FilterError(f"expected {expected}, got the end", len(self.text))
        token = self.tokens[self.index]
        self.index += 1
        return token

    def clauses(self) -> list[Clause]:
        if not self.tokens:
            return []
        clauses = [self._clause()]
        while self.index < len(self.tokens):
            token = self._next("AND")
            if token.kind != "word" or token.text.upper() != "AND":
                raise FilterError(f"expected AND, got {token.text!r}", token.position)
            clauses.append(self._clause())
            if len(clauses) > MAX_CLAUSES:
                raise FilterError(f"at most {MAX_CLAUSES} clauses", token.position)
        return clauses

    def _clause(self) -> Clause:
        token = self._next("a name")
        if token.kind != "word":
            raise FilterError(f"expected a name, got {token.text!r}", token.position)
        name = check_name(token.text, token.position)
        op_token = self._next("an operator")
        op = op_token.text.upper()
        if op not in OPERATORS:
            raise FilterError(
                f"expected an operator {list(OPERATORS)}, got {op_token.text!r}",
                op_token.position,
            )
        values = self._list() if op == "IN" else [self._next("a literal")]
        return Clause(name, op, tuple(self._literal(name, op, v) for v in values))

    def _list(self) -> list[_Token]:
        opening = self._next("'('")
        if opening.text != "(":
            raise FilterError(f"expected '(' after IN, got {opening.text!r}", opening.position)
        values = [self._next("a literal")]
        while True:
            token = self._next("',' or ')'")
            if token.text == ")":
                return values
            if token.text != ",":
                raise FilterError(f"expected ',' or ')', got {token.text!r}", token.position)
            values.append(self._next("a literal"))
            if len(values) > MAX_IN_VALUES:
                raise FilterError(f"at most {MAX_IN_VALUES} values in IN", token.position)

    @staticmethod
    def _literal(name: str, op: str, token: _Token) -> str | float | datetime:
        numeric = name in NUMBER_FIELDS or name.startswith("scalars.")
        if token.kind == "number":
            if not numeric:
                raise FilterError(f"{name} compares to quoted text, not a number", token.position)
            if op == "LIKE":
                raise FilterError("LIKE applies to text fields only", token.position)
            return float(token.text)
        if token.kind != "string":
            raise FilterError(f"expected a literal, got {token.text!r}", token.position)
        if numeric:
            raise FilterError(f"{name} compares to a number, not text", token.position)
        value = token.text[1:-1].replace("''", "'")
        if name in TIME_FIELDS:
            if op == "LIKE":
                raise FilterError("LIKE applies to text fields only", token.position)
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                message = f"{value!r} is not an ISO 8601 date-time"
                raise FilterError(message, token.position) from None
        return value


def parse(text: str) -> list[Clause]:
    """The clauses of a filter (empty for an empty filter).

    Raises:
        FilterError: A filter that does not parse, with the position of the fault.
    """
    if len(text) > MAX_FILTER_LENGTH:
        raise FilterError(f"a filter holds at most {MAX_FILTER_LENGTH} characters", 0)
    return _Parser(text).clauses()
