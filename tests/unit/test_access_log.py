"""The access line written from a template: valid JSON with the fields structlog would write."""

from __future__ import annotations

import io
import json
import re

from hypothesis import given
from hypothesis import strategies as st

from gateway import logging as gateway_logging

FIELDS = {
    "component",
    "method",
    "path",
    "status",
    "duration_ms",
    "upstream_status",
    "key_slot",
    "error",
    "aborted",
    "caller",
    "event",
    "request_id",
    "level",
    "timestamp",
}
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def _line(fmt: str, path: str, request_id: str = "r-1", **overrides: object) -> str:
    stream = io.StringIO()
    gateway_logging.configure("info", fmt, stream, cache=False)
    fields: dict[str, object] = {
        "method": "GET",
        "status": 200,
        "duration_ms": 0.42,
        "upstream_status": 200,
        "key_slot": "primary",
        "error": None,
        "aborted": None,
        **overrides,
    }
    gateway_logging.access_log.request(request_id, path, **fields)  # type: ignore[arg-type]
    gateway_logging.flush()
    return stream.getvalue()


@given(path=st.text(), request_id=st.text(min_size=1))
def test_any_path_gives_one_valid_json_line(path: str, request_id: str) -> None:
    """Quotes, backslashes, control and non-ASCII characters: one line that parses back."""
    text = _line("json", path, request_id)
    assert text.endswith("\n")
    assert text.count("\n") == 1
    event = json.loads(text)
    assert event["path"] == path
    assert event["request_id"] == request_id
    assert text.isascii()


def test_fields_match_structlogs_json_renderer() -> None:
    """The template writes the same fields and values as the structlog path would."""
    event = json.loads(_line("json", "/v1/a", upstream_status=None, error="upstream_timeout"))
    assert set(event) == FIELDS
    assert event["component"] == "access"
    assert event["event"] == "request"
    assert event["level"] == "info"
    assert event["status"] == 200
    assert event["duration_ms"] == 0.42
    assert event["upstream_status"] is None
    assert event["error"] == "upstream_timeout"
    assert event["aborted"] is None
    assert TIMESTAMP.fullmatch(event["timestamp"])


def test_aborted_is_true_only_when_set() -> None:
    """aborted is true for an aborted answer and null otherwise."""
    assert json.loads(_line("json", "/x", aborted=True))["aborted"] is True
    assert json.loads(_line("json", "/x", aborted=None))["aborted"] is None


def test_registered_secret_in_the_path_is_redacted() -> None:
    """A secret a caller puts in the path or request ID is replaced in the line."""
    secret = "canary-access-line-secret-0123"
    gateway_logging.redactor.register(secret)
    text = _line("json", f"/v1/{secret}/x", request_id=f"id-{secret}")
    assert secret not in text
    event = json.loads(text)
    assert event["path"] == f"/v1/{gateway_logging.REDACTED}/x"
    assert gateway_logging.REDACTED in event["request_id"]


def test_console_format_goes_through_structlog() -> None:
    """Other formats keep structlog's renderer: the line is not JSON but names the fields."""
    text = _line("console", "/v1/console-path")
    assert "/v1/console-path" in text
    assert "status=200" in text
    assert not text.lstrip().startswith("{")


def test_nothing_is_written_above_info() -> None:
    """With the level at warning, no access line is written."""
    stream = io.StringIO()
    gateway_logging.configure("warning", "json", stream, cache=False)
    gateway_logging.access_log.request(
        "r",
        "/p",
        method="GET",
        status=200,
        duration_ms=1.0,
        upstream_status=200,
        key_slot=None,
        error=None,
        aborted=None,
    )
    gateway_logging.flush()
    assert stream.getvalue() == ""
