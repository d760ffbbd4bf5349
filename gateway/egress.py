"""Egress: whether a destination is reached directly or through a forward proxy, decided once.

The token endpoint (through requests) and the upstream client (our own) both ask
`Egress.proxy_for`, so they can never disagree. The environment is read the way curl and
requests read it (HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, NO_PROXY in either case, lower case
first); every deliberate difference is listed in SECURITY.md ("Egress proxy"), and
tests/unit/test_egress_reference.py compares the NO_PROXY matching with requests'.

Only gateway/config.py builds an Egress (it is the one reader of the environment); this
module parses and decides, and reads nothing itself.
"""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import quote, unquote, urlsplit

from gateway.credentials import Secret

# CIGW_EGRESS_PROXY's value that means "no proxy for anything, whatever the environment says".
NO_PROXY_AT_ALL: Final = "none"
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ProxyURLError(ValueError):
    """A proxy URL the gateway cannot use; the message never quotes the URL (credentials)."""


@dataclass(frozen=True, slots=True)
class ProxyServer:
    """A forward proxy reached over plain HTTP, with optional Basic credentials."""

    host: str
    port: int
    username: Secret | None = field(default=None, repr=False)
    password: Secret | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        """host:port, an IPv6 host in brackets; never the credentials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def on_loopback(self) -> bool:
        """True when the proxy runs on this host (its 127.0.0.1 is ours)."""
        return is_loopback(self.host)

    def authorization(self) -> str | None:
        """The Proxy-Authorization value (RFC 9110 §11.7.1, Basic), or None without credentials."""
        if self.username is None:
            return None
        password = self.password.reveal() if self.password else ""
        pair = f"{self.username.reveal()}:{password}".encode("ascii")
        return "Basic " + base64.b64encode(pair).decode("ascii")

    def url_with_credentials(self) -> str:
        """The proxy URL requests takes, credentials included: only for requests' `proxies`."""
        if self.username is None:
            return f"http://{self.address}"
        password = self.password.reveal() if self.password else ""
        userinfo = f"{quote(self.username.reveal(), safe='')}:{quote(password, safe='')}"
        return f"http://{userinfo}@{self.address}"

    def secrets(self) -> tuple[str, ...]:
        """The credential strings, for the log redactor."""
        return tuple(s.reveal() for s in (self.username, self.password) if s is not None)

    def __str__(self) -> str:
        credentials = "(credentials redacted)@" if self.username is not None else ""
        return f"http://{credentials}{self.address}"

    def __repr__(self) -> str:
        return f"ProxyServer({self!s})"


def parse_proxy_url(raw: str) -> ProxyServer:
    """A proxy URL as curl and requests accept it (`host:port` alone means http://)."""
    text = raw.strip()
    if "://" not in text:
        text = "http://" + text  # curl and requests both assume http:// for a bare host:port
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ProxyURLError(
            "must be a proxy URL such as http://proxy.example.com:3128 (bad host or port)"
        ) from None
    scheme = parts.scheme.lower()
    if scheme == "https":
        raise ProxyURLError(
            "names an https:// proxy (TLS to the proxy), which the gateway does not support; "
            "use the proxy's plain http:// port (traffic to https destinations is still "
            "end-to-end TLS through CONNECT)"
        )
    if scheme != "http":
        raise ProxyURLError(f"names a {scheme} proxy; only http:// forward proxies are supported")
    if not parts.hostname:
        raise ProxyURLError("must name the proxy's host, e.g. http://proxy.example.com:3128")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ProxyURLError("must be only scheme://[user:password@]host[:port], without a path")
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    for value in (username, password):
        # Basic credentials are ASCII here, so requests (latin-1) and the upstream client
        # send the same bytes; ':' cannot be in a Basic user name (RFC 7617 §2).
        if value is not None and not (value.isascii() and value.isprintable()):
            raise ProxyURLError("credentials must be printable ASCII (percent-encoded in the URL)")
    if username is not None and ":" in username:
        raise ProxyURLError("user name must not contain ':'")
    return ProxyServer(
        host=_normal_host(parts.hostname),
        # Without a port, port 80, as requests (urllib3) does; curl would use 1080.
        port=port if port is not None else 80,
        username=Secret(username) if username is not None else None,
        password=Secret(password) if password is not None else None,
    )


# --------------------------------------------------------------------------- NO_PROXY


@dataclass(frozen=True, slots=True)
class _Domain:
    name: str
    port: int | None


@dataclass(frozen=True, slots=True)
class _Network:
    network: IPNetwork
    port: int | None


@dataclass(frozen=True, slots=True)
class NoProxy:
    """A parsed NO_PROXY list: hosts and domain suffixes, IP addresses, CIDR ranges, or `*`."""

    everything: bool = False
    domains: tuple[_Domain, ...] = ()
    networks: tuple[_Network, ...] = ()
    text: str = field(default="", compare=False)  # as given, for check-config

    @classmethod
    def parse(cls, raw: str) -> NoProxy:
        """Comma-separated entries; entries that are not a host, address or range are ignored."""
        domains: list[_Domain] = []
        networks: list[_Network] = []
        for item in raw.split(","):
            entry = item.strip()
            if entry == "*":
                # Anywhere in the list, as Go's net/http reads it; curl and requests only
                # honour a `*` that is the whole value (SECURITY.md).
                return cls(everything=True, text=raw)
            parsed = _parse_entry(entry)
            if isinstance(parsed, _Domain):
                domains.append(parsed)
            elif isinstance(parsed, _Network):
                networks.append(parsed)
        return cls(domains=tuple(domains), networks=tuple(networks), text=raw)

    def bypasses(self, host: str, port: int | None) -> bool:
        """True when `host` (a name or an IP address, no brackets) on `port` goes direct."""
        if self.everything:
            return True
        host = _normal_host(host)
        address = _ip(host)
        if address is not None:
            # Addresses match addresses and ranges only, never a name's suffix.
            return any(
                address.version == entry.network.version
                and address in entry.network
                and entry.port in (None, port)
                for entry in self.networks
            )
        return any(
            (host == entry.name or host.endswith("." + entry.name)) and entry.port in (None, port)
            for entry in self.domains
        )


def _parse_entry(entry: str) -> _Domain | _Network | None:
    if not entry or any(c.isspace() for c in entry):
        return None
    port_text: str | None = None
    if entry.startswith("["):  # [IPv6] or [IPv6]:port
        host, bracket, rest = entry[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:] if rest else None
    elif entry.count(":") == 1:
        host, _, port_text = entry.partition(":")
    else:
        host = entry  # a name, an IPv4 address or range, or a bare IPv6 address or range
    port: int | None = None
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            return None
        port = int(port_text)
    if "/" in host:
        try:
            return _Network(ipaddress.ip_network(host, strict=False), port)
        except ValueError:
            return None
    address = _ip(host)
    if address is not None:
        return _Network(ipaddress.ip_network(address), port)
    # `.example.com`, `*.example.com` and `example.com` all mean the domain and every
    # name under it (curl and requests strip the leading dot the same way).
    name = _normal_host(host.removeprefix("*").lstrip("."))
    if not name or "*" in name:
        return None
    return _Domain(name, port)


# --------------------------------------------------------------------------- the decision


@dataclass(frozen=True, slots=True)
class Egress:
    """How every outgoing connection leaves: which proxy, if any, for which destination."""

    https_proxy: ProxyServer | None = None
    http_proxy: ProxyServer | None = None
    all_proxy: ProxyServer | None = None
    no_proxy: NoProxy = field(default_factory=NoProxy)
    # Where each proxy came from (slot, variable name), so check-config can say it.
    sources: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    def proxy_for(self, scheme: str, host: str, port: int | None) -> ProxyServer | None:
        """The proxy that `scheme://host:port` is reached through, or None for direct."""
        return self._decide(scheme, host, port)[0]

    def describe(self, scheme: str, host: str, port: int | None) -> str:
        """`direct` or `proxy host:port`: the decision as check-config and the log state it."""
        proxy = self.proxy_for(scheme, host, port)
        return "direct" if proxy is None else f"proxy {proxy.address}"

    def explain(self, scheme: str, host: str, port: int | None) -> str:
        """The decision with its reason, for check-config."""
        proxy, reason = self._decide(scheme, host, port)
        decision = "direct" if proxy is None else f"proxy {proxy.address}"
        return f"{decision} ({reason})"

    def secrets(self) -> tuple[str, ...]:
        """Every proxy credential, for the log redactor."""
        proxies = {p for p in (self.https_proxy, self.http_proxy, self.all_proxy) if p}
        return tuple(secret for proxy in proxies for secret in proxy.secrets())

    def _decide(self, scheme: str, host: str, port: int | None) -> tuple[ProxyServer | None, str]:
        slot = "https" if scheme == "https" else "http"
        proxy = self.https_proxy if slot == "https" else self.http_proxy
        if proxy is None:
            slot, proxy = "all", self.all_proxy
        sources = dict(self.sources)
        if proxy is None:
            return None, "CIGW_EGRESS_PROXY=none" if "none" in sources else "no proxy configured"
        if self.no_proxy.bypasses(host, port):
            return None, f"{sources.get('no', 'NO_PROXY')} lists it"
        if is_loopback(host) and not proxy.on_loopback:
            # To a proxy on another host, 127.0.0.1 names that host: the request (a client
            # secret, for the token endpoint) would reach a different machine's local
            # service. Go's net/http never proxies loopback either; a proxy on this host
            # shares our loopback, so it may carry loopback traffic.
            return None, "loopback destination, proxy on another host"
        return proxy, f"from {sources.get(slot, slot)}"


def explicit_egress(raw: str) -> Egress:
    """CIGW_EGRESS_PROXY's value: one proxy for every destination, or `none`; no NO_PROXY."""
    if raw.strip().lower() == NO_PROXY_AT_ALL:
        return Egress(sources=(("none", "CIGW_EGRESS_PROXY"),))
    proxy = parse_proxy_url(raw)
    source = (("https", "CIGW_EGRESS_PROXY"), ("http", "CIGW_EGRESS_PROXY"))
    return Egress(https_proxy=proxy, http_proxy=proxy, sources=source)


def _normal_host(host: str) -> str:
    return host.strip().removeprefix("[").removesuffix("]").rstrip(".").lower()


def _ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1)."""
    host = _normal_host(host)
    if host == "localhost":
        return True
    address = _ip(host)
    return address is not None and address.is_loopback
