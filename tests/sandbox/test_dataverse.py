"""The Dataverse Web API stand-in, driven directly over TLS as an organization URL."""

from __future__ import annotations

import json
import ssl
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from gateway.sandbox.dataverse import (
    ACCOUNT_ROWS,
    CONTACT_ROWS,
    INDUSTRIES,
    DataverseOrganization,
    ServiceProtection,
)
from gateway.sandbox.issuer import TokenIssuer
from tests.conftest import CANARY_SECRET, CLIENT, base_url, start_app

API = "/api/data/v9.2"


class Clock:
    """A hand-moved monotonic clock for the service-protection window."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Reply:
    """A stand-in answer: status, headers and the JSON body (None when empty)."""

    status: int
    headers: CIMultiDictProxy[str]
    body: Any
    text: str


@dataclass
class Org:
    """The running stand-in and a session that trusts its CA and carries a valid token."""

    state: DataverseOrganization
    session: aiohttp.ClientSession
    token: str
    clock: Clock

    @property
    def root(self) -> str:
        return self.state.service_root

    async def call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        headers: dict[str, str] | None = None,
        token: str | None = None,
        raw: bytes | None = None,
    ) -> Reply:
        url = path if path.startswith("https://") else f"{self.root}/{path}"
        sent = {"Authorization": f"Bearer {self.token if token is None else token}"}
        sent.update(headers or {})
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if body is not None:
            sent.setdefault("Content-Type", "application/json")
        async with self.session.request(method, url, data=data, headers=sent) as response:
            text = await response.text()
            parsed = json.loads(text) if text and "json" in response.content_type else None
            return Reply(response.status, response.headers, parsed, text)

    async def get(self, path: str, **kwargs: Any) -> Any:
        reply = await self.call("GET", path, **kwargs)
        assert reply.status == 200, reply.text
        return reply.body


async def _token(issuer: TokenIssuer, ca_file: Path, scope: str) -> str:
    """A client-credentials token from the sandbox issuer, as MSAL gets one."""
    context = ssl.create_default_context(cafile=str(ca_file))
    form = {
        "grant_type": "client_credentials",
        "client_id": CLIENT,
        "client_secret": CANARY_SECRET,
        "scope": scope,
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{issuer.authority}/oauth2/v2.0/token", data=form, ssl=context) as response,
    ):
        assert response.status == 200, await response.text()
        token: str = (await response.json())["access_token"]
        return token


@pytest.fixture
async def org(issuer: TokenIssuer, server_ssl: ssl.SSLContext, ca_file: Path) -> AsyncIterator[Org]:
    """The stand-in over TLS at https://127.0.0.1:<port>, with a token for {org}/.default."""
    clock = Clock()
    state = DataverseOrganization(issuer.verify_audience, protection=ServiceProtection(clock=clock))
    runner = await start_app(state.app(), server_ssl)
    state.url = base_url(runner, "https")
    token = await _token(issuer, ca_file, f"{state.url}/.default")
    context = ssl.create_default_context(cafile=str(ca_file))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        yield Org(state, session, token, clock)
    await runner.cleanup()


def _error(reply: Reply, status: int, code: str) -> str:
    assert reply.status == status, reply.text
    assert set(reply.body) == {"error"}
    assert set(reply.body["error"]) == {"code", "message"}
    assert reply.body["error"]["code"] == code
    message: str = reply.body["error"]["message"]
    return message


async def _all_accounts(org: Org) -> list[dict[str, Any]]:
    body = await org.get("accounts")
    assert "@odata.nextLink" not in body  # fewer rows than the default page of 5000
    rows: list[dict[str, Any]] = body["value"]
    return rows


# --------------------------------------------------------------------------- functions, metadata


async def test_who_am_i(org: Org) -> None:
    """WhoAmI answers the caller's user, business unit and organization ids with OData-Version."""
    reply = await org.call("GET", "WhoAmI")
    assert reply.status == 200
    assert reply.headers["OData-Version"] == "4.0"
    assert (
        reply.body["@odata.context"]
        == f"{org.root}/$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse"
    )
    assert reply.body["UserId"] == org.state.user_id
    users = (await org.get("systemusers"))["value"]
    assert [user["systemuserid"] for user in users] == [reply.body["UserId"]]
    for name in ("BusinessUnitId", "OrganizationId"):
        uuid.UUID(reply.body[name])


async def test_entity_definitions_resolve_entity_set_names(org: Org) -> None:
    """EntityDefinitions filtered by LogicalName answers the selected names, as the SDK asks."""
    params = "$select=LogicalName,EntitySetName,PrimaryIdAttribute&$filter=LogicalName eq 'contact'"
    body = await org.get(f"EntityDefinitions?{params}")
    assert body["@odata.context"].endswith(
        "$metadata#EntityDefinitions(LogicalName,EntitySetName,PrimaryIdAttribute)"
    )
    (row,) = body["value"]
    assert row == {
        "LogicalName": "contact",
        "EntitySetName": "contacts",
        "PrimaryIdAttribute": "contactid",
        "MetadataId": row["MetadataId"],
    }
    everything = await org.get("EntityDefinitions")
    assert {r["EntitySetName"] for r in everything["value"]} == {
        "accounts",
        "contacts",
        "systemusers",
    }
    one = await org.get("EntityDefinitions(LogicalName='account')")
    assert (
        one["MetadataId"]
        == (await org.get(f"EntityDefinitions({one['MetadataId']})"))["MetadataId"]
    )
    missing = await org.call("GET", "EntityDefinitions(LogicalName='nope')")
    _error(missing, 404, "0x80040217")


async def test_picklist_metadata_lists_choice_labels(org: Org) -> None:
    """The picklist cast of an entity's attributes lists each choice column's options."""
    path = (
        "EntityDefinitions(LogicalName='account')/Attributes/"
        "Microsoft.Dynamics.CRM.PicklistAttributeMetadata?$select=LogicalName"
        "&$expand=OptionSet($select=Options)"
    )
    (industry,) = (await org.get(path))["value"]
    assert industry["LogicalName"] == "industrycode"
    options = {
        option["Value"]: option["Label"]["LocalizedLabels"][0]["Label"]
        for option in industry["OptionSet"]["Options"]
    }
    assert options == dict(INDUSTRIES)


# --------------------------------------------------------------------------- authentication


async def test_token_for_another_audience_is_401(
    org: Org, issuer: TokenIssuer, ca_file: Path
) -> None:
    """A token for another resource (the CI API's scope) or none at all gets 401 and a challenge."""
    other = await _token(issuer, ca_file, "https://api.ci.ai.dynamics.com/.default")
    for token in (other, "not-a-jwt", ""):
        reply = await org.call("GET", "WhoAmI", token=token)
        assert reply.status == 401
        assert reply.text == ""
        assert "resource_id=" + org.state.url in reply.headers["WWW-Authenticate"]
    assert [seen.authorized for seen in org.state.seen] == [False, False, False]


@pytest.mark.parametrize(
    "header",
    [
        "CallerObjectId",
        "MSCRMCallerID",
        "callerobjectid",
        "MSCRM.BypassCustomPluginExecution",
        "MSCRM.BypassBusinessLogicExecution",
    ],
)
async def test_impersonation_and_bypass_headers_are_refused(org: Org, header: str) -> None:
    """A request with an impersonation or bypass header is refused with 403, changing nothing."""
    before = len(await _all_accounts(org))
    reply = await org.call(
        "POST", "accounts", body={"name": "Impostor"}, headers={header: str(uuid.uuid4())}
    )
    message = _error(reply, 403, "0x80040220")
    assert header.lower() in message.lower()
    assert len(await _all_accounts(org)) == before


async def test_every_request_is_recorded(org: Org) -> None:
    """`seen` records each request's path, token verdict, X-Request-ID and status."""
    await org.call("GET", "WhoAmI", headers={"X-Request-ID": "abc"})
    await org.call("GET", "nothing-here")
    first, second = org.state.seen
    assert (first.method, first.path_qs, first.authorized, first.request_id, first.status) == (
        "GET",
        f"{API}/WhoAmI",
        True,
        "abc",
        200,
    )
    assert (second.request_id, second.status) == (None, 404)


# --------------------------------------------------------------------------- queries


async def test_select_projects_and_keeps_the_key(org: Org) -> None:
    """$select returns only the named columns plus the primary key and the row's etag."""
    body = await org.get("accounts?$select=name,revenue")
    assert body["@odata.context"] == f"{org.root}/$metadata#accounts(name,revenue)"
    assert len(body["value"]) == ACCOUNT_ROWS
    for row in body["value"]:
        assert set(row) == {"@odata.etag", "name", "revenue", "accountid"}
        assert row["@odata.etag"].startswith('W/"')
    reply = await org.call("GET", "accounts?$select=Name")
    message = _error(reply, 400, "0x0")
    assert (
        message
        == "Could not find a property named 'Name' on type 'Microsoft.Dynamics.CRM.account'."
    )


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("address1_city eq 'Berlin'", lambda r: r["address1_city"] == "Berlin"),
        ("address1_city eq 'berlin'", lambda r: r["address1_city"] == "Berlin"),
        ("address1_city ne 'Berlin'", lambda r: r["address1_city"] != "Berlin"),
        ("contains(name,'wind')", lambda r: "wind" in r["name"].lower()),
        (
            "contains(name,'O') and industrycode eq 25",
            lambda r: "o" in r["name"].lower() and r["industrycode"] == 25,
        ),
        (
            "numberofemployees gt 2500 or creditonhold eq true",
            lambda r: r["numberofemployees"] > 2500 or r["creditonhold"],
        ),
        ("not (address1_city eq 'Oslo')", lambda r: r["address1_city"] != "Oslo"),
        ("telephone1 eq null", lambda r: r["telephone1"] is None),
    ],
    ids=["eq", "eq-case-insensitive", "ne", "contains", "and", "or-bool", "not", "null"],
)
async def test_filter(org: Org, expression: str, expected: Any) -> None:
    """$filter keeps exactly the rows the expression describes."""
    everything = await _all_accounts(org)
    body = await org.get(f"accounts?$filter={expression}")
    wanted = {row["accountid"] for row in everything if expected(row)}
    assert {row["accountid"] for row in body["value"]} == wanted
    if "null" not in expression:
        assert 0 < len(wanted) < len(everything)  # the case tells rows apart


@pytest.mark.parametrize(
    "expression",
    [
        "name eq",
        "name eq 'x' and",
        "nosuch eq 1",
        "frobnicate(name,'x')",
        "numberofemployees eq 'x'",
    ],
)
async def test_malformed_filter_is_400(org: Org, expression: str) -> None:
    """A $filter that does not parse, names no column, or mismatches types is a 400 error."""
    reply = await org.call("GET", f"accounts?$filter={expression}")
    assert reply.status == 400, reply.text
    assert set(reply.body["error"]) == {"code", "message"}


async def test_orderby_top_and_count(org: Org) -> None:
    """$orderby sorts, $top limits, $count counts every match regardless of $top."""
    body = await org.get("accounts?$orderby=revenue desc,name&$top=5&$count=true")
    everything = await _all_accounts(org)
    ordered = sorted(everything, key=lambda r: (-r["revenue"], r["name"]))
    assert [row["accountid"] for row in body["value"]] == [r["accountid"] for r in ordered[:5]]
    assert body["@odata.count"] == ACCOUNT_ROWS
    ascending = await org.get("accounts?$orderby=numberofemployees&$select=numberofemployees")
    counts = [row["numberofemployees"] for row in ascending["value"]]
    assert counts == sorted(counts)
    _error(await org.call("GET", "accounts?$skip=5"), 400, "0x80060888")
    _error(await org.call("GET", "accounts?$top=-1"), 400, "0x80060888")


async def test_paging_with_maxpagesize_walks_every_row_once(org: Org) -> None:
    """Prefer: odata.maxpagesize pages with @odata.nextLink on the org's host through every row."""
    prefer = {"Prefer": "odata.maxpagesize=40"}
    url = f"{org.root}/contacts?$select=fullname&$filter=fullname ne null&$count=true"
    seen: list[str] = []
    pages = 0
    while url:
        reply = await org.call("GET", url, headers=prefer)
        assert reply.status == 200, reply.text
        assert reply.headers["Preference-Applied"] == "odata.maxpagesize=40"
        assert reply.body["@odata.count"] == CONTACT_ROWS
        assert len(reply.body["value"]) <= 40
        seen += [row["contactid"] for row in reply.body["value"]]
        pages += 1
        url = reply.body.get("@odata.nextLink", "")
        if url:
            parts = urlsplit(url)
            assert f"{parts.scheme}://{parts.netloc}" == org.state.url
            query = parse_qs(parts.query)
            assert query["$select"] == ["fullname"]
            assert query["$skiptoken"][0].startswith('<cookie pagenumber="')
    assert pages == -(-CONTACT_ROWS // 40)
    assert len(seen) == len(set(seen)) == CONTACT_ROWS


async def test_page_after_a_deleted_last_row_continues(org: Org) -> None:
    """Deleting the row a paging cookie names still lets the next page continue by page number."""
    prefer = {"Prefer": "odata.maxpagesize=10"}
    first = await org.get("accounts?$select=name", headers=prefer)
    last = first["value"][-1]["accountid"]
    assert (await org.call("DELETE", f"accounts({last})")).status == 204
    second = await org.get(first["@odata.nextLink"], headers=prefer)
    assert len(second["value"]) == 10
    assert not {r["accountid"] for r in second["value"]} & {r["accountid"] for r in first["value"]}
    _error(await org.call("GET", "accounts?$skiptoken=garbage"), 400, "0x80060888")


# --------------------------------------------------------------------------- writes


async def test_create_answers_odata_entity_id(org: Org) -> None:
    """POST answers 204 with OData-EntityId naming the new row on the organization's host."""
    reply = await org.call("POST", "accounts", body={"name": "Sample Account", "revenue": 5000000})
    assert reply.status == 204
    assert reply.text == ""
    entity_id = reply.headers["OData-EntityId"]
    assert entity_id.startswith(f"{org.root}/accounts(")
    row = await org.get(entity_id)
    assert row["@odata.context"] == f"{org.root}/$metadata#accounts/$entity"
    assert (row["name"], row["revenue"]) == ("Sample Account", 5000000.0)
    assert entity_id == f"{org.root}/accounts({row['accountid']})"


async def test_create_with_return_representation(org: Org) -> None:
    """Prefer: return=representation: 201 with the row, Preference-Applied and OData-EntityId."""
    reply = await org.call(
        "POST",
        "contacts?$select=fullname,emailaddress1",
        body={"firstname": "Ada", "lastname": "Lovelace", "emailaddress1": "ada@example.com"},
        headers={"Prefer": "return=representation"},
    )
    assert reply.status == 201, reply.text
    assert reply.headers["Preference-Applied"] == "return=representation"
    assert (
        reply.body["@odata.context"]
        == f"{org.root}/$metadata#contacts(fullname,emailaddress1)/$entity"
    )
    assert reply.body["fullname"] == "Ada Lovelace"
    assert reply.headers["OData-EntityId"] == f"{org.root}/contacts({reply.body['contactid']})"


async def test_update_and_delete(org: Org) -> None:
    """PATCH with If-Match: * updates (204, or 200 with the row); DELETE removes; both 404 after."""
    created = await org.call("POST", "accounts", body={"name": "Before"})
    entity_id = created.headers["OData-EntityId"]
    etag = (await org.get(entity_id))["@odata.etag"]
    updated = await org.call("PATCH", entity_id, body={"name": "After"}, headers={"If-Match": "*"})
    assert updated.status == 204
    assert updated.headers["OData-EntityId"] == entity_id
    shown = await org.call(
        "PATCH",
        entity_id,
        body={"telephone1": "555-0100"},
        headers={"If-Match": "*", "Prefer": "return=representation"},
    )
    assert shown.status == 200
    assert (shown.body["name"], shown.body["telephone1"]) == ("After", "555-0100")
    assert shown.body["@odata.etag"] != etag
    stale = await org.call("PATCH", entity_id, body={"name": "x"}, headers={"If-Match": etag})
    _error(stale, 412, "0x80060882")
    assert (await org.call("DELETE", entity_id)).status == 204
    message = _error(await org.call("GET", entity_id), 404, "0x80040217")
    assert "Does Not Exist" in message
    _error(
        await org.call("PATCH", entity_id, body={"name": "x"}, headers={"If-Match": "*"}),
        404,
        "0x80040217",
    )
    _error(await org.call("DELETE", entity_id), 404, "0x80040217")


async def test_patch_without_if_match_upserts(org: Org) -> None:
    """PATCH to a missing key without If-Match creates the row with that key."""
    key = str(uuid.uuid4())
    reply = await org.call("PATCH", f"accounts({key})", body={"name": "Upserted"})
    assert reply.status == 204
    assert (await org.get(f"accounts({key})"))["name"] == "Upserted"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"nosuch": 1}, "0x80048d19"),
        ({"numberofemployees": "many"}, "0x80048d19"),
        ({"createdon": "2020-01-01T00:00:00Z"}, "0x80048d19"),
        ({"industrycode": 424242}, "0x8004431a"),
        (["not", "an", "object"], "0x80048d19"),
    ],
    ids=["unknown-column", "wrong-type", "read-only", "choice-out-of-range", "not-an-object"],
)
async def test_invalid_create_is_400(org: Org, body: Any, code: str) -> None:
    """A create with an unknown, read-only or wrongly typed value is refused in the error shape."""
    _error(await org.call("POST", "accounts", body=body), 400, code)


async def test_unknown_resource_is_404_in_dataverse_shape(org: Org) -> None:
    """A misspelt entity set is 404 'Resource not found for the segment', as Dataverse says it."""
    message = _error(await org.call("GET", "Account"), 404, "0x8006088a")
    assert message == "Resource not found for the segment 'Account'."
    _error(await org.call("GET", "accounts(not-a-guid)"), 400, "0x80060888")
    _error(await org.call("PUT", "accounts"), 405, "0x80060888")
    _error(await org.call("POST", "systemusers", body={}), 403, "0x80040220")


# --------------------------------------------------------------------------- $batch


def _batch(parts: list[str], boundary: str = "batch_x") -> bytes:
    return ("".join(f"--{boundary}\r\n{part}" for part in parts) + f"--{boundary}--\r\n").encode()


def _http(method: str, url: str, body: Any = None, content_id: int | None = None) -> str:
    head = "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
    if content_id is not None:
        head += f"Content-ID: {content_id}\r\n"
    inner = f"{method} {url} HTTP/1.1\r\n"
    if body is not None:
        inner += "Content-Type: application/json; type=entry\r\n\r\n" + json.dumps(body)
    else:
        inner += "\r\n"
    return f"{head}\r\n{inner}\r\n"


def _change_set(items: list[str], boundary: str = "changeset_y") -> str:
    inner = "".join(f"--{boundary}\r\n{item}" for item in items) + f"--{boundary}--\r\n"
    return f"Content-Type: multipart/mixed; boundary={boundary}\r\n\r\n{inner}"


def _statuses(text: str) -> list[int]:
    return [int(line.split(" ")[1]) for line in text.splitlines() if line.startswith("HTTP/1.1 ")]


async def _send_batch(org: Org, body: bytes, prefer: str | None = None) -> Reply:
    headers = {"Content-Type": "multipart/mixed; boundary=batch_x"}
    if prefer:
        headers["Prefer"] = prefer
    return await org.call("POST", "$batch", raw=body, headers=headers)


async def test_batch_with_a_change_set(org: Org) -> None:
    """A $batch runs a change set (with a $1 reference) and a GET, answering each part in order."""
    change_set = _change_set(
        [
            _http("POST", f"{org.root}/accounts", {"name": "Batch One"}, content_id=1),
            _http("PATCH", "$1", {"telephone1": "555-0199"}, content_id=2),
            _http("POST", f"{API}/contacts", {"firstname": "Bat", "lastname": "Ch"}, content_id=3),
        ]
    )
    reply = await _send_batch(org, _batch([change_set, _http("GET", "WhoAmI")]))
    assert reply.status == 200, reply.text
    assert reply.headers["Content-Type"].startswith("multipart/mixed; boundary=batchresponse_")
    assert _statuses(reply.text) == [204, 204, 204, 200]
    assert "Content-Type: multipart/mixed; boundary=changesetresponse_" in reply.text
    assert reply.text.count(f"OData-EntityId: {org.root}/accounts(") == 2
    assert org.state.user_id in reply.text
    found = await org.get("accounts?$filter=name eq 'Batch One'")
    (row,) = found["value"]
    assert row["telephone1"] == "555-0199"


async def test_failed_change_set_changes_nothing(org: Org) -> None:
    """A change set with a failing request undoes its earlier ones and answers only the error."""
    change_set = _change_set(
        [
            _http("POST", "accounts", {"name": "Rolled Back"}, content_id=1),
            _http("POST", "accounts", {"nosuch": True}, content_id=2),
        ]
    )
    reply = await _send_batch(org, _batch([change_set, _http("GET", "WhoAmI")]))
    assert reply.status == 200
    assert _statuses(reply.text) == [400]  # processing stops at the first error
    assert "0x80048d19" in reply.text
    assert (await org.get("accounts?$filter=name eq 'Rolled Back'"))["value"] == []
    going_on = await _send_batch(
        org, _batch([change_set, _http("GET", "WhoAmI")]), "odata.continue-on-error"
    )
    assert _statuses(going_on.text) == [400, 200]


async def test_batch_part_naming_another_host_is_400(org: Org) -> None:
    """A $batch part whose absolute URL is not under the organization's service root is refused."""
    reply = await _send_batch(
        org, _batch([_http("GET", "https://elsewhere.example/api/data/v9.2/WhoAmI")])
    )
    assert _statuses(reply.text) == [400]
    assert "not based on the service root" in reply.text
    not_multipart = await org.call("POST", "$batch", body={"x": 1})
    _error(not_multipart, 400, "0x80060888")


# --------------------------------------------------------------------------- service protection


async def test_service_protection_429_retry_after_grows_while_sending(org: Org) -> None:
    """Past the limit each request gets 429, its Retry-After growing while the client keeps on."""
    org.state.protection.limit, org.state.protection.window = 3, 60.0
    for _ in range(3):
        assert (await org.call("GET", "WhoAmI")).status == 200
    org.clock.now += 10
    waits = []
    for _ in range(3):
        reply = await org.call("GET", "WhoAmI")
        message = _error(reply, 429, "0x80072322")
        waits.append(int(reply.headers["Retry-After"]))
    assert message == "Number of requests exceeded the limit of 3 over time window of 60 seconds."
    assert waits[0] == 50  # the oldest request leaves the window 60 s after it came
    assert waits[0] < waits[1] < waits[2]
    org.clock.now += waits[-1]
    assert (await org.call("GET", "WhoAmI")).status == 200
    assert org.state.protection.refused == 3
