"""Links that lead back: absolute upstream URLs in answers rewritten to the gateway's address.

Dataverse answers name its own host in `@odata.nextLink` paging, `Location` and
`OData-EntityId`; a client that follows them would bypass the gateway and fail without
credentials. On a route with `rewrite_links`, a URL that starts with the route's upstream
origin and base path gets the gateway's address as the caller used it instead (the
listener's scheme, the caller's `Host`, the route's prefix). Only the authority of the
rewritten links comes from the caller, and only when `Host` is a plain `host[:port]`;
the destination never does.

The JSON rewriting streams: it never holds more than one read plus a short tail, and it
touches nothing but the values of the OData annotations named below, leaving every other
byte as it came. Why it is safe to hand-write (held to `json.loads` by a property test,
tests/unit/test_links.py): a candidate is found by one regular-expression search with a
literal start (`@odata.…"`, colon, `"`, the upstream's base), so no byte is looked at in
Python. In valid JSON a quote that no backslash escapes is a string delimiter, and one
followed by a name, `@odata.nextLink"` and a colon can only open a key, so checking that
the key's opening quote is unescaped is exact without following the document's
structure; the quote after the annotation's name is unescaped by the pattern itself.
Deliberate differences from "parse, rewrite, serialise" are listed in SECURITY.md.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from multidict import CIMultiDict
from yarl import URL

# The annotations whose values are links back into the API (OData JSON format v4.01 §4.5).
ANNOTATIONS: Final = ("@odata.nextLink", "@odata.deltaLink", "@odata.id", "@odata.editLink")
LINK_HEADERS: Final = ("Location", "Content-Location", "OData-EntityId")
MAX_KEY_NAME: Final = 256  # bytes of a property name before an annotation (`x@odata.nextLink`)
MAX_SPACE: Final = 64  # whitespace bytes around a key's colon
BATCH_LIMIT: Final = 16 * 1024 * 1024  # a $batch answer larger than this passes unchanged

# host[:port] as RFC 9110 allows it in Host, minus what a link must never carry: a
# registered name of letters, digits, '-' and '.', an IPv4 address, or a bracketed IPv6.
_HOST: Final = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
    r"[A-Za-z0-9])?)*\.?|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?"
)
_BOUNDARY: Final = re.compile(r'boundary=(?:"([^"]{1,200})"|([^\s;"]{1,200}))', re.IGNORECASE)
_HEAD_END: Final = re.compile(rb"\r?\n\r?\n")


def valid_host(value: str | None) -> bool:
    """True when `value` (a Host header) is a plain `host[:port]`, fit to put in a link."""
    return value is not None and _HOST.fullmatch(value) is not None


class LinkRewriter:
    """One route's rewriting: what its upstream's links look like, built once at start."""

    def __init__(self, upstream_url: URL, prefix: str) -> None:
        origin = upstream_url.origin()
        scheme, host, port = origin.scheme, origin.host or "", origin.port
        default = {"http": 80, "https": 443}.get(scheme)
        # Scheme and host are case-insensitive (RFC 3986 §6.2.2.1); a default port may be
        # written or left out; the base path is compared as it is.
        port_part = rf"(?::{default})?" if port == default else rf":{port}"
        base_path = upstream_url.raw_path.rstrip("/")
        text = rf"(?i:{re.escape(scheme)}://{re.escape(host)}){port_part}{re.escape(base_path)}"
        self._base = re.compile(text + r"(?=[/?#]|\Z)")
        space = rb"[ \t\r\n]{0,%d}" % MAX_SPACE
        names = b"|".join(re.escape(name.removeprefix("@").encode()) for name in ANNOTATIONS)
        # From the annotation's "@" to the end of the upstream's base in its value.
        self._candidate = re.compile(
            rb'@(?:%s)"%s:%s"(%s)(?=[/?#"])' % (names, space, space, text.encode())
        )
        longest = max(len(name) for name in ANNOTATIONS) + 2 * MAX_SPACE + 3
        longest += len(str(origin)) + 8 + len(base_path.encode()) + 1
        # Bytes kept back at the end of each read: a candidate cut by the read's end, with
        # its key's opening quote, lies wholly inside them.
        self.tail = longest + MAX_KEY_NAME + 2
        self.prefix_stem = prefix.rstrip("/")

    def for_answer(self, scheme: str, host: str | None) -> Links | None:
        """The rewriting for one answer to a caller that used `scheme` and `host`; None
        when `host` is not a plain host[:port] (that answer's links stay as they are)."""
        if host is None or not valid_host(host):
            return None
        return Links(self, f"{scheme}://{host}{self.prefix_stem}")


@dataclass(slots=True)
class Links:
    """One answer's rewriting: the upstream's base becomes `replacement`."""

    rewriter: LinkRewriter
    replacement: str

    def url(self, value: str) -> str:
        """`value` with the upstream's base replaced, or unchanged when it does not start so."""
        match = self.rewriter._base.match(value)
        if match is None:
            return value
        return self.replacement + value[match.end() :]

    def headers(self, headers: CIMultiDict[str]) -> None:
        """Rewrite Location, Content-Location and OData-EntityId in place."""
        for name in LINK_HEADERS:
            if name in headers:
                values = headers.getall(name)
                del headers[name]
                for value in values:
                    headers.add(name, self.url(value))

    def body_kind(self, headers: Iterable[tuple[str, str]]) -> tuple[str, str] | None:
        """("json", "") or ("batch", its boundary) when the body can be rewritten, else None
        (another media type, or compressed)."""
        content_type, encoding = "", "identity"
        for name, value in headers:
            lower = name.lower()
            if lower == "content-type":
                content_type = value
            elif lower == "content-encoding":
                encoding = value.strip().lower() or "identity"
        if encoding != "identity":
            return None  # compressed answers pass unchanged
        media = content_type.split(";", 1)[0].strip().lower()
        if media == "application/json" or media.endswith("+json"):
            return ("json", "")
        if media == "multipart/mixed":
            boundary = boundary_of(content_type)
            return ("batch", boundary) if boundary else None
        return None

    def json(self) -> JsonLinks:
        """A streaming rewriter for one JSON body."""
        return JsonLinks(self.rewriter, self.replacement.encode())

    def batch(self, body: bytes, boundary: str) -> bytes:
        """A whole multipart/mixed ($batch) answer with its parts' links rewritten."""
        return _multipart(self, body, boundary.encode())


class JsonLinks:
    """Feeds a JSON body through in reads; returns what may be sent so far."""

    __slots__ = ("_buffer", "_candidate", "_odd", "_replacement", "_skip", "_tail")

    def __init__(self, rewriter: LinkRewriter, replacement: bytes) -> None:
        self._candidate = rewriter._candidate
        self._tail = rewriter.tail
        self._replacement = replacement
        self._buffer = b""
        self._odd = False  # whether what was sent ends in an odd run of backslashes
        self._skip = 0  # candidates starting before this were already decided

    def feed(self, data: bytes) -> bytes:
        """The next read; returns the bytes that can be sent now (possibly none)."""
        return self._run(self._buffer + data if self._buffer else data, final=False)

    def end(self) -> bytes:
        """The body ended: everything still held back."""
        return self._run(self._buffer, final=True)

    def _run(self, buffer: bytes, *, final: bool) -> bytes:
        out: list[bytes] = []
        emitted = decided = 0
        for match in self._candidate.finditer(buffer, self._skip):
            at = match.start()
            decided = match.end()
            quote = buffer.rfind(b'"', max(0, at - MAX_KEY_NAME - 1), at)
            if quote < 0 or buffer.find(b"\\", quote, at) != -1 or self._escaped(buffer, quote):
                continue  # no plain, unescaped key string in reach: not an annotation key
            start, end = match.span(1)
            out.append(buffer[emitted:start])
            out.append(self._replacement)
            emitted = end
        if final:
            out.append(buffer[emitted:])
            self._buffer = b""
            return b"".join(out)
        split = max(len(buffer) - self._tail, emitted)
        out.append(buffer[emitted:split])
        self._odd = self._odd_run_before(buffer, split)
        self._buffer = buffer[split:]
        self._skip = max(0, decided - split)
        return b"".join(out)

    def _escaped(self, buffer: bytes, quote: int) -> bool:
        """Whether the quote at `quote` is escaped: an odd run of backslashes before it."""
        return self._odd_run_before(buffer, quote)

    def _odd_run_before(self, buffer: bytes, position: int) -> bool:
        run_start = position
        while run_start > 0 and buffer[run_start - 1] == 0x5C:
            run_start -= 1
        odd = (position - run_start) & 1 == 1
        return odd ^ self._odd if run_start == 0 else odd


def boundary_of(content_type: str) -> str | None:
    found = _BOUNDARY.search(content_type)
    return (found.group(1) or found.group(2)) if found else None


def _multipart(links: Links, body: bytes, boundary: bytes) -> bytes:
    """Each part of a multipart body rewritten: nested multiparts, HTTP messages in parts."""
    delimiter = b"--" + boundary
    pieces = body.split(delimiter)
    for index in range(1, len(pieces)):
        piece = pieces[index]
        if piece.startswith(b"--"):
            break  # the close delimiter: the rest is the epilogue
        head = _HEAD_END.search(piece)
        if head is None:
            continue
        part_headers, content = piece[: head.end()], piece[head.end() :]
        part_type = part_header(part_headers, b"content-type")
        if part_type.lower().startswith("multipart/mixed"):
            inner = boundary_of(part_type)  # boundaries are case-sensitive: the raw value
            if inner:
                content = _multipart(links, content, inner.encode())
        elif part_type.lower().startswith("application/http"):
            content = _http_message(links, content)
        pieces[index] = part_headers + content
    return delimiter.join(pieces)


def _http_message(links: Links, message: bytes) -> bytes:
    """An HTTP answer inside a $batch part: its link headers and its JSON body rewritten."""
    head = _HEAD_END.search(message)
    if head is None:
        return message
    lines = message[: head.start()].split(b"\n")
    kind = None
    for number, line in enumerate(lines[1:], start=1):
        name, colon, value = line.partition(b":")
        if not colon:
            continue
        lower = name.strip().lower()
        if lower in (b"location", b"content-location", b"odata-entityid"):
            text = value.decode("latin-1")
            stripped = text.strip()
            rewritten = links.url(stripped)
            if rewritten != stripped:
                lines[number] = name + b":" + text.replace(stripped, rewritten, 1).encode("latin-1")
        elif lower == b"content-type":
            media = value.decode("latin-1").split(";", 1)[0].strip().lower()
            kind = "json" if media == "application/json" or media.endswith("+json") else None
    body = message[head.end() :]
    if kind == "json":
        stream = links.json()
        new_body = stream.feed(body) + stream.end()
        if len(new_body) != len(body):
            lines = _fix_length(lines, len(new_body) - len(body))
        body = new_body
    return b"\n".join(lines) + message[head.start() : head.end()] + body


def _fix_length(lines: list[bytes], delta: int) -> list[bytes]:
    fixed = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"content-length" and value.strip().isdigit():
            end = b"\r" if line.endswith(b"\r") else b""
            fixed.append(name + b": " + str(int(value.strip()) + delta).encode() + end)
        else:
            fixed.append(line)
    return fixed


def part_header(head: bytes, name: bytes) -> str:
    """A multipart part's header value by lower-case name (latin-1), or "" when absent."""
    for line in head.split(b"\n"):
        key, colon, value = line.partition(b":")
        if colon and key.strip().lower() == name:
            return value.strip().decode("latin-1")
    return ""
