"""The async Work API client: eight operations, two providers, retries with deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import itertools
import json as jsonlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

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
from ._answer import AnswerError, decode
from ._errors import (
    APIStatusError,
    ConnectError,
    RequestTimeout,
    ResponseError,
    TLSError,
    TransportError,
    WorkApiError,
    masked,
    status_error_class,
)
from ._models import HeartbeatResult, ModelError, QueueStats, Work, WorkPage, cursor_params
from ._retry import RetryPolicies, RetryPolicy, is_retryable, retry_delay
from ._secret import SecretDecodeError
from ._transports import (
    Answer,
    AnswerTooLarge,
    ConnectFailed,
    ExchangeError,
    ExchangeTimeout,
    TLSFailed,
    make_exchange,
    take_turn,
)

if TYPE_CHECKING:
    import httpx

__all__ = ["Timeouts", "WorkApiClient"]

log = logging.getLogger("sidecar.workapi")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds. `read` is the overall deadline of one attempt (connect, send, the whole answer read): an answer
    that drips slowly ends there. A long poll's attempt deadline is its block_ms plus `poll_margin`."""

    connect: float = 5.0
    read: float = 15.0
    write: float = 10.0
    """Unused since every attempt has one overall deadline (`read`); kept for callers that set it."""
    pool: float = 10.0
    """Unused likewise."""
    poll_margin: float = 5.0


MAX_RESPONSE_BYTES = 1 << 20
"""The largest answer read (1 MiB): a larger one is a `ResponseError`, and never read into memory."""

ANSWER_TYPES = {
    "poll": "work",
    "ack": "work",
    "stop": "work",
    "get": "work",
    "update": "work",
    "heartbeat": "work_heartbeat",
    "stats": "work_queue_stats",
}
"""The `type` an operation's answer carries (a list page carries none of these): an answer of another type does not
belong to its request."""
REMEMBERED_SECRETS = 1024
"""Items' secrets (and their session tokens) the client masks by value in error texts: the most recent ones."""


@dataclass(frozen=True, slots=True)
class _Operation:
    """One operation's request, prebuilt: method, URL (with `{work_id}` where it names an item), headers."""

    name: str
    method: str
    url: str
    route: str
    """The URL template for spans (no ids)."""
    headers: Mapping[str, str]
    policy: RetryPolicy
    lane: asyncio.Semaphore
    """Bounds this operation's requests in flight: heartbeats have a lane of their own, the rest share one."""


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
        heartbeat_connections: int = 64,
        http_backend: str = "httptools",
        transport: httpx.AsyncBaseTransport | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        self.provider = get_provider(provider)
        self._check_id("environment_id", environment_id)
        self.environment_id = environment_id
        self.worker_id = worker_id or f"work-sidecar-{uuid.uuid4().hex[:12]}"
        self.base_url = (base_url or self.provider.default_base_url).rstrip("/")
        self.timeouts = timeouts or Timeouts()
        self.retry = retry or RetryPolicies()
        self.max_response_bytes = max_response_bytes
        if max_response_bytes < 1024:
            raise ValueError("max_response_bytes must be at least 1024")
        if max_connections < 1 or heartbeat_connections < 1:
            raise ValueError("max_connections and heartbeat_connections must be at least 1")
        headers = {"user-agent": "work-sidecar/0.1", "accept": "application/json", **self.provider.extra_headers}
        headers[self.provider.worker_id_header.lower()] = self.worker_id
        if self.provider.credential_styles[0] is CredentialStyle.BEARER:
            headers["authorization"] = f"Bearer {api_key}"
        else:
            headers["x-api-key"] = api_key
        self._headers = headers = {name.lower(): value for name, value in headers.items()}
        self._secrets: dict[str, None] = {api_key: None}
        """The values masked in every error text (an ordered set: the key, then the latest items' secrets)."""
        with_body = {**headers, "content-type": "application/json"}
        prefix = self.provider.work_path(self.environment_id)
        # Two lanes over one pool: heartbeats (claims, renewals, releases) never wait for a connection behind polls,
        # acks, stops or a sandbox's reads, which could otherwise hold every connection while leases run out.
        lanes = {"heartbeat": asyncio.Semaphore(heartbeat_connections)}
        others = asyncio.Semaphore(max_connections)
        self._operations = {
            name: _Operation(
                name=name,
                method=spec.method,
                url=self.base_url + prefix + spec.route,
                route=self.provider.path_prefix + spec.route,
                headers=with_body if name in ("stop", "update") else headers,  # the two with a JSON body
                policy=self.retry.for_operation(name),
                lane=lanes.get(name, others),
            )
            for name, spec in OPERATIONS.items()
        }
        self._exchange = make_exchange(
            http_backend,
            base_url=self.base_url,
            max_connections=max_connections + heartbeat_connections,
            connect_timeout=self.timeouts.connect,
            transport=transport,
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
        await self._exchange.aclose()

    @property
    def headers(self) -> Mapping[str, str]:
        """The headers sent with every request (the credential's value is not among them)."""
        return {k: v for k, v in self._headers.items() if k not in ("authorization", "x-api-key")}

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
        if body is None:
            return None
        work = self._parse_work(body, "poll")
        self._remember(work)
        return work

    async def ack(self, work_id: str) -> Work:
        """Acknowledge a polled item: queued → starting. A 409 is final (not this worker's to take)."""
        body = await self._call("ack", work_id)
        work = self._parse_work(body, "ack", work_id)
        self._remember(work)
        return work

    async def heartbeat(
        self,
        work_id: str,
        *,
        expected_last_heartbeat: str | None = NO_HEARTBEAT,
        desired_ttl_seconds: int | None = None,
        deadline: float | None = None,
        attempt_timeout: float | None = None,
    ) -> HeartbeatResult:
        """Renew the lease with compare-and-swap; raises LeaseLostError on 412.

        `expected_last_heartbeat`: NO_HEARTBEAT for the first, then the previous `last_heartbeat`
        exactly (None sends none: an unconditional update where the provider allows it).
        `deadline`: seconds within which all attempts must finish (the heartbeat interval); `attempt_timeout`:
        seconds one attempt may take (default `Timeouts.read`), so that a slow answer leaves time for another.
        """
        params: dict[str, str] = {}
        if expected_last_heartbeat is not None:
            params["expected_last_heartbeat"] = expected_last_heartbeat
        if desired_ttl_seconds is not None:
            if desired_ttl_seconds <= 0:
                raise ValueError("desired_ttl_seconds must be a positive integer")
            params["desired_ttl_seconds"] = str(int(desired_ttl_seconds))
        body = await self._call("heartbeat", work_id, params=params, deadline=deadline, read_timeout=attempt_timeout)
        return self._parse(HeartbeatResult.from_json, body, "heartbeat")

    async def stop(self, work_id: str, *, force: bool = False, deadline: float | None = None) -> Work:
        """Request a graceful stop (force=False) or stop at once (force=True); `deadline`: seconds for the
        request and its retries at most."""
        body = await self._call("stop", work_id, json={"force": force}, deadline=deadline)
        return self._parse_work(body, "stop", work_id)

    async def get(self, work_id: str, *, deadline: float | None = None) -> Work:
        """Read an item (its secret is always null here); `deadline`: seconds for the read and its retries at most."""
        body = await self._call("get", work_id, deadline=deadline)
        return self._parse_work(body, "get", work_id)

    async def update_metadata(self, work_id: str, metadata: Mapping[str, str | None]) -> Work:
        """Merge metadata: a string sets a key, None deletes it, absent keys stay as they are."""
        for key, value in metadata.items():
            if not isinstance(key, str) or not (value is None or isinstance(value, str)):
                raise ValueError("metadata keys must be strings and values strings or None")
        body = await self._call("update", work_id, json={"metadata": dict(metadata)})
        return self._parse_work(body, "update", work_id)

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
        result = self._parse(lambda obj: WorkPage.from_json(obj, pagination), body, "list")
        if any(not self.provider.id_pattern.match(item.id) for item in result.data):
            raise ResponseError("list: an item's id is not a valid id", operation="list")
        return result

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

    def _parse(self, parser: Callable[[Any], T], body: Any, operation: str) -> T:
        try:
            return parser(body)
        except ModelError as exc:
            raise _unexpected(f"{operation}: unexpected response: {exc}", operation) from None

    def _parse_work(self, body: Any, operation: str, work_id: str | None = None) -> Work:
        """A work object whose id is a valid id (and the one asked about, when the request named one)."""
        work = self._parse(Work.from_json, body, operation)
        if not self.provider.id_pattern.match(work.id):
            raise _unexpected(f"{operation}: the answer's work id is not a valid id", operation)
        if work_id is not None and work.id != work_id:
            raise _unexpected(f"{operation}: the answer is about another work item", operation)
        return work

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
        op = self._operations[operation]
        policy = op.policy
        total = policy.deadline if deadline is None else min(deadline, policy.deadline)
        url = op.url if work_id is None else op.url.replace("{work_id}", self._work_id(work_id))
        if params:
            url += "?" + "&".join(f"{key}={_quote(value)}" for key, value in params.items())
        body = None if json is None else jsonlib.dumps(json, separators=(",", ":")).encode()
        attempt_timeout = read_timeout or self.timeouts.read
        if total <= 0:  # a caller's deadline already passed: nothing is sent
            raise self._exchange_error(operation, 0.0, ConnectFailed("no time left to send it"))
        started = time.monotonic()
        try:
            return await self._send_once(op, url, body, min(attempt_timeout, total), 1, work_id)
        except WorkApiError as exc:
            exc.attempts = 1
            exc.maybe_applied = exc.outcome_unknown
            if policy.max_attempts <= 1 or not is_retryable(exc, operation):
                raise
            first = exc
        return await self._retry(op, url, body, attempt_timeout, started + total, first, work_id)

    async def _retry(
        self,
        op: _Operation,
        url: str,
        body: bytes | None,
        attempt_timeout: float,
        deadline: float,
        first: WorkApiError,
        work_id: str | None,
    ) -> Any:
        """Attempts 2..max_attempts, after a first one that failed and may be retried: tenacity's loop, with the
        wait from `retry_delay` (the server's retry-after, else full jitter) and no attempt that would start past
        the deadline. The first attempt goes out without tenacity (`python -m bench.retry_cost` measures its
        bookkeeping), and most requests succeed.

        Every error raised carries `maybe_applied`: whether any attempt so far had an unknown outcome."""
        policy, operation = op.policy, op.name
        attempts = 1
        last = first
        doubt = first.maybe_applied

        async def attempt() -> Any:
            nonlocal attempts, last
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                # A sleep overran the deadline (a busy loop, a slow host): no attempt starts past it, and the caller
                # learns what the Work API last said, not a timeout of a request that was never sent.
                raise last
            attempts += 1
            try:
                return await self._send_once(op, url, body, min(attempt_timeout, remaining), attempts, work_id)
            except WorkApiError as exc:
                nonlocal doubt
                doubt = doubt or exc.outcome_unknown
                exc.attempts = attempts
                exc.maybe_applied = doubt
                last = exc
                raise

        def retryable(exc: BaseException) -> bool:
            return isinstance(exc, WorkApiError) and is_retryable(exc, operation) and time.monotonic() < deadline

        def wait(state: RetryCallState) -> float:
            failed = first if state.outcome is None else state.outcome.exception()
            return retry_delay(policy, attempts, failed or first)

        def log_retry(state: RetryCallState) -> None:
            failed = state.outcome.exception() if state.outcome is not None else None
            _log_retry(operation, attempts, failed if isinstance(failed, WorkApiError) else first, state.upcoming_sleep)

        first_wait = retry_delay(policy, 1, first)
        if time.monotonic() + first_wait >= deadline:  # the next attempt would start past the deadline
            raise first
        _log_retry(operation, 1, first, first_wait)
        await asyncio.sleep(first_wait)
        retrying = AsyncRetrying(
            stop=stop_after_attempt(policy.max_attempts - 1) | stop_before_delay(deadline - time.monotonic()),
            retry=retry_if_exception(retryable),
            wait=wait,
            before_sleep=log_retry,
            reraise=True,
        )
        return await retrying(attempt)

    async def _send_once(
        self, op: _Operation, url: str, body: bytes | None, limit: float, attempt: int, work_id: str | None = None
    ) -> Any:
        """One attempt, bounded as a whole by `limit` seconds: connect, send, and the whole answer read. An answer
        that does not belong to its request (another operation's `type`, another item) is a `ResponseError` and
        its connection is closed: the real answer, or more, may follow on it."""
        operation = op.name
        with _telemetry.request_span(operation, op.method, op.route, self.provider.name, attempt) as span:
            started = time.monotonic()
            lane = op.lane
            try:
                await take_turn(lane, limit)  # a full lane: wait for a turn within the attempt's limit
                try:
                    answer = await self._exchange.send(
                        op.method,
                        url,
                        op.headers,
                        body,
                        self.max_response_bytes,
                        timeout=limit - (time.monotonic() - started),
                    )
                finally:
                    lane.release()
            except ExchangeError as exc:
                span.failed(_FAILURE_NAMES.get(type(exc), exc.kind))
                raise self._exchange_error(operation, limit, exc) from None
            finally:
                _telemetry.record_latency(operation, time.monotonic() - started)
            status = answer.status
            request_id = answer.headers.get(REQUEST_ID_HEADER)
            span.answered(status, request_id)
            if status >= 400:
                raise self._status_error(operation, answer, request_id)
            try:
                if not answer.body:
                    raise AnswerError(f"HTTP {status} with no body")
                value = decode(answer.body)
                misfit = _misfit(operation, value, work_id)
                if misfit:
                    raise AnswerError(misfit)
            except AnswerError as exc:
                span.failed("ResponseError")
                if answer.distrust is not None:
                    answer.distrust()
                raise ResponseError(f"{operation}: HTTP {status}: {exc}", operation=operation) from None
            return value

    def _exchange_error(self, operation: str, limit: float, exc: ExchangeError) -> WorkApiError:
        if isinstance(exc, AnswerTooLarge):
            return ResponseError(f"{operation}: {exc}; not read", operation=operation)
        detail = masked(exc.detail, self._secrets)
        if isinstance(exc, ExchangeTimeout):
            return RequestTimeout(f"{operation} timed out: no complete answer within {limit:.1f}s", operation=operation)
        if isinstance(exc, TLSFailed):
            return TLSError(f"{operation} failed: TLS: {detail}", operation=operation)
        if isinstance(exc, ConnectFailed):
            return ConnectError(f"{operation} failed: cannot connect: {detail}", operation=operation)
        return TransportError(f"{operation} failed: {exc.kind}: {detail}", operation=operation)

    def _remember(self, work: Work) -> None:
        """Mask this item's secret (and its session token) by value in later error texts."""
        if work.secret is None:
            return
        values = [work.secret.reveal()]
        with contextlib.suppress(SecretDecodeError):
            values.append(work.secret.decode().sessions_token)
        secrets = self._secrets
        for value in values:
            if value and value not in secrets:
                secrets[value] = None
        while len(secrets) > REMEMBERED_SECRETS + 1:  # never the key (the first)
            del secrets[next(itertools.islice(secrets, 1, None))]

    def _status_error(self, operation: str, answer: Answer, request_id: str | None) -> APIStatusError:
        error_type, message, details = "api_error", answer.reason or "error", None
        try:
            body = decode(answer.body)
        except AnswerError:
            body = None
        if isinstance(body, dict):
            request_id = request_id or (body.get("request_id") if isinstance(body.get("request_id"), str) else None)
            error = body.get("error")
            if isinstance(error, dict):
                error_type = str(error.get("type") or error_type)[:100]
                message = str(error.get("message") or message)[:1000]
                details = error.get("details") if isinstance(error.get("details"), dict) else None
        should_retry_header = answer.headers.get(SHOULD_RETRY_HEADER)
        should_retry = {"true": True, "false": False}.get((should_retry_header or "").lower())
        cls = status_error_class(answer.status, operation)
        return cls(
            status_code=answer.status,
            error_type=error_type,
            message=message,
            details=details,
            request_id=request_id[:200] if request_id else None,
            operation=operation,
            retry_after=parse_retry_after(answer.headers),
            should_retry=should_retry,
            secrets=self._secrets,
        )


_FAILURE_NAMES = {AnswerTooLarge: "ResponseTooLarge", ExchangeTimeout: "Timeout"}
"""Span failure names of exchange errors whose kind is not the name spans used."""


def _misfit(operation: str, value: Any, work_id: str | None) -> str | None:
    """Why `value` is not an answer to `operation` (about `work_id`), or None when it is one."""
    if operation == "poll" and value is None:
        return None
    if not isinstance(value, dict):
        return "the answer is not a JSON object"
    expected = ANSWER_TYPES.get(operation)
    kind = value.get("type")
    if expected is None:  # a list page: no type of the others
        return f"a {kind!r} answer to a list" if kind in _TYPES else None
    if kind != expected:
        return f"the answer's type is {str(kind)[:40]!r}, not {expected!r}"
    if work_id is not None and expected == "work" and value.get("id") != work_id:
        return "the answer is about another work item"
    return None


_TYPES = frozenset(ANSWER_TYPES.values())


_QUERY_ESCAPES = {
    code: f"%{code:02X}"
    for code in range(128)
    if not (chr(code).isascii() and (chr(code).isalnum() or chr(code) in "_.-~"))
}


def _quote(value: str) -> str:
    """`quote(value, safe="")`: one `str.translate` (in C) for ASCII values, such as the `last_heartbeat` echoed on
    every heartbeat; `quote`'s own path calls a function per character of a value that needs escaping."""
    return value.translate(_QUERY_ESCAPES) if value.isascii() else quote(value, safe="")


def _unexpected(message: str, operation: str) -> ResponseError:
    """A success status whose body is not the answer the operation promises: the Work API answered, so it may well
    have applied the request (`maybe_applied`), and a refusal that follows is settled by reading, not believed."""
    error = ResponseError(message, operation=operation)
    error.maybe_applied = True
    return error


def _log_retry(operation: str, attempt: int, failed: WorkApiError, wait: float) -> None:
    log.warning(
        "work api attempt failed; retrying",
        extra={"operation": operation, "attempt": attempt, "error": failed.message, "retry_in": round(wait, 2)},
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
