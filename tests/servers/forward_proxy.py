"""A real forward proxy for the egress tests: Debian's tinyproxy on a free loopback port.

Started with a generated configuration, stopped by its PID. Its log names every request
it carried (`CONNECT host:port` for tunnels, `GET http://...` for absolute-form), which
is how the tests prove that traffic went through it, or did not.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_REQUEST = re.compile(r"Request \(file descriptor \d+\): (\S+) (\S+) HTTP/1\.[01]")


@dataclass
class ForwardProxy:
    """A running tinyproxy: its address, credentials if it demands some, and its log."""

    port: int
    log: Path
    credentials: tuple[str, str] | None = None

    @property
    def address(self) -> str:
        """127.0.0.1:port, as the gateway names the proxy."""
        return f"127.0.0.1:{self.port}"

    def url(self, credentials: tuple[str, str] | None = None) -> str:
        """The proxy URL, with `credentials` (default: the proxy's own) in it."""
        user = credentials or self.credentials
        return f"http://{user[0]}:{user[1]}@{self.address}" if user else f"http://{self.address}"

    def requests(self) -> list[tuple[str, str]]:
        """(method, target) of every request the proxy received so far."""
        return _REQUEST.findall(self.log.read_text(errors="replace"))

    def carried(self, method: str, target_prefix: str) -> int:
        """How many received requests had `method` and a target starting with the prefix."""
        return sum(1 for m, t in self.requests() if m == method and t.startswith(target_prefix))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _accepting(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def running_tinyproxy(
    directory: Path, credentials: tuple[str, str] | None = None
) -> Iterator[ForwardProxy]:
    """tinyproxy on 127.0.0.1, allowing only loopback clients, while in use."""
    binary = shutil.which("tinyproxy") or shutil.which("tinyproxy", path="/usr/sbin:/usr/bin")
    if binary is None:
        raise RuntimeError("tinyproxy is not installed: `make test-tools` installs it (Debian)")
    port = _free_port()
    log = directory / "tinyproxy.log"
    log.write_text("")
    lines = [
        f"Port {port}",
        "Listen 127.0.0.1",
        "Allow 127.0.0.1",
        "Timeout 30",
        "MaxClients 50",
        f'LogFile "{log}"',
        "LogLevel Connect",  # one line per connection and per request line
        "DisableViaHeader Yes",
    ]
    if credentials is not None:
        lines.append(f"BasicAuth {credentials[0]} {credentials[1]}")
    config = directory / "tinyproxy.conf"
    config.write_text("\n".join(lines) + "\n")
    process = subprocess.Popen(
        [binary, "-d", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not _accepting(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tinyproxy did not start: {log.read_text()[-2000:]}")
            time.sleep(0.02)
        yield ForwardProxy(port, log, credentials)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
