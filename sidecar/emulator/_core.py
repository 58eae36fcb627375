"""The emulator's one core: the store, the faults and the request log, and the controls every face shares.

Three thin faces sit on it: the Work API (`_app.py`, ASGI), the admin API under `/_emulator/` (`_admin.py`) and
the in-process `Emulator` facade (`_server.py`). A control (enqueue, steal a lease, add a fault, change settings,
…) is written here once; a face only parses its input and shapes its output.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter, deque
from collections.abc import Mapping
from datetime import UTC, datetime
from itertools import islice
from typing import Any

from ._backend import Store
from ._errors import ApiError
from ._faults import Fault, Faults
from ._ids import rfc3339, utcnow
from ._settings import EmulatorSettings
from ._store import MemoryStore

DATA_TYPES = ("session", "healthcheck")
MAX_ENQUEUE = 100_000


class RequestLog:
    """Every Work API request in arrival order (bounded), and cheap counts per operation and status."""

    def __init__(self, limit: int) -> None:
        self.entries: deque[dict[str, Any]] = deque(maxlen=limit)
        self.next_seq = 0
        self.counts: Counter[tuple[str, int]] = Counter()
        self.in_flight = 0

    def resize(self, limit: int) -> None:
        if limit != self.entries.maxlen:
            self.entries = deque(self.entries, maxlen=limit)

    def open(self, entry: dict[str, Any]) -> dict[str, Any]:
        entry["seq"] = self.next_seq
        self.next_seq += 1
        self.in_flight += 1
        self.entries.append(entry)
        return entry

    def close(self, entry: dict[str, Any], status: int, started: float) -> None:
        entry["status"] = status
        entry["duration_ms"] = round((time.monotonic() - started) * 1000, 3)
        self.in_flight -= 1
        self.counts[(entry["operation"], status)] += 1

    def since(self, seq: int) -> list[dict[str, Any]]:
        if not self.entries:
            return []
        first = self.entries[0]["seq"]
        return [
            {**entry, "at": rfc3339(datetime.fromtimestamp(entry["at"], UTC))}
            for entry in islice(self.entries, max(0, seq - first), None)
        ]

    def clear(self) -> None:
        """Forget the logged requests (the counts stay: `clear_counts`)."""
        self.entries.clear()

    def clear_counts(self) -> None:
        self.counts.clear()

    def counts_by_operation(self) -> dict[str, dict[str, int]]:
        """Requests per operation and status (`{"heartbeat": {"200": 10, "412": 1}}`)."""
        counts: dict[str, dict[str, int]] = {}
        for (operation, status), count in self.counts.items():
            counts.setdefault(operation, {})[str(status)] = count
        return counts


class EmulatorCore:
    """All the emulator's mutable state and the controls on it. `settings` can be replaced at any time."""

    def __init__(self, settings: EmulatorSettings, store: Store | None = None) -> None:
        self.store: Store = store if store is not None else MemoryStore(settings)
        self.store.settings = settings
        self.faults = Faults()
        self.log = RequestLog(settings.request_log_limit)
        self.started_at = rfc3339(utcnow())

    # -- settings -----------------------------------------------------------------------------------------

    @property
    def settings(self) -> EmulatorSettings:
        return self.store.settings

    def update_settings(self, changes: Mapping[str, Any]) -> EmulatorSettings:
        """Replace some settings, validated as a whole (TypeError, ValueError); takes effect for the next request."""
        settings = dataclasses.replace(self.store.settings, **changes)
        self.store.settings = settings
        self.log.resize(settings.request_log_limit)
        return settings

    # -- items and environments ---------------------------------------------------------------------------

    def enqueue(
        self, environment_id: str, count: int = 1, data_type: str = "session", metadata: Any = None
    ) -> list[dict[str, Any]]:
        """Queue `count` new items (waking waiting polls); their work objects. 400 when an argument is invalid."""
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_ENQUEUE:
            raise ApiError(400, f"count must be an integer from 1 to {MAX_ENQUEUE}")
        if data_type not in DATA_TYPES:
            raise ApiError(400, "data_type is session or healthcheck")
        metadata = metadata or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) and k for k, v in metadata.items()):
            raise ApiError(400, "metadata maps non-empty strings to strings")
        return [item.to_json() for item in self.store.enqueue(environment_id, count, data_type, metadata)]

    def item_view(self, environment_id: str, work_id: str) -> dict[str, Any]:
        return self.store.internal(self.store.item(environment_id, work_id))

    def item_views(self, environment_id: str) -> list[dict[str, Any]]:
        return [self.store.internal(item) for item in self.store.items(environment_id)]

    def steal(self, environment_id: str, work_id: str) -> dict[str, Any]:
        return self.store.internal(self.store.steal(environment_id, work_id))

    def expire(self, environment_id: str, work_id: str) -> dict[str, Any]:
        return self.store.internal(self.store.expire(environment_id, work_id))

    # -- faults -------------------------------------------------------------------------------------------

    def add_fault(self, spec: Any) -> dict[str, Any]:
        """Add a fault from its JSON description (400 when invalid); the fault as JSON."""
        return self.faults.add(Fault.from_json(spec)).to_json()

    # -- the request log ----------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The emulator's own counters (`GET /_emulator/stats`)."""
        return {
            "requests": self.log.counts_by_operation(),
            "total": sum(self.log.counts.values()),
            "in_flight": self.log.in_flight,
            "environments": self.store.environment_count(),
            "started_at": self.started_at,
        }

    def reset(self) -> None:
        """Forget every environment, item, fault and logged request (settings stay)."""
        self.store.reset()
        self.faults.clear()
        self.log.clear()
        self.log.clear_counts()
