"""The scaler serves TLS and mutual TLS (what KEDA's `caCert`, `tlsClientCert` and `tlsClientKey` connect to), and,
like `serve`, refuses to listen on an address other than loopback with nothing guarding the calls."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from sidecar.keda import externalscaler_pb2 as pb
from sidecar.keda import externalscaler_pb2_grpc as pb_grpc
from tests.core.conftest import ENV, KEY, Api
from tests.deploy._harness import BIN, base_environment, serve_process, until_command_succeeds
from tests.helpers import eventually, free_port

from .conftest import ScalerFactory

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_cert: Path
    other_key: Path
    renewed_cert: Path
    renewed_key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _authority(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key),
             "-out", str(cert), "-days", "1", "-subj", f"/CN={name}")  # fmt: skip
    return cert, key


def _issue(directory: Path, name: str, ca: tuple[Path, Path], extension: str) -> tuple[Path, Path]:
    cert, key, request, ext = (directory / f"{name}.{suffix}" for suffix in ("crt", "key", "csr", "ext"))
    ext.write_text(extension + "\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key),
             "-out", str(request), "-subj", f"/CN={name}")  # fmt: skip
    _openssl("x509", "-req", "-in", str(request), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-out", str(cert), "-days", "1", "-extfile", str(ext))  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = _authority(directory, "scaler-ca")
    server = _issue(directory, "scaler", ca, "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth")
    client = _issue(directory, "keda", ca, "extendedKeyUsage=clientAuth")
    other_ca = _authority(directory, "other-ca")
    other = _issue(directory, "intruder", other_ca, "extendedKeyUsage=clientAuth")
    renewed = _issue(directory, "renewed", other_ca, "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth")
    return Pki(ca[0], *server, *client, other_ca[0], *other, *renewed)


def _channel(
    address: str, pki: Pki, *, client: tuple[Path, Path] | None = None, ca: Path | None = None
) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(ca or pki.ca).read_bytes(),
        private_key=client[1].read_bytes() if client else None,
        certificate_chain=client[0].read_bytes() if client else None,
    )
    return grpc.aio.secure_channel(address, credentials)


async def _spec(channel: grpc.aio.Channel, **metadata: str) -> pb.GetMetricSpecResponse:
    ref = pb.ScaledObjectRef(name="w", namespace="n", scalerMetadata=metadata)
    return await pb_grpc.ExternalScalerStub(channel).GetMetricSpec(ref, timeout=5)


async def test_tls_serves_keda_and_refuses_plaintext(start_scaler: ScalerFactory, pki: Pki) -> None:
    scaler = await start_scaler(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key))
    async with _channel(scaler.address, pki) as channel:
        assert (await _spec(channel)).metricSpecs[0].metricName == "work-items"
    with pytest.raises(grpc.aio.AioRpcError) as plaintext:
        await scaler.stub.GetMetricSpec(scaler.ref(), timeout=5)
    assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_admits_only_clients_the_ca_signed(start_scaler: ScalerFactory, pki: Pki) -> None:
    scaler = await start_scaler(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_client_ca=str(pki.ca))
    async with _channel(scaler.address, pki, client=(pki.client_cert, pki.client_key)) as keda:
        assert (await _spec(keda, targetItemsPerReplica="2")).metricSpecs[0].targetSizeFloat == 2
    for client in (None, (pki.other_cert, pki.other_key)):
        async with _channel(scaler.address, pki, client=client) as stranger:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _spec(stranger)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def _answers(address: str, pki: Pki, ca: Path) -> bool:
    async with _channel(address, pki, ca=ca) as channel:
        try:
            await _spec(channel)
        except grpc.aio.AioRpcError:
            return False
        return True


async def test_a_renewed_certificate_is_served_without_a_restart(
    start_scaler: ScalerFactory, pki: Pki, tmp_path: Path
) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(pki.server_cert, cert)
    shutil.copy(pki.server_key, key)
    scaler = await start_scaler(tls_cert=str(cert), tls_key=str(key))
    assert await _answers(scaler.address, pki, pki.ca)
    shutil.copy(pki.renewed_cert, cert)  # as cert-manager renews a mounted Secret
    shutil.copy(pki.renewed_key, key)
    assert await eventually(lambda: _answers(scaler.address, pki, pki.other_ca), message="the renewed one served")
    assert not await _answers(scaler.address, pki, pki.ca), "the old certificate is gone"
    cert.write_text("half written\n")
    assert await _answers(scaler.address, pki, pki.other_ca), "files that do not load leave the last good ones"


async def test_auth_token_guards_every_keda_call(start_scaler: ScalerFactory) -> None:
    token = "scaler-token-0123456789abcdef"
    scaler = await start_scaler(auth_token=token)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await scaler.stub.GetMetricSpec(scaler.ref(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    answer = await scaler.stub.GetMetricSpec(scaler.ref(), timeout=5, metadata=(("authorization", f"Bearer {token}"),))
    assert answer.metricSpecs[0].metricName == "work-items"


def _scaler(*args: str, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = base_environment() | {"WORK_SIDECAR_API_KEY": KEY, "WORK_SIDECAR_API_URL": "http://127.0.0.1:9"}
    argv = [str(BIN / "work-sidecar"), "scaler", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env | (extra or {}))


@pytest.mark.parametrize(
    "args",
    [
        ["--listen", "0.0.0.0:6000"],
        ["--listen", "127.0.0.1:6000", "--listen", "[::]:6000"],
    ],
)
def test_an_open_address_without_tls_or_token_is_refused(args: list[str]) -> None:
    """Finding 9.
    `scaler --listen 0.0.0.0:6000` started open. Like `serve`, it refuses in one line, exit 2."""
    done = _scaler(*args)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert "not loopback" in line and "TLS" in line and "--auth-token" in line
    variable = _scaler(extra={"WORK_SIDECAR_LISTEN": "0.0.0.0:6000"})
    assert variable.returncode == 2 and len(variable.stderr.strip().splitlines()) == 1


def test_a_bad_certificate_is_one_line_and_exit_2(pki: Pki, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = [
        (["--tls-cert", str(pki.server_cert)], "--tls-cert and --tls-key go together"),
        (["--tls-cert", str(tmp_path / "missing.crt"), "--tls-key", str(pki.server_key)], "no such file"),
        (["--tls-cert", str(garbage), "--tls-key", str(pki.server_key)], "not a PEM certificate"),
        (["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.client_key)], "not a PEM certificate"),
        (["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-client-ca", str(garbage)],
         "--tls-client-ca"),
        (["--tls-client-ca", str(pki.ca)], "--tls-client-ca needs --tls-cert"),
        (["--auth-token", "short"], "at least 16"),
    ]  # fmt: skip
    for args, expected in cases:
        done = _scaler(*args)
        assert done.returncode == 2, (args, done.stderr)
        [line] = done.stderr.strip().splitlines()
        assert expected in line, (args, line)


async def test_scaler_process_serves_mutual_tls_on_every_address(api: Api, pki: Pki, short_dir: str) -> None:
    port = free_port()
    socket = f"unix://{short_dir}/scaler.sock"
    env = base_environment() | {
        "PATH": f"{BIN}:{base_environment()['PATH']}",
        "WORK_SIDECAR_API_URL": api.url, "WORK_SIDECAR_API_KEY": KEY, "WORK_SIDECAR_ENVIRONMENT_ID": ENV,
        "WORK_SIDECAR_LISTEN": f"0.0.0.0:{port},{socket}", "WORK_SIDECAR_TLS_CERT": str(pki.server_cert),
        "WORK_SIDECAR_TLS_KEY": str(pki.server_key), "WORK_SIDECAR_TLS_CLIENT_CA": str(pki.ca),
    }  # fmt: skip
    async with serve_process(["work-sidecar", "scaler"], env) as served:
        health = ["work-sidecar", "health", "--sidecar", socket]  # the Unix socket: plaintext, for probes
        assert await until_command_succeeds(health, env, command_timeout=5, deadline=30, interval=0.2, served=served)
        async with _channel(f"127.0.0.1:{port}", pki, client=(pki.client_cert, pki.client_key)) as keda:
            assert (await _spec(keda)).metricSpecs[0].metricName == "work-items"
        async with _channel(f"127.0.0.1:{port}", pki) as stranger:
            with pytest.raises(grpc.aio.AioRpcError):
                await _spec(stranger)
