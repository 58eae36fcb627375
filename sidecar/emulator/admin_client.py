"""A client of the emulator's admin API (`/_emulator/…`, see ADMIN.md): for tests, benchmarks and demos that talk to
an emulator over HTTP, in this process or another. Its methods are named like the in-process `Emulator`'s.

    async with AdminClient("http://127.0.0.1:8787") as admin:
        [item] = await admin.enqueue("env_local")
        await admin.inject_fault("heartbeat", status=503, count=2)
        heartbeats = await admin.requests(operation="heartbeat")

An error answer raises `ApiError` with the admin API's status, error type and message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from ._errors import ApiError

__all__ = ["AdminClient", "RequestLogPage"]

PREFIX = "/_emulator"


@dataclass(frozen=True, slots=True)
class RequestLogPage:
    """Logged Work API requests from some `seq` on, and the `seq` to ask for next."""

    data: list[dict[str, Any]]
    next: int


class AdminClient:
    """An async client of one emulator's admin API. Pass `http` to share a client (it is then not closed here)."""

    def __init__(self, url: str, *, http: httpx.AsyncClient | None = None, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self._own = http is None
        self._http = http if http is not None else httpx.AsyncClient(timeout=timeout)

    async def __aenter__(self) -> AdminClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own:
            await self._http.aclose()

    # -- items and environments ---------------------------------------------------------------------------

    async def enqueue(
        self,
        environment_id: str,
        count: int = 1,
        data_type: str = "session",
        metadata: dict[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        """Queue `count` new items (creating the environment); their work objects."""
        body: dict[str, Any] = {"count": count, "data_type": data_type}
        if metadata is not None:
            body["metadata"] = metadata
        answer = await self._call("POST", f"/environments/{environment_id}/work", json=body)
        items: list[dict[str, Any]] = answer["data"]
        return items

    async def items(self, environment_id: str) -> list[dict[str, Any]]:
        """The emulator's internal views of every item of an environment, oldest first."""
        items: list[dict[str, Any]] = (await self._call("GET", f"/environments/{environment_id}/work"))["data"]
        return items

    async def get_item(self, environment_id: str, work_id: str) -> dict[str, Any]:
        """The emulator's internal view of one item (the work object without `secret`, plus its lease)."""
        return await self._call("GET", f"/environments/{environment_id}/work/{work_id}")

    async def steal_lease(self, environment_id: str, work_id: str) -> dict[str, Any]:
        """Another holder heartbeats the item: its holder's next compare-and-swap fails with 412."""
        return await self._call("POST", f"/environments/{environment_id}/work/{work_id}/steal")

    async def expire_lease(self, environment_id: str, work_id: str) -> dict[str, Any]:
        """The item's lease runs out now."""
        return await self._call("POST", f"/environments/{environment_id}/work/{work_id}/expire")

    async def environment(self, environment_id: str) -> dict[str, Any]:
        return await self._call("GET", f"/environments/{environment_id}")

    async def set_environment(
        self, environment_id: str, *, self_hosted: bool | None = None, permitted: bool | None = None
    ) -> dict[str, Any]:
        """Create or change an environment (`self_hosted=False`: every call on it a 400; `permitted=False`: 403)."""
        body = {
            name: value for name, value in (("self_hosted", self_hosted), ("permitted", permitted)) if value is not None
        }
        return await self._call("PUT", f"/environments/{environment_id}", json=body)

    # -- the request log and counters ---------------------------------------------------------------------

    async def request_log(self, since: int = 0) -> RequestLogPage:
        answer = await self._call("GET", "/requests", params={"since": since})
        return RequestLogPage(answer["data"], answer["next"])

    async def requests(
        self, operation: str | None = None, *, since: int = 0, work_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Logged Work API requests (optionally of one operation, or on one item), in arrival order."""
        entries = (await self.request_log(since)).data
        return [
            entry
            for entry in entries
            if (operation is None or entry.get("operation") == operation)
            and (work_id is None or entry.get("work_id") == work_id)
        ]

    async def next_seq(self) -> int:
        """The `seq` the next logged request will get."""
        return (await self.request_log(1 << 62)).next

    async def clear_requests(self) -> None:
        await self._call("DELETE", "/requests")

    async def stats(self) -> dict[str, Any]:
        """Request counts per operation and status, requests in flight, environments, start time."""
        return await self._call("GET", "/stats")

    async def clear_request_counts(self) -> dict[str, Any]:
        return await self._call("DELETE", "/stats")

    # -- faults, settings, reset --------------------------------------------------------------------------

    async def inject_fault(self, operation: str, **spec: Any) -> dict[str, Any]:
        """Add a fault (`status`, `drop`, `after_apply` or `latency_ms`, …: see ADMIN.md); the fault as the emulator
        keeps it."""
        fault: dict[str, Any] = (await self._call("POST", "/faults", json={"operation": operation, **spec}))["fault"]
        return fault

    async def faults(self) -> list[dict[str, Any]]:
        faults: list[dict[str, Any]] = (await self._call("GET", "/faults"))["data"]
        return faults

    async def remove_fault(self, fault_id: int) -> None:
        await self._call("DELETE", f"/faults/{fault_id}")

    async def clear_faults(self) -> None:
        await self._call("DELETE", "/faults")

    async def settings(self) -> dict[str, Any]:
        """Every setting (keys redacted)."""
        return await self._call("GET", "/settings")

    async def update_settings(self, **changes: Any) -> dict[str, Any]:
        """Change some settings (validated as a whole); every setting after the change."""
        return await self._call("PATCH", "/settings", json=changes)

    async def reset(self) -> None:
        """Forget every environment, item, fault and logged request (settings stay)."""
        await self._call("POST", "/reset")

    # -- plumbing -----------------------------------------------------------------------------------------

    async def _call(
        self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        response = await self._http.request(method, self.url + PREFIX + path, json=json, params=params)
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400:
            error = body.get("error") if isinstance(body, dict) else None
            if isinstance(error, dict):
                raise ApiError(
                    response.status_code,
                    str(error.get("message", "")),
                    error_type=str(error.get("type") or "") or None,
                    details=error.get("details") if isinstance(error.get("details"), dict) else None,
                )
            raise ApiError(response.status_code, response.text)
        if not isinstance(body, dict):
            raise ApiError(502, f"{method} {PREFIX}{path}: the answer is not a JSON object")
        return body
