"""Models, the secret, and header parsing (pure functions, no server needed)."""

from __future__ import annotations

import base64
import json
import pickle
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from sidecar.workapi import SecretDecodeError, Work, WorkSecret, parse_retry_after


def _secret(obj: dict[str, str], *, padded: bool) -> str:
    raw = base64.urlsafe_b64encode(json.dumps(obj).encode()).decode()
    return raw if padded else raw.rstrip("=")


@pytest.mark.parametrize("padded", [True, False])
def test_secret_decodes_with_or_without_padding(padded: bool) -> None:
    raw = _secret({"sessions_token": "sk-ant-req-abc", "api_base_url": "https://x"}, padded=padded)
    creds = WorkSecret(raw).decode()
    assert creds.sessions_token == "sk-ant-req-abc" and creds.api_base_url == "https://x"


def test_secret_never_prints() -> None:
    raw = _secret({"sessions_token": "sk-ant-req-hidden"}, padded=False)
    secret = WorkSecret(raw)
    creds = secret.decode()
    for text in (repr(secret), str(secret), repr(creds), f"{secret}"):
        assert "sk-ant-req-hidden" not in text and raw not in text
    with pytest.raises(TypeError):
        pickle.dumps(secret)


def test_bad_secret_error_does_not_echo_it() -> None:
    with pytest.raises(SecretDecodeError) as caught:
        WorkSecret("%%not-base64-sk-ant-req-x%%").decode()
    assert "sk-ant-req-x" not in str(caught.value)


def test_work_keeps_unknown_fields_and_hides_secret() -> None:
    work = Work.from_json(
        {
            "type": "work", "id": "work_1", "environment_id": "env_1", "data": {"type": "session", "id": "sesn_1"},
            "state": "queued", "metadata": {}, "created_at": "2026-01-01T00:00:00Z", "secret": "c2VjcmV0",
            "new_field": {"x": 1},
        }
    )  # fmt: skip
    assert work.extra == {"new_field": {"x": 1}}
    assert "c2VjcmV0" not in repr(work)


def test_retry_after_forms() -> None:
    assert parse_retry_after({"retry-after-ms": "1500"}) == 1.5
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    when = datetime.now(UTC) + timedelta(seconds=30)
    seconds = parse_retry_after({"retry-after": format_datetime(when, usegmt=True)})
    assert seconds is not None and 28 <= seconds <= 31
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


def test_the_work_apis_own_error_text_is_masked_in_our_exceptions() -> None:
    """#11.10. Guarantee: an error message from the Work API that quotes a secret never carries it into our
    exception text (and so into logs, spans and gRPC statuses); ids and ordinary words stay readable."""
    from sidecar.workapi import BadRequestError

    secret = "eyJzZXNzaW9uc190b2tlbiI6InNrLWFudC1yZXEtQUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVoi"
    error = BadRequestError(
        status_code=400,
        error_type="invalid_request_error",
        message=f"bad secret {secret} for work_011CggGShkqQV9cZ4YstEPag",
        details=None,
        request_id="req_1",
        operation="stop",
    )
    assert secret not in str(error) and "[redacted]" in str(error)
    assert "work_011CggGShkqQV9cZ4YstEPag" in str(error) and "bad secret" in str(error)
    assert error.server_message.endswith("work_011CggGShkqQV9cZ4YstEPag"), "the raw text stays for code"
    long = BadRequestError(
        status_code=400, error_type="x", message="word " * 200, details=None, request_id=None, operation="stop"
    )
    assert len(str(long)) < 400
