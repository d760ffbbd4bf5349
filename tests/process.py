"""Running the real `python -m gateway` as a child process, for what only a process can show."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from yarl import URL

from tests.poll import eventually


@dataclass
class GatewayProcess:
    """A gateway child process whose stdout and stderr go to one file."""

    process: asyncio.subprocess.Process
    output: Path
    proxy_port: int = 0
    admin_port: int = 0

    def url(self, path: str) -> URL:
        """URL on the proxy listener, sent byte-exact (the client must not normalise it)."""
        return URL(f"http://127.0.0.1:{self.proxy_port}{path}", encoded=True)

    def admin(self, path: str) -> str:
        """URL on the admin listener."""
        return f"http://127.0.0.1:{self.admin_port}{path}"

    async def readiness(self) -> int:
        """The status /readyz answers now."""
        async with aiohttp.ClientSession() as session, session.get(self.admin("/readyz")) as r:
            return r.status

    async def wait_ready(self, within: float = 10.0) -> None:
        """Until /readyz answers 200."""
        await eventually(lambda: self.readiness_is(200), within=within, step=0.05)

    async def readiness_is(self, status: int) -> bool:
        """True when /readyz answers `status`."""
        return await self.readiness() == status

    def printed(self) -> str:
        """Everything the process printed so far."""
        return self.output.read_text(errors="replace")

    def rss_bytes(self) -> int:
        """Resident memory of the process now."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def signal(self, signum: signal.Signals) -> None:
        """Send a signal."""
        self.process.send_signal(signum)

    async def exit_code(self, within: float = 30.0) -> int:
        """Wait for the process to exit on its own (after a signal the test sent already)."""
        async with asyncio.timeout(within):
            return await self.process.wait()

    async def stop(self, within: float = 30.0) -> int:
        """SIGTERM, then wait for the exit code."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(within):
            return await self.process.wait()


# Every child started here; the `reap_gateway_processes` fixture ends those a failed test
# left running.
SPAWNED: list[asyncio.subprocess.Process] = []


def child_env(env: dict[str, str]) -> dict[str, str]:
    """The variables a child needs to run, plus `env`; nothing else leaks in from the test."""
    keep = {name: os.environ[name] for name in ("PATH", "HOME", "LANG") if name in os.environ}
    return {**keep, "CIGW_LOG_FORMAT": "json", **env}


async def spawn_gateway(env: dict[str, str], output: Path, *args: str) -> GatewayProcess:
    """Start `python -m gateway serve` and wait until it logs its listening addresses."""
    handle = output.open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "serve",
        *args,
        env=child_env(env),
        stdout=handle,
        stderr=asyncio.subprocess.STDOUT,
    )
    handle.close()
    SPAWNED.append(process)
    child = GatewayProcess(process, output)
    async with asyncio.timeout(15):
        while not child.proxy_port:
            if process.returncode is not None:
                raise RuntimeError(f"gateway exited {process.returncode}: {child.printed()}")
            for line in child.printed().splitlines():
                if '"listening"' in line:
                    event = json.loads(line)
                    child.proxy_port = int(event["proxy"].rsplit(":", 1)[1])
                    child.admin_port = int(event["admin"].rsplit(":", 1)[1])
            await asyncio.sleep(0.05)
    return child


async def run_cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """Run `python -m gateway ARGS` to completion: (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        *args,
        env=child_env(env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()
