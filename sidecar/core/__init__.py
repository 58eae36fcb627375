"""The sidecar core: a gRPC WorkService that owns polling, acking and heartbeat CAS for sandboxes."""

from ._config import SidecarConfig, is_loopback, parse_listen
from ._leaser import heartbeat_interval
from ._server import SERVICE_NAME, Sidecar
from ._status import DOMAIN as ERROR_DOMAIN

__all__ = [
    "ERROR_DOMAIN",
    "SERVICE_NAME",
    "Sidecar",
    "SidecarConfig",
    "heartbeat_interval",
    "is_loopback",
    "parse_listen",
]
