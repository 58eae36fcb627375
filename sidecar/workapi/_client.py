"""The async Work API client: eight operations, two providers, retries with deadlines."""

from __future__ import annotations

import email.utils
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, stop_before_delay

from ..wire import (
    MAX_BLOCK_MS,
    MIN_BLOCK_MS,
    NO_HEARTBEAT,
    OPERATIONS,
    REQUEST_ID_HEADER,
    RETRY_AFTER_HEADER,
    RETRY_AFTER_MS_HEADER,
    SHOULD_RETRY_HEADER,
    CredentialStyle,
    Provider,
    get_provider,
)
from . import _telemetry
from ._errors import (
    APIStatusError,
    RequestTimeout,
    ResponseError,
    TransportError,
    WorkApiError,
    status_error_class,
)
from ._models import HeartbeatResult, ModelError, QueueStats, Work, WorkPage, cursor_params
from ._retry import RetryPolicies, backoff_wait, is_retryable
from ._transport import describe_failure, make_transport

__all__ = ["Timeouts", "WorkApiClient"]

log = logging.getLogger("sidecar.workapi")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds. A long poll's read timeout is its block_ms plus `poll_margin`."""

    connect: float = 5.0
    read: float = 15.0
    write: float = 10.0
    pool: float = 10.0
    poll_margin: float = 10.0

    def httpx(self, read: float | None = None) -> httpx.Timeout:
        return httpx.Timeout(connect=self.connect, read=read or self.read, write=self.write, pool=self.pool)


KEEPALIVE_CONNECTIONS = 16
"""Idle keep-alive connections kept to the Work API (bursts open more, up to max_connections)."""


class WorkApiClient:
    """Talks to one environment's Work API.

    >>> client = WorkApiClient(provider="anthropic", api_key=KEY, environment_id="env_…")
    >>> work = await client.poll(block_ms=MAX_BLOCK_MS)
    """

    def __init__(
        self,
        *,
        provider: str | Provider,
        api_key: str,
        environment_id: str,
        base_url: str | None = None,
        worker_id: str | None = None,
        timeouts: Timeouts | None = None,
        retry: RetryPolicies | None = None,
        max_connections: int = 100,
        http_backend: str = "aiohttp",
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.provider = get_provider(provider)
        self._check_id("environment_id", environment_id)
        self.environment_id = environment_id
        self.worker_id = worker_id or f"work-sidecar-{uuid.uuid4().hex[:12]}"
        self.base_url = (base_url or self.provider.default_base_url).rstrip("/")
        self.timeouts = timeouts or Timeouts()
        self.retry = retry or RetryPolicies()
        headers = {"user-agent": "work-sidecar/0.1", "accept": "application/json", **self.provider.extra_headers}
        headers[self.provider.worker_id_header] = self.worker_id
        if self.provider.credential_styles[0] is CredentialStyle.BEARER:
            headers["authorization"] = f"Bearer {api_key}"
        else:
            headers["x-api-key"] = api_key
        # Few idle connections kept: httpcore checks every pooled connection (a socket poll each) on every
        # request and response, so a pool grown to 100 by a burst of heartbeats made each later one cost ~100.
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=min(max_connections, KEEPALIVE_CONNECTIONS)
        )
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=self.timeouts.httpx(),
            limits=limits,
            transport=transport or make_transport(http_backend, limits),
            follow_redirects=False,
        )

    def __repr__(self) -> str:
        return (
            f"WorkApiClient(provider={self.provider.name!r}, base_url={self.base_url!r}, "
            f"environment_id={self.environment_id!r}, worker_id={self.worker_id!r})"
        )

    async def __aenter__(self) -> WorkApiClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- the eight operations -------------------------------------------------------------------------

    async def poll(self, *, block_ms: int | None = None, reclaim_older_than_ms: int | None = None) -> Work | None:
        """Long-poll for one item; None when nothing came within block_ms (1..MAX_BLOCK_MS; None returns at once)."""
        params: dict[str, str] = {}
        read_timeout = self.timeouts.read
        if block_ms is not None:
            if not MIN_BLOCK_MS <= block_ms <= MAX_BLOCK_MS:
                raise ValueError(f"block_ms must be {MIN_BLOCK_MS}..{MAX_BLOCK_MS}, not {block_ms}")
            params["block_ms"] = str(block_ms)
            read_timeout = block_ms / 1000 + self.timeouts.poll_margin
        if reclaim_older_than_ms is not None:
            if reclaim_older_than_ms < 0:
                raise ValueError("reclaim_older_than_ms must not be negative")
            params["reclaim_older_than_ms"] = str(reclaim_older_than_ms)
        body = await self._call("poll", params=params, read_timeout=read_timeout)
        return None if body is None else self._parse(Work.from_json, body, "poll")

    async def ack(self, work_id: str) -> Work:
        """Acknowledge a polled item: queued → starting. A 409 is final (not this worker's to take)."""
        body = await self._call("ack", work_id)
        return self._parse(Work.from_json, body, "ack")

    async def heartbeat(
        self,
        work_id: str,
        *,
        expected_last_heartbeat: str | None = NO_HEARTBEAT,
        desired_ttl_seconds: int | None = None,
        deadline: float | None = None,
    ) -> HeartbeatResult:
        """Renew the lease with compare-and-swap; raises LeaseLostError on 412.

        `expected_last_heartbeat`: NO_HEARTBEAT for the first, then the previous `last_heartbeat`
        exactly (None sends none: an unconditional update where the provider allows it).
        `deadline`: seconds within which all attempts must finish (the heartbeat interval).
        """
        params: dict[str, str] = {}
        if expected_last_heartbeat is not None:
            params["expected_last_heartbeat"] = expected_last_heartbeat
        if desired_ttl_seconds is not None:
            if desired_ttl_seconds <= 0:
                raise ValueError("desired_ttl_seconds must be a positive integer")
            params["desired_ttl_seconds"] = str(int(desired_ttl_seconds))
        body = await self._call("heartbeat", work_id, params=params, deadline=deadline)
        return self._parse(HeartbeatResult.from_json, body, "heartbeat")

    async def stop(self, work_id: str, *, force: bool = False) -> Work:
        """Request a graceful stop (force=False) or stop at once (force=True)."""
        body = await self._call("stop", work_id, json={"force": force})
        return self._parse(Work.from_json, body, "stop")

    async def get(self, work_id: str) -> Work:
        """Read an item (its secret is always null here)."""
        body = await self._call("get", work_id)
        return self._parse(Work.from_json, body, "get")

    async def update_metadata(self, work_id: str, metadata: Mapping[str, str | None]) -> Work:
        """Merge metadata: a string sets a key, None deletes it, absent keys stay as they are."""
        for key, value in metadata.items():
            if not isinstance(key, str) or not (value is None or isinstance(value, str)):
                raise ValueError("metadata keys must be strings and values strings or None")
        body = await self._call("update", work_id, json={"metadata": dict(metadata)})
        return self._parse(Work.from_json, body, "update")

    async def list_page(
        self,
        *,
        limit: int | None = None,
        cursor: str | None = None,
        page: str | None = None,
        after_id: str | None = None,
        before_id: str | None = None,
    ) -> WorkPage:
        """One page of the environment's items; pass its `next_cursor` back as `cursor` for the next one.

        `page`, `after_id` and `before_id` are the provider's own parameters, for callers that want them.
        """
        params: dict[str, str] = {}
        if limit is not None:
            if not 1 <= limit <= self.provider.list_max_limit:
                raise ValueError(f"limit must be 1..{self.provider.list_max_limit}")
            params["limit"] = str(limit)
        params.update(cursor_params(cursor, self.provider.pagination))
        if page:
            params["page"] = page
        if after_id:
            params["after_id"] = after_id
        if before_id:
            params["before_id"] = before_id
        body = await self._call("list", params=params)
        pagination = self.provider.pagination
        return self._parse(lambda obj: WorkPage.from_json(obj, pagination), body, "list")

    async def iter_work(self, *, page_size: int | None = None) -> AsyncIterator[Work]:
        """Every item of the environment, fetching pages as needed."""
        cursor: str | None = None
        while True:
            result = await self.list_page(limit=page_size, cursor=cursor)
            for item in result.data:
                yield item
            cursor = result.next_cursor
            if cursor is None:
                return

    async def stats(self) -> QueueStats:
        body = await self._call("stats")
        return self._parse(QueueStats.from_json, body, "stats")

    # -- plumbing ------------------------------------------------------------------------------------

    def _check_id(self, name: str, value: str) -> None:
        if not isinstance(value, str) or not self.provider.id_pattern.match(value):
            raise ValueError(f"{name} is not a valid id")

    def _work_id(self, work_id: str) -> str:
        self._check_id("work_id", work_id)
        return work_id

    @staticmethod
    def _parse(parser: Callable[[Any], T], body: Any, operation: str) -> T:
        try:
            return parser(body)
        except ModelError as exc:
            raise ResponseError(f"{operation}: unexpected response: {exc}", operation=operation) from None

    async def _call(
        self,
        operation: str,
        work_id: str | None = None,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        read_timeout: float | None = None,
        deadline: float | None = None,
    ) -> Any:
        policy = self.retry.for_operation(operation)
        total = policy.deadline if deadline is None else min(deadline, policy.deadline)
        started = time.monotonic()
        method, route = OPERATIONS[operation].method, OPERATIONS[operation].route
        suffix = route if work_id is None else route.format(work_id=self._work_id(work_id))
        path = self.provider.work_path(self.environment_id, suffix)
        retrying = AsyncRetrying(
            stop=stop_after_attempt(policy.max_attempts) | stop_before_delay(total),
            wait=backoff_wait(policy),  # type: ignore[arg-type]
            retry=retry_if_exception(lambda exc: is_retryable(exc, operation)),
            before_sleep=lambda state: self._log_retry(operation, state.attempt_number, state),
            reraise=True,
        )
        attempt = 0
        try:
            async for attempt_ctx in retrying:
                with attempt_ctx:
                    attempt = attempt_ctx.retry_state.attempt_number
                    remaining = total - (time.monotonic() - started)
                    if remaining <= 0:
                        raise RequestTimeout(f"{operation}: deadline of {total:.1f}s passed", operation=operation)
                    timeout = min(read_timeout or self.timeouts.read, remaining)
                    return await self._send_once(operation, method, path, params, json, timeout, attempt)
        except WorkApiError as exc:
            exc.attempts = attempt
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _log_retry(self, operation: str, attempt: int, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        log.warning(
            "work api attempt failed; retrying",
            extra={
                "operation": operation,
                "attempt": attempt,
                "error": str(exc),
                "retry_in": round(state.upcoming_sleep, 2),
            },
        )

    async def _send_once(
        self,
        operation: str,
        method: str,
        path: str,
        params: Mapping[str, str] | None,
        json: Any,
        read_timeout: float,
        attempt: int,
    ) -> Any:
        route = self.provider.path_prefix + OPERATIONS[operation].route
        with _telemetry.request_span(operation, method, route, self.provider.name, attempt) as span:
            started = time.monotonic()
            try:
                response = await self._http.request(
                    method,
                    path,
                    params=params,
                    json=json,
                    timeout=self.timeouts.httpx(read=read_timeout),
                )
            except httpx.TransportError as exc:
                timed_out, name = describe_failure(exc)
                span.failed(name)
                if timed_out:
                    raise RequestTimeout(f"{operation} timed out ({name})", operation=operation) from None
                raise TransportError(f"{operation} failed: {name}: {exc}", operation=operation) from None
            finally:
                _telemetry.record_latency(operation, time.monotonic() - started)
            request_id = response.headers.get(REQUEST_ID_HEADER)
            span.answered(response.status_code, request_id)
            if response.status_code >= 400:
                raise self._status_error(operation, response, request_id)
            try:
                return response.json()
            except ValueError:
                raise ResponseError(
                    f"{operation}: HTTP {response.status_code} with a body that is not JSON", operation=operation
                ) from None

    @staticmethod
    def _status_error(operation: str, response: httpx.Response, request_id: str | None) -> APIStatusError:
        error_type, message, details = "api_error", response.reason_phrase or "error", None
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            request_id = request_id or (body.get("request_id") if isinstance(body.get("request_id"), str) else None)
            error = body.get("error")
            if isinstance(error, dict):
                error_type = str(error.get("type") or error_type)
                message = str(error.get("message") or message)
                details = error.get("details") if isinstance(error.get("details"), dict) else None
        should_retry_header = response.headers.get(SHOULD_RETRY_HEADER)
        should_retry = {"true": True, "false": False}.get((should_retry_header or "").lower())
        cls = status_error_class(response.status_code, operation)
        return cls(
            status_code=response.status_code,
            error_type=error_type,
            message=message,
            details=details,
            request_id=request_id,
            operation=operation,
            retry_after=parse_retry_after(response.headers),
            should_retry=should_retry,
        )


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from `retry-after-ms`, or `retry-after` as seconds or an HTTP date."""
    value = headers.get(RETRY_AFTER_MS_HEADER)
    if value:
        try:
            ms = float(value)
            if math.isfinite(ms) and ms >= 0:
                return ms / 1000
        except ValueError:
            pass
    value = headers.get(RETRY_AFTER_HEADER)
    if not value:
        return None
    try:
        seconds = float(value)
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
