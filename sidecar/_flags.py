"""The flag machinery the `serve`, `scaler` and `exec` command lines share.

A `Flag` is one command-line option and the environment variable that can give it instead (`WORK_SIDECAR_*`,
unless the flag names its own or none). `add_flags` puts flags on an argparse parser; `resolve` picks each value
(the flag wins over the variable, the variable over the default) and says where it came from; `print_config` shows
the result with secrets redacted (`--print-config`). `SERVE_FLAGS` are `serve`'s flags; the scaler takes the Work API
flags from them by name. Flag and variable names are a public contract (deployments and other tools rely on them).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

from ._logging import LOG_FORMATS, REDACTED
from .wire import MAX_BLOCK_MS, MIN_BLOCK_MS, PROVIDERS

ENV_PREFIX = "WORK_SIDECAR_"
USAGE_EXIT = 2
"""Exit status for a start that cannot work as configured (bad flags, address in use, Work API refusing)."""

FROM_FLAG = "flag"
FROM_DEFAULT = "default"


class UsageError(SystemExit):
    """A configuration error: printed as one line `work-sidecar: …` on stderr, exit status 2."""

    def __init__(self, message: str, *, prog: str = "work-sidecar") -> None:
        print(f"{prog}: {message}", file=sys.stderr)
        super().__init__(USAGE_EXIT)


@dataclass(frozen=True)
class Flag:
    """One option and its environment variable. `setting` names the settings field it fills, 'Class.field' of
    `sidecar.core`'s settings: its default is read from there, so every default is declared once."""

    name: str
    help: str
    type: Any = str
    default: Any = None
    repeatable: bool = False
    choices: tuple[str, ...] | None = None
    setting: str | None = None
    """'Class.field' of `sidecar.core`'s settings (read only when needed: health probes never import the core)."""
    secret: bool = False
    """Its value is never shown (`--print-config`, help)."""
    switch: bool = False
    """An on/off option without a value (`store_true`); it takes no environment variable."""
    variables: tuple[str, ...] | None = None
    """The environment variables that can give it, first wins (None: `WORK_SIDECAR_` + the flag's name; (): none)."""
    metavar: str | None = None

    @property
    def env_names(self) -> tuple[str, ...]:
        if self.variables is not None:
            return self.variables
        if self.switch:
            return ()
        return (ENV_PREFIX + self.name.lstrip("-").upper().replace("-", "_"),)

    @property
    def env(self) -> str:
        """The flag's environment variable ('' when it has none)."""
        return self.env_names[0] if self.env_names else ""

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")

    @property
    def default_value(self) -> Any:
        if self.switch:
            return False
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


@dataclass(frozen=True)
class Resolved:
    """A flag's value in effect and where it came from: `FROM_FLAG`, `FROM_DEFAULT` or the variable's name."""

    flag: Flag
    value: Any
    source: str


SERVE_FLAGS: tuple[Flag, ...] = (
    Flag("--provider", "Work API flavour", choices=tuple(PROVIDERS), setting="WorkApiSettings.provider"),
    Flag("--api-url", "Work API base URL; when absent the embedded emulator is started (demo mode)"),
    Flag("--environment-id", "the environment to serve (default with the emulator: env_local)"),
    Flag("--api-key", "Work API key (prefer the environment variable); generated for the emulator", secret=True),
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
         "bearer token required on every call but health and reflection (required on non-loopback TCP)",
         secret=True),
    Flag("--worker-id", "worker id sent to the Work API (default: random per process)"),
    Flag("--http-backend", "HTTP transport for Work API requests: httptools (leanest; httpx when a proxy applies) "
         "or httpx (aiohttp: deprecated, httpx carries its requests)",
         choices=("httptools", "httpx", "aiohttp"), setting="WorkApiSettings.http_backend"),
    Flag("--unready-after", "seconds of failing polls after which readiness turns NOT_SERVING", type=float,
         setting="ServerSettings.unready_after"),
    Flag("--startup-check", "seconds the Work API has to answer at start; a refusal exits 2, no answer serves "
         "unready and asks again with backoff (0: no check)", type=float, setting="WorkApiSettings.startup_check"),
    Flag("--keepalive-time", "seconds between HTTP/2 keepalive pings on idle connections", type=float,
         setting="ServerSettings.keepalive_time"),
    Flag("--log-format", "auto (text on a TTY, else JSON), json or text", default="auto",
         choices=LOG_FORMATS),
    Flag("--log-level", "DEBUG, INFO, WARNING or ERROR", default="INFO"),
    Flag("--emulator-port", "port of the embedded emulator (0: any free port)", type=int, default=8787),
    Flag("--metrics-listen", "host:port for a Prometheus scrape endpoint (off by default)"),
    Flag("--health-listen", "host:port serving gRPC health only, without a token (kubelet grpc probes; off by "
         "default)", setting="ServerSettings.health_listen"),
    Flag("--state-dir", "directory where leases survive a sidecar crash or restart (journal, token key; "
         "'' = off)", setting="StateSettings.state_dir"),
)  # fmt: skip


def add_flags(parser: argparse.ArgumentParser, flags: Sequence[Flag]) -> None:
    """Each flag as an argparse option whose parsed value is None (or False) when not given: `resolve` fills in."""
    for flag in flags:
        if flag.switch:
            parser.add_argument(flag.name, dest=flag.dest, action="store_true", help=flag_help(flag))
            continue
        parser.add_argument(
            flag.name,
            dest=flag.dest,
            type=flag.type,
            choices=flag.choices,
            action="append" if flag.repeatable else "store",
            default=None,
            metavar=flag.metavar,
            help=flag_help(flag),
        )


def add_print_config(parser: argparse.ArgumentParser) -> None:
    """`--print-config`: a command-line switch only (no variable: a deployment that set one would never start)."""
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print every setting in effect and where it came from (flag, environment variable or default), "
        "secrets redacted, and exit without starting anything",
    )


def resolve(
    ns: argparse.Namespace, flags: Sequence[Flag], environ: Mapping[str, str], *, prog: str = "work-sidecar"
) -> dict[str, Resolved]:
    """Each flag's value: the flag if given, else its first non-empty environment variable, else its default."""
    resolved: dict[str, Resolved] = {}
    for flag in flags:
        value = getattr(ns, flag.dest)
        if flag.switch:
            resolved[flag.dest] = Resolved(flag, bool(value), FROM_FLAG if value else FROM_DEFAULT)
            continue
        if value is not None:
            resolved[flag.dest] = Resolved(flag, value, FROM_FLAG)
            continue
        variable = next((name for name in flag.env_names if environ.get(name, "") != ""), None)
        if variable is None:
            resolved[flag.dest] = Resolved(flag, flag.default_value, FROM_DEFAULT)
            continue
        resolved[flag.dest] = Resolved(flag, _from_env(flag, variable, environ[variable], prog), variable)
    return resolved


def values_of(resolved: Mapping[str, Resolved]) -> dict[str, Any]:
    """The values alone, by flag `dest`."""
    return {dest: item.value for dest, item in resolved.items()}


def _from_env(flag: Flag, variable: str, raw: str, prog: str) -> Any:
    if flag.repeatable:
        return [part.strip() for part in raw.split(",") if part.strip()]
    try:
        value = flag.type(raw)
    except ValueError:
        raise UsageError(f"{variable}={raw!r} is not a valid {flag.type.__name__}", prog=prog) from None
    if flag.choices and value not in flag.choices:
        raise UsageError(f"{variable} must be one of {', '.join(flag.choices)}", prog=prog)
    return value


def flag_help(flag: Flag) -> str:
    """The help text with the flag's variable and default."""
    text = flag.help
    if flag.env_names:
        text += f" [env {' or '.join(flag.env_names)}]"
    default = flag.default_value
    if default is None or default == "" or flag.switch:
        return text
    return f"{text} (default {shown(default)})"


def shown(value: Any) -> str:
    """A value as the command line takes it."""
    if isinstance(value, list | tuple):
        return ",".join(str(part) for part in value)
    return str(value)


def redacted(flag: Flag, value: Any) -> str:
    """The value as it may be shown: secrets as `<redacted>`, a URL's password removed, unset as `(unset)`."""
    if value is None or value == "" or value == []:
        return "(unset)"
    if flag.secret:
        return REDACTED
    text = shown(value)
    if "://" in text and "@" in text:
        parts = urlsplit(text)
        if parts.password is not None:
            host = parts.netloc.rpartition("@")[2]
            text = urlunsplit(parts._replace(netloc=f"{parts.username or ''}:{REDACTED}@{host}"))
    return text


def print_config(resolved: Mapping[str, Resolved], out: TextIO) -> None:
    """One line per setting: flag, value (secrets redacted), where it came from."""
    rows = [(item.flag.name, redacted(item.flag, item.value), _source(item)) for item in resolved.values()]
    width_name = max(len(name) for name, _, _ in rows)
    width_value = max(len(value) for _, value, _ in rows)
    for name, value, source in rows:
        out.write(f"{name:<{width_name}}  {value:<{width_value}}  {source}\n")


def _source(item: Resolved) -> str:
    if item.source in (FROM_FLAG, FROM_DEFAULT):
        return item.source
    return f"env {item.source}"
