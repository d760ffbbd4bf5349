"""structlog set-up: JSON lines when not on a terminal, and a last-line-of-defence redactor.

Secrets are never passed to a logger on purpose; the redactor exists so that a future
mistake (an exception message quoting a header, say) still cannot print one.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections import deque
from json.encoder import encode_basestring_ascii
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
REDACTED = "[REDACTED]"


class Redactor:
    """Replaces every registered secret value in log events with a marker."""

    def __init__(self, max_values: int = 64) -> None:
        # Bounded: issued tokens are registered as they arrive, old ones age out.
        self._values: deque[str] = deque(maxlen=max_values)

    def register(self, value: str) -> None:
        """Never print `value`; short values are ignored (they would redact ordinary words)."""
        if len(value) >= 8 and value not in self._values:
            self._values.append(value)

    def scrub(self, text: str) -> str:
        """`text` with every registered secret replaced."""
        for value in self._values:
            if value in text:
                text = text.replace(value, REDACTED)
        return text

    def __call__(self, _logger: WrappedLogger, _name: str, event: EventDict) -> EventDict:
        if not self._values:
            return event
        for key, value in event.items():
            if isinstance(value, str):
                event[key] = self.scrub(value)
            elif value is not None and not isinstance(value, int | float | bool):
                event[key] = self.scrub(str(value))
        return event


redactor = Redactor()


def configure(
    level: str = "info", fmt: str = "auto", stream: TextIO | None = None, *, cache: bool = True
) -> None:
    """Configure structlog once per process; `fmt` auto means JSON unless on a terminal.

    `cache` binds each logger on first use (fast); tests that reconfigure per test turn it off.
    """
    stream = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    factory = _LineLoggerFactory(stream)
    # The access line skips structlog's processor chain when it is JSON; the other
    # formats go through structlog like every other line.
    access_log.direct = factory.access_logger if fmt == "json" else None
    access_log.enabled = _LEVELS[level] <= logging.INFO
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redactor,
            renderer,
        ],
        # Filtering at the bound logger skips building events for disabled levels entirely.
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=cache,
    )
    # aiohttp and msal log through the standard library; route warnings to the same stream.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_StdlibFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(_LEVELS[level], logging.WARNING))


class _LineLogger:
    """structlog's WriteLogger, with info lines optionally left in the stream's buffer.

    The access line of every request, flushed one by one, cost a write(2) into the
    container runtime's pipe per request (6 of the 15 µs a line costs, tests/perf). The
    access logger therefore leaves info lines in the buffer until it fills or `flush()`
    runs (each second and at shutdown), as nginx's `access_log ... buffer= flush=` does.
    Every other line, and any warning or error, goes out at once with what is buffered.
    """

    def __init__(self, stream: TextIO, lock: threading.Lock, *, buffer_info: bool) -> None:
        self.stream, self.lock, self._buffer_info = stream, lock, buffer_info

    def info(self, message: str) -> None:
        with self.lock:
            self.stream.write(message + "\n")
            if not self._buffer_info:
                self.stream.flush()

    debug = log = msg = info

    def error(self, message: str) -> None:
        with self.lock:
            self.stream.write(message + "\n")
            self.stream.flush()

    warn = warning = err = fatal = failure = critical = exception = error


class _LineLoggerFactory:
    """Hands the access logger a buffering line logger, every other logger a flushing one."""

    def __init__(self, stream: TextIO) -> None:
        global _current  # noqa: PLW0603 - one output per process, like structlog's own config
        lock = threading.Lock()
        self.access_logger = _LineLogger(stream, lock, buffer_info=True)
        _current = self._flushing = _LineLogger(stream, lock, buffer_info=False)

    def __call__(self, *args: Any) -> _LineLogger:
        return self.access_logger if args and args[0] == BUFFERED_LOGGER else self._flushing


BUFFERED_LOGGER = "access"
_current: _LineLogger | None = None


class AccessLog:
    """The one line per request, with the same fields, redaction and buffering as the rest.

    It is the only log call every request makes: as JSON it is written here from a
    template (1 µs) instead of through structlog's processor chain and the JSON encoder
    (8 µs); strings are escaped by the stdlib's JSON string encoder. Any other format goes
    through structlog (tests/perf/README.md).
    """

    def __init__(self) -> None:
        self.enabled = True
        self.direct: _LineLogger | None = None  # set by configure() for JSON output
        self._structlog = get_logger(BUFFERED_LOGGER)
        self._second = -1
        self._second_text = ""

    def request(
        self,
        request_id: str,
        path: str,
        *,
        method: str,
        status: int,
        duration_ms: float,
        upstream_status: int | None,
        key_slot: str | None,
        error: str | None,
        aborted: bool | None,
        caller: str | None = None,
    ) -> None:
        """Log one answered request; `caller` is the verified namespace/serviceaccount."""
        if not self.enabled:
            return
        direct = self.direct
        if direct is None:
            self._structlog.info(
                "request",
                method=method,
                path=path,
                status=status,
                duration_ms=duration_ms,
                upstream_status=upstream_status,
                key_slot=key_slot,
                error=error,
                aborted=aborted,
                caller=caller,
            )  # request_id is in the context
            return
        # Only the path and the request ID come from the caller; every other field is a
        # number or a word the gateway chose. Only those two pass the redactor.
        direct.info(
            f'{{"component": "access", "method": {_string(method)}, '
            f'"path": {_string(redactor.scrub(path))}, "status": {status}, '
            f'"duration_ms": {duration_ms!r}, "upstream_status": {_number(upstream_status)}, '
            f'"key_slot": {_string(key_slot)}, "error": {_string(error)}, '
            f'"aborted": {"true" if aborted else "null"}, "caller": {_string(caller)}, '
            f'"event": "request", '
            f'"request_id": {_string(redactor.scrub(request_id))}, "level": "info", '
            f'"timestamp": "{self._timestamp()}"}}'
        )

    def _timestamp(self) -> str:
        """Now, as structlog's TimeStamper(fmt="iso", utc=True) writes it."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((now - second) * 1_000_000):06d}Z"


def _string(value: str | None) -> str:
    return "null" if value is None else encode_basestring_ascii(value)


def _number(value: int | None) -> str:
    return "null" if value is None else str(value)


def flush() -> None:
    """Write out buffered log lines."""
    if _current is not None:
        with _current.lock:
            _current.stream.flush()


async def flush_periodically(interval: float = 1.0) -> None:
    """Flush buffered lines every `interval` seconds (a background task of the app)."""
    while True:
        await asyncio.sleep(interval)
        flush()


class _StdlibFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redactor.scrub(super().format(record))


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    """A logger bound to a component name."""
    # The name reaches the logger factory, which buffers the access logger's info lines.
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(name, component=name)
    return logger


access_log = AccessLog()
