"""HTTPS on the proxy listener: TLS 1.2+, ALPN http/1.1, certificates rotated without a restart."""

from __future__ import annotations

import asyncio
import io
import ssl
import warnings
from pathlib import Path

import pytest
import trustme

from gateway import config
from gateway.errors import ConfigError
from tests.conftest import RunningGateway, StartGateway
from tests.poll import eventually
from tests.process import run_cli
from tests.servers.upstream import Upstream
from tests.tls_files import (
    KubeletSecretVolume,
    client_context,
    replace_by_rename,
    write_pair,
)

GET = b"GET /echo/tls HTTP/1.1\r\nHost: gateway\r\n\r\n"


class TLSConnection:
    """One kept-alive HTTPS connection to the proxy listener."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, context: ssl.SSLContext) -> TLSConnection:
        """Connect and complete the handshake."""
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="127.0.0.1"
        )
        return cls(reader, writer)

    @property
    def tls(self) -> ssl.SSLObject:
        """The negotiated session."""
        session: ssl.SSLObject = self.writer.get_extra_info("ssl_object")
        return session

    def peer_der(self) -> bytes:
        """The certificate the server presented."""
        der = self.tls.getpeercert(binary_form=True)
        assert der is not None
        return der

    async def get(self) -> int:
        """Send a GET on this connection and read the answer; its status."""
        self.writer.write(GET)
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await self.reader.readexactly(length)
        return int(head.split(b" ", 2)[1])

    async def close(self) -> None:
        """Close our end."""
        self.writer.close()
        await self.writer.wait_closed()


async def presented(port: int, context: ssl.SSLContext) -> bytes:
    """The certificate a new handshake gets."""
    connection = await TLSConnection.open(port, context)
    try:
        return connection.peer_der()
    finally:
        await connection.close()


@pytest.fixture
async def https_gateway(
    start_gateway: StartGateway, ca: trustme.CA, tmp_path: Path
) -> tuple[RunningGateway, Path, Path, bytes]:
    """A gateway serving HTTPS from a pair of files in tmp_path: (gateway, cert, key, leaf DER)."""
    cert, key, der = write_pair(ca, tmp_path)
    gw = await start_gateway({"CIGW_TLS_CERT_FILE": str(cert), "CIGW_TLS_KEY_FILE": str(key)})
    return gw, cert, key, der


async def test_https_forwarding_with_alpn_http11(
    https_gateway: tuple[RunningGateway, Path, Path, bytes], ca: trustme.CA, upstream: Upstream
) -> None:
    """Requests over HTTPS are forwarded; ALPN picks http/1.1 even when h2 is offered first."""
    gw, _, _, der = https_gateway
    context = client_context(ca)
    context.set_alpn_protocols(["h2", "http/1.1"])
    connection = await TLSConnection.open(gw.gateway.proxy_port, context)
    try:
        assert connection.tls.selected_alpn_protocol() == "http/1.1"
        assert connection.tls.version() in ("TLSv1.2", "TLSv1.3")
        assert connection.peer_der() == der
        assert await connection.get() == 200
    finally:
        await connection.close()
    assert upstream.seen[-1].raw_path == "/v1/echo/tls"
    (event,) = [e for e in gw.gateway.metrics.registry.collect() if e.name == "cigw_tls_reloads"]
    assert all(sample.value == 0 for sample in event.samples if sample.name.endswith("_total"))


async def test_plain_http_to_the_https_listener_gets_no_answer(
    https_gateway: tuple[RunningGateway, Path, Path, bytes], upstream: Upstream
) -> None:
    """A plaintext request to the HTTPS listener is never forwarded (the handshake fails)."""
    gw, *_ = https_gateway
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.proxy_port)
    writer.write(b"GET /echo/plain HTTP/1.1\r\nHost: gateway\r\n\r\n")
    try:
        answer = await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        answer = b""
    finally:
        writer.close()
    assert not answer.startswith(b"HTTP/")
    assert upstream.seen == []


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1], ids=["tls1.0", "tls1.1"]
)
async def test_tls_below_12_is_refused(
    https_gateway: tuple[RunningGateway, Path, Path, bytes],
    ca: trustme.CA,
    version: ssl.TLSVersion,
) -> None:
    """A client offering at most TLS 1.0 or 1.1 is refused; it works against a lax server."""
    gw, *_ = https_gateway
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the point: an outdated client
        old = client_context(ca)
        old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        old.maximum_version = version
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        # The control: this machine's OpenSSL can speak the old version, so only the
        # gateway can be the one refusing below.
        lax = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("127.0.0.1").configure_cert(lax)
        lax.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        lax.set_ciphers("DEFAULT:@SECLEVEL=0")
        control = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", 0, ssl=lax)
        async with control:
            connection = await TLSConnection.open(control.sockets[0].getsockname()[1], old)
            assert connection.tls.version() == {769: "TLSv1", 770: "TLSv1.1"}[version.value]
            connection.writer.close()
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            await TLSConnection.open(gw.gateway.proxy_port, old)
    exact = client_context(ca)
    exact.minimum_version = exact.maximum_version = ssl.TLSVersion.TLSv1_2
    connection = await TLSConnection.open(gw.gateway.proxy_port, exact)
    assert connection.tls.version() == "TLSv1.2"
    await connection.close()


async def test_rotation_by_rename_keeps_connections(
    https_gateway: tuple[RunningGateway, Path, Path, bytes], ca: trustme.CA
) -> None:
    """A pair renamed into place is served to new handshakes within 10 s; old connections work."""
    gw, cert, key, old_der = https_gateway
    context = client_context(ca)
    kept = await TLSConnection.open(gw.gateway.proxy_port, context)
    try:
        assert await kept.get() == 200
        new_der = replace_by_rename(ca, cert, key)
        assert new_der != old_der
        await eventually(
            lambda: _presents(gw.gateway.proxy_port, context, new_der), within=10, step=0.2
        )
        assert kept.peer_der() == old_der
        assert await kept.get() == 200
    finally:
        await kept.close()


async def test_rotation_by_symlink_swap_keeps_connections(
    start_gateway: StartGateway, ca: trustme.CA, tmp_path: Path
) -> None:
    """A kubelet-style ..data symlink swap is served to new handshakes within 10 s."""
    volume = KubeletSecretVolume(tmp_path)
    old_der = volume.publish_leaf(ca)
    gw = await start_gateway(
        {"CIGW_TLS_CERT_FILE": str(volume.cert), "CIGW_TLS_KEY_FILE": str(volume.key)}
    )
    context = client_context(ca)
    port = gw.gateway.proxy_port
    kept = await TLSConnection.open(port, context)
    try:
        assert kept.peer_der() == old_der
        new_der = volume.publish_leaf(ca)
        await eventually(lambda: _presents(port, context, new_der), within=10, step=0.2)
        assert await kept.get() == 200
    finally:
        await kept.close()


async def test_bad_pair_on_reload_keeps_the_previous(
    https_gateway: tuple[RunningGateway, Path, Path, bytes],
    ca: trustme.CA,
    tmp_path: Path,
    log_output: io.StringIO,
) -> None:
    """A certificate whose key does not match is logged and refused; the old pair is served."""
    gw, cert, _, old_der = https_gateway
    other_cert, _, _ = write_pair(ca, tmp_path, "other")
    cert.write_bytes(other_cert.read_bytes())  # the new certificate, the old key: no pair

    async def failure_counted() -> bool:
        return 'cigw_tls_reloads_total{outcome="failure"} 1.0' in await gw.metrics_text()

    await eventually(failure_counted, within=10, step=0.2)
    assert await presented(gw.gateway.proxy_port, client_context(ca)) == old_der
    assert '"tls_reload_failed"' in str(log_output.getvalue())


def _presents(port: int, context: ssl.SSLContext, der: bytes) -> asyncio.Future[bool]:
    async def check() -> bool:
        return await presented(port, context) == der

    return asyncio.ensure_future(check())


@pytest.mark.parametrize(
    "damage",
    ["mismatched-key", "not-pem", "cert-only"],
)
def test_bad_pair_is_a_configuration_error(
    gateway_env: dict[str, str], ca: trustme.CA, tmp_path: Path, damage: str
) -> None:
    """A pair that does not load is one ConfigError naming both variables; one file alone too."""
    cert, key, _ = write_pair(ca, tmp_path)
    env = {**gateway_env, "CIGW_TLS_CERT_FILE": str(cert), "CIGW_TLS_KEY_FILE": str(key)}
    if damage == "mismatched-key":
        _, other_key, _ = write_pair(ca, tmp_path, "other")
        env["CIGW_TLS_KEY_FILE"] = str(other_key)
    elif damage == "not-pem":
        cert.write_bytes(b"not a certificate\n")
    else:
        del env["CIGW_TLS_KEY_FILE"]
    with pytest.raises(ConfigError) as caught:
        config.load(env)
    text = str(caught.value)
    assert "CIGW_TLS_CERT_FILE" in text
    assert "CIGW_TLS_KEY_FILE" in text
    assert "PRIVATE KEY" not in text


async def test_bad_pair_exits_2_at_start(
    gateway_env: dict[str, str], ca: trustme.CA, tmp_path: Path
) -> None:
    """`serve` with a certificate and a key that do not match exits 2 and says why."""
    cert, _, _ = write_pair(ca, tmp_path)
    _, other_key, _ = write_pair(ca, tmp_path, "other")
    env = {**gateway_env, "CIGW_TLS_CERT_FILE": str(cert), "CIGW_TLS_KEY_FILE": str(other_key)}
    code, _, err = await run_cli(env, "serve")
    assert code == 2
    assert "CIGW_TLS_CERT_FILE/CIGW_TLS_KEY_FILE" in err
    assert "Traceback" not in err
