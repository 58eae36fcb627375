"""`work-sidecar scaler`: KEDA's external scaler on the Work API queue.

Takes the same Work API flags and WORK_SIDECAR_* variables as `serve` (the flag wins). `--api-url` is
required: unlike `serve`, the scaler starts no embedded emulator, since a scaler reading a private,
always-empty queue would scale every ScaledObject to zero.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any

from .._flags import SERVE_FLAGS, Flag, UsageError, add_flags, add_print_config, print_config, resolve, values_of
from ._config import DEFAULT_LISTEN, ScalerConfig
from ._metadata import activation_number, target_number

SERVICE_NAME = "work-sidecar-scaler"
"""The default `OTEL_SERVICE_NAME` of the scaler's telemetry."""

PROG = "work-sidecar scaler"
SHARED = (
    "--provider", "--api-url", "--environment-id", "--api-key", "--listen", "--auth-token", "--worker-id",
    "--http-backend", "--keepalive-time", "--log-format", "--log-level", "--metrics-listen",
)  # fmt: skip
OVERRIDES: dict[str, dict[str, Any]] = {
    "--api-url": {"help": "Work API base URL (required)"},
    "--environment-id": {"help": "the environment of triggers whose metadata names no environmentId"},
    "--api-key": {"help": "Work API key (prefer the environment variable)"},
    "--listen": {
        "help": "unix:///path or host:port, repeatable (env: comma-separated); TCP other than loopback needs "
        "TLS or --auth-token",
        "setting": None,  # not the sidecar's gRPC address: the scaler's own
        "default": (DEFAULT_LISTEN,),
    },
    "--auth-token": {"help": "bearer token required on every ExternalScaler call (health and reflection stay open)"},
    "--worker-id": {"help": "worker id sent with stats reads (default: random per process)"},
}
_BY_NAME = {flag.name: flag for flag in SERVE_FLAGS}
SCALER_FLAGS: tuple[Flag, ...] = (
    *(dataclasses.replace(_BY_NAME[name], **OVERRIDES.get(name, {})) for name in SHARED),
    Flag("--tls-cert", "PEM certificate (chain) served on every TCP address (with --tls-key)"),
    Flag("--tls-key", "PEM private key of --tls-cert"),
    Flag("--tls-client-ca", "PEM CA bundle: TCP clients must present a certificate it signed (mutual TLS)"),
    Flag("--stats-interval", "seconds between stats reads of one environment (one reading shared by every call)",
         type=float, default=5.0),
    Flag("--max-backoff", "upper bound (s) of the wait after failed stats reads", type=float, default=60.0),
    Flag("--max-age", "seconds a reading is served while reads fail; then calls fail UNAVAILABLE (KEDA fallback)",
         type=float, default=60.0),
    Flag("--target-items", "default targetItemsPerReplica (a plain decimal > 0)", type=target_number, default=1.0),
    Flag("--activation-threshold", "default activationThreshold (a plain decimal >= 0)", type=activation_number,
         default=0.0),
    Flag("--max-list-pages", "list pages one count of items in progress may read (includeInProgress)", type=int,
         default=20),
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
        auth_token=values["auth_token"] or None,
        tls_cert=values["tls_cert"] or None,
        tls_key=values["tls_key"] or None,
        tls_client_ca=values["tls_client_ca"] or None,
        stats_interval=values["stats_interval"],
        max_backoff=values["max_backoff"],
        max_age=values["max_age"],
        target_items=values["target_items"],
        activation_threshold=values["activation_threshold"],
        max_list_pages=values["max_list_pages"],
        worker_id=values["worker_id"] or None,
        http_backend=values["http_backend"],
        keepalive_time=values["keepalive_time"],
        log_format=values["log_format"],
        log_level=values["log_level"],
    )


def _refuse(message: str) -> int:
    print(f"work-sidecar scaler: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    from .._logging import configure_logging
    from ..telemetry import setup_telemetry
    from ._server import Scaler, ScalerStartError

    ns = build_parser().parse_args(argv)
    resolved = resolve(ns, SCALER_FLAGS, os.environ, prog=PROG)
    if ns.print_config:
        print_config(resolved, sys.stdout)
    values = values_of(resolved)
    try:
        config = scaler_config(values)
    except ValueError as exc:
        raise UsageError(str(exc), prog=PROG) from None
    if ns.print_config:
        return 0
    configure_logging(fmt=config.log_format, level=config.log_level, secrets=[config.api_key, config.auth_token])
    environ = {"OTEL_SERVICE_NAME": SERVICE_NAME, **os.environ}
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(setup_telemetry(values["metrics_listen"] or None, environ))
        except OSError as exc:
            address = values["metrics_listen"]
            return _refuse(f"cannot serve metrics on --metrics-listen {address}: {exc.strerror or exc}")
        except ValueError as exc:
            return _refuse(str(exc))
        try:
            return asyncio.run(Scaler(config).run())
        except ScalerStartError as exc:
            return _refuse(str(exc))


def markdown_flags() -> str:
    """docs/scaler.md's table of the scaler's flags (a test keeps the page equal to this)."""
    rows = ["| flag | environment variable | default | what it does |", "|---|---|---|---|"]
    for flag in SCALER_FLAGS:
        default = flag.default_value
        shown = "—" if default is None else f"`{','.join(default) if isinstance(default, (list, tuple)) else default}`"
        rows.append(f"| `{flag.name}` | `{flag.env}` | {shown} | {flag.help.replace('|', '/')} |")
    return "\n".join(rows)
