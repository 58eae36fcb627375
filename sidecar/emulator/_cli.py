"""`work-sidecar emulator` / `python -m sidecar.emulator`: serve the emulator until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from .._logging import LOG_FORMATS, configure_logging
from ._server import Emulator, loop_factory
from ._settings import EmulatorSettings, parse_setting

log = logging.getLogger("sidecar.emulator")

KEY_ENV = "WORK_SIDECAR_EMULATOR_KEY"
MANAGEMENT_KEY_ENV = "WORK_SIDECAR_EMULATOR_MANAGEMENT_KEY"


def build_parser(prog: str = "work-sidecar emulator") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="A local, in-memory emulator of the self-hosted Work API (Anthropic and Qoder flavours at once), "
        "with an admin API under /_emulator/.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8787, help="port (default 8787; 0: any free port)")
    parser.add_argument("--key", default=None, help=f"the credential every request must carry [env {KEY_ENV}]")
    parser.add_argument(
        "--management-key",
        default=None,
        help=f"a separate key that get/update require (the environment key then gets 403) [env {MANAGEMENT_KEY_ENV}]",
    )
    parser.add_argument("--min-ttl", type=int, default=10, help="lower TTL clamp in seconds (default 10)")
    parser.add_argument("--max-ttl", type=int, default=600, help="upper TTL clamp in seconds (default 600)")
    parser.add_argument("--default-ttl", type=int, default=60, help="TTL of a heartbeat that asks for none")
    parser.add_argument("--id-style", choices=("anthropic", "qoder"), default="anthropic", help="style of new ids")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any other EmulatorSettings field, e.g. --set stopping_expiry=stopped (repeatable)",
    )
    parser.add_argument("--log-level", default="INFO", help="log level (default INFO)")
    parser.add_argument(
        "--log-format",
        default="auto",
        choices=LOG_FORMATS,
        help="log lines: auto (text on a TTY, else JSON), json or text",
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> EmulatorSettings:
    key = args.key or os.environ.get(KEY_ENV)
    if not key:
        raise ValueError(f"--key (or {KEY_ENV}) is required")
    changes: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(EmulatorSettings)}
    for assignment in args.set:
        name, sep, value = assignment.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in names or name in ("key", "management_key"):
            raise ValueError(f"--set {assignment!r}: expected NAME=VALUE with NAME an emulator setting (not a key)")
        changes[name] = parse_setting(name, value.strip())
    return EmulatorSettings(
        key=key,
        management_key=args.management_key or os.environ.get(MANAGEMENT_KEY_ENV) or None,
        min_ttl_seconds=args.min_ttl,
        max_ttl_seconds=args.max_ttl,
        default_ttl_seconds=args.default_ttl,
        id_style=args.id_style,
        **changes,
    )


async def serve_until_signalled(emulator: Emulator, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with emulator.serve(host, port) as url:
            log.info(
                "Work API emulator listening",
                extra={
                    "url": url,
                    "anthropic": "/v1/environments/{id}/work",
                    "qoder": "/api/v1/cloud/environments/{id}/work",
                    "admin": "/_emulator/",
                },
            )
            await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, serve until SIGINT/SIGTERM; the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if not logging.getLogger().handlers:
        configure_logging(fmt=args.log_format, level=args.log_level)
    try:
        settings = settings_from_args(args)
    except (TypeError, ValueError) as exc:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(serve_until_signalled(Emulator(settings), args.host, args.port))
    except OSError as exc:
        log.error("cannot serve", extra={"host": args.host, "port": args.port, "error": str(exc)})
        return 1
    return 0


run_cli = main
