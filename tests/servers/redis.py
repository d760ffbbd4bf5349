"""A real `redis-server` (the Debian package) on a loopback port, stopped by its PID."""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@dataclass
class RedisServer:
    """One redis-server process; `start`, `kill` and `start` again keep its port."""

    directory: Path
    port: int = field(default_factory=free_port)
    password: str | None = None
    # (certificate chain, key, CA) files: TLS only, on `port`.
    tls: tuple[Path, Path, Path] | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """redis:// or rediss:// URL of database 0, without credentials."""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    def start(self, within: float = 10.0) -> None:
        """Start the server and wait until it answers."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed: `make test` installs it (Debian redis-server)"
            )
        arguments = [
            binary,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--logfile",
            str(self.directory / "redis.log"),
        ]
        if self.tls:
            chain, key, ca = self.tls
            arguments += ["--port", "0", "--tls-port", str(self.port)]
            arguments += ["--tls-cert-file", str(chain), "--tls-key-file", str(key)]
            arguments += ["--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
        else:
            arguments += ["--port", str(self.port)]
        if self.password:
            arguments += ["--requirepass", self.password]
        self.process = subprocess.Popen(
            arguments, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + within
        while not self._answers():
            if self.process.poll() is not None:
                log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited {self.process.returncode}: {log}")
            if time.monotonic() > deadline:
                raise TimeoutError("redis-server did not answer")
            time.sleep(0.02)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw:
                if not self.tls:
                    raw.sendall(b"PING\r\n")
                    reply = raw.recv(64)
                    return reply.startswith((b"+PONG", b"-NOAUTH"))
                context = ssl.create_default_context(cafile=str(self.tls[2]))
                with context.wrap_socket(raw, server_hostname="127.0.0.1") as wrapped:
                    wrapped.sendall(b"PING\r\n")
                    return wrapped.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: the way a crashed or evicted Redis goes (no goodbye to clients)."""
        self._stop(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM and wait."""
        self._stop(signal.SIGTERM)

    def _stop(self, signum: signal.Signals) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signum)
        self.process.wait(10)
        self.process = None

    def command(self, *words: str) -> str:
        """Run one command with redis-cli (plain TCP servers only): its output."""
        arguments = ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port)]
        if self.password:
            arguments += ["--no-auth-warning", "-a", self.password]
        result = subprocess.run(
            [*arguments, *words], capture_output=True, text=True, timeout=10, check=True
        )
        return result.stdout.strip()
