"""One sidecar definition for every pod shape (deploy/components/sidecar), rendered as `kubectl apply -k` would:
every overlay's sidecar container equals the component's but for ALLOWED_DIFFERENCES; every container that runs
`serve` with state has a writable volume there; every pod that runs items keeps node autoscalers away; the
ScaledObject's workers have a PodDisruptionBudget; grace periods cover what the docs promise."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from ._dockerfile import parse as parse_dockerfile
from ._harness import ROOT
from .test_kubernetes import render

OVERLAYS = ("kubernetes", "keda/scaledobject", "keda/scaledjob", "keda/daemonset")
COMPONENT = ROOT / "deploy" / "components" / "sidecar" / "sidecar.yaml"
ALLOWED_DIFFERENCES = {
    "restartPolicy": "a native sidecar (init container, Always) in a pod with its sandbox; a regular container in "
    "the DaemonSet, whose sandboxes are other pods",
    "resources": "the DaemonSet's sidecar serves every sandbox of its node",
    "env.WORK_SIDECAR_SOCKET_MODE": "0660 in the DaemonSet: the sandbox pods connect through the socket's group",
    "env.WORK_SIDECAR_WORKER_ID": "the pod's name, or the node's name for the DaemonSet",
}
"""The fields in which a pod shape's sidecar container may differ from the component's, and why."""
DO_NOT_DISRUPT = {"karpenter.sh/do-not-disrupt": "true", "cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}
LONGEST_ITEM = 3600
"""Seconds: the longest item the ScaledObject's workers finish when scaled in or evicted (docs/deployment.md)."""


def component() -> dict[str, Any]:
    [document] = [d for d in yaml.safe_load_all(COMPONENT.read_text()) if d]
    assert document["metadata"]["annotations"]["config.kubernetes.io/local-config"] == "true", "never applied"
    container: dict[str, Any] = document["spec"]["container"]
    return container


def pods(documents: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for document in documents:
        spec = document.get("spec", {})
        template = spec.get("jobTargetRef", {}).get("template") or spec.get("template")
        if template is not None:
            found.append((f"{document['kind']}/{document['metadata']['name']}", template))
    return found


def runs_serve(container: dict[str, Any]) -> bool:
    """A container of the work-sidecar image with the image's entrypoint and `serve` (its CMD) as the command."""
    image = container.get("image", "").rpartition("/")[2]
    return (
        image.startswith("work-sidecar:")
        and "command" not in container
        and container.get("args", ["serve"]) == ["serve"]
    )


def sidecars(documents: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, pod spec, container) for every container running `serve`."""
    return [
        (where, template["spec"], container)
        for where, template in pods(documents)
        for container in [*template["spec"].get("initContainers", []), *template["spec"]["containers"]]
        if runs_serve(container)
    ]


def flatten(container: dict[str, Any]) -> dict[str, Any]:
    """Top-level fields, with `env` split into one entry per variable (env.NAME)."""
    out = {key: value for key, value in container.items() if key != "env"}
    for entry in container.get("env", []):
        out[f"env.{entry['name']}"] = {k: v for k, v in entry.items() if k != "name"}
    return out


def differences(a: dict[str, Any], b: dict[str, Any]) -> set[str]:
    fa, fb = flatten(a), flatten(b)
    return {key for key in fa.keys() | fb.keys() if fa.get(key) != fb.get(key)}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {overlay: render(ROOT / "deploy" / overlay) for overlay in OVERLAYS}


def test_every_pod_shape_runs_the_components_sidecar(rendered: dict[str, list[dict[str, Any]]]) -> None:
    reference = component()
    shapes = set()
    for overlay, documents in rendered.items():
        found = sidecars(documents)
        assert found, f"{overlay}: a sidecar container"
        for where, _, container in found:
            shapes.add(where.split("/")[0])
            unexpected = differences(container, reference) - ALLOWED_DIFFERENCES.keys()
            assert not unexpected, f"{overlay} {where}: differs from deploy/components/sidecar in {sorted(unexpected)}"
    assert shapes == {"Deployment", "ScaledJob", "DaemonSet"}


def test_the_comparison_can_fail() -> None:
    reference = component()
    drifted = copy.deepcopy(reference)
    del drifted["startupProbe"]
    drifted["env"] = [e for e in drifted["env"] if e["name"] != "WORK_SIDECAR_STATE_DIR"]
    assert differences(drifted, reference) == {"startupProbe", "env.WORK_SIDECAR_STATE_DIR"}
    assert differences(reference, copy.deepcopy(reference)) == set()


def test_every_serving_container_has_a_writable_state_volume(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The image's state dir (or the manifest's) is a volume the pod mounts writable: the root filesystem is
    read-only, and whether a runtime makes the image's VOLUME writable is up to it (CRI-O's default does not)."""
    image_env = parse_dockerfile(ROOT / "Dockerfile").final.declared_env()
    for overlay, documents in rendered.items():
        for where, pod, container in sidecars(documents):
            env = image_env | {e["name"]: e.get("value") for e in container.get("env", [])}
            state = env.get("WORK_SIDECAR_STATE_DIR")
            assert state, f"{overlay} {where}: leases survive a restart only with a state dir"
            [mount] = [m for m in container.get("volumeMounts", []) if m["mountPath"] == state]
            assert not mount.get("readOnly"), f"{overlay} {where}: the state volume is writable"
            [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
            assert {"emptyDir", "hostPath"} & volume.keys(), f"{overlay} {where}: survives a container restart"
            assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_pods_that_run_items_keep_node_autoscalers_away(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay, documents in rendered.items():
        for where, template in pods(documents):
            containers = [*template["spec"].get("initContainers", []), *template["spec"]["containers"]]
            if not any(runs_serve(c) or "exec" in c.get("command", []) for c in containers):
                continue  # the scaler: no items
            annotations = template.get("metadata", {}).get("annotations", {})
            assert DO_NOT_DISRUPT.items() <= annotations.items(), f"{overlay} {where}: {annotations}"


def test_the_scaled_workers_have_a_disruption_budget(rendered: dict[str, list[dict[str, Any]]]) -> None:
    documents = rendered["keda/scaledobject"]
    [budget] = [d for d in documents if d["kind"] == "PodDisruptionBudget"]
    [deployment] = [d for d in documents if d["kind"] == "Deployment" and d["metadata"]["name"] == "sandbox-worker"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] == 1, "a drain takes one worker at a time"
    assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow", "unready pods never block a drain"


def test_grace_periods_cover_the_drain_and_the_promised_items(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay, documents in rendered.items():
        for where, pod, container in sidecars(documents):
            drain = float(next(e["value"] for e in container["env"] if e["name"] == "WORK_SIDECAR_DRAIN_TIMEOUT"))
            grace = pod["terminationGracePeriodSeconds"]
            assert grace > drain, f"{overlay} {where}"
            if overlay == "keda/scaledobject":
                assert grace >= LONGEST_ITEM + drain, "scale-in lets the item in hand finish"


def test_the_metrics_port_is_named_for_a_pod_monitor(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay, documents in rendered.items():
        for where, _, container in sidecars(documents):
            listen = next(e["value"] for e in container["env"] if e["name"] == "WORK_SIDECAR_METRICS_LISTEN")
            port = int(listen.rpartition(":")[2])
            assert {"name": "metrics", "containerPort": port} in container["ports"], f"{overlay} {where}"


def test_the_component_is_not_applied_on_its_own() -> None:
    """It is a kustomize Component (used by the overlays), not a kustomization to apply."""
    kustomization = yaml.safe_load((COMPONENT.parent / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Component"
    overlays = [ROOT / "deploy" / overlay / "kustomization.yaml" for overlay in OVERLAYS]
    users = [path for path in overlays if "components/sidecar" in Path(path).read_text()]
    assert {p.parent.name for p in users} == {"kubernetes", "scaledjob", "daemonset"}, "scaledobject: via kubernetes"
