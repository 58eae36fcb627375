"""The scaler's TLS credentials, reloaded when the files change (a renewed certificate, as cert-manager writes
it into a mounted Secret, is served to new connections without a restart).

gRPC asks the fetcher before each handshake; it compares the files' modification times and sizes, and only when
they changed reads and checks them again. A set that does not load (half written, a key that does not match)
is logged and the previous one stays in use.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Callable
from typing import cast

import grpc

log = logging.getLogger("sidecar.scaler")

Stamp = tuple[tuple[int, int], ...]


def check(cert: str, key: str, client_ca: str | None) -> None:
    """Raise ValueError (one line, naming the flag) unless the files are a PEM certificate with its key and,
    when given, a PEM CA bundle."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise ValueError(f"--tls-cert/--tls-key: {exc.filename}: no such file") from None
    except PermissionError as exc:
        raise ValueError(f"--tls-cert/--tls-key: {exc.filename}: permission denied") from None
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
        raise ValueError(f"--tls-cert/--tls-key: not a PEM certificate and its private key ({reason})") from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except FileNotFoundError:
            raise ValueError(f"--tls-client-ca: {client_ca}: no such file") from None
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or type(exc).__name__
            raise ValueError(f"--tls-client-ca: not a PEM CA certificate bundle ({reason})") from None


class ReloadingCredentials:
    """`credentials()`: server credentials whose certificate set follows the files."""

    def __init__(self, cert: str, key: str, client_ca: str | None) -> None:
        self.paths = (cert, key) if client_ca is None else (cert, key, client_ca)
        self.client_ca = client_ca
        self.reloads = 0
        self._stamp = self._stamp_now()
        self._initial = self._configuration()

    def _stamp_now(self) -> Stamp:
        stamps = []
        for path in self.paths:
            try:
                found = os.stat(path)
            except OSError:
                stamps.append((-1, -1))
            else:
                stamps.append((found.st_mtime_ns, found.st_size))
        return tuple(stamps)

    def _read(self) -> list[bytes]:
        contents = []
        for path in self.paths:
            with open(path, "rb") as file:
                contents.append(file.read())
        return contents

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        """The files as one configuration, checked; ValueError when they do not load or changed while read."""
        before = self._read()
        check(*self.paths[:2], self.client_ca)
        if self._read() != before:
            raise ValueError("the TLS files changed while they were read")
        chain, key = before[0], before[1]
        client_ca = before[2] if self.client_ca is not None else None
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=client_ca)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        stamp = self._stamp_now()
        if stamp == self._stamp:
            return None
        try:
            configuration = self._configuration()
        except (OSError, ValueError) as exc:
            log.warning("TLS files changed but do not load: still serving the previous ones", extra={"error": str(exc)})
            return None
        self._stamp = stamp
        self.reloads += 1
        log.info("TLS certificate reloaded", extra={"files": list(self.paths)})
        return configuration

    def credentials(self) -> grpc.ServerCredentials:
        # gRPC takes None from the fetcher as "no change" (its stubs say the fetcher always returns one).
        fetch = cast(Callable[[], grpc.ServerCertificateConfiguration], self._fetch)
        return grpc.dynamic_ssl_server_credentials(
            self._initial, fetch, require_client_authentication=self.client_ca is not None
        )
