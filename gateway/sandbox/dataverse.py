"""A Dataverse Web API stand-in: one organization's `/api/data/v9.2/`, as Microsoft's SDK uses it.

It speaks OData v4 the way Dataverse does: `WhoAmI`, `EntityDefinitions`, the `accounts`,
`contacts` and `systemusers` entity sets with `$select`, `$filter`, `$orderby`, `$top`,
`$count`, server-driven paging (`Prefer: odata.maxpagesize`, an `@odata.nextLink` whose
`$skiptoken` carries a paging cookie, on the organization's own host), create/update/
delete answered with `OData-EntityId` (or the row, with `Prefer: return=representation`),
`$batch` with change sets, `{"error": {"code", "message"}}` errors, and service protection
(429 with a `Retry-After` that grows while the client keeps sending).

In front of the API sits what Dataverse checks itself: a bearer token from the sandbox
issuer whose audience is the organization URL (scope `{org}/.default`), and no
impersonation or bypass headers: the gateway must never forward a caller's. Every request
is recorded (`seen`) so tests can tell which ones came through the gateway.

Typed columns, answers and errors, and the query options come from `odata.py`; this
module holds the tables, the organization, routing, writes, paging and $batch.
"""

from __future__ import annotations

import copy
import email
import email.policy
import json
import math
import random
import re
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import MIMEPart
from http import HTTPStatus
from typing import Any, Final
from urllib.parse import parse_qsl, quote, unquote

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy, MultiMapping

from gateway.sandbox.odata import (
    GUID,
    Answer,
    Column,
    EdmType,
    Failure,
    Query,
    Row,
    Value,
    error,
    fail,
)

API_PATH: Final = "/api/data/v9.2"
JSON_TYPE: Final = "application/json; odata.metadata=minimal"
MAX_PAGE_SIZE: Final = 5000  # Dataverse's default and largest page
# Headers a caller could use to act as someone else or to skip business logic.
IMPERSONATION_HEADERS: Final = ("CallerObjectId", "MSCRMCallerID")
BYPASS_PREFIX: Final = "MSCRM.Bypass"  # the stand-in refuses any header starting so
BYPASS_HEADERS: Final = ("MSCRM.BypassCustomPluginExecution", "MSCRM.BypassBusinessLogicExecution")

VerifyToken = Callable[[str, str], bool]  # (token, audience) → valid


# --------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class Table:
    """A table's names as Dataverse spells them, and its columns in output order."""

    logical_name: str
    entity_set: str
    primary_id: str
    primary_name: str
    display_name: str
    object_type_code: int
    columns: Mapping[str, Column]

    @property
    def metadata_id(self) -> str:
        """A stable MetadataId per table."""
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"dataverse-sandbox/{self.logical_name}"))

    @property
    def entity_type(self) -> str:
        """The OData type name, e.g. Microsoft.Dynamics.CRM.account."""
        return f"Microsoft.Dynamics.CRM.{self.logical_name}"


def _columns(*columns: Column) -> Mapping[str, Column]:
    return {column.name: column for column in columns}


_STAMPS: Final = (
    Column("createdon", "Edm.DateTimeOffset", writable=False),
    Column("modifiedon", "Edm.DateTimeOffset", writable=False),
)
INDUSTRIES: Final[Mapping[int, str]] = {
    1: "Accounting",
    7: "Consulting",
    9: "Financial",
    12: "Manufacturing",
    25: "Retail",
    33: "Transportation",
}
ACCOUNT: Final = Table(
    "account",
    "accounts",
    "accountid",
    "name",
    "Account",
    1,
    _columns(
        Column("accountid", "Edm.Guid"),
        Column("name", "Edm.String"),
        Column("accountnumber", "Edm.String"),
        Column("telephone1", "Edm.String"),
        Column("address1_city", "Edm.String"),
        Column("revenue", "Edm.Decimal"),
        Column("numberofemployees", "Edm.Int32"),
        Column("industrycode", "Edm.Int32", options=INDUSTRIES),
        Column("creditonhold", "Edm.Boolean"),
        *_STAMPS,
    ),
)
CONTACT: Final = Table(
    "contact",
    "contacts",
    "contactid",
    "fullname",
    "Contact",
    2,
    _columns(
        Column("contactid", "Edm.Guid"),
        Column("firstname", "Edm.String"),
        Column("lastname", "Edm.String"),
        Column("fullname", "Edm.String", writable=False),  # Dataverse composes it
        Column("emailaddress1", "Edm.String"),
        Column("jobtitle", "Edm.String"),
        Column("address1_city", "Edm.String"),
        *_STAMPS,
    ),
)
SYSTEMUSER: Final = Table(
    "systemuser",
    "systemusers",
    "systemuserid",
    "fullname",
    "User",
    8,
    _columns(
        Column("systemuserid", "Edm.Guid", writable=False),
        Column("fullname", "Edm.String", writable=False),
        Column("applicationid", "Edm.Guid", writable=False),
        Column("isdisabled", "Edm.Boolean", writable=False),
        *_STAMPS,
    ),
)
TABLES: Final[Mapping[str, Table]] = {t.entity_set: t for t in (ACCOUNT, CONTACT, SYSTEMUSER)}
WRITABLE_SETS: Final = frozenset({"accounts", "contacts"})

# EntityDefinitions rows are themselves queryable with $select and $filter.
_DEFINITION_COLUMNS: Final = _columns(
    Column("MetadataId", "Edm.Guid"),
    Column("LogicalName", "Edm.String"),
    Column("SchemaName", "Edm.String"),
    Column("EntitySetName", "Edm.String"),
    Column("LogicalCollectionName", "Edm.String"),
    Column("PrimaryIdAttribute", "Edm.String"),
    Column("PrimaryNameAttribute", "Edm.String"),
    Column("ObjectTypeCode", "Edm.Int32"),
    Column("IsCustomEntity", "Edm.Boolean"),
)


# --------------------------------------------------------------------------- service protection


@dataclass
class ServiceProtection:
    """Dataverse's number-of-requests limit: at most `limit` requests per sliding `window`.

    Once over it every request is refused with 429, and each one sent while refused pushes
    the end of the wait `penalty` seconds further, as Dataverse extends the wait for a
    client that keeps sending. `limit` None (the default) never refuses.
    """

    limit: int | None = None
    window: float = 300.0
    penalty: float = 5.0
    clock: Callable[[], float] = time.monotonic
    refused: int = 0
    _sent: deque[float] = field(default_factory=deque)
    _blocked_until: float = 0.0

    def admit(self) -> int | None:
        """None to serve the request, or the whole seconds of Retry-After to refuse it."""
        if self.limit is None:
            return None
        now = self.clock()
        if now < self._blocked_until:
            self._blocked_until += self.penalty
        else:
            while self._sent and self._sent[0] <= now - self.window:
                self._sent.popleft()
            if len(self._sent) < self.limit:
                self._sent.append(now)
                return None
            # Free again when the oldest request leaves the window.
            self._blocked_until = self._sent[0] + self.window
        self.refused += 1
        return max(1, math.ceil(self._blocked_until - now))

    def reset(self) -> None:
        """Forget the requests counted so far and any wait."""
        self._sent.clear()
        self._blocked_until = 0.0


# --------------------------------------------------------------------------- the organization


@dataclass(frozen=True, slots=True)
class SeenRequest:
    """One request as it reached the stand-in, and its answer's status."""

    method: str
    path_qs: str
    authorized: bool  # carried a valid token for this organization
    request_id: str | None  # X-Request-ID: the gateway adds one to everything it forwards
    status: int
    header_names: frozenset[str]  # lower case, e.g. to show no subscription key arrived


@dataclass
class DataverseOrganization:
    """The organization's state; `app()` serves it. Set `url` once the server listens."""

    verify_token: VerifyToken
    seed: int = 7
    url: str = ""  # the organization URL, e.g. https://127.0.0.1:8443 (no trailing slash)
    application_id: str = ""  # the calling app registration's client id, for WhoAmI
    protection: ServiceProtection = field(default_factory=ServiceProtection)
    now: Callable[[], datetime] = lambda: datetime.now(UTC)
    seen: list[SeenRequest] = field(default_factory=list)
    rows: dict[str, dict[str, Row]] = field(init=False)
    organization_id: str = field(init=False)
    business_unit_id: str = field(init=False)
    user_id: str = field(init=False)
    _rng: random.Random = field(init=False)
    _versions: int = 1_000_000

    def __post_init__(self) -> None:
        # A stream of its own: the CI stand-in draws its ids from the same seed.
        self._rng = random.Random(f"dataverse-{self.seed}")  # noqa: S311  sample data
        self.organization_id, self.business_unit_id, self.user_id = (
            self.new_id(),
            self.new_id(),
            self.new_id(),
        )
        self.rows = _seed_rows(self)

    @property
    def service_root(self) -> str:
        """The Web API's root, e.g. https://127.0.0.1:8443/api/data/v9.2."""
        return f"{self.url}{API_PATH}"

    def new_id(self) -> str:
        """A GUID from the seeded generator, so runs are reproducible."""
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    def next_version(self) -> int:
        """The next row version number (Dataverse's etag source)."""
        self._versions += 1
        return self._versions

    def app(self) -> web.Application:
        """The Web API under /api/data/v9.2, behind Dataverse's own request checks."""
        application = web.Application(middlewares=[self._checks])
        application.router.add_route("*", API_PATH + "/{tail:.*}", self._handle)
        application.router.add_route("*", "/{tail:.*}", self._not_found)
        return application

    @web.middleware
    async def _checks(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        authorized = scheme.lower() == "bearer" and self.verify_token(token.strip(), self.url)
        if not authorized:
            response: web.StreamResponse = self._unauthorized()
        elif (refusal := _impersonation(request.headers)) is not None:
            response = _render(self._forbidden(refusal))
        elif (wait := self.protection.admit()) is not None:
            response = _render(_throttled(self.protection, wait))
        else:
            response = await handler(request)
        self.seen.append(
            SeenRequest(
                request.method,
                request.path_qs,
                authorized,
                request.headers.get("X-Request-ID"),
                response.status,
                frozenset(name.lower() for name in request.headers),
            )
        )
        return response

    def _unauthorized(self) -> web.Response:
        # Dataverse answers 401 with an empty body and a challenge naming the resource.
        challenge = (
            "Bearer authorization_uri=https://login.microsoftonline.com/common/oauth2/authorize,"
            f" resource_id={self.url}/"
        )
        return web.Response(status=401, headers={"WWW-Authenticate": challenge, **_common()})

    def _forbidden(self, header: str) -> Answer:
        privilege = (
            "prvActOnBehalfOfAnotherUser"
            if header in IMPERSONATION_HEADERS
            else "prvBypassCustomBusinessLogic"
        )
        message = (
            f"Principal user (Id={self.user_id}, type=8) is missing {privilege} privilege "
            f"(header {header} refused: the sandbox never accepts it)"
        )
        return error(HTTPStatus.FORBIDDEN, "0x80040220", message)

    async def _not_found(self, request: web.Request) -> web.Response:
        return _render(
            error(
                HTTPStatus.NOT_FOUND,
                "0x8006088a",
                f"Resource not found for the segment '{request.path.strip('/')}'.",
            )
        )

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["tail"]
        if path == "$batch" and request.method == "POST":
            return await _BatchRun(self, request).respond()  # reads the body as it goes
        body = await request.read()
        return _render(
            self.dispatch(Call(request.method, path, request.query, request.headers, body))
        )

    def dispatch(self, call: Call) -> Answer:
        """Answer one Web API call (the path is relative to the service root)."""
        try:
            return _Service(self, call).answer()
        except Failure as failure:
            return failure.answer


# --------------------------------------------------------------------------- calls and answers


@dataclass(frozen=True)
class Call:
    """A request to the Web API, from HTTP or from a $batch part."""

    method: str
    path: str  # relative to the service root, e.g. accounts(…)
    query: MultiMapping[str]
    headers: Mapping[str, str]
    body: bytes


def _common() -> dict[str, str]:
    request_id = str(uuid.uuid4())
    return {"OData-Version": "4.0", "REQ_ID": request_id, "x-ms-service-request-id": request_id}


def _throttled(protection: ServiceProtection, wait: int) -> Answer:
    message = (
        f"Number of requests exceeded the limit of {protection.limit} over time window of "
        f"{protection.window:g} seconds."
    )
    answer = error(HTTPStatus.TOO_MANY_REQUESTS, "0x80072322", message)
    answer.headers["Retry-After"] = str(wait)
    return answer


def _impersonation(headers: Mapping[str, str]) -> str | None:
    for name in headers:
        if name.lower() in {h.lower() for h in IMPERSONATION_HEADERS}:
            return next(h for h in IMPERSONATION_HEADERS if h.lower() == name.lower())
        if name.lower().startswith(BYPASS_PREFIX.lower()):
            return name
    return None


def _render(answer: Answer) -> web.Response:
    headers = {**_common(), **answer.headers}
    if answer.body is None:
        return web.Response(status=answer.status, headers=headers)
    headers["Content-Type"] = JSON_TYPE
    return web.Response(status=answer.status, headers=headers, body=_json(answer.body))


def _json(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def _preferences(headers: Mapping[str, str]) -> dict[str, str]:
    """Prefer header values: name → value ('' for a bare name)."""
    found: dict[str, str] = {}
    for header in _all(headers, "Prefer"):
        for name, value in re.findall(
            r'\s*([\w.\-]+)\s*(?:=\s*("[^"]*"|[^,]*))?\s*(?:,|$)', header
        ):
            if name:
                found[name.lower()] = value.strip('"')
    return found


def _all(headers: Mapping[str, str], name: str) -> list[str]:
    if isinstance(headers, CIMultiDictProxy | CIMultiDict):
        return headers.getall(name, [])
    value = headers.get(name)
    return [] if value is None else [value]


# --------------------------------------------------------------------------- the service


_SEGMENT: Final = re.compile(r"(?P<name>[A-Za-z_$][A-Za-z0-9_.]*)(?:\((?P<key>[^()]*)\))?")


class _Service:
    """One call's routing and answer."""

    def __init__(self, organization: DataverseOrganization, call: Call) -> None:
        self.org = organization
        self.call = call
        self.prefer = _preferences(call.headers)

    def answer(self) -> Answer:
        segments = [s for s in self.call.path.split("/") if s] if self.call.path else []
        if not segments:
            return self._service_document()
        first = _SEGMENT.fullmatch(segments[0])
        if first is None:
            raise self._no_segment(segments[0])
        name, key = first["name"], first["key"]
        if name == "WhoAmI" and key in (None, "") and len(segments) == 1:
            return self._who_am_i()
        if name == "EntityDefinitions":
            return self._definitions(key, segments[1:])
        table = TABLES.get(name)
        if table is None or len(segments) > 1:
            raise self._no_segment(segments[-1] if table else name)
        if key is None:
            return self._collection(table)
        return self._entity(table, _entity_key(key))

    def _no_segment(self, segment: str) -> Failure:
        return fail(
            HTTPStatus.NOT_FOUND, "0x8006088a", f"Resource not found for the segment '{segment}'."
        )

    def _methods(self, *allowed: str) -> None:
        if self.call.method not in allowed:
            message = f"The HTTP method '{self.call.method}' is not allowed for this resource."
            raise fail(HTTPStatus.METHOD_NOT_ALLOWED, "0x80060888", message)

    def _context(self, fragment: str) -> str:
        return f"{self.org.service_root}/$metadata#{fragment}"

    # ---------------------------------------------------------------- functions and metadata

    def _service_document(self) -> Answer:
        self._methods("GET")
        sets = [{"name": s, "kind": "EntitySet", "url": s} for s in ("EntityDefinitions", *TABLES)]
        return Answer(200, body={"@odata.context": self._context(""), "value": sets})

    def _who_am_i(self) -> Answer:
        self._methods("GET")
        return Answer(
            200,
            body={
                "@odata.context": self._context("Microsoft.Dynamics.CRM.WhoAmIResponse"),
                "BusinessUnitId": self.org.business_unit_id,
                "UserId": self.org.user_id,
                "OrganizationId": self.org.organization_id,
            },
        )

    def _definitions(self, key: str | None, rest: list[str]) -> Answer:
        self._methods("GET")
        rows = [_definition(table) for table in TABLES.values()]
        if key is None:
            if rest:
                raise self._no_segment(rest[0])
            query = Query.parse(
                self.call.query, _DEFINITION_COLUMNS, "EntityDefinitions", paging=False
            )
            matches = query.run(rows, "MetadataId")
            projection = f"({','.join(query.select)})" if query.select else ""
            return Answer(
                200,
                body={
                    "@odata.context": self._context(f"EntityDefinitions{projection}"),
                    "value": [query.project(row, "MetadataId") for row in matches],
                },
            )
        table = _definition_table(key)
        if table is None:
            message = f"Could not find entity with key {key}."
            raise fail(HTTPStatus.NOT_FOUND, "0x80040217", message)
        if not rest:
            return Answer(
                200,
                body={
                    "@odata.context": self._context("EntityDefinitions/$entity"),
                    **_definition(table),
                },
            )
        if rest[0] != "Attributes" or len(rest) > 2:
            raise self._no_segment(rest[0])
        cast = rest[1] if len(rest) == 2 else None
        if cast not in (None, "Microsoft.Dynamics.CRM.PicklistAttributeMetadata"):
            raise self._no_segment(cast or "")
        attributes = [
            _attribute(table, column)
            for column in table.columns.values()
            if cast is None or column.options is not None
        ]
        fragment = f"EntityDefinitions('{table.metadata_id}')/Attributes"
        if cast:
            fragment += f"/{cast}"
        return Answer(200, body={"@odata.context": self._context(fragment), "value": attributes})

    # ---------------------------------------------------------------- entity sets

    def _collection(self, table: Table) -> Answer:
        if self.call.method == "POST":
            self._writable(table)
            return self._create(table)
        self._methods("GET")
        query = Query.parse(self.call.query, table.columns, table.entity_type, paging=True)
        matches = query.run(self.org.rows[table.entity_set].values(), table.primary_id)
        headers: dict[str, str] = {}
        page_size = None
        if query.top is None and "odata.maxpagesize" in self.prefer:
            page_size = _page_size(self.prefer["odata.maxpagesize"])
            headers["Preference-Applied"] = f"odata.maxpagesize={page_size}"
        total = len(matches)
        start = _resume(query.skiptoken, matches, table.primary_id, page_size)
        window = matches[start:] if query.top is None else matches[: query.top]
        size = page_size or MAX_PAGE_SIZE
        page = window[:size]
        projection = f"({','.join(query.select)})" if query.select else ""
        body: dict[str, Any] = {"@odata.context": self._context(f"{table.entity_set}{projection}")}
        if query.count:
            body["@odata.count"] = total
        body["value"] = [self._shape(table, row, query) for row in page]
        if len(window) > size:
            number = (start // size) + 2
            body["@odata.nextLink"] = self._next_link(table, page, number)
        return Answer(200, headers, body)

    def _next_link(self, table: Table, page: list[Row], number: int) -> str:
        first, last = (str(page[i][table.primary_id]).upper() for i in (0, -1))
        # Dataverse's own shape: a URL-encoded paging cookie inside a cookie element.
        bounds = f'last="{{{last}}}" first="{{{first}}}"'
        inner = f'<cookie page="{number - 1}"><{table.primary_id} {bounds} /></cookie>'
        paging = quote(inner, safe="")
        cookie = f'<cookie pagenumber="{number}" pagingcookie="{paging}" istracking="False" />'
        options = [(k, v) for k, v in self.call.query.items() if k != "$skiptoken"]
        options.append(("$skiptoken", cookie))
        query = "&".join(f"{k}={quote(v, safe=_LINK_SAFE)}" for k, v in options)
        return f"{self.org.service_root}/{table.entity_set}?{query}"

    def _shape(self, table: Table, row: Row, query: Query) -> dict[str, Any]:
        shaped: dict[str, Any] = {"@odata.etag": f'W/"{row["versionnumber"]}"'}
        shaped.update(query.project(row, table.primary_id))
        return shaped

    def _entity(self, table: Table, key: str) -> Answer:
        if self.call.method == "PATCH":
            self._writable(table)
            return self._update(table, key)
        if self.call.method == "DELETE":
            self._writable(table)
            self._existing(table, key)
            del self.org.rows[table.entity_set][key]
            return Answer(204)
        self._methods("GET")
        row = self._existing(table, key)
        query = Query.parse(self.call.query, table.columns, table.entity_type, paging=False)
        return self._representation(table, row, query, 200)

    def _representation(self, table: Table, row: Row, query: Query, status: int) -> Answer:
        projection = f"({','.join(query.select)})" if query.select else ""
        body = {
            "@odata.context": self._context(f"{table.entity_set}{projection}/$entity"),
            **self._shape(table, row, query),
        }
        return Answer(status, body=body)

    def _writable(self, table: Table) -> None:
        if table.entity_set not in WRITABLE_SETS:
            message = f"The sandbox does not let clients change {table.entity_set}."
            raise fail(HTTPStatus.FORBIDDEN, "0x80040220", message)

    def _existing(self, table: Table, key: str) -> Row:
        row = self.org.rows[table.entity_set].get(key)
        if row is None:
            message = f"Entity '{table.logical_name}' With Id = {key} Does Not Exist"
            raise fail(HTTPStatus.NOT_FOUND, "0x80040217", message)
        return row

    def _create(self, table: Table) -> Answer:
        values = _payload(table, self.call.body)
        key = str(values.pop(table.primary_id, None) or self.org.new_id()).lower()
        rows = self.org.rows[table.entity_set]
        if key in rows:
            raise fail(
                HTTPStatus.PRECONDITION_FAILED,
                "0x80040237",
                "A record with matching key values already exists.",
            )
        row = _new_row(self.org, table, key)
        _apply(self.org, table, row, values)
        rows[key] = row
        return self._written(table, row, 201)

    def _update(self, table: Table, key: str) -> Answer:
        values = _payload(table, self.call.body)
        if table.primary_id in values and str(values[table.primary_id]).lower() != key:
            message = f"{table.primary_id} identifies the row and cannot be changed."
            raise fail(HTTPStatus.BAD_REQUEST, "0x80048d19", message)
        rows = self.org.rows[table.entity_set]
        row = rows.get(key)
        if_match = self.call.headers.get("If-Match")
        if row is None:
            if if_match is not None:  # If-Match: * turns an upsert into a plain update
                self._existing(table, key)
            row = rows[key] = _new_row(self.org, table, key)  # PATCH without If-Match upserts
        elif self.call.headers.get("If-None-Match") == "*":
            raise fail(
                HTTPStatus.PRECONDITION_FAILED,
                "0x80040237",
                "A record with matching key values already exists.",
            )
        elif if_match not in (None, "*", f'W/"{row["versionnumber"]}"'):
            raise fail(
                HTTPStatus.PRECONDITION_FAILED,
                "0x80060882",
                "The version of the existing record doesn't match the RowVersion property "
                "provided.",
            )
        _apply(self.org, table, row, values)
        return self._written(table, row, 200)

    def _written(self, table: Table, row: Row, status: int) -> Answer:
        entity_id = f"{self.org.service_root}/{table.entity_set}({row[table.primary_id]})"
        if self.prefer.get("return") == "representation":
            query = Query.parse(self.call.query, table.columns, table.entity_type, paging=False)
            answer = self._representation(table, row, query, status)
            answer.headers["Preference-Applied"] = "return=representation"
        else:
            answer = Answer(204)
        answer.headers["OData-EntityId"] = entity_id
        return answer


_LINK_SAFE: Final = "$',()*=:@"


def _entity_key(text: str) -> str:
    key = text.strip()
    if key.startswith("{") and key.endswith("}"):
        key = key[1:-1]
    if not GUID.fullmatch(key):
        message = f"Bad Request - Error in query syntax: '{text}' is not a GUID key."
        raise fail(HTTPStatus.BAD_REQUEST, "0x80060888", message)
    return key.lower()


def _page_size(value: str) -> int:
    if not re.fullmatch(r"[0-9]{1,9}", value) or int(value) == 0:
        message = f"The value '{value}' of odata.maxpagesize is not a positive integer."
        raise fail(HTTPStatus.BAD_REQUEST, "0x80060888", message)
    return min(int(value), MAX_PAGE_SIZE)  # larger requests are ignored, as Dataverse does


def _resume(
    skiptoken: str | None, matches: list[Row], primary_id: str, page_size: int | None
) -> int:
    """Where the page after the one a paging cookie describes starts."""
    if skiptoken is None:
        return 0
    number = re.search(r'pagenumber="([0-9]+)"', skiptoken)
    paging = re.search(r'pagingcookie="([^"]*)"', skiptoken)
    last = re.search(r'last="\{([0-9A-Fa-f-]{36})\}"', unquote(paging[1])) if paging else None
    if number is None or last is None:
        raise fail(
            HTTPStatus.BAD_REQUEST, "0x80060888", "The $skiptoken is not a valid paging cookie."
        )
    key = last[1].lower()
    for index, row in enumerate(matches):
        if row[primary_id] == key:
            return index + 1
    # The last row was deleted meanwhile: continue by page number.
    return (int(number[1]) - 1) * (page_size or MAX_PAGE_SIZE)


def _definition(table: Table) -> Row:
    return {
        "MetadataId": table.metadata_id,
        "LogicalName": table.logical_name,
        "SchemaName": table.display_name if table is not SYSTEMUSER else "SystemUser",
        "EntitySetName": table.entity_set,
        "LogicalCollectionName": table.entity_set,
        "PrimaryIdAttribute": table.primary_id,
        "PrimaryNameAttribute": table.primary_name,
        "ObjectTypeCode": table.object_type_code,
        "IsCustomEntity": False,
    }


def _definition_table(key: str) -> Table | None:
    logical = re.fullmatch(r"LogicalName='([^']*)'", key.strip())
    for table in TABLES.values():
        if (
            logical and logical[1] == table.logical_name
        ) or key.strip().lower() == table.metadata_id:
            return table
    return None


_ATTRIBUTE_TYPES: Final[Mapping[EdmType, str]] = {
    "Edm.String": "String",
    "Edm.Int32": "Integer",
    "Edm.Decimal": "Money",
    "Edm.Boolean": "Boolean",
    "Edm.Guid": "Uniqueidentifier",
    "Edm.DateTimeOffset": "DateTime",
}


def _attribute(table: Table, column: Column) -> dict[str, Any]:
    attribute: dict[str, Any] = {
        "MetadataId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{table.metadata_id}/{column.name}")),
        "LogicalName": column.name,
        "SchemaName": column.name,
        "AttributeType": _ATTRIBUTE_TYPES[column.edm],
        "IsPrimaryId": column.name == table.primary_id,
        "IsValidForCreate": column.writable,
        "IsValidForUpdate": column.writable and column.name != table.primary_id,
    }
    if column.options is not None:
        attribute["@odata.type"] = "#Microsoft.Dynamics.CRM.PicklistAttributeMetadata"
        attribute["AttributeType"] = "Picklist"
        attribute["OptionSet"] = {
            "Options": [
                {
                    "Value": value,
                    "Label": {"LocalizedLabels": [{"Label": label, "LanguageCode": 1033}]},
                }
                for value, label in column.options.items()
            ]
        }
    return attribute


# --------------------------------------------------------------------------- rows


def _new_row(org: DataverseOrganization, table: Table, key: str) -> Row:
    row: Row = dict.fromkeys(table.columns)
    stamp = _timestamp(org.now())
    row.update({table.primary_id: key, "createdon": stamp, "modifiedon": stamp})
    return row


def _apply(org: DataverseOrganization, table: Table, row: Row, values: Mapping[str, Value]) -> None:
    row.update(values)
    if table is CONTACT:
        names = (row["firstname"], row["lastname"])
        row["fullname"] = " ".join(str(n) for n in names if n) or None
    row["modifiedon"] = _timestamp(org.now())
    row["versionnumber"] = org.next_version()


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _payload(table: Table, body: bytes) -> Row:
    try:
        data = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        message = "The request body must be a JSON object of column values."
        raise fail(HTTPStatus.BAD_REQUEST, "0x80048d19", message)
    values: Row = {}
    for name, value in data.items():
        if name.startswith("@odata."):
            continue
        column = table.columns.get(name)
        if column is None or not column.writable:
            message = f"Invalid property '{name}' was found in entity '{table.entity_type}'."
            raise fail(HTTPStatus.BAD_REQUEST, "0x80048d19", message)
        values[name] = _typed(table, column, value)
    return values


def _typed(table: Table, column: Column, value: object) -> Value:
    if value is None:
        return None
    fits = {
        "Edm.String": isinstance(value, str),
        "Edm.Int32": isinstance(value, int)
        and not isinstance(value, bool)
        and -(2**31) <= value < 2**31,
        "Edm.Decimal": isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value),
        "Edm.Boolean": isinstance(value, bool),
        "Edm.Guid": isinstance(value, str) and GUID.fullmatch(value) is not None,
        "Edm.DateTimeOffset": False,
    }[column.edm]
    if not fits:
        message = f"Cannot convert the literal '{value}' to the expected type '{column.edm}'."
        raise fail(HTTPStatus.BAD_REQUEST, "0x80048d19", message)
    if column.options is not None and value not in column.options:
        message = (
            f"A validation error occurred. The value {value} of '{column.name}' on record of "
            f"type '{table.logical_name}' is outside the valid range."
        )
        raise fail(HTTPStatus.BAD_REQUEST, "0x8004431a", message)
    if column.edm == "Edm.Guid":
        return str(value).lower()
    if column.edm == "Edm.Decimal":
        return float(value)  # type: ignore[arg-type]  # checked above
    return value  # type: ignore[return-value]  # checked above


_FIRST: Final = (
    "Anna",
    "Ben",
    "Chloé",
    "David",
    "Elif",
    "Farid",
    "Greta",
    "Hugo",
    "Ines",
    "Jonas",
    "Kaori",
    "Luca",
)
_LAST: Final = (
    "Andersen",
    "Brown",
    "Costa",
    "Dubois",
    "Evans",
    "Fischer",
    "García",
    "Hansen",
    "Ivanova",
    "Jensen",
)
_CITIES: Final = ("Amsterdam", "Berlin", "Lisbon", "Madrid", "Oslo", "Paris", "Seattle", "Vienna")
_COMPANIES: Final = (
    "Contoso",
    "Fabrikam",
    "Litware",
    "Northwind",
    "Tailspin",
    "Adventure Works",
    "Woodgrove",
    "Proseware",
)
_SUFFIXES: Final = ("Ltd", "GmbH", "Inc.", "Group", "Partners", "Logistics", "Retail", "Labs")
ACCOUNT_ROWS: Final = 60
CONTACT_ROWS: Final = 150


def _seed_rows(org: DataverseOrganization) -> dict[str, dict[str, Row]]:
    rng = org._rng  # the organization's one generator, for reproducible data
    start = datetime(2023, 1, 1, tzinfo=UTC)
    rows: dict[str, dict[str, Row]] = {name: {} for name in TABLES}

    def add(table: Table, values: Row) -> None:
        key = org.new_id()
        moment = _timestamp(start + timedelta(minutes=rng.randrange(1_000_000)))
        row: Row = dict.fromkeys(table.columns)
        row.update({table.primary_id: key, "createdon": moment, "modifiedon": moment})
        row.update(values)
        row["versionnumber"] = org.next_version()
        rows[table.entity_set][key] = row

    for number in range(ACCOUNT_ROWS):
        brand = _COMPANIES[number % len(_COMPANIES)]
        company = f"{brand} {_SUFFIXES[number // len(_COMPANIES) % len(_SUFFIXES)]}"
        add(
            ACCOUNT,
            {
                "name": company if number < 64 else f"{company} {number}",
                "accountnumber": f"AC-{10000 + number}",
                "telephone1": f"+1 425 555 {rng.randrange(10000):04d}",
                "address1_city": rng.choice(_CITIES),
                "revenue": float(rng.randrange(100, 50000) * 1000),
                "numberofemployees": rng.randrange(5, 5000),
                "industrycode": rng.choice(list(INDUSTRIES)),
                "creditonhold": rng.random() < 0.1,
            },
        )
    for _ in range(CONTACT_ROWS):
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        add(
            CONTACT,
            {
                "firstname": first,
                "lastname": last,
                "fullname": f"{first} {last}",
                "emailaddress1": f"{first}.{last}@example.com".lower(),
                "jobtitle": rng.choice(("Buyer", "CFO", "Engineer", "Manager", None)),
                "address1_city": rng.choice(_CITIES),
            },
        )
    add(
        SYSTEMUSER,
        {
            "fullname": "# ci-gateway (application user)",
            "applicationid": org.application_id or None,
            "isdisabled": False,
        },
    )
    # WhoAmI names the application user.
    (user_id,) = rows["systemusers"]
    org.user_id = user_id
    return rows


# --------------------------------------------------------------------------- $batch


_CRLF: Final = "\r\n"


class _BatchRun:
    """One $batch request: parts run in order; a change set all or nothing."""

    def __init__(self, org: DataverseOrganization, request: web.Request) -> None:
        self.org = org
        self.request = request
        self.continue_on_error = "odata.continue-on-error" in _preferences(request.headers)

    async def respond(self) -> web.Response:
        content_type = self.request.headers.get("Content-Type", "")
        if not content_type.startswith("multipart/mixed"):
            message = "The $batch request must have Content-Type multipart/mixed with a boundary."
            return _render(error(HTTPStatus.BAD_REQUEST, "0x80060888", message))
        # The standard library's MIME parser takes nested multiparts as RFC 2046 writes them
        # (aiohttp's reader wants an extra CRLF after a change set's closing boundary).
        envelope = f"Content-Type: {content_type}\r\n\r\n".encode()
        batch = email.message_from_bytes(
            envelope + await self.request.read(), policy=email.policy.HTTP
        )
        boundary = f"batchresponse_{uuid.uuid4()}"
        parts: list[str] = []
        if not batch.is_multipart() or batch.defects:
            text = f"The $batch body is not a valid multipart/mixed message: {batch.defects}"
            return _render(error(HTTPStatus.BAD_REQUEST, "0x80060888", text))
        try:
            for part in batch.iter_parts():
                if part.is_multipart():
                    text, failed = self._change_set(part)
                else:
                    answer = self._run(_parse_http(_payload_bytes(part)), {})
                    text, failed = _http_part(answer), answer.status >= 400
                parts.append(f"--{boundary}{_CRLF}{text}")
                if failed and not self.continue_on_error:
                    break
        except ValueError as problem:
            text = f"The $batch body is not a valid multipart/mixed message: {problem}"
            return _render(error(HTTPStatus.BAD_REQUEST, "0x80060888", text))
        body = "".join(parts) + f"--{boundary}--{_CRLF}"
        headers = {**_common(), "Content-Type": f"multipart/mixed; boundary={boundary}"}
        return web.Response(status=200, headers=headers, body=body.encode())

    def _change_set(self, change_set: MIMEPart) -> tuple[str, bool]:
        requests: list[tuple[str | None, _RawCall]] = []
        for part in change_set.iter_parts():
            if part.is_multipart():
                raise ValueError("a change set cannot contain another change set")
            requests.append((part.get("Content-ID"), _parse_http(_payload_bytes(part))))
        saved = copy.deepcopy(self.org.rows)
        references: dict[str, str] = {}
        answers: list[tuple[str | None, Answer]] = []
        for content_id, call in requests:
            if call.method == "GET":
                answer = error(
                    HTTPStatus.BAD_REQUEST,
                    "0x80060888",
                    "A change set cannot contain a GET request.",
                )
            else:
                answer = self._run(call, references)
            if answer.status >= 400:
                # All or nothing: undo the change set's earlier changes; answer its error alone.
                self.org.rows = saved
                return _http_part(answer, content_id), True
            answers.append((content_id, answer))
            entity_id = answer.headers.get("OData-EntityId")
            if content_id and entity_id:
                references[content_id] = entity_id
        boundary = f"changesetresponse_{uuid.uuid4()}"
        inner = "".join(f"--{boundary}{_CRLF}{_http_part(a, cid)}" for cid, a in answers)
        head = f"Content-Type: multipart/mixed; boundary={boundary}{_CRLF}{_CRLF}"
        text = f"{head}{inner}--{boundary}--{_CRLF}"
        return text, False

    def _run(self, call: _RawCall, references: Mapping[str, str]) -> Answer:
        target = call.target
        if target.startswith("$"):
            reference, _, rest = target.partition("/")
            resolved = references.get(reference[1:])
            if resolved is None:
                return error(
                    HTTPStatus.BAD_REQUEST,
                    "0x80060888",
                    f"Content-ID reference '{reference}' is not defined in this change set.",
                )
            target = resolved + (f"/{rest}" if rest else "")
        path_qs = _relative(target, self.org)
        if path_qs is None:
            message = (
                f"The request URI '{call.target}' is not valid: it is not based on the "
                f"service root {self.org.service_root}/."
            )
            return error(HTTPStatus.BAD_REQUEST, "0x80060888", message)
        path, _, query_string = path_qs.partition("?")
        query = MultiDict(parse_qsl(query_string, keep_blank_values=True))
        return self.org.dispatch(
            Call(call.method, unquote(path), MultiDictProxy(query), call.headers, call.body)
        )


@dataclass(frozen=True)
class _RawCall:
    method: str
    target: str
    headers: CIMultiDictProxy[str]
    body: bytes


def _payload_bytes(part: MIMEPart) -> bytes:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        raise ValueError("a part has no body")  # noqa: TRY004  ends as a 400
    return payload


def _parse_http(raw: bytes) -> _RawCall:
    head, _, body = raw.replace(b"\r\n", b"\n").partition(b"\n\n")
    # A part without a body may end right after its last header line: the CRLF before the
    # next delimiter belongs to the delimiter (RFC 2046 §5.1.1), as the SDK writes a GET.
    lines = head.decode("utf-8").rstrip("\n").split("\n")
    request_line = lines[0].split(" ")
    if len(request_line) != 3 or not request_line[2].startswith("HTTP/"):
        raise ValueError(f"not an HTTP request line: {lines[0]!r}")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            raise ValueError(f"not a header line: {line!r}")
        headers.add(name.strip(), value.strip())
    return _RawCall(request_line[0], request_line[1], CIMultiDictProxy(headers), body.strip())


def _relative(target: str, org: DataverseOrganization) -> str | None:
    """The target relative to the service root, or None when it names another place."""
    for root in (org.service_root + "/", API_PATH + "/"):
        if target.startswith(root):
            return target[len(root) :]
    if "://" in target or target.startswith("/"):
        return None
    return target


def _http_part(answer: Answer, content_id: str | None = None) -> str:
    lines = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if content_id:
        lines.append(f"Content-ID: {content_id}")
    lines += [
        "",
        f"HTTP/1.1 {answer.status} {HTTPStatus(answer.status).phrase}",
        "OData-Version: 4.0",
    ]
    lines += [f"{name}: {value}" for name, value in answer.headers.items()]
    if answer.body is not None:
        lines += [f"Content-Type: {JSON_TYPE}", "", _json(answer.body).decode()]
    else:
        lines.append("")
    return _CRLF.join(lines) + _CRLF + _CRLF
