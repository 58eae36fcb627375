"""A local, faithful and strict emulator of the self-hosted Work API, both flavours at once (Anthropic
`/v1/environments/{id}/work…`, Qoder `/api/v1/cloud/environments/{id}/work…`), in memory, with an admin API
under `/_emulator/` (see ADMIN.md).

    emulator = Emulator(EmulatorSettings(key="k", min_ttl_seconds=1))
    async with emulator.serve() as url:   # on the running event loop; port 0 = a free port
        ...
"""

from ._cli import main, run_cli
from ._errors import ApiError
from ._server import Emulator, EmulatorThread
from ._settings import EmulatorSettings

__all__ = ["ApiError", "Emulator", "EmulatorSettings", "EmulatorThread", "main", "run_cli"]
