"""The one environment variable that names a running sidecar for its clients: `WORK_SIDECAR_ADDR`.

`work-sidecar exec`, `work-sidecar health`, `sidecar.client.SidecarClient` and the Node and Go examples all read it
(`unix:///path` or `host:port`); `WORK_SIDECAR_ADDRESS`, the name the examples used first, is accepted as an alias.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

__all__ = ["ADDRESS_ALIASES", "ADDRESS_ENV", "add_sidecar_argument", "sidecar_address"]

ADDRESS_ENV = "WORK_SIDECAR_ADDR"
ADDRESS_ALIASES = ("WORK_SIDECAR_ADDRESS",)


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
