"""The sidecar core: a gRPC WorkService that owns polling, acking and heartbeat CAS for sandboxes.

See ARCHITECTURE.md at the top of the repository for the modules and who owns which state.
"""

from ._config import (
    ServerSettings,
    SidecarSettings,
    StateSettings,
    WorkApiSettings,
    check_exposure,
    is_loopback,
    parse_listen,
)
from ._server import SERVICE_NAME, Lifecycle, Sidecar, StartupError, check_tcp_free
from .edge._auth import BearerTokenInterceptor
from .edge._status import DOMAIN as ERROR_DOMAIN
from .engine._policy import Backoff, LeasePolicy, PollPolicy
from .persistence import StateDirError

__all__ = [
    "ERROR_DOMAIN",
    "SERVICE_NAME",
    "Backoff",
    "BearerTokenInterceptor",
    "LeasePolicy",
    "Lifecycle",
    "PollPolicy",
    "ServerSettings",
    "Sidecar",
    "SidecarSettings",
    "StartupError",
    "StateDirError",
    "StateSettings",
    "WorkApiSettings",
    "check_exposure",
    "check_tcp_free",
    "is_loopback",
    "parse_listen",
]
