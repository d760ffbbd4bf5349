"""The upstream client held to h11: the same answer bytes, over real loopback sockets, to both.

Each case is a byte stream an upstream could send and the way its connection ends (a FIN,
a TCP reset, kept open, TLS with or without close_notify). The gateway's client reads it
from a raw server exactly as the gateway does; h11, a well-kept reference parser, is fed
the same bytes. Compared: status, header fields, body bytes, error or not, and whether
the connection may carry another request. h11 knows no TLS: a TLS end without
close_notify is fed to it as no end at all (the bytes stop), since a truncation is not an
end; a TCP reset likewise.

Every difference is either a bug or one of the deliberate ones in DELIBERATE below, each
listed in SECURITY.md; a case that differs in any other way fails the test, and a case
declared to differ that does not also fails (the declaration would be stale).
Hypothesis adds generated answers: CIGW_DIFF_EXAMPLES sets how many (`make fuzz` runs more).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import string
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import h11
import pytest
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from gateway.errors import GatewayError
from gateway.upstream import MAX_HEAD_BYTES, UpstreamClient
from tests.poll import eventually
from tests.servers.raw import BioTls, Peer, RawServer, reset

READ_TIMEOUT = 0.3
ENDINGS = ("fin", "reset", "open", "tls-close_notify", "tls-no-close_notify")
EXAMPLES = int(os.environ.get("CIGW_DIFF_EXAMPLES", "120"))


@dataclass(frozen=True)
class Case:
    """Bytes an upstream sends in answer to one request, and how its connection ends."""

    name: str
    pieces: tuple[bytes, ...]
    ending: str = "fin"
    method: str = "GET"
    deliberate: str | None = None  # the name of the declared difference, if any

    @property
    def data(self) -> bytes:
        """Every byte the upstream sends."""
        return b"".join(self.pieces)


@dataclass(frozen=True)
class Outcome:
    """What a client made of an answer."""

    error: bool
    status: int | None = None
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    reusable: bool = False

    def compared(self) -> tuple[object, ...]:
        """The parts compared: all of them for an answer read whole; for a failure only that it
        failed (whether a head came first depends on how the bytes were split into reads)."""
        if self.error:
            return (True,)
        return (False, self.status, self.headers, self.body, self.reusable)


# --------------------------------------------------------------------------- deliberate


@dataclass(frozen=True)
class Deliberate:
    """A declared difference: the client is stricter (or frames by RFC 9112 where h11 refuses)."""

    why: str

    def holds(self, ours: Outcome, reference: Outcome) -> bool:
        """True when the outcomes differ exactly as declared."""
        raise NotImplementedError


@dataclass(frozen=True)
class Refused(Deliberate):
    """Ours refuses (502) an answer h11 accepts."""

    def holds(self, ours: Outcome, reference: Outcome) -> bool:
        """Ours is an error where h11 read an answer."""
        return ours.error and not reference.error


@dataclass(frozen=True)
class Accepted(Deliberate):
    """Ours reads an answer h11 refuses (h11 supports no transfer coding but chunked)."""

    def holds(self, ours: Outcome, reference: Outcome) -> bool:
        """Ours read an answer where h11 failed."""
        return not ours.error and reference.error


@dataclass(frozen=True)
class Reused(Deliberate):
    """The same answer, but only ours reuses the connection."""

    def holds(self, ours: Outcome, reference: Outcome) -> bool:
        """Equal but for reuse, which only ours allows."""
        return replace(ours, reusable=False).compared() == reference.compared() and (
            ours.reusable and not reference.reusable
        )


@dataclass(frozen=True)
class NotReused(Deliberate):
    """The same answer, but ours does not reuse the connection."""

    def holds(self, ours: Outcome, reference: Outcome) -> bool:
        """Equal but for reuse, which only h11 allows."""
        return replace(ours, reusable=True).compared() == reference.compared() and (
            reference.reusable and not ours.reusable
        )


DELIBERATE: dict[str, Deliberate] = {
    "head-not-reused": NotReused(
        "after an answer to HEAD the connection is closed: llhttp does not know the method"
        " and would read a body announced by Content-Length"
    ),
    "crlf-between-answers": Reused(
        "an empty line after a complete answer is skipped (llhttp; RFC 9112 §2.2 lets a"
        " recipient ignore it); h11 keeps it as the start of the next answer"
    ),
    "http-version": Refused("a status line that is not HTTP/1.0 or HTTP/1.1 is refused"),
    "content-length-with-chunked": Refused(
        "Content-Length together with Transfer-Encoding is refused (RFC 9112 §6.3: ought to"
        " be handled as an error, a sign of smuggling); h11 lets Transfer-Encoding win"
    ),
    "status-above-599": Refused("RFC 9110 §15: a status is 100-599; h11 takes any 3 digits"),
    "interim-with-framing": Refused(
        "a 104-199 announcing a body is invalid; h11 ignores its framing and reads the bytes"
        " as the next answer (bytes a forged answer could hide in)"
    ),
    "non-utf8-field-value": Refused("a header value that is not UTF-8 is refused, not relayed"),
    "field-limits": Refused("more than 100 fields or a field over 8190 bytes (h11: no limit)"),
    "duplicate-content-length": Refused(
        "two Content-Length fields, even equal, are refused (llhttp strict; h11 merges equal ones)"
    ),
    "bare-lf": Refused("a bare LF line end is refused (llhttp strict; h11 accepts it)"),
    "obs-fold": Refused("a folded header line is refused (RFC 9112 §5.2 allows it; h11 unfolds)"),
    "transfer-coding-not-chunked": Accepted(
        "a Transfer-Encoding whose last coding is not chunked is framed by the connection's"
        " close (RFC 9112 §6.3), its codings kept; h11 refuses any coding but chunked"
    ),
}


# --------------------------------------------------------------------------- the reference


def reference(case: Case) -> Outcome:
    """What h11 makes of the case's bytes."""
    connection = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
    connection.send(h11.Request(method=case.method, target="/v1/x", headers=[("Host", "up")]))
    connection.send(h11.EndOfMessage())
    connection.receive_data(case.data)
    if case.ending in ("fin", "tls-close_notify"):
        connection.receive_data(b"")  # a clean end; a reset or a TLS truncation is none
    status: int | None = None
    headers: tuple[tuple[str, str], ...] = ()
    body = bytearray()
    try:
        while True:
            event = connection.next_event()
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = tuple(
                    (name.decode(), value.decode("utf-8", "surrogateescape"))
                    for name, value in event.headers.raw_items()
                )
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:  # NEED_DATA with no more to come, or the connection closed first
                return Outcome(error=True, status=status, headers=headers)
    except h11.RemoteProtocolError:
        return Outcome(error=True, status=status, headers=headers)
    trailing, closed = connection.trailing_data
    reusable = (
        case.ending == "open"
        and connection.our_state is h11.DONE
        and connection.their_state is h11.DONE
        and not trailing
        and not closed
    )
    return Outcome(False, status, headers, bytes(body), reusable)


# --------------------------------------------------------------------------- ours, over sockets


class Upstreams:
    """One plain and one TLS raw server; each accepted connection plays the current case."""

    def __init__(self, server_tls: ssl.SSLContext, client_tls: ssl.SSLContext) -> None:
        self.server_tls, self.client_tls = server_tls, client_tls
        self.case: Case | None = None
        self.ended = asyncio.Event()
        self.plain = RawServer(self._plain, None)
        self.tls = RawServer(self._tls, None)

    async def _plain(self, peer: Peer) -> None:
        case = self.case
        assert case is not None
        if await peer.head() is None:
            return
        for piece in case.pieces:
            await peer.send(piece)
        await self._end(peer, case)

    async def _tls(self, peer: Peer) -> None:
        case = self.case
        assert case is not None
        wrapped = BioTls(peer.reader, peer.writer, self.server_tls)
        if not await wrapped.handshake() or await wrapped.head() is None:
            return
        for piece in case.pieces:
            await wrapped.send(piece)
        await asyncio.sleep(0.005)  # the client has read the answer before the end comes
        await wrapped.end(close_notify=case.ending == "tls-close_notify")
        self.ended.set()

    async def _end(self, peer: Peer, case: Case) -> None:
        if case.ending == "open":
            self.ended.set()
            await peer.hold()
            return
        await asyncio.sleep(0.005)
        if case.ending == "reset":
            reset(peer.writer)
        else:
            await peer.close()
        self.ended.set()

    async def ours(self, case: Case) -> Outcome:
        """What the gateway's client makes of the case, read over a fresh connection."""
        self.case = case
        self.ended = asyncio.Event()
        tls = case.ending.startswith("tls")
        server = self.tls if tls else self.plain
        client = UpstreamClient(
            URL(f"{'https' if tls else 'http'}://127.0.0.1:{server.port}"),
            tls=self.client_tls if tls else None,
            connect_timeout=2.0,
            read_timeout=READ_TIMEOUT,
        )
        try:
            return await self._exchange(client, case)
        finally:
            await client.close()

    async def _exchange(self, client: UpstreamClient, case: Case) -> Outcome:
        status: int | None = None
        headers: tuple[tuple[str, str], ...] = ()
        try:
            response = await client.request(case.method, "/v1/x", [], None)
            status = response.status
            headers = tuple(response.headers.items())
            pieces = []
            while piece := await response.readany():
                pieces.append(piece)
        except GatewayError:
            return Outcome(error=True, status=status, headers=headers)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1):
                await self.ended.wait()
        # Give the client time to see the end (or bytes after the answer): a connection
        # still pooled after that counts as reusable. Polled, so a loaded machine only
        # makes it slower, never wrong, for the endings that must end it.
        patience = 0.03 if case.ending == "open" else 1.0
        with contextlib.suppress(TimeoutError):
            await eventually(lambda: not client.idle_connections, within=patience, step=0.002)
        return Outcome(False, status, headers, b"".join(pieces), client.idle_connections == 1)


@pytest.fixture(scope="module")
def tls_pair() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """Server and client TLS contexts from one throwaway CA."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


@pytest.fixture
async def upstreams(tls_pair: tuple[ssl.SSLContext, ssl.SSLContext]) -> AsyncIterator[Upstreams]:
    """The two raw servers, stopped after the test."""
    servers = Upstreams(*tls_pair)
    await servers.plain.start()
    await servers.tls.start()
    yield servers
    await servers.plain.stop()
    await servers.tls.stop()


async def compare(upstreams: Upstreams, case: Case) -> str | None:
    """None when the outcomes agree, or differ exactly as the case declares; else why not."""
    ours, theirs = await upstreams.ours(case), reference(case)
    if case.deliberate is None:
        if ours.compared() == theirs.compared():
            return None
        return f"{case.name}: ours {ours} != h11 {theirs}"
    if DELIBERATE[case.deliberate].holds(ours, theirs):
        return None
    return f"{case.name}: declared {case.deliberate!r} does not hold: ours {ours}, h11 {theirs}"


# --------------------------------------------------------------------------- the corpus


def ok(body: bytes = b"hello", *fields: bytes, status: bytes = b"200 OK") -> bytes:
    """An answer framed by Content-Length."""
    extra = b"".join(field + b"\r\n" for field in fields)
    return b"HTTP/1.1 %b\r\nContent-Length: %d\r\n%b\r\n%b" % (status, len(body), extra, body)


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
    b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 42\r\n\r\n"
)
FORGED = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"
OK_LINE = b"HTTP/1.1 200 OK\r\n"
CHUNKED_HEAD = OK_LINE + b"Transfer-Encoding: chunked\r\n\r\n"
CLOSE_DELIMITED = OK_LINE + b"Content-Type: text/plain\r\n\r\nuntil the end"


def corpus() -> list[Case]:
    """RFC 9112's framing cases, each once per way of ending where that matters."""
    cases: list[Case] = []

    def add(name: str, data: bytes, *endings: str, **options: str | None) -> None:
        for ending in endings or ("fin", "open"):
            cases.append(Case(f"{name}/{ending}", (data,), ending, **options))  # type: ignore[arg-type]

    # Every status class, and each class's bodyless members.
    for status in (
        b"200 OK",
        b"201 Created",
        b"206 Partial",
        b"301 Moved",
        b"302 Found",
        b"400 Bad",
        b"404 Not Found",
        b"429 Busy",
        b"500 Error",
        b"503 Busy",
        b"599 Odd",
        b"299 Odd",
        b"399 Odd",
        b"499 Odd",
    ):
        add(f"status {status[:3].decode()}", ok(b"body", status=status))
    add("status 600", ok(status=b"600 Odd"), deliberate="status-above-599")
    add("status 999", ok(status=b"999 Odd"), deliberate="status-above-599")
    add("status 099", b"HTTP/1.1 099 Low\r\nContent-Length: 0\r\n\r\n")
    add("status 0", b"HTTP/1.1 0 Zero\r\nContent-Length: 0\r\n\r\n")
    add("no reason phrase", b"HTTP/1.1 200 \r\nContent-Length: 2\r\n\r\nok")
    add(
        "HTTP/1.0 keep-alive",
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
    )
    add("HTTP/1.0 close-delimited", b"HTTP/1.0 200 OK\r\n\r\nold style", "fin", "reset")
    add(
        "HTTP/2.0 status line",
        b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
        deliberate="http-version",
    )
    # 1xx sequences.
    add("100 then 200", b"HTTP/1.1 100 Continue\r\n\r\n" + ok())
    add("103 with fields then 200", b"HTTP/1.1 103 Early\r\nLink: </s.css>\r\n\r\n" + ok())
    add(
        "100, 102, 103, 199 then 200",
        b"HTTP/1.1 100 C\r\n\r\nHTTP/1.1 102 P\r\n\r\nHTTP/1.1 103 E\r\n\r\n"
        b"HTTP/1.1 199 X\r\n\r\n" + ok(),
    )
    add("150 with Content-Length 0", b"HTTP/1.1 150 X\r\nContent-Length: 0\r\n\r\n" + ok())
    add("101 unasked", b"HTTP/1.1 101 Switching\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n")
    add(
        "150 with a body",
        b"HTTP/1.1 150 X\r\nContent-Length: 5\r\n\r\nforgeHTTP/1.1 200 OK\r\n"
        b"Content-Length: 0\r\n\r\n",
    )
    add(
        "150 with a forged answer as its body",
        b"HTTP/1.1 150 X\r\nContent-Length: %d\r\n\r\n%b" % (len(FORGED), FORGED) + ok(b"real"),
        deliberate="interim-with-framing",
    )
    add("only 1xx", b"HTTP/1.1 100 Continue\r\n\r\n", "fin")
    # HEAD, 204, 304, with and without lengths.
    add("HEAD with length", ok(b""), "fin", method="HEAD")  # a Content-Length: 0 head
    add("HEAD with length, kept open", ok(b""), "open", method="HEAD", deliberate="head-not-reused")
    add("HEAD announcing 5", OK_LINE + b"Content-Length: 5\r\n\r\n", "fin", method="HEAD")
    add(
        "HEAD announcing 5, kept open",
        OK_LINE + b"Content-Length: 5\r\n\r\n",
        "open",
        method="HEAD",
        deliberate="head-not-reused",
    )
    add(
        "HEAD chunked",
        CHUNKED_HEAD,
        "fin",
        method="HEAD",
    )
    add("HEAD no framing", OK_LINE + b"\r\n", "fin", method="HEAD")
    for status in (b"204 No Content", b"304 Not Modified"):
        code = status[:3].decode()
        add(f"{code} bare", b"HTTP/1.1 %b\r\n\r\n" % status)
        add(f"{code} Content-Length 0", b"HTTP/1.1 %b\r\nContent-Length: 0\r\n\r\n" % status)
        add(f"{code} announcing a length", b"HTTP/1.1 %b\r\nContent-Length: 7\r\n\r\n" % status)
        add(f"{code} then a body anyway", b"HTTP/1.1 %b\r\nContent-Length: 4\r\n\r\nbody" % status)
        add(f"{code} chunked", b"HTTP/1.1 %b\r\nTransfer-Encoding: chunked\r\n\r\n" % status)
    # Chunked: extensions, trailers, sizes.
    add("chunked with extension and trailer", CHUNKED, *ENDINGS)
    add("chunked quoted extension", CHUNKED_HEAD + b'2;a="q s";b\r\nok\r\n0\r\n\r\n')
    add("chunked upper-case hex", CHUNKED_HEAD + b"A\r\n0123456789\r\n0\r\n\r\n")
    add("chunked leading zeros", CHUNKED_HEAD + b"0002\r\nok\r\n000\r\n\r\n")
    add(
        "chunked size not hex",
        OK_LINE + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
    )
    add("chunked data longer than size", CHUNKED_HEAD + b"2\r\nokay\r\n0\r\n\r\n")
    add(
        "chunked no last chunk",
        OK_LINE + b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n",
        "fin",
        "reset",
    )
    add(
        "chunked, Transfer-Encoding twice",
        OK_LINE + b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        deliberate="transfer-coding-not-chunked",
    )
    add(
        "gzip, chunked",
        OK_LINE + b"Transfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        deliberate="transfer-coding-not-chunked",
    )
    add(
        "gzip only",
        OK_LINE + b"Transfer-Encoding: gzip\r\n\r\ncoded",
        "fin",
        deliberate="transfer-coding-not-chunked",
    )
    add(
        "chunked then gzip",
        OK_LINE + b"Transfer-Encoding: chunked, gzip\r\n\r\ncoded",
        "fin",
        deliberate="transfer-coding-not-chunked",
    )
    add(
        "Content-Length and chunked",
        OK_LINE + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        deliberate="content-length-with-chunked",
    )
    # Content-Length variants.
    add(
        "two equal Content-Lengths",
        OK_LINE + b"Content-Length: 2\r\nContent-Length: 2\r\n\r\nok",
        deliberate="duplicate-content-length",
    )
    add(
        "two different Content-Lengths",
        OK_LINE + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    )
    add(
        "Content-Length list",
        OK_LINE + b"Content-Length: 2, 2\r\n\r\nok",
        deliberate="duplicate-content-length",
    )
    add("Content-Length negative", OK_LINE + b"Content-Length: -1\r\n\r\nok")
    add("Content-Length plus sign", OK_LINE + b"Content-Length: +2\r\n\r\nok")
    add("Content-Length short body", ok(b"hello")[:-2], "fin", "reset")
    # Close-delimited bodies and Connection: close.
    add(
        "close-delimited",
        CLOSE_DELIMITED,
        "fin",
        "reset",
        "tls-close_notify",
        "tls-no-close_notify",
    )
    add("close-delimited, empty", OK_LINE + b"\r\n", "fin", "reset")
    add("Connection: close with length", ok(b"ok", b"Connection: close"), "fin", "open")
    add("Connection: close, keep-alive", ok(b"ok", b"Connection: keep-alive, close"))
    add("length then TLS close_notify", ok(b"ok"), "tls-close_notify", "tls-no-close_notify")
    # Bytes after a complete answer.
    add("answer then garbage", ok() + b"garbage", "fin", "open")
    add("answer then a second answer", ok() + ok(b"second"), "fin", "open")
    add("answer then CRLF", ok() + b"\r\n", "open", deliberate="crlf-between-answers")
    # Header fields.
    add("many fields", ok(b"x", *(b"X-F%d: %d" % (i, i) for i in range(90))))
    add(
        "101 fields",
        ok(b"x", *(b"X-F%d: %d" % (i, i) for i in range(100))),
        deliberate="field-limits",
    )
    add("long field", ok(b"x", b"X-Long: " + b"a" * 9000), deliberate="field-limits")
    add("utf-8 value", ok(b"x", "X-Name: café".encode()))
    add("latin-1 value", ok(b"x", b"X-Name: caf\xe9"), deliberate="non-utf8-field-value")
    add("tab in value", ok(b"x", b"X-Tab: a\tb"))
    add("empty value", ok(b"x", b"X-Empty:"))
    add("OWS around value", ok(b"x", b"X-Pad: \t value \t"))
    add("space before colon", ok(b"x", b"X-Bad : 1"))
    add("NUL in value", ok(b"x", b"X-Nul: a\x00b"))
    add("CR in value", ok(b"x", b"X-Cr: a\rb"))
    add("obs-fold", ok(b"x", b"X-Fold: a\r\n b"), deliberate="obs-fold")
    add("bare LF line ends", b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", deliberate="bare-lf")
    add("no colon", ok(b"x", b"X-NoColon"))
    add("space in name", ok(b"x", b"X Bad: 1"))
    add("empty name", ok(b"x", b": 1"))
    # Nothing at all, or not HTTP.
    add("nothing", b"", "fin", "reset")
    add("not HTTP", b"SSH-2.0-OpenSSH\r\n", "fin")
    return cases


def truncations() -> list[Case]:
    """Each prefix of two small answers, ended by a FIN and by a reset."""
    cases = []
    for name, whole in (("length", ok(b"hello")), ("chunked", CHUNKED)):
        for cut in range(len(whole) + 1):
            for ending in ("fin", "reset"):
                cases.append(Case(f"{name}[:{cut}]/{ending}", (whole[:cut],), ending))
    return cases


async def test_corpus_agrees_with_h11(upstreams: Upstreams) -> None:
    """Every framing case: the client's outcome is h11's, or differs exactly as declared."""
    problems = [problem for case in corpus() if (problem := await compare(upstreams, case))]
    assert problems == [], "\n".join(problems)


async def test_truncation_at_every_offset_agrees_with_h11(upstreams: Upstreams) -> None:
    """Every prefix of a small answer: never a complete answer unless h11 also has one."""
    problems = [problem for case in truncations() if (problem := await compare(upstreams, case))]
    assert problems == [], "\n".join(problems)


def test_every_deliberate_difference_is_in_security_md() -> None:
    """SECURITY.md names each deliberate difference, so the list and the document agree."""
    text = (Path(__file__).parents[2] / "SECURITY.md").read_text(encoding="utf-8")
    missing = [name for name in DELIBERATE if f"`{name}`" not in text]
    assert missing == []


# --------------------------------------------------------------------------- generated


TOKENS = st.text(
    alphabet=string.ascii_letters + string.digits + "-",
    min_size=1,
    max_size=12,
)
PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
VALUES = st.text(PRINTABLE, max_size=20).map(str.strip)


@st.composite
def answers(draw: st.DrawFn) -> Case:
    """A generated answer: interim answers, a final status, fields, a framing, a body, an end."""
    method = draw(st.sampled_from(["GET", "GET", "HEAD"]))
    status = draw(st.sampled_from([200, 201, 204, 206, 301, 304, 400, 404, 418, 500, 503, 599]))
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.1", b"1.0"]))
    interims = draw(st.lists(st.sampled_from([100, 102, 103, 150, 199]), max_size=2))
    fields = [
        (b"X-" + name.encode(), value.encode())
        for name, value in draw(st.lists(st.tuples(TOKENS, VALUES), max_size=4))
    ]
    if draw(st.booleans()):
        fields.append((b"Connection", draw(st.sampled_from([b"close", b"keep-alive"]))))
    body = draw(st.binary(max_size=200))
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    if framing == "length":
        fields.append((b"Content-Length", b"%d" % len(body)))
        payload = body
    elif framing == "chunked":
        fields.append((b"Transfer-Encoding", b"chunked"))
        sizes = draw(st.lists(st.integers(1, 50), max_size=8))
        payload, at = b"", 0
        for size in sizes:
            piece = body[at : at + size]
            at += size
            if piece:
                extension = draw(st.sampled_from([b"", b";a=b", b";n", b';q="x y"']))
                payload += b"%x%b\r\n%b\r\n" % (len(piece), extension, piece)
        if body[at:]:
            payload += b"%x\r\n%b\r\n" % (len(body[at:]), body[at:])
        trailer = draw(st.sampled_from([b"", b"X-Sum: 1\r\n", b"Set-Cookie: a=b\r\n"]))
        payload += b"0\r\n" + trailer + b"\r\n"
    else:
        payload = body
    head = b"HTTP/%b %d Reason\r\n" % (version, status)
    head += b"".join(name + b": " + value + b"\r\n" for name, value in fields)
    data = b"".join(b"HTTP/1.1 %d Interim\r\n\r\n" % code for code in interims)
    data += head + b"\r\n" + payload
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]  # truncated somewhere
    if draw(st.integers(0, 4)) == 0:
        data += draw(st.sampled_from([b"extra", ok(b"next"), b"\r\n"]))
    ending = draw(st.sampled_from(["fin", "reset", "open"]))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=3)))
    pieces = tuple(data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True) if b > a)
    deliberate = None
    if method == "HEAD" and ending == "open":
        deliberate = "head-not-reused"  # checked below only when h11 would reuse
    return Case("generated", pieces or (b"",), ending, method, deliberate)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=answers())
async def test_generated_answers_agree_with_h11(upstreams: Upstreams, case: Case) -> None:
    """Hypothesis-generated answers: the client's outcome is h11's, or a declared difference."""
    ours, theirs = await upstreams.ours(case), reference(case)
    if case.deliberate == "head-not-reused" and theirs.reusable:
        assert DELIBERATE["head-not-reused"].holds(ours, theirs), (case, ours, theirs)
        return
    assert ours.compared() == theirs.compared(), (case, ours, theirs)
