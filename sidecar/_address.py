"""How clients reach a running sidecar: the one environment variable that names it, `WORK_SIDECAR_ADDR`, and the
channel options for a local connection.

`work-sidecar exec`, `work-sidecar health`, `sidecar.client.SidecarClient` and the Node and Go examples all read it
(`unix:///path` or `host:port`); `WORK_SIDECAR_ADDRESS`, the name the examples used first, is accepted as an alias.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

__all__ = ["ADDRESS_ALIASES", "ADDRESS_ENV", "CHANNEL_OPTIONS", "add_sidecar_argument", "sidecar_address"]

ADDRESS_ENV = "WORK_SIDECAR_ADDR"
ADDRESS_ALIASES = ("WORK_SIDECAR_ADDRESS",)

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # A sidecar on the same host or pod that restarts is back within seconds: look for it again at least every
    # second. gRPC's default reconnect backoff (1 s growing by 1.6x to 120 s) would find it only tens of seconds
    # after a long outage, time taken from the fencing window in which the sandbox may still re-attach its leases.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
)
"""Channel options for a connection to a local sidecar (`SidecarClient` and `work-sidecar exec` use them)."""


def sidecar_address(environ: Mapping[str, str] | None = None) -> str | None:
    """The sidecar's address from the environment (`WORK_SIDECAR_ADDR`, else its alias), or None."""
    env = os.environ if environ is None else environ
    for name in (ADDRESS_ENV, *ADDRESS_ALIASES):
        value = env.get(name, "").strip()
        if value:
            return value
    return None


def add_sidecar_argument(parser: argparse.ArgumentParser) -> None:
    """`--sidecar ADDR`, defaulting to the environment's address: the same flag in `exec` and `health`."""
    parser.add_argument(
        "--sidecar",
        default=sidecar_address(),
        metavar="ADDR",
        help=f"the sidecar's address, unix:///path or host:port [env {ADDRESS_ENV}]",
    )
