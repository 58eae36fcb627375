"""A local, faithful and strict emulator of the self-hosted Work API, every flavour of its flavour table at once
(Anthropic `/v1/environments/{id}/work…`, Qoder `/api/v1/cloud/environments/{id}/work…`), in memory, with an admin
API under `/_emulator/` (every path in `sidecar/emulator/ADMIN.md`; `AdminClient` is its client).

    emulator = Emulator(EmulatorSettings(key="k", min_ttl_seconds=1))
    async with emulator.serve() as url:   # on the running event loop; port 0 = a free port
        ...

One core (`EmulatorCore`: the `Store`, the faults, the request log) under three faces: the Work API and the admin
API on one ASGI app, and the in-process `Emulator`.
"""

from ._backend import Store
from ._cli import main, run_cli
from ._core import EmulatorCore
from ._errors import ApiError
from ._flavours import FLAVOURS, Flavour
from ._server import Emulator, EmulatorThread
from ._settings import EmulatorSettings
from ._store import MemoryStore
from .admin_client import AdminClient, RequestLogPage

__all__ = [
    "FLAVOURS",
    "AdminClient",
    "ApiError",
    "Emulator",
    "EmulatorCore",
    "EmulatorSettings",
    "EmulatorThread",
    "Flavour",
    "MemoryStore",
    "RequestLogPage",
    "Store",
    "main",
    "run_cli",
]
