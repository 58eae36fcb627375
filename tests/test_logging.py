"""Structured logs (`sidecar/_logging.py`): what a JSON line holds, that secrets never reach it, and that the cheap
timestamp is the ISO 8601 one it replaced."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar._logging import REDACTED, _utc_milliseconds, configure_logging

SECRET = "sk-ant-api03-LOGGING-SECRET-0123456789"


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging._srcfile)
    stream = io.StringIO()
    configure_logging(fmt="json", level="INFO", secrets=[SECRET], stream=stream)
    yield stream
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logging._srcfile = saved[2]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = True


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))  # 1970 .. 2100
def test_the_timestamp_is_iso_8601_utc_to_the_millisecond(created: float) -> None:
    expected = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
    got = _utc_milliseconds(created)
    # datetime rounds to the microsecond before it truncates to the millisecond: the same format, at most 1 ms apart
    assert len(got) == len(expected) and got.endswith("+00:00") and got[10] == "T"
    assert abs(datetime.fromisoformat(got) - datetime.fromisoformat(expected)).total_seconds() <= 0.001


def test_a_json_line_holds_the_message_and_extra_fields_and_no_secret(lines: io.StringIO) -> None:
    logging.getLogger("sidecar.test").warning(
        "stop failed for %s", SECRET, extra={"work_id": "work_1", "error": f"HTTP 500: {SECRET}", "attempt": 2}
    )
    logging.getLogger("sidecar.test").info("second line", extra={"n": 1})
    first, second = (json.loads(line) for line in lines.getvalue().splitlines())
    assert first["msg"] == f"stop failed for {REDACTED}" and first["error"] == f"HTTP 500: {REDACTED}"
    assert first["work_id"] == "work_1" and first["attempt"] == 2
    assert first["level"] == "warning" and first["logger"] == "sidecar.test"
    assert datetime.fromisoformat(first["ts"]).tzinfo is not None
    assert SECRET not in lines.getvalue()
    assert set(second) == {"ts", "level", "logger", "msg", "n"}  # no fields of the first line, nothing private
