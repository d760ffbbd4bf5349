"""Command line: `ci-gateway serve | check-config | sandbox`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway import logging as gateway_logging
from gateway.config import Settings, load
from gateway.errors import ConfigError
from gateway.group_metrics import WorkerGroup

EXIT_CONFIG = 2
log = gateway_logging.get_logger("cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ci-gateway",
        description="Authenticating sidecar for APIs behind Microsoft Entra ID and Azure APIM.",
    )
    parser.add_argument("--version", action="version", version=f"ci-gateway {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("serve", "run the proxy and admin listeners until SIGTERM/SIGINT"),
        ("check-config", "validate and print the effective configuration, secrets redacted"),
    ):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("--config", type=Path, help="YAML file (default: $CIGW_CONFIG)")
    sandbox = commands.add_parser(
        "sandbox",
        help="run a local token issuer, Customer Insights and Dataverse stand-ins and the gateway",
        description="Run the whole flow on this machine: a TLS token issuer, an APIM-guarded "
        "Customer Insights stand-in, and the gateway wired to both.",
    )
    sandbox.add_argument("--port", type=int, default=8080, help="gateway proxy port")
    sandbox.add_argument("--admin-port", type=int, default=9090, help="gateway admin port")
    sandbox.add_argument(
        "--token-lifetime", type=float, default=3600.0, help="seconds each issued token lives"
    )
    sandbox.add_argument(
        "--tls",
        action="store_true",
        help="serve the gateway's proxy listener over HTTPS with the sandbox CA",
    )
    sandbox.add_argument(
        "--rotate-keys",
        action="store_true",
        help="regenerate the primary key mid-run and show the gateway falling back",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ci-gateway` console script."""
    args = _parser().parse_args(argv)
    if args.command == "sandbox":
        from gateway.sandbox.run import main as sandbox_main  # the sandbox is a leaf

        exit_code: int = sandbox_main(args)
        return exit_code
    try:
        settings = load(os.environ, args.config)
    except ConfigError as exc:
        print(f"ci-gateway: {exc}", file=sys.stderr)  # noqa: T201 - the CLI's own output
        return EXIT_CONFIG
    if args.command == "check-config":
        width = max(len(name) for name in settings.describe())
        print("configuration is valid; effective settings:")  # noqa: T201
        for name, value in settings.describe().items():
            print(f"  {name:<{width}}  {value}")  # noqa: T201
        return 0
    gateway_logging.configure(settings.log_level, settings.log_format)
    return run(settings)


def run(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT; SIGHUP re-reads the subscription key files.

    With CIGW_WORKERS=N the process forks N-1 workers before any thread or event loop
    exists. They share nothing but the listening ports (SO_REUSEPORT: the kernel spreads
    connections): each gets its own token, keys and metrics. This process serves too and
    relays signals; when a worker dies unasked, all stop, so the platform restarts the pod.
    """
    if settings.redis_url is not None:
        from gateway.fleet import preflight

        try:
            preflight(settings)  # before forking: one clear exit 2 for a refused password
        except ConfigError as exc:
            print(f"ci-gateway: {exc}", file=sys.stderr)  # noqa: T201 - the CLI's own output
            return EXIT_CONFIG
    workers: list[int] = []
    group = None
    if settings.workers > 1:
        # Where each worker serves its own metrics, so a scrape of any reports them all.
        group_dir = Path(tempfile.mkdtemp(prefix="ci-gateway-workers-"))
        group = WorkerGroup(group_dir, 0, settings.workers)
    gateway_logging.flush()  # or the workers would each write out a copy of what is buffered
    for index in range(1, settings.workers):
        pid = os.fork()
        if pid == 0:
            assert group is not None  # noqa: S101 - forks happen only for workers > 1
            code = _run_loop(_serve(settings, [], dataclasses.replace(group, index=index)))
            gateway_logging.flush()  # os._exit skips the interpreter's own flush
            os._exit(code)
        workers.append(pid)
    code = _run_loop(_serve(settings, workers, group))
    for pid in workers:
        _, status = os.waitpid(pid, 0)
        code = code or os.waitstatus_to_exitcode(status)
    if group is not None:
        shutil.rmtree(group.directory, ignore_errors=True)
    return code


async def _serve(settings: Settings, workers: list[int], group: WorkerGroup | None) -> int:
    from gateway.app import create_app, serve

    gateway = create_app(settings, group=group)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    failed = False

    def relay(signum: int) -> None:
        stop.set()
        _signal_workers(workers, signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, relay, signum)
    reloads: set[asyncio.Task[None]] = set()

    def reload_keys() -> None:
        _signal_workers(workers, signal.SIGHUP)
        task = loop.create_task(gateway.reload_keys())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    def worker_exited(pidfd: int) -> None:
        nonlocal failed
        loop.remove_reader(pidfd)
        os.close(pidfd)
        if not stop.is_set():
            log.error("worker_exited", hint="stopping every worker so the pod restarts")
            failed = True
            relay(signal.SIGTERM)

    loop.add_signal_handler(signal.SIGHUP, reload_keys)
    for pid in workers:
        # A pidfd turns readable when the process exits (uvloop keeps SIGCHLD for itself).
        pidfd = os.pidfd_open(pid)
        loop.add_reader(pidfd, worker_exited, pidfd)
    await serve(gateway, stop)
    return 1 if failed else 0


def _signal_workers(workers: list[int], signum: int) -> None:
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):  # already gone: nothing to tell it
            os.kill(pid, signum)


def _run_loop(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # not on Linux: the standard loop works, only slower
        return asyncio.run(coro)
    return uvloop.run(coro)
