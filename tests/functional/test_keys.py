"""Subscription keys: fallback to the secondary, key-file rotation without a failed request."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.conftest import CANARY_PRIMARY, CANARY_SECONDARY, RunningGateway, StartGateway
from tests.poll import eventually
from tests.servers.upstream import Upstream


async def _status(gw: RunningGateway, method: str = "GET", data: bytes = b"") -> int:
    async with gw.session.request(method, gw.url("/echo/k"), data=data) as response:
        return response.status


async def test_regenerated_primary_falls_back_to_secondary(
    gw: RunningGateway, upstream: Upstream
) -> None:
    """APIM rejects the primary: the request is retried with the secondary, now sent first."""
    upstream.keys.regenerate("primary")
    assert await _status(gw, "POST", b'{"replayable": true}') == 200
    assert len(upstream.seen) == 1  # the rejected attempt was answered by the APIM guard
    assert upstream.seen[-1].header_values("Ocp-Apim-Subscription-Key") == [CANARY_SECONDARY]
    assert upstream.seen[-1].body_length == len(b'{"replayable": true}')
    assert await _status(gw) == 200
    assert upstream.seen[-1].header_values("Ocp-Apim-Subscription-Key") == [CANARY_SECONDARY]
    metrics = await gw.metrics_text()
    assert 'cigw_subscription_key_fallbacks_total{route="/"} 1.0' in metrics
    assert 'cigw_subscription_key_active{route="/",slot="secondary"} 1.0' in metrics
    assert 'cigw_subscription_key_active{route="/",slot="primary"} 0.0' in metrics


async def test_both_keys_invalid_returns_apim_401_without_looping(
    gw: RunningGateway, upstream: Upstream
) -> None:
    """With both keys regenerated: one retry with the secondary, then APIM's 401 to the caller."""
    upstream.keys.regenerate("primary")
    upstream.keys.regenerate("secondary")
    async with gw.session.get(gw.url("/echo/k")) as response:
        assert response.status == 401
        body = await response.json()
    assert "invalid subscription key" in body["message"]
    metrics = await gw.metrics_text()
    assert 'cigw_upstream_auth_rejections_total{credential="key",route="/"} 2.0' in metrics
    assert 'cigw_subscription_key_fallbacks_total{route="/"} 1.0' in metrics


async def test_no_key_configured_sends_none(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    """Without a subscription key (the Dataverse set-up) no key header goes upstream at all."""
    upstream.require_key = False
    gw = await start_gateway(
        {"CIGW_SUBSCRIPTION_KEY": None, "CIGW_SUBSCRIPTION_KEY_SECONDARY": None}
    )
    async with gw.session.get(gw.url("/echo/k"), headers={"Ocp-Apim-Subscription-Key": "x"}) as r:
        assert r.status == 200
    assert upstream.seen[-1].header_values("Ocp-Apim-Subscription-Key") == []
    assert len(upstream.seen[-1].header_values("Authorization")) == 1


def _swap_secret(directory: Path, name: str, value: str, generation: int) -> None:
    """Update a key the way the kubelet updates a mounted Secret: a new dir, then a symlink swap."""
    data = directory / f"..{generation}"
    data.mkdir()
    (data / name).write_text(value)
    link = directory / "..data.tmp"
    link.symlink_to(data.name)
    link.replace(directory / "..data")


async def test_key_file_rotation_without_failed_request(
    start_gateway: StartGateway, upstream: Upstream, tmp_path: Path
) -> None:
    """Regenerate primary → fallback → new primary in the file → primary again; nothing fails."""
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    _swap_secret(secret_dir, "primary", CANARY_PRIMARY, 1)
    (secret_dir / "primary").symlink_to("..data/primary")
    (secret_dir / "secondary").write_text(CANARY_SECONDARY)
    gw = await start_gateway(
        {
            "CIGW_SUBSCRIPTION_KEY": None,
            "CIGW_SUBSCRIPTION_KEY_SECONDARY": None,
            "CIGW_SUBSCRIPTION_KEY_FILE": str(secret_dir / "primary"),
            "CIGW_SUBSCRIPTION_KEY_SECONDARY_FILE": str(secret_dir / "secondary"),
            "CIGW_KEY_RELOAD_INTERVAL": "0.2",
        }
    )
    statuses: list[int] = []
    stop = asyncio.Event()

    async def traffic() -> None:
        while not stop.is_set():
            statuses.append(await _status(gw))
            await asyncio.sleep(0.01)

    driver = asyncio.ensure_future(traffic())
    await asyncio.sleep(0.1)
    new_primary = upstream.keys.regenerate("primary")
    await asyncio.sleep(0.3)
    assert upstream.seen[-1].header_values("Ocp-Apim-Subscription-Key") == [CANARY_SECONDARY]
    await asyncio.to_thread(_swap_secret, secret_dir, "primary", new_primary, 2)
    await eventually(
        lambda: upstream.seen[-1].header_values("Ocp-Apim-Subscription-Key") == [new_primary]
    )
    await asyncio.sleep(0.1)
    stop.set()
    await driver
    assert statuses
    assert set(statuses) == {200}
    metrics = await gw.metrics_text()
    assert 'cigw_subscription_key_reloads_total{route="/"} 1.0' in metrics
    assert 'cigw_subscription_key_active{route="/",slot="primary"} 1.0' in metrics
