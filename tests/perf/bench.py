"""The sidecar benchmark: direct vs nginx vs the gateway, measured side by side in one run.

    python -m tests.perf.bench [--quick] [--write-results] [--duration S] [--rounds N]
    python -m tests.perf.bench --fleet [--quick] [--duration S]   (tests/perf/fleet.py)

Starts a local upstream (nginx returning a small JSON body; an aiohttp server when nginx is
missing), a TLS token issuer (the sandbox's, in its own process), nginx as a header-injecting
reverse proxy (the reference), and the gateway as a subprocess with every production feature
on. Then, in alternating rounds over the three targets, it measures maximum throughput
(closed loop: wrk, else tests.perf.loadgen) and latency at a fixed rate (open loop:
tests.perf.loadgen, or hey), reads each server's CPU time and memory from /proc, counts
token-endpoint calls, and streams a large body through the gateway both ways.

Prints a Markdown table with ratios gateway/direct and gateway/nginx and writes a latency
percentile plot; --write-results also writes tests/perf/RESULTS.md and its plot. Absolute
numbers vary between machines; compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import platform
import shutil
import signal
import socket
import ssl
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import trustme

from tests.perf import procfs
from tests.perf.servers import CLIENT, CLIENT_SECRET, SMALL_BODY, TENANT

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SUBSCRIPTION_KEY = "bench0subscription0key000000000"
SCOPE = "https://api.ci.ai.microsoft.com/.default"
MIB = 1024 * 1024
PERCENTILES = (50.0, 90.0, 99.0)

# The issue's targets, checked (not enforced) in the report.
TARGET_CPU_PER_1000 = 0.12
TARGET_ADDED_P50_MS = 0.5
TARGET_ADDED_P99_MS = 1.0
TARGET_RPS = 8000.0
TARGET_RSS_MB = 48.0
TARGET_STREAM_GROWTH_MB = 16.0
TARGET_STARTUP_S = 1.0


# --------------------------------------------------------------------------- options


@dataclass(frozen=True, slots=True)
class Options:
    """What one benchmark run does."""

    duration: float = 10.0  # seconds per measurement
    rounds: int = 5
    warmup: float = 2.0
    rate: float = 1000.0  # open-loop requests per second
    connections: int = 50  # closed-loop connections
    stream_bytes: int = 1024 * MIB
    tools: str = "auto"  # "auto": system tools when installed; "python": fallbacks only
    open_loop: str = "python"  # "python" (µs resolution) or "hey"
    workers: int = 1
    out: Path = HERE / "out"
    write_results: bool = False
    gateway_src: Path = REPO
    profile: str | None = None  # "py-spy" or "pyinstrument": profile the gateway only
    targets: tuple[str, ...] = ("direct", "nginx", "gateway")
    extra_env: tuple[tuple[str, str], ...] = ()  # more gateway environment (experiments)
    candidate_src: Path | None = None  # a second gateway build, measured alongside
    profile_at_rate: bool = False  # profile at the fixed rate instead of saturated
    routes: bool = False  # run the routes and link-rewriting scenario instead (routes_bench.py)
    caller_auth: bool = False  # run tests/perf/caller_auth.py instead


@dataclass(frozen=True, slots=True)
class Tools:
    """System tools found on PATH (None: use the fallback)."""

    nginx: str | None
    wrk: str | None
    hey: str | None

    @classmethod
    def find(cls, mode: str) -> Tools:
        """Every tool when `mode` is auto and it is installed; none when mode is python."""
        if mode == "python":
            return cls(None, None, None)
        nginx = shutil.which("nginx") or next(
            (path for path in ("/usr/sbin/nginx", "/sbin/nginx") if Path(path).exists()), None
        )
        return cls(nginx, shutil.which("wrk"), shutil.which("hey"))


# --------------------------------------------------------------------------- processes


@dataclass
class Service:
    """A server the harness started; `pid` is what CPU and memory are read from."""

    name: str
    process: asyncio.subprocess.Process
    port: int
    lines: int = 0  # lines written to standard output (the gateway's access log)

    @property
    def pid(self) -> int:
        """The process ID (nginx: the master; its worker is counted as a descendant)."""
        return self.process.pid

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after five seconds."""
        if self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), 5)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


def free_port() -> int:
    """An ephemeral port that was free a moment ago (for servers that need a fixed one)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def spawn_python_server(
    stack: contextlib.AsyncExitStack, role: str, *args: str, log: Path
) -> Service:
    """One of tests.perf.servers, in its own process; waits for its `port=` line."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.perf.servers",
        role,
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=log.open("wb"),
    )
    service = Service(role, process, 0)
    stack.push_async_callback(service.stop)
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 30)
    if not line.startswith(b"port="):
        raise RuntimeError(f"{role} did not start; see {log}")
    service.port = int(line.split(b"=", 1)[1])
    return service


def nginx_conf(prefix: Path, servers: str) -> str:
    """A foreground nginx with one worker and everything under `prefix`."""
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"    {kind}_temp_path {prefix}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""{user}worker_processes 1;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
{temp}
    keepalive_requests 1000000;
    keepalive_timeout 300s;
{servers}
}}
"""


def write_nginx_conf(prefix: Path, servers: str) -> Path:
    """nginx.conf under `prefix` (created)."""
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(prefix, servers))
    return conf


async def start_nginx(
    stack: contextlib.AsyncExitStack, nginx: str, name: str, prefix: Path, servers: str
) -> Service:
    """Run nginx in the foreground with the given server blocks; waits until it listens."""
    port = free_port()
    conf = write_nginx_conf(prefix, servers.replace("@PORT@", str(port)))
    process = await asyncio.create_subprocess_exec(
        nginx,
        "-p",
        str(prefix),
        "-c",
        str(conf),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=(prefix / "stderr.log").open("wb"),
    )
    service = Service(name, process, port)
    stack.push_async_callback(service.stop)
    await wait_listening(port, process, prefix / "error.log")
    return service


async def wait_listening(port: int, process: asyncio.subprocess.Process, log: Path) -> None:
    """Until 127.0.0.1:`port` accepts a connection (or the process died)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.returncode is not None:
            raise RuntimeError(f"server exited with {process.returncode}; see {log}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.02)
            continue
        writer.close()
        return
    raise RuntimeError(f"nothing listens on port {port}; see {log}")


def upstream_servers(bulk_port: int) -> str:
    """The nginx upstream: a small JSON answer under /v1, bulk routes passed to Python."""
    return f"""    access_log off;
    server {{
        listen 127.0.0.1:@PORT@ backlog=4096;
        location /v1/bulk/ {{
            proxy_pass http://127.0.0.1:{bulk_port};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
            proxy_buffering off;
            client_max_body_size 0;
        }}
        location /v1/ {{
            default_type application/json;
            return 200 '{SMALL_BODY.decode()}';
        }}
        location / {{ return 404; }}
    }}"""


def proxy_servers(upstream_port: int, token: str) -> str:
    """nginx as the reference: static credentials injected, keep-alive to the upstream."""
    return f"""    access_log /dev/null combined;
    upstream backend {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:@PORT@ backlog=4096;
        location / {{
            proxy_pass http://backend/v1/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {token}";
            proxy_set_header Ocp-Apim-Subscription-Key "{SUBSCRIPTION_KEY}";
        }}
    }}"""


@dataclass
class Certificates:
    """A throwaway CA and the issuer's certificate, as files."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def make(cls, directory: Path) -> Certificates:
        """Generate them with trustme."""
        authority = trustme.CA()
        leaf = authority.issue_cert("127.0.0.1", "localhost")
        paths = cls(directory / "ca.pem", directory / "issuer.pem", directory / "issuer.key")
        authority.cert_pem.write_to_path(str(paths.ca))
        leaf.cert_chain_pems[0].write_to_path(str(paths.cert))
        leaf.private_key_pem.write_to_path(str(paths.key))
        return paths


def gateway_env(
    opts: Options, *, issuer_port: int, upstream_port: int, listen: int, admin: int, ca: Path
) -> dict[str, str]:
    """Production-like settings: metrics, JSON access log at info, a (high) rate limit."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(opts.gateway_src),
        "AZURE_TENANT_ID": TENANT,
        "AZURE_CLIENT_ID": CLIENT,
        "AZURE_CLIENT_SECRET": CLIENT_SECRET,
        "AZURE_AUTHORITY_HOST": f"https://127.0.0.1:{issuer_port}",
        "CIGW_INSTANCE_DISCOVERY": "false",
        "CIGW_AUTHORITY_CA_FILE": str(ca),
        "CIGW_SCOPE": SCOPE,
        "CIGW_UPSTREAM_URL": f"http://127.0.0.1:{upstream_port}/v1",
        "CIGW_SUBSCRIPTION_KEY": SUBSCRIPTION_KEY,
        "CIGW_LISTEN": f"127.0.0.1:{listen}",
        "CIGW_ADMIN_LISTEN": f"127.0.0.1:{admin}",
        "CIGW_LOG_LEVEL": "info",
        "CIGW_LOG_FORMAT": "json",
        "CIGW_RATE_LIMIT_RPS": "1000000",
        # Raised from the 100 MiB default so the streaming run can send a 1 GiB body.
        "CIGW_MAX_BODY_BYTES": str(4 * opts.stream_bytes),
        "CIGW_SHUTDOWN_GRACE": "2",
    }
    if opts.workers > 1:
        env["CIGW_WORKERS"] = str(opts.workers)
    env.update(opts.extra_env)
    return env


async def start_gateway(
    stack: contextlib.AsyncExitStack,
    opts: Options,
    env: dict[str, str],
    workdir: Path,
    name: str = "gateway",
) -> tuple[Service, float]:
    """The gateway as a subprocess; returns it and the seconds from exec to /readyz 200."""
    command = [sys.executable, "-m", "gateway", "serve"]
    if opts.profile == "pyinstrument":
        report = opts.out / "profile-pyinstrument.txt"
        command = [sys.executable, "-m", "pyinstrument", "-r", "text", "-o", str(report)]
        command += ["--show-all", "-m", "gateway", "serve"]
    admin = int(env["CIGW_ADMIN_LISTEN"].rsplit(":", 1)[1])
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        *command,
        # Its own folder first on sys.path: --gateway-src measures a scratch copy.
        cwd=opts.gateway_src,
        env=env,
        # A pipe, read as a container runtime reads it: each line costs the gateway a write
        # into a pipe with a reader, not into /dev/null.
        stdout=asyncio.subprocess.PIPE,
        stderr=(workdir / f"{name}-stderr.log").open("wb"),
    )
    service = Service(name, process, int(env["CIGW_LISTEN"].rsplit(":", 1)[1]))
    assert process.stdout is not None
    drain = asyncio.ensure_future(count_lines(process.stdout, service))
    stack.push_async_callback(_finish, drain)  # runs after stop (callbacks run last-in first)
    stack.push_async_callback(service.stop)
    async with aiohttp.ClientSession() as session:
        while True:
            if process.returncode is not None:
                raise RuntimeError(f"{name} exited; see {workdir / f'{name}-stderr.log'}")
            if time.perf_counter() - started > 30:
                raise RuntimeError("the gateway did not become ready within 30 s")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"http://127.0.0.1:{admin}/readyz") as response:
                    if response.status == 200:
                        return service, time.perf_counter() - started
            await asyncio.sleep(0.005)


async def count_lines(stream: asyncio.StreamReader, service: Service) -> None:
    """Read the gateway's log pipe to its end, counting lines."""
    while chunk := await stream.read(1 << 16):
        service.lines += chunk.count(b"\n")


async def _finish(task: asyncio.Future[None]) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)


# --------------------------------------------------------------------------- load


@dataclass
class Target:
    """One thing under load: where to send requests, and which process serves them."""

    name: str
    url: str
    pid: int
    throughput: list[float] = field(default_factory=list)
    throughput_cpu: list[float] = field(default_factory=list)  # CPU s per 1000 requests
    latencies_ms: list[float] = field(default_factory=list)
    achieved: list[float] = field(default_factory=list)
    lateness_ms: list[float] = field(default_factory=list)
    errors: int = 0
    requests: int = 0  # sent at the fixed rate
    closed_requests: int = 0  # sent in the closed-loop rounds
    cpu_seconds: float = 0.0  # at the fixed rate
    rate_cpu: list[float] = field(default_factory=list)  # CPU s per 1000 requests, per round
    rss: list[int] = field(default_factory=list)  # samples at the fixed rate

    def percentile(self, q: float) -> float:
        """Latency percentile at the fixed rate, in ms (nan without samples)."""
        return percentile(sorted(self.latencies_ms), q)

    @property
    def rps(self) -> float:
        """Median of the rounds' maximum throughputs."""
        return statistics.median(self.throughput) if self.throughput else math.nan

    @property
    def cpu_per_1000(self) -> float:
        """CPU seconds per 1000 requests at the fixed rate (= vCPU per 1000 req/s).

        The median of the rounds, like the throughput: on 2 shared cores one round in a
        few lands on the load generator's core and costs up to a third more (see
        tests/perf/README.md), which a mean would pass on.
        """
        return statistics.median(self.rate_cpu) if self.rate_cpu else math.nan


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    if not ordered:
        return math.nan
    rank = max(0, math.ceil(q / 100 * len(ordered)) - 1)
    return ordered[min(rank, len(ordered) - 1)]


async def run_tool(*command: str) -> str:
    """Run a load tool to completion and return its standard output."""
    process = await asyncio.create_subprocess_exec(
        *command, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({process.returncode}): {err.decode()[-2000:]}")
    return out.decode()


async def closed_loop(tools: Tools, opts: Options, url: str) -> tuple[float, int, int]:
    """(requests/s, requests, errors) with `connections` keep-alive connections kept busy."""
    if tools.wrk:
        seconds = max(1, round(opts.duration))  # wrk takes whole seconds
        out = await run_tool(tools.wrk, "-t1", f"-c{opts.connections}", f"-d{seconds}s", url)
        return parse_wrk(out)
    out = await run_tool(
        sys.executable,
        "-m",
        "tests.perf.loadgen",
        "closed",
        url,
        f"--duration={opts.duration}",
        f"--connections={opts.connections}",
    )
    result = json.loads(out)
    done = int(result["ok"])
    return done / float(result["seconds"]), done + int(result["errors"]), int(result["errors"])


def parse_wrk(out: str) -> tuple[float, int, int]:
    """Requests/s, requests and failed requests from wrk's summary."""
    rps, requests, errors = math.nan, 0, 0
    for line in out.splitlines():
        words = line.split()
        if line.startswith("Requests/sec:"):
            rps = float(words[1])
        elif "requests in" in line:
            requests = int(words[0])
        elif line.strip().startswith("Non-2xx or 3xx responses:"):
            errors += int(words[-1])
        elif line.strip().startswith("Socket errors:"):
            errors += sum(int(word.rstrip(",")) for word in words[2::2])
    return rps, requests, errors


@dataclass
class OpenLoopResult:
    """One open-loop run: latencies of answered requests, and how well the rate was held."""

    latencies_ms: list[float]
    lateness_ms: list[float]
    achieved: float
    requests: int
    errors: int


async def open_loop(tools: Tools, opts: Options, url: str) -> OpenLoopResult:
    """`rate` requests per second for `duration` seconds."""
    if opts.open_loop == "hey" and tools.hey:
        # hey's -q is per worker: 20 workers at rate/20 each. Each worker waits for its
        # answer before the next tick, so this is only open-loop while answers are fast.
        workers = 20
        out = await run_tool(
            tools.hey,
            f"-z={opts.duration:g}s",
            f"-c={workers}",
            f"-q={opts.rate / workers:g}",
            "-o=csv",
            url,
        )
        rows = [line.split(",") for line in out.splitlines()[1:] if line]
        ok = [float(row[0]) * 1000 for row in rows if row[6].startswith(("2", "3"))]
        return OpenLoopResult(ok, [], len(rows) / opts.duration, len(rows), len(rows) - len(ok))
    out = await run_tool(
        sys.executable,
        "-m",
        "tests.perf.loadgen",
        "open",
        url,
        f"--duration={opts.duration}",
        f"--rate={opts.rate}",
    )
    result = json.loads(out)
    done = int(result["ok"]) + int(result["errors"])
    return OpenLoopResult(
        [value / 1000 for value in result["latencies_us"]],
        [value / 1000 for value in result["lateness_us"]],
        done / float(result["seconds"]),
        done,
        int(result["errors"]),
    )


@contextlib.asynccontextmanager
async def sampling_rss(pid: int, into: list[int], every: float = 0.1) -> AsyncIterator[None]:
    """Sample the RSS of `pid` (and descendants) into `into` while the block runs."""

    async def sample() -> None:
        while True:
            into.append(procfs.rss_bytes(pid))
            await asyncio.sleep(every)

    task = asyncio.ensure_future(sample())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def measure_throughput(tools: Tools, opts: Options, target: Target) -> None:
    """One closed-loop round against `target`."""
    cpu_before = procfs.cpu_seconds(target.pid)
    rps, requests, errors = await closed_loop(tools, opts, target.url)
    cpu = procfs.cpu_seconds(target.pid) - cpu_before
    target.throughput.append(rps)
    target.closed_requests += requests
    target.throughput_cpu.append(1000 * cpu / requests if requests else math.nan)
    target.errors += errors


async def measure_latency(tools: Tools, opts: Options, target: Target) -> None:
    """One open-loop round against `target`, with its CPU time and RSS."""
    cpu_before = procfs.cpu_seconds(target.pid)
    async with sampling_rss(target.pid, target.rss):
        result = await open_loop(tools, opts, target.url)
    cpu = procfs.cpu_seconds(target.pid) - cpu_before
    target.cpu_seconds += cpu
    target.rate_cpu.append(1000 * cpu / result.requests if result.requests else math.nan)
    target.requests += result.requests
    target.latencies_ms += result.latencies_ms
    target.lateness_ms += result.lateness_ms
    target.achieved.append(result.achieved)
    target.errors += result.errors


# --------------------------------------------------------------------------- streaming


async def _http_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split()[1])
    headers = {}
    for line in head[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def stream_upload(port: int, size: int) -> int:
    """POST `size` bytes through the gateway; the upstream's count of what arrived."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST /bulk/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {size}\r\n"
        "Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n".encode()
    )
    chunk = bytes(MIB)
    left = size
    while left > 0:
        writer.write(chunk[: min(MIB, left)])
        left -= min(MIB, left)
        await writer.drain()
    status, _ = await _http_head(reader)
    body = await reader.read()
    writer.close()
    if status != 200:
        raise RuntimeError(f"upload answered {status}: {body[:200]!r}")
    received: int = json.loads(body)["received"]
    return received


async def stream_download(port: int, size: int) -> int:
    """GET `size` bytes through the gateway, discarding them; how many arrived."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=MIB)
    writer.write(
        f"GET /bulk/download?bytes={size} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    status, headers = await _http_head(reader)
    if status != 200:
        raise RuntimeError(f"download answered {status}")
    received = 0
    if headers.get("transfer-encoding") == "chunked":
        while True:
            length = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if length == 0:
                break
            left = length
            while left:
                left -= len(await reader.read(min(left, MIB)))
            await reader.readexactly(2)
            received += length
    else:
        while chunk := await reader.read(MIB):
            received += len(chunk)
    writer.close()
    return received


@dataclass
class StreamResult:
    """RSS before, peak during, and after streaming one body through the gateway."""

    direction: str
    size: int
    seconds: float
    before: int
    peak: int
    after: int

    @property
    def growth(self) -> int:
        """Peak minus the RSS just before."""
        return self.peak - self.before


async def measure_stream(pid: int, port: int, size: int, direction: str) -> StreamResult:
    """Stream `size` bytes up or down through the gateway and watch its peak RSS."""
    before = procfs.rss_bytes(pid)
    exact = procfs.reset_peak_rss(pid)
    samples: list[int] = []
    started = time.perf_counter()
    async with sampling_rss(pid, samples, every=0.02):
        moved = await (stream_upload if direction == "upload" else stream_download)(port, size)
    seconds = time.perf_counter() - started
    if moved != size:
        raise RuntimeError(f"{direction}: {moved} of {size} bytes arrived")
    peak = max([*samples, procfs.peak_rss_bytes(pid) if exact else 0, before])
    return StreamResult(direction, size, seconds, before, peak, procfs.rss_bytes(pid))


# --------------------------------------------------------------------------- the run


@dataclass
class Report:
    """Everything one run measured."""

    opts: Options
    tools: Tools
    targets: list[Target]
    startup_s: float = math.nan
    token_calls_startup: int = 0
    token_calls_load: int = 0
    gateway_rss_idle: int = 0
    libraries_rss: int = 0  # a process that only imports the gateway's libraries
    gateway_rss_peak_load: int = 0
    gateway_requests_counted: float = math.nan
    log_lines: int = 0
    streams: list[StreamResult] = field(default_factory=list)
    started_at: str = ""
    wall_s: float = 0.0

    def target(self, name: str) -> Target | None:
        """The target called `name`, if it was measured."""
        return next((target for target in self.targets if target.name == name), None)


async def token_calls(session: aiohttp.ClientSession, issuer_port: int) -> int:
    """How many token requests the issuer has answered so far."""
    async with session.get(f"https://127.0.0.1:{issuer_port}/_bench/stats") as response:
        calls: int = (await response.json())["token_calls"]
        return calls


async def fetch_token(session: aiohttp.ClientSession, issuer_port: int) -> str:
    """One real token from the issuer, so nginx injects a header of realistic size."""
    async with session.post(
        f"https://127.0.0.1:{issuer_port}/{TENANT}/oauth2/v2.0/token",
        data={
            "grant_type": "client_credentials",
            "client_id": CLIENT,
            "client_secret": CLIENT_SECRET,
            "scope": SCOPE,
        },
    ) as response:
        token: str = (await response.json())["access_token"]
        return token


async def counted_requests(admin_port: int) -> float:
    """Sum of cigw_requests_total on the gateway's /metrics page."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{admin_port}/metrics") as response,
    ):
        text = await response.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("cigw_requests_total{")
    )


async def run(opts: Options, say: Callable[[str], None]) -> Report:
    """Start everything, measure, stop everything."""
    tools = Tools.find(opts.tools)
    workdir = opts.out / "run"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    certs = Certificates.make(workdir)
    began = time.perf_counter()
    report = Report(opts, tools, [], started_at=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))
    async with contextlib.AsyncExitStack() as stack:
        issuer = await spawn_python_server(
            stack, "issuer", str(certs.cert), str(certs.key), log=workdir / "issuer.log"
        )
        python_upstream = await spawn_python_server(stack, "upstream", log=workdir / "upstream.log")
        trust = ssl.create_default_context(cafile=str(certs.ca))
        session = await stack.enter_async_context(
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust))
        )
        token = await fetch_token(session, issuer.port)
        upstream = python_upstream
        proxy: Service | None = None
        if tools.nginx:
            upstream = await start_nginx(
                stack,
                tools.nginx,
                "nginx-upstream",
                workdir / "nginx-upstream",
                upstream_servers(python_upstream.port),
            )
            proxy = await start_nginx(
                stack,
                tools.nginx,
                "nginx-proxy",
                workdir / "nginx-proxy",
                proxy_servers(upstream.port, token),
            )
        say(f"upstream: {upstream.name}; load: {tools.wrk or 'loadgen'} / {opts.open_loop}")

        calls_before = await token_calls(session, issuer.port)
        listen, admin = free_port(), free_port()
        env = gateway_env(
            opts,
            issuer_port=issuer.port,
            upstream_port=upstream.port,
            listen=listen,
            admin=admin,
            ca=certs.ca,
        )
        gateway, report.startup_s = await start_gateway(stack, opts, env, workdir)
        report.token_calls_startup = await token_calls(session, issuer.port) - calls_before
        report.gateway_rss_idle = procfs.rss_bytes(gateway.pid)
        report.libraries_rss = await libraries_rss()
        say(f"gateway ready in {report.startup_s:.2f} s")

        targets = [Target("direct", f"http://127.0.0.1:{upstream.port}/v1/ping", upstream.pid)]
        if proxy is not None:
            targets.append(Target("nginx", f"http://127.0.0.1:{proxy.port}/ping", proxy.pid))
        targets.append(Target("gateway", f"http://127.0.0.1:{gateway.port}/ping", gateway.pid))
        if opts.profile:
            targets = targets[-1:]
        targets = [target for target in targets if target.name in opts.targets]
        if opts.candidate_src is not None:
            # A second build measured in the same alternating rounds: background load hits
            # both alike, so their ratio holds where absolute figures drift.
            candidate_opts = dataclasses.replace(opts, gateway_src=opts.candidate_src)
            candidate_env = {
                **env,
                "PYTHONPATH": str(opts.candidate_src),
                "CIGW_LISTEN": f"127.0.0.1:{free_port()}",
                "CIGW_ADMIN_LISTEN": f"127.0.0.1:{free_port()}",
            }
            candidate, seconds = await start_gateway(
                stack, candidate_opts, candidate_env, workdir, name="candidate"
            )
            say(f"candidate ({opts.candidate_src}) ready in {seconds:.2f} s")
            targets.append(
                Target("candidate", f"http://127.0.0.1:{candidate.port}/ping", candidate.pid)
            )
        report.targets = targets
        calls_loaded = await token_calls(session, issuer.port)

        warm = dataclasses.replace(opts, duration=opts.warmup)
        for target in targets:
            await closed_loop(tools, warm, target.url)

        if opts.profile:
            await profile_gateway(tools, opts, targets[0], workdir)
        else:
            await measure_rounds(tools, opts, targets, say)
            report.gateway_rss_peak_load = procfs.peak_rss_bytes(gateway.pid)
            report.token_calls_load = await token_calls(session, issuer.port) - calls_loaded
            report.gateway_requests_counted = await counted_requests(admin)
            await asyncio.sleep(1)  # the log may be flushed lazily
            report.log_lines = gateway.lines
            for direction in ("upload", "download") if opts.stream_bytes else ():
                stream = await measure_stream(
                    gateway.pid, gateway.port, opts.stream_bytes, direction
                )
                report.streams.append(stream)
                say(
                    f"streamed {stream.size / MIB:.0f} MiB {direction} in {stream.seconds:.1f} s, "
                    f"RSS +{stream.growth / MIB:.1f} MiB"
                )
    report.wall_s = time.perf_counter() - began
    return report


async def measure_rounds(
    tools: Tools, opts: Options, targets: list[Target], say: Callable[[str], None]
) -> None:
    """Alternating rounds, rotated so that no target always follows the same one."""
    for number in range(opts.rounds):
        order = targets[number % len(targets) :] + targets[: number % len(targets)]
        for target in order:
            await measure_throughput(tools, opts, target)
            say(f"round {number + 1}: {target.name} max {target.throughput[-1]:,.0f}/s")
        for target in order:
            await measure_latency(tools, opts, target)
            say(
                f"round {number + 1}: {target.name} at {opts.rate:g}/s, "
                f"achieved {target.achieved[-1]:,.0f}/s, p99 so far {target.percentile(99):.2f} ms"
            )


# --------------------------------------------------------------------------- profiling


async def profile_gateway(tools: Tools, opts: Options, target: Target, workdir: Path) -> None:
    """Saturate the gateway for `duration` seconds under a profiler; write the top functions."""
    if opts.profile == "pyinstrument":
        await measure_throughput(tools, opts, target)  # the report is written at exit
        return
    raw = opts.out / "profile-py-spy.txt"
    spy = Path(sys.executable).with_name("py-spy")
    sampler = await asyncio.create_subprocess_exec(
        str(spy),
        "record",
        "--pid",
        str(target.pid),
        "--duration",
        f"{math.ceil(opts.duration)}",
        "--rate",
        "500",
        "--nonblocking",
        "--format",
        "raw",
        "--output",
        str(raw),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=(workdir / "py-spy.log").open("wb"),
    )
    await asyncio.sleep(0.5)  # let py-spy attach
    if opts.profile_at_rate:
        await measure_latency(tools, opts, target)
    else:
        await measure_throughput(tools, opts, target)
    await sampler.wait()
    (opts.out / "profile-top.txt").write_text(summarise_collapsed(raw.read_text()))


# The third-party libraries the gateway is built on, as its brief names them, plus uvloop.
LIBRARIES = ("aiohttp.web", "msal", "structlog", "prometheus_client", "cachetools", "uvloop")


async def libraries_rss() -> int:
    """RSS of a fresh interpreter that imports the gateway's libraries and nothing else.

    The floor under the gateway's own memory: no code of the gateway, no connection, no
    token, just what importing the libraries it is built on costs.
    """
    probe = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        f"import {', '.join(LIBRARIES)}; print(open('/proc/self/statm').read().split()[1])",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await probe.communicate()
    return int(out) * os.sysconf("SC_PAGE_SIZE")


def summarise_collapsed(text: str, top: int = 30) -> str:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
    lines = [f"{total} samples", "", "self %  function"]
    lines += [
        f"{100 * n / total:6.1f}  {name}"
        for name, n in sorted(own.items(), key=lambda item: -item[1])[:top]
    ]
    lines += ["", "incl %  function"]
    lines += [
        f"{100 * n / total:6.1f}  {name}"
        for name, n in sorted(inclusive.items(), key=lambda item: -item[1])[:top]
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the report


def _ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def _count(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.0f}"


def _mb(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.1f}"


def _ratio(a: float, b: float) -> str:
    return "n/a" if math.isnan(a) or math.isnan(b) or b == 0 else f"{a / b:.2f}x"


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def _describe_setup(report: Report) -> str:
    opts, tools = report.opts, report.tools
    closed = (
        f"wrk -t1 -c{opts.connections}"
        if tools.wrk
        else f"tests.perf.loadgen closed loop, {opts.connections} connections"
    )
    fixed = (
        "hey -q (per-worker rate, 20 workers)"
        if opts.open_loop == "hey" and tools.hey
        else "tests.perf.loadgen open loop"
    )
    upstream = "nginx" if tools.nginx else "aiohttp (nginx missing; no nginx reference)"
    return (
        f"Run {report.started_at}: {os.cpu_count()} CPUs shared by load generator, upstream "
        f"and proxy; {platform.python_implementation()} {platform.python_version()}; "
        f"{opts.rounds} alternating rounds of {opts.duration:g} s per measurement "
        f"({report.wall_s / 60:.1f} min in all). Upstream: {upstream}. Max throughput: {closed}. "
        f"Fixed rate: {fixed}. Gateway workers: {opts.workers}."
    )


def comparison_table(report: Report) -> list[str]:
    """Per-target figures with the gateway's ratios to direct and to nginx."""
    direct, nginx, gateway = (report.target(name) for name in ("direct", "nginx", "gateway"))
    if direct is None or gateway is None:
        return []
    rate = report.opts.rate
    candidate = report.target("candidate")

    def row(label: str, get: Callable[[Target], float], fmt: Callable[[float], str]) -> str:
        d, g = get(direct), get(gateway)
        n = get(nginx) if nginx is not None else math.nan
        line = f"| {label} | {fmt(d)} | {fmt(n)} | {fmt(g)} | {_ratio(g, d)} | {_ratio(g, n)} |"
        if candidate is not None:
            c = get(candidate)
            line += f" {fmt(c)} | {_ratio(c, d)} | {_ratio(c, g)} |"
        return line

    header = ["| | direct | nginx | gateway | gateway/direct | gateway/nginx |"]
    header.append("|---|---:|---:|---:|---:|---:|")
    if candidate is not None:
        header[0] += " candidate | candidate/direct | candidate/gateway |"
        header[1] += "---:|---:|---:|"

    def at(q: float) -> Callable[[Target], float]:
        return lambda target: target.percentile(q)

    return [
        *header,
        row("max throughput, req/s (median of rounds)", lambda t: t.rps, _count),
        *(row(f"latency p{q:g} at {rate:g} req/s, ms", at(q), _ms) for q in PERCENTILES),
        row(
            "achieved rate, req/s (lowest round)",
            lambda t: min(t.achieved) if t.achieved else math.nan,
            _count,
        ),
        row(
            "CPU s per 1000 requests at the fixed rate (median of rounds)",
            lambda t: t.cpu_per_1000,
            _ms,
        ),
        row(
            "CPU s per 1000 requests at max throughput",
            lambda t: _median(t.throughput_cpu),
            _ms,
        ),
        row(f"RSS at {rate:g} req/s, MB (median)", lambda t: _median(t.rss) / 1e6, _mb),
        row("failed requests", lambda t: float(t.errors), _count),
    ]


def target_table(report: Report) -> list[str]:
    """The gateway's figures against the issue's targets."""
    direct, nginx, gateway = (report.target(name) for name in ("direct", "nginx", "gateway"))
    if direct is None or gateway is None:
        return []
    opts = report.opts

    def added(target: Target | None, q: float) -> float:
        return target.percentile(q) - direct.percentile(q) if target else math.nan

    rss = _median(gateway.rss) / 1e6
    processes = f"{opts.workers} process{'es' if opts.workers > 1 else ''}"
    rows: list[tuple[str, str, str, bool | None]] = [
        (
            "added latency p50 over direct, ms",
            _ms(added(gateway, 50)),
            f"<= {TARGET_ADDED_P50_MS} (nginx adds {_ms(added(nginx, 50))})",
            added(gateway, 50) <= TARGET_ADDED_P50_MS,
        ),
        (
            "added latency p99 over direct, ms",
            _ms(added(gateway, 99)),
            f"<= {TARGET_ADDED_P99_MS} (nginx adds {_ms(added(nginx, 99))})",
            added(gateway, 99) <= TARGET_ADDED_P99_MS,
        ),
        (
            "vCPU per 1000 req/s",
            _ms(gateway.cpu_per_1000),
            f"<= {TARGET_CPU_PER_1000}",
            gateway.cpu_per_1000 <= TARGET_CPU_PER_1000,
        ),
        (
            f"max throughput ({processes}), req/s",
            _count(gateway.rps),
            f">= {TARGET_RPS:,.0f}",
            gateway.rps >= TARGET_RPS,
        ),
        (
            f"RSS steady at {opts.rate:g} req/s, MB",
            _mb(rss),
            f"<= {TARGET_RSS_MB:g}",
            rss <= TARGET_RSS_MB,
        ),
        ("RSS peak under load (VmHWM), MB", _mb(report.gateway_rss_peak_load / 1e6), "", None),
        ("RSS idle after start, MB", _mb(report.gateway_rss_idle / 1e6), "", None),
        (
            "RSS of its libraries alone (imported, nothing run), MB",
            _mb(report.libraries_rss / 1e6),
            "",
            None,
        ),
    ]
    for stream in report.streams:
        rows.append(
            (
                f"RSS growth streaming {stream.size / MIB:,.0f} MiB {stream.direction}, MB",
                f"{stream.growth / 1e6:.1f} ({stream.size / MIB / stream.seconds:,.0f} MiB/s)",
                f"<= {TARGET_STREAM_GROWTH_MB:g}",
                stream.growth / 1e6 <= TARGET_STREAM_GROWTH_MB,
            )
        )
    rows += [
        (
            "token-endpoint calls during load",
            str(report.token_calls_load),
            "0",
            report.token_calls_load == 0,
        ),
        ("token-endpoint calls at start", str(report.token_calls_startup), "", None),
        (
            "start to ready, s",
            f"{report.startup_s:.2f}",
            f"<= {TARGET_STARTUP_S:g}",
            report.startup_s <= TARGET_STARTUP_S,
        ),
    ]
    marks = {None: "", True: "met", False: "**missed**"}
    return [
        "| figure | measured | target | |",
        "|---|---:|---:|---|",
        *(f"| {name} | {value} | {goal} | {marks[ok]} |" for name, value, goal, ok in rows),
    ]


def markdown(report: Report, plot_name: str) -> str:
    """The results as Markdown: absolute figures, ratios, targets, and the plot."""
    gateway = report.target("gateway")
    lateness = sorted(gateway.lateness_ms) if gateway else []
    achieved = [rate for target in report.targets for rate in target.achieved]
    check = (
        f"Open-loop check: the lowest achieved rate of any target and round was "
        f"{min(achieved, default=math.nan):,.0f} req/s for {report.opts.rate:g} asked"
    )
    if lateness:
        check += (
            f"; requests left the generator a median {_ms(percentile(lateness, 50))} ms and a "
            f"p99 {_ms(percentile(lateness, 99))} ms after their scheduled time"
        )
    if gateway:
        check += (
            f". The gateway's own metrics counted {report.gateway_requests_counted:,.0f} "
            f"requests and it wrote {report.log_lines:,} log lines; the measured rounds sent "
            f"it {gateway.requests + gateway.closed_requests:,} (plus warm-up)"
        )
    return "\n".join(
        [
            "# ci-gateway benchmark results",
            "",
            _describe_setup(report),
            "",
            "Absolute figures depend on the machine; compare the ratios of one run.",
            "",
            *comparison_table(report),
            "",
            (
                "CPU and RSS are those of the process serving each target: the upstream nginx "
                "(direct), the proxy nginx (master and worker), the gateway. Latency runs from "
                "writing a request to reading its whole answer."
            ),
            "",
            "## Against the targets",
            "",
            *target_table(report),
            "",
            check + ".",
            "",
            f"![latency percentiles]({plot_name})",
            "",
        ]
    )


def plot(report: Report, path: Path) -> None:
    """Latency percentile curves of the three targets (x: percentile on a 'nines' scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=110)
    ticks = [0.0, 50.0, 90.0, 99.0, 99.9, 99.99]
    for target in report.targets:
        ordered = sorted(target.latencies_ms)
        if not ordered:
            continue
        n = len(ordered)
        qs = [100 * (i + 0.5) / n for i in range(n)]
        xs = [-math.log10(1 - q / 100) for q in qs]
        axes.plot(xs, ordered, label=f"{target.name} (p50 {target.percentile(50):.2f} ms)")
    axes.set_xticks([-math.log10(1 - q / 100) for q in ticks])
    axes.set_xticklabels([f"p{q:g}" for q in ticks])
    axes.set_yscale("log")
    axes.set_ylabel("latency, ms (log)")
    axes.set_title(f"Latency at {report.opts.rate:g} req/s, open loop")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


# --------------------------------------------------------------------------- CLI


def parse(argv: Sequence[str] | None) -> Options:
    """Command-line options; --quick is the smoke-test size."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.perf.bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few seconds, tiny sizes (the smoke test)"
    )
    parser.add_argument(
        "--fleet",
        action="store_true",
        help="run the fleet-mode benchmark instead (tests/perf/fleet.py; needs redis-server)",
    )
    parser.add_argument("--duration", type=float, help="seconds per measurement (default 10)")
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 5)")
    parser.add_argument("--rate", type=float, help="open-loop requests/s (default 1000)")
    parser.add_argument("--connections", type=int, help="closed-loop connections (default 50)")
    parser.add_argument("--stream-mib", type=int, help="MiB streamed each way (default 1024)")
    parser.add_argument(
        "--tools",
        choices=("auto", "python"),
        default="auto",
        help="python: ignore nginx/wrk/hey even when installed",
    )
    parser.add_argument(
        "--open-loop", choices=("python", "hey"), default="python", help="fixed-rate generator"
    )
    parser.add_argument("--workers", type=int, default=1, help="CIGW_WORKERS for the gateway")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="where outputs go")
    parser.add_argument(
        "--write-results", action="store_true", help="also write tests/perf/RESULTS.md and its plot"
    )
    parser.add_argument(
        "--gateway-src", type=Path, default=REPO, help="run the gateway package from this folder"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the gateway (repeatable), e.g. MALLOC_ARENA_MAX=2",
    )
    parser.add_argument(
        "--profile-at-rate",
        action="store_true",
        help="with --profile: load at the fixed --rate instead of saturating",
    )
    parser.add_argument(
        "--candidate-src",
        type=Path,
        help="also measure the gateway package in this folder, in the same rounds (A/B)",
    )
    parser.add_argument(
        "--targets",
        default="direct,nginx,gateway",
        help="comma-separated subset to measure (e.g. gateway, to compare gateway builds)",
    )
    parser.add_argument(
        "--routes",
        action="store_true",
        help="measure what routing and link rewriting add instead (tests/perf/routes_bench.py)",
    )
    parser.add_argument(
        "--profile",
        choices=("py-spy", "pyinstrument"),
        help="profile the saturated gateway instead",
    )
    parser.add_argument(
        "--caller-auth",
        action="store_true",
        help="instead: what caller authentication adds to p50 (tests/perf/caller_auth.py)",
    )
    args = parser.parse_args(argv)
    base = (
        Options(duration=0.5, rounds=1, warmup=0.2, rate=200, connections=8, stream_bytes=8 * MIB)
        if args.quick
        else Options()
    )
    chosen = {
        "duration": args.duration,
        "rounds": args.rounds,
        "rate": args.rate,
        "connections": args.connections,
        "stream_bytes": args.stream_mib * MIB if args.stream_mib is not None else None,
        "tools": args.tools,
        "open_loop": args.open_loop,
        "workers": args.workers,
        "out": args.out.resolve(),
        "write_results": args.write_results,
        "gateway_src": args.gateway_src.resolve(),
        "profile": args.profile,
        "profile_at_rate": args.profile_at_rate,
        "candidate_src": args.candidate_src.resolve() if args.candidate_src else None,
        "targets": tuple(name.strip() for name in args.targets.split(",")),
        "extra_env": tuple(tuple(item.split("=", 1)) for item in args.env) or None,
        "routes": args.routes or None,
        "caller_auth": args.caller_auth or None,
    }
    return dataclasses.replace(base, **{k: v for k, v in chosen.items() if v is not None})


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the Markdown report."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if "--fleet" in arguments:
        # Fleet mode's own scenarios, on Redis (tests/perf/fleet.py); --quick and --out apply.
        from tests.perf.fleet import main as fleet_main

        return fleet_main([word for word in arguments if word != "--fleet"])
    opts = parse(argv)
    if platform.system() != "Linux":
        print("the benchmark reads /proc: Linux only", file=sys.stderr)  # noqa: T201
        return 2
    opts.out.mkdir(parents=True, exist_ok=True)

    def say(message: str) -> None:
        print(f"[bench] {message}", file=sys.stderr, flush=True)  # noqa: T201

    if opts.routes:
        from tests.perf import routes_bench  # its own scenario, its own module

        return routes_bench.main(opts, say)

    if opts.caller_auth:
        from tests.perf import caller_auth  # its own scenario module

        figure = asyncio.run(caller_auth.run(opts, say))
        print(caller_auth.write(figure, opts.out))  # noqa: T201
        return 0
    try:
        import uvloop
    except ImportError:
        report = asyncio.run(run(opts, say))
    else:
        report = uvloop.run(run(opts, say))
    if opts.profile:
        name = "profile-top.txt" if opts.profile == "py-spy" else "profile-pyinstrument.txt"
        print((opts.out / name).read_text())  # noqa: T201
        return 0
    for target in report.targets:
        say(
            f"{target.name}: max {target.rps:,.0f}/s (rounds "
            f"{', '.join(f'{rps:,.0f}' for rps in target.throughput)}), "
            f"p50/p90/p99 {target.percentile(50):.3f}/{target.percentile(90):.3f}/"
            f"{target.percentile(99):.3f} ms, CPU {target.cpu_per_1000:.3f} s/1000 "
            f"(rounds {', '.join(f'{cpu:.3f}' for cpu in target.rate_cpu)}), "
            f"RSS {_median(target.rss) / 1e6:.1f} MB"
            + (f" (idle {report.gateway_rss_idle / 1e6:.1f})" if target.name == "gateway" else "")
        )
    plot(report, opts.out / "latency.png")
    text = markdown(report, "latency.png")
    (opts.out / "RESULTS.md").write_text(text)
    (opts.out / "results.json").write_text(json.dumps(summary(report), indent=2))
    if opts.write_results:
        shutil.copy(opts.out / "latency.png", HERE / "latency.png")
        (HERE / "RESULTS.md").write_text(text)
    print(text)  # noqa: T201
    return 0


def summary(report: Report) -> dict[str, object]:
    """Machine-readable figures (tests/perf/out/results.json)."""
    return {
        "targets": {
            t.name: {
                "rps": t.throughput,
                "p50_ms": t.percentile(50),
                "p90_ms": t.percentile(90),
                "p99_ms": t.percentile(99),
                "achieved": t.achieved,
                "cpu_per_1000": t.cpu_per_1000,
                "cpu_per_1000_rounds": t.rate_cpu,
                "rss_median": statistics.median(t.rss) if t.rss else None,
                "errors": t.errors,
            }
            for t in report.targets
        },
        "startup_s": report.startup_s,
        "token_calls_startup": report.token_calls_startup,
        "token_calls_load": report.token_calls_load,
        "gateway_rss_idle": report.gateway_rss_idle,
        "libraries_rss": report.libraries_rss,
        "streams": [
            {"direction": s.direction, "size": s.size, "growth": s.growth, "seconds": s.seconds}
            for s in report.streams
        ],
    }


if __name__ == "__main__":
    sys.exit(main())
