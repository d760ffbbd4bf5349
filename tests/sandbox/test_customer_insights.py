"""The Customer Insights API v1 stand-in: instance, metadata and OData data routes."""

import json
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from gateway.sandbox.customer_insights import PAGE_SIZE, create_customer_insights_app

Client = TestClient[web.Request, web.Application]
JsonRow = dict[str, Any]

NOW = datetime(2025, 7, 1, 12, 0, tzinfo=UTC)
UNKNOWN_INSTANCE = "00000000-0000-4000-8000-000000000000"
API_ERROR_KEYS = {"errorCode", "message", "httpStatusCode"}
ODATA_ERROR_KEYS = {"errorCode", "message", "target"}


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    """A test client for the stand-in built from seed 7 and a fixed clock."""
    async with TestClient(TestServer(create_customer_insights_app(now=lambda: NOW))) as client:
        yield client


@pytest.fixture
async def instances(client: Client) -> dict[str, str]:
    """Instance ids keyed by instance type."""
    body = await _get(client, "/v1/instances")
    return {instance["instanceType"]: instance["instanceId"] for instance in body}


@pytest.fixture
def data(instances: dict[str, str]) -> str:
    """The data path of the production instance."""
    return f"/v1/instances/{instances['production']}/data"


async def _get(client: Client, path: str, params: Any = None, status: int = 200) -> Any:
    response = await client.get(path, params=params)
    assert response.status == status, await response.text()
    return await response.json()


async def _send(client: Client, method: str, path: str, body: str, status: int) -> Any:
    headers = {"Content-Type": "application/json"}
    response = await client.request(method, path, data=body, headers=headers)
    assert response.status == status, await response.text()
    return await response.json()


async def _all_rows(client: Client, path: str) -> list[JsonRow]:
    """Every row of an entity, following @odata.nextLink (absolute URLs) page by page."""
    body = await _get(client, path)
    rows: list[JsonRow] = body["value"]
    while "@odata.nextLink" in body:
        async with client.session.get(body["@odata.nextLink"]) as response:
            body = await response.json()
        rows.extend(body["value"])
    return rows


def _is_guid(value: object) -> bool:
    return isinstance(value, str) and str(uuid.UUID(value)) == value


# Instances.


@pytest.mark.parametrize(
    ("field", "valid"),
    [
        pytest.param("instanceId", _is_guid, id="instanceId is a GUID"),
        pytest.param("name", lambda v: isinstance(v, str) and v, id="name is text"),
        pytest.param(
            "instanceType", lambda v: v in {"production", "sandbox", "trial"}, id="instanceType"
        ),
        pytest.param("azureRegion", lambda v: isinstance(v, str) and v, id="azureRegion"),
        pytest.param("scaleUnitId", lambda v: isinstance(v, str) and v, id="scaleUnitId"),
    ],
)
async def test_instance_list_fields(
    client: Client, field: str, valid: Callable[[object], bool]
) -> None:
    """Every InstanceInfo in the list carries the field with a well-typed value."""
    body = await _get(client, "/v1/instances")
    assert isinstance(body, list)
    assert len(body) >= 2
    assert all(valid(instance[field]) for instance in body)


async def test_instance_list_has_each_type_and_only_trials_expire(client: Client) -> None:
    """The list holds one instance of each type and only the trial has an expiry 30 days out."""
    body = await _get(client, "/v1/instances")
    expiries = {instance["instanceType"]: instance.get("expiryTimeUtc") for instance in body}
    assert expiries == {"production": None, "sandbox": None, "trial": "2025-07-31T12:00:00Z"}


@pytest.mark.parametrize(
    ("kind", "upper_case", "expiry"),
    [
        pytest.param("production", False, None, id="production"),
        pytest.param("sandbox", False, None, id="sandbox"),
        pytest.param("trial", False, "2025-07-31T12:00:00Z", id="trial has expiry"),
        pytest.param("production", True, None, id="upper-case GUID resolves"),
    ],
)
async def test_instance_metadata(
    client: Client, instances: dict[str, str], kind: str, upper_case: bool, expiry: str | None
) -> None:
    """GET /instances/{id} returns InstanceMetadata, with expiryTimeUtc only for trials."""
    instance_id = instances[kind].upper() if upper_case else instances[kind]
    body = await _get(client, f"/v1/instances/{instance_id}")
    assert body.pop("expiryTimeUtc", None) == expiry
    assert body["instanceType"] == kind
    assert body["provisioningState"] == "Succeeded"
    assert isinstance(body["name"], str)
    assert isinstance(body["region"], str)
    assert isinstance(body["isB2B"], bool)
    assert isinstance(body["isB2C"], bool)


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(f"/v1/instances/{UNKNOWN_INSTANCE}", id="metadata"),
        pytest.param("/v1/instances/not-a-guid", id="metadata of a non-GUID"),
        pytest.param(f"/v1/instances/{UNKNOWN_INSTANCE}/data/Customer", id="data"),
        pytest.param(f"/v1/instances/{UNKNOWN_INSTANCE}/data/Customer/abc", id="row"),
        pytest.param(f"/v1/instances/{UNKNOWN_INSTANCE}/manage/entities", id="entities"),
    ],
)
async def test_unknown_instance_is_404_api_error_result(client: Client, path: str) -> None:
    """An unknown instance gives 404 with an ApiErrorResult body naming NotFound."""
    body = await _get(client, path, status=404)
    assert set(body) == API_ERROR_KEYS
    assert body["errorCode"] == "InstanceNotFound"
    assert body["httpStatusCode"] == "NotFound"
    assert body["message"]


# Paging.


@pytest.mark.parametrize(
    ("params", "window", "next_params"),
    [
        pytest.param({"$top": "10"}, slice(0, 10), None, id="top"),
        pytest.param({"$skip": "20", "$top": "5"}, slice(20, 25), None, id="skip and top"),
        pytest.param({"$top": "0"}, slice(0, 0), None, id="top zero"),
        pytest.param({"$skip": "10000"}, slice(10000, None), None, id="skip past the end"),
        pytest.param({}, slice(0, PAGE_SIZE), {"$skip": "100"}, id="server page"),
        pytest.param(
            {"$top": "150", "$skip": "1"}, slice(1, 1 + PAGE_SIZE), {"$skip": "101", "$top": "50"},
            id="top beyond a page",
        ),
    ],
)  # fmt: skip
async def test_paging(
    client: Client, data: str, params: dict[str, str], window: slice, next_params: Any
) -> None:
    """$skip/$top select a window, @odata.count counts every match, nextLink continues it."""
    everything = await _all_rows(client, f"{data}/Customer")
    body = await _get(client, f"{data}/Customer", params)
    next_link = body.get("@odata.nextLink")
    assert body["@odata.count"] == len(everything) == 300
    assert body["value"] == everything[window]
    assert (next_link and dict(URL(next_link).query)) == next_params


async def test_next_links_walk_every_row_once(client: Client, data: str) -> None:
    """Following @odata.nextLink from the first page yields each activity exactly once."""
    rows = await _all_rows(client, f"{data}/UnifiedActivity")
    count = (await _get(client, f"{data}/UnifiedActivity", {"$top": "0"}))["@odata.count"]
    assert count > PAGE_SIZE * 2
    assert len({row["ActivityId"] for row in rows}) == len(rows) == count


# $filter.


@pytest.mark.parametrize(
    ("entity", "expression", "oracle"),
    [
        pytest.param(
            "Customer", "City eq 'London'", lambda r: r["City"] == "London", id="eq"
        ),
        pytest.param(
            "Customer", "Country ne 'France'", lambda r: r["Country"] != "France", id="ne"
        ),
        pytest.param(
            "Customer", "LastName eq 'O''Brien'", lambda r: r["LastName"] == "O'Brien",
            id="escaped quote",
        ),
        pytest.param(
            "Customer", "City eq 'London' and LoyaltyPoints ge 2500",
            lambda r: r["City"] == "London" and r["LoyaltyPoints"] >= 2500, id="and with ge",
        ),
        pytest.param(
            "Customer", "(City eq 'Paris' or City eq 'Berlin') and LoyaltyPoints lt 1000",
            lambda r: r["City"] in ("Paris", "Berlin") and r["LoyaltyPoints"] < 1000,
            id="or in parentheses",
        ),
        pytest.param(
            "Customer", "contains(EMail,'.garcia')", lambda r: ".garcia" in r["EMail"],
            id="contains",
        ),
        pytest.param(
            "Customer", "not startswith(FirstName,'J')",
            lambda r: not r["FirstName"].startswith("J"), id="not startswith",
        ),
        pytest.param(
            "Customer", "Country in ('Spain','Canada')",
            lambda r: r["Country"] in ("Spain", "Canada"), id="in",
        ),
        pytest.param(
            "Customer", "DateOfBirth gt 1990-01-01", lambda r: r["DateOfBirth"] > "1990-01-01",
            id="date gt",
        ),
        pytest.param(
            "Customer", "CreatedOn le '2023-01-01T01:00:00+01:00'",
            lambda r: r["CreatedOn"] <= "2023-01-01T00:00:00Z", id="quoted offset datetime le",
        ),
        pytest.param(
            "UnifiedActivity", "Amount eq null", lambda r: r["Amount"] is None, id="eq null"
        ),
        pytest.param(
            "UnifiedActivity", "Amount gt 250.5 and ActivityTime ge 2024-06-01T00:00:00Z",
            lambda r: r["Amount"] is not None and r["Amount"] > 250.5
            and r["ActivityTime"] >= "2024-06-01T00:00:00Z",
            id="double gt and datetime ge",
        ),
    ],
)  # fmt: skip
async def test_filter(
    client: Client, data: str, entity: str, expression: str, oracle: Callable[[JsonRow], bool]
) -> None:
    """$filter returns exactly the rows the expression selects, in stored order."""
    expected = [row for row in await _all_rows(client, f"{data}/{entity}") if oracle(row)]
    body = await _get(client, f"{data}/{entity}", {"$filter": expression})
    assert expected, "the seed data should contain matching rows"
    assert body["@odata.count"] == len(expected)
    assert body["value"] == expected[:PAGE_SIZE]


@pytest.mark.parametrize(
    "expression",
    [
        pytest.param("City eq 'Lon", id="unterminated string"),
        pytest.param("City eq", id="missing operand"),
        pytest.param("", id="empty"),
        pytest.param("Town eq 'London'", id="unknown property"),
        pytest.param("City like 'London'", id="unknown operator"),
        pytest.param("LoyaltyPoints eq 'many'", id="string for a number"),
        pytest.param("LoyaltyPoints eq 1.5", id="fraction for Int32"),
        pytest.param("City eq 'a' 'b'", id="trailing literal"),
        pytest.param("(City eq 'London'", id="unbalanced parenthesis"),
        pytest.param("City eq 'London' & x", id="stray character"),
        pytest.param("City gt null", id="ordering against null"),
        pytest.param("contains(LoyaltyPoints,'1')", id="contains on a number"),
        pytest.param("contains(City,null)", id="contains null"),
        pytest.param("CreatedOn gt 2023-01-01T00:00:00", id="datetime without offset"),
        pytest.param("DateOfBirth gt 1990-13-01", id="impossible date"),
        pytest.param("City EQ 'London'", id="upper-case operator"),
    ],
)
async def test_malformed_filter_is_400_odata_error(
    client: Client, data: str, expression: str
) -> None:
    """A $filter that does not parse or type-check gives 400 with a flat ODataError."""
    body = await _get(client, f"{data}/Customer", {"$filter": expression}, status=400)
    assert set(body) == ODATA_ERROR_KEYS
    assert body["errorCode"] == "InvalidQueryOption"
    assert body["target"] == "$filter"
    assert body["message"].startswith("Invalid $filter")


@pytest.mark.parametrize(
    ("params", "target"),
    [
        pytest.param({"$top": "-1"}, "$top", id="negative top"),
        pytest.param({"$top": "ten"}, "$top", id="non-numeric top"),
        pytest.param({"$skip": "1.5"}, "$skip", id="fractional skip"),
        pytest.param({"$select": "CustomerId,Nickname"}, "$select", id="unknown select"),
        pytest.param({"$select": "CustomerId,"}, "$select", id="empty select item"),
        pytest.param({"$orderby": "Nickname"}, "$orderby", id="unknown orderby"),
        pytest.param({"$orderby": "City sideways"}, "$orderby", id="bad direction"),
        pytest.param({"$search": "  "}, "$search", id="blank search"),
        pytest.param({"$count": "yes"}, "$count", id="bad count"),
        pytest.param({"$fitler": "City eq 'x'"}, "$fitler", id="unknown option"),
        pytest.param([("$top", "1"), ("$top", "2")], "$top", id="repeated option"),
    ],
)
async def test_bad_query_option_is_400_odata_error(
    client: Client, data: str, params: Any, target: str
) -> None:
    """A bad or unknown system query option gives 400 with an ODataError naming it."""
    body = await _get(client, f"{data}/Customer", params, status=400)
    assert set(body) == ODATA_ERROR_KEYS
    assert body["target"] == target
    assert body["message"]


# $select, $orderby, $search.


@pytest.mark.parametrize(
    ("select", "keys", "context_suffix"),
    [
        pytest.param("City,CustomerId", ["City", "CustomerId"], "#Customer(City,CustomerId)",
                     id="two properties in the asked order"),
        pytest.param(" EMail , EMail ", ["EMail"], "#Customer(EMail)", id="spaces and repeats"),
        pytest.param("*", None, "#Customer", id="star selects all"),
    ],
)  # fmt: skip
async def test_select_projects_rows(
    client: Client, data: str, select: str, keys: list[str] | None, context_suffix: str
) -> None:
    """$select keeps only the named properties and shows them in @odata.context."""
    everything = await _get(client, f"{data}/Customer", {"$top": "5"})
    body = await _get(client, f"{data}/Customer", {"$top": "5", "$select": select})
    expected = [{key: row[key] for key in keys or row} for row in everything["value"]]
    assert body["value"] == expected
    assert all(list(row) == list(expected[0]) for row in body["value"])
    assert body["@odata.context"].endswith(f"/data/$metadata{context_suffix}")


def _null_lowest(name: str) -> Callable[[JsonRow], tuple[bool, Any]]:
    return lambda row: (row[name] is not None, row[name])


def _ordered(rows: list[JsonRow], order: list[tuple[str, bool]]) -> list[list[Any]]:
    """Sort keys of rows the OData way (null lowest), last key first so earlier keys win."""
    for name, descending in reversed(order):
        rows = sorted(rows, key=_null_lowest(name), reverse=descending)
    return [[row[name] for name, _ in order] for row in rows]


@pytest.mark.parametrize(
    ("entity", "orderby", "order"),
    [
        pytest.param("Customer", "LoyaltyPoints desc", [("LoyaltyPoints", True)], id="desc"),
        pytest.param("Customer", "LastName", [("LastName", False)], id="asc by default"),
        pytest.param(
            "Customer", "Country asc, DateOfBirth desc",
            [("Country", False), ("DateOfBirth", True)], id="comma list",
        ),
        pytest.param("UnifiedActivity", "Amount desc", [("Amount", True)], id="nulls last desc"),
        pytest.param("UnifiedActivity", "Amount", [("Amount", False)], id="nulls first asc"),
    ],
)  # fmt: skip
async def test_orderby(
    client: Client, data: str, entity: str, orderby: str, order: list[tuple[str, bool]]
) -> None:
    """$orderby sorts every match before paging, by each listed key in turn."""
    everything = await _all_rows(client, f"{data}/{entity}")
    body = await _get(client, f"{data}/{entity}", {"$orderby": orderby})
    assert _ordered(body["value"], order) == _ordered(everything, order)[:PAGE_SIZE]
    assert _ordered(body["value"], order) == [[r[n] for n, _ in order] for r in body["value"]]


@pytest.mark.parametrize(
    ("term", "expected_count"),
    [
        pytest.param("lOnDoN", None, id="case-insensitive"),
        pytest.param("o'brien", None, id="quote in the term"),
        pytest.param("MÜLLER", None, id="non-ASCII"),
        pytest.param("no such customer", 0, id="no match"),
    ],
)
async def test_search(client: Client, data: str, term: str, expected_count: int | None) -> None:
    """$search keeps rows with any string property containing the term, ignoring case."""
    needle = term.casefold()
    expected = [
        row
        for row in await _all_rows(client, f"{data}/Customer")
        if any(isinstance(value, str) and needle in value.casefold() for value in row.values())
    ]
    body = await _get(client, f"{data}/Customer", {"$search": term})
    assert body["@odata.count"] == len(expected)
    assert body["value"] == expected[:PAGE_SIZE]
    if expected_count is None:
        assert expected
    else:
        assert len(expected) == expected_count


# Unknown entities.


@pytest.mark.parametrize(
    ("method", "path"),
    [
        pytest.param("GET", "/Customers", id="query a plural"),
        pytest.param("GET", "/customer", id="query with the wrong case"),
        pytest.param("GET", "/Segment/abc", id="row"),
        pytest.param("POST", "/Segment", id="create"),
        pytest.param("PATCH", "/Segment/abc", id="update"),
    ],
)
async def test_unknown_entity_is_404_odata_error(
    client: Client, data: str, method: str, path: str
) -> None:
    """An unknown entity name gives 404 with a flat ODataError targeting that name."""
    body = await _send(client, method, f"{data}{path}", "{}", 404)
    assert set(body) == ODATA_ERROR_KEYS
    assert body["errorCode"] == "EntityNotFound"
    assert body["target"] == path.split("/")[1]


async def test_unknown_entity_metadata_is_404_odata_error(
    client: Client, instances: dict[str, str]
) -> None:
    """Metadata of an unknown entity gives 404 with a flat ODataError."""
    path = f"/v1/instances/{instances['production']}/manage/entities/Segment"
    body = await _get(client, path, status=404)
    assert set(body) == ODATA_ERROR_KEYS
    assert body["target"] == "Segment"


# Writes.


async def test_created_row_is_found_by_filter_and_key(client: Client, data: str) -> None:
    """POST stores a row with a generated key, stamped CreatedOn and normalized dates."""
    sent = {"FirstName": "Ada", "LastName": "Lovelace", "City": "London", "LoyaltyPoints": 10}
    created = await _send(client, "POST", f"{data}/Customer", json.dumps(sent), 201)
    key = created["CustomerId"]
    assert len(key) == 32
    assert int(key, 16) >= 0
    assert created == {
        **dict.fromkeys(created),
        **sent,
        "CustomerId": key,
        "CreatedOn": "2025-07-01T12:00:00Z",
    }
    found = await _get(client, f"{data}/Customer", {"$filter": f"CustomerId eq '{key}'"})
    assert found["@odata.count"] == 1
    assert found["value"] == [created]
    assert await _get(client, f"{data}/Customer/{key}") == created


async def test_created_row_keeps_a_given_key_and_normalizes_moments(
    client: Client, data: str
) -> None:
    """POST keeps a client-supplied key and stores dates in the API's UTC form."""
    sent = {"ActivityId": "act-1", "ActivityTime": "2024-05-01T12:00:00+02:00", "Amount": 12}
    response = await client.post(f"{data}/UnifiedActivity", json=sent)
    created = await response.json()
    assert response.status == 201
    assert response.headers["Location"].endswith("/data/UnifiedActivity/act-1")
    assert created["ActivityTime"] == "2024-05-01T10:00:00Z"
    assert created["Amount"] == 12.0
    assert await _get(client, f"{data}/UnifiedActivity/act-1") == created


async def test_created_row_with_a_taken_key_is_409(client: Client, data: str) -> None:
    """POST with a key that already exists gives 409 and leaves the row untouched."""
    existing = (await _get(client, f"{data}/Customer", {"$top": "1"}))["value"][0]
    body = json.dumps({"CustomerId": existing["CustomerId"], "City": "Nowhere"})
    error = await _send(client, "POST", f"{data}/Customer", body, 409)
    assert set(error) == ODATA_ERROR_KEYS
    assert await _get(client, f"{data}/Customer/{existing['CustomerId']}") == existing


@pytest.mark.parametrize(
    ("entity", "body", "target"),
    [
        pytest.param("Customer", "{not json", "body", id="malformed JSON"),
        pytest.param("Customer", "", "body", id="empty body"),
        pytest.param("Customer", "[1, 2]", "body", id="array"),
        pytest.param("Customer", '{"Nickname": "Al"}', "Nickname", id="unknown attribute"),
        pytest.param("Customer", '{"City": 5}', "City", id="number for a string"),
        pytest.param("Customer", '{"LoyaltyPoints": "lots"}', "LoyaltyPoints",
                     id="string for Int32"),
        pytest.param("Customer", '{"LoyaltyPoints": true}', "LoyaltyPoints", id="bool for Int32"),
        pytest.param("Customer", '{"LoyaltyPoints": 2147483648}', "LoyaltyPoints",
                     id="Int32 overflow"),
        pytest.param("Customer", '{"DateOfBirth": "31/12/1990"}', "DateOfBirth", id="bad date"),
        pytest.param("Customer", '{"CreatedOn": "2024-01-01T10:00:00"}', "CreatedOn",
                     id="datetime without offset"),
        pytest.param("Customer", '{"CustomerId": ""}', "CustomerId", id="empty key"),
        pytest.param("UnifiedActivity", '{"Amount": NaN}', "Amount", id="NaN for Double"),
        pytest.param("UnifiedActivity", '{"Title": ["a"]}', "Title", id="array for a string"),
    ],
)  # fmt: skip
async def test_invalid_create_is_400_odata_error(
    client: Client, data: str, entity: str, body: str, target: str
) -> None:
    """POST with a body that is not a valid row gives 400 and stores nothing."""
    before = (await _get(client, f"{data}/{entity}", {"$top": "0"}))["@odata.count"]
    error = await _send(client, "POST", f"{data}/{entity}", body, 400)
    after = (await _get(client, f"{data}/{entity}", {"$top": "0"}))["@odata.count"]
    assert set(error) == ODATA_ERROR_KEYS
    assert error["errorCode"] == "InvalidRequestBody"
    assert error["target"] == target
    assert after == before


async def test_patch_updates_only_the_given_attributes(client: Client, data: str) -> None:
    """PATCH changes the named attributes, keeps the rest and the change is visible to queries."""
    original = (await _get(client, f"{data}/Customer", {"$top": "1"}))["value"][0]
    key = original["CustomerId"]
    changes = {"City": "Reykjavík", "Telephone": None}
    updated = await _send(client, "PATCH", f"{data}/Customer/{key}", json.dumps(changes), 200)
    assert updated == {**original, **changes}
    found = await _get(client, f"{data}/Customer", {"$filter": "City eq 'Reykjavík'"})
    assert found["value"] == [updated]


@pytest.mark.parametrize(
    ("entity_id", "body", "expected"),
    [
        pytest.param("no-such-row", '{"City": "Oslo"}', (404, "no-such-row"), id="unknown id"),
        pytest.param(None, '{"CustomerId": "other"}', (400, "CustomerId"), id="key change"),
        pytest.param(None, '{"CustomerId": null}', (400, "CustomerId"), id="key cleared"),
        pytest.param(None, '{"LoyaltyPoints": 1.5}', (400, "LoyaltyPoints"), id="wrong type"),
        pytest.param(None, "[]", (400, "body"), id="not an object"),
    ],
)
async def test_invalid_patch_is_odata_error(
    client: Client, data: str, entity_id: str | None, body: str, expected: tuple[int, str]
) -> None:
    """PATCH of an unknown row or with a bad body gives an ODataError and changes nothing."""
    original = (await _get(client, f"{data}/Customer", {"$top": "1"}))["value"][0]
    path = f"{data}/Customer/{entity_id or original['CustomerId']}"
    status, target = expected
    error = await _send(client, "PATCH", path, body, status)
    assert set(error) == ODATA_ERROR_KEYS
    assert error["target"] == target
    assert await _get(client, f"{data}/Customer/{original['CustomerId']}") == original


# Entity metadata.


@pytest.mark.parametrize(
    ("entity", "attribute", "data_type", "is_key"),
    [
        pytest.param("Customer", "CustomerId", "Edm.String", True, id="Customer key"),
        pytest.param("Customer", "DateOfBirth", "Edm.Date", False, id="Customer date"),
        pytest.param("Customer", "LoyaltyPoints", "Edm.Int32", False, id="Customer number"),
        pytest.param("Customer", "CreatedOn", "Edm.DateTimeOffset", False, id="Customer moment"),
        pytest.param("UnifiedActivity", "ActivityId", "Edm.String", True, id="activity key"),
        pytest.param("UnifiedActivity", "CustomerId", "Edm.String", False, id="activity link"),
        pytest.param("UnifiedActivity", "Amount", "Edm.Double", False, id="activity amount"),
    ],
)  # fmt: skip
async def test_manage_entities_lists_attribute_types(  # noqa: PLR0917  one column per table field
    client: Client,
    instances: dict[str, str],
    entity: str,
    attribute: str,
    data_type: str,
    is_key: bool,
) -> None:
    """manage/entities lists both entities with each attribute's EDM type and key flag."""
    path = f"/v1/instances/{instances['trial']}/manage/entities"
    listed = {item["name"]: item for item in await _get(client, path)}
    single = await _get(client, f"{path}/{entity}")
    attributes = {item["name"]: item for item in listed[entity]["attributes"]}
    assert set(listed) == {"Customer", "UnifiedActivity"}
    assert single == listed[entity]
    assert attributes[attribute] == {"name": attribute, "dataType": data_type, "isKey": is_key}


# Seed data.


async def test_activities_refer_to_existing_customers(client: Client, data: str) -> None:
    """Every seeded activity's CustomerId is the key of a customer in the same instance."""
    customers = {row["CustomerId"] for row in await _all_rows(client, f"{data}/Customer")}
    activities = await _all_rows(client, f"{data}/UnifiedActivity")
    assert activities
    assert {row["CustomerId"] for row in activities} <= customers


@pytest.mark.parametrize(
    ("other_seed", "same"),
    [pytest.param(7, True, id="same seed"), pytest.param(8, False, id="other seed")],
)
async def test_seed_determines_the_data(client: Client, other_seed: int, same: bool) -> None:
    """Two apps built from the same seed serve identical instances and rows; others differ."""

    async def snapshot(some: Client) -> list[Any]:
        listed = await _get(some, "/v1/instances")
        rows = await _get(some, f"/v1/instances/{listed[0]['instanceId']}/data/Customer")
        return [listed, rows["value"]]

    other_app = create_customer_insights_app(seed=other_seed, now=lambda: NOW)
    async with TestClient(TestServer(other_app)) as other:
        assert (await snapshot(client) == await snapshot(other)) is same


def test_naive_clock_is_rejected() -> None:
    """A clock returning naive datetimes is refused when the app is built."""
    naive = datetime(2025, 1, 1)  # noqa: DTZ001  the naive value is the point of the test
    with pytest.raises(ValueError, match="aware"):
        create_customer_insights_app(now=lambda: naive)
