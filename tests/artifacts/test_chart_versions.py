"""The pinned charts' appVersions and CRD versions agree with what the project assumes.

Each chart's Chart.yaml (appVersion) and the CRDs it renders (served versions, schemas, the
Prometheus Operator's version annotation) are read from the archives in build/charts; the
project's own custom resources, API versions and image tags are checked against them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from components.autoscaling import KEDA_API
from scripts.charts.crd_schema import CRD_KIND, CrdValidator
from scripts.charts.fetch import chart_metadata
from stacks.settings import load_stack_file
from stacks.versions import (
    CLUSTER_AUTOSCALER,
    HELM_CHARTS,
    KEDA,
    KUBE_PROMETHEUS_STACK,
    LEADER_WORKER_SET,
    kubernetes_pins,
)
from tests.support.charts import RenderedStack, app_version, archive, render_stack
from tests.support.harness import ROOT

STACKS = ("dev", "staging", "prod")
LWS_API = "leaderworkerset.x-k8s.io/v1"
MONITORING_API = "monitoring.coreos.com/v1"


@pytest.fixture(scope="module")
def stacks() -> list[RenderedStack]:
    return [render_stack(s) for s in STACKS]


def crd(stack: RenderedStack, group: str, kind: str) -> dict[str, Any]:
    (found,) = [
        d
        for r in stack.releases.values()
        for d in r.of_kind(CRD_KIND)
        if d["spec"]["group"] == group and d["spec"]["names"]["kind"] == kind
    ]
    return found


def schema_of(definition: Mapping[str, Any], version: str) -> dict[str, Any]:
    (v,) = [v for v in definition["spec"]["versions"] if v["name"] == version]
    return v["schema"]["openAPIV3Schema"]


Path = tuple[str, ...]


def field_paths(value: Any, prefix: Path = ()) -> Iterator[Path]:
    """Every field path of an object, a list's items as "[]" (label keys hold dots)."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            path = (*prefix, str(key))
            yield path
            yield from field_paths(item, path)
    elif isinstance(value, list):
        for item in value:
            yield from field_paths(item, (*prefix, "[]"))


def declared(schema: Mapping[str, Any], path: Path) -> bool:
    """Whether a CRD schema declares the field at path (free-form maps declare any key)."""
    node: Mapping[str, Any] = schema
    for part in path:
        if part == "[]":
            node = node.get("items") or {}
            continue
        if node.get("x-kubernetes-preserve-unknown-fields"):
            return True
        properties = node.get("properties")
        if properties is None and isinstance(node.get("additionalProperties"), Mapping):
            node = node["additionalProperties"]
            continue
        if properties is None or part not in properties:
            return False
        node = properties[part]
    return True


def test_every_archive_is_the_pinned_chart() -> None:
    for key, row in HELM_CHARTS.items():
        meta = chart_metadata(archive(key))
        assert (meta["name"], str(meta["version"])) == (row.chart, row.version), key


def test_the_converted_crd_schemas_are_valid_json_schema(stacks: list[RenderedStack]) -> None:
    """The meta-schema check the per-stack validators skip, done once on the kinds the project
    creates (scripts/charts/crd_schema.py converts OpenAPI to JSON Schema)."""
    kinds = {
        ("leaderworkerset.x-k8s.io", "LeaderWorkerSet"),
        ("keda.sh", "ScaledObject"),
        ("monitoring.coreos.com", "PodMonitor"),
        ("monitoring.coreos.com", "ServiceMonitor"),
        ("monitoring.coreos.com", "PrometheusRule"),
    }
    validator = CrdValidator([crd(stacks[0], g, k) for g, k in sorted(kinds)], check_schemas=True)
    assert len(validator.kinds()) == len(kinds)


def test_prometheus_operator_crds_are_the_charts_operator_version(
    stacks: list[RenderedStack],
) -> None:
    operator = app_version(KUBE_PROMETHEUS_STACK).removeprefix("v")
    for stack in stacks:
        for kind in ("PodMonitor", "ServiceMonitor", "PrometheusRule", "Prometheus"):
            definition = crd(stack, "monitoring.coreos.com", kind)
            annotations = definition["metadata"].get("annotations") or {}
            assert annotations.get("operator.prometheus.io/version") == operator, kind


def test_every_field_the_projects_monitors_use_exists_in_the_operator_crd(
    stacks: list[RenderedStack],
) -> None:
    missing = set()
    for stack in stacks:
        for _, doc in stack.program_custom_resources():
            if doc["apiVersion"] != MONITORING_API:
                continue
            schema = schema_of(crd(stack, "monitoring.coreos.com", doc["kind"]), "v1")
            missing |= {
                f"{doc['kind']}.{'.'.join(p)}"
                for p in field_paths(doc["spec"], ("spec",))
                if not declared(schema, p)
            }
    assert missing == set()


def test_the_scaled_object_api_version_is_served_by_the_keda_crd(
    stacks: list[RenderedStack],
) -> None:
    assert app_version(KEDA) == HELM_CHARTS[KEDA].version
    group, version = KEDA_API.split("/")
    for stack in stacks:
        assert version in stack.crds.served_versions(group, "ScaledObject")


def test_lws_v1_is_served_scales_and_has_volume_claim_templates(
    stacks: list[RenderedStack],
) -> None:
    """KEDA scales a LeaderWorkerSet through its scale subresource; weights.cache: pvc needs
    leaderWorkerTemplate.volumeClaimTemplates (LWS >= 0.8.0)."""
    assert app_version(LEADER_WORKER_SET) == HELM_CHARTS[LEADER_WORKER_SET].version
    group, version = LWS_API.split("/")
    for stack in stacks:
        assert version in stack.crds.served_versions(group, "LeaderWorkerSet")
        definition = crd(stack, group, "LeaderWorkerSet")
        (v1,) = [v for v in definition["spec"]["versions"] if v["name"] == version]
        assert v1["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
        schema = schema_of(definition, version)
        assert declared(schema, ("spec", "leaderWorkerTemplate", "volumeClaimTemplates"))
        for _, doc in stack.program_custom_resources():
            if doc["kind"] == "LeaderWorkerSet":
                assert doc["apiVersion"] == LWS_API
                assert doc["metadata"]["name"]


def test_cluster_autoscaler_chart_matches_the_cluster_minor() -> None:
    """Cluster Autoscaler's minor must match the cluster's; the chart's appVersion is the
    autoscaler it was released with, and the image tag comes from KUBERNETES_PINS."""
    chart_minor = ".".join(app_version(CLUSTER_AUTOSCALER).removeprefix("v").split(".")[:2])
    for stack in STACKS:
        settings = load_stack_file(ROOT / f"Pulumi.{stack}.yaml")
        pins = kubernetes_pins(settings.cluster.version)
        assert pins is not None
        image_minor = ".".join(pins.cluster_autoscaler_image_tag.removeprefix("v").split(".")[:2])
        assert chart_minor == image_minor == settings.cluster.version, stack


def test_docs_explain_every_pin() -> None:
    """docs/delivery.md#chart-pins has a line for every chart at its pinned version."""
    text = (ROOT / "docs" / "delivery.md").read_text()
    assert "\n## Chart pins\n" in text
    section = text.split("\n## Chart pins\n", 1)[1].split("\n## ", 1)[0]
    for row in HELM_CHARTS.values():
        assert f"`{row.chart}` {row.version}" in section, row.chart
