"""Every Kubernetes object the program creates, for every stack, passes kubernetes-validate strict.

The objects are the wire-form inputs the real program registered under mocks. Built-in kinds are
validated whole against the Kubernetes 1.33 OpenAPI schema in strict mode (no unknown fields).
Custom resources have no schema there, so kubernetes-validate does not judge their envelopes
(CUSTOM_KINDS lists every custom kind the stacks create); whatever standard objects they embed
(pod templates, PVC templates) are validated as those standard kinds. Beyond that:
- LeaderWorkerSet envelopes are checked here against the field names and enums of LWS's
  api/leaderworkerset/v1/leaderworkerset_types.go (hand-copied: no LWS schema is installable
  offline), not against the CRD's OpenAPI schema;
- PrometheusRule expressions are checked by promtool (test_alert_rules.py); the ScaledObject and
  PodMonitor envelopes are not checked against a schema by any test;
- Helm releases (kubernetes:helm.sh/v3:Release) are not Kubernetes objects and are not in
  `run.kubernetes()`: their values are not validated against the charts, which are not here.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import kubernetes_validate
import pytest

from tests.support.harness import StackRun, run_stack
from tests.support.manifests import K8S_VERSION, documents, manifest, validate

STACKS = ("dev", "staging", "prod")


# LeaderWorkerSet v1 fields by path, and the enums the CRD enforces, from kubernetes-sigs/lws
# api/leaderworkerset/v1/leaderworkerset_types.go (LeaderWorkerSetSpec and the types it uses).
LWS_FIELDS: Mapping[str, frozenset[str]] = {
    "spec": frozenset(
        {"replicas", "leaderWorkerTemplate", "rolloutStrategy", "startupPolicy", "networkConfig"}
    ),
    "spec.leaderWorkerTemplate": frozenset(
        {
            "leaderTemplate",
            "workerTemplate",
            "size",
            "restartPolicy",
            "subGroupPolicy",
            "volumeClaimTemplates",
            "persistentVolumeClaimRetentionPolicy",
        }
    ),
    "spec.rolloutStrategy": frozenset({"type", "rollingUpdateConfiguration"}),
    "spec.rolloutStrategy.rollingUpdateConfiguration": frozenset(
        {"partition", "maxUnavailable", "maxSurge"}
    ),
    "spec.networkConfig": frozenset({"subdomainPolicy"}),
}
LWS_ENUMS: Mapping[str, frozenset[str]] = {
    "spec.startupPolicy": frozenset({"LeaderCreated", "LeaderReady"}),
    "spec.leaderWorkerTemplate.restartPolicy": frozenset(
        {"Default", "RecreateGroupOnPodRestart", "RecreateGroupAfterStart", "None"}
    ),
    "spec.rolloutStrategy.type": frozenset({"RollingUpdate"}),
    "spec.networkConfig.subdomainPolicy": frozenset({"Shared", "UniquePerReplica"}),
}


def lws_envelope_problems(doc: dict[str, Any]) -> list[str]:
    """Unknown fields and out-of-enum values in a LeaderWorkerSet outside its pod templates."""

    def at(path: str) -> Any:
        value: Any = doc
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value

    problems = [
        f"{path}.{key}: not a LeaderWorkerSet v1 field"
        for path, allowed in LWS_FIELDS.items()
        for key in sorted(set(at(path) or {}) - allowed)
    ]
    problems += [
        f"{path}: {at(path)!r} is not one of {sorted(allowed)}"
        for path, allowed in LWS_ENUMS.items()
        if at(path) is not None and at(path) not in allowed
    ]
    if not isinstance(at("spec.leaderWorkerTemplate.workerTemplate"), dict):
        problems.append("spec.leaderWorkerTemplate.workerTemplate: required")
    return problems


@pytest.fixture(scope="module", params=STACKS)
def run(request: pytest.FixtureRequest) -> StackRun:
    return run_stack(request.param)


def test_every_kubernetes_object_is_valid(run: StackRun) -> None:
    checked = list(documents(run))
    kinds = {doc["kind"] for _, doc in checked}
    # the engines alone create a Secret, a Service and pod templates in every stack
    assert {"Secret", "Service", "PodTemplate"} <= kinds, kinds
    for label, doc in checked:
        validate(label, doc)


def test_multi_node_stacks_validate_both_pod_templates(run: StackRun) -> None:
    labels = [label for label, _ in documents(run)]
    leaders = [label for label in labels if label.endswith(".leaderTemplate")]
    assert len(leaders) == (0 if run.stack == "dev" else 1)


def test_strict_validation_rejects_an_unknown_pod_field(run: StackRun) -> None:
    template = next(doc for _, doc in documents(run) if doc["kind"] == "PodTemplate")
    broken = copy.deepcopy(template)
    broken["template"]["spec"]["containers"][0]["shmSize"] = "8Gi"  # docker-compose habit
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    broken = copy.deepcopy(template)
    broken["template"]["spec"]["enableServiceLinks"] = "false"  # a string where YAML had a bool
    with pytest.raises(kubernetes_validate.ValidationError, match="'false' is not of type"):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


LWS_TYPE = "kubernetes:leaderworkerset.x-k8s.io/v1:LeaderWorkerSet"


def test_lws_envelopes_use_only_lws_v1_fields(run: StackRun) -> None:
    lws = [manifest(r) for r in run.of_type(LWS_TYPE)]
    assert lws
    for doc in lws:
        assert lws_envelope_problems(doc) == [], doc["metadata"]["name"]


def test_lws_envelope_check_catches_misspellings_and_bad_enums(run: StackRun) -> None:
    doc = manifest(run.of_type(LWS_TYPE)[0])
    broken = copy.deepcopy(doc)
    broken["spec"]["startupPolicy"] = "LeaderFirst"
    broken["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "Always"  # a Pod's word, not LWS's
    broken["spec"]["networkConfig"]["subdomainpolicy"] = "Shared"
    assert lws_envelope_problems(broken) == [
        "spec.networkConfig.subdomainpolicy: not a LeaderWorkerSet v1 field",
        "spec.startupPolicy: 'LeaderFirst' is not one of ['LeaderCreated', 'LeaderReady']",
        "spec.leaderWorkerTemplate.restartPolicy: 'Always' is not one of "
        "['Default', 'None', 'RecreateGroupAfterStart', 'RecreateGroupOnPodRestart']",
    ]
