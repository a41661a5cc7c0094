"""Every Kubernetes object the program creates, for every stack, passes kubernetes-validate strict.

The objects are the wire-form inputs the real program registered under mocks. Built-in kinds are
validated whole against the Kubernetes 1.33 OpenAPI schema in strict mode (no unknown fields).
Custom resources have no schema there, so kubernetes-validate does not judge their envelopes
(CUSTOM_KINDS lists every custom kind the stacks create); whatever standard objects they embed
(pod templates, PVC templates) are validated as those standard kinds. Beyond that:
- every custom resource envelope (LeaderWorkerSet, ScaledObject, PodMonitor, PrometheusRule) is
  validated against the OpenAPI schema of the CRD its pinned chart installs, and every Helm
  release is rendered by the real helm, in tests/artifacts/test_helm_releases.py;
- PrometheusRule expressions are checked by promtool (tests/artifacts/test_alert_rules.py).
"""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest

from tests.support.harness import StackRun, run_stack
from tests.support.manifests import K8S_VERSION, documents, validate

STACKS = ("dev", "staging", "prod")


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
