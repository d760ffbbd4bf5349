"""`$batch` requests: parts' absolute URLs that name the gateway rewritten to the upstream.

Clients such as Microsoft's Dataverse SDK write each `$batch` part's request line with an
absolute URL on the service root they were given, which here is the gateway's
(`POST https://gw:8443/dataverse/api/data/v9.2/accounts HTTP/1.1`). The upstream refuses a
part that names another host, so on a route with `rewrite_links` the reverse of the answer
side's rewriting is applied to the request body: an absolute part URL that starts with the
gateway's address as the caller used it (the listener's scheme, the caller's `Host`, the
route's prefix) gets the route's upstream origin and base path instead, and a part's `Host`
header naming the caller's `Host` beside such a URL gets the upstream's authority.

Why this cannot redirect traffic: the gateway only ever sends to the route's upstream (its
client is bound to one origin); the body is data for that upstream. Only URLs naming the
gateway itself are changed, and only into the upstream's own address; a URL naming any other
host passes unchanged, for the upstream to refuse. Relative URLs and `$1` Content-ID
references pass unchanged. A body in which nothing matches is passed on byte for byte.
"""

from __future__ import annotations

import re
from typing import Final

from yarl import URL

from gateway.links import boundary_of, part_header, valid_host

# A $batch request larger than this passes unchanged (the answer side's bound).
BATCH_REQUEST_LIMIT: Final = 16 * 1024 * 1024
_HEAD_END: Final = re.compile(rb"\r?\n\r?\n")
_LINE_END: Final = re.compile(rb"\r?\n")


def is_batch(method: str, raw_path: str) -> bool:
    """The cheap check on the request path: a POST whose path ends in `$batch`."""
    if method != "POST":
        return False
    path = raw_path.partition("?")[0]
    return path.endswith("$batch") or path[-8:].lower() == "%24batch"


def multipart_boundary(content_type: str | None) -> str | None:
    """The boundary of a multipart/mixed body, or None for any other media type."""
    if content_type is None:
        return None
    if content_type.split(";", 1)[0].strip().lower() != "multipart/mixed":
        return None
    return boundary_of(content_type)


class BatchRequestRewriter:
    """One route's rewriting of `$batch` requests: built once, applied per request."""

    def __init__(self, upstream_url: URL, prefix: str) -> None:
        origin = upstream_url.origin()
        self.upstream_base = str(origin) + upstream_url.raw_path.rstrip("/")
        self.upstream_authority = origin.raw_authority.encode("latin-1")
        self.prefix_stem = prefix.rstrip("/")

    def rewrite(self, body: bytes, boundary: str, scheme: str, host: str | None) -> bytes | None:
        """The body with the parts' gateway URLs rewritten, or None when nothing changed
        (or `host` is not a plain host[:port]: then nothing names the gateway knowably)."""
        if host is None or not valid_host(host):
            return None
        # Scheme and host compare case-insensitively; the prefix as it is (paths are
        # case-sensitive). The URL must continue with "/", "?", "#" or end there.
        gateway = rf"(?i:{re.escape(scheme)}://{re.escape(host)}){re.escape(self.prefix_stem)}"
        parts = _Parts(
            re.compile(gateway.encode() + rb"(?=[/?#]|\Z)"),
            self.upstream_base.encode(),
            host.encode().lower(),
            self.upstream_authority,
        )
        rewritten = parts.multipart(body, boundary.encode())
        return rewritten if parts.changed else None


class _Parts:
    """One request's walk through its parts (nested change sets included)."""

    __slots__ = ("authority", "changed", "gateway", "host", "upstream")

    def __init__(self, gateway: re.Pattern[bytes], upstream: bytes, host: bytes, authority: bytes):
        self.gateway, self.upstream, self.host, self.authority = gateway, upstream, host, authority
        self.changed = False

    def multipart(self, body: bytes, boundary: bytes) -> bytes:
        # A delimiter is "--boundary" at the start of a line, then optional "--" (the close
        # delimiter) and whitespace to the line's end (RFC 2046 §5.1.1, as the email package
        # reads it); the same bytes inside a line are content.
        delimiter = re.compile(
            rb"(?:\A|(?<=\n))--" + re.escape(boundary) + rb"(--)?(?=[ \t]*(?:\r?\n|\Z))"
        )
        out: list[bytes] = []
        content_start: int | None = None
        for found in delimiter.finditer(body):
            if content_start is None:
                out.append(body[: found.start()])  # the preamble
            else:
                out.append(self.part(body[content_start : found.start()]))
            out.append(found.group(0))
            content_start = found.end()
            if found.group(1):
                out.append(body[content_start:])  # the epilogue
                return b"".join(out)
        if content_start is None:
            return body
        out.append(self.part(body[content_start:]))  # no close delimiter
        return b"".join(out)

    def part(self, piece: bytes) -> bytes:
        """One body part: the rest of its delimiter line, its headers, its content."""
        head = _HEAD_END.search(piece)
        if head is None:
            return piece
        part_headers, content = piece[: head.end()], piece[head.end() :]
        part_type = part_header(part_headers, b"content-type")
        if part_type.lower().startswith("multipart/mixed"):
            inner = boundary_of(part_type)  # boundaries are case-sensitive: the raw value
            if inner:
                content = self.multipart(content, inner.encode("latin-1"))
        elif part_type.lower().startswith("application/http"):
            content = self.request(content)
        return part_headers + content

    def request(self, message: bytes) -> bytes:
        """An HTTP request in a part: its request line's URL, then its Host header."""
        start = _LINE_END.search(message)
        # The part's content may begin with blank lines before the request line.
        offset = 0
        while start is not None and start.start() == offset:
            offset = start.end()
            start = _LINE_END.search(message, offset)
        line_end = start.start() if start is not None else len(message)
        request_line = message[offset:line_end]
        method, space, rest = request_line.partition(b" ")
        target, space2, version = rest.rpartition(b" ")
        if not space or not space2 or not version.startswith(b"HTTP/"):
            return message
        match = self.gateway.match(target)
        if match is None:
            return message
        self.changed = True
        new_line = method + b" " + self.upstream + target[match.end() :] + b" " + version
        head_end = _HEAD_END.search(message, offset)
        head_stop = head_end.start() if head_end is not None else len(message)
        headers = message[line_end:head_stop]
        return message[:offset] + new_line + self._host(headers) + message[head_stop:]

    def _host(self, headers: bytes) -> bytes:
        """A Host header naming the gateway (beside a rewritten URL) names the upstream."""
        lines = headers.split(b"\n")
        for number, line in enumerate(lines):
            name, colon, value = line.partition(b":")
            if colon and name.strip().lower() == b"host" and value.strip().lower() == self.host:
                end = b"\r" if line.endswith(b"\r") else b""
                lines[number] = name + b": " + self.authority + end
        return b"\n".join(lines)
