"""Kubernetes objects the program registers under mocks, as manifests, and their strict validation."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import kubernetes_validate
import pytest

from tests.support.harness import Resource, StackRun

# How pulumi serializes a secret value inside an input (pulumi/runtime/rpc.py).
SECRET_SIG_KEY = "4dabf18193072939515e22adb298388d"


def plain(value: Any) -> Any:
    """Inputs with pulumi's secret wrappers replaced by the values they wrap."""
    if isinstance(value, Mapping):
        if value.get(SECRET_SIG_KEY) == SECRET_SIG:
            return plain(value["value"])
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def manifest(resource: Resource) -> dict[str, Any]:
    return plain(copy.deepcopy(resource.inputs))


def documents(run: StackRun) -> Iterator[tuple[str, dict[str, Any]]]:
    """(label, standard object) for every object to validate in one stack run."""
    for resource in run.kubernetes():
        doc = manifest(resource)
        label = f"{run.stack}:{resource.type}:{resource.name}"
        if _is_builtin(doc):
            yield label, doc
            continue
        key = f"{doc['apiVersion'].rpartition('/')[0]}/{doc['kind']}"
        assert key in CUSTOM_KINDS, f"{label}: add {key} to CUSTOM_KINDS in {__name__}"
        for where, embedded in CUSTOM_KINDS[key](doc):
            yield f"{label}.{where}", embedded


def validate(label: str, doc: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        path = ".".join(str(p) for p in err.path)
        pytest.fail(f"{label}: {path}: {err.message}")


K8S_VERSION = "1.33.0"


SECRET_SIG = "1b47061264138c4ac30d75fd1eb44270"


def _is_builtin(doc: dict[str, Any]) -> bool:
    """Whether Kubernetes 1.33's own API has this kind (kubernetes-validate has its schema)."""
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return False
    except kubernetes_validate.ValidationError:
        return True
    return True


Embedded = list[tuple[str, dict[str, Any]]]  # (where, standard object to validate)


def _leader_worker_set(doc: dict[str, Any]) -> Embedded:
    lwt = doc["spec"]["leaderWorkerTemplate"]
    found = [_pod_template("workerTemplate", lwt["workerTemplate"])]
    if "leaderTemplate" in lwt:
        found.append(_pod_template("leaderTemplate", lwt["leaderTemplate"]))
    found += [
        (
            f"volumeClaimTemplates[{i}]",
            {"apiVersion": "v1", "kind": "PersistentVolumeClaim", **claim},
        )
        for i, claim in enumerate(lwt.get("volumeClaimTemplates", []))
    ]
    return found


def _no_pod_template(doc: dict[str, Any]) -> Embedded:
    del doc
    return []


def _pod_template(where: str, template: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    # A PodTemplate's `template` field is a PodTemplateSpec, so this validates exactly that.
    return where, {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": "embedded"},
        "template": template,
    }


# Custom resource kinds the program creates → the standard objects embedded in them. The CRD
# envelopes are not judged here (kubernetes-validate ships only the built-in API schemas): they are
# validated against the pinned charts' CRDs in tests/artifacts/test_helm_releases.py.
# A new custom kind must be added here, so its embedded pod specs cannot go unchecked.
CUSTOM_KINDS: Mapping[str, Callable[[dict[str, Any]], Embedded]] = {
    "leaderworkerset.x-k8s.io/LeaderWorkerSet": _leader_worker_set,
    "keda.sh/ScaledObject": _no_pod_template,
    "monitoring.coreos.com/PodMonitor": _no_pod_template,
    "monitoring.coreos.com/PrometheusRule": _no_pod_template,
}
