"""A Customer Insights API v1 stand-in: instances, entity metadata and OData entity data.

Shapes follow the API's v1 contract so that Microsoft's generated clients deserialize them:
`ApiErrorResult` for instance-level errors, a flat `ODataError` for data-level ones.
No authentication happens here; the sandbox puts its APIM checks in front.
"""

import math
import operator
import random
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from http import HTTPStatus
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import MultiMapping

from gateway.sandbox.seed import (
    SCHEMAS,
    EdmType,
    EntitySchema,
    Instance,
    Row,
    Scalar,
    format_datetime,
    generate_instances,
    new_key,
)

# Server-driven paging: longer results end with an @odata.nextLink, as the real API's do.
PAGE_SIZE: Final = 100

_Comparable = str | int | float | date | datetime | None
_Predicate = Callable[[Row], bool]


@dataclass
class _State:
    instances: dict[str, Instance]
    now: Callable[[], datetime]
    # Keys for created rows come from the seeded generator too, so runs are reproducible.
    rng: random.Random


_STATE: Final = web.AppKey("customer_insights_state", _State)


def create_customer_insights_app(
    *, seed: int = 7, now: Callable[[], datetime] | None = None
) -> web.Application:
    """Build the stand-in app, routes under /v1, data generated from seed."""
    clock = now or _utc_now
    rng = random.Random(seed)  # noqa: S311  sample data, not secrets
    app = web.Application(middlewares=[_render_errors])
    app[_STATE] = _State(generate_instances(rng, _aware(clock())), clock, rng)
    instance = "/v1/instances/{instanceId}"
    app.add_routes(
        [
            web.get("/v1/instances", _list_instances),
            web.get(instance, _get_instance),
            web.get(f"{instance}/manage/entities", _list_entities),
            web.get(f"{instance}/manage/entities/{{entityName}}", _get_entity),
            web.get(f"{instance}/data/{{entityName}}", _query_rows),
            web.post(f"{instance}/data/{{entityName}}", _create_row),
            web.get(f"{instance}/data/{{entityName}}/{{entityId}}", _get_row),
            web.patch(f"{instance}/data/{{entityName}}/{{entityId}}", _update_row),
        ]
    )
    return app


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _aware(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("now() must return an aware datetime, e.g. datetime.now(UTC)")
    return moment


# Errors: handlers raise, one middleware renders.


class _RequestError(Exception):
    def __init__(self, status: HTTPStatus, body: dict[str, str]) -> None:
        super().__init__(body["message"])
        self.status = status
        self.body = body


def _api_error(status: HTTPStatus, code: str, message: str) -> _RequestError:
    # ApiErrorResult carries .NET's HttpStatusCode enum name, e.g. "NotFound".
    name = status.phrase.replace(" ", "")
    return _RequestError(status, {"errorCode": code, "message": message, "httpStatusCode": name})


def _odata_error(status: HTTPStatus, code: str, message: str, target: str) -> _RequestError:
    return _RequestError(status, {"errorCode": code, "message": message, "target": target})


def _bad_option(option: str, message: str) -> _RequestError:
    return _odata_error(HTTPStatus.BAD_REQUEST, "InvalidQueryOption", message, option)


@web.middleware
async def _render_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except _RequestError as problem:
        return web.json_response(problem.body, status=problem.status)


# Handlers.


async def _list_instances(request: web.Request) -> web.Response:
    instances = request.app[_STATE].instances.values()
    return web.json_response([_instance_info(instance) for instance in instances])


async def _get_instance(request: web.Request) -> web.Response:
    instance = _instance(request)
    body: dict[str, object] = {
        "name": instance.name,
        "instanceType": instance.instance_type,
        "provisioningState": "Succeeded",
        "region": instance.region,
        "isB2B": instance.is_b2b,
        "isB2C": instance.is_b2c,
    }
    if instance.expiry is not None:
        body["expiryTimeUtc"] = format_datetime(instance.expiry)
    return web.json_response(body)


async def _list_entities(request: web.Request) -> web.Response:
    _instance(request)
    return web.json_response([_entity_metadata(schema) for schema in SCHEMAS.values()])


async def _get_entity(request: web.Request) -> web.Response:
    _instance(request)
    return web.json_response(_entity_metadata(_schema(request)))


async def _query_rows(request: web.Request) -> web.Response:
    instance, schema = _instance(request), _schema(request)
    query = _parse_query(schema, request.query)
    matches = _run_query(schema, instance.tables[schema.name].values(), query)
    window = matches[query.skip :][: query.top]
    page = [_project(row, query.select) for row in window[:PAGE_SIZE]]
    context = f"{request.url.origin()}/v1/instances/{instance.instance_id}/data/$metadata"
    projection = f"({','.join(query.select)})" if query.select else ""
    body: dict[str, object] = {
        "@odata.context": f"{context}#{schema.name}{projection}",
        "@odata.count": len(matches),
        "value": page,
    }
    if len(window) > PAGE_SIZE:
        rest = {"$skip": str(query.skip + PAGE_SIZE)}
        if query.top is not None:
            rest["$top"] = str(query.top - PAGE_SIZE)
        body["@odata.nextLink"] = str(request.url.update_query(rest))
    return web.json_response(body)


async def _get_row(request: web.Request) -> web.Response:
    return web.json_response(_row(request))


async def _create_row(request: web.Request) -> web.Response:
    instance, schema = _instance(request), _schema(request)
    state = request.app[_STATE]
    row: Row = dict.fromkeys(schema.attributes)
    row.update(_validated(schema, await _json_object(request)))
    key = row[schema.key] = str(row[schema.key] or new_key(state.rng))
    table = instance.tables[schema.name]
    if key in table:
        message = f"A {schema.name} with {schema.key} '{key}' already exists."
        raise _odata_error(HTTPStatus.CONFLICT, "EntityAlreadyExists", message, schema.key)
    if schema.created is not None and row[schema.created] is None:
        row[schema.created] = format_datetime(_aware(state.now()))
    table[key] = row
    location = f"/v1/instances/{instance.instance_id}/data/{schema.name}/{key}"
    return web.json_response(row, status=HTTPStatus.CREATED, headers={"Location": location})


async def _update_row(request: web.Request) -> web.Response:
    row, schema = _row(request), _schema(request)
    changes = _validated(schema, await _json_object(request))
    if schema.key in changes and changes[schema.key] != row[schema.key]:
        message = f"{schema.key} identifies the row and cannot be changed."
        raise _odata_error(HTTPStatus.BAD_REQUEST, "InvalidRequestBody", message, schema.key)
    row.update(changes)
    return web.json_response(row)


# Lookups.


def _instance(request: web.Request) -> Instance:
    raw = request.match_info["instanceId"]
    try:
        # Azure GUIDs compare case-insensitively and with or without braces.
        instance_id = str(uuid.UUID(raw))
    except ValueError:
        instance_id = raw
    instance = request.app[_STATE].instances.get(instance_id)
    if instance is None:
        message = f"Instance '{raw}' was not found or you have no access to it."
        raise _api_error(HTTPStatus.NOT_FOUND, "InstanceNotFound", message)
    return instance


def _schema(request: web.Request) -> EntitySchema:
    name = request.match_info["entityName"]
    schema = SCHEMAS.get(name)
    if schema is None:
        message = f"Entity '{name}' does not exist in this instance."
        raise _odata_error(HTTPStatus.NOT_FOUND, "EntityNotFound", message, name)
    return schema


def _row(request: web.Request) -> Row:
    table = _instance(request).tables[_schema(request).name]
    entity_id = request.match_info["entityId"]
    row = table.get(entity_id)
    if row is None:
        message = f"No row with key '{entity_id}'."
        raise _odata_error(HTTPStatus.NOT_FOUND, "RowNotFound", message, entity_id)
    return row


# Shapes.


def _instance_info(instance: Instance) -> dict[str, str]:
    info = {
        "instanceId": instance.instance_id,
        "name": instance.name,
        "instanceType": instance.instance_type,
        "azureRegion": instance.region,
        "scaleUnitId": instance.scale_unit_id,
    }
    if instance.expiry is not None:
        info["expiryTimeUtc"] = format_datetime(instance.expiry)
    return info


def _entity_metadata(schema: EntitySchema) -> dict[str, object]:
    attributes = [
        {"name": name, "dataType": data_type, "isKey": name == schema.key}
        for name, data_type in schema.attributes.items()
    ]
    return {"name": schema.name, "attributes": attributes}


def _project(row: Row, select: tuple[str, ...]) -> Row:
    return {name: row[name] for name in select} if select else dict(row)


# Request bodies.


async def _json_object(request: web.Request) -> dict[str, object]:
    try:
        body = await request.json()
    except (ValueError, LookupError):  # malformed JSON, undecodable bytes, unknown charset
        body = None
    if not isinstance(body, dict):
        message = "The request body must be a JSON object of attribute values."
        raise _odata_error(HTTPStatus.BAD_REQUEST, "InvalidRequestBody", message, "body")
    return body


def _validated(schema: EntitySchema, body: Mapping[str, object]) -> Row:
    row: Row = {}
    for name, value in body.items():
        data_type = schema.attributes.get(name)
        if data_type is None:
            message = f"'{name}' is not an attribute of {schema.name}."
            raise _odata_error(HTTPStatus.BAD_REQUEST, "InvalidRequestBody", message, name)
        try:
            row[name] = _stored(data_type, value)
        except (TypeError, ValueError) as error:
            message = f"'{name}' must be {data_type} or null: {error}"
            raise _odata_error(
                HTTPStatus.BAD_REQUEST, "InvalidRequestBody", message, name
            ) from error
    if row.get(schema.key) == "":
        message = f"{schema.key} must not be empty; leave it out to have one generated."
        raise _odata_error(HTTPStatus.BAD_REQUEST, "InvalidRequestBody", message, schema.key)
    return row


def _stored(data_type: EdmType, value: object) -> Scalar:
    """Return value in its stored JSON form, raising TypeError or ValueError if it does not fit."""
    if value is None:
        return None
    if data_type == "Edm.String" and isinstance(value, str):
        return value
    # bool is an int subclass in Python but not a number in JSON.
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise TypeError(f"got {type(value).__name__}")
    if data_type == "Edm.Int32" and isinstance(value, int) and -(2**31) <= value < 2**31:
        return value
    if data_type == "Edm.Double" and not isinstance(value, str) and math.isfinite(value):
        return float(value)
    if data_type in ("Edm.Date", "Edm.DateTimeOffset") and isinstance(value, str):
        return _stored_moment(data_type, value)
    raise ValueError(f"got {value!r}")


def _stored_moment(data_type: EdmType, value: str) -> str:
    moment = _comparable(data_type, value)
    if isinstance(moment, datetime):
        return format_datetime(moment)
    return str(moment)


def _comparable(data_type: EdmType, value: Scalar) -> _Comparable:
    """Convert a stored value to one that compares correctly for its type."""
    if value is None or data_type not in ("Edm.Date", "Edm.DateTimeOffset"):
        return value
    text = str(value)
    if data_type == "Edm.Date":
        if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", text):
            raise ValueError(f"{text!r} is not a date like 2024-05-31")
        return date.fromisoformat(text)
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no UTC offset; add Z or e.g. +02:00")
    return moment


# OData query options.


@dataclass(frozen=True)
class _Query:
    predicate: _Predicate | None = None
    search: str | None = None
    order: tuple[tuple[str, bool], ...] = ()  # (attribute, descending)
    select: tuple[str, ...] = ()
    skip: int = 0
    top: int | None = None


_OPTIONS: Final = ("$filter", "$search", "$orderby", "$select", "$skip", "$top", "$count")


def _parse_query(schema: EntitySchema, params: MultiMapping[str]) -> _Query:
    # OData services reject unknown system query options; it also catches typos like $fitler.
    for option in params:
        if option.startswith("$") and option not in _OPTIONS:
            raise _bad_option(option, f"Query option {option} is not supported.")
        if len(params.getall(option)) > 1:
            raise _bad_option(option, f"Query option {option} is given more than once.")
    search = params.get("$search")
    if search is not None and not search.strip():
        raise _bad_option("$search", "$search needs a non-empty search term.")
    if params.get("$count", "true") not in ("true", "false"):
        raise _bad_option("$count", "$count must be true or false.")
    text = params.get("$filter")
    top = params.get("$top")
    return _Query(
        predicate=None if text is None else _FilterParser(schema, text).parse(),
        search=search,
        order=_parse_orderby(schema, params.get("$orderby")),
        select=_parse_select(schema, params.get("$select")),
        skip=_parse_count_option("$skip", params.get("$skip", "0")),
        top=None if top is None else _parse_count_option("$top", top),
    )


def _parse_count_option(option: str, value: str) -> int:
    if not re.fullmatch(r"[0-9]+", value):
        raise _bad_option(option, f"{option} must be a non-negative integer, got {value!r}.")
    return int(value)


def _attribute_list(option: str, value: str) -> list[str]:
    items = [item.strip() for item in value.split(",")]
    if not all(items):
        raise _bad_option(option, f"{option} has an empty item: {value!r}.")
    return items


def _known(schema: EntitySchema, option: str, name: str) -> str:
    if name not in schema.attributes:
        raise _bad_option(option, f"'{name}' is not an attribute of {schema.name}.")
    return name


def _parse_select(schema: EntitySchema, value: str | None) -> tuple[str, ...]:
    if value is None or value.strip() == "*":
        return ()
    names = _attribute_list("$select", value)
    return tuple(dict.fromkeys(_known(schema, "$select", name) for name in names))


def _parse_orderby(schema: EntitySchema, value: str | None) -> tuple[tuple[str, bool], ...]:
    if value is None:
        return ()
    order: list[tuple[str, bool]] = []
    for item in _attribute_list("$orderby", value):
        name, *direction = item.split()
        if direction not in ([], ["asc"], ["desc"]):
            raise _bad_option("$orderby", f"Use 'Property' or 'Property desc', got {item!r}.")
        order.append((_known(schema, "$orderby", name), direction == ["desc"]))
    return tuple(order)


def _run_query(schema: EntitySchema, rows: Iterable[Row], query: _Query) -> list[Row]:
    matches: list[Row] = list(rows)
    if query.predicate is not None:
        matches = [row for row in matches if query.predicate(row)]
    if query.search is not None:
        matches = [row for row in matches if _mentions(schema, row, query.search.casefold())]
    # Stable sorts applied last key first give the comma list's precedence.
    for name, descending in reversed(query.order):
        matches.sort(key=_sort_key(name, schema.attributes[name]), reverse=descending)
    return matches


def _mentions(schema: EntitySchema, row: Row, needle: str) -> bool:
    strings = (row[name] for name, kind in schema.attributes.items() if kind == "Edm.String")
    return any(isinstance(value, str) and needle in value.casefold() for value in strings)


def _sort_key(name: str, data_type: EdmType) -> Callable[[Row], tuple[bool, Any]]:
    # OData sorts null before every value in ascending order.
    def key(row: Row) -> tuple[bool, Any]:
        value = _comparable(data_type, row[name])
        return (value is not None, value)

    return key


# $filter: a tokenizer and a recursive-descent parser that compiles to a row predicate.
#   disjunction := conjunction ("or" conjunction)*
#   conjunction := unary ("and" unary)*
#   unary       := "not" unary | "(" disjunction ")" | function | comparison
#   function    := ("contains" | "startswith" | "endswith") "(" Property "," 'text' ")"
#   comparison  := Property ("eq"|"ne"|"gt"|"ge"|"lt"|"le") literal
#                | Property "in" "(" literal ("," literal)* ")"

_TOKEN: Final = re.compile(
    r"""\s*(?:
        (?P<string>'(?:[^']|'')*')
      | (?P<moment>\d{4}-\d{2}-\d{2}(?:T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2})?)?)
      | (?P<number>-?\d+(?:\.\d+)?)
      | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<punct>[(),])
    )\s*""",
    re.VERBOSE | re.ASCII,  # \d and \s mean ASCII only, as in the OData ABNF
)
_ORDERING: Final[Mapping[str, Callable[[Any, Any], Any]]] = {
    "gt": operator.gt,
    "ge": operator.ge,
    "lt": operator.lt,
    "le": operator.le,
}
_FUNCTIONS: Final[Mapping[str, Callable[[str, str], bool]]] = {
    "contains": lambda value, text: text in value,
    "startswith": str.startswith,
    "endswith": str.endswith,
}


# Dates may also come quoted: many clients quote every literal.
_LITERAL_KINDS: Final[Mapping[EdmType, tuple[str, ...]]] = {
    "Edm.String": ("string",),
    "Edm.Int32": ("number",),
    "Edm.Double": ("number",),
    "Edm.Date": ("moment", "string"),
    "Edm.DateTimeOffset": ("moment", "string"),
}


@dataclass(frozen=True)
class _Token:
    kind: str
    text: str
    position: int


def _tokenize(text: str) -> list[_Token]:
    tokens, position = [], 0
    while text[position:].strip():
        match = _TOKEN.match(text, position)
        if match is None or match.lastgroup is None:
            start = len(text) - len(text[position:].lstrip())
            message = f"Invalid $filter at position {start}: unexpected {text[start]!r}."
            raise _bad_option("$filter", message)
        tokens.append(_Token(match.lastgroup, match[match.lastgroup], match.start(match.lastgroup)))
        position = match.end()
    return tokens


def _typed_literal(data_type: EdmType, text: str) -> _Comparable:
    if data_type == "Edm.Int32":
        if not re.fullmatch(r"-?[0-9]+", text):
            raise ValueError(f"Edm.Int32 needs a whole number, got {text}")
        return int(text)
    return float(text) if data_type == "Edm.Double" else _comparable(data_type, text)


class _FilterParser:
    def __init__(self, schema: EntitySchema, text: str) -> None:
        self._schema = schema
        self._tokens = _tokenize(text)
        self._position = 0

    def parse(self) -> _Predicate:
        predicate = self._disjunction()
        if self._position < len(self._tokens):
            raise self._error("expected 'and', 'or' or the end")
        return predicate

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
        if word is not None and word in _FUNCTIONS and self._peek("punct", ahead=1) == "(":
            return self._function(word)
        return self._comparison()

    def _function(self, function_name: str) -> _Predicate:
        self._position += 2  # the name and "("
        name, data_type = self._property()
        if data_type != "Edm.String":
            message = f"{function_name}() needs a string property, {name} is {data_type}"
            raise self._error(message, back=1)
        self._expect("punct", ",")
        text = self._literal("Edm.String")
        if not isinstance(text, str):
            raise self._error(f"{function_name}() needs a string, not null", back=1)
        self._expect("punct", ")")
        test = _FUNCTIONS[function_name]
        return lambda row: isinstance(value := row[name], str) and test(value, text)

    def _comparison(self) -> _Predicate:
        name, data_type = self._property()
        operation = self._expect("word")
        if operation == "in":
            self._expect("punct", "(")
            options = [self._literal(data_type)]
            while self._accept("punct", ","):
                options.append(self._literal(data_type))
            self._expect("punct", ")")
            return lambda row: _comparable(data_type, row[name]) in options
        literal = self._literal(data_type)
        if operation in ("eq", "ne"):
            wanted = operation == "eq"
            return lambda row: (_comparable(data_type, row[name]) == literal) is wanted
        compare = _ORDERING.get(operation)
        if compare is None:
            raise self._error(f"unknown operator {operation!r}", back=1)
        if literal is None:
            raise self._error(f"null cannot be compared with {operation}", back=1)

        def ordered(row: Row) -> bool:
            # OData: an ordering comparison involving null is false.
            value = _comparable(data_type, row[name])
            return value is not None and bool(compare(value, literal))

        return ordered

    def _property(self) -> tuple[str, EdmType]:
        name = self._expect("word")
        data_type = self._schema.attributes.get(name)
        if data_type is None:
            raise self._error(f"'{name}' is not an attribute of {self._schema.name}", back=1)
        return name, data_type

    def _literal(self, data_type: EdmType) -> _Comparable:
        token = self._next()
        if token.kind == "word" and token.text == "null":
            return None
        if token.kind not in _LITERAL_KINDS[data_type]:
            raise self._error(f"expected an {data_type} literal", back=1)
        text = token.text[1:-1].replace("''", "'") if token.kind == "string" else token.text
        try:
            return _typed_literal(data_type, text)
        except ValueError as error:
            raise self._error(str(error), back=1) from error

    def _peek(self, kind: str, ahead: int = 0) -> str | None:
        index = self._position + ahead
        if index < len(self._tokens) and self._tokens[index].kind == kind:
            return self._tokens[index].text
        return None

    def _next(self) -> _Token:
        if self._position >= len(self._tokens):
            raise self._error("unexpected end of the expression")
        self._position += 1
        return self._tokens[self._position - 1]

    def _accept(self, kind: str, text: str) -> bool:
        if self._peek(kind) == text:
            self._position += 1
            return True
        return False

    def _expect(self, kind: str, text: str | None = None) -> str:
        token = self._next()
        if token.kind != kind or text not in (None, token.text):
            raise self._error(f"expected {text or kind!r}", back=1)
        return token.text

    def _error(self, reason: str, back: int = 0) -> _RequestError:
        index = self._position - back
        where = (
            f"at position {self._tokens[index].position}"
            if index < len(self._tokens)
            else "at the end"
        )
        return _bad_option("$filter", f"Invalid $filter {where}: {reason}.")
