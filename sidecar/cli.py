"""`work-sidecar`: serve | emulator | health | exec | scaler.

Every `serve` flag can also come from a `WORK_SIDECAR_*` environment variable (the flag wins); the
names are a public contract (deployments and other tools rely on them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__
from ._address import ADDRESS_ENV, add_sidecar_argument
from ._flags import (
    ENV_PREFIX,
    SERVE_FLAGS,
    USAGE_EXIT,
    Flag,
    UsageError,
    add_flags,
    add_print_config,
    print_config,
    resolve,
    values_of,
)
from ._logging import LOG_FORMATS

__all__ = ["ENV_PREFIX", "SERVE_FLAGS", "USAGE_EXIT", "Flag", "UsageError", "build_parser", "main", "serve_settings"]


def _octal(raw: str, name: str) -> int:
    try:
        return int(raw, 8)
    except ValueError:
        raise UsageError(f"{name} takes an octal mode such as 0600, not {raw!r}") from None


def build_parser(*, serve_flags: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="work-sidecar", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"work-sidecar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the sidecar")
    if serve_flags:  # off for `health`, so a probe does not import the core
        add_flags(serve, SERVE_FLAGS)
        add_print_config(serve)
    sub.add_parser("emulator", help="run the local Work API emulator (work-sidecar emulator --help)", add_help=False)
    health = sub.add_parser(
        "health",
        help="gRPC health check of a running sidecar (exit 0 when SERVING)",
        description=(
            "Ask a running sidecar for its gRPC health (grpc.health.v1.Health/Check) and print the status.\n"
            "Exit 0 while it is SERVING; 1 otherwise (NOT_SERVING while it drains, or unreachable); 2 on a bad\n"
            "address. What the container HEALTHCHECK and the Kubernetes exec probes run."
        ),
        epilog="example:\n  work-sidecar health --sidecar unix:///var/run/work-sidecar/sidecar.sock",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_sidecar_argument(health)
    health.add_argument(
        "--service",
        default="",
        help="the service to ask about: '' (default: readiness, the server as a whole), sidecar.work.v1.WorkService "
        "(the same), or liveness (fails only when the sidecar's own loops are dead)",
    )
    health.add_argument(
        "--timeout", type=float, default=3.0, metavar="S", help="seconds to wait for the answer (default 3)"
    )
    sub.add_parser(
        "exec",
        help="run a command once per assigned item (like ant beta:worker --on-work; work-sidecar exec --help)",
        add_help=False,
    )
    sub.add_parser(
        "scaler",
        help="KEDA external scaler on the Work API queue (stats only; work-sidecar scaler --help)",
        add_help=False,
    )
    return parser


def serve_settings(values: dict[str, Any]) -> Any:
    """The core's settings from resolved flag values. With no --api-url, `api_url` stays empty: `_serve`
    starts the demo emulator and fills it in."""
    from .core import LeasePolicy, PollPolicy, ServerSettings, SidecarSettings, StateSettings, WorkApiSettings

    emulated = not values["api_url"]
    api_key = values["api_key"] or (secrets.token_urlsafe(24) if emulated else None)
    if not api_key:
        raise UsageError("--api-key (or WORK_SIDECAR_API_KEY) is required with --api-url")
    environment_id = values["environment_id"] or ("env_local" if emulated else None)
    if not environment_id:
        raise UsageError("--environment-id (or WORK_SIDECAR_ENVIRONMENT_ID) is required")
    return SidecarSettings(
        work_api=WorkApiSettings(
            environment_id=environment_id,
            api_key=api_key,
            api_url=values["api_url"] or "",
            provider=values["provider"],
            worker_id=values["worker_id"] or None,
            http_backend=values["http_backend"],
            startup_check=values["startup_check"],
        ),
        server=ServerSettings(
            listen=tuple(values["listen"]),
            socket_mode=_octal(values["socket_mode"], "--socket-mode"),
            auth_token=values["auth_token"] or None,
            health_listen=values["health_listen"] or "",
            keepalive_time=values["keepalive_time"],
            drain_timeout=values["drain_timeout"],
            unready_after=values["unready_after"],
        ),
        leases=LeasePolicy(
            ttl_seconds=values["ttl"],
            liveness_window=values["liveness_window"],
            reattach_grace=values["reattach_grace"],
            release_ttl_seconds=values["release_ttl"] or None,
            confirm_refusals=values["confirm_refusals"],
        ),
        polling=PollPolicy(
            block_ms=values["poll_block_ms"],
            max_pollers=values["max_pollers"],
            idle_poll_gap=values["idle_poll_gap"],
            unclaimed_wait=values["unclaimed_wait"],
        ),
        state=StateSettings(state_dir=values["state_dir"] or ""),
    )


def _serve(ns: argparse.Namespace) -> int:
    from ._logging import configure_logging

    resolved = resolve(ns, SERVE_FLAGS, os.environ)
    if ns.print_config:
        print_config(resolved, sys.stdout)
    values = values_of(resolved)
    if values["log_format"] not in LOG_FORMATS:
        raise UsageError(f"--log-format must be one of {', '.join(LOG_FORMATS)}")
    try:
        settings = serve_settings(values)
    except ValueError as exc:
        raise UsageError(f"{exc}") from None
    if ns.print_config:
        return 0
    configure_logging(
        fmt=values["log_format"],
        level=values["log_level"],
        secrets=[settings.work_api.api_key, settings.server.auth_token],
    )
    from .core import StartupError, StateDirError
    from .telemetry import TelemetryError, setup_telemetry
    from .workapi import TLSSettingsError

    try:
        with setup_telemetry(values["metrics_listen"] or None):
            return asyncio.run(_run_sidecar(settings, emulator_port=values["emulator_port"]))
    except (StartupError, StateDirError, TLSSettingsError, TelemetryError) as exc:
        raise UsageError(str(exc)) from None


async def _run_sidecar(settings: Any, *, emulator_port: int) -> int:
    """The composition: the demo emulator when no Work API URL was given, then the sidecar on it."""
    from .core import Sidecar, StartupError

    if settings.work_api.api_url:
        return await Sidecar(settings).run()
    from .emulator import Emulator, EmulatorSettings

    async with contextlib.AsyncExitStack() as stack:
        emulator = Emulator(EmulatorSettings(key=settings.work_api.api_key))
        try:
            url = await stack.enter_async_context(emulator.serve(host="127.0.0.1", port=emulator_port))
        except OSError as exc:
            raise StartupError(
                f"cannot start the demo emulator on 127.0.0.1:{emulator_port} ({exc.strerror or exc}): "
                "choose another --emulator-port (0: any free port), or give --api-url"
            ) from None
        logging.getLogger("sidecar").warning(
            "no --api-url given: started the embedded Work API emulator (for demos and tests, not production)",
            extra={"api_url": url, "environment_id": settings.work_api.environment_id},
        )
        work_api = dataclasses.replace(settings.work_api, api_url=url)
        return await Sidecar(dataclasses.replace(settings, work_api=work_api)).run()


def _health(ns: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from .core import parse_listen

    if not ns.sidecar:
        print(
            "work-sidecar health: --sidecar is required: pass --sidecar unix:///path or host:port, "
            f"or set {ADDRESS_ENV}",
            file=sys.stderr,
        )
        return 2
    try:
        parse_listen(ns.sidecar)
    except ValueError as exc:
        print(f"work-sidecar health: {exc}; --sidecar takes unix:///absolute/path or host:port", file=sys.stderr)
        return 2
    with grpc.insecure_channel(ns.sidecar) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=ns.service), timeout=ns.timeout
            )
        except grpc.RpcError as exc:
            print(f"work-sidecar health: {exc.code().name}: {exc.details()}", file=sys.stderr)
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                print(
                    f"work-sidecar health: is the sidecar running at {ns.sidecar}? Start it (work-sidecar serve) or "
                    f"point --sidecar / {ADDRESS_ENV} at it; a busy one may need a longer --timeout",
                    file=sys.stderr,
                )
            elif exc.code() == grpc.StatusCode.NOT_FOUND:
                print(
                    "work-sidecar health: no such service: use --service '' or sidecar.work.v1.WorkService",
                    file=sys.stderr,
                )
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(status)
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["emulator"]:
        from .emulator import main as emulator_main

        return int(emulator_main(argv[1:]))
    if argv[:1] == ["exec"]:
        from .exec import main as exec_main

        return int(exec_main(argv[1:]))
    if argv[:1] == ["scaler"]:
        from .scaler import main as scaler_main

        return int(scaler_main(argv[1:]))
    ns = build_parser(serve_flags=argv[:1] != ["health"]).parse_args(argv)
    if ns.command == "serve":
        return _serve(ns)
    if ns.command == "health":
        return _health(ns)
    raise AssertionError(ns.command)  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
