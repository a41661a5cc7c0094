"""Helm releases the program registers, rendered with the real helm at their pinned versions.

`render_stack(stack)` runs the program under mocks (tests/support/harness.py), takes every
`kubernetes:helm.sh/v3:Release` exactly as registered (chart, version, release name, namespace
and values: nothing is re-typed), finds the archive of its HELM_CHARTS row in build/charts
(`make charts` puts them there) and runs `helm template` (build/helm/helm, helm v3.17.2) with
the stack's cluster version as --kube-version and CRDs included. It renders twice: first to
collect the CRDs the stack's charts install, then with those API versions as --api-versions,
as helm sees them on a cluster where the releases are installed. Both renders are cached for
the session, keyed by everything helm is given, so a chart is rendered once per distinct input.

Also: label-selector, node-affinity and toleration semantics, to judge rendered pod specs the
way the scheduler and the Prometheus Operator would.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest

from scripts.charts.crd_schema import CRD_KIND, CrdValidator
from scripts.charts.fetch import MIRROR_ENV, chart_metadata
from scripts.charts.render import helm_template
from stacks.settings import load_stack_file
from stacks.versions import HELM_CHARTS, HelmChart
from tests.support.harness import ROOT, Resource, StackRun, run_stack
from tests.support.manifests import manifest, plain

HELM: Final = ROOT / "build" / "helm" / "helm"
CHARTS_DIR: Final = ROOT / "build" / "charts"
RELEASE_TYPE: Final = "kubernetes:helm.sh/v3:Release"
MAKE_CHARTS: Final = "run `make charts` (CHART_MIRROR=/work/shared/charts offline)"


def need_helm() -> Path:
    if not os.access(HELM, os.X_OK):
        pytest.fail(f"no helm at {HELM}: {MAKE_CHARTS}")
    return HELM


def mirror() -> Path | None:
    """The chart mirror named by CHART_MIRROR (docs/delivery.md#chart-pins), if any."""
    value = os.environ.get(MIRROR_ENV)
    return Path(value) if value else None


def archive_names(chart: HelmChart) -> list[str]:
    """The archive as helm pull names it, then with the version's leading "v" toggled."""
    other = chart.version[1:] if chart.version.startswith("v") else f"v{chart.version}"
    return [f"{chart.chart}-{chart.version}.tgz", f"{chart.chart}-{other}.tgz"]


def archive(key: str) -> Path:
    """build/charts' archive of the HELM_CHARTS row `key`; fails naming `make charts`."""
    chart = HELM_CHARTS[key]
    for name in archive_names(chart):
        path = CHARTS_DIR / name
        if path.is_file():
            return path
    pytest.fail(f"{CHARTS_DIR / archive_names(chart)[0]} is missing: {MAKE_CHARTS}")


@dataclass(frozen=True)
class ReleaseInput:
    """One registered Release: its inputs as the program passed them, and its pin's archive."""

    resource: str  # the Pulumi resource name
    key: str  # the HELM_CHARTS row
    chart: str
    version: str
    name: str
    namespace: str
    values: Mapping[str, Any]
    archive: Path


def pin_key(chart: str, version: str) -> str:
    """The HELM_CHARTS row a Release's chart and version come from."""
    for key, row in HELM_CHARTS.items():
        if row.reference == chart and row.version == version:
            return key
    pytest.fail(f"a Release installs {chart} {version}, which is no row of HELM_CHARTS")


def release_inputs(run: StackRun) -> list[ReleaseInput]:
    found = []
    for resource in run.of_type(RELEASE_TYPE):
        inputs = plain(copy.deepcopy(resource.inputs))
        key = pin_key(inputs["chart"], inputs["version"])
        found.append(
            ReleaseInput(
                resource=resource.name,
                key=key,
                chart=inputs["chart"],
                version=inputs["version"],
                name=inputs["name"],
                namespace=inputs["namespace"],
                values=inputs.get("values", {}),
                archive=archive(key),
            )
        )
    return found


@functools.cache
def _template(  # noqa: PLR0917 (the cache key is everything helm is given)
    archive_path: Path,
    name: str,
    namespace: str,
    values_json: str,
    kube_version: str,
    api_versions: tuple[str, ...],
) -> str:
    docs = helm_template(
        need_helm(), archive_path, name, namespace, json.loads(values_json), kube_version,
        api_versions, True,
    )  # fmt: skip
    return json.dumps(docs)


def template(
    release: ReleaseInput, kube_version: str, api_versions: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """`helm template --include-crds` of one release (a fresh copy of the cached output)."""
    values = json.dumps(release.values, sort_keys=True)
    text = _template(
        release.archive, release.name, release.namespace, values, kube_version,
        tuple(api_versions),
    )  # fmt: skip
    return json.loads(text)


def template_archive(path: Path, name: str, namespace: str, kube_version: str) -> list[dict]:
    """`helm template --include-crds` of any archive with its default values (cached)."""
    return json.loads(_template(path, name, namespace, "{}", kube_version, ()))


def crd_api_versions(docs: Sequence[Mapping[str, Any]]) -> list[str]:
    """--api-versions for the served versions of these CRDs: group/version and group/version/Kind."""
    found: set[str] = set()
    for doc in docs:
        if doc.get("kind") != CRD_KIND:
            continue
        spec = doc["spec"]
        for version in spec["versions"]:
            if version.get("served"):
                group_version = f"{spec['group']}/{version['name']}"
                found |= {group_version, f"{group_version}/{spec['names']['kind']}"}
    return sorted(found)


def kube_version(stack_file: Path) -> str:
    """The stack's cluster version (settings: cluster.version, a minor) as helm and
    kubernetes-validate take it."""
    minor = load_stack_file(stack_file).cluster.version
    return minor if minor.count(".") == 2 else f"{minor}.0"


@dataclass(frozen=True)
class RenderedRelease:
    release: ReleaseInput
    docs: list[dict[str, Any]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d.get("kind") == kind]

    def named(self, kind: str, name: str) -> dict[str, Any]:
        matches = [d for d in self.of_kind(kind) if d["metadata"]["name"] == name]
        names = [d["metadata"]["name"] for d in self.of_kind(kind)]
        assert len(matches) == 1, f"{self.release.key}: no single {kind} {name} (have {names})"
        return matches[0]

    def namespace_of(self, doc: Mapping[str, Any]) -> str:
        """Where helm installs a namespaced object (the release's namespace unless it says)."""
        return doc["metadata"].get("namespace") or self.release.namespace


@dataclass(frozen=True)
class RenderedStack:
    run: StackRun
    stack_file: Path
    kube_version: str
    api_versions: tuple[str, ...]
    releases: Mapping[str, RenderedRelease]  # by HELM_CHARTS key
    crds: CrdValidator  # every CRD the stack's charts install

    def release(self, key: str) -> RenderedRelease:
        assert key in self.releases, (
            f"{self.run.stack} installs no {key} (has {list(self.releases)})"
        )
        return self.releases[key]

    def chart_objects(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(label, object) for every object every release renders."""
        for key, rendered in self.releases.items():
            for doc in rendered.docs:
                meta = doc.get("metadata") or {}
                yield f"{self.run.stack}:{key}:{doc.get('kind')}/{meta.get('name')}", doc

    def is_custom(self, doc: Mapping[str, Any]) -> bool:
        """Whether a CRD of this stack defines the object's kind (else it is a built-in kind)."""
        group = str(doc.get("apiVersion", "")).rpartition("/")[0]
        return f"{doc.get('kind')}.{group}" in self.crds.kinds()

    def program_custom_resources(self) -> list[tuple[Resource, dict[str, Any]]]:
        """Every custom resource the program itself registers, as its manifest."""
        return [(r, manifest(r)) for r in self.run.kubernetes() if self.is_custom(manifest(r))]


@functools.cache
def render_stack(stack: str, stack_file: Path | None = None) -> RenderedStack:
    """Run the program for `stack` (or a variant file) and render every Release it registers."""
    need_helm()
    path = stack_file or ROOT / f"Pulumi.{stack}.yaml"
    run = run_stack(stack, stack_file)
    version = kube_version(path)
    releases = release_inputs(run)
    keys = [r.key for r in releases]
    assert len(set(keys)) == len(keys), f"{stack}: a chart is installed twice: {keys}"
    first = [doc for r in releases for doc in template(r, version)]
    api_versions = tuple(crd_api_versions(first))
    rendered = {r.key: RenderedRelease(r, template(r, version, api_versions)) for r in releases}
    all_docs = [doc for r in rendered.values() for doc in r.docs]
    return RenderedStack(
        run=run,
        stack_file=path,
        kube_version=version,
        api_versions=api_versions,
        releases=rendered,
        crds=crd_validator(all_docs),
    )


@functools.cache
def _validator(crds_json: str) -> CrdValidator:
    # The meta-schema check of the converted schemas is done once, in test_chart_versions.py.
    return CrdValidator(json.loads(crds_json), check_schemas=False)


def crd_validator(docs: Sequence[Mapping[str, Any]]) -> CrdValidator:
    """A validator for the CRDs among docs; the same CRDs (every stack's) share one."""
    crds = sorted(
        (d for d in docs if d.get("kind") == CRD_KIND), key=lambda d: d["metadata"]["name"]
    )
    return _validator(json.dumps(crds, sort_keys=True))


def app_version(key: str) -> str:
    """appVersion of the pinned chart's Chart.yaml."""
    return str(chart_metadata(archive(key))["appVersion"])


# --- scheduling and selection semantics ------------------------------------------------------


def pod_spec(workload: Mapping[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def pod_labels(workload: Mapping[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"].get("labels") or {}


def matches_selector(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Kubernetes LabelSelector semantics (an empty selector matches everything)."""
    if selector is None:
        return False
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    return all(_label_expression(e, labels) for e in selector.get("matchExpressions") or [])


def _label_expression(expression: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    key, operator = expression["key"], expression["operator"]
    values = expression.get("values") or []
    if operator == "In":
        return labels.get(key) in values
    if operator == "NotIn":
        return labels.get(key) not in values
    if operator == "Exists":
        return key in labels
    if operator == "DoesNotExist":
        return key not in labels
    if operator in {"Gt", "Lt"}:
        if key not in labels:
            return False
        have, want = int(labels[key]), int(values[0])
        return have > want if operator == "Gt" else have < want
    raise AssertionError(f"unknown selector operator {operator}")


def schedulable_on(spec: Mapping[str, Any], node_labels: Mapping[str, str]) -> bool:
    """Whether nodeSelector and required node affinity admit a node with these labels."""
    if any(node_labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
        return False
    required = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or {}
    terms = required.get("nodeSelectorTerms")
    if not terms:
        return True
    return any(
        all(_label_expression(e, node_labels) for e in term.get("matchExpressions") or [])
        for term in terms
    )


def tolerates(tolerations: Sequence[Mapping[str, Any]] | None, taint: Mapping[str, str]) -> bool:
    """Kubernetes toleration matching (Exists ignores the value; no key or effect matches all)."""
    for t in tolerations or []:
        key = t.get("key") or ""
        if (key and key != taint["key"]) or (not key and t.get("operator") != "Exists"):
            continue
        if t.get("effect") not in (None, "", taint["effect"]):
            continue
        if t.get("operator") == "Exists" or t.get("value") == taint.get("value"):
            return True
    return False
