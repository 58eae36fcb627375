"""Structured logs: JSON lines (the default off a TTY) or text, with the current trace and span ids.

Every `extra={...}` field of a log call becomes a JSON field. A redacting filter scrubs the configured
secrets (API key, auth token) from every record as a last line of defence; the code never logs them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any, TextIO

from opentelemetry import trace

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}
REDACTED = "<redacted>"
_FIELDS = "_sidecar_fields"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    """The record's `extra` fields, collected once per record (the redacting filter and the formatter both read
    them, and the sidecar writes two lines per item)."""
    attributes = record.__dict__
    fields: dict[str, Any] | None = attributes.get(_FIELDS)
    if fields is None:
        fields = {k: v for k, v in attributes.items() if k not in _STANDARD and k[0] != "_"}
        attributes[_FIELDS] = fields
    return fields


def _trace_ids() -> dict[str, str]:
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return {}
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}


_second: tuple[int, str] = (-1, "")


def _utc_milliseconds(created: float) -> str:
    """`created` as ISO 8601 UTC to the millisecond (what `datetime.isoformat(timespec="milliseconds")` gives),
    the date and time formatted once per second."""
    global _second
    whole = int(created)
    second, prefix = _second
    if second != whole:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _second = (whole, prefix)
    return f"{prefix}.{int((created - whole) * 1000):03d}+00:00"


_encode = json.JSONEncoder(default=str).encode


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _utc_milliseconds(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_trace_ids())
        entry.update(_extras(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _encode(entry)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        fields = " ".join(f"{k}={v}" for k, v in {**_extras(record), **_trace_ids()}.items())
        text = f"{when} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if fields:
            text += f"  {fields}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class RedactingFilter(logging.Filter):
    """Replaces any of the given secrets in a record's message and extra fields."""

    def __init__(self, secrets: Iterable[str | None]) -> None:
        super().__init__()
        self._secrets = [s for s in secrets if s and len(s) >= 6]

    def _scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self._secrets:
                if secret in value:
                    value = value.replace(secret, REDACTED)
        return value

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        record.msg = self._scrub(record.getMessage())
        record.args = None
        fields = _extras(record)
        for key, value in fields.items():
            if isinstance(value, str):
                fields[key] = scrubbed = self._scrub(value)
                setattr(record, key, scrubbed)
        return True


LOG_FORMATS = ("auto", "json", "text")
"""What `--log-format` takes, in every command: `auto` is text on a TTY, else JSON lines."""


def configure_logging(
    *, fmt: str = "auto", level: str = "INFO", secrets: Iterable[str | None] = (), stream: TextIO | None = None
) -> None:
    stream = stream or sys.stderr
    # Record attributes no formatter here shows: not collected for every line (the logging HOWTO's
    # "Optimization": no caller frame walk, no thread, process or multiprocessing lookup per record).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    if fmt == "auto":
        fmt = "text" if stream.isatty() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactingFilter(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "uvicorn.access", "uvicorn.error", "grpc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
