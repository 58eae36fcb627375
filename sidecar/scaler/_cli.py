"""`work-sidecar scaler`: KEDA's external scaler on the Work API queue.

Takes the same Work API flags and WORK_SIDECAR_* variables as `serve` (the flag wins). `--api-url` is
required: unlike `serve`, the scaler starts no embedded emulator, since a scaler reading a private,
always-empty queue would scale every ScaledObject to zero.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any

from .._flags import SERVE_FLAGS, Flag, UsageError, add_flags, add_print_config, print_config, resolve, values_of
from ._config import DEFAULT_LISTEN, ScalerConfig

PROG = "work-sidecar scaler"
SHARED = (
    "--provider", "--api-url", "--environment-id", "--api-key", "--listen", "--worker-id", "--http-backend",
    "--keepalive-time", "--log-format", "--log-level",
)  # fmt: skip
OVERRIDES: dict[str, dict[str, Any]] = {
    "--api-url": {"help": "Work API base URL (required)"},
    "--environment-id": {"help": "the environment of triggers whose metadata names no environmentId"},
    "--api-key": {"help": "Work API key (prefer the environment variable)"},
    "--listen": {
        "help": "unix:///path or host:port, repeatable (env: comma-separated)",
        "setting": None,  # not the sidecar's gRPC address: the scaler's own
        "default": (DEFAULT_LISTEN,),
    },
    "--worker-id": {"help": "worker id sent with stats reads (default: random per process)"},
}
_BY_NAME = {flag.name: flag for flag in SERVE_FLAGS}
SCALER_FLAGS: tuple[Flag, ...] = (
    *(dataclasses.replace(_BY_NAME[name], **OVERRIDES.get(name, {})) for name in SHARED),
    Flag("--stats-interval", "seconds between stats reads of one environment (one reading shared by every call)",
         type=float, default=5.0),
    Flag("--max-backoff", "upper bound (s) of the wait after failed stats reads", type=float, default=60.0),
    Flag("--max-age", "seconds a reading is served while reads fail; then calls fail UNAVAILABLE (KEDA fallback)",
         type=float, default=60.0),
    Flag("--target-items", "default targetItemsPerReplica (items needing a replica per replica)", type=float,
         default=1.0),
    Flag("--activation-threshold", "default activationThreshold (active when items needing a replica exceed it)",
         type=float, default=0.0),
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    add_flags(parser, SCALER_FLAGS)
    add_print_config(parser)
    return parser


def scaler_config(values: dict[str, Any]) -> ScalerConfig:
    return ScalerConfig(
        api_url=values["api_url"] or "",
        api_key=values["api_key"] or "",
        environment_id=values["environment_id"] or None,
        provider=values["provider"],
        listen=tuple(values["listen"] or (DEFAULT_LISTEN,)),
        stats_interval=values["stats_interval"],
        max_backoff=values["max_backoff"],
        max_age=values["max_age"],
        target_items=values["target_items"],
        activation_threshold=values["activation_threshold"],
        worker_id=values["worker_id"] or None,
        http_backend=values["http_backend"],
        keepalive_time=values["keepalive_time"],
        log_format=values["log_format"],
        log_level=values["log_level"],
    )


def main(argv: Sequence[str] | None = None) -> int:
    from .._logging import configure_logging
    from ._server import Scaler

    ns = build_parser().parse_args(argv)
    resolved = resolve(ns, SCALER_FLAGS, os.environ, prog=PROG)
    if ns.print_config:
        print_config(resolved, sys.stdout)
    try:
        config = scaler_config(values_of(resolved))
    except ValueError as exc:
        raise UsageError(str(exc), prog=PROG) from None
    if ns.print_config:
        return 0
    configure_logging(fmt=config.log_format, level=config.log_level, secrets=[config.api_key])
    return asyncio.run(Scaler(config).run())
