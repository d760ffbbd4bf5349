"""The sandbox's Dataverse route: both APIs through one gateway, and Microsoft's Dataverse SDK
driven against the gateway over TLS with a dummy token that the gateway replaces."""

from __future__ import annotations

import asyncio
import gc
import json
import re
import ssl
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jwt
import pytest
from PowerPlatform.Dataverse.client import DataverseClient
from PowerPlatform.Dataverse.core.errors import HttpError

from gateway.sandbox.apim import KEY_HEADER
from gateway.sandbox.dataverse import API_PATH, CONTACT_ROWS, SeenRequest
from gateway.sandbox.run import CI_SCOPE, Sandbox
from tests.sandbox.test_dataverse_sdk import FixedTokenCredential, failure
from tests.sandbox.test_sandbox import _Command

DATAVERSE = f"/dataverse{API_PATH}"


def _via_gateway(seen: list[SeenRequest]) -> bool:
    """Every request reached the stand-in through the gateway: with its X-Request-ID and the
    gateway's token (a request straight from the SDK would carry its dummy token: a 401)."""
    return all(s.request_id is not None and s.authorized for s in seen)


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    """A sandbox on ephemeral ports, its proxy listener on plain HTTP."""
    running = await Sandbox.start()
    yield running
    await running.stop()


@pytest.fixture
async def tls_sandbox(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Sandbox]:
    """A sandbox whose proxy listener serves HTTPS; requests (under the SDK) trusts its CA.

    This machine exports REQUESTS_CA_BUNDLE (and may export proxies); requests lets the
    variable override a session's `verify`, so the test points it at the sandbox CA, as the
    sandbox's banner tells a user to.
    """
    running = await Sandbox.start(tls=True)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(running.files.ca))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    yield running
    await running.stop()


@pytest.fixture
async def sdk(tls_sandbox: Sandbox) -> AsyncIterator[DataverseClient]:
    """Microsoft's Dataverse SDK at the gateway's Dataverse route, holding a dummy token."""
    client = DataverseClient(tls_sandbox.dataverse_url, FixedTokenCredential("dummy-token"))
    client.__enter__()  # a pooled session, as `with DataverseClient(...)` makes
    yield client
    await asyncio.to_thread(client.close)
    gc.collect()  # an HttpError's traceback cycle holds a connection; end it before the stop


# --------------------------------------------------------------------------- both APIs at once


async def test_both_apis_through_one_gateway_at_once(sandbox: Sandbox) -> None:
    """CI and Dataverse requests interleaved through one gateway all succeed; the token endpoint
    minted one token per scope; the subscription key went only to the CI API."""
    accounts = f"{sandbox.gateway_url}{DATAVERSE}/accounts?$select=name&$top=3"
    async with aiohttp.ClientSession() as client:

        async def get(url: str) -> int:
            async with client.get(url) as response:
                await response.read()
                return response.status

        urls = [f"{sandbox.gateway_url}/instances", accounts] * 10
        statuses = await asyncio.gather(*(get(url) for url in urls))
    assert statuses == [200] * 20
    audiences = {
        jwt.decode(t, options={"verify_signature": False})["aud"] for t in sandbox.issuer.issued
    }
    assert audiences == {CI_SCOPE.removesuffix("/.default"), sandbox.dataverse.url}
    assert len(sandbox.issuer.issued) == 2  # one per scope, reused by every request
    assert sandbox.tally.accepted["primary"] == 10  # the CI API saw the key on each request
    dataverse_requests = [s for s in sandbox.dataverse.seen if "/accounts" in s.path_qs]
    assert len(dataverse_requests) == 10
    assert _via_gateway(sandbox.dataverse.seen)
    assert not any(KEY_HEADER.lower() in s.header_names for s in sandbox.dataverse.seen)


async def test_paging_links_lead_back_through_the_gateway(sandbox: Sandbox) -> None:
    """@odata.nextLink from the stand-in names the gateway's Dataverse route; following the
    links page by page reaches every row without ever leaving the gateway."""
    url = f"{sandbox.gateway_url}{DATAVERSE}/contacts?$select=fullname"
    prefer = {"Prefer": "odata.maxpagesize=40"}
    ids: list[str] = []
    links: list[str] = []
    async with aiohttp.ClientSession() as client:
        while url:
            async with client.get(url, headers=prefer) as response:
                assert response.status == 200, await response.text()
                body = await response.json()
            ids += [row["contactid"] for row in body["value"]]
            url = body.get("@odata.nextLink", "")
            links.append(url)
    assert len(ids) == len(set(ids)) == CONTACT_ROWS
    assert all(
        link.startswith(f"{sandbox.gateway_url}{DATAVERSE}/contacts?") for link in links[:-1]
    )
    assert "$skiptoken" in urlsplit(links[0]).query
    pages = [s for s in sandbox.dataverse.seen if "/contacts" in s.path_qs]
    assert len(pages) == len(links) == 4
    assert _via_gateway(sandbox.dataverse.seen)


async def test_impersonation_headers_never_reach_dataverse(sandbox: Sandbox) -> None:
    """The Dataverse route strips the impersonation and business-logic bypass headers: the
    stand-in, which refuses them, answers 200 and never sees them."""
    headers = {
        "CallerObjectId": "00000000-0000-4000-8000-000000000001",
        "MSCRMCallerID": "x",
        "MSCRM.BypassCustomPluginExecution": "true",
        "MSCRM.BypassBusinessLogicExecution": "CustomSync,CustomAsync",
    }
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"{sandbox.gateway_url}{DATAVERSE}/WhoAmI", headers=headers) as response,
    ):
        assert response.status == 200, await response.text()
    (seen,) = sandbox.dataverse.seen
    assert not {name.lower() for name in headers} & seen.header_names


async def test_batch_with_relative_urls_through_the_gateway(sandbox: Sandbox) -> None:
    """A $batch change set with service-root-relative part URLs runs through the gateway, and
    each part's OData-EntityId in the answer names the gateway's Dataverse route."""
    part = (
        "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
        "Content-ID: {id}\r\n\r\nPOST accounts HTTP/1.1\r\n"
        "Content-Type: application/json\r\n\r\n{body}\r\n"
    )
    change_set = "".join(
        f"--cs\r\n{part.format(id=n, body=json.dumps({'name': f'Batch {n}'}))}" for n in (1, 2)
    )
    body = (
        "--b\r\nContent-Type: multipart/mixed; boundary=cs\r\n\r\n"
        f"{change_set}--cs--\r\n\r\n--b--\r\n"
    )
    headers = {"Content-Type": "multipart/mixed; boundary=b"}
    async with (
        aiohttp.ClientSession() as client,
        client.post(
            f"{sandbox.gateway_url}{DATAVERSE}/$batch", data=body, headers=headers
        ) as response,
    ):
        assert response.status == 200
        text = await response.text()
    entity_ids = re.findall(r"^OData-EntityId: (\S+)\r?$", text, re.MULTILINE)
    assert len(entity_ids) == 2
    assert all(e.startswith(f"{sandbox.gateway_url}{DATAVERSE}/accounts(") for e in entity_ids)
    assert sandbox.dataverse.url not in text
    names = {row["name"] for row in sandbox.dataverse.rows["accounts"].values()}
    assert {"Batch 1", "Batch 2"} <= names


# --------------------------------------------------------------------------- the SDK over TLS


async def test_sdk_through_the_gateway_create_read_page_update_delete(
    tls_sandbox: Sandbox, sdk: DataverseClient
) -> None:
    """The SDK, with a dummy token, creates, reads, pages through several pages, updates and
    deletes via the gateway's TLS listener; every request, each page included, came via the
    gateway and none went to the stand-in directly."""

    def work(client: DataverseClient) -> tuple[str, Any, list[int], Any]:
        record_id = client.records.create("account", {"name": "Via Gateway", "revenue": 12.5})
        read = client.records.retrieve("account", record_id, select=["name", "revenue"])
        pages = [
            len(page)
            for page in client.records.list_pages("contact", select=["fullname"], page_size=40)
        ]
        client.records.update("account", record_id, {"telephone1": "555-0142"})
        updated = client.records.retrieve("account", record_id, select=["telephone1"])
        client.records.delete("account", record_id)
        assert client.records.retrieve("account", record_id) is None
        return record_id, (read and dict(read), updated and dict(updated)), pages, None

    record_id, (read, updated), pages, _ = await asyncio.to_thread(work, sdk)
    assert (read["name"], read["revenue"]) == ("Via Gateway", 12.5)
    assert updated["telephone1"] == "555-0142"
    assert pages == [40, 40, 40, CONTACT_ROWS - 120]
    seen = tls_sandbox.dataverse.seen
    page_requests = [s for s in seen if urlsplit(s.path_qs).path == f"{API_PATH}/contacts"]
    assert len(page_requests) == 4
    assert ["$skiptoken" in s.path_qs for s in page_requests] == [False, True, True, True]
    assert _via_gateway(seen)
    assert [s.method for s in seen if record_id in s.path_qs] == [
        "GET",
        "PATCH",
        "GET",
        "DELETE",
        "GET",
    ]
    assert tls_sandbox.gateway_url.startswith("https://")


async def test_sdk_batch_change_set_through_the_gateway(
    tls_sandbox: Sandbox, sdk: DataverseClient
) -> None:
    """The SDK's own $batch, a change set creating several rows plus a read, whose parts name
    the gateway's address, succeeds through the gateway: the parts reach the stand-in naming
    its own service root, every row is created, and the entity ids lead back to the gateway."""
    names = [f"SDK batch {n}" for n in range(3)]
    existing = next(iter(tls_sandbox.dataverse.rows["accounts"]))

    def work(client: DataverseClient) -> Any:
        batch = client.batch.new()
        with batch.changeset() as change_set:
            for name in names:
                change_set.records.create("account", {"name": name})
        batch.records.retrieve("account", existing, select=["name"])
        return batch.execute()

    result = await asyncio.to_thread(work, sdk)
    assert not result.has_errors, [(r.status_code, r.error_message) for r in result.failed]
    assert len(result.responses) == 4
    assert len(result.entity_ids) == 3
    rows = tls_sandbox.dataverse.rows["accounts"].values()
    created = {row["name"]: row["accountid"] for row in rows if row["name"] in names}
    assert set(created) == set(names)
    assert set(result.entity_ids) == set(created.values())
    seen = tls_sandbox.dataverse.seen
    assert [s.status for s in seen if s.path_qs.endswith("$batch")] == [200]
    assert _via_gateway(seen)


async def test_sdk_gets_the_429_with_retry_after_and_ci_keeps_working(
    tls_sandbox: Sandbox, sdk: DataverseClient
) -> None:
    """Dataverse's service-protection 429 reaches the SDK with its Retry-After; the hold is
    the Dataverse route's own, so the CI API answers meanwhile."""
    tls_sandbox.dataverse.protection.limit = 2  # the entity-set lookup, then one more
    tls_sandbox.dataverse.protection.window = 90.0

    def throttled(client: DataverseClient) -> tuple[int | None, Any, Any, bool]:
        client.records.create("account", {"numberofemployees": 1})
        with pytest.raises(HttpError) as refused:
            client.records.create("account", {"numberofemployees": 2})
        return failure(refused.value)

    status, code, retry_after, transient = await asyncio.to_thread(throttled, sdk)
    assert (status, code, transient) == (429, "0x80072322", True)
    assert 60 <= retry_after <= 90  # the window less the time since the first request
    assert tls_sandbox.dataverse.protection.refused == 1
    status, instances = await tls_sandbox.get("/instances")
    assert status == 200
    assert len(instances) == 3


def test_command_with_tls_prints_how_to_trust_it() -> None:
    """`ci-gateway sandbox --tls` serves the proxy listener over HTTPS with the sandbox CA and
    prints how to trust it; a client trusting that CA file reaches both routes."""
    command = _Command({"PATH": "/usr/bin:/bin"}, "--tls")
    try:
        banner = command.until("Stop: Ctrl-C")
        gateway = re.search(r"^  gateway +(https://127\.0\.0\.1:\d+)$", banner, re.MULTILINE)
        ca = re.search(r"export REQUESTS_CA_BUNDLE=(\S+)$", banner, re.MULTILINE)
        assert gateway, banner
        assert ca, banner
        assert f"--cacert {ca[1]}" in banner
        trust = ssl.create_default_context(cafile=ca[1])
        answers = {}
        for path in ("/instances", f"{DATAVERSE}/WhoAmI"):
            url = f"{gateway[1]}{path}"
            with urllib.request.urlopen(url, context=trust, timeout=10) as response:  # noqa: S310 - loopback
                answers[path] = json.load(response)
        assert len(answers["/instances"]) == 3
        assert "UserId" in answers[f"{DATAVERSE}/WhoAmI"]
    finally:
        status = command.stop()
    assert status == 0, command.output
    assert not Path(ca[1]).exists()
