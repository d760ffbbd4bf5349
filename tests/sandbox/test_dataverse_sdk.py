"""Microsoft's Dataverse SDK for Python (PowerPlatform-Dataverse-Client) against the stand-in.

The SDK talks straight to the stand-in's organization URL over TLS here, with a token the
sandbox issuer minted for `{org}/.default`: this pins down the requests the SDK makes and
that the stand-in answers them as Dataverse does. The same SDK goes through the gateway in
the sandbox tests.
"""

from __future__ import annotations

import asyncio
import gc
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote_plus, urlsplit

import pytest
from azure.core.credentials import AccessToken
from PowerPlatform.Dataverse.client import DataverseClient
from PowerPlatform.Dataverse.core.errors import HttpError

from gateway.sandbox.dataverse import CONTACT_ROWS, DataverseOrganization, ServiceProtection
from gateway.sandbox.issuer import TokenIssuer
from tests.conftest import base_url, start_app
from tests.sandbox.test_dataverse import _token

API = "/api/data/v9.2"
T = TypeVar("T")


@dataclass
class FixedTokenCredential:
    """An azure-core TokenCredential that hands the SDK one token and notes the scopes asked."""

    token: str
    scopes: list[tuple[str, ...]] = field(default_factory=list)

    def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        """The fixed token, valid for an hour."""
        self.scopes.append(scopes)
        return AccessToken(self.token, int(time.time()) + 3600)


@dataclass
class Direct:
    """The stand-in and an SDK client pointed straight at its organization URL."""

    org: DataverseOrganization
    client: DataverseClient
    credential: FixedTokenCredential

    async def run(self, work: Callable[[DataverseClient], T]) -> T:
        """Run blocking SDK work off the event loop that serves the stand-in."""
        return await asyncio.to_thread(work, self.client)

    def paths(self) -> list[str]:
        """The decoded paths (and queries) the stand-in received, in order."""
        return [unquote_plus(seen.path_qs) for seen in self.org.seen]


@pytest.fixture
def trust_sandbox_ca(monkeypatch: pytest.MonkeyPatch, ca_file: Path) -> None:
    """requests (under the SDK) trusts the test CA and reaches loopback without a proxy.

    This machine exports REQUESTS_CA_BUNDLE (and may export proxies); requests lets the
    variable override a session's `verify`, so pointing it at the CA is what a user does too.
    """
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca_file))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
async def direct(
    issuer: TokenIssuer, server_ssl: ssl.SSLContext, ca_file: Path, trust_sandbox_ca: None
) -> AsyncIterator[Direct]:
    """The stand-in over TLS and an SDK client holding a token for it."""
    org = DataverseOrganization(issuer.verify_audience, protection=ServiceProtection())
    runner = await start_app(org.app(), server_ssl)
    org.url = base_url(runner, "https")
    credential = FixedTokenCredential(await _token(issuer, ca_file, f"{org.url}/.default"))
    client = DataverseClient(org.url, credential)
    client.__enter__()  # a pooled session, as `with DataverseClient(...)` makes
    try:
        yield Direct(org, client, credential)
    finally:
        await asyncio.to_thread(client.close)
        # An HttpError's traceback (a reference cycle) holds the requests response and its
        # connection, which session.close() does not reach: collect it now, so the
        # stand-in sees the connection end before it stops, not the garbage collector later.
        gc.collect()
        await runner.cleanup()


def failure(error: HttpError) -> tuple[int | None, Any, Any, bool]:
    """What an HttpError told the caller: status, Dataverse code, Retry-After, transient."""
    details = error.details
    return (
        error.status_code,
        details.get("service_error_code"),
        details.get("retry_after"),
        error.is_transient,
    )


def test_sdk_refuses_plain_http() -> None:
    """The SDK will not send a bearer token to an http:// organization URL."""
    with pytest.raises(ValueError, match="HTTPS"):
        DataverseClient("http://127.0.0.1:8080/dataverse", FixedTokenCredential("x"))


async def test_sdk_create_get_update_delete(direct: Direct) -> None:
    """The SDK's create, retrieve, update and delete work against the stand-in as on Dataverse."""

    def crud(client: DataverseClient) -> tuple[str, Any, Any]:
        record_id = client.records.create("account", {"name": "Contoso SDK", "revenue": 1000})
        client.records.update("account", record_id, {"telephone1": "555-0100"})
        shown = client.records.retrieve("account", record_id, select=["name", "telephone1"])
        client.records.delete("account", record_id)
        assert client.records.retrieve("account", record_id) is None  # a 404, as None
        with pytest.raises(HttpError) as gone:
            client.records.update("account", record_id, {"name": "x"})  # If-Match: *
        return record_id, shown, failure(gone.value)

    record_id, shown, gone = await direct.run(crud)
    assert shown is not None
    assert (shown["name"], shown["telephone1"]) == ("Contoso SDK", "555-0100")
    assert gone == (404, "0x80040217", None, False)
    paths = direct.paths()
    # The SDK resolves the entity set once, fetches the choice columns' labels before
    # writing text values, then works on accounts.
    assert paths[0] == (
        f"{API}/EntityDefinitions?$select=LogicalName,EntitySetName,PrimaryIdAttribute"
        "&$filter=LogicalName eq 'account'"
    )
    assert f"{API}/accounts({record_id})" in paths
    assert [seen.method for seen in direct.org.seen if "accounts" in seen.path_qs] == [
        "POST",
        "PATCH",
        "GET",
        "DELETE",
        "GET",
        "PATCH",
    ]
    assert all(seen.authorized for seen in direct.org.seen)
    assert set(direct.credential.scopes) == {(f"{direct.org.url}/.default",)}


async def test_sdk_follows_next_links_across_pages(direct: Direct) -> None:
    """list_pages(page_size=…) sends Prefer: odata.maxpagesize and follows each @odata.nextLink."""

    def pages(client: DataverseClient) -> list[list[str]]:
        return [
            [record["contactid"] for record in page]
            for page in client.records.list_pages(
                "contact", select=["fullname"], page_size=40, orderby=["fullname asc"]
            )
        ]

    ids = await direct.run(pages)
    assert [len(page) for page in ids] == [40, 40, 40, CONTACT_ROWS - 120]
    assert len({i for page in ids for i in page}) == CONTACT_ROWS
    contact_requests = [seen for seen in direct.org.seen if "/contacts" in seen.path_qs]
    assert len(contact_requests) == 4
    assert ["$skiptoken" in seen.path_qs for seen in contact_requests] == [False, True, True, True]


async def test_sdk_batch_change_set(direct: Direct) -> None:
    """The SDK's $batch with a change set creates both rows and reports their ids."""

    def batch(client: DataverseClient) -> Any:
        request = client.batch.new()
        with request.changeset() as change_set:
            change_set.records.create("account", {"name": "Batch A"})
            change_set.records.create("contact", {"firstname": "Bea", "lastname": "Batch"})
        return request.execute()

    result = await direct.run(batch)
    assert not result.has_errors
    assert [item.status_code for item in result.responses] == [204, 204]
    ids = [item.entity_id for item in result.responses]
    account = await asyncio.to_thread(direct.client.records.retrieve, "account", ids[0])
    assert account is not None
    assert account["name"] == "Batch A"
    batch_posts = [s for s in direct.org.seen if urlsplit(s.path_qs).path == f"{API}/$batch"]
    assert len(batch_posts) == 1


async def test_sdk_surfaces_service_protection_429(direct: Direct) -> None:
    """A service-protection 429 reaches the SDK as HttpError with the Retry-After seconds."""
    direct.org.protection.limit = 1
    direct.org.protection.window = 120.0

    def throttled(client: DataverseClient) -> tuple[int | None, Any, Any, bool]:
        with pytest.raises(HttpError) as refused:
            client.records.create("account", {"numberofemployees": 3})  # 2nd request: 429
        return failure(refused.value)

    assert await direct.run(throttled) == (429, "0x80072322", 120, True)
