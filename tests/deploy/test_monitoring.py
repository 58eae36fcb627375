"""deploy/monitoring against real data: a real Prometheus (Debian's `prometheus` package, with `promtool`) scrapes
a live sidecar driven through items on the emulator, then through a Work API outage.

- The manifests: the PodMonitor selects the pods deploy/ labels, on their port named `metrics`; the dashboard and
  the rules are well formed, and every alert has promtool unit tests (`deploy/monitoring/tests/rules-test.yaml`)
  that fire it, after its `for:`, and keep it silent in a healthy case.
- `promtool check rules` and `promtool test rules` pass.
- Live: no alert fires in the healthy run; during the outage the lease, Work API and readiness alerts fire (from a
  copy of the rules with `for: 0s`: their timing is what the promtool tests check); every dashboard query returns
  numbers. A sidecar whose journal cannot grow (RLIMIT_FSIZE, as a full disk) fires the journal alert. The
  scaler's panels are checked when the scaler serves metrics (`--metrics-listen`); its staleness alert (a reading
  older than two minutes) only by promtool.

Skipped, with the reason, where `prometheus` or `promtool` is not installed (`make monitoring-deps` installs them;
`.ci/run` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml

from sidecar.work.v1 import work_service_pb2 as pb
from sidecar.work.v1 import work_service_pb2_grpc as pb_grpc
from tests.core.conftest import ENV, KEY, Api, Watch
from tests.core.conftest import api as api
from tests.helpers import eventually, free_port

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
BIN = Path(sys.executable).parent
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
TOOLS_MISSING = "prometheus/promtool are not installed: `make monitoring-deps` (apt-get install prometheus, needs root)"
DUMP_ENV = "WORK_SIDECAR_DASHBOARD_DUMP"
"""A directory: when set, each live test writes its dashboard queries' range results there, one JSON file per test
(tools/render_dashboard.py draws them)."""

JOURNAL_BYTES = 8192
"""The file size limit of the journal test's sidecar: its journal's header and a few lease lines fit."""

LIVE_ALERTS = {"WorkSidecarLeasesLost", "WorkSidecarWorkApiErrors", "WorkSidecarNotReady"}
"""What a Work API outage fires live (the journal's alert fires in a test of its own)."""


def _rule_spec() -> dict[str, Any]:
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule" and rule["apiVersion"] == "monitoring.coreos.com/v1"
    spec: dict[str, Any] = rule["spec"]
    return spec


def _alerts(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [rule for group in spec["groups"] for rule in group["rules"] if "alert" in rule]


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads((MONITORING / "dashboard.json").read_text())
    return dashboard


def _queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every dashboard target."""
    return [(panel["title"], target["expr"]) for panel in _dashboard()["panels"] for target in panel["targets"]]


def _concrete(expr: str) -> str:
    """A dashboard query as Grafana would send it: every namespace, a rate window of a few scrapes."""
    return expr.replace("$namespace", ".*").replace("$__rate_interval", "10s")


# -- the manifests ----------------------------------------------------------------------------------------------


def test_the_pod_monitor_scrapes_the_metrics_port_of_the_pods_deploy_labels() -> None:
    monitor = yaml.safe_load((MONITORING / "podmonitor.yaml").read_text())
    assert monitor["kind"] == "PodMonitor" and monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    workers = [d for d in yaml.safe_load_all((ROOT / "deploy/kubernetes/deployment.yaml").read_text()) if d]
    scaler = [d for d in yaml.safe_load_all((ROOT / "deploy/keda/scaler/deployment.yaml").read_text()) if d]
    for deployment in [*workers, *scaler]:
        if deployment.get("kind") != "Deployment":
            continue
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"{deployment['metadata']['name']} is not selected"
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == {"podmonitor.yaml", "prometheusrule.yaml"}
    assert kustomization["configMapGenerator"][0]["files"] == ["dashboard.json"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed (kubectl kustomize renders it)")
def test_kustomize_renders_the_monitor_the_rules_and_the_dashboard_configmap() -> None:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None
    rendered = subprocess.run(
        [kubectl, "kustomize", str(MONITORING)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    documents = {doc["kind"]: doc for doc in yaml.safe_load_all(rendered) if doc}
    assert set(documents) == {"ConfigMap", "PodMonitor", "PrometheusRule"}
    configmap = documents["ConfigMap"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1", "Grafana's dashboard sidecar picks it up"
    assert json.loads(configmap["data"]["dashboard.json"]) == _dashboard()


def test_the_dashboard_covers_what_an_operator_asks() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["panels"]
    exprs = " ".join(expr for _, expr in _queries())
    for metric in (
        "work_sidecar_dispatch_duration_seconds_bucket", "work_sidecar_leases_active",
        "work_sidecar_lease_losses_total", "work_sidecar_api_request_duration_seconds_bucket",
        "work_sidecar_api_errors_total", "work_sidecar_scaler_reading_items", "work_sidecar_journal_writable",
        "work_sidecar_ready",
    ):  # fmt: skip
        assert metric in exprs, f"no panel shows {metric}"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"


def test_every_alert_has_promtool_tests_that_fire_it_and_keep_it_silent() -> None:
    tests = yaml.safe_load((MONITORING / "tests" / "rules-test.yaml").read_text())
    for alert in _alerts(_rule_spec()):
        name = alert["alert"]
        cases = [c for t in tests["tests"] for c in t["alert_rule_test"] if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in cases), f"no promtool test fires {name}"
        assert any(not c["exp_alerts"] for c in cases), f"no promtool test keeps {name} silent"
        assert alert["labels"]["severity"] in ("warning", "critical") and alert["annotations"]["summary"]


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    """The PrometheusRule's groups as a plain rules file, beside a copy of the promtool tests."""
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(_rule_spec(), sort_keys=False))
    shutil.copy(MONITORING / "tests" / "rules-test.yaml", tmp_path / "rules-test.yaml")
    return tmp_path


@pytest.mark.skipif(PROMTOOL is None, reason=TOOLS_MISSING)
def test_promtool_checks_the_rules_and_runs_their_unit_tests(rules_dir: Path) -> None:
    assert PROMTOOL is not None
    for argv in (["check", "rules", "rules.yaml"], ["test", "rules", "rules-test.yaml"]):
        result = subprocess.run(
            [PROMTOOL, *argv], cwd=rules_dir, capture_output=True, text=True, timeout=120, check=False
        )
        assert result.returncode == 0, f"promtool {' '.join(argv)}:\n{result.stdout}\n{result.stderr}"
        assert "SUCCESS" in result.stdout


# -- live: a real Prometheus scraping a live sidecar --------------------------------------------------------------


class Prometheus:
    def __init__(self, url: str, http: httpx.AsyncClient) -> None:
        self.url = url
        self.http = http

    async def query(self, expr: str) -> list[dict[str, Any]]:
        answer = await self.http.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = answer.json()
        assert body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def query_range(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        params: dict[str, str | float] = {"query": expr, "start": start, "end": end, "step": 1}
        answer = await self.http.get(f"{self.url}/api/v1/query_range", params=params, timeout=10)
        body = answer.json()
        assert body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def firing(self) -> set[str]:
        return {series["metric"]["alertname"] for series in await self.query('ALERTS{alertstate="firing"}')}

    async def active(self) -> set[str]:
        return {series["metric"]["alertname"] for series in await self.query("ALERTS")}

    async def evaluated_since(self, since: float) -> bool:
        """Every rule group was evaluated after `since` (Unix time)."""
        answer = (await self.http.get(f"{self.url}/api/v1/rules", timeout=10)).json()
        groups = answer["data"]["groups"]
        stamps = [group.get("lastEvaluation", "") for group in groups]
        return bool(groups) and all(_unix(stamp) > since for stamp in stamps)


def _unix(stamp: str) -> float:
    from datetime import datetime

    if not stamp or stamp.startswith("0001-"):
        return 0.0
    head, _, fraction = stamp.rstrip("Z").partition(".")
    seconds = datetime.fromisoformat(head + "+00:00").timestamp()
    return seconds + (float("0." + fraction.split("+")[0]) if fraction else 0.0)


def _live_rules(path: Path) -> None:
    """The rules with `for: 0s`: the live run checks that they fire, promtool checks when."""
    spec = _rule_spec()
    for alert in _alerts(spec):
        alert["for"] = "0s"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))


@contextlib.asynccontextmanager
async def _prometheus(tmp_path: Path, targets: dict[str, str]) -> AsyncIterator[Prometheus]:
    assert PROMETHEUS is not None
    _live_rules(tmp_path / "rules.yaml")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
        "rule_files": [str(tmp_path / "rules.yaml")],
        "scrape_configs": [
            {
                "job_name": job,
                "static_configs": [{"targets": [target], "labels": {"namespace": "test", "pod": f"{job}-0"}}],
            }
            for job, target in targets.items()
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
        stdout=log, stderr=log,
    )  # fmt: skip
    try:
        async with httpx.AsyncClient() as http:
            url = f"http://127.0.0.1:{port}"

            async def ready() -> bool:
                assert proc.returncode is None, (tmp_path / "prometheus.log").read_text()[-2000:]
                try:
                    return (await http.get(f"{url}/-/ready", timeout=1)).status_code == 200
                except httpx.HTTPError:
                    return False

            await eventually(ready, timeout=30, interval=0.2, message="Prometheus is ready")
            yield Prometheus(url, http)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 30)
        log.close()


@contextlib.asynccontextmanager
async def _served(api: Api, short_dir: str, *, file_size_limit: int | None = None) -> AsyncIterator[tuple[str, str]]:
    """A live sidecar with --metrics-listen and --state-dir, lease TTL 2 s, unready after 1 s of failed polls:
    (its socket, its metrics address). With `file_size_limit`, no file it writes may grow past that many bytes
    (RLIMIT_FSIZE: a write past it fails with EFBIG, as on a full disk)."""
    metrics = f"127.0.0.1:{free_port()}"
    socket = f"unix://{short_dir}/monitored.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "WORK_SIDECAR_"))}

    def limit_files() -> None:
        if file_size_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    proc = await asyncio.create_subprocess_exec(
        str(BIN / "work-sidecar"), "serve", "--api-url", api.url, "--environment-id", ENV, "--listen", socket,
        "--metrics-listen", metrics, "--state-dir", f"{short_dir}/state", "--ttl", "2", "--unready-after", "1",
        "--drain-timeout", "5", env={**env, "WORK_SIDECAR_API_KEY": KEY},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=limit_files,
    )  # fmt: skip
    try:
        yield socket, metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)


@pytest.fixture
async def sidecar(api: Api, short_dir: str) -> AsyncIterator[tuple[str, str]]:
    async with _served(api, short_dir) as served:
        yield served


async def _up(stub: pb_grpc.WorkServiceAsyncStub) -> bool:
    try:
        await stub.GetQueueStats(pb.GetQueueStatsRequest(), timeout=1)
    except grpc.aio.AioRpcError:
        return False
    return True


async def _work_through(
    api: Api, stub: pb_grpc.WorkServiceAsyncStub, prometheus: Prometheus, done: int
) -> pb.WorkAssigned:
    """`done` items assigned and stopped, one at a time, each once Prometheus has scraped the one before (a rate
    needs two samples of a series: the first item creates the histogram series, the next ones move them); then
    one more assigned and held."""
    watch = Watch(stub.WatchWork(pb.WatchWorkRequest(sandbox_id="monitored", max_in_flight=1))).start()
    for count in range(1, done + 1):
        await api.enqueue(1)
        item = await watch.assigned()
        await stub.StopWork(pb.StopWorkRequest(work_id=item.work.id, lease_token=item.lease_token, force=True))
        dispatched = functools.partial(_scraped, prometheus, "sum(work_sidecar_dispatch_duration_seconds_count)", count)
        await eventually(dispatched, timeout=30, interval=0.3, message=f"Prometheus scraped item {count}")
    await api.enqueue(1)
    return await watch.assigned()


async def _scraped(prometheus: Prometheus, expr: str, at_least: float) -> bool:
    found = await prometheus.query(expr)
    return bool(found) and float(found[0]["value"][1]) >= at_least


def _finite(result: list[dict[str, Any]]) -> bool:
    """Some series has a number (not NaN: a quantile of no samples, a ratio of nothing)."""
    return any(value not in ("NaN", "+Inf", "-Inf") for series in result for _, value in series["values"])


@pytest.mark.skipif(PROMETHEUS is None or PROMTOOL is None, reason=TOOLS_MISSING)
async def test_a_live_prometheus_sees_the_dashboard_and_the_alerts(
    api: Api, sidecar: tuple[str, str], tmp_path: Path
) -> None:
    socket, metrics = sidecar
    started = time.time()
    async with (
        _prometheus(tmp_path, {"work-sidecar": metrics}) as prometheus,
        grpc.aio.insecure_channel(socket) as channel,
    ):
        stub = pb_grpc.WorkServiceStub(channel)
        await eventually(lambda: _up(stub), timeout=30, message="the sidecar serves")
        await _work_through(api, stub, prometheus, done=3)

        # Healthy: the items are in Prometheus, the rules were evaluated on them, and nothing fires.
        await eventually(
            lambda: _scraped(prometheus, 'sum(work_sidecar_items_completed_total{final_state="stopped"})', 3),
            timeout=30, interval=0.5, message="Prometheus scraped the three items",
        )  # fmt: skip
        seen = time.time()
        await eventually(lambda: prometheus.evaluated_since(seen + 2), timeout=30, interval=0.5, message="rules ran")
        assert await prometheus.active() == set(), "an alert is pending or firing in a healthy run"

        # A Work API outage: polls and heartbeats fail, the held lease expires (TTL 2 s), readiness is lost.
        await api.admin.inject_fault("*", status=503, count=None)

        firing: set[str] = set()

        async def fired() -> bool:
            firing.clear()
            firing.update(await prometheus.firing())
            return firing >= LIVE_ALERTS

        with contextlib.suppress(AssertionError):
            await eventually(fired, timeout=60, interval=0.5)
        assert firing == LIVE_ALERTS, f"firing during the outage: {sorted(firing)}, not {sorted(LIVE_ALERTS)}"
        await api.admin.clear_faults()

        # Every dashboard query has data over the run (the scaler's need a scaler serving metrics: below).
        end = time.time() + 1
        results = {}
        for title, expr in _queries():
            if "work_sidecar_scaler_" in expr:
                continue
            results[expr] = (title, await prometheus.query_range(_concrete(expr), started, end))
        empty = [f"{title}: {expr}" for expr, (title, found) in results.items() if not _finite(found)]
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
        _dump("sidecar", results, started, end)


@pytest.mark.skipif(PROMETHEUS is None or PROMTOOL is None, reason=TOOLS_MISSING)
async def test_a_live_prometheus_fires_the_journal_alert(api: Api, short_dir: str, tmp_path: Path) -> None:
    """A lease journal that cannot grow (its file size limited, as a full disk would) fires the journal alert."""
    async with (
        _served(api, short_dir, file_size_limit=JOURNAL_BYTES) as (socket, metrics),
        _prometheus(tmp_path, {"work-sidecar": metrics}) as prometheus,
        grpc.aio.insecure_channel(socket) as channel,
    ):
        stub = pb_grpc.WorkServiceStub(channel)
        await eventually(lambda: _up(stub), timeout=30, message="the sidecar serves")
        await eventually(
            lambda: _scraped(prometheus, "min(work_sidecar_journal_writable)", 1),
            timeout=30, interval=0.3, message="Prometheus sees a writable journal",
        )  # fmt: skip
        assert "WorkSidecarJournalNotWritable" not in await prometheus.active()
        watch = Watch(stub.WatchWork(pb.WatchWorkRequest(sandbox_id="journaled", max_in_flight=100))).start()
        await api.enqueue(40)  # their lease lines outgrow the limit

        async def unwritable() -> bool:
            found = await prometheus.query("min(work_sidecar_journal_writable) == 0")
            return bool(found) and "WorkSidecarJournalNotWritable" in await prometheus.firing()

        await eventually(unwritable, timeout=60, interval=0.5, message="the journal alert fires")
        watch.cancel()


def _dump(name: str, results: dict[str, tuple[str, list[dict[str, Any]]]], start: float, end: float) -> None:
    directory = os.environ.get(DUMP_ENV)
    if not directory:
        return
    panels = [{"title": title, "expr": expr, "result": found} for expr, (title, found) in results.items()]
    Path(directory, f"{name}.json").write_text(json.dumps({"start": start, "end": end, "queries": panels}, indent=1))


def _scaler_serves_metrics() -> bool:
    result = subprocess.run(
        [str(BIN / "work-sidecar"), "scaler", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    return "--metrics-listen" in result.stdout


@pytest.fixture
async def scaler(api: Api, short_dir: str) -> AsyncIterator[tuple[str, str]]:
    """A live KEDA scaler with --metrics-listen: (its socket, its metrics address)."""
    if not _scaler_serves_metrics():
        pytest.skip("this build's scaler serves no metrics (work-sidecar scaler has no --metrics-listen)")
    metrics = f"127.0.0.1:{free_port()}"
    socket = f"unix://{short_dir}/scaler.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "WORK_SIDECAR_"))}
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "work-sidecar"), "scaler", "--api-url", api.url, "--environment-id", ENV, "--listen", socket,
        "--metrics-listen", metrics, "--stats-interval", "0.5", "--max-backoff", "1",
        env={**env, "WORK_SIDECAR_API_KEY": KEY}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield socket, metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)


@pytest.mark.skipif(PROMETHEUS is None or PROMTOOL is None, reason=TOOLS_MISSING)
async def test_a_live_prometheus_sees_the_scaler_panels(api: Api, scaler: tuple[str, str], tmp_path: Path) -> None:
    from sidecar.keda import externalscaler_pb2 as keda
    from sidecar.keda import externalscaler_pb2_grpc as keda_grpc

    socket, metrics = scaler
    started = time.time()
    await api.enqueue(2)
    request = keda.GetMetricsRequest(
        scaledObjectRef=keda.ScaledObjectRef(name="workers", namespace="test"), metricName="work-items"
    )
    async with (
        _prometheus(tmp_path, {"work-sidecar-scaler": metrics}) as prometheus,
        grpc.aio.insecure_channel(socket) as channel,
    ):
        stub = keda_grpc.ExternalScalerStub(channel)

        async def read(expr: str) -> bool:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.GetMetrics(request, timeout=2)  # KEDA asking: the scaler reads the environment
            return bool(await prometheus.query(expr))

        await eventually(
            lambda: read("work_sidecar_scaler_reading_items > 0"), timeout=30, interval=0.5, message="a reading"
        )
        assert await prometheus.active() == set(), "an alert is pending or firing while the scaler reads"
        await api.admin.inject_fault("stats", status=503, count=None)  # its reads fail: errors, the reading ages
        await eventually(
            lambda: read("sum(rate(work_sidecar_scaler_read_errors_total[10s])) > 0"),
            timeout=30,
            interval=0.5,
            message="read errors, counted across scrapes",
        )
        await api.admin.clear_faults()
        end = time.time() + 1
        results = {}
        for title, expr in _queries():
            if "work_sidecar_scaler_" in expr:
                results[expr] = (title, await prometheus.query_range(_concrete(expr), started, end))
        assert results, "the dashboard has scaler panels"
        empty = [f"{title}: {expr}" for expr, (title, found) in results.items() if not _finite(found)]
        assert not empty, "scaler queries without data:\n" + "\n".join(empty)
        _dump("scaler", results, started, end)
