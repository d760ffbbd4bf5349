"""OData v4 pieces of the Dataverse stand-in: typed columns, answers and Dataverse's error
shape, and the query options ($select, $filter, $orderby, $top, $count) run over rows."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Final, Literal

from multidict import MultiMapping

EdmType = Literal[
    "Edm.String", "Edm.Int32", "Edm.Decimal", "Edm.Boolean", "Edm.Guid", "Edm.DateTimeOffset"
]
Value = str | int | float | bool | None
Row = dict[str, Value]

GUID: Final = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
QUERY_OPTIONS: Final = (
    "$select",
    "$filter",
    "$orderby",
    "$top",
    "$count",
    "$skiptoken",
    "$expand",
)


@dataclass(frozen=True)
class Column:
    """A column's logical name, type, and whether clients may write it."""

    name: str
    edm: EdmType
    writable: bool = True
    options: Mapping[int, str] | None = None  # a choice (picklist) column's values and labels


@dataclass
class Answer:
    """What the service answers: status, headers, and a JSON body or none."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None


class Failure(Exception):
    """Raised with the answer to give: handlers raise, the service renders."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(answer.body)
        self.answer = answer


def error(status: HTTPStatus, code: str, message: str) -> Answer:
    """Dataverse's error shape: {"error": {"code": "0x…", "message": …}}."""
    return Answer(status, body={"error": {"code": code, "message": message}})


def fail(status: HTTPStatus, code: str, message: str) -> Failure:
    """The Failure to raise for an error answer."""
    return Failure(error(status, code, message))


# --------------------------------------------------------------------------- query options


_Predicate = Callable[[Row], bool]


@dataclass(frozen=True)
class Query:
    """A request's query options, checked against the entity's columns."""

    select: tuple[str, ...] = ()
    predicate: _Predicate | None = None
    order: tuple[tuple[str, bool], ...] = ()  # (column, descending)
    top: int | None = None
    count: bool = False
    skiptoken: str | None = None

    @classmethod
    def parse(
        cls,
        params: MultiMapping[str],
        columns: Mapping[str, Column],
        entity_type: str,
        *,
        paging: bool,
    ) -> Query:
        """Check and parse the options Dataverse takes; a 400 Failure names the first wrong one."""
        for option in params:
            if option == "$skip":
                raise bad_query("The query parameter $skip is not supported")
            if option.startswith("$") and option not in QUERY_OPTIONS:
                raise bad_query(f"The query parameter {option} is not supported")
            if len(params.getall(option)) > 1:
                raise bad_query(f"Query option '{option}' was specified more than once.")
        if "$expand" in params:
            raise bad_query("The sandbox does not support $expand.")
        if not paging and "$skiptoken" in params:
            raise bad_query("The query parameter $skiptoken is not supported here")
        top = params.get("$top")
        if top is not None and (not re.fullmatch(r"[0-9]{1,9}", top)):
            raise bad_query(f"Invalid value '{top}' for $top query option found.")
        count = params.get("$count", "false")
        if count not in ("true", "false"):
            raise bad_query(f"'{count}' is not a valid count option.")
        text = params.get("$filter")
        return cls(
            select=_parse_select(params.get("$select"), columns, entity_type),
            predicate=None if text is None else _FilterParser(text, columns, entity_type).parse(),
            order=_parse_orderby(params.get("$orderby"), columns, entity_type),
            top=None if top is None else int(top),
            count=count == "true",
            skiptoken=params.get("$skiptoken"),
        )

    def run(self, rows: Iterable[Row], primary_id: str) -> list[Row]:
        """The rows that match, in order (ties by key, so paging cookies stay stable)."""
        matches = [row for row in rows if self.predicate is None or self.predicate(row)]
        # Ties keep a stable order by key, as paging cookies need.
        matches.sort(key=lambda row: str(row[primary_id]))
        for name, descending in reversed(self.order):
            matches.sort(key=lambda row, n=name: (row[n] is not None, row[n]), reverse=descending)  # type: ignore[misc]
        return matches

    def project(self, row: Row, primary_id: str) -> Row:
        """The selected columns of `row`, the primary key always among them."""
        if not self.select:
            return {name: value for name, value in row.items() if name != "versionnumber"}
        # Dataverse always returns the primary key, selected or not.
        return {name: row[name] for name in (*self.select, primary_id) if name in row} | {
            primary_id: row[primary_id]
        }


def bad_query(message: str) -> Failure:
    """400 for a query option Dataverse would refuse."""
    return fail(HTTPStatus.BAD_REQUEST, "0x80060888", message)


def _no_property(name: str, entity_type: str) -> Failure:
    return fail(
        HTTPStatus.BAD_REQUEST,
        "0x0",
        f"Could not find a property named '{name}' on type '{entity_type}'.",
    )


def _parse_select(
    value: str | None, columns: Mapping[str, Column], entity_type: str
) -> tuple[str, ...]:
    if value is None:
        return ()
    names = [name.strip() for name in value.split(",")]
    for name in names:
        if name not in columns:
            raise _no_property(name, entity_type)
    return tuple(dict.fromkeys(names))


def _parse_orderby(
    value: str | None, columns: Mapping[str, Column], entity_type: str
) -> tuple[tuple[str, bool], ...]:
    if value is None:
        return ()
    order = []
    for item in value.split(","):
        name, *direction = item.split()
        if direction not in ([], ["asc"], ["desc"]):
            raise bad_query(f"Syntax error in $orderby: '{item.strip()}'.")
        if name not in columns:
            raise _no_property(name, entity_type)
        order.append((name, direction == ["desc"]))
    return tuple(order)


# $filter: comparisons (eq ne gt ge lt le), contains/startswith/endswith, and/or/not, parentheses.
_TOKEN: Final = re.compile(
    r"""\s*(?:
        (?P<string>'(?:[^']|'')*')
      | (?P<guid>[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12})
      | (?P<number>-?[0-9]+(?:\.[0-9]+)?)
      | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<punct>[(),])
    )\s*""",
    re.VERBOSE,
)
_COMPARE: Final[Mapping[str, Callable[[Any, Any], bool]]] = {
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "gt": lambda a, b: a is not None and b is not None and a > b,
    "ge": lambda a, b: a is not None and b is not None and a >= b,
    "lt": lambda a, b: a is not None and b is not None and a < b,
    "le": lambda a, b: a is not None and b is not None and a <= b,
}
_FUNCTIONS: Final[Mapping[str, Callable[[str, str], bool]]] = {
    # Dataverse compares text case-insensitively (the database collation).
    "contains": lambda value, text: text.casefold() in value.casefold(),
    "startswith": lambda value, text: value.casefold().startswith(text.casefold()),
    "endswith": lambda value, text: value.casefold().endswith(text.casefold()),
}


class _FilterParser:
    def __init__(self, text: str, columns: Mapping[str, Column], entity_type: str) -> None:
        self._text = text
        self._columns = columns
        self._entity_type = entity_type
        self._tokens: list[tuple[str, str, int]] = []
        position = 0
        while text[position:].strip():
            match = _TOKEN.match(text, position)
            if match is None or match.lastgroup is None:
                raise self._syntax(len(text) - len(text[position:].lstrip()))
            self._tokens.append(
                (match.lastgroup, match[match.lastgroup], match.start(match.lastgroup))
            )
            position = match.end()
        self._at = 0

    def parse(self) -> _Predicate:
        predicate = self._disjunction()
        if self._at < len(self._tokens):
            raise self._syntax(self._tokens[self._at][2])
        return predicate

    def _syntax(self, position: int) -> Failure:
        return bad_query(f"Syntax error at position {position} in '{self._text}'.")

    def _peek(self, kind: str, ahead: int = 0) -> str | None:
        index = self._at + ahead
        if index < len(self._tokens) and self._tokens[index][0] == kind:
            return self._tokens[index][1]
        return None

    def _next(self) -> tuple[str, str, int]:
        if self._at >= len(self._tokens):
            raise self._syntax(len(self._text))
        self._at += 1
        return self._tokens[self._at - 1]

    def _accept(self, kind: str, text: str) -> bool:
        if self._peek(kind) == text:
            self._at += 1
            return True
        return False

    def _expect(self, kind: str, text: str | None = None) -> str:
        token = self._next()
        if token[0] != kind or text not in (None, token[1]):
            raise self._syntax(token[2])
        return token[1]

    def _disjunction(self) -> _Predicate:
        terms = [self._conjunction()]
        while self._accept("word", "or"):
            terms.append(self._conjunction())
        return terms[0] if len(terms) == 1 else lambda row: any(term(row) for term in terms)

    def _conjunction(self) -> _Predicate:
        terms = [self._unary()]
        while self._accept("word", "and"):
            terms.append(self._unary())
        return terms[0] if len(terms) == 1 else lambda row: all(term(row) for term in terms)

    def _unary(self) -> _Predicate:
        if self._accept("word", "not"):
            inner = self._unary()
            return lambda row: not inner(row)
        if self._accept("punct", "("):
            inner = self._disjunction()
            self._expect("punct", ")")
            return inner
        word = self._peek("word")
        if word is not None and self._peek("punct", ahead=1) == "(":
            return self._function(word)
        return self._comparison()

    def _function(self, name: str) -> _Predicate:
        test = _FUNCTIONS.get(name)
        if test is None:
            raise bad_query(f"An unknown function with name '{name}' was found.")
        self._at += 2
        column = self._column()
        self._expect("punct", ",")
        text = self._literal(column)
        self._expect("punct", ")")
        if column.edm != "Edm.String" or not isinstance(text, str):
            raise bad_query(f"{name}() needs a text column and a string, got {column.name}.")
        return lambda row: isinstance(value := row[column.name], str) and test(value, text)

    def _comparison(self) -> _Predicate:
        column = self._column()
        operation = self._expect("word")
        compare = _COMPARE.get(operation)
        if compare is None:
            raise bad_query(f"Syntax error: unknown operator '{operation}' in '{self._text}'.")
        literal = self._literal(column)
        if column.edm == "Edm.String" and isinstance(literal, str):
            folded = literal.casefold()
            return lambda row: compare(_fold(row[column.name]), folded)
        return lambda row: compare(row[column.name], literal)

    def _column(self) -> Column:
        name = self._expect("word")
        column = self._columns.get(name)
        if column is None:
            raise _no_property(name, self._entity_type)
        return column

    def _literal(self, column: Column) -> Value:
        kind, text, position = self._next()
        if kind == "word" and text in ("null", "true", "false"):
            value: Value = None if text == "null" else text == "true"
        elif kind == "string":
            value = text[1:-1].replace("''", "'")
        elif kind == "guid":
            value = text.lower()
        elif kind == "number":
            value = float(text) if "." in text or column.edm == "Edm.Decimal" else int(text)
        else:
            raise self._syntax(position)
        if value is not None and not _literal_fits(column.edm, value):
            message = (
                "A binary operator with incompatible types was detected: "
                f"'{column.edm}' and the literal {text}."
            )
            raise bad_query(message)
        return value


def _fold(value: Value) -> Value:
    return value.casefold() if isinstance(value, str) else value


def _literal_fits(edm: EdmType, value: Value) -> bool:
    if edm in ("Edm.String", "Edm.DateTimeOffset"):
        return isinstance(value, str)
    if edm == "Edm.Guid":
        return isinstance(value, str) and GUID.fullmatch(value) is not None
    if edm == "Edm.Boolean":
        return isinstance(value, bool)
    return isinstance(value, int | float) and not isinstance(value, bool)
