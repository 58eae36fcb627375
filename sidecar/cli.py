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
from dataclasses import dataclass
from typing import Any

from ._address import ADDRESS_ENV, add_sidecar_argument
from ._logging import LOG_FORMATS
from .wire import MAX_BLOCK_MS, MIN_BLOCK_MS, PROVIDERS

ENV_PREFIX = "WORK_SIDECAR_"
USAGE_EXIT = 2
"""Exit status for a start that cannot work as configured (bad flags, address in use, Work API refusing)."""


class UsageError(SystemExit):
    """A configuration error: printed as one line `work-sidecar: …` on stderr, exit status 2."""

    def __init__(self, message: str) -> None:
        print(f"work-sidecar: {message}", file=sys.stderr)
        super().__init__(USAGE_EXIT)


@dataclass(frozen=True)
class Flag:
    """One `serve` flag and its `WORK_SIDECAR_*` variable. `setting` names the settings field it fills,
    (class, field name): its default is read from there, so every default is declared once."""

    name: str
    help: str
    type: Any = str
    default: Any = None
    repeatable: bool = False
    choices: tuple[str, ...] | None = None
    setting: str | None = None
    """'Class.field' of `sidecar.core`'s settings (read only when needed: health probes never import the core)."""

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.lstrip("-").upper().replace("-", "_")

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")

    @property
    def default_value(self) -> Any:
        if self.setting is None:
            return self.default
        from . import core

        kind, _, name = self.setting.partition(".")
        found = next(f for f in dataclasses.fields(getattr(core, kind)) if f.name == name)
        value = found.default
        if isinstance(value, tuple):
            return list(value)
        if name == "socket_mode":
            return f"{value:04o}"
        if name == "release_ttl_seconds":
            return value or 0
        return None if value == "" else value


SERVE_FLAGS: tuple[Flag, ...] = (
    Flag("--provider", "Work API flavour", choices=tuple(PROVIDERS), setting="WorkApiSettings.provider"),
    Flag("--api-url", "Work API base URL; when absent the embedded emulator is started (demo mode)"),
    Flag("--environment-id", "the environment to serve (default with the emulator: env_local)"),
    Flag("--api-key", "Work API key (prefer the environment variable); generated for the emulator"),
    Flag("--listen", "unix:///path or host:port, repeatable (env: comma-separated)", repeatable=True,
         setting="ServerSettings.listen"),
    Flag("--socket-mode", "permissions of Unix sockets: 0600 (this user) or 0660 (also its group)",
         setting="ServerSettings.socket_mode"),
    Flag("--drain-timeout", "seconds to let leases finish after SIGTERM", type=float,
         setting="ServerSettings.drain_timeout"),
    Flag("--ttl", "lease TTL in seconds asked for with every heartbeat", type=int, setting="LeasePolicy.ttl_seconds"),
    Flag("--liveness-window", "a lease without a WatchWork stream needs a KeepAlive ping this often (s)",
         type=float, setting="LeasePolicy.liveness_window"),
    Flag("--reattach-grace", "seconds a gone sandbox has to re-attach before its leases are released (0 when draining)",
         type=float, setting="LeasePolicy.reattach_grace"),
    Flag("--release-ttl", "TTL asked for on release so items requeue sooner (0: off)", type=int,
         setting="LeasePolicy.release_ttl_seconds"),
    Flag("--confirm-refusals", "times a doubtful refusal (claim after ack, 4xx on stop) is asked again",
         type=int, setting="LeasePolicy.confirm_refusals"),
    Flag("--max-pollers", "parallel long polls while items keep coming", type=int, setting="PollPolicy.max_pollers"),
    Flag("--poll-block-ms", f"long poll block_ms ({MIN_BLOCK_MS}..{MAX_BLOCK_MS})", type=int,
         setting="PollPolicy.block_ms"),
    Flag("--idle-poll-gap", "seconds to wait after an empty poll (0: none): fewer idle requests, slower dispatch",
         type=float, setting="PollPolicy.idle_poll_gap"),
    Flag("--unclaimed-wait", "seconds a polled item waits for a free sandbox slot before it is left unacked",
         type=float, setting="PollPolicy.unclaimed_wait"),
    Flag("--auth-token",
         "bearer token required on every call but health and reflection (required on non-loopback TCP)"),
    Flag("--worker-id", "worker id sent to the Work API (default: random per process)"),
    Flag("--http-backend", "HTTP transport for Work API requests: httptools (leanest; httpx when a proxy applies) "
         "or httpx (aiohttp: deprecated, httpx carries its requests)",
         choices=("httptools", "httpx", "aiohttp"), setting="WorkApiSettings.http_backend"),
    Flag("--unready-after", "seconds of failing polls after which readiness turns NOT_SERVING", type=float,
         setting="ServerSettings.unready_after"),
    Flag("--startup-check", "seconds the Work API has to answer at start (0: no check)", type=float,
         setting="WorkApiSettings.startup_check"),
    Flag("--keepalive-time", "seconds between HTTP/2 keepalive pings on idle connections", type=float,
         setting="ServerSettings.keepalive_time"),
    Flag("--log-format", "auto (text on a TTY, else JSON), json or text", default="auto",
         choices=LOG_FORMATS),
    Flag("--log-level", "DEBUG, INFO, WARNING or ERROR", default="INFO"),
    Flag("--emulator-port", "port of the embedded emulator (0: any free port)", type=int, default=8787),
    Flag("--metrics-listen", "host:port for a Prometheus scrape endpoint (off by default)"),
    Flag("--state-dir", "directory where leases survive a sidecar crash or restart (journal, token key; "
         "'' = off)", setting="StateSettings.state_dir"),
)  # fmt: skip


def _add_flags(parser: argparse.ArgumentParser, flags: Sequence[Flag]) -> None:
    for flag in flags:
        parser.add_argument(
            flag.name,
            dest=flag.dest,
            type=flag.type,
            choices=flag.choices,
            action="append" if flag.repeatable else "store",
            default=None,
            help=_help(flag),
        )


def _resolve(ns: argparse.Namespace, flags: Sequence[Flag], environ: dict[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for flag in flags:
        value = getattr(ns, flag.dest)
        if value is None and flag.env in environ and environ[flag.env] != "":
            raw = environ[flag.env]
            if flag.repeatable:
                value = [part.strip() for part in raw.split(",") if part.strip()]
            else:
                try:
                    value = flag.type(raw)
                except ValueError:
                    raise UsageError(f"{flag.env}={raw!r} is not a valid {flag.type.__name__}") from None
                if flag.choices and value not in flag.choices:
                    raise UsageError(f"{flag.env} must be one of {', '.join(flag.choices)}")
        values[flag.dest] = flag.default_value if value is None else value
    return values


def _help(flag: Flag) -> str:
    default = flag.default_value
    if default is None:
        return f"{flag.help} [env {flag.env}]"
    shown = ",".join(default) if isinstance(default, list) else str(default)
    return f"{flag.help} [env {flag.env}] (default {shown})"


def _octal(raw: str, name: str) -> int:
    try:
        return int(raw, 8)
    except ValueError:
        raise UsageError(f"{name} takes an octal mode such as 0600, not {raw!r}") from None


def build_parser(*, serve_flags: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="work-sidecar", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the sidecar")
    if serve_flags:  # off for `health`, so a probe does not import the core
        _add_flags(serve, SERVE_FLAGS)
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

    values = _resolve(ns, SERVE_FLAGS, dict(os.environ))
    if values["log_format"] not in LOG_FORMATS:
        raise UsageError(f"--log-format must be one of {', '.join(LOG_FORMATS)}")
    try:
        settings = serve_settings(values)
    except ValueError as exc:
        raise UsageError(f"{exc}") from None
    configure_logging(
        fmt=values["log_format"],
        level=values["log_level"],
        secrets=[settings.work_api.api_key, settings.server.auth_token],
    )
    from .core import StartupError, StateDirError
    from .telemetry import setup_telemetry
    from .workapi import TLSSettingsError

    try:
        with setup_telemetry(values["metrics_listen"] or None):
            return asyncio.run(_run_sidecar(settings, emulator_port=values["emulator_port"]))
    except (StartupError, StateDirError, TLSSettingsError) as exc:
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
